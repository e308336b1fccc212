"""Tiny, randomly initialised Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints, built offline (docs/backbones.md).

A tiny backbone is the real transformers architecture at toy size: 2 text layers of width 128, a 2-layer vision
tower, and the locally trained 4k byte-level BPE tokenizer (about 1 M parameters). It is written as an ordinary
checkpoint directory, so everything downstream loads it exactly like a released model:

    config.json, generation_config.json, model.safetensors       # the model
    tokenizer.json, tokenizer_config.json, chat_template.jinja   # the tokenizer and embedrl's chat template
    processor_config.json                                        # processor with image and video processors
    embedrl_backbone.json                                        # the TinyBackboneConfig that built it
    embedrl_reasoner.json                                        # prompted with the compact prompts

Example:
    >>> from embedrl.config import TinyBackboneConfig
    >>> path = build_tiny_backbone(TinyBackboneConfig(family="qwen3-vl", out="/tmp/tiny-qwen3-vl"))  # doctest: +SKIP
    >>> model, processor = load_backbone(path)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedConfig, PreTrainedTokenizerBase, ProcessorMixin

from embedrl import prompts
from embedrl.backbones.adapters import ADAPTERS, BUDGET_CONFIG_KEY, FamilyAdapter, PixelBudget
from embedrl.backbones.records import write_reasoner_settings
from embedrl.backbones.tokenizer import build_tiny_tokenizer
from embedrl.config import TinyBackboneConfig, save_config

__all__ = ["BACKBONE_CONFIG_FILENAME", "build_tiny_backbone", "tiny_model_config", "tiny_processor", "token_id"]

logger = logging.getLogger(__name__)

BACKBONE_CONFIG_FILENAME = "embedrl_backbone.json"


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of ``token``, which must be a single token of ``tokenizer``."""
    idx = tokenizer.convert_tokens_to_ids(token)
    if idx is None or idx == tokenizer.unk_token_id:
        raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
    return idx


def tiny_model_config(
    adapter: FamilyAdapter, cfg: TinyBackboneConfig, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedConfig:
    """The HF config of a tiny ``adapter.family`` model; every special-token id is read from ``tokenizer``."""
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than vocab_size={cfg.vocab_size}")
    pad_id = token_id(tokenizer, prompts.PAD_TOKEN)
    text = adapter.tiny_text_config(cfg) | {
        "bos_token_id": pad_id,  # as in the released Qwen configs: <|endoftext|> doubles as bos
        "eos_token_id": token_id(tokenizer, prompts.EOS_TOKEN),
        "pad_token_id": pad_id,
    }
    return adapter.config_class(
        text_config=text,
        vision_config=adapter.tiny_vision_config(cfg),
        image_token_id=token_id(tokenizer, prompts.IMAGE_PAD),
        video_token_id=token_id(tokenizer, prompts.VIDEO_PAD),
        vision_start_token_id=token_id(tokenizer, prompts.VISION_START),
        vision_end_token_id=token_id(tokenizer, prompts.VISION_END),
        tie_word_embeddings=False,
    )


def tiny_budget(cfg: TinyBackboneConfig) -> PixelBudget:
    """``cfg.min_pixels``/``cfg.max_pixels`` per image and per video frame."""
    return PixelBudget(cfg.min_pixels, cfg.max_pixels, cfg.min_pixels, cfg.max_pixels)


def tiny_processor(
    adapter: FamilyAdapter, cfg: TinyBackboneConfig, tokenizer: PreTrainedTokenizerBase
) -> ProcessorMixin:
    """The processor of a tiny model: ``cfg.min_pixels``/``cfg.max_pixels`` per image and per video frame."""
    budget = tiny_budget(cfg)
    geometry = {
        "patch_size": adapter.patch_size,
        "merge_size": adapter.merge_size,
        "temporal_patch_size": adapter.temporal_patch_size,
    }
    image_processor = adapter.image_processor_class(size=adapter.image_size(budget), **geometry)
    # Frames are used as given (key-frame indices refer to them), with the reference per-frame pixel cap.
    video_processor = adapter.video_processor_class(
        size=adapter.video_size(budget), do_sample_frames=False, cap_pixels_per_frame=True, **geometry
    )
    return adapter.processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=prompts.CHAT_TEMPLATE,
    )


def _generation_config(config: PreTrainedConfig) -> GenerationConfig:
    text = config.get_text_config()
    # Stop at <|im_end|> and at <|endoftext|>, as the released Qwen generation configs do.
    return GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=[text.eos_token_id, text.pad_token_id],
        pad_token_id=text.pad_token_id,
    )


def build_tiny_backbone(cfg: TinyBackboneConfig) -> Path:
    """Write a tiny ``cfg.family`` checkpoint to ``cfg.out`` and return its path. Offline and deterministic.

    The same ``cfg`` gives the same files byte for byte (``embedrl_backbone.json`` records ``cfg.out`` too). The
    weights are the architecture's own random initialisation under ``torch.manual_seed(cfg.seed)``; the global
    torch RNG state is left as it was.
    """
    adapter = ADAPTERS[cfg.family]
    tokenizer = build_tiny_tokenizer(cfg.vocab_size)
    config = tiny_model_config(adapter, cfg, tokenizer)
    # The checkpoint records its own pixel budget, so every stage feeds it images at the tiny sizes it was built for.
    setattr(config, BUDGET_CONFIG_KEY, dataclasses.asdict(tiny_budget(cfg)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = adapter.model_class(config)
    model.generation_config = _generation_config(config)
    processor = tiny_processor(adapter, cfg, tokenizer)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    save_config(cfg, out, filename=BACKBONE_CONFIG_FILENAME)
    write_reasoner_settings(out, compact_prompts=True)  # tiny models are prompted compactly in every stage
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("wrote tiny %s backbone (%.2f M parameters) to %s", cfg.family, n_params / 1e6, out)
    return out
