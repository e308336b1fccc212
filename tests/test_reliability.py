"""Reliability under hostile input: a bad request never fails its neighbours, media budgets are checked from image
headers before decoding, every client error is a 4xx naming the field without showing server paths, the event loop
keeps answering, and a client's T-CoT is short enough to parse fast in the worst case."""

from __future__ import annotations

import base64
import io
import re
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from embedrl.backbones import PixelBudget
from embedrl.config import ConfigError, ServeConfig
from embedrl.prompts import CUE_BOXES
from embedrl.serve.batching import MicroBatcher
from embedrl.serve.server import create_app, serve_in_background
from embedrl.tcot import parse_tcot

SMALL = PixelBudget(32 * 32, 64 * 64, 32 * 32, 64 * 64, num_frames=4)
TOKEN = "reliable-token"
TOL = 1e-5
MAX_BYTES = 4 * 2**20


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _image(colour: str = "red", size: tuple[int, int] = (40, 40)) -> str:
    return _url(_encode(Image.new("RGB", size, colour)))


# Tiny corrupt files, one per format: each opens (or fails to open) differently inside Pillow.
CORRUPT = {
    "qoi": b"qoif" + struct.pack(">IIBB", 64, 64, 3, 0) + b"\xfe\x01\x02",  # header fine, pixel data cut
    "dds": b"DDS " + struct.pack("<7I", 124, 0x1007, 64, 64, 0, 0, 0) + b"\0" * 20,  # header cut
    "ppm": b"P6\n64 64\n255\n" + b"\0" * 10,  # pixel data cut
    "sgi": struct.pack(">hbbHHHH", 474, 0, 1, 2, 64, 64, 3) + b"\0" * 20,  # unsupported mode
    "png": _encode(Image.new("RGB", (40, 40), "red"))[:60],  # cut inside IDAT
    "ppm-zero": b"P6\n0 5\n255\n",
    "text": b"not an image at all",
}


@pytest.fixture(scope="module")
def embedder(tiny_backbone_dir):
    from embedrl.models import Embedder

    return Embedder.from_backbone(tiny_backbone_dir("qwen3-vl"), budget=SMALL)


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reliable-media")
    (root / "red.png").write_bytes(_encode(Image.new("RGB", (40, 40), "red")))
    return root.resolve()


@pytest.fixture(scope="module")
def server(embedder, media_root: Path) -> Iterator[tuple[str, object]]:
    cfg = ServeConfig(
        api_key=TOKEN,
        media_root=str(media_root),
        max_request_bytes=MAX_BYTES,
        max_wait_ms=30.0,
        max_batch_size=32,
        max_tcot_chars=2000,
    )
    app = create_app(cfg, embedder=embedder)
    with serve_in_background(app) as base:
        yield base, app


@pytest.fixture(scope="module")
def base(server) -> str:
    return server[0]


def _embed(base: str, inputs: list, **kw) -> httpx.Response:
    body = {"model": "embedder", "mode": "raw", "encoding_format": "float", "input": inputs}
    return httpx.post(
        base + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120, **kw
    )


def _error(response: httpx.Response) -> str:
    return response.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------------------------
# One bad request never fails its neighbours
# ---------------------------------------------------------------------------------------------------------------

GOOD = [
    [{"text": f"good {i}", "images": [_image(c)], "frames": [_image(c, (48, 32))] * 2}]
    for i, c in enumerate(["red", "blue", "green", "white", "black", "yellow"])
] + [[f"plain text {i}"] for i in range(6)]

BAD = [
    ([{"text": "one frame", "frames": [_image()]}], 400, "input[0].frames: a video needs at least 2 frames"),
    ([{"text": "sliver", "images": [_image("red", (1, 5000))]}], 400, "input[0].images[0]: image of 1x5000"),
    (
        [{"text": "mixed", "frames": [_image("red", (40, 40)), _image("red", (60, 30))]}],
        400,
        "input[0].frames[1] is 60x30 but input[0].frames[0] is 40x40",
    ),
    ([{"text": "corrupt", "images": [_url(CORRUPT["qoi"])]}], 400, "input[0].images[0]: not a decodable image"),
]


