"""Runtime-valued settings: one compiled program for every named setting, same numbers.

`Policy.named(name, runtime=True)` gives every layer a `CompressionSetting` [bits, N]
read by the compiled step; these tests pin it to the static setting bit for bit and show
that the programs of different settings are the same program.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT
from usmqs import config as config_lib
from usmqs import run, train
from usmqs.compress import layers, masks, ops
from usmqs.compress.policy import NAMED_POLICIES, Policy, Rule, WeightSpec, policy_from_config
from usmqs.models.conformer import ConformerCTC

SETTINGS = tuple(NAMED_POLICIES)
VOCAB = 12


def _model_cfg():
    return config_lib.load_config(f"{ROOT / 'configs/tiny.py'}:micro").model


def _model(name: str, runtime: bool):
    """The micro Conformer under setting `name` (static or runtime-valued), masks computed."""
    model = ConformerCTC(_model_cfg(), VOCAB, policy=Policy.named(name, runtime=runtime), rngs=nnx.Rngs(params=0))
    masks.update_masks(model, 0, force=True)
    return model


def _logits(name: str, runtime: bool, x, mask):
    model = _model(name, runtime)
    logits, _ = model(x, mask)
    return np.asarray(logits), model


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 64, 80)), jnp.float32)
    mask = jnp.asarray(np.arange(64)[None, :] < np.array([[64], [40]]))
    return x, mask


def _kernels(model) -> dict:
    """Every layer's effective (served) kernel, by (module path, scanned layer index)."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, layers._Compressible):
            continue
        kernel = node.kernel[...]
        lead = kernel.shape[: kernel.ndim - len(node.kernel_shape)]
        for i in np.ndindex(*lead):
            mask = None if node.mask is None else node.mask[...][i]
            setting = None if node.setting is None else node.setting[...][i]
            out[path, i] = np.asarray(ops.compressed_weight(
                kernel[i], mask, node.spec, contract_axes=node.contract_axes, setting=setting
            ))
    return out


@pytest.mark.parametrize("name", SETTINGS)
def test_runtime_setting_gives_the_static_settings_weights_bit_for_bit(name):
    # (Their logits, from another XLA program whose matmuls may round differently, agree
    # to float rounding: the switching test below.)
    model = _model(name, True)
    want, got = _kernels(_model(name, False)), _kernels(model)
    assert want.keys() == got.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
    # Every Dense/Conv carries the setting, float included.
    n_layers = len(layers.compressible_layers(model))
    assert n_layers > 0
    assert layers.set_runtime_setting(model, Policy.named(name)) == n_layers


def test_switching_the_setting_of_a_live_model_switches_its_numbers(batch):
    """One runtime model, settings written into it: each equals its static model."""
    x, mask = batch
    model = ConformerCTC(_model_cfg(), VOCAB, policy=Policy.named("float", runtime=True), rngs=nnx.Rngs(params=0))

    traces = []

    @nnx.jit
    def forward(model, x, mask):
        traces.append(1)
        masks.update_masks(model, 0, force=True)
        return model(x, mask)[0]

    outs = {}
    for name in ("int4+2:4", "int8", "1:4", "float"):
        layers.set_runtime_setting(model, Policy.named(name))
        outs[name] = np.asarray(forward(model, x, mask))
        np.testing.assert_allclose(outs[name], _logits(name, False, x, mask)[0], rtol=1e-5, atol=1e-5)
    assert not np.array_equal(outs["int4+2:4"], outs["float"])
    # nnx.jit traced the forward once for all four settings.
    assert len(traces) == 1


def test_runtime_gradient_is_the_masked_straight_through_gradient():
    w = jax.random.normal(jax.random.key(1), (16, 8))
    spec = Policy.named("int4+2:4", runtime=True).resolve("x")
    mask = ops.nm_mask(w, 2, 4, 0)
    setting = jnp.asarray([4, 2], jnp.int32)
    g = jax.random.normal(jax.random.key(2), (16, 8))
    f = lambda w: jnp.sum(g * ops.compressed_weight(w, mask, spec, contract_axes=(0,), setting=setting))
    np.testing.assert_array_equal(jax.grad(f)(w), jnp.where(mask, g, 0))
    static = ops.compressed_weight(w, mask, spec.static(), contract_axes=(0,))
    np.testing.assert_array_equal(
        ops.compressed_weight(w, mask, spec, contract_axes=(0,), setting=setting), static
    )


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_runtime_fake_quant_equals_static_fake_quant(bits):
    w = jax.random.normal(jax.random.key(bits), (3, 48, 20)) * 0.1
    spec = WeightSpec(weight_bits=bits)
    np.testing.assert_array_equal(
        jax.jit(lambda w, b: ops.runtime_fake_quant(w, b, spec, contract_axes=(0, 1)))(w, bits),
        ops.fake_quant(w, spec, contract_axes=(0, 1)),
    )


