"""Sharding: logical rules -> mesh shardings, init into shards, sharded == unsharded.

The 8-device checks run this file as a script in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (this pytest process has one
device), naming the check functions; a failing check prints its traceback there.

What "the same" means for sharded vs unsharded training. Sharding changes the order of
floating-point sums (per-device partial sums, then a collective), so gradients agree to
~1e-6 relative, not bit for bit. The losses before any real update, and the gradients
(AdamW's first moment after step 1 is 0.1 x the clipped gradient), are compared at 1e-5.
After the first real update the runs drift apart at ~1e-3, for a reason that is not a
sharding error: some gradients are exactly zero in exact arithmetic (a key bias shifts
every attention score of a query equally, which the softmax ignores) and come out as
rounding noise whose sign depends on the summation order; AdamW's normalized step
m / sqrt(v) turns that noise into a full +-lr step, and int4 rounding and N:M ranks of
the touched weights amplify it. Later losses are only checked loosely (1e-2).
`tests/test_multiprocess.py` shows the other side: same sharding, other process layout,
bit-identical losses.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from conftest import xla_flags
from usmqs import sharding as sharding_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
VOCAB = 40


def _run_checks(*names: str) -> str:
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices=8)
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, __file__, *names], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for name in names:
        assert f"{name} ok" in proc.stdout, proc.stdout[-3000:]
    return proc.stdout


# ------------------------------------------------------------ in this process (1 device)


def test_logical_to_pspec_replicates_what_does_not_divide():
    mesh = AbstractMesh((2, 4, 2), sharding_lib.MESH_AXES)
    rules = sharding_lib.DEFAULT_RULES

    def spec(names, shape):
        return sharding_lib.logical_to_pspec(names, shape, mesh, rules)

    assert spec(("embed", "mlp"), (48, 96)) == P("fsdp", "tensor")
    assert spec(("embed", "heads", "kv"), (48, 3, 16)) == P("fsdp", None, None)  # 3 heads
    assert spec(("batch", "time"), (8, 100)) == P(("data", "fsdp"), None)
    assert spec(("batch", "time"), (6, 100)) == P(None, None)  # 6 rows over 2 x 4
    assert spec(("embed", "embed"), (48, 48)) == P("fsdp", None)  # a mesh axis once
    assert spec(None, (4,)) == P()


def test_params_moments_masks_and_batches_are_sharded_by_the_rules():
    _run_checks("check_shardings")


def test_sharded_init_and_training_equal_unsharded():
    print(_run_checks("check_sharded_training"))


def test_compile_cli_gets_its_fake_devices_and_reports_memory():
    """`usmqs compile --fake-devices 4` from a process whose JAX already runs on one CPU
    device: it re-executes itself with the flag set, and prints the memory report."""
    code = "import sys, jax; jax.devices(); from usmqs.cli import main; main(sys.argv[1:])"
    tiny = [f"--config.{o}" for o in (
        "model.num_layers=2", "model.model_dim=48", "model.num_heads=2", "model.ffn_dim=96",
        "model.subsample_channels=16", "model.conv_kernel_size=7", "data.batch_size=8",
        "data.bucket_boundaries=(200,)", "data.max_frames=200", "data.vocab_size=40")]
    args = ["compile", "--config", f"{ROOT / 'configs/tiny.py'}:policy=int4+2:4",
            "--mesh", "fsdp=4", "--fake-devices", "4", "--no-init", *tiny]
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = xla_flags()  # no device count: the CLI's --fake-devices sets it
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["devices"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report["batch"] == {"global": 8, "per_device": 2, "frames": 200, "labels": 50}
    per = report["per_device_bytes"]
    assert report["peak_bytes_per_device"] == (
        per["arguments"] + per["temporaries"] + per["outputs"] - per["aliased"])
    assert per["aliased"] > 0  # the donated state is reused for the new one
    assert 50_000 < report["params"] < 200_000 and report["compile_seconds"] > 0


# -------------------------------------------------------- in the 8-device subprocess


def _config(mesh: dict[str, int], policy: str = "int4+2:4"):
    from conftest import tiny_config

    cfg = tiny_config({"train": "unused", "test": "unused"}, policy=policy, steps=10)
    for axis in sharding_lib.MESH_AXES:
        cfg.mesh[axis] = mesh.get(axis, 1)
    return cfg


def _batch(cfg, seed: int = 0, frames: int = 200) -> dict:
    """A random padded batch shaped like the pipeline's (prefix masks, labels 1..V-1)."""
    from usmqs.data import pipeline

    rng = np.random.default_rng(seed)
    b, f = cfg.data.batch_size, cfg.data.num_mel_bins
    labels_len = pipeline.subsampled_length(frames, cfg.data.subsampling_factor)
    lengths = rng.integers(frames // 2, frames + 1, size=b)
    n_labels = rng.integers(3, 12, size=b)
    return {
        "features": rng.standard_normal((b, frames, f)).astype(np.float32),
        "feature_mask": np.arange(frames)[None, :] < lengths[:, None],
        "labels": np.where(np.arange(labels_len)[None, :] < n_labels[:, None],
                           rng.integers(1, 40, size=(b, labels_len)), 0).astype(np.int32),
        "label_mask": np.arange(labels_len)[None, :] < n_labels[:, None],
    }



def _named(tree) -> dict[str, object]:
    """{"blocks/ffn1/w_in/kernel": leaf, ...} of an nnx.State (or a tree holding one)."""
    import jax

    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        out["/".join(keys[:-1] if keys[-1] == "value" else keys)] = leaf
    return out


def check_shardings():
    """Params, AdamW moments and N:M masks get the specs the logical rules give."""
    import optax

    from usmqs import run, train

    cfg = _config({"data": 2, "fsdp": 2, "tensor": 2})
    setup = run.build(cfg, VOCAB)
    sh = setup.state_shardings
    params = {k: v.spec for k, v in _named(sh.params).items()}
    masks = {k: v.spec for k, v in _named(sh.rest).items()}
    # Stacked block weights: [layers, embed, mlp] -> layers replicated, embed over fsdp,
    # mlp over tensor; the mask of a kernel is sharded exactly like the kernel.
    w_in = "blocks/ffn1/w_in/kernel"
    assert params[w_in] == P(None, "fsdp", "tensor"), params[w_in]
    assert masks["blocks/ffn1/w_in/mask"] == params[w_in]
    assert params["blocks/ffn1/w_out/kernel"] == P(None, "tensor", "fsdp")
    assert params["blocks/attn/q/kernel"] == P(None, "fsdp", "tensor", None)  # [L, D, N, H]
    assert params["ctc_head/kernel"] == P("fsdp", "tensor")
    assert params["subsample/conv2/kernel"] == P(None, None, None, None)  # no rule: replicated
    assert masks["ctc_head/mask"] == params["ctc_head/kernel"]
    for path, spec in masks.items():
        kernel = path.rsplit("/", 1)[0] + "/kernel"
        assert spec == params[kernel], (path, spec, params[kernel])
    # Every AdamW moment is sharded like its parameter.
    for name in ("mu", "nu"):
        moments = optax.tree_utils.tree_get(sh.opt_state, name)
        assert {k: v.spec for k, v in _named(moments).items()} == params, name
    # Batches: leading axis over data x fsdp.
    _, batch_sh = train.make_train_step(setup, cfg)
    assert batch_sh["features"].spec == P(("data", "fsdp"), None, None)
    assert batch_sh["labels"].spec == P(("data", "fsdp"), None)
    # Learned ranges ([layers], ends, *one per scale group): sharded like their kernel's
    # output axes, replicated along the rest.
    cfg.policy.name = "int2-lsq"
    cfg.policy.rules = ({"module_path": ".*", "weight_bits": 2, "symmetric": False, "learned_scale": True},)
    ranges = {k: v.spec for k, v in _named(run.build(cfg, VOCAB).state_shardings.params).items()
              if k.endswith("/quant_range")}
    assert ranges["blocks/ffn1/w_in/quant_range"] == P(None, None, None, "tensor")
    assert ranges["blocks/ffn1/w_out/quant_range"] == P(None, None, None, "fsdp")
    assert ranges["blocks/attn/q/quant_range"] == P(None, None, None, "tensor", None)
    assert ranges["ctc_head/quant_range"] == P(None, None, "tensor")


def check_sharded_training():
    """fsdp=8 vs one device, from the same seed and batch (dropout on): the init writes the
    same values, each device only its shard; the AOT-compiled step all-gathers each
    layer's weights inside the scan, never activations; losses and gradients agree."""
    import jax
    import optax

    from usmqs import compile as compile_lib
    from usmqs import run, train
    from usmqs.data import pipeline

    cfg1, cfg8 = _config({}), _config({"fsdp": 8})
    for cfg in (cfg1, cfg8):
        cfg.data.bucket_boundaries = (200,)  # the shape compile_lib.abstract_batch uses
        cfg.data.max_frames = 200
    one = run.build(cfg1, VOCAB, mesh=sharding_lib.make_mesh(cfg1.mesh, jax.devices()[:1]))
    step1, batch_sh1 = train.make_train_step(one, cfg1)
    _, step8 = compile_lib.compile_train_step(cfg8, vocab_size=VOCAB, with_init=False)
    eight = run.build(cfg8, VOCAB)
    _, batch_sh8 = train.make_train_step(eight, cfg8)

    # Init: same values; every device holds exactly its shard; the compiled init's
    # per-device output + temporaries are a fraction of the state.
    init8 = eight.init_fn.lower(jax.random.PRNGKey(0)).compile()
    state1, state8 = one.init_fn(jax.random.PRNGKey(0)), init8(jax.random.PRNGKey(0))
    leaves = jax.tree.leaves(state8)
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    sharded_bytes = 0
    for x, y in zip(leaves, jax.tree.leaves(state1)):
        want = x.sharding.shard_shape(x.shape)
        assert all(s.data.shape == want for s in x.addressable_shards), (x.shape, want)
        sharded_bytes += x.size * x.dtype.itemsize * (math.prod(want) < x.size)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert sharded_bytes > 0.9 * total, (sharded_bytes, total)
    w = state8.params["blocks"]["ffn1"]["w_in"]["kernel"][...]
    assert w.addressable_shards[0].data.shape == (2, 48 // 8, 96)
    init_mem = init8.memory_analysis()
    assert init_mem.output_size_in_bytes + init_mem.temp_size_in_bytes < total / 4

    # ZeRO-3: XLA all-gathers weights (per layer, inside the scan), never activations:
    # no all-gathered array has a time axis (T frames, T' after subsampling, 2T'-1).
    t = 200
    t_sub = pipeline.subsampled_length(t, cfg8.data.subsampling_factor)
    gathers = re.findall(r"= \(?([a-z0-9]+\[[0-9,]*\])[^ ]* all-gather\(", step8.as_text())
    dims = [{int(d) for d in s[s.index("[") + 1 : -1].split(",") if d} for s in gathers]
    assert gathers and not any(d & {t, t_sub, 2 * t_sub - 1} for d in dims), gathers

    # Three steps each (the first has lr 0: warm-up starts there).
    batch = _batch(cfg1)
    b1, b8 = run.device_batch(batch, batch_sh1), run.device_batch(batch, batch_sh8)
    losses1, losses8 = [], []
    for i in range(3):
        state1, m1 = step1(state1, b1)
        state8, m8 = step8(state8, b8)  # the AOT-compiled executable
        losses1.append(float(m1["loss"]))
        losses8.append(float(m8["loss"]))
        if i == 0:
            np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
            # AdamW's first moment after one step: 0.1 x the clipped gradient.
            mu1 = _named(optax.tree_utils.tree_get(state1.opt_state, "mu"))
            mu8 = _named(optax.tree_utils.tree_get(state8.opt_state, "mu"))
            scale = max(float(np.abs(np.asarray(v)).max()) for v in mu1.values())
            for k in mu1:
                np.testing.assert_allclose(np.asarray(mu8[k]), np.asarray(mu1[k]), rtol=0,
                                           atol=1e-5 * scale, err_msg=k)
    print("losses 1 device:", losses1, "\nlosses fsdp=8:", losses8)
    np.testing.assert_allclose(losses8[:2], losses1[:2], rtol=0, atol=1e-5)
    # Step 3 moves by AdamW's normalized updates, which turn rounding differences of the
    # two programs' sums (different orders on 8 devices) into +-lr steps of whole tensors:
    # close, not equal (0.2 % apart here without LLVM optimization, see conftest).
    np.testing.assert_allclose(losses8[2:], losses1[2:], rtol=1e-2, atol=0)


if __name__ == "__main__":
    import jax

    sys.path.insert(0, str(ROOT / "tests"))
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    for name in sys.argv[1:]:
        globals()[name]()
        print(f"{name} ok", flush=True)
