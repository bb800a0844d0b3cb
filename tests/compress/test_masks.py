"""Mask schedules and model-level mask updates (stacked layers, traced step, in jit)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from usmqs.compress import masks, ops
from usmqs.compress.layers import Conv, Dense, SparsityMask
from usmqs.compress.policy import Every, Gradual, OneShot, Policy, PruneGrad, Rule, WeightSpec

NUM_LAYERS = 3


def test_is_update_step():
    steps = jnp.arange(12)
    due = lambda sched: [int(s) for s in steps if ops.is_update_step(sched, s)]
    assert due(OneShot(at_step=3)) == [3]
    assert due(Every(every=3, start=2)) == [2, 5, 8, 11]
    assert due(Gradual(begin=2, end=9, every=3)) == [2, 5, 8, 9]


def test_gradual_keep_count_ramps_from_m_to_n():
    spec = WeightSpec(nm=(1, 4), mask_schedule=Gradual(begin=10, end=40))
    n = [int(ops.keep_count(spec, s)) for s in (0, 10, 19, 20, 29, 30, 39, 40, 1000)]
    assert n == [4, 4, 4, 3, 3, 2, 2, 1, 1]
    assert int(ops.keep_count(WeightSpec(nm=(2, 4)), 5)) == 2


class Block(nnx.Module):
    def __init__(self, policy, rngs):
        self.q = Dense(8, (2, 4), path="blocks/attn/q", policy=policy, kernel_axes=(None,) * 3, rngs=rngs)
        self.dw = Conv(8, 8, (15,), feature_group_count=8, path="blocks/conv/dw", policy=policy,
                       kernel_axes=(None,) * 3, rngs=rngs)
        self.out = Dense(8, 8, path="blocks/ffn/w_out", policy=policy, kernel_axes=(None,) * 2, rngs=rngs)


class Tiny(nnx.Module):
    """Conformer-shaped: a 3x3 front conv with 1 input channel, blocks stacked for scan."""

    def __init__(self, policy, rngs):
        self.conv1 = Conv(1, 8, (3, 3), path="subsample/conv1", policy=policy, kernel_axes=(None,) * 4, rngs=rngs)

        @nnx.split_rngs(splits=NUM_LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(policy, rngs)

        self.blocks = make_blocks(rngs)


def _masks(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, SparsityMask))}


def _check_nm(model, n):
    """Every mask keeps n per group of 4 along its layer's contraction axes, per stacked layer."""
    for _, layer in masks.masked_layers(model):
        kernel, mask = np.asarray(layer.kernel[...]), np.asarray(layer.mask[...])
        stacked = kernel.ndim > len(layer.kernel_shape)
        for k, m in zip(kernel, mask) if stacked else [(kernel, mask)]:
            np.testing.assert_array_equal(m, ops.nm_mask(jnp.asarray(k), n, 4, layer.contract_axes))
            if layer.path == "blocks/attn/q":
                np.testing.assert_array_equal(m.reshape(2, 4, 2, 4).sum(1), n)


def test_padded_groups_for_the_front_conv_and_the_depthwise_conv():
    model = Tiny(Policy(rules=(Rule(".*", WeightSpec(nm=(2, 4))),)), nnx.Rngs(0))
    masks.update_masks(model, 0)
    conv1, dw = np.asarray(model.conv1.mask[...]), np.asarray(model.blocks.dw.mask[...])
    assert conv1.shape == (3, 3, 1, 8) and dw.shape == (NUM_LAYERS, 15, 1, 8)
    # 9 taps: groups of 4, 4, 1 -> keep 2 + 2 + 1; 15 taps: 4, 4, 4, 3 -> keep 2 + 2 + 2 + 2.
    np.testing.assert_array_equal(conv1.reshape(9, 8).sum(0), 5)
    np.testing.assert_array_equal(dw.reshape(NUM_LAYERS, 15, 8).sum(1), 8)
    _check_nm(model, 2)


