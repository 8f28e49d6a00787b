"""Stage versions: every finished run of a stage that really ran is a version, named by a hash of its outputs' DVC
hashes and kept in MLflow (params, input datasets with their DVC digests, metrics, git commit, its dvc.lock entry).
`rl4llm versions` lists them; `rl4llm restore` puts one back from the DVC cache or remote."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from flows import dvc
from flows.errors import ConfigError
from flows.tracking import LOCK_ARTIFACT, VERSION_TAG, version_id
from stages.tracking import DEFAULT_EXPERIMENT, EXPERIMENT_ENV, configure_mlflow


def stage_versions(pipeline: str, stage: str) -> list[dict[str, Any]]:
    """The versions of a stage, newest first: version, run id, start time, params, inputs {name: digest},
    final metrics, git commit. A version made again (same outputs) is listed once, at its newest run."""
    configure_mlflow()
    client = MlflowClient()
    experiment = client.get_experiment_by_name(os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT))
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.pipeline = '{pipeline}' and tags.stage = '{stage}' and tags.skipped = 'false' "
                              "and attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
    versions: dict[str, dict[str, Any]] = {}
    for run in runs:
        version = run.data.tags.get(VERSION_TAG)
        if version is None or version in versions:
            continue
        parent = run.data.tags.get("mlflow.parentRunId")
        commit = client.get_run(parent).data.tags.get("git_commit", "") if parent else ""
        versions[version] = {
            "version": version, "run": run.info.run_id, "started": run.info.start_time, "git_commit": commit,
            "params": dict(run.data.params),
            "inputs": {d.tags[0].value: d.dataset.digest for d in run.inputs.dataset_inputs},
            "metrics": {k.removeprefix("final/"): v for k, v in run.data.metrics.items() if k.startswith("final/")},
        }
    return list(versions.values())


def changes(newer: dict[str, Any], older: dict[str, Any] | None) -> str:
    """What differs between two versions: params (old → new) and inputs (a new DVC digest)."""
    if older is None:
        return "first version"
    parts = [f"{key} {older['params'].get(key)} → {value}" for key, value in sorted(newer["params"].items())
             if older["params"].get(key) != value]
    parts += [f"input {name} {digest[:8]}" for name, digest in sorted(newer["inputs"].items())
              if older["inputs"].get(name) != digest]
    return ", ".join(parts) or "same params and inputs (code or environment changed)"


def format_versions(pipeline: str, stage: str, versions: list[dict[str, Any]], current: str | None) -> str:
    from datetime import datetime

    if not versions:
        return f"{pipeline}/{stage}: no versions recorded yet"
    lines = [f"{pipeline}/{stage}: {len(versions)} version(s), newest first ('*': in the workspace)"]
    for i, v in enumerate(versions):
        when = datetime.fromtimestamp(v["started"] / 1000).strftime("%Y-%m-%d %H:%M")
        metrics = " ".join(f"{k}={val:.4g}" for k, val in sorted(v["metrics"].items())[:3])
        older = versions[i + 1] if i + 1 < len(versions) else None
        mark = "*" if v["version"] == current else " "
        lines.append(f"{mark} {v['version']}  {when}  run {v['run'][:8]}  commit {v['git_commit'][:7] or '-'}  "
                     f"{metrics}")
        lines.append(f"    changed: {changes(v, older)}")
    return "\n".join(lines)


def current_version(root: Path, pipeline: str, stage: str) -> str | None:
    entry = dvc.lock_entry(root, pipeline, stage)
    return version_id(entry) if entry else None


def restore(root: Path, pipeline: str, stage: str, version: str, config_file: str) -> str:
    """Put a version's outputs back (DVC cache, else the remote) and record it as the stage's dvc.lock entry, so
    DVC shows the stages downstream of it as stale. `version` may be a unique prefix."""
    matches = [v for v in stage_versions(pipeline, stage) if v["version"].startswith(version)]
    if len(matches) != 1:
        found = "no" if not matches else "more than one"
        raise ConfigError(config_file, f"{found} version of {pipeline}/{stage} starts with '{version}' (see "
                                       f"`rl4llm versions {pipeline} {stage}`)", pipeline, stage)
    chosen = matches[0]
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        entry = json.loads(Path(MlflowClient().download_artifacts(chosen["run"], LOCK_ARTIFACT, tmp)).read_text())
    dvc.write_lock_entries(root, pipeline, {stage: entry})
    dvc.checkout(root, pipeline, stage)
    return chosen["version"]
