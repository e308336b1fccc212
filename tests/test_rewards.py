"""EG-RL rewards: hand-computed outcome terms, Discriminator candidates and parsing, alignment under permutation."""

from __future__ import annotations

import doctest
import itertools
import math
import pickle
import random
import re
from collections import Counter

import pytest
import torch

import embedrl.rewards.terms as rewards_module
from embedrl.config import PRESETS, RewardConfig, config_from_dict, config_to_dict
from embedrl.rewards.terms import (
    OutcomeReward,
    ProcessReward,
    RolloutKey,
    RolloutScorer,
    SimilarityBatch,
    build_discriminator_candidates,
    build_reward_funcs,
    check_groups,
    derive_seed,
    format_reward,
    outcome_from_similarities,
    outcome_rewards,
    outcome_terms,
    parse_choice,
    rollout_keys,
    total_reward,
)

PAPER = RewardConfig()


def reference(**overrides) -> RewardConfig:
    with pytest.warns(UserWarning, match="shuffle_candidates=False"):
        return RewardConfig.from_preset("reference", **overrides)


def test_doctests():
    result = doctest.testmod(rewards_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 10 and result.failed == 0


# ----------------------------------------------------------------------------------------------------------------
# Hand-computed outcome terms. B = 2 pairs, G = 2 rollouts; rows = query anchors, columns = target rollouts.
# ----------------------------------------------------------------------------------------------------------------

PAIRS = ["p0", "p0", "p1", "p1"]
SIM = torch.tensor(
    [
        [0.9, 0.7, 0.5, 0.1],  # p0: both positives on top
        [0.6, 0.2, 0.4, 0.3],  # p0: a negative (0.4) beats a positive (0.2)
        [0.5, 0.5, 0.5, 0.5],  # p1: all equal
        [0.3, 0.8, 0.8, 0.9],  # p1: positive 0.8 (col 2) ties with negative 0.8 (col 1)
    ]
)
# softmax(s/0.5) weights over two negatives a > b: w_a = sigmoid((a - b) / 0.5)
#   row 0: w = σ(0.8) = 0.689974, s⁻ = 0.689974·0.5 + 0.310026·0.1 = 0.375990, s⁺ = 0.8,  m = 0.424010
#   row 1: w = σ(0.2) = 0.549834, s⁻ = 0.549834·0.4 + 0.450166·0.3 = 0.354983, s⁺ = 0.4,  m = 0.045017
#   row 2: s⁻ = 0.5, s⁺ = 0.5, m = 0
#   row 3: w = σ(1.0) = 0.731059, s⁻ = 0.731059·0.8 + 0.268941·0.3 = 0.665529, s⁺ = 0.85, m = 0.184471
# Top-2 (ties: negatives first): row 0 {0.9 P, 0.7 P}; row 1 {0.6 P, 0.4 N}; row 2 {N, N}; row 3 {0.9 P, 0.8 N}.
S_PLUS = [0.8, 0.4, 0.5, 0.85]
S_MINUS = [0.375990, 0.354983, 0.5, 0.665529]
MARGIN = [0.424010, 0.045017, 0.0, 0.184471]
ACC_PAPER = [1.0, 0.0, 0.0, 0.0]
ACC_FRAC = [1.0, 0.5, 0.0, 0.5]


def _close(actual, expected, tol=1e-5):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert abs(a - e) <= tol, (actual, expected)


def test_outcome_terms_paper_hand_computed():
    t = outcome_terms(SIM, PAIRS, PAIRS, 2, PAPER)
    _close(t["s_plus"].tolist(), S_PLUS)
    _close(t["s_minus"].tolist(), S_MINUS)
    _close(t["margin"].tolist(), MARGIN)
    assert t["acc_paper"].tolist() == ACC_PAPER
    assert t["acc_frac"].tolist() == ACC_FRAC
    _close(t["reward"].tolist(), [0.424010, 0.0, 0.0, 0.0])  # Acc_paper · m


def test_outcome_terms_reference_hand_computed():
    t = outcome_terms(SIM, PAIRS, PAIRS, 2, reference())
    _close(t["reward"].tolist(), [0.212005, 0.011254, 0.0, 0.046118])  # 0.5 · Acc_frac · m


def test_outcome_terms_mean_weighting():
    t = outcome_terms(SIM, PAIRS, PAIRS, 2, RewardConfig(negative_weighting="mean"))
    _close(t["s_minus"].tolist(), [0.3, 0.35, 0.5, 0.55])
    _close(t["margin"].tolist(), [0.5, 0.05, 0.0, 0.3])
    _close(t["reward"].tolist(), [0.5, 0.0, 0.0, 0.0])


def test_outcome_terms_acc_k_larger_than_g():
    # Top-3: row 3 = {0.9 P, 0.8 N, 0.8 P} holds both positives; row 1 = {0.6 P, 0.4 N, 0.3 N} does not.
    t = outcome_terms(SIM, PAIRS, PAIRS, 2, RewardConfig(acc_k=3))
    assert t["acc_paper"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert t["acc_frac"].tolist() == [1.0, 0.5, 0.5, 1.0]  # row 2: top-3 of four equal = N, N, P
    _close(t["reward"].tolist(), [0.424010, 0.0, 0.0, 0.184471])
    with pytest.raises(ValueError, match="acc_k=1 < G=2"):
        outcome_terms(SIM, PAIRS, PAIRS, 2, RewardConfig(acc_k=1))


def test_outcome_terms_g1():
    # B = 3, G = 1. Row 0: negatives 0.2, 0.1, w = σ(0.2) → s⁻ = 0.154983, m = 0.745017; rank 1 → Acc = 1.
    # Row 1: positive 0.4 < negative 0.5 → Acc = 0; s⁻ = σ(0.4)·0.5 + (1 − σ(0.4))·0.3 = 0.419738, m = −0.019738.
    # Row 2: all zero → m = 0, and the tie ranks the negatives first → Acc = 0.
    sim = torch.tensor([[0.9, 0.2, 0.1], [0.3, 0.4, 0.5], [0.0, 0.0, 0.0]])
    pairs = ["a", "b", "c"]
    t = outcome_terms(sim, pairs, pairs, 1, PAPER)
    _close(t["margin"].tolist(), [0.745017, -0.019738, 0.0])
    assert t["acc_paper"].tolist() == [1.0, 0.0, 0.0]
    _close(t["reward"].tolist(), [0.745017, 0.0, 0.0])
    _close(outcome_terms(sim, pairs, pairs, 1, reference())["reward"].tolist(), [0.372508, 0.0, 0.0])


def test_outcome_terms_all_equal_gives_zero():
    sim = torch.full((4, 4), 0.3)
    for cfg in (PAPER, reference(), RewardConfig(negative_weighting="mean")):
        t = outcome_terms(sim, PAIRS, PAIRS, 2, cfg)
        assert t["margin"].abs().max().item() < 1e-7
        assert t["acc_paper"].tolist() == [0.0] * 4 and t["acc_frac"].tolist() == [0.0] * 4
        assert t["reward"].abs().max().item() < 1e-7


def test_outcome_terms_do_not_depend_on_column_order():
    perm = [3, 0, 2, 1]
    t = outcome_terms(SIM, PAIRS, PAIRS, 2, PAPER)
    tp = outcome_terms(SIM[:, perm], PAIRS, [PAIRS[i] for i in perm], 2, PAPER)
    for name in t:
        torch.testing.assert_close(t[name], tp[name])


def test_outcome_terms_paper_reward_bounds_on_random_batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        u = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=1)
        v = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=1)
        pairs = ["a", "a", "b", "b", "c", "c"]
        t = outcome_terms(u @ v.T, pairs, pairs, 2, PAPER)
        hit = t["acc_paper"] == 1
        assert (t["reward"][~hit] == 0).all()
        assert ((t["reward"][hit] > 0) & (t["reward"][hit] <= 2)).all()  # 0 < R_out ≤ 2 under paper


