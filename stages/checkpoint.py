"""Where a stage's checkpoints live and which one it resumes from (stdlib only: `rl4llm list` reads this too).

Checkpoints sit outside the stage's DVC outputs (DVC deletes those before it runs a stage), under
`.rl4llm/checkpoints/<pipeline>/<stage>/<key>/step-<N>/`. The key hashes the stage's resolved spec and the contents
of its inputs, so a changed param or input never resumes a stale run. A checkpoint is written as `step-<N>.tmp` and
renamed when complete: a directory without the suffix is always whole.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

STATE_DIR = ".rl4llm"  # the project's run state: checkpoints, stage logs, the run lock
CHECKPOINTS = f"{STATE_DIR}/checkpoints"
PROGRESS_FILE = "progress.json"  # {"step": N, "total": T} in every complete checkpoint
STEP_DIR = re.compile(r"step-(\d+)")


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


def checkpoint_key(root: Path, spec: dict[str, Any]) -> str:
    """Hash of the resolved spec and the contents of every local input (a Hub id counts by its name)."""
    local_inputs = [root / i["path"] for i in spec["inputs"].values() if (root / i["path"]).exists()]
    identity = json.dumps(spec, sort_keys=True) + tree_hash(local_inputs)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def stage_checkpoints(root: Path, pipeline: str, stage: str) -> Path:
    """The checkpoint area of one stage (every key)."""
    return root / CHECKPOINTS / pipeline / stage


def checkpoint_dir(root: Path, pipeline: str, stage: str, spec: dict[str, Any]) -> Path:
    """The checkpoints of this stage's current spec and inputs."""
    return stage_checkpoints(root, pipeline, stage) / checkpoint_key(root, spec)


def complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the whole checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := STEP_DIR.fullmatch(p.name)) and (p / PROGRESS_FILE).exists()]
    return sorted(found)


def resumable(directory: Path) -> dict[str, int] | None:
    """{"step", "total"} of the newest whole checkpoint in `directory`, or None."""
    found = complete_checkpoints(directory)
    return json.loads((found[-1][1] / PROGRESS_FILE).read_text()) if found else None


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
