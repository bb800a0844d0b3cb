"""Asynchronous checkpoints: do the steps that overlap a save slow down?

    .venv/bin/python bench/checkpoint_overlap.py [--presets tiny,conformer_m] [--steps 24]

For each preset, trains on a synthetic batch and saves a checkpoint every `--every`
steps the way the training loop does (`usmqs.checkpoints.Checkpoints`, Orbax async),
timing each step to completion. A step "overlaps" a save when a write was in progress
when it started (the step that starts a save also pays for copying the arrays to host
memory: reported apart). Prints JSON per preset: median seconds of steps that overlap a
write, of steps with no write in flight, and their ratio (target <= 1.10), the median
seconds `save()` blocks the loop, and for comparison the seconds a synchronous save
(write + commit) takes. Wall and process CPU time are both given: on a shared machine
other jobs inflate wall time unevenly.

conformer_m on 2 CPU cores (a few seconds per step at batch 2 x 200 frames):

    .venv/bin/python bench/checkpoint_overlap.py --presets conformer_m --batch 2 --frames 200
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from step_overhead import make_batch  # noqa: E402

from usmqs import checkpoints, run, train  # noqa: E402
from usmqs import config as config_lib  # noqa: E402


def bench_preset(preset: str, args) -> dict:
    cfg = config_lib.base_config(preset)
    cfg.mesh.data = 1
    vocab = 64
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    setup = run.build(cfg, vocab, mesh=mesh)
    step_fn, batch_sh = train.make_train_step(setup, cfg)
    batch = run.device_batch(make_batch(cfg, args.batch, args.frames, vocab), batch_sh)
    state = setup.init_fn(jax.random.PRNGKey(0))
    state, m = step_fn(state, batch)  # compile
    jax.block_until_ready(m["loss"])

    rows = []  # (kind, wall, cpu)
    blocking = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = checkpoints.Checkpoints(pathlib.Path(tmp) / "async", keep=2)
        for i in range(1, args.steps + 1):
            kind = "overlap" if ckpts.saving() else "clear"
            t, c = time.perf_counter(), time.process_time()
            state, m = step_fn(state, batch)
            jax.block_until_ready(m["loss"])
            rows.append((kind, time.perf_counter() - t, time.process_time() - c))
            if i % args.every == 0:
                t = time.perf_counter()
                run.save_state(ckpts, state, {})
                blocking.append(time.perf_counter() - t)
        ckpts.close()
        sync = checkpoints.Checkpoints(pathlib.Path(tmp) / "sync", keep=1)
        t = time.perf_counter()
        run.save_state(sync, state, {})
        sync.wait()
        sync_s = time.perf_counter() - t
        sync.close()
        ckpt_bytes = sum(p.stat().st_size for p in (pathlib.Path(tmp) / "sync").rglob("*") if p.is_file())

    def med(kind, col):
        vals = [r[col] for r in rows if r[0] == kind]
        return statistics.median(vals) if vals else None

    out = {"num_params": int(sum(x.size for x in jax.tree.leaves(state.params))), "checkpoint_bytes": ckpt_bytes}
    for col, name in ((1, "wall"), (2, "cpu")):
        o, c = med("overlap", col), med("clear", col)
        out[name] = {
            "overlap_step_s": o, "clear_step_s": c,
            "ratio": None if not (o and c) else round(o / c, 3),
        }
    out["steps"] = {"overlap": sum(r[0] == "overlap" for r in rows), "clear": sum(r[0] == "clear" for r in rows)}
    out["save_blocks_s"] = round(statistics.median(blocking), 4)
    out["sync_save_s"] = round(sync_s, 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="tiny,conformer_m")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=200)
    args = p.parse_args()
    report = {"devices": str(jax.devices()[0].platform), "batch": args.batch, "frames": args.frames,
              "every": args.every, "presets": {}}
    for preset in args.presets.split(","):
        report["presets"][preset] = bench_preset(preset, args)
        print(json.dumps({preset: report["presets"][preset]}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
