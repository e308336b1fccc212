"""Evidence and the Embedder's input (docs/method.md §2.5, §3.2).

Evidence is what a T-CoT's cue points at: crops of the original image for ``bbox_2d`` boxes (0-1000 scale) and the
selected frames for ``key_frames``. :func:`build_embedder_messages` is the **one** builder of an Embedder input,
shared by contrastive training, the RL reward and inference (docs/method.md §1.3 invariant 2). It has two layouts:

- ``embedrl`` (ours, docs/method.md §3.2)::

    user:      [images] [text] [video] <thinking>...</thinking> [evidence images] <rethink>...</rethink><answer>...
               </answer> SUFFIX
    assistant: <emb>

- ``reference``: the layout the published Embed-RL checkpoints were evaluated with, token by token
  (:func:`build_reference_messages`, docs/published-models.md): a single image before the text, the text before
  several images or frames (each its own image), the reference's T-CoT split and evidence rules, its closing
  sentence, and every visual pre-resized with its own pixel budget.
"""

from __future__ import annotations

import base64
import io
import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from embedrl.config import UserError
from embedrl.data.schema import ImageLike, Item
from embedrl.prompts import (
    CUE_BOXES,
    CUE_FOR_MODALITY,
    CUE_FRAMES,
    EMB_TOKEN,
    LAYOUT_REFERENCE,
    LAYOUTS,
    MAX_CROP_ASPECT,
    MAX_CROPS,
    MIN_CROP_SIDE_PX,
    REFERENCE_BOX_SCALE,
    REFERENCE_CUE_RE,
    REFERENCE_REMOVED_TOKENS,
    REFERENCE_SUFFIX,
    REFERENCE_THINKING_PART,
    REFERENCE_THINKING_RE,
    SUFFIX,
    join_task_text,
)
from embedrl.tcot import TCoT, answer_segment, parse_tcot, split_tcot

Mode = Literal["full", "answer_only", "no_evidence", "raw"]
VideoAs = Literal["video", "frames"]
Layout = Literal["embedrl", "reference"]
MODES: tuple[str, ...] = ("full", "answer_only", "no_evidence", "raw")
VIDEO_AS: tuple[str, ...] = ("video", "frames")


class LayoutError(UserError, ValueError):
    """An item the chosen Embedder input layout cannot represent (e.g. images and frames in one reference item)."""


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
        if not _is_box(box):
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


def _is_box(box: Any) -> bool:
    """4 finite real numbers (bools, strings, None and nested lists are not)."""
    try:
        values = list(box)
    except TypeError:
        return False
    return len(values) == 4 and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


def select_frames(frames: Sequence[ImageLike], indices: Sequence[int]) -> tuple[list[ImageLike], list[str]]:
    """The frames at 0-based ``indices``, in the order given; non-integer (``1.5``, ``"1"``, ``None``, ``True``),
    out-of-range and repeated indices are dropped and recorded. (T-CoT key frames are 1-based in text;
    :func:`embedrl.tcot.parse_tcot` already made them 0-based.)"""
    chosen: list[ImageLike] = []
    seen: set[int] = set()
    problems: list[str] = []
    for idx in indices:
        if not isinstance(idx, numbers.Integral) or isinstance(idx, bool):
            problems.append(f"frame index {idx!r} is not an integer, dropped")
        elif not 0 <= idx < len(frames):
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
        tcot: the parsed T-CoT (None in ``raw`` mode, and in the reference layout, which does not use our parser).
        problems: parser repairs plus evidence drops, for logging.
        cue: the cue object as the reference layout read it (its first ``{...}`` group, parsed as JSON); None in the
            embedrl layout and when the reference fell back to plain text.
        evidence_count: evidence images (crops, key frames) added after the thinking text.
    """

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    videos: list[list[Image.Image]] = field(default_factory=list)
    tcot: TCoT | None = None
    problems: list[str] = field(default_factory=list)
    cue: dict[str, Any] | None = None
    evidence_count: int = 0


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


def build_embedder_messages(
    item: Item,
    mode: Mode = "full",
    *,
    video_as: VideoAs = "video",
    layout: Layout = "embedrl",
    resize: ReferenceResize | None = None,
) -> EmbedderInput:
    """The Embedder input of one item (docs/method.md §3.2): the single builder for training, reward and inference.

    ``layout="reference"`` hands the item to :func:`build_reference_messages` (with ``resize``; ``video_as`` does not
    apply there: frames are always separate images). The rest of this docstring describes the ``embedrl`` layout.

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
        ValueError: an unknown mode, ``video_as`` or layout, or no T-CoT on the item outside ``raw`` mode.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; use one of {LAYOUTS}")
    if layout == LAYOUT_REFERENCE:
        return build_reference_messages(item, mode, resize=resize)
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
                out.evidence_count = len(evidence)
            if rest:
                content.append(_text(rest))

    content.append(_text(SUFFIX))
    out.messages = [{"role": "user", "content": content}, {"role": "assistant", "content": [_text(EMB_TOKEN)]}]
    return out


