"""Annotation and the relevance filter: ``embedrl annotate`` and ``embedrl filter`` (docs/method.md §5.2–§5.9).

**Annotate.** Every pair gets two T-CoTs from the annotator, a chat model at temperature 0 (the paper's "teacher";
not the synthetic world's T-CoT writer, :mod:`embedrl.world.teacher`): the query's, with the query-side family
chosen from the query and target modalities, and the positive's, with the target-side family (it never sees the
query). The annotator is a local transformers checkpoint (:class:`LocalAnnotator`) or any OpenAI-compatible endpoint
(:class:`OpenAIAnnotator`: concurrent requests, retries with exponential backoff on 429 / 5xx / network errors, and a
loud error once the retries are spent). Each raw reply is stored with its parse result and provenance.

Answer-conditioned prompting (docs/method.md §5.4) is an explicit option, off by default: a chosen share of the queries
(``parity``: the even 0-based indices, as the reference scripts; ``random``: seeded) get a labelled hint block with
the positive's text, and for media positives a reference to the file, never its pixels.

**Resume.** Finished requests are appended to a journal (``<out>/<name>.journal.jsonl``): one JSON line per reply,
written with one ``write`` and an ``fsync``. A rerun reads the journal (dropping a line cut by a kill) and sends only
the requests without a reply. The annotated pairs (``<out>/<name>.jsonl``) are written from the journal at the end,
through a temporary file.

**Filter.** The judge (the annotator model at temperature 0) sees the query's task text and both T-CoTs and answers
one word: "Yes" (clearly unrelated or contradictory: drop) or "No" (keep); an unparseable verdict keeps the pair and
is counted. Kept pairs form the contrastive set (minus the excluded classification sets); the RL set takes
``rl_counts[dataset]`` pairs per dataset from the rejected (default) or the kept pool, equidistantly:
indices ``floor(k * n / m)``. Outputs: ``contrastive/<dataset>.jsonl``, ``rl.jsonl``, ``filtered.jsonl`` (every pair
with its ``filter`` and ``split``), ``filter.json`` (counts).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import random
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image
from tqdm.auto import tqdm

from embedrl.config import AnnotateConfig, AnnotatorSettings, FilterConfig, UserError, config_to_dict, save_config
from embedrl.data.rows import BadRows, RowError, read_rows
from embedrl.data.schema import Item, Pair
from embedrl.evidence import image_data_url
from embedrl.models.chat import ChatParams, Conversation
from embedrl.models.generation import engine_settings
from embedrl.models.http import EndpointClient, EndpointError
from embedrl.models.loading import load_chat_model
from embedrl.models.reasoner import build_reasoner_prompt, checkpoint_compact_prompts
from embedrl.prompts import ANSWER_HINT, JUDGE, join_task_text, prompt_hash
from embedrl.tcot import format_ok, parse_tcot

__all__ = [
    "AnnotationError",
    "Annotator",
    "ChatRequest",
    "Journal",
    "LocalAnnotator",
    "OpenAIAnnotator",
    "annotate",
    "annotator_compact_prompts",
    "filter_pairs",
    "judge_verdict",
    "make_annotator",
]

logger = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".journal.jsonl"


class AnnotationError(UserError, RuntimeError):
    """An annotator request failed for good, or the inputs do not fit together; the message names the request."""


# ----------------------------------------------------------------------------------------------------------------
# Annotators
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    """One annotator call: a user turn in the HF chat format (``{"type": "image"}`` placeholders, then text) and the
    images of its placeholders, in order. ``key`` identifies it in the journal."""

    key: str
    messages: list[dict[str, Any]]
    images: list[Image.Image] = dataclasses.field(default_factory=list)


class Annotator(Protocol):
    """What annotation needs of a chat model: complete requests, yielding each ``(request, reply)`` when done."""

    name: str

    def complete(self, requests: Sequence[ChatRequest]) -> Iterator[tuple[ChatRequest, str]]: ...

    def decoding(self) -> dict[str, Any]: ...


class LocalAnnotator:
    """A local checkpoint (Qwen-VL or a text causal LM) through :class:`embedrl.models.chat.ChatModel`, in batches:
    on transformers (backend ``local``: the requests sorted by prompt length into batches, finished rows dropped) or
    on an in-process vLLM (backend ``vllm``)."""

    def __init__(self, settings: AnnotatorSettings) -> None:
        self.settings = settings
        self.model = load_chat_model(
            settings.model, dtype=settings.dtype, device=settings.device,
            engine=engine_settings(settings, settings.batch_size), attn_implementation=settings.attn_implementation,
        )  # fmt: skip
        self.name = f"{settings.backend}:{settings.model}"

    def decoding(self) -> dict[str, Any]:
        s = self.settings
        return {"temperature": s.temperature, "top_p": s.top_p, "max_new_tokens": s.max_new_tokens, "seed": s.seed}

    def complete(self, requests: Sequence[ChatRequest]) -> Iterator[tuple[ChatRequest, str]]:
        s = self.settings
        params = ChatParams(max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed)
        conversations = [Conversation(r.messages, list(r.images)) for r in requests]
        for indices, outs in self.model.generate_batches(conversations, params):
            for i, (out, *_) in zip(indices, outs, strict=True):
                yield requests[i], out.text


def openai_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """The request in the OpenAI chat format: image placeholders become base64 ``image_url`` parts."""
    images = iter(request.images)
    messages = []
    for message in request.messages:
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": image_data_url(next(images))}})
            else:
                parts.append({"type": "text", "text": part["text"]})
        messages.append({"role": message["role"], "content": parts})
    return messages


class OpenAIAnnotator:
    """Any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, ``embedrl serve``, …), ``concurrency`` requests
    at a time, through the project's HTTP client (:class:`~embedrl.models.http.EndpointClient`): 429, 5xx and
    network errors are retried ``max_retries`` times with exponential backoff; any other error, or a request still
    failing after its retries, raises :class:`AnnotationError`. ``timeout_s`` bounds each whole reply (connect,
    send, headers and body together), not each read."""

    def __init__(self, settings: AnnotatorSettings, *, sleep: Any = time.sleep) -> None:
        self.settings = settings
        self.name = f"openai:{settings.model}@{settings.base_url}"
        key = os.environ.get(settings.api_key_env, "") if settings.api_key_env else ""
        self.client = EndpointClient(
            settings.base_url, what="annotator", token=key, timeout_s=settings.timeout_s,
            retries=settings.max_retries, backoff_s=settings.backoff_s, max_backoff_s=settings.max_backoff_s,
            sleep=sleep,
        )  # fmt: skip

    @property
    def requests_sent(self) -> int:
        """Requests sent to the endpoint, retries included."""
        return self.client.attempts

    def decoding(self) -> dict[str, Any]:
        s = self.settings
        return {"temperature": s.temperature, "top_p": s.top_p, "max_new_tokens": s.max_new_tokens, "seed": s.seed}

    def _post(self, request: ChatRequest) -> str:
        s = self.settings
        body = {
            "model": s.model,
            "messages": openai_messages(request),
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_new_tokens,
            "seed": s.seed,
            "n": 1,
        }
        try:
            payload = self.client.post_json("/chat/completions", body)
        except EndpointError as err:
            raise AnnotationError(f"{request.key}: {err}") from None
        try:
            return str(payload["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError) as err:
            raise AnnotationError(f"{request.key}: malformed reply from {s.base_url}: {err}") from None

    def complete(self, requests: Sequence[ChatRequest]) -> Iterator[tuple[ChatRequest, str]]:
        with concurrent.futures.ThreadPoolExecutor(self.settings.concurrency) as pool:
            futures = {pool.submit(self._post, r): r for r in requests}
            try:
                for future in concurrent.futures.as_completed(futures):
                    yield futures[future], future.result()
            finally:
                for future in futures:
                    future.cancel()


def make_annotator(settings: AnnotatorSettings) -> Annotator:
    return OpenAIAnnotator(settings) if settings.backend == "openai" else LocalAnnotator(settings)


def annotator_compact_prompts(settings: AnnotatorSettings) -> bool:
    """The annotator's prompt style: ``settings.compact_prompts``, or when null a local checkpoint's own
    (``embedrl_reasoner.json``), else the full prompts."""
    if settings.backend == "local":
        return checkpoint_compact_prompts(settings.model, settings.compact_prompts)
    return bool(settings.compact_prompts)


# ----------------------------------------------------------------------------------------------------------------
# Journal
# ----------------------------------------------------------------------------------------------------------------


class Journal:
    """Append-only JSONL of finished requests, keyed by ``record["key"]``; survives a kill at any point."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        if path.is_file():
            data = path.read_bytes()
            complete = data[: data.rfind(b"\n") + 1]
            if len(complete) != len(data):  # a line cut by a kill: drop it
                logger.warning("%s: dropping an unfinished last line", path)
                with path.open("r+b") as fh:
                    fh.truncate(len(complete))
            for lineno, line in enumerate(complete.decode("utf-8").splitlines(), 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise RowError(
                        path, lineno, "journal line is not valid JSON; delete the journal to restart"
                    ) from None
                self.done[record["key"]] = record
        path.parent.mkdir(parents=True, exist_ok=True)

    def __contains__(self, key: str) -> bool:
        return key in self.done

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done[record["key"]] = record


# ----------------------------------------------------------------------------------------------------------------
# Reading pairs
# ----------------------------------------------------------------------------------------------------------------


def input_files(path: str | Path) -> list[Path]:
    """A JSONL file, or the ``*.jsonl`` files of a folder (journals excluded), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input {path} does not exist")
    files = sorted(p for p in path.glob("*.jsonl") if not p.name.endswith(JOURNAL_SUFFIX))
    if not files:
        raise FileNotFoundError(f"{path} holds no .jsonl pairs file")
    return files


def read_pair_rows(path: Path, bad: BadRows, limit: int = 0) -> list[tuple[Pair, dict[str, Any]]]:
    """``(pair, record)`` per usable row; a malformed record or a missing media file is a :class:`RowError`."""
    out = []
    for lineno, record in read_rows(path):
        if limit and len(out) >= limit:
            break
        with bad.guard():
            try:
                pair = Pair.from_record(record, path.parent)
            except (ValueError, TypeError, KeyError) as err:
                raise RowError(path, lineno, f"not a pair record ({err})") from None
            for side, item in (("query", pair.query), ("target", pair.target)):
                for media in (*item.images, *item.frames):
                    if not Path(media).is_file():
                        raise RowError(path, lineno, f"{side} media {media} does not exist")
            out.append((pair, record))
    return out


def _rebase(record: dict[str, Any], pair: Pair, out_dir: Path) -> dict[str, Any]:
    """The record with its media paths relative to ``out_dir`` (where it is written)."""
    record = json.loads(json.dumps(record))
    for side, item in (("query", pair.query), ("target", pair.target)):
        record[side]["images"] = [os.path.relpath(Path(p).resolve(), out_dir.resolve()) for p in item.images]
        record[side]["frames"] = [os.path.relpath(Path(p).resolve(), out_dir.resolve()) for p in item.frames]
    return record


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Annotate
# ----------------------------------------------------------------------------------------------------------------


def answer_hint(target: Item) -> str:
    """The positive as shown in an answer-conditioned prompt: its text, and only a reference to its media."""
    parts = [join_task_text("", target.text)] if target.text.strip() else []
    if target.images:
        parts.append("[image file: " + ", ".join(Path(str(p)).name for p in target.images) + "]")
    if target.frames:
        parts.append(f"[video: {len(target.frames)} frames from {Path(str(target.frames[0])).parent.name}]")
    return " ".join(parts) or "(empty positive)"


def conditioned(index: int, pair_id: str, cfg: AnnotateConfig) -> bool:
    """Whether the query at ``index`` gets the answer hint (docs/method.md §5.4)."""
    if cfg.answer_conditioned_fraction <= 0:
        return False
    if cfg.answer_selection == "parity":
        return index % 2 == 0
    return random.Random(f"{cfg.seed}:{pair_id}").random() < cfg.answer_conditioned_fraction


def annotation_request(pair: Pair, side: str, compact: bool, hint: bool) -> tuple[ChatRequest, dict[str, Any]]:
    """The chat request of one side of a pair, and the provenance fields of its T-CoT."""
    item = pair.query if side == "query" else pair.target
    target_modality = pair.target.modality if side == "query" else None
    prompt = build_reasoner_prompt(item, side, target_modality, compact=compact)  # type: ignore[arg-type]
    assert prompt.family is not None
    template = prompt.family.template(compact).text
    if hint:
        text_part = prompt.messages[-1]["content"][-1]
        text_part["text"] += ANSWER_HINT.render(answer=answer_hint(pair.target))
        template += ANSWER_HINT.text
    request = ChatRequest(f"{pair.pair_id}|{side}", prompt.messages, prompt.images)
    info = {
        "family": prompt.family.name,
        "prompt_hash": prompt_hash(template),
        "cue_key": prompt.family.cue_key,
        "n_frames": prompt.n_frames or None,
        "answer_conditioned": hint,
    }
    return request, info


def _tcot_record(key: str, text: str, info: Mapping[str, Any], annotator: Annotator) -> dict[str, Any]:
    tcot = parse_tcot(text, cue_key=info["cue_key"], n_frames=info["n_frames"])
    return {
        "key": key,
        "text": text,
        "family": info["family"],
        "prompt_hash": info["prompt_hash"],
        "generator": annotator.name,
        "decoding": annotator.decoding(),
        "answer_conditioned": info["answer_conditioned"],
        "parsed": {**dataclasses.asdict(tcot), "format_ok": format_ok(text, info["cue_key"], info["n_frames"])},
    }


def annotate(cfg: AnnotateConfig, annotator: Annotator | None = None) -> dict[str, Any]:
    """The ``embedrl annotate`` stage over every input file; ``annotator`` overrides ``cfg.annotator`` (tests).

    Returns ``{"files": {name: {"pairs", "requests_sent", "reused", "skipped_rows", "out"}}}``.
    """
    out_dir = Path(cfg.out)
    save_config(cfg, out_dir)
    files = input_files(cfg.input)
    annotator = annotator or make_annotator(cfg.annotator)
    compact = annotator_compact_prompts(cfg.annotator)
    summary: dict[str, Any] = {"annotator": annotator.name, "files": {}}
    for path in files:
        bad = BadRows(cfg.on_bad_row)
        rows = read_pair_rows(path, bad, cfg.limit)
        journal = Journal(out_dir / (path.stem + JOURNAL_SUFFIX))
        infos: dict[str, dict[str, Any]] = {}
        todo: list[ChatRequest] = []
        for index, (pair, _) in enumerate(rows):
            hint = conditioned(index, pair.pair_id, cfg)
            for side in ("query", "target"):
                request, info = annotation_request(pair, side, compact, hint and side == "query")
                infos[request.key] = info
                if request.key not in journal:
                    todo.append(request)
        reused = len(infos) - len(todo)
        bar = tqdm(total=len(todo), desc=f"annotate {path.stem}", disable=not cfg.show_progress_bar)
        for request, text in annotator.complete(todo):
            journal.append(_tcot_record(request.key, text, infos[request.key], annotator))
            bar.update()
        bar.close()
        records = []
        for pair, record in rows:
            record = _rebase(record, pair, out_dir)
            for side in ("query", "target"):
                entry = journal.done[f"{pair.pair_id}|{side}"]
                record[side]["tcot"] = entry["text"]
                record[f"{side}_tcot"] = {k: v for k, v in entry.items() if k != "key"}
            records.append(record)
        out = out_dir / path.name
        _write_jsonl(out, records)
        summary["files"][path.stem] = {
            "pairs": len(rows),
            "requests_sent": len(todo),
            "reused": reused,
            "skipped_rows": bad.as_dict(),
            "out": str(out),
        }
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Filter
# ----------------------------------------------------------------------------------------------------------------

_FIRST_WORD = re.compile(r"[A-Za-z]+")


def judge_verdict(reply: str) -> str:
    """``drop`` for a first word "yes", ``keep`` for "no", ``unparsed`` otherwise (kept, counted).

    >>> judge_verdict("Yes."), judge_verdict(" no, they agree"), judge_verdict("Maybe")
    ('drop', 'keep', 'unparsed')
    """
    match = _FIRST_WORD.search(reply)
    word = match.group(0).lower() if match else ""
    return {"yes": "drop", "no": "keep"}.get(word, "unparsed")


def judge_request(pair: Pair, record: Mapping[str, Any]) -> ChatRequest:
    task = join_task_text(pair.query.instruction, pair.query.text) or "(the query is its media only)"
    text = JUDGE.render(task=task, query_tcot=record["query_tcot"]["text"], target_tcot=record["target_tcot"]["text"])
    return ChatRequest(f"{pair.pair_id}|judge", [{"role": "user", "content": [{"type": "text", "text": text}]}])


def equidistant(n: int, m: int) -> list[int]:
    """``floor(k * n / m)`` for ``k = 0..m-1`` (all of ``range(n)`` when ``m >= n``).

    >>> equidistant(10, 4)
    [0, 2, 5, 7]
    """
    if m >= n:
        return list(range(n))
    return [k * n // m for k in range(m)]


def filter_pairs(cfg: FilterConfig, judge: Annotator | None = None) -> dict[str, Any]:
    """The ``embedrl filter`` stage; ``judge`` overrides ``cfg.judge`` (tests). Returns the ``filter.json`` content."""
    out_dir = Path(cfg.out)
    save_config(cfg, out_dir)
    judge = judge or make_annotator(cfg.judge)
    rows: list[tuple[Pair, dict[str, Any]]] = []
    bad = BadRows(cfg.on_bad_row)
    for path in input_files(cfg.input):
        for pair, record in read_pair_rows(path, bad):
            with bad.guard():
                if not isinstance(record.get("query_tcot"), dict) or not isinstance(record.get("target_tcot"), dict):
                    raise RowError(path, pair.pair_id, "the pair has no query_tcot/target_tcot: run embedrl annotate")
                rows.append((pair, _rebase(record, pair, out_dir)))
    journal = Journal(out_dir / ("judge" + JOURNAL_SUFFIX))
    requests = [judge_request(pair, record) for pair, record in rows]
    todo = [r for r in requests if r.key not in journal]
    bar = tqdm(total=len(todo), desc="judge", disable=not cfg.show_progress_bar)
    for request, reply in judge.complete(todo):
        journal.append(
            {
                "key": request.key,
                "reply": reply,
                "judge": judge.name,
                "decoding": judge.decoding(),
                "prompt_hash": JUDGE.hash,
            }
        )
        bar.update()
    bar.close()

    by_dataset: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for (pair, record), request in zip(rows, requests, strict=True):
        entry = journal.done[request.key]
        verdict = judge_verdict(entry["reply"])
        record["filter"] = {
            "verdict": verdict,
            "raw_reply": entry["reply"],
            "judge": entry["judge"],
            "prompt_hash": entry["prompt_hash"],
        }
        pool = "rejected" if verdict == "drop" else "kept"
        by_dataset.setdefault(pair.dataset, {"kept": [], "rejected": []})[pool].append(record)

    rl: list[dict[str, Any]] = []
    contrastive: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, dict[str, Any]] = {}
    for dataset, pools in by_dataset.items():
        wanted = cfg.rl_counts.get(dataset, 0)
        source = pools[cfg.rl_pool]
        chosen = set(equidistant(len(source), wanted)) if wanted else set()
        if wanted > len(source):
            logger.warning(
                "%s: %d RL pairs requested, only %d in the %s pool", dataset, wanted, len(source), cfg.rl_pool
            )
        for i, record in enumerate(source):
            if i in chosen:
                record["split"] = "rl"
                rl.append(record)
        excluded = dataset in cfg.exclude_from_contrastive
        for record in pools["kept"]:
            if record.get("split") != "rl":
                record["split"] = "excluded" if excluded else "contrastive"
                if not excluded:
                    contrastive.setdefault(dataset, []).append(record)
        for record in pools["rejected"]:
            record.setdefault("split", "unused")
        all_records = pools["kept"] + pools["rejected"]
        counts[dataset] = {
            "initial": len(all_records),
            "kept": len(pools["kept"]),
            "dropped": len(pools["rejected"]),
            "unparsed": sum(r["filter"]["verdict"] == "unparsed" for r in all_records),
            "contrastive": len(contrastive.get(dataset, [])),
            "rl": len(chosen),
            "rl_requested": wanted,
            "rl_shortfall": max(0, wanted - len(source)),
            "excluded_from_contrastive": excluded,
        }
    for dataset, records in contrastive.items():
        _write_jsonl(out_dir / "contrastive" / f"{dataset}.jsonl", records)
    _write_jsonl(out_dir / "rl.jsonl", rl)
    _write_jsonl(out_dir / "filtered.jsonl", [r for pools in by_dataset.values() for p in pools.values() for r in p])
    totals = {
        key: sum(c[key] for c in counts.values())
        for key in ("initial", "kept", "dropped", "unparsed", "contrastive", "rl", "rl_shortfall")
    }
    summary = {
        "datasets": counts,
        "totals": totals,
        "rl_pool": cfg.rl_pool,
        "judge": judge.name,
        "skipped_rows": bad.as_dict(),
        "config": config_to_dict(cfg),
    }
    (out_dir / "filter.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
