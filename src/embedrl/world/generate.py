"""The synthetic multimodal world: the embedded default data of embedrl (``embedrl world generate``).

:func:`generate_world` writes, deterministically from ``cfg.seed`` (byte-identical files for the same seed)::

    DIR/world.json             resolved WorldConfig, format version, sizes and counts
    DIR/train.jsonl            contrastive training pairs (Pair schema), teacher T-CoTs on both sides
    DIR/rl.jsonl               harder pairs for EG-RL (more objects, more near-copies), disjoint from train
    DIR/discrimination.jsonl   labelled listwise examples: anchor T-CoT, shuffled candidate T-CoTs, label
    DIR/eval/manifest.json     the evaluation suite: one entry per task (meta-task, metric, local/global, counts)
    DIR/eval/<task>/queries.jsonl, candidates.jsonl (local) or corpus.jsonl (global); every item carries the teacher's
                               T-CoT and, in ``meta["oracle_tcot"]``, the noise-free one (format 2 on)
    DIR/media/xx/<sha1>.png    every image and video frame, content-addressed (identical pixels stored once)

``docs/data.md`` documents every field. :func:`world_stats` counts what was written, measures the teacher's
imperfection rates and draws a contact sheet; :func:`load_eval_task` reads one evaluation task back, its items
carrying the teacher's T-CoTs or the oracle's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from embedrl import __version__
from embedrl.config import WorldConfig, save_config
from embedrl.data.schema import Item, Pair, read_jsonl, write_jsonl, write_pairs
from embedrl.eval.task import EvalError, EvalTask
from embedrl.world.scenes import Clip, Crop, MediaSpec, Page, Scene, crop_box, default_font, render_media
from embedrl.world.tasks import (
    EVAL_LEVEL,
    RL_LEVEL,
    TASKS,
    TRAIN_LEVEL,
    Example,
    GenerationError,
    Geometry,
    Level,
    Side,
    TaskSpec,
)
from embedrl.world.teacher import NOISE_KINDS, discrimination_example, write_oracle_tcot, write_tcot

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: evaluation items carry their oracle T-CoT (ORACLE_TCOT)
ORACLE_FORMAT = 2  # the first format whose evaluation items carry ORACLE_TCOT
ORACLE_TCOT = "oracle_tcot"  # meta key of an evaluation item's noise-free T-CoT (teacher.write_oracle_tcot)
StoredTCoTs = Literal["teacher", "oracle"]
STORED_TCOTS: tuple[str, ...] = ("teacher", "oracle")
WORLD_FILE = "world.json"
TRAIN_FILE, RL_FILE, DISCRIMINATION_FILE = "train.jsonl", "rl.jsonl", "discrimination.jsonl"
EVAL_DIR, MANIFEST_FILE, MEDIA_DIR = "eval", "manifest.json", "media"
CONTACT_SHEET = "contact_sheet.png"
MAX_ATTEMPTS = 50  # re-draws of an example whose (query, positive) was already used in another split


@dataclass(frozen=True)
class WorldSizes:
    """How much of each split ``--size`` asks for (per dataset / per task)."""

    train_per_dataset: int
    rl_per_dataset: int
    eval_queries: int


SIZES: dict[str, WorldSizes] = {
    "tiny": WorldSizes(train_per_dataset=14, rl_per_dataset=4, eval_queries=10),
    "small": WorldSizes(train_per_dataset=140, rl_per_dataset=30, eval_queries=50),
    "default": WorldSizes(train_per_dataset=450, rl_per_dataset=90, eval_queries=100),
}


def geometry(cfg: WorldConfig) -> Geometry:
    cell = cfg.image_size // cfg.grid
    return Geometry(cfg.grid, cell, cfg.frame_size // cell, cfg.num_frames, cfg.page_size)


# ----------------------------------------------------------------------------------------------------------------
# Media
# ----------------------------------------------------------------------------------------------------------------


class MediaStore:
    """Renders media specs into content-addressed PNGs under ``root/media``; identical pixels are written once."""

    def __init__(self, root: Path, geo: Geometry) -> None:
        self.root, self.geo = root, geo
        self._by_spec: dict[MediaSpec, tuple[str, ...]] = {}
        self._written: set[str] = set()

    def paths(self, spec: MediaSpec) -> tuple[str, ...]:
        """Paths relative to the world directory: one for an image, one per frame for a clip."""
        if spec not in self._by_spec:
            pixels = render_media(spec, self.geo.cell, self.geo.page_size)
            arrays = pixels if isinstance(pixels, list) else [pixels]
            self._by_spec[spec] = tuple(self._png(a) for a in arrays)
        return self._by_spec[spec]

    def _png(self, pixels: np.ndarray) -> str:
        digest = hashlib.sha1(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()[:20]
        rel = f"{MEDIA_DIR}/{digest[:2]}/{digest}.png"
        if rel not in self._written:
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, format="PNG", compress_level=6)
            self._written.add(rel)
        return rel

    @property
    def num_files(self) -> int:
        return len(self._written)


def _object_record(obj: Any, box: Any) -> dict[str, Any]:
    return {"shape": obj.shape, "colour": obj.colour, "size": obj.size, "pattern": obj.pattern, "box": list(box)}


def ground_truth(side: Side, geo: Geometry) -> dict[str, Any]:
    """The item's ground truth for ``meta["gt"]``: evidence boxes (0-1000), decisive frames (0-based), keywords,
    and a description of its media (objects with their boxes, events, page content, pixel sizes)."""
    view, media = side.view, side.media
    gt: dict[str, Any] = {}
    if view.boxes:
        gt["boxes"] = [list(b) for b in view.boxes]
    if view.frames:
        gt["frames"], gt["num_frames"] = list(view.frames), view.num_frames
    if view.keywords:
        gt["keywords"] = list(view.keywords)
    if isinstance(media, Scene):
        gt["objects"] = [_object_record(o, o.box(media.grid)) for o in media.objects]
        gt["image_size"] = [media.grid * geo.cell] * 2
    elif isinstance(media, Crop):
        gt["objects"] = [_object_record(media.obj, crop_box(media, geo.cell))]
        gt["image_size"] = [2 * geo.cell] * 2
    elif isinstance(media, Clip):
        gt["objects"] = [_object_record(o, o.box(media.scene.grid)) for o in media.scene.objects]
        gt["events"] = [{"object": e.index, "kind": e.kind, "frames": list(e.frames)} for e in media.events]
        gt["frame_size"] = [media.scene.grid * geo.cell] * 2
    elif isinstance(media, Page):
        gt["page"] = {"topic": media.topic, "lines": list(media.lines), "table": [list(e) for e in media.table]}
        gt["image_size"] = [geo.page_size] * 2
    return gt


def _brief(item: Item) -> dict[str, Any]:
    return {"id": item.id, "text": item.text, "instruction": item.instruction, "tcot": item.tcot}


def _content(item: Item) -> tuple[Any, ...]:
    return (item.text, item.instruction, item.images, item.frames)


# ----------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Builder:
    """Turns examples into items (media written, teacher T-CoTs attached) and keeps the splits disjoint."""

    cfg: WorldConfig
    geo: Geometry
    store: MediaStore
    seen: set[Any] = field(default_factory=set)

    def example(self, task: TaskSpec, split: str, index: int, level: Level, k: int) -> Example:
        """A fresh example whose (query, positive) no other split has used."""
        for attempt in range(MAX_ATTEMPTS):
            rng = random.Random(f"{self.cfg.seed}/{split}/{task.name}/{index}/{attempt}")
            example = task.make(rng, self.geo, level, k)
            key = (task.name, example.query.key, example.positive.key)
            if key not in self.seen:
                self.seen.add(key)
                return example
        raise GenerationError(f"{task.name}: no unused example after {MAX_ATTEMPTS} attempts (split {split})")

    def item(self, item_id: str, side: Side, task: str, split: str, prefix: str = "") -> Item:
        """Write the side's media and its teacher T-CoT; media paths get ``prefix`` (relative to the JSONL)."""
        media = tuple(prefix + p for p in self.store.paths(side.media)) if side.media is not None else ()
        is_video = isinstance(side.media, Clip)
        teacher = write_tcot(side.view, self.cfg.teacher, random.Random(f"{self.cfg.seed}/teacher/{item_id}"))
        meta: dict[str, Any] = {
            "task": task,
            "split": split,
            "gt": ground_truth(side, self.geo),
            "tcot_provenance": teacher.provenance(),
        }
        if "question_type" in side.info:
            meta["question_type"] = side.info["question_type"]
        if split == "eval":
            meta[ORACLE_TCOT] = write_oracle_tcot(side.view).text
        images, frames = ((), media) if is_video else (media, ())
        return Item(item_id, side.text, side.instruction, images, frames, teacher.text, meta)

    def pairs(self, split: str, level: Level, per_dataset: int, k: int) -> list[tuple[Pair, Example]]:
        out = []
        for task in TASKS.values():
            for i in range(per_dataset):
                example = self.example(task, split, i, level, k)
                pair_id = f"{task.name}/{split}/{i:05d}"
                query = self.item(f"{pair_id}/query", example.query, task.name, split)
                target = self.item(f"{pair_id}/target", example.positive, task.name, split)
                out.append((Pair(task.name, pair_id, query, target), example))
        return out

    def discrimination(self, rl: list[tuple[Pair, Example]]) -> list[dict[str, Any]]:
        """Both directions per RL pair: query -> (target + task negatives), target -> (query + other queries)."""
        by_dataset: dict[str, list[Pair]] = defaultdict(list)
        for pair, _ in rl:
            by_dataset[pair.dataset].append(pair)
        records = []
        for pair, example in rl:
            rng = random.Random(f"{self.cfg.seed}/discrimination/{pair.pair_id}")
            negatives = []
            for j, side in enumerate(example.negatives):
                neg_id = f"{pair.pair_id}/negative/{j}"
                out = write_tcot(side.view, self.cfg.teacher, random.Random(f"{self.cfg.seed}/teacher/{neg_id}"))
                negatives.append({"id": neg_id, "text": side.text, "instruction": side.instruction, "tcot": out.text})
            records.append(
                discrimination_example(
                    f"{pair.pair_id}/query_to_target",
                    pair.dataset,
                    "query_to_target",
                    _brief(pair.query),
                    _brief(pair.target),
                    negatives,
                    rng,
                )
            )
            # Other queries of the dataset; skip any that would also match this target (same text or same target).
            others = [
                p
                for p in by_dataset[pair.dataset]
                if p.pair_id != pair.pair_id
                and _content(p.query) != _content(pair.query)
                and _content(p.target) != _content(pair.target)
            ]
            chosen = rng.sample(others, min(self.cfg.discrimination_negatives, len(others)))
            if chosen:
                records.append(
                    discrimination_example(
                        f"{pair.pair_id}/target_to_query",
                        pair.dataset,
                        "target_to_query",
                        _brief(pair.target),
                        _brief(pair.query),
                        [_brief(p.query) for p in chosen],
                        rng,
                    )
                )
        return records


