"""Checkpoints that survive preemption, full disks and damaged files (on top of Orbax).

* Writes are asynchronous (`Checkpoints.save` returns once the arrays are copied to host
  memory; training continues while Orbax writes them) and atomic (Orbax writes into a
  temporary folder and renames it when every process has finished; a leftover temporary
  folder of a killed run is deleted when the next run opens the directory). A failed
  write is never dropped silently: it surfaces at the next `save`, `wait` or `close`, a
  full disk as a `usmqs.storage.WriteError` naming the directory and the space left.
  Orbax deletes checkpoints beyond `keep` only after a newer one has been committed, so
  the newest complete checkpoint always stays.
* Restores fall back (`restore_newest`): if the newest checkpoint cannot be read
  (truncated or missing array file, bad metadata), a warning names its step and the
  error and the next older one is tried; a training run then moves the bad ones to
  ``checkpoints.bad/`` (a newer, broken step would otherwise shadow the run's new saves);
  when none restores, a `CheckpointError` names the directory and every step's error,
  and nothing is moved.
  With several processes, all processes must restore a step for it to count. A checkpoint
  that reads fine but holds arrays of other shapes than the model's is no damage: an
  `IncompatibleCheckpoint` is raised at once and nothing is moved aside.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from usmqs import storage

log = logging.getLogger("usmqs.checkpoints")

CHECKPOINT_DIR = "checkpoints"
QUARANTINE_DIR = "checkpoints.bad"


class CheckpointError(RuntimeError):
    """No checkpoint of a directory can be restored (each step's error in the message)."""


class IncompatibleCheckpoint(ValueError):
    """A readable checkpoint written by another model (other shapes): older steps of the
    same run cannot fit better, so it ends the restore instead of counting as damage."""


def manager(
    workdir: str | pathlib.Path, *, keep: int | None = None, read_only: bool = False,
    asynchronous: bool = False,
) -> ocp.CheckpointManager:
    """The Orbax manager of ``workdir/checkpoints`` (`keep`: newest checkpoints kept)."""
    return ocp.CheckpointManager(
        (pathlib.Path(workdir) / CHECKPOINT_DIR).absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=asynchronous,
        ),
    )


def _all_processes(ok: bool) -> bool:
    """True if `ok` holds on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def restore_newest(
    mngr: ocp.CheckpointManager, restore: Callable[[int], Any], *, what: str,
    quarantine: pathlib.Path | None = None,
) -> tuple[int, Any] | None:
    """(step, restore(step)) of the newest step that restores; None without checkpoints.

    Steps that fail are reported (a warning with the step and the error) and skipped;
    with `quarantine`, once an older step has restored, the failed newer ones are moved
    there (by process 0) so that later saves are not shadowed by them. When no step
    restores nothing is moved (every step failing alike is more likely a model that does
    not fit the checkpoints than damage). An `IncompatibleCheckpoint` from `restore` is
    raised as it is. `what` names the checkpoints in messages (e.g. "init_from=DIR").
    """
    errors, failed = [], []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            value, error = restore(step), None
        except IncompatibleCheckpoint:
            raise
        except Exception as e:  # any damage: truncated file, missing array, bad metadata
            value, error = None, e
        if _all_processes(error is None):
            if errors:
                log.warning("%s: restored step %d instead (newer steps failed above)", what, step)
            for bad in failed if quarantine is not None else ():
                _move_aside(mngr, bad, quarantine)
            return step, value
        msg = _brief(error or RuntimeError("another process could not restore it"))
        errors.append(f"step {step}: {msg}")
        failed.append(step)
        log.warning("%s: checkpoint step %d cannot be restored (%s); trying the previous one", what, step, msg)
    if errors:
        raise CheckpointError(
            f"{what}: no checkpoint under {mngr.directory} can be restored: " + "; ".join(errors)
        )
    return None


def _brief(error: BaseException) -> str:
    """Type and first line of the error it was raised from (tensorstore's, which names
    the file and what is wrong with it, under Orbax's generic one), without spec dumps."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = (str(error).splitlines() or [""])[0].split(" See full TensorStore details")[0]
    return f"{type(error).__name__}: {text}"


def _move_aside(mngr: ocp.CheckpointManager, step: int, quarantine: pathlib.Path) -> None:
    if jax.process_index() == 0:
        quarantine.mkdir(parents=True, exist_ok=True)
        dest = quarantine / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(str(pathlib.Path(mngr.directory) / str(step)), dest)
        log.warning("moved the unreadable checkpoint step %d to %s", step, dest)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"usmqs_quarantine_{step}")
    mngr.reload()


class Checkpoints:
    """A training run's checkpoints: asynchronous saves, errors that name the disk."""

    def __init__(self, workdir: str | pathlib.Path, keep: int):
        self.workdir = pathlib.Path(workdir)
        self.directory = self.workdir / CHECKPOINT_DIR
        self.mngr = manager(workdir, keep=keep, asynchronous=True)
        self._saving: int | None = None

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def restore(self, restore: Callable[[int], Any]) -> tuple[int, Any] | None:
        """`restore_newest` for this run (unreadable steps are moved aside)."""
        return restore_newest(
            self.mngr, restore, what=str(self.directory), quarantine=self.workdir / QUARANTINE_DIR
        )

    def _checked(self, fn: Callable[[], Any]):
        step = self._saving
        with storage.writing(self.directory / str(step), f"checkpoint step {step}"):
            return fn()

    def save(self, step: int, args: ocp.args.CheckpointArgs) -> None:
        """Start writing checkpoint `step` (returns once the arrays are in host memory).
        The previous write is waited for first (Orbax would wait too), so that its error,
        if any, is raised here with its own step."""
        self.wait()
        self._saving = step
        self._checked(lambda: self.mngr.save(step, args=args, force=True))

    def wait(self) -> None:
        """Block until the pending write is committed (or raise its error)."""
        self._checked(self.mngr.wait_until_finished)
        self._checked(self.mngr.check_for_errors)

    def saving(self) -> bool:
        return self.mngr.is_saving_in_progress()

    def close(self) -> None:
        """Wait for the pending write (raising its error), then release the manager."""
        try:
            self.wait()
        finally:
            try:
                self.mngr.close()
            except Exception:  # the write's error, raised again: already reported by wait()
                log.debug("closing %s after a failed write", self.directory, exc_info=True)
