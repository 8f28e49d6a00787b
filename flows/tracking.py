"""MLflow on the flow side: one parent run per pipeline run, skipped-stage child runs, and `rl4llm compare`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from stages.checkpoint import tree_hash
from stages.processes import interrupt_signal, process_alive
from stages.runner import METRICS_FILE
from stages.tracking import (DEFAULT_EXPERIMENT, EXPERIMENT_ENV, HOST_TAG, PID_TAG, configure_mlflow, flatten,
                             owner_tags)


def git_commit(root: Path) -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def tracking_uri_default(root: Path) -> None:
    """MLflow's store: `MLFLOW_TRACKING_URI` if set, else `mlflow.db` in the project (for the stages too)."""
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(root / 'mlflow.db').resolve()}")


def start_parent_run(root: Path, pipeline: str, config_hash: str) -> str:
    configure_mlflow()
    tags = {"pipeline": pipeline, "config_hash": config_hash, "rl4llm.parent": "true", **owner_tags()}
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


def log_skipped_stage(root: Path, parent_run_id: str, pipeline: str, stage: str, spec: dict[str, Any]) -> None:
    """A child run for a stage DVC found up to date: its params and last metrics, tagged `skipped`."""
    client = MlflowClient()
    experiment = client.get_run(parent_run_id).info.experiment_id
    tags = {"mlflow.parentRunId": parent_run_id, "mlflow.runName": stage, "pipeline": pipeline, "stage": stage,
            "stage_kind": spec["kind"], "skipped": "true",
            "output_hash": tree_hash([root / p for p in spec["outputs"].values()])}
    run = client.create_run(experiment, run_name=stage, tags=tags)
    for key, value in flatten(spec["params"]).items():
        client.log_param(run.info.run_id, key, value)
    metrics_file = root / spec["output_dir"] / METRICS_FILE
    for key, value in json.loads(metrics_file.read_text()).items():
        client.log_metric(run.info.run_id, f"final/{key}", float(value))
    client.set_terminated(run.info.run_id)


def stage_metrics(pipelines: list[str], last: int) -> list[dict[str, Any]]:
    """For the `last` parent runs of each pipeline: one row per stage with its final metrics."""
    configure_mlflow()
    client = MlflowClient()
    experiment = client.get_experiment_by_name(os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT))
    if experiment is None:
        return []
    rows = []
    for pipeline in pipelines:
        parents = client.search_runs([experiment.experiment_id],
                                     f"tags.pipeline = '{pipeline}' and tags.`rl4llm.parent` = 'true'",
                                     order_by=["attributes.start_time DESC"], max_results=last)
        for parent in parents:
            children = client.search_runs([experiment.experiment_id],
                                          f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                          order_by=["attributes.start_time ASC"])
            for child in children:
                finals = {k.removeprefix("final/"): v for k, v in child.data.metrics.items() if k.startswith("final/")}
                if child.info.end_time and child.data.tags.get("skipped") != "true":
                    finals["wall_s"] = (child.info.end_time - child.info.start_time) / 1000
                rows.append({"pipeline": pipeline, "run": parent.info.run_id[:8],
                             "started": parent.info.start_time, "stage": child.data.tags.get("stage", ""),
                             "skipped": child.data.tags.get("skipped") == "true", "metrics": finals})
    return rows


def format_table(rows: list[dict[str, Any]], metric_names: list[str]) -> str:
    header = ["pipeline", "run", "stage", "skipped", *metric_names]
    lines = [header]
    for row in rows:
        values = [f"{row['metrics'][m]:.4g}" if m in row["metrics"] else "" for m in metric_names]
        lines.append([row["pipeline"], row["run"], row["stage"], "yes" if row["skipped"] else "", *values])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines)


def plot(rows: list[dict[str, Any]], metric_names: list[str], path: Path) -> None:
    """One bar panel per metric; bars are (pipeline, run, stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(metric_names), 1, figsize=(max(6, 0.5 * len(rows) + 2), 2.4 * len(metric_names)),
                             squeeze=False)
    for ax, metric in zip(axes[:, 0], metric_names):
        shown = [r for r in rows if metric in r["metrics"]]
        labels = [f"{r['pipeline']}/{r['stage']}\n{r['run']}" for r in shown]
        ax.bar(range(len(shown)), [r["metrics"][metric] for r in shown], color="tab:blue")
        ax.set_xticks(range(len(shown)), labels, fontsize=7, rotation=30, ha="right")
        ax.set_title(metric, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
