"""What an EG-RL run writes (docs/rl.md "Outputs"): the run folder and its checks, one ``metrics.jsonl`` record per
RL step, the sample tables of ``samples.md``, the console's one line per step, and ``train.log``.

The console shows embedrl's own lines (start-up, one :func:`step_line` per step); the libraries' log records, Python
warnings (FutureWarnings of transformers and TRL) and TRL's raw metric dicts go to ``<out>/train.log`` only
(:func:`run_log`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers.utils import logging as hf_logging

from embedrl import prompts as P
from embedrl.config import GRPOTrainConfig, RewardConfig, check_run_dir
from embedrl.data.schema import Item
from embedrl.rewards.terms import RolloutKey
from embedrl.tcot import parse_tcot
from embedrl.train.grpo_math import group_stats
from embedrl.train.rl_data import SIDES
from embedrl.train.tracking import RUNS_DIR

__all__ = [
    "CHECKPOINT_DIR",
    "COMPONENTS",
    "FINAL_DIR",
    "METRICS_FILE",
    "RL_META_FILE",
    "SAMPLES_FILE",
    "TRAIN_LOG_FILE",
    "TRL_LOG",
    "RolloutBatch",
    "check_rl_run_dir",
    "merge_step_records",
    "rl_meta",
    "run_log",
    "sample_table",
    "step_line",
    "step_metrics",
    "truncate_samples",
]

CHECKPOINT_DIR = "checkpoints"  # TRL's checkpoint-N folders
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.md"
FINAL_DIR = "final"
REWARD_CONFIG_FILE = "reward_config.json"
TRAIN_LOG_FILE = "train.log"  # the libraries' log records, warnings and TRL's raw metric dicts (main process)
RL_META_FILE = "embedrl_rl.json"  # in final/ and every checkpoint: Embedder id, resolved reward config, step
# Keys a resume may change: the LR is constant and each step's batch is a pure function of (seed, step), so a run
# can be extended (more steps or epochs), its sample tables thinned, its trackers or memory settings changed,
# without changing what the steps compute.
RL_RESUME_FREE_KEYS = ("max_steps", "epochs", "sample_table_every", "report_to", "gradient_checkpointing", "threads")
COMPONENTS = ("format", "process", "outcome")  # the order of build_reward_funcs' (funcs, weights)
SAMPLE_TABLE_ROWS = 16
SAMPLE_TEXT_CHARS = 160
TRL_LOG = "embedrl.trl"  # the logger of TRL's raw metric dicts: train.log only
# Loggers whose records go to train.log only while a run is on (libraries, Python warnings, TRL's raw dicts).
QUIET_LOGGERS = ("py.warnings", "transformers", "trl", "accelerate", "datasets", "peft", "torch", TRL_LOG)


# ----------------------------------------------------------------------------------------------------------------
# The run folder
# ----------------------------------------------------------------------------------------------------------------


def check_rl_run_dir(cfg: GRPOTrainConfig, is_main_process: bool = True) -> bool:
    """The check of ``cfg.out`` before anything is written there (:func:`~embedrl.config.check_run_dir`): True to
    resume the run in it; refuses a differing or unasked-for previous run unless ``cfg.overwrite``. With several
    processes each checks, and the main one alone deletes a previous run when ``overwrite``."""
    if cfg.overwrite and not is_main_process:
        return False
    leftovers = (CHECKPOINT_DIR, METRICS_FILE, SAMPLES_FILE, FINAL_DIR, REWARD_CONFIG_FILE, TRAIN_LOG_FILE, RUNS_DIR)
    return check_run_dir(
        cfg, cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, leftovers=leftovers, free_keys=RL_RESUME_FREE_KEYS
    )


def write_reward_config(out: Path, reward_cfg: RewardConfig) -> None:
    """``out/reward_config.json``: the resolved reward configuration."""
    (out / REWARD_CONFIG_FILE).write_text(json.dumps(reward_cfg.to_dict(), indent=2, sort_keys=True) + "\n")


def rl_meta(cfg: GRPOTrainConfig, reward_cfg: RewardConfig, step: int) -> dict[str, Any]:
    """``embedrl_rl.json`` of a checkpoint: what the policy was trained against (method.md §1.3 invariant 4)."""
    return {"step": step, "embedder": cfg.embedder, "reasoner_init": cfg.reasoner,
            "discriminator": cfg.discriminator or cfg.reasoner, "discriminator_url": cfg.discriminator_url,
            "num_generations": cfg.group_size, "pairs_per_step": cfg.pairs_per_step,
            "reward": reward_cfg.to_dict()}  # fmt: skip


def truncate_samples(path: Path, step: int) -> None:
    """Keep only the sample tables of steps <= ``step`` in ``samples.md`` (a resumed run writes the later ones
    again). A missing file is left missing."""
    if not path.is_file():
        return
    sections = re.split(r"(?m)^(?=## step \d+ )", path.read_text())
    kept = [s for s in sections if not s.startswith("## step ") or int(s.split()[2]) <= step]
    path.write_text("".join(kept))


# ----------------------------------------------------------------------------------------------------------------
# One step's rollouts and their metrics
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RolloutBatch:
    """One process's scored rollouts of one RL step; row ``i`` is ``keys[i]`` (docs/method.md §4.10)."""

    step: int  # 1-based RL step
    dataset: str
    block: int  # the step block of the training dataset (rl_data.build_trl_dataset)
    keys: list[RolloutKey]  # [N]
    items: list[Item]  # [N] the side's item (without T-CoT)
    texts: list[str]  # [N] decoded responses (the T-CoTs)
    completion_ids: list[list[int]]  # [N] response tokens
    truncated: list[bool]  # [N] no EOS within max_new_tokens
    components: dict[str, list[float | None]]  # name -> [N] (a weight-0 term other than format is left out)
    totals: list[float | None]  # [N] the total reward (docs/method.md §4.8)
    advantages: Tensor  # [N] the group advantages of the totals, as TRL computes them

    @property
    def lengths(self) -> Tensor:
        """[N] response lengths in tokens."""
        return torch.tensor([len(ids) for ids in self.completion_ids], dtype=torch.float32)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def _cell(text: str) -> str:
    text = text.replace("\n", "⏎").replace("|", "\\|")
    return text if len(text) <= SAMPLE_TEXT_CHARS else text[: SAMPLE_TEXT_CHARS - 1] + "…"


