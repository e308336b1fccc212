"""The HTTP server on loopback: the official openai client, batching under concurrency, limits, paths, auth, search."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from embedrl.backbones import PixelBudget
from embedrl.cli import main
from embedrl.config import IndexConfig, ServeConfig
from embedrl.data.schema import Item, write_jsonl
from embedrl.models.chat import ChatModel, ChatParams, Conversation
from embedrl.models.reasoner import Decoding
from embedrl.serve.batching import MicroBatcher
from embedrl.serve.index import Searcher, build_index
from embedrl.serve.server import create_app, serve_in_background

SMALL = PixelBudget(32 * 32, 64 * 64, 32 * 32, 64 * 64, num_frames=4)
TOKEN = "sekrit-token"
TOL = 1e-5


def _png(colour: str = "red", size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(colour: str = "red", size: int = 40) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(colour, size)).decode()


# ---------------------------------------------------------------------------------------------------------------
# One server for the module
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_backbone_dir):
    from embedrl.models import Embedder
    from embedrl.models.reasoner import Reasoner

    embedder = Embedder.from_backbone(tiny_backbone_dir("qwen3-vl"), budget=SMALL)
    reasoner = Reasoner.from_pretrained(tiny_backbone_dir("qwen3-vl"), compact_prompts=True)
    return embedder, reasoner


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    (root / "red.png").write_bytes(_png("red"))
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(_png("blue"))
    os.symlink(outside / "secret.png", root / "escape.png")  # a symlink inside the root pointing out of it
    return root


@pytest.fixture(scope="module")
def index(models, tmp_path_factory: pytest.TempPathFactory):
    embedder, reasoner = models
    root = tmp_path_factory.mktemp("corpus")
    records = [
        Item(id=f"c{i}", text=t).to_record()
        for i, t in enumerate(["a red square", "a blue circle", "a green star", "a yellow kite", "a black cat"])
    ]
    write_jsonl(root / "corpus.jsonl", records)
    cfg = IndexConfig(
        model="m",
        corpus=str(root / "corpus.jsonl"),
        out=str(root / "index"),
        reasoner="r",
        max_new_tokens=6,
        show_progress_bar=False,
    )
    return build_index(cfg, embedder=embedder, reasoner=reasoner)


@pytest.fixture(scope="module")
def server(models, index, media_root: Path) -> Iterator[tuple[str, object]]:
    embedder, reasoner = models
    cfg = ServeConfig(
        api_key=TOKEN,
        media_root=str(media_root),
        max_request_bytes=200_000,
        max_inputs=8,
        max_frames=4,
        max_images=4,
        max_image_pixels=64 * 64,
        tcot_max_new_tokens=6,
        max_tokens_limit=64,
        max_wait_ms=20.0,
        max_batch_size=16,
    )
    app = create_app(cfg, embedder=embedder, reasoner=reasoner, index=index)
    with serve_in_background(app) as base:
        yield base, app


@pytest.fixture(scope="module")
def base(server) -> str:
    return server[0]


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=TOKEN, max_retries=0)


def _post(base: str, path: str, body, token: str | None = TOKEN, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if isinstance(body, bytes | str):
        return httpx.post(base + path, content=body, headers=headers | {"Content-Type": "application/json"}, **kw)
    return httpx.post(base + path, json=body, headers=headers, timeout=60, **kw)


def _error(response: httpx.Response) -> str:
    return response.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------------------------
# The openai client
# ---------------------------------------------------------------------------------------------------------------


def test_openai_client_embeddings_float_and_base64(client: openai.OpenAI, models) -> None:
    embedder, _ = models
    texts = ["a red kite over the sea", "two cats", "x"]
    expected = embedder.encode([Item(text=t) for t in texts], mode="raw")
    floats = client.embeddings.create(
        model="embedder", input=texts, encoding_format="float", extra_body={"mode": "raw"}
    )
    b64 = client.embeddings.create(model="embedder", input=texts, extra_body={"mode": "raw"})  # base64 by default
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.model == "embedder"
    assert floats.usage.prompt_tokens > 0 and floats.usage.total_tokens == floats.usage.prompt_tokens
    for got in (floats, b64):
        vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
        assert vectors.shape == (3, embedder.dim)
        np.testing.assert_allclose(vectors, expected, atol=TOL)
    single = client.embeddings.create(model="embedder", input="two cats", extra_body={"mode": "raw"})
    np.testing.assert_allclose(single.data[0].embedding, expected[1], atol=TOL)
    assert np.abs(expected[0] - expected[1]).max() > 1e-3  # different inputs, different vectors


def test_openai_client_multimodal_and_tcot_modes(client: openai.OpenAI, models) -> None:
    embedder, reasoner = models
    image = Image.open(io.BytesIO(_png("green"))).convert("RGB")
    tcot = "<thinking>green</thinking><rethink>yes</rethink><answer>a green image</answer>"
    inputs = [
        {"text": "", "instruction": "Represent the image.", "images": [_data_url("green")]},
        {"text": "a caption", "tcot": tcot},
    ]
    got = client.embeddings.create(
        model="embedder", input=[], encoding_format="float", extra_body={"input": inputs, "mode": "full"}
    )
    # The second input carries its T-CoT; the first gets one from the Reasoner (greedy, query side).
    (generated,) = reasoner.generate(
        [Item(instruction="Represent the image.", images=(image,))],
        "query",
        decoding=Decoding(greedy=True, max_new_tokens=6),
    )
    assert got.data[0].model_extra["tcot"] == generated[0].text and got.data[1].model_extra["tcot"] == tcot
    expected = embedder.encode(
        [
            Item(instruction="Represent the image.", images=(image,), tcot=generated[0].text),
            Item(text="a caption", tcot=tcot),
        ],
        mode="full",
    )
    np.testing.assert_allclose([d.embedding for d in got.data], expected, atol=TOL)
    # The mode is explicit: the default with a Reasoner loaded is full; raw ignores the T-CoT.
    raw = client.embeddings.create(
        model="embedder", input=[], encoding_format="float", extra_body={"input": inputs[1:], "mode": "raw"}
    )
    np.testing.assert_allclose(
        raw.data[0].embedding, embedder.encode([Item(text="a caption")], mode="raw")[0], atol=TOL
    )
    assert "tcot" not in (raw.data[0].model_extra or {})
    default = client.embeddings.create(model="embedder", input="a caption", encoding_format="float")
    assert "tcot" in default.data[0].model_extra


def test_openai_client_chat(client: openai.OpenAI, models) -> None:
    _, reasoner = models
    messages = [
        {"role": "system", "content": "You describe shapes."},
        {"role": "user", "content": "Describe a red square."},
    ]
    reply = client.chat.completions.create(model="reasoner", messages=messages, temperature=0, max_tokens=7)
    chat = ChatModel.from_reasoner(reasoner)
    conv = Conversation([{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages])
    (expected,) = chat.generate([conv], ChatParams(max_tokens=7, temperature=0.0))
    assert reply.choices[0].message.content == expected[0].text and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == expected[0].prompt_tokens
    assert reply.usage.completion_tokens == expected[0].completion_tokens <= 7
    assert reply.choices[0].finish_reason == expected[0].finish_reason and reply.model == "reasoner"
    # n choices, sampling with a seed is reproducible, and images go in as image_url parts.
    sampled = [
        client.chat.completions.create(model="reasoner", messages=messages, temperature=1.0, max_tokens=6, n=3, seed=5)
        for _ in range(2)
    ]
    assert len(sampled[0].choices) == 3 and [c.index for c in sampled[0].choices] == [0, 1, 2]
    assert [c.message.content for c in sampled[0].choices] == [c.message.content for c in sampled[1].choices]
    question = {"type": "text", "text": "What colour?"}
    text_only = client.chat.completions.create(
        model="reasoner", temperature=0, max_tokens=4, messages=[{"role": "user", "content": [question]}]
    )
    with_image = client.chat.completions.create(
        model="reasoner",
        temperature=0,
        max_tokens=4,
        messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url("red")}}, question]}
        ],
    )
    assert with_image.usage.prompt_tokens > text_only.usage.prompt_tokens + 2  # the image's tokens are in the prompt
    with pytest.raises(openai.NotFoundError, match="model 'gpt-9' is not served"):
        client.chat.completions.create(model="gpt-9", messages=messages, max_tokens=2)


# ---------------------------------------------------------------------------------------------------------------
# Batching under concurrency
# ---------------------------------------------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_match_single_requests(base: str, server) -> None:
    _, app = server
    bodies = [{"model": "embedder", "mode": "raw", "input": f"item {i} " + "word " * (i % 7)} for i in range(48)]
    bodies += [
        {"model": "embedder", "mode": "raw", "input": [{"text": f"pic {i}", "images": [_data_url(c)]}]}
        for i, c in enumerate(["red", "blue", "white", "black"])
    ]
    chats = [
        {
            "model": "reasoner",
            "temperature": 0,
            "max_tokens": 5,
            "messages": [{"role": "user", "content": f"Say {w}."}],
        }
        for w in ["yes", "no", "maybe", "a kite"]
    ]
    jobs = [("/v1/embeddings", b) for b in bodies] + [("/v1/chat/completions", c) for c in chats]
    alone = [_post(base, path, body).json() for path, body in jobs]
    batcher = app.state.embedrl.batcher
    before = len(batcher.batch_sizes)
    barrier = threading.Barrier(len(jobs))

    def send(job):
        barrier.wait()
        return _post(base, *job)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        responses = list(pool.map(send, jobs))
    assert len(jobs) == 56 and all(r.status_code == 200 for r in responses), [r.text for r in responses][:3]
    for (path, _), single, together in zip(jobs, alone, responses, strict=True):
        together = together.json()
        if path == "/v1/embeddings":
            np.testing.assert_allclose(together["data"][0]["embedding"], single["data"][0]["embedding"], atol=TOL)
        else:
            assert together["choices"][0]["message"]["content"] == single["choices"][0]["message"]["content"]
    sizes = batcher.batch_sizes[before:]
    assert sum(sizes) == len(jobs) and max(sizes) > 1, sizes  # requests really were merged


def test_micro_batcher_groups_by_key_and_propagates_errors() -> None:
    batcher = MicroBatcher(max_batch_size=4, max_wait_s=0.05)
    calls: list[list[int]] = []

    def double(payloads):
        calls.append(list(payloads))
        return [2 * p for p in payloads]

    def fail(payloads):
        raise RuntimeError("model exploded")

    futures = [batcher.submit("a" if i % 2 else "b", double, i) for i in range(8)]
    bad = [batcher.submit("c", fail, i) for i in range(2)]
    assert [f.result(timeout=5) for f in futures] == [2 * i for i in range(8)]
    for f in bad:
        with pytest.raises(RuntimeError, match="model exploded"):
            f.result(timeout=5)
    assert all(len({p % 2 for p in call}) == 1 and len(call) <= 4 for call in calls)
    assert batcher.submit("a", double, 5).result(timeout=5) == 10  # still serving after a failure
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit("a", double, 1)


# ---------------------------------------------------------------------------------------------------------------
# Limits, malformed input, paths, auth
# ---------------------------------------------------------------------------------------------------------------


def test_malformed_and_oversized_requests_get_4xx_and_the_server_keeps_serving(base: str) -> None:
    cases = [
        (b'{"model": "embedder", "input": ', 400, "malformed JSON"),
        (b"\xff\xfe", 400, "malformed JSON"),
        ({"model": "embedder", "input": "x", "mdoe": "raw"}, 400, "mdoe"),
        ({"model": "embedder"}, 400, "input"),
        ({"model": "embedder", "input": [1, 2, 3]}, 400, "token-id"),
        ({"model": "embedder", "input": []}, 400, "input is empty"),
        ({"model": "embedder", "input": ["x"] * 9}, 400, "max_inputs=8"),
        ({"model": "embedder", "input": "x", "mode": "sideways"}, 400, "mode"),
        ({"model": "nope", "input": "x"}, 404, "model 'nope'"),
        ({"model": "embedder", "input": [{"images": [_data_url(size=80)]}]}, 400, "max_image_pixels=4096"),
        ({"model": "embedder", "input": [{"frames": [_data_url()] * 5}]}, 400, "max_frames=4"),
        ({"model": "embedder", "input": [{"images": ["not base64!"]}]}, 400, "not valid base64"),
        ({"model": "embedder", "input": [{"images": [base64.b64encode(b"text").decode()]}]}, 400, "not a decodable"),
        ({"model": "embedder", "input": [{"images": ["http://example.com/a.png"]}]}, 400, "does not fetch URLs"),
        ({"model": "embedder", "input": "x" * 300_000}, 413, "max_request_bytes=200000"),
        (
            {"model": "reasoner", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 65},
            400,
            "max_tokens_limit=64",
        ),
        ({"model": "reasoner", "messages": [{"role": "user", "content": "hi"}], "stream": True}, 400, "stream"),
        ({"model": "reasoner", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ]
    for body, status, message in cases:
        path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/embeddings"
        response = _post(base, path, body)
        assert response.status_code == status, (body if not isinstance(body, dict) else list(body), response.text)
        assert message in _error(response), response.text
        ok = _post(base, "/v1/embeddings", {"model": "embedder", "input": "still here", "mode": "raw"})
        assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) > 0


def test_file_paths_only_under_media_root(base: str, media_root: Path) -> None:
    def embed(ref):
        return _post(
            base,
            "/v1/embeddings",
            {"model": "embedder", "mode": "raw", "encoding_format": "float", "input": [{"images": [ref]}]},
        )

    inside = embed({"path": "red.png"})
    assert inside.status_code == 200
    same = embed(_data_url("red"))
    np.testing.assert_allclose(inside.json()["data"][0]["embedding"], same.json()["data"][0]["embedding"], atol=TOL)
    for ref in (
        {"path": "../../etc/passwd"},
        {"path": "/etc/passwd"},
        {"path": "escape.png"},
        {"path": "sub/../../outside/secret.png"},
        "file:///etc/passwd",
    ):
        refused = embed(ref)
        assert refused.status_code == 403 and "outside the server's media root" in _error(refused), ref
    missing = embed({"path": "nope.png"})
    assert missing.status_code == 400 and "no file 'nope.png'" in _error(missing)
    chat = _post(
        base,
        "/v1/chat/completions",
        {
            "model": "reasoner",
            "max_tokens": 2,
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file://../../etc/passwd"}}]}
            ],
        },
    )
    assert chat.status_code == 403


def test_bearer_token_is_enforced(base: str) -> None:
    body = {"model": "embedder", "input": "x", "mode": "raw"}
    assert _post(base, "/v1/embeddings", body, token=None).status_code == 401
    wrong = _post(base, "/v1/embeddings", body, token="guess")
    assert wrong.status_code == 401 and "bearer token" in _error(wrong)
    assert wrong.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="guess", max_retries=0).embeddings.create(
            model="embedder", input="x"
        )
    assert httpx.get(base + "/v1/models").status_code == 401
    models = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert [m["id"] for m in models["data"]] == ["embedder", "reasoner"]
    health = httpx.get(base + "/health").json()  # health needs no token
    assert health == {
        "status": "ok",
        "embedder": "embedder",
        "chat_models": ["reasoner"],
        "index": {"size": 5, "index_type": "flat", "mode": "full"},
    }


# ---------------------------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------------------------


def test_search_matches_the_library(base: str, models, index) -> None:
    embedder, reasoner = models
    response = _post(base, "/search", {"query": "a red square", "k": 3})
    assert response.status_code == 200
    got = response.json()
    (expected,) = Searcher(index, embedder, reasoner).search([Item(id="query", text="a red square")], k=3)
    assert got["tcot"] == expected.tcot and got["tcot"]
    assert [r["id"] for r in got["results"]] == [h.id for h in expected.hits]
    np.testing.assert_allclose([r["score"] for r in got["results"]], [h.score for h in expected.hits], atol=TOL)
    assert [r["rank"] for r in got["results"]] == [1, 2, 3] and set(got["evidence"]) >= {"cue", "problems"}
    assert got["results"][0]["item"]["text"] in {it.text for it in index.items}
    image_query = _post(base, "/search", {"query": {"text": "like this", "images": [_data_url("red")]}, "k": 2})
    assert image_query.status_code == 200, image_query.text
    assert image_query.json()["query"]["images"] == 1 and len(image_query.json()["results"]) == 2
    too_many = _post(base, "/search", {"query": "x", "k": 5000})
    assert too_many.status_code == 400 and "max_k" in _error(too_many)
    json.dumps(got)  # plain JSON all the way down


# ---------------------------------------------------------------------------------------------------------------
# Chat models loaded from paths (a Qwen-VL Reasoner and a text causal LM), in-process client
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_lm_dir(tiny_backbone_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny text-only Qwen2 causal LM with the tiny tokenizer and its chat template."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("text-lm")
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone_dir("qwen3-vl"))
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_chat_models_loaded_from_paths(text_lm_dir: Path, tiny_backbone_dir) -> None:
    from fastapi.testclient import TestClient

    reasoner_dir = str(tiny_backbone_dir("qwen3-vl"))
    app = create_app(ServeConfig(chat_model=str(text_lm_dir), reasoner=reasoner_dir, max_wait_ms=0.0))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    expected = ChatModel.load(text_lm_dir).generate(
        [Conversation([{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages])],
        ChatParams(max_tokens=6, temperature=0.0),
    )[0][0]
    with TestClient(app) as http:
        for name in ("chat", str(text_lm_dir)):  # the served name, or the checkpoint path as an alias
            reply = http.post(
                "/v1/chat/completions", json={"model": name, "messages": messages, "temperature": 0, "max_tokens": 6}
            )
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["choices"][0]["message"]["content"] == expected.text and body["model"] == name
            assert body["usage"]["prompt_tokens"] == expected.prompt_tokens
        image = {"type": "image_url", "image_url": {"url": _data_url()}}
        refused = http.post(
            "/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": [image]}]}
        )
        assert refused.status_code == 400 and "text-only" in refused.json()["error"]["message"]
        assert (
            http.post(
                "/v1/chat/completions",
                json={"model": reasoner_dir, "messages": [{"role": "user", "content": [image]}], "max_tokens": 2},
            ).status_code
            == 200
        )
        assert http.get("/health").json() == {
            "status": "ok",
            "embedder": None,
            "chat_models": ["chat", "reasoner"],
            "index": None,
        }
        no_embedder = http.post("/v1/embeddings", json={"model": "embedder", "input": "x"})
        assert no_embedder.status_code == 404 and "no Embedder is loaded" in no_embedder.json()["error"]["message"]
        assert http.post("/search", json={"query": "x"}).status_code == 404
    with pytest.raises(ValueError, match="nothing to serve"):
        create_app(ServeConfig())
    assert main(["serve", "--port", "0"]) == 2  # the CLI says so too, without a traceback
