"""The training loop: `train_and_evaluate(config, workdir)`, usable from tests and notebooks.

Reads top to bottom: data (synthesize or read manifests, tokenizer, prepared splits) ->
model and optimizer state initialized from shapes straight into their shardings -> one
jitted, donated `train_step` (mask schedule, CTC loss, AdamW) -> Orbax checkpoints with
the data iterator position -> final evaluation. Rerunning with the same workdir resumes
from the latest checkpoint (step, optimizer, RNG, data position).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import pathlib
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, struct

from usmqs import distributed
from usmqs.config import NAMED_PRUNING_DEFAULTS
from usmqs import sharding as sharding_lib
from usmqs.compress import masks as masks_lib
from usmqs.compress.layers import compressible_layers
from usmqs.compress.policy import Every, OneShot, Policy, PruneGrad
from usmqs.data import pipeline
from usmqs.data.tokenizer import Tokenizer
from usmqs.models.conformer import ConformerCTC

log = logging.getLogger("usmqs.train")

TOKENIZER_FILE = "tokenizer.model"


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; donated to the step and checkpointed whole."""

    step: jax.Array
    params: nnx.State  # trainable weights (float masters)
    rest: nnx.State  # non-trainable state: sparsity masks (never seen by the optimizer)
    opt_state: Any
    rng: jax.Array  # raw uint32 key; per-step keys are fold_in(rng, step)


# ----------------------------------------------------------------------------- data


def resolve_manifests(config: ml_collections.ConfigDict) -> dict[str, str | None]:
    """The run's manifests, ``{"train", "eval", "dev"}``: the configured ones, else the
    embedded corpus (synthesized and cached). ``dev`` is None when there is none."""
    d = config.data
    train_m, eval_m, dev_m = d.train_manifest, d.eval_manifest, d.get("dev_manifest", "")
    if train_m and eval_m:
        return {"train": train_m, "eval": eval_m, "dev": dev_m or None}
    if train_m or eval_m:
        raise ValueError("set both data.train_manifest and data.eval_manifest, or neither")
    from usmqs.data import synth  # optional extra: only imported when it is used

    paths = synth.synthesize_corpus(
        pathlib.Path(d.synth_dir).expanduser(),
        num_train=d.synth_num_train,
        num_test=d.synth_num_test,
        num_dev=d.get("synth_num_dev", 0),
        seed=d.synth_seed,
    )
    return {"train": str(paths["train"]), "eval": str(paths["test"]), "dev": dev_m or str(paths["dev"])}


def load_or_train_tokenizer(config, workdir: pathlib.Path, train_manifest: str) -> Tokenizer:
    """The run's tokenizer: saved in the workdir (or copied from `init_from`)."""
    path = workdir / TOKENIZER_FILE
    if not path.exists() and config.init_from:
        src = pathlib.Path(config.init_from) / TOKENIZER_FILE
        if not src.exists():
            raise FileNotFoundError(f"init_from={config.init_from}: no {TOKENIZER_FILE}")
        shutil.copyfile(src, path)
    if path.exists():
        return Tokenizer.load(path)
    from usmqs.data.manifest import read_manifest
    from usmqs.data.text import normalize_text

    rows, _ = read_manifest(train_manifest, on_error="skip")
    texts = [t for t in (normalize_text(r.text) for r in rows) if t]
    return Tokenizer.train(
        texts,
        str(path.with_suffix("")),
        vocab_size=config.data.vocab_size,
        model_type=config.data.tokenizer_type,
    )


def cache_dir(config, workdir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(config.data.cache_dir).expanduser() if config.data.cache_dir else (
        workdir / "data_cache"
    )


# ---------------------------------------------------------------------------- model


def make_policy(config) -> Policy:
    p = config.policy
    runtime = p.get("runtime", False)
    pruning = {k: p.get(k, v) for k, v in NAMED_PRUNING_DEFAULTS.items()}
    if p.rules:
        changed = [k for k, v in pruning.items() if v != NAMED_PRUNING_DEFAULTS[k]]
        if runtime or changed:
            raise ValueError(
                f"policy.{'runtime' if runtime else changed[0]} applies to named policies "
                "(custom policy.rules carry their own fields): leave policy.rules empty"
            )
        return Policy.from_config([dict(r) for r in p.rules])
    if pruning["prune_grad"] not in {g.value for g in PruneGrad}:
        raise ValueError(f"policy.prune_grad must be one of {[g.value for g in PruneGrad]}, got {pruning['prune_grad']!r}")
    every = pruning["mask_every"]
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"policy.mask_every must be an int >= 0 (0: one-shot at step 0), got {every!r}")
    return Policy.named(
        p.name,
        runtime=runtime,
        mask_schedule=Every(every=every) if every else OneShot(),
        prune_grad=PruneGrad(pruning["prune_grad"]),
        srste_lambda=float(pruning["srste_lambda"]),
    )


