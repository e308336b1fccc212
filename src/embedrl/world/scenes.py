"""Scenes of the synthetic world and their pixels: object images, short video clips and document pages.

Everything here is a pure function of a frozen spec, so the same spec always gives the same pixels:

- :class:`Scene`: objects in the cells of a ``grid x grid`` layout. Each object (shape, colour, size, pattern)
  fits inside its cell, so its ground-truth box is the cell: multiples of ``1000 / grid`` on the 0-1000 scale.
  A ``small`` object covers under half the cell; a ``striped`` or ``dotted`` pattern is a 1-2 pixel detail that
  a crop shows far more clearly than the full image.
- :class:`Crop`: one object alone, its cell enlarged ``CROP_SCALE`` times (grounding candidates).
- :class:`Clip`: a video of ``num_frames`` frames over a small scene; each :class:`Event` changes one object in
  only 1-2 frames, the other frames are near-duplicates (a faint per-frame brightness shimmer).
- :class:`Page`: a document page with a large heading, two lines of text and a 2 x 2 table, laid out on a 4 x 4
  grid so its regions have boxes on multiples of 250. Text uses PIL's built-in bitmap font (no font files).

Rendering returns ``uint8`` arrays ``[H, W, 3]``; :func:`render_media` dispatches on the spec type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 on the 0-1000 scale

# ----------------------------------------------------------------------------------------------------------------
# Vocabulary: small and regular, so a 4k BPE tokenizer keeps every word whole
# ----------------------------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (238, 200, 30),
    "purple": (148, 70, 189),
    "orange": (245, 127, 14),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted")
EVENTS: tuple[str, ...] = ("flashes", "jumps", "vanishes", "grows")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")

BACKGROUND = (205, 205, 200)
PATTERN_RGB = (25, 25, 25)
FLASH_RGB = (255, 255, 255)
CROP_SCALE = 2
PAGE_ROWS = 4  # pages use a fixed 4 x 4 layout

# Document vocabulary: a heading topic, two text lines and table entries identify a page.
TOPICS: tuple[str, ...] = ("river", "forest", "harbor", "garden", "market", "bridge", "valley", "island")
SEASONS: tuple[str, ...] = ("spring", "summer", "autumn", "winter")
SIDES: tuple[str, ...] = ("north", "south", "east", "west")
TABLE_ITEMS: tuple[str, ...] = ("fish", "birds", "trees", "boats", "stones", "seeds", "lamps", "carts")


# ----------------------------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    """One object: its attributes, its cell (row, col) and a small pixel offset inside the cell."""

    shape: str
    colour: str
    size: str = "large"
    pattern: str = "plain"
    row: int = 0
    col: int = 0
    dx: int = 0
    dy: int = 0

    @property
    def attrs(self) -> tuple[str, str, str, str]:
        """(size, colour, pattern, shape): unique within a scene, so a full phrase refers to one object."""
        return (self.size, self.colour, self.pattern, self.shape)

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)

    def phrase(self, with_size: bool = True) -> str:
        """``small red striped triangle``; a plain pattern is not spelled out."""
        words = [self.size] if with_size else []
        words.append(self.colour)
        if self.pattern != "plain":
            words.append(self.pattern)
        words.append(self.shape)
        return " ".join(words)

    def box(self, grid: int) -> Box:
        """The object's cell on the 0-1000 scale."""
        return cell_box(self.row, self.col, grid)


def cell_box(row: int, col: int, grid: int) -> Box:
    step = 1000 / grid
    return (round(col * step), round(row * step), round((col + 1) * step), round((row + 1) * step))


def phrase_of(attrs: tuple[str, str, str, str]) -> str:
    """The phrase of an attribute tuple (size, colour, pattern, shape)."""
    size, colour, pattern, shape = attrs
    return Obj(shape=shape, colour=colour, size=size, pattern=pattern).phrase()


