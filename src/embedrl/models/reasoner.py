"""The Reasoner: batched T-CoT generation for items of any modality, on the query side or the target side.

``Reasoner.generate(items, side)`` picks each item's prompt family (docs/method.md §5.3, §6.3), puts the item's media
before the family prompt (images, then the video's frames as separate images, docs/method.md §4.1), samples with the
configured decoding, and returns the raw text, the parsed T-CoT and its provenance (model, family, prompt hash,
decoding: docs/method.md §1.3 invariant 5). :meth:`Reasoner.generate_batches` yields the same batch by batch (each
batch one cache append upstream).

Generation runs on :mod:`embedrl.models.generation`, as :class:`~embedrl.models.generation.EngineSettings` select:
``backend="hf"`` sorts a call's items by modality and prompt length (:func:`~embedrl.models.generation.bucket_order`)
and decodes each batch with finished rows dropped; ``backend="vllm"`` sends the same rendered prompts, images and
pixel budget to vLLM, and such a Reasoner holds no HF model (:meth:`Reasoner.from_pretrained` reads the processor and
config only).

A Reasoner checkpoint carries its prompt style and default decoding in ``embedrl_reasoner.json``
(:mod:`embedrl.backbones.records`): :meth:`Reasoner.save` writes it, :meth:`Reasoner.from_pretrained` reads it, and
an explicit ``compact_prompts`` overrides it (logged).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedConfig, PreTrainedModel, ProcessorMixin

from embedrl.backbones import (
    get_adapter,
    load_backbone,
    load_processor,
    read_reasoner_settings,
    write_reasoner_settings,
)
from embedrl.backbones.adapters import PixelBudget
from embedrl.data.schema import ImageLike, Item, Modality
from embedrl.evidence import load_image
from embedrl.models.cards import write_model_card
from embedrl.models.generation import (
    DecodeStats,
    EngineSettings,
    HFGenerator,
    VLLMGenerator,
    batches,
    bucket_order,
    chat_batch,
    hf_sampling,
    prompt_length,
    render_chat,
    require_vllm,
    stop_token_ids,
    vllm_sampling,
)
from embedrl.prompts import PROMPT_FAMILIES, PromptFamily, Side, choose_family
from embedrl.tcot import TCoT, parse_tcot

logger = logging.getLogger(__name__)

__all__ = [
    "Decoding",
    "Generation",
    "Reasoner",
    "ReasonerPrompt",
    "build_reasoner_prompt",
    "checkpoint_compact_prompts",
    "checkpoint_decoding",
]


@dataclass(frozen=True)
class Decoding:
    """Sampling settings (docs/method.md §8 item 14): RL rollouts and inference sample at T=1; teachers are greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    greedy: bool = False
    seed: int | None = 0  # seeds torch before each batch; None leaves the RNG alone

    def __post_init__(self) -> None:
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 when sampling; set greedy=True instead")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")


def checkpoint_decoding(path: str | Path) -> Decoding:
    """The default decoding of the Reasoner checkpoint at ``path``: :class:`Decoding`'s defaults, updated with the
    ``decoding`` its ``embedrl_reasoner.json`` records."""
    return Decoding(**read_reasoner_settings(path).get("decoding", {}))


def checkpoint_compact_prompts(path: str | Path, explicit: bool | None = None) -> bool:
    """The prompt style to prompt the checkpoint at ``path`` with: ``explicit`` when given (logged where it overrides
    the checkpoint's), else the checkpoint's ``compact_prompts``, else full prompts (False)."""
    recorded = read_reasoner_settings(path).get("compact_prompts")
    if explicit is None:
        return bool(recorded)
    if recorded is not None and explicit != recorded:
        logger.info("compact_prompts=%s overrides the checkpoint's %s (%s)", explicit, recorded, path)
    return explicit


@dataclass
class Generation:
    """One generated T-CoT with its provenance."""

    text: str
    tcot: TCoT
    family: str
    prompt_hash: str
    model: str
    decoding: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReasonerPrompt:
    """One item's chat for the Reasoner: messages, the images for its image parts, and its family (None for a
    Discriminator prompt)."""

    messages: list[dict[str, Any]]
    images: list[Image.Image]
    family: PromptFamily | None
    n_frames: int


