"""Evidence crops and key frames, and golden Embedder sequences for every modality and mode (docs/method.md §2.5,
§3.2)."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from embedrl.data.schema import Item
from embedrl.evidence import (
    MODES,
    EmbedderInput,
    box_to_pixels,
    build_embedder_messages,
    crop_boxes,
    load_image,
    select_frames,
)
from embedrl.prompts import CHAT_TEMPLATE, MAX_CROP_ASPECT, MAX_CROPS, MIN_CROP_SIDE_PX

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
FRAME_COLOURS = [(i * 30, 255 - i * 30, 100) for i in range(8)]


def rect_image(size: tuple[int, int], rects: dict[tuple[int, int, int, int], tuple[int, int, int]]) -> Image.Image:
    """A white image with solid rectangles given in pixels (left, top, right, bottom), right/bottom exclusive."""
    img = Image.new("RGB", size, WHITE)
    for (left, top, right, bottom), colour in rects.items():
        img.paste(colour, (left, top, right, bottom))
    return img


def colours(img: Image.Image) -> set[tuple[int, int, int]]:
    return {c for _, c in img.getcolors(maxcolors=img.width * img.height)}


def render(inp: EmbedderInput) -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders chat templates
    return env.from_string(CHAT_TEMPLATE).render(messages=inp.messages, add_generation_prompt=False)


# ---------------------------------------------------------------------------------------------------------------
# Crops
# ---------------------------------------------------------------------------------------------------------------

# 200 x 100 px: red at x 20-60, y 10-50; blue on the right half; green in the bottom-left corner.
SCENE = rect_image((200, 100), {(20, 10, 60, 50): RED, (100, 0, 200, 100): BLUE, (0, 80, 50, 100): GREEN})


def test_crops_are_the_coloured_rectangles() -> None:
    boxes = [[100, 100, 300, 500], [500, 0, 1000, 1000], [0, 800, 250, 1000]]
    crops, problems = crop_boxes(SCENE, boxes)
    assert problems == []
    assert [c.size for c in crops] == [(40, 40), (100, 100), (50, 20)]
    assert [colours(c) for c in crops] == [{RED}, {BLUE}, {GREEN}]


def test_box_to_pixels_floors_on_the_original_size() -> None:
    assert box_to_pixels([500, 500, 1000, 1000], 333, 77) == (166, 38, 333, 77)
    assert box_to_pixels([333, 0, 334, 1], 1000, 1000) == (333, 0, 334, 1)
    assert box_to_pixels([-5, 1200, 700.9, 30], 100, 100) == (0, 3, 70, 100)  # clamped, ordered


def test_crop_drops_small_and_thin_crops() -> None:
    big = Image.new("RGB", (1000, 1000))
    boxes = [[0, 0, 9, 500], [0, 0, 1000, 15], [0, 0, 510, 10], [0, 0, 500, 10], [0, 0, 500, 500], [0, 0, 10, 10]]
    crops, problems = crop_boxes(big, boxes)
    assert [c.size for c in crops] == [(500, 10), (500, 500), (10, 10)]  # side 10 and aspect 50 are kept
    assert problems == [
        f"crop 1 of 9x500 px dropped (side < {MIN_CROP_SIDE_PX} px)",
        f"crop 2 of 1000x15 px dropped (aspect ratio > {MAX_CROP_ASPECT:g})",
        "crop 3 of 510x10 px dropped (aspect ratio > 50)",
    ]


def test_crop_boundaries_use_the_original_pixels() -> None:
    # 0-1000 boxes map through the original size: on a 95 px wide image, 10 px is 106 units (floor 10.07 -> 10).
    crops, problems = crop_boxes(Image.new("RGB", (95, 95)), [[0, 0, 105, 1000], [0, 0, 106, 1000]])
    assert [c.size for c in crops] == [(10, 95)] and problems == ["crop 1 of 9x95 px dropped (side < 10 px)"]


def test_at_most_max_crops() -> None:
    boxes = [[i * 10, 0, i * 10 + 500, 500] for i in range(MAX_CROPS + 2)]
    crops, problems = crop_boxes(SCENE, boxes)
    assert len(crops) == MAX_CROPS and problems[-1] == f"crop {MAX_CROPS + 2} dropped (more than {MAX_CROPS} crops)"
    assert len(crop_boxes(SCENE, boxes, max_crops=2)[0]) == 2


def test_crop_rejects_boxes_without_four_finite_numbers() -> None:
    crops, problems = crop_boxes(SCENE, [[0, 0, float("nan"), 500], [0, 0, 500], [0, 0, 500, 500]])
    assert len(crops) == 1 and len(problems) == 2


def test_crop_from_path_is_rgb(tmp_path: Path) -> None:
    path = tmp_path / "scene.png"
    SCENE.convert("RGBA").save(path)
    crops, _ = crop_boxes(path, [[100, 100, 300, 500]])
    assert crops[0].mode == "RGB" and colours(crops[0]) == {RED}
    assert load_image(str(path)).mode == "RGB"


@settings(max_examples=200, deadline=None)
@given(
    st.tuples(st.integers(1, 400), st.integers(1, 400)),
    st.lists(st.lists(st.floats(-2000, 3000) | st.integers(-2000, 3000), min_size=4, max_size=4), max_size=12),
)
def test_fuzz_crops_never_empty_or_out_of_bounds(size: tuple[int, int], boxes: list[list[float]]) -> None:
    img = Image.new("RGB", size)
    crops, problems = crop_boxes(img, boxes)
    assert len(crops) + len(problems) == len(boxes) and len(crops) <= MAX_CROPS
    for box in boxes:
        left, top, right, bottom = box_to_pixels(box, *size)
        assert 0 <= left <= right <= size[0] and 0 <= top <= bottom <= size[1]
    for crop in crops:
        w, h = crop.size
        assert MIN_CROP_SIDE_PX <= w <= size[0] and MIN_CROP_SIDE_PX <= h <= size[1]
        assert max(w / h, h / w) <= MAX_CROP_ASPECT


# ---------------------------------------------------------------------------------------------------------------
# Key frames
# ---------------------------------------------------------------------------------------------------------------


def test_select_frames_in_order_dropping_bad_indices() -> None:
    frames = list("abcdefgh")
    assert select_frames(frames, [7, 0, 7, 8, -1]) == (
        ["h", "a"],
        [
            "repeated frame index 7 dropped",
            "frame index 8 outside 0..7 dropped",
            "frame index -1 outside 0..7 dropped",
        ],
    )
    assert select_frames([], [0]) == ([], ["frame index 0 outside 0..-1 dropped"])


# ---------------------------------------------------------------------------------------------------------------
# The Embedder input: golden sequences
# ---------------------------------------------------------------------------------------------------------------

IMAGE_TCOT = (
    '<thinking>A red square at the top left. {"bbox_2d": [100, 100, 300, 500]}</thinking>'
    "<rethink>It is the only red shape.</rethink><answer>A red square.</answer>"
)
VIDEO_TCOT = (
    '<thinking>Frame 8 shows the end. {"key_frames": [8, 2, 9]}</thinking>'
    "<rethink>Frame 2 is the start.</rethink><answer>A colour fade.</answer>"
)
TEXT_TCOT = (
    '<thinking>Two kites. {"text_keywords": ["two red kites", "beach"]}</thinking>'
    "<rethink>Both are red.</rethink><answer>Two red kites over a beach.</answer>"
)
FRAMES = [Image.new("RGB", (64, 48), c) for c in FRAME_COLOURS]


def test_text_item_golden() -> None:
    item = Item(
        id="t", instruction="Find an image for the caption:", text=" two  red\nkites <|image_1|>", tcot=TEXT_TCOT
    )
    inp = build_embedder_messages(item)
    assert render(inp) == (
        "<|im_start|>user\n"
        "Find an image for the caption: two red kites\n"
        '<thinking>Two kites. {"text_keywords": ["two red kites", "beach"]}</thinking>'
        "<rethink>Both are red.</rethink><answer>Two red kites over a beach.</answer>\n"
        "Summarise all of the content above in one word:<|im_end|>\n"
        "<|im_start|>assistant\n"
        "<emb><|im_end|>\n"
    )
    assert (
        inp.images == []
        and inp.videos == []
        and inp.problems == []
        and inp.tcot.keywords == ["two red kites", "beach"]
    )


def test_image_only_item_golden() -> None:
    inp = build_embedder_messages(Item(id="i", images=[SCENE], tcot=IMAGE_TCOT))
    assert render(inp) == (
        "<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>"
        '<thinking>A red square at the top left. {"bbox_2d": [100, 100, 300, 500]}</thinking>'
        "<|vision_start|><|image_pad|><|vision_end|>"
        "<rethink>It is the only red shape.</rethink><answer>A red square.</answer>\n"
        "Summarise all of the content above in one word:<|im_end|>\n"
        "<|im_start|>assistant\n"
        "<emb><|im_end|>\n"
    )
    assert inp.images[0].size == (200, 100) and colours(inp.images[1]) == {RED}
    assert inp.messages[1] == {"role": "assistant", "content": [{"type": "text", "text": "<emb>"}]}


def test_image_and_text_item_golden() -> None:
    item = Item(id="i", instruction="Represent the image:", text="<image>", images=[SCENE], tcot=IMAGE_TCOT)
    inp = build_embedder_messages(item)
    assert render(inp) == (
        "<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>"
        "Represent the image:\n"
        '<thinking>A red square at the top left. {"bbox_2d": [100, 100, 300, 500]}</thinking>'
        "<|vision_start|><|image_pad|><|vision_end|>"
        "<rethink>It is the only red shape.</rethink><answer>A red square.</answer>\n"
        "Summarise all of the content above in one word:<|im_end|>\n"
        "<|im_start|>assistant\n"
        "<emb><|im_end|>\n"
    )
    assert inp.messages[0]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "Represent the image:"},
        {
            "type": "text",
            "text": '\n<thinking>A red square at the top left. {"bbox_2d": [100, 100, 300, 500]}</thinking>',
        },
        {"type": "image"},
        {"type": "text", "text": "<rethink>It is the only red shape.</rethink><answer>A red square.</answer>"},
        {"type": "text", "text": "\nSummarise all of the content above in one word:"},
    ]


def test_several_images_crop_the_first() -> None:
    other = Image.new("RGB", (50, 50), GREEN)
    inp = build_embedder_messages(Item(id="m", text="Which?", images=[SCENE, other], tcot=IMAGE_TCOT))
    assert render(inp) == (
        "<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
        "Which?\n"
        '<thinking>A red square at the top left. {"bbox_2d": [100, 100, 300, 500]}</thinking>'
        "<|vision_start|><|image_pad|><|vision_end|>"
        "<rethink>It is the only red shape.</rethink><answer>A red square.</answer>\n"
        "Summarise all of the content above in one word:<|im_end|>\n"
        "<|im_start|>assistant\n"
        "<emb><|im_end|>\n"
    )
    assert [colours(im) for im in inp.images[1:]] == [{GREEN}, {RED}]
    assert inp.problems == ["boxes cut from the first of 2 images"]


def test_video_item_golden() -> None:
    item = Item(id="v", instruction="Describe the video:", text="", frames=FRAMES, tcot=VIDEO_TCOT)
    inp = build_embedder_messages(item)
    assert render(inp) == (
        "<|im_start|>user\n"
        "Describe the video:"
        "<|vision_start|><|video_pad|><|vision_end|>"
        '<thinking>Frame 8 shows the end. {"key_frames": [8, 2, 9]}</thinking>'
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
        "<rethink>Frame 2 is the start.</rethink><answer>A colour fade.</answer>\n"
        "Summarise all of the content above in one word:<|im_end|>\n"
        "<|im_start|>assistant\n"
        "<emb><|im_end|>\n"
    )
    assert len(inp.videos) == 1 and [im.getpixel((0, 0)) for im in inp.videos[0]] == FRAME_COLOURS
    # Key frames are 1-based: 8 is the last frame and is kept; 9 is out of range and dropped.
    assert [im.getpixel((0, 0)) for im in inp.images] == [FRAME_COLOURS[7], FRAME_COLOURS[1]]
    assert inp.problems == ["key frame 9 out of range dropped"]


def test_video_as_frames_golden() -> None:
    item = Item(id="v", text="What happens?", frames=FRAMES[:3], tcot=VIDEO_TCOT.replace("[8, 2, 9]", "[3]"))
    inp = build_embedder_messages(item, video_as="frames")
    img = "<|vision_start|><|image_pad|><|vision_end|>"
    assert render(inp) == (
        "<|im_start|>user\n"
        "What happens?"
        f"{img}{img}{img}"
        '<thinking>Frame 8 shows the end. {"key_frames": [3]}</thinking>'
        f"{img}"
        "<rethink>Frame 2 is the start.</rethink><answer>A colour fade.</answer>\n"
        "Summarise all of the content above in one word:<|im_end|>\n"
        "<|im_start|>assistant\n"
        "<emb><|im_end|>\n"
    )
    assert inp.videos == [] and [im.getpixel((0, 0)) for im in inp.images] == FRAME_COLOURS[:3] + FRAME_COLOURS[2:3]


@pytest.mark.parametrize(
    ("mode", "tcot_text"),
    [
        (
            "no_evidence",
            '\n<thinking>A red square at the top left. {"bbox_2d": [100, 100, 300, 500]}</thinking>'
            "<rethink>It is the only red shape.</rethink><answer>A red square.</answer>",
        ),
        ("answer_only", "\n<answer>A red square.</answer>"),
        ("raw", ""),
    ],
)
def test_modes_golden(mode: str, tcot_text: str) -> None:
    inp = build_embedder_messages(Item(id="i", text="A shape.", images=[SCENE], tcot=IMAGE_TCOT), mode)  # type: ignore[arg-type]
    assert render(inp) == (
        "<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>"
        f"A shape.{tcot_text}\n"
        "Summarise all of the content above in one word:<|im_end|>\n"
        "<|im_start|>assistant\n"
        "<emb><|im_end|>\n"
    )
    assert len(inp.images) == 1 and (inp.tcot is None) == (mode == "raw")


def test_plain_text_fallback_is_one_text_part_without_evidence() -> None:
    item = Item(id="i", images=[SCENE], tcot='  A red square. {"bbox_2d": [100, 100, 300, 500]}\n')
    inp = build_embedder_messages(item)
    assert render(inp) == (
        "<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>"
        'A red square. {"bbox_2d": [100, 100, 300, 500]}\n'
        "Summarise all of the content above in one word:<|im_end|>\n"
        "<|im_start|>assistant\n"
        "<emb><|im_end|>\n"
    )
    assert len(inp.images) == 1 and inp.tcot.fallback
    assert inp.problems == ["no <thinking>: plain-text fallback"]


def test_missing_rest_segments_still_give_evidence() -> None:
    inp = build_embedder_messages(Item(id="i", images=[SCENE], tcot=IMAGE_TCOT.split("<rethink>")[0]))
    assert [p["type"] for p in inp.messages[0]["content"]] == ["image", "text", "image", "text"]
    assert colours(inp.images[1]) == {RED}


def test_answer_only_without_answer_records_it() -> None:
    inp = build_embedder_messages(Item(id="t", text="x", tcot="<thinking>a</thinking>"), "answer_only")
    assert "no <answer> segment: answer_only adds no T-CoT text" in inp.problems
    assert [p["type"] for p in inp.messages[0]["content"]] == ["text", "text"]


def test_cue_follows_the_item_modality() -> None:
    # A box on a text item and keywords on an image item are ignored for evidence; the text stays as generated.
    text_item = build_embedder_messages(Item(id="t", text="x", tcot=IMAGE_TCOT))
    assert text_item.images == [] and "missing cue text_keywords" in text_item.problems
    image_item = build_embedder_messages(Item(id="i", images=[SCENE], tcot=TEXT_TCOT))
    assert len(image_item.images) == 1 and "missing cue bbox_2d" in image_item.problems
    assert TEXT_TCOT in render(image_item)


def test_paths_are_loaded_as_rgb(tmp_path: Path) -> None:
    paths = []
    for i, colour in enumerate(FRAME_COLOURS[:2]):
        paths.append(tmp_path / f"f{i}.png")
        Image.new("L", (32, 32), colour[0]).save(paths[-1])
    SCENE.convert("P").save(tmp_path / "scene.png")
    inp = build_embedder_messages(Item(id="p", images=[tmp_path / "scene.png"], tcot=IMAGE_TCOT))
    assert all(im.mode == "RGB" for im in inp.images) and colours(inp.images[1]) == {RED}
    inp = build_embedder_messages(Item(id="v", frames=paths, tcot=VIDEO_TCOT.replace("[8, 2, 9]", "[2]")))
    assert all(im.mode == "RGB" for im in inp.videos[0] + inp.images) and len(inp.images) == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("video_as", ["video", "frames"])
def test_media_lists_match_the_parts(mode: str, video_as: str) -> None:
    items = [
        Item(id="t", text="x", tcot=TEXT_TCOT),
        Item(id="i", text="x", images=[SCENE], tcot=IMAGE_TCOT),
        Item(id="v", text="x", images=[SCENE], frames=FRAMES, tcot=VIDEO_TCOT),
    ]
    for item in items:
        inp = build_embedder_messages(item, mode, video_as=video_as)  # type: ignore[arg-type]
        parts = [p["type"] for p in inp.messages[0]["content"]]
        assert parts.count("image") == len(inp.images) and parts.count("video") == len(inp.videos)
        assert render(inp).endswith("in one word:<|im_end|>\n<|im_start|>assistant\n<emb><|im_end|>\n")
        if item.frames:  # image before text before video
            first_text = parts.index("text")
            assert parts[:first_text] == ["image"] and ("video" not in parts or parts.index("video") == first_text + 1)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="has no T-CoT"):
        build_embedder_messages(Item(id="n", text="x"))
    assert build_embedder_messages(Item(id="n", text="x"), "raw").tcot is None
    with pytest.raises(ValueError, match="mode"):
        build_embedder_messages(Item(id="n", text="x", tcot=""), "evidence")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="video_as"):
        build_embedder_messages(Item(id="n", text="x", tcot=""), video_as="clip")  # type: ignore[arg-type]


def test_crop_boxes_drops_non_numeric_boxes() -> None:
    boxes = [["a", 0, 500, 500], [None, 0, 500, 500], [True, 0, 500, 500], [0, 0, 500], "abcd", [0, 0, 500, 500]]
    crops, problems = crop_boxes(Image.new("RGB", (100, 100)), boxes)
    assert [c.size for c in crops] == [(50, 50)]
    assert len(problems) == 5 and all("not 4 finite numbers" in p for p in problems)


def test_select_frames_drops_non_integers() -> None:
    frames = ["f0", "f1", "f2"]
    chosen, problems = select_frames(frames, [1.5, "1", None, True, 2])
    assert chosen == ["f2"]
    assert len(problems) == 4 and all("not an integer" in p for p in problems)
