"""Train-step time of compression-aware training relative to float, interleaved in one process.

    .venv/bin/python bench/step_overhead.py [--presets tiny,conformer_m] [--repeats 5]

For each preset, builds the float step and one step per compressed policy on the same
synthetic batch, then times them round-robin (float, int4+2:4, int2+1:4, float, ...) so
that machine noise hits all alike (a policy "intB[+N:M]" that is not a named one is one
whole-model rule; a "-lsq" suffix gives it learned ranges, `WeightSpec.learned_scale`).
Prints JSON: per preset its model shape and parameter count, and per policy the median
seconds per step and the ratio to float (target <= 1.10),
in wall-clock time and in this process's CPU time (user + system, all threads): on a
shared machine other jobs inflate wall time unevenly, CPU time much less.

conformer_m on 2 CPU cores (~15 s per step at batch 8 x 400 frames):

    .venv/bin/python bench/step_overhead.py --presets conformer_m --batch 2 --frames 200 \
        --repeats 3 --steps 2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from usmqs import config as config_lib  # noqa: E402
from usmqs import run, train  # noqa: E402
from usmqs.compress.policy import NAMED_POLICIES  # noqa: E402


def make_batch(cfg, batch_size: int, frames: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    labels_len = max(2, frames // 16)
    return {
        "features": rng.standard_normal((batch_size, frames, cfg.model.num_mel_bins)).astype(np.float32),
        "feature_mask": np.ones((batch_size, frames), bool),
        "labels": rng.integers(1, vocab, (batch_size, labels_len)).astype(np.int32),
        "label_mask": np.ones((batch_size, labels_len), bool),
    }


def build_step(preset: str, policy: str, batch: dict, vocab: int, overrides: list[str]):
    cfg = config_lib.base_config(preset)
    cfg.policy.name = policy
    setting = policy.removesuffix("-lsq")
    if setting != policy or setting not in NAMED_POLICIES:
        # e.g. int2+1:4: "intB[+N:M]" as one whole-model rule; a "-lsq" suffix learns its ranges.
        parts = setting.split("+")
        rule = {"module_path": ".*", "weight_bits": int(parts[0].removeprefix("int"))}
        if len(parts) > 1:
            rule["nm"] = parts[1]
        if setting != policy:
            rule["learned_scale"] = True
        cfg.policy.rules = (rule,)
    cfg.mesh.data = 1
    config_lib.apply_overrides(cfg, overrides)
    setup = run.build(cfg, vocab, mesh=jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")))
    step_fn, batch_sh = train.make_train_step(setup, cfg)
    state = setup.init_fn(jax.random.PRNGKey(0))
    dev_batch = run.device_batch(batch, batch_sh)
    t0 = time.perf_counter()
    state, m = step_fn(state, dev_batch)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def timed(n: int) -> tuple[float, float]:
        """(wall, CPU) seconds per step over n steps."""
        t, c = time.perf_counter(), time.process_time()
        s = holder["state"]
        for _ in range(n):
            s, m = step_fn(s, dev_batch)
        jax.block_until_ready(m["loss"])
        holder["state"] = s
        return (time.perf_counter() - t) / n, (time.process_time() - c) / n

    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    return timed, compile_s, n_params


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="tiny,conformer_m")
    p.add_argument("--policies", default="int4+2:4,int2+1:4")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=400)
    args = p.parse_args()
    vocab = 128
    out = {"device": str(jax.devices()[0]), "batch": args.batch, "frames": args.frames, "presets": {}}
    for preset in args.presets.split(","):
        cfg = config_lib.base_config(preset)
        batch = make_batch(cfg, args.batch, args.frames, vocab)
        names = ["float", *args.policies.split(",")]
        runners, compile_s = {}, {}
        for name in names:
            runners[name], compile_s[name], n_params = build_step(preset, name, batch, vocab, [])
            runners[name](1)  # warm
        times = {n: [] for n in names}
        for _ in range(args.repeats):
            for n in names:
                times[n].append(runners[n](args.steps))
        wall = {n: statistics.median(t for t, _ in v) for n, v in times.items()}
        cpu = {n: statistics.median(c for _, c in v) for n, v in times.items()}
        m = cfg.model
        out["presets"][preset] = {
            "model": {k: m[k] for k in ("num_layers", "model_dim", "num_heads", "ffn_dim", "conv_kernel_size")}
            | {"params": n_params, "features": [args.batch, args.frames, m.num_mel_bins]},
            **{
                n: {
                    "seconds_per_step": wall[n],
                    "ratio_to_float": wall[n] / wall["float"],
                    "cpu_seconds_per_step": cpu[n],
                    "cpu_ratio_to_float": cpu[n] / cpu["float"],
                    "compile_seconds": compile_s[n],
                }
                for n in names
            },
        }
        print(json.dumps({preset: out["presets"][preset]}), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
