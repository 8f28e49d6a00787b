"""MLflow on the flow side: one parent run per pipeline run, stage lineage, the Model Registry, and the rows
`rl4llm compare` shows.

A run never waits on, nor fails because of, tracking: when MLflow fails during a run (a dead or hung server gives up
within seconds: stages/tracking.py HTTP_DEFAULTS), the run says so in one line and goes on without it; the ending of
its parent run is kept in `.rl4llm/logs/` with what its stages could not send, and `fail_orphaned_runs` (the next
`rl4llm run` or `rl4llm list`) sends all of it once the server answers again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any, Callable

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from requests import RequestException

from flows import dvc
from stages.checkpoint import STATE_DIR, tree_hash
from stages.processes import interrupt_signal, process_alive
from stages.runner import METRICS_FILE
from stages.spec import ResolvedStage
from stages.tracking import (HOST_TAG, PID_TAG, UNSENT, RunWriter, configure_mlflow, experiment_name, failure_cause,
                             flatten, keep_unsent, now_ms, owner_tags, read_unsent, tracking_uri, training_experiment,
                             unsent_header, unsent_path)

VERSION_TAG = "rl4llm.version"  # a stage run's version: a hash of its outputs' DVC hashes
LOCK_ARTIFACT = "dvc.lock.json"  # a stage run's dvc.lock entry
_lost: str | None = None  # why MLflow failed during this run (said once): the rest of the run skips it


def tolerant(fallback: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A tracking call that never stops the run: when MLflow fails, say so once and return `fallback(*args)`; once
    it has failed, the run's later calls skip MLflow (until `end_parent_run`)."""

    def wrap(call: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(call)
        def tolerant_call(*args: Any, **kwargs: Any) -> Any:
            if _lost is None:
                try:
                    return call(*args, **kwargs)
                except (MlflowException, RequestException) as error:
                    lose(failure_cause(error))
            return fallback(*args, **kwargs)

        return tolerant_call

    return wrap


def lose(cause: str) -> None:
    """Say in one line that MLflow is lost for the rest of this run."""
    global _lost
    _lost = cause
    print(f"warning: MLflow tracking lost ({tracking_uri()}: {cause}); going on without it (what was not sent is "
          f"kept in {STATE_DIR}/logs/, sent by the next `rl4llm run` or `rl4llm list`)", file=sys.stderr, flush=True)


def git_commit(root: Path) -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


@tolerant(lambda *_: "")
def start_parent_run(root: Path, pipeline: str, config_hash: str, extra_tags: dict[str, str]) -> str:
    """Open the pipeline's parent run. Returns its id ("" when MLflow is lost: the stages open top-level runs)."""
    from mlflow.tracking.context.registry import resolve_tags

    configure_mlflow()
    client = MlflowClient()
    tags = {"pipeline": pipeline, "config_hash": config_hash, "rl4llm.parent": "true", **owner_tags(), **extra_tags}
    commit = git_commit(root)
    if commit:
        tags["git_commit"] = commit
    experiment = training_experiment(client, experiment_name())
    return client.create_run(experiment, tags=resolve_tags(tags), run_name=pipeline).info.run_id


def end_parent_run(pipeline: str, run_id: str, status: str = "FINISHED") -> None:
    """End the parent run `run_id` with `status` (kept for `send_kept` when MLflow is lost). The next run tries
    MLflow afresh."""
    global _lost
    if run_id and not _terminate(run_id, status):
        keep_unsent(unsent_path(pipeline), unsent_header(run_id, None, pipeline),
                    [{"op": "end", "status": status, "end_time": now_ms()}])
    _lost = None


@tolerant(lambda *_: False)
def _terminate(run_id: str, status: str) -> bool:
    MlflowClient().set_terminated(run_id, status)
    return True


def end_status(error: BaseException) -> str:
    """KILLED for an interrupt (SIGINT, SIGTERM), FAILED for anything else."""
    return "KILLED" if interrupt_signal(error) else "FAILED"


@tolerant(lambda: [])
def fail_orphaned_runs() -> list[str]:
    """Send what runs kept while MLflow was lost (`send_kept`), then mark FAILED the runs left RUNNING by processes
    of this host that no longer exist (a SIGKILLed run or stage). Returns their ids."""
    configure_mlflow()
    client = MlflowClient()
    send_kept(client)
    experiment = client.get_experiment_by_name(experiment_name())
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


def unsent_files() -> list[tuple[Path, dict[str, Any], list[dict[str, Any]]]]:
    """(path, header, operations) of this project's unsent files (`.rl4llm/logs/*.unsent.jsonl`) for this tracking
    URI, oldest first."""
    found = []
    for path in sorted((Path(STATE_DIR) / "logs").glob(f"*{UNSENT}"), key=lambda p: p.stat().st_mtime):
        header, ops = read_unsent(path)
        if header and header["tracking_uri"] == tracking_uri():
            found.append((path, header, ops))
    return found


def send_kept(client: MlflowClient) -> None:
    """Send the unsent files this host's processes left (none still writing one). A file goes once MLflow has all
    of it; what an unreachable server did not take stays for next time; one the server refused (e.g. its run was
    deleted) is set aside as `*.refused`, said in one line."""
    for path, header, ops in unsent_files():
        if header["host"] != socket.gethostname() or (header["pid"] != os.getpid() and process_alive(header["pid"])):
            continue
        try:
            send_file(client, path, header, deque(ops))
        except MlflowException as error:
            if error.get_http_status_code() >= 500:  # no answer, or a broken server: next time
                raise
            refused = path.with_name(path.name.removesuffix(UNSENT) + ".refused")
            path.rename(refused)
            print(f"warning: MLflow refused what {path.name} kept ({failure_cause(error)}); set aside as {refused}",
                  file=sys.stderr, flush=True)


def send_file(client: MlflowClient, path: Path, header: dict[str, Any], pending: deque[dict[str, Any]]) -> None:
    """Send an unsent file's `pending` operations; remove it when all went, else keep what did not."""
    writer = RunWriter(client, header["run_id"])
    try:
        writer.send(pending)
    finally:
        rest = path.with_name(f"{path.name}.rest")
        rest.unlink(missing_ok=True)
        if pending:
            keep_unsent(rest, {**header, "run_id": writer.run_id}, list(pending))
            rest.replace(path)
        else:
            path.unlink()


def kept_stage_run(parent_run_id: str, stage: str) -> str | None:
    """The run of `stage` under `parent_run_id` that its unsent file names, if any."""
    return next((header["run_id"] for _, header, _ in unsent_files()
                 if parent_run_id and header["parent"] == parent_run_id and header["stage"] == stage), None)


def find_stage_run(parent_run_id: str, stage: str) -> str | None:
    """The run in which `stage` really ran (not skipped, not restored) under this parent run, if any: asking MLflow,
    then the stage's unsent file (a stage that lost MLflow on the way ran too)."""
    client = MlflowClient()
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.stage = "
                                            f"'{stage}' and tags.skipped = 'false'", max_results=1)
    return runs[0].info.run_id if runs else kept_stage_run(parent_run_id, stage)


