"""The OpenAI-compatible HTTP server: embeddings, chat completions, index search (FastAPI + uvicorn).

Endpoints (``docs/serve.md`` has the request and response formats):

- ``POST /v1/embeddings``: OpenAI's request and response, extended for multimodal items and the T-CoT pipeline.
- ``POST /v1/chat/completions``: OpenAI's chat request (text and ``image_url`` parts) against a loaded chat model.
- ``POST /search``: top-k of a query against the loaded index, with the query's T-CoT and evidence.
- ``GET /v1/models``, ``GET /health``.

Every model call goes through one :class:`~embedrl.serve.batching.MicroBatcher`: concurrent requests with the same
settings are merged into one batch. Input limits, malformed bodies, unknown models and refused file paths are
answered with a 4xx JSON error ``{"error": {"message", "type", "param", "code"}}`` that names the problem.

Example:
    >>> from embedrl.config import ConfigError, ServeConfig
    >>> app = create_app(ServeConfig(model="runs/demo/embedder/final"))  # doctest: +SKIP
    >>> with serve_in_background(app) as base:  # doctest: +SKIP
    ...     client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
    ...     client.embeddings.create(model="embedder", input="a red kite").data[0].embedding[:2]
    [0.0123, -0.0456]
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hmac
import io
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from embedrl.config import ConfigError, ServeConfig
from embedrl.data.schema import Item
from embedrl.eval.pipeline import EmbedPipeline
from embedrl.models.chat import ChatModel, ChatParams, Conversation
from embedrl.models.generation import engine_settings
from embedrl.models.loading import load_chat_model, load_embedder, load_reasoner
from embedrl.models.reasoner import Decoding, Reasoner
from embedrl.serve.batching import MicroBatcher
from embedrl.serve.index import IndexFormatError, Searcher, SearchIndex

__all__ = ["APIError", "create_app", "serve", "serve_in_background"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256


class APIError(Exception):
    """An error answered as OpenAI's JSON error object with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


# ----------------------------------------------------------------------------------------------------------------
# Request bodies
# ----------------------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MediaPath(_Strict):
    """A file on the server, read only when it resolves under ``media_root``."""

    path: str


MediaRef = str | MediaPath  # a data URL or plain base64, or {"path": ...}


class InputItem(_Strict):
    """The multimodal extension of an embeddings input (an :class:`~embedrl.data.schema.Item`)."""

    text: str = ""
    instruction: str = ""
    images: list[MediaRef] = Field(default_factory=list)
    frames: list[MediaRef] = Field(default_factory=list)
    tcot: str | None = None


class EmbeddingsBody(_Strict):
    model: str
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # embedrl extensions (top-level fields; with the openai client pass them in extra_body)
    mode: Literal["full", "answer_only", "no_evidence", "raw"] | None = None
    side: Literal["query", "target"] = "query"
    target_modality: Literal["text", "image", "video"] | None = None


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str
    detail: str | None = None


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name"
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class ChatBody(_Strict):
    model: str
    messages: list[ChatMessage]
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stream: bool = False
    stop: str | list[str] | None = None
    user: str | None = None


class SearchBody(_Strict):
    query: str | InputItem
    k: int = Field(default=10, ge=1)


# ----------------------------------------------------------------------------------------------------------------
# Inputs: media under limits
# ----------------------------------------------------------------------------------------------------------------


MAX_ASPECT_RATIO = 200  # the Qwen-VL image processors refuse a long side over 200x the short one
MAX_PATH_CHARS = 1024


