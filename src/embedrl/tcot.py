"""T-CoT: the Reasoner's traceable chain of thought (docs/method.md §2).

    <thinking>short steps ... {"bbox_2d": [x1, y1, x2, y2]}</thinking><rethink>...</rethink><answer>...</answer>

:class:`TCoT` is the structured form; :func:`render_tcot` writes the canonical text; :func:`parse_tcot` reads any
string back, repairing what it can and naming every repair in ``TCoT.problems``; :func:`format_ok` is the strict
check behind the format reward. :func:`split_tcot` and :func:`answer_segment` cut the raw text for the Embedder,
which always sees the text as generated: the parser never rewrites it.

Which cue wins (docs/method.md §2.4 and issue 3):

- With ``cue_key`` (the prompt family's cue), only that key is read; other cue keys are ignored and recorded.
- Without it, the first cue key (in text order) that yields a valid entry wins; if none does, the first key found.
- Values of the winning key are **merged in order** over every cue object and every duplicate key (docs/method.md:
  union, not "last key wins" and not "first object wins"); repeated boxes and frames keep their first occurrence.

Guarantees on any string: parsing takes time linear in its length (adversarial inputs hit caps, recorded); every
dropped or repaired object is recorded; no structured field holds a grammar tag (a tag inside the prose, a segment or
a keyword is defused: its ``<`` becomes ``‹``, recorded); and ``parse_tcot(render_tcot(t))`` gives back the fields
``thinking``, ``cue_key``, ``keywords``, ``boxes``, ``frames``, ``rethink`` and ``answer`` of ``t = parse_tcot(x)``
(with the same ``cue_key`` and ``n_frames``, ``frame_base=1``).
"""

from __future__ import annotations

import bisect
import json
import math
import re
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from embedrl.prompts import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    CUE_BOXES,
    CUE_FRAMES,
    CUE_KEYS,
    CUE_KEYWORDS,
    RETHINK_CLOSE,
    RETHINK_OPEN,
    THINKING_CLOSE,
    THINKING_OPEN,
)

Box = list[int]  # [x1, y1, x2, y2] on the 0-1000 scale, x1 < x2, y1 < y2
MAX_PROBLEMS = 64  # problems listed per parse; a last entry counts the rest


@dataclass
class TCoT:
    """A T-CoT in structured form.

    Attributes:
        thinking: the reasoning prose of ``<thinking>`` without the cue JSON object (without ``cue_key``: without
            any cue object).
        cue_key: which cue the thinking carries: ``text_keywords``, ``bbox_2d``, ``key_frames`` or None.
        keywords: the ``text_keywords`` cue.
        boxes: the ``bbox_2d`` cue, ``[x1, y1, x2, y2]`` ints on the 0-1000 scale.
        frames: the ``key_frames`` cue as **0-based** frame indices (the text form is 1-based).
        rethink: the ``<rethink>`` text.
        answer: the ``<answer>`` text.
        problems: short strings naming every repair or drop the parser made (empty for clean text).
        fallback: no ``<thinking>…</thinking>`` span was found: the whole text is plain text, without evidence.
        has_all_tags: all three segments were found, each opened and closed (tag variants accepted).
        tags_in_order: thinking, rethink and answer appear in that order.
    """

    thinking: str = ""
    cue_key: str | None = None
    keywords: list[str] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    rethink: str = ""
    answer: str = ""
    problems: list[str] = field(default_factory=list)
    fallback: bool = False
    has_all_tags: bool = True
    tags_in_order: bool = True

    @property
    def cue_values(self) -> list:
        """The values of ``cue_key`` (empty when there is no cue)."""
        return {CUE_KEYWORDS: self.keywords, CUE_BOXES: self.boxes, CUE_FRAMES: self.frames}.get(self.cue_key, [])

    @property
    def cue_present(self) -> bool:
        """The cue has at least one valid entry after normalisation."""
        return bool(self.cue_values)


def cue_json(tcot: TCoT) -> str:
    """The cue object as canonical JSON text, or "" when ``cue_key`` is None."""
    if tcot.cue_key is None:
        return ""
    if tcot.cue_key == CUE_KEYWORDS:
        value: object = list(tcot.keywords)
    elif tcot.cue_key == CUE_BOXES:
        value = list(tcot.boxes[0]) if len(tcot.boxes) == 1 else [list(b) for b in tcot.boxes]
    elif tcot.cue_key == CUE_FRAMES:
        value = [f + 1 for f in tcot.frames]  # 1-based in text
    else:
        raise ValueError(f"unknown cue_key {tcot.cue_key!r}; use one of {CUE_KEYWORDS}, {CUE_BOXES}, {CUE_FRAMES}")
    return json.dumps({tcot.cue_key: value}, ensure_ascii=False)


