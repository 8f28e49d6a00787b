"""Tests for stages/algorithms.py against hand-computed values (float64 throughout for exact comparisons)."""

import math

import pytest
import torch
from torch.testing import assert_close

from stages import algorithms as A

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------------------------- masked reductions


def test_masked_mean_sum():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert_close(A.masked_sum(x, mask), t(7.0))
    assert_close(A.masked_mean(x, mask), t(7.0 / 3))
    assert_close(A.masked_mean(x, mask, dim=-1), t([1.5, 4.0]))
    assert_close(A.masked_sum(x, mask.to(D), dim=0), t([5.0, 2.0, 0.0]))
    assert_close(A.masked_mean(x, torch.zeros_like(x)), t(0.0))  # empty mask -> 0, not NaN


def test_masked_var_and_whiten():
    x = t([[1.0, 2.0, 3.0, 100.0]])
    mask = t([[1.0, 1.0, 1.0, 0.0]])
    assert_close(A.masked_var(x, mask), t(1.0))  # unbiased: (1 + 0 + 1) / 2
    assert_close(A.masked_var(x, mask, unbiased=False), t(2.0 / 3))
    w = A.masked_whiten(x, mask)
    assert_close(w[0, :3], t([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    x2 = torch.randn(4, 7, dtype=D, generator=torch.Generator().manual_seed(0))
    m2 = torch.rand(4, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    w2 = A.masked_whiten(x2, m2)
    assert_close(A.masked_mean(w2, m2), t(0.0), atol=1e-10, rtol=0)
    assert_close(A.masked_var(w2, m2), t(1.0), atol=1e-6, rtol=0)
    w3 = A.masked_whiten(x2, m2, shift_mean=False)
    assert_close(A.masked_mean(w3, m2), A.masked_mean(x2, m2))


# --------------------------------------------------------------------------------------------- KL


def test_kl_estimators_hand_values():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    ln2 = math.log(2)
    assert_close(A.kl_k1(logp, ref), t([ln2]))
    assert_close(A.kl_k2(logp, ref), t([0.5 * ln2**2]))
    assert_close(A.kl_k3(logp, ref), t([0.5 + (-ln2) * -1 - 1]))  # r = 0.5: r - log r - 1
    for name, fn in A.KL_ESTIMATORS.items():
        assert_close(A.kl_penalty(logp, ref, name), fn(logp, ref))
    with pytest.raises(ValueError):
        A.kl_penalty(logp, ref, "k4")


def test_k3_nonnegative_and_unbiased():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(64, 32, dtype=D, generator=g), torch.randn(64, 32, dtype=D, generator=g)
    assert (A.kl_k3(logp, ref) >= 0).all()
    assert (A.kl_k2(logp, ref) >= 0).all()
    # exact expectation under p over a categorical: E_p[k1] = E_p[k3] = KL(p || q)
    p = torch.softmax(torch.randn(6, dtype=D, generator=g), 0)
    q = torch.softmax(torch.randn(6, dtype=D, generator=g), 0)
    kl = (p * (p / q).log()).sum()
    assert_close((p * A.kl_k1(p.log(), q.log())).sum(), kl)
    assert_close((p * A.kl_k3(p.log(), q.log())).sum(), kl)


def test_adaptive_kl_coef():
    assert A.adaptive_kl_coef(0.1, 0.12, 0.1, horizon=100, n_steps=10) == pytest.approx(0.1 * 1.02)
    assert A.adaptive_kl_coef(0.1, t(1.0), 0.1, horizon=100, n_steps=10) == pytest.approx(0.1 * 1.02)  # clipped
    assert A.adaptive_kl_coef(0.1, 0.05, 0.1, horizon=100, n_steps=10) == pytest.approx(0.1 * 0.98)  # clipped
    assert A.adaptive_kl_coef(0.1, 0.1, 0.1, horizon=100, n_steps=10) == pytest.approx(0.1)


# --------------------------------------------------------------------------------------------- advantages


def test_registry_names_and_shared_signature():
    assert set(A.ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "drgrpo", "rloo", "reinforce", "reinforce_pp"}
    rewards = t([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    mask = t([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    kwargs = dict(values=torch.zeros_like(rewards), group_ids=torch.tensor([0, 0]), gamma=1.0, lam=1.0, eps=1e-6)
    for fn in A.ADVANTAGE_ESTIMATORS.values():
        adv, ret = fn(rewards, mask, **kwargs)
        assert adv.shape == ret.shape == rewards.shape
        assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_hand_computed():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    values = t([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]])  # 9.0 sits on padding and must be ignored
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = A.ADVANTAGE_ESTIMATORS["gae"](rewards, mask, values=values, gamma=0.9, lam=0.8)
    # row 0: d2 = 1 - .7 = .3; d1 = .9*.7 - .6 = .03; d0 = .9*.6 - .5 = .04; gl = .72
    #        A2 = .3, A1 = .03 + .72*.3 = .246, A0 = .04 + .72*.246 = .21712
    # row 1: d1 = 1 - .6 = .4 (V after last response token = 0); A0 = .04 + .72*.4 = .328
    assert_close(adv, t([[0.21712, 0.246, 0.3], [0.328, 0.4, 0.0]]))
    assert_close(ret, t([[0.71712, 0.846, 1.0], [0.828, 1.0, 0.0]]))


def _naive_gae(rewards, values, lengths, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=D)
    for b in range(B):
        L = int(lengths[b])
        v = [float(values[b, s]) for s in range(L)] + [0.0]
        for i in range(L):
            total = 0.0
            for l in range(L - i):
                s = i + l
                delta = float(rewards[b, s]) + gamma * v[s + 1] - v[s]
                total += (gamma * lam) ** l * delta
            adv[b, i] = total
    return adv


def test_gae_matches_naive_double_loop():
    g = torch.Generator().manual_seed(0)
    B, T = 5, 9
    rewards = torch.randn(B, T, dtype=D, generator=g)
    values = torch.randn(B, T, dtype=D, generator=g)
    lengths = torch.tensor([9, 1, 4, 7, 6])
    mask = (torch.arange(T)[None] < lengths[:, None]).to(D)
    for gamma, lam in [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)]:
        adv, ret = A.gae_advantages(rewards, mask, values=values, gamma=gamma, lam=lam)
        expected = _naive_gae(rewards, values, lengths, gamma, lam)
        assert_close(adv, expected)
        assert_close(ret, (expected + values) * mask)


def test_gae_skips_masked_observation_tokens():
    # an unmasked gap (e.g. a tool observation) is transparent: same as the sequence with the gap removed
    rewards = t([[0.0, 5.0, 0.0, 1.0]])
    values = t([[0.2, 7.0, 0.3, 0.4]])
    mask = t([[1.0, 0.0, 1.0, 1.0]])
    adv, _ = A.gae_advantages(rewards, mask, values=values, gamma=0.9, lam=0.8)
    ref, _ = A.gae_advantages(t([[0.0, 0.0, 1.0]]), torch.ones(1, 3, dtype=D), values=t([[0.2, 0.3, 0.4]]),
                              gamma=0.9, lam=0.8)
    assert_close(adv[:, [0, 2, 3]], ref)
    assert adv[0, 1] == 0


def test_gae_requires_values_and_group_estimators_require_ids():
    r, m = torch.zeros(2, 3, dtype=D), torch.ones(2, 3, dtype=D)
    with pytest.raises(ValueError, match="values"):
        A.ADVANTAGE_ESTIMATORS["gae"](r, m)
    for name in ("grpo", "drgrpo", "rloo"):
        with pytest.raises(ValueError, match="group_ids"):
            A.ADVANTAGE_ESTIMATORS[name](r, m)


def _outcome_rewards(scores, lengths, T):
    """Token rewards with each sequence's score on its last response token, plus the mask."""
    B = len(scores)
    rewards = torch.zeros(B, T, dtype=D)
    rewards[torch.arange(B), torch.tensor(lengths) - 1] = t(scores)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).to(D)
    return rewards, mask


def test_grpo_normal_equal_and_singleton_groups():
    # group 7: [1, 0, 0, 1] (mean .5, unbiased std sqrt(1/3)); group 3: all equal; group 9: a single sample
    scores = [1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 5.0]
    rewards, mask = _outcome_rewards(scores, [3, 2, 4, 1, 4, 3, 2, 4], T=4)
    gids = torch.tensor([7, 7, 7, 7, 3, 3, 3, 9])
    adv, ret = A.ADVANTAGE_ESTIMATORS["grpo"](rewards, mask, group_ids=gids, eps=0.0)
    h = math.sqrt(3) / 2  # 0.5 / sqrt(1/3)
    assert_close(adv[:, 0], t([h, -h, -h, h, 0.0, 0.0, 0.0, 0.0]))
    assert (adv[4:] == 0).all()  # exactly zero, not eps-amplified rounding noise
    assert_close(adv, adv[:, :1] * mask)  # broadcast over the response only
    assert_close(ret, adv)
    adv_eps, _ = A.grpo_advantages(rewards, mask, group_ids=gids, eps=1e-6)
    assert_close(adv_eps[0, 0], t(0.5 / (math.sqrt(1 / 3) + 1e-6)))


def test_drgrpo_no_std_division():
    rewards, mask = _outcome_rewards([1.0, 2.0, 6.0, 4.0, 4.0], [2, 2, 1, 2, 1], T=2)
    gids = torch.tensor([0, 0, 0, 1, 1])
    adv, ret = A.ADVANTAGE_ESTIMATORS["drgrpo"](rewards, mask, group_ids=gids)
    assert_close(adv, t([[-2.0, -2.0], [-1.0, -1.0], [3.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    assert_close(ret, adv)


def test_rloo_leave_one_out_baseline():
    rewards, mask = _outcome_rewards([1.0, 2.0, 6.0, 3.0, -1.0, 8.0], [1, 1, 1, 1, 1, 1], T=1)
    gids = torch.tensor([0, 0, 0, 1, 1, 2])
    adv, _ = A.ADVANTAGE_ESTIMATORS["rloo"](rewards, mask, group_ids=gids)
    # 1 - (2+6)/2, 2 - (1+6)/2, 6 - (1+2)/2 ; 3 - (-1), -1 - 3 ; singleton -> 0
    assert_close(adv[:, 0], t([-3.0, -1.5, 4.5, 4.0, -4.0, 0.0]))
    for gid in (0, 1, 2):
        assert_close(adv[gids == gid, 0].sum(), t(0.0))


def test_reinforce_batch_baseline():
    rewards, mask = _outcome_rewards([1.0, 2.0, 6.0], [2, 1, 2], T=2)
    adv, ret = A.ADVANTAGE_ESTIMATORS["reinforce"](rewards, mask)
    assert_close(adv, t([[-2.0, -2.0], [-1.0, 0.0], [3.0, 3.0]]))
    assert_close(ret, adv)


def test_reinforce_baseline_keeps_policy_gradient_expectation():
    """Exact enumeration: sum_a pi(a) (r(a) - b) grad log pi(a) == sum_a pi(a) r(a) grad log pi(a)."""
    logits = t([0.3, -1.2, 2.0, 0.5]).requires_grad_()
    r = t([1.0, 4.0, -2.0, 3.0])
    adv, _ = A.ADVANTAGE_ESTIMATORS["reinforce"](r[:, None], torch.ones(4, 1, dtype=D))
    baseline = r - adv[:, 0]
    assert_close(baseline, torch.full((4,), 1.5, dtype=D))  # a non-trivial constant baseline

    def expected_grad(weights):
        logp = torch.log_softmax(logits, 0)
        (g,) = torch.autograd.grad((logp.exp().detach() * weights * logp).sum(), logits)
        return g

    g_with_baseline = expected_grad(adv[:, 0])
    g_raw = expected_grad(r)
    assert_close(g_with_baseline, g_raw)
    assert g_raw.abs().max() > 0.1


def test_reinforce_pp_discounted_and_whitened():
    rewards = t([[0.0, 1.0, -0.5], [2.0, 0.0, 0.0]])
    mask = t([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv, ret = A.ADVANTAGE_ESTIMATORS["reinforce_pp"](rewards, mask, gamma=0.5)
    # row 0: G2 = -.5, G1 = 1 + .5*-.5 = .75, G0 = .5*.75 = .375 ; row 1: G0 = 2 (padding reward never leaks)
    assert_close(ret, t([[0.375, 0.75, -0.5], [2.0, 0.0, 0.0]]))
    g = t([0.375, 0.75, -0.5, 2.0])
    assert_close(adv[mask.bool()], (g - g.mean()) / (g.var() + 1e-8).sqrt())
    assert (adv[~mask.bool()] == 0).all()


def test_process_supervision_advantages_hand_example():
    # group 0: sample 0 has steps ending at tokens 1, 4 (rewards 1, 0); sample 1 one step ending at 2 (0.5), its
    # second step slot is padding. All group-0 steps: [1, 0, .5] -> mean .5, unbiased std .5 -> [1, -1, 0].
    # group 1: sample 2 steps [3, 1] ending at 0, 2 -> mean 2, std sqrt(2) -> [1/sqrt2, -1/sqrt2].
    step_rewards = t([[1.0, 0.0], [0.5, 99.0], [3.0, 1.0]])
    step_mask = t([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    step_end = torch.tensor([[1, 4], [2, -1], [0, 2]])
    response_mask = t([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    gids = torch.tensor([0, 0, 1])
    adv = A.process_supervision_advantages(step_rewards, step_mask, step_end, response_mask, gids, eps=0.0)
    s = 1 / math.sqrt(2)
    expected = t([
        [0.0, 0.0, -1.0, -1.0, -1.0],  # tokens 0-1 see both steps (1 - 1), tokens 2-4 only the last (-1)
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, -s, -s, 0.0, 0.0],  # token 0 sees s - s, tokens 1-2 the second step
    ])
    assert_close(adv, expected)


# --------------------------------------------------------------------------------------------- aggregation / losses


def test_aggregate_loss_modes():
    loss_mat = t([[1.0, 2.0, 3.0], [4.0, 0.0, 7.0]])
    mask = t([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert_close(A.aggregate_loss(loss_mat, mask, "token-mean"), t(10.0 / 4))
    assert_close(A.aggregate_loss(loss_mat, mask, "seq-mean-token-mean"), t((2.0 + 4.0) / 2))
    assert_close(A.aggregate_loss(loss_mat, mask, "seq-mean-token-sum-norm", max_len=4), t((6 / 4 + 4 / 4) / 2))
    assert_close(A.aggregate_loss(loss_mat, mask, "seq-mean-token-sum-norm"), t((6 / 3 + 4 / 3) / 2))  # max_len=T
    assert set(A.LOSS_AGG_MODES) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"}
    with pytest.raises(ValueError):
        A.aggregate_loss(loss_mat, mask, "seq-sum")


def _ppo_token(ratio, adv, **kw):
    """One-token PPO loss and d loss / d logp for a given ratio and advantage."""
    logp = t([[math.log(ratio)]]).requires_grad_()
    loss, stats = A.ppo_policy_loss(logp, t([[0.0]]), t([[adv]]), t([[1.0]]), **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.item(), grad.item(), stats


def test_ppo_clip_positive_advantage_above_upper_bound():
    loss, grad, stats = _ppo_token(1.5, 1.0, clip_low=0.2)
    assert loss == pytest.approx(-1.2)  # -A * min(r, 1 + eps)
    assert grad == 0.0
    assert stats["clip_fraction"].item() == 1.0
    loss, grad, stats = _ppo_token(1.1, 1.0, clip_low=0.2)  # inside the trust region: plain -A r
    assert loss == pytest.approx(-1.1) and grad == pytest.approx(-1.1)
    assert stats["clip_fraction"].item() == 0.0


def test_ppo_clip_negative_advantage_below_lower_bound():
    loss, grad, stats = _ppo_token(0.5, -1.0, clip_low=0.2)
    assert loss == pytest.approx(0.8)  # -A * max(r, 1 - eps)
    assert grad == 0.0
    assert stats["clip_fraction"].item() == 1.0
    # pessimism: a negative advantage with r > 1 + eps is NOT clipped
    loss, grad, stats = _ppo_token(1.5, -1.0, clip_low=0.2)
    assert loss == pytest.approx(1.5) and grad == pytest.approx(1.5)
    assert stats["clip_fraction"].item() == 0.0


def test_ppo_clip_higher_asymmetry():
    # eps_low = .2, eps_high = .28: r = 1.25 would be clipped symmetrically but not with clip-higher
    loss_sym, grad_sym, _ = _ppo_token(1.25, 1.0, clip_low=0.2)
    loss_hi, grad_hi, _ = _ppo_token(1.25, 1.0, clip_low=0.2, clip_high=0.28)
    assert loss_sym == pytest.approx(-1.2) and grad_sym == 0.0
    assert loss_hi == pytest.approx(-1.25) and grad_hi == pytest.approx(-1.25)
    assert _ppo_token(1.3, 1.0, clip_low=0.2, clip_high=0.28)[0] == pytest.approx(-1.28)
    # the lower bound still uses eps_low
    assert _ppo_token(0.75, -1.0, clip_low=0.2, clip_high=0.28)[0] == pytest.approx(0.8)
    assert _ppo_token(0.75, -1.0, clip_low=0.3, clip_high=0.28)[0] == pytest.approx(0.75)


def test_ppo_batch_stats_and_aggregation():
    logp = t([[math.log(1.5), math.log(1.1), 0.0], [math.log(0.5), 0.0, 0.0]])
    old = torch.zeros_like(logp)
    adv = t([[1.0, 1.0, 5.0], [-1.0, 2.0, 2.0]])
    mask = t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, stats = A.ppo_policy_loss(logp, old, adv, mask)
    assert_close(loss, t((-1.2 - 1.1 + 0.8) / 3))
    loss_seq, _ = A.ppo_policy_loss(logp, old, adv, mask, loss_agg_mode="seq-mean-token-mean")
    assert_close(loss_seq, t(((-1.2 - 1.1) / 2 + 0.8) / 2))
    assert_close(stats["clip_fraction"], t(2 / 3))
    assert_close(stats["ratio_mean"], t((1.5 + 1.1 + 0.5) / 3))
    k3 = [r - math.log(r) - 1 for r in (1.5, 1.1, 0.5)]  # k3 of KL(old || new), samples from old: r = new/old
    assert_close(stats["approx_kl"], t(sum(k3) / 3))
    assert not any(v.requires_grad for v in stats.values())


def test_clipped_value_loss():
    values = t([[1.0, 1.0, 3.0]])
    old = t([[0.5, 0.9, 0.0]])
    returns = t([[2.0, 0.0, 0.0]])
    mask = t([[1.0, 1.0, 0.0]])
    loss, clipfrac = A.clipped_value_loss(values, old, returns, mask, clip_eps=0.2)
    # token 0: clip -> .7, max(1, 1.69) = 1.69 (clipped); token 1: within range, 1.0
    assert_close(loss, t(0.5 * (1.69 + 1.0) / 2))
    assert_close(clipfrac, t(0.5))


def test_entropy_from_logits():
    logits = t([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    ent = A.entropy_from_logits(logits)
    assert_close(ent[0, 0], t(math.log(4)))
    assert ent[0, 1].item() < 1e-40
    rnd = torch.randn(3, 5, 11, dtype=D, generator=torch.Generator().manual_seed(0))
    assert_close(A.entropy_from_logits(rnd), torch.distributions.Categorical(logits=rnd).entropy())


def test_explained_variance():
    returns = t([[1.0, 2.0, 3.0, 50.0]])
    mask = t([[1.0, 1.0, 1.0, 0.0]])
    assert_close(A.explained_variance(t([[1.0, 2.0, 2.0, 0.0]]), returns, mask), t(2 / 3))  # 1 - (1/3) / 1
    assert_close(A.explained_variance(returns, returns, mask), t(1.0))
    assert_close(A.explained_variance(torch.full_like(returns, 2.0), returns, mask), t(0.0))
    assert A.explained_variance(returns, torch.ones_like(returns), mask).isnan()


# --------------------------------------------------------------------------------------------- reward model


def test_kwise_pairs():
    assert A.kwise_pairs(3).tolist() == [[0, 1], [0, 2], [1, 2]]
    assert A.kwise_pairs(4).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    assert A.kwise_pairs(4).dtype == torch.long
    for K in range(2, 8):
        assert A.kwise_pairs(K).shape == (math.comb(K, 2), 2)


def test_bradley_terry_kwise_loss_hand_values():
    # prompt 0 sorted best-first; prompt 1 the same responses in another order: same loss
    scores = t([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    ranks = torch.tensor([[0, 1, 2], [2, 0, 1]])
    expected = -(logsig(1.0) + logsig(2.0) + logsig(1.0)) / 3
    assert_close(A.bradley_terry_kwise_loss(scores, ranks), t(expected))
    # a wrong ordering costs more: margins -1, -2, -1
    wrong = -(logsig(-1.0) + logsig(-2.0) + logsig(-1.0)) / 3
    assert_close(A.bradley_terry_kwise_loss(scores[:1], torch.tensor([[2, 1, 0]])), t(wrong))
    # batch mean over prompts; prompt 1 ranked 0 > 2 > 1 by score 0, 1, 2: margins -1 (0,2), -2 (0,1), -1 (2,1)
    both = A.bradley_terry_kwise_loss(scores, torch.tensor([[0, 1, 2], [0, 2, 1]]))
    assert_close(both, t((expected + wrong) / 2))


def test_bradley_terry_ties_skipped():
    scores = t([[1.0, 0.0, 0.0], [3.0, 1.0, 2.0]])
    ranks = torch.tensor([[0, 0, 1], [0, 0, 0]])  # prompt 1: all tied -> no pairs, left out of the mean
    # prompt 0: pairs (0,2) margin 1, (1,2) margin 0; tie (0,1) skipped
    assert_close(A.bradley_terry_kwise_loss(scores, ranks), t(-(logsig(1.0) + logsig(0.0)) / 2))


def test_bradley_terry_gradient_flows_to_scores():
    scores = t([[0.5, -0.3, 0.1, 0.0]]).requires_grad_()
    A.bradley_terry_kwise_loss(scores, torch.tensor([[0, 1, 2, 3]])).backward()
    assert scores.grad[0, 0] < 0 and scores.grad[0, 3] > 0  # push the best up, the worst down


def test_pairwise_accuracy():
    scores = t([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 1.0, 0.0]])
    ranks = torch.tensor([[0, 1, 2], [0, 1, 2], [0, 1, 1]])
    # prompt 0: 3/3, prompt 1: 0/3, prompt 2: (0,1) equal scores = wrong, (0,2) right, (1,2) tie skipped -> 1/2
    assert_close(A.pairwise_accuracy(scores, ranks), t(4 / 8))


def test_normalization_bias_zero_mean():
    demo = t([0.5, 1.25, -3.0, 2.0])
    b = A.normalization_bias(demo)
    assert isinstance(b, float)
    assert b == -0.1875  # -(0.5 + 1.25 - 3 + 2) / 4
    assert (demo + b).mean().item() == 0.0
    rnd = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3 + 7
    assert_close((rnd.double() + A.normalization_bias(rnd)).mean(), t(0.0), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------- preference losses


def _pref_inputs():
    pc, pr = t([-1.0, -2.0, -0.5]), t([-1.5, -1.0, -3.0])
    rc, rr = t([-1.2, -1.8, -0.5]), t([-1.0, -1.1, -2.0])
    return pc, pr, rc, rr


def test_dpo_sigmoid_hand_value_and_rewards():
    pc, pr, rc, rr = _pref_inputs()
    beta = 0.1
    losses, cr, rj = A.preference_loss(pc, pr, rc, rr, beta)
    h = (pc - rc) - (pr - rr)  # [.7, -.3, 1.0]
    assert_close(h, t([0.7, -0.3, 1.0]))
    assert_close(losses, t([-logsig(beta * x) for x in h.tolist()]))
    assert_close(cr, beta * (pc - rc))
    assert_close(rj, beta * (pr - rr))


def test_dpo_gradient_weight():
    """d loss / d logpi(y_w) = -beta sigma(r_l - r_w) (Rafailov et al. 2023, §4)."""
    pc, pr, rc, rr = _pref_inputs()
    pc = pc.clone().requires_grad_()
    pr = pr.clone().requires_grad_()
    beta = 0.5
    losses, r_w, r_l = A.preference_loss(pc, pr, rc, rr, beta)
    g_w, g_l = torch.autograd.grad(losses.sum(), (pc, pr))
    weight = torch.sigmoid(r_l - r_w)
    assert_close(g_w, -beta * weight)
    assert_close(g_l, beta * weight)
    assert not r_w.requires_grad


def test_ipo_minimised_at_half_inverse_tau():
    tau = 0.1
    margins = torch.linspace(0.0, 10.0, 1001, dtype=D)
    zeros = torch.zeros_like(margins)
    losses, _, _ = A.preference_loss(margins, zeros, zeros, zeros, tau, loss_type="ipo")
    assert margins[losses.argmin()].item() == pytest.approx(1 / (2 * tau))
    h = t([5.0]).requires_grad_()
    loss, _, _ = A.preference_loss(h, t([0.0]), t([0.0]), t([0.0]), tau, loss_type="ipo")
    (g,) = torch.autograd.grad(loss.sum(), h)
    assert g.item() == 0.0 and loss.item() == 0.0
    assert_close(A.preference_loss(t([1.0]), t([0.0]), t([0.0]), t([0.0]), tau, "ipo")[0], t([16.0]))
    with pytest.raises(ValueError):
        A.preference_loss(h, t([0.0]), t([0.0]), t([0.0]), tau, loss_type="ipo", label_smoothing=0.1)


def test_cdpo_label_smoothing():
    pc, pr, rc, rr = _pref_inputs()
    beta = 0.2
    dpo, _, _ = A.preference_loss(pc, pr, rc, rr, beta, "sigmoid")
    cdpo0, _, _ = A.preference_loss(pc, pr, rc, rr, beta, "cdpo", label_smoothing=0.0)
    assert_close(cdpo0, dpo)
    cdpo, _, _ = A.preference_loss(pc, pr, rc, rr, beta, "cdpo", label_smoothing=0.1)
    h = [0.7, -0.3, 1.0]
    assert_close(cdpo, t([-0.9 * logsig(beta * x) - 0.1 * logsig(-beta * x) for x in h]))
    assert set(A.PREFERENCE_LOSSES) >= {"sigmoid", "ipo", "cdpo"}
    with pytest.raises(ValueError):
        A.preference_loss(pc, pr, rc, rr, beta, "hinge-ish")


def test_kto_loss_weights_and_hand_values():
    policy, ref = t([1.0, 0.0]), t([0.0, 1.0])  # log-ratios r = [1, -1]
    desirable = torch.tensor([True, False])
    beta, kl = 0.5, t(0.4)
    losses, rewards = A.kto_loss(policy, ref, desirable, kl, beta)
    d, u = 1 - sig(0.5 * (1.0 - 0.4)), 1 - sig(0.5 * (0.4 + 1.0))
    assert_close(losses, t([d, u]))
    assert_close(rewards, t([0.5, -0.5]))
    weighted, _ = A.kto_loss(policy, ref, desirable, kl, beta, desirable_weight=2.0, undesirable_weight=3.0)
    assert_close(weighted, t([2 * d, 3 * u]))
    # z0 is clamped at 0 and detached
    kl_neg = t(-5.0).requires_grad_()
    clamped, _ = A.kto_loss(policy, ref, desirable, kl_neg, beta)
    assert_close(clamped, t([1 - sig(0.5), 1 - sig(0.5)]))
    assert not clamped.requires_grad


# --------------------------------------------------------------------------------------------------- distillation


def test_distillation_loss_hand_values():
    # token 0: at tau = 2 the teacher's logits [0, 2 ln 3] give p = [1/4, 3/4], the student's [0, 0] q = [1/2, 1/2];
    # token 1: student = teacher (KL 0); token 2 is masked out (its logits are garbage)
    tau = 2.0
    teacher = t([[[0.0, 2 * math.log(3)], [1.0, -1.0], [0.0, 0.0]]])
    student = t([[[0.0, 0.0], [1.0, -1.0], [50.0, -50.0]]])
    mask = t([[1.0, 1.0, 0.0]])
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert_close(A.distillation_loss(student, teacher, mask, tau), t(tau ** 2 * kl / 2))
    assert_close(A.distillation_loss(teacher, teacher, mask, tau), t(0.0))
    # at tau = 1 the same logits: p = softmax([0, 2 ln 3]) = [1/10, 9/10]
    kl1 = 0.1 * math.log(0.1 / 0.5) + 0.9 * math.log(0.9 / 0.5)
    assert_close(A.distillation_loss(student, teacher, mask), t(kl1 / 2))


# --------------------------------------------------------------------------------------------- log-probs / helpers


def test_token_and_sequence_logprobs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=D, generator=g)
    labels = torch.tensor([[1, 4, 0], [2, 2, 3]])
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    assert_close(A.token_logprobs(logits, labels), expected)
    mask = t([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert_close(A.sequence_logprobs(logits, labels, mask), (expected * mask).sum(-1))
    # uniform logits: each token log(1/4); -100 padding labels are fine outside the mask
    uniform = torch.zeros(1, 3, 4, dtype=D)
    seq = A.sequence_logprobs(uniform, torch.tensor([[3, 0, -100]]), t([[1.0, 1.0, 0.0]]))
    assert_close(seq, t([2 * math.log(0.25)]))


def test_groups_with_signal():
    scores = t([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 2.0, 0.3])
    gids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 5])
    assert A.groups_with_signal(scores, gids).tolist() == [True, True, True, False, False, True, True, False]
    assert A.groups_with_signal(torch.tensor([1, 1]), torch.tensor([4, 4])).dtype == torch.bool


def test_outcome_token_rewards_on_last_response_token():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert_close(A.outcome_token_rewards(torch.tensor([2.0, -1.0]), mask),
                 torch.tensor([[0.0, 0.0, 2.0], [-1.0, 0.0, 0.0]]))


def test_aggregate_loss_leaves_fully_masked_rows_out():
    loss = torch.tensor([[1.0, 3.0], [5.0, 7.0], [100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])  # the last row is e.g. a masked truncated sample
    assert_close(A.aggregate_loss(loss, mask, "seq-mean-token-mean"), torch.tensor((2.0 + 5.0) / 2))
    assert_close(A.aggregate_loss(loss, mask, "seq-mean-token-sum-norm", max_len=4), torch.tensor((4.0 + 5.0) / 2 / 4))
    for mode in A.LOSS_AGG_MODES:
        empty = torch.zeros_like(mask)
        assert A.aggregate_loss(loss.requires_grad_(), empty, mode).item() == 0.0  # no NaN


def test_pairwise_accuracy_all_tied_is_zero_not_nan():
    assert A.pairwise_accuracy(torch.tensor([[0.3, 0.1]]), torch.tensor([[0, 0]])).item() == 0.0


def test_the_names_params_accept_are_the_registries_names():
    from typing import get_args

    from stages import params
    from stages.kinds.rejection_sampling import FilterName
    from stages.runs.rejection_sampling import FILTERS

    assert params.ADVANTAGE_ESTIMATORS == tuple(A.ADVANTAGE_ESTIMATORS)
    assert set(params.OUTCOME_ESTIMATORS) <= set(A.ADVANTAGE_ESTIMATORS) - {"gae"}
    assert params.LOSS_AGG_MODES == tuple(A.LOSS_AGG_MODES)
    assert get_args(FilterName) == tuple(FILTERS)
