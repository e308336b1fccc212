"""parse_tcot on every row of docs/method.md §2.4, format_ok (§4.5), the render/parse round trip, and fuzzing."""

from __future__ import annotations

import gc
import signal
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedrl.prompts import CUE_BOXES, CUE_FRAMES, CUE_KEYS, CUE_KEYWORDS
from embedrl.tcot import (
    DEFUSED_TAG_MARK,
    MAX_PROBLEMS,
    TCoT,
    answer_segment,
    format_ok,
    parse_tcot,
    render_tcot,
    split_tcot,
)

REST = "<rethink>Checked.</rethink><answer>A red car.</answer>"


def tcot(thinking: str, rest: str = REST) -> str:
    return f"<thinking>{thinking}</thinking>{rest}"


# ---------------------------------------------------------------------------------------------------------------
# Clean examples, one per modality
# ---------------------------------------------------------------------------------------------------------------


def test_clean_image_example() -> None:
    text = (
        '<thinking>A kettle stands right of the toaster. {"bbox_2d": [612, 281, 798, 655]}</thinking>\n'
        "<rethink>It has a spout and a base.</rethink>\n<answer>A silver kettle on the counter.</answer>"
    )
    assert parse_tcot(text, cue_key=CUE_BOXES) == TCoT(
        thinking="A kettle stands right of the toaster.",
        cue_key=CUE_BOXES,
        boxes=[[612, 281, 798, 655]],
        rethink="It has a spout and a base.",
        answer="A silver kettle on the counter.",
    )
    assert format_ok(text, CUE_BOXES)


def test_clean_video_example() -> None:
    text = tcot('Frames 2, 5 and 8 show the repair. {"key_frames": [2, 5, 8]}')
    t = parse_tcot(text, cue_key=CUE_FRAMES, n_frames=8)
    assert (t.cue_key, t.frames, t.problems) == (CUE_FRAMES, [1, 4, 7], [])
    assert format_ok(text, CUE_FRAMES, n_frames=8)


def test_clean_text_example() -> None:
    text = tcot('Two kayaks at dusk. {"text_keywords": ["two kayakers", "canyon", "sunset"]}')
    t = parse_tcot(text, cue_key=CUE_KEYWORDS)
    assert (t.thinking, t.keywords, t.problems) == ("Two kayaks at dusk.", ["two kayakers", "canyon", "sunset"], [])
    assert t.has_all_tags and t.tags_in_order and not t.fallback and t.cue_present


# ---------------------------------------------------------------------------------------------------------------
# docs/method.md §2.4, row by row
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", "   ", "A red car on a road.", '{"bbox_2d": [1, 2, 3, 4]}', "<thinking>never closed {", "</thinking> x"],
)
def test_no_thinking_span_is_plain_text_fallback(text: str) -> None:
    t = parse_tcot(text, cue_key=CUE_BOXES)
    assert t.fallback and t.cue_key is None and t.boxes == [] and not t.has_all_tags
    assert any("plain-text fallback" in p for p in t.problems)
    assert split_tcot(text) is None
    assert not format_ok(text, CUE_BOXES)


@pytest.mark.parametrize(
    ("rest", "problem"),
    [
        ("", "missing <rethink>"),
        ("<rethink>only rethink</rethink>", "missing <answer>"),
        ("<answer>A red car.</answer>", "missing <rethink>"),
        ("<answer>A red car.</answer><rethink>late</rethink>", "rethink and answer out of order"),
        ("<rethink>r</rethink><answer>A red car.", "unclosed <answer>"),
        ("<rethink>r<answer>A red car.</answer>", "unclosed <rethink>"),
    ],
)
def test_missing_or_out_of_order_segments_keep_evidence(rest: str, problem: str) -> None:
    text = tcot('A car. {"bbox_2d": [10, 20, 300, 400]}', rest)
    t = parse_tcot(text, cue_key=CUE_BOXES)
    assert t.boxes == [[10, 20, 300, 400]] and problem in t.problems
    assert not (t.has_all_tags and t.tags_in_order)
    assert split_tcot(text) == ('<thinking>A car. {"bbox_2d": [10, 20, 300, 400]}</thinking>', rest)
    assert not format_ok(text, CUE_BOXES)


def test_unclosed_segments_run_to_the_next_tag() -> None:
    t = parse_tcot(tcot('a {"text_keywords": ["a"]}', "<rethink>r<answer>A red car."))
    assert (t.rethink, t.answer) == ("r", "A red car.")


