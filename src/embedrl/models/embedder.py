"""The Embedder: a Qwen-VL backbone pooled at the last ``<emb>`` token (docs/method.md §3.1–3.3).

One item becomes one chat (built by :func:`embedrl.evidence.build_embedder_messages`, the single builder shared by
training, reward and inference); the batch runs through the **base** vision-language model (no LM head,
docs/embedder.md, throughput) and the final-layer hidden state at the last ``<emb>`` of each row, L2-normalised, is the
embedding. :meth:`Embedder.encode` is the one public encode path (evaluation, rewards, serving);
:meth:`Embedder.embed_batch` is the same computation with gradients, for training.

``encode`` takes what users pass (:func:`as_item`): text, images, frame lists, dicts or :class:`Item` s, one input or a
list; :meth:`Embedder.encode_query` / :meth:`Embedder.encode_document` add the side's default instruction and, with a
Reasoner attached (:meth:`Embedder.attach_reasoner`), the side's T-CoTs. :meth:`Embedder.save` also writes the
sentence-transformers files (``modules.json``, ``config_sentence_transformers.json``) that
:mod:`embedrl.integrations.sentence_transformers` reads.

Example:
    >>> from embedrl.models import Embedder
    >>> embedder = Embedder.from_backbone("runs/tiny-qwen3-vl", mode="raw")  # doctest: +SKIP
    >>> vectors = embedder.encode(["a red kite", Path("kite.png")])  # doctest: +SKIP
    >>> vectors.shape, vectors.dtype  # doctest: +SKIP
    ((2, 128), dtype('float32'))
    >>> embedder.encode("a red kite").shape  # doctest: +SKIP
    (128,)
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from peft import PeftModel
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm
from transformers import BatchFeature, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from embedrl import __version__, prompts
from embedrl.backbones import PixelBudget, add_emb_token, detect_family, get_adapter, load_backbone
from embedrl.data.schema import Item, Modality
from embedrl.evidence import MODES, VIDEO_AS, ReferenceResize, build_embedder_messages
from embedrl.models.cards import write_model_card
from embedrl.models.prefix_sharing import hidden_at_emb
from embedrl.models.reasoner import Reasoner
from embedrl.models.visual_cache import VisualCache
from embedrl.prompts import LAYOUT_EMBEDRL, LAYOUT_REFERENCE, LAYOUTS, REFERENCE_MAX_TEXT_ONLY_TOKENS, Side

__all__ = [
    "EMBEDDER_CONFIG_FILENAME",
    "INPUT_KEYS",
    "ST_MODULE_CLASS",
    "VIDEO_FPS",
    "Embedder",
    "EncodeInput",
    "as_item",
    "pool_last_emb",
    "truncate_text",
]

logger = logging.getLogger(__name__)

EMBEDDER_CONFIG_FILENAME = "embedder.json"
# Frame rate reported to the video processor for a frame list (docs/method.md §3.2: videos are sampled at 2 fps).
VIDEO_FPS = 2.0
# Length-sorting weight of one image or frame, in characters of text: a rough token count of a visual item.
_VISUAL_ITEM_WEIGHT = 256

# sentence-transformers files that :meth:`Embedder.save` writes (docs/embedder.md): the input module is embedrl's own
# class, named here as a string because models never import integrations (tests/test_layering.py); normalisation is
# sentence-transformers' Normalize, in its own folder as sentence-transformers saves it.
ST_MODULE_CLASS = "embedrl.integrations.sentence_transformers.EmbedderModule"
ST_NORMALIZE_CLASS = "sentence_transformers.base.modules.normalize.Normalize"
ST_NORMALIZE_DIR = "1_Normalize"
ST_MODULES_FILENAME = "modules.json"
ST_CONFIG_FILENAME = "config_sentence_transformers.json"

# One encode input (:func:`as_item`): text, an image, a frame list (one video), a dict of Item fields, or an Item.
EncodeInput = str | Path | Image.Image | Item | Mapping[str, Any] | Sequence[Path | Image.Image]
# Keys of a dict input: the Item fields, and sentence-transformers' singular "image" (= images) and "video" (= frames).
INPUT_KEYS: tuple[str, ...] = ("id", "text", "instruction", "images", "image", "frames", "video", "tcot", "meta")
_CONTENT_KEYS = ("text", "images", "image", "frames", "video")


def _show(value: Any, limit: int = 60) -> str:
    """A short repr of a user's input for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _media(value: Any, where: str, *, strings: bool) -> tuple[str | Path | Image.Image, ...]:
    """A list of images (PIL images or paths) checked one by one; ``strings`` allows ``str`` paths."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{where} must be a list of images, got {_show(value)}")
    allowed = (Image.Image, Path, str) if strings else (Image.Image, Path)
    for i, x in enumerate(value):
        if not isinstance(x, allowed):
            hint = "; a str is text: pass an image file as pathlib.Path" if isinstance(x, str) else ""
            kinds = "a PIL image or a path" if strings else "a PIL image or a pathlib.Path"
            raise TypeError(f"{where}[{i}] is {_show(x)}: each image must be {kinds}{hint}")
    return tuple(value)


def _item_from_dict(value: Mapping[str, Any], where: str) -> Item:
    unknown = sorted(str(key) for key in value if key not in INPUT_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; a dict input takes {list(INPUT_KEYS)}")
    for one, many in (("image", "images"), ("video", "frames")):
        if one in value and many in value:
            raise ValueError(f"{where} has both {one!r} and {many!r}; give one of them")
    if not any(key in value for key in _CONTENT_KEYS):
        raise ValueError(f"{where} has no content: give it 'text', 'image(s)' or 'frames'/'video'")
    for key in ("id", "text", "instruction"):
        if not isinstance(value.get(key, ""), str):
            raise TypeError(f"{where}[{key!r}] must be a str, got {_show(value[key])}")
    tcot = value.get("tcot")
    if tcot is not None and not isinstance(tcot, str):
        raise TypeError(f"{where}['tcot'] must be a str or None, got {_show(tcot)}")
    meta = value.get("meta", {})
    if not isinstance(meta, Mapping):
        raise TypeError(f"{where}['meta'] must be a dict, got {_show(meta)}")
    images_key = "image" if "image" in value else "images"
    images = value.get(images_key, ())
    if isinstance(images, (str, Path, Image.Image)):
        images = (images,)
    frames_key = "video" if "video" in value else "frames"
    frames = value.get(frames_key, ())
    if isinstance(frames, (str, Path, Image.Image)):
        raise TypeError(
            f"{where}[{frames_key!r}] is {_show(frames)}: a video is a list of frames (PIL images or paths); video "
            "files are not decoded here"
        )
    return Item(
        id=value.get("id", where),
        text=value.get("text", ""),
        instruction=value.get("instruction", ""),
        images=_media(images, f"{where}[{images_key!r}]", strings=True),
        frames=_media(frames, f"{where}[{frames_key!r}]", strings=True),
        tcot=tcot,
        meta=dict(meta),
    )


def as_item(value: EncodeInput, where: str | None = None) -> Item:
    """One encode input as an :class:`Item` (docs/embedder.md, "Using an Embedder from Python").

    - ``str``: always **text** (a caption that happens to name a file stays text); pass image files as ``Path``;
    - ``pathlib.Path`` or PIL image: one image;
    - a list or tuple of PIL images / ``Path`` s: one video, as its frame list;
    - a dict of :class:`Item` fields (``id``, ``text``, ``instruction``, ``images``, ``frames``, ``tcot``, ``meta``),
      where ``image`` may stand for ``images`` and ``video`` for ``frames`` (sentence-transformers' keys), a single
      image needs no list, and images and frames may be ``str`` paths;
    - an :class:`Item`: as it is.

    ``where`` names the input in error messages and is the id of an input that has none; default the start of its
    text, or of its repr.

    Raises:
        ValueError: a dict with an unknown key, with both ``image`` and ``images`` (or ``video`` and ``frames``), or
            with no text, image or frames.
        TypeError: any other type, or a field of the wrong type (e.g. a ``str`` inside a frame list).
    """
    if isinstance(value, Item):
        return value
    if where is None:
        where = _show(value) if not isinstance(value, str) else value if len(value) <= 40 else value[:37] + "..."
    if isinstance(value, str):
        return Item(id=where, text=value)
    if isinstance(value, (Path, Image.Image)):
        return Item(id=where, images=(value,))
    if isinstance(value, Mapping):
        return _item_from_dict(value, where)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where} is an empty list: a video needs its frames")
        return Item(id=where, frames=_media(value, where, strings=False))
    raise TypeError(
        f"{where} is a {type(value).__name__} ({_show(value)}); pass text (str), an image (PIL image or "
        "pathlib.Path), a frame list, a dict of Item fields or an embedrl Item"
    )


def _batches(
    items: Sequence[Item], groups: Sequence[Sequence[int]] | None, batch_size: int, length: Callable[[int], int]
) -> list[list[list[int]]]:
    """Batches of whole groups (single inputs without ``groups``), longest first by the ``length`` of each group's
    first input, filled up to ``batch_size`` inputs; a group larger than ``batch_size`` is cut into pieces. With
    ``groups``, a batch also ends where the next group is under half as long as the batch's first (a short group
    padded to a long one's prefix would attend over that padding)."""
    units = [[i] for i in range(len(items))] if groups is None else [list(g) for g in groups]
    if groups is not None and (
        any(not g for g in units) or sorted(i for g in units for i in g) != list(range(len(items)))
    ):
        raise ValueError(f"groups must be non-empty and hold each of the {len(items)} input indices exactly once")
    pieces = [
        g[k : k + batch_size] for g in sorted(units, key=lambda g: -length(g[0])) for k in range(0, len(g), batch_size)
    ]
    batches: list[list[list[int]]] = []
    for piece in pieces:
        if (
            not batches
            or sum(map(len, batches[-1])) + len(piece) > batch_size
            or (groups is not None and 2 * length(piece[0]) < length(batches[-1][0][0]))
        ):
            batches.append([])
        batches[-1].append(piece)
    return batches


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
        reasoner: the Reasoner that writes the T-CoTs :meth:`encode` needs outside ``raw`` mode for inputs without
            one (None: such inputs are an error); set it with :meth:`attach_reasoner`.
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
        self.reasoner: Reasoner | None = None

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
        emb_token_id, family, pixel budget, input layout, embedrl version), and the sentence-transformers files
        (:meth:`write_sentence_transformers_files`). A peft model is merged into a copy first (docs/method.md §3.8:
        LoRA is merged after training); ``self.model`` is left as it is.

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
        self.write_sentence_transformers_files(path)
        write_model_card(path, "embedder")  # README.md; a training stage writes it again with its config

    @staticmethod
    def write_sentence_transformers_files(path: str | Path) -> None:
        """Make the Embedder folder ``path`` a sentence-transformers model folder (docs/embedder.md).

        ``modules.json`` lists embedrl's input module (:data:`ST_MODULE_CLASS`: it renders an input as
        :meth:`collate` does and pools at the last ``<emb>`` with :meth:`embed_batch`) in the folder root, then
        sentence-transformers' ``Normalize`` (``1_Normalize/``); ``config_sentence_transformers.json`` declares the
        ``query`` / ``document`` prompts (``prompts.QUERY_INSTRUCTION`` / ``DOCUMENT_INSTRUCTION``: the instructions
        of :meth:`encode_query` / :meth:`encode_document`), cosine similarity, and embedrl as a requirement.
        ``SentenceTransformer(path, trust_remote_code=True)`` then loads the folder; sentence-transformers needs the
        flag for any module class outside its own package.
        """
        path = Path(path)
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": ST_MODULE_CLASS},
            {"idx": 1, "name": "1", "path": ST_NORMALIZE_DIR, "type": ST_NORMALIZE_CLASS},
        ]
        config = {
            "model_type": "SentenceTransformer",
            "__version__": {"embedrl": __version__, "transformers": transformers.__version__,
                            "pytorch": torch.__version__},
            "prompts": {"query": prompts.QUERY_INSTRUCTION, "document": prompts.DOCUMENT_INSTRUCTION},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
            "requirements": {
                "embedrl": {
                    "specifier": f">={__version__}",
                    "reason": f"The input module {ST_MODULE_CLASS} is part of embedrl (install it with its st extra).",
                }
            },
        }  # fmt: skip
        (path / ST_MODULES_FILENAME).write_text(json.dumps(modules, indent=2) + "\n")
        (path / ST_CONFIG_FILENAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (path / ST_NORMALIZE_DIR).mkdir(exist_ok=True)
        (path / ST_NORMALIZE_DIR / "config.json").write_text("{}\n")  # Normalize with its defaults

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

    def embed_batch(self, inputs: Mapping[str, Tensor], *, normalize: bool = True) -> Tensor:
        """Unit-norm embeddings ``[B, D]`` (float32) of a :meth:`collate` batch, **with** autograd.

        Runs the base model only (the LM head is never computed) and pools at the last ``<emb>`` of each row.
        Rows without ``<emb>`` are pooled at their last token and counted in :attr:`missing_emb_count`.
        ``normalize=False`` returns the pooled hidden states as they are (float32, not unit norm).

        Raises:
            FloatingPointError: a non-finite or zero hidden state (never returned as an embedding).
        """
        out = self._vision_language_model()(**inputs, use_cache=False, return_dict=True)
        return self._pool(out.last_hidden_state, inputs["input_ids"], inputs.get("attention_mask"), normalize)

    def embed_groups(
        self, inputs: Mapping[str, Tensor], groups: Sequence[Sequence[int]], *, normalize: bool = True
    ) -> Tensor:
        """:meth:`embed_batch` of a :meth:`collate` batch whose rows come in groups that start alike (the ``G``
        rollouts of one item): the tokens a group's rows share are run once (:mod:`embedrl.models.prefix_sharing`).
        Equal to :meth:`embed_batch` up to float rounding; inference only (call it under ``torch.inference_mode``)."""
        hidden, ids, mask = hidden_at_emb(self._vision_language_model(), inputs, groups, self.emb_token_id)
        return self._pool(hidden, ids, mask, normalize)

    def _pool(self, hidden: Tensor, input_ids: Tensor, mask: Tensor | None, normalize: bool) -> Tensor:
        """Pooled ``<emb>`` states ``[B, D]`` (float32, unit norm unless ``normalize`` is False), checked finite."""
        pooled, missing = pool_last_emb(hidden, input_ids, self.emb_token_id, mask)  # [B, D], [B]
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
        return pooled / norms.unsqueeze(-1) if normalize else pooled  # [B, D]

    @contextmanager
    def sharing_visuals(self) -> Iterator[VisualCache]:
        """Inside the block, each unique image or video goes through the processor and the vision tower once.

        For the EG-RL reward (docs/rewards.md §2): the ``G`` rollouts of an item repeat its images or frames. The
        block puts a :class:`~embedrl.models.visual_cache.VisualCache` in front of this Embedder's processor (a
        shallow copy is swapped in; the shared processor is untouched) and of the vision tower's
        ``get_image_features`` / ``get_video_features``; the embeddings equal the ones computed without it (per-image
        processing and vision attention do not depend on the batch). Inference only (:meth:`encode`); the cache and
        the wrapping go when the block ends. Yields the cache, whose ``stats`` count hits and misses. Meant for a
        model one thread drives (the reward's frozen Embedder): another thread encoding with it meanwhile would go
        through the cache too (still exact).

        Raises:
            RuntimeError: the block is entered again while active on the same model, or a forward with gradients
                reaches the vision tower inside it.
        """
        cache = VisualCache()
        with cache.attach(self._vision_language_model()):
            processor, self.processor = self.processor, cache.processor(self.processor)
            try:
                yield cache
            finally:
                self.processor = processor

    def _length(self, item: Item, mode: str) -> int:
        """Sort key for batching: characters of text (and T-CoT unless raw) plus a weight per image and frame."""
        chars = len(item.instruction) + len(item.text) + (len(item.tcot or "") if mode != "raw" else 0)
        return chars + _VISUAL_ITEM_WEIGHT * (len(item.images) + len(item.frames))

    def add_tcots(
        self,
        items: Sequence[Item],
        mode: str | None = None,
        *,
        side: Side | None = None,
        target_modality: Modality | None = None,
        show_progress_bar: bool | None = None,
    ) -> list[Item]:
        """The items, each with the T-CoT that ``mode`` (default :attr:`mode`) needs: its own, else one written by the
        attached :attr:`reasoner`.

        Nothing is generated in ``raw`` mode or for an item that has a T-CoT. The Reasoner writes on ``side``
        (``query``, or ``target`` for documents and candidates; ``target_modality`` picks a text query's prompt family,
        docs/method.md §5.3) with its own decoding (``reasoner.decoding``), and its raw text becomes the item's T-CoT,
        as in evaluation. In the ``reference`` layout an item without a T-CoT is embedded without one when no
        Reasoner is attached, as the published code does (docs/published-models.md).

        Raises:
            ValueError: an item needs a T-CoT and no Reasoner is attached (the message says how to fix it), or a
                Reasoner is attached and ``side`` is None.
        """
        mode = mode or self.mode
        items = list(items)
        todo = [i for i, item in enumerate(items) if item.tcot is None]
        if mode == "raw" or not todo:
            return items
        if self.reasoner is None:
            if self.layout == LAYOUT_REFERENCE:
                return items
            more = f" (and {len(todo) - 1} more)" if len(todo) > 1 else ""
            raise ValueError(
                f"{items[todo[0]].id!r}{more} has no T-CoT, which mode {mode!r} needs, and no Reasoner is attached: "
                "attach one with embedder.attach_reasoner(embedrl.load_reasoner(path)) (a SentenceTransformer: "
                "model[0].attach_reasoner(...)), give each input its T-CoT (Item(tcot=...) or {'text': ..., "
                "'tcot': ...}), or encode with mode='raw'"
            )
        if side is None:
            raise ValueError(
                f"{len(todo)} input(s) need a T-CoT and the Reasoner needs a side to write it: use encode_query or "
                "encode_document, or pass side='query' or side='target'"
            )
        generations = self.reasoner.generate(
            [items[i] for i in todo], side, target_modality, show_progress_bar=show_progress_bar
        )
        for i, (generation, *_) in zip(todo, generations, strict=True):
            items[i] = items[i].with_tcot(generation.text)
        return items

    def attach_reasoner(self, reasoner: Reasoner | None) -> Embedder:
        """Let :meth:`encode` write missing T-CoTs with ``reasoner`` (None detaches it); returns this Embedder.

        Raises:
            TypeError: ``reasoner`` is not a :class:`~embedrl.models.reasoner.Reasoner`.
        """
        if reasoner is not None and not isinstance(reasoner, Reasoner):
            raise TypeError(f"attach_reasoner takes an embedrl Reasoner (embedrl.load_reasoner), got {type(reasoner)}")
        self.reasoner = reasoner
        return self

    def encode(
        self,
        inputs: EncodeInput | Sequence[EncodeInput],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        mode: str | None = None,
        *,
        normalize_embeddings: bool = True,
        convert_to_tensor: bool = False,
        instruction: str | None = None,
        side: Side | None = None,
        target_modality: Modality | None = None,
        groups: Sequence[Sequence[int]] | None = None,
    ) -> np.ndarray | Tensor:
        """Float32 embeddings of ``inputs``: ``[N, D]`` for a list, in its order; ``[D]`` for one input.

        Args:
            inputs: one input, or a list (any iterable) of them, each read by :func:`as_item`: ``str`` text, a PIL
                image or ``pathlib.Path`` (one image), a list of those (one video's frames), a dict of Item fields, or
                an :class:`Item`. A list is always the batch: one video alone is ``[frames]`` or ``{"frames": ...}``.
            batch_size: inputs per forward pass.
            show_progress_bar: a tqdm bar over the batches (and the Reasoner's); None means off.
            mode: T-CoT/evidence mode (docs/method.md §6.4); default :attr:`mode`.
            normalize_embeddings: unit-norm rows (the default); False returns the pooled ``<emb>`` hidden states.
            convert_to_tensor: a torch tensor on the model's device instead of a numpy array.
            instruction: the instruction of each input that has none of its own (an input's own is kept).
            side, target_modality: the Reasoner's side and a text query's target modality, for inputs whose T-CoT
                is written here (:meth:`add_tcots`); :meth:`encode_query` and :meth:`encode_document` set the side.
            groups: indices of inputs that start alike (the ``G`` rollouts of one item in the EG-RL reward), each
                input in one group: a group is batched together and the tokens its rows share are run once
                (:meth:`embed_groups`); the result equals the plain encode up to float rounding.

        Inputs (or groups, by their first input) are sorted by length (longest first), batched, encoded under
        ``torch.inference_mode`` with the model in eval mode (each module's training flag is restored afterwards),
        moved to CPU per batch, and put back in input order.

        Raises:
            ValueError: ``batch_size`` < 1, groups that do not cover the inputs once, an unknown mode, an input
                :func:`as_item` refuses, or an input without a T-CoT outside ``raw`` mode and no Reasoner attached.
            TypeError: an input of a type :func:`as_item` does not read.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; use one of {MODES}")
        single = isinstance(inputs, (str, Path, Image.Image, Mapping, Item))
        batch = [inputs] if single else list(inputs)  # type: ignore[arg-type]
        items = [as_item(x, None if single else f"inputs[{i}]") for i, x in enumerate(batch)]
        if instruction:
            items = [it if it.instruction else dataclasses.replace(it, instruction=instruction) for it in items]
        items = self.add_tcots(
            items, mode, side=side, target_modality=target_modality, show_progress_bar=show_progress_bar
        )
        out = np.empty((len(items), self.dim), dtype=np.float32)
        batches = _batches(items, groups, batch_size, length=lambda i: self._length(items[i], mode))
        flags = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            with torch.inference_mode():
                for batch in tqdm(batches, desc="encode", disable=not show_progress_bar):
                    index = [i for group in batch for i in group]
                    inputs_ = self.collate([items[i] for i in index], mode)
                    if groups is None:
                        vectors = self.embed_batch(inputs_, normalize=normalize_embeddings)
                    else:
                        starts = np.cumsum([0] + [len(group) for group in batch]).tolist()
                        local = [list(range(a, b)) for a, b in itertools.pairwise(starts)]
                        vectors = self.embed_groups(inputs_, local, normalize=normalize_embeddings)
                    out[index] = vectors.cpu().numpy()
        finally:
            for module, training in flags.items():
                module.training = training
        vectors = out[0] if single else out
        return torch.from_numpy(vectors).to(self.device) if convert_to_tensor else vectors

    def encode_query(
        self,
        inputs: EncodeInput | Sequence[EncodeInput],
        instruction: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        mode: str | None = None,
        *,
        normalize_embeddings: bool = True,
        convert_to_tensor: bool = False,
        target_modality: Modality | None = None,
    ) -> np.ndarray | Tensor:
        """:meth:`encode` for queries: an input without an instruction gets ``instruction`` (default
        ``prompts.QUERY_INSTRUCTION``; ``""`` for none), and a missing T-CoT is written on the Reasoner's query side
        (``target_modality``: what the query looks for, which picks a text query's prompt family)."""
        return self.encode(
            inputs, batch_size, show_progress_bar, mode, normalize_embeddings=normalize_embeddings,
            convert_to_tensor=convert_to_tensor,
            instruction=prompts.QUERY_INSTRUCTION if instruction is None else instruction, side="query",
            target_modality=target_modality,
        )  # fmt: skip

    def encode_document(
        self,
        inputs: EncodeInput | Sequence[EncodeInput],
        instruction: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        mode: str | None = None,
        *,
        normalize_embeddings: bool = True,
        convert_to_tensor: bool = False,
    ) -> np.ndarray | Tensor:
        """:meth:`encode` for documents (retrieval targets, candidates): an input without an instruction gets
        ``instruction`` (default ``prompts.DOCUMENT_INSTRUCTION``; ``""`` for none), and a missing T-CoT is written
        on the Reasoner's target side, which never sees a query (docs/method.md §8 item 24)."""
        return self.encode(
            inputs, batch_size, show_progress_bar, mode, normalize_embeddings=normalize_embeddings,
            convert_to_tensor=convert_to_tensor,
            instruction=prompts.DOCUMENT_INSTRUCTION if instruction is None else instruction, side="target",
        )  # fmt: skip

    @staticmethod
    def similarity(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """Cosine similarities ``[N, M]`` of the rows of ``a`` and ``b`` (a 1-D vector is one row), numpy for numpy
        inputs and torch for torch inputs, in float32 (float64 stays float64). Rows need not be unit norm.

        Raises:
            TypeError: one torch and one non-torch input.
            ValueError: an input that is not 1-D or 2-D, different vector sizes, or a zero vector.
        """
        if isinstance(a, Tensor) != isinstance(b, Tensor):
            raise TypeError(
                f"similarity takes two numpy arrays or two torch tensors, got {type(a).__name__} and "
                f"{type(b).__name__}; encode both with the same convert_to_tensor"
            )
        rows = []
        for name, x in (("a", a), ("b", b)):
            if isinstance(x, Tensor):
                x = x if x.dtype == torch.float64 else x.float()
            else:
                x = np.asarray(x)
                x = x if x.dtype == np.float64 else x.astype(np.float32)
            x = x[None] if x.ndim == 1 else x
            if x.ndim != 2:
                raise ValueError(f"similarity: {name} has shape {tuple(x.shape)}; give vectors [D] or rows [N, D]")
            norms = x.norm(dim=-1, keepdim=True) if isinstance(x, Tensor) else np.linalg.norm(x, axis=-1)[:, None]
            if not bool((norms > 0).all()):
                raise ValueError(f"similarity: {name} has a zero vector, which has no direction")
            rows.append(x / norms)
        a_rows, b_rows = rows
        if a_rows.shape[-1] != b_rows.shape[-1]:
            raise ValueError(f"similarity: vectors of size {a_rows.shape[-1]} and {b_rows.shape[-1]}")
        if isinstance(a_rows, Tensor):
            return a_rows @ b_rows.to(a_rows.dtype).T  # [N, M]
        return a_rows @ b_rows.T.astype(a_rows.dtype)  # [N, M]
