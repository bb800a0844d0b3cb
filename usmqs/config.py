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
import json
import pathlib
from collections.abc import Sequence

import ml_collections

from usmqs import distributed, sharding, storage
from usmqs.compress.allocate import SENSITIVITY_METHODS, mixed_name
from usmqs.compress.policy import NAMED_POLICIES, NAMED_PRUNING_DEFAULTS, PAPER_SETTINGS, policy_from_config
from usmqs.data import pipeline
from usmqs.models import presets
from usmqs.models.conformer import SUBSAMPLING_FACTOR

SAVED_CONFIG_FILE = "config.json"  # the resolved config of a run, in its workdir


class ConfigError(ValueError):
    """A bad config value, colon argument or override; the message names the key."""


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
    """The colon argument ``"policy=int4+2:4,runlocal"`` against its declaration.

    `spec` declares every argument with its default, whose type the value is parsed as:
    ``parse_arg(arg, policy="float", runlocal=False)``. A bare name sets a bool argument
    to True. An undeclared name or a value of the wrong type is a `ConfigError`.
    """
    out = ml_collections.ConfigDict(dict(spec))
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, raw = (x.strip() for x in part.partition("="))
        if key not in spec:
            raise ConfigError(f"unknown colon argument {key!r}; declared: {sorted(spec) or 'none'}")
        default = spec[key]
        if isinstance(default, bool):
            out[key] = _parse_value(raw, default, key, where="colon argument") if sep else True
        elif not sep:
            raise ConfigError(f"colon argument {key!r} needs a value: {key}=...")
        else:
            out[key] = _parse_value(raw, default, key, where="colon argument")
    out.lock()
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
    try:
        config = module.get_config(arg or None)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    config.lock()
    return config


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of ``path/to/file.py[:arg]`` with ``--config.`` `overrides`, validated."""
    config = load_config(spec)
    apply_overrides(config, overrides)
    validate(config)
    return config


def save(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
    """Write the resolved `config` to ``workdir/config.json`` (what `load_saved` reads),
    atomically (`storage.write_text_atomic`: a failed write keeps the previous file)."""
    path = pathlib.Path(workdir) / SAVED_CONFIG_FILE
    return storage.write_text_atomic(path, config.to_json_best_effort(indent=2) + "\n", "the run's config")


def load_saved(workdir: str | pathlib.Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was trained with (its ``config.json``), with
    `overrides`, validated. JSON lists come back as the tuples configs use. Data keys added
    since the run was saved take their defaults, which keep the behaviour from before
    they existed (``data.features_on_device``, ``data.standardize_audio``: False), and so
    do study keys (``study.budgets``: none)."""
    path = pathlib.Path(workdir) / SAVED_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{workdir}: no {SAVED_CONFIG_FILE} (not a training workdir?); pass --config")
    saved = _tuples(json.loads(path.read_text()))
    if isinstance(saved.get("data"), dict):
        saved["data"] = {**pipeline.default_data_config().to_dict(), **saved["data"]}
    if isinstance(saved.get("study"), dict):  # a study run's config, maybe from before study.budgets
        defaults = study_config().to_dict()
        saved["study"] = {**defaults, **saved["study"],
                          "finetune": {**defaults["finetune"], **saved["study"].get("finetune", {})}}
    config = ml_collections.ConfigDict(saved)
    config.lock()
    apply_overrides(config, overrides)
    validate(config)
    return config


