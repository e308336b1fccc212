"""MMEB-V2 on real data: the task registry, loaders for the distributed layout, and the ``embedrl eval mmeb`` harness.

Reference: docs/benchmarks.md §1 (datasets, ranking modes, metrics, versions) and §2 (layout, row fields, score
files); docs/eval.md §5 documents the local layout this module reads.

- **Registry.** :data:`MMEB_TASKS` has the 78 scored datasets plus the three English-only ViDoRe-v2 variants
  (evaluated on request, never scored), each with its parser, ranking mode (``local``/``global``), media folder,
  hub source, and query and candidate instructions. Modality, meta-task, VisDoc group, metric and expected query
  count come from :data:`embedrl.eval.scores.MMEB_V2_DATASETS`, the one registry every aggregate uses.
- **Local layout.** ``DATA/image-tasks/``, ``DATA/video-tasks/frames/…`` and ``DATA/visdoc-tasks/…`` as distributed
  (docs/benchmarks.md §2.1), plus the per-dataset annotation rows exported from the hub datasets::

      DATA/annotations/<key>/test.jsonl|.json|.parquet     image and video rows (the fields of §2.2)
      DATA/annotations/<key>/labels.txt                     optional label vocabulary of a global V-CLS set
      DATA/annotations/<key>/{queries,corpus,qrels}.*       VisDoc (BEIR style); page sets: <key>-fixed/ holds
                                                            the fixed labels, <key>/ the old ones
      DATA/annotations/<key>/REVISION                       optional: the hub revision the rows came from

- **Candidates** (§1.2, §1.3): local tasks rank each query against its own list; global tasks against the union of
  all rows' candidates in first-seen order, then the extra corpus (label vocabulary, page corpus). Candidates are
  de-duplicated by name across the dataset (first occurrence wins; collisions with different content are counted
  and logged), so each is annotated and embedded once.
- **Video**: 8 frames per video at ``floor(linspace(0, n-1, 8))`` over the naturally sorted frame files.
- **Layout** (docs/eval.md §5.1): ``embedrl`` (above; our instructions) or ``reference``: the texts VLM2Vec builds
  for the reference evaluation (instruction wording, option blocks, candidate texts; the whole string in
  ``Item.text``), VLM2Vec's frame order, MomentSeeker clips unsampled, and the reference pixel budgets
  (:attr:`MMEBEvaluator.reference_budget`). ``tcot_source="file"`` reads the published T-CoTs imported by
  :mod:`embedrl.eval.published` (docs/eval.md §5.2). Candidates and queries record the row values that identify
  them (``meta["source"]``, ``meta["index"]``), the importer's join keys.
- **Errors**: a malformed row or a missing media file raises :class:`~embedrl.data.rows.RowError` naming the file and
  row; ``on_bad_row="skip"`` drops such rows instead and counts them in the result metadata.

Example:
    >>> MMEB_BY_KEY["K700"].eval_type, MMEB_BY_KEY["K700"].dataset_name, MMEB_BY_KEY["CIRR"].parser
    ('global', 'Kinetics-700', 'image_i2i_vg')
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from tqdm.auto import tqdm

from embedrl import prompts as P
from embedrl.backbones import PixelBudget
from embedrl.config import MMEBEvalConfig
from embedrl.data.rows import (
    BadRowPolicy,
    BadRows,
    RowError,
    find_rows_file,
    media_file,
    read_rows,
    require,
    save_image_bytes,
)
from embedrl.data.schema import Item
from embedrl.eval.benchmark import BenchmarkEvaluator, BenchmarkReport, FrameOrder, pick_frames, run_benchmark_stage
from embedrl.eval.evaluator import (
    LEADERBOARD_JSON,
    EvalError,
    EvalRun,
    Ranked,
    TaskStats,
)
from embedrl.eval.scores import (
    MAIN_METRICS,
    MMEB_V2_BY_KEY,
    MMEB_V2_DATASETS,
    MMEB_V2_GROUP_KEYS,
    MMEB_V2_UNSCORED,
    MOMENTSEEKER_VERSIONS,
    PAGE_SETS,
    MMEBDataset,
    format_summary,
    mmeb_v2_task_info,
    summarize_tasks,
    write_leaderboard,
)
from embedrl.eval.task import EvalTask
from embedrl.prompts import LAYOUT_EMBEDRL, LAYOUT_REFERENCE, LAYOUTS, MMEB_INSTRUCTIONS, VISDOC_INSTRUCTIONS

__all__ = [
    "MMEB_BY_KEY",
    "MMEB_TASKS",
    "LoadedTask",
    "MMEBEvaluator",
    "MMEBReport",
    "MMEBTask",
    "evaluate_mmeb",
    "load_mmeb_task",
]

logger = logging.getLogger(__name__)

ANNOTATIONS_DIR = "annotations"
IMAGE_ROOT = "image-tasks"
FRAMES_ROOT = "video-tasks/frames"
VISDOC_ROOT = "visdoc-tasks"
REVISION_FILE = "REVISION"
IMAGE_SOURCE = "ziyjiang/MMEB_Test_Instruct"
PageLabels = Literal["fixed", "old"]
QUOTE = '"'


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MMEBTask:
    """How one MMEB-V2 dataset is read and ranked.

    Attributes:
        key: score key (the YAML key of the eval configs; page sets without ``-fixed``).
        parser: the ``dataset_parser`` of the eval config (``image_cls``, ``msrvtt``, ``vidore``, …).
        eval_type: ``local`` (own candidate list per query) or ``global`` (the whole pool).
        media_root: the media folder relative to the data root, as in the eval config (``image_root`` or
            ``frame_root``).
        dataset_name: the source ``dataset_name`` (differs from the key only for K700: ``Kinetics-700``).
        source: hub dataset the rows come from; ``source_config`` and ``source_split`` select the rows.
        scored: False for the English-only ViDoRe-v2 variants (evaluated, not scored).
        subsample: keep the first this many rows (SmthSmthV2: 1000).
        language: keep only queries in this language (the English-only ViDoRe-v2 variants).
    """

    key: str
    parser: str
    eval_type: Literal["local", "global"]
    media_root: str
    dataset_name: str
    source: str
    source_config: str | None = None
    source_split: str = "test"
    scored: bool = True
    subsample: int | None = None
    language: str | None = None

    @property
    def dataset(self) -> MMEBDataset | None:
        """The scored dataset of :mod:`embedrl.eval.scores` (None for the unscored variants)."""
        return MMEB_V2_BY_KEY.get(self.key)

    @property
    def modality(self) -> str:
        return self.dataset.modality if self.dataset else "visdoc"

    @property
    def metric(self) -> str:
        return MAIN_METRICS[self.modality]

    @property
    def instructions(self) -> tuple[str, str] | None:
        """(query, candidate) instruction; None for image sets, whose rows carry their own."""
        if self.modality == "image":
            return None
        if self.modality == "visdoc":
            return VISDOC_INSTRUCTIONS
        return MMEB_INSTRUCTIONS[self.key]

    def info(self) -> dict[str, Any]:
        """The task-info entry the evaluator and :func:`~embedrl.eval.scores.aggregate` read."""
        d = self.dataset
        info: dict[str, Any] = {"modality": self.modality, "metric": self.metric, "eval_type": self.eval_type}
        if d is not None:
            info["meta_task"] = d.meta_task
            if d.group is not None:
                info["group"] = d.group
        return info


# Image parsers (docs/benchmarks.md §1.2): by meta-task, except the retrieval sets, which name theirs.
_IMAGE_PARSER_BY_META_TASK = {"I-CLS": "image_cls", "I-QA": "image_qa", "I-VG": "image_i2i_vg"}
_IMAGE_RET_PARSERS: dict[str, str] = {
    **dict.fromkeys(("MSCOCO_i2t", "VisualNews_i2t"), "image_i2t"),
    **dict.fromkeys(("VisDial", "MSCOCO_t2i", "VisualNews_t2i", "WebQA", "EDIS", "Wiki-SS-NQ"), "image_t2i"),
    **dict.fromkeys(("CIRR", "NIGHTS", "OVEN", "FashionIQ"), "image_i2i_vg"),
}

# key -> (parser, eval type, frame folder under video-tasks/frames, source dataset name, hub id, config, split)
_VIDEO_TABLE = """
K700           video_classification global video_cls/K700          Kinetics-700  VLM2Vec/K700          -       test
SmthSmthV2     ssv2                 local  video_cls/SSv2          SmthSmthV2    VLM2Vec/SmthSmthV2    -       test
HMDB51         video_classification global video_cls/HMDB51        HMDB51        VLM2Vec/HMDB51        -       test
UCF101         video_classification global video_cls/UCF101        UCF101        VLM2Vec/UCF101        -       test
Breakfast      video_classification global video_cls/Breakfast     Breakfast     VLM2Vec/Breakfast     -       test
MVBench        mvbench              local  video_qa/MVBench        MVBench       VLM2Vec/MVBench       -       train
Video-MME      videomme             local  video_qa/Video-MME      Video-MME     VLM2Vec/Video-MME     -       test
NExTQA         nextqa               local  video_qa/NExTQA         NExTQA        VLM2Vec/NExTQA        MC      test
EgoSchema      egoschema            local  video_qa/EgoSchema      EgoSchema     VLM2Vec/EgoSchema     Subset  test
ActivityNetQA  activitynetqa        local  video_qa/ActivityNetQA  ActivityNetQA VLM2Vec/ActivityNetQA -       test
DiDeMo         didemo               global video_ret/DiDeMo        DiDeMo        VLM2Vec/DiDeMo        -       test
MSR-VTT        msrvtt               global video_ret/MSR-VTT       MSR-VTT       VLM2Vec/MSR-VTT       test_1k test
MSVD           msvd                 global video_ret/MSVD          MSVD          VLM2Vec/MSVD          -       test
VATEX          vatex                global video_ret/VATEX         VATEX         VLM2Vec/VATEX         -       test
YouCook2       youcook2             global video_ret/YouCook2      YouCook2      lmms-lab/YouCook2     -       val
QVHighlight    moment_retrieval     local  video_mret/QVHighlight  QVHighlight   VLM2Vec/QVHighlight   -       test
Charades-STA   moment_retrieval     local  video_mret/Charades_STA Charades-STA  VLM2Vec/Charades-STA  -       test
MomentSeeker   momentseeker         local  video_mret/MomentSeeker MomentSeeker  VLM2Vec/MomentSeeker  -       test
"""
# key -> (parser, eval type, frame folder under video-tasks/frames, source dataset name, hub id, hub config or "-",
# hub split); hub sources as in docs/benchmarks.md §2.1.
_VIDEO: dict[str, list[str]] = {row.split()[0]: row.split()[1:] for row in _VIDEO_TABLE.strip().splitlines()}

# VisDoc media folders under visdoc-tasks/ that differ from the key (the ViDoRe-v2 sets drop the prefix).
_VISDOC_UNSCORED = ("ViDoRe_biomedical_lectures_v2", "ViDoRe_economics_reports_v2", "ViDoRe_esg_reports_v2")


def _visdoc_task(key: str, scored: bool = True) -> MMEBTask:
    group = MMEB_V2_BY_KEY[key].group if scored else "VDRv2"
    if group == "VisRAG":
        parser, source, split = "visrag", f"openbmb/VisRAG-Ret-Test-{key.removeprefix('VisRAG_')}", "train"
    elif group == "OOD":
        parser, split = "vidore", "test"
        source = f"VLM2Vec/{key}-fixed" if key in PAGE_SETS else f"VLM2Vec/{key.removesuffix('-doc')}"
        if key == "MMLongBench-doc":
            source = "VLM2Vec/MMLongBench-doc"
    else:
        parser, split = "vidore", "test"
        source = "vidore/*_beir (ViDoRe v1)" if group == "VDRv1" else "vidore/* (ViDoRe v2)"
    folder = key.removeprefix("ViDoRe_") if group == "VDRv2" else key
    return MMEBTask(
        key=key,
        parser=parser,
        eval_type="global",
        media_root=f"{VISDOC_ROOT}/{folder}",
        dataset_name=key,
        source=source,
        source_split=split,
        scored=scored,
        language="english" if not scored else None,
    )


def _build_registry() -> tuple[MMEBTask, ...]:
    tasks: list[MMEBTask] = []
    for d in MMEB_V2_DATASETS:
        if d.modality == "image":
            parser = _IMAGE_PARSER_BY_META_TASK.get(d.meta_task) or _IMAGE_RET_PARSERS[d.key]
            tasks.append(MMEBTask(d.key, parser, "local", IMAGE_ROOT, d.key, IMAGE_SOURCE, d.key))
        elif d.modality == "video":
            parser, eval_type, folder, name, source, config, split = _VIDEO[d.key]
            tasks.append(
                MMEBTask(
                    key=d.key,
                    parser=parser,
                    eval_type="local" if eval_type == "local" else "global",
                    media_root=f"{FRAMES_ROOT}/{folder}",
                    dataset_name=name,
                    source=source,
                    source_config=None if config == "-" else config,
                    source_split=split,
                    subsample=1000 if d.key == "SmthSmthV2" else None,
                )
            )
        else:
            tasks.append(_visdoc_task(d.key))
    tasks += [_visdoc_task(key, scored=False) for key in _VISDOC_UNSCORED]
    return tuple(tasks)


MMEB_TASKS: tuple[MMEBTask, ...] = _build_registry()
MMEB_BY_KEY: dict[str, MMEBTask] = {t.key: t for t in MMEB_TASKS}
assert set(_VISDOC_UNSCORED) <= set(MMEB_V2_UNSCORED)


def resolve_tasks(names: Sequence[str] | None) -> list[str]:
    """Registry keys to evaluate: ``names`` in registry order (``X-page-fixed`` accepted), or the 78 scored."""
    if not names:
        return [t.key for t in MMEB_TASKS if t.scored]
    wanted = {n.removesuffix("-fixed") if n.removesuffix("-fixed") in PAGE_SETS else n for n in names}
    unknown = sorted(wanted - set(MMEB_BY_KEY))
    if unknown:
        raise EvalError(f"unknown MMEB-V2 task(s) {unknown}; valid keys are the score keys of docs/benchmarks.md §1.1")
    return [t.key for t in MMEB_TASKS if t.key in wanted]


# ----------------------------------------------------------------------------------------------------------------
# Loading: rows -> queries, candidates, qrels
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    name: str
    item: Item


@dataclass
class _Query:
    item: Item
    cand_names: list[str] | None  # local tasks: the query's own list; global: None
    labels: dict[str, float]  # relevant candidate name -> grade


@dataclass
class LoadedTask:
    """One dataset read from disk: an :class:`EvalTask` (ids, pool, lists, qrels) plus what happened on the way.

    Attributes:
        names: item id -> candidate name (the dataset-relative dedup key written to the predictions).
        collisions: candidates sharing a name with an earlier one but differing in content (the first one is used).
        bad_rows: the skip-or-stop report (:meth:`BadRows.as_dict`).
        revision: the contents of the annotations' ``REVISION`` file, or None.
        files: the annotation files read.
    """

    task: MMEBTask
    eval_task: EvalTask
    names: dict[str, str]
    collisions: int
    bad_rows: dict[str, Any]
    revision: str | None
    files: list[str]


def _digest(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, default=str).encode("utf-8")).hexdigest()[:10]


def _item(
    kind: str,
    key: str,
    text: str,
    instruction: str,
    images: Sequence[Path],
    frames: Sequence[Path],
    root: Path,
    meta: dict[str, Any],
) -> Item:
    """An item whose id carries a digest of its content (so a changed dataset never reuses stale cache entries)."""
    rel = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in (*images, *frames)]
    return Item(
        id=f"{kind}:{key}:{_digest(text, instruction, rel)}",
        text=text,
        instruction=instruction,
        images=tuple(images),
        frames=tuple(frames),
        meta=meta,
    )


class _Builder:
    """Collects queries and de-duplicated candidates while rows are parsed.

    ``reference``: the items carry the reference harness's text (VLM2Vec's instruction wording and formatting, the
    whole string in ``text``, no separate instruction) and frames in VLM2Vec's order (docs/eval.md §5.1).
    ``index`` is the 0-based position of the row being parsed in its rows file (recorded as the query's
    ``meta["index"]``, the join key of :mod:`embedrl.eval.published`).
    """

    def __init__(self, task: MMEBTask, data_root: Path, layout: str = LAYOUT_EMBEDRL) -> None:
        self.task = task
        self.root = data_root
        self.reference = layout == LAYOUT_REFERENCE
        self.queries: list[_Query] = []
        self.pool: dict[str, _Candidate] = {}
        self.collisions = 0
        self.index = 0

    def candidate(
        self,
        name: str,
        text: str = "",
        images: Sequence[Path] = (),
        frames: Sequence[Path] = (),
        source: Mapping[str, Any] | None = None,
    ) -> str:
        """A candidate with the task's candidate instruction (none in the reference layout: pass its text)."""
        instruction = self.task.instructions[1] if self.task.instructions and not self.reference else ""
        return self.candidate_with(name, text, instruction, images, frames, source)

    def candidate_with(
        self,
        name: str,
        text: str,
        instruction: str,
        images: Sequence[Path] = (),
        frames: Sequence[Path] = (),
        source: Mapping[str, Any] | None = None,
    ) -> str:
        """``source``: the row values that identify the candidate (raw text, image path, video or corpus id)."""
        meta: dict[str, Any] = {"name": name, **({"source": dict(source)} if source else {})}
        item = _item("c", name, text, instruction, images, frames, self.root, meta)
        seen = self.pool.get(name)
        if seen is None:
            self.pool[name] = _Candidate(name, item)
        elif seen.item.id != item.id:
            self.collisions += 1
            logger.debug(
                "%s: candidate %r appears with different content; the first occurrence is used", self.task.key, name
            )
        return name

    def query(
        self,
        where: str,
        text: str,
        *,
        instruction: str | None = None,
        images: Sequence[Path] = (),
        frames: Sequence[Path] = (),
        cand_names: list[str] | None,
        labels: Mapping[str, float],
    ) -> None:
        if instruction is None:
            instruction = self.task.instructions[0] if self.task.instructions and not self.reference else ""
        index = len(self.queries)
        meta = {"row": where, "index": self.index}
        item = _item("q", f"{index:06d}", text, instruction, images, frames, self.root, meta)
        self.queries.append(_Query(item, cand_names, dict(labels)))