# ----------------------------------------------------------------------------------------------------------------
# Evaluation suite
# ----------------------------------------------------------------------------------------------------------------


def _modality(items: list[Item]) -> str:
    """``image``, ``text``, ``video`` or ``image+text``/``video+text`` (text alongside media)."""
    kinds = sorted({it.modality + ("+text" if it.text and it.modality != "text" else "") for it in items})
    return "|".join(kinds)


def _eval_task(builder: _Builder, task: TaskSpec, out: Path, n_queries: int) -> dict[str, Any]:
    """Write one task's queries and candidates (local) or corpus (global); return its manifest entry."""
    task_dir = out / EVAL_DIR / task.name
    prefix = "../../"  # media paths are relative to the JSONL file's directory
    local = task.eval_type == "local"
    k = builder.cfg.eval_candidates - 1 if local else task.siblings
    examples = [builder.example(task, "eval", i, EVAL_LEVEL, k) for i in range(n_queries)]
    queries = [
        builder.item(f"{task.name}/query/{i:04d}", ex.query, task.name, "eval", prefix)
        for i, ex in enumerate(examples)
    ]
    pool: dict[Any, tuple[Item, Side]] = {}

    def cand_id(side: Side) -> str:
        if side.key not in pool:
            cid = f"{task.name}/cand/{len(pool):05d}"
            pool[side.key] = (builder.item(cid, side, task.name, "eval", prefix), side)
        return pool[side.key][0].id

    rows = []
    if local:
        for ex, query in zip(examples, queries, strict=True):
            ids = [cand_id(s) for s in (ex.positive, *ex.negatives)]
            rows.append({"query": query.to_record(), "candidates": ids, "positives": [ids[0]], "qrels": {ids[0]: 1}})
    else:
        fixed = task.corpus(random.Random(f"{builder.cfg.seed}/eval/{task.name}/corpus")) if task.corpus else []
        for side in [*fixed, *(s for ex in examples for s in (ex.positive, *ex.negatives))]:
            cand_id(side)
        rows = [_global_row(task, ex, query, pool) for ex, query in zip(examples, queries, strict=True)]
    write_jsonl(task_dir / "queries.jsonl", rows)
    pool_file = "candidates.jsonl" if local else "corpus.jsonl"
    write_jsonl(task_dir / pool_file, (item.to_record() for item, _ in pool.values()))
    per_query = [len(r["candidates"]) for r in rows] if local else [len(pool)]
    return {
        "meta_task": task.meta_task,
        "modality": task.modality,
        "query_modality": _modality(queries),
        "candidate_modality": _modality([item for item, _ in pool.values()]),
        "metric": task.metric,
        "eval_type": task.eval_type,
        "num_queries": len(rows),
        "num_candidates": min(per_query),
        "pool_size": len(pool),
        "graded": any(g > 1 for r in rows for g in r["qrels"].values()),
        "files": {
            "queries": f"{task.name}/queries.jsonl",
            "candidates" if local else "corpus": f"{task.name}/{pool_file}",
        },
        "description": task.description,
    }


