"""Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL backbones: offline build, load, forward, generate, ``<emb>``, determinism.

Device and dtype follow ``EMBEDRL_TEST_DEVICE`` / ``EMBEDRL_TEST_DTYPE`` (default cpu / float32); see
``scripts/gpu_check.sh``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, LlamaConfig

from embedrl import prompts
from embedrl.backbones import (
    ADAPTERS,
    add_emb_token,
    build_tiny_backbone,
    build_tiny_tokenizer,
    check_token_ids,
    detect_family,
    get_adapter,
    load_backbone,
)
from embedrl.backbones.tiny import BACKBONE_CONFIG_FILENAME
from embedrl.cli import main
from embedrl.config import MODEL_FAMILIES, TinyBackboneConfig, read_saved_config

CHECKPOINT_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "processor_config.json",
    BACKBONE_CONFIG_FILENAME,
}


def _image(seed: int = 0, size: int = 64) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _prompt(processor, kind: str, text: str) -> str:
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.fixture
def loaded(request, tiny_backbone_dir, torch_device, torch_dtype):
    """(model, processor) of the tiny ``family`` checkpoint, freshly loaded for the test."""
    return load_backbone(tiny_backbone_dir(request.param), dtype=torch_dtype, device=torch_device)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_layout():
    tok = build_tiny_tokenizer()
    assert len(tok) == 4096
    assert (tok.eos_token, tok.pad_token, tok.padding_side) == (prompts.EOS_TOKEN, prompts.PAD_TOKEN, "left")
    assert tok.chat_template == prompts.CHAT_TEMPLATE
    special_ids = tok.convert_tokens_to_ids(list(prompts.QWEN_SPECIAL_TOKENS))
    assert special_ids == sorted(special_ids)  # Qwen's order
    assert prompts.EMB_TOKEN not in tok.get_vocab()

    text = "<thinking>a red circle at [12, 340]</thinking> <rethink>it is red</rethink><answer>é 3</answer>"
    ids = tok(text).input_ids
    for tag in prompts.TCOT_TAGS:
        assert tok.convert_tokens_to_ids(tag) in ids  # one token each
    assert tok.decode(ids, skip_special_tokens=True) == text  # T-CoT tags survive decoding


def test_tiny_tokenizer_is_deterministic(tmp_path):
    build_tiny_tokenizer().save_pretrained(tmp_path / "a")
    build_tiny_tokenizer().save_pretrained(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    # A fresh process, with tokenizers' thread pool enabled, trains the same vocabulary.
    script = (
        "import hashlib, sys, tempfile\n"
        "from embedrl.backbones.tokenizer import build_tiny_tokenizer\n"
        "d = tempfile.mkdtemp()\n"
        "build_tiny_tokenizer().save_pretrained(d)\n"
        "sys.stdout.write(hashlib.sha256(open(d + '/tokenizer.json', 'rb').read()).hexdigest())\n"
    )
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert result.stdout == hashlib.sha256((tmp_path / "a" / "tokenizer.json").read_bytes()).hexdigest()


def test_tiny_tokenizer_rejects_bad_sizes():
    with pytest.raises(ValueError, match="vocab_size=100 cannot hold"):
        build_tiny_tokenizer(100)
    with pytest.raises(ValueError, match="larger than the tokenizer corpus supports"):
        build_tiny_tokenizer(50_000)


# ----------------------------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------------------------


def test_adapters_cover_every_family():
    assert tuple(ADAPTERS) == MODEL_FAMILIES
    for family, adapter in ADAPTERS.items():
        assert adapter.family == family
        assert detect_family(adapter.config_class()) == family
        assert get_adapter(adapter.config_class()) is adapter


def test_detect_family_rejects_unknown_model_type(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported backbone model_type 'llama'.*qwen2_vl.*qwen2_5_vl.*qwen3_vl"):
        detect_family(LlamaConfig())
    LlamaConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'llama'"):
        load_backbone(tmp_path)
    with pytest.raises(TypeError, match="PreTrainedModel or PreTrainedConfig"):
        get_adapter({"model_type": "qwen3_vl"})


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_default_pixel_budget_gives_method_token_counts(family, tiny_backbone_dir):
    """docs/method.md §3.2: 128-768 visual tokens per image, 128-300 per video frame, for every family."""
    _, processor = load_backbone(tiny_backbone_dir(family))
    adapter = ADAPTERS[family]
    frames = [_image(i) for i in range(prompts.VIDEO_NUM_FRAMES)]
    inputs = processor(
        text=[_prompt(processor, "image", "a") + _prompt(processor, "video", "b")],
        images=[_image()],
        videos=[frames],
        return_tensors="pt",
        **adapter.processor_kwargs(),
    )
    merge = adapter.merge_size**2
    image_tokens = int(inputs["image_grid_thw"][0].prod()) // merge
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert 128 <= image_tokens <= 768
    assert t == prompts.VIDEO_NUM_FRAMES // adapter.temporal_patch_size  # frames used as given, not resampled
    assert 128 <= h * w // merge <= 300


# ----------------------------------------------------------------------------------------------------------------
# Tiny checkpoints
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_tiny_checkpoint_files_and_ids(family, tiny_backbone_dir):
    path = tiny_backbone_dir(family)
    assert {p.name for p in path.iterdir()} >= CHECKPOINT_FILES
    cfg = read_saved_config(TinyBackboneConfig, path, filename=BACKBONE_CONFIG_FILENAME)
    assert (cfg.family, cfg.out, cfg.seed) == (family, str(path), 0)

    model, processor = load_backbone(path)
    tok, config = processor.tokenizer, model.config
    assert type(model) is ADAPTERS[family].model_class and get_adapter(model) is ADAPTERS[family]
    assert config.image_token_id == tok.convert_tokens_to_ids(prompts.IMAGE_PAD)
    assert config.video_token_id == tok.convert_tokens_to_ids(prompts.VIDEO_PAD)
    assert config.vision_start_token_id == tok.convert_tokens_to_ids(prompts.VISION_START)
    assert config.vision_end_token_id == tok.convert_tokens_to_ids(prompts.VISION_END)
    text = config.get_text_config()
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (
        tok.pad_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert model.generation_config.eos_token_id == [tok.eos_token_id, tok.pad_token_id]
    assert text.vocab_size == len(tok) == model.get_input_embeddings().num_embeddings
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert not model.training


def test_token_id_mismatches_fail_loudly(tiny_backbone_dir):
    path = tiny_backbone_dir("qwen3-vl")
    config = AutoConfig.from_pretrained(path)
    model, processor = load_backbone(path)
    config.image_token_id = 7
    with pytest.raises(ValueError, match=r"config.image_token_id=7 but the tokenizer has <\|image_pad\|>="):
        check_token_ids(config, processor.tokenizer)

    setattr(model.config, prompts.EMB_CONFIG_KEY, [5])  # an id the tokenizer does not give <emb>
    vocab = len(processor.tokenizer)
    with pytest.raises(ValueError, match=r"emb_token_ids=\[5\] but the tokenizer has <emb>=None"):
        add_emb_token(model, processor)
    assert len(processor.tokenizer) == vocab  # nothing added


@pytest.mark.parametrize("loaded", MODEL_FAMILIES, indirect=True)
def test_forward_with_image_and_generate(loaded, torch_device):
    model, processor = loaded
    inputs = processor(
        text=[_prompt(processor, "image", "What colour is the circle?")], images=[_image()], return_tensors="pt"
    ).to(torch_device)
    with torch.inference_mode():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    n = inputs["input_ids"].shape[1]
    assert logits.shape == (1, n, model.get_input_embeddings().num_embeddings)
    assert torch.isfinite(logits).all()
    assert n < generated.shape[1] <= n + 4
    assert torch.equal(generated[:, :n], inputs["input_ids"])


@pytest.mark.parametrize("loaded", MODEL_FAMILIES, indirect=True)
def test_forward_with_video_frames(loaded, torch_device):
    model, processor = loaded
    frames = [_image(seed) for seed in range(4)]
    inputs = processor(text=[_prompt(processor, "video", "What happens?")], videos=[frames], return_tensors="pt").to(
        torch_device
    )
    assert inputs["video_grid_thw"][0, 0] == 2  # 4 frames in temporal patches of 2
    with torch.inference_mode():
        hidden = model.model(**inputs).last_hidden_state
    assert hidden.shape == (1, inputs["input_ids"].shape[1], model.config.get_text_config().hidden_size)
    assert torch.isfinite(hidden).all()


@pytest.mark.parametrize("loaded", MODEL_FAMILIES, indirect=True)
def test_add_emb_token_once_and_survives_save_load(loaded, tmp_path, torch_device, torch_dtype):
    model, processor = loaded
    vocab = len(processor.tokenizer)
    emb_id = add_emb_token(model, processor)
    assert add_emb_token(model, processor) == emb_id  # idempotent
    assert len(processor.tokenizer) == vocab + 1
    assert model.get_input_embeddings().num_embeddings == vocab + 1  # the tiny matrix had no spare row
    assert getattr(model.config, prompts.EMB_CONFIG_KEY) == [emb_id]
    assert processor.tokenizer(f"a{prompts.EMB_TOKEN}b").input_ids.count(emb_id) == 1
    assert processor.tokenizer.decode([emb_id], skip_special_tokens=True) == prompts.EMB_TOKEN

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[prompts.EMB_CONFIG_KEY] == [emb_id]
    model2, processor2 = load_backbone(tmp_path, dtype=torch_dtype, device=torch_device)
    assert getattr(model2.config, prompts.EMB_CONFIG_KEY) == [emb_id]
    assert processor2.tokenizer.convert_tokens_to_ids(prompts.EMB_TOKEN) == emb_id
    assert add_emb_token(model2, processor2) == emb_id
    assert len(processor2.tokenizer) == vocab + 1 == model2.get_input_embeddings().num_embeddings
    assert torch.equal(model2.get_input_embeddings().weight[emb_id], model.get_input_embeddings().weight[emb_id])

    messages = [{"role": "user", "content": "a red circle"}, {"role": "assistant", "content": prompts.EMB_TOKEN}]
    text = processor2.apply_chat_template(messages, tokenize=False)
    inputs = processor2(text=[text], return_tensors="pt").to(torch_device)
    with torch.inference_mode():
        hidden = model2.model(**inputs).last_hidden_state
    assert torch.isfinite(hidden).all()


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_tiny_build_is_deterministic(family, tiny_backbone_dir, tmp_path):
    first = tiny_backbone_dir(family)
    rng_state = torch.random.get_rng_state()
    again = build_tiny_backbone(TinyBackboneConfig(family=family, out=str(tmp_path / "again"), seed=0))
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the global RNG is left alone
    for name in sorted(CHECKPOINT_FILES - {BACKBONE_CONFIG_FILENAME}):
        assert (first / name).read_bytes() == (again / name).read_bytes(), name

    other = build_tiny_backbone(TinyBackboneConfig(family=family, out=str(tmp_path / "other"), seed=1))
    assert (other / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()


def test_cli_backbone_tiny(tmp_path: Path, capsys):
    assert main(["backbone", "tiny", "--family", "qwen2.5-vl", "--out", str(tmp_path), "--seed", "3"]) == 0
    assert {p.name for p in tmp_path.iterdir()} >= CHECKPOINT_FILES
    assert "qwen2.5-vl" in capsys.readouterr().out
    assert detect_family(AutoConfig.from_pretrained(tmp_path)) == "qwen2.5-vl"
