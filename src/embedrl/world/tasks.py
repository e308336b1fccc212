"""The synthetic world's tasks: one generator per dataset, mirroring the MMEB-V2 meta-tasks.

A generator turns a seeded RNG into an :class:`Example`: a query :class:`Side`, its positive, and ``k`` hard
negatives that provably do not answer the query (checked with the task's own predicate). A side is a spec, not
pixels: media are rendered only when an item is written, so negatives used only for their T-CoTs cost nothing.
Each side carries a :class:`~embedrl.world.teacher.TeacherView` built from ground truth. Query views may use the
query's own task text; target views use only the target itself (target-side prompts never see the query).

================  ========  ============================================================================
dataset / task    meta      query -> target
================  ========  ============================================================================
world_cls         I-CLS     image -> label "red triangle" (the one patterned object's colour and shape)
world_vqa         I-QA      image + question (relation, count, pattern) -> answer phrase
world_t2i         I-RET     caption "a X directly left of a Y" -> image
world_i2t         I-RET     image -> caption
world_grounding   I-GD      image + referring expression -> crop of the object
world_video_cls   V-CLS     video -> label "a circle jumps" (global over all 16 labels)
world_vqa_video   V-QA      video + "what happens after/before ..." -> answer phrase
world_t2v         V-RET     caption "the X jumps, then the Y vanishes" -> video (global)
world_v2t         V-RET     video -> caption
world_moment      V-MRET    "the moment when the X flashes" -> one of several clips of the same scene
world_doc         VisDoc    "the river page that lists fish 12" -> page (global, graded relevance)
================  ========  ============================================================================
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from embedrl.world.scenes import (
    COLOURS,
    EVENTS,
    NUMBER_WORDS,
    PAGE_ENTRY_BOXES,
    PAGE_HEADING_BOX,
    PAGE_TABLE_BOX,
    PAGE_TEXT_BOX,
    PATTERNS,
    SEASONS,
    SHAPES,
    SIDES,
    SIZES,
    TABLE_ITEMS,
    TOPICS,
    Clip,
    Crop,
    Event,
    MediaSpec,
    Obj,
    Page,
    Scene,
    cell_box,
    crop_box,
    max_offset,
    phrase_of,
)
from embedrl.world.teacher import TeacherView

Attrs = tuple[str, str, str, str]  # size, colour, pattern, shape
# X is <relation> Y  <=>  X.cell == Y.cell + OFFSETS[relation]
OFFSETS: dict[str, tuple[int, int]] = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}

INSTRUCTIONS = {
    "image": "Represent the given image.",
    "crop": "Represent the given cropped object.",
    "video": "Represent the given video.",
    "page": "Represent the given document page.",
    "text": "",
}


@dataclass(frozen=True)
class Geometry:
    """Pixel layout shared by all tasks (from WorldConfig)."""

    grid: int = 4
    cell: int = 32
    video_grid: int = 2
    num_frames: int = 8
    page_size: int = 128

    @property
    def box_step(self) -> int:
        return round(1000 / self.grid)


@dataclass(frozen=True)
class Level:
    """Difficulty: objects per image, chance that a distractor is a near-copy of an object, objects per clip."""

    min_objects: int
    max_objects: int
    p_similar: float
    video_objects: tuple[int, int]

    def n_objects(self, rng: random.Random, geo: Geometry) -> int:
        return min(rng.randint(self.min_objects, self.max_objects), geo.grid * geo.grid - 1)

    def n_video_objects(self, rng: random.Random, geo: Geometry) -> int:
        return min(rng.randint(*self.video_objects), geo.video_grid**2)


TRAIN_LEVEL = Level(3, 5, 0.5, (2, 3))
RL_LEVEL = Level(5, 7, 0.85, (3, 4))  # harder: more objects, more near-copies
EVAL_LEVEL = Level(4, 6, 0.65, (3, 4))


@dataclass(frozen=True)
class Side:
    """One query, positive or negative, as a spec: text, instruction, media spec and teacher view."""

    text: str
    instruction: str
    media: MediaSpec | None
    view: TeacherView
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> Hashable:
        """Identity of the content; equal keys are the same candidate."""
        return (self.text, self.instruction, self.media)


@dataclass(frozen=True)
class Example:
    """A query, its positive, hard negatives, and the query's meaning (what relevance is judged against)."""

    query: Side
    positive: Side
    negatives: tuple[Side, ...]
    semantics: Hashable


class GenerationError(RuntimeError):
    """A generator could not build a valid example (a bug or an impossible configuration)."""


def collect(
    proposals: Sequence[Callable[[], Side | None]],
    k: int,
    valid: Callable[[Side], bool],
    exclude: Sequence[Side],
    rng: random.Random,
    what: str,
) -> tuple[Side, ...]:
    """Up to ``k`` distinct valid sides: first one from each proposal in order, then from random proposals."""
    seen = {s.key for s in exclude}
    out: list[Side] = []

    def offer(side: Side | None) -> None:
        if side is not None and side.key not in seen and valid(side):
            seen.add(side.key)
            out.append(side)

    for propose in proposals:
        if len(out) >= k:
            break
        offer(propose())
    tries = 0
    while len(out) < k:
        tries += 1
        if tries > 50 * (k + 1):
            raise GenerationError(f"{what}: found only {len(out)} of {k} valid negatives; lower eval_candidates")
        offer(rng.choice(proposals)())
    return tuple(out[:k])


# ----------------------------------------------------------------------------------------------------------------
# Objects and scenes
# ----------------------------------------------------------------------------------------------------------------


def random_attrs(
    rng: random.Random,
    patterns: Sequence[str] = PATTERNS,
    colours: Sequence[str] = tuple(COLOURS),
    sizes: Sequence[str] = SIZES,
) -> Attrs:
    return (rng.choice(sizes), rng.choice(colours), rng.choice(patterns), rng.choice(SHAPES))


