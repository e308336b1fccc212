"""Retrieval metrics over score matrices: the MMEB-V2 metric set, as pure numpy functions.

Every metric is a per-query value averaged over queries, with the definitions of the published MMEB-V2 score files
(docs/benchmarks.md §1.4). For one query the ranking is p₁, p₂, …, R is its set of relevant
candidates and g(d) > 0 the grade of d (1 for binary relevance):

========================  ======================================================================================
``hit@k``                 1 if any of p₁..p_k is in R, else 0
``precision@k``           \\|top-k ∩ R\\| / k (k, not the number of candidates, even when there are fewer than k)
``recall@k``              \\|top-k ∩ R\\| / \\|R\\|
``f1@k``                  harmonic mean of precision@k and recall@k (0 when both are 0)
``map@k``                 Σ precision@i over the relevant pᵢ with i ≤ k, divided by min(\\|R\\|, k)
``mrr@k``                 1 / rank of the first relevant candidate if that rank ≤ k, else 0
``ndcg_linear@k``         DCG / IDCG with gain g and discount log₂(i + 1); IDCG uses the k largest grades in R
``ndcg_exponential@k``    the same with gain 2^g − 1
========================  ======================================================================================

Ranking: candidates are sorted by descending score, and **exact ties are broken by candidate index** (the lower
index ranks first), so results never depend on the sort algorithm. Only the top ``k`` the metrics need is ranked:
found with ``argpartition`` (linear in the candidates) and then sorted, the same indices as a full stable sort.
``-inf`` marks a padding candidate (e.g. when local candidate lists of different lengths share one matrix); it ranks
last and is never relevant. NaN is an error.

Relevance, per query, is given either as a dense array ``[n_queries, n_candidates]`` of grades (bool or 0/1 for
binary, larger numbers for graded qrels; 0 = not relevant) or as a list with one entry per query: a mapping
``{candidate_index: grade}`` or an iterable of relevant candidate indices (grade 1). A grade of 0 means "not
relevant" (as in BEIR qrels). A query without any relevant candidate is rejected: MMEB-V2 has none, and the
reference code's convention for it (recall 1, everything else 0) is not a meaningful score.

Example:
    >>> import numpy as np
    >>> scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.2, 0.7]])
    >>> m = compute_metrics(scores, [{0: 1}, {1: 2, 0: 1}], ks=(1, 2))
    >>> m["hit@1"], m["mrr@2"], m["num_data"]
    (0.5, 0.75, 2)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_KS = (1, 5, 10)

# One entry per query: a {candidate_index: grade} mapping, or an iterable of relevant candidate indices.
Relevance = np.ndarray | Sequence[Mapping[int, float] | Iterable[int]]


@dataclass(frozen=True)
class RankedRelevance:
    """The relevance of each query's top-``depth`` ranking, the input of every metric function.

    Attributes:
        gains: ``[n_queries, depth]`` grade of the candidate at rank 1..depth (0 = not relevant, or no candidate
            at that rank when there are fewer than ``depth`` candidates).
        ideal: ``[n_queries, depth]`` the ``depth`` largest grades of each query's relevant set, descending,
            zero-padded (the ideal ranking, for IDCG).
        num_relevant: ``[n_queries]`` \\|R\\|, always ≥ 1.
    """

    gains: np.ndarray
    ideal: np.ndarray
    num_relevant: np.ndarray

    @property
    def depth(self) -> int:
        return self.gains.shape[1]


# ----------------------------------------------------------------------------------------------------------------
# Ranking
# ----------------------------------------------------------------------------------------------------------------


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a [n_queries, n_candidates] matrix, got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype, np.complexfloating):
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores).any():
        row = int(np.isnan(scores).any(axis=1).argmax())
        raise ValueError(f"scores contain NaN (first in query {row}); fix the embeddings or the score computation")
    return scores


def rank_candidates(scores: np.ndarray, k: int | None = None) -> np.ndarray:
    """Candidate indices of each query's ranking, best first; exact ties keep candidate-index order.

    Args:
        scores: ``[n_queries, n_candidates]`` similarities, higher is better (``-inf`` = padding, ranks last).
        k: keep the top ``k`` (all candidates when None or when ``k > n_candidates``).

    Returns:
        ``[n_queries, min(k, n_candidates)]`` int64 candidate indices.

    Example:
        >>> rank_candidates(np.array([[0.5, 0.9, 0.5, 0.1]]), k=3).tolist()
        [[1, 0, 2]]
    """
    scores = _check_scores(scores)
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_candidates = scores.shape[1]
    if k is None or k >= n_candidates:
        # A stable sort of the negated scores is descending by score with ascending index among equal scores.
        # Integer scores are widened to float64 so that negation cannot overflow.
        keys = -(scores.astype(np.float64) if not np.issubdtype(scores.dtype, np.floating) else scores)
        return np.argsort(keys, axis=1, kind="stable")
    top = _top_k_set(scores, k)  # [n_q, k] the right candidates, in ascending index order
    order = np.argsort(-np.take_along_axis(scores, top, axis=1).astype(np.float64), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def _top_k_set(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` highest-scored candidates per row, ties at the cut taken by lowest index, as ``[n_q, k]`` indices in
    ascending order: the first ``k`` of the stable descending sort as a set, in O(n) per row (``argpartition``).

    ``argpartition`` alone picks an arbitrary subset of the candidates tied with the k-th score; rows where the cut
    falls inside such a tie are redone on an exact integer key (class: above / at / below the k-th score, then index).
    """
    n = scores.shape[1]
    top = np.argpartition(scores, n - k, axis=1)[:, n - k :]  # [n_q, k]
    kth = np.take_along_axis(scores, top, axis=1).min(axis=1, keepdims=True)  # [n_q, 1] the k-th highest score
    ambiguous = np.flatnonzero(np.count_nonzero(scores >= kth, axis=1) > k)  # rows whose cut falls inside a tie
    if ambiguous.size:
        sub, cut = scores[ambiguous], kth[ambiguous]  # [n_a, n], [n_a, 1]
        order_key = np.where(sub > cut, 0, np.where(sub == cut, 1, 2)).astype(np.int64) * n + np.arange(n)
        top[ambiguous] = np.argpartition(order_key, k - 1, axis=1)[:, :k]
    return np.sort(top, axis=1)


