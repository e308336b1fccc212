"""Chat models for ``/v1/chat/completions``: a Qwen-VL checkpoint (the Reasoner or any other) or a text causal LM.

:class:`ChatModel` takes conversations in the Hugging Face chat format (content parts ``{"type": "text"}`` and
``{"type": "image"}`` placeholders, with the PIL images alongside), generates them on the generation engine
(:mod:`embedrl.models.generation`: HF batches sorted by prompt length with finished rows dropped, or vLLM; greedy when
``temperature == 0``), and returns the completions with their token counts and finish reason.

Example:
    >>> chat = ChatModel.load("runs/demo/reasoner/final")  # doctest: +SKIP
    >>> conv = Conversation([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}])  # doctest: +SKIP
    >>> chat.generate([conv], ChatParams(max_tokens=8, temperature=0.0))[0][0].text  # doctest: +SKIP
    '...'
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from embedrl.backbones import detect_family, get_adapter, load_backbone, load_processor
from embedrl.models.generation import (
    Completions,
    EngineSettings,
    HFGenerator,
    VLLMGenerator,
    batches,
    hf_sampling,
    require_vllm,
    stop_token_ids,
    vllm_sampling,
)
from embedrl.models.reasoner import Reasoner

__all__ = ["ChatModel", "ChatOutput", "ChatParams", "Conversation"]


@dataclass(frozen=True)
class ChatParams:
    """Decoding of one chat request; requests with equal params can share one ``generate`` call."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None  # seeds torch before the call (a seeded sampled request runs alone)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Conversation:
    """Messages in the HF chat format and the images of their ``image`` parts, in order."""

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class ChatOutput:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (an end token was generated) or "length"


