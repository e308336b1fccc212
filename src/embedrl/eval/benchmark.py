"""What the real benchmarks share: MMEB-V2 (:mod:`embedrl.eval.mmeb`) and UVRB (:mod:`embedrl.eval.uvrb`).

- :class:`BenchmarkEvaluator`: a :class:`~embedrl.eval.evaluator.TaskEvaluator` over datasets read from a local data
  root (each once), under a bad-row policy and a query limit, with videos sampled to ``num_frames`` frames. Neither
  benchmark stores T-CoTs: they come from a Reasoner, or there are none (raw mode).
- :class:`BenchmarkReport`: its report, whose ``summary.md`` starts with :meth:`BenchmarkReport.header`.
- :func:`run_benchmark_stage`: the body of ``embedrl eval mmeb`` and ``embedrl eval uvrb``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from embedrl.config import BenchmarkEvalConfig
from embedrl.data.rows import BadRowPolicy
from embedrl.eval.evaluator import EvalReport, EvalRun, ReportT, TaskEvaluator, config_sha256, run_eval_stage
from embedrl.eval.task import EvalError, EvalTask
from embedrl.models.embedder import Embedder

__all__ = ["BenchmarkEvaluator", "BenchmarkReport", "LoadedDataset", "run_benchmark_stage"]


class BenchmarkReport(EvalReport):
    """A benchmark run's report (:class:`~embedrl.eval.evaluator.EvalReport`)."""

    def header(self, benchmark: str, settings: str, *lines: str) -> str:
        """The head of ``summary.md``: the run's name, models, ``settings`` and the skipped rows, with ``lines``
        before the skipped rows."""
        m = self.metadata
        head = [
            f"# {m['model_name']}: {benchmark}",
            "",
            f"- Embedder: `{m['embedder']['id']}`; Reasoner: `{(m['reasoner'] or {}).get('id', '-')}`; "
            f"cot_mode {m['cot_mode']}; {settings}",
            *lines,
            f"- Skipped rows: {sum(r['skipped'] for r in m['bad_rows'].values())} (on_bad_row={m['on_bad_row']})",
            "",
            "",
        ]
        return "\n".join(head)


class LoadedDataset(Protocol):
    """What a benchmark loader returns: the task, plus the skip report of its rows."""

    @property
    def eval_task(self) -> EvalTask: ...

    @property
    def bad_rows(self) -> dict[str, Any]: ...


LoadedT = TypeVar("LoadedT", bound=LoadedDataset)


class BenchmarkEvaluator(TaskEvaluator[ReportT], Generic[ReportT, LoadedT]):
    """A benchmark's datasets read from ``root``; subclasses provide :meth:`_resolve` (task names) and :meth:`_read`.

    Args:
        root: the benchmark's data folder.
        tasks: dataset names; None = the benchmark's (scored) datasets.
        on_bad_row: ``stop`` raises on the first malformed row or missing media file; ``skip`` drops and counts it.
        limit: keep only the first ``limit`` queries of each dataset (0 = all).
        num_frames: frames sampled per video.
        **engine: the :class:`~embedrl.eval.evaluator.TaskEvaluator` settings (``tcot_source`` ``reasoner`` or
            ``none``).
    """

    benchmark = ""  # the display name, in messages
    config_options = ("on_bad_row", "limit", "num_frames")

    def __init__(
        self,
        root: str | Path,
        tasks: Sequence[str] | None = None,
        *,
        on_bad_row: BadRowPolicy = "stop",
        limit: int = 0,
        num_frames: int = 8,
        **engine: Any,
    ) -> None:
        super().__init__(**engine)
        if self.tcot_source == "teacher":
            raise EvalError(
                f"{self.benchmark} has no stored T-CoTs: use tcot_source 'reasoner' (with a Reasoner) or 'none'"
            )
        self.root = Path(root)
        self.tasks = self._resolve(tasks)
        self.on_bad_row = on_bad_row
        self.limit = limit
        self.num_frames = num_frames
        self.loaded: dict[str, LoadedT] = {}

    def _resolve(self, names: Sequence[str] | None) -> list[str]:
        """The datasets to evaluate, in the benchmark's order."""
        raise NotImplementedError(f"{type(self).__name__} must define _resolve(names)")

    def _read(self, name: str, **rows: Any) -> LoadedT:
        """Read one dataset from :attr:`root` with the benchmark's loader; ``rows`` are the loader arguments every
        benchmark has (``on_bad_row``, ``limit``, ``num_frames``)."""
        raise NotImplementedError(f"{type(self).__name__} must define _read(name, **rows)")

    def load(self, name: str) -> LoadedT:
        """One dataset as read from disk (read once)."""
        if name not in self.loaded:
            self.loaded[name] = self._read(
                name, on_bad_row=self.on_bad_row, limit=self.limit, num_frames=self.num_frames
            )
        return self.loaded[name]

    def task(self, name: str) -> EvalTask:
        return self.load(name).eval_task

    def _settings_metadata(self, run: EvalRun, **more: Any) -> dict[str, Any]:
        """The metadata of how items were built: T-CoT fallbacks, frames per video and their order, then ``more``."""
        return {"tcot_fallbacks": run.fallbacks, "num_frames": self.num_frames, "frame_order": "natural", **more}

    def _data_metadata(self, **more: Any) -> dict[str, Any]:
        """The metadata of what was read: query counts, ``more``, the bad-row policy and report, the query limit."""
        return {
            "query_counts": {k: len(v.eval_task.queries) for k, v in self.loaded.items()},
            **more,
            "on_bad_row": self.on_bad_row,
            "bad_rows": {k: v.bad_rows for k, v in self.loaded.items()},
            "limit": self.limit,
        }


def run_benchmark_stage(
    cfg: BenchmarkEvalConfig,
    evaluator: type[BenchmarkEvaluator[Any, Any]],
    extra_metadata: Callable[[Embedder], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The body of ``embedrl eval mmeb`` / ``eval uvrb``: :func:`~embedrl.eval.evaluator.run_eval_stage` on
    ``cfg.data`` with T-CoTs on both sides when ``cfg.reasoner`` is set (else raw), recording the config's SHA-256
    after ``extra_metadata``."""
    return run_eval_stage(
        cfg,
        evaluator,
        cfg.data,
        settings={"mode": cfg.resolved_mode, "tcot_source": "reasoner" if cfg.reasoner else "none"},
        embedder_path=cfg.model,
        model_name=cfg.name or Path(cfg.model).name,
        extra_metadata=lambda embedder: {
            **(extra_metadata(embedder) if extra_metadata else {}),
            "eval_config_sha256": config_sha256(cfg),
        },
    )
