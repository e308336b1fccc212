"""Run an embedrl Embedder, with or without a Reasoner writing T-CoTs, on any MTEB task (mteb 2.x).

mteb 2.x talks to a model through ``encode(inputs, *, task_metadata, hf_split, hf_subset, prompt_type, **kwargs)``:
``inputs`` is a torch ``DataLoader`` whose batches are dicts of columns (``text`` strings, ``image`` PIL images,
``video`` clips, ``id`` and other columns), and ``prompt_type`` is ``PromptType.query`` or ``PromptType.document``
for the two sides of a retrieval task and ``None`` for symmetric tasks (classification, clustering, STS).
:class:`MTEBEncoder` turns each row into an :class:`~embedrl.data.schema.Item` and runs it through
:class:`~embedrl.eval.pipeline.EmbedPipeline`, the project's one items -> T-CoTs -> vectors path (no cache: rows
carry no stable id across tasks):

- **text**: the row's ``text`` (mteb has already joined a document's title and body, and a query's text and its
  row instruction); **images**: the row's ``image`` (one PIL image or a list of them); **video**: the row's clip,
  sampled to the Embedder's ``budget.num_frames`` frames (mteb's ``FramesCollator``) and passed as the item's frames.
  Audio is refused.
- **side**: ``query`` for queries and symmetric tasks, ``target`` for documents; a query's Reasoner prompt family is
  routed by the documents' modality (``choose_family``), a document's by its own, never seeing a query.
- **instruction** (the Item's ``instruction``, which the Embedder puts before the text): for queries and symmetric
  tasks mteb's own choice (:meth:`AbsEncoder.get_task_instruction`: ``prompts_dict`` by task name or type, then the
  task's ``prompt``, then its task type's default); documents get one only from a ``document`` entry (the task's
  ``prompt["document"]`` or a ``prompts_dict`` key ending in ``-document`` or equal to ``document``).
- **mode**: with a Reasoner (passed, or attached to the Embedder) the Embedder's own mode (``full`` for a trained
  one), without one ``raw``; T-CoTs are greedy by default (reproducible scores).

The metadata mteb files results under (:attr:`MTEBEncoder.mteb_model_meta`) is ``embedrl/<checkpoint folder name>``,
revision the Embedder's weight fingerprint, with the mode, Reasoner and decoding in ``experiment_kwargs``: two
different Embedders never share an entry of mteb's result cache.

Example (docs/eval.md §7; the Reasoner is optional)::

    import mteb
    from embedrl.integrations.mteb import MTEBEncoder

    model = MTEBEncoder.from_pretrained("runs/demo/embedder/final", reasoner="runs/demo/rl/final")
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["SciFact"]), cache=None)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.modality_collators import FramesCollator
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType
from PIL import Image
from tqdm.auto import tqdm

from embedrl.data.schema import Item, Modality
from embedrl.eval.cache import decoding_key
from embedrl.eval.pipeline import EmbedPipeline, embedder_fingerprint, reasoner_fingerprint
from embedrl.models.embedder import Embedder
from embedrl.models.loading import load_embedder, load_reasoner
from embedrl.models.reasoner import Decoding, Reasoner
from embedrl.prompts import Side

__all__ = ["MTEBEncoder", "batch_items", "frames_of", "load_mteb_model"]

MODALITIES: list[str] = ["text", "image", "video"]  # what an embedrl Embedder reads (mteb ModelMeta.modalities)


def frames_of(video: Any) -> tuple[Image.Image, ...]:
    """A clip as RGB PIL frames: a ``[T, C, H, W]`` (or ``[T, H, W, C]``) uint8 tensor or array, as mteb's
    ``FramesCollator`` returns, or a sequence of PIL images.

    Raises:
        ValueError: an array that is not 4-D with 3 channels, or an empty clip.
    """
    if isinstance(video, Sequence) and not isinstance(video, (str, bytes)):
        frames = tuple(f if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f)) for f in video)
    else:
        array = video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
        if array.ndim != 4 or 3 not in (array.shape[1], array.shape[3]):
            raise ValueError(f"a video must be [T, C, H, W] or [T, H, W, C] with 3 channels, got {array.shape}")
        if array.shape[1] == 3 and array.shape[3] != 3:
            array = array.transpose(0, 2, 3, 1)  # [T, H, W, C]
        if array.dtype != np.uint8:
            array = np.clip(array, 0, 255).astype(np.uint8)
        frames = tuple(Image.fromarray(frame) for frame in array)
    if not frames:
        raise ValueError("a video without frames")
    return tuple(f.convert("RGB") for f in frames)


def _images_of(value: Any) -> tuple[Image.Image, ...]:
    if value is None:
        return ()
    images = value if isinstance(value, (list, tuple)) else [value]
    for image in images:
        if not isinstance(image, Image.Image):
            raise TypeError(f"an mteb image column holds a {type(image).__name__}, not a PIL image")
    return tuple(image.convert("RGB") for image in images)


def batch_items(batch: Mapping[str, Any], *, instruction: str = "", id_prefix: str = "") -> list[Item]:
    """The Items of one mteb batch (a dict of equally long columns), in row order.

    Reads ``text``, ``image`` and ``video`` (see the module docstring); ``id`` becomes the Item's id (prefixed with
    ``id_prefix``; the row's position without one); other columns are ignored.

    Raises:
        ValueError: an ``audio`` column (embedrl has no audio input), or a batch with none of the three.
    """
    if "audio" in batch:
        raise ValueError("an embedrl Embedder reads text, images and video; this task gives it audio")
    columns = [c for c in ("text", "image", "video") if c in batch]
    if not columns:
        raise ValueError(f"an mteb batch with none of the columns text, image, video (it has {sorted(batch)})")
    n = len(batch[columns[0]])
    ids = [str(i) for i in batch["id"]] if "id" in batch else [str(i) for i in range(n)]
    items = []
    for i in range(n):
        text = batch["text"][i] if "text" in batch else ""
        video = batch["video"][i] if "video" in batch else None
        items.append(
            Item(
                id=id_prefix + ids[i],
                text=str(text or "").strip(),
                instruction=instruction,
                images=_images_of(batch["image"][i]) if "image" in batch else (),
                frames=frames_of(video) if video is not None else (),
            )
        )
    return items


def _side(prompt_type: PromptType | None) -> Side:
    return "target" if prompt_type == PromptType.document else "query"


def _target_modality(task_metadata: Any, prompt_type: PromptType | None) -> Modality | None:
    """The documents' modality a query's prompt family is routed by (None outside the query side)."""
    if prompt_type != PromptType.query:
        return None
    documents = set(task_metadata.get_modalities(PromptType.document))
    return "video" if "video" in documents else "image" if "image" in documents else "text"


class MTEBEncoder(AbsEncoder):
    """An embedrl Embedder (and optionally a Reasoner) as an mteb 2.x encoder; pass it to ``mteb.evaluate``.

    Args:
        embedder: the Embedder (``embedrl.load_embedder``).
        reasoner: writes a T-CoT for every query and document; default the Reasoner attached to the Embedder
            (``Embedder.attach_reasoner``), and without one no T-CoTs.
        mode: the Embedder mode (``full``, ``answer_only``, ``no_evidence``, ``raw``); default the Embedder's own
            with a Reasoner, ``raw`` without one.
        decoding: the Reasoner's decoding; default greedy.
        prompts_dict: instructions by mteb key (task name, task type, ``query``/``document``, or
            ``"<task or type>-<query|document>"``), over the tasks' own prompts.
        name: the mteb model name (``org/name``); default ``embedrl/<checkpoint folder name>``.
        revision: the mteb revision; default the Embedder's weight fingerprint.
        reasoner_batch_size: items per Reasoner batch; None = the Reasoner's own batch size.

    Raises:
        ValueError: a mode other than ``raw`` without a Reasoner (documents and queries carry no T-CoT in MTEB).
    """

    def __init__(
        self,
        embedder: Embedder,
        reasoner: Reasoner | None = None,
        *,
        mode: str | None = None,
        decoding: Decoding | None = None,
        prompts_dict: Mapping[str, str] | None = None,
        name: str | None = None,
        revision: str | None = None,
        reasoner_batch_size: int | None = None,
    ) -> None:
        reasoner = reasoner if reasoner is not None else embedder.reasoner
        mode = mode or (embedder.mode if reasoner is not None else "raw")
        if mode != "raw" and reasoner is None:
            raise ValueError(
                f"mode={mode!r} embeds T-CoTs, and MTEB's items carry none: pass a Reasoner, or use mode='raw'"
            )
        self.embedder = embedder
        self.model = embedder  # mteb's AbsEncoder convention
        self.reasoner = reasoner
        self.mode = mode
        self.decoding = decoding or Decoding(greedy=True)
        self.prompts_dict = dict(prompts_dict) if prompts_dict else None
        self.reasoner_batch_size = reasoner_batch_size
        source = Path(str(getattr(embedder.model.config, "_name_or_path", "") or "embedder")).name or "embedder"
        fingerprint = embedder_fingerprint(embedder).split("@")[-1]
        experiment: dict[str, Any] = {"mode": mode, "layout": embedder.layout}
        if reasoner is not None:
            experiment |= {"reasoner": reasoner_fingerprint(reasoner), "decoding": decoding_key(self.decoding)}
        self.mteb_model_meta = ModelMeta(
            loader=None,
            name=name or f"embedrl/{source}",
            revision=revision or fingerprint,
            release_date=None,
            languages=None,
            n_parameters=sum(p.numel() for p in embedder.model.parameters()),
            memory_usage_mb=None,
            max_tokens=None,
            embed_dim=embedder.dim,
            license=None,
            open_weights=None,
            public_training_code=None,
            public_training_data=None,
            framework=["PyTorch", "Transformers"],
            similarity_fn_name=ScoringFunction.COSINE,
            use_instructions=True,
            training_datasets=None,
            modalities=list(MODALITIES),
            experiment_kwargs=experiment,
        )

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        reasoner: str | Path | None = None,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        **kwargs: Any,
    ) -> MTEBEncoder:
        """Load the Embedder (and the Reasoner) with :func:`embedrl.load_embedder` (:func:`embedrl.load_reasoner`);
        ``kwargs`` go to the constructor."""
        embedder = load_embedder(model, dtype=dtype, device=device)
        loaded = load_reasoner(reasoner, dtype=dtype, device=device) if reasoner else None
        return cls(embedder, loaded, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Instructions
    # ------------------------------------------------------------------------------------------------------------

    def instruction(self, task_metadata: Any, prompt_type: PromptType | None) -> str:
        """The instruction of one side of a task (see the module docstring)."""
        if prompt_type != PromptType.document:
            return self.get_task_instruction(task_metadata, prompt_type).strip()
        keys = (f"{task_metadata.name}-document", f"{task_metadata.type}-document", "document")
        for key in keys:
            if self.prompts_dict and key in self.prompts_dict:
                return self.prompts_dict[key].strip()
        prompt = task_metadata.prompt
        return str(prompt.get("document") or "").strip() if isinstance(prompt, Mapping) else ""

    # ------------------------------------------------------------------------------------------------------------
    # mteb's encoder protocol
    # ------------------------------------------------------------------------------------------------------------

    def encode(
        self,
        inputs: Any,
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Unit-norm float32 vectors ``[N, D]`` of every row of ``inputs`` (an mteb DataLoader), in order.

        ``kwargs`` are mteb's encode kwargs: ``batch_size`` (items per Embedder call, default 32) and
        ``show_progress_bar``.
        """
        if "video" in getattr(getattr(inputs, "dataset", None), "column_names", ()):
            # mteb hands clips over as decoders; sample the Embedder's frame count from each (as the other
            # frame-based wrappers of mteb do)
            inputs.collate_fn = FramesCollator(num_frames=self.embedder.budget.num_frames)
        pipeline = EmbedPipeline(
            self.embedder,
            self.reasoner,
            decoding=self.decoding,
            batch_size=int(kwargs.get("batch_size") or 32),
            reasoner_batch_size=self.reasoner_batch_size,
        )
        side = _side(prompt_type)
        target_modality = _target_modality(task_metadata, prompt_type)
        instruction = self.instruction(task_metadata, prompt_type)
        prefix = f"{task_metadata.name}/{hf_subset}/{hf_split}/{side}/"
        chunks = []
        for batch in tqdm(inputs, desc=f"{task_metadata.name} {side}", disable=not kwargs.get("show_progress_bar")):
            items = batch_items(batch, instruction=instruction, id_prefix=prefix)
            vectors, _ = pipeline.run(items, self.mode, side, target_modality)
            chunks.append(vectors)
        if not chunks:
            return np.empty((0, self.embedder.dim), dtype=np.float32)
        return np.concatenate(chunks)


def load_mteb_model(
    model_name: str, revision: str | None = None, *, device: str | None = None, **kwargs: Any
) -> MTEBEncoder:
    """An mteb ``ModelMeta`` loader: ``ModelMeta(loader=load_mteb_model, name=PATH_OR_HUB_ID, ...)`` makes
    ``mteb.get_model`` build an :class:`MTEBEncoder`. ``kwargs``: ``reasoner``, ``dtype`` and the constructor's."""
    if revision is not None:
        kwargs.setdefault("revision", revision)
    return MTEBEncoder.from_pretrained(model_name, device=device or "cpu", **kwargs)
