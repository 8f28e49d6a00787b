"""`rl4llm run` under stress: one writer per project, Ctrl-C on the whole process group, SIGKILL of the run (no
process outlives it, no MLflow run stays RUNNING), and the next run resumes the interrupted stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.run_lock import LOCK_FILE, run_lock
from stages.checkpoint import CHECKPOINTS, complete_checkpoints
from stages.processes import RUN_PID_ENV, THREADS_ENV, available_cores, process_alive, torch_threads
from tests.conftest import descendants, make_project, write_instruct_data
from tests.test_faults import session_prefect_api

CLI = [sys.executable, "-m", "flows.cli"]


def write_project(root: Path, model: Path, epochs: int = 1) -> Path:
    datasets = write_instruct_data(root, n_prompts=64)
    make_project(root)
    stage = {"name": "sft", "kind": "sft", "inputs": {"data": "datasets.demos"},
             "params": {"epochs": epochs, "batch_size": 2, "lr": 0.01, "checkpoint_every": 5}}
    config = {"pipelines": {"safe": {"defaults": {"seed": 0, "model": str(model)},
                                     "datasets": {"demos": datasets["demos"]}, "stages": [stage]}}}
    (root / "pipelines.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def env(root: Path) -> dict[str, str]:
    """DVC runs a stage through `$SHELL -c`: /bin/sh (dash on Debian) stays between DVC and the stage, and does
    not die with DVC (as where SHELL is unset); the stage must still end with the run."""
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "SHELL": "/bin/sh"}


def test_a_second_run_exits_at_once_naming_the_holder_while_validate_and_list_work(tmp_path, tiny_model_dir):
    root = write_project(tmp_path, tiny_model_dir)
    with run_lock(root, "safe"):
        started = time.monotonic()
        second = subprocess.run([*CLI, "run", "safe"], cwd=root, env=env(root), capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 75
        assert f"pid {os.getpid()}" in second.stderr and "pipeline 'safe'" in second.stderr
        assert time.monotonic() - started < 30  # no stage, no Prefect server
        for command in (["validate"], ["list", "safe"]):
            result = subprocess.run([*CLI, *command], cwd=root, env=env(root), capture_output=True, text=True,
                                    timeout=120)
            assert result.returncode == 0, result.stderr
        assert "a run is in progress (pid" in result.stdout
    assert not (root / "artifacts").exists()


def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path):
    """A holder SIGKILLed while it held the lock (its record is still in the file)."""
    holder = subprocess.run([sys.executable, "-c", "import os, signal, pathlib; from flows.run_lock import run_lock\n"
                             f"with run_lock(pathlib.Path('{tmp_path}'), 'other'): os.kill(os.getpid(), 9)"],
                            timeout=60)
    assert holder.returncode == -signal.SIGKILL
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pipeline"] == "other"
    with run_lock(tmp_path, "safe"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_stage_process_ends_when_its_run_is_gone_even_behind_a_shell():
    run = subprocess.Popen(["sleep", "60"])  # stands in for `rl4llm run`
    stage = subprocess.Popen(["/bin/sh", "-c", f"{sys.executable} -c 'from stages.processes import die_with_run; "
                              "import time; die_with_run(); time.sleep(60)'; echo survived"],
                             env={**os.environ, RUN_PID_ENV: str(run.pid)}, stdout=subprocess.PIPE, text=True)
    time.sleep(2)
    assert stage.poll() is None
    run.kill()
    run.wait()
    assert stage.wait(timeout=10) == 0 and stage.stdout.read() == "survived\n"  # the shell outlived its child
    assert not process_alive(run.pid)


def test_stage_processes_share_the_cores_and_the_thread_count_can_be_set(monkeypatch, tmp_path):
    from stages import processes

    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))
    monkeypatch.setattr(processes, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert [torch_threads(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # a container allowed 2.5 CPUs
    assert available_cores() == 3 and torch_threads(1) == 3
    monkeypatch.setenv(THREADS_ENV, "5")
    assert torch_threads(2) == 5


def test_a_stop_deferred_to_the_step_boundary_says_so_once(capfd, monkeypatch):
    from stages import processes

    monkeypatch.setattr(processes, "_stop_signal", None)
    monkeypatch.setattr(processes, "_deferred", True)  # inside a training loop's step
    processes._request_stop(signal.SIGTERM, None)
    assert processes.stop_signal() == signal.SIGTERM
    assert capfd.readouterr().err == ("SIGTERM received: stopping at the end of this step, after its checkpoint if "
                                      "the stage keeps them (SIGKILL stops at once)\n")
    processes._request_stop(signal.SIGINT, None)  # a second signal changes nothing and says nothing
    assert processes.stop_signal() == signal.SIGTERM and capfd.readouterr().err == ""


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if process_alive(pid)}


def start_run(root: Path) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "run", "safe"], cwd=root, env=env(root), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def newest_checkpoint(root: Path) -> int:
    area = root / CHECKPOINTS / "safe" / "sft"
    return max((s for key in (area.iterdir() if area.exists() else []) for s, _ in complete_checkpoints(key)),
               default=0)


def wait_for_checkpoint_after(root: Path, step: int, process: subprocess.Popen) -> set[int]:
    """Wait until the stage has a checkpoint past `step`; returns the run's processes at that moment."""
    deadline = time.monotonic() + 300
    while True:
        if newest_checkpoint(root) > step:
            return descendants(process.pid)
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)


