"""The benchmark-independent evaluation engine: T-CoTs -> embeddings -> ranking -> metrics for each task, and the
one loop over a benchmark's tasks and its result files.

For each :class:`~embedrl.eval.task.EvalTask`:

1. **T-CoTs** (``tcot_source``): ``teacher`` uses the T-CoTs stored with the items, ``oracle`` the noise-free T-CoTs
   stored beside them (the synthetic world's: its ``task`` puts them on the items); ``reasoner`` generates them
   with a :class:`~embedrl.models.reasoner.Reasoner` through :class:`~embedrl.eval.pipeline.EmbedPipeline`, queries
   with the query-side family (routed by the task's candidate modality, docs/method.md §6.3) and every *unique*
   candidate once with its target-side family, never seeing a query (docs/method.md §6.1); ``none`` goes with
   ``mode="raw"``. A missing T-CoT raises :class:`MissingTCoTError`; ``on_missing_tcot="raw"`` embeds such an item
   raw instead and counts it.
2. **Embeddings**: each unique (item, mode, T-CoT) is embedded once with the Embedder in the requested mode (the
   same pipeline).
3. **Ranking**: local tasks rank each query against its own candidate list (padded with ``-inf`` to one matrix),
   global tasks against the whole corpus; cosine similarity as a plain matrix product of unit vectors.
4. **Metrics**: :func:`~embedrl.eval.metrics.compute_metrics` with the task's qrels (graded for VisDoc).

Both expensive steps go through the caches of :mod:`embedrl.eval.cache` (``<cache_dir>/tcots/<task>.jsonl`` and
``<cache_dir>/embeddings/<embedder id>/<task>/``), written per finished batch: a rerun after a kill recomputes only
what had not finished.

:meth:`TaskEvaluator.evaluate` is the loop every benchmark shares: each task's ``scores/<task>_score.json`` and
``predictions/<task>.jsonl`` are written as it finishes, the report (``summary.md``, ``summary.json``, …) at the end.
A benchmark subclass says how a task is read (:meth:`~TaskEvaluator.task`), what a prediction record holds
(:meth:`~TaskEvaluator._predictions`) and how the report is built (:meth:`~TaskEvaluator._report`): the synthetic
world (:mod:`embedrl.world.evaluate`), MMEB-V2 (:mod:`embedrl.eval.mmeb`) and UVRB (:mod:`embedrl.eval.uvrb`).
:func:`run_eval_stage` is the body of their ``embedrl eval`` commands.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import numpy as np
from tqdm.auto import tqdm

from embedrl import __version__
from embedrl.config import config_to_dict, save_config
from embedrl.data.schema import Item, Modality
from embedrl.eval.cache import EmbeddingCache, TCoTCache
from embedrl.eval.metrics import DEFAULT_KS, compute_metrics, rank_candidates
from embedrl.eval.pipeline import (
    EmbedPipeline,
    Encoder,
    decoding_from_config,
    embedder_fingerprint,
    load_run_models,
    reasoner_fingerprint,
)
from embedrl.eval.scores import SCORE_KEYS, write_task_scores, write_text
from embedrl.eval.task import EvalError, EvalTask, MissingTCoTError
from embedrl.models.embedder import Embedder
from embedrl.models.reasoner import Decoding, Reasoner
from embedrl.prompts import Side

__all__ = [
    "EMBED_MODES",
    "Encoder",
    "EvalReport",
    "EvalRun",
    "Ranked",
    "ReportT",
    "TaskEvaluator",
    "TaskStats",
    "config_sha256",
    "embedder_fingerprint",
    "reasoner_fingerprint",
    "run_eval_stage",
    "score_task",
    "write_text",
]

logger = logging.getLogger(__name__)

TCoTSource = Literal["teacher", "oracle", "reasoner", "none"]
TCOT_SOURCES: tuple[str, ...] = ("teacher", "oracle", "reasoner", "none")
EMBED_MODES: tuple[str, ...] = ("full", "answer_only", "no_evidence", "raw")
ON_MISSING: tuple[str, ...] = ("error", "raw")
SCORES_DIR, PREDICTIONS_DIR = "scores", "predictions"
SUMMARY_MD, SUMMARY_JSON, LEADERBOARD_JSON = "summary.md", "summary.json", "leaderboard.json"
RESULT_FILES = {  # name -> path under the output directory of an `embedrl eval` run
    "scores": SCORES_DIR,
    "predictions": PREDICTIONS_DIR,
    "summary_md": SUMMARY_MD,
    "summary_json": SUMMARY_JSON,
    "leaderboard": LEADERBOARD_JSON,
    "config": "config.json",
}


@dataclasses.dataclass
class TaskStats:
    """What one task cost: counts of unique items, T-CoTs and embeddings computed or read from the cache."""

    eval_type: str
    queries: int
    candidates: int
    tcots_generated: int = 0
    tcots_cached: int = 0
    tcot_fallbacks: int = 0
    empty_tcots: int = 0
    embedded: int = 0
    embeddings_cached: int = 0
    seconds: float = 0.0


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", text)[:120]


def _target_modality(candidates: Sequence[Item]) -> Modality:
    """The candidates' prevailing modality: routes text queries to the text-to-image or text-to-video family."""
    return Counter(c.modality for c in candidates).most_common(1)[0][0]


