"""The task type every benchmark reader produces and the evaluator consumes, and the evaluation errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from embedrl.config import UserError
from embedrl.data.schema import Item

__all__ = ["EvalError", "EvalTask", "MissingTCoTError"]


class EvalError(UserError, ValueError):
    """The evaluation inputs do not fit together (task names, qrels, encoder output); the message says how to fix."""


class MissingTCoTError(EvalError):
    """An item needs a T-CoT and has none (never silently embedded raw; see ``on_missing_tcot``)."""


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
