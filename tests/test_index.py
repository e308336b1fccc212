"""Search index: exact = numpy ranking, persistence, incremental adds, resumable builds, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedrl.backbones import PixelBudget
from embedrl.cli import main
from embedrl.config import ConfigError, IndexConfig, load_config
from embedrl.data.schema import Item, write_jsonl
from embedrl.serve import index as index_module
from embedrl.serve.index import (
    EmbedPipeline,
    IndexFormatError,
    Searcher,
    SearchIndex,
    add_to_index,
    build_index,
    read_corpus,
)

SMALL = PixelBudget(32 * 32, 64 * 64, 32 * 32, 64 * 64, num_frames=4)
DIM = 32


class Killed(Exception):
    """Stands in for a kill in the middle of a build."""


def _unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _raw_cfg(out: Path | str = "o", **kw) -> IndexConfig:
    return IndexConfig(model="m", corpus="c", out=str(out), mode="raw", tcot_source="none", **kw)


def _items(n: int, prefix: str = "c") -> list[Item]:
    return [Item(id=f"{prefix}{i:04d}", text=f"item {i}") for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# The FAISS index alone (random vectors)
# ---------------------------------------------------------------------------------------------------------------


def test_exact_index_ranks_like_numpy() -> None:
    rng = np.random.default_rng(0)
    corpus, queries = _unit(rng, 700), _unit(rng, 25)
    index = SearchIndex(_raw_cfg(), DIM)
    index.add(_items(len(corpus)), corpus)
    k = 15
    hits = index.search(queries, k)
    scores = queries @ corpus.T  # [Q, N]
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [Q, k]
    for q, row in enumerate(hits):
        assert [hit.id for hit in row] == [f"c{j:04d}" for j in expected[q]]
        np.testing.assert_allclose([hit.score for hit in row], scores[q, expected[q]], atol=1e-5)
        assert [hit.rank for hit in row] == list(range(1, k + 1))
    # A reversed query ranks the other way round: the test can fail.
    assert index.search(-queries[:1], 1)[0][0].id == f"c{np.argmin(scores[0]):04d}"


def test_ivf_visiting_every_cluster_is_exact_and_hnsw_recall_is_high() -> None:
    rng = np.random.default_rng(1)
    corpus, queries = _unit(rng, 600), _unit(rng, 20)
    expected = np.argsort(-(queries @ corpus.T), axis=1, kind="stable")[:, :10]
    ivf = SearchIndex(_raw_cfg(index_type="ivf", ivf_nlist=8, ivf_nprobe=8), DIM)
    ivf.add(_items(len(corpus)), corpus)
    assert [[h.id for h in row] for row in ivf.search(queries, 10)] == [[f"c{j:04d}" for j in r] for r in expected]
    hnsw = SearchIndex(_raw_cfg(index_type="hnsw", hnsw_m=16), DIM)
    hnsw.add(_items(len(corpus)), corpus)
    found = [{h.id for h in row} for row in hnsw.search(queries, 10)]
    recall = np.mean([len(f & {f"c{j:04d}" for j in r}) / 10 for f, r in zip(found, expected, strict=True)])
    assert recall >= 0.9


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
def test_saved_index_reloads_identical(tmp_path: Path, index_type: str) -> None:
    rng = np.random.default_rng(2)
    corpus, queries = _unit(rng, 300), _unit(rng, 10)
    cfg = _raw_cfg(tmp_path, index_type=index_type, ivf_nlist=4)
    items = [Item(id=f"x{i}", text=f"t{i}", meta={"n": i}) for i in range(len(corpus))]
    index = SearchIndex(cfg, DIM, embedder_id="emb@1")
    index.add(items, corpus, tcots=[f"<answer>{i}</answer>" for i in range(len(items))])
    index.save(tmp_path)
    again = SearchIndex.load(tmp_path)
    assert again.cfg == cfg and again.embedder_id == "emb@1" and len(again) == len(index)
    assert again.items == index.items and [it.meta for it in again.items] == [it.meta for it in items]
    assert again.tcots == index.tcots and again.target_modality == "text"
    np.testing.assert_array_equal(again.vectors(), index.vectors())
    before = [[(h.id, h.score) for h in row] for row in index.search(queries, 7)]
    assert [[(h.id, h.score) for h in row] for row in again.search(queries, 7)] == before


def test_incremental_adds_equal_one_shot_build() -> None:
    rng = np.random.default_rng(3)
    corpus, queries = _unit(rng, 400), _unit(rng, 12)
    items = _items(len(corpus))
    whole = SearchIndex(_raw_cfg(), DIM)
    whole.add(items, corpus)
    parts = SearchIndex(_raw_cfg(), DIM)
    for start, stop in ((0, 150), (150, 151), (151, 400)):
        parts.add(items[start:stop], corpus[start:stop])
    assert [[(h.id, h.score) for h in r] for r in parts.search(queries, 9)] == [
        [(h.id, h.score) for h in r] for r in whole.search(queries, 9)
    ]
    with pytest.raises(IndexFormatError, match=r"ids \['c0003'\] are already in the index"):
        parts.add(items[3:4], corpus[3:4])


def test_index_refuses_bad_input(tmp_path: Path) -> None:
    index = SearchIndex(_raw_cfg(), DIM)
    with pytest.raises(IndexFormatError, match="occur more than once"):
        index.add([Item(id="a"), Item(id="a")], np.ones((2, DIM), dtype=np.float32))
    with pytest.raises(IndexFormatError, match=r"need vectors of shape \(1, 32\)"):
        index.add([Item(id="a")], np.ones((1, 3), dtype=np.float32))
    with pytest.raises(IndexFormatError, match="NaN or inf"):
        index.add([Item(id="a")], np.full((1, DIM), np.nan, dtype=np.float32))
    assert index.search(np.ones((2, DIM), dtype=np.float32), 3) == [[], []]  # empty index: no hits
    with pytest.raises(IndexFormatError, match="not a finished index"):
        SearchIndex.load(tmp_path)
    with pytest.raises(ConfigError, match="raw mode embeds no T-CoT"):
        IndexConfig(model="m", corpus="c", out="o", mode="raw")
    with pytest.raises(ConfigError, match="needs --reasoner"):
        IndexConfig(model="m", corpus="c", out="o")


class _Recorder:
    """An encoder whose vector of an item is ``[len(text), 1]``; records the ids of every call."""

    dim = 2

    def __init__(self) -> None:
        self.calls: list[tuple[str | None, list[str]]] = []

    def encode(self, items, batch_size=16, show_progress_bar=None, mode=None) -> np.ndarray:
        self.calls.append((mode, [it.id for it in items]))
        return np.array([[len(it.text), 1.0] for it in items], dtype=np.float32)


def test_pipeline_keys_by_id_with_a_cache_and_by_position_without(tmp_path: Path) -> None:
    items = [Item(id="a", text="x"), Item(id="a", text="yy"), Item(id="b", text="zzz")]
    encoder = _Recorder()
    uncached = EmbedPipeline(encoder, embedder_id="e", batch_size=2).embed(items, "raw")
    assert encoder.calls == [("raw", ["a", "a", "b"])]  # one call, every item: ids need not be unique
    assert uncached[:, 0].tolist() == [1.0, 2.0, 3.0]
    encoder.calls.clear()
    cached = EmbedPipeline(encoder, embedder_id="e", batch_size=1, cache_dir=tmp_path)
    assert cached.embed(items, "raw")[:, 0].tolist() == [1.0, 1.0, 3.0]  # one key per id: "a" is encoded once
    assert encoder.calls == [("raw", ["a"]), ("raw", ["b"])]  # batch by batch, one cache shard each
    assert cached.embed(items[2:], "raw")[:, 0].tolist() == [3.0] and len(encoder.calls) == 2  # read back
    assert EmbedPipeline(encoder, embedder_id="other", cache_dir=tmp_path).embed(items[2:], "raw").shape == (1, 2)
    assert len(encoder.calls) == 3  # another embedder id is another key


# ---------------------------------------------------------------------------------------------------------------
# The pipeline with tiny models
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reasoner(tiny_backbone_dir):
    from embedrl.models.reasoner import Reasoner

    return Reasoner.from_pretrained(tiny_backbone_dir("qwen3-vl"), compact_prompts=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six items (texts and two small images), media relative to the JSONL."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "media").mkdir()
    colours = ["red", "green"]
    for colour in colours:
        Image.new("RGB", (48, 48), colour).save(root / "media" / f"{colour}.png")
    records = [
        Item(id=f"t{i}", text=f"a {c} {s}").to_record()
        for i, (c, s) in enumerate([("blue", "circle"), ("red", "square"), ("green", "star"), ("yellow", "kite")])
    ]
    records += [
        {"id": f"img-{c}", "text": "", "instruction": "Represent the image.", "images": [f"media/{c}.png"]}
        for c in colours
    ]
    write_jsonl(root / "corpus.jsonl", records)
    return root / "corpus.jsonl"


def _counting(real, calls: list[list[str]], kill_at: int | None = None):
    def wrapper(items, *args, **kwargs):
        if kill_at is not None and len(calls) + 1 == kill_at:
            raise Killed
        out = real(items, *args, **kwargs)
        calls.append([it.id for it in items])
        return out

    return wrapper


def _counting_batches(real, calls: list[list[str]], kill_at: int | None = None):
    """``Reasoner.generate_batches`` counting its batches (item ids); raises Killed before the ``kill_at``-th one is
    handed to the pipeline (so it never reaches the cache)."""

    def wrapper(items, *args, **kwargs):
        for batch, generations in real(items, *args, **kwargs):
            if kill_at is not None and len(calls) + 1 == kill_at:
                raise Killed
            calls.append([items[i].id for i in batch])
            yield batch, generations

    return wrapper


def test_killed_build_resumes_without_recomputing(
    corpus: Path, embedder, reasoner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = IndexConfig(
        model="m",
        corpus=str(corpus),
        out=str(tmp_path / "index"),
        reasoner="r",
        max_new_tokens=6,
        batch_size=2,
        reasoner_batch_size=2,
        show_progress_bar=False,
    )
    encode, generate = embedder.encode, reasoner.generate_batches
    encoded: list[list[str]] = []
    generated: list[list[str]] = []
    # Run 1: killed during the second T-CoT batch (batches: the corpus sorted by modality, then prompt length).
    monkeypatch.setattr(reasoner, "generate_batches", _counting_batches(generate, generated, kill_at=2))
    with pytest.raises(Killed):
        build_index(cfg, embedder=embedder, reasoner=reasoner)
    assert generated == [["img-red", "img-green"]]
    # Run 2: the T-CoTs resume from batch 2; killed during the third embedding batch.
    monkeypatch.setattr(reasoner, "generate_batches", _counting_batches(generate, generated))
    monkeypatch.setattr(embedder, "encode", _counting(encode, encoded, kill_at=3))
    with pytest.raises(Killed):
        build_index(cfg, embedder=embedder, reasoner=reasoner)
    assert generated == [["img-red", "img-green"], ["t0", "t1"], ["t2", "t3"]]
    assert len(encoded) == 2
    # Run 3: only the last embedding batch is computed; no T-CoT is generated again.
    monkeypatch.setattr(embedder, "encode", _counting(encode, encoded))
    index = build_index(cfg, embedder=embedder, reasoner=reasoner)
    assert len(generated) == 3 and len(encoded) == 3
    assert sorted(i for batch in encoded for i in batch) == sorted(it.id for it in read_corpus(corpus))
    # The resumed index equals a clean build (no caches shared).
    monkeypatch.undo()
    clean = build_index(
        IndexConfig(**{**cfg.__dict__, "out": str(tmp_path / "clean")}), embedder=embedder, reasoner=reasoner
    )
    assert [it.id for it in index.items] == [it.id for it in clean.items] and index.tcots == clean.tcots
    assert all(isinstance(t, str) for t in index.tcots)
    np.testing.assert_allclose(index.vectors(), clean.vectors(), atol=1e-5)
    assert index.target_modality == "text" and index.modality_counts == {"text": 4, "image": 2}


def test_add_to_index_equals_one_shot_build(corpus: Path, embedder, tmp_path: Path) -> None:
    items = read_corpus(corpus)
    half = tmp_path / "half.jsonl"
    write_jsonl(half, [it.to_record() for it in items[:3]])
    cfg = IndexConfig(
        model="m",
        corpus=str(half),
        out=str(tmp_path / "grown"),
        mode="raw",
        tcot_source="none",
        show_progress_bar=False,
    )
    build_index(cfg, embedder=embedder)
    grown = add_to_index(tmp_path / "grown", items[3:], embedder=embedder)
    whole = build_index(
        IndexConfig(**{**cfg.__dict__, "corpus": str(corpus), "out": str(tmp_path / "whole")}), embedder=embedder
    )
    again = SearchIndex.load(tmp_path / "grown")
    assert [it.id for it in again.items] == [it.id for it in whole.items] == [it.id for it in grown.items]
    np.testing.assert_allclose(again.vectors(), whole.vectors(), atol=1e-5)
    queries = EmbedPipeline(embedder).embed([Item(id="q", text="a red square")], "raw")
    assert [h.id for h in again.search(queries, 6)[0]] == [h.id for h in whole.search(queries, 6)[0]]
    with pytest.raises(IndexFormatError, match="already in"):
        add_to_index(tmp_path / "grown", items[:1], embedder=embedder)


def test_searcher_refuses_another_embedder(corpus: Path, embedder, tiny_backbone_dir, tmp_path: Path) -> None:
    from embedrl.models import Embedder

    cfg = IndexConfig(
        model="m", corpus=str(corpus), out=str(tmp_path / "i"), mode="raw", tcot_source="none", show_progress_bar=False
    )
    index = build_index(cfg, embedder=embedder)
    other = Embedder.from_backbone(tiny_backbone_dir("qwen2-vl"), budget=SMALL)
    with pytest.raises(IndexFormatError, match="the index was built with embedder@"):
        Searcher(index, other)


def test_cli_index_build_then_search(
    corpus: Path, embedder_dir: Path, tiny_backbone_dir, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "index"
    code = main(
        [
            "index",
            "build",
            "--model",
            str(embedder_dir),
            "--corpus",
            str(corpus),
            "--out",
            str(out),
            "--reasoner",
            str(tiny_backbone_dir("qwen3-vl")),
            "--max_new_tokens",
            "6",
            "--show_progress_bar",
            "false",
        ]
    )
    assert code == 0 and "indexed 6 items (flat, mode full)" in capsys.readouterr().out
    saved = load_config(IndexConfig, None, json.loads((out / "config.json").read_text())["config"])
    assert Path(saved.model).is_absolute() and saved.max_new_tokens == 6
    assert main(["search", "--index", str(out), "a red square", "-k", "3"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].startswith("query: 'a red square' (mode full")
    assert lines[1].startswith("T-CoT: ") and len(lines[1]) > len("T-CoT: ")
    header = next(i for i, line in enumerate(lines) if line.split() == ["rank", "score", "id"])
    assert lines[header - 1].startswith("evidence: cue ")
    rows = [line.split() for line in lines[header + 1 :]]
    assert len(rows) == 3 and [r[0] for r in rows] == ["1", "2", "3"]
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    # The printed ranking is the library's.
    assert main(["search", "--index", str(out), "a red square", "-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in result["results"]] == [r[2] for r in rows]
    assert [round(r["score"], 4) for r in result["results"]] == scores
    assert f"T-CoT: {result['tcot']}" in printed
    assert main(["search", "--index", str(tmp_path / "nope"), "q"]) == 2


def test_cli_index_build_reports_bad_corpora_in_one_line(embedder_dir: Path, tmp_path: Path, capsys) -> None:
    """A truncated corpus line and a missing image: exit 2, one stderr line with the file and line number."""
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_text('{"id": "a", "text": "x"}\n{"id": "b", "te')
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"id": "a", "text": "x", "images": ["gone.png"]}\n')
    for corpus, expected in ((truncated, f"({truncated}, line 2"), (missing, f"({missing}, line 1)")):
        argv = ["index", "build", "--corpus", str(corpus), "--model", str(embedder_dir), "--out",
                str(tmp_path / corpus.stem), "--tcot_source", "none", "--mode", "raw"]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("embedrl: error: ") and expected in err[0], err


# ---------------------------------------------------------------------------------------------------------------
# Memory: index build adds in chunks from the embedding cache, FAISS storage sized once; quiet FAISS
# ---------------------------------------------------------------------------------------------------------------


def _fake_encode(dim: int):
    """A stand-in for ``Embedder.encode``: unit vectors that depend only on each item's number (ids ``c0000``...)."""

    def encode(items, *args, **kwargs):
        numbers = np.array([int(item.id[1:]) for item in items], dtype=np.float64)[:, None]  # [n, 1]
        vectors = np.sin((numbers + 1.0) * np.linspace(0.1, 3.0, dim)[None, :]).astype(np.float32)  # [n, dim]
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    return encode


