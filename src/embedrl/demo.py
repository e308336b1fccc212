"""``embedrl demo``: the whole method end to end on the embedded default (the synthetic world), on CPU.

Stages, each timed and printed: generate the world → copy the tiny Qwen3-VL backbone (shipped after perception
pre-training and an instruct stage, ``embedrl backbone pretrain``; the analogue of an instruct MLLM) → train the
Embedder on teacher T-CoTs (with evidence; a share of them cut to their evidence cue) → cold-start the Reasoner
(SFT on teacher T-CoTs) → EG-RL (GRPO through TRL's ``GRPOTrainer`` on LoRA adapters, the frozen Embedder as
reward model; the process term is off, see :func:`rl_config`) → evaluate every inference mode on the world's
held-out tasks, with greedy T-CoTs:

- ``raw``: no T-CoT; ``teacher``: the world's teacher T-CoTs (an upper reference, not a method row); ``oracle``: the
  same teacher's T-CoTs with every imperfection rate at 0 (the ceiling of what a perfect Reasoner could give the
  Embedder);
- ``pre_rl``: T-CoTs of the cold-started Reasoner; ``egrl``: T-CoTs of the EG-RL Reasoner;
- ``answer_only`` / ``no_evidence``: the EG-RL T-CoTs without reasoning / without crops and key frames.

Writes ``DIR/results.json`` (``{"seed", "wall_s", "n_queries", "stage_s", "modes": {mode: {"overall", "tasks"}},
"claims", "answer_agreement", "evidence_agreement", "rl"}``; each claim with its margin and the paired bootstrap
95 % interval of it over the query set), ``DIR/report.md`` and two PNG plots (reward components over RL steps;
per-task bars per mode). Deterministic by seed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from embedrl.backbones import instruct_backbone
from embedrl.config import (
    EmbedderTrainConfig,
    EvalConfig,
    GRPOTrainConfig,
    ReasonerTrainConfig,
    WorldConfig,
)
from embedrl.eval.cache import TCoTCache
from embedrl.eval.scores import overall_difference_interval
from embedrl.models.cards import update_model_card_results
from embedrl.plots import plot_curves, plot_grouped_bars, read_metrics
from embedrl.tcot import parse_tcot
from embedrl.train.embedder import train_embedder
from embedrl.train.grpo_trl import train_rl_trl
from embedrl.train.reasoner import train_reasoner
from embedrl.train.rl_outputs import COMPONENTS
from embedrl.world.evaluate import evaluate_world, preset_config, read_query_values
from embedrl.world.generate import (
    EVAL_DIR,
    MANIFEST_FILE,
    StoredTCoTs,
    evidence_accuracy,
    generate_world,
    load_eval_task,
)

logger = logging.getLogger(__name__)

DEMO_MODES = ("raw", "teacher", "oracle", "pre_rl", "egrl", "answer_only", "no_evidence")
REWARD_PLOT, MODES_PLOT = "rewards.png", "modes.png"
# The claims the demo exists to show (issue 7 §4): (better, worse) on the overall score.
CLAIMS = (("egrl", "pre_rl"), ("pre_rl", "raw"), ("egrl", "no_evidence"))
# The RL log's reward columns; a term with weight 0 is not logged.
REWARD_KEYS = ("reward/total", *(f"reward/{name}" for name in COMPONENTS))


@dataclasses.dataclass(frozen=True)
class DemoSize:
    world: str
    embedder_steps: int
    sub_batch_size: int
    reasoner_steps: int
    reasoner_batch_size: int
    reasoner_lr: float
    rl_steps: int
    rl_pairs: int  # B
    rl_generations: int  # G
    rl_max_new_tokens: int
    rl_lr: float
    rl_lora: int  # LoRA rank of the policy during EG-RL (merged into the saved Reasoner)


SIZES = {
    "quick": DemoSize(
        world="tiny", embedder_steps=60, sub_batch_size=8, reasoner_steps=30, reasoner_batch_size=8, reasoner_lr=3e-4,
        rl_steps=4, rl_pairs=2, rl_generations=2, rl_max_new_tokens=64, rl_lr=1e-3, rl_lora=8,
    ),
    "default": DemoSize(
        world="small", embedder_steps=250, sub_batch_size=16, reasoner_steps=40, reasoner_batch_size=16,
        reasoner_lr=3e-4, rl_steps=80, rl_pairs=4, rl_generations=4, rl_max_new_tokens=256, rl_lr=1e-3, rl_lora=8,
    ),
}  # fmt: skip
# Sampling temperature of the RL rollouts. The paper samples at 1.0; a tiny cold-started Reasoner at 1.0 garbles
# most T-CoTs (format pass rate ~0.3 vs ~0.8 at 0.7). At evaluation the demo's Reasoners decode greedily: sampled
# T-CoTs moved one checkpoint's overall score by up to 5.7 points (docs/experiments.md), more than any effect measured.
DEMO_TEMPERATURE = 0.7
# Share of the Embedder's training items whose T-CoT is cut to its evidence cue. The world's teacher T-CoTs spell out
# the answer, so an Embedder trained on them alone matches words and ignores pixels (teacher T-CoTs score the same
# with and without their crops); cut views make it read the crops and key frames (docs/embedder.md).
EVIDENCE_ONLY_RATE = 0.3


def _timed(stage_s: dict[str, float], name: str, fn: Any, *args: Any) -> Any:
    print(f"\n== {name}", flush=True)
    start = time.perf_counter()
    result = fn(*args)
    stage_s[name] = round(time.perf_counter() - start, 1)
    print(f"== {name}: {stage_s[name]:.1f} s", flush=True)
    return result


def rl_config(reasoner: Path, embedder: Path, world: Path, out: Path, seed: int, size: DemoSize) -> GRPOTrainConfig:
    """EG-RL settings of the demo (tiny cold-started models on CPU).

    The ``paper`` preset with documented changes for tiny models: the fractional Acc (the all-in-top-G gate is
    almost never met by a tiny Embedder, so the outcome term would be 0); weights 1.0 format, 0 process, 1.0
    outcome (the tiny Discriminator is at chance, so its verdicts are noise: the "w/o process" ablation, which also
    saves its generation time); rollouts at ``DEMO_TEMPERATURE``; LoRA rank ``size.rl_lora`` at ``size.rl_lr``
    (full fine-tuning with Adam moved every weight on a near-flat reward, docs/experiments.md).
    """
    return GRPOTrainConfig(
        reasoner=str(reasoner),
        embedder=str(embedder),
        data=str(world / "rl.jsonl"),
        out=str(out),
        seed=seed,
        preset="paper",
        acc_mode="fraction",
        w_format=1.0,
        w_process=0.0,
        w_outcome=1.0,
        num_generations=size.rl_generations,
        pairs_per_step=size.rl_pairs,
        max_steps=size.rl_steps,
        lr=size.rl_lr,
        lora=size.rl_lora,
        temperature=DEMO_TEMPERATURE,
        beta=0.0,
        max_new_tokens=size.rl_max_new_tokens,
        micro_batch_size=2 * size.rl_pairs * size.rl_generations,
        compact_prompts=True,
        discriminator_max_new_tokens=4,
        save_every=max(1, size.rl_steps),
        sample_table_every=max(1, size.rl_steps // 4),
    )


def copy_backbone(source: str | Path, dest: Path) -> Path:
    """Copy the starting backbone into the run directory, so the run's outputs are self-contained."""
    source = Path(source)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a backbone checkpoint directory (no config.json)")
    print(f"starting from {source}", flush=True)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest)
    return dest


