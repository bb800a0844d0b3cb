"""How much each layer group's compression costs a trained run, and the best mixed
policy under a size budget (`usmqs.compress.allocate`).

Sensitivity probe (post-training, no fine-tuning): for every (group, candidate), the
run's float weights with only that group compressed by that candidate -- N:M masks
computed one-shot from the weights, then fake quantization, as a PTQ run does -- and the
CTC loss per label token over the first `num_batches` batches of the dev split
(evaluation order: shortest bucket first, no augmentation). The table holds each loss
and its increase over the float model's loss on the same batches, floored at 0 (a
compressed group that happens to lower the loss on a few batches is taken as harmless,
not as helpful); a float candidate's increase is 0 without a forward pass.

One compiled program serves every probe on one integer grid (two programs when the
candidates include asymmetric ones, `probe_config`): the model is built with runtime-valued
settings (``policy.runtime``: every layer holds its [bits, N] as state, `WeightSpec.runtime`),
a probe writes the layers' settings (`layers.set_runtime_setting`) and the jitted loss
recomputes the masks from the weights at the written N before the forward pass.

The table is cached as ``WORKDIR/mixed/sensitivity-<digest>.json`` next to the run's
checkpoints, keyed by the checkpoint step probed, the groups, the candidates and the
probe data (manifest, number of batches and a sha256 of the batches' arrays); a later
call with the same key reads it instead of probing again.

`allocate_run` combines the table with the exact sizes (from the model's shapes) into an
`allocate.Allocation` for a budget, prints it and saves it as
``WORKDIR/mixed/<name>.json`` (name ``mixed@B``, B bits per weight).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from usmqs import config as config_lib
from usmqs import evaluate, run, storage
from usmqs import train as train_lib
from usmqs.compress import allocate, export_format
from usmqs.compress import masks as masks_lib
from usmqs.compress.layers import Conv, Dense, set_runtime_setting, stacked_effective_kernel
from usmqs.compress.packing import IndexEncoding
from usmqs.compress.policy import Policy, setting_rules
from usmqs.data import pipeline

MIXED_DIR = "mixed"  # under the run's workdir: sensitivity tables and allocations
BATCH_KEYS = ("features", "feature_mask", "labels", "label_mask")


def _write_json(path: pathlib.Path, data: dict, what: str) -> None:
    """`data` as JSON to `path` (its folder made first), atomically (`storage`)."""
    with storage.writing(path.parent, what):
        path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_text_atomic(path, json.dumps(data, indent=1) + "\n", what)


def probe_batches(config, workdir: pathlib.Path, num_batches: int) -> list[dict]:
    """The first `num_batches` batches of the dev split, as evaluation orders them."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    manifest, _ = evaluate.split_manifest(config, "dev")
    prepared = pipeline.prepare_split(
        manifest, run.load_tokenizer(workdir), config.data, run.cache_dir(config, workdir), train=False
    )
    batches = [{k: b[k] for k in BATCH_KEYS} for b in itertools.islice(pipeline.eval_batches(prepared, config.data), num_batches)]
    if not batches:
        raise ValueError(f"the dev split {manifest} has no usable utterance")
    return batches


