"""DVC: dvc.yaml and params.yaml derived from pipelines.yaml, and the calls that reproduce and inspect stages.

DVC alone decides staleness. Each generated DVC stage `<pipeline>.<stage>` runs `rl4llm stage <pipeline> <stage>`
and depends on: its resolved spec (params.yaml key `<pipeline>.<stage>`), its inputs' files, its accelerate config
and the code that shapes its output (`code_deps`), when that code lives in the project.
"""

from __future__ import annotations

import ast
import configparser
import copy
import functools
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable

import yaml

import stages
from flows.config import ARTIFACTS
from stages import BOOKKEEPING
from stages.kinds import get_kind, kind_module
from stages.processes import Interrupted, run_child
from stages.registry import REGISTRIES
from stages.runner import METRICS_FILE, PARAMS_FILE

DVC_HINTS = ("To track the changes with git", "To enable auto staging", "Use `dvc push`", "git add ",
             "dvc config core.autostage", "dvc push")  # DVC's advice to its own users, not to ours
HEADER = "# Generated from pipelines.yaml by `rl4llm sync` (also run by `rl4llm run`). Do not edit.\n"


def dvc_name(pipeline: str, stage: str) -> str:
    return f"{pipeline}.{stage}"


def code_deps(root: Path, spec: dict[str, Any]) -> list[str]:
    """The code that shapes the stage's output, as files of the project (relative to `root`): its kind's module and
    the modules of the code its params name (rewards, step reward, evaluator, labeler; built-in or the user's own),
    with what they import, transitively. `stages.BOOKKEEPING` modules are left out."""
    root = root.resolve()
    kind = get_kind(spec["kind"])
    files = import_closure([kind_module(kind.name), *filter(None, [kind.run_module()]), *named_code(spec["params"])],
                           root)
    return sorted(str(f.relative_to(root)) for f in files if f.is_relative_to(root))


def named_code(value: Any) -> list[str]:
    """Modules of the code that params name: registry entries, and `module:function` import paths."""
    if isinstance(value, dict):
        return [m for item in [*value, *value.values()] for m in named_code(item)]
    if isinstance(value, list):
        return [m for item in value for m in named_code(item)]
    if not isinstance(value, str):
        return []
    path = next((r.import_path(value) for r in REGISTRIES if value in r), value if ":" in value else None)
    return [path.partition(":")[0]] if path else []


def import_closure(modules: list[str], root: Path) -> set[Path]:
    """Files of `modules`, their parent packages and what they import, transitively: the project's modules (under
    `root`) and this package's; others (torch, …) are not followed."""
    package_parent = Path(stages.__file__).resolve().parents[1]
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        roots = [root, package_parent] if name.split(".")[0] == "stages" else [root]  # torch & co. not followed
        file = None if name in BOOKKEEPING else _module_file(name, roots)
        if file is None or file in seen:
            continue
        seen.add(file)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        package = parts if file.name == "__init__.py" else parts[:-1]
        for level, module, names in _imports(file, file.stat().st_mtime_ns):
            base = package[:len(package) - level + 1] if level else []
            full = ".".join([*base, *([module] if module else [])])
            todo += [full, *(f"{full}.{name}" for name in names)]  # `from m import x`: x may be a module
    return seen


@functools.lru_cache(maxsize=None)
def _imports(file: Path, _mtime_ns: int) -> list[tuple[int, str | None, list[str]]]:
    """The imports anywhere in a file but `if TYPE_CHECKING:` blocks: (level, module, names imported from it)."""
    found: list[tuple[int, str | None, list[str]]] = []
    tree = ast.parse(file.read_text())
    for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]:
        block.body = []  # imports for type annotations only: not code the module runs
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(0, alias.name, []) for alias in node.names]
    return found


def _module_file(name: str, roots: list[Path]) -> Path | None:
    parts = name.split(".")
    for root in roots:
        for file in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
            if file.is_file():
                return file.resolve()
    return None


