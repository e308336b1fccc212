"""EG-RL (docs/method.md §4): GRPO on the Reasoner, rewarded by the frozen Embedder and a frozen Discriminator.

``train_rl(cfg)`` runs our own small GRPO loop (``engine: native``; docs/rl.md compares the engines). It reads top to
bottom: build (data, models, optimiser) → resume → per step:

1. **batch**: ``B`` whole pairs of ONE dataset (:func:`step_batches`: shuffle each dataset's pairs, cut into
   batches of ``B`` with drop-last, shuffle the batch order; seed + epoch), each pair prompted on both sides with
   its family prompt; a pair whose prompt overflows ``max_prompt_tokens`` on either side is dropped on both (both
   prompts of every pair are measured once at start-up, :func:`screen_prompts`, which logs per dataset how many
   pairs the limit drops; each step's record carries the count of its dataset as ``data/dropped_prompt_tokens``);
2. **rollouts**: ``G`` samples per (pair, side) prompt with HF ``generate`` (:func:`generate_rollouts`), every
   trajectory keyed ``(pair_id, side, rollout)``;
3. **rewards**: format, process (Discriminator) and outcome (Embedder) over the whole step batch
   (:func:`embedrl.rewards.terms.build_reward_funcs`), total per docs/method.md §4.8, advantages per (pair, side) group
   (:func:`embedrl.train.grpo_math.group_advantages`);
4. **update**: ``ppo_epochs`` passes of clipped GRPO with the k3 KL to the initial policy
   (:func:`embedrl.train.grpo_math.grpo_loss`), AdamW, gradient clipping (:func:`update_policy`);
5. **log** (``metrics.jsonl``, a sample table every ``sample_table_every`` steps) and **save** every ``save_every``.

Both sides are policies: query-side and target-side rollouts of every pair get GRPO updates. The Embedder embeds
each rollout as ``item.with_tcot(text)`` in mode ``full`` (pixels, crops and key frames through the one builder);
a failure raises, never a zero vector.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel

from embedrl import prompts as P
from embedrl.backbones import write_reasoner_settings
from embedrl.config import GRPOTrainConfig, RewardConfig, check_run_dir, save_config, truncate_metrics
from embedrl.data.schema import Item, Pair, read_pairs
from embedrl.models.embedder import Embedder
from embedrl.models.generation import generate_completions, stop_token_ids, vision_token_ids
from embedrl.models.loading import load_embedder, load_reasoner, torch_dtype
from embedrl.models.reasoner import Decoding, Reasoner, ReasonerPrompt, build_reasoner_prompt
from embedrl.rewards.judges import (
    ENDPOINT_TOKEN_ENV,
    ChatDiscriminator,
    EmbedderReward,
    EndpointDiscriminator,
    EndpointEmbedderReward,
)
from embedrl.rewards.terms import (
    EmbedFn,
    RolloutKey,
    build_reward_funcs,
    check_groups,
    derive_seed,
    total_reward,
)
from embedrl.tcot import parse_tcot
from embedrl.train.embedder import (
    CHECKPOINT_DIR,
    latest_checkpoint,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
)
from embedrl.train.grpo_math import group_advantages, group_stats, grpo_loss

__all__ = [
    "METRICS_FILE",
    "RL_META_FILE",
    "SAMPLES_FILE",
    "PromptScreen",
    "RLData",
    "RLModels",
    "RolloutBatch",
    "Timed",
    "check_rl_run_dir",
    "check_step_batch",
    "completion_logprobs",
    "generate_rollouts",
    "load_models",
    "lora_config",
    "pair_prompts",
    "reward_columns",
    "reward_embedder",
    "rollout_decoding",
    "sample_table",
    "score_rollouts",
    "screen_prompts",
    "step_batches",
    "step_metrics",
    "train_rl",
    "trained_reasoner",
    "truncate_samples",
    "update_policy",
    "write_policy_settings",
]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.md"
FINAL_DIR = "final"
RL_META_FILE = "embedrl_rl.json"  # in final/ and every checkpoint: Embedder id, resolved reward config, step
# Keys a resume may change: the LR is constant and each step's batch is a pure function of (seed, step), so a run
# can be extended (more steps or epochs) or its sample tables thinned without changing what the steps compute.
RL_RESUME_FREE_KEYS = ("max_steps", "epochs", "sample_table_every")
COMPONENTS = ("format", "process", "outcome")  # the order of build_reward_funcs' (funcs, weights)
SIDES = ("query", "target")
SAMPLE_TABLE_ROWS = 16
SAMPLE_TEXT_CHARS = 160
SCREEN_BATCH_SIZE = 8  # prompts per processor call when measuring prompt lengths at start-up

StepCallback = Callable[[int, dict[str, Any], "RolloutBatch"], None]


# ----------------------------------------------------------------------------------------------------------------
# Data: same-dataset step batches of whole pairs (docs/method.md §4.1)
# ----------------------------------------------------------------------------------------------------------------


def step_batches(sizes: Mapping[str, int], pairs_per_step: int, seed: int, epoch: int) -> list[tuple[str, list[int]]]:
    """One epoch's step batches ``[(dataset, pair indices)]``, each ``pairs_per_step`` pairs of one dataset.

    Each dataset's indices are shuffled and cut into batches with drop-last; the batch order is shuffled across
    datasets. A pure function of ``(seed + epoch)``, so a resumed run replays the same batches.

    >>> step_batches({"a": 5, "b": 2}, 2, seed=0, epoch=0)  # doctest: +SKIP
    [('a', [3, 0]), ('b', [1, 0]), ('a', [4, 2])]
    """
    rng = np.random.default_rng(seed + epoch)
    batches = []
    for name in sorted(sizes):
        order = rng.permutation(sizes[name]).tolist()
        batches += [
            (name, order[i : i + pairs_per_step]) for i in range(0, len(order) - pairs_per_step + 1, pairs_per_step)
        ]
    return [batches[i] for i in rng.permutation(len(batches))]


class RLData:
    """The RL pairs grouped by dataset, and the step batches of every epoch (computed on demand)."""

    def __init__(self, pairs: Sequence[Pair], pairs_per_step: int, seed: int) -> None:
        by_dataset: dict[str, list[Pair]] = defaultdict(list)
        for pair in pairs:
            by_dataset[pair.dataset].append(pair)
        self.datasets = {name: by_dataset[name] for name in sorted(by_dataset)}
        self.pairs_per_step, self.seed = pairs_per_step, seed
        small = sorted(name for name, ps in self.datasets.items() if len(ps) < pairs_per_step)
        if small:
            logger.warning("datasets %s have fewer than B=%d pairs and are never used", small, pairs_per_step)
        self.steps_per_epoch = sum(len(ps) // pairs_per_step for ps in self.datasets.values())
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"no dataset has pairs_per_step={pairs_per_step} pairs (sizes "
                f"{ {n: len(p) for n, p in self.datasets.items()} }); lower pairs_per_step"
            )
        self._epoch: tuple[int, list[tuple[str, list[int]]]] | None = None

    @classmethod
    def from_jsonl(cls, path: str | Path, pairs_per_step: int, seed: int) -> RLData:
        pairs = read_pairs(path)
        if not pairs:
            raise ValueError(f"{path} holds no pairs")
        return cls(pairs, pairs_per_step, seed)

    def batch(self, index: int) -> tuple[int, str, list[Pair]]:
        """``(epoch, dataset, pairs)`` of the 0-based step ``index``."""
        epoch, k = divmod(index, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            sizes = {name: len(ps) for name, ps in self.datasets.items()}
            self._epoch = (epoch, step_batches(sizes, self.pairs_per_step, self.seed, epoch))
        name, indices = self._epoch[1][k]
        return epoch, name, [self.datasets[name][i] for i in indices]


# ----------------------------------------------------------------------------------------------------------------
# Models: the policy, the frozen reference, Embedder and Discriminator
# ----------------------------------------------------------------------------------------------------------------


class Timed:
    """A callable that adds the seconds spent in ``fn`` to ``seconds`` (reset by the loop every step)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def reward_embedder(cfg: GRPOTrainConfig, models: RLModels) -> EmbedFn:
    """The rollout embedder of the rewards: the in-process frozen Embedder, or the ``embedder_url`` endpoint."""
    if cfg.embedder_url:
        token = os.environ.get(ENDPOINT_TOKEN_ENV, "")
        return EndpointEmbedderReward(cfg.embedder_url, cfg.embedder, cfg.embed_batch_size, token=token)
    if models.embedder is None:
        raise ValueError("no Embedder: set embedder (a directory) or embedder_url")
    return EmbedderReward(models.embedder, cfg.embed_batch_size)


