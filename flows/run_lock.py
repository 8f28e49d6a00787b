"""One writer per project: `rl4llm run` holds `.rl4llm/run.lock` (an OS file lock, so it dies with its holder) and
records who holds it. A second run exits at once naming the holder; `validate`, `list` and `compare` never lock."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from stages.checkpoint import STATE_DIR

LOCK_FILE = f"{STATE_DIR}/run.lock"


class ProjectBusy(Exception):
    """Another `rl4llm run` holds this project."""


@contextmanager
def run_lock(root: Path, pipeline: str, on_behalf_of: int | None = None) -> Iterator[None]:
    """Hold the project's run lock for the duration; `ProjectBusy` if another live process holds it. A lock left by
    a process that has died is free: the kernel drops a file lock with its holder. `on_behalf_of`: the pid of a run
    on this host that sent us its stage and waits for it; its lock is ours too."""
    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / ".gitignore").write_text("*\n")  # run state (checkpoints, logs, this lock) stays out of git
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            record = f.read()
            if on_behalf_of and _held_by(record, on_behalf_of):
                yield
                return
            raise ProjectBusy(f"another `rl4llm run` is running in {root}: {describe(record)}; wait for it to "
                              f"end or stop it (Ctrl-C)") from None
        f.truncate(0)
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "pipeline": pipeline,
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def holder(root: Path) -> str | None:
    """Who holds the project's run lock (None: nobody), without taking it."""
    path = root / LOCK_FILE
    if not path.exists():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return describe(f.read())
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _held_by(record: str, pid: int) -> bool:
    try:
        held = json.loads(record)
        return held["pid"] == pid and held["host"] == socket.gethostname()
    except (ValueError, KeyError, TypeError):
        return False


def describe(record: str) -> str:
    try:
        holder = json.loads(record)
        return f"pid {holder['pid']} on {holder['host']}, pipeline '{holder['pipeline']}', started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
