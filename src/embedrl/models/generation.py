"""Text generation with a Qwen-VL (or text) chat model, in one place: the generation engine.

Every caller that decodes (the Reasoner's T-CoTs for evaluation, index builds and the server, the server's and the
annotator's chat models, the Discriminator, the tiny backbone's held-out score) goes through this module; EG-RL's
rollouts are TRL's (docs/rl.md):

- :func:`generate_completions` (or :func:`generate_texts` for the texts alone) decodes one left-padded batch. It runs
  HF ``generate`` for everything ``generate`` prepares (generation config, logits processors, stopping criteria,
  prefill, multimodal features) with :func:`decode_dropping_finished` as its decoding loop (``generate``'s public
  ``custom_generate`` hook): a row that has stopped (EOS) is dropped from the batch and its KV cache, so the rows still
  decoding no longer drag it along. Greedy output is token-identical to HF ``generate``'s ``_sample`` loop, and so is
  seeded sampling (the loop draws the same Exp(1) noise ``torch.multinomial`` draws for the whole batch and uses the
  surviving rows' share of it), as long as the model's logits for a row do not depend on the batch around it
  (tests/test_generation.py checks both on the tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL). ``drop_finished=False`` runs
  HF's own loop; ``cache_implementation="static"`` (with torch.compile on a GPU) always does.
- :class:`HFGenerator` runs many chats through it: it measures each chat's prompt length without running the image
  processor (:func:`prompt_length`), sorts the chats by group (e.g. modality) and length so a batch holds prompts of
  about one length, and yields ``(indices, completions)`` batch by batch; callers put results back in input order.
- :class:`VLLMGenerator` does the same on vLLM (GPU; ``pip install 'embedrl[gpu]'``): the request of each chat is
  built by pure functions that never import vLLM (:func:`vllm_request`, :func:`vllm_sampling`,
  :func:`vllm_engine_args`), with the same chat rendering, pixel budget and stop tokens as the HF path.
- :class:`EngineSettings` is what a stage config selects: ``backend`` (hf | vllm), batch size, early stopping of
  finished rows, static cache + torch.compile, vLLM's GPU-memory share.

It also holds the ids that stop a reply, pad it, and must never be sampled (:func:`vision_token_ids`).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from PIL import Image
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel, StoppingCriteriaList

from embedrl import prompts as P
from embedrl.config import EngineFields, UserError

__all__ = [
    "BACKENDS",
    "VISION_TOKENS",
    "ChatLike",
    "Completions",
    "DecodeStats",
    "EngineSettings",
    "HFGenerator",
    "VLLMGenerator",
    "VLLMUnavailableError",
    "batches",
    "bucket_order",
    "chat_batch",
    "decode_dropping_finished",
    "engine_settings",
    "generate_completions",
    "generate_texts",
    "hf_sampling",
    "image_tokens",
    "prompt_length",
    "render_chat",
    "require_vllm",
    "stop_token_ids",
    "vision_token_ids",
    "vllm_engine_args",
    "vllm_mm_processor_kwargs",
    "vllm_request",
    "vllm_sampling",
]

logger = logging.getLogger(__name__)

# Sampling one of these would add a vision placeholder without pixels: the next forward pass would fail.
VISION_TOKENS = (P.VISION_START, P.VISION_END, "<|vision_pad|>", P.IMAGE_PAD, P.VIDEO_PAD)

BACKENDS = ("hf", "vllm")
Backend = Literal["hf", "vllm"]


def _tokenizer(processor: Any) -> Any:
    """The tokenizer of a processor, or ``processor`` itself when it is a tokenizer (text chat models)."""
    return getattr(processor, "tokenizer", processor)


def stop_token_ids(
    model: PreTrainedModel | None, processor: Any, generation_config: Any = None
) -> tuple[list[int], int]:
    """``(eos ids, pad id)`` from the generation config (the model's, or ``generation_config`` when there is no model,
    e.g. the vLLM backend), falling back to the tokenizer's."""
    gen, tokenizer = (model.generation_config if model is not None else generation_config), _tokenizer(processor)
    eos = getattr(gen, "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]
    pad = getattr(gen, "pad_token_id", None)
    pad = pad if pad is not None else tokenizer.pad_token_id
    return eos_ids, int(pad if pad is not None else eos_ids[0])


def vision_token_ids(processor: Any) -> list[int]:
    """Ids of the vision placeholder tokens present in ``processor``'s vocabulary (to suppress in generation)."""
    vocab = processor.tokenizer.get_vocab()
    return sorted(vocab[t] for t in VISION_TOKENS if t in vocab)


# ----------------------------------------------------------------------------------------------------------------
# Engine settings
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSettings:
    """How generation runs (not what it draws: that is the decoding).

    Args:
        backend: ``hf`` (transformers, this module's decoding loop) or ``vllm`` (GPU; no HF model is loaded).
        batch_size: prompts per batch. HF: per forward batch, after sorting a whole call's prompts by group and
            length. vLLM: per ``LLM.generate`` call (vLLM batches inside it); each batch is one cache append upstream.
        drop_finished: HF: drop rows that stopped from the batch (False: HF ``generate``'s own loop, which keeps
            decoding them until the longest row ends).
        compile: HF on CUDA only: a static KV cache, with which ``generate`` compiles the decoding forward
            (torch.compile); finished rows then stay in the batch (static shapes). Refused on other devices.
        gpu_memory_utilization: vLLM: the share of GPU memory it may take (weights, activations, KV cache).
    """

    backend: Backend = "hf"
    batch_size: int = 32
    drop_finished: bool = True
    compile: bool = False
    gpu_memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}; use one of {', '.join(BACKENDS)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.compile and self.backend != "hf":
            raise ValueError("compile applies to backend hf (vLLM compiles its own graphs)")


def engine_settings(cfg: EngineFields, batch_size: int) -> EngineSettings:
    """The :class:`EngineSettings` of a stage config's engine fields (:class:`~embedrl.config.EngineFields`; the
    annotator's ``local`` backend is ``hf``) with ``batch_size`` (the stage's own batch-size key)."""
    backend = "hf" if cfg.backend == "local" else cfg.backend
    return EngineSettings(backend=backend, batch_size=batch_size, drop_finished=cfg.drop_finished,  # type: ignore[arg-type]
                          compile=cfg.compile, gpu_memory_utilization=cfg.gpu_memory_utilization)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The decoding loop: HF generate's sampling loop, with finished rows dropped
# ----------------------------------------------------------------------------------------------------------------

# Logits processors and stopping criteria that treat every row on its own (a row's scores depend on that row's tokens
# and the common length only): rows can leave the batch without changing what the others get.
_ROW_WISE_PROCESSORS = frozenset(
    {
        "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor", "TemperatureLogitsWarper",
        "RepetitionPenaltyLogitsProcessor", "TopPLogitsWarper", "TopKLogitsWarper", "MinPLogitsWarper",
        "TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper", "NoRepeatNGramLogitsProcessor",
        "SequenceBiasLogitsProcessor", "NoBadWordsLogitsProcessor", "ForcedBOSTokenLogitsProcessor",
        "ForcedEOSTokenLogitsProcessor", "InfNanRemoveLogitsProcessor", "ExponentialDecayLengthPenalty",
        "LogitNormalization", "SuppressTokensAtBeginLogitsProcessor", "SuppressTokensLogitsProcessor",
    }
)  # fmt: skip
_ROW_WISE_CRITERIA = frozenset({"MaxLengthCriteria", "MaxTimeCriteria", "EosTokenCriteria", "StopStringCriteria"})
# Per-row state some of them hold (a tensor with one entry per row), sliced with the batch.
_PER_ROW_STATE = {"RepetitionPenaltyLogitsProcessor": ("prompt_ignore_length",)}
# Model inputs used by the prefill only (HF's prepare_inputs_for_generation stops forwarding them after it).
_PREFILL_ONLY = frozenset(
    {"mm_encoder_outputs", "pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw",
     "second_per_grid_ts", "pixel_mask", "input_features", "input_features_mask", "input_values"}
)  # fmt: skip
_PER_TOKEN = frozenset({"attention_mask", "mm_token_type_ids", "token_type_ids", "moe_mm_token_type_ids"})
_SCALARS = frozenset({"use_cache", "logits_to_keep", "return_dict", "output_attentions", "output_hidden_states"})


@dataclass
class DecodeStats:
    """What a decoding loop computed, summed over calls (:meth:`add`)."""

    rows: int = 0  # sequences decoded (prompts x draws)
    steps: int = 0  # decoding steps (one new token per surviving row each; the first comes from the prefill)
    row_steps: int = 0  # rows that went through each step, summed: the rows the model computed
    batch_row_steps: int = 0  # rows x steps per batch: what HF generate computes (finished rows keep decoding)
    stopped_early: int = 0  # rows that stopped before their batch's last step
    prompt_tokens: int = 0  # real prompt tokens
    padded_prompt_tokens: int = 0  # rows x padded prompt length: what the prefill computed
    new_tokens: int = 0  # generated tokens kept (through each row's stop token)

    def add(self, other: DecodeStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def saved_share(self) -> float:
        """The share of HF generate's row-steps the loop did not compute (finished rows dropped)."""
        return 1 - self.row_steps / self.batch_row_steps if self.batch_row_steps else 0.0

    @property
    def padding_share(self) -> float:
        """The share of the prefill's prompt positions that were padding."""
        return 1 - self.prompt_tokens / self.padded_prompt_tokens if self.padded_prompt_tokens else 0.0


def _check_row_wise(logits_processor: LogitsProcessorList, stopping_criteria: StoppingCriteriaList) -> None:
    """Raise for a processor or criterion that may couple rows (then rows cannot leave the batch)."""
    odd = [type(p).__name__ for p in logits_processor if type(p).__name__ not in _ROW_WISE_PROCESSORS]
    odd += [type(c).__name__ for c in stopping_criteria if type(c).__name__ not in _ROW_WISE_CRITERIA]
    if odd:
        raise ValueError(
            f"decode_dropping_finished cannot drop rows with {', '.join(sorted(set(odd)))} (not known to treat rows "
            "independently); generate with drop_finished=False"
        )


def _select_processor_rows(logits_processor: LogitsProcessorList, keep: torch.Tensor) -> None:
    """Slice the per-row state of the processors (e.g. the repetition penalty's prompt padding) to the rows ``keep``;
    ``generate`` builds them for this call, so they are changed in place."""
    for processor in logits_processor:
        for name in _PER_ROW_STATE.get(type(processor).__name__, ()):
            value = getattr(processor, name)
            if isinstance(value, torch.Tensor):
                setattr(processor, name, value[keep.to(value.device)])


def _select_rows(model_kwargs: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """``model_kwargs`` of the rows ``keep``: the KV cache, per-token tensors and (3-D mrope) position ids sliced;
    prefill-only inputs dropped. An unknown tensor raises rather than being carried with the wrong batch."""
    out: dict[str, Any] = {}
    for key, value in model_kwargs.items():
        if key in _PREFILL_ONLY or value is None:
            continue
        if key == "cache":
            value.batch_select_indices(keep)
        elif key == "position_ids":
            value = value[:, keep] if value.ndim == 3 else value[keep]
        elif key in _PER_TOKEN:
            value = value[keep]
        elif key not in _SCALARS and isinstance(value, torch.Tensor):
            raise ValueError(f"decode_dropping_finished does not know how to drop rows of model input {key!r}")
        out[key] = value
    return out


def decode_dropping_finished(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    decode_stats: DecodeStats | None = None,
    **model_kwargs: Any,
) -> torch.LongTensor:
    """HF ``generate``'s sampling loop (greedy or multinomial) that drops each row from the batch once it has stopped.

    Pass it as ``model.generate(..., custom_generate=decode_dropping_finished)``: ``generate`` prepares everything
    (config, processors, criteria, cache, expanded inputs) and calls it with the result. Returns what ``generate``
    returns: ``[rows, prompt + new tokens]`` with a stopped row padded with the pad id after its stop token.

    Per step it computes exactly what ``_sample`` computes for the surviving rows: the same forward inputs (the
    rows' slice of the cache, attention mask and position ids), logits processors and stopping criteria, argmax for
    greedy decoding, and for sampling the argmax of ``probs / q`` with ``q ~ Exp(1)`` drawn for the full batch (what
    ``torch.multinomial(probs, 1)`` draws), so the RNG advances as in ``_sample`` and a surviving row gets the same
    noise. ``decode_stats`` (optional) is added to.

    Raises:
        ValueError: a processor or criterion that may couple rows, a model input it cannot slice, or output options
            (scores, attentions, streamer) the loop does not return.
    """
    _check_row_wise(logits_processor, stopping_criteria)
    if generation_config.return_dict_in_generate:
        raise ValueError("decode_dropping_finished returns sequences only: drop return_dict_in_generate")
    pad_id = generation_config._pad_token_tensor
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    do_sample = bool(generation_config.do_sample)
    total, prompt_width = input_ids.shape
    device = input_ids.device
    mask = model_kwargs.get("attention_mask")
    stats = DecodeStats(rows=total, padded_prompt_tokens=total * prompt_width)
    stats.prompt_tokens = int(mask.sum()) if mask is not None else total * prompt_width
    fill = int(pad_id) if pad_id is not None else 0
    new_columns: list[torch.Tensor] = []  # per step: the token of every row (pad for rows that stopped)
    active = torch.arange(total, device=device)  # rows still decoding, as indices into the full batch
    ids = input_ids
    outputs = model._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True)
    while True:
        if stats.steps:
            model_inputs = model.prepare_inputs_for_generation(ids, next_sequence_length=1, **model_kwargs)
            outputs = model(**model_inputs, return_dict=True)
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=device)
        del outputs
        scores = logits_processor(ids, logits)
        if do_sample:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            noise = torch.empty((total, probs.shape[-1]), dtype=probs.dtype, device=probs.device).exponential_(1)
            next_tokens = (probs / noise[active]).argmax(dim=-1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        ids = torch.cat([ids, next_tokens[:, None]], dim=-1)
        column = torch.full((total,), fill, dtype=ids.dtype, device=device)
        column[active] = next_tokens
        new_columns.append(column)
        stats.steps += 1
        stats.row_steps += len(active)
        done = stopping_criteria(ids, None)
        if done.all():
            break
        if not has_eos and done.any():  # only EOS stops rows one by one; length and time stop them all
            raise RuntimeError("a stopping criterion stopped some rows but not all without an EOS criterion")
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            stats.stopped_early += len(active) - len(keep)
            ids, active = ids[keep], active[keep]
            model_kwargs = _select_rows(model_kwargs, keep)
            _select_processor_rows(logits_processor, keep)
    stats.batch_row_steps = total * stats.steps
    if decode_stats is not None:
        decode_stats.add(stats)
    return torch.cat([input_ids, torch.stack(new_columns, dim=1)], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# One batch: generate_completions
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Completions:
    """The continuations of one ``generate`` call; row ``i·n + j`` is draw ``j`` of prompt ``i`` (``n`` =
    ``num_return_sequences``)."""

    tokens: list[list[int]]  # new tokens of each row through its first stop token (kept); all of them without one
    texts: list[str]  # each row's tokens before its stop token, decoded without special tokens
    truncated: list[bool]  # no stop token within max_new_tokens
    prompt_tokens: list[int]  # per prompt (not per row): its tokens, the attention mask's sum

    @property
    def completion_tokens(self) -> list[int]:
        """Tokens of each row, its stop token included."""
        return [len(t) for t in self.tokens]


def generate_completions(
    model: PreTrainedModel,
    processor: Any,
    inputs: Mapping[str, Any],
    generation_config: GenerationConfig | None = None,
    *,
    seed: int | None = None,
    drop_finished: bool = True,
    stats: DecodeStats | None = None,
    **generate_kwargs: Any,
) -> Completions:
    """``model.generate(**inputs, generation_config=..., **generate_kwargs)``, its continuations trimmed and decoded.

    Args:
        model, processor: the chat model and its processor (or tokenizer, for a text model).
        inputs: the processor's tensors for a left-padded batch of prompts, on the model's device.
        generation_config, generate_kwargs: passed to ``generate`` as given (its usual precedence: keyword
            arguments over the config over the model's ``generation_config``); pass one or the other.
        seed: ``torch.manual_seed(seed)`` right before generating; None leaves the RNG alone (a caller that seeds
            once for several calls).
        drop_finished: decode with :func:`decode_dropping_finished` (stopped rows leave the batch; same tokens);
            False, or a static cache (``cache_implementation="static"``), runs HF's own loop.
        stats: a :class:`DecodeStats` to add this call's counts to (the dropping loop only).

    The model runs in eval mode under ``torch.inference_mode``; its training flag is restored afterwards.
    """
    eos_ids = set(stop_token_ids(model, processor)[0])
    static = generate_kwargs.get("cache_implementation") == "static" or (
        generation_config is not None and generation_config.cache_implementation == "static"
    )
    if drop_finished and not static:
        generate_kwargs = {**generate_kwargs, "custom_generate": decode_dropping_finished, "decode_stats": stats}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(**inputs, generation_config=generation_config, **generate_kwargs)
    finally:
        model.train(was_training)
    rows = out[:, inputs["input_ids"].shape[1] :].tolist()
    tokens, kept, truncated = [], [], []
    for row in rows:
        end = next((j for j, t in enumerate(row) if t in eos_ids), None)
        tokens.append(row if end is None else row[: end + 1])
        kept.append(row if end is None else row[:end])
        truncated.append(end is None)
    if stats is not None:
        stats.new_tokens += sum(len(t) for t in tokens)
    texts = _tokenizer(processor).batch_decode(kept, skip_special_tokens=True)
    return Completions(tokens, texts, truncated, inputs["attention_mask"].sum(dim=1).tolist())


def generate_texts(
    model: PreTrainedModel, processor: Any, inputs: Mapping[str, Any], *args: Any, **kwargs: Any
) -> list[str]:
    """The decoded continuations of :func:`generate_completions` (same arguments; row ``i·n + j``: draw ``j`` of
    prompt ``i``)."""
    return generate_completions(model, processor, inputs, *args, **kwargs).texts


# ----------------------------------------------------------------------------------------------------------------
# Many chats: rendering, batches, lengths, buckets
# ----------------------------------------------------------------------------------------------------------------


class ChatLike(Protocol):
    """A chat to continue: HF chat messages (``{"type": "image"}`` parts) and the images of its image parts."""

    messages: list[dict[str, Any]]
    images: list[Image.Image]


def render_chat(processor: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The chat template applied to ``messages`` (one ``<|image_pad|>`` per image part), the assistant turn opened:
    the prompt text of both backends."""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_batch(
    processor: Any,
    chats: Sequence[ChatLike],
    processor_kwargs: Mapping[str, Any],
    device: str | torch.device,
    *,
    add_generation_prompt: bool = True,
) -> Any:
    """Processor tensors for a batch of chats (left-padded), on ``device``: the HF path's model inputs.

    ``processor`` is a Qwen-VL processor (``processor_kwargs``: the pixel budget's) or a text model's tokenizer
    (then the chats carry no images and ``processor_kwargs`` is empty).
    """
    texts = [render_chat(processor, c.messages, add_generation_prompt) for c in chats]
    if processor is _tokenizer(processor):
        if any(c.images for c in chats):
            raise ValueError("this chat model is text-only; send no images")
        return processor(texts, padding=True, padding_side="left", return_tensors="pt").to(device)
    images = [im for c in chats for im in c.images]
    return processor(
        text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt", **processor_kwargs
    ).to(device)


def image_tokens(processor: Any, width: int, height: int, image_size: Mapping[str, int]) -> int:
    """Visual tokens of a ``width`` x ``height`` image under the image processor's ``size`` (min/max pixels), from
    the size alone (nothing is resized)."""
    image_processor = processor.image_processor
    patches = image_processor.get_number_of_image_patches(
        height, width, {"min_pixels": image_size["shortest_edge"], "max_pixels": image_size["longest_edge"]}
    )
    return patches // image_processor.merge_size**2


def prompt_length(
    processor: Any, text: str, image_sizes: Sequence[tuple[int, int]], image_size: Mapping[str, int] | None
) -> int:
    """Tokens of a rendered prompt once its image placeholders are expanded (what the processor's ``input_ids`` will
    hold), from the tokenizer and the images' ``(width, height)`` alone; ``image_size``: the pixel budget's."""
    n = len(_tokenizer(processor)(text, add_special_tokens=False)["input_ids"])
    if image_sizes:
        if image_size is None:
            raise ValueError("a prompt with images needs the pixel budget's image size")
        n += sum(image_tokens(processor, w, h, image_size) - 1 for w, h in image_sizes)
    return n


def bucket_order(groups: Sequence[str], lengths: Sequence[int]) -> list[int]:
    """Indices sorted by ``(group, length, index)``: consecutive slices are batches of one group (e.g. modality)
    and about one prompt length, so little padding is computed and the rows of a batch tend to end together."""
    return sorted(range(len(lengths)), key=lambda i: (groups[i], lengths[i], i))


def batches(order: Sequence[int], size: int) -> list[list[int]]:
    """``order`` cut into consecutive batches of ``size`` (the last one shorter)."""
    return [list(order[i : i + size]) for i in range(0, len(order), size)]


def hf_sampling(*, greedy: bool, temperature: float, top_p: float, max_new_tokens: int, n: int) -> dict[str, Any]:
    """``generate`` keyword arguments of a decoding: greedy, or temperature/top-p sampling; top-k off (a
    checkpoint's ``generation_config`` may set one)."""
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p}
    return {"do_sample": not greedy, "max_new_tokens": max_new_tokens, "num_return_sequences": n, "top_k": None,
            **sampling}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# HF backend
# ----------------------------------------------------------------------------------------------------------------


class HFGenerator:
    """Chats -> completions on a transformers model.

    Args:
        model, processor: a Qwen-VL ``*ForConditionalGeneration`` and its processor, or a text causal LM and its
            tokenizer.
        processor_kwargs: the processor-call keyword arguments of the pixel budget
            (:meth:`~embedrl.backbones.adapters.FamilyAdapter.processor_kwargs`); ``{}`` for a text model.
        settings: batch size, early stopping of finished rows, static cache + compile.
        stats: a :class:`DecodeStats` every batch adds to (default a new one: :attr:`stats`).

    Raises:
        ValueError: ``compile`` with a model that is not on a CUDA device.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processor: Any,
        processor_kwargs: Mapping[str, Any],
        settings: EngineSettings,
        stats: DecodeStats | None = None,
    ) -> None:
        if settings.backend != "hf":
            raise ValueError(f"HFGenerator runs backend hf, not {settings.backend!r}")
        if settings.compile and model.device.type != "cuda":
            raise ValueError(
                f"compile (static KV cache + torch.compile) needs a CUDA device; the model is on {model.device}: "
                "set compile false"
            )
        self.model, self.processor, self.settings = model, processor, settings
        self.processor_kwargs = dict(processor_kwargs)
        self.stats = stats if stats is not None else DecodeStats()

    @property
    def image_size(self) -> dict[str, int] | None:
        """The image processor ``size`` of the pixel budget (None for a text model)."""
        return self.processor_kwargs.get("images_kwargs", {}).get("size")

    def inputs(self, chats: Sequence[ChatLike]) -> Any:
        """:func:`chat_batch` on the model's device."""
        return chat_batch(self.processor, chats, self.processor_kwargs, self.model.device)

    def lengths(self, chats: Sequence[ChatLike]) -> list[int]:
        """Each chat's prompt tokens (:func:`prompt_length`)."""
        return [
            prompt_length(self.processor, render_chat(self.processor, c.messages), [im.size for im in c.images],
                          self.image_size)
            for c in chats
        ]  # fmt: skip

    def generate(self, chats: Sequence[ChatLike], generate_kwargs: Mapping[str, Any], *, seed: int | None = None
                 ) -> Completions:  # fmt: skip
        """One batch, in the given order: :func:`generate_completions` with this generator's settings (``seed``
        seeds torch first). Rows ``k·n + j`` are the draws of chat ``k`` (``n = num_return_sequences``)."""
        kwargs = dict(generate_kwargs)
        if self.settings.compile:
            kwargs["cache_implementation"] = "static"
        return generate_completions(
            self.model, self.processor, self.inputs(chats), seed=seed, drop_finished=self.settings.drop_finished,
            stats=self.stats, **kwargs,
        )  # fmt: skip

    def run(
        self,
        chats: Sequence[ChatLike],
        generate_kwargs: Mapping[str, Any],
        *,
        groups: Sequence[str] | None = None,
        seed: int | None = None,
        batch_size: int | None = None,
    ) -> Iterator[tuple[list[int], Completions]]:
        """Yield ``(indices into chats, completions)`` per batch of ``batch_size`` (default the settings'), the chats
        sorted by :func:`bucket_order` first (``groups``: e.g. modality; one group by default); ``seed`` seeds torch
        before each batch."""
        size = batch_size or self.settings.batch_size
        order = (
            bucket_order(groups or [""] * len(chats), self.lengths(chats)) if len(chats) > size else range(len(chats))
        )
        for batch in batches(order, size):
            yield batch, self.generate([chats[i] for i in batch], generate_kwargs, seed=seed)


# ----------------------------------------------------------------------------------------------------------------
# vLLM backend: the request as pure data, then the engine
# ----------------------------------------------------------------------------------------------------------------


def vllm_mm_processor_kwargs(image_size: Mapping[str, int] | None) -> dict[str, Any]:
    """The ``mm_processor_kwargs`` that give vLLM's HF processor the pixel budget: the image processor's ``size``
    (``shortest_edge`` = min pixels, ``longest_edge`` = max pixels per image; video frames are sent as images)."""
    return {"size": dict(image_size)} if image_size else {}


def vllm_request(processor: Any, chat: ChatLike, image_size: Mapping[str, int] | None) -> dict[str, Any]:
    """One vLLM prompt: the chat rendered as on the HF path (:func:`render_chat`), its images as
    ``multi_modal_data``, and the pixel budget as ``mm_processor_kwargs``. Pure data: vLLM is not imported.

    vLLM tokenizes ``prompt`` and runs the checkpoint's HF processor on the images with ``mm_processor_kwargs``, so
    the token ids it decodes from are ``processor(text=[prompt], images=images, **mm_processor_kwargs)["input_ids"]``
    (tests/test_generation.py checks that these equal :func:`chat_batch`'s).
    """
    request: dict[str, Any] = {"prompt": render_chat(processor, chat.messages)}
    if chat.images:
        request["multi_modal_data"] = {"image": list(chat.images)}
        request["mm_processor_kwargs"] = vllm_mm_processor_kwargs(image_size)
    return request


def vllm_sampling(
    *,
    greedy: bool,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int | None,
    n: int,
    eos_ids: Sequence[int],
    generation_config: Any = None,
) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for the decoding the HF path runs (:func:`hf_sampling`): greedy
    (temperature 0) or temperature/top-p sampling with top-k off, the checkpoint's repetition penalty (HF
    ``generate`` applies the checkpoint's ``generation_config``), the generation config's stop ids, ``n`` draws."""
    penalty = getattr(generation_config, "repetition_penalty", None) or 1.0
    return {
        "n": n,
        "temperature": 0.0 if greedy else temperature,
        "top_p": 1.0 if greedy else top_p,
        "top_k": -1,
        "repetition_penalty": float(penalty),
        "max_tokens": max_new_tokens,
        "seed": seed,
        "stop_token_ids": list(eos_ids),
        "skip_special_tokens": True,
    }


def vllm_engine_args(
    model_path: str | Path,
    *,
    dtype: str = "auto",
    gpu_memory_utilization: float = 0.9,
    max_images: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments: the checkpoint, its dtype, the GPU-memory share, images per prompt."""
    return {
        "model": str(model_path),
        "dtype": dtype,
        "gpu_memory_utilization": gpu_memory_utilization,
        "limit_mm_per_prompt": {"image": max_images},
        "seed": seed,
    }


class VLLMUnavailableError(UserError, ImportError):
    """``backend: vllm`` without vLLM installed (an ImportError the command line prints as one line)."""


_NO_VLLM = (
    "backend vllm needs vLLM, which is not installed: pip install 'embedrl[gpu]' on a CUDA machine, or use backend hf"
)


def require_vllm() -> None:
    """Raise :class:`VLLMUnavailableError` unless vLLM is importable (checked without importing it, so a vLLM
    engine fails at load time, before any work)."""
    if importlib.util.find_spec("vllm") is None:
        raise VLLMUnavailableError(_NO_VLLM)


def _import_vllm() -> Any:
    try:  # vLLM is optional (the ``gpu`` extra): imported only when this backend runs
        import vllm
    except ImportError as err:
        raise VLLMUnavailableError(_NO_VLLM) from err
    return vllm


class VLLMGenerator:
    """Chats -> completions on vLLM; no HF model is held (vLLM loads the checkpoint itself, on the first call).

    Args:
        model_path: the checkpoint folder vLLM loads.
        processor: its processor (chat template and tokenizer).
        image_size: the pixel budget's image ``size``.
        settings: batch size (chats per ``LLM.generate`` call; vLLM schedules inside it) and GPU-memory share.
        dtype: the weights' dtype (``auto``: the checkpoint's).
        max_images: images per prompt vLLM reserves room for.

    Raises:
        ImportError: vLLM is not installed (on the first :meth:`generate`).
    """

    def __init__(
        self,
        model_path: str | Path,
        processor: Any,
        image_size: Mapping[str, int] | None,
        settings: EngineSettings,
        *,
        dtype: str = "auto",
        max_images: int = 16,
    ) -> None:
        if settings.backend != "vllm":
            raise ValueError(f"VLLMGenerator runs backend vllm, not {settings.backend!r}")
        self.model_path, self.processor, self.settings = Path(model_path), processor, settings
        self.image_size = dict(image_size) if image_size else None
        self.dtype, self.max_images = dtype, max_images
        self._llm: Any = None

    def generate(self, chats: Sequence[ChatLike], sampling: Mapping[str, Any]) -> Completions:
        """One ``LLM.generate`` call, results in the given order; ``sampling``: :func:`vllm_sampling`'s."""
        vllm = _import_vllm()
        if self._llm is None:
            self._llm = vllm.LLM(**vllm_engine_args(
                self.model_path, dtype=self.dtype, gpu_memory_utilization=self.settings.gpu_memory_utilization,
                max_images=self.max_images, seed=sampling.get("seed") or 0,
            ))  # fmt: skip
        requests = [vllm_request(self.processor, chat, self.image_size) for chat in chats]
        outputs = self._llm.generate(requests, vllm.SamplingParams(**sampling), use_tqdm=False)
        tokens, texts, truncated, prompt_tokens = [], [], [], []
        for out in outputs:
            prompt_tokens.append(len(out.prompt_token_ids))
            for c in out.outputs:
                tokens.append(list(c.token_ids))
                texts.append(c.text)
                truncated.append(c.finish_reason == "length")
        return Completions(tokens, texts, truncated, prompt_tokens)
