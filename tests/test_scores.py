"""Score files and aggregation: the MMEB-V2 registry, the published aggregates (docs/benchmarks.md §1.6), readers,
writers, the generic aggregator over a world manifest, and `embedrl eval summarize`."""

from __future__ import annotations

import copy
import doctest
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

import embedrl.eval.scores as scores_module
from embedrl.cli import main
from embedrl.eval.metrics import compute_metrics
from embedrl.eval.scores import (
    MAIN_METRICS,
    MMEB_V2_DATASETS,
    MMEB_V2_UNSCORED,
    SCORE_KEYS,
    Leaderboard,
    ScoreFileError,
    aggregate,
    canonical_key,
    format_summary,
    mmeb_v2_task_info,
    overall_difference_interval,
    read_leaderboard,
    read_task_scores,
    select_mmeb_v2,
    sub_group_scores,
    summarize,
    summarize_tasks,
    write_leaderboard,
    write_task_scores,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # published score files and eval configs (tests/fixtures)
SCORES_DIR = FIXTURES / "scores"
MMEB_DIR = FIXTURES / "mmeb-v2"

FILES = {
    "2B": "embed-rl-2b.json",
    "4B": "embed-rl-4b.json",
    "VLM2Vec-V2": "VLM2Vec-V2.0-Qwen2VL-2B.v2.0.1.json",
    "GME-7B": "gme-Qwen2-VL-7B-Instruct.v2.0.1.json",
}
COLUMNS = list(FILES)

# docs/benchmarks.md §1.6: main metric ×100, ±0.01. Row: (#datasets, 2B, 4B, VLM2Vec-V2, GME-7B).
EXPECTED = {
    "All": (78, 66.78, 68.08, 57.89, 57.79),
    "Image": (36, 69.24, 71.19, 64.92, 55.93),
    "Video": (18, 52.13, 52.99, 34.67, 38.43),
    "VisDoc": (24, 74.06, 74.74, 64.76, 75.11),
    "I-CLS": (10, 62.84, 63.69, 62.93, 57.56),
    "I-QA": (10, 67.91, 70.52, 56.42, 34.57),
    "I-RET": (12, 68.64, 71.28, 69.60, 71.20),
    "I-VG": (4, 90.40, 91.35, 77.13, 59.45),
    "V-CLS": (5, 57.04, 57.59, 39.24, 37.27),
    "V-QA": (5, 55.93, 58.37, 34.66, 50.28),
    "V-RET": (5, 45.06, 45.11, 28.38, 28.26),
    "V-MRET": (3, 49.36, 49.52, 37.55, 37.53),
    "VDRv1": (10, 79.95, 80.24, 74.39, 89.55),
    "VDRv2": (4, 51.96, 53.36, 44.61, 55.47),
    "VisRAG": (6, 84.61, 84.88, 79.33, 84.95),
    "OOD": (4, 65.66, 67.13, 38.99, 43.86),
}
HIGH_PRECISION = [
    ("2B", "All", 66.7770),
    ("2B", "Image", 69.2444),
    ("2B", "Video", 52.1262),
    ("2B", "VisDoc", 74.0640),
    ("4B", "All", 68.0832),
    ("4B", "Image", 71.1917),
    ("4B", "Video", 52.9916),
    ("4B", "VisDoc", 74.7391),
    ("VLM2Vec-V2", "All", 57.8905),
    ("VLM2Vec-V2", "I-VG", 77.1250),
    ("GME-7B", "All", 57.7917),
]


def lookup(summary: dict, name: str) -> tuple[float, int]:
    """(score, #datasets) of an aggregate by its display name."""
    if name == "All":
        return summary["overall"], summary["counts"]["overall"]
    modality = {"Image": "image", "Video": "video", "VisDoc": "visdoc"}.get(name)
    if modality:
        return summary["modality"][modality], summary["counts"]["modality"][modality]
    key = "group" if name in summary["group"] else "meta_task"
    return summary[key][name], summary["counts"][key][name]


@pytest.fixture(scope="module")
def summaries() -> dict[str, dict]:
    return {col: summarize(SCORES_DIR / name) for col, name in FILES.items()}


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------


def test_registry_shape() -> None:
    keys = [d.key for d in MMEB_V2_DATASETS]
    assert len(keys) == len(set(keys)) == 78
    by_modality = {m: [d for d in MMEB_V2_DATASETS if d.modality == m] for m in MAIN_METRICS}
    assert {m: len(v) for m, v in by_modality.items()} == {"image": 36, "video": 18, "visdoc": 24}
    assert {m: sum(d.num_queries for d in v) for m, v in by_modality.items()} == {
        "image": 36_000,
        "video": 34_940,
        "visdoc": 12_590,
    }
    meta_tasks = {d.meta_task for d in MMEB_V2_DATASETS}
    groups = {d.group for d in MMEB_V2_DATASETS} - {None}
    assert len(meta_tasks) == 9 and len(groups) == 4  # 13 sub-groups
    for name, (n, *_) in EXPECTED.items():
        if name not in ("All", "Image", "Video", "VisDoc"):
            assert sum(name in (d.meta_task, d.group) for d in MMEB_V2_DATASETS) == n, name
    assert all(d.metric == MAIN_METRICS[d.modality] for d in MMEB_V2_DATASETS)
    assert MAIN_METRICS == {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg_linear@5"}
    assert set(MMEB_V2_UNSCORED).isdisjoint(keys)
    info = mmeb_v2_task_info()
    assert list(info) == keys and info["VisRAG_PlotQA"] == {
        "modality": "visdoc",
        "meta_task": "VisDoc",
        "metric": "ndcg_linear@5",
        "group": "VisRAG",
    }


def test_canonical_key() -> None:
    assert canonical_key("ViDoSeek-page-fixed") == "ViDoSeek-page"
    assert canonical_key("MMLongBench-page-fixed") == "MMLongBench-page"
    assert canonical_key("MMLongBench-doc") == "MMLongBench-doc"
    assert canonical_key("ViDoSeek-doc-fixed") == "ViDoSeek-doc-fixed"  # only the page sets were fixed


def _yaml_sections(path: Path) -> dict[str, str]:
    """image.yaml groups its keys under `# CLS`, `# QA`, `# RET …`, `# VG …` comments."""
    sections, current = {}, None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            current = line[2:].split()[0]
        elif line and not line[0].isspace() and line.endswith(":"):
            sections[line[:-1]] = current
    return sections


def test_registry_matches_the_eval_configs() -> None:
    configs = {m: yaml.safe_load((MMEB_DIR / f"{m}.yaml").read_text(encoding="utf-8")) for m in MAIN_METRICS}
    assert {m: len(c) for m, c in configs.items()} == {"image": 36, "video": 18, "visdoc": 27}
    for modality, config in configs.items():
        scored = {d.key for d in MMEB_V2_DATASETS if d.modality == modality}
        assert set(config) - set(MMEB_V2_UNSCORED) == scored, modality
    assert set(configs["visdoc"]) - {d.key for d in MMEB_V2_DATASETS} == {
        "ViDoRe_biomedical_lectures_v2",
        "ViDoRe_economics_reports_v2",
        "ViDoRe_esg_reports_v2",
    }
    # sub-groups: image from the section comments, video from the frame folders, VisDoc from parser and name
    sections = _yaml_sections(MMEB_DIR / "image.yaml")
    for d in MMEB_V2_DATASETS:
        entry = configs[d.modality][d.key]
        if d.modality == "image":
            assert d.meta_task == f"I-{sections[d.key]}", d.key
        elif d.modality == "video":
            folder = entry["frame_root"].split("/")[2]  # video-tasks/frames/<video_cls|video_qa|…>/…
            assert d.meta_task == {"video_cls": "V-CLS", "video_qa": "V-QA", "video_ret": "V-RET"}.get(
                folder, "V-MRET" if folder == "video_mret" else folder
            ), d.key
        else:
            if entry["dataset_parser"] == "visrag":
                expected = "VisRAG"
            elif not d.key.startswith("ViDoRe_"):
                expected = "OOD"
            else:
                expected = "VDRv2" if d.key.endswith(("_v2", "_v2_multilingual")) else "VDRv1"
            assert d.group == expected, d.key


# ----------------------------------------------------------------------------------------------------------------
# Published files: shape, counts, and the §1.6 aggregates
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("column", COLUMNS)
def test_fixture_shape_order_and_counts(column: str) -> None:
    board = read_leaderboard(SCORES_DIR / FILES[column])
    expected_order = [d.key for d in MMEB_V2_DATASETS]
    seen = []
    for block in board.metrics.values():
        for key, obj in block.items():
            assert list(obj) == list(SCORE_KEYS), key
            if key not in MMEB_V2_UNSCORED:
                seen.append(canonical_key(key))
    assert seen == expected_order  # datasets follow the order of §1.1 within each modality
    selection = select_mmeb_v2(board)
    counts = {d.key: d.num_queries for d in MMEB_V2_DATASETS}
    assert {k: v["num_data"] for k, v in selection.results.items()} == counts
    assert all(v["num_pred"] == v["num_data"] for v in selection.results.values())
    if column in ("VLM2Vec-V2", "GME-7B"):
        assert selection.ignored == ["MomentSeeker_1k8"]
        assert selection.source_keys == {}
        assert selection.split_versions["ViDoSeek-page"] == "unspecified"  # plain keys do not reveal the version
    else:
        assert selection.ignored == []
        assert selection.source_keys == {
            "ViDoSeek-page": "ViDoSeek-page-fixed",
            "MMLongBench-page": "MMLongBench-page-fixed",
        }
        assert selection.split_versions["ViDoSeek-page"] == "fixed"
    assert selection.split_versions["MomentSeeker"] == "dedup-1602"


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize("column", COLUMNS)
def test_published_aggregates(summaries, column: str, name: str) -> None:
    n, *values = EXPECTED[name]
    score, count = lookup(summaries[column], name)
    assert count == n
    assert score == pytest.approx(values[COLUMNS.index(column)], abs=0.01)


@pytest.mark.parametrize(("column", "name", "value"), HIGH_PRECISION)
def test_published_aggregates_high_precision(summaries, column: str, name: str, value: float) -> None:
    assert lookup(summaries[column], name)[0] == pytest.approx(value, abs=1e-4)


# docs/method.md §7.1: the Embed-RL rows of paper Table 1, one decimal (4B Image as corrected to 71.2). (2B, 4B)
PAPER_TABLE_1 = {
    "I-CLS": (62.8, 63.7),
    "I-QA": (67.9, 70.5),
    "I-RET": (68.6, 71.3),
    "I-VG": (90.4, 91.4),
    "Image": (69.2, 71.2),
    "V-CLS": (57.0, 57.6),
    "V-QA": (55.9, 58.4),
    "V-RET": (45.1, 45.1),
    "V-MRET": (49.4, 49.5),
    "Video": (52.1, 53.0),
    "VDRv1": (79.9, 80.2),
    "VDRv2": (52.0, 53.4),
    "VisRAG": (84.6, 84.9),
    "OOD": (65.7, 67.1),
    "VisDoc": (74.1, 74.7),
    "All": (66.8, 68.1),
}


@pytest.mark.parametrize("name", list(PAPER_TABLE_1))
def test_paper_table_values_to_one_decimal(summaries, name: str) -> None:
    for column, value in zip(("2B", "4B"), PAPER_TABLE_1[name], strict=True):
        # the paper rounds half-way values either way (79.95 -> 79.9): allow 0.05 plus float slack
        assert abs(lookup(summaries[column], name)[0] - value) <= 0.05 + 1e-9, column


# docs/benchmarks.md §1.6, "common mistakes": the aggregator must not return these.
MISTAKES = {
    "Image": (72.45, 74.21, 66.52, 55.70),  # mean of the 4 sub-group means
    "All": (65.14, 66.31, 54.78, 56.49),  # mean of the 3 modality means
    "VisDoc": (68.24, 69.59, 57.98, 71.81),  # VisDoc scored with hit@1
}


@pytest.mark.parametrize("column", COLUMNS)
def test_not_the_common_mistakes(summaries, column: str) -> None:
    s = summaries[column]
    i = COLUMNS.index(column)
    for name, values in MISTAKES.items():
        assert abs(lookup(s, name)[0] - values[i]) > 0.01, name
    # and the mistakes really produce those values, so the test vectors above can fail
    groups = s["meta_task"]
    image_of_means = np.mean([groups[g] for g in ("I-CLS", "I-QA", "I-RET", "I-VG")])
    assert image_of_means == pytest.approx(MISTAKES["Image"][i], abs=0.01)
    assert np.mean(list(s["modality"].values())) == pytest.approx(MISTAKES["All"][i], abs=0.01)
    board = read_leaderboard(SCORES_DIR / FILES[column])
    hit1 = {k: v["hit@1"] for k, v in select_mmeb_v2(board).results.items()}
    visdoc_hit1 = 100 * np.mean([hit1[d.key] for d in MMEB_V2_DATASETS if d.modality == "visdoc"])
    assert visdoc_hit1 == pytest.approx(MISTAKES["VisDoc"][i], abs=0.01)


@pytest.mark.parametrize(("column", "video", "overall"), [("VLM2Vec-V2", 34.99, 57.67), ("GME-7B", 38.37, 57.53)])
def test_every_key_averaged_is_a_mistake(summaries, column: str, video: float, overall: float) -> None:
    board = read_leaderboard(SCORES_DIR / FILES[column])
    all_keys = [
        100 * obj[MAIN_METRICS[m]] for m, block in board.metrics.items() for obj in block.values()
    ]  # 79 entries, MomentSeeker_1k8 included
    assert len(all_keys) == 79
    assert np.mean(all_keys) == pytest.approx(overall, abs=0.01)
    assert abs(summaries[column]["overall"] - overall) > 0.01
    video_all = [100 * obj["hit@1"] for obj in board.metrics["video"].values()]
    assert np.mean(video_all) == pytest.approx(video, abs=0.01)
    assert abs(summaries[column]["modality"]["video"] - video) > 0.01


@pytest.mark.parametrize(("column", "v_mret", "overall"), [("VLM2Vec-V2", 36.86, 57.86), ("GME-7B", 36.85, 57.77)])
def test_momentseeker_1k8_is_ignored(summaries, column: str, v_mret: float, overall: float) -> None:
    """Scoring MomentSeeker_1k8 instead of MomentSeeker gives the §1.6 mistake values; we do not."""
    board = read_leaderboard(SCORES_DIR / FILES[column])
    swapped = copy.deepcopy(board.metrics)
    swapped["video"]["MomentSeeker"] = swapped["video"].pop("MomentSeeker_1k8")
    wrong = summarize_tasks(
        select_mmeb_v2(Leaderboard(board.metadata, swapped), check_counts=False).results, mmeb_v2_task_info()
    )
    assert wrong["meta_task"]["V-MRET"] == pytest.approx(v_mret, abs=0.01)
    assert wrong["overall"] == pytest.approx(overall, abs=0.01)
    ours = summaries[column]
    assert abs(ours["meta_task"]["V-MRET"] - v_mret) > 0.01 and abs(ours["overall"] - overall) > 0.01


@pytest.mark.parametrize(("column", "visdoc22", "ood2"), [("2B", 74.90, 66.46), ("4B", 75.38, 66.58)])
def test_fixed_keys_are_not_skipped(summaries, column: str, visdoc22: float, ood2: float) -> None:
    s = summaries[column]
    assert s["counts"]["modality"]["visdoc"] == 24 and s["counts"]["group"]["OOD"] == 4
    assert abs(s["modality"]["visdoc"] - visdoc22) > 0.01 and abs(s["group"]["OOD"] - ood2) > 0.01
    # what skipping them would give (a partial result over 22 VisDoc sets)
    board = read_leaderboard(SCORES_DIR / FILES[column])
    skipped = copy.deepcopy(board.metrics)
    for key in ("ViDoSeek-page-fixed", "MMLongBench-page-fixed"):
        del skipped["visdoc"][key]
    partial = summarize_tasks(
        select_mmeb_v2(Leaderboard(board.metadata, skipped)).results,
        mmeb_v2_task_info(),
        group_keys=("modality", "meta_task", "group"),
        partial=True,
    )
    assert partial["modality"]["visdoc"] == pytest.approx(visdoc22, abs=0.01)
    assert partial["group"]["OOD"] == pytest.approx(ood2, abs=0.01)
    assert partial["partial"] and partial["missing"] == ["ViDoSeek-page", "MMLongBench-page"]


def test_sub_group_scores_and_markdown(summaries) -> None:
    s = summaries["2B"]
    subs = sub_group_scores(s)
    assert len(subs) == 13 and subs["VisDoc"] == s["modality"]["visdoc"]
    assert list(subs)[:4] == ["I-CLS", "I-QA", "I-RET", "I-VG"]
    text = format_summary(s)
    assert "| **All** | 78 | **66.78** |" in text
    assert "| **Image** | 36 | **69.24** |" in text
    assert "| OOD | 4 | 65.66 |" in text
    assert "| ViDoSeek-page-fixed | VisDoc | VisDoc / OOD | ndcg_linear@5 |" in text
    assert text.count("\n| ") == 2 + 16 + 1 + 78  # 2 table headers, 16 aggregates, All w/o OOD, 78 tasks
    assert "Embed-RL-2B" in text and "ViDoSeek-page fixed" in text
    assert "MomentSeeker_1k8" in format_summary(summaries["GME-7B"])
    json.dumps(s)  # JSON-serialisable


# ----------------------------------------------------------------------------------------------------------------
# Reader errors
# ----------------------------------------------------------------------------------------------------------------


def _board_from_fixture(column: str = "2B") -> Leaderboard:
    return read_leaderboard(SCORES_DIR / FILES[column])


def _write(tmp_path: Path, board: Leaderboard) -> Path:
    path = tmp_path / "board.json"
    path.write_text(json.dumps({"metadata": board.metadata, "metrics": board.metrics}))
    return path


def test_missing_dataset_is_an_error_unless_partial(tmp_path: Path) -> None:
    board = _board_from_fixture()
    del board.metrics["image"]["EDIS"]
    path = _write(tmp_path, board)
    with pytest.raises(ScoreFileError, match="partial=True"):
        summarize(path)
    s = summarize(path, partial=True)
    assert s["partial"] and s["missing"] == ["EDIS"]
    assert s["counts"]["overall"] == 77 and s["counts"]["meta_task"]["I-RET"] == 11
    assert "**Partial result**: no score for EDIS." in format_summary(s)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["image"].update(Foo=m["image"]["EDIS"]), "unknown dataset key 'Foo'"),
        (lambda m: m["visdoc"].update({"ViDoSeek-page": m["visdoc"]["ViDoSeek-page-fixed"]}), "appears twice"),
        (lambda m: m["video"].update(EDIS=m["image"].pop("EDIS")), "is in metrics.video"),
        (lambda m: m["image"]["EDIS"].update(num_pred=999), "num_pred=999"),
        (lambda m: m["image"]["EDIS"].update(num_pred=10, num_data=10), "num_data=10"),
        (lambda m: m["image"]["EDIS"].update({"hit@1": 84.5}), r"not a fraction"),
        (lambda m: m["image"]["EDIS"].pop("f1@5"), "missing \\['f1@5'\\]"),
        (lambda m: m.update(audio={}), "unknown modality block"),
    ],
)
def test_reader_rejects_bad_files(tmp_path: Path, edit, match: str) -> None:
    board = _board_from_fixture()
    edit(board.metrics)
    with pytest.raises(ScoreFileError, match=match):
        summarize(_write(tmp_path, board))


