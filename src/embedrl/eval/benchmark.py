"""What the real benchmarks share: MMEB-V2 (:mod:`embedrl.eval.mmeb`) and UVRB (:mod:`embedrl.eval.uvrb`).

- :class:`BenchmarkEvaluator`: a :class:`~embedrl.eval.evaluator.TaskEvaluator` over datasets read from a local data
  root (each once), under a bad-row policy and a query limit, with videos sampled to ``num_frames`` frames. T-CoTs
  come from a Reasoner, from a T-CoT file (``tcot_source="file"``: the published T-CoTs imported by
  :mod:`embedrl.eval.published`, :class:`TCoTFile`), or there are none (raw mode).
- **Layout** (docs/eval.md §5.1, §6.1): ``embedrl`` builds items with our instructions and frame order;
  ``reference`` with the reference harness's wording, frame order and text limits, and the Embedder gets the
  harness's pixel budgets (:attr:`BenchmarkEvaluator.reference_budget`, through ``Embedder.with_budget``). The
  layout follows the Embedder's unless given.
- :func:`pick_frames`: the frame files of a folder in one of the orders the harnesses use, sampled uniformly.
- :class:`BenchmarkReport`: its report, whose ``summary.md`` starts with :meth:`BenchmarkReport.header`.
- :func:`run_benchmark_stage`: the body of ``embedrl eval mmeb`` and ``embedrl eval uvrb``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

from embedrl.backbones import PixelBudget
from embedrl.config import BenchmarkEvalConfig
from embedrl.data.frames import list_frames, natural_key, sample_indices
from embedrl.data.rows import BadRowPolicy
from embedrl.data.schema import Item
from embedrl.eval.cache import TCoTCache, TCoTKey, decoding_key
from embedrl.eval.evaluator import EvalReport, EvalRun, ReportT, TaskEvaluator, config_sha256, run_eval_stage
from embedrl.eval.task import EvalError, EvalTask
from embedrl.models.embedder import Embedder
from embedrl.prompts import LAYOUT_EMBEDRL, LAYOUT_REFERENCE, LAYOUTS

__all__ = [
    "PUBLISHED_DECODING",
    "PUBLISHED_PROMPT_HASH",
    "PUBLISHED_REASONER",
    "BenchmarkEvaluator",
    "BenchmarkReport",
    "FrameOrder",
    "LoadedDataset",
    "TCoTFile",
    "pick_frames",
    "published_key",
    "run_benchmark_stage",
    "tcot_file_id",
]

logger = logging.getLogger(__name__)

FrameOrder = Literal["natural", "vlm2vec", "sorted"]
_DIGITS = re.compile(r"(\d+)")

# How an imported T-CoT is keyed in a T-CoT file (a TCoTCache JSONL): its item id is namespaced by the item layout
# and the task (item ids are content digests, and the text differs between layouts), the other key fields say where
# the T-CoT came from: the paper's released files, sampled at temperature 1.0 with up to 4096 new tokens and no seed
# (docs/eval.md §5.2).
PUBLISHED_REASONER = "embed-rl-published"
PUBLISHED_PROMPT_HASH = "published"
PUBLISHED_DECODING: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4096, "seed": None}


# ----------------------------------------------------------------------------------------------------------------
# Frames
# ----------------------------------------------------------------------------------------------------------------


def _vlm2vec_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """VLM2Vec's natural sort key: digit runs as numbers, the rest lower-cased."""
    return tuple((0, int(part)) if part.isdigit() else (1, part.lower()) for part in _DIGITS.split(name))


def pick_frames(folder: str | Path, k: int, order: FrameOrder = "natural") -> list[Path]:
    """The frame images of ``folder`` (``.jpg``/``.jpeg``/``.png``) in ``order``, then ``k`` of them at
    ``floor(linspace(0, n - 1, k))`` (all of them when ``n <= k`` or ``k == 0``).

    Orders: ``natural`` (ours, :func:`embedrl.data.frames.list_frames`), ``vlm2vec`` (VLM2Vec's natural sort, text
    parts lower-cased: the MMEB-V2 harness) and ``sorted`` (plain string order: the reference UVRB loader).

    Raises:
        FileNotFoundError: the folder does not exist or holds no frame image.
    """
    keys = {"natural": natural_key, "vlm2vec": _vlm2vec_key, "sorted": str}
    frames = list_frames(folder, key=keys[order])
    if k <= 0:
        return frames
    return [frames[i] for i in sample_indices(len(frames), k)]


# ----------------------------------------------------------------------------------------------------------------
# T-CoT files
# ----------------------------------------------------------------------------------------------------------------


def tcot_file_id(layout: str, task: str, item_id: str) -> str:
    """The id of an item's T-CoT in a T-CoT file: ``<layout>/<task>/<item id>``."""
    return f"{layout}/{task}/{item_id}"


