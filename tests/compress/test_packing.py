"""Bit packing and N:M compaction: exact round trips, golden layouts, stream lengths.

References are written independently of the module: numpy's own little-endian
`packbits` for the bit stream, explicit loops and `itertools.combinations` (colex order)
for N:M compaction and ranks.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usmqs.compress import packing
from usmqs.compress.packing import IndexEncoding

# Every example with a new shape compiles afresh: no deadline, few examples.
FEW = settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])

WEIGHT_BITS = (2, 4, 8)
NM_PATTERNS = ((2, 4), (1, 4), (1, 2), (2, 8), (4, 8))
ENCODINGS = tuple(IndexEncoding)


# --------------------------------------------------------------------------- references


def ref_pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Little-endian bit stream via numpy: value i at stream bits [i*bits, (i+1)*bits)."""
    word = values.reshape(-1).astype(np.int64) & ((1 << bits) - 1)
    stream = (word[:, None] >> np.arange(bits)) & 1
    return np.packbits(stream.reshape(-1).astype(np.uint8), bitorder="little")


def signed_values(rng: np.random.Generator, shape, bits: int) -> np.ndarray:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = rng.integers(lo, hi + 1, size=shape).astype(np.int8 if bits <= 8 else np.int16)
    flat = q.reshape(-1)
    flat[: min(2, flat.size)] = [lo, hi][: min(2, flat.size)]  # the extremes, always
    return q


def nm_mask(rng: np.random.Generator, shape, n: int, m: int, axis: int) -> np.ndarray:
    """Random N:M mask; a partial last group (r real slots) keeps a random number in
    [max(0, N - (M - r)), min(N, r)], the range a mask on the zero-padded axis can have."""
    moved = np.moveaxis(np.zeros(shape, bool), axis, -1)
    length = moved.shape[-1]
    for row in np.ndindex(moved.shape[:-1]):
        for start in range(0, length, m):
            real = np.arange(start, min(start + m, length))
            low = max(0, n - (m - real.size))
            keep = rng.integers(low, min(real.size, n) + 1)
            moved[row + (rng.permutation(real)[:keep],)] = True
    return np.moveaxis(moved, -1, axis)


def colex_rank_table(n: int, m: int) -> dict[tuple[int, ...], int]:
    """Rank of every N-subset of range(M) in colex order (compare reversed tuples)."""
    subsets = sorted(itertools.combinations(range(m), n), key=lambda c: c[::-1])
    return {c: r for r, c in enumerate(subsets)}


