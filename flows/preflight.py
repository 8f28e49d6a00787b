"""Checks before `rl4llm run` starts a stage (services it will need are there) and the tracking store's defaults;
stdlib only, fast."""

from __future__ import annotations

import os
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from flows.errors import ConfigError
from stages.checkpoint import STATE_DIR
from stages.tracking import UNSENT


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Raise a ConfigError naming the MLflow tracking URI and the cause when its server does not answer `/health`
    within `timeout_s` (http, https), or its database or file store could not be written (sqlite, file)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
                return
        except urllib.error.HTTPError as e:
            if e.code < 500:  # the server answered (e.g. 401 behind a proxy that wants credentials)
                return
            cause = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, OSError) as e:
            cause = str(getattr(e, "reason", e))
        raise ConfigError(uri, f"MLflow tracking server not reachable ({cause}; timeout {timeout_s:g} s): start it "
                               "or point MLFLOW_TRACKING_URI elsewhere")
    if parsed.scheme in ("sqlite", "file", ""):
        path = Path(parsed.path[1:] if parsed.scheme == "sqlite" else parsed.path)
        if parsed.scheme == "sqlite" and str(path) in (".", ":memory:"):
            return  # an in-memory database
        folder = path if path.is_dir() else path.parent
        if not folder.is_dir():
            raise ConfigError(uri, f"MLflow tracking store's directory does not exist: {folder}")
        target = path if path.exists() else folder
        if not os.access(target, os.W_OK):
            raise ConfigError(uri, f"MLflow tracking store not writable: {target}")


def tracking_uri_default(root: Path) -> None:
    """MLflow's store: `MLFLOW_TRACKING_URI` if set, else `mlflow.db` in the project (for the stages too)."""
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(root / 'mlflow.db').resolve()}")


def may_hold_running_runs(uri: str) -> bool:
    """Whether the tracking store may hold RUNNING runs, or runs kept what they could not send to it (to spare
    loading MLflow when neither can be): for a local sqlite store, a read of its `runs` table and a look for unsent
    files in `.rl4llm/logs/`; for a server, always."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite" or any((Path(STATE_DIR) / "logs").glob(f"*{UNSENT}")):
        return True
    path = Path(parsed.path[1:])
    if not path.is_file():
        return False
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT 1 FROM runs WHERE status = 'RUNNING' LIMIT 1").fetchone() is not None
    except sqlite3.Error:  # not (yet) MLflow's schema, locked, …: let MLflow look
        return True
