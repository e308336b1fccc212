"""Qwen-VL backbones: load a checkpoint, add the ``<emb>`` token, build tiny offline models.

The family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) is detected once from the checkpoint's ``model_type`` and its
:class:`~embedrl.backbones.adapters.FamilyAdapter` answers every family-specific question (classes, patch size, pixel
budgets). This subpackage imports torch and transformers; ``import embedrl`` alone does not.

Example:
    >>> from embedrl.backbones import add_emb_token, build_tiny_backbone, load_backbone
    >>> from embedrl.config import TinyBackboneConfig
    >>> path = build_tiny_backbone(TinyBackboneConfig(family="qwen3-vl", out="runs/tiny-qwen3-vl"))  # doctest: +SKIP
    >>> model, processor = load_backbone(path)  # doctest: +SKIP
    >>> add_emb_token(model, processor)  # doctest: +SKIP
    4096
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    AutoConfig,
    AutoProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from embedrl import prompts
from embedrl.backbones.adapters import ADAPTERS, FamilyAdapter, PixelBudget, detect_family, get_adapter
from embedrl.backbones.records import REASONER_SETTINGS_FILENAME, read_reasoner_settings, write_reasoner_settings
from embedrl.backbones.tiny import build_tiny_backbone
from embedrl.backbones.tokenizer import build_tiny_tokenizer

__all__ = [
    "ADAPTERS",
    "REASONER_SETTINGS_FILENAME",
    "FamilyAdapter",
    "PixelBudget",
    "add_emb_token",
    "build_tiny_backbone",
    "build_tiny_tokenizer",
    "check_token_ids",
    "detect_family",
    "get_adapter",
    "instruct_backbone",
    "load_backbone",
    "load_processor",
    "perception_backbone",
    "read_reasoner_settings",
    "write_reasoner_settings",
]

logger = logging.getLogger(__name__)

# Tiny Qwen3-VL checkpoints shipped with the package (`embedrl backbone pretrain`), the tiny analogues of a pretrained
# and an instruct MLLM: perception pre-training (`make perception-backbone`), then T-CoT writing and discrimination
# on fresh world items (`make instruct-backbone`). The embedded default starts from the instruct one.
_SHIPPED = Path(__file__).resolve().parent.parent / "resources" / "backbones"
PERCEPTION_BACKBONE_DIR = _SHIPPED / "tiny-qwen3-vl-perception"
INSTRUCT_BACKBONE_DIR = _SHIPPED / "tiny-qwen3-vl-instruct"


def _shipped(path: Path, make_target: str, minutes: int) -> Path:
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the shipped tiny backbone is missing from {path}; rebuild it with `make {make_target}` (about "
            f"{minutes} minutes on 2 CPU cores) or pass a backbone directory explicitly"
        )
    return path


def perception_backbone() -> Path:
    """The shipped perception-pretrained tiny Qwen3-VL checkpoint (read-only; load it with :func:`load_backbone`).

    Raises:
        FileNotFoundError: the package was installed without it; rebuild it with ``make perception-backbone``.
    """
    return _shipped(PERCEPTION_BACKBONE_DIR, "perception-backbone", 20)


def instruct_backbone() -> Path:
    """The shipped instruct-stage tiny Qwen3-VL checkpoint (perception, then T-CoT writing and discrimination), where
    the embedded default's Embedder and Reasoner start (read-only; load it with :func:`load_backbone`).

    Raises:
        FileNotFoundError: the package was installed without it; rebuild it with ``make instruct-backbone``.
    """
    return _shipped(INSTRUCT_BACKBONE_DIR, "instruct-backbone", 20)


# Config attribute -> the token whose id it must hold.
_CONFIG_TOKENS = {
    "image_token_id": prompts.IMAGE_PAD,
    "video_token_id": prompts.VIDEO_PAD,
    "vision_start_token_id": prompts.VISION_START,
    "vision_end_token_id": prompts.VISION_END,
}


def check_token_ids(config: PreTrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Check that the model config's special-token ids (vision tokens, ``emb_token_ids``) match the tokenizer.

    Raises:
        ValueError: naming every disagreement; the model and tokenizer files come from different checkpoints.
    """
    problems = []
    for key, token in _CONFIG_TOKENS.items():
        expected = tokenizer.convert_tokens_to_ids(token)
        if getattr(config, key) != expected:
            problems.append(f"config.{key}={getattr(config, key)} but the tokenizer has {token}={expected}")
    emb_ids = getattr(config, prompts.EMB_CONFIG_KEY, None)
    if emb_ids is not None:
        expected = tokenizer.convert_tokens_to_ids(prompts.EMB_TOKEN)
        if list(emb_ids) != [expected]:
            key = prompts.EMB_CONFIG_KEY
            problems.append(f"config.{key}={emb_ids} but the tokenizer has {prompts.EMB_TOKEN}={expected}")
    if problems:
        raise ValueError(
            "model config and tokenizer disagree: " + "; ".join(problems) + ". Save and load the tokenizer "
            "(processor) together with the model it belongs to."
        )