def _frames(
    b: _Builder, folder: Path, rows_file: Path, lineno: int, num_frames: int, *, sample: bool = True
) -> list[Path]:
    """The frames of ``folder``: ``num_frames`` picked uniformly (all when ``sample`` is False, as the reference's
    MomentSeeker loader takes them), in natural order (VLM2Vec's variant in the reference layout)."""
    try:
        return pick_frames(folder, num_frames if sample else 0, "vlm2vec" if b.reference else "natural")
    except FileNotFoundError as err:
        raise RowError(rows_file, lineno, str(err)) from None


# --- the reference wording (VLM2Vec's eval datasets, docs/eval.md §5.1) ---------------------------------------------


def _vlm2vec_text(instruction: str, text: str = "", *, image: bool = False, video: bool = False) -> str:
    """VLM2Vec's ``process_input_text`` for Qwen-VL backbones: instruction, a space and the text (when there is
    one), behind the image or video placeholder."""
    prompt = f"{instruction} {text}" if text else instruction
    if video:
        prompt = f"{P.VIDEO_PAD} {prompt}"
    if image:
        prompt = f"{P.IMAGE_PAD} {prompt}"
    return prompt


def _vlm2vec_clean(text: str) -> str:
    """What the reference Embedder keeps of a VLM2Vec text: the two placeholders removed, the ends stripped."""
    return text.replace(P.IMAGE_PAD, "").replace(P.VIDEO_PAD, "").strip()