def _candidate_ids(task: EvalTask) -> list[str]:
    """Local: the union of the per-query lists in first-seen order; global: the whole corpus."""
    if task.candidates is None:
        return list(task.pool)
    seen: dict[str, None] = {}
    for ids in task.candidates:
        seen.update(dict.fromkeys(ids))
    missing = [cid for cid in seen if cid not in task.pool]
    if missing:
        raise EvalError(f"{task.name}: candidate ids {missing[:3]} are not in the task's candidates file")
    return list(seen)


def score_task(
    task: EvalTask, candidate_ids: Sequence[str], queries: np.ndarray, candidates: np.ndarray
) -> tuple[np.ndarray, list[dict[int, int]]]:
    """Similarity matrix and relevance of one task.

    Args:
        queries: ``[n_q, D]`` query embeddings in task order.
        candidates: ``[n_c, D]`` embeddings of ``candidate_ids``.

    Returns:
        ``(scores, relevance)``: global ``[n_q, n_c]``; local ``[n_q, max list length]`` with each query's own list
        in its order and ``-inf`` padding. ``relevance[i]`` is ``{column: grade}`` from the qrels.
    """
    column = {cid: j for j, cid in enumerate(candidate_ids)}
    relevance: list[dict[int, int]] = []
    if task.candidates is None:
        scores = queries @ candidates.T  # [n_q, n_c]
        lists = [list(candidate_ids)] * len(task.queries)
    else:
        width = max(len(ids) for ids in task.candidates)
        scores = np.full((len(task.queries), width), -np.inf, dtype=np.float32)  # [n_q, width]
        for i, ids in enumerate(task.candidates):
            scores[i, : len(ids)] = candidates[[column[c] for c in ids]] @ queries[i]
        lists = task.candidates
    for i, (ids, qrels) in enumerate(zip(lists, task.qrels, strict=True)):
        position = column if task.candidates is None else {cid: j for j, cid in enumerate(ids)}
        absent = [cid for cid in qrels if cid not in position]
        if absent:
            raise EvalError(f"{task.name}: query {task.queries[i].id} has qrels {absent} outside its candidates")
        relevance.append({position[cid]: grade for cid, grade in qrels.items() if grade > 0})
    return scores, relevance


@dataclasses.dataclass
class EvalRun:
    """Per-call state: the pipeline (the models and their cache ids) and the T-CoT fallbacks counted so far."""

    pipeline: EmbedPipeline
    fallbacks: int = 0

    @property
    def embedder_id(self) -> str:
        return self.pipeline.embedder_id

    @property
    def reasoner_id(self) -> str | None:
        return self.pipeline.reasoner_id

    @property
    def reasoner(self) -> Reasoner | None:
        return self.pipeline.reasoner