class ChatModel:
    """A causal (vision-)language model and its processor or tokenizer, used as a chat endpoint.

    Args:
        model: a ``*ForConditionalGeneration`` (Qwen-VL) or ``*ForCausalLM``; None with the vLLM backend.
        processor: the Qwen-VL processor, or the tokenizer of a text model (``vision=False``).
        vision: whether ``processor`` takes images.
        budget: the Qwen-VL pixel budget (default the checkpoint's).
        engine: the generation engine (default HF).
        config, checkpoint, generation_config: the model config, folder and generation config (vLLM, no model).
        generator: an engine to share (the Reasoner's vLLM engine); default one built here.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        vision: bool,
        budget: Any = None,
        engine: EngineSettings | None = None,
        config: Any = None,
        checkpoint: str | Path | None = None,
        generation_config: Any = None,
        generator: HFGenerator | VLLMGenerator | None = None,
    ) -> None:
        self.engine = engine or EngineSettings()
        self.model = model
        self.processor = processor
        self.vision = vision
        config = model.config if model is not None else config
        self.processor_kwargs: dict[str, Any] = {}
        if vision:
            adapter = get_adapter(config)
            self.processor_kwargs = adapter.processor_kwargs(budget or adapter.checkpoint_budget(config))
        self.tokenizer = processor.tokenizer if vision else processor
        self.generation_config = model.generation_config if model is not None else generation_config
        self.eos_ids, self.pad_id = stop_token_ids(model, processor, self.generation_config)
        if generator is not None:
            self.generator = generator
        elif self.engine.backend == "vllm":
            if checkpoint is None:
                raise ValueError("a vLLM chat model needs its checkpoint folder")
            image_size = self.processor_kwargs.get("images_kwargs", {}).get("size")
            self.generator = VLLMGenerator(checkpoint, processor, image_size, self.engine)
        else:
            self.generator = HFGenerator(model, processor, self.processor_kwargs, self.engine)

    @classmethod
    def from_reasoner(cls, reasoner: Reasoner) -> ChatModel:
        """The Reasoner's model as a chat model (shared weights or vLLM engine, the Reasoner's pixel budget)."""
        generator = reasoner.vllm_generator() if reasoner.backend == "vllm" else reasoner.hf_generator()
        return cls(reasoner.model, reasoner.processor, vision=True, budget=reasoner.budget, engine=reasoner.engine,
                   config=reasoner.config, generation_config=reasoner.generation_config(),
                   generator=generator)  # fmt: skip

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        dtype: Any = "auto",
        device: str = "cpu",
        engine: EngineSettings | None = None,
        attn_implementation: str | None = None,
    ) -> ChatModel:
        """A local checkpoint: a Qwen-VL family (by its ``model_type``) or any ``AutoModelForCausalLM``. With the vLLM
        backend only the processor (or tokenizer), config and generation config are read."""
        engine = engine or EngineSettings()
        vllm = engine.backend == "vllm"
        if vllm:
            require_vllm()
        try:
            detect_family(AutoConfig.from_pretrained(path))
        except ValueError:  # not a Qwen-VL family: a text causal LM
            tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
            if vllm:
                return cls(None, tokenizer, vision=False, engine=engine, config=AutoConfig.from_pretrained(path),
                           checkpoint=path, generation_config=_generation_config(path))  # fmt: skip
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
            return cls(model.to(device).eval(), tokenizer, vision=False, engine=engine)
        if vllm:
            config, processor = load_processor(path)
            return cls(None, processor, vision=True, engine=engine, config=config, checkpoint=path,
                       generation_config=_generation_config(path))  # fmt: skip
        model, processor = load_backbone(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
        return cls(model, processor, vision=True, engine=engine)

    def generate(self, conversations: Sequence[Conversation], params: ChatParams) -> list[list[ChatOutput]]:
        """``params.n`` completions per conversation, in order: ``result[i][j]`` (:meth:`generate_batches`,
        collected)."""
        results: list[list[ChatOutput]] = [[] for _ in conversations]
        for indices, outputs in self.generate_batches(conversations, params):
            for i, out in zip(indices, outputs, strict=True):
                results[i] = out
        return results

    def generate_batches(
        self, conversations: Sequence[Conversation], params: ChatParams
    ) -> Iterator[tuple[list[int], list[list[ChatOutput]]]]:
        """Yield ``(conversation indices, their params.n completions)`` batch by batch (the engine's batch size).

        Greedy requests generate once and repeat the completion ``n`` times; sampled ones draw ``n`` sequences. On
        HF, more conversations than one batch holds are sorted by prompt length into batches (seeded per batch); on
        vLLM a batch is one ``LLM.generate`` call.
        """
        if not self.vision and any(c.images for c in conversations):
            raise ValueError("this chat model is text-only; send no images")
        chats = list(conversations) if self.vision else [Conversation(_text_only(c.messages)) for c in conversations]
        draws = 1 if params.greedy else params.n
        outs: Iterator[tuple[list[int], Completions]]
        if isinstance(self.generator, VLLMGenerator):
            sampling = vllm_sampling(
                greedy=params.greedy, temperature=params.temperature, top_p=params.top_p,
                max_new_tokens=params.max_tokens, seed=params.seed, n=draws, eos_ids=self.eos_ids,
                generation_config=self.generation_config,
            )  # fmt: skip
            vllm = self.generator
            outs = ((b, vllm.generate([chats[i] for i in b], sampling))
                    for b in batches(range(len(chats)), self.engine.batch_size))  # fmt: skip
        else:
            kwargs = hf_sampling(greedy=params.greedy, temperature=params.temperature, top_p=params.top_p,
                                 max_new_tokens=params.max_tokens, n=draws)  # fmt: skip
            outs = self.generator.run(chats, {**kwargs, "pad_token_id": self.pad_id}, seed=params.seed)
        for indices, out in outs:
            outputs = []
            for k in range(len(indices)):
                rows = range(k * draws, (k + 1) * draws)
                drawn = [
                    ChatOutput(out.texts[r], int(out.prompt_tokens[k]), len(out.tokens[r]),
                               "length" if out.truncated[r] else "stop")
                    for r in rows
                ]  # fmt: skip
                outputs.append(drawn * params.n if params.greedy else drawn)
            yield indices, outputs


def _generation_config(path: str | Path) -> GenerationConfig | None:
    """The checkpoint's ``generation_config.json``, None without one."""
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def _text_only(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with their content parts joined into one string (text chat templates expect strings)."""
    return [
        {
            **m,
            "content": m["content"]
            if isinstance(m["content"], str)
            else "".join(part.get("text", "") for part in m["content"]),
        }
        for m in messages
    ]
