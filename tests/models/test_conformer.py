"""Conformer CTC model: shapes, padding invariance, batch independence, dropout keys,
logical axes, scan over layers, training signal, relative-position shift."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from usmqs.compress.layers import Conv, compressible_layers
from usmqs.models import conformer
from usmqs.models.conformer import (
    LOGICAL_AXIS_NAMES,
    WEIGHT_PATHS,
    ConformerConfig,
    ConformerCTC,
    rel_shift,
    relative_positions,
    subsampled_length,
    with_logical_constraint,
)

VOCAB = 11
# Small but complete: several heads, an even conv kernel (asymmetric SAME padding).
MICRO = dict(
    num_layers=2, model_dim=32, num_heads=4, ffn_dim=64, conv_kernel_size=4,
    subsample_channels=4, num_mel_bins=16, dropout=0.1, attention_dropout=0.1,
)


def _model(**overrides) -> ConformerCTC:
    # Eager init compiles one initializer per distinct parameter shape (~0.2 s each here),
    # so numeric tests keep MICRO's shapes (cached) and vary only dtype/remat/rates.
    return ConformerCTC({**MICRO, **overrides}, VOCAB, rngs=nnx.Rngs(0))


def _abstract(**overrides) -> ConformerCTC:
    """Shapes and metadata only: for structure and jaxpr tests."""
    return nnx.eval_shape(lambda: _model(**overrides))


@pytest.fixture(scope="module")
def micro():
    model = _model()
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, x, m, rng: nnx.merge(graphdef, st)(x, m, rng=rng))
    return model, graphdef, state, forward


def _features(rs, t, f=MICRO["num_mel_bins"]):
    return rs.randn(t, f).astype(np.float32)


def _batch(utterances, t, pad_value=None, seed=0):
    """Stack [T_i, F] utterances into [B, t, F] + prefix mask; padding is garbage."""
    rs = np.random.RandomState(seed)
    f = utterances[0].shape[1]
    x = (rs.randn(len(utterances), t, f) * 1e3).astype(np.float32)
    if pad_value is not None:
        x[:] = pad_value
    mask = np.zeros((len(utterances), t), bool)
    for i, u in enumerate(utterances):
        x[i, : len(u)] = u
        mask[i, : len(u)] = True
    return jnp.asarray(x), jnp.asarray(mask)


# ------------------------------------------------------------------------- lengths


def test_subsampled_length_formula():
    ts = [0, 1, 2, 3, 4, 5, 8, 9, 13, 17, 18, 300]
    assert [subsampled_length(t) for t in ts] == [0, 1, 1, 1, 1, 2, 2, 3, 4, 5, 5, 75]
    ts = np.arange(0, 500)
    np.testing.assert_array_equal(subsampled_length(ts), -(-ts // 4))  # ceil(T / 4)
    np.testing.assert_array_equal(subsampled_length(ts), [subsampled_length(int(t)) for t in ts])
    np.testing.assert_array_equal(np.asarray(subsampled_length(jnp.asarray(ts))), subsampled_length(ts))


def test_subsampled_length_is_what_the_subsampler_outputs():
    """The formula is the shape the padded stride-2 convolutions really produce, in time
    and in frequency (the proj kernel's input width)."""
    model = _abstract()
    f_out = subsampled_length(MICRO["num_mel_bins"])
    assert model.subsample.proj.kernel.shape == (f_out * MICRO["subsample_channels"], MICRO["model_dim"])
    graphdef, state = nnx.split(model)
    for t in range(1, 12):
        x = jax.ShapeDtypeStruct((1, t, MICRO["num_mel_bins"]), jnp.float32)
        m = jax.ShapeDtypeStruct((1, t), jnp.bool_)
        logits, out_mask = jax.eval_shape(lambda st, x, m: nnx.merge(graphdef, st)(x, m), state, x, m)
        assert logits.shape[1] == out_mask.shape[1] == subsampled_length(t), t


def test_subsampled_length_matches_data_pipeline():
    from usmqs.data import pipeline

    ts = np.arange(0, 500)
    np.testing.assert_array_equal(pipeline.subsampled_length(ts), subsampled_length(ts))


def test_output_shapes_and_lengths(micro):
    _, _, state, forward = micro
    rs = np.random.RandomState(1)
    lengths = [64, 37, 7, 0]
    x, mask = _batch([_features(rs, n) for n in lengths], 64)
    logits, out_mask = forward(state, x, mask, None)
    t_out = subsampled_length(64)
    assert logits.shape == (4, t_out, VOCAB) and logits.dtype == jnp.float32
    assert out_mask.shape == (4, t_out) and out_mask.dtype == jnp.bool_
    np.testing.assert_array_equal(out_mask.sum(-1), [subsampled_length(n) for n in lengths])
    # Prefix mask, and every output finite (padded rows included).
    np.testing.assert_array_equal(out_mask, np.arange(t_out)[None] < out_mask.sum(-1)[:, None])
    assert np.isfinite(np.asarray(logits)).all()


def test_hidden_outputs_are_the_blocks_outputs_that_the_head_reads(micro):
    model = micro[0]
    x, mask = _batch([_features(np.random.RandomState(2), n) for n in (64, 40)], 64)
    logits, out_mask = model(x, mask)
    logits_h, out_mask_h, hidden = model(x, mask, return_hidden=True)
    assert hidden.shape == (model.cfg.num_layers, 2, subsampled_length(64), model.cfg.model_dim)
    np.testing.assert_array_equal(logits_h, logits)
    np.testing.assert_array_equal(out_mask_h, out_mask)
    # The last block's output is what the final norm and the CTC head read.
    np.testing.assert_allclose(model.ctc_head(model.final_norm(hidden[-1])), logits, rtol=1e-5, atol=1e-5)
    assert not np.allclose(hidden[0], hidden[-1])


# -------------------------------------------------------------- padding / batching


@pytest.mark.parametrize("length", [36, 37, 38, 39])  # every T mod 4: both convs' last windows
def test_valid_frames_do_not_depend_on_padding(micro, length):
    """The key invariant: more (and garbage, even NaN) padding changes no valid output.

    The padded convolutions' last valid windows read one frame past the row's length (at
    the input, or at conv1's output, for odd lengths there): it must be zero as in the
    unpadded sequence, not the batch padding or conv1's bias on it.
    """
    _, _, state, forward = micro
    rs = np.random.RandomState(2)
    utt = _features(rs, length)
    n_out = subsampled_length(length)
    ref, ref_mask = forward(state, *_batch([utt], length), None)
    assert int(ref_mask.sum()) == n_out == ref.shape[1] == -(-length // 4)
    for pad_value, t in ((None, length + 1), (None, length + 3), (None, 61), (np.nan, 61), (0.0, 90)):
        logits, out_mask = forward(state, *_batch([utt], t, pad_value), None)
        assert int(out_mask.sum()) == n_out
        np.testing.assert_allclose(logits[0, :n_out], ref[0], atol=1e-5, rtol=1e-5, err_msg=f"T={t}")


def test_batch_independence(micro):
    _, _, state, forward = micro
    rs = np.random.RandomState(3)
    a, b1, b2 = _features(rs, 45), _features(rs, 61), _features(rs, 20) * 5.0
    n_a = subsampled_length(45)
    alone, _ = forward(state, *_batch([a], 61), None)
    with_b1, _ = forward(state, *_batch([a, b1], 61), None)
    with_b2, _ = forward(state, *_batch([a, b2], 61, seed=7), None)
    np.testing.assert_allclose(with_b1[0, :n_a], alone[0, :n_a], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(with_b2[0, :n_a], alone[0, :n_a], atol=1e-5, rtol=1e-5)
    assert not np.allclose(with_b1[1], with_b2[1])  # the other row did change


# ------------------------------------------------------------------------ dropout


def test_dropout_uses_explicit_keys(micro):
    _, _, state, forward = micro
    x, mask = _batch([_features(np.random.RandomState(4), 40)], 40)
    det1, _ = forward(state, x, mask, None)
    det2, _ = forward(state, x, mask, None)
    np.testing.assert_array_equal(det1, det2)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    d1a, _ = forward(state, x, mask, k1)
    d1b, _ = forward(state, x, mask, k1)
    d2, _ = forward(state, x, mask, k2)
    np.testing.assert_array_equal(d1a, d1b)  # pure function of the key
    assert np.abs(np.asarray(d1a - det1)).max() > 1e-3
    assert np.abs(np.asarray(d1a - d2)).max() > 1e-3


def test_no_dropout_rates_make_rng_irrelevant():
    x, mask = _batch([_features(np.random.RandomState(5), 30)], 30)

    def jaxpr(rng, **kw):
        graphdef, state = nnx.split(_abstract(num_layers=1, **kw))
        return str(jax.make_jaxpr(lambda st: nnx.merge(graphdef, st)(x, mask, rng=rng)[0])(state))

    assert "random_bits" in jaxpr(jax.random.key(3))  # sanity: dropout is traced with a key
    assert "random_bits" not in jaxpr(None)
    assert "random_bits" not in jaxpr(jax.random.key(3), dropout=0.0, attention_dropout=0.0)


# ------------------------------------------------------------- params and sharding


def test_params_carry_logical_axes():
    model = _abstract()
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    flat_specs = dict(jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)))
    params = dict(jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)))
    assert flat_specs.keys() == params.keys() and len(params) > 30
    for path, spec in flat_specs.items():
        shape = params[path].shape
        key = jax.tree_util.keystr(path)
        assert isinstance(spec, PartitionSpec) and len(spec) == len(shape), key
        assert set(spec) - {None} <= set(LOGICAL_AXIS_NAMES), (key, spec)
        assert any(n is not None for n in spec) or len(shape) == 0, key
        if key.startswith("['blocks']"):
            assert spec[0] == "layers" and shape[0] == MICRO["num_layers"], (key, spec, shape)
        else:
            assert "layers" not in spec, key
    q = model.blocks.attn.q.kernel
    assert nnx.get_partition_spec(nnx.state(model))["blocks"]["attn"]["q"]["kernel"].get_value() == PartitionSpec(
        "layers", "embed", "heads", "kv"
    )
    assert q.shape == (2, 32, 4, 8)


