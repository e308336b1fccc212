"""Perception pre-training of the tiny backbone (embedrl.world.pretrain) and the shipped pretrained checkpoint."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from embedrl.backbones import instruct_backbone, load_backbone, perception_backbone
from embedrl.cli import main
from embedrl.config import BackbonePretrainConfig, ConfigError
from embedrl.models.reasoner import Reasoner
from embedrl.tcot import format_ok, parse_tcot
from embedrl.world import pretrain
from embedrl.world.pretrain import TASKS, pretrain_backbone, step_examples
from embedrl.world.scenes import COLOURS, SHAPES
from embedrl.world.tasks import Geometry

GEO = Geometry()


def _cfg(tmp_path, backbone, **kw) -> BackbonePretrainConfig:
    base = dict(backbone=str(backbone), out=str(tmp_path / "pre"), batch_size=4, max_steps=4, eval_every=0,
                eval_examples=2, save_every=2, warmup_steps=1)  # fmt: skip
    return BackbonePretrainConfig(**(base | kw))


def test_step_examples_depend_on_seed_and_step_only(tmp_path):
    cfg = BackbonePretrainConfig(backbone="b", out=str(tmp_path), batch_size=8)
    a, b = step_examples(cfg, 7, GEO), step_examples(cfg, 7, GEO)
    assert [(e.task, e.question, e.answer) for e in a] == [(e.task, e.question, e.answer) for e in b]
    assert [x.tobytes() for e in a for x in e.images] == [x.tobytes() for e in b for x in e.images]
    other = step_examples(cfg, 8, GEO)
    assert [(e.question, e.answer) for e in a] != [(e.question, e.answer) for e in other]


def test_task_weights_select_tasks(tmp_path):
    cfg = BackbonePretrainConfig(backbone="b", out=str(tmp_path), batch_size=16, task_weights={"crop": 1, "find": 0})
    assert cfg.task_weights == {"crop": 1.0}
    assert {e.task for e in step_examples(cfg, 1, GEO)} == {"crop"}


def test_answers_are_ground_truth():
    rng = random.Random(3)
    for _ in range(20):
        cell, find = TASKS["cell"](rng, GEO), TASKS["find"](rng, GEO)
        words = cell.answer.split()
        assert words[-1] in SHAPES and any(w in COLOURS for w in words)
        assert re.fullmatch(r"What is at \[\d+, \d+, \d+, \d+\]\?", cell.question)
        box = json.loads(find.answer)
        assert len(box) == 4 and all(v % 250 == 0 for v in box) and box[2] - box[0] == 250
        listing = TASKS["list"](rng, GEO)
        count, rest = listing.answer.split(" objects: ")
        assert len(rest.split(", ")) == ["zero", "one", "two", "three", "four", "five", "six", "seven"].index(count)
        event = TASKS["event"](rng, GEO)
        assert len(event.images) == GEO.num_frames and event.answer.startswith("in frame")
        assert TASKS["page"](rng, GEO).answer.split(";")[0].isupper()


def test_tcot_examples_are_teacher_tcots_under_family_prompts():
    rng = random.Random(5)
    families = set()
    for _ in range(40):
        ex = TASKS["tcot"](rng, GEO)
        prompt = ex.sft().prompt
        assert prompt is ex.prompt and prompt.family is not None
        families.add(prompt.family.name)
        content = prompt.messages[0]["content"]
        assert sum(c["type"] == "image" for c in content) == len(prompt.images) == len(ex.images)
        assert prompt.family.cue_key in content[-1]["text"]
        assert format_ok(ex.answer, prompt.family.cue_key, prompt.n_frames or None), ex.answer
        assert parse_tcot(ex.answer).answer
    assert len(families) >= 4  # queries and targets of text, image, video and document tasks


def test_judge_examples_point_at_the_matching_candidate():
    rng = random.Random(6)
    directions = set()
    for _ in range(30):
        ex = TASKS["judge"](rng, GEO)
        text = ex.sft().prompt.messages[0]["content"][-1]["text"]
        n = len(re.findall(r"^Candidate \d+( reasoning)?:", text, flags=re.M))
        assert n >= 2 and 1 <= int(ex.answer) <= n
        directions.add("Candidate 1 input" in text)
    assert directions == {True, False}  # both directions occur


def test_tcot_correct_compares_answers_only():
    ex = TASKS["tcot"](random.Random(8), GEO)
    answer = re.search(r"<answer>(.*)</answer>", ex.answer, flags=re.S).group(1)
    other_prose = (
        '<thinking>Other words. {"text_keywords": ["x"]}</thinking><rethink>r</rethink>'
        f"<answer>{answer.upper()}</answer>"
    )
    assert ex.correct(other_prose)
    assert not ex.correct(ex.answer.replace(answer, answer + " and more"))
    assert TASKS["crop"](random.Random(8), GEO).correct(" " + TASKS["crop"](random.Random(8), GEO).answer + "\n")


def test_instruct_step_examples_are_deterministic(tmp_path):
    cfg = BackbonePretrainConfig(backbone="b", out=str(tmp_path), batch_size=6, task_weights={"tcot": 1, "judge": 1})
    a, b = step_examples(cfg, 3, GEO), step_examples(cfg, 3, GEO)
    assert [(e.task, e.answer) for e in a] == [(e.task, e.answer) for e in b]
    assert [x.tobytes() for e in a for x in e.images] == [x.tobytes() for e in b for x in e.images]
    assert [e.sft().prompt.messages for e in a] == [e.sft().prompt.messages for e in b]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"task_weights": {"ocr": 1.0}}, "unknown task"),
        ({"task_weights": {"crop": 0.0}}, "at least one > 0"),
        ({"backbone": ""}, "backbone is empty"),
        ({"lr": 0.0}, "lr=0.0"),
    ],
)
def test_config_errors_name_the_problem(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        BackbonePretrainConfig(**({"backbone": "b", "out": str(tmp_path)} | override))


def _weights(path):
    model, _ = load_backbone(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_pretrain_changes_weights_and_resume_equals_uninterrupted(tmp_path, tiny_backbone_dir, monkeypatch):
    backbone = tiny_backbone_dir("qwen3-vl")
    start = _weights(backbone)
    full = pretrain_backbone(_cfg(tmp_path / "a", backbone))
    after = _weights(full)
    assert any(not torch.equal(start[k], after[k]) for k in start)
    record = json.loads((full / pretrain.PERCEPTION_FILE).read_text())
    assert set(record["exact_match"]) == set(BackbonePretrainConfig(backbone="b", out="o").task_weights)
    assert record["steps"] == 4
    losses = [json.loads(line)["train/loss"] for line in (tmp_path / "a" / "pre" / "metrics.jsonl").open()]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))

    # A run killed during step 4 (step 3 logged, the state of step 2 saved) and then rerun ends where the full run
    # did, and logs steps 3 and 4 once each.
    real = pretrain.step_examples

    def killed(cfg, step, geo):
        if step == 4:
            raise KeyboardInterrupt
        return real(cfg, step, geo)

    monkeypatch.setattr(pretrain, "step_examples", killed)
    with pytest.raises(KeyboardInterrupt):
        pretrain_backbone(_cfg(tmp_path / "b", backbone))
    pre = tmp_path / "b" / "pre"
    assert (pre / pretrain.STATE_FILE).is_file()
    assert [json.loads(line)["step"] for line in (pre / "metrics.jsonl").open()] == [1, 2, 3]
    (pre / (pretrain.STATE_FILE + ".tmp")).write_bytes(b"a killed save")
    monkeypatch.setattr(pretrain, "step_examples", real)
    resumed = pretrain_backbone(_cfg(tmp_path / "b", backbone, eval_every=1000))  # eval_every may change
    steps = [json.loads(line)["step"] for line in (pre / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]
    assert not list(pre.glob("*.tmp"))
    again = _weights(resumed)
    for k in after:
        torch.testing.assert_close(again[k], after[k], rtol=0, atol=1e-6)
    assert not (tmp_path / "b" / "pre" / pretrain.STATE_FILE).exists()


def test_shipped_perception_backbone_perceives():
    """The shipped checkpoint names fresh objects it never saw (greedy), far above chance (1/6 colour x 1/4 shape)."""
    path = perception_backbone()
    record = json.loads((path / pretrain.PERCEPTION_FILE).read_text())
    assert record["exact_match"]["crop"] >= 0.85 and record["exact_match"]["copy"] >= 0.85
    reasoner = Reasoner.from_pretrained(path)
    assert type(reasoner.model).__name__ == "Qwen3VLForConditionalGeneration"
    rng = random.Random(12345)
    examples = [TASKS["crop"](rng, GEO) for _ in range(16)]
    inputs = reasoner.chat_inputs([ex.sft().prompt for ex in examples])
    with torch.no_grad():
        out = reasoner.model.generate(**inputs, do_sample=False, max_new_tokens=8)
    texts = reasoner.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    correct = sum(text.strip() == ex.answer for ex, text in zip(examples, texts, strict=True))
    assert correct >= 13, list(zip([ex.answer for ex in examples], texts, strict=True))


def test_shipped_instruct_backbone_writes_tcots():
    """The shipped instruct-stage checkpoint writes well-formed T-CoTs for fresh world items (greedy), its record
    shows it gives the teacher's answer on a third of them, and it still names objects (perception replay)."""
    path = instruct_backbone()
    record = json.loads((path / pretrain.PERCEPTION_FILE).read_text())["exact_match"]
    assert record["tcot"] >= 0.3 and record["crop"] >= 0.8 and record["copy"] >= 0.7, record
    reasoner = Reasoner.from_pretrained(path)
    rng = random.Random(4321)
    examples = [TASKS["tcot"](rng, GEO) for _ in range(8)]
    inputs = reasoner.chat_inputs([ex.sft().prompt for ex in examples])
    with torch.no_grad():
        out = reasoner.model.generate(**inputs, do_sample=False, max_new_tokens=pretrain.EVAL_NEW_TOKENS["tcot"])
    texts = reasoner.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    well_formed = [
        format_ok(text, ex.prompt.family.cue_key, ex.prompt.n_frames or None)
        for ex, text in zip(examples, texts, strict=True)
    ]
    assert sum(well_formed) >= 7, texts