def similar_attrs(
    rng: random.Random, base: Attrs, patterns: Sequence[str] = PATTERNS, colours: Sequence[str] = tuple(COLOURS)
) -> Attrs:
    """``base`` with one attribute changed (then the pattern and colour forced into the allowed sets)."""
    size, colour, pattern, shape = base
    which = rng.choice(("size", "colour", "pattern", "shape"))
    if which == "size":
        size = "small" if size == "large" else "large"
    elif which == "colour":
        colour = rng.choice([c for c in colours if c != colour] or list(colours))
    elif which == "pattern":
        pattern = rng.choice([p for p in patterns if p != pattern] or list(patterns))
    else:
        shape = rng.choice([s for s in SHAPES if s != shape])
    if pattern not in patterns:
        pattern = rng.choice(patterns)
    if colour not in colours:
        colour = rng.choice(colours)
    return (size, colour, pattern, shape)


def make_obj(rng: random.Random, attrs: Attrs, cell: tuple[int, int], geo: Geometry, jitter: bool = True) -> Obj:
    size, colour, pattern, shape = attrs
    m = max_offset(size, geo.cell) if jitter else 0
    return Obj(shape, colour, size, pattern, cell[0], cell[1], rng.randint(-m, m), rng.randint(-m, m))


def sample_scene(
    rng: random.Random,
    geo: Geometry,
    n: int,
    p_similar: float,
    fixed: Sequence[Obj] = (),
    patterns: Sequence[str] = PATTERNS,
    colours: Sequence[str] = tuple(COLOURS),
) -> Scene:
    """A scene of ``n`` objects: ``fixed`` ones plus distractors, often near-copies of objects already placed."""
    objects = list(fixed)
    used_attrs = {o.attrs for o in objects}
    free = [(r, c) for r in range(geo.grid) for c in range(geo.grid) if (r, c) not in {o.cell for o in objects}]
    for _ in range(200):
        if len(objects) >= n:
            break
        if objects and rng.random() < p_similar:
            attrs = similar_attrs(rng, rng.choice(objects).attrs, patterns, colours)
        else:
            attrs = random_attrs(rng, patterns, colours)
        if attrs in used_attrs:
            continue
        used_attrs.add(attrs)
        objects.append(make_obj(rng, attrs, free.pop(rng.randrange(len(free))), geo))
    if len(objects) < n:
        raise GenerationError(f"could not place {n} distinct objects with patterns={patterns}, colours={colours}")
    return Scene(tuple(sorted(objects, key=lambda o: o.cell)), geo.grid)


def article(phrase: str) -> str:
    """``an`` before a vowel sound, else ``a`` (enough for the world's vocabulary)."""
    return "an" if phrase[:1] in "aeiou" else "a"


def objects_phrase(scene: Scene) -> str:
    return ", ".join(f"a {o.phrase()}" for o in scene.objects)


def adjacent_facts(scene: Scene, limit: int = 3) -> list[str]:
    """Up to ``limit`` "the X is directly left of / above the Y" facts, in reading order."""
    facts = []
    for o in scene.objects:
        for rel in ("left of", "above"):
            dr, dc = OFFSETS[rel]
            other = scene.at(o.row - dr, o.col - dc)
            if other is not None:
                facts.append(f"The {o.phrase()} is directly {rel} the {other.phrase()}.")
    return facts[:limit]


def scene_view(scene: Scene, geo: Geometry, family: str, first_step: str) -> TeacherView:
    """A view that boxes every object: used for image targets and for image queries without a question."""
    n = len(scene.objects)
    return TeacherView(
        family=family,
        steps=(first_step, f"It shows {NUMBER_WORDS[n]} objects: {objects_phrase(scene)}.", *adjacent_facts(scene)),
        rethink="Each box holds one object; the small patterns are clearer in the crops.",
        answer=f"An image with {objects_phrase(scene)}.",
        boxes=tuple(o.box(geo.grid) for o in scene.objects),
        distractor_boxes=tuple(cell_box(r, c, geo.grid) for r, c in scene.free_cells()),
        box_step=geo.box_step,
    )


def text_view(
    text: str,
    keywords: Sequence[str],
    distractors: Sequence[str],
    step: str,
    rethink: str,
    family: str = "positive_text",
) -> TeacherView:
    return TeacherView(
        family=family,
        steps=(step,),
        rethink=rethink,
        answer=text[:1].upper() + text[1:] + ("" if text.endswith(".") else "."),
        keywords=tuple(keywords),
        distractor_keywords=tuple(d for d in distractors if d not in keywords),
    )


def image_side(scene: Scene, geo: Geometry) -> Side:
    return Side("", INSTRUCTIONS["image"], scene, scene_view(scene, geo, "positive_image", "The image is a scene."))


def near_phrases(rng: random.Random, attrs: Attrs, n: int = 3) -> list[str]:
    return list(dict.fromkeys(phrase_of(similar_attrs(rng, attrs)) for _ in range(n)))


# ----------------------------------------------------------------------------------------------------------------
# Image tasks
# ----------------------------------------------------------------------------------------------------------------


def _label_side(label: str, rng: random.Random) -> Side:
    colour, shape = label.split()
    others = [f"{rng.choice([c for c in COLOURS if c != colour])}", f"{rng.choice([s for s in SHAPES if s != shape])}"]
    view = text_view(
        label,
        (colour, shape),
        others,
        "The label names a colour and a shape.",
        f"An image of this class has {article(label)} {label} as its patterned object.",
    )
    return Side(label, INSTRUCTIONS["text"], None, view)


