"""Embedder training on the tiny world: exact resume, frozen vs trainable, GradCache, learning, several processes
(accelerate: DDP on gloo, in-process and through ``accelerate launch``), mixed precision, trackers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from embedrl.cli import main
from embedrl.config import BackbonePretrainConfig, ConfigError, EmbedderTrainConfig, LoraSettings, WorldConfig
from embedrl.evidence import build_embedder_messages
from embedrl.models.embedder import Embedder
from embedrl.tcot import parse_tcot
from embedrl.train.embedder import (
    METRICS_FILE,
    EmbedForward,
    build_accelerator,
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
from embedrl.train.tracking import RUNS_DIR, StageTrackers, scalars
from embedrl.world.generate import generate_world

REPO = Path(__file__).resolve().parents[1]


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
    """The trainable weights of a checkpoint (accelerate's save_state, filtered to the trainable parameters)."""
    return load_file(ckpt / "model.safetensors")


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


def _tensorboard(out: Path) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value)]`` as TensorBoard shows the run in ``out/runs`` (orphaned steps of a killed run
    purged)."""
    events = EventAccumulator(str(out / RUNS_DIR), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _assert_tensorboard_matches_metrics(out: Path) -> None:
    rows, board = _rows(out), _tensorboard(out)
    assert set(board) == set(scalars(rows[0])) and "train/loss" in board and "train/grad_norm" in board
    for tag, points in board.items():
        assert [step for step, _ in points] == [r["step"] for r in rows], tag  # each step once, in order
        for (_, value), row in zip(points, rows, strict=True):
            assert value == pytest.approx(row[tag], rel=1e-6, abs=1e-7), (tag, row["step"])  # stored as float32


class _Killed(Exception):
    pass


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_killed_run_resumes_to_identical_weights(tiny_backbone_dir, world: Path, tmp_path: Path, rate: float) -> None:
    backbone = tiny_backbone_dir("qwen3-vl")
    train_embedder(_cfg(backbone, world, tmp_path / "a", evidence_only_rate=rate))

    def kill_after_3(step: int, metrics: dict) -> None:
        if step == 3:  # step 2 is checkpointed, step 3 is lost with the "crash" (but logged)
            raise _Killed

    b = _cfg(backbone, world, tmp_path / "b", evidence_only_rate=rate, report_to=["tensorboard"])
    with pytest.raises(_Killed):
        train_embedder(b, on_step=kill_after_3)
    assert latest_checkpoint(tmp_path / "b").name == "step-0000002"
    train_embedder(b)

    a, b = _weights(latest_checkpoint(tmp_path / "a")), _weights(latest_checkpoint(tmp_path / "b"))
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The log holds each step once: the records past the resumed checkpoint (step 3) are dropped.
    steps = [row["step"] for row in _rows(tmp_path / "b")]
    assert steps == [1, 2, 3, 4]
    assert [r["train/loss"] for r in _rows(tmp_path / "b")] == [r["train/loss"] for r in _rows(tmp_path / "a")]
    assert (tmp_path / "b" / "final" / "embedder.json").is_file()
    # TensorBoard got the same scalars, each step once although the killed run had logged step 3 already.
    _assert_tensorboard_matches_metrics(tmp_path / "b")
    assert not (tmp_path / "a" / RUNS_DIR).exists()  # report_to defaults to none


def _embedder(backbone: Path):
    return Embedder.from_backbone(backbone)


def _first_batch(world: Path, cfg: EmbedderTrainConfig):
    data = load_training_data(world / "train.jsonl")
    sampler = build_sampler(data, cfg)
    return [(d, [data[d][i] for i in idx]) for d, idx in next(sampler.epoch(0))]


def _one_step(embedder: Embedder, cfg: EmbedderTrainConfig, batch, make_optimizer) -> dict[str, float]:
    """One ``train_step`` in this process, through a fresh Accelerator as ``train_embedder`` builds it."""
    accelerator = build_accelerator(cfg)
    module = EmbedForward(embedder)
    optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad])
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, cosine_schedule(optimizer, 0, 10))
    try:
        return train_step(accelerator, module, embedder, batch, optimizer, scheduler, cfg)
    finally:
        accelerator.end_training()


def test_lora_trains_adapters_only(tiny_backbone_dir, world: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_backbone_dir("qwen3-vl"), world, tmp_path, finetune="lora", lr=1e-2)
    embedder = _embedder(cfg.backbone)
    embedder.model = prepare_model(embedder.model, cfg)
    before = {n: p.detach().clone() for n, p in embedder.model.named_parameters()}
    trainable = {n for n, p in embedder.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".visual." in n for n in trainable)  # lora.vision_tower defaults to on
    _one_step(embedder, cfg, _first_batch(world, cfg), lambda params: torch.optim.AdamW(params, lr=cfg.lr))
    after = dict(embedder.model.named_parameters())
    for name, old in before.items():
        changed = not torch.equal(old, after[name].detach())
        if name in trainable and "lora_B" in name:
            assert changed, f"trainable {name} did not change"
        if name not in trainable:
            assert not changed, f"frozen {name} changed"


def test_full_finetuning_freezes_the_untied_lm_head_only(tiny_backbone_dir, world: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_backbone_dir("qwen3-vl"), world, tmp_path)
    model = prepare_model(_embedder(cfg.backbone).model, cfg)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert frozen == ([] if tied else ["lm_head.weight"])


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
        metrics = _one_step(embedder, cfg, _first_batch(world, cfg), lambda ps: torch.optim.SGD(ps, lr=0.1))
        results.append((metrics, [p.detach().clone() for p in params]))
    (plain, w_plain), (cached, w_cached) = results
    assert cached["loss"] == pytest.approx(plain["loss"], abs=1e-5)
    assert cached["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)
    for a, b in zip(w_plain, w_cached, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_runs_the_forward_under_autocast(tiny_backbone_dir, world: Path, tmp_path: Path) -> None:
    losses = {}
    for bf16 in (False, True):
        cfg = _cfg(tiny_backbone_dir("qwen3-vl"), world, tmp_path, bf16=bf16, sub_batch_size=8)
        torch.manual_seed(0)
        embedder = _embedder(cfg.backbone)
        metrics = _one_step(embedder, cfg, _first_batch(world, cfg), lambda ps: torch.optim.SGD(ps, lr=0.1))
        losses[bf16] = metrics["loss"]
        assert next(embedder.model.parameters()).dtype == torch.float32  # the weights stay float32
    assert losses[True] != losses[False] and losses[True] == pytest.approx(losses[False], abs=0.1)


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
    rows = _rows(tmp_path)
    first, last = rows[:6], rows[-6:]

    def mean(rs: list[dict], key: str) -> float:
        return sum(r[key] for r in rs) / len(rs)

    assert mean(last, "train/loss") < mean(first, "train/loss") - 0.5
    assert mean(last, "train/accuracy") > mean(first, "train/accuracy") + 0.25


# ----------------------------------------------------------------------------------------------------------------
# Several processes: 2 gloo processes, each with half of every sub-batch, train like one process with the whole batch
# ----------------------------------------------------------------------------------------------------------------

# Two sub-batches per step (gradient accumulation; the first one's gradients stay local), raw mode (text-only and
# image sides, so DDP sees forwards that leave the vision tower unused).
MULTI = dict(max_steps=2, save_every=2, sub_batch_size=4, num_sub_batches=2, mode="raw")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, cfg: EmbedderTrainConfig) -> None:
    """One process of a 2-process launch, with the environment torchrun gives it."""
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    train_embedder(cfg)  # ends the process group when done


def _assert_same_training(one: Path, two: Path) -> None:
    """Per-step losses, accuracies and gradient norms, and the final weights, of two runs agree (float tolerance:
    the processes embed smaller batches, so padding and summation order differ; the gradient norm catches a wrong
    gradient scale, which AdamW's steps would hide)."""
    rows_one, rows_two = _rows(one), _rows(two)
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one]
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        assert r2["datasets"] == r1["datasets"]
        for key in ("train/loss", "train/loss_q2t", "train/loss_t2q", "train/accuracy", "train/grad_norm"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4), (key, r1["step"])
    a, b = _final_weights(one), _final_weights(two)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=5e-5)


