"""The command line without surprises: the README's command sequence runs as written, options are spelled in full,
list-valued keys take commas everywhere, ``eval summarize`` reads our own leaderboards, ``--version``, ``search``
shows media paths."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import embedrl
from embedrl import config as config_module
from embedrl.cli import build_parser, config_from_args, main
from embedrl.config import TrackingFields, load_config
from embedrl.data.schema import Item, write_jsonl
from embedrl.eval.scores import MMEB_V2_DATASETS, SCORE_KEYS, write_leaderboard

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# ----------------------------------------------------------------------------------------------------------------
# Helpers: the README's command block, the parser tree
# ----------------------------------------------------------------------------------------------------------------


def readme_sequence(text: str) -> list[list[str]]:
    """The commands of the first ``bash`` block of the README's "Command line" section, each split as a shell
    would (comments dropped); every one must be an ``embedrl`` command."""
    section = re.search(r"^## Command line\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert section, "README.md has no '## Command line' section"
    block = re.search(r"^```bash\n(.*?)^```", section.group(1), flags=re.S | re.M)
    assert block, "the README's 'Command line' section has no ```bash block"
    commands = [c for c in (shlex.split(line, comments=True) for line in block.group(1).splitlines()) if c]
    assert commands, "the README's command block is empty"
    for command in commands:
        assert command[0] == "embedrl", f"not an embedrl command in the README's sequence: {shlex.join(command)}"
    return commands


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def command_name(argv: Sequence[str]) -> str:
    """``["eval", "world", "--config", …]`` -> ``"eval world"``: the subcommand words that start ``argv``."""
    parser, words = build_parser(), []
    for word in argv:
        subs = _subcommands(parser)
        if word not in subs:
            break
        parser, words = subs[word], [*words, word]
    return " ".join(words)


def all_parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``(command words, parser)`` for the root parser and every subcommand, depth first."""
    stack = [("", build_parser())]
    while stack:
        name, parser = stack.pop()
        yield name, parser
        stack += [(f"{name} {word}".strip(), sub) for word, sub in _subcommands(parser).items()]


def config_options(parser: argparse.ArgumentParser) -> tuple[type | None, list[str]]:
    """The stage config class of a subcommand (from its "<Class> keys" option group) and its config keys."""
    for group in parser._action_groups:
        match = re.fullmatch(r"(\w+) keys \(override the YAML\)", group.title or "")
        if match:
            keys = [a.dest.removeprefix("cfg:") for a in group._group_actions if a.dest.startswith("cfg:")]
            return getattr(config_module, match.group(1)), keys
    return None, []


def test_readme_block_reader() -> None:
    text = (
        "## Command line\n\nintro\n\n```bash\nembedrl a --x 'b c'   # note\n\nembedrl d\n```\n\n"
        "```bash\nembedrl e\n```\n## Next\n"
    )
    assert readme_sequence(text) == [["embedrl", "a", "--x", "b c"], ["embedrl", "d"]]
    with pytest.raises(AssertionError, match="not an embedrl command"):
        readme_sequence("## Command line\n```bash\npython x.py\n```\n## Next\n")
    assert command_name(["eval", "world", "--config", "x"]) == "eval world"
    assert command_name(["search", "--index", "i", "q"]) == "search"


# ----------------------------------------------------------------------------------------------------------------
# 1. The README's command sequence, as written
# ----------------------------------------------------------------------------------------------------------------

# What the test appends to each README command (by its command words) to run it at tiny size: sizes, step counts,
# and a subset of the world's tasks for eval world. The commands, their config files and paths are the README's.
# A README command not listed here fails the test: add its entry.
TINY: dict[str, list[str]] = {
    "backbone tiny": [],
    "world generate": ["--size", "tiny"],
    "world stats": [],
    "train-embedder": ["--max_steps", "2", "--sub_batch_size", "4", "--warmup_steps", "0", "--save_every", "2"],
    "train-reasoner": ["--max_steps", "2", "--batch_size", "2", "--warmup_steps", "0"],
    "rl": ["--max_steps", "1", "--num_generations", "2", "--pairs_per_step", "2", "--max_new_tokens", "8"],
    "eval world": ["--tasks", "world_cls,world_t2v,world_doc", "--show_progress_bar", "false"],
    "eval summarize": [],
    "index build": ["--max_new_tokens", "8", "--show_progress_bar", "false"],
    "search": [],
}