def test_several_thinking_spans_use_the_first() -> None:
    text = (
        '<thinking>first {"bbox_2d": [1, 1, 50, 50]}</thinking><thinking>second {"bbox_2d": [5, 5, 9, 9]}</thinking>'
    )
    t = parse_tcot(text + REST, cue_key=CUE_BOXES)
    assert (t.thinking, t.boxes) == ("first", [[1, 1, 50, 50]])
    assert "several <thinking> spans: used the first" in t.problems


@pytest.mark.parametrize(
    "text",
    [
        '<THINKING>a {"bbox_2d": [1, 1, 50, 50]}</THINKING><Rethink>Checked.</Rethink><ANSWER>A red car.</ANSWER>',
        '< thinking >a {"bbox_2d": [1, 1, 50, 50]}< / thinking ><rethink >Checked.</ rethink>'
        "<answer>A red car.</answer>",
    ],
)
def test_tag_case_and_space_variants_parse_but_fail_format(text: str) -> None:
    t = parse_tcot(text, cue_key=CUE_BOXES)
    assert (t.thinking, t.boxes, t.rethink, t.answer) == ("a", [[1, 1, 50, 50]], "Checked.", "A red car.")
    assert t.has_all_tags and t.tags_in_order
    assert any(p.startswith("tag variant") for p in t.problems)
    assert not format_ok(text, CUE_BOXES)  # the format check stays strict


def test_cue_embedded_in_prose_with_nesting() -> None:
    text = tcot('The car {"bbox_2d": [10, 20, 300, 400], "note": {"colour": "red"}} is parked. More prose.')
    t = parse_tcot(text, cue_key=CUE_BOXES)
    assert (t.thinking, t.boxes) == ("The car is parked. More prose.", [[10, 20, 300, 400]])
    assert "unknown key 'note' ignored" in t.problems


def test_stray_braces_in_prose_do_not_hide_the_cue() -> None:
    t = parse_tcot(tcot('Set {A, B} and an open { brace, then {"bbox_2d": [1, 2, 30, 40]}'), cue_key=CUE_BOXES)
    assert t.boxes == [[1, 2, 30, 40]]


def test_doubled_braces_collapse() -> None:
    t = parse_tcot(tcot('A car. {{"bbox_2d": [10, 20, 300, 400]}}'), cue_key=CUE_BOXES)
    assert (t.thinking, t.boxes) == ("A car.", [[10, 20, 300, 400]])
    assert "doubled braces collapsed" in t.problems


@pytest.mark.parametrize(
    ("cue", "expected"),
    [
        ('{"bbox_2d": [10, 20, 300, 400],}', [[10, 20, 300, 400]]),  # trailing comma
        ("{'bbox_2d': [10, 20, 300, 400]}", [[10, 20, 300, 400]]),  # single quotes
        ("{bbox_2d: [10, 20, 300, 400]}", [[10, 20, 300, 400]]),  # unquoted key
        ('{"bbox_2d": [10, 20, 300, 400}', [[10, 20, 300, 400]]),  # unclosed bracket
        ('{"bbox_2d": [[10, 20, 300, 400], [5, 6, 70, 80]', [[10, 20, 300, 400], [5, 6, 70, 80]]),  # unclosed all
    ],
)
def test_malformed_json_is_repaired(cue: str, expected: list[list[int]]) -> None:
    t = parse_tcot(tcot(f"A car. {cue}"), cue_key=CUE_BOXES)
    assert (t.thinking, t.boxes) == ("A car.", expected)
    assert "malformed cue JSON repaired" in t.problems


@pytest.mark.parametrize(
    "cue",
    [
        '{"bbox_2d: [10, 20, 300, 400]}',  # unclosed key string
        '{"bbox_2d": [10, 20, 300, 400] maybe}',  # prose inside the object
    ],
)
def test_lenient_key_specific_extraction(cue: str) -> None:
    t = parse_tcot(tcot(f"A car. {cue}"), cue_key=CUE_BOXES)
    assert t.boxes == [[10, 20, 300, 400]]
    assert "cue read by lenient key extraction" in t.problems


@pytest.mark.parametrize("cue", ['{"bbox_2d": oops}', '{"bbox_2d" = [10, 20, 300, 400]}', "{nothing here"])
def test_unreadable_cue_gives_no_cue_and_keeps_text(cue: str) -> None:
    t = parse_tcot(tcot(f"A car. {cue}"), cue_key=CUE_BOXES)
    assert t.cue_key is None and t.boxes == [] and t.thinking == f"A car. {cue}"
    assert "missing cue bbox_2d" in t.problems or "no cue object" in t.problems
    assert not format_ok(tcot(f"A car. {cue}"), CUE_BOXES)


