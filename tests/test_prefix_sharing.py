"""Embedder.embed_groups / encode(groups=...): a group's shared prefix run once equals the plain forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from embedrl.backbones import PixelBudget
from embedrl.data.schema import Item
from embedrl.models import Embedder, prefix_sharing
from embedrl.models.embedder import _batches
from embedrl.models.prefix_sharing import shared_prefix_length

SMALL_BUDGET = PixelBudget(32 * 32, 64 * 64, 32 * 32, 64 * 64)


def _noise(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _tcot(words: str, cue: str) -> str:
    return f"<thinking>{words} {cue}</thinking><rethink>Checked.</rethink><answer>{words}</answer>"


def _rows() -> tuple[list[Item], list[list[int]]]:
    """Rows in groups: rollouts of an image item naming other boxes; of a video naming other key frames; two equal
    rollouts; two items with the same tokens but other pixels (same size); a text item; a group of one."""
    image = Item(id="a", text="a square", images=(_noise(1, 96),))
    video = Item(id="v", text="what happens?", frames=tuple(_noise(10 + i, 48) for i in range(4)))
    twin_a, twin_b = Item(id="x", text="same", images=(_noise(5),)), Item(id="x", text="same", images=(_noise(6),))
    text = Item(id="t", text="two red kites")
    box = '{"bbox_2d": [[0, 0, 500, 500]]}'
    rows = [
        image.with_tcot(_tcot("Left part.", box)),
        image.with_tcot(_tcot("The right half here.", '{"bbox_2d": [[500, 0, 1000, 600]]}')),
        image.with_tcot(_tcot("Left.", '{"bbox_2d": [[0, 0, 300, 1000]]}')),
        video.with_tcot(_tcot("Frames.", '{"key_frames": [1, 2]}')),
        video.with_tcot(_tcot("Frames.", '{"key_frames": [2, 4]}')),
        image.with_tcot(_tcot("Same.", box)),
        image.with_tcot(_tcot("Same.", box)),
        twin_a.with_tcot(_tcot("Same.", box)),
        twin_b.with_tcot(_tcot("Same.", box)),
        text.with_tcot(_tcot("Kites.", '{"text_keywords": ["kite"]}')),
        text.with_tcot(_tcot("Red kites.", '{"text_keywords": ["red"]}')),
        image.with_tcot(_tcot("Alone.", box)),
    ]
    return rows, [[0, 1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11]]


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_embed_groups_equals_embed_batch(tiny_backbone_dir, family, monkeypatch):
    embedder = Embedder.from_backbone(tiny_backbone_dir(family), budget=SMALL_BUDGET)
    rows, groups = _rows()
    with torch.inference_mode():
        inputs = embedder.collate(rows, "full")
        plain = embedder.embed_batch(inputs)
        grouped = embedder.embed_groups(inputs, groups)
        raw = embedder.embed_groups(inputs, groups, normalize=False)
        # a processor that returns no token types: they are read off the placeholder tokens
        untyped = embedder.embed_groups({k: v for k, v in inputs.items() if k != "mm_token_type_ids"}, groups)
        # the twins' tokens are equal but their pixels are not: sharing their image would give twin_b twin_a's
        wrong = embedder.embed_batch(embedder.collate([rows[7], rows[7]], "full"))[1]
        monkeypatch.setattr(prefix_sharing, "_accepts", lambda model, name: name != "mm_encoder_outputs")
        from_pixels = embedder.embed_groups(inputs, groups)  # a forward that takes no precomputed features
    torch.testing.assert_close(grouped, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_pixels, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(untyped, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(raw / raw.norm(dim=-1, keepdim=True), plain, atol=1e-5, rtol=0)
    assert float((plain[8] - wrong).abs().max()) > 1e-3  # the comparison above can fail


def test_encode_with_groups_equals_plain_encode_and_shares_a_prefix(tiny_backbone_dir, monkeypatch):
    embedder = Embedder.from_backbone(tiny_backbone_dir("qwen3-vl"), budget=SMALL_BUDGET)
    rows, groups = _rows()
    widths = []
    real = prefix_sharing.hidden_at_emb

    def spy(model, inputs, groups_, emb_token_id):
        hidden, ids, mask = real(model, inputs, groups_, emb_token_id)
        widths.append((inputs["input_ids"].shape[1], ids.shape[1]))  # whole rows vs each row's own part
        return hidden, ids, mask

    monkeypatch.setattr("embedrl.models.embedder.hidden_at_emb", spy)
    plain = embedder.encode(rows, batch_size=4, mode="full")
    grouped = embedder.encode(rows, batch_size=4, mode="full", groups=groups)
    np.testing.assert_allclose(grouped, plain, atol=1e-5, rtol=0)
    assert widths and all(own < whole for whole, own in widths)  # every batch ran a shared prefix
    with pytest.raises(ValueError, match="exactly once"):
        embedder.encode(rows, mode="full", groups=[[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="non-empty"):
        embedder.encode(rows[:2], mode="full", groups=[[0, 1], []])


def test_shared_prefix_length_hand_cases():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5, 6]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # each row keeps its last token
    assert shared_prefix_length([[1, 2, 3, 4, 5], [1, 2]]) == 1
    assert shared_prefix_length([[7, 2], [1, 2]]) == 0
    assert shared_prefix_length([[1, 2, 3]]) == 2


def test_batches_keep_groups_whole_and_split_lengths():
    lengths = {0: 100, 1: 100, 2: 90, 3: 90, 4: 40, 5: 40, 6: 30}
    items = [Item(id=str(i), text="x") for i in lengths]
    # plain: longest first, batch_size rows per batch
    assert _batches(items, None, 3, lambda i: lengths[i]) == [[[0], [1], [2]], [[3], [4], [5]], [[6]]]
    groups = [[4, 5], [0, 1], [2, 3], [6]]
    # groups stay whole; a batch ends at 4 rows, and where a group is under half the batch's first length
    assert _batches(items, groups, 4, lambda i: lengths[i]) == [[[0, 1], [2, 3]], [[4, 5], [6]]]
    assert _batches(items[:5], [[0, 1, 2, 3, 4]], 2, lambda i: lengths[i]) == [[[0, 1]], [[2, 3]], [[4]]]
