"""Every prompt template, special token and pixel budget of embedrl, in one module.

Nothing else in the package spells a special token, a T-CoT tag or a prompt sentence: it imports it from here.
Golden-string tests (``tests/test_prompts.py``) pin each template.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from string import Template
from typing import Literal

# ----------------------------------------------------------------------------------------------------------------
# Special tokens
# ----------------------------------------------------------------------------------------------------------------

# The Qwen2/2.5/3 special tokens, in the order the released tokenizers number them (151643 onwards). A tiny
# tokenizer built by embedrl lists them first, in this order, so their relative order matches the real vocabulary.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

# The Embedder's pooling token. It is added by ``embedrl.backbones.add_emb_token`` (never part of a base tokenizer)
# and its id is stored in the model config under ``EMB_CONFIG_KEY``.
EMB_TOKEN = "<emb>"
EMB_CONFIG_KEY = "emb_token_ids"

# T-CoT grammar tags (docs/method.md §2.1). Tiny tokenizers carry them as single added tokens so a tiny Reasoner emits
# each in one step; real Qwen tokenizers split them into ordinary BPE pieces, which changes nothing else.
THINKING_OPEN, THINKING_CLOSE = "<thinking>", "</thinking>"
RETHINK_OPEN, RETHINK_CLOSE = "<rethink>", "</rethink>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TCOT_TAGS: tuple[str, ...] = (THINKING_OPEN, THINKING_CLOSE, RETHINK_OPEN, RETHINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# Cue keys of the JSON object inside <thinking> (docs/method.md §2.2).
CUE_KEYWORDS = "text_keywords"
CUE_BOXES = "bbox_2d"
CUE_FRAMES = "key_frames"
CUE_KEYS: tuple[str, ...] = (CUE_KEYWORDS, CUE_BOXES, CUE_FRAMES)

# ----------------------------------------------------------------------------------------------------------------
# Chat template of the tiny backbones (real checkpoints bring their own)
# ----------------------------------------------------------------------------------------------------------------

# Renders ``<|im_start|>{role}\n{content}<|im_end|>\n`` per turn. Content is a string or a list of parts:
# {"type": "text", "text": ...}, {"type": "image"} -> vision-start, image-pad, vision-end; {"type": "video"} likewise.
# No default system turn is inserted. ``add_generation_prompt`` opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ----------------------------------------------------------------------------------------------------------------
# Pixel budgets (docs/method.md §3.2). Real Qwen3-VL budgets, in pixels; tiny backbones use their own processor sizes.
# ----------------------------------------------------------------------------------------------------------------

IMAGE_MIN_PIXELS = 128 * 32 * 32
IMAGE_MAX_PIXELS = 768 * 32 * 32
FRAME_MIN_PIXELS = 128 * 32 * 32
FRAME_MAX_PIXELS = 300 * 32 * 32
VIDEO_NUM_FRAMES = 8

# Evidence crop limits (docs/method.md §2.4).
MIN_CROP_SIDE_PX = 10
MAX_CROP_ASPECT = 50.0
MAX_CROPS = 8

# ----------------------------------------------------------------------------------------------------------------
# Embedder closing instruction (docs/method.md §3.2)
# ----------------------------------------------------------------------------------------------------------------

# Ends every Embedder user turn, in every mode and code path; the assistant turn that follows holds only EMB_TOKEN.
# The leading newline puts it on its own line after the T-CoT. Our own wording: the published Embed-RL checkpoints
# were trained with the reference code's string, which a compatibility setting would have to supply.
SUFFIX = "\nSummarise all of the content above in one word:"

# The instructions `Embedder.encode_query` / `encode_document` give an input that carries none, and the "query" /
# "document" prompts a saved Embedder declares to sentence-transformers (docs/embedder.md); our wording, in the MMEB
# convention of instructions on both sides. An input's own instruction is always kept.
QUERY_INSTRUCTION = "Find the content that matches this query:"
DOCUMENT_INSTRUCTION = "Represent this content for retrieval:"

# ----------------------------------------------------------------------------------------------------------------
# Embedder input layouts (docs/published-models.md): ours, and the one the published Embed-RL checkpoints were
# evaluated with (the reference MMEB processor), reproduced token by token
# ----------------------------------------------------------------------------------------------------------------

LAYOUT_EMBEDRL = "embedrl"  # docs/method.md §3.2; what embedrl trains, and what an old embedder.json means
LAYOUT_REFERENCE = "reference"  # the published checkpoints' layout; the default for a folder without embedder.json
LAYOUTS: tuple[str, ...] = (LAYOUT_EMBEDRL, LAYOUT_REFERENCE)

# The closing sentence the published checkpoints were trained and evaluated with, byte for byte: its own text part
# (the chat template joins parts with no separator), no leading or trailing whitespace. A compatibility constant,
# used only by the reference layout.
REFERENCE_SUFFIX = "Summarize the above content in one word:"
# The only placeholders the reference removes from an item's text (then it strips the ends; inner whitespace stays).
REFERENCE_REMOVED_TOKENS: tuple[str, ...] = (IMAGE_PAD, VIDEO_PAD)
# The reference truncates text-only inputs (the whole rendered sequence, from the right) to this many tokens; inputs
# with images are never truncated.
REFERENCE_MAX_TEXT_ONLY_TOKENS = 8192
# The T-CoT split of the reference: the first <thinking>...</thinking> span (lazy, across lines), and inside it the
# first brace group without nested braces, read as JSON (the cue).
REFERENCE_THINKING_RE = re.compile(re.escape(THINKING_OPEN) + "(.*?)" + re.escape(THINKING_CLOSE), re.DOTALL)
REFERENCE_CUE_RE = re.compile(r"\{[^{}]*\}")
# The thinking text part of a successful split: the span as matched, then one newline.
REFERENCE_THINKING_PART = THINKING_OPEN + "{thinking}" + THINKING_CLOSE + "\n"
# The reference's evidence scale and crop limits: boxes on 0-1000, crops with a side under MIN_CROP_SIDE_PX or an
# aspect ratio above MAX_CROP_ASPECT dropped (the same numbers as ours, applied after its own clamping), no crop cap.
REFERENCE_BOX_SCALE = 1000

# ----------------------------------------------------------------------------------------------------------------
# Text cleaning shared by the Embedder input and the Reasoner's task slot (docs/method.md §3.2, §6.3)
# ----------------------------------------------------------------------------------------------------------------

# Dataset image/video placeholders (<image>, <|image_1|>, ...) and stray Qwen vision tokens: the media are passed as
# content parts, so a placeholder left in the text would only add noise or, for a vision token, break the processor.
DATASET_PLACEHOLDER_RE = re.compile(
    r"<\|(?:image|video)_\d+\|>|<(?:image|video)>|<\|(?:vision_start|vision_end|vision_pad|image_pad|video_pad)\|>"
)


def join_task_text(instruction: str, text: str) -> str:
    """Instruction followed by text (MMEB convention), placeholders removed, whitespace runs collapsed to one space.

    >>> join_task_text("Find an image for the caption:", "<|image_1|> a  red\\nkite")
    'Find an image for the caption: a red kite'
    """
    joined = DATASET_PLACEHOLDER_RE.sub(" ", f"{instruction} {text}")
    return " ".join(joined.split())


# ----------------------------------------------------------------------------------------------------------------
# Prompt templates
# ----------------------------------------------------------------------------------------------------------------

# Templates use ``string.Template`` fields (``$text``, ``$n_frames``): JSON braces in rules and worked examples stay
# literal, so a rendered prompt never shows doubled ``{{ }}`` template escapes (docs/method.md §2.4, §5.3).


def prompt_hash(template: str | PromptTemplate) -> str:
    """Short content hash (first 12 hex digits of SHA-256) stored with every generated text for provenance."""
    text = template.text if isinstance(template, PromptTemplate) else template
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class PromptTemplate:
    """A named template with ``$field`` slots; :meth:`render` demands exactly those fields."""

    name: str
    text: str

    @property
    def fields(self) -> tuple[str, ...]:
        """The template's field names, in order of first use."""
        return tuple(Template(self.text).get_identifiers())

    @property
    def hash(self) -> str:
        return prompt_hash(self.text)

    def render(self, **fields: object) -> str:
        """Fill every field; raises ``ValueError`` naming missing or unexpected fields."""
        missing = [f for f in self.fields if f not in fields]
        extra = sorted(set(fields) - set(self.fields))
        if missing or extra:
            raise ValueError(
                f"prompt {self.name!r} takes fields {list(self.fields)}; missing {missing}, unexpected {extra}"
            )
        return Template(self.text).substitute({k: str(v) for k, v in fields.items()})