@dataclass
class RLModels:
    """Everything ``train_rl`` runs: the trainable policy and the frozen models (no shared parameters)."""

    policy: Reasoner  # trainable; its model is a peft model when cfg.lora > 0
    reference: PreTrainedModel | None  # frozen initial policy for the KL; None when beta = 0 or with LoRA
    embedder: Embedder | None  # frozen reward model (None: an embedder_url endpoint)
    discriminator: Callable[[list[str]], list[str]]  # prompts -> replies
    discriminator_model: PreTrainedModel | None  # the Discriminator's weights when in-process

    def frozen_modules(self) -> list[torch.nn.Module]:
        embedder = self.embedder.model if self.embedder is not None else None
        return [m for m in (self.reference, embedder, self.discriminator_model) if m is not None]


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    return model.eval()


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_config(model: PreTrainedModel, rank: int) -> LoraConfig:
    """LoRA rank ``rank`` (alpha 2r, no dropout) on the language model's attention and MLP projections, never on the
    vision tower (a ``peft.LoraConfig``; both GRPO engines use it)."""
    vision = {id(m) for m in model.get_submodule("model.visual").modules()}
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and id(module) not in vision and name.rsplit(".", 1)[-1] in LORA_TARGETS
    ]  # fmt: skip
    if not names:
        raise ValueError(f"no language-model Linear layer is named one of {list(LORA_TARGETS)}")
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=names)


def _add_lora(model: PreTrainedModel, rank: int) -> torch.nn.Module:
    return get_peft_model(model, lora_config(model, rank))


def _no_discriminator(prompts: list[str]) -> list[str]:
    raise RuntimeError(
        "the Discriminator was not loaded because w_process is 0; a process reward was asked for "
        f"{len(prompts)} prompt(s) anyway"
    )


