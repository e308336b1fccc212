"""Training stages: the Embedder's contrastive stage (``train.embedder``) and the Reasoner's EG-RL (GRPO) stage.

EG-RL runs on TRL's ``GRPOTrainer`` (``train.grpo_trl``); its data path is ``train.rl_data``, its models
``train.rl_models``, what it writes ``train.rl_outputs``. ``train.grpo_math`` holds the pure GRPO maths (group
advantages, clipped loss with k3 KL), the reference TRL's loss is tested against. Submodules are imported explicitly
(``from embedrl.train.grpo_math import group_advantages``); this package imports nothing heavy itself.
"""