def _vlm2vec_qa(question: str) -> str:
    """The video-QA query head: ``f"{VIDEO_TOKEN} {prompt} {question}"`` (VLM2Vec's ``process_query``)."""
    return f"{P.VIDEO_PAD} {P.MMEB_REFERENCE_VIDEO_QA} {question}"


def _vlm2vec_options(query: str, options: Sequence[str]) -> tuple[str, list[str]]:
    """VLM2Vec's ``qa_template``: the query with an option block, and the lettered options."""
    lettered = [P.MMEB_REFERENCE_OPTION.format(letter=chr(ord("A") + i), option=o) for i, o in enumerate(options)]
    return (query + P.MMEB_REFERENCE_OPTIONS_HEADER + "".join(f"{o}\n" for o in lettered)).rstrip(), lettered


def _vlm2vec_option_text(option: str) -> str:
    """Video-MME / EgoSchema candidate text: ``o[o.find('. '):].strip('. ')`` (the "A. " label cut off; an option
    without ". " keeps only its last character, as VLM2Vec does)."""
    return option[option.find(". ") :].strip(". ")


def _str_list(value: Any, field_name: str, rows_file: Path, lineno: int) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RowError(rows_file, lineno, f"{field_name} must be a list of strings, got {value!r}")
    return value


# --- image -------------------------------------------------------------------------------------------------------