def data_digest(batches: Sequence[dict]) -> str:
    """sha256 of the batches' arrays (shapes, dtypes and bytes), in order."""
    h = hashlib.sha256()
    for b in batches:
        for k in BATCH_KEYS:
            a = np.ascontiguousarray(b[k])
            h.update(f"{k}{a.shape}{a.dtype}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def probe_config(config, symmetric: bool = True):
    """`config` with every layer's bits and N:M as runtime values (all float to begin
    with), on the symmetric or the asymmetric integer grid (a static choice: one program
    per grid); validated. A study's run config loses its study block: the probe is no
    study run (and a study config takes no custom rules)."""
    cfg = copy.deepcopy(config)
    if "study" in cfg:
        with cfg.unlocked():
            del cfg["study"]
    cfg.policy.rules = ()
    overrides = ["policy.name=float", "policy.runtime=True", "policy.mask_every=0", "policy.prune_grad=masked"]
    if not symmetric:  # as custom rules: the named policies are symmetric
        rules = export_format.policy_to_data(Policy(setting_rules(None, None, runtime=True, symmetric=False)),
                                             skip_defaults=True)
        overrides = overrides[:1] + overrides[2:] + [f"policy.rules={tuple(rules)!r}"]
    config_lib.apply_overrides(cfg, overrides)
    config_lib.validate(cfg)
    return cfg


def make_probe_step(setup: run.Setup, config) -> run.InMesh:
    """`probe(params, rest, batch)` -> (summed CTC loss, label tokens): masks recomputed
    at each layer's runtime N from the weights, then the deterministic forward."""
    replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())

    @functools.partial(jax.jit, out_shardings=replicated)
    def probe(params, rest, batch):
        model = nnx.merge(setup.graphdef, params, rest)
        masks_lib.update_masks(model, jnp.zeros((), jnp.int32), force=True)
        logits, out_mask = model(batch["features"], batch["feature_mask"], rng=None)
        loss, _ = train_lib.ctc_loss(logits, out_mask, batch["labels"], batch["label_mask"])
        tokens = jnp.sum(batch["label_mask"], dtype=jnp.float32)
        return loss * tokens, tokens

    return run.InMesh(probe, setup.mesh, config.mesh.rules)


def fresh_rest(setup: run.Setup, config) -> nnx.State:
    """A new model's non-trainable state (all-ones masks, runtime settings), sharded. Only
    it is jitted out: XLA drops the unused weight initialisation (`setup.init_fn` would
    also compute weights and optimizer state)."""

    def init():
        model = run.make_model(config, setup.vocab_size, setup.policy, jax.random.key(0))
        return nnx.split(model, nnx.Param, ...)[2]

    return jax.jit(init, out_shardings=setup.state_shardings.rest)()


class _Grid(NamedTuple):
    """The probe model on one integer grid: its setup and config, and the non-trainable
    state of a fresh model (all float, all-ones masks)."""

    setup: run.Setup
    config: ml_collections.ConfigDict
    rest: nnx.State

    def settings(self, params, assignment: Mapping[str, allocate.Candidate], members) -> nnx.State:
        """`rest` with each layer's runtime setting under `assignment` (other groups float)."""
        model = nnx.merge(self.setup.graphdef, params, jax.tree.map(lambda x: x, self.rest))  # a copy
        set_runtime_setting(model, allocate.assignment_policy(assignment, members))
        return jax.device_put(nnx.split(model, nnx.Param, ...)[2], self.setup.state_shardings.rest)


def _grids(config, setup: run.Setup, candidates) -> dict[bool, _Grid]:
    """symmetric -> `_Grid`, one per integer grid the candidates use (`probe_config`;
    `setup` is the symmetric one's, always there: the float model)."""
    out = {}
    for symmetric in {True} | {c.symmetric for c in candidates}:
        cfg = probe_config(config, symmetric)
        grid_setup = setup if symmetric else run.build(cfg, setup.vocab_size)
        out[symmetric] = _Grid(grid_setup, cfg, fresh_rest(grid_setup, cfg))
    return out


def _mean_loss(step, params, rest, batches) -> float:
    """The CTC loss per label token over `batches` (`make_probe_step`'s sums)."""
    sums = [step(params, rest, b) for b in batches]
    return float(sum(s for s, _ in sums) / sum(n for _, n in sums))


def _probe_losses(grids, params, batches, members, candidates) -> tuple[float, dict]:
    """(float loss, {group: {candidate name: loss}}) per label token over `batches`."""
    steps = {symmetric: make_probe_step(g.setup, g.config) for symmetric, g in grids.items()}

    def loss_of(assignment: dict, symmetric: bool = True) -> float:
        rest = grids[symmetric].settings(params, assignment, members)
        return _mean_loss(steps[symmetric], params, rest, batches)

    base = loss_of({})
    losses = {}
    for group in members:
        t0 = time.perf_counter()
        losses[group] = {c.name: base if c.keeps_float else loss_of({group: c}, c.symmetric) for c in candidates}
        worst = max(losses[group], key=losses[group].get)
        print(f"sensitivity {group}: float loss {base:.4f}, worst {worst} {losses[group][worst]:.4f} "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)
    return base, losses