def _tuples(x):
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def _parse_value(raw: str, current, key: str, where: str = "--config."):
    """`raw` parsed as the type of `current` (the existing value); errors name the key."""
    key = f"{where}{key}" if where.endswith(".") else f"{where} {key!r}"
    if isinstance(current, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key}: expected a boolean, got {raw!r}")
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if current is None:
            return raw
        raise ConfigError(f"{key}: cannot parse {raw!r} as {type(current).__name__}")
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(f"{key}: expected {type(current).__name__}, got {raw!r}")
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
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.label = ""  # shown in progress lines (the study names its settings here)
    c.init_from = ""  # another run's workdir: start from its float weights
    c.model = presets.get_preset(preset)
    c.data = pipeline.default_data_config()
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
            # Hidden-state distillation from the same float run: + w_h · the squared
            # distance between every block's output and the teacher's, over the teacher's
            # squared norm (valid frames; train.hidden_distill_loss). 0 = off.
            distill_hidden_weight=0.0,
            log_every=20,
            checkpoint_every=200,
            keep_checkpoints=2,
            # Stop with an error after this many consecutive updates skipped for a
            # non-finite loss or gradient (the last good checkpoint stays).
            max_consecutive_skips=100,
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



def study_config() -> ml_collections.ConfigDict:
    """The ``config.study`` block every study config starts from."""
    return ml_collections.ConfigDict(
        dict(
            # Policy NAMEs (`Policy.named`) to compress the baseline with; 'float' is not
            # one of them: the baseline and the float control always run.
            settings=PAPER_SETTINGS,
            # Size budgets, bits per weight of the compressed layers (values, N:M indices
            # and scales counted: `usmqs.compress.allocate`): each adds PTQ and QAT runs
            # named mixed@B whose policy is the allocation that minimizes the baseline's
            # probed sensitivity within B (`usmqs.sensitivity.allocate_run`), e.g. (3.0, 2.0).
            budgets=(),
            # How the allocation estimates each group's damage (`usmqs.sensitivity`):
            # "ptq" (probe: dev loss with that group compressed alone) or "fisher".
            sensitivity="ptq",
            # Fine-tuning budget of every QAT run and of the float control.
            finetune_steps=250,
            # The fine-tuning recipe of the QAT runs: each key replaces config.train's;
            # None keeps the float recipe's value.
            finetune=ml_collections.ConfigDict(
                dict(
                    learning_rate=None,  # peak LR: a fraction of the float baseline's
                    warmup_steps=None,  # short: the weights are already trained
                    end_lr_ratio=None,
                    weight_decay=None,
                    grad_clip=None,
                    distill_weight=None,  # > 0: distil from the baseline (train.py)
                    distill_temperature=None,
                    distill_hidden_weight=None,
                    log_every=None,
                    checkpoint_every=None,
                )
            ),
            # Fine-tune the float baseline with the same recipe and budget (qat/float).
            float_control=True,
            # Fine-tunes per setting (and control), with seeds config.seed + 0 ... k-1
            # (data order, SpecAugment, dropout): the table shows their mean ± sd. Seed
            # k > 0 runs in qat_seed<k>/<NAME>.
            finetune_seeds=1,
            # Learned quantization ranges (LSQ; `WeightSpec.learned_scale`) in every PTQ
            # and QAT run: each setting runs as custom rules with its quantized rules'
            # ranges trained (PTQ: the clip-searched ranges), compiled per setting (not
            # runtime values). Results keep the setting names.
            learned_scale=False,
            # Also decode every run from its packed export and check it gives the same WER.
            eval_export=False,
            # PTQ/QAT runs (and the float control) compile bits and N:M as runtime values
            # (`policy.runtime`): one train-step and one eval-step program for all of them.
            runtime_settings=True,
            # JAX persistent compilation cache; '' = WORKDIR/.jax_cache.
            compile_cache=True,
            compile_cache_dir="~/.cache/usmqs/jax",
        )
    )


