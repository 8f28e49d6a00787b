"""Stage kinds: each module declares its `Params`, the `INPUTS` it reads, the `OUTPUTS` it writes, and `run(ctx)`.

`run` returns the stage's final held-out metrics (written to metrics.json); everything it writes goes under
`ctx.output_dir`. A kind may declare `KEY_METRICS`: what `rl4llm compare` shows of its stages by default.

A built-in kind's module here is its declaration alone, free of torch (so that pipelines.yaml is checked in an
instant); its `run` is the import path of its implementation in `stages/runs/`. A user's own kind is a module of
theirs with the same names, named in pipelines.yaml by its module path (`kind: my_kinds.rank_filter`).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import tokenize
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterable

from pydantic import AfterValidator, BaseModel, ConfigDict

from stages import python_ast
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
        for name, field in cls.model_fields.items():
            inherited = next((base.model_fields[name].description for base in cls.__mro__[1:]
                              if name in getattr(base, "model_fields", {})), None)
            description = comments.get(name) or inherited  # a redeclared field keeps its parent's, if it says none
            if field.description is None and description:
                field.description = description
                described = True
        if described:
            cls.model_rebuild(force=True)


def declared_comments(cls: type) -> dict[str, str]:
    """{field: the comment ending its declaration} for the fields `cls`'s own body declares (`name: type = …`)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined where there is no source (a REPL)
        return {}
    lines = source.splitlines(keepends=True)
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(iter(lines).__next__) if token.type == tokenize.COMMENT}
    body = python_ast.parse(source).body[0].body
    return {node.target.id: comments[node.end_lineno] for node in body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.end_lineno in comments}


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
    """An input a kind reads: a model (`model=True`: a `save_pretrained` directory or a Hub id, checked to be one
    before anything runs) or a dataset (whose rows must carry `columns`, or else all of `or_columns` when given,
    e.g. chat `messages` instead of `prompt` + `response`)."""

    doc: str
    required: bool = True
    columns: tuple[str, ...] = ()
    or_columns: tuple[str, ...] | None = None
    model: bool = False  # a model, not data
    gguf: bool = False  # a model that may also be a GGUF file (what `import_model` converts)

    def __post_init__(self) -> None:
        if self.model and (self.columns or self.or_columns):
            raise ValueError(f"input '{self.doc}': a model has no columns")
        if self.gguf and not self.model:
            raise ValueError(f"input '{self.doc}': gguf=True is for a model input (model=True)")


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


BUILT_IN_KINDS = (  # each declared in stages/kinds/<name>.py
    "import_model",
    "synthetic_instructions",
    "pretrain",
    "sft",
    "label_preferences",
    "reward_model",
    "ppo",
    "dpo",
    "synthetic_reasoning",
    "reasoning_gym",
    "grpo",
    "rejection_sampling",
    "distill",
    "label_outcomes",
    "label_steps",
    "verifier",
    "prm",
    "best_of_n",
    "synthetic_search",
    "bm25_index",
)


def kind_module(name: str) -> str:
    """The module of a kind: a built-in's, or a user's own kind named by its module path."""
    if name in BUILT_IN_KINDS:
        return f"{__name__}.{name}"
    if is_import_path(name) and ":" not in name:
        return name
    raise ValueError(f"unknown stage kind '{name}'; built-in: {', '.join(sorted(BUILT_IN_KINDS))}, or the module path "
                     "of your own (`my_kinds.rank_filter`)")


def key_metrics(name: str) -> tuple[str, ...]:
    """What `rl4llm compare` shows of a kind's stages by default."""
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
                         "in the stage's directory, and run must be a function of the stage context (or its path)")
    return StageKind(name, module.Params, module.INPUTS, module.OUTPUTS, module.run,
                     tuple(getattr(module, "KEY_METRICS", ())))