def test_weight_paths_are_the_documented_ones():
    model = _abstract()
    assert set(compressible_layers(model)) == set(WEIGHT_PATHS)
    assert model.blocks.conv.dw.kernel.shape == (2, 4, 1, 32)
    assert model.blocks.conv.dw.feature_group_count == 32


def test_with_logical_constraint_is_noop_without_context():
    x = jnp.ones((2, 3, 4))
    assert with_logical_constraint(x, ("batch", "time", "embed")) is x
    with nnx.logical_axis_rules((("batch", ("data",)),)):  # rules but no mesh
        assert with_logical_constraint(x, ("batch", "time", "embed")) is x


def test_logical_constraints_applied_under_mesh_and_rules(micro):
    _, graphdef, state, _ = micro
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    rules = (("batch", ("data", "fsdp")), ("embed", ("fsdp",)), ("mlp", ("tensor",)), ("heads", ("tensor",)))
    x, mask = _batch([_features(np.random.RandomState(6), 30)], 30)
    fn = lambda st: nnx.merge(graphdef, st)(x, mask)[0]
    plain = str(jax.make_jaxpr(fn)(state))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        constrained = str(jax.make_jaxpr(fn)(state))
        assert with_logical_constraint(x, ("batch", "time", None)) is not x
    assert "sharding_constraint" not in plain
    assert constrained.count("sharding_constraint") >= 5