def make_model(config, vocab_size: int, policy: Policy | None, rng) -> ConformerCTC:
    return ConformerCTC(config.model, vocab_size, policy=policy, rngs=nnx.Rngs(params=rng))


def make_optimizer(config) -> optax.GradientTransformation:
    t = config.train
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=t.learning_rate,
        warmup_steps=t.warmup_steps,
        decay_steps=max(t.num_steps, t.warmup_steps + 1),
        end_value=t.learning_rate * t.end_lr_ratio,
    )
    return optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-9, weight_decay=t.weight_decay),
    ), schedule


@dataclasses.dataclass
class Setup:
    """The static pieces of a run, built once from the config."""

    graphdef: Any
    tx: optax.GradientTransformation
    schedule: Any
    mesh: jax.sharding.Mesh
    state_shardings: Any
    abstract_state: Any
    policy: Policy | None
    vocab_size: int


def build(config, vocab_size: int, mesh=None) -> Setup:
    """Shapes first, then shardings: nothing is allocated here."""
    policy = make_policy(config)
    tx, schedule = make_optimizer(config)
    mesh = mesh if mesh is not None else sharding_lib.make_mesh(config.mesh)

    def init(rng):
        model = make_model(config, vocab_size, policy, rng)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            rest=rest,
            opt_state=tx.init(params),
            rng=jax.random.PRNGKey(config.seed),
        )

    abstract_model = nnx.eval_shape(lambda: make_model(config, vocab_size, policy, jax.random.key(0)))
    graphdef = nnx.split(abstract_model, nnx.Param, ...)[0]
    abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
    logical = nnx.get_partition_spec(abstract_state)
    shardings = sharding_lib.tree_shardings(abstract_state, logical, mesh, config.mesh.rules)
    setup = Setup(graphdef, tx, schedule, mesh, shardings, abstract_state, policy, vocab_size)
    setup.init_fn = jax.jit(init, out_shardings=shardings)
    return setup


def describe_policy(config, setup: Setup) -> str:
    """Rule -> matched layers table; a rule that matches no layer is an error."""
    abstract_model = nnx.merge(setup.graphdef, setup.abstract_state.params, setup.abstract_state.rest)
    layers = compressible_layers(abstract_model)
    setup.policy.check_all_rules_matched(layers)
    return f"policy {config.policy.name}:\n" + setup.policy.report(layers)


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


def distills(config) -> bool:
    """Whether the run distils from a float teacher (`train.distill_weight` > 0)."""
    weight = config.train.get("distill_weight", 0.0)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"train.distill_weight must be in [0, 1], got {weight!r}")
    if weight and not config.init_from:
        raise ValueError("train.distill_weight > 0 needs init_from: the float run to distil from")
    if weight and not config.train.get("distill_temperature", 1.0) > 0:
        raise ValueError(f"train.distill_temperature must be > 0, got {config.train.distill_temperature!r}")
    return weight > 0


def teacher_graphdef(config, vocab_size: int):
    """Graph of the frozen float teacher: the same model without a policy (weights only)."""
    abstract = nnx.eval_shape(lambda: make_model(config, vocab_size, None, jax.random.key(0)))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the float teacher model has non-parameter state; distillation expects none")
    return graphdef


