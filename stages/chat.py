"""Prompts and completions in the two shapes of Hub datasets: plain strings, or chat messages (`[{role, content}]`).
Pure Python (rewards, evaluators and labelers read text through these)."""

from __future__ import annotations

import json
from typing import Any

Message = dict[str, str]
Prompt = str | list[Message]  # a user turn, or a conversation that ends where the assistant's reply starts


def as_messages(prompt: Prompt) -> list[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def with_demonstrations(prompt: Prompt, demonstrations: list[Message]) -> list[Message]:
    """The prompt with few-shot demonstration turns (user/assistant pairs) put after its system turns, before the
    conversation itself."""
    messages = as_messages(prompt)
    system = 0
    while system < len(messages) and messages[system]["role"] == "system":
        system += 1
    return [*messages[:system], *demonstrations, *messages[system:]]


def prompt_text(prompt: Prompt) -> str:
    """The last user turn's text (what rule rewards and evaluators read)."""
    return prompt if isinstance(prompt, str) else next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def completion_text(completion: str | list[Message]) -> str:
    """A completion's text: the string, or the content of a conversational completion's assistant turn(s)."""
    if isinstance(completion, str):
        return completion
    return "\n".join(m["content"] for m in completion if m["role"] == "assistant")


def prompt_key(prompt: Prompt) -> str:
    """A hashable, order-preserving key of a prompt (messages are lists)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


Ranked = tuple[Prompt, list[str], list[int]]  # a comparison: prompt, K responses, their ranks (0 = best)


def as_ranked(row: dict[str, Any]) -> Ranked:
    """A comparison row as (prompt, response texts, ranks); a chosen/rejected pair is K = 2. Without a `prompt`
    column, chosen and rejected are whole conversations (TRL's implicit-prompt format): their shared turns are the
    prompt."""
    if "responses" in row:
        return row["prompt"], [completion_text(r) for r in row["responses"]], list(row["ranks"])
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if prompt is None:
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    return prompt, [completion_text(chosen), completion_text(rejected)], [0, 1]


def held_out_prompts(rows: list[dict[str, Any]], eval_fraction: float) -> set[str]:
    """The keys of the first `eval_fraction` of the distinct prompts (a prompt listed twice is one prompt)."""
    keys = list(dict.fromkeys(prompt_key(row["prompt"]) for row in rows))
    return set(keys[:int(len(keys) * eval_fraction)])
