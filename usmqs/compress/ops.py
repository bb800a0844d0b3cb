"""Weight compression numerics: N:M masks, fake quantization, straight-through gradients.

Everything here acts on ONE layer's kernel (no stacked 'layers' axis) unless an argument
says otherwise (`mask_update(..., layer_axes=k)`).

Quantization (per scale group g = one output channel, or one block of K weights along
the last contraction axis of one output channel), b bits, q_min = −2^(b−1),
q_max = 2^(b−1) − 1:

    symmetric:   s = max|W_g| / (2^(b−1) − ½),        q = clip(round(W / s), q_min, q_max),
                 Ŵ = q · s
    asymmetric:  lo = min(min W_g, 0), hi = max(max W_g, 0),  s = (hi − lo) / (q_max − q_min),
                 z = clip(round(q_min − lo / s), q_min, q_max),
                 q = clip(round(W / s + z), q_min, q_max),    Ŵ = (q − z) · s

(round = half to even). These are qwix's equations. The train-step path (`fake_quant`,
`compressed_weight`) computes them in float (`_qdq`), which is bit for bit
`qwix.dequantize(qwix.quantize(...))` for int8/int4 (both kinds) and int2 symmetric
(tests pin it, eager and jitted, per channel and sub-channel) but skips qwix's
f32 -> int -> f32 round trip, slow on XLA:CPU. qwix has no int16 qtype and refuses
asymmetric int2 (`get_asymmetric_bound` knows only int8/int4); the same equations cover
them. The integer form for export (`quantize_weight`) is qwix's own `QArray`.

int2 symmetric levels: codes {−2, −1, 0, 1} (2-bit two's complement, qwix 'int2'), value
code · s with s = max|W_g| / 1.5. Since |W / s| <= 1.5 the code −2 is reached only at
the exact tie W = −max|W_g| (−1.5 rounds half-to-even to −2; +1.5 → 2 is clipped to 1),
where it has the same error as −1 would. In effect the quantizer is ternary {−s, 0, +s}
with thresholds ±max|W_g|/3.

Sparsity: `nm_mask` keeps the N largest |w| of every group of M consecutive entries along
the group axis without sort/argsort/top_k (slow on CPU): with a = |w|,

    rank_i = #{j in group : a_j > a_i  or  (a_j == a_i and j < i)},     keep_i = rank_i < N,

a strict total order, so exactly N are kept even with ties (earlier index wins).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import qwix

from usmqs.compress.policy import (
    RUNTIME_BITS, RUNTIME_M, Every, Gradual, Granularity, MaskSchedule, OneShot, PruneGrad, WeightSpec,
)

# Clip ratios tried per scale group by `WeightSpec.clip_search` (1.0 = no clipping, so
# the search never does worse than plain absmax/minmax on the weight MSE).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)


# ---------------------------------------------------------------------------------------
# Axes
# ---------------------------------------------------------------------------------------


def _norm_axes(axes: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} out of range for a rank-{ndim} kernel")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"repeated axis in {axes}")
    return tuple(out)


def quant_axes(
    shape: Sequence[int], spec: WeightSpec, contract_axes: Sequence[int]
) -> tuple[tuple[int, ...], dict[int, int]]:
    """qwix's (channelwise_axes, tiled_axes) for a kernel of `shape`.

    Every non-contraction axis is channelwise (one scale per output channel, also per
    (head, head_dim) of a [in, H, D] projection). SUB_CHANNEL tiles the last contraction
    axis (the input-channel axis) in blocks of `block_size`; an axis not longer than the
    block is one block (per-channel for that layer, e.g. a depthwise conv's in-axis of 1).
    """
    ndim = len(shape)
    contract = _norm_axes(contract_axes, ndim)
    channel = tuple(a for a in range(ndim) if a not in contract)
    tiled: dict[int, int] = {}
    if spec.granularity is Granularity.SUB_CHANNEL:
        axis = max(contract)
        k = spec.block_size
        if shape[axis] > k:
            if shape[axis] % k:
                raise ValueError(
                    f"sub-channel block_size {k} does not divide contraction axis {axis} of kernel {tuple(shape)}"
                )
            tiled[axis] = k
    return channel, tiled


def nm_group_axes(spec: WeightSpec, contract_axes: Sequence[int], ndim: int) -> tuple[int, ...]:
    """Axes (flattened in order) along which N:M groups of M run: spec.nm_axis or contraction."""
    return _norm_axes(contract_axes if spec.nm_axis is None else spec.nm_axis, ndim)


def check_spec(spec: WeightSpec | None, shape: Sequence[int], contract_axes: Sequence[int]) -> None:
    """Raise ValueError if `spec` cannot apply to a kernel of `shape` (at construction)."""
    if spec is None:
        return
    ndim = len(shape)
    _norm_axes(contract_axes, ndim)
    if spec.weight_bits is not None:
        quant_axes(shape, spec, contract_axes)
    if spec.nm is not None:
        nm_group_axes(spec, contract_axes, ndim)


# ---------------------------------------------------------------------------------------
# Fake quantization
# ---------------------------------------------------------------------------------------


def _qwix_qtype(bits: int, symmetric: bool):
    """qwix qtype for (bits, symmetric), or None where qwix lacks it (int16, asym int2)."""
    if bits == 8:
        return jnp.int8
    if bits == 4:
        return jnp.int4
    if bits == 2 and symmetric:
        return "int2"
    return None


def _split(x: jax.Array, channel: tuple[int, ...], tiled: dict[int, int]):
    """View x with each tiled axis split into (tiles, tile); return it and the reduce axes.

    Reducing the view over `reduce_axes` (keepdims) gives one value per scale group that
    broadcasts against the view.
    """
    shape, reduce_axes = [], []
    for a, d in enumerate(x.shape):
        if a in channel:
            shape.append(d)
        elif a in tiled:
            shape += [d // tiled[a], tiled[a]]
            reduce_axes.append(len(shape) - 1)
        else:
            shape.append(d)
            reduce_axes.append(len(shape) - 1)
    return x.reshape(shape), tuple(reduce_axes)


def _usable_scale(scale: jax.Array) -> jax.Array:
    """`scale` with the scales of all-zero (or denormal) groups set to 1, as qwix does:
    every value of such a group then rounds to code 0 instead of dividing by ~0."""
    return jnp.where(scale < jnp.sqrt(jnp.finfo(scale.dtype).tiny), jnp.ones_like(scale), scale)


def _asymmetric_scale_zero(xs: jax.Array, red, qmin: int, qmax: int) -> tuple[jax.Array, jax.Array]:
    """Asymmetric (minmax) scale and zero point per group of `xs` (module docstring)."""
    lo, hi = _calibrated_range(xs, red, symmetric=False)
    scale = _usable_scale((hi - lo) / (qmax - qmin))
    return scale, _plus_zero(jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax))


def _qdq(x: jax.Array, bits: int, symmetric: bool, channel, tiled) -> jax.Array:
    """The fake-quant hot path: quantize-dequantize with qwix's equations (module
    docstring) in float, for every bit width.

    Bit for bit `qwix.dequantize(qwix.quantize(...))` where qwix has the qtype (tests pin
    it, eager and jitted), without qwix's f32 -> int8/int4 -> f32 round trip: inside the
    train step's fused weight computation those converts made int4 fake quant cost
    ~+15 % and int2 ~+23 % of a `tiny` step on CPU (bench/step_overhead.py), the same
    equations in float ~+4 %.
    """
    xs, red = _split(x, channel, tiled)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if symmetric:
        scale = _usable_scale(jnp.max(jnp.abs(xs), axis=red, keepdims=True) / (qmax + 0.5))
        q = _plus_zero(jnp.clip(jnp.round(xs / scale), qmin, qmax))
        y = q * scale
    else:
        scale, zp = _asymmetric_scale_zero(xs, red, qmin, qmax)
        q = _plus_zero(jnp.clip(jnp.round(xs / scale + zp), qmin, qmax))
        y = (q - zp) * scale
    return y.reshape(x.shape)


def _plus_zero(q: jax.Array) -> jax.Array:
    """q with -0.0 made +0.0: codes are integers in qwix (round(-0.3) = -0.0 in float)."""
    return jnp.where(q == 0, jnp.zeros_like(q), q)


def _calibrated_range(xs: jax.Array, red, symmetric: bool) -> tuple[jax.Array, jax.Array]:
    """(lo, hi) of each scale group of the split view `xs`: ±max|x| (symmetric) or
    min(min x, 0), max(max x, 0) (asymmetric), the ranges qwix's absmax/minmax calibrate."""
    if symmetric:
        hi = jnp.max(jnp.abs(xs), axis=red, keepdims=True)
        return -hi, hi
    lo = jnp.minimum(jnp.min(xs, axis=red, keepdims=True), 0)
    return lo, jnp.maximum(jnp.max(xs, axis=red, keepdims=True), 0)


