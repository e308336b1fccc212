"""EG-RL's shared machinery (train/rl_data, rl_models, rl_outputs and the reward models): step batches, prompt
screening, model loading, the config's checks, the step record, the console line, train.log routing."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from embedrl.cli import main
from embedrl.config import ConfigError, GRPOTrainConfig, WorldConfig, load_config
from embedrl.data.schema import Item, read_pairs
from embedrl.models.reasoner import Reasoner
from embedrl.rewards.judges import EmbedderReward
from embedrl.rewards.terms import RolloutKey
from embedrl.train.rl_data import screen_prompts, step_batches
from embedrl.train.rl_models import load_models
from embedrl.train.rl_outputs import (
    TRL_LOG,
    RolloutBatch,
    merge_step_records,
    run_log,
    sample_table,
    step_line,
    step_metrics,
    truncate_samples,
)
from embedrl.world.generate import generate_world

G, B = 2, 2


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_world(WorldConfig(out=str(tmp_path_factory.mktemp("world")), size="tiny", seed=0))


@pytest.fixture(scope="module")
def make_cfg(tiny_backbone_dir, embedder_dir: Path, world: Path, torch_device: str, torch_dtype):
    """``make(out, **overrides)``: a tiny EG-RL config on the shared tiny Embedder (conftest's ``embedder_dir``)."""

    def make(out: Path, **kw) -> GRPOTrainConfig:
        base = dict(
            reasoner=str(tiny_backbone_dir("qwen3-vl")), embedder=str(embedder_dir), data=str(world / "rl.jsonl"),
            out=str(out), seed=0, num_generations=G, pairs_per_step=B, max_steps=3, max_new_tokens=24,
            discriminator_max_new_tokens=4, lr=1e-3, beta=0.01, save_every=2, sample_table_every=2,
            micro_batch_size=8, w_outcome=0.8, w_process=0.2, acc_mode="fraction", device=torch_device,
            dtype=str(torch_dtype).removeprefix("torch."),
        )  # fmt: skip
        base.update(kw)
        return GRPOTrainConfig(**base)

    return make


# ----------------------------------------------------------------------------------------------------------------
# Data: step batches and prompt screening (train/rl_data.py)
# ----------------------------------------------------------------------------------------------------------------


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


def test_screen_counts_the_pairs_max_prompt_tokens_drops_per_dataset(
    tiny_backbone_dir, video_heavy_set, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy = Reasoner.from_pretrained(tiny_backbone_dir("qwen3-vl"), compact_prompts=True)
    data, limit, expected = video_heavy_set(tmp_path, policy)
    pairs = read_pairs(data)
    screen = screen_prompts(pairs, policy, limit)
    assert screen.dropped == expected and screen.totals == {"clips": 4, "photos": 4, "video_mix": 6}
    kept = screen.kept(pairs)
    assert len(kept) == 14 - 8 and not any(p.query.frames or p.target.frames for p in kept)
    with caplog.at_level(logging.INFO, logger="embedrl.train.rl_data"):
        screen.log()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", f"dropped 4 of 4 pairs of clips: prompt > max_prompt_tokens ({limit})"),
        ("INFO", f"dropped 0 of 4 pairs of photos: prompt > max_prompt_tokens ({limit})"),
        ("WARNING", f"dropped 4 of 6 pairs of video_mix: prompt > max_prompt_tokens ({limit})"),
    ]


# ----------------------------------------------------------------------------------------------------------------
# Config: checks, removed keys, the refused out/ folder
# ----------------------------------------------------------------------------------------------------------------


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
        ({"embedder_url": "http://h:1/v1", "layout": "reference"}, "layout=reference applies to an in-process"),
        ({"vllm_gpu_memory_utilization": 1.5}, r"vllm_gpu_memory_utilization=1.5 must be in \(0, 1\]"),
        ({"vllm_server_base_url": "h:8000"}, "vllm_server_base_url='h:8000' must start with http"),
    ],
)
def test_config_errors_say_how_to_fix(kw: dict, message: str) -> None:
    base = dict(reasoner="r", embedder="e", data="d", out="o")
    with pytest.raises(ConfigError, match=message):
        GRPOTrainConfig(**{**base, **kw})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("engine", "native", r"engine is no longer a key of GRPOTrainConfig: .*'native'\) was removed"),
        ("engine", "trl", "engine is no longer a key of GRPOTrainConfig: EG-RL has one engine"),
        ("generation_batch_size", 4, "generation_batch_size is no longer a key .* delete the key"),
    ],
)
def test_an_old_config_with_a_removed_key_is_refused_with_the_reason(
    key: str, value, message: str, tmp_path: Path, capsys
) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(f"reasoner: r\nembedder: e\ndata: d\nout: {tmp_path / 'out'}\n{key}: {value}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(GRPOTrainConfig, path)
    assert main(["rl", "--config", str(path)]) == 2  # one line on the console, exit 2, nothing written
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"embedrl: error: {key} is no longer a key"), err
    flags = ["rl", "--reasoner", "r", "--embedder", "e", "--data", "d", "--out", str(tmp_path / "out")]
    assert main([*flags, f"--{key}", str(value)]) == 2  # the same on the command line
    assert capsys.readouterr().err.strip().splitlines() == err
    assert not (tmp_path / "out").exists()