# ---------------------------------------------------------------------- scan


def _sub_jaxprs(params):
    for v in params.values():
        for item in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def _count_eqns(jaxpr) -> int:
    """Equations of a jaxpr including those of nested (scan, remat, pjit...) bodies."""
    return sum(1 + sum(_count_eqns(sub) for sub in _sub_jaxprs(e.params)) for e in jaxpr.eqns)


def test_layers_are_scanned_not_unrolled():
    x, mask = _batch([_features(np.random.RandomState(7), 30)], 30)

    def trace(**kw):
        graphdef, state = nnx.split(_abstract(**kw))
        return jax.make_jaxpr(lambda st: nnx.merge(graphdef, st)(x, mask, rng=jax.random.key(0)))(state)

    two, five = trace(num_layers=2), trace(num_layers=5)
    assert any(e.primitive.name == "scan" for e in two.jaxpr.eqns)
    scan = next(e for e in five.jaxpr.eqns if e.primitive.name == "scan")
    assert scan.params["length"] == 5
    # Program size is independent of depth.
    assert _count_eqns(two.jaxpr) == _count_eqns(five.jaxpr)
    remat = trace(num_layers=2, remat=True)
    assert "checkpoint" in str(remat) or "remat" in str(remat)


# --------------------------------------------------------------------- training


