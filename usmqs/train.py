"""The training loop: `train_and_evaluate(config, workdir)`, usable from tests and notebooks.

Reads top to bottom: data (manifests, tokenizer, the prepared train split) -> model and
optimizer state initialized from shapes straight into their shardings (`usmqs.run`) ->
one jitted, donated `train_step` (mask schedule, CTC loss [+ distillation], AdamW) ->
Orbax checkpoints with the data iterator position -> final evaluation. Rerunning with the
same workdir resumes from the latest checkpoint (step, optimizer, RNG, data position).
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from tensorboardX import SummaryWriter

from usmqs import checkpoints
from usmqs import config as config_lib
from usmqs import distributed
from usmqs import evaluate as evaluate_lib
from usmqs import preemption
from usmqs import run
from usmqs import storage
from usmqs.compress import masks as masks_lib
from usmqs.data import pipeline

log = logging.getLogger("usmqs.train")

def ctc_loss(logits, out_mask, labels, label_mask):
    """Sum of per-utterance CTC losses / number of label tokens, and the utterance count.

    logits [B, T', V] (blank 0), out_mask [B, T'], labels [B, L], label_mask [B, L].
    Rows without labels (batch padding) contribute nothing.
    """
    per_seq = optax.ctc_loss(
        logits.astype(jnp.float32),
        1.0 - out_mask.astype(jnp.float32),
        labels,
        1.0 - label_mask.astype(jnp.float32),
        blank_id=0,
    )
    num_labels = label_mask.sum(axis=-1)
    valid = num_labels > 0
    total = jnp.sum(jnp.where(valid, per_seq, 0.0))
    return total / jnp.maximum(num_labels.sum(), 1), valid.sum()


def distill_loss(logits, teacher_logits, out_mask, temperature: float):
    """Frame-level KL(teacher || student) of the CTC posteriors at `temperature`, times
    temperature², averaged over the valid frames (out_mask 1).

    The student is initialized from the teacher (`init_from`), so both share the CTC
    alignment and frame-wise matching is meaningful (no sequence-level distillation needed).
    """
    log_ps = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
    m = out_mask.astype(jnp.float32)
    return temperature**2 * jnp.sum(kl * m) / jnp.maximum(m.sum(), 1.0)


def hidden_distill_loss(hidden, teacher_hidden, out_mask):
    """Squared distance between the student's block outputs and the teacher's, over the
    teacher's squared norm, both summed over every block and valid frame (out_mask 1):
    0 when they match, 1 when the student's are all zero; scale-free, so one weight
    suits any model width. hidden, teacher_hidden [num_layers, B, T', D]."""
    m = out_mask.astype(jnp.float32)[None, :, :, None]
    s, t = hidden.astype(jnp.float32), teacher_hidden.astype(jnp.float32)
    return jnp.sum(jnp.square(s - t) * m) / jnp.maximum(jnp.sum(jnp.square(t) * m), 1e-12)


def distills(config) -> bool:
    """Whether the run distils from its init_from float run (`train.distill_weight` or
    `train.distill_hidden_weight` > 0)."""
    return config.train.distill_weight > 0 or config.train.distill_hidden_weight > 0


def make_train_step(setup: run.Setup, config):
    """The jitted, donated step: `step(state, batch)`, or with distillation (`distills`)
    `step(state, batch, teacher_params)` (the init_from weights, sharded like `params`:
    `run.load_params`).
    Returns it and the batch's shardings (`run.batch_shardings`): with
    ``data.features_on_device`` the batch is audio and the step computes the features."""
    graphdef, tx = setup.graphdef, setup.tx
    distill = distills(config)
    alpha = float(config.train.distill_weight)
    temperature = float(config.train.distill_temperature)
    beta = float(config.train.distill_hidden_weight)
    t_graphdef = run.teacher_graphdef(config, setup.vocab_size) if distill else None

    def loss_fn(params, rest, batch, rng, teacher_out):
        model = nnx.merge(graphdef, params, rest)
        logits, out_mask, *hidden = model(batch["features"], batch["feature_mask"], rng=rng, return_hidden=beta > 0)
        loss, _ = ctc_loss(logits, out_mask, batch["labels"], batch["label_mask"])
        if teacher_out is None:
            return loss, {}
        teacher_logits, *teacher_hidden = teacher_out
        total, parts = (1.0 - alpha) * loss, {"ctc_loss": loss}
        if alpha > 0:
            parts["distill_loss"] = distill_loss(logits, teacher_logits, out_mask, temperature)
            total = total + alpha * parts["distill_loss"]
        if beta > 0:
            parts["hidden_loss"] = hidden_distill_loss(hidden[0], teacher_hidden[0], out_mask)
            total = total + beta * parts["hidden_loss"]
        return total, parts

    def train_step(state: run.TrainState, batch, teacher_params=None):
        rng = jax.random.fold_in(state.rng, state.step)
        if "audio" in batch:  # data.features_on_device: the host's front end, here
            augment_rng = jax.random.fold_in(jax.random.fold_in(state.rng, run.AUGMENT_STREAM), state.step)
            features, feature_mask = run.model_inputs(config, batch, augment_rng)
            batch = {**batch, "features": features, "feature_mask": feature_mask}
        teacher_out = None
        if teacher_params is not None:
            teacher = nnx.merge(t_graphdef, teacher_params, nnx.State({}))
            logits, _, *hidden = teacher(batch["features"], batch["feature_mask"], rng=None, return_hidden=beta > 0)
            teacher_out = jax.lax.stop_gradient((logits, *hidden))
        model = nnx.merge(graphdef, state.params, state.rest)
        masks_lib.update_masks(model, state.step)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, rest, batch, rng, teacher_out
        )
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient skips the update instead of poisoning the weights.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            rest=rest,
            opt_state=keep(opt_state, state.opt_state),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": 1 - finite.astype(jnp.int32), **parts}
        return new_state, metrics

    batch_sh = run.batch_shardings(config, setup.mesh)
    in_shardings = (setup.state_shardings, batch_sh)
    if distill:
        in_shardings += (run.weights_only(setup.state_shardings.params),)
    jitted = jax.jit(
        train_step,
        in_shardings=in_shardings,
        out_shardings=(setup.state_shardings, None),
        donate_argnums=(0,),
    )
    return run.InMesh(jitted, setup.mesh, config.mesh.rules), batch_sh