def render_tcot(tcot: TCoT) -> str:
    """The canonical T-CoT text: thinking prose, a space, the cue JSON, then rethink and answer."""
    cue = cue_json(tcot)
    thinking = f"{tcot.thinking} {cue}" if tcot.thinking and cue else (tcot.thinking or cue)
    return (
        f"{THINKING_OPEN}{thinking}{THINKING_CLOSE}"
        f"{RETHINK_OPEN}{tcot.rethink}{RETHINK_CLOSE}"
        f"{ANSWER_OPEN}{tcot.answer}{ANSWER_CLOSE}"
    )


# ----------------------------------------------------------------------------------------------------------------
# Segments: where the tags are
# ----------------------------------------------------------------------------------------------------------------

# Tolerant tag: any case, spaces inside the angle brackets ("< /Thinking >"). The strict form is TCOT_TAGS.
# "<" + whitespace is read in linear time: the slash and the whitespace after it are one optional group.
_TAG_RE = re.compile(r"<\s*(?:(/)\s*)?(thinking|rethink|answer)\s*>", re.IGNORECASE)
_CANONICAL = {
    ("thinking", False): THINKING_OPEN,
    ("thinking", True): THINKING_CLOSE,
    ("rethink", False): RETHINK_OPEN,
    ("rethink", True): RETHINK_CLOSE,
    ("answer", False): ANSWER_OPEN,
    ("answer", True): ANSWER_CLOSE,
}


class _Tag(NamedTuple):
    start: int
    end: int
    name: str  # lower case
    closing: bool
    exact: bool


class _Span(NamedTuple):
    start: int  # start of the opening tag
    inner_start: int
    inner_end: int
    end: int  # end of the closing tag (or of the content when unclosed)
    closed: bool


class _Layout(NamedTuple):
    tags: list[_Tag]
    thinking: _Span | None
    rethink: _Span | None
    answer: _Span | None


# A grammar tag inside a segment's text, a keyword or the thinking prose is defused: its "<" becomes this mark, so
# the structured fields never hold a tag and render_tcot writes back the same segments (recorded in problems).
DEFUSED_TAG_MARK = "\u2039"  # single left-pointing angle quotation mark


def _defuse(text: str, where: str, problems: list[str]) -> str:
    """``text`` with every grammar tag's ``<`` replaced by :data:`DEFUSED_TAG_MARK` (each recorded)."""
    if "<" not in text:
        return text

    def mark(m: re.Match[str]) -> str:
        problems.append(f"tag {_short(m.group(0))} inside {where} defused")
        return DEFUSED_TAG_MARK + m.group(0)[1:]

    return _TAG_RE.sub(mark, text)


def _find_tags(text: str) -> list[_Tag]:
    tags = []
    for m in _TAG_RE.finditer(text):
        name, closing = m.group(2).lower(), bool(m.group(1))
        tags.append(_Tag(m.start(), m.end(), name, closing, m.group(0) == _CANONICAL[name, closing]))
    return tags


def _segment(tags: list[_Tag], name: str, after: int, text_len: int) -> _Span | None:
    """First ``name`` span opening at or after ``after``. Unclosed: its content runs to the next tag or the end."""
    open_tag = next((t for t in tags if t.name == name and not t.closing and t.start >= after), None)
    if open_tag is None:
        return None
    close = next((t for t in tags if t.name == name and t.closing and t.start >= open_tag.end), None)
    if close is not None:
        return _Span(open_tag.start, open_tag.end, close.start, close.end, True)
    nxt = next((t.start for t in tags if t.start >= open_tag.end), text_len)
    return _Span(open_tag.start, open_tag.end, nxt, nxt, False)


def _layout(text: str) -> _Layout:
    tags = _find_tags(text)
    thinking = _segment(tags, "thinking", 0, len(text))
    if thinking is not None and not thinking.closed:
        thinking = None  # an unclosed <thinking> is no span: plain-text fallback
    after = thinking.end if thinking is not None else 0
    rethink, answer = (_segment(tags, name, after, len(text)) for name in ("rethink", "answer"))
    return _Layout(tags, thinking, rethink, answer)


def split_tcot(text: str) -> tuple[str, str] | None:
    """The raw T-CoT cut just after the first ``</thinking>``: (thinking part, rest), or None without a thinking span.

    The text is only stripped of outer whitespace; both parts are otherwise verbatim (the Embedder's view, §2.5).

    >>> split_tcot('<thinking>a {"text_keywords": ["a"]}</thinking><rethink>b</rethink><answer>c</answer>')
    ('<thinking>a {"text_keywords": ["a"]}</thinking>', '<rethink>b</rethink><answer>c</answer>')
    """
    text = text.strip()
    span = _layout(text).thinking
    return None if span is None else (text[: span.end], text[span.end :])


