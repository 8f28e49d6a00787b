"""Outcome verifier (ORM, Cobbe et al. 2021): a scalar head on a policy checkpoint trained with binary
cross-entropy to predict whether a sampled solution reaches the correct answer.

Each row is laid out as `verifiers.outcome_batch` lays it out (chat-templated prompt, then the solution and its
EOS), fitted to the length budgets before training. Cobbe et al. §4 train the verifier to predict the solution's
correctness at every token of it (`loss_on: all_tokens`, their token-level verifier, which they found better than a
solution-level one); `last_token` puts the loss at its last token only. Either way the verifier's score of a
solution is read at its last token (`Verifier.outcome_scores`), and so are the held-out metrics. The saved model
records `verifiers.verifier_config("outcome")` in its config, so `verifiers.load_verifier(path, device,
expected="outcome")` loads it.

Params, inputs and outputs: stages/kinds/verifier.py.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from stages import data
from stages.algorithms import binary_auc, masked_bce_loss
from stages.context import StageContext
from stages.distributed import full_parameters
from stages.kinds.verifier import Params
from stages.models import load_scalar_head_model, load_tokenizer
from stages.text import PairBatch, context_length, encode_prompt, encode_response, fit_rows, pair_batch
from stages.training import as_initial, prepare_optimization, save_model, steps_per_epoch, train_epochs
from stages.verifiers import response_values, verifier_config

Encoded = tuple[list[int], list[int], bool]  # prompt ids, solution ids (ending with EOS unless cut), label


def is_label(value: Any) -> bool:
    """Whether a row's `label` is one: true, false, 1 or 0."""
    return not isinstance(value, str) and value in (True, False)


def encode_labelled(ctx: StageContext, tokenizer: PreTrainedTokenizerBase, name: str,
                    context: int | None) -> tuple[list[Encoded], int]:
    """Input `name`'s rows tokenized and fitted to the length budgets and the model's `context` (a row that cannot
    fit is named by its file line), and how many were truncated."""
    p: Params = ctx.params
    rows, where = ctx.rows(name), partial(data.row_name, ctx.inputs[name])
    bad = next((i for i, row in enumerate(rows) if not is_label(row["label"])), None)
    if bad is not None:
        raise ValueError(f"{where(bad)}: label must be true or false (or 1 / 0), got "
                         f"{data.short_repr(rows[bad]['label'])}")
    encoded = [(encode_prompt(tokenizer, row["prompt"]), encode_response(tokenizer, row["completion"]), None)
               for row in rows]
    fitted, truncated = fit_rows(encoded, ctx.source(name), p.max_prompt_length, p.max_length, context, where)
    return [(prompt, solution, bool(row["label"])) for (prompt, solution, _), row in zip(fitted, rows)], truncated


def collate(rows: list[Encoded], pad_id: int) -> tuple[PairBatch, torch.Tensor]:
    """The rows as a batch in `outcome_batch`'s layout, and their labels [B] (float)."""
    batch = pair_batch([prompt for prompt, _, _ in rows], [solution for _, solution, _ in rows], pad_id)
    return batch, torch.tensor([float(label) for _, _, label in rows])


def loss_positions(response_mask: torch.Tensor, loss_on: str) -> torch.Tensor:
    """Where the BCE counts: every solution token (`all_tokens`) or each row's last (`last_token`).
    response_mask: [B, R] (1 on solution tokens) -> [B, R]."""
    if loss_on == "all_tokens":
        return response_mask
    last = response_mask.sum(1) - 1
    return torch.zeros_like(response_mask).scatter_(1, last[:, None], 1)