# ----------------------------------------------------------------------------------------------------------------
# The reference layout (docs/published-models.md): what the published Embed-RL checkpoints were evaluated with
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceResize:
    """The pixel budgets the reference layout resizes each visual into, before the processor sees it.

    Attributes:
        factor: side in pixels of one visual token (32 for Qwen3-VL); resized sides are multiples of it.
        image: ``(min_pixels, max_pixels)`` of an item's single image and of its crops.
        frame: ``(min_pixels, max_pixels)`` of each frame (or image) of an item with several, and of their crops and
            key frames.
    """

    factor: int
    image: tuple[int, int]
    frame: tuple[int, int]

    def size(self, width: int, height: int, kind: str) -> tuple[int, int]:
        """``(width, height)`` a ``kind`` (``image`` or ``frame``) visual is resized to."""
        low, high = self.image if kind == "image" else self.frame
        h, w = smart_resize(height, width, self.factor, low, high)
        return w, h


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """``(height, width)``: both sides multiples of ``factor``, the area inside ``[min_pixels, max_pixels]``, the
    aspect ratio kept as well as the rounding allows (the qwen-vl-utils rule the reference resizes with).

    Each side is first rounded to the nearest multiple; an area above the maximum is scaled down (sides floored), one
    below the minimum scaled up (sides ceiled).

    Example:
        >>> smart_resize(360, 640, 32, 128 * 32 * 32, 768 * 32 * 32)
        (352, 640)
    """
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def reference_rgb(image: ImageLike) -> Image.Image:
    """An RGB image as the reference's image loader makes it: RGBA composited on white, other modes converted."""
    if isinstance(image, Image.Image):
        img = image
    else:
        with Image.open(Path(image)) as opened:
            img = opened.copy()
    if img.mode == "RGBA":
        flat = Image.new("RGB", img.size, (255, 255, 255))
        flat.paste(img, mask=img.getchannel("A"))
        return flat
    return img if img.mode == "RGB" else img.convert("RGB")


def reference_text(instruction: str, text: str) -> str:
    """The item's text as the reference passes it: instruction, one space, text (either may be empty); then only
    ``<|image_pad|>`` and ``<|video_pad|>`` removed and the ends stripped. Inner whitespace stays.

    >>> reference_text("Find the image:", " a  red\\nkite <|image_pad|> ")
    'Find the image: a  red\\nkite'
    """
    joined = " ".join(part for part in (instruction, text) if part)
    for token in REFERENCE_REMOVED_TOKENS:
        joined = joined.replace(token, "")
    return joined.strip()


@dataclass(frozen=True)
class ReferenceSplit:
    """A T-CoT as the reference cuts it.

    Attributes:
        thinking: the content of the first ``<thinking>…</thinking>`` (unstripped); None = the plain-text fallback
            (no thinking span, no ``{...}`` group in it, or invalid JSON): the whole T-CoT is one text part.
        cue: the first brace group without nested braces inside the thinking, parsed as JSON (None on fallback).
        rest: everything after ``</thinking>``, stripped ('' = no part).
        problems: what the split dropped or fell back on.
    """

    thinking: str | None
    cue: dict[str, Any] | None
    rest: str
    problems: tuple[str, ...] = ()


def split_reference_tcot(raw: str) -> ReferenceSplit:
    """Cut a T-CoT the way the reference does (docs/published-models.md, "The T-CoT split").

    >>> split_reference_tcot('Sure. <thinking>t {"text_keywords": ["a"]}</thinking>  <rethink>r</rethink>')
    ReferenceSplit(thinking='t {"text_keywords": ["a"]}', cue={'text_keywords': ['a']}, rest='<rethink>r</rethink>', \
problems=('text before <thinking> dropped',))
    """
    match = REFERENCE_THINKING_RE.search(raw)
    if match is None:
        return ReferenceSplit(None, None, "", ("no <thinking>...</thinking>: the whole T-CoT is one text part",))
    thinking = match.group(1)
    found = REFERENCE_CUE_RE.search(thinking)
    if found is None:
        return ReferenceSplit(None, None, "", ("no {...} cue in the thinking: the whole T-CoT is one text part",))
    try:
        cue = json.loads(found.group(0))
    except json.JSONDecodeError:
        return ReferenceSplit(None, None, "", ("the cue is not valid JSON: the whole T-CoT is one text part",))
    problems = ("text before <thinking> dropped",) if raw[: match.start()] else ()
    return ReferenceSplit(thinking, cue, raw[match.end() :].strip(), problems)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float))  # bool is an int here, as in the reference's arithmetic