def test_outcome_terms_validation():
    with pytest.raises(ValueError, match="sim must be"):
        outcome_terms(SIM[:3], PAIRS, PAIRS, 2, PAPER)
    with pytest.raises(ValueError, match="positive candidates, not G=3"):
        outcome_terms(SIM, PAIRS, PAIRS, 3, PAPER)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        outcome_terms(torch.ones(2, 2), ["a", "a"], ["a", "a"], 2, PAPER)
    with pytest.raises(ValueError, match="NaN"):
        outcome_terms(torch.full((4, 4), float("nan")), PAIRS, PAIRS, 2, PAPER)


# ----------------------------------------------------------------------------------------------------------------
# Keys and groups
# ----------------------------------------------------------------------------------------------------------------


def _keys(pairs, G, sides=("query", "target")):
    return [RolloutKey(p, s, g) for p in pairs for s in sides for g in range(G)]


def test_check_groups_accepts_and_returns_pairs():
    assert check_groups(_keys(["b", "a"], 3), 3) == ["b", "a"]
    assert check_groups(_keys(["b", "a"], 3)) == ["b", "a"]  # G inferred


@pytest.mark.parametrize(
    ("keys", "G", "match"),
    [
        (_keys(["a"], 2, sides=("query",)), 2, "pair 'a' has no target-side rollouts"),
        (_keys(["a", "b"], 2)[:-1], 2, r"pair 'b', side target: rollouts \[0\], expected exactly G=2"),
        (_keys(["a"], 2), 3, "pair 'a', side query: rollouts \\[0, 1\\], expected exactly G=3"),
        ([*_keys(["a"], 2), RolloutKey("a", "query", 1)], 2, "duplicate rollout key"),
        ([RolloutKey("a", "query", 0), RolloutKey("a", "query", 2), *_keys(["a"], 2, ("target",))], 2, "0..1"),
        ([], 2, "empty"),
    ],
)
def test_check_groups_errors(keys, G, match):
    with pytest.raises(ValueError, match=match):
        check_groups(keys, G)


def test_rollout_keys_from_columns():
    keys = rollout_keys([7, 7, 7, 7], ["query", "target", "query", "target"])
    assert keys == [("7", "query", 0), ("7", "target", 0), ("7", "query", 1), ("7", "target", 1)]
    assert rollout_keys(["a"], ["query"], [3]) == [("a", "query", 3)]
    with pytest.raises(ValueError, match="side values"):
        rollout_keys(["a"], ["candidate"])
    with pytest.raises(ValueError, match="differ in length"):
        rollout_keys(["a", "b"], ["query"])