def _parse_image_row(b: _Builder, row: dict[str, Any], rows_file: Path, lineno: int, num_frames: int) -> None:
    require(row, ("qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path"), rows_file, lineno)
    texts = _str_list(row["tgt_text"], "tgt_text", rows_file, lineno)
    paths = _str_list(row["tgt_img_path"], "tgt_img_path", rows_file, lineno)
    if not texts and paths:
        texts = [""] * len(paths)
    if not paths and texts:
        paths = [""] * len(texts)
    if len(texts) != len(paths) or not texts:
        raise RowError(rows_file, lineno, f"tgt_text has {len(texts)} entries and tgt_img_path {len(paths)}")
    image_root = b.root / IMAGE_ROOT
    parser = b.task.parser
    query_text, query_instruction = str(row["qry_text"]), str(row["qry_inst"])
    query_image = str(row["qry_img_path"])
    if b.reference:
        query_text, query_instruction = _reference_image_query(parser, row, b.task.key), ""
        if parser == "image_t2i":
            query_image = ""  # VLM2Vec gives text-to-image queries no image
        targets = _reference_image_targets(parser, str(row["tgt_inst"]), texts)
    else:
        targets = texts
    names = []
    for text, rel, target in zip(texts, paths, targets, strict=True):
        if parser in ("image_cls", "image_qa", "image_i2t"):
            name = text
        elif parser == "image_t2i":
            name = rel
        else:
            name = f"{rel}:{text.strip(QUOTE) if b.reference else text}"  # VLM2Vec strips the caption's quotes
        if not name:
            raise RowError(rows_file, lineno, f"a candidate has neither text nor image (parser {parser})")
        images = media_file(image_root, rel, rows_file, lineno, "candidate image")
        instruction = "" if b.reference else str(row["tgt_inst"])
        source = {"text": text, "image": rel}
        names.append(b.candidate_with(name, target, instruction, images, source=source))
    b.query(
        f"{rows_file.name}:{lineno}",
        query_text,
        instruction=query_instruction,
        images=media_file(image_root, query_image, rows_file, lineno, "query image"),
        cand_names=names,
        labels={names[0]: 1.0},
    )


def _reference_image_query(parser: str, row: dict[str, Any], key: str) -> str:
    """The query text VLM2Vec builds from an image row (``image_*`` eval datasets), cleaned as the reference does."""
    instruction, text = str(row["qry_inst"]), str(row["qry_text"])
    if parser == "image_t2i":
        query = instruction.replace("<|image_1|>", P.IMAGE_PAD) + " " + text + "\n"
        return _vlm2vec_clean(query + ("\n" if key == "VisDial" else ""))
    instruction = instruction.replace("<|image_1|>", "")
    if parser in ("image_qa", "image_i2i_vg"):
        instruction = "\n" + instruction.strip()
    return _vlm2vec_clean(_vlm2vec_text(instruction, text, image=True).replace(" \n", "\n") + "\n")


def _reference_image_targets(parser: str, target_instruction: str, texts: Sequence[str]) -> list[str]:
    """Candidate texts as VLM2Vec builds them: bare label/answer/caption texts (classification, QA, image-to-text);
    the target instruction with each caption, or alone when the row's first caption is empty (the rest)."""
    if parser in ("image_cls", "image_qa", "image_i2t"):
        return list(texts)
    instruction = target_instruction.replace("<|image_1|>", "")
    if texts[0].strip():
        return [_vlm2vec_clean(_vlm2vec_text(f"{instruction} {t}", image=True).replace(" \n", "\n")) for t in texts]
    return [_vlm2vec_clean(_vlm2vec_text(instruction, image=True).replace(" \n", "\n"))] * len(texts)


# --- video -------------------------------------------------------------------------------------------------------

# Row field naming each video's frame folder under the dataset's frame root (docs/benchmarks.md §2.2 and the hub sets).
_VIDEO_ID_FIELD: dict[str, str] = {
    "video_classification": "video_id",
    "ssv2": "video_id",
    "msrvtt": "video_id",
    "msvd": "video_id",
    "didemo": "video",
    "vatex": "videoID",
    "youcook2": "id",
    "mvbench": "video",
    "videomme": "videoID",
    "nextqa": "video",
    "egoschema": "video_idx",
    "activitynetqa": "video_name",
}


def _video_folder(b: _Builder, row: dict[str, Any], rows_file: Path, lineno: int) -> tuple[str, Path]:
    field_name = _VIDEO_ID_FIELD[b.task.parser]
    require(row, (field_name,), rows_file, lineno)
    video = str(row[field_name])
    if b.task.parser in ("didemo", "mvbench"):
        video = str(Path(video).with_suffix(""))
    if b.task.parser == "mvbench":
        require(row, ("subset",), rows_file, lineno)
        video = f"{row['subset']}/{video}"
    return video, b.root / b.task.media_root / video


