"""PPO-ptx (InstructGPT §3.5, eq. 2), readable top to bottom.

Each iteration:
  1. roll out: sample responses to a batch of prompts from the policy;
  2. score: normalized RM score on the last token, minus β·KL(π‖π_ref) per token (k1/k2/k3);
  3. advantages: GAE(γ, λ) over the value model (initialised from the RM) — or any estimator of the registry
     (rloo, reinforce, grpo, …) with `samples_per_prompt` > 1 for the group-based ones;
  4. update: several epochs over shuffled minibatches of the buffer; clipped surrogate + clipped value loss, plus
     λ_ptx · LM loss on a pretraining batch in every policy update (λ_ptx = 0 is plain PPO).
"""

from __future__ import annotations

import copy
import itertools
import random
from typing import Literal

import torch
from stages.algorithms import (
    ADVANTAGE_ESTIMATORS,
    adaptive_kl_coef,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    masked_mean,
    masked_sum,
    masked_whiten,
    outcome_token_rewards,
    ppo_policy_loss,
)
from stages.context import StageContext
from stages.kinds import Input, named
from stages.models import last_token_scores, load_policy, load_scalar_head_model, load_tokenizer, reward_bias, \
    token_values
from stages.text import response_logprobs, sample, text_lm_loss
from stages.training import (PolicyEvalParams, evaluate, kl_to_reference, minibatches, optimizer_step,
                             save_model)

AdvantageEstimator = named(ADVANTAGE_ESTIMATORS, "advantage estimator")


class Params(PolicyEvalParams):
    iterations: int = 30
    rollout_prompts: int = 64
    samples_per_prompt: int = 1
    ppo_epochs: int = 4
    minibatch_size: int = 16
    max_new_tokens: int = 12
    temperature: float = 1.0
    lr: float = 5e-5
    value_lr: float = 1e-4
    max_grad_norm: float = 1.0
    advantage_estimator: AdvantageEstimator = "gae"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    adaptive_kl: bool = False
    kl_target: float = 1.0
    kl_horizon: int = 10000
    ptx_coef: float = 1.0
    ptx_batch_size: int = 16


