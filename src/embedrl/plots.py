"""Curves from any run's ``metrics.jsonl`` (``embedrl plot RUN_DIR``), and the demo's bar chart: one implementation
of every figure embedrl draws.

Every training stage writes one JSON object per logged step to ``OUT/metrics.jsonl`` (``train-embedder``,
``train-reasoner``, ``rl`` with either engine, ``backbone pretrain``). :func:`plot_run` reads it and draws one PNG per
metric group, one panel per key, against ``step`` (the line number when a run logs no step). Keys are grouped by
what they measure (:func:`metric_group`), in this order of rules:

- ``loss``: a key whose last part names a loss (``train/loss``, ``train/loss_q2t``, ``grpo/pg_loss``, ``trl/loss``);
- ``learning-rate``: ``…/lr``, ``…/learning_rate``;
- ``speed``: ``time/…`` and throughputs (``…_per_s``, ``train/s``, ``…/step_time``);
- ``accuracy``: a last part naming an accuracy (``train/accuracy``, ``discriminator/accuracy``) and ``eval/…`` (the
  backbone pre-training's held-out perception scores);
- ``reward``: the reward terms, ``reward/<term>`` and their ``/query``, ``/target`` and ``/std`` variants;
- ``reward-details``: every other ``reward/…`` key (outcome margins and accuracies, process accuracies);
- otherwise the key's first part (``grpo``, ``trl``, ``completion``, ``evidence``, ``data``, ``discriminator``, …), and
  ``other`` for a key without one (``pairs``, ``trajectories``, ``skipped``).

Only numeric values are drawn (``dataset`` names and lists are not); a key missing from some lines (evaluations every
N steps, skipped steps) is drawn where it is present. Smoothing adds a trailing moving average over the raw values.

Figures are drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot, no display).

Example:
    >>> plot_run("runs/demo/rl")  # doctest: +SKIP
    {'loss': PosixPath('runs/demo/rl/plots/loss.png'), 'reward': PosixPath('runs/demo/rl/plots/reward.png'), ...}
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from embedrl.config import UserError
from embedrl.data.schema import read_jsonl

__all__ = [
    "METRICS_FILE",
    "PLOTS_DIR",
    "PlotError",
    "metric_group",
    "metric_groups",
    "moving_average",
    "plot_curves",
    "plot_grouped_bars",
    "plot_run",
    "read_metrics",
]

METRICS_FILE = "metrics.jsonl"  # what every training stage writes into its output folder
PLOTS_DIR = "plots"  # default output folder of plot_run, inside the run folder
X_KEY = "step"
_PANEL_COLUMNS = 4
_DPI = 90
_SIDES = ("query", "target", "std")


class PlotError(UserError, ValueError):
    """A run folder that cannot be plotted: no ``metrics.jsonl``, or one without any numeric value."""


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The lines of ``run/metrics.jsonl`` (or of the file ``run``), in order.

    Raises:
        PlotError: no such folder or file, or a folder without ``metrics.jsonl``.
        DataError: a line that is not a JSON object (the message names the file and line).
    """
    path = Path(run)
    file = path / METRICS_FILE if path.is_dir() else path
    if not path.exists():
        raise PlotError(f"{path} does not exist: pass a run folder (a stage's --out) or its {METRICS_FILE}")
    if not file.is_file():
        raise PlotError(
            f"{path} has no {METRICS_FILE}: pass the output folder of a training stage (train-embedder, "
            "train-reasoner, rl, backbone pretrain)"
        )
    return list(read_jsonl(file))


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (strings, lists, booleans, None, NaN and infinities are not drawn)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def metric_group(key: str) -> str:
    """The figure a metric key is drawn in (rules in the module docstring).

    >>> [metric_group(k) for k in ("train/loss", "reward/outcome/query", "reward/outcome/margin/query", "pairs")]
    ['loss', 'reward', 'reward-details', 'other']
    """
    parts = key.split("/")
    last = parts[-1]
    if "loss" in last:
        return "loss"
    if last in ("lr", "learning_rate"):
        return "learning-rate"
    if parts[0] == "time" or last.endswith("_per_s") or last == "step_time" or key == "train/s":
        return "speed"
    if "accuracy" in last or parts[0] == "eval":
        return "accuracy"
    if parts[0] == "reward":
        is_term = len(parts) == 2 or (len(parts) == 3 and parts[2] in _SIDES)
        return "reward" if is_term else "reward-details"
    return parts[0] if len(parts) > 1 else "other"


