"""Ahead-of-time compilation of the train step for a target mesh, without any weights.

MaxText's ``train_compile.py`` idea: find out-of-memory and sharding mistakes for a pod
before renting it. Everything is abstract: the state is `jax.eval_shape` of the init
function carrying the shardings `run.build` derives from the logical-axis rules, the
batch is a `jax.ShapeDtypeStruct` of the largest training bucket. The real jitted,
donated train step is lowered and compiled for the mesh; XLA's memory analysis of the
compiled program gives the bytes each device needs::

    usmqs compile --config configs/usm_2b.py:policy=int4+2:4 --mesh fsdp=64 --fake-devices 64

`--fake-devices N` compiles for N host-platform (CPU) devices, which needs
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX creates its CPU client
(`use_fake_devices`; the CLI re-executes itself when that is too late). The CPU compiler
is not the TPU one: fusion and layouts differ, so bytes are an estimate of the TPU
numbers (same sharding, same state, same rematerialization), not a promise.

Memory (per device; CPU's own ``peak_memory_in_bytes`` only counts the arguments):

    peak = arguments + temporaries + outputs - aliased

where `aliased` is the donated state reused for the new state.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

# Importing jax does not create its backends: `use_fake_devices` still works after this.
import jax
import jax.numpy as jnp

from usmqs import sharding as sharding_lib
from usmqs import run as run_lib
from usmqs import train
from usmqs.data import pipeline

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}`` (axes of `sharding.MESH_AXES`)."""
    out: dict[str, int] = {}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        axis, sep, size = part.partition("=")
        axis = axis.strip()
        if not sep or axis not in sharding_lib.MESH_AXES:
            raise ValueError(
                f"--mesh {spec!r}: expected AXIS=N items, AXIS in {sharding_lib.MESH_AXES}"
            )
        out[axis] = int(size)
    return out


def xla_flags_with_device_count(n: int, flags: str = "") -> str:
    """`flags` with the host device count set to `n` (an existing count is replaced)."""
    kept = [f for f in flags.split() if not f.startswith(DEVICE_COUNT_FLAG)]
    return " ".join([*kept, f"{DEVICE_COUNT_FLAG}={n}"])


def use_fake_devices(n: int) -> bool:
    """Ask for `n` CPU devices; True when this process has them.

    Works only before JAX has created its backends (importing jax is fine, calling
    `jax.devices()` or running anything is not). On False the caller should run in a
    fresh process with `fake_devices_env(n)`.
    """
    os.environ["XLA_FLAGS"] = xla_flags_with_device_count(n, os.environ.get("XLA_FLAGS", ""))
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        jax.config.update("jax_platforms", "cpu")
    except Exception:  # backends already initialized: the device count decides below
        pass
    return len(jax.devices()) == n and jax.devices()[0].platform == "cpu"


def fake_devices_env(n: int, env: dict | None = None) -> dict:
    """A copy of `env` (default os.environ) that gives a new process `n` CPU devices."""
    env = dict(os.environ if env is None else env)
    env["XLA_FLAGS"] = xla_flags_with_device_count(n, env.get("XLA_FLAGS", ""))
    env["JAX_PLATFORMS"] = "cpu"
    return env


def reexec_with_fake_devices(n: int, argv: list[str]) -> int:
    """Run ``python -m usmqs ARGV`` in a fresh process with `n` CPU devices."""
    return subprocess.run([sys.executable, "-m", "usmqs", *argv], env=fake_devices_env(n)).returncode


def abstract_batch(config, batch_shardings: dict, frames: int | None = None) -> dict:
    """ShapeDtypeStructs of a global training batch of the largest bucket (or `frames`).

    Shapes as `usmqs.data.pipeline` pads them: features [B, T, F] float32, feature_mask
    [B, T] bool (with ``data.features_on_device``: audio [B, S] int16, num_samples [B]
    int32, S = `pipeline.batch_samples`(T)), labels [B, L] int32, label_mask [B, L] bool,
    L = subsampled_length(T).
    """
    shapes = pipeline.batch_shapes(config.data)
    if frames is None:
        t, l = shapes[-1]
    else:
        t, l = int(frames), pipeline.subsampled_length(int(frames), config.data.subsampling_factor)
    b, f = int(config.data.batch_size), int(config.data.num_mel_bins)
    spec = {
        "features": ((b, t, f), jnp.float32),
        "feature_mask": ((b, t), jnp.bool_),
    } if not config.data.features_on_device else {
        "audio": ((b, pipeline.batch_samples(t, config.data)), jnp.int16),
        "num_samples": ((b,), jnp.int32),
    }
    spec |= {
        "labels": ((b, l), jnp.int32),
        "label_mask": ((b, l), jnp.bool_),
    }
    return {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_shardings[k])
        for k, (shape, dtype) in spec.items()
    }


