"""Reward encode: the EG-RL reward's Embedder pass, the per-rollout path vs the shared path.

One reward step embeds ``B`` pairs x 2 sides x ``G`` rollouts; the ``G`` rollouts of an item share its images or
video and differ in the T-CoT and in the crops / key frames it names (docs/rewards.md §2). Two ways, side by side on
the same rollouts and the same model, taking turns so that a busy host slows them alike:

- ``per-rollout``: what :class:`~embedrl.rewards.judges.EmbedderReward` did before: ``Embedder.encode`` of
  ``item.with_tcot(completion)`` for every rollout (media read, processed and encoded by the vision tower per
  rollout);
- ``shared``: :class:`~embedrl.rewards.judges.EmbedderReward` now: media read once per item, each unique image,
  video, crop or key frame processed and encoded once (``Embedder.sharing_visuals``), and the tokens an item's
  rollouts share run once through the language model (``Embedder.encode(groups=...)``).

The items are the RL split of a tiny synthetic world (128 px scenes and pages, 8-frame 64 px clips, text), generated
in a temporary directory; rollout ``g`` of an item names its own box (object ``g`` of the scene) or key frames. The
outputs must agree (max |Δ| is printed and checked). Each method's best CPU time (``time.process_time``, what the
process itself used, so that other jobs on a shared host inflate it less than the wall time) and best wall time are
reported; torch runs on ``--threads`` threads (1 by default, the steadiest figure on a busy host).

    python benchmarks/reward_encode.py                          # tiny Qwen3-VL, B=8, G=4, the checkpoint's budget
    python benchmarks/reward_encode.py --budget method --G 2 4 8  # docs/method.md's budget (>= 128 tokens/image)
    python benchmarks/reward_encode.py --families qwen2-vl qwen2.5-vl qwen3-vl
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from embedrl.backbones import ADAPTERS, build_tiny_backbone
from embedrl.config import TinyBackboneConfig, WorldConfig
from embedrl.data.schema import Item, read_pairs
from embedrl.models import Embedder
from embedrl.rewards.judges import EmbedderReward
from embedrl.world.generate import RL_FILE, generate_world

MAX_DELTA = 1e-5


def rollout_tcot(item: Item, g: int) -> str:
    """Rollout ``g``'s T-CoT for ``item``: the cue names a box of the scene's object ``g`` (images), key frames
    ``g+1`` and ``g+3`` (videos) or keywords (text)."""
    if item.frames:
        n = len(item.frames)
        cue = {"key_frames": [g % n + 1, (g + 2) % n + 1]}
    elif item.images:
        objects = (item.meta.get("gt") or {}).get("objects") or [{"box": [0, 0, 500, 500]}]
        cue = {"bbox_2d": [objects[g % len(objects)]["box"]]}
    else:
        cue = {"text_keywords": item.text.split()[:2] or ["none"]}
    return (
        f"<thinking>Rollout {g} looks at the named evidence. {json.dumps(cue)}</thinking>"
        f"<rethink>Rollout {g} checks it.</rethink><answer>Answer {g}.</answer>"
    )


def step_columns(pairs: list, G: int) -> dict[str, tuple[list[str], list[Item]]]:
    """Per side: the ``B * G`` completions and their items, in TRL's ``[q1 x G, q2 x G, ...]`` order."""
    out = {}
    for side in ("query", "target"):
        items = [getattr(pair, side) for pair in pairs for _ in range(G)]
        completions = [rollout_tcot(item, g) for item, g in zip(items, list(range(G)) * len(pairs), strict=True)]
        out[side] = (completions, items)
    return out


