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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from embedrl.config import EvalConfig
from embedrl.eval.evaluator import (
    LEADERBOARD_JSON,
    PREDICTIONS_DIR,
    SCORES_DIR,
    Encoder,
    EvalError,
    EvalReport,
    EvalRun,
    Ranked,
    TaskEvaluator,
    TaskStats,
    TCoTSource,
    run_eval_stage,
    write_text,
)
from embedrl.eval.metrics import per_query_metrics
from embedrl.eval.scores import aggregate, format_summary, main_scores, summarize_tasks, write_task_scores
from embedrl.eval.task import EvalTask
from embedrl.models.embedder import Embedder
from embedrl.models.reasoner import Reasoner
from embedrl.world.generate import EVAL_DIR, MANIFEST_FILE, WORLD_FILE, check_oracle_tcots, load_eval_task

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


class ModePreset(NamedTuple):
    """Where the T-CoTs come from and which Embedder mode embeds them."""

    tcot_source: TCoTSource
    mode: str


# The ablation rows of the demo (docs/method.md §6.4, §7.3). ``pre_rl`` and ``egrl`` differ only in the Reasoner
# checkpoint (cold start vs EG-RL: paper Table 3 "w/o EG-RL"); answer_only and no_evidence use the EG-RL T-CoTs
# (paper Table 4 "w/o reasoning", "w/o multimodal cues"); raw is "w/ raw input" with the same Embedder. teacher and
# oracle are references, not method rows: the world's teacher T-CoTs, and the same teacher's with every imperfection
# rate at 0 (the ceiling of what a perfect Reasoner could give the Embedder).
MODE_PRESETS: dict[str, ModePreset] = {
    "raw": ModePreset("none", "raw"),
    "teacher": ModePreset("teacher", "full"),
    "oracle": ModePreset("oracle", "full"),
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
class WorldReport(EvalReport):
    """The result of one evaluation.

    Attributes:
        results: task -> score object (the 26 MMEB keys, fractions), in manifest order.
        summary: :func:`~embedrl.eval.scores.summarize_tasks` of ``results`` (main metric ×100, plain means).
        metadata: run description: embedder/reasoner ids, modes, decoding, world seed and format, fallbacks, …
        stats: task -> :class:`TaskStats`.
        task_info: the manifest's entries of the evaluated tasks.
    """

    task_info: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

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
        return "\n".join(lines) + format_summary(self.summary or {})

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``scores/<task>_score.json``, ``summary.md``, ``summary.json`` and ``leaderboard.json``."""
        out = Path(out_dir)
        paths = {task: write_task_scores(out / SCORES_DIR, task, s) for task, s in self.results.items()}
        paths |= super().write(out)
        paths["leaderboard"] = write_text(out / LEADERBOARD_JSON, json.dumps(self.leaderboard(), indent=2) + "\n")
        return paths


class WorldEvaluator(TaskEvaluator[WorldReport]):
    """Retrieval evaluation of an Embedder on the world's tasks; ``evaluator(embedder) -> dict[str, float]``.

    Args:
        world_dir: a directory written by ``embedrl world generate``.
        tasks: task names of ``eval/manifest.json``; None = all, in manifest order.
        **engine: the :class:`~embedrl.eval.evaluator.TaskEvaluator` settings: ``mode`` (full, answer_only,
            no_evidence or raw; docs/method.md §6.4), ``tcot_source`` (``teacher``: the stored T-CoTs; ``oracle``: the
            stored noise-free ones, which a world of format 1 lacks: refused), ``decoding``,
            ``on_missing_tcot``, batch sizes, ``cache_dir`` (None keeps the caches in memory for the call only, e.g.
            during training), ``out_dir`` (None writes nothing) and ``show_progress_bar``.

    The returned dict's primary metric is :attr:`primary_metric` (``eval/overall``, a fraction).
    """

    primary_metric = PRIMARY_METRIC
    config_options = ("mode", "tcot_source", "on_missing_tcot")  # the EvalConfig fields passed on by evaluate_world

    def __init__(self, world_dir: str | Path, tasks: Sequence[str] | None = None, **engine: Any) -> None:
        super().__init__(**engine)
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
        if self.tcot_source == "oracle":
            check_oracle_tcots(self.world_dir, self.manifest)
        world_file = self.world_dir / WORLD_FILE
        self.world_info = json.loads(world_file.read_text()) if world_file.is_file() else {}
        self._loaded: dict[str, EvalTask] = {}

    def task(self, name: str) -> EvalTask:
        """One task's queries, pool and qrels (read once); the items carry the oracle's T-CoTs with ``tcot_source``
        ``oracle``, else the teacher's."""
        if name not in self._loaded:
            tcots = "oracle" if self.tcot_source == "oracle" else "teacher"
            self._loaded[name] = load_eval_task(self.world_dir, name, tcots)
        return self._loaded[name]

    def __call__(self, embedder: Embedder | Encoder, reasoner: Reasoner | None = None, **ids: Any) -> dict[str, float]:
        """Evaluate and return :meth:`WorldReport.metrics` (fractions; primary metric ``eval/overall``); ``ids``:
        ``embedder_id`` and ``reasoner_id`` as for :meth:`evaluate`."""
        return self.evaluate(embedder, reasoner, **ids).metrics()

    def _predictions(
        self, name: str, task: EvalTask, ranked: list[Ranked], scores: np.ndarray, relevance: list[dict[int, int]]
    ) -> list[dict[str, Any]]:
        """Per query: its id, the task's main metric and its value for that query (their mean is the score file's
        value), the top-10 candidate ids with scores, and the relevant ids."""
        metric = task.info["metric"]
        values = per_query_metrics(scores, relevance, ks=self.metric_ks)[metric]  # [n_q]
        return [
            {"query": query.id, "metric": metric, "value": float(values[i]), "top": top.ids, "scores": top.scores,
             "labels": [cid for cid, grade in qrels.items() if grade > 0]}
            for i, (query, top, qrels) in enumerate(zip(task.queries, ranked, task.qrels, strict=True))
        ]  # fmt: skip

    def _report(
        self, run: EvalRun, results: dict[str, dict[str, Any]], stats: dict[str, TaskStats], extra: dict[str, Any]
    ) -> WorldReport:
        tasks = self.manifest["tasks"]
        summary = summarize_tasks(results, tasks, partial=True, benchmark=BENCHMARK)
        world = {
            "dir": str(self.world_dir),
            "seed": self.manifest.get("seed"),
            "format_version": self.manifest.get("format_version"),
            "size": self.world_info.get("size"),
            "generator": self.world_info.get("generator"),
        }
        metadata = self._run_metadata(
            run,
            extra,
            head={"benchmark": BENCHMARK, "world": world},
            settings={"on_missing_tcot": self.on_missing_tcot, "tcot_fallbacks": run.fallbacks},
            missing=[t for t in tasks if t not in self.tasks],
            data={"main_metrics": {t: tasks[t]["metric"] for t in self.tasks}},
        )
        return WorldReport(results, summary, metadata, stats, {t: tasks[t] for t in self.tasks})


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
    return run_eval_stage(
        cfg,
        WorldEvaluator,
        cfg.world,
        embedder_path=cfg.embedder,
        model_name=cfg.name or f"{cfg.embedder} ({cfg.tcot_source}, {cfg.mode})",
        extra_metadata=lambda embedder: {"embedder_dim": embedder.dim},
    )
