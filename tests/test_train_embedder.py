"""Embedder training on the tiny world: exact resume, frozen vs trainable, GradCache, learning, 2 processes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from embedrl.cli import main
from embedrl.config import ConfigError, EmbedderTrainConfig, LoraSettings, WorldConfig
from embedrl.evidence import build_embedder_messages
from embedrl.models.embedder import Embedder
from embedrl.tcot import parse_tcot
from embedrl.train.embedder import (
    METRICS_FILE,
    build_sampler,
    cosine_schedule,
    evidence_only,
    latest_checkpoint,
    load_training_data,
    prepare_model,
    step_views,
    train_embedder,
    train_step,
)
from embedrl.world.generate import generate_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_world(WorldConfig(out=str(tmp_path_factory.mktemp("world")), size="tiny", seed=0))


def _cfg(backbone: Path, world: Path, out: Path, **kw) -> EmbedderTrainConfig:
    base = dict(
        backbone=str(backbone),
        data=str(world / "train.jsonl"),
        out=str(out),
        seed=1,
        sub_batch_size=4,
        finetune="full",
        lr=1e-3,
        warmup_steps=1,
        temperature=0.05,
        save_every=2,
        max_steps=4,
    )
    base.update(kw)
    return EmbedderTrainConfig(**base)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt / "state.pt", weights_only=False)["model"]


class _Killed(Exception):
    pass


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_killed_run_resumes_to_identical_weights(tiny_backbone_dir, world: Path, tmp_path: Path, rate: float) -> None:
    backbone = tiny_backbone_dir("qwen3-vl")
    train_embedder(_cfg(backbone, world, tmp_path / "a", evidence_only_rate=rate))

    def kill_after_3(step: int, metrics: dict) -> None:
        if step == 3:  # step 2 is checkpointed, step 3 is lost with the "crash"
            raise _Killed

    with pytest.raises(_Killed):
        train_embedder(_cfg(backbone, world, tmp_path / "b", evidence_only_rate=rate), on_step=kill_after_3)
    assert latest_checkpoint(tmp_path / "b").name == "step-0000002"
    train_embedder(_cfg(backbone, world, tmp_path / "b", evidence_only_rate=rate))

    a, b = _weights(latest_checkpoint(tmp_path / "a")), _weights(latest_checkpoint(tmp_path / "b"))
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The log holds each step once: the records past the resumed checkpoint (step 3) are dropped.
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / METRICS_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (tmp_path / "b" / "final" / "embedder.json").is_file()


def _embedder(backbone: Path):
    return Embedder.from_backbone(backbone)


def _first_batch(world: Path, cfg: EmbedderTrainConfig):
    data = load_training_data(world / "train.jsonl")
    sampler = build_sampler(data, cfg)
    return [(d, [data[d][i] for i in idx]) for d, idx in next(sampler.epoch(0))]


def test_lora_trains_adapters_only(tiny_backbone_dir, world: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_backbone_dir("qwen3-vl"), world, tmp_path, finetune="lora", lr=1e-2)
    embedder = _embedder(cfg.backbone)
    embedder.model = prepare_model(embedder.model, cfg)
    before = {n: p.detach().clone() for n, p in embedder.model.named_parameters()}
    trainable = {n for n, p in embedder.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".visual." in n for n in trainable)  # lora.vision_tower defaults to on
    params = [p for p in embedder.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    train_step(embedder, _first_batch(world, cfg), opt, cosine_schedule(opt, 0, 10), cfg, world=1)
    after = dict(embedder.model.named_parameters())
    for name, old in before.items():
        changed = not torch.equal(old, after[name].detach())
        if name in trainable and "lora_B" in name:
            assert changed, f"trainable {name} did not change"
        if name not in trainable:
            assert not changed, f"frozen {name} changed"


def test_lora_without_vision_tower(tiny_backbone_dir, world: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_backbone_dir("qwen3-vl"), world, tmp_path, finetune="lora", lora=LoraSettings(vision_tower=False))
    model = prepare_model(_embedder(cfg.backbone).model, cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(".visual." in n for n in trainable)


def test_grad_cache_step_equals_plain_step(tiny_backbone_dir, world: Path, tmp_path: Path) -> None:
    results = []
    for grad_cache in (False, True):
        cfg = _cfg(
            tiny_backbone_dir("qwen3-vl"), world, tmp_path, grad_cache=grad_cache, chunk_size=3, sub_batch_size=8
        )
        torch.manual_seed(0)
        embedder = _embedder(cfg.backbone)
        embedder.model.train()
        params = list(embedder.model.parameters())
        opt = torch.optim.SGD(params, lr=0.1)
        metrics = train_step(embedder, _first_batch(world, cfg), opt, cosine_schedule(opt, 0, 10), cfg, world=1)
        results.append((metrics, [p.detach().clone() for p in params]))
    (plain, w_plain), (cached, w_cached) = results
    assert cached["loss"] == pytest.approx(plain["loss"], abs=1e-5)
    assert cached["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)
    for a, b in zip(w_plain, w_cached, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_loss_falls_and_accuracy_rises(tiny_backbone_dir, world: Path, tmp_path: Path) -> None:
    # One dataset in full mode: the tiny, randomly initialised model first learns from the T-CoT text.
    cfg = _cfg(
        tiny_backbone_dir("qwen3-vl"),
        world,
        tmp_path,
        max_steps=24,
        save_every=24,
        sub_batch_size=8,
        datasets=["world_cls"],
        lr=3e-3,
        warmup_steps=3,
    )
    train_embedder(cfg)
    rows = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    first, last = rows[:6], rows[-6:]

    def mean(rs: list[dict], key: str) -> float:
        return sum(r[key] for r in rs) / len(rs)

    assert mean(last, "train/loss") < mean(first, "train/loss") - 0.5
    assert mean(last, "train/accuracy") > mean(first, "train/accuracy") + 0.25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, cfg: EmbedderTrainConfig) -> None:
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        train_embedder(cfg)
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_train_like_one(tiny_backbone_dir, world: Path, tmp_path: Path) -> None:
    """2 gloo processes, each with half of every sub-batch, reach the weights of one process with the whole batch."""
    kw = dict(max_steps=2, save_every=2, sub_batch_size=4, mode="raw")
    single = _cfg(tiny_backbone_dir("qwen3-vl"), world, tmp_path / "one", **kw)
    train_embedder(single)
    double = _cfg(tiny_backbone_dir("qwen3-vl"), world, tmp_path / "two", **kw)
    mp.spawn(_rank_main, args=(2, _free_port(), double), nprocs=2, join=True)
    a, b = _weights(latest_checkpoint(tmp_path / "one")), _weights(latest_checkpoint(tmp_path / "two"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_cli_trains_and_final_embedder_loads(tiny_backbone_dir, world: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    argv = [
        "train-embedder",
        "--backbone",
        str(tiny_backbone_dir("qwen3-vl")),
        "--data",
        str(world / "train.jsonl"),
        "--out",
        str(out),
        "--finetune",
        "full",
        "--max_steps",
        "2",
        "--sub_batch_size",
        "4",
    ]
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["stage"] == "EmbedderTrainConfig" and saved["config"]["max_steps"] == 2
    embedder = Embedder.load(out / "final")
    data = load_training_data(world / "train.jsonl")
    items = [pairs[0].query for pairs in data.values()][:3]
    vectors = embedder.encode(items, batch_size=2)
    assert vectors.shape == (3, embedder.dim)
    assert main(["train-embedder", "--backbone", "x", "--data", "y", "--out", str(out), "--sub_batch_size", "1"]) == 2


def test_unknown_dataset_weight_is_named(world: Path, tmp_path: Path) -> None:
    cfg = EmbedderTrainConfig(
        backbone="x", data=str(world / "train.jsonl"), out=str(tmp_path), dataset_weights={"nope": 2.0}
    )
    with pytest.raises(ValueError, match="dataset_weights names \\['nope'\\]"):
        build_sampler(load_training_data(cfg.data), cfg)


def test_evidence_only_keeps_the_cue_and_drops_the_words(world: Path) -> None:
    pairs = [p for ps in load_training_data(world / "train.jsonl").values() for p in ps]
    checked = set()
    for pair in pairs:
        for item in (pair.query, pair.target):
            cut = evidence_only(item)
            before, after = parse_tcot(item.tcot), parse_tcot(cut.tcot)
            assert (after.cue_key, after.boxes, after.frames, after.keywords) == (
                before.cue_key, before.boxes, before.frames, before.keywords
            )  # fmt: skip
            assert after.thinking == after.rethink == after.answer == "" and not after.problems
            full, short = build_embedder_messages(item, "full"), build_embedder_messages(cut, "full")
            assert len(short.images) == len(full.images)  # the same crops and key frames
            text = " ".join(c.get("text", "") for m in short.messages for c in m["content"] if isinstance(c, dict))
            assert before.answer not in text
            checked.add(before.cue_key)
    assert checked == {"bbox_2d", "key_frames", "text_keywords"}
    assert evidence_only(pairs[0].query.__class__(id="x", text="t")).tcot is None


def test_step_views_are_a_function_of_seed_and_step(world: Path, tmp_path: Path) -> None:
    cfg = _cfg(Path("unused"), world, tmp_path, sub_batch_size=8)
    batch = _first_batch(world, cfg)

    def cut(views) -> list[bool]:
        return [v.query.tcot != o.query.tcot for (_, vs), (_, os_) in zip(views, batch, strict=True)
                for v, o in zip(vs, os_, strict=True)]  # fmt: skip

    assert step_views(batch, 0.0, 1, 1) is batch
    assert all(cut(step_views(batch, 1.0, 1, 1)))
    half = cut(step_views(batch, 0.5, 1, 7))
    assert half == cut(step_views(batch, 0.5, 1, 7)) and 0 < sum(half) < len(half)
    assert half != cut(step_views(batch, 0.5, 1, 8)) or half != cut(step_views(batch, 0.5, 2, 7))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"evidence_only_rate": 1.5}, "not a probability"),
        ({"evidence_only_rate": 0.3, "mode": "raw"}, "needs mode 'full'"),
    ],
)
def test_evidence_only_rate_is_validated(tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        EmbedderTrainConfig(backbone="x", data="d", out=str(tmp_path), **kw)


def _error_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one stderr line, which is returned."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("embedrl: error: ")
    return lines[0]


def _train_argv(backbone: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train-embedder", "--backbone", str(backbone), "--data", str(data), "--out", str(out),
            "--finetune", "full", "--max_steps", "2", "--sub_batch_size", "4", "--save_every", "1",
            *extra]  # fmt: skip


def test_truncated_jsonl_is_one_line(tiny_backbone_dir, world: Path, tmp_path: Path, capsys) -> None:
    data = world / "trunc.jsonl"  # media paths resolve against the file's folder
    data.write_text((world / "train.jsonl").read_text()[:3000])
    line = _error_line(capsys, _train_argv(tiny_backbone_dir("qwen3-vl"), data, tmp_path / "out"))
    assert f"not valid JSON ({data}, line 2:" in line and "repair or delete the line" in line


def test_bad_yaml_config_is_one_line(world: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 3\nlr: [1, 2\n")
    line = _error_line(capsys, _train_argv(Path("bb"), world / "train.jsonl", tmp_path / "out", "--config", str(bad)))
    assert f"not valid YAML ({bad}, line 3:" in line and "fix the file's syntax" in line


def test_missing_data_file_is_one_line(tiny_backbone_dir, tmp_path: Path, capsys) -> None:
    data = tmp_path / "nope.jsonl"
    line = _error_line(capsys, _train_argv(tiny_backbone_dir("qwen3-vl"), data, tmp_path / "out"))
    assert (
        line
        == f"embedrl: error: training data not found ({data}): pass --data a pairs JSONL (e.g. a world's train.jsonl)"
    )


def test_missing_backbone_is_one_line_without_hub_error(world: Path, tmp_path: Path, capsys) -> None:
    line = _error_line(capsys, _train_argv(tmp_path / "nope", world / "train.jsonl", tmp_path / "out"))
    assert f"{tmp_path / 'nope'} does not exist" in line and "Repo id" not in line


def test_missing_image_fails_before_training(tiny_backbone_dir, world: Path, tmp_path: Path, capsys) -> None:
    lines = (world / "train.jsonl").read_text().splitlines()
    record = json.loads(lines[2])
    record["query"]["images"] = ["media/nope.png"]
    lines[2] = json.dumps(record)
    data = world / "missing_image.jsonl"  # media paths resolve against the file's folder
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    line = _error_line(capsys, _train_argv(tiny_backbone_dir("qwen3-vl"), data, out))
    assert f"missing media file {world / 'media/nope.png'} ({data}, line 3)" in line
    assert not (out / "checkpoints").exists()


def test_dataset_smaller_than_sub_batch_is_one_line(tiny_backbone_dir, world: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "small.jsonl"
    data.write_text("\n".join((world / "train.jsonl").read_text().splitlines()[:3]) + "\n")
    (tmp_path / "media").symlink_to(world / "media")
    line = _error_line(capsys, _train_argv(tiny_backbone_dir("qwen3-vl"), data, tmp_path / "out"))
    assert f"has 3 pairs, fewer than sub_batch_size=4 ({data}): lower --sub_batch_size" in line


def test_resume_false_into_a_used_folder_refuses(tiny_backbone_dir, world: Path, tmp_path: Path, capsys) -> None:
    backbone, out = tiny_backbone_dir("qwen3-vl"), tmp_path / "out"
    assert main(_train_argv(backbone, world / "train.jsonl", out)) == 0
    line = _error_line(capsys, _train_argv(backbone, world / "train.jsonl", out, "--resume", "false"))
    assert f"output folder is not empty ({out}): pass --resume true" in line
    assert main(_train_argv(backbone, world / "train.jsonl", out, "--resume", "false", "--overwrite", "true")) == 0
    assert not list((out / "checkpoints").glob("*.tmp"))
    steps = [json.loads(line)["step"] for line in (out / METRICS_FILE).read_text().splitlines()]
    assert steps == [1, 2]


def test_resume_with_a_different_config_refuses(tiny_backbone_dir, world: Path, tmp_path: Path, capsys) -> None:
    backbone, out = tiny_backbone_dir("qwen3-vl"), tmp_path / "out"
    assert main(_train_argv(backbone, world / "train.jsonl", out)) == 0
    final = (out / "final" / "embedder.json").stat().st_mtime_ns
    line = _error_line(capsys, _train_argv(backbone, world / "train.jsonl", out, "--lr", "0.5", "--seed", "9"))
    assert "config differs from the run being resumed in lr, seed (" in line and "--overwrite true" in line
    assert (out / "final" / "embedder.json").stat().st_mtime_ns == final
    assert main(_train_argv(backbone, world / "train.jsonl", out, "--lr", "0.5", "--overwrite", "true")) == 0