Side = Literal["query", "target"]


@dataclass(frozen=True)
class PromptFamily:
    """A Reasoner prompt family (docs/method.md §5.3): which side and input it serves and which cue it requires.

    Attributes:
        name: key in :data:`PROMPT_FAMILIES`, stored with every T-CoT.
        side: ``query`` or ``target``.
        cue_key: the cue the T-CoT must carry (``text_keywords``, ``bbox_2d`` or ``key_frames``).
        media: the media the caller puts in the user turn **before** the prompt text: ``image``, ``video`` or None.
        full: the five-part prompt (role, rules, two worked examples, input block, closing line).
        compact: a two-line prompt (task + cue format, then the input block) for tiny models, whose context and
            speed cannot afford the worked examples. Same fields as ``full``.
        examples: the worked examples of ``full``, each a T-CoT in exact §2.1 grammar.
    """

    name: str
    side: Side
    cue_key: str
    media: Literal["image", "video"] | None
    full: PromptTemplate
    compact: PromptTemplate
    examples: tuple[str, ...]

    @property
    def fields(self) -> tuple[str, ...]:
        return self.full.fields

    def template(self, compact: bool = False) -> PromptTemplate:
        return self.compact if compact else self.full

    def render(self, *, compact: bool = False, **fields: object) -> str:
        """The prompt text for one item; ``compact`` picks the short variant."""
        return self.template(compact).render(**fields)

    def hash(self, compact: bool = False) -> str:
        return self.template(compact).hash