def make_cls(rng: random.Random, geo: Geometry, level: Level, k: int) -> Example:
    """I-CLS: exactly one object carries a pattern; the class is its colour and shape."""
    target = make_obj(
        rng, random_attrs(rng, ("striped", "dotted")), (rng.randrange(geo.grid), rng.randrange(geo.grid)), geo
    )
    scene = sample_scene(rng, geo, level.n_objects(rng, geo), level.p_similar, [target], patterns=("plain",))
    label = f"{target.colour} {target.shape}"
    view = TeacherView(
        family="image_based",
        steps=(
            "The task asks for the colour and shape of the one patterned object.",
            f"Of the {NUMBER_WORDS[len(scene.objects)]} objects only one is {target.pattern}.",
        ),
        rethink=f"The boxed object is a {target.phrase()}; the other objects are plain.",
        answer=f"The patterned object is {article(label)} {label}.",
        boxes=(target.box(geo.grid),),
        distractor_boxes=tuple(o.box(geo.grid) for o in scene.objects if o != target),
        box_step=geo.box_step,
    )
    query = Side("", "Classify the patterned object in the image by its colour and shape.", scene, view)
    others = [f"{o.colour} {o.shape}" for o in scene.objects if o != target]
    proposals = [lambda lab=lab: _label_side(lab, rng) for lab in dict.fromkeys(others)]
    proposals += [
        lambda: _label_side(f"{rng.choice(list(COLOURS))} {target.shape}", rng),
        lambda: _label_side(f"{target.colour} {rng.choice(SHAPES)}", rng),
        lambda: _label_side(f"{rng.choice(list(COLOURS))} {rng.choice(SHAPES)}", rng),
    ]
    positive = _label_side(label, rng)
    negatives = collect(proposals, k, lambda s: s.text != label, [positive], rng, "world_cls")
    return Example(query, positive, negatives, label)


def _answer_side(answer: str, keywords: Sequence[str], distractors: Sequence[str]) -> Side:
    view = text_view(
        answer,
        keywords,
        distractors,
        "The answer names what the question asks for.",
        f"A correct answer here is: {answer}.",
    )
    return Side(answer, INSTRUCTIONS["text"], None, view)


def _qa_view(steps: Sequence[str], answer: str, boxes: Sequence[Obj], scene: Scene, geo: Geometry) -> TeacherView:
    return TeacherView(
        family="image_based",
        steps=tuple(steps),
        rethink="The boxed objects are the evidence for the answer.",
        answer=f"The answer is: {answer}.",
        boxes=tuple(o.box(geo.grid) for o in boxes),
        distractor_boxes=tuple(o.box(geo.grid) for o in scene.objects if o not in boxes),
        box_step=geo.box_step,
    )


def _count_phrase(number: str, colour: str) -> str:
    return f"{number} {colour} {'object' if number == 'one' else 'objects'}"


def _vqa_relation(rng: random.Random, geo: Geometry, level: Level) -> tuple[Scene, str, str, list[Obj], list[str]]:
    rel = rng.choice(tuple(OFFSETS))
    dr, dc = OFFSETS[rel]
    cells = [
        (r, c) for r in range(geo.grid) for c in range(geo.grid) if 0 <= r + dr < geo.grid and 0 <= c + dc < geo.grid
    ]
    ref_cell = rng.choice(cells)
    ref = make_obj(rng, random_attrs(rng), ref_cell, geo)
    attrs = similar_attrs(rng, ref.attrs) if rng.random() < level.p_similar else random_attrs(rng)
    if attrs == ref.attrs:
        attrs = similar_attrs(rng, ref.attrs)
    ans = make_obj(rng, attrs, (ref_cell[0] + dr, ref_cell[1] + dc), geo)
    scene = sample_scene(rng, geo, level.n_objects(rng, geo), level.p_similar, [ref, ans])
    question = f"What is directly {rel} the {ref.phrase()}?"
    steps = [
        f"The question asks what is directly {rel} the {ref.phrase()}.",
        f"The object in the next cell {rel.split()[0]} it is the {ans.phrase()}.",
    ]
    return scene, question, f"the {ans.phrase()}", [ans, ref], steps


def _vqa_count(rng: random.Random, geo: Geometry, level: Level) -> tuple[Scene, str, str, list[Obj], list[str]]:
    colour = rng.choice(list(COLOURS))
    n = level.n_objects(rng, geo)
    count = rng.randint(1, min(4, n - 1))
    counted = sample_scene(rng, geo, count, level.p_similar, colours=(colour,))
    others = tuple(c for c in COLOURS if c != colour)
    scene = sample_scene(rng, geo, n, level.p_similar, counted.objects, colours=others)
    answer = _count_phrase(NUMBER_WORDS[count], colour)
    steps = [
        f"The question asks how many {colour} objects there are.",
        f"I find {answer} among the {NUMBER_WORDS[n]} objects.",
    ]
    return scene, f"How many {colour} objects are in the image?", answer, list(counted.objects), steps


def _vqa_pattern(rng: random.Random, geo: Geometry, level: Level) -> tuple[Scene, str, str, list[Obj], list[str]]:
    pattern = rng.choice(("striped", "dotted"))
    target = make_obj(rng, random_attrs(rng, (pattern,)), (rng.randrange(geo.grid), rng.randrange(geo.grid)), geo)
    rest = tuple(p for p in PATTERNS if p != pattern)
    scene = sample_scene(rng, geo, level.n_objects(rng, geo), level.p_similar, [target], patterns=rest)
    steps = [f"The question asks which object is {pattern}.", f"Only the {target.phrase()} has that pattern."]
    return scene, f"Which object is {pattern}?", f"the {target.phrase()}", [target], steps


