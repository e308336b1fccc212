"""The synthetic world: determinism, on-disk schema, evidence that matches pixels, teacher T-CoTs and their noise."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from embedrl.cli import main
from embedrl.config import ConfigError, TeacherNoiseConfig, WorldConfig
from embedrl.data.schema import read_jsonl, read_pairs, write_jsonl
from embedrl.eval.task import EvalError
from embedrl.prompts import CUE_BOXES, CUE_FRAMES, CUE_KEYWORDS, PROMPT_FAMILIES
from embedrl.tcot import format_ok, parse_tcot
from embedrl.world.generate import SIZES, evidence_accuracy, generate_world, load_eval_task, world_stats
from embedrl.world.scenes import BACKGROUND, COLOURS, FLASH_RGB, page_region_has_ink
from embedrl.world.tasks import (
    EVAL_LEVEL,
    TASKS,
    Geometry,
    caption_holds,
    doc_grade,
    video_caption_holds,
)
from embedrl.world.teacher import FILLER_SENTENCES, NOISE_KINDS, TeacherView, write_oracle_tcot, write_tcot

META_TASKS = {"I-CLS", "I-QA", "I-RET", "I-GD", "V-CLS", "V-QA", "V-RET", "V-MRET", "VisDoc"}
ZERO_NOISE = dict.fromkeys(NOISE_KINDS, 0.0)


def _generate(out: Path, seed: int = 0, **teacher: float) -> Path:
    return generate_world(WorldConfig(out=str(out), seed=seed, size="tiny", teacher=TeacherNoiseConfig(**teacher)))


def _hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file; world.json without ``config.out`` (it records where the world was written)."""
    out = {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }
    info = json.loads((root / "world.json").read_text())
    info["config"].pop("out")
    out["world.json"] = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generate(tmp_path_factory.mktemp("world") / "w")


@pytest.fixture(scope="module")
def clean_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generate(tmp_path_factory.mktemp("clean") / "w", **ZERO_NOISE)


