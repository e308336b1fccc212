"""EG-RL on TRL's ``GRPOTrainer`` (``engine: trl``, the default of ``embedrl rl``), through its public arguments only.

The EG-RL requirements map onto ``GRPOTrainer`` like this:

- **Whole pairs of one dataset per generation batch.** The training dataset is written in step order: block ``s``
  holds the query-side and target-side prompts of the ``B`` pairs of step batch ``s`` (:class:`RLData`: one dataset,
  shuffled per epoch with ``seed + epoch``). ``shuffle_dataset=False`` keeps that order, and the batch sizes are
  chosen so that one process's generation batch is exactly one block (``2·B`` prompts × ``G`` rollouts): with ``P``
  processes, the global generation batch is ``P`` consecutive blocks and process ``k`` receives block ``k``. Every
  reward call checks that it got whole pairs of one block (:class:`TRLRewards`), so a batching mistake raises
  instead of mixing pairs.
- **Rewards** are :func:`~embedrl.rewards.terms.build_reward_funcs` (format, process, outcome) with their weights
  as TRL's ``reward_weights``. TRL passes every dataset column to them; the ``item`` column (JSON) becomes an
  :class:`~embedrl.data.schema.Item` again, so the frozen Embedder embeds each rollout with its pixels and evidence.
- **Media.** A prompt's images and video frames are the row's ``images`` column; TRL puts them before the prompt
  text, as the Reasoner's own prompts do. The processor's image budget is set to the checkpoint's.
- **Settings**: ``num_generations`` (G), ``epsilon`` (clip ε), ``beta`` (KL; TRL loads the reference from the
  checkpoint path), ``learning_rate`` (constant), ``temperature``/``top_p``, ``max_completion_length``,
  ``num_iterations`` (PPO epochs), ``peft_config`` (LoRA), ``use_vllm``/``vllm_mode``, ``save_steps`` and
  ``resume_from_checkpoint``. Loss ``dapo`` is the token mean over the mini-batch (docs/method.md §4.2); TRL's
  advantage uses ``std + 1e-4`` where the method writes ``1e-6`` (the ``native`` engine uses the latter).
- **Prompt length.** Both prompts of every pair are measured once (:func:`~embedrl.train.grpo.screen_prompts`); a
  pair longer than ``max_prompt_tokens`` on either side is dropped before batching, and the start-up log says per
  dataset how many pairs that removed.
- **Logging.** ``out/metrics.jsonl`` gets one line per RL step: the pairs of its dataset dropped for
  ``max_prompt_tokens`` (``data/dropped_prompt_tokens``), our reward components and terms per side, response
  lengths, evidence counts, TRL's loss statistics (``trl/...``), and the step time split into generation, reward
  (Embedder, Discriminator, other) and update. ``out/samples.md`` gets a table of sample T-CoTs with their rewards
  and advantages every ``sample_table_every`` steps.

One RL step is ``k = (2·B·G / mini_batch_size) · ppo_epochs`` TRL optimiser steps; ``save_every``, ``max_steps``
and the logging interval are converted accordingly.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import GRPOConfig, GRPOTrainer

from embedrl.config import GRPOTrainConfig, RewardConfig, save_config, truncate_metrics
from embedrl.data.schema import Item, Pair, read_pairs
from embedrl.models.generation import stop_token_ids
from embedrl.models.reasoner import build_reasoner_prompt
from embedrl.prompts import join_task_text
from embedrl.rewards.terms import build_reward_funcs, check_groups, rollout_keys, total_reward
from embedrl.train.grpo import (
    COMPONENTS,
    FINAL_DIR,
    METRICS_FILE,
    RL_META_FILE,
    SAMPLES_FILE,
    SIDES,
    PromptScreen,
    RLData,
    RLModels,
    RolloutBatch,
    Timed,
    _check_disjoint,
    _meta,
    check_rl_run_dir,
    load_models,
    lora_config,
    reward_embedder,
    sample_table,
    screen_prompts,
    step_line,
    step_metrics,
    trained_reasoner,
    truncate_samples,
    write_policy_settings,
)
from embedrl.train.grpo_math import group_advantages

__all__ = ["EGRLLogger", "StepClock", "TRLRewards", "build_trl_dataset", "rl_step_geometry", "train_rl_trl"]

logger = logging.getLogger(__name__)

TRL_ADV_EPS = 1e-4  # TRL's std epsilon in its group advantages (for the sample table's advantage column)


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
        raise ValueError(f"mini_batch_size={mini} must divide the {n} trajectories of a step (2·B·G)")
    if mini % micro:
        raise ValueError(f"micro_batch_size={micro} must divide mini_batch_size={mini} (engine 'trl')")
    return StepGeometry(n, mini, micro)


# ----------------------------------------------------------------------------------------------------------------
# Data: the step blocks as a datasets.Dataset, in training order
# ----------------------------------------------------------------------------------------------------------------


def _row(pair: Pair, side: str, block: int, compact: bool) -> dict[str, Any]:
    item = pair.query if side == "query" else pair.target
    prompt = build_reasoner_prompt(item, side, pair.target.modality if side == "query" else None, compact=compact)
    text = "".join(part["text"] for part in prompt.messages[0]["content"] if part["type"] == "text")
    assert prompt.family is not None
    return {
        "prompt": [{"role": "user", "content": text}],  # TRL puts the images before this text
        "images": [im.convert("RGB") for im in prompt.images],
        "pair_id": pair.pair_id,
        "side": side,
        "dataset": pair.dataset,
        "block": block,
        "cue_key": prompt.family.cue_key,
        "n_frames": prompt.n_frames or None,
        "input_text": join_task_text(item.instruction, item.text),
        "item": json.dumps(item.to_record()),
    }


def build_trl_dataset(data: RLData, blocks: int, compact: bool) -> Any:
    """``blocks`` step blocks in training order: block ``s`` = both sides of the pairs of step batch ``s``."""
    rows = []
    for s in range(blocks):
        _, _, pairs = data.batch(s)
        rows += [_row(pair, side, s, compact) for pair in pairs for side in SIDES]
    return Dataset.from_list(rows)


# ----------------------------------------------------------------------------------------------------------------
# Rewards: the EG-RL reward functions behind TRL's reward-function interface
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class StepClock:
    """Timestamps of the current RL step, shared by the reward functions and the logging callback."""

    step_begin: float = 0.0
    reward_begin: float = 0.0
    reward_end: float = 0.0
    record: dict[str, Any] = field(default_factory=dict)  # the step's reward metrics, written at the next log


class TRLRewards:
    """Format, process and outcome rewards as three TRL reward functions over one process's generation batch.

    Each call checks the batch (whole pairs, ``G`` rollouts per (pair, side), one step block, one dataset) and turns
    the ``item`` column back into Items. After the last component, the step's record (components, totals, per-side
    terms, lengths, timings) is stored on ``clock`` and a sample table is written every ``sample_every`` steps.
    """

    def __init__(
        self, funcs: Sequence[Callable[..., list[float | None]]], reward_cfg: RewardConfig, G: int,
        embed: Timed, discriminator: Timed, clock: StepClock, eos_ids: Sequence[int], out: Path,
        sample_every: int, steps_per_rl_step: int, scale: bool = True, screen: PromptScreen | None = None,
    ) -> None:  # fmt: skip
        self.funcs, self.reward_cfg, self.G = list(funcs), reward_cfg, G
        self.embed, self.discriminator, self.clock = embed, discriminator, clock
        self.eos_ids, self.out, self.sample_every = set(eos_ids), out, sample_every
        self.steps_per_rl_step, self.scale = steps_per_rl_step, scale
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
        components = {n: v for n, v in self.components.items() if n == "format" or self.reward_cfg.weights[n] != 0}
        totals = total_reward(components, self.reward_cfg)
        keys = rollout_keys(columns["pair_id"], columns["side"])
        rewards = torch.tensor([math.nan if r is None else r for r in totals], dtype=torch.float32)  # [N]
        adv = group_advantages(rewards, [k[:2] for k in keys], scale=self.scale, eps=TRL_ADV_EPS)  # [N] as TRL
        batch = self._rollout_batch(completions, columns, keys)
        step = columns["trainer_state"].global_step // self.steps_per_rl_step + 1
        record: dict[str, Any] = {
            "step": step, "dataset": columns["dataset"][0], "pairs": len({k.pair_id for k in keys}),
            "prompts": len({k[:2] for k in keys}), "trajectories": len(keys),
            "data/dropped_prompt_tokens": self.dropped.get(columns["dataset"][0], 0),
        }  # fmt: skip
        record.update(step_metrics(batch, components, totals, rewards, self.funcs))
        record.update({
            "time/generation": clock.reward_begin - clock.step_begin,
            "time/reward_embedder": self.embed.seconds,
            "time/reward_discriminator": self.discriminator.seconds,
            "time/reward_other": clock.reward_end - clock.reward_begin - self.embed.seconds
            - self.discriminator.seconds,
        })  # fmt: skip
        clock.record = record
        if self.sample_every and step % self.sample_every == 0:
            table = sample_table(batch, components, totals, adv)
            with (self.out / SAMPLES_FILE).open("a") as fh:
                fh.write(f"## step {step} ({record['dataset']})\n\n{table}\n\n")

    def _rollout_batch(self, completions: Sequence[Any], columns: dict[str, Any], keys: list) -> RolloutBatch:
        """The step's rollouts in the shape the shared metric and sample-table functions read."""
        ids = [list(x) for x in columns["completion_ids"]]
        width = max((len(x) for x in ids), default=0)
        tokens = torch.zeros((len(ids), width), dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        truncated = torch.tensor([not row or row[-1] not in self.eos_ids for row in ids])
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return RolloutBatch(0, columns["dataset"][0], [], keys, [], list(columns["item"]), tokens, mask, texts,
                            truncated)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The run
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


class EGRLLogger(TrainerCallback):
    """Stamps the start of each RL step, writes its metrics line when TRL logs (once per RL step), and gives every
    TRL checkpoint the policy's ``embedrl_reasoner.json`` (``on_checkpoint(path)``)."""

    def __init__(
        self, clock: StepClock, out: Path, total: int, steps_per_rl_step: int, on_checkpoint: Callable[[Path], None]
    ) -> None:
        self.clock, self.out, self.total, self.steps_per_rl_step = clock, out, total, steps_per_rl_step
        self.on_checkpoint = on_checkpoint

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.steps_per_rl_step == 0:
            self.clock.step_begin = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        clock = self.clock
        if not logs or "loss" not in logs or not clock.record:
            return
        record = dict(clock.record)
        record["time/update"] = time.perf_counter() - clock.reward_end
        record["time/step"] = time.perf_counter() - clock.step_begin
        record.update({f"trl/{k}": v for k, v in logs.items() if isinstance(v, int | float)})
        with (self.out / METRICS_FILE).open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        logger.info(step_line(record["step"], self.total, record["dataset"], record))
        clock.record = {}

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if path.is_dir():
            self.on_checkpoint(path)


def train_rl_trl(cfg: GRPOTrainConfig, models: RLModels | None = None) -> Path:
    """Run EG-RL with TRL's ``GRPOTrainer`` and return the directory of the trained Reasoner (``out/final``)."""
    out = Path(cfg.out)
    resume = check_rl_run_dir(cfg)
    save_config(cfg, out)
    reward_cfg = cfg.reward_config()
    (out / "reward_config.json").write_text(json.dumps(reward_cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    logger.info("EG-RL reward config (resolved): %s", reward_cfg.to_dict())
    G, geometry = cfg.group_size, rl_step_geometry(cfg)
    k = geometry.optimizer_steps(cfg.ppo_epochs)
    processes = PartialState().num_processes

    models = models or load_models(cfg, reference=False, lora=False)
    policy = models.policy
    policy.processor.image_processor.size = policy.adapter.image_size(policy.budget)  # the checkpoint's budget
    pairs = read_pairs(cfg.data)
    screen = screen_prompts(pairs, policy, cfg.max_prompt_tokens)  # dropped before batching: every step keeps B
    screen.log()
    data = RLData(screen.kept(pairs), cfg.pairs_per_step, cfg.seed)
    total = cfg.max_steps or cfg.epochs * data.steps_per_epoch // processes
    dataset = build_trl_dataset(data, total * processes, policy.compact_prompts)
    logger.info(
        "EG-RL (TRL GRPOTrainer): %d steps x %d process(es); per step and process %d pairs of one dataset -> %d "
        "prompts -> %d trajectories (G=%d), %d optimiser step(s)", total, processes, cfg.pairs_per_step,
        2 * cfg.pairs_per_step, geometry.trajectories, G, k,
    )  # fmt: skip

    clock = StepClock()
    embed, discriminator = Timed(reward_embedder(cfg, models)), Timed(models.discriminator)
    funcs, weights = build_reward_funcs(reward_cfg, embed, discriminator, num_generations=G, seed=cfg.seed)
    eos_ids, _ = stop_token_ids(policy.model, policy.processor)
    rewards = TRLRewards(funcs, reward_cfg, G, embed, discriminator, clock, eos_ids, out, cfg.sample_table_every, k,
                         cfg.scale_advantages, screen)  # fmt: skip
    policy.model.requires_grad_(True)
    _check_disjoint(models, [p for p in policy.model.parameters()])

    vllm = {"use_vllm": cfg.use_vllm, "vllm_mode": cfg.vllm_mode}
    if cfg.vllm_server_base_url:
        vllm["vllm_server_base_url"] = cfg.vllm_server_base_url
    args = GRPOConfig(
        output_dir=str(out / "checkpoints"),
        use_cpu=cfg.device == "cpu",
        bf16=cfg.dtype == "bfloat16",
        seed=cfg.seed,
        per_device_train_batch_size=geometry.micro,
        gradient_accumulation_steps=geometry.accumulation,
        steps_per_generation=geometry.steps_per_generation,
        shuffle_dataset=False,  # the dataset is already in step order (one block = one generation batch)
        num_generations=G,
        num_iterations=cfg.ppo_epochs,
        max_steps=total * k,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm > 0 else 1e9,
        epsilon=cfg.clip_eps,
        beta=cfg.beta,
        loss_type="dapo",  # token mean over the mini-batch (docs/method.md §4.2)
        scale_rewards="group" if cfg.scale_advantages else "none",
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0,
        max_completion_length=cfg.max_new_tokens,
        reward_weights=weights,
        gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=k,
        save_steps=cfg.save_every * k,
        save_strategy="steps",
        report_to=[],
        disable_tqdm=False,
        **vllm,
    )
    trainer = GRPOTrainer(
        model=policy.model,
        reward_funcs=rewards.reward_funcs(),
        args=args,
        train_dataset=dataset,
        processing_class=mixed_batch_processor(policy.processor),
        peft_config=lora_config(policy.model, cfg.lora) if cfg.lora else None,
        callbacks=[EGRLLogger(clock, out, total, k, lambda path: write_policy_settings(path, policy, cfg))],
    )
    last = get_last_checkpoint(args.output_dir) if resume and Path(args.output_dir).is_dir() else None
    if last:
        logger.info("resuming from %s", last)
    if PartialState().is_main_process:  # the RL steps after the checkpoint are logged again
        done = int(Path(last).name.rsplit("-", 1)[1]) // k if last else 0
        truncate_metrics(out / METRICS_FILE, done)
        truncate_samples(out / SAMPLES_FILE, done)
    hook = policy.model.get_submodule("model").register_forward_pre_hook(_drop_empty_images, with_kwargs=True)
    try:
        trainer.train(resume_from_checkpoint=last)
    finally:
        hook.remove()

    final = out / FINAL_DIR
    model = trainer.model
    merged = model.merge_and_unload() if cfg.lora else model
    merged.eval()
    trained_reasoner(merged, policy, cfg).save(final)
    save_config(cfg, final, filename="train_config.json")
    (final / RL_META_FILE).write_text(json.dumps(_meta(cfg, reward_cfg, total), indent=2) + "\n")
    return final