def load_models(cfg: GRPOTrainConfig, *, reference: bool = True, lora: bool = True) -> RLModels:
    """Load the policy (``cfg.reasoner``), the frozen reference (beta > 0), Embedder and Discriminator (not when
    ``w_process`` is 0: the process term is then never computed).

    ``reference=False`` / ``lora=False`` leave the reference model and the LoRA adapters to the caller (TRL's
    ``GRPOTrainer`` builds its own from ``peft_config`` and the policy's checkpoint path).
    """
    if cfg.use_vllm and importlib.util.find_spec("vllm") is None:
        raise ImportError(
            "use_vllm=true needs vLLM: pip install 'embedrl[gpu]' on a GPU machine, or set use_vllm: false"
        )
    dtype = torch_dtype(cfg.dtype)
    policy = load_reasoner(cfg.reasoner, dtype=dtype, device=cfg.device, compact_prompts=cfg.compact_prompts)
    context = policy.model.config.get_text_config().max_position_embeddings
    if cfg.max_prompt_tokens + cfg.max_new_tokens > context:
        raise ValueError(
            f"max_prompt_tokens + max_new_tokens = {cfg.max_prompt_tokens + cfg.max_new_tokens} exceeds the "
            f"policy's context of {context} tokens (docs/method.md §8 item 19); lower one of them"
        )
    ref_model = None
    if reference and cfg.beta > 0 and not cfg.lora:  # with LoRA the reference is the policy without its adapters
        ref_model = _freeze(load_reasoner(cfg.reasoner, dtype=dtype, device=cfg.device).model)
    if lora and cfg.lora:
        policy.model = _add_lora(policy.model, cfg.lora)
    if not cfg.lora:
        policy.model.requires_grad_(True)  # full fine-tuning (load_backbone returns the model in eval mode)
    if cfg.gradient_checkpointing:
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    embedder = None
    if not cfg.embedder_url:
        embedder = load_embedder(cfg.embedder, layout=cfg.layout, dtype=dtype, device=cfg.device)
        _freeze(embedder.model)
    if cfg.reward_config().w_process == 0:  # the process term is not computed: no Discriminator to load or call
        return RLModels(policy, ref_model, embedder, _no_discriminator, None)
    if cfg.discriminator_url:
        endpoint = EndpointDiscriminator(
            cfg.discriminator_url,
            cfg.discriminator,
            cfg.discriminator_max_new_tokens,
            cfg.discriminator_batch_size,
            token=os.environ.get(ENDPOINT_TOKEN_ENV, ""),
        )
        return RLModels(policy, ref_model, embedder, endpoint, None)
    disc = load_reasoner(cfg.discriminator or cfg.reasoner, dtype=dtype, device=cfg.device)
    _freeze(disc.model)
    discriminator = ChatDiscriminator(disc, cfg.discriminator_max_new_tokens, cfg.discriminator_batch_size)
    return RLModels(policy, ref_model, embedder, discriminator, disc.model)


# ----------------------------------------------------------------------------------------------------------------
# Rollouts
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RolloutBatch:
    """One step's ``N = 2·B·G`` trajectories in generation order; row ``i`` is ``keys[i]`` (docs/method.md §4.10)."""

    step: int
    dataset: str
    pairs: list[Pair]
    keys: list[RolloutKey]  # [N]
    prompts: list[ReasonerPrompt]  # [N] the (pair, side) prompt of each trajectory
    items: list[Item]  # [N] the side's item (without T-CoT)
    completion_ids: Tensor  # [N, T] response tokens, right-padded
    completion_mask: Tensor  # [N, T] 1 on response tokens through the first EOS
    texts: list[str]  # [N] decoded responses (the T-CoTs)
    truncated: Tensor  # [N] bool: no EOS within max_new_tokens
    dropped_pairs: list[str] = field(default_factory=list)  # pairs dropped for an overlong prompt (both sides)


def check_step_batch(batch: RolloutBatch, num_generations: int) -> None:
    """Every pair is whole (both sides, ``G`` rollouts each) and every pair comes from the step's one dataset."""
    check_groups(batch.keys, num_generations)
    datasets = {p.dataset for p in batch.pairs}
    if datasets != {batch.dataset}:
        raise ValueError(f"step {batch.step} mixes datasets {sorted(datasets)}; a step holds one dataset (§4.1)")
    ids = {p.pair_id for p in batch.pairs}
    if len(ids) != len(batch.pairs) or ids != {k.pair_id for k in batch.keys}:
        raise ValueError(f"step {batch.step}: rollouts and pairs disagree (duplicate pair ids in {batch.dataset}?)")


def pair_prompts(pair: Pair, compact: bool) -> list[tuple[str, ReasonerPrompt, Item]]:
    """``[(side, prompt, item)]`` for the query side then the target side; target prompts never see the query."""
    return [
        ("query", build_reasoner_prompt(pair.query, "query", pair.target.modality, compact=compact), pair.query),
        ("target", build_reasoner_prompt(pair.target, "target", compact=compact), pair.target),
    ]


