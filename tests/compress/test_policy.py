"""Policy rules: first match wins, config parsing, unused-rule errors, the report table."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from usmqs.compress.policy import (
    NAMED_POLICIES,
    Every,
    Gradual,
    Granularity,
    OneShot,
    Policy,
    PruneGrad,
    Rule,
    WeightSpec,
)

PATHS = [
    "subsample/conv1", "subsample/conv2", "subsample/proj",
    "blocks/ffn1/w_in", "blocks/ffn1/w_out", "blocks/attn/q", "blocks/attn/out",
    "blocks/conv/pw1", "blocks/conv/dw", "ctc/head",
]


def test_first_matching_rule_wins():
    policy = Policy(rules=(
        Rule("blocks/attn/.*", WeightSpec(weight_bits=8)),
        Rule("blocks/.*", WeightSpec(weight_bits=4, nm=(2, 4))),
        Rule(".*", WeightSpec(weight_bits=2)),
    ))
    assert policy.resolve("blocks/attn/q") == WeightSpec(weight_bits=8)
    assert policy.resolve("blocks/ffn1/w_in") == WeightSpec(weight_bits=4, nm=(2, 4))
    assert policy.resolve("ctc/head") == WeightSpec(weight_bits=2)
    assert policy.match_index("blocks/attn/out") == 0


def test_module_path_is_fullmatch():
    policy = Policy(rules=(Rule("attn", WeightSpec(weight_bits=8)),))
    assert policy.resolve("blocks/attn/q") is None
    assert Policy(rules=(Rule(".*attn.*", WeightSpec(weight_bits=8)),)).resolve("blocks/attn/q") is not None


def test_keep_float_rule_exempts_layers_from_a_later_catch_all():
    policy = Policy(rules=(Rule("ctc/.*|subsample/conv1"), Rule(".*", WeightSpec(weight_bits=4))))
    assert policy.resolve("ctc/head") is None
    assert policy.resolve("subsample/conv1") is None
    assert policy.resolve("subsample/conv2").weight_bits == 4


@pytest.mark.parametrize("name", list(NAMED_POLICIES))
def test_named_policies(name):
    policy = Policy.named(name)
    spec = policy.resolve("blocks/ffn1/w_in")
    bits, nm = NAMED_POLICIES[name]
    if name == "float":
        assert spec is None and policy.rules == ()
        return
    # Whole model quantized; N:M everywhere but the depthwise and the first conv.
    dense = {"subsample/conv1", "blocks/conv/dw"}
    for p in PATHS:
        want = spec
        if p in dense:  # dense at the setting's bits; float for plain N:M
            want = None if bits is None else dataclasses.replace(spec, nm=None)
        assert policy.resolve(p) == want, p
    assert spec.weight_bits == bits and spec.nm == nm
    assert spec.granularity is Granularity.PER_CHANNEL and spec.symmetric and not spec.clip_search
    assert spec.mask_schedule == OneShot(at_step=0) and spec.prune_grad is PruneGrad.MASKED
    policy.check_all_rules_matched(PATHS)


def test_named_unknown():
    with pytest.raises(ValueError, match="unknown policy name 'int3'"):
        Policy.named("int3")


def test_bits_per_weight():
    assert Policy.named("int4+2:4").resolve("x").bits_per_weight == 3.0  # USM-Lite headline
    assert Policy.named("int8").resolve("x").bits_per_weight == 8.0
    assert Policy.named("2:4").resolve("x").bits_per_weight == 17.0  # 2 fp32 + 2x2 index bits per 4
    assert Policy.named("int4+1:4").resolve("x").bits_per_weight == 1.5


def test_from_config():
    policy = Policy.from_config([
        {"module_path": "ctc/.*"},
        {"module_path": "blocks/attn/.*", "weight_bits": 8, "granularity": "sub_channel", "block_size": 64,
         "symmetric": False, "clip_search": True},
        {"module_path": ".*", "weight_bits": 4, "nm": "2:4", "prune_grad": "srste", "srste_lambda": 1e-3,
         "mask_schedule": {"kind": "gradual", "begin": 10, "end": 100, "every": 5}},
    ])
    assert policy.resolve("ctc/head") is None
    assert policy.resolve("blocks/attn/q") == WeightSpec(
        weight_bits=8, granularity=Granularity.SUB_CHANNEL, block_size=64, symmetric=False, clip_search=True)
    spec = policy.resolve("blocks/ffn1/w_in")
    assert spec.nm == (2, 4) and spec.prune_grad is PruneGrad.SRSTE and spec.srste_lambda == 1e-3
    assert spec.mask_schedule == Gradual(begin=10, end=100, every=5)
    every = Policy.from_config([{"nm": [1, 4], "mask_schedule": {"kind": "every", "every": 3}}]).resolve("x")
    assert every.nm == (1, 4) and every.mask_schedule == Every(every=3)


def test_from_config_takes_ml_collections_config_dicts():
    rule = ml_collections.ConfigDict(
        {"nm": "2:4", "prune_grad": "ste", "mask_schedule": ml_collections.ConfigDict({"kind": "every", "every": 2})})
    spec = Policy.from_config([rule]).resolve("x")
    assert spec.nm == (2, 4) and spec.mask_schedule == Every(every=2) and spec.prune_grad is PruneGrad.STE


@pytest.mark.parametrize("rules, message", [
    ([{"module_path": ".*", "weight_bit": 4}], r"policy rule #0: unknown key\(s\) \['weight_bit'\]"),
    ([{}, {"nm": "2:4", "mask_schedule": {"kind": "gradual", "begin": 0, "end": 9, "step": 1}}],
     r"policy rule #1: unknown key\(s\) \['step'\] for mask_schedule 'gradual'"),
    ([{"nm": "2:4", "mask_schedule": {"kind": "cubic"}}], "unknown mask_schedule kind 'cubic'"),
    ([{"weight_bits": 4, "granularity": "per_tensor"}], "'per_tensor' is not one of"),
    ([{"nm": "2-4"}], "nm must look like '2:4'"),
    ([{"weight_bits": 3}], r"policy rule #0: weight_bits must be None or one of \(2, 4, 8, 16\)"),
    ([{"nm": "3:2"}], "N <= M"),
    ([{"weight_bits": 4, "granularity": "sub_channel"}], "block_size must be an int >= 1"),
    ([{"weight_bits": 4, "block_size": 32}], "only meaningful with Granularity.SUB_CHANNEL"),
    ([{"module_path": "(", "weight_bits": 4}], "not a valid regex"),
    ([{"nm": "2:4", "learned_scale": True}], "learned_scale needs integer weight_bits"),
    ([{"weight_bits": 4, "learned_scale": True, "runtime": True}], "learned_scale: a learned range belongs to one bit width"),
])
def test_from_config_errors(rules, message):
    with pytest.raises(ValueError, match=message):
        Policy.from_config(rules)


def test_schedule_validation():
    with pytest.raises(ValueError, match="end > begin"):
        Gradual(begin=5, end=5)
    with pytest.raises(ValueError, match="Every.every"):
        Every(every=0)


def test_unmatched_rule_is_an_error_naming_the_rule():
    policy = Policy(rules=(Rule("blocks/.*", WeightSpec(weight_bits=4)), Rule("decoder/.*", WeightSpec(weight_bits=8))))
    with pytest.raises(ValueError, match=r"rule #1 \(module_path='decoder/\.\*'\) matches no layer"):
        policy.check_all_rules_matched(PATHS)


def test_shadowed_rule_is_an_error_naming_the_shadowing_rule():
    policy = Policy(rules=(Rule(".*", WeightSpec(weight_bits=4)), Rule("ctc/head", WeightSpec(weight_bits=8))))
    with pytest.raises(ValueError, match=r"rule #1 .* taken by an earlier rule, e\.g\. #0"):
        policy.check_all_rules_matched(PATHS)
    Policy(rules=policy.rules[::-1]).check_all_rules_matched(PATHS)


def test_report_table():
    policy = Policy(rules=(
        Rule("ctc/.*"),
        Rule("blocks/.*", WeightSpec(weight_bits=4, nm=(2, 4))),
        Rule("subsample/conv1", WeightSpec(weight_bits=2, symmetric=False, learned_scale=True)),
        Rule("subsample/conv2", WeightSpec(weight_bits=4, clip_search=True, granularity=Granularity.SUB_CHANNEL, block_size=64)),
        Rule("subsample/.*", WeightSpec(weight_bits=8)),
    ))
    resolved = {p: (policy.resolve(p), 1000) for p in PATHS}
    resolved["extra/unmatched"] = (None, 10)
    table = policy.report(resolved)
    lines = table.splitlines()
    row = lambda i: next(line.split() for line in lines if line.split()[:2] == [str(i), policy.rules[i].module_path])
    assert row(0)[2:] == ["float", "-", "-", "-", "1", "1,000", "32.00"]
    assert row(1)[2:] == ["int4", "2:4", "channel", "absmax", "6", "6,000", "3.00"]
    assert row(2)[2:] == ["int2a", "-", "channel", "learned", "1", "1,000", "2.00"]
    assert row(3)[2:] == ["int4", "-", "block64", "clip", "1", "1,000", "4.00"]
    assert row(4)[2:] == ["int8", "-", "channel", "absmax", "1", "1,000", "8.00"]
    no_rule = next(line for line in lines if "(no rule)" in line).split()
    assert no_rule[-3:] == ["1", "10", "32.00"]
    total = next(line for line in lines if line.split()[0] == "total").split()
    assert total[1:] == ["11", "10,010", f"{(1000 * 32 + 6000 * 3 + 1000 * (2 + 4 + 8) + 10 * 32) / 10010:.2f}"]
    assert lines[-1] == "float layers (2): ctc/head, extra/unmatched"


def test_weight_spec_is_a_static_jit_argument():
    spec = Policy.named("int4+2:4").resolve("x")
    assert hash(spec) == hash(Policy.named("int4+2:4").resolve("y"))
    f = jax.jit(lambda x, spec: x * spec.weight_bits, static_argnums=1)
    assert f(jnp.float32(1), spec) == 4