class Ranked(NamedTuple):
    """One query's top candidates (ids, best first) and their scores (rounded to 6 digits) for its prediction."""

    ids: list[str]
    scores: list[float]


@dataclasses.dataclass
class EvalReport:
    """The result of one evaluation: per-task score objects, the benchmark's summary and the run's metadata.

    Attributes:
        results: task -> score object (fractions), in evaluation order.
        summary: the benchmark's summary (main metric ×100 and aggregates); None when nothing could be summarised.
        metadata: what was evaluated and how (models and their ids, modes, decoding, data versions, …).
        stats: task -> :class:`TaskStats`.
    """

    results: dict[str, dict[str, Any]]
    summary: dict[str, Any] | None
    metadata: dict[str, Any]
    stats: dict[str, TaskStats] = dataclasses.field(default_factory=dict)

    def markdown(self) -> str:
        """The benchmark's summary tables under a header naming what was evaluated and how."""
        raise NotImplementedError(f"{type(self).__name__} must define markdown()")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: metadata, summary, per-task results and stats."""
        return {
            "metadata": self.metadata,
            "summary": self.summary,
            "results": self.results,
            "stats": {task: dataclasses.asdict(s) for task, s in self.stats.items()},
        }

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``summary.md`` and ``summary.json`` (subclasses add their benchmark's files)."""
        out = Path(out_dir)
        return {
            "summary_md": write_text(out / SUMMARY_MD, self.markdown()),
            "summary_json": write_text(out / SUMMARY_JSON, json.dumps(self.as_dict(), indent=2, default=str) + "\n"),
        }


ReportT = TypeVar("ReportT", bound=EvalReport)


