"""The one record type of embedrl: :class:`Item` (one side of a pair), and :class:`Pair` with its JSONL form.

An ``Item`` is what the Reasoner reasons about, what the Embedder embeds and what a search returns: text, an
instruction, zero or more images, an optional video (an ordered frame list), and optionally a T-CoT.

On disk, training and RL data are JSONL files of pairs (``docs/data.md`` documents the schema)::

    {"dataset": "world_t2i", "pair_id": "world_t2i/000017",
     "query":  {"id": "...", "text": "...", "instruction": "...", "images": [], "frames": [], "tcot": "<thinking>..."},
     "target": {"id": "...", "text": "", "instruction": "...", "images": ["media/img_000017.png"], "frames": [], ...}}

Media paths are relative to the JSONL file's directory. Evaluation candidates and corpora use the same item form.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from embedrl.config import UserError

Modality = Literal["text", "image", "video"]
ImageLike = str | Path | Image.Image


class DataError(UserError, ValueError):
    """A data file that is missing, malformed, or names media that do not exist; the message names the file and
    line (``<what> (<file>, line <n>): <how to fix>``)."""


ITEM_KEYS = ("id", "text", "instruction", "images", "frames", "tcot", "meta")


@dataclass(frozen=True)
class Item:
    """One query, target or candidate.

    Attributes:
        id: stable identifier, the join key of every cache (never join by text or path).
        text: the raw text (caption, question, class label, document text...).
        instruction: the dataset/task instruction; the Embedder prepends it to the text (MMEB convention).
        images: images in order, as paths or PIL images.
        frames: one video as its ordered frame list (paths or PIL images); empty for non-video items.
        tcot: the raw T-CoT text for this item, if any. The parser never rewrites it.
        meta: free-form provenance (ground truth boxes, T-CoT generator, family...). Not seen by models.
    """

    id: str = ""
    text: str = ""
    instruction: str = ""
    images: tuple[ImageLike, ...] = ()
    frames: tuple[ImageLike, ...] = ()
    tcot: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # Accept lists from callers but store tuples, so items stay immutable.
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "frames", tuple(self.frames))

    @property
    def modality(self) -> Modality:
        """``video`` if the item has frames, else ``image`` if it has images, else ``text``."""
        if self.frames:
            return "video"
        if self.images:
            return "image"
        return "text"

    def with_tcot(self, tcot: str | None) -> Item:
        """A copy of this item carrying ``tcot``."""
        return Item(self.id, self.text, self.instruction, self.images, self.frames, tcot, dict(self.meta))

    def to_record(self, root: Path | None = None) -> dict[str, Any]:
        """JSON-ready dict. Path media are written relative to ``root``; in-memory images cannot be written."""

        def media(x: ImageLike) -> str:
            if isinstance(x, Image.Image):
                raise TypeError(f"item {self.id!r} holds an in-memory image; save it to a file before writing JSONL")
            p = Path(x)
            return str(p.relative_to(root)) if root is not None and p.is_absolute() else str(p)

        return {
            "id": self.id,
            "text": self.text,
            "instruction": self.instruction,
            "images": [media(x) for x in self.images],
            "frames": [media(x) for x in self.frames],
            "tcot": self.tcot,
            "meta": self.meta,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], root: Path | None = None) -> Item:
        """Inverse of :meth:`to_record`; relative media paths are resolved against ``root``."""
        unknown = set(record) - set(ITEM_KEYS)
        if unknown:
            raise ValueError(f"item record has unknown keys {sorted(unknown)}; allowed: {list(ITEM_KEYS)}")

        def media(x: str) -> Path:
            p = Path(x)
            return root / p if root is not None and not p.is_absolute() else p

        return cls(
            id=str(record.get("id", "")),
            text=record.get("text", "") or "",
            instruction=record.get("instruction", "") or "",
            images=tuple(media(x) for x in record.get("images", [])),
            frames=tuple(media(x) for x in record.get("frames", [])),
            tcot=record.get("tcot"),
            meta=dict(record.get("meta") or {}),
        )


@dataclass(frozen=True)
class Pair:
    """A (query, positive target) training or RL pair from one dataset."""

    dataset: str
    pair_id: str
    query: Item
    target: Item

    def to_record(self, root: Path | None = None) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "pair_id": self.pair_id,
            "query": self.query.to_record(root),
            "target": self.target.to_record(root),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], root: Path | None = None) -> Pair:
        missing = {"dataset", "pair_id", "query", "target"} - set(record)
        if missing:
            raise ValueError(f"pair record is missing {sorted(missing)}")
        return cls(
            dataset=record["dataset"],
            pair_id=record["pair_id"],
            query=Item.from_record(record["query"], root),
            target=Item.from_record(record["target"], root),
        )


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line; returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as fh:
        for rec in records:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSONL file, naming the file and line of a malformed one."""
    for _, record in read_jsonl_lines(path):
        yield record


def read_jsonl_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each object of a JSONL file.

    Raises:
        DataError: the file does not exist, or a line is not a JSON object (a truncated or corrupt file).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found ({path}): check the path")
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"not valid JSON ({path}, line {lineno}: {err.msg}): repair or delete the line (a truncated "
                    "file? write it again)"
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"not a JSON object ({path}, line {lineno}: a {type(record).__name__}): each line must hold "
                    "one object"
                )
            yield lineno, record


def missing_media(item: Item) -> list[Path]:
    """The image and frame files of ``item`` that do not exist (in-memory images are never missing)."""
    return [Path(x) for x in (*item.images, *item.frames) if not isinstance(x, Image.Image) and not Path(x).is_file()]


def read_pairs(path: str | Path, check_media: bool = False) -> list[Pair]:
    """Read a pairs JSONL file; media paths resolve against the file's directory.

    Raises:
        DataError: the file is missing or malformed, a line is not a pair record, or (``check_media``) a pair names
            an image or frame file that does not exist; the message names the file and line.
    """
    path = Path(path)
    pairs = []
    for lineno, record in read_jsonl_lines(path):
        try:
            pair = Pair.from_record(record, path.parent)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise DataError(
                f"not a pair record ({path}, line {lineno}: {err}): see docs/data.md for the schema"
            ) from None
        if check_media:
            missing = missing_media(pair.query) + missing_media(pair.target)
            if missing:
                raise DataError(
                    f"missing media file {missing[0]} ({path}, line {lineno}): restore the file or drop the row"
                )
        pairs.append(pair)
    return pairs


def write_pairs(path: str | Path, pairs: Iterable[Pair]) -> int:
    """Write pairs as JSONL; absolute media paths are stored relative to the file's directory."""
    path = Path(path)
    return write_jsonl(path, (p.to_record(path.parent.resolve()) for p in pairs))