class MediaReader:
    """Reads client media (data URLs, base64, files under ``media_root``) within the configured limits.

    A request's media are read in three steps, all before anything reaches a model: every reference is opened
    (``Image.open`` reads only the header: format and size), the request's budgets (``max_image_pixels`` per image,
    ``max_request_pixels`` and ``max_request_frames`` per request) and the model's needs (aspect ratio, frames of one
    size, ``min_video_frames`` per video) are checked, and only then is every image decoded. Each problem is a 4xx
    :class:`APIError` that names the field. The server runs these steps on a thread pool, off the event loop.

    Args:
        cfg: the server settings.
        min_video_frames: the fewest frames a video may have (the models' temporal patch size).
    """

    def __init__(self, cfg: ServeConfig, min_video_frames: int = 1) -> None:
        self.cfg = cfg
        self.min_video_frames = min_video_frames
        self.root = Path(cfg.media_root).resolve(strict=True) if cfg.media_root else None

    # -- references ------------------------------------------------------------------------------------------

    def path(self, raw: str, where: str) -> Path:
        """``raw`` resolved (symlinks followed) and checked to lie under the media root."""
        if self.root is None:
            raise APIError(
                403,
                f"{where}: file paths are disabled on this server (no media_root); send base64",
                code="path_forbidden",
            )
        if "\x00" in raw:
            raise APIError(400, f"{where}: the path contains a NUL byte", param="input", code="invalid_path")
        if len(raw) > MAX_PATH_CHARS:
            raise APIError(
                400,
                f"{where}: a path of {len(raw)} characters exceeds {MAX_PATH_CHARS}",
                param="input",
                code="invalid_path",
            )
        try:
            resolved = (self.root / raw).resolve()
            inside = resolved.is_relative_to(self.root)
            is_file = inside and resolved.is_file()
        except (OSError, ValueError) as err:  # the message would name the absolute path: only its kind is told
            raise APIError(
                400, f"{where}: path {raw[:64]!r} cannot be read ({type(err).__name__})", code="invalid_path"
            ) from None
        if not inside:
            raise APIError(403, f"{where}: path {raw!r} lies outside the server's media root", code="path_forbidden")
        if not is_file:
            raise APIError(400, f"{where}: no file {raw!r} under the media root", code="file_not_found")
        return resolved

    def _file_bytes(self, raw: str, where: str) -> bytes:
        path = self.path(raw, where)
        try:
            size = path.stat().st_size
            if size > self.cfg.max_request_bytes:
                raise APIError(
                    413,
                    f"{where}: file {raw!r} of {size} bytes exceeds max_request_bytes={self.cfg.max_request_bytes}",
                    code="payload_too_large",
                )
            return path.read_bytes()
        except OSError as err:
            raise APIError(400, f"{where}: file {raw!r} cannot be read ({type(err).__name__})") from None

    def _bytes(self, ref: MediaRef, where: str) -> bytes:
        if isinstance(ref, MediaPath):
            return self._file_bytes(ref.path, where)
        if ref.startswith("file://"):
            return self._file_bytes(ref.removeprefix("file://"), where)
        if ref.startswith(("http://", "https://")):
            raise APIError(
                400,
                f"{where}: the server does not fetch URLs; send the image as a base64 data URL",
                code="url_not_supported",
            )
        payload = ref
        if ref.startswith("data:"):
            header, sep, payload = ref.partition(",")
            if not sep or not header.endswith(";base64"):
                raise APIError(400, f"{where}: a data URL must look like data:image/png;base64,...")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise APIError(400, f"{where}: not valid base64 ({err})", code="invalid_image") from err

    def _open(self, ref: MediaRef, where: str) -> Image.Image:
        """The image's header (format and size); its pixels are not decoded yet."""
        data = self._bytes(ref, where)
        try:
            image = Image.open(io.BytesIO(data))
        except Exception as err:  # any decoder's error on client bytes is the client's problem
            raise APIError(400, f"{where}: not a decodable image ({_brief(err)})", code="invalid_image") from None
        w, h = image.size
        if w < 1 or h < 1:
            raise APIError(400, f"{where}: an image of {w}x{h} has no pixels", code="invalid_image")
        if w * h > self.cfg.max_image_pixels:
            raise APIError(
                400,
                f"{where}: image of {w}x{h} = {w * h} pixels exceeds max_image_pixels={self.cfg.max_image_pixels}",
                code="image_too_large",
            )
        if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
            raise APIError(
                400,
                f"{where}: image of {w}x{h} is more than {MAX_ASPECT_RATIO} times longer than wide",
                code="invalid_image",
            )
        return image

    @staticmethod
    def _decode(image: Image.Image, where: str) -> Image.Image:
        try:
            with image:
                return image.convert("RGB")
        except Exception as err:  # truncated or corrupt pixel data, in whatever format
            raise APIError(400, f"{where}: not a decodable image ({_brief(err)})", code="invalid_image") from None

    def _open_all(self, refs: Sequence[tuple[str, MediaRef]], n_frames: int) -> list[Image.Image]:
        """Every reference opened (headers only), within the request's budgets."""
        opened = [self._open(ref, where) for where, ref in refs]
        pixels = sum(im.width * im.height for im in opened)
        if pixels > self.cfg.max_request_pixels:
            raise APIError(
                413,
                f"input: the request's images and frames hold {pixels} pixels, over "
                f"max_request_pixels={self.cfg.max_request_pixels}",
                param="input",
                code="request_too_large",
            )
        if n_frames > self.cfg.max_request_frames:
            raise APIError(
                413,
                f"input: {n_frames} video frames in the request exceed "
                f"max_request_frames={self.cfg.max_request_frames}",
                param="input",
                code="request_too_large",
            )
        return opened

    def _decode_all(self, opened: Sequence[Image.Image], refs: Sequence[tuple[str, MediaRef]]) -> list[Any]:
        return [self._decode(im, where) for im, (where, _) in zip(opened, refs, strict=True)]

    # -- texts and items -------------------------------------------------------------------------------------

    def text(self, text: str, where: str, limit: int | None = None, name: str = "max_text_chars") -> str:
        limit = self.cfg.max_text_chars if limit is None else limit
        if len(text) > limit:
            raise APIError(400, f"{where}: {len(text)} characters exceed {name}={limit}", code="text_too_long")
        return text

    def _spec(self, raw: Any, where: str) -> InputItem:
        if isinstance(raw, str):
            return InputItem(text=self.text(raw, where))
        if not isinstance(raw, dict | InputItem):
            kind = "a token-id list" if isinstance(raw, list | int) else type(raw).__name__
            raise APIError(
                400,
                f"{where} is {kind}; send a string or an object {{text, images, frames, tcot}} "
                "(token-id inputs are not supported)",
                param="input",
            )
        try:
            spec = raw if isinstance(raw, InputItem) else InputItem.model_validate(raw)
        except ValueError as err:
            raise APIError(400, f"{where}: {err}", param="input") from err
        for name, limit in (("images", self.cfg.max_images), ("frames", self.cfg.max_frames)):
            count = len(getattr(spec, name))
            if count > limit:
                raise APIError(400, f"{where}: {count} {name} exceed max_{name}={limit}", code=f"too_many_{name}")
        if 0 < len(spec.frames) < self.min_video_frames:
            raise APIError(
                400,
                f"{where}.frames: a video needs at least {self.min_video_frames} frames, got {len(spec.frames)}",
                param="input",
                code="too_few_frames",
            )
        self.text(spec.text, f"{where}.text")
        self.text(spec.instruction, f"{where}.instruction")
        if spec.tcot is not None:
            self.text(spec.tcot, f"{where}.tcot", self.cfg.max_tcot_chars, "max_tcot_chars")
        return spec

    def items(self, raws: Sequence[Any], wheres: Sequence[str]) -> list[Item]:
        """The embeddings/search inputs of one request (strings or :class:`InputItem` dicts) as Items with decoded
        media, every check done before any image is decoded."""
        specs = [self._spec(raw, where) for raw, where in zip(raws, wheres, strict=True)]
        refs = [
            (f"{where}.{kind}[{i}]", ref)
            for spec, where in zip(specs, wheres, strict=True)
            for kind in ("images", "frames")
            for i, ref in enumerate(getattr(spec, kind))
        ]
        opened = self._open_all(refs, sum(len(spec.frames) for spec in specs))
        sizes = iter([im.size for im in opened])
        for spec, where in zip(specs, wheres, strict=True):
            frames = [next(sizes) for _ in (*spec.images, *spec.frames)][len(spec.images) :]
            for i, (w, h) in enumerate(frames[1:], 1):
                if (w, h) != frames[0]:
                    raise APIError(
                        400,
                        f"{where}.frames[{i}] is {w}x{h} but {where}.frames[0] is {frames[0][0]}x{frames[0][1]}: "
                        "the frames of a video must have one size",
                        param="input",
                        code="invalid_video",
                    )
        decoded = iter(self._decode_all(opened, refs))
        return [
            Item(
                id=where,
                text=spec.text,
                instruction=spec.instruction,
                images=tuple(next(decoded) for _ in spec.images),
                frames=tuple(next(decoded) for _ in spec.frames),
                tcot=spec.tcot,
            )
            for spec, where in zip(specs, wheres, strict=True)
        ]

    def item(self, raw: Any, where: str) -> Item:
        """One embeddings/search input as an Item with decoded media (see :meth:`items`)."""
        return self.items([raw], [where])[0]

    def conversation(self, messages: Sequence[ChatMessage], vision: bool) -> Conversation:
        """OpenAI messages as HF chat messages (``image`` placeholders) plus their decoded images."""
        out = Conversation(messages=[])
        refs: list[tuple[str, MediaRef]] = []
        for m, message in enumerate(messages):
            parts = (
                [ContentPart(type="text", text=message.content)]
                if isinstance(message.content, str)
                else (message.content)
            )
            content: list[dict[str, str]] = []
            for p, part in enumerate(parts):
                where = f"messages[{m}].content[{p}]"
                if part.type == "text":
                    content.append({"type": "text", "text": self.text(part.text or "", where)})
                    continue
                if part.image_url is None:
                    raise APIError(400, f"{where}: an image_url part needs image_url.url", param="messages")
                if not vision:
                    raise APIError(400, f"{where}: this chat model is text-only", code="images_not_supported")
                if len(refs) == self.cfg.max_images:
                    raise APIError(
                        400,
                        f"more than max_images={self.cfg.max_images} images in the messages",
                        code="too_many_images",
                    )
                refs.append((f"{where}.image_url", part.image_url.url))
                content.append({"type": "image"})
            out.messages.append({"role": message.role, "content": content})
        out.images.extend(self._decode_all(self._open_all(refs, 0), refs))
        return out


