"""EG-RL on TRL's GRPOTrainer, the one engine: step blocks, reward checks, frozen reward models, metrics, resume,
every config key's route into TRL, TRL's loss against the method's objective, the console, and two processes."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import re
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from trl import GRPOTrainer

import embedrl.train.grpo_trl as grpo_trl_module
from embedrl.backbones import load_backbone, read_reasoner_settings
from embedrl.cli import main
from embedrl.config import ConfigError, GRPOTrainConfig, RewardConfig, ServeConfig, WorldConfig, load_config
from embedrl.data.schema import read_pairs
from embedrl.models.embedder import Embedder
from embedrl.models.reasoner import Reasoner, build_reasoner_prompt
from embedrl.rewards.judges import ChatDiscriminator, EmbedderReward, EndpointDiscriminator, EndpointEmbedderReward
from embedrl.rewards.terms import build_reward_funcs
from embedrl.train.grpo_trl import (
    CONFIG_ROUTES,
    ProcessLayout,
    StepClock,
    Timed,
    TRLRewards,
    grpo_args,
    mixed_batch_processor,
    rl_step_geometry,
    train_rl_trl,
)
from embedrl.train.rl_data import RLData, build_trl_dataset
from embedrl.train.rl_models import load_models, reward_embedder
from embedrl.train.rl_outputs import COMPONENTS, METRICS_FILE, RL_META_FILE, SAMPLES_FILE, TRAIN_LOG_FILE
from embedrl.world.generate import generate_world

G, B = 2, 2


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_world(WorldConfig(out=str(tmp_path_factory.mktemp("world")), size="tiny", seed=0))


@pytest.fixture(scope="module")
def make_cfg(tiny_backbone_dir, embedder_dir: Path, world: Path):
    def make(out: Path, **kw) -> GRPOTrainConfig:
        base = dict(
            reasoner=str(tiny_backbone_dir("qwen3-vl")), embedder=str(embedder_dir),
            data=str(world / "rl.jsonl"), out=str(out), seed=0, num_generations=G, pairs_per_step=B, max_steps=3,
            max_new_tokens=16, discriminator_max_new_tokens=4, lr=1e-3, save_every=2,
            sample_table_every=2, micro_batch_size=8, w_outcome=0.8, w_process=0.2, acc_mode="fraction",
        )  # fmt: skip
        base.update(kw)
        return GRPOTrainConfig(**base)

    return make


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def trl_run(make_cfg, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    cfg = make_cfg(tmp_path_factory.mktemp("rl-trl"))
    models = load_models(cfg)
    frozen = {"embedder": models.embedder.model, "discriminator": models.discriminator_model}
    before = {name: _snapshot(m) for name, m in {**frozen, "policy": models.policy.model}.items()}
    final = train_rl_trl(cfg, models=models)
    return SimpleNamespace(cfg=cfg, models=models, frozen=frozen, before=before, final=final, out=Path(cfg.out))


def test_trl_policy_trains_and_reward_models_stay_frozen(trl_run: SimpleNamespace) -> None:
    after = _snapshot(trl_run.models.policy.model)
    changed = [n for n, t in trl_run.before["policy"].items() if not torch.equal(t, after[n])]
    assert any("language_model.layers" in n for n in changed), "the policy did not change"
    for name, module in trl_run.frozen.items():
        now = _snapshot(module)
        for key, t in trl_run.before[name].items():
            assert torch.equal(t, now[key]), f"frozen {name} tensor {key} changed"
        assert not any(p.requires_grad for p in module.parameters()), name


def test_trl_steps_follow_the_same_dataset_schedule(trl_run: SimpleNamespace) -> None:
    records = _metrics(trl_run.out)
    assert [r["step"] for r in records] == [1, 2, 3]
    data = RLData(read_pairs(trl_run.cfg.data), B, trl_run.cfg.seed)
    assert [r["dataset"] for r in records] == [data.batch(i)[1] for i in range(3)]
    for r in records:
        assert r["pairs"] == B and r["prompts"] == 2 * B and r["trajectories"] == 2 * B * G
        for key in ("reward/total", "reward/format", "reward/process", "reward/outcome", "completion/length",
                    "time/generation", "time/reward_embedder", "time/reward_discriminator", "time/update",
                    "discriminator/accuracy", "reward/outcome/acc_frac/query", "trl/loss"):  # fmt: skip
            assert key in r, key
        assert r["time/generation"] > 0 and r["time/reward_embedder"] > 0 and r["time/update"] > 0
        assert 0 < r["completion/length"] <= trl_run.cfg.max_new_tokens
    assert "## step 2" in (trl_run.out / SAMPLES_FILE).read_text()


def test_trl_final_checkpoint_reloads_with_metadata(trl_run: SimpleNamespace) -> None:
    reasoner = Reasoner.from_pretrained(trl_run.final)
    assert type(reasoner.processor).__name__ == type(trl_run.models.policy.processor).__name__
    meta = json.loads((trl_run.final / RL_META_FILE).read_text())
    assert meta["reward"]["w_outcome"] == 0.8 and meta["num_generations"] == G
    # the prompt style (null in the config: the tiny backbone's) and the rollout decoding travel with the checkpoints
    assert reasoner.compact_prompts is True and reasoner.decoding.max_new_tokens == trl_run.cfg.max_new_tokens
    checkpoints = sorted((trl_run.out / "checkpoints").glob("checkpoint-*"))
    settings = read_reasoner_settings(trl_run.final)
    assert checkpoints and all(read_reasoner_settings(c) == settings for c in checkpoints)
    assert [json.loads((c / RL_META_FILE).read_text())["step"] for c in checkpoints] == [2, 3]  # every 2, the last
    after = trl_run.models.policy.model.state_dict()
    for key, t in reasoner.model.state_dict().items():
        assert torch.equal(t, after[key]), key


def test_trl_resume_continues_from_the_last_checkpoint(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path / "run", max_steps=2, save_every=1, max_new_tokens=8)
    train_rl_trl(cfg)
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()
    # A run killed after logging step 2, before its checkpoint: the resume redoes step 2 and logs it once.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint-2")
    resumed = make_cfg(tmp_path / "run", max_steps=3, save_every=1, max_new_tokens=8)  # max_steps may change
    train_rl_trl(resumed)
    steps = [r["step"] for r in _metrics(tmp_path / "run")]
    assert steps == [1, 2, 3], f"the resumed run redid or skipped steps: {steps}"
    # A used out/ is refused (before anything is loaded) unless resumed with the same config, or overwritten.
    with pytest.raises(ConfigError, match=re.escape(f"output folder is not empty ({tmp_path / 'run'})")):
        train_rl_trl(make_cfg(tmp_path / "run", max_steps=3, save_every=1, max_new_tokens=8, resume=False))
    with pytest.raises(ConfigError, match=r"config differs from the run being resumed in lr \("):
        train_rl_trl(make_cfg(tmp_path / "run", max_steps=3, save_every=1, max_new_tokens=8, lr=0.5))
    train_rl_trl(make_cfg(tmp_path / "run", max_steps=1, max_new_tokens=8, lr=0.5, resume=False, overwrite=True))
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1]


def test_dataset_blocks_are_whole_pairs_of_one_dataset(world: Path) -> None:
    data = RLData(read_pairs(world / "rl.jsonl"), B, seed=0)
    ds = build_trl_dataset(data, 4, compact=True)
    assert len(ds) == 4 * 2 * B
    for block in range(4):
        rows = [r for r in ds if r["block"] == block]
        _, dataset, pairs = data.batch(block)
        assert {r["dataset"] for r in rows} == {dataset}
        assert Counter((r["pair_id"], r["side"]) for r in rows) == {
            (p.pair_id, s): 1 for p in pairs for s in ("query", "target")
        }
    assert [r["block"] for r in ds] == sorted(r["block"] for r in ds)  # training order = step order
    video = [r for r in ds if r["n_frames"]]
    if video:
        assert len(video[0]["images"]) >= video[0]["n_frames"]  # frames travel as images


def _rewards(clock: StepClock, tmp_path: Path, layout: ProcessLayout | None = None) -> TRLRewards:
    def embed(side, texts, columns):
        return torch.nn.functional.normalize(torch.randn(len(texts), 4), dim=-1)

    cfg = RewardConfig.from_preset("paper", w_process=0.0)
    funcs = [lambda **kw: [1.0] * len(kw["completions"]), None, lambda **kw: [0.5] * len(kw["completions"])]
    return TRLRewards(funcs, cfg, 2, Timed(embed), Timed(lambda p: p), clock, [0], tmp_path, 0, 1, layout=layout)


def test_reward_call_rejects_a_batch_that_mixes_step_blocks(tmp_path: Path) -> None:
    fmt = _rewards(StepClock(), tmp_path).reward_funcs()[0]
    item = json.dumps({"id": "x", "text": "t"})
    cols = dict(pair_id=["a", "a", "a", "a", "b", "b", "b", "b"], side=["query"] * 2 + ["target"] * 2 + ["query"] * 2
                + ["target"] * 2, item=[item] * 8, dataset=["d"] * 8,
                trainer_state=SimpleNamespace(global_step=0))  # fmt: skip
    fmt(prompts=[""] * 8, completions=["x"] * 8, block=[0] * 8, **cols)  # one block: accepted
    with pytest.raises(ValueError, match="blocks"):
        fmt(prompts=[""] * 8, completions=["x"] * 8, block=[0] * 4 + [1] * 4, **cols)
    with pytest.raises(ValueError, match="datasets"):
        fmt(prompts=[""] * 8, completions=["x"] * 8, block=[0] * 8, **{**cols, "dataset": ["d"] * 4 + ["e"] * 4})
    with pytest.raises(ValueError, match="no target-side rollouts"):
        fmt(prompts=[""] * 2, completions=["x"] * 2, block=[0] * 2, dataset=["d"] * 2, pair_id=["a", "a"],
            side=["query", "query"], item=[item] * 2, trainer_state=SimpleNamespace(global_step=0))  # fmt: skip
    # The block must be the one this process is due: step s (global_step // k) of P processes -> s*P + rank.
    fmt(prompts=[""] * 8, completions=["x"] * 8, block=[3] * 8, **{**cols, "trainer_state": SimpleNamespace(
        global_step=3)})  # fmt: skip
    with pytest.raises(ValueError, match="process 0 of 1 got step block 2 where block 3 was due"):
        fmt(prompts=[""] * 8, completions=["x"] * 8, block=[2] * 8, **{**cols, "trainer_state": SimpleNamespace(
            global_step=3)})  # fmt: skip
    second = _rewards(StepClock(), tmp_path, ProcessLayout(rank=1, processes=2)).reward_funcs()[0]
    second(prompts=[""] * 8, completions=["x"] * 8, block=[7] * 8, **{**cols, "trainer_state": SimpleNamespace(
        global_step=3)})  # fmt: skip
    with pytest.raises(ValueError, match="process 1 of 2 got step block 6 where block 7 was due"):
        second(prompts=[""] * 8, completions=["x"] * 8, block=[6] * 8, **{**cols, "trainer_state": SimpleNamespace(
            global_step=3)})  # fmt: skip


def test_mixed_batch_processor_accepts_text_only_prompts(tiny_backbone_dir, tmp_path: Path) -> None:
    _, processor = load_backbone(tiny_backbone_dir("qwen3-vl"))
    wrapped = mixed_batch_processor(processor)
    img = Image.new("RGB", (64, 64), "red")
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}]
    texts = [processor.apply_chat_template(chat, tokenize=False), "plain text"]
    with pytest.raises(TypeError):
        processor(images=[[img], None], text=texts, padding=True, return_tensors="pt")
    got = wrapped(images=[[img], None], text=texts, padding=True, return_tensors="pt")
    want = processor(images=[[img], []], text=texts, padding=True, return_tensors="pt")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert type(wrapped).__name__ == type(processor).__name__ and type(processor) is not type(wrapped)
    wrapped.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == type(processor).__name__


def test_geometry_checks_batch_sizes(make_cfg, tmp_path: Path) -> None:
    geo = rl_step_geometry(make_cfg(tmp_path, pairs_per_step=4, num_generations=4, mini_batch_size=16,
                                    micro_batch_size=8))  # fmt: skip
    assert (geo.trajectories, geo.mini, geo.micro, geo.accumulation, geo.steps_per_generation) == (32, 16, 8, 2, 4)
    assert geo.optimizer_steps(ppo_epochs=2) == 4
    with pytest.raises(ValueError, match="must divide the 32"):
        rl_step_geometry(make_cfg(tmp_path, pairs_per_step=4, num_generations=4, mini_batch_size=12))
    with pytest.raises(ValueError, match="must divide mini_batch_size"):
        rl_step_geometry(make_cfg(tmp_path, pairs_per_step=4, num_generations=4, mini_batch_size=16,
                                  micro_batch_size=6))  # fmt: skip


def test_cli_rl_trl_with_lora_kl_and_ppo_minibatches(
    make_cfg, tmp_path: Path, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """LoRA (TRL's peft_config; the KL reference is the adapter-free base), beta > 0, 2 PPO epochs x 2 mini-batches
    of 2 micro-batches: micro-batches of text-only prompts occur and must run. The console (issue 21) gets one step
    line per RL step (not one per optimiser step) and no TRL metric dict; those go to train.log."""
    cfg = make_cfg(tmp_path)
    args = ["rl", "--reasoner", cfg.reasoner, "--embedder", cfg.embedder, "--data", cfg.data, "--out", str(tmp_path),
            "--num_generations", "2", "--pairs_per_step", "2", "--max_steps", "1", "--max_new_tokens", "8",
            "--compact_prompts", "true", "--lora", "4", "--beta", "0.01", "--ppo_epochs", "2",
            "--mini_batch_size", "4", "--micro_batch_size", "2"]  # fmt: skip
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    out, err = capfd.readouterr()
    assert out.strip().splitlines() == [f"EG-RL Reasoner written to {tmp_path / 'final'}"]
    assert "{'loss'" not in out + err and "'loss':" not in err and "Warning" not in out + err
    console = [r.getMessage() for r in caplog.records if r.name.startswith("embedrl")]
    assert [line.split(":")[0] for line in console if line.startswith("step ")] == ["step 1/1 " + json.loads(
        (tmp_path / METRICS_FILE).read_text())["dataset"]]  # fmt: skip
    assert not [r for r in caplog.records if r.name.startswith(("trl", "transformers", "py.warnings"))]
    log = (tmp_path / TRAIN_LOG_FILE).read_text()
    assert log.count("TRL logs at optimiser step 4: {'loss': ") == 1 and "step 1/1 " in log
    record = json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[-1])
    assert record["step"] == 1 and "trl/kl" in record and record["trl/kl"] == record["trl/kl"]  # finite, not NaN
    model, _ = load_backbone(tmp_path / "final")  # LoRA merged: a plain checkpoint
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_rewards_can_use_the_project_server_as_embedder_and_discriminator(
    tiny_backbone_dir, embedder_dir: Path, world: Path
) -> None:
    """EG-RL's reward models behind `embedrl serve`: the same vectors as the in-process Embedder (pixels, T-CoT and
    evidence crops included) and the same greedy Discriminator replies as the in-process chat model."""
    from embedrl.serve.server import create_app, serve_in_background

    pairs = [p for p in read_pairs(world / "rl.jsonl") if p.target.images][:3]
    items = [p.target for p in pairs]
    tcots = ['<thinking>A cue. {"bbox_2d": [0, 0, 500, 500]}</thinking><rethink>Yes.</rethink><answer>A red '
             'square.</answer>'] * len(items)  # fmt: skip
    embedder = Embedder.load(embedder_dir)
    chat = Reasoner.from_pretrained(tiny_backbone_dir("qwen3-vl"), compact_prompts=True)
    want = EmbedderReward(embedder)("target", tcots, {"item": items})
    prompts = ["Pick 1 or 2.", "Which candidate matches? Answer with a number."]
    want_replies = ChatDiscriminator(chat, max_new_tokens=4)(prompts)
    app = create_app(ServeConfig(max_wait_ms=0.0), embedder=embedder, chat_model=chat)
    with serve_in_background(app) as base:
        got = EndpointEmbedderReward(base + "/v1", "embedder", batch_size=2)("target", tcots, {"item": items})
        replies = EndpointDiscriminator(base + "/v1", "chat", max_new_tokens=4)(prompts)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    assert replies == want_replies


def _lucky_mass(reasoner_dir: str | Path, pairs: list, lucky: torch.Tensor) -> float:
    """Mean probability, over both sides of ``pairs``, that the policy's first reply token is a lucky id."""
    policy = Reasoner.from_pretrained(reasoner_dir)
    prompts = [
        build_reasoner_prompt(p.query, "query", p.target.modality, compact=True) for p in pairs
    ] + [build_reasoner_prompt(p.target, "target", None, compact=True) for p in pairs]  # fmt: skip
    with torch.no_grad():
        mass = [policy.model(**policy.chat_inputs([pr])).logits[0, -1].softmax(-1)[lucky].sum() for pr in prompts]
    return float(torch.stack(mass).mean())


