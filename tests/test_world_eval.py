"""Retrieval evaluation on the synthetic world (docs/method.md §6): wiring, score files, caches, resume, Reasoner,
CLI."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from embedrl.backbones import PixelBudget
from embedrl.cli import main
from embedrl.config import ConfigError, EvalConfig, WorldConfig
from embedrl.data.schema import Item, read_jsonl, write_jsonl
from embedrl.eval.cache import EmbeddingCache, TCoTCache, TCoTKey, decoding_key, embedding_key
from embedrl.eval.scores import SCORE_KEYS, read_task_scores
from embedrl.eval.task import EvalError, MissingTCoTError
from embedrl.world.evaluate import MODE_PRESETS, PRIMARY_METRIC, WorldEvaluator, preset_config, read_query_values
from embedrl.world.generate import generate_world, load_eval_task

# Small pixel budget: a few visual tokens per image and frame keep the tiny model fast.
SMALL = PixelBudget(32 * 32, 64 * 64, 32 * 32, 64 * 64, num_frames=4)
LOCAL, GLOBAL = "world_cls", "world_doc"  # world_doc: VisDoc, global corpus, graded qrels


class Killed(Exception):
    """Stands in for a kill in the middle of a run."""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_world(WorldConfig(out=str(tmp_path_factory.mktemp("world") / "w"), seed=0, size="tiny"))


class OracleEncoder:
    """Ground-truth vectors: candidate j of the world is e_j; a query is ±Σ grade·e_j over its qrels.

    With sign +1 every relevant candidate outranks every other one (in grade order), so hit@1 = NDCG@5 = 1;
    with sign -1 every relevant candidate ranks below every irrelevant one, so hit@1 = 0.
    """

    def __init__(self, world: Path, sign: float = 1.0) -> None:
        manifest = json.loads((world / "eval" / "manifest.json").read_text())
        tasks = [load_eval_task(world, name) for name in manifest["tasks"]]
        column = {cid: j for j, cid in enumerate(cid for t in tasks for cid in t.pool)}
        self.vectors: dict[str, np.ndarray] = {}
        for cid, j in column.items():
            self.vectors[cid] = np.zeros(len(column), dtype=np.float32)
            self.vectors[cid][j] = 1.0
        for task in tasks:
            for query, qrels in zip(task.queries, task.qrels, strict=True):
                v = np.zeros(len(column), dtype=np.float32)
                for cid, grade in qrels.items():
                    v[column[cid]] = sign * grade
                self.vectors[query.id] = v
        self.calls: list[tuple[str, list[str]]] = []

    def encode(
        self, items: Sequence[Item], batch_size: int = 32, show_progress_bar: bool | None = None, mode=None
    ) -> np.ndarray:
        self.calls.append((mode, [it.id for it in items]))
        return np.stack([self.vectors[it.id] for it in items])


def _counting(real, calls: list[list[str]], kill_at: int | None = None):
    """``encode``/``generate`` that records the item ids of every finished call and raises at call ``kill_at``."""

    def wrapper(items, *args, **kwargs):
        if kill_at is not None and len(calls) + 1 == kill_at:
            raise Killed
        out = real(items, *args, **kwargs)
        calls.append([it.id for it in items])
        return out

    return wrapper


def _counting_batches(real, calls: list[list[str]], kill_at: int | None = None):
    """``Reasoner.generate_batches`` that records the item ids of every batch it hands out and raises before batch
    ``kill_at`` (which then never reaches the cache)."""

    def wrapper(items, *args, **kwargs):
        for batch, generations in real(items, *args, **kwargs):
            if kill_at is not None and len(calls) + 1 == kill_at:
                raise Killed
            calls.append([items[k].id for k in batch])
            yield batch, generations

    return wrapper


# ---------------------------------------------------------------------------------------------------------------
# Wiring: ranking, qrels, aggregates (no model)
# ---------------------------------------------------------------------------------------------------------------


def test_perfect_encoder_scores_one_and_reversed_scores_zero_on_every_task(world: Path) -> None:
    perfect = WorldEvaluator(world, mode="raw", tcot_source="none")(OracleEncoder(world), embedder_id="oracle")
    tasks = json.loads((world / "eval" / "manifest.json").read_text())["tasks"]
    assert {k for k in perfect if k.count("/") == 2 and k.endswith("/hit@1")} == {f"eval/{t}/hit@1" for t in tasks}
    for name in tasks:
        assert perfect[f"eval/{name}/hit@1"] == 1.0, name
        assert perfect[f"eval/{name}/ndcg_linear@5"] == pytest.approx(1.0), name
    assert perfect[PRIMARY_METRIC] == pytest.approx(1.0)
    assert tasks[GLOBAL]["graded"]  # the graded qrels reached the metric: NDCG@5 = 1 needs the grade order

    reversed_ = WorldEvaluator(world, mode="raw", tcot_source="none")(OracleEncoder(world, -1.0), embedder_id="rev")
    for name in tasks:
        assert reversed_[f"eval/{name}/hit@1"] == 0.0, name
    assert reversed_[PRIMARY_METRIC] < 0.5


def test_each_unique_item_is_encoded_once_per_mode(world: Path) -> None:
    oracle = OracleEncoder(world)
    WorldEvaluator(world, [LOCAL, GLOBAL], mode="raw", tcot_source="none", batch_size=7)(oracle, embedder_id="o")
    ids = [i for _, batch in oracle.calls for i in batch]
    assert len(ids) == len(set(ids))
    assert all(len(batch) <= 7 and mode == "raw" for mode, batch in oracle.calls)
    local = load_eval_task(world, LOCAL)
    assert {i for i in ids if i.startswith(LOCAL)} == {q.id for q in local.queries} | {
        c for ids_ in local.candidates for c in ids_
    }


def test_missing_teacher_tcot_raises_unless_raw_fallback_is_chosen(world: Path, tmp_path: Path) -> None:
    copy = tmp_path / "w"
    shutil.copytree(world, copy)
    pool_file = copy / "eval" / LOCAL / "candidates.jsonl"
    records = list(read_jsonl(pool_file))
    for rec in records[:2]:
        rec["tcot"] = None
    write_jsonl(pool_file, records)

    with pytest.raises(MissingTCoTError, match=r"world_cls: 2 target item\(s\) have no teacher T-CoT"):
        WorldEvaluator(copy, [LOCAL])(OracleEncoder(copy), embedder_id="o")
    oracle = OracleEncoder(copy)
    report = WorldEvaluator(copy, [LOCAL], on_missing_tcot="raw").evaluate(oracle, embedder_id="o")
    assert report.metadata["tcot_fallbacks"] == 2 and report.stats[LOCAL].tcot_fallbacks == 2
    raw_ids = [i for mode, batch in oracle.calls if mode == "raw" for i in batch]
    assert sorted(raw_ids) == sorted(rec["id"] for rec in records[:2])


class RecordingEncoder(OracleEncoder):
    """:class:`OracleEncoder` that also records the T-CoT each item was embedded with."""

    def __init__(self, world: Path) -> None:
        super().__init__(world)
        self.tcots: dict[str, str | None] = {}

    def encode(self, items: Sequence[Item], batch_size: int = 32, show_progress_bar=None, mode=None) -> np.ndarray:
        self.tcots |= {it.id: it.tcot for it in items}
        return super().encode(items, batch_size, show_progress_bar, mode)


def _format_1_world(world: Path, dest: Path) -> Path:
    """A copy of ``world`` as embedrl wrote it before oracle T-CoTs (format 1): no ``meta.oracle_tcot``."""
    shutil.copytree(world, dest)
    for path in (dest / "eval").glob("*/*.jsonl"):
        rows = list(read_jsonl(path))
        for rec in rows:
            (rec.get("query") or rec)["meta"].pop("oracle_tcot")
        write_jsonl(path, rows)
    for name in ("eval/manifest.json", "world.json"):
        info = json.loads((dest / name).read_text())
        (dest / name).write_text(json.dumps(info | {"format_version": 1}))
    return dest


def test_oracle_source_embeds_the_stored_noise_free_tcots(world: Path, tmp_path: Path) -> None:
    encoder = RecordingEncoder(world)
    report = WorldEvaluator(world, [LOCAL, GLOBAL], tcot_source="oracle").evaluate(encoder, embedder_id="o")
    assert report.metadata["tcot_source"] == "oracle" and report.metadata["tcot_fallbacks"] == 0
    assert report.metrics()[PRIMARY_METRIC] == pytest.approx(1.0)  # the same tasks: only the T-CoTs changed
    tasks = [load_eval_task(world, t) for t in (LOCAL, GLOBAL)]
    items = {it.id: it for task in tasks for it in [*task.queries, *task.pool.values()]}
    assert set(encoder.tcots) == set(items)  # every query and candidate, once
    assert all(tcot == items[i].meta["oracle_tcot"] for i, tcot in encoder.tcots.items())
    assert any(tcot != items[i].tcot for i, tcot in encoder.tcots.items())  # not the teacher's
    teacher = RecordingEncoder(world)
    WorldEvaluator(world, [LOCAL, GLOBAL]).evaluate(teacher, embedder_id="o")
    assert set(teacher.tcots) == set(encoder.tcots)
    assert all(tcot == items[i].tcot for i, tcot in teacher.tcots.items())
    with pytest.raises(EvalError, match="mode='raw' with tcot_source='oracle'"):
        WorldEvaluator(world, mode="raw", tcot_source="oracle")

    # A world written before oracle T-CoTs: the teacher's still evaluate; the oracle source is refused at once.
    old = _format_1_world(world, tmp_path / "old")
    assert WorldEvaluator(old, [LOCAL])(OracleEncoder(old), embedder_id="o")[PRIMARY_METRIC] == 1.0
    with pytest.raises(EvalError, match=r"old is a format-1 world, which stores no oracle T-CoTs"):
        WorldEvaluator(old, [LOCAL], tcot_source="oracle")


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="raw mode embeds no T-CoT"):
        EvalConfig(world="w", embedder="e", out="o", mode="raw")
    with pytest.raises(ConfigError, match="needs --reasoner"):
        EvalConfig(world="w", embedder="e", out="o", tcot_source="reasoner")
    with pytest.raises(ConfigError, match="reasoner is set"):
        EvalConfig(world="w", embedder="e", out="o", reasoner="r")
    with pytest.raises(ConfigError, match="raw mode embeds no T-CoT"):
        EvalConfig(world="w", embedder="e", out="o", mode="raw", tcot_source="oracle")
    assert EvalConfig(world="w", embedder="e", out="o", tcot_source="oracle").tcot_source == "oracle"


def test_mode_presets() -> None:
    assert list(MODE_PRESETS) == ["raw", "teacher", "oracle", "pre_rl", "egrl", "answer_only", "no_evidence"]
    base = EvalConfig(world="w", embedder="e", out="runs/eval")
    egrl = preset_config(base, "egrl", reasoner="runs/rl/final")
    assert (egrl.tcot_source, egrl.mode, egrl.reasoner, egrl.name) == ("reasoner", "full", "runs/rl/final", "egrl")
    assert Path(egrl.out) == Path("runs/eval/egrl") and Path(egrl.cache_dir) == Path("runs/eval/cache")
    raw = preset_config(base, "raw")
    assert (raw.tcot_source, raw.mode, raw.reasoner) == ("none", "raw", "")
    assert preset_config(base, "answer_only", reasoner="r").mode == "answer_only"
    oracle = preset_config(base, "oracle")
    assert (oracle.tcot_source, oracle.mode, oracle.reasoner, oracle.name) == ("oracle", "full", "", "oracle")
    assert Path(oracle.out) == Path("runs/eval/oracle") and oracle.cache_dir == egrl.cache_dir
    with pytest.raises(ValueError, match="generates T-CoTs"):
        preset_config(base, "pre_rl")


# ---------------------------------------------------------------------------------------------------------------
# Caches
# ---------------------------------------------------------------------------------------------------------------


def test_tcot_cache_drops_a_line_cut_by_a_kill(tmp_path: Path) -> None:
    path = tmp_path / "tcots.jsonl"
    key = TCoTKey("a", "query", "r@1", "abc", decoding_key({"temperature": 1.0, "seed": 0}))
    cache = TCoTCache(path)
    cache.add([(key, "<answer>x</answer>", "image_based")])
    with path.open("a") as fh:
        fh.write('{"id": "b", "side": "que')  # the kill
    again = TCoTCache(path)
    assert again.get(key) == "<answer>x</answer>" and len(again) == 1
    other = TCoTKey("b", "query", "r@1", "abc", key.decoding)
    again.add([(other, "y", "image_based")])
    assert TCoTCache(path).get(other) == "y" and len(TCoTCache(path)) == 2


def test_embedding_cache_ignores_an_uncommitted_shard_and_compacts(tmp_path: Path) -> None:
    keys = [embedding_key(f"i{n}", "emb@1", "full", f"t{n}") for n in range(5)]
    vectors = np.arange(15, dtype=np.float32).reshape(5, 3)
    cache = EmbeddingCache(tmp_path)
    cache.add(keys[:2], vectors[:2])
    cache.add(keys[2:4], vectors[2:4])
    (tmp_path / "shard-00002.npy").write_bytes(b"half a shard")  # its index was never written
    again = EmbeddingCache(tmp_path)
    assert len(again) == 4 and not (tmp_path / "shard-00002.npy").exists()
    again.add(keys[4:], vectors[4:])
    again.compact()
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["shard-00003.json", "shard-00003.npy"]
    final = EmbeddingCache(tmp_path)
    assert np.array_equal(np.stack([final.get(k) for k in keys]), vectors)
    assert embedding_key("i0", "emb@1", "raw", "t0") == embedding_key("i0", "emb@1", "raw", None)


# ---------------------------------------------------------------------------------------------------------------
# The tiny Embedder
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "source"), [("full", "teacher"), ("raw", "none")])
def test_score_files_and_aggregates(world: Path, embedder, tmp_path: Path, mode: str, source: str) -> None:
    evaluator = WorldEvaluator(world, [GLOBAL, LOCAL], mode=mode, tcot_source=source, out_dir=tmp_path)
    report = evaluator.evaluate(embedder)
    assert list(report.results) == [LOCAL, GLOBAL]  # manifest order
    for task, scores in report.results.items():
        on_disk = read_task_scores(tmp_path / "scores" / f"{task}_score.json")
        assert list(on_disk) == list(SCORE_KEYS) and on_disk == pytest.approx(scores)
        assert scores["num_pred"] == scores["num_data"] == 10
        assert all(0.0 <= v <= 1.0 for k, v in scores.items() if k not in ("num_pred", "num_data"))

    main = {LOCAL: report.results[LOCAL]["hit@1"], GLOBAL: report.results[GLOBAL]["ndcg_linear@5"]}
    flat = report.metrics()
    assert flat[evaluator.primary_metric] == pytest.approx((main[LOCAL] + main[GLOBAL]) / 2)
    assert flat["eval/modality/image"] == pytest.approx(main[LOCAL])
    assert flat["eval/meta_task/VisDoc"] == pytest.approx(main[GLOBAL])
    summary = json.loads((tmp_path / "summary.json").read_text())["summary"]
    assert summary["overall"] == pytest.approx(100 * (main[LOCAL] + main[GLOBAL]) / 2)
    assert summary["partial"] and len(summary["missing"]) == 9

    # Per-query values of the main metric: their mean is the score file's value; records follow the task's queries.
    values = read_query_values(tmp_path)
    assert sorted(values) == sorted(main) and all(values[t].mean() == pytest.approx(main[t]) for t in main)
    for task in main:
        records = [json.loads(line) for line in (tmp_path / "predictions" / f"{task}.jsonl").read_text().splitlines()]
        loaded = load_eval_task(world, task)
        assert [r["query"] for r in records] == [q.id for q in loaded.queries]
        assert [r["labels"] for r in records] == [[c for c, g in q.items() if g > 0] for q in loaded.qrels]
        assert {r["metric"] for r in records} == {"hit@1" if task == LOCAL else "ndcg_linear@5"}
        assert all(len(r["top"]) == len(r["scores"]) == 10 and r["scores"] == sorted(r["scores"], reverse=True)
                   for r in records)  # fmt: skip
        if task == LOCAL:  # hit@1: the top candidate is a relevant one exactly when the value is 1
            assert [r["value"] for r in records] == [float(r["top"][0] in r["labels"]) for r in records]

    board = json.loads((tmp_path / "leaderboard.json").read_text())
    meta = board["metadata"]
    assert set(board["metrics"]) == {"image", "visdoc"} and board["metrics"]["visdoc"][GLOBAL] == pytest.approx(
        report.results[GLOBAL]
    )
    assert (meta["query_mode"], meta["candidate_mode"], meta["tcot_source"]) == (mode, mode, source)
    assert meta["world"]["seed"] == 0 and meta["world"]["format_version"] == 2 and meta["world"]["size"] == "tiny"
    assert meta["embedder"]["id"].startswith("embedder@") and meta["reasoner"] is None and meta["decoding"] is None
    assert meta["tcot_fallbacks"] == 0
    table = (tmp_path / "summary.md").read_text()
    assert "| world_doc | VisDoc | VisDoc | ndcg_linear@5 |" in table and "**All** | 2 |" in table


def test_rerun_after_a_kill_recomputes_nothing_that_finished(world: Path, embedder, tmp_path, monkeypatch) -> None:
    def evaluator() -> WorldEvaluator:
        return WorldEvaluator(world, [LOCAL], cache_dir=tmp_path / "cache", batch_size=4, out_dir=tmp_path / "out")

    real = embedder.encode
    first: list[list[str]] = []
    monkeypatch.setattr(embedder, "encode", _counting(real, first, kill_at=3))
    with pytest.raises(Killed):
        evaluator().evaluate(embedder)
    assert len(first) == 2  # two batches of queries finished before the kill

    second: list[list[str]] = []
    monkeypatch.setattr(embedder, "encode", _counting(real, second))
    report = evaluator().evaluate(embedder)
    done_before = {i for batch in first for i in batch}
    done_after = [i for batch in second for i in batch]
    assert not done_before & set(done_after)
    assert len(done_before) + len(done_after) == 10 + 24
    assert report.stats[LOCAL].embeddings_cached == 8 and report.stats[LOCAL].embedded == 26

    third: list[list[str]] = []
    monkeypatch.setattr(embedder, "encode", _counting(real, third))
    again = evaluator().evaluate(embedder)
    assert third == [] and again.results == report.results

    monkeypatch.setattr(embedder, "encode", real)
    fresh = WorldEvaluator(world, [LOCAL], batch_size=4).evaluate(embedder)  # no cache at all
    assert fresh.results[LOCAL] == pytest.approx(report.results[LOCAL])
    shards = list((tmp_path / "cache" / "embeddings").rglob("shard-*.npy"))
    assert len(shards) == 1 and np.load(shards[0]).shape[0] == 34


def test_reasoner_tcots_are_generated_once_and_cached_by_reasoner_id(
    world: Path, embedder, tiny_backbone_dir, tmp_path: Path, monkeypatch
) -> None:
    from embedrl.models.reasoner import Decoding, Reasoner

    reasoner = Reasoner.from_pretrained(tiny_backbone_dir("qwen3-vl"), compact_prompts=True)
    decoding = Decoding(max_new_tokens=16, seed=0)

    def evaluator() -> WorldEvaluator:
        return WorldEvaluator(
            world, [LOCAL], tcot_source="reasoner", decoding=decoding, cache_dir=tmp_path, reasoner_batch_size=8
        )

    real = reasoner.generate_batches
    first: list[list[str]] = []
    monkeypatch.setattr(reasoner, "generate_batches", _counting_batches(real, first, kill_at=3))
    with pytest.raises(Killed):
        evaluator().evaluate(embedder, reasoner)
    assert [len(b) for b in first] == [8, 2]  # the queries: 10 T-CoTs appended in two batches

    second: list[list[str]] = []
    monkeypatch.setattr(reasoner, "generate_batches", _counting_batches(real, second))
    report = evaluator().evaluate(embedder, reasoner)
    assert [len(b) for b in second] == [8, 8, 8]  # only the 24 unique candidates
    assert report.stats[LOCAL].tcots_cached == 10 and report.stats[LOCAL].tcots_generated == 24

    reasoner_id = report.metadata["reasoner"]["id"]
    assert reasoner_id.startswith(Path(tiny_backbone_dir("qwen3-vl")).name + "@")
    assert report.metadata["decoding"]["max_new_tokens"] == 16 and report.metadata["decoding"]["seed"] == 0
    records = list(read_jsonl(tmp_path / "tcots" / f"{LOCAL}.jsonl"))
    assert len(records) == 34 and {r["reasoner"] for r in records} == {reasoner_id}
    assert {(r["side"], r["family"]) for r in records} == {("query", "image_based"), ("target", "positive_text")}
    assert all(r["decoding"] == json.loads(decoding_key(decoding)) for r in records)
    assert 0.0 <= report.metrics()[PRIMARY_METRIC] <= 1.0

    third: list[list[str]] = []
    monkeypatch.setattr(reasoner, "generate_batches", _counting_batches(real, third))
    again = evaluator().evaluate(embedder, reasoner)
    assert third == [] and again.results == report.results


def test_cli_eval_world(world: Path, embedder_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    args = ["eval", "world", "--world", str(world), "--embedder", str(embedder_dir), "--out", str(out)]
    code = main([*args, "--tasks", f"[{LOCAL}]", "--mode", "raw", "--tcot_source", "none"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| world_cls | Image | I-CLS | hit@1 |" in printed and "leaderboard.json" in printed
    assert (out / "scores" / f"{LOCAL}_score.json").is_file() and (out / "config.json").is_file()
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["metadata"]["eval_config"]["mode"] == "raw" and board["metadata"]["embedder"]["path"]
    assert math.isfinite(board["metrics"]["image"][LOCAL]["hit@1"])
    assert main([*args, "--mode", "raw"]) == 2  # raw with teacher T-CoTs: a configuration error

    oracle = tmp_path / "oracle"
    argv = ["eval", "world", "--world", str(world), "--embedder", str(embedder_dir), "--out", str(oracle)]
    assert main([*argv, "--tasks", f"[{LOCAL}]", "--tcot_source", "oracle", "--show_progress_bar", "false"]) == 0
    board = json.loads((oracle / "leaderboard.json").read_text())
    meta = board["metadata"]
    assert (meta["tcot_source"], meta["query_mode"], meta["tcot_fallbacks"]) == ("oracle", "full", 0)
    assert math.isfinite(board["metrics"]["image"][LOCAL]["hit@1"])


def test_cli_user_mistakes_are_one_line_errors(world: Path, embedder_dir: Path, tmp_path: Path, capsys) -> None:
    """Each mistake: exit 2, exactly one stderr line naming the input and the fix, no traceback."""
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("world: [unclosed\n")
    args = ["eval", "world", "--out", str(tmp_path / "o"), "--mode", "raw", "--tcot_source", "none"]
    old = _format_1_world(world, tmp_path / "old")
    oracle = ["eval", "world", "--out", str(tmp_path / "o"), "--tcot_source", "oracle"]
    cases = [
        ([*args, "--world", str(tmp_path / "nowhere"), "--embedder", str(embedder_dir)], "is not a world"),
        ([*oracle, "--world", str(old), "--embedder", str(embedder_dir)], "format-1 world, which stores no oracle"),
        ([*args, "--world", str(world), "--embedder", str(tmp_path / "no-model")], "no-model"),
        (["eval", "world", "--config", str(bad_yaml)], f"not valid YAML ({bad_yaml}, line 2"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("embedrl: error: ") and expected in err[0], err
        assert "Traceback" not in err[0] and "Repo id" not in err[0]
