"""Stage configs: YAML -> dataclass -> YAML round trips, and errors that name the bad key."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml

from embedrl.config import (
    STAGE_CONFIGS,
    BackbonePretrainConfig,
    ConfigError,
    EmbedderTrainConfig,
    GRPOTrainConfig,
    TinyBackboneConfig,
    WorldConfig,
    check_run_dir,
    config_from_dict,
    config_to_dict,
    load_config,
    read_saved_config,
    save_config,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(WorldConfig, None, {"out": "w", "seed": "7", "teacher.wrong_box": "0.35", "size": "tiny"})
    assert cfg.seed == 7 and cfg.teacher.wrong_box == 0.35 and cfg.size == "tiny"
    path = tmp_path / "world.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    again = load_config(WorldConfig, path)
    assert again == cfg


def test_saved_config_reads_back(tmp_path: Path) -> None:
    cfg = TinyBackboneConfig(family="qwen2-vl", out="x", seed=3)
    path = save_config(cfg, tmp_path)
    assert json.loads(path.read_text())["config"]["family"] == "qwen2-vl"
    assert read_saved_config(TinyBackboneConfig, tmp_path) == cfg
    with pytest.raises(ConfigError, match="holds a TinyBackboneConfig config, not WorldConfig"):
        read_saved_config(WorldConfig, tmp_path)


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) sead for WorldConfig; valid keys: .*seed"):
        config_from_dict(WorldConfig, {"out": "w", "sead": 1})


def test_unknown_nested_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) teacher\.wrong_boxes"):
        load_config(WorldConfig, None, {"out": "w", "teacher.wrong_boxes": "0.1"})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"out": "w", "seed": "three"}, r"seed='three' must be an integer; got str"),
        ({"out": "w", "seed": 1.5}, r"seed=1.5 must be an integer"),
        ({"out": "w", "seed": True}, r"seed=True must be an integer"),
        ({"out": "w", "size": "huge"}, r"size='huge' is not allowed; use one of 'tiny', 'small', 'default'"),
        ({"out": "w", "teacher": 3}, r"teacher must be a mapping of TeacherNoiseConfig fields"),
        ({"out": "w", "teacher": {"verbose": "x"}}, r"teacher.verbose='x' must be a number"),
        ({"out": 5}, r"out=5 must be a string"),
    ],
)
def test_wrong_type_is_named(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(WorldConfig, data)


def test_int_is_accepted_for_float() -> None:
    cfg = config_from_dict(WorldConfig, {"out": "w", "teacher": {"verbose": 1}})
    assert cfg.teacher.verbose == 1.0 and isinstance(cfg.teacher.verbose, float)


def test_cross_field_checks_say_how_to_fix() -> None:
    with pytest.raises(ConfigError, match="pass --out DIR"):
        WorldConfig()
    with pytest.raises(ConfigError, match="not a probability"):
        config_from_dict(WorldConfig, {"out": "w", "teacher": {"wrong_box": 1.5}})
    with pytest.raises(ConfigError, match="not a multiple of num_attention_heads"):
        TinyBackboneConfig(out="x", hidden_size=130)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(WorldConfig, tmp_path / "nope.yaml")


def test_override_values_are_read_as_yaml() -> None:
    cfg = load_config(TinyBackboneConfig, None, {"out": "x", "max_pixels": "4096", "min_pixels": "1024"})
    assert (cfg.min_pixels, cfg.max_pixels) == (1024, 4096)


def _leaf_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        if isinstance(value, dict):
            keys |= _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_validates_and_names_every_field(path: Path) -> None:
    stage = path.stem.split("-")[0]
    assert stage in STAGE_CONFIGS, f"{path.name}: name it after a stage in STAGE_CONFIGS ({sorted(STAGE_CONFIGS)})"
    cls = STAGE_CONFIGS[stage]
    cfg = load_config(cls, path)
    assert path.read_text().startswith("#"), f"{path.name} must start with a comment giving its launch command"
    # The YAML spells out every field, so a renamed or dead field shows up here.
    assert _leaf_keys(yaml.safe_load(path.read_text())) == _leaf_keys(config_to_dict(cfg))


def test_every_stage_config_field_has_help() -> None:
    def check(cls: type) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
            if dataclasses.is_dataclass(hints[f.name]):
                check(hints[f.name])

    for cls in STAGE_CONFIGS.values():
        check(cls)


def test_exponent_floats_from_the_command_line_are_numbers() -> None:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; float fields accept it, other strings stay errors."""
    cfg = load_config(
        GRPOTrainConfig,
        None,
        {"lr": "1e-4", "beta": "2.5E-3", "reasoner": "r", "embedder": "e", "data": "d", "out": "o"},
    )
    assert cfg.lr == 1e-4 and cfg.beta == 2.5e-3
    with pytest.raises(ConfigError, match="must be a number"):
        load_config(GRPOTrainConfig, None, {"lr": "fast", "reasoner": "r", "embedder": "e", "data": "d", "out": "o"})


def test_resume_counts_a_key_the_saved_config_lacks_as_its_default(tmp_path: Path) -> None:
    """check_run_dir: a run saved before a key existed (top level, or inside a section) resumes while the key keeps
    its default, and is refused, naming the key, once it does not; a saved dict field is not padded with defaults."""
    out = tmp_path / "run"
    cfg = BackbonePretrainConfig(backbone="b", out=str(out), task_weights={"crop": 1.0})
    path = save_config(cfg, out)
    payload = json.loads(path.read_text())
    del payload["config"]["threads"], payload["config"]["dtype"]
    path.write_text(json.dumps(payload))
    assert check_run_dir(cfg, out, resume=True, overwrite=False, leftovers=())
    with pytest.raises(ConfigError, match=r"differs from the run being resumed in dtype, task_weights\.cell \("):
        check_run_dir(dataclasses.replace(cfg, dtype="float32", task_weights={"crop": 1.0, "cell": 1.0}), out,
                      resume=True, overwrite=False, leftovers=())  # fmt: skip

    nested = EmbedderTrainConfig(backbone="b", data="d", out=str(tmp_path / "emb"))
    path = save_config(nested, nested.out)
    payload = json.loads(path.read_text())
    del payload["config"]["lora"]["vision_tower"]
    path.write_text(json.dumps(payload))
    assert check_run_dir(nested, nested.out, resume=True, overwrite=False, leftovers=())
    off = dataclasses.replace(nested, lora=dataclasses.replace(nested.lora, vision_tower=False))
    with pytest.raises(ConfigError, match=r"differs from the run being resumed in lora\.vision_tower \("):
        check_run_dir(off, nested.out, resume=True, overwrite=False, leftovers=())