def test_trl_grpo_moves_the_policy_toward_higher_reward(
    make_cfg, world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end through the EG-RL wiring (step blocks, reward keys, weights, TRL's advantages and update): with a
    reward that pays for reply tokens from a fixed half of the vocabulary, a few GRPO steps must raise the policy's
    probability of those tokens. A reward scattered to the wrong trajectories, or a flipped sign, fails this."""
    cfg = make_cfg(tmp_path / "rl", w_format=1.0, w_process=0.0, w_outcome=0.0, temperature=1.0, max_steps=12,
                   lr=1e-2, save_every=12, log_every=5)  # fmt: skip
    # The lucky half of the vocabulary: the ids whose output-embedding rows point along one random direction, so
    # the policy can reach all of them at once by moving its final hidden state.
    head = Reasoner.from_pretrained(cfg.reasoner).model.get_output_embeddings()
    direction = torch.randn(head.weight.shape[1], generator=torch.Generator().manual_seed(0))  # [d]
    lucky = head.weight.detach() @ direction > 0  # [V]
    build = grpo_trl_module.build_reward_funcs

    def lucky_share(prompts, completions, completion_ids, **columns) -> list[float]:
        return [float(lucky[torch.tensor(ids)].float().mean()) if ids else 0.0 for ids in completion_ids]

    def patched(cfg, embed, discriminator, **kw):
        funcs, weights = build(cfg, embed, discriminator, **kw)
        return [lucky_share, *funcs[1:]], weights

    monkeypatch.setattr(grpo_trl_module, "build_reward_funcs", patched)  # where train_rl_trl looks it up
    final = train_rl_trl(cfg)
    pairs = read_pairs(world / "rl.jsonl")[:4]
    before = _lucky_mass(cfg.reasoner, pairs, lucky)
    after = _lucky_mass(final, pairs, lucky)
    assert after > before + 0.05, (before, after)
    assert [r["step"] for r in _metrics(tmp_path / "rl")] == [5, 10, 12]  # log_every 5, and the last step


def test_trl_run_drops_overlong_video_pairs_before_batching_and_reports_them(
    make_cfg, video_heavy_set, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A video-heavy set (8 frames of 16 visual tokens vs one 16-token image) with a limit between the two: every
    video pair is dropped before batching, counted per dataset in the log and in each step's metrics."""
    light = dict(w_process=0.0, max_new_tokens=4, sample_table_every=0, save_every=100)
    models = load_models(make_cfg(tmp_path / "probe", **light))
    data, limit, _ = video_heavy_set(tmp_path, models.policy)

    cfg = make_cfg(tmp_path / "run", data=str(data), max_prompt_tokens=limit, max_steps=3, **light)
    with caplog.at_level(logging.INFO, logger="embedrl.train.rl_data"):
        train_rl_trl(cfg, models=models)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped ")] == [
        f"dropped 4 of 4 pairs of clips: prompt > max_prompt_tokens ({limit})",
        f"dropped 0 of 4 pairs of photos: prompt > max_prompt_tokens ({limit})",
        f"dropped 4 of 6 pairs of video_mix: prompt > max_prompt_tokens ({limit})",
    ]
    records = _metrics(tmp_path / "run")
    # 2 video_mix pairs and 4 photos pairs are left: 3 whole batches of B, and no clips batch at all
    assert sorted(r["dataset"] for r in records) == ["photos", "photos", "video_mix"]
    for r in records:
        assert r["pairs"] == B and r["data/dropped_prompt_tokens"] == {"photos": 0, "video_mix": 4}[r["dataset"]]


# ----------------------------------------------------------------------------------------------------------------
# Every GRPOTrainConfig key reaches TRL, the rewards or the data path (issue 18 point 2)
# ----------------------------------------------------------------------------------------------------------------

# A value other than make_cfg's for every key routed to a GRPOConfig argument (make_cfg with micro_batch_size=2).
ROUTED_VALUES = {
    "seed": 7, "num_generations": 4, "pairs_per_step": 4, "ppo_epochs": 2, "mini_batch_size": 4,
    "micro_batch_size": 4, "scale_advantages": False, "clip_eps": 0.3, "beta": 0.05, "lr": 1e-4, "weight_decay": 0.1,
    "max_grad_norm": 0.0, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 32, "gradient_checkpointing": True,
    "use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": "http://vllm:8000",
    "vllm_gpu_memory_utilization": 0.5, "vllm_tensor_parallel_size": 2, "dtype": "bfloat16", "device": "cuda",
    "save_every": 3, "report_to": ["tensorboard"],
}  # fmt: skip


def _consumers() -> dict[str, Any]:
    from embedrl.cli import configure_stage_threads
    from embedrl.train import grpo_trl, rl_models, rl_outputs

    return {"load_models": rl_models.load_models, "reward_embedder": rl_models.reward_embedder,
            "rollout_decoding": rl_models.rollout_decoding, "process_device": rl_models.process_device,
            "rl_meta": rl_outputs.rl_meta, "check_rl_run_dir": rl_outputs.check_rl_run_dir,
            "train_rl_trl": grpo_trl.train_rl_trl, "grpo_args": grpo_trl.grpo_args,
            "reward_config": GRPOTrainConfig.reward_config,
            "configure_stage_threads": configure_stage_threads}  # fmt: skip


def test_every_config_key_is_routed_into_the_engine(make_cfg, tmp_path: Path) -> None:
    """CONFIG_ROUTES names every GRPOTrainConfig field (a new field fails here until it is routed, or removed into
    REMOVED_KEYS); each key routed to a GRPOConfig argument changes that argument, and each function named as a
    consumer reads the key."""
    fields = {f.name for f in dataclasses.fields(GRPOTrainConfig)}
    assert set(CONFIG_ROUTES) == fields, f"unrouted: {sorted(fields - set(CONFIG_ROUTES))}"
    assert not set(GRPOTrainConfig.REMOVED_KEYS) & fields
    base = make_cfg(tmp_path, micro_batch_size=2)
    args = grpo_args(base, total=3)
    routed = {key: [r.split(".", 1)[1] for r in routes if r.startswith("GRPOConfig.")] for key, routes in
              CONFIG_ROUTES.items()}  # fmt: skip
    assert {key for key, targets in routed.items() if targets} == set(ROUTED_VALUES)
    for key, value in ROUTED_VALUES.items():
        changed = grpo_args(dataclasses.replace(base, **{key: value}), total=3)
        for target in routed[key]:
            assert getattr(changed, target) != getattr(args, target), f"{key} does not reach GRPOConfig.{target}"
    consumers = _consumers()
    for key, routes in CONFIG_ROUTES.items():
        for name in (r for r in routes if not r.startswith("GRPOConfig.")):
            source = inspect.getsource(consumers[name])
            assert re.search(rf"\.{key}\b", source), f"{name} does not read {key}"


def test_trl_args_pass_through_and_refuse_unknown_or_derived_arguments(make_cfg, tmp_path: Path) -> None:
    args = grpo_args(make_cfg(tmp_path, trl_args={"repetition_penalty": 1.1, "vllm_enable_sleep_mode": True}), 2)
    assert args.repetition_penalty == 1.1 and args.vllm_enable_sleep_mode is True
    with pytest.raises(ConfigError, match=r"trl_args: \['no_such_arg'\] are not arguments of TRL's GRPOConfig"):
        grpo_args(make_cfg(tmp_path, trl_args={"no_such_arg": 1}), 2)
    with pytest.raises(ConfigError, match=r"trl_args sets beta \(set beta\), learning_rate \(set lr\), which"):
        grpo_args(make_cfg(tmp_path, trl_args={"learning_rate": 1.0, "beta": 0.5}), 2)
    with pytest.raises(ConfigError, match="trl_args sets shuffle_dataset, which embedrl derives"):
        grpo_args(make_cfg(tmp_path, trl_args={"shuffle_dataset": True}), 2)
    with pytest.raises(ConfigError, match=r"GRPOConfig refuses the settings \(check trl_args\)"):
        grpo_args(make_cfg(tmp_path, trl_args={"log_completions_hub_repo": "me/x"}), 2)  # needs log_completions


# ----------------------------------------------------------------------------------------------------------------
# TRL's loss is the method's objective (docs/method.md §4.2; embedrl.train.grpo_math is the reference)
# ----------------------------------------------------------------------------------------------------------------


def test_trl_loss_equals_the_reference_grpo_objective(make_cfg, tmp_path: Path) -> None:
    """GRPOTrainer's loss (loss_type dapo, epsilon, beta as grpo_args sets them) on a fixed batch equals grpo_loss
    (clipped ratio, k3 KL, token mean) on the same log-probs, with ratios far enough from 1 that the clip acts.
    It calls TRL's internal ``_compute_loss``: a TRL upgrade that changes the objective (or that method) fails here."""
    from datasets import Dataset

    from embedrl.train.grpo_math import grpo_loss

    cfg = make_cfg(tmp_path, beta=0.04, clip_eps=0.2, micro_batch_size=2)
    policy = Reasoner.from_pretrained(cfg.reasoner)
    trainer = GRPOTrainer(
        model=policy.model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)] * 3,
        args=grpo_args(cfg, total=1), train_dataset=Dataset.from_list([{"prompt": "x"}] * 8),
        processing_class=policy.processor,
    )  # fmt: skip
    model = trainer.model.eval()  # eval: the loss is the plain token mean over the batch (no accumulation scaling)
    gen = torch.Generator().manual_seed(0)
    n, prompt_len, width = 4, 5, 6
    vocab = model.get_output_embeddings().weight.shape[0]
    prompt_ids = torch.randint(10, 200, (n, prompt_len), generator=gen)
    completion_ids = torch.randint(10, min(vocab, 200), (n, width), generator=gen)
    mask = torch.ones(n, width, dtype=torch.long)
    mask[1, 4:] = 0  # padded responses of different lengths
    mask[3, 2:] = 0
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], 1), torch.ones(n, prompt_len + width, dtype=torch.long),
            width,
        )  # fmt: skip
    old = logp + 0.5 * torch.randn(logp.shape, generator=gen)  # ratios well outside [0.8, 1.2]
    ref = logp + 0.3 * torch.randn(logp.shape, generator=gen)
    adv = torch.tensor([1.0, -0.5, 0.25, -1.5])
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": mask, "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}  # fmt: skip
    with torch.no_grad():
        got = trainer._compute_loss(model, inputs)
        want, stats = grpo_loss(logp, old, ref, adv, mask, eps_clip=cfg.clip_eps, beta=cfg.beta)
    assert 0.05 < float(stats["clipfrac"]) < 0.95, "the batch must exercise the clip"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Two processes (torch.distributed, gloo on CPU): each rewards whole pairs of its own step block
