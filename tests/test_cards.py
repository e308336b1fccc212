"""Model cards (embedrl.models.cards): every saved Embedder and Reasoner gets a Hugging Face README.md whose front
matter parses, which carries the training config and results, and whose code and prompt examples are true."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from embedrl.config import BackbonePretrainConfig, EmbedderTrainConfig, config_to_dict
from embedrl.data.schema import Item
from embedrl.models.cards import (
    CARD_FILENAME,
    EXAMPLE_INSTRUCTION,
    EXAMPLE_TCOT,
    EXAMPLE_TEXT,
    MODEL_PATH,
    read_model_card,
    reasoner_messages,
    update_model_card_results,
    write_model_card,
)
from embedrl.models.reasoner import Decoding, Reasoner, build_reasoner_prompt


def code_block(body: str, heading: str, language: str, index: int = 0) -> str:
    """The ``index``-th fenced ``language`` block after the Markdown heading ``heading``."""
    section = body.split(heading + "\n", 1)[1]
    return re.findall(rf"```{language}\n(.*?)\n```", section, re.DOTALL)[index]


@pytest.fixture
def saved(embedder_dir, tmp_path) -> Path:
    """A copy of the shared saved Embedder (its card written by Embedder.save)."""
    return Path(shutil.copytree(embedder_dir, tmp_path / "embedder"))


def train_config() -> EmbedderTrainConfig:
    return EmbedderTrainConfig(backbone="Qwen/Qwen3-VL-2B-Instruct", data="pairs.jsonl", out="runs/e", lr=3e-5)


def test_embedder_save_writes_a_card_without_config(saved) -> None:
    front, body = read_model_card(saved)
    assert front["pipeline_tag"] == "feature-extraction" and front["library_name"] == "transformers"
    assert {"embedrl", "qwen3_vl"} <= set(front["tags"]) and "base_model" not in front
    assert front["embedrl"]["kind"] == "embedder" and "config" not in front["embedrl"]
    assert "Saved without a training config" in body and "Not evaluated yet." in body


def test_card_front_matter_config_and_loading_snippets(saved) -> None:
    cfg = train_config()
    write_model_card(saved, "embedder", base_model=cfg.backbone, config=cfg, datasets=["TIGER-Lab/MMEB-train"],
                     license="apache-2.0")  # fmt: skip
    front, body = read_model_card(saved)
    assert front["base_model"] == "Qwen/Qwen3-VL-2B-Instruct"
    assert front["datasets"] == ["TIGER-Lab/MMEB-train"] and front["license"] == "apache-2.0"
    assert front["embedrl"]["stage"] == "EmbedderTrainConfig" and front["embedrl"]["config"] == config_to_dict(cfg)
    assert "Trained with `embedrl train-embedder` (EmbedderTrainConfig)" in body
    assert yaml.safe_load(code_block(body, "## Training", "yaml")) == config_to_dict(cfg)
    assert f'embedrl.load_embedder("{MODEL_PATH}")' in code_block(body, "### embedrl", "python")
    assert f'SentenceTransformer("{MODEL_PATH}", trust_remote_code=True)' in code_block(
        body, "### sentence-transformers", "python"
    )
    assert "last `<emb>` token, L2-normalised" in body


def test_local_base_model_stays_out_of_the_front_matter(saved, tmp_path) -> None:
    write_model_card(saved, "embedder", base_model=str(tmp_path))
    front, body = read_model_card(saved)
    assert "base_model" not in front and front["embedrl"]["base_model"] == str(tmp_path)
    assert f"from `{tmp_path}`" in body


def test_transformers_snippet_reproduces_encode(saved, embedder) -> None:
    """The card's plain-transformers code, run as written (the folder path filled in), gives Embedder.encode's
    vector of the same item."""
    _, body = read_model_card(saved)
    code = code_block(body, "### transformers", "python").replace(f'"{MODEL_PATH}"', repr(str(saved)))
    namespace: dict = {}
    exec(compile(code, "card-snippet", "exec"), namespace)  # the card's own code
    vector = namespace["vector"].numpy()
    item = Item(id="x", text=EXAMPLE_TEXT, instruction=EXAMPLE_INSTRUCTION)
    expected = embedder.encode([item], mode="raw")[0]
    np.testing.assert_allclose(vector, expected, atol=1e-5)
    other = embedder.encode([Item(id="y", text=EXAMPLE_TEXT)], mode="raw")[0]
    assert not np.allclose(vector, other, atol=1e-3)  # the comparison tells the instruction apart


def test_card_prompts_are_what_collate_feeds_the_model(saved, embedder) -> None:
    """The rendered chats in the card are the token sequences Embedder.collate builds for the example item."""
    _, body = read_model_card(saved)
    item = Item(id="x", text=EXAMPLE_TEXT, instruction=EXAMPLE_INSTRUCTION)
    tokenizer = embedder.processor.tokenizer
    assert embedder.mode == "full"
    for index, (mode, shown) in enumerate([("raw", item), ("full", item.with_tcot(EXAMPLE_TCOT))]):
        text = code_block(body, "## Input format and pooling", "text", index)
        ids = embedder.collate([shown], mode)["input_ids"][0]
        assert tokenizer.decode(ids) == text + "\n"  # the card's block drops the template's final newline


def test_update_results_merges_and_keeps_the_config(saved) -> None:
    cfg = train_config()
    write_model_card(saved, "embedder", base_model=cfg.backbone, config=cfg, license="mit")
    update_model_card_results(saved, {"world raw": {"overall": 14.2, "world_cls": 20.0}})
    update_model_card_results(saved, {"world egrl": {"overall": 23.8}, "speed (items/s)": 3.5})
    front, body = read_model_card(saved)
    assert front["embedrl"]["results"] == {"world raw": {"overall": 14.2, "world_cls": 20.0},
                                           "world egrl": {"overall": 23.8}, "speed (items/s)": 3.5}  # fmt: skip
    assert front["license"] == "mit" and front["embedrl"]["config"] == config_to_dict(cfg)
    assert "| overall | 14.2 | 23.8 |" in body and "| speed (items/s) | 3.5 |" in body
    update_model_card_results(saved, {"world raw": {"overall": 15.0}})  # same name: replaced
    assert read_model_card(saved)[0]["embedrl"]["results"]["world raw"] == {"overall": 15.0}


def test_saving_again_writes_a_fresh_card(saved, embedder) -> None:
    update_model_card_results(saved, {"world": {"overall": 1.0}})
    embedder.save(saved)
    assert "results" not in read_model_card(saved)[0]["embedrl"]


def test_update_refuses_missing_and_foreign_cards(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no model card"):
        update_model_card_results(tmp_path, {"x": 1})
    (tmp_path / CARD_FILENAME).write_text("---\nlicense: mit\n---\n\n# someone else's model\n")
    with pytest.raises(ValueError, match="not written by embedrl"):
        update_model_card_results(tmp_path, {"x": 1})
    (tmp_path / CARD_FILENAME).write_text("# no front matter\n")
    with pytest.raises(ValueError, match="no YAML front matter"):
        read_model_card(tmp_path)
    with pytest.raises(ValueError, match="kind="):
        write_model_card(tmp_path, "tokenizer")


def test_reasoner_card(tiny_backbone_dir, tmp_path) -> None:
    reasoner = Reasoner.from_pretrained(tiny_backbone_dir("qwen3-vl"), compact_prompts=True)
    reasoner.decoding = Decoding(max_new_tokens=64, temperature=0.7)
    reasoner.save(tmp_path)
    front, body = read_model_card(tmp_path)
    assert front["pipeline_tag"] == "image-text-to-text" and front["embedrl"]["kind"] == "reasoner"
    assert "| prompt style | compact |" in body and '"max_new_tokens": 64' in body
    item = Item(id="x", text=EXAMPLE_TEXT, instruction=EXAMPLE_INSTRUCTION)
    assert reasoner_messages(True) == build_reasoner_prompt(item, "query", "image", compact=True).messages
    shown = code_block(body, "## Prompt format", "text")
    chat = reasoner.processor.apply_chat_template(reasoner_messages(True), tokenize=False, add_generation_prompt=True)
    assert shown == chat.rstrip("\n")
    assert f'embedrl.load_reasoner("{MODEL_PATH}")' in code_block(body, "### embedrl", "python")
    assert torch.equal(
        reasoner.processor(text=[chat], return_tensors="pt")["input_ids"],
        reasoner.chat_inputs([build_reasoner_prompt(item, "query", "image", compact=True)])["input_ids"],
    )


def test_embedder_folder_without_record_is_refused(tiny_backbone_dir, tmp_path) -> None:
    folder = Path(shutil.copytree(tiny_backbone_dir("qwen3-vl"), tmp_path / "backbone"))
    with pytest.raises(FileNotFoundError, match=r"embedder\.json"):
        write_model_card(folder, "embedder")


def test_backbone_card_names_its_stage_and_results(tiny_backbone_dir, tmp_path) -> None:
    folder = Path(shutil.copytree(tiny_backbone_dir("qwen3-vl"), tmp_path / "backbone"))
    cfg = BackbonePretrainConfig(backbone=str(tiny_backbone_dir("qwen3-vl")), out=str(tmp_path / "pre"))
    write_model_card(folder, "backbone", base_model=cfg.backbone, config=cfg, results={"perception": {"crop": 0.5}})
    front, body = read_model_card(folder)
    assert front["pipeline_tag"] == "image-text-to-text" and "base_model" not in front  # a local folder
    assert "Trained with `embedrl backbone pretrain` (BackbonePretrainConfig)" in body
    assert "| | perception |\n|---|---|\n| crop | 0.5 |" in body
