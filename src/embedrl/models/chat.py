"""Chat models for ``/v1/chat/completions``: a Qwen-VL checkpoint (the Reasoner or any other) or a text causal LM.

:class:`ChatModel` takes conversations in the Hugging Face chat format (content parts ``{"type": "text"}`` and
``{"type": "image"}`` placeholders, with the PIL images alongside), generates a batch with HF ``generate`` (left
padding, greedy when ``temperature == 0``), and returns the completions with their token counts and finish reason.

Example:
    >>> chat = ChatModel.load("runs/demo/reasoner/final")  # doctest: +SKIP
    >>> conv = Conversation([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}])  # doctest: +SKIP
    >>> chat.generate([conv], ChatParams(max_tokens=8, temperature=0.0))[0][0].text  # doctest: +SKIP
    '...'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from embedrl.backbones import detect_family, get_adapter, load_backbone
from embedrl.models.generation import generate_completions, stop_token_ids
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
        model: a ``*ForConditionalGeneration`` (Qwen-VL) or ``*ForCausalLM``.
        processor: the Qwen-VL processor, or the tokenizer of a text model (``vision=False``).
        vision: whether ``processor`` takes images.
        budget: the Qwen-VL pixel budget (default the checkpoint's).
    """

    def __init__(self, model: Any, processor: Any, *, vision: bool, budget: Any = None) -> None:
        self.model = model
        self.processor = processor
        self.vision = vision
        self.processor_kwargs: dict[str, Any] = {}
        if vision:
            adapter = get_adapter(model.config)
            self.processor_kwargs = adapter.processor_kwargs(budget or adapter.checkpoint_budget(model.config))
        self.tokenizer = processor.tokenizer if vision else processor
        self.pad_id = stop_token_ids(model, processor)[1]

    @classmethod
    def from_reasoner(cls, reasoner: Reasoner) -> ChatModel:
        """The Reasoner's model as a chat model (shared weights, the Reasoner's pixel budget)."""
        return cls(reasoner.model, reasoner.processor, vision=True, budget=reasoner.budget)

    @classmethod
    def load(cls, path: str | Path, *, dtype: Any = "auto", device: str = "cpu") -> ChatModel:
        """A local checkpoint: a Qwen-VL family (by its ``model_type``) or any ``AutoModelForCausalLM``."""
        try:
            detect_family(AutoConfig.from_pretrained(path))
        except ValueError:  # not a Qwen-VL family: a text causal LM
            tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
            return cls(model, tokenizer, vision=False)
        model, processor = load_backbone(path, dtype=dtype, device=device)
        return cls(model, processor, vision=True)

    def _inputs(self, conversations: Sequence[Conversation]) -> Any:
        if not self.vision:
            texts = [
                self.tokenizer.apply_chat_template(_text_only(c.messages), tokenize=False, add_generation_prompt=True)
                for c in conversations
            ]
            return self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt").to(self.model.device)
        texts = [
            self.processor.apply_chat_template(c.messages, tokenize=False, add_generation_prompt=True)
            for c in conversations
        ]
        images = [im for c in conversations for im in c.images]
        return self.processor(
            text=texts,
            images=images or None,
            padding=True,
            padding_side="left",
            return_tensors="pt",
            **self.processor_kwargs,
        ).to(self.model.device)

    def generate(self, conversations: Sequence[Conversation], params: ChatParams) -> list[list[ChatOutput]]:
        """``params.n`` completions per conversation, in order: ``result[i][j]``.

        Greedy requests generate once and repeat the completion ``n`` times; sampled ones draw ``n`` sequences.
        """
        if not self.vision and any(c.images for c in conversations):
            raise ValueError("this chat model is text-only; send no images")
        draws = 1 if params.greedy else params.n
        sampling = {} if params.greedy else {"temperature": params.temperature, "top_p": params.top_p}
        out = generate_completions(
            self.model, self.processor, self._inputs(conversations), seed=params.seed, do_sample=not params.greedy,
            max_new_tokens=params.max_tokens, num_return_sequences=draws, top_k=None, pad_token_id=self.pad_id,
            **sampling,
        )  # fmt: skip
        finish = ["length" if cut else "stop" for cut in out.truncated]
        results = []
        for i, prompt_tokens in enumerate(out.prompt_tokens):
            rows = range(i * draws, (i + 1) * draws)
            outputs = [ChatOutput(out.texts[r], int(prompt_tokens), len(out.tokens[r]), finish[r]) for r in rows]
            results.append(outputs * params.n if params.greedy else outputs)
        return results


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
