"""Per-image vision work done once per unique image or video, for the EG-RL reward (docs/rewards.md §2).

The reward embeds every rollout of an item as the item's own images or video, the rollout's T-CoT and the crops or
key frames it names (docs/method.md §4.9), so the ``G`` rollouts of one item repeat its visuals ``G`` times. Two
facts make reusing them exact:

- the Qwen-VL image and video processors treat each image (each video) on its own: its pixel rows and grid do not
  depend on the other images of the call;
- the vision tower attends within each image only (``cu_seqlens``) and its other layers work row by row, so one
  image's vision features (and Qwen3-VL's deepstack features) do not depend on the batch either.

:class:`VisualCache` keeps both: the processor's pixel rows, grid (and video metadata) of each unique image or video,
keyed by a digest of its pixels and the processor settings, and the vision tower's output for each visual. A vision
call on pixels the cached processors returned (the usual collate-then-forward) reuses their keys; any other pixels
are keyed by a digest of the processed pixel rows and grid, so the cache is exact for any input.
:meth:`VisualCache.attach` puts it in front of a model's vision tower and :meth:`VisualCache.processor` in front of a
processor, for the duration of a ``with`` block (:meth:`embedrl.models.Embedder.sharing_visuals`); everything else
(the chat, the tokens, the language model, the pooling) runs as before. It holds features without gradients and is
for inference only.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers import BatchFeature, ProcessorMixin

__all__ = ["VisualCache", "VisualCacheStats", "visual_digest"]

# Processor output keys per kind: the pixel rows and the per-visual (t, h, w) grid.
_PIXELS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}
_METADATA = "video_metadata"  # per-video metadata, passed in and (Qwen2.5/3-VL) returned by the video processor
_FEATURE_METHODS = {"image": "get_image_features", "video": "get_video_features"}
_ASSEMBLED_KEPT = 4  # processor outputs remembered for the vision step (one collate is followed by its forward)


def visual_digest(visual: Any) -> tuple[Any, ...]:
    """A content key of one image: mode, size and a BLAKE2b digest of the pixels (PIL image, numpy array or tensor).

    Raises:
        TypeError: any other kind of value.
    """
    if isinstance(visual, Image.Image):
        return ("pil", visual.mode, visual.size, hashlib.blake2b(visual.tobytes(), digest_size=16).digest())
    if isinstance(visual, Tensor):
        visual = visual.detach().cpu().numpy()
    if isinstance(visual, np.ndarray):
        data = np.ascontiguousarray(visual)
        return ("array", data.dtype.str, data.shape, hashlib.blake2b(data.tobytes(), digest_size=16).digest())
    raise TypeError(f"cannot key a visual of type {type(visual).__name__}; pass PIL images, arrays or tensors")


def _tensor_digest(tensor: Tensor) -> tuple[Any, ...]:
    """A content key of a block of pixel rows: dtype, shape and a digest of its bytes (any dtype, any device)."""
    data = tensor.detach().contiguous().cpu().view(torch.uint8).numpy()
    return (str(tensor.dtype), tuple(tensor.shape), hashlib.blake2b(data.tobytes(), digest_size=16).digest())


@dataclass
class VisualCacheStats:
    """How many visuals were served from the cache (hits) and how many were computed (misses), per stage."""

    processor_hits: int = 0
    processor_misses: int = 0
    vision_hits: int = 0
    vision_misses: int = 0


@dataclass(frozen=True)
class _Features:
    """One visual's vision-tower output: its merged features and (Qwen3-VL) one deepstack block per layer."""

    output_type: type
    pooled: Tensor  # [n_tokens, D]
    deepstack: tuple[Tensor, ...] | None  # per deepstack layer: [n_tokens, D]


class _CachedSubProcessor:
    """Stands in for an image or video processor: its attributes are the wrapped one's, its calls go through the
    cache."""

    def __init__(self, cache: VisualCache, kind: str, inner: Any) -> None:
        self._cache, self._kind, self._inner = cache, kind, inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, visuals: Sequence[Any], **kwargs: Any) -> BatchFeature:
        return self._cache._process(self._kind, self._inner, visuals, kwargs)