def test_derive_seed_is_stable():
    assert derive_seed(0, "p", "query", 1) == derive_seed(0, "p", "query", 1)
    assert derive_seed(0, "p", "query", 1) != derive_seed(0, "p", "query", 2)
    assert derive_seed(1, "ab") == 472763488437693211  # pinned: the same across processes and Python runs


# ----------------------------------------------------------------------------------------------------------------
# outcome_rewards: embeddings in, keyed terms out, both directions
# ----------------------------------------------------------------------------------------------------------------


def _unit(n, d, seed):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_outcome_rewards_both_directions_match_outcome_terms():
    qk = _keys(["a", "b", "c"], 2, ("query",))
    tk = _keys(["a", "b", "c"], 2, ("target",))
    u, v = _unit(6, 8, 0), _unit(6, 8, 1)
    out = outcome_rewards(u, v, qk, tk, PAPER, G=2)
    pairs = [k.pair_id for k in qk]  # already canonical order
    q2t = outcome_terms(u @ v.T, pairs, pairs, 2, PAPER)
    t2q = outcome_terms(v @ u.T, pairs, pairs, 2, PAPER)
    for i, (kq, kt) in enumerate(zip(qk, tk, strict=True)):
        assert out[kq].margin == pytest.approx(q2t["margin"][i].item(), abs=1e-6)
        assert out[kt].margin == pytest.approx(t2q["margin"][i].item(), abs=1e-6)
        assert out[kq].reward == pytest.approx(q2t["reward"][i].item(), abs=1e-6)
        assert out[kt].acc_frac == t2q["acc_frac"][i].item()


def test_outcome_rewards_single_pair_is_not_applicable():
    out = outcome_rewards(
        _unit(2, 4, 0), _unit(2, 4, 1), _keys(["a"], 2, ("query",)), _keys(["a"], 2, ("target",)), PAPER
    )
    assert len(out) == 4 and all(v is None for v in out.values())


def test_outcome_rewards_rejects_zero_vectors_and_wrong_shapes():
    qk, tk = _keys(["a", "b"], 1, ("query",)), _keys(["a", "b"], 1, ("target",))
    u = _unit(2, 4, 0)
    with pytest.raises(ValueError, match="never a zero-vector"):
        outcome_rewards(u, torch.zeros(2, 4), qk, tk, PAPER)
    with pytest.raises(ValueError, match=r"tensor \[n=2, D\]"):
        outcome_rewards(u, _unit(3, 4, 1), qk, tk, PAPER)
    with pytest.raises(ValueError, match="differ in dimension"):
        outcome_rewards(u, _unit(2, 5, 1), qk, tk, PAPER)
    with pytest.raises(ValueError, match="side 'query'"):
        outcome_rewards(u, u, tk, qk, PAPER)


# ----------------------------------------------------------------------------------------------------------------
# Discriminator candidates, seeds and parsing
# ----------------------------------------------------------------------------------------------------------------

ANCHOR = RolloutKey("p0", "query", 0)
CANDS = [RolloutKey(p, "target", h) for p in ("p0", "p1", "p2", "p3") for h in (0, 1)]
# p0 (positives) .9 .8; best of p1 = .6 (h1); p2 = .7 (h0); p3 = .6 (h0, tie with h1 → lower index)
ROW = [0.9, 0.8, 0.1, 0.6, 0.7, 0.2, 0.6, 0.6]


def test_candidates_hand_case_unshuffled():
    keys, pos = build_discriminator_candidates(ANCHOR, ROW, CANDS, 2, 4, 0, shuffle=False)
    # positives by rollout, then negatives by best similarity (p2 .7; p1 and p3 tie at .6 → smaller pair id first)
    assert [(k.pair_id, k.rollout) for k in keys] == [("p0", 0), ("p0", 1), ("p2", 0), ("p1", 1), ("p3", 0)]
    assert pos == [0, 1]
    keys, _ = build_discriminator_candidates(ANCHOR, ROW, CANDS, 2, 2, 0, shuffle=False)
    assert [k.pair_id for k in keys] == ["p0", "p0", "p2", "p1"]  # top m_neg = 2 pairs


def test_candidates_shuffle_is_deterministic_per_key_and_order_free():
    seed = 11
    a = build_discriminator_candidates(ANCHOR, ROW, CANDS, 2, 4, seed)
    assert a == build_discriminator_candidates(ANCHOR, ROW, CANDS, 2, 4, seed)
    perm = [5, 2, 7, 0, 3, 6, 1, 4]
    assert a == build_discriminator_candidates(ANCHOR, [ROW[i] for i in perm], [CANDS[i] for i in perm], 2, 4, seed)
    keys, pos = a
    assert sorted(keys) == sorted(build_discriminator_candidates(ANCHOR, ROW, CANDS, 2, 4, seed, shuffle=False)[0])
    assert pos == [i for i, k in enumerate(keys) if k.pair_id == "p0"]
    anchors = [RolloutKey("p0", "query", r) for r in range(8)]
    orders = {tuple(build_discriminator_candidates(a, ROW, CANDS, 2, 4, seed)[0]) for a in anchors}
    assert len(orders) > 1  # the rollout index enters the seed