def _global_row(task: TaskSpec, ex: Example, query: Item, pool: dict[Any, tuple[Item, Side]]) -> dict[str, Any]:
    """Relevance of every corpus item to this query, from the task's grading predicate."""
    assert task.grade is not None
    qrels = {item.id: g for item, side in pool.values() if (g := task.grade(ex.semantics, side)) > 0}
    best = max(qrels.values(), default=0)
    positive_id = pool[ex.positive.key][0].id
    if qrels.get(positive_id, 0) != best or best == 0:
        raise GenerationError(f"{query.id}: its positive {positive_id} is not among the most relevant items")
    return {
        "query": query.to_record(),
        "positives": [cid for cid, g in qrels.items() if g == best],
        "qrels": qrels,
    }


def _eval_suite(builder: _Builder, out: Path, n_queries: int) -> dict[str, Any]:
    tasks = {name: _eval_task(builder, task, out, n_queries) for name, task in TASKS.items()}
    manifest = {"format_version": FORMAT_VERSION, "seed": builder.cfg.seed, "tasks": tasks}
    path = out / EVAL_DIR / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------


def _prepare(out: Path) -> None:
    """Refuse to write into a non-empty directory that is not a world; clear an old world's files."""
    if out.exists() and any(out.iterdir()):
        if not (out / WORLD_FILE).is_file():
            raise FileExistsError(f"{out} is not empty and holds no {WORLD_FILE}; choose a new --out or empty it")
        for sub in (MEDIA_DIR, EVAL_DIR):
            if (out / sub).exists():
                shutil.rmtree(out / sub)
        for name in (WORLD_FILE, TRAIN_FILE, RL_FILE, DISCRIMINATION_FILE, CONTACT_SHEET):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def generate_world(cfg: WorldConfig) -> Path:
    """Write the world described by ``cfg`` into ``cfg.out`` and return that directory.

    Example:
        >>> from embedrl.config import WorldConfig
        >>> out = generate_world(WorldConfig(out="runs/world", seed=0, size="tiny"))  # doctest: +SKIP
    """
    start = time.perf_counter()
    out = Path(cfg.out)
    _prepare(out)
    sizes = SIZES[cfg.size]
    builder = _Builder(cfg, geometry(cfg), MediaStore(out, geometry(cfg)))
    train = builder.pairs("train", TRAIN_LEVEL, sizes.train_per_dataset, 0)
    write_pairs(out / TRAIN_FILE, (p for p, _ in train))
    rl = builder.pairs("rl", RL_LEVEL, sizes.rl_per_dataset, cfg.discrimination_negatives)
    write_pairs(out / RL_FILE, (p for p, _ in rl))
    n_disc = write_jsonl(out / DISCRIMINATION_FILE, builder.discrimination(rl))
    manifest = _eval_suite(builder, out, sizes.eval_queries)
    counts = {
        "train_pairs": len(train),
        "rl_pairs": len(rl),
        "discrimination_examples": n_disc,
        "eval_tasks": len(manifest["tasks"]),
        "media_files": builder.store.num_files,
    }
    path = save_config(cfg, out, filename=WORLD_FILE)
    payload = json.loads(path.read_text())
    payload.update(
        {
            "format_version": FORMAT_VERSION,
            "generator": f"embedrl {__version__}",
            "seed": cfg.seed,
            "size": cfg.size,
            "sizes": vars(sizes),
            "datasets": list(TASKS),
            "counts": counts,
        }
    )
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    logger.info("world (%s, seed %d): %s in %.1f s", cfg.size, cfg.seed, counts, time.perf_counter() - start)
    return out


