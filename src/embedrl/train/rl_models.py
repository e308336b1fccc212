"""EG-RL's models (docs/method.md §4, docs/rl.md "Models"): the trainable policy, the frozen Embedder and the frozen
Discriminator, in-process or behind an endpoint, and the policy's checkpoint settings.

TRL's ``GRPOTrainer`` builds what remains: the LoRA adapters (from :func:`lora_config`) and, when ``beta > 0``,
the frozen reference (the initial checkpoint, or with LoRA the policy with its adapters disabled).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import PreTrainedModel

from embedrl.backbones import write_reasoner_settings
from embedrl.config import ConfigError, GRPOTrainConfig
from embedrl.models.embedder import Embedder
from embedrl.models.loading import load_embedder, load_reasoner, torch_dtype
from embedrl.models.reasoner import Decoding, Reasoner
from embedrl.rewards.judges import (
    ENDPOINT_TOKEN_ENV,
    ChatDiscriminator,
    EmbedderReward,
    EndpointDiscriminator,
    EndpointEmbedderReward,
)
from embedrl.rewards.terms import EmbedFn

__all__ = [
    "LORA_TARGETS",
    "RLModels",
    "check_disjoint",
    "load_models",
    "lora_config",
    "process_device",
    "reward_embedder",
    "rollout_decoding",
    "trained_reasoner",
    "write_policy_settings",
]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class RLModels:
    """What the RL run loads: the trainable policy and the frozen reward models (no shared parameters)."""

    policy: Reasoner  # trainable (full weights; TRL adds the LoRA adapters when cfg.lora > 0)
    embedder: Embedder | None  # frozen reward model (None: an embedder_url endpoint)
    discriminator: Callable[[list[str]], list[str]]  # prompts -> replies
    discriminator_model: PreTrainedModel | None  # the Discriminator's weights when in-process

    def frozen_modules(self) -> list[torch.nn.Module]:
        embedder = self.embedder.model if self.embedder is not None else None
        return [m for m in (embedder, self.discriminator_model) if m is not None]


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    return model.eval()


def lora_config(model: PreTrainedModel, rank: int) -> LoraConfig:
    """LoRA rank ``rank`` (alpha 2r, no dropout) on the language model's attention and MLP projections, never on the
    vision tower (a ``peft.LoraConfig``, TRL's ``peft_config``)."""
    vision = {id(m) for m in model.get_submodule("model.visual").modules()}
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and id(module) not in vision and name.rsplit(".", 1)[-1] in LORA_TARGETS
    ]  # fmt: skip
    if not names:
        raise ValueError(f"no language-model Linear layer is named one of {list(LORA_TARGETS)}")
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=names)


def _no_discriminator(prompts: list[str]) -> list[str]:
    raise RuntimeError(
        "the Discriminator was not loaded because w_process is 0; a process reward was asked for "
        f"{len(prompts)} prompt(s) anyway"
    )


def process_device(cfg: GRPOTrainConfig) -> str:
    """The torch device of this process's models: ``cpu``, or with ``device: cuda`` the GPU accelerate gives the
    process (``cuda:<local rank>`` under ``accelerate launch``/``torchrun``; the one GPU otherwise)."""
    if cfg.device == "cpu":
        return "cpu"
    from accelerate import PartialState

    device = PartialState().device
    if device.type != "cuda":
        raise ConfigError(f"device={cfg.device!r} but accelerate sees no GPU (it picked {device}); use device: cpu")
    return str(device)


def load_models(cfg: GRPOTrainConfig) -> RLModels:
    """Load the policy (``cfg.reasoner``, trainable), the frozen Embedder (unless ``embedder_url``) and the frozen
    Discriminator (in-process, or ``discriminator_url``; none when ``w_process`` is 0: the process term is then never
    computed), each on :func:`process_device`, in ``cfg.dtype`` with the ``cfg.attn_implementation`` kernel (TRL builds
    the reference model of ``beta > 0`` in the policy's dtype and kernel; vLLM rollouts use vLLM's own kernels).

    Raises:
        ImportError: ``use_vllm`` without vLLM installed.
        ValueError: ``max_prompt_tokens + max_new_tokens`` exceeds the policy's context.
    """
    if cfg.use_vllm and importlib.util.find_spec("vllm") is None:
        raise ImportError(
            "use_vllm=true needs vLLM: pip install 'embedrl[gpu]' on a GPU machine, or set use_vllm: false"
        )
    dtype, device, attn = torch_dtype(cfg.dtype), process_device(cfg), cfg.attn_implementation
    policy = load_reasoner(cfg.reasoner, dtype=dtype, device=device, compact_prompts=cfg.compact_prompts,
                           attn_implementation=attn)  # fmt: skip
    context = policy.model.config.get_text_config().max_position_embeddings
    if cfg.max_prompt_tokens + cfg.max_new_tokens > context:
        raise ValueError(
            f"max_prompt_tokens + max_new_tokens = {cfg.max_prompt_tokens + cfg.max_new_tokens} exceeds the "
            f"policy's context of {context} tokens (docs/method.md §8 item 19); lower one of them"
        )
    policy.model.requires_grad_(True)  # load_backbone returns the model in eval mode
    embedder = None
    if not cfg.embedder_url:
        embedder = load_embedder(cfg.embedder, layout=cfg.layout, dtype=dtype, device=device, attn_implementation=attn)
        _freeze(embedder.model)
    if cfg.reward_config().w_process == 0:  # the process term is not computed: no Discriminator to load or call
        return RLModels(policy, embedder, _no_discriminator, None)
    if cfg.discriminator_url:
        endpoint = EndpointDiscriminator(
            cfg.discriminator_url,
            cfg.discriminator,
            cfg.discriminator_max_new_tokens,
            cfg.discriminator_batch_size,
            token=os.environ.get(ENDPOINT_TOKEN_ENV, ""),
        )
        return RLModels(policy, embedder, endpoint, None)
    disc = load_reasoner(cfg.discriminator or cfg.reasoner, dtype=dtype, device=device, attn_implementation=attn)
    _freeze(disc.model)
    discriminator = ChatDiscriminator(disc, cfg.discriminator_max_new_tokens, cfg.discriminator_batch_size)
    return RLModels(policy, embedder, discriminator, disc.model)


def reward_embedder(cfg: GRPOTrainConfig, models: RLModels) -> EmbedFn:
    """The rollout embedder of the rewards: the in-process frozen Embedder, or the ``embedder_url`` endpoint."""
    if cfg.embedder_url:
        token = os.environ.get(ENDPOINT_TOKEN_ENV, "")
        return EndpointEmbedderReward(cfg.embedder_url, cfg.embedder, cfg.embed_batch_size, token=token)
    if models.embedder is None:
        raise ValueError("no Embedder: set embedder (a directory) or embedder_url")
    return EmbedderReward(models.embedder, cfg.embed_batch_size)


def check_disjoint(models: RLModels, params: Sequence[torch.nn.Parameter]) -> None:
    """Refuse a policy that shares a parameter with a frozen model (it would train the reward model)."""
    frozen = {id(p) for m in models.frozen_modules() for p in m.parameters()}
    if any(id(p) in frozen for p in params):
        raise ValueError("the policy shares parameters with a frozen model; load the Discriminator separately")


# ----------------------------------------------------------------------------------------------------------------
# The trained policy as a Reasoner checkpoint
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
