"""Golden strings and invariants of embedrl.prompts: families, routing, Embedder SUFFIX, discriminator, judge."""

from __future__ import annotations

import re

import pytest

from embedrl import prompts
from embedrl.prompts import (
    CUE_BOXES,
    CUE_FRAMES,
    CUE_KEYWORDS,
    JUDGE,
    PROMPT_FAMILIES,
    SUFFIX,
    PromptTemplate,
    choose_family,
    join_task_text,
    prompt_hash,
    render_discriminator,
)
from embedrl.tcot import format_ok, parse_tcot, render_tcot

SAMPLE = {"text": "Find a photo of a blue bicycle.", "n_frames": 8}

# Every family template, rendered with SAMPLE. A change to any prompt text must change this table on purpose.
GOLDEN = {
    ("text_to_image_retrieval", False): (
        "You analyse a text query for image retrieval.\n"
        "\n"
        "Rules:\n"
        "- Write short steps of one or two sentences, based only on the input and its task.\n"
        "- For captions, headlines, dialogues or factual questions, extract the visual concepts, people, "
        "places, events and relations that a matching image must show.\n"
        '- Put exactly one cue object in <thinking>. The cue is {"text_keywords": ["...", "..."]}: a JSON '
        "list of short key phrases.\n"
        "- In <rethink>, check the steps against the cue. In <answer>, give what should be retrieved in one "
        "or two sentences; you may rephrase, but keep the meaning.\n"
        "- Output <thinking> with the cue at its end, then <rethink>, then <answer>, and nothing else.\n"
        "\n"
        "Example 1 input: Find an image that matches the caption: a red kite above a beach.\n"
        "Example 1 output: <thinking>The caption names one object, a red kite, and a place, a beach. The "
        'kite must be in the air over sand and sea. {"text_keywords": ["red kite", "flying", "beach", '
        '"sea"]}</thinking><rethink>A match shows a single red kite in the sky with a sandy beach below '
        "it.</rethink><answer>A photo of a red kite flying above a sandy beach.</answer>\n"
        "Example 2 input: Find the news photo for the headline: flood waters close the main bridge.\n"
        "Example 2 output: <thinking>The headline reports a flood that closed a bridge. The photo should "
        'show high water and the bridge. {"text_keywords": ["flood water", "bridge", "road '
        'closed"]}</thinking><rethink>The key visual facts are water up to the bridge and a barrier or an '
        "empty road on it.</rethink><answer>A news photo of a bridge closed off by rising flood "
        "water.</answer>\n"
        "\n"
        "Input:\n"
        "Task: Find a photo of a blue bicycle.\n"
        "\n"
        "Follow the format exactly and reason about what the text asks for, not about its wording."
    ),
    ("text_to_image_retrieval", True): (
        'You analyse a text query for image retrieval. The cue is {"text_keywords": ["...", "..."]}: a JSON '
        "list of short key phrases. Output <thinking> with the cue at its end, then <rethink>, then "
        "<answer>, and nothing else.\n"
        "Task: Find a photo of a blue bicycle."
    ),
    ("image_based", False): (
        "You analyse an image query, shown above, for retrieval.\n"
        "\n"
        "Rules:\n"
        "- Write short steps of one or two sentences, based only on the input and its task.\n"
        "- For retrieval, classification, question answering or grounding, box the region that holds the "
        "evidence for the answer.\n"
        '- Put exactly one cue object in <thinking>. The cue is {"bbox_2d": [x1, y1, x2, y2]}: the top-left '
        "and bottom-right corners as integers on a 0-1000 scale of the image width and height. Give a list "
        "of boxes for several regions. A box never covers the whole image.\n"
        "- In <rethink>, check the steps against the cue. In <answer>, give what should be retrieved in one "
        "or two sentences; you may rephrase, but keep the meaning.\n"
        "- Output <thinking> with the cue at its end, then <rethink>, then <answer>, and nothing else.\n"
        "\n"
        "Example 1 input: Which tool on the desk is used for cutting paper?\n"
        "Example 1 output: <thinking>The task asks for a cutting tool. On the left of the desk, beside a "
        'stapler, lie scissors with blue handles. {"bbox_2d": [112, 540, 298, 760]}</thinking><rethink>The '
        "boxed object has two blades joined at a pivot, so it is the scissors and not the "
        "stapler.</rethink><answer>A pair of blue-handled scissors on the left side of the desk.</answer>\n"
        "Example 2 input: Find images of the same kind of animal.\n"
        "Example 2 output: <thinking>Two animals play on a lawn. Both have floppy ears and wagging tails, "
        'so they are dogs. {"bbox_2d": [[90, 300, 420, 880], [520, 260, 910, 870]]}</thinking><rethink>Both '
        "boxed animals are dogs of different colours; the lawn is only background.</rethink><answer>Two "
        "dogs playing on a green lawn.</answer>\n"
        "\n"
        "Input:\n"
        "Image: shown above.\n"
        "Task: Find a photo of a blue bicycle.\n"
        "\n"
        "Follow the format exactly and analyse the image itself, not its file name or metadata."
    ),
    ("image_based", True): (
        'You analyse an image query, shown above, for retrieval. The cue is {"bbox_2d": [x1, y1, x2, y2]}: '
        "the top-left and bottom-right corners as integers on a 0-1000 scale of the image width and height. "
        "Give a list of boxes for several regions. A box never covers the whole image. Output <thinking> "
        "with the cue at its end, then <rethink>, then <answer>, and nothing else.\n"
        "Image: shown above.\n"
        "Task: Find a photo of a blue bicycle."
    ),
    ("video_sequence", False): (
        "You analyse a video query, shown above as frames, for retrieval.\n"
        "\n"
        "Rules:\n"
        "- Write short steps of one or two sentences, based only on the input and its task.\n"
        "- For captioning, video questions or retrieval, pick the frames that show the main events or the "
        "evidence for the answer.\n"
        '- Put exactly one cue object in <thinking>. The cue is {"key_frames": [i, j]}: frame numbers '
        "counted from 1 in the order shown.\n"
        "- In <rethink>, check the steps against the cue. In <answer>, give what should be retrieved in one "
        "or two sentences; you may rephrase, but keep the meaning.\n"
        "- Output <thinking> with the cue at its end, then <rethink>, then <answer>, and nothing else.\n"
        "\n"
        "Example 1 input: 8 frames. What is the person making?\n"
        "Example 1 output: <thinking>Frame 1 shows eggs and flour on a table. Frame 4 shows batter poured "
        'into a pan, and frame 7 shows a pancake being flipped. {"key_frames": [1, 4, '
        "7]}</thinking><rethink>The frames follow one recipe from ingredients to cooking, so the dish is a "
        "pancake.</rethink><answer>A person mixes batter and fries a pancake in a pan.</answer>\n"
        "Example 2 input: 8 frames. Describe the video.\n"
        "Example 2 output: <thinking>Frames 2 and 3 show a dog waiting on a beach, and frame 6 shows it "
        'catching a ball in the water. {"key_frames": [2, 3, 6]}</thinking><rethink>The main event is the '
        "catch in frame 6; the earlier frames set it up.</rethink><answer>A dog on a beach runs into the "
        "water and catches a thrown ball.</answer>\n"
        "\n"
        "Input:\n"
        "Frames: 8, shown above in time order (frame 1 first).\n"
        "Task: Find a photo of a blue bicycle.\n"
        "\n"
        "Follow the format exactly and analyse the frames themselves, not file names or metadata."
    ),
    ("video_sequence", True): (
        'You analyse a video query, shown above as frames, for retrieval. The cue is {"key_frames": [i, '
        "j]}: frame numbers counted from 1 in the order shown. Output <thinking> with the cue at its end, "
        "then <rethink>, then <answer>, and nothing else.\n"
        "Frames: 8, shown above in time order (frame 1 first).\n"
        "Task: Find a photo of a blue bicycle."
    ),
    ("text_to_video_retrieval", False): (
        "You analyse a text query for video retrieval.\n"
        "\n"
        "Rules:\n"
        "- Write short steps of one or two sentences, based only on the input and its task.\n"
        "- Extract the objects, scenes and actions a matching video must show, and the order of the "
        "actions.\n"
        '- Put exactly one cue object in <thinking>. The cue is {"text_keywords": ["...", "..."]}: a JSON '
        "list of short key phrases.\n"
        "- In <rethink>, check the steps against the cue. In <answer>, give what should be retrieved in one "
        "or two sentences; you may rephrase, but keep the meaning.\n"
        "- Output <thinking> with the cue at its end, then <rethink>, then <answer>, and nothing else.\n"
        "\n"
        "Example 1 input: Find the video: a child rides a bike, falls, then stands up again.\n"
        "Example 1 output: <thinking>The text names three actions in order: riding, falling and getting up, "
        'outdoors with one child and a bicycle. {"text_keywords": ["child", "bicycle", "riding", "falls", '
        '"stands up"]}</thinking><rethink>A match must show the fall between the riding and the getting '
        "up.</rethink><answer>A video of a child riding a bicycle, falling off and standing back "
        "up.</answer>\n"
        "Example 2 input: Retrieve a clip of someone opening a door and turning on a light.\n"
        "Example 2 output: <thinking>Two actions happen in turn inside a room: a door opens, then a light "
        'is switched on. {"text_keywords": ["opening a door", "switching on a light", "dark '
        'room"]}</thinking><rethink>The order matters: the room stays dark until the person has '
        "entered.</rethink><answer>A clip of a person opening a door into a dark room and turning on the "
        "light.</answer>\n"
        "\n"
        "Input:\n"
        "Task: Find a photo of a blue bicycle.\n"
        "\n"
        "Follow the format exactly and reason about what the text asks for, not about its wording."
    ),
    ("text_to_video_retrieval", True): (
        'You analyse a text query for video retrieval. The cue is {"text_keywords": ["...", "..."]}: a JSON '
        "list of short key phrases. Output <thinking> with the cue at its end, then <rethink>, then "
        "<answer>, and nothing else.\n"
        "Task: Find a photo of a blue bicycle."
    ),
    ("positive_text", False): (
        "You analyse a text that is the correct output of a retrieval task.\n"
        "\n"
        "Rules:\n"
        "- Write short steps of one or two sentences, based only on the input and its task.\n"
        "- Say why this text is a correct output and extract its key concepts.\n"
        '- Put exactly one cue object in <thinking>. The cue is {"text_keywords": ["...", "..."]}: a JSON '
        "list of short key phrases.\n"
        "- In <rethink>, check the steps against the cue. In <answer>, give a compact description of this "
        "output in one or two sentences; you may rephrase, but keep the meaning.\n"
        "- Output <thinking> with the cue at its end, then <rethink>, then <answer>, and nothing else.\n"
        "\n"
        "Example 1 input: golden retriever\n"
        "Example 1 output: <thinking>The text is a class label naming a dog breed with a golden coat. "
        '{"text_keywords": ["golden retriever", "dog", "golden coat"]}</thinking><rethink>It fits any input '
        "that shows this breed, whatever the setting.</rethink><answer>The dog breed golden "
        "retriever.</answer>\n"
        "Example 2 input: Two trains wait side by side at a snowy station.\n"
        "Example 2 output: <thinking>The caption describes two trains at a station in winter. "
        '{"text_keywords": ["two trains", "side by side", "station", "snow"]}</thinking><rethink>The key '
        "facts are the number of trains, their position and the snow.</rethink><answer>Two trains standing "
        "next to each other at a snow-covered station.</answer>\n"
        "\n"
        "Input:\n"
        "Positive output: Find a photo of a blue bicycle.\n"
        "\n"
        "Follow the format exactly and analyse the text itself."
    ),
    ("positive_text", True): (
        'You analyse a text that is the correct output of a retrieval task. The cue is {"text_keywords": '
        '["...", "..."]}: a JSON list of short key phrases. Output <thinking> with the cue at its end, then '
        "<rethink>, then <answer>, and nothing else.\n"
        "Positive output: Find a photo of a blue bicycle."
    ),
    ("positive_image", False): (
        "You analyse an image, shown above, that is the correct output of a retrieval task.\n"
        "\n"
        "Rules:\n"
        "- Write short steps of one or two sentences, based only on the input and its task.\n"
        "- Say what the image contains and box its most important region or regions.\n"
        '- Put exactly one cue object in <thinking>. The cue is {"bbox_2d": [x1, y1, x2, y2]}: the top-left '
        "and bottom-right corners as integers on a 0-1000 scale of the image width and height. Give a list "
        "of boxes for several regions. A box never covers the whole image.\n"
        "- In <rethink>, check the steps against the cue. In <answer>, give a compact description of this "
        "output in one or two sentences; you may rephrase, but keep the meaning.\n"
        "- Output <thinking> with the cue at its end, then <rethink>, then <answer>, and nothing else.\n"
        "\n"
        "Example 1 input: (no text)\n"
        "Example 1 output: <thinking>The image shows a street market. In the centre a stall sells oranges "
        'and lemons in crates. {"bbox_2d": [310, 420, 720, 900]}</thinking><rethink>The fruit stall is the '
        "main subject; the people behind it are background.</rethink><answer>A street market stall with "
        "crates of oranges and lemons.</answer>\n"
        "Example 2 input: Page 3 of a bus timetable.\n"
        "Example 2 output: <thinking>The page is a table of bus times. The title names route 12 and the "
        'grid below lists the departures. {"bbox_2d": [[80, 40, 920, 120], [80, 160, 920, '
        "860]]}</thinking><rethink>The route number in the title and the time grid identify this "
        "page.</rethink><answer>A bus timetable page for route 12 with a grid of departure "
        "times.</answer>\n"
        "\n"
        "Input:\n"
        "Image: shown above.\n"
        "Text: Find a photo of a blue bicycle.\n"
        "\n"
        "Follow the format exactly and analyse the image itself, not its file name or metadata."
    ),
    ("positive_image", True): (
        "You analyse an image, shown above, that is the correct output of a retrieval task. The cue is "
        '{"bbox_2d": [x1, y1, x2, y2]}: the top-left and bottom-right corners as integers on a 0-1000 scale '
        "of the image width and height. Give a list of boxes for several regions. A box never covers the "
        "whole image. Output <thinking> with the cue at its end, then <rethink>, then <answer>, and nothing "
        "else.\n"
        "Image: shown above.\n"
        "Text: Find a photo of a blue bicycle."
    ),
    ("positive_video", False): (
        "You analyse a video, shown above as frames, that is the correct output of a retrieval task.\n"
        "\n"
        "Rules:\n"
        "- Write short steps of one or two sentences, based only on the input and its task.\n"
        "- Pick the frames that best represent the video and its main moments.\n"
        '- Put exactly one cue object in <thinking>. The cue is {"key_frames": [i, j]}: frame numbers '
        "counted from 1 in the order shown.\n"
        "- In <rethink>, check the steps against the cue. In <answer>, give a compact description of this "
        "output in one or two sentences; you may rephrase, but keep the meaning.\n"
        "- Output <thinking> with the cue at its end, then <rethink>, then <answer>, and nothing else.\n"
        "\n"
        "Example 1 input: 8 frames. A man ties his shoes and goes for a run.\n"
        "Example 1 output: <thinking>Frame 2 shows a man tying his shoes on a step. Frame 5 shows him "
        'running along a path. {"key_frames": [2, 5]}</thinking><rethink>These two frames cover both parts '
        "of the clip: getting ready and running.</rethink><answer>A man ties his running shoes and then "
        "jogs along a path.</answer>\n"
        "Example 2 input: 8 frames. (no text)\n"
        "Example 2 output: <thinking>Frames 1 to 3 show a glass being filled with water, and frame 8 shows "
        'it full. {"key_frames": [1, 3, 8]}</thinking><rethink>Frames 1, 3 and 8 show the start, the middle '
        "and the end of the filling.</rethink><answer>A glass is slowly filled with water until it is "
        "full.</answer>\n"
        "\n"
        "Input:\n"
        "Frames: 8, shown above in time order (frame 1 first).\n"
        "Text: Find a photo of a blue bicycle.\n"
        "\n"
        "Follow the format exactly and analyse the frames themselves, not file names or metadata."
    ),
    ("positive_video", True): (
        "You analyse a video, shown above as frames, that is the correct output of a retrieval task. The "
        'cue is {"key_frames": [i, j]}: frame numbers counted from 1 in the order shown. Output <thinking> '
        "with the cue at its end, then <rethink>, then <answer>, and nothing else.\n"
        "Frames: 8, shown above in time order (frame 1 first).\n"
        "Text: Find a photo of a blue bicycle."
    ),
}


