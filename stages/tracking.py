"""Per-stage tracking: a nested MLflow run (per-step curves, final metrics, tags) and terminal progress lines.

The pipeline flow opens the parent run and passes its id in `RL4LLM_PARENT_RUN_ID`; a stage run by hand (or by
`dvc repro` alone) opens a top-level run instead. Only the main process of a distributed run logs.

Training never waits on tracking: a background thread sends what the stage logs, in order (the run is opened before
training starts, unless MLflow takes longer than OPEN_S). When MLflow fails (a dead server fails a request within
seconds, a hung one within ~35 s: see HTTP_DEFAULTS; an idle stage checks the server every HEARTBEAT_S) or falls
BUFFER operations behind, the stage says so in one line, goes on, and keeps what was not sent in
`.rl4llm/logs/<pipeline>.<stage>.<time>-<pid>.unsent.jsonl`; `rl4llm run` and `rl4llm list` send it once the server
answers again (flows/tracking.py).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path
from types import ModuleType
from typing import Any

from stages.checkpoint import STATE_DIR

PARENT_RUN_ENV = "RL4LLM_PARENT_RUN_ID"
EXPERIMENT_ENV = "RL4LLM_EXPERIMENT"
DEFAULT_EXPERIMENT = "rl4llm"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
HOST_TAG, PID_TAG = "rl4llm.host", "rl4llm.pid"  # which process owns a RUNNING run (stale ones are marked FAILED)
PROJECT_TAG = "rl4llm.project"  # the project directory the run was made in (which machine's clone ran a stage)
WORKER_TAG = "rl4llm.worker"  # the Prefect worker whose flow run ran the stage (its PREFECT__WORKER_NAME)
# MLflow's HTTP client retries 7 times with backoff up to 120 s and waits 120 s per request: ~4 min per call on a dead
# server. These defaults (a user's own settings win) give up after ~3 s on a dead server, ~35 s on a hung one.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
OPEN_S = 10.0  # the longest a stage waits, before it trains, for its run to be opened (then seen in MLflow at once)
BUFFER = 10_000  # operations waiting to be sent; more means MLflow cannot keep up: keep them locally instead
HEARTBEAT_S = 15.0  # an idle sender asks the server this often whether it is still there
FLUSH_S = 60.0  # the longest a finished stage waits for its last operations to be sent
UNSENT = ".unsent.jsonl"  # a header line (which run, which server), then one operation per line
# MLflow 3's UI opens an experiment with this tag on its runs (model training), not on the GenAI overview of traces
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def owner_tags() -> dict[str, str]:
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PROJECT_TAG: os.getcwd()}
    if os.environ.get("PREFECT__WORKER_NAME"):
        tags[WORKER_TAG] = os.environ["PREFECT__WORKER_NAME"]
    return tags


def training_experiment(client: Any, name: str) -> str:
    """The id of experiment `name`, created if need be, tagged as model training (EXPERIMENT_KIND_TAG) unless a
    kind is set already: MLflow 3's UI then lands on its runs."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment.experiment_id


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)


def http_defaults() -> None:
    """Bound how long one MLflow request may take (HTTP_DEFAULTS, unless the user set them); a retry is not worth a
    line of its own (a lost server is said once)."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def configure_mlflow() -> ModuleType:
    """MLflow, pointed at the tracking URI and experiment of this run (imported here: it takes seconds to load,
    and the commands that only read the project never need it)."""
    http_defaults()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment_name())
    return mlflow


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def now_ms() -> int:
    return int(time.time() * 1000)


def failure_cause(error: BaseException) -> str:
    """A failed MLflow call's cause in a few words (its message quotes the whole retry chain)."""
    text = str(error)
    found = re.search(r"\[Errno -?\d+\][^'\"()]*|\w+ timed out|\([\w.]+Error\) [^\n]+", text)
    return found.group(0).strip() if found else f"{type(error).__name__}: {text.splitlines()[0][:160] if text else ''}"


