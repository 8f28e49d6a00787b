"""Pieces every training stage shares: optimisation params and steps (accumulation, clipping, LR schedule),
each rank's batches, held-out policy evaluation, KL to a reference, saving."""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from stages import data
from stages.algorithms import masked_mean, masked_sum
from stages.chat import Prompt
from stages.context import StageContext
from stages.distributed import check_divisible, full_parameters, full_state_dict, global_means, prepare
from stages.evaluation import evaluate_policy, lm_loss
from stages.loop import TrainingLoop, check_finite
from stages.models import save, with_lora
from stages.multiturn import ToolUse
from stages.params import OptimParams
from stages.rollout import stage_engine
from stages.text import (PairBatch, RolloutEngine, batched, check_prompts_fit, context_length, encode_row, fit_rows,
                         pair_batch, response_logprobs, sample)

if TYPE_CHECKING:  # an annotation only: the sft declaration is not code every training stage runs
    from stages.kinds.sft import Params as SFTParams



MicroLoss = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
Weigh = Callable[[torch.Tensor], float]  # how many units (rows, tokens) a micro-batch's loss is the mean over


def unit_shares(acc: Accelerator, units: list[float]) -> list[float]:
    """Each micro-batch's weight in an optimiser step: its units over the mean per process of the units of the whole
    global minibatch (summed over processes). DDP averages the processes' accumulated gradients, so the step's
    gradient is that of the mean over every unit of the global minibatch, however it is split."""
    total = sum(units)
    if acc.num_processes > 1:
        total = acc.reduce(torch.tensor(total, dtype=torch.float64, device=acc.device), "mean").item()
    return [n / total for n in units] if total > 0 else [1 / len(units)] * len(units)


@dataclass
class Optimization:
    """A prepared model with its optimiser and LR schedule. `update` is one optimiser step over micro-batches."""

    ctx: StageContext
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    max_grad_norm: float | None
    prefix: str = ""  # of the logged gradient norm (e.g. `value_` for a value model)

    def update(self, micro_batches: list[torch.Tensor], loss_fn: MicroLoss, weigh: Weigh = len) -> dict[str, float]:
        """One optimiser step over this rank's share of a minibatch, given as `micro_batches` of row indices.
        `loss_fn(micro)` is the loss of one micro-batch alone, a mean over its own units (rows, or tokens), of which it
        holds `weigh(micro)`. Each is weighted by `unit_shares`, so the accumulated gradient is that of the global
        minibatch's loss, whatever the micro-batch size and the number of processes. Then clip, step the optimiser
        and the schedule. Gradients sync across processes on the last micro-batch only. Returns the metrics weighted
        the same way (the minibatch's once `global_means` averages the ranks), the gradient norm and the learning
        rate of this step; a non-finite one stops before the step."""
        acc, totals = self.ctx.accelerator, {}
        shares = unit_shares(acc, [float(weigh(micro)) for micro in micro_batches])
        for i, (micro, share) in enumerate(zip(micro_batches, shares)):
            sync = i == len(micro_batches) - 1
            with nullcontext() if sync else acc.no_sync(self.model):
                loss, metrics = loss_fn(micro)
                acc.backward(loss * share)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value * share
        norm = acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm or math.inf)
        totals[f"{self.prefix}grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        totals[f"{self.prefix}lr"] = self.scheduler.get_last_lr()[0]
        check_finite(self.ctx.label, totals)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        return totals


def prepare_optimization(ctx: StageContext, model: torch.nn.Module, lr: float, total_steps: int,
                         prefix: str = "") -> Optimization:
    """AdamW + the `lr_scheduler` over `total_steps` optimiser steps, prepared by accelerate (DDP / FSDP2 / AMP);
    the schedule is registered with accelerate so that checkpoints hold it."""
    p: OptimParams = ctx.params
    if getattr(p, "lora", None) is not None:
        with warnings.catch_warnings():  # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            model = with_lora(model, p.lora)
    if p.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    trainable = [w for w in model.parameters() if w.requires_grad]  # with LoRA: the adapters (and a head)
    model, optimizer = prepare(ctx.accelerator, model, torch.optim.AdamW(trainable, lr=lr))
    scheduler = get_scheduler(p.lr_scheduler, optimizer, num_warmup_steps=math.ceil(p.warmup_ratio * total_steps),
                              num_training_steps=max(total_steps, 1))
    ctx.accelerator.register_for_checkpointing(scheduler)
    return Optimization(ctx, model, optimizer, scheduler, p.max_grad_norm, prefix)


def disable_dropout(model: torch.nn.Module) -> None:
    """No dropout in an RL policy or value model (as TRL and verl): the update then sees the policy that sampled,
    so the first minibatch's ratio is exactly 1 and the KL is not dropout noise."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def micro_batches(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Split one rank's batch of row indices into micro-batches of at most `size` rows (the forward/backward)."""
    return list(torch.split(rows, size))


def epoch_batches(ctx: StageContext, n_rows: int, batch_size: int, epoch: int) -> Iterator[list[torch.Tensor]]:
    """This rank's micro-batches for each optimiser step of one epoch over `n_rows` rows.

    The shuffled order is the same on every rank (seed + epoch); it is cut into global batches of `batch_size`
    (the last one may be smaller), each rank takes its contiguous share of every global batch, split into
    micro-batches of at most `micro_batch_size` rows. So N processes see exactly the global batches of one process.
    """
    acc = ctx.accelerator
    check_divisible("batch_size", batch_size, acc)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(ctx.seed + epoch))
    for start in range(0, n_rows, batch_size):
        batch = order[start:start + batch_size]
        if len(batch) < acc.num_processes:
            break  # a last global batch too small to give every rank a row
        share = torch.tensor_split(batch, acc.num_processes)[acc.process_index]
        yield micro_batches(share, ctx.params.micro_batch_size)