def _fields(name: str) -> dict[str, object]:
    return {k: SAMPLE[k] for k in PROMPT_FAMILIES[name].fields}


@pytest.mark.parametrize(("name", "compact"), list(GOLDEN))
def test_family_golden(name: str, compact: bool) -> None:
    assert PROMPT_FAMILIES[name].render(compact=compact, **_fields(name)) == GOLDEN[name, compact]


def test_golden_covers_every_family_and_variant() -> None:
    assert set(GOLDEN) == {(name, c) for name in PROMPT_FAMILIES for c in (False, True)}


def test_suffix_golden() -> None:
    assert SUFFIX == "\nSummarise all of the content above in one word:"


def test_discriminator_golden() -> None:
    got = render_discriminator(
        "Find a red kite.", "<thinking>A kite.</thinking>", ["<answer>A kite.</answer>", "<answer>A dog.</answer>"]
    )
    assert got == (
        "Choose the candidate that is most relevant to the anchor.\n"
        "\n"
        "Anchor input: Find a red kite.\n"
        "Anchor reasoning: <thinking>A kite.</thinking>\n"
        "\n"
        "Candidate 1: <answer>A kite.</answer>\n"
        "Candidate 2: <answer>A dog.</answer>\n"
        "\n"
        "Reply with the number of the best candidate (1 to 2) and nothing else."
    )


