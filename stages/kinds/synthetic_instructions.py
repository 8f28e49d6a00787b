"""Synthetic InstructGPT data for the embedded default: sloppy demonstrations, RL prompts, held-out prompts and a
pretraining corpus (see `stages.instruct_task`). A real pipeline replaces this stage with datasets."""

from __future__ import annotations

import random

from stages import instruct_task
from stages.context import StageContext
from stages.data import write_jsonl
from stages.kinds import Input, StageParams


class Params(StageParams):
    demonstrations: int = 2000  # SFT demonstrations (prompt, sloppy response)
    rl_prompts: int = 1000  # prompts for the RL stages
    eval_prompts: int = 100  # held-out prompts every policy stage is evaluated on
    pretrain_sentences: int = 6000  # pretraining corpus sentences
    pretrain_eval_sentences: int = 300  # held-out corpus sentences (LM loss, the alignment tax)
    slip: float = 0.3  # how sloppy the simulated demonstrators are


INPUTS: dict[str, Input] = {}
OUTPUTS = {
    "sft": "sft.jsonl",
    "prompts": "prompts.jsonl",
    "eval": "eval.jsonl",
    "pretrain": "pretrain.jsonl",
    "pretrain_eval": "pretrain_eval.jsonl",
}
KEY_METRICS = ("demonstration_gold_score", "demonstrations")  # `rl4llm compare` shows these


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    rng = random.Random(ctx.seed)
    demos = []
    for _ in range(p.demonstrations):
        prompt = instruct_task.make_prompt(rng)
        demos.append({"prompt": prompt, "response": instruct_task.demonstration(prompt, rng, p.slip)})
    eval_rows = [{"prompt": instruct_task.make_prompt(rng)} for _ in range(p.eval_prompts)]
    write_jsonl(demos, ctx.outputs["sft"])
    write_jsonl([{"prompt": instruct_task.make_prompt(rng)} for _ in range(p.rl_prompts)], ctx.outputs["prompts"])
    write_jsonl(eval_rows, ctx.outputs["eval"])
    write_jsonl([{"text": instruct_task.pretraining_sentence(rng)} for _ in range(p.pretrain_sentences)],
                ctx.outputs["pretrain"])
    write_jsonl([{"text": instruct_task.pretraining_sentence(rng)} for _ in range(p.pretrain_eval_sentences)],
                ctx.outputs["pretrain_eval"])
    demo_gold = [instruct_task.gold_score(d["prompt"], d["response"]) for d in demos]
    return {"demonstration_gold_score": sum(demo_gold) / len(demo_gold), "demonstrations": len(demos)}