def per_rollout(embedder: Embedder, batch_size: int, completions: list[str], items: list[Item]) -> torch.Tensor:
    """The reward's Embedder pass before the shared visuals: one plain encode of every rollout."""
    tcot_items = [item.with_tcot(text) for item, text in zip(items, completions, strict=True)]
    return torch.from_numpy(embedder.encode(tcot_items, batch_size=batch_size, mode="full"))


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        world = generate_world(WorldConfig(out=str(Path(tmp) / "world"), seed=0, size="tiny"))
        all_pairs = read_pairs(world / RL_FILE)
        # mix the tasks: take pairs round-robin over the datasets
        by_dataset: dict[str, list] = {}
        for pair in all_pairs:
            by_dataset.setdefault(pair.dataset, []).append(pair)
        pairs = [p for group in zip(*by_dataset.values(), strict=False) for p in group][: args.pairs]
        print(
            f"{len(pairs)} RL pairs of a tiny world ({', '.join(sorted({p.dataset for p in pairs}))}), batch "
            f"{args.batch_size}, {args.budget} budget, device {args.device}, torch threads {torch.get_num_threads()}, "
            f"best of {args.repeats}\n"
        )
        print(f"{'family':<11} {'G':>2} {'rollouts':>8} {'per-rollout':>11} {'shared':>9} {'CPU x':>8} {'wall x':>8} "
              f"{'max |Δ|':>8}  cache hits/misses (processor, vision)")  # fmt: skip
        print(f"{'':<11} {'':>2} {'':>8} {'CPU s':>11} {'CPU s':>9}")
        for family in args.families:
            path = build_tiny_backbone(TinyBackboneConfig(family=family, out=str(Path(tmp) / family), seed=0))
            budget = ADAPTERS[family].default_budget() if args.budget == "method" else None
            embedder = Embedder.from_backbone(path, device=args.device, budget=budget)
            reward = EmbedderReward(embedder, batch_size=args.batch_size)
            for G in args.G:
                columns = step_columns(pairs, G)
                methods = {
                    "per-rollout": lambda c=columns, e=embedder: [per_rollout(e, args.batch_size, *c[s]) for s in c],
                    "shared": lambda c=columns, r=reward: [r(s, c[s][0], {"item": c[s][1]}) for s in c],
                }
                results = {name: fn() for name, fn in methods.items()}  # warm-up
                cpu, wall = dict.fromkeys(methods, float("inf")), dict.fromkeys(methods, float("inf"))
                for _ in range(args.repeats):
                    for name, fn in methods.items():
                        start, start_cpu = time.perf_counter(), time.process_time()
                        results[name] = fn()
                        if torch.cuda.is_available():
                            torch.cuda.synchronize()
                        cpu[name] = min(cpu[name], time.process_time() - start_cpu)
                        wall[name] = min(wall[name], time.perf_counter() - start)
                delta = max(
                    float((a - b).abs().max()) for a, b in zip(results["per-rollout"], results["shared"], strict=True)
                )
                if delta > MAX_DELTA:
                    raise SystemExit(f"{family} G={G}: the shared path differs by {delta:.2e} > {MAX_DELTA}")
                stats = reward.last_stats  # the target side of the last call
                n = 2 * len(pairs) * G
                old, new = cpu["per-rollout"], cpu["shared"]
                print(
                    f"{family:<11} {G:>2} {n:>8} {old:>11.3f} {new:>9.3f} {old / new:>7.2f}x "
                    f"{wall['per-rollout'] / wall['shared']:>7.2f}x {delta:>8.1e}  "
                    f"{stats.processor_hits}/{stats.processor_misses}, {stats.vision_hits}/{stats.vision_misses}"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step (B)")
    parser.add_argument("--G", type=int, nargs="+", default=[4], help="rollouts per side (one run per value)")
    parser.add_argument("--batch-size", type=int, default=32, help="Embedder batch size (the reward's default)")
    parser.add_argument("--families", nargs="+", default=["qwen3-vl"], choices=sorted(ADAPTERS), help="backbones")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (best is reported)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--budget",
        default="checkpoint",
        choices=["checkpoint", "method"],
        help="pixel budget: the tiny checkpoint's (the demo's) or docs/method.md's (>= 128 tokens per image)",
    )
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
