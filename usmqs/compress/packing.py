"""Bit packing for the compressed export: low-bit integers and N:M index metadata in uint8.

Orbax/tensorstore store an int4 or int2 array at one byte per value and reject the
uint4/uint2 dtypes, so the export packs its tensors itself, into plain uint8 arrays that
any checkpoint format stores at face value. Everything here is jitted with the shape- and
layout-defining arguments static, and contains no sort/top_k (slow on CPU).

Bit-stream layout (`pack_bits`)
-------------------------------
The values, flattened row-major, form one little-endian bit stream: value ``i`` (its
``bits`` low bits, two's complement for signed values) occupies stream bits
``[i*bits, (i+1)*bits)``, least significant bit first, and stream bit ``j`` is bit
``j % 8`` (LSB = 0) of byte ``j // 8``. Hence

* int4: two per byte, value ``2k`` in the low nibble of byte ``k``, ``2k+1`` in the high;
* int2: four per byte, value ``4k+t`` in bits ``[2t, 2t+2)`` of byte ``k``;
* int8: one per byte, the two's complement byte itself;
* widths that do not divide 8 (the 3-bit rank of a 2:4 group, say) straddle bytes.

The stream is padded with zero bits to a whole byte: ``packed_nbytes(count, bits) ==
ceil(count * bits / 8)`` bytes, no header. The element count and shape are metadata the
caller keeps (they are static arguments of the unpacking functions).

N:M layout (`compact_nm`, `pack_nm`)
------------------------------------
The group axis ``axis`` (length L) is moved last and split into ``G = ceil(L / M)``
groups of M consecutive elements, giving ``[..., G, M]`` with the other axes in their
original order. A group keeps exactly N elements (mask True = kept). Per group:

* kept values: ``[..., G, N]``, in their original order within the group;
* "position" indices (`IndexEncoding.POSITION`, the hardware 2:4 layout): ``[..., G, N]``,
  the position in ``[0, M)`` of each kept value, ascending, ``ceil(log2 M)`` bits each
  (2 bits for M = 4);
* "combinatorial" indices (`IndexEncoding.COMBINATORIAL`): ``[..., G]``, the rank of the
  kept set in the combinatorial number system, ``rank = sum_i C(c_i, i + 1)`` for the kept
  positions ``c_0 < c_1 < ... < c_{N-1}``, which is a bijection onto ``[0, C(M, N))``;
  ``ceil(log2 C(M, N))`` bits per group (3 for 2:4, 2 for 1:4, 5 for 2:8, 7 for 4:8).

Both arrays are packed, row-major, with `pack_bits` into two separate streams.

Padding rule when M does not divide L: the axis is padded with zeros to ``G * M``, and
in the last group (r = L - (G-1)*M real slots, M - r padded ones) the first ``N - k``
padded slots count as kept, k being the number of kept real elements there. This needs
``max(0, N - (M - r)) <= k <= min(N, r)``, which is exactly what an N:M mask computed on
the zero-padded axis satisfies. Every group then keeps exactly N, so the layout is the
ordinary one; `expand_nm` drops the padded slots, which hold zeros anyway. Masks outside
this contract (a full group not keeping N, a last group out of that range) decode to
unspecified values; the check is `is_nm_mask` (a traced mask cannot raise under jit).
"""

from __future__ import annotations

import enum
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Indices of any supported N:M pattern and weights of any supported width fit 16 bits.
MAX_BITS = 16


class IndexEncoding(enum.StrEnum):
    """How the kept positions of an N:M group are stored."""

    # One ceil(log2 M)-bit position per kept value: what 2:4 sparse tensor cores read.
    POSITION = "position"
    # One ceil(log2 C(M, N))-bit rank per group: the information-theoretic minimum.
    COMBINATORIAL = "combinatorial"


class PackedNM(NamedTuple):
    """The two parts of an N:M tensor (see `pack_nm`); a pytree, so jit returns it."""

    values: jax.Array  # kept values: a uint8 stream of `bits` bits each, or [..., G, N] as they are
    indices: jax.Array  # uint8 stream of positions or ranks, `nm_index_bits(n, m, encoding)` bits each