@dataclass(frozen=True)
class PromptScreen:
    """Which RL pairs fit ``max_prompt_tokens`` on both sides (docs/method.md §8 item 19), counted per dataset.

    Attributes:
        limit: the ``max_prompt_tokens`` the pairs were measured against.
        totals: dataset -> pairs read.
        dropped: dataset -> pairs whose query or target prompt is longer than ``limit`` (0 for a dataset without).
        overlong: ``(dataset, pair_id)`` of every dropped pair.
    """

    limit: int
    totals: dict[str, int]
    dropped: dict[str, int]
    overlong: frozenset[tuple[str, str]]

    def fits(self, pair: Pair) -> bool:
        return (pair.dataset, pair.pair_id) not in self.overlong

    def kept(self, pairs: Sequence[Pair]) -> list[Pair]:
        """``pairs`` without the dropped ones, in order."""
        return [p for p in pairs if self.fits(p)]

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    def log(self) -> None:
        """One line per dataset: ``dropped N of M pairs of <dataset>: prompt > max_prompt_tokens (<limit>)`` (a
        warning when N > 0)."""
        for name in sorted(self.totals):
            n = self.dropped[name]
            logger.log(logging.WARNING if n else logging.INFO,
                       "dropped %d of %d pairs of %s: prompt > max_prompt_tokens (%d)", n, self.totals[name], name,
                       self.limit)  # fmt: skip


def prompt_lengths(
    policy: Reasoner, prompts: Sequence[ReasonerPrompt], batch_size: int = SCREEN_BATCH_SIZE
) -> list[int]:
    """Tokens of each prompt as the policy sees it (chat template, generation prompt, visual tokens), in order."""
    lengths: list[int] = []
    for start in range(0, len(prompts), batch_size):
        mask = policy.chat_inputs(prompts[start : start + batch_size])["attention_mask"]  # [b, T], left-padded
        lengths += [int(n) for n in mask.sum(1).tolist()]
    return lengths


def screen_prompts(pairs: Sequence[Pair], policy: Reasoner, max_prompt_tokens: int) -> PromptScreen:
    """Measure both prompts of every pair once and count, per dataset, the pairs ``max_prompt_tokens`` drops.

    A video pair's prompt holds every frame's visual tokens (8 frames of up to 300 tokens each in the paper's
    setting), so a limit that is too small silently removes most video data; the screen makes that visible at
    start-up (:meth:`PromptScreen.log`) and in every step's ``data/dropped_prompt_tokens``.
    """
    flat = [pr for p in pairs for _, pr, _ in pair_prompts(p, policy.compact_prompts)]
    lengths = prompt_lengths(policy, flat)  # [2 * len(pairs)]: query then target of each pair
    totals: dict[str, int] = defaultdict(int)
    dropped: dict[str, int] = defaultdict(int)
    overlong: set[tuple[str, str]] = set()
    for i, pair in enumerate(pairs):
        totals[pair.dataset] += 1
        if max(lengths[2 * i], lengths[2 * i + 1]) > max_prompt_tokens:
            dropped[pair.dataset] += 1
            overlong.add((pair.dataset, pair.pair_id))
    return PromptScreen(max_prompt_tokens, dict(totals), {n: dropped[n] for n in totals}, frozenset(overlong))


def generate_rollouts(
    policy: Reasoner,
    step: int,
    dataset: str,
    pairs: Sequence[Pair],
    cfg: GRPOTrainConfig,
    screen: PromptScreen | None = None,
) -> RolloutBatch:
    """``G`` sampled responses per (pair, side) prompt; overlong pairs are dropped on both sides first.

    ``screen``: the start-up measurement of the pairs (:func:`screen_prompts`); without it the step's prompts are
    measured here. Sampling is seeded from ``(seed, step)``, so a resumed run draws the same rollouts from the same
    weights.
    """
    G = cfg.group_size
    prompts = {p.pair_id: pair_prompts(p, policy.compact_prompts) for p in pairs}
    if screen is not None and screen.limit == cfg.max_prompt_tokens:
        over = {p.pair_id for p in pairs if not screen.fits(p)}
    else:
        flat = [pr for p in pairs for _, pr, _ in prompts[p.pair_id]]
        lengths = prompt_lengths(policy, flat)  # [2B], query then target per pair
        over = {pairs[i // 2].pair_id for i, n in enumerate(lengths) if n > cfg.max_prompt_tokens}
    kept = [p for p in pairs if p.pair_id not in over]
    eos_ids, pad_id = stop_token_ids(policy.model, policy.processor)
    gen = GenerationConfig(
        do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens,
        num_return_sequences=G, eos_token_id=eos_ids, pad_token_id=pad_id,
        suppress_tokens=vision_token_ids(policy.processor) or None,
    )  # fmt: skip
    rows = [(p, side, pr, item) for p in kept for side, pr, item in prompts[p.pair_id]]
    chunk = cfg.generation_batch_size or max(1, len(rows))
    torch.manual_seed(derive_seed(cfg.seed, "rollouts", step))  # once per step: the chunks draw in sequence
    keys, row_prompts, items, responses, texts, truncated = [], [], [], [], [], []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        inputs = policy.chat_inputs([pr for _, _, pr, _ in part])
        out = generate_completions(policy.model, policy.processor, inputs, gen)  # rows: prompt 0 × G, prompt 1 × G, …
        for pair, side, pr, item in part:
            keys += [RolloutKey(pair.pair_id, side, g) for g in range(G)]
            row_prompts += [pr] * G
            items += [item] * G
        responses += out.tokens
        texts += out.texts  # the T-CoTs the rewards read
        truncated += out.truncated
    width = max((len(t) for t in responses), default=0)
    ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(responses), width), dtype=torch.long)
    for i, tokens in enumerate(responses):
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[i, : len(tokens)] = 1
    batch = RolloutBatch(step, dataset, kept, keys, row_prompts, items, ids, mask, texts, torch.tensor(truncated),
                         sorted(over))  # fmt: skip
    if kept:
        check_step_batch(batch, G)
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------------------------


