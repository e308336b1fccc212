"""GRPO maths (docs/method.md §4.2): group-normalised advantages and the clipped policy loss with a k3 KL term.

Pure tensor functions with hand-computed tests (``tests/test_grpo_math.py``); no model, optimiser or trainer here.
TRL's ``GRPOTrainer`` runs the update; this module is the written-out objective its loss is checked against
(``tests/test_grpo_trl.py``: same loss on the same log-probs, so a TRL upgrade that changes the objective fails), and
gives the step metrics their constant-group counts and the sample tables their advantages.

    A_g     = (r_g − mean(r)) / (std(r) + 1e-6)                  per (pair, side) group of G rollouts
    ρ       = exp(log π_θ − log π_θold)                            per response token
    δ       = log π_ref − log π_θ,   KL = exp(δ) − δ − 1           "k3", clamped to [−10, 10]
    L       = (1/|T|) Σ_tokens [ −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) + β·KL ]      token-mean over the mini-batch
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["GroupStats", "group_advantages", "group_stats", "grpo_loss"]

KL_CLAMP = 10.0  # the k3 estimate is clamped to [-KL_CLAMP, KL_CLAMP] (docs/method.md §4.2)


GroupIds = int | Tensor | Sequence[Hashable]


def _group_index(groups: GroupIds, n: int) -> tuple[Tensor, int]:
    """``(index [n] long, n_groups)``: an int G means consecutive blocks of G rows; otherwise one id per row."""
    if isinstance(groups, int) and not isinstance(groups, bool):
        if groups < 1 or n % groups:
            raise ValueError(f"{n} rewards cannot be cut into groups of num_generations={groups}")
        return torch.arange(n) // groups, n // groups
    ids = groups.tolist() if isinstance(groups, Tensor) else list(groups)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} group ids for {n} rewards; give one id per reward")
    index: dict[Hashable, int] = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in ids], dtype=torch.long), len(index)


class GroupStats(NamedTuple):
    """Per-group reward statistics over the valid (non-NaN) rewards."""

    mean: Tensor  # [n_groups] float64 mean; NaN for a group without valid rewards
    std: Tensor  # [n_groups] float64 sample std (divisor n − 1); 0 with fewer than 2 valid rewards
    count: Tensor  # [n_groups] number of valid rewards
    # [n_groups] bool: < 2 valid rewards, or all equal (zero advantage; counted, docs/method.md §8.25)
    constant: Tensor


def group_stats(rewards: Tensor, groups: GroupIds) -> tuple[GroupStats, Tensor]:
    """``(GroupStats, index [N])`` of ``rewards`` [N] grouped by ``groups`` (int G or one id per reward)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N]; got {tuple(rewards.shape)}")
    idx, n_groups = _group_index(groups, rewards.shape[0])
    idx = idx.to(rewards.device)
    r = rewards.detach().double()  # [N]
    valid = ~torch.isnan(r)  # [N]
    zeros = torch.zeros(n_groups, dtype=torch.float64, device=r.device)
    count = zeros.index_add(0, idx, valid.double())  # [n_groups]
    mean = zeros.index_add(0, idx, torch.where(valid, r, 0.0)) / count  # [n_groups]; 0/0 = NaN when empty
    dev = torch.where(valid, r - mean[idx], 0.0)  # [N]
    std = (zeros.index_add(0, idx, dev**2) / (count - 1).clamp(min=1)).sqrt()  # [n_groups]
    std = torch.where(count >= 2, std, 0.0)
    inf = torch.full_like(zeros, float("inf"))
    gmax = (-inf).scatter_reduce(0, idx, torch.where(valid, r, -torch.inf), "amax")  # [n_groups]
    gmin = inf.scatter_reduce(0, idx, torch.where(valid, r, torch.inf), "amin")  # [n_groups]
    constant = (count < 2) | (gmax == gmin)
    return GroupStats(mean, std, count.long(), constant), idx