@pytest.mark.parametrize("index_type", ["flat", "ivf"])
def test_build_adds_chunk_by_chunk_and_equals_the_matrix(
    embedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, index_type: str
) -> None:
    items = _items(43)
    write_jsonl(tmp_path / "corpus.jsonl", [it.to_record() for it in items])
    encode = _fake_encode(embedder.dim)
    monkeypatch.setattr(embedder, "encode", encode)
    monkeypatch.setattr(index_module, "ADD_CHUNK_ROWS", 8)
    added: list[int] = []
    real_add = SearchIndex.add
    monkeypatch.setattr(
        SearchIndex, "add", lambda self, its, v, t=None: (added.append(len(v)), real_add(self, its, v, t))
    )
    cfg = IndexConfig(model="m", corpus=str(tmp_path / "corpus.jsonl"), out=str(tmp_path / "index"), mode="raw",
                      tcot_source="none", index_type=index_type, batch_size=4, show_progress_bar=False)  # fmt: skip
    index = build_index(cfg, embedder=embedder)
    assert added == [8, 8, 8, 8, 8, 3]  # whole Embedder batches of 4 per chunk; never the whole matrix at once
    np.testing.assert_array_equal(index.vectors(), encode(items))
    assert [it.id for it in SearchIndex.load(tmp_path / "index").items] == [it.id for it in items]
    shards = sorted((tmp_path / "index" / "cache" / "embeddings").glob("*.npy"))
    assert len(shards) == 1 and np.load(shards[0]).shape == (43, embedder.dim)  # compacted
    if index_type == "ivf":  # trained once on the whole corpus: nlist = round(4 * sqrt(43)), not that of a chunk
        inner = index_module._faiss().extract_index_ivf(index.faiss_index)
        assert inner.nlist == round(4 * np.sqrt(43)) == 26