def test_candidate_shuffle_is_unbiased():
    # G = 2 positives among 4 candidates: the positive positions should be uniform over the C(4, 2) = 6 subsets.
    cands = CANDS[:6]
    row = ROW[:6]
    n = 6000
    counts = Counter(tuple(build_discriminator_candidates(ANCHOR, row, cands, 2, 2, step)[1]) for step in range(n))
    assert set(counts) == set(itertools.combinations(range(4), 2))
    expected = n / 6
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 25.0, counts  # 5 degrees of freedom: P(chi2 > 25) ≈ 1e-4
    first = Counter(build_discriminator_candidates(ANCHOR, row, cands, 2, 2, step)[1][0] for step in range(n))
    assert abs(first[0] / n - 0.5) < 0.03  # P(a positive in front) = 1/2


def test_candidates_validation():
    with pytest.raises(ValueError, match="expected G=3"):
        build_discriminator_candidates(ANCHOR, ROW, CANDS, 3, 4, 0)
    with pytest.raises(ValueError, match="7 similarities for 8"):
        build_discriminator_candidates(ANCHOR, ROW[:7], CANDS, 2, 4, 0)
    with pytest.raises(ValueError, match="target-side rollouts"):
        build_discriminator_candidates(ANCHOR, ROW, [k._replace(side="query") for k in CANDS], 2, 4, 0)
    with pytest.raises(ValueError, match="NaN"):
        build_discriminator_candidates(ANCHOR, [float("nan")] * 8, CANDS, 2, 4, 0)


@pytest.mark.parametrize(
    ("reply", "n", "expected"),
    [
        ("2", 4, 1),
        ("  Candidate 2\n", 4, 1),
        ("3.", 4, 2),
        ("+1", 4, 0),
        ("The answer is 4, not 1", 4, 3),
        ("10", 12, 9),
        ("0", 4, None),
        ("5", 4, None),
        ("-1", 4, None),
        ("2.5", 4, None),
        ("", 4, None),
        ("candidate two", 4, None),
    ],
)
def test_parse_choice(reply, n, expected):
    assert parse_choice(reply, n) == expected


# ----------------------------------------------------------------------------------------------------------------
# Reward classes on a toy world: deterministic Embedder and Discriminator stand-ins
# ----------------------------------------------------------------------------------------------------------------

TOPICS = {"p0": "red cube", "p1": "blue ball", "p2": "green cone"}


def toy_embed(side, texts, columns):
    """Unit vectors: the topic's direction plus text-seeded noise, so positives are close but not identical."""
    rows = []
    for text in texts:
        topic = text.split(" v")[0]
        base = torch.randn(16, generator=torch.Generator().manual_seed(derive_seed(topic) % 2**62))
        noise = torch.randn(16, generator=torch.Generator().manual_seed(derive_seed(text) % 2**62))
        rows.append(base + 0.8 * noise)
    return torch.nn.functional.normalize(torch.stack(rows), dim=1)


class ToyDiscriminator:
    """Picks the first candidate whose reasoning has the anchor's topic; replies 'unsure' to anchors with ' v1'."""

    def __init__(self):
        self.calls = 0
        self.prompts = []

    def __call__(self, prompts):
        self.calls += 1
        self.prompts = list(prompts)
        replies = []
        for p in prompts:
            anchor = p.split("Anchor reasoning: ")[1].split("\n")[0]
            if " v1" in anchor:
                replies.append("unsure")
                continue
            topic = anchor.split(" v")[0]
            found = re.findall(r"Candidate (\d+)(?: reasoning)?: ([^\n]*)", p)
            replies.append(next(i for i, text in found if text.startswith(topic)))
        return replies


def toy_batch(pairs=("p0", "p1", "p2"), G=2):
    """Rows laid out as [q(p)×G, t(p)×G, ...] with explicit rollout numbers."""
    rows = [(p, s, g) for p in pairs for s in ("query", "target") for g in range(G)]
    return {
        "prompts": [f"prompt {p} {s}" for p, s, _ in rows],
        "completions": [f"{TOPICS[p]} v{g}" + (" (target)" if s == "target" else "") for p, s, g in rows],
        "pair_id": [p for p, _, _ in rows],
        "side": [s for _, s, _ in rows],
        "rollout": [g for _, _, g in rows],
        "input_text": [f"find the {TOPICS[p]}" if s == "query" else "" for p, s, _ in rows],
        "cue_key": ["text_keywords"] * len(rows),
    }


def _permute(batch, perm):
    return {k: [v[i] for i in perm] for k, v in batch.items()}


def _run(batch, cfg=PAPER):
    funcs, _ = build_reward_funcs(cfg, toy_embed, ToyDiscriminator(), num_generations=2, seed=3)
    _, process, outcome = funcs
    return process(**batch), outcome(**batch)


@pytest.mark.parametrize("process_value", ["binary", "margin"])
def test_rewards_follow_their_trajectories_under_permutation(process_value):
    cfg = RewardConfig(process_value=process_value)
    batch = toy_batch()
    proc, out = _run(batch, cfg)
    assert all(r is not None for r in proc + out)
    assert len(set(out)) > 2 and len(set(proc)) >= 2  # non-trivial reward vectors
    rng = random.Random(0)
    for _ in range(3):
        perm = list(range(len(proc)))
        rng.shuffle(perm)
        proc_p, out_p = _run(_permute(batch, perm), cfg)
        assert proc_p == [proc[i] for i in perm]
        assert out_p == [out[i] for i in perm]