def steps_per_epoch(ctx: StageContext, n_rows: int, batch_size: int) -> int:
    return sum(1 for start in range(0, n_rows, batch_size)
               if min(batch_size, n_rows - start) >= ctx.accelerator.num_processes)


def train_epochs(ctx: StageContext, opt: Optimization, n_rows: int, batch_size: int, epochs: int,
                 loss_fn: MicroLoss, weigh: Weigh = len) -> None:
    """The supervised loop: `epochs` passes of shuffled global batches over rows 0..n_rows-1, one optimiser step
    each (`Optimization.update` with `loss_fn` and `weigh`), metrics averaged over ranks; resumable
    (`TrainingLoop`)."""
    loop = TrainingLoop(ctx, epochs * steps_per_epoch(ctx, n_rows, batch_size))
    loop.resume()
    batches = (micro for epoch in range(epochs) for micro in epoch_batches(ctx, n_rows, batch_size, epoch))
    for _ in range(loop.start):  # the data order is a function of (seed, epoch): skip the steps already taken
        next(batches)
    for step in loop.steps():
        micro = next(batches)
        metrics = opt.update(micro, loss_fn, weigh)
        loop.saw([int(i) for chunk in micro for i in chunk])
        loop.end_step(step, global_means(ctx.accelerator, metrics))