def _is_finite_number(value: object) -> bool:
    try:
        return _is_number(value) and math.isfinite(value)  # type: ignore[arg-type]
    except OverflowError:  # an int too large for a float: the reference's division raises on it too
        return False


def reference_crops(image: Image.Image, value: object) -> tuple[list[Image.Image], list[str]]:
    """Crops of ``image`` (the original, unresized) for a ``bbox_2d`` value, as the reference cuts them.

    Each box is a list of at least 4 numbers on the 0-1000 scale (more are ignored, fewer skip the box); corners are
    ``int(v * side / 1000)`` (truncated toward zero), then clamped to ``[0, side]``; a crop is kept when both sides
    are at least ``MIN_CROP_SIDE_PX`` and its aspect ratio is at most ``MAX_CROP_ASPECT``. Reversed boxes fail that
    test (never swapped); duplicates are kept; there is no cap. Where the reference raises (a flat box, a box that is
    not a list, a non-numeric or non-finite coordinate), a flat box is read as one box and the others are dropped,
    each recorded.
    """
    problems: list[str] = []
    if not isinstance(value, list):
        return [], [f"bbox_2d {value!r} is not a list: no crops"]
    boxes: list[Any] = value
    if value and all(_is_number(v) for v in value):
        boxes = [value]
        problems.append("flat bbox_2d box read as one box (the reference raises on it)")
    width, height = image.size
    crops: list[Image.Image] = []
    for i, box in enumerate(boxes, 1):
        if not isinstance(box, list):
            problems.append(f"box {i} ({box!r}) is not a list: dropped (the reference raises)")
            continue
        if len(box) < 4:
            problems.append(f"box {i} has fewer than 4 numbers: skipped")
            continue
        if not all(_is_finite_number(v) for v in box[:4]):
            problems.append(
                f"box {i} ({box!r}) has a non-numeric or non-finite corner: dropped (the reference raises)"
            )
            continue
        x1 = int(box[0] * width / REFERENCE_BOX_SCALE)
        y1 = int(box[1] * height / REFERENCE_BOX_SCALE)
        x2 = int(box[2] * width / REFERENCE_BOX_SCALE)
        y2 = int(box[3] * height / REFERENCE_BOX_SCALE)
        x1, x2 = (max(0, min(x, width)) for x in (x1, x2))
        y1, y2 = (max(0, min(y, height)) for y in (y1, y2))
        w, h = x2 - x1, y2 - y1
        if w <= 0 or h <= 0:
            problems.append(f"box {i} is reversed or empty after clamping: dropped (never swapped)")
        elif w < MIN_CROP_SIDE_PX or h < MIN_CROP_SIDE_PX:
            problems.append(f"crop {i} of {w}x{h} px dropped (side < {MIN_CROP_SIDE_PX} px)")
        elif max(w, h) / min(w, h) > MAX_CROP_ASPECT:
            problems.append(f"crop {i} of {w}x{h} px dropped (aspect ratio > {MAX_CROP_ASPECT:g})")
        else:
            crops.append(image.crop((x1, y1, x2, y2)))
    return crops, problems


def reference_key_frames(frames: Sequence[Image.Image], value: object) -> tuple[list[Image.Image], list[str]]:
    """The frames a ``key_frames`` value names, as the reference reads it: **0-based**, in the order given,
    duplicates kept; out-of-range and negative indices dropped. Non-integer indices (the reference raises on them)
    are dropped and recorded."""
    if not isinstance(value, list):
        return [], [f"key_frames {value!r} is not a list: no key frames"]
    chosen: list[Image.Image] = []
    problems: list[str] = []
    for idx in value:
        if not isinstance(idx, int):
            problems.append(f"key frame {idx!r} is not an integer: dropped (the reference raises)")
        elif 0 <= idx < len(frames):
            chosen.append(frames[idx])
        else:
            problems.append(f"key frame {idx} outside 0..{len(frames) - 1} dropped")
    return chosen, problems


