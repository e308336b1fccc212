"""UVRB (Universal Video Retrieval Benchmark): the 16 datasets, their loader, aggregates and ``embedrl eval uvrb``.

Reference: docs/benchmarks.md §3 (in the shared folder); docs/eval.md §6 documents this module.

- **Registry** (:data:`UVRB_DATASETS`): display name (the score key), reference config file and name, task type
  (TXT / CMP / VIS), domain (CG / FG / LC, TXT only) and FG sub-domain (S / T / PR), query form and headline metric:
  hit-style R@1 in general, R@10 for CMRB and LoVR-TH, P@1 for MS-TI and MS-TV.
- **Layout**: ``<root>/<DS>/UVRB/<DS>/jsonl/{queries,corpus,instances}.jsonl``, frames under ``videos_frames/<video
  path without extension>/`` and query images under ``images/``. Every corpus item is a video; 8 frames per video at
  ``floor(linspace(0, n-1, 8))`` over the naturally sorted frame files. Query texts are cut to ``max_text_chars``
  characters; the instruction is prepended with a space (alone for image- and video-only queries).
- **Instructions**: one explicit table (``UVRB_QUERY_INSTRUCTIONS`` in :mod:`embedrl.prompts`), keyed by display
  name. ``query_instructions="reference"`` applies only CMRB's and DiDeMo's, as the reference run did (its name
  mismatch left the others out); ``query_instruction_applied`` is recorded per dataset.
- **Metrics**: hit@k, recall@k (fractional) and precision@k (and the rest of the metric set) at k = 1, 5, 10, 50.
- **Aggregates** (:func:`uvrb_aggregates`): ``UVRB-16`` (mean of the 16 headline scores) and ``UVRB-6`` (mean of the
  columns TXT, CMP, VIS, CG, FG, LC; FG over its 7 datasets), both always reported under their own names, plus
  the S, T and PR columns.

Example:
    >>> UVRB_BY_NAME["CMRB"].metric, UVRB_BY_NAME["MS-TI"].metric, UVRB_BY_NAME["VDC-O"].sub
    ('hit@10', 'precision@1', 'S')
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import yaml
from tqdm.auto import tqdm

from embedrl import __version__
from embedrl.data.frames import sample_frames
from embedrl.data.rows import BadRowPolicy, BadRows, RowError, read_rows, require
from embedrl.data.schema import Item
from embedrl.eval.evaluator import EvalError, TaskEvaluator, TaskStats
from embedrl.eval.metrics import metric_names, rank_candidates
from embedrl.eval.mmeb import run_benchmark_stage, write_text
from embedrl.eval.task import EvalTask
from embedrl.prompts import UVRB_QUERY_INSTRUCTIONS

if TYPE_CHECKING:
    from embedrl.config import UVRBEvalConfig
    from embedrl.models.embedder import Embedder
    from embedrl.models.reasoner import Reasoner

__all__ = [
    "UVRB_BY_NAME",
    "UVRB_COLUMNS",
    "UVRB_DATASETS",
    "UVRB_KS",
    "UVRBConfigError",
    "UVRBDataset",
    "UVRBEvaluator",
    "evaluate_uvrb",
    "format_uvrb_summary",
    "load_uvrb_task",
    "read_uvrb_config",
    "uvrb_aggregates",
]

logger = logging.getLogger(__name__)

UVRB_KS: tuple[int, ...] = (1, 5, 10, 50)
UVRB_SCORE_KEYS: tuple[str, ...] = (*metric_names(UVRB_KS), "num_pred", "num_data")
HEADLINE_LABELS = {"hit@1": "R@1", "hit@10": "R@10", "precision@1": "P@1"}
UVRB_COLUMNS: tuple[str, ...] = ("TXT", "CMP", "VIS", "CG", "FG", "LC")
SUB_COLUMNS: tuple[str, ...] = ("S", "T", "PR")
SCORES_DIR, PREDICTIONS_DIR = "scores", "predictions"
SUMMARY_MD, SUMMARY_JSON = "summary.md", "summary.json"
PREDICTION_DEPTH = 50


class UVRBConfigError(ValueError):
    """A UVRB per-dataset config is unreadable; the message names the file and line."""


@dataclass(frozen=True)
class UVRBDataset:
    """One UVRB dataset (docs/benchmarks.md §3.1).

    Attributes:
        name: display name and score key; also the folder name of the extracted layout (``<DS>/UVRB/<DS>``).
        config_file, config_name: the reference config file and its ``dataset_name`` (underscored or unseparated).
        task: TXT (text -> video), CMP (composed text + image/video -> video) or VIS (image/video -> video).
        domain: CG, FG or LC for the 12 TXT datasets; None otherwise.
        sub: S, T or PR within FG; None otherwise.
        query: the query form (text, long text, text + image, text + video, image, video).
        metric: headline metric key of our score files: ``hit@1``, ``hit@10`` or ``precision@1``.
        reference_instruction: whether the reference run applied a query instruction (only CMRB and DiDeMo).
    """

    name: str
    config_file: str
    config_name: str
    task: Literal["TXT", "CMP", "VIS"]
    domain: str | None
    sub: str | None
    query: str
    metric: str
    reference_instruction: bool = False

    @property
    def headline(self) -> str:
        return HEADLINE_LABELS[self.metric]

    @property
    def instruction(self) -> str:
        """Our query instruction ('' for VDC-O, which has none)."""
        return UVRB_QUERY_INSTRUCTIONS.get(self.name, "")


UVRB_DATASETS: tuple[UVRBDataset, ...] = (
    UVRBDataset("MSRVTT", "MSRVTT.yaml", "MSRVTT", "TXT", "CG", None, "text", "hit@1"),
    UVRBDataset("DiDeMo", "DiDeMo.yaml", "DiDeMo", "TXT", "CG", None, "text", "hit@1", reference_instruction=True),
    UVRBDataset("CRB-G", "CRB_G.yaml", "CRB_G", "TXT", "CG", None, "text", "hit@1"),
    UVRBDataset("CRB-S", "CRB_S.yaml", "CRB_S", "TXT", "FG", "S", "text", "hit@1"),
    UVRBDataset("VDC-O", "VDC_O.yaml", "VDC_O", "TXT", "FG", "S", "text", "hit@1"),
    UVRBDataset("CRB-T", "CRB_T.yaml", "CRB_T", "TXT", "FG", "T", "text", "hit@1"),
    UVRBDataset("CMRB", "CMRB.yaml", "CMRB", "TXT", "FG", "T", "text", "hit@10", reference_instruction=True),
    UVRBDataset("DREAM-E", "DREAM_E.yaml", "DREAM_E", "TXT", "FG", "PR", "text", "hit@1"),
    UVRBDataset("LoVR-TH", "LoVR_TH.yaml", "LoVR_TH", "TXT", "FG", "PR", "text", "hit@10"),
    UVRBDataset("PEV-K", "PEV_K.yaml", "PEV_K", "TXT", "FG", "PR", "text", "hit@1"),
    UVRBDataset("LoVR-V", "LoVR_V.yaml", "LoVR_V", "TXT", "LC", None, "long text", "hit@1"),
    UVRBDataset("VDC-D", "VDC_D.yaml", "VDC_D", "TXT", "LC", None, "text", "hit@1"),
    UVRBDataset("MS-TI", "MS_TI.yaml", "MS_TI", "CMP", None, None, "text + image", "precision@1"),
    UVRBDataset("MS-TV", "MS_TV.yaml", "MS_TV", "CMP", None, None, "text + video", "precision@1"),
    UVRBDataset("MSRVTT-I2V", "MSRVTT_I2V.yaml", "MSRVTT_I2V", "VIS", None, None, "image", "hit@1"),
    UVRBDataset("LoVR-C2V", "LoVR_C2V.yaml", "LoVR_C2V", "VIS", None, None, "video", "hit@1"),
)
UVRB_BY_NAME: dict[str, UVRBDataset] = {d.name: d for d in UVRB_DATASETS}
UVRB_BY_CONFIG_NAME: dict[str, UVRBDataset] = {d.config_name: d for d in UVRB_DATASETS}


def resolve_names(names: Sequence[str] | None) -> list[str]:
    """Display names in registry order; config names (``CRB_G``) are mapped through the registry."""
    if not names:
        return [d.name for d in UVRB_DATASETS]
    wanted = {UVRB_BY_CONFIG_NAME[n].name if n in UVRB_BY_CONFIG_NAME else n for n in names}
    unknown = sorted(wanted - set(UVRB_BY_NAME))
    if unknown:
        raise EvalError(f"unknown UVRB dataset(s) {unknown}; valid: {[d.name for d in UVRB_DATASETS]}")
    return [d.name for d in UVRB_DATASETS if d.name in wanted]


# ----------------------------------------------------------------------------------------------------------------
# Reference configs (docs/benchmarks.md §3.4, §3.6)
# ----------------------------------------------------------------------------------------------------------------

_KEY_WITHOUT_SPACE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):(\S.*)$")


def read_uvrb_config(path: str | Path) -> dict[str, Any]:
    """Read a reference UVRB per-dataset config strictly: UTF-8, valid YAML, a known ``dataset_name``.

    A ``key:value`` line without the space after the colon (as in the published ``MS_TI.yaml``) and any other YAML
    error raise :class:`UVRBConfigError` naming the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UVRBConfigError(f"{path}: not UTF-8 ({err})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        match = _KEY_WITHOUT_SPACE.match(line)
        if match and not match.group(2).startswith("//"):
            raise UVRBConfigError(
                f"{path}:{lineno}: {match.group(1)!r} has no space after its colon, so YAML does not read it as a "
                f"key; write '{match.group(1)}: {match.group(2)}'"
            )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UVRBConfigError(f"{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise UVRBConfigError(f"{path}: expected a mapping of config keys")
    name = data.get("dataset_name")
    if name not in UVRB_BY_CONFIG_NAME:
        raise UVRBConfigError(f"{path}: dataset_name={name!r} is not a UVRB dataset")
    return data


def dataset_dir(root: str | Path, name: str) -> Path:
    """``<root>/<DS>/UVRB/<DS>``, the folder of one extracted dataset."""
    return Path(root) / name / "UVRB" / name


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedUVRB:
    """One dataset read from disk, with the instruction used and the skip report."""

    dataset: UVRBDataset
    eval_task: EvalTask
    names: dict[str, str]  # item id -> corpus id
    instruction_applied: bool
    bad_rows: dict[str, Any]
    files: list[str] = field(default_factory=list)


def _video_frames(base: Path, video: str, rows_file: Path, lineno: int, num_frames: int) -> list[Path]:
    folder = base / "videos_frames" / str(Path(video).with_suffix(""))
    try:
        return sample_frames(folder, num_frames)
    except FileNotFoundError as err:
        raise RowError(rows_file, lineno, str(err)) from None


def load_uvrb_task(
    name: str,
    root: str | Path,
    *,
    query_instructions: Literal["all", "reference"] = "all",
    max_text_chars: int = 8192,
    num_frames: int = 8,
    on_bad_row: BadRowPolicy = "stop",
    limit: int = 0,
) -> LoadedUVRB:
    """Read one UVRB dataset: queries (text / image / video), the video corpus, and the merged qrels.

    Args:
        name: display name (``CRB-G``) or config name (``CRB_G``).
        root: the extracted UVRB folder (``<root>/<DS>/UVRB/<DS>``).
        query_instructions: ``all`` (our table) or ``reference`` (only CMRB and DiDeMo, as the reference run).
        max_text_chars: query texts are truncated to this many characters.
        on_bad_row: ``stop`` raises on a malformed row or missing media; ``skip`` drops the row and counts it.
        limit: keep only the first ``limit`` queries (0 = all).
    """
    (name,) = resolve_names([name])
    ds = UVRB_BY_NAME[name]
    base = dataset_dir(root, name)
    if not base.is_dir():
        raise FileNotFoundError(f"{name}: no folder {base}; extract Alibaba-NLP/UVRB so that it exists")
    queries_file, corpus_file, instances_file = (
        base / "jsonl" / f for f in ("queries.jsonl", "corpus.jsonl", "instances.jsonl")
    )
    for f in (queries_file, corpus_file, instances_file):
        if not f.is_file():
            raise FileNotFoundError(f"{name}: {f} does not exist")
    applied = bool(ds.instruction) and (query_instructions == "all" or ds.reference_instruction)
    instruction = ds.instruction if applied else ""
    bad = BadRows(on_bad_row)

    corpus: dict[str, Item] = {}
    for lineno, row in read_rows(corpus_file):
        with bad.guard():
            require(row, ("id", "video"), corpus_file, lineno)
            cid = str(row["id"])
            frames = _video_frames(base, str(row["video"]), corpus_file, lineno, num_frames)
            corpus.setdefault(cid, Item(id=f"c:{cid}", frames=tuple(frames), meta={"name": cid}))
    positives: dict[str, list[str]] = {}
    for lineno, row in read_rows(instances_file):
        with bad.guard():
            require(row, ("qid", "pos"), instances_file, lineno)
            pos = row["pos"] if isinstance(row["pos"], list) else [row["pos"]]
            absent = [str(p) for p in pos if str(p) not in corpus]
            if absent:
                raise RowError(instances_file, lineno, f"positive(s) {absent} are not in {corpus_file.name}")
            merged = positives.setdefault(str(row["qid"]), [])
            merged.extend(str(p) for p in pos if str(p) not in merged)

    queries: list[Item] = []
    qrels: list[dict[str, int]] = []
    for lineno, row in read_rows(queries_file):
        if limit and len(queries) >= limit:
            break
        with bad.guard():
            require(row, ("id",), queries_file, lineno)
            qid = str(row["id"])
            if not positives.get(qid):
                raise RowError(queries_file, lineno, f"query {qid!r} has no positive in {instances_file.name}")
            text = str(row.get("text") or "")[:max_text_chars]
            images: list[Path] = []
            frames: list[Path] = []
            if row.get("image"):
                image = base / "images" / str(row["image"])
                if not image.is_file():
                    raise RowError(queries_file, lineno, f"query image {image} does not exist")
                images = [image]
            if row.get("video"):
                frames = _video_frames(base, str(row["video"]), queries_file, lineno, num_frames)
            if not (text or images or frames):
                raise RowError(queries_file, lineno, "the query has no text, image or video")
            queries.append(
                Item(
                    id=f"q:{qid}",
                    text=text,
                    instruction=instruction,
                    images=tuple(images),
                    frames=tuple(frames),
                    meta={"row": f"{queries_file.name}:{lineno}", "qid": qid},
                )
            )
            qrels.append({f"c:{cid}": 1 for cid in positives[qid]})
    if not queries:
        raise EvalError(f"{name}: no query could be read from {queries_file} (skipped rows: {bad.count})")
    info = {"task": ds.task, "domain": ds.domain, "sub": ds.sub, "metric": ds.metric, "eval_type": "global"}
    task = EvalTask(
        name=name,
        info=info,
        queries=queries,
        pool={item.id: item for item in corpus.values()},
        candidates=None,
        qrels=qrels,
        positives=[list(q) for q in qrels],
    )
    names = {item.id: cid for cid, item in corpus.items()}
    return LoadedUVRB(
        ds, task, names, applied, bad.as_dict(), [str(queries_file), str(corpus_file), str(instances_file)]
    )


# ----------------------------------------------------------------------------------------------------------------
# Aggregates (docs/benchmarks.md §3.3)
# ----------------------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def uvrb_aggregates(scores: Mapping[str, float], *, partial: bool = False) -> dict[str, Any]:
    """UVRB-16, UVRB-6 and the TXT/CMP/VIS/CG/FG/LC/S/T/PR columns from per-dataset headline scores.

    Args:
        scores: display name -> headline score (any scale; the means keep it).
        partial: allow missing datasets (a column without datasets, and then UVRB-6, is None); otherwise an error.

    Returns:
        ``{"UVRB-16": mean over the datasets, "UVRB-6": mean of the six columns, "columns": {...}, "counts": {...},
        "missing": [...]}``. UVRB-6 counts every TXT dataset twice (in TXT and in its domain), so the two overall
        averages differ; report both under these names.

    Example:
        >>> agg = uvrb_aggregates({d.name: 50.0 for d in UVRB_DATASETS})
        >>> agg["UVRB-16"], agg["UVRB-6"], agg["columns"]["FG"]
        (50.0, 50.0, 50.0)
    """
    unknown = sorted(set(scores) - set(UVRB_BY_NAME))
    if unknown:
        raise EvalError(f"scores for datasets outside UVRB: {unknown}")
    missing = [d.name for d in UVRB_DATASETS if d.name not in scores]
    if missing and not partial:
        raise EvalError(f"{len(missing)} UVRB datasets have no score: {missing}; score them or pass partial=True")
    present = [d for d in UVRB_DATASETS if d.name in scores]
    if not present:
        raise EvalError("no UVRB dataset has a score")
    groups: dict[str, list[float]] = {c: [] for c in (*UVRB_COLUMNS, *SUB_COLUMNS)}
    for d in present:
        v = float(scores[d.name])
        groups[d.task].append(v)
        if d.domain:
            groups[d.domain].append(v)
        if d.sub:
            groups[d.sub].append(v)
    columns = {c: _mean(v) for c, v in groups.items()}
    six = [columns[c] for c in UVRB_COLUMNS]
    return {
        "UVRB-16": _mean([float(scores[d.name]) for d in present]),
        "UVRB-6": _mean(six) if all(v is not None for v in six) else None,  # type: ignore[arg-type]
        "columns": columns,
        "counts": {"UVRB-16": len(present), **{c: len(v) for c, v in groups.items()}},
        "missing": missing,
    }


def format_uvrb_summary(summary: Mapping[str, Any], decimals: int = 2) -> str:
    """Markdown: the two overall averages (labelled), the nine columns, and the per-dataset headline scores."""

    def cell(v: float | None) -> str:
        return "–" if v is None else f"{v:.{decimals}f}"

    agg = summary["aggregates"]
    lines = ["## UVRB summary", "", "Headline metric ×100 (R@1; R@10 for CMRB and LoVR-TH; P@1 for MS-TI and MS-TV)."]
    if agg["missing"]:
        lines.append(f"**Partial result**: no score for {', '.join(agg['missing'])}.")
    lines += [
        "",
        "| Average | #datasets | Score |",
        "|---|---:|---:|",
        f"| **UVRB-16** (mean of the per-dataset scores) | {agg['counts']['UVRB-16']} | **{cell(agg['UVRB-16'])}** |",
        f"| **UVRB-6** (mean of TXT, CMP, VIS, CG, FG, LC) | 6 columns | **{cell(agg['UVRB-6'])}** |",
        "",
        "| " + " | ".join((*UVRB_COLUMNS, *SUB_COLUMNS)) + " |",
        "|" + "---:|" * (len(UVRB_COLUMNS) + len(SUB_COLUMNS)),
        "| " + " | ".join(cell(agg["columns"][c]) for c in (*UVRB_COLUMNS, *SUB_COLUMNS)) + " |",
        "",
        "| Dataset | Task | Domain | Metric | Score | Instruction |",
        "|---|---|---|---|---:|---|",
    ]
    for name, t in summary["datasets"].items():
        domain = "/".join(x for x in (t["domain"], t["sub"]) if x) or "–"
        applied = "yes" if t["query_instruction_applied"] else "no"
        lines.append(f"| {name} | {t['task']} | {domain} | {t['headline']} | {cell(t['score'])} | {applied} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class UVRBReport:
    """Per-dataset metrics (fractions), the summary (headline ×100 and aggregates) and metadata."""

    results: dict[str, dict[str, Any]]
    summary: dict[str, Any]
    metadata: dict[str, Any]
    stats: dict[str, TaskStats] = field(default_factory=dict)

    def markdown(self) -> str:
        m = self.metadata
        head = [
            f"# {m['model_name']}: UVRB",
            "",
            f"- Embedder: `{m['embedder']['id']}`; Reasoner: `{(m['reasoner'] or {}).get('id', '-')}`; "
            f"cot_mode {m['cot_mode']}; query instructions: {m['query_instructions']}",
            f"- Skipped rows: {sum(r['skipped'] for r in m['bad_rows'].values())} (on_bad_row={m['on_bad_row']})",
            "",
            "",
        ]
        return "\n".join(head) + format_uvrb_summary(self.summary)

    def as_dict(self) -> dict[str, Any]:
        return {
            "metadata": self.metadata,
            "summary": self.summary,
            "results": self.results,
            "stats": {k: dataclasses.asdict(s) for k, s in self.stats.items()},
        }


def summarize_uvrb(results: Mapping[str, Mapping[str, Any]], applied: Mapping[str, bool]) -> dict[str, Any]:
    """Headline scores ×100 per dataset and :func:`uvrb_aggregates` over them (partial allowed, flagged)."""
    scores = {name: 100.0 * float(results[name][UVRB_BY_NAME[name].metric]) for name in results}
    datasets = {
        d.name: {
            "score": scores[d.name],
            "metric": d.metric,
            "headline": d.headline,
            "task": d.task,
            "domain": d.domain,
            "sub": d.sub,
            "query_instruction_applied": applied.get(d.name, False),
        }
        for d in UVRB_DATASETS
        if d.name in scores
    }
    agg = uvrb_aggregates(scores, partial=True)
    return {
        "benchmark": "UVRB",
        "unit": "percent",
        "partial": bool(agg["missing"]),
        "aggregates": agg,
        "datasets": datasets,
    }


class UVRBEvaluator(TaskEvaluator):
    """UVRB retrieval evaluation from the extracted layout; engine settings as :class:`TaskEvaluator`."""

    def __init__(
        self,
        root: str | Path,
        datasets: Sequence[str] | None = None,
        *,
        query_instructions: Literal["all", "reference"] = "all",
        max_text_chars: int = 8192,
        num_frames: int = 8,
        on_bad_row: BadRowPolicy = "stop",
        limit: int = 0,
        **engine: Any,
    ) -> None:
        super().__init__(metric_ks=UVRB_KS, **engine)
        if self.tcot_source == "teacher":
            raise EvalError("UVRB has no stored T-CoTs: use tcot_source 'reasoner' (with a Reasoner) or 'none'")
        if query_instructions not in ("all", "reference"):
            raise EvalError(f"query_instructions={query_instructions!r}; use 'all' or 'reference'")
        self.root = Path(root)
        self.tasks = resolve_names(datasets)
        self.query_instructions = query_instructions
        self.max_text_chars = max_text_chars
        self.num_frames = num_frames
        self.on_bad_row = on_bad_row
        self.limit = limit
        self.loaded: dict[str, LoadedUVRB] = {}

    def load(self, name: str) -> LoadedUVRB:
        if name not in self.loaded:
            self.loaded[name] = load_uvrb_task(
                name,
                self.root,
                query_instructions=self.query_instructions,
                max_text_chars=self.max_text_chars,
                num_frames=self.num_frames,
                on_bad_row=self.on_bad_row,
                limit=self.limit,
            )
        return self.loaded[name]

    def task(self, name: str) -> EvalTask:
        return self.load(name).eval_task

    def _task_scored(
        self, name: str, task: EvalTask, candidate_ids: Sequence[str], scores: np.ndarray, relevance: list[dict]
    ) -> None:
        if self.out_dir is None:
            return
        names = self.loaded[name].names
        top = rank_candidates(scores, PREDICTION_DEPTH)
        lines = [
            json.dumps(
                {
                    "qid": q.meta["qid"],
                    "top": [names[candidate_ids[j]] for j in top[i]],
                    "positives": [names[c] for c in task.qrels[i]],
                }
            )
            for i, q in enumerate(task.queries)
        ]
        write_text(self.out_dir / PREDICTIONS_DIR / f"{name}.jsonl", "\n".join(lines) + "\n")

    def evaluate(
        self,
        embedder: Embedder | Any,
        reasoner: Reasoner | None = None,
        *,
        embedder_id: str | None = None,
        reasoner_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> UVRBReport:
        run = self._start(embedder, reasoner, embedder_id, reasoner_id)
        results: dict[str, dict[str, Any]] = {}
        stats: dict[str, TaskStats] = {}
        for name in tqdm(self.tasks, desc="UVRB datasets", disable=not self.show_progress_bar):
            results[name], stats[name] = self._evaluate_task(name, run)
            if self.out_dir is not None:
                ordered = {k: results[name][k] for k in UVRB_SCORE_KEYS}
                write_text(self.out_dir / SCORES_DIR / f"{name}_score.json", json.dumps(ordered, indent=4) + "\n")
        applied = {k: v.instruction_applied for k, v in self.loaded.items()}
        summary = summarize_uvrb(results, applied)
        extra = dict(metadata or {})
        missing = summary["aggregates"]["missing"]
        meta = {
            "model_name": extra.pop("model_name", None) or f"{run.embedder_id} ({self.tcot_source}, {self.mode})",
            "benchmark": "UVRB",
            "uvrb_metric": {d.name: d.metric for d in UVRB_DATASETS},
            "query_instructions": self.query_instructions,
            "query_instruction_applied": applied,
            "cot_mode": "none" if self.tcot_source == "none" else "query+candidate",
            "embedder": {"id": run.embedder_id, "path": extra.pop("embedder_path", None)},
            "reasoner": None
            if run.reasoner is None
            else {"id": run.reasoner_id, "path": extra.pop("reasoner_path", None)},
            "tcot_source": self.tcot_source,
            "query_mode": self.mode,
            "candidate_mode": self.mode,
            "decoding": dataclasses.asdict(self.decoding) if run.reasoner is not None else None,
            "tcot_fallbacks": run.fallbacks,
            "num_frames": self.num_frames,
            "frame_order": "natural",
            "max_text_chars": self.max_text_chars,
            "ks": list(UVRB_KS),
            "tasks": list(self.tasks),
            "partial": bool(missing),
            "missing": missing,
            "query_counts": {k: len(v.eval_task.queries) for k, v in self.loaded.items()},
            "on_bad_row": self.on_bad_row,
            "bad_rows": {k: v.bad_rows for k, v in self.loaded.items()},
            "limit": self.limit,
            "embedrl_version": __version__,
            "report_generated_date": datetime.now().isoformat(timespec="seconds"),
            **extra,
        }
        report = UVRBReport(results, summary, meta, stats)
        if self.out_dir is not None:
            write_text(self.out_dir / SUMMARY_MD, report.markdown())
            write_text(self.out_dir / SUMMARY_JSON, json.dumps(report.as_dict(), indent=2, default=str) + "\n")
        return report


def evaluate_uvrb(cfg: UVRBEvalConfig) -> dict[str, Any]:
    """The ``embedrl eval uvrb`` stage: writes ``config.json``, ``scores/<DS>_score.json``, ``predictions/<DS>.jsonl``,
    ``summary.md`` and ``summary.json`` into ``cfg.out``."""
    files = (("summary_md", SUMMARY_MD), ("summary_json", SUMMARY_JSON), ("scores", SCORES_DIR),
             ("predictions", PREDICTIONS_DIR))  # fmt: skip
    return run_benchmark_stage(
        cfg,
        lambda engine: UVRBEvaluator(
            cfg.data,
            cfg.tasks or None,
            query_instructions=cfg.query_instructions,
            max_text_chars=cfg.max_text_chars,
            num_frames=cfg.num_frames,
            on_bad_row=cfg.on_bad_row,
            limit=cfg.limit,
            **engine,
        ),
        files,
    )
