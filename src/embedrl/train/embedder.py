"""Contrastive training of the Embedder (docs/method.md §3.4–3.8): ``train_embedder(cfg)``, on accelerate.

The loop reads top to bottom: build (data, sampler, ``Accelerator``, model, optimiser, schedule) → resume → per
step: batch → ``train_step`` → log → maybe save. Each step is ``num_sub_batches`` same-dataset sub-batches; the
loss of each sub-batch is the symmetric InfoNCE of :mod:`embedrl.losses` (cached, GradCache, with ``grad_cache``)
over in-batch negatives gathered from every process; gradients are averaged over sub-batches and processes.

accelerate owns the distribution (docs/embedder.md, "Training"): the ``Accelerator`` puts each process on its device
(``cuda:LOCAL_RANK`` with ``--device cuda``), wraps the model for DDP, FSDP or DeepSpeed ZeRO as the launcher's
accelerate config says, applies bf16 mixed precision (``bf16``) and accumulates gradients over a step's sub-batches
(``gradient_accumulation_steps = num_sub_batches``: one gradient synchronisation and one optimiser step per step).
What stays ours: the sub-batch sampler, each process's share of every sub-batch (``split_for_rank``), the gather of
embeddings with gradients inside the loss (accelerate's gather is not differentiable), GradCache, the schedule and
the checkpoint layout (``accelerator.save_state`` into ``checkpoints/step-N``, written under ``.tmp`` and renamed
once complete, with every process's RNG states, so a resumed run ends with the weights of an uninterrupted one).

Launch: ``embedrl train-embedder ...`` (one process), ``accelerate launch --config_file
configs/accelerate/ddp.yaml -m embedrl.cli train-embedder ... --device cuda`` or ``torchrun --nproc-per-node N -m
embedrl.cli train-embedder ... --device cuda``. ``report_to`` sends the ``metrics.jsonl`` scalars to TensorBoard,
W&B or trackio (:mod:`embedrl.train.tracking`).
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

import torch
from accelerate import Accelerator, DistributedType
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from embedrl.config import ConfigError, EmbedderTrainConfig, check_run_dir, save_config, truncate_metrics
from embedrl.data.sampler import DatasetInfo, SubBatchSampler, split_for_rank
from embedrl.data.schema import DataError, Item, Pair, read_pairs
from embedrl.losses import cached_info_nce, info_nce
from embedrl.models.cards import write_model_card
from embedrl.models.embedder import Embedder
from embedrl.models.loading import resolve_checkpoint, set_attn_implementation, torch_dtype
from embedrl.tcot import TCoT, parse_tcot, render_tcot
from embedrl.train.tracking import PROJECT, RUNS_DIR, hparams, make_trackers, mark_start, scalars

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
    """Full fine-tuning (every parameter the Embedder computes with trains) or LoRA via peft (only adapters train).

    In full fine-tuning an LM head that is not tied to the input embeddings is frozen: the Embedder never computes
    it, so it would get no gradient anyway, and leaving it out keeps it out of the optimiser and the checkpoints.
    """
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.finetune == "full":
        model.requires_grad_(True)
        head = model.get_output_embeddings()
        if head is not None and head.weight is not model.get_input_embeddings().weight:
            head.requires_grad_(False)
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
# Accelerate: the Accelerator and the module it wraps
# ----------------------------------------------------------------------------------------------------------------

SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)  # the model's weights are split over the processes


class EmbedForward(torch.nn.Module):
    """The Embedder's training forward as one module, the one accelerate wraps (DDP, FSDP, DeepSpeed) and runs under
    mixed precision: ``forward(*batches)`` returns the unit-norm embeddings ``[B_i, D]`` (float32) of each collated
    batch (:meth:`Embedder.embed_batch`). Both sides of a sub-batch go through **one** call, so a DDP wrapper sees one
    forward per backward. The Embedder's model is this module's ``model`` (same parameters, not a copy)."""

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        self.model = embedder.model
        self.embedder = embedder  # not a Module: not registered, so its model is counted once
        base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        # FSDP's transformer auto-wrap reads the layer classes to shard from the module it wraps.
        self._no_split_modules = list(getattr(base, "_no_split_modules", None) or [])

    def forward(self, *batches: dict[str, Tensor]) -> tuple[Tensor, ...]:
        return tuple(self.embedder.embed_batch(batch) for batch in batches)


def build_accelerator(cfg: EmbedderTrainConfig) -> Accelerator:
    """The run's ``Accelerator``: ``cfg.device`` (``cpu``, ``cuda``: ``cuda:LOCAL_RANK`` per process, ``cuda:N`` in
    a single process), bf16 when ``cfg.bf16`` (else the launcher's mixed precision), gradient accumulation over the
    ``num_sub_batches`` sub-batches of a step, DDP that tolerates parameters a forward does not use (the vision tower
    on a text-only sub-batch) and the ``report_to`` trackers. The distribution itself (DDP, FSDP, DeepSpeed) is the
    launcher's accelerate config.

    Raises:
        ConfigError: an unknown device, ``cuda`` without a GPU, ``cuda:N`` in a multi-process launch, an accelerate
            config whose ``gradient_accumulation_steps`` differs from ``num_sub_batches``, or ``grad_cache`` under
            DeepSpeed.
    """
    device = cfg.device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise ConfigError(f"device={device!r}: use cpu, cuda (each process takes cuda:LOCAL_RANK) or cuda:N")
    if index and world > 1:
        raise ConfigError(
            f"device={device!r} would put all {world} processes on one GPU: pass --device cuda, and each process "
            "takes the GPU of its LOCAL_RANK"
        )
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but torch sees no GPU: pass --device cpu")
    if index:
        torch.cuda.set_device(int(index))
    # A stage run earlier in this process (TRL's trainers, a previous train_embedder) leaves accelerate's shared
    # state behind; this run's device and precision replace it. The process group of a launch is kept.
    AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
    accelerator = Accelerator(
        cpu=kind == "cpu",
        mixed_precision="bf16" if cfg.bf16 else None,
        gradient_accumulation_steps=cfg.num_sub_batches,
        step_scheduler_with_optimizer=False,  # the schedule counts optimiser steps, stepped once per step
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=make_trackers(cfg, cfg.out, "train-embedder") or None,
        project_dir=cfg.out,
    )
    if accelerator.device.type != kind:
        raise ConfigError(
            f"device={device!r} but accelerate placed this process on {accelerator.device}: check the accelerate "
            "config (use_cpu) or pass the matching --device"
        )
    if accelerator.gradient_accumulation_steps != cfg.num_sub_batches:
        raise ConfigError(
            f"the accelerate config sets gradient_accumulation_steps={accelerator.gradient_accumulation_steps}, but "
            f"the Embedder accumulates over the num_sub_batches={cfg.num_sub_batches} sub-batches of a step: leave "
            "gradient_accumulation_steps out of the accelerate config, and set --num_sub_batches instead"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if cfg.grad_cache:
            raise ConfigError(
                "grad_cache does not run under DeepSpeed (it calls backward once per chunk, and accelerate's "
                "DeepSpeed backward steps the optimiser at the first): use FSDP (configs/accelerate/fsdp.yaml) "
                "or DDP with grad_cache, or DeepSpeed without it"
            )
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        for key, value in (
            ("train_micro_batch_size_per_gpu", cfg.sub_batch_size // accelerator.num_processes),
            ("gradient_clipping", cfg.max_grad_norm),
        ):
            if ds.get(key, "auto") == "auto":  # no dataloader is prepared: fill what accelerate would infer
                ds[key] = value
    return accelerator


def _keep_trainable(models: list[torch.nn.Module], weights: list[dict[str, Tensor]], output_dir: str) -> None:
    """``save_state`` pre-hook: a checkpoint holds the trainable weights only (LoRA: the adapters), as before."""
    for model, state in zip(models, weights, strict=False):  # weights is empty under FSDP and DeepSpeed
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        for name in [name for name in state if name not in trainable]:
            del state[name]


def _load_trainable(models: list[torch.nn.Module], input_dir: str) -> None:
    """``load_state`` pre-hook, the counterpart of :func:`_keep_trainable`: loads the trainable weights itself (a
    checkpoint lacking one of them, or holding others, was written by another config) and leaves the optimiser,
    schedule and RNG states to accelerate."""
    for i, model in enumerate(models):
        path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
        state = load_file(path, device=str(next(model.parameters()).device))
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        missing, extra = sorted(trainable - set(state)), sorted(set(state) - trainable)
        if missing or extra:
            raise ConfigError(
                f"{path} does not match this run's trainable parameters (missing {missing[:3]}, extra {extra[:3]}): "
                "was it written by another finetune setting? pass --overwrite true to start over"
            )
        model.load_state_dict(state, strict=False)
    models.clear()  # loaded: accelerate skips them


# ----------------------------------------------------------------------------------------------------------------
# Step
# ----------------------------------------------------------------------------------------------------------------


def sub_batch_loss(
    accelerator: Accelerator,
    module: torch.nn.Module,
    embedder: Embedder,
    queries: list[Item],
    targets: list[Item],
    cfg: EmbedderTrainConfig,
) -> dict[str, Tensor]:
    """Loss of this process's share of one same-dataset sub-batch, against the embeddings of every process;
    its gradients are accumulated into the parameters (``accelerator.backward`` is called). Returns the detached
    ``loss``, ``loss_q2t``, ``loss_t2q`` and ``accuracy``.

    ``module`` is the prepared :class:`EmbedForward`; ``embedder`` collates the items.
    """

    def inputs(items: list[Item]) -> dict[str, Tensor]:
        return dict(embedder.collate(items).to(accelerator.device))

    if cfg.grad_cache:
        chunks = range(0, len(queries), cfg.chunk_size)
        return cached_info_nce(
            lambda items: module(inputs(items))[0],
            [queries[i : i + cfg.chunk_size] for i in chunks],
            [targets[i : i + cfg.chunk_size] for i in chunks],
            temperature=cfg.temperature,
            backward=accelerator.backward,
        )
    q, t = module(inputs(queries), inputs(targets))  # [n_local, D] each
    out = info_nce(q, t, temperature=cfg.temperature)
    accelerator.backward(out["loss"])
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
    accelerator: Accelerator,
    module: torch.nn.Module,
    embedder: Embedder,
    batch: list[tuple[str, list[Pair]]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: EmbedderTrainConfig,
) -> dict[str, float]:
    """One optimiser step over a global batch of (dataset, this process's pairs) sub-batches.

    Each sub-batch is one accumulation micro-step (``accelerator.accumulate``): its gradients stay on the process
    until the last one, whose backward synchronises them; ``accelerator.backward`` divides each by the number of
    sub-batches and the processes average, so the step's gradient is the mean over sub-batches and processes.
    ``module``, ``optimizer`` and ``scheduler`` are the prepared ones. The returned losses and accuracy are the
    means over sub-batches and processes (the global batch's), ``grad_norm`` the norm before clipping.
    """
    if len(batch) != accelerator.gradient_accumulation_steps:
        raise ValueError(f"{len(batch)} sub-batches, but the accelerator accumulates over "
                         f"{accelerator.gradient_accumulation_steps}")  # fmt: skip
    sums: dict[str, Tensor] = {}
    for _, pairs in batch:
        with accelerator.accumulate(module):
            out = sub_batch_loss(
                accelerator, module, embedder, [p.query for p in pairs], [p.target for p in pairs], cfg
            )
        for key, value in out.items():
            sums[key] = sums.get(key, 0) + value / len(batch)
    if not accelerator.sync_gradients:
        raise RuntimeError("the step ended before accelerate synchronised the gradients")
    keys = sorted(sums)
    means = accelerator.reduce(torch.stack([sums[k] for k in keys]).to(accelerator.device), reduction="mean")
    metrics = dict(zip(keys, means.tolist(), strict=True))
    if cfg.max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
        if norm is not None:  # DeepSpeed clips inside its step and may report no norm
            metrics["grad_norm"] = float(norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

TRAINER_STATE_FILE = "trainer_state.json"  # in each Embedder checkpoint: {"step": N}


def save_state(accelerator: Accelerator, out: Path, step: int) -> Path:
    """Write ``out/checkpoints/step-N`` with ``accelerator.save_state`` (trainable weights, optimiser, schedule,
    every process's RNG states; sharded as the model is under FSDP/DeepSpeed) and ``trainer_state.json``. It is
    written as ``step-N.tmp`` and renamed once every process has written its part, so a checkpoint directory exists
    only once it is complete. Every process calls this."""
    path = out / CHECKPOINT_DIR / f"step-{step:07d}"
    tmp = path.with_name(path.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed save's leftover
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps({"step": step}) + "\n")
        if path.exists():  # a stale checkpoint of the same step (a run that was overwritten)
            shutil.rmtree(path)
        tmp.replace(path)
    accelerator.wait_for_everyone()
    return path


def load_state(accelerator: Accelerator, path: Path) -> int:
    """Restore a checkpoint written by :func:`save_state` into the prepared objects; returns its step."""
    state_file = path / TRAINER_STATE_FILE
    if not state_file.is_file():
        raise ConfigError(
            f"{path} holds no {TRAINER_STATE_FILE}: it was not written by this version's train-embedder; pass "
            "--overwrite true to start over"
        )
    accelerator.load_state(str(path))
    return int(json.loads(state_file.read_text())["step"])


def remove_partial_checkpoints(out: Path) -> None:
    """Delete the ``.tmp`` folders a killed save left in ``out``'s checkpoints."""
    for tmp in (out / CHECKPOINT_DIR).glob("step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete ``out/checkpoints/step-N`` (``.tmp`` folders are ignored), or None."""
    root = out / CHECKPOINT_DIR
    done = sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp")) if root.is_dir() else []
    return done[-1] if done else None


# ----------------------------------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------------------------------


def build_embedder(cfg: EmbedderTrainConfig, device: str | torch.device) -> Embedder:
    """A fresh Embedder of ``cfg.backbone`` on ``device``, with ``cfg.dtype`` weights (the dtype they train in) and
    the ``cfg.attn_implementation`` kernel, prepared for ``cfg.finetune`` (LoRA adapters or full)."""
    backbone = resolve_checkpoint(cfg.backbone)  # a missing local folder fails here, never on the hub
    embedder = Embedder.from_backbone(
        backbone, dtype=torch_dtype(cfg.dtype), device=device, mode=cfg.mode, video_as=cfg.video_as
    )
    set_attn_implementation(embedder.model, cfg.attn_implementation)
    embedder.model = prepare_model(embedder.model, cfg)
    return embedder


def save_final(
    accelerator: Accelerator, module: torch.nn.Module, embedder: Embedder, cfg: EmbedderTrainConfig
) -> Path:
    """Write the trained Embedder to ``out/final`` (main process; every process calls this). Under FSDP and
    DeepSpeed the weights are gathered from the processes into a fresh CPU copy first."""
    final = Path(cfg.out) / FINAL_DIR
    if accelerator.distributed_type in SHARDED:
        state = accelerator.get_state_dict(module)  # a collective: the full weights, on the main process
        if accelerator.is_main_process:
            embedder = build_embedder(cfg, "cpu")
            EmbedForward(embedder).load_state_dict(state)
    if accelerator.is_main_process:
        embedder.model.eval()
        embedder.save(final)
        save_config(cfg, final, filename="train_config.json")
        write_model_card(final, "embedder", base_model=cfg.backbone, config=cfg)
    accelerator.wait_for_everyone()
    return final


def train_embedder(cfg: EmbedderTrainConfig, on_step: StepCallback | None = None) -> Path:
    """Train the Embedder on ``cfg.data``; returns the directory of the final Embedder (``out/final``).

    Run it once per process of a launch (``accelerate launch``, ``torchrun``) or in a single process.
    ``on_step(step, metrics)`` is called after every step, on every process (tests use it to interrupt a run).
    """
    accelerator = build_accelerator(cfg)
    try:
        return _train(cfg, accelerator, on_step)
    finally:
        accelerator.end_training()  # closes the trackers (and the process group of a launch)


def _train(cfg: EmbedderTrainConfig, accelerator: Accelerator, on_step: StepCallback | None) -> Path:
    out = Path(cfg.out)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if cfg.sub_batch_size % world:
        raise ConfigError(f"sub_batch_size={cfg.sub_batch_size} must be a multiple of the {world} processes")
    set_seed(cfg.seed)  # the same on every process: identical initial weights (LoRA) everywhere
    data = load_training_data(cfg.data, cfg.datasets)  # every row and media file is checked before training
    sampler = build_sampler(data, cfg)
    # Every process checks the folder (so all raise alike); only the main one deletes a run that is overwritten.
    leftovers = (CHECKPOINT_DIR, METRICS_FILE, FINAL_DIR, RUNS_DIR)
    resume = (
        check_run_dir(cfg, out, resume=cfg.resume, overwrite=cfg.overwrite, leftovers=leftovers)
        if main or not cfg.overwrite
        else False
    )
    accelerator.wait_for_everyone()  # every process has checked the folder before the main one writes into it
    if main:
        save_config(cfg, out)
        remove_partial_checkpoints(out)
    total = cfg.max_steps or cfg.epochs * len(sampler)
    embedder = build_embedder(cfg, accelerator.device)
    embedder.model.train()
    module = EmbedForward(embedder)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, total)
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    accelerator.register_save_state_pre_hook(_keep_trainable)
    accelerator.register_load_state_pre_hook(_load_trainable)
    logger.info(
        "training on %d pairs from %d datasets: global batch %d = %d sub-batches × %d, %d processes (%s, %s, "
        "mixed precision %s), %d steps",
        sum(map(len, data.values())), len(data), sampler.global_batch_size, cfg.num_sub_batches, cfg.sub_batch_size,
        world, accelerator.distributed_type.value, accelerator.device, accelerator.mixed_precision, total,
    )  # fmt: skip

    step = 0
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        step = load_state(accelerator, ckpt)
        logger.info("resumed from %s at step %d", ckpt, step)
    if main:
        truncate_metrics(out / METRICS_FILE, step)  # the steps after the checkpoint are logged again
    accelerator.init_trackers(PROJECT, config=hparams(cfg))  # main process only
    mark_start(accelerator.trackers, step + 1)  # tensorboard drops what a killed run logged after the checkpoint

    metrics_file = (out / METRICS_FILE).open("a") if main else None
    progress = tqdm(total=total, initial=step, desc="train-embedder", disable=not main)
    steps_per_epoch = len(sampler)
    try:
        while step < total:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            for global_batch in sampler.epoch(epoch, start_step=in_epoch):
                batch = [(d, [data[d][i] for i in split_for_rank(idx, rank, world)]) for d, idx in global_batch]
                batch = step_views(batch, cfg.evidence_only_rate, cfg.seed, step + 1)
                start = time.perf_counter()
                metrics = train_step(accelerator, module, embedder, batch, optimizer, scheduler, cfg)
                step += 1
                n_pairs = sampler.global_batch_size
                metrics.update(lr=scheduler.get_last_lr()[0], pairs_per_s=n_pairs / (time.perf_counter() - start))
                if step % cfg.log_every == 0:
                    record: dict[str, Any] = {"step": step, "epoch": epoch, "datasets": [d for d, _ in batch]}
                    record.update({f"train/{k}": v for k, v in metrics.items()})
                    accelerator.log(scalars(record), step=step)  # main process only
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                    progress.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
                progress.update(1)
                if step % cfg.save_every == 0 or step == total:
                    save_state(accelerator, out, step)
                if on_step is not None:
                    on_step(step, metrics)
                if step >= total:
                    break
    finally:
        progress.close()
        if metrics_file is not None:
            metrics_file.close()
    return save_final(accelerator, module, embedder, cfg)