# ----------------------------------------------------------------------------- loop


class Progress:
    """One line per `every` steps: step, loss, lr, steps/s, ETA (and skipped updates)."""

    def __init__(self, total: int, start: int, label: str = ""):
        self.total, self.start, self.label = total, start, label
        self.t0 = time.perf_counter()

    def line(self, step: int, loss: float, lr: float, skipped: int = 0) -> str:
        done = step - self.start
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        prefix = f"[{self.label}] " if self.label else ""
        warn = f"  SKIPPED {skipped} non-finite updates" if skipped else ""
        return (
            f"{prefix}step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  "
            f"{rate:.2f} steps/s  ETA {eta / 60:.1f} min{warn}"
        )


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line cut short (a kill mid-write)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    """Where logged steps go: a progress line on stdout and, on the primary process,
    ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard scalars.

    Resuming at step `start`, lines of later steps (written before the interruption, or
    cut short by it) are dropped and TensorBoard is told to purge its events after
    `start`, so each step is logged once."""

    SCALARS = ("loss", "grad_norm", "lr", "ctc_loss", "distill_loss", "hidden_loss", "skipped")

    def __init__(self, workdir: pathlib.Path, progress: Progress, primary: bool):
        self.progress = progress
        self._stack = contextlib.ExitStack()
        self.file = self.writer = None
        self.path = workdir / "metrics.jsonl"
        if primary:
            dropped = self._drop_after(progress.start)
            if dropped:
                print(f"metrics.jsonl: dropped {dropped} lines after step {progress.start} "
                      "(written before the interruption)", flush=True)
            with storage.writing(self.path, "training metrics"):
                self.file = self._stack.enter_context(open(self.path, "a"))
            self.writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=progress.start + 1)
            self._stack.callback(self._close_writer, workdir / "tensorboard")

    def _close_writer(self, directory: pathlib.Path) -> None:
        with storage.writing(directory, "TensorBoard events"):
            self.writer.close()

    def _drop_after(self, step: int) -> int:
        if not self.path.is_file():
            return 0
        lines = self.path.read_text().splitlines(keepends=True)
        keep = [line for line in lines if _logged_step(line) <= step]
        if len(keep) < len(lines):
            storage.write_text_atomic(self.path, "".join(keep), "training metrics")
        return len(lines) - len(keep)

    def write(self, step: int, metrics: dict, lr: float, skipped: int) -> None:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        m.update(lr=lr, step=step, skipped=skipped)
        print(self.progress.line(step, m["loss"], m["lr"], skipped), flush=True)
        if self.file is not None:
            with storage.writing(self.path, "training metrics"):
                self.file.write(json.dumps(m) + "\n")
                self.file.flush()
        if self.writer is not None:
            for k in self.SCALARS:
                if k in m:
                    self.writer.add_scalar(f"train/{k}", m[k], step)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()


