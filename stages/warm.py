"""A warm interpreter for a run's stages: the training stack (torch, transformers, datasets, accelerate, MLflow)
imported once per `rl4llm run`, then forked for each stage DVC starts, which saves each stage seconds of imports.

`rl4llm run` starts the warm process (`warm_stages`) and names its unix socket in RL4LLM_WARM_SOCKET. The command
DVC runs, `rl4llm stage`, then hands its arguments, working directory, environment, `sys.path` and its stdin,
stdout and stderr to the warm process (`run_warm`), which forks a child that runs the stage exactly as the command
would (the entry it names: `stages.runner:main`). The command passes SIGINT / SIGTERM on to the child and exits with its exit code; if
the command dies, the child gets SIGTERM. The project's own code (and a user's) is imported fresh in each child, so
a stage runs the code on disk; only third-party modules come warm.

A stage starts cold, in its own process as before, when no warm process is there (a stage run by hand or by
`dvc repro`), when the request's interpreter or an environment variable that imports may read differs from the warm
process's, off Linux (fork is not safe there with these libraries), with a GPU visible (CUDA must not be touched
before a fork; a GPU stage's work dwarfs its imports anyway), or with RL4LLM_WARM_STAGES=0.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from contextlib import contextmanager
from typing import Any, Iterator

from stages.processes import die_with_parent, terminate

WARM_SOCKET_ENV = "RL4LLM_WARM_SOCKET"  # set by `rl4llm run` for its stages: the warm process's socket name
WARM_STAGES_ENV = "RL4LLM_WARM_STAGES"  # "0": every stage starts in a fresh interpreter
WARM_MODULES = ("torch", "numpy", "transformers", "transformers.models.llama.modeling_llama",
                "transformers.models.llama.configuration_llama", "transformers.tokenization_utils_fast", "tokenizers",
                "datasets", "accelerate", "mlflow", "mlflow.store.tracking.sqlalchemy_store")  # the slow imports
PER_RUN_PREFIXES = ("RL4LLM_", "DVC_", "PREFECT_", "MLFLOW_", "_MLFLOW_")  # set per run or stage; read when used
SHELL_VARIABLES = {"PWD", "OLDPWD", "SHLVL", "_", "COLUMNS", "LINES"}  # set by shells (DVC runs a command in one)
MAX_REQUEST = 1 << 20
GPU_VISIBLE = "a GPU is visible"


def differences(request: dict[str, Any], ours: dict[str, str]) -> list[str]:
    """Why this process cannot run the request as a cold `rl4llm stage` would: another interpreter, or environment
    variables (other than per-run ones) that differ from `ours` (this process's at its start) and might have
    changed what an import did."""
    if request["executable"] != sys.executable:
        return [f"interpreter {request['executable']}"]
    theirs = request["env"]
    return sorted(key for key in theirs.keys() | ours.keys() if theirs.get(key) != ours.get(key)
                  and key not in SHELL_VARIABLES and not key.startswith(PER_RUN_PREFIXES))


# --- the command's side -------------------------------------------------------------------------------------------

def run_warm(entry: str, argv: list[str]) -> tuple[int, int | None] | None:
    """Run the function `entry` (`module:function`, e.g. `stages.runner:main`) on `argv` in a child of the warm
    process, with this process's stdio, directory and environment. Returns its exit code and peak RSS in bytes
    (None if unknown), or None when no warm process takes it (the caller runs the stage itself)."""
    name = os.environ.get(WARM_SOCKET_ENV)  # set only where `warm_stages` started one
    if not name:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(address(name))
        request = {"entry": entry, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "path": sys.path,
                   "executable": sys.executable}
        socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
        reply = _receive(conn)
        if "refused" in reply:
            print(f"rl4llm stage: starting cold ({reply['refused']})", file=sys.stderr, flush=True)
        if "pid" not in reply:
            return None
        child = reply["pid"]
        previous = {s: signal.signal(s, lambda signum, _frame: _signal(child, signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            reply = _receive(conn)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        # no reply: the warm process was killed, and the child too
        return reply.get("exit", 128 + signal.SIGKILL), reply.get("peak_rss")
    except OSError:  # no warm process (any more)
        return None
    finally:
        conn.close()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # it has just exited; its exit code is on the way
        pass


def address(name: str) -> str:
    """The socket address of a warm process's name: in Linux's abstract namespace, so no file is ever left behind,
    whatever kills the process."""
    return "\0" + name


def _receive(conn: socket.socket) -> dict[str, Any]:
    message = conn.recv(MAX_REQUEST)
    return json.loads(message) if message else {}


# --- the warm process ---------------------------------------------------------------------------------------------

class WarmProcess:
    """Listens on its socket at once (a request waits while the modules load), imports WARM_MODULES, then forks a child
    per request until SIGTERM, when the running children get SIGTERM too and are waited for."""

    def __init__(self, name: str):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(address(name))
        self.listener.listen(8)
        self.threads = 1  # OS threads after the imports (their idle pools): a fork must find no other
        self.started = dict(os.environ)  # what a request's environment must match
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, socket.socket] = {}  # pid: the connection of the command it runs for
        self.set_by_imports: dict[str, str] = {}  # environment variables the warm imports set (a cold stage's too)
        self.stopping = False

    def serve(self) -> None:
        reason = warm_up()
        if reason:  # the listener closes: every request, queued or to come, runs cold
            if reason != GPU_VISIBLE:
                print(f"rl4llm: stages start cold: {reason}", file=sys.stderr)
            return
        self.set_by_imports = {key: value for key, value in os.environ.items() if self.started.get(key) != value}
        self.threads = os_threads()
        self.selector.register(self.listener, selectors.EVENT_READ, ("request", 0))
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run decides what a Ctrl-C does to its stages
        while not (self.stopping and not self.children):
            for key, _events in self.selector.select(timeout=0.1):
                event, pid = key.data
                if event == "request" and self.stopping:
                    self.selector.unregister(self.listener)
                elif event == "request":
                    self.start(self.listener.accept()[0])
                elif event == "command gone" and pid in self.children:  # the command's end closed: stop its stage
                    self.selector.unregister(key.fileobj)
                    os.kill(pid, signal.SIGTERM)
                elif event == "exited":
                    self.selector.unregister(key.fileobj)
                    os.close(key.fileobj)
                    self.report_exit(pid)

    def stop(self, _signum: int, _frame: Any) -> None:
        self.stopping = True
        for pid in self.children:
            os.kill(pid, signal.SIGTERM)

    def start(self, conn: socket.socket) -> None:
        """Read a request and fork its child (whose environment is the request's plus what the warm imports set, as
        a cold process would have it), or refuse it."""
        message, fds, _flags, _address = socket.recv_fds(conn, MAX_REQUEST, 3)
        request = json.loads(message)
        refused = self.refusal(request, conn)
        if refused:
            conn.send(json.dumps({"refused": refused}).encode())
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        request["env"] |= self.set_by_imports
        sys.stdout.flush()
        sys.stderr.flush()
        stops = {signal.SIGINT, signal.SIGTERM}
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # until the child has its own handlers
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            self.close_inherited(conn)
            _become_stage(request, fds)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        conn.send(json.dumps({"pid": pid}).encode())
        self.selector.register(os.pidfd_open(pid), selectors.EVENT_READ, ("exited", pid))
        self.selector.register(conn, selectors.EVENT_READ, ("command gone", pid))

    def refusal(self, request: dict[str, Any], conn: socket.socket) -> str | None:
        """Why this process must not fork a stage for `request`: another user's, another environment, or a thread
        started since the imports (a fork would lose it, mid-work)."""
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
        if uid != os.getuid():
            return f"the request came from user {uid}"
        differ = differences(request, self.started)
        if differ:
            return f"differs from the warm process: {', '.join(differ[:5])}"
        if os_threads() > self.threads:
            return f"the warm process runs {os_threads() - self.threads} thread(s) more than after its imports"
        return None

    def close_inherited(self, conn: socket.socket) -> None:
        """In a forked child: close what belongs to the warm process (its listener, the other children's
        connections and pidfds), keeping only the stdio the request handed over."""
        for key in list(self.selector.get_map().values()):
            if key.data[0] == "exited":
                os.close(key.fd)
        self.selector.close()
        self.listener.close()
        for other in self.children.values():
            other.close()
        conn.close()

    def report_exit(self, pid: int) -> None:
        """Reap the child and send its exit code (128 + the signal that killed it) and peak RSS to its command, if
        still there."""
        _pid, status, usage = os.wait4(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        conn = self.children.pop(pid)
        try:
            self.selector.unregister(conn)
            conn.send(json.dumps({"exit": code if code >= 0 else 128 - code,
                                  "peak_rss": usage.ru_maxrss * 1024}).encode())  # ru_maxrss is in KiB
        except (KeyError, OSError):  # the command is gone
            pass
        conn.close()


def warm_up() -> str | None:
    """Import WARM_MODULES; the reason this process cannot serve stages, if one appears."""
    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    import torch
    from accelerate.utils import is_cuda_available

    if is_cuda_available() or torch.cuda.is_initialized():  # the first asks NVML, not CUDA
        return GPU_VISIBLE
    if threading.active_count() > 1:
        return "an import started a Python thread (a fork would lose it)"
    return None


def os_threads() -> int:
    """This process's OS threads: Python's and those native code started (/proc/self/task)."""
    return len(os.listdir("/proc/self/task"))


def _become_stage(request: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: take the command's stdio, directory, environment and import path, run the stage, exit
    with its code (after the exit handlers, as an interpreter would)."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[:] = request["path"]
        sys.argv = ["rl4llm stage", *request["argv"]]
        for name in [m for m in sys.modules if m == "stages" or m.startswith("stages.")]:
            del sys.modules[name]  # the project's code as it is on disk now
        module, _, function = request["entry"].partition(":")
        getattr(importlib.import_module(module), function)(request["argv"])
        code = 0
    except SystemExit as exit_:  # as the interpreter treats it: a code, None (0) or a message (printed; 1)
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if not isinstance(exit_.code, (int, type(None))):
            print(exit_.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


# --- the run's side -----------------------------------------------------------------------------------------------

@contextmanager
def warm_stages() -> Iterator[None]:
    """Inside, the stages this process runs (through DVC) are forked from a warm process started here (on Linux,
    unless RL4LLM_WARM_STAGES=0 or an outer `warm_stages` already set one up). It stops on exit."""
    if (os.environ.get(WARM_SOCKET_ENV) or os.environ.get(WARM_STAGES_ENV) == "0"
            or not sys.platform.startswith("linux")):
        yield
        return
    name = f"rl4llm-warm-{os.getpid()}-{secrets.token_hex(8)}"
    server = subprocess.Popen([sys.executable, "-m", "stages.warm", name], start_new_session=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent)
    os.environ[WARM_SOCKET_ENV] = name
    try:
        yield
    finally:
        del os.environ[WARM_SOCKET_ENV]
        terminate(server, grace_s=30)


if __name__ == "__main__":
    if sys.path[0] == os.getcwd():
        sys.path.pop(0)  # put there by `-m`; a stage's own command would not have it
    try:
        WarmProcess(sys.argv[1]).serve()
    except Exception as error:  # the stages start cold; the run goes on
        print(f"rl4llm: stages start cold: the warm process failed: {type(error).__name__}: {error}",
              file=sys.stderr)
    sys.stderr.flush()
    os._exit(0)  # nothing to clean up: skip unloading the modules (seconds)