def run_demo(
    out: str | Path, seed: int = 0, quick: bool = False, backbone: str | Path | None = None
) -> dict[str, Any]:
    """Run every stage into ``out``; returns (and writes) the results.

    ``backbone`` is where the Embedder and the Reasoner start; by default the shipped instruct-stage tiny Qwen3-VL
    (:func:`embedrl.backbones.instruct_backbone`).
    """

    out = Path(out)
    size = SIZES["quick" if quick else "default"]
    start = time.perf_counter()
    stage_s: dict[str, float] = {}
    world = _timed(stage_s, "world", generate_world, WorldConfig(out=str(out / "world"), seed=seed, size=size.world))
    backbone = _timed(stage_s, "backbone", copy_backbone, backbone or instruct_backbone(), out / "backbone")
    embedder = _timed(
        stage_s, "embedder", train_embedder,
        EmbedderTrainConfig(
            backbone=str(backbone), data=str(world / "train.jsonl"), out=str(out / "embedder"), seed=seed,
            finetune="full", lr=1e-3, temperature=0.05, sub_batch_size=size.sub_batch_size, warmup_steps=10,
            max_steps=size.embedder_steps, save_every=size.embedder_steps, evidence_only_rate=EVIDENCE_ONLY_RATE,
        ),
    )  # fmt: skip
    cold = _timed(
        stage_s, "reasoner cold start", train_reasoner,
        ReasonerTrainConfig(
            backbone=str(backbone), data=str(world / "train.jsonl"),
            discrimination_data=str(world / "discrimination.jsonl"), out=str(out / "reasoner"), seed=seed,
            max_steps=size.reasoner_steps, batch_size=size.reasoner_batch_size, lr=size.reasoner_lr,
        ),
    )  # fmt: skip
    rl_cfg = rl_config(cold, embedder, world, out / "rl", seed, size)
    egrl = _timed(stage_s, "EG-RL", train_rl_trl, rl_cfg)

    base = EvalConfig(world=str(world), embedder=str(embedder), out=str(out / "eval"), seed=seed,
                      greedy=True, max_new_tokens=size.rl_max_new_tokens,
                      reasoner_batch_size=64, show_progress_bar=False)  # fmt: skip
    reasoner_of = {"pre_rl": str(cold), "egrl": str(egrl), "answer_only": str(egrl), "no_evidence": str(egrl)}
    reports = {}
    for mode in DEMO_MODES:
        cfg = preset_config(base, mode, reasoner=reasoner_of.get(mode, ""))
        reports[mode] = _timed(stage_s, f"eval {mode}", evaluate_world, cfg)

    manifest = json.loads((world / "eval" / "manifest.json").read_text())["tasks"]
    metrics = {task: info["metric"] for task, info in manifest.items()}
    results: dict[str, Any] = {
        "seed": seed,
        "wall_s": 0.0,
        "n_queries": _n_queries(reports[DEMO_MODES[0]]),
        "stage_s": stage_s,
        "modes": {mode: _mode_scores(report, metrics) for mode, report in reports.items()},
    }
    results["claims"] = check_claims(results, {mode: read_query_values(out / "eval" / mode) for mode in reports})
    results["answer_agreement"] = {
        mode: answer_agreement(world, out / "eval" / "cache", reports[mode]["metadata"]["reasoner"]["id"])
        for mode in ("pre_rl", "egrl")
    }
    results["evidence_agreement"] = {
        stored: evidence_agreement(world, out / "eval" / "cache", None, stored) for stored in ("teacher", "oracle")
    } | {
        mode: evidence_agreement(world, out / "eval" / "cache", reports[mode]["metadata"]["reasoner"]["id"])
        for mode in ("pre_rl", "egrl")
    }
    results["rl"] = rl_curve(out / "rl" / "metrics.jsonl")
    plot_rewards(out / "rl" / "metrics.jsonl", out / REWARD_PLOT)
    plot_modes(results, out / MODES_PLOT)
    record_scores(results, embedder, cold, egrl)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report_md = format_results(results)
    (out / "report.md").write_text(report_md + "\n")
    print("\n" + report_md)
    return results


