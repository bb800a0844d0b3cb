"""The input pipeline on one CPU core against what a TPU host's chips consume.

    .venv/bin/python bench/input_pipeline.py [--lines 1000] [--batches 30]
        [--presets tiny,conformer_m,usm_2b] [--chips 4] [--peak-tflops 197] [--mfu 0.4]

Host side, both paths of ``data.features_on_device``, inline (one process, one core,
one BLAS thread), on the first `--lines` utterances of the embedded corpus' train split
with `configs/tiny.py`'s data settings (batch 16, buckets 250 and 400 frames):

* ``prepare``: `pipeline.prepare_split` into a fresh cache (decode + resample + log-mel
  float16 records, or decode + FLAC records);
* ``read``: the train iterator's batches (read + decode + [normalize + SpecAugment] + pad),
  `--batches` of them after the first.

Each as utterances/s and seconds of audio/s per core.

Accelerator side: what `--chips` chips consume, in utterances of `--frames` frames
(default 400 = 4.0 s, the tiny config's largest bucket) per second:
``chips x peak x MFU / FLOPs per utterance``, where the FLOPs are those of the preset's
real train step (`usmqs.compile.compile_train_step`, float policy, no rematerialization:
model FLOPs) as XLA's cost analysis counts them, per utterance and per block from four
small compiles (`flops_per_utterance`). Defaults: a TPU v5e host (4 chips, 197 bf16
TFLOP/s each) at 40 % MFU; state others with the flags. The host figures are measured
with the tiny config's 80 mel bins; the larger presets' 128 cost a little more.

Prints JSON: the host figures, per preset the FLOPs per utterance and the utterances/s
the chips consume, and per preset and path the ratio host core / need and the cores it
takes to keep up (reading; preparation is paid once per dataset, reading every epoch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import shutil
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from device_features import _reading, _subset  # noqa: E402  (bench helpers)


@contextlib.contextmanager
def _short_scans_unrolled(max_length: int = 2):
    """``jax.lax.scan`` over at most `max_length` steps unrolls while active.

    XLA's cost analysis counts a while loop's body once, so a scanned layer stack of 2
    layers counts as 1. Unrolling only short scans unrolls the 1- and 2-layer stacks of
    `flops_per_utterance` and leaves the long scans (the CTC loss's over time) as they
    are: the same in every model compared, so they cancel in the differences.
    """
    import jax

    scan = jax.lax.scan

    def patched(f, init, xs=None, length=None, **kw):
        n = length if length is not None else jax.tree.leaves(xs)[0].shape[0]
        if n <= max_length:
            kw["unroll"] = True
        return scan(f, init, xs, length, **kw)

    jax.lax.scan = patched
    try:
        yield
    finally:
        jax.lax.scan = scan


def _step_flops(preset: str, layers: int, batch: int, frames: int) -> float:
    """XLA's FLOP count of `preset`'s float train step with `layers` blocks, `batch`
    utterances of `frames` frames, one device, no rematerialization, no dropout."""
    from usmqs import compile as compile_lib
    from usmqs.config import base_config

    c = base_config(preset)
    c.model.update(num_layers=layers, remat=False, dropout=0.0, attention_dropout=0.0)
    c.data.update(batch_size=batch, bucket_boundaries=(frames,), max_frames=frames,
                  num_mel_bins=c.model.num_mel_bins)
    c.mesh.data = 1
    _, compiled = compile_lib.compile_train_step(c, frames=frames, with_init=False)
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def flops_per_utterance(preset: str, frames: int) -> dict:
    """Train-step FLOPs per utterance of `frames` frames for `preset`.

    Differences of four compiled steps: 2 minus 1 utterance removes what a step costs once
    (the optimizer update), 2 minus 1 layer gives one block; the preset's FLOPs per
    utterance = the 1-layer model's + (layers - 1) x one block's.
    """
    from usmqs.config import base_config

    with _short_scans_unrolled():
        f = {(l, b): _step_flops(preset, l, b, frames) for l in (1, 2) for b in (1, 2)}
    one_layer = f[1, 2] - f[1, 1]
    block = (f[2, 2] - f[2, 1]) - one_layer
    layers = int(base_config(preset).model.num_layers)
    return {"layers": layers, "flops_per_block": block, "flops": one_layer + (layers - 1) * block}


def host_throughput(lines: int, batches: int) -> dict:
    """Per-core preparation and reading throughput of both paths (module docstring)."""
    import threadpoolctl

    from usmqs import config as config_lib
    from usmqs import run
    from usmqs.data import features, pipeline

    config = config_lib.load_config(str(ROOT / "configs/tiny.py"))
    work = pathlib.Path(tempfile.mkdtemp(prefix="usmqs-input-bench-"))
    try:
        manifest = _subset(run.resolve_manifests(config)["train"], lines, work)
        config.data.train_manifest = config.data.eval_manifest = manifest
        tok = run.load_or_train_tokenizer(config, work, manifest)
        out = {}
        with threadpoolctl.threadpool_limits(1):
            for name, audio in (("host_features", False), ("device_features", True)):
                t = time.perf_counter()
                split = pipeline.prepare_split(manifest, tok, config.data, work / name, train=True, store_audio=audio)
                prep = time.perf_counter() - t
                n = split.num_examples
                fcfg = pipeline.feature_config(config.data)  # feature records: the samples their frames hold
                samples = [m["num_samples"] if audio else features.samples_for_frames(m["num_frames"], fcfg)
                           for m in split.metadata]
                audio_s = sum(samples) / fcfg.sample_rate
                read = _reading(split, config.data.copy_and_resolve_references(), batches)
                b = int(config.data.batch_size)
                mean_s = audio_s / n
                out[name] = {
                    "utterances": n,
                    "mean_utterance_seconds": round(mean_s, 3),
                    "prepare_utterances_per_s": round(n / prep, 1),
                    "prepare_audio_seconds_per_s": round(audio_s / prep, 1),
                    "read_seconds_per_batch": round(read, 5),
                    "read_utterances_per_s": round(b / read, 1),
                    "read_audio_seconds_per_s": round(b * mean_s / read, 1),
                }
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=1000)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--presets", default="tiny,conformer_m,usm_2b")
    p.add_argument("--frames", type=int, default=400, help="utterance length for the FLOP count")
    p.add_argument("--chips", type=int, default=4)
    p.add_argument("--peak-tflops", type=float, default=197.0, help="per chip (v5e: 197 bf16)")
    p.add_argument("--mfu", type=float, default=0.4)
    args = p.parse_args(argv)

    host = host_throughput(args.lines, args.batches)
    seconds = args.frames / 100  # 10 ms frames
    report = {
        "host_per_core": host,
        "accelerator": {"chips": args.chips, "peak_tflops_per_chip": args.peak_tflops, "mfu": args.mfu,
                        "utterance_frames": args.frames, "utterance_seconds": seconds},
        "presets": {},
    }
    for preset in [s for s in args.presets.split(",") if s]:
        f = flops_per_utterance(preset, args.frames)
        need = args.chips * args.peak_tflops * 1e12 * args.mfu / f["flops"]
        row = {**f, "need_utterances_per_s": round(need, 1), "need_audio_seconds_per_s": round(need * seconds, 1)}
        for path, h in host.items():
            ratio = h["read_audio_seconds_per_s"] / (need * seconds)
            row[path] = {"read_ratio_core_to_need": round(ratio, 4), "cores_to_keep_up": math.ceil(1 / ratio),
                         "prepare_ratio_core_to_need": round(h["prepare_audio_seconds_per_s"] / (need * seconds), 4)}
        report["presets"][preset] = row
        print(json.dumps({preset: row}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
