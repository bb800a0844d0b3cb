"""Config files, declared colon arguments, --config overrides, validation, saved configs."""

import pathlib
import re

import pytest

from conftest import disk_full_for, listing
from usmqs import config as config_lib
from usmqs import storage
from usmqs.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def test_parse_arg_reads_declared_arguments_with_their_types():
    args = config_lib.parse_arg("policy=int4+2:4,runlocal,devices=8", policy="float", runlocal=False, devices=64)
    assert (args.policy, args.runlocal, args.devices) == ("int4+2:4", True, 8)
    defaults = config_lib.parse_arg(None, policy="float", runlocal=False)
    assert (defaults.policy, defaults.runlocal) == ("float", False)
    with pytest.raises(ConfigError, match="unknown colon argument 'polcy'"):
        config_lib.parse_arg("polcy=int4", policy="float")
    with pytest.raises(ConfigError, match="'devices'.*int"):
        config_lib.parse_arg("devices=many", devices=64)
    with pytest.raises(ConfigError, match="'policy' needs a value"):
        config_lib.parse_arg("policy", policy="float")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_rejects_an_unknown_colon_argument(path):
    config_lib.load(str(path))  # loads and validates as shipped
    with pytest.raises(ConfigError, match=rf"{path.name}.*unknown colon argument 'polcy'"):
        config_lib.load(f"{path}:polcy=int4+2:4")


def test_overrides_typecheck_and_unknown_keys_fail():
    cfg = config_lib.load(str(ROOT / "configs/tiny.py") + ":policy=int4",
                          ["train.num_steps=7", "train.learning_rate=1", "eval.decoder=beam"])
    assert cfg.policy.name == "int4" and cfg.train.num_steps == 7
    assert isinstance(cfg.train.learning_rate, float) and cfg.train.learning_rate == 1.0
    with pytest.raises(KeyError, match="train.num_stepz"):
        config_lib.apply_overrides(cfg, ["train.num_stepz=3"])
    with pytest.raises(KeyError, match="nope"):
        config_lib.apply_overrides(cfg, ["nope.x=3"])
    with pytest.raises(ValueError, match="train.num_steps"):
        config_lib.apply_overrides(cfg, ["train.num_steps=abc"])
    with pytest.raises(AttributeError):  # locked: a typo in code fails too
        cfg.train.num_stepz = 3


@pytest.mark.parametrize("override, key", [
    ("data.num_mel_bins=128", "data.num_mel_bins"),  # the model reads 80
    ("data.subsampling_factor=8", "data.subsampling_factor"),  # the encoder has 4x
    ("data.train_manifest=/x.jsonl", "data.train_manifest"),  # eval manifest missing
    ("data.max_frames=9999", "data.max_frames"),
    ("train.distill_weight=0.5", "train.distill_weight"),  # needs init_from
    ("train.distill_weight=1.5", "train.distill_weight"),
    ("train.distill_temperature=0.0", "train.distill_temperature"),
    ("train.distill_hidden_weight=0.5", "train.distill_hidden_weight"),  # needs init_from
    ("train.distill_hidden_weight=-0.1", "train.distill_hidden_weight"),
    ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("train.learning_rate=-1.0", "train.learning_rate"),
    ("eval.decoder=viterbi", "eval.decoder"),
    ("policy.name=int3", "policy.name"),
    ("policy.prune_grad=sr-ste", "policy.prune_grad"),
    ("policy.mask_every=-1", "policy.mask_every"),
])
def test_validation_names_the_bad_key(override, key):
    with pytest.raises(ConfigError, match=key):
        config_lib.load(str(ROOT / "configs/tiny.py"), [override])


def test_saved_config_reloads_equal(tmp_path):
    cfg = config_lib.load(str(ROOT / "configs/tiny.py") + ":policy=int4+2:4", ["policy.mask_every=50"])
    config_lib.save(cfg, tmp_path)
    back = config_lib.load_saved(tmp_path)
    assert back.to_dict() == cfg.to_dict()  # tuples come back as tuples
    assert config_lib.load_saved(tmp_path, ["seed=3"]).seed == 3
    with pytest.raises(FileNotFoundError, match="config.json"):
        config_lib.load_saved(tmp_path / "nowhere")


def test_a_saved_config_from_before_newer_data_keys_reads_as_before_them(tmp_path):
    import json

    from usmqs import run
    from usmqs.data import pipeline

    cfg = config_lib.load(str(ROOT / "configs/tiny.py"))
    old = cfg.to_dict()
    del old["data"]["features_on_device"], old["data"]["standardize_audio"]
    (tmp_path / config_lib.SAVED_CONFIG_FILE).write_text(json.dumps(old))
    back = config_lib.load_saved(tmp_path)
    assert [k for k, _ in run.batch_layout(back)] == ["features", "feature_mask", "labels", "label_mask"]
    assert back.data.standardize_audio is False and not pipeline.feature_config(back.data).standardize_audio
    with pytest.raises(ConfigError, match="features_on_device"):
        old["data"]["features_on_device"] = "yes"
        (tmp_path / config_lib.SAVED_CONFIG_FILE).write_text(json.dumps(old))
        config_lib.load_saved(tmp_path)


def test_a_config_save_on_a_full_disk_keeps_the_saved_one(tmp_path, monkeypatch):
    cfg = config_lib.load(str(ROOT / "configs/tiny.py"))
    config_lib.save(cfg, tmp_path)
    before = (tmp_path / "config.json").read_text()
    cfg.seed = 3
    disk_full_for(monkeypatch, "config.json")
    path = re.escape(str(tmp_path / "config.json"))
    with pytest.raises(storage.WriteError, match=f"cannot write the run's config to {path}: "
                       r"no space left on device \(.* MiB free of .* MiB on that filesystem\)"):
        config_lib.save(cfg, tmp_path)
    assert (tmp_path / "config.json").read_text() == before
    assert listing(tmp_path) == ["config.json"]


def test_split_overrides():
    rest, ov = config_lib.split_overrides(["train", "--config", "c.py", "--config.seed=3"])
    assert rest == ["train", "--config", "c.py"] and ov == ["seed=3"]


def test_a_saved_study_run_config_from_before_study_budgets_loads(tmp_path):
    import json

    cfg = config_lib.load(str(ROOT / "configs/study_demo.py:full"))
    old = cfg.to_dict()
    del old["study"]["budgets"], old["study"]["finetune"]["distill_temperature"]
    (tmp_path / config_lib.SAVED_CONFIG_FILE).write_text(json.dumps(old))
    back = config_lib.load_saved(tmp_path)
    assert back.study.budgets == () and back.study.finetune.distill_temperature is None
    assert back.study.finetune.distill_weight == 0.5 and back.study.finetune_steps == cfg.study.finetune_steps