def _brief(err: Exception) -> str:
    """An exception as ``Type: message``, cut to 160 characters."""
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= 160 else text[:157] + "..."


def _pixels(items: Sequence[Item]) -> tuple[int, int]:
    """Decoded pixels and video frames of some items (their cost in a batch)."""
    media = [im for it in items for im in (*it.images, *it.frames)]
    return sum(im.width * im.height for im in media), sum(len(it.frames) for it in items)


# ----------------------------------------------------------------------------------------------------------------
# Server state and batch functions
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _State:
    cfg: ServeConfig
    media: MediaReader
    token: str
    embedder: Any = None
    reasoner: Any = None
    pipeline: EmbedPipeline | None = None
    searcher: Searcher | None = None
    embedder_names: set[str] = field(default_factory=set)
    chat_models: dict[str, ChatModel] = field(default_factory=dict)
    chat_aliases: dict[str, str] = field(default_factory=dict)
    batcher: MicroBatcher | None = None
    decoder: ThreadPoolExecutor | None = None  # reads and decodes request media off the event loop

    async def run(self, key: Any, fn: Any, payload: Any, cost: Sequence[float] = ()) -> Any:
        if self.batcher is None:
            raise APIError(
                503, "the server is not running (no batcher); start it with its lifespan", type="server_error"
            )
        return await asyncio.wrap_future(self.batcher.submit(key, fn, payload, cost))

    async def offload(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the decoding threads, so the event loop keeps answering (``/health``) meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.decoder, functools.partial(fn, *args))


