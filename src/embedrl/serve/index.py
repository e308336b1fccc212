"""Search over a corpus: a persisted FAISS index over the vectors of the item -> T-CoT -> Embedder pipeline, and
the index stages.

- :class:`~embedrl.eval.pipeline.EmbedPipeline` (the evaluator's too) is the one path from items to vectors
  outside training: items without a T-CoT get one from the Reasoner (each unique item once), then the Embedder
  encodes them in the requested mode. An index build keeps both steps' caches under ``<index>/cache``, batch by
  batch, so a killed build resumes where it stopped; queries (and the server) are not cached.
- :class:`SearchIndex` wraps a FAISS index (exact inner product ``IndexFlatIP`` by default, HNSW or IVF for large
  corpora) in an ``IndexIDMap2`` whose ids are row numbers into the stored items; it adds incrementally, searches,
  saves and loads.
- :func:`build_index` (``embedrl index build``), :func:`add_to_index` (``embedrl index add``) and
  :class:`Searcher` (``embedrl search`` and the server's ``/search``) put the two together.

An index directory holds ``index.faiss``, ``items.jsonl`` (row -> item record and its T-CoT), ``index.json``
(dimension, count, embedder and Reasoner fingerprints, the candidates' prevailing modality), ``config.json`` (the
:class:`~embedrl.config.IndexConfig` it was built with) and ``cache/`` (T-CoTs and embeddings, for resumes and adds).

Example:
    >>> import numpy as np
    >>> from embedrl.config import IndexConfig
    >>> index = SearchIndex(IndexConfig(model="m", corpus="c", out="o", mode="raw", tcot_source="none"), dim=2)
    >>> index.add([Item(id="a"), Item(id="b")], np.array([[1, 0], [0, 1]], dtype=np.float32))
    >>> [(hit.id, round(hit.score, 2)) for hit in index.search(np.array([[0.6, 0.8]], dtype=np.float32), k=2)[0]]
    [('b', 0.8), ('a', 0.6)]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from embedrl import __version__
from embedrl.config import IndexConfig, UserError, config_from_dict, save_config
from embedrl.data.schema import DataError, Item, Modality, missing_media, read_jsonl, read_jsonl_lines
from embedrl.eval.cache import atomic_write_bytes
from embedrl.eval.pipeline import (
    EmbedPipeline,
    decoding_from_config,
    load_run_models,
)
from embedrl.eval.task import MissingTCoTError
from embedrl.evidence import build_embedder_messages
from embedrl.models.embedder import Embedder
from embedrl.models.reasoner import Reasoner
from embedrl.prompts import CUE_KEYS, LAYOUT_EMBEDRL, LAYOUT_REFERENCE

__all__ = [
    "IndexFormatError",
    "SearchHit",
    "SearchIndex",
    "SearchResult",
    "Searcher",
    "add_to_index",
    "build_index",
    "decoding_from_config",
    "evidence_summary",
    "read_corpus",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.jsonl"
INFO_FILE = "index.json"
CACHE_DIR = "cache"
# Vectors per FAISS add in `index build` / `index add` (rounded down to whole Embedder batches): the corpus matrix
# reaches FAISS in chunks, never stacked whole.
ADD_CHUNK_ROWS = 1024


class IndexFormatError(UserError, ValueError):
    """An index directory or corpus is missing, inconsistent or does not match the models. Says how to fix it."""


# ----------------------------------------------------------------------------------------------------------------
# Corpus and pipeline
# ----------------------------------------------------------------------------------------------------------------


def read_corpus(path: str | Path) -> list[Item]:
    """Items of a corpus JSONL (one item record per line; media paths relative to the file's directory).

    Raises:
        IndexFormatError: an item without an id, or an id used twice (ids are the join key of every cache).
        DataError: the file is malformed, a line is not an item record, or an item names a missing media file
            (each named by file and line).
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise IndexFormatError(f"corpus not found ({path}): pass --corpus an items JSONL (see docs/serve.md)")
    items = []
    for lineno, record in read_jsonl_lines(path):
        try:
            item = Item.from_record(record, path.parent)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise DataError(f"not an item record ({path}, line {lineno}: {err}): see docs/data.md") from None
        missing = missing_media(item)
        if missing:
            raise DataError(f"missing media file {missing[0]} ({path}, line {lineno}): restore it or drop the row")
        items.append(item)
    _check_ids(items, where=str(path))
    return items


def _check_ids(items: Sequence[Item], where: str) -> None:
    missing = [i for i, item in enumerate(items) if not item.id]
    if missing:
        raise IndexFormatError(f"{where}: item(s) at position(s) {missing[:5]} have no id; give every item an id")
    repeated = [item_id for item_id, n in Counter(item.id for item in items).items() if n > 1]
    if repeated:
        raise IndexFormatError(f"{where}: ids {repeated[:5]} occur more than once; ids must be unique")


def evidence_summary(item: Item, mode: str, video_as: str = "video", layout: str = LAYOUT_EMBEDRL) -> dict[str, Any]:
    """What the Embedder sees of an item's T-CoT: the parsed cue (key frames 1-based in the embedrl layout, as
    written in the reference layout, which reads them 0-based), evidence count, repairs."""
    if mode == "raw" or item.tcot is None:
        return {"cue": None, "values": [], "evidence_images": 0, "problems": []}
    if layout == LAYOUT_REFERENCE:
        built = build_embedder_messages(item, mode, layout=layout)  # type: ignore[arg-type]
        cue = built.cue or {}
        key = next((k for k in CUE_KEYS if k in cue), next(iter(cue), None))
        value = cue.get(key, []) if key is not None else []
        return {
            "cue": key,
            "values": value if isinstance(value, list) else [value],
            "evidence_images": built.evidence_count,
            "problems": list(built.problems),
        }
    built = build_embedder_messages(item, mode, video_as=video_as)  # type: ignore[arg-type]
    tcot = built.tcot
    assert tcot is not None
    values: list[Any] = [f + 1 for f in tcot.frames] if tcot.cue_key == "key_frames" else list(tcot.cue_values)
    own = len(item.images) + (len(item.frames) if video_as == "frames" else 0)
    return {
        "cue": tcot.cue_key,
        "values": values,
        "evidence_images": len(built.images) - own,
        "problems": list(built.problems),
    }


# ----------------------------------------------------------------------------------------------------------------
# The FAISS index
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SearchHit:
    """One result: rank (1-based), item id, inner-product score, the stored item and its T-CoT."""

    rank: int
    id: str
    score: float
    item: Item
    tcot: str | None

    def as_dict(self) -> dict[str, Any]:
        record = self.item.to_record()
        return {"rank": self.rank, "id": self.id, "score": self.score, "item": record, "tcot": self.tcot}


def _faiss() -> ModuleType:
    # faiss loads its SWIG bindings and BLAS on import: only code that builds, searches or saves an index pays it.
    # Its loader logs each step of that at INFO (8 lines on every command): only its warnings are wanted.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def _new_faiss_index(cfg: IndexConfig, dim: int) -> Any:
    faiss = _faiss()
    if cfg.index_type == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif cfg.index_type == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = cfg.hnsw_ef_construction
    else:
        # The nlist is fixed when the first vectors arrive (it depends on their number), see SearchIndex.add.
        inner = None
    return None if inner is None else faiss.IndexIDMap2(inner)


@dataclass(eq=False, repr=False)
class SearchIndex:
    """A FAISS inner-product index over unit vectors whose ids are row numbers of the stored items.

    Args:
        cfg: the index settings (type and its parameters; mode and T-CoT source are recorded with it).
        dim: vector size.
        embedder_id, reasoner_id: fingerprints of the models that embedded the items (checked by :class:`Searcher`).
        faiss_index, items, tcots, modality_counts: the state of a saved index (:meth:`load`); the modality
            counts give the candidates' prevailing modality (routes text queries).
    """

    cfg: IndexConfig
    dim: int
    _: dataclasses.KW_ONLY
    embedder_id: str = ""
    reasoner_id: str | None = None
    faiss_index: Any = None
    items: list[Item] = field(default_factory=list)
    tcots: list[str | None] = field(default_factory=list)
    modality_counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim={self.dim} must be >= 1")
        if self.faiss_index is None:
            self.faiss_index = _new_faiss_index(self.cfg, self.dim)
        self.items = list(self.items)
        self.tcots = list(self.tcots) or [None] * len(self.items)
        self.modality_counts = Counter(self.modality_counts)
        self._rows = {item.id: row for row, item in enumerate(self.items)}
        self._configure_search()

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._rows

    @property
    def target_modality(self) -> Modality | None:
        """The prevailing modality of the indexed items (None while empty)."""
        return self.modality_counts.most_common(1)[0][0] if self.modality_counts else None  # type: ignore[return-value]

    def _configure_search(self) -> None:
        if self.faiss_index is None:
            return
        inner = _faiss().downcast_index(self.faiss_index.index)
        if self.cfg.index_type == "hnsw":
            inner.hnsw.efSearch = self.cfg.hnsw_ef_search
        elif self.cfg.index_type == "ivf":
            inner.nprobe = self.cfg.ivf_nprobe

    def _train_ivf(self, vectors: np.ndarray) -> None:
        faiss = _faiss()
        nlist = self.cfg.ivf_nlist or max(1, round(4 * math.sqrt(len(vectors))))
        if len(vectors) < nlist:
            raise IndexFormatError(
                f"an IVF index with nlist={nlist} needs at least {nlist} vectors in its first batch, got "
                f"{len(vectors)}; lower ivf_nlist or use index_type flat"
            )
        quantizer = faiss.IndexFlatIP(self.dim)
        inner = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        inner.train(vectors)
        inner.make_direct_map()  # so vectors() can reconstruct rows
        self.faiss_index = faiss.IndexIDMap2(inner)
        self._configure_search()

    def add(self, items: Sequence[Item], vectors: np.ndarray, tcots: Sequence[str | None] | None = None) -> None:
        """Append items with their vectors ``[N, D]`` (and the T-CoTs they were embedded with).

        Raises:
            IndexFormatError: a repeated or already indexed id, a size mismatch or non-finite vectors.
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(items), self.dim):
            raise IndexFormatError(f"need vectors of shape ({len(items)}, {self.dim}), got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise IndexFormatError("vectors hold NaN or inf; they cannot be indexed")
        _check_ids(items, where="SearchIndex.add")
        present = [item.id for item in items if item.id in self._rows]
        if present:
            raise IndexFormatError(f"ids {present[:5]} are already in the index; give new items new ids")
        if not len(items):
            return
        if self.faiss_index is None:
            self._train_ivf(vectors)
        start = len(self.items)
        self.faiss_index.add_with_ids(vectors, np.arange(start, start + len(items), dtype=np.int64))
        tcots = list(tcots) if tcots is not None else [item.tcot for item in items]
        for item, tcot in zip(items, tcots, strict=True):
            self._rows[item.id] = len(self.items)
            self.items.append(item)
            self.tcots.append(tcot)
            self.modality_counts[item.modality] += 1

    def _reserve(self, rows: int) -> None:
        """Allocate the vector storage of a flat or HNSW index for ``rows`` more vectors in one go.

        FAISS keeps the vectors in one growing ``std::vector``: an add that outgrows it reallocates, holding the
        old and the new buffer at once (up to about 2x the index for a moment). Growing it to the final size and
        shrinking it back keeps that capacity, so chunked adds fill it in place. IVF lists grow one by one: no-op.
        """
        if self.faiss_index is None or self.cfg.index_type not in ("flat", "hnsw"):
            return
        faiss = _faiss()
        inner = faiss.downcast_index(self.faiss_index.index)
        storage = faiss.downcast_index(inner.storage) if self.cfg.index_type == "hnsw" else inner
        codes, size = storage.codes, storage.codes.size()
        codes.resize(size + rows * storage.code_size)
        codes.resize(size)

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[SearchHit]]:
        """The top ``k`` hits of each query ``[Q, D]``, best first (exact for ``flat``)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise IndexFormatError(f"need queries of shape (Q, {self.dim}), got {queries.shape}")
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        if not self.items:
            return [[] for _ in range(len(queries))]
        scores, rows = self.faiss_index.search(queries, min(k, len(self.items)))
        return [
            [
                SearchHit(rank, self.items[row].id, float(score), self.items[row], self.tcots[row])
                for rank, (score, row) in enumerate(zip(score_row, row_row, strict=True), 1)
                if row >= 0
            ]
            for score_row, row_row in zip(scores, rows, strict=True)
        ]

    def vectors(self) -> np.ndarray:
        """The stored vectors ``[N, D]`` in row order (flat and HNSW store them; IVF-flat too)."""
        if not self.items:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.stack([self.faiss_index.reconstruct(row) for row in range(len(self.items))])

    # ------------------------------------------------------------------------------------------------------------
    # Persistence
    # ------------------------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the index directory (each file through a temporary name; ``index.json`` last)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, path)
        lines = [
            json.dumps({"row": row, "item": item.to_record(), "tcot": tcot}, sort_keys=True, ensure_ascii=False)
            for row, (item, tcot) in enumerate(zip(self.items, self.tcots, strict=True))
        ]
        atomic_write_bytes(path / ITEMS_FILE, "".join(line + "\n" for line in lines).encode("utf-8"))
        if self.faiss_index is not None:
            tmp = path / (INDEX_FILE + ".tmp")
            _faiss().write_index(self.faiss_index, str(tmp))
            os.replace(tmp, path / INDEX_FILE)
        info = {
            "format_version": FORMAT_VERSION,
            "dim": self.dim,
            "count": len(self.items),
            "index_type": self.cfg.index_type,
            "mode": self.cfg.mode,
            "tcot_source": self.cfg.tcot_source,
            "embedder_id": self.embedder_id,
            "reasoner_id": self.reasoner_id,
            "modality_counts": dict(self.modality_counts),
            "embedrl_version": __version__,
        }
        atomic_write_bytes(path / INFO_FILE, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> SearchIndex:
        """Read an index directory written by :meth:`save`.

        Raises:
            IndexFormatError: a missing file, another format version, or counts that disagree.
        """
        path = Path(path)
        info_file = path / INFO_FILE
        if not info_file.is_file():
            raise IndexFormatError(f"{path} is not a finished index ({INFO_FILE} missing); run embedrl index build")
        info = json.loads(info_file.read_text())
        if info.get("format_version") != FORMAT_VERSION:
            raise IndexFormatError(
                f"{info_file}: format_version {info.get('format_version')}, this embedrl reads {FORMAT_VERSION}; "
                "rebuild the index"
            )
        payload = json.loads((path / "config.json").read_text())
        cfg = config_from_dict(IndexConfig, payload["config"])
        items, tcots = [], []
        for expected, record in enumerate(read_jsonl(path / ITEMS_FILE)):
            if record["row"] != expected:
                raise IndexFormatError(f"{path / ITEMS_FILE}: row {record['row']} where {expected} was expected")
            items.append(Item.from_record(record["item"]))
            tcots.append(record["tcot"])
        faiss_index = _faiss().read_index(str(path / INDEX_FILE)) if (path / INDEX_FILE).is_file() else None
        ntotal = faiss_index.ntotal if faiss_index is not None else 0
        if len(items) != info["count"] or ntotal != info["count"]:
            raise IndexFormatError(
                f"{path}: {INFO_FILE} says {info['count']} items, {ITEMS_FILE} has {len(items)} and {INDEX_FILE} "
                f"{ntotal}; the directory was changed by hand or a write was cut: rebuild it (the cache is kept)"
            )
        return cls(
            cfg,
            info["dim"],
            embedder_id=info["embedder_id"],
            reasoner_id=info["reasoner_id"],
            faiss_index=faiss_index,
            items=items,
            tcots=tcots,
            modality_counts=info["modality_counts"],
        )


# ----------------------------------------------------------------------------------------------------------------
# Stages: build, add, search
# ----------------------------------------------------------------------------------------------------------------


def _resolved(path: str) -> str:
    """An existing local path made absolute (so the saved config works from any directory); else unchanged."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def load_index_models(cfg: IndexConfig) -> tuple[Embedder, Reasoner | None]:
    """The Embedder (in the config's layout) and the Reasoner (None when ``cfg.reasoner`` is empty) named by an index
    config."""
    return load_run_models(cfg, cfg.model)


def _pipeline(
    cfg: IndexConfig, embedder: Embedder, reasoner: Reasoner | None, cache_dir: Path | None
) -> EmbedPipeline:
    return EmbedPipeline(
        embedder,
        reasoner if cfg.tcot_source == "reasoner" else None,
        decoding=decoding_from_config(cfg),
        cache_dir=cache_dir,
        batch_size=cfg.batch_size,
        reasoner_batch_size=cfg.reasoner_batch_size,
        show_progress_bar=cfg.show_progress_bar,
    )


def _candidates(cfg: IndexConfig, items: Sequence[Item]) -> list[Item]:
    """The corpus items as the pipeline takes them: T-CoTs cleared unless they come from the corpus."""
    if cfg.tcot_source == "corpus":
        missing = [item.id for item in items if item.tcot is None]
        if missing:
            raise IndexFormatError(
                f"tcot_source=corpus but {len(missing)} item(s) have no tcot (e.g. {missing[:3]}); add them or "
                "use tcot_source reasoner"
            )
        return list(items)
    return [item.with_tcot(None) for item in items]


def _index_candidates(
    pipeline: EmbedPipeline, cfg: IndexConfig, index: SearchIndex, items: Sequence[Item], *, compact: bool = False
) -> None:
    """Embed ``items`` (T-CoTs first, unless raw) through the pipeline's caches and add them to ``index``.

    The corpus matrix is never stacked whole: every missing embedding is computed and cached first (one shard per
    Embedder batch, so a killed run resumes), the shards are merged when ``compact``, and then the vectors reach
    FAISS :data:`ADD_CHUNK_ROWS` at a time from the cache (an empty IVF index is trained first, on all of them;
    a flat or HNSW index's storage is sized once, :meth:`SearchIndex._reserve`). So the cache and the FAISS index
    hold the only full copies: peak about 2x the float32 matrix (docs/serve.md).
    """
    candidates = _candidates(cfg, items)
    annotated = candidates if cfg.mode == "raw" else pipeline.annotate(candidates, "target")
    inputs = [(item, cfg.mode) for item in annotated]
    cache = pipeline.embedding_cache()
    if cache is None:
        raise ValueError("indexing needs a pipeline with a cache_dir (its embedding cache feeds FAISS)")
    step = pipeline.batch_size * max(1, ADD_CHUNK_ROWS // pipeline.batch_size)  # whole Embedder batches per chunk
    chunks = [slice(start, start + step) for start in range(0, len(inputs), step)]
    for chunk in chunks:
        pipeline.embed_inputs(inputs[chunk], cache=cache)  # computes and caches what is missing
    if compact:
        cache.compact()
    if index.faiss_index is None and inputs:  # IVF: nlist and centroids come from the whole corpus
        index._train_ivf(pipeline.embed_inputs(inputs, cache=cache))
    index._reserve(len(inputs))
    for chunk in chunks:
        vectors = pipeline.embed_inputs(inputs[chunk], cache=cache)  # [chunk, D], read back from the cache
        index.add(items[chunk], vectors, [item.tcot for item in annotated[chunk]])


def build_index(
    cfg: IndexConfig, *, embedder: Embedder | None = None, reasoner: Reasoner | None = None
) -> SearchIndex:
    """The ``embedrl index build`` stage: corpus -> T-CoTs -> embeddings -> FAISS index in ``cfg.out``.

    Target-side T-CoTs are generated once per candidate and cached with the embeddings under ``<out>/cache``, one
    batch at a time: rerunning a killed build reads back every finished batch and computes only the rest. Models
    may be passed already loaded; otherwise they are loaded from ``cfg.model`` / ``cfg.reasoner``.
    """
    out = Path(cfg.out)
    cfg = dataclasses.replace(
        cfg, model=_resolved(cfg.model), reasoner=_resolved(cfg.reasoner), corpus=_resolved(cfg.corpus)
    )
    items = read_corpus(cfg.corpus)
    if embedder is None:
        embedder, loaded_reasoner = load_index_models(cfg)
        reasoner = reasoner or loaded_reasoner
    if cfg.tcot_source == "reasoner" and reasoner is None:
        raise IndexFormatError("tcot_source=reasoner needs a Reasoner: pass reasoner=... or set cfg.reasoner")
    save_config(cfg, out)  # before the work, so a resumed build can be checked against it
    pipeline = _pipeline(cfg, embedder, reasoner, out / CACHE_DIR)
    index = SearchIndex(cfg, embedder.dim, embedder_id=pipeline.embedder_id, reasoner_id=pipeline.reasoner_id)
    _index_candidates(pipeline, cfg, index, items, compact=True)
    index.save(out)
    logger.info("indexed %d items (%s, mode %s) in %s", len(index), cfg.index_type, cfg.mode, out)
    return index


def add_to_index(
    path: str | Path,
    items: Sequence[Item],
    *,
    embedder: Embedder | None = None,
    reasoner: Reasoner | None = None,
) -> SearchIndex:
    """``embedrl index add``: embed new items like the indexed ones and append them (the same caches resume it).

    Raises:
        IndexFormatError: an id that is already indexed, or models other than the index's.
    """
    path = Path(path)
    index = SearchIndex.load(path)
    cfg = index.cfg
    if embedder is None:
        embedder, loaded_reasoner = load_index_models(cfg)
        reasoner = reasoner or loaded_reasoner
    pipeline = _pipeline(cfg, embedder, reasoner, path / CACHE_DIR)
    _check_models(index, pipeline)
    present = [item.id for item in items if item.id in index]
    if present:
        raise IndexFormatError(f"ids {present[:5]} are already in {path}; give new items new ids")
    _check_ids(items, where="the new items")
    _index_candidates(pipeline, cfg, index, items)
    index.save(path)
    return index


def _check_models(index: SearchIndex, pipeline: EmbedPipeline) -> None:
    if pipeline.embedder_id != index.embedder_id:
        raise IndexFormatError(
            f"the loaded Embedder is {pipeline.embedder_id} but the index was built with {index.embedder_id}; "
            f"load {index.cfg.model} (queries and candidates must share one Embedder)"
        )
    if index.cfg.tcot_source == "reasoner" and pipeline.reasoner_id != index.reasoner_id:
        raise IndexFormatError(
            f"the loaded Reasoner is {pipeline.reasoner_id} but the index's T-CoTs come from {index.reasoner_id}; "
            f"load {index.cfg.reasoner}"
        )


@dataclass
class SearchResult:
    """One query's answer: its T-CoT (None in raw mode), what the Embedder saw of it, and the hits."""

    query: Item
    tcot: str | None
    evidence: dict[str, Any]
    hits: list[SearchHit]

    def as_dict(self) -> dict[str, Any]:
        query = self.query
        return {
            "query": {
                "id": query.id,
                "text": query.text,
                "instruction": query.instruction,
                "images": len(query.images),
                "frames": len(query.frames),
            },
            "tcot": self.tcot,
            "evidence": self.evidence,
            "results": [hit.as_dict() for hit in self.hits],
        }


class Searcher:
    """Queries -> (query-side T-CoT) -> Embedder -> index: ``embedrl search`` and the server's ``/search``.

    Queries are embedded like the index's candidates (same Embedder, mode and decoding); text queries are routed to
    the query family of the index's prevailing candidate modality. With ``tcot_source: corpus`` queries need their
    own ``tcot`` or a Reasoner.
    """

    def __init__(self, index: SearchIndex, embedder: Embedder, reasoner: Reasoner | None = None) -> None:
        self.index = index
        cfg = index.cfg
        self.pipeline = EmbedPipeline(
            embedder, reasoner, decoding=decoding_from_config(cfg), batch_size=cfg.batch_size
        )
        if cfg.tcot_source == "reasoner" and reasoner is None:
            raise IndexFormatError(
                f"the index's T-CoTs come from the Reasoner {cfg.reasoner}; queries need it too: load it"
            )
        _check_models(index, self.pipeline)

    @classmethod
    def from_path(cls, path: str | Path, *, model: str = "", reasoner: str = "") -> Searcher:
        """Load an index and the models recorded in its config (``model``/``reasoner`` override the paths)."""
        index = SearchIndex.load(path)
        cfg = dataclasses.replace(index.cfg, model=model or index.cfg.model, reasoner=reasoner or index.cfg.reasoner)
        embedder, loaded = load_index_models(cfg)
        return cls(index, embedder, loaded)

    def search(self, queries: Sequence[Item], k: int = 10) -> list[SearchResult]:
        mode = self.index.cfg.mode
        try:
            vectors, annotated = self.pipeline.run(queries, mode, "query", self.index.target_modality)
        except MissingTCoTError as err:
            raise IndexFormatError(str(err)) from err
        hits = self.index.search(vectors, k) if len(queries) else []
        embedder = self.pipeline.embedder
        video_as, layout = embedder.video_as, getattr(embedder, "layout", LAYOUT_EMBEDRL)
        return [
            SearchResult(
                query, query.tcot if mode != "raw" else None, evidence_summary(query, mode, video_as, layout), h
            )
            for query, h in zip(annotated, hits, strict=True)
        ]
