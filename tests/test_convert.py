"""Training-data converters: MMEB-train, LLaVA-Hound, ViDoRe and VisRAG -> pairs JSONL, caps, weights, bad rows."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedrl.cli import main
from embedrl.config import ConvertConfig, ConvertDataset
from embedrl.data.rows import RowError
from embedrl.data.schema import read_pairs
from embedrl.prep.convert import convert


def _png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), seed * 30 % 255, dtype=np.uint8)).save(path)


def _jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_sources(root: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    mmeb = root / "MMEB-train"
    for i in range(5):
        _png(mmeb / f"images/coco/{i}.jpg", i)
    _jsonl(
        mmeb / "MSCOCO_i2t/train.jsonl",
        [
            {
                "qry": "<|image_1|>\nFind a caption for this image.",
                "qry_image_path": f"images/coco/{i}.jpg",
                "pos_text": f"caption {i}",
                "pos_image_path": "",
                "neg_text": "",
                "neg_image_path": "",
            }
            for i in range(5)
        ],
    )
    _jsonl(
        mmeb / "N24News/train.jsonl",
        [
            {
                "qry": "<|image_1|>\nWhich news section?",
                "qry_image_path": "images/coco/0.jpg",
                "pos_text": "sports",
                "pos_image_path": "",
            }
        ],
    )
    hound = root / "llava-hound"
    for v in ("v1", "v2"):
        for f in range(12):
            _png(hound / f"frames/{v}/{f:03d}.jpeg", f)
    conv = lambda q, a: [{"from": "human", "value": f"<video>\n{q}"}, {"from": "gpt", "value": a}]  # noqa: E731
    _jsonl(
        hound / "video_caption.jsonl",
        [
            {"id": "1", "video": "v1", "conversations": conv("Describe.", "a dog")},
            {"id": "2", "video": "v2", "conversations": conv("Describe.", "a cat")},
        ],
    )
    _jsonl(hound / "video_qa.jsonl", [{"id": "3", "video": "v1", "conversations": conv("What animal?", "A dog.")}])
    vidore = root / "vidore"
    vidore.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (10, 14), "white").save(buf, format="PNG")
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"query": f"what is on page {i}?", "image": {"bytes": buf.getvalue(), "path": None}, "source": "x"}
                for i in range(3)
            ]
        ),
        vidore / "train.parquet",
    )
    visrag = root / "visrag"
    _png(visrag / "pages/a.png")
    _jsonl(visrag / "train.jsonl", [{"query": "chart of sales", "image": "pages/a.png"}])
    return {"mmeb_train": mmeb, "llava_hound": hound, "vidore": vidore, "visrag": visrag}


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    return write_sources(tmp_path / "src")


def test_default_table_follows_method_md() -> None:
    cfg = ConvertConfig(out="x")
    assert len(cfg.datasets) == 25
    by_source: dict[str, list[str]] = {}
    for name, spec in cfg.datasets.items():
        by_source.setdefault(spec.source, []).append(name)
    assert {k: len(v) for k, v in by_source.items()} == {"mmeb_train": 20, "llava_hound": 3, "vidore": 1, "visrag": 1}
    caps = {spec.source: spec.cap for spec in cfg.datasets.values()}
    assert caps == {"mmeb_train": 50_000, "llava_hound": 300_000, "vidore": 100_000, "visrag": 100_000}
    assert sorted(n for n, s in cfg.datasets.items() if not s.contrastive) == ["HatefulMemes", "N24News", "VOC2007"]
    assert cfg.datasets["MSCOCO"].weight == 3.78 and cfg.datasets["VisRAG"].weight == 6.0
    assert cfg.datasets["LLaVA-Hound_video_retrieval"].weight == 5.76


def test_every_converter_writes_readable_pairs(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = ConvertConfig(
        out=str(out),
        **{k: str(v) for k, v in sources.items()},
        only=[
            "MSCOCO_i2t",
            "N24News",
            "LLaVA-Hound_caption_retrieval",
            "LLaVA-Hound_video_qa",
            "LLaVA-Hound_video_retrieval",
            "ViDoRe",
            "VisRAG",
        ],
        show_progress_bar=False,
    )
    manifest = convert(cfg)
    assert {k: v["pairs"] for k, v in manifest["datasets"].items()} == {
        "MSCOCO_i2t": 5,
        "N24News": 1,
        "LLaVA-Hound_caption_retrieval": 2,
        "LLaVA-Hound_video_qa": 1,
        "LLaVA-Hound_video_retrieval": 2,
        "ViDoRe": 3,
        "VisRAG": 1,
    }
    assert manifest["datasets"]["N24News"]["contrastive"] is False
    assert json.loads((out / "convert.json").read_text())["datasets"]["ViDoRe"]["weight"] == 5.0

    coco = read_pairs(out / "MSCOCO_i2t.jsonl")
    assert coco[0].pair_id == "MSCOCO_i2t/0000000" and coco[0].query.text == "Find a caption for this image."
    assert coco[0].query.images[0].is_file() and coco[0].target.text == "caption 0"
    cap = read_pairs(out / "LLaVA-Hound_caption_retrieval.jsonl")[0]
    assert cap.query.modality == "video" and len(cap.query.frames) == 8 and cap.target.text == "a dog"
    assert all(Path(f).is_file() for f in cap.query.frames)
    ret = read_pairs(out / "LLaVA-Hound_video_retrieval.jsonl")[1]
    assert ret.query.text == "a cat" and ret.target.modality == "video"
    qa = read_pairs(out / "LLaVA-Hound_video_qa.jsonl")[0]
    assert qa.query.text == "What animal?" and qa.query.frames and qa.target.text == "A dog."
    pages = read_pairs(out / "ViDoRe.jsonl")
    assert len({p.target.images[0] for p in pages}) == 1 and pages[0].target.images[0].is_file()  # written once
    assert read_pairs(out / "VisRAG.jsonl")[0].target.images[0].resolve() == (sources["visrag"] / "pages/a.png")


def test_caps_sample_uniformly_and_deterministically(sources: dict[str, Path], tmp_path: Path) -> None:
    datasets = {"MSCOCO_i2t": ConvertDataset("mmeb_train", "MSCOCO_i2t", cap=3, weight=2.58)}
    runs = []
    for name in ("a", "b"):
        cfg = ConvertConfig(
            out=str(tmp_path / name), mmeb_train=str(sources["mmeb_train"]), datasets=datasets, show_progress_bar=False
        )
        manifest = convert(cfg)
        assert manifest["datasets"]["MSCOCO_i2t"]["available"] == 5 and manifest["not_converted"] == []
        runs.append([p.pair_id for p in read_pairs(tmp_path / name / "MSCOCO_i2t.jsonl")])
    assert runs[0] == runs[1] and len(runs[0]) == 3 and runs[0] == sorted(runs[0])


def test_bad_rows_stop_or_skip(sources: dict[str, Path], tmp_path: Path) -> None:
    rows = sources["mmeb_train"] / "MSCOCO_i2t/train.jsonl"
    lines = rows.read_text().splitlines(keepends=True)
    broken = json.loads(lines[1]) | {"qry_image_path": "images/coco/missing.jpg"}
    rows.write_text(lines[0] + json.dumps(broken) + "\n" + "".join(lines[2:]))
    kw = {"mmeb_train": str(sources["mmeb_train"]), "only": ["MSCOCO_i2t"], "show_progress_bar": False}
    with pytest.raises(RowError, match=rf"{rows}:2: query image .*missing.jpg does not exist"):
        convert(ConvertConfig(out=str(tmp_path / "a"), **kw))
    manifest = convert(ConvertConfig(out=str(tmp_path / "b"), on_bad_row="skip", **kw))
    entry = manifest["datasets"]["MSCOCO_i2t"]
    assert entry["pairs"] == 4 and entry["bad_rows"]["skipped"] == 1
    hound = sources["llava_hound"] / "video_caption.jsonl"
    hound.write_text(hound.read_text() + '{"id": "9", "video": "v9", "conversations": []}\n')
    with pytest.raises(RowError, match=rf"{hound}:3: conversations must hold a human turn and a gpt turn"):
        convert(
            ConvertConfig(
                out=str(tmp_path / "c"),
                llava_hound=str(sources["llava_hound"]),
                only=["LLaVA-Hound_caption_retrieval"],
                show_progress_bar=False,
            )
        )


def test_cli_convert(sources: dict[str, Path], tmp_path: Path, capsys) -> None:
    code = main(
        [
            "convert",
            "--out",
            str(tmp_path / "o"),
            "--visrag",
            str(sources["visrag"]),
            "--vidore",
            str(sources["vidore"]),
            "--show_progress_bar",
            "false",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "ViDoRe: 3 pairs (of 3)" in printed and "VisRAG: 1 pairs (of 1)" in printed
    manifest = json.loads((tmp_path / "o/convert.json").read_text())
    assert "MSCOCO_i2t" in manifest["not_converted"]  # its source folder was not given
    assert main(["convert", "--out", str(tmp_path / "p"), "--only", "ViDoRe"]) == 2  # --vidore missing