def published_key(layout: str, task: str, item_id: str, side: str) -> TCoTKey:
    """The full cache key of an imported published T-CoT."""
    return TCoTKey(
        tcot_file_id(layout, task, item_id), side, PUBLISHED_REASONER, PUBLISHED_PROMPT_HASH,
        decoding_key(PUBLISHED_DECODING),
    )  # fmt: skip


class TCoTFile:
    """A T-CoT file (a :class:`~embedrl.eval.cache.TCoTCache` JSONL, e.g. written by ``embedrl eval import-tcots``),
    read for evaluation: the T-CoT of ``(layout, task, item id, side)``.

    Raises:
        EvalError: the file does not exist, or holds two T-CoTs for one item and side.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise EvalError(f"tcot_cache {self.path} does not exist; write it with `embedrl eval import-tcots`")
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self._texts: dict[tuple[str, str], str] = {}
        self.namespaces: set[str] = set()  # "<layout>/<task>" of every record
        for key, text in TCoTCache(self.path).items():
            where = (key.item_id, key.side)
            if where in self._texts and self._texts[where] != text:
                raise EvalError(f"{self.path}: two T-CoTs for {key.item_id} ({key.side}); keep one source per item")
            self._texts[where] = text
            self.namespaces.add("/".join(key.item_id.split("/", 2)[:2]))

    def __len__(self) -> int:
        return len(self._texts)

    def get(self, layout: str, task: str, item_id: str, side: str) -> str | None:
        return self._texts.get((tcot_file_id(layout, task, item_id), side))

    def layouts_of(self, task: str) -> set[str]:
        """The layouts the file holds T-CoTs of ``task`` for."""
        return {ns.split("/", 1)[0] for ns in self.namespaces if ns.partition("/")[2] == task}


# ----------------------------------------------------------------------------------------------------------------
# The evaluator
# ----------------------------------------------------------------------------------------------------------------


class BenchmarkReport(EvalReport):
    """A benchmark run's report (:class:`~embedrl.eval.evaluator.EvalReport`)."""

    def header(self, benchmark: str, settings: str, *lines: str) -> str:
        """The head of ``summary.md``: the run's name, models, ``settings`` and the skipped rows, with ``lines``
        before the skipped rows."""
        m = self.metadata
        tcot_file = m.get("tcot_file")
        head = [
            f"# {m['model_name']}: {benchmark}",
            "",
            f"- Embedder: `{m['embedder']['id']}`; Reasoner: `{(m['reasoner'] or {}).get('id', '-')}`; "
            f"cot_mode {m['cot_mode']}; {settings}",
            f"- Layout: {m.get('layout', LAYOUT_EMBEDRL)}; frame order {m.get('frame_order', 'natural')}",
            *lines,
            *(
                [
                    f"- T-CoT file: `{tcot_file['path']}`; items without a T-CoT (embedded raw): "
                    f"{tcot_file['items_without_tcot']}"
                ]
                if tcot_file
                else []
            ),
            f"- Skipped rows: {sum(r['skipped'] for r in m['bad_rows'].values())} (on_bad_row={m['on_bad_row']})",
            "",
            "",
        ]
        return "\n".join(head)


class LoadedDataset(Protocol):
    """What a benchmark loader returns: the task, plus the skip report of its rows."""

    eval_task: EvalTask

    @property
    def bad_rows(self) -> dict[str, Any]: ...


LoadedT = TypeVar("LoadedT", bound=LoadedDataset)