def _ctc_loss(graphdef, state, x, mask, labels, rng):
    logits, out_mask = nnx.merge(graphdef, state)(x, mask, rng=rng)
    lab_pad = jnp.zeros(labels.shape, jnp.float32)
    return optax.ctc_loss(logits, 1.0 - out_mask.astype(jnp.float32), labels, lab_pad).mean()


def test_gradient_steps_lower_ctc_loss_and_remat_is_exact():
    model = _model(remat=True)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    plain_graphdef = nnx.split(_abstract(remat=False), nnx.Param, ...)[0]
    rs = np.random.RandomState(8)
    x, mask = _batch([_features(rs, 60), _features(rs, 48)], 60)
    labels = jnp.asarray(rs.randint(1, VOCAB, (2, 5)))
    tx = optax.adam(3e-3)

    def loss_fn(p, gdef=graphdef):
        # rng=None: dropout is covered above, and its RNG would double the compile time.
        return _ctc_loss(gdef, nnx.merge_state(p, rest), x, mask, labels, None)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    # Rematerialization changes what is stored, not what is computed.
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, plain_graphdef)))(params)

    opt_state = tx.init(params)
    losses = []
    for i in range(12):
        new_params, opt_state, loss, grads = step(params, opt_state)
        losses.append(float(loss))
        if i == 0:
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
            # Same values up to the rounding of another summation order (a gradient is a
            # sum over frames and batch), relative to the largest gradient: some leaves
            # (the key bias, which softmax ignores) are rounding noise themselves.
            scale = max(float(np.abs(np.asarray(r)).max()) for r in jax.tree.leaves(ref_grads))
            for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
                g = np.asarray(g)
                assert np.isfinite(g).all() and np.abs(g).max() > 0, jax.tree_util.keystr(path)
                np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
        params = new_params
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2]), losses


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model16 = _model(dtype="bfloat16")
    model32 = _model()
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    x, mask = _batch([_features(np.random.RandomState(10), 30)], 30)
    y16 = nnx.jit(lambda m: m(x, mask)[0])(model16)
    y32 = nnx.jit(lambda m: m(x, mask)[0])(model32)
    assert y16.dtype == jnp.float32
    assert np.abs(np.asarray(y16 - y32)).max() < 0.1 * np.abs(np.asarray(y32)).max()


# ------------------------------------------------------------- relative positions


def test_rel_shift_hand_checked():
    # Column r holds distance T-1-r = 2, 1, 0, -1, -2; row i, column j must get x[i, 2-i+j].
    x = jnp.asarray(10 * np.arange(3)[:, None] + np.arange(5)[None, :])
    np.testing.assert_array_equal(rel_shift(x), [[2, 3, 4], [11, 12, 13], [20, 21, 22]])
    dist = jnp.broadcast_to(jnp.asarray(relative_positions(3)), (3, 5))
    np.testing.assert_array_equal(rel_shift(dist), [[0, -1, -2], [1, 0, -1], [2, 1, 0]])


def test_rel_shift_matches_gather_reference():
    t = 7
    x = np.random.RandomState(11).randn(2, 3, t, 2 * t - 1).astype(np.float32)
    i, j = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
    np.testing.assert_array_equal(rel_shift(jnp.asarray(x)), x[..., i, t - 1 - i + j])


def test_relative_positions_clipping():
    np.testing.assert_array_equal(relative_positions(4), [3, 2, 1, 0, -1, -2, -3])
    np.testing.assert_array_equal(relative_positions(4, max_rel_pos=2), [2, 2, 1, 0, -1, -2, -2])


# ------------------------------------------------------------ pieces and config