def test_config_resolves_preset_group_size() -> None:
    base = dict(reasoner="r", embedder="e", data="d", out="o")
    assert GRPOTrainConfig(**base).group_size == 8
    with pytest.warns(UserWarning, match="shuffle_candidates=False"):  # the reference preset's unshuffled candidates
        assert GRPOTrainConfig(**base, preset="reference").group_size == 4
    assert GRPOTrainConfig(**base, num_generations=3).group_size == 3
    assert GRPOTrainConfig(**base, w_process=0.0).reward_config().weights["process"] == 0.0


def test_a_used_out_is_refused_before_anything_loads(make_cfg, tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("someone else's file")
    cfg = make_cfg(tmp_path)
    args = ["rl", "--reasoner", cfg.reasoner, "--embedder", cfg.embedder, "--data", cfg.data, "--out", str(tmp_path),
            "--resume", "false"]  # fmt: skip
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"output folder is not empty ({tmp_path}): pass --resume true" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written
    assert main([*args[:-1], "true"]) == 2  # resume: the folder holds no config.json of a run
    assert "holds no config.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Models (train/rl_models.py) and the reward models
# ----------------------------------------------------------------------------------------------------------------


def test_load_models_freezes_the_reward_models_and_skips_an_unused_discriminator(make_cfg, tmp_path: Path) -> None:
    models = load_models(make_cfg(tmp_path, w_process=0.0))
    assert models.discriminator_model is None and models.frozen_modules() == [models.embedder.model]
    assert not any(p.requires_grad for p in models.embedder.model.parameters())
    assert all(p.requires_grad for p in models.policy.model.parameters())  # full weights; TRL adds LoRA itself
    with pytest.raises(RuntimeError, match="w_process is 0"):
        models.discriminator(["a prompt"])
    with_disc = load_models(make_cfg(tmp_path, w_process=0.2))
    assert with_disc.discriminator_model is not None and with_disc.discriminator_model is not with_disc.policy.model
    assert not any(p.requires_grad for p in with_disc.discriminator_model.parameters())
    with pytest.raises(ValueError, match="exceeds the policy's context"):
        load_models(make_cfg(tmp_path, max_prompt_tokens=10**7))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_use_vllm_without_vllm_says_how_to_fix() -> None:
    cfg = GRPOTrainConfig(reasoner="r", embedder="e", data="d", out="o", use_vllm=True)
    with pytest.raises(ImportError, match="use_vllm=true needs vLLM"):
        load_models(cfg)


def test_embedder_reward_embeds_each_rollout_with_its_item_and_tcot(tmp_path) -> None:
    seen: dict = {}

    class FakeEmbedder:
        def encode(self, items, batch_size, mode, groups):
            seen.update(items=items, mode=mode, groups=groups)
            return np.eye(len(items), 4, dtype=np.float32)

        def sharing_visuals(self):
            return contextlib.nullcontext(SimpleNamespace(stats=None))

    paths = []
    for name, value in (("img.png", 10), ("f1.png", 20), ("f2.png", 30)):
        Image.new("RGB", (8, 8), (value, 0, 0)).save(tmp_path / name)
        paths.append(tmp_path / name)
    items = [Item(id="a", text="x", images=(paths[0],)), Item(id="b", text="y", frames=(paths[1], paths[2]))]
    out = EmbedderReward(FakeEmbedder())(
        "query", ["<thinking>a</thinking>", "<thinking>b</thinking>"], {"item": items}
    )
    assert out.shape == (2, 4) and seen["mode"] == "full" and seen["groups"] is None  # one rollout each
    assert [it.tcot for it in seen["items"]] == ["<thinking>a</thinking>", "<thinking>b</thinking>"]
    # the media files are read once per item, as RGB images with the files' pixels
    red = [[im.getpixel((0, 0))[0] for im in (*it.images, *it.frames)] for it in seen["items"]]
    assert red == [[10], [20, 30]]
    EmbedderReward(FakeEmbedder())("query", ["t1", "t2", "t3"], {"item": [items[0], items[1], items[0]]})
    assert seen["groups"] == [[0, 2], [1]]  # an item's rollouts form one group
    with pytest.raises(ValueError, match="'item' column"):
        EmbedderReward(FakeEmbedder())("query", ["t"], {})


# ----------------------------------------------------------------------------------------------------------------
# Outputs (train/rl_outputs.py): the step record, its merge over processes, the console line, train.log
# ----------------------------------------------------------------------------------------------------------------


def _scored_batch(dataset: str = "d", outcome: tuple[float, ...] = (0.0, 1.0, 0.5, 0.5)) -> RolloutBatch:
    """Two pairs x 2 sides x G=2 rollouts; the query side's outcome rewards vary, the target side's do not."""
    keys = [RolloutKey(f"p{i}", side, g) for i in range(2) for side in ("query", "target") for g in range(G)]
    n = len(keys)
    outcome_values = [outcome[k.rollout + 2 * int(k.pair_id[1])] if k.side == "query" else 0.25 for k in keys]
    components = {"format": [1.0] * n, "outcome": outcome_values}
    totals = [1.0 + v for v in outcome_values]
    return RolloutBatch(
        step=3, dataset=dataset, block=2, keys=keys, items=[Item(id=f"i{k.pair_id}", text="t") for k in keys],
        texts=["<thinking>a</thinking>"] * n, completion_ids=[[1, 2, 3]] * (n - 1) + [[1]],
        truncated=[False] * (n - 1) + [True], components=components, totals=totals, advantages=torch.zeros(n),
    )  # fmt: skip


def test_step_metrics_per_side_lengths_and_constant_groups() -> None:
    record = step_metrics(_scored_batch(), {"reward/outcome/margin/query": 0.1})
    assert record["reward/format"] == 1.0 and record["reward/outcome/target"] == 0.25
    assert record["reward/outcome/query"] == pytest.approx((0.0 + 1.0 + 0.5 + 0.5) / 4)
    assert record["completion/length"] == pytest.approx((7 * 3 + 1) / 8)
    assert record["completion/truncated_frac"] == 1 / 8
    # groups (pair, side): p0/query has rewards 0 and 1; p1/query 0.5 and 0.5 (constant); both target groups constant
    assert record["grpo/groups"] == 4 and record["grpo/constant_groups"] == 3
    assert record["reward/outcome/margin/query"] == 0.1 and "discriminator/accuracy" not in record
    table = sample_table(_scored_batch())
    assert table.splitlines()[0] == "| pair | side | g | format | outcome | R | A | len | T-CoT |"
    assert len(table.splitlines()) == 2 + 8 and "| p0 | query | 1 | 1.000 | 1.000 | 2.000 | +0.000 | 3 |" in table


def test_records_of_several_processes_merge_into_one_step_line() -> None:
    one = {"step": 3, "dataset": "a", "pairs": 2, "prompts": 4, "trajectories": 8, "data/dropped_prompt_tokens": 1,
           "reward/total": 0.5, "time/step": 2.0, "grpo/constant_groups": 1.0,
           "reward/process/accuracy/query": math.nan}  # fmt: skip
    two = {**one, "dataset": "b", "data/dropped_prompt_tokens": 4, "reward/total": 1.0, "time/step": 3.0,
           "grpo/constant_groups": 2.0}  # fmt: skip
    merged = merge_step_records([one, two])
    assert merged["dataset"] == "a,b" and merged["processes"] == 2 and merged["step"] == 3
    assert (merged["pairs"], merged["trajectories"], merged["grpo/constant_groups"]) == (4, 16, 3.0)
    assert merged["reward/total"] == 0.75 and merged["time/step"] == 3.0 and merged["data/dropped_prompt_tokens"] == 5
    assert math.isnan(merged["reward/process/accuracy/query"])
    assert merge_step_records([one]) == {**one, "processes": 1}
    with pytest.raises(ValueError, match="different steps"):
        merge_step_records([one, {**two, "step": 4}])


def test_step_line_shows_the_logged_terms_only() -> None:
    record = {"reward/total": 1.25, "reward/format": 1.0, "reward/outcome": 0.25, "completion/length": 91.6,
              "time/step": 1.94}  # fmt: skip
    assert step_line(3, 80, "world_vqa", record) == (
        "step 3/80 world_vqa: reward 1.250 (format 1.000, outcome 0.250), len 92, 1.9s"
    )
    with_process = step_line(3, 80, "world_vqa", {**record, "reward/process": 0.5})
    assert "(format 1.000, process 0.500, outcome 0.250)" in with_process


def test_run_log_sends_library_records_warnings_and_trl_dicts_to_the_file_only(tmp_path: Path, capfd) -> None:
    console = logging.StreamHandler()  # stands for the CLI's console handler (stderr)
    root = logging.getLogger()
    root.addHandler(console)
    level = root.level
    root.setLevel(logging.WARNING)  # embedrl's INFO lines reach the file (and the console) all the same
    try:
        with run_log(tmp_path / "train.log"):
            logging.getLogger("embedrl.train.grpo_trl").info("step 1/2 d: reward 1.000")
            logging.getLogger(TRL_LOG).info("TRL logs: %s", {"loss": 0.5})
            logging.getLogger("trl.trainer.grpo_trainer").warning("a TRL warning")
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.warn("`x` is deprecated", FutureWarning, stacklevel=1)
        logging.getLogger(TRL_LOG).info("after the run")  # restored: no longer routed to the closed file
    finally:
        root.removeHandler(console)
        root.setLevel(level)
    out, err = capfd.readouterr()
    assert "step 1/2 d: reward 1.000" in err and "{'loss'" not in out + err
    assert "a TRL warning" not in err and "FutureWarning" not in out + err
    log = (tmp_path / "train.log").read_text()
    for text in ("step 1/2 d: reward 1.000", "TRL logs: {'loss': 0.5}", "a TRL warning", "FutureWarning"):
        assert text in log, text
    assert "after the run" not in log


def test_truncate_samples_keeps_the_tables_up_to_the_resumed_step(tmp_path: Path) -> None:
    path = tmp_path / "samples.md"
    path.write_text("## step 2 (a)\n\n| t |\n\n## step 4 (b)\n\n| u |\n\n## step 6 (a)\n\n| v |\n\n")
    truncate_samples(path, 4)
    assert path.read_text() == "## step 2 (a)\n\n| t |\n\n## step 4 (b)\n\n| u |\n\n"
    truncate_samples(tmp_path / "absent", 1)  # a run without sample tables
    assert not (tmp_path / "absent").exists()
