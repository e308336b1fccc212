"""Experiment trackers of the training stages (``report_to``: TensorBoard, W&B, trackio), on accelerate's tracker API.

Every training stage writes ``metrics.jsonl``; with ``report_to`` it also sends the same scalars (every numeric
key of a record but ``step``, which becomes the tracker's step) to the trackers:

- the Embedder (:mod:`embedrl.train.embedder`) passes :func:`make_trackers` to ``Accelerator(log_with=...)``, then
  calls ``accelerator.init_trackers`` and ``accelerator.log`` (main process only);
- a loop without an ``Accelerator`` (``embedrl backbone pretrain``) uses :class:`StageTrackers`, which starts, feeds
  and closes the same tracker objects;
- the TRL stages (``train-reasoner``, ``rl``) pass ``report_to`` to their ``TrainingArguments`` (TRL's scalars) and
  point TensorBoard at the same folder.

TensorBoard writes its event files to ``<out>/runs`` of every stage (``tensorboard --logdir runs/demo`` shows each
stage's run by its folder). W&B and trackio log to the project ``embedrl``, the run named ``<stage>-<name of out>``.
A tracker whose package is not installed stops the run before it starts.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, TensorBoardTracker, TrackioTracker, WandBTracker

from embedrl.config import ConfigError, TrackingFields, config_to_dict

__all__ = ["PROJECT", "RUNS_DIR", "StageTrackers", "hparams", "make_trackers", "mark_start", "scalars"]

RUNS_DIR = "runs"  # <out>/runs: TensorBoard event files
PROJECT = "embedrl"  # the W&B / trackio project


def make_trackers(cfg: TrackingFields, out: str | Path, stage: str) -> list[GeneralTracker]:
    """The trackers ``cfg.report_to`` names, built but not started (``start()`` runs on the main process only).

    Raises:
        ConfigError: a tracker's package is not installed (named, with the pip command).
    """
    out = Path(out)
    run_name = f"{stage}-{out.resolve().name}"
    trackers: list[GeneralTracker] = []
    for name in cfg.trackers:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"report_to={cfg.report_to} needs the {name} package, which is not installed: pip install {name}, "
                f"or leave {name} out of report_to"
            )
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(RUNS_DIR, out))  # event files in out/runs
        elif name == "wandb":
            trackers.append(WandBTracker(PROJECT, name=run_name, dir=str(out)))
        elif name == "trackio":
            trackers.append(TrackioTracker(PROJECT, name=run_name))
        else:  # TrackingFields validates the names; a new one must be wired here
            raise ConfigError(f"report_to names {name!r}, which embedrl cannot start: use tensorboard, wandb, trackio")
    return trackers


def mark_start(trackers: Sequence[GeneralTracker], step: int) -> None:
    """Mark in TensorBoard that the run starts (or resumes) at ``step``: a ``SessionLog.START`` event, on which
    TensorBoard drops what an earlier, killed run logged at ``step`` and later, so a resumed run's curves hold each
    step once, as its ``metrics.jsonl`` does. Other trackers are left alone (W&B and trackio start a new run)."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    for tracker in trackers:
        if isinstance(tracker, TensorBoardTracker):
            start = Event(wall_time=time.time(), step=step, session_log=SessionLog(status=SessionLog.START))
            tracker.writer._get_file_writer().add_event(start)


def hparams(cfg: Any) -> dict[str, bool | int | float | str]:
    """The stage config as flat tracker hyperparameters: dotted keys, scalars as they are, anything else as JSON."""

    def flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        rows: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, Mapping) and value:
                rows.update(flat(value, f"{prefix}{key}."))
            elif isinstance(value, bool | int | float | str):
                rows[prefix + key] = value
            else:
                rows[prefix + key] = json.dumps(value)
        return rows

    return flat(config_to_dict(cfg))


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a ``metrics.jsonl`` record, ``step`` left out (it is the tracker's step)."""
    return {
        key: value
        for key, value in record.items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
    }


class StageTrackers:
    """The trackers of a training loop that has no ``Accelerator``: started with the stage config as hyperparameters
    and ``first_step`` (the step the loop starts or resumes at: :func:`mark_start`), fed each ``metrics.jsonl``
    record with :meth:`log`, closed by :meth:`finish` (or on leaving a ``with`` block).

    Example:
        >>> with StageTrackers(cfg, out, "rl") as trackers:  # doctest: +SKIP
        ...     trackers.log({"step": 1, "train/loss": 0.5})
    """

    def __init__(self, cfg: TrackingFields, out: str | Path, stage: str, first_step: int = 1) -> None:
        self.trackers = make_trackers(cfg, out, stage)
        config = hparams(cfg)
        for tracker in self.trackers:
            tracker.start()
            tracker.store_init_configuration(config)
        mark_start(self.trackers, first_step)

    def log(self, record: Mapping[str, Any]) -> None:
        """Send the record's scalars at its ``step``."""
        values = scalars(record)
        for tracker in self.trackers:
            tracker.log(values, step=int(record["step"]))

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []

    def __enter__(self) -> StageTrackers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()
