"""Where a stage's checkpoints live and which one it resumes from (stdlib only: `rl4llm list` reads this too).

Checkpoints sit outside the stage's DVC outputs (DVC deletes those before it runs a stage), under
`.rl4llm/checkpoints/<pipeline>/<stage>/<key>/step-<N>/`. The key hashes the stage's resolved spec and the contents
of its inputs, so a changed param or input never resumes a stale run. A checkpoint is written as `step-<N>.tmp`, its
manifest (the size and sha256 of every file) last, then renamed. A checkpoint is intact when every file matches its
manifest: `list` checks the sizes (a stat per file), a resume the contents too (~1.5 s for 1.6 GB).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stages.spec import ResolvedStage

STATE_DIR = ".rl4llm"  # the project's run state: checkpoints, stage logs, the run lock
CHECKPOINTS = f"{STATE_DIR}/checkpoints"
MANIFEST = "manifest.json"  # {"step": N, "total": T, "files": {relative path: {"size", "sha256"}}}, written last
STEP_DIR = re.compile(r"step-(\d+)")


class Corrupt(Exception):
    """A checkpoint that is not intact; the message says why."""


def tree_hash(paths: list[Path]) -> str:
    """sha256 over the files under `paths` (relative names and contents)."""
    digest = hashlib.sha256()
    for root in sorted(paths):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            digest.update(str(file.relative_to(root.parent)).encode())
            with file.open("rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def input_hashes(root: Path, spec: ResolvedStage) -> dict[str, str]:
    """{path: content hash} of the stage's local inputs (files and directories) as they are now; a Hub id has none
    (its name, in the spec, identifies it)."""
    return {i.path: tree_hash([root / i.path]) for i in spec.inputs.values() if (root / i.path).exists()}


def checkpoint_key(root: Path, spec: ResolvedStage, inputs: dict[str, str] | None = None) -> str:
    """Hash of the resolved spec and the contents of its local inputs (`inputs`: their `input_hashes`, if known)."""
    identity = json.dumps([spec.dump(), input_hashes(root, spec) if inputs is None else inputs], sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def stage_checkpoints(root: Path, pipeline: str, stage: str) -> Path:
    """The checkpoint area of one stage (every key)."""
    return root / CHECKPOINTS / pipeline / stage


def checkpoint_dir(root: Path, pipeline: str, stage: str, spec: ResolvedStage,
                   inputs: dict[str, str] | None = None) -> Path:
    """The checkpoints of this stage's current spec and inputs (`inputs`: their `input_hashes`, if known)."""
    return stage_checkpoints(root, pipeline, stage) / checkpoint_key(root, spec, inputs)


def file_sha256(file: Path) -> str:
    """The sha256 of `file`, as `sha256sum` prints it."""
    with file.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(path: Path, step: int, total: int) -> None:
    """Record the progress of checkpoint `path` and the size and sha256 of each of its files, as its last file."""
    files = {str(f.relative_to(path)): {"size": f.stat().st_size, "sha256": file_sha256(f)}
             for f in sorted(path.rglob("*")) if f.is_file()}
    (path / MANIFEST).write_text(json.dumps({"step": step, "total": total, "files": files}, indent=1))


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint `path` (`step-<N>`); raise `Corrupt` if it is missing or not one for step N."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        well_formed = (manifest["step"] == int(path.name.removeprefix("step-")) and isinstance(manifest["total"], int)
                       and files and all(isinstance(f["size"], int) and isinstance(f["sha256"], str)
                                         for f in files.values()))
    except FileNotFoundError:
        raise Corrupt(f"no {MANIFEST}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise Corrupt(f"{MANIFEST} is unreadable ({type(e).__name__}: {e})") from None
    if not well_formed:
        raise Corrupt(f"{MANIFEST} is not a manifest of step {path.name.removeprefix('step-')}")
    return manifest


def verified(path: Path, contents: bool = False) -> dict[str, Any]:
    """The manifest of checkpoint `path` if every file it lists has its size (and with `contents`, its sha256);
    else raise `Corrupt` saying why not. Sizes are checked first: a stat per file, no reading."""
    manifest = read_manifest(path)
    files = manifest["files"]
    try:
        for name, saved in files.items():
            if (size := (path / name).stat().st_size) != saved["size"]:
                raise Corrupt(f"{name} has {size} bytes, {saved['size']} when saved")
        for name, saved in files.items():
            if contents and file_sha256(path / name) != saved["sha256"]:
                raise Corrupt(f"{name} differs from what was saved (sha256)")
    except OSError as e:
        raise Corrupt(f"a file is unreadable ({e})") from None
    return manifest


def intact(path: Path) -> bool:
    """Whether every file of checkpoint `path` has the size its manifest records."""
    try:
        verified(path)
    except Corrupt:
        return False
    return True


def saved_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every renamed checkpoint in `directory`, intact or not, oldest first."""
    try:
        entries = list(directory.iterdir())
    except OSError:  # none yet, or a finished stage just removed them
        return []
    return sorted((int(m.group(1)), p) for p in entries if (m := STEP_DIR.fullmatch(p.name)))


def complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in `directory` whose files all have their manifest's sizes, oldest first."""
    return [(step, path) for step, path in saved_checkpoints(directory) if intact(path)]


def resumable(directory: Path) -> dict[str, int] | None:
    """{"step", "total"} of the newest checkpoint in `directory` whose files have their sizes, or None."""
    for _, path in reversed(saved_checkpoints(directory)):
        try:
            manifest = verified(path)
        except Corrupt:
            continue
        return {"step": manifest["step"], "total": manifest["total"]}
    return None


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