def answer_segment(text: str) -> str | None:
    """The raw ``<answer>…</answer>`` segment (after the thinking span when there is one), or None."""
    text = text.strip()
    span = _layout(text).answer
    return None if span is None else text[span.start : span.end]


# ----------------------------------------------------------------------------------------------------------------
# Cue objects: brace scan, strict then lenient JSON, key-specific scrape
# ----------------------------------------------------------------------------------------------------------------
#
# Every step is linear in the text: one brace scan records each "{" with its matching "}" (or none); objects are
# tried in text order, skipping what a read object covers; each text position is read by at most one balanced
# object, and unclosed objects (which run to the end of the text) are tried at most _MAX_OPEN_TRIES times within a
# budget of characters. The scrape reads each cue key's value only up to the next cue key.


class _Pairs(list):
    """An object's (key, value) pairs in order, duplicate keys kept (so they can be merged, not overwritten)."""


_FAIL = object()
_MAX_DEPTH = 32
_MAX_OPEN_TRIES = 32  # unclosed objects read leniently per text; more are recorded and skipped
_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_INT_RE = re.compile(r"[-+]?\d{1,30}")
# A run of "number," list entries, read at once (the same numbers the entry-by-entry loop reads, faster).
_NUMBER_RUN_RE = re.compile(r"(?:\s*" + _NUMBER_RE.pattern + r"\s*,)+")
_BARE_KEY_RE = re.compile(r"[A-Za-z_][\w-]*")
_WS_RE = re.compile(r"\s*")
_STRING_STOP = {'"': re.compile(r'["\\]'), "'": re.compile(r"['\\]")}
_SCALAR_WORDS = {"true": True, "false": False, "null": None}
_DECODER = json.JSONDecoder(object_pairs_hook=_Pairs)


class _Run(list):
    """Several list entries read at once (flattened into their list)."""


def _literal(digits: str) -> int | float:
    return int(digits) if _INT_RE.fullmatch(digits) else float(digits)


class _Lenient:
    """Recursive-descent reader for JSON-like text: single quotes, bare keys, stray or trailing commas, and
    brackets left open at the end are accepted. Returns ``_FAIL`` instead of raising.

    Reads ``text[pos:end]`` only. ``nested_objects=False`` refuses an object inside the one being read (an unclosed
    object then never swallows a complete one after it). ``far`` is the furthest position examined (the cost)."""

    def __init__(self, text: str, pos: int = 0, end: int | None = None, *, nested_objects: bool = True) -> None:
        self.s, self.i = text, pos
        self.end = len(text) if end is None else end
        self.nested_objects = nested_objects
        self.far = pos

    def _ws(self) -> None:
        self.i = _WS_RE.match(self.s, self.i, self.end).end()  # type: ignore[union-attr]

    def value(self, depth: int = 0) -> object:
        self._ws()
        if self.i >= self.end or depth > _MAX_DEPTH:
            return _FAIL
        c = self.s[self.i]
        if c == "{":
            return self._object(depth + 1) if depth == 0 or self.nested_objects else _FAIL
        if c == "[":
            return self._list(depth + 1)
        if c in "\"'":
            return self._string()
        m = _NUMBER_RE.match(self.s, self.i, self.end)
        if m:
            self.i = m.end()
            return _literal(m.group(0))
        m = _BARE_KEY_RE.match(self.s, self.i, self.end)
        if m and m.group(0).lower() in _SCALAR_WORDS:
            self.i = m.end()
            return _SCALAR_WORDS[m.group(0).lower()]
        return _FAIL

    def _string(self) -> object:
        quote, start = self.s[self.i], self.i + 1
        stop, j = _STRING_STOP[quote], start
        while True:
            m = stop.search(self.s, j, self.end)
            if m is None:
                self.far = max(self.far, self.end)
                return _FAIL
            j = m.start()
            if self.s[j] == quote:
                break
            j += 2  # a backslash escapes the next character
        self.i = j + 1
        self.far = max(self.far, self.i)
        raw = self.s[start:j]
        try:
            return json.loads(f'"{raw}"')
        except ValueError:
            return raw

    def _entries(self, close: str, entry: Callable[[], object], left_open: str = "") -> object:
        """The entries of the container opening at ``self.i``, up to ``close``, the end of the text or a character
        of ``left_open`` (a container left open: closed there); stray commas are skipped. ``_FAIL`` when an entry
        fails."""
        self.i += 1
        entries: list = []
        while True:
            self._ws()
            if self.i >= self.end or self.s[self.i] in left_open:
                return entries
            c = self.s[self.i]
            if c == close:
                self.i += 1
                return entries
            if c == ",":
                self.i += 1
                continue
            v = entry()
            if v is _FAIL:
                return _FAIL
            entries.append(v)

    def _list(self, depth: int) -> object:
        def entry() -> object:
            run = _NUMBER_RUN_RE.match(self.s, self.i, self.end) if depth <= _MAX_DEPTH else None
            if run is None:
                return self.value(depth)
            self.i = run.end()
            return _Run(_literal(x) for x in _NUMBER_RE.findall(run.group(0)))

        entries = self._entries("]", entry, left_open="}")
        if entries is _FAIL or not any(isinstance(e, _Run) for e in entries):  # type: ignore[union-attr]
            return entries
        flat: list = []
        for e in entries:  # type: ignore[union-attr]
            flat.extend(e) if isinstance(e, _Run) else flat.append(e)
        return flat

    def _object(self, depth: int) -> object:
        pairs = self._entries("}", lambda: self._pair(depth))
        return _FAIL if pairs is _FAIL else _Pairs(pairs)  # type: ignore[arg-type]

    def _pair(self, depth: int) -> object:
        """``(key, value)`` of an object entry: a quoted or bare key, ``:``, a value."""
        if self.s[self.i] in "\"'":
            key = self._string()
        else:
            m = _BARE_KEY_RE.match(self.s, self.i, self.end)
            if not m:
                return _FAIL
            key, self.i = m.group(0), m.end()
        self._ws()
        if key is _FAIL or self.i >= self.end or self.s[self.i] != ":":
            return _FAIL
        self.i += 1
        v = self.value(depth)
        return _FAIL if v is _FAIL else (key, v)


