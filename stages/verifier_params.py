"""Params of the kinds that judge sampled solutions by a verifier reward (label_outcomes, label_steps,
rejection_sampling, best_of_n). Apart from stages/params.py so that only those kinds' code depends on the rewards."""

from __future__ import annotations

from typing import Any

from pydantic import model_validator

from stages.kinds import StageParams
from stages.registry import REWARDS
from stages.rewards import build_reward

RewardName = REWARDS.checked_name()


class VerifierSettings(StageParams):
    """Kinds that judge sampled solutions by a verifier reward: a solution is correct when it scores at least
    `min_score`."""

    verifier: RewardName = "accuracy"  # the reward judging a solution: accuracy, reasoning_gym, math_verify or yours
    verifier_params: dict[str, Any] = {}  # its keyword params, e.g. {mode: strict} (the answer in <answer> tags)
    min_score: float = 1.0  # a solution is correct when the verifier scores it at least this

    @model_validator(mode="after")
    def verifier_builds(self) -> "VerifierSettings":
        build_reward(self.verifier, **self.verifier_params)  # unknown or bad params fail here, naming them
        return self