def memory_report(compiled) -> dict:
    """Per-device bytes of a compiled program and the peak they imply (module docstring)."""
    m = compiled.memory_analysis()
    per = {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
        "generated_code": int(m.generated_code_size_in_bytes),
    }
    xla_peak = getattr(m, "peak_memory_in_bytes", None)
    if xla_peak is not None:
        per["xla_peak"] = int(xla_peak)  # on CPU: the arguments only
    peak = per["arguments"] + per["temporaries"] + per["outputs"] - per["aliased"]
    return {"per_device_bytes": per, "peak_bytes_per_device": peak}


def compile_train_step(config, *, vocab_size: int | None = None, frames: int | None = None,
                       with_init: bool = True):
    """Lower and compile the real train step (and the init) of `config` for its mesh.

    Nothing is allocated: the state and the batch are ShapeDtypeStructs with shardings.
    `vocab_size` defaults to `config.data.vocab_size` (the run's tokenizer decides it in a
    real run). Returns ``(report, compiled)``: the JSON-able dict the CLI prints and the
    compiled train step (``compiled.as_text()`` is its optimized HLO).
    """
    vocab_size = int(vocab_size or config.data.vocab_size)
    setup = run_lib.build(config, vocab_size)
    mesh = setup.mesh
    step_fn, batch_sh = train.make_train_step(setup, config)
    batch = abstract_batch(config, batch_sh, frames)
    shards = math.prod(
        mesh.shape[a] for a in dict(config.mesh.rules).get("batch", ()) if a in mesh.shape
    )
    b = batch["labels"].shape[0]
    if b % shards:
        raise ValueError(
            f"data.batch_size={b} does not divide over the {shards} batch shards of mesh "
            f"{dict(mesh.shape)}"
        )
    state = run_lib.abstract_with_shardings(setup)
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state.params))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state))

    t0 = time.perf_counter()
    teacher = (state.params,) if train.distills(config) else ()  # frozen float weights
    lowered = step_fn.lower(state, batch, *teacher)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0

    report = {
        "params": int(params),
        "devices": int(mesh.size),
        "platform": jax.devices()[0].platform,
        "mesh": {a: int(mesh.shape[a]) for a in sharding_lib.MESH_AXES},
        "policy": config.policy.name if not config.policy.rules else "rules",
        "layers": int(config.model.num_layers),
        "batch": {
            "global": int(b),
            "per_device": b // shards,
            "frames": int(frames or pipeline.batch_shapes(config.data)[-1][0]),
            "labels": int(batch["labels"].shape[1]),
        },
        "state_bytes_total": int(state_bytes),
        **memory_report(compiled),
        "lower_seconds": round(lower_s, 3),
        "compile_seconds": round(compile_s, 3),
    }
    report["peak_gib_per_device"] = round(report["peak_bytes_per_device"] / 2**30, 3)
    if with_init:
        # The init writes each device's shard only: its outputs are state/devices (for
        # sharded weights) and nothing the size of the model passes through one device.
        t0 = time.perf_counter()
        init = setup.init_fn.lower(jax.ShapeDtypeStruct((2,), jnp.uint32)).compile()
        init_mem = memory_report(init)["per_device_bytes"]
        report["init"] = {
            "outputs": init_mem["outputs"],
            "temporaries": init_mem["temporaries"],
            "compile_seconds": round(time.perf_counter() - t0, 3),
        }
    return report, compiled


def run(config, *, mesh: dict[str, int] | None = None, vocab_size: int | None = None,
        frames: int | None = None, with_init: bool = True) -> dict:
    """`compile_train_step` after setting the mesh axes in `mesh` (others as configured)."""
    for axis, size in (mesh or {}).items():
        config.mesh[axis] = int(size)
    report, _ = compile_train_step(config, vocab_size=vocab_size, frames=frames, with_init=with_init)
    return report
