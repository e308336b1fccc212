"""GRPO maths: hand-computed advantages (NaN rows, constant groups) and clipped loss with the k3 KL term."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import embedrl.train.grpo_math as grpo_math
from embedrl.rewards.terms import RolloutKey
from embedrl.train.grpo_math import group_advantages, group_stats, grpo_loss

EPS = 1e-6


def test_doctests():
    result = doctest.testmod(grpo_math)
    assert result.attempted >= 2 and result.failed == 0


def _close(actual: torch.Tensor, expected: list[float], tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# group_advantages
# ----------------------------------------------------------------------------------------------------------------


def test_advantages_hand_case_and_constant_group():
    # group 1: mean 2, sample std 1 → ∓1/(1 + 1e-6); group 2: constant → exactly 0
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3)
    _close(adv, [-1 / (1 + EPS), 0.0, 1 / (1 + EPS), 0.0, 0.0, 0.0], tol=1e-7)
    assert adv[3:].eq(0).all()


def test_advantages_nan_rows_are_left_out():
    # valid 1, 3, 4: mean 8/3, deviations -5/3, 1/3, 4/3, sample var (25 + 1 + 16)/9/2 = 7/3, std 1.527525
    adv = group_advantages(torch.tensor([1.0, math.nan, 3.0, 4.0]), 4)
    std = math.sqrt(7 / 3)
    _close(adv, [-5 / 3 / std, 0.0, 1 / 3 / std, 4 / 3 / std])
    assert adv[1] == 0.0 and not adv.isnan().any()


def test_advantages_degenerate_groups_are_zero():
    r = torch.tensor([math.nan, math.nan, 7.0, math.nan, 0.1, 0.1, 0.1, math.nan])
    adv = group_advantages(r, 2)  # all-NaN group, one valid reward, 0.1 ×2 (rounding must not leak), 0.1 + NaN
    assert adv.tolist() == [0.0] * 8
    stats, _ = group_stats(r, 2)
    assert stats.count.tolist() == [0, 1, 2, 1]
    assert stats.constant.tolist() == [True, True, True, True]
    assert math.isnan(stats.mean[0].item()) and stats.std.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_advantages_unscaled():
    _close(group_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, math.nan]), 3, scale=False), [-2, -1, 3, -2, 2, 0])


def test_advantages_by_group_ids_in_any_order():
    # interleaved [a, b, a, b]: a = {1, 3} → mean 2, std √2 → ∓1/√2; b = {10, 10} constant → 0
    ids = [("p0", "query"), ("p0", "target"), ("p0", "query"), ("p0", "target")]
    adv = group_advantages(torch.tensor([1.0, 10.0, 3.0, 10.0]), ids)
    _close(adv, [-1 / math.sqrt(2), 0.0, 1 / math.sqrt(2), 0.0])
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 10.0, 3.0, 10.0]), torch.tensor([0, 1, 0, 1])), adv)
    # the same rewards laid out in blocks give the same per-row advantages
    blocks = group_advantages(torch.tensor([1.0, 3.0, 10.0, 10.0]), 2)
    torch.testing.assert_close(blocks[[0, 2, 1, 3]], adv)


def test_advantages_follow_keys_under_permutation():
    g = torch.Generator().manual_seed(0)
    keys = [RolloutKey(p, s, r) for p in "abc" for s in ("query", "target") for r in range(4)]
    rewards = torch.rand(len(keys), generator=g)
    adv = group_advantages(rewards, [k[:2] for k in keys])
    perm = torch.randperm(len(keys), generator=g)
    adv_p = group_advantages(rewards[perm], [keys[i][:2] for i in perm])
    torch.testing.assert_close(adv_p, adv[perm])


def test_advantages_validation():
    with pytest.raises(ValueError, match="groups of num_generations=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="3 group ids for 4"):
        group_advantages(torch.zeros(4), ["a", "a", "b"])
    with pytest.raises(ValueError, match=r"must be \[N\]"):
        group_advantages(torch.zeros(2, 2), 2)


# ----------------------------------------------------------------------------------------------------------------
# grpo_loss
# ----------------------------------------------------------------------------------------------------------------


def test_loss_clipping_both_signs_hand_case():
    # old_logp = 0, so ρ = exp(logp). ε = 0.2.
    #  A = +1: ρ 1.5 → clipped to 1.2 (−1.2, no grad); ρ 0.9 → −0.9; ρ 0.5 → min(0.5, 0.8) = 0.5 → −0.5 (not clipped)
    #  A = −1: ρ 0.5 → −min(−0.5, −0.8) = 0.8 (clipped, no grad); ρ 1.1 → 1.1; ρ 1.5 → −min(−1.5, −1.2) = 1.5
    ratios = torch.tensor([[1.5, 0.9, 0.5], [0.5, 1.1, 1.5]])
    logp = ratios.log().requires_grad_()
    loss, stats = grpo_loss(logp, torch.zeros(2, 3), None, torch.tensor([1.0, -1.0]), torch.ones(2, 3))
    assert loss.item() == pytest.approx((-1.2 - 0.9 - 0.5 + 0.8 + 1.1 + 1.5) / 6, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 6)
    assert stats["ratio"].item() == pytest.approx(1.0)
    assert "kl" not in stats
    loss.backward()
    # d(−ρA)/d logp = −ρA on unclipped tokens, 0 where the clip is active; divided by |T| = 6
    _close(logp.grad, [[0.0, -0.9 / 6, -0.5 / 6], [0.0, 1.1 / 6, 1.5 / 6]], tol=1e-6)
    assert all(not v.requires_grad for v in stats.values())


def test_loss_kl_term_at_known_delta():
    # δ = log π_ref − log π_θ: ln 2 → 2 − ln 2 − 1 = 0.306853; −ln 2 → 0.5 + ln 2 − 1 = 0.193147; 15 → clamped to 10
    logp = torch.zeros(1, 4, requires_grad=True)
    ref = torch.tensor([[math.log(2), -math.log(2), 15.0, 0.0]])
    loss, stats = grpo_loss(logp, torch.zeros(1, 4), ref, torch.zeros(1), torch.ones(1, 4), beta=0.1)
    assert stats["kl"].item() == pytest.approx((0.306853 + 0.193147 + 10.0 + 0.0) / 4, abs=1e-5)
    assert loss.item() == pytest.approx(0.1 * 2.625, abs=1e-6)
    loss.backward()
    # d k3 / d logp = 1 − exp(δ): −1 at ln 2, 0.5 at −ln 2, 0 where clamped, 0 at δ = 0; × β / |T|
    _close(logp.grad, [[-0.1 / 4, 0.05 / 4, 0.0, 0.0]], tol=1e-7)


def test_loss_kl_stays_finite_for_extreme_delta():
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, stats = grpo_loss(
        logp, torch.zeros(1, 2), torch.tensor([[1e4, -1e4]]), torch.zeros(1), torch.ones(1, 2), beta=1.0
    )
    assert stats["kl"].item() == pytest.approx(10.0) and math.isfinite(loss.item())
    loss.backward()
    assert torch.isfinite(logp.grad).all()


def test_loss_beta_zero_ignores_kl_but_reports_it():
    logp = torch.zeros(1, 2)
    ref = torch.full((1, 2), math.log(2))
    loss, stats = grpo_loss(logp, logp, ref, torch.tensor([0.5]), torch.ones(1, 2), beta=0.0)
    assert loss.item() == pytest.approx(-0.5)
    assert stats["kl"].item() == pytest.approx(0.306853, abs=1e-6)


def test_loss_token_mean_and_mask():
    # on-policy (ρ = 1): loss = −Σ_tokens A / |T|; row 0 has 3 tokens with A = 1, row 1 one token with A = −1
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, _ = grpo_loss(logp, logp, None, torch.tensor([1.0, -1.0]), mask)
    assert loss.item() == pytest.approx(-(3 - 1) / 4)
    # masked tokens do not count, whatever their ratio
    wild = torch.tensor([[0.0, 0.0, 0.0], [0.0, 5.0, -5.0]])
    loss2, stats2 = grpo_loss(wild, logp, None, torch.tensor([1.0, -1.0]), mask.bool())
    assert loss2.item() == pytest.approx(loss.item()) and stats2["clipfrac"].item() == 0.0
    empty, _ = grpo_loss(logp, logp, None, torch.tensor([1.0, -1.0]), torch.zeros(2, 3))
    assert empty.item() == 0.0


def test_loss_validation():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(z, z, None, torch.zeros(2), torch.ones(2, 3), beta=0.01)
    with pytest.raises(ValueError, match=r"adv must be \[N=2\]"):
        grpo_loss(z, z, None, torch.zeros(2, 1), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"must all be \[N, T\]"):
        grpo_loss(z, z, None, torch.zeros(2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="ref_logp must be"):
        grpo_loss(z, z, torch.zeros(2, 2), torch.zeros(2), torch.ones(2, 3))