_CUE_RULES = {
    CUE_KEYWORDS: 'The cue is {"text_keywords": ["...", "..."]}: a JSON list of short key phrases.',
    CUE_BOXES: (
        'The cue is {"bbox_2d": [x1, y1, x2, y2]}: the top-left and bottom-right corners as integers on a 0-1000 '
        "scale of the image width and height. Give a list of boxes for several regions. A box never covers the "
        "whole image."
    ),
    CUE_FRAMES: 'The cue is {"key_frames": [i, j]}: frame numbers counted from 1 in the order shown.',
}
_OUTPUT_ORDER = "Output <thinking> with the cue at its end, then <rethink>, then <answer>, and nothing else."
_FRAMES_SLOT = "Frames: $n_frames, shown above in time order (frame 1 first)."


def _family(
    name: str,
    side: Side,
    cue_key: str,
    media: Literal["image", "video"] | None,
    role: str,
    guidance: str,
    examples: tuple[tuple[str, str], ...],
    input_lines: tuple[str, ...],
    closing: str,
) -> PromptFamily:
    """Assemble a family's full and compact templates from its parts (docs/method.md §5.3)."""
    goal = "what should be retrieved" if side == "query" else "a compact description of this output"
    rules = (
        "Rules:",
        "- Write short steps of one or two sentences, based only on the input and its task.",
        f"- {guidance}",
        f"- Put exactly one cue object in <thinking>. {_CUE_RULES[cue_key]}",
        f"- In <rethink>, check the steps against the cue. In <answer>, give {goal} in one or two sentences; "
        "you may rephrase, but keep the meaning.",
        f"- {_OUTPUT_ORDER}",
    )
    shown = []
    for i, (example_input, output) in enumerate(examples, 1):
        shown += [f"Example {i} input: {example_input}", f"Example {i} output: {output}"]
    full = "\n".join((role, "", *rules, "", *shown, "", "Input:", *input_lines, "", closing))
    compact = "\n".join((f"{role} {_CUE_RULES[cue_key]} {_OUTPUT_ORDER}", *input_lines))
    return PromptFamily(
        name=name,
        side=side,
        cue_key=cue_key,
        media=media,
        full=PromptTemplate(name, full),
        compact=PromptTemplate(f"{name}/compact", compact),
        examples=tuple(output for _, output in examples),
    )


TEXT_TO_IMAGE = _family(
    "text_to_image_retrieval",
    "query",
    CUE_KEYWORDS,
    None,
    "You analyse a text query for image retrieval.",
    "For captions, headlines, dialogues or factual questions, extract the visual concepts, people, places, "
    "events and relations that a matching image must show.",
    (
        (
            "Find an image that matches the caption: a red kite above a beach.",
            "<thinking>The caption names one object, a red kite, and a place, a beach. The kite must be in the air "
            'over sand and sea. {"text_keywords": ["red kite", "flying", "beach", "sea"]}</thinking>'
            "<rethink>A match shows a single red kite in the sky with a sandy beach below it.</rethink>"
            "<answer>A photo of a red kite flying above a sandy beach.</answer>",
        ),
        (
            "Find the news photo for the headline: flood waters close the main bridge.",
            "<thinking>The headline reports a flood that closed a bridge. The photo should show high water and the "
            'bridge. {"text_keywords": ["flood water", "bridge", "road closed"]}</thinking>'
            "<rethink>The key visual facts are water up to the bridge and a barrier or an empty road on it."
            "</rethink><answer>A news photo of a bridge closed off by rising flood water.</answer>",
        ),
    ),
    ("Task: $text",),
    "Follow the format exactly and reason about what the text asks for, not about its wording.",
)