def _eval_items(world: Path, tcots: StoredTCoTs = "teacher") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(task, {item id: item})`` over the world's held-out tasks (queries and candidates), in name order; the items
    carry the ``tcots`` T-CoTs (:func:`~embedrl.world.generate.load_eval_task`)."""

    for name in sorted(json.loads((world / EVAL_DIR / MANIFEST_FILE).read_text())["tasks"]):
        task = load_eval_task(world, name, tcots)
        yield name, {it.id: it for it in [*task.queries, *task.pool.values()]}


def _cached_tcots(cache_dir: Path, task: str, reasoner_id: str) -> list[tuple[Any, str]] | None:
    """``(key, text)`` of the evaluation's T-CoT cache for ``task`` written by ``reasoner_id``; None: no cache."""

    cache = cache_dir / "tcots" / f"{task}.jsonl"
    if not cache.is_file():
        return None
    return [(key, text) for key, text in TCoTCache(cache).items() if key.reasoner == reasoner_id]


def answer_agreement(world: Path, cache_dir: Path, reasoner_id: str) -> dict[str, dict[str, float]]:
    """Per task and side: the share of the Reasoner's T-CoTs whose ``<answer>`` equals the teacher's (case-folded).

    A diagnostic of what the Reasoner perceives and restates, read from the evaluation's T-CoT cache: the teacher's
    answers are ground truth (its noise touches the cue and the prose, not the answer).
    """

    out: dict[str, dict[str, float]] = {}
    for name, items in _eval_items(world):
        teacher = {i: parse_tcot(it.tcot).answer.casefold() for i, it in items.items() if it.tcot}
        cached = _cached_tcots(cache_dir, name, reasoner_id)
        if cached is None:
            continue
        hits: dict[str, list[bool]] = {}
        for key, text in cached:
            if key.item_id in teacher:
                hits.setdefault(key.side, []).append(parse_tcot(text).answer.casefold() == teacher[key.item_id])
        out[name] = {side: round(sum(v) / len(v), 3) for side, v in sorted(hits.items())}
    return out


