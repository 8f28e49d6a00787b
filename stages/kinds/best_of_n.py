"""Best-of-N evaluation: accuracy vs N for pass@1, majority voting, ORM and PRM reranking, and pass@N (the figure of
Lightman et al. 2023 and Math-Shepherd).

Declared here (what pipelines.yaml may set); how it works: stages/runs/best_of_n.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import PositiveInt, model_validator

from stages.kinds import Input, named
from stages.params import ModelParams, RolloutSettings
from stages.rewards import build_reward
from stages.selection import STEP_AGGREGATIONS
from stages.verifier_params import RewardName

Aggregation = named(STEP_AGGREGATIONS, "step aggregation")


class Params(ModelParams, RolloutSettings):
    n: PositiveInt = 16  # N_max: samples per problem; accuracy is reported at N = 1, 2, 4, …, N_max
    prompts: PositiveInt | None = None  # problems evaluated (None: all; global: each process samples its share)
    max_new_tokens: int = 24  # response budget
    max_prompt_length: int | None = None  # prompt tokens kept (cut from the left); None: all
    temperature: float = 0.7  # sampling temperature
    verifier_reward: RewardName = "accuracy"  # reward judging a sample correct (score >= 1): accuracy, math_verify…
    verifier_reward_params: dict[str, Any] = {}  # its keyword params, e.g. {mode: strict}
    mode: Literal["strict", "lenient"] = "strict"  # answer voted on: in <answer> tags; lenient: else last number/line
    aggregations: list[Aggregation] = list(STEP_AGGREGATIONS)  # PRM step scores -> solution score: min, prod, last
    draws: PositiveInt = 64  # subsets of size N averaged per problem (all of them when there are at most this many)
    micro_batch_size: PositiveInt = 16  # rows per verifier / PRM forward pass

    @model_validator(mode="after")
    def reward_builds(self) -> "Params":
        build_reward(self.verifier_reward, **self.verifier_reward_params)  # unknown or bad params fail here
        return self

    @model_validator(mode="after")
    def aggregations_distinct(self) -> "Params":
        if len(set(self.aggregations)) != len(self.aggregations):
            raise ValueError(f"aggregations must not repeat a name, got {self.aggregations}")
        return self


INPUTS = {
    "policy": Input("checkpoint to sample the N solutions from", model=True),
    "prompts": Input("held-out problems with their reference `answer`", columns=("prompt", "answer")),
    "verifier": Input("outcome verifier (a `verifier` stage's model) to rerank by; absent: no `orm` curve",
                      required=False, model=True),
    "prm": Input("process reward model (a `prm` stage's model) to rerank by its aggregated step scores; absent: no "
                 "`prm_*` curves", required=False, model=True),
}
OUTPUTS = {"curves": "curves.json", "samples": "samples.jsonl"}
KEY_METRICS = ("pass1", "majority", "orm", "prm_min", "prm_prod", "prm_last", "oracle")  # `rl4llm compare` shows these

run = "stages.runs.best_of_n:run"  # what a stage of this kind does