IMAGE_QUERY = _family(
    "image_based",
    "query",
    CUE_BOXES,
    "image",
    "You analyse an image query, shown above, for retrieval.",
    "For retrieval, classification, question answering or grounding, box the region that holds the evidence "
    "for the answer.",
    (
        (
            "Which tool on the desk is used for cutting paper?",
            "<thinking>The task asks for a cutting tool. On the left of the desk, beside a stapler, lie scissors "
            'with blue handles. {"bbox_2d": [112, 540, 298, 760]}</thinking>'
            "<rethink>The boxed object has two blades joined at a pivot, so it is the scissors and not the "
            "stapler.</rethink><answer>A pair of blue-handled scissors on the left side of the desk.</answer>",
        ),
        (
            "Find images of the same kind of animal.",
            "<thinking>Two animals play on a lawn. Both have floppy ears and wagging tails, so they are dogs. "
            '{"bbox_2d": [[90, 300, 420, 880], [520, 260, 910, 870]]}</thinking>'
            "<rethink>Both boxed animals are dogs of different colours; the lawn is only background.</rethink>"
            "<answer>Two dogs playing on a green lawn.</answer>",
        ),
    ),
    ("Image: shown above.", "Task: $text"),
    "Follow the format exactly and analyse the image itself, not its file name or metadata.",
)

VIDEO_QUERY = _family(
    "video_sequence",
    "query",
    CUE_FRAMES,
    "video",
    "You analyse a video query, shown above as frames, for retrieval.",
    "For captioning, video questions or retrieval, pick the frames that show the main events or the evidence "
    "for the answer.",
    (
        (
            "8 frames. What is the person making?",
            "<thinking>Frame 1 shows eggs and flour on a table. Frame 4 shows batter poured into a pan, and frame "
            '7 shows a pancake being flipped. {"key_frames": [1, 4, 7]}</thinking>'
            "<rethink>The frames follow one recipe from ingredients to cooking, so the dish is a pancake."
            "</rethink><answer>A person mixes batter and fries a pancake in a pan.</answer>",
        ),
        (
            "8 frames. Describe the video.",
            "<thinking>Frames 2 and 3 show a dog waiting on a beach, and frame 6 shows it catching a ball in the "
            'water. {"key_frames": [2, 3, 6]}</thinking>'
            "<rethink>The main event is the catch in frame 6; the earlier frames set it up.</rethink>"
            "<answer>A dog on a beach runs into the water and catches a thrown ball.</answer>",
        ),
    ),
    (_FRAMES_SLOT, "Task: $text"),
    "Follow the format exactly and analyse the frames themselves, not file names or metadata.",
)

TEXT_TO_VIDEO = _family(
    "text_to_video_retrieval",
    "query",
    CUE_KEYWORDS,
    None,
    "You analyse a text query for video retrieval.",
    "Extract the objects, scenes and actions a matching video must show, and the order of the actions.",
    (
        (
            "Find the video: a child rides a bike, falls, then stands up again.",
            "<thinking>The text names three actions in order: riding, falling and getting up, outdoors with one "
            'child and a bicycle. {"text_keywords": ["child", "bicycle", "riding", "falls", "stands up"]}'
            "</thinking><rethink>A match must show the fall between the riding and the getting up.</rethink>"
            "<answer>A video of a child riding a bicycle, falling off and standing back up.</answer>",
        ),
        (
            "Retrieve a clip of someone opening a door and turning on a light.",
            "<thinking>Two actions happen in turn inside a room: a door opens, then a light is switched on. "
            '{"text_keywords": ["opening a door", "switching on a light", "dark room"]}</thinking>'
            "<rethink>The order matters: the room stays dark until the person has entered.</rethink>"
            "<answer>A clip of a person opening a door into a dark room and turning on the light.</answer>",
        ),
    ),
    ("Task: $text",),
    "Follow the format exactly and reason about what the text asks for, not about its wording.",
)

