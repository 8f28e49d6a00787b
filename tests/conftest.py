"""Shared fixtures: a scratch project directory, a tiny locally built model, one Prefect test server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


class Tracker:
    """A stage tracker that records what a stage logs (instead of MLflow)."""

    def __init__(self):
        self.logged: list[dict[str, float]] = []
        self.tags: dict[str, str] = {}

    def log(self, step: int, metrics: dict[str, float], total: int | None = None, record: bool = True) -> None:
        self.logged.append(metrics)

    def tag(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)


@pytest.fixture(autouse=True, scope="session")
def _this_checkout_in_subprocesses():
    """Every process a test starts (the CLI, DVC's `rl4llm stage`, workers) imports this checkout's code, even
    when another checkout's `rl4llm` comes first on PATH or is the one installed."""
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *([previous] if previous else [])])
    yield
    if previous is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = previous


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest single-threaded, and results do not depend on the core count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_instruct_data(root: Path, n_prompts: int = 40) -> dict[str, dict]:
    """Small instruction datasets as jsonl files in `root` (demos, comparisons, prompts, a corpus); returns their
    pipelines.yaml `datasets` entries. The demos name their columns `instruction` and `output`, mapped as real
    data often needs; every response has two words (equal lengths: a 2-process token mean equals the 1-process
    one exactly)."""
    import json
    import random

    from stages import instruct_task

    rng, words = random.Random(0), instruct_task.ALL_WORDS
    prompts = [instruct_task.make_prompt(rng) for _ in range(n_prompts)]
    files = {"demos": [{"instruction": p, "output": " ".join(rng.sample(words, 2))} for p in prompts],
             "comparisons": [{"prompt": p, "chosen": " ".join(rng.sample(words, 2)),
                              "rejected": " ".join(rng.sample(words, 2))} for p in prompts],
             "prompts": [{"prompt": p} for p in prompts],
             "corpus": [{"text": " ".join(rng.sample(words, 6))} for _ in range(64)]}
    for name, rows in files.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets = {name: {"path": f"{name}.jsonl"} for name in files}
    datasets["demos"]["columns"] = {"prompt": "instruction", "response": "output"}
    return datasets


@contextmanager
def warm_stage_processes() -> Iterator[dict[str, str]]:
    """Inside, an `rl4llm stage` command given the yielded environment forks from a warm interpreter, as under
    `rl4llm run` (PATH as the `rl4llm` command sets it)."""
    from flows.cli import this_environment_first
    from stages.warm import warm_stages

    path = os.environ["PATH"]
    this_environment_first()
    try:
        with warm_stages():
            yield dict(os.environ)
    finally:
        os.environ["PATH"] = path


def make_project(root: Path, pipelines_file: Path | None = None) -> Path:
    """A project directory with infra/ (accelerate configs) and, if given, a pipelines.yaml. Returns its config."""
    shutil.copytree(REPO / "infra", root / "infra")
    config = root / "pipelines.yaml"
    if pipelines_file is not None:
        shutil.copy(pipelines_file, config)
    return config


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """An empty project in tmp_path (cwd), with MLflow pointed at its own database."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    make_project(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama + word tokenizer saved with save_pretrained (loaded back through from_pretrained)."""
    from stages import instruct_task
    from stages.models import build_tiny_llama, build_word_tokenizer, save

    out = tmp_path_factory.mktemp("tiny_model")
    words = [*instruct_task.ALL_WORDS, *instruct_task.TOPICS, *instruct_task.COUNTS, "name"]
    tokenizer = build_word_tokenizer([" ".join(words)])
    torch.manual_seed(0)
    model = build_tiny_llama(len(tokenizer), 32, 1, 2, 64, tokenizer.pad_token_id, tokenizer.bos_token_id,
                             tokenizer.eos_token_id)
    save(model, tokenizer, out)
    return out


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API for the whole session (starting one costs ~20 s; on a loaded 2-core machine it has
    taken over 30 s, Prefect's default limit)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def session_processes(session: int) -> set[int]:
    """The live processes of a session (what a service started with `start_new_session` left running)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def stop_service(process: subprocess.Popen) -> None:
    """SIGTERM a service's whole session, SIGKILL what is left after 15 s; asserts nothing of it survives."""
    for signum, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while session_processes(process.pid) - {process.pid} or process.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        else:
            break
    process.wait(timeout=5)
    assert not session_processes(process.pid)


def wait_until_healthy(url: str, process: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, f"{url} did not come up"
            time.sleep(0.2)


@contextmanager
def running_mlflow_server(home: Path, port: int) -> Iterator[subprocess.Popen]:
    """A real `mlflow server` on 127.0.0.1:`port` over `home`'s sqlite database (the same database when started
    again; artifacts served by the server), stopped with every process it started at the end."""
    with open(home / "server.log", "a") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
             "--artifacts-destination", str(home / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/health", server)
        yield server
    finally:
        stop_service(server)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """One real `mlflow server` for the session; yields its URI."""
    port = free_port()
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow_server"), port):
        yield f"http://127.0.0.1:{port}"


GIT_IDENTITY = {"GIT_AUTHOR_NAME": "rl4llm tests", "GIT_AUTHOR_EMAIL": "tests@rl4llm",
                "GIT_COMMITTER_NAME": "rl4llm tests", "GIT_COMMITTER_EMAIL": "tests@rl4llm"}


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_IDENTITY}).stdout


def git_project_with_remote(root: Path, remote: Path) -> None:
    """Make `root` a git repository with DVC and a local-directory default remote, committed."""
    git(root, "init", "-q")
    subprocess.run(["dvc", "init", "-q"], cwd=root, check=True)
    subprocess.run(["dvc", "remote", "add", "-d", "store", str(remote)], cwd=root, check=True)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project")


def commit_run(root: Path, message: str = "run") -> None:
    """Commit what a run leaves for git: dvc.lock, the generated files and DVC's .gitignore entries."""
    git(root, "add", "dvc.lock", "dvc.yaml", "params.yaml", "pipelines.yaml", "artifacts")
    git(root, "commit", "-qm", message)
