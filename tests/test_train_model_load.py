"""`dtype` and `attn_implementation` of the training stages (backbone pretrain, train-embedder, train-reasoner, rl):
every model a stage loads gets the configured attention kernel (sdpa by default) and weight dtype (auto: the
checkpoint's, as before the keys existed), float16 training weights are refused, and run folders saved before the
keys existed still resume."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import GRPOTrainer

from embedrl.backbones import load_backbone
from embedrl.config import (
    BackbonePretrainConfig,
    ConfigError,
    EmbedderTrainConfig,
    GRPOTrainConfig,
    ReasonerTrainConfig,
    check_run_dir,
    save_config,
)
from embedrl.train.embedder import build_embedder
from embedrl.train.grpo_trl import grpo_args
from embedrl.train.reasoner import load_cold_start_model
from embedrl.train.rl_models import load_models
from embedrl.world.pretrain import load_pretrain_model


@pytest.fixture(scope="module")
def bf16_backbone(tiny_backbone_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3-VL saved with bfloat16 weights (as the published Qwen-VL checkpoints are): ``dtype: auto``
    must keep them bfloat16, ``dtype: float32`` must give float32 master weights."""
    source = tiny_backbone_dir("qwen3-vl")
    out = tmp_path_factory.mktemp("tiny-bf16")
    shutil.copytree(source, out, dirs_exist_ok=True)
    model, _ = load_backbone(source, dtype=torch.bfloat16)
    model.save_pretrained(out)
    return out


def _kernels(model: torch.nn.Module) -> set[str]:
    """The attention kernel of the model and of its text and vision sub-models."""
    config = model.config
    return {config._attn_implementation, config.text_config._attn_implementation,
            config.vision_config._attn_implementation}  # fmt: skip


def _dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    """The dtypes of the model's own weights (peft keeps LoRA adapters in float32 whatever the base's dtype)."""
    return {p.dtype for name, p in model.named_parameters() if "lora_" not in name}


def _pretrain(backbone: Path, out: Path, **kw) -> BackbonePretrainConfig:
    return BackbonePretrainConfig(backbone=str(backbone), out=str(out), **kw)


def _embedder(backbone: Path, out: Path, **kw) -> EmbedderTrainConfig:
    return EmbedderTrainConfig(backbone=str(backbone), data="pairs.jsonl", out=str(out), **kw)


def _reasoner(backbone: Path, out: Path, **kw) -> ReasonerTrainConfig:
    return ReasonerTrainConfig(backbone=str(backbone), data="pairs.jsonl", out=str(out), **kw)


def test_pretrain_model_gets_kernel_and_dtype(bf16_backbone: Path, tmp_path: Path) -> None:
    default = load_pretrain_model(_pretrain(bf16_backbone, tmp_path)).model
    assert _kernels(default) == {"sdpa"} and _dtypes(default) == {torch.bfloat16}  # auto: the checkpoint's
    model = load_pretrain_model(_pretrain(bf16_backbone, tmp_path, dtype="float32", attn_implementation="eager")).model
    assert _kernels(model) == {"eager"} and _dtypes(model) == {torch.float32}


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_train_embedder_model_gets_kernel_and_dtype(bf16_backbone: Path, tmp_path: Path, finetune: str) -> None:
    default = build_embedder(_embedder(bf16_backbone, tmp_path, finetune=finetune), "cpu").model
    assert _kernels(default) == {"sdpa"} and _dtypes(default) == {torch.bfloat16}
    cfg = _embedder(
        bf16_backbone, tmp_path, finetune=finetune, dtype="float32", attn_implementation="eager", bf16=True
    )
    model = build_embedder(cfg, "cpu").model  # float32 master weights under bf16 mixed precision
    assert _kernels(model) == {"eager"} and _dtypes(model) == {torch.float32}


def test_train_reasoner_model_gets_kernel_and_dtype(bf16_backbone: Path, tmp_path: Path) -> None:
    default = load_cold_start_model(_reasoner(bf16_backbone, tmp_path)).model
    assert _kernels(default) == {"sdpa"} and _dtypes(default) == {torch.bfloat16}
    cfg = _reasoner(bf16_backbone, tmp_path, dtype="float32", attn_implementation="eager", bf16=True)
    model = load_cold_start_model(cfg).model
    assert _kernels(model) == {"eager"} and _dtypes(model) == {torch.float32}