# ----------------------------------------------------------------------------------------------------------------
# Relevance -> ranked gains
# ----------------------------------------------------------------------------------------------------------------


def _as_grade_map(entry: Mapping[int, float] | Iterable[int], query: int, n_candidates: int) -> dict[int, float]:
    items = entry.items() if isinstance(entry, Mapping) else ((idx, 1.0) for idx in entry)
    grades: dict[int, float] = {}
    for idx, grade in items:
        if isinstance(idx, bool) or not isinstance(idx, int | np.integer):
            raise ValueError(f"query {query}: candidate index {idx!r} is not an int")
        if not 0 <= idx < n_candidates:
            raise ValueError(f"query {query}: candidate index {idx} is outside 0..{n_candidates - 1}")
        if not np.isfinite(grade) or grade < 0:
            raise ValueError(f"query {query}: grade {grade!r} of candidate {idx} must be a finite number >= 0")
        if grade > 0:
            grades[int(idx)] = float(grade)
    return grades


def rank_relevance(scores: np.ndarray, relevance: Relevance, depth: int) -> RankedRelevance:
    """Rank each query's candidates and look up the grades of the top ``depth`` (see :class:`RankedRelevance`).

    Args:
        scores: ``[n_queries, n_candidates]``, higher is better.
        relevance: dense ``[n_queries, n_candidates]`` grades, or one mapping / index iterable per query.
        depth: how many ranks to keep; ranks beyond ``n_candidates`` get gain 0.
    """
    scores = _check_scores(scores)
    n_queries, n_candidates = scores.shape
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    top = rank_candidates(scores, depth)  # [n_q, min(depth, n_c)]
    gains = np.zeros((n_queries, depth), dtype=np.float64)  # [n_q, depth]
    ideal = np.zeros((n_queries, depth), dtype=np.float64)  # [n_q, depth]
    padded = np.isneginf(scores) if np.issubdtype(scores.dtype, np.floating) else np.zeros(scores.shape, bool)

    if isinstance(relevance, np.ndarray):
        grades = np.asarray(relevance, dtype=np.float64)  # [n_q, n_c]
        if grades.shape != scores.shape:
            raise ValueError(f"relevance has shape {grades.shape}, scores have {scores.shape}; they must match")
        if not np.isfinite(grades).all() or (grades < 0).any():
            raise ValueError("relevance grades must be finite and >= 0 (0 = not relevant)")
        rel_ok = grades > 0
        bad = rel_ok & padded
        if bad.any():
            row = int(bad.any(axis=1).argmax())
            raise ValueError(f"query {row}: a relevant candidate has score -inf (padding); fix the candidate mask")
        gains[:, : top.shape[1]] = np.take_along_axis(grades, top, axis=1)
        num_relevant = rel_ok.sum(axis=1)
        largest = -grades if depth >= n_candidates else np.partition(-grades, depth - 1, axis=1)[:, :depth]
        ranked_grades = -np.sort(largest, axis=1)[:, :depth]  # the depth largest grades, descending
        ideal[:, : ranked_grades.shape[1]] = ranked_grades
    else:
        if len(relevance) != n_queries:
            raise ValueError(f"relevance has {len(relevance)} entries for {n_queries} queries; give one per query")
        num_relevant = np.zeros(n_queries, dtype=np.int64)
        for q, entry in enumerate(relevance):
            grade_map = _as_grade_map(entry, q, n_candidates)
            if any(padded[q, idx] for idx in grade_map):
                raise ValueError(f"query {q}: a relevant candidate has score -inf (padding); fix the candidate mask")
            num_relevant[q] = len(grade_map)
            gains[q, : top.shape[1]] = [grade_map.get(int(c), 0.0) for c in top[q]]
            best = sorted(grade_map.values(), reverse=True)[:depth]
            ideal[q, : len(best)] = best

    empty = np.flatnonzero(num_relevant == 0)
    if empty.size:
        raise ValueError(
            f"{empty.size} queries have no relevant candidate (first: query {int(empty[0])}); every query needs at "
            "least one candidate with grade > 0"
        )
    return RankedRelevance(gains=gains, ideal=ideal, num_relevant=num_relevant)


