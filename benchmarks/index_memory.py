"""Index build memory: peak RSS of ``embedrl index build`` against the size of the float32 corpus matrix.

Two builds of the same corpus, each in a fresh subprocess per corpus size (so one peak cannot hide another):

- ``old``: the build before chunked adds: the pipeline returns the whole stacked matrix, which goes to FAISS in one
  ``add``, is kept while the index is saved, and the embedding cache is then re-read and stacked again to compact it;
- ``new``: :func:`embedrl.serve.index.build_index` now: embeddings cached batch by batch, the shards compacted, then
  the vectors added to FAISS ``ADD_CHUNK_ROWS`` at a time from the cache (docs/serve.md, memory).

The Embedder is a tiny Qwen3-VL with ``--dim`` hidden units (so the vectors have a realistic size) whose ``encode``
is replaced by a fast deterministic stand-in (unit vectors from the item number): the model's own cost is not what
is measured. Peak = ``ru_maxrss`` of the child minus its RSS just before the build (models loaded, faiss imported);
it includes the corpus items themselves (a few hundred bytes each). Both builds must give the same FAISS vectors.

    python benchmarks/index_memory.py                         # 20k and 60k items, D = 2048, flat index
    python benchmarks/index_memory.py --sizes 5000 --dim 512  # quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from embedrl.backbones import build_tiny_backbone
from embedrl.config import IndexConfig, TinyBackboneConfig, save_config
from embedrl.data.schema import write_jsonl
from embedrl.eval.cache import EmbeddingCache
from embedrl.eval.pipeline import EMBEDDINGS_DIR
from embedrl.models import Embedder
from embedrl.serve import index as index_module
from embedrl.serve.index import CACHE_DIR, SearchIndex, _candidates, _pipeline, build_index, read_corpus


def fake_vectors(items, batch_size: int = 32, show_progress_bar=None, mode=None, *, dim: int) -> np.ndarray:
    """Unit vectors ``[n, dim]`` that depend only on each item's number (ids ``d<number>``)."""
    numbers = np.array([int(item.id[1:]) for item in items], dtype=np.float64)[:, None]  # [n, 1]
    vectors = np.sin((numbers + 1.0) * np.linspace(0.01, 3.0, dim)[None, :]).astype(np.float32)  # [n, dim]
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def old_build(cfg: IndexConfig, embedder: Embedder) -> SearchIndex:
    """``build_index`` as it was before the chunked adds (the reference for the comparison)."""
    out = Path(cfg.out)
    items = read_corpus(cfg.corpus)
    save_config(cfg, out)
    pipeline = _pipeline(cfg, embedder, None, out / CACHE_DIR)
    vectors, annotated = pipeline.run(_candidates(cfg, items), cfg.mode, "target")
    index = SearchIndex(cfg, embedder.dim, embedder_id=pipeline.embedder_id, reasoner_id=pipeline.reasoner_id)
    index.add(items, vectors, [item.tcot for item in annotated])
    index.save(out)
    EmbeddingCache(out / CACHE_DIR / EMBEDDINGS_DIR).compact()
    return index


def rss_bytes() -> int:
    """The current resident set size (Linux ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (this benchmark needs Linux)")


def child(args: argparse.Namespace) -> None:
    """One build in this process; prints a JSON line with the baseline, the peak and a digest of the vectors."""
    embedder = Embedder.from_backbone(args.backbone, mode="raw")
    embedder.encode = lambda items, *a, **k: fake_vectors(items, dim=embedder.dim)  # type: ignore[method-assign]
    index_module._faiss()  # the faiss library is loaded before the baseline
    cfg = IndexConfig(
        model=args.backbone, corpus=args.corpus, out=args.out, mode="raw", tcot_source="none",
        index_type=args.index_type, batch_size=args.batch_size, show_progress_bar=False,
    )  # fmt: skip
    baseline = rss_bytes()
    start = time.perf_counter()
    index = (old_build if args.path == "old" else build_index)(cfg, embedder=embedder)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    digest = hashlib.sha256(np.ascontiguousarray(index.vectors()).tobytes()).hexdigest()[:16]
    print(json.dumps({"baseline": baseline, "peak": peak, "seconds": seconds, "digest": digest, "n": len(index)}))


def run(args: argparse.Namespace) -> None:
    print(f"index build, raw mode, {args.index_type} index, D = {args.dim}, Embedder batch {args.batch_size}; peak "
          "RSS above the pre-build RSS, one subprocess per build\n")  # fmt: skip
    print(f"{'items':>7} {'matrix MB':>9}  {'path':<4} {'peak MB':>8} {'x matrix':>8} {'time s':>7}  vectors")
    with tempfile.TemporaryDirectory() as tmp:
        backbone = build_tiny_backbone(
            TinyBackboneConfig(family="qwen3-vl", out=str(Path(tmp) / "backbone"), seed=0, hidden_size=args.dim)
        )
        for n in args.sizes:
            corpus = Path(tmp) / f"corpus-{n}.jsonl"
            write_jsonl(corpus, [{"id": f"d{i}", "text": f"document {i}"} for i in range(n)])
            matrix = n * args.dim * 4
            digests = {}
            for path in ("old", "new"):
                out = Path(tmp) / f"index-{n}-{path}"
                command = [sys.executable, __file__, "--child", path, "--backbone", str(backbone), "--corpus",
                           str(corpus), "--out", str(out), "--index-type", args.index_type,
                           "--batch-size", str(args.batch_size)]  # fmt: skip
                done = subprocess.run(command, check=True, capture_output=True, text=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                digests[path] = result["digest"]
                growth = result["peak"] - result["baseline"]
                print(
                    f"{n:>7} {matrix / 2**20:>9.1f}  {path:<4} {growth / 2**20:>8.1f} {growth / matrix:>8.2f} "
                    f"{result['seconds']:>7.1f}  {result['digest']}"
                )
            if digests["old"] != digests["new"]:
                raise SystemExit(f"{n} items: the two builds hold different vectors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 60_000], help="corpus sizes (items)")
    parser.add_argument("--dim", type=int, default=2048, help="vector size (the Embedder's hidden size)")
    parser.add_argument("--batch-size", type=int, default=512, help="Embedder batch (one cache shard each)")
    parser.add_argument("--index-type", default="flat", choices=["flat", "hnsw", "ivf"], help="FAISS index type")
    parser.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.path = args.child
        child(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
