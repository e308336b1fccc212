"""Training-data converters: MMEB-train, LLaVA-Hound, ViDoRe and VisRAG rows -> the project's pairs JSONL.

Reference: docs/method.md §5.1 (sources and caps), §5.7 (weights, the classification sets kept out of the contrastive
set);
docs/data.md §7 documents the input folders and the output. Each configured dataset (``ConvertConfig.datasets``)
becomes ``<out>/<dataset>.jsonl`` (:class:`~embedrl.data.schema.Pair` records; media paths relative to ``<out>``), and
``<out>/convert.json`` records per dataset its source, cap, weight, contrastive flag, rows available, pairs written
and skipped rows.

Input folders (each a local copy of the hub dataset, rows exported as JSONL / JSON / Parquet):

- ``mmeb_train``: ``<subset>/train.*`` rows with ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``
  (TIGER-Lab/MMEB-train); image paths relative to the folder.
- ``llava_hound``: ``video_caption.*`` and ``video_qa.*`` rows ``{"id", "video", "conversations": [{"from": "human",
  "value": ...}, {"from": "gpt", "value": ...}]}``; frames under ``frames/<video>/``. Caption rows give the caption
  retrieval (video -> caption) and video retrieval (caption -> video) sets, QA rows the video QA set.
- ``vidore`` / ``visrag``: ``train.*`` rows with ``query`` and ``image`` (a ``{"bytes", "path"}`` struct, written to
  ``<out>/media/<dataset>/`` on first use, or ``image_filename``/``image`` as a path relative to the folder).

Sampling down to a cap is uniform without replacement with a fixed seed, in source order; smaller datasets are
used in full.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from embedrl import __version__
from embedrl.config import ConvertConfig, ConvertDataset, config_to_dict, save_config
from embedrl.data.frames import sample_frames
from embedrl.data.rows import BadRows, RowError, find_rows_file, media_file, read_rows, require, save_image_bytes
from embedrl.data.schema import Item, Pair
from embedrl.prompts import TRAIN_INSTRUCTIONS, join_task_text

__all__ = ["CONVERTERS", "convert", "convert_dataset"]

logger = logging.getLogger(__name__)

MANIFEST = "convert.json"
# A converter yields (row reference, query, target) for every usable row of one dataset.
Converted = tuple[str, Item, Item]


def _rel_media(paths: list[Path], out_dir: Path) -> list[str]:
    return [os.path.relpath(p.resolve(), out_dir.resolve()) for p in paths]


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------


def _mmeb_train(root: Path, spec: ConvertDataset, name: str, ctx: _Context) -> Iterator[Converted]:
    rows_file = find_rows_file(root / spec.subset, "train")
    ctx.files.append(str(rows_file))
    for lineno, row in read_rows(rows_file):
        with ctx.bad.guard():
            require(row, ("qry", "qry_image_path", "pos_text", "pos_image_path"), rows_file, lineno)
            query = Item(
                text=join_task_text("", str(row["qry"])),
                images=tuple(media_file(root, str(row["qry_image_path"] or ""), rows_file, lineno, "query image")),
            )
            target = Item(
                text=join_task_text("", str(row["pos_text"])),
                images=tuple(media_file(root, str(row["pos_image_path"] or ""), rows_file, lineno, "target image")),
            )
            if not (query.text or query.images) or not (target.text or target.images):
                raise RowError(rows_file, lineno, "the query or the target has neither text nor image")
            yield f"{rows_file.name}:{lineno}", query, target


def _conversation(row: dict[str, Any], rows_file: Path, lineno: int) -> tuple[str, str]:
    turns = row["conversations"]
    if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
        raise RowError(rows_file, lineno, "conversations must hold a human turn and a gpt turn")
    human, gpt = (str(t.get("value") or "") for t in turns[:2])
    human = join_task_text("", human)
    if not human or not gpt.strip():
        raise RowError(rows_file, lineno, "an empty human or gpt turn")
    return human, gpt.strip()


def _llava_hound(root: Path, spec: ConvertDataset, name: str, ctx: _Context) -> Iterator[Converted]:
    stem = "video_qa" if spec.subset == "video_qa" else "video_caption"
    rows_file = find_rows_file(root, stem)
    ctx.files.append(str(rows_file))
    caption_q, caption_t, retrieval_q, qa_q = (
        TRAIN_INSTRUCTIONS[k]
        for k in ("video_caption_query", "caption_target", "video_retrieval_query", "video_qa_query")
    )
    for lineno, row in read_rows(rows_file):
        with ctx.bad.guard():
            require(row, ("video", "conversations"), rows_file, lineno)
            human, gpt = _conversation(row, rows_file, lineno)
            try:
                frames = tuple(
                    sample_frames(root / "frames" / str(Path(str(row["video"])).with_suffix("")), ctx.num_frames)
                )
            except FileNotFoundError as err:
                raise RowError(rows_file, lineno, str(err)) from None
            video = Item(frames=frames)
            if spec.subset == "caption_retrieval":
                query = Item(instruction=caption_q, frames=frames)
                target = Item(instruction=caption_t, text=gpt)
            elif spec.subset == "video_retrieval":
                query = Item(instruction=retrieval_q, text=gpt)
                target = Item(instruction=TRAIN_INSTRUCTIONS["video_target"], frames=video.frames)
            elif spec.subset == "video_qa":
                query = Item(instruction=qa_q, text=human, frames=frames)
                target = Item(instruction=TRAIN_INSTRUCTIONS["answer_target"], text=gpt)
            else:
                raise ValueError(
                    f"{name}: llava_hound subset {spec.subset!r} is not caption_retrieval, video_retrieval or video_qa"
                )
            yield f"{rows_file.name}:{lineno}", query, target


def _page(root: Path, row: dict[str, Any], name: str, rows_file: Path, lineno: int, ctx: _Context) -> Path:
    """The row's page image: a file under ``root`` or bytes written once to ``<out>/media/<name>/<hash>.png``."""
    image = row.get("image")
    data = image.get("bytes") if isinstance(image, dict) else image if isinstance(image, bytes) else None
    if data:
        path = ctx.out_dir / "media" / name / f"{hashlib.sha1(data).hexdigest()[:20]}.png"
        return path if path.is_file() else save_image_bytes(data, path, rows_file, lineno)
    rel = row.get("image_filename") or (image.get("path") if isinstance(image, dict) else image)
    if not isinstance(rel, str) or not rel:
        raise RowError(rows_file, lineno, "the row has neither image bytes nor an image path")
    return media_file(root, rel, rows_file, lineno, "page image")[0]


