"""pipelines.yaml: the schema, its validation, and its resolution into one flat spec per stage.

Validation happens before anything runs or is written. Every error names the file, pipeline, stage and key, with
the allowed values or the nearest valid name, and `rl4llm` exits 2 on it.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import Field, ValidationError
from yaml.error import MarkedYAMLError

from stages import data
from stages.kinds import BUILT_IN_KINDS, Described, Input, StageKind, get_kind
from stages.registry import is_import_path, use_project

NAME = r"^[A-Za-z][A-Za-z0-9_-]*$"  # matched whole: pydantic's (Rust) `$` and re.fullmatch reject "sft\n"
ARTIFACTS = "artifacts"
MAX_ALIAS_NODES = 10_000  # nodes a YAML document may add through aliases (a "billion laughs" adds billions)
MIXED_PRECISION = ("no", "fp16", "bf16", "fp8")
MODEL_CONFIGS = ("config.json", "adapter_config.json")  # a checkpoint's, a LoRA adapter's (models.ADAPTER_CONFIG)


class ConfigError(Exception):
    """A broken pipelines.yaml: where (file, pipeline, stage, key) and what."""

    def __init__(self, file: str, message: str, pipeline: str | None = None, stage: str | None = None,
                 key: str | None = None):
        self.file, self.pipeline, self.stage, self.key = file, pipeline, stage, key
        where = [f"pipeline {pipeline!r}" if pipeline else "", f"stage {stage!r}" if stage else "",
                 f"key {key!r}" if key else ""]
        super().__init__(f"{file}: {', '.join(w for w in where if w)}: {message}".replace(": : ", ": "))


class ConfigErrors(ConfigError):
    """Several problems in pipelines.yaml, reported together (one per line); its place is the first one's."""

    def __init__(self, errors: list[ConfigError]):
        first = errors[0]
        super().__init__(first.file, "", first.pipeline, first.stage, first.key)
        self.errors = errors
        self.args = (f"{len(errors)} problems:\n" + "\n".join(f"  {e}" for e in errors),)


