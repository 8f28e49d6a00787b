"""Sample K responses per prompt from a policy and rank them with a scripted labeler (InstructGPT's comparison data).

Writes rows `{prompt, responses: [K], ranks: [K]}` — the same format a real ranked preference dataset is mapped to —
split by prompt into train and held-out files.
"""

from __future__ import annotations

import random

from stages.context import StageContext
from stages.data import write_jsonl
from stages.kinds import Input, StageParams, named
from stages.labelers import LABELERS
from stages.models import load_policy, load_tokenizer
from stages.text import sample

Labeler = named(LABELERS, "labeler")


class Params(StageParams):
    prompts: int = 600
    responses_per_prompt: int = 4
    eval_fraction: float = 0.2
    max_new_tokens: int = 12
    temperature: float = 1.0
    labeler: Labeler = "instruct_gold"


INPUTS = {
    "policy": Input("model to sample responses from (InstructGPT: the SFT model)"),
    "prompts": Input("prompts to collect comparisons on", columns=("prompt",)),
}
OUTPUTS = {"train": "train.jsonl", "eval": "eval.jsonl"}


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    tokenizer = load_tokenizer(ctx.path("policy"))
    model = load_policy(ctx.path("policy")).to(ctx.accelerator.device)
    prompts = [r["prompt"] for r in ctx.rows("prompts")]
    prompts = random.Random(ctx.seed).sample(prompts, min(p.prompts, len(prompts)))
    k = p.responses_per_prompt
    samples = sample(model, tokenizer, [q for q in prompts for _ in range(k)], p.max_new_tokens, p.temperature)
    label = LABELERS[p.labeler]
    rows, all_tied = [], 0
    for i, prompt in enumerate(prompts):
        responses = samples.completions[i * k:(i + 1) * k]
        ranks = label(prompt, responses)
        all_tied += len(set(ranks)) == 1
        rows.append({"prompt": prompt, "responses": responses, "ranks": ranks})
    n_eval = int(len(rows) * p.eval_fraction)
    write_jsonl(rows[n_eval:], ctx.outputs["train"])
    write_jsonl(rows[:n_eval], ctx.outputs["eval"])
    return {"comparisons": len(rows), "all_tied_fraction": all_tied / len(rows)}
