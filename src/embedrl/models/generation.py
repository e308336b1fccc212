"""Text generation with a Qwen-VL (or text) chat model, in one place: every caller that decodes with HF ``generate``
(the Reasoner, the Discriminator, the server's chat models, RL rollouts, the tiny backbone's held-out score) goes
through :func:`generate_completions` (or :func:`generate_texts` for the texts alone).

It runs ``model.generate`` under ``torch.inference_mode`` with the model in eval mode (its training flag restored
afterwards), optionally seeding torch first, cuts the prompt off, trims each continuation at its first stop token
(:func:`stop_token_ids`) and decodes it without special tokens. It also holds the ids that stop a reply, pad it, and
must never be sampled (:func:`vision_token_ids`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel

from embedrl import prompts as P

__all__ = [
    "VISION_TOKENS",
    "Completions",
    "generate_completions",
    "generate_texts",
    "stop_token_ids",
    "vision_token_ids",
]

# Sampling one of these would add a vision placeholder without pixels: the next forward pass would fail.
VISION_TOKENS = (P.VISION_START, P.VISION_END, "<|vision_pad|>", P.IMAGE_PAD, P.VIDEO_PAD)


def _tokenizer(processor: Any) -> Any:
    """The tokenizer of a processor, or ``processor`` itself when it is a tokenizer (text chat models)."""
    return getattr(processor, "tokenizer", processor)


def stop_token_ids(model: PreTrainedModel, processor: Any) -> tuple[list[int], int]:
    """``(eos ids, pad id)`` from the generation config (falling back to the tokenizer's)."""
    gen, tokenizer = model.generation_config, _tokenizer(processor)
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]
    pad = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
    return eos_ids, int(pad if pad is not None else eos_ids[0])


def vision_token_ids(processor: Any) -> list[int]:
    """Ids of the vision placeholder tokens present in ``processor``'s vocabulary (to suppress in generation)."""
    vocab = processor.tokenizer.get_vocab()
    return sorted(vocab[t] for t in VISION_TOKENS if t in vocab)


@dataclass
class Completions:
    """The continuations of one ``generate`` call; row ``i·n + j`` is draw ``j`` of prompt ``i`` (``n`` =
    ``num_return_sequences``)."""

    tokens: list[list[int]]  # new tokens of each row through its first stop token (kept); all of them without one
    texts: list[str]  # each row's tokens before its stop token, decoded without special tokens
    truncated: list[bool]  # no stop token within max_new_tokens
    prompt_tokens: list[int]  # per prompt (not per row): its tokens, the attention mask's sum

    @property
    def completion_tokens(self) -> list[int]:
        """Tokens of each row, its stop token included."""
        return [len(t) for t in self.tokens]


def generate_completions(
    model: PreTrainedModel,
    processor: Any,
    inputs: Mapping[str, Any],
    generation_config: GenerationConfig | None = None,
    *,
    seed: int | None = None,
    **generate_kwargs: Any,
) -> Completions:
    """``model.generate(**inputs, generation_config=..., **generate_kwargs)``, its continuations trimmed and decoded.

    Args:
        model, processor: the chat model and its processor (or tokenizer, for a text model).
        inputs: the processor's tensors for a left-padded batch of prompts, on the model's device.
        generation_config, generate_kwargs: passed to ``generate`` as given (its usual precedence: keyword
            arguments over the config over the model's ``generation_config``); pass one or the other.
        seed: ``torch.manual_seed(seed)`` right before generating; None leaves the RNG alone (a caller that seeds
            once for several calls).

    The model runs in eval mode under ``torch.inference_mode``; its training flag is restored afterwards.
    """
    eos_ids = set(stop_token_ids(model, processor)[0])
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(**inputs, generation_config=generation_config, **generate_kwargs)
    finally:
        model.train(was_training)
    rows = out[:, inputs["input_ids"].shape[1] :].tolist()
    tokens, kept, truncated = [], [], []
    for row in rows:
        end = next((j for j, t in enumerate(row) if t in eos_ids), None)
        tokens.append(row if end is None else row[: end + 1])
        kept.append(row if end is None else row[:end])
        truncated.append(end is None)
    texts = _tokenizer(processor).batch_decode(kept, skip_special_tokens=True)
    return Completions(tokens, texts, truncated, inputs["attention_mask"].sum(dim=1).tolist())


def generate_texts(
    model: PreTrainedModel, processor: Any, inputs: Mapping[str, Any], *args: Any, **kwargs: Any
) -> list[str]:
    """The decoded continuations of :func:`generate_completions` (same arguments; row ``i·n + j``: draw ``j`` of
    prompt ``i``)."""
    return generate_completions(model, processor, inputs, *args, **kwargs).texts