def make_fisher_step(setup: run.Setup, config) -> run.InMesh:
    """`fisher(params, rest, batch)` -> (the sum over the batch's utterances of each one's
    squared gradient of its CTC loss per label token, params-shaped; utterances): the
    empirical Fisher diagonal, before dividing. Rows without labels add nothing."""

    def utterance_loss(params, rest, features, feature_mask, labels, label_mask):
        model = nnx.merge(setup.graphdef, params, rest)
        logits, out_mask = model(features[None], feature_mask[None], rng=None)
        return train_lib.ctc_loss(logits, out_mask, labels[None], label_mask[None])[0]

    per_utterance = jax.vmap(jax.grad(utterance_loss), in_axes=(None, None, 0, 0, 0, 0))

    @jax.jit
    def fisher(params, rest, batch):
        grads = per_utterance(params, rest, *(batch[k] for k in BATCH_KEYS))
        real = jnp.any(batch["label_mask"], axis=1)

        def squares(g):
            keep = real.reshape(real.shape + (1,) * (g.ndim - 1))
            return jnp.sum(jnp.where(keep, g * g, 0.0), axis=0)

        return jax.tree.map(squares, grads), jnp.sum(real)

    return run.InMesh(fisher, setup.mesh, config.mesh.rules)


def make_distortion_step(setup: run.Setup, config) -> run.InMesh:
    """`distortion(params, rest, fisher)` -> {layer path: sum of F ⊙ (W − W_eff)²} over
    its stacked layers: masks recomputed at each layer's runtime N from the weights,
    W_eff the compressed kernel, F params-shaped (the Fisher diagonal)."""

    @jax.jit
    def distortion(params, rest, fisher):
        model = nnx.merge(setup.graphdef, params, rest)
        masks_lib.update_masks(model, jnp.zeros((), jnp.int32), force=True)
        weighting = nnx.merge(setup.graphdef, fisher, rest)
        out = {}
        for (_, node), (_, f) in zip(nnx.iter_modules(model), nnx.iter_modules(weighting)):
            if isinstance(node, Dense | Conv):
                w = node.kernel[...]
                effective = stacked_effective_kernel(node, w.ndim - len(node.kernel_shape))
                out[node.path] = out.get(node.path, 0.0) + jnp.sum(f.kernel[...] * (w - effective) ** 2)
        return out

    return run.InMesh(distortion, setup.mesh, config.mesh.rules)


def _fisher_damage(grids, params, batches, members, candidates) -> tuple[float, dict]:
    """(float loss, {group: {candidate name: ½ Σ F (W − W_eff)²}}): the second-order
    estimate of the loss increase of compressing that group alone, the Hessian taken as
    the empirical Fisher diagonal (mean over the batches' utterances; the float model's
    gradient is taken as 0: it is trained)."""
    float_grid = grids[True]
    fisher_step = make_fisher_step(float_grid.setup, float_grid.config)
    sums = [fisher_step(params, float_grid.rest, b) for b in batches]
    count = sum(float(n) for _, n in sums)
    fisher = jax.tree.map(lambda *xs: sum(xs) / count, *[f for f, _ in sums])
    base = _mean_loss(make_probe_step(float_grid.setup, float_grid.config), params, float_grid.rest, batches)
    steps = {symmetric: make_distortion_step(g.setup, g.config) for symmetric, g in grids.items()}
    damage = {group: {} for group in members}
    for c in candidates:
        # A layer's distortion depends on its own setting only: one pass per candidate
        # with every group at it, summed per group.
        if c.keeps_float:
            for group in members:
                damage[group][c.name] = 0.0
            continue
        per_path = steps[c.symmetric](params, grids[c.symmetric].settings(params, {g: c for g in members}, members), fisher)
        for group, paths in members.items():
            damage[group][c.name] = 0.5 * float(sum(per_path[p] for p in paths))
    return base, damage


METHODS = allocate.SENSITIVITY_METHODS