POSITIVE_TEXT = _family(
    "positive_text",
    "target",
    CUE_KEYWORDS,
    None,
    "You analyse a text that is the correct output of a retrieval task.",
    "Say why this text is a correct output and extract its key concepts.",
    (
        (
            "golden retriever",
            "<thinking>The text is a class label naming a dog breed with a golden coat. "
            '{"text_keywords": ["golden retriever", "dog", "golden coat"]}</thinking>'
            "<rethink>It fits any input that shows this breed, whatever the setting.</rethink>"
            "<answer>The dog breed golden retriever.</answer>",
        ),
        (
            "Two trains wait side by side at a snowy station.",
            "<thinking>The caption describes two trains at a station in winter. "
            '{"text_keywords": ["two trains", "side by side", "station", "snow"]}</thinking>'
            "<rethink>The key facts are the number of trains, their position and the snow.</rethink>"
            "<answer>Two trains standing next to each other at a snow-covered station.</answer>",
        ),
    ),
    ("Positive output: $text",),
    "Follow the format exactly and analyse the text itself.",
)

POSITIVE_IMAGE = _family(
    "positive_image",
    "target",
    CUE_BOXES,
    "image",
    "You analyse an image, shown above, that is the correct output of a retrieval task.",
    "Say what the image contains and box its most important region or regions.",
    (
        (
            "(no text)",
            "<thinking>The image shows a street market. In the centre a stall sells oranges and lemons in crates. "
            '{"bbox_2d": [310, 420, 720, 900]}</thinking>'
            "<rethink>The fruit stall is the main subject; the people behind it are background.</rethink>"
            "<answer>A street market stall with crates of oranges and lemons.</answer>",
        ),
        (
            "Page 3 of a bus timetable.",
            "<thinking>The page is a table of bus times. The title names route 12 and the grid below lists the "
            'departures. {"bbox_2d": [[80, 40, 920, 120], [80, 160, 920, 860]]}</thinking>'
            "<rethink>The route number in the title and the time grid identify this page.</rethink>"
            "<answer>A bus timetable page for route 12 with a grid of departure times.</answer>",
        ),
    ),
    ("Image: shown above.", "Text: $text"),
    "Follow the format exactly and analyse the image itself, not its file name or metadata.",
)

POSITIVE_VIDEO = _family(
    "positive_video",
    "target",
    CUE_FRAMES,
    "video",
    "You analyse a video, shown above as frames, that is the correct output of a retrieval task.",
    "Pick the frames that best represent the video and its main moments.",
    (
        (
            "8 frames. A man ties his shoes and goes for a run.",
            "<thinking>Frame 2 shows a man tying his shoes on a step. Frame 5 shows him running along a path. "
            '{"key_frames": [2, 5]}</thinking>'
            "<rethink>These two frames cover both parts of the clip: getting ready and running.</rethink>"
            "<answer>A man ties his running shoes and then jogs along a path.</answer>",
        ),
        (
            "8 frames. (no text)",
            "<thinking>Frames 1 to 3 show a glass being filled with water, and frame 8 shows it full. "
            '{"key_frames": [1, 3, 8]}</thinking>'
            "<rethink>Frames 1, 3 and 8 show the start, the middle and the end of the filling.</rethink>"
            "<answer>A glass is slowly filled with water until it is full.</answer>",
        ),
    ),
    (_FRAMES_SLOT, "Text: $text"),
    "Follow the format exactly and analyse the frames themselves, not file names or metadata.",
)

# The seven Reasoner families (docs/method.md §5.3), by name. Target-side families never see the query (§8 item 24).
PROMPT_FAMILIES: dict[str, PromptFamily] = {
    f.name: f
    for f in (TEXT_TO_IMAGE, IMAGE_QUERY, VIDEO_QUERY, TEXT_TO_VIDEO, POSITIVE_TEXT, POSITIVE_IMAGE, POSITIVE_VIDEO)
}

# The cue an item's own modality calls for (docs/method.md §2.2); also what the Embedder reads evidence from.
CUE_FOR_MODALITY: dict[str, str] = {"text": CUE_KEYWORDS, "image": CUE_BOXES, "video": CUE_FRAMES}

_MODALITIES = ("text", "image", "video")


def choose_family(side: Side, item_modality: str, target_modality: str | None = None) -> str:
    """The family name for one side of a pair (docs/method.md §5.3, §6.3).

    Query side: an image query gets ``image_based``, a video query ``video_sequence``, a text query
    ``text_to_video_retrieval`` when the targets are videos and ``text_to_image_retrieval`` otherwise (image,
    document or text targets, or unknown). Target side: ``positive_{text,image,video}`` by the item's modality;
    ``target_modality`` is ignored there. (The reference evaluation's routing of image candidates with text to the
    image-based query family is not offered here.)

    >>> choose_family("query", "text", "video"), choose_family("target", "image")
    ('text_to_video_retrieval', 'positive_image')
    """
    if item_modality not in _MODALITIES:
        raise ValueError(f"item_modality={item_modality!r}; use one of {_MODALITIES}")
    if target_modality is not None and target_modality not in _MODALITIES:
        raise ValueError(f"target_modality={target_modality!r}; use one of {_MODALITIES} or None")
    if side == "target":
        return f"positive_{item_modality}"
    if side != "query":
        raise ValueError(f"side={side!r}; use 'query' or 'target'")
    if item_modality == "image":
        return IMAGE_QUERY.name
    if item_modality == "video":
        return VIDEO_QUERY.name
    return TEXT_TO_VIDEO.name if target_modality == "video" else TEXT_TO_IMAGE.name