def sample_table(batch: RolloutBatch) -> str:
    """A Markdown table of sample T-CoTs with their rewards and advantages (the first rows in key order)."""

    def fmt(v: float | None) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    names = [c for c in COMPONENTS if c in batch.components]
    head = ["pair", "side", "g", *names, "R", "A", "len", "T-CoT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(
        range(len(batch.keys)), key=lambda i: (batch.keys[i].pair_id, batch.keys[i].side, batch.keys[i].rollout)
    )
    for i in order[:SAMPLE_TABLE_ROWS]:
        k = batch.keys[i]
        cells = [_cell(k.pair_id), k.side, str(k.rollout), *(fmt(batch.components[c][i]) for c in names),
                 fmt(batch.totals[i]), f"{float(batch.advantages[i]):+.3f}", str(len(batch.completion_ids[i])),
                 _cell(batch.texts[i])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evidence_metrics(batch: RolloutBatch, by_side: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Boxes (image items) or key frames (video items) each T-CoT names, i.e. its evidence before the crop filters,
    and parser repairs per T-CoT, read with the Embedder's cue rule (the cue of the item's modality)."""
    cues, repairs = [], []
    for item, text in zip(batch.items, batch.texts, strict=True):
        tcot = parse_tcot(text, cue_key=P.CUE_FOR_MODALITY[item.modality], n_frames=len(item.frames) or None)
        cues.append(0 if item.modality == "text" else len(tcot.cue_values))
        repairs.append(len(tcot.problems))
    out = {f"evidence/per_tcot/{side}": _mean([cues[i] for i in rows]) for side, rows in by_side.items()}
    out["evidence/parser_repairs_per_tcot"] = _mean(repairs)
    return out


def step_metrics(batch: RolloutBatch, reward_stats: Mapping[str, float]) -> dict[str, float]:
    """Reward components (mean per side and overall), response lengths, evidence counts, the reward functions' own
    per-step statistics ``reward_stats`` (s+, s−, margin, Acc, Discriminator accuracy, ...), and the Discriminator's
    accuracy against chance."""
    out: dict[str, float] = {}
    by_side = {s: [i for i, k in enumerate(batch.keys) if k.side == s] for s in SIDES}
    lengths = batch.lengths
    rewards = torch.tensor([math.nan if r is None else r for r in batch.totals], dtype=torch.float32)  # [N]
    for name, values in [*batch.components.items(), ("total", batch.totals)]:
        valid = [float(v) for v in values if v is not None]
        out[f"reward/{name}"] = _mean(valid)
        for side, rows in by_side.items():
            out[f"reward/{name}/{side}"] = _mean([float(values[i]) for i in rows if values[i] is not None])
    out["reward/total/std"] = float(np.nanstd(rewards.numpy())) if len(rewards) else float("nan")
    out["reward/not_applicable"] = float(torch.isnan(rewards).sum())
    for side, rows in by_side.items():
        out[f"completion/length/{side}"] = float(lengths[rows].mean())
    out["completion/length"] = float(lengths.mean())
    out["completion/truncated_frac"] = _mean([float(t) for t in batch.truncated])
    out.update(evidence_metrics(batch, by_side))
    out.update(reward_stats)
    acc = [out[f"reward/process/accuracy/{s}"] for s in SIDES if f"reward/process/accuracy/{s}" in out]
    if acc and "reward/process/chance" in out:
        out["discriminator/accuracy"] = _mean(acc)
        out["discriminator/chance"] = out["reward/process/chance"]
        out["discriminator/accuracy_minus_chance"] = out["discriminator/accuracy"] - out["discriminator/chance"]
        out["discriminator/parse_failures"] = out.get("reward/process/parse_failures", 0.0)
    stats, _ = group_stats(rewards, [k[:2] for k in batch.keys])
    out["grpo/constant_groups"] = float(stats.constant.sum())
    out["grpo/groups"] = float(len(stats.constant))
    return out


# Keys of a step record that add up over the processes of a multi-process step; ``time/*`` takes the slowest
# process; ``dataset`` lists each process's dataset; every other number is the mean over the processes (each holds
# one block of the same size, so a mean of block means is the step's mean; ``reward/total/std`` is the mean of the
# blocks' spreads).
SUMMED_KEYS = frozenset({"pairs", "prompts", "trajectories", "reward/not_applicable", "grpo/constant_groups",
                         "grpo/groups", "reward/process/parse_failures", "discriminator/parse_failures"})  # fmt: skip


def merge_step_records(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One step's record from the records of its processes (in rank order), each over its own step block."""
    if len({r["step"] for r in records}) != 1:
        raise ValueError(f"the processes report different steps {[r['step'] for r in records]} for one RL step")
    if len(records) == 1:
        return {**records[0], "processes": 1}
    merged: dict[str, Any] = {"step": records[0]["step"], "dataset": ",".join(r["dataset"] for r in records),
                              "processes": len(records)}  # fmt: skip
    dropped = {r["dataset"]: r["data/dropped_prompt_tokens"] for r in records}  # a count per dataset
    merged["data/dropped_prompt_tokens"] = sum(dropped.values())
    for key in records[0]:
        if key in merged or not all(isinstance(r.get(key), int | float) for r in records):
            continue
        values = [float(r[key]) for r in records]
        if key in SUMMED_KEYS:
            merged[key] = sum(values)
        elif key.startswith("time/"):
            merged[key] = max(values)
        else:
            merged[key] = float(np.nanmean(values)) if not all(math.isnan(v) for v in values) else math.nan
    return merged


def step_line(step: int, total: int, dataset: str, record: dict[str, Any]) -> str:
    """One progress line per RL step: the total reward, each logged component (a weight-0 term is not logged, so
    it is left out rather than shown as nan), the mean response length and the step time."""
    terms = ", ".join(f"{name} {record[f'reward/{name}']:.3f}" for name in COMPONENTS if f"reward/{name}" in record)
    return (
        f"step {step}/{total} {dataset}: reward {record.get('reward/total', math.nan):.3f} ({terms}), "
        f"len {record.get('completion/length', math.nan):.0f}, {record['time/step']:.1f}s"
    )


# ----------------------------------------------------------------------------------------------------------------
# The console and train.log
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def run_log(path: Path, tag: str = "") -> Iterator[None]:
    """For the block: every log record also goes to ``path`` (appended; ``tag`` marks this process's lines when
    several processes share the file), embedrl's INFO lines included however logging is configured; the libraries'
    records (:data:`QUIET_LOGGERS`), Python warnings and TRL's raw metric dicts (logger :data:`TRL_LOG`) go there
    only, not to the console; transformers' progress bars (loading and writing weights) are off. Everything is
    restored on exit."""
    handler = logging.FileHandler(path, encoding="utf-8")
    prefix = f"[{tag}] " if tag else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved = {
        name: (lg.handlers[:], lg.propagate, lg.level) for name in QUIET_LOGGERS for lg in [logging.getLogger(name)]
    }
    bars = hf_logging.is_progress_bar_enabled()
    ours = logging.getLogger("embedrl")
    our_level = ours.level
    if ours.getEffectiveLevel() > logging.INFO:  # e.g. the Python API without logging configured
        ours.setLevel(logging.INFO)
    root.addHandler(handler)
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [handler], False
    logging.getLogger(TRL_LOG).setLevel(logging.INFO)
    logging.captureWarnings(True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.captureWarnings(False)
        if bars:
            hf_logging.enable_progress_bar()
        for name, (handlers, propagate, level) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
        root.removeHandler(handler)
        ours.setLevel(our_level)
        handler.close()
