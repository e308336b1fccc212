"""Reading the rows of distributed data files, with errors that name the file and row, and a skip-or-stop policy.

Benchmarks and training sets arrive as JSONL (one object per line), JSON (a list of objects) or Parquet (a hub
dataset snapshot; image columns are ``{"bytes", "path"}`` structs). :func:`read_rows` yields ``(row number, row)``
from any of them; row numbers are 1-based lines for JSONL and 1-based row indices otherwise.

A loader that finds a malformed row or a missing media file raises :class:`RowError` (``"<file>:<row>: what is
wrong"``). :class:`BadRows` applies the configured policy: ``stop`` re-raises, ``skip`` logs the error, counts it
and goes on, so the caller can record how many rows it dropped.

Example:
    >>> bad = BadRows("skip")
    >>> with bad.guard():
    ...     raise RowError("rows.jsonl", 3, "no query text")
    >>> bad.count, bad.examples
    (1, ['rows.jsonl:3: no query text'])
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from embedrl.config import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "ON_BAD_ROW",
    "BadRowPolicy",
    "BadRows",
    "RowError",
    "find_rows_file",
    "media_file",
    "read_rows",
    "require",
    "save_image_bytes",
]

BadRowPolicy = Literal["stop", "skip"]
ON_BAD_ROW: tuple[str, ...] = ("stop", "skip")
ROW_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")


class RowError(UserError, ValueError):
    """A row of a data file is malformed or points at missing media; the message starts with ``file:row``."""

    def __init__(self, path: str | Path, row: int | str, message: str) -> None:
        self.path, self.row, self.reason = str(path), row, message
        super().__init__(f"{path}:{row}: {message}")


class BadRows:
    """The skip-or-stop policy for :class:`RowError`; counts what it skipped (first 20 messages kept)."""

    def __init__(self, policy: BadRowPolicy = "stop") -> None:
        if policy not in ON_BAD_ROW:
            raise ValueError(f"on_bad_row={policy!r}; use one of {ON_BAD_ROW}")
        self.policy = policy
        self.count = 0
        self.examples: list[str] = []

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Run one row's processing; a :class:`RowError` inside stops the run or is skipped and counted."""
        try:
            yield
        except RowError as err:
            if self.policy == "stop":
                raise
            self.count += 1
            if len(self.examples) < 20:
                self.examples.append(str(err))
            logger.warning("skipped (on_bad_row=skip): %s", err)

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "skipped": self.count, "examples": list(self.examples)}


def find_rows_file(directory: Path, stem: str) -> Path:
    """``<directory>/<stem>.jsonl|.json|.parquet``, or the Parquet shards ``<stem>-*.parquet`` as their folder.

    Raises FileNotFoundError naming what was looked for.
    """
    for suffix in ROW_SUFFIXES:
        path = directory / f"{stem}{suffix}"
        if path.is_file():
            return path
    shards = sorted(directory.glob(f"{stem}-*.parquet"))
    if shards:
        return shards[0] if len(shards) == 1 else directory / f"{stem}-*.parquet"
    raise FileNotFoundError(
        f"no {stem}.jsonl, {stem}.json, {stem}.parquet or {stem}-*.parquet in {directory}; export the rows there "
        "(see docs/data.md)"
    )


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    files = sorted(path.parent.glob(path.name)) if "*" in path.name else [path]
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=256):
            yield from batch.to_pylist()


def read_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row number, row)`` for each object in a JSONL, JSON-list or Parquet file (or ``<stem>-*.parquet``).

    A line that is not a JSON object raises :class:`RowError` with the file and line.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        for i, row in enumerate(_parquet_rows(path), 1):
            yield i, row
        return
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise RowError(path, 0, "a .json rows file must hold a list of objects")
        for i, row in enumerate(data, 1):
            if not isinstance(row, dict):
                raise RowError(path, i, f"expected an object, got {type(row).__name__}")
            yield i, row
        return
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise RowError(path, lineno, f"not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise RowError(path, lineno, f"expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def require(row: Mapping[str, Any], fields: Sequence[str], path: str | Path, lineno: int) -> None:
    """Raise :class:`RowError` naming the fields of ``fields`` that ``row`` lacks."""
    missing = [f for f in fields if f not in row or row[f] is None]
    if missing:
        raise RowError(path, lineno, f"missing field(s) {missing}; the row has {sorted(row)}")


def media_file(root: Path, rel: str, rows_file: str | Path, lineno: int, what: str) -> list[Path]:
    """``[root / rel]``, the media file a row names (``[]`` when ``rel`` is empty).

    Raises:
        RowError: the file does not exist (``what`` names it in the message, e.g. ``"query image"``).
    """
    if not rel:
        return []
    path = root / rel
    if not path.is_file():
        raise RowError(rows_file, lineno, f"{what} {path} does not exist")
    return [path]


def save_image_bytes(data: bytes, path: Path, rows_file: str | Path, lineno: int) -> Path:
    """Decode the image bytes a row carries (e.g. a Parquet ``{"bytes", "path"}`` struct's) and write them to
    ``path`` as PNG, through a temporary file.

    Raises:
        RowError: the bytes do not decode as an image (named by ``rows_file`` and ``lineno``).
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise RowError(rows_file, lineno, f"the image bytes do not decode ({err})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