# ----------------------------------------------------------------------------------------------------------------
# Discriminator (docs/method.md §4.7) and relevance judge (docs/method.md §5.5) prompts
# ----------------------------------------------------------------------------------------------------------------

DISCRIMINATOR = PromptTemplate(
    "discriminator",
    "Choose the candidate that is most relevant to the anchor.\n"
    "\n"
    "Anchor input: $anchor_input\n"
    "Anchor reasoning: $anchor_tcot\n"
    "\n"
    "$candidates\n"
    "\n"
    "Reply with the number of the best candidate (1 to $n_candidates) and nothing else.",
)
DISCRIMINATOR_CANDIDATE = PromptTemplate("discriminator/candidate", "Candidate $index: $tcot")
# Target-to-query direction: each candidate is a query, so its block also carries the query's own task text.
DISCRIMINATOR_CANDIDATE_WITH_INPUT = PromptTemplate(
    "discriminator/candidate_with_input", "Candidate $index input: $input\nCandidate $index reasoning: $tcot"
)


def render_discriminator(
    anchor_input: str, anchor_tcot: str, candidates: Sequence[str], candidate_inputs: Sequence[str] | None = None
) -> str:
    """The Discriminator's listwise prompt; candidates are numbered from 1 in the order given (shuffle first)."""
    if not candidates:
        raise ValueError("the discriminator needs at least one candidate T-CoT")
    if candidate_inputs is not None and len(candidate_inputs) != len(candidates):
        raise ValueError(f"{len(candidate_inputs)} candidate inputs for {len(candidates)} candidates")
    blocks = [
        DISCRIMINATOR_CANDIDATE.render(index=i, tcot=tcot)
        if candidate_inputs is None
        else DISCRIMINATOR_CANDIDATE_WITH_INPUT.render(index=i, input=candidate_inputs[i - 1], tcot=tcot)
        for i, tcot in enumerate(candidates, 1)
    ]
    return DISCRIMINATOR.render(
        anchor_input=anchor_input, anchor_tcot=anchor_tcot, candidates="\n".join(blocks), n_candidates=len(blocks)
    )


JUDGE = PromptTemplate(
    "judge",
    "You check a training pair for a retrieval dataset: a task, the reasoning written for its query and the "
    "reasoning written for its correct target.\n"
    "\n"
    "Task: $task\n"
    "Query reasoning: $query_tcot\n"
    "Target reasoning: $target_tcot\n"
    "\n"
    'Answer "Yes" only if the two reasonings are clearly unrelated (nothing ties them to each other or to the task) '
    "or clearly contradict each other (their main conclusions cannot both hold). In every other case, including "
    'when you are unsure, answer "No".\n'
    "Reply with one word: Yes or No.",
)


# ----------------------------------------------------------------------------------------------------------------
# Benchmark instructions (docs/benchmarks.md §1.2, §3.1) and the answer-conditioned hint (docs/method.md §5.4); our
# wording
# ----------------------------------------------------------------------------------------------------------------

