"""Per-stage tracking: a nested MLflow run (per-step curves, final metrics, tags) and terminal progress lines.

The pipeline flow opens the parent run and passes its id in `RL4LLM_PARENT_RUN_ID`; a stage run by hand (or by
`dvc repro` alone) opens a top-level run instead. Only the main process of a distributed run logs.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from types import ModuleType
from typing import Any


PARENT_RUN_ENV = "RL4LLM_PARENT_RUN_ID"
EXPERIMENT_ENV = "RL4LLM_EXPERIMENT"
DEFAULT_EXPERIMENT = "rl4llm"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
HOST_TAG, PID_TAG = "rl4llm.host", "rl4llm.pid"  # which process owns a RUNNING run (stale ones are marked FAILED)
PROJECT_TAG = "rl4llm.project"  # the project directory the run was made in (which machine's clone ran a stage)
WORKER_TAG = "rl4llm.worker"  # the Prefect worker whose flow run ran the stage (its PREFECT__WORKER_NAME)


def owner_tags() -> dict[str, str]:
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PROJECT_TAG: os.getcwd()}
    if os.environ.get("PREFECT__WORKER_NAME"):
        tags[WORKER_TAG] = os.environ["PREFECT__WORKER_NAME"]
    return tags


def configure_mlflow() -> ModuleType:
    """MLflow, pointed at the tracking URI and experiment of this run (imported here: it takes seconds to load,
    and the commands that only read the project never need it)."""
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    mlflow.set_experiment(os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT))
    return mlflow


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class StageRun:
    """One stage's MLflow run and progress printer. `log(step, metrics)` records a point of the training curves."""

    def __init__(self, pipeline: str, stage: str, kind: str, params: dict[str, Any], is_main: bool = True):
        self.label = f"{pipeline}/{stage}"
        self.is_main = is_main
        self.run_id: str | None = None
        if is_main:
            self.mlflow = mlflow = configure_mlflow()
            parent = os.environ.get(PARENT_RUN_ENV)
            run = mlflow.start_run(run_name=stage, parent_run_id=parent or None,
                                   tags={"pipeline": pipeline, "stage": stage, "stage_kind": kind,
                                         **owner_tags()})
            self.run_id = run.info.run_id
            mlflow.log_params(flatten(params))
        self._started = time.monotonic()
        self._last_print = 0.0

    def log(self, step: int, metrics: dict[str, float], total: int | None = None, record: bool = True) -> None:
        """Show progress; with `record`, also send the step's metrics to MLflow (a point of the curves)."""
        if not self.is_main:
            return
        if record:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        if total:
            self._progress(step, total, metrics)

    def _progress(self, step: int, total: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        if step < total and now - self._last_print < 2.0 and step != 1:
            return
        self._last_print = now
        elapsed = now - self._started
        eta = elapsed / max(step, 1) * (total - step)
        shown = " ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:4])
        print(f"[{self.label}] step {step}/{total} {shown} | {elapsed:.0f}s elapsed, eta {eta:.0f}s",
              file=sys.stderr, flush=True)

    def finish(self, metrics: dict[str, float], tags: dict[str, str]) -> None:
        if not self.is_main:
            return
        self.mlflow.log_metrics({f"final/{k}": float(v) for k, v in metrics.items()})
        self.mlflow.set_tags(tags)
        self.mlflow.end_run()

    def tag(self, tags: dict[str, str]) -> None:
        if self.is_main:
            self.mlflow.set_tags(tags)

    def end(self, status: str) -> None:
        """End the run as FAILED or KILLED (an interrupt)."""
        if self.is_main:
            self.mlflow.end_run(status=status)
