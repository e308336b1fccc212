"""Contrastive training of the Embedder (docs/method.md §3.4–3.8): ``train_embedder(cfg)``.

The loop reads top to bottom: build (data, sampler, model, optimiser, schedule) → resume → per step: batch →
``train_step`` → log → maybe save. Each step is ``num_sub_batches`` same-dataset sub-batches; the loss of each
sub-batch is the symmetric InfoNCE of :mod:`embedrl.losses` over in-batch negatives gathered from every process;
gradients are averaged over sub-batches and processes.

Multi-process: launch with ``torchrun --nproc-per-node N -m embedrl.cli train-embedder ...`` or
``accelerate launch -m embedrl.cli train-embedder ...``. The process group is set up from the launcher's
environment (``WORLD_SIZE``, ``RANK``); gradients are all-reduced explicitly after backward, so the Embedder's
base-model forward path needs no DDP wrapper.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from embedrl.config import ConfigError, EmbedderTrainConfig, check_run_dir, save_config, truncate_metrics
from embedrl.data.sampler import DatasetInfo, SubBatchSampler, split_for_rank
from embedrl.data.schema import DataError, Item, Pair, read_pairs
from embedrl.losses import cached_info_nce, info_nce
from embedrl.models.embedder import Embedder
from embedrl.models.loading import resolve_checkpoint
from embedrl.tcot import TCoT, parse_tcot, render_tcot

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"

StepCallback = Callable[[int, dict[str, float]], None]


# ----------------------------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------------------------


def load_training_data(path: str | Path, datasets: Sequence[str] = ()) -> dict[str, list[Pair]]:
    """Pairs grouped by dataset, in file order; only ``datasets`` when given.

    Every row is validated here, before training starts: a malformed line or a media file that does not exist
    raises :class:`~embedrl.data.schema.DataError` naming the file and line.
    """
    if not Path(path).is_file():
        raise DataError(f"training data not found ({path}): pass --data a pairs JSONL (e.g. a world's train.jsonl)")
    by_dataset: dict[str, list[Pair]] = defaultdict(list)
    for pair in read_pairs(path, check_media=True):
        by_dataset[pair.dataset].append(pair)
    if not by_dataset:
        raise DataError(f"no pairs in the training data ({path}): write pairs into it (see docs/data.md)")
    missing = sorted(set(datasets) - set(by_dataset))
    if missing:
        raise ConfigError(f"datasets {missing} are not in the training data ({path}): it holds {sorted(by_dataset)}")
    return {name: by_dataset[name] for name in sorted(datasets or by_dataset)}


def build_sampler(data: dict[str, list[Pair]], cfg: EmbedderTrainConfig) -> SubBatchSampler:
    unknown = sorted(set(cfg.dataset_weights) - set(data))
    if unknown:
        raise ConfigError(f"dataset_weights names {unknown}, which are not in {cfg.data}; datasets: {sorted(data)}")
    for name, pairs in data.items():
        if len(pairs) < cfg.sub_batch_size:
            raise ConfigError(
                f"dataset {name!r} has {len(pairs)} pairs, fewer than sub_batch_size={cfg.sub_batch_size} "
                f"({cfg.data}): lower --sub_batch_size, add pairs, or leave the dataset out with --datasets"
            )
    infos = {
        name: DatasetInfo(
            size=len(pairs),
            weight=cfg.dataset_weights.get(name, 1.0),
            is_video=any(p.query.modality == "video" or p.target.modality == "video" for p in pairs),
        )
        for name, pairs in data.items()
    }
    return SubBatchSampler(infos, cfg.sub_batch_size, cfg.num_sub_batches, seed=cfg.seed)


def lora_target_modules(model: torch.nn.Module, cfg: EmbedderTrainConfig) -> list[str]:
    """Qualified names of the Linear layers LoRA adapts: the named language-model layers, plus every Linear layer of
    the vision tower and merger when ``lora.vision_tower`` (the tower is found as a module, not by its name)."""
    vision = model.get_submodule("model.visual")
    vision_ids = {id(m) for m in vision.modules()}
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is model.get_output_embeddings():
            continue
        if id(module) in vision_ids:
            if cfg.lora.vision_tower:
                targets.append(name)
        elif name.rsplit(".", 1)[-1] in cfg.lora.targets:
            targets.append(name)
    n_vision = sum(1 for n in targets if id(model.get_submodule(n)) in vision_ids)
    logger.info("LoRA adapts %d language and %d vision modules", len(targets) - n_vision, n_vision)
    if not targets:
        raise ValueError(f"no Linear layer matches lora.targets={cfg.lora.targets}")
    return targets


def prepare_model(model: torch.nn.Module, cfg: EmbedderTrainConfig) -> torch.nn.Module:
    """Full fine-tuning (every parameter trains) or LoRA via peft (only adapters train)."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.finetune == "full":
        model.requires_grad_(True)
        return model
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_target_modules(model, cfg),
        bias="none",
    )
    return get_peft_model(model, lora)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers (a no-op in a single process)