def test_two_processes_train_like_one(tiny_backbone_dir, world: Path, tmp_path: Path) -> None:
    """DDP through accelerate in 2 spawned gloo processes: the same losses and final weights as one process."""
    single = _cfg(tiny_backbone_dir("qwen3-vl"), world, tmp_path / "one", **MULTI)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 processes (and much faster than 2 threads on a busy machine)
    try:
        train_embedder(single)
    finally:
        torch.set_num_threads(threads)
    double = _cfg(tiny_backbone_dir("qwen3-vl"), world, tmp_path / "two", **MULTI)
    mp.spawn(_rank_main, args=(2, _free_port(), double), nprocs=2, join=True)
    _assert_same_training(tmp_path / "one", tmp_path / "two")
    assert not list((tmp_path / "two" / "checkpoints").glob("*.tmp"))
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step-0000002").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"
    ]  # fmt: skip


def _launch_argv(backbone: Path, world: Path, out: Path, **kw) -> list[str]:
    """``accelerate launch`` of the CLI with the shipped DDP config, 2 processes on the CPU."""
    options = dict(backbone=backbone, data=world / "train.jsonl", out=out, device="cpu", seed=1, finetune="full",
                   lr=1e-3, warmup_steps=1, temperature=0.05)  # fmt: skip
    options.update(kw)
    args = [f"--{key}={value}" for key, value in options.items()]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs/accelerate/ddp.yaml"), "--num_processes", "2"]  # fmt: skip
    return [*launcher, "-m", "embedrl.cli", "train-embedder", *args]