def make_vqa(rng: random.Random, geo: Geometry, level: Level, k: int) -> Example:
    """I-QA: relation, count and pattern questions; answers are short phrases."""
    kind = rng.choice(("relation", "count", "pattern"))
    build = {"relation": _vqa_relation, "count": _vqa_count, "pattern": _vqa_pattern}[kind]
    scene, question, answer, evidence, steps = build(rng, geo, level)
    query = Side(
        question,
        "Answer the question about the image.",
        scene,
        _qa_view(steps, answer, evidence, scene, geo),
        {"question_type": kind},
    )
    if kind == "count":
        number, colour, noun = answer.split()
        near = [_count_phrase(w, colour) for w in NUMBER_WORDS[1:7]] + [_count_phrase(number, c) for c in COLOURS]
        keywords, distract = (number, f"{colour} {noun}"), [_count_phrase(rng.choice(NUMBER_WORDS[1:7]), colour)]
        proposals = [lambda p=p: _answer_side(p, (p.split(" ", 1)[0], p.split(" ", 1)[1]), ()) for p in near]
    else:
        target = evidence[0]
        near = [f"the {o.phrase()}" for o in scene.objects if o != target]
        near += [f"the {p}" for p in near_phrases(rng, target.attrs, 4)]
        keywords, distract = (target.phrase(),), near_phrases(rng, target.attrs, 2)
        proposals = [lambda p=p: _answer_side(p, (p.removeprefix("the "),), ()) for p in near]
        proposals.append(lambda: _answer_side(f"the {phrase_of(random_attrs(rng))}", ("object",), ()))
    positive = _answer_side(answer, keywords, distract)
    negatives = collect(proposals, k, lambda s: s.text != answer, [positive], rng, "world_vqa")
    return Example(query, positive, negatives, answer)


# Captions "a X directly <rel> a Y" ----------------------------------------------------------------------------

Caption = tuple[Attrs, str, Attrs]


def caption_text(cap: Caption) -> str:
    a, rel, b = cap
    return f"a {phrase_of(a)} directly {rel} a {phrase_of(b)}"


def caption_holds(scene: Scene, cap: Caption) -> bool:
    a, rel, b = cap
    oa, ob = scene.find(a), scene.find(b)
    if oa is None or ob is None:
        return False
    dr, dc = OFFSETS[rel]
    return oa.cell == (ob.row + dr, ob.col + dc)


def caption_scene(rng: random.Random, geo: Geometry, level: Level) -> tuple[Scene, Caption]:
    """A scene and a true caption about two neighbouring objects."""
    scene, _, _, (a, b), _ = _vqa_relation(rng, geo, level)  # a is <rel> b by construction
    rel = next(r for r, (dr, dc) in OFFSETS.items() if a.cell == (b.row + dr, b.col + dc))
    return scene, (a.attrs, rel, b.attrs)


def caption_side(cap: Caption, rng: random.Random) -> Side:
    a, rel, b = cap
    text = caption_text(cap)
    distract = [*near_phrases(rng, a, 1), next(r for r in OFFSETS if r != rel)]
    view = text_view(
        text,
        (phrase_of(a), rel, phrase_of(b)),
        distract,
        "The caption names two objects and their places.",
        f"A matching image shows the {phrase_of(a)} in the cell directly {rel} the {phrase_of(b)}.",
    )
    return Side(text, INSTRUCTIONS["text"], None, view, {"caption": cap})


def _t2i_query(cap: Caption, rng: random.Random) -> Side:
    a, rel, b = cap
    view = text_view(
        caption_text(cap),
        (phrase_of(a), rel, phrase_of(b)),
        [*near_phrases(rng, b, 1), next(r for r in OFFSETS if r != rel)],
        "The caption names two objects and how they are placed.",
        f"A matching image has the {phrase_of(a)} directly {rel} the {phrase_of(b)}.",
        family="text_to_image_retrieval",
    )
    return Side(caption_text(cap), "Find an image that matches the caption.", None, view)


def scene_variants(rng: random.Random, scene: Scene, cap: Caption, geo: Geometry) -> list[Callable[[], Scene | None]]:
    """Near-duplicate scenes of ``scene`` in which ``cap`` may no longer hold (callers check)."""
    a_attrs, _, b_attrs = cap
    a, b = scene.find(a_attrs), scene.find(b_attrs)
    assert a is not None and b is not None

    def swap() -> Scene:
        moved = {a: replace(a, row=b.row, col=b.col), b: replace(b, row=a.row, col=a.col)}
        return Scene(tuple(moved.get(o, o) for o in scene.objects), scene.grid)

    def alter(obj: Obj) -> Scene | None:
        attrs = similar_attrs(rng, obj.attrs)
        if scene.find(attrs) is not None:
            return None
        size, colour, pattern, shape = attrs
        return scene.replace_object(
            obj, replace(obj, size=size, colour=colour, pattern=pattern, shape=shape, dx=0, dy=0)
        )

    def move() -> Scene:
        r, c = rng.choice(scene.free_cells())
        return scene.replace_object(a, replace(a, row=r, col=c))

    def fresh() -> Scene:
        return caption_scene(rng, geo, Level(len(scene.objects), len(scene.objects), 0.7, (2, 2)))[0]

    return [swap, lambda: alter(a), lambda: alter(b), move, lambda: alter(rng.choice(scene.objects)), fresh]


def _sorted_scene(scene: Scene | None) -> Scene | None:
    return None if scene is None else Scene(tuple(sorted(scene.objects, key=lambda o: o.cell)), scene.grid)


def make_t2i(rng: random.Random, geo: Geometry, level: Level, k: int) -> Example:
    """I-RET text -> image: hard negatives are near-duplicate scenes where the caption is false."""
    scene, cap = caption_scene(rng, geo, level)
    variants = scene_variants(rng, scene, cap, geo)
    proposals = [
        lambda v=v: (lambda s: None if s is None else image_side(s, geo))(_sorted_scene(v())) for v in variants
    ]
    positive = image_side(scene, geo)
    negatives = collect(proposals, k, lambda s: not caption_holds(s.media, cap), [positive], rng, "world_t2i")
    return Example(_t2i_query(cap, rng), positive, negatives, cap)