# --------------------------------------------------------------------------- sizes


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [1, {MAX_BITS}], got {bits!r}")


def _check_nm(n: int, m: int, encoding: IndexEncoding) -> None:
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
        raise ValueError(f"N:M needs integers 1 <= N < M, got {n}:{m}")
    if nm_index_bits(n, m, encoding) > MAX_BITS:
        raise ValueError(f"{n}:{m} {encoding.value} indices need more than {MAX_BITS} bits")


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of `pack_bits` output for `count` values of `bits` bits: ceil(count*bits/8)."""
    _check_bits(bits)
    return -(-count * bits // 8)


def nm_index_bits(n: int, m: int, encoding: IndexEncoding | str) -> int:
    """Bits of one index element: per kept value (position) or per group (combinatorial)."""
    encoding = IndexEncoding(encoding)
    if encoding is IndexEncoding.POSITION:
        # (x - 1).bit_length() is ceil(log2 x), in exact integers.
        return (m - 1).bit_length()
    return (math.comb(m, n) - 1).bit_length()


# --------------------------------------------------------------------------- bit streams


def _uint_dtype(bits: int):
    return jnp.uint8 if bits <= 8 else jnp.uint16


def _int_dtype(bits: int):
    return jnp.int8 if bits <= 8 else jnp.int16


@functools.partial(jax.jit, static_argnames=("bits",))
def pack_bits(values: jax.Array, bits: int) -> jax.Array:
    """Pack integers into a little-endian bit stream: uint8 ``[ceil(n * bits / 8)]``.

    `values`: any integer (or bool) array, flattened row-major (n = its size). Signed
    values in ``[-2^(bits-1), 2^(bits-1) - 1]`` are stored as two's complement, unsigned
    ones in ``[0, 2^bits)``; only the low `bits` bits are kept, so anything outside
    those ranges wraps (it is not checked: a traced array cannot raise). Layout: module
    docstring (int4: element 2k in the low nibble of byte k). `bits` in 1..16.
    """
    _check_bits(bits)
    if not (jnp.issubdtype(values.dtype, jnp.integer) or values.dtype == jnp.bool_):
        raise TypeError(f"pack_bits packs integers, got {values.dtype}")
    flat = jnp.ravel(values)
    count = flat.size
    nbytes = packed_nbytes(count, bits)
    # Through int32 then a bitcast so negative values give their two's complement bits.
    if jnp.issubdtype(flat.dtype, jnp.signedinteger):
        word = jax.lax.bitcast_convert_type(flat.astype(jnp.int32), jnp.uint32)
    else:
        word = flat.astype(jnp.uint32)
    word = word & jnp.uint32((1 << bits) - 1)
    if 8 % bits == 0:
        # Fields never straddle a byte: shift each of the 8/bits fields into place. The
        # fields are disjoint, so the sum is the bitwise or.
        per = 8 // bits
        word = jnp.pad(word, (0, nbytes * per - count)).reshape(nbytes, per)
        shifts = jnp.arange(per, dtype=jnp.uint32) * bits
        return jnp.sum(word << shifts, axis=1).astype(jnp.uint8)
    # General width: spell out the bit stream, then regroup it by 8.
    stream = (word[:, None] >> jnp.arange(bits, dtype=jnp.uint32)) & 1
    stream = jnp.pad(stream.reshape(-1), (0, nbytes * 8 - count * bits)).reshape(nbytes, 8)
    return jnp.sum(stream << jnp.arange(8, dtype=jnp.uint32), axis=1).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("bits", "count", "signed"))
def unpack_bits(packed: jax.Array, bits: int, count: int, signed: bool = True) -> jax.Array:
    """Inverse of `pack_bits`: the first `count` values of the stream, as ``[count]``.

    Returns int8 (signed, sign-extended from bit ``bits - 1``) or uint8 (unsigned) for
    ``bits <= 8``; int16/uint16 for 9..16 bits. `packed` must be uint8
    ``[packed_nbytes(count, bits)]``; the padding bits of the last byte are ignored.
    """
    _check_bits(bits)
    if packed.dtype != jnp.uint8 or packed.shape != (packed_nbytes(count, bits),):
        raise ValueError(
            f"expected uint8[{packed_nbytes(count, bits)}] for {count} x {bits} bits, "
            f"got {packed.dtype}{list(packed.shape)}"
        )
    byte = packed.astype(jnp.uint32)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = jnp.arange(per, dtype=jnp.uint32) * bits
        raw = ((byte[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]
    else:
        stream = ((byte[:, None] >> jnp.arange(8, dtype=jnp.uint32)) & 1).reshape(-1)
        stream = stream[: count * bits].reshape(count, bits)
        raw = jnp.sum(stream << jnp.arange(bits, dtype=jnp.uint32), axis=1)
    if not signed:
        return raw.astype(_uint_dtype(bits))
    # Two's complement: a set top bit means value - 2^bits.
    value = raw.astype(jnp.int32) - ((raw >> (bits - 1)) & 1).astype(jnp.int32) * (1 << bits)
    return value.astype(_int_dtype(bits))


# --------------------------------------------------------------------------- N:M


def _normalize_axis(axis: int, ndim: int) -> int:
    if ndim == 0:
        raise ValueError("N:M needs an array with at least one axis")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for {ndim} dimensions")
    return axis % ndim


def _to_groups(x: jax.Array, m: int, axis: int, fill) -> jax.Array:
    """``[..., L, ...] -> [..., G, M]`` (axis moved last, zero/False padded to G*M)."""
    x = jnp.moveaxis(x, axis, -1)
    length = x.shape[-1]
    groups = -(-length // m)
    pad = [(0, 0)] * (x.ndim - 1) + [(0, groups * m - length)]
    x = jnp.pad(x, pad, constant_values=fill)
    return x.reshape(*x.shape[:-1], groups, m)


def _padding_slots(length: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Constants ``[G, M]``: whether a slot is axis padding, and its order among them."""
    groups = -(-length // m)
    flat = np.arange(groups * m)
    return (flat >= length).reshape(groups, m), (flat - length).reshape(groups, m)


def _grouped_mask(mask: jax.Array, n: int, m: int, axis: int) -> jax.Array:
    """The mask as ``[..., G, M]`` with the padding rule applied (module docstring)."""
    length = mask.shape[axis]
    k = _to_groups(mask.astype(jnp.bool_), m, axis, False)
    if length % m:
        is_pad, pad_order = _padding_slots(length, m)
        missing = n - jnp.sum(k, axis=-1, keepdims=True, dtype=jnp.int32)
        k = k | (is_pad & (pad_order < missing))
    return k


def _binomial_column(m: int, i: int) -> np.ndarray:
    """``C(p, i)`` for p in [0, M), as int32 (C(p, i) = 0 for p < i)."""
    return np.array([math.comb(p, i) for p in range(m)], np.int32)


@functools.partial(jax.jit, static_argnames=("n", "m", "axis", "encoding"))
def compact_nm(
    q: jax.Array,
    mask: jax.Array,
    n: int,
    m: int,
    axis: int = -1,
    encoding: IndexEncoding | str = IndexEncoding.POSITION,
) -> tuple[jax.Array, jax.Array]:
    """Keep the N masked-in values of every group of M along `axis`.

    `q`: ``[..., L, ...]`` (any dtype; quantized integers in the export), `mask`: same
    shape, True = kept, exactly N per group (padding rule: module docstring).
    Returns ``(kept, indices)``: kept ``[..., G, N]`` of q's dtype, in original order
    within each group (other axes in original order, `axis` replaced by G, N last);
    indices uint8 ``[..., G, N]`` positions (POSITION) or uint8/uint16 ``[..., G]`` ranks
    (COMBINATORIAL).
    """
    encoding = IndexEncoding(encoding)
    _check_nm(n, m, encoding)
    if q.shape != mask.shape:
        raise ValueError(f"values {q.shape} and mask {mask.shape} differ in shape")
    axis = _normalize_axis(axis, q.ndim)
    x = _to_groups(q, m, axis, 0)
    k = _grouped_mask(mask, n, m, axis)
    # The j-th kept element of a group is the one where the running count of kept
    # elements reaches j + 1: a cumulative sum does what a sort/top_k would.
    count = jnp.cumsum(k, axis=-1, dtype=jnp.int32)
    slots = [k & (count == j + 1) for j in range(n)]
    zero = jnp.zeros((), x.dtype)
    kept = jnp.stack([jnp.sum(jnp.where(s, x, zero), axis=-1, dtype=x.dtype) for s in slots], -1)
    if encoding is IndexEncoding.POSITION:
        where = jnp.arange(m, dtype=jnp.int32)
        pos = [jnp.sum(jnp.where(s, where, 0), axis=-1) for s in slots]
        return kept, jnp.stack(pos, -1).astype(jnp.uint8)
    # rank = sum_j C(c_j, j + 1): the kept element in slot j contributes its column entry.
    rank = sum(
        jnp.sum(jnp.where(s, _binomial_column(m, j + 1), 0), axis=-1)
        for j, s in enumerate(slots)
    )
    return kept, rank.astype(_uint_dtype(nm_index_bits(n, m, encoding)))


def _unrank(rank: jax.Array, n: int, m: int) -> jax.Array:
    """Combinatorial rank ``[...]`` -> ascending positions ``[..., N]`` (greedy decoding).

    For i = N .. 1, c_{i-1} is the largest c with C(c, i) <= r, then r -= C(c, i). C(c, i)
    is nondecreasing in c, so "largest c" is a count of table entries <= r, no search.
    """
    r = rank.astype(jnp.int32)[..., None]
    positions = []
    for i in range(n, 0, -1):
        column = _binomial_column(m, i)
        fits = column <= r
        positions.append(jnp.sum(fits, axis=-1, dtype=jnp.int32) - 1)
        r = r - jnp.max(jnp.where(fits, column, 0), axis=-1, keepdims=True)
    return jnp.stack(positions[::-1], -1)


@functools.partial(jax.jit, static_argnames=("n", "m", "axis", "shape", "encoding"))
def expand_nm(
    kept: jax.Array,
    indices: jax.Array,
    n: int,
    m: int,
    axis: int,
    shape: tuple[int, ...],
    encoding: IndexEncoding | str = IndexEncoding.POSITION,
    fill: jax.Array | None = None,
) -> jax.Array:
    """Inverse of `compact_nm`: the dense ``shape`` tensor, `fill` where pruned.

    `kept` ``[..., G, N]`` and `indices` as `compact_nm` returns them for a tensor of
    `shape` (static) grouped along `axis`; output has kept's dtype. `fill` (broadcastable
    to `shape`, e.g. the zero point of asymmetric codes) defaults to zeros.
    """
    encoding = IndexEncoding(encoding)
    _check_nm(n, m, encoding)
    shape = tuple(shape)
    axis = _normalize_axis(axis, len(shape))
    length = shape[axis]
    groups = -(-length // m)
    lead = shape[:axis] + shape[axis + 1 :]
    want_idx = lead + (groups, n) if encoding is IndexEncoding.POSITION else lead + (groups,)
    if kept.shape != lead + (groups, n) or indices.shape != want_idx:
        raise ValueError(
            f"{n}:{m} along axis {axis} of {shape} needs kept {lead + (groups, n)} and "
            f"{encoding.value} indices {want_idx}, got {kept.shape} and {indices.shape}"
        )
    if encoding is IndexEncoding.POSITION:
        pos = indices.astype(jnp.int32)
    else:
        pos = _unrank(indices, n, m)
    slot = jnp.arange(m, dtype=jnp.int32)
    zero = jnp.zeros((), kept.dtype)
    dense = sum(
        jnp.where(pos[..., j, None] == slot, kept[..., j, None], zero) for j in range(n)
    ).astype(kept.dtype)
    dense = jnp.moveaxis(dense.reshape(*lead, groups * m)[..., :length], -1, axis)
    if fill is None:
        return dense
    hit = functools.reduce(jnp.logical_or, [pos[..., j, None] == slot for j in range(n)])
    hit = jnp.moveaxis(hit.reshape(*lead, groups * m)[..., :length], -1, axis)
    return jnp.where(hit, dense, jnp.asarray(fill, kept.dtype))


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def is_nm_mask(mask: jax.Array, n: int, m: int, axis: int = -1) -> jax.Array:
    """Whether `mask` meets the compaction contract: bool scalar (jit-friendly).

    Every group of M along `axis` keeps exactly N; a last, partial group with r real
    slots keeps between ``max(0, N - (M - r))`` and ``min(N, r)`` of them (the padding
    rule completes it to N with padded slots).
    """
    _check_nm(n, m, IndexEncoding.POSITION)
    axis = _normalize_axis(axis, mask.ndim)
    k = _to_groups(mask.astype(jnp.bool_), m, axis, False)
    kept = jnp.sum(k, axis=-1, dtype=jnp.int32)
    tail = mask.shape[axis] % m
    if tail:
        low, high = max(0, n - (m - tail)), min(n, tail)
        last = kept[..., -1]
        return jnp.all(kept[..., :-1] == n) & jnp.all((last >= low) & (last <= high))
    return jnp.all(kept == n)


@functools.partial(jax.jit, static_argnames=("bits", "n", "m", "axis", "encoding"))
def pack_nm(
    q: jax.Array,
    mask: jax.Array,
    bits: int | None,
    n: int,
    m: int,
    axis: int = -1,
    encoding: IndexEncoding | str = IndexEncoding.POSITION,
) -> PackedNM:
    """`compact_nm`, then `pack_bits` of the indices and (unless `bits` is None) the values.

    values: the kept ``[..., G, N]`` packed at `bits` bits (two's complement), uint8
    ``[ceil(R * G * N * bits / 8)]`` for R rows of G groups; with `bits` None the kept
    array itself (e.g. float bit patterns). indices: uint8
    ``[ceil(R * G * N * ceil(log2 M) / 8)]`` (position) or
    ``[ceil(R * G * ceil(log2 C(M, N)) / 8)]`` (combinatorial), unsigned.
    """
    encoding = IndexEncoding(encoding)
    kept, idx = compact_nm(q, mask, n, m, axis, encoding)
    values = kept if bits is None else pack_bits(kept, bits)
    return PackedNM(values, pack_bits(idx, nm_index_bits(n, m, encoding)))


@functools.partial(
    jax.jit, static_argnames=("bits", "n", "m", "axis", "shape", "encoding", "signed")
)
def unpack_nm(
    values: jax.Array,
    indices: jax.Array,
    bits: int | None,
    n: int,
    m: int,
    axis: int,
    shape: tuple[int, ...],
    encoding: IndexEncoding | str = IndexEncoding.POSITION,
    signed: bool = True,
    fill: jax.Array | None = None,
) -> jax.Array:
    """Inverse of `pack_nm`: the dense tensor of `shape`, `fill` (default 0) where pruned.

    int8 (int16 above 8 bits; unsigned unless `signed`) from packed values; with `bits`
    None, `values` is the kept ``[..., G, N]`` array and the output has its dtype.
    """
    encoding = IndexEncoding(encoding)
    _check_nm(n, m, encoding)
    shape = tuple(shape)
    ax = _normalize_axis(axis, len(shape))
    groups = -(-shape[ax] // m)
    lead = shape[:ax] + shape[ax + 1 :]
    idx_shape = lead + (groups, n) if encoding is IndexEncoding.POSITION else lead + (groups,)
    kept = values if bits is None else unpack_bits(values, bits, math.prod(lead) * groups * n, signed)
    idx = unpack_bits(indices, nm_index_bits(n, m, encoding), math.prod(idx_shape), False)
    return expand_nm(
        kept.reshape(lead + (groups, n)), idx.reshape(idx_shape), n, m, ax, shape, encoding, fill
    )