INPUTS = {
    "policy": Input("initial policy and frozen reference (InstructGPT: the SFT model)"),
    "reward": Input("reward model (its stored normalization bias is applied)"),
    "prompts": Input("RL prompts", columns=("prompt",)),
    "ptx": Input("pretraining corpus for the ptx term", required=False, columns=("text",)),
    "lm_eval": Input("held-out pretraining text: final `ptx_lm_loss` (the alignment tax)", required=False,
                     columns=("text",)),
    "eval": Input("held-out prompts for the evaluator", required=False, columns=("prompt",)),
}
OUTPUTS = {"model": "model"}


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    acc = ctx.accelerator
    device = acc.device
    tokenizer = load_tokenizer(ctx.path("policy"))
    policy = load_policy(ctx.path("policy"))
    reference = copy.deepcopy(policy).eval().requires_grad_(False).to(device)
    reward_model = load_scalar_head_model(ctx.path("reward"), tokenizer.pad_token_id)
    reward_model = reward_model.eval().requires_grad_(False).to(device)
    bias = reward_bias(ctx.path("reward"))
    use_values = p.advantage_estimator == "gae"
    value_model = load_scalar_head_model(ctx.path("reward"), tokenizer.pad_token_id) if use_values else None

    optimizer = torch.optim.AdamW(policy.parameters(), lr=p.lr)
    policy, optimizer = acc.prepare(policy, optimizer)
    if use_values:
        value_optimizer = torch.optim.AdamW(value_model.parameters(), lr=p.value_lr)
        value_model, value_optimizer = acc.prepare(value_model, value_optimizer)

    prompts = [r["prompt"] for r in ctx.rows("prompts")]
    ptx_texts = [r["text"] for r in ctx.rows("ptx")] if ctx.has("ptx") and p.ptx_coef > 0 else []
    ptx_stream = itertools.cycle(ptx_texts) if ptx_texts else None
    rng = random.Random(ctx.seed)
    generator = torch.Generator().manual_seed(ctx.seed)
    kl_coef = p.kl_coef

    for it in range(1, p.iterations + 1):
        # 1. roll out
        batch_prompts = rng.sample(prompts, min(p.rollout_prompts, len(prompts)))
        repeated = [q for q in batch_prompts for _ in range(p.samples_per_prompt)]
        samples = sample(acc.unwrap_model(policy), tokenizer, repeated, p.max_new_tokens, p.temperature)
        batch = samples.batch.to(device)
        mask = batch.response_mask.float()
        group_ids = torch.arange(len(batch_prompts), device=device).repeat_interleave(p.samples_per_prompt)

        # 2. score: r_t = −β·KL_t, plus the RM score on the last response token
        with torch.no_grad():
            old_logp = response_logprobs(policy, batch)
            ref_logp = response_logprobs(reference, batch)
            scores = last_token_scores(reward_model, batch.ids, batch.attention_mask, bias)
            kl = kl_penalty(old_logp, ref_logp, p.kl_estimator) * mask
            token_rewards = -kl_coef * kl + outcome_token_rewards(scores, mask)
            old_values = None
            if use_values:
                old_values = token_values(value_model, batch.ids, batch.attention_mask)[:, batch.prompt_len - 1:-1]
                old_values = old_values * mask

            # 3. advantages
            advantages, returns = ADVANTAGE_ESTIMATORS[p.advantage_estimator](
                token_rewards, mask, values=old_values, group_ids=group_ids, gamma=p.gamma, lam=p.lam)
            if p.whiten_advantages:
                advantages = masked_whiten(advantages, mask)

        # 4. update
        stats: dict[str, list[float]] = {"pg_loss": [], "clipfrac": [], "entropy": [], "value_loss": [],
                                         "ptx_loss": []}
        for _ in range(p.ppo_epochs):
            for idx in minibatches(len(repeated), p.minibatch_size, generator):
                idx = idx.to(device)
                mb, mb_mask = batch.select(idx), mask[idx]
                logp, logits = response_logprobs(policy, mb, return_logits=True)
                pg_loss, pg_stats = ppo_policy_loss(logp, old_logp[idx], advantages[idx], mb_mask, p.clip_eps)
                loss = pg_loss
                if ptx_stream is not None:
                    lm = text_lm_loss(policy, tokenizer, [next(ptx_stream) for _ in range(p.ptx_batch_size)])
                    loss = loss + p.ptx_coef * lm
                    stats["ptx_loss"].append(lm.item())
                optimizer_step(ctx, policy, optimizer, loss, p.max_grad_norm)
                stats["pg_loss"].append(pg_loss.item())
                stats["clipfrac"].append(float(pg_stats["clipfrac"]))
                stats["entropy"].append(masked_mean(entropy_from_logits(logits.detach()), mb_mask).item())

                if use_values:
                    values = token_values(value_model, mb.ids, mb.attention_mask)[:, batch.prompt_len - 1:-1]
                    value_loss, _ = clipped_value_loss(values, old_values[idx], returns[idx], mb_mask,
                                                       p.value_clip_eps)
                    optimizer_step(ctx, value_model, value_optimizer, value_loss, p.max_grad_norm)
                    stats["value_loss"].append(value_loss.item())

        mean_kl = masked_sum(kl_penalty(old_logp, ref_logp, "k1"), mask, dim=1).mean().item()
        if p.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, mean_kl, p.kl_target, p.kl_horizon, len(repeated))
        metrics = {"reward": scores.mean().item(), "kl": mean_kl, "kl_coef": kl_coef,
                   "response_length": mask.sum(1).mean().item(),
                   **{k: sum(v) / len(v) for k, v in stats.items() if v}}
        if use_values:
            metrics["explained_variance"] = float(explained_variance(old_values, returns, mask))
        ctx.tracker.log(it, metrics, p.iterations)

    save_model(ctx, policy, tokenizer)
    policy = acc.unwrap_model(policy).eval()
    final = evaluate(ctx, policy, tokenizer)
    if ctx.has("eval"):
        eval_prompts = [r["prompt"] for r in ctx.rows("eval")]
        final["kl"] = kl_to_reference(policy, reference, tokenizer, eval_prompts, p.max_new_tokens)
        eval_samples = sample(policy, tokenizer, eval_prompts, p.max_new_tokens).batch.to(device)
        with torch.no_grad():
            final["reward"] = last_token_scores(reward_model, eval_samples.ids, eval_samples.attention_mask,
                                                bias).mean().item()
    if ctx.has("lm_eval"):
        final["ptx_lm_loss"] = final.pop("lm_eval_loss")
    return final
