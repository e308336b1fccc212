"""The synthetic world's teacher: T-CoTs written from ground truth, with realistic, measurable imperfections.

The teacher stands in for the paper's Qwen3-VL-8B annotator (docs/method.md §5.2). It sees what a real teacher would
see
for one item (its media, its text, its task) through a :class:`TeacherView` that the world's task generators fill
from ground truth: short reasoning steps, a rethink, an answer, and the evidence, i.e. the correct boxes (0-1000),
decisive frames (0-based) or keywords. :func:`write_tcot` renders it in exact T-CoT grammar with
:func:`embedrl.tcot.render_tcot`, the cue chosen by the item's prompt family (:data:`embedrl.prompts.PROMPT_FAMILIES`).

Imperfections (rates from :class:`~embedrl.config.TeacherNoiseConfig`, drawn independently per T-CoT wherever they
can apply) mimic the ways a real teacher errs and an Embedder can notice:

=====================  ===========================================================================
``wrong_box``          one box moves onto a distractor (another object, or an unimportant region)
``loose_box``          one box grows by a grid step on one or two sides (never to the whole image)
``missing_frame``      one decisive frame is dropped (replaced by an irrelevant one if it was the only one)
``extra_frame``        one irrelevant frame is added
``distractor_keyword`` a misleading keyword (a near-miss phrase) is inserted
``verbose``            one or two filler sentences pad the thinking
=====================  ===========================================================================

With every rate at 0 the T-CoT is exactly right: :func:`write_oracle_tcot` writes it (the *oracle* T-CoT, stored
with every evaluation item beside the teacher's). :meth:`TeacherOutput.provenance` records which imperfections were
applicable and which were applied, so rates can be measured from the written data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Any

from embedrl.config import TeacherNoiseConfig
from embedrl.prompts import CUE_BOXES, CUE_FRAMES, CUE_KEYWORDS, PROMPT_FAMILIES
from embedrl.tcot import TCoT, render_tcot

GENERATOR = "world-teacher"
NOISE_KINDS: tuple[str, ...] = tuple(f.name for f in fields(TeacherNoiseConfig))
FULL_IMAGE = (0, 0, 1000, 1000)

FILLER_SENTENCES: tuple[str, ...] = (
    "Let me look at the whole input carefully first.",
    "I will go through it step by step.",
    "Some parts may not matter for the task.",
    "I check every part once more before I decide.",
)

BoxT = tuple[int, int, int, int]


@dataclass(frozen=True)
class TeacherView:
    """What the teacher knows about one item: its prompt family, prose, and the correct evidence.

    Attributes:
        family: prompt family name (a key of ``embedrl.prompts.PROMPT_FAMILIES``); fixes the cue key.
        steps: reasoning sentences of ``<thinking>`` (the cue object follows them).
        rethink: the ``<rethink>`` text.
        answer: the ``<answer>`` text.
        boxes: correct boxes, 0-1000 (``bbox_2d`` families).
        distractor_boxes: boxes a wrong box may land on.
        frames: decisive frames, 0-based (``key_frames`` families).
        num_frames: frames in the item's video.
        keywords: correct keywords (``text_keywords`` families).
        distractor_keywords: near-miss phrases a distractor keyword is drawn from.
        box_step: how far a loose box grows per side, on the 0-1000 scale.
    """

    family: str
    steps: tuple[str, ...]
    rethink: str
    answer: str
    boxes: tuple[BoxT, ...] = ()
    distractor_boxes: tuple[BoxT, ...] = ()
    frames: tuple[int, ...] = ()
    num_frames: int = 0
    keywords: tuple[str, ...] = ()
    distractor_keywords: tuple[str, ...] = ()
    box_step: int = 250

    @property
    def cue_key(self) -> str:
        if self.family not in PROMPT_FAMILIES:
            raise ValueError(f"unknown prompt family {self.family!r}; use one of {sorted(PROMPT_FAMILIES)}")
        return PROMPT_FAMILIES[self.family].cue_key

    def check(self) -> None:
        """Raise if the view cannot yield a valid cue (a bug in a task generator, not noise)."""
        key = self.cue_key
        if key == CUE_BOXES and not self.boxes:
            raise ValueError(f"{self.family}: a bbox_2d view needs at least one box")
        if key == CUE_FRAMES and not (self.frames and all(0 <= f < self.num_frames for f in self.frames)):
            raise ValueError(
                f"{self.family}: key frames {self.frames} must be non-empty and in [0, {self.num_frames})"
            )
        if key == CUE_KEYWORDS and not self.keywords:
            raise ValueError(f"{self.family}: a text_keywords view needs at least one keyword")


@dataclass(frozen=True)
class TeacherOutput:
    """A written T-CoT: its text, its structured form, and the imperfections that could and did apply."""

    text: str
    tcot: TCoT
    family: str
    applicable: tuple[str, ...]
    applied: tuple[str, ...]

    def provenance(self) -> dict[str, Any]:
        """JSON-ready provenance for ``Item.meta["tcot_provenance"]``, including the cue as written."""
        cue: dict[str, Any] = {
            CUE_BOXES: {"boxes": [list(b) for b in self.tcot.boxes]},
            CUE_FRAMES: {"frames": list(self.tcot.frames)},
            CUE_KEYWORDS: {"keywords": list(self.tcot.keywords)},
        }[self.tcot.cue_key or ""]
        return {
            "family": self.family,
            "generator": GENERATOR,
            "cue_key": self.tcot.cue_key,
            "noise_applicable": list(self.applicable),
            "noise_applied": list(self.applied),
            **cue,
        }


# ----------------------------------------------------------------------------------------------------------------
# Imperfections
# ----------------------------------------------------------------------------------------------------------------


def _grow(box: BoxT, side: int, step: int) -> BoxT:
    x1, y1, x2, y2 = box
    grown = [x1 - step * (side == 0), y1 - step * (side == 1), x2 + step * (side == 2), y2 + step * (side == 3)]
    return tuple(min(1000, max(0, v)) for v in grown)  # type: ignore[return-value]


def _growable_sides(box: BoxT, step: int) -> list[int]:
    """Sides (0 left, 1 top, 2 right, 3 bottom) with room to grow without covering the whole image."""
    room = [box[0] > 0, box[1] > 0, box[2] < 1000, box[3] < 1000]
    return [s for s in range(4) if room[s] and _grow(box, s, step) != FULL_IMAGE]


def _loose_box(boxes: list[BoxT], step: int, rng: random.Random) -> list[BoxT]:
    candidates = [i for i, b in enumerate(boxes) if _growable_sides(b, step)]
    i = rng.choice(candidates)
    box = boxes[i]
    sides = _growable_sides(box, step)
    for side in rng.sample(sides, k=min(len(sides), rng.choice((1, 2)))):
        grown = _grow(box, side, step)
        if grown != FULL_IMAGE:
            box = grown
    return [box if j == i else b for j, b in enumerate(boxes)]


def _wrong_box(boxes: list[BoxT], distractors: list[BoxT], rng: random.Random) -> list[BoxT]:
    i = rng.randrange(len(boxes))
    return [rng.choice(distractors) if j == i else b for j, b in enumerate(boxes)]


def _missing_frame(frames: list[int], decisive: tuple[int, ...], n: int, rng: random.Random) -> list[int]:
    dropped = rng.choice(sorted(set(frames) & set(decisive)))
    kept = [f for f in frames if f != dropped]
    if not kept:  # the only decisive frame was missed: the teacher points at an irrelevant one instead
        kept = [rng.choice([f for f in range(n) if f not in decisive])]
    return sorted(kept)


def _extra_frame(frames: list[int], decisive: tuple[int, ...], n: int, rng: random.Random) -> list[int]:
    spare = [f for f in range(n) if f not in decisive and f not in frames]
    return sorted([*frames, rng.choice(spare)])


def _applicable(view: TeacherView) -> list[str]:
    key = view.cue_key
    kinds = []
    if key == CUE_BOXES:
        if [d for d in view.distractor_boxes if d not in view.boxes]:
            kinds.append("wrong_box")
        if any(_growable_sides(b, view.box_step) for b in view.boxes):
            kinds.append("loose_box")
    elif key == CUE_FRAMES:
        kinds.append("missing_frame")
        if len(view.frames) < view.num_frames - 1:
            kinds.append("extra_frame")
    elif key == CUE_KEYWORDS and [k for k in view.distractor_keywords if k not in view.keywords]:
        kinds.append("distractor_keyword")
    kinds.append("verbose")
    return kinds


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def write_tcot(view: TeacherView, noise: TeacherNoiseConfig, rng: random.Random) -> TeacherOutput:
    """Write the T-CoT of ``view``; each applicable imperfection happens with its configured rate.

    One uniform draw is made per applicable imperfection whatever the rates, so changing a rate never changes
    which other imperfections a given item gets.

    Example:
        >>> view = TeacherView("positive_text", ("A label.",), "A shape.", "circle", keywords=("circle",))
        >>> text = write_tcot(view, TeacherNoiseConfig(**dict.fromkeys(NOISE_KINDS, 0.0)), random.Random(0)).text
        >>> text.split("</thinking>")[0]
        '<thinking>A label. {"text_keywords": ["circle"]}'
    """
    view.check()
    applicable = _applicable(view)
    hits = {kind: rng.random() < getattr(noise, kind) for kind in applicable}
    boxes, frames, keywords = list(view.boxes), list(view.frames), list(view.keywords)
    steps = list(view.steps)
    if hits.get("wrong_box"):
        boxes = _wrong_box(boxes, [d for d in view.distractor_boxes if d not in view.boxes], rng)
    if hits.get("loose_box"):
        boxes = _loose_box(boxes, view.box_step, rng)
    if hits.get("missing_frame"):
        frames = _missing_frame(frames, view.frames, view.num_frames, rng)
    if hits.get("extra_frame"):
        frames = _extra_frame(frames, view.frames, view.num_frames, rng)
    if hits.get("distractor_keyword"):
        spare = [k for k in view.distractor_keywords if k not in keywords]
        keywords.insert(rng.randrange(len(keywords) + 1), rng.choice(spare))
    if hits.get("verbose"):
        steps = rng.sample(FILLER_SENTENCES, k=rng.choice((1, 2))) + steps
    tcot = TCoT(
        thinking=" ".join(steps),
        cue_key=view.cue_key,
        keywords=keywords,
        boxes=[list(b) for b in dict.fromkeys(boxes)],  # a wrong box may land on a box already listed
        frames=frames,
        rethink=view.rethink,
        answer=view.answer,
    )
    applied = tuple(kind for kind in applicable if hits[kind])
    return TeacherOutput(render_tcot(tcot), tcot, view.family, tuple(applicable), applied)


def write_oracle_tcot(view: TeacherView) -> TeacherOutput:
    """The T-CoT of ``view`` as the teacher writes it with every imperfection rate at 0: exactly right, the ceiling of
    what a perfect Reasoner could give the Embedder.

    It is :func:`write_tcot` with zero rates, so it equals the teacher's T-CoT wherever no imperfection applied. No
    draw can change it (a draw below a rate of 0 never happens), so it needs no seed.
    """
    return write_tcot(view, TeacherNoiseConfig(**dict.fromkeys(NOISE_KINDS, 0.0)), random.Random(0))


# ----------------------------------------------------------------------------------------------------------------
# Listwise discrimination examples (docs/method.md §4.7): structured data; the prompt is rendered by embedrl.prompts
# ----------------------------------------------------------------------------------------------------------------


def discrimination_example(
    example_id: str,
    dataset: str,
    direction: str,
    anchor: dict[str, Any],
    positive: dict[str, Any],
    negatives: list[dict[str, Any]],
    rng: random.Random,
) -> dict[str, Any]:
    """One labelled example: an anchor, the positive and hard negatives shuffled, and the positive's index.

    Args:
        example_id: stable id of the example.
        dataset: the pair's dataset.
        direction: ``query_to_target`` (anchor = query T-CoT, candidates = target T-CoTs) or ``target_to_query``.
        anchor, positive, negatives: dicts with ``id``, ``text``, ``instruction`` and ``tcot``.
        rng: seeded RNG for the shuffle.

    Returns:
        ``{"id", "dataset", "direction", "anchor", "candidates", "label"}`` with ``label`` the 0-based index of the
        positive in ``candidates``.
    """
    if direction not in ("query_to_target", "target_to_query"):
        raise ValueError(f"direction={direction!r}; use query_to_target or target_to_query")
    if not negatives:
        raise ValueError(f"{example_id}: a discrimination example needs at least one negative")
    candidates = [positive, *negatives]
    order = list(range(len(candidates)))
    rng.shuffle(order)
    return {
        "id": example_id,
        "dataset": dataset,
        "direction": direction,
        "anchor": anchor,
        "candidates": [candidates[i] for i in order],
        "label": order.index(0),
    }