# Brace scan: double-quoted strings (with backslash escapes) count only inside an object, as in JSON.
_BRACE_SCAN_RE = re.compile(r'[{}"\\]')
# An unclosed object can only be read when a key (or its end) follows its "{".
_OPEN_OBJECT_RE = re.compile(r"\{\s*(?:[\"'A-Za-z_}]|\Z)")


def _brace_nodes(text: str) -> tuple[array, array]:
    """Start of every ``{`` outside strings, in order, and the end just past its matching ``}`` (-1: unclosed)."""
    starts, ends, stack = array("q"), array("q"), []
    in_str, skip = False, -1
    for m in _BRACE_SCAN_RE.finditer(text):
        p = m.start()
        if p == skip:
            continue
        c = text[p]
        if in_str:
            if c == "\\":
                skip = p + 1
            elif c == '"':
                in_str = False
        elif c == "{":
            stack.append(len(starts))
            starts.append(p)
            ends.append(-1)
        elif stack and c == '"':
            in_str = True
        elif stack and c == "}":
            ends[stack.pop()] = p + 1
    return starts, ends


class _Found(NamedTuple):
    key: str
    value: object
    span: tuple[int, int]


class _Objects(NamedTuple):
    found: list[_Found]  # every (key, value) of every read object, in text order
    failed: list[tuple[int, int]]  # balanced objects that could not be read
    failed_open: int  # start of the first unclosed object that could not be read (-1: none)


def _objects(text: str, problems: list[str]) -> _Objects:
    """Read the objects of ``text`` in order: a balanced one strictly, else leniently (recorded), and its inside is
    never read again; an unclosed one (running to the end of the text) leniently, and when it cannot be read, the
    objects inside it are tried."""
    starts, ends = _brace_nodes(text)
    found: list[_Found] = []
    failed: list[tuple[int, int]] = []
    failed_open, covered, tries, skipped = -1, 0, 0, 0
    budget = 2 * len(text) + 65536  # characters the unclosed tries may examine together
    for start, end in zip(starts, ends, strict=True):
        if start < covered:
            continue  # inside an object already read, or inside a balanced one that could not be read
        if end >= 0:
            covered = end
            pairs = _read_balanced(text, start, end, problems)
            if pairs is None:
                failed.append((start, end))
                continue
        else:
            pairs = None
            if _OPEN_OBJECT_RE.match(text, start):
                if tries >= _MAX_OPEN_TRIES or budget <= 0:
                    skipped += 1
                else:
                    tries += 1
                    reader = _Lenient(text, start, nested_objects=False)
                    value = reader.value()
                    budget -= max(reader.far, reader.i) - start
                    if isinstance(value, _Pairs):
                        problems.append("malformed cue JSON repaired")
                        pairs, end, covered = value, len(text), len(text)
            if pairs is None:
                failed_open = start if failed_open < 0 else failed_open
                continue
        found.extend(_Found(str(k), v, (start, end)) for k, v in pairs)
    if skipped:
        problems.append(f"{skipped} more unclosed objects not read (at most {_MAX_OPEN_TRIES} are)")
    return _Objects(found, failed, failed_open)


def _read_balanced(text: str, start: int, end: int, problems: list[str]) -> _Pairs | None:
    """The object ``text[start:end]``: strict JSON (duplicate keys kept), else the lenient reader (recorded)."""
    try:
        value, stop = _DECODER.raw_decode(text, start)
        if stop == end and isinstance(value, _Pairs):
            return value
    except (ValueError, RecursionError):
        pass
    value = _Lenient(text, start, end).value()
    if isinstance(value, _Pairs):
        problems.append("malformed cue JSON repaired")
        return value
    return None


