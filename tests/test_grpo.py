"""EG-RL loop on tiny models: frozen reward models, same-dataset whole-pair batches, metrics, resume, CLI."""

from __future__ import annotations

import http.server
import importlib.util
import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import GenerationConfig

from embedrl.backbones import load_backbone, read_reasoner_settings
from embedrl.cli import main
from embedrl.config import ConfigError, GRPOTrainConfig, WorldConfig
from embedrl.data.schema import Item, Pair, read_pairs
from embedrl.models.embedder import Embedder
from embedrl.models.reasoner import Reasoner
from embedrl.rewards.judges import EmbedderReward, EndpointDiscriminator
from embedrl.rewards.terms import RolloutKey
from embedrl.train.embedder import latest_checkpoint
from embedrl.train.grpo import (
    METRICS_FILE,
    RL_META_FILE,
    SAMPLES_FILE,
    RLData,
    RolloutBatch,
    check_step_batch,
    completion_logprobs,
    load_models,
    pair_prompts,
    prompt_lengths,
    screen_prompts,
    step_batches,
    step_line,
    train_rl,
)
from embedrl.world.generate import generate_world

G, B = 2, 2


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_world(WorldConfig(out=str(tmp_path_factory.mktemp("world")), size="tiny", seed=0))


@pytest.fixture(scope="module")
def embedder_dir(tiny_backbone_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The frozen reward model: the tiny backbone with <emb>, saved as an Embedder (untrained is enough here)."""
    out = tmp_path_factory.mktemp("embedder")
    Embedder.from_backbone(tiny_backbone_dir("qwen3-vl")).save(out)
    return out


@pytest.fixture(scope="module")
def make_cfg(tiny_backbone_dir, embedder_dir: Path, world: Path, torch_device: str, torch_dtype):
    def make(out: Path, **kw) -> GRPOTrainConfig:
        base = dict(
            reasoner=str(tiny_backbone_dir("qwen3-vl")), embedder=str(embedder_dir), data=str(world / "rl.jsonl"),
            out=str(out), seed=0, num_generations=G, pairs_per_step=B, max_steps=3, max_new_tokens=24,
            discriminator_max_new_tokens=4, lr=1e-3, beta=0.01, save_every=2,
            sample_table_every=2, micro_batch_size=8,
            # Outcome-heavy fractional Acc: a random Embedder still gives the groups unequal rewards.
            w_outcome=0.8, w_process=0.2, acc_mode="fraction", device=torch_device,
            dtype=str(torch_dtype).removeprefix("torch."),
        )  # fmt: skip
        base.update(kw)
        return GRPOTrainConfig(**base)

    return make


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


@pytest.fixture(scope="module")
def full_run(make_cfg, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 3-step run (beta > 0, so the reference model is used too), with every model snapshot before it."""
    cfg = make_cfg(tmp_path_factory.mktemp("rl-full"))
    models = load_models(cfg)
    frozen = {"embedder": models.embedder.model, "discriminator": models.discriminator_model,
              "reference": models.reference}  # fmt: skip
    before = {name: _snapshot(m) for name, m in {**frozen, "policy": models.policy.model}.items()}
    steps: list[tuple[int, dict, RolloutBatch]] = []
    final = train_rl(cfg, models=models, on_step=lambda step, record, batch: steps.append((step, record, batch)))
    return SimpleNamespace(cfg=cfg, models=models, frozen=frozen, before=before, steps=steps, final=final)


def test_policy_trains_and_reward_models_stay_frozen(full_run: SimpleNamespace) -> None:
    policy = full_run.models.policy.model
    after = _snapshot(policy)
    changed = [name for name, t in full_run.before["policy"].items() if not torch.equal(t, after[name])]
    assert len(changed) >= len(after) // 2, f"only {len(changed)} of {len(after)} policy tensors changed"
    assert any("language_model.layers" in n for n in changed) and any(".visual." in n for n in changed)
    for name, module in full_run.frozen.items():
        assert module is not None and module is not policy, name
        now = _snapshot(module)
        assert now.keys() == full_run.before[name].keys()
        for key, t in full_run.before[name].items():
            assert torch.equal(t, now[key]), f"frozen {name} tensor {key} changed"
        assert not any(p.requires_grad for p in module.parameters()), name
    policy_ids = {id(p) for p in policy.parameters()}
    for module in full_run.frozen.values():
        assert policy_ids.isdisjoint(id(p) for p in module.parameters())


def test_every_step_is_whole_pairs_of_one_dataset(full_run: SimpleNamespace) -> None:
    assert [s for s, _, _ in full_run.steps] == [1, 2, 3]
    datasets = []
    for _, record, batch in full_run.steps:
        assert len(batch.pairs) == B and record["pairs"] == B and record["trajectories"] == 2 * B * G
        assert {p.dataset for p in batch.pairs} == {batch.dataset} == {record["dataset"]}
        groups = Counter(k[:2] for k in batch.keys)
        assert groups == {(p.pair_id, side): G for p in batch.pairs for side in ("query", "target")}
        assert sorted(k.rollout for k in batch.keys if k[:2] == batch.keys[0][:2]) == list(range(G))
        datasets.append(batch.dataset)
    data = RLData.from_jsonl(full_run.cfg.data, B, full_run.cfg.seed)  # the loop's own schedule, replayed
    assert datasets == [data.batch(i)[1] for i in range(3)]


def test_update_logprobs_equal_the_sampling_distribution(tiny_backbone_dir, world: Path) -> None:
    """The update's forward (prompt re-processed with its pixels, response appended) reproduces generate's logits,
    for a batch mixing a video-frame prompt and image prompts, and for any subset of its rows."""

    policy = Reasoner.from_pretrained(tiny_backbone_dir("qwen3-vl"), compact_prompts=True)
    pairs = read_pairs(world / "rl.jsonl")
    pairs = [next(p for p in pairs if p.dataset == d) for d in ("world_moment", "world_vqa")]
    prompts = [pr for p in pairs for _, pr, _ in pair_prompts(p, compact=True)]
    inputs = policy.chat_inputs(prompts)
    torch.manual_seed(0)
    out = policy.model.generate(
        **inputs,
        generation_config=GenerationConfig(do_sample=True, top_k=None, max_new_tokens=8, num_return_sequences=G,
                                           output_logits=True, return_dict_in_generate=True, eos_token_id=[],
                                           pad_token_id=0),
    )  # fmt: skip
    ids = out.sequences[:, inputs["input_ids"].shape[1] :]  # [4·G, 8]: no EOS, so every token counts
    sampled = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    rows = [pr for pr in prompts for _ in range(G)]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logp, entropy = completion_logprobs(policy.model, policy, rows, ids, mask, temperature=1.0)
        sub, _ = completion_logprobs(policy.model, policy, [rows[5], rows[0]], ids[[5, 0]], mask[[5, 0]], 1.0)
    torch.testing.assert_close(logp, sampled, rtol=0, atol=1e-4)
    torch.testing.assert_close(sub, sampled[[5, 0]], rtol=0, atol=1e-4)
    assert entropy.shape == ids.shape and bool((entropy > 0).all())


def test_step_batches_are_same_dataset_drop_last_and_seeded() -> None:
    sizes = {"a": 5, "b": 4, "c": 1}
    batches = step_batches(sizes, 2, seed=3, epoch=0)
    assert len(batches) == 2 + 2  # drop-last: a gives 2 batches, b 2, c none
    for name in ("a", "b"):
        idx = [i for d, ix in batches if d == name for i in ix]
        assert len(idx) == len(set(idx)) == 2 * (sizes[name] // 2) and all(0 <= i < sizes[name] for i in idx)
    assert all(len(ix) == 2 for _, ix in batches)
    assert step_batches(sizes, 2, seed=3, epoch=0) == batches  # seed + epoch fixes the epoch
    epochs = [step_batches({"a": 40, "b": 40}, 2, seed=3, epoch=e) for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]
    assert {d for d, _ in epochs[0][:10]} == {"a", "b"}  # batch order is shuffled across datasets


def _toy_batch(datasets: list[str]) -> RolloutBatch:
    pairs = [Pair(d, f"p{i}", Item(id=f"q{i}", text="q"), Item(id=f"t{i}", text="t")) for i, d in enumerate(datasets)]
    keys = [RolloutKey(p.pair_id, s, g) for p in pairs for s in ("query", "target") for g in range(G)]
    n = len(keys)
    z = torch.zeros(n, 1, dtype=torch.long)
    return RolloutBatch(
        1, datasets[0], pairs, keys, [None] * n, [None] * n, z, z, [""] * n, torch.zeros(n, dtype=bool)
    )


def test_check_step_batch_rejects_mixed_datasets_and_broken_groups() -> None:
    check_step_batch(_toy_batch(["d", "d"]), G)
    with pytest.raises(ValueError, match="mixes datasets"):
        check_step_batch(_toy_batch(["d", "e"]), G)
    broken = _toy_batch(["d", "d"])
    broken.keys = broken.keys[:-1]  # one target-side rollout missing
    with pytest.raises(ValueError, match="rollouts"):
        check_step_batch(broken, G)


def test_metrics_sample_table_and_final_checkpoint(full_run: SimpleNamespace) -> None:
    out = Path(full_run.cfg.out)
    rows = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for name in ("format", "process", "outcome", "total"):
            for side in ("query", "target"):
                assert np.isfinite(r[f"reward/{name}/{side}"]), (name, side)
        for key in ("time/generation", "time/reward_embedder", "time/reward_discriminator", "time/update"):
            assert r[key] > 0, key
        assert 0 <= r["discriminator/accuracy"] <= 1 and r["discriminator/chance"] == pytest.approx(G / (G + B - 1))
        assert r["completion/length/query"] > 0 and np.isfinite(r["grpo/kl"]) and r["grpo/optimizer_steps"] == 1
        assert r["dataset"] and r["pairs"] == B and r["evidence/per_tcot/query"] >= 0
    assert rows[0]["grpo/kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert rows[-1]["grpo/kl"] > 0
    samples = (out / SAMPLES_FILE).read_text()
    assert "## step 2" in samples and "| pair | side | g |" in samples
    meta = json.loads((full_run.final / RL_META_FILE).read_text())
    assert meta["embedder"] == full_run.cfg.embedder and meta["reward"]["w_outcome"] == 0.8 and meta["step"] == 3
    assert (full_run.final / "model.safetensors").is_file() and (full_run.final / "train_config.json").is_file()
    # compact_prompts null: the tiny backbone's style; final/ and every checkpoint record it and the rollout decoding
    assert full_run.cfg.compact_prompts is None and full_run.models.policy.compact_prompts is True
    settings = read_reasoner_settings(full_run.final)
    decoding = {"greedy": False, "max_new_tokens": 24, "temperature": 1.0, "top_p": 1.0}
    assert settings == {"compact_prompts": True, "decoding": decoding}
    checkpoints = sorted((Path(full_run.cfg.out) / "checkpoints").glob("step-*"))
    assert checkpoints and all(read_reasoner_settings(c) == settings for c in checkpoints)


class _Killed(Exception):
    pass


def test_interrupted_run_resumes_at_the_checkpoint_step(full_run: SimpleNamespace, make_cfg, tmp_path: Path) -> None:
    def crash_at_2(step: int, record: dict, batch: RolloutBatch) -> None:
        if step == 2:  # step 1 is checkpointed; step 2's update is lost with the "crash"
            raise _Killed

    with pytest.raises(_Killed):
        train_rl(make_cfg(tmp_path, save_every=1), on_step=crash_at_2)
    assert latest_checkpoint(tmp_path).name == "step-0000001"
    (tmp_path / "checkpoints" / "step-0000002.tmp").mkdir()  # a killed save's leftover
    resumed: list[int] = []
    # max_steps may change on a resume (the LR is constant, each step's batch a function of (seed, step)).
    train_rl(make_cfg(tmp_path, save_every=1, max_steps=2), on_step=lambda step, record, batch: resumed.append(step))
    assert resumed == [2]
    steps = [json.loads(line)["step"] for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert steps == [1, 2], "the resumed run logged a step twice"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    # Same batches, rollouts (seeded per step) and optimiser state: the resumed run is where the full run was.
    a = torch.load(Path(full_run.cfg.out) / "checkpoints" / "step-0000002" / "state.pt", weights_only=False)
    b = torch.load(latest_checkpoint(tmp_path) / "state.pt", weights_only=False)
    assert a["step"] == b["step"] == 2 and a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=0, atol=1e-6, msg=name)
    for group_a, group_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        torch.testing.assert_close(group_a["exp_avg"], group_b["exp_avg"], rtol=0, atol=1e-6)


def test_used_out_is_refused_unless_same_config_or_overwrite(make_cfg, tmp_path: Path, capsys) -> None:
    train_rl(make_cfg(tmp_path, max_steps=1))
    capsys.readouterr()
    cfg = make_cfg(tmp_path)
    args = ["rl", "--reasoner", cfg.reasoner, "--embedder", cfg.embedder, "--data", cfg.data, "--out", str(tmp_path),
            "--resume", "false"]  # fmt: skip
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"output folder is not empty ({tmp_path}): pass --resume true" in lines[0], lines
    with pytest.raises(ConfigError, match=r"config differs from the run being resumed in lr, seed \("):
        train_rl(make_cfg(tmp_path, max_steps=1, lr=0.5, seed=3))
    final = train_rl(make_cfg(tmp_path, max_steps=1, lr=0.5, overwrite=True))
    assert json.loads((final / "train_config.json").read_text())["config"]["lr"] == 0.5
    steps = [json.loads(line)["step"] for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert steps == [1]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000001"]


def test_cli_rl_smoke(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    args = ["rl", "--reasoner", cfg.reasoner, "--embedder", cfg.embedder, "--data", cfg.data, "--out", str(tmp_path),
            "--num_generations", "2", "--pairs_per_step", "2", "--max_steps", "1", "--max_new_tokens", "16",
            "--compact_prompts", "true", "--device", cfg.device, "--dtype", cfg.dtype,
            "--engine", "native"]  # fmt: skip
    # LoRA (the reference is the adapter-free base) and PPO: 2 epochs x 2 mini-batches of the 8 trajectories.
    ppo = ["--lora", "4", "--beta", "0.01", "--ppo_epochs", "2", "--mini_batch_size", "4", "--micro_batch_size", "2"]
    assert main([*args, *ppo]) == 0
    assert (tmp_path / "final" / RL_META_FILE).is_file() and (tmp_path / METRICS_FILE).is_file()
    record = json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[-1])
    assert record["grpo/optimizer_steps"] == 4 and np.isfinite(record["grpo/kl"]) and record["grpo/ratio"] > 0
    model, _ = load_backbone(tmp_path / "final")  # LoRA merged: a plain checkpoint
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert main([*args, "--pairs_per_step", "1"]) == 2  # a configuration error, reported


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"pairs_per_step": 1}, "no in-batch negatives"),
        ({"num_generations": 1}, "needs >= 2 rollouts"),
        ({"reward_overrides": {"m_negs": 2}}, r"unknown key\(s\) \['m_negs'\]"),
        ({"reward_overrides": {"w_format": 0.1}}, "fields of their own"),
        ({"w_outcome": -1.0}, "w_outcome=-1.0 must be a finite number"),
        ({"clip_eps": 0.0}, "clip_eps"),
        ({"reasoner": ""}, "pass --reasoner"),
        ({"discriminator_url": "http://localhost:8000/v1"}, "needs the served model's name"),
        ({"discriminator": "judge", "discriminator_url": "localhost:8000"}, "must start with http"),
    ],
)
def test_config_errors_say_how_to_fix(kw: dict, message: str) -> None:
    base = dict(reasoner="r", embedder="e", data="d", out="o")
    with pytest.raises(ConfigError, match=message):
        GRPOTrainConfig(**{**base, **kw})