class TaskEvaluator(Generic[ReportT]):
    """The benchmark-independent engine: T-CoTs -> embeddings -> ranking -> metrics, task by task.

    Subclasses set :attr:`tasks` and provide :meth:`task` (how a task is read), :meth:`_predictions` (one record per
    query of ``predictions/<task>.jsonl``) and :meth:`_report` (summary and metadata):
    :class:`~embedrl.world.evaluate.WorldEvaluator` for the synthetic world,
    :class:`~embedrl.eval.mmeb.MMEBEvaluator` and :class:`~embedrl.eval.uvrb.UVRBEvaluator` for the real benchmarks.

    Args:
        mode: Embedder mode for queries and candidates (docs/method.md §6.4): full, answer_only, no_evidence or raw.
        tcot_source: ``teacher`` (stored T-CoTs), ``oracle`` (stored noise-free T-CoTs: :meth:`task` puts them on
            the items), ``reasoner`` (generated; pass the Reasoner to the call) or ``none`` (only with mode raw).
        decoding: Reasoner decoding; default ``Decoding()`` (temperature 1.0, top_p 1.0, seed 0).
        on_missing_tcot: ``error`` (default) raises :class:`MissingTCoTError`; ``raw`` embeds the item raw and
            counts it in ``metadata["tcot_fallbacks"]``.
        batch_size: items per Embedder call, each call one cache shard.
        reasoner_batch_size: items per Reasoner batch, each batch one cache append (a task side's items are sorted
            by modality and prompt length first).
        cache_dir: T-CoT and embedding caches; None keeps them in memory for the call only (e.g. during training,
            where the weights change between calls).
        out_dir: where :meth:`evaluate` writes score files, predictions and the report; None writes nothing.
        show_progress_bar: tqdm bars over tasks, generation batches and embedding batches.
        metric_ks: the cut-offs of the metrics (default 1, 5, 10: the 26 keys of an MMEB score file).
    """

    progress_label = "tasks"  # the tqdm label of the loop over tasks
    prediction_depth = 10  # candidates kept per query in predictions/<task>.jsonl
    score_keys: tuple[str, ...] = SCORE_KEYS  # the keys of scores/<task>_score.json, in file order
    config_options: tuple[str, ...] = ()  # stage-config fields that run_eval_stage passes on as keyword arguments
    result_files: tuple[str, ...] = tuple(RESULT_FILES)  # the RESULT_FILES an `embedrl eval` run writes

    def __init__(
        self,
        *,
        mode: str = "full",
        tcot_source: TCoTSource = "teacher",
        decoding: Decoding | None = None,
        on_missing_tcot: Literal["error", "raw"] = "error",
        batch_size: int = 16,
        reasoner_batch_size: int = 32,
        cache_dir: str | Path | None = None,
        out_dir: str | Path | None = None,
        show_progress_bar: bool = False,
        metric_ks: Sequence[int] = DEFAULT_KS,
    ) -> None:
        if mode not in EMBED_MODES:
            raise EvalError(f"mode={mode!r}; use one of {EMBED_MODES}")
        if tcot_source not in TCOT_SOURCES:
            raise EvalError(f"tcot_source={tcot_source!r}; use one of {TCOT_SOURCES}")
        if (mode == "raw") != (tcot_source == "none"):
            raise EvalError(
                f"mode={mode!r} with tcot_source={tcot_source!r}: raw mode goes with tcot_source 'none', and the "
                "other modes need T-CoTs ('teacher', 'oracle' or 'reasoner')"
            )
        if on_missing_tcot not in ON_MISSING:
            raise EvalError(f"on_missing_tcot={on_missing_tcot!r}; use one of {ON_MISSING}")
        if batch_size < 1 or reasoner_batch_size < 1:
            raise EvalError(f"batch_size={batch_size} and reasoner_batch_size={reasoner_batch_size} must be >= 1")
        self.mode = mode
        self.tcot_source = tcot_source
        self.decoding = decoding or Decoding()
        self.on_missing_tcot = on_missing_tcot
        self.batch_size = batch_size
        self.reasoner_batch_size = reasoner_batch_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.show_progress_bar = show_progress_bar
        self.metric_ks = tuple(metric_ks)
        self.tasks: list[str] = []

    # ------------------------------------------------------------------------------------------------------------
    # What a benchmark provides
    # ------------------------------------------------------------------------------------------------------------

    def task(self, name: str) -> EvalTask:
        """One task's queries, candidate pool, per-query lists (local) and qrels; ``info`` has ``eval_type`` and
        ``metric``."""
        raise NotImplementedError(f"{type(self).__name__} must define task(name)")

    def _predictions(
        self, name: str, task: EvalTask, ranked: list[Ranked], scores: np.ndarray, relevance: list[dict[int, int]]
    ) -> list[dict[str, Any]]:
        """One record per query of ``predictions/<name>.jsonl``, from its top candidates (``ranked``, in query
        order) and, where needed, the task's score matrix and relevance."""
        raise NotImplementedError(f"{type(self).__name__} must define _predictions(...)")

    def _report(
        self, run: EvalRun, results: dict[str, dict[str, Any]], stats: dict[str, TaskStats], extra: dict[str, Any]
    ) -> ReportT:
        """The report of a finished run; ``extra`` is the caller's metadata (see :meth:`_run_metadata`)."""
        raise NotImplementedError(f"{type(self).__name__} must define _report(...)")

    # ------------------------------------------------------------------------------------------------------------
    # The loop over tasks
    # ------------------------------------------------------------------------------------------------------------

    def evaluate(
        self,
        embedder: Embedder | Encoder,
        reasoner: Reasoner | None = None,
        *,
        embedder_id: str | None = None,
        reasoner_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ReportT:
        """Evaluate every task of :attr:`tasks`; with ``out_dir``, write each task's score and prediction files as
        it finishes and the report at the end.

        Args:
            embedder: an :class:`~embedrl.models.Embedder`, or any object with its ``encode`` signature (then
                ``embedder_id`` is required when a cache directory is set).
            reasoner: the Reasoner, required with ``tcot_source="reasoner"``.
            embedder_id, reasoner_id: cache ids; default a hash of the weights and settings
                (:func:`~embedrl.eval.cache.weights_fingerprint`).
            metadata: extra metadata (``model_name``, ``embedder_path``, ``reasoner_path``, …) for the result files.
        """
        run = self._start(embedder, reasoner, embedder_id, reasoner_id)
        results: dict[str, dict[str, Any]] = {}
        stats: dict[str, TaskStats] = {}
        for name in tqdm(self.tasks, desc=self.progress_label, disable=not self.show_progress_bar):
            results[name], stats[name] = self._evaluate_task(name, run)
            if self.out_dir is not None:
                write_task_scores(self.out_dir / SCORES_DIR, name, results[name], self.score_keys)
        if run.fallbacks:
            logger.warning("%d item(s) had no T-CoT and were embedded raw (on_missing_tcot=raw)", run.fallbacks)
        report = self._report(run, results, stats, dict(metadata or {}))
        if self.out_dir is not None:
            report.write(self.out_dir)
        return report

    @property
    def cot_mode(self) -> str:
        """Which sides carry a T-CoT, as the reference harness names it: ``none`` or ``query+candidate``."""
        return "none" if self.tcot_source == "none" else "query+candidate"

    def _run_metadata(
        self,
        run: EvalRun,
        extra: dict[str, Any],
        *,
        head: Mapping[str, Any],
        settings: Mapping[str, Any],
        missing: list[str],
        data: Mapping[str, Any],
    ) -> dict[str, Any]:
        """The metadata of a run, in file order: ``model_name``, the benchmark's ``head``, the models and modes,
        the benchmark's ``settings``, the tasks (``missing``: the benchmark's tasks not evaluated), what was read
        (``data``), the version and date, then what is left of ``extra`` (``model_name``, ``embedder_path`` and
        ``reasoner_path`` are taken out of it). The Embedder's entry names its input layout when it has one."""
        model_name = extra.pop("model_name", None) or f"{run.embedder_id} ({self.tcot_source}, {self.mode})"
        embedder_path = extra.pop("embedder_path", None)
        layout = getattr(run.pipeline.embedder, "layout", None)
        reasoner_path = extra.pop("reasoner_path", None)
        reasoner = run.reasoner
        return {
            "model_name": model_name,
            **head,
            "embedder": {"id": run.embedder_id, "path": embedder_path, **({"layout": layout} if layout else {})},
            "reasoner": None
            if reasoner is None
            else {"id": run.reasoner_id, "path": reasoner_path, "compact_prompts": reasoner.compact_prompts},
            "tcot_source": self.tcot_source,
            "query_mode": self.mode,
            "candidate_mode": self.mode,
            "decoding": dataclasses.asdict(self.decoding) if reasoner is not None else None,
            **settings,
            "tasks": list(self.tasks),
            "partial": bool(missing),
            "missing": missing,
            **data,
            "embedrl_version": __version__,
            "report_generated_date": datetime.now().isoformat(timespec="seconds"),
            **extra,
        }

    # ------------------------------------------------------------------------------------------------------------
    # One task
    # ------------------------------------------------------------------------------------------------------------

    def _start(
        self, embedder: Any, reasoner: Reasoner | None, embedder_id: str | None, reasoner_id: str | None
    ) -> EvalRun:
        if self.tcot_source == "reasoner" and reasoner is None:
            raise EvalError("tcot_source='reasoner' needs a Reasoner: evaluator(embedder, reasoner)")
        if self.tcot_source != "reasoner" and reasoner is not None:
            raise EvalError(f"a Reasoner was passed but tcot_source={self.tcot_source!r}; it would not be used")
        # Ids are fingerprints when they key a cache on disk or are written to result files; a call without either
        # (e.g. inside training, where the weights change between calls) skips hashing the weights.
        persistent = self.cache_dir is not None or self.out_dir is not None
        if embedder_id is None:
            if isinstance(embedder, Embedder) and persistent:
                embedder_id = embedder_fingerprint(embedder)
            elif self.cache_dir is not None:
                raise EvalError(
                    f"a {type(embedder).__name__} is not an Embedder, so its cache id cannot be derived from its "
                    "weights: pass embedder_id=..., or cache_dir=None"
                )
            else:
                embedder_id = f"{type(embedder).__name__} (not fingerprinted)"
        if reasoner is not None and reasoner_id is None:
            reasoner_id = reasoner_fingerprint(reasoner) if persistent else f"{reasoner.model_id} (not fingerprinted)"
        pipeline = EmbedPipeline(
            embedder,
            reasoner,
            decoding=self.decoding,
            embedder_id=embedder_id,
            reasoner_id=reasoner_id,
            batch_size=self.batch_size,
            reasoner_batch_size=self.reasoner_batch_size,
            show_progress_bar=self.show_progress_bar,
        )
        return EvalRun(pipeline)

    def _evaluate_task(self, name: str, run: EvalRun) -> tuple[dict[str, Any], TaskStats]:
        start = time.perf_counter()
        task = self.task(name)
        candidate_ids = _candidate_ids(task)
        candidates = [task.pool[cid] for cid in candidate_ids]
        stats = TaskStats(task.info["eval_type"], len(task.queries), len(candidates))
        if self.cache_dir is not None:
            tcot_cache = TCoTCache(self.cache_dir / "tcots" / f"{name}.jsonl")
            emb_cache = EmbeddingCache(self.cache_dir / "embeddings" / _safe_name(run.embedder_id) / name)
        else:
            tcot_cache, emb_cache = TCoTCache(None), EmbeddingCache(None)
        target_modality = _target_modality(candidates)
        query_inputs = self._annotate(name, task.queries, "query", target_modality, run, tcot_cache, stats)
        candidate_inputs = self._annotate(name, candidates, "target", None, run, tcot_cache, stats)
        q = run.pipeline.embed_inputs(query_inputs, cache=emb_cache, stats=stats, task=name)  # [n_q, D]
        c = run.pipeline.embed_inputs(candidate_inputs, cache=emb_cache, stats=stats, task=name)  # [n_c, D]
        emb_cache.compact()
        scores, relevance = score_task(task, candidate_ids, q, c)
        self._write_predictions(name, task, candidate_ids, scores, relevance)
        metrics = compute_metrics(scores, relevance, ks=self.metric_ks)
        stats.seconds = time.perf_counter() - start
        metric = task.info["metric"]
        logger.info(
            "%s (%s, %d queries x %d candidates): %s %.4f; T-CoTs %d new / %d cached, embeddings %d new / %d "
            "cached, %.1f s", name, stats.eval_type, stats.queries, stats.candidates, metric, metrics[metric],
            stats.tcots_generated, stats.tcots_cached, stats.embedded, stats.embeddings_cached, stats.seconds,
        )  # fmt: skip
        return metrics, stats

    def _annotate(
        self,
        task: str,
        items: Sequence[Item],
        side: Side,
        target_modality: Modality | None,
        run: EvalRun,
        cache: TCoTCache,
        stats: TaskStats,
    ) -> list[tuple[Item, str]]:
        """``(item with its T-CoT, Embedder mode)`` per item, by ``tcot_source``."""
        if self.tcot_source == "none":
            return [(item, "raw") for item in items]
        if self.tcot_source == "reasoner":
            texts = run.pipeline.generate(items, side, target_modality, cache=cache, stats=stats, task=task)
            stats.empty_tcots += sum(not t.strip() for t in texts)
            return [(item.with_tcot(text), self.mode) for item, text in zip(items, texts, strict=True)]
        missing = [item.id for item in items if item.tcot is None]
        if missing and self.on_missing_tcot == "error":
            raise MissingTCoTError(
                f"{task}: {len(missing)} {side} item(s) have no {self.tcot_source} T-CoT (e.g. {missing[:3]}); "
                "regenerate the world, use tcot_source 'reasoner', or set on_missing_tcot 'raw' to embed them raw "
                "(counted)"
            )
        stats.tcot_fallbacks += len(missing)
        run.fallbacks += len(missing)
        return [(item, self.mode if item.tcot is not None else "raw") for item in items]

    def _write_predictions(
        self, name: str, task: EvalTask, candidate_ids: Sequence[str], scores: np.ndarray, relevance: list[dict]
    ) -> None:
        """With ``out_dir``: ``predictions/<name>.jsonl``, one :meth:`_predictions` record per query, from its top
        :attr:`prediction_depth` candidates (finite scores only: a local list's padding never counts)."""
        if self.out_dir is None:
            return
        top = rank_candidates(scores, self.prediction_depth)
        ranked = []
        for i in range(len(task.queries)):
            ids = candidate_ids if task.candidates is None else task.candidates[i]
            columns = [int(j) for j in top[i] if np.isfinite(scores[i, j])]
            ranked.append(Ranked([ids[j] for j in columns], [round(float(scores[i, j]), 6) for j in columns]))
        records = self._predictions(name, task, ranked, scores, relevance)
        lines = [json.dumps(record, ensure_ascii=False) for record in records]
        write_text(self.out_dir / PREDICTIONS_DIR / f"{name}.jsonl", "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# The `embedrl eval` stages
# ----------------------------------------------------------------------------------------------------------------


def config_sha256(cfg: Any) -> str:
    """SHA-256 of a config as canonical JSON (recorded with benchmark results)."""
    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode("utf-8")).hexdigest()


def run_eval_stage(
    cfg: Any,
    evaluator: Callable[..., TaskEvaluator[Any]],
    data: str,
    *,
    embedder_path: str,
    model_name: str,
    settings: Mapping[str, Any] | None = None,
    extra_metadata: Callable[[Embedder], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The body of ``embedrl eval world|mmeb|uvrb``: save the config, build the evaluator (which reads and checks
    the data), load the Embedder (and the Reasoner when ``cfg.reasoner`` is set), evaluate with the run's
    metadata, and return the report with ``"markdown"`` and ``"files"``: the evaluator's
    :attr:`~TaskEvaluator.result_files` (name -> path under ``cfg.out``).

    Args:
        evaluator: a :class:`TaskEvaluator` subclass, called with ``data``, ``cfg.tasks`` (None when empty) and as
            keyword arguments: its :attr:`~TaskEvaluator.config_options` fields of ``cfg``, ``settings``, and the
            settings every stage shares (decoding, batch sizes, caches in ``cfg.cache_dir`` or ``<out>/cache``,
            ``out_dir``, progress bars).
        embedder_path, model_name: the Embedder directory and the run's label (recorded in the metadata).
        extra_metadata: more metadata from the loaded Embedder (e.g. its dimension), recorded before the config.
    """
    out = Path(cfg.out)
    save_config(cfg, out)
    options = {name: getattr(cfg, name) for name in getattr(evaluator, "config_options", ())}
    task_evaluator = evaluator(
        data,
        cfg.tasks or None,
        **options,
        **(settings or {}),
        decoding=decoding_from_config(cfg),
        batch_size=cfg.batch_size,
        reasoner_batch_size=cfg.reasoner_batch_size,
        cache_dir=cfg.cache_dir or out / "cache",
        out_dir=out,
        show_progress_bar=cfg.show_progress_bar,
    )
    # the data is read and checked first: a wrong path fails at once, before minutes of model loading
    embedder, reasoner = load_run_models(cfg, embedder_path)
    report = task_evaluator.evaluate(
        embedder,
        reasoner,
        embedder_id=cfg.embedder_id or None,
        reasoner_id=cfg.reasoner_id or None,
        metadata={
            "model_name": model_name,
            "embedder_path": embedder_path,
            "reasoner_path": cfg.reasoner or None,
            **(extra_metadata(embedder) if extra_metadata else {}),
            "eval_config": config_to_dict(cfg),
        },
    )
    files = {name: str(out / RESULT_FILES[name]) for name in task_evaluator.result_files}
    return {**report.as_dict(), "markdown": report.markdown(), "files": files}
