"""embedrl: reasoning-driven multimodal embeddings (Embed-RL, arXiv 2602.13823).

Kept free of heavy imports: ``import embedrl`` does not import torch or transformers.
"""

from __future__ import annotations

__version__ = "0.1.0"
