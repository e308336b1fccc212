"""Models built on a Qwen-VL backbone: the :class:`Embedder` (pooled at ``<emb>``). Imports torch and transformers."""

from __future__ import annotations

from embedrl.models.embedder import Embedder, pool_last_emb, truncate_text

__all__ = ["Embedder", "pool_last_emb", "truncate_text"]
