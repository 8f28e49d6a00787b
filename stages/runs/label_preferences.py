"""Sample K responses per prompt from a policy and rank them with a scripted labeler (InstructGPT's comparison data).

Writes rows `{prompt, responses: [K], ranks: [K]}` — the same format a real ranked preference dataset is mapped to —
split by prompt into train and held-out files.

Params, inputs and outputs: stages/kinds/label_preferences.py.
"""

from __future__ import annotations

import random

from stages.chat import prompt_text
from stages.context import StageContext
from stages.data import write_jsonl
from stages.distributed import gather_list, shard, write_trace
from stages.kinds.label_preferences import Params
from stages.models import sampling_policy
from stages.registry import LABELERS
from stages.rollout import stage_engine
from stages.text import check_prompts_fit, context_length, sample


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    acc = ctx.accelerator
    model, tokenizer = sampling_policy(ctx, p)
    prompts = [r["prompt"] for r in ctx.rows("prompts")]
    chosen = random.Random(ctx.seed).sample(range(len(prompts)), min(p.prompts, len(prompts)))
    # a prompt that leaves no room for the tokens sampled after it in the model's context is refused now (on every
    # rank, every chosen prompt: all ranks refuse together)
    check_prompts_fit(ctx, tokenizer, context_length(model), "prompts", "max_new_tokens",
                      prompts={i: prompts[i] for i in chosen})
    ids = shard(chosen, acc)
    write_trace(acc, f"{ctx.pipeline}.{ctx.stage}", ids)
    prompts = [prompts[i] for i in ids]
    k = p.responses_per_prompt
    samples = sample(model, tokenizer, [q for q in prompts for _ in range(k)], p.max_new_tokens, p.temperature,
                     engine=stage_engine(ctx))
    label = LABELERS.load(p.labeler)
    rows = []
    for i, prompt in enumerate(prompts):
        responses = samples.completions[i * k:(i + 1) * k]
        rows.append({"prompt": prompt, "responses": responses, "ranks": label(prompt_text(prompt), responses)})
    rows = gather_list(rows, acc)
    all_tied = sum(len(set(row["ranks"])) == 1 for row in rows)
    n_eval = int(len(rows) * p.eval_fraction)
    if acc.is_main_process:
        write_jsonl(rows[n_eval:], ctx.outputs["train"])
        write_jsonl(rows[:n_eval], ctx.outputs["eval"])
    return {"comparisons": len(rows), "all_tied_fraction": all_tied / len(rows)}
