"""A stage the kernel kills (SIGKILL: the OOM killer, or someone's `kill -9`) says so in one line, with its peak RSS
and whether the OOM killer struck; its log stays; `rl4llm run` exits 128 + 9, as a shell would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from stages.runner import killed_cause
from tests.conftest import make_project

CLI = [sys.executable, "-m", "flows.cli"]
MB = 1 << 20
KILLED_KIND = '''"""Holds `megabytes` of memory, then kills itself with SIGKILL (as the kernel would)."""
import os
import signal

from stages.kinds import StageParams


class Params(StageParams):
    megabytes: int = 300  # memory held when it dies
    micro_batch_size: int = 16  # rows per forward pass
    minibatch_size: int = 64  # rows per optimiser step


INPUTS = {}
OUTPUTS = {"done": "done.txt"}


def run(ctx):
    print("holding memory", flush=True)
    held = bytearray(ctx.params.megabytes << 20)
    held[::4096] = b"x" * len(held[::4096])  # touch every page: resident, not just reserved
    os.kill(os.getpid(), signal.SIGKILL)
'''
GREEDY_KIND = '''"""Allocates 64 MB at a time, touching each page, until the kernel stops it (or it holds `limit_megabytes`)."""
from stages.kinds import StageParams


class Params(StageParams):
    limit_megabytes: int = 4096  # it gives up (and fails the test) here


INPUTS = {}
OUTPUTS = {"done": "done.txt"}


def run(ctx):
    held = []
    while len(held) * 64 < ctx.params.limit_megabytes:
        chunk = bytearray(64 << 20)
        chunk[::4096] = b"x" * len(chunk[::4096])
        held.append(chunk)
    return {"held_megabytes": len(held) * 64}
'''


def write_project(root: Path, kind: str, source: str) -> Path:
    make_project(root)
    (root / "user_kinds").mkdir()
    (root / "user_kinds" / "__init__.py").write_text('"""Stage kinds of this test."""\n')
    (root / "user_kinds" / f"{kind}.py").write_text(source)
    config = {"pipelines": {"faults": {"defaults": {"seed": 0},
                                       "stages": [{"name": "boom", "kind": f"user_kinds.{kind}"}]}}}
    (root / "pipelines.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def env(root: Path, **extra: str) -> dict[str, str]:
    """The project's own tracking store, its user kinds importable, this environment's tools first."""
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]), **extra}


def peak_gb(line: str) -> float:
    return float(re.search(r"peak RSS ([\d.]+) GB", line).group(1))


def test_the_cause_says_out_of_memory_only_when_the_oom_killer_struck():
    batches = {"micro_batch_size": 16}
    struck = killed_cause("p/s", signal.SIGKILL, int(11.2e9), 1, int(12e9), batches)
    assert struck == ("error: p/s killed by SIGKILL — out of memory (the kernel's OOM killer struck); "
                      "peak RSS 11.20 GB (limit 12.0 GB); try a smaller micro_batch_size (now 16)")
    by_hand = killed_cause("p/s", signal.SIGKILL, int(0.3e9), 0, int(12e9), batches)
    assert by_hand == ("error: p/s killed by SIGKILL, not by the kernel's OOM killer (someone's kill -9?); "
                       "peak RSS 0.30 GB (limit 12.0 GB)")
    unknown = killed_cause("p/s", signal.SIGKILL, None, None, None, {})
    assert unknown == "error: p/s killed by SIGKILL — out of memory? peak RSS not measured; if so, try smaller batches"
    assert killed_cause("p/s", signal.SIGSEGV, int(1e9), 0, None, batches) == \
        "error: p/s killed by SIGSEGV; peak RSS 1.00 GB"


@pytest.mark.e2e
def test_a_stage_killed_by_sigkill_says_so_keeps_its_log_and_the_run_exits_137(tmp_path: Path):
    """Cold stage processes (`rl4llm stage` waits on the stage itself): its peak RSS is the kernel's figure."""
    root = write_project(tmp_path / "project", "killed", KILLED_KIND)
    run = subprocess.run([*CLI, "run", "faults"], cwd=root, env=env(root, RL4LLM_WARM_STAGES="0"),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 128 + signal.SIGKILL, run.stderr[-3000:]
    last = run.stderr.splitlines()[-1]
    assert last.startswith("error: faults/boom killed by SIGKILL, not by the kernel's OOM killer"), last
    assert last.endswith("(its output: .rl4llm/logs/faults.boom.log)"), last
    assert 0.3 <= peak_gb(last) < 2.0, last  # 300 MB held, on top of the interpreter and its imports
    assert "exit code 255" not in run.stderr and "Traceback" not in run.stderr
    log = (root / ".rl4llm/logs/faults.boom.log").read_text()
    assert "holding memory" in log and "killed by SIGKILL" in log
    assert not (root / "artifacts/faults/boom").exists()


@contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A memory cgroup (v2, else v1) limited to `limit` bytes; skip where this process may not make one."""
    v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
    under_v2 = (v2 / "cgroup.subtree_control").exists() and "memory" in (v2 / "cgroup.subtree_control").read_text()
    parent, limit_file = (v2, "memory.max") if under_v2 else (v1, "memory.limit_in_bytes")
    group = parent / f"rl4llm-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / limit_file).write_text(str(limit))
        (group / ("memory.swap.max" if under_v2 else "memory.swappiness")).write_text("0")
    except OSError as e:
        if group.exists():
            group.rmdir()
        pytest.skip(f"no memory cgroup of our own here: {e}")
    try:
        yield group
    finally:
        group.rmdir()


@pytest.mark.e2e
def test_a_stage_over_its_memory_limit_is_said_out_of_memory(tmp_path: Path):
    """A real OOM kill: `rl4llm stage` in a 1.5 GB memory cgroup, its stage allocating until the kernel kills it."""
    root = write_project(tmp_path / "project", "greedy", GREEDY_KIND)
    subprocess.run([*CLI, "sync"], cwd=root, env=env(root), check=True, capture_output=True, timeout=120)
    limit = 1536 * MB
    with memory_cgroup(limit) as group:
        stage = subprocess.run([*CLI, "stage", "faults", "boom"], cwd=root, env=env(root), capture_output=True,
                               text=True, timeout=300,
                               preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
    assert stage.returncode == -signal.SIGKILL, stage.stderr[-3000:]  # it ends as its stage ended
    last = stage.stderr.splitlines()[-1]
    assert last.startswith("error: faults/boom killed by SIGKILL — out of memory (the kernel's OOM killer struck)")
    assert f"(limit {limit / 1e9:.1f} GB)" in last, last  # its cgroup's, not the machine's
    assert 0.5 * limit / 1e9 <= peak_gb(last) <= 1.5 * limit / 1e9, last  # RSS also counts shared library pages
    assert last.endswith("try smaller batches"), last