def rl_optimiser_steps(ctx: StageContext, samples_per_rank: int, minibatch_size: int, epochs: int,
                       iterations: int) -> int:
    """Optimiser steps of an RL run (for the LR schedule): `epochs` passes per iteration over this rank's
    rollout samples in minibatches of the global `minibatch_size`."""
    check_divisible("minibatch_size", minibatch_size, ctx.accelerator)
    return iterations * epochs * -(-samples_per_rank // (minibatch_size // ctx.accelerator.num_processes))


def update_on_buffer(ctx: StageContext, n_samples: int, minibatch_size: int, epochs: int,
                     generator: torch.Generator, updates: list[tuple[Optimization, MicroLoss, Weigh]]
                     ) -> dict[str, float]:
    """The PPO-style update (PPO, GRPO): `epochs` passes over this rank's `n_samples` rollout samples in shuffled
    minibatches (`minibatch_size` global, so `minibatch_size / N` here), one optimiser step of every (model, loss,
    weigh) of `updates` per minibatch (`Optimization.update`), each split into micro-batches of at most
    `micro_batch_size` samples. Returns the mean of each metric over the steps, averaged over ranks."""
    device, local_size = ctx.accelerator.device, minibatch_size // ctx.accelerator.num_processes
    stats: dict[str, list[float]] = {}
    for _ in range(epochs):
        order = torch.randperm(n_samples, generator=generator)
        for start in range(0, n_samples, local_size):
            micro = micro_batches(order[start:start + local_size].to(device), ctx.params.micro_batch_size)
            for opt, loss_fn, weigh in updates:
                for key, value in opt.update(micro, loss_fn, weigh).items():
                    stats.setdefault(key, []).append(value)
    return global_means(ctx.accelerator, {k: sum(v) / len(v) for k, v in stats.items()})


def evaluate(ctx: StageContext, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
             tools: ToolUse | None = None, also_without_tools: bool = False) -> dict[str, float]:
    """The evaluator's metrics on the `eval` input (and the held-out LM loss on `lm_eval` if wired), with full
    parameters; with `tools`, sampled multi-turn with them, and with `also_without_tools` also sampled without
    them (metrics prefixed `notool_`). Every rank evaluates (under FSDP every rank must run the forwards); the main
    process's are logged."""
    p, metrics = ctx.params, {}
    with full_parameters(ctx.accelerator, model) as full:
        if p.evaluator and ctx.has("eval"):
            def scored(with_tools: ToolUse | None) -> dict[str, float]:
                return evaluate_policy(full, tokenizer, ctx.rows("eval"), p.evaluator, p.eval_max_new_tokens,
                                       p.eval_samples_per_prompt, p.eval_temperature, stage_engine(ctx), with_tools)
            metrics.update(scored(tools))
            if tools is not None and also_without_tools:
                metrics.update({f"notool_{k}": v for k, v in scored(None).items()})
        if ctx.has("lm_eval"):
            metrics["lm_eval_loss"] = lm_loss(full, tokenizer, [r["text"] for r in ctx.rows("lm_eval")],
                                              p.micro_batch_size)
    return metrics


def as_initial(metrics: dict[str, float]) -> dict[str, float]:
    """Held-out metrics of a stage's starting policy, named `initial_<metric>` beside the final ones, so each policy
    stage shows what it changed."""
    return {f"initial_{name}": value for name, value in metrics.items()}


def check_evaluation_fits(ctx: StageContext, tokenizer: PreTrainedTokenizerBase, context: int | None) -> None:
    """At stage start: every `eval` prompt `evaluate` samples for leaves room for `eval_max_new_tokens` in the model's
    `context` (`check_prompts_fit`), so that evaluation cannot fail after training."""
    if ctx.params.evaluator and ctx.has("eval"):
        check_prompts_fit(ctx, tokenizer, context, "eval", "eval_max_new_tokens")


@torch.no_grad()
def kl_to_reference(acc: Accelerator, policy: torch.nn.Module, reference: torch.nn.Module | None,
                    tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], max_new_tokens: int,
                    micro_batch_size: int, engine: RolloutEngine | None = None) -> float:
    """Monte-Carlo KL(π‖π_ref) per response: mean over samples of Σ_t (log π − log π_ref) (k1, unbiased), scored
    in micro-batches of `micro_batch_size` rows; `reference` None: the policy with its LoRA adapters off."""
    samples = sample(policy, tokenizer, prompts, max_new_tokens, engine=engine)
    return kl_of_samples(acc, policy, reference, samples.batch, micro_batch_size)


@torch.no_grad()
def kl_of_samples(acc: Accelerator, policy: torch.nn.Module, reference: torch.nn.Module | None, batch: PairBatch,
                  micro_batch_size: int) -> float:
    """Σ_t (log π − log π_ref) over each sample's response mask (k1), averaged over the samples of `batch` (drawn
    from π); `reference` None: the policy with its LoRA adapters off."""
    batch = batch.to(next(policy.parameters()).device)
    diff = batched(lambda part: response_logprobs(policy, part)
                   - reference_logprobs(acc, policy, reference, part), batch, micro_batch_size)
    return masked_sum(diff, batch.response_mask, dim=1).mean().item()


def save_model(ctx: StageContext, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
               output: str = "model", merge: bool = False) -> None:
    """A `save_pretrained` directory from the full state dict (gathered from the shards under FSDP), in the
    model's dtype; a LoRA model as its adapter directory unless `merge` or its `lora.merge`. Every rank must call
    this, last (merging changes the model)."""
    acc, lora = ctx.accelerator, getattr(ctx.params, "lora", None)
    state = full_state_dict(acc, model)
    if acc.is_main_process:
        save(acc.unwrap_model(model), tokenizer, ctx.outputs[output], state,
             merge=merge or bool(lora and lora.merge))
    acc.wait_for_everyone()


