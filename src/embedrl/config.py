"""Stage configurations: one dataclass per stage, loaded from YAML with ``--key value`` overrides.

Every stage of embedrl (building a tiny backbone, generating the synthetic world, training, evaluation, serving)
is driven by one dataclass defined here. The life cycle is always the same:

1. ``load_config(WorldConfig, "configs/world.yaml", {"seed": "3"})`` reads the YAML file, applies the overrides
   (dotted keys reach into nested sections: ``{"teacher.wrong_box": "0.2"}``), and
2. validates everything in one place (:func:`config_from_dict`): unknown keys and wrong types are rejected with a
   message naming the key and how to fix it, then the dataclass's ``__post_init__`` checks cross-field invariants.
3. ``save_config(cfg, out_dir)`` writes the resolved config as ``config.json`` next to the stage's output.

Field help strings live in ``metadata={"help": ...}`` and double as the CLI's ``--help``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
import shutil
import types
import typing
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

import yaml

__all__ = [
    "REPORT_TO",
    "STAGE_CONFIGS",
    "AnnotateConfig",
    "AnnotatorSettings",
    "ConfigError",
    "ConvertConfig",
    "EmbedderTrainConfig",
    "EngineFields",
    "EvalConfig",
    "FilterConfig",
    "GRPOTrainConfig",
    "IndexConfig",
    "LoraSettings",
    "MMEBEvalConfig",
    "ModelLoadFields",
    "ReasonerTrainConfig",
    "ServeConfig",
    "TeacherNoiseConfig",
    "ThreadsFields",
    "TinyBackboneConfig",
    "TrackingFields",
    "TrainedModelLoadFields",
    "UVRBEvalConfig",
    "UserError",
    "WorldConfig",
    "check_run_dir",
    "config_fields",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
    "truncate_metrics",
]

C = TypeVar("C")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")  # exponent floats YAML misses
CONFIG_FILENAME = "config.json"


class UserError(Exception):
    """A mistake in what the user passed (a config value, a data file, a path): the command line prints the message
    on one line and exits 2, with no traceback. Every such error of the library derives from it."""


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or of the wrong type. The message says how to fix it."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


# ----------------------------------------------------------------------------------------------------------------
# Stage configs
# ----------------------------------------------------------------------------------------------------------------

MODEL_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
Family = Literal["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]


def _require(cfg: Any, names: tuple[str, ...], command: str = "") -> None:
    """Raise for the first of ``names`` that ``cfg`` leaves empty, naming its ``--key`` (and ``command``'s help)."""
    for name in names:
        if not getattr(cfg, name):
            see = f" (see {command} --help)" if command else ""
            raise ConfigError(f"{name} is empty: pass --{name}{see}")


# ----------------------------------------------------------------------------------------------------------------
# Mixins: field groups that several stages share. Their keys stay top-level (YAML ``temperature: 1.0``, CLI
# ``--temperature 1.0``); a stage with another default redeclares that one field.
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PromptStyleFields:
    """The prompt style of a stage that prompts a Reasoner (or another chat model) with the T-CoT families."""

    _config_mixin: ClassVar[bool] = True

    compact_prompts: bool | None = field(
        default=None,
        metadata=_help(
            "the families' compact prompts (true; tiny models are trained on them) or the full ones (false); "
            "null = the checkpoint's (its embedrl_reasoner.json), full prompts for a checkpoint without one"
        ),
    )


@dataclass
class SamplingFields:
    """Sampling of a stage that generates text."""

    _config_mixin: ClassVar[bool] = True

    temperature: float = field(default=1.0, metadata=_help("sampling temperature (docs/method.md §6.2: 1.0)"))
    top_p: float = field(default=1.0, metadata=_help("nucleus sampling top_p"))
    max_new_tokens: int = field(default=256, metadata=_help("longest generated reply, in tokens"))

    def _check_sampling(self, greedy: bool | None = None) -> None:
        """``greedy``: the stage's greedy flag; None for a stage that always samples."""
        if not greedy and self.temperature <= 0:
            hint = "the stage samples; 1.0 is the paper's" if greedy is None else "set greedy: true instead"
            raise ConfigError(f"temperature={self.temperature} must be > 0 when sampling ({hint})")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 1")


@dataclass
class DecodingFields(SamplingFields, PromptStyleFields):
    """The Reasoner's prompts and decoding in a stage that generates T-CoTs (the fields of
    :class:`embedrl.models.reasoner.Decoding`)."""

    _config_mixin: ClassVar[bool] = True

    greedy: bool = field(default=False, metadata=_help("greedy decoding instead of sampling (default: T=1 + seed)"))
    seed: int = field(default=0, metadata=_help("decoding seed: torch is seeded before each generation batch"))

    def _check_decoding(self) -> None:
        self._check_sampling(self.greedy)


@dataclass
class EngineFields:
    """The generation engine of a stage that generates (:class:`embedrl.models.generation.EngineSettings`)."""

    _config_mixin: ClassVar[bool] = True

    backend: Literal["hf", "vllm"] = field(
        default="hf",
        metadata=_help(
            "generation engine: hf (transformers; batches sorted by modality and prompt length, finished rows "
            "dropped) or vllm (GPU, needs the gpu extra; no HF copy of the generating model is loaded)"
        ),
    )
    drop_finished: bool = field(
        default=True, metadata=_help("hf: drop rows that ended (EOS) from the batch; same tokens, less compute")
    )
    compile: bool = field(
        default=False,
        metadata=_help("hf on CUDA: static KV cache + torch.compile of the decoding step (refused on CPU)"),
    )
    gpu_memory_utilization: float = field(
        default=0.6,
        metadata=_help(
            "vllm: share of the GPU's memory vLLM may take (weights, activations, KV cache); the rest is the "
            "Embedder's, which shares the GPU (vLLM's own default, 0.9, leaves it too little)"
        ),
    )

    def _check_engine(self, device: str) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.compile and not device.startswith("cuda"):
            raise ConfigError(
                f"compile=true (static KV cache + torch.compile) needs a CUDA device, not device={device}; set "
                "compile false"
            )
        if self.compile and self.backend == "vllm":
            raise ConfigError("compile applies to backend hf (vLLM compiles its own graphs); set compile false")


@dataclass
class ModelLoadFields:
    """How a stage loads its models: weight dtype and attention kernel."""

    _config_mixin: ClassVar[bool] = True

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata=_help("weight dtype of the stage's models; auto = the checkpoint's")
    )
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] | None = field(
        default=None,
        metadata=_help(
            "attention kernel of the stage's models: sdpa, flash_attention_2 (CUDA, 16-bit weights, needs the "
            "flash-attn package) or eager; null = transformers' choice (sdpa)"
        ),
    )


@dataclass
class TrainedModelLoadFields(ModelLoadFields):
    """How a training stage loads the model it trains: weight dtype (the dtype the weights train in) and attention
    kernel."""

    _config_mixin: ClassVar[bool] = True

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata=_help(
            "weight dtype the stage loads its model in, and so the dtype its weights and AdamW states train in; auto "
            "= the checkpoint's (bfloat16 for the published Qwen-VL checkpoints); float32 = float32 master weights "
            "(the norm under bf16 mixed precision); float16 is refused (AdamW without loss scaling)"
        ),
    )

    def _check_trained_dtype(self, bf16: bool | None = None) -> None:
        """Refuse float16 weights for training; ``bf16``: the stage's mixed-precision flag (None: it has none)."""
        if self.dtype != "float16":
            return
        amp = " under bf16=true (bfloat16 autocast over float16 weights mixes two half precisions)" if bf16 else ""
        hint = " (with bf16: true for bfloat16 mixed precision)" if bf16 is not None else ""
        raise ConfigError(
            f"dtype=float16{amp}: the stage trains its weights in the dtype it loads them in, and AdamW on float16 "
            "weights without loss scaling makes inf/NaN updates (its eps and squared gradients underflow: a 1e-3 "
            f"gradient already gives -inf); use dtype float32{hint}, bfloat16 or auto"
        )


@dataclass
class ThreadsFields:
    """torch's CPU thread count for a stage that runs models (set once at its start when it runs on CPU)."""

    _config_mixin: ClassVar[bool] = True

    threads: int = field(
        default=0,
        metadata=_help(
            "torch CPU threads of a CPU run; 0 = $OMP_NUM_THREADS, else 1 (on the shared 2-core host 1 thread "
            "decoded 4-25x faster than 2 under load: docs/experiments.md)"
        ),
    )

    def _check_threads(self) -> None:
        if self.threads < 0:
            raise ConfigError(f"threads={self.threads} must be >= 0 (0 = $OMP_NUM_THREADS, else 1)")


REPORT_TO = ("tensorboard", "wandb", "trackio", "none")


@dataclass
class TrackingFields:
    """Where a training stage reports its scalars besides ``metrics.jsonl`` (which it always writes)."""

    _config_mixin: ClassVar[bool] = True

    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata=_help(
            "experiment trackers, passed to accelerate/TRL: any of tensorboard, wandb, trackio, or none "
            "(logs go under <out>/runs for tensorboard)"
        ),
    )

    def _check_tracking(self) -> None:
        unknown = [name for name in self.report_to if name not in REPORT_TO]
        if unknown:
            raise ConfigError(f"report_to={self.report_to}: unknown tracker(s) {unknown}; use any of {REPORT_TO}")
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ConfigError(f"report_to={self.report_to}: 'none' cannot be combined with a tracker")

    @property
    def trackers(self) -> list[str]:
        """The trackers to start: ``report_to`` without ``none``."""
        return [name for name in self.report_to if name != "none"]


_LAYOUT_HELP = _help(
    "Embedder input layout: embedrl (ours) or reference (the published Embed-RL checkpoints', "
    "docs/published-models.md); null = the checkpoint's (embedder.json's; reference for a published checkpoint)"
)
_EMBEDDER_DIR = "Embedder: a folder written by Embedder.save, a published Embed-RL checkpoint, or a hub id"


@dataclass
class EmbedderLayoutFields:
    """The input layout of a stage that loads an Embedder."""

    _config_mixin: ClassVar[bool] = True

    layout: Literal["embedrl", "reference"] | None = field(default=None, metadata=_LAYOUT_HELP)


