"""Multi-turn rollouts that call tools (Search-R1, Jin et al. 2025, §3.1-3.2): the policy writes until it closes a
tool call (`<search> query </search>`), the environment runs the tool and appends ` <information> … </information> `,
and the policy writes on, up to `max_turns` tool calls and a total token budget; after its last allowed call it
writes on to EOS or the budget (Search-R1's final rollout). Each response records which tokens the policy wrote
(loss mask 1) and which the environment appended (0: retrieved-token masking, no loss on the tool's text).

Sampling goes through `stages.text.sample_ids` (all unfinished samples together, each prompt row being its prompt
and its response so far), so it draws from torch's RNG: a seeded stage's rollouts are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from stages.text import Prompt, RolloutEngine, encode_prompt, sample_ids
from stages.tools import ToolBox


@dataclass(frozen=True)
class ToolUse:
    """How a stage's policy uses tools: the tools by tag, and the calls a sample may make."""

    toolbox: ToolBox
    max_turns: int


@dataclass
class Rollout:
    """One sample's multi-turn response: every token after its prompt, and who wrote each."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)  # the policy's tokens and the appended tool tokens
    loss_mask: list[int] = field(default_factory=list)  # 1: the policy wrote it; 0: the environment appended it
    tool_calls: int = 0  # tools run
    invalid_calls: int = 0  # a closing tag without an opening one or a query, or an opening tag never closed
    failed_calls: int = 0  # tools that raised, ran out of time or returned no text
    turns: int = 0  # segments the policy wrote
    done: bool = False


@dataclass
class MultiTurnSamples:
    rollouts: list[Rollout]
    completions: list[str]  # each full response decoded (the tool's text included), as the rewards see it

    def counts(self) -> dict[str, float]:
        """Means per sample: tool calls, turns, invalid and failed calls; the share of samples calling a tool."""
        n = max(len(self.rollouts), 1)
        return {"tool_calls_per_sample": sum(r.tool_calls for r in self.rollouts) / n,
                "tool_call_rate": sum(r.tool_calls > 0 for r in self.rollouts) / n,
                "invalid_tool_calls": sum(r.invalid_calls for r in self.rollouts) / n,
                "tool_failures": sum(r.failed_calls for r in self.rollouts) / n,
                "turns_per_sample": sum(r.turns for r in self.rollouts) / n}


def first_call_end(tokenizer: PreTrainedTokenizerBase, segment: list[int], tags: list[str]) -> tuple[int, str] | None:
    """(tokens up to and including the one completing the first closing tag `</tag>` of `tags`, that tag), or None
    when the segment closes none."""
    text = tokenizer.decode(segment, skip_special_tokens=True)
    if not any(f"</{tag}>" in text for tag in tags):
        return None
    for end in range(1, len(segment) + 1):
        text = tokenizer.decode(segment[:end], skip_special_tokens=True)
        closed = [tag for tag in tags if f"</{tag}>" in text]
        if closed:
            return end, min(closed, key=lambda tag: text.index(f"</{tag}>"))
    return None


def call_query(text: str, tag: str) -> str | None:
    """The query of the last `<tag> … </tag>` call closed at the end of `text` (stripped); None when there is no
    opening tag before the closing one or the query is empty."""
    head = text[:text.index(f"</{tag}>")]
    start = head.rfind(f"<{tag}>")
    if start < 0:
        return None
    return head[start + len(tag) + 2:].strip() or None


def opens_call(text: str, tags: list[str]) -> bool:
    return any(f"<{tag}>" in text for tag in tags)


def information_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(f" <information> {text} </information> ", add_special_tokens=False)["input_ids"]


def append(rollout: Rollout, ids: list[int], written_by_model: bool) -> None:
    rollout.response_ids += ids
    rollout.loss_mask += [int(written_by_model)] * len(ids)


def take_segment(tokenizer: PreTrainedTokenizerBase, rollout: Rollout, segment: list[int], row: dict[str, Any],
                 toolbox: ToolBox, max_turns: int, budget: int) -> None:
    """Append the policy's `segment` (cut after the first tool call it closes, while calls are allowed) and, for a
    call, the tool's answer; mark the rollout done when it has no call, or no calls or budget left."""
    rollout.turns += 1
    tags = list(toolbox.tools)
    calls_left = rollout.tool_calls + rollout.invalid_calls < max_turns
    call = first_call_end(tokenizer, segment, tags) if calls_left else None
    if call is None:
        append(rollout, segment, True)
        rollout.done = True
        if calls_left and opens_call(tokenizer.decode(segment, skip_special_tokens=True), tags):
            rollout.invalid_calls += 1  # an opening tag never closed
        return
    end, tag = call
    append(rollout, segment[:end], True)
    query = call_query(tokenizer.decode(segment[:end], skip_special_tokens=True), tag)
    if query is None:
        rollout.invalid_calls += 1
        answer = f"error: a call is <{tag}> query </{tag}>"
    else:
        rollout.tool_calls += 1
        result = toolbox.call(tag, query, row)
        rollout.failed_calls += not result.ok
        answer = result.text
    append(rollout, information_ids(tokenizer, answer)[:budget - len(rollout.response_ids)], False)
    rollout.done = len(rollout.response_ids) >= budget


def multi_turn_sample(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt],
                      rows: list[dict[str, Any]], toolbox: ToolBox, max_turns: int, max_new_tokens: int,
                      temperature: float = 1.0, engine: RolloutEngine | None = None,
                      max_prompt_length: int | None = None, batch_size: int = 64,
                      what: str = "sampling") -> MultiTurnSamples:
    """One multi-turn response per prompt (repeat prompts for several), each at most `max_new_tokens` tokens in all
    (the policy's and the tools'), with at most `max_turns` tool calls. `rows[i]`'s columns go to the tools of sample
    i (`tool(query, **columns)`). Prompts longer than `max_prompt_length` tokens keep their end."""
    rollouts = [Rollout(encode_prompt(tokenizer, p)[-max_prompt_length:] if max_prompt_length
                        else encode_prompt(tokenizer, p)) for p in prompts]
    while active := [i for i, r in enumerate(rollouts) if not r.done]:
        budgets = [max_new_tokens - len(rollouts[i].response_ids) for i in active]
        samples = sample_ids(model, tokenizer, [rollouts[i].prompt_ids + rollouts[i].response_ids for i in active],
                             max(budgets), temperature, batch_size, what, engine)
        segments = [ids[:n] for ids, n in zip(samples.batch.response_ids.tolist(), samples.lengths)]
        for i, segment, budget in zip(active, segments, budgets):
            take_segment(tokenizer, rollouts[i], segment[:budget], rows[i], toolbox, max_turns, max_new_tokens)
    completions = [tokenizer.decode(r.response_ids, skip_special_tokens=True).strip() for r in rollouts]
    return MultiTurnSamples(rollouts, completions)
