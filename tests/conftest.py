"""Shared test setup. Offline by default: a stray hub id fails fast instead of retrying for half a minute."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedrl.data.schema import Item, Pair
from embedrl.models.reasoner import Reasoner
from embedrl.train.rl_data import pair_prompts, prompt_lengths

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ----------------------------------------------------------------------------------------------------------------
# Backbones: device/dtype from the environment (scripts/gpu_check.sh sets cuda + bfloat16), tiny checkpoints
# ----------------------------------------------------------------------------------------------------------------

_TEST_DTYPES = ("float32", "bfloat16", "float16")


@pytest.fixture(scope="session")
def torch_device() -> str:
    """Device for model tests: ``EMBEDRL_TEST_DEVICE`` (default ``cpu``)."""
    return os.environ.get("EMBEDRL_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def torch_dtype():
    """Weight dtype for model tests: ``EMBEDRL_TEST_DTYPE``, one of float32 (default), bfloat16, float16."""
    import torch

    name = os.environ.get("EMBEDRL_TEST_DTYPE", "float32")
    if name not in _TEST_DTYPES:
        raise ValueError(f"EMBEDRL_TEST_DTYPE={name!r} is not supported; use one of {', '.join(_TEST_DTYPES)}")
    return getattr(torch, name)


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    """``tiny_backbone_dir(family) -> Path``: a tiny checkpoint (seed 0), built once per session and family.

    Treat the directory as read-only; load it with ``embedrl.backbones.load_backbone`` and save changes elsewhere.
    """
    from embedrl.backbones import build_tiny_backbone
    from embedrl.config import TinyBackboneConfig

    built = {}

    def get(family: str):
        if family not in built:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            built[family] = build_tiny_backbone(TinyBackboneConfig(family=family, out=str(out), seed=0))
        return built[family]

    return get


# Qwen3-VL's own image/video processor limits (as the published checkpoints' preprocessor configs carry them): wide
# enough that images the reference layout has already resized pass through unchanged.
QWEN3_VL_PROCESSOR_SIZE = {"shortest_edge": 64 * 32 * 32, "longest_edge": 16384 * 32 * 32}


@pytest.fixture(scope="session")
def published_embedder_dir(tiny_backbone_dir, tmp_path_factory):
    """A tiny Qwen3-VL saved exactly as the published Embed-RL checkpoints are (the authors' merge script): ``<emb>``
    an ordinary added token, ``config.emb_token_ids = [id]``, Qwen3-VL's processor limits, the model's own chat
    template, and no embedrl file (no embedder.json, no embedrl_* settings, no recorded pixel budget). Read-only."""
    import torch

    from embedrl.backbones import load_backbone

    model, processor = load_backbone(tiny_backbone_dir("qwen3-vl"))
    tokenizer = processor.tokenizer
    tokenizer.add_tokens(["<emb>"])  # a plain added token, as the reference trainer adds it
    emb_id = tokenizer.convert_tokens_to_ids("<emb>")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # the tiny vocabulary has no spare row
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.resize_token_embeddings(len(tokenizer))
    model.config.emb_token_ids = [emb_id]
    del model.config.embedrl_pixel_budget
    processor.image_processor.size = dict(QWEN3_VL_PROCESSOR_SIZE)
    processor.video_processor.size = dict(QWEN3_VL_PROCESSOR_SIZE)
    out = tmp_path_factory.mktemp("published-embed-rl")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def embedder_dir(tiny_backbone_dir, tmp_path_factory):
    """A saved Embedder (our layout) on the tiny Qwen3-VL with a small pixel budget: a few visual tokens per image
    and frame keep it fast. Read-only."""
    from embedrl.backbones import PixelBudget
    from embedrl.models import Embedder

    out = tmp_path_factory.mktemp("embedder")
    budget = PixelBudget(32 * 32, 64 * 64, 32 * 32, 64 * 64, num_frames=4)
    Embedder.from_backbone(tiny_backbone_dir("qwen3-vl"), budget=budget).save(out)
    return out


@pytest.fixture(scope="session")
def embedder(embedder_dir):
    """:func:`embedder_dir` loaded (shared: do not change its settings in a test)."""
    from embedrl.models import Embedder

    return Embedder.load(embedder_dir)


def _video_heavy_set(out: Path, policy: Reasoner) -> tuple[Path, int, dict[str, int]]:
    """A video-heavy RL set and a ``max_prompt_tokens`` between its image/text prompts and its video prompts.

    Frames and images are 128 x 128 (16 visual tokens each under the tiny budget), so a video prompt carries
    8 x 16 tokens where an image prompt carries 16. ``video_mix``: 4 video -> text and 2 image -> text pairs (a dataset
    that loses part of its pairs); ``clips``: 4 text -> video pairs (the video on the target side); ``photos``: 4
    image -> text pairs. Returns the file, the limit, and the expected dropped count per dataset.
    """
    rng = np.random.default_rng(0)
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)

    def picture(name: str) -> str:
        path = media / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(path)
        return str(path)

    def video(name: str) -> Item:
        return Item(id=name, frames=tuple(picture(f"{name}-{k}") for k in range(8)), instruction="Which action?")

    def photo(name: str) -> Item:
        return Item(id=name, images=(picture(name),), instruction="Which object?")

    def label(name: str) -> Item:
        return Item(id=name, text=f"label {name}")

    pairs = [Pair("video_mix", f"m{i}", video(f"m{i}q"), label(f"m{i}t")) for i in range(4)]
    pairs += [Pair("video_mix", f"m{i}", photo(f"m{i}q"), label(f"m{i}t")) for i in range(4, 6)]
    pairs += [Pair("clips", f"c{i}", label(f"c{i}q"), video(f"c{i}t")) for i in range(4)]
    pairs += [Pair("photos", f"p{i}", photo(f"p{i}q"), label(f"p{i}t")) for i in range(4)]
    has_video = [bool(p.query.frames or p.target.frames) for p in pairs]
    lengths = prompt_lengths(policy, [pr for p in pairs for _, pr, _ in pair_prompts(p, policy.compact_prompts)])
    longest = [max(lengths[2 * i], lengths[2 * i + 1]) for i in range(len(pairs))]
    limit = max(n for n, v in zip(longest, has_video, strict=True) if not v)
    assert min(n for n, v in zip(longest, has_video, strict=True) if v) > limit + 80, "frames add too few tokens"
    path = out / "video_heavy.jsonl"
    path.write_text("".join(json.dumps(p.to_record()) + "\n" for p in pairs))
    return path, limit, {"clips": 4, "photos": 0, "video_mix": 4}


@pytest.fixture
def video_heavy_set():
    """The builder of a video-heavy RL set (:func:`_video_heavy_set`), shared by the GRPO data and engine tests."""
    return _video_heavy_set