def ref_compact(q: np.ndarray, mask: np.ndarray, n: int, m: int, axis: int):
    """Loop reference of `compact_nm` including the documented tail padding rule."""
    x = np.moveaxis(q, axis, -1)
    k = np.moveaxis(mask, axis, -1)
    length = x.shape[-1]
    groups = -(-length // m)
    kept = np.zeros(x.shape[:-1] + (groups, n), q.dtype)
    pos = np.zeros(x.shape[:-1] + (groups, n), np.int64)
    for row in np.ndindex(x.shape[:-1]):
        for g in range(groups):
            real = [p for p in range(m) if g * m + p < length and k[row + (g * m + p,)]]
            padded = [p for p in range(m) if g * m + p >= length]
            chosen = real + padded[: n - len(real)]
            assert len(chosen) == n
            for j, p in enumerate(chosen):
                pos[row + (g, j)] = p
                kept[row + (g, j)] = x[row + (g * m + p,)] if g * m + p < length else 0
    return kept, pos


# --------------------------------------------------------------------------- strategies


@st.composite
def odd_shapes(draw, max_dims=3, max_side=13):
    ndim = draw(st.integers(1, max_dims))
    return tuple(draw(st.lists(st.integers(1, max_side), min_size=ndim, max_size=ndim)))


# --------------------------------------------------------------------------- bit streams


def test_golden_int4_low_nibble_first():
    packed = packing.pack_bits(jnp.array([-8, 7, 1], jnp.int8), 4)
    # -8 = 0b1000 in the low nibble, 7 = 0b0111 in the high one; the pad nibble is 0.
    assert packed.dtype == jnp.uint8
    np.testing.assert_array_equal(packed, [0x78, 0x01])


def test_golden_int2_four_per_byte():
    packed = packing.pack_bits(jnp.array([-2, 1, 0, -1, 1], jnp.int8), 2)
    # 0b10, 0b01, 0b00, 0b11 from the least significant bits up.
    np.testing.assert_array_equal(packed, [0b11_00_01_10, 0b01])


def test_golden_3bit_fields_straddle_bytes():
    packed = packing.pack_bits(jnp.array([5, 3, 6], jnp.uint8), 3)
    # stream 101 110 011 (LSB first) -> byte0 bits 0..7 = 1,0,1,1,1,0,0,1 ; byte1 = 1
    np.testing.assert_array_equal(packed, [0b10011101, 0b1])


@pytest.mark.parametrize("bits", WEIGHT_BITS)
def test_signed_extremes_survive(bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    values = jnp.array([lo, hi, 0, -1, lo, hi, lo], jnp.int8)
    out = packing.unpack_bits(packing.pack_bits(values, bits), bits, values.size)
    assert out.dtype == jnp.int8
    np.testing.assert_array_equal(out, values)


@FEW
@given(
    bits=st.sampled_from((1, 2, 3, 4, 5, 7, 8, 12)),
    shape=odd_shapes(),
    signed=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_bits_matches_numpy_and_round_trips(bits, shape, signed, seed):
    rng = np.random.default_rng(seed)
    if signed:
        values = signed_values(rng, shape, bits)
    else:
        values = rng.integers(0, 1 << bits, size=shape).astype(np.uint16 if bits > 8 else np.uint8)
    packed = packing.pack_bits(jnp.asarray(values), bits)
    count = values.size
    assert packed.shape == (math.ceil(count * bits / 8),) == (packing.packed_nbytes(count, bits),)
    np.testing.assert_array_equal(packed, ref_pack(values, bits))
    out = packing.unpack_bits(packed, bits, count, signed=signed)
    want_dtype = {(True, False): jnp.int8, (False, False): jnp.uint8,
                  (True, True): jnp.int16, (False, True): jnp.uint16}[(signed, bits > 8)]
    assert out.dtype == want_dtype
    np.testing.assert_array_equal(np.asarray(out).reshape(shape), values)


def test_dense_byte_counts_per_width():
    for count in (0, 1, 7, 8, 9, 1001):
        assert packing.packed_nbytes(count, 8) == count
        assert packing.packed_nbytes(count, 4) == (count + 1) // 2  # two per byte
        assert packing.packed_nbytes(count, 2) == (count + 3) // 4  # four per byte


def test_unpack_bits_rejects_wrong_length_or_dtype():
    with pytest.raises(ValueError, match="uint8"):
        packing.unpack_bits(jnp.zeros((3,), jnp.uint8), 4, 7)  # needs 4 bytes
    with pytest.raises(ValueError, match="uint8"):
        packing.unpack_bits(jnp.zeros((4,), jnp.int8), 4, 7)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="bits"):
        packing.pack_bits(jnp.zeros((4,), jnp.int8), 0)
    with pytest.raises(ValueError, match="bits"):
        packing.pack_bits(jnp.zeros((4,), jnp.int8), 17)
    with pytest.raises(TypeError, match="integers"):
        packing.pack_bits(jnp.zeros((4,), jnp.float32), 4)
    with pytest.raises(ValueError, match="N < M"):
        packing.compact_nm(jnp.zeros((8,)), jnp.ones((8,), bool), 4, 4)
    with pytest.raises(ValueError, match="more than 16 bits"):
        packing.pack_nm(jnp.zeros((64,), jnp.int8), jnp.ones((64,), bool), 4, 16, 32, -1, "combinatorial")
    with pytest.raises(ValueError, match="needs kept"):
        packing.expand_nm(jnp.zeros((2, 2)), jnp.zeros((2, 2), jnp.uint8), 2, 4, 0, (8, 3))


# --------------------------------------------------------------------------- N:M


@pytest.mark.parametrize("n,m", NM_PATTERNS)
def test_combinatorial_rank_is_colex_bijection(n, m):
    table = colex_rank_table(n, m)
    subsets = np.array(list(table), np.int64)  # [C, N]
    mask = np.zeros((len(table), m), bool)
    np.put_along_axis(mask, subsets, True, axis=1)
    values = np.arange(len(table) * m, dtype=np.int32).reshape(-1, m)
    kept, rank = packing.compact_nm(values, mask, n, m, -1, "combinatorial")
    np.testing.assert_array_equal(rank[:, 0], list(table.values()))
    assert rank.dtype == jnp.uint8
    np.testing.assert_array_equal(kept[:, 0], np.take_along_axis(values, subsets, 1))
    assert (1 << packing.nm_index_bits(n, m, "combinatorial")) >= len(table) > (
        1 << (packing.nm_index_bits(n, m, "combinatorial") - 1)
    )
    dense = packing.expand_nm(kept, rank, n, m, 1, values.shape, "combinatorial")
    np.testing.assert_array_equal(dense, np.where(mask, values, 0))


@FEW
@given(
    nm=st.sampled_from(NM_PATTERNS),
    shape=odd_shapes(max_dims=3, max_side=11),
    axis_seed=st.integers(0, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_compact_nm_matches_reference(nm, shape, axis_seed, seed):
    n, m = nm
    rng = np.random.default_rng(seed)
    axis = axis_seed % len(shape) - len(shape) * (seed % 2)  # negative axes too
    q = signed_values(rng, shape, 4)
    mask = nm_mask(rng, shape, n, m, axis)
    want_kept, want_pos = ref_compact(q, mask, n, m, axis)
    kept, pos = packing.compact_nm(q, mask, n, m, axis, IndexEncoding.POSITION)
    np.testing.assert_array_equal(kept, want_kept)
    np.testing.assert_array_equal(pos, want_pos)
    _, rank = packing.compact_nm(q, mask, n, m, axis, IndexEncoding.COMBINATORIAL)
    ranks = colex_rank_table(n, m)
    want_rank = np.vectorize(lambda *c: ranks[c])(*np.moveaxis(want_pos, -1, 0))
    np.testing.assert_array_equal(rank, want_rank.reshape(rank.shape))
    assert bool(packing.is_nm_mask(mask, n, m, axis))


def nm_nbytes(shape, axis: int, bits: int, n: int, m: int, encoding) -> tuple[int, int]:
    """Bytes of the value and index streams of `pack_nm`: R rows of G = ceil(L / M) groups,
    N values of `bits` bits per group, and N positions or one rank per group."""
    rows = math.prod(shape) // shape[axis]
    groups = rows * -(-shape[axis] // m)
    per_group = n if IndexEncoding(encoding) is IndexEncoding.POSITION else 1
    index_bits = packing.nm_index_bits(n, m, encoding)
    return math.ceil(groups * n * bits / 8), math.ceil(groups * per_group * index_bits / 8)


def _round_trip(q, mask, bits, nm, axis, encoding):
    """Pack, check the stream lengths, unpack; returns the dense result."""
    if nm is None:
        packed = packing.pack_bits(q, bits)
        assert packed.shape == (math.ceil(q.size * bits / 8),)
        return np.asarray(packing.unpack_bits(packed, bits, q.size)).reshape(q.shape)
    n, m = nm
    packed = packing.pack_nm(q, mask, bits, n, m, axis, encoding)
    values_nbytes, indices_nbytes = nm_nbytes(q.shape, axis % q.ndim, bits, n, m, encoding)
    assert packed.values.dtype == packed.indices.dtype == jnp.uint8
    assert packed.values.shape == (values_nbytes,)
    assert packed.indices.shape == (indices_nbytes,)
    out = packing.unpack_nm(*packed, bits, n, m, axis, q.shape, encoding)
    assert out.dtype == jnp.int8 and out.shape == q.shape
    return np.asarray(out)


@pytest.mark.parametrize("bits", WEIGHT_BITS)
@pytest.mark.parametrize(
    "nm,encoding",
    [(None, None)] + [(nm, enc) for nm in NM_PATTERNS for enc in ENCODINGS],
)
def test_round_trip_every_combination(bits, nm, encoding):
    # Odd sides everywhere, the group axis in the middle, not a multiple of 8.
    rng = np.random.default_rng(bits * 100 + (0 if nm is None else nm[0] * 10 + nm[1]))
    shape, axis = (3, 21, 5), 1
    q = signed_values(rng, shape, bits)
    mask = None if nm is None else nm_mask(rng, shape, *nm, axis)
    want = q if nm is None else np.where(mask, q, 0)
    np.testing.assert_array_equal(_round_trip(q, mask, bits, nm, axis, encoding), want)


@FEW
@given(
    bits=st.sampled_from(WEIGHT_BITS),
    nm=st.sampled_from((None,) + NM_PATTERNS),
    encoding=st.sampled_from(ENCODINGS),
    shape=odd_shapes(),
    axis_seed=st.integers(0, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_random_shapes_and_axes(bits, nm, encoding, shape, axis_seed, seed):
    rng = np.random.default_rng(seed)
    axis = axis_seed % len(shape)
    q = signed_values(rng, shape, bits)
    mask = None if nm is None else nm_mask(rng, shape, *nm, axis)
    want = q if nm is None else np.where(mask, q, 0)
    np.testing.assert_array_equal(_round_trip(q, mask, bits, nm, axis, encoding), want)


def test_float_values_compact_exactly():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 10)).astype(np.float32)
    mask = nm_mask(rng, w.shape, 2, 4, 0)
    kept, idx = packing.compact_nm(w, mask, 2, 4, 0)
    assert kept.dtype == jnp.float32 and kept.shape == (10, 2, 2)
    dense = packing.expand_nm(kept, idx, 2, 4, 0, w.shape)
    np.testing.assert_array_equal(dense, np.where(mask, w, 0))


def test_unpacked_values_and_fill_round_trip():
    """`bits` None keeps the kept values as they are (float bit patterns, say); `fill`
    puts a value other than 0 where pruned (the zero point of asymmetric codes)."""
    rng = np.random.default_rng(3)
    shape, axis = (6, 10), 0  # 6 = a full group of 4 + a padded one
    w = rng.standard_normal(shape).astype(np.float32)
    mask = nm_mask(rng, shape, 2, 4, axis)
    values, indices = packing.pack_nm(w, mask, None, 2, 4, axis)
    assert values.dtype == jnp.float32 and values.shape == (10, 2, 2)
    np.testing.assert_array_equal(packing.unpack_nm(values, indices, None, 2, 4, axis, shape), np.where(mask, w, 0))
    q = signed_values(rng, shape, 4)
    zero_point = rng.integers(-8, 8, size=(1, 10)).astype(np.int8)
    packed = packing.pack_nm(q, mask, 4, 2, 4, axis)
    out = packing.unpack_nm(*packed, 4, 2, 4, axis, shape, fill=zero_point)
    np.testing.assert_array_equal(out, np.where(mask, q, zero_point))


def test_is_nm_mask_rejects_broken_groups():
    rng = np.random.default_rng(1)
    mask = nm_mask(rng, (4, 12), 2, 4, -1)
    assert bool(packing.is_nm_mask(mask, 2, 4))
    broken = mask.copy()
    broken[2, :4] = True  # 4 of 4 kept
    assert not bool(packing.is_nm_mask(broken, 2, 4))
    tail = nm_mask(rng, (4, 10), 2, 4, -1)
    tail[:, 8:] = True  # a 2-long tail keeping 2 is fine, padding completes nothing
    assert bool(packing.is_nm_mask(tail, 2, 4))
    tail3 = nm_mask(rng, (4, 11), 2, 4, -1)
    tail3[0, 8:] = True  # 3 kept in the 3-long tail: more than N
    assert not bool(packing.is_nm_mask(tail3, 2, 4))
    short = nm_mask(rng, (2, 5), 4, 8, -1)  # 5 real + 3 padded slots: keep >= 1 real
    short[0] = False
    assert not bool(packing.is_nm_mask(short, 4, 8))
    short[0, 4] = True
    assert bool(packing.is_nm_mask(short, 4, 8))


# --------------------------------------------------------------------------- accounting


@pytest.mark.parametrize(
    "encoding,bits_per_weight", [(IndexEncoding.POSITION, 3.0), (IndexEncoding.COMBINATORIAL, 2.75)]
)
def test_int4_2of4_bits_per_weight(encoding, bits_per_weight):
    shape = (48, 64)  # group axis 64: whole groups, whole bytes
    numel = math.prod(shape)
    rng = np.random.default_rng(2)
    q = signed_values(rng, shape, 4)
    packed = packing.pack_nm(q, nm_mask(rng, shape, 2, 4, 1), 4, 2, 4, 1, encoding)
    # Per group of 4 weights: 2 kept int4 values = 8 bits, plus 2 x 2-bit positions
    # (position) or one 3-bit rank of C(4, 2) = 6 subsets (combinatorial).
    index_bits_per_group = 2 * 2 if encoding is IndexEncoding.POSITION else 3
    groups = numel // 4
    assert 8 * packed.values.size == groups * 2 * 4
    assert 8 * packed.indices.size == groups * index_bits_per_group
    total = packed.values.size + packed.indices.size
    assert 8 * total == bits_per_weight * numel
    if encoding is IndexEncoding.POSITION:
        # The paper's headline: 3 / 32 = 9.375 % of the fp32 bytes.
        assert total / (4 * numel) == 0.09375


@pytest.mark.parametrize(
    "nm,encoding,index_bits",
    [((2, 4), "position", 2), ((1, 4), "position", 2), ((1, 2), "position", 1),
     ((2, 8), "position", 3), ((4, 8), "position", 3),
     ((2, 4), "combinatorial", 3), ((1, 4), "combinatorial", 2), ((1, 2), "combinatorial", 1),
     ((2, 8), "combinatorial", 5), ((4, 8), "combinatorial", 7)],
)
def test_nm_stream_lengths(nm, encoding, index_bits):
    n, m = nm
    assert packing.nm_index_bits(n, m, encoding) == index_bits
    shape, axis = (5, 19, 3), 1  # 19 -> ceil(19 / m) groups per row, a padded last one
    rng = np.random.default_rng(4)
    packed = packing.pack_nm(signed_values(rng, shape, 2), nm_mask(rng, shape, n, m, axis), 2, n, m, axis, encoding)
    assert (packed.values.size, packed.indices.size) == nm_nbytes(shape, axis, 2, n, m, encoding)


# --------------------------------------------------------------------------- jit / jaxpr


def _sub_jaxprs(value):
    """Jaxprs nested in an equation parameter (jit bodies, cond branches, ...)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _primitive_names(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in _sub_jaxprs(param):
                names |= _primitive_names(sub)
    return names


def _traces():
    """(name, function of arrays only, arrays): each wraps one public function."""
    q = jnp.zeros((5, 9), jnp.int8)
    mask = jnp.zeros((5, 9), bool)
    yield "pack_bits", lambda x: packing.pack_bits(x, 3), (q,)
    yield "unpack_bits", lambda p: packing.unpack_bits(p, 3, 15), (jnp.zeros((6,), jnp.uint8),)
    yield "is_nm_mask", lambda k: packing.is_nm_mask(k, 2, 4, 1), (mask,)
    for enc in ENCODINGS:
        yield (f"compact_nm/{enc}",
               lambda x, k, enc=enc: packing.compact_nm(x, k, 2, 4, 1, enc), (q, mask))
        yield (f"pack_nm/{enc}",
               lambda x, k, enc=enc: packing.pack_nm(x, k, 4, 2, 4, 1, enc), (q, mask))
        kept, idx = packing.compact_nm(q, mask, 2, 4, 1, enc)
        yield (f"expand_nm/{enc}",
               lambda x, i, enc=enc: packing.expand_nm(x, i, 2, 4, 1, (5, 9), enc), (kept, idx))
        values, indices = packing.pack_nm(q, mask, 4, 2, 4, 1, enc)
        yield (f"unpack_nm/{enc}",
               lambda v, i, enc=enc: packing.unpack_nm(v, i, 4, 2, 4, 1, (5, 9), enc),
               (values, indices))


@pytest.mark.parametrize("name,call,args", list(_traces()), ids=[t[0] for t in _traces()])
def test_jitted_and_sort_free(name, call, args):
    closed = jax.make_jaxpr(call)(*args)
    # The public function is itself a jit: the outer trace is that one call.
    assert [e.primitive.name for e in closed.jaxpr.eqns] in (["jit"], ["pjit"]), name
    names = _primitive_names(closed.jaxpr)
    assert "cumsum" in names or not name.startswith(("compact", "pack_nm")), names
    assert not names & {"sort", "top_k", "argsort", "approx_top_k"}, (name, names)