def make_train_step(setup: Setup, config):
    """The jitted, donated step: `step(state, batch)`, or with distillation (`distills`)
    `step(state, batch, teacher_params)` (the init_from weights, sharded like `params`)."""
    graphdef, tx = setup.graphdef, setup.tx
    distill = distills(config)
    alpha = float(config.train.get("distill_weight", 0.0))
    temperature = float(config.train.get("distill_temperature", 1.0))
    t_graphdef = teacher_graphdef(config, setup.vocab_size) if distill else None

    def loss_fn(params, rest, batch, rng, teacher_logits):
        model = nnx.merge(graphdef, params, rest)
        logits, out_mask = model(batch["features"], batch["feature_mask"], rng=rng)
        loss, _ = ctc_loss(logits, out_mask, batch["labels"], batch["label_mask"])
        if teacher_logits is None:
            return loss, {}
        kl = distill_loss(logits, teacher_logits, out_mask, temperature)
        return (1.0 - alpha) * loss + alpha * kl, {"ctc_loss": loss, "distill_loss": kl}

    def train_step(state: TrainState, batch, teacher_params=None):
        rng = jax.random.fold_in(state.rng, state.step)
        teacher_logits = None
        if teacher_params is not None:
            teacher = nnx.merge(t_graphdef, teacher_params, nnx.State({}))
            teacher_logits = jax.lax.stop_gradient(
                teacher(batch["features"], batch["feature_mask"], rng=None)[0]
            )
        model = nnx.merge(graphdef, state.params, state.rest)
        masks_lib.update_masks(model, state.step)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, rest, batch, rng, teacher_logits
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

    batch_sh = {
        k: sharding_lib.batch_sharding(setup.mesh, nd, config.mesh.rules)
        for k, nd in (("features", 3), ("feature_mask", 2), ("labels", 2), ("label_mask", 2))
    }
    in_shardings = (setup.state_shardings, batch_sh)
    if distill:
        in_shardings += (setup.state_shardings.params,)
    jitted = jax.jit(
        train_step,
        in_shardings=in_shardings,
        out_shardings=(setup.state_shardings, None),
        donate_argnums=(0,),
    )
    return in_mesh(jitted, setup.mesh, config.mesh.rules), batch_sh


def in_mesh(fn, mesh, rules):
    """Call (and so trace) `fn` with the mesh and logical-axis rules active, so that the
    model's activation sharding constraints resolve (they are no-ops outside)."""

    def wrapped(*args, **kwargs):
        with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(rules)):
            return fn(*args, **kwargs)

    def lower(*args, **kwargs):  # ahead-of-time: ShapeDtypeStructs with shardings
        with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(rules)):
            return fn.lower(*args, **kwargs)

    wrapped.jitted = fn
    wrapped.lower = lower
    return wrapped


def make_eval_step(setup: Setup, config):
    graphdef = setup.graphdef

    # Replicated outputs, so that every process can read them for host-side decoding.
    replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())

    @functools.partial(jax.jit, out_shardings=replicated)
    def eval_step(params, rest, features, feature_mask):
        model = nnx.merge(graphdef, params, rest)
        logits, out_mask = model(features, feature_mask, rng=None)
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), out_mask

    return in_mesh(eval_step, setup.mesh, config.mesh.rules)


# ----------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: pathlib.Path, config) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.train.keep_checkpoints,
            create=True,
            enable_async_checkpointing=False,
        ),
    )


def abstract_with_shardings(setup: Setup):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        setup.abstract_state,
        setup.state_shardings,
    )


def restore_state(mngr: ocp.CheckpointManager, step: int, setup: Setup):
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_with_shardings(setup)),
            data=ocp.args.JsonRestore(),
        ),
    )
    return restored.state, restored.data


def save_state(mngr, state: TrainState, data_state: dict) -> None:
    step = int(jax.device_get(state.step))
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        ),
        force=True,
    )
    mngr.wait_until_finished()


def load_float_weights(setup: Setup, state: TrainState, src: str) -> TrainState:
    """`init_from`: another run's weights (its latest checkpoint), straight into this run's
    shardings; its optimizer state and masks are not read. Masks are then computed from
    the loaded weights (the final N:M pattern, as at step 0), so a run with 0 steps is
    post-training compression of the source model.
    """
    return init_masks(setup, state.replace(params=load_params(setup, src)))


def load_params(setup: Setup, src: str):
    """The weights of `src`'s latest checkpoint, shaped and sharded like this run's params
    (also the distillation teacher's weights)."""
    src_dir = pathlib.Path(src)
    mngr = ocp.CheckpointManager((src_dir / "checkpoints").absolute())
    step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"init_from={src}: no checkpoint under {src_dir / 'checkpoints'}")
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        setup.abstract_state.params,
        setup.state_shardings.params,
    )
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), setup.state_shardings.params)
    try:
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": target},
                    restore_args={"params": restore_args},
                    partial_restore=True,
                )
            ),
        )
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"init_from={src}: its checkpoint does not fit this model (preset or vocab differ?): {e}"
        ) from e
    mngr.close()
    log.info("init_from %s: loaded weights of step %d", src, step)
    return restored.state["params"]


def init_masks(setup: Setup, state: TrainState) -> TrainState:
    """Compute every N:M mask from the current weights now (final pattern)."""

    @functools.partial(jax.jit, out_shardings=setup.state_shardings.rest)
    def compute(params, rest):
        model = nnx.merge(setup.graphdef, params, rest)
        masks_lib.update_masks(model, jnp.zeros((), jnp.int32), force=True)
        return nnx.split(model, nnx.Param, ...)[2]

    return state.replace(rest=compute(state.params, state.rest))


