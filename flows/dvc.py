"""DVC: dvc.yaml and params.yaml derived from pipelines.yaml, and the calls that reproduce and inspect stages.

DVC alone decides staleness. Each generated DVC stage `<pipeline>.<stage>` runs `rl4llm stage <pipeline> <stage>`
and depends on: its resolved spec (params.yaml key `<pipeline>.<stage>`), its inputs' files, its accelerate config
and the code that shapes its output (`code_deps`), when that code lives in the project.
"""

from __future__ import annotations

import configparser
import copy
import functools
import json
import os
import re
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from flows.code_deps import code_deps
from flows.errors import ConfigError, DvcError, StageFailed
from stages.paths import ARTIFACTS
from stages.processes import Interrupted, run_child
from stages.runner import METRICS_FILE, PARAMS_FILE, STOPS, log_file
from stages.spec import ResolvedStage

DVC_HINTS = ("To track the changes with git", "To enable auto staging", "Use `dvc push`", "git add ",
             "dvc config core.autostage", "dvc push")  # DVC's advice to its own users, not to ours
LOCK_FILE = "dvc.lock"
HEADER = "# Generated from pipelines.yaml by `rl4llm sync` (also run by `rl4llm run`). Do not edit.\n"


def dvc_name(pipeline: str, stage: str) -> str:
    return f"{pipeline}.{stage}"