def test_check_counts_can_be_relaxed(tmp_path: Path) -> None:
    board = _board_from_fixture()
    board.metrics["image"]["EDIS"].update(num_pred=10, num_data=10)
    assert summarize(_write(tmp_path, board), check_counts=False)["counts"]["overall"] == 78


def test_momentseeker_1800_records_the_old_split(tmp_path: Path) -> None:
    board = _board_from_fixture("VLM2Vec-V2")
    board.metrics["video"]["MomentSeeker"] = board.metrics["video"].pop("MomentSeeker_1k8")
    s = summarize(_write(tmp_path, board))
    assert s["split_versions"]["MomentSeeker"] == "original-1800"


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ScoreFileError, match="no such score file"):
        summarize(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ScoreFileError, match=r"bad\.json: not valid JSON"):
        read_leaderboard(bad)
    bad.write_text('{"metadata": {}}')
    with pytest.raises(ScoreFileError, match="'metrics'"):
        read_leaderboard(bad)


# ----------------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------------


def test_task_score_file_round_trip(tmp_path: Path) -> None:
    scores = compute_metrics(np.array([[0.9, 0.1, 0.4], [0.2, 0.3, 0.1]]), [[0], {1: 1, 2: 2}])
    path = write_task_scores(tmp_path, "ViDoSeek-doc", scores)
    assert path.name == "ViDoSeek-doc_score.json"
    back = read_task_scores(path)
    assert back == scores and list(back) == list(SCORE_KEYS)
    with pytest.raises(ScoreFileError, match="not a fraction"):
        write_task_scores(tmp_path, "x", {**scores, "hit@1": 50.0})
    with pytest.raises(ScoreFileError, match="unexpected"):
        write_task_scores(tmp_path, "x", {**scores, "hit@50": 1.0})