# ---------------------------------------------------------------------------- validation


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _positive_int(value, key: str, minimum: int = 1) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    _check(ok, key, f"must be an int >= {minimum}, got {value!r}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Check every block and the invariants between blocks, once, where the config is
    loaded (`load`, `load_saved`) or handed to the training loop; a `ConfigError` names
    the key. The code that runs afterwards reads keys without re-checking them."""
    d, m, t = config.data, config.model, config.train
    try:
        pipeline.validate_data_config(d)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    _check(bool(d.train_manifest) == bool(d.eval_manifest), "data.train_manifest",
           "set both data.train_manifest and data.eval_manifest, or neither")
    _check(d.num_mel_bins == m.num_mel_bins, "data.num_mel_bins",
           f"{d.num_mel_bins} but the model reads model.num_mel_bins={m.num_mel_bins} features")
    _check(d.subsampling_factor == SUBSAMPLING_FACTOR, "data.subsampling_factor",
           f"{d.subsampling_factor} but the encoder subsamples time {SUBSAMPLING_FACTOR}x")
    for key in ("num_steps", "warmup_steps"):
        _positive_int(t[key], f"train.{key}", minimum=0)
    for key in ("log_every", "checkpoint_every", "keep_checkpoints", "max_consecutive_skips"):
        _positive_int(t[key], f"train.{key}")
    _check(t.learning_rate > 0, "train.learning_rate", f"must be > 0, got {t.learning_rate!r}")
    _check(0.0 <= t.distill_weight <= 1.0, "train.distill_weight", f"must be in [0, 1], got {t.distill_weight!r}")
    _check(not t.distill_weight or bool(config.init_from), "train.distill_weight",
           "> 0 needs init_from: the float run to distil from")
    _check(t.distill_temperature > 0, "train.distill_temperature", f"must be > 0, got {t.distill_temperature!r}")
    _check(t.distill_hidden_weight >= 0, "train.distill_hidden_weight",
           f"must be >= 0, got {t.distill_hidden_weight!r}")
    _check(not t.distill_hidden_weight or bool(config.init_from), "train.distill_hidden_weight",
           "> 0 needs init_from: the float run to distil from")
    _check(config.eval.decoder in ("greedy", "beam"), "eval.decoder",
           f"must be 'greedy' or 'beam', got {config.eval.decoder!r}")
    _positive_int(config.eval.beam_size, "eval.beam_size")
    try:
        policy_from_config(config.policy)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e
    if "study" in config:
        _validate_study(config)


def _validate_study(config: ml_collections.ConfigDict) -> None:
    """The ``study`` block (`study_config`) of a study config."""
    s = config.study
    settings = tuple(s.settings)
    unknown = [n for n in settings if n not in NAMED_POLICIES]
    if unknown:
        raise ConfigError(
            f"study.settings: unknown policy names {unknown}; known: {' '.join(NAMED_POLICIES)}"
        )
    if "float" in settings:
        raise ConfigError("study.settings: 'float' always runs (baseline + control); leave it out")
    if len(set(settings)) != len(settings):
        raise ConfigError(f"study.settings has duplicates: {settings}")
    if not isinstance(s.finetune_steps, int) or s.finetune_steps < 1:
        raise ConfigError(f"study.finetune_steps must be a positive int, got {s.finetune_steps!r}")
    seeds = s.finetune_seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"study.finetune_seeds must be a positive int, got {seeds!r}")
    bad = [k for k in s.finetune if k not in config.train or k == "num_steps"]
    if bad:
        raise ConfigError(
            f"study.finetune: {bad} are not config.train keys (num_steps is study.finetune_steps)"
        )
    budgets = tuple(s.budgets)
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 32 for b in budgets):
        raise ConfigError(f"study.budgets: bits per weight in (0, 32), got {budgets!r}")
    if s.sensitivity not in SENSITIVITY_METHODS:
        raise ConfigError(f"study.sensitivity must be one of {SENSITIVITY_METHODS}, got {s.sensitivity!r}")
    mixed = {mixed_name(b) for b in budgets}
    if len(mixed) != len(budgets):
        raise ConfigError(f"study.budgets has duplicates: {budgets!r}")
    # A study config compresses with named settings and budgets; a mixed@B run's config
    # (the study's own, `study.run_config`) carries its allocation's rules, and with
    # study.learned_scale a named setting's run its setting's rules.
    own_rules = mixed | (set(settings) if s.get("learned_scale") else set())
    if config.policy.rules and config.policy.name not in own_rules:
        raise ConfigError("the study compresses with named policies and study.budgets: leave policy.rules empty")

