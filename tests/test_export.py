"""Serving from the packed export: the served forward is bitwise the fake-quant forward,
kernels stay packed, an export that does not fit the model is refused by name. (A trained
run's export is checked in test_transcribe.py, on the run its tests share.)"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT
from usmqs import config as config_lib
from usmqs import export
from usmqs.compress import codec
from usmqs.compress.export_format import ExportError


def test_served_forward_is_bitwise_the_fake_quant_forward(mixed_export):
    served = export.load_export(mixed_export["dir"])
    rs = np.random.default_rng(0)
    features = jnp.asarray(rs.standard_normal((3, 72, 80)), jnp.float32)
    mask = jnp.asarray(np.arange(72)[None, :] < np.array([[72], [50], [31]]))
    graphdef, params, rest = nnx.split(mixed_export["model"], nnx.Param, ...)

    @jax.jit
    def fake_quant(params, rest, f, m):
        logits, out_mask = nnx.merge(graphdef, params, rest)(f, m, rng=None)
        return jax.nn.log_softmax(logits, axis=-1), out_mask

    want, want_mask = fake_quant(params, rest, features, mask)
    got, got_mask = served.log_probs(features, mask)
    valid = np.asarray(want_mask)
    np.testing.assert_array_equal(np.asarray(got_mask), valid)
    assert 0 < valid.sum() < valid.size  # padded frames exist (they hold meaningless values)
    np.testing.assert_array_equal(np.asarray(got)[valid], np.asarray(want)[valid])


def _top_level_avals(closed_jaxpr):
    """Avals of every value the jaxpr computes outside scan bodies (jit calls inlined)."""
    out = []
    for eqn in closed_jaxpr.jaxpr.eqns:
        out += [v.aval for v in eqn.outvars]
        if eqn.primitive.name in ("pjit", "jit", "closed_call"):
            out += _top_level_avals(eqn.params["jaxpr"])
    return out


def test_served_kernels_stay_packed_and_decode_per_layer(mixed_export):
    """The forward holds stacked kernels packed and decodes one layer per scan step: no
    float array of a whole stacked kernel exists outside the scan body, and the logits
    equal those of a forward given every kernel fully decoded up front."""
    served = export.load_export(mixed_export["dir"])
    tensors = served.metadata["tensors"]
    stacked = {n: p for n, p in served.packed.items() if tensors[n]["stack_shape"]}
    assert "blocks/attn/k/kernel" in stacked and stacked["blocks/attn/k/kernel"].values.dtype == jnp.uint8
    features = jnp.asarray(np.random.default_rng(1).standard_normal((2, 40, 80)), jnp.float32)
    mask = jnp.ones((2, 40), bool)
    jaxpr = jax.make_jaxpr(served.forward)(served.floats, served.packed, features, mask)
    full = {tuple(tensors[n]["shape"]) for n in stacked}
    float_shapes = {tuple(a.shape) for a in _top_level_avals(jaxpr) if getattr(a, "dtype", None) == jnp.float32}
    assert not full & float_shapes, full & float_shapes
    got, _ = served.log_probs(features, mask)
    decoded = {n: codec.decode_stacked(p, len(tensors[n]["stack_shape"])) for n, p in served.packed.items()}
    want, _ = served.forward({**served.floats, **decoded}, {}, features, mask)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_export_that_does_not_fit_the_model(mixed_export, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(mixed_export["dir"], copy)
    cfg = config_lib.load_config(str(ROOT / "configs/tiny.py"))
    with pytest.raises(ExportError, match=r"another model preset.*model_dim: export 32 vs config 144"):
        export.load_export(copy, config=cfg)
    # Metadata that no longer describes the stored arrays: the tensor is named.
    meta = json.loads((copy / "metadata.json").read_text())
    meta["model_config"]["ffn_dim"] = 96
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="tensor blocks/ffn1/w_in/.*model needs float32"):
        export.load_export(copy)
    # A subsampler output narrower than the model's, as in an export of a run trained
    # before the subsampler was padded: the error says what happened.
    meta["model_config"].update(ffn_dim=mixed_export["model"].cfg.ffn_dim, num_mel_bins=84)
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=r"tensor subsample/proj/kernel: .*padded its convolutions.*train it again"):
        export.load_export(copy)