def _reference_evidence(cue: dict[str, Any], visuals: list[Image.Image]) -> tuple[list[Image.Image], list[str]]:
    """Crops (from the first visual) or key frames (of an item with several visuals) named by the cue; boxes win
    when both keys are present; a text-only item has none."""
    if not visuals:
        return [], []
    if CUE_BOXES in cue:
        crops, problems = reference_crops(visuals[0], cue[CUE_BOXES])
        if len(visuals) > 1 and crops:
            problems.append(f"boxes cut from the first of {len(visuals)} images")
        return crops, problems
    if CUE_FRAMES in cue:
        if len(visuals) == 1:
            return [], ["key_frames on a single image: no key frames"]
        return reference_key_frames(visuals, cue[CUE_FRAMES])
    return [], []


def build_reference_messages(
    item: Item, mode: Mode = "full", *, resize: ReferenceResize | None = None
) -> EmbedderInput:
    """The Embedder input of one item in the **reference** layout (docs/published-models.md).

    User turn, parts joined with no separator: one image → the image, then the text; several images or frames → the
    text, then each as its own image; text only → the text. The text is :func:`reference_text` (not truncated), left
    out when empty. Then the T-CoT (``mode`` full: :func:`split_reference_tcot`, ``<thinking>…</thinking>\\n``, the
    evidence images, the stripped rest; the plain-text fallback adds the T-CoT unchanged as one part), then
    ``REFERENCE_SUFFIX``. Assistant turn: ``<emb>``. A text-only item with empty text gets an **empty** user turn
    (no T-CoT, no closing sentence), and an item without a T-CoT (None or blank) gets none, as in the reference.

    Crops come from the first image or frame, at its original size; key frames index the frames from 0. With
    ``resize`` every visual is resized with :func:`smart_resize` and PIL's default filter before it is returned (the
    processor is then called without resizing): ``resize.image`` for a single image and its crops, ``resize.frame``
    for each of several images or frames and for their crops and key frames.

    Modes: ``full`` and ``raw`` are the reference's two layouts (with and without T-CoT); ``no_evidence`` is ``full``
    without the evidence images; ``answer_only`` puts the raw ``<answer>…</answer>`` segment in place of the T-CoT.

    Raises:
        ValueError: an unknown mode.
        LayoutError: the item has both images and frames (the reference has no such input).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; use one of {MODES}")
    if item.images and item.frames:
        raise LayoutError(
            f"item {item.id!r} has both images and video frames, which the reference layout cannot represent; "
            "give it one of them or use layout embedrl"
        )
    visuals = [reference_rgb(x) for x in (item.frames or item.images)]
    kind = "frame" if len(visuals) > 1 else "image"
    text = reference_text(item.instruction, item.text)
    out = EmbedderInput(messages=[])
    content: list[dict[str, str]] = []

    def add_image(img: Image.Image) -> None:
        content.append({"type": "image"})
        out.images.append(img if resize is None else img.resize(resize.size(img.width, img.height, kind)))

    if len(visuals) > 1:
        if text:
            content.append(_text(text))
        for visual in visuals:
            add_image(visual)
    elif visuals:
        add_image(visuals[0])
        if text:
            content.append(_text(text))
    elif text:
        content.append(_text(text))
    else:
        out.problems.append("empty text-only item: empty user turn, no T-CoT and no closing sentence")
        out.messages = [{"role": "user", "content": []}, {"role": "assistant", "content": [_text(EMB_TOKEN)]}]
        return out

    raw = item.tcot
    if mode != "raw" and (raw is None or not raw.strip()):
        out.problems.append("no T-CoT: the item is embedded without one")
    elif mode == "answer_only":
        assert raw is not None
        answer = answer_segment(raw)
        if answer is None:
            out.problems.append("no <answer> segment: answer_only adds no T-CoT text")
        else:
            content.append(_text(answer))
    elif mode != "raw":
        assert raw is not None
        split = split_reference_tcot(raw)
        out.problems += split.problems
        if split.thinking is None or split.cue is None:
            content.append(_text(raw))
        else:
            out.cue = split.cue
            content.append(_text(REFERENCE_THINKING_PART.format(thinking=split.thinking)))
            if mode == "full":
                evidence, problems = _reference_evidence(split.cue, visuals)
                out.problems += problems
                for image in evidence:
                    add_image(image)
                out.evidence_count = len(evidence)
            if split.rest:
                content.append(_text(split.rest))

    content.append(_text(REFERENCE_SUFFIX))
    out.messages = [{"role": "user", "content": content}, {"role": "assistant", "content": [_text(EMB_TOKEN)]}]
    return out