def test_discriminator_with_candidate_inputs_golden() -> None:
    got = render_discriminator(
        "A red kite over a beach.", "<answer>A kite.</answer>", ["<answer>Kite?</answer>"], ["Find a kite."]
    )
    assert got == (
        "Choose the candidate that is most relevant to the anchor.\n"
        "\n"
        "Anchor input: A red kite over a beach.\n"
        "Anchor reasoning: <answer>A kite.</answer>\n"
        "\n"
        "Candidate 1 input: Find a kite.\n"
        "Candidate 1 reasoning: <answer>Kite?</answer>\n"
        "\n"
        "Reply with the number of the best candidate (1 to 1) and nothing else."
    )


def test_discriminator_rejects_bad_candidates() -> None:
    with pytest.raises(ValueError, match="at least one"):
        render_discriminator("a", "b", [])
    with pytest.raises(ValueError, match="candidate inputs"):
        render_discriminator("a", "b", ["x", "y"], ["only one"])


def test_judge_golden() -> None:
    got = JUDGE.render(
        task="Find a red kite.", query_tcot="<answer>A kite.</answer>", target_tcot="<answer>A dog.</answer>"
    )
    assert got == (
        "You check a training pair for a retrieval dataset: a task, the reasoning written for its query and "
        "the reasoning written for its correct target.\n"
        "\n"
        "Task: Find a red kite.\n"
        "Query reasoning: <answer>A kite.</answer>\n"
        "Target reasoning: <answer>A dog.</answer>\n"
        "\n"
        'Answer "Yes" only if the two reasonings are clearly unrelated (nothing ties them to each other or '
        "to the task) or clearly contradict each other (their main conclusions cannot both hold). In every "
        'other case, including when you are unsure, answer "No".\n'
        "Reply with one word: Yes or No."
    )