def metric_groups(records: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """``{group: [keys]}`` of every key with a numeric value somewhere in ``records`` (``step`` excluded), groups
    in the order of their first key, keys in first-seen order."""
    keys: list[str] = []
    for record in records:
        keys += [k for k, v in record.items() if k != X_KEY and k not in keys and _number(v) is not None]
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(metric_group(key), []).append(key)
    return groups


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start).

    >>> moving_average([1.0, 3.0, 5.0, 7.0], 2)
    [1.0, 2.0, 4.0, 6.0]
    """
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, record in enumerate(records):
        y = _number(record.get(key))
        if y is not None:
            x = _number(record.get(X_KEY))
            xs.append(x if x is not None else float(i + 1))
            ys.append(y)
    return xs, ys


def _save(fig: Figure, png: str | Path, *, tight: bool = True) -> Path:
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # the Agg canvas: PNG without a display
    if tight:
        fig.tight_layout()
    fig.savefig(png, dpi=_DPI)
    return png


def _panel_margins(fig: Figure, rows: int, columns: int, title: bool) -> None:
    """Fixed margins for a grid of panels (``tight_layout`` measures every tick label and takes as long as drawing)."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(
        left=0.55 / width, right=1 - 0.15 / width, bottom=0.5 / height, top=1 - (0.6 if title else 0.35) / height,
        wspace=0.3, hspace=0.55,
    )  # fmt: skip


def plot_curves(
    records: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    png: str | Path,
    *,
    title: str = "",
    smooth: int | None = None,
    columns: int = _PANEL_COLUMNS,
) -> Path:
    """One figure, one panel per key: the raw values against ``step`` and, when smoothing, their moving average.

    Args:
        records: metric lines (``metrics.jsonl``).
        keys: the keys to draw, in panel order; a key with no numeric value gets an empty panel marked
            "not logged" (e.g. a reward term with weight 0).
        png: the file to write.
        title: the figure's title.
        smooth: moving-average window; None = a tenth of the points (no average below 2), 0 = raw values only.
        columns: panels per row.

    Returns:
        ``png``.
    """
    if not keys:
        raise ValueError("plot_curves needs at least one key")
    columns = max(1, min(columns, len(keys)))
    rows = math.ceil(len(keys) / columns)
    fig = Figure(figsize=(4 * columns, 3.2 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    x_label = X_KEY if any(X_KEY in r for r in records) else "line"
    for ax, key in zip(axes, keys, strict=False):
        xs, ys = _series(records, key)
        ax.set_title(key if ys else f"{key} (not logged)", fontsize=9)
        ax.set_xlabel(x_label, fontsize=8)
        ax.tick_params(labelsize=7)
        if not ys:
            continue
        window = max(1, len(ys) // 10) if smooth is None else smooth
        if window > 1:
            ax.plot(xs, ys, alpha=0.3, label="per step")
            ax.plot(xs, moving_average(ys, window), label=f"mean of {window}")
            ax.legend(fontsize=7)
        else:
            ax.plot(xs, ys, marker="." if len(ys) < 50 else None)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    _panel_margins(fig, rows, columns, bool(title))
    return _save(fig, png, tight=False)


def _file_name(group: str) -> str:
    return re.sub(r"[^\w.-]+", "_", group) + ".png"


def plot_run(run: str | Path, out: str | Path | None = None, *, smooth: int | None = None) -> dict[str, Path]:
    """Draw every metric group of a run: ``{group: PNG path}``, one ``<group>.png`` per group in ``out`` (default
    ``run/plots``; ``run`` may also be the ``metrics.jsonl`` file itself, then its folder's ``plots``).

    Raises:
        PlotError: no ``metrics.jsonl`` there, no numeric value in it, or a negative ``smooth``.
    """
    if smooth is not None and smooth < 0:
        raise PlotError(f"smooth={smooth}: give a moving-average window >= 1, or 0 for none")
    records = read_metrics(run)
    groups = metric_groups(records)
    source = Path(run) if Path(run).is_dir() else Path(run).parent
    if not groups:
        raise PlotError(f"{source / METRICS_FILE} holds no numeric metric to plot ({len(records)} lines)")
    folder = Path(out) if out is not None else source / PLOTS_DIR
    return {
        group: plot_curves(records, keys, folder / _file_name(group), title=f"{source.name}: {group}", smooth=smooth)
        for group, keys in groups.items()
    }


def plot_grouped_bars(
    values: Mapping[str, Mapping[str, float]], png: str | Path, *, ylabel: str = "", title: str = ""
) -> Path:
    """Grouped bars: one group per category (the inner keys, in the first series' order), one bar per series (the
    outer keys) in each, with a legend of the series. Returns ``png``."""
    if not values:
        raise ValueError("plot_grouped_bars needs at least one series")
    series = list(values)
    categories = list(values[series[0]])
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(8.0, 1.1 * len(categories)), 3.8))
    ax = fig.subplots()
    for i, name in enumerate(series):
        heights = [values[name].get(c, math.nan) for c in categories]
        ax.bar([c + i * width for c in range(len(categories))], heights, width, label=name)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(categories))])
    ax.set_xticklabels(categories, rotation=30, ha="right", fontsize=8)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=len(series))
    return _save(fig, png)