# MMEB-V2 image rows carry their own instructions (``qry_inst`` / ``tgt_inst``). Video and VisDoc rows do not, so the
# harness uses these (query instruction, candidate instruction) pairs, keyed by score key; the V-CLS query texts
# double as the per-dataset task-slot override of docs/method.md §6.3.
_VIDEO_TARGET = "Represent this video for retrieval:"
_LABEL_TARGET = "Represent this category name:"
_ANSWER_TARGET = "Represent this answer:"
MMEB_INSTRUCTIONS: dict[str, tuple[str, str]] = {
    "K700": ("Which human action does this video show?", _LABEL_TARGET),
    "SmthSmthV2": ("What does the person do with the objects in this video?", _LABEL_TARGET),
    "HMDB51": ("Which human action does this video show?", _LABEL_TARGET),
    "UCF101": ("Which sport or activity does this video show?", _LABEL_TARGET),
    "Breakfast": ("Which breakfast item is being prepared in this video?", _LABEL_TARGET),
    "MVBench": ("Watch the video and answer the question:", _ANSWER_TARGET),
    "Video-MME": ("Watch the video and answer the question:", _ANSWER_TARGET),
    "NExTQA": ("Watch the video and answer the question:", _ANSWER_TARGET),
    "EgoSchema": ("Watch this first-person video and answer the question:", _ANSWER_TARGET),
    "ActivityNetQA": ("Watch the video and answer the question with yes or no:", _ANSWER_TARGET),
    "DiDeMo": ("Find the video in which this happens:", _VIDEO_TARGET),
    "MSR-VTT": ("Find the video that this caption describes:", _VIDEO_TARGET),
    "MSVD": ("Find the video that this caption describes:", _VIDEO_TARGET),
    "VATEX": ("Find the video that this caption describes:", _VIDEO_TARGET),
    "YouCook2": ("Find the cooking video clip for this recipe step:", _VIDEO_TARGET),
    "QVHighlight": ("Find the moment of this video that matches the description:", "Represent this video moment:"),
    "Charades-STA": ("Find the moment of this video that matches the description:", "Represent this video moment:"),
    "MomentSeeker": ("Find the video moment that matches this request:", "Represent this video moment:"),
}
VISDOC_INSTRUCTIONS: tuple[str, str] = (
    "Find the document page that answers this question:",
    "Represent this document page for retrieval:",
)

# ----------------------------------------------------------------------------------------------------------------
# The reference harnesses' wording, for `layout: reference` (docs/eval.md §5.1, §6.1): what VLM2Vec (MMEB-V2) and the
# Embed-RL UVRB loader put in front of the item text, verbatim (trailing spaces and all; the reference strips only the
# ends of the final text). Image-task rows carry their own (``qry_inst`` / ``tgt_inst``).
# ----------------------------------------------------------------------------------------------------------------

# MMEB-V2 video classification: the query is this sentence alone (plus the frames); candidates are bare labels.
MMEB_REFERENCE_VIDEO_CLS: dict[str, str] = {
    "K700": "Recognize the category of the video content.",
    "SmthSmthV2": "What actions or object interactions are being performed by the person in the video?",
    "UCF101": "What activities or sports are being performed by the person in the video?",
    "HMDB51": "What actions or objects interactions are the person in the video doing?",
    "Breakfast": "Recognize the breakfast type that the person is cooking in the video. ",
}
# MMEB-V2 video QA: ``f"{VIDEO_TOKEN} {prompt} {question}"`` then the dataset's option block; candidates are the
# options (MVBench: "(A) option"; Video-MME and EgoSchema: the option with its "A. " label cut off).
MMEB_REFERENCE_VIDEO_QA = (
    "Given a video and a question, select the most accurate answer from the provided candidates. Return only the "
    "exact text of your chosen answer. Question: "
)
MMEB_REFERENCE_OPTIONS_HEADER = "\nOptions:\n"  # MVBench and NExTQA: then one "(A) option" line per option
MMEB_REFERENCE_OPTION = "({letter}) {option}"
MMEB_REFERENCE_YES_NO = "? (A) yes; (B) no."  # ActivityNetQA: appended to the question
# MMEB-V2 video retrieval (text query -> video) and moment retrieval: (query instruction, candidate instruction).
MMEB_REFERENCE_VIDEO_TARGET = "Understand the content of the provided video."
MMEB_REFERENCE_VIDEO_RET: dict[str, tuple[str, str]] = {
    "DiDeMo": ("Find a video that includes the following described scenes:", MMEB_REFERENCE_VIDEO_TARGET),
    "MSR-VTT": ("Find a video that contains the following visual content:", MMEB_REFERENCE_VIDEO_TARGET),
    "MSVD": ("Find the video snippet that corresponds to the given summary:", MMEB_REFERENCE_VIDEO_TARGET),
    "VATEX": ("Select a video that fits the description provided:", MMEB_REFERENCE_VIDEO_TARGET),
    "YouCook2": ("Find a video that demonstrates the following action while making a recipe:",
                 MMEB_REFERENCE_VIDEO_TARGET),
    "QVHighlight": ("Find the clip that corresponds to the described scene in the given video:",
                    MMEB_REFERENCE_VIDEO_TARGET),
    "Charades-STA": ("Find the clip that corresponds to the described scene in the given video:",
                     MMEB_REFERENCE_VIDEO_TARGET),
}  # fmt: skip
# MomentSeeker: the query instruction depends on the query's media; candidates are clips.
MMEB_REFERENCE_MOMENTSEEKER: dict[str, str] = {
    "text": "Find the clip that corresponds to the given text:",
    "image": "Select the video clip that aligns with the given text and image:",
    "video": "Find the clip that corresponds to the given sentence and video segment:",
    "target": "Understand the content of the provided video clip.",
}
# MMEB-V2 VisDoc (ViDoRe, VisRAG and the OOD sets): text queries -> page images.
MMEB_REFERENCE_VISDOC: tuple[str, str] = (
    "Find a document image that matches the given query:",
    "Understand the content of the provided document image.",
)