_KEY_RE = re.compile(r"[\"']?\b(" + "|".join(CUE_KEYS) + r")\b[\"']?\s*:")
_INNER_LIST_RE = re.compile(r"\[([^\[\]]*)\]")
_QUOTED_RE = re.compile(r"\"([^\"]*)\"|'([^']*)'")
_LIST_SCAN_RE = re.compile(r"[\[\]}]")


def _close_brace(text: str, pos: int) -> int:
    """``pos`` moved past following whitespace and one ``}``, if there is one."""
    j = _WS_RE.match(text, pos).end()  # type: ignore[union-attr]
    return j + 1 if j < len(text) and text[j] == "}" else pos


def _scrape(text: str, keys: list[re.Match[str]]) -> list[_Found]:
    """Last resort for broken objects: after each cue key (after the first ``{``), read the next bracketed list of
    numbers or strings, up to the next cue key at most."""
    first = text.find("{")
    found: list[_Found] = []
    if first == -1:
        return found
    keys = [m for m in keys if m.start() >= first]
    start = first
    for n, m in enumerate(keys):
        key, j = m.group(1), _WS_RE.match(text, m.end()).end()  # type: ignore[union-attr]
        limit = keys[n + 1].start() if n + 1 < len(keys) else len(text)
        brace = text.rfind("{", keys[n - 1].start() if n else first, m.start() + 1)
        start = brace if brace != -1 else start  # the last "{" before the key
        if j < limit and key == CUE_KEYWORDS and text[j] in "\"'":
            reader = _Lenient(text, j, limit)
            word = reader.value()
            if isinstance(word, str):
                found.append(_Found(key, word, (start, _close_brace(text, reader.i))))
            continue
        if j >= limit or text[j] != "[":
            continue
        depth, k = 0, limit
        for b in _LIST_SCAN_RE.finditer(text, j, limit):
            if b.group() == "}":
                k = b.start()
                break
            depth += 1 if b.group() == "[" else -1
            if depth == 0:
                k = b.end()
                break
        body = text[j + 1 : k]
        if key == CUE_KEYWORDS:
            value: object = [a or b for a, b in _QUOTED_RE.findall(body)]
        elif key == CUE_BOXES and "[" in body:
            value = [[_number(x) for x in _NUMBER_RE.findall(g)] for g in _INNER_LIST_RE.findall(body)]
        else:
            value = [_number(x) for x in _NUMBER_RE.findall(body)]
        found.append(_Found(key, value, (start, _close_brace(text, k))))
    return found


# ----------------------------------------------------------------------------------------------------------------
# Normalising cue values
# ----------------------------------------------------------------------------------------------------------------


