"""PPO-ptx (InstructGPT §3.5, eq. 2), optionally with a trained PRM's step rewards (Math-Shepherd §4, step-by-step
PPO) or with rollouts that call tools (Search-R1's PPO: the tools' text is masked from every loss).

Declared here (what pipelines.yaml may set); how it works: stages/runs/ppo.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import PositiveInt

from stages.kinds import Input
from stages.params import AdvantageEstimator, LoraTrainingParams, PolicyEvalParams
from stages.tool_params import INDEX_INPUT, PolicyToolSettings


class Params(LoraTrainingParams, PolicyEvalParams, PolicyToolSettings):
    iterations: int = 30  # rollout + update rounds
    rollout_prompts: int = 64  # prompts per rollout, global across processes
    samples_per_prompt: int = 1  # responses per prompt (> 1 for the group-based estimators)
    ppo_epochs: int = 4  # passes over each rollout buffer
    minibatch_size: int = 16  # samples per optimiser step, global across processes
    max_new_tokens: int = 12  # response budget
    max_prompt_length: int | None = None  # prompt tokens kept (cut from the left); None: all
    temperature: float = 1.0  # sampling temperature; log-probs for the ratio and the KL use the same
    lr: float = 5e-5  # policy AdamW learning rate
    value_lr: float = 1e-4  # value model AdamW learning rate
    advantage_estimator: AdvantageEstimator = "gae"  # gae uses a value model; the others do not
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE λ
    whiten_advantages: bool = True  # whiten advantages over the gathered batch
    clip_eps: float = 0.2  # ratio clip ε
    value_clip_eps: float = 0.2  # value clip around the old values
    kl_coef: float = 0.05  # β of the per-token KL penalty in the reward
    prm_coef: float = 1.0  # with a `prm` input: weight of its step scores, token rewards at each step's last token
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"  # KL estimator of that penalty
    adaptive_kl: bool = False  # adapt β towards `kl_target` (Ziegler et al. 2019)
    kl_target: float = 1.0  # target KL per response for the adaptive β
    kl_horizon: int = 10000  # horizon of the adaptive β
    checkpoint_every: PositiveInt = 10  # iterations between resumable checkpoints
    log_every: PositiveInt = 1  # iterations between the training-curve points sent to MLflow
    ptx_coef: float = 1.0  # λ_ptx: weight of the pretraining LM loss (0: plain PPO)
    ptx_batch_size: int = 16  # pretraining texts per policy optimiser step, global across processes


INPUTS = {
    "policy": Input("initial policy; the frozen reference is loaded from the same checkpoint (with LoRA: the "
                    "policy with adapters off)", model=True),
    "reward": Input("reward model (its stored normalization bias is applied); with LoRA and GAE it is also the "
                    "value model's base, and scores with the value adapters off", model=True),
    "prompts": Input("RL prompts", columns=("prompt",)),
    "prm": Input("trained process reward model (a `prm` stage's): its step scores, times prm_coef, are token rewards "
                 "at the step ends", required=False, model=True),
    "ptx": Input("pretraining corpus for the ptx term", required=False, columns=("text",)),
    "lm_eval": Input("held-out pretraining text: final `ptx_lm_loss` (the alignment tax)", required=False,
                     columns=("text",)),
    "eval": Input("held-out prompts for the evaluator", required=False, columns=("prompt",)),
    "index": INDEX_INPUT,
}
OUTPUTS = {"model": "model"}
KEY_METRICS = ("gold_score", "accuracy", "kl", "reward", "ptx_lm_loss")  # `rl4llm compare` shows these

run = "stages.runs.ppo:run"  # what a stage of this kind does
