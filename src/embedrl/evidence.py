"""Evidence and the Embedder's input (docs/method.md §2.5, §3.2).

Evidence is what a T-CoT's cue points at: crops of the original image for ``bbox_2d`` boxes (0-1000 scale) and the
selected frames for ``key_frames``. :func:`build_embedder_messages` is the **one** builder of an Embedder input,
shared by contrastive training, the RL reward and inference (docs/method.md §1.3 invariant 2)::

    user:      [images] [text] [video] <thinking>...</thinking> [evidence images] <rethink>...</rethink><answer>...
               </answer> SUFFIX
    assistant: <emb>
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from embedrl.data.schema import ImageLike, Item
from embedrl.prompts import (
    CUE_BOXES,
    CUE_FOR_MODALITY,
    CUE_FRAMES,
    EMB_TOKEN,
    MAX_CROP_ASPECT,
    MAX_CROPS,
    MIN_CROP_SIDE_PX,
    SUFFIX,
    join_task_text,
)
from embedrl.tcot import TCoT, answer_segment, parse_tcot, split_tcot

Mode = Literal["full", "answer_only", "no_evidence", "raw"]
VideoAs = Literal["video", "frames"]
MODES: tuple[str, ...] = ("full", "answer_only", "no_evidence", "raw")
VIDEO_AS: tuple[str, ...] = ("video", "frames")


def load_image(image: ImageLike) -> Image.Image:
    """A PIL image in RGB; paths are opened (a missing file raises ``FileNotFoundError``)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    with Image.open(Path(image)) as im:
        return im.convert("RGB")


