"""Pure tensor functions for RL post-training of LLMs: losses, advantage estimators, KL estimators, reward models.

Conventions (shared by every function here):
  * `B` = batch (sequences), `T` = response length, `V` = vocabulary, `K` = responses ranked per prompt.
  * Masks are float or bool `[B, T]` with 1 on response tokens; every `[B, T]` output is 0 outside the mask.
  * Log-probs are natural-log, per token, of the token actually sampled.
  * Losses are to be *minimised*; advantages are "higher is better".
  * Group statistics (GRPO, process supervision, `masked_var`) use the unbiased (Bessel-corrected) variance,
    as `torch.std` does (and verl); a group whose values are all equal, or that has a single member, gets
    advantage exactly 0.
"""

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _lookup(registry: dict[str, Callable], name: str, kind: str) -> Callable:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; expected one of {sorted(registry)}")
    return registry[name]


# ----------------------------------------------------------------------------------------------------------------
# Masked reductions
# ----------------------------------------------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` where `mask` is set. x, mask: [B, T]; returns a scalar, or x reduced along `dim`."""
    masked = x * mask.to(x.dtype)
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over the masked entries (0 where the mask is empty). x, mask: [B, T]."""
    return masked_sum(x, mask, dim) / masked_sum(torch.ones_like(x), mask, dim).clamp(min=1e-8)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over all masked entries (scalar); Bessel-corrected unless `unbiased=False`."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = masked_sum(torch.ones_like(x), mask)
        var = var * n / (n - 1).clamp(min=1e-8)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / std over the masked entries of the whole tensor; `shift_mean=False` keeps the mean.

    x, mask: [B, T] -> [B, T] (not re-masked: entries outside the mask are transformed too).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


# ----------------------------------------------------------------------------------------------------------------
# KL estimators (Schulman 2020, "Approximating KL divergence"); samples come from the `logp` policy, so each
# estimates KL(pi || pi_ref) per token.
# ----------------------------------------------------------------------------------------------------------------


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log(pi/pi_ref): unbiased, high variance, can be negative. logp, ref_logp: [B, T] -> [B, T]."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 1/2 (log pi - log pi_ref)^2: biased, low variance, >= 0. [B, T] -> [B, T]."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = r - log r - 1 with r = pi_ref/pi: unbiased, low variance, >= 0. [B, T] -> [B, T]."""
    log_r = ref_logp - logp
    return torch.exp(log_r) - log_r - 1


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token KL(pi || pi_ref) estimate by the named estimator ("k1" | "k2" | "k3"). [B, T] -> [B, T]."""
    return _lookup(KL_ESTIMATORS, estimator, "KL estimator")(logp, ref_logp)


def adaptive_kl_coef(
    coef: float, observed_kl: float | Tensor, target_kl: float, horizon: int, n_steps: int
) -> float:
    """Adaptive KL controller (Ziegler et al. 2019, eq. 2): beta <- beta (1 + clip(KL/KL_target - 1, ±0.2) n/H)."""
    err = min(max(float(observed_kl) / target_kl - 1.0, -0.2), 0.2)
    return coef * (1.0 + err * n_steps / horizon)


# ----------------------------------------------------------------------------------------------------------------
# Advantage estimators. All share one signature:
#   fn(token_rewards [B, T], response_mask [B, T], *, values, group_ids, gamma, lam, eps) -> (advantages, returns)
# Outcome-level estimators (grpo, drgrpo, rloo, reinforce) score a sequence by the sum of its masked token
# rewards, broadcast the advantage to every response token, and return `returns = advantages` (no value model).
# ----------------------------------------------------------------------------------------------------------------

AdvantageFn = Callable[..., tuple[Tensor, Tensor]]


def _group_stats(x: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-element statistics of the element's group. x, group_ids: [N] -> (mean, unbiased std, size, has_signal).

    `has_signal` is False where the group's values are all equal (which includes groups of one).
    """
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    size = torch.bincount(inv, minlength=n_groups).to(x.dtype)
    mean = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add(0, inv, x) / size
    sq_dev = torch.zeros_like(mean).index_add(0, inv, (x - mean[inv]) ** 2)
    std = (sq_dev / (size - 1).clamp(min=1)).sqrt()
    gmax = torch.full_like(mean, -math.inf).scatter_reduce(0, inv, x, "amax")
    gmin = torch.full_like(mean, math.inf).scatter_reduce(0, inv, x, "amin")
    return mean[inv], std[inv], size[inv], (gmax != gmin)[inv]