def _storage_address(index: SearchIndex) -> int:
    faiss = index_module._faiss()
    inner = faiss.downcast_index(index.faiss_index.index)
    storage = faiss.downcast_index(inner.storage) if index.cfg.index_type == "hnsw" else inner
    return faiss.rev_swig_ptr(storage.codes.data(), 1).__array_interface__["data"][0]


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_reserve_sizes_the_storage_once(index_type: str) -> None:
    rng = np.random.default_rng(7)
    corpus = _unit(rng, 300)
    items = _items(len(corpus))
    addresses: dict[bool, set[int]] = {}
    for reserve in (True, False):
        index = SearchIndex(_raw_cfg(index_type=index_type, hnsw_m=8), DIM)
        index.add(items[:10], corpus[:10])
        if reserve:
            index._reserve(290)
        seen = {_storage_address(index)}
        for start in range(10, 300, 29):
            index.add(items[start : start + 29], corpus[start : start + 29])
            seen.add(_storage_address(index))
        addresses[reserve] = seen
        assert len(index) == 300
        np.testing.assert_array_equal(index.vectors(), corpus)
    assert len(addresses[True]) == 1  # filled in place
    assert len(addresses[False]) > 1  # without it, FAISS reallocates as it grows


def test_faiss_loader_logs_nothing_at_info() -> None:
    """FAISS's loader logs its library choice at INFO on import; the index module keeps only its warnings."""
    code = "import logging; logging.basicConfig(level=logging.INFO); {}"
    quiet = subprocess.run(
        [sys.executable, "-c", code.format("from embedrl.serve.index import _faiss; _faiss().IndexFlatIP(4)")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "faiss" not in quiet.stderr.lower(), quiet.stderr
    loud = subprocess.run(
        [sys.executable, "-c", code.format("import faiss")], capture_output=True, text=True, check=True
    )
    assert "INFO faiss.loader" in loud.stderr or "INFO:faiss.loader" in loud.stderr  # the control: it does log