def image_data_url(image: ImageLike) -> str:
    """``data:image/png;base64,...`` of an image (a path or PIL image), as OpenAI-compatible endpoints take it."""
    buffer = io.BytesIO()
    load_image(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def box_to_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """A 0-1000 box as pixel corners of a ``width`` x ``height`` image: ``floor(x * W / 1000)``, ordered and
    clamped to the image, so ``(left, top, right, bottom)`` always lies inside it (it may be empty)."""
    x1, y1, x2, y2 = (min(max(float(v), 0.0), 1000.0) for v in box)
    xs = sorted(math.floor(x * width / 1000) for x in (x1, x2))
    ys = sorted(math.floor(y * height / 1000) for y in (y1, y2))
    return xs[0], ys[0], xs[1], ys[1]


def crop_boxes(
    image: ImageLike, boxes: Sequence[Sequence[float]], *, max_crops: int = MAX_CROPS
) -> tuple[list[Image.Image], list[str]]:
    """Crops of the **original** image for 0-1000 boxes, in the order given, plus the reasons for every drop.

    A crop is dropped when its pixel width or height is below ``MIN_CROP_SIDE_PX`` (10), when its aspect ratio
    exceeds ``MAX_CROP_ASPECT`` (50), when a box has no 4 finite numbers, or beyond ``max_crops``.

    Example:
        >>> crops, problems = crop_boxes(Image.new("RGB", (200, 100)), [[100, 100, 300, 500], [0, 0, 20, 1000]])
        >>> [c.size for c in crops], problems
        ([(40, 40)], ['crop 2 of 4x100 px dropped (side < 10 px)'])
    """
    img = load_image(image)
    crops: list[Image.Image] = []
    problems: list[str] = []
    for i, box in enumerate(boxes, 1):
        if len(box) != 4 or not all(math.isfinite(float(v)) for v in box):
            problems.append(f"crop {i} dropped (box {list(box)} is not 4 finite numbers)")
            continue
        left, top, right, bottom = box_to_pixels(box, *img.size)
        w, h = right - left, bottom - top
        if min(w, h) < MIN_CROP_SIDE_PX:
            problems.append(f"crop {i} of {w}x{h} px dropped (side < {MIN_CROP_SIDE_PX} px)")
            continue
        if max(w / h, h / w) > MAX_CROP_ASPECT:
            problems.append(f"crop {i} of {w}x{h} px dropped (aspect ratio > {MAX_CROP_ASPECT:g})")
            continue
        if len(crops) == max_crops:
            problems.append(f"crop {i} dropped (more than {max_crops} crops)")
            continue
        crops.append(img.crop((left, top, right, bottom)))
    return crops, problems


def select_frames(frames: Sequence[ImageLike], indices: Sequence[int]) -> tuple[list[ImageLike], list[str]]:
    """The frames at 0-based ``indices``, in the order given; out-of-range and repeated indices are dropped and
    recorded. (T-CoT key frames are 1-based in text; :func:`embedrl.tcot.parse_tcot` already made them 0-based.)"""
    chosen: list[ImageLike] = []
    seen: set[int] = set()
    problems: list[str] = []
    for idx in indices:
        if not 0 <= idx < len(frames):
            problems.append(f"frame index {idx} outside 0..{len(frames) - 1} dropped")
        elif idx in seen:
            problems.append(f"repeated frame index {idx} dropped")
        else:
            seen.add(idx)
            chosen.append(frames[idx])
    return chosen, problems


@dataclass
class EmbedderInput:
    """One item's Embedder input, ready for ``processor.apply_chat_template`` and ``processor(...)``.

    Attributes:
        messages: user turn (content parts ``{"type": "image" | "video" | "text"}``) then the ``<emb>`` assistant turn.
        images: the PIL images for the ``image`` parts, in order (item images, frames when ``video_as="frames"``,
            evidence).
        videos: the frame lists for the ``video`` parts, in order.
        tcot: the parsed T-CoT (None in ``raw`` mode).
        problems: parser repairs plus evidence drops, for logging.
    """

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    videos: list[list[Image.Image]] = field(default_factory=list)
    tcot: TCoT | None = None
    problems: list[str] = field(default_factory=list)


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _evidence(item: Item, tcot: TCoT, images: list[Image.Image], frames: list[Image.Image]) -> tuple[list, list]:
    """Crops (image items) or key frames (video items) named by the parsed cue; text items have none."""
    if tcot.cue_key == CUE_BOXES and item.modality == "image":
        # The first image of the item is the one the boxes refer to (its own, unresized pixels).
        crops, problems = crop_boxes(images[0], tcot.boxes)
        if len(item.images) > 1 and crops:
            problems.append(f"boxes cut from the first of {len(item.images)} images")
        return crops, problems
    if tcot.cue_key == CUE_FRAMES and item.modality == "video":
        return select_frames(frames, tcot.frames)
    return [], []


def build_embedder_messages(item: Item, mode: Mode = "full", *, video_as: VideoAs = "video") -> EmbedderInput:
    """The Embedder input of one item (docs/method.md §3.2): the single builder for training, reward and inference.

    User turn, in order: the item's images; its text (instruction + text, placeholders removed, whitespace
    normalised); its video (one ``video`` part, or one ``image`` part per frame with ``video_as="frames"``); then the
    T-CoT by ``mode``; then ``SUFFIX``. Assistant turn: ``<emb>``.

    Modes (docs/method.md §6.4): ``full`` = raw T-CoT text cut after ``</thinking>``, evidence images in the cut;
    ``no_evidence`` = the same text without evidence; ``answer_only`` = only the raw ``<answer>…</answer>`` segment;
    ``raw`` = no T-CoT. A T-CoT without a thinking span is the plain-text fallback: one text part, no evidence.
    The cue is read by the item's modality: ``bbox_2d`` for image, ``key_frames`` for video (1-based over the item's
    frames), ``text_keywords`` for text (no evidence). The first T-CoT text part starts with a newline when it
    follows the item's text directly.

    Raises:
        ValueError: an unknown mode or ``video_as``, or no T-CoT on the item outside ``raw`` mode.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; use one of {MODES}")
    if video_as not in VIDEO_AS:
        raise ValueError(f"video_as={video_as!r}; use one of {VIDEO_AS}")
    if mode != "raw" and item.tcot is None:
        raise ValueError(f"item {item.id!r} has no T-CoT; annotate it first or build it with mode='raw'")
    content: list[dict[str, str]] = []
    images = [load_image(x) for x in item.images]
    frames = [load_image(x) for x in item.frames]
    content += [{"type": "image"} for _ in images]
    out = EmbedderInput(messages=[], images=list(images))
    text = join_task_text(item.instruction, item.text)
    if text:
        content.append(_text(text))
    if frames and video_as == "video":
        content.append({"type": "video"})
        out.videos.append(frames)
    elif frames:
        content += [{"type": "image"} for _ in frames]
        out.images += frames

    if mode != "raw":
        raw = item.tcot or ""
        out.tcot = parse_tcot(raw, cue_key=CUE_FOR_MODALITY[item.modality], n_frames=len(frames) or None)
        out.problems += out.tcot.problems
        sep = "\n" if content and content[-1]["type"] == "text" else ""
        split = split_tcot(raw)
        if mode == "answer_only":
            answer = answer_segment(raw)
            if answer is None:
                out.problems.append("no <answer> segment: answer_only adds no T-CoT text")
            else:
                content.append(_text(sep + answer))
        elif split is None:
            if raw.strip():
                content.append(_text(sep + raw.strip()))
        else:
            thinking, rest = split
            content.append(_text(sep + thinking))
            if mode == "full":
                evidence, problems = _evidence(item, out.tcot, images, frames)
                out.problems += problems
                content += [{"type": "image"} for _ in evidence]
                out.images += evidence
            if rest:
                content.append(_text(rest))

    content.append(_text(SUFFIX))
    out.messages = [{"role": "user", "content": content}, {"role": "assistant", "content": [_text(EMB_TOKEN)]}]
    return out
