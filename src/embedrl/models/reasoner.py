"""The Reasoner: batched T-CoT generation for items of any modality, on the query side or the target side.

``Reasoner.generate(items, side)`` picks each item's prompt family (docs/method.md §5.3, §6.3), puts the item's media
before the family prompt (images, then the video's frames as separate images, docs/method.md §4.1), samples with the
configured decoding, and returns the raw text, the parsed T-CoT and its provenance (model, family, prompt hash,
decoding: docs/method.md §1.3 invariant 5). It runs on HF ``generate``; ``backend="vllm"`` uses vLLM when installed.

A Reasoner checkpoint carries its prompt style and default decoding in ``embedrl_reasoner.json``
(:mod:`embedrl.backbones.records`): :meth:`Reasoner.save` writes it, :meth:`Reasoner.from_pretrained` reads it, and
an explicit ``compact_prompts`` overrides it (logged).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import PreTrainedModel, ProcessorMixin

from embedrl.backbones import get_adapter, load_backbone, read_reasoner_settings, write_reasoner_settings
from embedrl.backbones.adapters import PixelBudget
from embedrl.data.schema import Item, Modality
from embedrl.evidence import load_image
from embedrl.models.generation import generate_texts
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


def build_reasoner_prompt(
    item: Item, side: Side, target_modality: Modality | None = None, *, compact: bool = False
) -> ReasonerPrompt:
    """The Reasoner's user turn for ``item``: its images, its frames (as images), then the family prompt.

    Target-side prompts see only the item's own instruction and text, never a query (docs/method.md §8 item 24).
    """
    family = PROMPT_FAMILIES[choose_family(side, item.modality, target_modality)]
    images = [load_image(x) for x in item.images]
    frames = [load_image(x) for x in item.frames]
    task = " ".join(part for part in (item.instruction.strip(), item.text.strip()) if part)
    fields: dict[str, object] = {"text": task}
    if "n_frames" in family.fields:
        fields["n_frames"] = len(frames)
    content: list[dict[str, str]] = [{"type": "image"} for _ in images + frames]
    content.append({"type": "text", "text": family.render(compact=compact, **fields)})
    return ReasonerPrompt([{"role": "user", "content": content}], images + frames, family, len(frames))


class Reasoner:
    """A Qwen-VL chat model that writes T-CoTs.

    Args:
        model, processor: from :func:`embedrl.backbones.load_backbone` (or any matching pair).
        compact_prompts: use the families' short prompts (tiny models trained on them); real instruct
            checkpoints use the full five-part prompts.
        decoding: the default decoding of :meth:`generate` (and the one :meth:`save` records).
        model_id: recorded with every generation; default the model's ``name_or_path``.
        budget: pixel budget; default the checkpoint's own (:meth:`FamilyAdapter.checkpoint_budget`).
        backend: ``hf`` (transformers ``generate``) or ``vllm`` (needs the ``gpu`` extra and a checkpoint path).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        *,
        compact_prompts: bool = False,
        decoding: Decoding | None = None,
        model_id: str | None = None,
        budget: PixelBudget | None = None,
        backend: Literal["hf", "vllm"] = "hf",
    ) -> None:
        if backend not in ("hf", "vllm"):
            raise ValueError(f"backend={backend!r}; use 'hf' or 'vllm'")
        self.model = model
        self.processor = processor
        self.compact_prompts = compact_prompts
        self.decoding = decoding or Decoding()
        self.model_id = model_id or str(model.config._name_or_path or type(model).__name__)
        self.adapter = get_adapter(model.config)
        self.budget = budget or self.adapter.checkpoint_budget(model.config)
        self.backend = backend
        self._vllm: Any = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str = "auto",
        device: str = "cpu",
        compact_prompts: bool | None = None,
        backend: Literal["hf", "vllm"] = "hf",
    ) -> Reasoner:
        """The Reasoner checkpoint at ``path`` with the prompt style and default decoding it records
        (``embedrl_reasoner.json``; full prompts and :class:`Decoding`'s defaults without one). An explicit
        ``compact_prompts`` overrides the recorded one, with a log line."""
        compact = checkpoint_compact_prompts(path, compact_prompts)
        model, processor = load_backbone(path, dtype=dtype, device=device)
        return cls(model, processor, compact_prompts=compact, decoding=checkpoint_decoding(path), model_id=str(path),
                   backend=backend)  # fmt: skip

    def save(self, path: str | Path) -> None:
        """Save the model, the processor and ``embedrl_reasoner.json`` (prompt style and default decoding); the
        directory reloads with :meth:`from_pretrained`."""
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        write_reasoner_settings(path, compact_prompts=self.compact_prompts, decoding=dataclasses.asdict(self.decoding))

    def generate(
        self,
        items: Sequence[Item],
        side: Side,
        target_modality: Modality | None = None,
        *,
        decoding: Decoding | None = None,
        num_return_sequences: int = 1,
        batch_size: int = 8,
        show_progress_bar: bool | None = None,
    ) -> list[list[Generation]]:
        """``num_return_sequences`` T-CoTs per item, in input order: ``result[i][g]`` for item ``i``.

        ``decoding`` defaults to the Reasoner's own (:attr:`decoding`, the checkpoint's). The cue each T-CoT is parsed
        for is the family's required cue; key frames are checked against the item's frame count.
        """
        decoding = decoding or self.decoding
        prompts = [build_reasoner_prompt(it, side, target_modality, compact=self.compact_prompts) for it in items]
        generate = self._generate_vllm if self.backend == "vllm" else self._generate_hf
        results: list[list[Generation]] = []
        show = show_progress_bar if show_progress_bar is not None else len(items) > 4 * batch_size
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc=f"reasoner ({side})", disable=not show):
            batch = prompts[start : start + batch_size]
            texts = generate(batch, decoding, num_return_sequences)
            for i, prompt in enumerate(batch):
                outs = texts[i * num_return_sequences : (i + 1) * num_return_sequences]
                results.append([self._record(text, prompt, decoding) for text in outs])
        return results

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
        """Processor tensors for a batch of prompts (left-padded, generation prompt opened)."""
        texts = [
            self.processor.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            for p in prompts
        ]
        images = [im for p in prompts for im in p.images]
        kwargs = self.adapter.processor_kwargs(self.budget)
        inputs = self.processor(
            text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt", **kwargs
        )
        return inputs.to(self.model.device)

    def _generate_hf(self, prompts: Sequence[ReasonerPrompt], decoding: Decoding, n: int) -> list[str]:
        sampling = {} if decoding.greedy else {"temperature": decoding.temperature, "top_p": decoding.top_p}
        return generate_texts(
            self.model, self.processor, self.chat_inputs(prompts), seed=decoding.seed, do_sample=not decoding.greedy,
            max_new_tokens=decoding.max_new_tokens, num_return_sequences=n, top_k=None, **sampling,
        )  # fmt: skip

    def _generate_vllm(self, prompts: Sequence[ReasonerPrompt], decoding: Decoding, n: int) -> list[str]:
        try:  # vLLM is optional (the ``gpu`` extra): imported only when this backend runs
            from vllm import LLM, SamplingParams
        except ImportError as err:
            raise ImportError(
                "backend='vllm' needs vLLM: pip install 'embedrl[gpu]' on a GPU machine, or use backend='hf'"
            ) from err
        if self._vllm is None:
            self._vllm = LLM(model=self.model_id, limit_mm_per_prompt={"image": 16}, seed=decoding.seed or 0)
        params = SamplingParams(
            n=n,
            temperature=0.0 if decoding.greedy else decoding.temperature,
            top_p=decoding.top_p,
            max_tokens=decoding.max_new_tokens,
            seed=decoding.seed,
        )
        requests = [
            {
                "prompt": self.processor.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True),
                "multi_modal_data": {"image": p.images} if p.images else {},
            }
            for p in prompts
        ]
        outputs = self._vllm.generate(requests, params, use_tqdm=False)
        return [c.text for o in outputs for c in o.outputs]