def _rl(tiny_backbone_dir, embedder_dir: Path, out: Path, **kw) -> GRPOTrainConfig:
    return GRPOTrainConfig(reasoner=str(tiny_backbone_dir("qwen3-vl")), embedder=str(embedder_dir),
                           data="rl.jsonl", out=str(out), num_generations=2, pairs_per_step=2, max_new_tokens=16,
                           micro_batch_size=2, **kw)  # fmt: skip


def test_rl_models_get_kernel_and_dtype(tiny_backbone_dir, embedder_dir: Path, tmp_path: Path) -> None:
    """The policy, the frozen reward Embedder and the frozen Discriminator all follow the two keys."""
    default = load_models(_rl(tiny_backbone_dir, embedder_dir, tmp_path))
    models = load_models(_rl(tiny_backbone_dir, embedder_dir, tmp_path, dtype="bfloat16", attn_implementation="eager"))
    assert default.discriminator_model is not None and models.discriminator_model is not None
    for loaded, kernel, dtype in ((default, "sdpa", torch.float32), (models, "eager", torch.bfloat16)):
        for name, model in (("policy", loaded.policy.model), ("embedder", loaded.embedder.model),
                            ("discriminator", loaded.discriminator_model)):  # fmt: skip
            assert _kernels(model) == {kernel}, name
            assert _dtypes(model) == {dtype}, name


def test_rl_reference_model_follows_the_policy(tiny_backbone_dir, embedder_dir: Path, tmp_path: Path) -> None:
    """TRL builds the reference model of ``beta > 0`` from the policy we pass: it gets the policy's kernel."""
    cfg = _rl(tiny_backbone_dir, embedder_dir, tmp_path, beta=0.04, attn_implementation="eager", w_process=0.0)
    policy = load_models(cfg).policy
    trainer = GRPOTrainer(
        model=policy.model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)] * 3,
        args=grpo_args(cfg, total=1), train_dataset=Dataset.from_list([{"prompt": "x"}] * 8),
        processing_class=policy.processor,
    )  # fmt: skip
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    assert _kernels(trainer.ref_model) == {"eager"} and _dtypes(trainer.ref_model) == {torch.float32}


@pytest.mark.parametrize(
    ("make", "bf16", "hint"),
    [
        (_pretrain, None, "use dtype float32, bfloat16 or auto"),
        (_embedder, False, "use dtype float32 (with bf16: true for bfloat16 mixed precision)"),
        (_embedder, True, "dtype=float16 under bf16=true (bfloat16 autocast over float16 weights"),
        (_reasoner, True, "dtype=float16 under bf16=true"),
        (_reasoner, False, "AdamW on float16 weights without loss scaling makes inf/NaN updates"),
    ],
)
def test_float16_training_weights_are_refused(make, bf16: bool | None, hint: str, tmp_path: Path) -> None:
    kw = {} if bf16 is None else {"bf16": bf16}
    with pytest.raises(ConfigError, match=re.escape(hint)):
        make(tmp_path, tmp_path, dtype="float16", **kw)
    assert make(tmp_path, tmp_path, dtype="bfloat16", **kw).dtype == "bfloat16"  # pure bf16 stays allowed


@pytest.mark.parametrize("stage", ["pretrain", "embedder", "reasoner", "rl"])
def test_run_saved_before_the_keys_existed_resumes(stage: str, tmp_path: Path) -> None:
    """A run folder whose config.json lacks dtype and attn_implementation (written before they existed) resumes
    with the defaults; a value other than the default is a difference, named."""
    out = tmp_path / "run"
    if stage == "rl":
        cfg = GRPOTrainConfig(reasoner="r", embedder="e", data="d", out=str(out))
    else:
        cfg = {"pretrain": _pretrain, "embedder": _embedder, "reasoner": _reasoner}[stage](tmp_path, out)
    path = save_config(cfg, out)
    payload = json.loads(path.read_text())
    new_keys = ["attn_implementation"] if stage == "rl" else ["attn_implementation", "dtype"]  # rl had dtype
    for key in new_keys:
        del payload["config"][key]
    path.write_text(json.dumps(payload))

    assert check_run_dir(cfg, out, resume=True, overwrite=False, leftovers=())
    changed = dataclasses.replace(cfg, attn_implementation="eager")
    with pytest.raises(ConfigError, match=r"config differs from the run being resumed in attn_implementation \("):
        check_run_dir(changed, out, resume=True, overwrite=False, leftovers=())