@pytest.mark.parametrize("pages", ["fixed", "old"])
def test_leaderboard_round_trip(tmp_path: Path, pages: str) -> None:
    results = select_mmeb_v2(_board_from_fixture()).results
    metadata = {
        "model_name": "Embed-RL-2B",
        "benchmark_version": "v2.1" if pages == "fixed" else "v2.0.1",
        "split_versions": {"ViDoSeek-page": pages, "MMLongBench-page": pages},
        "cot_mode": "query+candidate",
        "report_generated_date": "2026-02-08T07:25:08",
    }
    path = write_leaderboard(tmp_path / "board.json", results, metadata)
    raw = json.loads(path.read_text())
    meta = raw["metadata"]
    assert meta["benchmark"] == "MMEB-V2" and meta["benchmark_version"] == metadata["benchmark_version"]
    assert meta["main_metrics"] == MAIN_METRICS and meta["cot_mode"] == "query+candidate"
    assert meta["split_versions"] == {"ViDoSeek-page": pages, "MMLongBench-page": pages, "MomentSeeker": "dedup-1602"}
    assert "embedrl_version" in meta and "partial" not in meta
    page_keys = [k for k in raw["metrics"]["visdoc"] if "-page" in k]
    suffix = "-fixed" if pages == "fixed" else ""
    assert page_keys == [f"ViDoSeek-page{suffix}", f"MMLongBench-page{suffix}"]
    s = summarize(path)
    assert s["overall"] == pytest.approx(66.777, abs=1e-3)
    assert s["split_versions"]["ViDoSeek-page"] == pages  # from the metadata, even for plain keys


