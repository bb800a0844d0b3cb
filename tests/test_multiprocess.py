"""Two processes x 4 CPU devices train like one process x 8 devices, and resume.

Each process runs the real loop (`train.train_and_evaluate`) and joins the job through
the standard environment (`usmqs.distributed`): gloo collectives between the processes,
each process loading its half of every global batch, Orbax checkpoints written and read
by both. The job is to train 4 steps; process 1 alone receives SIGTERM while step 1 runs,
both agree to stop after step 2 (`usmqs.preemption`), save there and exit 75; a second
launch resumes from step 2 and evaluates. Every loss must equal, to 1e-5, that of one
8-device process training the same 4 steps.

Why the reference needs care (the losses agree bit for bit here; they would not without):
* Row order. Process p loads rows p::2 of each global batch of the data plan and its
  devices hold the p-th half of the global array, so the global batch is rows
  (0, 2, 4, 6, 1, 3, 5, 7) of what one process would see. The reference process reads
  its batches in that order (`_as_two_processes`). Dropout, drawn per row position, is off.
* Summation order. gloo and the in-process CPU collectives add more than two operands in
  different orders. Batches are sharded over `data` only (one half per process), so every
  cross-device sum in the step has two operands (mesh 2 x 2 x 2), and gradient clipping is
  off (the global norm is an 8-way sum; its last bit would rescale every update).
* Amplification. Some gradients are rounding noise (a key bias shifts all scores of a
  query alike, which softmax ignores); AdamW's normalized step turns any difference in
  that noise into a +-lr step, and int4 channel scales pass it on. Over a few steps it
  stays below the tolerance; over many it would not, whatever the launcher.

Run as a script, this file is one worker process (``python tests/test_multiprocess.py
worker SPEC_JSON``).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import xla_flags
from usmqs import preemption
from usmqs.sharding import DEFAULT_RULES

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Batch over `data` only: one half per process. See the module docstring.
RULES = tuple((name, ("data",) if name == "batch" else axes) for name, axes in DEFAULT_RULES)
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", f"mesh.rules={RULES!r}"]
COMMON = [
    "model.dropout=0.0", "model.attention_dropout=0.0",  # see the module docstring
    "data.bucket_boundaries=(320,)", "data.max_frames=320",  # one compiled shape (<= 3.1 s)
    "train.grad_clip=1e9",  # see the module docstring
    "train.log_every=1", "train.checkpoint_every=2",
    "distributed.heartbeat_timeout=10", "distributed.initialization_timeout=60",
]
TIMEOUT_S = 240  # per launch; a loaded 2-core machine needs ~100 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, tmp: pathlib.Path, **extra) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    env["JAX_PLATFORMS"] = "cpu"
    # The resumed launch reuses executables of the first one (process 0's, at least).
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _two_processes(spec: dict, tmp: pathlib.Path) -> list[tuple[str, dict, dict]]:
    """(log name, spec, env) of both workers of a two-process job."""
    port = _free_port()
    return [
        (f"{spec['name']}.{i}", spec, _env(4, tmp, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                           JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i))
        for i in range(2)
    ]


def _launch(jobs: list[tuple[str, dict, dict]], tmp: pathlib.Path, expect: int = 0) -> None:
    """Run the workers concurrently; kill all when one fails or time runs out; each must
    exit with `expect`."""
    procs = []
    for name, spec, env in jobs:
        out = open(tmp / f"{name}.log", "w")
        cmd = [sys.executable, __file__, "worker", json.dumps(spec)]
        procs.append((name, subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT), out))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for _, p, _ in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, expect) for _, p, _ in procs):
                break
            time.sleep(0.2)
    finally:
        for _, p, out in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            out.close()
    for name, p, _ in procs:
        if p.returncode != expect:
            log = (tmp / f"{name}.log").read_text()[-4000:]
            raise AssertionError(f"worker {name} exited with {p.returncode}:\n{log}")


def _losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def _steps(workdir: pathlib.Path) -> set[int]:
    return {int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()}


def test_two_processes_match_one_and_resume(small_corpus, tmp_path):
    corpus = {k: str(v) for k, v in small_corpus.items()}
    multi, single = tmp_path / "multi", tmp_path / "single"
    base = dict(corpus=corpus, overrides=MESH + COMMON, steps=4)

    # Process 1 alone gets SIGTERM while step 1 runs: both agree to stop after step 2,
    # save there, and exit 75.
    first = _two_processes(dict(base, name="multi_a", workdir=str(multi), eval=False), tmp_path)
    first[1] = (first[1][0], dict(first[1][1], sigterm_at_batch=1), first[1][2])
    _launch(first, tmp_path, expect=preemption.EXIT_PREEMPTED)
    assert [s for s, _ in _losses(multi)] == [1, 2]  # process 0 writes, once
    assert _steps(multi) == {2}
    assert "SIGTERM: stopped after step 2" in (tmp_path / "multi_a.1.log").read_text()
    assert "a signal to another process: stopped after step 2" in (tmp_path / "multi_a.0.log").read_text()
    # The resumed job, and beside it the reference: one process, 8 devices, the same mesh
    # and row order, 4 steps in one go.
    resume = dict(base, name="multi_b", workdir=str(multi), eval=True)
    reference = dict(base, name="single", workdir=str(single), eval=False, as_two_processes=True)
    _launch(_two_processes(resume, tmp_path) + [("single", reference, _env(8, tmp_path))], tmp_path)
    assert "resumed from step 2" in (tmp_path / "multi_b.0.log").read_text()

    got, want = _losses(multi), dict(_losses(single))
    assert [s for s, _ in got] == [1, 2, 3, 4]
    diffs = [abs(loss - want[s]) for s, loss in got]
    assert max(diffs) < 1e-5, (got, want)
    # Single-copy outputs from process 0, checkpoints from both.
    assert json.loads((multi / "eval.json").read_text())["num_utterances"] == 24
    assert len((multi / "predictions.jsonl").read_text().splitlines()) == 24
    assert _steps(multi) == {2, 4}


def test_settings_come_from_config_then_environment():
    from usmqs import distributed

    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}
    s = distributed.resolve(None, env)
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("10.0.0.2:1234", 4, 3)
    assert s.multi_process and not s.auto_detect
    block = distributed.distributed_config()
    block.num_processes, block.process_id = 2, 0
    s = distributed.resolve(block, env)
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("10.0.0.2:1234", 2, 0)
    assert not distributed.resolve(None, {}).multi_process
    assert distributed.resolve(None, {"USMQS_DISTRIBUTED_AUTO": "1"}).auto_detect


def test_unjoined_or_half_configured_processes_fail_loudly():
    from usmqs import distributed

    # A launcher started 4 copies, nothing says how to join: 4 separate runs would race.
    with pytest.raises(RuntimeError, match="launcher started 4 processes"):
        distributed.maybe_initialize(None, {"SLURM_NTASKS": "4"})
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        distributed.maybe_initialize(None, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    assert distributed.maybe_initialize(None, {"JAX_NUM_PROCESSES": "1"}) == 1
    assert distributed.maybe_initialize(None, {}) == 1


def _as_two_processes(make_train_iterator):
    """`pipeline.make_train_iterator` for one process that yields each global batch in
    the row order of two processes (process 0's rows, then process 1's)."""

    class Iterator:
        def __init__(self, split, cfg, *, seed=None, process_index=0, process_count=1):
            assert (process_index, process_count) == (0, 1)
            self.parts = [
                make_train_iterator(split, cfg, seed=seed, process_index=p, process_count=2)
                for p in (0, 1)
            ]

        def __next__(self):
            halves = [next(it) for it in self.parts]
            return {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}

        def get_state(self):
            return self.parts[0].get_state()

        def set_state(self, state):
            for it in self.parts:
                it.set_state(state)

    return Iterator


def _worker(spec: dict) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import jax

    from conftest import sigterm_at_batch, tiny_config
    from usmqs import config as config_lib
    from usmqs import train

    cfg = tiny_config(spec["corpus"], policy="int4+2:4", steps=spec["steps"])
    config_lib.apply_overrides(cfg, spec["overrides"] + [f"eval.at_end={spec['eval']}"])
    if spec.get("as_two_processes"):
        train.pipeline.make_train_iterator = _as_two_processes(train.pipeline.make_train_iterator)
    if spec.get("sigterm_at_batch"):
        train.pipeline.make_train_iterator = sigterm_at_batch(train.pipeline.make_train_iterator, spec["sigterm_at_batch"])
    try:
        train.train_and_evaluate(cfg, spec["workdir"])
    except preemption.Preempted as e:
        print(e, flush=True)
        sys.exit(preemption.EXIT_PREEMPTED)
    print(f"process {jax.process_index()} of {jax.process_count()}: done", flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)6d ms %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _worker(json.loads(sys.argv[2]))
