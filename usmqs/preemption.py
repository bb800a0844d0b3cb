"""Preemption: on SIGTERM / SIGINT, stop at a step every process agrees on, save, exit 75.

Spot and preemptible TPU VMs get SIGTERM about 30 s before they go; a user stops a run
with Ctrl-C. Either way the training loop (`usmqs.train`) finishes the step in flight,
saves a checkpoint at it (with the data position) and raises `Preempted`; the CLI prints
one line and exits with `EXIT_PREEMPTED` (75, EX_TEMPFAIL: "try again"). Rerunning the
same command resumes at that step with nothing lost.

Agreement. With several processes the signal may reach only some of them, and all must
save the same step (every process writes its shards of a checkpoint). Each step the loop
dispatches `Watcher.poll()`: a one-element-per-device array of the local "stop" flags,
reduced with a max by a tiny jitted function, so every process reads the same value for
the same step. The loop reads it one step late (after the next step is dispatched, as it
reads the step's metrics), so the host never waits on the device for it; every process
therefore stops after the same step. This needs no coordination-service hook, works for
SIGINT too, and costs one scalar all-reduce per step.

A second signal restores the previous handler and re-raises: the process dies at once.
Orbax writes a checkpoint into a temporary folder that it renames when complete, so a
checkpoint cut short is never taken for one (the next run deletes the leftover folder).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("usmqs.preemption")

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: rerun the same command to resume
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped at `step` on a signal, after saving a checkpoint there."""

    def __init__(self, step: int, signal_name: str, workdir: str):
        super().__init__(
            f"{signal_name}: stopped after step {step} and saved a checkpoint there in "
            f"{workdir}; rerun the same command to resume"
        )
        self.step, self.signal_name, self.workdir = step, signal_name, workdir


class Watcher:
    """Install SIGTERM/SIGINT handlers for the `with` block (main thread only; elsewhere,
    e.g. a notebook's worker thread, signals keep their handlers and `requested` stays
    False) and make each process's stop request visible to all (`poll`)."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, object] = {}
        self._reduce = None

    def __enter__(self) -> Watcher:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        if jax.process_count() > 1:
            mesh = jax.sharding.Mesh(np.array(jax.devices()), ("p",))
            self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("p"))
            self._reduce = jax.jit(
                jnp.max, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            )
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:  # the second signal: give up now (checkpoints are atomic)
            log.warning("%s again: stopping now, without a checkpoint", name)
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.requested, self.signal_name = True, name
        print(f"{name}: finishing the current step, then saving a checkpoint "
              "(send it again to stop at once)", flush=True)

    def poll(self):
        """This step's stop flag as all processes see it: a bool (one process) or a
        replicated device array (several); read it with `stop_agreed`."""
        if self._reduce is None:
            return self.requested
        local = np.full((jax.local_device_count(),), int(self.requested), np.int32)
        flags = jax.make_array_from_process_local_data(self._sharding, local, (jax.device_count(),))
        return self._reduce(flags)

    @staticmethod
    def stop_agreed(polled) -> bool:
        if isinstance(polled, bool):
            return polled
        return bool(np.asarray(polled.addressable_data(0)))
