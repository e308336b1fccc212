"""On-disk caches of resumable evaluation: T-CoTs and embeddings, joined by stable item ids (docs/method.md §6.1,
§8.23).

- :class:`TCoTCache`: one JSONL file; a record per generated T-CoT, keyed by
  ``(item id, side, reasoner id, prompt hash, decoding)``. Each finished batch is appended with one write and an
  ``fsync``; a line cut by a kill (no trailing newline) is dropped on the next open, so a rerun regenerates only the
  batch that was in flight.
- :class:`EmbeddingCache`: a directory of shards, ``shard-NNNNN.npy`` (float32 ``[n, D]``) plus
  ``shard-NNNNN.json`` (its keys). Both are written through a temporary file and ``os.replace``; the JSON index is
  written last, so a shard counts only once it is complete. Keys are ``(item id, embedder id, mode, T-CoT hash)``.
  :meth:`EmbeddingCache.compact` merges the shards of a finished task into one.

Both caches also work in memory (``path=None``), so an evaluator without a cache directory still embeds each
unique item once per call. Neither cache is safe for two processes writing the same files at the same time.

The ids in the keys are content fingerprints: :func:`weights_fingerprint` hashes a model's state dict (names,
dtypes, shapes and bytes) and its settings, so a retrained checkpoint saved at the same path never reuses stale
entries.

Example:
    >>> cache = EmbeddingCache(None)
    >>> key = embedding_key("q1", "emb@0123", "raw", None)
    >>> cache.add([key], np.ones((1, 4), dtype=np.float32))
    >>> cache.get(key).tolist(), len(cache)
    ([1.0, 1.0, 1.0, 1.0], 1)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "EmbeddingCache",
    "TCoTCache",
    "TCoTKey",
    "decoding_key",
    "embedding_key",
    "tcot_hash",
    "weights_fingerprint",
]

_SHARD_PREFIX = "shard-"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a synced temporary file, so a kill never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Keys and fingerprints
# ----------------------------------------------------------------------------------------------------------------


def decoding_key(decoding: Any) -> str:
    """Canonical JSON of a decoding (a dataclass such as :class:`embedrl.models.reasoner.Decoding`, or a dict)."""
    fields = dataclasses.asdict(decoding) if dataclasses.is_dataclass(decoding) else dict(decoding)
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def tcot_hash(tcot: str | None) -> str:
    """First 16 hex digits of the SHA-256 of a T-CoT text; ``"none"`` for an item without one."""
    return "none" if tcot is None else hashlib.sha256(tcot.encode("utf-8")).hexdigest()[:16]


def embedding_key(item_id: str, embedder_id: str, mode: str, tcot: str | None) -> str:
    """The embedding cache key of one item. In ``raw`` mode the T-CoT is not embedded, so it is not in the key."""
    return json.dumps([item_id, embedder_id, mode, "none" if mode == "raw" else tcot_hash(tcot)])


def weights_fingerprint(model: Any, extra: Mapping[str, Any] | None = None) -> str:
    """First 16 hex digits of a SHA-256 over ``extra`` (settings, as JSON) and every state-dict tensor.

    Args:
        model: a ``torch.nn.Module``; tensors are hashed by name, dtype, shape and raw bytes (moved to CPU one at a
            time, so a GPU model costs one pass over its weights).
        extra: settings that change the output without changing the weights (pixel budget, text cap, …).
    """
    digest = hashlib.sha256(json.dumps(dict(extra or {}), sort_keys=True, default=str).encode("utf-8"))
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# T-CoT cache
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TCoTKey:
    """Join key of one generated T-CoT (docs/method.md §8.23): never text or paths, always the stable item id."""

    item_id: str
    side: str
    reasoner: str
    prompt_hash: str
    decoding: str  # decoding_key(...)


class TCoTCache:
    """Generated T-CoTs keyed by :class:`TCoTKey`, in a JSONL file (``path=None``: in memory only).

    Each record is ``{"id", "side", "reasoner", "prompt_hash", "decoding", "family", "text"}``; ``decoding`` is the
    decoding as a JSON object. A later record with the same key replaces an earlier one.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._texts: dict[TCoTKey, str] = {}
        if self.path is not None and self.path.is_file():
            self._load(self.path)

    def _load(self, path: Path) -> None:
        raw = path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            # A kill during an append leaves a cut line; drop it so the next append starts on a fresh line.
            keep = raw.rfind(b"\n") + 1
            logger.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted run",
                           path, len(raw) - keep)  # fmt: skip
            with path.open("r+b") as fh:
                fh.truncate(keep)
            raw = raw[:keep]
        for lineno, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = TCoTKey(
                    rec["id"], rec["side"], rec["reasoner"], rec["prompt_hash"], decoding_key(rec["decoding"])
                )
                self._texts[key] = rec["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{path}:{lineno}: not a T-CoT cache record ({err}); delete the file to regenerate its T-CoTs"
                ) from err

    def __len__(self) -> int:
        return len(self._texts)

    def items(self) -> list[tuple[TCoTKey, str]]:
        """Every cached (key, T-CoT text)."""
        return list(self._texts.items())

    def __contains__(self, key: TCoTKey) -> bool:
        return key in self._texts

    def get(self, key: TCoTKey) -> str | None:
        return self._texts.get(key)

    def add(self, entries: Sequence[tuple[TCoTKey, str, str]]) -> None:
        """Store one finished batch of ``(key, text, family)``: a single appended write, flushed and fsynced."""
        if not entries:
            return
        if self.path is not None:
            lines = []
            for key, text, family in entries:
                rec = {
                    "id": key.item_id,
                    "side": key.side,
                    "reasoner": key.reasoner,
                    "prompt_hash": key.prompt_hash,
                    "decoding": json.loads(key.decoding),
                    "family": family,
                    "text": text,
                }
                lines.append(json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write("".join(lines))
                fh.flush()
                os.fsync(fh.fileno())
        for key, text, _ in entries:
            self._texts[key] = text


# ----------------------------------------------------------------------------------------------------------------
# Embedding cache
# ----------------------------------------------------------------------------------------------------------------


class EmbeddingCache:
    """Float32 embeddings keyed by :func:`embedding_key`, as shards in a directory (``path=None``: in memory).

    Attributes:
        dim: embedding size, fixed by the first vectors stored (None while empty).
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._vectors: dict[str, np.ndarray] = {}
        self._next_shard = 0
        self.dim: int | None = None
        if self.path is not None and self.path.is_dir():
            self._load(self.path)

    def _shard_files(self) -> list[Path]:
        assert self.path is not None
        return sorted(self.path.glob(f"{_SHARD_PREFIX}*.json"))

    def _load(self, path: Path) -> None:
        numbers = []
        for index_file in self._shard_files():
            number = int(index_file.stem.removeprefix(_SHARD_PREFIX))
            numbers.append(number)
            keys = json.loads(index_file.read_text())["keys"]
            array_file = index_file.with_suffix(".npy")
            if not array_file.is_file():
                raise ValueError(f"{index_file} has no {array_file.name}; delete {path} to recompute its embeddings")
            vectors = np.load(array_file)
            if vectors.ndim != 2 or vectors.shape[0] != len(keys):
                raise ValueError(
                    f"{array_file}: shape {vectors.shape} does not match its {len(keys)} keys; delete {path} to "
                    "recompute its embeddings"
                )
            self._store(keys, vectors, where=str(array_file))
        # An .npy without its index is a shard cut by a kill: never committed, so it is removed.
        for orphan in path.glob(f"{_SHARD_PREFIX}*.npy"):
            if not orphan.with_suffix(".json").is_file():
                logger.warning("%s: removing an uncommitted shard left by an interrupted run", orphan)
                orphan.unlink()
        self._next_shard = max(numbers, default=-1) + 1

    def _store(self, keys: Sequence[str], vectors: np.ndarray, where: str) -> None:
        if self.dim is None:
            self.dim = int(vectors.shape[1])
        elif vectors.shape[1] != self.dim:
            raise ValueError(f"{where}: embeddings of size {vectors.shape[1]} in a cache of size {self.dim}")
        for key, row in zip(keys, vectors, strict=True):
            self._vectors[key] = row

    def __len__(self) -> int:
        return len(self._vectors)

    def __contains__(self, key: str) -> bool:
        return key in self._vectors

    def get(self, key: str) -> np.ndarray | None:
        return self._vectors.get(key)

    def add(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Store one finished batch: ``vectors`` ``[len(keys), D]`` (written as float32, atomically, as one shard)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(keys):
            raise ValueError(f"need vectors of shape [{len(keys)}, D] for {len(keys)} keys, got {vectors.shape}")
        if not keys:
            return
        self._store(keys, vectors, where="EmbeddingCache.add")
        if self.path is not None:
            self._write_shard(list(keys), vectors)

    def _write_shard(self, keys: list[str], vectors: np.ndarray) -> None:
        assert self.path is not None
        self.path.mkdir(parents=True, exist_ok=True)
        stem = f"{_SHARD_PREFIX}{self._next_shard:05d}"
        self._next_shard += 1
        array_file = self.path / f"{stem}.npy"
        tmp = array_file.with_name(array_file.name + ".tmp")
        with tmp.open("wb") as fh:
            np.save(fh, vectors)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, array_file)
        atomic_write_bytes(self.path / f"{stem}.json", json.dumps({"keys": keys}).encode("utf-8"))

    def compact(self) -> None:
        """Merge every shard on disk into one (the new shard is committed before the old ones are removed)."""
        if self.path is None or not self.path.is_dir():
            return
        old = self._shard_files()
        if len(old) <= 1:
            return
        keys = list(self._vectors)
        self._write_shard(keys, np.stack([self._vectors[k] for k in keys]))
        for index_file in old:
            index_file.unlink()
            index_file.with_suffix(".npy").unlink(missing_ok=True)
