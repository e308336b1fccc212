"""The task type every benchmark reader produces and the evaluator consumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from embedrl.data.schema import Item

__all__ = ["EvalTask"]


@dataclass(frozen=True)
class EvalTask:
    """One evaluation task: queries, candidate pool, per-query candidate lists (local tasks) and qrels.

    ``info`` carries at least ``eval_type`` (``local`` or ``global``) and ``metric`` (the task's main metric).
    """

    name: str
    info: dict[str, Any]
    queries: list[Item]
    pool: dict[str, Item]
    candidates: list[list[str]] | None
    qrels: list[dict[str, int]]
    positives: list[list[str]]
