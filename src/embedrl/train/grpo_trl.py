"""EG-RL (docs/method.md §4) on TRL's ``GRPOTrainer``: the one engine of ``embedrl rl``, through TRL's public
arguments only (docs/rl.md).

The EG-RL requirements map onto ``GRPOTrainer`` like this:

- **Whole pairs of one dataset per generation batch.** The training dataset is written in step order
  (:func:`~embedrl.train.rl_data.build_trl_dataset`): block ``s`` holds the query-side and target-side prompts of the
  ``B`` pairs of step batch ``s`` (:class:`~embedrl.train.rl_data.RLData`: one dataset, shuffled per epoch with
  ``seed + epoch``). ``shuffle_dataset=False`` keeps that order, and the batch sizes are chosen so that one process's
  generation batch is exactly one block (``2·B`` prompts × ``G`` rollouts): with ``P`` processes, RL step ``s``
  (0-based) is the ``P`` blocks ``s·P … s·P + P − 1``, and process ``k`` receives block ``s·P + k`` (TRL's
  ``RepeatSampler`` yields the global batch in dataset order; accelerate hands each process its consecutive share).
  Every reward call checks that it got whole pairs of exactly that block (:class:`TRLRewards`), so a batching
  mistake raises instead of mixing pairs; each process scores its own block, with in-batch negatives from that block
  only (like the reference code).
- **Rewards** are :func:`~embedrl.rewards.terms.build_reward_funcs` (format, process, outcome) with their weights
  as TRL's ``reward_weights``. TRL passes every dataset column to them; the ``item`` column (JSON) becomes an
  :class:`~embedrl.data.schema.Item` again, so the frozen Embedder embeds each rollout with its pixels and evidence.
- **Media.** A prompt's images and video frames are the row's ``images`` column; TRL puts them before the prompt
  text, as the Reasoner's own prompts do. The processor's image budget is set to the checkpoint's.
- **Settings.** Every key of :class:`~embedrl.config.GRPOTrainConfig` is routed (:data:`CONFIG_ROUTES`): to a
  ``GRPOConfig`` argument (:func:`grpo_args`), to the models, the rewards or the data path. ``trl_args`` passes any
  other ``GRPOConfig`` argument through; the ones embedrl derives are refused there. Loss ``dapo`` is the token mean
  over the step's trajectories (docs/method.md §4.2; with several mini-batches TRL divides by the step's mean tokens
  per mini-batch), with the plain k3 KL (``use_bias_correction_kl`` off); tests/test_grpo_trl.py checks it against
  :func:`~embedrl.train.grpo_math.grpo_loss`. TRL's advantage uses ``std + 1e-4`` where the method writes ``1e-6``.
- **Prompt length.** Both prompts of every pair are measured once (:func:`~embedrl.train.rl_data.screen_prompts`);
  a pair longer than ``max_prompt_tokens`` on either side is dropped before batching, and the start-up log says per
  dataset how many pairs that removed.
- **Logging** (:mod:`embedrl.train.rl_outputs`). ``out/metrics.jsonl`` gets one line per RL step: our reward
  components and terms per side, response lengths, evidence counts, TRL's loss statistics (``trl/...``) and the
  step time; with ``P`` processes the line merges their blocks (:func:`~embedrl.train.rl_outputs.merge_step_records`).
  ``out/samples.md`` gets a table of sample T-CoTs every ``sample_table_every`` steps. The console gets one line per
  step; TRL's raw metric dicts, the libraries' log records and their warnings go to ``out/train.log``.

One RL step is ``k = (2·B·G / mini_batch_size) · ppo_epochs`` TRL optimiser steps; ``save_every``, ``max_steps``
and the logging interval are converted accordingly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import GRPOConfig, GRPOTrainer

from embedrl.config import ConfigError, GRPOTrainConfig, RewardConfig, save_config, truncate_metrics
from embedrl.data.schema import Item, read_pairs
from embedrl.models.cards import write_model_card
from embedrl.models.generation import stop_token_ids
from embedrl.rewards.terms import build_reward_funcs, check_groups, rollout_keys, total_reward
from embedrl.train.grpo_math import group_advantages
from embedrl.train.rl_data import PromptScreen, RLData, build_trl_dataset, screen_prompts
from embedrl.train.rl_models import (
    RLModels,
    check_disjoint,
    load_models,
    lora_config,
    reward_embedder,
    trained_reasoner,
    write_policy_settings,
)
from embedrl.train.rl_outputs import (
    CHECKPOINT_DIR,
    COMPONENTS,
    FINAL_DIR,
    METRICS_FILE,
    RL_META_FILE,
    SAMPLES_FILE,
    TRAIN_LOG_FILE,
    TRL_LOG,
    RolloutBatch,
    check_rl_run_dir,
    merge_step_records,
    rl_meta,
    run_log,
    sample_table,
    step_line,
    step_metrics,
    truncate_samples,
    write_reward_config,
)
from embedrl.train.tracking import RUNS_DIR

__all__ = [
    "CONFIG_ROUTES",
    "EGRLLogger",
    "ProcessLayout",
    "StepClock",
    "StepGeometry",
    "TRLRewards",
    "Timed",
    "grpo_args",
    "mixed_batch_processor",
    "rl_step_geometry",
    "train_rl_trl",
]

logger = logging.getLogger(__name__)

TRL_ADV_EPS = 1e-4  # TRL's std epsilon in its group advantages (for the sample table's advantage column)

# Where each key of GRPOTrainConfig goes (tests/test_grpo_trl.py fails on a field missing here). "GRPOConfig.<arg>":
# the TRL argument grpo_args sets from it; any other name: the function (or GRPOTrainConfig method) that reads it.
# A key that can no longer be honoured is not a field but an entry of GRPOTrainConfig.REMOVED_KEYS (refused).
CONFIG_ROUTES: dict[str, tuple[str, ...]] = {
    "reasoner": ("load_models", "rl_meta"),
    "embedder": ("load_models", "reward_embedder", "rl_meta"),
    "embedder_url": ("load_models", "reward_embedder"),
    "layout": ("load_models",),
    "discriminator": ("load_models", "rl_meta"),
    "discriminator_url": ("load_models", "rl_meta"),
    "discriminator_max_new_tokens": ("load_models",),
    "discriminator_batch_size": ("load_models",),
    "embed_batch_size": ("reward_embedder",),
    "compact_prompts": ("load_models",),
    "data": ("train_rl_trl",),
    "out": ("train_rl_trl", "check_rl_run_dir"),
    "seed": ("GRPOConfig.seed", "train_rl_trl"),  # and RLData's batches and the Discriminator's shuffles
    "preset": ("reward_config",),
    "w_format": ("reward_config",),
    "w_process": ("reward_config",),
    "w_outcome": ("reward_config",),
    "acc_mode": ("reward_config",),
    "reward_overrides": ("reward_config",),
    "num_generations": ("GRPOConfig.num_generations",),
    "pairs_per_step": ("GRPOConfig.steps_per_generation", "train_rl_trl"),
    "epochs": ("train_rl_trl",),
    "max_steps": ("train_rl_trl",),
    "ppo_epochs": ("GRPOConfig.num_iterations",),
    "mini_batch_size": ("GRPOConfig.gradient_accumulation_steps",),
    "micro_batch_size": ("GRPOConfig.per_device_train_batch_size",),
    "scale_advantages": ("GRPOConfig.scale_rewards", "train_rl_trl"),
    "clip_eps": ("GRPOConfig.epsilon",),
    "beta": ("GRPOConfig.beta",),
    "lr": ("GRPOConfig.learning_rate",),
    "weight_decay": ("GRPOConfig.weight_decay",),
    "max_grad_norm": ("GRPOConfig.max_grad_norm",),
    "temperature": ("GRPOConfig.temperature", "rollout_decoding"),
    "top_p": ("GRPOConfig.top_p", "rollout_decoding"),
    "max_new_tokens": ("GRPOConfig.max_completion_length", "load_models", "rollout_decoding"),
    "max_prompt_tokens": ("load_models", "train_rl_trl"),
    "lora": ("train_rl_trl",),
    "gradient_checkpointing": ("GRPOConfig.activation_checkpointing",),
    "use_vllm": ("GRPOConfig.use_vllm", "load_models"),
    "vllm_mode": ("GRPOConfig.vllm_mode",),
    "vllm_server_base_url": ("GRPOConfig.vllm_server_base_url",),
    "vllm_gpu_memory_utilization": ("GRPOConfig.vllm_gpu_memory_utilization",),
    "vllm_tensor_parallel_size": ("GRPOConfig.vllm_tensor_parallel_size",),
    "trl_args": ("grpo_args",),
    "dtype": ("GRPOConfig.bf16", "load_models"),
    "attn_implementation": ("load_models",),  # the policy's kernel; TRL builds the reference model with it
    "device": ("GRPOConfig.use_cpu", "process_device"),
    "save_every": ("GRPOConfig.save_steps",),
    "log_every": ("train_rl_trl",),
    "sample_table_every": ("train_rl_trl",),
    "resume": ("check_rl_run_dir",),
    "overwrite": ("check_rl_run_dir",),
    "report_to": ("GRPOConfig.report_to",),
    "threads": ("configure_stage_threads",),  # embedrl.cli, before the stage starts
}


# ----------------------------------------------------------------------------------------------------------------
# Geometry: RL steps vs TRL optimiser steps
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepGeometry:
    """Batch sizes of one RL step on one process, in trajectories."""

    trajectories: int  # 2·B·G: one generation batch = one step block
    mini: int  # trajectories per optimiser step
    micro: int  # trajectories per forward/backward (per_device_train_batch_size)

    @property
    def accumulation(self) -> int:
        return self.mini // self.micro

    @property
    def steps_per_generation(self) -> int:
        return self.trajectories // self.micro

    def optimizer_steps(self, ppo_epochs: int) -> int:
        """TRL optimiser steps (``global_step`` increments) per RL step."""
        return self.trajectories // self.mini * ppo_epochs


def rl_step_geometry(cfg: GRPOTrainConfig) -> StepGeometry:
    """Mini- and micro-batch sizes of ``cfg`` checked against the ``2·B·G`` trajectories of a step."""
    n = 2 * cfg.pairs_per_step * cfg.group_size
    mini = cfg.mini_batch_size or n
    micro = min(cfg.micro_batch_size, mini)
    if n % mini:
        raise ConfigError(f"mini_batch_size={mini} must divide the {n} trajectories of a step (2·B·G)")
    if mini % micro:
        raise ConfigError(f"micro_batch_size={micro} must divide mini_batch_size={mini}")
    return StepGeometry(n, mini, micro)


# ----------------------------------------------------------------------------------------------------------------
# GRPOConfig from GRPOTrainConfig
# ----------------------------------------------------------------------------------------------------------------


def _derived_args(cfg: GRPOTrainConfig, total: int, out: Path) -> dict[str, Any]:
    """The GRPOConfig arguments embedrl sets from ``cfg`` (``total`` RL steps; checkpoints under ``out``)."""
    geometry = rl_step_geometry(cfg)
    k = geometry.optimizer_steps(cfg.ppo_epochs)
    return dict(
        output_dir=str(out / CHECKPOINT_DIR),
        use_cpu=cfg.device == "cpu",
        bf16=cfg.dtype == "bfloat16",
        seed=cfg.seed,
        per_device_train_batch_size=geometry.micro,
        gradient_accumulation_steps=geometry.accumulation,
        steps_per_generation=geometry.steps_per_generation,
        shuffle_dataset=False,  # the dataset is already in step order (one block = one generation batch)
        num_generations=cfg.group_size,
        num_iterations=cfg.ppo_epochs,
        max_steps=total * k,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,  # 0 = no clipping
        epsilon=cfg.clip_eps,
        beta=cfg.beta,
        use_bias_correction_kl=False,  # the method's plain k3 KL (TRL's default multiplies it by the ratio)
        loss_type="dapo",  # token mean over the step's trajectories (docs/method.md §4.2)
        scale_rewards="group" if cfg.scale_advantages else "none",
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0,
        max_completion_length=cfg.max_new_tokens,
        reward_weights=[cfg.reward_config().weights[name] for name in COMPONENTS],
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5's name of gradient checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_steps=k,  # TRL logs once per RL step
        save_strategy="steps",
        save_steps=cfg.save_every * k,
        report_to=cfg.trackers or "none",  # TensorBoard under out/runs (train_rl_trl)
        disable_tqdm=True,  # the console's progress is embedrl's step line
        use_vllm=cfg.use_vllm,
        vllm_mode=cfg.vllm_mode,
        vllm_server_base_url=cfg.vllm_server_base_url or None,
        vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        vllm_tensor_parallel_size=cfg.vllm_tensor_parallel_size,
    )


# GRPOConfig arguments trl_args may not set besides the derived ones: they would break the step-block layout.
_FIXED_TRL_ARGS = frozenset({"generation_batch_size", "auto_find_batch_size"})


def check_trl_args(cfg: GRPOTrainConfig) -> None:
    """Refuse a ``trl_args`` key that is not a GRPOConfig argument, or one embedrl derives from its own keys."""
    known = {f.name for f in dataclasses.fields(GRPOConfig) if f.init}
    unknown = sorted(set(cfg.trl_args) - known)
    if unknown:
        raise ConfigError(f"trl_args: {unknown} are not arguments of TRL's GRPOConfig (trl {_trl_version()})")
    derived = set(_derived_args(cfg, 1, Path(cfg.out))) | _FIXED_TRL_ARGS
    owned = sorted(set(cfg.trl_args) & derived)
    if owned:
        keys = {arg: key for key, routes in CONFIG_ROUTES.items() for arg in (r.split(".", 1)[1] for r in routes
                if r.startswith("GRPOConfig."))}  # fmt: skip
        hints = ", ".join(f"{arg} (set {keys[arg]})" if arg in keys else arg for arg in owned)
        raise ConfigError(f"trl_args sets {hints}, which embedrl derives from its own keys; set those instead")


def _trl_version() -> str:
    import trl

    return trl.__version__


def grpo_args(cfg: GRPOTrainConfig, total: int, out: Path | None = None) -> GRPOConfig:
    """TRL's ``GRPOConfig`` for ``total`` RL steps of ``cfg``: the derived arguments plus ``trl_args``.

    Raises:
        ConfigError: ``trl_args`` names an unknown or a derived argument, or GRPOConfig rejects a value.
    """
    check_trl_args(cfg)
    try:
        return GRPOConfig(**_derived_args(cfg, total, Path(out or cfg.out)), **cfg.trl_args)
    except (TypeError, ValueError) as err:
        where = " (check trl_args)" if cfg.trl_args else ""
        raise ConfigError(f"TRL's GRPOConfig refuses the settings{where}: {err}") from err


# ----------------------------------------------------------------------------------------------------------------
# Rewards: the EG-RL reward functions behind TRL's reward-function interface
# ----------------------------------------------------------------------------------------------------------------


class Timed:
    """A callable that adds the seconds spent in ``fn`` to ``seconds`` (reset at every step)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


