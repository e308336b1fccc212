"""Reasoner prompts and generation, and its checkpoint-bound settings (the cold start: test_train_reasoner.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from embedrl.backbones import REASONER_SETTINGS_FILENAME, instruct_backbone, load_backbone, read_reasoner_settings
from embedrl.config import WorldConfig
from embedrl.data.schema import Item, read_pairs
from embedrl.models.reasoner import Decoding, Reasoner, build_reasoner_prompt
from embedrl.prompts import CUE_BOXES, CUE_FRAMES, CUE_KEYWORDS
from embedrl.world.generate import generate_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_world(WorldConfig(out=str(tmp_path_factory.mktemp("world")), size="tiny", seed=0))


@pytest.fixture(scope="module")
def pairs(world: Path):
    return read_pairs(world / "train.jsonl")


def _first(pairs, modality: str, side: str = "query"):
    return next(getattr(p, side) for p in pairs if getattr(p, side).modality == modality)


def test_prompt_routing_and_media_order(pairs) -> None:
    image_q = build_reasoner_prompt(_first(pairs, "image"), "query", "text", compact=True)
    assert image_q.family.name == "image_based" and image_q.family.cue_key == CUE_BOXES
    content = image_q.messages[0]["content"]
    assert [c["type"] for c in content] == ["image", "text"] and len(image_q.images) == 1
    video_q = _first(pairs, "video")
    prompt = build_reasoner_prompt(video_q, "query", "text", compact=True)
    assert prompt.family.cue_key == CUE_FRAMES and prompt.n_frames == len(video_q.frames) == 8
    assert [c["type"] for c in prompt.messages[0]["content"]] == ["image"] * 8 + ["text"]
    assert "Frames: 8" in prompt.messages[0]["content"][-1]["text"]
    text_q = build_reasoner_prompt(Item(text="a red circle", instruction="Find it."), "query", "video")
    assert text_q.family.name == "text_to_video_retrieval" and text_q.family.cue_key == CUE_KEYWORDS
    assert "Find it. a red circle" in text_q.messages[0]["content"][-1]["text"]


def test_target_prompt_never_holds_the_query(pairs) -> None:
    pair = next(p for p in pairs if p.query.text and p.target.modality == "image")
    prompt = build_reasoner_prompt(pair.target, "target", compact=False)
    assert prompt.family.name == "positive_image"
    assert pair.query.text not in prompt.messages[0]["content"][-1]["text"]


@pytest.fixture(scope="module")
def reasoner(tiny_backbone_dir) -> Reasoner:
    return Reasoner.from_pretrained(tiny_backbone_dir("qwen3-vl"), compact_prompts=True)


def test_generate_shapes_order_provenance_and_seed(reasoner: Reasoner, pairs) -> None:
    items = [_first(pairs, "image"), _first(pairs, "video"), _first(pairs, "text", "target")]
    sides = ["query", "query", "target"]
    decoding = Decoding(max_new_tokens=8, seed=3)
    results = [
        reasoner.generate([it], side, decoding=decoding, num_return_sequences=2)[0]
        for it, side in zip(items, sides, strict=True)
    ]
    for result, family in zip(results, ["image_based", "video_sequence", "positive_text"], strict=True):
        assert len(result) == 2 and all(g.family == family for g in result)
        assert all(g.model == str(reasoner.model_id) and g.decoding["seed"] == 3 for g in result)
    batched = reasoner.generate(items[:2], "query", decoding=decoding, num_return_sequences=2, batch_size=2)
    again = reasoner.generate(items[:2], "query", decoding=decoding, num_return_sequences=2, batch_size=2)
    assert [[g.text for g in r] for r in batched] == [[g.text for g in r] for r in again]
    greedy = reasoner.generate(items[:1], "query", decoding=Decoding(max_new_tokens=8, greedy=True))
    assert greedy[0][0].decoding["greedy"] is True


def test_decoding_validation() -> None:
    with pytest.raises(ValueError, match="greedy=True"):
        Decoding(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        Decoding(top_p=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint-bound settings: embedrl_reasoner.json
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_reasoner(tiny_backbone_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Reasoner saved with compact prompts and its own default decoding."""
    model, processor = load_backbone(tiny_backbone_dir("qwen3-vl"))
    out = tmp_path_factory.mktemp("saved-reasoner")
    decoding = Decoding(temperature=0.7, top_p=0.9, max_new_tokens=32, seed=5)
    Reasoner(model, processor, compact_prompts=True, decoding=decoding).save(out)
    return out


def test_saved_settings_load_back(saved_reasoner: Path) -> None:
    record = json.loads((saved_reasoner / REASONER_SETTINGS_FILENAME).read_text())
    assert record["compact_prompts"] is True and "seed" not in record["decoding"]  # the seed is a run's
    loaded = Reasoner.from_pretrained(saved_reasoner)  # compact_prompts None: the checkpoint's
    assert loaded.compact_prompts is True
    assert loaded.decoding == Decoding(temperature=0.7, top_p=0.9, max_new_tokens=32)
    items = [Item("q", "a red kite", "Find it.")]
    generation = loaded.generate(items, "query")[0][0]  # no decoding given: the checkpoint's
    assert generation.decoding["max_new_tokens"] == 32 and generation.decoding["temperature"] == 0.7
    assert generation.prompt_hash == build_reasoner_prompt(items[0], "query", compact=True).family.hash(True)


def test_explicit_compact_prompts_overrides_and_is_logged(saved_reasoner: Path, caplog) -> None:
    with caplog.at_level("INFO", logger="embedrl.models.reasoner"):
        loaded = Reasoner.from_pretrained(saved_reasoner, compact_prompts=False)
    assert loaded.compact_prompts is False
    lines = [r.getMessage() for r in caplog.records if "overrides" in r.getMessage()]
    assert lines == [f"compact_prompts=False overrides the checkpoint's True ({saved_reasoner})"]
    caplog.clear()
    with caplog.at_level("INFO", logger="embedrl.models.reasoner"):
        assert Reasoner.from_pretrained(saved_reasoner, compact_prompts=True).compact_prompts is True
    assert not [r for r in caplog.records if "overrides" in r.getMessage()]  # the same value overrides nothing


def test_checkpoint_without_settings_file_loads_with_todays_defaults(saved_reasoner: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(saved_reasoner, old)
    (old / REASONER_SETTINGS_FILENAME).unlink()
    loaded = Reasoner.from_pretrained(old)
    assert loaded.compact_prompts is False and loaded.decoding == Decoding()
    assert Reasoner.from_pretrained(old, compact_prompts=True).compact_prompts is True


def test_shipped_instruct_backbone_is_prompted_compactly() -> None:
    assert read_reasoner_settings(instruct_backbone()) == {"compact_prompts": True}
