"""The per-layer codec of the packed export: one compressed kernel <-> its stored components.

A compressed layer's kernel ``[*layer_shape]`` (one layer; a scanned stack is encoded
layer by layer) is stored as a few arrays, chosen by its `Kind`:

* ``quantized`` (weight_bits 2, 4, 8): the integer codes q of
  ``ops.quantize_weight(kernel, mask, spec)`` -- mask first, then quantize per channel or
  sub-channel block -- so that ``qwix.dequantize(q, scale, zero_point)`` equals the
  fake-quant forward value ``ops.compressed_weight(kernel, mask, spec)`` bit for bit.

  - ``values``     uint8 ``[B]``: q packed by `packing.pack_bits` at ``weight_bits``
    (int8 one per byte, int4 two, int2 four; two's complement, little-endian stream).
    Dense layers store all ``prod(layer_shape)`` codes in row-major order; N:M layers
    only the N kept codes of every group of M (N:M layout below), by `packing.pack_nm`.
  - ``indices``    uint8 ``[B']`` (N:M only): `packing` position indices
    (``IndexEncoding.POSITION``, default: ceil(log2 M) bits per kept value, the hardware
    2:4 layout) or combinatorial ranks (ceil(log2 C(M, N)) bits per group).
  - ``scale``      float32 ``[*group_shape]``, qwix's layout: the layer's rank, 1 on
    reduced axes, the block count on a sub-channel axis. float32 because the evaluation
    multiplies by the float32 scale; rounding it to bfloat16 would change the weights.
  - ``zero_point`` int8 ``[*group_shape]`` (asymmetric specs only); pruned positions
    decode to q = zero_point, i.e. weight 0, as in the evaluation.

* ``sparse_float`` (N:M without weight bits, and int16 + N:M, which has no integer form
  in qwix): ``values`` float32 ``[*rest_shape, G, N]``, the kept entries of W_eff =
  ``compressed_weight(...)``, compacted as bit patterns (so signs of zero survive), plus
  ``indices`` as above.
* ``dense_float`` (int16 without N:M): ``values`` float32 ``[*layer_shape]`` = W_eff.
* ``float`` (norms, biases, kernels the policy leaves float): the tensor itself; the
  codec has nothing to do for it.

N:M layout: the layer's group axes (``nm_axes``: the contraction axes unless the rule sets
``nm_axis``) are moved last, in order, and flattened, giving rows
``[*rest_shape, group_length]`` -- exactly how `ops.nm_mask` groups -- then compacted
along the last axis by `packing.pack_nm` (a partial last group follows packing's padding
rule; the padded slots hold zeros and are dropped on expansion). G = number of groups per
row, ceil(group_length / M).

Serving holds these components as a `PackedKernel` (an `EncodedKernel`): the model's scan
over stacked layers slices its leaves, and `PackedKernel.decode` unpacks and dequantizes
one layer where that layer runs.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import qwix

from usmqs.compress import ops, packing
from usmqs.compress.layers import Conv, Dense, EncodedKernel
from usmqs.compress.packing import IndexEncoding
from usmqs.compress.policy import WeightSpec


class Kind(enum.StrEnum):
    """How a tensor is stored (module docstring)."""

    QUANTIZED = "quantized"
    SPARSE_FLOAT = "sparse_float"
    DENSE_FLOAT = "dense_float"
    FLOAT = "float"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static description of one compressed layer (hashable: keys the jit caches)."""

    kind: Kind
    layer_shape: tuple[int, ...]
    contract_axes: tuple[int, ...]
    spec: WeightSpec
    nm: tuple[int, int] | None  # None also when N == M (a dense "pattern")
    nm_axes: tuple[int, ...] | None
    encoding: IndexEncoding

    @classmethod
    def of(cls, layer: Dense | Conv, encoding: IndexEncoding) -> Layout:
        """The layout of a compressed layer (``layer.spec`` not None) under `encoding`."""
        return cls.for_spec(layer.spec, layer.kernel_shape, layer.contract_axes, encoding)

    @classmethod
    def for_spec(
        cls, spec: WeightSpec, layer_shape: tuple[int, ...], contract_axes: tuple[int, ...], encoding: IndexEncoding
    ) -> Layout:
        """The layout of one layer's kernel ``[*layer_shape]`` under `spec` (not None)."""
        shape = tuple(layer_shape)
        nm = spec.nm if spec.nm is not None and spec.nm[0] < spec.nm[1] else None
        nm_axes = ops.nm_group_axes(spec, contract_axes, len(shape)) if nm else None
        if spec.weight_bits is not None and spec.weight_bits <= 8:
            kind = Kind.QUANTIZED
        else:  # float N:M, or int16 (qwix has no integer form above 8 bits)
            kind = Kind.SPARSE_FLOAT if nm else Kind.DENSE_FLOAT
        return cls(kind, shape, tuple(contract_axes), spec, nm, nm_axes, encoding)

    @property
    def value_bits(self) -> int | None:
        """Bits per stored value: the weight bits when quantized, None for float values."""
        return self.spec.weight_bits if self.kind is Kind.QUANTIZED else None

    @property
    def index_bits(self) -> int | None:
        """Bits per stored N:M index element; None for dense layers."""
        return packing.nm_index_bits(*self.nm, self.encoding) if self.nm else None

    @property
    def rest_axes(self) -> tuple[int, ...]:
        return tuple(a for a in range(len(self.layer_shape)) if a not in self.nm_axes)

    @property
    def rows_shape(self) -> tuple[int, ...]:
        """Per-layer N:M rows: [*rest_shape, group_length]."""
        rest = tuple(self.layer_shape[a] for a in self.rest_axes)
        return rest + (math.prod(self.layer_shape[a] for a in self.nm_axes),)

    def to_rows(self, x: jax.Array) -> jax.Array:
        return jnp.transpose(x, self.rest_axes + self.nm_axes).reshape(self.rows_shape)

    def from_rows(self, x: jax.Array) -> jax.Array:
        perm = self.rest_axes + self.nm_axes
        x = x.reshape(tuple(self.layer_shape[a] for a in perm))
        return jnp.transpose(x, tuple(perm.index(a) for a in range(len(perm))))


