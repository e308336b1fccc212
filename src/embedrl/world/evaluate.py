"""Retrieval evaluation on the synthetic world: ``embedrl eval world`` (:func:`evaluate_world`).

:class:`WorldEvaluator` runs the engine of :mod:`embedrl.eval.evaluator` on the tasks of a world's
``eval/manifest.json`` and writes ``scores/<task>_score.json`` (the MMEB score-file shape), per-query
``predictions/<task>.jsonl``, ``summary.md``, ``summary.json`` and ``leaderboard.json``. It is also usable inside
training (``evaluator(embedder) -> {"eval/overall": …}``). :data:`MODE_PRESETS` are the demo's ablation rows.
``docs/eval.md`` §4 has the file layout.

Example:
    >>> from embedrl.world.evaluate import WorldEvaluator
    >>> evaluator = WorldEvaluator("runs/world", tasks=["world_cls"], mode="raw", tcot_source="none")  # doctest: +SKIP
    >>> evaluator(embedder)["eval/overall"]  # doctest: +SKIP
    0.3
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from embedrl import __version__
from embedrl.config import EvalConfig, config_to_dict, save_config
from embedrl.eval.evaluator import (
    Encoder,
    EvalError,
    EvalRun,
    TaskEvaluator,
    TaskStats,
    TCoTSource,
    write_text,
)
from embedrl.eval.metrics import per_query_metrics, rank_candidates
from embedrl.eval.scores import aggregate, format_summary, main_scores, summarize_tasks, write_task_scores
from embedrl.eval.task import EvalTask
from embedrl.models.embedder import Embedder
from embedrl.models.reasoner import Decoding, Reasoner
from embedrl.world.generate import EVAL_DIR, MANIFEST_FILE, WORLD_FILE, load_eval_task

__all__ = [
    "MODE_PRESETS",
    "PRIMARY_METRIC",
    "ModePreset",
    "WorldEvaluator",
    "WorldReport",
    "evaluate_world",
    "preset_config",
    "read_query_values",
]

logger = logging.getLogger(__name__)

BENCHMARK = "embedrl-world"
PRIMARY_METRIC = "eval/overall"
SCORES_DIR, PREDICTIONS_DIR = "scores", "predictions"
PREDICTION_DEPTH = 10  # candidates kept per query in predictions/<task>.jsonl
SUMMARY_MD, SUMMARY_JSON, LEADERBOARD_JSON = "summary.md", "summary.json", "leaderboard.json"


class ModePreset(NamedTuple):
    """Where the T-CoTs come from and which Embedder mode embeds them."""

    tcot_source: TCoTSource
    mode: str


# The ablation rows of the demo (docs/method.md §6.4, §7.3). ``pre_rl`` and ``egrl`` differ only in the Reasoner
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
        paths["summary_md"] = write_text(out / SUMMARY_MD, self.markdown())
        paths["summary_json"] = write_text(out / SUMMARY_JSON, json.dumps(self.as_dict(), indent=2) + "\n")
        paths["leaderboard"] = write_text(out / LEADERBOARD_JSON, json.dumps(self.leaderboard(), indent=2) + "\n")
        return paths


class WorldEvaluator(TaskEvaluator):
    """Retrieval evaluation of an Embedder on the world's tasks; ``evaluator(embedder) -> dict[str, float]``.

    Args:
        world_dir: a directory written by ``embedrl world generate``.
        tasks: task names of ``eval/manifest.json``; None = all, in manifest order.
        mode: Embedder mode for queries and candidates (docs/method.md §6.4): full, answer_only, no_evidence or raw.
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
        write_text(self.out_dir / PREDICTIONS_DIR / f"{name}.jsonl", "\n".join(lines) + "\n")

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

    def _metadata(self, run: EvalRun, extra: Mapping[str, Any]) -> dict[str, Any]:
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
