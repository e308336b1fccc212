"""Retrieval metrics: hand-computed rankings, graded NDCG, chunked == full, and a naive reference under hypothesis."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedrl.eval.metrics import (
    compute_metrics,
    metric_names,
    ndcg_exponential_at_k,
    ndcg_linear_at_k,
    per_query_metrics,
    rank_candidates,
    rank_relevance,
)

SCORE_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "scores"  # published MMEB-V2 score files


def log2(x: float) -> float:
    return math.log2(x)


# ----------------------------------------------------------------------------------------------------------------
# Hand-computed: 3 queries x 5 candidates, binary relevance, ties
# ----------------------------------------------------------------------------------------------------------------

# q0: three-way tie at 0.5 -> ranking 0, 1, 2, 4, 3; relevant {2} sits at rank 3.
# q1: all tied -> ranking 0, 1, 2, 3, 4; relevant {0, 3} at ranks 1 and 4.
# q2: tie at 0.7 -> ranking 1, 3, 2, 0, 4; relevant {3, 4} at ranks 2 and 5.
SCORES = np.array(
    [
        [0.9, 0.5, 0.5, 0.1, 0.5],
        [0.2, 0.2, 0.2, 0.2, 0.2],
        [0.1, 0.7, 0.3, 0.7, 0.0],
    ]
)
RELEVANT = [{2: 1}, {0: 1, 3: 1}, {3: 1, 4: 1}]
EXPECTED_PER_QUERY = {
    "hit@1": [0, 1, 0],
    "hit@3": [1, 1, 1],
    "hit@5": [1, 1, 1],
    "precision@1": [0, 1, 0],
    "precision@3": [1 / 3, 1 / 3, 1 / 3],
    "precision@5": [1 / 5, 2 / 5, 2 / 5],
    "recall@1": [0, 1 / 2, 0],
    "recall@3": [1, 1 / 2, 1 / 2],
    "recall@5": [1, 1, 1],
    "f1@1": [0, 2 * 1 * 0.5 / 1.5, 0],
    "f1@3": [2 * (1 / 3) / (4 / 3), 2 * (1 / 6) / (5 / 6), 2 * (1 / 6) / (5 / 6)],
    "f1@5": [2 * 0.2 / 1.2, 2 * 0.4 / 1.4, 2 * 0.4 / 1.4],
    "mrr@1": [0, 1, 0],
    "mrr@3": [1 / 3, 1, 1 / 2],
    "mrr@5": [1 / 3, 1, 1 / 2],
    # map@k = sum of precision@i at relevant ranks i <= k, / min(|R|, k)
    "map@1": [0, 1 / 1, 0],
    "map@3": [(1 / 3) / 1, (1 / 1) / 2, (1 / 2) / 2],
    "map@5": [(1 / 3) / 1, (1 / 1 + 2 / 4) / 2, (1 / 2 + 2 / 5) / 2],
    # binary grades: linear and exponential gains are both 1
    "ndcg_linear@1": [0, 1, 0],
    "ndcg_linear@3": [(1 / log2(4)) / 1, 1 / (1 + 1 / log2(3)), (1 / log2(3)) / (1 + 1 / log2(3))],
    "ndcg_linear@5": [
        (1 / log2(4)) / 1,
        (1 + 1 / log2(5)) / (1 + 1 / log2(3)),
        (1 / log2(3) + 1 / log2(6)) / (1 + 1 / log2(3)),
    ],
}
EXPECTED_PER_QUERY["ndcg_exponential@1"] = EXPECTED_PER_QUERY["ndcg_linear@1"]
EXPECTED_PER_QUERY["ndcg_exponential@3"] = EXPECTED_PER_QUERY["ndcg_linear@3"]
EXPECTED_PER_QUERY["ndcg_exponential@5"] = EXPECTED_PER_QUERY["ndcg_linear@5"]


def test_rank_candidates_breaks_ties_by_candidate_index() -> None:
    assert rank_candidates(SCORES).tolist() == [[0, 1, 2, 4, 3], [0, 1, 2, 3, 4], [1, 3, 2, 0, 4]]
    assert rank_candidates(SCORES, k=2).tolist() == [[0, 1], [0, 1], [1, 3]]
    assert rank_candidates(SCORES, k=9).shape == (3, 5)  # k larger than the pool: every candidate
    assert rank_candidates(np.array([[3, 7, 7, -2]]), k=3).tolist() == [[1, 2, 0]]  # integer scores


def test_hand_computed_binary_example() -> None:
    per_query = per_query_metrics(SCORES, RELEVANT, ks=(1, 3, 5))
    assert set(per_query) == set(EXPECTED_PER_QUERY)
    for name, expected in EXPECTED_PER_QUERY.items():
        np.testing.assert_allclose(per_query[name], expected, rtol=0, atol=1e-12, err_msg=name)
    means = compute_metrics(SCORES, RELEVANT, ks=(1, 3, 5))
    for name, expected in EXPECTED_PER_QUERY.items():
        assert means[name] == pytest.approx(sum(expected) / 3, abs=1e-12), name
    assert means["num_pred"] == means["num_data"] == 3
    assert means["hit@1"] == pytest.approx(1 / 3)
    assert means["mrr@5"] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)
    assert means["map@5"] == pytest.approx((1 / 3 + 0.75 + 0.45) / 3)


def test_relevance_forms_agree() -> None:
    dense = np.zeros((3, 5))
    for q, rel in enumerate(RELEVANT):
        for c in rel:
            dense[q, c] = 1
    as_indices = [[2], (0, 3), {3, 4}]
    full = compute_metrics(SCORES, RELEVANT)
    assert compute_metrics(SCORES, dense) == full
    assert compute_metrics(SCORES, dense.astype(bool)) == full
    assert compute_metrics(SCORES, as_indices) == full
    # a grade of 0 means "not relevant", as in BEIR qrels
    assert compute_metrics(SCORES, [{**r, 1: 0} for r in RELEVANT]) == full


# ----------------------------------------------------------------------------------------------------------------
# Graded relevance: linear vs exponential gain, IDCG over the k largest grades, map@k normalisation
# ----------------------------------------------------------------------------------------------------------------

GRADED_SCORES = np.array([[0.4, 0.9, 0.1, 0.6]])  # ranking 1, 3, 0, 2
GRADED = [{0: 3, 1: 1, 2: 2}]  # grades by rank: 1, 0, 3, 2; ideal order 3, 2, 1


def test_graded_ndcg_linear_vs_exponential() -> None:
    ranked = rank_relevance(GRADED_SCORES, GRADED, depth=4)
    assert ranked.gains.tolist() == [[1, 0, 3, 2]]
    assert ranked.ideal.tolist() == [[3, 2, 1, 0]]
    assert ranked.num_relevant.tolist() == [3]

    # linear gain g: DCG@3 = 1 + 0 + 3/log2(4) = 2.5; IDCG@3 = 3 + 2/log2(3) + 1/log2(4)
    lin3 = 2.5 / (3 + 2 / log2(3) + 0.5)
    # exponential gain 2^g - 1: gains 1, 0, 7, 3; DCG@3 = 1 + 7/2 = 4.5; IDCG@3 = 7 + 3/log2(3) + 1/2
    exp3 = 4.5 / (7 + 3 / log2(3) + 0.5)
    assert ndcg_linear_at_k(ranked, 3)[0] == pytest.approx(lin3, abs=1e-12)
    assert ndcg_exponential_at_k(ranked, 3)[0] == pytest.approx(exp3, abs=1e-12)
    assert lin3 == pytest.approx(0.5250050, abs=1e-7)
    assert exp3 == pytest.approx(0.4790909, abs=1e-7)

    m = compute_metrics(GRADED_SCORES, GRADED, ks=(1, 3, 4))
    assert m["ndcg_linear@1"] == pytest.approx(1 / 3)  # gain 1 at rank 1, ideal 3
    assert m["ndcg_exponential@1"] == pytest.approx(1 / 7)  # 2^1 - 1 over 2^3 - 1
    assert m["ndcg_linear@3"] == pytest.approx(lin3)
    assert m["ndcg_exponential@3"] == pytest.approx(exp3)
    lin4 = (1 + 3 / 2 + 2 / log2(5)) / (3 + 2 / log2(3) + 1 / 2)
    assert m["ndcg_linear@4"] == pytest.approx(lin4)
    # graded: hit@1 = 1 but ndcg_linear@1 < 1 (the fixtures' signature of graded qrels)
    assert m["hit@1"] == 1 and m["ndcg_linear@1"] < m["hit@1"]
    # map@k divides by min(|R|, k): relevant ranks 1, 3, 4
    assert m["map@1"] == pytest.approx(1 / 1)
    assert m["map@3"] == pytest.approx((1 + 2 / 3) / 3)
    assert m["map@4"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["precision@4"] == pytest.approx(3 / 4)


def test_precision_divides_by_k_even_with_fewer_candidates() -> None:
    # like ActivityNetQA (candidates yes / no): precision@5 = 1/5 in the published files
    m = compute_metrics(np.array([[0.1, 0.9], [0.8, 0.2]]), [[0], [0]], ks=(1, 5, 10))
    assert m["hit@1"] == 0.5 and m["hit@5"] == 1.0
    assert m["precision@5"] == pytest.approx(0.2) and m["precision@10"] == pytest.approx(0.1)
    assert m["recall@10"] == 1.0 and m["map@10"] == pytest.approx((0.5 + 1) / 2)


def test_padding_candidates_rank_last() -> None:
    # two local candidate lists of different length in one matrix; -inf = padding
    scores = np.array([[0.2, 0.5, -np.inf], [0.3, 0.1, 0.9]])
    m = compute_metrics(scores, [[0], [1]], ks=(1, 2, 3))
    assert m["hit@2"] == 0.5 and m["hit@3"] == 1.0
    with pytest.raises(ValueError, match="padding"):
        compute_metrics(scores, [[2], [1]])


def test_single_relevant_invariants() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(40, 12)).astype(float)
    relevance = [[int(i)] for i in rng.integers(0, 12, size=40)]
    m = compute_metrics(scores, relevance)
    assert m["hit@1"] == m["precision@1"] == m["mrr@1"] == m["map@1"] == m["ndcg_linear@1"] == m["recall@1"]
    for k in (1, 5, 10):
        assert m[f"map@{k}"] == pytest.approx(m[f"mrr@{k}"])
        assert m[f"ndcg_linear@{k}"] == m[f"ndcg_exponential@{k}"]


@pytest.mark.parametrize(
    ("scores", "relevance", "match"),
    [
        (np.array([[0.1, np.nan]]), [[0]], "NaN"),
        (np.array([0.1, 0.2]), [[0]], "matrix"),
        (np.array([[0.1, 0.2]]), [[]], "no relevant"),
        (np.array([[0.1, 0.2]]), [{0: 0}], "no relevant"),
        (np.array([[0.1, 0.2]]), [[2]], "outside"),
        (np.array([[0.1, 0.2]]), [{0: -1}], ">= 0"),
        (np.array([[0.1, 0.2]]), [[0], [1]], "one per query"),
        (np.array([[0.1, 0.2]]), np.ones((1, 3)), "shape"),
    ],
)
def test_bad_inputs_fail_loudly(scores, relevance, match) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(scores, relevance)


def test_bad_ks_and_chunk_size() -> None:
    with pytest.raises(ValueError, match="ks"):
        compute_metrics(SCORES, RELEVANT, ks=(0, 5))
    with pytest.raises(ValueError, match="ks"):
        compute_metrics(SCORES, RELEVANT, ks=(5, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        compute_metrics(SCORES, RELEVANT, chunk_size=0)


# ----------------------------------------------------------------------------------------------------------------
# Chunked == full
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("graded", [False, True])
def test_chunked_equals_full(graded: bool) -> None:
    rng = np.random.default_rng(7)
    n_q, n_c = 37, 50
    scores = rng.integers(0, 6, size=(n_q, n_c)).astype(np.float32)  # many exact ties
    grades = rng.integers(0, 4 if graded else 2, size=(n_q, n_c))
    grades[np.arange(n_q), rng.integers(0, n_c, size=n_q)] = 1  # every query has a relevant candidate
    relevance = [{int(c): int(g) for c, g in enumerate(row) if g > 0} for row in grades]
    full = compute_metrics(scores, relevance)
    for chunk in (1, 5, 36, 37, 100):
        assert compute_metrics(scores, relevance, chunk_size=chunk) == full, chunk
        assert compute_metrics(scores, grades, chunk_size=chunk) == full, chunk
    # per-query values of the chunks, concatenated, are the full per-query values
    whole = per_query_metrics(scores, relevance)
    parts = [per_query_metrics(scores[i : i + 8], relevance[i : i + 8]) for i in range(0, n_q, 8)]
    for name, values in whole.items():
        np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), values)


# ----------------------------------------------------------------------------------------------------------------
# Naive reference, one query at a time, straight from the definitions
# ----------------------------------------------------------------------------------------------------------------


def naive_metrics(scores: list[list[float]], relevance: list[dict[int, int]], ks: tuple[int, ...]) -> dict:
    per_query: dict[str, list[float]] = {name: [] for name in metric_names(ks)}
    for row, rel in zip(scores, relevance, strict=True):
        ranking = sorted(range(len(row)), key=lambda j: (-row[j], j))
        grades = {c: g for c, g in rel.items() if g > 0}
        for k in ks:
            top = ranking[:k]
            hits = [c in grades for c in top]
            n_hit = sum(hits)
            p, r = n_hit / k, n_hit / len(grades)
            per_query[f"hit@{k}"].append(float(n_hit > 0))
            per_query[f"precision@{k}"].append(p)
            per_query[f"recall@{k}"].append(r)
            per_query[f"f1@{k}"].append(2 * p * r / (p + r) if p + r > 0 else 0.0)
            ap = sum(sum(hits[: i + 1]) / (i + 1) for i in range(len(top)) if hits[i])
            per_query[f"map@{k}"].append(ap / min(len(grades), k))
            first = next((i + 1 for i, h in enumerate(hits) if h), None)
            per_query[f"mrr@{k}"].append(1 / first if first else 0.0)
            ideal = sorted(grades.values(), reverse=True)[:k]
            for name, gain in (("ndcg_linear", lambda g: g), ("ndcg_exponential", lambda g: 2**g - 1)):
                dcg = sum(gain(grades.get(c, 0)) / math.log2(i + 2) for i, c in enumerate(top))
                idcg = sum(gain(g) / math.log2(i + 2) for i, g in enumerate(ideal))
                per_query[f"{name}@{k}"].append(dcg / idcg)
    return {name: sum(v) / len(v) for name, v in per_query.items()}


@st.composite
def score_matrices(draw):
    n_q = draw(st.integers(1, 6))
    n_c = draw(st.integers(1, 9))
    scores = [[float(draw(st.integers(-2, 2))) for _ in range(n_c)] for _ in range(n_q)]  # small range: ties
    relevance = []
    for _ in range(n_q):
        grades = {c: draw(st.integers(0, 3)) for c in range(n_c)}
        grades[draw(st.integers(0, n_c - 1))] = draw(st.integers(1, 3))
        relevance.append(grades)
    ks = tuple(sorted(draw(st.sets(st.integers(1, 12), min_size=1, max_size=4))))
    return scores, relevance, ks


@settings(max_examples=200, deadline=None)
@given(score_matrices())
def test_matches_naive_reference(case) -> None:
    scores, relevance, ks = case
    expected = naive_metrics(scores, relevance, ks)
    got = compute_metrics(np.array(scores), relevance, ks=ks)
    assert list(got) == [*expected, "num_pred", "num_data"]
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    dense = np.array([[rel.get(c, 0) for c in range(len(scores[0]))] for rel in relevance])
    assert compute_metrics(np.array(scores), dense, ks=ks) == got


# ----------------------------------------------------------------------------------------------------------------
# Top-k by argpartition: the head of the full stable sort, ties at the cut included
# ----------------------------------------------------------------------------------------------------------------


def _tied_scores(rng: np.random.Generator, kind: str, n_q: int, n_c: int) -> np.ndarray:
    if kind == "int":
        return rng.integers(-3, 4, size=(n_q, n_c))
    if kind == "quantized":  # float32 with many exact ties, and 0.0 beside -0.0 (equal scores)
        scores = (rng.integers(-4, 5, size=(n_q, n_c)) / 4).astype(np.float32)
        scores[:, ::7] = -0.0
        return scores
    scores = rng.standard_normal((n_q, n_c))  # float64, padded with -inf, some rows all padding past a few
    scores[rng.random((n_q, n_c)) < 0.4] = -np.inf
    scores[0, 2:] = -np.inf
    return scores


@pytest.mark.parametrize("kind", ["int", "quantized", "padded"])
def test_top_k_is_the_head_of_the_stable_full_sort(kind: str) -> None:
    rng = np.random.default_rng(11)
    for n_c in (1, 2, 7, 60, 301):
        scores = _tied_scores(rng, kind, 9, n_c)
        wide = scores.astype(np.float64)
        full = np.argsort(-wide, axis=1, kind="stable")  # the reference: descending, ties by index
        assert np.array_equal(rank_candidates(scores), full)
        for k in {1, 2, 3, 5, 10, n_c - 1, n_c, n_c + 4} - {0}:
            got = rank_candidates(scores, k)
            assert got.dtype == np.int64 and np.array_equal(got, full[:, :k]), (n_c, k)


@pytest.mark.parametrize("dense", [False, True])
def test_metrics_on_large_tied_pools_match_the_definitions(dense: bool) -> None:
    rng = np.random.default_rng(12)
    n_q, n_c = 25, 400
    scores = (rng.integers(0, 12, size=(n_q, n_c)) / 3).astype(np.float32)  # ~33 candidates per score value
    grades = rng.integers(0, 4, size=(n_q, n_c)) * (rng.random((n_q, n_c)) < 0.05)
    grades[np.arange(n_q), rng.integers(0, n_c, size=n_q)] = 2  # every query has a relevant candidate
    relevance = [{int(c): int(g) for c, g in enumerate(row) if g > 0} for row in grades]
    ks = (1, 5, 10)
    expected = naive_metrics(scores.astype(float).tolist(), relevance, ks)
    got = compute_metrics(scores, grades if dense else relevance, ks=ks)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


# ----------------------------------------------------------------------------------------------------------------
# Key names as in the published score files
# ----------------------------------------------------------------------------------------------------------------


def test_default_keys_are_the_26_score_file_keys() -> None:
    keys = list(compute_metrics(SCORES, RELEVANT))
    assert len(keys) == 26
    assert keys[:3] == ["hit@1", "hit@5", "hit@10"] and keys[-2:] == ["num_pred", "num_data"]


def test_keys_match_published_score_objects() -> None:
    keys = list(compute_metrics(SCORES, RELEVANT))
    board = json.loads((SCORE_FIXTURES / "embed-rl-2b.json").read_text())
    for block in board["metrics"].values():
        for obj in block.values():
            assert list(obj) == keys