def _embed_batch(state: _State, mode: str, side: str, target_modality: str | None, payloads: Sequence[Any]) -> list:
    """Every job's items in one pipeline run; each job gets back its rows, T-CoTs and token counts."""
    assert state.pipeline is not None
    items = [item for job in payloads for item in job]
    vectors, annotated = state.pipeline.run(items, mode, side, target_modality)  # type: ignore[arg-type]
    tokenizer = state.pipeline.embedder.processor.tokenizer
    tokens = [len(tokenizer(f"{it.instruction} {it.text}".strip())["input_ids"]) for it in items]
    results, start = [], 0
    for job in payloads:
        stop = start + len(job)
        results.append((vectors[start:stop], [it.tcot for it in annotated[start:stop]], sum(tokens[start:stop])))
        start = stop
    return results


def _chat_batch(model: ChatModel, params: ChatParams, payloads: Sequence[Conversation]) -> list:
    return model.generate(payloads, params)


def _search_batch(searcher: Searcher, payloads: Sequence[tuple[Item, int]]) -> list:
    k = max(k for _, k in payloads)
    results = searcher.search([item for item, _ in payloads], k)
    for result, (_, job_k) in zip(results, payloads, strict=True):
        result.hits = result.hits[:job_k]
    return results


# ----------------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------------