def test_bad_requests_never_fail_their_neighbours(base: str, server) -> None:
    _, app = server
    alone = [_embed(base, inputs).json()["data"][0]["embedding"] for inputs in GOOD]
    jobs = [("good", i, inputs) for i, inputs in enumerate(GOOD)] * 2
    jobs += [("bad", i, inputs) for i, (inputs, _, _) in enumerate(BAD)] * 2
    jobs = [jobs[k] for k in np.random.default_rng(0).permutation(len(jobs))]  # good and bad interleaved
    batcher = app.state.embedrl.batcher
    before = len(batcher.batch_sizes)
    barrier = threading.Barrier(len(jobs))

    def send(job):
        barrier.wait()
        return _embed(base, job[2])

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        responses = list(pool.map(send, jobs))
    for (kind, i, _), response in zip(jobs, responses, strict=True):
        if kind == "good":
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(response.json()["data"][0]["embedding"], alone[i], atol=TOL)
        else:
            _, status, message = BAD[i]
            assert response.status_code == status and message in _error(response), response.text
    assert max(batcher.batch_sizes[before:]) > 1  # good requests were merged
    assert batcher.retried_batches == 0  # the bad ones never reached a batch


def test_health_answers_while_large_images_decode(base: str) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (2048, 2048, 3), dtype=np.uint8)
    photo = "data:image/jpeg;base64," + base64.b64encode(_encode(Image.fromarray(noise), "JPEG")).decode()
    latencies: list[float] = []
    done = threading.Event()

    def poll_health() -> None:
        with httpx.Client() as client:
            while not done.is_set():
                start = time.perf_counter()
                assert client.get(base + "/health").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.005)

    poller = threading.Thread(target=poll_health)
    poller.start()
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            codes = list(pool.map(lambda i: _embed(base, [{"text": f"photo {i}", "images": [photo]}]).status_code,
                                  range(12)))  # fmt: skip
    finally:
        done.set()
        poller.join()
    assert codes == [200] * 12
    # Decoding runs on the thread pool, so the event loop keeps answering; a few slow answers are the shared CPU's.
    fast = float(np.mean(np.array(latencies) < 0.1))
    assert len(latencies) >= 10 and fast >= 0.9, (fast, sorted(latencies)[-5:])


def test_a_failing_batch_is_retried_job_by_job() -> None:
    batcher = MicroBatcher(max_batch_size=8, max_wait_s=0.2)

    def double(payloads):
        if "bad" in payloads:
            raise ValueError(f"cannot double {payloads.index('bad')}")
        return [2 * p for p in payloads]

    futures = [batcher.submit("k", double, p) for p in (1, 2, "bad", 3)]
    assert [f.result(timeout=5) for f in (futures[0], futures[1], futures[3])] == [2, 4, 6]
    with pytest.raises(ValueError, match="cannot double 0"):  # its own error, from its run alone
        futures[2].result(timeout=5)
    assert batcher.batch_sizes == [4, 1, 1, 1, 1] and batcher.retried_batches == 1
    batcher.close()


def test_batches_stay_within_their_cost_budget() -> None:
    batcher = MicroBatcher(max_batch_size=16, max_wait_s=0.2, max_batch_cost=(100, 4))
    calls: list[list[int]] = []

    def run(payloads):
        calls.append(list(payloads))
        return payloads

    costs = [(60, 0), (30, 1), (30, 1), (10, 3), (150, 0), (5, 1)]  # the 150 one alone exceeds: it runs alone
    futures = [batcher.submit("k", run, i, cost) for i, cost in enumerate(costs)]
    assert [f.result(timeout=5) for f in futures] == list(range(len(costs)))
    for call in calls:
        if len(call) > 1:
            assert sum(costs[i][0] for i in call) <= 100 and sum(costs[i][1] for i in call) <= 4, calls
    assert sorted(i for call in calls for i in call) == list(range(len(costs)))
    batcher.close()
    with pytest.raises(ConfigError, match="max_request_pixels"):
        ServeConfig(max_request_pixels=10, max_batch_pixels=5)


# ---------------------------------------------------------------------------------------------------------------
# Budgets from the headers, before decoding
# ---------------------------------------------------------------------------------------------------------------


def _peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set size (VmHWM)


