"""Supervised fine-tuning: next-token loss on the assistant's tokens only, chat template applied. Rows are
`{prompt, response}` or chat `{messages}` (multi-turn: every assistant turn is trained, the rest masked; a system
turn is kept as context).

`batch_size` is global: with N processes each rank takes a disjoint `batch_size / N` share of every global batch
(split again into `gradient_accumulation_steps` micro-batches), so an N-process run takes the 1-process run's steps.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.algorithms import masked_mean
from stages.context import StageContext
from stages.kinds import Input
from stages.models import load_policy, load_tokenizer
from stages.text import PairBatch, encode_row, fit_rows, pair_batch, response_logprobs
from stages.training import LoraTrainingParams, PolicyEvalParams, evaluate, prepare_optimization, save_model, \
    steps_per_epoch, train_epochs


class Params(LoraTrainingParams, PolicyEvalParams):
    epochs: int = 3  # passes over the training rows
    batch_size: int = 32  # rows per optimiser step, global across processes
    lr: float = 1e-3  # AdamW learning rate
    holdout_fraction: float = 0.1  # share of the rows held out for `eval_loss`
    max_prompt_length: int | None = None  # prompt tokens kept (cut from the left); None: all
    max_length: int | None = None  # prompt + response tokens kept (response cut from the right); None: all


INPUTS = {
    "base": Input("model to fine-tune (default: the pipeline's `model`)", required=False),
    "data": Input("demonstrations: {prompt, response} or chat {messages}", columns=("prompt", "response"),
                  or_columns=("messages",)),
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
    encoded, truncated = fit_rows([encode_row(tokenizer, r) for r in rows], ctx.source("data"),
                                  p.max_prompt_length, p.max_length)
    n_holdout = int(len(encoded) * p.holdout_fraction)
    train, holdout = encoded[n_holdout:], encoded[:n_holdout]

    def collate(rows: list[tuple[list[int], list[int], list[int] | None]]) -> PairBatch:
        masks = [mask if mask is not None else [1] * len(response) for _, response, mask in rows]
        return pair_batch([r[0] for r in rows], [r[1] for r in rows], tokenizer.pad_token_id, masks).to(acc.device)

    def loss_fn(ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        batch = collate([train[i] for i in ids.tolist()])
        loss = sft_loss(opt.model, batch)
        metrics = {"loss": loss.item()}
        if extra_loss is not None:
            extra, extra_metrics = extra_loss(opt.model, batch)
            loss = loss + extra
            metrics.update(extra_metrics)
        return loss, metrics

    opt = prepare_optimization(ctx, model, p.lr, p.epochs * steps_per_epoch(ctx, len(train), p.batch_size))
    train_epochs(ctx, opt, len(train), p.batch_size, p.epochs, loss_fn)
    metrics = {**evaluate(ctx, opt.model, tokenizer), "truncated_rows": truncated}
    if holdout:
        with torch.no_grad():
            opt.model.eval()
            metrics["eval_loss"] = sft_loss(opt.model, collate(holdout)).item()  # on every rank: FSDP forward
    save_model(ctx, opt.model, tokenizer)
    return metrics


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    return fine_tune(ctx, load_policy(ctx.model_path("base"), p), load_tokenizer(ctx.model_path("base")),
                     ctx.rows("data"))
