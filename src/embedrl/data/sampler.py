"""Same-dataset sub-batches for contrastive training (docs/method.md §3.5).

Each global batch is ``num_sub_batches`` sub-batches; each sub-batch holds ``sub_batch_size`` pairs of one dataset,
so its in-batch negatives are in-domain. A dataset is drawn with probability ∝ weight × size, and a global batch
holds at most one video sub-batch. Everything is a pure function of ``(seed, epoch)``, so resuming at step ``k``
replays the same batches by skipping the first ``k``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

SubBatch = tuple[str, list[int]]  # (dataset, indices into that dataset)


@dataclass(frozen=True)
class DatasetInfo:
    """One training dataset as the sampler sees it."""

    size: int  # number of pairs
    weight: float = 1.0  # sampling weight (docs/method.md §5.7)
    is_video: bool = False


class SubBatchSampler:
    """Yields global batches as lists of same-dataset sub-batches.

    Args:
        datasets: name -> DatasetInfo.
        sub_batch_size: pairs per sub-batch.
        num_sub_batches: sub-batches per global batch.
        seed: base seed; epoch ``e`` uses ``seed + e``.

    Example:
        >>> s = SubBatchSampler({"a": DatasetInfo(8), "b": DatasetInfo(8)}, sub_batch_size=2, num_sub_batches=2)
        >>> len(s), [len(idx) for _, idx in next(s.epoch(0))]
        (4, [2, 2])
    """

    def __init__(
        self, datasets: Mapping[str, DatasetInfo], sub_batch_size: int, num_sub_batches: int = 1, seed: int = 0
    ) -> None:
        if not datasets:
            raise ValueError("no datasets to sample from")
        if sub_batch_size < 1 or num_sub_batches < 1:
            raise ValueError(f"sub_batch_size ({sub_batch_size}) and num_sub_batches ({num_sub_batches}) must be >= 1")
        for name, info in datasets.items():
            if info.size < sub_batch_size:
                raise ValueError(
                    f"dataset {name!r} has {info.size} pairs, fewer than sub_batch_size={sub_batch_size}; "
                    "lower the sub-batch size or drop the dataset"
                )
            if info.weight <= 0:
                raise ValueError(f"dataset {name!r} has weight {info.weight}; weights must be > 0")
        if num_sub_batches > 1 and all(info.is_video for info in datasets.values()):
            raise ValueError(
                "every dataset is video, but a global batch may hold only one video sub-batch; "
                "set num_sub_batches=1 or add image/text datasets"
            )
        self.names = sorted(datasets)
        self.datasets = dict(datasets)
        self.sub_batch_size = sub_batch_size
        self.num_sub_batches = num_sub_batches
        self.seed = seed
        mass = np.array([datasets[n].weight * datasets[n].size for n in self.names], dtype=np.float64)
        self.probs = mass / mass.sum()  # p(d) ∝ weight_d × n_d

    @property
    def global_batch_size(self) -> int:
        return self.sub_batch_size * self.num_sub_batches

    def __len__(self) -> int:
        """Steps per epoch: floor(Σ n_d / global batch size)."""
        return sum(info.size for info in self.datasets.values()) // self.global_batch_size

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[SubBatch]]:
        """The global batches of ``epoch``, starting at ``start_step`` (for exact resume)."""
        rng = np.random.default_rng(self.seed + epoch)
        streams = {name: _Stream(self.datasets[name].size, rng) for name in self.names}
        video = np.array([self.datasets[n].is_video for n in self.names])
        for step in range(len(self)):
            batch: list[SubBatch] = []
            video_used = False
            for _ in range(self.num_sub_batches):
                probs = self.probs * ~video if video_used else self.probs
                d = self.names[rng.choice(len(self.names), p=probs / probs.sum())]
                video_used |= self.datasets[d].is_video
                batch.append((d, streams[d].take(self.sub_batch_size)))
            if step >= start_step:
                yield batch


class _Stream:
    """A dataset's shuffled index stream, reshuffled when exhausted."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size, self.rng = size, rng
        self.order = rng.permutation(size)
        self.pos = 0

    def take(self, n: int) -> list[int]:
        if self.pos + n > self.size:
            self.order, self.pos = self.rng.permutation(self.size), 0
        out = self.order[self.pos : self.pos + n].tolist()
        self.pos += n
        return out


def split_for_rank(sub_batch: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of a sub-batch (sub_batch_size / world_size indices)."""
    if len(sub_batch) % world_size:
        raise ValueError(f"sub-batch of {len(sub_batch)} does not split evenly over {world_size} processes")
    n = len(sub_batch) // world_size
    return sub_batch[rank * n : (rank + 1) * n]
