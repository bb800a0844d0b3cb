"""What every command needs from a workdir: data, tokenizer, model setup, checkpoints.

`train`, `evaluate`, `export`, `compile`, `study` and the benches build on these pieces:

* data: `resolve_manifests` (configured manifests, else the embedded corpus, synthesized
  and cached), `load_or_train_tokenizer`, `cache_dir` (prepared features);
  `batch_layout` / `batch_shardings` (the arrays a step takes) and `model_inputs` (a
  batch -> the model's features, computed in the step with ``data.features_on_device``);
* model: `build(config, vocab_size)` -> `Setup` (policy, optimizer, mesh, abstract state
  and its shardings, a jitted sharded `init_fn`), shapes first, nothing allocated;
* checkpoints: `checkpoint_manager`, `restore_state` / `save_state` (the whole
  `TrainState` plus the data iterator position), `load_params` / `load_float_weights`
  (`init_from`: another run's weights only; `newest_params` with their step), `init_masks`.

A workdir holds ``config.json`` (the resolved config, `usmqs.config.save`),
``tokenizer.model``, ``checkpoints/``, ``metrics.jsonl`` and the evaluation outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, struct

from usmqs import checkpoints, distributed
from usmqs import sharding as sharding_lib
from usmqs.compress import masks as masks_lib
from usmqs.compress.export_format import named_leaves
from usmqs.compress.layers import QuantRange, calibrate_ranges, compressible_layers
from usmqs.compress.policy import Policy, policy_from_config
from usmqs.data import features_jax, pipeline
from usmqs.data.text import normalize_text
from usmqs.data.tokenizer import Tokenizer
from usmqs.models.conformer import EARLIER_FRONT_END, ConformerCTC

log = logging.getLogger("usmqs.run")

TOKENIZER_FILE = "tokenizer.model"
CHECKPOINT_DIR = checkpoints.CHECKPOINT_DIR


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
    if d.train_manifest and d.eval_manifest:
        return {"train": d.train_manifest, "eval": d.eval_manifest, "dev": d.dev_manifest or None}
    # The synthesizer is an optional extra (GPL espeak-ng): imported only when used.
    from usmqs.data import synth

    paths = synth.synthesize_corpus(
        pathlib.Path(d.synth_dir).expanduser(),
        num_train=d.synth_num_train,
        num_test=d.synth_num_test,
        num_dev=d.synth_num_dev,
        seed=d.synth_seed,
    )
    return {"train": str(paths["train"]), "eval": str(paths["test"]), "dev": d.dev_manifest or str(paths["dev"])}


def load_or_train_tokenizer(config, workdir: pathlib.Path, train_manifest: str) -> Tokenizer:
    """The run's tokenizer: saved in the workdir (or copied from `init_from`), else
    trained on the normalized texts of `train_manifest` and saved there."""
    path = workdir / TOKENIZER_FILE
    if not path.exists() and config.init_from:
        src = pathlib.Path(config.init_from) / TOKENIZER_FILE
        if not src.exists():
            raise FileNotFoundError(f"init_from={config.init_from}: no {TOKENIZER_FILE}")
        shutil.copyfile(src, path)
    if path.exists():
        return Tokenizer.load(path)
    raw = pipeline.manifest_transcripts(train_manifest, config.data)
    texts = [t for t in (normalize_text(r) for r in raw) if t]
    return Tokenizer.train(
        texts,
        str(path.with_suffix("")),
        vocab_size=config.data.vocab_size,
        model_type=config.data.tokenizer_type,
    )


def load_tokenizer(workdir: pathlib.Path) -> Tokenizer:
    """The tokenizer of a trained run; a clear error when `workdir` is not one."""
    path = pathlib.Path(workdir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{workdir}: no {TOKENIZER_FILE}; is this a training workdir?")
    return Tokenizer.load(path)


def prepare_split(
    config, workdir: pathlib.Path, manifest: str, tokenizer: Tokenizer, *, train: bool,
    store_audio: bool | None = None,
):
    """`pipeline.prepare_split` by every process at once: each prepares its share of the
    shards, then all assemble the split once everyone is done. `store_audio`: None =
    ``data.features_on_device``; False for a reader that needs host features (serving)."""
    return pipeline.prepare_split(
        manifest, tokenizer, config.data, cache_dir(config, workdir), train=train,
        process_index=jax.process_index(), process_count=jax.process_count(),
        barrier=lambda: distributed.barrier(f"prepared {pathlib.Path(manifest).name}"),
        store_audio=store_audio,
    )


# A step's input arrays and their ranks: host features, or audio featurized in the step.
FEATURE_INPUTS = (("features", 3), ("feature_mask", 2))
AUDIO_INPUTS = (("audio", 2), ("num_samples", 1))
LABEL_INPUTS = (("labels", 2), ("label_mask", 2))
# fold_in(state.rng, AUGMENT_STREAM) roots the step's SpecAugment keys: a value no step
# count reaches, so they never meet the model's fold_in(state.rng, step) dropout keys.
AUGMENT_STREAM = 2**31 - 1


def batch_layout(config, *, labels: bool = True, audio: bool | None = None) -> tuple[tuple[str, int], ...]:
    """``(key, ndim)`` of the arrays a step reads from a batch (`usmqs.data.pipeline`
    layout): audio + num_samples with ``data.features_on_device`` (or `audio`; `config`
    is read only when `audio` is None), else features + feature_mask; then labels +
    label_mask when `labels`."""
    audio = config.data.features_on_device if audio is None else audio
    return (AUDIO_INPUTS if audio else FEATURE_INPUTS) + (LABEL_INPUTS if labels else ())


def batch_shardings(config, mesh: jax.sharding.Mesh, **layout) -> dict:
    """``{key: NamedSharding}`` of `batch_layout`: rows over the `batch` logical axis."""
    return {k: sharding_lib.batch_sharding(mesh, nd, config.mesh.rules) for k, nd in batch_layout(config, **layout)}


def model_inputs(config, batch: dict, augment_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(features [B, T, F], feature_mask [B, T]) of a batch inside a jitted step: as the
    host made them, or from its audio (`features_jax.front_end`: log-mel, normalization
    and, given `augment_rng` and ``data.spec_augment.enabled``, SpecAugment)."""
    if "audio" not in batch:
        return batch["features"], batch["feature_mask"]
    d = config.data
    return features_jax.front_end(
        batch["audio"], batch["num_samples"], pipeline.feature_config(d), norm=d.feature_norm,
        augment=pipeline.spec_augment_settings(d), rng=augment_rng,
    )


