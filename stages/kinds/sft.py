"""Supervised fine-tuning: next-token loss on the response tokens only (prompt masked), chat template applied.

Data are sharded over processes by accelerate: with N processes each takes `batch_size / N` rows per step, so an
N-process run sees the same global batches as a 1-process run.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from torch.utils.data import DataLoader

from stages.algorithms import masked_mean
from stages.context import StageContext
from stages.kinds import Input
from stages.models import load_policy, load_tokenizer
from stages.text import PairBatch, encode_prompt, encode_response, pair_batch, response_logprobs
from stages.training import PolicyEvalParams, evaluate, optimizer_step, save_model


class Params(PolicyEvalParams):
    epochs: int = 3
    batch_size: int = 32  # global, across processes
    lr: float = 1e-3
    holdout_fraction: float = 0.1


INPUTS = {
    "base": Input("model to fine-tune (default: the pipeline's `model`)", required=False),
    "data": Input("demonstrations", columns=("prompt", "response")),
    "eval": Input("held-out prompts for the evaluator", required=False, columns=("prompt",)),
    "lm_eval": Input("held-out plain text for an LM loss", required=False, columns=("text",)),
}
OUTPUTS = {"model": "model"}


def sft_loss(model: PreTrainedModel, batch: PairBatch) -> torch.Tensor:
    """Mean negative log-likelihood of the response tokens."""
    return -masked_mean(response_logprobs(model, batch), batch.response_mask)


ExtraLoss = Callable[[PreTrainedModel, PairBatch], tuple[torch.Tensor, dict[str, float]]]


def fine_tune(ctx: StageContext, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
              rows: list[dict[str, Any]], extra_loss: ExtraLoss | None = None) -> dict[str, float]:
    """Train `model` on {prompt, response} rows, save it, and return its held-out metrics.

    `extra_loss(model, batch)` adds a term (and its logged metrics) to every step's NLL, e.g. distillation's KD.
    """
    p: Params = ctx.params
    acc = ctx.accelerator
    encoded = [(encode_prompt(tokenizer, r["prompt"]), encode_response(tokenizer, r["response"])) for r in rows]
    n_holdout = int(len(encoded) * p.holdout_fraction)
    train, holdout = encoded[n_holdout:], encoded[:n_holdout]

    def collate(rows):
        return pair_batch([r[0] for r in rows], [r[1] for r in rows], tokenizer.pad_token_id)

    loader = DataLoader(train, batch_size=p.batch_size // acc.num_processes, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(ctx.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr)
    model, optimizer, loader = acc.prepare(model, optimizer, loader)
    total, step = p.epochs * len(loader), 0
    for _ in range(p.epochs):
        for batch in loader:
            batch = batch.to(acc.device)
            loss = sft_loss(model, batch)
            metrics = {"loss": loss.item()}
            if extra_loss is not None:
                extra, extra_metrics = extra_loss(model, batch)
                loss = loss + extra
                metrics.update(extra_metrics)
            optimizer_step(ctx, model, optimizer, loss)
            step += 1
            ctx.tracker.log(step, metrics, total)

    save_model(ctx, model, tokenizer)
    metrics: dict[str, float] = {}
    if acc.is_main_process:
        with torch.no_grad():
            unwrapped = acc.unwrap_model(model)
            if holdout:
                metrics["eval_loss"] = sft_loss(unwrapped, collate(holdout).to(acc.device)).item()
            metrics.update(evaluate(ctx, unwrapped, tokenizer))
    return metrics


def run(ctx: StageContext) -> dict[str, float]:
    return fine_tune(ctx, load_policy(ctx.model_path("base")), load_tokenizer(ctx.model_path("base")),
                     ctx.rows("data"))
