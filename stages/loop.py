"""The step loop of every training kind, made crash-safe: what happens at each step boundary.

    loop = TrainingLoop(ctx, total=p.iterations, rngs=[rng, generator])
    state = loop.resume({"kl_coef": kl_coef})          # the saved values, or these defaults
    for step in loop.steps():                           # from the step after the checkpoint
        ...
        loop.saw(row_ids)                               # traced for the tests when RL4LLM_TRACE_DIR is set
        loop.end_step(step, metrics, {"kl_coef": kl_coef})

`end_step` refuses non-finite metrics (the NaN guard), logs, and every `checkpoint_every` steps — or when SIGINT or
SIGTERM asked the stage to stop — saves through `accelerate.save_state` everything the next steps depend on: the
prepared models, optimisers and LR schedules, every RNG (Python, NumPy, torch; per rank), plus the loop's own state
(the step, its generators, values such as an adaptive KL coefficient), per rank; the main process then writes the
checkpoint's manifest (every rank's files, with sizes and hashes). Resuming verifies the newest checkpoint against its
manifest, falls back to the newest intact one (saying which it skipped and why), and loads it all back, so the
resumed run takes exactly the steps the uninterrupted one would have.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate.utils import broadcast_object_list, gather_object

from stages.checkpoint import Corrupt, complete_checkpoints, intact, remove, saved_checkpoints, verified, write_manifest
from stages.context import StageContext
from stages.distributed import TRACE_DIR_ENV, write_trace
from stages.processes import Interrupted, defer_stops, stop_signal

FAULT_ENV = "RL4LLM_FAULT"  # tests only: `<point>:<step>` makes the stage SIGKILL itself there
current_step: tuple[int, int] | None = None  # (step, total) of the running loop, for error messages


class NonFinite(Exception):
    """A loss, gradient norm or reward was NaN or infinite: the stage stops and publishes nothing."""


def at_step(label: str) -> str:
    """How errors name where they happened: the stage `label`, and the running step if a loop runs."""
    return f"{label} step {current_step[0]}/{current_step[1]}" if current_step else label


def check_finite(label: str, values: dict[str, float]) -> None:
    """The NaN guard: raise `NonFinite` naming the stage `label`, the running step and the non-finite terms."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        where = at_step(label)
        raise NonFinite(f"{where}: non-finite " + ", ".join(f"{k}={v}" for k, v in sorted(bad.items())))


