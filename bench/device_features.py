"""Host features vs features on the accelerator (``data.features_on_device``), side by side.

    .venv/bin/python bench/device_features.py [--lines 500] [--batches 20] [--steps 0]

Takes the first `--lines` utterances of the embedded corpus' train split (synthesized and
cached on first use) and, with `configs/tiny.py`'s data settings (batch 16, buckets 250
and 400 frames), prepares them both ways into a fresh cache, inline (one core):

* host path: decode + log-mel (float16 records); a batch is read, normalized, SpecAugmented
  and padded on the host;
* device path: decode + 16-bit PCM (FLAC records); a batch is read (FLAC decoded) and
  padded on the host, and the jitted step computes log-mel + normalization + SpecAugment.

Prints JSON: per path the preparation seconds (and seconds of audio per second), the cache
bytes per second of audio, the host seconds per batch of reading (`--batches` batches of
the train iterator, inline) and the preparation amortized per batch (preparation
seconds x batch size / utterances); for the device path the seconds per batch of the
jitted front end alone on this machine's first JAX device, per bucket; with `--steps` N
also the train step of the tiny model both ways (its compile not counted).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _subset(manifest: str, lines: int, out: pathlib.Path) -> str:
    """The first `lines` rows of `manifest`, paths made absolute, as a new manifest."""
    src = pathlib.Path(manifest)
    rows = []
    for line in src.read_text().splitlines()[:lines]:
        row = json.loads(line)
        row["audio_filepath"] = str((src.parent / row["audio_filepath"]).resolve())
        rows.append(json.dumps(row))
    path = out / "subset.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _reading(split, data_cfg, batches: int) -> float:
    """Host seconds per training batch (read + decode + [normalize + SpecAugment] + pad)."""
    from usmqs.data import pipeline

    data_cfg.num_workers = 0
    it = pipeline.make_train_iterator(split, data_cfg, seed=0)
    next(it)  # first batch: plan and file opening
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - t) / batches


def _front_end_seconds(config, repeats: int = 10) -> dict:
    """Seconds per batch of the jitted on-device front end (log-mel, normalization,
    SpecAugment), per bucket, on random audio."""
    import jax
    import numpy as np

    from usmqs import run
    from usmqs.data import pipeline

    out = {}
    b = int(config.data.batch_size)
    fe = jax.jit(lambda batch, key: run.model_inputs(config, batch, key))
    for frames in config.data.bucket_boundaries:
        s = pipeline.batch_samples(int(frames), config.data)
        rng = np.random.default_rng(0)
        batch = {"audio": jax.device_put(rng.integers(-3000, 3000, (b, s), dtype=np.int16)),
                 "num_samples": jax.device_put(np.full((b,), s, np.int32))}
        jax.block_until_ready(fe(batch, jax.random.PRNGKey(0)))
        t = time.perf_counter()
        for i in range(repeats):
            jax.block_until_ready(fe(batch, jax.random.PRNGKey(i)))
        out[str(frames)] = (time.perf_counter() - t) / repeats
    return out


def _step_seconds(config, split, tok, steps: int) -> float:
    """Seconds per train step of `config` on its first batch (after one compiling step)."""
    import jax

    from usmqs import run, train
    from usmqs.data import pipeline

    setup = run.build(config, tok.vocab_size)
    step_fn, batch_sh = train.make_train_step(setup, config)
    state = setup.init_fn(jax.random.PRNGKey(0))
    batch = run.device_batch(next(pipeline.make_train_iterator(split, config.data, seed=0)), batch_sh)
    state, m = step_fn(state, batch)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = step_fn(state, batch)
    jax.block_until_ready(m)
    return (time.perf_counter() - t) / steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=500)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--steps", type=int, default=0, help="also time N train steps of each path")
    args = p.parse_args(argv)

    import jax

    from usmqs import config as config_lib
    from usmqs import run
    from usmqs.data import pipeline

    config = config_lib.load_config(str(ROOT / "configs/tiny.py"))
    work = pathlib.Path(tempfile.mkdtemp(prefix="usmqs-devfeat-bench-"))
    manifest = _subset(run.resolve_manifests(config)["train"], args.lines, work)
    config.data.train_manifest = config.data.eval_manifest = manifest
    tok = run.load_or_train_tokenizer(config, work, manifest)
    report = {"batch_size": int(config.data.batch_size),
              "buckets": list(config.data.bucket_boundaries), "platform": jax.devices()[0].platform}
    splits, prep = {}, {}
    for name, audio in (("host", False), ("device", True)):
        t = time.perf_counter()
        splits[name] = pipeline.prepare_split(manifest, tok, config.data, work / name, train=True, store_audio=audio)
        prep[name] = time.perf_counter() - t
    n = splits["device"].num_examples
    seconds = sum(m["num_samples"] for m in splits["device"].metadata) / 16000
    report.update(utterances=n, audio_seconds=round(seconds, 1))
    for name, split in splits.items():
        cache = sum(pathlib.Path(q).stat().st_size for q in split.paths)
        row = {
            "prepare_seconds": round(prep[name], 3),
            "prepare_audio_seconds_per_second": round(seconds / prep[name], 1),
            "prepare_seconds_per_batch_amortized": round(prep[name] * report["batch_size"] / n, 5),
            "cache_bytes": cache,
            "cache_bytes_per_audio_second": round(cache / seconds),
            "read_seconds_per_batch": round(_reading(split, config.data.copy_and_resolve_references(), args.batches), 5),
        }
        c = config.copy_and_resolve_references()
        c.data.features_on_device = split.stores_audio
        if split.stores_audio:
            row["front_end_seconds_per_batch"] = {k: round(v, 5) for k, v in _front_end_seconds(c).items()}
        if args.steps:
            row["train_step_seconds"] = round(_step_seconds(c, split, tok, args.steps), 4)
        report[name] = row
    report["cache_ratio_audio_to_features"] = round(report["device"]["cache_bytes"] / report["host"]["cache_bytes"], 3)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
