"""One adapter per Qwen-VL family: the classes, patch geometry, pixel budgets and tiny configs that differ.

The family is detected once, from the HF config's ``model_type`` (:func:`detect_family`); code downstream asks the
family's :class:`FamilyAdapter` instead of branching on names or paths.

Example:
    >>> from transformers import Qwen3VLConfig
    >>> adapter = get_adapter(Qwen3VLConfig())
    >>> adapter.family, adapter.patch_size, adapter.factor
    ('qwen3-vl', 16, 32)
    >>> adapter.default_budget().image_min_pixels  # docs/method.md §3.2: 128 visual tokens of 32 x 32 px
    131072
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import (
    PreTrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from embedrl import prompts
from embedrl.config import TinyBackboneConfig

__all__ = ["ADAPTERS", "FamilyAdapter", "PixelBudget", "detect_family", "get_adapter"]

# prompts.py writes the pixel budgets for Qwen3-VL, whose visual token covers 32 x 32 px (patch 16, merge 2).
_BUDGET_TOKEN_AREA = 32 * 32
# Model-config attribute in which a checkpoint may record its own pixel budget (tiny backbones do).
BUDGET_CONFIG_KEY = "embedrl_pixel_budget"


@dataclass(frozen=True)
class PixelBudget:
    """Min/max pixels per image and per video frame, and the frame count a whole-clip video budget assumes."""

    image_min_pixels: int
    image_max_pixels: int
    frame_min_pixels: int
    frame_max_pixels: int
    num_frames: int = prompts.VIDEO_NUM_FRAMES

    def __post_init__(self) -> None:
        if not 0 < self.image_min_pixels <= self.image_max_pixels:
            raise ValueError(f"need 0 < image_min_pixels <= image_max_pixels, got {self}")
        if not 0 < self.frame_min_pixels <= self.frame_max_pixels:
            raise ValueError(f"need 0 < frame_min_pixels <= frame_max_pixels, got {self}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames={self.num_frames} must be >= 1")


@dataclass(frozen=True)
class FamilyAdapter:
    """Everything embedrl needs to know about one Qwen-VL family. One frozen instance per family in ``ADAPTERS``."""

    family: str  # embedrl's name, as in TinyBackboneConfig.family
    model_type: str  # the HF config's model_type
    model_class: type[PreTrainedModel]
    config_class: type[PreTrainedConfig]
    processor_class: type[ProcessorMixin]
    image_processor_class: type
    video_processor_class: type
    patch_size: int  # vision patch side in pixels
    merge_size: int  # spatial merge: merge_size x merge_size patches become one visual token
    temporal_patch_size: int  # consecutive video frames folded into one temporal patch
    video_size_per_clip: bool  # the video processor's size bounds the whole clip (True) or each frame (False)
    tiny_text: Callable[[TinyBackboneConfig], dict[str, Any]]  # text_config kwargs of a tiny model, without ids
    tiny_vision: Callable[[TinyBackboneConfig], dict[str, Any]]  # vision_config kwargs, without patch geometry

    @property
    def factor(self) -> int:
        """Side in pixels of the square one visual token covers (``patch_size * merge_size``)."""
        return self.patch_size * self.merge_size

    def default_budget(self) -> PixelBudget:
        """The real-checkpoint budgets of docs/method.md §3.2 (``prompts.py``), kept as token counts for this family.

        prompts.py gives pixels for Qwen3-VL's 32 px tokens; Qwen2/2.5-VL tokens cover 28 px, so their pixel budgets
        are scaled to give the same number of visual tokens.
        """

        def scale(pixels: int) -> int:
            return pixels // _BUDGET_TOKEN_AREA * self.factor**2

        return PixelBudget(
            image_min_pixels=scale(prompts.IMAGE_MIN_PIXELS),
            image_max_pixels=scale(prompts.IMAGE_MAX_PIXELS),
            frame_min_pixels=scale(prompts.FRAME_MIN_PIXELS),
            frame_max_pixels=scale(prompts.FRAME_MAX_PIXELS),
            num_frames=prompts.VIDEO_NUM_FRAMES,
        )

    def checkpoint_budget(self, config: PreTrainedConfig) -> PixelBudget:
        """The budget a checkpoint records in ``config.embedrl_pixel_budget`` (tiny backbones), else the
        docs/method.md §3.2 budget of :meth:`default_budget` (real checkpoints)."""
        recorded = getattr(config, BUDGET_CONFIG_KEY, None)
        return PixelBudget(**recorded) if recorded else self.default_budget()

    def image_size(self, budget: PixelBudget) -> dict[str, int]:
        """The image processor's ``size`` (min/max pixels, not edge lengths) for ``budget``."""
        return {"shortest_edge": budget.image_min_pixels, "longest_edge": budget.image_max_pixels}

    def video_size(self, budget: PixelBudget) -> dict[str, int]:
        """The video processor's ``size`` for ``budget``: per frame, or per clip of ``budget.num_frames`` frames."""
        frames = budget.num_frames if self.video_size_per_clip else 1
        return {"shortest_edge": budget.frame_min_pixels * frames, "longest_edge": budget.frame_max_pixels * frames}

    def processor_kwargs(self, budget: PixelBudget | None = None) -> dict[str, dict[str, Any]]:
        """Keyword arguments for a processor call that apply ``budget`` (default: :meth:`default_budget`).

        Videos are taken as the given frame list (``do_sample_frames=False``), so 1-based key-frame indices refer to
        the frames the caller passed, and each frame's pixels are capped as in the Qwen reference code.

        Example: ``processor(text=..., images=..., videos=..., return_tensors="pt", **adapter.processor_kwargs())``
        """
        budget = budget or self.default_budget()
        return {
            "images_kwargs": {"size": self.image_size(budget)},
            "videos_kwargs": {
                "size": self.video_size(budget),
                "do_sample_frames": False,
                "cap_pixels_per_frame": True,
            },
        }

    def tiny_text_config(self, cfg: TinyBackboneConfig) -> dict[str, Any]:
        """text_config kwargs of a tiny model (special-token ids are added by the builder, from the tokenizer)."""
        return self.tiny_text(cfg)

    def tiny_vision_config(self, cfg: TinyBackboneConfig) -> dict[str, Any]:
        """vision_config kwargs of a tiny model, with this family's patch geometry."""
        geometry = {
            "patch_size": self.patch_size,
            "spatial_merge_size": self.merge_size,
            "temporal_patch_size": self.temporal_patch_size,
        }
        return self.tiny_vision(cfg) | geometry


