"""Prompts from reasoning-gym (procedural reasoning tasks with their own scorers): a training set and a disjoint
held-out set of one task, as chat prompts with the task's answer and metadata, for the `reasoning_gym` and
`math_verify` rewards and evaluators.

Rows: `prompt` ([system?, user] chat messages), `answer` (text), `task`, `metadata` (the entry's metadata as a JSON
string: its keys vary by task) and `task_config` (the task's config as JSON), which the `reasoning_gym` reward
needs to rebuild the task's scorer. Importing reasoning-gym takes about a second, so the task and its config are
checked when the stage starts, not by `rl4llm validate`.

reasoning-gym draws problem i from `seed + i`, so seeds s and s + 1 share all but one problem: the held-out set
stays (nearly) the same across a pipeline's `--seeds`, and a set of its own needs a seed far from the others.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from pydantic import Field, field_validator

from stages.context import StageContext
from stages.data import write_jsonl
from stages.kinds import Input, StageParams

OWN_KEYS = ("size", "seed")  # set by the stage's params, not by `config`
ATTEMPTS = 4  # generations (each twice the previous size) tried to find enough held-out problems


class Params(StageParams):
    task: str = Field(min_length=1)  # a reasoning-gym dataset name, e.g. chain_sum, basic_arithmetic, leg_counting
    size: int = Field(1000, gt=0)  # training rows
    eval_size: int = Field(100, gt=0)  # held-out rows; no held-out question is also a training question
    seed: int | None = None  # reasoning-gym's seed; None: the stage's seed
    config: dict[str, Any] = {}  # the task's own options, e.g. chain_sum: {min_terms: 2, max_terms: 2, max_digits: 2}
    system_prompt: str | None = None  # a system message before each question; None: the model's default

    @field_validator("config")
    @classmethod
    def not_own_keys(cls, config: dict[str, Any]) -> dict[str, Any]:
        own = sorted(set(config) & set(OWN_KEYS))
        if own:
            raise ValueError(f"config sets {', '.join(own)}: use the stage's own `{own[0]}` param")
        return config


INPUTS: dict[str, Input] = {}
OUTPUTS = {
    "prompts": "prompts.jsonl",  # {prompt, answer, task, metadata, task_config}
    "eval": "eval.jsonl",  # held-out problems, same columns
}
KEY_METRICS = ("rows", "eval_rows")  # `rl4llm compare` shows these


def create(label: str, p: Params, seed: int, size: int) -> Any:
    """The reasoning-gym dataset of `p.task` with `p.config`; errors name the stage and the key at fault."""
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if p.task not in DATASETS:
        near = difflib.get_close_matches(p.task, DATASETS, n=3)
        raise ValueError(f"{label}: task: unknown reasoning-gym task '{p.task}'; "
                         + (f"did you mean {' or '.join(near)}?" if near else f"tasks: {', '.join(sorted(DATASETS))}"))
    options = DATASETS[p.task][1].__dataclass_fields__
    unknown = sorted(set(p.config) - set(options))
    if unknown:
        raise ValueError(f"{label}: config: task '{p.task}' has no option {', '.join(unknown)}; options: "
                         f"{', '.join(sorted(set(options) - set(OWN_KEYS)))}")
    try:
        return reasoning_gym.create_dataset(p.task, size=size, seed=seed, **p.config)
    except (AssertionError, TypeError, ValueError) as e:  # the task's own config checks
        raise ValueError(f"{label}: config: task '{p.task}' refuses {p.config}: {e or type(e).__name__}") from None


def row(entry: dict[str, Any], p: Params) -> dict[str, Any]:
    system = [{"role": "system", "content": p.system_prompt}] if p.system_prompt is not None else []
    return {"prompt": [*system, {"role": "user", "content": entry["question"]}], "answer": str(entry["answer"]),
            "task": p.task, "metadata": json.dumps(entry["metadata"], default=str),
            "task_config": json.dumps(p.config, sort_keys=True)}


def split(entries: list[dict[str, Any]], size: int, eval_size: int) -> tuple[list[dict], list[dict]] | None:
    """The first `size` entries, and the first `eval_size` of the rest whose questions are new (to the training
    rows and to each other); None when there are too few."""
    train = entries[:size]
    seen = {e["question"] for e in train}
    held_out = []
    for entry in entries[size:]:
        if len(held_out) == eval_size:
            break
        if entry["question"] not in seen:
            seen.add(entry["question"])
            held_out.append(entry)
    return (train, held_out) if len(held_out) == eval_size else None


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    seed = ctx.seed if p.seed is None else p.seed
    total = p.size + p.eval_size
    for _ in range(ATTEMPTS):
        dataset = create(ctx.label, p, seed, total)
        parts = split([dataset[i] for i in range(len(dataset))], p.size, p.eval_size)
        if parts:
            break
        total = p.size + 2 * (total - p.size)
    else:
        raise ValueError(f"{ctx.label}: task '{p.task}' with {p.config} gave fewer than eval_size={p.eval_size} "
                         f"held-out questions unlike the {p.size} training ones: lower eval_size or widen the config")
    train, held_out = parts
    write_jsonl([row(e, p) for e in train], ctx.outputs["prompts"])
    write_jsonl([row(e, p) for e in held_out], ctx.outputs["eval"])
    return {"rows": len(train), "eval_rows": len(held_out)}
