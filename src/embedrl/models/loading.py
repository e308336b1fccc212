"""The one loader: how a path or hub id becomes an Embedder or a Reasoner, and how a dtype string becomes a dtype.

Every entry point (evaluation, index build and search, the server, the RL reward, the demo's stages) loads through
:func:`load_embedder` and :func:`load_reasoner` (other chat models through :func:`load_chat_model`), and every path
or hub id becomes a local folder in :func:`resolve_checkpoint`; :func:`torch_dtype` is the one dtype handler and
``attn_implementation`` (sdpa, flash_attention_2, eager; None = transformers' choice) reaches every loaded model
(:func:`set_attn_implementation` for one built another way: the fresh Embedder ``train-embedder`` trains). The
two main loaders are exported lazily from the package root (``embedrl.load_embedder``). :func:`configure_threads`
sets torch's CPU thread count once at the start of a stage.

:func:`load_embedder` reads two kinds of folder:

- **an embedrl Embedder** (``embedder.json`` present, written by :meth:`~embedrl.models.Embedder.save`): its saved
  mode, pixel budget and input layout (``embedrl`` for an older ``embedder.json`` without one);
- **a published Embed-RL checkpoint** (a plain Hugging Face Qwen-VL folder as the authors' merge script writes it:
  ``config.json`` with ``emb_token_ids``, a tokenizer holding ``<emb>`` as an ordinary added token, the model's own
  chat template, no embedrl files): the ``reference`` layout, the reference pixel budgets, mode ``full``
  (docs/published-models.md).

``layout`` overrides the checkpoint's layout (logged in one line when it differs).

Where the folder comes from: an existing local path is used as it is; a name of the form ``owner/name`` whose first
part is not a local folder is a Hugging Face hub id, fetched with ``huggingface_hub.snapshot_download`` (the HF cache;
offline, only what is cached); anything else is a local path that does not exist, and that is an error at once,
never a hub look-up.

Example:
    >>> import embedrl
    >>> embedder = embedrl.load_embedder("ZoengHouNaam/Embed-RL-2B", dtype="bfloat16", device="cuda")  # doctest: +SKIP
    >>> embedder.layout  # doctest: +SKIP
    'reference'
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from embedrl import prompts
from embedrl.backbones import load_backbone
from embedrl.config import ConfigError, UserError
from embedrl.models.chat import ChatModel
from embedrl.models.embedder import EMBEDDER_CONFIG_FILENAME, Embedder
from embedrl.models.generation import EngineSettings
from embedrl.models.reasoner import Reasoner

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "DEFAULT_CPU_THREADS",
    "DTYPES",
    "CheckpointError",
    "configure_threads",
    "load_chat_model",
    "load_embedder",
    "load_reasoner",
    "resolve_checkpoint",
    "set_attn_implementation",
    "torch_dtype",
]

logger = logging.getLogger(__name__)

DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("sdpa", "flash_attention_2", "eager")
# torch CPU threads when neither the stage config nor OMP_NUM_THREADS says: on the shared 2-core host, 1 thread ran
# tiny-model decoding 4-25x faster than 2 under load (docs/experiments.md, 2026-12-03).
DEFAULT_CPU_THREADS = 1
# A hub repository id: owner/name, each of letters, digits, '-', '_' and '.', not starting with '.' or '-'.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*")
# The files a checkpoint folder needs (weights, configs, tokenizer, chat template); other repository files are skipped.
_CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
# Settings of a published checkpoint, which has no embedder.json: the reference layout and evaluation mode, and
# frames as separate images (what the reference does; the reference layout always does it).
PUBLISHED_MODE = "full"
PUBLISHED_VIDEO_AS = "frames"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be found or loaded: a missing local folder, a hub id that cannot be fetched, a folder
    without the ``<emb>`` token, or files that do not belong together. The message says what to do."""


def torch_dtype(name: str | torch.dtype) -> str | torch.dtype:
    """A config's ``dtype`` as the loaders take it: ``"auto"`` (the checkpoint's) or a torch dtype.

    >>> torch_dtype("bfloat16"), torch_dtype("auto")
    (torch.bfloat16, 'auto')

    Raises:
        CheckpointError: a name other than ``auto``, ``float32``, ``bfloat16`` and ``float16``.
    """
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CheckpointError(f"dtype={name!r} is not supported; use one of {', '.join(DTYPES)}")
    return "auto" if name == "auto" else getattr(torch, name)