def reward_columns(batch: RolloutBatch, step: int) -> dict[str, Any]:
    """The TRL-style columns of the batch, one value per trajectory (docs/rewards.md §1)."""
    return {
        "pair_id": [k.pair_id for k in batch.keys],
        "side": [k.side for k in batch.keys],
        "rollout": [k.rollout for k in batch.keys],
        "cue_key": [pr.family.cue_key if pr.family else None for pr in batch.prompts],
        "n_frames": [pr.n_frames or None for pr in batch.prompts],
        "input_text": [P.join_task_text(it.instruction, it.text) for it in batch.items],
        "item": list(batch.items),
        "trainer_state": SimpleNamespace(global_step=step),  # seeds the Discriminator's candidate shuffles
    }


def score_rollouts(
    funcs: Sequence[Callable[..., list[float | None]]], reward_cfg: RewardConfig, batch: RolloutBatch
) -> tuple[dict[str, list[float | None]], list[float | None]]:
    """``(components, totals)``: each reward over the whole batch (a zero-weight term other than format is
    skipped) and the total per docs/method.md §4.8, in trajectory order."""
    columns = reward_columns(batch, batch.step)
    prompts_text = [""] * len(batch.keys)  # the rewards read the columns, not the prompt text
    components: dict[str, list[float | None]] = {}
    for name, fn in zip(COMPONENTS, funcs, strict=True):
        if name != "format" and reward_cfg.weights[name] == 0:
            continue
        components[name] = fn(prompts=prompts_text, completions=batch.texts, **columns)
    return components, total_reward(components, reward_cfg)


# ----------------------------------------------------------------------------------------------------------------
# Policy log-probs and the update
# ----------------------------------------------------------------------------------------------------------------


def completion_logprobs(
    model: torch.nn.Module,
    policy: Reasoner,
    prompts: Sequence[ReasonerPrompt],
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """``(logp [n, T], entropy [n, T])`` of each response token under ``model`` (the policy or the reference).

    The prompts go through the Reasoner's processor again (pixels included); the response ids are appended as
    generated (never re-tokenised). Logits are divided by the sampling temperature; entropy is detached.
    """
    inputs = policy.chat_inputs(prompts)
    device = inputs["input_ids"].device
    ids, mask = completion_ids.to(device), completion_mask.to(device)  # [n, T]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in extra:  # response tokens are text (type 0)
        extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(ids)], dim=1)
    T = ids.shape[1]
    out = model(
        input_ids=torch.cat([inputs["input_ids"], ids], dim=1),
        attention_mask=torch.cat([inputs["attention_mask"], mask], dim=1),
        logits_to_keep=T + 1,
        use_cache=False,
        **extra,
    )
    logits = out.logits[:, :-1].float() / temperature  # [n, T, V]: position t predicts response token t
    lse = logits.logsumexp(-1)  # [n, T]
    logp = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse  # [n, T]
    with torch.no_grad():  # H = logsumexp − Σ p·logit, one row at a time to bound the extra memory
        entropy = torch.stack([lse[i] - (logits[i].softmax(-1) * logits[i]).sum(-1) for i in range(len(ids))])
    return logp, entropy


def _chunks(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]


def _reference_logp(models: RLModels, prompts: list[ReasonerPrompt], ids: Tensor, mask: Tensor, temp: float) -> Tensor:
    if models.reference is not None:
        return completion_logprobs(models.reference, models.policy, prompts, ids, mask, temp)[0]
    with models.policy.model.disable_adapter():  # LoRA: the initial policy is the base model without adapters
        return completion_logprobs(models.policy.model, models.policy, prompts, ids, mask, temp)[0]


def _micro_view(batch: RolloutBatch, rows: list[int]) -> tuple[list[ReasonerPrompt], Tensor, Tensor]:
    """The prompts, response ids [n, T'] and mask [n, T'] of ``rows``, cut to their longest response."""
    width = int(batch.completion_mask[rows].sum(1).max())
    return [batch.prompts[i] for i in rows], batch.completion_ids[rows, :width], batch.completion_mask[rows, :width]


@torch.no_grad()
def _fixed_logprobs(
    models: RLModels, batch: RolloutBatch, rows: list[int], cfg: GRPOTrainConfig, old: bool
) -> dict[int, tuple[Tensor | None, Tensor | None]]:
    """``{row: (old_logp [T_row] or None, ref_logp [T_row] or None)}``, computed before any update (on CPU)."""
    fixed = {}
    for chunk in _chunks(rows, cfg.micro_batch_size):
        prompts, ids, m = _micro_view(batch, chunk)
        old_lp = (
            completion_logprobs(models.policy.model, models.policy, prompts, ids, m, cfg.temperature)[0]
            if old
            else None
        )
        ref_lp = _reference_logp(models, prompts, ids, m, cfg.temperature) if cfg.beta > 0 else None
        for j, i in enumerate(chunk):
            fixed[i] = (None if old_lp is None else old_lp[j].cpu(), None if ref_lp is None else ref_lp[j].cpu())
    return fixed


