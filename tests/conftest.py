"""Shared test setup. Offline by default: a stray hub id fails fast instead of retrying for half a minute."""

from __future__ import annotations

import os

import pytest

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
