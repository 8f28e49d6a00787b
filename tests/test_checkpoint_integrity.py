"""Checkpoint integrity: a checkpoint counts only when every file matches the manifest written last. A stage whose
newest checkpoint is damaged resumes from the newest intact one (or starts fresh), says which it skipped and why,
and ends bit-identical to an uninterrupted run; `rl4llm list` never tracebacks on a damaged checkpoint and never
promises a resume from one.

The stages are copies of `sft` (same spec, so the same result), killed with `RL4LLM_FAULT` as in
tests/test_crash_safety.py, whose helpers run them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.checkpoint import (CHECKPOINTS, MANIFEST, complete_checkpoints, resumable, saved_checkpoints,
                               write_manifest)
from stages.loop import FAULT_ENV
from tests.conftest import make_project, write_instruct_data
from tests.test_crash_safety import SFT, env, output, run

TOTAL = 8  # sft: 32 training rows / 8 per batch × 2 epochs; a checkpoint every 2 steps
COPIES = {"sft_newest_truncated": {}, "sft_newest_overwritten": {}, "sft_none_intact": {"keep_checkpoints": 1},
          "sft_listed": {}}  # name: params changed (none that changes the result)
WEIGHTS = "pytorch_model.bin"  # what accelerate's save_state names the model's weights


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    make_project(root)
    stages = [{"name": "sft", **SFT},
              *({"name": name, **SFT, "params": {**SFT["params"], **changed}} for name, changed in COPIES.items())]
    config = {"pipelines": {"crash": {"defaults": {"seed": 0, "model": str(tiny_model_dir)},
                                      "datasets": write_instruct_data(root), "stages": stages}}}
    (root / "pipelines.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    subprocess.run([sys.executable, "-m", "flows.cli", "sync"], cwd=root, env=env(root), check=True, timeout=120)
    run(root, "sft")
    return root


def killed_at_step_5(root: Path, stage: str) -> dict[int, Path]:
    """Run `stage` until it is SIGKILLed after step 5; its checkpoints on disk by step (2 and 4 when it keeps 2)."""
    run(root, stage, check=False, **{FAULT_ENV: "step:5"})
    (key,) = (root / CHECKPOINTS / "crash" / stage).iterdir()
    return dict(saved_checkpoints(key))


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def overwrite(file: Path) -> None:
    """Zero the second half of `file` in place: its size is unchanged."""
    size = file.stat().st_size
    with file.open("r+b") as f:
        f.seek(size // 2)
        f.write(bytes(size - size // 2))


def assert_same_result(root: Path, stage: str) -> None:
    """`stage` published the uninterrupted `sft` stage's metrics and weights, byte for byte."""
    for name in ("metrics.json", "model/model.safetensors"):
        assert (output(root, stage) / name).read_bytes() == (output(root, "sft") / name).read_bytes()


def listed_state(root: Path, stage: str) -> str:
    """The state `rl4llm list` gives `stage`, after checking it exited 0 without a traceback."""
    listing = subprocess.run([sys.executable, "-m", "flows.cli", "list", "crash"], cwd=root, env=env(root),
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "Traceback" not in listing.stderr, listing.stderr[-3000:]
    (line,) = [ln for ln in listing.stdout.splitlines() if ln.split()[:1] == [stage]]
    return line.split(None, 2)[2]


@pytest.mark.e2e
@pytest.mark.parametrize("stage, damage, reason", [
    ("sft_newest_truncated", truncate, f"{WEIGHTS} has "),
    ("sft_newest_overwritten", overwrite, f"{WEIGHTS} differs from what was saved (sha256)")])
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(project: Path, stage: str, damage, reason: str):
    checkpoints = killed_at_step_5(project, stage)
    assert sorted(checkpoints) == [2, 4]
    damage(checkpoints[4] / WEIGHTS)
    rerun = run(project, stage)
    skipped = [ln for ln in rerun.stderr.splitlines() if "skipping the checkpoint" in ln]
    assert skipped == [ln for ln in skipped if f"crash/{stage}: skipping the checkpoint at step 4: {reason}" in ln]
    assert len(skipped) == 1 and f"crash/{stage}: resuming from step 2/{TOTAL}" in rerun.stderr
    assert_same_result(project, stage)


@pytest.mark.e2e
def test_no_intact_checkpoint_starts_fresh_and_says_why(project: Path):
    stage = "sft_none_intact"  # keeps one checkpoint
    checkpoints = killed_at_step_5(project, stage)
    assert sorted(checkpoints) == [4]
    truncate(checkpoints[4] / WEIGHTS)
    rerun = run(project, stage)
    assert f"crash/{stage}: skipping the checkpoint at step 4: {WEIGHTS} has " in rerun.stderr
    fresh = [ln for ln in rerun.stderr.splitlines() if "starting fresh" in ln]
    assert fresh == [f"crash/{stage}: starting fresh: no intact checkpoint to resume from"]
    assert "resuming" not in rerun.stderr
    assert_same_result(project, stage)


@pytest.mark.e2e
def test_list_neither_tracebacks_nor_promises_a_damaged_checkpoint(project: Path):
    stage = "sft_listed"
    checkpoints = killed_at_step_5(project, stage)
    assert listed_state(project, stage) == f"interrupted (resumes from step 4/{TOTAL})"
    (checkpoints[4] / MANIFEST).write_bytes(b'{"step": 4, "tot\x00\xff')
    assert listed_state(project, stage) == f"interrupted (resumes from step 2/{TOTAL})"
    truncate(checkpoints[2] / WEIGHTS)
    assert listed_state(project, stage) == "interrupted (no intact checkpoint: starts fresh)"


def fake_checkpoint(directory: Path, step: int) -> Path:
    path = directory / f"step-{step}"
    path.mkdir(parents=True)
    (path / WEIGHTS).write_bytes(b"w" * 100)
    (path / "optimizer.bin").write_bytes(b"o" * 200)
    write_manifest(path, step, TOTAL)
    return path


def set_manifest(path: Path, change) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    change(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


DAMAGES = {
    "manifest not json": lambda p: (p / MANIFEST).write_bytes(b"\x00\xff{"),
    "manifest empty": lambda p: (p / MANIFEST).write_text(""),
    "manifest a list": lambda p: (p / MANIFEST).write_text("[]"),
    "manifest without files": lambda p: set_manifest(p, lambda m: m.pop("files")),
    "manifest with no file": lambda p: set_manifest(p, lambda m: m.update(files={})),
    "manifest step a string": lambda p: set_manifest(p, lambda m: m.update(step="4")),
    "manifest of another step": lambda p: set_manifest(p, lambda m: m.update(step=2)),
    "manifest total missing": lambda p: set_manifest(p, lambda m: m.pop("total")),
    "manifest size a string": lambda p: set_manifest(p, lambda m: m["files"][WEIGHTS].update(size="100")),
    "manifest missing": lambda p: (p / MANIFEST).unlink(),
    "weights missing": lambda p: (p / WEIGHTS).unlink(),
    "weights truncated": lambda p: truncate(p / WEIGHTS),
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_checkpoint_is_not_complete_nor_resumable(tmp_path: Path, damage):
    fake_checkpoint(tmp_path, 2)
    damage(fake_checkpoint(tmp_path, 4))
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [2]
    assert resumable(tmp_path) == {"step": 2, "total": TOTAL}