def _accumulate(
    models: RLModels, batch: RolloutBatch, rows: list[int], advantages: Tensor, fixed: Mapping[int, tuple],
    n_tokens: float, cfg: GRPOTrainConfig, sums: dict[str, float],
) -> None:  # fmt: skip
    """Forward and backward one micro-batch, its loss scaled to a share of the mini-batch's token-mean."""
    prompts, ids, m = _micro_view(batch, rows)
    logp, entropy = completion_logprobs(models.policy.model, models.policy, prompts, ids, m, cfg.temperature)
    dev, width = logp.device, logp.shape[1]  # logp: [n, T']

    def stack(which: int) -> Tensor:
        return torch.stack([fixed[i][which][:width] for i in rows]).to(dev)

    old = stack(0) if fixed and fixed[rows[0]][0] is not None else logp.detach()
    ref = stack(1) if cfg.beta > 0 else None
    m = m.to(dev)
    loss, stats = grpo_loss(logp, old, ref, advantages[rows].to(dev), m, cfg.clip_eps, cfg.beta)
    m_tokens = float(m.sum())
    (loss * (m_tokens / n_tokens)).backward()
    sums["tokens"] += m_tokens
    for key, value in stats.items():
        sums[key] += value.item() * m_tokens
    sums["entropy"] += float((entropy * m).sum())
    sums["loss"] += loss.item() * m_tokens / n_tokens


def update_policy(
    models: RLModels, batch: RolloutBatch, advantages: Tensor, optimizer: torch.optim.Optimizer, cfg: GRPOTrainConfig
) -> dict[str, float]:
    """``ppo_epochs`` passes of clipped GRPO over the batch in mini-batches, gradients accumulated over micro-batches.

    Token-mean over each mini-batch (docs/method.md §4.2). Rows with advantage 0 add nothing to the loss when beta = 0,
    so they are not forwarded, but their tokens still count in ``|T|`` (the result is the same); a mini-batch with
    no such row is skipped (no optimiser step). ``old_logp`` is the detached current log-prob when the update is a
    single on-policy pass, else it is computed before the first update. The reference log-probs come from the frozen
    initial policy (or the LoRA base).
    """
    n = len(batch.keys)
    active = [i for i in range(n) if cfg.beta > 0 or advantages[i] != 0]
    active_set = set(active)
    mini = cfg.mini_batch_size or n
    on_policy = cfg.ppo_epochs == 1 and mini >= n
    models.policy.model.train()
    fixed = _fixed_logprobs(models, batch, active, cfg, old=not on_policy) if not on_policy or cfg.beta > 0 else {}
    params = [p for p in models.policy.model.parameters() if p.requires_grad]
    sums: dict[str, float] = defaultdict(float)
    n_updates = 0
    order_rng = random.Random(derive_seed(cfg.seed, "minibatches", batch.step))
    for _ in range(cfg.ppo_epochs):
        order = list(range(n))
        if not on_policy:
            order_rng.shuffle(order)
        for mb in _chunks(order, mini):
            rows = [i for i in mb if i in active_set]
            if not rows:
                sums["skipped_updates"] += 1
                continue
            n_tokens = float(batch.completion_mask[mb].sum())
            for micro in _chunks(rows, cfg.micro_batch_size):
                _accumulate(models, batch, micro, advantages, fixed, n_tokens, cfg, sums)
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
            sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n_updates += 1
    tokens = sums.pop("tokens", 0.0)
    out = {f"grpo/{k}": sums[k] / tokens for k in ("clipfrac", "ratio", "pg_loss", "kl", "entropy") if k in sums}
    out.update({
        "grpo/loss": sums["loss"] / max(1, n_updates), "grpo/grad_norm": sums["grad_norm"] / max(1, n_updates),
        "grpo/optimizer_steps": float(n_updates), "grpo/skipped_updates": sums["skipped_updates"],
        "grpo/trajectories_forwarded": float(len(active)),
    })  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def _cell(text: str) -> str:
    text = text.replace("\n", "⏎").replace("|", "\\|")
    return text if len(text) <= SAMPLE_TEXT_CHARS else text[: SAMPLE_TEXT_CHARS - 1] + "…"


def sample_table(
    batch: RolloutBatch, components: Mapping[str, Sequence[float | None]], totals: Sequence[float | None], adv: Tensor
) -> str:
    """A Markdown table of sample T-CoTs with their rewards and advantages (the first rows in key order)."""

    def fmt(v: float | None) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    names = [c for c in COMPONENTS if c in components]
    head = ["pair", "side", "g", *names, "R", "A", "len", "T-CoT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(
        range(len(batch.keys)), key=lambda i: (batch.keys[i].pair_id, batch.keys[i].side, batch.keys[i].rollout)
    )
    for i in order[:SAMPLE_TABLE_ROWS]:
        k = batch.keys[i]
        cells = [_cell(k.pair_id), k.side, str(k.rollout), *(fmt(components[c][i]) for c in names), fmt(totals[i]),
                 f"{float(adv[i]):+.3f}", str(int(batch.completion_mask[i].sum())), _cell(batch.texts[i])]  # fmt: skip
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