def test_duplicate_keys_merge_in_order() -> None:
    t = parse_tcot(tcot('{"bbox_2d": [1, 2, 30, 40], "bbox_2d": [50, 60, 70, 80]}'), cue_key=CUE_BOXES)
    assert t.boxes == [[1, 2, 30, 40], [50, 60, 70, 80]]  # not "last key wins"
    assert "duplicate bbox_2d keys merged" in t.problems


def test_several_cue_objects_union_in_order() -> None:
    text = tcot('left {"key_frames": [3, 1]} then {"key_frames": [6, 3]} end')
    t = parse_tcot(text, cue_key=CUE_FRAMES, n_frames=8)
    assert (t.thinking, t.frames) == ("left then end", [2, 0, 5])
    assert "2 key_frames cue objects merged" in t.problems and "duplicate key frame 3 dropped" in t.problems


def test_first_valid_cue_key_wins_without_a_family_cue() -> None:
    text = tcot('{"bbox_2d": []} {"text_keywords": ["dog"]} {"key_frames": [1]}')
    t = parse_tcot(text)
    assert (t.cue_key, t.keywords) == (CUE_KEYWORDS, ["dog"])  # the empty bbox list is not valid
    assert "cue bbox_2d ignored (using text_keywords)" in t.problems
    assert "cue key_frames ignored (using text_keywords)" in t.problems


@pytest.mark.parametrize("key", CUE_KEYS)
def test_empty_list_is_no_cue(key: str) -> None:
    text = tcot(f'Nothing to mark. {{"{key}": []}}')
    t = parse_tcot(text, cue_key=key, n_frames=8)
    assert t.cue_key == key and not t.cue_present and f"empty {key} list" in t.problems
    assert not format_ok(text, key, n_frames=8)


def test_unknown_key_and_unsuited_cue_are_ignored() -> None:
    text = tcot('A caption. {"objects": ["car"]} {"bbox_2d": [1, 2, 30, 40]}')
    t = parse_tcot(text, cue_key=CUE_KEYWORDS)  # a box on a text-only input
    assert t.cue_key is None and t.boxes == [] and t.keywords == []
    assert t.thinking == 'A caption. {"objects": ["car"]} {"bbox_2d": [1, 2, 30, 40]}'  # text kept
    assert "unknown key 'objects' ignored" in t.problems
    assert "cue bbox_2d ignored (using text_keywords)" in t.problems and "missing cue text_keywords" in t.problems


@pytest.mark.parametrize(
    ("value", "boxes"),
    [
        ("[10, 20, 300, 400]", [[10, 20, 300, 400]]),  # single flat box
        ("[[10, 20, 300, 400]]", [[10, 20, 300, 400]]),
        ("[[10, 20, 300, 400], [500, 500, 600, 700]]", [[10, 20, 300, 400], [500, 500, 600, 700]]),
        ("[[10, 20, 300, 400], 500, 500, 600, 700]", [[10, 20, 300, 400], [500, 500, 600, 700]]),  # mixed
        ("[[10, 20, 300], [1, 2, 3, 4, 5], [500, 500, 600, 700]]", [[500, 500, 600, 700]]),  # not 4 numbers
        ("[[[10, 20, 300, 400]]]", [[10, 20, 300, 400]]),
    ],
)
def test_box_forms(value: str, boxes: list[list[int]]) -> None:
    t = parse_tcot(tcot(f'{{"bbox_2d": {value}}}'), cue_key=CUE_BOXES)
    assert t.boxes == boxes


def test_boxes_without_four_numbers_are_recorded() -> None:
    t = parse_tcot(tcot('{"bbox_2d": [[10, 20, 300], [500, 500, 600, 700]]}'), cue_key=CUE_BOXES)
    assert "box [10, 20, 300] without exactly 4 numbers dropped" in t.problems


def test_numbers_as_strings_and_floats_are_coerced() -> None:
    t = parse_tcot(tcot('{"bbox_2d": ["10", 20.4, " 300 ", 399.5]}'), cue_key=CUE_BOXES)
    assert t.boxes == [[10, 20, 300, 400]]
    assert "box numbers given as strings coerced" in t.problems and "non-integer box coordinates rounded" in t.problems


