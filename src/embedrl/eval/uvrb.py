"""UVRB (Universal Video Retrieval Benchmark): the 16 datasets, their loader, aggregates and ``embedrl eval uvrb``.

Reference: docs/benchmarks.md §3; docs/eval.md §6 documents this module.

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
- **Layout** (docs/eval.md §6.1): ``reference`` builds the reference loader's queries instead: its prompts
  (``UVRB_REFERENCE_PROMPTS``) joined as ``f"{prompt} {text}"``, stripped, cut to ``max_text_chars``; as run by
  default (CMRB and DiDeMo only), ``query_instructions="all"`` as intended; frames in plain string order; frames up
  to 768 visual tokens (:attr:`UVRBEvaluator.reference_budget`).
- **Metrics**: hit@k, recall@k (fractional) and precision@k (and the rest of the metric set) at k = 1, 5, 10, 50.
- **Aggregates** (:func:`uvrb_aggregates`): ``UVRB-16`` (mean of the 16 headline scores) and ``UVRB-6`` (mean of the
  columns TXT, CMP, VIS, CG, FG, LC; FG over its 7 datasets), both always reported under their own names, plus
  the S, T and PR columns.

Example:
    >>> UVRB_BY_NAME["CMRB"].metric, UVRB_BY_NAME["MS-TI"].metric, UVRB_BY_NAME["VDC-O"].sub
    ('hit@10', 'precision@1', 'S')
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import yaml

from embedrl.backbones import PixelBudget
from embedrl.config import UserError, UVRBEvalConfig
from embedrl.data.rows import BadRowPolicy, BadRows, RowError, media_file, read_rows, require
from embedrl.data.schema import Item
from embedrl.eval.benchmark import BenchmarkEvaluator, BenchmarkReport, FrameOrder, pick_frames, run_benchmark_stage
from embedrl.eval.evaluator import (
    EvalError,
    EvalRun,
    Ranked,
    TaskStats,
)
from embedrl.eval.metrics import metric_names
from embedrl.eval.task import EvalTask
from embedrl.prompts import (
    FRAME_MIN_PIXELS,
    IMAGE_MAX_PIXELS,
    IMAGE_MIN_PIXELS,
    LAYOUT_EMBEDRL,
    LAYOUT_REFERENCE,
    LAYOUTS,
    UVRB_QUERY_INSTRUCTIONS,
    UVRB_REFERENCE_AS_RUN,
    UVRB_REFERENCE_PROMPTS,
)

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
UVRB_FRAME_MAX_PIXELS = 768 * 32 * 32  # the reference UVRB run's per-frame maximum (its MMEB-V2 runs: 300 x 32 x 32)
UVRB_SCORE_KEYS: tuple[str, ...] = (*metric_names(UVRB_KS), "num_pred", "num_data")
HEADLINE_LABELS = {"hit@1": "R@1", "hit@10": "R@10", "precision@1": "P@1"}
UVRB_COLUMNS: tuple[str, ...] = ("TXT", "CMP", "VIS", "CG", "FG", "LC")
SUB_COLUMNS: tuple[str, ...] = ("S", "T", "PR")


class UVRBConfigError(UserError, ValueError):
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
assert {d.name for d in UVRB_DATASETS if d.reference_instruction} == set(UVRB_REFERENCE_AS_RUN)
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


def _video_frames(
    base: Path, video: str, rows_file: Path, lineno: int, num_frames: int, order: FrameOrder = "natural"
) -> list[Path]:
    folder = base / "videos_frames" / str(Path(video).with_suffix(""))
    try:
        return pick_frames(folder, num_frames, order)
    except FileNotFoundError as err:
        raise RowError(rows_file, lineno, str(err)) from None


def resolve_query_instructions(query_instructions: str | None, layout: str) -> Literal["all", "reference"]:
    """``query_instructions`` as given, else ``reference`` (as run) in the reference layout and ``all`` in ours."""
    if query_instructions is None:
        return "reference" if layout == LAYOUT_REFERENCE else "all"
    if query_instructions not in ("all", "reference"):
        raise EvalError(f"query_instructions={query_instructions!r}; use 'all' or 'reference'")
    return query_instructions  # type: ignore[return-value]


def reference_query_text(prompt: str, text: str, max_chars: int) -> str:
    """The reference loader's query text: ``f"{prompt} {text}"`` (the prompt alone without text, the text alone
    without prompt), stripped and cut to ``max_chars`` characters.

    >>> reference_query_text("Find the video.", " a dog ", 8192), reference_query_text("", "abcdef ", 3)
    ('Find the video.  a dog', 'abc')
    """
    joined = f"{prompt} {text}" if prompt and text else prompt or text
    return joined.strip()[:max_chars]


def load_uvrb_task(
    name: str,
    root: str | Path,
    *,
    query_instructions: Literal["all", "reference"] | None = None,
    max_text_chars: int = 8192,
    num_frames: int = 8,
    on_bad_row: BadRowPolicy = "stop",
    limit: int = 0,
    layout: str = LAYOUT_EMBEDRL,
) -> LoadedUVRB:
    """Read one UVRB dataset: queries (text / image / video), the video corpus, and the merged qrels.

    Args:
        name: display name (``CRB-G``) or config name (``CRB_G``).
        root: the extracted UVRB folder (``<root>/<DS>/UVRB/<DS>``).
        query_instructions: ``all`` (every dataset's instruction, as intended) or ``reference`` (only CMRB's and
            DiDeMo's, as the reference run applied them); None = ``reference`` in the reference layout, else ``all``.
        max_text_chars: query texts are truncated to this many characters.
        on_bad_row: ``stop`` raises on a malformed row or missing media; ``skip`` drops the row and counts it.
        limit: keep only the first ``limit`` queries (0 = all).
        layout: ``embedrl`` (our instructions, kept apart from the text; natural frame order) or ``reference`` (the
            reference loader's prompts joined into the text as ``f"{prompt} {text}"``, stripped, then cut; plain
            string frame order; a query with an image and a video keeps the image only).
    """
    if layout not in LAYOUTS:
        raise EvalError(f"layout={layout!r}; use one of {LAYOUTS}")
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
    reference = layout == LAYOUT_REFERENCE
    which = resolve_query_instructions(query_instructions, layout)
    table_instruction = UVRB_REFERENCE_PROMPTS.get(name, "") if reference else ds.instruction
    applied = bool(table_instruction) and (which == "all" or ds.reference_instruction)
    instruction = table_instruction if applied else ""
    order: FrameOrder = "sorted" if reference else "natural"
    bad = BadRows(on_bad_row)

    corpus: dict[str, Item] = {}
    for lineno, row in read_rows(corpus_file):
        with bad.guard():
            require(row, ("id", "video"), corpus_file, lineno)
            cid = str(row["id"])
            frames = _video_frames(base, str(row["video"]), corpus_file, lineno, num_frames, order)
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
            raw_text = str(row.get("text") or "")
            text = raw_text[:max_text_chars]
            images = media_file(base / "images", str(row.get("image") or ""), queries_file, lineno, "query image")
            frames: list[Path] = []
            if row.get("video") and not (reference and images):  # the reference drops the video of an image query
                frames = _video_frames(base, str(row["video"]), queries_file, lineno, num_frames, order)
            if not (text or images or frames):
                raise RowError(queries_file, lineno, "the query has no text, image or video")
            query_instruction = instruction
            if reference:  # one string, as the reference loader builds it
                text, query_instruction = reference_query_text(instruction, raw_text, max_text_chars), ""
            queries.append(
                Item(
                    id=f"q:{qid}",
                    text=text,
                    instruction=query_instruction,
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
class UVRBReport(BenchmarkReport):
    """Per-dataset metrics (fractions), the summary (headline ×100 and aggregates) and metadata."""

    def markdown(self) -> str:
        header = self.header("UVRB", f"query instructions: {self.metadata['query_instructions']}")
        return header + format_uvrb_summary(self.summary or {})


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


class UVRBEvaluator(BenchmarkEvaluator[UVRBReport, LoadedUVRB]):
    """UVRB retrieval evaluation from the extracted layout (the engine is :class:`TaskEvaluator`).

    Args:
        root: the extracted UVRB folder; datasets: display or config names (None = all 16).
        query_instructions, max_text_chars: see :func:`load_uvrb_task`.
        **options: ``on_bad_row``, ``limit`` and ``num_frames`` (see :func:`load_uvrb_task`) and the
            :class:`TaskEvaluator` settings (mode, tcot_source, decoding, caches, batch sizes, …).
    """

    benchmark = "UVRB"
    progress_label = "UVRB datasets"
    prediction_depth = 50
    score_keys = UVRB_SCORE_KEYS
    result_files = ("scores", "predictions", "summary_md", "summary_json", "config")  # no leaderboard format
    config_options = (*BenchmarkEvaluator.config_options, "query_instructions", "max_text_chars")
    # The reference UVRB run: frames up to 768 visual tokens of 32 x 32 pixels (images as in MMEB-V2), in plain
    # string order.
    reference_budget = PixelBudget(IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS, FRAME_MIN_PIXELS, UVRB_FRAME_MAX_PIXELS)
    frame_orders: ClassVar[dict[str, FrameOrder]] = {LAYOUT_EMBEDRL: "natural", LAYOUT_REFERENCE: "sorted"}

    def __init__(
        self,
        root: str | Path,
        datasets: Sequence[str] | None = None,
        *,
        query_instructions: Literal["all", "reference"] | None = None,
        max_text_chars: int = 8192,
        **options: Any,
    ) -> None:
        super().__init__(root, datasets, metric_ks=UVRB_KS, **options)
        if query_instructions not in (None, "all", "reference"):
            raise EvalError(f"query_instructions={query_instructions!r}; use 'all' or 'reference'")
        self.query_instructions = query_instructions
        self.max_text_chars = max_text_chars

    @property
    def resolved_query_instructions(self) -> Literal["all", "reference"]:
        return resolve_query_instructions(self.query_instructions, self.resolved_layout)

    def _resolve(self, names: Sequence[str] | None) -> list[str]:
        return resolve_names(names)

    def _read(self, name: str, **rows: Any) -> LoadedUVRB:
        return load_uvrb_task(
            name, self.root, query_instructions=self.query_instructions, max_text_chars=self.max_text_chars, **rows
        )

    def _predictions(
        self, name: str, task: EvalTask, ranked: list[Ranked], scores: np.ndarray, relevance: list[dict[int, int]]
    ) -> list[dict[str, Any]]:
        """Per query: its id, the top-50 corpus ids and the positives."""
        names = self.loaded[name].names
        return [
            {"qid": q.meta["qid"], "top": [names[cid] for cid in top.ids], "positives": [names[c] for c in qrels]}
            for q, top, qrels in zip(task.queries, ranked, task.qrels, strict=True)
        ]

    def _report(
        self, run: EvalRun, results: dict[str, dict[str, Any]], stats: dict[str, TaskStats], extra: dict[str, Any]
    ) -> UVRBReport:
        applied = {k: v.instruction_applied for k, v in self.loaded.items()}
        summary = summarize_uvrb(results, applied)
        metadata = self._run_metadata(
            run,
            extra,
            head={
                "benchmark": "UVRB",
                "uvrb_metric": {d.name: d.metric for d in UVRB_DATASETS},
                "query_instructions": self.resolved_query_instructions,
                "query_instruction_source": "reference" if self.resolved_layout == LAYOUT_REFERENCE else "embedrl",
                "query_instruction_applied": applied,
                "cot_mode": self.cot_mode,
            },
            settings=self._settings_metadata(run, max_text_chars=self.max_text_chars, ks=list(UVRB_KS)),
            missing=summary["aggregates"]["missing"],
            data=self._data_metadata(),
        )
        return UVRBReport(results, summary, metadata, stats)


def evaluate_uvrb(cfg: UVRBEvalConfig) -> dict[str, Any]:
    """The ``embedrl eval uvrb`` stage: writes ``config.json``, ``scores/<DS>_score.json``, ``predictions/<DS>.jsonl``,
    ``summary.md`` and ``summary.json`` into ``cfg.out``."""
    return run_benchmark_stage(cfg, UVRBEvaluator)