def group_advantages(rewards: Tensor, groups: GroupIds, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO advantages ``A = (r − mean) / (std + eps)`` within each group (docs/method.md §4.2).

    Args:
        rewards: [N] total rewards; NaN = not applicable, left out of its group's mean and std.
        groups: ``num_generations`` (consecutive blocks of G rows) or one hashable id per row, e.g. the
            ``(pair_id, side)`` of each :class:`~embedrl.rewards.terms.RolloutKey`, in any order.
        scale: divide by the group's sample std (divisor n − 1, as ``torch.std``); False gives ``r − mean``.
        eps: added to the std (1e-6 as in docs/method.md).

    Returns:
        [N] advantages in ``rewards``' dtype: 0 for NaN rows and for every row of a constant group (all valid
        rewards equal, or fewer than 2 of them), exactly, never ``x / eps`` noise.

    >>> [round(a, 4) for a in group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3).tolist()]
    [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    """
    stats, idx = group_stats(rewards, groups)
    r = rewards.detach().double()  # [N]
    adv = r - stats.mean[idx]  # [N]
    if scale:
        adv = adv / (stats.std[idx] + eps)
    keep = ~torch.isnan(r) & ~stats.constant[idx]  # [N]
    return torch.where(keep, adv, 0.0).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    adv: Tensor,
    mask: Tensor,
    eps_clip: float = 0.2,
    beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO loss with a k3 KL penalty, token-mean over the mini-batch (docs/method.md §4.2).

    Args:
        logp: [N, T] log π_θ of each response token (with grad).
        old_logp: [N, T] log π_θold (generation time; equals ``logp.detach()`` on the first on-policy pass).
        ref_logp: [N, T] log π_ref, or None when ``beta == 0``.
        adv: [N] one advantage per trajectory, broadcast over its tokens.
        mask: [N, T] 1 (or True) on response tokens that count.
        eps_clip: ε of ``clip(ρ, 1 − ε, 1 + ε)``.
        beta: KL weight β; the KL is a loss term, never subtracted from the reward.

    Returns:
        ``(loss, stats)``: the scalar loss (``Σ_tokens / |T|``, 0 when the mask is empty) and detached scalar stats
        over the masked tokens: ``clipfrac`` (tokens whose gradient the clip removes: ρ > 1+ε with A > 0, or ρ < 1−ε
        with A < 0), ``ratio`` (mean ρ), ``pg_loss`` and, when ``ref_logp`` is given, ``kl`` (mean clamped k3).

    >>> lp = torch.zeros(1, 2); loss, stats = grpo_loss(lp, lp, None, torch.tensor([1.0]), torch.ones(1, 2))
    >>> loss.item(), stats["ratio"].item(), stats["clipfrac"].item()
    (-1.0, 1.0, 0.0)
    """
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp, old_logp and mask must all be [N, T]; got {tuple(logp.shape)}, {tuple(old_logp.shape)}, "
            f"{tuple(mask.shape)}"
        )
    if adv.shape != logp.shape[:1]:
        raise ValueError(f"adv must be [N={logp.shape[0]}] (one per trajectory); got {tuple(adv.shape)}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (the reference policy's log-probs); pass it or set beta=0")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp must be [N, T] like logp; got {tuple(ref_logp.shape)}")
    m = mask.to(logp.dtype)  # [N, T]
    n_tokens = m.sum().clamp(min=1.0)
    a = adv.to(logp.dtype)[:, None]  # [N, 1]
    ratio = torch.exp(logp - old_logp)  # [N, T]
    clipped = ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip)  # [N, T]
    pg = -torch.minimum(ratio * a, clipped * a)  # [N, T]
    per_token = pg
    kl = None
    if ref_logp is not None:
        # δ is clamped to [-20, 20] before exp only to keep exp finite: beyond it k3 > 10 and is clamped anyway.
        delta = (ref_logp - logp).clamp(-20.0, 20.0)  # [N, T]
        kl = (torch.exp(delta) - delta - 1.0).clamp(-KL_CLAMP, KL_CLAMP)  # [N, T]
        if beta != 0.0:
            per_token = pg + beta * kl
    loss = (per_token * m).sum() / n_tokens
    with torch.no_grad():
        is_clipped = ((ratio > 1.0 + eps_clip) & (a > 0)) | ((ratio < 1.0 - eps_clip) & (a < 0))  # [N, T]
        stats = {
            "clipfrac": (is_clipped.to(m.dtype) * m).sum() / n_tokens,
            "ratio": (ratio * m).sum() / n_tokens,
            "pg_loss": (pg * m).sum() / n_tokens,
        }
        if kl is not None:
            stats["kl"] = (kl * m).sum() / n_tokens
    return loss, {k: v.detach() for k, v in stats.items()}
