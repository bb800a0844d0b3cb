"""Shared fixtures: a small synthesized corpus and a tiny-config factory."""

from __future__ import annotations

import contextlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUITE_JAX_CACHE = "USMQS_TEST_JAX_CACHE"  # names the test run's compilation cache
# XLA:CPU compiles the tests' programs without LLVM's optimization passes: a micro model's
# programs compile several times faster and run slower, which micro models do not notice
# (README "Tests and benchmarks" has the measurement). The programs' semantics are the same (no fast-math either
# way), so bitwise comparisons between programs hold as they do at the default level.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a process a test starts: the suite's flags, and `devices` fake CPU
    devices when given."""
    flags = TEST_XLA_FLAGS
    return flags if devices is None else f"{flags} --xla_force_host_platform_device_count={devices}"


# The test files that take longest, longest first (the suite's per-file times; README's
# "test suite" row names the longest). `make test` runs
# `--dist loadfile --no-loadscope-reorder`: whole files go to whichever worker is free, in
# this order, so no long file starts last and ends the run on one worker while the other
# idles (xdist's own order, most tests first, put three of these last). The files not named
# follow in collection order.
LONGEST_FIRST = (
    "tests/test_study.py", "tests/test_train.py", "tests/test_sensitivity.py",
    "tests/test_multiprocess.py", "tests/compress/test_runtime.py", "tests/compress/test_ops.py",
    "tests/models/test_conformer.py", "tests/test_sharding.py", "tests/test_onnx_export.py",
    "tests/test_reliability.py", "tests/test_transcribe.py", "tests/compress/test_export_format.py",
    "tests/compress/test_packing.py", "tests/test_launch.py",
)


def pytest_collection_modifyitems(config, items):
    """Files in `LONGEST_FIRST` order (a stable sort: tests keep their order in a file)."""
    missing = [f for f in LONGEST_FIRST if not (ROOT / f).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FIRST names missing files: {missing}")
    rank = {f: i for i, f in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def pytest_configure(config):
    """One JAX compilation cache for the whole test run, fresh each run: the xdist workers
    and every subprocess a test starts (CLI runs, multi-process jobs) inherit it from
    this process's environment, so the many runs of the same micro model compile their
    programs once; and the suite's XLA flags (`TEST_XLA_FLAGS`), inherited alike. (Set
    before any test creates a JAX backend; workers start after this.)"""
    import os
    import tempfile

    if SUITE_JAX_CACHE in os.environ:  # an xdist worker: the controller made it
        return
    cache = tempfile.mkdtemp(prefix="usmqs-test-jax-cache-")
    config._usmqs_jax_cache = cache
    os.environ.update({
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip(),
        SUITE_JAX_CACHE: cache,
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    })


def pytest_unconfigure(config):
    import os
    import shutil

    cache = getattr(config, "_usmqs_jax_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
        for key in (SUITE_JAX_CACHE, "JAX_COMPILATION_CACHE_DIR"):
            os.environ.pop(key, None)


def micro_overrides() -> list[str]:
    """``configs/tiny.py:micro`` as ``--config`` overrides (the keys where it differs from
    configs/tiny.py), for configs that have no ``micro`` argument of their own."""
    from usmqs import config as config_lib

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    tiny = flat(config_lib.load_config(str(ROOT / "configs/tiny.py")).to_dict())
    micro = flat(config_lib.load_config(f"{ROOT / 'configs/tiny.py'}:micro").to_dict())
    return [f"{k}={v if isinstance(v, str) else repr(v)}" for k, v in micro.items() if tiny[k] != v]


@contextlib.contextmanager
def small_tmpfs(folder: pathlib.Path, size: str):
    """A tmpfs of `size` (e.g. "1m") mounted at `folder` for the block (root only: the
    test is skipped, with the reason, where mounting is not allowed)."""
    import os
    import shutil
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a size-limited tmpfs needs root and mount(8)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def disk_full_for(monkeypatch, name: str) -> None:
    """Make the atomic writes (`usmqs.storage`) of files called `name` fail as on a full
    disk: `os.fsync` of their temporary file raises OSError(ENOSPC), as a filesystem with
    delayed allocation does when the data written does not fit."""
    import errno
    import os

    fsync = os.fsync

    def full(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full)


def listing(folder: pathlib.Path) -> list[str]:
    """The names in `folder`, sorted, hidden ones (temporary files) included."""
    return sorted(p.name for p in folder.iterdir())


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


def sigterm_at_batch(make_train_iterator, k: int):
    """`pipeline.make_train_iterator` whose k-th batch fetch sends this process SIGTERM
    (a preemption notice at a known point of the training loop)."""
    import os
    import signal

    class Signalling:
        def __init__(self, *args, **kwargs):
            self.it, self.fetched = make_train_iterator(*args, **kwargs), 0

        def __next__(self):
            self.fetched += 1
            if self.fetched == k:
                os.kill(os.getpid(), signal.SIGTERM)
            return next(self.it)

        def get_state(self):
            return self.it.get_state()

        def set_state(self, state):
            self.it.set_state(state)

    return Signalling


# ------------------------------------------------------------------ packed export

# The export tests' model: a micro Conformer with one compression setting per layer, the
# seven DESIGN.md policies (int8, int4, int2, 2:4, 1:4, int4+2:4, int2+2:4) on stacked and
# unstacked layers, plus asymmetric scales (with and without N:M), sub-channel blocks with
# clip search, learned ranges (symmetric dense, asymmetric with N:M; calibrated from the
# weights), int16 (no integer form: stored as float), N:M over several flattened axes
# with a padded last group (conv1: 3*3*1 = 9). blocks/attn/pos and blocks/conv/pw2 stay float.
EXPORT_VOCAB = 37
MICRO_MODEL = dict(num_layers=2, model_dim=32, num_heads=2, ffn_dim=64, conv_kernel_size=4, subsample_channels=8)
MIXED_RULES = [
    dict(module_path="blocks/ffn1/w_in", weight_bits=8),
    dict(module_path="blocks/ffn1/w_out", weight_bits=4),
    dict(module_path="blocks/ffn2/w_in", weight_bits=2, learned_scale=True),
    dict(module_path="blocks/ffn2/w_out", nm="2:4"),
    dict(module_path="blocks/attn/q", nm="1:4"),
    dict(module_path="blocks/attn/k", weight_bits=4, nm="2:4"),
    dict(module_path="blocks/attn/v", weight_bits=2, nm="2:4"),
    dict(module_path="blocks/attn/out", weight_bits=4, symmetric=False, nm="2:4", learned_scale=True),
    dict(module_path="blocks/conv/pw1", weight_bits=2, symmetric=False),
    dict(module_path="blocks/conv/dw", weight_bits=8, nm="1:4"),
    dict(module_path="subsample/conv1", weight_bits=4, nm="2:4"),
    dict(module_path="subsample/conv2", weight_bits=4, granularity="sub_channel", block_size=4, clip_search=True),
    dict(module_path="subsample/proj", weight_bits=16, nm="2:4"),
    dict(module_path="ctc/head", weight_bits=16),
]


def mixed_model(*, prune: bool = True):
    """(model config, policy, model) of the MIXED_RULES micro model, learned ranges
    calibrated; pruned: one-shot N:M masks (before the calibration)."""
    from flax import nnx

    from usmqs.compress import masks
    from usmqs.compress.layers import calibrate_ranges
    from usmqs.compress.policy import Policy
    from usmqs.models import presets
    from usmqs.models.conformer import ConformerCTC

    cfg = presets.get_preset("tiny")
    cfg.update(MICRO_MODEL)
    policy = Policy.from_config(MIXED_RULES)
    model = ConformerCTC(cfg, EXPORT_VOCAB, policy=policy, rngs=nnx.Rngs(params=0))
    if prune:
        masks.update_masks(model, 0, force=True)
    calibrate_ranges(model)
    return cfg, policy, model


def compressed_layers(model) -> dict:
    """{policy path: layer} for every Dense/Conv of `model` with a compression spec."""
    from flax import nnx

    from usmqs.compress.layers import Conv, Dense

    return {
        m.path: m for _, m in nnx.iter_modules(model) if isinstance(m, Dense | Conv) and m.spec is not None
    }


def fake_quant_kernels(model) -> dict:
    """Policy path -> fake-quant kernel [*stack, *layer_shape] of every compressed layer,
    computed one layer at a time with jit(compressed_weight), as the scanned model does."""
    import jax
    import numpy as np

    from usmqs.compress import ops

    out = {}
    for path, layer in compressed_layers(model).items():
        fn = jax.jit(lambda k, m, r, l=layer: ops.compressed_weight(
            k, m, l.spec, contract_axes=l.contract_axes, log_range=r))
        k = layer.kernel[...]
        m, _, r = layer.compression_state()
        if k.ndim == len(layer.kernel_shape):
            out[path] = np.asarray(fn(k, m, r))
        else:
            out[path] = np.stack([
                np.asarray(fn(k[i], None if m is None else m[i], None if r is None else r[i]))
                for i in range(k.shape[0])
            ])
    return out


def assert_bitwise(ref: dict, got: dict):
    """Same keys, float32 arrays of the same shapes, equal bit patterns."""
    import numpy as np

    assert set(ref) == set(got)
    for key in ref:
        assert ref[key].dtype == got[key].dtype == np.float32, key
        assert ref[key].shape == got[key].shape, key
        np.testing.assert_array_equal(ref[key].view(np.uint32), got[key].view(np.uint32), err_msg=key)


@pytest.fixture(scope="session")
def mixed_export(tmp_path_factory) -> dict:
    """The MIXED_RULES model written by `write_export` (step 7): its dir, config, policy,
    model and size report."""
    from usmqs.compress import export_format

    root = tmp_path_factory.mktemp("mixed")
    cfg, policy, model = mixed_model()
    (root / "tokenizer.model").write_bytes(b"not parsed by load_export, only checksummed")
    report = export_format.write_export(
        model, root / "export", model_config=cfg, vocab_size=EXPORT_VOCAB, policy=policy,
        tokenizer_file=root / "tokenizer.model", step=7,
    )
    return dict(root=root, dir=root / "export", cfg=cfg, policy=policy, model=model, report=report)
