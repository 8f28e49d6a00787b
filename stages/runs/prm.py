"""Process reward model (PRM; Lightman et al. 2023, "Let's Verify Step by Step"; Math-Shepherd, Wang et al. 2024):
a scalar head on a policy checkpoint trained with binary cross-entropy at the end of each step of a solution.

A row is a prompt, its steps and a label per step (TRL's stepwise format: `{prompt, completions, labels}`, as
`label_steps` writes it and TRL's PRM datasets hold it). It is laid out as TRL's PRM trainer lays it out
(`steps.step_layout` through `verifiers.step_batch`): the chat-templated prompt, then each step's tokens followed
by `step_separator`'s, and step k's score is the head's log-odds at the last token of the separator after it. The
loss counts those positions only (`algorithms.masked_bce_loss`, a mean over the steps), against the hard labels
(`labels`) or Math-Shepherd's soft ones (`soft_labels`: the share of continuations that reached the right answer).
A row longer than `max_length` (or the model's context) keeps the whole steps that fit, dropping the later ones
with their labels; a row whose first step does not fit is refused, named by its file line.

Held-out metrics (and the same on the training rows): step accuracy against the hard labels at 0.5, step ROC AUC,
and ProcessBench's first-error evaluation (Zheng et al. 2024): a solution's predicted first error is its first step
scored below 0.5 (none: the PRM calls it correct), its label the first step labelled incorrect; the accuracy over
the solutions with an error, over those without, and their harmonic mean (ProcessBench's F1). The saved model
records `verifiers.verifier_config("process", step_separator)` in its config, so `verifiers.load_verifier(path,
device, expected="process")` loads it and lays solutions out as training did.

Params, inputs and outputs: stages/kinds/prm.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages import data
from stages.algorithms import binary_auc, masked_bce_loss
from stages.chat import Prompt
from stages.context import StageContext
from stages.distributed import full_parameters
from stages.kinds.prm import Params
from stages.models import load_scalar_head_model, load_tokenizer
from stages.steps import first_error_step, step_layout
from stages.text import context_length
from stages.training import as_initial, prepare_optimization, save_model, steps_per_epoch, train_epochs
from stages.verifiers import response_values, step_batch, verifier_config


@dataclass
class Stepwise:
    prompt: Prompt
    steps: list[str]  # the steps that fit the length budget
    targets: list[float]  # BCE target of each (its hard label as 0/1, or its soft label)
    labels: list[bool]  # hard label of each (what the metrics compare with)


def label_list(value: Any, n_steps: int, column: str, soft: bool, where: str) -> list[float]:
    """A row's per-step labels: `n_steps` booleans (true/false, 1/0) or, `soft`, numbers in [0, 1]; ValueError
    naming the row and the column otherwise."""
    ok = isinstance(value, list) and len(value) == n_steps and all(
        isinstance(v, (bool, int, float)) and (0 <= v <= 1 if soft else v in (0, 1)) for v in value)
    if not ok:
        what = "numbers in [0, 1]" if soft else "true / false (or 1 / 0)"
        raise ValueError(f"{where}: column '{column}' must be a list of {n_steps} {what}, one per step of "
                         f"'completions', got {data.short_repr(value)}")
    return [float(v) for v in value]


def steps_that_fit(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, steps: list[str], separator: str,
                   limit: int | None) -> int:
    """How many leading steps fit in `limit` tokens (prompt included) in the PRM layout: all when no limit."""
    if limit is None:
        return len(steps)
    prompt_ids, _, positions = step_layout(tokenizer, prompt, steps, separator)
    return sum(len(prompt_ids) + position + 1 <= limit for position in positions)


def read_stepwise(ctx: StageContext, tokenizer: PreTrainedTokenizerBase, name: str, context: int | None,
                  soft: bool) -> tuple[list[Stepwise], int]:
    """Input `name`'s rows checked (a bad one named by its file line) and fitted to `max_length` and the model's
    `context` (whole trailing steps dropped), and how many were cut. `soft`: the targets are `soft_labels`."""
    p: Params = ctx.params
    where: Callable[[int], str] = partial(data.row_name, ctx.inputs[name])
    limits = [limit for limit in (p.max_length, context) if limit]
    limit = min(limits) if limits else None
    fitted, truncated = [], 0
    for i, row in enumerate(ctx.rows(name)):
        steps = row["completions"]
        if not (isinstance(steps, list) and steps and all(isinstance(step, str) for step in steps)):
            raise ValueError(f"{where(i)}: column 'completions' must be a non-empty list of step texts, got "
                             f"{data.short_repr(steps)}")
        labels = [bool(v) for v in label_list(row["labels"], len(steps), "labels", False, where(i))]
        if soft and row.get("soft_labels") is None:
            raise ValueError(f"{where(i)}: no 'soft_labels' column, which labels: soft trains on (label_steps writes "
                             "it); set labels: hard to train on 'labels'")
        targets = label_list(row["soft_labels"], len(steps), "soft_labels", True, where(i)) if soft else \
            [float(v) for v in labels]
        kept = steps_that_fit(tokenizer, row["prompt"], steps, p.step_separator, limit)
        if not kept:
            raise ValueError(f"{where(i)}: the prompt and the first step do not fit in {limit} tokens (max_length "
                             f"or the model's context); raise max_length or shorten the row")
        fitted.append(Stepwise(row["prompt"], steps[:kept], targets[:kept], labels[:kept]))
        truncated += kept < len(steps)
    return fitted, truncated


def step_targets(positions: list[list[int]], targets: list[list[float]], width: int) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """Targets [B, width] and loss mask [B, width]: each row's step targets at its scored positions, 0 elsewhere;
    the mask is 1 exactly at the scored positions."""
    target, mask = torch.zeros(len(positions), width), torch.zeros(len(positions), width)
    for i, (row, values) in enumerate(zip(positions, targets, strict=True)):
        target[i, row] = torch.tensor(values)
        mask[i, row] = 1.0
    return target, mask


def prm_loss(values: torch.Tensor, positions: list[list[int]], targets: list[list[float]]) -> torch.Tensor:
    """BCE of the per-position log-odds `values` [B, R] against the step targets at the scored positions only (a
    mean over the steps) -> scalar."""
    target, mask = step_targets(positions, targets, values.shape[1])
    return masked_bce_loss(values, target.to(values.device), mask.to(values.device))


def step_values(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[Stepwise], separator: str,
                device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor, list[list[int]]]:
    """Each row's log-odds at its steps' ends (a [steps] tensor per row), from one forward pass over the rows in
    the PRM layout; also the values at every response position [B, R] and the scored positions."""
    batch, positions = step_batch(tokenizer, [row.prompt for row in rows], [row.steps for row in rows], separator)
    values = response_values(model, batch.to(device))
    return [values[i, row] for i, row in enumerate(positions)], values, positions


@torch.no_grad()
def step_probabilities(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[Stepwise],
                       separator: str, device: torch.device, micro_batch_size: int) -> list[list[float]]:
    """P(correct so far) at the end of each step of each row."""
    scores: list[list[float]] = []
    for start in range(0, len(rows), micro_batch_size):
        per_row, _, _ = step_values(model, tokenizer, rows[start:start + micro_batch_size], separator, device)
        scores += [torch.sigmoid(values).tolist() for values in per_row]
    return scores


def first_error_metrics(prefix: str, probabilities: list[list[float]], labels: list[list[bool]]
                        ) -> dict[str, float]:
    """ProcessBench's evaluation: the predicted first error (first step scored below 0.5) against the labelled one
    (`steps.first_error_step`), its accuracy over the solutions with an error and over those without (each left
    out when there are none), and their harmonic mean (F1, when both exist)."""
    erroneous, correct = [], []
    for scores, truth in zip(probabilities, labels, strict=True):
        predicted, actual = first_error_step([s >= 0.5 for s in scores]), first_error_step(truth)
        (correct if actual == -1 else erroneous).append(predicted == actual)
    metrics = {}
    if erroneous:
        metrics[f"{prefix}first_error_accuracy_erroneous"] = sum(erroneous) / len(erroneous)
    if correct:
        metrics[f"{prefix}first_error_accuracy_correct"] = sum(correct) / len(correct)
    if erroneous and correct:
        a, b = sum(erroneous) / len(erroneous), sum(correct) / len(correct)
        metrics[f"{prefix}first_error_f1"] = 2 * a * b / (a + b) if a + b else 0.0
    return metrics


def step_metrics(prefix: str, probabilities: list[list[float]], labels: list[list[bool]]) -> dict[str, float]:
    """Step accuracy at 0.5 against the hard labels, the share of steps labelled correct, step ROC AUC (left out
    with one class only), and `first_error_metrics`."""
    scores = torch.tensor([s for row in probabilities for s in row])
    truth = torch.tensor([label for row in labels for label in row])
    metrics = {f"{prefix}step_accuracy": ((scores >= 0.5) == truth).float().mean().item(),
               f"{prefix}step_positive_rate": truth.float().mean().item()}
    auc = binary_auc(scores, truth)
    return metrics | ({} if math.isnan(auc) else {f"{prefix}step_auc": auc}) | \
        first_error_metrics(prefix, probabilities, labels)


def evaluate(acc, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[Stepwise], prefix: str,
             p: Params) -> dict[str, float]:
    """`step_metrics` of `rows`, computed with full parameters on every rank."""
    with full_parameters(acc, model) as full:
        probabilities = step_probabilities(full, tokenizer, rows, p.step_separator, acc.device, p.micro_batch_size)
    return step_metrics(prefix, probabilities, [row.labels for row in rows])


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    acc = ctx.accelerator
    tokenizer = load_tokenizer(ctx.model_path("base"))
    model = load_scalar_head_model(ctx.model_path("base"), tokenizer.pad_token_id, p)
    # every row is checked and fitted (or refused, by file line) before training: none can fail after it
    context = context_length(model)
    train, truncated = read_stepwise(ctx, tokenizer, "data", context, p.labels == "soft")
    held_out, _ = read_stepwise(ctx, tokenizer, "eval_data", context, False) if ctx.has("eval_data") else ([], 0)
    opt = prepare_optimization(ctx, model, p.lr, p.epochs * steps_per_epoch(ctx, len(train), p.batch_size))
    initial = evaluate(acc, opt.model, tokenizer, held_out, "eval_", p) if held_out else {}

    def loss_fn(ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:  # a mean over the steps
        rows = [train[i] for i in ids.tolist()]
        per_row, values, positions = step_values(opt.model, tokenizer, rows, p.step_separator, acc.device)
        loss = prm_loss(values, positions, [row.targets for row in rows])
        correct = torch.cat([(v >= 0) == torch.tensor(row.labels, device=v.device) for v, row in zip(per_row, rows)])
        return loss, {"loss": loss.item(), "step_accuracy": correct.float().mean().item()}

    def weigh(ids: torch.Tensor) -> float:  # how many steps (loss positions) the micro-batch holds
        return float(sum(len(train[i].steps) for i in ids.tolist()))

    train_epochs(ctx, opt, len(train), p.batch_size, p.epochs, loss_fn, weigh)

    metrics = evaluate(acc, opt.model, tokenizer, train, "train_", p)
    if held_out:
        metrics |= evaluate(acc, opt.model, tokenizer, held_out, "eval_", p) | as_initial(
            {key: value for key, value in initial.items() if key != "eval_step_positive_rate"})
    acc.unwrap_model(opt.model).config.update(verifier_config("process", p.step_separator))
    save_model(ctx, opt.model, tokenizer, merge=True)  # the head travels with the model, its separator in its config
    steps = sum(len(row.steps) for row in train)
    return metrics | {"train_solutions": len(train), "train_steps": steps, "truncated_rows": truncated}
