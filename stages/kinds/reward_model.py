"""Reward model: a scalar head on the last token, trained with the K-wise Bradley–Terry loss, then normalized.

InstructGPT §3.5: all C(K,2) comparisons of one prompt come from one forward pass over its K responses (one batch
element, not C(K,2) independent pairs, which overfits). After training, a bias b is set so that the mean reward of
the SFT demonstrations is exactly 0; it is stored in the saved model's config (`reward_normalization_bias`) and
added by `stages.models.last_token_scores`, so every consumer reads normalized rewards.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import torch

from stages.algorithms import bradley_terry_kwise_loss, normalization_bias, pairwise_accuracy
from stages.context import StageContext
from stages.kinds import Input, StageParams
from stages.models import REWARD_BIAS_KEY, last_token_scores, load_scalar_head_model, load_tokenizer
from stages.text import encode_prompt, encode_response, pair_batch
from stages.training import optimizer_step, save_model


class Params(StageParams):
    epochs: int = 4
    batch_size: int = 16  # prompts per step, each with all its K responses
    lr: float = 5e-4


INPUTS = {
    "base": Input("model to initialise from (InstructGPT: the SFT model)", required=False),
    "comparisons": Input("ranked responses: {prompt, responses, ranks} or {prompt, chosen, rejected}",
                         columns=("prompt",)),
    "eval_comparisons": Input("held-out comparisons for eval_accuracy", required=False, columns=("prompt",)),
    "demos": Input("SFT demonstrations; normalization makes their mean reward 0", columns=("prompt", "response")),
}
OUTPUTS = {"model": "model"}


def as_ranked(row: dict[str, Any]) -> tuple[str, list[str], list[int]]:
    """A comparison row as (prompt, responses, ranks); a chosen/rejected pair is K = 2."""
    if "responses" in row:
        return row["prompt"], list(row["responses"]), list(row["ranks"])
    return row["prompt"], [row["chosen"], row["rejected"]], [0, 1]


def batches_by_k(rows: list[tuple[str, list[str], list[int]]], size: int, rng: random.Random | None):
    """Batches of comparisons with the same K (one forward pass holds N prompts × K responses)."""
    by_k: dict[int, list] = defaultdict(list)
    for row in rows:
        by_k[len(row[1])].append(row)
    batches = [group[i:i + size] for group in by_k.values() for i in range(0, len(group), size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def score_comparisons(model, tokenizer, rows, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [N, K] and ranks [N, K] of N comparisons with the same K, in one forward pass."""
    prompt_ids = [encode_prompt(tokenizer, prompt) for prompt, responses, _ in rows for _ in responses]
    response_ids = [encode_response(tokenizer, r) for _, responses, _ in rows for r in responses]
    batch = pair_batch(prompt_ids, response_ids, tokenizer.pad_token_id).to(device)
    scores = last_token_scores(model, batch.ids, batch.attention_mask)
    return scores.view(len(rows), -1), torch.tensor([ranks for _, _, ranks in rows], device=device)


@torch.no_grad()
def accuracy(model, tokenizer, rows, device, batch_size: int) -> float:
    """Pairwise accuracy over all non-tied pairs of all comparisons."""
    correct, pairs = 0.0, 0
    for batch in batches_by_k(rows, batch_size, None):
        scores, ranks = score_comparisons(model, tokenizer, batch, device)
        n_pairs = int(((ranks[:, :, None] < ranks[:, None, :])).sum())
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
    model = load_scalar_head_model(ctx.model_path("base"), tokenizer.pad_token_id)
    train = [as_ranked(r) for r in ctx.rows("comparisons")]
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr)
    model, optimizer = acc.prepare(model, optimizer)
    rng = random.Random(ctx.seed)
    total = p.epochs * len(batches_by_k(train, p.batch_size, None))
    step = 0
    for _ in range(p.epochs):
        for batch in batches_by_k(train, p.batch_size, rng):
            scores, ranks = score_comparisons(model, tokenizer, batch, acc.device)
            loss = bradley_terry_kwise_loss(scores, ranks)
            optimizer_step(ctx, model, optimizer, loss)
            step += 1
            ctx.tracker.log(step, {"loss": loss.item(), "accuracy": pairwise_accuracy(scores, ranks).item()}, total)

    model = acc.unwrap_model(model)
    model.eval()
    demos = ctx.rows("demos")
    bias = normalization_bias(demo_scores(model, tokenizer, demos, acc.device))
    model.config.update({REWARD_BIAS_KEY: bias})
    save_model(ctx, model, tokenizer)
    metrics = {"normalization_bias": bias,
               "demo_mean_reward": (demo_scores(model, tokenizer, demos, acc.device) + bias).mean().item(),
               "train_accuracy": accuracy(model, tokenizer, train, acc.device, p.batch_size)}
    if ctx.has("eval_comparisons"):
        held_out = [as_ranked(r) for r in ctx.rows("eval_comparisons")]
        metrics["eval_accuracy"] = accuracy(model, tokenizer, held_out, acc.device, p.batch_size)
    return metrics