# ---------------------------------------------------------------------------------------------------------------
# Families: structure, examples, fields
# ---------------------------------------------------------------------------------------------------------------


def test_seven_families_with_their_sides_and_cues() -> None:
    expected = {
        "text_to_image_retrieval": ("query", CUE_KEYWORDS, None),
        "image_based": ("query", CUE_BOXES, "image"),
        "video_sequence": ("query", CUE_FRAMES, "video"),
        "text_to_video_retrieval": ("query", CUE_KEYWORDS, None),
        "positive_text": ("target", CUE_KEYWORDS, None),
        "positive_image": ("target", CUE_BOXES, "image"),
        "positive_video": ("target", CUE_FRAMES, "video"),
    }
    assert {n: (f.side, f.cue_key, f.media) for n, f in PROMPT_FAMILIES.items()} == expected
    assert all(name == f.name for name, f in PROMPT_FAMILIES.items())


@pytest.mark.parametrize("name", list(PROMPT_FAMILIES))
def test_family_fields(name: str) -> None:
    family = PROMPT_FAMILIES[name]
    assert family.fields == (("n_frames", "text") if family.media == "video" else ("text",))
    assert family.compact.fields == family.full.fields


@pytest.mark.parametrize("name", list(PROMPT_FAMILIES))
def test_worked_examples_parse_cleanly(name: str) -> None:
    family = PROMPT_FAMILIES[name]
    rendered = family.render(**_fields(name))
    assert len(family.examples) == 2
    for example in family.examples:
        assert example in rendered
        tcot = parse_tcot(example, cue_key=family.cue_key, n_frames=8)
        assert tcot.problems == [], example
        assert tcot.cue_key == family.cue_key and tcot.cue_present
        assert format_ok(example, family.cue_key, n_frames=8, strict_outside_tags=True)
        assert render_tcot(tcot) == example  # canonical §2.1 form, single braces
    for compact in (False, True):
        text = family.render(compact=compact, **_fields(name))
        assert "{{" not in text and "}}" not in text and "$" not in text
        assert f'{{"{family.cue_key}": ' in text  # the cue's exact key and format are stated


