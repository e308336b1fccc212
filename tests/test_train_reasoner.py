"""The Reasoner cold start on TRL's SFTTrainer: labels, learning (full and LoRA), accumulation, resume, processes."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trl import SFTTrainer

from embedrl.backbones import read_reasoner_settings
from embedrl.cli import main
from embedrl.config import ConfigError, LoraSettings, ReasonerTrainConfig, WorldConfig
from embedrl.data.schema import DataError
from embedrl.models.reasoner import Reasoner
from embedrl.prompts import IM_END
from embedrl.train.reasoner import (
    IGNORE_INDEX,
    ReasonerSFTCollator,
    build_trainer,
    discrimination_examples,
    tcot_examples,
    train_reasoner,
)
from embedrl.world.generate import generate_world

METRIC_KEYS = {"step", "train/loss", "train/lr", "train/examples_per_s"}  # read by the demo, plots and docs


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny world plus ``small.jsonl`` (its first pair of every dataset: image, video and text items) and
    ``few.jsonl`` (the first classification and text-to-image pairs: 4 examples with one image each, or none)."""
    world = generate_world(WorldConfig(out=str(tmp_path_factory.mktemp("world")), size="tiny", seed=0))
    first: dict[str, str] = {}
    for line in (world / "train.jsonl").read_text().splitlines():
        first.setdefault(json.loads(line)["dataset"], line)
    (world / "small.jsonl").write_text("".join(line + "\n" for line in first.values()))
    (world / "few.jsonl").write_text(first["world_cls"] + "\n" + first["world_t2i"] + "\n")
    return world


@pytest.fixture(scope="module")
def reasoner(tiny_backbone_dir) -> Reasoner:
    return Reasoner.from_pretrained(tiny_backbone_dir("qwen3-vl"), compact_prompts=True)


def _cfg(tiny_backbone_dir, world: Path, out: Path, **kw) -> ReasonerTrainConfig:
    settings = {"batch_size": 4, "max_steps": 8, "lr": 3e-3, "warmup_steps": 1, "save_every": 0, **kw}
    return ReasonerTrainConfig(
        backbone=str(tiny_backbone_dir("qwen3-vl")), data=str(world / "few.jsonl"), out=str(out), **settings
    )


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# Tokens and labels
# ----------------------------------------------------------------------------------------------------------------


def test_labels_cover_the_answer_after_the_generation_prompt(reasoner: Reasoner, world: Path) -> None:
    """Per row: the tokens before the labelled span are exactly the generation-time prompt (Reasoner.chat_inputs),
    the labelled span is the answer and <|im_end|>, and the template's newline and the padding are not labelled."""
    examples = tcot_examples(world / "small.jsonl")
    video_query = next(e for e in examples if e.kind == "query" and json.loads(e.record)["frames"])
    text_target = next(e for e in examples if e.kind == "target" and not json.loads(e.record)["images"])
    kinds = [video_query, text_target, discrimination_examples(world / "discrimination.jsonl")[0]]
    batch = ReasonerSFTCollator(reasoner, max_length=4096)([dataclasses.asdict(e) for e in kinds])
    tokenizer = reasoner.processor.tokenizer
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    for row, ex in enumerate(kinds):
        real = batch["attention_mask"][row] == 1  # left padding
        assert not (batch["labels"][row][~real] != IGNORE_INDEX).any()
        ids, labels = batch["input_ids"][row][real], batch["labels"][row][real]
        supervised = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        start, end = supervised[0], supervised[-1] + 1
        assert supervised == list(range(start, end))  # one contiguous span
        assert tokenizer.decode(labels[start:end]) == ex.answer + IM_END
        assert labels[start:end].tolist() == ids[start:end].tolist()
        prompt = reasoner.chat_inputs([ex.prompt(compact=True)])
        assert ids[:start].tolist() == prompt["input_ids"][0].tolist()  # the sampled-from prompt, token for token
        assert ids[end:].tolist() == newline  # the template's newline after <|im_end|>: not labelled
    # By hand, the discrimination row (answer "N"): its last three tokens are N, <|im_end|>, "\n"; only N and
    # <|im_end|> carry labels.
    digit, im_end = tokenizer.convert_tokens_to_ids([kinds[-1].answer, IM_END])
    labels = batch["labels"][-1]
    assert batch["input_ids"][-1, -3:].tolist() == [digit, im_end, *newline]
    assert labels[-3:].tolist() == [digit, im_end, IGNORE_INDEX] and (labels[:-3] == IGNORE_INDEX).all()
    assert "pixel_values" in batch and "pixel_values_videos" not in batch  # a video's frames are images


