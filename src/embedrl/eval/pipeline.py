"""The one cached path from items to vectors: Reasoner T-CoTs, then Embedder embeddings (docs/method.md §6.1).

:class:`EmbedPipeline` serves every consumer outside training: the evaluation engine
(:class:`~embedrl.eval.evaluator.TaskEvaluator`, one pair of caches per task), index builds and search
(:mod:`embedrl.serve.index`) and the server (:mod:`embedrl.serve.server`).

- **T-CoTs** (:meth:`EmbedPipeline.generate`) are keyed by ``(item id, side, reasoner id, prompt hash, decoding)``
  (:class:`~embedrl.eval.cache.TCoTKey`). Queries get the query-side family (routed by the candidates' modality,
  docs/method.md §6.3), candidates their target-side family, never seeing a query. Every unique item not cached is
  generated once: all of a call's items go to :meth:`Reasoner.generate_batches
  <embedrl.models.reasoner.Reasoner.generate_batches>` together, which sorts them by modality and prompt length into
  batches, and each finished batch is appended to the cache, so a killed run resumes where it stopped.
- **Embeddings** (:meth:`EmbedPipeline.embed_inputs`) are keyed by ``(item id, embedder id, mode, T-CoT hash)``
  (:func:`~embedrl.eval.cache.embedding_key`); each unique key is encoded once, one cache shard per batch.
- **Without a cache** (``cache=None``: the server, queries at search time) nothing is keyed by item id, so ids need
  not be unique: every item is generated, and each mode's items go to the Embedder in one ``encode`` call (it
  batches them by length itself).

The ids in the keys default to fingerprints of the weights and settings (:func:`embedder_fingerprint`,
:func:`reasoner_fingerprint`). The models come from :mod:`embedrl.models.loading` (the one loader);
:func:`decoding_from_config` turns a stage config into the pipeline's decoding.

Example:
    >>> pipeline = EmbedPipeline(embedder, reasoner, cache_dir="runs/index/cache")  # doctest: +SKIP
    >>> vectors, annotated = pipeline.run(items, "full", "target")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from embedrl.config import DecodingFields, EmbedRunFields
from embedrl.data.schema import Item, Modality
from embedrl.eval.cache import (
    EmbeddingCache,
    TCoTCache,
    TCoTKey,
    decoding_key,
    embedding_key,
    weights_fingerprint,
)
from embedrl.eval.task import EvalError, MissingTCoTError
from embedrl.models.embedder import Embedder
from embedrl.models.generation import engine_settings
from embedrl.models.loading import load_embedder, load_reasoner
from embedrl.models.reasoner import Decoding, Reasoner
from embedrl.prompts import LAYOUT_EMBEDRL, PROMPT_FAMILIES, Side, choose_family

__all__ = [
    "EMBEDDINGS_DIR",
    "TCOTS_FILE",
    "Counts",
    "EmbedPipeline",
    "Encoder",
    "checkpoint_fingerprint",
    "decoding_from_config",
    "embedder_fingerprint",
    "reasoner_fingerprint",
]

TCOTS_FILE, EMBEDDINGS_DIR = "tcots.jsonl", "embeddings"  # the caches under EmbedPipeline(cache_dir=...)


class Encoder(Protocol):
    """What the pipeline needs of an Embedder: :meth:`embedrl.models.Embedder.encode`'s signature."""

    def encode(
        self,
        items: Sequence[Item],
        batch_size: int = ...,
        show_progress_bar: bool | None = ...,
        mode: str | None = ...,
    ) -> np.ndarray: ...


class Counts(Protocol):
    """Counters the pipeline adds to (e.g. :class:`~embedrl.eval.evaluator.TaskStats`)."""

    tcots_generated: int
    tcots_cached: int
    embedded: int
    embeddings_cached: int


# ----------------------------------------------------------------------------------------------------------------
# Decoding from stage configs, and the models' cache ids
# ----------------------------------------------------------------------------------------------------------------


def decoding_from_config(cfg: DecodingFields) -> Decoding:
    """The :class:`~embedrl.models.reasoner.Decoding` of a stage config (its fields carry the same names)."""
    return Decoding(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(Decoding)})