def cache_dir(config, workdir: pathlib.Path) -> pathlib.Path:
    """Where prepared features go: ``data.cache_dir``, else ``WORKDIR/data_cache``."""
    if config.data.cache_dir:
        return pathlib.Path(config.data.cache_dir).expanduser()
    return pathlib.Path(workdir) / "data_cache"


# ---------------------------------------------------------------------------- model


def make_model(config, vocab_size: int, policy: Policy | None, rng) -> ConformerCTC:
    return ConformerCTC(config.model, vocab_size, policy=policy, rngs=nnx.Rngs(params=rng))


def make_optimizer(config, policy: Policy | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping, and its warmup-cosine learning-rate schedule.

    Learned quantization ranges (`QuantRange`, when `policy` has `learned_scale` rules)
    get no weight decay: it would pull their logs to 0, i.e. every range towards 1.
    """
    t = config.train
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=t.learning_rate,
        warmup_steps=t.warmup_steps,
        decay_steps=max(t.num_steps, t.warmup_steps + 1),
        end_value=t.learning_rate * t.end_lr_ratio,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(
            schedule, b1=0.9, b2=0.98, eps=1e-9, weight_decay=t.weight_decay,
            mask=_not_ranges if policy is not None and policy.learns_ranges else None,
        ),
    )
    return tx, schedule


def _not_ranges(params: nnx.State):
    """True for every weight but the learned quantization ranges (the decay mask: a
    prefix of `params`, one bool per variable)."""
    return jax.tree.map(
        lambda v: not isinstance(v, QuantRange), params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


@dataclasses.dataclass(frozen=True)
class Setup:
    """The static pieces of a run, built once from the config (`build`)."""

    graphdef: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    state_shardings: Any  # TrainState of NamedShardings
    abstract_state: Any  # TrainState of ShapeDtypeStructs
    policy: Policy | None
    vocab_size: int
    # rng key -> a fresh TrainState, jitted straight into `state_shardings`.
    init_fn: Callable[[jax.Array], TrainState]


def build(config, vocab_size: int, mesh=None) -> Setup:
    """Shapes first, then shardings: nothing is allocated here."""
    policy = policy_from_config(config.policy)
    tx, schedule = make_optimizer(config, policy)
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
    init_fn = jax.jit(init, out_shardings=shardings)
    return Setup(graphdef, tx, schedule, mesh, shardings, abstract_state, policy, vocab_size, init_fn)


def describe_policy(config, setup: Setup) -> str:
    """Rule -> matched layers table; a rule that matches no layer is an error."""
    abstract_model = nnx.merge(setup.graphdef, setup.abstract_state.params, setup.abstract_state.rest)
    layers = compressible_layers(abstract_model)
    setup.policy.check_all_rules_matched(layers)
    return f"policy {config.policy.name}:\n" + setup.policy.report(layers)


def teacher_graphdef(config, vocab_size: int):
    """Graph of the frozen float teacher: the same model without a policy (weights only)."""
    abstract = nnx.eval_shape(lambda: make_model(config, vocab_size, None, jax.random.key(0)))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the float teacher model has non-parameter state; distillation expects none")
    return graphdef


@contextlib.contextmanager
def mesh_rules(mesh: jax.sharding.Mesh, rules):
    """The mesh and logical-axis rules active, so that the model's activation sharding
    constraints resolve while a function is traced (they are no-ops outside)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(rules)):
        yield


