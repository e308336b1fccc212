"""`embedrl demo --quick`: runs every stage and writes results.json, report.md and the plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedrl.cli import main
from embedrl.config import WorldConfig
from embedrl.demo import (
    CLAIMS,
    DEMO_MODES,
    MODES_PLOT,
    REWARD_PLOT,
    answer_agreement,
    check_claims,
    evidence_agreement,
    format_results,
    plot_modes,
    rl_curve,
)
from embedrl.world.generate import generate_world


@pytest.mark.slow  # ~70 s on an idle 2-core machine: `make test PYTEST_ARGS="-m slow"`
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
    assert [c["claim"] for c in results["claims"]] == [f"{a} > {b}" for a, b in CLAIMS]
    for claim in results["claims"]:  # the interval brackets the margin (a paired bootstrap over the same queries)
        low, high = claim["ci95"]
        assert low - 0.01 <= claim["margin"] <= high + 0.01 and claim["clear"] == (low > 0)
    assert (tmp_path / "eval" / "egrl" / "predictions").is_dir()
    assert results["rl"]["steps"] >= 1 and len(results["rl"]["reward/total"]) >= 1
    assert set(results["answer_agreement"]) == {"pre_rl", "egrl"}
    assert list(results["evidence_agreement"]) == ["teacher", "oracle", "pre_rl", "egrl"]
    teacher = results["evidence_agreement"]["teacher"]
    assert 0.5 < teacher["box_exact_rate"] < 1.0 and teacher["boxes"] > 0  # the noisy teacher: mostly right
    oracle = results["evidence_agreement"]["oracle"]
    assert all(oracle[k] == 1.0 for k in ("keyword_precision", "box_exact_rate", "key_frame_recall"))
    for evidence in results["evidence_agreement"].values():
        assert all(
            v is None or 0.0 <= v <= 1.0 for k, v in evidence.items() if k.endswith(("rate", "precision", "recall"))
        )
    for agreement in results["answer_agreement"].values():
        assert set(agreement) == tasks
        assert all(0.0 <= v <= 1.0 for sides in agreement.values() for v in sides.values())
    report = (tmp_path / "report.md").read_text()
    assert "| **overall** |" in report and REWARD_PLOT in report and MODES_PLOT in report
    for png in (REWARD_PLOT, MODES_PLOT):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == results["rl"]["steps"]


def test_claims_report_margins() -> None:
    results = {"modes": {"raw": {"overall": 10.0}, "pre_rl": {"overall": 30.0}, "egrl": {"overall": 35.5},
                         "no_evidence": {"overall": 36.0}}}  # fmt: skip
    claims = {c["claim"]: c for c in check_claims(results)}
    assert claims["egrl > pre_rl"] == {"claim": "egrl > pre_rl", "margin": 5.5, "holds": None}  # untested
    assert claims["pre_rl > raw"]["margin"] == 20.0 and claims["pre_rl > raw"]["holds"] is None
    assert claims["egrl > no_evidence"] == {"claim": "egrl > no_evidence", "margin": -0.5, "holds": False}


def test_claims_carry_a_paired_interval_when_per_query_values_are_given() -> None:
    """Two tasks: egrl gains 1 on every query of task a over pre_rl (a sure +50 points overall), pre_rl and raw
    differ by one flipped query out of 20 in task b (noise), egrl and no_evidence are equal."""
    b_pre = [float(i % 2) for i in range(20)]
    b_raw = [1.0 - b_pre[0], *b_pre[1:]]
    values = {"raw": {"a": [0.0] * 10, "b": b_raw}, "pre_rl": {"a": [0.0] * 10, "b": b_pre},
              "egrl": {"a": [1.0] * 10, "b": b_pre}, "no_evidence": {"a": [1.0] * 10, "b": b_pre}}  # fmt: skip
    overall = {m: 100 * (sum(v["a"]) / 10 + sum(v["b"]) / 20) / 2 for m, v in values.items()}
    results = {"seed": 0, "modes": {m: {"overall": o} for m, o in overall.items()}}
    claims = {c["claim"]: c for c in check_claims(results, values)}
    assert claims["egrl > pre_rl"]["ci95"] == [50.0, 50.0] and claims["egrl > pre_rl"]["clear"]
    assert claims["egrl > pre_rl"]["holds"] is True
    low, high = claims["pre_rl > raw"]["ci95"]
    assert claims["pre_rl > raw"]["margin"] == -2.5 and low < 0 <= high and not claims["pre_rl > raw"]["clear"]
    assert claims["pre_rl > raw"]["holds"] is False
    assert claims["egrl > no_evidence"] == {"claim": "egrl > no_evidence", "margin": 0.0, "holds": False,
                                                 "ci95": [0.0, 0.0], "clear": False}  # fmt: skip
    results |= {"claims": list(claims.values()), "n_queries": {"a": 10, "b": 20}, "wall_s": 1.0, "stage_s": {}}
    results["modes"] = {m: {"overall": o, "tasks": {"a": 0.0, "b": 0.0}} for m, o in overall.items()}
    report = format_results(results)
    lines = report.splitlines()
    assert "- egrl > pre_rl: holds: margin +50.00 points, 95 % CI [+50.00, +50.00], above 0" in lines
    low, high = claims["pre_rl > raw"]["ci95"]
    ci = f"95 % CI [{low:+.2f}, {high:+.2f}]"
    assert f"- pre_rl > raw: does not hold: margin -2.50 points, {ci}, includes 0" in lines
    assert "- egrl > no_evidence: does not hold: margin +0.00 points, 95 % CI [+0.00, +0.00], includes 0" in lines
    assert "holds (" not in report and "clear of noise" not in report  # no verdict that hedges
    # A positive margin whose interval reaches 0 does not hold either; without an interval nothing is claimed.
    noisy = {"claim": "egrl > pre_rl", "margin": 1.45, "holds": True, "ci95": [-1.41, 4.31], "clear": False}
    untested = {"claim": "pre_rl > raw", "margin": 5.5, "holds": True}
    lines = format_results(results | {"claims": [noisy, untested]}).splitlines()
    assert "- egrl > pre_rl: does not hold: margin +1.45 points, 95 % CI [-1.41, +4.31], includes 0" in lines
    assert "- pre_rl > raw: not tested (no interval): margin +5.50 points" in lines
    teacher = {"keyword_precision": 0.9, "keyword_recall": 1.0, "box_exact_rate": 0.875, "key_frame_precision": 0.8,
               "key_frame_recall": None}  # fmt: skip
    results["evidence_agreement"] = {"teacher": teacher}
    assert "teacher 0.90 / 1.00; 0.88; 0.80 / n/a." in format_results(results)


def test_oracle_follows_teacher_in_the_table_and_the_plot(tmp_path: Path) -> None:
    assert DEMO_MODES[DEMO_MODES.index("teacher") + 1] == "oracle"
    modes = {m: {"overall": float(i), "tasks": {"world_a": float(i), "world_b": 2.0 * i}} for i, m in
             enumerate(DEMO_MODES)}  # fmt: skip
    results = {"seed": 0, "wall_s": 1.0, "stage_s": {}, "n_queries": {"world_a": 10, "world_b": 20}, "modes": modes}
    lines = format_results(results).splitlines()
    assert "| task | queries | raw | teacher | oracle | pre_rl | egrl | answer_only | no_evidence |" in lines
    assert "| world_b | 20 | 0.0 | 2.0 | 4.0 | 6.0 | 8.0 | 10.0 | 12.0 |" in lines
    assert plot_modes(results, tmp_path / MODES_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_oracle_evidence_matches_the_ground_truth_exactly(tmp_path: Path) -> None:
    """The oracle's T-CoTs are the teacher's at zero rates: every evidence rate is 1 by construction, while the
    default-noise teacher's are not."""
    world = generate_world(WorldConfig(out=str(tmp_path / "world"), seed=0, size="tiny"))
    oracle = evidence_agreement(world, tmp_path / "cache", None, "oracle")
    rates = ("keyword_precision", "keyword_recall", "box_exact_rate", "key_frame_precision", "key_frame_recall")
    assert all(oracle[k] == 1.0 for k in rates), oracle
    assert min(oracle[k] for k in ("keywords", "boxes", "frames_given", "frames_decisive")) > 0
    teacher = evidence_agreement(world, tmp_path / "cache", None)
    assert teacher["frames_decisive"] == oracle["frames_decisive"]  # the same items
    assert teacher["box_exact_rate"] < 1.0 and teacher["keyword_precision"] < 1.0
    assert teacher["key_frame_precision"] < 1.0 and teacher["key_frame_recall"] < 1.0
    results = {"seed": 0, "wall_s": 1.0, "stage_s": {}, "n_queries": {"a": 1}, "modes": {"raw": {"overall": 0.0,
               "tasks": {"a": 0.0}}}, "evidence_agreement": {"teacher": teacher, "oracle": oracle}}  # fmt: skip
    assert "; oracle 1.00 / 1.00; 1.00; 1.00 / 1.00." in format_results(results)