def _number(v: object) -> int | float | None:
    """An int or finite float from a number or a numeric string; None otherwise (bools are not numbers)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, str):
        s = v.strip()
        if not _NUMBER_RE.fullmatch(s):
            return None
        return _number(int(s) if _INT_RE.fullmatch(s) else float(s))
    return None


def _short(v: object) -> str:
    r = repr(v)
    return r if len(r) <= 24 else r[:21] + "..."


def _box_candidates(value: object, depth: int = 0) -> list[object]:
    """Split a bbox value into candidate boxes: a flat list is one box, nested lists are several, and in a mixed
    list each sub-list and each run of bare numbers is a candidate."""
    if not isinstance(value, list) or depth > 3:
        return [value]
    out: list[object] = []
    run: list[object] = []
    for el in value:
        if isinstance(el, list):
            if run:
                out.append(run)
                run = []
            nested = bool(el) and all(isinstance(x, list) for x in el)
            out.extend(_box_candidates(el, depth + 1) if nested else [el])
        else:
            run.append(el)
    if run:
        out.append(run)
    return out


def _norm_box(raw: object, problems: list[str]) -> Box | None:
    if not isinstance(raw, list) or len(raw) != 4:
        problems.append(f"box {_short(raw)} without exactly 4 numbers dropped")
        return None
    nums = [_number(v) for v in raw]
    if any(n is None for n in nums):
        problems.append(f"box {_short(raw)} with a non-numeric or non-finite value dropped")
        return None
    if any(isinstance(v, str) for v in raw):
        problems.append("box numbers given as strings coerced")
    if any(not isinstance(n, int) for n in nums):
        problems.append("non-integer box coordinates rounded")
    clamped = [min(max(n, 0), 1000) for n in nums]  # type: ignore[type-var]
    if clamped != nums:
        problems.append("box coordinates clamped to 0-1000")
    x1, y1, x2, y2 = (math.floor(n + 0.5) for n in clamped)
    if x1 > x2 or y1 > y2:
        problems.append("box corners swapped")
        x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
    if x1 == x2 or y1 == y2:
        problems.append(f"zero-area box {[x1, y1, x2, y2]} dropped")
        return None
    return [x1, y1, x2, y2]


def _norm_boxes(values: list[object], problems: list[str]) -> list[Box]:
    boxes: list[Box] = []
    seen: set[tuple[int, ...]] = set()
    for value in values:
        for raw in _box_candidates(value):
            box = _norm_box(raw, problems)
            if box is None:
                continue
            if tuple(box) in seen:
                problems.append(f"duplicate box {box} dropped")
                continue
            seen.add(tuple(box))
            boxes.append(box)
    return boxes


def _norm_frames(values: list[object], n_frames: int | None, base: int, problems: list[str]) -> list[int]:
    frames: list[int] = []
    seen: set[int] = set()
    for value in values:
        if not isinstance(value, list):
            problems.append("key_frames not given as a list")
        for v in value if isinstance(value, list) else [value]:
            n = _number(v)
            if n is None or n != math.floor(n):
                problems.append(f"non-integer key frame {_short(v)} dropped")
                continue
            if isinstance(v, str):
                problems.append("key frames given as strings coerced")
            idx = int(n) - base
            if idx < 0 or (n_frames is not None and idx >= n_frames):
                problems.append(f"key frame {int(n)} out of range dropped")
                continue
            if idx in seen:
                problems.append(f"duplicate key frame {int(n)} dropped")
                continue
            seen.add(idx)
            frames.append(idx)
    return frames


def _norm_keywords(values: list[object], problems: list[str]) -> list[str]:
    keywords: list[str] = []
    for value in values:
        if isinstance(value, str):
            problems.append("text_keywords given as a single string")
            value = [value]
        if not isinstance(value, list):
            problems.append(f"text_keywords value {_short(value)} dropped")
            continue
        for v in value:
            if not isinstance(v, str) or not v.strip():
                problems.append(f"keyword {_short(v)} dropped")
                continue
            if v != v.strip():
                problems.append("keyword whitespace stripped")
            keywords.append(_defuse(v.strip(), "a keyword", problems))
    return keywords


class _Cue(NamedTuple):
    prose: str
    key: str | None
    keywords: list[str]
    boxes: list[Box]
    frames: list[int]


def _normalise(key: str, values: list[object], n_frames: int | None, base: int, problems: list[str]) -> list:
    if key == CUE_KEYWORDS:
        return _norm_keywords(values, problems)
    if key == CUE_BOXES:
        return _norm_boxes(values, problems)
    return _norm_frames(values, n_frames, base, problems)


def _without_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with the spans cut out, the pieces joined by one space."""
    pieces, pos = [], 0
    for start, end in sorted(spans):
        pieces.append(text[pos:start])
        pos = max(pos, end)
    pieces.append(text[pos:])
    return " ".join(p.strip() for p in pieces if p.strip())


def _read_cue(
    inner: str, want: str | None, n_frames: int | None, base: int, problems: list[str], *, check: bool = True
) -> _Cue:
    """Find, choose and normalise the cue of a thinking segment; the prose is the segment without it.

    Without ``want``, every cue object is cut from the prose (the chosen cue and the ignored ones alike), so that
    the rendered T-CoT (prose, then the cue) chooses the same cue again. With ``check``, the prose is checked to
    give back this cue when rendered before it (:func:`render_tcot`); braces that would change it are replaced."""
    src = inner
    objects = _objects(src, problems)
    if not any(f.key in CUE_KEYS for f in objects.found) and ("{{" in src or "}}" in src):
        collapsed = src.replace("{{", "{").replace("}}", "}")
        retry_problems: list[str] = []
        retry = _objects(collapsed, retry_problems)
        if any(f.key in CUE_KEYS for f in retry.found):
            problems.append("doubled braces collapsed")
            problems.extend(retry_problems)
            src, objects = collapsed, retry
    for f in objects.found:
        if f.key not in CUE_KEYS:
            problems.append(f"unknown key {_short(f.key)} ignored")
    keys_in_text = list(_KEY_RE.finditer(src))
    cues = [f for f in objects.found if f.key in CUE_KEYS]
    if cues:
        _record_unreadable(objects, keys_in_text, problems)
    else:
        cues = _scrape(src, keys_in_text)
        if cues:
            problems.append("cue read by lenient key extraction")
    keys = list(dict.fromkeys(f.key for f in cues))
    if want is not None:
        chosen = want if want in keys else None
    else:
        valid = [k for k in keys if _normalise(k, [f.value for f in cues if f.key == k], n_frames, base, [])]
        chosen = valid[0] if valid else (keys[0] if keys else None)
    for k in keys:
        if k != chosen:
            problems.append(f"cue {k} ignored (using {want or chosen})")
    if chosen is None:
        problems.append(f"missing cue {want}" if want is not None else "no cue object")
        cue = _Cue(_defuse(src.strip(), "<thinking>", problems), None, [], [], [])
        return _stable(cue, want, n_frames, problems) if check else cue
    entries = [f for f in cues if f.key == chosen]
    spans = list(dict.fromkeys(f.span for f in entries))
    if len(spans) > 1:
        problems.append(f"{len(spans)} {chosen} cue objects merged")
    if len(entries) > len(spans):
        problems.append(f"duplicate {chosen} keys merged")
    values = _normalise(chosen, [f.value for f in entries], n_frames, base, problems)
    if not values:
        empty = all(f.value == [] for f in entries)
        problems.append(f"empty {chosen} list" if empty else f"no valid {chosen} entry left")
    cut = spans if want is not None else [f.span for f in cues]
    cue = _Cue(
        _defuse(_without_spans(src, cut), "<thinking>", problems),
        chosen,
        values if chosen == CUE_KEYWORDS else [],
        values if chosen == CUE_BOXES else [],
        values if chosen == CUE_FRAMES else [],
    )
    return _stable(cue, want, n_frames, problems) if check else cue