@pytest.mark.parametrize("bad", ["NaN", "Infinity", '"inf"', '"ten"', "true", "null"])
def test_non_finite_or_non_numeric_coordinates_drop_the_box(bad: str) -> None:
    t = parse_tcot(tcot(f'{{"bbox_2d": [[{bad}, 20, 300, 400], [1, 2, 30, 40]]}}'), cue_key=CUE_BOXES)
    assert t.boxes == [[1, 2, 30, 40]]
    assert any("non-numeric or non-finite" in p for p in t.problems)


@pytest.mark.parametrize(
    ("value", "boxes", "problem"),
    [
        ("[-50, 20, 1300, 400]", [[0, 20, 1000, 400]], "box coordinates clamped to 0-1000"),
        ("[300, 400, 10, 20]", [[10, 20, 300, 400]], "box corners swapped"),
        ("[[10, 20, 10, 400], [1, 2, 30, 40]]", [[1, 2, 30, 40]], "zero-area box [10, 20, 10, 400] dropped"),
        ("[[1100, 20, 1200, 400], [1, 2, 30, 40]]", [[1, 2, 30, 40]], "zero-area box [1000, 20, 1000, 400] dropped"),
    ],
)
def test_coordinates_out_of_range(value: str, boxes: list[list[int]], problem: str) -> None:
    t = parse_tcot(tcot(f'{{"bbox_2d": {value}}}'), cue_key=CUE_BOXES)
    assert t.boxes == boxes and problem in t.problems


def test_duplicate_boxes_and_frames_keep_the_first() -> None:
    t = parse_tcot(tcot('{"bbox_2d": [[1, 2, 30, 40], [5, 5, 50, 50], [1, 2, 30, 40]]}'), cue_key=CUE_BOXES)
    assert t.boxes == [[1, 2, 30, 40], [5, 5, 50, 50]] and "duplicate box [1, 2, 30, 40] dropped" in t.problems
    t = parse_tcot(tcot('{"key_frames": [4, 2, 4]}'), cue_key=CUE_FRAMES, n_frames=8)
    assert t.frames == [3, 1] and "duplicate key frame 4 dropped" in t.problems


def test_key_frames_last_kept_next_dropped() -> None:
    t = parse_tcot(tcot('{"key_frames": [8, 9]}'), cue_key=CUE_FRAMES, n_frames=8)
    assert t.frames == [7] and "key frame 9 out of range dropped" in t.problems
    assert format_ok(tcot('{"key_frames": [8]}'), CUE_FRAMES, n_frames=8)
    assert not format_ok(tcot('{"key_frames": [9]}'), CUE_FRAMES, n_frames=8)


@pytest.mark.parametrize(
    ("value", "frames", "problem"),
    [
        ("[0, 1]", [0], "key frame 0 out of range dropped"),
        ("[-2, 2]", [1], "key frame -2 out of range dropped"),
        ("[2.5, 3]", [2], "non-integer key frame 2.5 dropped"),
        ('["x", 3]', [2], "non-integer key frame 'x' dropped"),
        ('[2.0, "3", "4.0"]', [1, 2, 3], "key frames given as strings coerced"),  # integral floats, strings
        ("5", [4], "key_frames not given as a list"),
    ],
)
def test_key_frame_indices(value: str, frames: list[int], problem: str) -> None:
    t = parse_tcot(tcot(f'{{"key_frames": {value}}}'), cue_key=CUE_FRAMES, n_frames=8)
    assert t.frames == frames and problem in t.problems


def test_key_frames_without_n_frames_have_no_upper_bound_and_base_is_configurable() -> None:
    assert parse_tcot(tcot('{"key_frames": [100]}'), cue_key=CUE_FRAMES).frames == [99]
    assert parse_tcot(tcot('{"key_frames": [0, 7, 8]}'), cue_key=CUE_FRAMES, n_frames=8, frame_base=0).frames == [0, 7]


def test_keywords_as_single_string() -> None:
    t = parse_tcot(tcot('{"text_keywords": "red car"}'), cue_key=CUE_KEYWORDS)
    assert t.keywords == ["red car"] and "text_keywords given as a single string" in t.problems


def test_keywords_drop_empty_and_non_strings() -> None:
    t = parse_tcot(tcot('{"text_keywords": [" red car ", "", 3, "road"]}'), cue_key=CUE_KEYWORDS)
    assert t.keywords == ["red car", "road"]
    assert "keyword '' dropped" in t.problems and "keyword 3 dropped" in t.problems


