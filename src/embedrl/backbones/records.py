"""Settings that belong to a checkpoint, saved next to its weights and read back wherever it is loaded.

``embedrl_reasoner.json`` (:data:`REASONER_SETTINGS_FILENAME`) records how a Reasoner checkpoint is prompted and
decoded: ``compact_prompts`` (the prompt style it was trained with) and ``decoding`` (its default decoding, a subset
of :class:`embedrl.models.reasoner.Decoding`'s fields without the seed). Written by every stage that writes a
Reasoner (:meth:`embedrl.models.reasoner.Reasoner.save`: the cold start, EG-RL and the tiny backbone's pre-training;
EG-RL's resumable checkpoints too) and by :func:`embedrl.backbones.build_tiny_backbone` (tiny models are prompted
compactly); read by :meth:`~embedrl.models.reasoner.Reasoner.from_pretrained`. A checkpoint without the file (a
released model, an older run) has full prompts and the library's default decoding.

Example ``embedrl_reasoner.json``::

    {"compact_prompts": true, "decoding": {"greedy": false, "max_new_tokens": 128, "temperature": 0.7, "top_p": 1.0}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from embedrl import __version__

__all__ = ["DECODING_KEYS", "REASONER_SETTINGS_FILENAME", "read_reasoner_settings", "write_reasoner_settings"]

REASONER_SETTINGS_FILENAME = "embedrl_reasoner.json"
DECODING_KEYS = ("greedy", "temperature", "top_p", "max_new_tokens")  # the seed is a run's, not a checkpoint's


def read_reasoner_settings(path: str | Path) -> dict[str, Any]:
    """``{"compact_prompts": bool, "decoding": {...}}`` from ``path``'s settings file, each key only when recorded;
    ``{}`` for a checkpoint without one (or a hub id).

    Raises:
        ValueError: the file is not a JSON object, or holds a key or value of the wrong kind.
    """
    file = Path(path) / REASONER_SETTINGS_FILENAME
    if not file.is_file():
        return {}
    record = json.loads(file.read_text())
    if not isinstance(record, dict):
        raise ValueError(f"{file} must hold a JSON object")
    settings: dict[str, Any] = {}
    if "compact_prompts" in record:
        if not isinstance(record["compact_prompts"], bool):
            raise ValueError(f"{file}: compact_prompts={record['compact_prompts']!r} must be true or false")
        settings["compact_prompts"] = record["compact_prompts"]
    decoding = record.get("decoding") or {}
    unknown = sorted(set(decoding) - set(DECODING_KEYS))
    if not isinstance(decoding, dict) or unknown:
        raise ValueError(f"{file}: decoding must be an object with keys among {list(DECODING_KEYS)}; got {decoding}")
    if decoding:
        settings["decoding"] = dict(decoding)
    return settings


def write_reasoner_settings(
    path: str | Path, *, compact_prompts: bool, decoding: Mapping[str, Any] | None = None
) -> Path:
    """Write ``path``'s settings file (``decoding`` keys outside :data:`DECODING_KEYS`, e.g. the seed, are left
    out). Returns the file."""
    record: dict[str, Any] = {"compact_prompts": bool(compact_prompts)}
    kept = {k: v for k, v in (decoding or {}).items() if k in DECODING_KEYS}
    if kept:
        record["decoding"] = kept
    record["embedrl_version"] = __version__
    file = Path(path) / REASONER_SETTINGS_FILENAME
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return file
