"""Scripted labelers: stand-ins for the human rankers of InstructGPT, chosen by name.

A labeler maps (prompt, K responses) to ranks, 0 = best; equal ranks are ties (skipped by the RM loss).
"""

from __future__ import annotations

from typing import Callable

from stages import instruct_task, reasoning_task

Labeler = Callable[[str, list[str]], list[int]]

LABELERS: dict[str, Labeler] = {"instruct_gold": instruct_task.rank_by_gold,
                                "reasoning_general": reasoning_task.rank_general}