@pytest.mark.parametrize("k,padding", [(4, "SAME"), (5, "SAME"), (3, "VALID"), (3, [(2, 0)])])
def test_depthwise_conv_matches_grouped_convolution(k, padding):
    conv = Conv(6, 6, (k,), padding=padding, feature_group_count=6, path="dw", policy=None,
                kernel_axes=("conv_window", None, "mlp"), rngs=nnx.Rngs(0))
    conv.bias[...] = jnp.arange(6, dtype=jnp.float32)
    x = jnp.asarray(np.random.RandomState(12).randn(2, 9, 6), jnp.float32)
    ref = jax.lax.conv_general_dilated(
        x, conv.kernel[...], (1,), padding, dimension_numbers=("NHC", "HIO", "NHC"), feature_group_count=6
    ) + conv.bias[...]
    np.testing.assert_allclose(conv(x), ref, atol=1e-5, rtol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown"):
        ConformerConfig.from_config({**MICRO, "num_layer": 3})
    with pytest.raises(ValueError, match="divisible"):
        ConformerConfig.from_config({**MICRO, "num_heads": 5})
    with pytest.raises(ValueError, match="conv_norm"):
        ConformerConfig.from_config({**MICRO, "conv_norm": "batch_norm"})
    cfg = ConformerConfig.from_config({**MICRO, "conv_norm": "rms_norm", "max_rel_pos": 3})
    assert cfg.head_dim == 8 and conformer.DTYPES[cfg.dtype] == jnp.float32
    graphdef, state = nnx.split(_abstract(conv_norm="rms_norm", max_rel_pos=3))
    assert "bias" not in state["blocks"]["conv"]["conv_norm"]  # RMSNorm: scale only
    x = jax.ShapeDtypeStruct((1, 30, MICRO["num_mel_bins"]), jnp.float32)
    m = jax.ShapeDtypeStruct((1, 30), jnp.bool_)
    logits, _ = jax.eval_shape(lambda st, x, m: nnx.merge(graphdef, st)(x, m), state, x, m)
    assert logits.shape == (1, subsampled_length(30), VOCAB)


def test_train_step_pattern_with_masks_traces():
    """A train step merges params (grad tracers) with N:M masks (jit-level tracers)."""
    from usmqs.compress.layers import SparsityMask
    from usmqs.compress.policy import Policy

    model = nnx.eval_shape(lambda: ConformerCTC(MICRO, VOCAB, policy=Policy.named("int8+2:4"), rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert jax.tree.leaves(nnx.state(model, SparsityMask))  # masks really are in `rest`
    x = jax.ShapeDtypeStruct((1, 30, MICRO["num_mel_bins"]), jnp.float32)
    m = jax.ShapeDtypeStruct((1, 30), jnp.bool_)

    @jax.jit
    def step(params, rest, x, m):
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(x, m, rng=jax.random.key(0))[0])
        return jax.value_and_grad(loss)(params)

    loss, grads = jax.eval_shape(step, params, rest, x, m)
    assert loss.shape == () and jax.tree.structure(grads) == jax.tree.structure(params)


def test_stacked_kernels_are_compressed_before_the_scan_with_the_masked_gradient():
    """The blocks' effective kernels are computed for all layers ahead of the scan, on a
    copy: the live model keeps its master kernels, the forward equals a per-layer
    computation, and pruned master weights get zero gradient."""
    from usmqs.compress import layers as compress_layers
    from usmqs.compress import masks, ops
    from usmqs.compress.policy import Policy

    model = ConformerCTC({**MICRO, "dropout": 0.0, "attention_dropout": 0.0}, VOCAB,
                         policy=Policy.named("int4+2:4"), rngs=nnx.Rngs(0))
    masks.update_masks(model, 0)
    x = jax.random.normal(jax.random.key(1), (2, 30, MICRO["num_mel_bins"]))
    m = jnp.ones((2, 30), bool)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(x, m)[0] ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    ffn = model.blocks.ffn1.w_in
    assert not isinstance(ffn.kernel.get_value(), compress_layers.EncodedKernel)
    g = np.asarray(grads["blocks"]["ffn1"]["w_in"]["kernel"][...])
    mask = np.asarray(ffn.mask[...])
    assert g.shape == mask.shape and mask.shape[0] == MICRO["num_layers"]
    assert np.all(g[~mask] == 0) and np.any(g[mask] != 0)

    # Reference: each layer's kernel compressed on its own (the per-layer path).
    ref = nnx.merge(graphdef, params, rest)
    for _, node in nnx.iter_graph(ref.blocks):
        if isinstance(node, (compress_layers.Dense, compress_layers.Conv)) and node.spec is not None:
            per_layer = [
                ops.compressed_weight(
                    node.kernel[...][i], None if node.mask is None else node.mask[...][i], node.spec,
                    contract_axes=node.contract_axes)
                for i in range(MICRO["num_layers"])
            ]
            node.kernel.set_value(compress_layers.ComputedKernel(jnp.stack(per_layer)))
    np.testing.assert_allclose(float(value), float(jnp.sum(ref(x, m)[0] ** 2)), rtol=1e-5)