def test_text_outside_tags_is_recorded() -> None:
    text = "Sure! " + tcot('{"text_keywords": ["a"]}') + " Hope this helps."
    t = parse_tcot(text, cue_key=CUE_KEYWORDS)
    assert t.keywords == ["a"] and "text outside tags" in t.problems
    assert format_ok(text, CUE_KEYWORDS)
    assert not format_ok(text, CUE_KEYWORDS, strict_outside_tags=True)


# ---------------------------------------------------------------------------------------------------------------
# format_ok
# ---------------------------------------------------------------------------------------------------------------

GOOD = tcot('A car. {"bbox_2d": [10, 20, 300, 400]}')


@pytest.mark.parametrize(
    ("text", "cue_key", "ok"),
    [
        (GOOD, CUE_BOXES, True),
        ("  \n" + GOOD + "\n ", CUE_BOXES, True),
        (GOOD.replace("</thinking><rethink>", "</thinking>\n\n<rethink>"), CUE_BOXES, True),
        (GOOD, CUE_FRAMES, False),  # wrong cue for the family
        (GOOD, None, True),  # reference preset: tags only
        (tcot("A car."), None, True),
        (tcot("A car."), CUE_BOXES, False),
        (tcot('A car. {"bbox_2d": [10, 20, 300, 400]}', "<rethink> </rethink><answer>x</answer>"), None, False),
        (tcot('A car. {"bbox_2d": [10, 20, 300, 400]}', "<rethink>r</rethink><answer></answer>"), None, False),
        (tcot('{"bbox_2d": [10, 20, 10, 400]}'), CUE_BOXES, False),  # zero area after normalisation
        (tcot('{"bbox_2d": [-10, 20, 300, 4000]}'), CUE_BOXES, True),  # positive area after clamping
        (GOOD.replace("<rethink>", "junk<rethink>"), CUE_BOXES, False),  # text between segments
        (GOOD.replace("</answer>", "</Answer>"), CUE_BOXES, False),
        ("<Thinking>x</Thinking>" + GOOD, CUE_BOXES, False),  # the parser's first thinking span has no cue
        ('<thinking>x<thinking>{"bbox_2d": [1, 2, 30, 40]}</thinking>' + REST, CUE_BOXES, False),
    ],
)
def test_format_ok(text: str, cue_key: str | None, ok: bool) -> None:
    assert format_ok(text, cue_key) is ok


def test_format_ok_keywords_need_a_non_empty_string() -> None:
    assert format_ok(tcot('{"text_keywords": ["car"]}'), CUE_KEYWORDS)
    assert not format_ok(tcot('{"text_keywords": ["  "]}'), CUE_KEYWORDS)


# ---------------------------------------------------------------------------------------------------------------
# Raw segments for the Embedder
# ---------------------------------------------------------------------------------------------------------------


def test_split_and_answer_segment_are_verbatim() -> None:
    text = ' \n<Thinking> A {"bbox_2d": [1,2,30,40]} </Thinking>\n <rethink>r </rethink><ANSWER> x </ANSWER> tail\n'
    assert split_tcot(text) == (
        '<Thinking> A {"bbox_2d": [1,2,30,40]} </Thinking>',
        "\n <rethink>r </rethink><ANSWER> x </ANSWER> tail",
    )
    assert answer_segment(text) == "<ANSWER> x </ANSWER>"
    assert answer_segment("<answer>plain</answer>") == "<answer>plain</answer>"
    assert answer_segment(tcot("a", "<rethink>r</rethink>")) is None


# ---------------------------------------------------------------------------------------------------------------
# Round trip: parse_tcot(render_tcot(x)) == x for every valid x
# ---------------------------------------------------------------------------------------------------------------

# Valid T-CoT (§2.1): prose without tags or braces (no "<", ">", "{", "}"), stripped; exactly one cue with at least
# one entry: stripped non-empty keywords (no "<", ">"), boxes of ints in 0..1000 with x1 < x2 and y1 < y2, distinct,
# or distinct non-negative 0-based frames below n_frames.
_PROSE_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="<>{}")
prose = st.text(_PROSE_CHARS, max_size=40).map(str.strip)
keyword = st.text(_PROSE_CHARS | st.sampled_from('{}"\\'), min_size=1, max_size=12).map(str.strip).filter(bool)