@pytest.mark.parametrize("name", list(PROMPT_FAMILIES))
def test_compact_is_short(name: str) -> None:
    family = PROMPT_FAMILIES[name]
    assert len(family.render(compact=True, **_fields(name))) < len(family.render(**_fields(name))) / 3


def test_render_rejects_missing_and_extra_fields() -> None:
    family = PROMPT_FAMILIES["video_sequence"]
    with pytest.raises(ValueError, match=r"missing \['n_frames'\]"):
        family.render(text="x")
    with pytest.raises(ValueError, match=r"unexpected \['query'\]"):
        PROMPT_FAMILIES["positive_text"].render(text="x", query="leak")
    with pytest.raises(ValueError, match="missing"):
        JUDGE.render(task="t", query_tcot="q")


def test_field_values_are_not_re_substituted() -> None:
    assert PromptTemplate("t", "a $x b").render(x="$y {z}") == "a $y {z} b"


def test_target_families_never_take_the_query() -> None:
    for family in PROMPT_FAMILIES.values():
        if family.side == "target":
            assert set(family.fields) <= {"text", "n_frames"}
            assert "query" not in family.full.text.lower()


# ---------------------------------------------------------------------------------------------------------------
# Hashes, routing, text cleaning
# ---------------------------------------------------------------------------------------------------------------


