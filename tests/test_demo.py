"""`embedrl demo --quick`: runs every available stage and writes results.json and report.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedrl.cli import main
from embedrl.demo import DEMO_MODES


def test_quick_demo_writes_every_mode(tmp_path: Path) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path), "--seed", "1"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["modes"]) == set(DEMO_MODES)
    assert results["seed"] == 1 and results["wall_s"] > 0
    tasks = set(results["n_queries"])
    assert len(tasks) >= 10
    for scores in results["modes"].values():
        assert set(scores["tasks"]) == tasks
        assert 0.0 <= scores["overall"] <= 100.0
        assert scores["overall"] == pytest.approx(sum(scores["tasks"].values()) / len(tasks), abs=0.01)
    assert "| **overall** |" in (tmp_path / "report.md").read_text()