def test_interleaved_layout_gives_the_same_rewards():
    # [q1×G, t1×G, q2×G, …] vs [q1, t1, q2, t2, …]: identity comes from the keys, never from positions.
    batch = toy_batch()
    n = len(batch["pair_id"])
    interleaved = sorted(range(n), key=lambda i: (batch["rollout"][i], batch["pair_id"][i], batch["side"][i]))
    proc, out = _run(batch)
    proc_i, out_i = _run(_permute(batch, interleaved))
    assert proc_i == [proc[i] for i in interleaved] and out_i == [out[i] for i in interleaved]


def test_toy_process_reward_values_and_stats():
    batch = toy_batch()
    disc = ToyDiscriminator()
    reward = ProcessReward(disc, RolloutScorer(toy_embed), PAPER, num_generations=2, seed=3)
    values = reward(**batch)
    # the toy is right whenever it answers, and answers unless the anchor is rollout v1
    assert values == [0.0 if c.split(" (")[0].endswith(" v1") else 1.0 for c in batch["completions"]]
    assert disc.calls == 1 and len(disc.prompts) == 12  # one batched call for 2·B·G anchors
    assert reward.counts["parse_failures"] == 6 and reward.counts["discriminator_calls"] == 12
    assert reward.last_stats["reward/process/chance"] == pytest.approx(2 / 4)  # G / (G + min(m_neg, B − 1))
    assert reward.last_stats["reward/process/accuracy/query"] == 0.5
    # target-side anchors see each candidate query's input text; query-side anchors do not
    target_prompts = [p for p in disc.prompts if p.split("Anchor reasoning: ")[1].split("\n")[0].endswith("(target)")]
    assert len(target_prompts) == 6 and all("Candidate 1 input: find the" in p for p in target_prompts)
    assert not any("Candidate 1 input:" in p for p in disc.prompts if p not in target_prompts)


def test_process_reward_margin_value_equals_outcome_margin():
    cfg = RewardConfig(process_value="margin")
    batch = toy_batch()
    scorer = RolloutScorer(toy_embed)
    reward = ProcessReward(ToyDiscriminator(), scorer, cfg, num_generations=2)
    values = reward(**batch)
    keys = rollout_keys(batch["pair_id"], batch["side"], batch["rollout"])
    terms = outcome_from_similarities(scorer(keys, batch["completions"], {}), 2, cfg)
    for key, value, text in zip(keys, values, batch["completions"], strict=True):
        expected = 0.0 if text.split(" (")[0].endswith(" v1") else terms[key].margin
        assert value == pytest.approx(expected)


def _fixed_batch(sim):
    """A SimilarityBatch over B = 2, G = 2 with the given query × target similarities (canonical order)."""
    return SimilarityBatch(_keys(["p0", "p1"], 2, ("query",)), _keys(["p0", "p1"], 2, ("target",)), sim)


def test_process_reward_hand_case_unshuffled_reference():
    # reference preset: no shuffle, so the positives are candidates 1 and 2 and the one negative is candidate 3.
    cfg = reference(process_value="binary")
    batch = _fixed_batch(SIM)
    keys = [*batch.query_keys, *batch.target_keys]
    replies = {0: "1", 1: "3", 2: "Candidate 2", 3: "nine", 4: "4", 5: "2", 6: "3", 7: "1"}
    disc = lambda prompts: [replies[i] for i in range(len(prompts))]  # noqa: E731
    reward = ProcessReward(disc, RolloutScorer(toy_embed), cfg)
    texts = {k: f"tcot {k.pair_id} {k.side} {k.rollout}" for k in keys}
    out = reward.score(batch, texts, {k: f"input {k.pair_id}" for k in keys}, G=2, step=0)
    assert [out[k] for k in keys] == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert reward.counts["parse_failures"] == 2  # "nine" and "4" (out of range: 3 candidates)
    for k in keys:
        order, positions, _ = reward.last_choices[k]
        assert positions == [0, 1] and len(order) == 3
    # margin-valued process term: m of the anchor (row 0 of SIM: 0.424010) when the Discriminator is right
    reward = ProcessReward(disc, RolloutScorer(toy_embed), reference())
    out = reward.score(batch, texts, {k: "" for k in keys}, G=2, step=0)
    assert out[keys[0]] == pytest.approx(0.424010, abs=1e-5) and out[keys[1]] == 0.0


def test_single_pair_batch_is_not_applicable_and_counted():
    batch = toy_batch(pairs=("p0",))
    disc = ToyDiscriminator()
    funcs, _ = build_reward_funcs(PAPER, toy_embed, disc)
    _, process, outcome = funcs
    assert process(**batch) == [None] * 4 and outcome(**batch) == [None] * 4
    assert process.counts["batches_below_2"] == 1 and outcome.counts["batches_below_2"] == 1
    assert disc.calls == 0