def _load_models(
    cfg: ServeConfig, embedder: Any, reasoner: Any, chat_model: Any, index: Any
) -> tuple[Any, Any, ChatModel | None, SearchIndex | None]:
    engine, attn = engine_settings(cfg, cfg.max_batch_size), cfg.attn_implementation
    if embedder is None and cfg.model:
        embedder = load_embedder(cfg.model, layout=cfg.layout, dtype=cfg.dtype, device=cfg.device,
                                 attn_implementation=attn)  # fmt: skip
    if reasoner is None and cfg.reasoner:
        reasoner = load_reasoner(cfg.reasoner, dtype=cfg.dtype, device=cfg.device, compact_prompts=cfg.compact_prompts,
                                 engine=engine, attn_implementation=attn)  # fmt: skip
    if isinstance(chat_model, Reasoner):
        chat_model = ChatModel.from_reasoner(chat_model)
    if chat_model is None and cfg.chat_model:
        chat_model = load_chat_model(cfg.chat_model, dtype=cfg.dtype, device=cfg.device, engine=engine,
                                     attn_implementation=attn)  # fmt: skip
    if index is None and cfg.index:
        index = SearchIndex.load(cfg.index)
    return embedder, reasoner, chat_model, index


def _min_video_frames(embedder: Any, reasoner: Any) -> int:
    """The fewest frames a video may have: the temporal patch size of each model that reads frames as a video."""
    sizes = [
        model.adapter.temporal_patch_size
        for model in (embedder, reasoner)
        if getattr(model, "adapter", None) is not None
        and getattr(model, "video_as", "video") == "video"
        and getattr(model, "layout", "embedrl") != "reference"
    ]
    return max(sizes, default=1)


def _build_state(cfg: ServeConfig, embedder: Any, reasoner: Any, chat_model: Any, index: Any) -> _State:
    token = cfg.bearer_token()  # before the (slow) model loading: a missing key variable fails at once
    embedder, reasoner, chat_model, index = _load_models(cfg, embedder, reasoner, chat_model, index)
    if embedder is None and reasoner is None and chat_model is None:
        raise ConfigError("nothing to serve: set model (an Embedder), reasoner or chat_model")
    media = MediaReader(cfg, min_video_frames=_min_video_frames(embedder, reasoner))
    state = _State(cfg=cfg, media=media, token=token, embedder=embedder, reasoner=reasoner)
    if embedder is not None:
        decoding = Decoding(
            temperature=cfg.tcot_temperature,
            max_new_tokens=cfg.tcot_max_new_tokens,
            greedy=cfg.tcot_greedy,
            seed=cfg.tcot_seed,
        )
        state.pipeline = EmbedPipeline(embedder, reasoner, decoding=decoding, batch_size=cfg.batch_size)
        state.embedder_names = {cfg.embedder_name} | ({cfg.model} if cfg.model else set())
    if index is not None:
        if embedder is None:
            raise ConfigError("an index needs the Embedder it was built with: set model")
        try:
            state.searcher = Searcher(index, embedder, reasoner if index.cfg.tcot_source == "reasoner" else None)
        except IndexFormatError as err:
            raise ConfigError(f"cannot serve the index: {err}") from err
    for name, path, model in (
        (cfg.reasoner_name, cfg.reasoner, reasoner),
        (cfg.chat_model_name, cfg.chat_model, chat_model),
    ):
        if model is None:
            continue
        state.chat_models[name] = model if isinstance(model, ChatModel) else ChatModel.from_reasoner(model)
        state.chat_aliases.update({name: name} | ({path: name} if path else {}))
    return state