class InMesh:
    """A jitted function called (and so traced) under `mesh_rules`; ``lower`` lowers it
    ahead of time (ShapeDtypeStructs with shardings) under the same context."""

    def __init__(self, jitted, mesh: jax.sharding.Mesh, rules):
        self.jitted, self.mesh, self.rules = jitted, mesh, tuple(rules)

    def __call__(self, *args, **kwargs):
        with mesh_rules(self.mesh, self.rules):
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with mesh_rules(self.mesh, self.rules):
            return self.jitted.lower(*args, **kwargs)


def device_batch(batch: dict, shardings: dict) -> dict:
    """Host batch (this process's rows) -> global sharded arrays."""
    return {
        k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k]))
        for k in shardings
    }


# ----------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: pathlib.Path) -> ocp.CheckpointManager:
    """A read-only manager of the run's checkpoints (for readers: evaluate, export)."""
    return checkpoints.manager(workdir, read_only=True)


def abstract_with_shardings(setup: Setup):
    """The abstract TrainState with each leaf's sharding (a restore or lowering target)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        setup.abstract_state,
        setup.state_shardings,
    )


def check_params_fit(mngr: ocp.CheckpointManager, step: int, params) -> None:
    """Raise `checkpoints.IncompatibleCheckpoint` naming every weight of checkpoint `step`
    whose shape differs from `params` (this model's abstract params): another preset or
    vocabulary, or a run from before the subsampler was padded (its subsample/proj is
    narrower). Orbax's own error would name neither the array nor the step."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        meta = handler.metadata(mngr.directory / str(step) / "state")
    finally:
        handler.close()
    stored = {k.removesuffix("/value"): v.shape for k, v in named_leaves(meta.tree["params"]).items()}
    wrong = {
        name: (tuple(stored[name]), tuple(x.shape))
        for name, x in named_leaves(params).items()
        if name in stored and tuple(stored[name]) != tuple(x.shape)
    }
    if not wrong:
        return
    msg = f"checkpoint {mngr.directory}/{step} does not fit this model: " + "; ".join(
        f"{name} is {list(have)} there, {list(want)} here" for name, (have, want) in wrong.items()
    )
    if set(wrong) == {"subsample/proj/kernel"}:
        msg += f" (only the subsampler's output width differs: {EARLIER_FRONT_END})"
    raise checkpoints.IncompatibleCheckpoint(msg)


def restore_state(mngr: ocp.CheckpointManager, step: int, setup: Setup):
    """(TrainState, data iterator state) of checkpoint `step`, in the run's shardings."""
    check_params_fit(mngr, step, setup.abstract_state.params)
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_with_shardings(setup)),
            data=ocp.args.JsonRestore(),
        ),
    )
    return restored.state, restored.data