def test_scorer_embeds_each_batch_once():
    calls = []

    def counting_embed(side, texts, columns):
        calls.append((side, len(texts), sorted(columns)))
        return toy_embed(side, texts, columns)

    funcs, weights = build_reward_funcs(PAPER, counting_embed, ToyDiscriminator())
    assert weights == [0.05, 0.8, 0.2]
    batch = toy_batch()
    funcs[1](**batch)
    funcs[2](**batch)
    assert [c[:2] for c in calls] == [("query", 6), ("target", 6)]
    assert "input_text" in calls[0][2] and "cue_key" in calls[0][2]  # columns reach the Embedder


def test_reward_classes_reject_bad_inputs():
    batch = toy_batch()
    outcome = OutcomeReward(RolloutScorer(toy_embed), PAPER, num_generations=3)
    with pytest.raises(ValueError, match="expected exactly G=3"):
        outcome(**batch)
    bad = dict(batch, side=[s if i else "target" for i, s in enumerate(batch["side"])])
    with pytest.raises(ValueError):
        OutcomeReward(RolloutScorer(toy_embed), PAPER)(**bad)
    process = ProcessReward(lambda prompts: ["1"], RolloutScorer(toy_embed), PAPER)
    with pytest.raises(ValueError, match="returned 1 replies for 12 prompts"):
        process(**batch)
    zero = OutcomeReward(RolloutScorer(lambda side, texts, cols: torch.zeros(len(texts), 4)), PAPER)
    with pytest.raises(ValueError, match="zero-vector"):
        zero(**batch)


def test_trl_style_call_with_extras_and_conversational_completions():
    batch = toy_batch()
    logged = {}
    conv = dict(batch, completions=[[{"role": "assistant", "content": c}] for c in batch["completions"]])
    outcome = OutcomeReward(RolloutScorer(toy_embed), PAPER)
    values = outcome(
        **conv,
        completion_ids=[[1, 2]] * 12,
        trainer_state=None,
        log_extra=None,
        log_metric=lambda name, value: logged.__setitem__(name, value),
    )
    assert values == _run(batch)[1]
    assert set(logged) == set(outcome.last_stats) and "reward/outcome/margin/target" in logged


def test_reward_objects_pickle():
    funcs, _ = build_reward_funcs(PAPER, toy_embed, ToyDiscriminator())
    batch = toy_batch()
    before = [f(**batch) for f in funcs]
    clones = pickle.loads(pickle.dumps(funcs))
    assert [f(**batch) for f in clones] == before
    assert [getattr(f, "__name__", None) for f in funcs[1:]] == ["process", "outcome"]


# ----------------------------------------------------------------------------------------------------------------
# Format reward
# ----------------------------------------------------------------------------------------------------------------

GOOD_BOX = (
    '<thinking>Two cats on a sofa. {"bbox_2d": [100, 200, 600, 700]}</thinking>'
    "<rethink>The box covers both cats.</rethink><answer>Two cats on a sofa.</answer>"
)
NO_CUE = "<thinking>Two cats on a sofa.</thinking><rethink>Yes.</rethink><answer>Two cats.</answer>"
FRAMES = '<thinking>A jump. {"key_frames": [8]}</thinking><rethink>Yes.</rethink><answer>A jump.</answer>'


def test_format_reward_cases():
    comps = [GOOD_BOX, NO_CUE, "Two cats.", FRAMES, FRAMES, "note " + GOOD_BOX]
    cues = ["bbox_2d", "bbox_2d", "bbox_2d", "key_frames", "key_frames", "bbox_2d"]
    frames = [None, None, None, 8, 7, None]
    assert format_reward(comps, cue_key=cues, n_frames=frames) == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert format_reward(comps, cue_key=cues, n_frames=frames, requires_cue=False) == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    strict = format_reward(comps, cue_key=cues, n_frames=frames, strict_outside_tags=True)
    assert strict[-1] == 0.0 and strict[0] == 1.0
    conv = [[{"role": "assistant", "content": [{"type": "text", "text": GOOD_BOX}]}]]
    assert format_reward(conv, cue_key=["bbox_2d"], prompts=["p"], trainer_state=None) == [1.0]


def test_format_reward_needs_cue_column():
    with pytest.raises(ValueError, match="needs a cue_key column"):
        format_reward([GOOD_BOX])
    with pytest.raises(ValueError, match="cue_key is None for completion 1"):
        format_reward([GOOD_BOX, GOOD_BOX], cue_key=["bbox_2d", None])
    with pytest.raises(ValueError, match="1 completions but 2 cue_key"):
        format_reward([GOOD_BOX], cue_key=["bbox_2d", "bbox_2d"])


def test_build_reward_funcs_binds_format_knobs():
    funcs, _ = build_reward_funcs(reference(), toy_embed, ToyDiscriminator())
    assert funcs[0]([NO_CUE], cue_key=["bbox_2d"]) == [1.0]  # reference: tags only
    funcs, _ = build_reward_funcs(PAPER, toy_embed, ToyDiscriminator())
    assert funcs[0]([NO_CUE], cue_key=["bbox_2d"]) == [0.0]


# ----------------------------------------------------------------------------------------------------------------
# Config and total reward
# ----------------------------------------------------------------------------------------------------------------