def _peak_rss_bytes() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def test_pixel_budget_is_checked_from_headers_before_decoding(base: str) -> None:
    white = _url(_encode(Image.new("RGB", (4096, 4096), "white")))  # 58 KB of PNG, 48 MB decoded
    inputs = [{"text": "huge", "images": [white] * 16}]  # 1.25 MB of body, 805 MB of RGB
    try:
        _peak_rss_reset()
    except OSError:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    start = _peak_rss_bytes()
    response = _embed(base, inputs)
    grown = _peak_rss_bytes() - start
    assert response.status_code == 413, response.text
    assert "max_request_pixels=67108864" in _error(response) and "268435456 pixels" in _error(response)
    assert grown < 150 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB"  # not one image was decoded
    frames = _embed(base, [{"frames": [_image()] * 64}] * 5)  # 320 frames > max_request_frames=256
    assert frames.status_code == 413 and "max_request_frames=256" in _error(frames), frames.text


# ---------------------------------------------------------------------------------------------------------------
# Every client error is a 4xx that names the field and shows no server path
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(CORRUPT))
def test_corrupt_images_of_every_format_are_400s(base: str, fmt: str) -> None:
    response = _embed(base, ["fine", {"text": "x", "images": [_image(), _url(CORRUPT[fmt])]}])
    assert response.status_code == 400, response.text
    assert _error(response).startswith("input[1].images[1]: "), _error(response)


def test_path_errors_are_4xx_without_the_media_root(base: str, media_root: Path) -> None:
    cases = [
        ({"path": "a\x00b.png"}, 400, "input[0].images[0]: the path contains a NUL byte"),
        ({"path": "x" * 5000}, 400, "input[0].images[0]: a path of 5000 characters exceeds 1024"),
        ({"path": "x" * 300 + ".png"}, 400, "input[0].images[0]: path 'xxxx"),  # one name too long for the system
        ({"path": "sub/../../../etc/passwd"}, 403, "lies outside the server's media root"),
        ({"path": "nope.png"}, 400, "no file 'nope.png'"),
    ]
    for ref, status, message in cases:
        response = _embed(base, [{"images": [ref]}])
        assert response.status_code == status and message in _error(response), (ref["path"][:20], response.text)
        assert str(media_root) not in response.text and media_root.name not in response.text
    assert _embed(base, [{"images": [{"path": "red.png"}]}]).status_code == 200


def test_tcot_length_is_limited(base: str) -> None:
    tcot = "<thinking>" + "x" * 2000 + "</thinking>"
    response = _embed(base, [{"text": "t", "tcot": tcot}])
    assert response.status_code == 400 and "input[0].tcot: 2021 characters exceed max_tcot_chars=2000" in _error(
        response
    )


ADVERSARIAL_TCOTS = [
    '{"bbox_2d": [',
    "{a",
    "{",
    '{"',
    "[1, 2, 30, 40], ",
    "1, ",
    "bbox_2d: [",
    "<answer>",
    "< ",
]


def test_worst_case_parse_of_an_allowed_tcot_is_fast() -> None:
    limit = ServeConfig().max_tcot_chars
    for unit in ADVERSARIAL_TCOTS:
        body = unit * (limit // len(unit))
        for text in (f"<thinking>{body}", f'<thinking>{{"bbox_2d": [{body}]}}</thinking>', body):
            text = text[:limit]
            best = float("inf")
            for _ in range(3):
                start = time.process_time()
                parse_tcot(text, cue_key=CUE_BOXES, n_frames=8)
                best = min(best, time.process_time() - start)
            assert best < 0.1, (unit, text[:40], best)


def test_docs_and_schema_need_the_token(base: str, embedder) -> None:
    for path in ("/docs", "/redoc"):
        assert httpx.get(base + path).status_code == 404  # off: a browser could not send the token
    assert httpx.get(base + "/openapi.json").status_code == 401
    schema = httpx.get(base + "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert schema.status_code == 200 and "/v1/embeddings" in schema.json()["paths"]
    assert httpx.get(base + "/health").status_code == 200
    with TestClient(create_app(ServeConfig(), embedder=embedder)) as open_server:  # no token: all public
        assert open_server.get("/docs").status_code == 200 and open_server.get("/openapi.json").status_code == 200


def test_chunked_body_over_the_limit_is_413(base: str) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):  # 40 MB, no Content-Length
            yield b" " * 2**20

    response = httpx.post(
        base + "/v1/embeddings",
        content=chunks(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 413 and f"max_request_bytes={MAX_BYTES}" in _error(response), response.text
    small = httpx.post(  # a chunked body under the limit is read as usual
        base + "/v1/embeddings",
        content=iter([b'{"model": "embedder", "mode": "raw", ', b'"input": "chunked"}']),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert small.status_code == 200, small.text
