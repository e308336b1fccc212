"""A saved Embedder as a sentence-transformers model (embedrl.integrations.sentence_transformers, docs/embedder.md):
the folder's ST files, loading it, and the same vectors as Embedder.encode for text, image and video inputs, with and
without T-CoTs, on the query and document sides, with and without a Reasoner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("sentence_transformers")

from sentence_transformers import SentenceTransformer

from embedrl import prompts
from embedrl.data.schema import Item
from embedrl.integrations.sentence_transformers import EmbedderModule, to_sentence_transformer
from embedrl.models import Embedder
from embedrl.models.embedder import (
    ST_CONFIG_FILENAME,
    ST_MODULE_CLASS,
    ST_MODULES_FILENAME,
    ST_NORMALIZE_CLASS,
)
from embedrl.models.reasoner import Decoding, Reasoner

TEXT_TCOT = (
    '<thinking>The caption names kites. {"text_keywords": ["kite", "red"]}</thinking>'
    "<rethink>Two red kites.</rethink><answer>Two red kites in the sky.</answer>"
)
IMAGE_TCOT = (
    '<thinking>A red square at the top left. {"bbox_2d": [[0, 0, 500, 500]]}</thinking>'
    "<rethink>The square is red.</rethink><answer>A red square.</answer>"
)
VIDEO_TCOT = (
    '<thinking>Frame 3 shows the end. {"key_frames": [3, 1]}</thinking>'
    "<rethink>It ends blue.</rethink><answer>A shape turning blue.</answer>"
)


def noise_image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("media") / "kite.png"
    noise_image(7, 96).save(path)
    return path


def inputs_without_tcot(image_path: Path) -> list:
    """Text, image (PIL and path), video (a frame list), text + image: every input kind."""
    frames = [noise_image(20 + i, 48) for i in range(4)]
    return ["two red kites", noise_image(1), image_path, frames, {"text": "a square", "image": noise_image(2)}]


def inputs_with_tcot(image_path: Path) -> list:
    frames = [noise_image(20 + i, 48) for i in range(4)]
    return [
        {"text": "two red kites", "tcot": TEXT_TCOT},
        {"image": noise_image(1, 128), "tcot": IMAGE_TCOT},
        {"images": [str(image_path)], "text": "a kite", "tcot": IMAGE_TCOT},
        {"frames": frames, "text": "what happens?", "tcot": VIDEO_TCOT},
        Item(id="own", text="two cats", instruction="Find the picture:", tcot=TEXT_TCOT),
    ]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def own_embedder(embedder_dir) -> Embedder:
    """A private copy of the saved Embedder: these tests attach Reasoners to it."""
    return Embedder.load(embedder_dir)


@pytest.fixture(scope="module")
def st_model(embedder_dir) -> SentenceTransformer:
    return SentenceTransformer(str(embedder_dir), trust_remote_code=True, device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# The folder Embedder.save writes
# ---------------------------------------------------------------------------------------------------------------


def test_save_writes_the_sentence_transformers_files(embedder_dir) -> None:
    modules = json.loads((embedder_dir / ST_MODULES_FILENAME).read_text())
    assert [m["type"] for m in modules] == [ST_MODULE_CLASS, ST_NORMALIZE_CLASS]
    assert modules[0]["path"] == "" and (embedder_dir / modules[1]["path"] / "config.json").is_file()
    assert f"{EmbedderModule.__module__}.{EmbedderModule.__qualname__}" == ST_MODULE_CLASS
    config = json.loads((embedder_dir / ST_CONFIG_FILENAME).read_text())
    assert config["prompts"] == {"query": prompts.QUERY_INSTRUCTION, "document": prompts.DOCUMENT_INSTRUCTION}
    assert config["similarity_fn_name"] == "cosine" and config["model_type"] == "SentenceTransformer"


def test_loading_without_trust_remote_code_is_refused_not_mean_pooled(embedder_dir) -> None:
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        SentenceTransformer(str(embedder_dir), device="cpu")


def test_the_loaded_model_is_our_module_then_normalize(st_model: SentenceTransformer, own_embedder: Embedder) -> None:
    assert isinstance(st_model[0], EmbedderModule) and type(st_model[1]).__name__ == "Normalize"
    assert st_model.get_embedding_dimension() == own_embedder.dim
    assert st_model.prompts["query"] == prompts.QUERY_INSTRUCTION
    assert st_model.similarity_fn_name == "cosine"


# ---------------------------------------------------------------------------------------------------------------
# Same vectors as Embedder.encode
# ---------------------------------------------------------------------------------------------------------------


def test_raw_mode_matches_embedder_encode_for_every_input_kind(st_model, own_embedder, image_path) -> None:
    inputs = inputs_without_tcot(image_path)
    ours = own_embedder.encode(inputs, mode="raw")
    theirs = st_model.encode(inputs, mode="raw", batch_size=2)
    assert theirs.shape == ours.shape == (5, own_embedder.dim)
    assert cosines(ours, theirs).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-5)
    # one input: a vector, as sentence-transformers returns it
    single = st_model.encode("two red kites", mode="raw")
    assert single.shape == (own_embedder.dim,) and cosines(single, ours[0]) >= 0.9999


def test_query_and_document_sides_match_with_tcots(st_model, own_embedder, image_path) -> None:
    inputs = inputs_with_tcot(image_path)
    for side in ("encode", "encode_query", "encode_document"):
        ours = getattr(own_embedder, side)(inputs)
        theirs = getattr(st_model, side)(inputs, batch_size=3)
        assert cosines(ours, theirs).min() >= 0.9999, side
    # the sides differ by their instruction, and the input with its own instruction keeps it
    query, document = st_model.encode_query(inputs), st_model.encode_document(inputs)
    assert cosines(query[:4], document[:4]).max() < 0.9999
    assert cosines(query[4:], document[4:]).min() >= 0.9999
    explicit = own_embedder.encode(inputs, instruction=prompts.QUERY_INSTRUCTION)
    assert cosines(query, explicit).min() >= 0.9999


def test_prompt_argument_is_the_instruction(st_model, own_embedder) -> None:
    item = {"text": "two red kites", "tcot": TEXT_TCOT}
    theirs = st_model.encode(item, prompt="Find the kite photo:")
    ours = own_embedder.encode(item, instruction="Find the kite photo:")
    assert cosines(theirs, ours) >= 0.9999
    assert cosines(st_model.encode_query(item, prompt=""), own_embedder.encode(item)) >= 0.9999


def test_in_memory_wrapper_matches_and_shares_the_weights(own_embedder, image_path) -> None:
    model = to_sentence_transformer(own_embedder)
    assert model[0].model is own_embedder.model
    inputs = inputs_with_tcot(image_path)
    assert cosines(model.encode_document(inputs), own_embedder.encode_document(inputs)).min() >= 0.9999
    tensor = model.encode_query(inputs[:2], convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (2, own_embedder.dim)


# ---------------------------------------------------------------------------------------------------------------
# T-CoTs: an error without a Reasoner, the right side with one
# ---------------------------------------------------------------------------------------------------------------


def test_missing_tcot_without_reasoner_says_how_to_fix(st_model) -> None:
    with pytest.raises(ValueError, match=r"has no T-CoT.*no Reasoner is attached.*attach_reasoner.*mode='raw'"):
        st_model.encode_query("a red kite")
    with pytest.raises(ValueError, match="unknown key"):
        st_model.encode({"txt": "a red kite"}, mode="raw")


@pytest.fixture(scope="module")
def reasoner(tiny_backbone_dir) -> Reasoner:
    reasoner = Reasoner.from_pretrained(tiny_backbone_dir("qwen3-vl"), compact_prompts=True)
    reasoner.decoding = Decoding(greedy=True, max_new_tokens=12)
    return reasoner


def test_attached_reasoner_writes_tcots_on_the_task_side(st_model, own_embedder, reasoner, monkeypatch) -> None:
    sides: list[str] = []
    generate = reasoner.generate

    def spy(items, side, *args, **kwargs):
        sides.append(side)
        return generate(items, side, *args, **kwargs)

    monkeypatch.setattr(reasoner, "generate", spy)
    inputs = ["a red kite", noise_image(3)]
    st_model[0].attach_reasoner(reasoner)
    own_embedder.attach_reasoner(reasoner)
    try:
        for side, expected in (("encode_query", "query"), ("encode_document", "target")):
            sides.clear()
            theirs = getattr(st_model, side)(inputs)
            assert sides == [expected], side
            ours = getattr(own_embedder, side)(inputs)
            assert cosines(ours, theirs).min() >= 0.9999, side
        # the T-CoT written is the Reasoner's raw text, embedded as if the input had carried it
        (generation,) = generate([Item(text="a red kite", instruction=prompts.QUERY_INSTRUCTION)], "query")[0]
        given = own_embedder.encode_query({"text": "a red kite", "tcot": generation.text})
        assert cosines(given, st_model.encode_query("a red kite")) >= 0.9999
        with pytest.raises(ValueError, match="encode_query or encode_document"):
            st_model.encode("a red kite")  # no task, no side for the Reasoner
    finally:
        st_model[0].attach_reasoner(None)
        own_embedder.attach_reasoner(None)


def test_save_through_sentence_transformers_reloads(st_model, tmp_path) -> None:
    st_model.save(str(tmp_path / "st"))
    again = SentenceTransformer(str(tmp_path / "st"), trust_remote_code=True, device="cpu")
    item = {"text": "two red kites", "tcot": TEXT_TCOT}
    assert cosines(again.encode_query(item), st_model.encode_query(item)) >= 0.9999