# ----------------------------------------------------------------------------------------------------------------


def init_distributed(device: str) -> tuple[int, int]:
    """Join the process group a launcher (torchrun, accelerate) describes in the environment. Returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), world


def average_gradients(params: Sequence[torch.nn.Parameter], divisor: float, world: int) -> None:
    """Sum gradients over processes and divide by ``divisor`` (sub-batches × processes)."""
    for p in params:
        if p.grad is None:
            continue
        if world > 1:
            torch.distributed.all_reduce(p.grad)
        p.grad /= divisor


# ----------------------------------------------------------------------------------------------------------------
# Step
# ----------------------------------------------------------------------------------------------------------------


def sub_batch_loss(embedder: Any, queries: list[Item], targets: list[Item], cfg: EmbedderTrainConfig) -> dict:
    """Loss of one same-dataset sub-batch; gradients are accumulated into the parameters (backward is called)."""

    def encode(items: list[Item]) -> torch.Tensor:
        with torch.autocast("cuda" if cfg.device.startswith("cuda") else "cpu", torch.bfloat16, enabled=cfg.bf16):
            return embedder.embed_batch(embedder.collate(items)).float()

    if cfg.grad_cache:
        chunks = range(0, len(queries), cfg.chunk_size)
        return cached_info_nce(
            encode,
            [queries[i : i + cfg.chunk_size] for i in chunks],
            [targets[i : i + cfg.chunk_size] for i in chunks],
            temperature=cfg.temperature,
        )
    out = info_nce(encode(queries), encode(targets), temperature=cfg.temperature)
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}


def evidence_only(item: Item) -> Item:
    """The item with its T-CoT cut to the evidence cue: ``<thinking>{cue}</thinking><rethink></rethink><answer>
    </answer>``. An item without a T-CoT is returned as it is."""
    if item.tcot is None:
        return item
    tcot = parse_tcot(item.tcot)
    cue = TCoT(cue_key=tcot.cue_key, keywords=tcot.keywords, boxes=tcot.boxes, frames=tcot.frames)
    return dataclasses.replace(item, tcot=render_tcot(cue))


def step_views(batch: list[tuple[str, list[Pair]]], rate: float, seed: int, step: int) -> list[tuple[str, list[Pair]]]:
    """Each side of each pair independently cut to :func:`evidence_only` with probability ``rate``; a pure function
    of ``(seed, step)``, so a resumed run sees the views the uninterrupted run would have."""
    if rate <= 0:
        return batch
    rng = random.Random(f"{seed}/evidence-only/{step}")
    out = []
    for dataset, pairs in batch:
        views = []
        for pair in pairs:
            query = evidence_only(pair.query) if rng.random() < rate else pair.query
            target = evidence_only(pair.target) if rng.random() < rate else pair.target
            views.append(dataclasses.replace(pair, query=query, target=target))
        out.append((dataset, views))
    return out


def train_step(
    embedder: Any,
    batch: list[tuple[str, list[Pair]]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: EmbedderTrainConfig,
    world: int,
) -> dict[str, float]:
    """One optimiser step over a global batch of (dataset, this process's pairs) sub-batches."""
    params = [p for p in embedder.model.parameters() if p.requires_grad]
    sums: dict[str, float] = defaultdict(float)
    for _, pairs in batch:
        out = sub_batch_loss(embedder, [p.query for p in pairs], [p.target for p in pairs], cfg)
        for key, value in out.items():
            sums[key] += value.item() / len(batch)
    average_gradients(params, divisor=len(batch) * world, world=world)
    if cfg.max_grad_norm > 0:
        sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(sums)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> Path:
    """Everything needed for an exact resume: trainable weights, optimiser, schedule and every RNG state."""
    path = out / CHECKPOINT_DIR / f"step-{step:07d}"
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed save's leftover
    tmp.mkdir(parents=True)
    try:
        torch.save(
            {
                "step": step,
                "model": _trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            },
            tmp / "state.pt",
        )
        if path.exists():  # a stale checkpoint of the same step (a run that was overwritten)
            shutil.rmtree(path)
        tmp.replace(path)  # a checkpoint directory exists only once it is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def remove_partial_checkpoints(out: Path) -> None:
    """Delete the ``.tmp`` folders a killed save left in ``out``'s checkpoints."""
    for tmp in (out / CHECKPOINT_DIR).glob("step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    root = out / CHECKPOINT_DIR
    done = sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp")) if root.is_dir() else []
    return done[-1] if done else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> int:
    state = torch.load(path / "state.pt", weights_only=False)
    missing = set(_trainable_state(model)) - set(state["model"])
    if missing:
        raise ValueError(f"{path} lacks trainable parameters {sorted(missing)[:3]}...; was it written by this config?")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state["model"]:
                param.copy_(state["model"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return int(state["step"])


# ----------------------------------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------------------------------


def train_embedder(cfg: EmbedderTrainConfig, on_step: StepCallback | None = None) -> Path:
    """Train the Embedder on ``cfg.data``; returns the directory of the final Embedder (``out/final``).

    ``on_step(step, metrics)`` is called after every step (tests use it to interrupt a run).
    """
    out = Path(cfg.out)
    rank, world = init_distributed(cfg.device)
    if cfg.sub_batch_size % world:
        raise ValueError(f"sub_batch_size={cfg.sub_batch_size} must be a multiple of the {world} processes")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    data = load_training_data(cfg.data, cfg.datasets)  # every row and media file is checked before training
    sampler = build_sampler(data, cfg)
    resume = check_run_dir(
        cfg, out, resume=cfg.resume, overwrite=cfg.overwrite, leftovers=(CHECKPOINT_DIR, METRICS_FILE, FINAL_DIR)
    )
    if world > 1:
        torch.distributed.barrier()  # every process has checked the folder before rank 0 writes into it
    if rank == 0:
        save_config(cfg, out)
        remove_partial_checkpoints(out)
    total = cfg.max_steps or cfg.epochs * len(sampler)
    backbone = resolve_checkpoint(cfg.backbone)  # a missing local folder fails here, never on the hub
    embedder = Embedder.from_backbone(backbone, device=cfg.device, mode=cfg.mode, video_as=cfg.video_as)
    embedder.model = prepare_model(embedder.model, cfg)
    embedder.model.train()
    params = [p for p in embedder.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, total)
    logger.info(
        "training on %d pairs from %d datasets: global batch %d = %d sub-batches × %d, %d processes, %d steps",
        sum(map(len, data.values())),
        len(data),
        sampler.global_batch_size,
        cfg.num_sub_batches,
        cfg.sub_batch_size,
        world,
        total,
    )

    step = 0
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        step = load_checkpoint(ckpt, embedder.model, optimizer, scheduler)
        logger.info("resumed from %s at step %d", ckpt, step)
    if rank == 0:
        truncate_metrics(out / METRICS_FILE, step)  # the steps after the checkpoint are logged again

    metrics_file = (out / METRICS_FILE).open("a") if rank == 0 else None
    progress = tqdm(total=total, initial=step, desc="train-embedder", disable=rank != 0)
    steps_per_epoch = len(sampler)
    while step < total:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        for global_batch in sampler.epoch(epoch, start_step=in_epoch):
            batch = [(d, [data[d][i] for i in split_for_rank(idx, rank, world)]) for d, idx in global_batch]
            batch = step_views(batch, cfg.evidence_only_rate, cfg.seed, step + 1)
            start = time.perf_counter()
            metrics = train_step(embedder, batch, optimizer, scheduler, cfg, world)
            step += 1
            n_pairs = sampler.global_batch_size
            metrics.update(lr=scheduler.get_last_lr()[0], pairs_per_s=n_pairs / (time.perf_counter() - start))
            if metrics_file is not None and step % cfg.log_every == 0:
                record = {"step": step, "epoch": epoch, "datasets": [d for d, _ in batch]}
                record.update({f"train/{k}": v for k, v in metrics.items()})
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                progress.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
            progress.update(1)
            if rank == 0 and (step % cfg.save_every == 0 or step == total):
                save_checkpoint(out, step, embedder.model, optimizer, scheduler)
            if on_step is not None:
                on_step(step, metrics)
            if step >= total:
                break
    progress.close()
    if metrics_file is not None:
        metrics_file.close()
    final = out / FINAL_DIR
    if rank == 0:
        embedder.model.eval()
        embedder.save(final)
        save_config(cfg, final, filename="train_config.json")
    return final
