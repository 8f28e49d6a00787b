"""pipelines.yaml: the schema, its validation, and its resolution into one flat spec per stage.

Validation happens before anything runs or is written. Every error names the file, pipeline, stage and key, with
the allowed values or the nearest valid name, and `rl4llm` exits 2 on it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages import data
from stages.kinds import KIND_MODULES, Input, StageKind, get_kind

NAME = r"^[A-Za-z][A-Za-z0-9_-]*$"
ARTIFACTS = "artifacts"


class ConfigError(Exception):
    """A broken pipelines.yaml: where (file, pipeline, stage, key) and what."""

    def __init__(self, file: str, message: str, pipeline: str | None = None, stage: str | None = None,
                 key: str | None = None):
        self.file, self.pipeline, self.stage, self.key = file, pipeline, stage, key
        where = [f"pipeline '{pipeline}'" if pipeline else "", f"stage '{stage}'" if stage else "",
                 f"key '{key}'" if key else ""]
        super().__init__(f"{file}: {', '.join(w for w in where if w)}: {message}".replace(": : ", ": "))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(Strict):
    path: str  # local jsonl/json/parquet/csv file (relative to pipelines.yaml) or an HF dataset id
    split: str = "train"
    subset: str | None = None
    columns: dict[str, str] = Field(default_factory=dict)  # name a stage expects -> the dataset's column


class Overridable(Strict):
    """Settings a pipeline sets in `defaults` and a stage may override."""

    model: str | None = None  # HF id or local path, for stages with no model input wired
    tokenizer: str | None = None
    seed: int | None = None
    accelerate_config: str | None = None


class Defaults(Overridable):
    inputs: dict[str, str] = Field(default_factory=dict)  # given to every stage whose kind reads that input
    params: dict[str, Any] = Field(default_factory=dict)  # given to every stage whose kind has that param


class StageSpec(Overridable):
    name: str = Field(pattern=NAME)
    kind: str
    inputs: dict[str, str] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)


class PipelineSpec(Strict):
    description: str = ""
    defaults: Defaults = Field(default_factory=Defaults)
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    stages: list[StageSpec]


class ConfigFile(Strict):
    pipelines: dict[str, PipelineSpec]


def nearest(name: str, allowed) -> str:
    allowed = sorted(allowed)
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}(allowed: {', '.join(allowed) or 'none'})"


def _error_from_pydantic(file: str, raw: dict, err: ValidationError) -> ConfigError:
    first = err.errors()[0]
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
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(file, "file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(file, f"invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(file, "expected a mapping with a top-level 'pipelines' key")
    try:
        config = ConfigFile.model_validate(raw)
    except ValidationError as e:
        raise _error_from_pydantic(file, raw, e) from None
    for name in config.pipelines:
        if not re.match(NAME, name):
            raise ConfigError(file, f"pipeline names must match {NAME}", name)
    return config


def _resolve_input(file: str, pipeline: str, spec: PipelineSpec, stage: StageSpec, name: str, ref: str,
                   produced: dict[str, dict[str, str]]) -> dict[str, Any]:
    where = dict(pipeline=pipeline, stage=stage.name, key=f"inputs.{name}")
    source, _, item = ref.partition(".")
    if source == "datasets":
        if item not in spec.datasets:
            raise ConfigError(file, f"no dataset '{item}' in this pipeline; {nearest(item, spec.datasets)}", **where)
        return spec.datasets[item].model_dump()
    if source not in produced:
        raise ConfigError(file, f"'{ref}' names no earlier stage's output; earlier stages: "
                                f"{nearest(source, produced)}", **where)
    if item not in produced[source]:
        raise ConfigError(file, f"stage '{source}' has no output '{item}'; {nearest(item, produced[source])}",
                          **where)
    return {"path": produced[source][item], "columns": {}}


def _check_dataset_file(file: str, root: Path, where: dict, dataset: dict[str, Any], declared: Input):
    path = root / dataset["path"]
    if not data.is_local(dataset["path"]):
        return  # an HF dataset id: checked when the stage loads it
    if not path.exists():
        raise ConfigError(file, f"dataset file not found: {dataset['path']}", **where)
    present = set(data.local_columns(str(path), dataset.get("split")))
    mapped = dataset.get("columns") or {}
    for ours, theirs in mapped.items():
        if theirs not in present:
            raise ConfigError(file, f"column '{theirs}' (mapped to '{ours}') not in {dataset['path']}; "
                                    f"{nearest(theirs, present)}", **where)
    available = (present - set(mapped.values())) | set(mapped)
    if declared.or_columns and set(declared.or_columns) <= available:
        return
    for column in declared.columns:
        if column not in available:
            alternative = f" (or {', '.join(declared.or_columns)})" if declared.or_columns else ""
            raise ConfigError(file, f"dataset {dataset['path']} has no column '{column}'{alternative} (map one with "
                                    f"columns: {{{column}: <its column>}}); columns: {sorted(present)}", **where)


def _check_params(file: str, where: dict, kind: StageKind, params: dict[str, Any]) -> dict[str, Any]:
    fields = kind.params.model_fields
    for key in params:
        if key not in fields:
            raise ConfigError(file, f"unknown param for kind '{kind.name}'; {nearest(key, fields)}",
                              **{**where, "key": f"params.{key}"})
    try:
        return kind.params(**params).model_dump(mode="json")
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(x) for x in first["loc"])
        raise ConfigError(file, f"{first['msg']} (got {first.get('input')!r})",
                          **{**where, "key": f"params.{key}"}) from None


def resolve(path: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Validate pipelines.yaml fully and return {pipeline: {stage: resolved spec}} (what params.yaml holds).

    A resolved spec is flat and self-contained: kind, seed, model, accelerate config and process count, input paths
    (with column mappings), output paths, and every param (defaults filled in).
    """
    file = str(path)
    root = Path(path).resolve().parent
    config = load(path)
    resolved: dict[str, dict[str, dict[str, Any]]] = {}
    for pipeline, spec in config.pipelines.items():
        produced: dict[str, dict[str, str]] = {}
        resolved[pipeline] = {}
        for key in spec.defaults.params:
            if not any(key in get_kind(s.kind).params.model_fields for s in spec.stages if s.kind in KIND_MODULES):
                raise ConfigError(file, "no stage kind of this pipeline has this param",
                                  pipeline=pipeline, key=f"defaults.params.{key}")
        for stage in spec.stages:
            where = dict(pipeline=pipeline, stage=stage.name)
            if stage.name in produced:
                raise ConfigError(file, "duplicate stage name", **where, key="name")
            if stage.kind not in KIND_MODULES:
                raise ConfigError(file, f"unknown stage kind '{stage.kind}'; {nearest(stage.kind, KIND_MODULES)}",
                                  **where, key="kind")
            kind = get_kind(stage.kind)
            params = {k: v for k, v in spec.defaults.params.items() if k in kind.params.model_fields}
            params = _check_params(file, where, kind, {**params, **stage.params})

            refs = {k: v for k, v in spec.defaults.inputs.items()
                    if k in kind.inputs and v.partition(".")[0] in produced | {"datasets": {}}}
            refs.update(stage.inputs)
            inputs = {}
            for name, ref in refs.items():
                if name not in kind.inputs:
                    raise ConfigError(file, f"kind '{kind.name}' reads no input '{name}'; {nearest(name, kind.inputs)}",
                                      **where, key=f"inputs.{name}")
                inputs[name] = _resolve_input(file, pipeline, spec, stage, name, ref, produced)
                if ref.startswith("datasets."):
                    _check_dataset_file(file, root, {**where, "key": f"inputs.{name}"}, inputs[name],
                                        kind.inputs[name])
            for name, declared in kind.inputs.items():
                if declared.required and name not in inputs:
                    raise ConfigError(file, f"kind '{kind.name}' needs input '{name}' ({declared.doc})",
                                      **where, key=f"inputs.{name}")

            settings = {k: getattr(stage, k) if getattr(stage, k) is not None else getattr(spec.defaults, k)
                        for k in Overridable.model_fields}
            accelerate_config = settings["accelerate_config"] or "infra/accelerate/single.yaml"
            if not (root / accelerate_config).exists():
                raise ConfigError(file, f"accelerate config not found: {accelerate_config}", **where,
                                  key="accelerate_config")
            output_dir = f"{ARTIFACTS}/{pipeline}/{stage.name}"
            outputs = {name: f"{output_dir}/{rel}" for name, rel in kind.outputs.items()}
            produced[stage.name] = outputs
            resolved[pipeline][stage.name] = {
                "kind": stage.kind,
                "seed": settings["seed"] if settings["seed"] is not None else 0,
                "model": settings["model"],
                "tokenizer": settings["tokenizer"],
                "accelerate_config": accelerate_config,
                "num_processes": int((yaml.safe_load((root / accelerate_config).read_text()) or {})
                                     .get("num_processes", 1)),
                "inputs": inputs,
                "output_dir": output_dir,
                "outputs": outputs,
                "params": params,
            }
    return resolved


def config_hash(resolved_pipeline: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(resolved_pipeline, sort_keys=True).encode()).hexdigest()[:12]