@pytest.mark.e2e
def test_ctrl_c_and_sigkill_of_a_run_leave_nothing_behind_and_the_next_run_resumes(tmp_path, tiny_model_dir,
                                                                                   prefect_server):
    root = write_project(tmp_path, tiny_model_dir, epochs=12)  # 12 × 32 steps: long enough to interrupt

    # Ctrl-C in a terminal: SIGINT to the whole foreground process group
    first = start_run(root)
    processes = wait_for_checkpoint_after(root, 0, first)
    os.killpg(first.pid, signal.SIGINT)
    out = first.communicate(timeout=180)[0]
    assert first.returncode == 130, out[-3000:]
    assert "resume with `rl4llm run safe`" in out
    assert not alive(processes)

    # SIGKILL of `rl4llm run` alone: dvc, the stage and the Prefect server go with it
    second = start_run(root)
    processes = wait_for_checkpoint_after(root, newest_checkpoint(root), second)
    assert len(processes) >= 4  # Prefect server, dvc, the shell DVC runs the stage in, the stage
    second.kill()
    second.wait()
    deadline = time.monotonic() + 60
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(processes)

    listing = subprocess.run([*CLI, "list", "safe"], cwd=root, env=env(root), capture_output=True, text=True,
                             timeout=120)
    saved = sorted(str(p.relative_to(root)) for p in (root / CHECKPOINTS).rglob("progress.json"))
    assert "interrupted (resumes from step" in listing.stdout, (listing.stdout, saved)

    # the interrupted runs had a Prefect server of their own (which had to go with them); this one need not
    third = subprocess.run([*CLI, "run", "safe"], cwd=root, env={**env(root), **session_prefect_api()},
                           capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "safe/sft: resuming from step" in third.stderr
    assert (root / "artifacts/safe/sft/metrics.json").exists()
    assert not (root / CHECKPOINTS / "safe" / "sft").exists()

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("rl4llm").experiment_id], "",
                              order_by=["attributes.start_time ASC"])
    statuses = [(r.data.tags.get("mlflow.runName"), r.info.status) for r in runs]
    assert statuses == [("safe", "KILLED"), ("sft", "KILLED"), ("safe", "FAILED"), ("sft", "KILLED"),
                        ("safe", "FINISHED"), ("sft", "FINISHED")]


def warm_process(run: subprocess.Popen) -> int:
    """The run's warm process (its stages are forks of it, with its command line)."""
    (warm,) = [pid for pid in descendants(run.pid) if b"stages.warm" in Path(f"/proc/{pid}/cmdline").read_bytes()
               and b"stages.warm" not in Path(f"/proc/{parent_of(pid)}/cmdline").read_bytes()]
    return warm


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def warm_sockets(run: subprocess.Popen) -> list[str]:
    """The sockets of the run's warm processes (abstract unix sockets: listed by the kernel, never files), named after
    the run's pid (other runs on the machine have their own)."""
    return [line for line in Path("/proc/net/unix").read_text().splitlines() if f"@rl4llm-warm-{run.pid}-" in line]


@pytest.mark.e2e
def test_sigterm_to_the_warm_process_ends_the_run_143_with_its_checkpoint_and_resume_hint(tmp_path, tiny_model_dir):
    root = write_project(tmp_path, tiny_model_dir, epochs=12)
    run = start_run(root)
    wait_for_checkpoint_after(root, 0, run)
    os.kill(warm_process(run), signal.SIGTERM)
    out = run.communicate(timeout=180)[0]
    assert run.returncode == 143, out[-3000:]
    assert "interrupted (SIGTERM): safe/sft: stopped by SIGTERM; resume with `rl4llm run safe`" in out
    assert "checkpoint saved" in out and "exit code 255" not in out
    assert newest_checkpoint(root) > 0 and not warm_sockets(run)


@pytest.mark.e2e
def test_a_run_beside_a_run_in_a_dvc_project_exits_75_naming_the_holder(tmp_path, tiny_model_dir, prefect_server):
    """DVC's own lock is never what refuses it, and its advice to delete lock files is never printed."""
    root = write_project(tmp_path, tiny_model_dir)
    first = subprocess.run([*CLI, "run", "safe"], cwd=root, env={**env(root), **session_prefect_api()},
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    with run_lock(root, "other"):
        second = subprocess.run([*CLI, "run", "safe"], cwd=root, env=env(root), capture_output=True, text=True,
                                timeout=120)
    assert second.returncode == 75, second.stderr[-3000:]
    assert f"pid {os.getpid()}" in second.stderr and "pipeline 'other'" in second.stderr
    assert "rwlock" not in second.stderr and "manually" not in second.stderr