def _answer_options(b: _Builder, row: dict[str, Any], rows_file: Path, lineno: int) -> tuple[list[str], str]:
    """(options, gold option) of a video QA row."""
    parser = b.task.parser
    if parser == "mvbench":
        require(row, ("question", "candidates", "answer"), rows_file, lineno)
        options, gold = _str_list(row["candidates"], "candidates", rows_file, lineno), str(row["answer"])
    elif parser == "videomme":
        require(row, ("question", "options", "answer"), rows_file, lineno)
        options = _str_list(row["options"], "options", rows_file, lineno)
        letter = str(row["answer"]).strip().upper()
        matches = [o for o in options if o.strip().upper().startswith((f"{letter}.", f"{letter})", f"{letter} "))]
        if len(matches) != 1:
            raise RowError(rows_file, lineno, f"answer {row['answer']!r} matches {len(matches)} of the options")
        gold = matches[0]
    elif parser == "nextqa":
        require(row, ("question", "answer", "a0", "a1", "a2", "a3", "a4"), rows_file, lineno)
        options = [str(row[f"a{i}"]) for i in range(5)]
        gold = options[_index(row["answer"], len(options), rows_file, lineno)]
    elif parser == "egoschema":
        require(row, ("question", "option", "answer"), rows_file, lineno)
        options = _str_list(row["option"], "option", rows_file, lineno)
        gold = options[_index(row["answer"], len(options), rows_file, lineno)]
    else:  # activitynetqa
        require(row, ("question", "answer"), rows_file, lineno)
        options, gold = ["yes", "no"], str(row["answer"]).strip().lower()
    if gold not in options:
        raise RowError(rows_file, lineno, f"the answer {gold!r} is not among the options {options}")
    return options, gold


def _index(answer: Any, n: int, rows_file: Path, lineno: int) -> int:
    """An answer given as an index (int or digit string) or a letter A, B, …"""
    text = str(answer).strip()
    if text.isdigit():
        i = int(text)
    elif len(text) == 1 and text.isalpha():
        i = ord(text.upper()) - ord("A")
    else:
        raise RowError(rows_file, lineno, f"answer {answer!r} is neither an option index nor a letter")
    if not 0 <= i < n:
        raise RowError(rows_file, lineno, f"answer {answer!r} is out of range for {n} options")
    return i


_CAPTION_FIELD = {
    "msrvtt": "caption",
    "msvd": "caption",
    "didemo": "caption",
    "vatex": "enCap",
    "youcook2": "sentence",
}


def _parse_video_row(b: _Builder, row: dict[str, Any], rows_file: Path, lineno: int, num_frames: int) -> None:
    parser = b.task.parser
    where = f"{rows_file.name}:{lineno}"
    if parser == "moment_retrieval":
        _parse_moment_row(b, row, rows_file, lineno, num_frames)
        return
    if parser == "momentseeker":
        _parse_momentseeker_row(b, row, rows_file, lineno, num_frames)
        return
    video, folder = _video_folder(b, row, rows_file, lineno)
    if parser in ("video_classification", "ssv2"):
        require(row, ("pos_text",), rows_file, lineno)
        gold = str(row["pos_text"])
        names = None
        if parser == "ssv2":
            require(row, ("neg_text",), rows_file, lineno)
            negatives = _str_list(row["neg_text"], "neg_text", rows_file, lineno)
            names = [b.candidate(n, n, source={"text": n}) for n in dict.fromkeys([gold, *negatives])]
        else:
            b.candidate(gold, gold, source={"text": gold})
        frames = _frames(b, folder, rows_file, lineno, num_frames)
        text = ""
        if b.reference:  # the dataset's sentence alone, behind the video token
            text = _vlm2vec_clean(_vlm2vec_text(P.MMEB_REFERENCE_VIDEO_CLS[b.task.key], video=True))
        b.query(where, text, frames=frames, cand_names=names, labels={gold: 1.0})
    elif parser in _CAPTION_FIELD:
        require(row, (_CAPTION_FIELD[parser],), rows_file, lineno)
        caption = row[_CAPTION_FIELD[parser]]
        if isinstance(caption, list):
            if not caption:
                raise RowError(rows_file, lineno, f"{_CAPTION_FIELD[parser]} is an empty list")
            caption = caption[0]
        frames = _frames(b, folder, rows_file, lineno, num_frames)
        text, target = str(caption), ""
        if b.reference:
            query_instruction, target_instruction = P.MMEB_REFERENCE_VIDEO_RET[b.task.key]
            text = _vlm2vec_clean(_vlm2vec_text(query_instruction, text))
            target = _vlm2vec_clean(_vlm2vec_text(target_instruction, video=True))
        name = b.candidate(video, target, frames=frames, source={"video": video})
        b.query(where, text, cand_names=None, labels={name: 1.0})
    else:  # video QA
        options, gold = _answer_options(b, row, rows_file, lineno)
        frames = _frames(b, folder, rows_file, lineno, num_frames)
        question, names_, texts = str(row["question"]), list(options), list(options)
        if b.reference:
            question, names_, texts = _reference_video_qa(parser, question, options)
            gold = names_[options.index(gold)]
        names = [b.candidate(n, t, source={"text": o}) for n, t, o in zip(names_, texts, options, strict=True)]
        b.query(where, question, frames=frames, cand_names=names, labels={gold: 1.0})


def _reference_video_qa(parser: str, question: str, options: Sequence[str]) -> tuple[str, list[str], list[str]]:
    """``(query text, candidate names, candidate texts)`` of a video-QA row as VLM2Vec builds them (cleaned)."""
    names, texts = list(options), list(options)
    if parser == "mvbench":  # the lettered options are both the names and the texts
        query, names = _vlm2vec_options(_vlm2vec_qa(question), options)
        texts = list(names)
    elif parser == "nextqa":
        query, _ = _vlm2vec_options(_vlm2vec_qa(question), options)
    elif parser == "videomme":
        query = _vlm2vec_qa(question + "\n" + "\n".join(options))
        texts = [_vlm2vec_option_text(o) for o in options]
    elif parser == "egoschema":  # no separator between the question and the first option, as VLM2Vec
        query = _vlm2vec_qa(question + " ".join(options))
        texts = [_vlm2vec_option_text(o) for o in options]
    else:  # activitynetqa
        query = _vlm2vec_qa(question + P.MMEB_REFERENCE_YES_NO)
    return _vlm2vec_clean(query), names, texts


def _parse_moment_row(b: _Builder, row: dict[str, Any], rows_file: Path, lineno: int, num_frames: int) -> None:
    """QVHighlight / Charades-STA: ``<frame root>/<video>/query/`` plus one folder per clip (``positive*`` wins)."""
    require(row, ("query", "video_path"), rows_file, lineno)
    video = Path(str(row["video_path"])).stem
    video_dir = b.root / b.task.media_root / video
    query_frames = _frames(b, video_dir / "query", rows_file, lineno, num_frames)
    clips = (
        sorted(p.name for p in video_dir.iterdir() if p.is_dir() and p.name != "query") if video_dir.is_dir() else []
    )
    positives = [c for c in clips if c.startswith("positive")]
    if len(positives) != 1:
        raise RowError(rows_file, lineno, f"{video_dir} has {len(positives)} positive clip folders; expected one")
    text, target = str(row["query"]), ""
    if b.reference:
        query_instruction, target_instruction = P.MMEB_REFERENCE_VIDEO_RET[b.task.key]
        text = _vlm2vec_clean(_vlm2vec_text(query_instruction, text, video=True))
        target = _vlm2vec_clean(_vlm2vec_text(target_instruction, video=True))
    names = [
        b.candidate(
            f"{video}/{clip}",
            target,
            frames=_frames(b, video_dir / clip, rows_file, lineno, num_frames),
            source={"video": f"{video}/{clip}"},
        )
        for clip in clips
    ]
    b.query(
        f"{rows_file.name}:{lineno}",
        text,
        frames=query_frames,
        cand_names=names,
        labels={f"{video}/{positives[0]}": 1.0},
    )


