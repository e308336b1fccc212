"""Curves of a run's metrics.jsonl (embedrl.plots, `embedrl plot`): groups, PNG files, and the CLI's errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from embedrl.cli import main
from embedrl.data.schema import DataError
from embedrl.plots import (
    PlotError,
    metric_group,
    metric_groups,
    moving_average,
    plot_curves,
    plot_grouped_bars,
    plot_run,
)

# Keys as the stages write them: train-embedder, train-reasoner, rl (native and TRL engines), backbone pretrain.
STAGE_KEYS = {
    "train/loss": "loss", "train/loss_q2t": "loss", "grpo/pg_loss": "loss", "trl/loss": "loss",
    "train/lr": "learning-rate", "trl/learning_rate": "learning-rate",
    "train/pairs_per_s": "speed", "train/examples_per_s": "speed", "train/s": "speed", "time/generation": "speed",
    "trl/step_time": "speed",
    "train/accuracy": "accuracy", "discriminator/accuracy": "accuracy", "eval/crop": "accuracy",
    "reward/total": "reward", "reward/format/query": "reward", "reward/total/std": "reward",
    "reward/not_applicable": "reward",
    "reward/outcome/margin/query": "reward-details", "reward/process/accuracy/target": "reward-details",
    "grpo/kl": "grpo", "trl/entropy": "trl", "completion/length": "completion", "train/grad_norm": "train",
    "pairs": "other", "epoch": "other",
}  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("key", "group"), sorted(STAGE_KEYS.items()))
def test_metric_group(key: str, group: str) -> None:
    assert metric_group(key) == group


def write_run(folder: Path, steps: int = 12) -> Path:
    """A metrics.jsonl with keys of every stage, strings and lists, an eval key every 4th step and an unknown key."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "dataset": "world_t2i", "datasets": ["a", "b"], "skipped": None}
        record |= {key: math.sin(step + i) for i, key in enumerate(STAGE_KEYS)}
        record["custom/thing"] = step * 2
        if step % 4:
            del record["eval/crop"]
        lines.append(json.dumps(record))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_plot_run_draws_one_valid_png_per_group(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    written = plot_run(run)
    expected = set(STAGE_KEYS.values()) | {"custom"}
    assert set(written) == expected
    assert {p.name for p in written.values()} == {f"{g}.png" for g in expected}
    assert all(p.parent == run / "plots" for p in written.values())
    groups = metric_groups([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()])
    assert sorted(k for keys in groups.values() for k in keys) == sorted([*STAGE_KEYS, "custom/thing"])
    # one panel per key, four to a row: 4 inches wide and 3.2 high per panel at 90 dpi
    for group, path in written.items():
        n = len(groups[group])
        assert png_size(path) == (round(4 * min(n, 4) * 90), round(3.2 * math.ceil(n / 4) * 90)), group


def test_plot_curves_marks_a_key_that_was_never_logged(tmp_path: Path) -> None:
    records = [{"step": s, "reward/total": 1.0 + s} for s in range(1, 5)]
    png = plot_curves(records, ["reward/total", "reward/process"], tmp_path / "r.png", smooth=2, columns=2)
    assert png_size(png) == (720, 288)
    with pytest.raises(ValueError, match="at least one key"):
        plot_curves(records, [], tmp_path / "none.png")


def test_moving_average() -> None:
    assert moving_average([2.0, 4.0, 6.0, 8.0, 10.0], 3) == [2.0, 3.0, 4.0, 6.0, 8.0]
    assert moving_average([5.0], 1) == [5.0]
    with pytest.raises(ValueError, match="window"):
        moving_average([1.0], 0)


def test_grouped_bars(tmp_path: Path) -> None:
    png = plot_grouped_bars({"raw": {"a": 1.0, "b": 2.0}, "full": {"a": 3.0}}, tmp_path / "bars.png", ylabel="x")
    assert png_size(png)[0] == 720  # at least 8 inches wide


def test_cli_plot_writes_pngs(tmp_path: Path, capsys) -> None:
    run = write_run(tmp_path / "run", steps=3)
    assert main(["plot", str(run), "--out", str(tmp_path / "png"), "--smooth", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {len(set(STAGE_KEYS.values())) + 1} figures to {tmp_path / 'png'}: ")
    assert (tmp_path / "png" / "loss.png").read_bytes()[:8] == PNG_MAGIC
    small = tmp_path / "small"
    small.mkdir()
    (small / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.5}\n')
    assert main(["plot", str(small / "metrics.jsonl")]) == 0  # the file itself: PNGs next to it in plots/
    assert sorted(p.name for p in (small / "plots").iterdir()) == ["loss.png"]


def test_cli_plot_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"embedrl: error: {tmp_path} has no metrics.jsonl: pass the output folder of a training stage "
        "(train-embedder, train-reasoner, rl, backbone pretrain)"
    )
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["plot", str(tmp_path), "--smooth", "-1"]) == 2
    assert "smooth=-1" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "dataset": "a"}\n')
    with pytest.raises(PlotError, match="no numeric metric"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "train/lo\n')
    with pytest.raises(DataError, match="line 2"):
        plot_run(tmp_path)
    assert main(["plot", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
