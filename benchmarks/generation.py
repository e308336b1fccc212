"""Generation throughput: the old T-CoT path (input order, batches of 8, HF ``generate``) vs the generation engine.

Builds the tiny synthetic world (or reads ``--world``) and generates greedy T-CoTs with the shipped instruct-stage
tiny Qwen3-VL for the items of its evaluation tasks, one call per task and side as ``embedrl eval world`` makes them
(queries with the query-side family routed by the candidates' modality, candidates with their target-side family).
Four paths over the same items, all HF on CPU (docs/eval.md, "Generation engine"):

- ``old``: batches of 8 in input order, HF ``generate``'s own loop (finished rows keep decoding until the longest
  row of the batch ends): what ``EmbedPipeline.generate`` ran before the engine;
- ``batch32``: batches of 32 in input order, HF loop;
- ``sorted32``: a call's items sorted by modality and prompt length, then batches of 32, HF loop;
- ``engine``: ``sorted32`` with finished rows dropped from the batch (the default now);
- ``engine64``: the same with batches of 64.

Per path: wall time, generated tokens per second, speed-up over ``old``, rows that stopped before their batch's
longest row, the padding share of the prompts, the share of row-steps computed for rows that had already stopped
(``old``-style loops) or saved by dropping them (``engine``), and how many T-CoTs equal ``old``'s (greedy).

    python benchmarks/generation.py                      # 4 tasks, 48 candidates each, 1 thread, best of 2
    python benchmarks/generation.py --threads 2
    python benchmarks/generation.py --compare-threads    # also: 1 vs 2 threads on the first task's calls
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from embedrl.backbones import instruct_backbone
from embedrl.config import WorldConfig
from embedrl.models.generation import DecodeStats, EngineSettings, HFGenerator, batches, hf_sampling
from embedrl.models.reasoner import Reasoner, ReasonerPrompt, build_reasoner_prompt
from embedrl.world.evaluate import load_eval_task
from embedrl.world.generate import generate_world

PATHS = {  # name: (batch size, sorted, drop finished rows)
    "old": (8, False, False),
    "batch32": (32, False, False),
    "sorted32": (32, True, False),
    "engine": (32, True, True),
    "engine64": (64, True, True),
}
DEFAULT_TASKS = ("world_vqa", "world_t2i", "world_v2t", "world_moment")


@dataclasses.dataclass
class Call:
    """One generation call: the items of one task and side, as ``embedrl eval world`` generates them."""

    name: str
    prompts: list[ReasonerPrompt]
    groups: list[str]


@dataclasses.dataclass
class PathResult:
    seconds: float = 0.0
    texts: list[str] = dataclasses.field(default_factory=list)
    new_tokens: int = 0
    rows: int = 0
    stopped_early: int = 0
    prompt_tokens: int = 0
    padded_prompt_tokens: int = 0
    row_steps: int = 0  # rows x steps the loop computed
    useful_row_steps: int = 0  # steps of rows that had not stopped yet


def world_calls(world: Path, tasks: Sequence[str], candidates: int, compact: bool) -> list[Call]:
    """The query-side and target-side calls of each task (its queries; its first ``candidates`` candidates)."""
    calls = []
    for name in tasks:
        task = load_eval_task(world, name)
        pool = list(task.pool.values())[:candidates]
        target_modality = pool[0].modality
        for side, items, modality in (("query", task.queries, target_modality), ("target", pool, None)):
            prompts = [build_reasoner_prompt(it, side, modality, compact=compact) for it in items]
            calls.append(Call(f"{name}/{side}", prompts, [it.modality for it in items]))
    return calls


def run_path(reasoner: Reasoner, calls: Sequence[Call], path: str, max_new_tokens: int) -> PathResult:
    """Generate every call on ``path``; texts in input order."""
    batch_size, sort, drop = PATHS[path]
    settings = EngineSettings(batch_size=batch_size, drop_finished=drop)
    generator = HFGenerator(reasoner.model, reasoner.processor, reasoner.processor_kwargs, settings, DecodeStats())
    kwargs = hf_sampling(greedy=True, temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, n=1)
    result = PathResult()
    start = time.perf_counter()
    for call in calls:
        texts = [""] * len(call.prompts)
        if sort:
            outs = generator.run(call.prompts, kwargs, groups=call.groups)
        else:
            outs = ((b, generator.generate([call.prompts[i] for i in b], kwargs))
                    for b in batches(range(len(call.prompts)), batch_size))  # fmt: skip
        for batch, out in outs:
            lengths = [len(t) for t in out.tokens]
            longest = max(lengths)
            result.rows += len(batch)
            result.new_tokens += sum(lengths)
            result.stopped_early += sum(n < longest for n in lengths)
            result.prompt_tokens += sum(out.prompt_tokens)
            result.padded_prompt_tokens += len(batch) * max(out.prompt_tokens)
            result.useful_row_steps += sum(lengths)
            result.row_steps += sum(lengths) if drop else len(batch) * longest
            for i, text in zip(batch, out.texts, strict=True):
                texts[i] = text
        result.texts += texts
    result.seconds = time.perf_counter() - start
    return result


def report(results: dict[str, PathResult]) -> None:
    old = results["old"]
    print(f"{'path':<9} {'s':>7} {'tok/s':>7} {'speed-up':>8} {'stopped early':>13} {'padding':>8} "
          f"{'wasted rows':>11} {'equal to old':>12}")  # fmt: skip
    for name, r in results.items():
        wasted = 1 - r.useful_row_steps / r.row_steps if r.row_steps else 0.0
        equal = sum(a == b for a, b in zip(r.texts, old.texts, strict=True))
        print(
            f"{name:<9} {r.seconds:>7.1f} {r.new_tokens / r.seconds:>7.0f} {old.seconds / r.seconds:>7.2f}x "
            f"{r.stopped_early:>6}/{r.rows:<6} {1 - r.prompt_tokens / r.padded_prompt_tokens:>8.1%} "
            f"{wasted:>11.1%} {equal:>6}/{len(old.texts):<5}"
        )


def compare_threads(reasoner: Reasoner, calls: Sequence[Call], max_new_tokens: int) -> None:
    """``old`` and ``engine`` on the first task's two calls, with 1 and with 2 torch threads (alternating)."""
    before = torch.get_num_threads()
    print("\nthreads  path      s     tok/s")
    for threads in (1, 2, 1, 2):
        torch.set_num_threads(threads)
        for path in ("old", "engine"):
            r = run_path(reasoner, calls[:2], path, max_new_tokens)
            print(f"{threads:>7}  {path:<7} {r.seconds:>6.1f} {r.new_tokens / r.seconds:>8.0f}")
    torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, default=None, help="a world folder (default: build the tiny world)")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="evaluation tasks to generate for")
    parser.add_argument("--candidates", type=int, default=48, help="candidates per task (its queries: all)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest T-CoT (the demo's evaluation: 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS), help="paths to time")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the paths (the best time is kept)")
    parser.add_argument("--compare-threads", action="store_true", help="also time 1 vs 2 threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reasoner = Reasoner.from_pretrained(instruct_backbone())
    with tempfile.TemporaryDirectory() as tmp:
        world = args.world or generate_world(WorldConfig(out=str(Path(tmp) / "world"), size="tiny", seed=0))
        calls = world_calls(world, args.tasks, args.candidates, reasoner.compact_prompts)
        if args.compare_threads:
            compare_threads(reasoner, calls, args.max_new_tokens)
            torch.set_num_threads(args.threads)
    n = sum(len(c.prompts) for c in calls)
    print(f"\ninstruct-stage tiny qwen3-vl, {n} items in {len(calls)} calls ({', '.join(args.tasks)}; "
          f"<= {args.candidates} candidates each), greedy, max_new_tokens {args.max_new_tokens}, CPU, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}\n")  # fmt: skip
    if "old" not in args.paths:
        args.paths.insert(0, "old")
    results: dict[str, PathResult] = {}
    for _ in range(args.repeats):  # the paths take turns, so a busy host slows them alike; the best time is kept
        for path in args.paths:
            result = run_path(reasoner, calls, path, args.max_new_tokens)
            if path not in results or result.seconds < results[path].seconds:
                results[path] = result
    report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
