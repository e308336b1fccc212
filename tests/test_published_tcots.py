"""The paper's published T-CoT files: import into a T-CoT file (joins on stable keys, unmatched items counted), then
`eval mmeb --layout reference --tcot_cache FILE` with no Reasoner: each item carries exactly the file's T-CoT."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedrl.backbones import PixelBudget
from embedrl.cli import main
from embedrl.data.schema import Item
from embedrl.eval.benchmark import PUBLISHED_REASONER, published_key, tcot_file_id
from embedrl.eval.cache import TCoTCache
from embedrl.eval.mmeb import MMEBEvaluator, load_mmeb_task
from embedrl.eval.published import PublishedTCoTError, import_published_tcots
from embedrl.eval.task import EvalError

TASKS = ["ImageNet-1K", "MSCOCO_t2i", "K700", "MSR-VTT", "ViDoRe_arxivqa"]


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)


def _rows(root: Path, key: str, rows: Sequence[dict], stem: str = "test") -> None:
    path = root / "annotations" / key / f"{stem}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def write_data(root: Path) -> Path:
    """A tiny MMEB-V2 root: two image sets, two video sets, one VisDoc set."""
    inet = [
        ("inet/a.jpg", ["cat", "dog", "fox"]),
        ("inet/b.jpg", ["dog", "cat", "fox"]),
    ]
    for i, (img, _) in enumerate(inet):
        _png(root / "image-tasks" / img, i)
    _rows(root, "ImageNet-1K", [
        {"qry_inst": "<|image_1|> Represent the given image for classification", "qry_text": "", "qry_img_path": img,
         "tgt_inst": "", "tgt_text": labels, "tgt_img_path": ["", "", ""]}
        for img, labels in inet
    ])  # fmt: skip
    for i, img in enumerate(("coco/k.jpg", "coco/c.jpg")):
        _png(root / "image-tasks" / img, 10 + i)
    _rows(root, "MSCOCO_t2i", [
        {"qry_inst": "Find me an everyday image that matches the given caption:", "qry_text": text, "qry_img_path": "",
         "tgt_inst": "<|image_1|> Represent the given image.", "tgt_text": ["", ""], "tgt_img_path": imgs}
        for text, imgs in (("a red kite", ["coco/k.jpg", "coco/c.jpg"]), ("a blue car", ["coco/c.jpg", "coco/k.jpg"]))
    ])  # fmt: skip
    frames = root / "video-tasks" / "frames"
    for vid, folder in (("k1", "video_cls/K700"), ("k2", "video_cls/K700"), ("v1", "video_ret/MSR-VTT"),
                        ("v2", "video_ret/MSR-VTT")):  # fmt: skip
        for j in range(1, 4):
            _png(frames / folder / vid / f"frame_{j}.jpg", j)
    _rows(root, "K700", [{"video_id": "k1", "pos_text": "juggling"}, {"video_id": "k2", "pos_text": "surfing"}])
    _rows(root, "MSR-VTT", [
        {"video_id": "v1", "video": "v1.mp4", "caption": "a man sings"},
        {"video_id": "v2", "video": "v2.mp4", "caption": "a dog runs"},
    ])  # fmt: skip
    for i in range(3):
        _png(root / "visdoc-tasks/ViDoRe_arxivqa" / f"p{i}.png", 20 + i)
    _rows(root, "ViDoRe_arxivqa", [{"corpus-id": f"p{i}"} for i in range(3)], "corpus")
    _rows(root, "ViDoRe_arxivqa", [{"query-id": "q1", "query": "revenue 2020?"},
                                   {"query-id": "q2", "query": "a chart"}], "queries")  # fmt: skip
    _rows(root, "ViDoRe_arxivqa", [{"query-id": "q1", "corpus-id": "p2", "score": 1},
                                   {"query-id": "q2", "corpus-id": "p1", "score": 1}], "qrels")  # fmt: skip
    return root


def write_release(src: Path) -> None:
    """Hand-written files in the release's three formats, with gaps: empty T-CoTs, missing entries, a mismatch."""
    _json(src / "Image/ImageNet-1K.json", [
        {"qry_inst": "<|image_1|> Represent the given image for classification", "qry_text": "",
         "qry_img_path": "inet/a.jpg", "tgt_text": ["cat", "dog", "fox"], "query_cot": "Q-inet-0", "error": None},
        {"qry_inst": "<|image_1|> Represent the given image for classification", "qry_text": "",
         "qry_img_path": "inet/b.jpg", "tgt_text": ["dog", "cat", "fox"], "query_cot": "", "error": "timeout"},
    ])  # fmt: skip
    _json(src / "Image/ImageNet-1K_corpus_cot.json", {"text": {"cat": "C-cat", "dog ": "C-dog"}, "image": {}})
    _json(src / "Image/MSCOCO_t2i.json", [
        {"qry_text": "a red kite", "qry_img_path": "", "query_cot": "Q-kite"},
        {"qry_text": "a blue bus", "qry_img_path": "", "query_cot": "Q-wrong-row"},  # disagrees with row 2
    ])  # fmt: skip
    _json(src / "Image/MSCOCO_t2i_corpus_cot.json", {"text": {}, "image": {"coco/k.jpg ": "C-k"}})
    _json(src / "Video/K700_query_cot.json", [{"video_id": "k2", "pos_text": "surfing", "query_cot": "Q-k2"}])
    _json(src / "Video/K700_corpus_cot.json", [
        {"corpus_id": "c0", "item_id": "k1", "corpus_content": "juggling", "corpus_cot": "C-juggling"},
        {"corpus_id": "c1", "item_id": "k2", "corpus_content": "surfing", "corpus_cot": ""},
    ])  # fmt: skip
    _json(src / "Video/MSR-VTT_query_cot.json", [
        {"video_id": "v2", "video": "v2.mp4", "caption": "a dog runs", "query_cot": "Q-v2"},
        {"video_id": "v1", "video": "v1.mp4", "caption": "a man sings", "query_cot": "Q-v1"},
    ])  # fmt: skip
    _json(src / "Video/MSR-VTT_corpus_cot.json", [
        {"corpus_id": "msrvtt_0", "corpus_content": "videos/v1.mp4", "corpus_cot": "C-v1"},
    ])  # fmt: skip
    _json(src / "VisDo/ViDoRe_arxivqa_query.json", [
        {"query-id": "q1", "query": "revenue 2020?", "query_cot": "Q-q1"},
        {"query-id": "q2", "query": "a table", "query_cot": "Q-q2-wrong"},  # the text disagrees
    ])  # fmt: skip
    _json(src / "VisDo/ViDoRe_arxivqa_corpus.json", [
        {"corpus-id": "p2", "image_path": "cache/p2.png", "corpus_cot": "C-p2"},
        {"corpus-id": "p0", "image_path": "cache/p0.png", "corpus_cot": "C-p0"},
    ])  # fmt: skip


