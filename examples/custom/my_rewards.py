"""A reward function of your own. pipelines.yaml names it by import path: `rewards: {"my_rewards:brevity": 0.5}`.

A reward takes the completions and, as keyword lists aligned with them, every column of the prompt rows (`answer`,
`language`, …) plus `completion_length`; it returns one float per completion. Keyword-only parameters are set per
stage in `reward_params`. A reward that raises or returns anything else (a string, NaN, too few values) stops the
stage with an error naming it (`my_rewards:brevity`), the stage and the step.
"""

from __future__ import annotations

from typing import Any


def brevity(completions: list[str], *, max_words: int = 12, **columns: Any) -> list[float]:
    """1.0 up to `max_words` words, falling linearly to 0.0 at twice as many."""
    return [max(0.0, min(1.0, 2.0 - len(c.split()) / max_words)) for c in completions]