def test_rl_curve_means_over_stretches(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"reward/total": float(i), "reward/format": 1.0, "reward/process": 0.5, "reward/outcome": 0.0,
             "dataset": "ab"[i % 2]} for i in range(8)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve = rl_curve(path)
    assert curve["steps"] == 8 and curve["chunk_steps"] == 2
    assert curve["reward/total"] == [0.5, 2.5, 4.5, 6.5] and curve["reward/format"] == [1.0] * 4
    assert curve["total_by_dataset_halves"] == {"a": [1.0, 5.0], "b": [2.0, 6.0]}
    assert curve["total_change_within_dataset"] == 4.0
    assert rl_curve(tmp_path / "missing.jsonl") == {}


def test_a_term_with_weight_zero_is_left_out(tmp_path: Path) -> None:
    """With w_process = 0 the RL log has no process column: the curve and the plot leave it out."""
    from embedrl.demo import plot_rewards

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": i + 1, "reward/total": 1.0, "reward/format": 1.0, "reward/outcome": 0.0, "dataset": "a"}
            for i in range(4)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve = rl_curve(path)
    assert "reward/process" not in curve and curve["reward/format"] == [1.0] * 4
    assert plot_rewards(path, tmp_path / REWARD_PLOT) == tmp_path / REWARD_PLOT
    assert (tmp_path / REWARD_PLOT).stat().st_size > 0