def test_leaderboard_writer_validates(tmp_path: Path) -> None:
    results = select_mmeb_v2(_board_from_fixture()).results
    good = {"model_name": "m", "benchmark_version": "v2.1", "split_versions": {"ViDoSeek-page": "fixed"}}
    with pytest.raises(ScoreFileError, match="lacks \\['benchmark_version', 'split_versions'\\]"):
        write_leaderboard(tmp_path / "b.json", results, {"model_name": "m"})
    with pytest.raises(ScoreFileError, match="MMLongBench-page"):
        write_leaderboard(tmp_path / "b.json", results, good)
    good["split_versions"]["MMLongBench-page"] = "fixed"
    with pytest.raises(ScoreFileError, match="canonical keys"):
        write_leaderboard(tmp_path / "b.json", {"ViDoSeek-page-fixed": results["ViDoSeek-page"]}, good)
    some = {k: results[k] for k in list(results)[:5]}
    with pytest.raises(ScoreFileError, match="partial=True"):
        write_leaderboard(tmp_path / "b.json", some, good)
    path = write_leaderboard(tmp_path / "b.json", some, good, partial=True)
    meta = json.loads(path.read_text())["metadata"]
    assert meta["partial"] is True and len(meta["missing"]) == 73
    assert summarize(path, partial=True)["counts"]["overall"] == 5