def make_i2t(rng: random.Random, geo: Geometry, level: Level, k: int) -> Example:
    """I-RET image -> text: hard negatives are captions with a swapped role, relation or attribute."""
    scene, cap = caption_scene(rng, geo, level)
    a, rel, b = cap
    other = [o.attrs for o in scene.objects if o.attrs not in (a, b)]
    proposals: list[Callable[[], Side | None]] = [
        lambda: caption_side((b, rel, a), rng),
        lambda: caption_side((a, rng.choice([r for r in OFFSETS if r != rel]), b), rng),
        lambda: caption_side((similar_attrs(rng, a), rel, b), rng),
        lambda: caption_side((a, rel, similar_attrs(rng, b)), rng),
        lambda: caption_side((a, rel, rng.choice(other)), rng) if other else None,
        lambda: caption_side((random_attrs(rng), rng.choice(tuple(OFFSETS)), random_attrs(rng)), rng),
    ]
    view = scene_view(scene, geo, "image_based", "The task asks for a caption of the image.")
    query = Side("", "Find a caption that describes the image.", scene, view)
    positive = caption_side(cap, rng)

    negatives = collect(
        proposals, k, lambda s: not caption_holds(scene, s.info["caption"]), [positive], rng, "world_i2t"
    )
    return Example(query, positive, negatives, cap)


def crop_side(obj: Obj, geo: Geometry) -> Side:
    crop = Crop.of(obj)
    view = TeacherView(
        family="positive_image",
        steps=("The image is a close view of one object.", f"It is a {obj.phrase()}."),
        rethink=f"The box holds the whole object; its pattern is {obj.pattern}.",
        answer=f"A close view of a {obj.phrase()}.",
        boxes=(crop_box(crop, geo.cell),),
        box_step=geo.box_step // 2,
    )
    return Side("", INSTRUCTIONS["crop"], crop, view)


def make_grounding(rng: random.Random, geo: Geometry, level: Level, k: int) -> Example:
    """I-GD: image + referring expression -> the crop of that object; negatives are crops of its neighbours."""
    target = make_obj(rng, random_attrs(rng), (rng.randrange(geo.grid), rng.randrange(geo.grid)), geo)
    scene = sample_scene(rng, geo, level.n_objects(rng, geo), level.p_similar, [target])
    view = TeacherView(
        family="image_based",
        steps=(
            f"The expression describes a {target.phrase()}.",
            f"Only one of the {NUMBER_WORDS[len(scene.objects)]} objects matches all of its words.",
        ),
        rethink="The boxed object matches its size, colour, pattern and shape.",
        answer=f"The {target.phrase()} in the image.",
        boxes=(target.box(geo.grid),),
        distractor_boxes=tuple(o.box(geo.grid) for o in scene.objects if o != target),
        box_step=geo.box_step,
    )
    query = Side(
        f"the {target.phrase()}", "Select the part of the image that shows the described object.", scene, view
    )

    def perturbed() -> Side:
        size, colour, pattern, shape = similar_attrs(rng, target.attrs)
        return crop_side(make_obj(rng, (size, colour, pattern, shape), (0, 0), geo), geo)

    proposals = [lambda o=o: crop_side(o, geo) for o in scene.objects if o != target]
    proposals += [perturbed, lambda: crop_side(make_obj(rng, random_attrs(rng), (0, 0), geo), geo)]
    positive = crop_side(target, geo)
    negatives = collect(proposals, k, lambda s: s.media.obj.attrs != target.attrs, [positive], rng, "world_grounding")
    return Example(query, positive, negatives, target.attrs)


# ----------------------------------------------------------------------------------------------------------------
# Video tasks
# ----------------------------------------------------------------------------------------------------------------

EventSem = tuple[str, str, str]  # colour, shape, event
VideoCaption = tuple[EventSem, EventSem]  # the first event, then the second


def sample_video_scene(rng: random.Random, geo: Geometry, n: int) -> Scene:
    """Small plain objects with distinct colour-shape names, one per cell of the video grid, centred."""
    names = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    cells = rng.sample([(r, c) for r in range(geo.video_grid) for c in range(geo.video_grid)], n)
    objects = [
        Obj(shape, colour, "small", "plain", r, c) for (colour, shape), (r, c) in zip(names, cells, strict=True)
    ]
    return Scene(tuple(sorted(objects, key=lambda o: o.cell)), geo.video_grid)


def shimmer(rng: random.Random, geo: Geometry) -> tuple[int, ...]:
    return tuple(rng.choice((-2, -1, 0, 0, 1, 2)) for _ in range(geo.num_frames))


def name(obj: Obj) -> str:
    return f"{obj.colour} {obj.shape}"


def frames_phrase(frames: Sequence[int]) -> str:
    """1-based, as in the key_frames cue: ``frame 3`` or ``frames 3 and 4``."""
    shown = [str(f + 1) for f in frames]
    return f"frame {shown[0]}" if len(shown) == 1 else f"frames {', '.join(shown[:-1])} and {shown[-1]}"


def random_event(rng: random.Random, index: int, lo: int, hi: int, kind: str | None = None) -> Event:
    """An event of object ``index`` lasting 1-2 frames inside frames ``lo .. hi - 1``."""
    length = rng.choice((1, 2)) if hi - lo >= 2 else 1
    return Event(index, kind or rng.choice(EVENTS), rng.randint(lo, hi - length), length)


def event_sems(clip: Clip) -> list[tuple[EventSem, int]]:
    """(colour, shape, event) and start frame of each event, in time order."""
    return [
        ((clip.scene.objects[e.index].colour, clip.scene.objects[e.index].shape, e.kind), e.start)
        for e in clip.ordered_events()
    ]


