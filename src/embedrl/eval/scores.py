"""Score files and aggregation: the MMEB-V2 dataset registry, per-task and leaderboard JSON, summaries.

Reference: docs/benchmarks.md §1.1 (datasets and sub-groups), §1.4 (score keys), §1.5 (aggregation), §1.7 (versions
and the ``-fixed`` page-set keys) and §2.3 (file formats).

- **Registry.** :data:`MMEB_V2_DATASETS` lists the 78 scored datasets in score-file order with modality, meta-task,
  VisDoc group and expected query count. Every aggregate is computed over the registry, never over "whatever keys a
  file holds": known extra entries (``MomentSeeker_1k8``, the three English-only ViDoRe-v2 variants) are ignored
  and reported, unknown ones are an error, and a missing dataset is an error unless the result is marked partial.
- **Aggregation** (:func:`aggregate`) is generic: a plain, unweighted mean over tasks, overall and per value of each
  grouping key (``modality``, ``meta_task``, and for MMEB-V2 also ``group``). It is never a mean of group means, and
  query counts carry no weight. The same function aggregates the synthetic world's ``eval/manifest.json`` tasks.
- **Sub-groups.** MMEB-V2 reports 13: the 9 meta-tasks (I-CLS, I-QA, I-RET, I-VG, V-CLS, V-QA, V-RET, V-MRET,
  VisDoc; VisDoc equals the VisDoc modality) and the 4 VisDoc groups (VDRv1, VDRv2, VisRAG, OOD).
- **Page-set versions.** Readers accept ``ViDoSeek-page`` and ``ViDoSeek-page-fixed`` (same for MMLongBench);
  writers emit ``-fixed`` only for fixed labels and always record ``split_versions`` in the metadata. A plain key
  does not tell the version (v2.0.x files hold old labels, v2.1 files fixed ones), so it reads as ``"unspecified"``
  unless the file's metadata says otherwise.

Score files hold fractions in [0, 1]; summaries hold the main metric ×100 (unrounded; round only for display).

Example:
    >>> info = {"a": {"modality": "image", "meta_task": "I-CLS"}, "b": {"modality": "image", "meta_task": "I-QA"},
    ...         "c": {"modality": "video", "meta_task": "V-QA"}}
    >>> agg = aggregate({"a": 0.5, "b": 0.7, "c": 0.3}, info)
    >>> round(agg["overall"], 4), agg["modality"]["image"], agg["meta_task"]["V-QA"]
    (0.5, 0.6, 0.3)
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from embedrl import __version__
from embedrl.config import UserError
from embedrl.eval.metrics import metric_names

logger = logging.getLogger(__name__)

Modality = Literal["image", "video", "visdoc"]


class ScoreFileError(UserError, ValueError):
    """A score file or result set does not have the expected shape; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Registry (docs/benchmarks.md §1.1, §1.2, §1.4)
# ----------------------------------------------------------------------------------------------------------------

# The 26 keys of a per-dataset score object, in file order.
SCORE_KEYS: tuple[str, ...] = (*metric_names((1, 5, 10)), "num_pred", "num_data")

