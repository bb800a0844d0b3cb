"""The PTQ sensitivity probe on a briefly trained micro run, and the mixed policy it
allocates: ranked as expected, cached, and usable as an ordinary config policy."""

from __future__ import annotations

import copy
import json
import math
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from usmqs import config as config_lib
from usmqs import run, sensitivity, train
from usmqs.compress import allocate, export_format, ops
from usmqs.compress import masks as masks_lib
from usmqs.compress.layers import Conv, Dense
from usmqs.models.conformer import WEIGHT_PATHS

STEPS = 30  # the loss has fallen from 4.5 to 2.9: int2 then costs loss in every group


@pytest.fixture(scope="module")
def trained(small_corpus, tmp_path_factory):
    """(config, workdir) of a micro run trained STEPS steps, with a dev split."""
    workdir = tmp_path_factory.mktemp("baseline")
    cfg = tiny_config(small_corpus, steps=STEPS)
    config_lib.apply_overrides(cfg, [f"data.dev_manifest={small_corpus['dev']}", "eval.at_end=False"])
    train.train_and_evaluate(cfg, workdir)
    return cfg, workdir


def test_probe_ranks_int2_worse_than_int8_in_every_group_and_is_cached(trained, capsys):
    cfg, workdir = trained
    table = sensitivity.sensitivity_table(cfg, workdir, num_batches=2)
    assert table["key"]["step"] == STEPS and table["key"]["data"]["num_batches"] == 2
    assert math.isfinite(table["base_loss"])
    for group, row in table["increase"].items():
        assert all(math.isfinite(v) and v >= 0 for v in row.values()), group
        assert all(math.isfinite(v) for v in table["loss"][group].values()), group
        assert row["float"] == 0.0
        assert row["int2"] > row["int8"], (group, row)
        assert row["int2+1:4"] > row["int8"], (group, row)
        assert row["int2a"] > row["int8"], (group, row)
    capsys.readouterr()
    again = sensitivity.sensitivity_table(cfg, workdir, num_batches=2)
    assert "reusing" in capsys.readouterr().out
    assert again == table
    assert json.loads(open(table["path"]).read())["increase"] == table["increase"]


def test_allocated_policy_is_an_ordinary_config_policy(trained):
    cfg, workdir = trained
    alloc = sensitivity.allocate_run(cfg, workdir, bits_per_weight=4, num_batches=2)
    saved = json.loads((workdir / sensitivity.MIXED_DIR / "mixed@4.json").read_text())
    assert saved["rules"] == alloc.rules and saved["bits_per_weight"] == alloc.bits_per_weight <= 4
    assert saved["sensitivity_table"].startswith(str(workdir / sensitivity.MIXED_DIR))
    # Through the command line's --config.policy.rules=..., validated, built.
    run_cfg = tiny_config({"train": cfg.data.train_manifest, "test": cfg.data.eval_manifest})
    config_lib.apply_overrides(run_cfg, alloc.overrides())
    config_lib.validate(run_cfg)
    setup = run.build(run_cfg, run.load_tokenizer(workdir).vocab_size)
    assert setup.policy == alloc.policy
    print(run.describe_policy(run_cfg, setup))  # every rule decides some layer


@pytest.mark.parametrize("group, candidate", [
    ("blocks/conv", allocate.Candidate(4, (2, 4))),
    ("blocks/ffn1", allocate.Candidate(2, (2, 4), symmetric=False)),  # the asymmetric program
])
def test_probe_loss_is_the_static_policys_ptq_loss(trained, group, candidate):
    """A probe (runtime settings, one program per integer grid) gives the loss of the same
    compression as an ordinary static policy: masks one-shot from the weights, then fake
    quantization."""
    cfg, workdir = trained
    table = sensitivity.sensitivity_table(cfg, workdir, num_batches=2)
    members = allocate.group_members(WEIGHT_PATHS, allocate.DEFAULT_GROUPS)
    policy = allocate.assignment_policy({group: candidate}, members)
    static = copy.deepcopy(cfg)
    static.policy.rules = tuple(export_format.policy_to_data(policy, skip_defaults=True))
    setup = run.build(static, run.load_tokenizer(workdir).vocab_size)
    specs = {path: setup.policy.resolve(path) for path in members[group]}
    assert {s.symmetric for s in specs.values()} == {candidate.symmetric}
    assert {s.nm for p, s in specs.items() if p != "blocks/conv/dw"} == {candidate.nm}
    params = run.load_params(setup, str(workdir))
    step = sensitivity.make_probe_step(setup, static)
    rest = sensitivity.fresh_rest(setup, static)
    sums = [step(params, rest, b) for b in sensitivity.probe_batches(cfg, workdir, 2)]
    loss = float(sum(s for s, _ in sums) / sum(n for _, n in sums))
    assert loss == pytest.approx(table["loss"][group][candidate.name], rel=1e-5)
    assert loss > table["base_loss"]