def step_line(step: int, total: int, dataset: str, record: dict[str, Any]) -> str:
    """One progress line per RL step: the total reward, each logged component (a weight-0 term is not logged, so
    it is left out rather than shown as nan), the mean response length and the step time."""
    terms = ", ".join(f"{name} {record[f'reward/{name}']:.3f}" for name in COMPONENTS if f"reward/{name}" in record)
    return (
        f"step {step}/{total} {dataset}: reward {record.get('reward/total', math.nan):.3f} ({terms}), "
        f"len {record.get('completion/length', math.nan):.0f}, {record['time/step']:.1f}s"
    )


def step_metrics(
    batch: RolloutBatch,
    components: Mapping[str, Sequence[float | None]],
    totals: Sequence[float | None],
    rewards: Tensor,
    funcs: Sequence[Any],
) -> dict[str, float]:
    """Reward components (mean per side and overall), response lengths, Discriminator accuracy vs chance."""
    out: dict[str, float] = {}
    by_side = {s: [i for i, k in enumerate(batch.keys) if k.side == s] for s in SIDES}
    lengths = batch.completion_mask.sum(1).float()
    for name, values in [*components.items(), ("total", totals)]:
        valid = [float(v) for v in values if v is not None]
        out[f"reward/{name}"] = _mean(valid)
        for side, rows in by_side.items():
            out[f"reward/{name}/{side}"] = _mean([float(values[i]) for i in rows if values[i] is not None])
    out["reward/total/std"] = float(np.nanstd(rewards.numpy())) if len(rewards) else float("nan")
    out["reward/not_applicable"] = float(torch.isnan(rewards).sum())
    for side, rows in by_side.items():
        out[f"completion/length/{side}"] = float(lengths[rows].mean())
    out["completion/length"] = float(lengths.mean())
    out["completion/truncated_frac"] = float(batch.truncated.float().mean())
    out.update(evidence_metrics(batch, by_side))
    for fn in funcs[1:]:  # ProcessReward, OutcomeReward: their per-step stats (s+, s-, margin, Acc, accuracy, ...)
        out.update(getattr(fn, "last_stats", {}))
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


# ----------------------------------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------------------------------


def rollout_decoding(cfg: GRPOTrainConfig) -> Decoding:
    """The decoding the policy is trained with: its checkpoints record it as their default."""
    return Decoding(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)


def trained_reasoner(model: PreTrainedModel, policy: Reasoner, cfg: GRPOTrainConfig) -> Reasoner:
    """The trained (merged) policy as a Reasoner with its prompt style and rollout decoding, ready to save."""
    return Reasoner(model, policy.processor, compact_prompts=policy.compact_prompts, decoding=rollout_decoding(cfg))


def write_policy_settings(path: Path, policy: Reasoner, cfg: GRPOTrainConfig) -> None:
    """``embedrl_reasoner.json`` of a resumable RL checkpoint (the same settings ``final/`` gets)."""
    write_reasoner_settings(
        path, compact_prompts=policy.compact_prompts, decoding=dataclasses.asdict(rollout_decoding(cfg))
    )


def _meta(cfg: GRPOTrainConfig, reward_cfg: RewardConfig, step: int) -> dict[str, Any]:
    return {"step": step, "embedder": cfg.embedder, "reasoner_init": cfg.reasoner,
            "discriminator": cfg.discriminator or cfg.reasoner, "discriminator_url": cfg.discriminator_url,
            "num_generations": cfg.group_size, "pairs_per_step": cfg.pairs_per_step,
            "reward": reward_cfg.to_dict()}  # fmt: skip


def _check_disjoint(models: RLModels, params: Sequence[torch.nn.Parameter]) -> None:
    frozen = {id(p) for m in models.frozen_modules() for p in m.parameters()}
    if any(id(p) in frozen for p in params):
        raise ValueError("the policy shares parameters with a frozen model; load the Discriminator separately")


def check_rl_run_dir(cfg: GRPOTrainConfig) -> bool:
    """Both engines' check of ``cfg.out`` before anything is written there (:func:`~embedrl.config.check_run_dir`):
    True to resume the run in it; refuses a differing or unasked-for previous run unless ``cfg.overwrite``."""
    leftovers = (CHECKPOINT_DIR, METRICS_FILE, SAMPLES_FILE, FINAL_DIR, "reward_config.json")
    return check_run_dir(
        cfg, cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, leftovers=leftovers, free_keys=RL_RESUME_FREE_KEYS
    )


def truncate_samples(path: Path, step: int) -> None:
    """Keep only the sample tables of steps <= ``step`` in ``samples.md`` (a resumed run writes the later ones
    again). A missing file is left missing."""
    if not path.is_file():
        return
    sections = re.split(r"(?m)^(?=## step \d+ )", path.read_text())
    kept = [s for s in sections if not s.startswith("## step ") or int(s.split()[2]) <= step]
    path.write_text("".join(kept))


