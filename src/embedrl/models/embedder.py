"""The Embedder: a Qwen-VL backbone pooled at the last ``<emb>`` token (docs/method.md §3.1–3.3).

One item becomes one chat (built by :func:`embedrl.evidence.build_embedder_messages`, the single builder shared by
training, reward and inference); the batch runs through the **base** vision-language model (no LM head,
docs/embedder.md, throughput) and the final-layer hidden state at the last ``<emb>`` of each row, L2-normalised, is the
embedding. :meth:`Embedder.encode` is the one public encode path (evaluation, rewards, serving);
:meth:`Embedder.embed_batch` is the same computation with gradients, for training.

Example:
    >>> from embedrl.models import Embedder
    >>> from embedrl.data.schema import Item
    >>> embedder = Embedder.from_backbone("runs/tiny-qwen3-vl", mode="raw")  # doctest: +SKIP
    >>> vectors = embedder.encode([Item(id="q1", text="a red kite")])  # doctest: +SKIP
    >>> vectors.shape, vectors.dtype  # doctest: +SKIP
    ((1, 128), dtype('float32'))
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from torch import Tensor
from tqdm.auto import tqdm
from transformers import BatchFeature, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from embedrl import __version__, prompts
from embedrl.backbones import PixelBudget, add_emb_token, detect_family, get_adapter, load_backbone
from embedrl.data.schema import Item
from embedrl.evidence import MODES, VIDEO_AS, ReferenceResize, build_embedder_messages
from embedrl.prompts import LAYOUT_EMBEDRL, LAYOUT_REFERENCE, LAYOUTS, REFERENCE_MAX_TEXT_ONLY_TOKENS

__all__ = ["EMBEDDER_CONFIG_FILENAME", "VIDEO_FPS", "Embedder", "pool_last_emb", "truncate_text"]

logger = logging.getLogger(__name__)

EMBEDDER_CONFIG_FILENAME = "embedder.json"
# Frame rate reported to the video processor for a frame list (docs/method.md §3.2: videos are sampled at 2 fps).
VIDEO_FPS = 2.0
# Length-sorting weight of one image or frame, in characters of text: a rough token count of a visual item.
_VISUAL_ITEM_WEIGHT = 256


def pool_last_emb(
    hidden: Tensor, input_ids: Tensor, emb_token_id: int, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Hidden state at the **last** ``<emb>`` of each row (docs/method.md §3.3).

    Independent of the padding side. A row without ``<emb>`` falls back to its last non-padding token (the last
    position whose ``attention_mask`` is 1; the final position when no mask is given) and is flagged.

    Args:
        hidden: ``[B, T, D]`` final-layer hidden states.
        input_ids: ``[B, T]`` token ids.
        emb_token_id: the ``<emb>`` id.
        attention_mask: ``[B, T]``, 1 on real tokens; only used for the fallback.

    Returns:
        ``(pooled [B, D], missing [B] bool)``: ``missing[b]`` is True where row ``b`` had no ``<emb>``.

    Example:
        >>> h = torch.arange(12.0).view(1, 4, 3)
        >>> pooled, missing = pool_last_emb(h, torch.tensor([[5, 9, 9, 2]]), emb_token_id=9)
        >>> pooled.tolist(), missing.tolist()
        ([[6.0, 7.0, 8.0]], [False])
    """
    if hidden.dim() != 3 or input_ids.shape != hidden.shape[:2]:
        raise ValueError(
            f"need hidden [B, T, D] and input_ids [B, T], got {tuple(hidden.shape)} and {tuple(input_ids.shape)}"
        )
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)  # [B, T]
    last_emb = torch.where(input_ids == emb_token_id, positions, -1).amax(dim=1)  # [B]
    missing = last_emb < 0  # [B]
    if attention_mask is None:
        last_real = torch.full_like(last_emb, input_ids.shape[1] - 1)  # [B]
    else:
        last_real = torch.where(attention_mask.bool(), positions, -1).amax(dim=1).clamp(min=0)  # [B]
    index = torch.where(missing, last_real, last_emb)  # [B]
    rows = torch.arange(hidden.shape[0], device=hidden.device)  # [B]
    return hidden[rows, index.to(hidden.device)], missing.to(hidden.device)  # [B, D], [B]


