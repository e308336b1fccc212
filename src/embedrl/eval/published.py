"""The T-CoTs released with the paper, imported into a T-CoT file for ``embedrl eval mmeb --tcot_cache FILE``.

The release holds one query file and one corpus file per MMEB-V2 dataset (docs/eval.md §5.2 has the formats):

============  ===================================  ======================================
folder        query file                           corpus file
============  ===================================  ======================================
``Image/``    ``{ds}.json``                        ``{ds}_corpus_cot.json``
``Video/``    ``{ds}_query_cot.json``              ``{ds}_corpus_cot.json``
``VisDo/``    ``{ds}_query.json``                  ``{ds}_corpus.json``
============  ===================================  ======================================

:func:`import_published_tcots` reads each dataset with :func:`embedrl.eval.mmeb.load_mmeb_task` (in the layout the
evaluation will use: the item ids are digests of the item text) and joins every query and candidate to its published
T-CoT on stable keys, never on fuzzy text matches:

- **image queries**: the file is a list in the order of the dataset's rows, so row ``i`` gets entry ``i``, provided
  the entry's ``qry_text`` and ``qry_img_path`` equal the row's (else it is counted as a mismatch and not used);
- **image candidates**: by image path (``tgt_img_path``; one T-CoT per image, also for image + text candidates),
  else by the stripped text (``tgt_text``);
- **video queries**: by (video id, text): the first of ``video_id``, ``id``, ``videoID``, ``video``, ``video_path``,
  ``input_frames`` and of ``caption``, ``sentence``, ``enCap``, ``query``, ``question`` (first element of a list),
  read the same way from the entry and from the row; repeated keys pair up in order;
- **video candidates**: by ``corpus_id`` or ``corpus_content`` (a label or option text, a video id, or a clip path,
  also as its stem and as ``path.replace('/', '_')`` without ``.mp4``) against the candidate's text, name, video id
  or clip path; a key that names two different T-CoTs is left out;
- **VisDoc**: queries by ``query-id`` (with a check that ``query`` agrees), pages by ``corpus-id``.

An empty ``query_cot`` / ``corpus_cot`` (a failed generation) is no T-CoT, as in the reference loader. Items left
without a T-CoT are counted per dataset (:class:`TaskImport`, the CLI's table, ``<out>.report.json``); the
evaluation embeds them raw and counts them again. The records are :class:`~embedrl.eval.cache.TCoTCache` records
keyed by :func:`~embedrl.eval.benchmark.published_key`: ``<layout>/<task>/<item id>``, the side, reasoner
``embed-rl-published``, prompt hash ``published`` and the release's decoding (temperature 1.0, 4096 new tokens, no
seed). Importing into an existing file replaces the imported datasets' records and keeps the others.

Example:
    >>> report = import_published_tcots("Embed-RL-Test", "data/mmeb-v2", "runs/published.jsonl")  # doctest: +SKIP
    >>> print(report.markdown())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embedrl.config import UserError
from embedrl.data.rows import BadRowPolicy, read_rows
from embedrl.data.schema import Item
from embedrl.eval.benchmark import published_key, tcot_file_id
from embedrl.eval.cache import TCoTCache
from embedrl.eval.mmeb import MMEB_BY_KEY, MMEBTask, PageLabels, annotation_dir, load_mmeb_task, resolve_tasks
from embedrl.prompts import LAYOUT_REFERENCE, LAYOUTS

__all__ = ["PUBLISHED_FILES", "ImportReport", "PublishedTCoTError", "TaskImport", "import_published_tcots"]

logger = logging.getLogger(__name__)

# modality -> (folder of the release, query file, corpus file); ``{ds}`` is the dataset's file name.
PUBLISHED_FILES: dict[str, tuple[str, str, str]] = {
    "image": ("Image", "{ds}.json", "{ds}_corpus_cot.json"),
    "video": ("Video", "{ds}_query_cot.json", "{ds}_corpus_cot.json"),
    "visdoc": ("VisDo", "{ds}_query.json", "{ds}_corpus.json"),
}
VIDEO_ID_FIELDS = ("video_id", "id", "videoID", "video", "video_path", "input_frames")
VIDEO_TEXT_FIELDS = ("caption", "sentence", "enCap", "query", "question")


class PublishedTCoTError(UserError, ValueError):
    """A published T-CoT file is missing or not in the release's format; the message names the file."""


