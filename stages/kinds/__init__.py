"""Stage kinds: each module declares its `Params`, the `INPUTS` it reads, the `OUTPUTS` it writes, and `run(ctx)`.

`run` returns the stage's final held-out metrics (written to metrics.json); everything it writes goes under
`ctx.output_dir`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Annotated, Any, Callable, Iterable

from pydantic import AfterValidator, BaseModel, ConfigDict


class StageParams(BaseModel):
    """Base of every kind's params: unknown keys are errors (a misspelt param must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


def named(allowed: Iterable[str], what: str) -> Any:
    """The type of a param naming an entry of a registry: a `str` that must be one of `allowed`; the error (which
    reaches pipelines.yaml users) lists them."""
    names = sorted(allowed)

    def check(value: str) -> str:
        if value not in names:
            raise ValueError(f"unknown {what} '{value}'; allowed: {', '.join(names)}")
        return value

    return Annotated[str, AfterValidator(check)]


@dataclass(frozen=True)
class Input:
    """An input a kind reads: a model directory or a dataset (whose rows must carry `columns`, or else all of
    `or_columns` when given, e.g. chat `messages` instead of `prompt` + `response`)."""

    doc: str
    required: bool = True
    columns: tuple[str, ...] = ()
    or_columns: tuple[str, ...] | None = None


@dataclass(frozen=True)
class StageKind:
    name: str
    params: type[StageParams]
    inputs: dict[str, Input]
    outputs: dict[str, str]  # output name -> path relative to the stage's artifact directory
    run: Callable


KIND_MODULES = {
    "synthetic_instructions": "stages.kinds.synthetic_instructions",
    "pretrain": "stages.kinds.pretrain",
    "sft": "stages.kinds.sft",
    "label_preferences": "stages.kinds.label_preferences",
    "reward_model": "stages.kinds.reward_model",
    "ppo": "stages.kinds.ppo",
    "dpo": "stages.kinds.dpo",
    "synthetic_reasoning": "stages.kinds.synthetic_reasoning",
    "grpo": "stages.kinds.grpo",
    "rejection_sampling": "stages.kinds.rejection_sampling",
    "distill": "stages.kinds.distill",
}


# What `rl4llm compare` shows of each kind by default (those a stage logged): the metrics its stage exists to move.
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "synthetic_instructions": ("demonstration_gold_score", "demonstrations"),
    "pretrain": ("lm_eval_loss",),
    "sft": ("gold_score", "accuracy", "language_consistency", "eval_loss"),
    "label_preferences": ("comparisons", "all_tied_fraction"),
    "reward_model": ("eval_accuracy", "train_accuracy"),
    "ppo": ("gold_score", "accuracy", "kl", "reward", "ptx_lm_loss"),
    "dpo": ("gold_score", "eval_accuracy", "eval_margin", "kl"),
    "synthetic_reasoning": ("rl_prompts", "general_prompts"),
    "grpo": ("accuracy", "format_rate", "language_consistency", "kl"),
    "rejection_sampling": ("acceptance_rate", "kept"),
    "distill": ("accuracy", "format_rate", "language_consistency", "gold_score"),
}


def get_kind(name: str) -> StageKind:
    module: ModuleType = importlib.import_module(KIND_MODULES[name])
    return StageKind(name, module.Params, module.INPUTS, module.OUTPUTS, module.run)
