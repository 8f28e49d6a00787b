"""Reward model: a scalar head on the last token, trained with the K-wise Bradley–Terry loss, then normalized.

InstructGPT §3.5: all C(K,2) comparisons of one prompt come from one forward pass over its K responses (one batch
element, not C(K,2) independent pairs, which overfits). After training, a bias b is set so that the mean reward of
the SFT demonstrations is exactly 0; it is stored in the saved model's config (`reward_normalization_bias`) and
added by `stages.models.last_token_scores`, so every consumer reads normalized rewards.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from stages.algorithms import bradley_terry_kwise_loss, normalization_bias, pairwise_accuracy
from stages.context import StageContext
from stages.distributed import full_parameters, write_trace
from stages.kinds import Input
from stages.models import REWARD_BIAS_KEY, last_token_scores, load_scalar_head_model, load_tokenizer
from stages.text import encode_prompt, encode_response, pair_batch
from stages.training import OptimParams, prepare_optimization, save_model, steps_per_epoch, train_epochs

Ranked = tuple[str, list[str], list[int]]


class Params(OptimParams):
    epochs: int = 4  # passes over the comparisons
    batch_size: int = 16  # prompts per optimiser step (each with all its K responses), global across processes
    lr: float = 5e-4  # AdamW learning rate


INPUTS = {
    "base": Input("model to initialise from (InstructGPT: the SFT model)", required=False),
    "comparisons": Input("ranked responses: {prompt, responses, ranks} or {prompt, chosen, rejected}",
                         columns=("prompt",)),
    "eval_comparisons": Input("held-out comparisons for eval_accuracy", required=False, columns=("prompt",)),
    "demos": Input("SFT demonstrations; normalization makes their mean reward 0", columns=("prompt", "response")),
}
OUTPUTS = {"model": "model"}


def as_ranked(row: dict[str, Any]) -> Ranked:
    """A comparison row as (prompt, responses, ranks); a chosen/rejected pair is K = 2."""
    if "responses" in row:
        return row["prompt"], list(row["responses"]), list(row["ranks"])
    return row["prompt"], [row["chosen"], row["rejected"]], [0, 1]


def by_k(rows: list[Ranked]) -> list[list[Ranked]]:
    """The comparisons grouped by K (one forward pass holds N prompts × K responses)."""
    groups: dict[int, list[Ranked]] = defaultdict(list)
    for row in rows:
        groups[len(row[1])].append(row)
    return list(groups.values())


def score_comparisons(model, tokenizer, rows: list[Ranked], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [N, K] and ranks [N, K] of N comparisons with the same K, in one forward pass."""
    prompt_ids = [encode_prompt(tokenizer, prompt) for prompt, responses, _ in rows for _ in responses]
    response_ids = [encode_response(tokenizer, r) for _, responses, _ in rows for r in responses]
    batch = pair_batch(prompt_ids, response_ids, tokenizer.pad_token_id).to(device)
    scores = last_token_scores(model, batch.ids, batch.attention_mask)
    return scores.view(len(rows), -1), torch.tensor([ranks for _, _, ranks in rows], device=device)


def kwise_loss(model, tokenizer, rows: list[Ranked], device) -> tuple[torch.Tensor, dict[str, float]]:
    """K-wise Bradley–Terry loss over comparisons of any K (one forward per K, weighted by prompts)."""
    loss, correct, pairs = 0.0, 0.0, 0
    for group in by_k(rows):
        scores, ranks = score_comparisons(model, tokenizer, group, device)
        loss = loss + bradley_terry_kwise_loss(scores, ranks) * len(group) / len(rows)
        n_pairs = int((ranks[:, :, None] < ranks[:, None, :]).sum())
        correct += pairwise_accuracy(scores, ranks).item() * n_pairs
        pairs += n_pairs
    return loss, {"loss": float(loss), "accuracy": correct / max(pairs, 1)}


@torch.no_grad()
def accuracy(model, tokenizer, rows: list[Ranked], device, batch_size: int) -> float:
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
def demo_scores(model, tokenizer, demos, device, batch_size: int = 128) -> torch.Tensor:
    scores = []
    for start in range(0, len(demos), batch_size):
        chunk = demos[start:start + batch_size]
        batch = pair_batch([encode_prompt(tokenizer, d["prompt"]) for d in chunk],
                           [encode_response(tokenizer, d["response"]) for d in chunk],
                           tokenizer.pad_token_id).to(device)
        scores.append(last_token_scores(model, batch.ids, batch.attention_mask))
    return torch.cat(scores)


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    acc = ctx.accelerator
    tokenizer = load_tokenizer(ctx.model_path("base"))
    model = load_scalar_head_model(ctx.model_path("base"), tokenizer.pad_token_id, p.dtype)
    train = [as_ranked(r) for r in ctx.rows("comparisons")]
    opt = prepare_optimization(ctx, model, p.lr, p.epochs * steps_per_epoch(ctx, len(train), p.batch_size))

    def loss_fn(ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return kwise_loss(opt.model, tokenizer, [train[i] for i in ids.tolist()], acc.device)

    write_trace(acc, f"{ctx.pipeline}.{ctx.stage}", train_epochs(ctx, opt, len(train), p.batch_size, p.epochs,
                                                                 loss_fn))

    with full_parameters(acc, opt.model) as full:  # every rank computes the same bias and metrics
        demos = ctx.rows("demos")
        bias = normalization_bias(demo_scores(full, tokenizer, demos, acc.device))
        full.config.update({REWARD_BIAS_KEY: bias})
        metrics = {"normalization_bias": bias,
                   "demo_mean_reward": (demo_scores(full, tokenizer, demos, acc.device) + bias).mean().item(),
                   "train_accuracy": accuracy(full, tokenizer, train, acc.device, p.batch_size)}
        if ctx.has("eval_comparisons"):
            held_out = [as_ranked(r) for r in ctx.rows("eval_comparisons")]
            metrics["eval_accuracy"] = accuracy(full, tokenizer, held_out, acc.device, p.batch_size)
    save_model(ctx, opt.model, tokenizer)
    return metrics
