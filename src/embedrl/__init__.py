"""embedrl: reasoning-driven multimodal embeddings (Embed-RL, arXiv 2602.13823).

Kept free of heavy imports: ``import embedrl`` does not import torch or transformers. The loaders are exported
lazily: ``embedrl.load_embedder`` and ``embedrl.load_reasoner`` import :mod:`embedrl.models.loading` (and with it
torch) on first use.

Example:
    >>> import embedrl
    >>> embedder = embedrl.load_embedder("ZoengHouNaam/Embed-RL-2B")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it; imported on first attribute access (PEP 562), so the root stays light.
_LAZY = {"load_embedder": "embedrl.models.loading", "load_reasoner": "embedrl.models.loading"}

__all__ = ["__version__", "load_embedder", "load_reasoner"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'embedrl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