def unsent_path(*names: str) -> Path:
    """Where a run keeps what MLflow did not take: `.rl4llm/logs/<names>.<time>-<pid>.unsent.jsonl`."""
    return Path(STATE_DIR) / "logs" / f"{'.'.join(names)}.{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}{UNSENT}"


def unsent_header(run_id: str | None, parent: str | None, pipeline: str, stage: str | None = None) -> dict[str, Any]:
    """Which run an unsent file belongs to, on which server, written by which process."""
    return {"run_id": run_id, "parent": parent, "pipeline": pipeline, "stage": stage, "tracking_uri": tracking_uri(),
            "host": socket.gethostname(), "pid": os.getpid()}


def keep_unsent(path: Path, header: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    """Append `ops` to the unsent file `path` (begun with `header`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        if f.tell() == 0:
            f.write(json.dumps(header) + "\n")
        f.writelines(json.dumps(op) + "\n" for op in ops)


def read_unsent(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(header, operations) of an unsent file, up to a line cut short (its writer killed while writing it)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return (records[0], records[1:]) if records else (None, [])


class RunWriter:
    """Applies tracking operations to one MLflow run, oldest first: `start` (creates the run), `metrics`, `params`,
    `tags` (sent together as batches) and `end`. An operation leaves the deque once MLflow has it."""

    def __init__(self, client: Any, run_id: str | None = None):
        self.client, self.run_id = client, run_id

    def send(self, ops: deque[dict[str, Any]]) -> None:
        while ops:
            if ops[0]["op"] == "start":
                self.run_id = self._create(ops[0])
                ops.popleft()
            elif ops[0]["op"] == "end":
                self.client.set_terminated(self.run_id, ops[0]["status"], ops[0]["end_time"])
                ops.popleft()
            else:
                self._log_batch(ops)

    def check(self) -> None:
        """Raise if the server does not answer (a cheap read of the run)."""
        if self.run_id:
            self.client.get_run(self.run_id)

    def _create(self, op: dict[str, Any]) -> str:
        experiment_id = training_experiment(self.client, op["experiment"])
        return self.client.create_run(experiment_id, op["start_time"], op["tags"], op["run_name"]).info.run_id

    def _log_batch(self, ops: deque[dict[str, Any]]) -> None:
        """Send the leading `metrics`, `params` and `tags` operations as one batch (MLflow splits it)."""
        from mlflow.entities import Metric, Param, RunTag

        batch = []
        while ops and ops[0]["op"] in ("metrics", "params", "tags"):
            batch.append(ops.popleft())
        try:
            self.client.log_batch(
                self.run_id,
                metrics=[Metric(k, v, op["timestamp"], op["step"]) for op in batch if op["op"] == "metrics"
                         for k, v in op["values"].items()],
                params=[Param(k, v) for op in batch if op["op"] == "params" for k, v in op["values"].items()],
                tags=[RunTag(k, v) for op in batch if op["op"] == "tags" for k, v in op["values"].items()])
        except BaseException:
            ops.extendleft(reversed(batch))  # not sent: still pending
            raise


class RunSender:
    """One MLflow run written by a background thread: `put` never waits. Once MLflow fails or falls behind, the run
    is lost for this process: said in one line, and every operation not sent goes to the unsent file."""

    def __init__(self, label: str, header: dict[str, Any], unsent: Path):
        self.label, self.header, self.unsent = label, header, unsent
        self.queue: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.lost: str | None = None  # why the server was given up
        self.writer: RunWriter | None = None
        self.opened = threading.Event()  # the first operations (the run's start) were sent or kept
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="rl4llm-tracking", daemon=True)
        self._thread.start()

    def put(self, op: dict[str, Any]) -> None:
        if self.lost is None and self.queue.qsize() >= BUFFER:
            self.lose(f"{BUFFER} operations waiting: the server does not keep up")
        self.queue.put(op)

    def close(self, timeout_s: float = FLUSH_S) -> None:
        """Wait until everything put (an `end` last) is sent or kept; after `timeout_s`, keep what still waits."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.lose(f"no answer within {timeout_s:g} s")
            self._keep(deque(self._drain()))

    def lose(self, cause: str) -> None:
        """Give the server up (said once): from now on operations are kept locally."""
        with self._lock:
            if self.lost is not None:
                return
            self.lost = cause
        print(f"[{self.label}] MLflow tracking lost ({self.header['tracking_uri']}: {cause}); training goes on, "
              f"what is not sent is kept in {self.unsent}", file=sys.stderr, flush=True)

    def _run(self) -> None:
        while True:
            try:
                ops = deque([self.queue.get(timeout=HEARTBEAT_S), *self._drain()])
            except queue.Empty:
                ops = deque()
            ending = any(op["op"] == "end" for op in ops)
            if self.lost is None:
                try:
                    self._send(ops)
                except Exception as error:  # whatever MLflow raised: the stage goes on without it
                    self.lose(failure_cause(error))
            self._keep(ops)
            self.opened.set()
            if ending:
                return

    def _send(self, ops: deque[dict[str, Any]]) -> None:
        """Send `ops`; none: ask the server whether it is still there."""
        if self.writer is None:
            from mlflow import MlflowClient

            self.writer = RunWriter(MlflowClient(self.header["tracking_uri"]))
        self.writer.send(ops) if ops else self.writer.check()

    def _drain(self) -> list[dict[str, Any]]:
        ops = []
        while True:
            try:
                ops.append(self.queue.get_nowait())
            except queue.Empty:
                return ops

    def _keep(self, ops: deque[dict[str, Any]]) -> None:
        if ops:
            with self._lock:
                keep_unsent(self.unsent, {**self.header, "run_id": self.writer and self.writer.run_id}, list(ops))


class StageRun:
    """One stage's MLflow run and progress printer. `log(step, metrics)` records a point of the training curves."""

    def __init__(self, pipeline: str, stage: str, kind: str, params: dict[str, Any], is_main: bool = True):
        self.label = f"{pipeline}/{stage}"
        self.sender: RunSender | None = None
        if is_main:
            http_defaults()
            from mlflow.tracking.context.registry import resolve_tags

            parent = os.environ.get(PARENT_RUN_ENV) or None
            tags = {"pipeline": pipeline, "stage": stage, "stage_kind": kind, **owner_tags(),
                    **({"mlflow.parentRunId": parent} if parent else {})}
            self.sender = RunSender(self.label, unsent_header(None, parent, pipeline, stage),
                                    unsent_path(pipeline, stage))
            self.sender.put({"op": "start", "experiment": experiment_name(), "run_name": stage,
                             "start_time": now_ms(), "tags": resolve_tags(tags)})
            self.sender.put({"op": "params", "values": {k: str(v) for k, v in flatten(params).items()}})
            self.sender.opened.wait(OPEN_S)
        self._started = time.monotonic()
        self._last_print = 0.0

    def log(self, step: int, metrics: dict[str, float], total: int | None = None, record: bool = True) -> None:
        """Show progress; with `record`, also send the step's metrics to MLflow (a point of the curves)."""
        if self.sender is None:
            return
        if record:
            self.sender.put({"op": "metrics", "step": step, "timestamp": now_ms(),
                             "values": {k: float(v) for k, v in metrics.items()}})
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
        """Record the final metrics and tags and end the run FINISHED (sent, or kept when MLflow is lost)."""
        if self.sender is None:
            return
        self.sender.put({"op": "metrics", "step": 0, "timestamp": now_ms(),
                         "values": {f"final/{k}": float(v) for k, v in metrics.items()}})
        self.tag(tags)
        self.end("FINISHED")

    def tag(self, tags: dict[str, str]) -> None:
        if self.sender is not None:
            self.sender.put({"op": "tags", "values": {k: str(v) for k, v in tags.items()}})

    def end(self, status: str) -> None:
        """End the run with `status` (FAILED, or KILLED for an interrupt) once what was logged is sent or kept."""
        if self.sender is not None:
            self.sender.put({"op": "end", "status": status, "end_time": now_ms()})
            self.sender.close()