def test_presets_resolve():
    assert {k: getattr(PAPER, k) for k in PRESETS["paper"]} == PRESETS["paper"]
    ref = reference()
    assert {k: getattr(ref, k) for k in PRESETS["reference"]} == PRESETS["reference"]
    assert (ref.w_process, ref.w_outcome, ref.outcome_factor, ref.acc_mode) == (0.2, 0.8, 0.5, "fraction")
    assert RewardConfig(preset="reference", shuffle_candidates=True).w_outcome == 0.8  # preset knobs, no warning
    over = RewardConfig.from_preset("paper", w_process=0.0, negative_weighting="mean")
    assert over.w_process == 0.0 and over.negative_weighting == "mean" and over.w_outcome == 0.2
    assert RewardConfig(**PAPER.to_dict()) == PAPER


def test_reward_config_roundtrips_through_config_loader():
    cfg = RewardConfig.from_preset("paper", acc_k=3, tau_neg=0.25)
    assert config_from_dict(RewardConfig, config_to_dict(cfg)) == cfg
    assert config_from_dict(RewardConfig, {"preset": "paper", "w_outcome": 1}).w_outcome == 1.0


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"preset": "mine"}, "unknown"),
        ({"acc_mode": "top1"}, "acc_mode"),
        ({"process_value": "soft"}, "process_value"),
        ({"negative_weighting": "lse"}, "negative_weighting"),
        ({"w_process": -0.1}, "w_process"),
        ({"w_outcome": float("nan")}, "w_outcome"),
        ({"tau_neg": 0.0}, "tau_neg"),
        ({"m_neg": 0}, "m_neg"),
        ({"acc_k": 0}, "acc_k"),
        ({"outcome_factor": float("inf")}, "outcome_factor"),
    ],
)
def test_reward_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        RewardConfig(**overrides)


def test_total_reward():
    comps = {"format": [1.0, 0.0, 1.0], "process": [1.0, 0.0, None], "outcome": [0.5, -0.2, 0.3]}
    _close(total_reward(comps, PAPER)[:2], [0.05 + 0.8 + 0.1, -0.04])
    assert total_reward(comps, PAPER)[2] is None
    _close(total_reward(comps, reference())[:2], [0.05 + 0.2 + 0.4, -0.16])
    no_proc = RewardConfig(w_process=0.0)
    _close(total_reward(comps, no_proc), [0.15, -0.04, 0.11])  # weight 0: its None is ignored
    _close(total_reward({"format": [1.0], "outcome": [1.0]}, no_proc), [0.25])  # and it may be absent
    assert total_reward({"format": [1.0], "process": [math.nan], "outcome": [1.0]}, PAPER) == [None]
    with pytest.raises(ValueError, match="non-zero weight"):
        total_reward({"format": [1.0], "outcome": [1.0]}, PAPER)
    with pytest.raises(ValueError, match="unknown"):
        total_reward({**comps, "length": [0.0] * 3}, PAPER)
    with pytest.raises(ValueError, match="differ in length"):
        total_reward({"format": [1.0], "process": [1.0, 1.0], "outcome": [1.0]}, PAPER)


# ----------------------------------------------------------------------------------------------------------------
# EmbedderReward: each unique image / video processed and encoded once per call, embeddings unchanged
# ----------------------------------------------------------------------------------------------------------------

SMALL_BUDGET = (32 * 32, 64 * 64, 32 * 32, 64 * 64)


def _noise(seed: int, size: int = 64):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _tcot(cue: str) -> str:
    return f"<thinking>Look here. {cue}</thinking><rethink>Checked.</rethink><answer>Done.</answer>"


def _reward_step():
    """G = 3 rollouts of an image item, a video item, a two-image item and a text item (``[a x G, v x G, ...]``);
    rollouts 0 and 2 of each visual item name the same evidence, rollout 1 other evidence."""
    from embedrl.data.schema import Item

    image = Item(id="a", text="a square", images=(_noise(1, 96),))
    video = Item(id="v", text="what happens?", frames=tuple(_noise(10 + i, 48) for i in range(4)))
    pair = Item(id="p", images=(_noise(2), _noise(3, 80)))
    text = Item(id="t", text="two red kites")
    boxes = ['{"bbox_2d": [[0, 0, 500, 500]]}', '{"bbox_2d": [[500, 0, 1000, 600]]}']
    frames = ['{"key_frames": [1, 2]}', '{"key_frames": [2, 3]}']
    cues = {"a": boxes, "v": frames, "p": boxes, "t": ['{"text_keywords": ["kite"]}', '{"text_keywords": ["red"]}']}
    items, completions = [], []
    for item in (image, video, pair, text):
        for g in range(3):
            items.append(item)
            completions.append(_tcot(cues[item.id][g % 2]))
    return items, completions


def _small_embedder(tiny_backbone_dir, family: str, video_as: str = "video"):
    from embedrl.backbones import PixelBudget
    from embedrl.models import Embedder

    return Embedder.from_backbone(tiny_backbone_dir(family), budget=PixelBudget(*SMALL_BUDGET), video_as=video_as)


