"""Synthetic DeepSeek-R1 data for the embedded default (see `stages.reasoning_task`): a pretraining corpus of sloppy
worked solutions, RL prompts with gold answers, general prompts with sloppy demonstrations, and held-out prompts.
A real pipeline replaces this stage with datasets (e.g. a math set with `prompt`/`answer` columns)."""

from __future__ import annotations

import random

from stages import reasoning_task as task
from stages.context import StageContext
from stages.data import write_jsonl
from stages.kinds import Input, StageParams


class Params(StageParams):
    pretrain_documents: int = 8000  # corpus documents: problems with worked solutions (some wrong or mixed-language)
    general_documents: int = 1000  # corpus documents: general (non-reasoning) requests with answers
    rl_prompts: int = 1000  # reasoning problems for RL (prompt, answer, language)
    eval_prompts: int = 100  # held-out reasoning problems
    general_prompts: int = 400  # general prompts (preference data, the secondary RL round)
    wrong_rate: float = 0.3  # the corpus author's miscalculated solutions
    format_error_rate: float = 0.3  # solutions breaking the template or skipping the reasoning
    mix_rate: float = 0.3  # chance of each step being written in the other language
    slip: float = 0.3  # sloppiness of the general demonstrations


INPUTS: dict[str, Input] = {}
OUTPUTS = {
    "pretrain": "pretrain.jsonl",  # {text}
    "prompts": "prompts.jsonl",  # {prompt, answer, language, task}
    "eval": "eval.jsonl",  # held-out reasoning prompts, same columns
    "general": "general.jsonl",  # {prompt, response, language, task}: general demonstrations
    "general_prompts": "general_prompts.jsonl",  # {prompt, answer, language, task}
    "mixed_prompts": "mixed_prompts.jsonl",  # reasoning + general prompts, routed by `task`
}
KEY_METRICS = ("rl_prompts", "general_prompts")  # `rl4llm compare` shows these


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    rng = random.Random(ctx.seed)

    def problems(n: int) -> list[dict]:
        return [task.make_problem(rng, rng.choice(task.LANGUAGES)) for _ in range(n)]

    corpus = []
    for row in problems(p.pretrain_documents):
        response = task.solution(row["steps"], row["language"], rng, p.wrong_rate, p.format_error_rate, p.mix_rate)
        corpus.append({"text": task.chat_document(row["prompt"], response)})
    general = []
    for _ in range(p.general_documents + p.general_prompts):
        row = task.make_general_prompt(rng, rng.choice(task.LANGUAGES))
        general.append({**row, "response": task.general_demonstration(row["prompt"], rng, p.slip)})
    corpus += [{"text": task.chat_document(g["prompt"], g["response"])} for g in general[:p.general_documents]]
    rng.shuffle(corpus)
    rl_rows = [{k: v for k, v in r.items() if k != "steps"} for r in problems(p.rl_prompts + p.eval_prompts)]
    general_rows = [{k: v for k, v in g.items() if k != "response"} for g in general[p.general_documents:]]

    write_jsonl(corpus, ctx.outputs["pretrain"])
    write_jsonl(rl_rows[:p.rl_prompts], ctx.outputs["prompts"])
    write_jsonl(rl_rows[p.rl_prompts:], ctx.outputs["eval"])
    write_jsonl(general[:p.general_documents], ctx.outputs["general"])
    write_jsonl(general_rows, ctx.outputs["general_prompts"])
    write_jsonl(rl_rows[:p.rl_prompts] + general_rows, ctx.outputs["mixed_prompts"])
    return {"pretrain_documents": len(corpus), "rl_prompts": p.rl_prompts, "general_prompts": len(general_rows)}
