"""Checks `rl4llm run` makes before any stage starts: services it will need are there (stdlib only, fast)."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from flows.config import ConfigError


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