def two_event_clip(rng: random.Random, geo: Geometry, scene: Scene) -> Clip:
    """Two events on different objects: the first in the first half of the clip, the second in the second half."""
    i, j = rng.sample(range(len(scene.objects)), 2)
    half = geo.num_frames // 2
    events = (random_event(rng, i, 0, half), random_event(rng, j, half, geo.num_frames))
    return Clip(scene, events, shimmer(rng, geo))


def clip_view(clip: Clip, family: str, first_step: str) -> TeacherView:
    """Key frames are the event frames; the prose names each event with its (1-based) frames."""
    scene = clip.scene
    steps = [first_step, f"The clip shows {NUMBER_WORDS[len(scene.objects)]} objects that stay still in most frames."]
    for e in clip.ordered_events():
        steps.append(f"In {frames_phrase(e.frames)} the {name(scene.objects[e.index])} {e.kind}.")
    told = ", then ".join(f"the {name(scene.objects[e.index])} {e.kind}" for e in clip.ordered_events())
    return TeacherView(
        family=family,
        steps=tuple(steps),
        rethink="Only the key frames differ from the others, so they carry the events.",
        answer=f"A clip where {told}.",
        frames=clip.decisive_frames(),
        num_frames=clip.num_frames,
    )


def video_side(clip: Clip) -> Side:
    return Side("", INSTRUCTIONS["video"], clip, clip_view(clip, "positive_video", "The video is a short clip."))


def video_label_side(label: str, rng: random.Random) -> Side:
    _, shape, kind = label.split()
    distract = [rng.choice([s for s in SHAPES if s != shape]), rng.choice([k for k in EVENTS if k != kind])]
    view = text_view(
        label,
        (shape, kind),
        distract,
        "The label names a shape and an event.",
        f"A video of this class shows a {shape} that {kind} in one or two frames.",
    )
    return Side(label, INSTRUCTIONS["text"], None, view)


def video_labels() -> list[str]:
    return [f"a {shape} {kind}" for shape in SHAPES for kind in EVENTS]


def make_video_cls(rng: random.Random, geo: Geometry, level: Level, k: int) -> Example:
    """V-CLS: one object does one event in 1-2 frames; the class is "a <shape> <event>" (16 classes)."""
    scene = sample_video_scene(rng, geo, level.n_video_objects(rng, geo))
    event = random_event(rng, rng.randrange(len(scene.objects)), 0, geo.num_frames)
    clip = Clip(scene, (event,), shimmer(rng, geo))
    obj = scene.objects[event.index]
    label = f"a {obj.shape} {event.kind}"
    view = clip_view(clip, "video_sequence", "The task asks which event the video shows.")
    query = Side("", "Classify the event in the video.", clip, replace(view, answer=f"The class is: {label}."))
    proposals = [
        lambda: video_label_side(f"a {obj.shape} {rng.choice(EVENTS)}", rng),
        lambda: video_label_side(f"a {rng.choice(SHAPES)} {event.kind}", rng),
        lambda: video_label_side(rng.choice(video_labels()), rng),
    ]
    positive = video_label_side(label, rng)
    negatives = collect(proposals, k, lambda s: s.text != label, [positive], rng, "world_video_cls")
    return Example(query, positive, negatives, label)


def _event_answer(sem: EventSem, rng: random.Random) -> Side:
    colour, shape, kind = sem
    return _answer_side(
        f"the {colour} {shape} {kind}",
        (f"{colour} {shape}", kind),
        (f"{colour} {shape} {rng.choice([e for e in EVENTS if e != kind])}",),
    )


def make_vqa_video(rng: random.Random, geo: Geometry, level: Level, k: int) -> Example:
    """V-QA: two events in order; "what happens after/before X?" -> the other event."""
    scene = sample_video_scene(rng, geo, max(2, level.n_video_objects(rng, geo)))
    clip = two_event_clip(rng, geo, scene)
    (first, _), (second, _) = event_sems(clip)
    when = rng.choice(("after", "before"))
    asked, answer = (first, second) if when == "after" else (second, first)
    question = f"What happens {when} the {asked[0]} {asked[1]} {asked[2]}?"
    view = clip_view(clip, "video_sequence", f"The question asks what happens {when} the {' '.join(asked)}.")
    answer_text = f"the {' '.join(answer)}"
    query = Side(
        question,
        "Answer the question about the video.",
        clip,
        replace(view, answer=f"The answer is: {answer_text}."),
        {"question_type": when},
    )
    objs = [(o.colour, o.shape) for o in scene.objects]
    proposals = [
        lambda: _event_answer(asked, rng),
        lambda: _event_answer((answer[0], answer[1], rng.choice(EVENTS)), rng),
        lambda: _event_answer((*rng.choice(objs), answer[2]), rng),
        lambda: _event_answer((*rng.choice(objs), rng.choice(EVENTS)), rng),
        lambda: _event_answer((rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(EVENTS)), rng),
    ]
    positive = _event_answer(answer, rng)
    negatives = collect(proposals, k, lambda s: s.text != answer_text, [positive], rng, "world_vqa_video")
    return Example(query, positive, negatives, answer_text)


def video_caption_text(cap: VideoCaption) -> str:
    (c1, s1, k1), (c2, s2, k2) = cap
    return f"the {c1} {s1} {k1}, then the {c2} {s2} {k2}"


def video_caption_holds(clip: Clip, cap: VideoCaption) -> bool:
    sems = event_sems(clip)
    return any(a == cap[0] and b == cap[1] and ta < tb for a, ta in sems for b, tb in sems)


def video_caption_side(
    cap: VideoCaption, rng: random.Random, family: str = "positive_text", instruction: str = ""
) -> Side:
    (c1, s1, k1), (c2, s2, k2) = cap
    text = video_caption_text(cap)
    distract = [f"{c1} {s1} {rng.choice([e for e in EVENTS if e != k1])}", f"{c2} {s2} {k1}"]
    view = text_view(
        text,
        (f"{c1} {s1} {k1}", "then", f"{c2} {s2} {k2}"),
        distract,
        "The caption names two events and their order.",
        f"A matching clip shows the {c1} {s1} {k1} first and the {c2} {s2} {k2} later.",
        family,
    )
    return Side(text, instruction, None, view, {"caption": cap})


