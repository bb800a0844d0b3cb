"""Numerics of N:M masks, fake quantization and straight-through gradients."""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from usmqs.compress import ops
from usmqs.compress.layers import Conv, Dense
from usmqs.compress.policy import Granularity, Policy, PruneGrad, Rule, WeightSpec

FAST = settings(max_examples=15, deadline=None)

# One compile per shape instead of many eager dispatches: keeps the property tests quick.
_nm_mask = jax.jit(ops.nm_mask, static_argnums=(2, 3))
_fake_quant = jax.jit(ops.fake_quant, static_argnames=("spec", "contract_axes"))


def _groups(x: np.ndarray, m: int, axis) -> np.ndarray:
    """[rows, groups, m] view of x grouped along `axis` (flattened), zero-padded."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    axes = tuple(a % x.ndim for a in axes)
    rest = [a for a in range(x.ndim) if a not in axes]
    x = np.transpose(x, rest + list(axes)).reshape(math.prod(x.shape[a] for a in rest), -1)
    pad = -x.shape[1] % m
    x = np.pad(x, [(0, 0), (0, pad)])
    return x.reshape(x.shape[0], -1, m)


@st.composite
def nm_cases(draw):
    m = draw(st.integers(1, 8))
    n = draw(st.integers(1, m))
    ndim = draw(st.integers(1, 3))
    shape = list(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    shape[axis] = m * draw(st.integers(1, 3))  # whole groups along the axis
    # Few distinct magnitudes (and signs): plenty of ties.
    values = draw(hnp.arrays(np.float32, shape, elements=st.sampled_from([0.0, 1.0, -1.0, 2.0, -0.5])))
    return values, n, m, axis


@FAST
@given(nm_cases())
def test_nm_mask_keeps_exactly_n_largest_per_group(case):
    w, n, m, axis = case
    mask = np.asarray(_nm_mask(jnp.asarray(w), n, m, axis))
    assert mask.shape == w.shape and mask.dtype == np.bool_
    g_mask = _groups(mask, m, axis)
    np.testing.assert_array_equal(g_mask.sum(-1), n)
    mag = np.abs(_groups(w, m, axis))
    kept_min = np.where(g_mask, mag, np.inf).min(-1)
    dropped_max = np.where(g_mask, -np.inf, mag).max(-1)
    assert np.all(kept_min >= dropped_max)


def test_nm_mask_ties_keep_earliest():
    mask = ops.nm_mask(jnp.ones((3, 8)), 2, 4, axis=-1)
    np.testing.assert_array_equal(mask, np.tile([1, 1, 0, 0, 1, 1, 0, 0], (3, 1)).astype(bool))
    assert int(ops.nm_mask(jnp.zeros((4, 12)), 1, 4, axis=0).sum()) == 12


@FAST
@given(st.integers(1, 6).flatmap(lambda m: st.tuples(
    st.integers(1, m), st.just(m), st.integers(1, 23), st.integers(1, 3))))
def test_nm_mask_partial_last_group_keeps_min_n_r(case):
    n, m, length, cols = case
    w = jax.random.normal(jax.random.key(length), (length, cols))
    mask = np.asarray(_nm_mask(w, n, m, 0))
    full, r = divmod(length, m)
    assert np.all(mask.sum(0) == full * n + min(n, r))
    if r:
        assert np.all(mask[full * m:].sum(0) == min(n, r))


def test_nm_mask_over_several_axes_is_the_flattened_axis():
    w = jax.random.normal(jax.random.key(0), (3, 3, 5, 7))  # conv [kh, kw, in, out]
    mask = ops.nm_mask(w, 2, 4, axis=(0, 1, 2))
    flat = ops.nm_mask(w.reshape(45, 7), 2, 4, axis=0).reshape(3, 3, 5, 7)
    np.testing.assert_array_equal(mask, flat)


def test_nm_mask_traced_n():
    w = jax.random.normal(jax.random.key(1), (16, 5))
    f = jax.jit(lambda w, n: ops.nm_mask(w, n, 4, 0))
    for n in (4, 3, 2, 1):
        np.testing.assert_array_equal(np.asarray(f(w, n)).reshape(4, 4, 5).sum(1), n)


@pytest.mark.parametrize("shape, axis", [
    ((16, 6), 0), ((3, 3, 8, 4), (0, 1, 2)), ((2, 10, 3, 5), (1, 2)),  # consecutive
    ((4, 3, 6, 5), (2, 0)), ((6, 2, 5), (0, 2)),                        # not: transposed
])
def test_nm_mask_groups_the_flattened_axes(shape, axis):
    """Consecutive increasing group axes (the default: a kernel's contraction axes) are
    a reshape away; a transpose there cost a transposed mask layout and a copy per train
    step on XLA:CPU. Either way the groups are those of the axes moved last, flattened."""
    w = jax.random.normal(jax.random.key(2), shape)
    consecutive = not isinstance(axis, tuple) or axis == tuple(range(axis[0], axis[0] + len(axis)))
    prims = _primitives(jax.make_jaxpr(lambda w: ops.nm_mask(w, 2, 4, axis))(w).jaxpr)
    assert ("transpose" in prims) != consecutive
    axes = (axis,) if isinstance(axis, int) else axis
    rest = [a for a in range(w.ndim) if a not in axes]
    moved = jnp.transpose(w, rest + list(axes))
    flat = moved.reshape(*moved.shape[: len(rest)], -1)
    want = ops.nm_mask(flat, 2, 4, axis=-1).reshape(moved.shape)
    np.testing.assert_array_equal(ops.nm_mask(w, 2, 4, axis), jnp.transpose(want, np.argsort(rest + list(axes))))


def _primitives(jaxpr) -> set[str]:
    """Primitive names in a jaxpr and every sub-jaxpr (cond branches, pjit, scan ...)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    names |= _primitives(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    names |= _primitives(sub)
    return names


def test_mask_computation_has_no_sort_or_top_k():
    w = jnp.zeros((3, 64, 32))  # 3 stacked layers
    spec = WeightSpec(weight_bits=4, nm=(2, 4), prune_grad=PruneGrad.STE)
    jaxprs = [
        jax.make_jaxpr(lambda w: ops.nm_mask(w, 2, 4, 0))(w[0]),
        jax.make_jaxpr(lambda w, m, s: ops.mask_update(w, m, spec, s, contract_axes=(0,), layer_axes=1))(
            w, w > 0, 7),
    ]
    for jaxpr in jaxprs:
        prims = _primitives(jaxpr.jaxpr)
        assert "reduce_sum" in prims  # the walk does see the rank computation
        assert not {p for p in prims if "sort" in p or "top_k" in p or "argmax" in p}, prims


# ---------------------------------------------------------------------------------------
# Fake quantization
# ---------------------------------------------------------------------------------------


def _reference_qdq(w: np.ndarray, bits: int, symmetric: bool, contract_axes):
    """The ops module docstring's equations in numpy (float32, round half to even).

    Returns (dequantized, pre-rounding value w/s + z) so callers can skip exact ties.
    """
    red = tuple(a % w.ndim for a in contract_axes)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    tiny = np.float32(np.sqrt(np.finfo(np.float32).tiny))
    if symmetric:
        s = (np.abs(w).max(red, keepdims=True) / np.float32(qmax + 0.5)).astype(np.float32)
        s = np.where(s < tiny, np.float32(1), s)
        z = np.float32(0)
    else:
        lo = np.minimum(w.min(red, keepdims=True), 0)
        hi = np.maximum(w.max(red, keepdims=True), 0)
        s = ((hi - lo) / np.float32(qmax - qmin)).astype(np.float32)
        s = np.where(s < tiny, np.float32(1), s)
        z = np.clip(np.round(np.float32(qmin) - lo / s), qmin, qmax)
    u = w / s + z
    return ((np.clip(np.round(u), qmin, qmax) - z) * s).astype(np.float32), u


KERNELS = [((24, 6), (0,)), ((16, 2, 3), (0,)), ((3, 3, 8, 4), (0, 1, 2)), ((15, 1, 6), (0, 1))]


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape, contract", KERNELS)
def test_fake_quant_follows_the_documented_equations(bits, symmetric, shape, contract):
    """Pins qwix (int8/int4 both kinds, int2 symmetric) and our own path (int16,
    asymmetric int2) to the same equations."""
    w = np.asarray(jax.random.normal(jax.random.key(bits), shape))
    spec = WeightSpec(weight_bits=bits, symmetric=symmetric)
    got = np.asarray(ops.fake_quant(jnp.asarray(w), spec, contract_axes=contract))
    want, u = _reference_qdq(w, bits, symmetric, contract)
    # XLA may round the scale 1 ulp differently from numpy; that can flip a value sitting
    # on a rounding tie (|frac(u)| = 0.5) by one level, so ties are left out.
    off_tie = np.abs(np.abs(u - np.floor(u)) - 0.5) > 1e-3
    assert off_tie.mean() > 0.9
    np.testing.assert_allclose(got[off_tie], want[off_tie], rtol=1e-5, atol=1e-7)


QWIX_KERNELS = [  # (shape, contract axes, sub-channel block)
    ((32, 4, 5), (0,), None),            # attention projection [in, heads, head_dim]
    ((32, 4, 5), (0,), 8),
    ((64, 24), (0,), None),              # dense
    ((64, 24), (0,), 16),
    ((3, 3, 16, 8), (0, 1, 2), None),    # 2-D conv [kh, kw, in, out]
    ((3, 3, 16, 8), (0, 1, 2), 4),
    ((15, 1, 6), (0, 1), None),          # depthwise conv [k, 1, channels]
]


@pytest.mark.parametrize("qtype, bits", [(jnp.int8, 8), (jnp.int4, 4), ("int2", 2)])
@pytest.mark.parametrize("shape, contract, block", QWIX_KERNELS)
@pytest.mark.parametrize("jit", [False, True])
def test_fake_quant_equals_qwix(qtype, bits, shape, contract, block, jit):
    """The train-step path computes qwix's equations in float; it must equal qwix bit for
    bit, eager and under jit (where XLA rewrites the division by the scale in both)."""
    w = jax.random.normal(jax.random.key(bits), shape)
    assert np.any((w < 0) & (jnp.abs(w) < 0.1))  # some round to zero from below (-0.0)
    granularity = Granularity.PER_CHANNEL if block is None else Granularity.SUB_CHANNEL
    channel = tuple(a for a in range(len(shape)) if a not in contract)
    tiled = {} if block is None else {max(contract): block}
    for symmetric in (True, False) if bits > 2 else (True,):
        spec = WeightSpec(weight_bits=bits, symmetric=symmetric, granularity=granularity, block_size=block)
        ours = lambda w: ops.fake_quant(w, spec, contract_axes=contract)
        theirs = lambda w: qwix.dequantize(qwix.quantize(
            w, qtype, channelwise_axes=channel, tiled_axes=tiled,
            calibration_method="absmax" if symmetric else "minmax"))
        if jit:
            ours, theirs = jax.jit(ours), jax.jit(theirs)
        # Bits, not values: -0.0 == 0.0 but the export round trip compares bits.
        np.testing.assert_array_equal(
            np.asarray(ours(w)).view(np.uint32), np.asarray(theirs(w)).view(np.uint32))


@st.composite
def quant_cases(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    symmetric = draw(st.booleans())
    block = draw(st.sampled_from([None, 4, 8]))
    tiles = draw(st.integers(1, 3))
    k = (block or 8) * tiles
    out = draw(st.integers(1, 4))
    clip = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return bits, symmetric, block, k, out, clip, seed


@FAST
@given(quant_cases())
def test_at_most_2_pow_b_levels_per_channel_or_block(case):
    bits, symmetric, block, k, out, clip, seed = case
    rows = k * 40  # many more values per group than levels
    w = jax.random.normal(jax.random.key(seed), (rows, out))
    spec = WeightSpec(
        weight_bits=bits, symmetric=symmetric, clip_search=clip, block_size=block,
        granularity=Granularity.PER_CHANNEL if block is None else Granularity.SUB_CHANNEL)
    y = np.asarray(_fake_quant(w, spec, contract_axes=(0,)))
    if block is None:
        groups = y.T  # [out, rows]
    else:
        groups = np.moveaxis(y.reshape(rows // block, block, out), 1, 2).reshape(-1, block)
    levels = [len(np.unique(g)) for g in groups]
    assert max(levels) <= 2**bits
    if bits == 2 and block is None:
        assert max(levels) >= 3  # the bound is not vacuous


def test_int2_symmetric_levels():
    """Codes {-2,-1,0,1}·s, s = absmax/1.5: effectively ternary, -2 only at w = -absmax."""
    w = jnp.array([[0.75, -0.125, 0.25, 0.5, -0.375], [-1.5, 0.25, -0.625, 0.125, 0.375]]).T  # [in, out]
    y = ops.fake_quant(w, WeightSpec(weight_bits=2), contract_axes=(0,))
    s = jnp.array([0.5, 1.0])  # absmax / 1.5, exact in binary
    np.testing.assert_array_equal(y / s, np.array([[1, 0, 0, 1, -1], [-2, 0, -1, 0, 0]]).T)


@FAST
@given(st.integers(0, 2**16), st.sampled_from([2, 4, 8]), st.booleans())
def test_clip_search_never_increases_the_weight_mse(seed, bits, symmetric):
    w = jax.random.t(jax.random.key(seed), 3.0, (64, 6))  # heavy tails: clipping pays off
    err = {}
    for clip in (False, True):
        spec = WeightSpec(weight_bits=bits, symmetric=symmetric, clip_search=clip)
        err[clip] = np.square(np.asarray(_fake_quant(w, spec, contract_axes=(0,)) - w)).sum(0)
    assert np.all(err[True] <= err[False])


@pytest.mark.parametrize("bits, symmetric", [(8, True), (8, False), (4, True), (4, False), (2, True), (2, False)])
@pytest.mark.parametrize("clip", [False, True])
def test_quantize_weight_dequantizes_to_the_fake_quant_weight(bits, symmetric, clip):
    w = jax.random.normal(jax.random.key(5), (3, 16, 8))  # conv [k, in, out]
    spec = WeightSpec(weight_bits=bits, symmetric=symmetric, clip_search=clip, nm=(2, 4))
    mask = ops.nm_mask(w, 2, 4, axis=(0, 1))
    qa = ops.quantize_weight(w, mask, spec, contract_axes=(0, 1))
    assert qa.qvalue.dtype == (jnp.int8 if bits == 8 else jnp.int4)
    assert (qa.zero_point is None) == symmetric
    np.testing.assert_array_equal(
        qwix.dequantize(qa), ops.compressed_weight(w, mask, spec, contract_axes=(0, 1)))
    if bits == 2:
        assert set(np.unique(np.asarray(qa.qvalue).astype(int))) <= {-2, -1, 0, 1}


@pytest.mark.parametrize("bits, symmetric", [(8, False), (4, True), (2, True), (2, False)])
@pytest.mark.parametrize("block", [None, 8])
def test_learned_range_starts_at_the_clip_searched_quantizer_and_exports_as_it_runs(bits, symmetric, block):
    w = jax.random.t(jax.random.key(12), 3.0, (3, 16, 8))  # conv [k, in, out], heavy tails
    sub = dict(granularity=Granularity.SUB_CHANNEL, block_size=block) if block else {}
    learned = WeightSpec(weight_bits=bits, symmetric=symmetric, learned_scale=True, nm=(2, 4), **sub)
    searched = WeightSpec(weight_bits=bits, symmetric=symmetric, clip_search=True, nm=(2, 4), **sub)
    mask = ops.nm_mask(w, 2, 4, axis=(0, 1))
    x = jnp.where(mask, w, 0)
    log_range = ops.initial_range(x, learned, contract_axes=(0, 1))
    groups = 8 * (16 // block if block else 1)
    assert log_range.shape == ops.range_shape(w.shape, learned, (0, 1)) == (
        (1 if symmetric else 2), 1, *((2, 8) if block else (1, 8)))
    y = np.asarray(ops.compressed_weight(w, mask, learned, contract_axes=(0, 1), log_range=log_range))
    ref = np.asarray(ops.compressed_weight(w, mask, searched, contract_axes=(0, 1)))
    # exp(log r) is r to an ulp, so a weight exactly on the range's end (at most one per
    # group) may round to the neighbouring level; every other weight gets the same value.
    close = np.isclose(y, ref, rtol=1e-5, atol=1e-7)
    assert (~close).sum() <= groups
    qa = ops.quantize_weight(w, mask, learned, contract_axes=(0, 1), log_range=log_range)
    assert qa.qvalue.dtype == (jnp.int8 if bits == 8 else jnp.int4) and (qa.zero_point is None) == symmetric
    np.testing.assert_array_equal(qwix.dequantize(qa), y)  # served == fake quant, bit for bit
    with pytest.raises(ValueError, match="needs the layer's range parameter"):
        ops.compressed_weight(w, mask, learned, contract_axes=(0, 1))


@pytest.mark.parametrize("bits", [2, 4])
def test_learned_range_gradients_are_lsq(bits):
    """Symmetric grid, s = hi / (q_max + 1/2), hi = exp(c): a weight inside the range gets
    the upstream gradient, one outside none; dL/dc = s · Σ g (round(w/s) − w/s) inside
    + s · Σ g q_clip outside (Esser et al. 2020, eq. 3, times ds/dc = s)."""
    w = jax.random.normal(jax.random.key(13), (32, 3))
    g = jax.random.normal(jax.random.key(14), (32, 3))
    spec = WeightSpec(weight_bits=bits, learned_scale=True)
    c = ops.initial_range(w, spec, contract_axes=(0,)) - 0.4  # a narrower range: some clipped
    _, vjp = jax.vjp(lambda w, c: ops.compressed_weight(w, None, spec, contract_axes=(0,), log_range=c), w, c)
    gw, gc = map(np.asarray, vjp(g))
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = np.exp(np.asarray(c, np.float64)[0]) / (qmax + 0.5)  # [1, 3]
    v = np.asarray(w, np.float64) / s
    r = np.round(v)
    inside = (r >= qmin) & (r <= qmax)
    assert inside.any() and (~inside).any()
    np.testing.assert_allclose(gw, np.where(inside, np.asarray(g), 0), rtol=1e-6)  # g · (1/s) · s
    dyds = np.where(inside, r - v, np.clip(r, qmin, qmax))
    np.testing.assert_allclose(gc[0], (s * (np.asarray(g) * dyds).sum(0, keepdims=True)), rtol=1e-4, atol=1e-6)


def test_learned_range_keeps_the_pruning_gradient():
    w = jax.random.normal(jax.random.key(15), (16, 6))
    g = jax.random.normal(jax.random.key(16), (16, 6))
    spec = WeightSpec(weight_bits=4, nm=(2, 4), prune_grad=PruneGrad.SRSTE, srste_lambda=0.3, learned_scale=True)
    mask = ops.nm_mask(w, 2, 4, axis=0)
    c = ops.initial_range(jnp.where(mask, w, 0), spec, contract_axes=(0,))
    _, vjp = jax.vjp(lambda w: ops.compressed_weight(w, mask, spec, contract_axes=(0,), log_range=c), w)
    gw, g, w, mask = map(np.asarray, (vjp(g)[0], g, w, mask))
    np.testing.assert_allclose(gw[~mask], g[~mask] + np.float32(0.3) * w[~mask], rtol=1e-6)


def test_int8_serving_dot_has_int8_operands_and_int32_accumulator():
    w = jax.random.normal(jax.random.key(6), (32, 16))
    spec = WeightSpec(weight_bits=8)
    qw = ops.quantize_weight(w, None, spec, contract_axes=(0,))

    def serve(x):
        qx = qwix.quantize(x, jnp.int8, channelwise_axes=(0,))
        return qwix.dot_general(qx, qw, (((1,), (0,)), ((), ())))

    x = jax.random.normal(jax.random.key(7), (4, 32))
    jaxpr = jax.make_jaxpr(serve)(x)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots, jaxpr
    for dot in dots:
        assert [v.aval.dtype for v in dot.invars] == [jnp.int8, jnp.int8]
        assert dot.outvars[0].aval.dtype == jnp.int32
    np.testing.assert_allclose(serve(x), x @ ops.fake_quant(w, spec, contract_axes=(0,)), rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------
# Straight-through gradients
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(PruneGrad))
@pytest.mark.parametrize("bits", [None, 4])
def test_ste_gradient(mode, bits):
    w = jax.random.normal(jax.random.key(8), (16, 6))
    g = jax.random.normal(jax.random.key(9), (16, 6))
    lam = 0.3
    spec = WeightSpec(weight_bits=bits, nm=(2, 4), prune_grad=mode, srste_lambda=lam)
    mask = ops.nm_mask(w, 2, 4, axis=0)
    y, vjp = jax.vjp(lambda w: ops.compressed_weight(w, mask, spec, contract_axes=(0,)), w)
    (gw,) = vjp(g)
    gw, g, w, mask = map(np.asarray, (gw, g, w, mask))
    np.testing.assert_array_equal(gw[mask], g[mask])  # kept: upstream gradient, untouched
    expected_pruned = {
        PruneGrad.MASKED: np.zeros_like(g),
        PruneGrad.STE: g,
        PruneGrad.SRSTE: g + np.float32(lam) * w,
    }[mode]
    np.testing.assert_allclose(gw[~mask], expected_pruned[~mask], rtol=1e-6)
    assert np.all(np.asarray(y)[~mask] == 0)


def test_ste_gradient_without_mask_is_the_identity():
    w = jax.random.normal(jax.random.key(10), (8, 3, 3))
    g = jax.random.normal(jax.random.key(11), (8, 3, 3))
    spec = WeightSpec(weight_bits=2, clip_search=True)
    _, vjp = jax.vjp(lambda w: ops.compressed_weight(w, None, spec, contract_axes=(0,)), w)
    np.testing.assert_array_equal(vjp(g)[0], g)


# ---------------------------------------------------------------------------------------
# Through the layers
# ---------------------------------------------------------------------------------------


def _layers(policy, key=0):
    rngs = nnx.Rngs(key)
    dense = Dense(16, (2, 4), path="blocks/attn/q", policy=policy, kernel_axes=(None, None, None), rngs=rngs)
    conv = Conv(8, 12, (3,), path="blocks/conv/c", policy=policy, kernel_axes=(None, None, None), rngs=rngs)
    dw = Conv(8, 8, (5,), feature_group_count=8, path="blocks/conv/dw", policy=policy,
              kernel_axes=(None, None, None), rngs=rngs)
    return dense, conv, dw


def _apply(layers, x_dense, x_conv):
    dense, conv, dw = layers
    return dense(x_dense), conv(x_conv), dw(x_conv)


@pytest.mark.parametrize("policy", [
    Policy.named("float"),
    Policy(rules=(Rule(".*"),)),  # a rule that keeps everything float
    Policy(rules=(Rule("decoder/.*", WeightSpec(weight_bits=4)),)),  # matches nothing here
])
def test_policy_that_compresses_nothing_is_bitwise_the_float_model(policy):
    x_dense = jax.random.normal(jax.random.key(1), (2, 5, 16))
    x_conv = jax.random.normal(jax.random.key(2), (2, 10, 8))
    ref = _apply(_layers(None), x_dense, x_conv)
    got = _apply(_layers(policy), x_dense, x_conv)
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(r, g)


def test_16_bit_policy_matches_the_float_layer():
    x_dense = jax.random.normal(jax.random.key(1), (2, 5, 16))
    x_conv = jax.random.normal(jax.random.key(2), (2, 10, 8))
    ref = _apply(_layers(None), x_dense, x_conv)
    for symmetric in (True, False):
        policy = Policy(rules=(Rule(".*", WeightSpec(weight_bits=16, symmetric=symmetric)),))
        layers = _layers(policy)
        nnx.update(layers, nnx.state(_layers(None), nnx.Param))  # same variables
        got = _apply(layers, x_dense, x_conv)
        for r, g in zip(ref, got):
            np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-4)
            assert not np.array_equal(g, r)  # it did quantize
        # Far from the float layer at 4 bits: the tolerance above is meaningful.
        coarse = _apply(_layers(Policy(rules=(Rule(".*", WeightSpec(weight_bits=4, symmetric=symmetric)),))), x_dense, x_conv)
        assert not np.allclose(coarse[0], ref[0], rtol=1e-3, atol=1e-4)


def test_layer_construction_rejects_a_block_size_that_does_not_divide():
    policy = Policy(rules=(Rule(".*", WeightSpec(weight_bits=4, granularity=Granularity.SUB_CHANNEL, block_size=6)),))
    with pytest.raises(ValueError, match="layer 'blocks/attn/q': sub-channel block_size 6"):
        Dense(16, 4, path="blocks/attn/q", policy=policy, kernel_axes=(None, None), rngs=nnx.Rngs(0))