# ----------------------------------------------------------------------------------------------------------------
# Tiny configs (docs/backbones.md, tiny backbones)
# ----------------------------------------------------------------------------------------------------------------


def _mrope_section(head_dim: int) -> list[int]:
    """Rotary half-dimension split over (time, height, width) as 1/4, 3/8, 3/8 (Qwen's ratio); sums to head_dim/2."""
    half = head_dim // 2
    time = half // 4
    height = (half - time) // 2
    return [time, height, half - time - height]


def _tiny_text_qwen2(cfg: TinyBackboneConfig) -> dict[str, Any]:
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "intermediate_size": cfg.intermediate_size,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(head_dim)},
    }


def _tiny_text_qwen3(cfg: TinyBackboneConfig) -> dict[str, Any]:
    text = _tiny_text_qwen2(cfg)
    text["head_dim"] = cfg.hidden_size // cfg.num_attention_heads
    text["rope_parameters"]["mrope_interleaved"] = True
    return text


def _tiny_vision_qwen2(cfg: TinyBackboneConfig) -> dict[str, Any]:
    return {
        "depth": cfg.vision_depth,
        "embed_dim": cfg.vision_hidden_size,
        "num_heads": cfg.vision_num_heads,
        "hidden_size": cfg.hidden_size,  # the merger's output width = the text hidden size
        "mlp_ratio": 2,
    }


def _tiny_vision_sized(cfg: TinyBackboneConfig) -> dict[str, Any]:
    """The vision kwargs Qwen2.5-VL and Qwen3-VL share: an MLP width and the merger's output width."""
    return {
        "depth": cfg.vision_depth,
        "hidden_size": cfg.vision_hidden_size,
        "intermediate_size": 2 * cfg.vision_hidden_size,
        "num_heads": cfg.vision_num_heads,
        "out_hidden_size": cfg.hidden_size,
    }


