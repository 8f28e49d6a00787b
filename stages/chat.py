"""Prompts and completions in the two shapes of Hub datasets: plain strings, or chat messages (`[{role, content}]`).
Pure Python (rewards, evaluators and labelers read text through these)."""

from __future__ import annotations

import json

Message = dict[str, str]
Prompt = str | list[Message]  # a user turn, or a conversation that ends where the assistant's reply starts


def as_messages(prompt: Prompt) -> list[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


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