def configure_threads(threads: int = 0, device: str | torch.device = "cpu") -> int | None:
    """Set torch's CPU thread count at the start of a stage that runs on ``device`` (once per stage; logged).

    ``threads`` > 0 is used as given; 0 means ``$OMP_NUM_THREADS`` when set, else :data:`DEFAULT_CPU_THREADS`. On an
    accelerator the models do not run on CPU threads and nothing is set (returns None); else returns the count.

    Raises:
        ConfigError: ``threads`` < 0, or an ``OMP_NUM_THREADS`` that is not a positive integer.
    """
    if threads < 0:
        raise ConfigError(f"threads={threads} must be >= 0 (0 = $OMP_NUM_THREADS, else {DEFAULT_CPU_THREADS})")
    if torch.device(device).type != "cpu":
        return None
    if not threads:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if env and not (env.isdigit() and int(env) > 0):
            raise ConfigError(f"OMP_NUM_THREADS={env!r} is not a positive integer; unset it or pass --threads N")
        threads = int(env) if env else DEFAULT_CPU_THREADS
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    logger.info("torch CPU threads: %d", threads)
    return threads


def _check_attn(attn_implementation: str | None) -> None:
    if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise CheckpointError(
            f"attn_implementation={attn_implementation!r} is not supported; use one of "
            f"{', '.join(ATTN_IMPLEMENTATIONS)} (or null: transformers' choice)"
        )


def set_attn_implementation(model: PreTrainedModel, attn_implementation: str | None) -> None:
    """Switch a loaded ``model`` (its vision and text sub-models too) to the attention kernel ``attn_implementation``;
    None keeps the one it was loaded with. For models loaded by another route (``Embedder.load``, a fresh Embedder).

    Raises:
        CheckpointError: an unknown attention implementation.
    """
    _check_attn(attn_implementation)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)


def _is_hub_id(name: str) -> bool:
    """``owner/name`` whose first part is not a local folder (``runs/final`` with a ``runs`` folder is local)."""
    return bool(_HUB_ID.fullmatch(name)) and not Path(name.split("/")[0]).exists()