def _best_clip_ratio(x: jax.Array, spec: WeightSpec, channel, tiled) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(r*, lo, hi) per scale group (split view): r* = argmin_r ||qdq(clip(x, r·[lo, hi])) − x||²
    over `CLIP_RATIOS`; ties keep the larger r (r = 1 is tried first). Cost:
    len(CLIP_RATIOS) elementwise qdq passes."""
    xs, red = _split(x, channel, tiled)
    lo, hi = _calibrated_range(xs, red, spec.symmetric)
    best_err = jnp.full(hi.shape, jnp.inf, x.dtype)
    best_r = jnp.ones(hi.shape, x.dtype)
    for r in CLIP_RATIOS:
        c = jnp.clip(xs, r * lo, r * hi).reshape(x.shape)
        y, _ = _split(_qdq(c, spec.weight_bits, spec.symmetric, channel, tiled), channel, tiled)
        err = jnp.sum(jnp.square(y - xs), axis=red, keepdims=True)
        better = err < best_err
        best_err = jnp.where(better, err, best_err)
        best_r = jnp.where(better, jnp.asarray(r, x.dtype), best_r)
    return best_r, lo, hi


def _clip_searched(x: jax.Array, spec: WeightSpec, channel, tiled) -> jax.Array:
    """x clipped per scale group to r*·range (`_best_clip_ratio`).

    Clipping to r·[lo, hi] makes the calibrated range exactly r·[lo, hi], so qwix's own
    absmax/minmax calibration of the clipped tensor realises the chosen scale.
    """
    best_r, lo, hi = _best_clip_ratio(x, spec, channel, tiled)
    xs, _ = _split(x, channel, tiled)
    return jnp.clip(xs, best_r * lo, best_r * hi).reshape(x.shape)


# ---------------------------------------------------------------------------------------
# Learned ranges (WeightSpec.learned_scale)
# ---------------------------------------------------------------------------------------


def range_shape(shape: Sequence[int], spec: WeightSpec, contract_axes: Sequence[int]) -> tuple[int, ...]:
    """Shape of a learned-range layer's range parameter for a kernel of `shape`:
    [1, *groups] (log hi) when symmetric, [2, *groups] (log −lo, log hi) when asymmetric,
    with groups the kernel's rank and one entry per scale group (qwix's scale layout)."""
    channel, tiled = quant_axes(shape, spec, contract_axes)
    return (1 if spec.symmetric else 2, *_group_shape(shape, channel, tiled))


def _group_shape(shape, channel, tiled) -> tuple[int, ...]:
    """One entry per scale group, same rank as the kernel (qwix's scale layout)."""
    return tuple(d if a in channel else (d // tiled[a] if a in tiled else 1) for a, d in enumerate(shape))


def initial_range(x: jax.Array, spec: WeightSpec, *, contract_axes: Sequence[int]) -> jax.Array:
    """The range parameter (`range_shape`) a learned-range layer starts from: the
    clip-searched range r*·[lo, hi] of the (masked) kernel `x` (`_best_clip_ratio`), in
    logs; a range below sqrt(tiny) (an all-zero group, or lo = 0) is floored there."""
    channel, tiled = quant_axes(x.shape, spec, contract_axes)
    best_r, lo, hi = _best_clip_ratio(x, spec, channel, tiled)
    floor = jnp.sqrt(jnp.finfo(x.dtype).tiny)
    group = _group_shape(x.shape, channel, tiled)
    ends = [best_r * hi] if spec.symmetric else [-best_r * lo, best_r * hi]
    return jnp.stack([jnp.log(jnp.maximum(e, floor)).reshape(group) for e in ends])


def _round_ste(v: jax.Array) -> jax.Array:
    """round(v) (half to even, −0 made +0) forward, identity gradient. Exact: v + (r − v)
    is r for every float v (|r − v| <= ½ and r − v is exact)."""
    return v + jax.lax.stop_gradient(_plus_zero(jnp.round(v)) - v)


def _clip_codes(v: jax.Array, qmin: int, qmax: int) -> jax.Array:
    """clip(v, qmin, qmax) whose gradient is 1 on the whole closed range (jnp.clip halves
    it at the ends: a code that rounds exactly to q_max would get half its gradient)."""
    return jnp.where(v < qmin, jnp.asarray(qmin, v.dtype), jnp.where(v > qmax, jnp.asarray(qmax, v.dtype), v))


def _learned_codes(x: jax.Array, log_range: jax.Array, bits: int, symmetric: bool, channel, tiled):
    """(q, scale, zero point or None) of `x` under a learned range, in the split view of
    `_split` (so ŵ = q·s, or (q − z)·s, broadcasts against it). The module docstring's
    equations with [lo, hi] the learned range instead of the calibrated one; rounding
    passes the gradient straight through (LSQ), clipping does not (a clipped weight's
    gradient goes to the range)."""
    xs, red = _split(x, channel, tiled)
    view = tuple(1 if i in red else d for i, d in enumerate(xs.shape))  # one entry per group
    ends = jnp.exp(log_range).reshape((log_range.shape[0], *view))
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if symmetric:
        scale = _usable_scale(ends[0] / (qmax + 0.5))
        return _clip_codes(_round_ste(xs / scale), qmin, qmax), scale, None
    scale = _usable_scale((ends[1] + ends[0]) / (qmax - qmin))
    zp = _clip_codes(_round_ste(qmin + ends[0] / scale), qmin, qmax)
    return _clip_codes(_round_ste(xs / scale + zp), qmin, qmax), scale, zp


def _learned_qdq(x: jax.Array, log_range: jax.Array, spec: WeightSpec, contract_axes) -> jax.Array:
    """Ŵ of `x` under its learned range (`_learned_codes`), differentiable in both."""
    channel, tiled = quant_axes(x.shape, spec, contract_axes)
    q, scale, zp = _learned_codes(x, log_range, spec.weight_bits, spec.symmetric, channel, tiled)
    y = q * scale if zp is None else (q - zp) * scale
    return y.reshape(x.shape)


def fake_quant(w: jax.Array, spec: WeightSpec, *, contract_axes: Sequence[int]) -> jax.Array:
    """Ŵ = dequantize(quantize(W)) per `spec` (forward value only, no STE); W if float bits."""
    if spec.weight_bits is None:
        return w
    channel, tiled = quant_axes(w.shape, spec, contract_axes)
    if spec.clip_search:
        w = _clip_searched(w, spec, channel, tiled)
    return _qdq(w, spec.weight_bits, spec.symmetric, channel, tiled)


def quantize_weight(
    w: jax.Array, mask: jax.Array | None, spec: WeightSpec, *, contract_axes: Sequence[int],
    log_range: jax.Array | None = None,
) -> qwix.QArray:
    """The integer form of W_eff for serving/export: a qwix.QArray with

        qwix.dequantize(quantize_weight(w, mask, spec, ...)) == compressed_weight(w, mask, spec, ...)

    (forward value). qvalue dtype int8 / int4 (int2 stored in int4, qtype 'int2');
    `zero_point` is set for asymmetric specs. int16 has no QArray form (qwix stores at
    most one byte per value): ValueError. `log_range`: a learned-range spec's range
    parameter (`WeightSpec.learned_scale`), which sets the scales instead of calibration.
    """
    if spec.weight_bits is None or spec.weight_bits > 8:
        raise ValueError(f"no integer QArray form for weight_bits={spec.weight_bits}")
    x = w if mask is None else jnp.where(mask, w, jnp.zeros_like(w))
    channel, tiled = quant_axes(x.shape, spec, contract_axes)
    if spec.learned_scale:
        return _learned_qarray(x, _need_range(spec, log_range), spec, channel, tiled)
    if spec.clip_search:
        x = _clip_searched(x, spec, channel, tiled)
    qtype = _qwix_qtype(spec.weight_bits, spec.symmetric)
    if qtype is not None:
        return qwix.quantize(
            x, qtype, channelwise_axes=channel, tiled_axes=tiled,
            calibration_method="absmax" if spec.symmetric else "minmax",
        )
    # Asymmetric int2: qwix refuses to calibrate it but represents it fine.
    bits = spec.weight_bits
    xs, red = _split(x, channel, tiled)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale, zp = _asymmetric_scale_zero(xs, red, qmin, qmax)
    q = jnp.clip(jnp.round(xs / scale + zp), qmin, qmax).reshape(x.shape)
    group_shape = _group_shape(x.shape, channel, tiled)  # qwix's layout of scale / zero point
    return qwix.QArray(
        q.astype(jnp.int4), scale.reshape(group_shape), zp.reshape(group_shape).astype(jnp.int4), "int2"
    )


def _need_range(spec: WeightSpec, log_range: jax.Array | None) -> jax.Array:
    if log_range is None:
        raise ValueError(f"a learned-range spec needs the layer's range parameter (QuantRange): {spec}")
    return log_range


def _learned_qarray(x: jax.Array, log_range: jax.Array, spec: WeightSpec, channel, tiled) -> qwix.QArray:
    """`quantize_weight` of a learned-range spec: the codes, scales and zero points of
    `_learned_codes` in qwix's layout (int8 stored as int8, int4 and int2 in int4)."""
    bits = spec.weight_bits
    q, scale, zp = _learned_codes(x, log_range, bits, spec.symmetric, channel, tiled)
    group = _group_shape(x.shape, channel, tiled)
    store = jnp.int8 if bits == 8 else jnp.int4
    qtype = "int2" if bits == 2 else store
    return qwix.QArray(
        q.reshape(x.shape).astype(store), scale.reshape(group),
        None if zp is None else zp.reshape(group).astype(store), qtype,
    )


# ---------------------------------------------------------------------------------------
# Prune-then-quantize with straight-through gradients
# ---------------------------------------------------------------------------------------


def _forward(w, mask, bits, spec, contract_axes):
    x = w if mask is None else jnp.where(mask, w, jnp.zeros_like(w))
    if bits is None:  # the spec's own (static) bit width
        return fake_quant(x, spec, contract_axes=contract_axes)
    return runtime_fake_quant(x, bits, spec, contract_axes=contract_axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _compressed(w, mask, bits, spec, contract_axes):
    return _forward(w, mask, bits, spec, contract_axes)


def _compressed_fwd(w, mask, bits, spec, contract_axes):
    keep_w = mask is not None and spec.prune_grad is PruneGrad.SRSTE
    return _forward(w, mask, bits, spec, contract_axes), (mask, w if keep_w else None)


def _compressed_bwd(spec, contract_axes, res, g):
    del contract_axes
    mask, w = res
    if mask is None or spec.prune_grad is PruneGrad.STE:
        gw = g
    elif spec.prune_grad is PruneGrad.MASKED:
        gw = jnp.where(mask, g, jnp.zeros_like(g))
    else:  # SRSTE: the decay does not depend on g, it is added once per backward pass.
        gw = g + jnp.asarray(spec.srste_lambda, g.dtype) * jnp.where(mask, jnp.zeros_like(w), w).astype(g.dtype)
    return gw, None, None


_compressed.defvjp(_compressed_fwd, _compressed_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _masked(w, mask, spec):
    """mask ⊙ W with the pruning gradient of `spec` (`_compressed_bwd`'s rules), for a
    learned-range spec, whose quantization is differentiated as it is written."""
    return w if mask is None else jnp.where(mask, w, jnp.zeros_like(w))


def _masked_fwd(w, mask, spec):
    keep_w = mask is not None and spec.prune_grad is PruneGrad.SRSTE
    return _masked(w, mask, spec), (mask, w if keep_w else None)


def _masked_bwd(spec, res, g):
    return _compressed_bwd(spec, None, res, g)[:2]


_masked.defvjp(_masked_fwd, _masked_bwd)


def compressed_weight(
    w: jax.Array,
    mask: jax.Array | None,
    spec: WeightSpec | None,
    *,
    contract_axes: tuple[int, ...],
    setting: jax.Array | None = None,
    log_range: jax.Array | None = None,
) -> jax.Array:
    """W_eff = fake_quant(mask ⊙ W) with straight-through gradients; `w` itself when spec is None.

    Forward: prune (mask ⊙ W, mask None = keep all), then quantize-dequantize the kept
    weights per output channel / block (`fake_quant`). Backward, with g = dL/dW_eff:

        STE (or no mask):  dL/dW = g
        MASKED:            dL/dW = mask ⊙ g
        SRSTE:             dL/dW = g + λ (1 − mask) ⊙ W        (Zhou et al. 2021)

    Rounding and the quantizer's range are passed straight through (no clipped-range
    gradient mask), so clip-searched outliers still get gradient. The SR-STE decay is
    added once per backward pass through this call, independent of loss scaling.

    Args:
      w: kernel of one layer, float.
      mask: bool keep-mask of w's shape (from `nm_mask`/`mask_update`), or None.
      spec: the layer's WeightSpec (static), or None for float.
      contract_axes: kernel axes contracted with the input (Dense (0,); conv window + in).
      setting: for a runtime spec (`WeightSpec.runtime`), the layer's int32 [bits, N]
        (`runtime_fake_quant`); None applies the spec's own fields (export, serving).
      log_range: for a learned-range spec (`WeightSpec.learned_scale`), the layer's range
        parameter (`range_shape`). Then the quantizer is differentiated as written (LSQ):
        rounding passes the gradient through, a weight outside the range gets none (its
        gradient goes to the range), and the range gets the gradient of the scale (and
        zero point) it sets; the pruning gradient above applies to mask ⊙ W.
    """
    if spec is None:
        return w
    axes = _norm_axes(contract_axes, w.ndim)
    if spec.learned_scale:
        return _learned_qdq(_masked(w, mask, spec), _need_range(spec, log_range), spec, axes)
    if spec.runtime and setting is not None:
        return _compressed(w, mask, setting[0], spec, axes)
    return _compressed(w, mask, None, spec.static(), axes)


def runtime_fake_quant(w: jax.Array, bits, spec: WeightSpec, *, contract_axes: Sequence[int]) -> jax.Array:
    """`fake_quant` at a bit width given as a traced int32 scalar (0 = float values).

    One `lax.switch` over the `RUNTIME_BITS` branches, each the static `fake_quant` of
    that width: the values are those of the static setting bit for bit, and the program
    is the same whichever width runs. A width outside `RUNTIME_BITS` is caught where
    settings are written (`layers.set_runtime_setting`), not here.
    """
    widths = RUNTIME_BITS[1:]
    index = jnp.select([bits == b for b in widths], list(range(1, len(widths) + 1)), 0)
    branches = [lambda x: x] + [
        functools.partial(
            fake_quant, spec=dataclasses.replace(spec, weight_bits=b, nm=None, runtime=False),
            contract_axes=contract_axes,
        )
        for b in widths
    ]
    return jax.lax.switch(index, branches, w)


# ---------------------------------------------------------------------------------------
# N:M masks and their schedule
# ---------------------------------------------------------------------------------------


def nm_mask(w: jax.Array, n, m: int, axis: int | Sequence[int] = -1) -> jax.Array:
    """Bool mask keeping the n largest |w| of every group of m consecutive entries.

    Groups run along `axis`; a tuple of axes is flattened in order (row-major, last axis
    innermost). A row of length L with L % m != 0 ends in a partial group of r = L % m
    real entries, treated as padded with never-kept virtual entries: it keeps min(n, r).
    With a = |w| and ties broken by the lower index,

        rank_i = #{j : a_j > a_i or (a_j == a_i and j < i)},    keep_i = rank_i < n,

    so exactly n per full group. O(m²) compares per group, no sort/top_k; `n` may be a
    traced int (gradual schedules). `m` is static.
    """
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be a positive int, got {m!r}")
    axes = _norm_axes(axis, w.ndim)
    if axes == tuple(range(axes[0], axes[0] + len(axes))):
        # Consecutive axes in increasing order (every default: a kernel's contraction
        # axes): their row-major flattening is a reshape, no transpose. Transposes here
        # also gave the mask a transposed layout that XLA:CPU then copied back every step.
        before, after = w.shape[: axes[0]], w.shape[axes[-1] + 1 :]
        keep = _nm_keep_middle(jnp.abs(w).reshape(math.prod(before), -1, math.prod(after)), n, m)
        return keep.reshape(w.shape)
    rest = tuple(a for a in range(w.ndim) if a not in axes)
    perm = rest + axes
    a = jnp.transpose(jnp.abs(w), perm)
    keep = _nm_keep_middle(a.reshape(math.prod(a.shape[: len(rest)]), -1, 1), n, m)
    keep = keep.reshape(a.shape)
    return jnp.transpose(keep, tuple(perm.index(k) for k in range(w.ndim)))


def _nm_keep_middle(a: jax.Array, n, m: int) -> jax.Array:
    """`nm_mask` of magnitudes a [P, L, Q] with groups of m running along L."""
    p, length, q = a.shape
    groups = -(-length // m)
    if groups * m != length:
        # -1 < |anything|: virtual entries never outrank (nor tie with) a real one.
        a = jnp.pad(a, [(0, 0), (0, groups * m - length), (0, 0)], constant_values=-1)
    a = a.reshape(p, groups, m, q)
    ai, aj = a[:, :, :, None, :], a[:, :, None, :, :]  # [P, G, i, j, Q]
    idx = jnp.arange(m)
    j_before_i = (idx[None, :] < idx[:, None])[:, :, None]  # [i, j, 1]
    rank = jnp.sum((aj > ai) | ((aj == ai) & j_before_i), axis=3, dtype=jnp.int32)
    return (rank < n).reshape(p, groups * m, q)[:, :length, :]


def is_update_step(schedule: MaskSchedule, step) -> jax.Array:
    """Traced bool: does `schedule` recompute the mask at `step`?

    OneShot: step == at_step. Every: step >= start and (step − start) % every == 0.
    Gradual: begin <= step <= end and ((step − begin) % every == 0 or step == end).
    """
    step = jnp.asarray(step, jnp.int32)
    if isinstance(schedule, OneShot):
        return step == schedule.at_step
    if isinstance(schedule, Every):
        return (step >= schedule.start) & ((step - schedule.start) % schedule.every == 0)
    if isinstance(schedule, Gradual):
        on_grid = (step - schedule.begin) % schedule.every == 0
        return (step >= schedule.begin) & (step <= schedule.end) & (on_grid | (step == schedule.end))
    raise TypeError(f"unknown mask schedule {schedule!r}")


def keep_count(spec: WeightSpec, step) -> jax.Array:
    """Traced int32 keep count per group of M at `step`: N, or the Gradual ramp M → N.

    Gradual: n_t = M − ⌊(M − N)(t − begin) / (end − begin)⌋ with t = clip(step, begin, end).
    """
    n, m = spec.nm
    sched = spec.mask_schedule
    if not isinstance(sched, Gradual):
        return jnp.asarray(n, jnp.int32)
    t = jnp.clip(jnp.asarray(step, jnp.int32), sched.begin, sched.end) - sched.begin
    return (m - ((m - n) * t) // (sched.end - sched.begin)).astype(jnp.int32)


def mask_update(
    w: jax.Array,
    old_mask: jax.Array,
    spec: WeightSpec | None,
    step,
    *,
    contract_axes: Sequence[int],
    layer_axes: int = 0,
    force: bool = False,
    keep_n: jax.Array | None = None,
) -> jax.Array:
    """The mask after train step `step`: recomputed at schedule points, else `old_mask`.

    Jit-safe with a traced `step`: one `lax.cond` (no recompiles, no host round trip),
    so off-schedule steps cost nothing but the predicate. At a schedule point

        new = nm_mask(score, keep_count(spec, step), M, group axes)
        score = W              for STE / SRSTE (pruned weights still learn, may return)
        score = old_mask ⊙ W   for MASKED (pruned master weights are frozen at stale
                               values; they stay pruned, so a Gradual ramp is nested)

    Args:
      w, old_mask: kernel and its mask; with `layer_axes` = k leading stacked axes (scan
        over layers), the mask is computed per layer over the trailing axes.
      spec: the layer's WeightSpec; no N:M (or None) returns `old_mask`.
      step: int or traced int scalar.
      contract_axes: the per-layer kernel's contraction axes (default group axes).
      force: recompute now at the final N regardless of the schedule (post-training
        pruning, export); Python bool.
      keep_n: runtime specs only: N per layer (int32, shape = the `layer_axes` leading
        axes of `w`; N = M keeps every weight), from the layer's `CompressionSetting`.
    """
    if spec is None or (spec.nm is None and not spec.runtime):
        return old_mask
    per_layer_ndim = w.ndim - layer_axes
    axes = nm_group_axes(spec, contract_axes, per_layer_ndim)
    if spec.runtime:
        if keep_n is None:
            raise ValueError("a runtime spec's mask update needs keep_n (the layer's setting)")
        m, n_t = RUNTIME_M, jnp.asarray(keep_n, jnp.int32)
    else:
        m = spec.nm[1]
        n_t = jnp.asarray(spec.nm[0], jnp.int32) if force else keep_count(spec, step)
        n_t = jnp.broadcast_to(n_t, w.shape[:layer_axes])

    def compute():
        score = w if spec.prune_grad is not PruneGrad.MASKED else jnp.where(old_mask, w, jnp.zeros_like(w))
        fn = lambda s, n: nm_mask(s, n, m, axes)
        for _ in range(layer_axes):
            fn = jax.vmap(fn)
        return fn(score, n_t)

    if force:
        return compute()
    return jax.lax.cond(is_update_step(spec.mask_schedule, step), compute, lambda: old_mask)
