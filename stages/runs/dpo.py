"""Offline preference optimisation against a frozen reference: DPO, IPO, cDPO and KTO, readable top to bottom.

  * DPO (Rafailov et al. 2023): -log σ(β h), h = log π(y_w)/π_ref(y_w) - log π(y_l)/π_ref(y_l).
  * cDPO (Mitchell 2023, "A note on DPO with noisy preferences"): DPO with labels flipped with probability ε.
  * IPO (Azar et al. 2023, "A general theoretical paradigm to understand learning from human preferences"):
    (h - 1/(2τ))², τ = `beta`.
  * KTO (Ethayarajh et al. 2024, "KTO: model alignment as prospect theoretic optimization"): unpaired desirable /
    undesirable completions, each compared with the reference point z0 = max(0, KL(π‖π_ref)).

The losses live in `stages.algorithms` (`preference_loss`, `kto_loss`); this stage feeds them:
  1. data: each K-ranked comparison becomes all its non-tied (better, worse) pairs (InstructGPT's RM data); KTO
     unpairs them (better → desirable, worse → undesirable) or reads `{prompt, completion, label}` rows as they are;
  2. reference: π_ref is the initial policy, so Σ_t log π_ref(y_t | x, y_<t) of every completion is computed once,
     before the first update, and written to `reference_logps/{train,eval}.jsonl`; no reference model is held while
     training. With LoRA, π_ref is the policy with its adapters off: reference log-probs are computed per batch and
     nothing is stored (the output then holds the pairs alone);
  3. KTO's z0: the paper's estimator — each example's prompt is paired with another example's completion (a fixed
     derangement, so its reference log-prob is precomputed too), and z0 = max(0, mean over the micro-batch of
     every rank of log π(y'|x) - log π_ref(y'|x)) on those mismatched pairs, detached;
  4. train: epochs over shuffled batches (chosen and rejected — for KTO, completion and mismatched completion — in
     one forward pass);
  5. evaluate on held-out pairs (the same metrics for every loss): implicit-reward accuracy and margin,
     r = β log π/π_ref; KL(π‖π_ref) on held-out prompts (reference reloaded for this only); the evaluator.

Params, inputs and outputs: stages/kinds/dpo.py.
"""

from __future__ import annotations

import random
from collections import defaultdict
from functools import partial
from typing import Any

import torch

from stages import data
from stages.algorithms import kto_loss, kwise_pairs, masked_sum, preference_loss
from stages.chat import Message, Prompt, as_ranked, prompt_key
from stages.context import StageContext
from stages.data import write_jsonl
from stages.distributed import full_parameters, gather_list, shard
from stages.kinds.dpo import Params
from stages.models import load_policy, load_tokenizer
from stages.text import (PairBatch, check_prompts_fit, context_length, encode_prompt, encode_response, fit,
                         fit_comparisons, fit_rows, pair_batch, response_logprobs)
from stages.training import (adapters_disabled, as_initial, check_evaluation_fits, evaluate, kl_to_reference,
                             prepare_optimization, save_model, steps_per_epoch, train_epochs)

Row = dict[str, Any]


def row_prompt(row: Row) -> Prompt:
    """A preference row's prompt (for implicit-prompt conversations: their shared turns)."""
    return row["prompt"] if "prompt" in row else as_ranked(row)[0]


def comparison(row: Row) -> tuple[Prompt, list[str | list[Message]]]:
    """A preference row's prompt and completions (a labelled row's one)."""
    return (row["prompt"], [row["completion"]]) if "completion" in row else as_ranked(row)[:2]


def check_rows_fit(ctx: StageContext, tokenizer, context: int | None, name: str, rows: list[Row]) -> None:
    """Refuse, naming its file line, a row of input `name` with a completion that cannot fit after its prompt in
    the length budgets or, fitted, in the model's `context` (`fit_comparisons`)."""
    p: Params = ctx.params
    fit_comparisons(tokenizer, [comparison(r) for r in rows], ctx.source(name), p.max_prompt_length, p.max_length,
                    context, partial(data.row_name, ctx.inputs[name]))


def group_labelled(rows: list[Row]) -> list[Row]:
    """Rows {prompt, completion, label} grouped by prompt into ranked rows (desirable rank 0, undesirable rank 1)."""
    groups: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        groups[prompt_key(row["prompt"])].append(row)
    return [{"prompt": group[0]["prompt"], "responses": [r["completion"] for r in group],
             "ranks": [0 if r["label"] else 1 for r in group]} for group in groups.values()]


