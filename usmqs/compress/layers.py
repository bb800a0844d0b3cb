"""The one entry point through which every weight contraction of the model passes.

`Dense` and `Conv` are the only layers in `usmqs.models` that own a weight matrix. Each
resolves its compression spec from the policy once, at construction, by its module path
(e.g. ``blocks/ffn1/w_in``), and on every call computes

    W_eff = fake_quant(mask ⊙ W)          (prune first, then quantize what remains)

through `compressed_weight`, with straight-through gradients. A layer whose spec is None
uses W as is, bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from usmqs.compress import ops
from usmqs.compress.policy import RUNTIME_M, Policy, WeightSpec, runtime_value_problems


class SparsityMask(nnx.Variable):
    """N:M keep-mask of a weight (1 = kept): its own non-trainable variable kind.

    Never a Param (so never in the optimizer state) and never in BatchStat.
    """


class QuantRange(nnx.Param):
    """The learned quantization range of a layer under a `WeightSpec.learned_scale` spec:
    [1, *groups] log hi (symmetric) or [2, *groups] log −lo, log hi (asymmetric), one
    entry per scale group (`ops.range_shape`). A Param, so trained with the weights (no
    weight decay: `usmqs.run.make_optimizer`), checkpointed and restored with them; its
    value at the start of a run comes from `calibrate_ranges`.
    """


class CompressionSetting(nnx.Variable):
    """int32 [bits, N] of a layer under a runtime spec (`WeightSpec.runtime`): the bit
    width (0 = float values) and the N of N:M (N = M: dense) the compiled step applies.

    Non-trainable state like `SparsityMask`; checkpointed with the masks, so a resumed
    run keeps its setting. Written with `set_runtime_setting`.
    """


def runtime_setting_values(bits: int | None, nm: tuple[int, int] | None) -> jax.Array:
    """int32 [bits, N] of a runtime setting: bits None (float values) or one of
    `RUNTIME_BITS`; nm None (dense: N = M) or (N, M) with M = `RUNTIME_M`."""
    problems = runtime_value_problems(bits, nm)
    if problems:
        raise ValueError("; ".join(problems))
    return jnp.asarray([0 if bits is None else bits, RUNTIME_M if nm is None else nm[0]], jnp.int32)


class EncodedKernel:
    """A kernel value held in a stored form and decoded where the layer uses it.

    The packed export (`usmqs.compress.codec.PackedKernel`) serves with these in place of float
    kernels: a pytree whose leaves carry the layer axes of the stored components, so
    the model's scan over stacked layers slices them like any kernel and `decode` runs
    inside the scan body, one layer at a time -- the whole model is never dense float.
    """

    def decode(self) -> jax.Array:
        """The float kernel ``[*kernel_shape]`` of one (unstacked) layer."""
        raise NotImplementedError


@functools.partial(jax.tree_util.register_dataclass, data_fields=("value",), meta_fields=())
@dataclasses.dataclass(frozen=True)
class ComputedKernel(EncodedKernel):
    """An effective kernel computed ahead of its use (`precompute_effective_kernels`):
    `decode` returns it as it is."""

    value: jax.Array

    def decode(self) -> jax.Array:
        return self.value


def precompute_effective_kernels(model: nnx.Module, layer_axes: int) -> None:
    """Replace every compressed kernel of `model` (whose variables carry `layer_axes`
    leading stacked axes) by its effective kernel, computed for all stacked layers at
    once; gradients flow to the master kernel through `ops.compressed_weight`'s STE.

    For a model whose stacked blocks are then applied with a scan: the masking and fake
    quantization run as one pass over the whole stack, not as small per-layer ops inside
    the scan body (and their backward as one pass over the stacked gradients). Mutates
    `model`: call it on a merged copy of the state, not on the live model.
    """
    for _, node in nnx.iter_graph(model):
        if not isinstance(node, _Compressible) or node.spec is None:
            continue
        if isinstance(node.kernel.get_value(), EncodedKernel):
            continue
        node.kernel.set_value(ComputedKernel(stacked_effective_kernel(node, layer_axes)))


def stacked_effective_kernel(node: _Compressible, layer_axes: int) -> jax.Array:
    """`node.effective_kernel()` of a layer whose variables carry `layer_axes` leading
    stacked axes (scan over layers): each stacked layer masked and fake-quantized on its own."""
    spec, axes = node.spec, node.contract_axes

    def one(w, mask, setting, log_range):
        return ops.compressed_weight(w, mask, spec, contract_axes=axes, setting=setting, log_range=log_range)

    for _ in range(layer_axes):
        one = jax.vmap(one)
    return one(node.kernel[...], *node.compression_state())


def calibrate_ranges(model: nnx.Module) -> int:
    """Set every learned range of `model` (`QuantRange`) to the clip-searched range of
    its layer's masked kernel now (`ops.initial_range`): where a run with learned ranges
    starts, after its weights and masks are in place. Returns how many layers."""
    count = 0
    for _, node in nnx.iter_graph(model):
        if not isinstance(node, _Compressible) or node.quant_range is None:
            continue
        spec, axes = node.spec, node.contract_axes

        def one(w, mask):
            x = w if mask is None else jnp.where(mask, w, jnp.zeros_like(w))
            return ops.initial_range(x, spec, contract_axes=axes)

        w = node.kernel[...]
        for _ in range(w.ndim - len(node.kernel_shape)):
            one = jax.vmap(one)
        node.quant_range[...] = one(w, None if node.mask is None else node.mask[...])
        count += 1
    return count


def _resolve(policy: Policy | None, path: str) -> WeightSpec | None:
    return None if policy is None else policy.resolve(path)


class _Compressible(nnx.Module):
    """Shared part of Dense/Conv: the kernel, the optional mask, the compressed view."""

    spec: WeightSpec | None
    contract_axes: tuple[int, ...]

    def _init_kernel(self, shape, axes, init, param_dtype, rngs, path, policy, contract_axes):
        self.path = path
        self.contract_axes = tuple(contract_axes)
        # The per-layer kernel shape: under nnx.vmap (scan over layers) the variables gain
        # leading stacked axes, and mask updates outside the scan body need to know how many.
        self.kernel_shape = tuple(shape)
        self.spec = _resolve(policy, path)
        try:
            ops.check_spec(self.spec, self.kernel_shape, self.contract_axes)
        except ValueError as e:
            raise ValueError(f"layer {path!r}: {e}") from e
        self.kernel = nnx.Param(
            init(rngs.params(), shape, param_dtype), out_sharding=tuple(axes), eager_sharding=False
        )
        runtime = self.spec is not None and self.spec.runtime
        if self.spec is not None and (self.spec.nm is not None or runtime):
            self.mask = SparsityMask(jnp.ones(shape, jnp.bool_), out_sharding=tuple(axes), eager_sharding=False)
        else:
            self.mask = None
        self.setting = (
            CompressionSetting(
                runtime_setting_values(self.spec.weight_bits, self.spec.nm),
                out_sharding=(None,), eager_sharding=False,
            )
            if runtime
            else None
        )
        self.quant_range = self._range_param(axes, param_dtype)

    def _range_param(self, axes, param_dtype) -> QuantRange | None:
        """The learned range of a `learned_scale` spec, else None: a placeholder (log 1)
        until `calibrate_ranges` sees the weights; sharded like the kernel's output-channel
        axes, replicated along the rest."""
        if self.spec is None or not self.spec.learned_scale:
            return None
        channel, _ = ops.quant_axes(self.kernel_shape, self.spec, self.contract_axes)
        range_axes = (None, *(a if i in channel else None for i, a in enumerate(axes)))
        return QuantRange(
            jnp.zeros(ops.range_shape(self.kernel_shape, self.spec, self.contract_axes), param_dtype),
            out_sharding=range_axes, eager_sharding=False,
        )

    def compression_state(self) -> tuple[jax.Array | None, jax.Array | None, jax.Array | None]:
        """(mask, runtime setting, learned range) values, None where the layer has none."""
        return tuple(None if v is None else v[...] for v in (self.mask, self.setting, self.quant_range))

    def effective_kernel(self) -> jax.Array:
        """The weight as served: mask, then fake-quant (STE); W itself when float; the
        decoded kernel when the value is an `EncodedKernel` (serving from an export)."""
        value = self.kernel.get_value()
        if isinstance(value, EncodedKernel):
            return value.decode()
        mask, setting, log_range = self.compression_state()
        return ops.compressed_weight(
            self.kernel[...], mask, self.spec, contract_axes=self.contract_axes, setting=setting,
            log_range=log_range,
        )


class Dense(_Compressible):
    """y = x W + b over the last axis of x.

    Shapes: x [..., in], W [in, *out], y [..., *out]; `out` may be a tuple (e.g. heads,
    head_dim) so attention projections keep their logical axes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | Sequence[int],
        *,
        path: str,
        policy: Policy | None,
        kernel_axes: Sequence[str | None],
        use_bias: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.lecun_normal(),
        rngs: nnx.Rngs,
    ):
        out = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        self.in_features, self.out_features = in_features, out
        self.dtype = dtype
        self._init_kernel(
            (in_features, *out), kernel_axes, kernel_init, param_dtype, rngs, path, policy, (0,)
        )
        self.bias = (
            nnx.Param(jnp.zeros(out, param_dtype), out_sharding=tuple(kernel_axes[1:]), eager_sharding=False)
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.effective_kernel()
        dtype = self.dtype or x.dtype
        y = jax.lax.dot_general(
            x.astype(dtype), w.astype(dtype), (((x.ndim - 1,), (0,)), ((), ()))
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class Conv(_Compressible):
    """N-d convolution, channels last: x [B, *spatial, C_in] -> y [B, *spatial', C_out].

    Kernel [*window, C_in / groups, C_out]; `feature_group_count=C_in` is a depthwise
    convolution. Contraction axes of the kernel are the window and input-channel axes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int],
        *,
        path: str,
        policy: Policy | None,
        kernel_axes: Sequence[str | None],
        strides: Sequence[int] | None = None,
        padding: str | Sequence[tuple[int, int]] = "SAME",
        feature_group_count: int = 1,
        use_bias: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.lecun_normal(),
        bias_init=nnx.initializers.zeros_init(),
        rngs: nnx.Rngs,
    ):
        ks = tuple(kernel_size)
        self.strides = tuple(strides) if strides is not None else (1,) * len(ks)
        self.padding = padding if isinstance(padding, str) else tuple(map(tuple, padding))
        self.feature_group_count = feature_group_count
        self.dtype = dtype
        shape = (*ks, in_features // feature_group_count, out_features)
        self._init_kernel(
            shape, kernel_axes, kernel_init, param_dtype, rngs, path, policy,
            tuple(range(len(ks) + 1)),
        )
        self.bias = (
            nnx.Param(
                bias_init(rngs.params(), (out_features,), param_dtype),
                out_sharding=(kernel_axes[-1],), eager_sharding=False,
            )
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.effective_kernel()
        dtype = self.dtype or x.dtype
        nd = w.ndim - 2
        pads = _depthwise_1d_pads(self.padding, w.shape[0]) if nd == 1 else None
        if (
            pads is not None and self.strides == (1,) and x.ndim == 3
            and w.shape[1] == 1 and self.feature_group_count == x.shape[-1] == w.shape[-1]
        ):
            # Depthwise 1-D (the Conformer conv module) as K shifted multiply-adds. Same
            # numbers as the grouped convolution, but XLA:CPU's grouped conv is ~15x
            # slower, and its gradient inside a scan over layers ~30x slower again.
            y = _depthwise_1d(x.astype(dtype), w.astype(dtype), pads)
        else:
            spatial = "".join("HWD"[:nd]) if nd > 1 else "H"
            dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
            y = jax.lax.conv_general_dilated(
                x.astype(dtype), w.astype(dtype), self.strides, self.padding,
                dimension_numbers=dn, feature_group_count=self.feature_group_count,
            )
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


def _depthwise_1d_pads(padding, k: int) -> tuple[int, int] | None:
    """(low, high) time padding of a stride-1 1-D conv, as lax.conv_general_dilated pads."""
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "SAME":
            return (k - 1) // 2, k - 1 - (k - 1) // 2
        return (0, 0) if mode == "VALID" else None
    (lo, hi), = padding
    return int(lo), int(hi)


def _depthwise_1d(x: jax.Array, w: jax.Array, pads: tuple[int, int]) -> jax.Array:
    """y[b, t, c] = sum_k xpad[b, t + k, c] * w[k, 0, c]: x [B, T, C], w [K, 1, C].

    Accumulates in float32 (like the convolution it replaces) and returns x's dtype.
    """
    k = w.shape[0]
    xp = jnp.pad(x, ((0, 0), pads, (0, 0))).astype(jnp.float32)
    w = w.astype(jnp.float32)
    t_out = xp.shape[1] - k + 1
    y = xp[:, :t_out, :] * w[0, 0, :]
    for i in range(1, k):
        y = y + xp[:, i : i + t_out, :] * w[i, 0, :]
    return y.astype(x.dtype)


def set_runtime_setting(model: nnx.Module, policy: Policy) -> int:
    """Write each layer's [bits, N] under `policy` into its `CompressionSetting`.

    Every layer of `model` built with a runtime spec gets the bits and N:M that
    `policy.resolve(layer.path)` gives it (no rule: float values, dense), e.g.
    `Policy.named("int4+2:4")` keeps the layers it exempts from N:M dense. Its bits must
    be in `RUNTIME_BITS` and its M = `RUNTIME_M`. Masks are not touched: recompute them
    (`masks.update_masks(..., force=True)`) after changing N. Returns how many layers.
    """
    count = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, _Compressible) and node.setting is not None:
            spec = policy.resolve(node.path)
            values = runtime_setting_values(*((None, None) if spec is None else (spec.weight_bits, spec.nm)))
            node.setting[...] = jnp.broadcast_to(values, node.setting[...].shape)
            count += 1
    return count


def compressible_layers(model: nnx.Module) -> dict[str, tuple[WeightSpec | None, int]]:
    """Every Dense/Conv of `model`: policy path -> (resolved spec, number of weights).

    Layers stacked by scan share one path; their count includes the stacked axis.
    """
    out: dict[str, tuple[WeightSpec | None, int]] = {}
    for _, node in nnx.iter_graph(model):
        if isinstance(node, _Compressible):
            prev = out.get(node.path)
            out[node.path] = (node.spec, _prod(node.kernel.shape) + (prev[1] if prev else 0))
    return out


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