def fault_point(point: str, step: int) -> None:
    """Tests inject crashes here: with RL4LLM_FAULT=`<point>:<step>` the process SIGKILLs itself."""
    if os.environ.get(FAULT_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def say(line: str) -> None:
    """Tell the user `line` (on stderr)."""
    print(line, file=sys.stderr, flush=True)


class TrainingLoop:
    """Steps 1..total of a stage: NaN guard, logging, checkpoints every `checkpoint_every` steps (the last
    `keep_checkpoints` kept), stop on SIGINT/SIGTERM after a checkpoint, exact resume."""

    def __init__(self, ctx: StageContext, total: int, rngs: list[random.Random | torch.Generator] = ()):
        self.ctx, self.total, self.rngs = ctx, total, list(rngs)
        self.every = ctx.params.checkpoint_every
        self.keep = ctx.params.keep_checkpoints
        self.directory: Path | None = ctx.checkpoint_dir
        self.start = 0
        self.rows_seen: list[Any] | None = [] if os.environ.get(TRACE_DIR_ENV) else None

    def resume(self, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """Load the newest intact checkpoint, if any: models, optimisers, schedules and RNGs in place; returns its
        loop state (else `defaults`). From here on, SIGINT / SIGTERM wait for a step boundary."""
        defer_stops(True)
        acc = self.ctx.accelerator
        chosen = [self._newest_intact() if acc.is_main_process and self.directory else 0]  # the main process checks
        self.start = broadcast_object_list(chosen)[0] if acc.num_processes > 1 else chosen[0]
        if self.start and acc.num_processes > 1:
            self.start = self._held_by_every_rank(self.start)
        if not self.start:
            return dict(defaults or {})
        path = self.directory / f"step-{self.start}"
        acc.load_state(str(path))
        saved = torch.load(path / f"loop_{acc.process_index}.pt", weights_only=False)
        for rng, state in zip(self.rngs, saved["rngs"]):
            rng.setstate(state) if isinstance(rng, random.Random) else rng.set_state(state)
        self.rows_seen = saved["rows_seen"]
        if acc.is_main_process:
            say(f"{self.ctx.label}: resuming from step {self.start}/{self.total}")
        self.ctx.tracker.tag({"resumed_from_step": str(self.start)})
        return saved["state"]

    def _held_by_every_rank(self, step: int) -> int:
        """`step` if every rank finds its checkpoint intact, else 0 (a fresh start on every rank, said once): ranks
        on machines that do not share `.rl4llm/checkpoints` see none of machine 0's files."""
        acc = self.ctx.accelerator
        held = gather_object([self.directory is not None and intact(self.directory / f"step-{step}")])
        lacking = [str(rank) for rank, has in enumerate(held) if not has]
        if lacking and acc.is_main_process:  # its checkpoints are of no use to them, and would block new ones
            say(f"{self.ctx.label}: starting fresh: rank(s) {', '.join(lacking)} cannot read the checkpoint at step "
                f"{step} (on several machines, `.rl4llm/checkpoints` must be a filesystem every machine mounts at "
                "the same path); removed the checkpoints")
            for _, old in saved_checkpoints(self.directory):
                remove(old)
        return 0 if lacking else step

    def _newest_intact(self) -> int:
        """The step of the newest checkpoint whose files all match their manifest (0: none). Each one skipped is
        removed and said in one line, with why; when none is left, so is the fresh start."""
        skipped = 0
        for step, path in reversed(saved_checkpoints(self.directory)):
            try:
                verified(path, contents=True)
                return step
            except Corrupt as e:
                say(f"{self.ctx.label}: skipping the checkpoint at step {step}: {e}; removed it")
                remove(path)
                skipped += 1
        if skipped:
            say(f"{self.ctx.label}: starting fresh: no intact checkpoint to resume from")
        return 0

    def steps(self) -> Iterator[int]:
        """The steps still to take; when all are taken, the rows seen are traced (RL4LLM_TRACE_DIR)."""
        global current_step
        defer_stops(True)
        try:
            for step in range(self.start + 1, self.total + 1):
                current_step = (step, self.total)
                yield step
        finally:
            defer_stops(False)
            current_step = None
        if self.rows_seen is not None:
            write_trace(self.ctx.accelerator, f"{self.ctx.pipeline}.{self.ctx.stage}", self.rows_seen)

    def saw(self, row_ids: list[Any]) -> None:
        """Record the rows this rank trained on in this step (kept only when tracing)."""
        if self.rows_seen is not None:
            self.rows_seen += row_ids

    def end_step(self, step: int, metrics: dict[str, float], state: dict[str, Any] | None = None) -> None:
        """After step `step`: refuse non-finite metrics, log them (to MLflow every `log_every` steps), checkpoint
        when due or asked to stop (then
        raise `Interrupted`). `state`: the loop's own values to resume with."""
        check_finite(self.ctx.label, metrics)
        every = self.ctx.params.log_every
        self.ctx.tracker.log(step, metrics, self.total, record=step % every == 0 or step in (1, self.total))
        fault_point("step", step)
        stop = self._stop_requested()
        if self.directory and (stop or (step % self.every == 0 and step < self.total)):
            self._save(step, state or {})
        if stop:
            raise Interrupted(stop, f"{self.ctx.label}: stopped by {signal.Signals(stop).name} after step "
                                    f"{step}/{self.total}; checkpoint saved")

    def _stop_requested(self) -> int:
        """The stop signal, agreed by every rank (one asked: all stop at this boundary)."""
        acc, mine = self.ctx.accelerator, stop_signal() or 0
        if acc.num_processes == 1:
            return mine
        return int(acc.gather(torch.tensor([mine], device=acc.device)).max().item())

    def _save(self, step: int, state: dict[str, Any]) -> None:
        acc = self.ctx.accelerator
        partial = self.directory / f"step-{step}.tmp"
        if acc.is_main_process:
            remove(partial)
        acc.wait_for_everyone()
        acc.save_state(str(partial), safe_serialization=False)
        rngs = [rng.getstate() if isinstance(rng, random.Random) else rng.get_state() for rng in self.rngs]
        torch.save({"rngs": rngs, "state": state, "rows_seen": self.rows_seen},
                   partial / f"loop_{acc.process_index}.pt")
        fault_point("saving", step)
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_manifest(partial, step, self.total)
            partial.rename(self.directory / f"step-{step}")
            for _, old in complete_checkpoints(self.directory)[:-self.keep]:
                remove(old)
        acc.wait_for_everyone()