@dataclass(frozen=True)
class Scene:
    """Objects on a ``grid x grid`` layout, at most one per cell, with unique attribute tuples."""

    objects: tuple[Obj, ...]
    grid: int

    def __post_init__(self) -> None:
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell: {cells}")
        attrs = [o.attrs for o in self.objects]
        if len(set(attrs)) != len(attrs):
            raise ValueError(f"two objects look the same: {attrs}")
        if any(not (0 <= r < self.grid and 0 <= c < self.grid) for r, c in cells):
            raise ValueError(f"a cell lies outside the {self.grid} x {self.grid} grid: {cells}")

    def at(self, row: int, col: int) -> Obj | None:
        for o in self.objects:
            if o.cell == (row, col):
                return o
        return None

    def find(self, attrs: tuple[str, str, str, str]) -> Obj | None:
        for o in self.objects:
            if o.attrs == attrs:
                return o
        return None

    def free_cells(self) -> list[tuple[int, int]]:
        used = {o.cell for o in self.objects}
        return [(r, c) for r in range(self.grid) for c in range(self.grid) if (r, c) not in used]

    def replace_object(self, old: Obj, new: Obj) -> Scene:
        return Scene(tuple(new if o == old else o for o in self.objects), self.grid)


@dataclass(frozen=True)
class Crop:
    """One object alone in its cell, enlarged ``CROP_SCALE`` times (position fields are ignored)."""

    obj: Obj

    @staticmethod
    def of(obj: Obj) -> Crop:
        return Crop(replace(obj, row=0, col=0))


@dataclass(frozen=True)
class Event:
    """Object ``index`` of a clip ``kind``-s (one of EVENTS) in frames ``start .. start + length - 1``."""

    index: int
    kind: str
    start: int
    length: int = 1

    @property
    def frames(self) -> tuple[int, ...]:
        return tuple(range(self.start, self.start + self.length))


@dataclass(frozen=True)
class Clip:
    """A video: a small static scene, events that last 1-2 frames, and a per-frame brightness shimmer."""

    scene: Scene
    events: tuple[Event, ...]
    shimmer: tuple[int, ...]  # one value per frame, added to the background

    @property
    def num_frames(self) -> int:
        return len(self.shimmer)

    def decisive_frames(self) -> tuple[int, ...]:
        """0-based frames in which some event happens, sorted."""
        return tuple(sorted({f for e in self.events for f in e.frames}))

    def ordered_events(self) -> tuple[Event, ...]:
        return tuple(sorted(self.events, key=lambda e: e.start))


@dataclass(frozen=True)
class Page:
    """A document page: heading topic, two text lines, and a 2 x 2 table of (item, value) entries."""

    topic: str
    season: str
    side: str
    table: tuple[tuple[str, int], ...]

    @property
    def lines(self) -> tuple[str, str]:
        return (f"{self.season} count", f"from the {self.side}")

    def lists(self, item: str, value: int) -> bool:
        return (item, value) in self.table


MediaSpec = Scene | Crop | Clip | Page

# Page regions on the 0-1000 scale (4 x 4 layout): heading row, text row, and the four table entries.
PAGE_HEADING_BOX: Box = (0, 0, 1000, 250)
PAGE_TEXT_BOX: Box = (0, 250, 1000, 500)
PAGE_TABLE_BOX: Box = (0, 500, 1000, 1000)
PAGE_ENTRY_BOXES: tuple[Box, ...] = (
    (0, 500, 500, 750),
    (500, 500, 1000, 750),
    (0, 750, 500, 1000),
    (500, 750, 1000, 1000),
)


# ----------------------------------------------------------------------------------------------------------------
# Object drawing
# ----------------------------------------------------------------------------------------------------------------


