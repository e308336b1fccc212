"""UVRB: registry vs the published configs, strict config reading, the loader on a tiny extracted layout, the
aggregates against the docs/benchmarks.md §3.5 test vectors, and `embedrl eval uvrb` end to end."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedrl.backbones import PixelBudget
from embedrl.cli import main
from embedrl.data.rows import RowError
from embedrl.data.schema import Item
from embedrl.eval.uvrb import (
    UVRB_BY_NAME,
    UVRB_DATASETS,
    UVRBConfigError,
    UVRBEvaluator,
    dataset_dir,
    format_uvrb_summary,
    load_uvrb_task,
    read_uvrb_config,
    uvrb_aggregates,
)

UVRB_DIR = Path(__file__).resolve().parent / "fixtures" / "uvrb"  # the 16 published UVRB configs, verbatim
SMALL = PixelBudget(32 * 32, 64 * 64, 32 * 32, 64 * 64, num_frames=4)

# docs/benchmarks.md §3.5: per-dataset headline scores (×100) in registry order, then the expected aggregates
# (UVRB-16, UVRB-6, TXT, CMP, VIS, CG, FG, LC, S, T, PR).
PER_DATASET = {
    "Embed-RL-2B": (43.7, 42.2, 91.4, 89.7, 84.6, 49.4, 36.5, 31.8, 56.5, 33.6, 80.0, 93.8, 19.3, 21.0, 89.1, 51.4),
    "Embed-RL-4B": (44.0, 46.1, 92.1, 89.9, 85.9, 53.8, 38.2, 32.0, 57.9, 31.9, 77.0, 95.2, 15.8, 21.0, 87.9, 49.0),
    "GVE-7B": (46.4, 43.3, 86.5, 84.7, 79.4, 53.9, 39.8, 30.2, 54.2, 41.3, 68.0, 94.8, 34.3, 28.0, 89.9, 41.5),
    "GVE-3B": (43.1, 37.6, 85.0, 84.6, 78.6, 49.6, 36.3, 28.0, 52.2, 33.0, 61.0, 91.8, 34.0, 26.8, 89.1, 40.3),
}
AGGREGATES = {
    "Embed-RL-2B": (57.12, 58.68, 61.10, 20.15, 70.25, 59.10, 54.59, 86.90, 87.15, 42.95, 40.63),
    "Embed-RL-4B": (57.36, 58.56, 62.00, 18.40, 68.45, 60.73, 55.66, 86.10, 87.90, 46.00, 40.60),
    "GVE-7B": (57.26, 58.66, 60.21, 31.15, 65.70, 58.73, 54.79, 81.40, 82.05, 46.85, 41.90),
    "GVE-3B": (54.44, 55.87, 56.73, 30.40, 64.70, 55.23, 51.76, 76.40, 81.60, 42.95, 37.73),
}
PRINTED_AVG = {"Embed-RL-2B": 58.7, "Embed-RL-4B": 60.2, "GVE-7B": 57.3, "GVE-3B": 54.4}


# ----------------------------------------------------------------------------------------------------------------
# Registry, configs, aggregates
# ----------------------------------------------------------------------------------------------------------------


def test_registry_partition_and_metrics() -> None:
    assert len(UVRB_DATASETS) == 16
    tasks = [d.task for d in UVRB_DATASETS]
    assert (tasks.count("TXT"), tasks.count("CMP"), tasks.count("VIS")) == (12, 2, 2)
    domains = [d.domain for d in UVRB_DATASETS if d.task == "TXT"]
    assert (domains.count("CG"), domains.count("FG"), domains.count("LC")) == (3, 7, 2)
    assert all(d.domain is None for d in UVRB_DATASETS if d.task != "TXT")
    subs = [d.sub for d in UVRB_DATASETS if d.domain == "FG"]
    assert (subs.count("S"), subs.count("T"), subs.count("PR")) == (2, 2, 3)
    assert {d.name: d.headline for d in UVRB_DATASETS if d.headline != "R@1"} == {
        "CMRB": "R@10",
        "LoVR-TH": "R@10",
        "MS-TI": "P@1",
        "MS-TV": "P@1",
    }
    assert [d.name for d in UVRB_DATASETS if d.reference_instruction] == ["DiDeMo", "CMRB"]
    assert UVRB_BY_NAME["VDC-O"].instruction == "" and all(d.instruction for d in UVRB_DATASETS if d.name != "VDC-O")


def test_registry_matches_the_published_configs_and_ms_ti_is_rejected_with_its_line() -> None:
    files = sorted(p.name for p in UVRB_DIR.glob("*.yaml"))
    assert files == sorted(d.config_file for d in UVRB_DATASETS)
    for d in UVRB_DATASETS:
        path = UVRB_DIR / d.config_file
        if d.name == "MS-TI":
            with pytest.raises(UVRBConfigError, match=rf"{path}:2: 'dataset_root' has no space after its colon"):
                read_uvrb_config(path)
            continue
        cfg = read_uvrb_config(path)  # UTF-8 (two configs carry non-ASCII comments)
        assert cfg["dataset_name"] == d.config_name
        assert cfg["dataset_root"].endswith(f"/{d.name}/UVRB/{d.name}")  # the hyphenated display name
        assert cfg["num_video_frames"] == 8 and cfg["max_text_length"] == 8192
        assert ("images_dir" in cfg) == (d.name == "MSRVTT-I2V")


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "X.yaml"
    path.write_text("dataset_name: CMRB\nbatch_size: [4\n")
    with pytest.raises(UVRBConfigError, match=rf"{path}:\d+: invalid YAML"):
        read_uvrb_config(path)


@pytest.mark.parametrize("model", list(PER_DATASET))
def test_aggregates_reproduce_the_test_vectors(model: str) -> None:
    scores = dict(zip([d.name for d in UVRB_DATASETS], PER_DATASET[model], strict=True))
    agg = uvrb_aggregates(scores)
    cols = agg["columns"]
    got = (agg["UVRB-16"], agg["UVRB-6"], *(cols[c] for c in ("TXT", "CMP", "VIS", "CG", "FG", "LC", "S", "T", "PR")))
    assert got == pytest.approx(AGGREGATES[model], abs=0.01)
    assert agg["counts"]["FG"] == 7 and agg["counts"]["TXT"] == 12
    if model == "Embed-RL-2B":  # the paper printed its UVRB-6 as AVG
        assert agg["UVRB-6"] == pytest.approx(PRINTED_AVG[model], abs=0.05)
        assert agg["UVRB-16"] != pytest.approx(PRINTED_AVG[model], abs=0.05)
    if model.startswith("GVE"):  # baselines: AVG is UVRB-16
        assert agg["UVRB-16"] == pytest.approx(PRINTED_AVG[model], abs=0.05)
    if model == "Embed-RL-4B":  # 60.2 matches neither
        assert PRINTED_AVG[model] not in (round(agg["UVRB-16"], 1), round(agg["UVRB-6"], 1))


def test_aggregates_refuse_missing_datasets_unless_partial() -> None:
    with pytest.raises(ValueError, match="15 UVRB datasets have no score"):
        uvrb_aggregates({"MSRVTT": 1.0})
    agg = uvrb_aggregates({"MSRVTT": 40.0, "MS-TI": 20.0}, partial=True)
    assert agg["UVRB-16"] == 30.0 and agg["UVRB-6"] is None and agg["columns"]["VIS"] is None
    with pytest.raises(ValueError, match="outside UVRB"):
        uvrb_aggregates({"MSR-VTT": 1.0}, partial=True)


# ----------------------------------------------------------------------------------------------------------------
# Loader on the extracted layout
# ----------------------------------------------------------------------------------------------------------------


def _frames(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


def _jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_uvrb(root: Path) -> Path:
    """Three datasets with text, image and video queries; sub-folders in corpus video paths."""
    for name, queries in (
        ("CMRB", [{"id": "q1", "text": "the camera pans left"}, {"id": "q2", "text": "x" * 50}]),
        ("MSRVTT-I2V", [{"id": "q1", "image": "i1.jpg"}]),
        ("LoVR-C2V", [{"id": "q1", "video": "clips/c1.mp4"}]),
    ):
        base = dataset_dir(root, name)
        corpus = [{"id": f"v{i}", "video": f"sub/v{i}.mp4"} for i in range(3)]
        for i in range(3):
            _frames(base / "videos_frames/sub" / f"v{i}", 12, i)
        _frames(base / "videos_frames/clips/c1", 4, 9)
        (base / "images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 12), "red").save(base / "images" / "i1.jpg")
        _jsonl(base / "jsonl/queries.jsonl", queries)
        _jsonl(base / "jsonl/corpus.jsonl", corpus)
        instances = [{"qid": "q1", "pos": ["v1"]}, {"qid": "q1", "pos": ["v2"]}, {"qid": "q2", "pos": ["v0"]}]
        _jsonl(base / "jsonl/instances.jsonl", instances[: len(queries) + 1])
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_uvrb(tmp_path_factory.mktemp("uvrb"))


def test_loader_queries_corpus_qrels_frames_and_instructions(data: Path) -> None:
    cmrb = load_uvrb_task("CMRB", data, max_text_chars=20)
    t = cmrb.eval_task
    assert t.candidates is None and len(t.pool) == 3
    assert t.qrels[0] == {"c:v1": 1, "c:v2": 1}  # lines sharing a qid are merged
    assert t.queries[1].text == "x" * 20  # truncated in characters
    assert t.queries[0].instruction.startswith("Find the video whose camera movement")
    frames = t.pool["c:v0"].frames
    # 8 of 12 frames at floor(linspace(0, 11, 8)), natural order (0.jpg .. 11.jpg)
    assert [Path(f).name for f in frames] == [f"{i}.jpg" for i in (0, 1, 3, 4, 6, 7, 9, 11)]
    i2v = load_uvrb_task("MSRVTT_I2V", data)  # config names map to display names
    q = i2v.eval_task.queries[0]
    assert q.modality == "image" and q.text == "" and q.instruction == "Find the video that matches this image."
    c2v = load_uvrb_task("LoVR-C2V", data)
    assert len(c2v.eval_task.queries[0].frames) == 4  # fewer than 8 frames: all of them
    ref = load_uvrb_task("LoVR-C2V", data, query_instructions="reference")
    assert ref.eval_task.queries[0].instruction == "" and not ref.instruction_applied
    assert load_uvrb_task("CMRB", data, query_instructions="reference").instruction_applied


def test_bad_rows_name_file_and_row(tmp_path: Path) -> None:
    root = write_uvrb(tmp_path / "u")
    base = dataset_dir(root, "CMRB")
    corpus = base / "jsonl/corpus.jsonl"
    corpus.write_text(corpus.read_text() + json.dumps({"id": "v9", "video": "sub/missing.mp4"}) + "\n")
    with pytest.raises(RowError, match=rf"{corpus}:4: frame folder .*sub/missing does not exist"):
        load_uvrb_task("CMRB", root)
    loaded = load_uvrb_task("CMRB", root, on_bad_row="skip")
    assert loaded.bad_rows["skipped"] == 1 and len(loaded.eval_task.pool) == 3
    queries = base / "jsonl/queries.jsonl"
    queries.write_text(queries.read_text() + json.dumps({"id": "q3", "text": "no positives"}) + "\n")
    with pytest.raises(RowError, match=rf"{corpus}:4"):  # the first bad row stops the run
        load_uvrb_task("CMRB", root)
    corpus.write_text("".join(corpus.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(RowError, match=rf"{queries}:3: query 'q3' has no positive"):
        load_uvrb_task("CMRB", root)
    assert len(load_uvrb_task("CMRB", root, on_bad_row="skip").eval_task.queries) == 2


class Oracle:
    def __init__(self, evaluator: UVRBEvaluator) -> None:
        self.vectors: dict[str, np.ndarray] = {}
        for name in evaluator.tasks:
            t = evaluator.task(name)
            basis = {cid: np.eye(8, dtype=np.float32)[j] for j, cid in enumerate(t.pool)}
            self.vectors |= basis
            for q, qrels in zip(t.queries, t.qrels, strict=True):
                self.vectors[q.id] = sum(basis[c] for c in qrels)

    def encode(self, items: Sequence[Item], batch_size: int = 16, show_progress_bar=None, mode=None) -> np.ndarray:
        return np.stack([self.vectors[it.id] for it in items])


def test_oracle_run_writes_scores_at_1_5_10_50_and_both_averages(data: Path, tmp_path: Path) -> None:
    evaluator = UVRBEvaluator(
        data, ["CMRB", "MSRVTT-I2V", "LoVR-C2V"], mode="raw", tcot_source="none", out_dir=tmp_path
    )
    report = evaluator.evaluate(Oracle(evaluator), embedder_id="oracle")
    scores = json.loads((tmp_path / "scores/CMRB_score.json").read_text())
    assert {"hit@50", "recall@50", "precision@50", "hit@10"} <= set(scores)
    assert scores["hit@1"] == 1.0 and scores["recall@1"] == 0.75  # q1 has two positives: 1/2 and 1
    agg = report.summary["aggregates"]
    assert agg["UVRB-16"] == 100.0 and agg["UVRB-6"] is None and report.summary["partial"]
    md = format_uvrb_summary(report.summary)
    assert "UVRB-16" in md and "UVRB-6" in md and "Partial result" in md
    assert report.metadata["uvrb_metric"]["CMRB"] == "hit@10"
    assert report.metadata["query_instruction_applied"] == {"CMRB": True, "MSRVTT-I2V": True, "LoVR-C2V": True}


@pytest.fixture(scope="module")
def embedder_dir(tiny_backbone_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedrl.models import Embedder

    out = tmp_path_factory.mktemp("embedder")
    Embedder.from_backbone(tiny_backbone_dir("qwen3-vl"), budget=SMALL).save(out)
    return out


def test_cli_eval_uvrb_end_to_end(data: Path, embedder_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = [
        "eval",
        "uvrb",
        "--data",
        str(data),
        "--model",
        str(embedder_dir),
        "--out",
        str(out),
        "--tasks",
        "CMRB,MSRVTT_I2V,LoVR-C2V",
        "--num_frames",
        "2",
        "--show_progress_bar",
        "false",
        "--dtype",
        "float32",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "UVRB-16" in printed and "UVRB-6" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"CMRB", "MSRVTT-I2V", "LoVR-C2V"}
    assert summary["metadata"]["cot_mode"] == "none" and summary["metadata"]["frame_order"] == "natural"
    assert (out / "predictions/CMRB.jsonl").is_file()
    assert main([*args[:-2], "--tasks", "MSR-VTT"]) == 2  # not a UVRB name: MSRVTT is


# ----------------------------------------------------------------------------------------------------------------
# The reference layout: the reference loader's prompts, text handling and frame order
# ----------------------------------------------------------------------------------------------------------------


def test_reference_layout_joins_the_reference_prompt_into_the_text_as_run_by_default(data: Path) -> None:
    cmrb = load_uvrb_task("CMRB", data, layout="reference", max_text_chars=80)
    q1, q2 = cmrb.eval_task.queries
    assert q1.text == "Find the video according to the camera motion description. the camera pans left"
    assert q1.instruction == "" and cmrb.instruction_applied  # CMRB is one of the two the reference run prompted
    # cut after the prompt was joined, in characters, as the reference does
    assert q2.text == ("Find the video according to the camera motion description. " + "x" * 50)[:80]
    # plain string order of 0.jpg .. 11.jpg (0, 1, 10, 11, 2, ...), then floor(linspace(0, 11, 8))
    assert [Path(f).name for f in cmrb.eval_task.pool["c:v0"].frames] == [
        f"{i}.jpg" for i in (0, 1, 11, 2, 4, 5, 7, 9)
    ]
    # as run (the default of the reference layout): MSRVTT-I2V's prompt was never applied
    i2v = load_uvrb_task("MSRVTT-I2V", data, layout="reference")
    assert i2v.eval_task.queries[0].text == "" and not i2v.instruction_applied
    # as intended: every dataset's prompt; alone for an image- or video-only query
    i2v = load_uvrb_task("MSRVTT-I2V", data, layout="reference", query_instructions="all")
    assert i2v.eval_task.queries[0].text == "Find the video according to the image." and i2v.instruction_applied
    c2v = load_uvrb_task("LoVR-C2V", data, layout="reference", query_instructions="all")
    assert c2v.eval_task.queries[0].text == "Find the original long video according to the short video clip."
    ours = load_uvrb_task("MSRVTT-I2V", data)  # our layout: our table, all datasets, instruction kept apart
    assert ours.eval_task.queries[0].instruction == "Find the video that matches this image."


def test_reference_layout_keeps_only_the_image_of_an_image_and_video_query(tmp_path: Path) -> None:
    root = write_uvrb(tmp_path / "u")
    base = dataset_dir(root, "LoVR-C2V")
    _jsonl(base / "jsonl/queries.jsonl", [{"id": "q1", "text": "t", "image": "i1.jpg", "video": "clips/c1.mp4"}])
    ref = load_uvrb_task("LoVR-C2V", root, layout="reference").eval_task.queries[0]
    assert len(ref.images) == 1 and ref.frames == () and ref.text == "t"
    ours = load_uvrb_task("LoVR-C2V", root).eval_task.queries[0]
    assert len(ours.images) == 1 and len(ours.frames) == 4


def test_cli_eval_uvrb_reference_layout(data: Path, embedder_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ref"
    args = ["eval", "uvrb", "--data", str(data), "--model", str(embedder_dir), "--out", str(out), "--layout",
            "reference", "--tasks", "CMRB,MSRVTT-I2V", "--num_frames", "2", "--show_progress_bar", "false",
            "--dtype", "float32"]  # fmt: skip
    assert main(args) == 0
    meta = json.loads((out / "summary.json").read_text())["metadata"]
    assert meta["layout"] == "reference" and meta["frame_order"] == "sorted"
    assert meta["query_instructions"] == "reference" and meta["query_instruction_source"] == "reference"
    assert meta["query_instruction_applied"] == {"CMRB": True, "MSRVTT-I2V": False}
    assert meta["pixel_budget"]["frame_max_pixels"] == 768 * 32 * 32  # the reference UVRB run's frames
    assert meta["max_text_chars"] == 8192
    assert main([*args[:-6], "--query_instructions", "all", *args[-6:]]) == 0  # as intended
    meta = json.loads((out / "summary.json").read_text())["metadata"]
    assert meta["query_instructions"] == "all" and meta["query_instruction_applied"]["MSRVTT-I2V"] is True
