"""The warm stage process (stages/warm.py): a stage forked from it runs as the cold `rl4llm stage` would (the same
outputs, the command's stdio, directory and exit code), signals reach it through the command, the command's death
stops it, and a request it cannot serve as a cold process would is refused (the command then runs cold)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from mlflow.tracking import MlflowClient

from stages.checkpoint import CHECKPOINTS, complete_checkpoints
from stages.warm import GPU_VISIBLE, WARM_SOCKET_ENV, WarmProcess, differences, os_threads, warm_up
from tests.conftest import warm_stage_processes
from tests.test_run_safety import write_project

STAGE = [sys.executable, "-m", "flows.cli", "stage", "safe", "sft"]


@pytest.fixture(scope="module")
def warm() -> Iterator[dict[str, str]]:
    with warm_stage_processes() as env:
        yield env


@pytest.fixture
def sft_project(tmp_path: Path, tiny_model_dir: Path, request) -> Path:
    """A project with one synced sft stage, `safe/sft`. Its epochs: the indirect parameter, else 12 (12 × 32 steps:
    long enough to interrupt)."""
    root = write_project(tmp_path, tiny_model_dir, epochs=getattr(request, "param", 12))
    subprocess.run([sys.executable, "-m", "flows.cli", "sync"], cwd=root, check=True, capture_output=True,
                   timeout=120)
    return root


def stage(root: Path, env: dict[str, str], **changes: str) -> subprocess.CompletedProcess:
    return subprocess.run(STAGE, cwd=root, env=env | {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
                          | changes, capture_output=True, text=True, timeout=300)


def test_only_per_run_variables_may_differ():
    request = {"executable": sys.executable, "env": {**os.environ, "RL4LLM_PARENT_RUN_ID": "x", "DVC_ROOT": "/p",
                                                     "SHLVL": "3"}}
    assert differences(request, dict(os.environ)) == []
    assert differences({**request, "env": {**request["env"], "HF_HOME": "/elsewhere"}}, dict(os.environ)) \
        == ["HF_HOME"]
    assert differences({**request, "executable": "/other/python"}, dict(os.environ)) == ["interpreter /other/python"]


def test_no_warm_process_serves_with_a_gpu_visible(monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_cuda_available", lambda: True)
    assert warm_up() == GPU_VISIBLE


@pytest.mark.parametrize("sft_project", [1], indirect=True)
def test_a_warm_stage_writes_what_a_cold_one_does(warm: dict[str, str], sft_project: Path):
    served = stage(sft_project, warm)
    assert served.returncode == 0 and "starting cold" not in served.stderr, served.stderr
    warm_metrics = json.loads((sft_project / "artifacts/safe/sft/metrics.json").read_text())
    cold = stage(sft_project, {k: v for k, v in warm.items() if k != WARM_SOCKET_ENV})
    assert cold.returncode == 0, cold.stderr
    assert json.loads((sft_project / "artifacts/safe/sft/metrics.json").read_text()) == warm_metrics


def test_the_stage_has_the_commands_output_directory_and_exit_code(warm: dict[str, str], sft_project: Path):
    (sft_project / "params.yaml").write_text("safe: {}\n")
    served = stage(sft_project, warm)
    assert served.returncode == 2  # bad input
    assert "starting cold" not in served.stderr
    assert "params.yaml: no stage 'sft' in pipeline 'safe'" in served.stderr


def test_a_request_whose_environment_differs_runs_cold(warm: dict[str, str], sft_project: Path):
    (sft_project / "params.yaml").write_text("safe: {}\n")
    served = stage(sft_project, warm, OMP_NUM_THREADS="7")  # read when torch loads: the warm modules did not see it
    assert "rl4llm stage: starting cold (differs from the warm process: OMP_NUM_THREADS)" in served.stderr
    assert served.returncode == 2 and "no stage 'sft' in pipeline 'safe'" in served.stderr


def start_stage(root: Path, env: dict[str, str]) -> subprocess.Popen:
    command = subprocess.Popen(STAGE, cwd=root, env=env | {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    area = root / CHECKPOINTS / "safe" / "sft"
    deadline = time.monotonic() + 120
    while not any(complete_checkpoints(key) for key in (area.iterdir() if area.exists() else [])):
        assert command.poll() is None, command.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return command


def test_sigint_reaches_the_stage_through_the_command(warm: dict[str, str], sft_project: Path):
    command = start_stage(sft_project, warm)
    command.send_signal(signal.SIGINT)
    _out, err = command.communicate(timeout=120)
    assert command.returncode == 130, err
    assert "stopped by SIGINT after step" in err and "starting cold" not in err


def test_the_stage_stops_when_its_command_dies(warm: dict[str, str], sft_project: Path):
    command = start_stage(sft_project, warm)
    command.kill()  # a cold stage would die at once, leaving its MLflow run RUNNING
    command.wait()
    client = MlflowClient(f"sqlite:///{sft_project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rl4llm")
    deadline = time.monotonic() + 120
    while client.search_runs([experiment.experiment_id])[0].info.status == "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert client.search_runs([experiment.experiment_id])[0].info.status == "KILLED"


def test_the_warm_socket_is_abstract_so_nothing_is_left_on_disk_whatever_kills_the_process():
    name = f"rl4llm-warm-test-{os.getpid()}"
    listening = WarmProcess(name)
    listed = [line.split()[-1] for line in Path("/proc/net/unix").read_text().splitlines() if name in line]
    assert listed == [f"@{name}"]  # the kernel's name for an abstract socket: no file behind it
    listening.listener.close()
    assert not any(name in line for line in Path("/proc/net/unix").read_text().splitlines())


def test_a_thread_started_since_the_imports_makes_the_stage_start_cold():
    warm = WarmProcess(f"rl4llm-warm-test-{os.getpid()}")
    warm.threads = os_threads()
    request = {"executable": sys.executable, "env": dict(os.environ)}
    ours, _theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert warm.refusal(request, ours) is None
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        assert warm.refusal(request, ours) == "the warm process runs 1 thread(s) more than after its imports"
    finally:
        stop.set()
        worker.join()
    assert warm.refusal(request, ours) is None
    warm.listener.close()