def load_run_models(cfg: EmbedRunFields, embedder_path: str) -> tuple[Embedder, Reasoner | None]:
    """The Embedder at ``embedder_path`` (in the config's layout) and the Reasoner ``cfg.reasoner`` (None when empty)
    of a stage that embeds with T-CoTs (evaluation, index), loaded with the stage's dtype, device, attention and
    generation engine."""
    embedder = load_embedder(embedder_path, layout=cfg.layout, dtype=cfg.dtype, device=cfg.device,
                             attn_implementation=cfg.attn_implementation)  # fmt: skip
    if not cfg.reasoner:
        return embedder, None
    reasoner = load_reasoner(
        cfg.reasoner,
        dtype=cfg.dtype,
        device=cfg.device,
        compact_prompts=cfg.compact_prompts,
        engine=engine_settings(cfg, cfg.reasoner_batch_size),
        attn_implementation=cfg.attn_implementation,
    )
    return embedder, reasoner


def embedder_fingerprint(embedder: Embedder) -> str:
    """``embedder@<hash>``: the weights plus the settings that change its outputs (video_as, text cap, pixel budget,
    ``<emb>`` id, input layout). The mode is not in it: it is a separate part of every embedding key. The layout
    enters only when it is not ``embedrl``, so fingerprints (and caches) from before layouts existed stay valid."""
    settings: dict[str, Any] = {
        "video_as": embedder.video_as,
        "max_text_tokens": embedder.max_text_tokens,
        "budget": dataclasses.asdict(embedder.budget),
        "emb_token_id": embedder.emb_token_id,
    }
    if embedder.layout != LAYOUT_EMBEDRL:
        settings["layout"] = embedder.layout
    return "embedder@" + weights_fingerprint(embedder.model, settings)


def reasoner_fingerprint(reasoner: Reasoner) -> str:
    """``<checkpoint dir name>@<hash>``: the weights plus the pixel budget and the generation backend. A vLLM
    Reasoner holds no weights: its checkpoint's weight files are hashed instead (:func:`checkpoint_fingerprint`)."""
    settings = {"budget": dataclasses.asdict(reasoner.budget), "backend": reasoner.backend}
    if reasoner.model is None:
        assert reasoner.checkpoint is not None  # a Reasoner without a model has its checkpoint (Reasoner.__init__)
        return f"{Path(reasoner.model_id).name}@{checkpoint_fingerprint(reasoner.checkpoint, settings)}"
    return f"{Path(reasoner.model_id).name}@{weights_fingerprint(reasoner.model, settings)}"


def checkpoint_fingerprint(folder: str | Path, extra: dict[str, Any] | None = None) -> str:
    """First 16 hex digits of a SHA-256 over ``extra`` (as JSON) and the name and bytes of every ``*.safetensors``
    file of a checkpoint folder (read in 16 MiB blocks).

    Raises:
        EvalError: the folder has no safetensors file.
    """
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise EvalError(f"{folder} has no *.safetensors weights to fingerprint; pass reasoner_id=...")
    digest = hashlib.sha256(json.dumps(extra or {}, sort_keys=True, default=str).encode("utf-8"))
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            while block := f.read(16 * 2**20):
                digest.update(block)
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------


def _batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def _label(task: str, what: str) -> str:
    """A progress-bar label, prefixed by the task when there is one."""
    return f"{task} {what}" if task else what