@pytest.mark.slow  # the whole method at tiny size: 40-70 s on the shared 2-core machine (load 8-11)
def test_readme_command_sequence_runs_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    """Every command of the README's sequence, in order, in a fresh folder holding a copy of configs/: each exits 0
    and reads what the ones before it wrote (the README's paths and the shipped configs agree)."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    commands = readme_sequence(README.read_text())
    names = [command_name(c[1:]) for c in commands]
    unknown = [n for n in names if n not in TINY]
    assert not unknown, f"README commands without a tiny-size entry in TINY: {unknown}"
    assert {"train-embedder", "train-reasoner", "rl", "eval world", "eval summarize", "search"} <= set(names)
    outputs, seconds = {}, {}
    for name, command in zip(names, commands, strict=True):
        start = time.perf_counter()
        code = main([*command[1:], *TINY[name]])
        seconds[name] = round(time.perf_counter() - start, 1)
        out = capsys.readouterr()
        assert code == 0, f"`{shlex.join(command)}` exited {code}: {out.err[-2000:]}"
        outputs[name] = out.out
    with capsys.disabled():
        print(f"\nREADME sequence, seconds per command: {seconds}")

    # eval summarize read eval world's leaderboard.json and agrees with the summary eval world wrote next to it.
    board = Path(commands[names.index("eval summarize")][-1])
    expected = json.loads((board.parent / "summary.json").read_text())["summary"]
    assert f"| **All** | 3 | **{expected['overall']:.2f}** |" in outputs["eval summarize"]
    # search prints each hit's image path (world_t2i's candidates are images), and the paths exist.
    rows = [line.split() for line in outputs["search"].splitlines() if re.match(r"\s+\d+\s+-?\d+\.\d{4}\s", line)]
    assert len(rows) == 5 and all(row[3] == "image" and Path(row[4]).is_file() for row in rows), rows


# ----------------------------------------------------------------------------------------------------------------
# 2. Options are spelled in full
# ----------------------------------------------------------------------------------------------------------------


def test_every_parser_refuses_abbreviations() -> None:
    parsers = dict(all_parsers())
    assert {"", "rl", "eval world", "index build", "search"} <= set(parsers)
    assert [name for name, parser in parsers.items() if parser.allow_abbrev] == []


@pytest.mark.parametrize(
    ("argv", "wrong"),
    [
        (["rl", "--max_step", "2"], "--max_step"),
        (["eval", "world", "--task", "world_cls"], "--task"),
        (["search", "q", "--index", "x", "--js"], "--js"),
        (["--verb", "demo"], "--verb"),
    ],
)
def test_an_abbreviated_option_is_an_error(argv: list[str], wrong: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {wrong}" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# 3. One list syntax for every list-valued key
# ----------------------------------------------------------------------------------------------------------------


def list_keys() -> list[tuple[str, type, str]]:
    """``(command, config class, key)`` for every list-valued config key of every subcommand."""
    found = []
    for name, parser in all_parsers():
        cls, keys = config_options(parser)
        for key in keys:
            if cls is not None and config_module._list_item_type(config_module._field_type(cls, key)) is not None:
                found.append((name, cls, key))
    return found


def test_list_keys_are_found() -> None:
    found = {(name, key) for name, _, key in list_keys()}
    expected = {("eval world", "tasks"), ("eval mmeb", "tasks"), ("eval uvrb", "tasks"), ("convert", "only"),
                ("train-embedder", "lora.targets"), ("filter", "exclude_from_contrastive"),
                ("rl", "report_to")}  # fmt: skip
    assert expected <= found, expected - found


@pytest.mark.parametrize(("command", "cls", "key"), list_keys(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_list_key_takes_commas_and_yaml_lists(command: str, cls: type, key: str) -> None:
    """Through the real parser: ``--key a,b`` and ``--key '[a, b]'`` reach the config as the same list."""
    values = ["tensorboard", "wandb"] if key == "report_to" else ["alpha", "beta"]
    for spelling in (",".join(values), " , ".join(values) + ",", f"[{', '.join(values)}]"):
        args = build_parser().parse_args([*command.split(), f"--{key}", spelling])
        raw = getattr(args, f"cfg:{key}")
        assert config_module.parse_override(raw, config_module._field_type(cls, key)) == values, spelling
    args = build_parser().parse_args([*command.split(), f"--{key}", values[0]])
    assert config_module.parse_override(getattr(args, f"cfg:{key}"), config_module._field_type(cls, key)) == values[:1]


def test_eval_world_tasks_and_report_to_take_commas_end_to_end() -> None:
    """The two cases of the issue through ``config_from_args``: the validated config holds the lists."""
    argv = ["eval", "world", "--world", "w", "--embedder", "e", "--out", "o", "--tasks", "world_cls,world_t2i"]
    assert config_from_args(config_module.EvalConfig, build_parser().parse_args(argv)).tasks == [
        "world_cls",
        "world_t2i",
    ]
    argv = [
        "rl",
        "--reasoner",
        "r",
        "--embedder",
        "e",
        "--data",
        "d",
        "--out",
        "o",
        "--report_to",
        "tensorboard,wandb",
    ]
    cfg = config_from_args(config_module.GRPOTrainConfig, build_parser().parse_args(argv))
    assert cfg.report_to == ["tensorboard", "wandb"] and cfg.trackers == ["tensorboard", "wandb"]


def test_comma_lists_are_validated_like_yaml_lists() -> None:
    @dataclass
    class Tracked(TrackingFields):
        def __post_init__(self) -> None:
            self._check_tracking()

    assert load_config(Tracked, None, {"report_to": "tensorboard,wandb"}).report_to == ["tensorboard", "wandb"]
    assert load_config(Tracked, None, {"report_to": "[none]"}).report_to == ["none"]
    with pytest.raises(config_module.ConfigError, match=r"unknown tracker\(s\) \['tensorbord'\]"):
        load_config(Tracked, None, {"report_to": "tensorbord,wandb"})
    # A non-list key keeps its comma: it is not split.
    cfg = load_config(config_module.WorldConfig, None, {"out": "runs/a,b"})
    assert cfg.out == "runs/a,b"


# ----------------------------------------------------------------------------------------------------------------
# 4. eval summarize reads our own leaderboard files
# ----------------------------------------------------------------------------------------------------------------


class HashEncoder:
    """Fixed pseudo-random unit vectors per item id: any ranking, no model."""

    def encode(self, items: Sequence[Item], batch_size: int = 32, show_progress_bar: bool | None = None, mode=None):
        rows = [np.random.default_rng(zlib.crc32(it.id.encode())).standard_normal(16) for it in items]
        return np.stack([r / np.linalg.norm(r) for r in rows]).astype(np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedrl.world.generate import generate_world

    return generate_world(config_module.WorldConfig(out=str(tmp_path_factory.mktemp("world") / "w"), size="tiny"))


def test_summarize_reads_eval_worlds_leaderboard(world: Path, tmp_path: Path, capsys) -> None:
    from embedrl.world.evaluate import WorldEvaluator

    tasks = ["world_cls", "world_vqa", "world_t2v", "world_doc"]
    WorldEvaluator(world, tasks, mode="raw", tcot_source="none", out_dir=tmp_path).evaluate(
        HashEncoder(), embedder_id="hash"
    )
    written = json.loads((tmp_path / "summary.json").read_text())["summary"]
    assert main(["eval", "summarize", str(tmp_path / "leaderboard.json"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["benchmark"] == "embedrl-world" and summary["partial"] and len(summary["missing"]) == 7
    assert summary["overall"] == pytest.approx(written["overall"])
    assert summary["modality"] == pytest.approx(written["modality"])
    assert {t: v["score"] for t, v in summary["tasks"].items()} == pytest.approx(
        {t: v["score"] for t, v in written["tasks"].items()}
    )
    assert summary["tasks"]["world_doc"]["metric"] == "ndcg_linear@5"
    assert main(["eval", "summarize", str(tmp_path / "leaderboard.json")]) == 0
    text = capsys.readouterr().out
    assert f"| **All** | 4 | **{written['overall']:.2f}** |" in text and "## embedrl-world summary" in text
    assert "**Partial result**: no score for world_grounding" in text


def test_summarize_of_our_leaderboard_without_main_metrics_names_the_file(tmp_path: Path, capsys) -> None:
    board = tmp_path / "board.json"
    scores = dict.fromkeys(SCORE_KEYS[:-2], 0.5) | {"num_pred": 4, "num_data": 4}
    board.write_text(json.dumps({"metadata": {"benchmark": "embedrl-world"}, "metrics": {"image": {"t": scores}}}))
    assert main(["eval", "summarize", str(board)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("embedrl: error: ") and "board.json: metadata.main_metrics names no main metric" in err


def test_summarize_reads_eval_mmebs_partial_and_limited_leaderboard(tmp_path: Path, capsys) -> None:
    """``eval mmeb --tasks K700,MSVD --limit 5`` writes a partial leaderboard with 5 queries per dataset."""
    scores = dict.fromkeys(SCORE_KEYS[:-2], 0.25) | {"num_pred": 5, "num_data": 5}
    meta = {"model_name": "m", "benchmark_version": "v2.1",
            "split_versions": {"ViDoSeek-page": "fixed", "MMLongBench-page": "fixed"}, "limit": 5}  # fmt: skip
    path = write_leaderboard(tmp_path / "leaderboard.json", {"K700": scores, "MSVD": scores}, meta, partial=True)
    assert main(["eval", "summarize", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["partial"] and len(summary["missing"]) == len(MMEB_V2_DATASETS) - 2
    assert summary["overall"] == pytest.approx(25.0) and summary["limit"] == 5
    assert main(["eval", "summarize", str(path)]) == 0
    assert "**Limited run**: at most 5 queries per dataset" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# 5. --version
# ----------------------------------------------------------------------------------------------------------------


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"embedrl {embedrl.__version__}"


# ----------------------------------------------------------------------------------------------------------------
# 6. search shows media paths
# ----------------------------------------------------------------------------------------------------------------


def test_search_prints_image_and_frame_paths(embedder_dir: Path, tmp_path: Path, capsys) -> None:
    media = tmp_path / "media"
    media.mkdir()
    for name, colour in [("red", "red"), ("f0", "blue"), ("f1", "navy")]:
        Image.new("RGB", (32, 32), colour).save(media / f"{name}.png")
    records = [
        {"id": "img", "instruction": "Represent the image.", "images": ["media/red.png"]},
        {"id": "vid", "instruction": "Represent the video.", "frames": ["media/f0.png", "media/f1.png"]},
        {"id": "txt", "text": "a red square"},
    ]
    write_jsonl(tmp_path / "corpus.jsonl", records)
    index = tmp_path / "index"
    build = ["index", "build", "--model", str(embedder_dir), "--corpus", str(tmp_path / "corpus.jsonl"),
             "--out", str(index), "--mode", "raw", "--tcot_source", "none", "--reasoner", "",
             "--show_progress_bar", "false"]  # fmt: skip
    assert main(build) == 0
    assert main(["search", "--index", str(index), "a red square", "-k", "3"]) == 0
    lines = {line.split()[2]: line for line in capsys.readouterr().out.splitlines() if re.match(r"\s+\d+\s", line)}
    assert set(lines) == {"img", "vid", "txt"}
    assert f"  img  image {media / 'red.png'}  Represent the image." in lines["img"]
    assert f"  vid  frames {media / 'f0.png'} … {media / 'f1.png'} (2)  Represent the video." in lines["vid"]
    assert lines["txt"].endswith("  txt  a red square")