# ----------------------------------------------------------------------------------------------------------------
# Per-query metrics: RankedRelevance, k -> [n_queries]
# ----------------------------------------------------------------------------------------------------------------


def _check_k(ranked: RankedRelevance, k: int) -> None:
    if not 1 <= k <= ranked.depth:
        raise ValueError(f"k={k} must be in 1..{ranked.depth} (the depth the relevance was ranked to)")


def _hits(ranked: RankedRelevance, k: int) -> np.ndarray:
    _check_k(ranked, k)
    return (ranked.gains[:, :k] > 0).sum(axis=1)  # [n_q]  |top-k ∩ R|


def hit_at_k(ranked: RankedRelevance, k: int) -> np.ndarray:
    """1.0 where any of the top ``k`` is relevant, else 0.0; ``[n_queries]``."""
    return (_hits(ranked, k) > 0).astype(np.float64)


def precision_at_k(ranked: RankedRelevance, k: int) -> np.ndarray:
    """\\|top-k ∩ R\\| / k; ``[n_queries]``."""
    return _hits(ranked, k) / k


def recall_at_k(ranked: RankedRelevance, k: int) -> np.ndarray:
    """\\|top-k ∩ R\\| / \\|R\\|; ``[n_queries]``."""
    return _hits(ranked, k) / ranked.num_relevant


def f1_at_k(ranked: RankedRelevance, k: int) -> np.ndarray:
    """Harmonic mean of precision@k and recall@k, 0 where both are 0; ``[n_queries]``."""
    p, r = precision_at_k(ranked, k), recall_at_k(ranked, k)
    total = p + r
    return np.divide(2 * p * r, total, out=np.zeros_like(total), where=total > 0)


def map_at_k(ranked: RankedRelevance, k: int) -> np.ndarray:
    """Σ precision@i over relevant ranks i ≤ k, divided by min(\\|R\\|, k); ``[n_queries]``."""
    _check_k(ranked, k)
    rel = (ranked.gains[:, :k] > 0).astype(np.float64)  # [n_q, k]
    precision_at_i = np.cumsum(rel, axis=1) / np.arange(1, k + 1)  # [n_q, k]
    return (precision_at_i * rel).sum(axis=1) / np.minimum(ranked.num_relevant, k)