@tolerant(lambda *_: None)
def record_stage(root: Path, parent_run_id: str, pipeline: str, stage: str, spec: ResolvedStage,
                 outcome: str) -> str | None:
    """After DVC reproduced a stage: its run (a new child run if it was skipped or restored) gets the stage's
    lineage. Returns the run id (None when MLflow is lost)."""
    run_id = find_stage_run(parent_run_id, stage) if outcome == "ran" else None
    if run_id is None:
        run_id = log_skipped_stage(root, parent_run_id, pipeline, stage, spec, outcome)
    entry = dvc.lock_entry(root, pipeline, stage)
    if entry is not None:
        record_lineage(root, run_id, spec, entry)
    return run_id


def log_skipped_stage(root: Path, parent_run_id: str, pipeline: str, stage: str, spec: ResolvedStage,
                      outcome: str = "skipped") -> str:
    """A child run for a stage DVC found up to date or restored: its params and last metrics, tagged `skipped`
    (and `outcome`). Returns its id."""
    client = MlflowClient()
    experiment = client.get_run(parent_run_id).info.experiment_id
    tags = {"mlflow.parentRunId": parent_run_id, "mlflow.runName": stage, "pipeline": pipeline, "stage": stage,
            "stage_kind": spec.kind, "skipped": "true", "outcome": outcome,
            "output_hash": tree_hash([root / p for p in spec.outputs.values()])}
    run = client.create_run(experiment, run_name=stage, tags=tags)
    for key, value in flatten(spec.params).items():
        client.log_param(run.info.run_id, key, value)
    metrics_file = root / spec.output_dir / METRICS_FILE
    for key, value in json.loads(metrics_file.read_text()).items():
        client.log_metric(run.info.run_id, f"final/{key}", float(value))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def version_id(entry: dict[str, Any]) -> str:
    """A stage version's name: a hash of its outputs' DVC hashes (same outputs, same version)."""
    digests = sorted(f"{out['path']}:{out.get('md5')}" for out in entry.get("outs", []))
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:10]