@dataclass
class TaskImport:
    """What the import of one dataset matched.

    Attributes:
        task: the MMEB-V2 score key.
        files: the published files read.
        queries, candidates: items of the dataset (candidates: the de-duplicated pool).
        queries_matched, candidates_matched: items that got a published T-CoT.
        query_mismatches: image or VisDoc entries whose text or image path disagrees with the row (not used).
        ambiguous_keys: video corpus keys that named two different T-CoTs (not used).
        published_entries: entries of the query and corpus files that carry a T-CoT.
    """

    task: str
    files: list[str]
    queries: int = 0
    candidates: int = 0
    queries_matched: int = 0
    candidates_matched: int = 0
    query_mismatches: int = 0
    ambiguous_keys: int = 0
    published_entries: int = 0

    @property
    def queries_without(self) -> int:
        return self.queries - self.queries_matched

    @property
    def candidates_without(self) -> int:
        return self.candidates - self.candidates_matched


@dataclass
class ImportReport:
    """The result of :func:`import_published_tcots`: the file written and the per-dataset counts."""

    out: Path
    layout: str
    tasks: dict[str, TaskImport] = field(default_factory=dict)
    records: int = 0

    @property
    def items_without_tcot(self) -> int:
        return sum(t.queries_without + t.candidates_without for t in self.tasks.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "layout": self.layout,
            "records": self.records,
            "items_without_tcot": self.items_without_tcot,
            "tasks": {
                k: asdict(t) | {"queries_without": t.queries_without, "candidates_without": t.candidates_without}
                for k, t in self.tasks.items()
            },
        }

    def markdown(self) -> str:
        lines = [
            f"Published T-CoTs -> {self.out} (layout {self.layout}; {self.records} records)",
            "",
            "| Dataset | Queries with T-CoT | Candidates with T-CoT | Without T-CoT | Mismatched rows |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, t in self.tasks.items():
            lines.append(
                f"| {key} | {t.queries_matched}/{t.queries} | {t.candidates_matched}/{t.candidates} | "
                f"{t.queries_without + t.candidates_without} | {t.query_mismatches} |"
            )
        lines.append("")
        lines.append(f"Items without a published T-CoT (embedded raw at evaluation): {self.items_without_tcot}")
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Reading the release
# ----------------------------------------------------------------------------------------------------------------


def _file_names(task: MMEBTask) -> list[str]:
    """The names a dataset's files may carry: the score key, the source dataset name (K700: Kinetics-700), and the
    ``-fixed`` name of a page set."""
    names = [task.key, task.dataset_name, f"{task.key}-fixed"]
    return list(dict.fromkeys(names))


def published_files(src: Path, task: MMEBTask) -> tuple[Path, Path] | None:
    """``(query file, corpus file)`` of a dataset in the release (``<src>/<Folder>/`` or ``<src>/``), or None when
    neither exists.

    Raises:
        PublishedTCoTError: only one of the two exists.
    """
    folder, query_pattern, corpus_pattern = PUBLISHED_FILES[task.modality]
    for base in (src / folder, src):
        for ds in _file_names(task):
            query, corpus = base / query_pattern.format(ds=ds), base / corpus_pattern.format(ds=ds)
            if query.is_file() and corpus.is_file():
                return query, corpus
            if query.is_file() or corpus.is_file():
                present, absent = (query, corpus) if query.is_file() else (corpus, query)
                raise PublishedTCoTError(f"{task.key}: {present} exists but {absent} does not; copy both files")
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PublishedTCoTError(f"{path}: not a JSON file ({err})") from None


def _list_of_objects(path: Path) -> list[dict[str, Any]]:
    data = _read_json(path)
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise PublishedTCoTError(f"{path}: expected a JSON list of objects (the release's format, docs/eval.md §5.2)")
    return data


def _tcot(value: Any) -> str | None:
    """A published T-CoT; None for an empty one (a failed generation), as the reference loader skips it."""
    return value if isinstance(value, str) and value.strip() else None


def _cot(entry: Mapping[str, Any], key: str) -> str | None:
    return _tcot(entry.get(key))


def _first(record: Mapping[str, Any], fields: Sequence[str]) -> str:
    for name in fields:
        value = record.get(name)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None and value != "":
            return str(value)
    return ""


def video_key(record: Mapping[str, Any]) -> tuple[str, str]:
    """(video id, text) of a video row or of its published entry (which carries the row's fields)."""
    return _first(record, VIDEO_ID_FIELDS), _first(record, VIDEO_TEXT_FIELDS)


def _content_keys(value: Any) -> list[str]:
    """A video corpus value and, for a clip path, its stem and ``path.replace('/', '_')`` without ``.mp4``."""
    if value is None or value == "":
        return []
    text = str(value)
    keys = [text, text.strip()]
    if "/" in text or text.endswith(".mp4"):
        keys += [Path(text).stem, text.replace("/", "_").removesuffix(".mp4")]
    return list(dict.fromkeys(keys))


def _candidate_keys(item: Item) -> list[str]:
    """The keys a video-task candidate is looked up by, most specific first: its text (label, option) and name; its
    video id (``<video>/<clip>`` also as ``<video>_<clip>``, never the bare clip name, which repeats across videos);
    a MomentSeeker clip's ``output_path``, its stem and its underscore form."""
    source = item.meta.get("source", {})
    keys: list[str] = []
    if text := source.get("text"):
        keys += [str(text), str(text).strip()]
    keys.append(str(item.meta.get("name", "")))
    if video := source.get("video"):
        keys += [str(video), str(video).replace("/", "_")]
    if path := source.get("path"):
        keys += _content_keys(path)
    return [k for k in dict.fromkeys(keys) if k]


# ----------------------------------------------------------------------------------------------------------------
# Joining
# ----------------------------------------------------------------------------------------------------------------


def _source_rows(files: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of a dataset's rows file (image, video) or queries file (VisDoc), in file order."""
    return [row for _, row in read_rows(files[0])]


def _join_image(
    queries: Sequence[Item], pool: Sequence[Item], rows: Sequence[Mapping[str, Any]], query_file: Path,
    corpus_file: Path, report: TaskImport,
) -> tuple[dict[str, str], dict[str, str]]:  # fmt: skip
    entries = _list_of_objects(query_file)
    corpus = _read_json(corpus_file)
    if not isinstance(corpus, dict) or not all(isinstance(corpus.get(k) or {}, dict) for k in ("text", "image")):
        raise PublishedTCoTError(f'{corpus_file}: expected {{"text": {{...}}, "image": {{...}}}}')
    if len(entries) != len(rows):
        logger.warning("%s: %d entries for %d rows; rows without an entry get no T-CoT", query_file, len(entries),
                       len(rows))  # fmt: skip
    by_text = {str(k).strip(): v for k, v in (corpus.get("text") or {}).items() if _tcot(v)}
    by_image = {str(k).strip(): v for k, v in (corpus.get("image") or {}).items() if _tcot(v)}
    report.published_entries = sum(_cot(e, "query_cot") is not None for e in entries) + len(by_text) + len(by_image)
    query_tcots: dict[str, str] = {}
    for item in queries:
        i = item.meta["index"]
        if i >= len(entries):
            continue
        entry, row = entries[i], rows[i]
        if str(entry.get("qry_text")) != str(row["qry_text"]) or str(entry.get("qry_img_path")) != str(
            row["qry_img_path"]
        ):
            report.query_mismatches += 1
            continue
        if cot := _cot(entry, "query_cot"):
            query_tcots[item.id] = cot
    candidate_tcots: dict[str, str] = {}
    for item in pool:
        source = item.meta.get("source", {})
        image, text = str(source.get("image") or "").strip(), str(source.get("text") or "").strip()
        cot = by_image.get(image) if image else by_text.get(text)
        if cot:
            candidate_tcots[item.id] = cot
    return query_tcots, candidate_tcots


def _join_video(
    queries: Sequence[Item], pool: Sequence[Item], rows: Sequence[Mapping[str, Any]], query_file: Path,
    corpus_file: Path, report: TaskImport,
) -> tuple[dict[str, str], dict[str, str]]:  # fmt: skip
    entries = _list_of_objects(query_file)
    published: dict[tuple[str, str], list[str | None]] = defaultdict(list)
    for entry in entries:
        published[video_key(entry)].append(_cot(entry, "query_cot"))
    query_tcots: dict[str, str] = {}
    used: dict[tuple[str, str], int] = defaultdict(int)
    for item in queries:
        key = video_key(rows[item.meta["index"]])
        k = used[key]
        used[key] += 1
        if k < len(published.get(key, [])) and (cot := published[key][k]):
            query_tcots[item.id] = cot
    index: dict[str, str] = {}
    ambiguous: set[str] = set()
    corpus = _list_of_objects(corpus_file)
    for entry in corpus:
        cot = _cot(entry, "corpus_cot")
        if cot is None:
            continue
        for key in [*_content_keys(entry.get("corpus_id")), *_content_keys(entry.get("corpus_content"))]:
            if key in index and index[key] != cot:
                ambiguous.add(key)
            index.setdefault(key, cot)
    for key in ambiguous:
        del index[key]
    report.ambiguous_keys = len(ambiguous)
    report.published_entries = sum(c is not None for cs in published.values() for c in cs) + sum(
        _cot(e, "corpus_cot") is not None for e in corpus
    )
    candidate_tcots: dict[str, str] = {}
    for item in pool:
        cot = next((index[k] for k in _candidate_keys(item) if k in index), None)
        if cot:
            candidate_tcots[item.id] = cot
    return query_tcots, candidate_tcots


def _join_visdoc(
    queries: Sequence[Item], pool: Sequence[Item], rows: Sequence[Mapping[str, Any]], query_file: Path,
    corpus_file: Path, report: TaskImport,
) -> tuple[dict[str, str], dict[str, str]]:  # fmt: skip
    entries = {str(e.get("query-id")): e for e in _list_of_objects(query_file)}
    corpus = {str(e.get("corpus-id")): e for e in _list_of_objects(corpus_file)}
    report.published_entries = sum(_cot(e, "query_cot") is not None for e in entries.values()) + sum(
        _cot(e, "corpus_cot") is not None for e in corpus.values()
    )
    query_tcots: dict[str, str] = {}
    for item in queries:
        row = rows[item.meta["index"]]
        entry = entries.get(str(row["query-id"]))
        if entry is None:
            continue
        if str(entry.get("query")) != str(row["query"]):
            report.query_mismatches += 1
            continue
        if cot := _cot(entry, "query_cot"):
            query_tcots[item.id] = cot
    candidate_tcots: dict[str, str] = {}
    for item in pool:
        entry = corpus.get(str(item.meta.get("source", {}).get("corpus_id")))
        if entry is not None and (cot := _cot(entry, "corpus_cot")):
            candidate_tcots[item.id] = cot
    return query_tcots, candidate_tcots


_JOINS = {"image": _join_image, "video": _join_video, "visdoc": _join_visdoc}


# ----------------------------------------------------------------------------------------------------------------
# The import
# ----------------------------------------------------------------------------------------------------------------


def _kept_lines(out: Path, replaced: Iterable[str]) -> list[str]:
    """The records of an existing file outside the ``<layout>/<task>/`` namespaces being imported again."""
    if not out.is_file():
        return []
    prefixes = tuple(f"{ns}/" for ns in replaced)
    TCoTCache(out)  # validates the file (and drops a line cut by a kill) before it is rewritten
    lines = [line for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [line for line in lines if not str(json.loads(line)["id"]).startswith(prefixes)]


def import_published_tcots(
    src: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    layout: str = LAYOUT_REFERENCE,
    page_labels: PageLabels = "fixed",
    num_frames: int = 8,
    on_bad_row: BadRowPolicy = "stop",
) -> ImportReport:
    """Import the published T-CoTs of ``src`` for the MMEB-V2 data at ``data`` into the T-CoT file ``out``.

    Args:
        src: the release's folder (``Image/``, ``Video/``, ``VisDo/``; or the files directly in it).
        data: the MMEB-V2 data root (docs/eval.md §5).
        out: the T-CoT file to write (existing records of other datasets are kept).
        tasks: score keys; None = every MMEB-V2 dataset that has files in ``src`` and annotations in ``data``.
        layout: the item layout of the evaluation that will read the file (``reference`` for the published
            checkpoints); it must match, because item ids are digests of the item text.
        page_labels, num_frames, on_bad_row: as for :func:`~embedrl.eval.mmeb.load_mmeb_task` (use the
            evaluation's values).

    Raises:
        PublishedTCoTError: a named dataset has no files in ``src``, a file is malformed, or nothing is found.
    """
    if layout not in LAYOUTS:
        raise PublishedTCoTError(f"layout={layout!r}; use one of {LAYOUTS}")
    src, data, out = Path(src), Path(data), Path(out)
    if not src.is_dir():
        raise PublishedTCoTError(f"--src {src} is not a folder")
    names = resolve_tasks(tasks) if tasks else [t.key for t in MMEB_BY_KEY.values()]
    report = ImportReport(out, layout)
    entries: list[tuple[Any, str, str]] = []
    for key in names:
        task = MMEB_BY_KEY[key]
        files = published_files(src, task)
        if files is None:
            if tasks:
                folder, query_pattern, _ = PUBLISHED_FILES[task.modality]
                query_file = query_pattern.format(ds=task.key)
                raise PublishedTCoTError(f"{key}: no {folder}/{query_file} (nor under another name) in {src}")
            continue
        if not tasks:  # all datasets: skip those without annotations, loudly
            try:
                annotation_dir(task, data, page_labels)
            except FileNotFoundError as err:
                logger.warning("%s: published T-CoTs found but no annotations (%s); skipped", key, err)
                continue
        loaded = load_mmeb_task(key, data, page_labels=page_labels, num_frames=num_frames, on_bad_row=on_bad_row,
                                layout=layout)  # fmt: skip
        queries, pool = loaded.eval_task.queries, list(loaded.eval_task.pool.values())
        rows = _source_rows(loaded.files)
        result = TaskImport(key, [str(f) for f in files], queries=len(queries), candidates=len(pool))
        query_tcots, candidate_tcots = _JOINS[task.modality](queries, pool, rows, *files, result)
        result.queries_matched, result.candidates_matched = len(query_tcots), len(candidate_tcots)
        report.tasks[key] = result
        family = f"published/{task.modality}"
        entries += [(published_key(layout, key, i, "query"), t, f"{family}/query") for i, t in query_tcots.items()]
        entries += [
            (published_key(layout, key, i, "target"), t, f"{family}/target") for i, t in candidate_tcots.items()
        ]
        log = logger.warning if result.queries_without or result.candidates_without else logger.info
        log("%s: published T-CoTs for %d of %d queries and %d of %d candidates (%d mismatched rows)", key,
            result.queries_matched, result.queries, result.candidates_matched, result.candidates,
            result.query_mismatches)  # fmt: skip
    if not report.tasks:
        raise PublishedTCoTError(f"no published T-CoT file of an MMEB-V2 dataset with annotations in {src}")
    kept = _kept_lines(out, [tcot_file_id(layout, key, "").rstrip("/") for key in report.tasks])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    TCoTCache(tmp).add(entries)
    os.replace(tmp, out)
    report.records = len(kept) + len(entries)
    (out.with_name(out.name + ".report.json")).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return report
