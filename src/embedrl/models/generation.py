"""Generation settings shared by every place that decodes with a Qwen-VL chat model (Reasoner, Discriminator, RL
rollouts, the server's chat models): which ids stop a reply, which pad it, and which must never be sampled."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from embedrl import prompts as P

__all__ = ["VISION_TOKENS", "stop_token_ids", "vision_token_ids"]

# Sampling one of these would add a vision placeholder without pixels: the next forward pass would fail.
VISION_TOKENS = (P.VISION_START, P.VISION_END, "<|vision_pad|>", P.IMAGE_PAD, P.VIDEO_PAD)


def stop_token_ids(model: PreTrainedModel, processor: Any) -> tuple[list[int], int]:
    """``(eos ids, pad id)`` from the generation config (falling back to the tokenizer's)."""
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else processor.tokenizer.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]
    pad = gen.pad_token_id if gen.pad_token_id is not None else processor.tokenizer.pad_token_id
    return eos_ids, int(pad if pad is not None else eos_ids[0])


def vision_token_ids(processor: Any) -> list[int]:
    """Ids of the vision placeholder tokens present in ``processor``'s vocabulary (to suppress in generation)."""
    vocab = processor.tokenizer.get_vocab()
    return sorted(vocab[t] for t in VISION_TOKENS if t in vocab)