def evidence_agreement(
    world: Path, cache_dir: Path, reasoner_id: str | None, stored: StoredTCoTs = "teacher"
) -> dict[str, Any]:
    """The evidence cues of the Reasoner's T-CoTs (``reasoner_id``, read from the evaluation's T-CoT cache; None:
    the world's ``stored`` T-CoTs, the teacher's or the oracle's) against the world's ground truth, over every query
    and candidate of the held-out tasks: :func:`embedrl.world.generate.evidence_accuracy` (keywords, boxes equal to
    a true box, key-frame precision and recall). The oracle's are exactly right: every rate is 1."""

    cues = []
    for name, all_items in _eval_items(world, stored):
        items = {i: it for i, it in all_items.items() if "tcot_provenance" in it.meta}
        if reasoner_id is None:
            texts = [(it, it.tcot) for it in items.values() if it.tcot]
        else:
            cached = _cached_tcots(cache_dir, name, reasoner_id) or []
            texts = [(items[key.item_id], text) for key, text in cached if key.item_id in items]
        for item, text in texts:
            tcot = parse_tcot(text)
            cue_key = item.meta["tcot_provenance"]["cue_key"]
            cues.append((cue_key, tcot.keywords, tcot.boxes, tcot.frames, item.meta["gt"]))
    return evidence_accuracy(cues)


def _n_queries(report: dict[str, Any]) -> dict[str, int]:
    return {task: int(scores["num_data"]) for task, scores in report["results"].items()}


def _mode_scores(report: dict[str, Any], metrics: dict[str, str]) -> dict[str, Any]:
    """Main metric per task (×100) and their plain mean."""
    tasks = {task: round(100 * float(s[metrics[task]]), 2) for task, s in report["results"].items()}
    return {"overall": round(sum(tasks.values()) / len(tasks), 2), "tasks": tasks}