def _tcot(answer: str) -> str:
    return f'<thinking>t {{"text_keywords": ["a"]}}</thinking><rethink>r</rethink><answer>{answer}</answer>'


def test_answer_agreement_compares_with_the_teacher(tmp_path: Path) -> None:
    task = tmp_path / "world" / "eval" / "t1"
    task.mkdir(parents=True)
    files = {"queries": "t1/queries.jsonl", "candidates": "t1/candidates.jsonl"}
    manifest = {"tasks": {"t1": {"eval_type": "local", "files": files}}}
    (tmp_path / "world" / "eval" / "manifest.json").write_text(json.dumps(manifest))
    (task / "candidates.jsonl").write_text(
        "".join(json.dumps({"id": f"c{i}", "tcot": _tcot(f"Blue {i}.")}) + "\n" for i in range(2))
    )
    row = {"query": {"id": "q0", "tcot": _tcot("A red circle.")}, "candidates": ["c0", "c1"], "qrels": {"c0": 1},
           "positives": ["c0"]}  # fmt: skip
    (task / "queries.jsonl").write_text(json.dumps(row) + "\n")
    cache = tmp_path / "cache" / "tcots"
    cache.mkdir(parents=True)
    records = [
        ("q0", "query", "a RED circle.", "r1"),
        ("c0", "target", "Blue 0.", "r1"),
        ("c1", "target", "Blue 0.", "r1"),
        ("c1", "target", "Blue 1.", "other-reasoner"),
    ]
    (cache / "t1.jsonl").write_text(
        "".join(
            json.dumps({"id": i, "side": side, "text": _tcot(a), "reasoner": r, "prompt_hash": "p", "decoding": {}})
            + "\n"
            for i, side, a, r in records
        )
    )
    assert answer_agreement(tmp_path / "world", tmp_path / "cache", "r1") == {"t1": {"query": 1.0, "target": 0.5}}
