"""Resuming a stage whose ranks may not share `.rl4llm/checkpoints` (machines with their own disks): the checkpoint
machine 0 chose is resumed only if every rank finds it intact; otherwise every rank starts fresh, saying so once."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stages import loop
from stages.checkpoint import saved_checkpoints, write_manifest


def two_rank_loop(directory: Path, held: list[bool], monkeypatch) -> tuple[loop.TrainingLoop, list[str]]:
    """A TrainingLoop as rank 0 of 2 sees it, with checkpoint step-2 intact on its disk, whose peers report
    `held` (whether each rank finds that checkpoint intact); returns it and what it said."""
    checkpoint = directory / "step-2"
    checkpoint.mkdir(parents=True)
    torch.save({"rngs": [], "state": {"resumed": True}, "rows_seen": None}, checkpoint / "loop_0.pt")
    write_manifest(checkpoint, 2, 4)
    loaded: list[str] = []
    accelerator = SimpleNamespace(num_processes=2, is_main_process=True, process_index=0, load_state=loaded.append)
    params = SimpleNamespace(checkpoint_every=2, keep_checkpoints=2)
    ctx = SimpleNamespace(accelerator=accelerator, params=params, checkpoint_dir=directory, label="dist/sft",
                          tracker=SimpleNamespace(tag=lambda tags: None))
    said: list[str] = []
    monkeypatch.setattr(loop, "broadcast_object_list", lambda chosen: chosen)  # rank 0's choice, as broadcast
    monkeypatch.setattr(loop, "gather_object", lambda mine: [mine[0] and held[0], *held[1:]])
    monkeypatch.setattr(loop, "say", said.append)
    return loop.TrainingLoop(ctx, total=4), said


@pytest.mark.parametrize("held", [[True, True], [True, False]], ids=["shared", "machine 1 lacks it"])
def test_a_checkpoint_is_resumed_only_where_every_rank_holds_it(tmp_path: Path, monkeypatch, held: list[bool]):
    training, said = two_rank_loop(tmp_path / "checkpoints", held, monkeypatch)
    state = training.resume({"fresh": True})
    try:
        if all(held):
            assert (training.start, state) == (2, {"resumed": True})
            assert said == ["dist/sft: resuming from step 2/4"]
        else:
            assert (training.start, state) == (0, {"fresh": True})
            assert said == ["dist/sft: starting fresh: rank(s) 1 cannot read the checkpoint at step 2 (on several "
                            "machines, `.rl4llm/checkpoints` must be a filesystem every machine mounts at the same "
                            "path); removed the checkpoints"]
            assert saved_checkpoints(tmp_path / "checkpoints") == []  # a new step-2 can be saved in its place
    finally:
        loop.defer_stops(False)