def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """The local folder of a checkpoint: an existing local path, or the cached snapshot of a hub id.

    Raises:
        CheckpointError: a local path that does not exist or is not a folder (never looked up on the hub), or a hub
            id that cannot be fetched (offline and not cached, unknown, gated).
    """
    name = str(path_or_id)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file, not a checkpoint folder")
        return path
    if isinstance(path_or_id, Path) or not _is_hub_id(name):
        raise CheckpointError(
            f"{name} does not exist: no such local checkpoint folder (a local path is never looked up on the "
            "Hugging Face hub; a hub id has the form owner/name)"
        )
    try:
        return Path(snapshot_download(name, allow_patterns=_CHECKPOINT_FILES))
    except (OSError, ValueError, HfHubHTTPError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(
            f"could not fetch {name} from the Hugging Face hub ({type(err).__name__}: {reason}); check the id and "
            "the network, or download the folder and pass its path (HF_HUB_OFFLINE=1 allows cached ids only)"
        ) from err


def _published_emb_token_id(folder: Path) -> int:
    """The ``<emb>`` id of a published checkpoint: ``config.emb_token_ids[0]``, else the tokenizer's ``<emb>``."""
    config = AutoConfig.from_pretrained(folder)
    recorded = getattr(config, prompts.EMB_CONFIG_KEY, None)
    if recorded:
        ids = recorded if isinstance(recorded, (list, tuple)) else [recorded]
        return int(ids[0])  # a one-element list; the reference reads its first entry
    emb_id = AutoTokenizer.from_pretrained(folder).get_vocab().get(prompts.EMB_TOKEN)
    if emb_id is None:
        raise CheckpointError(
            f"{folder} is not an Embedder: it has no {EMBEDDER_CONFIG_FILENAME}, its config.json has no "
            f"{prompts.EMB_CONFIG_KEY} and its tokenizer has no {prompts.EMB_TOKEN} token. Pass a published Embed-RL "
            "checkpoint or a folder written by Embedder.save (a plain backbone becomes an Embedder with "
            "`embedrl train-embedder`)"
        )
    return int(emb_id)


def load_embedder(
    path_or_id: str | Path,
    *,
    layout: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> Embedder:
    """The Embedder in a folder or hub repository: an embedrl Embedder, or a published Embed-RL checkpoint.

    Args:
        path_or_id: a local folder, or a hub id such as ``"ZoengHouNaam/Embed-RL-2B"`` (:func:`resolve_checkpoint`).
        layout: ``embedrl`` or ``reference`` (``prompts.LAYOUTS``); None = the checkpoint's (``embedder.json``'s, or
            ``reference`` for a published checkpoint). A value that differs from the checkpoint's is logged.
        dtype: ``auto`` (the checkpoint's), ``float32``, ``bfloat16``, ``float16`` or a torch dtype.
        device: where to put the model.
        attn_implementation: sdpa, flash_attention_2 or eager; None = transformers' choice.

    Raises:
        CheckpointError: an unknown layout or attention implementation, or a folder that cannot be found or fetched,
            has no ``<emb>`` token, or whose files disagree.
    """
    if layout is not None and layout not in prompts.LAYOUTS:
        raise CheckpointError(f"layout={layout!r}; use one of {', '.join(prompts.LAYOUTS)}")
    _check_attn(attn_implementation)
    folder = resolve_checkpoint(path_or_id)
    dtype = torch_dtype(dtype)
    try:
        if (folder / EMBEDDER_CONFIG_FILENAME).is_file():
            embedder = Embedder.load(folder, dtype=dtype, device=device)
            set_attn_implementation(embedder.model, attn_implementation)
            own = embedder.layout
        else:
            emb_id = _published_emb_token_id(folder)
            model, processor = load_backbone(folder, dtype=dtype, device=device,
                                             attn_implementation=attn_implementation)  # fmt: skip
            own = prompts.LAYOUT_REFERENCE
            embedder = Embedder(model, processor, emb_token_id=emb_id, mode=PUBLISHED_MODE,
                                video_as=PUBLISHED_VIDEO_AS, layout=own)  # fmt: skip
    except CheckpointError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as err:  # files that do not load or do not belong together
        raise CheckpointError(f"cannot load an Embedder from {path_or_id}: {err}") from err
    if layout is not None and layout != own:
        logger.info("Embedder %s: input layout %s instead of the checkpoint's %s", path_or_id, layout, own)
        embedder.layout = layout
    return embedder


def load_reasoner(
    path_or_id: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    compact_prompts: bool | None = None,
    engine: EngineSettings | None = None,
    attn_implementation: str | None = None,
) -> Reasoner:
    """The Reasoner (or any Qwen-VL chat checkpoint used as one) in a folder or hub repository, with the prompt style
    and decoding its ``embedrl_reasoner.json`` records (full prompts without one); ``compact_prompts`` overrides.

    ``engine`` selects the generation engine (:class:`~embedrl.models.generation.EngineSettings`; default HF): with
    ``backend="vllm"`` no HF model is loaded, only the processor and config (vLLM loads the weights itself).

    Raises:
        CheckpointError: the folder cannot be found, fetched or loaded, or an unknown attention implementation.
    """
    _check_attn(attn_implementation)
    folder = resolve_checkpoint(path_or_id)
    try:
        reasoner = Reasoner.from_pretrained(
            folder, dtype=torch_dtype(dtype), device=str(device), compact_prompts=compact_prompts, engine=engine,
            attn_implementation=attn_implementation,
        )  # fmt: skip
    except CheckpointError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"cannot load a Reasoner from {path_or_id}: {err}") from err
    reasoner.model_id = str(path_or_id)  # the name the user gave, not the hub cache's snapshot folder
    return reasoner


def load_chat_model(
    path_or_id: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    engine: EngineSettings | None = None,
    attn_implementation: str | None = None,
) -> ChatModel:
    """A chat checkpoint served or used as an annotator: a Qwen-VL family, or any text causal LM; ``engine`` as in
    :func:`load_reasoner`.

    Raises:
        CheckpointError: the folder cannot be found, fetched or loaded, or an unknown attention implementation.
    """
    _check_attn(attn_implementation)
    folder = resolve_checkpoint(path_or_id)
    try:
        return ChatModel.load(folder, dtype=torch_dtype(dtype), device=str(device), engine=engine,
                              attn_implementation=attn_implementation)  # fmt: skip
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"cannot load a chat model from {path_or_id}: {err}") from err