def _clip_paths(value: Any, field_name: str, rows_file: Path, lineno: int) -> list[str]:
    """The ``output_path`` of each clip entry, as written in the row."""
    if not isinstance(value, list):
        raise RowError(rows_file, lineno, f"{field_name} must be a list of clip entries, got {type(value).__name__}")
    out = []
    for entry in value:
        path = entry.get("output_path") if isinstance(entry, dict) else entry
        if not isinstance(path, str) or not path:
            raise RowError(rows_file, lineno, f"{field_name} has an entry without an output_path: {entry!r}")
        out.append(path)
    return out


def _parse_momentseeker_row(b: _Builder, row: dict[str, Any], rows_file: Path, lineno: int, num_frames: int) -> None:
    """MomentSeeker: clips under ``video_frames/<clip>/``; the query is text, text + image, or text + video.

    In the reference layout every frame of a clip folder is used (VLM2Vec's MomentSeeker loader does not sample;
    its folders hold at most ``num_video_frames`` frames)."""
    require(row, ("query", "positive_frames", "negative_frames"), rows_file, lineno)
    base = b.root / b.task.media_root
    source = str(row.get("input_frames") or "")
    images: list[Path] = []
    frames: list[Path] = []
    kind = "text"
    if source.endswith(".mp4"):
        frames = _frames(b, base / "video_frames" / Path(source).stem, rows_file, lineno, num_frames,
                         sample=not b.reference)  # fmt: skip
        kind = "video"
    elif source.endswith(".jpg"):
        images = media_file(base, f"query_{Path(source).stem}.jpg", rows_file, lineno, "query image")
        kind = "image"
    elif source:
        raise RowError(rows_file, lineno, f"input_frames={source!r} is neither .mp4, .jpg nor empty")
    positives = _clip_paths(row["positive_frames"], "positive_frames", rows_file, lineno)
    negatives = _clip_paths(row["negative_frames"], "negative_frames", rows_file, lineno)
    if not positives:
        raise RowError(rows_file, lineno, "positive_frames is empty")
    text, target = str(row["query"]), ""
    if b.reference:
        instructions = P.MMEB_REFERENCE_MOMENTSEEKER
        text = _vlm2vec_clean(_vlm2vec_text(instructions[kind], text, image=kind == "image", video=kind == "video"))
        target = _vlm2vec_clean(_vlm2vec_text(instructions["target"], video=True))
    clip_paths = dict.fromkeys([*positives, *negatives])
    names = []
    for path in clip_paths:
        clip = Path(path).stem
        folder = base / "video_frames" / clip
        clip_frames = _frames(b, folder, rows_file, lineno, num_frames, sample=not b.reference)
        names.append(b.candidate(clip, target, frames=clip_frames, source={"video": clip, "path": path}))
    b.query(
        f"{rows_file.name}:{lineno}",
        text,
        images=images,
        frames=frames,
        cand_names=list(dict.fromkeys(names)),
        labels=dict.fromkeys((Path(p).stem for p in positives), 1.0),
    )


# --- visdoc ------------------------------------------------------------------------------------------------------


def _page_file(task: MMEBTask, root: Path, corpus_id: str) -> Path:
    """The page image of ``corpus_id``; VisRAG ids are long file names, so their pages get hashed names."""
    stem = hashlib.sha1(corpus_id.encode("utf-8")).hexdigest()[:16] if task.parser == "visrag" else corpus_id
    return root / task.media_root / f"{stem}.png"


def _write_page(path: Path, image: Any, rows_file: Path, lineno: int) -> None:
    """Write a corpus row's page image (a ``{"bytes", "path"}`` struct or raw bytes) as PNG, atomically."""
    data = image.get("bytes") if isinstance(image, dict) else image
    if not isinstance(data, bytes | bytearray):
        raise RowError(rows_file, lineno, f"page {path.name} is not on disk and the row carries no image bytes")
    save_image_bytes(data, path, rows_file, lineno)


def _load_visdoc(b: _Builder, ann_dir: Path, bad: BadRows, limit: int, files: list[str]) -> None:
    queries_file = find_rows_file(ann_dir, "queries")
    qrels_file = find_rows_file(ann_dir, "qrels")
    corpus_file = find_rows_file(ann_dir, "corpus")
    files += [str(queries_file), str(qrels_file), str(corpus_file)]
    corpus: dict[str, Path] = {}
    for lineno, row in tqdm(read_rows(corpus_file), desc=f"{b.task.key} corpus", leave=False, disable=True):
        with bad.guard():
            require(row, ("corpus-id",), corpus_file, lineno)
            cid = str(row["corpus-id"])
            page = _page_file(b.task, b.root, cid)
            if not page.is_file():
                _write_page(page, row.get("image"), corpus_file, lineno)
            corpus[cid] = page
    qrels: dict[str, dict[str, float]] = {}
    for lineno, row in read_rows(qrels_file):
        with bad.guard():
            require(row, ("query-id", "corpus-id", "score"), qrels_file, lineno)
            cid = str(row["corpus-id"])
            if cid not in corpus:
                raise RowError(qrels_file, lineno, f"corpus-id {cid!r} is not in {corpus_file.name}")
            score = float(row["score"])
            grades = qrels.setdefault(str(row["query-id"]), {})
            grades[cid] = max(score, grades.get(cid, score))  # a duplicated pair keeps its larger score
    target = ""
    if b.reference:
        target = _vlm2vec_clean(_vlm2vec_text(P.MMEB_REFERENCE_VISDOC[1], image=True))
    for index, (lineno, row) in enumerate(read_rows(queries_file)):
        if limit and len(b.queries) >= limit:
            break
        b.index = index
        with bad.guard():
            require(row, ("query-id", "query"), queries_file, lineno)
            if b.task.language is not None and str(row.get("language", "")).lower() != b.task.language:
                continue
            qid = str(row["query-id"])
            relevant = {cid: g for cid, g in qrels.get(qid, {}).items() if g > 0}
            if not relevant:
                raise RowError(queries_file, lineno, f"query {qid!r} has no relevant page (score > 0) in the qrels")
            for cid in relevant:  # the row's own candidates come first in the global pool
                b.candidate(cid, target, images=[corpus[cid]], source={"corpus_id": cid})
            text = str(row["query"])
            if b.reference:
                text = _vlm2vec_clean(_vlm2vec_text(P.MMEB_REFERENCE_VISDOC[0], text))
            b.query(f"{queries_file.name}:{lineno}", text, cand_names=None, labels=relevant)
    for cid, page in corpus.items():
        b.candidate(cid, target, images=[page], source={"corpus_id": cid})


