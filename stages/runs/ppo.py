"""PPO-ptx (InstructGPT §3.5, eq. 2), readable top to bottom.

Each iteration:
  1. roll out: sample responses to a batch of prompts from the policy (with `tools`, multi-turn: each call answered
     in text the policy did not write, which every loss, the KL term and the value loss leave out, and over which
     GAE carries the next policy token's value: Search-R1's retrieved-token masking);
  2. score: normalized RM score on the last token, minus β·KL(π‖π_ref) per token (k1/k2/k3); with a `prm` input,
     plus prm_coef × the PRM's P(correct so far) of each step on the step's last token (Math-Shepherd §4,
     step-by-step PPO), so that GAE credits steps;
  3. advantages: GAE(γ, λ) over the value model (initialised from the RM) — or any estimator of the registry
     (rloo, reinforce, grpo, …) with `samples_per_prompt` > 1 for the group-based ones;
  4. update: several epochs over shuffled minibatches of the buffer; clipped surrogate + clipped value loss, plus
     λ_ptx · LM loss on a pretraining batch in every policy update (λ_ptx = 0 is plain PPO).

Params, inputs and outputs: stages/kinds/ppo.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.algorithms import (ADVANTAGE_ESTIMATORS, adaptive_kl_coef, clipped_value_loss, explained_variance,
                               kl_penalty, masked_mean, masked_sum, masked_whiten, outcome_token_rewards,
                               ppo_policy_loss, truncated_importance_weights)
from stages.context import StageContext
from stages.distributed import (check_divisible, full_parameters, gather_list, gather_rows, global_means, local_rows,
                                seed_sampling, shard)
from stages.kinds.ppo import Params
from stages.loop import TrainingLoop, check_finite
from stages.models import (last_token_scores, load_policy, load_scalar_head_model, load_tokenizer, reward_bias,
                           token_values)
from stages.multiturn import ToolUse, multi_turn_sample
from stages.process_rewards import prm_step_rewards, step_metrics, step_token_rewards
from stages.rollout import logprob_gap, stage_engine, wants_logprobs
from stages.text import (PairBatch, RolloutEngine, batched, check_prompts_fit, context_length, count_long_prompts,
                         pair_batch, response_logprobs, response_logprobs_and_entropy, sample, text_lm_loss)
from stages.tool_params import stage_tools
from stages.training import (adapters_disabled, as_initial, check_evaluation_fits, disable_dropout, evaluate,
                             kl_of_samples, prepare_optimization, reference_logprobs, rl_optimiser_steps, save_model,
                             update_on_buffer)
from stages.verifiers import load_verifier


@dataclass
class RolloutBatch:
    batch: PairBatch  # prompt + response rows; response_mask: 1 on the tokens the policy wrote
    responses: list[list[int]]  # each response's tokens (with tools, the tools' text too)
    engine_logprobs: torch.Tensor | None  # [B, R] the engine's log-probs, if the rollout settings want them
    tool_counts: dict[str, float]  # means per sample of the tool calls, turns, …; empty without tools


def roll_out(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], p: Params,
             temperature: float, engine: RolloutEngine | None, tools: ToolUse | None) -> RolloutBatch:
    """One response per row (repeat rows for several): single-turn, or with `tools` multi-turn, each call answered
    by the tool given the row's columns."""
    prompts = [row["prompt"] for row in rows]
    if tools is None:
        samples = sample(model, tokenizer, prompts, p.max_new_tokens, temperature,
                         max_prompt_length=p.max_prompt_length, engine=engine, logprobs=wants_logprobs(p.rollout))
        responses = [ids[:n] for ids, n in zip(samples.batch.response_ids.tolist(), samples.lengths)]
        return RolloutBatch(samples.batch, responses, samples.engine_logprobs, {})
    turns = multi_turn_sample(model, tokenizer, prompts, rows, tools.toolbox, tools.max_turns, p.max_new_tokens,
                              temperature, engine, p.max_prompt_length)
    rollouts = turns.rollouts
    batch = pair_batch([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], tokenizer.pad_token_id,
                       [r.loss_mask for r in rollouts])
    return RolloutBatch(batch, [r.response_ids for r in rollouts], None, turns.counts())


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    acc = ctx.accelerator
    device = acc.device
    check_divisible("rollout_prompts", p.rollout_prompts, acc)
    tokenizer = load_tokenizer(ctx.path("policy"))
    policy_model = load_policy(ctx.path("policy"), p)
    context = context_length(policy_model)
    prompt_rows = ctx.rows("prompts")
    prompts = [r["prompt"] for r in prompt_rows]
    tools = stage_tools(ctx)
    if tools and ctx.has("prm"):
        raise ValueError(f"{ctx.stage}: the `prm` input scores steps of single-turn responses: not with tools")
    # a prompt that leaves no room for the tokens sampled after it in the model's context is refused now
    check_prompts_fit(ctx, tokenizer, context, "prompts", "max_new_tokens", cut=True,
                      prompts=dict(enumerate(prompts)))
    if ctx.has("eval"):  # the final KL and reward sample max_new_tokens after each eval prompt
        check_prompts_fit(ctx, tokenizer, context, "eval", "max_new_tokens")
    check_evaluation_fits(ctx, tokenizer, context)
    use_values = p.advantage_estimator == "gae"
    shared_base = p.lora is not None  # reference = policy with adapters off; RM = value model with adapters off
    reference = None if shared_base else load_policy(ctx.path("policy"), p).eval().requires_grad_(False).to(device)
    bias = reward_bias(ctx.path("reward"))
    prm = load_verifier(ctx.path("prm"), device, p.micro_batch_size, expected="process") if ctx.has("prm") else None

    total_steps = rl_optimiser_steps(ctx, p.rollout_prompts // acc.num_processes * p.samples_per_prompt,
                                     p.minibatch_size, p.ppo_epochs, p.iterations)
    policy = prepare_optimization(ctx, policy_model, p.lr, total_steps)
    disable_dropout(policy.model)
    if use_values:
        value = prepare_optimization(ctx, load_scalar_head_model(ctx.path("reward"), tokenizer.pad_token_id, p),
                                     p.value_lr, total_steps, prefix="value_")
        disable_dropout(value.model)
    if use_values and shared_base:
        reward_model = None
    else:
        reward_model = load_scalar_head_model(ctx.path("reward"), tokenizer.pad_token_id, p)
        reward_model = reward_model.eval().requires_grad_(False).to(device)

    def reward_scores(batch: PairBatch) -> torch.Tensor:
        if reward_model is not None:
            return last_token_scores(reward_model, batch.ids, batch.attention_mask, bias)
        with adapters_disabled(acc, value.model):
            return last_token_scores(value.model, batch.ids, batch.attention_mask, bias)

    trained = [policy.model, value.model] if use_values else [policy.model]
    seed_sampling(ctx.seed, acc)
    initial = evaluate(ctx, policy.model, tokenizer, tools, p.eval_without_tools)

    truncated_prompts = count_long_prompts(tokenizer, prompts, p.max_prompt_length)
    ptx_texts = [r["text"] for r in ctx.rows("ptx")] if ctx.has("ptx") and p.ptx_coef > 0 else []
    ptx_local = shard(ptx_texts, acc)
    if ptx_texts:
        check_divisible("ptx_batch_size", p.ptx_batch_size, acc)
    ptx_per_rank, samples_per_step = p.ptx_batch_size // acc.num_processes, p.minibatch_size // acc.num_processes
    rng = random.Random(ctx.seed)  # the same on every rank: it draws the global batch of prompts
    generator = torch.Generator().manual_seed(ctx.seed)
    loop = TrainingLoop(ctx, p.iterations, rngs=[rng, generator])
    state = loop.resume({"kl_coef": p.kl_coef, "ptx_position": 0})
    kl_coef = state["kl_coef"]

    def ptx_batch(samples: int) -> list[str]:
        """The next texts of this rank's share of the corpus, cycling: a micro-batch of `samples` rollout samples
        takes its share of the step's `ptx_batch_size / N` (at least one)."""
        count = max(1, round(ptx_per_rank * samples / samples_per_step))
        start, state["ptx_position"] = state["ptx_position"], state["ptx_position"] + count
        return [ptx_local[i % len(ptx_local)] for i in range(start, start + count)]

    for it in loop.steps():
        # 1. roll out: the global batch of prompts is drawn identically on every rank; each samples its share
        batch_ids = shard(rng.sample(range(len(prompts)), min(p.rollout_prompts, len(prompts))), acc)
        loop.saw(batch_ids)
        repeated = [prompt_rows[i] for i in batch_ids for _ in range(p.samples_per_prompt)]
        with full_parameters(acc, policy.model) as model:
            rollout = roll_out(model, tokenizer, repeated, p, p.temperature, stage_engine(ctx), tools)
        batch = rollout.batch.to(device)
        mask = batch.response_mask.float()  # the policy's tokens: every loss, the KL and the length count these
        # the engine's log-probs of the sampled tokens (another engine than the trainer: vLLM), if asked for
        engine_logp = None if rollout.engine_logprobs is None else rollout.engine_logprobs.to(device)  # [B, R]
        # the PRM's score of each step, at the policy token that ends it
        steps = None if prm is None else prm_step_rewards(prm, tokenizer, [r["prompt"] for r in repeated],
                                                          rollout.responses)

        # 2. score in eval mode, in micro-batches: r_t = −β·KL_t, plus the RM score on the last response token
        rows = p.micro_batch_size
        with torch.no_grad():
            for model in trained:
                model.eval()
            old_logp = batched(lambda part: response_logprobs(policy.model, part, p.temperature), batch, rows,
                               "old log-probs")
            ref_logp = batched(lambda part: reference_logprobs(acc, policy.model, reference, part, p.temperature),
                               batch, rows, "reference log-probs")
            scores = batched(reward_scores, batch, rows, "rewards")
            check_finite(ctx.label, {"reward": scores.mean().item()})
            kl = kl_penalty(old_logp, ref_logp, p.kl_estimator) * mask
            token_rewards = -kl_coef * kl + outcome_token_rewards(scores, mask)
            if steps is not None:
                token_rewards += p.prm_coef * step_token_rewards(steps, mask.shape[1]).to(device)
            old_values = None
            if use_values:
                old_values = batched(lambda part: token_values(value.model, part.ids, part.attention_mask),
                                     batch, rows, "values")[:, batch.prompt_len - 1:-1] * mask
            for model in trained:
                model.train()

            # 3. advantages, on the batch gathered from every rank (whitening and baselines are batch statistics)
            all_mask = gather_rows(acc, mask)
            group_ids = torch.arange(all_mask.shape[0], device=device) // p.samples_per_prompt
            advantages, returns = ADVANTAGE_ESTIMATORS[p.advantage_estimator](
                gather_rows(acc, token_rewards), all_mask,
                values=gather_rows(acc, old_values) if use_values else None,
                group_ids=group_ids, gamma=p.gamma, lam=p.lam)
            if p.whiten_advantages:
                advantages = masked_whiten(advantages, all_mask)
            advantages, returns = local_rows(acc, advantages, mask), local_rows(acc, returns, mask)

        # 4. update: `ppo_epochs` passes of minibatches over this rank's samples, policy then value each step; both
        # losses are token means over the response mask, so a micro-batch weighs its response tokens
        def policy_loss(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            mb, mb_mask = batch.select(idx), mask[idx]
            logp, entropy = response_logprobs_and_entropy(policy.model, mb, p.temperature)
            tis = None if p.rollout.tis_cap is None or engine_logp is None else \
                truncated_importance_weights(old_logp[idx], engine_logp[idx], p.rollout.tis_cap)
            loss, pg_stats = ppo_policy_loss(logp, old_logp[idx], advantages[idx], mb_mask, p.clip_eps,
                                             token_weights=tis)
            stats = {"pg_loss": loss.item(), **{k: v.item() for k, v in pg_stats.items()},
                     "entropy": masked_mean(entropy, mb_mask).item()}
            if ptx_texts:
                lm = text_lm_loss(policy.model, tokenizer, ptx_batch(len(idx)))
                loss = loss + p.ptx_coef * lm
                stats["ptx_loss"] = lm.item()
            return loss, stats

        def value_loss(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            mb = batch.select(idx)
            values = token_values(value.model, mb.ids, mb.attention_mask)[:, batch.prompt_len - 1:-1]
            loss, _ = clipped_value_loss(values, old_values[idx], returns[idx], mask[idx], p.value_clip_eps)
            return loss, {"value_loss": loss.item()}

        def response_tokens(idx: torch.Tensor) -> float:
            return float(mask[idx].sum())

        updates = [(policy, policy_loss, response_tokens)] + ([(value, value_loss, response_tokens)]
                                                              if use_values else [])
        update_stats = update_on_buffer(ctx, len(repeated), p.minibatch_size, p.ppo_epochs, generator, updates)

        mean_kl = masked_sum(kl_penalty(old_logp, ref_logp, "k1"), mask, dim=1).mean().item()
        metrics = {**global_means(acc, {"reward": scores.mean().item(), "kl": mean_kl,
                                        "response_length": mask.sum(1).mean().item(), **rollout.tool_counts}),
                   **update_stats}
        if engine_logp is not None:  # how far the engine that sampled is from the trainer (π_old)
            metrics |= global_means(acc, logprob_gap(old_logp, engine_logp, mask))
        if steps is not None:
            metrics |= step_metrics(gather_list(steps, acc), "prm_step_score")
        if use_values:
            metrics["explained_variance"] = float(explained_variance(
                gather_rows(acc, old_values), gather_rows(acc, returns), all_mask))
        if p.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, metrics["kl"], p.kl_target, p.kl_horizon, len(repeated) *
                                       acc.num_processes)
        loop.end_step(it, {**metrics, "kl_coef": kl_coef}, {**state, "kl_coef": kl_coef})

    final = {**evaluate(ctx, policy.model, tokenizer, tools, p.eval_without_tools),
             "truncated_prompts": truncated_prompts}
    with full_parameters(acc, policy.model) as model:  # every rank evaluates; the main process's are logged
        if ctx.has("eval"):  # KL(π‖π_ref) per response (k1, over the policy's tokens) and RM score, at T = 1
            eval_batch = roll_out(model, tokenizer, ctx.rows("eval"), p, 1.0, stage_engine(ctx), tools).batch
            final["kl"] = kl_of_samples(acc, model, reference, eval_batch, p.micro_batch_size)
            with torch.no_grad():
                final["reward"] = batched(reward_scores, eval_batch.to(device), p.micro_batch_size,
                                          "rewards").mean().item()
    if ctx.has("lm_eval"):
        final["ptx_lm_loss"], initial["ptx_lm_loss"] = final.pop("lm_eval_loss"), initial.pop("lm_eval_loss")
    save_model(ctx, policy.model, tokenizer)
    return final | as_initial(initial)