def create_app(
    cfg: ServeConfig, *, embedder: Any = None, reasoner: Any = None, chat_model: Any = None, index: Any = None
) -> FastAPI:
    """The FastAPI app serving the given models (objects passed in, or loaded from the paths in ``cfg``).

    Args:
        cfg: the server settings (names, limits, media root, bearer token, batching).
        embedder: an :class:`~embedrl.models.Embedder` for ``/v1/embeddings`` and ``/search``.
        reasoner: a :class:`~embedrl.models.reasoner.Reasoner`: query T-CoTs, and a chat model named
            ``cfg.reasoner_name``.
        chat_model: a :class:`~embedrl.models.chat.ChatModel` (or a Reasoner) served as ``cfg.chat_model_name``.
        index: a :class:`~embedrl.serve.index.SearchIndex` for ``/search`` (built with ``embedder``).

    Raises:
        ValueError: nothing to serve, or an index whose models are not the loaded ones.
    """
    state = _build_state(cfg, embedder, reasoner, chat_model, index)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        state.decoder = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="embedrl-decode")
        state.batcher = MicroBatcher(
            cfg.max_batch_size, cfg.max_wait_ms / 1000, max_batch_cost=(cfg.max_batch_pixels, cfg.max_batch_frames)
        )
        try:
            yield
        finally:
            batcher, state.batcher = state.batcher, None
            batcher.close()
            decoder, state.decoder = state.decoder, None
            decoder.shutdown(wait=False, cancel_futures=True)

    # With a token, only /health answers without it (docs/serve.md): the schema is served behind the token below,
    # and the interactive pages (a browser cannot send the token to fetch the schema) are off.
    public_docs = {} if not state.token else {"openapi_url": None, "docs_url": None, "redoc_url": None}
    app = FastAPI(title="embedrl", summary="Embed-RL embeddings, chat and search", lifespan=lifespan, **public_docs)
    app.state.embedrl = state
    app.add_middleware(_BodyLimit, max_bytes=cfg.max_request_bytes)
    _add_error_handlers(app, _secrets(cfg, state.media))

    async def authorize(request: Request) -> None:
        if not state.token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), state.token.encode()):
            raise APIError(
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer <api key>'",
                type="authentication_error",
                code="invalid_api_key",
            )

    guarded = [Depends(authorize)]

    if state.token:

        @app.get("/openapi.json", dependencies=guarded, include_in_schema=False)
        async def openapi() -> dict[str, Any]:
            return app.openapi()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        index_info = None
        if state.searcher is not None:
            index = state.searcher.index
            index_info = {"size": len(index), "index_type": index.cfg.index_type, "mode": index.cfg.mode}
        embedder_name = cfg.embedder_name if state.pipeline is not None else None
        return {
            "status": "ok",
            "embedder": embedder_name,
            "chat_models": sorted(state.chat_models),
            "index": index_info,
        }

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        names = ([cfg.embedder_name] if state.pipeline is not None else []) + sorted(state.chat_models)
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": "embedrl"} for n in names],
        }

    @app.post("/v1/embeddings", dependencies=guarded)
    async def embeddings(body: EmbeddingsBody) -> dict[str, Any]:
        return await _embeddings(state, body)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatBody) -> dict[str, Any]:
        return await _chat(state, body)

    @app.post("/search", dependencies=guarded)
    async def search(body: SearchBody) -> dict[str, Any]:
        if state.searcher is None:
            raise APIError(404, "no index is loaded on this server; start it with --index", code="no_index")
        if body.k > cfg.max_k:
            raise APIError(400, f"k={body.k} exceeds max_k={cfg.max_k}", param="k")
        raw = body.query if isinstance(body.query, str) else body.query.model_dump()
        item = await state.offload(state.media.item, raw, "query")
        result = await state.run(
            ("search",), functools.partial(_search_batch, state.searcher), (item, body.k), _pixels([item])
        )
        return result.as_dict()

    return app