def load_processor(name_or_path: str | Path) -> tuple[PreTrainedConfig, ProcessorMixin]:
    """A Qwen-VL checkpoint's config and processor (left padding), checked against each other, without its weights
    (the vLLM backend loads those itself).

    Raises:
        ValueError: unsupported ``model_type``, or model config and tokenizer ids that disagree.
        TypeError: the processor files belong to another family.
    """
    config = AutoConfig.from_pretrained(name_or_path)
    adapter = ADAPTERS[detect_family(config)]
    processor = AutoProcessor.from_pretrained(name_or_path)
    if not isinstance(processor, adapter.processor_class):
        raise TypeError(
            f"{name_or_path} holds a {type(processor).__name__}, not the {adapter.processor_class.__name__} of a "
            f"{adapter.family} model; its processor files belong to another model"
        )
    check_token_ids(config, processor.tokenizer)  # before the (possibly large) weights are read
    processor.tokenizer.padding_side = "left"
    return config, processor


def load_backbone(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a Qwen-VL checkpoint (local directory, or a hub id if you name one) and its processor.

    Args:
        name_or_path: a checkpoint directory (e.g. from :func:`build_tiny_backbone`) or a hub id such as
            ``"Qwen/Qwen3-VL-2B-Instruct"`` (needs the hub or its local cache).
        dtype: torch dtype of the weights; ``"auto"`` keeps the checkpoint's.
        device: where to put the model.
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``; ``None`` lets transformers choose
            (sdpa where the model supports it).

    Returns:
        ``(model, processor)``: the family's ``*ForConditionalGeneration`` in eval mode on ``device``, and its
        processor with left padding (pooling reads the last positions of a batch).

    Raises:
        ValueError: unsupported ``model_type``, or model config and tokenizer ids that disagree.
    """
    config, processor = load_processor(name_or_path)
    adapter = ADAPTERS[detect_family(config)]
    model = adapter.model_class.from_pretrained(
        name_or_path, config=config, dtype=dtype, attn_implementation=attn_implementation
    )
    return model.to(device).eval(), processor


def add_emb_token(model: PreTrainedModel, processor: ProcessorMixin) -> int:
    """Add the Embedder's ``<emb>`` token to the tokenizer and the model; idempotent. Returns its id.

    ``<emb>`` becomes an ordinary added token (never split, kept by ``decode``). The embedding matrix is resized only
    if the tokenizer outgrows it (real Qwen checkpoints have spare rows; tiny ones do not), with new rows drawn
    around the mean of the old ones. The id is recorded as ``model.config.emb_token_ids`` (``prompts.EMB_CONFIG_KEY``)
    so it travels with ``save_pretrained``; save the processor alongside, since it holds the token.
    """
    tokenizer = processor.tokenizer
    present_id = tokenizer.get_vocab().get(prompts.EMB_TOKEN)
    recorded = getattr(model.config, prompts.EMB_CONFIG_KEY, None)
    if recorded is not None and list(recorded) != [present_id]:
        raise ValueError(
            f"model.config.{prompts.EMB_CONFIG_KEY}={recorded} but the tokenizer has {prompts.EMB_TOKEN}="
            f"{present_id}; load the processor saved with this model"
        )
    if present_id is None:
        tokenizer.add_tokens([AddedToken(prompts.EMB_TOKEN, special=False, normalized=False)])
    emb_id = tokenizer.convert_tokens_to_ids(prompts.EMB_TOKEN)

    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        logger.info("resizing token embeddings from %d to %d rows for %s", rows, len(tokenizer), prompts.EMB_TOKEN)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    setattr(model.config, prompts.EMB_CONFIG_KEY, [emb_id])
    return emb_id