def _tiny_vision_qwen2_5(cfg: TinyBackboneConfig) -> dict[str, Any]:
    return _tiny_vision_sized(cfg) | {
        "window_size": 56,  # windowed attention over 2 x 2 merged tokens of 28 px
        "fullatt_block_indexes": [cfg.vision_depth - 1],
    }


def _tiny_vision_qwen3(cfg: TinyBackboneConfig) -> dict[str, Any]:
    return _tiny_vision_sized(cfg) | {
        "num_position_embeddings": 64,  # an 8 x 8 grid of learned positions, interpolated to the image
        "deepstack_visual_indexes": [0],
    }


# ----------------------------------------------------------------------------------------------------------------
# The families
# ----------------------------------------------------------------------------------------------------------------

_QWEN2_VL = FamilyAdapter(
    family="qwen2-vl",
    model_type="qwen2_vl",
    model_class=Qwen2VLForConditionalGeneration,
    config_class=Qwen2VLConfig,
    processor_class=Qwen2VLProcessor,
    image_processor_class=Qwen2VLImageProcessor,
    video_processor_class=Qwen2VLVideoProcessor,
    patch_size=14,
    merge_size=2,
    temporal_patch_size=2,
    video_size_per_clip=False,
    tiny_text=_tiny_text_qwen2,
    tiny_vision=_tiny_vision_qwen2,
)


def _like_qwen2_vl(
    family: str, model_type: str, model: type, config: type, processor: type, **changes: Any
) -> FamilyAdapter:
    """A family built like Qwen2-VL (processors, patch geometry, tiny configs) but for its classes and ``changes``."""
    return dataclasses.replace(_QWEN2_VL, family=family, model_type=model_type, model_class=model,
                               config_class=config, processor_class=processor, **changes)  # fmt: skip


ADAPTERS: dict[str, FamilyAdapter] = {
    "qwen2-vl": _QWEN2_VL,
    "qwen2.5-vl": _like_qwen2_vl("qwen2.5-vl", "qwen2_5_vl", Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig,
                                 Qwen2_5_VLProcessor, tiny_vision=_tiny_vision_qwen2_5),
    # Qwen3-VL: 16 px patches and its own video processor, whose size bounds the whole clip.
    "qwen3-vl": _like_qwen2_vl("qwen3-vl", "qwen3_vl", Qwen3VLForConditionalGeneration, Qwen3VLConfig,
                               Qwen3VLProcessor, video_processor_class=Qwen3VLVideoProcessor, patch_size=16,
                               video_size_per_clip=True, tiny_text=_tiny_text_qwen3, tiny_vision=_tiny_vision_qwen3),
}  # fmt: skip

_FAMILY_BY_MODEL_TYPE: dict[str, str] = {adapter.model_type: family for family, adapter in ADAPTERS.items()}


def detect_family(config: PreTrainedConfig) -> str:
    """The embedrl family of an HF config, from its ``model_type`` alone (never from a name or path).

    Raises:
        ValueError: the model_type is not one of the supported Qwen-VL families.
    """
    model_type = config.model_type
    if model_type not in _FAMILY_BY_MODEL_TYPE:
        supported = ", ".join(f"{mt} ({family})" for mt, family in _FAMILY_BY_MODEL_TYPE.items())
        raise ValueError(
            f"unsupported backbone model_type {model_type!r}; embedrl supports {supported}. "
            "Load a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint, or build one with `embedrl backbone tiny`."
        )
    return _FAMILY_BY_MODEL_TYPE[model_type]


def get_adapter(model_or_config: PreTrainedModel | PreTrainedConfig) -> FamilyAdapter:
    """The :class:`FamilyAdapter` of a loaded model or of its config."""
    if isinstance(model_or_config, PreTrainedModel):
        return ADAPTERS[detect_family(model_or_config.config)]
    if isinstance(model_or_config, PreTrainedConfig):
        return ADAPTERS[detect_family(model_or_config)]
    raise TypeError(
        f"get_adapter needs a transformers PreTrainedModel or PreTrainedConfig, got {type(model_or_config).__name__}; "
        "for a PEFT-wrapped model pass model.config"
    )
