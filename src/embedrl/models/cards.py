"""Model cards: the ``README.md`` of every saved Embedder, Reasoner and backbone, in the Hugging Face format.

A card is YAML front matter (``base_model`` when it is a hub id, ``library_name``, ``pipeline_tag``, ``tags``,
``datasets`` and ``license`` when known, and an ``embedrl`` block that holds what the card was written from), then
Markdown: what the model is, its exact input layout (for an Embedder: the chat :func:`~embedrl.evidence.
build_embedder_messages` builds, through the folder's own chat template, and the pooling at the last ``<emb>``; for a
Reasoner: a family prompt from :mod:`embedrl.prompts`), how to load it with embedrl, sentence-transformers (an
Embedder) and plain transformers, the training config as YAML, and evaluation results when known. Every example is
rendered from the library and the folder's processor at writing time, so a card cannot drift from the code that
wrote it.

Who writes cards: :meth:`Embedder.save <embedrl.models.Embedder.save>` and :meth:`Reasoner.save
<embedrl.models.reasoner.Reasoner.save>` (no config), the training stages right after they save (with their config),
and :func:`update_model_card_results` adds evaluation results (the demo does it for the models it trains; evaluation
stages never write into model folders).

Example:
    >>> write_model_card("runs/demo/embedder/final", "embedder", config=cfg)  # doctest: +SKIP
    >>> update_model_card_results("runs/demo/embedder/final", {"world": {"overall": 23.8}})  # doctest: +SKIP
    >>> front, body = read_model_card("runs/demo/embedder/final")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import pprint
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import AutoConfig, AutoProcessor

import embedrl.config as stage_configs
from embedrl import __version__, prompts
from embedrl.backbones.records import read_reasoner_settings
from embedrl.config import config_to_dict
from embedrl.data.schema import Item
from embedrl.evidence import build_embedder_messages

__all__ = [
    "CARD_FILENAME",
    "EXAMPLE_TCOT",
    "EXAMPLE_TEXT",
    "KINDS",
    "MODEL_PATH",
    "read_model_card",
    "reasoner_messages",
    "update_model_card_results",
    "write_model_card",
]

CARD_FILENAME = "README.md"
KINDS: tuple[str, ...] = ("embedder", "reasoner", "backbone")
# The folder placeholder of the card's code snippets (a card is read after the folder is copied or uploaded).
MODEL_PATH = "path/to/model"
# The example item the cards render: data, not format (the format comes from prompts.py and the folder's template).
EXAMPLE_INSTRUCTION = "Find an image that matches the caption:"
EXAMPLE_TEXT = "a red kite above a sandy beach"
EXAMPLE_TCOT = (
    f"{prompts.THINKING_OPEN}The caption names a kite and a beach. "
    f'{{"{prompts.CUE_KEYWORDS}": ["kite", "beach"]}}{prompts.THINKING_CLOSE}'
    f"{prompts.RETHINK_OPEN}A red kite over sand.{prompts.RETHINK_CLOSE}"
    f"{prompts.ANSWER_OPEN}A red kite above a beach.{prompts.ANSWER_CLOSE}"
)

_PIPELINE_TAGS = {"embedder": "feature-extraction", "reasoner": "image-text-to-text", "backbone": "image-text-to-text"}
_TAGS = {
    "embedder": ["embedrl", "embed-rl", "multimodal-embedding", "retrieval"],
    "reasoner": ["embedrl", "embed-rl", "t-cot", "reasoning"],
    "backbone": ["embedrl", "embed-rl"],
}
_TITLES = {"embedder": "Embedder", "reasoner": "Reasoner", "backbone": "backbone"}
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def read_model_card(path: str | Path) -> tuple[dict[str, Any], str]:
    """``(front matter, Markdown body)`` of the card in the folder ``path`` (or of the card file ``path``).

    Raises:
        FileNotFoundError: no card there.
        ValueError: the file has no YAML front matter, or front matter that is not a YAML mapping.
    """
    file = Path(path)
    file = file / CARD_FILENAME if file.is_dir() else file
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: the folder has no model card (write one with write_model_card)")
    text = file.read_text(encoding="utf-8")
    match = _FRONT_MATTER.match(text)
    if match is None:
        raise ValueError(f"{file} has no YAML front matter (a '---' block at the top): not a model card")
    front = yaml.safe_load(match.group(1))
    if not isinstance(front, dict):
        raise ValueError(f"{file}: the front matter is not a YAML mapping")
    return front, text[match.end() :]


def _config_payload(config: Any) -> dict[str, Any] | None:
    """``{"stage": <config class>, "config": {...}}`` of a stage config, a saved payload (``save_config``'s JSON),
    or a plain mapping (stage unknown)."""
    if config is None:
        return None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {"stage": type(config).__name__, "config": config_to_dict(config)}
    if isinstance(config, Mapping):
        if set(config) == {"stage", "config"}:
            return {"stage": config["stage"], "config": json.loads(json.dumps(config["config"]))}
        return {"stage": None, "config": json.loads(json.dumps(dict(config)))}
    raise TypeError(f"config must be a stage config dataclass or a mapping, got {type(config).__name__}")


def _stage_command(stage: str | None) -> str | None:
    """The command of a stage config class, read from its docstring (``"`embedrl rl`: ..."`` -> ``embedrl rl``)."""
    cls = getattr(stage_configs, stage, None) if stage else None
    match = re.match(r"`(embedrl [^`]+)`", (cls.__doc__ or "") if cls else "")
    return match.group(1) if match else None


# ----------------------------------------------------------------------------------------------------------------
# Facts of the folder and rendered examples
# ----------------------------------------------------------------------------------------------------------------


def _embedder_record(folder: Path) -> dict[str, Any]:
    # Imported here: models.embedder imports this module (Embedder.save writes the card).
    from embedrl.models.embedder import EMBEDDER_CONFIG_FILENAME

    file = folder / EMBEDDER_CONFIG_FILENAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: write an Embedder's card after Embedder.save")
    return json.loads(file.read_text())


def _chat(processor: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _embedder_messages(layout: str, mode: str) -> list[dict[str, Any]]:
    """The Embedder chat of the example text item in ``mode`` (the example T-CoT outside raw mode)."""
    item = Item(id="example", text=EXAMPLE_TEXT, instruction=EXAMPLE_INSTRUCTION)
    item = item if mode == "raw" else item.with_tcot(EXAMPLE_TCOT)
    return build_embedder_messages(item, mode, layout=layout).messages  # type: ignore[arg-type]


def reasoner_messages(compact: bool) -> list[dict[str, Any]]:
    """The Reasoner chat of the example text item on the query side (images as targets): the family prompt of
    :func:`embedrl.prompts.choose_family`, as :func:`embedrl.models.reasoner.build_reasoner_prompt` builds it for a
    text item."""
    family = prompts.PROMPT_FAMILIES[prompts.choose_family("query", "text", "image")]
    text = prompts.join_task_text(EXAMPLE_INSTRUCTION, EXAMPLE_TEXT)
    return [{"role": "user", "content": [{"type": "text", "text": family.render(compact=compact, text=text)}]}]


def _code(language: str, text: str) -> str:
    return f"```{language}\n{text.rstrip()}\n```"


def _transformers_embedder_snippet(messages: list[dict[str, Any]]) -> str:
    """Plain-transformers code that embeds the example item in raw mode (tests/test_cards.py runs it)."""
    shown = pprint.pformat(messages, width=110, sort_dicts=False)
    return f"""import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

path = "{MODEL_PATH}"
processor = AutoProcessor.from_pretrained(path)
model = AutoModelForImageTextToText.from_pretrained(path).eval()
# One text item without a T-CoT (mode raw), as embedrl.evidence.build_embedder_messages builds it:
messages = {shown}
text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
inputs = processor(text=[text], return_tensors="pt")
with torch.no_grad():
    hidden = model.model(**inputs).last_hidden_state[0]  # the vision-language model, without the LM head
emb_id = model.config.{prompts.EMB_CONFIG_KEY}[-1]  # the {prompts.EMB_TOKEN} token
last_emb = (inputs["input_ids"][0] == emb_id).nonzero()[-1, 0]
vector = torch.nn.functional.normalize(hidden[last_emb].float(), dim=-1)  # the embedding"""


def _embedder_sections(folder: Path, processor: Any) -> list[str]:
    record = _embedder_record(folder)
    config = AutoConfig.from_pretrained(folder)
    layout, mode = record.get("layout", prompts.LAYOUT_EMBEDRL), record["mode"]
    raw = _embedder_messages(layout, "raw")
    facts = {
        "family": record["family"],
        "embedding size": config.get_text_config().hidden_size,
        "mode (T-CoT and evidence)": mode,
        "input layout": layout,
        "video": record["video_as"],
        f"`{prompts.EMB_TOKEN}` id": record["emb_token_id"],
        "raw text cap (tokens)": record["max_text_tokens"] if layout == prompts.LAYOUT_EMBEDRL else "none",
        "pixel budget": ", ".join(f"{k} {v}" for k, v in record["budget"].items()),
    }
    out = [
        "An embedrl **Embedder**: a Qwen-VL model whose embedding of an input is the final-layer hidden state at the "
        f"last `{prompts.EMB_TOKEN}` token, L2-normalised. Queries and documents of any modality (text, images, video "
        "frames) are embedded the same way; in the trained mode each input carries a traceable chain of thought "
        "(T-CoT) written by an embedrl Reasoner, with the evidence it points at (crops, key frames).",
        _table(facts),
        "## Input format and pooling",
        "Each input is one chat, built by `embedrl.evidence.build_embedder_messages` (the same builder for training, "
        "rewards and inference): the user turn holds the input's images, its text (the instruction, a space, the "
        "text), its video, then the T-CoT by mode, then a closing sentence; the assistant turn holds only "
        f"`{prompts.EMB_TOKEN}`. The chat goes through the folder's chat template without a generation prompt; the "
        "base vision-language model (no LM head) runs on it, and the embedding is the hidden state at the last "
        f"`{prompts.EMB_TOKEN}`, L2-normalised. In a batch, rows are left-padded.",
        "The example item (instruction, then text), without a T-CoT (`raw`), exactly as the tokenizer sees it:",
        _code("text", _chat(processor, raw, False)),
    ]
    if mode != "raw":
        out += [
            f"The same item with a T-CoT in this Embedder's mode (`{mode}`):",
            _code("text", _chat(processor, _embedder_messages(layout, mode), False)),
        ]
    out += [
        "## Usage",
        "### embedrl",
        _code(
            "python",
            f"""import embedrl
from embedrl.data.schema import Item
from embedrl.eval.pipeline import EmbedPipeline

embedder = embedrl.load_embedder("{MODEL_PATH}")
item = Item(id="q1", text="{EXAMPLE_TEXT}", instruction="{EXAMPLE_INSTRUCTION}")
vectors = embedder.encode([item], mode="raw")  # [1, D] float32, unit norm, no T-CoT
# In the trained mode a Reasoner writes each input's T-CoT first:
pipeline = EmbedPipeline(embedder, embedrl.load_reasoner("path/to/reasoner"))
vectors, items = pipeline.run([item], embedder.mode, "query", target_modality="image")""",
        ),
        "### sentence-transformers",
        "The folder is also a sentence-transformers model; its input module is embedrl's (installed with "
        "`pip install 'embedrl[st]'`), hence `trust_remote_code=True`:",
        _code(
            "python",
            f"""from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{MODEL_PATH}", trust_remote_code=True)
query = model.encode_query("{EXAMPLE_TEXT}")""",
        ),
        "### transformers",
        "Without embedrl, for one text item (images go as `{'type': 'image'}` parts before the text and to the "
        "processor's `images=`, with the pixel budget above):",
        _code("python", _transformers_embedder_snippet(raw)),
    ]
    return out


def _reasoner_sections(folder: Path, processor: Any, kind: str) -> list[str]:
    settings = read_reasoner_settings(folder)
    compact = bool(settings.get("compact_prompts", False))
    messages = reasoner_messages(compact)
    facts = {
        "family (model_type)": AutoConfig.from_pretrained(folder).model_type,
        "prompt style": "compact" if compact else "full (five-part)",
        "default decoding": json.dumps(settings["decoding"], sort_keys=True)
        if "decoding" in settings
        else "embedrl's",
    }
    if kind == "reasoner":
        lead = (
            "An embedrl **Reasoner**: a Qwen-VL chat model that writes a traceable chain of thought (T-CoT) for a "
            f"query or a document: `{prompts.THINKING_OPEN}` reasoning ending in an evidence cue (keywords, boxes or "
            f"key frames), `{prompts.RETHINK_OPEN}`, then `{prompts.ANSWER_OPEN}`. An embedrl Embedder embeds the "
            "input together with its T-CoT."
        )
    else:
        lead = (
            "A **backbone** for embedrl: a Qwen-VL checkpoint to start an Embedder (`embedrl train-embedder`) or a "
            "Reasoner (`embedrl train-reasoner`) from."
        )
    return [
        lead,
        _table(facts),
        "## Prompt format",
        "Each input gets the prompt family its side and modality call for (`embedrl.prompts.choose_family`); the "
        "user turn holds the input's images and frames, then the family prompt. A text query routed to image "
        "documents, as the tokenizer sees it (generation prompt open):",
        _code("text", _chat(processor, messages, True)),
        "## Usage",
        "### embedrl",
        _code(
            "python",
            f"""import embedrl
from embedrl.data.schema import Item

reasoner = embedrl.load_reasoner("{MODEL_PATH}")
item = Item(id="q1", text="{EXAMPLE_TEXT}", instruction="{EXAMPLE_INSTRUCTION}")
(generation,) = reasoner.generate([item], "query", target_modality="image")[0]
print(generation.text, generation.tcot.problems)""",
        ),
        "### transformers",
        _code(
            "python",
            f"""from transformers import AutoModelForImageTextToText, AutoProcessor

path = "{MODEL_PATH}"
processor = AutoProcessor.from_pretrained(path)
model = AutoModelForImageTextToText.from_pretrained(path).eval()
messages = {pprint.pformat(messages, width=110, sort_dicts=False)}
text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
inputs = processor(text=[text], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=256, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))""",
        ),
    ]


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return str(value).replace("|", "\\|")


def _table(facts: Mapping[str, Any]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in facts.items())])


