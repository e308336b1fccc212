"""The benchmark-independent evaluation engine: T-CoTs -> embeddings -> ranking -> metrics for each task.

For each :class:`~embedrl.eval.task.EvalTask`:

1. **T-CoTs** (``tcot_source``): ``teacher`` uses the T-CoTs stored with the items; ``reasoner`` generates them
   with a :class:`~embedrl.models.reasoner.Reasoner`, queries with the query-side family (routed by the task's
   candidate modality, docs/method.md §6.3) and every *unique* candidate once with its target-side family, never
   seeing a query (docs/method.md §6.1); ``none`` goes with ``mode="raw"``. A missing T-CoT raises
   :class:`MissingTCoTError`; ``on_missing_tcot="raw"`` embeds such an item raw instead and counts it.
2. **Embeddings**: each unique (item, mode, T-CoT) is embedded once with the Embedder in the requested mode.
3. **Ranking**: local tasks rank each query against its own candidate list (padded with ``-inf`` to one matrix),
   global tasks against the whole corpus; cosine similarity as a plain matrix product of unit vectors.
4. **Metrics**: :func:`~embedrl.eval.metrics.compute_metrics` with the task's qrels (graded for VisDoc).

Both expensive steps go through the caches of :mod:`embedrl.eval.cache`, written per finished batch: a rerun after
a kill recomputes only what had not finished. :class:`TaskEvaluator` is subclassed per benchmark: the synthetic
world (:mod:`embedrl.world.evaluate`), MMEB-V2 (:mod:`embedrl.eval.mmeb`) and UVRB (:mod:`embedrl.eval.uvrb`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from tqdm.auto import tqdm

from embedrl.data.schema import Item, Modality
from embedrl.eval.cache import (
    EmbeddingCache,
    TCoTCache,
    TCoTKey,
    decoding_key,
    embedding_key,
    weights_fingerprint,
)
from embedrl.eval.metrics import DEFAULT_KS, compute_metrics
from embedrl.eval.task import EvalTask
from embedrl.models.embedder import Embedder
from embedrl.models.reasoner import Decoding, Reasoner
from embedrl.prompts import PROMPT_FAMILIES, Side, choose_family

__all__ = [
    "EMBED_MODES",
    "Encoder",
    "EvalError",
    "MissingTCoTError",
    "TaskEvaluator",
    "TaskStats",
    "embedder_fingerprint",
    "reasoner_fingerprint",
    "score_task",
    "write_text",
]

logger = logging.getLogger(__name__)

TCoTSource = Literal["teacher", "reasoner", "none"]
TCOT_SOURCES: tuple[str, ...] = ("teacher", "reasoner", "none")
EMBED_MODES: tuple[str, ...] = ("full", "answer_only", "no_evidence", "raw")
ON_MISSING: tuple[str, ...] = ("error", "raw")


class EvalError(ValueError):
    """The evaluation inputs do not fit together (task names, qrels, encoder output); the message says how to fix."""


class MissingTCoTError(EvalError):
    """An item needs a T-CoT and has none (never silently embedded raw; see ``on_missing_tcot``)."""


class Encoder(Protocol):
    """What the evaluator needs of an Embedder: :meth:`embedrl.models.Embedder.encode`'s signature."""

    def encode(
        self,
        items: Sequence[Item],
        batch_size: int = ...,
        show_progress_bar: bool | None = ...,
        mode: str | None = ...,
    ) -> np.ndarray: ...


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


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


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


def embedder_fingerprint(embedder: Embedder) -> str:
    """``embedder@<hash>``: the weights plus the settings that change its outputs (video_as, text cap, pixel budget,
    ``<emb>`` id). The mode is not in it: it is a separate part of every embedding key."""
    settings = {
        "video_as": embedder.video_as,
        "max_text_tokens": embedder.max_text_tokens,
        "budget": dataclasses.asdict(embedder.budget),
        "emb_token_id": embedder.emb_token_id,
    }
    return "embedder@" + weights_fingerprint(embedder.model, settings)


def reasoner_fingerprint(reasoner: Reasoner) -> str:
    """``<checkpoint dir name>@<hash>``: the weights plus the pixel budget and the generation backend."""
    settings = {"budget": dataclasses.asdict(reasoner.budget), "backend": reasoner.backend}
    return f"{Path(reasoner.model_id).name}@{weights_fingerprint(reasoner.model, settings)}"


@dataclasses.dataclass
class EvalRun:
    """Per-call state: the models and their cache ids."""

    encoder: Encoder
    embedder_id: str
    reasoner: Reasoner | None
    reasoner_id: str | None
    fallbacks: int = 0


