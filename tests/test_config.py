"""Config files, colon arguments and --config overrides."""

import pathlib

import pytest

from usmqs import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_parse_arg():
    assert config_lib.parse_arg("policy=int4+2:4,runlocal") == {
        "policy": "int4+2:4",
        "runlocal": True,
    }
    assert config_lib.parse_arg(None) == {}


def test_tiny_config_loads_and_overrides_typecheck():
    cfg = config_lib.load_config(str(ROOT / "configs/tiny.py") + ":policy=int4")
    assert cfg.policy.name == "int4"
    config_lib.apply_overrides(cfg, ["train.num_steps=7", "train.learning_rate=1", "eval.decoder=beam"])
    assert cfg.train.num_steps == 7 and cfg.train.learning_rate == 1.0
    assert isinstance(cfg.train.learning_rate, float)
    with pytest.raises(KeyError, match="train.num_stepz"):
        config_lib.apply_overrides(cfg, ["train.num_stepz=3"])
    with pytest.raises(KeyError, match="nope"):
        config_lib.apply_overrides(cfg, ["nope.x=3"])
    with pytest.raises(ValueError, match="train.num_steps"):
        config_lib.apply_overrides(cfg, ["train.num_steps=abc"])


def test_locked_config_rejects_new_keys():
    cfg = config_lib.load_config(str(ROOT / "configs/tiny.py"))
    with pytest.raises(AttributeError):
        cfg.train.num_stepz = 3


def test_split_overrides():
    rest, ov = config_lib.split_overrides(["train", "--config", "c.py", "--config.seed=3"])
    assert rest == ["train", "--config", "c.py"] and ov == ["seed=3"]
