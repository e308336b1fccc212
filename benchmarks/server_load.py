"""Server load: N loopback clients for T seconds against ``embedrl serve``'s app, mixing good, bad and huge requests.

Builds a tiny Qwen3-VL Embedder in a temporary directory and serves it in this process on 127.0.0.1 (a free port;
nothing leaves the machine). Each client sends requests in a fixed cycle until the time is up, then stops:

- good: text, one image and a two-frame video (each client its own colours), in ``raw`` mode; every reply must be
  200 with the vector the same request gets alone;
- bad: a one-frame video, a 1 x 5000 image, frames of two sizes, a corrupt QOI image: each must be a 400;
- huge: sixteen white 4096 x 4096 PNGs (1.25 MB of body, 805 MB decoded): a 413 before decoding.

A separate thread polls ``/health`` throughout. Printed: per kind the count of each status, the errors on good
requests (wrong status or vector), latency p50/p95 per kind and of ``/health``, and the process's peak RSS
(``VmHWM``, reset once the model is loaded, so it is the load's peak).

    python benchmarks/server_load.py                   # 8 clients x 10 s
    python benchmarks/server_load.py --clients 4 --seconds 5
"""

from __future__ import annotations

import argparse
import base64
import io
import re
import struct
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from embedrl.backbones import PixelBudget, build_tiny_backbone
from embedrl.config import ServeConfig, TinyBackboneConfig
from embedrl.models import Embedder
from embedrl.serve.server import create_app, serve_in_background

BUDGET = PixelBudget(32 * 32, 64 * 64, 32 * 32, 64 * 64, num_frames=4)
COLOURS = ("red", "green", "blue", "white", "black", "yellow", "purple", "orange", "cyan", "magenta", "grey", "pink")
CYCLE = ("good", "good", "bad", "good", "good", "huge", "good", "bad")  # each client's request kinds, in turn


def _url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _good(client: int) -> list:
    colour = COLOURS[client % len(COLOURS)]
    frame = _url(Image.new("RGB", (48, 32), colour))
    return [{"text": f"client {client}", "images": [_url(Image.new("RGB", (40, 40), colour))], "frames": [frame] * 2}]


BAD = [
    [{"text": "one frame", "frames": [_url(Image.new("RGB", (40, 40)))]}],
    [{"text": "sliver", "images": [_url(Image.new("RGB", (1, 5000)))]}],
    [{"text": "mixed", "frames": [_url(Image.new("RGB", (40, 40))), _url(Image.new("RGB", (60, 30)))]}],
    [{"text": "corrupt", "images": ["data:image/png;base64," + base64.b64encode(
        b"qoif" + struct.pack(">IIBB", 64, 64, 3, 0) + b"\xfe\x01\x02").decode()]}],
]  # fmt: skip
HUGE = [{"text": "huge", "images": [_url(Image.new("RGB", (4096, 4096), "white"))] * 16}]


def peak_rss_mib() -> float:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def post(client: httpx.Client, base: str, inputs: list) -> httpx.Response:
    body = {"model": "embedder", "mode": "raw", "encoding_format": "float", "input": inputs}
    return client.post(base + "/v1/embeddings", json=body, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        backbone = build_tiny_backbone(TinyBackboneConfig(family="qwen3-vl", out=tmp, seed=0))
        embedder = Embedder.from_backbone(backbone, budget=BUDGET)
        app = create_app(ServeConfig(max_request_bytes=4 * 2**20, max_wait_ms=10.0), embedder=embedder)
        with serve_in_background(app, "127.0.0.1") as base, httpx.Client() as warm:
            expected = {c: np.array(post(warm, base, _good(c)).json()["data"][0]["embedding"]) for c in
                        range(args.clients)}  # fmt: skip
            rss_tracked = reset_peak_rss()
            rss_start = peak_rss_mib()
            statuses: dict[str, Counter] = defaultdict(Counter)
            latencies: dict[str, list[float]] = defaultdict(list)
            good_errors = Counter()
            lock = threading.Lock()
            deadline = time.monotonic() + args.seconds

            def run_client(c: int) -> None:
                with httpx.Client() as http:
                    n = 0
                    while time.monotonic() < deadline:  # bounded: stops once the time is up
                        kind = CYCLE[(n + c) % len(CYCLE)]
                        inputs = {"good": _good(c), "bad": BAD[n % len(BAD)], "huge": HUGE}[kind]
                        start = time.perf_counter()
                        response = post(http, base, inputs)
                        elapsed = time.perf_counter() - start
                        with lock:
                            statuses[kind][response.status_code] += 1
                            latencies[kind].append(elapsed)
                            if kind == "good" and response.status_code != 200:
                                good_errors[f"HTTP {response.status_code}"] += 1
                            elif kind == "good":
                                got = np.array(response.json()["data"][0]["embedding"])
                                if np.abs(got - expected[c]).max() > 1e-5:
                                    good_errors["vector differs from the request alone"] += 1
                        n += 1

            def poll_health() -> None:
                with httpx.Client() as http:
                    while time.monotonic() < deadline:
                        start = time.perf_counter()
                        code = http.get(base + "/health").status_code
                        with lock:
                            latencies["/health"].append(time.perf_counter() - start)
                            statuses["/health"][code] += 1
                        time.sleep(0.01)

            threads = [threading.Thread(target=run_client, args=(c,)) for c in range(args.clients)]
            threads.append(threading.Thread(target=poll_health))
            wall = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.monotonic() - wall
            batcher = app.state.embedrl.batcher
            sizes, retried = list(batcher.batch_sizes), batcher.retried_batches

    print(f"{args.clients} clients x {args.seconds:g} s on 127.0.0.1 (wall {wall:.1f} s); tiny Qwen3-VL, CPU")
    print(f"{'kind':8s} {'requests':>8s} {'statuses':24s} {'p50 ms':>8s} {'p95 ms':>8s}")
    for kind in ("good", "bad", "huge", "/health"):
        times = np.array(latencies[kind]) * 1000
        if not len(times):
            continue
        status = ", ".join(f"{code}: {count}" for code, count in sorted(statuses[kind].items()))
        print(
            f"{kind:8s} {len(times):8d} {status:24s} {np.percentile(times, 50):8.1f} {np.percentile(times, 95):8.1f}"
        )
    print(f"errors on good requests: {sum(good_errors.values())} {dict(good_errors) or ''}".rstrip())
    wrong = sum(
        n for kind, want in (("bad", 400), ("huge", 413)) for code, n in statuses[kind].items() if code != want
    )
    print(f"bad/huge requests not answered 400/413: {wrong}")
    print(
        f"model batches: {len(sizes)} (mean size {np.mean(sizes):.1f}, max {max(sizes)}); "
        f"retried job by job: {retried}"
    )
    if rss_tracked:
        print(
            f"peak RSS during the load: {peak_rss_mib():.0f} MiB "
            f"(+{peak_rss_mib() - rss_start:.0f} MiB over the start)"
        )
    else:
        print(f"peak RSS of the process: {peak_rss_mib():.0f} MiB (this kernel cannot reset the peak)")


if __name__ == "__main__":
    main()