def dvc_stages(root: Path, resolved: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pipeline, specs in resolved.items():
        for stage, spec in specs.items():
            data_deps = [i["path"] for i in spec["inputs"].values() if (root / i["path"]).exists()
                         or i["path"].startswith(f"{ARTIFACTS}/")]
            out[dvc_name(pipeline, stage)] = {
                "cmd": f"rl4llm stage {pipeline} {stage}",
                "deps": sorted(set(data_deps)) + [spec["accelerate_config"]] + code_deps(root, spec),
                "params": [{PARAMS_FILE: [f"{pipeline}.{stage}"]}],
                "outs": list(spec["outputs"].values()),
                "metrics": [f"{spec['output_dir']}/{METRICS_FILE}"],  # cached: pushed and pulled with the outputs
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
            write_atomically(path, text)
            changed = True
    return changed


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` whole (a reader never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


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


def _config(root: Path) -> configparser.ConfigParser:
    """The project's DVC config (.dvc/config, then .dvc/config.local), read without starting DVC."""
    config = configparser.ConfigParser()
    config.read([root / ".dvc" / "config", root / ".dvc" / "config.local"])
    return config


def default_remote(root: Path) -> str | None:
    """The name of the project's default DVC remote (`dvc remote add -d`), if any."""
    return _config(root).get("core", "remote", fallback=None)


def remote_url(root: Path) -> str | None:
    name = default_remote(root)
    return _config(root).get(f"'remote \"{name}\"'", "url", fallback=None) if name else None


def repro(root: Path, pipeline: str, stage: str, force: bool, env: dict[str, str],
          on_line: Callable[[str], None]) -> None:
    """`dvc repro` of one stage, in its own process group and dying with us. With a default remote, DVC first
    pulls the run cache and the stage's missing inputs, and restores the outputs of a pushed run with the same
    inputs, params and code instead of running it (`--pull`). Our SIGINT or SIGTERM reaches the stage as SIGINT
    (DVC waits for its command on SIGINT): it checkpoints and stops, then we raise `Interrupted`. `on_line` gets
    each line of output (DVC's and the stage's)."""
    pull = ["--pull"] if default_remote(root) else []
    cmd = ["dvc", "repro", "--single-item", *pull, *(["--force"] if force else []), dvc_name(pipeline, stage)]
    causes: list[str] = []  # the stage's `error: …` lines (runner.main prints one, naming its full log)

    def shown(line: str) -> None:
        if line.startswith("error: "):
            causes.append(line)
        if line.strip() and not line.strip().startswith(DVC_HINTS):
            on_line(line)

    code, received = run_child(cmd, forward=signal.SIGINT, new_group=True, on_line=shown, cwd=root,
                               env={**os.environ, **env})
    if received is not None:
        raise Interrupted(received, f"{pipeline}/{stage}: stopped by {signal.Signals(received).name}")
    if code != 0:
        raise subprocess.CalledProcessError(code, cmd, stderr=causes[-1] if causes else None)


def push(root: Path, pipeline: str, stage: str) -> None:
    """Push a stage's outputs and the run cache to the default remote."""
    dvc(root, "push", "--run-cache", "-q", dvc_name(pipeline, stage), capture=True)


def pull(root: Path, pipeline: str, stages: list[str]) -> None:
    """Fetch the outputs dvc.lock names for `stages` from the default remote into the workspace; runs nothing."""
    dvc(root, "pull", "-q", *[dvc_name(pipeline, s) for s in stages], capture=True)


def lock_entry(root: Path, pipeline: str, stage: str) -> dict[str, Any] | None:
    """The stage's dvc.lock entry (cmd, deps, params, outs with their hashes), if it has one."""
    return lock_entries(root, pipeline).get(stage)


def lock_entries(root: Path, pipeline: str) -> dict[str, dict[str, Any]]:
    """{stage: dvc.lock entry} of every stage of `pipeline` that has one."""
    locked = read_lock(root).get("stages", {})
    prefix = dvc_name(pipeline, "")
    return {name.removeprefix(prefix): entry for name, entry in locked.items() if name.startswith(prefix)}


def read_lock(root: Path) -> dict[str, Any]:
    """The project's dvc.lock (a copy the caller may change; {} without one)."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return {}
    stat = lock.stat()
    return copy.deepcopy(_read_lock(lock, stat.st_mtime_ns, stat.st_size, stat.st_ino))


@functools.lru_cache(maxsize=4)
def _read_lock(lock: Path, *_version: int) -> dict[str, Any]:
    """dvc.lock parsed, once per version of the file (its mtime, size and inode)."""
    return yaml.load(lock.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}


def write_lock_entries(root: Path, pipeline: str, entries: dict[str, dict[str, Any]]) -> None:
    """Replace these stages' dvc.lock entries (atomically)."""
    content = read_lock(root)
    content.setdefault("schema", "2.0")
    for stage, entry in entries.items():
        content.setdefault("stages", {})[dvc_name(pipeline, stage)] = entry
    write_atomically(root / "dvc.lock", yaml.safe_dump(content, sort_keys=False))


def checkout(root: Path, pipeline: str, stage: str) -> None:
    """Put the outputs dvc.lock names for the stage into the workspace: from the local cache, else the remote."""
    try:
        dvc(root, "checkout", "-q", "--force", dvc_name(pipeline, stage), capture=True)
    except subprocess.CalledProcessError:
        if not default_remote(root):
            raise
        dvc(root, "pull", "-q", "--force", dvc_name(pipeline, stage), capture=True)


def outputs_present(root: Path, spec: dict[str, Any]) -> bool:
    return (root / spec["output_dir"] / METRICS_FILE).exists()


def status(root: Path, pipeline: str, specs: dict[str, dict[str, Any]], live: bool = True) -> dict[str, str]:
    """Per stage: 'up to date', 'stale' (and what changed), 'not pulled' (in dvc.lock, outputs not in the
    workspace) or 'never run' (no lock entry). Not `live` (a run holds DVC's lock): 'up to date' means as recorded
    in dvc.lock, unchecked."""
    stage_names = list(specs)
    names = [dvc_name(pipeline, s) for s in stage_names]
    report = json.loads(dvc(root, "status", "--json", *names, capture=True).stdout or "{}") if live else {}
    locked = lock_entries(root, pipeline)
    out = {}
    for stage, name in zip(stage_names, names):
        if stage not in locked:
            out[stage] = "never run"
        elif not outputs_present(root, specs[stage]):
            out[stage] = f"not pulled (`rl4llm pull {pipeline}`)" if default_remote(root) else "never run"
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
