"""Sample N solutions per problem from a policy and label each correct or not by a verifier reward: the training
data of an outcome verifier (Cobbe et al. 2021, §4: 100 samples per training problem, each labelled by whether it
reaches the correct final answer).

Writes rows `{prompt, completion, label, answer, …the prompt row's other columns}` — TRL's unpaired
`{prompt, completion, label}` format — split by prompt (all samples of a problem on one side, so the held-out rows
are problems the verifier never saw) into train and held-out files. The prompts are taken in an order drawn from
the seed, the held-out ones first.

Params, inputs and outputs: stages/kinds/label_outcomes.py.
"""

from __future__ import annotations

import random
from typing import Any

from stages.chat import held_out_prompts, prompt_key
from stages.context import StageContext
from stages.data import write_jsonl
from stages.distributed import gather_list, shard, write_trace
from stages.kinds.label_outcomes import Params
from stages.models import sampling_policy
from stages.rewards import build_reward
from stages.rollout import stage_engine
from stages.text import check_prompts_fit, context_length, sample

OWN_COLUMNS = ("prompt", "completion", "label")  # what every output row holds first


def labelled_rows(rows: list[dict[str, Any]], completions: list[str], p: Params) -> list[dict[str, Any]]:
    """One output row per sample (`completions`: `samples_per_prompt` per row of `rows`, in order), labelled
    correct when the `verifier` reward, given every column of its prompt row, scores it at least `min_score`."""
    repeated = [row for row in rows for _ in range(p.samples_per_prompt)]
    names = dict.fromkeys(key for row in rows for key in row)
    columns = {key: [row.get(key) for row in repeated] for key in names}
    scores = build_reward(p.verifier, **p.verifier_params)(completions, **columns)
    return [{"prompt": row["prompt"], "completion": completion, "label": score >= p.min_score,
             **{key: value for key, value in row.items() if key not in OWN_COLUMNS}}
            for row, completion, score in zip(repeated, completions, scores, strict=True)]


def prompt_outcomes(labelled: list[dict[str, Any]], samples_per_prompt: int) -> dict[str, float]:
    """How many prompts had every sample correct, and how many none (neither teaches a verifier to compare)."""
    groups = [[row["label"] for row in labelled[start:start + samples_per_prompt]]
              for start in range(0, len(labelled), samples_per_prompt)]
    return {"prompts_all_correct": sum(all(g) for g in groups),
            "prompts_none_correct": sum(not any(g) for g in groups)}


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    acc = ctx.accelerator
    model, tokenizer = sampling_policy(ctx, p)
    rows = ctx.rows("prompts")
    n_prompts = len(rows) if p.prompts is None else min(p.prompts, len(rows))
    ids = random.Random(ctx.seed).sample(range(len(rows)), n_prompts)  # the seed's order: the held-out ones first
    # a prompt that leaves no room for the tokens sampled after it in the model's context is refused now
    check_prompts_fit(ctx, tokenizer, context_length(model), "prompts", "max_new_tokens", cut=True,
                      prompts={i: rows[i]["prompt"] for i in ids})
    rows = [rows[i] for i in ids]
    write_trace(acc, f"{ctx.pipeline}.{ctx.stage}", shard(ids, acc))
    shown = [row["prompt"] for row in shard(rows, acc) for _ in range(p.samples_per_prompt)]
    completions = gather_list(sample(model, tokenizer, shown, p.max_new_tokens, p.temperature,
                                     max_prompt_length=p.max_prompt_length, engine=stage_engine(ctx)).completions, acc)
    labelled = labelled_rows(rows, completions, p)
    held_out = held_out_prompts(rows, p.eval_fraction)
    evaluation = [row for row in labelled if prompt_key(row["prompt"]) in held_out]
    if acc.is_main_process:
        write_jsonl([row for row in labelled if prompt_key(row["prompt"]) not in held_out], ctx.outputs["train"])
        write_jsonl(evaluation, ctx.outputs["eval"])
    return {"samples": len(labelled), "eval_samples": len(evaluation),
            "correct_rate": sum(row["label"] for row in labelled) / len(labelled),
            **prompt_outcomes(labelled, p.samples_per_prompt)}
