"""Mixed-precision allocation: the solver is exact (against brute force), group sizes are
the export's bytes to the byte, and an allocated policy exports at the predicted size."""

from __future__ import annotations

import importlib.util
import itertools
import json
import random

import pytest
from flax import nnx

from conftest import EXPORT_VOCAB, MICRO_MODEL, ROOT
from usmqs.compress import allocate, export_format, masks
from usmqs.compress.layers import Conv, Dense
from usmqs.compress.allocate import BudgetError, Candidate, Group
from usmqs.compress.policy import NAMED_POLICIES, Policy, setting_name
from usmqs.models import presets
from usmqs.models.conformer import WEIGHT_PATHS, ConformerCTC


def _brute_force(costs, losses, max_cost):
    """(loss, cost) of the best feasible choice, losses summed in item order; None if none fits."""
    best = None
    for picks in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(c[j] for c, j in zip(costs, picks))
        loss = sum(l[j] for l, j in zip(losses, picks))
        if cost <= max_cost and (best is None or (loss, cost) < best):
            best = (loss, cost)
    return best


def _random_instance(rng: random.Random):
    items = rng.randint(1, 5)
    options = [rng.randint(1, 4) for _ in range(items)]
    costs = [[rng.randint(0, 12) for _ in range(k)] for k in options]
    # Few distinct values: many ties; negative ones too.
    pool = [rng.choice([-1.5, 0.0, 0.25, 1.0, 2.0, 3.75]) + rng.choice([0.0, 0.1, 1e-9]) for _ in range(6)]
    losses = [[rng.choice(pool) for _ in range(k)] for k in options]
    return costs, losses


def test_solver_equals_brute_force_on_random_instances():
    rng = random.Random(0)
    solved = infeasible = 0
    for _ in range(400):
        costs, losses = _random_instance(rng)
        budget = rng.randint(sum(min(c) for c in costs) - 2, sum(max(c) for c in costs) + 1)
        want = _brute_force(costs, losses, budget)
        if want is None:
            with pytest.raises(BudgetError) as err:
                allocate.solve(costs, losses, budget)
            assert err.value.min_cost == sum(min(c) for c in costs) > budget
            infeasible += 1
            continue
        picks = allocate.solve(costs, losses, budget)
        cost = sum(c[j] for c, j in zip(costs, picks))
        loss = sum(l[j] for l, j in zip(losses, picks))
        assert cost <= budget
        assert (loss, cost) == want  # the least loss, and the cheapest of the least
        solved += 1
    assert solved > 300 and infeasible > 10


@pytest.fixture(scope="module")
def micro_sizes():
    cfg = presets.get_preset("tiny")
    cfg.update(MICRO_MODEL)
    abstract = nnx.eval_shape(lambda: ConformerCTC(cfg, EXPORT_VOCAB, policy=None, rngs=nnx.Rngs(params=0)))
    return cfg, allocate.size_table(allocate.kernels(abstract))


def _sensitivity(sizes, seed: int = 0) -> dict:
    """Made-up costs: fewer stored bits cost more, with noise, 0 for float."""
    rng = random.Random(seed)
    return {
        g: {c.name: 0.0 if c.keeps_float else rng.uniform(0.5, 1.5) / sizes.cost(g, c.name) for c in sizes.candidates}
        for g in sizes.members
    }


def test_default_groups_cover_every_layer_once(micro_sizes):
    _, sizes = micro_sizes
    members = sizes.members
    assert sorted(p for paths in members.values() for p in paths) == sorted(WEIGHT_PATHS)
    assert set(members["blocks/attn"]) == {f"blocks/attn/{w}" for w in ("q", "k", "v", "pos", "out")}
    assert set(members["blocks/conv"]) == {"blocks/conv/pw1", "blocks/conv/dw", "blocks/conv/pw2"}
    # Candidate names are the DESIGN.md names where a named policy exists.
    assert {c.name for c in allocate.DEFAULT_CANDIDATES} - set(NAMED_POLICIES) == {
        "int2+1:4", "int2a", "int2a+2:4", "int2a+1:4"
    }
    assert all(setting_name(*v) == k for k, v in NAMED_POLICIES.items())


def test_asymmetric_candidates_pay_for_their_zero_points(micro_sizes):
    """int2a stores the values and indices int2 stores, plus one zero point per scale."""
    _, sizes = micro_sizes
    for group in sizes.members:
        for nm in ("", "+2:4", "+1:4"):
            sym, asym = sizes.buckets[group][f"int2{nm}"], sizes.buckets[group][f"int2a{nm}"]
            assert "zero_points" not in sym and asym["zero_points"] > 0, (group, nm)
            assert {k: v for k, v in asym.items() if k != "zero_points"} == sym, (group, nm)
    spec = Candidate(2, (2, 4), symmetric=False).spec("blocks/ffn1/w_in")
    assert (spec.weight_bits, spec.nm, spec.symmetric) == (2, (2, 4), False)
    assert not Candidate(2, None, symmetric=False).spec("blocks/conv/dw").symmetric


