"""Training never waits on tracking. A tracking server that dies or hangs while a stage trains costs metrics, kept in
`.rl4llm/logs/` and said once, never the stage's outputs or progress; the run says so once and finishes; once the
server is back, what was kept is sent and no run is left RUNNING."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows import cli, tracking
from flows.config import RunSettings, resolve
from flows.reproduce import run_stages
from stages import tracking as stage_tracking
from stages.processes import THREADS_ENV
from stages.spec import ResolvedStage
from stages.tracking import (HTTP_DEFAULTS, OPEN_S, PARENT_RUN_ENV, UNSENT, StageRun, keep_unsent, now_ms, read_unsent,
                             unsent_header)
from tests.conftest import free_port, make_project, running_mlflow_server, write_instruct_data

LOST = "MLflow tracking lost"
LOGS = Path(".rl4llm/logs")


@pytest.fixture(autouse=True)
def _http_defaults(monkeypatch):
    """MLflow's request limits as a stage sets them, undone after the test."""
    for name, value in HTTP_DEFAULTS.items():
        monkeypatch.setenv(name, value)


@contextmanager
def unanswered_port(how: str) -> Iterator[int]:
    """A port where nothing answers: `dead` (connection refused) or `hung` (connections accepted, never answered)."""
    if how == "dead":
        yield free_port()
        return
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel completes connections; nothing ever reads them
        yield listener.getsockname()[1]


def lost_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if LOST in line]