def test_runtime_rules_are_validated():
    with pytest.raises(ValueError, match="M != 4"):
        Rule(".*", WeightSpec(nm=(2, 8), runtime=True))
    with pytest.raises(ValueError, match="weight_bits 16"):
        Rule(".*", WeightSpec(weight_bits=16, runtime=True))
    model = ConformerCTC(_model_cfg(), VOCAB, policy=Policy.named("int8", runtime=True), rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match="runtime weight bits"):
        layers.set_runtime_setting(model, Policy(rules=(Rule(".*", WeightSpec(weight_bits=16)),)))
    with pytest.raises(ValueError, match="N:4"):
        layers.set_runtime_setting(model, Policy(rules=(Rule(".*", WeightSpec(weight_bits=4, nm=(2, 8))),)))


def test_train_steps_of_different_settings_lower_to_the_same_program():
    """The study's claim: QAT of any setting (and the float control) is one compile."""
    texts = {}
    for name in ("float", "int8", "int4+2:4", "1:4"):
        cfg = config_lib.load_config(f"{ROOT / 'configs/tiny.py'}:micro")
        config_lib.apply_overrides(cfg, [f"policy.name={name}", "policy.runtime=True"])
        setup = run.build(cfg, VOCAB)
        step, _ = train.make_train_step(setup, cfg)
        batch = {
            "features": jax.ShapeDtypeStruct((2, 64, 80), jnp.float32),
            "feature_mask": jax.ShapeDtypeStruct((2, 64), jnp.bool_),
            "labels": jax.ShapeDtypeStruct((2, 6), jnp.int32),
            "label_mask": jax.ShapeDtypeStruct((2, 6), jnp.bool_),
        }
        texts[name] = step.lower(setup.abstract_state, batch).as_text()
    assert len(set(texts.values())) == 1
    # ... and a static setting is a different program.
    cfg.policy.runtime = False
    setup = run.build(cfg, VOCAB)
    assert train.make_train_step(setup, cfg)[0].lower(setup.abstract_state, batch).as_text() != texts["1:4"]


def test_runtime_settings_recompute_masks_every_k_steps_with_srste():
    """The study's sparse fine-tuning recipe: runtime N, masks re-ranked every k steps
    from the dense master weights (SR-STE keeps the pruned ones learning)."""
    from usmqs.compress.policy import Every, Gradual, PruneGrad

    policy = Policy.named("int4+2:4", runtime=True, mask_schedule=Every(every=3), prune_grad=PruneGrad.SRSTE)
    spec = policy.resolve("blocks/ffn1/w_in")
    assert spec.mask_schedule == Every(every=3) and spec.prune_grad is PruneGrad.SRSTE
    # The N:M-exempt layers keep the default rule; Gradual needs a static N.
    assert policy.resolve("blocks/conv/dw").mask_schedule != Every(every=3)
    with pytest.raises(ValueError, match="OneShot or Every"):
        Policy.named("int4+2:4", runtime=True, mask_schedule=Gradual(begin=0, end=10))

    w = jax.random.normal(jax.random.key(3), (2, 16, 8))  # two scanned layers
    old = jnp.stack([ops.nm_mask(-jnp.abs(w[i]), 2, 4, 0) for i in range(2)])  # stale masks
    keep_n = jnp.asarray([2, 4], jnp.int32)  # layer 0 at 2:4, layer 1 dense (N = M)
    update = lambda step: ops.mask_update(w, old, spec, step, contract_axes=(0,), layer_axes=1, keep_n=keep_n)
    np.testing.assert_array_equal(update(1), old)  # off schedule: unchanged
    new = update(3)
    np.testing.assert_array_equal(new[0], ops.nm_mask(w[0], 2, 4, 0))  # re-ranked by |W|
    assert bool(new[1].all())  # N = M keeps every weight


def test_config_sets_the_named_policys_pruning_and_rejects_bad_values():
    from usmqs.compress.policy import Every, PruneGrad

    cfg = config_lib.base_config("tiny")
    config_lib.apply_overrides(cfg, ["policy.name=2:4", "policy.mask_every=50", "policy.prune_grad=srste"])
    spec = policy_from_config(cfg.policy).resolve("blocks/attn/q")
    assert spec.mask_schedule == Every(every=50) and spec.prune_grad is PruneGrad.SRSTE
    cfg.policy.mask_every = 5
    cfg.policy.rules = ({"module_path": ".*", "nm": "2:4"},)
    with pytest.raises(ValueError, match="policy.mask_every applies to named policies"):
        policy_from_config(cfg.policy)