# --- dispatch ----------------------------------------------------------------------------------------------------


def annotation_dir(task: MMEBTask, data_root: Path, page_labels: PageLabels = "fixed") -> Path:
    """``DATA/annotations/<key>``; for the two page sets with fixed labels, ``DATA/annotations/<key>-fixed``."""
    name = f"{task.key}-fixed" if task.key in PAGE_SETS and page_labels == "fixed" else task.key
    path = data_root / ANNOTATIONS_DIR / name
    if not path.is_dir():
        hint = ""
        if task.key in PAGE_SETS:
            other = data_root / ANNOTATIONS_DIR / (task.key if page_labels == "fixed" else f"{task.key}-fixed")
            if other.is_dir():
                hint = (
                    f" ({other} exists: set page_labels to {'old' if page_labels == 'fixed' else 'fixed'} if "
                    "that is the version you have)"
                )
        raise FileNotFoundError(
            f"{task.key}: no annotation folder {path}{hint}; export the rows of {task.source} "
            f"(config {task.source_config or task.key}, split {task.source_split}) there (docs/eval.md §5)"
        )
    return path


def load_mmeb_task(
    key: str,
    data_root: str | Path,
    *,
    page_labels: PageLabels = "fixed",
    on_bad_row: BadRowPolicy = "stop",
    limit: int = 0,
    num_frames: int = 8,
    show_progress_bar: bool = False,
    layout: str = LAYOUT_EMBEDRL,
) -> LoadedTask:
    """Read one MMEB-V2 dataset from the local layout into queries, a de-duplicated pool and qrels.

    Args:
        key: registry key (``X-page-fixed`` accepted for the page sets).
        data_root: the folder holding ``image-tasks/``, ``video-tasks/``, ``visdoc-tasks/`` and ``annotations/``.
        page_labels: which labels the page sets' annotations hold (``fixed`` reads ``<key>-fixed/``).
        on_bad_row: ``stop`` raises on the first malformed row or missing media file; ``skip`` drops and counts it.
        limit: keep only the first ``limit`` queries (0 = all), e.g. for a smoke run.
        num_frames: frames sampled per video.
        layout: ``embedrl`` (our instructions, :data:`~embedrl.prompts.MMEB_INSTRUCTIONS`) or ``reference`` (the
            texts VLM2Vec builds, whole in ``Item.text``; VLM2Vec's frame order; MomentSeeker clips unsampled).
    """
    if layout not in LAYOUTS:
        raise EvalError(f"layout={layout!r}; use one of {LAYOUTS}")
    (name,) = resolve_tasks([key])
    task = MMEB_BY_KEY[name]
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"MMEB-V2 data root {root} does not exist")
    ann_dir = annotation_dir(task, root, page_labels)
    b = _Builder(task, root, layout)
    bad = BadRows(on_bad_row)
    files: list[str] = []
    if task.modality == "visdoc":
        _load_visdoc(b, ann_dir, bad, limit, files)
    else:
        rows_file = find_rows_file(ann_dir, "test")
        files.append(str(rows_file))
        parse = _parse_image_row if task.modality == "image" else _parse_video_row
        cap = min(x for x in (limit or None, task.subsample) if x) if (limit or task.subsample) else 0
        rows = read_rows(rows_file)
        progress = tqdm(rows, desc=f"{name} rows", leave=False, disable=not show_progress_bar)
        for index, (lineno, row) in enumerate(progress):
            if cap and len(b.queries) >= cap:
                break
            b.index = index
            with bad.guard():
                parse(b, row, rows_file, lineno, num_frames)
        labels_file = ann_dir / "labels.txt"
        if task.eval_type == "global" and labels_file.is_file():
            files.append(str(labels_file))
            for label in labels_file.read_text(encoding="utf-8").splitlines():
                if label.strip():
                    b.candidate(label.strip(), label.strip(), source={"text": label.strip()})
    if not b.queries:
        raise EvalError(f"{name}: no query could be read from {files} (skipped rows: {bad.count})")
    if b.collisions:
        logger.warning(
            "%s: %d candidate name(s) reused with different content; first occurrences kept", name, b.collisions
        )
    revision_file = ann_dir / REVISION_FILE
    revision = revision_file.read_text(encoding="utf-8").strip() if revision_file.is_file() else None
    return LoadedTask(
        task,
        _to_eval_task(b),
        {c.item.id: c.name for c in b.pool.values()},
        b.collisions,
        bad.as_dict(),
        revision,
        files,
    )


def _to_eval_task(b: _Builder) -> EvalTask:
    ids = {name: c.item.id for name, c in b.pool.items()}
    local = b.task.eval_type == "local"
    return EvalTask(
        name=b.task.key,
        info=b.task.info(),
        queries=[q.item for q in b.queries],
        pool={c.item.id: c.item for c in b.pool.values()},
        candidates=[[ids[n] for n in q.cand_names or ()] for q in b.queries] if local else None,
        qrels=[{ids[n]: g for n, g in q.labels.items()} for q in b.queries],  # type: ignore[misc]
        positives=[[ids[n] for n in q.labels] for q in b.queries],
    )


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MMEBReport(BenchmarkReport):
    """The result of one MMEB-V2 run: score objects, the summary over the scored datasets (None without one), and
    metadata."""

    def markdown(self) -> str:
        m = self.metadata
        header = self.header(
            "MMEB-V2",
            f"modes: query {m['query_mode']}, candidate {m['candidate_mode']}",
            f"- Split versions: {json.dumps(m['split_versions'])}; benchmark version {m['benchmark_version']}",
        )
        return header + (
            format_summary(self.summary) if self.summary else "No scored MMEB-V2 dataset was evaluated.\n"
        )

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """``leaderboard.json`` (the scored datasets, if any), ``summary.md`` and ``summary.json``."""
        out = Path(out_dir)
        scored = {k: v for k, v in self.results.items() if MMEB_BY_KEY[k].scored}
        paths = {}
        if scored:
            partial = bool(self.metadata["missing"])
            paths["leaderboard"] = write_leaderboard(out / LEADERBOARD_JSON, scored, self.metadata, partial=partial)
        return paths | super().write(out)