@functools.cache
def _encoder(lay: Layout) -> Callable:
    """Jitted `encode` of one layout (cached: one compilation per distinct layer)."""
    spec = lay.spec

    def encode_layer(kernel, mask, log_range):
        out = {}
        if lay.kind is Kind.QUANTIZED:
            qa = ops.quantize_weight(kernel, mask, spec, contract_axes=lay.contract_axes, log_range=log_range)
            q = qa.qvalue.astype(jnp.int8)  # int4 storage -> int8: same integers
            out["scale"] = qa.scale
            if qa.zero_point is not None:
                out["zero_point"] = qa.zero_point.astype(jnp.int8)
            if lay.nm is None:
                out["values"] = packing.pack_bits(q, spec.weight_bits)
                return out, None
            kept_src = q
        else:
            w = ops.compressed_weight(kernel, mask, spec, contract_axes=lay.contract_axes, log_range=log_range)
            if lay.nm is None:
                out["values"] = w
                return out, None
            # Compact the float bit patterns as integers: exact, whatever the values.
            kept_src = jax.lax.bitcast_convert_type(w, jnp.int32)
        n, m = lay.nm
        rows_mask = lay.to_rows(mask)
        values, out["indices"] = packing.pack_nm(
            lay.to_rows(kept_src), rows_mask, lay.value_bits, n, m, -1, lay.encoding
        )
        out["values"] = values if lay.value_bits else jax.lax.bitcast_convert_type(values, jnp.float32)
        return out, packing.is_nm_mask(rows_mask, n, m, -1)

    return jax.jit(encode_layer)


def encode(
    lay: Layout, kernel: jax.Array, mask: jax.Array | None, log_range: jax.Array | None = None
) -> tuple[dict[str, jax.Array], jax.Array | None]:
    """One layer's kernel and mask ``[*layer_shape]`` (and its learned range, for a
    `learned_scale` spec: `ops.range_shape`) -> (stored components, nm_ok).

    Components as in the module docstring, without stack axes. `nm_ok` (bool scalar, None
    for dense layouts) says whether the mask meets the N:M contract along ``nm_axes``;
    when it is False the components do not describe the kernel.
    """
    return _encoder(lay)(kernel, mask, log_range)


