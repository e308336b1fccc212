"""Search latency and throughput: the exact index, HNSW, and a numpy ranking, side by side.

For each corpus size, random unit vectors (``--dim``, seeded) fill a :class:`~embedrl.serve.index.SearchIndex` of
type ``flat`` (exact inner product) and one of type ``hnsw``; the same queries are then ranked three ways:

- ``numpy``: ``queries @ corpus.T`` then ``argpartition`` + sort for the top k (in chunks of 256 queries);
- ``exact``: ``SearchIndex.search`` on the flat index (FAISS ``IndexFlatIP``, result objects included);
- ``hnsw``: the same on ``IndexHNSWFlat`` (``--hnsw-m``, ``--ef-search``), with its recall@k against exact.

Latency is one query per call (median and p95 over ``--latency-queries``); throughput is all ``--queries`` in one
call. The exact index and numpy must return the same ids (checked; ties aside) and their time ratio is printed.

    python benchmarks/search_latency.py                          # 10k and 100k vectors (~1-2 min on 2 CPU cores)
    python benchmarks/search_latency.py --sizes 10000,100000,1000000   # the 1M HNSW build takes several minutes
    python benchmarks/search_latency.py --sizes 2000 --queries 200     # a quick smoke run

The default stops at 100k so it finishes within about 5 minutes on 2 cores; pass ``--sizes`` for 1M. FAISS runs on
one OpenMP thread by default (``--threads``): on a busy machine its thread pool spins and a single query then takes
milliseconds instead of tens of microseconds. numpy's BLAS has the same problem: run with
``OPENBLAS_NUM_THREADS=1`` to compare both on one thread (the header prints the setting).

Random Gaussian vectors have no cluster structure, the hardest case for HNSW: its recall here is a lower bound for
real embeddings; raise ``--ef-search`` to trade speed for recall.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np

from embedrl.config import IndexConfig
from embedrl.data.schema import Item
from embedrl.serve.index import SearchIndex


def unit_vectors(rng: np.random.Generator, n: int, dim: int, chunk: int = 100_000) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        out[start : start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def numpy_topk(corpus: np.ndarray, queries: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Top-k row ids ``[Q, k]`` by inner product, best first."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ corpus.T  # [q, N]
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # [q, k] unordered
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        out[start : start + len(part)] = np.take_along_axis(part, order, axis=1)
    return out


def index_topk(index: SearchIndex, queries: np.ndarray, k: int) -> np.ndarray:
    return np.array([[int(hit.id) for hit in row] for row in index.search(queries, k)], dtype=np.int64)


def latency_ms(fn: Callable[[np.ndarray], object], queries: np.ndarray) -> tuple[float, float]:
    """Median and p95 milliseconds of ``fn`` on one query at a time."""
    times = []
    for q in queries:
        start = time.perf_counter()
        fn(q[None])
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times)), float(np.percentile(times, 95))


def throughput(fn: Callable[[np.ndarray], object], queries: np.ndarray) -> float:
    start = time.perf_counter()
    fn(queries)
    return len(queries) / (time.perf_counter() - start)


def build(
    index_type: str, corpus: np.ndarray, items: list[Item], args: argparse.Namespace
) -> tuple[SearchIndex, float]:
    cfg = IndexConfig(
        model="-",
        corpus="-",
        out="-",
        mode="raw",
        tcot_source="none",
        index_type=index_type,
        hnsw_m=args.hnsw_m,
        hnsw_ef_search=args.ef_search,
        hnsw_ef_construction=args.ef_construction,
    )
    start = time.perf_counter()
    index = SearchIndex(cfg, corpus.shape[1])
    index.add(items, corpus)
    return index, time.perf_counter() - start


def run_size(n: int, args: argparse.Namespace) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    corpus = unit_vectors(rng, n, args.dim)
    queries = unit_vectors(rng, args.queries, args.dim)
    items = [Item(id=str(i)) for i in range(n)]
    k, few = args.k, queries[: args.latency_queries]
    truth = numpy_topk(corpus, queries, k)
    rows = []
    numpy_lat = latency_ms(lambda q: numpy_topk(corpus, q, k), few)
    numpy_qps = throughput(lambda q: numpy_topk(corpus, q, k), queries)
    rows.append({"n": n, "method": "numpy", "build_s": 0.0, "lat": numpy_lat, "qps": numpy_qps, "recall": 1.0})
    types = ("flat", "hnsw") if n <= args.hnsw_max else ("flat",)
    if n > args.hnsw_max:
        print(f"  n={n:,}: HNSW skipped (above --hnsw-max {args.hnsw_max:,}; its build takes minutes on 2 cores)")
    for index_type in types:
        index, build_s = build(index_type, corpus, items, args)
        found = index_topk(index, queries, k)
        recall = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))
        if index_type == "flat":
            same = float(np.mean(np.all(found == truth, axis=1)))
            assert recall > 0.999, f"exact index disagrees with numpy (recall {recall})"
            print(f"  n={n:,}: exact index == numpy ranking for {same:.1%} of queries (same ids, same order)")
        lat = latency_ms(lambda q, index=index: index.search(q, k), few)
        qps = throughput(lambda q, index=index: index.search(q, k), queries)
        method = "exact" if index_type == "flat" else "hnsw"
        rows.append({"n": n, "method": method, "build_s": build_s, "lat": lat, "qps": qps, "recall": recall})
        del index
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="10000,100000,1000000", help="comma-separated corpus sizes (default 10k,100k,1M)"
    )
    parser.add_argument(
        "--hnsw-max", type=int, default=100000, help="build HNSW only up to this corpus size (default 100k)"
    )
    parser.add_argument("--dim", type=int, default=128, help="vector size (default 128)")
    parser.add_argument("--queries", type=int, default=1000, help="queries for the throughput run")
    parser.add_argument("--latency-queries", type=int, default=200, help="single-query calls for latency")
    parser.add_argument("--k", type=int, default=10, help="top k")
    parser.add_argument("--hnsw-m", type=int, default=32, help="HNSW M")
    parser.add_argument("--ef-construction", type=int, default=200, help="HNSW efConstruction")
    parser.add_argument("--ef-search", type=int, default=64, help="HNSW efSearch")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="FAISS OpenMP threads (default 1: on a shared 2-core machine more threads spin and "
        "make single queries ~100x slower; 0 = FAISS's default)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import faiss

    if args.threads > 0:
        faiss.omp_set_num_threads(args.threads)

    sizes = [int(s) for s in args.sizes.split(",")]
    blas = {name: os.environ[name] for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS") if name in os.environ}
    print(f"numpy BLAS threads: {blas or 'library default (set OPENBLAS_NUM_THREADS=1 for a one-thread baseline)'}")
    print(
        f"dim {args.dim}, k {args.k}, {args.queries} queries (throughput), {args.latency_queries} single queries "
        f"(latency), faiss {faiss.__version__} on {faiss.omp_get_max_threads()} threads"
    )
    rows = [row for n in sizes for row in run_size(n, args)]
    print(
        f"\n| {'vectors':>9} | {'method':<6} | {'build s':>8} | {'p50 ms':>7} | {'p95 ms':>7} | {'queries/s':>9} | "
        f"{'recall@k':>8} | {'qps vs numpy':>12} |"
    )
    print("|" + "|".join("-" * w for w in (11, 8, 10, 9, 9, 11, 10, 14)) + "|")
    for row in rows:
        base = next(r for r in rows if r["n"] == row["n"] and r["method"] == "numpy")
        print(
            f"| {row['n']:>9,} | {row['method']:<6} | {row['build_s']:>8.2f} | {row['lat'][0]:>7.3f} | "
            f"{row['lat'][1]:>7.3f} | {row['qps']:>9.0f} | {row['recall']:>8.3f} | "
            f"{row['qps'] / base['qps']:>11.2f}x |"
        )


if __name__ == "__main__":
    main()
