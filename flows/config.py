"""pipelines.yaml resolved into one flat spec per stage (what params.yaml holds and DVC hashes) and the run settings
of each pipeline. Validation happens before anything runs or is written: every error names the file, pipeline,
stage and key, with the allowed values or the nearest valid name, and `rl4llm` exits 2 on it (flows/schema.py holds
the schema, flows/checks.py the checks of the files it names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, Field, ValidationError

from flows import checks
from flows.errors import ConfigError, ConfigErrors, raise_all
from flows.schema import Overridable, PipelineSpec, Scheduling, StageSpec, load, nearest
from stages import data
from stages.kinds import BUILT_IN_KINDS, StageKind, get_kind
from stages.params import REPLACED_PARAMS
from stages.paths import output_dir as stage_output_dir
from stages.registry import is_import_path, use_project
from stages.spec import DataInput, ResolvedStage


class StageSettings(BaseModel):
    """How one stage runs (never part of its spec: changing it makes nothing stale)."""

    work_pool: str | None = None  # Prefect work pool whose worker runs the stage (None: this process)
    retries: int = 0  # times Prefect retries a failed stage
    retry_delay_seconds: float = 10.0  # wait before a retry


class RunSettings(BaseModel):
    """How a pipeline runs: its own settings and each stage's (stage over the pipeline's defaults)."""

    push: bool = False  # push each stage's outputs and run cache to the default DVC remote
    final_policy: str | None = None  # the stage whose model is registered in MLflow
    default_work_pool: str | None = None  # the work pool of the pipeline's own deployment
    stages: dict[str, StageSettings] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)  # MLflow tags of the run (seed, seed_of)
    fresh: bool = False  # stages ignore (and remove) their checkpoints


class Resolved(BaseModel):
    """A pipelines file resolved: every stage's spec (what params.yaml holds) and each pipeline's run settings."""

    stages: dict[str, dict[str, ResolvedStage]]  # pipeline -> stage -> its spec, in pipeline order
    settings: dict[str, RunSettings]  # pipeline -> how it runs


def names_path(ref: str, root: Path) -> bool:
    """Whether an input's value is a path or a Hub id (`models/smol`, `./x.gguf`, `Qwen/Qwen2.5-0.5B`, a file under
    `root`), not `datasets.<name>` or `<stage>.<output>` (stage and dataset names hold no `/`)."""
    return "/" in ref or (root / ref).exists() or Path(ref).suffix in {*data.LOCAL_FORMATS, checks.GGUF}


def _resolve_input(file: str, root: Path, pipeline: str, spec: PipelineSpec, stage: StageSpec, name: str, ref: str,
                   produced: dict[str, dict[str, str]]) -> DataInput:
    where = dict(pipeline=pipeline, stage=stage.name, key=f"inputs.{name}")
    source, _, item = ref.partition(".")
    if source == "datasets":
        if item not in spec.datasets:
            raise ConfigError(file, f"no dataset '{item}' in this pipeline; {nearest(item, spec.datasets)}", **where)
        return spec.datasets[item]
    if source not in produced and names_path(ref, root):
        return DataInput(path=ref)
    if source not in produced:
        raise ConfigError(file, f"'{ref}' names no earlier stage's output (`<stage>.<output>`), no dataset "
                                f"(`datasets.<name>`) and no path; earlier stages: {nearest(source, produced)}",
                          **where)
    if item not in produced[source]:
        raise ConfigError(file, f"stage '{source}' has no output '{item}'; {nearest(item, produced[source])}",
                          **where)
    return DataInput(path=produced[source][item])


def _check_params(file: str, where: dict, kind: StageKind, params: dict[str, Any]) -> dict[str, Any]:
    fields = kind.params.model_fields
    errors = [ConfigError(file, REPLACED_PARAMS.get(key) or f"unknown param for kind '{kind.name}'; "
                          f"{nearest(key, fields)}",
                          **{**where, "key": f"params.{key}"}) for key in params if key not in fields]
    try:
        checked = kind.params(**{k: v for k, v in params.items() if k in fields}).model_dump(mode="json")
    except ValidationError as e:
        errors += [ConfigError(file, f"{error['msg']} (got {data.short_repr(error.get('input'))})",
                               **{**where, "key": "params." + ".".join(str(x) for x in error["loc"])})
                   for error in e.errors()]
    raise_all(errors)
    return checked


def resolve(path: str | Path) -> Resolved:
    """Validate pipelines.yaml fully and resolve it: each stage's spec (what params.yaml holds) and each pipeline's
    run settings. Every problem found is reported at once (`ConfigErrors`), not only the first.

    A resolved spec is flat and self-contained: kind, seed, model, accelerate config and process count, input paths
    (with column mappings), output paths, and every param (defaults filled in).
    """
    file = str(path)
    root = Path(path).resolve().parent
    config = load(path)
    use_project(root)
    resolved: dict[str, dict[str, ResolvedStage]] = {}
    errors: list[ConfigError] = []
    for pipeline, spec in config.pipelines.items():
        produced: dict[str, dict[str, str]] = {}
        resolved[pipeline] = {}
        errors += checks.check_column_sources(file, pipeline, spec.datasets)
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
                produced[stage.name] = _AnyOutputs(stage_output_dir(pipeline, stage.name))
                continue
            output_dir = stage_output_dir(pipeline, stage.name)
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
    return Resolved(stages=resolved, settings={name: _run_settings(spec) for name, spec in config.pipelines.items()})


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
                   produced: dict[str, dict[str, str]], output_dir: str, outputs: dict[str, str]) -> ResolvedStage:
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
            if k in kind.inputs and (v.partition(".")[0] in produced | {"datasets": {}} or names_path(v, root))}
    refs.update(stage.inputs)
    inputs = {}
    for name, ref in refs.items():
        if name not in kind.inputs:
            errors.append(ConfigError(file, f"kind '{kind.name}' reads no input '{name}'; "
                                            f"{nearest(name, kind.inputs)}", **where, key=f"inputs.{name}"))
            continue
        inputs[name] = check(_resolve_input, file, root, pipeline, spec, stage, name, ref, produced)
        key = {**where, "key": f"inputs.{name}"}
        if inputs[name] is None:
            continue
        if ref.partition(".")[0] in produced:
            check(checks.check_stage_output, file, key, ref, inputs[name].path, kind.inputs[name])
        else:  # a dataset or a path: a file there now
            check(checks.check_dataset_file, file, root, key, inputs[name], kind.inputs[name])
    for name, declared in kind.inputs.items():
        if declared.required and name not in refs:
            errors.append(ConfigError(file, f"kind '{kind.name}' needs input '{name}' ({declared.doc})",
                                      **where, key=f"inputs.{name}"))

    chosen = Overridable(**{k: getattr(stage, k) if getattr(stage, k) is not None else getattr(spec.defaults, k)
                            for k in Overridable.model_fields})  # the stage's settings over the pipeline's
    if chosen.model and checks.names_local(chosen.model, root):  # not an HF id
        check(checks.check_model_dir, file, {**where, "key": "model"}, chosen.model, root / chosen.model)
    accelerate_config = chosen.accelerate_config or "infra/accelerate/single.yaml"
    num_processes = check(checks.check_accelerate_config, file, root, where, accelerate_config)
    raise_all(errors)
    return ResolvedStage(kind=stage.kind, seed=chosen.seed if chosen.seed is not None else 0, model=chosen.model,
                         accelerate_config=accelerate_config, num_processes=num_processes, inputs=inputs,
                         output_dir=output_dir, outputs=outputs, params=params)


def _run_settings(spec: PipelineSpec) -> RunSettings:
    """A pipeline's run settings: each stage's scheduling over the pipeline's defaults, Prefect's defaults below."""
    stages = {}
    for stage in spec.stages:
        chosen = {k: getattr(stage, k) if getattr(stage, k) is not None else getattr(spec.defaults, k)
                  for k in Scheduling.model_fields}
        stages[stage.name] = StageSettings(**{k: v for k, v in chosen.items() if v is not None})
    return RunSettings(push=spec.push, final_policy=spec.final_policy or _last_policy(spec),
                       default_work_pool=spec.defaults.work_pool, stages=stages)


def _last_policy(spec: PipelineSpec) -> str | None:
    """The last stage that trains a policy (a kind with a `model` output that is not a reward model)."""
    policies = [s.name for s in spec.stages if "model" in get_kind(s.kind).outputs and s.kind != "reward_model"]
    return policies[-1] if policies else None


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


def input_graph(specs: dict[str, ResolvedStage]) -> dict[str, set[str]]:
    """stage -> the earlier stages whose outputs it reads."""
    producers = {path: stage for stage, spec in specs.items() for path in spec.outputs.values()}
    return {stage: {producers[i.path] for i in spec.inputs.values() if i.path in producers}
            for stage, spec in specs.items()}
