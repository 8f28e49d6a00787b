"""Params that many stage kinds share: how models load, LoRA, the optimiser, the held-out evaluation; and the names
of the algorithm registries a param may choose from (stages/algorithms.py implements them; a test keeps the two
equal). Pure declarations: pipelines.yaml is checked against them without loading torch."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from stages.kinds import StageParams, named
from stages.registry import EVALUATORS

LRScheduler = Literal["constant", "linear", "cosine"]
EvaluatorName = EVALUATORS.checked_name()
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "drgrpo", "rloo", "reinforce", "reinforce_pp")
OUTCOME_ESTIMATORS = ("grpo", "drgrpo", "rloo", "reinforce")  # those that need no value model
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
AdvantageEstimator = named(ADVANTAGE_ESTIMATORS, "advantage estimator")
OutcomeEstimator = named(OUTCOME_ESTIMATORS, "advantage estimator")
LossAggMode = named(LOSS_AGG_MODES, "loss_agg_mode")
REPLACED_PARAMS = {  # params that no longer exist -> what to do instead (a config naming one fails with it)
    "gradient_accumulation_steps": "replaced by micro_batch_size (rows per forward/backward pass per process; the "
                                   "optimiser batch is batch_size or minibatch_size, split into micro-batches of that "
                                   "many rows): remove it and set micro_batch_size instead",
}


class LoraParams(StageParams):
    """LoRA adapters (Hu et al. 2021): W + (alpha / r) · B A on the target modules, B = 0 at the start."""

    r: int = Field(8, gt=0)  # rank of A and B
    alpha: float = 16.0  # scale numerator
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the adapters' input
    target_modules: list[str] | str = "all-linear"  # module names that get adapters, or "all-linear"
    merge: bool = False  # save merged full weights instead of an adapter directory


class ModelParams(StageParams):
    """How a stage loads its models (every kind that loads one)."""

    dtype: Literal["auto", "bfloat16", "float32"] | None = None  # weights; None: float32 on CPU, "auto" on GPU
    attn_implementation: str | None = None  # e.g. "sdpa", "flash_attention_2"; None: transformers' default
    trust_remote_code: bool = False  # run model code shipped with a Hub checkpoint


class OptimParams(ModelParams):
    """Params of every training kind's optimiser (its `lr` is declared by the kind, with the kind's default)."""

    lr_scheduler: LRScheduler = "constant"  # transformers.get_scheduler, with warmup
    warmup_ratio: float = 0.0  # share of the optimiser steps spent warming the LR up from 0
    micro_batch_size: PositiveInt = 4  # rows per forward/backward pass per process: memory, not the optimiser step
    max_grad_norm: float | None = 1.0  # clip the gradient norm before each optimiser step (None: no clipping)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory, more time)
    checkpoint_every: PositiveInt = 50  # optimiser steps (RL kinds: iterations) between resumable checkpoints
    log_every: PositiveInt = 10  # steps between the training-curve points sent to MLflow (first and last always)
    keep_checkpoints: PositiveInt = 2  # newest checkpoints kept while the stage runs (all removed when it ends)

    @model_validator(mode="before")
    @classmethod
    def replaced_keys(cls, values: Any) -> Any:
        replaced = sorted(set(values) & set(REPLACED_PARAMS)) if isinstance(values, dict) else []
        if replaced:
            raise ValueError("; ".join(f"{key}: {REPLACED_PARAMS[key]}" for key in replaced))
        return values


class LoraTrainingParams(OptimParams):
    """Training kinds that can train LoRA adapters instead of every weight."""

    lora: LoraParams | None = None  # adapters (r, alpha, dropout, target_modules, merge); None: full fine-tuning


class RolloutParams(StageParams):
    """What generates a stage's samples (stages/rollout.py): transformers' `generate` inside the stage, or vLLM
    servers — started by the stage (its own environment, `make vllm`) or already running at `url`."""

    engine: Literal["hf", "vllm"] = "hf"  # hf: the stage's model generates; vllm: vLLM servers generate
    url: str | list[str] | None = None  # vllm: servers a team runs (requests spread over them); None: start one
    tis_cap: float | None = Field(None, gt=0)  # truncated importance sampling: weight tokens by min(π/π_engine, cap)
    threads: PositiveInt | None = None  # CPU threads of a started server; None: every core (it takes turns)
    kv_cache_gib: float = Field(1.0, gt=0)  # CPU: memory of a started server's KV cache (VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)  # GPU: the share of GPU memory a started server takes
    startup_timeout_s: float = Field(600.0, gt=0)  # how long a started server may take to answer /health
    server_args: list[str] = []  # more arguments for a started server (e.g. [--tensor-parallel-size, "2"])
    weights_dir: str | None = None  # where weights are written for the servers to reload (None: the stage's scratch)


class RolloutSettings(StageParams):
    """Kinds that sample from a policy."""

    rollout: RolloutParams = RolloutParams()  # the engine that samples (engine: hf | vllm, url, tis_cap, …)


class PolicyEvalParams(RolloutSettings):
    """Params of the held-out evaluation run after every policy-producing stage (on the `eval` input)."""

    evaluator: EvaluatorName | None = None  # metric set computed on the `eval` prompts (e.g. instruct_gold)
    eval_max_new_tokens: int = 16  # response budget when sampling for evaluation
    eval_samples_per_prompt: int = 2  # samples per held-out prompt
    eval_temperature: float = 1.0  # sampling temperature for evaluation