class TaskEvaluator:
    """The benchmark-independent engine: T-CoTs -> embeddings -> ranking -> metrics for one :class:`EvalTask`.

    Subclasses provide :meth:`task` (how a task is read) and their own ``evaluate`` (which tasks, which result
    files): :class:`WorldEvaluator` for the synthetic world, :class:`embedrl.eval.mmeb.MMEBEvaluator` and
    :class:`embedrl.eval.uvrb.UVRBEvaluator` for the real benchmarks. The arguments are those of
    :class:`WorldEvaluator` without ``world_dir`` and ``tasks``; ``metric_ks`` are the cut-offs of the metrics
    (default 1, 5, 10: the 26 keys of an MMEB score file).
    """

    def __init__(
        self,
        *,
        mode: str = "full",
        tcot_source: TCoTSource = "teacher",
        decoding: Decoding | None = None,
        on_missing_tcot: Literal["error", "raw"] = "error",
        batch_size: int = 16,
        reasoner_batch_size: int = 8,
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
                "other modes need T-CoTs ('teacher' or 'reasoner')"
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

    def task(self, name: str) -> EvalTask:
        """One task's queries, candidate pool, per-query lists (local) and qrels; ``info`` has ``eval_type`` and
        ``metric``."""
        raise NotImplementedError(f"{type(self).__name__} must define task(name)")

    def _task_scored(
        self, name: str, task: EvalTask, candidate_ids: Sequence[str], scores: np.ndarray, relevance: list[dict]
    ) -> None:
        """Called with each task's score matrix before its metrics are computed (e.g. to write predictions)."""

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
        return EvalRun(embedder, embedder_id, reasoner, reasoner_id)

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
        q = self._embed(name, query_inputs, run, emb_cache, stats)  # [n_q, D]
        c = self._embed(name, candidate_inputs, run, emb_cache, stats)  # [n_c, D]
        emb_cache.compact()
        scores, relevance = score_task(task, candidate_ids, q, c)
        self._task_scored(name, task, candidate_ids, scores, relevance)
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
            texts = self._generate(task, items, side, target_modality, run, cache, stats)
            stats.empty_tcots += sum(not t.strip() for t in texts)
            return [(item.with_tcot(text), self.mode) for item, text in zip(items, texts, strict=True)]
        missing = [item.id for item in items if item.tcot is None]
        if missing and self.on_missing_tcot == "error":
            raise MissingTCoTError(
                f"{task}: {len(missing)} {side} item(s) have no teacher T-CoT (e.g. {missing[:3]}); regenerate the "
                "world, use tcot_source 'reasoner', or set on_missing_tcot 'raw' to embed them raw (counted)"
            )
        stats.tcot_fallbacks += len(missing)
        run.fallbacks += len(missing)
        return [(item, self.mode if item.tcot is not None else "raw") for item in items]

    def _generate(
        self,
        task: str,
        items: Sequence[Item],
        side: Side,
        target_modality: Modality | None,
        run: EvalRun,
        cache: TCoTCache,
        stats: TaskStats,
    ) -> list[str]:
        """Reasoner T-CoTs of ``items``: cached ones read back, the rest generated and appended batch by batch."""
        reasoner = run.reasoner
        assert reasoner is not None and run.reasoner_id is not None  # checked in _start
        decoding = decoding_key(self.decoding)
        keys = [
            TCoTKey(
                item.id,
                side,
                run.reasoner_id,
                PROMPT_FAMILIES[choose_family(side, item.modality, target_modality)].hash(reasoner.compact_prompts),
                decoding,
            )
            for item in items
        ]
        first: dict[TCoTKey, int] = {}
        for i, key in enumerate(keys):
            if key not in cache and key not in first:
                first[key] = i
        todo = list(first.values())
        stats.tcots_cached += len(set(keys)) - len(todo)
        batches = [todo[i : i + self.reasoner_batch_size] for i in range(0, len(todo), self.reasoner_batch_size)]
        bar = tqdm(batches, desc=f"{task} T-CoTs ({side})", disable=not self.show_progress_bar, leave=False)
        for batch in bar:
            generations = reasoner.generate(
                [items[i] for i in batch],
                side,
                target_modality,
                decoding=self.decoding,
                batch_size=len(batch),
                show_progress_bar=False,
            )
            entries = []
            for i, outs in zip(batch, generations, strict=True):
                (gen,) = outs
                if gen.prompt_hash != keys[i].prompt_hash:
                    raise RuntimeError(
                        f"{items[i].id}: generated with prompt {gen.prompt_hash}, keyed as {keys[i].prompt_hash}"
                    )
                entries.append((keys[i], gen.text, gen.family))
            cache.add(entries)
            stats.tcots_generated += len(batch)
        texts = [cache.get(key) for key in keys]
        assert all(t is not None for t in texts)
        return texts  # type: ignore[return-value]

    def _embed(
        self, task: str, inputs: Sequence[tuple[Item, str]], run: EvalRun, cache: EmbeddingCache, stats: TaskStats
    ) -> np.ndarray:
        """Embeddings ``[N, D]`` of ``(item, mode)`` inputs; each unique key is encoded once, batch by batch."""
        keys = [embedding_key(item.id, run.embedder_id, mode, item.tcot) for item, mode in inputs]
        todo: dict[str, list[int]] = {}  # mode -> first index of each key not cached yet
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in cache and key not in first:
                first[key] = i
                todo.setdefault(inputs[i][1], []).append(i)
        stats.embeddings_cached += len(set(keys)) - len(first)
        batches = [
            (mode, idx[j : j + self.batch_size])
            for mode, idx in todo.items()
            for j in range(0, len(idx), self.batch_size)
        ]
        bar = tqdm(batches, desc=f"{task} embed", disable=not self.show_progress_bar, leave=False)
        for mode, batch in bar:
            items = [inputs[i][0] for i in batch]
            vectors = run.encoder.encode(items, batch_size=self.batch_size, show_progress_bar=False, mode=mode)
            vectors = np.asarray(vectors, dtype=np.float32)
            if vectors.ndim != 2 or vectors.shape[0] != len(batch) or not np.isfinite(vectors).all():
                raise EvalError(
                    f"{task}: the encoder returned {vectors.shape} (finite: {bool(np.isfinite(vectors).all())}) for "
                    f"{len(batch)} items; it must return finite [n_items, D] vectors"
                )
            cache.add([keys[i] for i in batch], vectors)
            stats.embedded += len(batch)
        return np.stack([cache.get(key) for key in keys])  # type: ignore[misc]