# ----------------------------------------------------------------------------- loop


class Progress:
    """One line per `every` steps: step, loss, lr, steps/s, ETA."""

    def __init__(self, total: int, start: int, label: str = ""):
        self.total, self.start, self.label = total, start, label
        self.t0 = time.perf_counter()

    def line(self, step: int, loss: float, lr: float) -> str:
        done = step - self.start
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        prefix = f"[{self.label}] " if self.label else ""
        return (
            f"{prefix}step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  "
            f"{rate:.2f} steps/s  ETA {eta / 60:.1f} min"
        )


def device_batch(batch: dict, shardings: dict) -> dict:
    """Host batch (this process's rows) -> global sharded arrays."""
    return {
        k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k]))
        for k in shardings
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (resuming from `workdir` when it holds checkpoints), then evaluate.

    Returns the evaluation metrics (also written to `workdir/eval.json`); with
    ``eval.dev`` and a dev split, the dev split's under ``"dev"`` (`eval_dev.json`).
    With several processes (`usmqs.distributed`) every process calls this; process 0
    writes the single-copy files (config.json, metrics.jsonl, TensorBoard, eval outputs).
    """
    from usmqs import evaluate as evaluate_lib

    distributed.maybe_initialize(config)
    primary = distributed.is_primary()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if primary:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    with distributed.primary_first("prepare_data"):  # the others then reuse its files
        train_manifest = resolve_manifests(config)["train"]
        tokenizer = load_or_train_tokenizer(config, workdir, train_manifest)
        train_split = pipeline.prepare_split(
            train_manifest, tokenizer, config.data, cache_dir(config, workdir), train=True
        )
    log.info("train data: %s", pipeline.skip_report(train_split))

    setup = build(config, tokenizer.vocab_size)
    print(describe_policy(config, setup), flush=True)
    step_fn, batch_sh = make_train_step(setup, config)
    mngr = checkpoint_manager(workdir, config)
    it = pipeline.make_train_iterator(
        train_split, config.data, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    latest = mngr.latest_step()
    if latest is not None:
        state, data_state = restore_state(mngr, latest, setup)
        it.set_state(data_state)
        log.info("resumed from step %d", latest)
    else:
        state = setup.init_fn(jax.random.PRNGKey(config.seed))
        if config.init_from:
            state = load_float_weights(setup, state, config.init_from)

    # Distillation: the init_from weights, frozen, as the teacher (read again, also on a
    # fresh start: the step donates state.params, so the teacher needs buffers of its own).
    teacher = (load_params(setup, config.init_from),) if distills(config) else ()

    num_steps = config.train.num_steps
    start = int(jax.device_get(state.step))
    progress = Progress(num_steps, start, label=config.get("label", ""))
    writer = _summary_writer(workdir)
    with open(workdir / "metrics.jsonl", "a") if primary else contextlib.nullcontext() as mfile:
        for step in range(start, num_steps):
            batch = device_batch(next(it), batch_sh)
            state, metrics = step_fn(state, batch, *teacher)
            last = step + 1 == num_steps
            if (step + 1) % config.train.log_every == 0 or last:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                m["lr"] = float(setup.schedule(step))
                m["step"] = step + 1
                print(progress.line(step + 1, m["loss"], m["lr"]), flush=True)
                if mfile is not None:
                    mfile.write(json.dumps(m) + "\n")
                    mfile.flush()
                if writer is not None:
                    for k in ("loss", "grad_norm", "lr", "ctc_loss", "distill_loss"):
                        if k in m:
                            writer.add_scalar(f"train/{k}", m[k], step + 1)
            if (step + 1) % config.train.checkpoint_every == 0 or last:
                save_state(mngr, state, it.get_state())
    if mngr.latest_step() != int(jax.device_get(state.step)):
        save_state(mngr, state, it.get_state())  # e.g. 0 steps: post-training compression
    if writer is not None:
        writer.close()
    mngr.close()
    if not config.eval.at_end:
        return {}
    metrics = evaluate_lib.evaluate_workdir(config, workdir, state=state, setup=setup)
    if evaluate_lib.decodes_dev(config):
        metrics["dev"] = evaluate_lib.evaluate_workdir(config, workdir, state=state, setup=setup, split="dev")
    return metrics


def _summary_writer(workdir: pathlib.Path):
    if jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(workdir / "tensorboard"))
