"""The step loop of every training kind, made crash-safe: what happens at each step boundary.

    loop = TrainingLoop(ctx, total=p.iterations, rngs=[rng, generator])
    state = loop.resume({"kl_coef": kl_coef})          # the saved values, or these defaults
    for step in loop.steps():                           # from the step after the checkpoint
        ...
        loop.end_step(step, metrics, {"kl_coef": kl_coef})

`end_step` refuses non-finite metrics (the NaN guard), logs, and every `checkpoint_every` steps — or when SIGINT or
SIGTERM asked the stage to stop — saves through `accelerate.save_state` everything the next steps depend on: the
prepared models, optimisers and LR schedules, every RNG (Python, NumPy, torch; per rank), plus the loop's own state
(the step, its generators, values such as an adaptive KL coefficient), per rank. Resuming loads it all back, so the
resumed run takes exactly the steps the uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from stages.checkpoint import PROGRESS_FILE, complete_checkpoints, remove
from stages.context import StageContext

FAULT_ENV = "RL4LLM_FAULT"  # tests only: `<point>:<step>` makes the stage SIGKILL itself there
_stop_signal: int | None = None  # the signal that asked the running loop to stop
_loop_active = False
current_step: tuple[int, int] | None = None  # (step, total) of the running loop, for error messages


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped the stage (after a checkpoint when inside a training loop)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class NonFinite(Exception):
    """A loss, gradient norm or reward was NaN or infinite: the stage stops and publishes nothing."""


def _request_stop(signum: int, _frame: Any) -> None:
    global _stop_signal
    if _stop_signal is not None:  # already stopping (a second signal must not break the checkpoint or cleanup)
        return
    _stop_signal = signum
    if not _loop_active:  # outside a training loop there is no step boundary to wait for
        raise Interrupted(signum, f"stopped by {signal.Signals(signum).name}")


def install_stop_handlers() -> None:
    """SIGINT and SIGTERM stop the stage at the next step boundary (at once outside a training loop)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _request_stop)


def check_finite(label: str, values: dict[str, float]) -> None:
    """The NaN guard: raise `NonFinite` naming the stage `label`, the running step and the non-finite terms."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        where = f"{label} step {current_step[0]}/{current_step[1]}" if current_step else label
        raise NonFinite(f"{where}: non-finite " + ", ".join(f"{k}={v}" for k, v in sorted(bad.items())))


def fault_point(point: str, step: int) -> None:
    """Tests inject crashes here: with RL4LLM_FAULT=`<point>:<step>` the process SIGKILLs itself."""
    if os.environ.get(FAULT_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


class TrainingLoop:
    """Steps 1..total of a stage: NaN guard, logging, checkpoints every `checkpoint_every` steps (the last
    `keep_checkpoints` kept), stop on SIGINT/SIGTERM after a checkpoint, exact resume."""

    def __init__(self, ctx: StageContext, total: int, rngs: list[random.Random | torch.Generator] = ()):
        self.ctx, self.total, self.rngs = ctx, total, list(rngs)
        self.every = ctx.params.checkpoint_every
        self.keep = ctx.params.keep_checkpoints
        self.directory: Path | None = ctx.checkpoint_dir
        self.start = 0

    @property
    def label(self) -> str:
        return f"{self.ctx.pipeline}/{self.ctx.stage}"

    def resume(self, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """Load the newest whole checkpoint, if any: models, optimisers, schedules and RNGs in place; returns its
        loop state (else `defaults`)."""
        global _loop_active
        _loop_active = True
        found = complete_checkpoints(self.directory) if self.directory else []
        if not found:
            return dict(defaults or {})
        self.start, path = found[-1]
        acc = self.ctx.accelerator
        acc.load_state(str(path))
        saved = torch.load(path / f"loop_{acc.process_index}.pt", weights_only=False)
        for rng, state in zip(self.rngs, saved["rngs"]):
            rng.setstate(state) if isinstance(rng, random.Random) else rng.set_state(state)
        if acc.is_main_process:
            print(f"{self.label}: resuming from step {self.start}/{self.total}", file=sys.stderr, flush=True)
        self.ctx.tracker.tag({"resumed_from_step": str(self.start)})
        return saved["state"]

    def steps(self) -> Iterator[int]:
        global _loop_active, current_step
        _loop_active = True
        try:
            for step in range(self.start + 1, self.total + 1):
                current_step = (step, self.total)
                yield step
        finally:
            _loop_active = False

    def end_step(self, step: int, metrics: dict[str, float], state: dict[str, Any] | None = None) -> None:
        """After step `step`: refuse non-finite metrics, log them, checkpoint when due or asked to stop."""
        check_finite(self.label, metrics)
        self.ctx.tracker.log(step, metrics, self.total)
        fault_point("step", step)
        stop = self._stop_requested()
        if step < self.total and self.directory and (stop or step % self.every == 0):
            self._save(step, state or {})
        if stop:
            name = signal.Signals(stop).name
            raise Interrupted(stop, f"{self.label}: stopped by {name} after step {step}/{self.total}"
                              + ("; checkpoint saved" if step < self.total else ""))

    def _stop_requested(self) -> int:
        """The stop signal, agreed by every rank (one asked: all stop at this boundary)."""
        acc = self.ctx.accelerator
        if acc.num_processes == 1:
            return _stop_signal or 0
        return int(acc.gather(torch.tensor([_stop_signal or 0], device=acc.device)).max().item())

    def _save(self, step: int, state: dict[str, Any]) -> None:
        acc = self.ctx.accelerator
        partial = self.directory / f"step-{step}.tmp"
        if acc.is_main_process:
            remove(partial)
        acc.wait_for_everyone()
        acc.save_state(str(partial), safe_serialization=False)
        rngs = [rng.getstate() if isinstance(rng, random.Random) else rng.get_state() for rng in self.rngs]
        torch.save({"rngs": rngs, "state": state}, partial / f"loop_{acc.process_index}.pt")
        fault_point("saving", step)
        acc.wait_for_everyone()
        if acc.is_main_process:
            (partial / PROGRESS_FILE).write_text(json.dumps({"step": step, "total": self.total}))
            partial.rename(self.directory / f"step-{step}")
            for _, old in complete_checkpoints(self.directory)[:-self.keep]:
                remove(old)
        acc.wait_for_everyone()