def test_cli_pretrain_prints_scores(tmp_path, tiny_backbone_dir, capsys):
    out = tmp_path / "cli"
    args = ["backbone", "pretrain", "--backbone", str(tiny_backbone_dir("qwen3-vl")), "--out", str(out),
            "--max_steps", "2", "--batch_size", "2", "--eval_every", "0", "--eval_examples", "2",
            "--task_weights", '{"crop": 1, "copy": 1}']  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy: copy" in printed and "crop" in printed
    saved = json.loads((out / "final" / "pretrain_config.json").read_text())
    assert saved["config"]["task_weights"] == {"crop": 1.0, "copy": 1.0}


def _pretrain_argv(backbone, out, *extra: str) -> list[str]:
    return ["backbone", "pretrain", "--backbone", str(backbone), "--out", str(out), "--max_steps", "2",
            "--batch_size", "2", "--eval_every", "0", "--eval_examples", "2", "--save_every", "1",
            "--task_weights", '{"crop": 1, "copy": 1}', *extra]  # fmt: skip


def _error_line(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one stderr line, which is returned."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("embedrl: error: "), lines
    return lines[0]


def test_cli_refuses_a_used_out_unless_same_config_or_overwrite(tmp_path, tiny_backbone_dir, capsys):
    backbone, out = tiny_backbone_dir("qwen3-vl"), tmp_path / "pre"
    assert main(_pretrain_argv(backbone, out)) == 0
    final = (out / "final" / pretrain.PERCEPTION_FILE).stat().st_mtime_ns
    line = _error_line(capsys, _pretrain_argv(backbone, out, "--resume", "false"))
    assert f"output folder is not empty ({out}): pass --resume true" in line
    line = _error_line(capsys, _pretrain_argv(backbone, out, "--lr", "0.5", "--seed", "3"))
    assert "config differs from the run being resumed in lr, seed (" in line and "--overwrite true" in line
    assert (out / "final" / pretrain.PERCEPTION_FILE).stat().st_mtime_ns == final  # nothing was touched
    (out / (pretrain.STATE_FILE + ".tmp")).write_bytes(b"a killed save")
    assert main(_pretrain_argv(backbone, out, "--resume", "false", "--lr", "0.5", "--overwrite", "true")) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()] == [1, 2]
    assert not list(out.glob("*.tmp")) and not (out / pretrain.STATE_FILE).exists()
    assert json.loads((out / "config.json").read_text())["config"]["lr"] == 0.5
