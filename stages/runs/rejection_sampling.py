"""Rejection sampling into an SFT dataset (DeepSeek-R1 §2.3.3).

Sample N responses per prompt from a checkpoint (shown few-shot `demonstrations` first, if any: R1 §2.3.1 collects
its cold-start data "using few-shot prompting with a long CoT as an example"), keep those that pass every named
filter — a correct final answer (by the `verifier` reward: scored at least `min_score`), the `<think>…</think>
<answer>…</answer>` template, a chain of thought in the prompt's language, no repetition loops, no duplicates — and
write `{prompt, response}` rows, optionally merged with general (non-reasoning) demonstrations.
The rows keep the prompt without the demonstrations, so the SFT stage teaches the model to answer that way unshown.
R1 uses it twice: for readable cold-start data, and for the SFT round after reasoning RL. With `tools`, each sample
is a multi-turn trajectory (stages/multiturn.py: tool calls answered in `<information>` blocks), judged and kept
whole: rejection-sampled tool-use traces for a cold start.

Params, inputs and outputs: stages/kinds/rejection_sampling.py.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.chat import Prompt, prompt_key, with_demonstrations
from stages.context import StageContext
from stages.data import write_jsonl
from stages.distributed import gather_list, global_means, shard, write_trace
from stages.kinds.rejection_sampling import Params
from stages.models import sampling_policy
from stages.multiturn import multi_turn_sample
from stages.rewards import build_reward, format_reward, language_consistency_reward, repetition_ratio
from stages.rollout import stage_engine
from stages.text import check_prompts_fit, context_length, sample
from stages.tool_params import stage_tools

# filter(completions, columns, params) -> keep?  (columns: the prompt rows' columns, aligned with completions)
Filter = Callable[[list[str], dict[str, list[Any]], "Params"], list[bool]]


def correct(completions: list[str], columns: dict[str, list[Any]], p: "Params") -> list[bool]:
    """The `verifier` reward (by default `accuracy`: the final answer verifies against the row's `answer`) scores
    at least `min_score`."""
    if "answer" not in columns:
        raise ValueError("the 'correct' filter needs an `answer` column in the prompts")
    scores = build_reward(p.verifier, **p.verifier_params)(completions, **columns)
    return [score >= p.min_score for score in scores]


def formatted(completions: list[str], columns: dict[str, list[Any]], p: "Params") -> list[bool]:
    """The completion follows the R1 template `<think> … </think> <answer> … </answer>`."""
    return [r == 1.0 for r in format_reward(completions)]


def language_consistent(completions: list[str], columns: dict[str, list[Any]], p: "Params") -> list[bool]:
    """At least `min_language_consistency` of the chain-of-thought words are in the row's language."""
    scores = language_consistency_reward(completions, prompt=columns["prompt"], language=columns.get("language"))
    return [s >= p.min_language_consistency for s in scores]


def not_repetitive(completions: list[str], columns: dict[str, list[Any]], p: "Params") -> list[bool]:
    """At most `max_repetition` of the word 3-grams are repeats."""
    return [repetition_ratio(c) <= p.max_repetition for c in completions]


def dedup(completions: list[str], columns: dict[str, list[Any]], p: "Params") -> list[bool]:
    """Only the first copy of a (prompt, completion) pair."""
    seen: set[tuple[str, str]] = set()
    keep = []
    for prompt, completion in zip(map(prompt_key, columns["prompt"]), completions):
        keep.append((prompt, completion) not in seen)
        seen.add((prompt, completion))
    return keep


FILTERS: dict[str, Filter] = {f.__name__: f for f in (correct, formatted, language_consistent, not_repetitive, dedup)}


def accept(completions: list[str], columns: dict[str, list[Any]], p: Params) -> tuple[list[bool], dict[str, float]]:
    """Which samples pass every filter, and each filter's pass rate."""
    keep, rates = [True] * len(completions), {}
    for name in p.filters:
        passed = FILTERS[name](completions, columns, p)
        rates[f"pass_{name}"] = sum(passed) / max(len(passed), 1)
        keep = [k and ok for k, ok in zip(keep, passed)]
    return keep, rates


def sample_completions(ctx: StageContext, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       prompts: list[Prompt], rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, float]]:
    """This rank's completions of `prompts`, and its tool counts: single-turn, or with `tools` multi-turn (each
    completion the whole trajectory, tool text included, as the filters and the verifier judge it)."""
    p: Params = ctx.params
    tools = stage_tools(ctx)
    if tools is None:
        return sample(model, tokenizer, prompts, p.max_new_tokens, p.temperature,
                      max_prompt_length=p.max_prompt_length, engine=stage_engine(ctx)).completions, {}
    turns = multi_turn_sample(model, tokenizer, prompts, rows, tools.toolbox, tools.max_turns, p.max_new_tokens,
                              p.temperature, stage_engine(ctx), p.max_prompt_length)
    return turns.completions, turns.counts()


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    acc = ctx.accelerator
    model, tokenizer = sampling_policy(ctx, p)
    rows = ctx.rows("prompts")
    ids = list(range(len(rows))) if p.prompts is None else \
        random.Random(ctx.seed).sample(range(len(rows)), min(p.prompts, len(rows)))
    # a prompt that leaves no room for the tokens sampled after it in the model's context is refused now
    check_prompts_fit(ctx, tokenizer, context_length(model), "prompts", "max_new_tokens", cut=True,
                      prompts={i: with_demonstrations(rows[i]["prompt"], p.demonstrations) for i in ids})
    rows = [rows[i] for i in ids]
    local_ids = shard(ids, acc)  # each rank samples its share; the filters run on the gathered samples
    write_trace(acc, f"{ctx.pipeline}.{ctx.stage}", local_ids)
    repeated = [row for row in shard(rows, acc) for _ in range(p.samples_per_prompt)]
    shown = [with_demonstrations(row["prompt"], p.demonstrations) if p.demonstrations else row["prompt"]
             for row in repeated]
    completions, tool_counts = sample_completions(ctx, model, tokenizer, shown, repeated)
    completions = gather_list(completions, acc)
    repeated = [row for row in rows for _ in range(p.samples_per_prompt)]
    columns = {key: [row.get(key) for row in repeated] for key in rows[0]}
    keep, rates = accept(completions, columns, p)

    kept: dict[str, list[dict[str, Any]]] = {}
    for row, completion, ok in zip(repeated, completions, keep):
        if ok and len(kept.setdefault(prompt_key(row["prompt"]), [])) < p.max_per_prompt:
            kept[prompt_key(row["prompt"])].append({"prompt": row["prompt"], "response": completion})
    sft = [pair for pairs in kept.values() for pair in pairs]
    general = [{"prompt": r["prompt"], "response": r["response"]} for r in ctx.rows("general")] \
        if ctx.has("general") else []
    if acc.is_main_process:
        write_jsonl(sft + general, ctx.outputs["sft"])
    n_prompts = len({prompt_key(row["prompt"]) for row in rows})
    return {"acceptance_rate": sum(keep) / len(keep), "prompts_without_sample": n_prompts - len(kept),
            "kept": len(sft), "general": len(general), **rates, **global_means(acc, tool_counts)}
