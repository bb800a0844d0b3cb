"""Faults a run survives: non-finite storms, damaged checkpoints, a full disk.

Preemption (SIGTERM in one process, in one of two, SIGTERM then kill -9) is tested with
the runs it interrupts: tests/test_train.py and tests/test_multiprocess.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib

import pytest

from conftest import small_tmpfs, tiny_config
from usmqs import checkpoints, evaluate, run, storage, train


def _steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _metrics(workdir) -> list[dict]:
    return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_a_non_finite_storm_stops_the_run_and_says_why(small_corpus, tmp_path):
    cfg = tiny_config(small_corpus, steps=40)
    cfg.train.learning_rate = 1e12
    cfg.train.max_consecutive_skips = 4
    cfg.train.log_every = 100  # the storm's line is logged even so
    with pytest.raises(train.NonFiniteStorm, match="the last 4 updates .* were all skipped.*learning_rate"):
        train.train_and_evaluate(cfg, tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    # Every skipped update is counted (not only those of logged steps).
    assert len(rows) == 1 and rows[0]["skipped"] >= 4 and rows[0]["step"] < 40
    assert all(s < rows[0]["step"] for s in _steps(tmp_path / "run"))


def _truncate_largest_file(step_dir: pathlib.Path) -> pathlib.Path:
    biggest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    return biggest


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(small_corpus, tmp_path, caplog):
    cfg = tiny_config(small_corpus, steps=4)  # checkpoints at 2 and 4
    cfg.eval.at_end = False
    workdir = tmp_path / "run"
    train.train_and_evaluate(cfg, workdir)
    _truncate_largest_file(workdir / "checkpoints" / "4")
    setup = run.build(cfg, run.load_tokenizer(workdir).vocab_size)
    # Readers (evaluate) fall back without touching the run's folder.
    with caplog.at_level(logging.WARNING, logger="usmqs.checkpoints"):
        assert int(run.restore_latest(workdir, setup).step) == 2
    assert "checkpoint step 4 cannot be restored" in caplog.text and _steps(workdir) == [2, 4]
    # Training moves the damaged step aside, resumes at 2, and logs each step once.
    cfg.train.num_steps = 6
    train.train_and_evaluate(cfg, workdir)
    assert _steps(workdir) == [4, 6] and [p.name.split(".")[0] for p in (workdir / "checkpoints.bad").iterdir()] == ["4"]
    assert [r["step"] for r in _metrics(workdir)] == [2, 4, 6]
    # None restores: a clear error naming the folder and every step, not a fresh start.
    for step in (4, 6):
        _truncate_largest_file(workdir / "checkpoints" / str(step))
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint under .*checkpoints can be restored: step 6: "):
        evaluate.evaluate_workdir(cfg, workdir)
    with pytest.raises(checkpoints.CheckpointError, match="can be restored: step 6: .*; step 4: "):
        train.train_and_evaluate(cfg, workdir)
    assert _steps(workdir) == [4, 6]  # nothing moved when nothing restores


@pytest.fixture
def small_filesystem(tmp_path):
    with small_tmpfs(tmp_path / "fs", "16m") as folder:
        yield folder


def test_a_full_disk_during_a_checkpoint_names_the_path_and_keeps_the_last_one(small_corpus, small_filesystem):
    cfg = tiny_config(small_corpus, steps=2)  # checkpoints at 1 and 2
    cfg.eval.at_end = False
    cfg.train.keep_checkpoints = 1  # a failed write must not cost the one kept
    cfg.data.cache_dir = str(small_filesystem.parent / "cache")  # the features live elsewhere
    workdir = small_filesystem / "run"
    train.train_and_evaluate(cfg, workdir)
    assert _steps(workdir) == [2]
    ckpt_bytes = sum(p.stat().st_size for p in (workdir / "checkpoints" / "2").rglob("*") if p.is_file())
    # Leave less room than one more checkpoint needs.
    free = os.statvfs(small_filesystem).f_bavail * os.statvfs(small_filesystem).f_frsize
    ballast = small_filesystem / "ballast"
    ballast.write_bytes(b"\0" * (free - ckpt_bytes // 3))
    cfg.train.num_steps = 4
    # The checkpoint's writer or, when it is still writing, TensorBoard's hits it first.
    with pytest.raises(storage.WriteError, match=r"cannot write (checkpoint step 3 to .*checkpoints/3|TensorBoard events to .*tensorboard): "
                       r"no space left on device \(.* MiB free of 16.0 MiB"):
        train.train_and_evaluate(cfg, workdir)
    assert _steps(workdir) == [2]
    # Space freed, the same command resumes from step 2 and finishes.
    ballast.unlink()
    train.train_and_evaluate(cfg, workdir)
    assert _steps(workdir) == [4] and [r["step"] for r in _metrics(workdir)] == [2, 4]


def test_a_full_disk_while_logging_metrics_names_the_file(tmp_path):
    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    with train.MetricsLog(tmp_path, train.Progress(10, 0), primary=True) as mlog:
        mlog.file = Full()
        with pytest.raises(storage.WriteError, match=r"cannot write training metrics to .*metrics.jsonl: no space left on device \("):
            mlog.write(2, {"loss": 1.0}, lr=0.1, skipped=0)