def stored_nbytes(lay: Layout) -> dict[str, int]:
    """Bytes of each component `encode` stores for one layer of `lay`, from shapes only:
    `encode` traced abstractly (`jax.eval_shape`), nothing computed."""
    kernel = jax.ShapeDtypeStruct(lay.layer_shape, jnp.float32)
    mask = jax.ShapeDtypeStruct(lay.layer_shape, jnp.bool_) if lay.nm else None
    log_range = None
    if lay.spec.learned_scale:
        log_range = jax.ShapeDtypeStruct(ops.range_shape(lay.layer_shape, lay.spec, lay.contract_axes), jnp.float32)
    out, _ = jax.eval_shape(functools.partial(encode, lay), kernel, mask, log_range)
    return {k: math.prod(a.shape) * a.dtype.itemsize for k, a in out.items()}


def _broadcast_groups(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A per-group array (qwix scale layout) repeated out to the full `shape`."""
    for a, (gs, s) in enumerate(zip(g.shape, shape)):
        if gs not in (1, s):
            g = jnp.repeat(g, s // gs, axis=a)
    return jnp.broadcast_to(g, shape)


def _dequantize(q: jax.Array, scale: jax.Array, zero_point: jax.Array | None) -> jax.Array:
    """(q - z) * scale through qwix itself: the evaluation's own dequantization."""
    return qwix.dequantize(qwix.QArray(q, scale, zero_point))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("values", "indices", "scale", "zero_point"),
    meta_fields=("layout",),
)
@dataclasses.dataclass(frozen=True)
class PackedKernel(EncodedKernel):
    """A compressed kernel as the export stores it, decoded where the layer uses it.

    Leaves are the stored components (module docstring) with the layer's stack axes
    leading -- ``values [*stack, B]``, ``indices [*stack, B']``, ``scale`` and
    ``zero_point [*stack, *group_shape]`` -- or none for an unstacked layer. The model's
    scan over layers slices them like any stacked kernel; `decode` then unpacks, expands
    the N:M positions and dequantizes one layer: ``(q - z) * scale`` through qwix, the
    fake-quant evaluation's own arithmetic.
    """

    layout: Layout
    values: jax.Array
    indices: jax.Array | None = None
    scale: jax.Array | None = None
    zero_point: jax.Array | None = None

    def codes(self) -> jax.Array:
        """One layer's int8 codes (quantized) or float kernel (other kinds), ``[*layer_shape]``.

        Traceable: runs inside the serving scan.
        """
        lay = self.layout
        if lay.nm is None:
            if lay.kind is Kind.QUANTIZED:
                count = math.prod(lay.layer_shape)
                return packing.unpack_bits(self.values, lay.value_bits, count).reshape(lay.layer_shape)
            return self.values
        fill = None
        if self.zero_point is not None:
            # Pruned weights were quantized as 0.0, i.e. code z: restore it there.
            fill = lay.to_rows(_broadcast_groups(self.zero_point, lay.layer_shape))
        values = self.values
        if lay.kind is Kind.SPARSE_FLOAT:
            values = jax.lax.bitcast_convert_type(values, jnp.int32)
        n, m = lay.nm
        rows = packing.unpack_nm(
            values, self.indices, lay.value_bits, n, m, -1, lay.rows_shape, lay.encoding, fill=fill
        )
        if lay.kind is Kind.SPARSE_FLOAT:
            rows = jax.lax.bitcast_convert_type(rows, jnp.float32)
        return lay.from_rows(rows)

    def decode(self) -> jax.Array:
        """The float32 kernel ``[*layer_shape]`` of one layer."""
        out = self.codes()
        if self.layout.kind is Kind.QUANTIZED:
            out = _dequantize(out, self.scale, self.zero_point)
        # Materialize the decoded kernel once per layer (flat: a layout-free buffer), so
        # XLA does not fuse, and duplicate, the unpacking into each of its consumers.
        return jax.lax.optimization_barrier(out.reshape(-1)).reshape(out.shape)


@functools.partial(jax.jit, static_argnames=("stack_ndim",))
def decode_stacked(packed: PackedKernel, stack_ndim: int) -> jax.Array:
    """Every layer of `packed` (`stack_ndim` leading stack axes) decoded: float32
    ``[*stack, *layer_shape]``.

    Materializes the whole kernel in float: for kernels decoded once at load (grouped
    convolutions) and for inspection; serving decodes stacked kernels layer by layer.
    """
    fn = PackedKernel.decode
    for _ in range(stack_ndim):
        fn = jax.vmap(fn)
    return fn(packed)