def restore_latest(workdir: pathlib.Path, setup: Setup) -> TrainState:
    """The TrainState of the run's newest checkpoint that restores (older ones are tried
    when newer ones are damaged, with a warning); an error naming the workdir if none."""
    mngr = checkpoint_manager(workdir)
    found = checkpoints.restore_newest(
        mngr, lambda step: restore_state(mngr, step, setup)[0], what=str(workdir)
    )
    mngr.close()
    if found is None:
        raise FileNotFoundError(f"{workdir}: no checkpoint under {pathlib.Path(workdir) / CHECKPOINT_DIR}")
    return found[1]


def save_state(ckpts: checkpoints.Checkpoints, state: TrainState, data_state: dict) -> None:
    """Start an asynchronous save of `state` (and the data position) at its step."""
    ckpts.save(
        int(jax.device_get(state.step)),
        ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
    )


def load_float_weights(setup: Setup, state: TrainState, src: str) -> TrainState:
    """`init_from`: another run's weights (its latest checkpoint), straight into this run's
    shardings; its optimizer state, masks and learned ranges are not read. Masks are then
    computed from the loaded weights (the final N:M pattern, as at step 0), and learned
    quantization ranges calibrated from the masked weights (`init_ranges`), so a run with
    0 steps is post-training compression of the source model.
    """
    params = nnx.merge_state(state.params, load_params(setup, src))
    return init_ranges(setup, init_masks(setup, state.replace(params=params)))


def load_params(setup: Setup, src: str):
    """The weights of `src`'s newest restorable checkpoint, shaped and sharded like this
    run's params (also the distillation teacher's weights): every Param but the learned
    quantization ranges (`QuantRange`), which a float run does not have."""
    return newest_params(setup, src)[1]


def weights_only(params: nnx.State) -> nnx.State:
    """`params` (or their shardings) without the learned quantization ranges: what a
    float run has, and what the distillation teacher takes."""
    return nnx.filter_state(params, nnx.Not(QuantRange))


def newest_params(setup: Setup, src: str) -> tuple[int, Any]:
    """(step, weights) of `src`'s newest restorable checkpoint, the weights shaped and
    sharded like this run's params (`load_params`)."""
    src_dir = pathlib.Path(src)
    mngr = checkpoint_manager(src_dir)
    shardings = weights_only(setup.state_shardings.params)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        weights_only(setup.abstract_state.params),
        shardings,
    )
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), shardings)

    def restore(step):
        check_params_fit(mngr, step, setup.abstract_state.params)
        args = ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True
        )
        return mngr.restore(step, args=ocp.args.Composite(state=args)).state["params"]

    try:
        found = checkpoints.restore_newest(mngr, restore, what=f"init_from={src}")
    except checkpoints.CheckpointError as e:
        raise ValueError(f"{e} (if every step fails alike: preset or vocab differ?)") from e
    mngr.close()
    if found is None:
        raise FileNotFoundError(f"init_from={src}: no checkpoint under {src_dir / CHECKPOINT_DIR}")
    log.info("init_from %s: loaded weights of step %d", src, found[0])
    return found


def init_ranges(setup: Setup, state: TrainState) -> TrainState:
    """Calibrate every learned quantization range from the current (masked) weights
    (`layers.calibrate_ranges`); `state` itself when the policy learns none."""
    if setup.policy is None or not setup.policy.learns_ranges:
        return state

    @functools.partial(jax.jit, out_shardings=setup.state_shardings.params)
    def compute(params, rest):
        model = nnx.merge(setup.graphdef, params, rest)
        calibrate_ranges(model)
        return nnx.split(model, nnx.Param, ...)[1]

    return state.replace(params=compute(state.params, state.rest))


def init_masks(setup: Setup, state: TrainState) -> TrainState:
    """Compute every N:M mask from the current weights now (final pattern)."""

    @functools.partial(jax.jit, out_shardings=setup.state_shardings.rest)
    def compute(params, rest):
        model = nnx.merge(setup.graphdef, params, rest)
        masks_lib.update_masks(model, jnp.zeros((), jnp.int32), force=True)
        return nnx.split(model, nnx.Param, ...)[2]

    return state.replace(rest=compute(state.params, state.rest))