def preference_pairs(rows: list[Row]) -> list[Row]:
    """{prompt, chosen, rejected} for every non-tied pair of every comparison: the C(K, 2) pairs of a K-ranked row
    minus its ties; labelled rows pair each desirable completion with each undesirable one of the same prompt."""
    if rows and "completion" in rows[0]:
        rows = group_labelled(rows)
    pairs = []
    for prompt, responses, ranks in map(as_ranked, rows):
        for i, j in kwise_pairs(len(responses)).tolist():
            if ranks[i] != ranks[j]:
                better, worse = (i, j) if ranks[i] < ranks[j] else (j, i)
                pairs.append({"prompt": prompt, "chosen": responses[better], "rejected": responses[worse]})
    return pairs


def kto_examples(rows: list[Row], rng: random.Random) -> list[Row]:
    """{prompt, completion, desirable, kl_completion}: labelled rows as they are, else each pair's chosen completion
    as desirable and its rejected one as undesirable. `kl_completion` is another example's completion (a shuffled
    cycle), the mismatched sample KTO's reference point z0 is estimated on."""
    if rows and "completion" in rows[0]:
        examples = [{"prompt": r["prompt"], "completion": r["completion"], "desirable": bool(r["label"])}
                    for r in rows]
    else:
        examples = [{"prompt": pair["prompt"], "completion": pair[side], "desirable": side == "chosen"}
                    for pair in preference_pairs(rows) for side in ("chosen", "rejected")]
    order = rng.sample(range(len(examples)), len(examples))
    for i, j in zip(order, order[1:] + order[:1]):
        examples[i]["kl_completion"] = examples[j]["completion"]
    return examples


def encode(tokenizer, prompts: list[Prompt], completions: list[str], p: Params) -> PairBatch:
    """(prompt, completion) rows fitted to `max_prompt_length` / `max_length` (see `encode_rows`)."""
    rows = [fit(encode_prompt(tokenizer, q), encode_response(tokenizer, c), p.max_prompt_length, p.max_length)
            for q, c in zip(prompts, completions)]
    return pair_batch([r[0] for r in rows], [r[1] for r in rows], tokenizer.pad_token_id)


Encoded = dict[str, tuple[list[int], list[int]]]  # completion column -> (prompt ids, completion ids), fitted


def encode_rows(tokenizer, rows: list[Row], columns: tuple[str, str], p: Params, context: int | None, source: str
                ) -> tuple[list[Encoded], int]:
    """Every row tokenized once, both completions fitted to the length budgets (`fit_rows`), and how many rows the
    budgets cut (either completion). The file's rows were checked by line (`check_rows_fit`): what can still be
    longer than the model's `context` is a KTO example's `kl_completion` (another example's) after its prompt,
    refused naming the example."""
    encoded, truncated = [], 0
    for i, row in enumerate(rows):
        prompt_ids = encode_prompt(tokenizer, row["prompt"])
        fitted, cut = fit_rows([(prompt_ids, encode_response(tokenizer, row[c]), None) for c in columns], source,
                               p.max_prompt_length, p.max_length, context,
                               lambda j, i=i: f"{source}: the {columns[j]} of training example {i}")
        truncated += cut > 0
        encoded.append({c: (q, r) for c, (q, r, _) in zip(columns, fitted)})
    return encoded, truncated


def sequence_logps(model, batch: PairBatch) -> torch.Tensor:
    """Σ_t log π(y_t | x, y_<t) over each response: [B]."""
    return masked_sum(response_logprobs(model, batch), batch.response_mask, dim=1)


@torch.no_grad()
def score(model, tokenizer, prompts: list[Prompt], completions: list[str], p: Params) -> torch.Tensor:
    """Sequence log-probs of many (prompt, completion) rows, in micro-batches: [N] on the CPU."""
    device, size = next(model.parameters()).device, p.micro_batch_size
    logps = [sequence_logps(model, encode(tokenizer, prompts[s:s + size], completions[s:s + size], p)
                            .to(device)).cpu() for s in range(0, len(prompts), size)]
    return torch.cat(logps) if logps else torch.zeros(0)


def with_reference_logps(model, tokenizer, rows: list[Row], columns: tuple[str, str], p: Params, acc) -> list[Row]:
    """The rows with `ref_<column>_logps` added for both completion columns; each rank scores its share."""
    rows = shard(rows, acc)
    for column in columns:
        logps = score(model, tokenizer, [r["prompt"] for r in rows], [r[column] for r in rows], p)
        for row, logp in zip(rows, logps.tolist()):
            row[f"ref_{column}_logps"] = logp
    return gather_list(rows, acc)