def test_config_resolves_preset_group_size() -> None:
    base = dict(reasoner="r", embedder="e", data="d", out="o")
    assert GRPOTrainConfig(**base).group_size == 8
    with pytest.warns(UserWarning, match="shuffle_candidates=False"):  # the reference preset's unshuffled candidates
        assert GRPOTrainConfig(**base, preset="reference").group_size == 4
    assert GRPOTrainConfig(**base, num_generations=3).group_size == 3
    assert GRPOTrainConfig(**base, w_process=0.0).reward_config().weights["process"] == 0.0


def test_no_discriminator_is_loaded_when_the_process_weight_is_zero(make_cfg, tmp_path: Path) -> None:
    models = load_models(make_cfg(tmp_path, w_process=0.0))
    assert models.discriminator_model is None and len(models.frozen_modules()) == 2  # reference and Embedder
    with pytest.raises(RuntimeError, match="w_process is 0"):
        models.discriminator(["a prompt"])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_use_vllm_without_vllm_says_how_to_fix() -> None:
    cfg = GRPOTrainConfig(reasoner="r", embedder="e", data="d", out="o", use_vllm=True)
    with pytest.raises(ImportError, match="use_vllm=true needs vLLM"):
        load_models(cfg)


def test_embedder_reward_embeds_each_rollout_with_its_item_and_tcot() -> None:
    seen: dict = {}

    class FakeEmbedder:
        def encode(self, items, batch_size, mode):
            seen.update(items=items, mode=mode)
            return np.eye(len(items), 4, dtype=np.float32)

    items = [Item(id="a", text="x", images=("img.png",)), Item(id="b", text="y", frames=("f1.png", "f2.png"))]
    out = EmbedderReward(FakeEmbedder())(
        "query", ["<thinking>a</thinking>", "<thinking>b</thinking>"], {"item": items}
    )
    assert out.shape == (2, 4) and seen["mode"] == "full"
    assert [it.tcot for it in seen["items"]] == ["<thinking>a</thinking>", "<thinking>b</thinking>"]
    assert [(it.images, it.frames) for it in seen["items"]] == [(it.images, it.frames) for it in items]
    with pytest.raises(ValueError, match="'item' column"):
        EmbedderReward(FakeEmbedder())("query", ["t"], {})


