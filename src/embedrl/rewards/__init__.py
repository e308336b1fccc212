"""EG-RL rewards: the reward terms in TRL's reward-function signature (:mod:`~embedrl.rewards.terms`) and the
models that score them (:mod:`~embedrl.rewards.judges`: the frozen Embedder and the Discriminator, local or over
HTTP)."""
