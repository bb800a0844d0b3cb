"""Sharded data preparation: one process vs several, side by side.

    .venv/bin/python bench/prepare_shards.py [--manifest M] [--processes 2] [--lines N]

Prepares the training manifest (default: the embedded corpus' train split, synthesized
and cached on first use) into a fresh cache folder three ways, in one run: one process;
`--processes` processes at once (each its share of the shards, then a barrier, then each
assembles the split, as the processes of a multi-host job do); one process again (order
effects). Each process imports and loads the tokenizer first, then waits until every
process is ready, so ``seconds`` is `pipeline.prepare_split` alone, as a running job pays
it (the slowest process); ``seconds_with_startup`` adds the interpreter start and imports.
Prints JSON: both times and utterances/s of each, the speedup (one process / several,
best of the two one-process runs), and whether the splits are identical (metadata, skip
reports, every record's bytes).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _data_config(shard_lines: int):
    from usmqs.config import base_config

    cfg = base_config("tiny").data
    cfg.prepare_shard_lines = shard_lines
    return cfg


def _wait_for(paths: list[pathlib.Path]) -> None:
    while not all(p.exists() for p in paths):
        time.sleep(0.01)


def _worker(manifest: str, tok: str, cache: str, index: int, count: int, shard_lines: int) -> None:
    from usmqs.data import pipeline
    from usmqs.data.tokenizer import Tokenizer

    tokenizer, folder = Tokenizer.load(tok), pathlib.Path(cache)
    folder.mkdir(parents=True, exist_ok=True)
    mark = lambda stage, i: folder / f".{stage}.{i}"  # noqa: E731
    mark("ready", index).touch()
    _wait_for([mark("ready", i) for i in range(count)])
    t = time.perf_counter()
    barrier = lambda: (mark("done", index).touch(), _wait_for([mark("done", i) for i in range(count)]))  # noqa: E731
    pipeline.prepare_split(manifest, tokenizer, _data_config(shard_lines), folder, train=True,
                           process_index=index, process_count=count, barrier=barrier)
    mark("seconds", index).write_text(str(time.perf_counter() - t))


def _prepare(manifest: str, tok: str, cache: pathlib.Path, processes: int, shard_lines: int) -> tuple[float, float]:
    """(seconds of preparation in the slowest process, seconds with process start)."""
    t = time.perf_counter()
    cmd = lambda i: [sys.executable, __file__, "worker", manifest, tok, str(cache), str(i), str(processes), str(shard_lines)]  # noqa: E731
    procs = [subprocess.Popen(cmd(i)) for i in range(processes)]
    if any(p.wait() for p in procs):
        raise SystemExit("a worker failed")
    wall = time.perf_counter() - t
    return max(float((cache / f".seconds.{i}").read_text()) for i in range(processes)), wall


def _split(manifest: str, tok: str, cache: pathlib.Path, shard_lines: int):
    from usmqs.data import pipeline
    from usmqs.data.tokenizer import Tokenizer

    return pipeline.prepare_split(manifest, Tokenizer.load(tok), _data_config(shard_lines), cache, train=True)


def _records(split) -> list[bytes]:
    import grain

    src = grain.sources.ArrayRecordDataSource(list(split.paths))
    return [src[i] for i in range(len(src))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--manifest", default="")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--lines", type=int, default=0, help="use the first N lines only")
    p.add_argument("--shard-lines", type=int, default=0, help="default: data.prepare_shard_lines")
    args = p.parse_args()
    from usmqs import run
    from usmqs.config import base_config
    from usmqs.data.text import normalize_text
    from usmqs.data.manifest import read_manifest
    from usmqs.data.tokenizer import Tokenizer

    cfg = base_config("tiny")
    shard_lines = args.shard_lines or int(cfg.data.prepare_shard_lines)
    manifest = args.manifest or run.resolve_manifests(cfg)["train"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        if args.lines:
            lines = pathlib.Path(manifest).read_text().splitlines()[: args.lines]
            base = pathlib.Path(manifest).parent
            rows = [json.loads(l) for l in lines]
            for r in rows:
                r["audio_filepath"] = str(base / r["audio_filepath"])
            (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            manifest = str(tmp / "train.jsonl")
        texts = [normalize_text(u.text) for u in read_manifest(manifest, on_error="skip")[0]]
        Tokenizer.train(texts, tmp / "tokenizer", 0, model_type="char")
        tok = str(tmp / "tokenizer.model")
        n = len(texts)
        runs = [("one_process", 1), (f"{args.processes}_processes", args.processes), ("one_process_again", 1)]
        report = {"manifest": manifest, "utterances": n, "shard_lines": shard_lines, "runs": {}}
        for name, procs in runs:
            s, wall = _prepare(manifest, tok, tmp / name, procs, shard_lines)
            report["runs"][name] = {"seconds": round(s, 2), "utterances_per_s": round(n / s, 1),
                                    "seconds_with_startup": round(wall, 2)}
            print(json.dumps({name: report["runs"][name]}), file=sys.stderr, flush=True)
        one = min(report["runs"][k]["seconds"] for k in ("one_process", "one_process_again"))
        report["speedup"] = round(one / report["runs"][f"{args.processes}_processes"]["seconds"], 3)
        a, b = (_split(manifest, tok, tmp / k, shard_lines) for k in ("one_process", f"{args.processes}_processes"))
        report["identical"] = (a.metadata == b.metadata and a.skipped == b.skipped
                               and _records(a) == _records(b))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        _worker(*sys.argv[2:5], *map(int, sys.argv[5:8]))
    else:
        main()
