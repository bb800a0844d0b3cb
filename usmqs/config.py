"""Experiment configs: `get_config(arg)` files, `--config.key=value` overrides, validation.

A config file is a Python module with `get_config(arg: str | None) -> ConfigDict`; the
colon argument (``configs/tiny.py:policy=int4+2:4,runlocal``) selects structural choices
as comma-separated ``key=value`` or bare flags. Single values are overridden with
``--config.a.b=value`` (parsed as the type of the existing value). The config is locked,
so an unknown key is an error that names the key.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import ml_collections


# The N:M options of a named policy (config.policy keys, `train.make_policy`) and their
# defaults: masks one-shot at step 0, gradient only to kept weights.
NAMED_PRUNING_DEFAULTS = {"mask_every": 0, "prune_grad": "masked", "srste_lambda": 2e-4}


def parse_arg(arg: str | None) -> dict[str, str | bool]:
    """``"policy=int4+2:4,runlocal"`` -> ``{"policy": "int4+2:4", "runlocal": True}``."""
    out: dict[str, str | bool] = {}
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        out[key.strip()] = value.strip() if sep else True
    return out


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load ``path/to/file.py[:arg]``, call its ``get_config(arg)`` and lock the result."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"usmqs_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: has no get_config(arg) function")
    config = module.get_config(arg or None)
    config.lock()
    return config


def _parse_value(raw: str, current, key: str):
    if isinstance(current, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"--config.{key}: expected a boolean, got {raw!r}")
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if current is None:
            return raw
        raise ValueError(f"--config.{key}: cannot parse {raw!r} as {type(current).__name__}")
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if current is not None and not isinstance(value, type(current)):
        raise ValueError(
            f"--config.{key}: expected {type(current).__name__}, got {raw!r}"
        )
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Apply ``["a.b=1", ...]`` (the text after ``--config.``); unknown keys raise."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--config.{item}: expected --config.key=value")
        node = config
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part not in node:
                raise KeyError(f"--config.{key}: unknown key {'.'.join(parts[: i + 1])!r}")
            node = node[part]
        leaf = parts[-1]
        if leaf not in node:
            raise KeyError(f"--config.{key}: unknown key {key!r}")
        node[leaf] = _parse_value(raw, node[leaf], key)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config.x=v`` items from the other command-line arguments."""
    rest, overrides = [], []
    for a in argv:
        if a.startswith("--config.") and "=" in a:
            overrides.append(a[len("--config."):])
        else:
            rest.append(a)
    return rest, overrides


def base_config(preset: str) -> ml_collections.ConfigDict:
    """The full set of keys every experiment has; config files adjust values."""
    from usmqs import distributed, sharding
    from usmqs.data import pipeline
    from usmqs.models import presets

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.label = ""  # shown in progress lines (the study names its settings here)
    c.init_from = ""  # another run's workdir: start from its float weights
    c.model = presets.get_preset(preset)
    c.data = pipeline.default_data_config()
    with c.data.unlocked():
        c.data.synth_dir = "~/.cache/usmqs/corpus"  # embedded corpus, used when no manifest
        c.data.synth_num_train = 0  # 0 = the synthesizer's default size
        c.data.synth_num_test = 0
        c.data.synth_num_dev = 0
        c.data.synth_seed = 0
        c.data.cache_dir = ""  # prepared features; '' = WORKDIR/data_cache
    c.train = ml_collections.ConfigDict(
        dict(
            num_steps=1000,
            learning_rate=2e-3,
            warmup_steps=200,
            end_lr_ratio=0.05,
            weight_decay=1e-3,
            grad_clip=5.0,
            # Distillation from the init_from float run (frame-level KL of the CTC
            # posteriors): loss = (1 - w)·CTC + w·T²·KL. 0 = off.
            distill_weight=0.0,
            distill_temperature=1.0,
            log_every=20,
            checkpoint_every=200,
            keep_checkpoints=2,
        )
    )
    # name: a named setting (DESIGN.md) or, with rules, the label of a custom policy.
    # runtime: compile the named setting's bits and N:M as runtime values, so that every
    # named setting (float included) runs the same compiled program (the study uses it).
    # mask_every, prune_grad, srste_lambda: the N:M rule of a named policy: masks
    # recomputed every k steps (0: one-shot at step 0), gradient to pruned weights
    # ("masked", "ste", "srste") and SR-STE's decay (custom rules carry their own).
    c.policy = ml_collections.ConfigDict(dict(name="float", rules=(), runtime=False, **NAMED_PRUNING_DEFAULTS))
    # at_end: decode the eval (test) split after training; dev: the dev split too, when
    # there is one (the embedded corpus has one; else data.dev_manifest).
    c.eval = ml_collections.ConfigDict(dict(decoder="greedy", beam_size=8, at_end=True, dev=True))
    c.mesh = sharding.mesh_config()
    c.distributed = distributed.distributed_config()  # multi-process start-up
    return c