def _launch_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_accelerate_launch_resumes_exactly_after_a_kill(tiny_backbone_dir, world: Path, tmp_path: Path) -> None:
    """The shipped DDP config through ``accelerate launch``: a run killed (SIGKILL, every process) after a
    checkpoint and launched again ends with the weights and log of an uninterrupted run. LoRA dropout and GradCache
    make every process's RNG state matter."""
    kw = dict(max_steps=6, save_every=2, sub_batch_size=4, num_sub_batches=2, finetune="lora", grad_cache="true",
              chunk_size=1, evidence_only_rate=0.5)  # fmt: skip
    backbone = tiny_backbone_dir("qwen3-vl")
    subprocess.run(_launch_argv(backbone, world, tmp_path / "a", **kw), env=_launch_env(), check=True, timeout=600)

    out = tmp_path / "b"
    argv = _launch_argv(backbone, world, out, **kw)
    proc = subprocess.Popen(argv, env=_launch_env(), start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while latest_checkpoint(out) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both processes
    proc.wait()
    killed_at = latest_checkpoint(out)
    assert killed_at is not None and killed_at.name < "step-0000006" and not (out / "final").exists()
    subprocess.run(argv, env=_launch_env(), check=True, timeout=600)

    a, b = _final_weights(tmp_path / "a"), _final_weights(out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _rows(out) == [{**r, "train/pairs_per_s": _rows(out)[i]["train/pairs_per_s"]}
                          for i, r in enumerate(_rows(tmp_path / "a"))]  # fmt: skip


def test_accelerate_launch_config_is_refused_when_it_sets_gradient_accumulation(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "3")
    cfg = _cfg(Path("unused"), world, tmp_path, num_sub_batches=2)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=3, but the Embedder accumulates over the "
                                          "num_sub_batches=2 sub-batches"):  # fmt: skip
        build_accelerator(cfg)


@pytest.mark.parametrize(
    ("device", "world_size", "match"),
    [
        ("mps", "1", "use cpu, cuda .each process takes cuda:LOCAL_RANK. or cuda:N"),
        ("cpu:1", "1", "use cpu, cuda"),
        ("cuda:1", "2", "would put all 2 processes on one GPU: pass --device cuda"),
    ],
)
def test_device_is_checked(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str, world_size: str, match: str
) -> None:
    monkeypatch.setenv("WORLD_SIZE", world_size)
    with pytest.raises(ConfigError, match=match):
        build_accelerator(_cfg(Path("unused"), world, tmp_path, device=device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(world: Path, tmp_path: Path, capsys) -> None:
    line = _error_line(capsys, _train_argv(Path("bb"), world / "train.jsonl", tmp_path / "out", "--device", "cuda"))
    assert line == "embedrl: error: device='cuda' but torch sees no GPU: pass --device cpu"


# ----------------------------------------------------------------------------------------------------------------
# Trackers
# ----------------------------------------------------------------------------------------------------------------


def test_stage_trackers_write_tensorboard_and_a_restart_drops_orphaned_steps(tmp_path: Path) -> None:
    """The helper of the loops without an Accelerator (backbone pretrain): a run logs steps 1-3, is "killed", and
    resumes at step 3; TensorBoard shows steps 1-4 once each, step 3 from the resumed run."""
    cfg = BackbonePretrainConfig(backbone="bb", out=str(tmp_path), report_to=["tensorboard"])
    with StageTrackers(cfg, tmp_path, "test") as trackers:
        for step in (1, 2, 3):
            trackers.log({"step": step, "train/loss": float(step), "datasets": ["a"], "skipped": True})
    time.sleep(1.1)  # event files are read in name order, which starts with the second of their creation
    with StageTrackers(cfg, tmp_path, "test", first_step=3) as trackers:
        for step in (3, 4):
            trackers.log({"step": step, "train/loss": 10.0 * step})
    assert _tensorboard(tmp_path) == {"train/loss": [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]}
    hparams = next((tmp_path / RUNS_DIR).glob("*/hparams.yml")).read_text()
    assert "task_weights.crop: 1.0" in hparams and "report_to: '[\"tensorboard\"]'" in hparams


@pytest.mark.skipif(find_spec("wandb") is not None, reason="checks the message where wandb is not installed")
def test_a_tracker_that_is_not_installed_stops_the_run_at_once(world: Path, tmp_path: Path, capsys) -> None:
    line = _error_line(
        capsys, _train_argv(Path("bb"), world / "train.jsonl", tmp_path / "out", "--report_to", "wandb")
    )
    assert "report_to=['wandb'] needs the wandb package, which is not installed: pip install wandb" in line
    assert not (tmp_path / "out").exists()


def test_report_to_is_validated() -> None:
    with pytest.raises(ConfigError, match="unknown tracker"):
        EmbedderTrainConfig(backbone="x", data="d", out="o", report_to=["tensorbored"])


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
