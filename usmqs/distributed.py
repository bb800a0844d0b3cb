"""Multi-process start-up: `maybe_initialize(config)` before JAX runs anything.

One process per host (or per group of devices), all running the same program: every
process builds the same global mesh over `jax.devices()`, loads its own rows of each
global batch (`usmqs.data.pipeline.make_train_iterator`), and takes part in every
checkpoint save and restore (Orbax coordinates them). Files meant to exist once
(metrics.jsonl, eval.json, predictions, TensorBoard) are written by process 0 only.

Where the settings come from, first hit wins:

=====================  ==============================  =========================
setting                config key (``distributed.*``)  environment
=====================  ==============================  =========================
coordinator host:port  ``coordinator_address``         ``JAX_COORDINATOR_ADDRESS``
number of processes    ``num_processes`` (0 = unset)   ``JAX_NUM_PROCESSES``
this process           ``process_id`` (-1 = unset)     ``JAX_PROCESS_ID``
cluster auto-detection ``auto_detect``                 ``USMQS_DISTRIBUTED_AUTO=1``
=====================  ==============================  =========================

With auto-detection JAX fills in whatever is unset from the cluster (Cloud TPU pod
slices through the metadata server, SLURM, Open MPI); `launch/tpu_vm.sh` uses it.
Nothing set: a single process.

Why assert the process count: a process that never joined (a typo in one host's
environment) does not fail, it silently runs as its own one-process world with the full
global batch and races the real job on the checkpoint directory. So the expected count,
when known, is checked after start-up; and a launcher that started several processes
(SLURM, mpirun) while nothing here was configured is an error, not N separate runs.

Timeouts are lowered from JAX's minutes: a peer that never comes up fails start-up after
`initialization_timeout` seconds, one that dies mid-run is noticed after
`heartbeat_timeout` seconds (the survivors then exit instead of hanging in a collective).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
from collections.abc import Mapping

import jax
import ml_collections
from jax.experimental import multihost_utils

log = logging.getLogger("usmqs.distributed")

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_AUTO = "USMQS_DISTRIBUTED_AUTO"

# Launchers that start N copies of a program and say so in the environment.
_LAUNCHER_WORLD_SIZE = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "WORLD_SIZE")


def distributed_config() -> ml_collections.ConfigDict:
    """The ``config.distributed`` block (module docstring for precedence)."""
    return ml_collections.ConfigDict(
        dict(
            coordinator_address="",  # host:port of process 0; '' = $JAX_COORDINATOR_ADDRESS
            num_processes=0,  # 0 = $JAX_NUM_PROCESSES, else auto-detected, else 1
            process_id=-1,  # -1 = $JAX_PROCESS_ID, else auto-detected
            auto_detect=False,  # let JAX detect the cluster (TPU pod, SLURM, MPI)
            initialization_timeout=120,  # s for every process to connect (JAX: 300)
            heartbeat_timeout=30,  # s of silence before a peer counts as dead (JAX: 100)
            shutdown_timeout=30,  # s to wait for the others at exit (JAX: 300)
        )
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Resolved start-up settings; None fields are left to JAX's cluster detection."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    auto_detect: bool
    initialization_timeout: int
    heartbeat_timeout: int
    shutdown_timeout: int

    @property
    def multi_process(self) -> bool:
        return (
            self.auto_detect
            or self.coordinator_address is not None
            or (self.num_processes or 1) > 1
        )


def resolve(block=None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from a ``config.distributed`` block (or None) and the environment."""
    env = os.environ if environ is None else environ
    d = distributed_config() if block is None else block

    def env_int(name: str) -> int | None:
        raw = env.get(name, "").strip()
        if not raw:
            return None
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"${name}={raw!r} is not an integer") from None

    return Settings(
        coordinator_address=d.coordinator_address or env.get(ENV_COORDINATOR) or None,
        num_processes=d.num_processes if d.num_processes > 0 else env_int(ENV_NUM_PROCESSES),
        process_id=d.process_id if d.process_id >= 0 else env_int(ENV_PROCESS_ID),
        auto_detect=bool(d.auto_detect) or env.get(ENV_AUTO, "").lower() in ("1", "true", "yes"),
        initialization_timeout=int(d.initialization_timeout),
        heartbeat_timeout=int(d.heartbeat_timeout),
        shutdown_timeout=int(d.shutdown_timeout),
    )


def launcher_world_size(environ: Mapping[str, str] | None = None) -> int:
    """How many copies a launcher says it started (1 when none says anything)."""
    env = os.environ if environ is None else environ
    for name in _LAUNCHER_WORLD_SIZE:
        raw = env.get(name, "").strip()
        if raw.isdigit() and int(raw) > 1:
            return int(raw)
    return 1


def maybe_initialize(config=None, environ: Mapping[str, str] | None = None) -> int:
    """Join the multi-process job if one is configured; return `jax.process_count()`.

    Call it before JAX computes anything (JAX refuses to initialize afterwards). Calling
    it again is harmless. Raises RuntimeError when the process count is not the expected
    one, or when a launcher started several processes but nothing here says how to join.
    """
    block = None if config is None else config.get("distributed")
    s = resolve(block, environ)
    if jax.distributed.is_initialized():
        return _check_count(s)
    if not s.multi_process:
        world = launcher_world_size(environ)
        if world > 1:
            raise RuntimeError(
                f"the launcher started {world} processes, but no distributed settings are "
                f"given: each would train alone on the same workdir. Set ${ENV_COORDINATOR}, "
                f"${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID} (or ${ENV_AUTO}=1)."
            )
        return _check_count(s)
    if not s.auto_detect:
        missing = [
            name for name, v in (
                (ENV_COORDINATOR, s.coordinator_address),
                (ENV_NUM_PROCESSES, s.num_processes),
                (ENV_PROCESS_ID, s.process_id),
            ) if v is None
        ]
        if missing:
            raise ValueError(
                f"multi-process settings incomplete, missing {missing} (config "
                "distributed.* or environment); or enable cluster auto-detection"
            )
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        # CPU devices of different processes talk through gloo (tests, CPU clusters).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(
        coordinator_address=s.coordinator_address,
        num_processes=s.num_processes,
        process_id=s.process_id,
        initialization_timeout=s.initialization_timeout,
        heartbeat_timeout_seconds=s.heartbeat_timeout,
        shutdown_timeout_seconds=s.shutdown_timeout,
    )
    # Older JAX releases lack some timeout arguments: pass what this one takes.
    accepted = inspect.signature(jax.distributed.initialize).parameters
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if k in accepted})
    count = _check_count(s)
    log.info(
        "process %d of %d; %d local / %d global devices",
        jax.process_index(), count, jax.local_device_count(), jax.device_count(),
    )
    return count


def _check_count(s: Settings) -> int:
    count = jax.process_count()
    expected = s.num_processes if s.num_processes is not None else (None if s.auto_detect else 1)
    if expected is not None and count != expected:
        raise RuntimeError(
            f"jax.process_count() = {count}, expected {expected}: a process that did not "
            "join the job would run alone and race the others on the workdir"
        )
    return count


def is_primary() -> bool:
    """True on the process that writes the run's single-copy files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def primary_first(name: str):
    """Run the block on process 0 first, then on the others.

    For work that writes shared files (tokenizer, prepared data cache, synthesized
    corpus): the others start after process 0 finished, and find its files.
    """
    if not is_primary():
        barrier(name)
    yield
    if is_primary():
        barrier(name)
