"""Checks that need a CUDA device (marker ``gpu``: excluded by default, run by ``scripts/gpu_check.sh``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from embedrl.backbones import PixelBudget
from embedrl.data.schema import Item
from embedrl.models.embedder import Embedder

pytestmark = pytest.mark.gpu

SMALL = PixelBudget(32 * 32, 64 * 64, 32 * 32, 64 * 64, num_frames=4)
TCOT = '<thinking>a square {"bbox_2d": [0, 0, 500, 500]}</thinking><rethink>yes</rethink><answer>a square</answer>'


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture
def cuda() -> str:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (torch.cuda.is_available() is False)")
    return "cuda"


def test_bf16_cuda_embeddings_match_float32_cpu(tiny_backbone_dir, cuda) -> None:
    """The same items embed to (nearly) the same unit vectors in bfloat16 on the GPU as in float32 on the CPU."""
    items = [
        Item(id="t", text="two red kites", tcot=TCOT),
        Item(id="i", text="a square", images=(_image(1),), tcot=TCOT),
        Item(id="v", text="what happens?", frames=tuple(_image(10 + i) for i in range(4))),
    ]
    path = tiny_backbone_dir("qwen3-vl")
    cpu = Embedder.from_backbone(path, device="cpu", dtype=torch.float32, budget=SMALL).encode(items, mode="full")
    gpu = Embedder.from_backbone(path, device=cuda, dtype=torch.bfloat16, budget=SMALL).encode(items, mode="full")
    assert gpu.shape == cpu.shape
    cosine = (gpu * cpu).sum(axis=1)
    assert (cosine > 0.99).all(), cosine