# UVRB query prompts of the Embed-RL UVRB loader, by display name (``f"{prompt} {text}"``; the prompt alone for an
# image- or video-only query; none for VDC-O). As run, the loader looked them up under the config's dataset_name,
# which matches only for CMRB and DiDeMo (docs/benchmarks.md §3.6): ``query_instructions`` chooses.
UVRB_REFERENCE_PROMPTS: dict[str, str] = {
    "MSRVTT": "Find the clip that corresponds to the described scene in the given video.",
    "DiDeMo": "Find a video that includes the following described scenes.",
    "CRB-G": "Find the video according to the general text description.",
    "CRB-S": "Find the video according to the spatial description.",
    "CRB-T": "Find the video according to the temporal description.",
    "CMRB": "Find the video according to the camera motion description.",
    "DREAM-E": "Find the video according to the text description.",
    "LoVR-TH": "Find the video according to text description about video theme information.",
    "PEV-K": "Find the video according to the text description of a series of keywords.",
    "LoVR-V": "Find the long video according to the long text description.",
    "VDC-D": "Find the video according to the detailed text description.",
    "MS-TI": "Find the video clip that corresponds to the given text and the given image.",
    "MS-TV": "Find the video clip that corresponds to the given text and the given video.",
    "MSRVTT-I2V": "Find the video according to the image.",
    "LoVR-C2V": "Find the original long video according to the short video clip.",
}
UVRB_REFERENCE_AS_RUN: tuple[str, ...] = ("CMRB", "DiDeMo")  # the two whose config name matched a prompt key

# UVRB query instructions by display name (docs/benchmarks.md §3.1); candidates get none. VDC-O has none, as in the
# reference loader.
UVRB_QUERY_INSTRUCTIONS: dict[str, str] = {
    "MSRVTT": "Find the video clip that shows the scene described here:",
    "DiDeMo": "Find the video that contains the scenes described here:",
    "CRB-G": "Find the video that matches this general description:",
    "CRB-S": "Find the video that matches this description of what is where:",
    "CRB-T": "Find the video that matches this description of how events unfold over time:",
    "CMRB": "Find the video whose camera movement matches this description:",
    "DREAM-E": "Find the video in which the described events happen:",
    "LoVR-TH": "Find the video whose theme is described here:",
    "PEV-K": "Find the video described by these keywords:",
    "LoVR-V": "Find the long video that matches this long description:",
    "VDC-D": "Find the video that matches this detailed description:",
    "MS-TI": "Find the video clip that matches the text together with the image:",
    "MS-TV": "Find the video clip that matches the text together with the video:",
    "MSRVTT-I2V": "Find the video that matches this image.",
    "LoVR-C2V": "Find the full-length video that this short clip comes from.",
}

# Instructions of the converted training sets whose rows carry none (LLaVA-Hound video, ViDoRe and VisRAG pages;
# MMEB-train rows keep their own): embedrl.prep.convert.
TRAIN_INSTRUCTIONS: dict[str, str] = {
    "video_caption_query": "Describe this video for retrieving its caption.",
    "caption_target": "Represent this video caption:",
    "video_retrieval_query": "Find the video that this caption describes:",
    "video_target": "Represent this video for retrieval:",
    "video_qa_query": "Watch the video and answer the question:",
    "answer_target": "Represent this answer:",
    "document_query": "Find the document page that answers this question:",
    "document_target": "Represent this document page for retrieval:",
}

# Answer-conditioned annotation (docs/method.md §5.4, off by default): appended to a query-side family prompt. It shows
# the ground-truth positive (its text, and for media positives only a reference, never pixels) and tells the
# teacher to keep its reasoning grounded in the query input.
ANSWER_HINT = PromptTemplate(
    "answer_hint",
    "\n\nHint, for your eyes only: the correct match for this query is: $answer\n"
    "Use the hint only to check where your analysis should lead. Ground every step and the cue in the query input "
    "above, never quote or mention the hint, and write the answer as a description of what should be retrieved.",
)