@contextmanager
def adapters_disabled(acc: Accelerator, model: torch.nn.Module) -> Iterator[None]:
    """Inside, a LoRA model computes its base model: the frozen reference without a second copy."""
    with acc.unwrap_model(model).disable_adapter():
        yield


def reference_logprobs(acc: Accelerator, policy: torch.nn.Module, reference: torch.nn.Module | None,
                       batch: PairBatch, temperature: float = 1.0) -> torch.Tensor:
    """Response log-probs [B, R] under the frozen reference: its own model, or the policy with adapters off (one
    forward of the whole `batch`: call it per micro-batch, e.g. through `batched`)."""
    if reference is not None:
        return response_logprobs(reference, batch, temperature=temperature)
    with adapters_disabled(acc, policy):
        return response_logprobs(policy, batch, temperature=temperature)


def sft_loss(model: PreTrainedModel, batch: PairBatch) -> torch.Tensor:
    """Mean negative log-likelihood of the response tokens (a mean over tokens: weigh micro-batches by
    `response_mask.sum()`)."""
    return -masked_mean(response_logprobs(model, batch), batch.response_mask)


@torch.no_grad()
def held_out_loss(model: PreTrainedModel, batches: Iterable[PairBatch]) -> float:
    """`sft_loss` over all the batches' response tokens together (each batch's sum, divided by the total count), so
    the value does not depend on how the rows are batched, and memory is one batch's."""
    total, tokens = 0.0, 0.0
    for batch in batches:
        total -= masked_sum(response_logprobs(model, batch), batch.response_mask).item()
        tokens += batch.response_mask.sum().item()
    return total / max(tokens, 1e-8)


ExtraLoss = Callable[[PreTrainedModel, PairBatch], tuple[torch.Tensor, dict[str, float]]]


def fine_tune(ctx: StageContext, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
              rows: list[dict[str, Any]], extra_loss: ExtraLoss | None = None) -> dict[str, float]:
    """Train `model` on {prompt, response} rows, save it, and return its held-out metrics.

    `extra_loss(model, batch)` adds a term (and its logged metrics) to every step's NLL, e.g. distillation's KD.
    """
    p: SFTParams = ctx.params  # the sft kind's params (or a kind's that extends them, as distill's)
    acc = ctx.accelerator
    context = context_length(model)  # rows longer than the model's context are refused before training
    encoded, truncated = fit_rows([encode_row(tokenizer, r) for r in rows], ctx.source("data"),
                                  p.max_prompt_length, p.max_length, context,
                                  partial(data.row_name, ctx.inputs["data"]))
    check_evaluation_fits(ctx, tokenizer, context)
    n_holdout = int(len(encoded) * p.holdout_fraction)
    train, holdout = encoded[n_holdout:], encoded[:n_holdout]

    def collate(rows: list[tuple[list[int], list[int], list[int] | None]]) -> PairBatch:
        masks = [mask if mask is not None else [1] * len(response) for _, response, mask in rows]
        return pair_batch([r[0] for r in rows], [r[1] for r in rows], tokenizer.pad_token_id, masks).to(acc.device)

    tokens = [sum(mask) if mask is not None else len(response) for _, response, mask in train]

    def weigh(ids: torch.Tensor) -> float:  # the loss and its extra term are means over the response tokens
        return sum(tokens[i] for i in ids.tolist())

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
    initial = as_initial(evaluate(ctx, opt.model, tokenizer))
    train_epochs(ctx, opt, len(train), p.batch_size, p.epochs, loss_fn, weigh)
    metrics = {**evaluate(ctx, opt.model, tokenizer), "truncated_rows": truncated, **initial}
    if holdout:  # on every rank: FSDP forward
        opt.model.eval()
        size = p.micro_batch_size
        metrics["eval_loss"] = held_out_loss(opt.model, (collate(holdout[s:s + size])
                                                         for s in range(0, len(holdout), size)))
    save_model(ctx, opt.model, tokenizer)
    return metrics
