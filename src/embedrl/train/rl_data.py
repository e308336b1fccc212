"""EG-RL's data path (docs/method.md §4.1, docs/rl.md): RL pairs -> prompt screening -> same-dataset step batches ->
the training dataset of TRL's ``GRPOTrainer`` in step order.

- :func:`screen_prompts` measures both prompts of every pair once (chat template, generation prompt and visual
  tokens included) and drops a pair whose prompt overflows ``max_prompt_tokens`` on either side, counted per
  dataset (:class:`PromptScreen`; docs/method.md §8 item 19);
- :class:`RLData` groups the kept pairs by dataset and cuts each epoch into step batches of ``B`` whole pairs of one
  dataset (:func:`step_batches`: a pure function of ``seed + epoch``);
- :func:`build_trl_dataset` writes the step batches as consecutive blocks of ``2·B`` prompt rows (both sides of
  every pair), the row order TRL must keep (``shuffle_dataset=False``).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from embedrl.data.schema import Item, Pair, read_pairs
from embedrl.models.reasoner import Reasoner, ReasonerPrompt, build_reasoner_prompt
from embedrl.prompts import join_task_text

__all__ = [
    "SIDES",
    "PromptScreen",
    "RLData",
    "build_trl_dataset",
    "pair_prompts",
    "prompt_lengths",
    "screen_prompts",
    "step_batches",
]

logger = logging.getLogger(__name__)

SIDES = ("query", "target")
SCREEN_BATCH_SIZE = 8  # prompts per processor call when measuring prompt lengths at start-up


# ----------------------------------------------------------------------------------------------------------------
# Step batches: same-dataset batches of whole pairs (docs/method.md §4.1)
# ----------------------------------------------------------------------------------------------------------------


def step_batches(sizes: Mapping[str, int], pairs_per_step: int, seed: int, epoch: int) -> list[tuple[str, list[int]]]:
    """One epoch's step batches ``[(dataset, pair indices)]``, each ``pairs_per_step`` pairs of one dataset.

    Each dataset's indices are shuffled and cut into batches with drop-last; the batch order is shuffled across
    datasets. A pure function of ``(seed + epoch)``, so a resumed run replays the same batches.

    >>> step_batches({"a": 5, "b": 2}, 2, seed=0, epoch=0)  # doctest: +SKIP
    [('a', [3, 0]), ('b', [1, 0]), ('a', [4, 2])]
    """
    rng = np.random.default_rng(seed + epoch)
    batches = []
    for name in sorted(sizes):
        order = rng.permutation(sizes[name]).tolist()
        batches += [
            (name, order[i : i + pairs_per_step]) for i in range(0, len(order) - pairs_per_step + 1, pairs_per_step)
        ]
    return [batches[i] for i in rng.permutation(len(batches))]


class RLData:
    """The RL pairs grouped by dataset, and the step batches of every epoch (computed on demand)."""

    def __init__(self, pairs: Sequence[Pair], pairs_per_step: int, seed: int) -> None:
        by_dataset: dict[str, list[Pair]] = defaultdict(list)
        for pair in pairs:
            by_dataset[pair.dataset].append(pair)
        self.datasets = {name: by_dataset[name] for name in sorted(by_dataset)}
        self.pairs_per_step, self.seed = pairs_per_step, seed
        small = sorted(name for name, ps in self.datasets.items() if len(ps) < pairs_per_step)
        if small:
            logger.warning("datasets %s have fewer than B=%d pairs and are never used", small, pairs_per_step)
        self.steps_per_epoch = sum(len(ps) // pairs_per_step for ps in self.datasets.values())
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"no dataset has pairs_per_step={pairs_per_step} pairs (sizes "
                f"{ {n: len(p) for n, p in self.datasets.items()} }); lower pairs_per_step"
            )
        self._epoch: tuple[int, list[tuple[str, list[int]]]] | None = None

    @classmethod
    def from_jsonl(cls, path: str | Path, pairs_per_step: int, seed: int) -> RLData:
        pairs = read_pairs(path)
        if not pairs:
            raise ValueError(f"{path} holds no pairs")
        return cls(pairs, pairs_per_step, seed)

    def batch(self, index: int) -> tuple[int, str, list[Pair]]:
        """``(epoch, dataset, pairs)`` of the 0-based step batch ``index``."""
        epoch, k = divmod(index, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            sizes = {name: len(ps) for name, ps in self.datasets.items()}
            self._epoch = (epoch, step_batches(sizes, self.pairs_per_step, self.seed, epoch))
        name, indices = self._epoch[1][k]
        return epoch, name, [self.datasets[name][i] for i in indices]


# ----------------------------------------------------------------------------------------------------------------
# Prompts and their lengths (docs/method.md §8 item 19)
# ----------------------------------------------------------------------------------------------------------------


def pair_prompts(pair: Pair, compact: bool) -> list[tuple[str, ReasonerPrompt, Item]]:
    """``[(side, prompt, item)]`` for the query side then the target side; target prompts never see the query."""
    return [
        ("query", build_reasoner_prompt(pair.query, "query", pair.target.modality, compact=compact), pair.query),
        ("target", build_reasoner_prompt(pair.target, "target", compact=compact), pair.target),
    ]


@dataclass(frozen=True)
class PromptScreen:
    """Which RL pairs fit ``max_prompt_tokens`` on both sides (docs/method.md §8 item 19), counted per dataset.

    Attributes:
        limit: the ``max_prompt_tokens`` the pairs were measured against.
        totals: dataset -> pairs read.
        dropped: dataset -> pairs whose query or target prompt is longer than ``limit`` (0 for a dataset without).
        overlong: ``(dataset, pair_id)`` of every dropped pair.
    """

    limit: int
    totals: dict[str, int]
    dropped: dict[str, int]
    overlong: frozenset[tuple[str, str]]

    def fits(self, pair: Pair) -> bool:
        return (pair.dataset, pair.pair_id) not in self.overlong

    def kept(self, pairs: Sequence[Pair]) -> list[Pair]:
        """``pairs`` without the dropped ones, in order."""
        return [p for p in pairs if self.fits(p)]

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    def log(self) -> None:
        """One line per dataset: ``dropped N of M pairs of <dataset>: prompt > max_prompt_tokens (<limit>)`` (a
        warning when N > 0)."""
        for name in sorted(self.totals):
            n = self.dropped[name]
            logger.log(logging.WARNING if n else logging.INFO,
                       "dropped %d of %d pairs of %s: prompt > max_prompt_tokens (%d)", n, self.totals[name], name,
                       self.limit)  # fmt: skip


def prompt_lengths(
    policy: Reasoner, prompts: Sequence[ReasonerPrompt], batch_size: int = SCREEN_BATCH_SIZE
) -> list[int]:
    """Tokens of each prompt as the policy sees it (chat template, generation prompt, visual tokens), in order."""
    lengths: list[int] = []
    for start in range(0, len(prompts), batch_size):
        mask = policy.chat_inputs(prompts[start : start + batch_size])["attention_mask"]  # [b, T], left-padded
        lengths += [int(n) for n in mask.sum(1).tolist()]
    return lengths


def screen_prompts(pairs: Sequence[Pair], policy: Reasoner, max_prompt_tokens: int) -> PromptScreen:
    """Measure both prompts of every pair once and count, per dataset, the pairs ``max_prompt_tokens`` drops.

    A video pair's prompt holds every frame's visual tokens (8 frames of up to 300 tokens each in the paper's
    setting), so a limit that is too small silently removes most video data; the screen makes that visible at
    start-up (:meth:`PromptScreen.log`) and in every step's ``data/dropped_prompt_tokens``.
    """
    flat = [pr for p in pairs for _, pr, _ in pair_prompts(p, policy.compact_prompts)]
    lengths = prompt_lengths(policy, flat)  # [2 * len(pairs)]: query then target of each pair
    totals: dict[str, int] = defaultdict(int)
    dropped: dict[str, int] = defaultdict(int)
    overlong: set[tuple[str, str]] = set()
    for i, pair in enumerate(pairs):
        totals[pair.dataset] += 1
        if max(lengths[2 * i], lengths[2 * i + 1]) > max_prompt_tokens:
            dropped[pair.dataset] += 1
            overlong.add((pair.dataset, pair.pair_id))
    return PromptScreen(max_prompt_tokens, dict(totals), {n: dropped[n] for n in totals}, frozenset(overlong))


# ----------------------------------------------------------------------------------------------------------------
# The training dataset of GRPOTrainer: the step batches as blocks of prompt rows, in training order
# ----------------------------------------------------------------------------------------------------------------


def _row(side: str, prompt: ReasonerPrompt, item: Item, pair: Pair, block: int) -> dict[str, Any]:
    text = "".join(part["text"] for part in prompt.messages[0]["content"] if part["type"] == "text")
    assert prompt.family is not None
    return {
        "prompt": [{"role": "user", "content": text}],  # TRL puts the images before this text
        "images": [im.convert("RGB") for im in prompt.images],
        "pair_id": pair.pair_id,
        "side": side,
        "dataset": pair.dataset,
        "block": block,
        "cue_key": prompt.family.cue_key,
        "n_frames": prompt.n_frames or None,
        "input_text": join_task_text(item.instruction, item.text),
        "item": json.dumps(item.to_record()),
    }


def build_trl_dataset(data: RLData, blocks: int, compact: bool) -> Any:
    """``blocks`` step blocks in training order: block ``s`` = both sides of the pairs of step batch ``s``, as the
    rows of a ``datasets.Dataset`` (the prompt, its images, and the columns the rewards read)."""
    rows = []
    for s in range(blocks):
        _, _, pairs = data.batch(s)
        for pair in pairs:
            rows += [_row(side, prompt, item, pair, s) for side, prompt, item in pair_prompts(pair, compact)]
    return Dataset.from_list(rows)