def test_declared_old_split_contradicts_fixed_key(tmp_path: Path) -> None:
    board = _board_from_fixture()
    board.metadata["split_versions"] = {"ViDoSeek-page": "old"}
    with pytest.raises(ScoreFileError, match="declared 'old'"):
        summarize(_write(tmp_path, board))


# ----------------------------------------------------------------------------------------------------------------
# Generic aggregation (the synthetic world's manifest)
# ----------------------------------------------------------------------------------------------------------------

INFO = {
    "t1": {"modality": "image", "meta_task": "I-CLS", "metric": "hit@1"},
    "t2": {"modality": "image", "meta_task": "I-RET", "metric": "hit@1"},
    "t3": {"modality": "image", "meta_task": "I-RET", "metric": "hit@1"},
    "t4": {"modality": "image", "meta_task": "I-RET", "metric": "hit@1"},
    "t5": {"modality": "visdoc", "meta_task": "VisDoc", "metric": "ndcg_linear@5"},
}


def test_aggregate_is_a_mean_over_tasks() -> None:
    agg = aggregate({"t1": 0.2, "t2": 0.4, "t3": 0.6, "t4": 0.8, "t5": 1.0}, INFO)
    assert agg["overall"] == pytest.approx(0.6)
    assert agg["modality"] == pytest.approx({"image": 0.5, "visdoc": 1.0})  # not (0.2 + 0.6) / 2 = 0.4
    assert agg["meta_task"] == pytest.approx({"I-CLS": 0.2, "I-RET": 0.6, "VisDoc": 1.0})
    assert list(agg["meta_task"]) == ["I-CLS", "I-RET", "VisDoc"]  # registry order
    assert agg["counts"] == {
        "overall": 5,
        "modality": {"image": 4, "visdoc": 1},
        "meta_task": {"I-CLS": 1, "I-RET": 3, "VisDoc": 1},
    }
    assert agg["missing"] == []


