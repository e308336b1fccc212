"""The published Embed-RL checkpoints load as published and get the reference input exactly (docs/published-models.md).

A tiny Qwen3-VL saved in the published layout (``published_embedder_dir`` in conftest.py: ``<emb>`` a plain added
token, ``config.emb_token_ids``, no embedrl file) is loaded with ``embedrl.load_embedder`` and must get, for every
item kind and every T-CoT fallback:

- the golden rendered prompt (hand-written literals below, from the reference procedure in the research notes);
- the golden ``image_grid_thw`` (hand-computed from the reference's resize rule) and ``input_ids`` (the golden prompt
  with each ``<|image_pad|>`` expanded, tokenized); the pooled position is the last ``<emb>``, three tokens from
  the end (``<emb><|im_end|>\\n``);
- the embedding of an independent re-implementation of the reference procedure written here: the message list
  built by hand, the chat template, the processor with its own settings, the base model, the last ``<emb>``, L2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import embedrl
import embedrl.models.embedder as embedder_module
import embedrl.models.loading as loading
from embedrl.backbones import PixelBudget
from embedrl.config import UserError
from embedrl.data.schema import Item
from embedrl.evidence import LayoutError, build_embedder_messages, split_reference_tcot
from embedrl.models import Embedder
from embedrl.models.loading import CheckpointError, load_embedder, load_reasoner, torch_dtype

SUMMARIZE = "Summarize the above content in one word:"
HEAD = "<|im_start|>user\n"
TAIL = "<|im_end|>\n<|im_start|>assistant\n<emb><|im_end|>\n"
V = "<|vision_start|><|image_pad|><|vision_end|>"
# The reference's budgets: images and their crops 128..768 tokens of 32 x 32 px, each frame 128..300.
BUDGETS = {"image": (128 * 32 * 32, 768 * 32 * 32), "frame": (128 * 32 * 32, 300 * 32 * 32)}


def pattern(width: int, height: int, phase: int = 0) -> Image.Image:
    """A deterministic RGB image whose every pixel differs from its neighbours (crops and resizes show up)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 7 + phase) % 256, (y * 5 + 3 * phase) % 256, (x + y + 11 * phase) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


PHOTO = pattern(1000, 400)  # -> 992 x 384 (12.5 rounds to 12), 372 tokens
SMALL = pattern(64, 48, 1)  # -> 448 x 320 (scaled up to the minimum), 140 tokens
WIDE = pattern(1200, 700, 2)  # image: 1152 x 672 (scaled down to 768 tokens max); frame budget: 704 x 416
FRAMES = tuple(pattern(800, 448, 3 + i) for i in range(4))  # frames: 736 x 384 each (300 tokens max)
TINY_FRAMES = tuple(pattern(64, 48, 9 + i) for i in range(3))


def rgba_page() -> Image.Image:
    """A 300 x 400 RGBA document page, half transparent: the reference composites it on white."""
    page = pattern(300, 400, 5).convert("RGBA")
    alpha = Image.fromarray((np.arange(400)[:, None] * np.ones((1, 300)) % 256).astype(np.uint8), "L")
    page.putalpha(alpha)
    return page


# ---------------------------------------------------------------------------------------------------------------
# The reference procedure, re-implemented independently (research notes §10)
# ---------------------------------------------------------------------------------------------------------------