def test_too_long_example_stops_the_run(reasoner: Reasoner, world: Path) -> None:
    collator = ReasonerSFTCollator(reasoner, max_length=32)
    with pytest.raises(ValueError, match="over max_length=32"):
        collator([dataclasses.asdict(tcot_examples(world / "small.jsonl")[0])])


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def test_cpu_loss_is_trls_loss_from_the_answer_logits_only(tiny_backbone_dir, world: Path, tmp_path: Path) -> None:
    """ColdStartTrainer's CPU loss (logits of the answer span) against SFTTrainer's (TRL's fused LM head over every
    position): the same loss and the same gradients, alone and normalised by a step's token count."""
    cfg = _cfg(tiny_backbone_dir, world, tmp_path / "t")
    reasoner = Reasoner.from_pretrained(cfg.backbone, compact_prompts=True)
    examples = tcot_examples(world / "small.jsonl")[:3] + discrimination_examples(world / "discrimination.jsonl")[:1]
    trainer = build_trainer(cfg, reasoner, examples, micro=4, accumulation=1)
    inputs = ReasonerSFTCollator(reasoner, max_length=4096)([dataclasses.asdict(e) for e in examples])
    model = trainer.model
    model.train()
    for num_items in (None, 1000):
        results = []
        for compute in (trainer.compute_loss, functools.partial(SFTTrainer.compute_loss, trainer)):
            trainer._metrics["train"].clear()
            loss = compute(model, dict(inputs), num_items_in_batch=num_items)
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            results.append((loss.item(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}))
            model.zero_grad()
        (ours, our_grads, our_stats), (trl, trl_grads, trl_stats) = results
        assert ours == pytest.approx(trl, rel=1e-5) and len(our_grads) == len(trl_grads) > 0
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(our_grads, trl_grads, strict=True))
        assert our_stats["entropy"] == pytest.approx(trl_stats["entropy"], rel=1e-4)
        assert our_stats["mean_token_accuracy"] == pytest.approx(trl_stats["mean_token_accuracy"])


def test_full_fine_tuning_loss_falls_and_the_folder_loads(
    tiny_backbone_dir, reasoner: Reasoner, world: Path, tmp_path: Path
) -> None:
    cfg = _cfg(tiny_backbone_dir, world, tmp_path / "a")
    final = train_reasoner(cfg)
    records = _records(tmp_path / "a")
    assert [r["step"] for r in records] == list(range(1, 9)) and all(set(r) >= METRIC_KEYS for r in records)
    losses = [r["train/loss"] for r in records]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 1.0
    assert max(r["train/lr"] for r in records) == pytest.approx(3e-3)
    reloaded = Reasoner.from_pretrained(final)
    assert cfg.compact_prompts is None and reloaded.compact_prompts is True  # the tiny backbone's style, recorded
    assert read_reasoner_settings(final)["compact_prompts"] is True
    assert (final / "train_config.json").is_file() and not list(tmp_path.glob("a/checkpoints/checkpoint-*"))
    for (name, p), q in zip(reasoner.model.named_parameters(), reloaded.model.parameters(), strict=True):
        if name.endswith("embed_tokens.weight"):
            assert not torch.equal(p, q)  # trained weights were saved, not the initial ones


def test_lora_trains_adapters_and_saves_them_merged(tiny_backbone_dir, reasoner: Reasoner, world: Path, tmp_path):
    lora = LoraSettings(rank=8, alpha=16, dropout=0.0, vision_tower=False)
    cfg = _cfg(tiny_backbone_dir, world, tmp_path / "l", finetune="lora", lora=lora, report_to=["tensorboard"])
    final = train_reasoner(cfg)
    losses = [r["train/loss"] for r in _records(tmp_path / "l")]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3
    saved = load_file(final / "model.safetensors")
    assert not any("lora" in key for key in saved) and not (final / "adapter_config.json").exists()
    base = dict(reasoner.model.named_parameters())
    changed = {key for key, value in saved.items() if key in base and not torch.equal(value, base[key])}
    assert changed and all(key.endswith("proj.weight") and ".visual." not in key for key in changed)
    assert not any("embed_tokens" in key for key in changed)  # only the adapted layers moved
    assert list((tmp_path / "l" / "runs").glob("events.out.tfevents.*"))  # report_to: tensorboard, in out/runs


