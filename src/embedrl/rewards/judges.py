"""The models that score EG-RL rollouts: the frozen Embedder (outcome term) and the Discriminator (process term),
in-process or behind an HTTP endpoint (``embedrl serve`` or any OpenAI-compatible server), docs/method.md §4.7, §4.9.

Each is a plain callable, so :mod:`embedrl.rewards.terms` never needs to know where a model runs:

- ``embed(side, completions, columns) -> [n, D]``: :class:`EmbedderReward`, :class:`EndpointEmbedderReward`;
- ``discriminator(prompts) -> replies``: :class:`ChatDiscriminator`, :class:`EndpointDiscriminator`.

A failed model call raises; a missing reply or vector is never replaced by a default.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig

from embedrl.data.schema import Item
from embedrl.evidence import image_data_url, load_image
from embedrl.models.embedder import Embedder
from embedrl.models.generation import generate_texts, stop_token_ids, vision_token_ids
from embedrl.models.http import EndpointClient
from embedrl.models.reasoner import Reasoner, ReasonerPrompt
from embedrl.models.visual_cache import VisualCacheStats

__all__ = [
    "ENDPOINT_TOKEN_ENV",
    "ChatDiscriminator",
    "EmbedderReward",
    "EndpointDiscriminator",
    "EndpointEmbedderReward",
]

ENDPOINT_TOKEN_ENV = "EMBEDRL_API_KEY"  # bearer token of embedder_url / discriminator_url, if the server wants one


class EmbedderReward:
    """``embed(side, completions, columns) -> [n, D]`` over the frozen Embedder (docs/method.md §4.9).

    Each rollout is embedded as ``columns["item"][i].with_tcot(completion)`` in mode ``full``: the item's text and
    pixels, the T-CoT, and the crops / key frames it names, through the Embedder's one builder. Batched; any
    failure raises (never a zero vector). ``D`` is the model's own hidden size.

    The item part is prepared once per unique item and call (docs/rewards.md §2): its image and frame files are
    read once, and inside :meth:`Embedder.sharing_visuals` each unique image, video, crop or key frame goes through
    the processor and the vision tower once, however many rollouts show it; the rollouts of an item are batched
    together and the language model runs the tokens they share (everything before the T-CoTs part ways) once
    (``Embedder.encode(groups=...)``; not when every item has one rollout). The embeddings equal a plain ``encode``
    of the same rollouts. :attr:`last_stats` holds the cache's hit and miss counts of the last call.
    """

    def __init__(self, embedder: Embedder, batch_size: int = 32) -> None:
        self.embedder, self.batch_size = embedder, batch_size
        self.last_stats: VisualCacheStats | None = None

    def __call__(self, side: str, completions: list[str], columns: dict[str, list[Any]]) -> Tensor:
        items = columns.get("item")
        if items is None or len(items) != len(completions):
            raise ValueError(f"the {side}-side rollouts need an 'item' column with one Item per completion")
        loaded: dict[int, Item] = {}  # id(item) -> the item with its media decoded (the G rollouts share one Item)
        groups: dict[int, list[int]] = {}  # id(item) -> the indices of its rollouts
        for i, item in enumerate(items):
            if id(item) not in loaded:
                loaded[id(item)] = with_loaded_media(item)
            groups.setdefault(id(item), []).append(i)
        tcot_items = [loaded[id(item)].with_tcot(text) for item, text in zip(items, completions, strict=True)]
        shared = list(groups.values()) if len(groups) < len(items) else None  # nothing to share at G = 1
        with self.embedder.sharing_visuals() as cache:
            vectors = self.embedder.encode(tcot_items, batch_size=self.batch_size, mode="full", groups=shared)
        self.last_stats = cache.stats
        return torch.from_numpy(vectors)


def with_loaded_media(item: Item) -> Item:
    """``item`` with its image and frame files decoded into RGB PIL images (what the Embedder's builder would load
    for each rollout); in-memory RGB images are kept as they are."""
    images, frames = tuple(map(load_image, item.images)), tuple(map(load_image, item.frames))
    return dataclasses.replace(item, images=images, frames=frames)


def _text_prompt(text: str) -> ReasonerPrompt:
    return ReasonerPrompt([{"role": "user", "content": [{"type": "text", "text": text}]}], [], None, 0)


class ChatDiscriminator:
    """``discriminator(prompts) -> replies``: a frozen chat model, text-only, batched and greedy (docs/method.md
    §4.7)."""

    def __init__(self, chat: Reasoner, max_new_tokens: int = 10, batch_size: int = 32) -> None:
        self.chat, self.batch_size = chat, batch_size
        eos, pad = stop_token_ids(chat.model, chat.processor)
        self.generation_config = GenerationConfig(
            do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
            suppress_tokens=vision_token_ids(chat.processor) or None,
        )  # fmt: skip

    def __call__(self, prompts: list[str]) -> list[str]:
        replies: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            inputs = self.chat.chat_inputs([_text_prompt(p) for p in prompts[start : start + self.batch_size]])
            replies += generate_texts(self.chat.model, self.chat.processor, inputs, self.generation_config)
        return replies


class EndpointDiscriminator:
    """``discriminator(prompts) -> replies`` from an OpenAI-compatible ``/chat/completions`` endpoint (e.g. ``embedrl
    serve`` or a vLLM server running the Discriminator, as in the paper's deployment).

    Greedy (temperature 0), text-only, ``max_tokens`` per reply. Requests run concurrently and the replies are joined
    by prompt index, never by completion order (docs/method.md §4.10). Requests go through the project's HTTP client
    (:class:`~embedrl.models.http.EndpointClient`): a network error, a timeout or a 408/429/5xx is retried ``retries``
    times with exponential back-off from ``backoff`` seconds, then raises, and any other status raises at once: a
    missing reply is never replaced by a default answer.
    """

    def __init__(
        self, url: str, model: str, max_new_tokens: int = 10, concurrency: int = 32, timeout: float = 120.0,
        retries: int = 2, backoff: float = 1.0, token: str = "",
    ) -> None:  # fmt: skip
        self.client = EndpointClient(url, what="Discriminator", token=token, timeout_s=timeout, retries=retries,
                                     backoff_s=backoff, max_backoff_s=max(backoff, 30.0))  # fmt: skip
        self.endpoint = self.client.base_url + "/chat/completions"
        self.model, self.max_new_tokens, self.concurrency = model, max_new_tokens, concurrency

    def _request(self, prompt: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0.0,
                "max_tokens": self.max_new_tokens}  # fmt: skip
        payload = self.client.post_json("/chat/completions", body)
        try:
            return str(payload["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(f"Discriminator endpoint {self.endpoint} sent no choices[0].message.content") from err

    def __call__(self, prompts: list[str]) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(prompts)))) as pool:
            return list(pool.map(self._request, prompts))  # map keeps the prompts' order


class EndpointEmbedderReward:
    """``embed(side, completions, columns) -> [n, D]`` from an ``embedrl serve`` Embedder (docs/method.md §4.9,
    service).

    Each rollout goes to ``POST {url}/embeddings`` as a structured item: the side's text and instruction, its images
    and frames as PNG data URLs, and the rollout's T-CoT, with ``mode: full``, so the server builds the same input as
    the in-process :class:`EmbedderReward` (pixels, T-CoT, crops and key frames). Batches of ``batch_size`` items;
    the vectors are joined by their ``index``; any failure raises (never a zero vector). Requests go through the
    project's HTTP client (:class:`~embedrl.models.http.EndpointClient`), retried as :class:`EndpointDiscriminator`'s.
    """

    def __init__(
        self, url: str, model: str, batch_size: int = 32, timeout: float = 300.0, retries: int = 2,
        backoff: float = 1.0, token: str = "",
    ) -> None:  # fmt: skip
        self.client = EndpointClient(url, what="Embedder", token=token, timeout_s=timeout, retries=retries,
                                     backoff_s=backoff, max_backoff_s=max(backoff, 30.0))  # fmt: skip
        self.endpoint = self.client.base_url + "/embeddings"
        self.model, self.batch_size = model, batch_size

    def _item(self, item: Item, tcot: str) -> dict[str, Any]:
        return {"text": item.text, "instruction": item.instruction, "images": [image_data_url(x) for x in item.images],
                "frames": [image_data_url(x) for x in item.frames], "tcot": tcot}  # fmt: skip

    def __call__(self, side: str, completions: list[str], columns: dict[str, list[Any]]) -> Tensor:
        items = columns.get("item")
        if items is None or len(items) != len(completions):
            raise ValueError(f"the {side}-side rollouts need an 'item' column with one Item per completion")
        vectors: list[list[float]] = []
        for start in range(0, len(items), self.batch_size):
            stop = start + self.batch_size
            chunk = list(zip(items[start:stop], completions[start:stop], strict=True))
            body = {"model": self.model, "input": [self._item(it, text) for it, text in chunk], "mode": "full",
                    "side": side, "encoding_format": "float"}  # fmt: skip
            payload = self.client.post_json("/embeddings", body)
            data = sorted(payload.get("data") or [], key=lambda d: d["index"])
            if [d["index"] for d in data] != list(range(len(chunk))):
                raise ValueError(f"Embedder endpoint {self.endpoint} returned {len(data)} vectors for {len(chunk)}")
            vectors += [d["embedding"] for d in data]
        return torch.tensor(vectors, dtype=torch.float32)