class BenchmarkEvaluator(TaskEvaluator[ReportT], Generic[ReportT, LoadedT]):
    """A benchmark's datasets read from ``root``; subclasses provide :meth:`_resolve` (task names) and :meth:`_read`.

    Args:
        root: the benchmark's data folder.
        tasks: dataset names; None = the benchmark's (scored) datasets.
        on_bad_row: ``stop`` raises on the first malformed row or missing media file; ``skip`` drops and counts it.
        limit: keep only the first ``limit`` queries of each dataset (0 = all).
        num_frames: frames sampled per video.
        layout: ``embedrl`` or ``reference`` (how items are built, which frame order and pixel budgets apply);
            None = the Embedder's (``Embedder.layout``; ``embedrl`` for an encoder without one).
        tcot_cache: with ``tcot_source="file"``: the T-CoT file (:class:`TCoTFile`). Items it has no T-CoT for are
            embedded raw, as the reference does, and counted per task (log line, ``tcot_file`` in the metadata).
        **engine: the :class:`~embedrl.eval.evaluator.TaskEvaluator` settings (``tcot_source`` ``reasoner``,
            ``file`` or ``none``).
    """

    benchmark = ""  # the display name, in messages
    config_options = ("on_bad_row", "limit", "num_frames", "layout", "tcot_cache")
    # The pixel budgets of the benchmark's reference harness; None = the Embedder's own, in every layout.
    reference_budget: ClassVar[PixelBudget | None] = None
    # The frame order of each layout (pick_frames): ours, and the reference harness's.
    frame_orders: ClassVar[dict[str, FrameOrder]] = {LAYOUT_EMBEDRL: "natural", LAYOUT_REFERENCE: "natural"}

    def __init__(
        self,
        root: str | Path,
        tasks: Sequence[str] | None = None,
        *,
        on_bad_row: BadRowPolicy = "stop",
        limit: int = 0,
        num_frames: int = 8,
        layout: str | None = None,
        tcot_cache: str | Path | None = None,
        **engine: Any,
    ) -> None:
        from_file = engine.get("tcot_source") == "file"
        if from_file:
            if not tcot_cache:
                raise EvalError("tcot_source 'file' needs tcot_cache: a file written by `embedrl eval import-tcots`")
            # The engine's stored-T-CoT path: items carry their T-CoT; those without one are embedded raw, counted.
            engine = {**engine, "tcot_source": "teacher", "on_missing_tcot": engine.get("on_missing_tcot", "raw")}
        elif tcot_cache:
            source = engine.get("tcot_source", "teacher")
            raise EvalError(f"tcot_cache is set but tcot_source is {source!r}; use tcot_source 'file'")
        super().__init__(**engine)
        if from_file:
            self.tcot_source = "file"  # type: ignore[assignment]
        elif self.tcot_source in ("teacher", "oracle"):
            raise EvalError(
                f"{self.benchmark} has no stored {self.tcot_source} T-CoTs: use tcot_source 'reasoner' (with a "
                "Reasoner), 'file' (with tcot_cache) or 'none'"
            )
        if layout is not None and layout not in LAYOUTS:
            raise EvalError(f"layout={layout!r}; use one of {LAYOUTS}")
        self.root = Path(root)
        self.tasks = self._resolve(tasks)
        self.on_bad_row = on_bad_row
        self.limit = limit
        self.num_frames = num_frames
        self.layout = layout
        self.tcot_file = TCoTFile(tcot_cache) if from_file and tcot_cache else None
        self.tcot_missing: dict[str, dict[str, int]] = {}  # task -> items without a T-CoT of the file, per side
        self.loaded: dict[str, LoadedT] = {}
        self._loaded_layout: str | None = None

    def _resolve(self, names: Sequence[str] | None) -> list[str]:
        """The datasets to evaluate, in the benchmark's order."""
        raise NotImplementedError(f"{type(self).__name__} must define _resolve(names)")

    def _read(self, name: str, **rows: Any) -> LoadedT:
        """Read one dataset from :attr:`root` with the benchmark's loader; ``rows`` are the loader arguments every
        benchmark has (``on_bad_row``, ``limit``, ``num_frames``, ``layout``)."""
        raise NotImplementedError(f"{type(self).__name__} must define _read(name, **rows)")

    @property
    def resolved_layout(self) -> str:
        """The layout items are built in: :attr:`layout`, ``embedrl`` until an Embedder says otherwise."""
        return self.layout or LAYOUT_EMBEDRL

    @property
    def frame_order(self) -> FrameOrder:
        return self.frame_orders[self.resolved_layout]

    def load(self, name: str) -> LoadedT:
        """One dataset as read from disk (read once), with the file's T-CoTs when ``tcot_source`` is ``file``."""
        if self._loaded_layout != self.resolved_layout:
            self.loaded.clear()  # read in another layout
            self._loaded_layout = self.resolved_layout
        if name not in self.loaded:
            loaded = self._read(
                name, on_bad_row=self.on_bad_row, limit=self.limit, num_frames=self.num_frames,
                layout=self.resolved_layout,
            )  # fmt: skip
            if self.tcot_file is not None:
                loaded.eval_task = self._with_file_tcots(name, loaded.eval_task)
            self.loaded[name] = loaded
        return self.loaded[name]

    def task(self, name: str) -> EvalTask:
        return self.load(name).eval_task

    def _with_file_tcots(self, name: str, task: EvalTask) -> EvalTask:
        """``task`` with each item's T-CoT from :attr:`tcot_file`; counts and logs the items it has none for."""
        tcots, layout = self.tcot_file, self.resolved_layout
        assert tcots is not None

        def attach(items: Sequence[Item], side: str) -> tuple[list[Item], int]:
            out = [item.with_tcot(tcots.get(layout, name, item.id, side)) for item in items]
            return out, sum(item.tcot is None for item in out)

        queries, missing_q = attach(task.queries, "query")
        pool, missing_c = attach(list(task.pool.values()), "target")
        found = len(queries) + len(pool) - missing_q - missing_c
        layouts = tcots.layouts_of(name)
        if not found and layouts - {layout}:
            other = sorted(layouts - {layout})
            raise EvalError(
                f"{name}: {tcots.path} holds T-CoTs for layout {other}, not {layout!r}; evaluate with "
                f"--layout {other[0]}, or import again with --layout {layout}"
            )
        if not found and layout in layouts:
            raise EvalError(
                f"{name}: none of its items has a T-CoT in {tcots.path}, which holds T-CoTs for other items "
                "of this dataset (imported with another num_frames, page_labels or data?); import again with the "
                "evaluation's settings"
            )
        self.tcot_missing[name] = {
            "queries": len(queries), "queries_without_tcot": missing_q,
            "candidates": len(pool), "candidates_without_tcot": missing_c,
        }  # fmt: skip
        log = logger.warning if missing_q or missing_c else logger.info
        log("%s: %d of %d queries and %d of %d candidates have no T-CoT in %s; they are embedded raw", name,
            missing_q, len(queries), missing_c, len(pool), tcots.path)  # fmt: skip
        return dataclasses.replace(task, queries=queries, pool={item.id: item for item in pool})

    def evaluate(self, embedder: Any, reasoner: Any = None, **kwargs: Any) -> ReportT:
        """:meth:`TaskEvaluator.evaluate`, with the layout settled against the Embedder's first: in the reference
        layout the Embedder is given the benchmark's :attr:`reference_budget` (a copy sharing its weights)."""
        own = getattr(embedder, "layout", None)
        if self.layout is not None and own is not None and own != self.layout:
            raise EvalError(
                f"the Embedder's layout is {own!r} but the evaluation's is {self.layout!r}; load the Embedder with "
                f"layout={self.layout!r} (--layout {self.layout}) or leave the evaluation's layout unset"
            )
        self.layout = self.layout or own or LAYOUT_EMBEDRL
        budget = self.reference_budget
        if self.layout == LAYOUT_REFERENCE and budget is not None and isinstance(embedder, Embedder):
            embedder = embedder.with_budget(budget)
        return super().evaluate(embedder, reasoner, **kwargs)

    def _settings_metadata(self, run: EvalRun, **more: Any) -> dict[str, Any]:
        """The metadata of how items were built: the layout, T-CoT fallbacks, frames per video and their order, the
        pixel budget (reference layout), the T-CoT file, then ``more``."""
        embedder = run.pipeline.embedder
        budget = getattr(embedder, "budget", None)
        out: dict[str, Any] = {
            "layout": self.resolved_layout,
            "tcot_fallbacks": run.fallbacks,
            "num_frames": self.num_frames,
            "frame_order": self.frame_order,
            "pixel_budget": dataclasses.asdict(budget) if isinstance(budget, PixelBudget) else None,
        }
        if self.tcot_file is not None:
            out["tcot_file"] = {
                "path": str(self.tcot_file.path),
                "sha256": self.tcot_file.sha256,
                "items_without_tcot": sum(
                    m["queries_without_tcot"] + m["candidates_without_tcot"] for m in self.tcot_missing.values()
                ),
                "per_task": dict(self.tcot_missing),
            }
        return out | more

    def _data_metadata(self, **more: Any) -> dict[str, Any]:
        """The metadata of what was read: query counts, ``more``, the bad-row policy and report, the query limit."""
        return {
            "query_counts": {k: len(v.eval_task.queries) for k, v in self.loaded.items()},
            **more,
            "on_bad_row": self.on_bad_row,
            "bad_rows": {k: v.bad_rows for k, v in self.loaded.items()},
            "limit": self.limit,
        }


def run_benchmark_stage(
    cfg: BenchmarkEvalConfig,
    evaluator: type[BenchmarkEvaluator[Any, Any]],
    extra_metadata: Callable[[Embedder], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The body of ``embedrl eval mmeb`` / ``eval uvrb``: :func:`~embedrl.eval.evaluator.run_eval_stage` on
    ``cfg.data`` with T-CoTs on both sides from ``cfg.reasoner`` or ``cfg.tcot_cache`` (else raw), recording the
    config's SHA-256 after ``extra_metadata``."""
    source = "reasoner" if cfg.reasoner else "file" if cfg.tcot_cache else "none"
    return run_eval_stage(
        cfg,
        evaluator,
        cfg.data,
        settings={"mode": cfg.resolved_mode, "tcot_source": source},
        embedder_path=cfg.model,
        model_name=cfg.name or Path(cfg.model).name,
        extra_metadata=lambda embedder: {
            **(extra_metadata(embedder) if extra_metadata else {}),
            "eval_config_sha256": config_sha256(cfg),
        },
    )