def _prompt_messages(
    item: Item, side: Side, target_modality: Modality | None, compact: bool
) -> tuple[list[dict[str, Any]], PromptFamily]:
    """The user turn of :func:`build_reasoner_prompt` (image parts as placeholders) and its family; no image is
    read."""
    family = PROMPT_FAMILIES[choose_family(side, item.modality, target_modality)]
    task = " ".join(part for part in (item.instruction.strip(), item.text.strip()) if part)
    fields: dict[str, object] = {"text": task}
    if "n_frames" in family.fields:
        fields["n_frames"] = len(item.frames)
    content: list[dict[str, str]] = [{"type": "image"} for _ in (*item.images, *item.frames)]
    content.append({"type": "text", "text": family.render(compact=compact, **fields)})
    return [{"role": "user", "content": content}], family


def build_reasoner_prompt(
    item: Item, side: Side, target_modality: Modality | None = None, *, compact: bool = False
) -> ReasonerPrompt:
    """The Reasoner's user turn for ``item``: its images, its frames (as images), then the family prompt.

    Target-side prompts see only the item's own instruction and text, never a query (docs/method.md §8 item 24).
    """
    messages, family = _prompt_messages(item, side, target_modality, compact)
    images = [load_image(x) for x in (*item.images, *item.frames)]
    return ReasonerPrompt(messages, images, family, len(item.frames))


def _image_size(image: ImageLike) -> tuple[int, int]:
    """``(width, height)`` of an image, from a file's header alone (its pixels are not decoded)."""
    if isinstance(image, Image.Image):
        return image.size
    with Image.open(Path(image)) as im:
        return im.size


def _dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


