"""Same-dataset sub-batch sampler: composition, mixing proportions, the one-video rule, determinism, resume."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from embedrl.data.sampler import DatasetInfo, SubBatchSampler, split_for_rank

DATASETS = {
    "img_a": DatasetInfo(size=4000, weight=1.0),
    "img_b": DatasetInfo(size=2000, weight=3.0),
    "vid_a": DatasetInfo(size=3000, weight=2.0, is_video=True),
    "vid_b": DatasetInfo(size=1000, weight=2.0, is_video=True),
}


def test_sub_batches_are_single_dataset_and_sized() -> None:
    sampler = SubBatchSampler(DATASETS, sub_batch_size=8, num_sub_batches=3, seed=1)
    assert len(sampler) == 10000 // 24
    for batch in itertools.islice(sampler.epoch(0), 50):
        assert len(batch) == 3
        for name, idx in batch:
            assert len(idx) == 8 and len(set(idx)) == 8
            assert all(0 <= i < DATASETS[name].size for i in idx)


def test_at_most_one_video_sub_batch_per_global_batch() -> None:
    sampler = SubBatchSampler(DATASETS, sub_batch_size=4, num_sub_batches=4, seed=0)
    counts = Counter(sum(DATASETS[name].is_video for name, _ in batch) for batch in sampler.epoch(0))
    assert set(counts) <= {0, 1}
    assert counts[1] > 0  # video does get sampled


def test_single_sub_batch_mix_follows_weight_times_size() -> None:
    sampler = SubBatchSampler(DATASETS, sub_batch_size=2, num_sub_batches=1, seed=3)
    drawn = Counter(name for epoch in range(4) for batch in sampler.epoch(epoch) for name, _ in batch)
    total = sum(drawn.values())
    mass = {n: d.weight * d.size for n, d in DATASETS.items()}
    for name, m in mass.items():
        p = m / sum(mass.values())
        sd = np.sqrt(p * (1 - p) / total)
        assert abs(drawn[name] / total - p) < 5 * sd, (name, drawn[name] / total, p)


def test_deterministic_by_seed_and_epoch_and_resumable() -> None:
    s = SubBatchSampler(DATASETS, sub_batch_size=4, num_sub_batches=2, seed=5)
    a, b = list(s.epoch(0)), list(SubBatchSampler(DATASETS, 4, 2, seed=5).epoch(0))
    assert a == b
    assert a != list(s.epoch(1))
    assert list(s.epoch(0, start_step=7)) == a[7:]


def test_streams_cover_a_dataset_before_repeating() -> None:
    s = SubBatchSampler({"only": DatasetInfo(12)}, sub_batch_size=4, num_sub_batches=1, seed=0)
    idx = [i for batch in s.epoch(0) for _, sub in batch for i in sub]
    assert sorted(idx) == list(range(12))


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="fewer than sub_batch_size"):
        SubBatchSampler({"x": DatasetInfo(3)}, sub_batch_size=4)
    with pytest.raises(ValueError, match="only one video sub-batch"):
        SubBatchSampler({"v": DatasetInfo(10, is_video=True)}, sub_batch_size=2, num_sub_batches=2)
    with pytest.raises(ValueError, match="does not split evenly"):
        split_for_rank([1, 2, 3], 0, 2)
    assert split_for_rank([1, 2, 3, 4], 1, 2) == [3, 4]