def _drive(policy, steps, seed=0):
    """Run update_masks in jax.jit (merge/split, as the train step does) over `steps`,
    perturbing every kernel between steps like an optimizer would; return per-step masks."""
    model = Tiny(policy, nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    traces = []

    @jax.jit
    def update(params, rest, step):
        traces.append(1)
        model = nnx.merge(graphdef, params, rest)
        masks.update_masks(model, step)
        return nnx.split(model, nnx.Param, ...)[2]

    history, key = [], jax.random.key(seed)
    for step in steps:
        rest = update(params, rest, jnp.int32(step))
        model = nnx.merge(graphdef, params, rest)
        history.append((_masks(model), model))
        key, sub = jax.random.split(key)
        leaves, treedef = jax.tree.flatten(params)
        noise = [jax.random.normal(k, x.shape) for k, x in zip(jax.random.split(sub, len(leaves)), leaves)]
        params = jax.tree.unflatten(treedef, [x + 0.5 * e for x, e in zip(leaves, noise)])
    assert len(traces) == 1, "a traced step must not recompile"
    return history


def _changed(a, b):
    return {k for k in a if not np.array_equal(a[k], b[k])}


@pytest.mark.parametrize("mode", [PruneGrad.STE, PruneGrad.SRSTE])
def test_masks_fixed_between_scheduled_updates_and_recomputed_at_them(mode):
    policy = Policy(rules=(Rule(".*", WeightSpec(nm=(2, 4), weight_bits=4, prune_grad=mode, mask_schedule=Every(every=3, start=1))),))
    history = _drive(policy, range(8))
    all_masks = set(history[0][0])
    assert len(all_masks) == 4
    assert all(m.all() for m in history[0][0].values())  # dense before start
    for step in range(1, 8):
        changed = _changed(history[step - 1][0], history[step][0])
        if (step - 1) % 3 == 0:
            assert changed == all_masks, step  # weights moved a lot: every mask moves
            _check_nm(history[step][1], 2)
        else:
            assert not changed, step


def test_one_shot_masked_mask_never_changes_after_its_step():
    history = _drive(Policy(rules=(Rule(".*", WeightSpec(nm=(1, 4), mask_schedule=OneShot(at_step=2))),)), range(6))
    assert all(m.all() for h in history[:2] for m in h[0].values())
    _check_nm(history[2][1], 1)
    for step in range(3, 6):
        assert not _changed(history[2][0], history[step][0])


def test_gradual_schedule_ends_at_exactly_n_per_m():
    sched = Gradual(begin=1, end=7, every=2)
    policy = Policy(rules=(Rule("blocks/attn/q", WeightSpec(nm=(1, 4), mask_schedule=sched)),))
    history = _drive(policy, range(10))
    spec = policy.resolve("blocks/attn/q")
    key = "blocks/q/mask"
    kept = [h[0][key].reshape(NUM_LAYERS, 2, 4, 2, 4).sum(2) for h in history]
    expected = [4, 4, 4, 3, 3, 2, 2, 1, 1, 1]  # recomputed at 1, 3, 5, 7 with n_t = keep_count
    for step, k in enumerate(kept):
        np.testing.assert_array_equal(k, expected[step])
        if ops.is_update_step(sched, step):
            assert expected[step] == int(ops.keep_count(spec, step))
    # MASKED: pruned weights stay pruned, so the ramp is nested: the last update ranks
    # the weights at step 7 among those kept at step 6.
    for a, b in zip(history, history[1:]):
        assert not np.any(b[0][key] & ~a[0][key])
    w7 = history[7][1].blocks.q.kernel[...]
    for layer in range(NUM_LAYERS):
        score = jnp.where(history[6][0][key][layer], w7[layer], 0)
        np.testing.assert_array_equal(history[7][0][key][layer], ops.nm_mask(score, 1, 4, 0))


def test_update_masks_under_nnx_jit_mutates_the_model_and_returns_the_masks():
    model = Tiny(Policy.named("int4+2:4"), nnx.Rngs(1))

    @nnx.jit
    def update(model, step):
        return masks.update_masks(model, step)

    state = update(model, jnp.int32(5))  # OneShot(0): nothing due at step 5
    assert all(np.asarray(v[...]).all() for _, v in nnx.to_flat_state(state))
    state = update(model, jnp.int32(0))
    # The named policies leave the front conv and the depthwise convs dense (NM_EXEMPT).
    assert {k for k, _ in nnx.to_flat_state(state)} == {("blocks", "q", "mask"), ("blocks", "out", "mask")}
    assert model.conv1.mask is None and model.blocks.dw.mask is None
    assert model.conv1.spec.weight_bits == model.blocks.dw.spec.weight_bits == 4
    _check_nm(model, 2)


def test_force_prunes_now_at_the_final_pattern():
    policy = Policy(rules=(Rule(".*", WeightSpec(nm=(1, 4), mask_schedule=Gradual(begin=100, end=200))),))
    model = Tiny(policy, nnx.Rngs(2))
    masks.update_masks(model, 0)
    assert all(m.all() for m in _masks(model).values())
    masks.update_masks(model, 0, force=True)
    _check_nm(model, 1)
