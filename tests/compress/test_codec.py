"""The per-layer codec: every storage kind decodes bit for bit to the fake-quant kernel.

The reference for every compressed kernel is the fake-quant forward value, computed per
stacked layer exactly as the scanned model computes it: jit(compressed_weight)(kernel[i],
mask[i]). The codec goes another way (ops.quantize_weight -> pack -> unpack ->
qwix.dequantize), so bitwise equality is a real check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_bitwise, compressed_layers, fake_quant_kernels, mixed_model
from usmqs.compress import codec
from usmqs.compress.codec import Kind, Layout, PackedKernel
from usmqs.compress.packing import IndexEncoding


@pytest.fixture(scope="module")
def model():
    return mixed_model()[2]


def _encode_stacked(layer, encoding: IndexEncoding) -> tuple[PackedKernel, int]:
    """Every stacked layer of `layer` encoded: (PackedKernel with stack axes leading, stack rank)."""
    lay = Layout.of(layer, encoding)
    kernel = layer.kernel[...]
    mask, _, log_range = layer.compression_state()
    if kernel.ndim == len(lay.layer_shape):
        comps, nm_ok = codec.encode(lay, kernel, mask, log_range)
        assert nm_ok is None or bool(nm_ok)
        return PackedKernel(lay, **comps), 0
    per_layer = []
    for i in range(kernel.shape[0]):
        comps, nm_ok = codec.encode(
            lay, kernel[i], None if mask is None else mask[i], None if log_range is None else log_range[i]
        )
        assert nm_ok is None or bool(nm_ok)
        per_layer.append(comps)
    return PackedKernel(lay, **jax.tree.map(lambda *a: jnp.stack(a), *per_layer)), 1


@pytest.mark.parametrize("encoding", list(IndexEncoding))
def test_every_kind_decodes_bitwise(model, encoding):
    got, kinds = {}, set()
    for path, layer in compressed_layers(model).items():
        packed, stack_ndim = _encode_stacked(layer, encoding)
        kinds.add(packed.layout.kind)
        got[path] = np.asarray(codec.decode_stacked(packed, stack_ndim))
    assert kinds == {Kind.QUANTIZED, Kind.SPARSE_FLOAT, Kind.DENSE_FLOAT}
    assert_bitwise(fake_quant_kernels(model), got)


def test_codes_are_int8_in_range_with_n_of_m_kept(model):
    packed, _ = _encode_stacked(compressed_layers(model)["blocks/attn/v"], IndexEncoding.POSITION)
    assert packed.values.dtype == packed.indices.dtype == jnp.uint8
    codes = np.asarray(jax.vmap(PackedKernel.codes)(packed))  # int2 + 2:4, one layer at a time
    assert codes.dtype == np.int8 and set(np.unique(codes)) <= {-2, -1, 0, 1}
    assert codes.shape == (2, 32, 2, 16)  # [layers, in, heads, head_dim]; 2:4 along `in`
    assert ((codes != 0).reshape(2, 8, 4, 32).sum(axis=2) <= 2).all()


def test_mask_that_is_not_n_of_m_is_flagged():
    _, _, unpruned = mixed_model(prune=False)  # masks still all-ones
    layer = compressed_layers(unpruned)["subsample/conv1"]
    lay = Layout.of(layer, IndexEncoding.POSITION)
    assert lay.nm == (2, 4) and lay.nm_axes == (0, 1, 2)
    _, nm_ok = codec.encode(lay, layer.kernel[...], layer.mask[...])
    assert not bool(nm_ok)