def check_claims(
    results: dict[str, Any], query_values: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Each claim ``better > worse`` on the overall score, with its margin in points and ``holds``.

    With ``query_values`` (mode -> task -> per-query values of the main metric) each claim also gets ``ci95``, the
    paired bootstrap 95 % interval of the margin over the query set (:func:`overall_difference_interval`, points), and
    ``clear``: whether that interval lies above 0 (the margin is more than the query set's sampling noise); the
    claim ``holds`` only then, as the report says. Without an interval a positive margin is untested (``holds``
    None) and a margin of 0 or below does not hold (False).
    """

    modes = results["modes"]
    claims = []
    for a, b in CLAIMS:
        if a not in modes or b not in modes:
            continue
        positive = modes[a]["overall"] > modes[b]["overall"]
        claim = {"claim": f"{a} > {b}", "margin": round(modes[a]["overall"] - modes[b]["overall"], 2),
                 "holds": None if positive else False}  # fmt: skip
        if query_values is not None:
            low, high = overall_difference_interval(query_values[a], query_values[b], seed=results.get("seed", 0))
            claim |= {"ci95": [round(100 * low, 2), round(100 * high, 2)], "clear": low > 0, "holds": low > 0}
        claims.append(claim)
    return claims


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    return read_metrics(path) if path.is_file() else []


def rl_curve(path: Path, parts: int = 4) -> dict[str, Any]:
    """Mean total reward (and components) over ``parts`` consecutive stretches of the RL run."""
    records = _read_metrics(path)
    if not records:
        return {}
    size = max(1, len(records) // parts)
    chunks = [records[i : i + size] for i in range(0, len(records), size)][:parts]
    out: dict[str, Any] = {"steps": len(records), "chunk_steps": size}
    for key in REWARD_KEYS:
        if key in records[0]:
            out[key] = [round(sum(r[key] for r in c) / len(c), 4) for c in chunks]
    # Each step draws one dataset, and datasets differ in reward level, so the step-order curve mostly shows which
    # dataset came up. Within a dataset: the mean total reward of its first and second half of visits.
    by_dataset: dict[str, list[float]] = {}
    for r in records:
        by_dataset.setdefault(r["dataset"], []).append(r["reward/total"])
    halves = {
        d: [round(sum(v[: len(v) // 2]) / (len(v) // 2), 4), round(sum(v[len(v) // 2 :]) / (len(v) - len(v) // 2), 4)]
        for d, v in sorted(by_dataset.items())
        if len(v) >= 2
    }
    out["total_by_dataset_halves"] = halves
    if halves:
        out["total_change_within_dataset"] = round(sum(b - a for a, b in halves.values()) / len(halves), 4)
    return out


def plot_rewards(metrics: Path, png: Path) -> Path | None:
    """Reward components over RL steps (raw per step and a moving average), one panel each; a term with weight 0
    (not logged) gets an empty panel. None when there is no RL log."""
    records = _read_metrics(metrics)
    if not records:
        return None
    return plot_curves(records, REWARD_KEYS, png, columns=len(REWARD_KEYS))


def plot_modes(results: dict[str, Any], png: Path) -> Path:
    """Per-task bars, one bar per mode, plus the overall mean."""
    values = {
        mode: {task.removeprefix("world_"): score for task, score in scores["tasks"].items()}
        | {"overall": scores["overall"]}
        for mode, scores in results["modes"].items()
    }
    return plot_grouped_bars(values, png, ylabel="score (main metric x100)")


def record_scores(results: dict[str, Any], embedder: Path, cold: Path, egrl: Path) -> None:
    """Add the world scores (main metric x100 per task, and overall) to the model cards of the models the demo
    trained: every mode to the Embedder's, ``pre_rl`` to the cold-started Reasoner's, the modes with EG-RL T-CoTs to
    the EG-RL Reasoner's."""
    scores = {mode: {**entry["tasks"], "overall": entry["overall"]} for mode, entry in results["modes"].items()}

    def named(modes: tuple[str, ...]) -> dict[str, Any]:
        return {f"world {mode} (seed {results['seed']})": scores[mode] for mode in modes if mode in scores}

    update_model_card_results(embedder, named(tuple(scores)))
    update_model_card_results(cold, named(("pre_rl",)))
    update_model_card_results(egrl, named(("egrl", "answer_only", "no_evidence")))


def _mean_side(agreement: dict[str, dict[str, float]], side: str) -> float:
    values = [sides[side] for sides in agreement.values() if side in sides]
    return sum(values) / len(values) if values else 0.0


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _claim_line(claim: dict[str, Any]) -> str:
    """One claim's verdict with its numbers: it holds only when its 95 % interval lies above 0 (``clear``); a margin
    whose interval reaches 0, or a margin of 0 or below, does not hold; a positive margin without an interval is
    untested."""
    margin = f"margin {claim['margin']:+.2f} points"
    if "ci95" not in claim:
        verdict = "not tested (no interval)" if claim["margin"] > 0 else "does not hold"
        return f"- {claim['claim']}: {verdict}: {margin}"
    low, high = claim["ci95"]
    interval = f"95 % CI [{low:+.2f}, {high:+.2f}]"
    if claim["clear"]:
        return f"- {claim['claim']}: holds: {margin}, {interval}, above 0"
    return f"- {claim['claim']}: does not hold: {margin}, {interval}, " + ("includes 0" if high >= 0 else "below 0")


def format_results(results: dict[str, Any]) -> str:
    """The per-task and overall comparison table, the claims, the RL curve and the stage times."""
    modes = list(results["modes"])
    tasks = list(results["modes"][modes[0]]["tasks"])
    lines = [
        f"# embedrl demo (seed {results['seed']}, {results['wall_s']:.0f} s)",
        "",
        "| task | queries | " + " | ".join(modes) + " |",
        "|---|---:|" + "---:|" * len(modes),
    ]
    for task in tasks:
        scores = " | ".join(f"{results['modes'][m]['tasks'][task]:.1f}" for m in modes)
        lines.append(f"| {task} | {results['n_queries'][task]} | {scores} |")
    overall = " | ".join(f"**{results['modes'][m]['overall']:.1f}**" for m in modes)
    lines += [f"| **overall** | {sum(results['n_queries'].values())} | {overall} |", ""]
    if results.get("claims"):
        lines += ["Claims on the overall score (a claim holds when the 95 % interval of its margin lies above 0):", ""]
        lines += [_claim_line(c) for c in results["claims"]]
        if any("ci95" in c for c in results["claims"]):
            lines += [
                "",
                "Intervals: paired bootstrap over this query set (queries redrawn within each task); one that "
                "includes 0 means the margin is within the query set's sampling noise. They do not include the spread "
                "between training or decoding seeds.",
            ]
        lines.append("")
    agreement = results.get("answer_agreement") or {}
    if agreement:
        lines.append(
            "Reasoner answers equal to the teacher's (mean over tasks, query / target side): "
            + "; ".join(
                f"{mode} {_mean_side(a, 'query'):.2f} / {_mean_side(a, 'target'):.2f}" for mode, a in agreement.items()
            )
            + "."
        )
        lines.append("")
    evidence = results.get("evidence_agreement") or {}
    if evidence:
        lines.append(
            "Evidence cues against the ground truth (keyword precision / recall; boxes equal to a true box; key-frame "
            "precision / recall): "
            + "; ".join(
                f"{who} {_rate(e['keyword_precision'])} / {_rate(e['keyword_recall'])}; "
                f"{_rate(e['box_exact_rate'])}; {_rate(e['key_frame_precision'])} / {_rate(e['key_frame_recall'])}"
                for who, e in evidence.items()
            )
            + "."
        )
        lines.append("")
    rl = results.get("rl") or {}
    if rl:
        lines.append(
            f"EG-RL: {rl['steps']} steps; mean total reward per {rl['chunk_steps']} steps: "
            + ", ".join(f"{v:.3f}" for v in rl["reward/total"])
            + f" (outcome {', '.join(f'{v:.3f}' for v in rl['reward/outcome'])})."
        )
        if "total_change_within_dataset" in rl:
            rises = sum(b > a for a, b in rl["total_by_dataset_halves"].values())
            lines.append(
                f"Within each dataset, second half of its steps vs first half: mean change "
                f"{rl['total_change_within_dataset']:+.3f}; rises on {rises} of {len(rl['total_by_dataset_halves'])} "
                "datasets."
            )
        lines.append("")
        lines.append(f"![reward components over RL steps]({REWARD_PLOT})")
        lines.append("")
    lines.append(f"![per-task scores per mode]({MODES_PLOT})")
    lines.append("")
    lines.append("Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["stage_s"].items()))
    return "\n".join(lines)