def test_aggregate_rejects_unknown_missing_and_bad_scores() -> None:
    scores = {"t1": 0.2, "t2": 0.4, "t3": 0.6, "t4": 0.8, "t5": 1.0}
    with pytest.raises(ScoreFileError, match="outside the registry"):
        aggregate({**scores, "t9": 0.5}, INFO)
    with pytest.raises(ScoreFileError, match="partial=True"):
        aggregate({"t1": 0.2}, INFO)
    assert aggregate({"t1": 0.2, "t5": 0.4}, INFO, partial=True)["missing"] == ["t2", "t3", "t4"]
    with pytest.raises(ScoreFileError, match="not a finite number"):
        aggregate({**scores, "t1": math.nan}, INFO)
    with pytest.raises(ScoreFileError, match="nothing to aggregate"):
        aggregate({}, INFO, partial=True)


@pytest.fixture(scope="module")
def world_manifest(tmp_path_factory) -> dict:
    from embedrl.config import WorldConfig
    from embedrl.world.generate import generate_world

    out = generate_world(WorldConfig(out=str(tmp_path_factory.mktemp("world")), seed=0, size="tiny"))
    return json.loads((Path(out) / "eval" / "manifest.json").read_text())


def test_summarize_tasks_over_the_world_manifest(world_manifest: dict) -> None:
    tasks = world_manifest["tasks"]
    results = {}
    for i, (name, info) in enumerate(tasks.items()):
        results[name] = {"hit@1": 0.1 * (i % 10), "ndcg_linear@5": 0.05 * (i % 10)}
        assert {"modality", "meta_task", "metric"} <= set(info)
    s = summarize_tasks(results, tasks, benchmark="world")
    main = {name: 100 * results[name][info["metric"]] for name, info in tasks.items()}
    assert s["overall"] == pytest.approx(np.mean(list(main.values())))
    for modality in {info["modality"] for info in tasks.values()}:
        members = [main[n] for n, info in tasks.items() if info["modality"] == modality]
        assert s["modality"][modality] == pytest.approx(np.mean(members))
    text = format_summary(s)
    assert f"| **All** | {len(tasks)} |" in text and "## world summary" in text
    for name in tasks:
        assert f"| {name} |" in text


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def test_cli_eval_summarize_json(capsys) -> None:
    assert main(["eval", "summarize", str(SCORES_DIR / FILES["2B"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["overall"] == pytest.approx(66.78, abs=0.01)
    assert out["modality"]["video"] == pytest.approx(52.13, abs=0.01)
    assert out["split_versions"]["ViDoSeek-page"] == "fixed"


def test_cli_eval_summarize_markdown(capsys) -> None:
    assert main(["eval", "summarize", str(SCORES_DIR / FILES["4B"])]) == 0
    assert "| **All** | 78 | **68.08** |" in capsys.readouterr().out


def test_cli_eval_summarize_bad_file(tmp_path: Path, capsys) -> None:
    assert main(["eval", "summarize", str(tmp_path / "absent.json")]) == 2
    assert "no such score file" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Paired bootstrap interval of an overall difference
# ----------------------------------------------------------------------------------------------------------------


def test_scores_doctests() -> None:
    result = doctest.testmod(scores_module)
    assert result.attempted >= 2 and result.failed == 0


def test_difference_interval_of_equal_and_of_shifted_systems_is_a_point() -> None:
    worse = {"a": [0.0, 1.0, 0.5], "b": [1.0, 0.0]}
    assert overall_difference_interval(worse, worse) == (0.0, 0.0)
    shifted = {t: [v + 0.1 for v in values] for t, values in worse.items()}
    low, high = overall_difference_interval(shifted, worse)
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)


def test_difference_interval_weights_tasks_not_queries() -> None:
    """Task a (2 queries) gains 1 on each, task b (1000 queries) gains nothing: the overall (a mean over tasks)
    gains exactly 0.5 on every draw; pooling the queries would give about 0.002."""
    better = {"a": [1.0, 1.0], "b": [0.0] * 1000}
    worse = {"a": [0.0, 0.0], "b": [0.0] * 1000}
    assert overall_difference_interval(better, worse) == (0.5, 0.5)


def test_difference_interval_matches_the_hand_computed_bootstrap() -> None:
    """One task, differences [1, 0]: a draw's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 95 %
    interval is (0, 1) and the 40 % one (0.5, 0.5)."""
    assert overall_difference_interval({"t": [1.0, 0.0]}, {"t": [0.0, 0.0]}) == (0.0, 1.0)
    assert overall_difference_interval({"t": [1.0, 0.0]}, {"t": [0.0, 0.0]}, level=0.4) == (0.5, 0.5)


def test_difference_interval_of_noise_contains_zero_and_of_a_clear_gain_does_not() -> None:
    rng = np.random.default_rng(1)
    worse = {f"t{i}": rng.integers(0, 2, 50).astype(float).tolist() for i in range(4)}
    one_flip = {t: [1.0 - v if j == 0 else v for j, v in enumerate(values)] for t, values in worse.items()}
    low, high = overall_difference_interval(one_flip, worse)
    assert low < 0 < high
    gain = {t: [max(v, float(j % 2)) for j, v in enumerate(values)] for t, values in worse.items()}
    low, high = overall_difference_interval(gain, worse)
    assert 0 < low < high


@pytest.mark.parametrize(
    ("better", "worse", "match"),
    [
        ({"a": [1.0]}, {"b": [1.0]}, "same non-empty tasks"),
        ({"a": [1.0, 0.0]}, {"a": [1.0]}, "task 'a': 2 vs 1"),
        ({"a": []}, {"a": []}, "task 'a': 0 vs 0"),
    ],
)
def test_difference_interval_names_a_bad_input(better, worse, match) -> None:
    with pytest.raises(ValueError, match=match):
        overall_difference_interval(better, worse)