def check_oracle_tcots(world_dir: str | Path, manifest: Mapping[str, Any]) -> None:
    """Raise :class:`EvalError` unless the world whose ``eval/manifest.json`` is ``manifest`` stores oracle T-CoTs
    (format :data:`ORACLE_FORMAT` on)."""
    version = manifest.get("format_version", 1)
    if version < ORACLE_FORMAT:
        raise EvalError(
            f"{world_dir} is a format-{version} world, which stores no oracle T-CoTs (format {ORACLE_FORMAT} on); "
            "regenerate it with `embedrl world generate` (its seed, size and teacher settings give the same items)"
        )


def load_eval_task(world_dir: str | Path, name: str, tcots: StoredTCoTs = "teacher") -> EvalTask:
    """Read ``DIR/eval/<name>``; media paths resolve to files under ``DIR``.

    ``tcots``: which stored T-CoT the items carry in ``tcot``: ``teacher`` (as written, with the teacher's
    imperfections) or ``oracle`` (``meta["oracle_tcot"]``, noise-free; an item without one raises
    :class:`EvalError`).
    """
    if tcots not in STORED_TCOTS:
        raise EvalError(f"tcots={tcots!r}; use one of {STORED_TCOTS}")
    eval_dir = Path(world_dir) / EVAL_DIR
    info = json.loads((eval_dir / MANIFEST_FILE).read_text())["tasks"][name]
    task_dir = eval_dir / name

    def item(record: dict[str, Any]) -> Item:
        it = Item.from_record(record, task_dir)
        if tcots == "teacher":
            return it
        if ORACLE_TCOT not in it.meta:
            raise EvalError(
                f"{it.id} in {world_dir} has no {ORACLE_TCOT} (worlds store it from format {ORACLE_FORMAT} on): "
                "regenerate the world with `embedrl world generate`"
            )
        return it.with_tcot(it.meta[ORACLE_TCOT])

    pool_file = info["files"].get("candidates") or info["files"]["corpus"]
    pool = {it.id: it for it in (item(r) for r in read_jsonl(eval_dir / pool_file))}
    rows = list(read_jsonl(eval_dir / info["files"]["queries"]))
    return EvalTask(
        name=name,
        info=info,
        queries=[item(r["query"]) for r in rows],
        pool=pool,
        candidates=[r["candidates"] for r in rows] if info["eval_type"] == "local" else None,
        qrels=[{k: int(v) for k, v in r["qrels"].items()} for r in rows],
        positives=[r["positives"] for r in rows],
    )