# ----------------------------------------------------------------------------------------------------------------

TWO_PROCESS_WORKER = """
import json, sys
from pathlib import Path
from accelerate import PartialState
from embedrl.config import GRPOTrainConfig
from embedrl.train.grpo_trl import train_rl_trl

cfg = GRPOTrainConfig(**json.loads(Path(sys.argv[1]).read_text()))
rows = []

def on_step(batch):
    rows.append({"step": batch.step, "block": batch.block, "dataset": batch.dataset, "texts": batch.texts,
                 "keys": [list(k) for k in batch.keys], "items": [it.to_record() for it in batch.items],
                 "completion_ids": batch.completion_ids, "components": batch.components})

train_rl_trl(cfg, on_step=on_step)
rank = PartialState().process_index
(Path(cfg.out) / f"rollouts-rank{rank}.json").write_text(json.dumps(rows))
"""


@pytest.mark.slow
def test_two_processes_reward_their_own_blocks_as_one_process_would(make_cfg, world: Path, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2`` (gloo, CPU), one RL step: process k scores step block k (whole pairs of one
    dataset, the batch the 1-process run takes at step k + 1), the metrics line merges both blocks, and every reward
    equals what one process computes for the same rollouts."""
    import os
    import subprocess
    import sys

    cfg = make_cfg(tmp_path / "run", max_steps=1, max_new_tokens=8, save_every=5, sample_table_every=1)
    spec = tmp_path / "cfg.json"
    spec.write_text(json.dumps(dataclasses.asdict(cfg)))
    worker = tmp_path / "worker.py"
    worker.write_text(TWO_PROCESS_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run([*launch, str(worker), str(spec)], env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    out = Path(cfg.out)
    ranks = [json.loads((out / f"rollouts-rank{r}.json").read_text()) for r in range(2)]
    data = RLData(read_pairs(cfg.data), B, cfg.seed)
    for rank, rows in enumerate(ranks):
        (row,) = rows
        _, dataset, pairs = data.batch(rank)  # the 1-process run's step rank + 1
        assert row["step"] == 1 and row["block"] == rank and row["dataset"] == dataset
        assert Counter(tuple(k[:2]) for k in row["keys"]) == {
            (p.pair_id, s): G for p in pairs for s in ("query", "target")
        }
    assert not {k[0] for k in ranks[0][0]["keys"]} & {k[0] for k in ranks[1][0]["keys"]}
    (record,) = _metrics(out)
    assert record["processes"] == 2 and record["trajectories"] == 2 * 2 * B * G
    assert record["dataset"] == ",".join(data.batch(r)[1] for r in range(2))
    # The same rollouts scored in this one process, through the engine's reward functions.
    models = load_models(cfg)
    reward_cfg = cfg.reward_config()
    funcs, _ = build_reward_funcs(reward_cfg, Timed(reward_embedder(cfg, models)), Timed(models.discriminator),
                                  num_generations=G, seed=cfg.seed)  # fmt: skip
    prompt_rows = {(r["pair_id"], r["side"]): r for r in build_trl_dataset(data, 2, models.policy.compact_prompts)}
    for rank, (row,) in enumerate(ranks):
        # Scored here alone, as the process that is due block `rank` at step 0 (the Discriminator's shuffles are
        # seeded by the step, so the step is the 2-process run's).
        rewards = TRLRewards(funcs, reward_cfg, G, Timed(lambda *a: None), Timed(lambda *a: None), StepClock(), [0],
                             tmp_path, 0, 1, layout=ProcessLayout(rank, 2)).reward_funcs()  # fmt: skip
        rows = [prompt_rows[tuple(k[:2])] for k in row["keys"]]
        columns = {name: [r[name] for r in rows] for name in ("pair_id", "side", "dataset", "block", "cue_key",
                                                               "n_frames", "input_text", "item")}  # fmt: skip
        columns.update(completion_ids=row["completion_ids"], trainer_state=SimpleNamespace(global_step=0))
        assert [json.loads(x) for x in columns["item"]] == row["items"]
        for name, fn in zip(COMPONENTS, rewards, strict=True):
            got = fn(prompts=[""] * len(row["texts"]), completions=row["texts"], **dict(columns))
            if name in row["components"]:
                np.testing.assert_allclose(got, row["components"][name], rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("name", ["rl.yaml", "rl-tiny.yaml", "rl-paper-8b.yaml", "rl-paper-8b-vllm-server.yaml"])
def test_shipped_rl_configs_build_their_grpo_config(name: str, tmp_path: Path) -> None:
    """The shipped configs (the paper-scale ones are untested on GPUs here) give TRL a valid GRPOConfig: vLLM mode,
    precision, their trl_args, and one process's generation batch = one step block (device cpu: TrainingArguments
    refuses bf16 on a GPU it cannot see)."""
    path = Path(__file__).resolve().parents[1] / "configs" / name
    cfg = load_config(GRPOTrainConfig, path, {"out": str(tmp_path), "device": "cpu"})
    args = grpo_args(cfg, total=10)
    assert (args.use_vllm, args.vllm_mode, args.bf16) == (cfg.use_vllm, cfg.vllm_mode, cfg.dtype == "bfloat16")
    assert all(getattr(args, key) == value for key, value in cfg.trl_args.items())
    assert args.per_device_train_batch_size * args.steps_per_generation == 2 * cfg.pairs_per_step * cfg.group_size
    assert args.shuffle_dataset is False and args.loss_type == "dapo" and args.use_bias_correction_kl is False
