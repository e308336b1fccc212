"""EG-RL on TRL's GRPOTrainer (engine 'trl'): step blocks, reward checks, frozen reward models, metrics, resume."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import embedrl.train.grpo_trl as grpo_trl_module
from embedrl.backbones import load_backbone, read_reasoner_settings
from embedrl.cli import main
from embedrl.config import ConfigError, GRPOTrainConfig, RewardConfig, ServeConfig, WorldConfig
from embedrl.data.schema import Item, Pair, read_pairs
from embedrl.models.embedder import Embedder
from embedrl.models.reasoner import Reasoner, build_reasoner_prompt
from embedrl.rewards.judges import ChatDiscriminator, EmbedderReward, EndpointDiscriminator, EndpointEmbedderReward
from embedrl.train.grpo import (
    METRICS_FILE,
    RL_META_FILE,
    SAMPLES_FILE,
    RLData,
    Timed,
    load_models,
    pair_prompts,
    prompt_lengths,
)
from embedrl.train.grpo_trl import (
    StepClock,
    TRLRewards,
    build_trl_dataset,
    mixed_batch_processor,
    rl_step_geometry,
    train_rl_trl,
)
from embedrl.world.generate import generate_world

G, B = 2, 2


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_world(WorldConfig(out=str(tmp_path_factory.mktemp("world")), size="tiny", seed=0))


@pytest.fixture(scope="module")
def embedder_dir(tiny_backbone_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("embedder")
    Embedder.from_backbone(tiny_backbone_dir("qwen3-vl")).save(out)
    return out


@pytest.fixture(scope="module")
def make_cfg(tiny_backbone_dir, embedder_dir: Path, world: Path):
    def make(out: Path, **kw) -> GRPOTrainConfig:
        base = dict(
            engine="trl", reasoner=str(tiny_backbone_dir("qwen3-vl")), embedder=str(embedder_dir),
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
    models = load_models(cfg, reference=False, lora=False)
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


def _rewards(clock: StepClock, tmp_path: Path) -> TRLRewards:
    def embed(side, texts, columns):
        return torch.nn.functional.normalize(torch.randn(len(texts), 4), dim=-1)

    cfg = RewardConfig.from_preset("paper", w_process=0.0)
    funcs = [lambda **kw: [1.0] * len(kw["completions"]), None, lambda **kw: [0.5] * len(kw["completions"])]
    return TRLRewards(funcs, cfg, 2, Timed(embed), Timed(lambda p: p), clock, [0], tmp_path, 0, 1)


def test_reward_call_rejects_a_batch_that_mixes_step_blocks(tmp_path: Path) -> None:
    fmt = _rewards(StepClock(), tmp_path).reward_funcs()[0]
    item = json.dumps({"id": "x", "text": "t"})
    cols = dict(pair_id=["a", "a", "a", "a", "b", "b", "b", "b"], side=["query"] * 2 + ["target"] * 2 + ["query"] * 2
                + ["target"] * 2, item=[item] * 8, dataset=["d"] * 8)  # fmt: skip
    fmt(prompts=[""] * 8, completions=["x"] * 8, block=[0] * 8, **cols)  # one block: accepted
    with pytest.raises(ValueError, match="blocks"):
        fmt(prompts=[""] * 8, completions=["x"] * 8, block=[0] * 4 + [1] * 4, **cols)
    with pytest.raises(ValueError, match="datasets"):
        fmt(prompts=[""] * 8, completions=["x"] * 8, block=[0] * 8, **{**cols, "dataset": ["d"] * 4 + ["e"] * 4})
    with pytest.raises(ValueError, match="no target-side rollouts"):
        fmt(prompts=[""] * 2, completions=["x"] * 2, block=[0] * 2, dataset=["d"] * 2, pair_id=["a", "a"],
            side=["query", "query"], item=[item] * 2)  # fmt: skip


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


def test_cli_rl_trl_with_lora_kl_and_ppo_minibatches(make_cfg, tmp_path: Path) -> None:
    """LoRA (TRL's peft_config; the KL reference is the adapter-free base), beta > 0, 2 PPO epochs x 2 mini-batches
    of 2 micro-batches: micro-batches of text-only prompts occur and must run."""
    cfg = make_cfg(tmp_path)
    args = ["rl", "--reasoner", cfg.reasoner, "--embedder", cfg.embedder, "--data", cfg.data, "--out", str(tmp_path),
            "--num_generations", "2", "--pairs_per_step", "2", "--max_steps", "1", "--max_new_tokens", "8",
            "--compact_prompts", "true", "--engine", "trl", "--lora", "4", "--beta", "0.01", "--ppo_epochs", "2",
            "--mini_batch_size", "4", "--micro_batch_size", "2"]  # fmt: skip
    assert main(args) == 0
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
                   lr=1e-2, save_every=12)  # fmt: skip
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


def test_trl_run_drops_overlong_video_pairs_before_batching_and_reports_them(
    make_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A video-heavy set (8 frames of 16 visual tokens vs one 16-token image) with a limit between the two: every
    video pair is dropped before batching, counted per dataset in the log and in each step's metrics."""
    rng = np.random.default_rng(0)

    def picture(name: str) -> str:
        path = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(path)
        return str(path)

    def video(name: str) -> Item:
        return Item(id=name, frames=tuple(picture(f"{name}-{k}") for k in range(8)), instruction="Which action?")

    def photo(name: str) -> Item:
        return Item(id=name, images=(picture(name),), instruction="Which object?")

    pairs = [Pair("video_mix", f"m{i}", video(f"m{i}q"), Item(id=f"m{i}t", text=f"label {i}")) for i in range(4)]
    pairs += [Pair("video_mix", f"m{i}", photo(f"m{i}q"), Item(id=f"m{i}t", text=f"label {i}")) for i in (4, 5)]
    pairs += [Pair("clips", f"c{i}", Item(id=f"c{i}q", text=f"clip {i}"), video(f"c{i}t")) for i in range(4)]
    pairs += [Pair("photos", f"p{i}", photo(f"p{i}q"), Item(id=f"p{i}t", text=f"photo {i}")) for i in range(4)]
    data = tmp_path / "video_heavy.jsonl"
    data.write_text("".join(json.dumps(p.to_record()) + "\n" for p in pairs))
    light = dict(w_process=0.0, max_new_tokens=4, sample_table_every=0, save_every=100)
    models = load_models(make_cfg(tmp_path / "probe", **light), reference=False, lora=False)
    policy = models.policy
    lengths = prompt_lengths(policy, [pr for p in pairs for _, pr, _ in pair_prompts(p, policy.compact_prompts)])
    longest = [max(lengths[2 * i], lengths[2 * i + 1]) for i in range(len(pairs))]
    video_pairs = [bool(p.query.frames or p.target.frames) for p in pairs]
    limit = max(n for n, v in zip(longest, video_pairs, strict=True) if not v)
    assert min(n for n, v in zip(longest, video_pairs, strict=True) if v) > limit + 80

    cfg = make_cfg(tmp_path / "run", data=str(data), max_prompt_tokens=limit, max_steps=3, **light)
    with caplog.at_level(logging.INFO, logger="embedrl.train.grpo"):
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
