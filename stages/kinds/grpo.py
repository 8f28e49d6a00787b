"""GRPO (DeepSeekMath, Shao et al. 2024, §4) with the Dr.GRPO (Liu et al. 2025) and DAPO (Yu et al. 2025) options:
the RL stage of DeepSeek-R1-Zero and DeepSeek-R1 (DeepSeek-AI 2025).

Declared here (what pipelines.yaml may set); how it works: stages/runs/grpo.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import PositiveInt, field_validator, model_validator

from stages.judge import JUDGE_REWARD, JudgeParams
from stages.kinds import Input
from stages.params import LoraTrainingParams, LossAggMode, OutcomeEstimator, PolicyEvalParams
from stages.registry import STEP_REWARDS, VERIFIER_EVALUATORS
from stages.rewards import RewardConfigError, build_reward, reward_fn
from stages.tool_params import INDEX_INPUT, PolicyToolSettings

MODEL_REWARD = "reward_model"  # the reward scored by the `reward` input
PRM_STEP_REWARD = "prm"  # the step reward scored by the `prm` input (a trained process reward model)
RESERVED_REWARDS = {MODEL_REWARD: "scored by the `reward` input",
                    JUDGE_REWARD: "asked of the `judge` input or judge.url"}  # rewards scored by a model


class Params(LoraTrainingParams, PolicyEvalParams, PolicyToolSettings):
    iterations: int = 20  # rollout + update rounds
    checkpoint_every: PositiveInt = 10  # iterations between resumable checkpoints
    log_every: PositiveInt = 1  # iterations between the training-curve points sent to MLflow
    prompts_per_step: int = 16  # prompts (groups) per rollout, global across processes
    samples_per_prompt: int = 8  # G: responses per prompt
    ppo_epochs: int = 1  # μ: optimisation passes over each rollout batch
    minibatch_size: int = 64  # samples per optimiser step, global across processes
    max_new_tokens: int = 24  # response budget
    max_prompt_length: int | None = None  # prompt tokens kept (cut from the left); None: all
    temperature: float = 1.0  # sampling temperature; log-probs for the ratio and the KL use the same
    lr: float = 1e-4  # AdamW learning rate
    advantage: Literal["outcome", "process"] = "outcome"  # outcome or process supervision (rule or trained PRM)
    step_reward: str | None = None  # with advantage: process, what scores each step: a rule (arithmetic_steps) or prm
    advantage_estimator: OutcomeEstimator = "grpo"  # how outcome rewards become advantages
    loss_agg_mode: LossAggMode | None = None  # default: seq-mean-token-sum-norm for drgrpo, else seq-mean-token-mean
    clip_low: float = 0.2  # ratio clip below 1
    clip_high: float | None = None  # DAPO clip-higher (e.g. 0.28); None = clip_low
    kl_coef: float = 0.04  # β; 0 keeps no reference model
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # KL estimator inside the loss
    rewards: dict[str, float] = {"accuracy": 1.0, "format": 0.5}  # name -> weight
    judge: JudgeParams = JudgeParams()  # the `judge` reward (template, max_score, max_new_tokens, url, timeout_s, …)
    reward_params: dict[str, dict[str, Any]] = {}  # name -> keyword params, e.g. overlong: {max_length, buffer}
    reward_model_score_on: Literal["full", "answer"] = "answer"  # what the `reward_model` reward scores
    route_column: str | None = None  # e.g. "task"
    routes: dict[str, list[str]] = {}  # column value -> the rewards its rows get
    dynamic_sampling: bool = False  # DAPO: drop groups with equal rewards and sample more
    max_sampling_rounds: int = 3  # sampling rounds per step with dynamic sampling
    mask_truncated: bool = False  # DAPO overlong filtering: no loss on samples cut at max_new_tokens

    @field_validator("rewards")
    @classmethod
    def known_rewards(cls, rewards: dict[str, float]) -> dict[str, float]:
        if not rewards:
            raise ValueError("no rewards given")
        for name in sorted(set(rewards) - set(RESERVED_REWARDS)):
            try:
                reward_fn(name)  # an unknown name, or an import path that does not load, fails here
            except RewardConfigError as e:
                reserved = ", ".join(f"'{n}' ({what})" for n, what in RESERVED_REWARDS.items())
                raise ValueError(f"{e}; or {reserved}") from None
        return rewards

    @field_validator("step_reward")
    @classmethod
    def known_step_reward(cls, name: str | None) -> str | None:
        if name is None or name == PRM_STEP_REWARD or name in STEP_REWARDS:
            return name
        try:
            STEP_REWARDS.load(name)  # an unknown name, or an import path that does not load, fails here
        except ValueError as e:
            raise ValueError(f"{e}; or '{PRM_STEP_REWARD}' (the `prm` input's step scores)") from None
        return name

    @model_validator(mode="after")
    def consistent_rewards(self) -> "Params":
        for name, params in self.reward_params.items():
            if name in RESERVED_REWARDS:
                raise ValueError(f"reward_params for '{name}', which takes none"
                                 + (" (its settings are the `judge` params)" if name == JUDGE_REWARD else ""))
            if name not in self.rewards:
                raise ValueError(f"reward_params for '{name}', which is not in rewards {sorted(self.rewards)}")
            build_reward(name, **params)  # fails here on unknown or bad parameters
        if (self.advantage == "process") != (self.step_reward is not None):
            raise ValueError("advantage: process needs a step_reward (and only it uses one)")
        if self.judge != JudgeParams() and JUDGE_REWARD not in self.rewards:  # (a resolved spec has the defaults)
            raise ValueError(f"judge params are set but '{JUDGE_REWARD}' is not in rewards {sorted(self.rewards)}")
        if bool(self.route_column) != bool(self.routes):
            raise ValueError("route_column and routes go together")
        for route, names in self.routes.items():
            if set(names) - set(self.rewards):
                raise ValueError(f"route '{route}' names rewards {sorted(set(names) - set(self.rewards))} that are "
                                 f"not in rewards {sorted(self.rewards)}")
        unrouted = set(self.rewards) - {n for names in self.routes.values() for n in names}
        if self.routes and unrouted:
            raise ValueError(f"rewards {sorted(unrouted)} are in no route")
        return self

    @model_validator(mode="after")
    def verifier_evaluates(self) -> "Params":
        """Unless `evaluator` says otherwise, a stage rewarded by a library verifier is evaluated by the same one."""
        if self.evaluator is None:
            self.evaluator = next((VERIFIER_EVALUATORS[n] for n in self.rewards if n in VERIFIER_EVALUATORS), None)
        return self

    @property
    def agg_mode(self) -> str:
        default = "seq-mean-token-sum-norm" if self.advantage_estimator == "drgrpo" else "seq-mean-token-mean"
        return self.loss_agg_mode or default


INPUTS = {
    "policy": Input("initial policy, also the frozen KL reference (with LoRA: the policy with adapters off)",
                    model=True),
    "prompts": Input("RL prompts; every other column (answer, language, task…) is passed to the rewards",
                     columns=("prompt",)),
    "reward": Input("trained reward model, for the `reward_model` reward", required=False, model=True),
    "prm": Input("trained process reward model (a `prm` stage's), for step_reward: prm", required=False, model=True),
    "judge": Input("causal LM asked the `judge` reward's question (greedy); or judge.url", required=False,
                   model=True),
    "eval": Input("held-out prompts for the evaluator", required=False, columns=("prompt",)),
    "index": INDEX_INPUT,
}
OUTPUTS = {"model": "model"}
# `rl4llm compare` shows these
KEY_METRICS = ("accuracy", "accuracy_strict", "accuracy_lenient", "format_rate", "language_consistency", "kl")

run = "stages.runs.grpo:run"  # what a stage of this kind does
