"""An embedrl Embedder as a sentence-transformers 6.x model: the same vectors as :meth:`Embedder.encode`.

A folder written by :meth:`~embedrl.models.Embedder.save` is also a sentence-transformers model folder
(:meth:`~embedrl.models.Embedder.write_sentence_transformers_files`): ``modules.json`` lists :class:`EmbedderModule`
(this module's input module) and sentence-transformers' ``Normalize``; ``config_sentence_transformers.json`` holds the
``query`` / ``document`` prompts (``prompts.QUERY_INSTRUCTION`` / ``prompts.DOCUMENT_INSTRUCTION``) and cosine
similarity. sentence-transformers imports a module class outside its own package only with ``trust_remote_code=True``
(for local folders too), so::

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer("runs/embedder", trust_remote_code=True)  # the class is embedrl's, installed
    q = model.encode_query("a red kite")  # instruction QUERY_INSTRUCTION, Reasoner side "query"
    d = model.encode_document([{"image": "kite.png"}, {"text": "two cats", "tcot": "<thinking>..."}])
    model.similarity(q, d)

Without the flag sentence-transformers refuses the folder with an error that names the flag (never a model with the
wrong pooling). :func:`to_sentence_transformer` wraps an Embedder already in memory (any checkpoint
:func:`embedrl.load_embedder` reads, the published ones included) without a folder or the flag.

How an input reaches the Embedder: sentence-transformers hands each batch, as the user passed it, to
:meth:`EmbedderModule.preprocess`, which reads every input with :func:`embedrl.models.embedder.as_item` (the rules of
``Embedder.encode``: a ``str`` is text, an image is a PIL image or ``pathlib.Path``, a list of images is one video,
dicts take ``text``/``image(s)``/``frames``/``video``/``instruction``/``tcot``, and ``Item`` s pass as they are). The
resolved prompt (``encode_query``'s ``query`` prompt, ``encode_document``'s ``document`` prompt or ``prompt=...``)
becomes the instruction of each input without one, exactly as ``instruction=`` does in ``Embedder.encode``. Missing
T-CoTs come from the Embedder's Reasoner (:meth:`EmbedderModule.attach_reasoner`) on the side the task names
(``query`` -> ``query``, ``document`` -> ``target``); without one, an input that needs a T-CoT is an error that says
so. Then :meth:`Embedder.collate` renders the batch and :meth:`Embedder.embed_batch` pools at the last ``<emb>``
(un-normalised: the ``Normalize`` module that follows makes the rows unit norm). ``encode(..., mode="raw")`` and
``target_modality=`` pass through.

sentence-transformers is the optional ``st`` extra (``pip install 'embedrl[st]'``); this module imports it at the top,
and nothing else in embedrl imports this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

try:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import InputModule, Normalize
except ImportError as err:  # the optional extra
    raise ImportError(
        "embedrl.integrations.sentence_transformers needs sentence-transformers >= 6.2: pip install 'embedrl[st]'"
    ) from err

from embedrl import prompts
from embedrl.data.schema import Modality
from embedrl.models import Embedder
from embedrl.models.embedder import as_item
from embedrl.models.loading import load_embedder
from embedrl.models.reasoner import Reasoner

__all__ = ["EmbedderModule", "to_sentence_transformer"]

# sentence-transformers' task (set by encode_query / encode_document) -> the Reasoner's side.
TASK_SIDES: dict[str, prompts.Side] = {"query": "query", "document": "target"}


class EmbedderModule(InputModule):
    """sentence-transformers input module around an :class:`Embedder`: renders inputs with :meth:`Embedder.collate`
    and outputs ``sentence_embedding``, the ``<emb>`` hidden state from :meth:`Embedder.embed_batch` (not normalised:
    put ``Normalize`` after it, as saved folders do).

    The Embedder's model is registered as the ``model`` submodule, so ``.to(device)``, ``.half()`` and
    ``state_dict`` act on its weights; ``save`` writes the whole Embedder folder (:meth:`Embedder.save`).
    """

    save_in_root = True
    # encode() kwargs that sentence-transformers passes to preprocess (all of them) and to forward (these).
    forward_kwargs: ClassVar[set[str]] = {"mode", "target_modality"}

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        if not isinstance(embedder, Embedder):
            raise TypeError(f"EmbedderModule wraps an embedrl Embedder, got {type(embedder).__name__}")
        self.embedder = embedder
        self.model = embedder.model
        self.processor = embedder.processor
        self.tokenizer = embedder.processor.tokenizer

    @property
    def modalities(self) -> list[Any]:
        """Text, images, videos and their combinations; ``message`` lets mixed batches through to :meth:`preprocess`
        (chat-style message inputs themselves are refused there)."""
        return ["text", "image", "video", ("image", "text"), ("text", "video"), "message"]

    def get_embedding_dimension(self) -> int:
        return self.embedder.dim

    def attach_reasoner(self, reasoner: Reasoner | None) -> EmbedderModule:
        """:meth:`Embedder.attach_reasoner` on the wrapped Embedder; returns this module."""
        self.embedder.attach_reasoner(reasoner)
        return self

    def preprocess(
        self,
        inputs: Sequence[Any],
        prompt: str | None = None,
        *,
        task: str | None = None,
        mode: str | None = None,
        target_modality: Modality | None = None,
        processing_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The :meth:`Embedder.collate` batch of ``inputs`` (read by ``as_item``): ``prompt`` is the instruction of
        each input without one, and missing T-CoTs are written by the Embedder's Reasoner on the side ``task`` names.

        Raises:
            ValueError: ``processing_kwargs`` (the Embedder's pixel budget applies), an unknown ``task``, or what
                :meth:`Embedder.add_tcots` and ``as_item`` raise.
        """
        if processing_kwargs:
            raise ValueError(
                "processing_kwargs are not supported by an embedrl Embedder: it uses its own pixel budget "
                "(embedder.with_budget(...) changes it)"
            )
        if task is not None and task not in TASK_SIDES:
            raise ValueError(f"task={task!r}; an embedrl Embedder knows {sorted(TASK_SIDES)}")
        embedder = self.embedder
        mode = mode or embedder.mode
        items = [as_item(x) for x in inputs]  # named by content: sentence-transformers has sorted the batch
        if prompt:
            items = [it if it.instruction else dataclasses.replace(it, instruction=prompt) for it in items]
        side = TASK_SIDES.get(task) if task is not None else None
        items = embedder.add_tcots(items, mode, side=side, target_modality=target_modality, show_progress_bar=False)
        return dict(embedder.collate(items, mode))

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """``features["sentence_embedding"]``: the pooled ``<emb>`` hidden state ``[B, D]`` in float32."""
        features["sentence_embedding"] = self.embedder.embed_batch(features, normalize=False)
        return features

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        """The whole Embedder folder (:meth:`Embedder.save`); sentence-transformers then writes its own JSON files."""
        self.embedder.save(output_path)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        backend: str = "torch",
        **kwargs: Any,
    ) -> EmbedderModule:
        """The Embedder folder ``model_name_or_path`` (a local path or hub id; ``subfolder`` inside it) through
        :func:`embedrl.load_embedder`, on the CPU (sentence-transformers then moves the model); ``model_kwargs``
        may give ``dtype`` (or ``torch_dtype``).

        Raises:
            ValueError: a backend other than ``torch``.
        """
        if backend != "torch":
            raise ValueError(f"backend={backend!r}: an embedrl Embedder runs on the torch backend only")
        folder = cls.load_dir_path(
            model_name_or_path,
            subfolder=subfolder,
            token=token,
            cache_folder=cache_folder,
            revision=revision,
            local_files_only=local_files_only,
        )
        model_kwargs = model_kwargs or {}
        dtype = model_kwargs.get("dtype") or model_kwargs.get("torch_dtype") or "auto"
        return cls(load_embedder(Path(folder), dtype=dtype, device="cpu"))


def to_sentence_transformer(embedder: Embedder, **kwargs: Any) -> SentenceTransformer:
    """A ``SentenceTransformer`` around an Embedder in memory (sharing its weights): :class:`EmbedderModule`, then
    ``Normalize``, with the ``query`` / ``document`` prompts and cosine similarity a saved folder declares, on the
    Embedder's device. ``kwargs`` go to ``SentenceTransformer`` (e.g. ``prompts`` to replace the defaults)."""
    kwargs.setdefault("prompts", {"query": prompts.QUERY_INSTRUCTION, "document": prompts.DOCUMENT_INSTRUCTION})
    kwargs.setdefault("similarity_fn_name", "cosine")
    kwargs.setdefault("device", str(embedder.device))
    return SentenceTransformer(modules=[EmbedderModule(embedder), Normalize()], **kwargs)