def raise_all(errors: list[ConfigError]) -> None:
    """Raise the one error, or all of them together."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)


class Strict(Described):
    """A part of pipelines.yaml (unknown keys are errors; comments on fields are their descriptions)."""


class DatasetSpec(Strict):
    path: str  # local jsonl/json/parquet/csv file (relative to pipelines.yaml) or an HF dataset id
    split: str = "train"  # split of an HF dataset (or of a local Hub-layout folder)
    subset: str | None = None  # HF dataset configuration name
    columns: dict[str, str] = Field(default_factory=dict)  # name a stage expects -> the dataset's column


class Overridable(Strict):
    """Settings a pipeline sets in `defaults` and a stage may override."""

    model: str | None = None  # HF id or local path, for stages with no model input wired
    tokenizer: str | None = None  # HF id or local path (default: the model's)
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
    inputs: dict[str, str] = Field(default_factory=dict)  # input -> `datasets.<name>` or `<earlier stage>.<output>`
    params: dict[str, Any] = Field(default_factory=dict)  # the kind's params (`rl4llm kinds <kind>`)


class PipelineSpec(Strict):
    description: str = ""  # what the pipeline is for
    push: bool = False  # push each stage's outputs and DVC's run cache to the default remote as it finishes
    final_policy: str | None = None  # the stage whose model is registered in MLflow (default: the last policy)
    defaults: Defaults = Field(default_factory=Defaults)  # settings, inputs and params given to every stage
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)  # named datasets the stages read
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


def _expanded_size(node: yaml.Node, sizes: dict[int, int | None]) -> int:
    """Nodes under `node` with every alias expanded, memoised per node (so the cost is the document's size)."""
    if id(node) in sizes:
        if sizes[id(node)] is None:
            raise yaml.YAMLError("a recursive alias: a node that contains itself")
        return sizes[id(node)]
    sizes[id(node)] = None
    children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
        node.value if isinstance(node, yaml.SequenceNode) else []
    sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def _check_unique_keys(node: yaml.Node, path: str = "") -> None:
    """Raise a MarkedYAMLError at the second of two equal keys in one mapping under `node` (`path` names where it
    is: `pipelines.demo.stages[0].params`). Merged keys (`<<: *defaults`) may be overridden; they are not compared."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{path}[{i}]")
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[tuple[str, str], yaml.Node] = {}
    for key, value in node.value:
        if key.tag == "tag:yaml.org,2002:merge" or not isinstance(key, yaml.ScalarNode):
            continue
        if (key.tag, key.value) in first:
            where = f" in {path}" if path else ""
            raise MarkedYAMLError(problem=f"duplicate key {key.value!r}{where}, first on line "
                                          f"{first[key.tag, key.value].start_mark.line + 1}",
                                  problem_mark=key.start_mark)
        first[key.tag, key.value] = key
        _check_unique_keys(value, f"{path}.{key.value}".lstrip("."))


class _Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` that rejects documents whose aliases expand to more than MAX_ALIAS_NODES extra nodes, and
    duplicate keys in a mapping (which YAML would resolve silently, the last one winning)."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        sizes: dict[int, int | None] = {}
        if _expanded_size(node, sizes) - len(sizes) > MAX_ALIAS_NODES:
            raise yaml.YAMLError(f"aliases expand to more than {MAX_ALIAS_NODES:,} nodes; an alias bomb?")
        _check_unique_keys(node)
        return node


def _read_yaml(path: Path) -> Any:
    """The YAML document at `path`, or a ValueError saying why not (missing, a directory, not UTF-8, invalid YAML
    with its line and column, aliases expanding too far, a key twice in one mapping)."""
    try:
        return yaml.load(data.decode_utf8(path.read_bytes()), Loader=_Loader)
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except IsADirectoryError:
        raise ValueError("a directory, not a file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        raise ValueError(f"{where}invalid YAML ({getattr(e, 'problem', None) or e})") from None
    except RecursionError:
        raise ValueError("invalid YAML (nested too deeply)") from None


def load(path: str | Path) -> ConfigFile:
    """Parse and schema-check pipelines.yaml (structure only; see `resolve` for the semantic checks)."""
    file = str(path)
    try:
        raw = _read_yaml(Path(path))
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
    """A local input read once: a model directory (for an input the kind reads no columns from), else a dataset
    whose every row holds the columns `declared` needs (through the column mapping), with values of the right type."""
    name, split, path = dataset["path"], dataset.get("split"), root / dataset["path"]
    if not data.is_local(name, root):
        return  # an HF dataset id: checked when the stage loads it
    if not (declared.columns or declared.or_columns) and path.suffix not in data.LOCAL_FORMATS and \
            not any(path.glob(f"**/{split or 'train'}-*")):
        return _check_model_dir(file, where, name, path)
    if not path.exists():
        raise ConfigError(file, f"dataset file not found: {name}", **where)
    mapped = dataset.get("columns") or {}
    try:
        rows = data.local_rows(path, split, name)
        first = next(rows)
        present = set(first[1])
        for ours, theirs in mapped.items():
            if theirs not in present:
                raise ConfigError(file, f"column '{theirs}' (mapped to '{ours}') not in {name}; "
                                        f"{nearest(theirs, present)}", **where)
        available = (present - set(mapped.values())) | set(mapped)
        required = declared.columns
        if declared.or_columns and set(declared.or_columns) <= available:
            required = declared.or_columns
        for column in required:
            if column in present and column not in available:
                raise ConfigError(file, _taken_message(name, column, mapped), **where)
            if column not in available:
                alternative = f" (or {', '.join(declared.or_columns)})" if declared.or_columns else ""
                raise ConfigError(file, f"dataset {name} has no column '{column}'{alternative} (map one with "
                                        f"columns: {{{column}: <its column>}}); columns: {sorted(present)}", **where)
        for row_where, row in itertools.chain([first], rows):
            data.check_row(row, row_where, {*required, *mapped}, mapped)
    except ValueError as e:
        raise ConfigError(file, str(e), **where) from None


def _taken_message(name: str, column: str, mapped: dict[str, str]) -> str:
    """Why the stage lacks `column` although dataset `name` has it: the mapping gives it to another name."""
    taken = next(ours for ours, theirs in mapped.items() if theirs == column)
    return (f"dataset {name}: its column '{column}' is mapped to '{taken}' (columns: {{{taken}: {column}}}), which "
            f"leaves the stage no '{column}'; a mapping reads {{stage's name: dataset's column}}: map '{column}' "
            f"too (columns: {{{column}: <its column>}}) or drop that mapping")


def _check_column_sources(file: str, pipeline: str, datasets: dict[str, DatasetSpec]) -> list[ConfigError]:
    """Mappings that give one dataset column to two names: a column is renamed, not copied, so a stage would lack
    one of them."""
    errors = []
    for dataset, spec in datasets.items():
        named: dict[str, str] = {}
        for ours, theirs in spec.columns.items():
            if theirs in named:
                errors.append(ConfigError(
                    file, f"'{named[theirs]}' and '{ours}' both map to column '{theirs}' of {spec.path}; each "
                          "name needs a column of its own", pipeline=pipeline, key=f"datasets.{dataset}.columns"))
            named.setdefault(theirs, ours)
    return errors


def _check_model_dir(file: str, where: dict, name: str, path: Path) -> None:
    """A local model: a directory holding a readable config.json (or a LoRA adapter's adapter_config.json)."""
    if not path.is_dir():
        raise ConfigError(file, f"model directory not found: {name}" if not path.exists() else
                                f"model {name} is a file, not a save_pretrained directory", **where)
    config = next((path / c for c in MODEL_CONFIGS if (path / c).exists()), None)
    if config is None:
        raise ConfigError(file, f"model directory {name} has no config.json (not a save_pretrained directory)",
                          **where)
    label = f"{name}/{config.name}"
    try:
        parsed = json.loads(data.decode_utf8(config.read_bytes(), label))
    except json.JSONDecodeError as e:
        raise ConfigError(file, f"{label} line {e.lineno} column {e.colno}: invalid JSON ({e.msg})", **where) \
            from None
    except ValueError as e:  # not UTF-8
        raise ConfigError(file, str(e), **where) from None
    if not isinstance(parsed, dict):
        raise ConfigError(file, f"{label}: expected a JSON object, got {data.short_repr(parsed)}", **where)


def _check_accelerate_config(file: str, root: Path, where: dict, name: str) -> int:
    """An accelerate config file: a YAML mapping with a valid `num_processes` (returned) and `mixed_precision`."""
    where = {**where, "key": "accelerate_config"}
    if not (root / name).exists():
        raise ConfigError(file, f"accelerate config not found: {name}", **where)
    try:
        config = _read_yaml(root / name) or {}
    except ValueError as e:
        raise ConfigError(file, f"accelerate config {name}: {e}", **where) from None
    if not isinstance(config, dict):
        raise ConfigError(file, f"accelerate config {name}: expected a YAML mapping, got {data.short_repr(config)}",
                          **where)
    processes = config.get("num_processes", 1)
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ConfigError(file, f"accelerate config {name}: num_processes must be a positive integer, got "
                                f"{data.short_repr(processes)}", **where)
    precision = config.get("mixed_precision", "no")
    if precision not in MIXED_PRECISION:
        hint = " (quote it: 'no')" if precision is False else ""
        raise ConfigError(file, f"accelerate config {name}: mixed_precision must be one of "
                                f"{', '.join(MIXED_PRECISION)}, got {data.short_repr(precision)}{hint}", **where)
    return processes


def _check_params(file: str, where: dict, kind: StageKind, params: dict[str, Any]) -> dict[str, Any]:
    fields = kind.params.model_fields
    errors = [ConfigError(file, f"unknown param for kind '{kind.name}'; {nearest(key, fields)}",
                          **{**where, "key": f"params.{key}"}) for key in params if key not in fields]
    try:
        checked = kind.params(**{k: v for k, v in params.items() if k in fields}).model_dump(mode="json")
    except ValidationError as e:
        errors += [ConfigError(file, f"{error['msg']} (got {data.short_repr(error.get('input'))})",
                               **{**where, "key": "params." + ".".join(str(x) for x in error["loc"])})
                   for error in e.errors()]
    raise_all(errors)
    return checked


def resolve(path: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Validate pipelines.yaml fully and return {pipeline: {stage: resolved spec}} (what params.yaml holds). Every
    problem found is reported at once (`ConfigErrors`), not only the first.

    A resolved spec is flat and self-contained: kind, seed, model, accelerate config and process count, input paths
    (with column mappings), output paths, and every param (defaults filled in).
    """
    file = str(path)
    root = Path(path).resolve().parent
    config = load(path)
    use_project(root)
    resolved: dict[str, dict[str, dict[str, Any]]] = {}
    errors: list[ConfigError] = []
    for pipeline, spec in config.pipelines.items():
        produced: dict[str, dict[str, str]] = {}
        resolved[pipeline] = {}
        errors += _check_column_sources(file, pipeline, spec.datasets)
        for key in spec.defaults.params:
            if not any(key in kind.params.model_fields for kind in map(_kind_or_none, spec.stages) if kind):
                errors.append(ConfigError(file, "no stage kind of this pipeline has this param",
                                          pipeline=pipeline, key=f"defaults.params.{key}"))
        for stage in spec.stages:
            where = dict(pipeline=pipeline, stage=stage.name)
            if stage.name in produced:
                errors.append(ConfigError(file, "duplicate stage name", **where, key="name"))
                continue
            try:
                kind = get_kind(stage.kind)
            except ValueError as e:
                message = str(e) if is_import_path(stage.kind) else (
                    f"unknown stage kind '{stage.kind}'; {nearest(stage.kind, BUILT_IN_KINDS)}, or the module path of "
                    "your own kind (`my_kinds.rank_filter`)")
                errors.append(ConfigError(file, message, **where, key="kind"))
                produced[stage.name] = _AnyOutputs(f"{ARTIFACTS}/{pipeline}/{stage.name}")
                continue
            output_dir = f"{ARTIFACTS}/{pipeline}/{stage.name}"
            outputs = {name: f"{output_dir}/{rel}" for name, rel in kind.outputs.items()}
            try:
                resolved[pipeline][stage.name] = _resolve_stage(file, root, pipeline, spec, stage, kind, produced,
                                                                output_dir, outputs)
            except ConfigErrors as e:
                errors += e.errors
            except ConfigError as e:
                errors.append(e)
            produced[stage.name] = outputs  # later stages may still read it (no errors follow from this one)
        if spec.final_policy is not None and "model" not in produced.get(spec.final_policy, {}):
            errors.append(ConfigError(file, f"'{spec.final_policy}' is not a stage of this pipeline with a model "
                                            "output", pipeline=pipeline, key="final_policy"))
    raise_all(errors)
    return resolved


class _AnyOutputs(dict):
    """The outputs of a stage whose kind did not load: any name is taken (the kind's error is reported already)."""

    def __init__(self, output_dir: str):
        super().__init__()
        self.output_dir = output_dir

    def __contains__(self, name: object) -> bool:
        return True

    def __getitem__(self, name: str) -> str:
        return f"{self.output_dir}/{name}"


def _kind_or_none(stage: StageSpec) -> StageKind | None:
    try:
        return get_kind(stage.kind)
    except ValueError:
        return None  # reported where the stage is resolved


def _resolve_stage(file: str, root: Path, pipeline: str, spec: PipelineSpec, stage: StageSpec, kind: StageKind,
                   produced: dict[str, dict[str, str]], output_dir: str, outputs: dict[str, str]) -> dict[str, Any]:
    """One stage's resolved spec; raises every problem of the stage found (params, inputs, settings) together."""
    where = dict(pipeline=pipeline, stage=stage.name)
    errors: list[ConfigError] = []

    def check(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except ConfigErrors as e:
            errors.extend(e.errors)
        except ConfigError as e:
            errors.append(e)

    params = {k: v for k, v in spec.defaults.params.items() if k in kind.params.model_fields}
    params = check(_check_params, file, where, kind, {**params, **stage.params})

    refs = {k: v for k, v in spec.defaults.inputs.items()
            if k in kind.inputs and v.partition(".")[0] in produced | {"datasets": {}}}
    refs.update(stage.inputs)
    inputs = {}
    for name, ref in refs.items():
        if name not in kind.inputs:
            errors.append(ConfigError(file, f"kind '{kind.name}' reads no input '{name}'; "
                                            f"{nearest(name, kind.inputs)}", **where, key=f"inputs.{name}"))
            continue
        inputs[name] = check(_resolve_input, file, pipeline, spec, stage, name, ref, produced)
        if inputs[name] is not None and ref.startswith("datasets."):
            check(_check_dataset_file, file, root, {**where, "key": f"inputs.{name}"}, inputs[name],
                  kind.inputs[name])
    for name, declared in kind.inputs.items():
        if declared.required and name not in refs:
            errors.append(ConfigError(file, f"kind '{kind.name}' needs input '{name}' ({declared.doc})",
                                      **where, key=f"inputs.{name}"))

    settings = {k: getattr(stage, k) if getattr(stage, k) is not None else getattr(spec.defaults, k)
                for k in Overridable.model_fields}
    if settings["model"] and data.is_local(settings["model"], root):  # not an HF id
        check(_check_model_dir, file, {**where, "key": "model"}, settings["model"], root / settings["model"])
    accelerate_config = settings["accelerate_config"] or "infra/accelerate/single.yaml"
    num_processes = check(_check_accelerate_config, file, root, where, accelerate_config)
    raise_all(errors)
    return {
        "kind": stage.kind,
        "seed": settings["seed"] if settings["seed"] is not None else 0,
        "model": settings["model"],
        "tokenizer": settings["tokenizer"],
        "accelerate_config": accelerate_config,
        "num_processes": num_processes,
        "inputs": inputs,
        "output_dir": output_dir,
        "outputs": outputs,
        "params": params,
    }


def run_settings(path: str | Path) -> dict[str, dict[str, Any]]:
    """{pipeline: {"push", "final_policy", "default_work_pool", "stages": {stage: {"work_pool", "retries",
    "retry_delay_seconds"}}}} of a file `resolve` accepted (stage settings over the pipeline's defaults)."""
    out = {}
    for pipeline, spec in load(path).pipelines.items():
        stages = {}
        for stage in spec.stages:
            chosen = {k: getattr(stage, k) if getattr(stage, k) is not None else getattr(spec.defaults, k)
                      for k in Scheduling.model_fields}
            stages[stage.name] = {**chosen, "retries": chosen["retries"] or 0,
                                  "retry_delay_seconds": 10.0 if chosen["retry_delay_seconds"] is None
                                  else chosen["retry_delay_seconds"]}
        out[pipeline] = {"push": spec.push, "final_policy": spec.final_policy or _last_policy(spec),
                         "default_work_pool": spec.defaults.work_pool, "stages": stages}
    return out


def _last_policy(spec: PipelineSpec) -> str | None:
    """The last stage that trains a policy (a kind with a `model` output that is not a reward model)."""
    policies = [s.name for s in spec.stages if "model" in get_kind(s.kind).outputs and s.kind != "reward_model"]
    return policies[-1] if policies else None


def config_hash(resolved_pipeline: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(resolved_pipeline, sort_keys=True).encode()).hexdigest()[:12]


def select_stages(order: list[str], graph: dict[str, set[str]], stage: str | None, downstream: bool) -> list[str]:
    """The stages to run: all; one; or one and every later stage that depends on it (transitively)."""
    if stage is None:
        return order
    selected = {stage}
    if downstream:
        for name in order[order.index(stage) + 1:]:
            if graph[name] & selected:
                selected.add(name)
    return [name for name in order if name in selected]


def input_graph(specs: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
    """stage -> the earlier stages whose outputs it reads."""
    producers = {path: stage for stage, spec in specs.items() for path in spec["outputs"].values()}
    return {stage: {producers[i["path"]] for i in spec["inputs"].values() if i["path"] in producers}
            for stage, spec in specs.items()}