def sensitivity_table(
    config,
    workdir,
    *,
    groups: Sequence[allocate.Group] = allocate.DEFAULT_GROUPS,
    candidates: Sequence[allocate.Candidate] = allocate.DEFAULT_CANDIDATES,
    num_batches: int = 4,
    method: str = "ptq",
) -> dict:
    """The table of `method` for the run in `workdir` (module docstring): ``key``,
    ``base_loss``, ``increase`` ({group: {candidate: value}}; for "ptq" also ``loss``),
    ``path``; read from its cache file when one with the same key exists, else computed
    and saved. "ptq": the probe's loss increase; "fisher": ½ Σ F (W − W_eff)²."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    workdir = pathlib.Path(workdir)
    batches = probe_batches(config, workdir, num_batches)
    setup = run.build(probe_config(config), run.load_tokenizer(workdir).vocab_size)
    step, params = run.newest_params(setup, str(workdir))
    key = {
        "step": step,
        "groups": [[g.name, g.module_path] for g in groups],
        "candidates": [c.name for c in candidates],
        "data": {"manifest": evaluate.split_manifest(config, "dev")[0], "num_batches": len(batches),
                 "sha256": data_digest(batches)},
    }
    if method != "ptq":  # the PTQ tables' key (and file) from before there was a choice
        key["method"] = method
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = workdir / MIXED_DIR / f"{'sensitivity' if method == 'ptq' else method}-{digest}.json"
    if path.is_file() and (cached := json.loads(path.read_text())).get("key") == key:
        print(f"sensitivity: reusing {path}", flush=True)
        return {**cached, "path": str(path)}
    abstract = nnx.merge(setup.graphdef, setup.abstract_state.params, setup.abstract_state.rest)
    members = allocate.group_members(allocate.kernels(abstract), groups)
    t0 = time.perf_counter()
    grids = _grids(config, setup, candidates)
    if method == "ptq":
        base, losses = _probe_losses(grids, params, batches, members, candidates)
        table = {
            "key": key,
            "base_loss": base,
            "loss": losses,
            "increase": {g: {c: max(0.0, v - base) for c, v in row.items()} for g, row in losses.items()},
        }
    else:
        base, damage = _fisher_damage(grids, params, batches, members, candidates)
        table = {"key": key, "base_loss": base, "increase": damage}
    table["seconds"] = round(time.perf_counter() - t0, 3)
    _write_json(path, table, f"the {method} sensitivity table")
    return {**table, "path": str(path)}


def model_sizes(
    config, vocab_size: int, groups: Sequence[allocate.Group], candidates: Sequence[allocate.Candidate],
    encoding: IndexEncoding = IndexEncoding.POSITION,
) -> allocate.SizeTable:
    """The exact stored bytes of each group under each candidate, from the model's shapes."""
    abstract = nnx.eval_shape(lambda: run.make_model(config, vocab_size, None, jax.random.key(0)))
    return allocate.size_table(allocate.kernels(abstract), groups, candidates, encoding)


def allocate_run(
    config,
    workdir,
    *,
    bits_per_weight: float | None = None,
    max_bytes: int | None = None,
    groups: Sequence[allocate.Group] = allocate.DEFAULT_GROUPS,
    candidates: Sequence[allocate.Candidate] = allocate.DEFAULT_CANDIDATES,
    num_batches: int = 4,
    method: str = "ptq",
) -> allocate.Allocation:
    """The best mixed policy for the run in `workdir` within the budget (bits per weight
    of the compressible layers, scales counted, or bytes of them): sensitivities from
    `method`'s table (`sensitivity_table`, cached), sizes from shapes; printed, and saved
    as ``WORKDIR/mixed/<name>.json`` (``<name>-fisher.json`` for "fisher"; the
    allocation, its rules and the table's file)."""
    workdir = pathlib.Path(workdir)
    table = sensitivity_table(config, workdir, groups=groups, candidates=candidates, num_batches=num_batches,
                              method=method)
    sizes = model_sizes(config, run.load_tokenizer(workdir).vocab_size, groups, candidates)
    alloc = allocate.allocate(sizes, table["increase"], bits_per_weight=bits_per_weight, max_bytes=max_bytes)
    data = {**alloc.to_data(), "sensitivity_method": method, "sensitivity_table": table["path"]}
    out = workdir / MIXED_DIR / f"{alloc.name}{'' if method == 'ptq' else '-' + method}.json"
    _write_json(out, data, "the mixed-precision allocation")
    print(alloc.describe() + f"\nsaved: {out}", flush=True)
    return alloc
