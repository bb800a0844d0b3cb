"""Fault injection through the command line: what each fault does to a run, what is lost.

    .venv/bin/python bench/faults.py [--steps 40] [--out runs/faults]

Trains `configs/tiny.py:micro` on a small synthesized corpus with `usmqs train`,
injects one fault per scenario, reruns the same command, and compares the final loss
with an uninterrupted run of the same config. Prints JSON (and a markdown table on
stderr): per scenario the exit code, the message, the checkpoint steps before and after,
the steps lost (trained again), and whether the rerun ended at the uninterrupted loss.

Scenarios: SIGTERM at a random step; SIGTERM twice (the second while the first's
checkpoint is written); kill -9 while an asynchronous checkpoint write is in flight; a
truncated and a removed array file in the latest checkpoint; the disk full during a
checkpoint and during an export (a 16 MiB tmpfs: needs root, else reported as skipped);
learning rate 1e12 (with train.max_consecutive_skips=20, to stop inside 40 steps);
an unknown colon argument. Two processes with one signalled and a
failing run inside a study are tested in tests/ (test_multiprocess.py, test_study.py).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f"{ROOT / 'configs/tiny.py'}:micro"


class Job:
    def __init__(self, workdir: pathlib.Path, corpus: dict, steps: int, extra=()):
        self.workdir, self.corpus, self.total = workdir, corpus, steps
        self.cmd = [
            sys.executable, "-m", "usmqs", "train", "--config", CONFIG, "--workdir", str(workdir),
            f"--config.data.train_manifest={corpus['train']}", f"--config.data.eval_manifest={corpus['test']}",
            f"--config.train.num_steps={steps}", "--config.train.checkpoint_every=10",
            "--config.train.log_every=5", "--config.eval.at_end=false", *extra,
        ]

    def start(self) -> subprocess.Popen:
        self.log = open(self.workdir.parent / f"{self.workdir.name}.log", "a")
        return subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def run(self, cmd=None) -> tuple[int, str]:
        proc = subprocess.run(cmd or self.cmd, capture_output=True, text=True, timeout=600)
        return proc.returncode, proc.stdout + proc.stderr

    def steps(self) -> list[int]:
        d = self.workdir / "checkpoints"
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []

    def logged(self) -> list[dict]:
        path = self.workdir / "metrics.jsonl"
        return [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []

    def wait_for(self, proc, cond, timeout=300) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if cond():
                return True
            time.sleep(0.02)
        return False


def _message(text: str) -> str:
    """The command's own one-line error (`usmqs CMD: ...`), else the last error line."""
    lines = text.splitlines()
    own = [l for l in lines if l.startswith("usmqs ")]
    errors = [l for l in lines if "Error" in l]
    return ((own or errors or lines or [""])[-1])[:300]


def _finish(job: Job, before: list[int], code: int, text: str, reference: float, **extra) -> dict:
    rerun_code, rerun_text = job.run()
    rows = job.logged()
    resumed = re.search(r"resumed from step (\d+)", rerun_text)
    return {
        "exit_code": code, "message": _message(text), "checkpoints_after_fault": before,
        "rerun_exit_code": rerun_code,
        "rerun_resumed_from": int(resumed.group(1)) if resumed else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "same_final_loss": bool(rows) and rows[-1]["loss"] == reference,
        "each_step_logged_once": len({r["step"] for r in rows}) == len(rows),
        **extra,
    }


def _interrupted(job: Job, proc, sig_fn) -> dict:
    """Inject the fault with sig_fn(proc) and wait for the exit: its code, output, and
    the checkpoint steps left."""
    sig_fn(proc)
    proc.wait(timeout=300)
    job.log.close()
    text = pathlib.Path(job.log.name).read_text()
    return dict(code=proc.returncode, text=text, before=job.steps())


def scenario_sigterm(job, reference, rng):
    proc = job.start()
    at = rng.randint(3, 30)
    job.wait_for(proc, lambda: any(r["step"] >= at for r in job.logged()) or len(job.steps()) > 0 and max(job.steps()) >= at)
    r = _interrupted(job, proc, lambda p: p.send_signal(signal.SIGTERM))
    stopped = re.search(r"stopped after step (\d+)", r["text"])
    return _finish(job, r["before"], r["code"], r["text"], reference,
                   signalled_near_step=at, stopped_at=int(stopped.group(1)) if stopped else None)


def scenario_sigterm_twice(job, reference, rng):
    proc = job.start()
    job.wait_for(proc, lambda: 10 in job.steps())  # an earlier checkpoint to fall back to

    def twice(p):
        p.send_signal(signal.SIGTERM)
        job.wait_for(p, lambda: any(".orbax-checkpoint-tmp" in q.name for q in (job.workdir / "checkpoints").iterdir()), 30)
        p.send_signal(signal.SIGTERM)

    r = _interrupted(job, proc, twice)
    return _finish(job, r["before"], r["code"], r["text"], reference)


def scenario_kill9_during_write(job, reference, rng):
    proc = job.start()
    ckpt = job.workdir / "checkpoints"
    hit = job.wait_for(proc, lambda: ckpt.is_dir() and any(
        ".orbax-checkpoint-tmp" in q.name and not q.name.startswith("10") for q in ckpt.iterdir()))
    r = _interrupted(job, proc, lambda p: p.kill())
    return _finish(job, r["before"], r["code"], r["text"], reference, killed_mid_write=hit)