MAIN_METRICS: dict[str, str] = {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg_linear@5"}
MODALITY_LABELS: dict[str, str] = {"image": "Image", "video": "Video", "visdoc": "VisDoc"}
OVERALL_LABEL = "All"

# Page sets whose labels were fixed in 2025-11; their keys may carry the `-fixed` suffix.
PAGE_SETS: tuple[str, ...] = ("ViDoSeek-page", "MMLongBench-page")
FIXED_SUFFIX = "-fixed"
PAGE_SPLIT_VERSIONS = ("fixed", "old")
MOMENTSEEKER_VERSIONS = {1602: "dedup-1602", 1800: "original-1800"}  # num_data -> split version

# Entries some score files carry that are not among the 78 scored datasets; ignored (and reported) by readers.
MMEB_V2_UNSCORED: dict[str, str] = {
    "MomentSeeker_1k8": "the pre-dedup MomentSeeker (1800 queries) kept by VLM2Vec v2.0.1; MomentSeeker is scored",
    "ViDoRe_biomedical_lectures_v2": "English-only ViDoRe-v2 variant: evaluated, not scored",
    "ViDoRe_economics_reports_v2": "English-only ViDoRe-v2 variant: evaluated, not scored",
    "ViDoRe_esg_reports_v2": "English-only ViDoRe-v2 variant: evaluated, not scored",
}


@dataclass(frozen=True)
class MMEBDataset:
    """One scored MMEB-V2 dataset.

    Attributes:
        key: score key (the YAML key of fixtures/mmeb-v2/*.yaml); page sets without the ``-fixed`` suffix.
        modality: ``image``, ``video`` or ``visdoc`` (the block of the leaderboard file).
        meta_task: I-CLS, I-QA, I-RET, I-VG (grounding, also written GD), V-CLS, V-QA, V-RET, V-MRET or VisDoc.
        group: VisDoc group (VDRv1, VDRv2, VisRAG, OOD); None outside VisDoc.
        num_queries: expected ``num_data`` (MomentSeeker: 1602, the de-duplicated set of v2.0.1).
    """

    key: str
    modality: Modality
    meta_task: str
    group: str | None
    num_queries: int

    @property
    def metric(self) -> str:
        return MAIN_METRICS[self.modality]


# In score-file order (docs/benchmarks.md §1.1); query counts from §1.2.
MMEB_V2_DATASETS: tuple[MMEBDataset, ...] = (
    MMEBDataset("ImageNet-1K", "image", "I-CLS", None, 1000),
    MMEBDataset("N24News", "image", "I-CLS", None, 1000),
    MMEBDataset("HatefulMemes", "image", "I-CLS", None, 1000),
    MMEBDataset("VOC2007", "image", "I-CLS", None, 1000),
    MMEBDataset("SUN397", "image", "I-CLS", None, 1000),
    MMEBDataset("Place365", "image", "I-CLS", None, 1000),
    MMEBDataset("ImageNet-A", "image", "I-CLS", None, 1000),
    MMEBDataset("ImageNet-R", "image", "I-CLS", None, 1000),
    MMEBDataset("ObjectNet", "image", "I-CLS", None, 1000),
    MMEBDataset("Country211", "image", "I-CLS", None, 1000),
    MMEBDataset("OK-VQA", "image", "I-QA", None, 1000),
    MMEBDataset("A-OKVQA", "image", "I-QA", None, 1000),
    MMEBDataset("DocVQA", "image", "I-QA", None, 1000),
    MMEBDataset("InfographicsVQA", "image", "I-QA", None, 1000),
    MMEBDataset("ChartQA", "image", "I-QA", None, 1000),
    MMEBDataset("Visual7W", "image", "I-QA", None, 1000),
    MMEBDataset("ScienceQA", "image", "I-QA", None, 1000),
    MMEBDataset("VizWiz", "image", "I-QA", None, 1000),
    MMEBDataset("GQA", "image", "I-QA", None, 1000),
    MMEBDataset("TextVQA", "image", "I-QA", None, 1000),
    MMEBDataset("VisDial", "image", "I-RET", None, 1000),
    MMEBDataset("CIRR", "image", "I-RET", None, 1000),
    MMEBDataset("VisualNews_t2i", "image", "I-RET", None, 1000),
    MMEBDataset("VisualNews_i2t", "image", "I-RET", None, 1000),
    MMEBDataset("MSCOCO_t2i", "image", "I-RET", None, 1000),
    MMEBDataset("MSCOCO_i2t", "image", "I-RET", None, 1000),
    MMEBDataset("NIGHTS", "image", "I-RET", None, 1000),
    MMEBDataset("WebQA", "image", "I-RET", None, 1000),
    MMEBDataset("FashionIQ", "image", "I-RET", None, 1000),
    MMEBDataset("Wiki-SS-NQ", "image", "I-RET", None, 1000),
    MMEBDataset("OVEN", "image", "I-RET", None, 1000),
    MMEBDataset("EDIS", "image", "I-RET", None, 1000),
    MMEBDataset("MSCOCO", "image", "I-VG", None, 1000),
    MMEBDataset("RefCOCO", "image", "I-VG", None, 1000),
    MMEBDataset("RefCOCO-Matching", "image", "I-VG", None, 1000),
    MMEBDataset("Visual7W-Pointing", "image", "I-VG", None, 1000),
    MMEBDataset("K700", "video", "V-CLS", None, 1000),
    MMEBDataset("SmthSmthV2", "video", "V-CLS", None, 1000),
    MMEBDataset("HMDB51", "video", "V-CLS", None, 1000),
    MMEBDataset("UCF101", "video", "V-CLS", None, 1000),
    MMEBDataset("Breakfast", "video", "V-CLS", None, 433),
    MMEBDataset("MVBench", "video", "V-QA", None, 4000),
    MMEBDataset("Video-MME", "video", "V-QA", None, 2700),
    MMEBDataset("NExTQA", "video", "V-QA", None, 8564),
    MMEBDataset("EgoSchema", "video", "V-QA", None, 500),
    MMEBDataset("ActivityNetQA", "video", "V-QA", None, 1000),
    MMEBDataset("DiDeMo", "video", "V-RET", None, 1004),
    MMEBDataset("MSR-VTT", "video", "V-RET", None, 1000),
    MMEBDataset("MSVD", "video", "V-RET", None, 670),
    MMEBDataset("VATEX", "video", "V-RET", None, 4478),
    MMEBDataset("YouCook2", "video", "V-RET", None, 3179),
    MMEBDataset("QVHighlight", "video", "V-MRET", None, 1083),
    MMEBDataset("Charades-STA", "video", "V-MRET", None, 727),
    MMEBDataset("MomentSeeker", "video", "V-MRET", None, 1602),
    MMEBDataset("ViDoRe_arxivqa", "visdoc", "VisDoc", "VDRv1", 500),
    MMEBDataset("ViDoRe_docvqa", "visdoc", "VisDoc", "VDRv1", 451),
    MMEBDataset("ViDoRe_infovqa", "visdoc", "VisDoc", "VDRv1", 494),
    MMEBDataset("ViDoRe_tabfquad", "visdoc", "VisDoc", "VDRv1", 280),
    MMEBDataset("ViDoRe_tatdqa", "visdoc", "VisDoc", "VDRv1", 1646),
    MMEBDataset("ViDoRe_shiftproject", "visdoc", "VisDoc", "VDRv1", 100),
    MMEBDataset("ViDoRe_syntheticDocQA_artificial_intelligence", "visdoc", "VisDoc", "VDRv1", 100),
    MMEBDataset("ViDoRe_syntheticDocQA_energy", "visdoc", "VisDoc", "VDRv1", 100),
    MMEBDataset("ViDoRe_syntheticDocQA_government_reports", "visdoc", "VisDoc", "VDRv1", 100),
    MMEBDataset("ViDoRe_syntheticDocQA_healthcare_industry", "visdoc", "VisDoc", "VDRv1", 100),
    MMEBDataset("ViDoRe_esg_reports_human_labeled_v2", "visdoc", "VisDoc", "VDRv2", 52),
    MMEBDataset("ViDoRe_biomedical_lectures_v2_multilingual", "visdoc", "VisDoc", "VDRv2", 640),
    MMEBDataset("ViDoRe_economics_reports_v2_multilingual", "visdoc", "VisDoc", "VDRv2", 232),
    MMEBDataset("ViDoRe_esg_reports_v2_multilingual", "visdoc", "VisDoc", "VDRv2", 228),
    MMEBDataset("VisRAG_ArxivQA", "visdoc", "VisDoc", "VisRAG", 816),
    MMEBDataset("VisRAG_ChartQA", "visdoc", "VisDoc", "VisRAG", 63),
    MMEBDataset("VisRAG_MP-DocVQA", "visdoc", "VisDoc", "VisRAG", 591),
    MMEBDataset("VisRAG_SlideVQA", "visdoc", "VisDoc", "VisRAG", 556),
    MMEBDataset("VisRAG_InfoVQA", "visdoc", "VisDoc", "VisRAG", 718),
    MMEBDataset("VisRAG_PlotQA", "visdoc", "VisDoc", "VisRAG", 863),
    MMEBDataset("ViDoSeek-page", "visdoc", "VisDoc", "OOD", 1142),
    MMEBDataset("ViDoSeek-doc", "visdoc", "VisDoc", "OOD", 1142),
    MMEBDataset("MMLongBench-page", "visdoc", "VisDoc", "OOD", 838),
    MMEBDataset("MMLongBench-doc", "visdoc", "VisDoc", "OOD", 838),
)
MMEB_V2_BY_KEY: dict[str, MMEBDataset] = {d.key: d for d in MMEB_V2_DATASETS}
# The grouping keys of MMEB-V2 summaries: 3 modalities, 9 meta-tasks, 4 VisDoc groups.
MMEB_V2_GROUP_KEYS: tuple[str, ...] = ("modality", "meta_task", "group")


def mmeb_v2_task_info() -> dict[str, dict[str, str]]:
    """``{key: {"modality", "meta_task", "metric"[, "group"]}}`` for the 78 datasets, the input of
    :func:`aggregate` / :func:`summarize_tasks` (``group`` only for VisDoc)."""
    info: dict[str, dict[str, str]] = {}
    for d in MMEB_V2_DATASETS:
        info[d.key] = {"modality": d.modality, "meta_task": d.meta_task, "metric": d.metric}
        if d.group is not None:
            info[d.key]["group"] = d.group
    return info


def canonical_key(key: str) -> str:
    """``ViDoSeek-page-fixed`` -> ``ViDoSeek-page``; every other key unchanged."""
    base = key.removesuffix(FIXED_SUFFIX)
    return base if base in PAGE_SETS else key


# ----------------------------------------------------------------------------------------------------------------
# Per-dataset score objects and files
# ----------------------------------------------------------------------------------------------------------------


def validate_score_object(obj: Any, where: str, keys: Sequence[str] = SCORE_KEYS) -> dict[str, Any]:
    """Check one score object (by default MMEB's 26 keys; ``keys``: the metric keys, then ``num_pred`` and
    ``num_data``): fractions in [0, 1], integer counts. Return it in file order."""
    if not isinstance(obj, Mapping):
        raise ScoreFileError(f"{where}: expected an object with the {len(keys)} score keys, got {type(obj)}")
    missing = [k for k in keys if k not in obj]
    extra = [k for k in obj if k not in keys]
    if missing or extra:
        mmeb = "hit/ndcg_linear/ndcg_exponential/precision/recall/f1/map/mrr @1/5/10 + num_pred/num_data"
        raise ScoreFileError(
            f"{where}: not a score object (missing {missing}, unexpected {extra}); it needs exactly "
            + (mmeb if tuple(keys) == SCORE_KEYS else ", ".join(keys))
        )
    for k in keys[:-2]:
        v = obj[k]
        if isinstance(v, bool) or not isinstance(v, int | float) or not -1e-9 <= v <= 1 + 1e-9:
            raise ScoreFileError(f"{where}: {k}={v!r} is not a fraction in [0, 1] (score files are not ×100)")
    for k in ("num_pred", "num_data"):
        if isinstance(obj[k], bool) or not isinstance(obj[k], int) or obj[k] < 0:
            raise ScoreFileError(f"{where}: {k}={obj[k]!r} must be a non-negative int")
    return {k: obj[k] for k in keys}


def task_score_path(out_dir: str | Path, key: str) -> Path:
    """``<out_dir>/<key>_score.json``, the per-dataset score file of the harness."""
    return Path(out_dir) / f"{key}_score.json"


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) through a temporary file, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON through a temporary file, so a crash never leaves half a file."""
    write_text(path, json.dumps(obj, indent=4) + "\n")


def _read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScoreFileError(f"{path}: no such score file") from None
    except json.JSONDecodeError as err:
        raise ScoreFileError(f"{path}: not valid JSON ({err})") from None


def write_task_scores(
    out_dir: str | Path, key: str, scores: Mapping[str, Any], keys: Sequence[str] = SCORE_KEYS
) -> Path:
    """Write one dataset's score object (e.g. from ``compute_metrics``; ``keys`` in file order, see
    :func:`validate_score_object`) as ``<out_dir>/<key>_score.json``."""
    path = task_score_path(out_dir, key)
    _write_json(path, validate_score_object(scores, f"scores of {key}", keys))
    return path


def read_task_scores(path: str | Path) -> dict[str, Any]:
    """Read and validate one ``<key>_score.json``."""
    return validate_score_object(_read_json(path), str(path))


# ----------------------------------------------------------------------------------------------------------------
# Leaderboard files (docs/benchmarks.md §2.3)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaderboard:
    """A leaderboard score file: ``metadata`` and ``metrics[modality][key] -> score object`` as stored."""

    metadata: dict[str, Any]
    metrics: dict[str, dict[str, dict[str, Any]]]
    path: Path | None = None


@dataclass(frozen=True)
class MMEBSelection:
    """The scored datasets of a leaderboard, under their canonical keys.

    Attributes:
        results: canonical key -> validated score object (registry order; absent datasets are missing).
        source_keys: canonical key -> key in the file, where they differ (``ViDoSeek-page-fixed``).
        ignored: known non-scored keys found in the file (e.g. ``MomentSeeker_1k8``).
        split_versions: ``ViDoSeek-page`` / ``MMLongBench-page`` -> ``fixed``, ``old`` or ``unspecified``;
            ``MomentSeeker`` -> ``dedup-1602`` / ``original-1800`` (from its ``num_data``).
    """

    results: dict[str, dict[str, Any]]
    source_keys: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    split_versions: dict[str, str] = field(default_factory=dict)

    @property
    def missing(self) -> list[str]:
        return [d.key for d in MMEB_V2_DATASETS if d.key not in self.results]


def read_leaderboard(path: str | Path) -> Leaderboard:
    """Read a leaderboard file (the format of fixtures/scores/*.json): ``{"metadata": {…}, "metrics": {…}}``."""
    path = Path(path)
    obj = _read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("metrics"), dict):
        raise ScoreFileError(f"{path}: expected a leaderboard object with a 'metrics' block per modality")
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ScoreFileError(f"{path}: 'metadata' must be an object")
    for modality, block in obj["metrics"].items():
        if modality not in MAIN_METRICS:
            raise ScoreFileError(f"{path}: unknown modality block {modality!r}; expected {list(MAIN_METRICS)}")
        if not isinstance(block, dict):
            raise ScoreFileError(f"{path}: metrics.{modality} must map dataset keys to score objects")
    return Leaderboard(metadata=metadata, metrics=obj["metrics"], path=path)


def select_mmeb_v2(board: Leaderboard, *, check_counts: bool = True) -> MMEBSelection:
    """Map a leaderboard's entries onto the 78 registry datasets (docs/benchmarks.md §1.5, §1.7).

    Accepts ``X-page`` and ``X-page-fixed``; ignores the known extras of :data:`MMEB_V2_UNSCORED`; raises on unknown
    keys, on a dataset in the wrong modality block or present under both spellings, on ``num_pred != num_data``
    (an incomplete run) and, with ``check_counts``, on a ``num_data`` that differs from the registry (MomentSeeker's
    pre-dedup 1800 is accepted and recorded as its split version).
    """
    where = str(board.path or "leaderboard")
    declared = board.metadata.get("split_versions") or {}
    results: dict[str, dict[str, Any]] = {}
    source_keys: dict[str, str] = {}
    ignored: list[str] = []
    for modality, block in board.metrics.items():
        for key, obj in block.items():
            if key in MMEB_V2_UNSCORED:
                ignored.append(key)
                continue
            canon = canonical_key(key)
            dataset = MMEB_V2_BY_KEY.get(canon)
            if dataset is None:
                raise ScoreFileError(
                    f"{where}: metrics.{modality} has unknown dataset key {key!r}; it is neither one of the 78 "
                    f"MMEB-V2 datasets nor a known extra ({', '.join(MMEB_V2_UNSCORED)})"
                )
            if dataset.modality != modality:
                raise ScoreFileError(f"{where}: {key!r} is in metrics.{modality}, but it is a {dataset.modality} set")
            if canon in results:
                raise ScoreFileError(
                    f"{where}: {canon!r} appears twice (as {source_keys.get(canon, canon)!r} and {key!r}); "
                    "keep only the page set that was evaluated"
                )
            scores = validate_score_object(obj, f"{where}: metrics.{modality}.{key}")
            _check_counts(scores, dataset, f"{where}: metrics.{modality}.{key}", check_counts)
            results[canon] = scores
            if key != canon:
                source_keys[canon] = key
    if ignored:
        logger.debug("%s: ignored entries that MMEB-V2 does not score: %s", where, ", ".join(ignored))
    ordered = {d.key: results[d.key] for d in MMEB_V2_DATASETS if d.key in results}
    return MMEBSelection(ordered, source_keys, ignored, _split_versions(ordered, source_keys, declared, where))


def _check_counts(scores: Mapping[str, Any], dataset: MMEBDataset, where: str, check_counts: bool) -> None:
    if scores["num_pred"] != scores["num_data"]:
        raise ScoreFileError(
            f"{where}: num_pred={scores['num_pred']} != num_data={scores['num_data']}: the run scored only part of "
            "the queries; re-run the dataset"
        )
    expected = dataset.num_queries
    if check_counts and scores["num_data"] != expected:
        if dataset.key == "MomentSeeker" and scores["num_data"] in MOMENTSEEKER_VERSIONS:
            return
        raise ScoreFileError(
            f"{where}: num_data={scores['num_data']}, but MMEB-V2 {dataset.key} has {expected} queries; "
            "evaluate the full test split (or pass check_counts=False to read it anyway)"
        )


def _split_versions(
    results: Mapping[str, Mapping[str, Any]], source_keys: Mapping[str, str], declared: Mapping[str, str], where: str
) -> dict[str, str]:
    versions: dict[str, str] = {}
    for page_set in PAGE_SETS:
        if page_set not in results:
            continue
        suffixed = source_keys.get(page_set, page_set).endswith(FIXED_SUFFIX)
        stated = declared.get(page_set)
        if stated is not None and stated not in PAGE_SPLIT_VERSIONS:
            raise ScoreFileError(f"{where}: split_versions[{page_set!r}]={stated!r}; use 'fixed' or 'old'")
        if suffixed and stated == "old":
            raise ScoreFileError(f"{where}: {page_set}{FIXED_SUFFIX} is declared 'old' in split_versions")
        versions[page_set] = stated or ("fixed" if suffixed else "unspecified")
    if "MomentSeeker" in results:
        versions["MomentSeeker"] = MOMENTSEEKER_VERSIONS.get(results["MomentSeeker"]["num_data"], "unspecified")
    return versions


def write_leaderboard(
    path: str | Path,
    results: Mapping[str, Mapping[str, Any]],
    metadata: Mapping[str, Any],
    *,
    partial: bool = False,
) -> Path:
    """Write a leaderboard file for MMEB-V2 (docs/benchmarks.md §2.3) with the version metadata of §1.7.

    Args:
        path: output file.
        results: canonical dataset key (``ViDoSeek-page``, not ``-fixed``) -> score object with the 26 keys.
        metadata: at least ``model_name``, ``benchmark_version`` (e.g. ``"v2.1"``) and ``split_versions`` with
            ``ViDoSeek-page`` and ``MMLongBench-page`` set to ``"fixed"`` or ``"old"``; may add
            ``dataset_revisions``, ``eval_config_sha256``, ``cot_mode`` and the leaderboard's model fields.
            ``benchmark``, ``main_metrics``, ``embedrl_version`` and ``report_generated_date`` are filled in.
        partial: allow missing datasets; they are listed under ``metadata["missing"]``.

    The page sets are written as ``X-page-fixed`` exactly when their split version is ``fixed``.
    """
    unknown = [k for k in results if k not in MMEB_V2_BY_KEY]
    if unknown:
        raise ScoreFileError(
            f"results have keys outside the 78 MMEB-V2 datasets: {unknown} (use canonical keys such as "
            "'ViDoSeek-page'; the writer adds '-fixed' from split_versions)"
        )
    needed = [k for k in ("model_name", "benchmark_version", "split_versions") if not metadata.get(k)]
    if needed:
        raise ScoreFileError(f"leaderboard metadata lacks {needed}; every MMEB-V2 result must record its version")
    splits = dict(metadata["split_versions"])
    for page_set in PAGE_SETS:
        if page_set in results and splits.get(page_set) not in PAGE_SPLIT_VERSIONS:
            raise ScoreFileError(
                f"split_versions[{page_set!r}]={splits.get(page_set)!r}; say 'fixed' (VLM2Vec/{page_set}-fixed) "
                "or 'old' (the original labels)"
            )
    if "MomentSeeker" in results and "MomentSeeker" not in splits:
        splits["MomentSeeker"] = MOMENTSEEKER_VERSIONS.get(results["MomentSeeker"]["num_data"], "unspecified")
    missing = [d.key for d in MMEB_V2_DATASETS if d.key not in results]
    if missing and not partial:
        raise ScoreFileError(f"{len(missing)} MMEB-V2 datasets have no scores ({missing}); pass partial=True")

    meta: dict[str, Any] = {
        **metadata,
        "benchmark": "MMEB-V2",
        "split_versions": splits,
        "main_metrics": dict(MAIN_METRICS),
        "embedrl_version": metadata.get("embedrl_version", __version__),
        "report_generated_date": metadata.get("report_generated_date", datetime.now().isoformat()),
    }
    if missing:
        meta["partial"], meta["missing"] = True, missing
    metrics: dict[str, dict[str, Any]] = {modality: {} for modality in MAIN_METRICS}
    for d in MMEB_V2_DATASETS:
        if d.key in results:
            file_key = d.key + FIXED_SUFFIX if d.key in PAGE_SETS and splits[d.key] == "fixed" else d.key
            metrics[d.modality][file_key] = validate_score_object(results[d.key], f"results[{d.key!r}]")
    path = Path(path)
    _write_json(path, {"metadata": meta, "metrics": {m: block for m, block in metrics.items() if block}})
    return path


# ----------------------------------------------------------------------------------------------------------------
# Aggregation (docs/benchmarks.md §1.5), generic over task manifests
# ----------------------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def aggregate(
    task_scores: Mapping[str, float],
    task_info: Mapping[str, Mapping[str, Any]],
    *,
    group_keys: Sequence[str] = ("modality", "meta_task"),
    partial: bool = False,
) -> dict[str, Any]:
    """Plain, unweighted means of per-task scores: overall and per value of each grouping key.

    Args:
        task_scores: task -> its main score (any scale; the means keep it).
        task_info: the task registry, task -> ``{"modality": …, "meta_task": …, …}`` (e.g. the ``tasks`` of the
            synthetic world's ``eval/manifest.json``, or :func:`mmeb_v2_task_info`). It defines which tasks count.
        group_keys: the info keys to group by; a task whose info lacks a key (or has None) is in no group of it.
        partial: allow tasks of the registry without a score (listed under ``missing``); otherwise an error.

    Returns:
        ``{"overall": float, "<group key>": {value: mean, …}, …, "counts": {"overall": n, "<group key>": {…}},
        "missing": [...]}``, groups in the registry's first-seen order. Every mean is over tasks, never over group
        means.
    """
    unexpected = [t for t in task_scores if t not in task_info]
    if unexpected:
        raise ScoreFileError(f"scores for tasks outside the registry: {unexpected}; drop them or add them to it")
    missing = [t for t in task_info if t not in task_scores]
    if missing and not partial:
        raise ScoreFileError(f"{len(missing)} tasks have no score: {missing}; score them or pass partial=True")
    present = [t for t in task_info if t in task_scores]
    if not present:
        raise ScoreFileError("no task has a score; there is nothing to aggregate")
    for t in present:
        v = task_scores[t]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ScoreFileError(f"task {t!r}: score {v!r} is not a finite number")

    out: dict[str, Any] = {"overall": _mean([task_scores[t] for t in present])}
    counts: dict[str, Any] = {"overall": len(present)}
    for key in group_keys:
        groups: dict[str, list[float]] = {}
        for t in present:
            label = task_info[t].get(key)
            if label is not None:
                groups.setdefault(str(label), []).append(task_scores[t])
        out[key] = {label: _mean(values) for label, values in groups.items()}
        counts[key] = {label: len(values) for label, values in groups.items()}
    out["counts"] = counts
    out["missing"] = missing
    return out


def overall_difference_interval(
    better: Mapping[str, Sequence[float]],
    worse: Mapping[str, Sequence[float]],
    *,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Paired bootstrap interval of ``overall(better) - overall(worse)``, overall being the plain mean over tasks of
    each task's mean per-query score (as :func:`aggregate`).

    Args:
        better, worse: task -> per-query values of the task's main metric, the same tasks and the same queries in the
            same order (two systems on one query set).
        level: the interval's coverage; the bounds are the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles.
        resamples: bootstrap draws; each redraws every task's queries with replacement (stratified by task, so each
            task keeps its weight) and scores both systems on the same draw.
        seed: the draws' seed.

    It measures sampling noise of the query set only, not the spread between training or decoding seeds.

    Example:
        >>> overall_difference_interval({"a": [1, 1, 0], "b": [1, 0]}, {"a": [0, 1, 0], "b": [1, 0]})
        (0.0, 0.5)
    """
    if set(better) != set(worse) or not better:
        raise ValueError(f"better has tasks {sorted(better)}, worse {sorted(worse)}; give the same non-empty tasks")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level must be in (0, 1) and resamples >= 1; got level={level}, resamples={resamples}")
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)  # [R] summed per-task mean differences
    for task in sorted(better):
        diff = np.asarray(better[task], dtype=np.float64) - np.asarray(worse[task], dtype=np.float64)  # [n]
        if diff.ndim != 1 or diff.size == 0 or len(better[task]) != len(worse[task]):
            raise ValueError(
                f"task {task!r}: {len(better[task])} vs {len(worse[task])} per-query values; give one per query, "
                "the same queries for both"
            )
        total += diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    low, high = np.quantile(total / len(better), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def main_scores(
    results: Mapping[str, Mapping[str, Any]], task_info: Mapping[str, Mapping[str, Any]]
) -> dict[str, float]:
    """task -> ``results[task][task_info[task]["metric"]]`` for every task of ``results`` in the registry."""
    out: dict[str, float] = {}
    for task, scores in results.items():
        if task not in task_info:
            raise ScoreFileError(f"results for task {task!r}, which is not in the task registry")
        metric = task_info[task].get("metric")
        if metric is None:
            raise ScoreFileError(f"task {task!r} has no 'metric' in its registry entry")
        if metric not in scores:
            raise ScoreFileError(f"task {task!r}: its main metric {metric!r} is not among its scores {list(scores)}")
        out[task] = scores[metric]
    return out


def summarize_tasks(
    results: Mapping[str, Mapping[str, Any]],
    task_info: Mapping[str, Mapping[str, Any]],
    *,
    group_keys: Sequence[str] = ("modality", "meta_task"),
    partial: bool = False,
    benchmark: str | None = None,
) -> dict[str, Any]:
    """Summary of per-task results over a task registry: the main metric ×100 per task and its aggregates.

    Args:
        results: task -> metrics as fractions (``{"hit@1": 0.8, …}``); the main one is ``task_info[t]["metric"]``.
        task_info: task -> ``{"modality", "meta_task", "metric", …}``; see :func:`aggregate`.

    Returns:
        ``{"benchmark", "unit": "percent", "partial", "overall", "<group key>": {…}, "counts", "missing",
        "group_keys", "tasks": {task: {"score", "metric", "<group key>": …}}}``; every score is ×100, unrounded.
    """
    scores = {t: 100.0 * v for t, v in main_scores(results, task_info).items()}
    agg = aggregate(scores, task_info, group_keys=group_keys, partial=partial)
    tasks = {
        t: {"score": scores[t], "metric": task_info[t]["metric"], **{k: task_info[t].get(k) for k in group_keys}}
        for t in task_info
        if t in scores
    }
    return {
        "benchmark": benchmark,
        "unit": "percent",
        "partial": bool(agg["missing"]),
        "overall": agg["overall"],
        **{key: agg[key] for key in group_keys},
        "counts": agg["counts"],
        "missing": agg["missing"],
        "group_keys": list(group_keys),
        "tasks": tasks,
    }


def summarize(score_file: str | Path, *, partial: bool = False, check_counts: bool = True) -> dict[str, Any]:
    """Summarize a leaderboard file: MMEB-V2 (published, or ``embedrl eval mmeb``'s), or our own benchmark's.

    An MMEB-V2 file (``metadata.benchmark`` absent or ``MMEB-V2``): 78 datasets, 13 sub-groups, 3 modalities and All
    (×100). The 13 sub-groups are ``summary["meta_task"]`` (9, VisDoc included) and ``summary["group"]`` (the 4
    VisDoc groups); :func:`sub_group_scores` merges them. Besides the :func:`summarize_tasks` keys, the summary has
    ``model_name``, ``file``, ``split_versions``, ``source_keys``, ``ignored`` and ``overall_without_ood`` (the mean
    over the 74 non-OOD datasets, for comparisons across page-set versions). A file that says it is partial
    (``metadata.partial``, as ``eval mmeb --tasks`` writes) is summarized as partial; one that records a query
    limit (``metadata.limit``, ``eval mmeb --limit N``) is read without the query-count check, and the summary
    carries ``limit``.

    A file of another benchmark (``metadata.benchmark``, e.g. ``embedrl-world`` from ``embedrl eval world``) is
    summarized over its own tasks by :func:`summarize_own_tasks`.

    Example:
        >>> s = summarize("tests/fixtures/scores/embed-rl-2b.json")  # doctest: +SKIP
        >>> round(s["overall"], 2), round(s["modality"]["visdoc"], 2)  # doctest: +SKIP
        (66.78, 74.06)
    """
    board = read_leaderboard(score_file)
    benchmark = board.metadata.get("benchmark") or "MMEB-V2"
    if benchmark != "MMEB-V2":
        return summarize_own_tasks(board)
    limit = board.metadata.get("limit") or 0
    selection = select_mmeb_v2(board, check_counts=check_counts and not limit)
    info = mmeb_v2_task_info()
    summary = summarize_tasks(
        selection.results,
        info,
        group_keys=MMEB_V2_GROUP_KEYS,
        partial=partial or bool(board.metadata.get("partial")),
        benchmark="MMEB-V2",
    )
    non_ood = [v["score"] for v in summary["tasks"].values() if v.get("group") != "OOD"]
    return {
        "benchmark": "MMEB-V2",
        "model_name": board.metadata.get("model_name"),
        "file": str(board.path),
        **{k: v for k, v in summary.items() if k != "benchmark"},
        "overall_without_ood": _mean(non_ood) if non_ood else None,
        "split_versions": selection.split_versions,
        "source_keys": selection.source_keys,
        "ignored": selection.ignored,
        **({"limit": limit} if limit else {}),
    }


def summarize_own_tasks(board: Leaderboard) -> dict[str, Any]:
    """Summarize a leaderboard of a benchmark other than MMEB-V2 (``embedrl eval world``'s ``leaderboard.json``).

    Its tasks are the file's entries, each of the modality of its block, scored by the main metric that
    ``metadata.main_metrics`` names for it; the summary (the :func:`summarize_tasks` keys plus ``model_name`` and
    ``file``) holds the main metric ×100 per task, per modality and overall, each a plain mean over tasks. The
    benchmark's tasks that were not evaluated (``metadata.missing``) make it partial. The file carries no meta-task
    of its tasks, so there are no meta-task means (``summary.json`` next to the file has them).
    """
    where = str(board.path or "leaderboard")
    benchmark = board.metadata.get("benchmark")
    main_metrics = board.metadata.get("main_metrics")
    results: dict[str, dict[str, Any]] = {}
    info: dict[str, dict[str, Any]] = {}
    for modality, block in board.metrics.items():
        for task, obj in block.items():
            if not isinstance(main_metrics, Mapping) or not isinstance(main_metrics.get(task), str):
                raise ScoreFileError(
                    f"{where}: metadata.main_metrics names no main metric for task {task!r}; a {benchmark} "
                    "leaderboard must map each task to its main metric (as embedrl eval world writes it)"
                )
            if task in results:
                raise ScoreFileError(f"{where}: task {task!r} is in metrics.{info[task]['modality']} and {modality}")
            results[task] = validate_score_object(obj, f"{where}: metrics.{modality}.{task}")
            info[task] = {"modality": modality, "metric": main_metrics[task]}
    summary = summarize_tasks(results, info, group_keys=("modality",), benchmark=benchmark)
    missing = list(board.metadata.get("missing") or [])
    return {
        "benchmark": benchmark,
        "model_name": board.metadata.get("model_name"),
        "file": str(board.path),
        **{k: v for k, v in summary.items() if k != "benchmark"},
        "partial": bool(missing),
        "missing": missing,
    }


def sub_group_scores(summary: Mapping[str, Any]) -> dict[str, float]:
    """The sub-group means of a summary, merged: ``meta_task`` values, then ``group`` values (MMEB-V2: 13)."""
    return {**summary.get("meta_task", {}), **summary.get("group", {})}


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------


def _aggregate_rows(summary: Mapping[str, Any]) -> list[tuple[str, int, float, bool]]:
    """(label, #tasks, score, is_total) rows: per modality its sub-groups then the modality, finally All."""
    tasks = summary["tasks"]
    sub_keys = [k for k in summary["group_keys"] if k != "modality"]
    rows: list[tuple[str, int, float, bool]] = []
    for modality, score in summary.get("modality", {}).items():
        label = MODALITY_LABELS.get(modality, modality)
        for key in sub_keys:
            for group, group_score in summary[key].items():
                members = {t.get("modality") for t in tasks.values() if t.get(key) == group}
                if members == {modality} and group.lower() != label.lower():
                    rows.append((group, summary["counts"][key][group], group_score, False))
        rows.append((label, summary["counts"]["modality"][modality], score, True))
    for key in sub_keys:  # groups spanning several modalities, or a registry without modalities
        for group, group_score in summary[key].items():
            if len({t.get("modality") for t in tasks.values() if t.get(key) == group}) != 1:
                rows.append((group, summary["counts"][key][group], group_score, False))
    rows.append((OVERALL_LABEL, summary["counts"]["overall"], summary["overall"], True))
    return rows


def format_summary(summary: Mapping[str, Any], decimals: int = 2) -> str:
    """A Markdown report of a summary: the aggregate table (sub-groups, modalities, All) and the per-task table."""
    title = " ".join(x for x in (summary.get("benchmark"), "summary") if x)
    if summary.get("model_name"):
        title += f": {summary['model_name']}"
    lines = [f"## {title}", "", "Main metric ×100; every aggregate is a plain mean over its tasks."]
    if summary.get("split_versions"):
        lines.append("Split versions: " + ", ".join(f"{k} {v}" for k, v in summary["split_versions"].items()) + ".")
    if summary.get("partial"):
        lines.append(f"**Partial result**: no score for {', '.join(summary['missing'])}.")
    if summary.get("limit"):
        lines.append(f"**Limited run**: at most {summary['limit']} queries per dataset; not comparable to full runs.")
    if summary.get("ignored"):
        lines.append(f"Ignored (not scored by the benchmark): {', '.join(summary['ignored'])}.")
    lines += ["", "| Aggregate | #tasks | Score |", "|---|---:|---:|"]
    for label, n, score, total in _aggregate_rows(summary):
        cell = f"{score:.{decimals}f}"
        lines.append(f"| **{label}** | {n} | **{cell}** |" if total else f"| {label} | {n} | {cell} |")
    if summary.get("overall_without_ood") is not None:
        lines.append(f"| {OVERALL_LABEL} without OOD | | {summary['overall_without_ood']:.{decimals}f} |")

    sub_keys = [k for k in summary["group_keys"] if k != "modality"]
    lines += ["", "| Task | Modality | Sub-group | Metric | Score |", "|---|---|---|---|---:|"]
    source_keys = summary.get("source_keys", {})
    for task, t in summary["tasks"].items():
        group = " / ".join(str(t[k]) for k in sub_keys if t.get(k) is not None)
        name = source_keys.get(task, task)
        modality = MODALITY_LABELS.get(t.get("modality"), t.get("modality") or "")
        lines.append(f"| {name} | {modality} | {group} | {t['metric']} | {t['score']:.{decimals}f} |")
    return "\n".join(lines) + "\n"
