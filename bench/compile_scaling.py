"""Ahead-of-time compile of the USM 2B train step: time and memory vs devices and depth.

    .venv/bin/python bench/compile_scaling.py [--policy int4+2:4] [--devices 8,16,32,64]
        [--layers 8,32] [--layers-devices 64]

Each compile runs `usmqs compile` in its own process (the fake CPU device count is fixed
when JAX starts): the real train step of `configs/usm_2b.py` (1.8B parameters, scan over
rematerialized layers, AdamW, N:M masks), fully sharded over `fsdp=N` with the config's
16 utterances x 16 s per device, no weights allocated. Prints JSON:

  by_devices: per N, compile/lower seconds, per-device bytes, peak GiB per device
  by_layers:  the same step with 8 and 32 layers on --layers-devices devices, and
              compile_ratio = compile_seconds(32 layers) / compile_seconds(8 layers)
              (scan: the layer count should barely matter; target < 1.5)

Compile times are wall-clock on this machine and include XLA's CPU backend; the peak is
arguments + temporaries + outputs - aliased (see `usmqs.compile`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def compile_once(policy: str, devices: int, layers: int | None = None, init: bool = False) -> dict:
    cmd = [
        sys.executable, "-m", "usmqs", "compile",
        "--config", f"configs/usm_2b.py:policy={policy},devices={devices}",
        "--mesh", f"fsdp={devices}", "--fake-devices", str(devices),
    ]
    if not init:
        cmd.append("--no-init")
    if layers is not None:
        cmd.append(f"--config.model.num_layers={layers}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout)
    report["process_seconds"] = round(time.perf_counter() - t0, 2)
    return report


def summary(r: dict) -> dict:
    keys = ("devices", "layers", "params", "batch", "lower_seconds", "compile_seconds",
            "process_seconds", "per_device_bytes", "peak_gib_per_device", "init")
    return {k: r[k] for k in keys if k in r}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", default="int4+2:4")
    p.add_argument("--devices", default="8,16,32,64")
    p.add_argument("--layers", default="8,32")
    p.add_argument("--layers-devices", type=int, default=64)
    args = p.parse_args()

    devices = [int(d) for d in args.devices.split(",") if d]
    by_devices = {}
    for n in devices:
        # The init's memory (sharded from the start) is reported once, at the largest N.
        by_devices[n] = summary(compile_once(args.policy, n, init=n == max(devices)))
        print(f"# {n} devices: {by_devices[n]['compile_seconds']} s, "
              f"{by_devices[n]['peak_gib_per_device']} GiB/device", file=sys.stderr, flush=True)

    by_layers = {}
    for layers in [int(x) for x in args.layers.split(",") if x]:
        same = by_devices.get(args.layers_devices)
        if same is not None and same["layers"] == layers:
            by_layers[layers] = same
        else:
            by_layers[layers] = summary(compile_once(args.policy, args.layers_devices, layers))
        print(f"# {layers} layers: {by_layers[layers]['compile_seconds']} s",
              file=sys.stderr, flush=True)
    lo, hi = min(by_layers), max(by_layers)
    result = {
        "policy": args.policy,
        "by_devices": by_devices,
        "by_layers": {
            "devices": args.layers_devices,
            "runs": by_layers,
            "compile_ratio": round(by_layers[hi]["compile_seconds"] / by_layers[lo]["compile_seconds"], 3),
            "lower_ratio": round(by_layers[hi]["lower_seconds"] / by_layers[lo]["lower_seconds"], 3),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
