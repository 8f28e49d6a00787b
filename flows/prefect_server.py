"""The temporary Prefect API a run uses when no server is configured (`PREFECT_API_URL` unset).

Prefect's own temporary server shares our process group, so a terminal's Ctrl-C killed it mid-run, and it outlived
a killed run. This one is the same app (Prefect's ephemeral uvicorn server) in its own process group, and it dies
with the run (`die_with_parent`) however the run ends.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from stages.processes import die_with_parent, terminate

STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def temporary_server() -> Iterator[str]:
    """Start Prefect's API app on a free local port; yields its API URL; stops it on exit."""
    import prefect

    port = free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # offline: no telemetry attempts
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "error", "--lifespan", "on"],
        env=env, start_new_session=True, preexec_fn=die_with_parent)
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not healthy(api_url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the temporary Prefect server did not start (exit code {server.poll()})")
            time.sleep(0.2)
        yield api_url
    finally:
        terminate(server, grace_s=10)


_outer: list[tuple[ExitStack, dict[str, str]]] = []  # inside `one_server`: its stack, and its server's URL once up


@contextmanager
def one_server() -> Iterator[None]:
    """Inside, every `prefect_api()` that needs a temporary server shares one, started at the first need (several
    runs of one command, e.g. the seeds of `rl4llm run --seeds`)."""
    with ExitStack() as stack:
        _outer.append((stack, {}))
        try:
            yield
        finally:
            _outer.pop()


@contextmanager
def prefect_api() -> Iterator[None]:
    """Inside, flows report to the configured Prefect API, or else to a temporary server of this run."""
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        yield
        return
    with ExitStack() as own:
        stack, started = _outer[-1] if _outer else (own, {})
        if "url" not in started:
            started["url"] = stack.enter_context(temporary_server())
        with temporary_settings({PREFECT_API_URL: started["url"]}):
            try:
                yield
            finally:
                APILogWorker.drain_all(timeout=5)  # the run's logs reach the server before it can stop