def _all_items(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(directory the record's media paths are relative to, item record) for every item written."""
    out = []
    for name in ("train.jsonl", "rl.jsonl"):
        for rec in read_jsonl(root / name):
            out += [(root, rec["query"]), (root, rec["target"])]
    manifest = json.loads((root / "eval" / "manifest.json").read_text())
    for task, info in manifest["tasks"].items():
        task_dir = root / "eval" / task
        out += [(task_dir, row["query"]) for row in read_jsonl(root / "eval" / info["files"]["queries"])]
        pool = info["files"].get("candidates") or info["files"]["corpus"]
        out += [(task_dir, rec) for rec in read_jsonl(root / "eval" / pool)]
    return out


def _load(base: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(base / rel).convert("RGB"))


# ----------------------------------------------------------------------------------------------------------------
# Determinism and layout
# ----------------------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_files_even_in_another_process(world: Path, tmp_path: Path) -> None:
    script = (
        "from embedrl.config import WorldConfig; from embedrl.world.generate import generate_world; "
        f"generate_world(WorldConfig(out={str(tmp_path / 'again')!r}, seed=0, size='tiny'))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)
    assert _hashes(tmp_path / "again") == _hashes(world)


def test_other_seed_differs_and_regenerating_in_place_is_identical(world: Path, tmp_path: Path) -> None:
    out = _generate(tmp_path / "seed1", seed=1)
    first = _hashes(out)
    assert first["train.jsonl"] != _hashes(world)["train.jsonl"]
    assert set(first) != set(_hashes(world))  # content-addressed media differ too
    _generate(out, seed=1)  # an existing world directory is cleared and written again
    assert _hashes(out) == first
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"holds no world\.json"):
        _generate(tmp_path / "other")


def test_world_json_and_manifest(world: Path) -> None:
    info = json.loads((world / "world.json").read_text())
    assert info["stage"] == "WorldConfig" and info["format_version"] == 2 and info["seed"] == 0
    assert info["config"]["size"] == "tiny" and info["sizes"] == vars(SIZES["tiny"])
    assert info["counts"]["train_pairs"] == len(read_pairs(world / "train.jsonl")) == 14 * len(TASKS)
    manifest = json.loads((world / "eval" / "manifest.json").read_text())
    tasks = manifest["tasks"]
    assert len(tasks) >= 10
    assert {t["meta_task"] for t in tasks.values()} == META_TASKS
    for name, t in tasks.items():
        assert t["metric"] == ("ndcg_linear@5" if t["meta_task"] == "VisDoc" else "hit@1"), name
        assert t["eval_type"] in ("local", "global") and t["num_queries"] == 10
        assert t["modality"] in ("image", "video", "visdoc")
    assert tasks["world_doc"]["graded"] and tasks["world_doc"]["eval_type"] == "global"
    assert {tasks[n]["query_modality"] for n in ("world_t2i", "world_i2t")} == {"text", "image"}


def test_training_pairs_cover_every_dataset_with_teacher_provenance(world: Path) -> None:
    pairs = read_pairs(world / "train.jsonl")
    assert {p.dataset for p in pairs} == set(TASKS)
    for p in pairs:
        for item in (p.query, p.target):
            prov = item.meta["tcot_provenance"]
            assert item.tcot and prov["generator"] == "world-teacher" and prov["family"] in PROMPT_FAMILIES
            assert set(prov["noise_applied"]) <= set(prov["noise_applicable"]) <= set(NOISE_KINDS)
            assert item.meta["split"] == "train" and item.meta["task"] == p.dataset
        assert PROMPT_FAMILIES[p.query.meta["tcot_provenance"]["family"]].side == "query"
        assert PROMPT_FAMILIES[p.target.meta["tcot_provenance"]["family"]].side == "target"


def _content(rec: dict[str, Any]) -> tuple:
    """Text, instruction and media file names (media paths differ between train and eval files)."""
    return (rec["text"], rec["instruction"], *(tuple(Path(p).name for p in rec[k]) for k in ("images", "frames")))


def test_splits_are_disjoint(world: Path) -> None:
    def pairs(name: str) -> set[tuple]:
        return {(r["dataset"], _content(r["query"]), _content(r["target"])) for r in read_jsonl(world / name)}

    train, rl = pairs("train.jsonl"), pairs("rl.jsonl")
    evaluation = set()
    for task in TASKS:
        ev = load_eval_task(world, task)
        for query, positives in zip(ev.queries, ev.positives, strict=True):
            q = _content(query.to_record())
            evaluation |= {(task, q, _content(ev.pool[pos].to_record())) for pos in positives}
    assert train and rl and evaluation
    assert not train & rl and not train & evaluation and not rl & evaluation


# ----------------------------------------------------------------------------------------------------------------
# Schema validity of the evaluation suite
# ----------------------------------------------------------------------------------------------------------------


def test_every_referenced_media_file_exists(world: Path) -> None:
    items = _all_items(world)
    assert len(items) > 500
    for base, rec in items:
        for rel in [*rec["images"], *rec["frames"]]:
            assert (base / rel).is_file(), f"{rec['id']}: missing {rel}"
        if rec["frames"]:
            assert len(rec["frames"]) == 8


@pytest.mark.parametrize("task", sorted(TASKS))
def test_positives_are_in_candidate_sets(world: Path, task: str) -> None:
    ev = load_eval_task(world, task)
    assert len(ev.queries) == 10
    for i, (positives, qrels) in enumerate(zip(ev.positives, ev.qrels, strict=True)):
        assert positives and set(positives) <= set(qrels) <= set(ev.pool)
        assert all(qrels[p] == max(qrels.values()) for p in positives)
        if ev.candidates is not None:
            cands = ev.candidates[i]
            assert len(cands) == len(set(cands)) == 10 and cands[0] == positives[0]
            assert set(qrels) == {cands[0]}
    assert ev.info["pool_size"] == len(ev.pool)


def test_eval_items_carry_teacher_tcots(world: Path) -> None:
    for _, rec in _all_items(world):
        assert rec["tcot"] and rec["meta"]["tcot_provenance"]["generator"] == "world-teacher"


def test_task_negatives_never_answer_the_query() -> None:
    geo = Geometry()
    for i in range(60):
        rng = random.Random(i)
        ex = TASKS["world_t2i"].make(rng, geo, EVAL_LEVEL, 9)
        assert caption_holds(ex.positive.media, ex.semantics)
        assert not any(caption_holds(n.media, ex.semantics) for n in ex.negatives)
        ex = TASKS["world_i2t"].make(rng, geo, EVAL_LEVEL, 9)
        assert not any(caption_holds(ex.query.media, n.info["caption"]) for n in ex.negatives)
        ex = TASKS["world_t2v"].make(rng, geo, EVAL_LEVEL, 9)
        assert video_caption_holds(ex.positive.media, ex.semantics)
        assert not any(video_caption_holds(n.media, ex.semantics) for n in ex.negatives)
        ex = TASKS["world_doc"].make(rng, geo, EVAL_LEVEL, 9)
        assert doc_grade(ex.semantics, ex.positive) == 2 and all(doc_grade(ex.semantics, n) < 2 for n in ex.negatives)


# ----------------------------------------------------------------------------------------------------------------
# Evidence corresponds to pixels
# ----------------------------------------------------------------------------------------------------------------


def _px(box: list[int], size: int) -> tuple[int, int, int, int]:
    return tuple(v * size // 1000 for v in box)  # type: ignore[return-value]


def _check_objects(image: np.ndarray, objects: list[dict[str, Any]], item_id: str) -> None:
    h, w = image.shape[:2]
    covered = np.zeros((h, w), dtype=bool)
    for obj in objects:
        x1, y1, x2, y2 = _px(obj["box"], w)
        assert 0 <= obj["box"][0] < obj["box"][2] <= 1000 and 0 <= obj["box"][1] < obj["box"][3] <= 1000
        region = image[y1:y2, x1:x2]
        assert (region == COLOURS[obj["colour"]]).all(axis=-1).any(), f"{item_id}: no {obj['colour']} pixel in box"
        covered[y1:y2, x1:x2] = True
    outside = image[~covered]
    assert (outside == BACKGROUND).all(), f"{item_id}: object pixels outside every ground-truth box"


def test_image_boxes_lie_on_their_objects(world: Path) -> None:
    checked = 0
    for base, rec in _all_items(world):
        gt = rec["meta"]["gt"]
        if not rec["images"]:
            continue
        image = _load(base, rec["images"][0])
        assert list(image.shape[:2]) == gt["image_size"]
        for box in gt.get("boxes", []):
            assert 0 <= box[0] < box[2] <= 1000 and 0 <= box[1] < box[3] <= 1000 and box != [0, 0, 1000, 1000]
        if "objects" in gt:
            _check_objects(image, gt["objects"], rec["id"])
            if image.shape[0] == 128:  # full scenes: every box is a grid cell
                assert all(v % 250 == 0 for o in gt["objects"] for v in o["box"])
                assert all(b in [o["box"] for o in gt["objects"]] for b in gt.get("boxes", []))
        elif "page" in gt:
            assert all(page_region_has_ink(image, tuple(b)) for b in gt["boxes"])
        checked += 1
    assert checked > 300


def test_key_frames_are_the_only_frames_that_change(world: Path) -> None:
    checked = 0
    for base, rec in _all_items(world):
        if not rec["frames"]:
            continue
        gt = rec["meta"]["gt"]
        frames = np.stack([_load(base, f).astype(int) for f in rec["frames"]])
        assert gt["num_frames"] == len(frames) and all(0 <= f < len(frames) for f in gt["frames"])
        assert {f for e in gt["events"] for f in e["frames"]} == set(gt["frames"])
        assert 1 <= len(gt["frames"]) <= 4
        change = np.abs(frames - np.median(frames, axis=0)).max(axis=(1, 2, 3))
        for f in range(len(frames)):
            if f in gt["frames"]:
                assert change[f] > 30, f"{rec['id']}: decisive frame {f} looks like the others"
            else:
                assert change[f] <= 4, f"{rec['id']}: frame {f} is not a near-duplicate"
        checked += 1
    assert checked > 100
    assert FLASH_RGB == (255, 255, 255)


# ----------------------------------------------------------------------------------------------------------------
# Teacher T-CoTs
# ----------------------------------------------------------------------------------------------------------------


def _parse(rec: dict[str, Any]) -> Any:
    family = PROMPT_FAMILIES[rec["meta"]["tcot_provenance"]["family"]]
    n_frames = len(rec["frames"]) or None
    return family.cue_key, parse_tcot(rec["tcot"], cue_key=family.cue_key, n_frames=n_frames), n_frames


def test_noise_free_teacher_tcots_are_exact(clean_world: Path) -> None:
    items = _all_items(clean_world)
    for _, rec in items:
        cue_key, parsed, n_frames = _parse(rec)
        gt = rec["meta"]["gt"]
        assert parsed.problems == [], (rec["id"], parsed.problems)
        assert format_ok(rec["tcot"], cue_key, n_frames)
        assert rec["meta"]["tcot_provenance"]["noise_applied"] == []
        if cue_key == CUE_BOXES:
            assert parsed.boxes == gt["boxes"]
        elif cue_key == CUE_FRAMES:
            assert parsed.frames == gt["frames"]
        else:
            assert parsed.keywords == gt["keywords"]
    # Exactly right means right for every cue type.
    assert {_parse(rec)[0] for _, rec in items} == {CUE_BOXES, CUE_FRAMES, CUE_KEYWORDS}


def test_noisy_teacher_tcots_stay_well_formed(world: Path) -> None:
    applied = set()
    for _, rec in _all_items(world):
        cue_key, parsed, n_frames = _parse(rec)
        assert parsed.problems == [] and format_ok(rec["tcot"], cue_key, n_frames), rec["id"]
        applied |= set(rec["meta"]["tcot_provenance"]["noise_applied"])
    assert applied == set(NOISE_KINDS)


BOX_VIEW = TeacherView(
    "image_based",
    ("The question asks about the red circle.",),
    "The box holds it.",
    "A red circle.",
    boxes=((250, 250, 500, 500), (500, 250, 750, 500)),
    distractor_boxes=((0, 0, 250, 250), (750, 750, 1000, 1000)),
)
FRAME_VIEW = TeacherView(
    "video_sequence", ("The red circle jumps.",), "That frame decides.", "A jump.", frames=(3, 4), num_frames=8
)
KEYWORD_VIEW = TeacherView(
    "positive_text",
    ("The label names a colour and a shape.",),
    "It is a label.",
    "red circle",
    keywords=("red", "circle"),
    distractor_keywords=("blue", "square"),
)
RATES = TeacherNoiseConfig(
    wrong_box=0.3, loose_box=0.15, missing_frame=0.25, extra_frame=0.35, distractor_keyword=0.4, verbose=0.1
)


def _effect_seen(kind: str, view: TeacherView, out: Any) -> bool:
    """Whether the written T-CoT shows the imperfection ``kind``."""
    tcot = out.tcot
    if kind == "wrong_box":
        return any(tuple(b) in view.distractor_boxes for b in tcot.boxes)
    if kind == "loose_box":
        return any(tuple(b) not in view.boxes + view.distractor_boxes for b in tcot.boxes)
    if kind == "missing_frame":
        return not set(view.frames) <= set(tcot.frames)
    if kind == "extra_frame":
        return bool(set(tcot.frames) - set(view.frames))
    if kind == "distractor_keyword":
        return bool(set(tcot.keywords) - set(view.keywords))
    return any(s in tcot.thinking for s in FILLER_SENTENCES)


@pytest.mark.parametrize("view", [BOX_VIEW, FRAME_VIEW, KEYWORD_VIEW], ids=["boxes", "frames", "keywords"])
def test_imperfections_occur_at_the_configured_rates(view: TeacherView) -> None:
    n = 2000
    outs = [write_tcot(view, RATES, random.Random(f"rates/{i}")) for i in range(n)]
    kinds = outs[0].applicable
    assert "verbose" in kinds and len(kinds) >= 2
    for kind in kinds:
        p = getattr(RATES, kind)
        hits = sum(kind in o.applied for o in outs)
        bound = 4.5 * math.sqrt(p * (1 - p) / n)  # binomial: a false alarm has probability < 1e-5
        assert abs(hits / n - p) <= bound, f"{kind}: {hits}/{n} vs rate {p}"
        # With no other cue-changing imperfection, the written cue shows the imperfection exactly when it was applied.
        alone = [o for o in outs if set(o.applied) <= {kind, "verbose"}]
        assert all(_effect_seen(kind, view, o) == (kind in o.applied) for o in alone), kind
    for o in outs:
        parsed = parse_tcot(o.text, cue_key=view.cue_key, n_frames=view.num_frames or None)
        assert parsed.problems == [] and parsed.cue_present
        assert [0, 0, 1000, 1000] not in parsed.boxes


def test_a_rate_of_one_always_applies_and_zero_never() -> None:
    ones = TeacherNoiseConfig(**dict.fromkeys(NOISE_KINDS, 1.0))
    zeros = TeacherNoiseConfig(**ZERO_NOISE)
    for view in (BOX_VIEW, FRAME_VIEW, KEYWORD_VIEW):
        for i in range(50):
            out = write_tcot(view, ones, random.Random(i))
            assert out.applied == out.applicable
            clean = write_tcot(view, zeros, random.Random(i))
            assert clean.applied == () and clean.tcot.boxes == [list(b) for b in view.boxes]
            assert clean.tcot.frames == list(view.frames) and clean.tcot.keywords == list(view.keywords)


def test_the_oracle_is_the_teacher_at_zero_rates_whatever_the_seed() -> None:
    for view in (BOX_VIEW, FRAME_VIEW, KEYWORD_VIEW):
        oracle = write_oracle_tcot(view)
        assert oracle.applied == () and oracle.applicable
        assert {write_tcot(view, TeacherNoiseConfig(**ZERO_NOISE), random.Random(i)).text for i in range(20)} == {
            oracle.text
        }
        noisy = write_tcot(view, TeacherNoiseConfig(**dict.fromkeys(NOISE_KINDS, 1.0)), random.Random(0))
        assert noisy.text != oracle.text


def _eval_records(root: Path) -> list[dict[str, Any]]:
    return [rec for _, rec in _all_items(root) if rec["meta"]["split"] == "eval"]


def test_oracle_tcots_equal_the_clean_teachers(clean_world: Path) -> None:
    records = _eval_records(clean_world)
    assert len(records) > 100 and all(rec["meta"]["oracle_tcot"] == rec["tcot"] for rec in records)
    train = read_pairs(clean_world / "train.jsonl")  # only the evaluation items carry an oracle T-CoT
    assert not any("oracle_tcot" in item.meta for pair in train for item in (pair.query, pair.target))


def test_oracle_tcots_differ_exactly_where_an_imperfection_applied_and_are_exact(world: Path) -> None:
    records = _eval_records(world)
    differ = [rec["meta"]["oracle_tcot"] != rec["tcot"] for rec in records]
    noisy = [bool(rec["meta"]["tcot_provenance"]["noise_applied"]) for rec in records]
    assert differ == noisy and 0 < sum(differ) < len(records)
    for rec in records:
        cue_key, parsed, n_frames = _parse({**rec, "tcot": rec["meta"]["oracle_tcot"]})
        gt = rec["meta"]["gt"]
        assert parsed.problems == [] and format_ok(rec["meta"]["oracle_tcot"], cue_key, n_frames), rec["id"]
        assert not any(f in parsed.thinking for f in FILLER_SENTENCES)
        evidence = {CUE_BOXES: (parsed.boxes, "boxes"), CUE_FRAMES: (parsed.frames, "frames")}
        given, key = evidence.get(cue_key, (parsed.keywords, "keywords"))
        assert given == gt[key], rec["id"]
        # The oracle's answer and rethink are the teacher's: its noise never touches them.
        teacher = parse_tcot(rec["tcot"], cue_key=cue_key, n_frames=n_frames)
        assert (parsed.answer, parsed.rethink) == (teacher.answer, teacher.rethink)


def test_load_eval_task_gives_the_oracle_tcots_and_refuses_an_old_world(world: Path, tmp_path: Path) -> None:
    teacher, oracle = load_eval_task(world, "world_grounding"), load_eval_task(world, "world_grounding", "oracle")
    pairs = list(
        zip([*teacher.queries, *teacher.pool.values()], [*oracle.queries, *oracle.pool.values()], strict=True)
    )
    assert all(o.id == t.id and o.tcot == t.meta["oracle_tcot"] for t, o in pairs)
    assert any(o.tcot != t.tcot for t, o in pairs) and oracle.qrels == teacher.qrels
    with pytest.raises(EvalError, match="tcots='noisy'"):
        load_eval_task(world, "world_grounding", "noisy")  # type: ignore[arg-type]
    # A format-1 world (no oracle T-CoTs) still loads with the teacher's; the oracle's are refused by name.
    old = tmp_path / "eval"
    shutil.copytree(world / "eval" / "world_cls", old / "world_cls")
    shutil.copy(world / "eval" / "manifest.json", old / "manifest.json")
    for path in old.glob("world_cls/*.jsonl"):
        rows = list(read_jsonl(path))
        for rec in rows:
            (rec.get("query") or rec)["meta"].pop("oracle_tcot")
        write_jsonl(path, rows)
    assert load_eval_task(tmp_path, "world_cls").queries[0].tcot
    with pytest.raises(EvalError, match=r"world_cls/cand/00000 in .* has no oracle_tcot .*: regenerate the world"):
        load_eval_task(tmp_path, "world_cls", "oracle")


def test_discrimination_examples_are_labelled_and_shuffled(world: Path) -> None:
    pairs = {p.pair_id: p for p in read_pairs(world / "rl.jsonl")}
    records = list(read_jsonl(world / "discrimination.jsonl"))
    assert {r["direction"] for r in records} == {"query_to_target", "target_to_query"}
    labels = []
    for r in records:
        pair_id = r["id"].rsplit("/", 1)[0]
        pair = pairs[pair_id]
        anchor, positive = (
            (pair.query, pair.target) if r["direction"] == "query_to_target" else (pair.target, pair.query)
        )
        assert r["anchor"]["tcot"] == anchor.tcot and r["anchor"]["text"] == anchor.text
        assert r["candidates"][r["label"]]["id"] == positive.id
        assert 2 <= len(r["candidates"]) <= 5 and len({c["id"] for c in r["candidates"]}) == len(r["candidates"])
        assert all(c["tcot"].startswith("<thinking>") for c in r["candidates"])
        labels.append(r["label"])
    assert len(set(labels)) >= 3  # shuffled, not always first


# ----------------------------------------------------------------------------------------------------------------
# Stats, config and CLI
# ----------------------------------------------------------------------------------------------------------------


def test_world_stats_counts_and_measures(world: Path) -> None:
    stats = world_stats(world, contact_sheet=False)
    assert stats["pairs"]["train"] == dict.fromkeys(sorted(TASKS), 14)
    assert stats["pairs"]["rl"] == dict.fromkeys(sorted(TASKS), 4)
    assert set(stats["eval"]) == set(TASKS)
    rates = stats["teacher"]["train_rl"]["imperfections"]
    assert set(rates) == set(NOISE_KINDS) and all(r["applicable"] > 0 for r in rates.values())
    assert 0.5 < stats["teacher"]["train_rl"]["box_exact_rate"] < 1.0
    assert 0.5 < stats["teacher"]["train_rl"]["keyword_precision"] < 1.0  # distractor keywords
    assert stats["media"]["files"] == json.loads((world / "world.json").read_text())["counts"]["media_files"]


def test_clean_world_stats_show_a_perfect_teacher(clean_world: Path) -> None:
    teacher = world_stats(clean_world, contact_sheet=False)["teacher"]
    for part in teacher.values():
        assert part["box_exact_rate"] == part["key_frame_precision"] == part["key_frame_recall"] == 1.0
        assert part["keyword_precision"] == 1.0
        assert all(r["applied"] == 0 for r in part["imperfections"].values())


def test_evidence_accuracy_by_hand() -> None:
    """Keywords: 3 distinct given (case-folded, the repeat counts once), 2 true, of 3 true ones. Boxes: 3 given on
    box items, 2 equal a true box (the loose one does not). Frames: 4 distinct given (the repeated 2 counts once),
    2 of them decisive, of 3 decisive. A cue of another kind than the item asks for is not counted."""
    gt_t = {"keywords": ["red square", "jumps", "then"]}
    gt_a = {"boxes": [[0, 0, 250, 250], [250, 0, 500, 250]]}
    gt_v = {"frames": [1, 2, 6]}
    cues = [
        ("text_keywords", ["Red Square", "red square", "jumps", "blue circle"], [[0, 0, 250, 250]], [1], gt_t),
        ("bbox_2d", ["red square"], [[0, 0, 250, 250], [250, 0, 500, 500]], [], gt_a),
        ("bbox_2d", [], [[250, 0, 500, 250]], [], gt_a),
        ("key_frames", [], [], [0, 2, 2, 6, 7], gt_v),
    ]
    assert evidence_accuracy(cues) == {
        "keyword_precision": 2 / 3, "keyword_recall": 2 / 3, "box_exact_rate": 2 / 3, "key_frame_precision": 2 / 4,
        "key_frame_recall": 2 / 3, "keywords": 3, "boxes": 3, "frames_given": 4, "frames_decisive": 3,
    }  # fmt: skip
    empty = evidence_accuracy([])
    assert all(empty[k] is None for k in empty if not k.startswith(("keywords", "boxes", "frames")))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"frame_size": 48}, "must be a multiple of the cell size"),
        ({"eval_candidates": 1}, r"eval_candidates=1 must be in \[2, 20\]"),
        ({"page_size": 100}, "page_size=100"),
        ({"grid": 2, "image_size": 64}, "grid=2 leaves too few cells"),
        ({"discrimination_negatives": 0}, "discrimination_negatives=0"),
    ],
)
def test_world_config_checks(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        WorldConfig(out="w", **overrides)


def test_cli_generate_and_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["world", "generate", "--out", str(out), "--size", "tiny", "--seed", "2"]) == 0
    capsys.readouterr()
    assert main(["world", "stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["world"]["seed"] == 2 and (out / "contact_sheet.png").is_file()
    assert Image.open(out / "contact_sheet.png").size[0] > 500
    assert main(["world", "stats", str(out), "--no-contact-sheet"]) == 0
    assert "world_doc" in capsys.readouterr().out
