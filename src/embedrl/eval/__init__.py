"""Evaluation: retrieval metrics over score matrices and MMEB-style score files, registries and summaries.

- :mod:`embedrl.eval.metrics`: hit@k, precision@k, recall@k, f1@k, map@k, mrr@k, NDCG@k (linear and exponential
  gain) as pure numpy functions; :func:`compute_metrics` gives the per-dataset object of an MMEB score file.
- :mod:`embedrl.eval.scores`: the MMEB-V2 registry (78 datasets), per-task and leaderboard JSON, the generic
  :func:`aggregate`, :func:`summarize` and :func:`format_summary`.
- :mod:`embedrl.eval.pipeline`: the one cached items -> T-CoTs -> vectors path (evaluation, index, server), over the
  caches of :mod:`embedrl.eval.cache`.
- :mod:`embedrl.eval.evaluator`: the engine and the loop over a benchmark's tasks; :mod:`embedrl.eval.benchmark`,
  :mod:`embedrl.eval.mmeb` and :mod:`embedrl.eval.uvrb` the real benchmarks (the synthetic world's evaluator is
  :mod:`embedrl.world.evaluate`).

See docs/eval.md.
"""

from __future__ import annotations

from embedrl.eval.metrics import DEFAULT_KS, METRICS, compute_metrics, per_query_metrics, rank_candidates
from embedrl.eval.scores import (
    MAIN_METRICS,
    MMEB_V2_DATASETS,
    ScoreFileError,
    aggregate,
    format_summary,
    read_leaderboard,
    read_task_scores,
    summarize,
    summarize_tasks,
    write_leaderboard,
    write_task_scores,
)

__all__ = [
    "DEFAULT_KS",
    "MAIN_METRICS",
    "METRICS",
    "MMEB_V2_DATASETS",
    "ScoreFileError",
    "aggregate",
    "compute_metrics",
    "format_summary",
    "per_query_metrics",
    "rank_candidates",
    "read_leaderboard",
    "read_task_scores",
    "summarize",
    "summarize_tasks",
    "write_leaderboard",
    "write_task_scores",
]
