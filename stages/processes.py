"""Processes and signals. Child processes never outlive the run: each one dies with its parent (Linux
`PR_SET_PDEATHSIG`), and a parent waiting on a child passes SIGINT / SIGTERM on to it and waits for it to stop
cleanly (a stage checkpoints). In a stage, SIGINT / SIGTERM raise `Interrupted` at once, or, while a training loop
defers them, at its next step boundary. A waited child's peak RSS comes from the kernel (`wait4`), and whether the
OOM killer struck meanwhile from its counter (`oom_kills`)."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, NoReturn

PR_SET_PDEATHSIG = 1
RUN_PID_ENV = "RL4LLM_RUN_PID"  # set by `rl4llm run`: its stages stop when that process is gone
THREADS_ENV = "RL4LLM_TORCH_THREADS"  # overrides the torch thread count of each stage process
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # "<quota> <period>" or "max <period>" (cgroup v2)
CGROUPS = Path("/sys/fs/cgroup")
MEMORY_LIMIT_FILES = {"": "memory.max", "memory": "memory.limit_in_bytes"}  # cgroup v2 (no controller named), v1
VMSTAT = Path("/proc/vmstat")  # its `oom_kill` line counts the kernel's OOM kills since boot (Linux >= 4.13)
MEMINFO = Path("/proc/meminfo")
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None  # loaded before any fork
_stop_signal: int | None = None  # the first SIGINT / SIGTERM this stage received
_deferred = False  # a training loop is running: a stop waits for its next step boundary


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped the run or the stage (a training loop checkpoints first)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def interrupt_signal(error: BaseException) -> int | None:
    """The signal an exception stopped on: `Interrupted`, KeyboardInterrupt (SIGINT), or an exception carrying its
    `signal` (Prefect's TerminationSignal); None for any other failure."""
    if isinstance(error, KeyboardInterrupt):
        return signal.SIGINT
    return getattr(error, "signum", None) or getattr(error, "signal", None)


def _request_stop(signum: int, _frame: Any) -> None:
    global _stop_signal
    if _stop_signal is not None:  # already stopping: a second signal must not break the checkpoint or cleanup
        return
    _stop_signal = signum
    if not _deferred:
        raise Interrupted(signum, f"stopped by {signal.Signals(signum).name}")
    try:  # a step can take minutes: say so now
        os.write(2, f"{signal.Signals(signum).name} received: stopping at the end of this step, after its "
                    "checkpoint if the stage keeps them (SIGKILL stops at once)\n".encode())
    except OSError:  # stderr is a pipe whose reader died (the run was killed): the stop must still happen cleanly
        pass


def install_stop_handlers() -> None:
    """SIGINT and SIGTERM raise `Interrupted` (once; at the next step boundary while stops are deferred)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _request_stop)


def defer_stops(deferred: bool) -> None:
    global _deferred
    _deferred = deferred


def stop_signal() -> int | None:
    """The signal that asked this process to stop, if any."""
    return _stop_signal


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `signum` to this process when its parent dies (no-op off Linux). If the parent is
    already gone, act as if the signal came now. Safe in a `preexec_fn`: it loads nothing."""
    if _LIBC is None:
        return
    parent = os.getppid()
    _LIBC.prctl(PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent or parent == 1:
        os.kill(os.getpid(), signum)


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container's limit,
    which torch's default thread count ignores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def torch_threads(num_processes: int) -> int:
    """Threads for torch in one of a stage's `num_processes` processes: an equal share of the available cores
    (RL4LLM_TORCH_THREADS overrides), so processes never oversubscribe the machine."""
    if os.environ.get(THREADS_ENV):
        return max(1, int(os.environ[THREADS_ENV]))
    return max(1, available_cores() // num_processes)


def process_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (Linux /proc; elsewhere, whether it can be signalled)."""
    if pid <= 0:
        return False
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self").exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def die_with_run(signum: int = signal.SIGTERM, poll_s: float = 0.5) -> None:
    """`die_with_parent`, and `signum` too when the `rl4llm run` that started this process is gone (RUN_PID_ENV):
    DVC runs a stage through `$SHELL -c`, and a shell such as dash stays between them without dying with DVC."""
    die_with_parent(signum)
    run_pid = int(os.environ.get(RUN_PID_ENV, "0"))
    if run_pid <= 0 or run_pid == os.getpid():
        return

    def watch() -> None:
        while process_alive(run_pid):
            threading.Event().wait(poll_s)
        os.kill(os.getpid(), signum)

    threading.Thread(target=watch, name="rl4llm-run-watch", daemon=True).start()


class Exit(NamedTuple):
    """How a child ended: its exit code (-N: killed by signal N), the signal we received meanwhile (passed on to
    it), and its peak RSS in bytes (the largest of it and the descendants it waited for; 0 off Linux)."""
    code: int
    received: int | None
    peak_rss: int


def run_child(cmd: list[str], forward: int | None = None, new_group: bool = False,
              on_line: Callable[[str], None] | None = None, **popen: Any) -> Exit:
    """Run `cmd` to completion; it gets SIGTERM if we die. A SIGINT or SIGTERM we receive meanwhile is passed on
    (as `forward`, default the same signal; to its whole group with `new_group`) and we keep waiting for it.
    With `new_group` it is in its own process group, so a terminal's Ctrl-C reaches only us and we decide what it
    gets. With `on_line`, each line the child writes (stdout and stderr) goes there instead of to our terminal."""
    received: list[int] = []
    if on_line is not None:
        popen.update(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    child = subprocess.Popen(cmd, preexec_fn=die_with_parent, start_new_session=new_group, **popen)

    def pass_on(signum: int, _frame: Any) -> None:
        received.append(signum)
        target = forward or signum
        if new_group:
            os.killpg(child.pid, target)
        else:
            child.send_signal(target)

    previous = _handle((signal.SIGINT, signal.SIGTERM), pass_on)
    try:
        for line in child.stdout if on_line is not None else ():
            on_line(line.rstrip("\n"))
        _pid, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    finally:
        _restore(previous)
    return Exit(child.returncode, received[0] if received else None, usage.ru_maxrss * 1024)  # KiB on Linux


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed since boot (None where /proc/vmstat does not say)."""
    try:
        return next(int(line.split()[1]) for line in VMSTAT.read_text().splitlines() if line.startswith("oom_kill "))
    except (OSError, StopIteration, ValueError):
        return None


def memory_limit() -> int | None:
    """The memory this process's processes may use, in bytes: the machine's RAM, capped by the memory limits of
    its cgroup and the cgroups above it (v2 or v1)."""
    limits = []
    try:
        limits.append(next(int(line.split()[1]) * 1024 for line in MEMINFO.read_text().splitlines()
                           if line.startswith("MemTotal:")))
    except (OSError, StopIteration, ValueError):
        pass
    for folder, name in _memory_cgroups():
        try:
            limits.append(int((folder / name).read_text()))  # "max" (no limit) is not a number
        except (OSError, ValueError):
            pass
    return min(limits, default=None)


def _memory_cgroups() -> Iterator[tuple[Path, str]]:
    """(folder, limit file) of this process's memory cgroup and each one above it. /proc/self/cgroup names the
    cgroup from the hierarchy's root, the mount may show a subtree (a container's): the longest tail that exists."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        controller = next((c for c in controllers.split(",") if c in MEMORY_LIMIT_FILES), None)
        if controller is None:
            continue
        mount = CGROUPS / controller if controller else CGROUPS
        parts = Path(path).parts[1:]
        folder = next((mount.joinpath(*parts[i:]) for i in range(len(parts) + 1)
                       if mount.joinpath(*parts[i:]).is_dir()), mount)
        for above in (folder, *folder.parents):
            yield above, MEMORY_LIMIT_FILES[controller]
            if above == mount:
                break


def end_by(signum: int) -> NoReturn:
    """End this process by `signum`, as the child it waited on ended (so our parent sees what it would have seen
    without us between them), without a core dump; 128 + signum for a signal that would not end it."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if signum != signal.SIGKILL:  # the one signal with no handler to reset
        signal.signal(signum, signal.SIG_DFL)
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)


def terminate(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM `process`, SIGKILL it if it is still there after `grace_s`, and reap it."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _handle(signums: tuple[int, ...], handler: Callable) -> dict[int, Any]:
    """Install `handler` where we can (signal handlers belong to the main thread); the previous handlers."""
    try:
        return {s: signal.signal(s, handler) for s in signums}
    except ValueError:
        return {}


def _restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