@st.composite
def box(draw: st.DrawFn) -> list[int]:
    x1, x2 = sorted(draw(st.lists(st.integers(0, 1000), min_size=2, max_size=2, unique=True)))
    y1, y2 = sorted(draw(st.lists(st.integers(0, 1000), min_size=2, max_size=2, unique=True)))
    return [x1, y1, x2, y2]


@st.composite
def valid_tcot(draw: st.DrawFn) -> tuple[TCoT, int]:
    n_frames = draw(st.integers(1, 64))
    key = draw(st.sampled_from(CUE_KEYS))
    t = TCoT(thinking=draw(prose), cue_key=key, rethink=draw(prose), answer=draw(prose))
    if key == CUE_KEYWORDS:
        t.keywords = draw(st.lists(keyword, min_size=1, max_size=5))
    elif key == CUE_BOXES:
        t.boxes = draw(st.lists(box(), min_size=1, max_size=4, unique_by=tuple))
    else:
        t.frames = draw(st.lists(st.integers(0, n_frames - 1), min_size=1, max_size=8, unique=True))
    return t, n_frames


@settings(max_examples=200, deadline=None)
@given(valid_tcot())
def test_round_trip(case: tuple[TCoT, int]) -> None:
    t, n_frames = case
    text = render_tcot(t)
    assert parse_tcot(text) == t
    assert parse_tcot(text, cue_key=t.cue_key, n_frames=n_frames) == t
    assert format_ok(text, t.cue_key, n_frames=n_frames, strict_outside_tags=True) == bool(t.rethink and t.answer)


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing: never raises
# ---------------------------------------------------------------------------------------------------------------

FRAGMENTS = st.sampled_from(
    [
        "<thinking>", "</thinking>", "<rethink>", "</rethink>", "<answer>", "</answer>", "< THINKING >", "</ Answer>",
        "{", "}", "{{", "}}", "[", "]", "[[", "]]", ",", ":", '"', "'", "\\", " ", "\n",
        '"bbox_2d"', "'key_frames'", "text_keywords", '"bbox_2d": ', '{"key_frames": [', '{"text_keywords": "',
        "0", "-1", "1000", "1e999", "NaN", "2.5", '"7"', "true", "null", "x", "a red car", "[1, 2, 3, 4]",
    ]
)  # fmt: skip


def _check_invariants(t: TCoT, n_frames: int | None = None) -> None:
    assert isinstance(t, TCoT) and all(isinstance(p, str) and p for p in t.problems)
    for x1, y1, x2, y2 in t.boxes:
        assert all(isinstance(v, int) for v in (x1, y1, x2, y2)) and 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000
    assert len(set(map(tuple, t.boxes))) == len(t.boxes)
    assert all(0 <= f < (n_frames if n_frames is not None else 10**30) for f in t.frames)
    assert len(set(t.frames)) == len(t.frames)
    assert all(isinstance(k, str) and k == k.strip() and k for k in t.keywords)
    assert sum(map(bool, (t.keywords, t.boxes, t.frames))) <= 1


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.sampled_from((None, *CUE_KEYS)), st.none() | st.integers(0, 10))
def test_fuzz_arbitrary_text(text: str, cue_key: str | None, n_frames: int | None) -> None:
    _check_invariants(parse_tcot(text, cue_key=cue_key, n_frames=n_frames), n_frames)
    format_ok(text, cue_key, n_frames=n_frames, strict_outside_tags=True)
    split_tcot(text), answer_segment(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(FRAGMENTS, max_size=60).map("".join), st.sampled_from((None, *CUE_KEYS)), st.integers(0, 10))
def test_fuzz_fragments(body: str, cue_key: str | None, n_frames: int) -> None:
    for text in (body, f"<thinking>{body}</thinking>{REST}", f"<thinking>{body}"):
        t = parse_tcot(text, cue_key=cue_key, n_frames=n_frames)
        _check_invariants(t, n_frames)
        format_ok(text, cue_key, n_frames=n_frames)