def test_prompt_hash() -> None:
    h = prompt_hash("abc")
    assert re.fullmatch(r"[0-9a-f]{12}", h) and h == prompt_hash("abc") != prompt_hash("abd")
    assert prompt_hash(JUDGE) == prompt_hash(JUDGE.text) == JUDGE.hash
    for family in PROMPT_FAMILIES.values():
        assert family.hash() == prompt_hash(family.full.text) != family.hash(compact=True)
    assert len({f.hash() for f in PROMPT_FAMILIES.values()}) == len(PROMPT_FAMILIES)


@pytest.mark.parametrize(
    ("side", "modality", "target", "family"),
    [
        ("query", "text", None, "text_to_image_retrieval"),
        ("query", "text", "image", "text_to_image_retrieval"),
        ("query", "text", "text", "text_to_image_retrieval"),
        ("query", "text", "video", "text_to_video_retrieval"),
        ("query", "image", "text", "image_based"),
        ("query", "image", "video", "image_based"),
        ("query", "video", "text", "video_sequence"),
        ("target", "text", None, "positive_text"),
        ("target", "image", None, "positive_image"),
        ("target", "video", "text", "positive_video"),
    ],
)
def test_choose_family(side: str, modality: str, target: str | None, family: str) -> None:
    assert choose_family(side, modality, target) == family  # type: ignore[arg-type]
    assert family in PROMPT_FAMILIES


def test_choose_family_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match="side"):
        choose_family("candidate", "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="item_modality"):
        choose_family("query", "audio")
    with pytest.raises(ValueError, match="target_modality"):
        choose_family("query", "text", "audio")


def test_cue_for_modality_matches_families() -> None:
    for modality, cue in prompts.CUE_FOR_MODALITY.items():
        assert PROMPT_FAMILIES[choose_family("target", modality)].cue_key == cue
        assert PROMPT_FAMILIES[choose_family("query", modality)].cue_key == cue


@pytest.mark.parametrize(
    ("instruction", "text", "expected"),
    [
        ("Find the caption:", "<|image_1|>\n a  dog ", "Find the caption: a dog"),
        ("", "<image> two\tcats <video>", "two cats"),
        ("Q:", "<|vision_start|><|image_pad|><|vision_end|>what?", "Q: what?"),
        ("", "", ""),
    ],
)
def test_join_task_text(instruction: str, text: str, expected: str) -> None:
    assert join_task_text(instruction, text) == expected
