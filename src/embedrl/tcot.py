"""T-CoT: the Reasoner's traceable chain of thought (method.md §2).

    <thinking>short steps ... {"bbox_2d": [x1, y1, x2, y2]}</thinking><rethink>...</rethink><answer>...</answer>

:class:`TCoT` is the structured form; :func:`render_tcot` writes the canonical text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from embedrl.prompts import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    CUE_BOXES,
    CUE_FRAMES,
    CUE_KEYWORDS,
    RETHINK_CLOSE,
    RETHINK_OPEN,
    THINKING_CLOSE,
    THINKING_OPEN,
)

Box = list[int]  # [x1, y1, x2, y2] on the 0-1000 scale, x1 < x2, y1 < y2


@dataclass
class TCoT:
    """A T-CoT in structured form.

    Attributes:
        thinking: the reasoning prose of ``<thinking>`` without the cue JSON object.
        cue_key: which cue the thinking carries: ``text_keywords``, ``bbox_2d``, ``key_frames`` or None.
        keywords: the ``text_keywords`` cue.
        boxes: the ``bbox_2d`` cue, ``[x1, y1, x2, y2]`` ints on the 0-1000 scale.
        frames: the ``key_frames`` cue as **0-based** frame indices (the text form is 1-based).
        rethink: the ``<rethink>`` text.
        answer: the ``<answer>`` text.
        problems: short strings naming every repair or drop the parser made (empty for clean text).
    """

    thinking: str = ""
    cue_key: str | None = None
    keywords: list[str] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    rethink: str = ""
    answer: str = ""
    problems: list[str] = field(default_factory=list)


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