@pytest.mark.parametrize("how", ["dead", "hung"])
def test_a_stage_never_waits_on_a_lost_tracking_server(how, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # a user's own setting wins: a hung request waits 1 s
    with unanswered_port(how) as port:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        started = time.monotonic()
        run = StageRun("tiny", "sft", "sft", {"lr": 0.1, "optim": {"betas": [0.9, 0.99]}})
        opened, slowest = time.monotonic() - started, 0.0
        for step in range(1, 101):
            before = time.monotonic()
            run.log(step, {"loss": 1 / step}, total=100)
            slowest = max(slowest, time.monotonic() - before)
        before = time.monotonic()
        run.finish({"loss": 0.01}, {"skipped": "false"})
        finished = time.monotonic() - before

    assert opened < OPEN_S + 1 and slowest < 0.05 and finished < 1  # training never waited on a request
    (line,) = lost_lines(capfd.readouterr().err)
    (kept,) = LOGS.glob(f"*{UNSENT}")
    assert line.startswith("[tiny/sft]") and str(kept) in line
    assert ("Connection refused" if how == "dead" else "timed out") in line
    header, ops = read_unsent(kept)
    assert header["run_id"] is None and header["tracking_uri"] == f"http://127.0.0.1:{port}"
    assert [op["op"] for op in ops] == ["start", "params", *["metrics"] * 100, "metrics", "tags", "end"]
    assert ops[1]["values"] == {"lr": "0.1", "optim.betas": "[0.9, 0.99]"}
    assert [op["step"] for op in ops[2:102]] == list(range(1, 101)) and ops[102]["values"] == {"final/loss": 0.01}
    assert ops[-1]["status"] == "FINISHED"


def test_a_server_that_falls_behind_is_given_up(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    monkeypatch.setattr(stage_tracking, "OPEN_S", 0.0)
    monkeypatch.setattr(stage_tracking, "BUFFER", 10)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    with unanswered_port("hung") as port:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        run = StageRun("tiny", "sft", "sft", {"lr": 0.1})
        for step in range(1, 51):
            run.log(step, {"loss": 1 / step})
        run.finish({"loss": 0.02}, {"skipped": "false"})
    (line,) = lost_lines(capfd.readouterr().err)
    assert "10 operations waiting" in line
    (kept,) = LOGS.glob(f"*{UNSENT}")
    assert [op["op"] for op in read_unsent(kept)[1]] == ["start", "params", *["metrics"] * 51, "tags", "end"]


def test_a_run_whose_tracking_is_lost_goes_on_and_says_so_once(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    seen: list[dict[str, str]] = []

    def reproduce(stage: str, env: dict[str, str]) -> str:
        seen.append(env)
        return "ran"

    specs = {name: ResolvedStage(kind=name, seed=0, model=None, accelerate_config="infra/accelerate/single.yaml",
                                 num_processes=1, inputs={}, output_dir=f"artifacts/tiny/{name}", outputs={}, params={})
             for name in ("sft", "dpo")}
    started = time.monotonic()
    for _ in range(2):  # each run tries MLflow afresh
        outcome = run_stages(tmp_path, "tiny", specs, ["sft", "dpo"], RunSettings(final_policy="dpo"), reproduce,
                             print)
        assert outcome == {"sft": "ran", "dpo": "ran"}
    assert time.monotonic() - started < 2 * 10
    out, err = capfd.readouterr()
    assert len(lost_lines(err)) == 2 and "Traceback" not in err
    assert out.splitlines()[-1] == "tiny: ran sft, dpo"
    assert all(env[PARENT_RUN_ENV] == "" for env in seen)  # no parent run: the stages open top-level runs
    assert not LOGS.exists()  # no parent run, nothing of it to keep


def test_what_was_kept_is_sent_once_the_store_answers(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    def kept(name: str, run_id: str | None, ops: list[dict], pid: int = os.getpid()) -> Path:
        path = LOGS / f"{name}{UNSENT}"
        keep_unsent(path, {**unsent_header(run_id, None, "tiny", "sft"), "pid": pid}, ops)
        return path

    start = {"op": "start", "experiment": "rl4llm", "run_name": "sft", "start_time": now_ms(), "tags": {"stage": "sft"}}
    points = [{"op": "metrics", "step": step, "timestamp": now_ms(), "values": {"loss": 1 / step}} for step in (1, 2)]
    end = {"op": "end", "status": "FINISHED", "end_time": now_ms()}
    never_created = kept("never_created", None, [start, *points, end])
    with never_created.open("a") as f:
        f.write('{"op": "metr')  # its writer killed mid-line
    kept("deleted", "0" * 32, [end])  # its run is gone from the store
    still_written = kept("still_written", None, [start], pid=os.getppid())  # by a process that is still there

    assert tracking.fail_orphaned_runs() == []
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("rl4llm").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "sft"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0, 0.5]
    assert sorted(LOGS.iterdir()) == [LOGS / "deleted.refused", still_written]
    (line,) = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    assert line.startswith("warning: MLflow refused what deleted.unsent.jsonl kept")


@pytest.mark.e2e
def test_an_idle_stage_says_soon_that_its_server_died(tmp_path, monkeypatch, capfd):
    """A stage that logs nothing for a while (a long step) asks the server every HEARTBEAT_S."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    monkeypatch.setattr(stage_tracking, "HEARTBEAT_S", 1.0)
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with running_mlflow_server(tmp_path, port) as server:
        run = StageRun("tiny", "sft", "sft", {"lr": 0.1})
        run.log(1, {"loss": 1.0})
        client, deadline = MlflowClient(f"http://127.0.0.1:{port}"), time.monotonic() + 30
        while not ((experiment := client.get_experiment_by_name("rl4llm"))  # the run's first point is there
                   and client.search_runs([experiment.experiment_id], "metrics.loss = 1.0")):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGKILL)
        killed = time.monotonic()
        while run.sender.lost is None and time.monotonic() - killed < 30:
            time.sleep(0.1)
        said = time.monotonic() - killed
        run.end("KILLED")
    print(f"\nthe idle stage said so {said:.1f} s after the kill", file=sys.stderr)
    assert said < 1.0 + 10
    assert len(lost_lines(capfd.readouterr().err)) == 1
    (kept,) = LOGS.glob(f"*{UNSENT}")
    header, ops = read_unsent(kept)
    assert header["run_id"] and [op["op"] for op in ops] == ["end"] and ops[0]["status"] == "KILLED"


@pytest.mark.e2e
def test_a_tracking_server_killed_mid_stage_costs_metrics_not_outputs(tmp_path, tiny_model_dir, monkeypatch,
                                                                     capfd):
    """The issue's case: `mlflow server` SIGKILLed while a stage trains, under the run's parent run."""
    root, home = tmp_path / "project", tmp_path / "server"
    root.mkdir(), home.mkdir()
    monkeypatch.chdir(root)
    datasets = write_instruct_data(root)
    make_project(root)
    # 800 steps: the stage trains on for seconds after it says that tracking is lost (~3 s after the kill)
    stage = {"name": "sft", "kind": "sft", "inputs": {"data": "datasets.demos"},
             "params": {"epochs": 200, "batch_size": 8, "log_every": 1, "checkpoint_every": 1000}}
    config = {"pipelines": {"tiny": {"defaults": {"seed": 0, "model": str(tiny_model_dir)}, "datasets": datasets,
                                     "stages": [stage]}}}
    (root / "pipelines.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cli.execute(["sync"])  # params.yaml, which the stage reads
    specs = resolve(root / "pipelines.yaml").stages["tiny"]
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    lines: list[tuple[float, str]] = []
    killed: list[float] = []

    def reproduce(name: str, env: dict[str, str]) -> str:
        """What `dvc repro` runs, the server SIGKILLed at the stage's first step; it ran (as DVC would say)."""
        stage_process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "stage", "tiny", name], env={**os.environ, **env, THREADS_ENV: "1"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in stage_process.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))
            if not killed and " step 1/" in line:
                os.killpg(server.pid, signal.SIGKILL)
                killed.append(time.monotonic())
        assert stage_process.wait() == 0, "\n".join(line for _, line in lines)
        return "ran"

    with running_mlflow_server(home, port) as server:
        started = time.monotonic()
        outcome = run_stages(root, "tiny", specs, ["sft"], RunSettings(final_policy="sft"), reproduce, print)
        took = time.monotonic() - started

    out, err = capfd.readouterr()
    stage_output = "\n".join(line for _, line in lines)
    assert outcome == {"sft": "ran"} and out.splitlines()[-1] == "tiny: ran sft"
    assert len(lost_lines(err)) == 1 and "Traceback" not in err + stage_output  # the run said it once
    ((said, line),) = [(at, line) for at, line in lines if LOST in line]  # so did the stage
    total = int(next(line for _, line in lines if " step 1/" in line).split(" step 1/")[1].split()[0])
    print(f"\nthe stage said so {said - killed[0]:.1f} s after the kill, ended {lines[-1][0] - killed[0]:.1f} s after "
          f"it; the run took {took:.1f} s", file=sys.stderr)
    assert said - killed[0] < 60
    assert any(f" step {total}/{total}" in line for at, line in lines if at > said)  # training went on
    assert (root / "artifacts/tiny/sft/model/config.json").exists()
    assert (root / "artifacts/tiny/sft/metrics.json").exists()
    (stage_file,) = LOGS.glob(f"tiny.sft.*{UNSENT}")
    (parent_file,) = LOGS.glob(f"tiny.2*{UNSENT}")
    header, ops = read_unsent(stage_file)
    assert str(stage_file) in line and header["run_id"] and ops[-1] == {**ops[-1], "op": "end", "status": "FINISHED"}
    assert read_unsent(parent_file)[1][-1]["status"] == "FINISHED"

    with running_mlflow_server(home, port):  # back, on the same database: the next `rl4llm run` or `list` sends what was kept
        assert tracking.fail_orphaned_runs() == []
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("rl4llm").experiment_id
        assert client.search_runs([experiment], "attributes.status = 'RUNNING'") == []
        run = client.get_run(header["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["skipped"] == "false"
        assert "final/eval_loss" in run.data.metrics
        assert len(client.get_metric_history(run.info.run_id, "loss")) == total  # every step's point
        assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "FINISHED"
    assert not list(LOGS.glob(f"*{UNSENT}"))