def train_rl(cfg: GRPOTrainConfig, models: RLModels | None = None, on_step: StepCallback | None = None) -> Path:
    """Run EG-RL and return the directory of the trained Reasoner (``out/final``).

    Args:
        cfg: the run's configuration.
        models: pre-loaded models (tests); default :func:`load_models`.
        on_step: ``on_step(step, record, batch)`` after every step (tests check batches, or interrupt a run).
    """
    out = Path(cfg.out)
    resume = check_rl_run_dir(cfg)
    save_config(cfg, out)
    remove_partial_checkpoints(out)
    reward_cfg = cfg.reward_config()
    (out / "reward_config.json").write_text(json.dumps(reward_cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    logger.info("EG-RL reward config (resolved): %s", reward_cfg.to_dict())
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    data = RLData.from_jsonl(cfg.data, cfg.pairs_per_step, cfg.seed)
    total = cfg.max_steps or cfg.epochs * data.steps_per_epoch
    models = models or load_models(cfg)
    # Measured once: the start-up log says per dataset how many pairs the limit drops (each step then drops its own).
    screen = screen_prompts([p for ps in data.datasets.values() for p in ps], models.policy, cfg.max_prompt_tokens)
    screen.log()
    G = cfg.group_size
    embed, discriminator = Timed(reward_embedder(cfg, models)), Timed(models.discriminator)
    funcs, _ = build_reward_funcs(reward_cfg, embed, discriminator, num_generations=G, seed=cfg.seed)
    params = [p for p in models.policy.model.parameters() if p.requires_grad]
    _check_disjoint(models, params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant LR (docs/method.md §4.3)
    logger.info(
        "EG-RL: %d steps; per step %d pairs of one dataset -> %d prompts -> %d trajectories (G=%d); %d datasets, "
        "%d steps per epoch", total, cfg.pairs_per_step, 2 * cfg.pairs_per_step, 2 * cfg.pairs_per_step * G, G,
        len(data.datasets), data.steps_per_epoch,
    )  # fmt: skip

    step = 0
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        step = load_checkpoint(ckpt, models.policy.model, optimizer, constant)
        logger.info("resumed from %s at step %d", ckpt, step)
    truncate_metrics(out / METRICS_FILE, step)  # the steps after the checkpoint are logged again
    truncate_samples(out / SAMPLES_FILE, step)

    with (out / METRICS_FILE).open("a") as metrics_file:
        while step < total:
            epoch, dataset, pairs = data.batch(step)
            step += 1
            embed.seconds = discriminator.seconds = 0.0
            t0 = time.perf_counter()
            batch = generate_rollouts(models.policy, step, dataset, pairs, cfg, screen)
            t1 = time.perf_counter()
            record: dict[str, Any] = {"step": step, "epoch": epoch, "dataset": dataset, "pairs": len(batch.pairs),
                                      "prompts": 2 * len(batch.pairs), "trajectories": len(batch.keys),
                                      "data/dropped_prompt_tokens": screen.dropped[dataset],
                                      "data/pairs_dropped_overlong": len(batch.dropped_pairs)}  # fmt: skip
            if len(batch.pairs) < 2:  # docs/method.md §4.4: no negatives; counted, not trained on
                logger.warning(
                    "step %d: %d pair(s) left after dropping overlong prompts; skipped", step, len(batch.pairs)
                )
                record["skipped"] = 1
                t2 = t3 = t1
                components: dict[str, list[float | None]] = {}
            else:
                components, totals = score_rollouts(funcs, reward_cfg, batch)
                rewards = torch.tensor([math.nan if r is None else r for r in totals], dtype=torch.float32)  # [N]
                adv = group_advantages(rewards, [k[:2] for k in batch.keys], scale=cfg.scale_advantages, eps=1e-6)
                t2 = time.perf_counter()
                record.update(step_metrics(batch, components, totals, rewards, funcs))
                record.update(update_policy(models, batch, adv, optimizer, cfg))
                t3 = time.perf_counter()
            record.update({
                "time/generation": t1 - t0, "time/reward_embedder": embed.seconds,
                "time/reward_discriminator": discriminator.seconds,
                "time/reward_other": (t2 - t1) - embed.seconds - discriminator.seconds,
                "time/update": t3 - t2, "time/step": t3 - t0,
            })  # fmt: skip
            if step % cfg.log_every == 0:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                logger.info(step_line(step, total, dataset, record))
            if components and cfg.sample_table_every and step % cfg.sample_table_every == 0:
                table = sample_table(batch, components, totals, adv)
                with (out / SAMPLES_FILE).open("a") as fh:
                    fh.write(f"## step {step} ({dataset})\n\n{table}\n\n")
                logger.info("sample T-CoTs at step %d:\n%s", step, table)
            if on_step is not None:  # before the checkpoint: a test that raises here loses this step, like a crash
                on_step(step, record, batch)
            if step % cfg.save_every == 0 or step == total:
                path = save_checkpoint(out, step, models.policy.model, optimizer, constant)
                (path / RL_META_FILE).write_text(json.dumps(_meta(cfg, reward_cfg, step), indent=2) + "\n")
                write_policy_settings(path, models.policy, cfg)

    final = out / FINAL_DIR
    model = models.policy.model
    merged = model.merge_and_unload() if cfg.lora else model
    merged.eval()
    trained_reasoner(merged, models.policy, cfg).save(final)
    save_config(cfg, final, filename="train_config.json")
    (final / RL_META_FILE).write_text(json.dumps(_meta(cfg, reward_cfg, step), indent=2) + "\n")
    return final