class Reasoner:
    """A Qwen-VL chat model that writes T-CoTs.

    Args:
        model, processor: from :func:`embedrl.backbones.load_backbone` (or any matching pair); ``model`` is None
            with the vLLM backend (then pass ``config`` and ``checkpoint``).
        compact_prompts: use the families' short prompts (tiny models trained on them); real instruct
            checkpoints use the full five-part prompts.
        decoding: the default decoding of :meth:`generate` (and the one :meth:`save` records).
        model_id: recorded with every generation; default the model's ``name_or_path`` (or ``checkpoint``).
        budget: pixel budget; default the checkpoint's own (:meth:`FamilyAdapter.checkpoint_budget`).
        engine: the generation engine (:class:`~embedrl.models.generation.EngineSettings`: backend, batch size,
            early stopping, compile, vLLM's GPU-memory share); default HF, batches of 32.
        config: the model config (only without a model).
        checkpoint: the checkpoint folder vLLM loads (only with the vLLM backend).
        dtype: the weights' dtype vLLM loads (``auto``: the checkpoint's).
    """

    def __init__(
        self,
        model: PreTrainedModel | None,
        processor: ProcessorMixin,
        *,
        compact_prompts: bool = False,
        decoding: Decoding | None = None,
        model_id: str | None = None,
        budget: PixelBudget | None = None,
        engine: EngineSettings | None = None,
        config: PreTrainedConfig | None = None,
        checkpoint: str | Path | None = None,
        dtype: str = "auto",
    ) -> None:
        self.engine = engine or EngineSettings()
        if model is None and (self.engine.backend != "vllm" or config is None or checkpoint is None):
            raise ValueError("a Reasoner without an HF model needs backend vllm, its config and its checkpoint")
        self.model = model
        self.processor = processor
        self.config: PreTrainedConfig = model.config if model is not None else config  # type: ignore[assignment]
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.compact_prompts = compact_prompts
        self.decoding = decoding or Decoding()
        self.model_id = model_id or str(self.config._name_or_path or checkpoint or type(model).__name__)
        self.adapter = get_adapter(self.config)
        self.budget = budget or self.adapter.checkpoint_budget(self.config)
        self.dtype = dtype
        self.stats = DecodeStats()  # what the HF decoding loop computed, over every generate call
        self._vllm: VLLMGenerator | None = None

    @property
    def backend(self) -> str:
        """``hf`` or ``vllm`` (:attr:`engine`'s)."""
        return self.engine.backend

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str = "auto",
        device: str = "cpu",
        compact_prompts: bool | None = None,
        engine: EngineSettings | None = None,
        attn_implementation: str | None = None,
    ) -> Reasoner:
        """The Reasoner checkpoint at ``path`` with the prompt style and default decoding it records
        (``embedrl_reasoner.json``; full prompts and :class:`Decoding`'s defaults without one). An explicit
        ``compact_prompts`` overrides the recorded one, with a log line. With ``engine.backend == "vllm"`` only the
        processor and config are read (vLLM loads the weights on the first generation).

        Raises:
            VLLMUnavailableError: ``backend="vllm"`` without vLLM installed (an ImportError).
        """
        compact = checkpoint_compact_prompts(path, compact_prompts)
        engine = engine or EngineSettings()
        if engine.backend == "vllm":
            require_vllm()  # at load time, not after the first minutes of a run
            config, processor = load_processor(path)
            return cls(None, processor, compact_prompts=compact, decoding=checkpoint_decoding(path),
                       model_id=str(path), engine=engine, config=config, checkpoint=path,
                       dtype=_dtype_name(dtype))  # fmt: skip
        model, processor = load_backbone(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
        return cls(model, processor, compact_prompts=compact, decoding=checkpoint_decoding(path), model_id=str(path),
                   engine=engine, checkpoint=path)  # fmt: skip

    def _hf_model(self) -> PreTrainedModel:
        if self.model is None:
            raise ValueError(f"this Reasoner runs on vLLM and holds no HF model ({self.model_id})")
        return self.model

    def save(self, path: str | Path) -> None:
        """Save the model, the processor and ``embedrl_reasoner.json`` (prompt style and default decoding); the
        directory reloads with :meth:`from_pretrained`."""
        model = self._hf_model()
        model.save_pretrained(path)
        self.processor.save_pretrained(path)
        write_reasoner_settings(path, compact_prompts=self.compact_prompts, decoding=dataclasses.asdict(self.decoding))
        write_model_card(path, "reasoner")  # README.md; a training stage writes it again with its config

    @property
    def processor_kwargs(self) -> dict[str, Any]:
        """The processor-call keyword arguments of the pixel budget."""
        return self.adapter.processor_kwargs(self.budget)

    def prompt_lengths(self, items: Sequence[Item], side: Side, target_modality: Modality | None = None) -> list[int]:
        """Each item's prompt tokens, from its rendered prompt and its images' sizes (no image is decoded)."""
        image_size = self.processor_kwargs["images_kwargs"]["size"]
        lengths = []
        for item in items:
            messages, _ = _prompt_messages(item, side, target_modality, self.compact_prompts)
            sizes = [_image_size(x) for x in (*item.images, *item.frames)]
            lengths.append(prompt_length(self.processor, render_chat(self.processor, messages), sizes, image_size))
        return lengths

    def generate(
        self,
        items: Sequence[Item],
        side: Side,
        target_modality: Modality | None = None,
        *,
        decoding: Decoding | None = None,
        num_return_sequences: int = 1,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> list[list[Generation]]:
        """``num_return_sequences`` T-CoTs per item, in input order: ``result[i][g]`` for item ``i``
        (:meth:`generate_batches`, collected)."""
        results: list[list[Generation]] = [[] for _ in items]
        for indices, generations in self.generate_batches(
            items, side, target_modality, decoding=decoding, num_return_sequences=num_return_sequences,
            batch_size=batch_size, show_progress_bar=show_progress_bar,
        ):  # fmt: skip
            for i, gens in zip(indices, generations, strict=True):
                results[i] = gens
        return results

    def generate_batches(
        self,
        items: Sequence[Item],
        side: Side,
        target_modality: Modality | None = None,
        *,
        decoding: Decoding | None = None,
        num_return_sequences: int = 1,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> Iterator[tuple[list[int], list[list[Generation]]]]:
        """Yield ``(item indices, their generations)`` batch by batch: ``generations[k][g]`` is T-CoT ``g`` of item
        ``indices[k]``.

        With more items than one batch holds, the items are sorted by modality and prompt length first
        (:func:`~embedrl.models.generation.bucket_order`), so a batch holds prompts of about one length; the images
        of one batch are read at a time. ``decoding`` defaults to the Reasoner's own (:attr:`decoding`, the
        checkpoint's); with a seed, torch is seeded before each batch (HF). ``batch_size`` defaults to the engine's.
        The cue each T-CoT is parsed for is the family's required cue; key frames are checked against the item's
        frame count.
        """
        decoding = decoding or self.decoding
        size = batch_size or self.engine.batch_size
        n = num_return_sequences
        if len(items) > size:
            order = bucket_order([it.modality for it in items], self.prompt_lengths(items, side, target_modality))
        else:
            order = list(range(len(items)))
        show = show_progress_bar if show_progress_bar is not None else len(items) > 4 * size
        for batch in tqdm(batches(order, size), desc=f"reasoner ({side})", disable=not show, leave=False):
            prompts = [build_reasoner_prompt(items[i], side, target_modality, compact=self.compact_prompts)
                       for i in batch]  # fmt: skip
            texts = self._generate(prompts, decoding, n)
            yield batch, [[self._record(t, p, decoding) for t in texts[k * n : (k + 1) * n]]
                          for k, p in enumerate(prompts)]  # fmt: skip

    def _record(self, text: str, prompt: ReasonerPrompt, decoding: Decoding) -> Generation:
        assert prompt.family is not None  # generate() builds family prompts only
        tcot = parse_tcot(text, cue_key=prompt.family.cue_key, n_frames=prompt.n_frames or None)
        return Generation(
            text=text,
            tcot=tcot,
            family=prompt.family.name,
            prompt_hash=prompt.family.hash(self.compact_prompts),
            model=self.model_id,
            decoding=dataclasses.asdict(decoding),
        )

    def chat_inputs(self, prompts: Sequence[ReasonerPrompt], add_generation_prompt: bool = True) -> Any:
        """Processor tensors for a batch of prompts (left-padded, generation prompt opened): the HF path's model
        inputs (:func:`~embedrl.models.generation.chat_batch`)."""
        return chat_batch(self.processor, prompts, self.processor_kwargs, self._hf_model().device,
                          add_generation_prompt=add_generation_prompt)  # fmt: skip

    def hf_generator(self) -> HFGenerator:
        """The HF engine on this Reasoner's model, pixel budget and settings (decode counts go to :attr:`stats`)."""
        return HFGenerator(self._hf_model(), self.processor, self.processor_kwargs, self.engine, stats=self.stats)

    def vllm_generator(self) -> VLLMGenerator:
        """The vLLM engine on this Reasoner's checkpoint (built once; vLLM loads the weights on its first call)."""
        if self._vllm is None:
            if self.checkpoint is None:
                raise ValueError(f"backend vllm needs the Reasoner's checkpoint folder ({self.model_id} has none)")
            image_size = self.processor_kwargs["images_kwargs"]["size"]
            self._vllm = VLLMGenerator(self.checkpoint, self.processor, image_size, self.engine, dtype=self.dtype)
        return self._vllm

    def generation_config(self) -> Any:
        """The checkpoint's generation config (the model's; read from the checkpoint without one, None if absent)."""
        if self.model is not None:
            return self.model.generation_config
        try:
            return GenerationConfig.from_pretrained(self.checkpoint)
        except OSError:
            return None

    def _generate(self, prompts: Sequence[ReasonerPrompt], decoding: Decoding, n: int) -> list[str]:
        """One batch's texts, rows ``k·n + j``."""
        if self.backend == "vllm":
            gen_config = self.generation_config()
            sampling = vllm_sampling(
                greedy=decoding.greedy, temperature=decoding.temperature, top_p=decoding.top_p,
                max_new_tokens=decoding.max_new_tokens, seed=decoding.seed, n=n,
                eos_ids=stop_token_ids(None, self.processor, gen_config)[0], generation_config=gen_config,
            )  # fmt: skip
            return self.vllm_generator().generate(prompts, sampling).texts
        kwargs = hf_sampling(greedy=decoding.greedy, temperature=decoding.temperature, top_p=decoding.top_p,
                             max_new_tokens=decoding.max_new_tokens, n=n)  # fmt: skip
        return self.hf_generator().generate(prompts, kwargs, seed=decoding.seed).texts