def truncate_text(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int) -> str:
    """The longest prefix of ``text`` that holds at most ``max_tokens`` tokens (docs/method.md §3.2: 480 for raw text).

    The cut is made on the original string at a token boundary (no decode round trip), so a text that fits is
    returned unchanged.
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens={max_tokens} must be >= 0")
    if not text:
        return text
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) <= max_tokens:
        return text
    return text[: offsets[max_tokens][0]].rstrip()


class Embedder:
    """A Qwen-VL model (or a peft ``PeftModel`` around one) and its processor, pooled at the last ``<emb>``.

    Args:
        model: a ``*ForConditionalGeneration`` from :func:`embedrl.backbones.load_backbone` (``<emb>`` added with
            :func:`embedrl.backbones.add_emb_token`), possibly wrapped by peft.
        processor: its processor; the tokenizer must hold ``<emb>``.
        emb_token_id: the ``<emb>`` id; default ``model.config.emb_token_ids``. Must match the tokenizer.
        mode: default T-CoT/evidence mode (docs/method.md §6.4): ``full``, ``answer_only``, ``no_evidence`` or ``raw``.
        video_as: ``video`` (one video item) or ``frames`` (one image per frame), the same in every stage.
        max_text_tokens: the raw item text is cut to this many tokens before the chat is built (docs/method.md §3.2).
        budget: pixel budgets for the processor call; default the checkpoint's
            (:meth:`~embedrl.backbones.FamilyAdapter.checkpoint_budget`: the budget a tiny backbone records in its
            config, else docs/method.md §3.2's, which are also the reference's).
        layout: the input layout (``prompts.LAYOUTS``): ``embedrl`` (ours, docs/method.md §3.2) or ``reference``
            (the published Embed-RL checkpoints', docs/published-models.md). In the reference layout the raw text is
            not cut (``max_text_tokens`` does not apply), frames are always separate images (``video_as`` does not
            apply), each visual is resized with its own budget before the processor, and a text-only input is cut to
            ``REFERENCE_MAX_TEXT_ONLY_TOKENS`` tokens, as there.

    Attributes:
        missing_emb_count: rows so far that had no ``<emb>`` and were pooled at their last token (should stay 0).
    """

    def __init__(
        self,
        model: PreTrainedModel | PeftModel,
        processor: ProcessorMixin,
        *,
        emb_token_id: int | None = None,
        mode: str = "full",
        video_as: str = "video",
        max_text_tokens: int = 480,
        budget: PixelBudget | None = None,
        layout: str = LAYOUT_EMBEDRL,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}; use one of {LAYOUTS}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; use one of {MODES}")
        if video_as not in VIDEO_AS:
            raise ValueError(f"video_as={video_as!r}; use one of {VIDEO_AS}")
        if max_text_tokens < 1:
            raise ValueError(f"max_text_tokens={max_text_tokens} must be >= 1 (docs/method.md §3.2 uses 480)")
        self.model = model
        self.processor = processor
        self.mode = mode
        self.video_as = video_as
        self.max_text_tokens = max_text_tokens
        self.layout = layout
        self.adapter = get_adapter(model.config)
        self.budget = budget or self.adapter.checkpoint_budget(model.config)
        self.emb_token_id = self._check_emb_token_id(emb_token_id)
        self.missing_emb_count = 0

    def _check_emb_token_id(self, emb_token_id: int | None) -> int:
        tokenizer_id = self.processor.tokenizer.get_vocab().get(prompts.EMB_TOKEN)
        if tokenizer_id is None:
            raise ValueError(
                f"the tokenizer has no {prompts.EMB_TOKEN} token; call embedrl.backbones.add_emb_token(model, "
                "processor) first, or build the Embedder with Embedder.from_backbone"
            )
        if emb_token_id is None:
            recorded = getattr(self.model.config, prompts.EMB_CONFIG_KEY, None)
            if recorded is None:
                raise ValueError(
                    f"model.config has no {prompts.EMB_CONFIG_KEY}; call embedrl.backbones.add_emb_token(model, "
                    "processor) first, or build the Embedder with Embedder.from_backbone"
                )
            emb_token_id = list(recorded)[-1]
        if emb_token_id != tokenizer_id:
            raise ValueError(
                f"emb_token_id={emb_token_id} but the tokenizer has {prompts.EMB_TOKEN}={tokenizer_id}; load the "
                "processor saved with this model"
            )
        return emb_token_id

    # ------------------------------------------------------------------------------------------------------------
    # Construction and persistence
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_backbone(
        cls,
        name_or_path: str | Path,
        *,
        dtype: torch.dtype | str = "auto",
        device: str | torch.device = "cpu",
        mode: str = "full",
        video_as: str = "video",
        max_text_tokens: int = 480,
        budget: PixelBudget | None = None,
    ) -> Embedder:
        """A fresh Embedder from a backbone checkpoint: :func:`load_backbone`, then :func:`add_emb_token`."""
        model, processor = load_backbone(name_or_path, dtype=dtype, device=device)
        add_emb_token(model, processor)
        return cls(model, processor, mode=mode, video_as=video_as, max_text_tokens=max_text_tokens, budget=budget)

    def save(self, path: str | Path, *, merge: bool = True) -> None:
        """Write a self-contained Embedder directory that :meth:`load` (and :func:`load_backbone`) reads.

        Files: the full model weights and config (with ``emb_token_ids``), the processor (tokenizer with ``<emb>``,
        image and video processors, chat template) and ``embedder.json`` (mode, video_as, max_text_tokens,
        emb_token_id, family, pixel budget, input layout, embedrl version). A peft model is merged into a copy first
        (docs/method.md §3.8: LoRA is merged after training); ``self.model`` is left as it is.

        Raises:
            ValueError: ``merge=False`` for a peft model (save its adapter with ``model.save_pretrained`` instead).
        """
        path = Path(path)
        model = self.model
        if isinstance(model, PeftModel):
            if not merge:
                raise ValueError(
                    "Embedder.save writes full weights; with merge=False save the LoRA adapter itself with "
                    "embedder.model.save_pretrained(path)"
                )
            model = copy.deepcopy(model).merge_and_unload()
        setattr(model.config, prompts.EMB_CONFIG_KEY, [self.emb_token_id])
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        self.processor.save_pretrained(path)
        record = {
            "mode": self.mode,
            "video_as": self.video_as,
            "max_text_tokens": self.max_text_tokens,
            "emb_token_id": self.emb_token_id,
            "family": self.adapter.family,
            "budget": dataclasses.asdict(self.budget),
            "layout": self.layout,
            "embedrl_version": __version__,
        }
        (path / EMBEDDER_CONFIG_FILENAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str = "auto",
        device: str | torch.device = "cpu",
        layout: str | None = None,
    ) -> Embedder:
        """An Embedder written by :meth:`save`, with its saved mode, video_as, text cap, pixel budget and layout
        (``embedrl`` when an older ``embedder.json`` has none); ``layout`` replaces the saved one.

        The class-level primitive: applications load through :func:`embedrl.load_embedder`, which also reads the
        published checkpoints and logs a layout override.

        Raises:
            FileNotFoundError: ``path`` has no ``embedder.json`` (for a plain backbone use :meth:`from_backbone`).
            ValueError: the saved family or ``<emb>`` id disagrees with the checkpoint.
        """
        path = Path(path)
        config_file = path / EMBEDDER_CONFIG_FILENAME
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{config_file} not found: {path} is not a saved Embedder; for a backbone checkpoint use "
                "Embedder.from_backbone"
            )
        record = json.loads(config_file.read_text())
        model, processor = load_backbone(path, dtype=dtype, device=device)
        family = detect_family(model.config)
        if record["family"] != family:
            raise ValueError(f"{config_file} says family {record['family']!r} but the checkpoint is {family!r}")
        return cls(
            model,
            processor,
            emb_token_id=record["emb_token_id"],
            mode=record["mode"],
            video_as=record["video_as"],
            max_text_tokens=record["max_text_tokens"],
            budget=PixelBudget(**record["budget"]),
            layout=layout or record.get("layout", LAYOUT_EMBEDRL),
        )

    def with_budget(self, budget: PixelBudget) -> Embedder:
        """A copy of this Embedder with another pixel budget, sharing the model and processor (no weights copied).

        E.g. the reference UVRB setting, frames up to 768 visual tokens:
        ``embedder.with_budget(dataclasses.replace(embedder.budget, frame_max_pixels=768 * 32 * 32))``.
        """
        twin = copy.copy(self)
        twin.budget = budget
        twin.missing_emb_count = 0
        return twin

    # ------------------------------------------------------------------------------------------------------------
    # Encoding
    # ------------------------------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Embedding size: the text model's hidden size, read from the model config."""
        return self.model.config.get_text_config().hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prepare(self, item: Item) -> Item:
        """The item with its raw text cut to ``max_text_tokens`` tokens (the reference layout cuts nothing)."""
        if self.layout == LAYOUT_REFERENCE:
            return item
        text = truncate_text(self.processor.tokenizer, item.text, self.max_text_tokens)
        return item if text == item.text else dataclasses.replace(item, text=text)

    def collate(self, items: Sequence[Item], mode: str | None = None) -> BatchFeature:
        """Processor tensors for a batch of items, on the model's device, left-padded.

        Each item goes through :func:`build_embedder_messages` (``mode`` defaults to ``self.mode``; the Embedder's
        layout), the chat template (no generation prompt, so each row ends ``<emb><|im_end|>\\n``) and one processor
        call with the pixel budget; images are passed as one flat list and videos as frame lists, in item order. In
        the reference layout the builder has already resized every visual with its budget, so the processor does
        not resize, and text-only rows are cut to ``REFERENCE_MAX_TEXT_ONLY_TOKENS`` tokens from the right.

        Raises:
            ValueError: an empty batch, an unknown mode, or an item without a T-CoT outside ``raw`` mode.
        """
        if not items:
            raise ValueError("collate needs at least one item")
        mode = mode or self.mode
        texts: list[str] = []
        images: list[Any] = []
        videos: list[list[Any]] = []
        reference = self.layout == LAYOUT_REFERENCE
        resize = self.reference_resize() if reference else None
        for item in items:
            built = build_embedder_messages(
                self._prepare(item), mode, video_as=self.video_as, layout=self.layout, resize=resize
            )
            if built.problems:
                logger.debug("item %r: %s", item.id, "; ".join(built.problems))
            texts.append(
                self.processor.apply_chat_template(built.messages, tokenize=False, add_generation_prompt=False)
            )
            images += built.images
            videos += built.videos
        kwargs: dict[str, Any] = (
            {"images_kwargs": {"do_resize": False}} if reference else self.adapter.processor_kwargs(self.budget)
        )
        if videos:
            # Frames are the caller's list (do_sample_frames=False): report them as all frames of a 2 fps clip.
            kwargs["videos_kwargs"]["video_metadata"] = [
                {"fps": VIDEO_FPS, "total_num_frames": len(frames), "frames_indices": list(range(len(frames)))}
                for frames in videos
            ]
        inputs = self.processor(
            text=texts,
            images=images or None,
            videos=videos or None,
            padding=True,
            padding_side="left",
            return_tensors="pt",
            **kwargs,
        )
        if reference:
            inputs = self._cut_text_only_rows(inputs, [item.modality == "text" for item in items])
        return inputs.to(self.device)

    def reference_resize(self) -> ReferenceResize:
        """The budgets the reference layout resizes visuals with: this Embedder's :attr:`budget`, per image and per
        frame, on the family's token grid."""
        b = self.budget
        return ReferenceResize(
            factor=self.adapter.factor,
            image=(b.image_min_pixels, b.image_max_pixels),
            frame=(b.frame_min_pixels, b.frame_max_pixels),
        )

    def _cut_text_only_rows(self, inputs: BatchFeature, text_only: Sequence[bool]) -> BatchFeature:
        """Text-only rows longer than ``REFERENCE_MAX_TEXT_ONLY_TOKENS`` cut to their first tokens, as the reference
        truncates a text-only batch (from the right, so ``<emb>`` may go: pooling then falls back to the last
        token); the batch is re-padded on the left."""
        cap = REFERENCE_MAX_TEXT_ONLY_TOKENS
        lengths = inputs["attention_mask"].sum(dim=1).tolist()  # [B]
        cut = [i for i, (n, text) in enumerate(zip(lengths, text_only, strict=True)) if text and n > cap]
        if not cut:
            return inputs
        logger.warning("%d text-only input(s) longer than %d tokens cut to %d, as the reference does",
                       len(cut), cap, cap)  # fmt: skip
        new_lengths = [min(n, cap) if i in cut else n for i, n in enumerate(lengths)]
        width, total = max(new_lengths), inputs["input_ids"].shape[1]
        pad_id = self.processor.tokenizer.pad_token_id
        out = {}
        for key, value in inputs.items():
            if not (isinstance(value, Tensor) and value.dim() == 2 and value.shape == inputs["input_ids"].shape):
                out[key] = value
                continue
            fill = pad_id if key == "input_ids" else 0
            rows = torch.full((value.shape[0], width), fill, dtype=value.dtype)  # [B, width]
            for i, (n, keep) in enumerate(zip(lengths, new_lengths, strict=True)):
                start = total - n  # left padding: the row's tokens are its last n positions
                rows[i, width - keep :] = value[i, start : start + keep]
            out[key] = rows
        return BatchFeature(out)

    def _vision_language_model(self) -> torch.nn.Module:
        """The backbone without its LM head (e.g. ``Qwen3VLModel``); LoRA layers injected by peft stay in it."""
        model = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        return model.base_model  # transformers' base_model: the *Model inside *ForConditionalGeneration

    def embed_batch(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """Unit-norm embeddings ``[B, D]`` (float32) of a :meth:`collate` batch, **with** autograd.

        Runs the base model only (the LM head is never computed) and pools at the last ``<emb>`` of each row.
        Rows without ``<emb>`` are pooled at their last token and counted in :attr:`missing_emb_count`.

        Raises:
            FloatingPointError: a non-finite or zero hidden state (never returned as an embedding).
        """
        out = self._vision_language_model()(**inputs, use_cache=False, return_dict=True)
        pooled, missing = pool_last_emb(
            out.last_hidden_state, inputs["input_ids"], self.emb_token_id, inputs.get("attention_mask")
        )  # [B, D], [B]
        n_missing = int(missing.sum())
        if n_missing:
            self.missing_emb_count += n_missing
            logger.warning(
                "%d of %d rows have no %s token; pooled at their last token (%d so far)",
                n_missing, len(missing), prompts.EMB_TOKEN, self.missing_emb_count,
            )  # fmt: skip
        pooled = pooled.float()  # [B, D]
        norms = pooled.norm(dim=-1)  # [B]
        if not bool(torch.isfinite(norms).all() and (norms > 0).all()):
            bad = torch.nonzero(~torch.isfinite(norms) | (norms == 0)).flatten().tolist()
            raise FloatingPointError(
                f"rows {bad} of the batch have a non-finite or zero hidden state at {prompts.EMB_TOKEN}"
            )
        return pooled / norms.unsqueeze(-1)  # [B, D]

    def _length(self, item: Item, mode: str) -> int:
        """Sort key for batching: characters of text (and T-CoT unless raw) plus a weight per image and frame."""
        chars = len(item.instruction) + len(item.text) + (len(item.tcot or "") if mode != "raw" else 0)
        return chars + _VISUAL_ITEM_WEIGHT * (len(item.images) + len(item.frames))

    def encode(
        self,
        items: Sequence[Item],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        mode: str | None = None,
    ) -> np.ndarray:
        """Unit-norm float32 embeddings ``[N, D]`` of ``items``, in the caller's order.

        Items are sorted by length (longest first), batched, encoded under ``torch.inference_mode`` with the model
        in eval mode (each module's training flag is restored afterwards), moved to CPU per batch, and put back in
        input order. ``show_progress_bar`` shows a tqdm bar; ``None`` means off.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        mode = mode or self.mode
        items = list(items)
        out = np.empty((len(items), self.dim), dtype=np.float32)
        order = sorted(range(len(items)), key=lambda i: -self._length(items[i], mode))
        flags = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            with torch.inference_mode():
                starts = range(0, len(items), batch_size)
                for start in tqdm(starts, desc="encode", disable=not show_progress_bar):
                    index = order[start : start + batch_size]
                    vectors = self.embed_batch(self.collate([items[i] for i in index], mode))
                    out[index] = vectors.cpu().numpy()
        finally:
            for module, training in flags.items():
                module.training = training
        return out