def _record_unreadable(objects: _Objects, keys: list[re.Match[str]], problems: list[str]) -> None:
    """Record every object that could not be read although a cue key stands in it (outside every object read)."""
    read = sorted(f.span for f in objects.found)
    loose: list[re.Match[str]] = []  # key matches outside every object read
    r = 0
    for m in keys:
        while r < len(read) and read[r][1] <= m.start():
            r += 1
        if r == len(read) or m.start() < read[r][0]:
            loose.append(m)
    positions = [m.start() for m in loose]
    unclosed = [(objects.failed_open, sys.maxsize)] if objects.failed_open >= 0 else []
    for start, end in [*objects.failed, *unclosed]:
        k = bisect.bisect_left(positions, start)
        if k < len(positions) and positions[k] < end:
            problems.append(f"unreadable object with {loose[k].group(1)} dropped")


def _stable(cue: _Cue, want: str | None, n_frames: int | None, problems: list[str]) -> _Cue:
    """``cue``, or when its prose would read differently once rendered before the cue JSON (a brace of the prose
    swallowing the cue, or forming a new cue object), the same cue with the prose's braces made parentheses."""
    if "{" not in cue.prose:
        return cue  # a prose without "{" holds no object: the rendered cue is read alone
    tcot = TCoT(cue_key=cue.key, keywords=cue.keywords, boxes=cue.boxes, frames=cue.frames)
    rendered = f"{cue.prose} {cue_json(tcot)}".strip()
    if _read_cue(rendered, want, n_frames, 1, [], check=False) == cue:
        return cue
    problems.append("braces of the thinking prose made parentheses (they would change the cue)")
    return cue._replace(prose=cue.prose.translate(_BRACES_TO_PARENS))


_BRACES_TO_PARENS = str.maketrans("{}", "()")


# ----------------------------------------------------------------------------------------------------------------
# Parser and format check
# ----------------------------------------------------------------------------------------------------------------