@dataclass
class StepClock:
    """Timestamps of the current RL step, shared by the reward functions and the logging callback."""

    step_begin: float = 0.0
    reward_begin: float = 0.0
    reward_end: float = 0.0
    record: dict[str, Any] = field(default_factory=dict)  # the step's reward metrics, written at the next log


@dataclass(frozen=True)
class ProcessLayout:
    """This process's place in a multi-process run: its rank, the process count, and the main process's duties."""

    rank: int = 0
    processes: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class TRLRewards:
    """Format, process and outcome rewards as three TRL reward functions over one process's generation batch.

    Each call checks the batch (whole pairs, ``G`` rollouts per (pair, side), one dataset, and exactly the step block
    this process must get: ``step · P + rank``) and turns the ``item`` column back into Items. After the last
    component, the step's record (components, totals, per-side terms, lengths, timings) is merged over the processes
    and stored on ``clock``; the main process writes a sample table every ``sample_every`` steps; ``on_step(batch)``
    sees each process's scored rollouts.
    """

    def __init__(
        self, funcs: Sequence[Callable[..., list[float | None]]], reward_cfg: RewardConfig, G: int,
        embed: Timed, discriminator: Timed, clock: StepClock, eos_ids: Sequence[int], out: Path,
        sample_every: int, steps_per_rl_step: int, scale: bool = True, screen: PromptScreen | None = None,
        layout: ProcessLayout | None = None, on_step: Callable[[RolloutBatch], None] | None = None,
    ) -> None:  # fmt: skip
        self.funcs, self.reward_cfg, self.G = list(funcs), reward_cfg, G
        self.embed, self.discriminator, self.clock = embed, discriminator, clock
        self.eos_ids, self.out, self.sample_every = set(eos_ids), out, sample_every
        self.steps_per_rl_step, self.scale, self.on_step = steps_per_rl_step, scale, on_step
        self.layout = layout or ProcessLayout()
        self.dropped = dict(screen.dropped) if screen is not None else {}
        self.components: dict[str, list[float | None]] = {}

    def reward_funcs(self) -> list[Callable[..., list[float | None]]]:
        """The three functions in :data:`COMPONENTS` order, each named for TRL's logs (``rewards/<name>/mean``)."""
        out = []
        for index, name in enumerate(COMPONENTS):

            def call(prompts: Any, completions: Any, *, _index: int = index, **columns: Any) -> list[float | None]:
                return self._call(_index, prompts, completions, **columns)

            call.__name__ = name
            out.append(call)
        return out

    def expected_block(self, columns: dict[str, Any]) -> int:
        """The step block this process must score now: ``s·P + rank`` for the 0-based RL step ``s``."""
        step = columns["trainer_state"].global_step // self.steps_per_rl_step
        return step * self.layout.processes + self.layout.rank

    def _check(self, columns: dict[str, Any]) -> None:
        keys = rollout_keys(columns["pair_id"], columns["side"])
        check_groups(keys, self.G)
        for column in ("dataset", "block"):
            values = sorted(set(columns[column]), key=str)
            if len(values) != 1:
                raise ValueError(
                    f"a generation batch holds {column}s {values}; it must hold whole pairs of one step batch "
                    "(check that no TRL batching argument was changed by hand)"
                )
        want = self.expected_block(columns)
        if columns["block"][0] != want:
            raise ValueError(
                f"process {self.layout.rank} of {self.layout.processes} got step block {columns['block'][0]} where "
                f"block {want} was due: TRL's sampler and the step blocks are out of step"
            )

    def _call(self, index: int, prompts: Any, completions: Any, **columns: Any) -> list[float | None]:
        name = COMPONENTS[index]
        if index == 0:
            self.clock.reward_begin = time.perf_counter()
            self.embed.seconds = self.discriminator.seconds = 0.0
            self._check(columns)
        columns["item"] = [Item.from_record(json.loads(x)) for x in columns["item"]]
        if name != "format" and self.reward_cfg.weights[name] == 0:
            values: list[float | None] = [0.0] * len(completions)  # weight 0: not computed (ablation)
        else:
            values = self.funcs[index](prompts=prompts, completions=completions, **columns)
        if any(v is None for v in values):
            raise ValueError(f"the {name} reward is undefined for some rollouts (a step batch with < 2 pairs?)")
        self.components[name] = values
        if index == len(COMPONENTS) - 1:
            self._finish_step(completions, columns)
        return values

    def _finish_step(self, completions: Sequence[Any], columns: dict[str, Any]) -> None:
        clock = self.clock
        clock.reward_end = time.perf_counter()
        batch = self._rollout_batch(completions, columns)
        reward_stats: dict[str, float] = {}
        for fn in self.funcs[1:]:  # ProcessReward, OutcomeReward: their per-step stats (s+, s-, margin, Acc, ...)
            reward_stats.update(getattr(fn, "last_stats", {}))
        record: dict[str, Any] = {
            "step": batch.step, "dataset": batch.dataset, "pairs": len({k.pair_id for k in batch.keys}),
            "prompts": len({k[:2] for k in batch.keys}), "trajectories": len(batch.keys),
            "data/dropped_prompt_tokens": self.dropped.get(batch.dataset, 0),
        }  # fmt: skip
        record.update(step_metrics(batch, reward_stats))
        record.update({
            "time/generation": clock.reward_begin - clock.step_begin,
            "time/reward_embedder": self.embed.seconds,
            "time/reward_discriminator": self.discriminator.seconds,
            "time/reward_other": clock.reward_end - clock.reward_begin - self.embed.seconds
            - self.discriminator.seconds,
        })  # fmt: skip
        records = gather_object([record]) if self.layout.processes > 1 else [record]
        clock.record = merge_step_records(records)
        if self.layout.is_main and self.sample_every and batch.step % self.sample_every == 0:
            with (self.out / SAMPLES_FILE).open("a") as fh:
                fh.write(f"## step {batch.step} ({batch.dataset})\n\n{sample_table(batch)}\n\n")
        if self.on_step is not None:
            self.on_step(batch)

    def _rollout_batch(self, completions: Sequence[Any], columns: dict[str, Any]) -> RolloutBatch:
        """This process's scored rollouts in the shape the metrics and the sample table read."""
        keys = rollout_keys(columns["pair_id"], columns["side"])
        components = {n: v for n, v in self.components.items() if n == "format" or self.reward_cfg.weights[n] != 0}
        totals = total_reward(components, self.reward_cfg)
        rewards = torch.tensor([math.nan if r is None else r for r in totals], dtype=torch.float32)  # [N]
        advantages = group_advantages(rewards, [k[:2] for k in keys], scale=self.scale, eps=TRL_ADV_EPS)  # as TRL
        ids = [list(x) for x in columns["completion_ids"]]
        return RolloutBatch(
            step=columns["trainer_state"].global_step // self.steps_per_rl_step + 1,
            dataset=columns["dataset"][0],
            block=columns["block"][0],
            keys=keys,
            items=list(columns["item"]),
            texts=[c if isinstance(c, str) else c[-1]["content"] for c in completions],
            completion_ids=ids,
            truncated=[not row or row[-1] not in self.eos_ids for row in ids],
            components=components,
            totals=totals,
            advantages=advantages,
        )


