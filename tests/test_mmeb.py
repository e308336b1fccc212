"""MMEB-V2 on real data: registry vs the published eval configs, every loader on a tiny copy of the distributed
layout, candidate construction, bad-row policy, summary vs the docs/benchmarks.md §1.6 test vectors, and the CLI."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from embedrl.backbones import PixelBudget
from embedrl.cli import main
from embedrl.data.rows import RowError
from embedrl.data.schema import Item
from embedrl.eval.mmeb import MMEB_BY_KEY, MMEB_TASKS, MMEBEvaluator, load_mmeb_task, mmeb_summary
from embedrl.eval.scores import MMEB_V2_DATASETS, read_leaderboard, read_task_scores, select_mmeb_v2

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # published eval configs and score files (tests/fixtures)
MMEB_DIR = FIXTURES / "mmeb-v2"
SCORES_DIR = FIXTURES / "scores"
SMALL = PixelBudget(32 * 32, 64 * 64, 32 * 32, 64 * 64, num_frames=4)


# ----------------------------------------------------------------------------------------------------------------
# A tiny MMEB-V2 data root in the distributed layout (docs/benchmarks.md §2.1, §2.2)
# ----------------------------------------------------------------------------------------------------------------


def _png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 12, 3), seed * 20 % 255, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _video(folder: Path, n: int = 10, seed: int = 0) -> None:
    for i in range(1, n + 1):  # frame_1 .. frame_10: natural order differs from string order
        _png(folder / f"frame_{i}.jpg", seed * 100 + i)


def _rows(root: Path, key: str, rows: Sequence[dict], stem: str = "test") -> Path:
    path = root / "annotations" / key / f"{stem}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _image_rows(root: Path, key: str, rows: list[tuple[str, str, list[str], list[str]]]) -> None:
    """rows: (query text, query image, target texts, target images); images are created under image-tasks/."""
    out = []
    for i, (text, image, tgt_text, tgt_img) in enumerate(rows):
        for rel in [image, *tgt_img]:
            if rel:
                _png(root / "image-tasks" / rel, hash(rel) % 1000)
        out.append(
            {
                "qry_inst": f"<|image_1|> {key} query:",
                "qry_text": text,
                "qry_img_path": image,
                "tgt_inst": f"{key} target:",
                "tgt_text": tgt_text,
                "tgt_img_path": tgt_img,
                "row": i,
            }
        )
    _rows(root, key, out)


def write_mmeb(root: Path) -> Path:
    # image: one dataset per parser
    _image_rows(
        root,
        "ImageNet-1K",
        [
            ("", "inet/a.jpg", ["cat", "dog", "fox"], ["", "", ""]),
            ("", "inet/b.jpg", ["dog", "cat", "fox"], ["", "", ""]),
        ],
    )
    _image_rows(root, "OK-VQA", [("What is it?", "okvqa/a.jpg", ["a kite", "a car"], [])])
    _image_rows(root, "MSCOCO_i2t", [("", "coco/a.jpg", ["a red kite", "a blue car"], ["", ""])])
    _image_rows(
        root,
        "MSCOCO_t2i",
        [
            ("a red kite", "", ["", ""], ["coco/k.jpg", "coco/c.jpg"]),
            ("a blue car", "", ["", ""], ["coco/c.jpg", "coco/k.jpg"]),
        ],
    )
    _image_rows(root, "RefCOCO-Matching", [("left cat", "ref/q.jpg", ["left cat", "right cat"], ["ref/t.jpg"] * 2)])
    _image_rows(
        root,
        "CIRR",
        [
            ("make it red", "cirr/q.jpg", ["", ""], ["cirr/t1.jpg", "cirr/t2.jpg"]),
            ("make it blue", "cirr/q2.jpg", ["", ""], ["cirr/t2.jpg", "cirr/t1.jpg"]),
        ],
    )

    frames = root / "video-tasks" / "frames"
    # V-CLS
    for vid in ("k1", "k2"):
        _video(frames / "video_cls/K700" / vid, seed=1)
    _rows(root, "K700", [{"video_id": "k1", "pos_text": "juggling"}, {"video_id": "k2", "pos_text": "surfing"}])
    (root / "annotations/K700/labels.txt").write_text("juggling\nsurfing\nknitting\n")
    _video(frames / "video_cls/SSv2/s1", seed=2)
    _rows(
        root,
        "SmthSmthV2",
        [{"video_id": "s1", "pos_text": "pushing a cup", "neg_text": ["lifting a cup", "pushing a cup"]}],
    )
    # V-RET
    for key, folder, rows in (
        (
            "MSR-VTT",
            "MSR-VTT",
            [
                {"video_id": "v1", "video": "v1.mp4", "caption": "a man sings"},
                {"video_id": "v2", "video": "v2.mp4", "caption": "a dog runs"},
            ],
        ),
        ("MSVD", "MSVD", [{"video_id": "m1", "video": "m1.avi", "caption": ["a cat jumps", "cat"]}]),
        ("DiDeMo", "DiDeMo", [{"video": "d1.mp4", "caption": "the ball rolls"}]),
        ("VATEX", "VATEX", [{"videoID": "x1", "enCap": ["people dance"]}]),
        ("YouCook2", "YouCook2", [{"id": "y1", "video_path": "y1.mp4", "sentence": "add salt"}]),
    ):
        for r in rows:
            vid = str(r.get("video_id") or r.get("videoID") or r.get("id") or Path(r["video"]).stem)
            _video(frames / "video_ret" / folder / vid, seed=3)
        _rows(root, key, rows)
    # V-QA
    _video(frames / "video_qa/MVBench/action/mv1", seed=4)
    _rows(
        root,
        "MVBench",
        [
            {
                "question": "What happens?",
                "candidates": ["runs", "sits"],
                "answer": "sits",
                "subset": "action",
                "video": "mv1.mp4",
            }
        ],
    )
    _video(frames / "video_qa/Video-MME/vm1", seed=4)
    _rows(
        root, "Video-MME", [{"videoID": "vm1", "question": "Color?", "options": ["A. red", "B. blue"], "answer": "B"}]
    )
    _video(frames / "video_qa/NExTQA/123", seed=4)
    _rows(
        root,
        "NExTQA",
        [
            {
                "video": 123,
                "question": "Why?",
                "a0": "rain",
                "a1": "sun",
                "a2": "wind",
                "a3": "snow",
                "a4": "fog",
                "answer": 2,
            }
        ],
    )
    _video(frames / "video_qa/EgoSchema/e1", seed=4)
    _rows(root, "EgoSchema", [{"video_idx": "e1", "question": "Goal?", "option": ["cook", "clean"], "answer": "1"}])
    _video(frames / "video_qa/ActivityNetQA/a1", seed=4)
    _rows(root, "ActivityNetQA", [{"video_name": "a1", "question": "Is it day?", "answer": "Yes"}])
    # V-MRET
    qv = frames / "video_mret/QVHighlight/qv1"
    for clip in ("query", "positive_0", "negative_0", "negative_1"):
        _video(qv / clip, n=8, seed=5)
    _rows(root, "QVHighlight", [{"query": "a goal is scored", "video_path": "videos/qv1.mp4"}])
    ms = frames / "video_mret/MomentSeeker"
    for clip in ("c1", "c2", "c3", "src"):
        _video(ms / "video_frames" / clip, n=8, seed=6)
    _png(ms / "query_img1.jpg", 7)
    clip = lambda name: {"output_path": f"clips/{name}.mp4"}  # noqa: E731
    _rows(
        root,
        "MomentSeeker",
        [
            {
                "query": "find the jump",
                "input_frames": "",
                "positive_frames": [clip("c1")],
                "negative_frames": [clip("c2")],
            },
            {
                "query": "like this",
                "input_frames": "imgs/img1.jpg",
                "positive_frames": [clip("c2")],
                "negative_frames": [clip("c3"), clip("c1")],
            },
            {
                "query": "after this",
                "input_frames": "vids/src.mp4",
                "positive_frames": [clip("c3")],
                "negative_frames": [],
            },
        ],
    )
    # VisDoc: ViDoRe with pages only in the corpus bytes (Parquet), graded and duplicated qrels
    _visdoc(root, "ViDoRe_arxivqa", parquet=True)
    _visdoc(root, "VisRAG_ChartQA", parquet=False)
    _visdoc(root, "ViDoSeek-page-fixed", parquet=False)
    return root


def _visdoc(root: Path, folder: str, parquet: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ann = root / "annotations" / folder
    ann.mkdir(parents=True, exist_ok=True)
    corpus = [{"corpus-id": f"p{i}", "image": {"bytes": _png_bytes(i), "path": f"p{i}.png"}} for i in range(4)]
    if parquet:
        pq.write_table(pa.Table.from_pylist(corpus), ann / "corpus.parquet")
    else:  # pages already on disk; the JSONL corpus lists ids only
        key = folder.removesuffix("-fixed")
        from embedrl.eval.mmeb import _page_file

        for i, row in enumerate(corpus):
            _png(_page_file(MMEB_BY_KEY[key], root, row["corpus-id"]), i)
        _rows(root, folder, [{"corpus-id": r["corpus-id"]} for r in corpus], "corpus")
    _rows(
        root, folder, [{"query-id": "q1", "query": "revenue 2020?"}, {"query-id": "q2", "query": "a chart"}], "queries"
    )
    _rows(
        root,
        folder,
        [
            {"query-id": "q1", "corpus-id": "p2", "score": 1},
            {"query-id": "q1", "corpus-id": "p2", "score": 2},
            {"query-id": "q1", "corpus-id": "p1", "score": 1},
            {"query-id": "q1", "corpus-id": "p0", "score": 0},
            {"query-id": "q2", "corpus-id": "p3", "score": 1},
        ],
        "qrels",
    )
    (ann / "REVISION").write_text("abc123\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mmeb(tmp_path_factory.mktemp("mmeb"))


def names(loaded, ids: Sequence[str]) -> list[str]:
    return [loaded.names[i] for i in ids]


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------


def test_registry_covers_the_78_scored_and_3_unscored() -> None:
    scored = [t.key for t in MMEB_TASKS if t.scored]
    assert scored == [d.key for d in MMEB_V2_DATASETS]
    assert [t.key for t in MMEB_TASKS if not t.scored] == [
        "ViDoRe_biomedical_lectures_v2",
        "ViDoRe_economics_reports_v2",
        "ViDoRe_esg_reports_v2",
    ]
    for t in MMEB_TASKS:
        assert t.metric == {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg_linear@5"}[t.modality]
        if t.modality == "image":
            assert t.instructions is None  # rows carry qry_inst / tgt_inst
        else:
            query, target = t.instructions
            assert query and target


def test_registry_agrees_with_the_published_eval_configs() -> None:
    seen = set()
    for modality in ("image", "video", "visdoc"):
        config = yaml.safe_load((MMEB_DIR / f"{modality}.yaml").read_text(encoding="utf-8"))
        for key, entry in config.items():
            task = MMEB_BY_KEY[key]
            seen.add(key)
            assert task.modality == modality, key
            assert task.parser == entry["dataset_parser"], key
            assert task.eval_type == entry["eval_type"], key
            assert task.dataset_name == entry["dataset_name"], key
            root = entry.get("frame_root") or entry["image_root"]
            assert task.media_root == root.rstrip("/"), key
            subsample = entry.get("num_sample_per_subset")
            assert task.subsample == (None if subsample in (None, "None") else subsample), key
            assert entry.get("num_frames", entry.get("num_video_frames", 8)) == 8
    assert seen == {t.key for t in MMEB_TASKS}


# ----------------------------------------------------------------------------------------------------------------
# Loaders and candidate construction
# ----------------------------------------------------------------------------------------------------------------


def test_image_loaders_build_local_lists_with_the_gold_first(data: Path) -> None:
    inet = load_mmeb_task("ImageNet-1K", data)
    t = inet.eval_task
    assert t.info["eval_type"] == "local" and len(t.queries) == 2
    assert [names(inet, c) for c in t.candidates] == [["cat", "dog", "fox"], ["dog", "cat", "fox"]]
    assert [names(inet, q) for q in t.qrels] == [["cat"], ["dog"]]
    assert len(t.pool) == 3  # de-duplicated by name across rows
    q = t.queries[0]
    assert q.instruction == "<|image_1|> ImageNet-1K query:" and q.images[0] == data / "image-tasks/inet/a.jpg"
    assert t.pool[t.candidates[0][0]].instruction == "ImageNet-1K target:"

    qa = load_mmeb_task("OK-VQA", data)  # an empty tgt_img_path list means text-only targets
    assert names(qa, qa.eval_task.candidates[0]) == ["a kite", "a car"]
    i2t = load_mmeb_task("MSCOCO_i2t", data)
    assert names(i2t, i2t.eval_task.qrels[0]) == ["a red kite"]
    t2i = load_mmeb_task("MSCOCO_t2i", data)
    assert names(t2i, t2i.eval_task.candidates[1]) == ["coco/c.jpg", "coco/k.jpg"] and len(t2i.eval_task.pool) == 2
    assert t2i.eval_task.queries[0].images == ()
    ref = load_mmeb_task("RefCOCO-Matching", data)  # two targets share an image: names are <path>:<caption>
    assert names(ref, ref.eval_task.candidates[0]) == ["ref/t.jpg:left cat", "ref/t.jpg:right cat"]
    cirr = load_mmeb_task("CIRR", data)
    assert len(cirr.eval_task.pool) == 2 and cirr.collisions == 0


def test_video_classification_global_pool_is_row_union_then_label_vocabulary(data: Path) -> None:
    k700 = load_mmeb_task("K700", data)
    t = k700.eval_task
    assert t.candidates is None and t.info["eval_type"] == "global"
    assert [k700.names[i] for i in t.pool] == ["juggling", "surfing", "knitting"]
    q = t.queries[0]
    assert q.text == "" and q.instruction.startswith("Which human action")
    # 8 of the 10 frames, natural order (frame_10 last), at floor(linspace(0, 9, 8))
    assert [p.name for p in q.frames] == [f"frame_{i + 1}.jpg" for i in (0, 1, 2, 3, 5, 6, 7, 9)]
    ssv2 = load_mmeb_task("SmthSmthV2", data)
    assert names(ssv2, ssv2.eval_task.candidates[0]) == ["pushing a cup", "lifting a cup"]
    assert names(ssv2, ssv2.eval_task.qrels[0]) == ["pushing a cup"]


@pytest.mark.parametrize(
    ("key", "video"), [("MSR-VTT", "v1"), ("MSVD", "m1"), ("DiDeMo", "d1"), ("VATEX", "x1"), ("YouCook2", "y1")]
)
def test_video_retrieval_loaders(data: Path, key: str, video: str) -> None:
    loaded = load_mmeb_task(key, data)
    t = loaded.eval_task
    assert t.candidates is None and names(loaded, t.qrels[0]) == [video]
    assert t.queries[0].text and not t.queries[0].frames
    assert all(len(item.frames) == 8 for item in t.pool.values())


@pytest.mark.parametrize(
    ("key", "options", "gold"),
    [
        ("MVBench", ["runs", "sits"], "sits"),
        ("Video-MME", ["A. red", "B. blue"], "B. blue"),
        ("NExTQA", ["rain", "sun", "wind", "snow", "fog"], "wind"),
        ("EgoSchema", ["cook", "clean"], "clean"),
        ("ActivityNetQA", ["yes", "no"], "yes"),
    ],
)
def test_video_qa_loaders(data: Path, key: str, options: list[str], gold: str) -> None:
    loaded = load_mmeb_task(key, data)
    t = loaded.eval_task
    assert names(loaded, t.candidates[0]) == options and names(loaded, t.qrels[0]) == [gold]
    assert len(t.queries[0].frames) == 8 and t.queries[0].text


def test_moment_retrieval_loaders(data: Path) -> None:
    qv = load_mmeb_task("QVHighlight", data)
    t = qv.eval_task
    assert names(qv, t.candidates[0]) == ["qv1/negative_0", "qv1/negative_1", "qv1/positive_0"]
    assert names(qv, t.qrels[0]) == ["qv1/positive_0"] and len(t.queries[0].frames) == 8
    ms = load_mmeb_task("MomentSeeker", data)
    t = ms.eval_task
    assert [q.modality for q in t.queries] == ["text", "image", "video"]
    assert names(ms, t.candidates[1]) == ["c2", "c3", "c1"] and names(ms, t.qrels[2]) == ["c3"]
    assert len(t.pool) == 3  # clips shared between queries are embedded once


def test_visdoc_loader_writes_pages_pairs_grades_and_orders_the_global_pool(data: Path) -> None:
    loaded = load_mmeb_task("ViDoRe_arxivqa", data)
    t = loaded.eval_task
    pages = sorted((data / "visdoc-tasks/ViDoRe_arxivqa").glob("*.png"))
    assert [p.name for p in pages] == ["p0.png", "p1.png", "p2.png", "p3.png"]  # written from the Parquet bytes
    # the duplicated pair keeps its larger score; score 0 is not relevant
    assert {loaded.names[c]: g for c, g in t.qrels[0].items()} == {"p2": 2.0, "p1": 1.0}
    # union of the rows' relevant pages in first-seen order, then the rest of the corpus
    assert [loaded.names[c] for c in t.pool] == ["p2", "p1", "p3", "p0"]
    assert loaded.revision == "abc123" and t.queries[0].instruction.startswith("Find the document page")
    visrag = load_mmeb_task("VisRAG_ChartQA", data)
    assert len(visrag.eval_task.pool) == 4  # hashed page file names
    assert all(len(p.stem) == 16 for p in (data / "visdoc-tasks/VisRAG_ChartQA").glob("*.png"))


def test_page_set_version_is_explicit(data: Path) -> None:
    assert len(load_mmeb_task("ViDoSeek-page", data, page_labels="fixed").eval_task.queries) == 2
    with pytest.raises(FileNotFoundError, match=r"ViDoSeek-page-fixed exists: set page_labels to fixed"):
        load_mmeb_task("ViDoSeek-page", data, page_labels="old")


def test_malformed_row_and_missing_media_name_file_and_row(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _image_rows(root, "ImageNet-1K", [("", "inet/a.jpg", ["cat", "dog"], ["", ""])])
    rows_file = root / "annotations/ImageNet-1K/test.jsonl"
    good = rows_file.read_text()
    bad_media = json.loads(good) | {"qry_img_path": "inet/missing.jpg"}
    rows_file.write_text(good + "{not json\n" + json.dumps(bad_media) + "\n" + good)
    with pytest.raises(RowError, match=rf"{rows_file}:2: not valid JSON"):
        load_mmeb_task("ImageNet-1K", root)
    rows_file.write_text(good + json.dumps(bad_media) + "\n" + good)
    with pytest.raises(RowError, match=rf"{rows_file}:2: query image .*missing.jpg does not exist"):
        load_mmeb_task("ImageNet-1K", root)
    skipped = load_mmeb_task("ImageNet-1K", root, on_bad_row="skip")
    assert len(skipped.eval_task.queries) == 2 and skipped.bad_rows["skipped"] == 1
    assert "missing.jpg" in skipped.bad_rows["examples"][0]
    _rows(root, "K700", [{"video_id": "nope", "pos_text": "x"}])
    with pytest.raises(RowError, match=r"K700/test.jsonl:1: frame folder .*K700/nope does not exist"):
        load_mmeb_task("K700", root)
    _rows(root, "NExTQA", [{"video": 1, "question": "q", "a0": "a"}])
    with pytest.raises(RowError, match=r"NExTQA/test.jsonl:1: missing field\(s\) \['answer', 'a1'"):
        load_mmeb_task("NExTQA", root)


# ----------------------------------------------------------------------------------------------------------------
# Ranking, counts, aggregates
# ----------------------------------------------------------------------------------------------------------------


class Oracle:
    """Vectors from the labels: a query points at its gold candidates (grade-weighted), so every task scores 1."""

    def __init__(self, evaluator: MMEBEvaluator) -> None:
        self.vectors: dict[str, np.ndarray] = {}
        dim = 64
        for key in evaluator.tasks:
            t = evaluator.task(key)
            basis = {cid: np.eye(dim, dtype=np.float32)[j] for j, cid in enumerate(t.pool)}
            self.vectors |= basis
            for q, qrels in zip(t.queries, t.qrels, strict=True):
                self.vectors[q.id] = sum(g * basis[c] for c, g in qrels.items())

    def encode(self, items: Sequence[Item], batch_size: int = 16, show_progress_bar=None, mode=None) -> np.ndarray:
        return np.stack([self.vectors[it.id] for it in items])


def test_oracle_scores_one_and_summary_records_split_versions(data: Path, tmp_path: Path) -> None:
    tasks = ["ImageNet-1K", "K700", "QVHighlight", "MomentSeeker", "ViDoRe_arxivqa", "ViDoSeek-page"]
    evaluator = MMEBEvaluator(data, tasks, mode="raw", tcot_source="none", check_counts=False, out_dir=tmp_path)
    report = evaluator.evaluate(Oracle(evaluator), embedder_id="oracle")
    assert all(report.results[k]["hit@1"] == 1.0 for k in tasks)
    assert report.results["ViDoRe_arxivqa"]["ndcg_linear@5"] == pytest.approx(1.0)
    assert report.summary["overall"] == pytest.approx(100.0) and report.summary["partial"]
    board = read_leaderboard(tmp_path / "leaderboard.json")
    assert "ViDoSeek-page-fixed" in board.metrics["visdoc"]  # named after the labels actually evaluated
    assert board.metadata["split_versions"]["ViDoSeek-page"] == "fixed"
    assert board.metadata["dataset_revisions"]["ViDoRe_arxivqa"]["revision"] == "abc123"
    pred = [json.loads(x) for x in (tmp_path / "predictions/ViDoRe_arxivqa.jsonl").read_text().splitlines()]
    assert pred[0]["top"][:2] == ["p2", "p1"] and pred[0]["labels"] == ["p2", "p1"] and pred[0]["grades"] == [2, 1]
    with pytest.raises(ValueError, match=r"ImageNet-1K: read 2 queries, but MMEB-V2 has 1000"):
        MMEBEvaluator(data, ["ImageNet-1K"], mode="raw", tcot_source="none").task("ImageNet-1K")


FILES = {
    "2B": "embed-rl-2b.json",
    "4B": "embed-rl-4b.json",
    "VLM2Vec-V2": "VLM2Vec-V2.0-Qwen2VL-2B.v2.0.1.json",
    "GME-7B": "gme-Qwen2-VL-7B-Instruct.v2.0.1.json",
}
# docs/benchmarks.md §1.6 (×100, ±0.01): All, Image, Video, VisDoc, then the 13 sub-groups.
EXPECTED = {
    "2B": (
        66.78,
        69.24,
        52.13,
        74.06,
        62.84,
        67.91,
        68.64,
        90.40,
        57.04,
        55.93,
        45.06,
        49.36,
        79.95,
        51.96,
        84.61,
        65.66,
    ),
    "4B": (
        68.08,
        71.19,
        52.99,
        74.74,
        63.69,
        70.52,
        71.28,
        91.35,
        57.59,
        58.37,
        45.11,
        49.52,
        80.24,
        53.36,
        84.88,
        67.13,
    ),
    "VLM2Vec-V2": (
        57.89,
        64.92,
        34.67,
        64.76,
        62.93,
        56.42,
        69.60,
        77.13,
        39.24,
        34.66,
        28.38,
        37.55,
        74.39,
        44.61,
        79.33,
        38.99,
    ),
    "GME-7B": (
        57.79,
        55.93,
        38.43,
        75.11,
        57.56,
        34.57,
        71.20,
        59.45,
        37.27,
        50.28,
        28.26,
        37.53,
        89.55,
        55.47,
        84.95,
        43.86,
    ),
}
SUBGROUPS = ("I-CLS", "I-QA", "I-RET", "I-VG", "V-CLS", "V-QA", "V-RET", "V-MRET", "VDRv1", "VDRv2", "VisRAG", "OOD")


@pytest.mark.parametrize("column", list(FILES))
def test_harness_summary_reproduces_the_published_aggregates(column: str) -> None:
    results = select_mmeb_v2(read_leaderboard(SCORES_DIR / FILES[column])).results
    summary = mmeb_summary(results, "fixed" if column in ("2B", "4B") else "old")
    got = (
        summary["overall"],
        summary["modality"]["image"],
        summary["modality"]["video"],
        summary["modality"]["visdoc"],
        *(summary["meta_task"].get(g) or summary["group"][g] for g in SUBGROUPS),
    )
    expected = EXPECTED[column]
    assert got[:4] == pytest.approx(expected[:4], abs=0.01)
    assert got[4:] == pytest.approx(expected[4:], abs=0.01)
    assert summary["meta_task"]["VisDoc"] == pytest.approx(expected[3], abs=0.01)  # VisDoc is also a meta-task


# ----------------------------------------------------------------------------------------------------------------
# End to end on tiny models
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder_dir(tiny_backbone_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedrl.models import Embedder

    out = tmp_path_factory.mktemp("embedder")
    Embedder.from_backbone(tiny_backbone_dir("qwen3-vl"), budget=SMALL).save(out)
    return out


def test_cli_eval_mmeb_end_to_end(data: Path, embedder_dir: Path, tiny_backbone_dir, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    base = [
        "eval",
        "mmeb",
        "--data",
        str(data),
        "--model",
        str(embedder_dir),
        "--check_counts",
        "false",
        "--show_progress_bar",
        "false",
        "--num_frames",
        "2",
        "--dtype",
        "float32",
    ]
    tasks = "ImageNet-1K,CIRR,K700,MSR-VTT,NExTQA,MomentSeeker,ViDoRe_arxivqa,ViDoSeek-page-fixed"
    assert main([*base, "--out", str(out), "--tasks", tasks]) == 0
    printed = capsys.readouterr().out
    assert "MMEB-V2 summary" in printed and "Partial result" in printed
    for key in ("ImageNet-1K", "K700", "ViDoSeek-page"):
        scores = read_task_scores(out / "scores" / f"{key}_score.json")
        assert scores["num_pred"] == scores["num_data"] > 0
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["metadata"]["split_versions"]["ViDoSeek-page"] == "fixed"
    assert board["metadata"]["cot_mode"] == "none" and len(board["metadata"]["eval_config_sha256"]) == 64
    assert set(board["metrics"]) == {"image", "video", "visdoc"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summary"]["counts"]["overall"] == 8

    # with a Reasoner: T-CoTs on both sides (compact prompts, a few tokens), cached for the rerun
    reasoner = tiny_backbone_dir("qwen3-vl")
    args = [
        *base,
        "--out",
        str(tmp_path / "r"),
        "--tasks",
        "OK-VQA",
        "--reasoner",
        str(reasoner),
        "--compact_prompts",
        "true",
        "--max_new_tokens",
        "4",
    ]
    assert main(args) == 0
    meta = json.loads((tmp_path / "r" / "leaderboard.json").read_text())["metadata"]
    assert meta["cot_mode"] == "query+candidate" and meta["query_mode"] == "full"
    assert main(args) == 0  # rerun: everything comes from the caches
    assert main([*base, "--out", str(tmp_path / "x"), "--tasks", "NoSuchSet"]) == 2


# ----------------------------------------------------------------------------------------------------------------
# The reference layout: VLM2Vec's wording and formatting, its frame order, MomentSeeker unsampled
# ----------------------------------------------------------------------------------------------------------------

QA = (
    "Given a video and a question, select the most accurate answer from the provided candidates. Return only the "
    "exact text of your chosen answer. Question:  "  # VLM2Vec's prompt ends with a space, then one more is joined
)


def texts(loaded, ids: Sequence[str]) -> dict[str, str]:
    return {loaded.names[i]: loaded.eval_task.pool[i].text for i in ids}


def test_reference_layout_builds_the_texts_vlm2vec_builds(data: Path) -> None:
    def ref(key: str, **kw):
        loaded = load_mmeb_task(key, data, layout="reference", **kw)
        items = [*loaded.eval_task.queries, *loaded.eval_task.pool.values()]
        assert all(item.instruction == "" for item in items), key  # the whole VLM2Vec text is in Item.text
        return loaded, loaded.eval_task.queries[0]

    inet, q = ref("ImageNet-1K")  # image_cls: instruction (<|image_1|> removed) then text, stripped
    assert q.text == "ImageNet-1K query:" and q.images == (data / "image-tasks/inet/a.jpg",)
    assert texts(inet, inet.eval_task.candidates[0]) == {"cat": "cat", "dog": "dog", "fox": "fox"}  # bare labels
    _, q = ref("OK-VQA")
    assert q.text == "OK-VQA query: What is it?"
    t2i, q = ref("MSCOCO_t2i")
    assert q.text == "MSCOCO_t2i query: a red kite" and q.images == ()
    assert set(texts(t2i, t2i.eval_task.candidates[0]).values()) == {"MSCOCO_t2i target:"}
    refcoco, q = ref("RefCOCO-Matching")
    assert q.text == "RefCOCO-Matching query: left cat"
    assert texts(refcoco, refcoco.eval_task.candidates[0]) == {
        "ref/t.jpg:left cat": "RefCOCO-Matching target: left cat",
        "ref/t.jpg:right cat": "RefCOCO-Matching target: right cat",
    }

    k700, q = ref("K700")
    assert q.text == "Recognize the category of the video content." and len(q.frames) == 8
    assert texts(k700, list(k700.eval_task.pool)) == {n: n for n in ("juggling", "surfing", "knitting")}
    _, q = ref("SmthSmthV2")
    assert q.text == "What actions or object interactions are being performed by the person in the video?"
    msrvtt, q = ref("MSR-VTT")
    assert q.text == "Find a video that contains the following visual content: a man sings" and not q.frames
    target = "Understand the content of the provided video."
    assert set(texts(msrvtt, list(msrvtt.eval_task.pool)).values()) == {target}
    assert ref("DiDeMo")[1].text == "Find a video that includes the following described scenes: the ball rolls"
    assert ref("MSVD")[1].text == "Find the video snippet that corresponds to the given summary: a cat jumps"
    assert ref("VATEX")[1].text == "Select a video that fits the description provided: people dance"
    assert ref("YouCook2")[1].text == (
        "Find a video that demonstrates the following action while making a recipe: add salt"
    )

    mvbench, q = ref("MVBench")  # lettered options are the candidates (names and texts)
    assert q.text == QA + "What happens?\nOptions:\n(A) runs\n(B) sits"
    assert texts(mvbench, mvbench.eval_task.candidates[0]) == {"(A) runs": "(A) runs", "(B) sits": "(B) sits"}
    assert names(mvbench, mvbench.eval_task.qrels[0]) == ["(B) sits"]
    videomme, q = ref("Video-MME")
    assert q.text == QA + "Color?\nA. red\nB. blue"
    assert texts(videomme, videomme.eval_task.candidates[0]) == {"A. red": "red", "B. blue": "blue"}
    assert ref("NExTQA")[1].text == QA + "Why?\nOptions:\n(A) rain\n(B) sun\n(C) wind\n(D) snow\n(E) fog"
    ego, q = ref("EgoSchema")  # VLM2Vec's quirks kept: no space before the options, "k"/"n" for unlabelled ones
    assert q.text == QA + "Goal?cook clean"
    assert texts(ego, ego.eval_task.candidates[0]) == {"cook": "k", "clean": "n"}
    assert ref("ActivityNetQA")[1].text == QA + "Is it day?? (A) yes; (B) no."

    qv, q = ref("QVHighlight", num_frames=2)  # moment retrieval samples its frames ...
    assert q.text == "Find the clip that corresponds to the described scene in the given video: a goal is scored"
    assert len(q.frames) == 2 and all(len(c.frames) == 2 for c in qv.eval_task.pool.values())
    ms = load_mmeb_task("MomentSeeker", data, layout="reference", num_frames=2)  # ... MomentSeeker does not
    assert [q.text for q in ms.eval_task.queries] == [
        "Find the clip that corresponds to the given text: find the jump",
        "Select the video clip that aligns with the given text and image: like this",
        "Find the clip that corresponds to the given sentence and video segment: after this",
    ]
    assert len(ms.eval_task.queries[2].frames) == 8 and all(len(c.frames) == 8 for c in ms.eval_task.pool.values())
    assert {c.text for c in ms.eval_task.pool.values()} == {"Understand the content of the provided video clip."}
    ours = load_mmeb_task("MomentSeeker", data, num_frames=2)
    assert all(len(c.frames) == 2 for c in ours.eval_task.pool.values())

    vidore, q = ref("ViDoRe_arxivqa")
    assert q.text == "Find a document image that matches the given query: revenue 2020?"
    assert {c.text for c in vidore.eval_task.pool.values()} == {
        "Understand the content of the provided document image."
    }
    # the two layouts never share item ids (they embed different texts)
    assert not set(vidore.eval_task.pool) & set(load_mmeb_task("ViDoRe_arxivqa", data).eval_task.pool)


def test_frame_orders_of_the_harnesses(tmp_path: Path) -> None:
    from embedrl.eval.benchmark import pick_frames

    for name in ("Frame_2.jpg", "frame_10.jpg", "frame_1.jpg"):
        _png(tmp_path / name, 0)
    (tmp_path / "notes.txt").write_text("not a frame")
    got = {order: [p.name for p in pick_frames(tmp_path, 0, order)] for order in ("natural", "vlm2vec", "sorted")}
    assert got == {
        "natural": ["Frame_2.jpg", "frame_1.jpg", "frame_10.jpg"],  # ours: case-sensitive text parts
        "vlm2vec": ["frame_1.jpg", "Frame_2.jpg", "frame_10.jpg"],  # VLM2Vec lower-cases them
        "sorted": ["Frame_2.jpg", "frame_1.jpg", "frame_10.jpg"],  # plain string order (UVRB)
    }
    assert [p.name for p in pick_frames(tmp_path, 2, "vlm2vec")] == ["frame_1.jpg", "frame_10.jpg"]


def test_reference_layout_follows_the_embedder_and_refuses_a_mismatch(data: Path, tmp_path: Path) -> None:
    class ReferenceOracle(Oracle):
        layout = "reference"

    evaluator = MMEBEvaluator(data, ["MVBench"], mode="raw", tcot_source="none", check_counts=False, out_dir=tmp_path)
    assert names(evaluator.load("MVBench"), evaluator.task("MVBench").qrels[0]) == ["sits"]  # embedrl until told
    evaluator.layout = "reference"
    report = evaluator.evaluate(ReferenceOracle(evaluator), embedder_id="oracle")
    assert report.metadata["layout"] == "reference" and report.metadata["frame_order"] == "vlm2vec"
    assert names(evaluator.loaded["MVBench"], evaluator.task("MVBench").qrels[0]) == ["(B) sits"]
    assert report.results["MVBench"]["hit@1"] == 1.0
    # the leaderboard file has the shape of the published ones (VLM2Vec's format)
    ours, published = (json.loads(p.read_text()) for p in (tmp_path / "leaderboard.json", SCORES_DIR / FILES["2B"]))
    assert list(ours) == list(published) == ["metadata", "metrics"]
    assert list(ours["metrics"]["video"]["MVBench"]) == list(published["metrics"]["video"]["MVBench"])
    ours = MMEBEvaluator(data, ["MVBench"], mode="raw", tcot_source="none", check_counts=False, layout="embedrl")
    with pytest.raises(ValueError, match="the Embedder's layout is 'reference' but the evaluation's is 'embedrl'"):
        ours.evaluate(ReferenceOracle(evaluator), embedder_id="oracle")
