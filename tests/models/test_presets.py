"""Model presets: published hyper-parameters, parameter counts (shapes only), tracing."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from usmqs.models.conformer import ConformerConfig, ConformerCTC, subsampled_length
from usmqs.models.presets import PRESETS, get_preset

VOCAB = 1024


def _analytic_count(c: ConformerConfig, vocab: int) -> int:
    """Independent parameter count of the architecture in conformer.py's docstrings."""
    d, f, k, ch = c.model_dim, c.ffn_dim, c.conv_kernel_size, c.subsample_channels
    ln = 2 * d
    ffn = ln + (d * f + f) + (f * d + d)
    attn = ln + 3 * (d * d + d) + d * d + (d * d + d) + 2 * d  # q k v (+b), pos, out (+b), u, v
    conv = ln + (d * 2 * d + 2 * d) + (k * d + d) + ln + (d * d + d)  # pw1, dw, conv norm, pw2
    block = 2 * ffn + attn + conv + ln
    front = (9 * ch + ch) + (9 * ch * ch + ch) + (subsampled_length(c.num_mel_bins) * ch * d + d)
    return front + c.num_layers * block + ln + (d * vocab + vocab)


def test_every_preset_is_a_valid_model_config():
    fields = {f.name for f in dataclasses.fields(ConformerConfig)}
    for name in PRESETS:
        cfg = get_preset(name)
        assert set(cfg.keys()) == fields, name
        ConformerConfig.from_config(cfg)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("conformer_xl")


def test_get_preset_returns_a_fresh_copy():
    a = get_preset("tiny")
    a.num_layers = 99
    assert get_preset("tiny").num_layers == 4


def test_published_hyperparameters():
    def shape(name):
        c = get_preset(name)
        return (c.num_layers, c.model_dim, c.num_heads, c.ffn_dim, c.conv_kernel_size, c.num_mel_bins)

    assert shape("conformer_s") == (16, 144, 4, 576, 32, 80)  # Gulati et al. 2020, Table 1
    assert shape("conformer_m") == (16, 256, 4, 1024, 32, 80)
    assert shape("usm_600m") == (24, 1024, 8, 4096, 5, 128)  # Zhang et al. 2023
    assert shape("usm_2b") == (32, 1536, 16, 6144, 5, 128)
    assert shape("tiny")[:5] == (4, 144, 4, 576, 15)
    assert get_preset("usm_2b").dtype == "bfloat16" and get_preset("usm_2b").remat


@pytest.mark.parametrize(
    "name,low,high",
    [
        ("tiny", 1e6, 4e6),
        ("conformer_s", 8e6, 12e6),
        ("conformer_m", 25e6, 35e6),  # paper: 30.7M with its LSTM decoder
        ("usm_600m", 0.5e9, 0.7e9),
        ("usm_2b", 1.5e9, 2.5e9),
    ],
)
def test_param_counts_from_shapes(name, low, high):
    cfg = get_preset(name)
    model = nnx.eval_shape(lambda: ConformerCTC(cfg, VOCAB, rngs=nnx.Rngs(0)))
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == _analytic_count(ConformerConfig.from_config(cfg), VOCAB)
    assert low <= n <= high, f"{name}: {n:,}"


def test_every_preset_traces_abstractly():
    """Forward of every preset from shapes alone (no weights, no compile)."""
    for name in PRESETS:
        cfg = get_preset(name)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: ConformerCTC(cfg, VOCAB, rngs=nnx.Rngs(0))))
        x = jax.ShapeDtypeStruct((2, 50, cfg.num_mel_bins), jnp.float32)
        m = jax.ShapeDtypeStruct((2, 50), jnp.bool_)
        logits, out_mask = jax.eval_shape(lambda st, x, m: nnx.merge(graphdef, st)(x, m), state, x, m)
        assert logits.shape == (2, subsampled_length(50), VOCAB) and logits.dtype == jnp.float32, name
        assert out_mask.shape == (2, subsampled_length(50)), name
