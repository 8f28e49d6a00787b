"""Reward model: a scalar head on the last token, trained with the K-wise Bradley–Terry loss, then normalized.

InstructGPT §3.5: all C(K,2) comparisons of one prompt come from one forward pass over its K responses (one batch
element, not C(K,2) independent pairs, which overfits). After training, a bias b is set so that the mean reward of
the SFT demonstrations is exactly 0; it is stored in the saved model's config (`reward_normalization_bias`) and
added by `stages.models.last_token_scores`, so every consumer reads normalized rewards.

Params, inputs and outputs: stages/kinds/reward_model.py.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from typing import Any

import torch

from stages import data
from stages.algorithms import bradley_terry_kwise_loss, normalization_bias, pairwise_accuracy
from stages.chat import as_ranked
from stages.context import StageContext
from stages.distributed import full_parameters
from stages.kinds.reward_model import Params
from stages.models import REWARD_BIAS_KEY, last_token_scores, load_scalar_head_model, load_tokenizer
from stages.text import context_length, encode_row, fit_comparisons, fit_rows, pair_batch
from stages.training import prepare_optimization, save_model, steps_per_epoch, train_epochs

Encoded = tuple[list[int], list[list[int]], list[int]]  # prompt ids, each response's ids, ranks


def encode_comparisons(ctx: StageContext, tokenizer, name: str, context: int | None) -> tuple[list[Encoded], int]:
    """Input `name`'s comparisons tokenized once and fitted to the length budgets and the model's `context` (a
    comparison that cannot fit is named by its file line), and how many were truncated."""
    p: Params = ctx.params
    rows = [as_ranked(r) for r in ctx.rows(name)]
    fitted, truncated = fit_comparisons(tokenizer, [(prompt, responses) for prompt, responses, _ in rows],
                                        ctx.source(name), p.max_prompt_length, p.max_length, context,
                                        partial(data.row_name, ctx.inputs[name]))
    return [(prompt, responses, ranks) for (prompt, responses), (_, _, ranks) in zip(fitted, rows)], truncated


def by_k(rows: list[Encoded]) -> list[list[Encoded]]:
    """The comparisons grouped by K (one forward pass holds N prompts × K responses)."""
    groups: dict[int, list[Encoded]] = defaultdict(list)
    for row in rows:
        groups[len(row[1])].append(row)
    return list(groups.values())


def score_comparisons(model, tokenizer, rows: list[Encoded], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [N, K] and ranks [N, K] of N comparisons with the same K, in one forward pass."""
    batch = pair_batch([prompt for prompt, responses, _ in rows for _ in responses],
                       [r for _, responses, _ in rows for r in responses], tokenizer.pad_token_id).to(device)
    scores = last_token_scores(model, batch.ids, batch.attention_mask)
    return scores.view(len(rows), -1), torch.tensor([ranks for _, _, ranks in rows], device=device)


def kwise_loss(model, tokenizer, rows: list[Encoded], device) -> tuple[torch.Tensor, dict[str, float]]:
    """K-wise Bradley–Terry loss over comparisons of any K (one forward per K, weighted by prompts)."""
    loss, correct, pairs = 0.0, 0.0, 0
    for group in by_k(rows):
        scores, ranks = score_comparisons(model, tokenizer, group, device)
        loss = loss + bradley_terry_kwise_loss(scores, ranks) * len(group) / len(rows)
        n_pairs = int((ranks[:, :, None] < ranks[:, None, :]).sum())
        correct += pairwise_accuracy(scores, ranks).item() * n_pairs
        pairs += n_pairs
    return loss, {"loss": loss.item(), "accuracy": correct / max(pairs, 1)}


@torch.no_grad()
def accuracy(model, tokenizer, rows: list[Encoded], device, batch_size: int) -> float:
    """Pairwise accuracy over all non-tied pairs of all comparisons."""
    correct, pairs = 0.0, 0
    for group in by_k(rows):
        for start in range(0, len(group), batch_size):
            scores, ranks = score_comparisons(model, tokenizer, group[start:start + batch_size], device)
            n_pairs = int((ranks[:, :, None] < ranks[:, None, :]).sum())
            correct += pairwise_accuracy(scores, ranks).item() * n_pairs
            pairs += n_pairs
    return correct / max(pairs, 1)


@torch.no_grad()
def demo_scores(model, tokenizer, demos: list[tuple[list[int], list[int], Any]], device,
                batch_size: int) -> torch.Tensor:
    """Scores [M] of encoded demonstrations (`encode_row`: {prompt, response} or chat {messages})."""
    scores = []
    for start in range(0, len(demos), batch_size):
        chunk = demos[start:start + batch_size]
        batch = pair_batch([d[0] for d in chunk], [d[1] for d in chunk], tokenizer.pad_token_id).to(device)
        scores.append(last_token_scores(model, batch.ids, batch.attention_mask))
    return torch.cat(scores)


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    acc = ctx.accelerator
    tokenizer = load_tokenizer(ctx.model_path("base"))
    model = load_scalar_head_model(ctx.model_path("base"), tokenizer.pad_token_id, p)
    # every row is fitted (or refused, by file line) before training: none can fail after it
    context = context_length(model)
    train, truncated = encode_comparisons(ctx, tokenizer, "comparisons", context)
    held_out, _ = encode_comparisons(ctx, tokenizer, "eval_comparisons", context) \
        if ctx.has("eval_comparisons") else ([], 0)
    demos, _ = fit_rows([encode_row(tokenizer, r) for r in ctx.rows("demos")], ctx.source("demos"),
                        p.max_prompt_length, p.max_length, context, partial(data.row_name, ctx.inputs["demos"]))
    opt = prepare_optimization(ctx, model, p.lr, p.epochs * steps_per_epoch(ctx, len(train), p.batch_size))

    def loss_fn(ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:  # a mean over comparisons
        return kwise_loss(opt.model, tokenizer, [train[i] for i in ids.tolist()], acc.device)

    train_epochs(ctx, opt, len(train), p.batch_size, p.epochs, loss_fn)

    with full_parameters(acc, opt.model) as full:  # every rank computes the same bias and metrics
        rows = p.micro_batch_size  # comparisons (each with its K responses) or demonstrations per forward
        bias = normalization_bias(demo_scores(full, tokenizer, demos, acc.device, rows))
        acc.unwrap_model(opt.model).config.update({REWARD_BIAS_KEY: bias})
        metrics = {"normalization_bias": bias, "truncated_rows": truncated,
                   "demo_mean_reward": (demo_scores(full, tokenizer, demos, acc.device, rows) + bias).mean().item(),
                   "train_accuracy": accuracy(full, tokenizer, train, acc.device, rows)}
        if ctx.has("eval_comparisons"):
            metrics["eval_accuracy"] = accuracy(full, tokenizer, held_out, acc.device, rows)
    save_model(ctx, opt.model, tokenizer, merge=True)  # the head and the normalization bias travel in one model
    return metrics