def test_endpoint_discriminator_keeps_prompt_order_and_raises_on_failure() -> None:
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            prompt = body["messages"][0]["content"]
            if prompt == "fail":
                self.send_response(500)
                self.end_headers()
                return
            time.sleep(0.01 * (9 - int(prompt[1:])))  # later prompts are answered first
            data = json.dumps({"choices": [{"message": {"content": f"reply {prompt}"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        disc = EndpointDiscriminator(url, "judge", max_new_tokens=5, concurrency=4, retries=1, backoff=0.0)
        assert disc([f"p{i}" for i in range(10)]) == [f"reply p{i}" for i in range(10)]
        assert seen[0]["model"] == "judge" and seen[0]["temperature"] == 0.0 and seen[0]["max_tokens"] == 5
        with pytest.raises(RuntimeError, match="HTTP 500"):
            disc(["fail"])
        assert sum(b["messages"][0]["content"] == "fail" for b in seen) == 2  # retried once, then raised
    finally:
        server.shutdown()
        server.server_close()


def test_step_line_shows_the_logged_terms_only() -> None:
    record = {"reward/total": 1.25, "reward/format": 1.0, "reward/outcome": 0.25, "completion/length": 91.6,
              "time/step": 1.94}  # fmt: skip
    assert step_line(3, 80, "world_vqa", record) == (
        "step 3/80 world_vqa: reward 1.250 (format 1.000, outcome 0.250), len 92, 1.9s"
    )
    with_process = step_line(3, 80, "world_vqa", {**record, "reward/process": 0.5})
    assert "(format 1.000, process 0.500, outcome 0.250)" in with_process


def video_heavy_set(out: Path, policy: Reasoner) -> tuple[Path, int, dict[str, int]]:
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


def test_native_run_reports_pairs_dropped_by_max_prompt_tokens(
    make_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    light = dict(beta=0.0, w_process=0.0, max_new_tokens=4, sample_table_every=0, save_every=100)
    models = load_models(make_cfg(tmp_path, **light))  # no reference model, no Discriminator
    data, limit, expected = video_heavy_set(tmp_path, models.policy)
    screen = screen_prompts(read_pairs(data), models.policy, limit)
    assert screen.dropped == expected and screen.totals == {"clips": 4, "photos": 4, "video_mix": 6}
    assert len(screen.kept(read_pairs(data))) == 14 - 8
    cfg = make_cfg(tmp_path / "run", data=str(data), max_prompt_tokens=limit, max_steps=7, **light)
    with caplog.at_level(logging.INFO, logger="embedrl.train.grpo"):
        train_rl(cfg, models=models)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped ")]
    assert lines == [
        f"dropped 4 of 4 pairs of clips: prompt > max_prompt_tokens ({limit})",
        f"dropped 0 of 4 pairs of photos: prompt > max_prompt_tokens ({limit})",
        f"dropped 4 of 6 pairs of video_mix: prompt > max_prompt_tokens ({limit})",
    ]
    records = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert len(records) == 7 and {r["dataset"] for r in records} == set(expected)  # every batch of an epoch
    for r in records:
        assert r["data/dropped_prompt_tokens"] == expected[r["dataset"]]
        # native drops per step: a batch keeps only its fitting pairs (a video_mix batch may lose 0, 1 or 2)
        assert r["pairs"] + r["data/pairs_dropped_overlong"] == B
        if r["dataset"] == "clips":
            assert r["pairs"] == 0 and r["skipped"] == 1
    assert sum(r["data/pairs_dropped_overlong"] for r in records) == 8  # 7 batches = all 14 pairs, 8 with video