def clip_variants(rng: random.Random, clip: Clip, geo: Geometry) -> list[Callable[[], Clip]]:
    """Near-duplicate clips of the same scene (same shimmer) in which the caption may be false (callers check)."""
    e1, e2 = clip.ordered_events()
    n = len(clip.scene.objects)

    def with_events(a: Event, b: Event) -> Clip:
        return Clip(clip.scene, (a, b), clip.shimmer)

    return [
        lambda: with_events(replace(e1, index=e2.index), replace(e2, index=e1.index)),  # who does what swapped
        lambda: with_events(replace(e1, kind=e2.kind), replace(e2, kind=e1.kind)),  # which event first swapped
        lambda: with_events(replace(e1, kind=rng.choice(EVENTS)), e2),
        lambda: with_events(e1, replace(e2, kind=rng.choice(EVENTS))),
        lambda: (
            with_events(replace(e1, index=rng.randrange(n)), e2) if n > 2 else two_event_clip(rng, geo, clip.scene)
        ),
        lambda: two_event_clip(rng, geo, clip.scene),
    ]


def make_t2v(rng: random.Random, geo: Geometry, level: Level, k: int) -> Example:
    """V-RET text -> video: negatives are clips of the same scene with swapped or changed events."""
    scene = sample_video_scene(rng, geo, max(2, level.n_video_objects(rng, geo)))
    clip = two_event_clip(rng, geo, scene)
    cap = ((sems := event_sems(clip))[0][0], sems[1][0])
    query = video_caption_side(cap, rng, "text_to_video_retrieval", "Find a video that matches the caption.")
    proposals = [lambda v=v: video_side(v()) for v in clip_variants(rng, clip, geo)]
    positive = video_side(clip)
    negatives = collect(
        proposals,
        k,
        lambda s: s.media.events[0].index != s.media.events[1].index and not video_caption_holds(s.media, cap),
        [positive],
        rng,
        "world_t2v",
    )
    return Example(query, positive, negatives, cap)


def make_v2t(rng: random.Random, geo: Geometry, level: Level, k: int) -> Example:
    """V-RET video -> text: negatives are captions with the order, an event or an object changed."""
    scene = sample_video_scene(rng, geo, max(2, level.n_video_objects(rng, geo)))
    clip = two_event_clip(rng, geo, scene)
    (a, _), (b, _) = event_sems(clip)
    objs = [(o.colour, o.shape) for o in scene.objects]
    proposals = [
        lambda: video_caption_side((b, a), rng),
        lambda: video_caption_side(((a[0], a[1], b[2]), (b[0], b[1], a[2])), rng),
        lambda: video_caption_side(((a[0], a[1], rng.choice(EVENTS)), b), rng),
        lambda: video_caption_side((a, (*rng.choice(objs), b[2])), rng),
        lambda: video_caption_side(((rng.choice(list(COLOURS)), rng.choice(SHAPES), a[2]), b), rng),
    ]
    view = clip_view(clip, "video_sequence", "The task asks for a caption of the video.")
    query = Side("", "Find a caption that describes the video.", clip, view)
    positive = video_caption_side((a, b), rng)
    negatives = collect(
        proposals, k, lambda s: not video_caption_holds(clip, s.info["caption"]), [positive], rng, "world_v2t"
    )
    return Example(query, positive, negatives, (a, b))


def make_moment(rng: random.Random, geo: Geometry, level: Level, k: int) -> Example:
    """V-MRET: candidate clips of one scene, each with one event; the query names the moment to find."""
    scene = sample_video_scene(rng, geo, max(2, level.n_video_objects(rng, geo)))
    glow = shimmer(rng, geo)
    event = random_event(rng, rng.randrange(len(scene.objects)), 0, geo.num_frames)
    obj = scene.objects[event.index]
    sem: EventSem = (obj.colour, obj.shape, event.kind)
    others = [name(o) for o in scene.objects if o != obj] or [f"{rng.choice(list(COLOURS))} {obj.shape}"]
    view = text_view(
        f"the moment when the {name(obj)} {event.kind}",
        (name(obj), event.kind),
        [rng.choice(others), rng.choice([e for e in EVENTS if e != event.kind])],
        "The query names one object and one event.",
        f"The matching clip shows the {name(obj)} as it {event.kind}.",
        "text_to_video_retrieval",
    )
    query = Side(
        f"the moment when the {name(obj)} {event.kind}", "Find the clip that shows the described moment.", None, view
    )

    def other_moment() -> Side:
        other = random_event(rng, rng.randrange(len(scene.objects)), 0, geo.num_frames)
        return video_side(Clip(scene, (other,), glow))

    positive = video_side(Clip(scene, (event,), glow))
    negatives = collect([other_moment], k, lambda s: event_sems(s.media)[0][0] != sem, [positive], rng, "world_moment")
    return Example(query, positive, negatives, sem)


# ----------------------------------------------------------------------------------------------------------------
# Document pages
# ----------------------------------------------------------------------------------------------------------------

DocQuery = tuple[str, str, int]  # topic, table item, value


def random_page(rng: random.Random, topic: str | None = None, entry: tuple[str, int] | None = None) -> Page:
    items = rng.sample(TABLE_ITEMS, len(PAGE_ENTRY_BOXES))
    table = [(item, rng.randint(10, 99)) for item in items]
    if entry is not None:
        slot = items.index(entry[0]) if entry[0] in items else rng.randrange(len(table))
        table[slot] = entry
    return Page(topic or rng.choice(TOPICS), rng.choice(SEASONS), rng.choice(SIDES), tuple(table))