def _damage(job: Job, how: str) -> str:
    latest = job.workdir / "checkpoints" / str(job.steps()[-1])
    biggest = max((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if how == "truncate":
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    else:
        biggest.unlink()
    return str(biggest.relative_to(job.workdir))


def _killed_after_checkpoint(job: Job, step: int) -> list[int]:
    """Run the job until checkpoint `step` is complete, then kill -9 it."""
    proc = job.start()
    job.wait_for(proc, lambda: step in job.steps())
    proc.kill()
    proc.wait()
    job.log.close()
    return job.steps()


def scenario_damaged(how):
    def scenario(job, reference, rng):
        _killed_after_checkpoint(job, 20)
        damaged = _damage(job, how)
        return _finish(job, job.steps(), 0, f"{how}d {damaged}", reference, damaged_file=damaged)
    return scenario


def _tmpfs(path: pathlib.Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], capture_output=True).returncode == 0


def _fill(fs: pathlib.Path, leave: int) -> pathlib.Path:
    st = os.statvfs(fs)
    ballast = fs / "ballast"
    ballast.write_bytes(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))
    return ballast


def scenario_disk_full_checkpoint(job, reference, rng):
    """The disk fills between the step-10 and the step-20 checkpoint."""
    fs = job.workdir.parent / "fs_ckpt"
    if not _tmpfs(fs):
        return {"skipped": "cannot mount a tmpfs (needs root)"}
    try:
        cache = ["--config.data.cache_dir=" + str(job.workdir.parent / "cache")]  # features elsewhere
        moved = Job(fs / "run", job.corpus, job.total, cache)
        size = sum(p.stat().st_size for p in (job.workdir.parent / "reference" / "checkpoints" / "40").rglob("*") if p.is_file())
        ballast = _fill(fs, int(1.5 * size) + 200_000)  # + config, tokenizer, metrics, TensorBoard
        code, text = moved.run()
        before = moved.steps()
        ballast.unlink()
        return _finish(moved, before, code, text, reference)
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)


def scenario_disk_full_export(job, reference, rng):
    fs = job.workdir.parent / "fs_export"
    if not _tmpfs(fs):
        return {"skipped": "cannot mount a tmpfs (needs root)"}
    try:
        job.run()
        run_dir = fs / "run"
        shutil.copytree(job.workdir, run_dir)
        ballast = _fill(fs, 20_000)
        cmd = [sys.executable, "-m", "usmqs", "export", "--workdir", str(run_dir)]
        code, text = job.run(cmd)
        left = sorted(p.name for p in run_dir.iterdir() if "export" in p.name)
        ballast.unlink()
        rerun_code, _ = job.run(cmd)
        return {"exit_code": code, "message": _message(text), "export_entries_after_fault": left,
                "rerun_exit_code": rerun_code, "export_after_rerun": (run_dir / "export" / "size.json").is_file()}
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)


def scenario_lr_1e12(job, reference, rng):
    job.cmd += ["--config.train.learning_rate=1e12", "--config.train.max_consecutive_skips=20"]
    code, text = job.run()
    return {"exit_code": code, "message": _message(text), "checkpoints": job.steps(),
            "logged": [(r["step"], r["skipped"]) for r in job.logged()]}


def scenario_unknown_colon_argument(job, reference, rng):
    cmd = [c.replace(CONFIG, f"{ROOT / 'configs/tiny.py'}:polcy=int4+2:4") for c in job.cmd]
    code, text = job.run(cmd)
    return {"exit_code": code, "message": _message(text), "workdir_created": job.workdir.exists()}


SCENARIOS = {
    "sigterm_random_step": scenario_sigterm,
    "sigterm_twice_second_during_checkpoint_write": scenario_sigterm_twice,
    "kill_9_during_async_checkpoint_write": scenario_kill9_during_write,
    "truncated_array_file_in_latest_checkpoint": scenario_damaged("truncate"),
    "removed_array_file_in_latest_checkpoint": scenario_damaged("remove"),
    "disk_full_during_checkpoint": scenario_disk_full_checkpoint,
    "disk_full_during_export": scenario_disk_full_export,
    "learning_rate_1e12": scenario_lr_1e12,
    "unknown_colon_argument": scenario_unknown_colon_argument,
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default="")
    p.add_argument("--only", default="", help="comma-separated scenario names")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="usmqs-faults-")).absolute()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / "jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    corpus_dir = out / "corpus"
    if not (corpus_dir / "train.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "usmqs", "synth", "--out", str(corpus_dir), "--num-train", "200",
                        "--num-test", "24", "--num-dev", "24"], check=True, capture_output=True)
    corpus = {k: str(corpus_dir / f"{k}.jsonl") for k in ("train", "test")}
    ref = Job(out / "reference", corpus, args.steps)
    if not ref.logged():
        ref.run()
    reference = ref.logged()[-1]["loss"]
    rng = random.Random(args.seed)
    report = {"steps": args.steps, "reference_final_loss": reference, "scenarios": {}}
    for name, fn in SCENARIOS.items():
        if args.only and name not in args.only.split(","):
            continue
        job = Job(out / name, corpus, args.steps)
        shutil.rmtree(job.workdir, ignore_errors=True)
        t = time.perf_counter()
        result = fn(job, reference, rng)
        result["seconds"] = round(time.perf_counter() - t, 1)
        report["scenarios"][name] = result
        print(json.dumps({name: result}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
