"""Every entry point that loads an Embedder works with a published-layout checkpoint and no extra files (issue 17):
``eval world``, ``index build`` + ``search``, ``serve`` and the RL reward Embedder; ``--layout`` is honoured there.
(``eval mmeb`` / ``eval uvrb`` are covered by their own tests.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from embedrl.backbones import PixelBudget
from embedrl.cli import main
from embedrl.config import GRPOTrainConfig, WorldConfig
from embedrl.data.schema import Item, write_jsonl
from embedrl.models import Embedder
from embedrl.models.loading import load_embedder
from embedrl.rewards.judges import EmbedderReward
from embedrl.serve.index import SearchIndex
from embedrl.serve.server import serve_in_background
from embedrl.train.rl_models import load_models
from embedrl.world.generate import generate_world

TOL = 1e-5
SUMMARIZE = "Summarize the above content in one word:"  # the reference layout's closing sentence
TCOT = (
    '<thinking>A kite. {"bbox_2d": [[0, 0, 500, 500]]}</thinking>\n<rethink>Red.</rethink><answer>A red kite.</answer>'
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_world(WorldConfig(out=str(tmp_path_factory.mktemp("world") / "w"), seed=0, size="tiny"))


@pytest.fixture(scope="module")
def published(published_embedder_dir: Path) -> Embedder:
    return load_embedder(published_embedder_dir)


def test_eval_world(published_embedder_dir: Path, world: Path, tmp_path: Path) -> None:
    """Teacher T-CoTs (flat bbox cues: read as one box, not a crash) on one task, through the CLI."""
    out = tmp_path / "eval"
    args = ["eval", "world", "--world", str(world), "--embedder", str(published_embedder_dir), "--out", str(out),
            "--tasks", "[world_cls]", "--show_progress_bar", "false"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metadata"]["embedder"]["layout"] == "reference"
    assert (out / "scores" / "world_cls_score.json").is_file()


def test_eval_world_layout_switch_on_our_embedder(tiny_backbone_dir, world: Path, tmp_path: Path, caplog) -> None:
    own = tmp_path / "own"
    Embedder.from_backbone(tiny_backbone_dir("qwen3-vl"), budget=PixelBudget(1024, 4096, 1024, 4096, 4)).save(own)
    out = tmp_path / "eval"
    args = ["eval", "world", "--world", str(world), "--embedder", str(own), "--out", str(out), "--tasks",
            "[world_cls]", "--layout", "reference", "--show_progress_bar", "false"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="embedrl.models.loading"):
        assert main(args) == 0
    assert json.loads((out / "summary.json").read_text())["metadata"]["embedder"]["layout"] == "reference"
    assert json.loads((out / "config.json").read_text())["config"]["layout"] == "reference"
    assert [r for r in caplog.records if r.name == "embedrl.models.loading" and "reference" in r.getMessage()]


def test_cli_reports_a_folder_without_emb_in_one_line(tiny_backbone_dir, world: Path, tmp_path: Path, capsys) -> None:
    args = ["eval", "world", "--world", str(world), "--embedder", str(tiny_backbone_dir("qwen3-vl")), "--out",
            str(tmp_path / "x"), "--tasks", "[world_cls]"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("embedrl: error:") and "emb_token_ids" in err and "\n" not in err
    assert main(["eval", "world", "--world", str(world), "--embedder", str(tmp_path / "missing"), "--out",
                 str(tmp_path / "y")]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err


def test_index_build_and_search(published_embedder_dir: Path, published: Embedder, tmp_path: Path, capsys) -> None:
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    items = [
        Item(id="c0", text="a red kite over the beach", tcot=TCOT),
        Item(id="c1", text="a blue boat", tcot="<thinking>Boat.</thinking><answer>A boat.</answer>"),
        Item(id="c2", instruction="Represent the given image.", images=(tmp_path / "red.png",), tcot=TCOT),
    ]
    write_jsonl(tmp_path / "corpus.jsonl", [it.to_record(tmp_path) for it in items])
    index_dir = tmp_path / "index"
    assert main(["index", "build", "--model", str(published_embedder_dir), "--corpus", str(tmp_path / "corpus.jsonl"),
                 "--out", str(index_dir), "--tcot_source", "corpus", "--show_progress_bar", "false"]) == 0  # fmt: skip
    index = SearchIndex.load(index_dir)
    np.testing.assert_allclose(index.vectors(), published.encode(items, mode="full"), atol=TOL)
    capsys.readouterr()
    assert main(["search", "a red kite", "--index", str(index_dir), "--tcot", TCOT, "--json", "-k", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["results"]) == 2 and result["evidence"]["cue"] == "bbox_2d"
    query = published.encode([Item(id="query", text="a red kite", tcot=TCOT)], mode="full")[0]
    scores = index.vectors() @ query
    assert result["results"][0]["id"] == items[int(np.argmax(scores))].id


def test_serve(published_embedder_dir: Path, published: Embedder, monkeypatch) -> None:
    """`embedrl serve --model <published>` (uvicorn.run replaced by a background server and one request)."""
    import uvicorn

    replies = []

    def run(app, **kwargs) -> None:
        with serve_in_background(app) as base:
            body = {"model": "embedder", "input": "a red kite", "encoding_format": "float", "mode": "raw"}
            replies.append(httpx.post(base + "/v1/embeddings", json=body, timeout=60).json())
            health = httpx.get(base + "/health", timeout=60).json()
            replies.append(health)

    monkeypatch.setattr(uvicorn, "run", run)
    assert main(["serve", "--model", str(published_embedder_dir), "--port", "0", "--max_wait_ms", "0"]) == 0
    vector = np.array(replies[0]["data"][0]["embedding"], dtype=np.float32)
    np.testing.assert_allclose(vector, published.encode([Item(text="a red kite")], mode="raw")[0], atol=TOL)
    assert replies[1]["status"] == "ok"


def test_rl_reward_embedder(published_embedder_dir: Path, published: Embedder, tiny_backbone_dir, world: Path,
                            tmp_path: Path) -> None:  # fmt: skip
    """The RL loading path gives the frozen reward Embedder the published checkpoint in the reference layout
    (``--layout`` overrides it), and the reward embeds rollouts exactly as the Embedder does."""
    base = dict(reasoner=str(tiny_backbone_dir("qwen3-vl")), embedder=str(published_embedder_dir),
                data=str(world / "rl.jsonl"), out=str(tmp_path), w_process=0.0, num_generations=2, pairs_per_step=2,
                max_new_tokens=8, max_prompt_tokens=4096)  # fmt: skip
    models = load_models(GRPOTrainConfig(**base))
    embedder = models.embedder
    assert embedder is not None and embedder.layout == "reference"
    assert not any(p.requires_grad for p in embedder.model.parameters())
    items = [Item(id="a", text="a red kite", images=(Image.new("RGB", (64, 48), (200, 30, 30)),)),
             Item(id="b", text="a blue boat")]  # fmt: skip
    got = EmbedderReward(embedder)("target", [TCOT, TCOT], {"item": items})
    want = published.encode([it.with_tcot(TCOT) for it in items], mode="full")
    assert torch.allclose(got, torch.from_numpy(want), atol=TOL)
    switched = load_models(GRPOTrainConfig(**base, layout="embedrl")).embedder
    assert switched is not None and switched.layout == "embedrl"
    assert SUMMARIZE not in switched.processor.decode(switched.collate([items[1].with_tcot(TCOT)])["input_ids"][0])