def mrr_at_k(ranked: RankedRelevance, k: int) -> np.ndarray:
    """1 / rank of the first relevant candidate if it is within the top ``k``, else 0; ``[n_queries]``."""
    _check_k(ranked, k)
    rel = ranked.gains[:, :k] > 0  # [n_q, k]
    first = rel.argmax(axis=1)  # [n_q]  0 also when there is no hit; masked below
    return np.where(rel.any(axis=1), 1.0 / (first + 1), 0.0)


def _ndcg(ranked: RankedRelevance, k: int, gain: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    _check_k(ranked, k)
    discount = 1.0 / np.log2(np.arange(2, k + 2))  # [k]  1 / log2(i + 1), i = 1..k
    dcg = (gain(ranked.gains[:, :k]) * discount).sum(axis=1)  # [n_q]
    idcg = (gain(ranked.ideal[:, :k]) * discount).sum(axis=1)  # [n_q]  > 0 since every query has |R| >= 1
    return dcg / idcg


def ndcg_linear_at_k(ranked: RankedRelevance, k: int) -> np.ndarray:
    """NDCG@k with gain g (the grade itself); ``[n_queries]``."""
    return _ndcg(ranked, k, lambda g: g)


def ndcg_exponential_at_k(ranked: RankedRelevance, k: int) -> np.ndarray:
    """NDCG@k with gain 2^g − 1; ``[n_queries]``."""
    return _ndcg(ranked, k, lambda g: np.exp2(g) - 1.0)


# Metric name -> per-query function, in the order of the MMEB score files.
METRICS: dict[str, Callable[[RankedRelevance, int], np.ndarray]] = {
    "hit": hit_at_k,
    "ndcg_linear": ndcg_linear_at_k,
    "ndcg_exponential": ndcg_exponential_at_k,
    "precision": precision_at_k,
    "recall": recall_at_k,
    "f1": f1_at_k,
    "map": map_at_k,
    "mrr": mrr_at_k,
}


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """``["hit@1", "hit@5", …, "mrr@10"]``: metric-major, then k, as in the MMEB score files."""
    return [f"{name}@{k}" for name in METRICS for k in ks]


# ----------------------------------------------------------------------------------------------------------------
# Whole datasets
# ----------------------------------------------------------------------------------------------------------------


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"ks must be distinct positive ints, got {ks!r}")
    return ks


def per_query_metrics(
    scores: np.ndarray, relevance: Relevance, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, np.ndarray]:
    """Every metric of :func:`metric_names` per query: ``{"hit@1": [n_queries], …}``."""
    ks = _check_ks(ks)
    ranked = rank_relevance(scores, relevance, depth=max(ks))
    return {f"{name}@{k}": fn(ranked, k) for name, fn in METRICS.items() for k in ks}


def compute_metrics(
    scores: np.ndarray,
    relevance: Relevance,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """Dataset-level metrics: the per-query values of every metric averaged over queries.

    Args:
        scores: ``[n_queries, n_candidates]``, higher is better; ties are broken by candidate index.
        relevance: dense ``[n_queries, n_candidates]`` grades, or one ``{candidate_index: grade}`` mapping (or
            iterable of relevant indices) per query.
        ks: cut-offs; the default gives exactly the 26 keys of an MMEB score file.
        chunk_size: rank this many queries at a time to bound memory (the result is identical).

    Returns:
        ``{"hit@1": float, …, "mrr@10": float, "num_pred": int, "num_data": int}`` in score-file order.
    """
    scores = _check_scores(scores)
    ks = _check_ks(ks)
    n_queries = scores.shape[0]
    if n_queries == 0:
        raise ValueError("scores has no queries; there is nothing to evaluate")
    if len(relevance) != n_queries:
        raise ValueError(f"relevance has {len(relevance)} entries for {n_queries} queries; give one per query")
    step = n_queries if chunk_size is None else chunk_size
    if step < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    chunks = [per_query_metrics(scores[i : i + step], relevance[i : i + step], ks) for i in range(0, n_queries, step)]
    out: dict[str, Any] = {name: float(np.concatenate([c[name] for c in chunks]).mean()) for name in chunks[0]}
    out["num_pred"] = n_queries
    out["num_data"] = n_queries
    return out