@pytest.mark.parametrize(
    "text",
    [
        "<thinking>" + "[" * 5000 + "</thinking>",
        "<thinking>{" + '"bbox_2d": ' + "[" * 3000 + "1" + "]" * 3000 + "}</thinking>",
        "<thinking>" + "{" * 3000 + "</thinking>",
        '<thinking>{"key_frames": [' + "9" * 5000 + "]}</thinking>",
        '<thinking>{"bbox_2d": [1e400, 2, 3, 4]}</thinking>',
        "<thinking>" + "{a" * 2000 + "</thinking>",
    ],
)
def test_pathological_inputs(text: str) -> None:
    _check_invariants(parse_tcot(text, cue_key=CUE_BOXES, n_frames=8), 8)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="cue_key"):
        parse_tcot("x", cue_key="boxes")
    with pytest.raises(TypeError):
        parse_tcot(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# Every drop and repair is recorded; the structured fields never hold a tag
# ---------------------------------------------------------------------------------------------------------------


def test_unreadable_cue_object_next_to_a_readable_one_is_recorded() -> None:
    t = parse_tcot(tcot('A car. {"bbox_2d": [1, 2, 30, 40]} {"bbox_2d": [5, 6, oops]}'), cue_key=CUE_BOXES)
    assert t.boxes == [[1, 2, 30, 40]]
    assert "unreadable object with bbox_2d dropped" in t.problems
    unclosed = parse_tcot(tcot('{"key_frames": [2]} {"key_frames": [oops'), cue_key=CUE_FRAMES)
    assert unclosed.frames == [1] and "unreadable object with key_frames dropped" in unclosed.problems
    clean = parse_tcot(tcot('Set {A, B}. {"bbox_2d": [1, 2, 30, 40]}'), cue_key=CUE_BOXES)
    assert clean.problems == []  # braces in prose without a cue key are prose, not a dropped object


@pytest.mark.parametrize(
    ("text", "field", "value", "problem"),
    [
        (tcot('{"text_keywords": ["a"]}', "<rethink>r</rethink><answer>A <thinking> car</answer>"), "answer",
         f"A {DEFUSED_TAG_MARK}thinking> car", "tag '<thinking>' inside <answer> defused"),
        (tcot('{"text_keywords": ["a"]}', "<rethink>r <answer>x</answer> s</rethink><answer>y</answer>"), "rethink",
         f"r {DEFUSED_TAG_MARK}answer>x{DEFUSED_TAG_MARK}/answer> s", "tag '<answer>' inside <rethink> defused"),
        (tcot('{"text_keywords": ["<Answer>car", "road"]}'), "keywords",
         [f"{DEFUSED_TAG_MARK}Answer>car", "road"], "tag '<Answer>' inside a keyword defused"),
        (tcot('I <rethink> think. {"text_keywords": ["a"]}'), "thinking",
         f"I {DEFUSED_TAG_MARK}rethink> think.", "tag '<rethink>' inside <thinking> defused"),
        # cutting the cue out of "<{cue}/thinking>" would make a closing tag of the prose
        (tcot('<{"text_keywords": ["a"]}/thinking>'), "thinking",
         f"{DEFUSED_TAG_MARK} /thinking>", "tag '< /thinking>' inside <thinking> defused"),
    ],
)  # fmt: skip
def test_tags_inside_fields_are_defused_and_recorded(text: str, field: str, value: object, problem: str) -> None:
    t = parse_tcot(text)
    assert getattr(t, field) == value and problem in t.problems, t.problems


def test_problems_are_capped_with_a_count() -> None:
    boxes = ", ".join(f"[{i}, 0, {i}, 5]" for i in range(200))  # 200 distinct zero-area boxes
    t = parse_tcot(tcot(f'{{"bbox_2d": [{boxes}, [1, 2, 30, 40]]}}'), cue_key=CUE_BOXES)
    assert t.boxes == [[1, 2, 30, 40]] and len(t.problems) == MAX_PROBLEMS + 1
    assert t.problems[-1].endswith("more problems not listed")


# ---------------------------------------------------------------------------------------------------------------
# Round trip of any text: parse_tcot(render_tcot(parse_tcot(x))) == parse_tcot(x) in every structured field
# ---------------------------------------------------------------------------------------------------------------

ROUND_TRIP_FRAGMENTS = FRAGMENTS | st.sampled_from(
    [
        '{"bbox_2d": [1, 2, 30, 40]}', '{"text_keywords": ["a", "b"]}', '{"key_frames": [1, 3]}', '{"note": [1, 2',
        '{"a": ', "}]", '\\"', "<", "/", ">", "thinking", "answer", "rethink", "< /", "u", "{'a': '",
    ]
)  # fmt: skip


def _fields(t: TCoT) -> tuple:
    return (t.thinking, t.cue_key, t.keywords, t.boxes, t.frames, t.rethink, t.answer)


def _assert_round_trip(text: str, cue_key: str | None, n_frames: int | None) -> None:
    once = parse_tcot(text, cue_key=cue_key, n_frames=n_frames)
    twice = parse_tcot(render_tcot(once), cue_key=cue_key, n_frames=n_frames)
    assert _fields(twice) == _fields(once), (text, once.problems)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(ROUND_TRIP_FRAGMENTS, max_size=50).map("".join),
    st.sampled_from(("bare", "closed", "unclosed")),
    st.sampled_from((None, *CUE_KEYS)),
    st.none() | st.integers(0, 10),
)
def test_round_trip_of_any_fragment_text(body: str, wrap: str, cue_key: str | None, n_frames: int | None) -> None:
    text = {"bare": body, "closed": f"<thinking>{body}</thinking>{REST}", "unclosed": f"<thinking>{body}"}[wrap]
    _assert_round_trip(text, cue_key, n_frames)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.sampled_from((None, *CUE_KEYS)))