class _Problems(list):
    """The problems of one parse: each recorded once, at most ``MAX_PROBLEMS`` listed (then a count of the rest)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()
        self.unlisted = 0

    def append(self, problem: str) -> None:
        if problem in self._seen:
            return
        if len(self) >= MAX_PROBLEMS:
            self.unlisted += 1
            return
        self._seen.add(problem)
        super().append(problem)

    def extend(self, problems: object) -> None:
        for problem in problems:  # type: ignore[attr-defined]
            self.append(problem)

    def listed(self) -> list[str]:
        return [*self, *([f"{self.unlisted} more problems not listed"] if self.unlisted else [])]


def _outside_text(text: str, spans: list[_Span]) -> bool:
    """Non-whitespace text outside the given segments."""
    return bool(_without_spans(text, [(s.start, s.end) for s in spans]))


def parse_tcot(text: str, *, cue_key: str | None = None, n_frames: int | None = None, frame_base: int = 1) -> TCoT:
    """Read any string as a T-CoT, repairing what docs/method.md §2.4 allows and naming each repair in ``problems``.

    Never raises on a string. Without a ``<thinking>…</thinking>`` span the result is the plain-text fallback
    (``fallback=True``, no cue). Tags are matched in any case and with inner spaces (``< /Answer >``); the first
    thinking span is used; rethink and answer are the first of each after it (an unclosed one runs to the next tag).
    Segment texts are stripped.

    Args:
        text: the generated text.
        cue_key: the cue the prompt family requires. Other cue keys are then ignored (and recorded).
        n_frames: frames shown to the Reasoner; key frames outside ``1..n_frames`` are dropped. None: no upper bound.
        frame_base: index of the first frame in the text (1, docs/method.md §2.2).

    Returns:
        The :class:`TCoT`, with ``frames`` 0-based and boxes as clamped, ordered, non-empty int boxes.

    Example:
        >>> t = parse_tcot("<thinking>Red car. {'bbox_2d': [10, 20, 300, 400],}</thinking>"
        ...                "<rethink>Only one car.</rethink><answer>A red car.</answer>", cue_key="bbox_2d")
        >>> t.boxes, t.problems
        ([[10, 20, 300, 400]], ['malformed cue JSON repaired'])
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_tcot reads text, got {type(text).__name__}")
    if cue_key is not None and cue_key not in CUE_KEYS:
        raise ValueError(f"cue_key={cue_key!r}; use one of {CUE_KEYS} or None")
    if n_frames is not None and n_frames < 0:
        raise ValueError(f"n_frames={n_frames} must be >= 0")
    text = text.strip()
    lay = _layout(text)
    problems = _Problems()
    for t in lay.tags:
        if not t.exact:
            problems.append(f"tag variant {_short(text[t.start : t.end])} accepted")
    if lay.thinking is None:
        opened = any(t.name == "thinking" and not t.closing for t in lay.tags)
        problems.append(f"{'unclosed' if opened else 'no'} <thinking>: plain-text fallback")
        return TCoT(problems=problems.listed(), fallback=True, has_all_tags=False, tags_in_order=False)
    th = lay.thinking
    if any(t.name == "thinking" and not t.closing and t.start > th.start for t in lay.tags):
        problems.append("several <thinking> spans: used the first")
    for name, span in (("rethink", lay.rethink), ("answer", lay.answer)):
        if span is None:
            problems.append(f"missing <{name}>")
        elif not span.closed:
            problems.append(f"unclosed <{name}>")
    has_all = bool(lay.rethink and lay.rethink.closed and lay.answer and lay.answer.closed)
    in_order = bool(lay.rethink and lay.answer and lay.rethink.end <= lay.answer.start)
    if lay.rethink and lay.answer and not in_order:
        problems.append("rethink and answer out of order")
    if _outside_text(text, [s for s in (th, lay.rethink, lay.answer) if s is not None]):
        problems.append("text outside tags")
    cue = _read_cue(text[th.inner_start : th.inner_end], cue_key, n_frames, frame_base, problems)

    def inner(span: _Span | None, name: str) -> str:
        return "" if span is None else _defuse(text[span.inner_start : span.inner_end].strip(), name, problems)

    return TCoT(
        thinking=cue.prose,
        cue_key=cue.key,
        keywords=cue.keywords,
        boxes=cue.boxes,
        frames=cue.frames,
        rethink=inner(lay.rethink, "<rethink>"),
        answer=inner(lay.answer, "<answer>"),
        problems=problems.listed(),
        has_all_tags=has_all,
        tags_in_order=in_order,
    )


# One segment's content: anything but an exact grammar tag.
_STRICT_SEGMENT = r"((?:(?!</?(?:thinking|rethink|answer)>)[\s\S])*)"
_STRICT_RE = re.compile(
    f"{THINKING_OPEN}{_STRICT_SEGMENT}{THINKING_CLOSE}\\s*"
    f"{RETHINK_OPEN}{_STRICT_SEGMENT}{RETHINK_CLOSE}\\s*"
    f"{ANSWER_OPEN}{_STRICT_SEGMENT}{ANSWER_CLOSE}"
)


def format_ok(text: str, cue_key: str | None, n_frames: int | None = None, strict_outside_tags: bool = False) -> bool:
    """The format check behind the format reward (docs/method.md §4.5).

    True iff (1) exact-case ``<thinking>``, ``<rethink>``, ``<answer>`` segments follow each other (whitespace
    between them only), each non-empty, starting at the text's first thinking tag; and (2) the parser finds at least
    one valid ``cue_key`` entry in that thinking segment (a non-empty keyword, a box of positive area after clamping,
    a key frame in ``1..n_frames``). ``cue_key=None`` skips (2) (the ``reference`` preset). ``strict_outside_tags``
    also rejects non-whitespace text before or after the three segments.

    >>> format_ok('<thinking>Two cats. {"bbox_2d": [0, 0, 500, 500]}</thinking><rethink>Yes.</rethink>'
    ...           '<answer>Two cats.</answer>', "bbox_2d")
    True
    """
    m = _STRICT_RE.search(text)
    if m is None or not all(g.strip() for g in m.groups()):
        return False
    first_open = next((t.start for t in _find_tags(text) if t.name == "thinking" and not t.closing), None)
    if m.start() != first_open:
        return False
    if strict_outside_tags and (text[: m.start()].strip() or text[m.end() :].strip()):
        return False
    return cue_key is None or parse_tcot(text, cue_key=cue_key, n_frames=n_frames).cue_present