@dataclass
class EmbedRunFields(DecodingFields, EngineFields, ModelLoadFields, ThreadsFields, EmbedderLayoutFields):
    """How a stage that embeds items with Reasoner T-CoTs (evaluation, index) runs its two models."""

    _config_mixin: ClassVar[bool] = True

    batch_size: int = field(default=16, metadata=_help("items per Embedder batch (one embedding-cache shard each)"))
    reasoner_batch_size: int = field(
        default=32,
        metadata=_help(
            "items per Reasoner batch (one T-CoT-cache append each), after a task's items are sorted by modality "
            "and prompt length; vllm: items per LLM.generate call"
        ),
    )
    device: str = field(default="cpu", metadata=_help("torch device of the Embedder and the Reasoner"))
    show_progress_bar: bool = field(default=True, metadata=_help("tqdm bars over generation and embedding"))

    def _check_tcot_source(self, sources: str) -> None:
        """``mode`` and ``tcot_source`` (the stage's own fields) agree, and a Reasoner source names its checkpoint.
        ``sources``: the stage's T-CoT sources other than none, for the message."""
        mode, source, reasoner = (getattr(self, name) for name in ("mode", "tcot_source", "reasoner"))
        if (mode == "raw") != (source == "none"):
            raise ConfigError(
                f"mode={mode} with tcot_source={source}: raw mode embeds no T-CoT, so it goes with "
                f"tcot_source none, and every other mode needs T-CoTs ({sources})"
            )
        if source == "reasoner" and not reasoner:
            raise ConfigError("tcot_source=reasoner needs --reasoner DIR, the Reasoner checkpoint to generate with")

    def _check_run(self) -> None:
        self._check_decoding()
        self._check_engine(self.device)
        self._check_threads()
        for name in ("batch_size", "reasoner_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")


@dataclass
class EvalRunFields(EmbedRunFields):
    """An evaluation's caches of T-CoTs and embeddings, and the ids that key them."""

    _config_mixin: ClassVar[bool] = True

    cache_dir: str = field(default="", metadata=_help("T-CoT and embedding caches; '' = <out>/cache"))
    embedder_id: str = field(default="", metadata=_help("cache id of the Embedder; '' = hash of weights and settings"))
    reasoner_id: str = field(default="", metadata=_help("cache id of the Reasoner; '' = <dir name>@<hash of weights>"))


@dataclass
class TinyBackboneConfig:
    """`embedrl backbone tiny`: a tiny, randomly initialised Qwen-VL checkpoint built offline."""

    family: Family = field(default="qwen3-vl", metadata=_help("architecture family: qwen2-vl, qwen2.5-vl or qwen3-vl"))
    out: str = field(default="", metadata=_help("output checkpoint directory (required)"))
    seed: int = field(default=0, metadata=_help("seed for the weights (the tokenizer is deterministic)"))
    vocab_size: int = field(default=4096, metadata=_help("size of the locally trained byte-level BPE vocabulary"))
    hidden_size: int = field(default=128, metadata=_help("text hidden size"))
    num_hidden_layers: int = field(default=2, metadata=_help("text transformer layers"))
    num_attention_heads: int = field(default=4, metadata=_help("text attention heads"))
    num_key_value_heads: int = field(default=2, metadata=_help("text key/value heads (GQA)"))
    intermediate_size: int = field(default=256, metadata=_help("text MLP width"))
    vision_depth: int = field(default=2, metadata=_help("vision transformer layers"))
    vision_hidden_size: int = field(default=64, metadata=_help("vision hidden size"))
    vision_num_heads: int = field(default=4, metadata=_help("vision attention heads"))
    min_pixels: int = field(default=32 * 32, metadata=_help("image processor minimum pixels per image"))
    max_pixels: int = field(default=256 * 256, metadata=_help("image processor maximum pixels per image"))

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("out is empty: pass --out DIR, the checkpoint directory to write")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                f"{self.num_attention_heads}; change one of them"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads="
                f"{self.num_key_value_heads}; change one of them"
            )
        if self.vision_hidden_size % self.vision_num_heads:
            raise ConfigError(
                f"vision_hidden_size={self.vision_hidden_size} is not a multiple of vision_num_heads="
                f"{self.vision_num_heads}; change one of them"
            )
        if self.vocab_size < 512:
            raise ConfigError(f"vocab_size={self.vocab_size} is too small for the special tokens; use >= 512")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}")


PRETRAIN_TASKS = ("crop", "cell", "find", "list", "event", "page", "copy", "tcot", "judge")


def _default_pretrain_weights() -> dict[str, float]:
    return {"crop": 1.0, "cell": 2.0, "find": 1.5, "list": 2.0, "event": 1.5, "page": 1.0, "copy": 1.0}