def test_round_trip_of_any_text(body: str, cue_key: str | None) -> None:
    _assert_round_trip(f"<thinking>{body}</thinking>{REST}", cue_key, None)


@pytest.mark.parametrize(
    "text",
    [
        '<thinking>{"text_keywords": ["dog"]} {"key_frames": [1]}</thinking>',  # the ignored cue would win
        '<thinking>{"text_keywords": ["a\\"b"]} {"note": [1, 2</thinking>',  # an unclosed object would swallow it
        '<thinking>{"bbox_2d": [1,2,30,40]} {"key_frames": [1</thinking>',
        '<thinking>{"bbox_2d"{"bbox_2d": [1, 2, 3, 4]}: [5, 6, 7, 8]}</thinking>',  # the cut makes a new object
        "<thinking>t</thinking><rethink>r <answer>a</rethink> b</answer>",  # an answer opened inside the rethink
    ],
)
def test_round_trip_cases_that_differed(text: str) -> None:
    for cue_key in (None, *CUE_KEYS):
        _assert_round_trip(text, cue_key, None)


# ---------------------------------------------------------------------------------------------------------------
# Linear time on adversarial input
# ---------------------------------------------------------------------------------------------------------------


def _repeat(unit: str, head: str = "<thinking>", tail: str = "</thinking>" + REST) -> Callable[[int], str]:
    return lambda size: head + unit * ((size - len(head) - len(tail)) // len(unit)) + tail


ADVERSARIAL = {
    "unclosed cue objects": _repeat('{"bbox_2d": [', tail="</thinking>"),
    "unclosed bare-key objects": _repeat("{a"),
    "cue keys after one brace": _repeat("bbox_2d: [", head="<thinking>{"),
    "unclosed keyword strings": _repeat('{"text_keywords": "'),
    "duplicate boxes": _repeat("[1, 2, 30, 40], ", head='<thinking>{"bbox_2d": [', tail="]}</thinking>" + REST),
    "key frames": _repeat("1, ", head='<thinking>{"key_frames": [', tail="]}</thinking>" + REST),
    "a tag opener and spaces": _repeat(" ", head="<thinking><"),
    "tags inside the answer": _repeat("<rethink>", head="<thinking>x</thinking><answer>", tail="</answer>"),
}


def _cpu_seconds(text: str, repeats: int) -> float:
    best = float("inf")
    gc.collect()
    gc.disable()  # a collection landing in one measurement and not the other is noise, not parser cost
    try:
        for _ in range(repeats):
            start = time.process_time()  # CPU time of this process: other jobs on the machine do not count
            parse_tcot(text, cue_key=CUE_BOXES, n_frames=8)
            format_ok(text, CUE_BOXES, n_frames=8)
            best = min(best, time.process_time() - start)
    finally:
        gc.enable()
    return best


def _give_up(signum: int, frame: object) -> None:
    raise TimeoutError("parsing 1 MB took over 60 s: the parser is not linear")


@pytest.mark.parametrize("pattern", list(ADVERSARIAL))
def test_parse_time_per_kilobyte_stays_flat(pattern: str) -> None:
    """16x the text costs < 64x the time, from 64 KB to 1 MB: linear is 16x (measured 16-21x on an idle machine, up
    to about 34x with both cores busy), quadratic 256x. A quadratic parser would need about an hour for 1 MB, so the
    measurement gives up after 60 s."""
    make = ADVERSARIAL[pattern]
    small = max(_cpu_seconds(make(64 * 1024), repeats=3), 1e-3)
    previous = signal.signal(signal.SIGALRM, _give_up)
    signal.alarm(60)
    try:
        large = _cpu_seconds(make(1024 * 1024), repeats=1)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert large / small < 64, (pattern, large, small)
