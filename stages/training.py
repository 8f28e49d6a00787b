"""Pieces every training stage shares: held-out policy evaluation params, minibatching, KL to a reference, saving."""

from __future__ import annotations

from typing import Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.algorithms import masked_sum
from stages.context import StageContext
from stages.evaluation import EVALUATORS, evaluate_policy, lm_loss
from stages.kinds import StageParams, named
from stages.models import save
from stages.text import response_logprobs, sample

EvaluatorName = named(EVALUATORS, "evaluator")


class PolicyEvalParams(StageParams):
    """Params of the held-out evaluation run after every policy-producing stage (on the `eval` input)."""

    evaluator: EvaluatorName | None = None
    eval_max_new_tokens: int = 16
    eval_samples_per_prompt: int = 2
    eval_temperature: float = 1.0


def evaluate(ctx: StageContext, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
    """The evaluator's metrics on the `eval` input (and the held-out LM loss on `lm_eval` if wired)."""
    p, metrics = ctx.params, {}
    model = ctx.accelerator.unwrap_model(model)
    if p.evaluator and ctx.has("eval"):
        metrics.update(evaluate_policy(model, tokenizer, ctx.rows("eval"), p.evaluator, p.eval_max_new_tokens,
                                       p.eval_samples_per_prompt, p.eval_temperature))
    if ctx.has("lm_eval"):
        metrics["lm_eval_loss"] = lm_loss(model, tokenizer, [r["text"] for r in ctx.rows("lm_eval")])
    return metrics


@torch.no_grad()
def kl_to_reference(policy: PreTrainedModel, reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    prompts: list[str], max_new_tokens: int) -> float:
    """Monte-Carlo KL(π‖π_ref) per response: mean over samples of Σ_t (log π − log π_ref) (k1, unbiased)."""
    samples = sample(policy, tokenizer, prompts, max_new_tokens)
    batch = samples.batch.to(next(policy.parameters()).device)
    diff = response_logprobs(policy, batch) - response_logprobs(reference, batch)
    return masked_sum(diff, batch.response_mask, dim=1).mean().item()


def optimizer_step(ctx: StageContext, model: PreTrainedModel, optimizer: torch.optim.Optimizer,
                   loss: torch.Tensor, max_grad_norm: float | None = None) -> None:
    """Backward (through accelerate), clip the gradient norm if asked, step, zero the gradients."""
    ctx.accelerator.backward(loss)
    if max_grad_norm is not None:
        ctx.accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()


def minibatches(n: int, size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index minibatches covering range(n) once."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, size):
        yield order[start:start + size]


def save_model(ctx: StageContext, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
               output: str = "model") -> None:
    ctx.accelerator.wait_for_everyone()
    if ctx.accelerator.is_main_process:
        save(ctx.accelerator.unwrap_model(model), tokenizer, ctx.outputs[output])
