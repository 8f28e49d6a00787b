"""DVC: dvc.yaml and params.yaml derived from pipelines.yaml, and the calls that reproduce and inspect stages.

DVC alone decides staleness. Each generated DVC stage `<pipeline>.<stage>` runs `rl4llm stage <pipeline> <stage>`
and depends on: its resolved spec (params.yaml key `<pipeline>.<stage>`), its inputs' files, its accelerate config
and its code (the shared `stages/*.py` and its own kind module, when the package lives in the project).
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import yaml

import stages
from flows.config import ARTIFACTS
from stages.kinds import KIND_MODULES
from stages.processes import Interrupted, run_child
from stages.runner import METRICS_FILE, PARAMS_FILE

HEADER = "# Generated from pipelines.yaml by `rl4llm sync` (also run by `rl4llm run`). Do not edit.\n"


def dvc_name(pipeline: str, stage: str) -> str:
    return f"{pipeline}.{stage}"


def stage_modules(kind_module: str) -> list[Path]:
    """Files of the `stages` modules a kind's module imports, transitively (its code, for DVC)."""
    package = Path(stages.__file__).resolve().parent
    seen: set[Path] = set()
    todo = [kind_module]
    while todo:
        parts = todo.pop().split(".")
        file = package.joinpath(*parts[1:]).with_suffix(".py")
        if not file.exists():
            file = package.joinpath(*parts[1:], "__init__.py")
        if file in seen or not file.exists():
            continue
        seen.add(file)
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "stages":
                todo += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.split(".")[0] == "stages"]
    return sorted(seen)


def code_deps(root: Path, kind: str) -> list[str]:
    """The stage's code files, relative to the project root (none when the package is installed elsewhere)."""
    root = root.resolve()
    if not Path(stages.__file__).resolve().is_relative_to(root):
        return []
    return [str(f.relative_to(root)) for f in stage_modules(KIND_MODULES[kind])]


def dvc_stages(root: Path, resolved: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pipeline, specs in resolved.items():
        for stage, spec in specs.items():
            data_deps = [i["path"] for i in spec["inputs"].values() if (root / i["path"]).exists()
                         or i["path"].startswith(f"{ARTIFACTS}/")]
            out[dvc_name(pipeline, stage)] = {
                "cmd": f"rl4llm stage {pipeline} {stage}",
                "deps": sorted(set(data_deps)) + [spec["accelerate_config"]] + code_deps(root, spec["kind"]),
                "params": [{PARAMS_FILE: [f"{pipeline}.{stage}"]}],
                "outs": list(spec["outputs"].values()),
                "metrics": [{f"{spec['output_dir']}/{METRICS_FILE}": {"cache": False}}],
            }
    return {"stages": out}


def render(root: Path, resolved: dict) -> tuple[str, str]:
    """(dvc.yaml text, params.yaml text) for a resolved config."""
    dvc_yaml = HEADER + yaml.safe_dump(dvc_stages(root, resolved), sort_keys=False, width=120)
    params_yaml = HEADER + yaml.safe_dump(resolved, sort_keys=False, width=120)
    return dvc_yaml, params_yaml


def sync(root: Path, resolved: dict) -> bool:
    """Write dvc.yaml and params.yaml if they differ from pipelines.yaml's rendering. True if anything changed."""
    changed = False
    for name, text in zip(("dvc.yaml", PARAMS_FILE), render(root, resolved)):
        path = root / name
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)
            changed = True
    return changed


def dvc(root: Path, *args: str, capture: bool = False, env: dict[str, str] | None = None):
    return subprocess.run(["dvc", *args], cwd=root, check=True, text=True, capture_output=capture,
                          env={**os.environ, **(env or {})})


def ensure_repo(root: Path) -> None:
    """`dvc init` if needed (`--no-scm` outside git)."""
    if (root / ".dvc").exists():
        return
    in_git = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=root, capture_output=True).returncode
    dvc(root, "init", "-q", *([] if in_git == 0 else ["--no-scm"]))
    (root / ".dvcignore").write_text("__pycache__/\n*.pyc\n")


def repro(root: Path, pipeline: str, stage: str, force: bool, env: dict[str, str]) -> None:
    """`dvc repro` of one stage, in its own process group and dying with us. Our SIGINT or SIGTERM reaches the
    stage as SIGINT (DVC waits for its command on SIGINT): it checkpoints and stops, then we raise `Interrupted`."""
    cmd = ["dvc", "repro", "--single-item", *(["--force"] if force else []), dvc_name(pipeline, stage)]
    code, received = run_child(cmd, forward=signal.SIGINT, new_group=True, cwd=root, env={**os.environ, **env})
    if received is not None:
        raise Interrupted(received, f"{pipeline}/{stage}: stopped by {signal.Signals(received).name}")
    if code != 0:
        raise subprocess.CalledProcessError(code, cmd)


def status(root: Path, pipeline: str, specs: dict[str, dict[str, Any]], live: bool = True) -> dict[str, str]:
    """Per stage: 'up to date', 'stale' (and what changed) or 'never run' (no lock entry or no metrics.json).
    Not `live` (a run holds DVC's lock): 'up to date' means as recorded in dvc.lock, unchecked."""
    stage_names = list(specs)
    names = [dvc_name(pipeline, s) for s in stage_names]
    report = json.loads(dvc(root, "status", "--json", *names, capture=True).stdout or "{}") if live else {}
    lock_path = root / "dvc.lock"
    locked = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {}) if lock_path.exists() else {}
    out = {}
    for stage, name in zip(stage_names, names):
        if name not in locked or not (root / specs[stage]["output_dir"] / METRICS_FILE).exists():
            out[stage] = "never run"
        elif name in report:
            out[stage] = "stale (" + describe_changes(report[name]) + ")"
        else:
            out[stage] = "up to date"
    return out


def describe_changes(entries: list) -> str:
    parts = []
    for entry in entries:
        if isinstance(entry, dict):
            for what, detail in entry.items():
                parts.append(f"{what}: {', '.join(detail) if isinstance(detail, dict) else detail}")
        else:
            parts.append(str(entry))
    return "; ".join(parts)