@dataclass
class BackbonePretrainConfig(TrainedModelLoadFields, TrackingFields, ThreadsFields):
    """`embedrl backbone pretrain`: perception pre-training of a tiny backbone on questions about world media."""

    backbone: str = field(
        default="", metadata=_help("tiny backbone to start from (`embedrl backbone tiny`; required)")
    )
    out: str = field(default="", metadata=_help("output directory; the checkpoint is written to OUT/final (required)"))
    seed: int = field(default=0, metadata=_help("seed of the sampled media (each step's examples depend on it only)"))
    task_weights: dict[str, float] = field(
        default_factory=_default_pretrain_weights,
        metadata=_help(f"sampling weight per task ({', '.join(PRETRAIN_TASKS)}); 0 leaves a task out"),
    )
    batch_size: int = field(default=32, metadata=_help("examples per step"))
    max_steps: int = field(default=4000, metadata=_help("optimiser steps"))
    lr: float = field(default=3e-3, metadata=_help("peak learning rate (AdamW, linear warm-up then linear decay)"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    warmup_steps: int = field(default=30, metadata=_help("warm-up steps"))
    max_length: int = field(default=1024, metadata=_help("longest allowed tokenised example"))
    eval_every: int = field(
        default=1000, metadata=_help("score held-out perception every N steps (0 = only at the end)")
    )
    eval_examples: int = field(default=64, metadata=_help("held-out examples per task in the final score"))
    save_every: int = field(default=250, metadata=_help("write a resumable trainer state every N steps (0 = never)"))
    resume: bool = field(default=True, metadata=_help("resume from the trainer state in out/ when present"))
    overwrite: bool = field(
        default=False, metadata=_help("discard a previous run in out/ (trainer state, metrics, final/) and start over")
    )
    device: str = field(default="cpu", metadata=_help("torch device"))

    def __post_init__(self) -> None:
        _require(self, ("backbone", "out"), "embedrl backbone pretrain")
        unknown = sorted(set(self.task_weights) - set(PRETRAIN_TASKS))
        if unknown:
            raise ConfigError(f"task_weights has unknown task(s) {unknown}; the tasks are {list(PRETRAIN_TASKS)}")
        if any(w < 0 for w in self.task_weights.values()) or not any(w > 0 for w in self.task_weights.values()):
            raise ConfigError(f"task_weights must be >= 0 with at least one > 0, got {self.task_weights}")
        self.task_weights = {k: float(v) for k, v in self.task_weights.items() if v > 0}
        if self.batch_size < 1 or self.max_steps < 1 or self.max_length < 16 or self.warmup_steps < 0:
            raise ConfigError("batch_size and max_steps must be >= 1, max_length >= 16, warmup_steps >= 0")
        if self.eval_every < 0 or self.save_every < 0 or self.eval_examples < 2:
            raise ConfigError("eval_every and save_every must be >= 0 and eval_examples >= 2")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        self._check_tracking()
        self._check_trained_dtype()


@dataclass
class TeacherNoiseConfig:
    """Imperfections of the synthetic world's teacher T-CoTs (rates are probabilities per T-CoT)."""

    wrong_box: float = field(default=0.2, metadata=_help("rate of a box placed on a distractor object"))
    loose_box: float = field(default=0.2, metadata=_help("rate of a box enlarged beyond its object"))
    missing_frame: float = field(default=0.2, metadata=_help("rate of dropping one decisive key frame"))
    extra_frame: float = field(default=0.3, metadata=_help("rate of adding one irrelevant key frame"))
    distractor_keyword: float = field(default=0.2, metadata=_help("rate of adding a misleading keyword"))
    verbose: float = field(default=0.2, metadata=_help("rate of padding the thinking with filler sentences"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"teacher.{f.name}={value} is not a probability; use a value in [0, 1]")


@dataclass
class WorldConfig:
    """`embedrl world generate`: the synthetic multimodal world (training pairs, RL split, evaluation suite)."""

    out: str = field(default="", metadata=_help("output directory (required)"))
    seed: int = field(default=0, metadata=_help("world seed: the same seed gives the same world, byte for byte"))
    size: Literal["tiny", "small", "default"] = field(default="default", metadata=_help("tiny, small or default"))
    image_size: int = field(default=128, metadata=_help("side of scene images in pixels"))
    grid: int = field(default=4, metadata=_help("objects sit in the cells of a grid x grid layout"))
    frame_size: int = field(default=64, metadata=_help("side of video frames in pixels"))
    num_frames: int = field(default=8, metadata=_help("frames per video clip"))
    page_size: int = field(default=128, metadata=_help("side of document page images in pixels (4 x 4 layout)"))
    eval_candidates: int = field(
        default=10, metadata=_help("candidates per query in local evaluation tasks (1 positive + hard negatives)")
    )
    discrimination_negatives: int = field(
        default=4, metadata=_help("hard negatives per listwise discrimination example (m_neg of the process reward)")
    )
    teacher: TeacherNoiseConfig = field(default_factory=TeacherNoiseConfig, metadata=_help("teacher noise"))

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("out is empty: pass --out DIR, the directory to write the world into")
        if self.grid < 3:
            raise ConfigError(f"grid={self.grid} leaves too few cells for objects and distractors; use >= 3")
        if self.image_size % self.grid:
            raise ConfigError(f"image_size={self.image_size} is not a multiple of grid={self.grid}")
        cell = self.image_size // self.grid
        if cell < 16:
            raise ConfigError(f"image_size/grid = {cell} px per cell is too small for patterns; use >= 16")
        if self.frame_size % cell or self.frame_size // cell < 2:
            raise ConfigError(
                f"frame_size={self.frame_size} must be a multiple of the cell size image_size/grid={cell} and at "
                f"least 2 cells wide (video objects are drawn like image objects); try frame_size={2 * cell}"
            )
        if self.num_frames < 4:
            raise ConfigError(f"num_frames={self.num_frames} is too few for events; use >= 4")
        if self.page_size < 128 or self.page_size % 4:
            raise ConfigError(f"page_size={self.page_size} must be a multiple of 4 and >= 128 to fit the page text")
        if not 2 <= self.eval_candidates <= 20:
            raise ConfigError(f"eval_candidates={self.eval_candidates} must be in [2, 20]")
        if not 1 <= self.discrimination_negatives <= 8:
            raise ConfigError(f"discrimination_negatives={self.discrimination_negatives} must be in [1, 8]")


@dataclass
class LoraSettings:
    """LoRA adapters (peft). Targets are module leaf names of nn.Linear layers (never the LM head)."""

    rank: int = field(default=64, metadata=_help("LoRA rank r"))
    alpha: int = field(default=128, metadata=_help("LoRA alpha"))
    dropout: float = field(default=0.05, metadata=_help("LoRA dropout"))
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata=_help("leaf names of the language model's Linear layers to adapt"),
    )
    vision_tower: bool = field(
        default=True,
        metadata=_help("also adapt every Linear layer of the vision tower and merger (docs/method.md §3.8)"),
    )

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha < 1:
            raise ConfigError(f"lora.rank={self.rank} and lora.alpha={self.alpha} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if not self.targets:
            raise ConfigError("lora.targets is empty; name at least one Linear layer, e.g. [q_proj, v_proj]")


@dataclass
class EmbedderTrainConfig(TrainedModelLoadFields, TrackingFields, ThreadsFields):
    """`embedrl train-embedder`: contrastive training of the Embedder (symmetric InfoNCE, same-dataset sub-batches)."""

    backbone: str = field(
        default="", metadata=_help("checkpoint directory or hub id of a Qwen-VL backbone (required)")
    )
    data: str = field(default="", metadata=_help("pairs JSONL in the embedrl training schema (required)"))
    out: str = field(default="", metadata=_help("output directory: checkpoints, metrics.jsonl, final/ (required)"))
    seed: int = field(default=42, metadata=_help("seed of the sampler, dropout and initialisation"))
    mode: Literal["full", "answer_only", "no_evidence", "raw"] = field(
        default="full", metadata=_help("T-CoT/evidence mode on both sides (docs/method.md §6.4)")
    )
    video_as: Literal["video", "frames"] = field(
        default="video", metadata=_help("one video item, or frames as images")
    )
    temperature: float = field(default=0.02, metadata=_help("InfoNCE temperature τ (logit scale 1/τ)"))
    sub_batch_size: int = field(default=8, metadata=_help("pairs per same-dataset sub-batch (global, all processes)"))
    num_sub_batches: int = field(default=1, metadata=_help("sub-batches per global batch (step)"))
    grad_cache: bool = field(default=False, metadata=_help("GradCache: same loss and gradients, chunked memory"))
    chunk_size: int = field(default=4, metadata=_help("items per forward chunk when grad_cache is on"))
    epochs: int = field(default=1, metadata=_help("passes over the data"))
    max_steps: int = field(default=0, metadata=_help("stop after this many steps; 0 = epochs × steps per epoch"))
    lr: float = field(default=1e-4, metadata=_help("peak learning rate (AdamW)"))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay"))
    warmup_steps: int = field(default=10, metadata=_help("linear warm-up steps before the cosine decay"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm; 0 disables"))
    finetune: Literal["lora", "full"] = field(default="lora", metadata=_help("LoRA adapters or full fine-tuning"))
    lora: LoraSettings = field(default_factory=LoraSettings, metadata=_help("LoRA settings (finetune=lora)"))
    gradient_checkpointing: bool = field(default=False, metadata=_help("recompute activations in backward"))
    bf16: bool = field(
        default=False,
        metadata=_help("bfloat16 mixed precision via accelerate (autocast under DDP; FSDP's and DeepSpeed's bf16)"),
    )
    dataset_weights: dict[str, float] = field(
        default_factory=dict, metadata=_help("sampling weight per dataset name (default 1.0); p ∝ weight × size")
    )
    datasets: list[str] = field(default_factory=list, metadata=_help("train on these datasets only; [] = all"))
    evidence_only_rate: float = field(
        default=0.0,
        metadata=_help(
            "probability that a training item's T-CoT is cut to its evidence cue (prose, rethink and answer "
            "dropped; full mode only), so the Embedder learns to read crops and key frames, not only the words"
        ),
    )
    save_every: int = field(default=50, metadata=_help("write a resumable checkpoint every N steps"))
    log_every: int = field(default=1, metadata=_help("log metrics every N steps"))
    resume: bool = field(default=True, metadata=_help("resume from the latest checkpoint in out/ when present"))
    overwrite: bool = field(
        default=False, metadata=_help("discard a previous run in out/ (checkpoints, metrics, final/) and start over")
    )
    device: str = field(
        default="cpu",
        metadata=_help("cpu, cuda (each process of a launch takes cuda:LOCAL_RANK) or cuda:N (a single process)"),
    )

    def __post_init__(self) -> None:
        _require(self, ("backbone", "data", "out"), "embedrl train-embedder")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0 (0.02 is the paper's)")
        if self.sub_batch_size < 2:
            raise ConfigError(f"sub_batch_size={self.sub_batch_size} leaves no in-batch negatives; use >= 2")
        if self.num_sub_batches < 1 or self.epochs < 1 or self.max_steps < 0 or self.chunk_size < 1:
            raise ConfigError("num_sub_batches, epochs and chunk_size must be >= 1 and max_steps >= 0")
        if self.save_every < 1 or self.log_every < 1:
            raise ConfigError("save_every and log_every must be >= 1")
        for name, weight in self.dataset_weights.items():
            if weight <= 0:
                raise ConfigError(f"dataset_weights.{name}={weight} must be > 0; drop the dataset from the data")
        if not 0.0 <= self.evidence_only_rate <= 1.0:
            raise ConfigError(f"evidence_only_rate={self.evidence_only_rate} is not a probability; use one in [0, 1]")
        if self.evidence_only_rate and self.mode != "full":
            raise ConfigError(f"evidence_only_rate needs mode 'full' (got {self.mode!r}): others show no evidence")
        self._check_tracking()
        self._check_trained_dtype(self.bf16)


@dataclass
class ReasonerTrainConfig(PromptStyleFields, TrainedModelLoadFields, TrackingFields, ThreadsFields):
    """`embedrl train-reasoner`: cold-start SFT of a from-scratch Reasoner on teacher T-CoTs (docs/method.md §1.2), run
    by TRL's ``SFTTrainer`` (docs/rl.md, "Cold start")."""

    backbone: str = field(default="", metadata=_help("checkpoint directory of the from-scratch backbone (required)"))
    data: str = field(default="", metadata=_help("pairs JSONL whose items carry teacher T-CoTs (required)"))
    discrimination_data: str = field(
        default="", metadata=_help("listwise-discrimination JSONL (the world's discrimination.jsonl); '' = none")
    )
    out: str = field(default="", metadata=_help("output directory: checkpoints/, metrics.jsonl, final/ (required)"))
    seed: int = field(default=0, metadata=_help("seed of initialisation (LoRA adapters), data order and dropout"))
    batch_size: int = field(default=16, metadata=_help("examples per optimiser step (global: all processes)"))
    micro_batch_size: int = field(
        default=0,
        metadata=_help(
            "examples per forward/backward and process; gradients accumulate over batch_size / (micro_batch_size x "
            "processes) micro-batches (memory only); 0 = batch_size / processes (no accumulation)"
        ),
    )
    max_steps: int = field(default=300, metadata=_help("optimiser steps"))
    lr: float = field(default=1e-3, metadata=_help("peak learning rate (AdamW, linear warm-up then linear decay)"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    warmup_steps: int = field(default=10, metadata=_help("warm-up steps"))
    max_length: int = field(
        default=2048, metadata=_help("longest allowed tokenised example; a longer one stops the run (never truncated)")
    )
    finetune: Literal["full", "lora"] = field(
        default="full", metadata=_help("full fine-tuning or LoRA adapters (merged into the saved Reasoner)")
    )
    lora: LoraSettings = field(default_factory=LoraSettings, metadata=_help("LoRA settings (finetune=lora)"))
    bf16: bool = field(
        default=False, metadata=_help("bfloat16 mixed precision (autocast; weights and optimiser stay float32)")
    )
    gradient_checkpointing: bool = field(default=False, metadata=_help("recompute activations in backward"))
    save_every: int = field(
        default=100, metadata=_help("write a resumable checkpoint every N steps and at the end (0 = never)")
    )
    resume: bool = field(default=True, metadata=_help("resume from the latest checkpoint in out/ when present"))
    overwrite: bool = field(
        default=False,
        metadata=_help("discard a previous run in out/ (checkpoints, metrics, tracker logs, final/) and start over"),
    )
    device: str = field(
        default="cpu", metadata=_help("cpu, or cuda (each process of a multi-process launch takes its own GPU)")
    )

    def __post_init__(self) -> None:
        _require(self, ("backbone", "data", "out"), "embedrl train-reasoner")
        if self.batch_size < 1 or self.max_steps < 1 or self.max_length < 16 or self.warmup_steps < 0:
            raise ConfigError("batch_size and max_steps must be >= 1, max_length >= 16, warmup_steps >= 0")
        if self.micro_batch_size < 0 or self.save_every < 0:
            raise ConfigError(
                f"micro_batch_size={self.micro_batch_size} and save_every={self.save_every} must be >= 0 (0 = the "
                "default behaviour)"
            )
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"batch_size={self.batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}"
            )
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        self._check_tracking()
        self._check_threads()
        self._check_trained_dtype(self.bf16)


# ----------------------------------------------------------------------------------------------------------------
# EG-RL reward settings and presets (docs/method.md §4.8)
# ----------------------------------------------------------------------------------------------------------------

# The §4.8 table. Each knob of RewardConfig left at None takes its preset's value.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "w_format": 0.05,
        "w_process": 0.8,
        "w_outcome": 0.2,
        "outcome_factor": 1.0,
        "acc_mode": "all_in_topk",
        "process_value": "binary",
        "shuffle_candidates": True,
        "format_requires_cue": True,
        "tau_neg": 0.5,
        "m_neg": 4,
        "negative_weighting": "softmax",
    },
    "reference": {
        "w_format": 0.05,
        "w_process": 0.2,
        "w_outcome": 0.8,
        "outcome_factor": 0.5,
        "acc_mode": "fraction",
        "process_value": "margin",
        "shuffle_candidates": False,
        "format_requires_cue": False,
        "tau_neg": 0.5,
        "m_neg": 4,
        "negative_weighting": "softmax",
    },
}
# The group size G of each preset. It belongs to the GRPO config (num_generations), not to the rewards.
PRESET_NUM_GENERATIONS: dict[str, int] = {"paper": 8, "reference": 4}

_LITERALS = {
    "acc_mode": ("all_in_topk", "fraction"),
    "process_value": ("binary", "margin"),
    "negative_weighting": ("softmax", "mean"),
}


@dataclass
class RewardConfig:
    """EG-RL reward settings (docs/method.md §4.5–4.8). Knobs left at None take the preset's value; all are
    overridable.

    ``R = w_format·R_fmt + w_process·R_proc + w_outcome·R_out``, weights not renormalised (0 = ablation).
    ``RewardConfig()`` is the ``paper`` preset; ``RewardConfig.from_preset("reference", w_process=0.0)`` is the
    reference preset without the process term. Log the resolved config (``dataclasses.asdict``) at start-up and save
    it with every checkpoint (docs/method.md §8 item 1).
    """

    preset: Literal["paper", "reference"] = field(
        default="paper", metadata=_help("bundle of defaults: paper (default) or reference (the authors' code)")
    )
    w_format: float | None = field(default=None, metadata=_help("weight of the format reward R_fmt"))
    w_process: float | None = field(default=None, metadata=_help("weight of the Discriminator reward R_proc"))
    w_outcome: float | None = field(default=None, metadata=_help("weight of the embedding reward R_out"))
    outcome_factor: float | None = field(
        default=None, metadata=_help("inner factor of R_out = factor * Acc * margin (paper 1.0, reference 0.5)")
    )
    acc_mode: Literal["all_in_topk", "fraction"] | None = field(
        default=None,
        metadata=_help("Acc gate: all_in_topk (1 iff all G positives in the top-K) or fraction (|TopK ∩ P| / G)"),
    )
    acc_k: int | None = field(default=None, metadata=_help("K of the top-K in Acc; None = G"))
    process_value: Literal["binary", "margin"] | None = field(
        default=None, metadata=_help("R_proc when the Discriminator is right: binary 1, or the outcome margin m")
    )
    shuffle_candidates: bool | None = field(
        default=None,
        metadata=_help("shuffle Discriminator candidates with a seeded RNG; false puts positives first (warns)"),
    )
    format_requires_cue: bool | None = field(
        default=None, metadata=_help("R_fmt also needs a valid cue of the prompt family's cue key")
    )
    format_strict_outside_tags: bool = field(
        default=False, metadata=_help("R_fmt also rejects non-whitespace text outside the three tag pairs")
    )
    tau_neg: float | None = field(default=None, metadata=_help("temperature of the softmax over negatives (0.5)"))
    m_neg: int | None = field(
        default=None, metadata=_help("hardest negative pairs shown to the Discriminator, one rollout each (4)")
    )
    negative_weighting: Literal["softmax", "mean"] | None = field(
        default=None, metadata=_help("s⁻ as softmax(s/tau_neg)-weighted mean (default) or plain mean (ablation)")
    )

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"reward preset {self.preset!r} is unknown; use one of {sorted(PRESETS)}")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name, allowed in _LITERALS.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; use one of {allowed}")
        for name in ("w_format", "w_process", "w_outcome"):
            w = getattr(self, name)
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                raise ValueError(f"{name}={w!r} must be a finite number >= 0 (0 switches the term off)")
        if not math.isfinite(self.outcome_factor):
            raise ValueError(f"outcome_factor={self.outcome_factor} must be finite")
        if not (math.isfinite(self.tau_neg) and self.tau_neg > 0):
            raise ValueError(f"tau_neg={self.tau_neg} must be a positive temperature (default 0.5)")
        if isinstance(self.m_neg, bool) or not isinstance(self.m_neg, int) or self.m_neg < 1:
            raise ValueError(f"m_neg={self.m_neg!r} must be an integer >= 1 (default 4)")
        if self.acc_k is not None and (isinstance(self.acc_k, bool) or self.acc_k < 1):
            raise ValueError(f"acc_k={self.acc_k!r} must be >= 1, or None for K = G")
        for name in ("shuffle_candidates", "format_requires_cue", "format_strict_outside_tags"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if not self.shuffle_candidates:
            warnings.warn(
                "shuffle_candidates=False: the Discriminator sees the positives first, so answering '1' is always "
                "right (the reference code's behaviour, kept for fidelity; docs/method.md §4.7). Set "
                "shuffle_candidates=True for a meaningful process reward.",
                UserWarning,
                stacklevel=3,
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> RewardConfig:
        """The preset ``name`` (``paper`` or ``reference``) with some knobs overridden."""
        if name not in PRESETS:
            raise ValueError(f"reward preset {name!r} is unknown; use one of {sorted(PRESETS)}")
        return cls(preset=name, **overrides)

    @property
    def weights(self) -> dict[str, float]:
        """``{"format": w_format, "process": w_process, "outcome": w_outcome}``."""
        return {"format": self.w_format, "process": self.w_process, "outcome": self.w_outcome}

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain values, for the start-up log and checkpoint metadata."""
        return dataclasses.asdict(self)


@dataclass
class GRPOTrainConfig(
    SamplingFields, PromptStyleFields, EmbedderLayoutFields, ModelLoadFields, TrackingFields, ThreadsFields
):
    """`embedrl rl`: EG-RL, GRPO on the Reasoner with the frozen Embedder and Discriminator as rewards (docs/method.md
    §4), run by TRL's ``GRPOTrainer`` (docs/rl.md; where each key goes: ``embedrl.train.grpo_trl.CONFIG_ROUTES``).

    Defaults are the project defaults of docs/method.md §4.3 (preset ``paper``) except ``beta`` (0.0 here, so tiny CPU
    runs need no reference model; ``configs/rl.yaml`` sets the paper's 0.01).
    """

    # Keys of older versions that are refused with a message (config_from_dict): they can no longer be honoured.
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "engine": "EG-RL has one engine, TRL's GRPOTrainer; embedrl's own GRPO loop ('native') was removed "
        "(docs/rl.md): delete the key",
        "generation_batch_size": "TRL generates each process's whole step block in one call, so prompts per "
        "generate call cannot be set; delete the key (micro_batch_size still bounds the update's memory)",
    }

    reasoner: str = field(
        default="", metadata=_help("policy initialisation: a Reasoner checkpoint dir, e.g. a cold start (required)")
    )
    embedder: str = field(
        default="",
        metadata=_help(
            "frozen reward Embedder: a folder written by Embedder.save, a published Embed-RL checkpoint or a hub "
            "id; or the served model's name when embedder_url is set (its layout: --layout)"
        ),
    )
    embedder_url: str = field(
        default="",
        metadata=_help(
            "'' = load the Embedder in-process; else an `embedrl serve` base URL (e.g. http://host:8000/v1) that "
            "embeds the rollouts (bearer token from $EMBEDRL_API_KEY)"
        ),
    )
    discriminator: str = field(
        default="",
        metadata=_help(
            "frozen Discriminator: a chat checkpoint ('' = the reasoner checkpoint, loaded apart), or the served "
            "model's name when discriminator_url is set"
        ),
    )
    discriminator_url: str = field(
        default="",
        metadata=_help("OpenAI-compatible base URL serving the Discriminator, e.g. http://host:8000/v1; '' = local"),
    )
    discriminator_max_new_tokens: int = field(
        default=10, metadata=_help("greedy tokens per Discriminator reply (it answers with a number)")
    )
    data: str = field(default="", metadata=_help("RL pairs JSONL (e.g. the world's rl.jsonl) (required)"))
    out: str = field(default="", metadata=_help("output directory: checkpoints/, metrics.jsonl, final/ (required)"))
    seed: int = field(default=42, metadata=_help("seed of step batches, rollout sampling, Discriminator shuffles"))
    preset: Literal["paper", "reference"] = field(
        default="paper", metadata=_help("reward preset (docs/method.md §4.8): paper (default) or reference")
    )
    w_format: float | None = field(default=None, metadata=_help("weight of R_fmt; null = the preset's (0.05)"))
    w_process: float | None = field(
        default=None, metadata=_help("weight of the Discriminator reward R_proc; null = the preset's (0.8 / 0.2)")
    )
    w_outcome: float | None = field(
        default=None, metadata=_help("weight of the embedding reward R_out; null = the preset's (0.2 / 0.8)")
    )
    acc_mode: Literal["all_in_topk", "fraction"] | None = field(
        default=None, metadata=_help("Acc gate of R_out: all_in_topk or fraction; null = the preset's")
    )
    reward_overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help("any other RewardConfig knob, e.g. {m_neg: 4, tau_neg: 0.5}"),
    )
    num_generations: int | None = field(
        default=None, metadata=_help("G, rollouts per (pair, side) prompt; null = the preset's (paper 8, reference 4)")
    )
    pairs_per_step: int = field(default=32, metadata=_help("B, pairs per step, all from one dataset (>= 2)"))
    epochs: int = field(default=1, metadata=_help("passes over the RL pairs"))
    max_steps: int = field(default=0, metadata=_help("stop after this many steps; 0 = epochs x steps per epoch"))
    ppo_epochs: int = field(default=1, metadata=_help("update passes over each step's rollouts"))
    mini_batch_size: int = field(
        default=0, metadata=_help("trajectories per optimiser step; 0 = all 2*B*G of the step in one update")
    )
    micro_batch_size: int = field(
        default=8,
        metadata=_help(
            "trajectories per forward/backward and process (gradients accumulate; memory only); must divide "
            "mini_batch_size"
        ),
    )
    scale_advantages: bool = field(
        default=True,
        metadata=_help(
            "divide each group's advantages by its reward std (docs/method.md §4.2); "
            "false = r - mean only (Dr. GRPO), "
            "which does not blow reward noise up to unit scale when the reward models are weak (tiny runs)"
        ),
    )
    clip_eps: float = field(default=0.2, metadata=_help("PPO clip ε of the ratio"))
    beta: float = field(
        default=0.0, metadata=_help("KL weight β (k3, in the loss, to the initial policy); paper 0.01; 0 = none")
    )
    lr: float = field(default=3e-6, metadata=_help("learning rate (AdamW 0.9/0.999, eps 1e-8, constant)"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm; 0 disables"))
    max_new_tokens: int = field(default=2048, metadata=_help("longest rollout (response tokens)"))
    max_prompt_tokens: int = field(
        default=4096,
        metadata=_help(
            "longest prompt in tokens (video: 8 frames x up to 300 visual tokens + the family prompt, about 3000); a "
            "pair whose prompt overflows on either side is dropped (both), counted per dataset at start-up"
        ),
    )
    embed_batch_size: int = field(default=32, metadata=_help("items per Embedder forward when scoring rollouts"))
    discriminator_batch_size: int = field(
        default=32, metadata=_help("prompts per Discriminator generate call, or concurrent requests to the endpoint")
    )
    lora: int = field(
        default=0, metadata=_help("0 = full fine-tuning; r > 0 = LoRA rank r (alpha 2r) on the language model")
    )
    gradient_checkpointing: bool = field(default=False, metadata=_help("recompute policy activations in backward"))
    use_vllm: bool = field(
        default=False, metadata=_help("vLLM rollouts (TRL's use_vllm; a GPU with the 'gpu' extra installed)")
    )
    vllm_mode: Literal["colocate", "server"] = field(
        default="colocate", metadata=_help("vLLM in the training processes ('colocate') or a `trl vllm-serve` server")
    )
    vllm_server_base_url: str = field(
        default="",
        metadata=_help("base URL of the `trl vllm-serve` server (vllm_mode 'server'); '' = TRL's localhost:8000"),
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata=_help("share of each GPU's memory vLLM may take (vllm_mode 'colocate': the policy shares the GPU)"),
    )
    vllm_tensor_parallel_size: int = field(
        default=1, metadata=_help("GPUs one colocated vLLM engine spans (vllm_mode 'colocate')")
    )
    trl_args: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help(
            "any other GRPOConfig argument of TRL, passed through, e.g. {vllm_enable_sleep_mode: true}; unknown "
            "names and the arguments embedrl derives from its own keys are refused (docs/rl.md)"
        ),
    )
    dtype: Literal["float32", "bfloat16"] = field(  # narrows ModelLoadFields.dtype: it also sets TRL's bf16
        default="float32",
        metadata=_help(
            "weight dtype of the policy, its reference, the in-process Embedder and Discriminator; bfloat16 also "
            "runs TRL in bf16 (GRPOConfig.bf16), float32 keeps float32 master weights"
        ),
    )
    device: Literal["cpu", "cuda"] = field(
        default="cpu",
        metadata=_help(
            "cpu, or cuda: each process's own GPU (accelerate's) for the policy and in-process reward models"
        ),
    )
    save_every: int = field(default=50, metadata=_help("write a resumable checkpoint every N steps"))
    log_every: int = field(default=1, metadata=_help("write metrics every N steps"))
    sample_table_every: int = field(
        default=10, metadata=_help("log a table of sample T-CoTs with rewards and advantages every N steps; 0 = off")
    )
    resume: bool = field(default=True, metadata=_help("resume from the latest checkpoint in out/ when present"))
    overwrite: bool = field(
        default=False,
        metadata=_help("discard a previous run in out/ (checkpoints, metrics, samples, final/) and start over"),
    )

    def __post_init__(self) -> None:
        _require(self, ("reasoner", "embedder", "data", "out"), "embedrl rl")
        if self.embedder_url and not self.embedder_url.startswith(("http://", "https://")):
            raise ConfigError(f"embedder_url={self.embedder_url!r} must start with http:// or https://")
        if self.discriminator_url and not self.discriminator_url.startswith(("http://", "https://")):
            raise ConfigError(f"discriminator_url={self.discriminator_url!r} must start with http:// or https://")
        if self.discriminator_url and not self.discriminator:
            raise ConfigError("discriminator_url needs the served model's name: pass --discriminator NAME")
        if self.pairs_per_step < 2:
            raise ConfigError(f"pairs_per_step={self.pairs_per_step} leaves no in-batch negatives; use >= 2")
        if self.num_generations is not None and self.num_generations < 2:
            raise ConfigError(
                f"num_generations={self.num_generations}: a GRPO group needs >= 2 rollouts (a single rollout always "
                "has advantage 0); use >= 2 or null for the preset's G"
            )
        for name in ("epochs", "ppo_epochs", "micro_batch_size", "max_prompt_tokens",
                     "discriminator_max_new_tokens", "embed_batch_size", "discriminator_batch_size", "save_every",
                     "log_every"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("max_steps", "mini_batch_size", "lora", "sample_table_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0 (0 = {name}'s default behaviour)")
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"clip_eps={self.clip_eps} must be in (0, 1) (0.2 is the paper's)")
        if self.beta < 0:
            raise ConfigError(f"beta={self.beta} must be >= 0 (0 = no KL term and no reference model)")
        if self.lr <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("lr must be > 0, weight_decay and max_grad_norm >= 0")
        self._check_tracking()
        self._check_sampling()
        if self.embedder_url and self.layout is not None:
            raise ConfigError(
                f"layout={self.layout} applies to an in-process Embedder; the Embedder behind embedder_url uses its "
                "own: drop layout (null) or embedder_url"
            )
        if not 0 < self.vllm_gpu_memory_utilization <= 1 or self.vllm_tensor_parallel_size < 1:
            raise ConfigError(
                f"vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization} must be in (0, 1] and "
                f"vllm_tensor_parallel_size={self.vllm_tensor_parallel_size} >= 1"
            )
        if self.vllm_server_base_url and not self.vllm_server_base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"vllm_server_base_url={self.vllm_server_base_url!r} must start with http:// or https://"
            )
        self.reward_config()  # validates the reward knobs now, with RewardConfig's messages

    def reward_config(self) -> Any:
        """The resolved :class:`RewardConfig` (preset + overrides)."""
        knobs = {"w_format": self.w_format, "w_process": self.w_process, "w_outcome": self.w_outcome,
                 "acc_mode": self.acc_mode}  # fmt: skip
        clash = sorted(set(knobs) & set(self.reward_overrides))
        if clash:
            raise ConfigError(f"reward_overrides sets {clash}, which are fields of their own; set them there instead")
        reward_fields = {f.name for f in dataclasses.fields(RewardConfig)} - {"preset"}
        unknown = sorted(set(self.reward_overrides) - reward_fields)
        if unknown:
            raise ConfigError(f"reward_overrides has unknown key(s) {unknown}; valid: {sorted(reward_fields)}")
        overrides = {k: v for k, v in {**knobs, **self.reward_overrides}.items() if v is not None}
        try:
            return RewardConfig.from_preset(self.preset, **overrides)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"reward settings: {err}") from err

    @property
    def group_size(self) -> int:
        """Rollouts per prompt: ``num_generations`` or the preset's."""
        return self.num_generations or PRESET_NUM_GENERATIONS[self.preset]


@dataclass
class EvalConfig(EvalRunFields):
    """`embedrl eval world`: retrieval evaluation of an Embedder on the synthetic world's suite (docs/method.md §6).

    T-CoTs come from ``tcot_source``: the world's stored teacher T-CoTs, the stored noise-free ones (``oracle``: the
    teacher with every imperfection rate at 0), a Reasoner checkpoint (query side with the query family, every unique
    candidate once with its target family), or none (``mode: raw``). Generated T-CoTs and
    embeddings are cached under ``cache_dir``, so a rerun after a kill recomputes only unfinished batches.
    """

    world: str = field(default="", metadata=_help("world directory written by `embedrl world generate` (required)"))
    embedder: str = field(default="", metadata=_help(_EMBEDDER_DIR + " (required)"))
    out: str = field(
        default="", metadata=_help("output dir: scores/, summary.md/.json, leaderboard.json, config.json (required)")
    )
    name: str = field(
        default="", metadata=_help("run label recorded as model_name; '' = '<embedder> (<tcot_source>, <mode>)'")
    )
    tasks: list[str] = field(default_factory=list, metadata=_help("evaluate these manifest tasks only; [] = all"))
    mode: Literal["full", "answer_only", "no_evidence", "raw"] = field(
        default="full", metadata=_help("Embedder mode on both sides (docs/method.md §6.4); raw needs tcot_source none")
    )
    tcot_source: Literal["teacher", "oracle", "reasoner", "none"] = field(
        default="teacher",
        metadata=_help(
            "T-CoTs: the world's teacher T-CoTs, its noise-free oracle T-CoTs, a Reasoner checkpoint, or none (raw)"
        ),
    )
    reasoner: str = field(default="", metadata=_help("Reasoner checkpoint directory (only with tcot_source reasoner)"))
    on_missing_tcot: Literal["error", "raw"] = field(
        default="error", metadata=_help("an item without a T-CoT raises (error) or is embedded raw and counted (raw)")
    )

    def __post_init__(self) -> None:
        _require(self, ("world", "embedder", "out"), "embedrl eval world")
        self._check_tcot_source("teacher, oracle or reasoner")
        if self.tcot_source != "reasoner" and self.reasoner:
            raise ConfigError(
                f"reasoner is set but tcot_source={self.tcot_source}; drop it or use tcot_source reasoner"
            )
        self._check_run()


@dataclass
class IndexConfig(EmbedRunFields):
    """`embedrl index build`: a FAISS index over a corpus of items, embedded through the full pipeline.

    Each candidate gets its target-side T-CoT once (``tcot_source``): generated by a Reasoner and cached, taken from
    the corpus items, or none (``mode: raw``). T-CoTs and embeddings are cached under ``<out>/cache`` batch by batch,
    so a killed build resumes where it stopped. ``docs/serve.md`` describes the index directory.
    """

    model: str = field(default="", metadata=_help(_EMBEDDER_DIR + " (required)"))
    corpus: str = field(
        default="", metadata=_help("JSONL of items, one per line (id, text, instruction, images, frames, tcot, meta)")
    )
    out: str = field(default="", metadata=_help("index directory to write (required)"))
    mode: Literal["full", "answer_only", "no_evidence", "raw"] = field(
        default="full",
        metadata=_help("Embedder mode of candidates and queries (docs/method.md §6.4); raw needs tcot none"),
    )
    tcot_source: Literal["reasoner", "corpus", "none"] = field(
        default="reasoner",
        metadata=_help("candidate T-CoTs: generated by --reasoner, the corpus items' own tcot, or none (mode raw)"),
    )
    reasoner: str = field(default="", metadata=_help("Reasoner checkpoint dir (tcot_source reasoner; queries too)"))
    greedy: bool = field(default=True, metadata=_help("greedy T-CoTs (reproducible); false samples with the seed"))
    index_type: Literal["flat", "hnsw", "ivf"] = field(
        default="flat", metadata=_help("flat: exact inner product; hnsw or ivf: approximate, for large corpora")
    )
    hnsw_m: int = field(default=32, metadata=_help("HNSW: neighbours per node (M)"))
    hnsw_ef_construction: int = field(default=200, metadata=_help("HNSW: candidate list size while building"))
    hnsw_ef_search: int = field(default=64, metadata=_help("HNSW: candidate list size while searching"))
    ivf_nlist: int = field(default=0, metadata=_help("IVF: number of clusters; 0 = about 4 * sqrt(corpus size)"))
    ivf_nprobe: int = field(default=8, metadata=_help("IVF: clusters visited per query"))

    def __post_init__(self) -> None:
        _require(self, ("model", "corpus", "out"), "embedrl index build")
        self._check_tcot_source("reasoner or corpus")
        self._check_run()
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.ivf_nlist < 0:
            raise ConfigError(f"ivf_nlist={self.ivf_nlist} must be >= 0 (0 = about 4 * sqrt(corpus size))")


@dataclass
class ServeConfig(PromptStyleFields, EngineFields, ModelLoadFields, ThreadsFields, EmbedderLayoutFields):
    """`embedrl serve`: the OpenAI-compatible HTTP server (embeddings, chat completions, index search).

    Serves an Embedder (``/v1/embeddings``), chat models (``/v1/chat/completions``: the Reasoner and/or
    ``chat_model``) and an index (``/search``); at least one of them. Requests are micro-batched; every input limit
    below answers a 4xx JSON error that names it. ``docs/serve.md`` documents the endpoints.
    """

    model: str = field(default="", metadata=_help(_EMBEDDER_DIR + " ('' = no embeddings)"))
    reasoner: str = field(
        default="", metadata=_help("Reasoner checkpoint dir: query T-CoTs, and served as a chat model ('' = none)")
    )
    chat_model: str = field(
        default="", metadata=_help("another local chat checkpoint (Qwen-VL or text causal LM) to serve ('' = none)")
    )
    index: str = field(default="", metadata=_help("index directory from `embedrl index build` ('' = no /search)"))
    embedder_name: str = field(default="embedder", metadata=_help("model name of the Embedder in requests"))
    reasoner_name: str = field(default="reasoner", metadata=_help("model name of the Reasoner in chat requests"))
    chat_model_name: str = field(default="chat", metadata=_help("model name of chat_model in chat requests"))
    tcot_greedy: bool = field(default=True, metadata=_help("greedy query T-CoTs for /v1/embeddings (reproducible)"))
    tcot_temperature: float = field(default=1.0, metadata=_help("T-CoT sampling temperature when not greedy"))
    tcot_max_new_tokens: int = field(default=256, metadata=_help("longest T-CoT generated for /v1/embeddings"))
    tcot_seed: int = field(default=0, metadata=_help("T-CoT decoding seed"))
    host: str = field(default="127.0.0.1", metadata=_help("address to bind (0.0.0.0 listens on every interface)"))
    port: int = field(default=8000, metadata=_help("TCP port (0 = any free port)"))
    api_key: str = field(
        default="", metadata=_help("bearer token required in 'Authorization: Bearer ...' ('' = no auth)")
    )
    api_key_env: str = field(
        default="", metadata=_help("name of an environment variable holding the bearer token (keeps it off argv)")
    )
    media_root: str = field(
        default="", metadata=_help("client file paths are read only under this directory ('' = no file paths)")
    )
    max_batch_size: int = field(default=16, metadata=_help("requests merged into one model batch at most"))
    max_wait_ms: float = field(default=5.0, metadata=_help("how long the batcher waits for more requests"))
    max_request_bytes: int = field(default=32 * 2**20, metadata=_help("largest request body in bytes (413 above)"))
    max_inputs: int = field(default=64, metadata=_help("inputs per /v1/embeddings request at most"))
    max_images: int = field(default=16, metadata=_help("images per input or chat request at most"))
    max_frames: int = field(default=64, metadata=_help("video frames per input at most"))
    max_image_pixels: int = field(default=4096 * 4096, metadata=_help("width x height of one image at most"))
    max_text_chars: int = field(default=100_000, metadata=_help("characters of text per input or message at most"))
    max_tokens_limit: int = field(default=2048, metadata=_help("largest max_tokens a chat request may ask for"))
    max_n: int = field(default=8, metadata=_help("largest n (choices per chat request)"))
    max_k: int = field(default=1000, metadata=_help("largest k of a /search request"))
    max_tcot_chars: int = field(
        default=16384, metadata=_help("characters of a client's tcot at most (keeps its parse under ~50 ms)")
    )
    max_request_pixels: int = field(
        default=64 * 2**20, metadata=_help("width x height summed over a request's images and frames (413 above)")
    )
    max_request_frames: int = field(default=256, metadata=_help("video frames of one request at most (413 above)"))
    max_batch_pixels: int = field(
        default=256 * 2**20, metadata=_help("decoded pixels of the requests merged into one model batch at most")
    )
    max_batch_frames: int = field(default=1024, metadata=_help("video frames of one model batch at most"))
    decode_threads: int = field(default=4, metadata=_help("threads that read and decode media off the event loop"))
    batch_size: int = field(default=16, metadata=_help("items per Embedder forward inside one micro-batch"))
    device: str = field(default="cpu", metadata=_help("torch device of every loaded model"))

    def __post_init__(self) -> None:
        names = [self.embedder_name, self.reasoner_name, self.chat_model_name]
        if len(set(names)) != len(names) or not all(names):
            raise ConfigError(
                f"embedder_name, reasoner_name and chat_model_name must be distinct and non-empty: {names}"
            )
        if self.api_key and self.api_key_env:
            raise ConfigError("set api_key or api_key_env, not both")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port={self.port} must be in [0, 65535]")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms={self.max_wait_ms} must be >= 0")
        if not self.tcot_greedy and self.tcot_temperature <= 0:
            raise ConfigError(f"tcot_temperature={self.tcot_temperature} must be > 0; set tcot_greedy: true instead")
        for name in ("max_batch_size", "max_request_bytes", "max_inputs", "max_images", "max_frames",
                     "max_image_pixels", "max_text_chars", "max_tokens_limit", "max_n", "max_k", "batch_size",
                     "tcot_max_new_tokens", "max_tcot_chars", "max_request_pixels", "max_request_frames",
                     "max_batch_pixels", "max_batch_frames", "decode_threads"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for what in ("pixels", "frames"):
            request, batch = getattr(self, f"max_request_{what}"), getattr(self, f"max_batch_{what}")
            if request > batch:
                raise ConfigError(f"max_request_{what}={request} exceeds max_batch_{what}={batch}: no batch fits it")
        self._check_engine(self.device)
        self._check_threads()

    def bearer_token(self) -> str:
        """The configured bearer token: ``api_key``, or the value of ``api_key_env`` ('' = no auth)."""
        if not self.api_key_env:
            return self.api_key
        token = os.environ.get(self.api_key_env, "")
        if not token:
            raise ConfigError(f"api_key_env={self.api_key_env!r} but that environment variable is unset or empty")
        return token


@dataclass
class BenchmarkEvalConfig(EvalRunFields):
    """Fields shared by `embedrl eval mmeb` and `embedrl eval uvrb` (real benchmarks from a local data folder).

    Without ``reasoner`` or ``tcot_cache`` the Embedder runs in ``raw`` mode (no T-CoTs); with a Reasoner, every
    query and every unique candidate gets a Reasoner T-CoT (cached); with ``tcot_cache``, the T-CoTs of that file
    (e.g. the published ones, ``embedrl eval import-tcots``; items without one are embedded raw and counted).
    ``mode`` applies to both sides.
    """

    data: str = field(default="", metadata=_help("benchmark data folder in the distributed layout (required)"))
    model: str = field(default="", metadata=_help(_EMBEDDER_DIR + " (required)"))
    out: str = field(default="", metadata=_help("output dir: scores/, predictions/, summaries, config.json"))
    name: str = field(default="", metadata=_help("run label recorded as model_name; '' = the model directory's name"))
    tasks: list[str] = field(default_factory=list, metadata=_help("dataset keys to evaluate; [] = all scored ones"))
    reasoner: str = field(default="", metadata=_help("Reasoner checkpoint for T-CoTs on both sides ('' = raw mode)"))
    tcot_cache: str = field(
        default="",
        metadata=_help(
            "T-CoT file written by `embedrl eval import-tcots` (the published T-CoTs): no Reasoner is loaded, items "
            "without a T-CoT in it are embedded raw and counted ('' = none)"
        ),
    )
    mode: Literal["auto", "full", "answer_only", "no_evidence", "raw"] = field(
        default="auto",
        metadata=_help("Embedder mode (docs/method.md §6.4); auto = full with T-CoTs (Reasoner or file), raw without"),
    )
    max_new_tokens: int = field(default=1024, metadata=_help("longest generated T-CoT, in tokens"))
    num_frames: int = field(default=8, metadata=_help("frames sampled uniformly per video (benchmarks: 8)"))
    limit: int = field(default=0, metadata=_help("read only the first N queries per dataset (0 = all; smoke runs)"))
    on_bad_row: Literal["stop", "skip"] = field(
        default="stop", metadata=_help("a malformed row or missing media file stops the run, or is skipped (counted)")
    )

    @property
    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "full" if self.reasoner or self.tcot_cache else "raw"

    def __post_init__(self) -> None:
        _require(self, ("data", "model", "out"))
        if self.reasoner and self.tcot_cache:
            raise ConfigError("reasoner and tcot_cache are two T-CoT sources: pass one of them")
        if (self.reasoner or self.tcot_cache) and self.mode == "raw":
            raise ConfigError(
                "mode=raw embeds no T-CoT: drop --reasoner/--tcot_cache, or pick mode full/answer_only/no_evidence"
            )
        if not (self.reasoner or self.tcot_cache) and self.mode not in ("auto", "raw"):
            raise ConfigError(f"mode={self.mode} needs T-CoTs: pass --reasoner DIR or --tcot_cache FILE, or mode raw")
        if self.tcot_cache and not Path(self.tcot_cache).is_file():
            raise ConfigError(f"tcot_cache {self.tcot_cache} does not exist; write it with embedrl eval import-tcots")
        self._check_run()
        if self.num_frames < 1:
            raise ConfigError(f"num_frames={self.num_frames} must be >= 1")
        if self.limit < 0:
            raise ConfigError(f"limit={self.limit} must be >= 0 (0 = all queries)")


@dataclass
class MMEBEvalConfig(BenchmarkEvalConfig):
    """`embedrl eval mmeb`: MMEB-V2 (78 datasets) from the distributed layout (docs/eval.md §5)."""

    page_labels: Literal["fixed", "old"] = field(
        default="fixed",
        metadata=_help("labels of ViDoSeek-page / MMLongBench-page: fixed (annotations/<key>-fixed) or old"),
    )
    benchmark_version: str = field(default="v2.1", metadata=_help("MMEB-V2 release recorded in the metadata"))
    check_counts: bool = field(
        default=True, metadata=_help("require each dataset's query count to match the registry (false: partial data)")
    )


@dataclass
class UVRBEvalConfig(BenchmarkEvalConfig):
    """`embedrl eval uvrb`: the 16 UVRB datasets from the extracted hub layout (docs/eval.md §6)."""

    query_instructions: Literal["all", "reference"] | None = field(
        default=None,
        metadata=_help(
            "query instructions for every dataset (all, as intended), or only CMRB and DiDeMo (reference, as the "
            "reference run applied them); null = reference with layout reference, all otherwise"
        ),
    )
    max_text_chars: int = field(default=8192, metadata=_help("query texts are truncated to this many characters"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_text_chars < 1:
            raise ConfigError(f"max_text_chars={self.max_text_chars} must be >= 1")


@dataclass
class ConvertDataset:
    """One training dataset of `embedrl convert` (docs/method.md §5.1, §5.7)."""

    source: Literal["mmeb_train", "llava_hound", "vidore", "visrag"] = field(
        default="mmeb_train", metadata=_help("source collection: mmeb_train, llava_hound, vidore or visrag")
    )
    subset: str = field(
        default="", metadata=_help("subset in the source (MMEB-train folder, or caption_retrieval/video_qa/…)")
    )
    cap: int = field(default=50_000, metadata=_help("at most this many pairs, sampled uniformly with the seed"))
    weight: float = field(default=1.0, metadata=_help("contrastive sampling weight (p ∝ weight × kept pairs)"))
    contrastive: bool = field(default=True, metadata=_help("false: converted, but kept out of the contrastive set"))

    def __post_init__(self) -> None:
        if self.cap < 1:
            raise ConfigError(f"cap={self.cap} must be >= 1")
        if self.weight < 0:
            raise ConfigError(f"weight={self.weight} must be >= 0")


def _default_convert_datasets() -> dict[str, ConvertDataset]:
    """docs/method.md §5.1 and §5.7 (paper Table 5): caps, weights and the three classification sets kept out."""
    mmeb = {
        "A-OKVQA": ("A-OKVQA", 0.26, True), "CIRR": ("CIRR", 0.43, True), "ChartQA": ("ChartQA", 0.35, True),
        "DocVQA": ("DocVQA", 0.84, True), "HatefulMemes": ("HatefulMemes", 0.30, False),
        "ImageNet-1K": ("ImageNet_1K", 2.25, True), "InfographicsVQA": ("InfographicsVQA", 0.31, True),
        "MSCOCO": ("MSCOCO", 3.78, True), "MSCOCO_i2t": ("MSCOCO_i2t", 2.58, True),
        "MSCOCO_t2i": ("MSCOCO_t2i", 2.32, True), "N24News": ("N24News", 1.65, False),
        "NIGHTS": ("NIGHTS", 0.23, True), "OK-VQA": ("OK-VQA", 0.25, True), "SUN397": ("SUN397", 0.22, True),
        "VOC2007": ("VOC2007", 0.24, False), "Visual7W": ("Visual7W", 1.68, True), "VisDial": ("VisDial", 3.75, True),
        "VisualNews_i2t": ("VisualNews_i2t", 2.91, True), "VisualNews_t2i": ("VisualNews_t2i", 3.49, True),
        "WebQA": ("WebQA", 0.23, True),
    }  # fmt: skip
    out = {k: ConvertDataset("mmeb_train", sub, 50_000, w, c) for k, (sub, w, c) in mmeb.items()}
    for name, sub, weight in (
        ("LLaVA-Hound_caption_retrieval", "caption_retrieval", 5.27),
        ("LLaVA-Hound_video_qa", "video_qa", 4.38),
        ("LLaVA-Hound_video_retrieval", "video_retrieval", 5.76),
    ):
        out[name] = ConvertDataset("llava_hound", sub, 300_000, weight, True)
    out["ViDoRe"] = ConvertDataset("vidore", "", 100_000, 5.0, True)
    out["VisRAG"] = ConvertDataset("visrag", "", 100_000, 6.0, True)
    return out


@dataclass
class ConvertConfig:
    """`embedrl convert`: MMEB-train, LLaVA-Hound, ViDoRe and VisRAG rows -> pairs JSONL (docs/data.md §7)."""

    out: str = field(default="", metadata=_help("output dir: <dataset>.jsonl per dataset + convert.json (required)"))
    mmeb_train: str = field(default="", metadata=_help("MMEB-train folder: <subset>/train.* rows + image files"))
    llava_hound: str = field(default="", metadata=_help("LLaVA-Hound folder: caption/qa rows + frames/<video id>/"))
    vidore: str = field(default="", metadata=_help("ViDoRe train-set folder: train.* rows (query, image)"))
    visrag: str = field(default="", metadata=_help("VisRAG in-domain folder: train.* rows (query, image)"))
    only: list[str] = field(default_factory=list, metadata=_help("convert these datasets only; [] = every dataset"))
    datasets: dict[str, ConvertDataset] = field(
        default_factory=_default_convert_datasets, metadata=_help("dataset name -> source, subset, cap, weight")
    )
    num_frames: int = field(default=8, metadata=_help("frames sampled uniformly per training video"))
    seed: int = field(default=0, metadata=_help("seed of the uniform sampling down to each cap"))
    on_bad_row: Literal["stop", "skip"] = field(
        default="stop", metadata=_help("a malformed row or missing media file stops the run, or is skipped (counted)")
    )
    show_progress_bar: bool = field(default=True, metadata=_help("tqdm bars over rows"))

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("out is empty: pass --out DIR")
        unknown = [d for d in self.only if d not in self.datasets]
        if unknown:
            raise ConfigError(f"only names unknown dataset(s) {unknown}; known: {sorted(self.datasets)}")
        if self.num_frames < 1:
            raise ConfigError(f"num_frames={self.num_frames} must be >= 1")


@dataclass
class AnnotatorSettings(SamplingFields, PromptStyleFields, EngineFields, ModelLoadFields, ThreadsFields):
    """The annotator: the chat model that writes the T-CoTs of ``embedrl annotate`` and judges them in ``embedrl
    filter`` (the paper's teacher, docs/method.md §5.2), a local checkpoint (transformers or vLLM) or any
    OpenAI-compatible endpoint."""

    backend: Literal["local", "vllm", "openai"] = field(  # type: ignore[assignment]  # EngineFields' hf = local
        default="local",
        metadata=_help(
            "local (a checkpoint on transformers: the hf engine), vllm (a checkpoint on an in-process vLLM, GPU) or "
            "openai (an OpenAI-compatible server)"
        ),
    )
    model: str = field(default="", metadata=_help("local: checkpoint directory; openai: the served model name"))
    base_url: str = field(default="", metadata=_help("openai: endpoint base URL ending in /v1 (e.g. a vLLM server)"))
    api_key_env: str = field(
        default="OPENAI_API_KEY", metadata=_help("environment variable with the endpoint's API key (may be unset)")
    )
    temperature: float = field(default=0.0, metadata=_help("sampling temperature; 0 = greedy (docs/method.md §5.2)"))
    max_new_tokens: int = field(default=4096, metadata=_help("longest reply, in tokens"))
    seed: int = field(default=0, metadata=_help("request seed (endpoints that support it)"))
    concurrency: int = field(default=8, metadata=_help("openai: requests in flight at once"))
    max_retries: int = field(default=5, metadata=_help("openai: retries of a failed request (429, 5xx, network)"))
    backoff_s: float = field(default=1.0, metadata=_help("openai: first retry delay; doubles per retry"))
    max_backoff_s: float = field(default=60.0, metadata=_help("openai: longest retry delay"))
    timeout_s: float = field(default=600.0, metadata=_help("openai: seconds to wait for one reply"))
    batch_size: int = field(
        default=4, metadata=_help("local/vllm: prompts per generate call (local: sorted by prompt length first)")
    )
    gpu_memory_utilization: float = field(
        default=0.9, metadata=_help("vllm: share of the GPU's memory vLLM may take (the annotator is alone on it)")
    )
    device: str = field(default="cpu", metadata=_help("local: torch device"))

    def __post_init__(self) -> None:
        if self.backend == "openai" and not self.base_url:
            raise ConfigError("backend=openai needs base_url (e.g. http://localhost:8000/v1)")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        self._check_sampling(greedy=self.temperature == 0)
        for name in ("concurrency", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_retries < 0 or self.backoff_s < 0 or self.max_backoff_s < self.backoff_s or self.timeout_s <= 0:
            raise ConfigError("need max_retries >= 0, 0 <= backoff_s <= max_backoff_s and timeout_s > 0")
        self._check_engine(self.device)
        self._check_threads()


@dataclass
class AnnotateConfig:
    """`embedrl annotate`: annotator T-CoTs for the query and the positive of every pair (docs/method.md §5.2–§5.4)."""

    input: str = field(default="", metadata=_help("pairs JSONL file, or a folder of them (from embedrl convert)"))
    out: str = field(default="", metadata=_help("output folder: <name>.jsonl annotated pairs + resumable journals"))
    annotator: AnnotatorSettings = field(
        default_factory=AnnotatorSettings, metadata=_help("the annotator chat model (the paper's teacher)")
    )
    answer_conditioned_fraction: float = field(
        default=0.0, metadata=_help("share of queries annotated with the positive as a hint (0 = off; reference 0.5)")
    )
    answer_selection: Literal["parity", "random"] = field(
        default="parity", metadata=_help("which queries get the hint: even indices (parity) or seeded random")
    )
    seed: int = field(default=0, metadata=_help("seed of the random answer selection"))
    limit: int = field(default=0, metadata=_help("annotate only the first N pairs per file (0 = all)"))
    on_bad_row: Literal["stop", "skip"] = field(
        default="stop", metadata=_help("a malformed pair or missing media file stops the run, or is skipped")
    )
    show_progress_bar: bool = field(default=True, metadata=_help("tqdm bar over requests"))

    def __post_init__(self) -> None:
        _require(self, ("input", "out"))
        if not self.annotator.model:
            raise ConfigError("annotator.model is empty: pass --annotator.model (checkpoint dir or served model name)")
        if not 0 <= self.answer_conditioned_fraction <= 1:
            raise ConfigError(f"answer_conditioned_fraction={self.answer_conditioned_fraction} must be in [0, 1]")
        if self.answer_selection == "parity" and self.answer_conditioned_fraction not in (0.0, 0.5):
            raise ConfigError("answer_selection=parity conditions every even index (fraction 0.5); use random")
        if self.limit < 0:
            raise ConfigError(f"limit={self.limit} must be >= 0")


def _default_rl_counts() -> dict[str, int]:
    """docs/method.md §5.8 (paper Table 6): 19,000 RL pairs from 13 datasets."""
    counts = dict.fromkeys(
        ("A-OKVQA", "ChartQA", "OK-VQA", "Visual7W", "VisualNews_i2t", "VisualNews_t2i", "N24News"), 1000
    )
    counts |= dict.fromkeys(
        ("CIRR", "ViDoRe", "VisRAG", "LLaVA-Hound_video_retrieval", "LLaVA-Hound_video_qa",
         "LLaVA-Hound_caption_retrieval"), 2000
    )  # fmt: skip
    return counts


@dataclass
class FilterConfig:
    """`embedrl filter`: relevance judge, then the contrastive set and the RL set (docs/method.md §5.5, §5.6)."""

    input: str = field(default="", metadata=_help("annotated pairs JSONL file or folder (from embedrl annotate)"))
    out: str = field(default="", metadata=_help("output folder: contrastive/, rl.jsonl, filter.json, journals"))
    judge: AnnotatorSettings = field(
        default_factory=AnnotatorSettings, metadata=_help("the judge (the annotator model, T=0)")
    )
    exclude_from_contrastive: list[str] = field(
        default_factory=lambda: ["HatefulMemes", "N24News", "VOC2007"],
        metadata=_help("datasets kept out of the contrastive set (docs/method.md §3.6)"),
    )
    rl_pool: Literal["rejected", "kept"] = field(
        default="rejected", metadata=_help("RL pairs come from the judge-rejected pairs or from the kept ones")
    )
    rl_counts: dict[str, int] = field(
        default_factory=_default_rl_counts, metadata=_help("dataset -> RL pairs, sampled equidistantly")
    )
    on_bad_row: Literal["stop", "skip"] = field(
        default="stop", metadata=_help("a malformed annotated pair stops the run, or is skipped and counted")
    )
    show_progress_bar: bool = field(default=True, metadata=_help("tqdm bar over judge requests"))

    def __post_init__(self) -> None:
        _require(self, ("input", "out"))
        if not self.judge.model:
            raise ConfigError("judge.model is empty: pass --judge.model (checkpoint dir or served model name)")
        bad = {k: v for k, v in self.rl_counts.items() if v < 0}
        if bad:
            raise ConfigError(f"rl_counts must be >= 0: {bad}")


# Explicit name -> class table, used by tests that validate every YAML under configs/.
STAGE_CONFIGS: dict[str, type] = {
    "backbone": TinyBackboneConfig,
    "backbone_pretrain": BackbonePretrainConfig,
    "world": WorldConfig,
    "train_embedder": EmbedderTrainConfig,
    "train_reasoner": ReasonerTrainConfig,
    "rl": GRPOTrainConfig,
    "eval": EvalConfig,
    "index": IndexConfig,
    "serve": ServeConfig,
    "eval_mmeb": MMEBEvalConfig,
    "eval_uvrb": UVRBEvalConfig,
    "convert": ConvertConfig,
    "annotate": AnnotateConfig,
    "filter": FilterConfig,
}


# ----------------------------------------------------------------------------------------------------------------
# Validation: dict -> dataclass
# ----------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only lossless cases (int -> float, list -> tuple)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}={value!r} is not allowed; use {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}={value!r} matches none of {' | '.join(_type_name(a) for a in args)}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r} must be a list (YAML: [a, b]); got {type(value).__name__}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping; got {type(value).__name__}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, key): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields; got {value!r}")
        return config_from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer; got {type(value).__name__}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}={value!r} must be a number; got {type(value).__name__}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string; quote it in YAML")
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")  # a bug in embedrl, not user input


def config_from_dict(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
    """Build and validate the dataclass ``cls`` from a plain dict. Unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__} must be a mapping; got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    removed = getattr(cls, "REMOVED_KEYS", {})
    gone = sorted(set(data) & set(removed))
    if gone:
        raise ConfigError(
            "; ".join(f"{prefix}{key} is no longer a key of {cls.__name__}: {removed[key]}" for key in gone)
        )
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        raise ConfigError(f"unknown key(s) {names} for {cls.__name__}; valid keys: {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{cls.__name__}: {err}") from err


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The dataclass as plain YAML/JSON-ready values (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def _field_type(cls: type, dotted: str) -> Any:
    """The annotation of the field ``dotted`` (``lora.targets``: through nested sections) of ``cls``; None if
    ``cls`` has no such field (the validation names the unknown key)."""
    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _list_item_type(tp: Any) -> Any:
    """The item annotation when ``tp`` is a list or tuple annotation (``list[str] | None`` too); else None."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        inner = [arg for arg in get_args(tp) if arg is not type(None)]
        return _list_item_type(inner[0]) if len(inner) == 1 else None
    if get_origin(tp) in (list, tuple):
        return (get_args(tp) or (Any,))[0]
    return None


def parse_override(text: str, tp: Any = None) -> Any:
    """A command-line value, read as YAML: ``3`` -> 3, ``0.5`` -> 0.5, ``true`` -> True, ``[1,2]`` -> [1, 2].

    For a list-valued field (``tp``, the field's annotation, is a list or tuple) a value that is not a YAML list is
    comma-separated: ``a,b`` -> ``["a", "b"]``, ``a`` -> ``["a"]``, an empty string -> ``[]``. The items of a
    ``list[str]`` stay strings (``2017`` too); other items are read as YAML.
    """
    item_tp = _list_item_type(tp)
    if item_tp is not None and not text.lstrip().startswith("["):
        items = [part.strip() for part in text.split(",") if part.strip()]
        return items if item_tp is str else [parse_override(part) for part in items]
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Read ``path`` (YAML, optional), apply ``overrides`` (dotted keys; strings are read by
    :func:`parse_override`: as YAML, comma-separated for a list-valued key), validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
            problem = getattr(err, "problem", None) or type(err).__name__
            raise ConfigError(f"not valid YAML ({where}: {problem}): fix the file's syntax") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a YAML mapping of {cls.__name__} keys")
        data = loaded
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, parse_override(value, _field_type(cls, key)) if isinstance(value, str) else value)
    return config_from_dict(cls, data)


def save_config(cfg: Any, out_dir: str | Path, filename: str = CONFIG_FILENAME) -> Path:
    """Write the resolved config as JSON into ``out_dir`` (created if needed). Returns the file path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / filename
    payload = {"stage": type(cfg).__name__, "config": config_to_dict(cfg)}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def read_saved_config(cls: type[C], out_dir: str | Path, filename: str = CONFIG_FILENAME) -> C:
    """Read back a config written by :func:`save_config`."""
    payload = json.loads((Path(out_dir) / filename).read_text())
    if payload.get("stage") != cls.__name__:
        raise ConfigError(f"{out_dir}/{filename} holds a {payload.get('stage')} config, not {cls.__name__}")
    return config_from_dict(cls, payload["config"])


# Keys that may change between a run and its resume: they do not change what the run computes.
RESUME_FREE_KEYS = frozenset(
    {"resume", "overwrite", "device", "log_every", "save_every", "eval_every", "report_to", "threads"}
)


def check_run_dir(
    cfg: Any,
    out: str | Path,
    *,
    resume: bool,
    overwrite: bool,
    leftovers: Sequence[str],
    free_keys: Collection[str] = (),
) -> bool:
    """Decide what a resumable stage may do with its output folder ``out``, before it writes anything there.

    Returns True when the stage should resume the run in ``out`` (same config, ``resume``), False when it starts
    fresh. With ``overwrite`` the previous run's ``leftovers`` (names inside ``out``: checkpoints, metrics, final
    folder) are deleted and the stage starts fresh.

    Raises:
        ConfigError: ``out`` holds a previous run (anything at all) and ``resume`` is off, or that run's saved
            config differs from ``cfg`` in keys other than :data:`RESUME_FREE_KEYS` and the stage's own
            ``free_keys`` (named in the message), and ``overwrite`` is off. A key the saved config lacks (a run
            saved before the key existed) counts as the key's default.
    """
    out = Path(out)
    if not out.is_dir() or not any(out.iterdir()):
        return False
    if overwrite:
        for name in leftovers:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        return False
    if not resume:
        raise ConfigError(
            f"output folder is not empty ({out}): pass --resume true to continue its run, --overwrite true to "
            "replace it, or another --out"
        )
    saved_file = out / CONFIG_FILENAME
    if not saved_file.is_file():
        raise ConfigError(
            f"output folder is not empty and holds no {CONFIG_FILENAME} ({out}): pass --overwrite true to write "
            "into it anyway, or another --out"
        )
    saved = json.loads(saved_file.read_text())
    if saved.get("stage") != type(cfg).__name__:
        raise ConfigError(
            f"output folder holds a {saved.get('stage')} run, not {type(cfg).__name__} ({saved_file}): "
            "pass another --out"
        )
    now = _flatten(config_to_dict(cfg))
    before = _flatten(_with_defaults(type(cfg), saved.get("config", {})))
    free = RESUME_FREE_KEYS | set(free_keys)
    differ = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k) and k not in free)
    if differ:
        raise ConfigError(
            f"config differs from the run being resumed in {', '.join(differ)} ({saved_file}): pass the saved "
            "values to resume it, --overwrite true to start over, or another --out"
        )
    return True


def _with_defaults(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """A saved config of ``cls`` (``data``, as :func:`save_config` wrote it) with every field it lacks, in nested
    sections too, at the field's default, as :func:`config_to_dict` writes it. A run saved before a field existed ran
    as that field's default does (a new field's default keeps the old behaviour), so its resume compares equal."""
    hints = typing.get_type_hints(cls)
    filled = dict(data)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            section = filled.get(f.name, {})
            if isinstance(section, dict):
                filled[f.name] = _with_defaults(hints[f.name], section)
        elif f.name not in filled and f.default is not dataclasses.MISSING:
            filled[f.name] = f.default
        elif f.name not in filled and f.default_factory is not dataclasses.MISSING:
            filled[f.name] = f.default_factory()
    return json.loads(json.dumps(filled))


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> ``{"lora.rank": 8, ...}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def truncate_metrics(path: str | Path, step: int) -> None:
    """Keep only the records of a metrics JSONL whose ``step`` is <= ``step`` (the step a run resumes at), so the
    resumed run logs each later step exactly once. A missing file is left missing."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _mixin_fields(cls: type) -> set[str]:
    """Fields of ``cls`` that a mixin declares (:class:`DecodingFields`, …), redeclared defaults included."""
    return {
        name
        for klass in cls.__mro__
        if klass.__dict__.get("_config_mixin", False)
        for name in inspect.get_annotations(klass)
        if name != "_config_mixin"
    }


def config_fields(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """``(dotted_name, help, default)`` for every leaf field, nested sections flattened, a stage's own fields
    before those of its mixins. Used by the CLI."""
    rows = []
    hints = typing.get_type_hints(cls)
    mixed_in = _mixin_fields(cls)
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in mixed_in):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(config_fields(tp, prefix=f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        rows.append((prefix + f.name, f.metadata.get("help", ""), default))
    return rows