def test_fisher_table_weighs_each_layers_compression_error_by_the_empirical_fisher(trained):
    """The Fisher estimate of a group is ½ Σ F (W − W_eff)², W_eff the static policy's
    effective kernel, F the mean of the utterances' squared gradients (vmapped, equal to
    one utterance at a time; padding rows add nothing); it falls with more bits."""
    cfg, workdir = trained
    table = sensitivity.sensitivity_table(cfg, workdir, num_batches=2, method="fisher")
    assert table["key"]["method"] == "fisher" and pathlib.Path(table["path"]).name.startswith("fisher-")
    for group, row in table["increase"].items():
        assert row["float"] == 0.0 and all(math.isfinite(v) for v in row.values()), group
        assert row["int2"] > row["int4"] > row["int8"] > 0, (group, row)
        assert row["int2+1:4"] > row["int2+2:4"] > row["int2"], (group, row)

    pcfg = sensitivity.probe_config(cfg)
    setup = run.build(pcfg, run.load_tokenizer(workdir).vocab_size)
    params = run.load_params(setup, str(workdir))
    rest = sensitivity.fresh_rest(setup, pcfg)
    step = sensitivity.make_fisher_step(setup, pcfg)
    batches = sensitivity.probe_batches(cfg, workdir, 2)
    # Per utterance, against one utterance at a time; the last row made padding.
    padded = {k: np.array(v) for k, v in batches[0].items()}
    padded["label_mask"][-1] = False
    got, count = step(params, rest, padded)
    assert int(count) == len(padded["labels"]) - 1

    @jax.jit
    def grad_of_row(p, row):
        def loss(p):
            logits, out_mask = nnx.merge(setup.graphdef, p, rest)(row["features"], row["feature_mask"], rng=None)
            return train.ctc_loss(logits, out_mask, row["labels"], row["label_mask"])[0]
        return jax.grad(loss)(p)

    want = jax.tree.map(np.zeros_like, params)
    for i in range(count):
        g = grad_of_row(params, {k: v[i:i + 1] for k, v in padded.items() if k in sensitivity.BATCH_KEYS})
        want = jax.tree.map(lambda a, b: a + b * b, want, g)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-10)

    # One group by hand.
    sums = [step(params, rest, b) for b in batches]
    fisher = jax.tree.map(lambda *xs: sum(xs) / sum(float(n) for _, n in sums), *[f for f, _ in sums])
    members = allocate.group_members(WEIGHT_PATHS, allocate.DEFAULT_GROUPS)
    static = copy.deepcopy(cfg)
    static.policy.rules = tuple(export_format.policy_to_data(allocate.assignment_policy(
        {"blocks/ffn1": allocate.Candidate(2, (2, 4), symmetric=False)}, members), skip_defaults=True))
    ssetup = run.build(static, run.load_tokenizer(workdir).vocab_size)
    model = nnx.merge(ssetup.graphdef, run.load_params(ssetup, str(workdir)), sensitivity.fresh_rest(ssetup, static))
    masks_lib.update_masks(model, 0, force=True)
    total = 0.0
    for (_, node), (_, f) in zip(nnx.iter_modules(model), nnx.iter_modules(nnx.merge(setup.graphdef, fisher, rest))):
        if isinstance(node, Dense | Conv) and node.path in members["blocks/ffn1"]:
            effective = jax.vmap(lambda k, m: ops.compressed_weight(k, m, node.spec, contract_axes=node.contract_axes))(
                node.kernel[...], node.mask[...])
            total += 0.5 * float(np.sum(np.asarray(f.kernel[...]) * np.asarray(node.kernel[...] - effective) ** 2))
    assert table["increase"]["blocks/ffn1"]["int2a+2:4"] == pytest.approx(total, rel=1e-4)
