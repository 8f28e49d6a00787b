"""Progress lines for the long loops inside a stage (sampling, reference/value scoring, evaluation), where one
optimiser step can take minutes and the step lines of `StageRun.log` say nothing in between.

    with Progress("scoring", total=len(rows), unit="rows") as progress:
        for start in range(0, len(rows), micro_batch):
            ...
            progress.advance(len(chunk), tokens=int(mask.sum()))   # done since the previous call

Contract:
- `advance(done, tokens)` counts `done` items (samples, rows) and `tokens` tokens finished since the previous call.
- A line goes to stderr (where `rl4llm run` streams a stage's output, prefixed `[pipeline/stage]` like the step
  lines) when at least `interval` seconds have passed since the start or since the last line: the first one
  `interval` s after the start, so a loop shorter than that says nothing. Inside `with`, a ticker thread also
  prints when `advance` has not been called for an interval (one forward, e.g. the prefill of a `generate` call on
  long prompts, can outlast it): a line comes at least every `interval` s while the work runs.
- The line: `<what> <done>/<total> <unit>, <tokens/s> tokens/s, <elapsed>s elapsed`, e.g. `sampling 64/128
  samples, 412 tokens/s, 31s elapsed` (tokens/s over the whole loop so far; left out when no tokens were counted).
- Only the main process of a distributed run prints (RANK unset or 0).
- `interval` defaults to RL4LLM_PROGRESS_S (seconds; tests lower it), else 30.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

import torch
from transformers import StoppingCriteria

INTERVAL_ENV = "RL4LLM_PROGRESS_S"
DEFAULT_INTERVAL_S = 30.0


def default_interval() -> float:
    return float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))


class Progress:
    """Throttled progress of one loop of `total` items (see the module's contract)."""

    def __init__(self, what: str, total: int, unit: str = "samples", interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.unit = what, total, unit
        self.interval = default_interval() if interval is None else interval
        self.clock = clock
        self.done = self.tokens = 0
        self.started = self.last = clock()
        self.main = os.environ.get("RANK", "0") == "0"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> "Progress":
        if self.main and self.interval > 0:
            self._ticker = threading.Thread(target=self._tick, name="rl4llm-progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()

    def advance(self, done: int = 0, tokens: int = 0) -> None:
        """Count `done` items and `tokens` tokens finished since the previous call; print a line when one is due."""
        with self._lock:
            self.done += done
            self.tokens += tokens
        self._report_if_due()

    def _tick(self) -> None:
        while not self._stop.wait(min(self.interval, 5.0)):
            self._report_if_due()

    def _report_if_due(self) -> None:
        with self._lock:
            now = self.clock()
            if not self.main or now - self.last < self.interval:
                return
            self.last = now
            line = self.line(now)
        print(line, file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        elapsed = now - self.started
        speed = f", {self.tokens / elapsed:.0f} tokens/s" if self.tokens and elapsed > 0 else ""
        return f"{self.what} {self.done}/{self.total} {self.unit}{speed}, {elapsed:.0f}s elapsed"


class DecodeProgress(StoppingCriteria):
    """A stopping criterion that never stops: it counts, at each decode step of one `generate` call, the tokens the
    unfinished rows generated and the rows that just ended with `eos_id`, and passes them to `progress` (a single
    `generate` on a real model can take minutes). `finished`: the rows that ended so far."""

    def __init__(self, progress: Progress, eos_id: int):
        self.progress, self.eos_id = progress, eos_id
        self.ended: torch.Tensor | None = None  # [B] bool

    @property
    def finished(self) -> int:
        return 0 if self.ended is None else int(self.ended.sum())

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.ended is None:
            self.ended = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        running = ~self.ended
        self.ended = self.ended | (input_ids[:, -1] == self.eos_id)
        self.progress.advance(int((self.ended & running).sum()), tokens=int(running.sum()))
        return torch.zeros_like(self.ended)