# What each item must carry after the import: query T-CoTs by row, candidate T-CoTs by name (None = none).
EXPECTED_QUERIES = {
    "ImageNet-1K": ["Q-inet-0", None],
    "MSCOCO_t2i": ["Q-kite", None],
    "K700": [None, "Q-k2"],
    "MSR-VTT": ["Q-v1", "Q-v2"],
    "ViDoRe_arxivqa": ["Q-q1", None],
}
EXPECTED_CANDIDATES = {
    "ImageNet-1K": {"cat": "C-cat", "dog": "C-dog", "fox": None},
    "MSCOCO_t2i": {"coco/k.jpg": "C-k", "coco/c.jpg": None},
    "K700": {"juggling": "C-juggling", "surfing": None},
    "MSR-VTT": {"v1": "C-v1", "v2": None},
    "ViDoRe_arxivqa": {"p0": "C-p0", "p1": None, "p2": "C-p2"},
}
WITHOUT = sum(v is None for qs in EXPECTED_QUERIES.values() for v in qs) + sum(
    v is None for cs in EXPECTED_CANDIDATES.values() for v in cs.values()
)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(data root, release folder, imported T-CoT file)."""
    base = tmp_path_factory.mktemp("published")
    data, src, out = write_data(base / "data"), base / "release", base / "tcots.jsonl"
    write_release(src)
    import_published_tcots(src, data, out, tasks=TASKS, num_frames=2)
    return data, src, out


def test_import_joins_on_stable_keys_and_counts_what_is_left(release: tuple[Path, Path, Path]) -> None:
    data, _, out = release
    report = json.loads(out.with_name(out.name + ".report.json").read_text())
    counts = {k: (t["queries_matched"], t["queries"], t["candidates_matched"], t["candidates"],
                  t["query_mismatches"]) for k, t in report["tasks"].items()}  # fmt: skip
    assert counts == {
        "ImageNet-1K": (1, 2, 2, 3, 0),  # row 2's T-CoT is empty; "fox" has none
        "MSCOCO_t2i": (1, 2, 1, 2, 1),  # row 2's entry disagrees with the row (not used)
        "K700": (1, 2, 1, 2, 0),  # k1 has no entry; "surfing"'s T-CoT is empty
        "MSR-VTT": (2, 2, 1, 2, 0),  # joined by (video id, caption), not by position
        "ViDoRe_arxivqa": (1, 2, 2, 3, 1),
    }
    assert report["items_without_tcot"] == WITHOUT == 9 and report["layout"] == "reference"
    records = TCoTCache(out).items()
    assert len(records) == report["records"] == 13
    assert {key.reasoner for key, _ in records} == {PUBLISHED_REASONER}
    # each record is keyed by the item id of the reference-layout item it belongs to
    k700 = load_mmeb_task("K700", data, num_frames=2, layout="reference")
    k2 = k700.eval_task.queries[1]
    assert (
        dict((key.item_id, text) for key, text in records if key.side == "query")[
            tcot_file_id("reference", "K700", k2.id)
        ]
        == "Q-k2"
    )


def test_reimport_replaces_its_datasets_and_keeps_the_others(release: tuple[Path, Path, Path], tmp_path) -> None:
    data, src, out = release
    copy = tmp_path / "t.jsonl"
    copy.write_bytes(out.read_bytes())
    import_published_tcots(src, data, copy, tasks=["K700"], num_frames=2)
    assert sorted(TCoTCache(copy).items(), key=str) == sorted(TCoTCache(out).items(), key=str)
    assert len(copy.read_text().splitlines()) == 13  # no duplicate records
    with pytest.raises(PublishedTCoTError, match=r"OK-VQA: no Image/OK-VQA.json"):
        import_published_tcots(src, data, copy, tasks=["OK-VQA"])


class Recorder:
    """An encoder that records the (item, mode) pairs it embeds; reference layout, like a published checkpoint."""

    layout = "reference"

    def __init__(self) -> None:
        self.seen: dict[str, tuple[Item, str]] = {}

    def encode(self, items: Sequence[Item], batch_size: int = 16, show_progress_bar=None, mode=None) -> np.ndarray:
        for item in items:
            self.seen[item.id] = (item, mode)
        return np.eye(len(items), 32, dtype=np.float32)


def test_evaluation_gives_each_item_the_files_tcot_and_embeds_the_rest_raw(
    release: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    data, _, out = release
    evaluator = MMEBEvaluator(data, TASKS, tcot_source="file", tcot_cache=out, mode="full", check_counts=False,
                              num_frames=2, out_dir=tmp_path)  # fmt: skip
    recorder = Recorder()
    report = evaluator.evaluate(recorder, embedder_id="recorder")
    for key in TASKS:
        loaded = evaluator.loaded[key]
        got_q = [recorder.seen[q.id][0].tcot for q in loaded.eval_task.queries]
        assert got_q == EXPECTED_QUERIES[key], key
        got_c = {loaded.names[cid]: recorder.seen[cid][0].tcot for cid in loaded.eval_task.pool}
        assert got_c == EXPECTED_CANDIDATES[key], key
        for item, mode in recorder.seen.values():
            assert mode == ("full" if item.tcot is not None else "raw")
    meta = report.metadata
    assert meta["tcot_source"] == "file" and meta["reasoner"] is None and meta["layout"] == "reference"
    assert meta["tcot_fallbacks"] == WITHOUT and meta["tcot_file"]["items_without_tcot"] == WITHOUT
    assert meta["tcot_file"]["per_task"]["MSCOCO_t2i"] == {
        "queries": 2, "queries_without_tcot": 1, "candidates": 2, "candidates_without_tcot": 1,
    }  # fmt: skip
    assert "items without a T-CoT (embedded raw): 9" in (tmp_path / "summary.md").read_text()

    # a file imported for the other layout is refused, not silently ignored
    wrong = MMEBEvaluator(data, ["K700"], tcot_source="file", tcot_cache=out, layout="embedrl", check_counts=False,
                          num_frames=2)  # fmt: skip
    with pytest.raises(EvalError, match=r"holds T-CoTs for layout \['reference'\], not 'embedrl'"):
        wrong.task("K700")
    # a file whose T-CoTs of a dataset match none of its items is refused (imported for other data or settings)
    stale = tmp_path / "stale.jsonl"
    TCoTCache(stale).add([(published_key("reference", "K700", "q:000000:0123456789", "query"), "Q-old", "x")])
    with pytest.raises(EvalError, match=r"K700: none of its items has a T-CoT .* import again"):
        MMEBEvaluator(data, ["K700"], tcot_source="file", tcot_cache=stale, layout="reference", check_counts=False,
                      num_frames=2).task("K700")  # fmt: skip
    # items that changed since the import (here: 3 frames per video instead of 2) lose their T-CoT, counted
    other = MMEBEvaluator(data, ["K700"], tcot_source="file", tcot_cache=out, layout="reference", check_counts=False,
                          num_frames=3)  # fmt: skip
    other.task("K700")
    assert other.tcot_missing["K700"] == {
        "queries": 2, "queries_without_tcot": 2, "candidates": 2, "candidates_without_tcot": 1,
    }  # fmt: skip


@pytest.fixture(scope="module")
def embedder_dir(tiny_backbone_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedrl.models import Embedder

    out = tmp_path_factory.mktemp("embedder")
    Embedder.from_backbone(tiny_backbone_dir("qwen3-vl"), budget=PixelBudget(1024, 4096, 1024, 4096)).save(out)
    return out


def test_cli_import_then_eval_with_the_file_and_no_reasoner(
    release: tuple[Path, Path, Path], embedder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, src, _ = release
    tcots = tmp_path / "published.jsonl"
    assert main(["eval", "import-tcots", "--src", str(src), "--data", str(data), "--out", str(tcots),
                 "--tasks", "K700,ViDoRe_arxivqa", "--num_frames", "2"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| K700 | 1/2 | 1/2 | 2 | 0 |" in printed and "embedded raw at evaluation): 4" in printed
    out = tmp_path / "run"
    args = ["eval", "mmeb", "--data", str(data), "--model", str(embedder_dir), "--layout", "reference",
            "--tcot_cache", str(tcots), "--tasks", "K700,ViDoRe_arxivqa", "--out", str(out), "--num_frames", "2",
            "--check_counts", "false", "--show_progress_bar", "false", "--dtype", "float32"]  # fmt: skip
    assert main(args) == 0
    meta = json.loads((out / "summary.json").read_text())["metadata"]
    assert meta["tcot_source"] == "file" and meta["reasoner"] is None and meta["query_mode"] == "full"
    assert meta["tcot_file"]["items_without_tcot"] == 4 and meta["embedder"]["layout"] == "reference"
    assert meta["pixel_budget"]["frame_max_pixels"] == 300 * 32 * 32  # the reference harness's budget
    args[args.index("--tcot_cache") + 1] = str(tmp_path / "nope.jsonl")
    assert main(args) == 2  # a missing T-CoT file: one-line error


def test_cli_eval_mmeb_with_a_checkpoint_in_the_published_layout(
    release: tuple[Path, Path, Path], published_embedder_dir: Path, tmp_path: Path
) -> None:
    """A plain HF folder as the authors publish it (no embedrl file) evaluates MMEB-V2 with the published T-CoTs
    and no Reasoner, in the reference layout without asking for it."""
    data, src, _ = release
    tcots = tmp_path / "published.jsonl"
    assert main(["eval", "import-tcots", "--src", str(src), "--data", str(data), "--out", str(tcots),
                 "--tasks", "K700,ViDoRe_arxivqa", "--num_frames", "2"]) == 0  # fmt: skip
    out = tmp_path / "run"
    assert main(["eval", "mmeb", "--data", str(data), "--model", str(published_embedder_dir), "--tcot_cache",
                 str(tcots), "--tasks", "K700,ViDoRe_arxivqa", "--out", str(out), "--num_frames", "2",
                 "--check_counts", "false", "--show_progress_bar", "false", "--dtype", "float32"]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    meta = summary["metadata"]
    assert meta["embedder"]["layout"] == "reference" and meta["reasoner"] is None
    assert meta["tcot_file"]["items_without_tcot"] == 4
    assert set(summary["results"]) == {"K700", "ViDoRe_arxivqa"}
