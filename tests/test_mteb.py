"""The MTEB wrapper (embedrl.integrations.mteb): mteb.evaluate runs an embedrl Embedder, with and without a Reasoner,
on small in-memory retrieval tasks (text and image), offline and without a network connection."""

from __future__ import annotations

import copy
import socket
from typing import Any

import mteb
import numpy as np
import pytest
import torch
from datasets import Dataset
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.types import PromptType
from PIL import Image, ImageDraw

from embedrl.data.schema import Item
from embedrl.eval.metrics import compute_metrics
from embedrl.eval.pipeline import EmbedPipeline
from embedrl.integrations.mteb import MTEBEncoder, batch_items, frames_of, load_mteb_model
from embedrl.models.reasoner import Decoding, Reasoner

QUERIES = ["a red kite over the sea", "two blue cups", "a green frog on a log", "an old brass key", "snow", "a dog"]
DOCS = ["kites fly in wind", "a cup of tea", "frogs live in ponds", "keys open doors", "winter is cold", "pets"]
# Query i is answered by document PERM[i]; the corpus order differs from the query order.
PERM = [2, 0, 5, 1, 4, 3]
COLOURS = ["red", "blue", "green", "yellow"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch) -> None:
    """Any attempt to open a network connection fails the test (mteb must run offline)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def picture(colour: str, seed: int) -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).rectangle((8 + seed, 8, 40 + seed, 56), fill=colour)
    return image


def metadata(name: str, category: str, modalities: list[str]) -> TaskMetadata:
    return TaskMetadata(
        name=name, description="an in-memory test task", reference=None,
        dataset={"path": "embedrl/test", "revision": "0"},
        type="Retrieval", category=category, modalities=modalities, eval_splits=["test"], eval_langs=["eng-Latn"],
        main_score="ndcg_at_10", date=None, domains=None, task_subtypes=None, license=None,
        annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation="",
    )  # fmt: skip


class InMemoryRetrieval(AbsTaskRetrieval):
    """A retrieval task whose test split is built in memory (:func:`make_task` makes one class per task, with its
    metadata on the class, as mteb's own tasks have it)."""

    split: RetrievalSplitData

    def load_data(self, **kwargs: Any) -> None:
        self.dataset = {"default": {"test": self.split}}
        self.data_loaded = True


def make_task(
    meta: TaskMetadata, queries: dict[str, list], corpus: dict[str, list], relevant: dict
) -> AbsTaskRetrieval:
    split = RetrievalSplitData(
        queries=Dataset.from_dict(queries), corpus=Dataset.from_dict(corpus), relevant_docs=relevant, top_ranked=None
    )
    return type(meta.name, (InMemoryRetrieval,), {"metadata": meta, "split": split})()


def text_task() -> InMemoryRetrieval:
    corpus_ids = [f"d{j}" for j in range(len(DOCS))]
    return make_task(
        metadata("EmbedrlTextRetrieval", "t2t", ["text"]),
        {"id": [f"q{i}" for i in range(len(QUERIES))], "text": QUERIES},
        {"id": corpus_ids, "text": DOCS, "title": [""] * len(DOCS)},
        {f"q{i}": {f"d{PERM[i]}": 1} for i in range(len(QUERIES))},
    )


class Recording(MTEBEncoder):
    """The wrapper, keeping what each encode call returned by prompt type."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outputs: dict[str, np.ndarray] = {}

    def encode(self, inputs: Any, *, prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        vectors = super().encode(inputs, prompt_type=prompt_type, **kwargs)
        self.outputs[str(prompt_type)] = vectors
        return vectors


def run(model: MTEBEncoder, task: AbsTaskRetrieval) -> dict[str, Any]:
    """The test split's scores of ``task`` under ``mteb.evaluate`` (no result cache)."""
    result = mteb.evaluate(model, [task], cache=None, show_progress_bar=False, encode_kwargs={"batch_size": 4})
    (task_result,) = result.task_results
    (scores,) = task_result.scores["test"]
    return scores


def own_metrics(queries: np.ndarray, docs: np.ndarray) -> dict[str, Any]:
    """embedrl's metrics of the ranking the vectors give (query i relevant to document PERM[i])."""
    return compute_metrics(queries @ docs.T, [{PERM[i]: 1} for i in range(len(queries))], ks=(1, 3, 5))


def test_text_retrieval_scores_equal_embedrls_own_metrics_on_the_same_vectors(embedder) -> None:
    model = Recording(embedder)
    scores = run(model, text_task())
    instruction = AbsTaskRetrieval.abstask_prompt  # mteb's default query instruction for a retrieval task
    expected_q = embedder.encode([Item(id=str(i), text=t, instruction=instruction) for i, t in enumerate(QUERIES)],
                                 mode="raw")  # fmt: skip
    expected_d = embedder.encode([Item(id=str(j), text=t) for j, t in enumerate(DOCS)], mode="raw")
    np.testing.assert_allclose(model.outputs["query"], expected_q, atol=1e-5)
    np.testing.assert_allclose(model.outputs["document"], expected_d, atol=1e-5)
    ours = own_metrics(expected_q, expected_d)
    for k in (1, 3, 5):
        assert scores[f"ndcg_at_{k}"] == pytest.approx(ours[f"ndcg_linear@{k}"], abs=1e-4)
        assert scores[f"recall_at_{k}"] == pytest.approx(ours[f"recall@{k}"], abs=1e-4)
        assert scores[f"mrr_at_{k}"] == pytest.approx(ours[f"mrr@{k}"], abs=1e-4)
    assert 0 < ours["mrr@5"] < 1  # hits below rank 1: the comparison can tell rankings apart


def test_identical_images_find_themselves(embedder) -> None:
    """Image-to-image retrieval with each query image also in the corpus (shuffled) and the same instruction on both
    sides: every query ranks its own copy first (cosine 1)."""
    images = [picture(c, s) for c in COLOURS for s in (0, 12)]
    order = list(reversed(range(len(images))))
    task = make_task(
        metadata("EmbedrlImageSelfRetrieval", "i2i", ["image"]),
        {"id": [f"q{i}" for i in range(len(images))], "image": images},
        {"id": [f"d{j}" for j in order], "image": [images[j] for j in order]},
        {f"q{i}": {f"d{i}": 1} for i in range(len(images))},
    )
    same = "Find the same picture."
    scores = run(MTEBEncoder(embedder, prompts_dict={"query": same, "document": same}), task)
    assert scores["ndcg_at_1"] == pytest.approx(1.0)
    assert scores["mrr_at_10"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def reasoner(tiny_backbone_dir) -> Reasoner:
    return Reasoner.from_pretrained(tiny_backbone_dir("qwen3-vl"), compact_prompts=True)


def test_reasoner_tcots_on_a_text_to_image_task(embedder, reasoner) -> None:
    """With a Reasoner: queries get query-side T-CoTs routed by the image documents, documents target-side ones,
    and the vectors and scores are those of EmbedPipeline in the Embedder's mode on the same items."""
    images = [picture(c, 4) for c in COLOURS]
    captions = [f"a {c} box" for c in COLOURS]
    task = make_task(
        metadata("EmbedrlTextToImage", "t2i", ["text", "image"]),
        {"id": [f"q{i}" for i in range(4)], "text": captions},
        {"id": [f"d{j}" for j in range(4)], "image": images},
        {f"q{i}": {f"d{i}": 1} for i in range(4)},
    )
    decoding = Decoding(greedy=True, max_new_tokens=6)
    prompts = {"query": "Find a picture of:", "document": "Represent the picture."}
    model = Recording(embedder, reasoner, decoding=decoding, prompts_dict=prompts)
    assert model.mode == embedder.mode == "full"
    scores = run(model, task)

    pipeline = EmbedPipeline(embedder, reasoner, decoding=decoding)
    queries = [Item(id=f"q{i}", text=t, instruction=prompts["query"]) for i, t in enumerate(captions)]
    docs = [Item(id=f"d{j}", images=(im,), instruction=prompts["document"]) for j, im in enumerate(images)]
    expected_q, annotated = pipeline.run(queries, "full", "query", "image")
    expected_d, _ = pipeline.run(docs, "full", "target")
    assert all(item.tcot for item in annotated)
    np.testing.assert_allclose(model.outputs["query"], expected_q, atol=1e-5)
    np.testing.assert_allclose(model.outputs["document"], expected_d, atol=1e-5)
    wrong_side, _ = pipeline.run(docs, "full", "query")  # documents with query-side T-CoTs would differ
    assert not np.allclose(wrong_side, expected_d, atol=1e-3)
    raw_q = embedder.encode(queries, mode="raw")
    assert not np.allclose(raw_q, expected_q, atol=1e-3)  # the T-CoTs changed the vectors
    ours = compute_metrics(expected_q @ expected_d.T, [{i: 1} for i in range(4)], ks=(1, 3))
    assert scores["ndcg_at_3"] == pytest.approx(ours["ndcg_linear@3"], abs=1e-4)
    assert scores["mrr_at_3"] == pytest.approx(ours["mrr@3"], abs=1e-4)


def test_model_meta_separates_models_and_modes(embedder, reasoner, embedder_dir) -> None:
    raw = MTEBEncoder(embedder)
    meta = raw.mteb_model_meta
    assert meta.name == f"embedrl/{embedder_dir.name}" and meta.embed_dim == embedder.dim
    assert meta.modalities == ["text", "image", "video"] and meta.revision and len(meta.revision) == 16
    assert meta.experiment_kwargs["mode"] == "raw" and "reasoner" not in meta.experiment_kwargs
    with_tcots = MTEBEncoder(embedder, reasoner).mteb_model_meta.experiment_kwargs
    assert with_tcots["mode"] == "full" and with_tcots["reasoner"].startswith("tiny-qwen3-vl")
    attached = copy.copy(embedder).attach_reasoner(reasoner)  # a twin: the shared fixture stays as it is
    assert MTEBEncoder(attached).reasoner is reasoner and MTEBEncoder(attached).mode == "full"
    loaded = load_mteb_model(str(embedder_dir), revision="r1", name="me/mine")
    assert loaded.mteb_model_meta.revision == "r1" and loaded.mteb_model_meta.name == "me/mine"
    with pytest.raises(ValueError, match="pass a Reasoner"):
        MTEBEncoder(embedder, mode="full")


def test_batch_items_reads_every_column_and_refuses_audio() -> None:
    clip = torch.zeros(3, 3, 8, 10, dtype=torch.uint8)  # [T, C, H, W], as mteb's FramesCollator gives it
    clip[1, 0] = 255
    batch = {"id": ["a", "b"], "text": [" hello ", ""], "image": [picture("red", 0), None], "video": [None, clip]}
    first, second = batch_items(batch, instruction="Do it.", id_prefix="t/")
    assert (first.id, first.text, first.instruction, len(first.images), first.frames) == ("t/a", "hello", "Do it.",
                                                                                           1, ())  # fmt: skip
    assert second.modality == "video" and len(second.frames) == 3 and second.images == ()
    assert second.frames[1].size == (10, 8) and second.frames[1].getpixel((0, 0)) == (255, 0, 0)
    assert frames_of(np.zeros((2, 8, 10, 3), dtype=np.uint8))[0].size == (10, 8)
    with pytest.raises(ValueError, match="audio"):
        batch_items({"audio": [None]})
    with pytest.raises(ValueError, match="3 channels"):
        frames_of(np.zeros((2, 8, 10), dtype=np.uint8))