def split_versions(results: Mapping[str, Mapping[str, Any]], page_labels: PageLabels) -> dict[str, str]:
    """``{"ViDoSeek-page": page_labels, "MMLongBench-page": page_labels, "MomentSeeker": "dedup-1602" | …}``."""
    versions: dict[str, str] = dict.fromkeys(PAGE_SETS, page_labels)
    if "MomentSeeker" in results:
        versions["MomentSeeker"] = MOMENTSEEKER_VERSIONS.get(results["MomentSeeker"]["num_data"], "partial")
    return versions


def mmeb_summary(results: Mapping[str, Mapping[str, Any]], page_labels: PageLabels) -> dict[str, Any]:
    """The harness's summary of scored results: main metric ×100 per dataset, the 13 sub-groups, the 3 modalities
    and All, each a plain mean over datasets (docs/benchmarks.md §1.5); partial results are flagged, never padded."""
    summary = summarize_tasks(
        results, mmeb_v2_task_info(), group_keys=MMEB_V2_GROUP_KEYS, partial=True, benchmark="MMEB-V2"
    )
    summary["split_versions"] = split_versions(results, page_labels)
    return summary


class MMEBEvaluator(BenchmarkEvaluator[MMEBReport, LoadedTask]):
    """MMEB-V2 retrieval evaluation from the local data layout (the engine is :class:`TaskEvaluator`).

    Args:
        data_root: the MMEB-V2 data folder (see the module docstring).
        tasks: registry keys; None = the 78 scored datasets.
        page_labels: ``fixed`` or ``old``: the labels of ViDoSeek-page and MMLongBench-page (recorded as the split
            version; the writer names those keys ``X-page-fixed`` only when fixed).
        check_counts: require each dataset's query count to equal the registry's (off for partial data).
        benchmark_version: recorded in the metadata (``v2.1``: fixed page labels, MomentSeeker de-duplicated).
        **options: ``on_bad_row``, ``limit`` and ``num_frames`` (see :func:`load_mmeb_task`), ``layout`` and
            ``tcot_cache`` (see :class:`~embedrl.eval.benchmark.BenchmarkEvaluator`) and the :class:`TaskEvaluator`
            settings (mode, tcot_source, decoding, caches, batch sizes, …).
    """

    benchmark = "MMEB-V2"
    progress_label = "MMEB-V2 datasets"
    config_options = (*BenchmarkEvaluator.config_options, "page_labels", "check_counts", "benchmark_version")
    # The reference harness (VLM2Vec + the Embed-RL processor): images 128-768 and frames 128-300 visual tokens of
    # 32 x 32 pixels, each frame its own image; VLM2Vec's natural frame order.
    reference_budget = PixelBudget(P.IMAGE_MIN_PIXELS, P.IMAGE_MAX_PIXELS, P.FRAME_MIN_PIXELS, P.FRAME_MAX_PIXELS)
    frame_orders: ClassVar[dict[str, FrameOrder]] = {LAYOUT_EMBEDRL: "natural", LAYOUT_REFERENCE: "vlm2vec"}

    def __init__(
        self,
        data_root: str | Path,
        tasks: Sequence[str] | None = None,
        *,
        page_labels: PageLabels = "fixed",
        check_counts: bool = True,
        benchmark_version: str = "v2.1",
        **options: Any,
    ) -> None:
        super().__init__(data_root, tasks, **options)
        if page_labels not in ("fixed", "old"):
            raise EvalError(f"page_labels={page_labels!r}; use 'fixed' or 'old'")
        self.page_labels = page_labels
        self.check_counts = check_counts
        self.benchmark_version = benchmark_version

    def _resolve(self, names: Sequence[str] | None) -> list[str]:
        return resolve_tasks(names)

    def _read(self, name: str, **rows: Any) -> LoadedTask:
        loaded = load_mmeb_task(
            name, self.root, page_labels=self.page_labels, show_progress_bar=self.show_progress_bar, **rows
        )
        self._check_count(loaded)
        return loaded

    def _check_count(self, loaded: LoadedTask) -> None:
        dataset = loaded.task.dataset
        n = len(loaded.eval_task.queries)
        if not self.check_counts or dataset is None or n == dataset.num_queries:
            return
        if dataset.key == "MomentSeeker" and n in MOMENTSEEKER_VERSIONS:
            return
        raise EvalError(
            f"{dataset.key}: read {n} queries, but MMEB-V2 has {dataset.num_queries} (skipped rows: "
            f"{loaded.bad_rows['skipped']}); fix the data, or set check_counts false for a partial run"
        )

    def _predictions(
        self, name: str, task: EvalTask, ranked: list[Ranked], scores: np.ndarray, relevance: list[dict[int, int]]
    ) -> list[dict[str, Any]]:
        """Per query: its row, the top-10 candidate names with scores, the gold names and their grades."""
        names = self.loaded[name].names
        return [
            {"query": query.meta.get("row"), "top": [names[cid] for cid in top.ids], "scores": top.scores,
             "labels": [names[cid] for cid in qrels], "grades": list(qrels.values())}
            for query, top, qrels in zip(task.queries, ranked, task.qrels, strict=True)
        ]  # fmt: skip

    def _report(
        self, run: EvalRun, results: dict[str, dict[str, Any]], stats: dict[str, TaskStats], extra: dict[str, Any]
    ) -> MMEBReport:
        scored = {k: v for k, v in results.items() if MMEB_BY_KEY[k].scored}
        revisions = {
            k: {
                "source": v.task.source,
                "config": v.task.source_config,
                "split": v.task.source_split,
                "revision": v.revision or "unknown",
            }
            for k, v in self.loaded.items()
        }
        metadata = self._run_metadata(
            run,
            extra,
            head={
                "benchmark": "MMEB-V2",
                "benchmark_version": self.benchmark_version,
                "split_versions": split_versions(scored, self.page_labels),
                "dataset_revisions": revisions,
                "main_metrics": dict(MAIN_METRICS),
                "cot_mode": self.cot_mode,
            },
            settings=self._settings_metadata(run),
            missing=[d.key for d in MMEB_V2_DATASETS if d.key not in scored],
            data=self._data_metadata(candidate_collisions={k: v.collisions for k, v in self.loaded.items()}),
        )
        summary = mmeb_summary(scored, self.page_labels) if scored else None
        return MMEBReport(results, summary, metadata, stats)


def evaluate_mmeb(cfg: MMEBEvalConfig) -> dict[str, Any]:
    """The ``embedrl eval mmeb`` stage: load the models, evaluate, write the result files into ``cfg.out``.

    Writes ``config.json``, ``scores/<key>_score.json``, ``predictions/<key>.jsonl``, ``summary.md``,
    ``summary.json`` and ``leaderboard.json`` (scored datasets only, page keys named after ``page_labels``).
    """
    return run_benchmark_stage(cfg, MMEBEvaluator, lambda embedder: {"embedding_dimension": str(embedder.dim)})