def test_groups_that_miss_a_layer_or_match_none_are_errors():
    paths = ["a/x", "a/y", "b/z"]
    with pytest.raises(ValueError, match=r"layers in no group: \['b/z'\]"):
        allocate.group_members(paths, [Group("a", "a/.*")])
    with pytest.raises(ValueError, match=r"groups that match no layer: \['c'\]"):
        allocate.group_members(paths, [Group("a", "a/.*"), Group("b", "b/.*"), Group("c", "c/.*")])
    # A layer belongs to the first group that matches it.
    assert allocate.group_members(paths, [Group("x", "a/x"), Group("rest", ".*")]) == {
        "x": ("a/x",), "rest": ("a/y", "b/z")
    }


def _head_float_sensitivity(sizes) -> dict:
    """`_sensitivity`, but float is free for the CTC head only and prohibitive elsewhere."""
    out = _sensitivity(sizes)
    for g in out:
        out[g]["float"] = 0.0 if g == "ctc/head" else 1e9
    return out


def test_allocated_policy_exports_at_the_predicted_bits_per_weight(micro_sizes, tmp_path):
    """The export of an allocated policy stores every kernel in exactly the bytes the size
    table predicts from shapes, so its size report's bits per weight is the allocator's."""
    cfg, sizes = micro_sizes
    alloc = allocate.allocate(sizes, _head_float_sensitivity(sizes), bits_per_weight=4)
    assert alloc.bits_per_weight <= 4
    assert alloc.assignment["ctc/head"].keeps_float
    assert len({c.name for c in alloc.assignment.values()}) > 2  # a mixture, not one setting
    policy = Policy.from_config(alloc.rules)
    model = ConformerCTC(cfg, EXPORT_VOCAB, policy=policy, rngs=nnx.Rngs(params=0))
    masks.update_masks(model, 0, force=True)
    (tmp_path / "tokenizer.model").write_bytes(b"tokenizer")
    report = export_format.write_export(
        model, tmp_path / "export", model_config=cfg, vocab_size=EXPORT_VOCAB, policy=policy,
        tokenizer_file=tmp_path / "tokenizer.model",
    )
    assert report["compressed_layers_bits_per_weight"] == alloc.export_bits_per_weight
    tensors = json.loads((tmp_path / "export" / "metadata.json").read_text())["tensors"]
    names = {m.path: "/".join(map(str, p)) + "/kernel" for p, m in nnx.iter_modules(model) if isinstance(m, Dense | Conv)}
    total = 0
    for group, paths in sizes.members.items():
        for path in paths:
            rec = tensors[names[path]]
            stored = export_format.tensor_bytes(rec["kind"], {k: a["nbytes"] for k, a in rec["arrays"].items()})
            assert stored == allocate.layer_bytes(sizes.kernels[path], alloc.assignment[group].spec(path)), path
            total += sum(stored.values())
    assert total == alloc.to_data()["bytes"]
    assert alloc.bits_per_weight == 8 * total / sizes.num_weights()
    assert report["bytes"]["float_layers"] > total - report["compressed_layers_bytes"] > 0  # the head


def test_a_budget_below_the_smallest_setting_names_the_smallest_bits_per_weight(micro_sizes):
    _, sizes = micro_sizes
    smallest = sum(min(sizes.cost(g, c.name) for c in sizes.candidates) for g in sizes.members)
    floor_bpw = 8 * smallest / sizes.num_weights()
    with pytest.raises(BudgetError, match=f"{floor_bpw:.4f} bits/weight"):
        allocate.allocate(sizes, _sensitivity(sizes), bits_per_weight=1.0)
    at_floor = allocate.allocate(sizes, _sensitivity(sizes), max_bytes=smallest)
    assert at_floor.bits_per_weight == floor_bpw
    assert {c.name for c in at_floor.assignment.values()} == {"int2+1:4"}
    # A generous budget keeps everything float (float costs nothing here).
    roomy = allocate.allocate(sizes, _sensitivity(sizes), bits_per_weight=32)
    assert all(c.keeps_float for c in roomy.assignment.values()) and roomy.rules == []


def test_narrower_scales_recost_only_the_scales_and_never_allocate_worse(micro_sizes):
    """bench/scale_bits.py: scales re-costed at 16 bits are half the stored float32 bytes,
    every other bucket as stored; the exact solver then has more room, so its least
    predicted damage at a budget can only fall."""
    spec = importlib.util.spec_from_file_location("scale_bits", ROOT / "bench/scale_bits.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    _, sizes = micro_sizes
    assert bench.with_scale_bits(sizes, 32) == sizes
    half = bench.with_scale_bits(sizes, 16)
    for g, cands in sizes.buckets.items():
        for c, stored in cands.items():
            assert half.buckets[g][c] == {b: n // 2 if b == "scales" else n for b, n in stored.items()}
            assert stored.get("scales", 0) % 4 == 0
    assert any(b.get("scales") for cands in sizes.buckets.values() for b in cands.values())
    sens = _sensitivity(sizes)
    for budget in (4.0, 3.0, 2.0):  # the micro model's narrow layers: 1.84 at the least
        wide = allocate.allocate(sizes, sens, bits_per_weight=budget)
        narrow = allocate.allocate(half, sens, bits_per_weight=budget)
        assert narrow.bits_per_weight <= budget and narrow.predicted_sensitivity <= wide.predicted_sensitivity