# ----------------------------------------------------------------------------------------------------------------
# Adapters between TRL and Qwen-VL on mixed batches
# ----------------------------------------------------------------------------------------------------------------


def mixed_batch_processor(processor: Any) -> Any:
    """A shallow copy of ``processor`` that accepts ``None`` for a prompt without images in a batched call.

    TRL marks a text-only prompt of a multimodal batch with ``None`` in the per-prompt image lists it passes to the
    processor, which Qwen-VL processors reject (they accept an empty list). EG-RL batches always mix such prompts
    (a text query with an image target), so the copy maps ``None`` to ``[]``. The class keeps the original's name,
    so a processor saved from it reloads as the original class.
    """
    base = type(processor)

    def __call__(self: Any, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
        if isinstance(images, list) and any(x is None for x in images):
            images = [[] if x is None else x for x in images]
        return base.__call__(self, images=images, text=text, **kwargs)

    cls = type(base.__name__, (base,), {"__call__": __call__, "__qualname__": base.__qualname__})
    wrapped = copy.copy(processor)
    wrapped.__class__ = cls
    return wrapped


def _drop_empty_images(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    """Forward pre-hook: a micro-batch whose prompts have no image gets no image inputs (not empty tensors).

    TRL slices a generation batch's pixel values per micro-batch; a micro-batch of text-only prompts arrives with
    zero-row ``pixel_values``/``image_grid_thw``, which the Qwen-VL vision tower cannot take.
    """
    grid = kwargs.get("image_grid_thw")
    if grid is not None and grid.shape[0] == 0:
        kwargs = {**kwargs, "pixel_values": None, "image_grid_thw": None}
    return args, kwargs


# ----------------------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------------------


class EGRLLogger(TrainerCallback):
    """Stamps the start of each RL step; when TRL logs (once per RL step) sends its raw dict to ``train.log``, and
    on the main process writes the step's ``metrics.jsonl`` line and console line every ``log_every`` steps (and at
    the last); gives every TRL checkpoint the policy's ``embedrl_reasoner.json`` and ``embedrl_rl.json``
    (``on_checkpoint(path, step)``)."""

    def __init__(
        self, clock: StepClock, out: Path, total: int, steps_per_rl_step: int, log_every: int,
        on_checkpoint: Callable[[Path, int], None],
    ) -> None:  # fmt: skip
        self.clock, self.out, self.total, self.steps_per_rl_step = clock, out, total, steps_per_rl_step
        self.log_every, self.on_checkpoint = log_every, on_checkpoint

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.steps_per_rl_step == 0:
            self.clock.step_begin = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        clock = self.clock
        if not state.is_world_process_zero or not logs:
            return
        logging.getLogger(TRL_LOG).info("TRL logs at optimiser step %d: %s", state.global_step, logs)
        if "loss" not in logs or not clock.record:
            return
        record = dict(clock.record)
        clock.record = {}
        step = record["step"]
        if step % self.log_every and step != self.total:
            return
        record["time/update"] = time.perf_counter() - clock.reward_end
        record["time/step"] = time.perf_counter() - clock.step_begin
        record.update({f"trl/{k}": v for k, v in logs.items() if isinstance(v, int | float)})
        with (self.out / METRICS_FILE).open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        logger.info(step_line(step, self.total, record["dataset"], record))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and path.is_dir():
            self.on_checkpoint(path, state.global_step // self.steps_per_rl_step)


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _full_weights(trainer: GRPOTrainer) -> Iterator[None]:
    """Under DeepSpeed ZeRO-3 the policy's weights are sharded over the processes: gather them for the block (the
    final save). A no-op otherwise. (Untested here: DeepSpeed is not installed on the project's machines.)"""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if not trainer.is_deepspeed_enabled or plugin is None or plugin.zero_stage != 3:
        yield
        return
    import deepspeed  # present whenever a DeepSpeed config is active

    with deepspeed.zero.GatheredParameters(list(trainer.model.parameters()), modifier_rank=None):
        yield


def train_rl_trl(
    cfg: GRPOTrainConfig, models: RLModels | None = None, on_step: Callable[[RolloutBatch], None] | None = None
) -> Path:
    """Run EG-RL with TRL's ``GRPOTrainer`` and return the directory of the trained Reasoner (``out/final``).

    Runs in one process, or in each process of ``accelerate launch`` / ``torchrun`` (every process rewards its own
    step block). Args: ``models`` pre-loaded models (tests; default :func:`~embedrl.train.rl_models.load_models`);
    ``on_step(batch)`` sees each step's scored rollouts on every process (tests).
    """
    state = PartialState(cpu=cfg.device == "cpu")
    layout = ProcessLayout(state.process_index, state.num_processes)
    out = Path(cfg.out)
    G, geometry = cfg.group_size, rl_step_geometry(cfg)
    check_trl_args(cfg)  # before anything is loaded, written or (overwrite) deleted
    resume = check_rl_run_dir(cfg, state.is_main_process)
    state.wait_for_everyone()  # every process has checked the folder before the main one writes into it
    reward_cfg = cfg.reward_config()
    if state.is_main_process:
        save_config(cfg, out)
        write_reward_config(out, reward_cfg)
    state.wait_for_everyone()
    with run_log(out / TRAIN_LOG_FILE, tag=f"rank {layout.rank}" if layout.processes > 1 else ""):
        if state.is_main_process:
            logger.info("EG-RL reward config (resolved): %s", reward_cfg.to_dict())
        k = geometry.optimizer_steps(cfg.ppo_epochs)
        models = models or load_models(cfg)
        policy = models.policy
        policy.processor.image_processor.size = policy.adapter.image_size(policy.budget)  # the checkpoint's budget
        pairs = read_pairs(cfg.data)
        screen = screen_prompts(pairs, policy, cfg.max_prompt_tokens)  # dropped before batching: every step keeps B
        if state.is_main_process:
            screen.log()
        data = RLData(screen.kept(pairs), cfg.pairs_per_step, cfg.seed)
        total = cfg.max_steps or cfg.epochs * data.steps_per_epoch // layout.processes
        if total < 1:
            raise ConfigError(
                f"{cfg.epochs} epoch(s) of {data.steps_per_epoch} step batches cannot give each of the "
                f"{layout.processes} processes one step; raise epochs or set max_steps"
            )
        dataset = build_trl_dataset(data, total * layout.processes, policy.compact_prompts)
        if state.is_main_process:
            logger.info(
                "EG-RL (TRL GRPOTrainer): %d steps x %d process(es); per step and process %d pairs of one dataset "
                "-> %d prompts -> %d trajectories (G=%d), %d optimiser step(s)", total, layout.processes,
                cfg.pairs_per_step, 2 * cfg.pairs_per_step, geometry.trajectories, G, k,
            )  # fmt: skip

        clock = StepClock()
        embed, discriminator = Timed(reward_embedder(cfg, models)), Timed(models.discriminator)
        funcs, _ = build_reward_funcs(reward_cfg, embed, discriminator, num_generations=G, seed=cfg.seed)
        eos_ids, _ = stop_token_ids(policy.model, policy.processor)
        rewards = TRLRewards(funcs, reward_cfg, G, embed, discriminator, clock, eos_ids, out, cfg.sample_table_every,
                             k, cfg.scale_advantages, screen, layout, on_step)  # fmt: skip
        check_disjoint(models, list(policy.model.parameters()))

        def on_checkpoint(path: Path, step: int) -> None:
            write_policy_settings(path, policy, cfg)
            (path / RL_META_FILE).write_text(json.dumps(rl_meta(cfg, reward_cfg, step), indent=2) + "\n")

        args = grpo_args(cfg, total, out)
        trainer = GRPOTrainer(
            model=policy.model,
            reward_funcs=rewards.reward_funcs(),
            args=args,
            train_dataset=dataset,
            processing_class=mixed_batch_processor(policy.processor),
            peft_config=lora_config(policy.model, cfg.lora) if cfg.lora else None,
            callbacks=[EGRLLogger(clock, out, total, k, cfg.log_every, on_checkpoint)],
        )
        for printer in (PrinterCallback, ProgressCallback):  # TRL's dicts go to train.log, not the console
            trainer.remove_callback(printer)
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback):
                callback.logging_dir = str(out / RUNS_DIR)
        last = get_last_checkpoint(args.output_dir) if resume and Path(args.output_dir).is_dir() else None
        if last and state.is_main_process:
            logger.info("resuming from %s", last)
        if state.is_main_process:  # the RL steps after the checkpoint are logged again
            done = int(Path(last).name.rsplit("-", 1)[1]) // k if last else 0
            truncate_metrics(out / METRICS_FILE, done)
            truncate_samples(out / SAMPLES_FILE, done)
        hook = policy.model.get_submodule("model").register_forward_pre_hook(_drop_empty_images, with_kwargs=True)
        try:
            trainer.train(resume_from_checkpoint=last)
        finally:
            hook.remove()

        final = out / FINAL_DIR
        with _full_weights(trainer):
            if state.is_main_process:
                model = trainer.model
                merged = model.merge_and_unload() if cfg.lora else model
                merged.eval()
                trained_reasoner(merged, policy, cfg).save(final)
                save_config(cfg, final, filename="train_config.json")
                write_model_card(final, "reasoner", base_model=cfg.reasoner, config=cfg)
                (final / RL_META_FILE).write_text(json.dumps(rl_meta(cfg, reward_cfg, total), indent=2) + "\n")
        state.wait_for_everyone()
    return final