def _sequence_scores(token_rewards: Tensor, response_mask: Tensor) -> Tensor:
    """Outcome score per sequence: sum of the response's token rewards. [B, T] -> [B]."""
    return masked_sum(token_rewards, response_mask, dim=-1)


def _broadcast(seq_adv: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """[B] -> ([B, T], [B, T]) advantages broadcast over the response, returns = advantages."""
    adv = seq_adv[:, None] * response_mask.to(seq_adv.dtype)
    return adv, adv


def _require(value: Tensor | None, name: str, estimator: str) -> Tensor:
    if value is None:
        raise ValueError(f"advantage estimator {estimator!r} needs `{name}`")
    return value


def outcome_token_rewards(scores: Tensor, response_mask: Tensor) -> Tensor:
    """Place each sequence's outcome score on its last response token. scores: [B]; response_mask: [B, T] (responses
    right-padded) -> [B, T], zero elsewhere."""
    rewards = torch.zeros_like(response_mask, dtype=scores.dtype)
    last = (response_mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores), device=scores.device), last] = scores
    return rewards


def gae_advantages(
    token_rewards: Tensor,
    response_mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """GAE(gamma, lambda) (Schulman et al. 2016, eq. 16): A_t = sum_l (gamma lam)^l delta_{t+l},
    delta_t = r_t + gamma V_{t+1} - V_t. values: [B, T] (required). Returns (A, A + V), both raw (not whitened).

    Masked-out tokens are skipped: the recursion carries the next *response* token's value and advantage across
    them (so multi-turn masks with observation tokens work), and the value after the last response token is 0.
    """
    values = _require(values, "values", "gae")
    mask = response_mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advs = []
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        next_value = torch.where(mask[:, t] > 0, values[:, t], next_value)
        next_adv = torch.where(mask[:, t] > 0, adv, next_adv)
        advs.append(adv)
    advantages = torch.stack(advs[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


def grpo_advantages(
    token_rewards: Tensor,
    response_mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """GRPO outcome supervision (Shao et al. 2024, DeepSeekMath §4.1.2): A_i = (r_i - mean_G) / (std_G + eps),
    std unbiased. group_ids: [B] (required)."""
    group_ids = _require(group_ids, "group_ids", "grpo")
    scores = _sequence_scores(token_rewards, response_mask)
    mean, std, _, signal = _group_stats(scores, group_ids)
    return _broadcast(torch.where(signal, (scores - mean) / (std + eps), 0.0), response_mask)


def drgrpo_advantages(
    token_rewards: Tensor,
    response_mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Dr.GRPO (Liu et al. 2025): A_i = r_i - mean_G, no std division. group_ids: [B] (required)."""
    group_ids = _require(group_ids, "group_ids", "drgrpo")
    scores = _sequence_scores(token_rewards, response_mask)
    mean, _, _, signal = _group_stats(scores, group_ids)
    return _broadcast(torch.where(signal, scores - mean, 0.0), response_mask)


def rloo_advantages(
    token_rewards: Tensor,
    response_mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """RLOO (Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j = n/(n-1) (r_i - mean_G); 0 for groups of one.
    group_ids: [B] (required)."""
    group_ids = _require(group_ids, "group_ids", "rloo")
    scores = _sequence_scores(token_rewards, response_mask)
    mean, _, size, signal = _group_stats(scores, group_ids)
    loo = size / (size - 1).clamp(min=1) * (scores - mean)
    return _broadcast(torch.where(signal, loo, 0.0), response_mask)


def reinforce_advantages(
    token_rewards: Tensor,
    response_mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """REINFORCE with the batch-mean baseline (Williams 1992): A_i = r_i - mean_batch r."""
    scores = _sequence_scores(token_rewards, response_mask)
    return _broadcast(scores - scores.mean(), response_mask)


def reinforce_pp_advantages(
    token_rewards: Tensor,
    response_mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): G_t = sum_{s>=t} gamma^(s-t) r_s over the response, A = G whitened over all response
    tokens of the batch. Returns (A, G). Fold any per-token KL penalty into `token_rewards` beforehand."""
    mask = response_mask.to(token_rewards.dtype)
    rewards = token_rewards * mask
    running = torch.zeros_like(rewards[:, 0])
    rtg = []
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        rtg.append(running)
    returns = torch.stack(rtg[::-1], dim=1) * mask
    return masked_whiten(returns, mask) * mask, returns


ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {
    "gae": gae_advantages,
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
    "rloo": rloo_advantages,
    "reinforce": reinforce_advantages,
    "reinforce_pp": reinforce_pp_advantages,
}


def process_supervision_advantages(
    step_rewards: Tensor,
    step_mask: Tensor,
    step_end_index: Tensor,
    response_mask: Tensor,
    group_ids: Tensor,
    eps: float = 1e-6,
) -> Tensor:
    """GRPO process supervision (DeepSeekMath §4.1.3): r~ = (r - mean_G) / (std_G + eps) over all steps of all
    samples in the group (std unbiased), and A_t = sum of r~ over the steps ending at or after token t.

    step_rewards, step_mask: [B, S]; step_end_index: LongTensor [B, S], index in [0, T) of each step's last token
    (ignored where step_mask is 0); response_mask: [B, T]; group_ids: [B] -> advantages [B, T].
    """
    valid = step_mask.bool()
    flat_groups = group_ids[:, None].expand_as(step_rewards)[valid]
    flat_rewards = step_rewards[valid]
    mean, std, _, signal = _group_stats(flat_rewards, flat_groups)
    normed = torch.zeros_like(step_rewards)
    normed[valid] = torch.where(signal, (flat_rewards - mean) / (std + eps), 0.0)
    per_token = torch.zeros(response_mask.shape, dtype=step_rewards.dtype, device=step_rewards.device)
    per_token.scatter_add_(1, torch.where(valid, step_end_index, 0), normed)
    # reverse cumulative sum: token t collects every step that ends at or after t
    adv = per_token.flip(1).cumsum(1).flip(1)
    return adv * response_mask.to(adv.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Loss aggregation and policy / value losses
# ----------------------------------------------------------------------------------------------------------------


def _token_mean(loss_mat: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    # DAPO (Yu et al. 2025, eq. 12): every token of the batch weighs the same
    return masked_mean(loss_mat, mask)


def _mean_over_kept_rows(per_row: Tensor, mask: Tensor) -> Tensor:
    # rows with no unmasked token (e.g. truncated samples under overlong filtering) are left out of the mean, as in
    # verl and OpenRLHF; with none left the loss is 0 (and its gradient too), never NaN
    kept = (mask.sum(-1) > 0).to(per_row.dtype)
    return (per_row * kept).sum() / kept.sum().clamp(min=1)


def _seq_mean_token_mean(loss_mat: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    # original GRPO (Shao et al. 2024, eq. 3): 1/|o_i| inside each sequence, then mean over sequences
    return _mean_over_kept_rows(masked_mean(loss_mat, mask, dim=-1), mask)


def _seq_mean_token_sum_norm(loss_mat: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    # Dr.GRPO (Liu et al. 2025): a constant normaliser instead of 1/|o_i| removes the length bias
    return _mean_over_kept_rows(masked_sum(loss_mat, mask, dim=-1), mask) / (max_len or loss_mat.shape[-1])


LOSS_AGG_MODES: dict[str, Callable[[Tensor, Tensor, int | None], Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregation_size(mask: Tensor, mode: str) -> Tensor:
    """What `aggregate_loss` averages over in `mode`: the masked tokens (token-mean) or the rows with at least one
    (the seq-mean modes). mask: [B, T] -> scalar. A loss over rows split into chunks is recovered exactly as
    sum over chunks of aggregate_loss(chunk) * aggregation_size(chunk) / aggregation_size(all rows): how gradients
    accumulated over micro-batches equal the whole minibatch's."""
    _lookup(LOSS_AGG_MODES, mode, "loss aggregation mode")
    return mask.sum() if mode == "token-mean" else (mask.sum(-1) > 0).sum()


def aggregate_loss(loss_mat: Tensor, mask: Tensor, mode: str, max_len: int | None = None) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar by the named mode (see LOSS_AGG_MODES).

    "seq-mean-token-sum-norm" divides by `max_len` (the generation budget), defaulting to T.
    """
    return _lookup(LOSS_AGG_MODES, mode, "loss aggregation mode")(loss_mat, mask, max_len)


def ppo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    loss_agg_mode: str = "token-mean",
    max_len: int | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) with decoupled bounds [1 - eps_low, 1 + eps_high]
    (DAPO clip-higher; clip_high=None means symmetric). logp, old_logp, advantages, response_mask: [B, T];
    `token_weights` [B, T] (detached) scale each token's term before aggregation (truncated importance sampling).

    Returns (loss, stats) with detached stats: "clip_fraction" (share of tokens where the clipped term is active),
    "approx_kl" (k3 estimate of KL(pi_old || pi_theta) on the sampled tokens), "ratio_mean".
    """
    clip_high = clip_low if clip_high is None else clip_high
    # the log-ratio is clamped only to keep exp() finite
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if token_weights is not None:
        per_token = per_token * token_weights
    loss = aggregate_loss(per_token, response_mask, loss_agg_mode, max_len)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).to(logp.dtype), response_mask),
            "approx_kl": masked_mean(kl_k3(old_logp, logp), response_mask),
            "ratio_mean": masked_mean(ratio, response_mask),
        }
    return loss, stats


def truncated_importance_weights(old_logp: Tensor, engine_logp: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling for a rollout engine that differs from the trainer (Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training"; verl's and TRL's `tis_cap`): samples come
    from π_engine while the PPO ratio assumes π_old, so each token's loss is weighted by
    w_t = min(π_old(y_t) / π_engine(y_t), cap). old_logp, engine_logp: [B, T] -> w [B, T] (no gradient)."""
    return torch.exp((old_logp - engine_logp).clamp(max=20.0)).clamp(max=cap).detach()


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, Tensor]:
    """1/2 max((V - R)^2, (clip(V, V_old ± eps) - R)^2), token-mean over the mask. [B, T] -> (loss, clipfrac)."""
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    clipfrac = masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask).detach()
    return loss, clipfrac


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits): logsumexp(z) - sum_v p_v z_v. logits: [B, T, V] -> [B, T]."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(R - V) / Var(R) over masked tokens (scalar tensor; NaN when Var(R) = 0). [B, T] inputs."""
    var_returns = masked_var(returns, mask)
    ev = 1.0 - masked_var(returns - values, mask) / var_returns
    return torch.where(var_returns > 0, ev, torch.full_like(ev, math.nan))


# ----------------------------------------------------------------------------------------------------------------
# Reward model (InstructGPT, Ouyang et al. 2022)
# ----------------------------------------------------------------------------------------------------------------


def kwise_pairs(K: int) -> Tensor:
    """All C(K, 2) pairs (i, j), i < j, in lexicographic order: for K responses sorted best-first, (better, worse).

    Returns LongTensor [C(K, 2), 2]; e.g. K=3 -> [[0, 1], [0, 2], [1, 2]].
    """
    return torch.combinations(torch.arange(K), r=2)


def _ranked_pair_margins(scores: Tensor, ranks: Tensor) -> tuple[Tensor, Tensor]:
    """s_better - s_worse for every pair of one prompt's responses, and which pairs are not ties. -> [N, C(K,2)] x2."""
    i, j = kwise_pairs(scores.shape[-1]).to(scores.device).unbind(-1)
    order = torch.sign(ranks[:, j] - ranks[:, i]).to(scores.dtype)  # +1 if i is better (lower rank), -1 if j is
    return order * (scores[:, i] - scores[:, j]), order != 0


def bradley_terry_kwise_loss(scores: Tensor, ranks: Tensor) -> Tensor:
    """InstructGPT eq. 1: -1/C(K,2) sum_pairs log sigma(s_better - s_worse), per prompt, averaged over prompts.

    scores: [N, K] rewards of the K responses of each prompt (one forward pass); ranks: LongTensor [N, K], 0 = best.
    Tied pairs (equal ranks) are skipped: each prompt averages over its non-tied pairs (= C(K,2) without ties);
    prompts with no non-tied pair are left out of the mean.
    """
    margins, valid = _ranked_pair_margins(scores, ranks)
    valid = valid.to(scores.dtype)
    n_pairs = valid.sum(-1)
    per_prompt = -(F.logsigmoid(margins) * valid).sum(-1) / n_pairs.clamp(min=1)
    has_pairs = n_pairs > 0
    return per_prompt[has_pairs].sum() / has_pairs.sum().clamp(min=1)


def pairwise_accuracy(scores: Tensor, ranks: Tensor) -> Tensor:
    """Share of non-tied pairs (over the whole batch) where s_better > s_worse strictly. [N, K] -> scalar tensor;
    0 when every pair is tied (no pair to judge)."""
    margins, valid = _ranked_pair_margins(scores, ranks)
    return (margins[valid] > 0).to(scores.dtype).sum() / valid.sum().clamp(min=1)


def normalization_bias(demo_scores: Tensor) -> float:
    """The bias b with mean(demo_scores + b) = 0 (InstructGPT: RM normalised so demonstrations score 0 on average).

    demo_scores: [M]; computed in float64.
    """
    return -demo_scores.double().mean().item()


# ----------------------------------------------------------------------------------------------------------------
# Verifiers and process reward models (Cobbe et al. 2021; Lightman et al. 2023; Wang et al. 2024)
# ----------------------------------------------------------------------------------------------------------------


def masked_bce_loss(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Binary cross-entropy of sigma(logits) against `targets` in [0, 1] (hard 0/1 labels or Math-Shepherd's soft
    ones), averaged over the positions where `mask` is 1: an outcome verifier's positions are every response token
    (Cobbe et al. §4: the verifier predicts the solution's correctness at each token) or its last; a PRM's are the
    end of each step. logits, targets, mask: [B, T] -> scalar; 0 when the mask is empty."""
    per_position = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return masked_sum(per_position, mask) / mask.sum().clamp(min=1)


def binary_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve: the probability that a positive scores above a negative, ties counting one half
    (the Mann–Whitney U statistic / (n_pos · n_neg)). scores, labels: [N] -> float; NaN without both classes."""
    positive = labels.bool()
    pos, neg = scores[positive].double(), scores[~positive].double()
    if not len(pos) or not len(neg):
        return math.nan
    above = (pos[:, None] > neg[None, :]).double().sum() + 0.5 * (pos[:, None] == neg[None, :]).double().sum()
    return (above / (len(pos) * len(neg))).item()


# ----------------------------------------------------------------------------------------------------------------
# Preference optimisation (DPO family, KTO)
# ----------------------------------------------------------------------------------------------------------------


def _dpo_sigmoid(margin: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # DPO (Rafailov et al. 2023, eq. 7): -log sigma(beta h); with label_smoothing eps > 0 this is conservative
    # DPO (Mitchell 2023): the preference label is flipped with probability eps
    return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)


def _ipo(margin: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # IPO (Azar et al. 2023, eq. 17): regress the log-ratio margin onto 1/(2 tau), tau = beta
    if label_smoothing:
        raise ValueError("IPO does not use label_smoothing")
    return (margin - 1 / (2 * beta)) ** 2


PREFERENCE_LOSSES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "sigmoid": _dpo_sigmoid,
    "cdpo": _dpo_sigmoid,
    "ipo": _ipo,
}


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO-family loss on the margin h = log(pi_w/pi_ref_w) - log(pi_l/pi_ref_l). All inputs [B]
    (sequence log-probs, e.g. from `sequence_logprobs`).

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); rewards are the detached implicit rewards
    beta (log pi - log pi_ref). "sigmoid" and "cdpo" are the same loss (cDPO = DPO with label_smoothing > 0).
    """
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    loss_fn = _lookup(PREFERENCE_LOSSES, loss_type, "preference loss")
    losses = loss_fn(chosen_logratio - rejected_logratio, beta, label_smoothing)
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_ref: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 8): with r = log(pi/pi_ref) and z0 = max(kl_ref, 0) (detached),
    desirable: lambda_D (1 - sigma(beta (r - z0))), undesirable: lambda_U (1 - sigma(beta (z0 - r))).

    policy_logps, ref_logps: [B]; desirable: BoolTensor [B]; kl_ref: scalar (batch estimate of KL(pi || pi_ref)).
    Returns (losses [B], detached rewards beta r [B]).
    """
    logratio = policy_logps - ref_logps
    z0 = kl_ref.detach().clamp(min=0)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio))),
    )
    return losses, beta * logratio.detach()


# ----------------------------------------------------------------------------------------------------------------
# Distillation
# ----------------------------------------------------------------------------------------------------------------


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0
                      ) -> Tensor:
    """Token-level knowledge distillation (Hinton et al. 2015): tau^2 · mean over the masked tokens of
    KL(softmax(z_teacher / tau) || softmax(z_student / tau)); the tau^2 keeps the gradient's scale independent of tau.

    student_logits, teacher_logits: [B, T, V] (computed in float32 at least); mask: [B, T] -> scalar.
    """
    precision = torch.promote_types(student_logits.dtype, torch.float32)
    teacher_logp = F.log_softmax(teacher_logits.to(precision) / temperature, dim=-1)
    student_logp = F.log_softmax(student_logits.to(precision) / temperature, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    return masked_mean(kl, mask) * temperature ** 2


# ----------------------------------------------------------------------------------------------------------------
# Log-probs and sampling helpers
# ----------------------------------------------------------------------------------------------------------------


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(z / tau)[label] one row at a time, saving only the logits and each position's logsumexp: the
    forward and the backward hold one row's [T, V] float32 temporaries, never a full-vocabulary copy of the batch."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
        precision = torch.promote_types(logits.dtype, torch.float32)  # bfloat16 -> float32; float64 stays
        lse = torch.empty(labels.shape, dtype=precision, device=logits.device)
        chosen = torch.empty_like(lse)
        for row in range(logits.shape[0]):
            z = logits[row].to(precision) / temperature
            lse[row] = torch.logsumexp(z, dim=-1)
            chosen[row] = z.gather(-1, labels[row, :, None]).squeeze(-1)
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature = temperature
        return chosen - lse

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, labels, lse = ctx.saved_tensors
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for row in range(logits.shape[0]):
            # d/dz_v (z_y - logsumexp z) = 1[v = y] - softmax(z)_v, then the chain rule through z = logits / tau
            g = torch.exp(logits[row].to(lse.dtype) / ctx.temperature - lse[row, :, None]) * -grad[row, :, None]
            g.scatter_add_(-1, labels[row, :, None], grad[row, :, None])
            grad_logits[row] = g / ctx.temperature
        return grad_logits, None, None


def selective_log_softmax(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[label] per position, differentiable, without materialising log_softmax
    (TRL's `selective_log_softmax`, verl's `logprobs_from_logits`): one sequence at a time, in float32 (float64
    logits stay float64), so bfloat16 logits are upcast a row at a time. logits: [B, T, V] (any strides); labels:
    LongTensor [B, T] -> [B, T]."""
    return _SelectiveLogSoftmax.apply(logits, labels, temperature)


@torch.no_grad()
def entropy_by_rows(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) per position, one sequence at a time in float32 (for logging: no
    gradient). logits: [B, T, V] -> [B, T]."""
    return torch.stack([entropy_from_logits(row.float() / temperature) for row in logits]) if len(logits) \
        else logits.new_zeros(logits.shape[:2], dtype=torch.float32)


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] per position; labels already aligned with logits. [B, T, V], [B, T] -> [B, T].

    Computed in the logits' dtype; pass float32 logits for precise ratios.
    """
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Sum of token log-probs over the mask. [B, T, V], [B, T], [B, T] -> [B]; labels outside the mask may be
    anything (e.g. -100)."""
    safe_labels = labels.masked_fill(~mask.bool(), 0)
    return masked_sum(token_logprobs(logits, safe_labels), mask, dim=-1)


def groups_with_signal(scores: Tensor, group_ids: Tensor) -> Tensor:
    """DAPO dynamic sampling: True for samples whose group's scores are not all equal. [B], [B] -> BoolTensor [B]."""
    return _group_stats(scores.to(torch.float64), group_ids)[3]