def ref_resize_dims(height: int, width: int, low: int, high: int, factor: int = 32) -> tuple[int, int]:
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > high:
        beta = math.sqrt(height * width / high)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < low:
        beta = math.sqrt(low / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def ref_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGBA":
        white = Image.new("RGB", img.size, (255, 255, 255))
        white.paste(img, mask=img.split()[3])
        return white
    return img.convert("RGB")


def T(text: str) -> tuple[str, str, None]:  # the notes' TXT(...)
    return ("txt", text, None)


def I(img: Image.Image, budget: str) -> tuple[str, Image.Image, str]:  # noqa: E743 - the notes' IMG(...)
    return ("img", img, budget)


def reference_inputs(processor, parts: list, max_length: int = 8192):
    """The reference's processor inputs for hand-built parts: its message list, the chat template without a
    generation prompt, each image resized on its own (qwen-vl-utils style), one processor call with the
    checkpoint's own image settings; text-only inputs truncated to ``max_length``."""
    content, images = [], []
    for kind, value, budget in parts:
        if kind == "txt":
            content.append({"type": "text", "text": value})
            continue
        content.append({"type": "image"})
        img = ref_rgb(value)
        h, w = ref_resize_dims(img.height, img.width, *BUDGETS[budget])
        images.append(img.resize((w, h)))
    messages = [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": "<emb>"}]},
    ]
    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if images:
        inputs = processor(text=[prompt], images=images, padding=True, return_tensors="pt")
    else:
        inputs = processor(text=[prompt], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return prompt, inputs


def reference_vector(model, processor, emb_id: int, parts: list, max_length: int = 8192) -> np.ndarray:
    _, inputs = reference_inputs(processor, parts, max_length)
    inputs = inputs.to(model.device)
    with torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state[0]  # the base model: no LM head
    ids = inputs["input_ids"][0]
    where = torch.nonzero(ids == emb_id).flatten()
    pos = int(where[-1]) if len(where) else ids.shape[0] - 1
    vector = hidden[pos].float()
    return (vector / vector.norm()).cpu().numpy()


# ---------------------------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    item: Item
    prompt: str  # golden rendered prompt
    grids: list[list[int]]  # golden image_grid_thw
    parts: list  # the hand-built reference message parts
    problem: str = ""  # a substring of one of the builder's recorded problems


PHOTO_BOXES = (
    '{"bbox_2d": [[100, 100, 300, 500], [300, 500, 100, 100], [0, 0, 5, 1000], [0, 0, 1000, 30], '
    "[-50, 900, 1200, 1100], [100, 100, 300, 500]]}"
)
# On 1000 x 400: box 1 -> (100, 40, 300, 200); box 2 reversed (dropped, not swapped); box 3 5 px wide; box 4
# 1000 x 12 (aspect 83 > 50); box 5 clamped to (0, 360, 1000, 400); box 6 = box 1 (duplicates kept).
BOX_A, BOX_E = (100, 40, 300, 200), (0, 360, 1000, 400)
INVALID = '<thinking>t {"bbox_2d": [[1,2,3,4],]}</thinking>\n<rethink>r</rethink>\n<answer>a</answer>\n'
PAGE = rgba_page()

CASES: dict[str, Case] = {
    "text": Case(
        Item(id="text", instruction="Find an image that matches the caption:", text="a red kite over the beach"),
        "<|im_start|>user\nFind an image that matches the caption: a red kite over the beachSummarize the above "
        "content in one word:<|im_end|>\n<|im_start|>assistant\n<emb><|im_end|>\n",
        [],
        [T("Find an image that matches the caption: a red kite over the beach"), T(SUMMARIZE)],
        "no T-CoT",
    ),
    "text_keywords": Case(
        Item(
            id="text_keywords",
            text="  line one\n\n  line  two <|image_pad|> ",
            tcot='<thinking>kite words {"text_keywords": ["kite", "beach"]}</thinking>\n<rethink>r</rethink>\n'
            "<answer>a kite</answer>\n",
        ),
        '<|im_start|>user\nline one\n\n  line  two<thinking>kite words {"text_keywords": ["kite", "beach"]}'
        "</thinking>\n<rethink>r</rethink>\n<answer>a kite</answer>Summarize the above content in one word:"
        "<|im_end|>\n<|im_start|>assistant\n<emb><|im_end|>\n",
        [],
        [
            T("line one\n\n  line  two"),
            T('<thinking>kite words {"text_keywords": ["kite", "beach"]}</thinking>\n'),
            T("<rethink>r</rethink>\n<answer>a kite</answer>"),
            T(SUMMARIZE),
        ],
    ),
    "document_query": Case(
        Item(
            id="document_query",
            instruction="Find a document image that matches the given query:",
            text="what was the revenue in 2020?",
            tcot='<thinking>Revenue. {"text_keywords": ["revenue", "2020"]}</thinking>\n<rethink>A table.</rethink>'
            "\n<answer>A revenue table for 2020.</answer>",
        ),
        "<|im_start|>user\nFind a document image that matches the given query: what was the revenue in 2020?"
        '<thinking>Revenue. {"text_keywords": ["revenue", "2020"]}</thinking>\n<rethink>A table.</rethink>\n'
        "<answer>A revenue table for 2020.</answer>Summarize the above content in one word:<|im_end|>\n"
        "<|im_start|>assistant\n<emb><|im_end|>\n",
        [],
        [
            T("Find a document image that matches the given query: what was the revenue in 2020?"),
            T('<thinking>Revenue. {"text_keywords": ["revenue", "2020"]}</thinking>\n'),
            T("<rethink>A table.</rethink>\n<answer>A revenue table for 2020.</answer>"),
            T(SUMMARIZE),
        ],
    ),
    "text_before_thinking": Case(
        Item(
            id="text_before_thinking",
            text="q",
            tcot='Sure. <thinking>t {"text_keywords": ["a"]}</thinking>  <rethink>r</rethink>',
        ),
        '<|im_start|>user\nq<thinking>t {"text_keywords": ["a"]}</thinking>\n<rethink>r</rethink>Summarize the '
        "above content in one word:<|im_end|>\n<|im_start|>assistant\n<emb><|im_end|>\n",
        [],
        [T("q"), T('<thinking>t {"text_keywords": ["a"]}</thinking>\n'), T("<rethink>r</rethink>"), T(SUMMARIZE)],
        "text before <thinking> dropped",
    ),
    "no_thinking": Case(
        Item(id="no_thinking", text="q", tcot="  <answer>a</answer> "),
        "<|im_start|>user\nq  <answer>a</answer> Summarize the above content in one word:<|im_end|>\n"
        "<|im_start|>assistant\n<emb><|im_end|>\n",
        [],
        [T("q"), T("  <answer>a</answer> "), T(SUMMARIZE)],
        "no <thinking>",
    ),
    "empty_text_only": Case(
        Item(id="empty_text_only", text=" <|video_pad|> ", tcot='<thinking>t {"text_keywords": ["a"]}</thinking>'),
        "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<emb><|im_end|>\n",
        [],
        [],
        "empty user turn",
    ),
    "image_boxes": Case(
        Item(
            id="image_boxes",
            instruction="Represent the given image with the following question:",
            text="What is on the left?",
            images=(PHOTO,),
            tcot=f"<thinking>look {PHOTO_BOXES}</thinking>\n<rethink>r</rethink><answer>a</answer>",
        ),
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Represent the given image with the following "
        'question: What is on the left?<thinking>look {"bbox_2d": [[100, 100, 300, 500], [300, 500, 100, 100], '
        "[0, 0, 5, 1000], [0, 0, 1000, 30], [-50, 900, 1200, 1100], [100, 100, 300, 500]]}</thinking>\n"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|><|vision_start|>"
        "<|image_pad|><|vision_end|><rethink>r</rethink><answer>a</answer>Summarize the above content in one word:"
        "<|im_end|>\n<|im_start|>assistant\n<emb><|im_end|>\n",
        [[1, 24, 62], [1, 22, 26], [1, 6, 114], [1, 22, 26]],
        [
            I(PHOTO, "image"),
            T("Represent the given image with the following question: What is on the left?"),
            T(f"<thinking>look {PHOTO_BOXES}</thinking>\n"),
            I(PHOTO.crop(BOX_A), "image"),
            I(PHOTO.crop(BOX_E), "image"),
            I(PHOTO.crop(BOX_A), "image"),
            T("<rethink>r</rethink><answer>a</answer>"),
            T(SUMMARIZE),
        ],
        "aspect ratio > 50",
    ),
    "image_invalid_json": Case(
        Item(id="image_invalid_json", images=(SMALL,), tcot=INVALID),
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><thinking>t "
        '{"bbox_2d": [[1,2,3,4],]}</thinking>\n<rethink>r</rethink>\n<answer>a</answer>\nSummarize the above '
        "content in one word:<|im_end|>\n<|im_start|>assistant\n<emb><|im_end|>\n",
        [[1, 20, 28]],
        [I(SMALL, "image"), T(INVALID), T(SUMMARIZE)],
        "not valid JSON",
    ),
    "image_flat_box": Case(
        Item(
            id="image_flat_box",
            instruction="Represent the given image.",
            images=(PHOTO,),
            tcot='<thinking>t {"bbox_2d": [100, 100, 300, 500]}</thinking><answer>a</answer>',
        ),
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Represent the given image.<thinking>t "
        '{"bbox_2d": [100, 100, 300, 500]}</thinking>\n<|vision_start|><|image_pad|><|vision_end|><answer>a'
        "</answer>Summarize the above content in one word:<|im_end|>\n<|im_start|>assistant\n<emb><|im_end|>\n",
        [[1, 24, 62], [1, 22, 26]],
        [
            I(PHOTO, "image"),
            T("Represent the given image."),
            T('<thinking>t {"bbox_2d": [100, 100, 300, 500]}</thinking>\n'),
            I(PHOTO.crop(BOX_A), "image"),
            T("<answer>a</answer>"),
            T(SUMMARIZE),
        ],
        "flat bbox_2d box read as one box",
    ),
    "image_several_objects": Case(
        Item(
            id="image_several_objects",
            text="which?",
            images=(SMALL,),
            tcot='<thinking>first {"text_keywords": ["x"]} then {"bbox_2d": [[0, 0, 500, 500]]}</thinking>'
            "<answer>a</answer>",
        ),
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>which?<thinking>first "
        '{"text_keywords": ["x"]} then {"bbox_2d": [[0, 0, 500, 500]]}</thinking>\n<answer>a</answer>Summarize the '
        "above content in one word:<|im_end|>\n<|im_start|>assistant\n<emb><|im_end|>\n",
        [[1, 20, 28]],
        [
            I(SMALL, "image"),
            T("which?"),
            T('<thinking>first {"text_keywords": ["x"]} then {"bbox_2d": [[0, 0, 500, 500]]}</thinking>\n'),
            T("<answer>a</answer>"),
            T(SUMMARIZE),
        ],
    ),
    "image_no_tcot": Case(
        Item(id="image_no_tcot", text="a wide photo", images=(WIDE,)),
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>a wide photoSummarize the above content in one "
        "word:<|im_end|>\n<|im_start|>assistant\n<emb><|im_end|>\n",
        [[1, 42, 72]],
        [I(WIDE, "image"), T("a wide photo"), T(SUMMARIZE)],
        "no T-CoT",
    ),
    "multi_image": Case(
        Item(
            id="multi_image",
            text="Which one?",
            images=(SMALL, WIDE),
            tcot='<thinking>t {"bbox_2d": [[0, 0, 500, 500]]}</thinking>\n<answer>a</answer>',
        ),
        "<|im_start|>user\nWhich one?<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|>"
        '<|vision_end|><thinking>t {"bbox_2d": [[0, 0, 500, 500]]}</thinking>\n<|vision_start|><|image_pad|>'
        "<|vision_end|><answer>a</answer>Summarize the above content in one word:<|im_end|>\n<|im_start|>assistant"
        "\n<emb><|im_end|>\n",
        [[1, 20, 28], [1, 26, 44], [1, 20, 28]],
        [
            T("Which one?"),
            I(SMALL, "frame"),
            I(WIDE, "frame"),
            T('<thinking>t {"bbox_2d": [[0, 0, 500, 500]]}</thinking>\n'),
            I(SMALL.crop((0, 0, 32, 24)), "frame"),
            T("<answer>a</answer>"),
            T(SUMMARIZE),
        ],
        "boxes cut from the first of 2 images",
    ),
    "video_key_frames": Case(
        Item(
            id="video_key_frames",
            instruction="Recognize the category of the video content.",
            frames=FRAMES,
            tcot='<thinking>x {"key_frames": [1, 3, 4, -1, 1.0, 1]}</thinking>\n<rethink>y</rethink>'
            "<answer>z</answer>",
        ),
        "<|im_start|>user\nRecognize the category of the video content.<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|><|vision_start|>"
        '<|image_pad|><|vision_end|><thinking>x {"key_frames": [1, 3, 4, -1, 1.0, 1]}</thinking>\n<|vision_start|>'
        "<|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|>"
        "<|vision_end|><rethink>y</rethink><answer>z</answer>Summarize the above content in one word:<|im_end|>\n"
        "<|im_start|>assistant\n<emb><|im_end|>\n",
        [[1, 24, 46]] * 7,
        [
            T("Recognize the category of the video content."),
            *(I(f, "frame") for f in FRAMES),
            T('<thinking>x {"key_frames": [1, 3, 4, -1, 1.0, 1]}</thinking>\n'),
            I(FRAMES[1], "frame"),
            I(FRAMES[3], "frame"),
            I(FRAMES[1], "frame"),
            T("<rethink>y</rethink><answer>z</answer>"),
            T(SUMMARIZE),
        ],
        "key frame 1.0 is not an integer",
    ),
    "video_boxes": Case(
        Item(
            id="video_boxes",
            frames=TINY_FRAMES,
            tcot='<thinking>c {"bbox_2d": [[0, 0, 500, 500]], "key_frames": [0]}</thinking><answer>a</answer>',
        ),
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
        '<|vision_start|><|image_pad|><|vision_end|><thinking>c {"bbox_2d": [[0, 0, 500, 500]], "key_frames": [0]}'
        "</thinking>\n<|vision_start|><|image_pad|><|vision_end|><answer>a</answer>Summarize the above content in "
        "one word:<|im_end|>\n<|im_start|>assistant\n<emb><|im_end|>\n",
        [[1, 20, 28]] * 4,
        [
            *(I(f, "frame") for f in TINY_FRAMES),
            T('<thinking>c {"bbox_2d": [[0, 0, 500, 500]], "key_frames": [0]}</thinking>\n'),
            I(TINY_FRAMES[0].crop((0, 0, 32, 24)), "frame"),
            T("<answer>a</answer>"),
            T(SUMMARIZE),
        ],
    ),
    "document_page": Case(
        Item(
            id="document_page",
            instruction="Understand the content of the provided document image.",
            images=(PAGE,),
            tcot='<thinking>The table. {"bbox_2d": [[0, 500, 1000, 1000]]}</thinking>\n<rethink>Numbers.</rethink>'
            "\n<answer>A revenue table.</answer>",
        ),
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Understand the content of the provided "
        'document image.<thinking>The table. {"bbox_2d": [[0, 500, 1000, 1000]]}</thinking>\n<|vision_start|>'
        "<|image_pad|><|vision_end|><rethink>Numbers.</rethink>\n<answer>A revenue table.</answer>Summarize the "
        "above content in one word:<|im_end|>\n<|im_start|>assistant\n<emb><|im_end|>\n",
        [[1, 28, 20], [1, 20, 28]],
        [
            I(PAGE, "image"),
            T("Understand the content of the provided document image."),
            T('<thinking>The table. {"bbox_2d": [[0, 500, 1000, 1000]]}</thinking>\n'),
            I(ref_rgb(PAGE).crop((0, 200, 300, 400)), "image"),
            T("<rethink>Numbers.</rethink>\n<answer>A revenue table.</answer>"),
            T(SUMMARIZE),
        ],
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------


def atol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 3e-2


@pytest.fixture(scope="module")
def published(published_embedder_dir: Path, torch_device: str, torch_dtype: torch.dtype) -> Embedder:
    return embedrl.load_embedder(published_embedder_dir, device=torch_device, dtype=torch_dtype)


@pytest.fixture(scope="module")
def batched(published: Embedder) -> np.ndarray:
    """Every case in one batch (left padding over rows of very different lengths)."""
    return published.encode([case.item for case in CASES.values()], batch_size=len(CASES))


def expected_ids(tokenizer, prompt: str, grids: list[list[int]]) -> list[int]:
    """The golden prompt with the k-th ``<|image_pad|>`` repeated t*h*w/4 times (2 x 2 patches per token)."""
    pieces = prompt.split("<|image_pad|>")
    assert len(pieces) == len(grids) + 1
    text = pieces[0]
    for (t, h, w), piece in zip(grids, pieces[1:], strict=True):
        text += "<|image_pad|>" * (t * h * w // 4) + piece
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# Golden prompts, ids, grids, pooled position, embeddings
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_rendered_prompt_is_golden(published: Embedder, name: str) -> None:
    case = CASES[name]
    built = build_embedder_messages(case.item, "full", layout="reference", resize=published.reference_resize())
    prompt = published.processor.apply_chat_template(built.messages, tokenize=False, add_generation_prompt=False)
    assert prompt == case.prompt
    assert prompt.startswith(HEAD) and prompt.endswith(TAIL)
    assert prompt.count(V) == len(case.grids) == len(built.images)
    assert reference_inputs(published.processor, case.parts)[0] == case.prompt  # the hand-built parts agree
    if case.problem:
        assert any(case.problem in p for p in built.problems), built.problems


@pytest.mark.parametrize("name", list(CASES))
def test_input_ids_grids_and_pooled_position(published: Embedder, name: str) -> None:
    case = CASES[name]
    inputs = published.collate([case.item])
    ids = inputs["input_ids"][0].tolist()
    grids = inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else []
    assert grids == case.grids
    assert ids == expected_ids(published.processor.tokenizer, case.prompt, case.grids)
    emb_positions = [i for i, t in enumerate(ids) if t == published.emb_token_id]
    assert emb_positions == [len(ids) - 3]  # ...<emb><|im_end|>\n: pooled three tokens from the end
    _, ref = reference_inputs(published.processor, case.parts)
    assert ids == ref["input_ids"][0].tolist()
    if case.grids:
        torch.testing.assert_close(inputs["pixel_values"].cpu().float(), ref["pixel_values"].float())


@pytest.mark.parametrize("name", list(CASES))
def test_embedding_equals_the_reference_reimplementation(
    published: Embedder, batched: np.ndarray, torch_dtype: torch.dtype, name: str
) -> None:
    case = CASES[name]
    want = reference_vector(published.model, published.processor, published.emb_token_id, case.parts)
    single = published.encode([case.item])[0]
    np.testing.assert_allclose(single, want, atol=atol(torch_dtype))
    np.testing.assert_allclose(batched[list(CASES).index(name)], want, atol=atol(torch_dtype))
    assert published.missing_emb_count == 0


def test_the_cases_differ(batched: np.ndarray) -> None:
    sims = batched @ batched.T
    assert (sims[~np.eye(len(CASES), dtype=bool)] < 1 - 1e-4).all()


def test_text_only_inputs_are_cut_like_the_reference(published: Embedder, monkeypatch, torch_dtype) -> None:
    """Text-only rows over the cap lose their end (and their <emb>: pooled at the last token); rows with images,
    however long, are never cut (the reference truncates text-only batches only)."""
    cap = 40
    monkeypatch.setattr(embedder_module, "REFERENCE_MAX_TEXT_ONLY_TOKENS", cap)
    long_text = " ".join(f"word{i}" for i in range(40))
    items = [Item(id="long", text=long_text), Item(id="long_image", text=long_text, images=(SMALL,)),
             Item(id="short", text="short")]  # fmt: skip
    inputs = published.collate(items)
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    assert lengths[0] == cap and lengths[1] > cap + 140 and lengths[2] < cap
    full_ids = published.processor.tokenizer(CASES["text"].prompt.replace(CASES["text"].parts[0][1], long_text))
    assert inputs["input_ids"][0, -cap:].tolist() == full_ids["input_ids"][:cap]
    before = published.missing_emb_count
    got = published.encode(items, batch_size=3)
    assert published.missing_emb_count == before + 1
    want = reference_vector(published.model, published.processor, published.emb_token_id,
                            [T(long_text), T(SUMMARIZE)], max_length=cap)  # fmt: skip
    np.testing.assert_allclose(got[0], want, atol=atol(torch_dtype))
    want_image = reference_vector(published.model, published.processor, published.emb_token_id,
                                  [I(SMALL, "image"), T(long_text), T(SUMMARIZE)])  # fmt: skip
    np.testing.assert_allclose(got[1], want_image, atol=atol(torch_dtype))
    published.missing_emb_count = before


def test_raw_mode_and_ablations_in_the_reference_layout(published: Embedder) -> None:
    item = CASES["image_boxes"].item
    raw = build_embedder_messages(item, "raw", layout="reference")
    assert [p["type"] for p in raw.messages[0]["content"]] == ["image", "text", "text"]
    assert raw.messages[0]["content"][-1]["text"] == SUMMARIZE and len(raw.images) == 1
    no_evidence = build_embedder_messages(item, "no_evidence", layout="reference")
    assert len(no_evidence.images) == 1 and no_evidence.evidence_count == 0
    full = build_embedder_messages(item, "full", layout="reference")
    assert full.evidence_count == 3 and full.cue is not None and len(full.cue["bbox_2d"]) == 6
    answer = build_embedder_messages(item, "answer_only", layout="reference")
    assert [p.get("text") for p in answer.messages[0]["content"][2:]] == ["<answer>a</answer>", SUMMARIZE]
    one_frame = build_embedder_messages(Item(id="f", text="t", frames=(SMALL,)), layout="reference",
                                        resize=published.reference_resize())  # fmt: skip
    assert [p["type"] for p in one_frame.messages[0]["content"]] == ["image", "text", "text"]  # one frame: an image
    assert one_frame.images[0].size == (448, 320)
    with pytest.raises(LayoutError, match="both images and video frames"):
        build_embedder_messages(Item(id="x", images=(SMALL,), frames=TINY_FRAMES), layout="reference")
    assert issubclass(LayoutError, UserError)


def test_reference_split_fallbacks() -> None:
    assert split_reference_tcot(INVALID).thinking is None
    assert split_reference_tcot("<thinking>no cue</thinking><answer>a</answer>").thinking is None
    doubled = split_reference_tcot('<thinking>t {{"bbox_2d": [[1, 2, 30, 40]]}}</thinking> <answer>a</answer>')
    assert doubled.cue == {"bbox_2d": [[1, 2, 30, 40]]} and doubled.rest == "<answer>a</answer>"
    multiline = split_reference_tcot("pre\n<thinking>a\nb {}</thinking>\n\n")
    assert multiline.thinking == "a\nb {}" and multiline.cue == {} and multiline.rest == ""


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def test_the_published_folder_is_plain(published_embedder_dir: Path) -> None:
    names = {p.name for p in published_embedder_dir.iterdir()}
    assert not {n for n in names if "embedrl" in n or n == "embedder.json"}, names
    config = json.loads((published_embedder_dir / "config.json").read_text())
    assert len(config["emb_token_ids"]) == 1 and "embedrl_pixel_budget" not in config


def test_a_published_checkpoint_loads_with_the_reference_layout(published: Embedder) -> None:
    assert published.layout == "reference" and published.mode == "full"
    assert published.emb_token_id == published.processor.tokenizer.convert_tokens_to_ids("<emb>")
    assert published.budget == PixelBudget(128 * 32 * 32, 768 * 32 * 32, 128 * 32 * 32, 300 * 32 * 32, 8)


def test_emb_found_in_the_tokenizer_when_the_config_has_none(published_embedder_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-config-key"
    shutil.copytree(published_embedder_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    emb_id = config.pop("emb_token_ids")[0]
    (folder / "config.json").write_text(json.dumps(config))
    embedder = load_embedder(folder)
    assert embedder.emb_token_id == emb_id and embedder.layout == "reference"


def test_a_folder_without_emb_fails_clearly(tiny_backbone_dir) -> None:
    with pytest.raises(CheckpointError) as err:
        load_embedder(tiny_backbone_dir("qwen3-vl"))
    message = str(err.value)
    assert "emb_token_ids" in message and "<emb>" in message and "\n" not in message
    assert isinstance(err.value, UserError)


def test_a_missing_local_path_never_reaches_the_hub(tmp_path: Path, monkeypatch) -> None:
    def no_hub(*args, **kwargs):
        raise AssertionError(f"hub look-up for {args}")

    monkeypatch.setattr(loading, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for missing in (tmp_path / "nope", str(tmp_path / "nope"), "runs/final", "./x/y", "a/b/c", "~/no-such-x"):
        with pytest.raises(CheckpointError, match="does not exist"):
            load_embedder(missing)
        with pytest.raises(CheckpointError, match="does not exist"):
            load_reasoner(missing)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_embedder("file.txt")


def test_a_hub_id_that_cannot_be_fetched_is_one_clear_line(monkeypatch) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def offline(repo_id, **kwargs):
        calls.append(repo_id)
        raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder.\nMore lines here.")

    monkeypatch.setattr(loading, "snapshot_download", offline)
    with pytest.raises(CheckpointError) as err:
        load_embedder("ZoengHouNaam/Embed-RL-2B")
    assert calls == ["ZoengHouNaam/Embed-RL-2B"]
    assert "ZoengHouNaam/Embed-RL-2B" in str(err.value) and "\n" not in str(err.value)


def test_a_real_offline_hub_lookup_fails_the_same_way() -> None:
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("only offline: this must not touch the network")
    with pytest.raises(CheckpointError, match="could not fetch ZoengHouNaam/Embed-RL-4B"):
        load_embedder("ZoengHouNaam/Embed-RL-4B")


SMALL_BUDGET = PixelBudget(32 * 32, 64 * 64, 32 * 32, 64 * 64, num_frames=4)


@pytest.fixture(scope="module")
def own_dir(tiny_backbone_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("own-embedder")
    Embedder.from_backbone(tiny_backbone_dir("qwen3-vl"), budget=SMALL_BUDGET).save(out)
    return out


def test_our_embedder_loads_with_its_layout(own_dir: Path, tmp_path: Path) -> None:
    assert json.loads((own_dir / "embedder.json").read_text())["layout"] == "embedrl"
    assert load_embedder(own_dir).layout == "embedrl"
    old = tmp_path / "old"
    shutil.copytree(own_dir, old)
    record = json.loads((old / "embedder.json").read_text())
    del record["layout"]  # written before layouts existed
    (old / "embedder.json").write_text(json.dumps(record))
    assert load_embedder(old).layout == "embedrl"


def test_layout_reference_on_our_embedder_is_honoured_and_logged(own_dir: Path, caplog) -> None:
    item = Item(id="i", text="a red kite", images=(SMALL,), tcot='<thinking>k {"bbox_2d": [[0, 0, 500, 500]]}'
                "</thinking><answer>a kite</answer>")  # fmt: skip
    ours = load_embedder(own_dir)
    with caplog.at_level(logging.INFO, logger="embedrl.models.loading"):
        switched = load_embedder(own_dir, layout="reference")
    lines = [r.getMessage() for r in caplog.records if r.name == "embedrl.models.loading"]
    assert len(lines) == 1 and "reference" in lines[0] and "embedrl" in lines[0]
    assert switched.layout == "reference" and switched.budget == ours.budget
    text = switched.processor.decode(switched.collate([item])["input_ids"][0])
    assert text.endswith(SUMMARIZE + TAIL) and "<|im_start|>user\n<|vision_start|>" in text
    assert SUMMARIZE not in ours.processor.decode(ours.collate([item])["input_ids"][0])
    assert np.abs(switched.encode([item]) - ours.encode([item])).max() > 1e-4
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="embedrl.models.loading"):
        load_embedder(own_dir, layout="embedrl")  # the checkpoint's own: nothing to log
    assert not [r for r in caplog.records if r.name == "embedrl.models.loading"]
    with pytest.raises(CheckpointError, match="layout='sideways'"):
        load_embedder(own_dir, layout="sideways")


def test_with_budget_shares_the_weights(published: Embedder) -> None:
    uvrb = published.with_budget(dataclasses.replace(published.budget, frame_max_pixels=768 * 32 * 32))
    assert uvrb.model is published.model and uvrb.processor is published.processor
    assert published.budget.frame_max_pixels == 300 * 32 * 32 and uvrb.layout == "reference"
    item = Item(id="v", frames=FRAMES[:2])
    assert published.collate([item])["image_grid_thw"].tolist() == [[1, 24, 46]] * 2
    assert uvrb.collate([item])["image_grid_thw"].tolist() == [[1, 28, 50]] * 2  # 800 x 448 fits as it is


def test_torch_dtype_is_the_one_dtype_handler() -> None:
    assert torch_dtype("auto") == "auto" and torch_dtype("float16") is torch.float16
    assert torch_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(CheckpointError, match="float64"):
        torch_dtype("float64")


def test_the_package_root_exports_the_loaders_lazily() -> None:
    code = (
        "import sys, embedrl\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "from embedrl import load_embedder, load_reasoner\n"
        "import embedrl.models.loading as m\n"
        "assert load_embedder is m.load_embedder and load_reasoner is m.load_reasoner\n"
        "assert 'load_embedder' in dir(embedrl)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        embedrl.nope  # noqa: B018