async def _embeddings(state: _State, body: EmbeddingsBody) -> dict[str, Any]:
    cfg = state.cfg
    if state.pipeline is None:
        raise APIError(404, "no Embedder is loaded on this server; start it with --model", code="model_not_found")
    if body.model not in state.embedder_names:
        raise APIError(
            404,
            f"model {body.model!r} is not served for embeddings; use {cfg.embedder_name!r}",
            param="model",
            code="model_not_found",
        )
    if body.dimensions is not None and body.dimensions != state.pipeline.embedder.dim:
        raise APIError(
            400, f"dimensions={body.dimensions}: this Embedder gives {state.pipeline.embedder.dim}", param="dimensions"
        )
    raw_inputs = body.input if isinstance(body.input, list) else [body.input]
    if raw_inputs and all(isinstance(x, int) for x in raw_inputs):
        raw_inputs = [raw_inputs]  # one token-id list: refused below with its reason
    if not raw_inputs:
        raise APIError(400, "input is empty; send a string or a list of inputs", param="input")
    if len(raw_inputs) > cfg.max_inputs:
        raise APIError(
            400, f"{len(raw_inputs)} inputs exceed max_inputs={cfg.max_inputs}", param="input", code="too_many_inputs"
        )
    items = await state.offload(state.media.items, raw_inputs, [f"input[{i}]" for i in range(len(raw_inputs))])
    mode = body.mode or ("full" if state.reasoner is not None else "raw")
    if mode != "raw" and state.reasoner is None:
        missing = [it.id for it in items if it.tcot is None]
        if missing:
            raise APIError(
                400,
                f"mode {mode!r} needs a T-CoT for {missing[:3]}: no Reasoner is loaded, so give each "
                "input a tcot, or use mode 'raw'",
                param="mode",
            )
    key = ("embed", mode, body.side, body.target_modality)
    fn = functools.partial(_embed_batch, state, mode, body.side, body.target_modality)
    vectors, tcots, tokens = await state.run(key, fn, items, _pixels(items))
    data = []
    for i, (vector, tcot) in enumerate(zip(vectors, tcots, strict=True)):
        if body.encoding_format == "base64":
            embedding: Any = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        else:
            embedding = [float(v) for v in vector]
        entry = {"object": "embedding", "index": i, "embedding": embedding}
        if mode != "raw":
            entry["tcot"] = tcot
        data.append(entry)
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


async def _chat(state: _State, body: ChatBody) -> dict[str, Any]:
    cfg = state.cfg
    name = state.chat_aliases.get(body.model)
    if name is None:
        raise APIError(
            404,
            f"model {body.model!r} is not served for chat; served: {sorted(state.chat_models)}",
            param="model",
            code="model_not_found",
        )
    if body.stream:
        raise APIError(400, "stream=true is not supported; send stream=false", param="stream")
    if body.stop:
        raise APIError(400, "stop sequences are not supported", param="stop")
    if not body.messages:
        raise APIError(400, "messages is empty", param="messages")
    max_tokens = body.max_completion_tokens or body.max_tokens or min(DEFAULT_MAX_TOKENS, cfg.max_tokens_limit)
    if max_tokens > cfg.max_tokens_limit:
        raise APIError(
            400, f"max_tokens={max_tokens} exceeds max_tokens_limit={cfg.max_tokens_limit}", param="max_tokens"
        )
    if body.n > cfg.max_n:
        raise APIError(400, f"n={body.n} exceeds max_n={cfg.max_n}", param="n")
    model = state.chat_models[name]
    conversation = await state.offload(state.media.conversation, body.messages, model.vision)
    greedy = body.temperature == 0
    params = ChatParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=1.0 if greedy else body.top_p,
        n=body.n,
        seed=None if greedy else body.seed,
    )
    # A seeded sampled request runs alone: the seed then reproduces it whatever else is queued.
    key = ("chat", name, params, uuid.uuid4().hex if params.seed is not None else None)
    pixels = sum(im.width * im.height for im in conversation.images)
    outputs = await state.run(key, functools.partial(_chat_batch, model, params), conversation, (pixels, 0))
    prompt_tokens = outputs[0].prompt_tokens
    completion_tokens = sum(o.completion_tokens for o in outputs)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": o.text},
                "finish_reason": o.finish_reason,
                "logprobs": None,
            }
            for i, o in enumerate(outputs)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


