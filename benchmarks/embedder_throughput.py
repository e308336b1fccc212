"""Embedder throughput: ``Embedder.encode`` vs a one-item loop vs pooling from a full causal-LM forward.

Builds a tiny Qwen3-VL backbone in a temporary directory, makes synthetic items (text + one 64 px image), and times
three ways of getting the same embeddings (docs/embedder.md, throughput):

- ``encode``: the public path; length-sorted batches through the base model (no LM head), pooled at ``<emb>``;
- ``loop``: ``encode([item])`` once per item (no batching);
- ``full-logits``: the same batches through ``model(**inputs, output_hidden_states=True)``, which also computes
  the LM-head logits over the whole vocabulary, pooled from ``hidden_states[-1]``.

The LM-head cost grows with the vocabulary, so each method runs twice: with the tiny 4k vocabulary, and with the
embedding matrix and LM head padded to Qwen's 151,936 rows. Results agree across methods (max |Δ| is printed).

    python benchmarks/embedder_throughput.py                      # 64 items, batch 16, CPU
    python benchmarks/embedder_throughput.py --budget checkpoint  # 4 visual tokens per image: text dominates
    python benchmarks/embedder_throughput.py --device cuda --items 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from embedrl.backbones import ADAPTERS, build_tiny_backbone
from embedrl.config import TinyBackboneConfig
from embedrl.data.schema import Item
from embedrl.models import Embedder
from embedrl.models.embedder import pool_last_emb

QWEN_VOCAB_ROWS = 151_936
WORDS = ("red", "green", "blue", "square", "circle", "kite", "hill", "river", "small", "large", "top", "far")


def synthetic_items(n: int, seed: int = 0) -> list[Item]:
    """``n`` items of 4-40 words of text and one 64 x 64 noise image."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 41))))
        image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        items.append(Item(id=f"item{i:04d}", text=text, images=(image,)))
    return items


def encode_full_logits(embedder: Embedder, items: list[Item], batch_size: int) -> np.ndarray:
    """``encode``'s batches in input order, pooled from the causal LM's ``hidden_states[-1]`` (logits computed)."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            inputs = embedder.collate(items[start : start + batch_size])
            result = embedder.model(**inputs, output_hidden_states=True, use_cache=False)
            assert result.logits.shape[-1] == embedder.model.config.get_text_config().vocab_size
            pooled, _ = pool_last_emb(
                result.hidden_states[-1], inputs["input_ids"], embedder.emb_token_id, inputs["attention_mask"]
            )
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy())
    return np.concatenate(out)


def best_times(methods: dict[str, Callable[[], np.ndarray]], repeats: int) -> dict[str, tuple[float, np.ndarray]]:
    """Best wall time of each method and its result. After one warm-up run each, the methods take turns
    (``repeats`` rounds), so a busy machine slows them alike."""
    results = {name: fn() for name, fn in methods.items()}
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            results[name] = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name], results[name]) for name in methods}


def run(args: argparse.Namespace) -> None:
    items = synthetic_items(args.items)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_backbone(TinyBackboneConfig(family="qwen3-vl", out=tmp, seed=0))
        budget = ADAPTERS["qwen3-vl"].default_budget() if args.budget == "method" else None
        embedder = Embedder.from_backbone(path, device=args.device, dtype=args.dtype, mode="raw", budget=budget)
    n_tokens = embedder.collate(items[:1])["input_ids"].shape[1]
    dtype_name = str(args.dtype).removeprefix("torch.")
    print(
        f"tiny qwen3-vl, {args.items} items (text + 64 px image, ~{n_tokens} tokens each with the {args.budget} "
        f"pixel budget), batch {args.batch_size}, device {args.device}, dtype {dtype_name}, "
        f"torch threads {torch.get_num_threads()}, best of {args.repeats}\n"
    )
    print(f"{'vocab rows':>10}  {'method':<12} {'items/s':>9} {'s/pass':>8} {'time/encode':>12} {'max |Δ|':>9}")
    for rows in (None, QWEN_VOCAB_ROWS):
        if rows is not None:
            embedder.model.resize_token_embeddings(rows, mean_resizing=False)
        vocab = embedder.model.config.get_text_config().vocab_size
        methods = {
            "encode": lambda: embedder.encode(items, batch_size=args.batch_size),
            "loop": lambda: np.concatenate([embedder.encode([item]) for item in items]),
            "full-logits": lambda: encode_full_logits(embedder, items, args.batch_size),
        }
        timings = best_times(methods, args.repeats)
        reference = timings["encode"][1]
        for name, (seconds, vectors) in timings.items():
            ratio = seconds / timings["encode"][0]
            delta = float(np.abs(vectors - reference).max())
            print(
                f"{vocab:>10,}  {name:<12} {args.items / seconds:>9.1f} {seconds:>8.3f} {ratio:>11.2f}x {delta:>9.1e}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64, help="number of synthetic items")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of encode and full-logits")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds over the methods (best is reported)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument(
        "--budget",
        default="method",
        choices=["method", "checkpoint"],
        help="pixel budget: docs/method.md's (>= 128 tokens per image) or the tiny checkpoint's "
        "(4 tokens per 64 px image)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
