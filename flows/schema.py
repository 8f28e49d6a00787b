"""The schema of pipelines.yaml (pydantic; every field's comment is its description) and its loading: structure
only, every problem reported at once; `flows.config.resolve` does the semantic checks."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from flows.errors import ConfigError, raise_all
from flows.yaml_file import read_yaml
from stages.kinds import Described
from stages.spec import DataInput

NAME = r"^[A-Za-z][A-Za-z0-9_-]*$"  # matched whole: pydantic's (Rust) `$` and re.fullmatch reject "sft\n"


class Strict(Described):
    """A part of pipelines.yaml (unknown keys are errors; comments on fields are their descriptions)."""


class Overridable(Strict):
    """Settings a pipeline sets in `defaults` and a stage may override."""

    model: str | None = None  # HF id or local path, for stages with no model input wired
    seed: int | None = None  # seeds sampling, initialisation and data order (default 0)
    accelerate_config: str | None = None  # accelerate config file (default infra/accelerate/single.yaml)


class Scheduling(Strict):
    """Where and how a stage runs, set in `defaults` or per stage. Not part of the stage's spec: changing them never
    makes a stage stale."""

    work_pool: str | None = None  # Prefect work pool whose worker runs the stage (after `rl4llm deploy`)
    retries: int | None = Field(default=None, ge=0)  # times Prefect retries a failed stage (default 0)
    retry_delay_seconds: float | None = Field(default=None, ge=0)  # wait before a retry (default 10)


class Defaults(Overridable, Scheduling):
    inputs: dict[str, str] = Field(default_factory=dict)  # given to every stage whose kind reads that input
    params: dict[str, Any] = Field(default_factory=dict)  # given to every stage whose kind has that param


class StageSpec(Overridable, Scheduling):
    name: str = Field(pattern=NAME)  # unique in the pipeline; names the stage's outputs (`<name>.model`)
    kind: str  # a built-in kind (`rl4llm kinds`) or the module path of your own
    inputs: dict[str, str] = Field(default_factory=dict)  # input -> datasets.<name>, <stage>.<output>, path or Hub id
    params: dict[str, Any] = Field(default_factory=dict)  # the kind's params (`rl4llm kinds <kind>`)


class PipelineSpec(Strict):
    description: str = ""  # what the pipeline is for
    push: bool = False  # push each stage's outputs and DVC's run cache to the default remote as it finishes
    final_policy: str | None = None  # the stage whose model is registered in MLflow (default: the last policy)
    defaults: Defaults = Field(default_factory=Defaults)  # settings, inputs and params given to every stage
    datasets: dict[str, DataInput] = Field(default_factory=dict)  # named datasets the stages read
    stages: list[StageSpec]  # run in order; each reads earlier stages' outputs


class ConfigFile(Strict):
    pipelines: dict[str, PipelineSpec]  # pipeline name -> its stages


def nearest(name: str, allowed) -> str:
    allowed = sorted(allowed)
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}(allowed: {', '.join(allowed) or 'none'})"


def _errors_from_pydantic(file: str, raw: dict, err: ValidationError) -> list[ConfigError]:
    return [_error_from_pydantic(file, raw, error) for error in err.errors()]


def _error_from_pydantic(file: str, raw: dict, first: dict) -> ConfigError:
    loc = list(first["loc"])
    pipeline = stage = None
    if len(loc) >= 2 and loc[0] == "pipelines":
        pipeline = str(loc[1])
        loc = loc[2:]
        if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int):
            stages = raw["pipelines"][pipeline].get("stages") or []
            stage = str(stages[loc[1]].get("name", f"#{loc[1] + 1}")) if isinstance(stages[loc[1]], dict) else None
            loc = loc[2:]
    key = ".".join(str(x) for x in loc) or None
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    return ConfigError(file, message, pipeline, stage, key)


def load(path: str | Path) -> ConfigFile:
    """Parse and schema-check pipelines.yaml (structure only; see `resolve` for the semantic checks)."""
    file = str(path)
    try:
        raw = read_yaml(Path(path))
    except ValueError as e:
        raise ConfigError(file, str(e)) from None
    if not isinstance(raw, dict):
        raise ConfigError(file, "expected a mapping with a top-level 'pipelines' key")
    try:
        config = ConfigFile.model_validate(raw)
    except ValidationError as e:
        raise_all(_errors_from_pydantic(file, raw, e))
    raise_all([ConfigError(file, f"pipeline name {name!r} must match {NAME}") for name in config.pipelines
               if not re.fullmatch(NAME, name)])
    return config