class NonFiniteStorm(RuntimeError):
    """Too many consecutive updates skipped for a non-finite loss or gradient."""


class StepMonitor:
    """Reads every step's metrics one step late (the next step is already queued, so the
    host never idles the device): counts skipped updates, logs due steps, stops a
    non-finite storm, and reports whether all processes agreed to stop (preemption)."""

    def __init__(self, mlog: MetricsLog, schedule, train_cfg):
        self.mlog, self.schedule, self.t = mlog, schedule, train_cfg
        self.pending = None
        self.skipped_since_log = 0
        self.consecutive = 0

    def after(self, step: int, metrics: dict, polled) -> bool:
        """Queue step `step`'s outputs; process the previous step's. True: stop now."""
        previous, self.pending = self.pending, (step, metrics, polled)
        return previous is not None and self._process(*previous)

    def flush(self) -> bool:
        """Process the queued step now; True: stop."""
        previous, self.pending = self.pending, None
        return previous is not None and self._process(*previous)

    def _process(self, step: int, metrics: dict, polled) -> bool:
        skipped = int(jax.device_get(metrics["skipped"]))
        self.skipped_since_log += skipped
        self.consecutive = self.consecutive + 1 if skipped else 0
        if step % self.t.log_every == 0 or step == self.t.num_steps or self.consecutive >= self.t.max_consecutive_skips:
            self.mlog.write(step, metrics, float(self.schedule(step - 1)), self.skipped_since_log)
            self.skipped_since_log = 0
        if self.consecutive >= self.t.max_consecutive_skips:
            raise NonFiniteStorm(
                f"the last {self.consecutive} updates (to step {step}) were all skipped: the loss or "
                "gradient is not finite. Lower train.learning_rate or train.grad_clip, or check "
                "the data; the weights and checkpoints are those before the storm (skipped "
                "updates change nothing). "
                f"(train.max_consecutive_skips={self.t.max_consecutive_skips})"
            )
        return preemption.Watcher.stop_agreed(polled)


def prepare_train_data(config, workdir: pathlib.Path):
    """(tokenizer, prepared train split). Process 0 finds the manifests (synthesizing the
    embedded corpus if needed) and trains the tokenizer, the others then reuse its files;
    all prepare their shares of the split at once."""
    with distributed.primary_first("prepare_tokenizer"):
        train_manifest = run.resolve_manifests(config)["train"]
        tokenizer = run.load_or_train_tokenizer(config, workdir, train_manifest)
    train_split = run.prepare_split(config, workdir, train_manifest, tokenizer, train=True)
    log.info("train data: %s", pipeline.skip_report(train_split))
    return tokenizer, train_split