def test_accumulation_gives_the_loss_of_one_batch(tiny_backbone_dir, world: Path, tmp_path: Path) -> None:
    """batch_size 4 as 4 micro-batches of 1: the same token-mean loss per step as one batch of 4."""
    one = _cfg(tiny_backbone_dir, world, tmp_path / "one", max_steps=2, lr=1e-4, warmup_steps=0)
    train_reasoner(one)
    train_reasoner(dataclasses.replace(one, out=str(tmp_path / "acc"), micro_batch_size=1))
    whole, accumulated = _records(tmp_path / "one"), _records(tmp_path / "acc")
    for key in ("train/loss", "train/grad_norm"):  # the gradient too, not only the logged loss
        assert [r[key] for r in accumulated] == pytest.approx([r[key] for r in whole], rel=1e-4)


def test_resume_continues_from_the_checkpoint(tiny_backbone_dir, world: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "r"
    cfg = _cfg(tiny_backbone_dir, world, out, max_steps=4, save_every=2)
    train_reasoner(cfg)
    uninterrupted = _records(out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-4"]
    assert read_reasoner_settings(out / "checkpoints" / "checkpoint-2")["compact_prompts"] is True
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")  # as if killed after step 3
    shutil.rmtree(out / "final")
    with caplog.at_level("INFO", logger="embedrl.train.reasoner"):
        train_reasoner(cfg)
    assert any("resuming from" in r.getMessage() and r.getMessage().endswith("checkpoint-2") for r in caplog.records)
    resumed = _records(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # steps 3 and 4 logged once, again
    assert [r["train/loss"] for r in resumed] == pytest.approx([r["train/loss"] for r in uninterrupted], rel=1e-5)
    assert (out / "final" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="differs from the run being resumed in lr"):
        train_reasoner(dataclasses.replace(cfg, lr=1e-3))
    with pytest.raises(ConfigError, match="--resume true"):
        train_reasoner(dataclasses.replace(cfg, resume=False))
    train_reasoner(dataclasses.replace(cfg, max_steps=1, overwrite=True))
    assert [r["step"] for r in _records(out)] == [1]


def test_config_checks_and_cli(tiny_backbone_dir, world: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size=3"):
        _cfg(tiny_backbone_dir, world, tmp_path / "x", micro_batch_size=3)
    with pytest.raises(ConfigError, match="unknown tracker"):
        _cfg(tiny_backbone_dir, world, tmp_path / "x", report_to=["mlflow"])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"anchor": {"tcot": "x"}, "label": 0}) + "\n")
    with pytest.raises(DataError, match=r"not a discrimination record \(.*bad.jsonl, line 1"):
        discrimination_examples(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="4 examples cannot fill one batch of batch_size=8"):
        train_reasoner(_cfg(tiny_backbone_dir, world, tmp_path / "x", batch_size=8))
    argv = ["train-reasoner", "--backbone", str(tiny_backbone_dir("qwen3-vl")), "--data", str(world / "few.jsonl"),
            "--out", str(tmp_path / "b"), "--max_steps", "1", "--batch_size", "2", "--save_every", "0"]  # fmt: skip
    assert main(argv) == 0 and (tmp_path / "b" / "final" / "config.json").is_file()
    assert main(["train-reasoner", "--backbone", "x", "--data", "y", "--out", "z", "--max_steps", "0"]) == 2


@pytest.mark.slow
def test_two_processes_train_like_one(tiny_backbone_dir, world: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo), 2 examples each per step: the losses, gradient norms and weights of 1
    process with 4. (A small lr: Adam's first steps turn float noise in near-zero gradients into lr-sized steps.)"""
    cfg = _cfg(tiny_backbone_dir, world, tmp_path / "one", max_steps=3, lr=1e-4, warmup_steps=0, save_every=3)
    train_reasoner(cfg)
    torchrun = Path(sys.executable).with_name("torchrun")
    argv = [str(torchrun), "--nproc-per-node", "2", "-m", "embedrl.cli", "train-reasoner", "--backbone", cfg.backbone,
            "--data", cfg.data, "--out", str(tmp_path / "two"), "--max_steps", "3", "--batch_size", "4", "--lr",
            "1e-4", "--warmup_steps", "0", "--save_every", "3"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for key in ("train/loss", "train/grad_norm"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-3)
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