def object_side(size: str, cell: int) -> int:
    """Pixel side of an object's square footprint: large ~3/4 of the cell, small under half."""
    return cell - 2 * (cell // 8) if size == "large" else max(6, (cell * 7) // 16)


def max_offset(size: str, cell: int) -> int:
    """Largest |dx|, |dy| that keeps the object inside its cell with a 1-pixel margin."""
    return max(0, (cell - object_side(size, cell)) // 2 - 1)


@lru_cache(maxsize=256)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean ``[side, side]`` footprint of a shape."""
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    s = side - 1
    if shape == "circle":
        draw.ellipse((0, 0, s, s), fill=255)
    elif shape == "square":
        draw.rectangle((1, 1, s - 1, s - 1), fill=255)
    elif shape == "triangle":
        draw.polygon([(s / 2, 0), (s, s), (0, s)], fill=255)
    elif shape == "diamond":
        draw.polygon([(s / 2, 0), (s, s / 2), (s / 2, s), (0, s / 2)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")
    mask = np.asarray(img) > 127
    mask.setflags(write=False)
    return mask


@lru_cache(maxsize=64)
def pattern_mask(pattern: str, side: int) -> np.ndarray:
    """Boolean ``[side, side]`` detail pixels: thin stripes every 4 rows, or 2 x 2 dots every 5 pixels."""
    y, x = np.mgrid[0:side, 0:side]
    if pattern == "plain":
        mask = np.zeros((side, side), dtype=bool)
    elif pattern == "striped":
        mask = (y % 4) == 2
    elif pattern == "dotted":
        mask = np.isin(y % 5, (2, 3)) & np.isin(x % 5, (2, 3))
    else:
        raise ValueError(f"unknown pattern {pattern!r}; use one of {PATTERNS}")
    mask.setflags(write=False)
    return mask


def paint_object(
    canvas: np.ndarray,
    obj: Obj,
    top: int,
    left: int,
    cell: int,
    *,
    size: str | None = None,
    rgb: tuple[int, int, int] | None = None,
    lift: int = 0,
) -> None:
    """Paint ``obj`` into the cell whose top-left pixel is (top, left); ``lift`` moves it up (a jump)."""
    side = object_side(size or obj.size, cell)
    offset = (cell - side) // 2
    y0, x0 = top + offset + obj.dy - lift, left + offset + obj.dx
    mask = shape_mask(obj.shape, side)
    detail = pattern_mask(obj.pattern, side) & mask
    h, w = canvas.shape[:2]
    ys, xs = slice(max(y0, 0), min(y0 + side, h)), slice(max(x0, 0), min(x0 + side, w))
    my, mx = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
    region = canvas[ys, xs]
    region[mask[my, mx]] = rgb or COLOURS[obj.colour]
    region[detail[my, mx]] = PATTERN_RGB


def blank(height: int, width: int, shimmer: int = 0) -> np.ndarray:
    rgb = np.clip(np.array(BACKGROUND, dtype=np.int16) + shimmer, 0, 255).astype(np.uint8)
    return np.broadcast_to(rgb, (height, width, 3)).copy()


def render_scene(scene: Scene, cell: int) -> np.ndarray:
    """The scene as a ``[grid*cell, grid*cell, 3]`` image."""
    side = scene.grid * cell
    canvas = blank(side, side)
    for obj in scene.objects:
        paint_object(canvas, obj, obj.row * cell, obj.col * cell, cell)
    return canvas


def render_crop(crop: Crop, cell: int) -> np.ndarray:
    """The object alone in its cell, enlarged ``CROP_SCALE`` times (nearest neighbour)."""
    canvas = blank(cell, cell)
    paint_object(canvas, crop.obj, 0, 0, cell)
    return canvas.repeat(CROP_SCALE, axis=0).repeat(CROP_SCALE, axis=1)


def crop_box(crop: Crop, cell: int) -> Box:
    """Tight 0-1000 box of the object's pixels in its crop image."""
    side = object_side(crop.obj.size, cell)
    mask = shape_mask(crop.obj.shape, side)
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    offset = (cell - side) // 2
    y1, y2 = offset + crop.obj.dy + rows[0], offset + crop.obj.dy + rows[-1] + 1
    x1, x2 = offset + crop.obj.dx + cols[0], offset + crop.obj.dx + cols[-1] + 1
    return (
        math.floor(x1 * 1000 / cell),
        math.floor(y1 * 1000 / cell),
        math.ceil(x2 * 1000 / cell),
        math.ceil(y2 * 1000 / cell),
    )


def render_clip(clip: Clip, cell: int) -> list[np.ndarray]:
    """The clip's frames. In an event frame the object flashes white, jumps up, vanishes or grows large."""
    side = clip.scene.grid * cell
    frames = []
    for f, shimmer in enumerate(clip.shimmer):
        canvas = blank(side, side, shimmer)
        active = {e.index: e.kind for e in clip.events if f in e.frames}
        for i, obj in enumerate(clip.scene.objects):
            kind = active.get(i)
            if kind == "vanishes":
                continue
            paint_object(
                canvas,
                obj,
                obj.row * cell,
                obj.col * cell,
                cell,
                size="large" if kind == "grows" else None,
                rgb=FLASH_RGB if kind == "flashes" else None,
                lift=cell // 4 if kind == "jumps" else 0,
            )
        frames.append(canvas)
    return frames


# ----------------------------------------------------------------------------------------------------------------
# Document pages
# ----------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def default_font() -> ImageFont.ImageFont:
    """PIL's built-in bitmap font (6 px advance, 11 px line): identical pixels on every machine."""
    return ImageFont.load_default_imagefont()


@lru_cache(maxsize=512)
def text_pixels(text: str, scale: int = 1) -> np.ndarray:
    """Boolean ink mask of ``text`` in the bitmap font, enlarged ``scale`` times (nearest neighbour)."""
    font = default_font()
    width = max(1, int(font.getlength(text)))
    img = Image.new("L", (width, 11), 0)
    ImageDraw.Draw(img).text((0, 0), text, font=font, fill=255)
    ink = np.asarray(img) > 127
    ink = ink.repeat(scale, axis=0).repeat(scale, axis=1)
    ink.setflags(write=False)
    return ink


def _stamp(canvas: np.ndarray, ink: np.ndarray, top: int, left: int) -> None:
    h = min(ink.shape[0], canvas.shape[0] - top)
    w = min(ink.shape[1], canvas.shape[1] - left)
    canvas[top : top + h, left : left + w][ink[:h, :w]] = 0


def render_page(page: Page, size: int) -> np.ndarray:
    """A white ``[size, size, 3]`` page: heading (2x font) in row 0, two text lines in row 1, table in rows 2-3."""
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    row = size // PAGE_ROWS
    heading = text_pixels(page.topic.upper(), 2)
    _stamp(canvas, heading, (row - heading.shape[0]) // 2, 4)
    for i, line in enumerate(page.lines):
        _stamp(canvas, text_pixels(line), row + 3 + i * 13, 4)
    canvas[2 * row, :] = 150  # table rules
    canvas[3 * row, :] = 150
    canvas[2 * row :, size // 2] = 150
    for (item, value), (x1, y1, _, _) in zip(page.table, PAGE_ENTRY_BOXES, strict=True):
        top, left = y1 * size // 1000, x1 * size // 1000
        _stamp(canvas, text_pixels(f"{item} {value}"), top + (row - 11) // 2, left + 4)
    return canvas


def page_region_has_ink(image: np.ndarray, box: Box) -> bool:
    """Whether the 0-1000 ``box`` of a page image holds any dark pixel (used by tests)."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = box
    region = image[y1 * h // 1000 : y2 * h // 1000, x1 * w // 1000 : x2 * w // 1000]
    return bool((region < 100).any())


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------


def render_media(spec: MediaSpec, cell: int, page_size: int) -> np.ndarray | list[np.ndarray]:
    """Pixels of any media spec: one image, or the frame list of a clip."""
    if isinstance(spec, Scene):
        return render_scene(spec, cell)
    if isinstance(spec, Crop):
        return render_crop(spec, cell)
    if isinstance(spec, Clip):
        return render_clip(spec, cell)
    if isinstance(spec, Page):
        return render_page(spec, page_size)
    raise TypeError(f"not a media spec: {type(spec).__name__}")