def initial_state(config, setup: run.Setup, ckpts: checkpoints.Checkpoints, it) -> run.TrainState:
    """The newest checkpoint that restores (and the data position saved with it), else a
    fresh state (from `init_from`'s weights when set)."""
    found = ckpts.restore(lambda step: run.restore_state(ckpts.mngr, step, setup))
    if found is not None:
        step, (state, data_state) = found
        it.set_state(data_state)
        print(f"resumed from step {step} ({ckpts.directory})", flush=True)
        return state
    state = setup.init_fn(jax.random.PRNGKey(config.seed))
    if config.init_from:
        return run.load_float_weights(setup, state, config.init_from)
    return run.init_ranges(setup, state)


def _train_loop(config, workdir, setup, step, state, it, ckpts) -> run.TrainState:
    """Steps from `state.step` to train.num_steps with logging and checkpoints; on an
    agreed stop request (`usmqs.preemption`) saves at the current step and raises
    `Preempted`."""
    step_fn, batch_sh, teacher = step
    t = config.train
    start = int(jax.device_get(state.step))
    primary = distributed.is_primary()
    with preemption.Watcher() as watch, MetricsLog(workdir, Progress(t.num_steps, start, config.label), primary) as mlog:
        monitor = StepMonitor(mlog, setup.schedule, t)
        stop = False
        for n in range(start + 1, t.num_steps + 1):
            state, metrics = step_fn(state, run.device_batch(next(it), batch_sh), *teacher)
            stop = monitor.after(n, metrics, watch.poll())
            if n % t.checkpoint_every == 0 or n == t.num_steps or stop:
                # Log step n before its checkpoint exists (a kill in between would lose
                # its line for good); all processes read step n's stop flag here alike.
                stop = monitor.flush() or stop
                run.save_state(ckpts, state, it.get_state())
            if stop:
                break
        monitor.flush()
    if stop and n < t.num_steps:
        ckpts.wait()
        raise preemption.Preempted(n, watch.signal_name or "a signal to another process", str(workdir))
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (resuming from `workdir` when it holds checkpoints), then evaluate.

    Returns the evaluation metrics (also written to `workdir/eval.json`); with
    ``eval.dev`` and a dev split, the dev split's under ``"dev"`` (`eval_dev.json`).
    With several processes (`usmqs.distributed`) every process calls this; process 0
    writes the single-copy files (config.json, metrics.jsonl, TensorBoard, eval outputs).
    """
    config_lib.validate(config)
    distributed.maybe_initialize(config)
    primary = distributed.is_primary()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if primary:
        config_lib.save(config, workdir)  # what `usmqs evaluate/export --workdir` read
    tokenizer, train_split = prepare_train_data(config, workdir)
    setup = run.build(config, tokenizer.vocab_size)
    print(run.describe_policy(config, setup), flush=True)
    step_fn, batch_sh = make_train_step(setup, config)
    ckpts = checkpoints.Checkpoints(workdir, keep=config.train.keep_checkpoints)
    it = pipeline.make_train_iterator(
        train_split, config.data, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    try:
        state = initial_state(config, setup, ckpts, it)
        # Distillation: the init_from weights, frozen, as the teacher (read again, also on
        # a fresh start: the step donates state.params, so the teacher needs its own buffers).
        teacher = (run.load_params(setup, config.init_from),) if distills(config) else ()
        state = _train_loop(config, workdir, setup, (step_fn, batch_sh, teacher), state, it, ckpts)
        if ckpts.latest_step() != int(jax.device_get(state.step)):
            run.save_state(ckpts, state, it.get_state())  # e.g. 0 steps: post-training compression
    finally:
        ckpts.close()  # waits for the pending write (and raises its error)
    if not config.eval.at_end:
        return {}
    decode = dict(state=state, setup=setup, eval_step=evaluate_lib.make_eval_step(setup, config))
    metrics = evaluate_lib.evaluate_workdir(config, workdir, **decode)
    if evaluate_lib.decodes_dev(config):
        metrics["dev"] = evaluate_lib.evaluate_workdir(config, workdir, split="dev", **decode)
    return metrics