def input_digests(spec: ResolvedStage, entry: dict[str, Any]) -> dict[str, str | None]:
    """{input name: its DVC hash in the stage's dvc.lock entry} (None: not a DVC dependency, e.g. a Hub id)."""
    deps = {dep["path"]: dep.get("md5") for dep in entry.get("deps", [])}
    return {name: deps.get(given.path) for name, given in spec.inputs.items()}


def record_lineage(root: Path, run_id: str, spec: ResolvedStage, entry: dict[str, Any]) -> None:
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
    for name, given in spec.inputs.items():
        if digests[name] is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": all are local files
                source = resolve_dataset_source(str((root / given.path).resolve()))
        else:
            source = HTTPDatasetSource(f"https://huggingface.co/datasets/{given.path}")
        dataset = MetaDataset(source, name=name, digest=digests[name])
        datasets.append(DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", name)]))
    client.log_inputs(run_id, datasets)
    outs = {out["path"]: out.get("md5") for out in entry.get("outs", [])}
    for name, path in spec.outputs.items():
        client.set_tag(run_id, f"dvc.{name}", outs.get(path, ""))
    client.set_tag(run_id, VERSION_TAG, version_id(entry))
    client.log_dict(run_id, entry, LOCK_ARTIFACT)


@tolerant(lambda *_: None)
def register_policy(root: Path, parent_run_id: str, pipeline: str, stage: str, spec: ResolvedStage,
                    run_id: str) -> str | None:
    """Register the pipeline's final policy (`final_policy`'s model) in the MLflow Model Registry as a version
    of `<pipeline>-policy`, unless that exact model (DVC hash) is already one; its source is the model's place in
    the DVC remote and its tags name its lineage. Returns the registry version."""
    entry = dvc.lock_entry(root, pipeline, stage)
    model = spec.outputs["model"]
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
            **{f"input.{name}": digest or spec.inputs[name].path  # a Hub id names itself
               for name, digest in input_digests(spec, entry).items()}}
    remote = dvc.remote_url(root) or "local-cache"
    source = f"dvc://{remote.removeprefix('/')}/files/md5/{md5[:2]}/{md5[2:]}"
    return client.create_model_version(name, source, run_id=run_id, tags=tags).version


def stage_metrics(pipelines: list[str], last: int) -> list[dict[str, Any]]:
    """For the `last` parent runs of each pipeline and of each of its seed variants: one row per stage with its
    final metrics and the run's seed (rows of a variant carry the pipeline's name)."""
    configure_mlflow()
    client = MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name())
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
