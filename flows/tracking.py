"""MLflow on the flow side: one parent run per pipeline run, stage lineage, the Model Registry, and the rows
`rl4llm compare` shows."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from flows import dvc
from stages.checkpoint import tree_hash
from stages.processes import interrupt_signal, process_alive
from stages.runner import METRICS_FILE
from stages.tracking import (DEFAULT_EXPERIMENT, EXPERIMENT_ENV, HOST_TAG, PID_TAG, configure_mlflow, flatten,
                             owner_tags)


VERSION_TAG = "rl4llm.version"  # a stage run's version: a hash of its outputs' DVC hashes
LOCK_ARTIFACT = "dvc.lock.json"  # a stage run's dvc.lock entry


def git_commit(root: Path) -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def start_parent_run(root: Path, pipeline: str, config_hash: str, extra_tags: dict[str, str]) -> str:
    configure_mlflow()
    tags = {"pipeline": pipeline, "config_hash": config_hash, "rl4llm.parent": "true", **owner_tags(), **extra_tags}
    commit = git_commit(root)
    if commit:
        tags["git_commit"] = commit
    run = mlflow.start_run(run_name=pipeline, tags=tags)
    return run.info.run_id


def end_parent_run(status: str = "FINISHED") -> None:
    mlflow.end_run(status=status)


def end_status(error: BaseException) -> str:
    """KILLED for an interrupt (SIGINT, SIGTERM), FAILED for anything else."""
    return "KILLED" if interrupt_signal(error) else "FAILED"


def fail_orphaned_runs() -> list[str]:
    """Mark FAILED the runs left RUNNING by processes of this host that no longer exist (a SIGKILLed run or
    stage). Returns their ids."""
    configure_mlflow()
    client = MlflowClient()
    experiment = client.get_experiment_by_name(os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT))
    if experiment is None:
        return []
    host = owner_tags()[HOST_TAG]
    orphans = [run for run in client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
               if run.data.tags.get(HOST_TAG) == host
               and not process_alive(int(run.data.tags.get(PID_TAG, "0")))]
    for run in orphans:
        client.set_tag(run.info.run_id, "rl4llm.ended_by", "its process was gone")
        client.set_terminated(run.info.run_id, status="FAILED")
    return [run.info.run_id for run in orphans]


def stage_run(parent_run_id: str, stage: str) -> str | None:
    """The run in which `stage` really ran (not skipped, not restored) under this parent run, if any."""
    client = MlflowClient()
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.stage = "
                                            f"'{stage}' and tags.skipped = 'false'", max_results=1)
    return runs[0].info.run_id if runs else None


def record_stage(root: Path, parent_run_id: str, pipeline: str, stage: str, spec: dict[str, Any],
                 outcome: str) -> str:
    """After DVC reproduced a stage: its run (a new child run if it was skipped or restored) gets the stage's
    lineage. Returns the run id."""
    run_id = stage_run(parent_run_id, stage) if outcome == "ran" else None
    if run_id is None:
        run_id = log_skipped_stage(root, parent_run_id, pipeline, stage, spec, outcome)
    entry = dvc.lock_entry(root, pipeline, stage)
    if entry is not None:
        record_lineage(root, run_id, spec, entry)
    return run_id


def log_skipped_stage(root: Path, parent_run_id: str, pipeline: str, stage: str, spec: dict[str, Any],
                      outcome: str = "skipped") -> str:
    """A child run for a stage DVC found up to date or restored: its params and last metrics, tagged `skipped`
    (and `outcome`). Returns its id."""
    client = MlflowClient()
    experiment = client.get_run(parent_run_id).info.experiment_id
    tags = {"mlflow.parentRunId": parent_run_id, "mlflow.runName": stage, "pipeline": pipeline, "stage": stage,
            "stage_kind": spec["kind"], "skipped": "true", "outcome": outcome,
            "output_hash": tree_hash([root / p for p in spec["outputs"].values()])}
    run = client.create_run(experiment, run_name=stage, tags=tags)
    for key, value in flatten(spec["params"]).items():
        client.log_param(run.info.run_id, key, value)
    metrics_file = root / spec["output_dir"] / METRICS_FILE
    for key, value in json.loads(metrics_file.read_text()).items():
        client.log_metric(run.info.run_id, f"final/{key}", float(value))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def version_id(entry: dict[str, Any]) -> str:
    """A stage version's name: a hash of its outputs' DVC hashes (same outputs, same version)."""
    digests = sorted(f"{out['path']}:{out.get('md5')}" for out in entry.get("outs", []))
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:10]


def input_digests(spec: dict[str, Any], entry: dict[str, Any]) -> dict[str, str | None]:
    """{input name: its DVC hash in the stage's dvc.lock entry} (None: not a DVC dependency, e.g. a Hub id)."""
    deps = {dep["path"]: dep.get("md5") for dep in entry.get("deps", [])}
    return {name: deps.get(given["path"]) for name, given in spec["inputs"].items()}


def record_lineage(root: Path, run_id: str, spec: dict[str, Any], entry: dict[str, Any]) -> None:
    """Name in the run exactly which data and model versions the stage used and made: each input as an MLflow
    dataset whose digest is its DVC hash (a Hub dataset: by name), each output's DVC hash as a tag `dvc.<output>`,
    the version (`rl4llm.version`), and the stage's dvc.lock entry as the artifact `dvc.lock.json` (what
    `rl4llm restore` puts back)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    client = MlflowClient()
    digests = input_digests(spec, entry)
    datasets = []
    for name, given in spec["inputs"].items():
        if digests[name] is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": all are local files
                source = resolve_dataset_source(str((root / given["path"]).resolve()))
        else:
            source = HTTPDatasetSource(f"https://huggingface.co/datasets/{given['path']}")
        dataset = MetaDataset(source, name=name, digest=digests[name])
        datasets.append(DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", name)]))
    client.log_inputs(run_id, datasets)
    outs = {out["path"]: out.get("md5") for out in entry.get("outs", [])}
    for name, path in spec["outputs"].items():
        client.set_tag(run_id, f"dvc.{name}", outs.get(path, ""))
    client.set_tag(run_id, VERSION_TAG, version_id(entry))
    client.log_dict(run_id, entry, LOCK_ARTIFACT)


def register_policy(root: Path, parent_run_id: str, pipeline: str, stage: str, spec: dict[str, Any],
                    run_id: str) -> str | None:
    """Register the pipeline's final policy (`final_policy`'s model) in the MLflow Model Registry as a version
    of `<pipeline>-policy`, unless that exact model (DVC hash) is already one; its source is the model's place in
    the DVC remote and its tags name its lineage. Returns the registry version."""
    entry = dvc.lock_entry(root, pipeline, stage)
    model = spec["outputs"]["model"]
    md5 = next((out.get("md5") for out in (entry or {}).get("outs", []) if out["path"] == model), None)
    if md5 is None:
        return None
    client = MlflowClient()
    name = f"{pipeline}-policy"
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name, tags={"pipeline": pipeline}, description=f"final policy of {pipeline}")
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get("dvc.md5") == md5:
            return version.version
    parent = client.get_run(parent_run_id).data.tags
    tags = {"pipeline": pipeline, "stage": stage, "dvc.md5": md5, VERSION_TAG: version_id(entry),
            "config_hash": parent.get("config_hash", ""), "git_commit": parent.get("git_commit", ""),
            **{f"input.{name}": digest or spec["inputs"][name]["path"]  # a Hub id names itself
               for name, digest in input_digests(spec, entry).items()}}
    remote = dvc.remote_url(root) or "local-cache"
    source = f"dvc://{remote.removeprefix('/')}/files/md5/{md5[:2]}/{md5[2:]}"
    return client.create_model_version(name, source, run_id=run_id, tags=tags).version


def stage_metrics(pipelines: list[str], last: int) -> list[dict[str, Any]]:
    """For the `last` parent runs of each pipeline and of each of its seed variants: one row per stage with its
    final metrics and the run's seed (rows of a variant carry the pipeline's name)."""
    configure_mlflow()
    client = MlflowClient()
    experiment = client.get_experiment_by_name(os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT))
    if experiment is None:
        return []
    rows = []
    parent_filter = "tags.`rl4llm.parent` = 'true'"
    for pipeline in pipelines:
        parents = client.search_runs([experiment.experiment_id], f"tags.pipeline = '{pipeline}' and {parent_filter}",
                                     order_by=["attributes.start_time DESC"], max_results=last)
        variants = {run.data.tags["pipeline"] for run in client.search_runs(
            [experiment.experiment_id], f"tags.seed_of = '{pipeline}' and {parent_filter}")}
        for variant in sorted(variants):
            parents += client.search_runs([experiment.experiment_id], f"tags.pipeline = '{variant}' and "
                                          f"{parent_filter}", order_by=["attributes.start_time DESC"], max_results=last)
        for parent in parents:
            children = client.search_runs([experiment.experiment_id],
                                          f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                          order_by=["attributes.start_time ASC"])
            for child in children:
                finals = {k.removeprefix("final/"): v for k, v in child.data.metrics.items() if k.startswith("final/")}
                if child.info.end_time and child.data.tags.get("skipped") != "true":
                    finals["wall_s"] = (child.info.end_time - child.info.start_time) / 1000
                rows.append({"pipeline": pipeline, "run": parent.info.run_id[:8], "seed": parent.data.tags.get("seed"),
                             "seed_of": parent.data.tags.get("seed_of"),
                             "started": parent.info.start_time, "stage": child.data.tags.get("stage", ""),
                             "kind": child.data.tags.get("stage_kind", ""), "run_id": child.info.run_id,
                             "skipped": child.data.tags.get("skipped") == "true", "metrics": finals})
    return rows


def stage_curves(rows: list[dict[str, Any]], kinds: tuple[str, ...], names: tuple[str, ...]
                 ) -> dict[str, dict[str, list[float]]]:
    """{stage run id: {metric: per-step values}} of the rows of `kinds` that really ran (not skipped)."""
    client = MlflowClient()
    return {row["run_id"]: {name: [m.value for m in sorted(client.get_metric_history(row["run_id"], name),
                                                             key=lambda m: m.step)] for name in names}
            for row in rows if row["kind"] in kinds and not row["skipped"]}