class EmbedPipeline:
    """Items -> Reasoner T-CoTs -> Embedder vectors, through the T-CoT and embedding caches.

    Args:
        embedder: the Embedder (or any object with its ``encode`` signature; then pass ``embedder_id`` to use a
            cache).
        reasoner: generates T-CoTs; None = items without one are an error outside ``raw`` mode.
        decoding: the Reasoner's decoding (default greedy, so a T-CoT is reproducible).
        cache_dir: the caches of :meth:`annotate` and :meth:`embed` (``tcots.jsonl``, ``embeddings/``); None = no
            caching there (then item ids need not be unique). :meth:`generate` and :meth:`embed_inputs` take their
            caches as arguments.
        embedder_id, reasoner_id: cache ids; default fingerprints of the weights and settings.
        batch_size: items per Embedder call (one cache shard each); reasoner_batch_size: items per Reasoner batch
            (one T-CoT-cache append each; None = the Reasoner engine's batch size).
        show_progress_bar: tqdm bars over generation and embedding batches.
    """

    def __init__(
        self,
        embedder: Embedder | Encoder,
        reasoner: Reasoner | None = None,
        *,
        decoding: Decoding | None = None,
        cache_dir: str | Path | None = None,
        embedder_id: str | None = None,
        reasoner_id: str | None = None,
        batch_size: int = 16,
        reasoner_batch_size: int | None = None,
        show_progress_bar: bool = False,
    ) -> None:
        self.embedder = embedder
        self.reasoner = reasoner
        self.decoding = decoding or Decoding(greedy=True)
        self.batch_size = batch_size
        self.reasoner_batch_size = reasoner_batch_size
        self.show_progress_bar = show_progress_bar
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._embedder_id = embedder_id
        self._reasoner_id = reasoner_id

    @property
    def embedder_id(self) -> str:
        if self._embedder_id is None:
            if not isinstance(self.embedder, Embedder):
                raise EvalError(f"a {type(self.embedder).__name__} has no fingerprint: pass embedder_id=...")
            self._embedder_id = embedder_fingerprint(self.embedder)
        return self._embedder_id

    @property
    def reasoner_id(self) -> str | None:
        if self._reasoner_id is None and self.reasoner is not None:
            self._reasoner_id = reasoner_fingerprint(self.reasoner)
        return self._reasoner_id

    # ------------------------------------------------------------------------------------------------------------
    # The two cached steps
    # ------------------------------------------------------------------------------------------------------------

    def generate(
        self,
        items: Sequence[Item],
        side: Side,
        target_modality: Modality | None = None,
        *,
        cache: TCoTCache | None = None,
        stats: Counts | None = None,
        task: str = "",
    ) -> list[str]:
        """A Reasoner T-CoT for every item (a T-CoT an item carries is ignored), in item order.

        Cached T-CoTs are read back; each unique key not cached is generated once, and every finished batch is
        appended to ``cache``. ``cache=None`` keys items by position: all are generated and nothing is kept.
        ``stats`` counts T-CoTs generated and read back; ``task`` names the progress bar.
        """
        reasoner = self.reasoner
        if reasoner is None:
            raise EvalError("generating T-CoTs needs a Reasoner")
        keyed = cache is not None
        cache = cache if cache is not None else TCoTCache(None)
        decoding = decoding_key(self.decoding)
        reasoner_id = str(self.reasoner_id) if keyed else ""
        keys = [
            TCoTKey(
                item.id if keyed else str(i),
                side,
                reasoner_id,
                PROMPT_FAMILIES[choose_family(side, item.modality, target_modality)].hash(reasoner.compact_prompts),
                decoding,
            )
            for i, item in enumerate(items)
        ]
        first: dict[TCoTKey, int] = {}
        for i, key in enumerate(keys):
            if key not in cache and key not in first:
                first[key] = i
        todo = list(first.values())
        if stats is not None:
            stats.tcots_cached += len(set(keys)) - len(todo)
        batches = reasoner.generate_batches(
            [items[i] for i in todo], side, target_modality, decoding=self.decoding,
            batch_size=self.reasoner_batch_size, show_progress_bar=False,
        )  # fmt: skip
        with tqdm(total=len(todo), desc=_label(task, f"T-CoTs ({side})"), disable=not self.show_progress_bar,
                  leave=False) as bar:  # fmt: skip
            for batch, generations in batches:
                entries = []
                for j, outs in zip(batch, generations, strict=True):
                    (gen,) = outs
                    i = todo[j]
                    if gen.prompt_hash != keys[i].prompt_hash:
                        raise RuntimeError(
                            f"{items[i].id}: generated with prompt {gen.prompt_hash}, keyed as {keys[i].prompt_hash}"
                        )
                    entries.append((keys[i], gen.text, gen.family))
                cache.add(entries)
                bar.update(len(batch))
                if stats is not None:
                    stats.tcots_generated += len(batch)
        texts = [cache.get(key) for key in keys]
        assert all(t is not None for t in texts)
        return texts  # type: ignore[return-value]

    def embed_inputs(
        self,
        inputs: Sequence[tuple[Item, str]],
        *,
        cache: EmbeddingCache | None = None,
        stats: Counts | None = None,
        task: str = "",
    ) -> np.ndarray:
        """Unit-norm float32 vectors ``[N, D]`` of ``(item, Embedder mode)`` inputs (items carry their T-CoT).

        Cached vectors are read back; each unique key not cached is encoded once, ``batch_size`` items per call and
        cache shard. ``cache=None`` keys inputs by position and encodes each mode's inputs in one call.

        Raises:
            EvalError: the encoder returned misshapen or non-finite vectors.
        """
        keyed = cache is not None
        cache = cache if cache is not None else EmbeddingCache(None)
        embedder_id = self.embedder_id if keyed else ""
        keys = [
            embedding_key(item.id if keyed else str(i), embedder_id, mode, item.tcot)
            for i, (item, mode) in enumerate(inputs)
        ]
        todo: dict[str, list[int]] = {}  # mode -> first index of each key not cached yet
        first: set[str] = set()
        for i, key in enumerate(keys):
            if key not in cache and key not in first:
                first.add(key)
                todo.setdefault(inputs[i][1], []).append(i)
        if stats is not None:
            stats.embeddings_cached += len(set(keys)) - len(first)
        size = self.batch_size if keyed else max(len(inputs), 1)
        batches = [(mode, batch) for mode, idx in todo.items() for batch in _batches(idx, size)]
        for mode, batch in tqdm(batches, desc=_label(task, "embed"), disable=not self.show_progress_bar, leave=False):
            cache.add([keys[i] for i in batch], self._encode([inputs[i][0] for i in batch], mode, task))
            if stats is not None:
                stats.embedded += len(batch)
        if not keys:
            return np.empty((0, self.embedder.dim), dtype=np.float32)  # type: ignore[union-attr]
        return np.stack([cache.get(key) for key in keys])  # type: ignore[misc]

    def _encode(self, items: Sequence[Item], mode: str, task: str) -> np.ndarray:
        vectors = self.embedder.encode(items, batch_size=self.batch_size, show_progress_bar=False, mode=mode)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(items) or not np.isfinite(vectors).all():
            raise EvalError(
                f"{task + ': ' if task else ''}the encoder returned {vectors.shape} (finite: "
                f"{bool(np.isfinite(vectors).all())}) for {len(items)} items; it must return finite [n_items, D] "
                "vectors"
            )
        return vectors

    # ------------------------------------------------------------------------------------------------------------
    # Items in, vectors out: the caches under cache_dir
    # ------------------------------------------------------------------------------------------------------------

    def tcot_cache(self) -> TCoTCache | None:
        """``<cache_dir>/tcots.jsonl`` as it is on disk now (None without a cache directory)."""
        return TCoTCache(self.cache_dir / TCOTS_FILE) if self.cache_dir is not None else None

    def embedding_cache(self) -> EmbeddingCache | None:
        """``<cache_dir>/embeddings/`` as it is on disk now (None without a cache directory)."""
        return EmbeddingCache(self.cache_dir / EMBEDDINGS_DIR) if self.cache_dir is not None else None

    def annotate(self, items: Sequence[Item], side: Side, target_modality: Modality | None = None) -> list[Item]:
        """The items with a T-CoT each: their own, or one generated by the Reasoner on ``side``.

        Raises:
            MissingTCoTError: an item has no T-CoT and there is no Reasoner.
        """
        todo = [i for i, item in enumerate(items) if item.tcot is None]
        if not todo:
            return list(items)
        if self.reasoner is None:
            raise MissingTCoTError(
                f"{len(todo)} item(s) have no T-CoT (e.g. {items[todo[0]].id!r}) and no Reasoner is loaded; load a "
                "Reasoner, give the items a tcot, or use mode raw"
            )
        texts = self.generate([items[i] for i in todo], side, target_modality, cache=self.tcot_cache())
        out = list(items)
        for i, text in zip(todo, texts, strict=True):
            out[i] = items[i].with_tcot(text)
        return out

    def embed(self, items: Sequence[Item], mode: str) -> np.ndarray:
        """Unit-norm float32 vectors ``[N, D]`` of items (which carry their T-CoT unless ``mode`` is raw)."""
        return self.embed_inputs([(item, mode) for item in items], cache=self.embedding_cache())

    def run(
        self, items: Sequence[Item], mode: str, side: Side, target_modality: Modality | None = None
    ) -> tuple[np.ndarray, list[Item]]:
        """``(vectors [N, D], items with their T-CoTs)``: :meth:`annotate` (unless raw), then :meth:`embed`."""
        annotated = list(items) if mode == "raw" else self.annotate(items, side, target_modality)
        return self.embed(annotated, mode), annotated
