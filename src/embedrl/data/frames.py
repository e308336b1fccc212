"""Video frames on disk: natural ordering and uniform sampling (docs/benchmarks.md §2.1, §3.4; docs/method.md §6.2).

Benchmarks ship videos as folders of pre-extracted frames. A frame list is the folder's image files in **natural**
order (numeric parts compare as numbers, so ``frame_10`` follows ``frame_9``), and the frames used are at indices
``floor(linspace(0, n - 1, k))`` (all of them when ``n <= k``). The identical frames go to the Reasoner and the
Embedder.

Example:
    >>> sample_indices(64, 8)
    [0, 9, 18, 27, 36, 45, 54, 63]
    >>> sorted(["f10.jpg", "f9.jpg", "f1.jpg"], key=natural_key)
    ['f1.jpg', 'f9.jpg', 'f10.jpg']
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["FRAME_SUFFIXES", "list_frames", "natural_key", "sample_frames", "sample_indices"]

FRAME_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
_NUMBER = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that compares digit runs as numbers and the rest as text."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in _NUMBER.split(name) if part)


def sample_indices(n: int, k: int) -> list[int]:
    """``floor(linspace(0, n - 1, k))`` as ints; ``range(n)`` when ``n <= k``."""
    if n < 0 or k < 1:
        raise ValueError(f"need n >= 0 and k >= 1, got n={n}, k={k}")
    if n <= k:
        return list(range(n))
    return [math.floor(i * (n - 1) / (k - 1)) for i in range(k)]


def list_frames(folder: str | Path, key: Callable[[str], Any] = natural_key) -> list[Path]:
    """The frame images of ``folder`` sorted by ``key`` of their names (default: natural order); raises
    FileNotFoundError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"frame folder {folder} does not exist")
    frames = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES]
    if not frames:
        raise FileNotFoundError(f"frame folder {folder} holds no {'/'.join(FRAME_SUFFIXES)} files")
    return sorted(frames, key=lambda p: key(p.name))


def sample_frames(folder: str | Path, k: int = 8) -> list[Path]:
    """``k`` frames of ``folder`` picked uniformly (all when it has ``k`` or fewer)."""
    frames = list_frames(folder)
    return [frames[i] for i in sample_indices(len(frames), k)]
