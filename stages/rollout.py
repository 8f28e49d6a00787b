"""One rollout interface for every kind that samples (grpo, ppo, rejection_sampling, label_preferences and the
held-out evaluators): `rollout: {engine: hf | vllm, …}` in a stage's params picks the engine (`RolloutEngine` in
stages/text.py); both give the same `Samples` — token ids, lengths, EOS or cut at max_new_tokens, and, when asked,
the engine's per-token log-probs.

`hf` (the default) generates with transformers on the stage's own model. `vllm` (stages/vllm_engine.py) generates
on vLLM servers that hold a copy of the policy's weights, pushed after every optimiser update. The trainer still
computes π_old with its own forward, so the engine/trainer log-prob gap is measurable (`logprob_gap`) and correctable
(`truncated_importance_weights`, as verl and TRL do).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from transformers import PreTrainedTokenizerBase

from stages.algorithms import masked_mean
from stages.distributed import broadcast_object
from stages.params import RolloutParams
from stages.text import Generation, RolloutEngine, batched, hf_generate, pair_batch, response_logprobs

if TYPE_CHECKING:
    from stages.context import StageContext

ROLLOUT_DIR = Path(".rl4llm") / "rollout"  # a stage's scratch (a started server's weights), under the project root
LOG_DIR = Path(".rl4llm") / "logs"


class HFEngine:
    """`RolloutEngine` on the stage's own model: transformers' `generate` (`hf_generate`); log-probs, when asked,
    from one more forward of the sampled rows (so they are the trainer's own)."""

    name = "hf"

    def __init__(self, micro_batch_size: int = 4, report: Callable[[dict[str, str]], None] | None = None):
        self.micro_batch_size = micro_batch_size
        self.report = report  # receives `describe()` when the engine closes (the stage's MLflow tags)

    def generate(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]],
                 max_new_tokens: int, temperature: float, logprobs: bool = False, what: str = "sampling"
                 ) -> list[Generation]:
        rows = hf_generate(model, tokenizer, prompt_ids, max_new_tokens, temperature, what=what)
        if not logprobs:
            return [Generation(row) for row in rows]
        batch = pair_batch(prompt_ids, rows, tokenizer.pad_token_id).to(next(model.parameters()).device)
        with torch.no_grad():
            values = batched(lambda part: response_logprobs(model, part, temperature), batch, self.micro_batch_size,
                             "sampling log-probs").tolist()
        return [Generation(row, values[i][:len(row)]) for i, row in enumerate(rows)]

    def describe(self) -> dict[str, str]:
        import transformers

        return {"rollout.engine": "hf", "rollout.engine_version": transformers.__version__}

    def close(self) -> None:
        if self.report:
            self.report(self.describe())


def stage_engine(ctx: StageContext) -> RolloutEngine:
    """The stage's rollout engine, opened on first use and kept in `ctx.opened` (the runner's `ctx.close()` stops
    it, and tags the stage's MLflow run with what it was)."""
    if "engine" not in ctx.opened:
        ctx.opened["engine"] = open_engine(ctx)
    return ctx.opened["engine"]


def open_engine(ctx: StageContext) -> RolloutEngine:
    """The engine the stage's `rollout` params ask for (hf when the kind has none)."""
    rollout = getattr(ctx.params, "rollout", None)
    report = ctx.tracker.tag if ctx.accelerator.is_main_process else None
    if rollout is None or rollout.engine == "hf":
        return HFEngine(getattr(ctx.params, "micro_batch_size", 4), report)
    from stages.vllm_engine import VLLMEngine

    root = Path.cwd()
    acc = ctx.accelerator
    name = f"{ctx.pipeline}.{ctx.stage}"
    return VLLMEngine(rollout, ctx.seed, root / ROLLOUT_DIR / name, root / LOG_DIR / f"{name}.vllm.log", root,
                      is_main=acc.is_main_process, share=lambda value: broadcast_object(acc, value), report=report)


def logprob_gap(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor
                ) -> dict[str, float]:
    """How far the engine's log-probs of the sampled tokens are from the trainer's, over the response tokens
    ([B, R] each): the mean and max of |log π_trainer − log π_engine|."""
    gap = (trainer_logprobs - engine_logprobs).abs() * mask
    return {"logprob_gap_mean": masked_mean(gap, mask).item(), "logprob_gap_max": gap.max().item()}


def wants_logprobs(rollout: RolloutParams) -> bool:
    """Whether a stage sampling with `rollout` asks its engine for log-probs: when the engine is not the trainer
    (the gap is logged) or truncated importance sampling weighs tokens by them."""
    return rollout.engine != "hf" or rollout.tis_cap is not None

