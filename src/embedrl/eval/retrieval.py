"""Retrieval evaluation on the synthetic world: T-CoTs -> embeddings -> ranking -> score files (method.md §6).

For each task of the world's ``eval/manifest.json`` (or a chosen subset):

1. **T-CoTs** (``tcot_source``): ``teacher`` uses the T-CoTs stored with the world's items; ``reasoner`` generates
   them with a :class:`~embedrl.models.reasoner.Reasoner`, queries with the query-side family (routed by the task's
   candidate modality, method.md §6.3) and every *unique* candidate once with its target-side family, never seeing a
   query (method.md §6.1, §8.24); ``none`` goes with ``mode="raw"``. A missing T-CoT raises
   :class:`MissingTCoTError`; ``on_missing_tcot="raw"`` embeds such an item raw instead and counts it.
2. **Embeddings**: each unique (item, mode, T-CoT) is embedded once with the Embedder in the requested mode.
3. **Ranking**: local tasks rank each query against its own candidate list (padded with ``-inf`` to one matrix),
   global tasks against the whole corpus; cosine similarity as a plain matrix product of unit vectors.
4. **Metrics**: :func:`~embedrl.eval.metrics.compute_metrics` with the task's qrels (graded for VisDoc), written as
   ``scores/<task>_score.json`` (the MMEB score-file shape), then plain means by modality, meta-task and overall.

Both expensive steps go through the caches of :mod:`embedrl.eval.cache` (T-CoTs keyed by item id, side, reasoner
id, prompt hash and decoding; embeddings by item id, embedder id, mode and T-CoT hash), written per finished
batch: a rerun after a kill recomputes only what had not finished.

:class:`WorldEvaluator` is the reusable evaluator (``evaluator(embedder) -> {"eval/overall": …}``, usable inside
training); :func:`evaluate_world` is the ``embedrl eval world`` stage. ``docs/eval.md`` §4 has the file layout.

Example:
    >>> from embedrl.eval.retrieval import WorldEvaluator
    >>> evaluator = WorldEvaluator("runs/world", tasks=["world_cls"], mode="raw", tcot_source="none")  # doctest: +SKIP
    >>> evaluator(embedder)["eval/overall"]  # doctest: +SKIP
    0.3
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

import numpy as np
from tqdm.auto import tqdm

from embedrl import __version__
from embedrl.config import EvalConfig, config_to_dict, save_config
from embedrl.data.schema import Item, Modality
from embedrl.data.world import EVAL_DIR, MANIFEST_FILE, WORLD_FILE, EvalTask, load_eval_task
from embedrl.eval.cache import (
    EmbeddingCache,
    TCoTCache,
    TCoTKey,
    decoding_key,
    embedding_key,
    weights_fingerprint,
)
from embedrl.eval.metrics import DEFAULT_KS, compute_metrics, per_query_metrics, rank_candidates
from embedrl.eval.scores import (
    aggregate,
    format_summary,
    main_scores,
    summarize_tasks,
    write_task_scores,
)
from embedrl.prompts import FAMILIES, Side, choose_family

if TYPE_CHECKING:
    from embedrl.models.embedder import Embedder
    from embedrl.models.reasoner import Decoding, Reasoner

__all__ = [
    "MODE_PRESETS",
    "PRIMARY_METRIC",
    "Encoder",
    "EvalError",
    "MissingTCoTError",
    "ModePreset",
    "TaskEvaluator",
    "TaskStats",
    "WorldEvaluator",
    "WorldReport",
    "embedder_fingerprint",
    "evaluate_world",
    "preset_config",
    "read_query_values",
    "reasoner_fingerprint",
    "score_task",
]

logger = logging.getLogger(__name__)

TCoTSource = Literal["teacher", "reasoner", "none"]
TCOT_SOURCES: tuple[str, ...] = ("teacher", "reasoner", "none")
EMBED_MODES: tuple[str, ...] = ("full", "answer_only", "no_evidence", "raw")
ON_MISSING: tuple[str, ...] = ("error", "raw")
BENCHMARK = "embedrl-world"
PRIMARY_METRIC = "eval/overall"
SCORES_DIR, PREDICTIONS_DIR = "scores", "predictions"
PREDICTION_DEPTH = 10  # candidates kept per query in predictions/<task>.jsonl
SUMMARY_MD, SUMMARY_JSON, LEADERBOARD_JSON = "summary.md", "summary.json", "leaderboard.json"


class EvalError(ValueError):
    """The evaluation inputs do not fit together (task names, qrels, encoder output); the message says how to fix."""


class MissingTCoTError(EvalError):
    """An item needs a T-CoT and has none (never silently embedded raw; see ``on_missing_tcot``)."""


class ModePreset(NamedTuple):
    """Where the T-CoTs come from and which Embedder mode embeds them."""

    tcot_source: TCoTSource
    mode: str


# The ablation rows of the demo (method.md §6.4, §7.3). ``pre_rl`` and ``egrl`` differ only in the Reasoner
# checkpoint (cold start vs EG-RL: paper Table 3 "w/o EG-RL"); answer_only and no_evidence use the EG-RL T-CoTs
# (paper Table 4 "w/o reasoning", "w/o multimodal cues"); raw is "w/ raw input" with the same Embedder.
MODE_PRESETS: dict[str, ModePreset] = {
    "raw": ModePreset("none", "raw"),
    "teacher": ModePreset("teacher", "full"),
    "pre_rl": ModePreset("reasoner", "full"),
    "egrl": ModePreset("reasoner", "full"),
    "answer_only": ModePreset("reasoner", "answer_only"),
    "no_evidence": ModePreset("reasoner", "no_evidence"),
}


def preset_config(cfg: EvalConfig, preset: str, *, reasoner: str = "") -> EvalConfig:
    """``cfg`` set up for one :data:`MODE_PRESETS` row: its T-CoT source and mode, ``out`` = ``<cfg.out>/<preset>``.

    All presets share one cache (``cfg.cache_dir``, default ``<cfg.out>/cache``), so e.g. the EG-RL T-CoTs are
    generated once for ``egrl``, ``answer_only`` and ``no_evidence``.

    Args:
        reasoner: the Reasoner checkpoint for presets that generate T-CoTs (the cold start for ``pre_rl``, the
            EG-RL checkpoint for ``egrl``, ``answer_only`` and ``no_evidence``).
    """
    if preset not in MODE_PRESETS:
        raise EvalError(f"unknown preset {preset!r}; use one of {sorted(MODE_PRESETS)}")
    source, mode = MODE_PRESETS[preset]
    if source == "reasoner" and not reasoner:
        raise EvalError(f"preset {preset!r} generates T-CoTs: pass reasoner=<Reasoner checkpoint directory>")
    return dataclasses.replace(
        cfg,
        tcot_source=source,
        mode=mode,
        reasoner=reasoner if source == "reasoner" else "",
        out=str(Path(cfg.out) / preset),
        cache_dir=cfg.cache_dir or str(Path(cfg.out) / "cache"),
        name=cfg.name or preset,
    )


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


@dataclasses.dataclass
class WorldReport:
    """The result of one evaluation.

    Attributes:
        results: task -> score object (the 26 MMEB keys, fractions), in manifest order.
        summary: :func:`~embedrl.eval.scores.summarize_tasks` of ``results`` (main metric ×100, plain means).
        metadata: run description: embedder/reasoner ids, modes, decoding, world seed and format, fallbacks, …
        stats: task -> :class:`TaskStats`.
        task_info: the manifest's entries of the evaluated tasks.
    """

    results: dict[str, dict[str, Any]]
    summary: dict[str, Any]
    metadata: dict[str, Any]
    stats: dict[str, TaskStats]
    task_info: dict[str, dict[str, Any]]

    def metrics(self) -> dict[str, float]:
        """Flat fractions: ``eval/<task>/<metric>``, ``eval/modality/<m>``, ``eval/meta_task/<t>``,
        ``eval/overall`` (the primary metric: the mean main metric over tasks) and ``eval/tcot_fallbacks``."""
        out: dict[str, float] = {}
        for task, scores in self.results.items():
            out.update({f"eval/{task}/{k}": float(v) for k, v in scores.items() if k not in ("num_pred", "num_data")})
        agg = aggregate(main_scores(self.results, self.task_info), self.task_info)
        for key in ("modality", "meta_task"):
            out.update({f"eval/{key}/{label}": value for label, value in agg[key].items()})
        out[PRIMARY_METRIC] = agg["overall"]
        out["eval/tcot_fallbacks"] = float(self.metadata["tcot_fallbacks"])
        return out

    def leaderboard(self) -> dict[str, Any]:
        """``{"metadata", "metrics": {modality: {task: score object}}}``, the shape of the MMEB leaderboard files."""
        metrics: dict[str, dict[str, Any]] = {}
        for task, scores in self.results.items():
            metrics.setdefault(self.task_info[task]["modality"], {})[task] = scores
        return {"metadata": self.metadata, "metrics": metrics}

    def markdown(self) -> str:
        """The summary tables (:func:`format_summary`) under a header naming what was evaluated and how."""
        m = self.metadata
        reasoner = m["reasoner"]["id"] if m["reasoner"] else "-"
        decoding = json.dumps(m["decoding"], sort_keys=True) if m["decoding"] else "-"
        world = m["world"]
        lines = [
            f"# {m['model_name']}",
            "",
            f"- Embedder: `{m['embedder']['id']}`" + (f" ({m['embedder']['path']})" if m["embedder"]["path"] else ""),
            f"- T-CoTs: {m['tcot_source']}; Reasoner: `{reasoner}`; decoding: {decoding}",
            f"- Modes: query {m['query_mode']}, candidate {m['candidate_mode']}; T-CoT fallbacks: "
            f"{m['tcot_fallbacks']} (on_missing_tcot={m['on_missing_tcot']})",
            f"- World: {world['dir']} (seed {world['seed']}, format {world['format_version']}, size {world['size']})",
            "",
            "",
        ]
        return "\n".join(lines) + format_summary(self.summary)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: metadata, summary, per-task results and stats."""
        return {
            "metadata": self.metadata,
            "summary": self.summary,
            "results": self.results,
            "stats": {task: dataclasses.asdict(s) for task, s in self.stats.items()},
        }

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``scores/<task>_score.json``, ``summary.md``, ``summary.json`` and ``leaderboard.json``."""
        out = Path(out_dir)
        paths = {task: write_task_scores(out / SCORES_DIR, task, s) for task, s in self.results.items()}
        paths["summary_md"] = _write_text(out / SUMMARY_MD, self.markdown())
        paths["summary_json"] = _write_text(out / SUMMARY_JSON, json.dumps(self.as_dict(), indent=2) + "\n")
        paths["leaderboard"] = _write_text(out / LEADERBOARD_JSON, json.dumps(self.leaderboard(), indent=2) + "\n")
        return paths


def _write_text(path: Path, text: str) -> Path:
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
class _Run:
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
        from embedrl.models.reasoner import Decoding

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
    ) -> _Run:
        from embedrl.models.embedder import Embedder

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
        return _Run(embedder, embedder_id, reasoner, reasoner_id)

    def _evaluate_task(self, name: str, run: _Run) -> tuple[dict[str, Any], TaskStats]:
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
        run: _Run,
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
        run: _Run,
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
                FAMILIES[choose_family(side, item.modality, target_modality)].hash(reasoner.compact_prompts),
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
        self, task: str, inputs: Sequence[tuple[Item, str]], run: _Run, cache: EmbeddingCache, stats: TaskStats
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


class WorldEvaluator(TaskEvaluator):
    """Retrieval evaluation of an Embedder on the world's tasks; ``evaluator(embedder) -> dict[str, float]``.

    Args:
        world_dir: a directory written by ``embedrl world generate``.
        tasks: task names of ``eval/manifest.json``; None = all, in manifest order.
        mode: Embedder mode for queries and candidates (method.md §6.4): full, answer_only, no_evidence or raw.
        tcot_source: ``teacher`` (stored T-CoTs), ``reasoner`` (generated; pass the Reasoner to the call) or
            ``none`` (only with mode raw).
        decoding: Reasoner decoding; default ``Decoding()`` (temperature 1.0, top_p 1.0, seed 0).
        on_missing_tcot: ``error`` (default) raises :class:`MissingTCoTError`; ``raw`` embeds the item raw and
            counts it in ``metadata["tcot_fallbacks"]``.
        batch_size: items per Embedder call, each call one cache shard.
        reasoner_batch_size: items per Reasoner call, each call one cache append.
        cache_dir: T-CoT and embedding caches; None keeps them in memory for the call only (e.g. during training,
            where the weights change between calls).
        out_dir: where :meth:`evaluate` writes score files and summaries; None writes nothing.
        show_progress_bar: tqdm bars over tasks, generation batches and embedding batches.

    The returned dict's primary metric is :attr:`primary_metric` (``eval/overall``, a fraction).
    """

    primary_metric = PRIMARY_METRIC

    def __init__(
        self,
        world_dir: str | Path,
        tasks: Sequence[str] | None = None,
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
    ) -> None:
        super().__init__(
            mode=mode,
            tcot_source=tcot_source,
            decoding=decoding,
            on_missing_tcot=on_missing_tcot,
            batch_size=batch_size,
            reasoner_batch_size=reasoner_batch_size,
            cache_dir=cache_dir,
            out_dir=out_dir,
            show_progress_bar=show_progress_bar,
        )
        self.world_dir = Path(world_dir)
        manifest_file = self.world_dir / EVAL_DIR / MANIFEST_FILE
        if not manifest_file.is_file():
            raise FileNotFoundError(
                f"{manifest_file} not found: {self.world_dir} is not a world; run `embedrl world generate --out "
                f"{self.world_dir}` first"
            )
        self.manifest = json.loads(manifest_file.read_text())
        known = list(self.manifest["tasks"])
        unknown = [t for t in tasks or () if t not in known]
        if unknown:
            raise EvalError(f"unknown task(s) {unknown} for {self.world_dir}; the manifest has {known}")
        self.tasks = [t for t in known if t in tasks] if tasks else known
        world_file = self.world_dir / WORLD_FILE
        self.world_info = json.loads(world_file.read_text()) if world_file.is_file() else {}
        self._loaded: dict[str, EvalTask] = {}

    def task(self, name: str) -> EvalTask:
        """One task's queries, pool and qrels (read once)."""
        if name not in self._loaded:
            self._loaded[name] = load_eval_task(self.world_dir, name)
        return self._loaded[name]

    def _task_scored(
        self, name: str, task: EvalTask, candidate_ids: Sequence[str], scores: np.ndarray, relevance: list[dict]
    ) -> None:
        """Write ``predictions/<task>.jsonl``: per query its id, the task's main metric and its value for that query
        (their mean is the score file's value), the top-10 candidate ids with scores, and the relevant ids."""
        if self.out_dir is None:
            return
        metric = task.info["metric"]
        values = per_query_metrics(scores, relevance, ks=self.metric_ks)[metric]  # [n_q]
        top = rank_candidates(scores, PREDICTION_DEPTH)
        lines = []
        for i, query in enumerate(task.queries):
            ids = candidate_ids if task.candidates is None else task.candidates[i]
            ranked = [int(j) for j in top[i] if np.isfinite(scores[i, j])]
            record = {
                "query": query.id, "metric": metric, "value": float(values[i]),
                "top": [ids[j] for j in ranked], "scores": [round(float(scores[i, j]), 6) for j in ranked],
                "labels": [cid for cid, grade in task.qrels[i].items() if grade > 0],
            }  # fmt: skip
            lines.append(json.dumps(record, ensure_ascii=False))
        _write_text(self.out_dir / PREDICTIONS_DIR / f"{name}.jsonl", "\n".join(lines) + "\n")

    def __call__(
        self,
        embedder: Embedder | Encoder,
        reasoner: Reasoner | None = None,
        *,
        embedder_id: str | None = None,
        reasoner_id: str | None = None,
    ) -> dict[str, float]:
        """Evaluate and return :meth:`WorldReport.metrics` (fractions; primary metric ``eval/overall``)."""
        return self.evaluate(embedder, reasoner, embedder_id=embedder_id, reasoner_id=reasoner_id).metrics()

    def evaluate(
        self,
        embedder: Embedder | Encoder,
        reasoner: Reasoner | None = None,
        *,
        embedder_id: str | None = None,
        reasoner_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> WorldReport:
        """Evaluate every task; write score files as tasks finish and the summaries at the end (with ``out_dir``).

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
        for name in tqdm(self.tasks, desc="tasks", disable=not self.show_progress_bar):
            results[name], stats[name] = self._evaluate_task(name, run)
            if self.out_dir is not None:
                write_task_scores(self.out_dir / SCORES_DIR, name, results[name])
        task_info = {t: self.manifest["tasks"][t] for t in self.tasks}
        summary = summarize_tasks(results, self.manifest["tasks"], partial=True, benchmark=BENCHMARK)
        report = WorldReport(results, summary, self._metadata(run, metadata or {}), stats, task_info)
        if run.fallbacks:
            logger.warning("%d item(s) had no T-CoT and were embedded raw (on_missing_tcot=raw)", run.fallbacks)
        if self.out_dir is not None:
            report.write(self.out_dir)
        return report

    # ------------------------------------------------------------------------------------------------------------
    # One call
    # ------------------------------------------------------------------------------------------------------------

    def _metadata(self, run: _Run, extra: Mapping[str, Any]) -> dict[str, Any]:
        extra = dict(extra)
        embedder_path = extra.pop("embedder_path", None)
        reasoner_path = extra.pop("reasoner_path", None)
        reasoner = run.reasoner
        missing = [t for t in self.manifest["tasks"] if t not in self.tasks]
        return {
            "model_name": extra.pop("model_name", None) or f"{run.embedder_id} ({self.tcot_source}, {self.mode})",
            "benchmark": BENCHMARK,
            "world": {
                "dir": str(self.world_dir),
                "seed": self.manifest.get("seed"),
                "format_version": self.manifest.get("format_version"),
                "size": self.world_info.get("size"),
                "generator": self.world_info.get("generator"),
            },
            "embedder": {"id": run.embedder_id, "path": embedder_path},
            "reasoner": None
            if reasoner is None
            else {"id": run.reasoner_id, "path": reasoner_path, "compact_prompts": reasoner.compact_prompts},
            "tcot_source": self.tcot_source,
            "query_mode": self.mode,
            "candidate_mode": self.mode,
            "decoding": dataclasses.asdict(self.decoding) if reasoner is not None else None,
            "on_missing_tcot": self.on_missing_tcot,
            "tcot_fallbacks": run.fallbacks,
            "tasks": list(self.tasks),
            "partial": bool(missing),
            "missing": missing,
            "main_metrics": {t: self.manifest["tasks"][t]["metric"] for t in self.tasks},
            "embedrl_version": __version__,
            "report_generated_date": datetime.now().isoformat(timespec="seconds"),
            **extra,
        }


def read_query_values(out_dir: str | Path) -> dict[str, np.ndarray]:
    """task -> ``[n_queries]`` per-query values of its main metric, from ``out_dir/predictions/<task>.jsonl`` (an
    evaluation output directory), in query order."""
    folder = Path(out_dir) / PREDICTIONS_DIR
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no {PREDICTIONS_DIR}/<task>.jsonl in {out_dir}: evaluate with out_dir set first")
    return {
        f.stem: np.array([json.loads(line)["value"] for line in f.read_text().splitlines() if line]) for f in files
    }


def evaluate_world(cfg: EvalConfig) -> dict[str, Any]:
    """The ``embedrl eval world`` stage: load the Embedder (and Reasoner), evaluate, write the result files.

    Writes into ``cfg.out``: ``config.json`` (the resolved config), ``scores/<task>_score.json``,
    ``predictions/<task>.jsonl`` (per query: its main-metric value and top candidates), ``summary.md``,
    ``summary.json`` and ``leaderboard.json``; caches go to ``cfg.cache_dir`` (default ``<out>/cache``).

    Returns:
        :meth:`WorldReport.as_dict` plus ``"markdown"`` (the summary table) and ``"files"`` (the written paths).
    """
    import torch

    from embedrl.models.embedder import Embedder
    from embedrl.models.reasoner import Decoding, Reasoner

    out = Path(cfg.out)
    save_config(cfg, out)
    dtype: Any = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    embedder = Embedder.load(cfg.embedder, dtype=dtype, device=cfg.device)
    reasoner = None
    if cfg.tcot_source == "reasoner":
        reasoner = Reasoner.from_pretrained(
            cfg.reasoner, dtype=dtype, device=cfg.device, compact_prompts=cfg.compact_prompts
        )
    decoding = Decoding(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        greedy=cfg.greedy,
        seed=cfg.seed,
    )
    evaluator = WorldEvaluator(
        cfg.world,
        cfg.tasks or None,
        mode=cfg.mode,
        tcot_source=cfg.tcot_source,
        decoding=decoding,
        on_missing_tcot=cfg.on_missing_tcot,
        batch_size=cfg.batch_size,
        reasoner_batch_size=cfg.reasoner_batch_size,
        cache_dir=cfg.cache_dir or out / "cache",
        out_dir=out,
        show_progress_bar=cfg.show_progress_bar,
    )
    name = cfg.name or f"{cfg.embedder} ({cfg.tcot_source}, {cfg.mode})"
    report = evaluator.evaluate(
        embedder,
        reasoner,
        embedder_id=cfg.embedder_id or None,
        reasoner_id=cfg.reasoner_id or None,
        metadata={
            "model_name": name,
            "embedder_path": cfg.embedder,
            "reasoner_path": cfg.reasoner or None,
            "embedder_dim": embedder.dim,
            "eval_config": config_to_dict(cfg),
        },
    )
    files = {"scores": str(out / SCORES_DIR), "predictions": str(out / PREDICTIONS_DIR)} | {
        k: str(out / f) for k, f in (("summary_md", SUMMARY_MD), ("summary_json", SUMMARY_JSON),
                                     ("leaderboard", LEADERBOARD_JSON), ("config", "config.json"))
    }  # fmt: skip
    return {**report.as_dict(), "markdown": report.markdown(), "files": files}