def last_values(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """The value at each row's last solution token (its EOS), where a verifier's score is read. [B, R] -> [B]."""
    return values.gather(1, (response_mask.sum(1) - 1)[:, None]).squeeze(1)


def outcome_loss(model: torch.nn.Module, batch: PairBatch, labels: torch.Tensor,
                 loss_on: str) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE of the per-token log-odds against each row's label at the `loss_on` positions (a mean over them), and
    the accuracy of the last-token scores."""
    values = response_values(model, batch)
    targets = labels.to(values.device, values.dtype)[:, None].expand_as(values)
    loss = masked_bce_loss(values, targets, loss_positions(batch.response_mask, loss_on))
    correct = (last_values(values, batch.response_mask) >= 0) == targets[:, 0].bool()
    return loss, {"loss": loss.item(), "accuracy": correct.float().mean().item()}


@torch.no_grad()
def outcome_probabilities(model: torch.nn.Module, rows: list[Encoded], pad_id: int, device: torch.device,
                          micro_batch_size: int) -> torch.Tensor:
    """P(correct) of each row, read at its last token: [N]."""
    scores = []
    for start in range(0, len(rows), micro_batch_size):
        batch, _ = collate(rows[start:start + micro_batch_size], pad_id)
        batch = batch.to(device)
        scores.append(torch.sigmoid(last_values(response_values(model, batch), batch.response_mask)).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def classification_metrics(prefix: str, probabilities: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy at the 0.5 threshold, ROC AUC (left out when the rows hold one class only: it is undefined) and the
    share of rows labelled correct (what always answering the majority label scores)."""
    metrics = {f"{prefix}accuracy": ((probabilities >= 0.5) == labels.bool()).float().mean().item(),
               f"{prefix}positive_rate": labels.float().mean().item()}
    auc = binary_auc(probabilities, labels)
    return metrics | ({} if math.isnan(auc) else {f"{prefix}auc": auc})


def held_out_metrics(acc: Accelerator, model: torch.nn.Module, rows: list[Encoded], pad_id: int,
                     micro_batch_size: int) -> dict[str, float]:
    """`classification_metrics` of the held-out rows, computed with full parameters on every rank."""
    labels = torch.tensor([label for _, _, label in rows])
    with full_parameters(acc, model) as full:
        return classification_metrics("eval_", outcome_probabilities(full, rows, pad_id, acc.device,
                                                                      micro_batch_size), labels)


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    acc = ctx.accelerator
    tokenizer = load_tokenizer(ctx.model_path("base"))
    pad_id = tokenizer.pad_token_id
    model = load_scalar_head_model(ctx.model_path("base"), pad_id, p)
    # every row is fitted (or refused, by file line) before training: none can fail after it
    context = context_length(model)
    train, truncated = encode_labelled(ctx, tokenizer, "data", context)
    held_out, _ = encode_labelled(ctx, tokenizer, "eval_data", context) if ctx.has("eval_data") else ([], 0)
    opt = prepare_optimization(ctx, model, p.lr, p.epochs * steps_per_epoch(ctx, len(train), p.batch_size))
    initial = held_out_metrics(acc, opt.model, held_out, pad_id, p.micro_batch_size) if held_out else {}

    def loss_fn(ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:  # a mean over the loss positions
        batch, labels = collate([train[i] for i in ids.tolist()], pad_id)
        return outcome_loss(opt.model, batch.to(acc.device), labels, p.loss_on)

    def weigh(ids: torch.Tensor) -> float:  # how many loss positions the micro-batch holds
        return float(len(ids) if p.loss_on == "last_token" else sum(len(train[i][1]) for i in ids.tolist()))

    train_epochs(ctx, opt, len(train), p.batch_size, p.epochs, loss_fn, weigh)

    labels = torch.tensor([label for _, _, label in train])
    with full_parameters(acc, opt.model) as full:  # every rank computes the same metrics
        metrics = classification_metrics("train_", outcome_probabilities(full, train, pad_id, acc.device,
                                                                          p.micro_batch_size), labels)
    if held_out:
        metrics |= held_out_metrics(acc, opt.model, held_out, pad_id, p.micro_batch_size) | as_initial(
            {key: value for key, value in initial.items() if key != "eval_positive_rate"})
    acc.unwrap_model(opt.model).config.update(verifier_config("outcome"))
    save_model(ctx, opt.model, tokenizer, merge=True)  # the head travels with the model, its type in its config
    return metrics | {"truncated_rows": truncated}