# ----------------------------------------------------------------------------------------------------------------
# Statistics and contact sheet
# ----------------------------------------------------------------------------------------------------------------


def _record_modality(rec: dict[str, Any]) -> str:
    media = "video" if rec.get("frames") else "image" if rec.get("images") else ""
    return "+".join(m for m in (media, "text" if rec.get("text") else "") if m) or "text"


def _eval_records(root: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    records = []
    for info in manifest["tasks"].values():
        records += [row["query"] for row in read_jsonl(root / EVAL_DIR / info["files"]["queries"])]
        pool_file = info["files"].get("candidates") or info["files"]["corpus"]
        records += list(read_jsonl(root / EVAL_DIR / pool_file))
    return records


def evidence_accuracy(
    cues: Iterable[tuple[str | None, Sequence[str], Sequence[Sequence[int]], Sequence[int], Mapping[str, Any]]],
) -> dict[str, Any]:
    """How well evidence cues match the ground truth, over ``(cue_key, keywords, boxes, frames, gt)`` of many T-CoTs.

    ``cue_key`` is the cue the item asks for (``text_keywords``, ``bbox_2d`` or ``key_frames``); ``keywords``,
    ``boxes`` and ``frames`` (0-based) are what a T-CoT gave; ``gt`` is the item's ``meta.gt``. Returns
    ``keyword_precision`` / ``keyword_recall`` (given keywords that are true ones, case-folded; true ones given),
    ``box_exact_rate`` (share of given boxes equal to a ground-truth box), ``key_frame_precision`` (share of given
    frames that are decisive) and ``key_frame_recall`` (share of decisive frames given), each None without a case,
    and the counts behind them. Keywords come from text, boxes and frames from pixels: the first pair measures what a
    Reasoner copies or drops, the others what it perceives.
    """
    keywords = keyword_hits = true_keywords = boxes = box_hits = picked = picked_hits = decisive = 0
    for cue_key, given_keywords, given_boxes, given_frames, gt in cues:
        if cue_key == "text_keywords":
            truth_words = {w.casefold() for w in gt.get("keywords", [])}
            given_words = {w.casefold() for w in given_keywords}
            keywords += len(given_words)
            keyword_hits += len(truth_words & given_words)
            true_keywords += len(truth_words)
        elif cue_key == "bbox_2d":
            truth = {tuple(b) for b in gt.get("boxes", [])}
            boxes += len(given_boxes)
            box_hits += sum(tuple(b) in truth for b in given_boxes)
        elif cue_key == "key_frames":
            truth_frames = set(gt.get("frames", []))
            picked += len(set(given_frames))
            picked_hits += len(truth_frames & set(given_frames))
            decisive += len(truth_frames)
    return {
        "keyword_precision": keyword_hits / keywords if keywords else None,
        "keyword_recall": keyword_hits / true_keywords if true_keywords else None,
        "box_exact_rate": box_hits / boxes if boxes else None,
        "key_frame_precision": picked_hits / picked if picked else None,
        "key_frame_recall": picked_hits / decisive if decisive else None,
        "keywords": keywords,
        "boxes": boxes,
        "frames_given": picked,
        "frames_decisive": decisive,
    }


def teacher_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Measured imperfection rates (applied / applicable) and evidence accuracy of the teacher's T-CoTs."""
    applicable: Counter[str] = Counter()
    applied: Counter[str] = Counter()
    for rec in records:
        prov = rec["meta"]["tcot_provenance"]
        applicable.update(prov["noise_applicable"])
        applied.update(prov["noise_applied"])
    provenance = [(rec["meta"]["tcot_provenance"], rec["meta"]["gt"]) for rec in records]
    evidence = evidence_accuracy(
        (p["cue_key"], p.get("keywords", []), p.get("boxes", []), p.get("frames", []), gt) for p, gt in provenance
    )
    rates = {
        kind: {
            "applicable": applicable[kind],
            "applied": applied[kind],
            "rate": applied[kind] / applicable[kind] if applicable[kind] else None,
        }
        for kind in NOISE_KINDS
    }
    return {
        "tcots": len(records),
        "imperfections": rates,
        "keyword_precision": evidence["keyword_precision"],
        "box_exact_rate": evidence["box_exact_rate"],
        "key_frame_precision": evidence["key_frame_precision"],
        "key_frame_recall": evidence["key_frame_recall"],
    }


def world_stats(directory: str | Path, contact_sheet: bool = True) -> dict[str, Any]:
    """Counts per split, dataset, task and modality; measured teacher rates; optionally ``contact_sheet.png``."""
    root = Path(directory)
    if not (root / WORLD_FILE).is_file():
        raise FileNotFoundError(f"{root} holds no {WORLD_FILE}; run `embedrl world generate --out {root}` first")
    info = json.loads((root / WORLD_FILE).read_text())
    splits = {name: list(read_jsonl(root / fname)) for name, fname in (("train", TRAIN_FILE), ("rl", RL_FILE))}
    manifest = json.loads((root / EVAL_DIR / MANIFEST_FILE).read_text())
    discrimination = list(read_jsonl(root / DISCRIMINATION_FILE))
    pairs = {name: dict(sorted(Counter(r["dataset"] for r in recs).items())) for name, recs in splits.items()}
    modalities = {
        r["dataset"]: f"{_record_modality(r['query'])} -> {_record_modality(r['target'])}" for r in splits["train"]
    }
    items = [side for recs in splits.values() for r in recs for side in (r["query"], r["target"])]
    eval_items = _eval_records(root, manifest)
    media = [p for p in (root / MEDIA_DIR).rglob("*.png")]
    stats: dict[str, Any] = {
        "world": {k: info[k] for k in ("format_version", "seed", "size", "sizes")},
        "configured_noise": info["config"]["teacher"],
        "pairs": pairs,
        "pair_modalities": modalities,
        "eval": manifest["tasks"],
        "discrimination": {
            "examples": len(discrimination),
            "by_direction": dict(sorted(Counter(d["direction"] for d in discrimination).items())),
            "mean_candidates": float(np.mean([len(d["candidates"]) for d in discrimination]))
            if discrimination
            else 0.0,
        },
        "teacher": {"train_rl": teacher_stats(items), "eval": teacher_stats(eval_items)},
        "media": {"files": len(media), "bytes": sum(p.stat().st_size for p in media)},
    }
    if contact_sheet:
        stats["contact_sheet"] = str(draw_contact_sheet(root, splits["train"]))
    return stats


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_world_stats(stats: dict[str, Any]) -> str:
    """A plain-text summary of :func:`world_stats`."""
    w = stats["world"]
    lines = [
        f"world: size {w['size']}, seed {w['seed']}, format {w['format_version']}",
        "",
        f"{'dataset':<18} {'train':>6} {'rl':>5}  modality",
    ]
    for name, n in stats["pairs"]["train"].items():
        lines.append(f"{name:<18} {n:>6} {stats['pairs']['rl'].get(name, 0):>5}  {stats['pair_modalities'][name]}")
    lines += [
        "",
        f"{'eval task':<18} {'meta':<7} {'type':<6} {'metric':<14} {'queries':>7} {'cands':>6} {'pool':>5}"
        "  query -> candidate",
    ]
    for name, t in stats["eval"].items():
        lines.append(
            f"{name:<18} {t['meta_task']:<7} {t['eval_type']:<6} {t['metric']:<14} {t['num_queries']:>7} "
            f"{t['num_candidates']:>6} {t['pool_size']:>5}  {t['query_modality']} -> {t['candidate_modality']}"
        )
    d = stats["discrimination"]
    lines += [
        "",
        f"discrimination: {d['examples']} examples {d['by_direction']}, {d['mean_candidates']:.1f} candidates each",
        "",
    ]
    for part, t in stats["teacher"].items():
        lines.append(
            f"teacher ({part}, {t['tcots']} T-CoTs): keyword precision {_rate(t['keyword_precision'])}, box exact "
            f"{_rate(t['box_exact_rate'])}, key-frame "
            f"precision {_rate(t['key_frame_precision'])}, recall {_rate(t['key_frame_recall'])}"
        )
        for kind, r in t["imperfections"].items():
            lines.append(
                f"  {kind:<19} {r['applied']:>6} / {r['applicable']:<6} = {_rate(r['rate'])}"
                f"  (configured {stats['configured_noise'][kind]:.2f})"
            )
    lines += ["", f"media: {stats['media']['files']} PNG files, {stats['media']['bytes'] / 1e6:.1f} MB"]
    if "contact_sheet" in stats:
        lines.append(f"contact sheet: {stats['contact_sheet']}")
    return "\n".join(lines)


def _text_tile(text: str, width: int, height: int) -> Image.Image:
    tile = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(tile)
    chars = max(8, (width - 8) // 6)
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > chars:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    for i, ln in enumerate(lines[: height // 12]):
        draw.text((4, 2 + 12 * i), ln, font=default_font(), fill=(0, 0, 0))
    return tile


def _media_tile(root: Path, rec: dict[str, Any]) -> Image.Image:
    """An item's media with its teacher evidence in red (boxes, key frames) and ground truth in green."""
    prov, gt = rec["meta"]["tcot_provenance"], rec["meta"]["gt"]
    if rec["frames"]:
        frames = [Image.open(root / p).convert("RGB") for p in rec["frames"]]
        side = frames[0].width
        strip = Image.new("RGB", (len(frames) * (side + 6), side + 10), "white")
        draw = ImageDraw.Draw(strip)
        for i, frame in enumerate(frames):
            x = i * (side + 6) + 3
            strip.paste(frame, (x, 3))
            if i in prov.get("frames", []):
                draw.rectangle((x - 2, 1, x + side + 1, side + 4), outline=(220, 0, 0), width=2)
            if i in gt.get("frames", []):
                draw.line((x, side + 7, x + side, side + 7), fill=(0, 170, 0), width=2)
        return strip
    if rec["images"]:
        image = Image.open(root / rec["images"][0]).convert("RGB").resize((128, 128), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(image)
        for boxes, colour, inset in ((gt.get("boxes", []), (0, 170, 0), 1), (prov.get("boxes", []), (220, 0, 0), 0)):
            for x1, y1, x2, y2 in boxes:
                draw.rectangle(
                    (
                        x1 * 128 // 1000 + inset,
                        y1 * 128 // 1000 + inset,
                        x2 * 128 // 1000 - 1 - inset,
                        y2 * 128 // 1000 - 1 - inset,
                    ),
                    outline=colour,
                )
        return image
    return _text_tile(rec["text"], 160, 128)


def draw_contact_sheet(root: Path, train: list[dict[str, Any]]) -> Path:
    """``contact_sheet.png``: the first training pair of every dataset, query then target, evidence drawn."""
    firsts: dict[str, dict[str, Any]] = {}
    for rec in train:
        firsts.setdefault(rec["dataset"], rec)
    rows = []
    for dataset, rec in firsts.items():
        label = _text_tile(
            f"{dataset}: {rec['query']['instruction']} {rec['query']['text']} => {rec['target']['text']}", 240, 128
        )
        rows.append([label, _media_tile(root, rec["query"]), _media_tile(root, rec["target"])])
    widths = [max(r[i].width for r in rows) for i in range(3)]
    heights = [max(t.height for t in r) + 8 for r in rows]
    sheet = Image.new("RGB", (sum(widths) + 24, sum(heights) + 4), (240, 240, 240))
    y = 4
    for row, h in zip(rows, heights, strict=True):
        x = 4
        for tile, w in zip(row, widths, strict=True):
            sheet.paste(tile, (x, y))
            x += w + 8
        y += h
    path = root / CONTACT_SHEET
    sheet.save(path, format="PNG")
    return path