def doc_grade(query: DocQuery, side: Side) -> int:
    """Graded relevance: 2 = the heading topic matches and the table lists the entry; 1 = only the topic matches."""
    page = side.media
    if not isinstance(page, Page) or page.topic != query[0]:
        return 0
    return 2 if page.lists(query[1], query[2]) else 1


def page_side(page: Page) -> Side:
    entries = ", ".join(f"{item} {value}" for item, value in page.table)
    view = TeacherView(
        family="positive_image",
        steps=(f"The page is headed {page.topic.upper()}.", f"Its table lists {entries}."),
        rethink=f"The heading and the table identify the page; the text says {page.lines[0]} {page.lines[1]}.",
        answer=f"{article(page.topic).capitalize()} {page.topic} page, {page.season} count; it lists {entries}.",
        boxes=(PAGE_HEADING_BOX, PAGE_TABLE_BOX),
        distractor_boxes=(PAGE_TEXT_BOX,),
        box_step=250,
    )
    return Side("", INSTRUCTIONS["page"], page, view)


def make_doc(rng: random.Random, geo: Geometry, level: Level, k: int) -> Example:
    """VisDoc: a heading topic and one table entry identify a page; same-topic pages are partly relevant."""
    page = random_page(rng)
    item, value = rng.choice(page.table)
    query_sem: DocQuery = (page.topic, item, value)
    text = f"the {page.topic} page that lists {item} {value}"
    other_value = rng.choice([v for v in range(10, 100) if v != value])
    view = text_view(
        text,
        (page.topic, f"{item} {value}"),
        [rng.choice([t for t in TOPICS if t != page.topic]), f"{item} {other_value}"],
        "The query names a page topic and one table entry.",
        f"The matching page is headed {page.topic.upper()} and its table lists {item} {value}.",
        "text_to_image_retrieval",
    )
    query = Side(text, "Find the document page that matches the query.", None, view)
    proposals = [
        lambda: page_side(random_page(rng, page.topic)),
        lambda: page_side(
            replace(page, table=tuple((i, rng.randint(10, 99)) if i == item else (i, v) for i, v in page.table))
        ),
        lambda: page_side(random_page(rng, rng.choice([t for t in TOPICS if t != page.topic]), (item, value))),
        lambda: page_side(random_page(rng)),
    ]
    positive = page_side(page)
    negatives = collect(proposals, k, lambda s: doc_grade(query_sem, s) < 2, [positive], rng, "world_doc")
    return Example(query, positive, negatives, query_sem)


# ----------------------------------------------------------------------------------------------------------------
# The task table
# ----------------------------------------------------------------------------------------------------------------


def _exact(semantics: Hashable, side: Side) -> int:
    return int(side.text == semantics)


def _t2v_grade(cap: Hashable, side: Side) -> int:
    return int(isinstance(side.media, Clip) and video_caption_holds(side.media, cap))  # type: ignore[arg-type]


@dataclass(frozen=True)
class TaskSpec:
    """One dataset of the world: its generator and how its evaluation task is scored.

    Attributes:
        name: dataset name (training pairs) and evaluation task name.
        meta_task: the MMEB-V2 meta-task it mirrors (I-CLS, I-QA, I-RET, I-GD, V-CLS, V-QA, V-RET, V-MRET, VisDoc).
        modality: MMEB-V2 modality group: image, video or visdoc.
        eval_type: ``local`` (a candidate list per query) or ``global`` (one corpus with qrels).
        make: the generator ``(rng, geometry, level, k_negatives) -> Example``.
        metric: main metric (``hit@1``; ``ndcg_linear@5`` for visdoc).
        grade: global tasks: graded relevance of a corpus side to a query's semantics.
        corpus: global tasks: sides that are always in the corpus (e.g. every class label).
        siblings: global tasks: hard negatives per query added to the corpus.
    """

    name: str
    meta_task: str
    modality: Literal["image", "video", "visdoc"]
    eval_type: Literal["local", "global"]
    make: Callable[[random.Random, Geometry, Level, int], Example]
    description: str
    metric: str = "hit@1"
    grade: Callable[[Hashable, Side], int] | None = None
    corpus: Callable[[random.Random], list[Side]] | None = None
    siblings: int = 0


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("world_cls", "I-CLS", "image", "local", make_cls,
                 "image -> colour and shape of the patterned object"),
        TaskSpec("world_vqa", "I-QA", "image", "local", make_vqa, "image + question -> answer phrase"),
        TaskSpec("world_t2i", "I-RET", "image", "local", make_t2i, "caption -> image (near-duplicate negatives)"),
        TaskSpec("world_i2t", "I-RET", "image", "local", make_i2t, "image -> caption"),
        TaskSpec("world_grounding", "I-GD", "image", "local", make_grounding, "image + expression -> object crop"),
        TaskSpec("world_video_cls", "V-CLS", "video", "global", make_video_cls, "video -> event class (all labels)",
                 grade=_exact, corpus=lambda rng: [video_label_side(lab, rng) for lab in video_labels()]),
        TaskSpec("world_vqa_video", "V-QA", "video", "local", make_vqa_video, "video + question -> answer phrase"),
        TaskSpec("world_t2v", "V-RET", "video", "global", make_t2v, "caption -> video (all videos)", grade=_t2v_grade,
                 siblings=2),
        TaskSpec("world_v2t", "V-RET", "video", "local", make_v2t, "video -> caption"),
        TaskSpec("world_moment", "V-MRET", "video", "local", make_moment, "moment text -> clip of the same scene"),
        TaskSpec("world_doc", "VisDoc", "visdoc", "global", make_doc, "query -> document page (graded qrels)",  # type: ignore[arg-type]
                 metric="ndcg_linear@5", grade=doc_grade, siblings=3),
    )
}  # fmt: skip