def _results_tables(results: Mapping[str, Any]) -> list[str]:
    """Scalars as one two-column table; mappings as one table with a column per entry and a row per key."""
    scalars = {k: v for k, v in results.items() if not isinstance(v, Mapping)}
    groups = {k: v for k, v in results.items() if isinstance(v, Mapping)}
    out = []
    if scalars:
        out.append(
            "\n".join(["| result | value |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in scalars.items())])
        )
    if groups:
        rows: list[str] = []
        for values in groups.values():
            rows += [key for key in values if key not in rows]
        header = "| | " + " | ".join(groups) + " |"
        lines = [header, "|---|" + "---|" * len(groups)]
        lines += [f"| {row} | " + " | ".join(_cell(v.get(row, "")) for v in groups.values()) + " |" for row in rows]
        out.append("\n".join(lines))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _is_hub_id(name: str) -> bool:
    """``owner/name`` that is not a local path: what the front matter's ``base_model`` may hold."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).expanduser().exists()


def write_model_card(
    path: str | Path,
    kind: str,
    *,
    base_model: str | None = None,
    config: Any = None,
    results: Mapping[str, Any] | None = None,
    datasets: Sequence[str] | None = None,
    license: str | None = None,
) -> Path:
    """Write ``path/README.md``: the card of the saved model in the folder ``path``, from exactly these arguments
    (an existing card is replaced; :func:`update_model_card_results` keeps one and adds results).

    Args:
        path: a folder written by ``Embedder.save`` (``kind="embedder"``) or ``Reasoner.save`` (``reasoner``, or
            ``backbone`` for a pre-trained backbone).
        kind: ``embedder``, ``reasoner`` or ``backbone``.
        base_model: the checkpoint it was trained from; a hub id also goes into the front matter's ``base_model``.
        config: the stage config (a config dataclass, or ``save_config``'s ``{"stage", "config"}`` payload).
        results: evaluation results: ``{name: value}`` and ``{name: {row: value}}`` entries, one table each kind.
        datasets: hub dataset ids it was trained on; license: its license id, when known.

    Returns:
        The card's path.

    Raises:
        ValueError: an unknown kind. FileNotFoundError: an Embedder folder without ``embedder.json``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; use one of {KINDS}")
    folder = Path(path)
    payload = _config_payload(config)
    processor = AutoProcessor.from_pretrained(folder)
    model_type = AutoConfig.from_pretrained(folder).model_type
    front: dict[str, Any] = {}
    if base_model and _is_hub_id(str(base_model)):
        front["base_model"] = str(base_model)
    tags = [*_TAGS[kind], model_type]
    if kind == "embedder" and (folder / "modules.json").is_file():  # sentence-transformers' module list
        tags.append("sentence-transformers")
    front |= {"library_name": "transformers", "pipeline_tag": _PIPELINE_TAGS[kind], "tags": tags}
    if datasets:
        front["datasets"] = list(datasets)
    if license:
        front["license"] = license
    record: dict[str, Any] = {"kind": kind, "version": __version__}
    if base_model:
        record["base_model"] = str(base_model)
    if payload is not None:
        record |= payload
    if results:
        record["results"] = json.loads(json.dumps(dict(results)))
    front["embedrl"] = record

    title = f"embedrl {_TITLES[kind]}: {folder.resolve().name}"
    if kind == "embedder":
        sections = _embedder_sections(folder, processor)
    else:
        sections = _reasoner_sections(folder, processor, kind)
    training = ["## Training"]
    command = _stage_command(payload["stage"]) if payload else None
    source = f" from `{base_model}`" if base_model else ""
    if payload is not None:
        how = f"`{command}` ({payload['stage']})" if command else "a stage whose config follows"
        training += [f"Trained with {how}{source}. The resolved config:", _code("yaml", _yaml(payload["config"]))]
    else:
        training.append(f"Saved without a training config{source} (the stage that trained it writes the config).")
    evaluation = ["## Evaluation results"]
    evaluation += _results_tables(results) if results else ["Not evaluated yet."]
    body = [f"# {title}", *sections, *training, *evaluation, f"Card written by embedrl {__version__}."]
    text = "---\n" + _yaml(front) + "---\n\n" + "\n\n".join(body) + "\n"
    file = folder / CARD_FILENAME
    file.write_text(text, encoding="utf-8")
    return file


def _yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def update_model_card_results(path: str | Path, results: Mapping[str, Any]) -> Path:
    """Add ``results`` to the card in the folder ``path`` (entries with the same name are replaced) and write it
    again, keeping its base model, config, datasets and license.

    Raises:
        FileNotFoundError: the folder has no card. ValueError: the card was not written by embedrl.
    """
    front, _ = read_model_card(path)
    record = front.get("embedrl")
    if not isinstance(record, dict) or record.get("kind") not in KINDS:
        raise ValueError(f"{Path(path) / CARD_FILENAME} was not written by embedrl (no embedrl block): not updated")
    config = {"stage": record["stage"], "config": record["config"]} if "config" in record else None
    merged = {**record.get("results", {}), **json.loads(json.dumps(dict(results)))}
    return write_model_card(
        path, record["kind"], base_model=record.get("base_model"), config=config, results=merged,
        datasets=front.get("datasets"), license=front.get("license"),
    )  # fmt: skip