class VisualCache:
    """Processor outputs and vision features per unique image / video content, shared by the calls made while
    :meth:`attach` is active (docs/rewards.md §2). Counts its hits and misses in :attr:`stats`.

    Keys: an image is keyed by its pixels (:func:`visual_digest`) and the processor's keyword arguments; a video by
    its frames, its metadata and those arguments; a vision-tower input by its processed pixel rows and grid. The
    model must not change while the cache is in use (the reward's Embedder is frozen).
    """

    def __init__(self) -> None:
        self.stats = VisualCacheStats()
        self._digests: dict[int, tuple[Any, tuple[Any, ...]]] = {}  # id(visual) -> (visual, kept alive; its key)
        self._processed: dict[tuple[Any, ...], dict[str, Any]] = {}  # visual key -> its processor outputs
        self._features: dict[tuple[Any, ...], _Features] = {}  # visual key -> its vision features
        # The last few pixel tensors the cached processors returned, with their grids and per-visual keys: a vision
        # call on one of them (the usual case: collate, then forward) needs no digest of its pixels.
        self._assembled: list[tuple[Tensor, Tensor, list[tuple[Any, ...]]]] = []
        self._computing = False  # inside a wrapped feature call: nested calls (Qwen3-VL video -> image) pass through

    # ------------------------------------------------------------------------------------------------------------
    # Processor outputs
    # ------------------------------------------------------------------------------------------------------------

    def _digest(self, visual: Any) -> tuple[Any, ...]:
        """:func:`visual_digest`, computed once per object (the same PIL image recurs in every rollout)."""
        known = self._digests.get(id(visual))
        if known is not None and known[0] is visual:
            return known[1]
        key = visual_digest(visual)
        self._digests[id(visual)] = (visual, key)
        return key

    def _process(self, kind: str, inner: Any, visuals: Sequence[Any], kwargs: dict[str, Any]) -> BatchFeature:
        """The processor's output for ``visuals``: cached per visual, the missing ones computed in one call."""
        if not isinstance(visuals, list | tuple):
            raise TypeError(f"the cached {kind} processor takes a list of {kind}s, got {type(visuals).__name__}")
        kwargs = dict(kwargs)
        metadata = kwargs.pop(_METADATA, None) if kind == "video" else None
        if metadata is not None and len(metadata) != len(visuals):
            raise ValueError(f"{len(metadata)} video_metadata entries for {len(visuals)} videos")
        shared = repr(sorted(kwargs.items()))
        keys = []
        for i, visual in enumerate(visuals):
            if kind == "image":
                content: tuple[Any, ...] = self._digest(visual)
            else:
                content = tuple(self._digest(frame) for frame in visual)
            keys.append((kind, content, shared, repr(metadata[i]) if metadata is not None else None))
        missing = [key for key in dict.fromkeys(keys) if key not in self._processed]
        if missing:
            first = {key: keys.index(key) for key in missing}
            call_kwargs = dict(kwargs)
            if metadata is not None:
                call_kwargs[_METADATA] = [metadata[first[key]] for key in missing]
            out = inner([visuals[first[key]] for key in missing], **call_kwargs)
            self._store(kind, missing, out)
        self.stats.processor_misses += len(missing)
        self.stats.processor_hits += len(keys) - len(missing)
        return self._assemble(kind, keys)

    def _store(self, kind: str, keys: list[tuple[Any, ...]], out: Any) -> None:
        """Split one processor output into per-visual entries."""
        pixels_key, grid_key = _PIXELS[kind]
        unknown = sorted(set(out) - {pixels_key, grid_key, _METADATA})
        if unknown:
            raise ValueError(f"the {kind} processor returned {unknown}, which VisualCache cannot split per {kind}")
        pixels, grid = out[pixels_key], out[grid_key]
        if not (isinstance(pixels, Tensor) and isinstance(grid, Tensor)) or grid.shape[0] != len(keys):
            raise ValueError(f"the {kind} processor returned no per-{kind} tensors {pixels_key} / {grid_key}")
        rows = pixels.split(grid.prod(-1).tolist())
        metadata = out.get(_METADATA)
        for i, key in enumerate(keys):
            entry: dict[str, Any] = {pixels_key: rows[i], grid_key: grid[i]}
            if metadata is not None:
                entry[_METADATA] = metadata[i]
            self._processed[key] = entry

    def _assemble(self, kind: str, keys: list[tuple[Any, ...]]) -> BatchFeature:
        pixels_key, grid_key = _PIXELS[kind]
        entries = [self._processed[key] for key in keys]
        data: dict[str, Any] = {
            pixels_key: torch.cat([e[pixels_key] for e in entries]),
            grid_key: torch.stack([e[grid_key] for e in entries]),
        }
        if entries and _METADATA in entries[0]:
            data[_METADATA] = [copy.copy(e[_METADATA]) for e in entries]  # the processor may fill in fps
        self._assembled = [*self._assembled[-(_ASSEMBLED_KEPT - 1) :], (data[pixels_key], data[grid_key], keys)]
        return BatchFeature(data)

    def processor(self, processor: ProcessorMixin) -> ProcessorMixin:
        """A shallow copy of ``processor`` whose image and video processors go through this cache (the tokenizer,
        chat template and settings are shared with the original, which is left as it is)."""
        twin = copy.copy(processor)
        for kind, attr in (("image", "image_processor"), ("video", "video_processor")):
            if getattr(processor, attr, None) is not None:
                setattr(twin, attr, _CachedSubProcessor(self, kind, getattr(processor, attr)))
        return twin

    # ------------------------------------------------------------------------------------------------------------
    # Vision features
    # ------------------------------------------------------------------------------------------------------------

    def _features_of(
        self, kind: str, original: Callable[..., Any], pixel_values: Tensor, grid_thw: Tensor | None, **kwargs: Any
    ) -> Any:
        """``original(pixel_values, grid_thw, **kwargs)`` (a ``get_*_features`` method), per visual from the cache."""
        if self._computing:
            return original(pixel_values, grid_thw, **kwargs)
        if torch.is_grad_enabled():
            raise RuntimeError(
                "VisualCache holds vision features without gradients: use it under torch.inference_mode / no_grad "
                "(Embedder.encode), not for a training forward"
            )
        if grid_thw is None:
            raise ValueError(f"the cached {kind} features need the {kind} grid_thw")
        tensors = sorted(k for k, v in kwargs.items() if isinstance(v, Tensor))
        if tensors:
            raise ValueError(f"cannot split the batch-level tensors {tensors} per {kind}; call without the cache")
        blocks = pixel_values.split(grid_thw.prod(-1).tolist())  # the pixel rows of each visual
        keys = self._assembled_keys(pixel_values, grid_thw) or [
            (kind, tuple(g.tolist()), _tensor_digest(b)) for g, b in zip(grid_thw, blocks, strict=True)
        ]
        missing = [key for key in dict.fromkeys(keys) if key not in self._features]
        if missing:
            first = [keys.index(key) for key in missing]
            self._computing = True
            try:
                out = original(torch.cat([blocks[i] for i in first]), grid_thw[first], **kwargs)
            finally:
                self._computing = False
            deepstack = getattr(out, "deepstack_features", None)
            for j, key in enumerate(missing):
                layers = tuple(layer[j] for layer in deepstack) if deepstack is not None else None
                self._features[key] = _Features(type(out), out.pooler_output[j], layers)
        self.stats.vision_misses += len(missing)
        self.stats.vision_hits += len(keys) - len(missing)
        entries = [self._features[key] for key in keys]
        fields: dict[str, Any] = {"pooler_output": tuple(e.pooled for e in entries)}
        if entries[0].deepstack is not None:
            n_layers = len(entries[0].deepstack)
            fields["deepstack_features"] = [tuple(e.deepstack[layer] for e in entries) for layer in range(n_layers)]
        return entries[0].output_type(**fields)

    def _assembled_keys(self, pixel_values: Tensor, grid_thw: Tensor) -> list[tuple[Any, ...]] | None:
        """The per-visual keys of ``pixel_values`` when it is (or equals, e.g. moved to a GPU) one of the tensors the
        cached processors returned last, with the same grid; else None (then its pixels are digested)."""
        for pixels, grid, keys in reversed(self._assembled):
            if (
                pixels.shape == pixel_values.shape
                and grid.shape == grid_thw.shape
                and torch.equal(grid, grid_thw.cpu())
                and (pixels is pixel_values or torch.equal(pixels, pixel_values.cpu()))
            ):
                return keys
        return None

    @contextmanager
    def attach(self, vision_language_model: torch.nn.Module) -> Iterator[None]:
        """Route the model's ``get_image_features`` / ``get_video_features`` through this cache inside the block;
        the instance attributes are removed again on exit."""
        for kind, name in _FEATURE_METHODS.items():
            if name in vars(vision_language_model):
                raise RuntimeError(f"{type(vision_language_model).__name__}.{name} is already wrapped")
            original = getattr(vision_language_model, name)

            def wrapped(pixel_values, grid_thw=None, _kind=kind, _original=original, **kwargs):  # type: ignore[no-untyped-def]
                return self._features_of(_kind, _original, pixel_values, grid_thw, **kwargs)

            setattr(vision_language_model, name, wrapped)
        try:
            yield
        finally:
            for name in _FEATURE_METHODS.values():
                vars(vision_language_model).pop(name, None)
