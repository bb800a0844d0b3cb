"""Shared fixtures: a small synthesized corpus and a tiny-config factory."""

from __future__ import annotations

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


# configs/tiny.py:micro as overrides (tests/test_study.py still applies them).
TINY_OVERRIDES = (
    "data.batch_size=8", "data.vocab_size=40", "data.bucket_boundaries=(450,)", "data.max_frames=450",
    "train.warmup_steps=2", "model.num_layers=2", "model.model_dim=48", "model.num_heads=2",
    "model.ffn_dim=96", "model.subsample_channels=16", "model.conv_kernel_size=7", "mesh.data=1",
)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> dict[str, pathlib.Path]:
    """120 train + 24 test + 24 dev utterances of the embedded corpus (seconds to make)."""
    from usmqs.data import synth

    out = tmp_path_factory.mktemp("corpus")
    return synth.synthesize_corpus(out, num_train=120, num_test=24, num_dev=24, seed=0)


def tiny_config(corpus: dict, *, policy: str = "float", steps: int = 8, **model):
    """``configs/tiny.py:micro`` (2 layers, d=48, one length bucket) on `corpus`."""
    from usmqs import config as config_lib

    cfg = config_lib.load_config(f"{ROOT / 'configs/tiny.py'}:micro,policy={policy}")
    overrides = [
        f"data.train_manifest={corpus['train']}",
        f"data.eval_manifest={corpus['test']}",
        f"train.num_steps={steps}",
        "train.log_every=2",
        f"train.checkpoint_every={max(steps // 2, 1)}",
    ]
    overrides += [f"model.{k}={v}" for k, v in model.items()]
    config_lib.apply_overrides(cfg, overrides)
    return cfg
