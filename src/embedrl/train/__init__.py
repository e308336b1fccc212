"""Training stages: the Embedder's contrastive stage (``train.embedder``) and the Reasoner's EG-RL (GRPO) stage.

``train.grpo_math`` holds the pure GRPO maths (group advantages, clipped loss with k3 KL). Submodules are imported
explicitly (``from embedrl.train.grpo_math import group_advantages``); this package imports nothing heavy itself.
"""