def dvc_stages(root: Path, resolved: dict[str, dict[str, ResolvedStage]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pipeline, specs in resolved.items():
        for stage, spec in specs.items():
            data_deps = [i.path for i in spec.inputs.values() if (root / i.path).exists()
                         or i.path.startswith(f"{ARTIFACTS}/")]
            out[dvc_name(pipeline, stage)] = {
                "cmd": f"rl4llm stage {pipeline} {stage}",
                "deps": sorted(set(data_deps)) + [spec.accelerate_config] + code_deps(root, spec),
                "params": [{PARAMS_FILE: [f"{pipeline}.{stage}"]}],
                "outs": list(spec.outputs.values()),
                "metrics": [f"{spec.output_dir}/{METRICS_FILE}"],  # cached: pushed and pulled with the outputs
            }
    return {"stages": out}


def render(root: Path, resolved: dict[str, dict[str, ResolvedStage]]) -> tuple[str, str]:
    """(dvc.yaml text, params.yaml text) for the resolved stages of every pipeline."""
    dvc_yaml = HEADER + yaml.safe_dump(dvc_stages(root, resolved), sort_keys=False, width=120)
    dumped = {pipeline: {stage: spec.dump() for stage, spec in specs.items()} for pipeline, specs in resolved.items()}
    params_yaml = HEADER + yaml.safe_dump(dumped, sort_keys=False, width=120)
    return dvc_yaml, params_yaml


def sync(root: Path, resolved: dict[str, dict[str, ResolvedStage]]) -> bool:
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


OUTCOMES = {"Running stage '": "ran", "is cached - skipping run": "restored", "Pulling data for": "restored"}
STAGE_EXIT = re.compile(r"exited with (-?\d+)")  # DVC's "failed to run: <cmd>, exited with <code>"


def repro(root: Path, pipeline: str, stage: str, force: bool, env: dict[str, str],
          on_line: Callable[[str], None]) -> str:
    """`dvc repro` of one stage, in its own process group and dying with us; returns what DVC did: 'ran',
    'restored' (from its run cache or the remote) or 'skipped' (up to date). With a default remote, DVC first
    pulls the run cache and the stage's missing inputs, and restores the outputs of a pushed run with the same
    inputs, params and code instead of running it (`--pull`). Our SIGINT or SIGTERM reaches the stage as SIGINT
    (DVC waits for its command on SIGINT): it checkpoints and stops, then we raise `Interrupted`, as we do when
    the stage was stopped by a signal sent to it alone. A failed stage raises `StageFailed` with its exit code
    (128 + N when signal N killed it, as a shell says) and its `error: …` line, naming the stage's log; a failure
    of DVC's own, `DvcError`. `on_line` gets each line of output (DVC's and the stage's); the stage's log
    (`.rl4llm/logs/<pipeline>.<stage>.log`) keeps them all."""
    pull = ["--pull"] if default_remote(root) else []
    cmd = ["dvc", "repro", "--single-item", *pull, *(["--force"] if force else []), dvc_name(pipeline, stage)]
    causes: list[str] = []  # the stage's `error: …` lines (runner.main prints one, naming its full log)
    dvc_errors: list[str] = []
    outcome = ["skipped"]
    log = root / log_file(pipeline, stage)
    log.parent.mkdir(parents=True, exist_ok=True)

    def shown(line: str) -> None:
        if line.startswith("error: "):
            causes.append(line)
        elif line.startswith("ERROR: "):
            dvc_errors.append(line.removeprefix("ERROR: "))
        outcome.extend(result for marker, result in OUTCOMES.items() if marker in line)
        if line.strip() and not line.strip().startswith(DVC_HINTS):
            kept.write(line + "\n")
            kept.flush()  # the stage appends its traceback to the same file
            on_line(line)

    with log.open("w") as kept:
        code, received, _peak = run_child(cmd, forward=signal.SIGINT, new_group=True, on_line=shown, cwd=root,
                                          env={**os.environ, **env})
    label = f"{pipeline}/{stage}"
    if received is not None:
        raise Interrupted(received, f"{label}: stopped by {signal.Signals(received).name}")
    if code == 0:
        return outcome[-1]
    found = STAGE_EXIT.search(dvc_errors[-1]) if dvc_errors else None
    if found is None:
        raise DvcError(f"`dvc repro` of {label} failed: {dvc_errors[-1] if dvc_errors else f'exit code {code}'}")
    stage_code = int(found.group(1))
    stage_code = 128 - stage_code if stage_code < 0 else stage_code  # -N: the shell exec'd it, and signal N killed it
    if stage_code - 128 in STOPS:  # a signal sent to the stage alone
        raise Interrupted(stage_code - 128, f"{label}: stopped by {signal.Signals(stage_code - 128).name}")
    cause = causes[-1] if causes else f"error: {label} failed with exit code {stage_code}"
    raise StageFailed(stage_code, cause if str(log_file(pipeline, stage)) in cause else f"{cause} (its output: "
                      f"{log_file(pipeline, stage)})")


def push(root: Path, pipeline: str, stage: str) -> None:
    """Push a stage's outputs and the run cache to the default remote."""
    with remote_errors(root, f"push of {pipeline}/{stage} to"):
        dvc(root, "push", "--run-cache", dvc_name(pipeline, stage), capture=True)


def pull(root: Path, pipeline: str, stages: list[str]) -> None:
    """Fetch the outputs dvc.lock names for `stages` from the default remote into the workspace; runs nothing."""
    with remote_errors(root, f"pull of {pipeline}/{', '.join(stages)} from"):
        dvc(root, "pull", *[dvc_name(pipeline, s) for s in stages], capture=True)


@contextmanager
def remote_errors(root: Path, what: str) -> Iterator[None]:  # what: "push of p/s to", "pull of p/s from"
    """A failed DVC command that talks to the default remote becomes a `DvcError` naming the remote, its URL and
    DVC's cause (its last `ERROR:` line, without its advice; the command must not be `-q`, which drops it)."""
    try:
        yield
    except subprocess.CalledProcessError as e:
        causes = [line.removeprefix("ERROR: ").strip() for line in (e.stderr or "").splitlines()
                  if line.startswith("ERROR: ")]
        cause = causes[-1] if causes else f"`{' '.join(e.cmd)}` exited with {e.returncode}"
        raise DvcError(f"{what} DVC remote '{default_remote(root)}' ({remote_url(root)}) failed: "
                       f"{cause}") from None


def lock_entry(root: Path, pipeline: str, stage: str) -> dict[str, Any] | None:
    """The stage's dvc.lock entry (cmd, deps, params, outs with their hashes), if it has one."""
    return lock_entries(root, pipeline).get(stage)


def lock_entries(root: Path, pipeline: str) -> dict[str, dict[str, Any]]:
    """{stage: dvc.lock entry} of every stage of `pipeline` that has one."""
    locked = read_lock(root).get("stages", {})
    prefix = dvc_name(pipeline, "")
    return {name.removeprefix(prefix): entry for name, entry in locked.items() if name.startswith(prefix)}


def read_lock(root: Path) -> dict[str, Any]:
    """The project's dvc.lock (a copy the caller may change; {} without one). A garbled one is a `ConfigError`
    naming the file and the line."""
    lock = root / LOCK_FILE
    if not lock.exists():
        return {}
    stat = lock.stat()
    return copy.deepcopy(_read_lock(lock, stat.st_mtime_ns, stat.st_size, stat.st_ino))


@functools.lru_cache(maxsize=4)
def _read_lock(lock: Path, *_version: int) -> dict[str, Any]:
    """dvc.lock parsed and its shape checked, once per version of the file (its mtime, size and inode)."""
    advice = "restore it (`git checkout dvc.lock`) or delete it (every stage then counts as never run)"
    try:
        content = yaml.load(lock.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        raise ConfigError(str(lock), f"{where}invalid YAML ({getattr(e, 'problem', None) or e}); {advice}") from None
    stages = content.get("stages", {}) if isinstance(content, dict) else None
    if not isinstance(stages, dict) or not all(isinstance(entry, dict) for entry in stages.values()):
        raise ConfigError(str(lock), f"not a dvc.lock: expected `stages:` mapping each stage to its entry; {advice}")
    return content


def write_lock_entries(root: Path, pipeline: str, entries: dict[str, dict[str, Any]]) -> None:
    """Replace these stages' dvc.lock entries (atomically)."""
    content = read_lock(root)
    content.setdefault("schema", "2.0")
    for stage, entry in entries.items():
        content.setdefault("stages", {})[dvc_name(pipeline, stage)] = entry
    write_atomically(root / LOCK_FILE, yaml.safe_dump(content, sort_keys=False))


def checkout(root: Path, pipeline: str, stage: str) -> None:
    """Put the outputs dvc.lock names for the stage into the workspace: from the local cache, else the remote."""
    try:
        dvc(root, "checkout", "-q", "--force", dvc_name(pipeline, stage), capture=True)
    except subprocess.CalledProcessError:
        if not default_remote(root):
            raise
        with remote_errors(root, f"pull of {pipeline}/{stage} from"):
            dvc(root, "pull", "--force", dvc_name(pipeline, stage), capture=True)


def outputs_present(root: Path, spec: ResolvedStage) -> bool:
    return (root / spec.output_dir / METRICS_FILE).exists()


def status(root: Path, pipeline: str, specs: dict[str, ResolvedStage], live: bool = True) -> dict[str, str]:
    """Per stage: 'up to date', 'stale' (and what changed), 'not pulled' (in dvc.lock, outputs not in the
    workspace) or 'never run' (no lock entry). Not `live` (a run holds DVC's lock): 'up to date' means as recorded
    in dvc.lock, unchecked."""
    stage_names = list(specs)
    names = [dvc_name(pipeline, s) for s in stage_names]
    locked = lock_entries(root, pipeline)  # first: a garbled dvc.lock is named here, not in DVC's words
    report = json.loads(dvc(root, "status", "--json", *names, capture=True).stdout or "{}") if live else {}
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