# ----------------------------------------------------------------------------------------------------------------
# Errors and limits
# ----------------------------------------------------------------------------------------------------------------


def _secrets(cfg: ServeConfig, media: MediaReader) -> list[str]:
    """Server paths no error message may show: the media root and the index directory, as given and resolved."""
    paths = {str(media.root)} if media.root is not None else set()
    for raw in (cfg.media_root, cfg.index):
        if raw:
            paths |= {raw, str(Path(raw).resolve()), str(Path(raw).absolute())}
    return sorted((p for p in paths if Path(p).is_absolute() and len(p) > 1), key=len, reverse=True)


def _add_error_handlers(app: FastAPI, secrets: Sequence[str] = ()) -> None:
    """JSON errors for every failure; a message never shows a path of ``secrets`` (replaced by ``<server path>``)."""

    def respond(err: APIError) -> JSONResponse:
        for secret in secrets:
            err.message = err.message.replace(secret, "<server path>")
        return err.response()

    async def api_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, APIError)
        return respond(err)

    async def validation_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestValidationError)
        problems = []
        for e in err.errors():
            if e.get("type") == "json_invalid":
                return respond(
                    APIError(
                        400, f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", code="invalid_json"
                    )
                )
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            problems.append(f"{loc or 'body'}: {e.get('msg')}")
        return respond(APIError(400, "invalid request: " + "; ".join(problems)))

    async def http_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, StarletteHTTPException)
        return respond(APIError(err.status_code, str(err.detail), type="invalid_request_error"))

    async def value_error(request: Request, err: Exception) -> JSONResponse:
        logger.warning("request failed: %s", err)
        return respond(APIError(400, str(err)))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)

    async def server_error(request: Request, err: Exception) -> JSONResponse:
        logger.error("request to %s failed", request.url.path, exc_info=err)
        return respond(APIError(500, f"internal error: {_brief(err)}", type="server_error"))

    app.add_exception_handler(IndexFormatError, value_error)
    app.add_exception_handler(Exception, server_error)


class _BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` (declared or streamed) gets 413 before it is parsed."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                await APIError(400, "Content-Length is not an integer").response()(scope, receive, send)
                return
            if too_big:
                error = self._too_large(int(declared))
                await error.response()(scope, receive, send)
                return
        if declared is None:
            await self._buffered(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large(received)  # a body longer than its Content-Length (h11 refuses it too)
            return message

        await self.app(scope, limited_receive, send)

    async def _buffered(self, scope: dict, receive: Any, send: Any) -> None:
        """A body without Content-Length (chunked) is read here up to ``max_bytes``: beyond, 413 at once, before
        the app sees it (an error raised while the app reads the body would be answered as a malformed body)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                error = self._too_large(size)
                error.message = (
                    f"request body (sent without Content-Length) exceeds max_request_bytes={self.max_bytes}"
                )
                await error.response()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self, size: int) -> APIError:
        return APIError(
            413, f"request body of {size} bytes exceeds max_request_bytes={self.max_bytes}", code="payload_too_large"
        )


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve_in_background(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning", timeout: float = 30.0
) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on ``host:port`` (0 = a free port); yield the base URL.

    The OpenAI base URL is ``base + "/v1"``. On exit the server is asked to stop and the thread is joined.

    Example:
        >>> with serve_in_background(app) as base:  # doctest: +SKIP
        ...     httpx.get(base + "/health").json()["status"]
        'ok'
    """
    import uvicorn  # only running the app needs the server (create_app does not); optional: the serve extra

    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets (and their accepted connections); with the
    # default proto=0 every response waited ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="embedrl-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"uvicorn did not start on {host}:{port} within {timeout} s (see its log)")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def serve(cfg: ServeConfig) -> None:
    """The ``embedrl serve`` stage: load the models named in ``cfg`` and serve until interrupted."""
    import uvicorn  # only running the app needs the server (create_app does not); optional: the serve extra

    app = create_app(cfg)
    logger.info("serving on http://%s:%d (OpenAI base URL http://%s:%d/v1)", cfg.host, cfg.port, cfg.host, cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
