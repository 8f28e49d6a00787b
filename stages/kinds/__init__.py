"""Stage kinds: each module declares its `Params`, the `INPUTS` it reads, the `OUTPUTS` it writes, and `run(ctx)`.

`run` returns the stage's final held-out metrics (written to metrics.json); everything it writes goes under
`ctx.output_dir`. A built-in kind's module here is its declaration alone, free of torch (so that pipelines.yaml is
checked in an instant); its `run` is the import path of its implementation in `stages/runs/`. A user's own kind is a module of theirs with the same four names, named in pipelines.yaml by its
module path (`kind: my_kinds.rank_filter`); it may declare `KEY_METRICS` (what `rl4llm compare` shows of it).
"""

from __future__ import annotations

import inspect
import tokenize
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterable

from pydantic import AfterValidator, BaseModel, ConfigDict

from stages.registry import is_import_path, load_object


class Described(BaseModel):
    """A model whose fields' descriptions are the one-line comments where they are declared
    (`lr: float = 1e-4  # AdamW learning rate`): `rl4llm kinds` and `rl4llm schema` show them. Unknown keys are
    errors (a misspelt key must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        comments = declared_comments(cls)
        described = False
        for name, comment in comments.items():
            if name in cls.__annotations__ and cls.model_fields[name].description is None:
                cls.model_fields[name].description = comment
                described = True
        if described:
            cls.model_rebuild(force=True)


def declared_comments(cls: type) -> dict[str, str]:
    """{field: the comment ending the line that declares it} in the class body of `cls` (its own fields only)."""
    try:
        lines = inspect.getsource(cls).splitlines(keepends=True)
    except (OSError, TypeError):  # defined where there is no source (a REPL)
        return {}
    comments, line_start = {}, None
    for token in tokenize.generate_tokens(iter(lines).__next__):
        if token.type == tokenize.NAME and line_start is None and token.start[1] > 0:
            line_start = token
        elif token.type == tokenize.COMMENT and line_start is not None:
            comments[line_start.string] = token.string.lstrip("#").strip()
        if token.type in (tokenize.NEWLINE, tokenize.NL):
            line_start = None
    return comments


class StageParams(Described):
    """Base of every kind's params."""


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
    run: Callable | str  # run(ctx) -> metrics, or its import path (a built-in's: its stages/runs/ module)
    key_metrics: tuple[str, ...] = ()  # what `rl4llm compare` shows of it by default

    def load_run(self) -> Callable:
        """`run(ctx)`, imported now when the kind names it by import path (the training stack loads only here)."""
        return load_object(self.run) if isinstance(self.run, str) else self.run

    def run_module(self) -> str | None:
        """The module of `run` when named by import path (its code is the stage's code too)."""
        return self.run.partition(":")[0] if isinstance(self.run, str) else None


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


def kind_module(name: str) -> str:
    """The module of a kind: a built-in's, or a user's own kind named by its module path."""
    if name in KIND_MODULES:
        return KIND_MODULES[name]
    if is_import_path(name) and ":" not in name:
        return name
    raise ValueError(f"unknown stage kind '{name}'; built-in: {', '.join(sorted(KIND_MODULES))}, or the module path "
                     "of your own (`my_kinds.rank_filter`)")


def key_metrics(name: str) -> tuple[str, ...]:
    """What `rl4llm compare` shows of a kind's stages by default."""
    if name in KEY_METRICS:
        return KEY_METRICS[name]
    try:
        return get_kind(name).key_metrics
    except ValueError:  # a user's kind that no longer loads: compare shows what it logged
        return ()


def get_kind(name: str) -> StageKind:
    """The kind `name`, checked to declare what every kind declares. Raises ValueError naming what is wrong."""
    module = load_object(kind_module(name))
    missing = [a for a in ("Params", "INPUTS", "OUTPUTS", "run") if not hasattr(module, a)]
    if missing:
        raise ValueError(f"stage kind '{name}' ({module.__file__}) does not declare {', '.join(missing)}")
    if not (isinstance(module.Params, type) and issubclass(module.Params, StageParams)):
        raise ValueError(f"stage kind '{name}': Params must subclass stages.kinds.StageParams")
    if not all(isinstance(i, Input) for i in module.INPUTS.values()) or not (
            callable(module.run) or isinstance(module.run, str)) or not all(
            isinstance(o, str) for o in module.OUTPUTS.values()):
        raise ValueError(f"stage kind '{name}': INPUTS must map names to stages.kinds.Input, OUTPUTS names to paths "
                         "in the stage's directory, and run must be a function of the stage context (or its import path)")
    return StageKind(name, module.Params, module.INPUTS, module.OUTPUTS, module.run,
                     getattr(module, "KEY_METRICS", KEY_METRICS.get(name, ())))