@pytest.mark.parametrize(
    ("family", "video_as", "processed", "reused"),
    [
        # 24 visuals: a's image and crop (x3), v's video and 2 key frames (x3), p's 2 images and crop (x3). Unique:
        # a's image + 2 crops, v's video + 3 key frames, p's 2 images + 2 crops (its box cuts its first image) = 11
        ("qwen2-vl", "video", 11, 13),
        ("qwen2.5-vl", "video", 11, 13),
        ("qwen3-vl", "video", 11, 13),
        # video_as=frames: v's 4 frames are 4 images (x3), its key frames are 3 of them again: 33 visuals, 11 unique
        ("qwen3-vl", "frames", 11, 22),
    ],
)
def test_embedder_reward_encodes_each_visual_once_and_equals_plain_encode(
    tiny_backbone_dir, family, video_as, processed, reused
):
    from embedrl.rewards.judges import EmbedderReward

    embedder = _small_embedder(tiny_backbone_dir, family, video_as)
    items, completions = _reward_step()
    plain = embedder.encode([it.with_tcot(c) for it, c in zip(items, completions, strict=True)], 5, mode="full")
    reward = EmbedderReward(embedder, batch_size=5)  # batches cut across items: the cache spans the whole call
    shared = reward("query", completions, {"item": items}).numpy()
    assert shared.shape == plain.shape == (12, embedder.dim)
    assert float(abs(shared - plain).max()) <= 1e-5
    stats = reward.last_stats
    assert (stats.processor_misses, stats.processor_hits) == (processed, reused)
    assert (stats.vision_misses, stats.vision_hits) == (processed, reused)
    # a different T-CoT changes the rollout's embedding: the comparison can fail
    other = reward("query", [_tcot('{"bbox_2d": [[0, 0, 200, 200]]}'), *completions[1:]], {"item": items}).numpy()
    assert float(abs(other[0] - plain[0]).max()) > 1e-3 and float(abs(other[1:] - plain[1:]).max()) <= 1e-5


def test_sharing_visuals_is_scoped_and_inference_only(tiny_backbone_dir):
    embedder = _small_embedder(tiny_backbone_dir, "qwen3-vl")
    vlm = embedder._vision_language_model()
    processor = embedder.processor
    items, completions = _reward_step()
    batch = [it.with_tcot(c) for it, c in zip(items[:3], completions[:3], strict=True)]
    with pytest.raises(KeyError), embedder.sharing_visuals():
        assert embedder.processor is not processor and "get_image_features" in vars(vlm)
        raise KeyError("leaves the block")
    assert embedder.processor is processor and not {"get_image_features", "get_video_features"} & set(vars(vlm))
    videos = [it.with_tcot(c) for it, c in zip(items[3:6], completions[3:6], strict=True)]
    outside = embedder.collate(videos, "full")  # processed without the cache: the vision step digests its pixels
    with embedder.sharing_visuals() as cache:
        with pytest.raises(RuntimeError, match="already wrapped"), embedder.sharing_visuals():
            pass
        with pytest.raises(RuntimeError, match="without gradients"):
            embedder.embed_batch(embedder.collate(batch, "full"))  # autograd on: training must not use the cache
        with torch.inference_mode():
            vectors = embedder.embed_batch(embedder.collate(batch, "full"))
            assert (cache.stats.vision_misses, cache.stats.vision_hits) == (3, 3)  # a's image and 2 crops
            from_outside = [embedder.embed_batch(outside) for _ in range(2)]
            # 3 videos and 6 key frames per call: v's video and 3 frames computed once, the rest reused
            assert (cache.stats.vision_misses, cache.stats.vision_hits) == (3 + 4, 3 + 5 + 9)
    assert embedder.processor is processor
    torch.testing.assert_close(vectors, torch.from_numpy(embedder.encode(batch, mode="full")), atol=1e-5, rtol=0)
    plain = torch.from_numpy(embedder.encode(videos, mode="full"))
    for got in from_outside:
        torch.testing.assert_close(got, plain, atol=1e-5, rtol=0)


def test_visual_cache_keys_by_content_and_refuses_what_it_cannot_split():
    from transformers import BatchFeature

    from embedrl.models.visual_cache import VisualCache, visual_digest

    assert visual_digest(_noise(1)) == visual_digest(_noise(1).copy()) != visual_digest(_noise(2))
    with pytest.raises(TypeError, match="str"):
        visual_digest("media/a.png")
    calls = []

    def processor(images, **kwargs):
        calls.append(len(images))
        n = len(images)
        return BatchFeature({"pixel_values": torch.arange(4.0 * n).view(2 * n, 2),
                             "image_grid_thw": torch.tensor([[1, 1, 2]] * n)})  # fmt: skip

    cache = VisualCache()
    out = cache._process("image", processor, [_noise(1), _noise(2), _noise(1).copy()], {"size": 1})
    assert calls == [2] and out["pixel_values"].shape == (6, 2)  # two unique images processed, in one call
    torch.testing.assert_close(out["pixel_values"][4:], out["pixel_values"][:2])  # the repeat reuses the first
    cache._process("image", processor, [_noise(1)], {"size": 2})  # other processor settings: another key
    assert calls == [2, 1] and (cache.stats.processor_misses, cache.stats.processor_hits) == (3, 1)
    with pytest.raises(ValueError, match="image_sizes"):
        cache._process("image", lambda images, **kw: {**processor(images), "image_sizes": [1]}, [_noise(5)], {})