def collate(pad_id: int, columns: tuple[str, str], rows: list[Row], encoded: list[Encoded]) -> dict[str, Any]:
    """Both completion columns in one batch, from the rows' token ids (`encode_rows`): sequences [2B] (first
    column, then second), their reference log-probs [2B], and `desirable` [B] (KTO)."""
    first, second = columns
    pairs = [e[first] for e in encoded] + [e[second] for e in encoded]
    return {"sequences": pair_batch([q for q, _ in pairs], [c for _, c in pairs], pad_id),
            "ref_logps": torch.tensor([r[f"ref_{first}_logps"] for r in rows] + [r[f"ref_{second}_logps"] for r in rows])
            if f"ref_{first}_logps" in rows[0] else None,  # None: LoRA, computed with the adapters off
            "desirable": torch.tensor([r.get("desirable", True) for r in rows])}


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                 rejected_logps: torch.Tensor) -> dict[str, float]:
    """Implicit-reward accuracy and margin of pairs, and the policy's mean log-probs of each side."""
    return {"accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "margin": (chosen_rewards - rejected_rewards).mean().item(),
            "chosen_logps": chosen_logps.mean().item(), "rejected_logps": rejected_logps.mean().item()}


def pairwise_step(p: Params, logps: torch.Tensor, ref_logps: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO / cDPO / IPO on a batch of pairs; logps, ref_logps: [2B], chosen then rejected."""
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    losses, chosen_rewards, rejected_rewards = preference_loss(chosen, rejected, ref_chosen, ref_rejected, p.beta,
                                                               p.loss, p.label_smoothing)
    return losses.mean(), pair_metrics(chosen_rewards, rejected_rewards, chosen.detach(), rejected.detach())


def kto_step(p: Params, logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             acc) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO on a batch of examples; logps, ref_logps: [2B], the examples then their mismatched (KL) completions.

    accuracy: share of examples on the right side of the reference point (desirable: β r > β z0).
    """
    logps, kl_logps = logps.chunk(2)
    ref_logps, ref_kl_logps = ref_logps.chunk(2)
    kl = acc.reduce((kl_logps - ref_kl_logps).mean().detach(), "mean")
    losses, rewards = kto_loss(logps, ref_logps, desirable, kl, p.beta, p.desirable_weight, p.undesirable_weight)
    metrics = {"kl_estimate": kl.item(),
               "accuracy": ((rewards > p.beta * kl.clamp(min=0)) == desirable).float().mean().item()}
    for side, mask in (("chosen", desirable), ("rejected", ~desirable)):
        if mask.any():
            metrics[f"{side}_rewards"] = rewards[mask].mean().item()
            metrics[f"{side}_logps"] = logps[mask].detach().mean().item()
    return losses.mean(), metrics


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    acc = ctx.accelerator
    rng = random.Random(ctx.seed)
    tokenizer = load_tokenizer(ctx.path("policy"))
    policy = load_policy(ctx.path("policy"), p).to(acc.device)
    context = context_length(policy)

    # 1. data: held-out prompts are a seeded `eval_fraction` of the comparisons' prompts (no prompt in both splits);
    # a row, or a prompt sampled for the final KL or the evaluator, that cannot fit the model's context is refused
    rows = ctx.rows("comparisons")
    check_rows_fit(ctx, tokenizer, context, "comparisons", rows)
    if ctx.has("eval_comparisons"):
        held_out_input, held_out_rows = "eval_comparisons", dict(enumerate(ctx.rows("eval_comparisons")))
        check_rows_fit(ctx, tokenizer, context, held_out_input, list(held_out_rows.values()))
    else:
        prompts = sorted({prompt_key(row_prompt(r)) for r in rows})
        rng.shuffle(prompts)
        held_out = set(prompts[:int(len(prompts) * p.eval_fraction)])
        held_out_input = "comparisons"
        held_out_rows = {i: r for i, r in enumerate(rows) if prompt_key(row_prompt(r)) in held_out}
        rows = [r for r in rows if prompt_key(row_prompt(r)) not in held_out]
    if ctx.has("eval"):
        check_prompts_fit(ctx, tokenizer, context, "eval", "max_new_tokens")
    else:
        check_prompts_fit(ctx, tokenizer, context, held_out_input, "max_new_tokens",
                          prompts={i: row_prompt(r) for i, r in held_out_rows.items()})
    check_evaluation_fits(ctx, tokenizer, context)
    columns = ("completion", "kl_completion") if p.loss == "kto" else ("chosen", "rejected")
    train = kto_examples(rows, rng) if p.loss == "kto" else preference_pairs(rows)
    eval_pairs = preference_pairs(list(held_out_rows.values()))

    # 2. reference log-probs, once: π_ref = the policy before its first update (with LoRA: adapters off, per batch)
    encoded, truncated = encode_rows(tokenizer, train, columns, p, context, ctx.source("comparisons"))
    if p.lora is None:
        train = with_reference_logps(policy, tokenizer, train, columns, p, acc)
        eval_pairs = with_reference_logps(policy, tokenizer, eval_pairs, ("chosen", "rejected"), p, acc)
    if acc.is_main_process:
        write_jsonl(train, ctx.outputs["reference_logps"] / "train.jsonl")
        if eval_pairs:
            write_jsonl(eval_pairs, ctx.outputs["reference_logps"] / "eval.jsonl")

    # 3-4. train: every global batch of `batch_size` pairs is shared by the ranks, in micro-batches of
    # `micro_batch_size` pairs (the losses are means over pairs, or examples; KTO's z0 is each micro-batch's)
    opt = prepare_optimization(ctx, policy, p.lr, p.epochs * steps_per_epoch(ctx, len(train), p.batch_size))
    initial = as_initial(evaluate(ctx, opt.model, tokenizer))

    def loss_fn(ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        picked = ids.tolist()
        batch = collate(tokenizer.pad_token_id, columns, [train[i] for i in picked], [encoded[i] for i in picked])
        sequences = batch["sequences"].to(acc.device)
        if batch["ref_logps"] is None:
            with torch.no_grad(), adapters_disabled(acc, opt.model):
                ref_logps = sequence_logps(opt.model, sequences)
        else:
            ref_logps = batch["ref_logps"].to(acc.device)
        logps = sequence_logps(opt.model, sequences)
        if p.loss == "kto":
            loss, metrics = kto_step(p, logps, ref_logps, batch["desirable"].to(acc.device), acc)
        else:
            loss, metrics = pairwise_step(p, logps, ref_logps)
        return loss, {"loss": loss.item(), **metrics}

    train_epochs(ctx, opt, len(train), p.batch_size, p.epochs, loss_fn)

    # 5. evaluate
    final: dict[str, float] = {"truncated_rows": truncated}
    with full_parameters(acc, opt.model) as policy:  # every rank evaluates; the main process's are logged
        if eval_pairs:
            prompts = [r["prompt"] for r in eval_pairs]
            chosen = score(policy, tokenizer, prompts, [r["chosen"] for r in eval_pairs], p)
            rejected = score(policy, tokenizer, prompts, [r["rejected"] for r in eval_pairs], p)
            if p.lora is None:
                ref_chosen = torch.tensor([r["ref_chosen_logps"] for r in eval_pairs])
                ref_rejected = torch.tensor([r["ref_rejected_logps"] for r in eval_pairs])
            else:
                with adapters_disabled(acc, policy):
                    ref_chosen = score(policy, tokenizer, prompts, [r["chosen"] for r in eval_pairs], p)
                    ref_rejected = score(policy, tokenizer, prompts, [r["rejected"] for r in eval_pairs], p)
            held = pair_metrics(p.beta * (chosen - ref_chosen), p.beta * (rejected - ref_rejected), chosen, rejected)
            final.update(eval_accuracy=held["accuracy"], eval_margin=held["margin"],
                         chosen_logps=held["chosen_logps"], rejected_logps=held["rejected_logps"])
        kl_prompts = [r["prompt"] for r in ctx.rows("eval")] if ctx.has("eval") \
            else list({prompt_key(r["prompt"]): r["prompt"] for r in eval_pairs}.values())
        if kl_prompts:  # the reference: reloaded for this only, or the policy with its LoRA adapters off
            reference = None if p.lora else load_policy(ctx.path("policy"), p).to(acc.device).requires_grad_(False)
            final["kl"] = kl_to_reference(acc, policy, reference, tokenizer, kl_prompts, p.max_new_tokens,
                                          p.micro_batch_size)
            del reference
    final |= evaluate(ctx, opt.model, tokenizer) | initial
    save_model(ctx, opt.model, tokenizer)
    return final
