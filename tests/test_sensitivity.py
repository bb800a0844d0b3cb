"""The PTQ sensitivity probe on a briefly trained micro run, and the mixed policy it
allocates: ranked as expected, cached, and usable as an ordinary config policy."""

from __future__ import annotations

import copy
import json
import math

import pytest

from conftest import tiny_config
from usmqs import config as config_lib
from usmqs import run, sensitivity, train
from usmqs.compress import allocate, export_format
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