def _documents(root: Path, spec: ConvertDataset, name: str, ctx: _Context) -> Iterator[Converted]:
    rows_file = find_rows_file(root, "train")
    ctx.files.append(str(rows_file))
    for lineno, row in read_rows(rows_file):
        with ctx.bad.guard():
            require(row, ("query",), rows_file, lineno)
            text = join_task_text("", str(row["query"]))
            if not text:
                raise RowError(rows_file, lineno, "empty query")
            page = _page(root, row, name, rows_file, lineno, ctx)
            query = Item(instruction=TRAIN_INSTRUCTIONS["document_query"], text=text)
            target = Item(instruction=TRAIN_INSTRUCTIONS["document_target"], images=(page,))
            yield f"{rows_file.name}:{lineno}", query, target


class _Context:
    def __init__(self, out_dir: Path, bad: BadRows, num_frames: int) -> None:
        self.out_dir, self.bad, self.num_frames = out_dir, bad, num_frames
        self.files: list[str] = []


CONVERTERS: dict[str, Callable[[Path, Any, str, _Context], Iterator[Converted]]] = {
    "mmeb_train": _mmeb_train,
    "llava_hound": _llava_hound,
    "vidore": _documents,
    "visrag": _documents,
}


# ----------------------------------------------------------------------------------------------------------------
# Stage
# ----------------------------------------------------------------------------------------------------------------


def _sample(n: int, cap: int, seed: int, name: str) -> list[int]:
    """Indices kept: all when ``n <= cap``, else ``cap`` drawn uniformly (seeded by ``seed`` and the name)."""
    if n <= cap:
        return list(range(n))
    rng = random.Random(f"{seed}:{name}")
    return sorted(rng.sample(range(n), cap))


def convert_dataset(name: str, spec: ConvertDataset, source_dir: Path, cfg: ConvertConfig) -> dict[str, Any]:
    """Convert one dataset into ``<out>/<name>.jsonl``; returns its manifest entry."""
    out_dir = Path(cfg.out)
    ctx = _Context(out_dir, BadRows(cfg.on_bad_row), cfg.num_frames)
    converted = list(
        tqdm(
            CONVERTERS[spec.source](source_dir, spec, name, ctx),
            desc=f"convert {name}",
            disable=not cfg.show_progress_bar,
            leave=False,
        )
    )
    keep = _sample(len(converted), spec.cap, cfg.seed, name)
    path = out_dir / f"{name}.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for i in keep:
            where, query, target = converted[i]
            pair_id = f"{name}/{i:07d}"
            meta = {"source": spec.source, "row": where}
            q = Item(f"{pair_id}/q", query.text, query.instruction, query.images, query.frames, None, meta)
            t = Item(f"{pair_id}/t", target.text, target.instruction, target.images, target.frames, None, meta)
            record = Pair(name, pair_id, q, t).to_record()
            for side, item in (("query", q), ("target", t)):
                record[side]["images"] = _rel_media(list(item.images), out_dir)  # type: ignore[arg-type]
                record[side]["frames"] = _rel_media(list(item.frames), out_dir)  # type: ignore[arg-type]
            fh.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    logger.info("%s: %d of %d pairs -> %s (%d rows skipped)", name, len(keep), len(converted), path, ctx.bad.count)
    return {
        "file": path.name,
        "source": spec.source,
        "subset": spec.subset,
        "cap": spec.cap,
        "weight": spec.weight,
        "contrastive": spec.contrastive,
        "available": len(converted),
        "pairs": len(keep),
        "inputs": ctx.files,
        "bad_rows": ctx.bad.as_dict(),
    }


def convert(cfg: ConvertConfig) -> dict[str, Any]:
    """The ``embedrl convert`` stage: every configured dataset whose source folder is set (or those of ``only``).

    A dataset named in ``only`` whose source folder is not set is an error; without ``only``, datasets of unset
    sources are listed under ``not_converted``. Writes ``<out>/convert.json`` and returns it.
    """
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir)
    roots = {"mmeb_train": cfg.mmeb_train, "llava_hound": cfg.llava_hound, "vidore": cfg.vidore, "visrag": cfg.visrag}
    names = cfg.only or list(cfg.datasets)
    datasets: dict[str, Any] = {}
    skipped: list[str] = []
    for name in names:
        spec = cfg.datasets[name]
        root = roots[spec.source]
        if not root:
            if cfg.only:
                raise FileNotFoundError(f"{name} comes from {spec.source}, but --{spec.source} is not set")
            skipped.append(name)
            continue
        if not Path(root).is_dir():
            raise FileNotFoundError(f"{spec.source} folder {root} does not exist")
        datasets[name] = convert_dataset(name, spec, Path(root), cfg)
    manifest = {
        "datasets": datasets,
        "not_converted": skipped,
        "seed": cfg.seed,
        "num_frames": cfg.num_frames,
        "config": config_to_dict(cfg),
        "embedrl_version": __version__,
    }
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
