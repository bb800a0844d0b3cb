"""The compression study: plan, execution and resume (usmqs/study.py); results.json rows,
report.md, pareto.png and the README block (usmqs/study_report.py).

What needs training is checked on one study of the micro model (`demo_study`: two
fine-tuning seeds, packed exports decoded), trained once per test session and shared, also
between xdist workers; the tests that change a study work on a copy. Failed runs and full
disks are checked on studies whose runs train nothing (`fake_runs`). Everything else is
checked on loaded configs and hand-made records.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import fcntl
import io
import json
import os
import pathlib
import re
import shutil
import types

import numpy as np
import pytest
import soundfile as sf

from conftest import ROOT, SUITE_JAX_CACHE, disk_full_for, listing, micro_overrides
from usmqs import config as config_lib
from usmqs import storage, study, study_report
from usmqs.compress.policy import PAPER_SETTINGS, Every, PruneGrad

# configs/tiny.py:micro's model and data, as overrides of a study config.
TINY = [
    *micro_overrides(),
    "data.bucket_boundaries=(400,)",  # the study test's corpus copy fits one 400-frame bucket
    "data.max_frames=400",
    "train.log_every=1",
]
DEMO = ROOT / "configs/study_demo.py"
R, PTQ, QAT = study.StudyRun, study.Method.PTQ, study.Method.QAT


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    """The test run's compilation cache (conftest), so that studies reuse the programs
    other tests compiled (and the other way round)."""
    return os.environ.get(SUITE_JAX_CACHE) or tmp_path_factory.mktemp("jax_cache")


def _study_config(spec: str, jax_cache, *overrides: str):
    """The study config of `spec` shrunk to the tiny test model, and its overrides."""
    overrides = TINY + [f"study.compile_cache_dir={jax_cache}", *overrides]
    cfg = config_lib.load_config(spec)
    config_lib.apply_overrides(cfg, overrides)
    return cfg, overrides


def _mtimes(workdir: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in workdir.rglob(study.DONE_FILE)}


def _json(path: pathlib.Path):
    return json.loads(path.read_text())


# ------------------------------------------------------------- one study, trained once


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def demo_study(small_corpus, tmp_path_factory, jax_cache):
    """The demo study of int4+2:4, 4 baseline steps and 2-step fine-tunes with two seeds,
    every run's packed export decoded: 6 runs (float, PTQ, float control + QAT x 2 seeds).

    Trained once per session: under xdist the first worker to get here trains it (the
    others wait on a lock) and every worker reads it, with the config it was made with
    (its corpus and compilation cache) and what it printed. Read-only for the tests.
    """
    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent  # the session's folder, above every worker's
    wd, made = shared / "demo_study", shared / "demo_study.json"
    with _locked(shared / "demo_study.lock"):
        if not made.is_file():
            spec = f"{DEMO}:settings=int4+2:4"
            cfg, overrides = _study_config(
                spec,
                jax_cache,
                f"data.train_manifest={small_corpus['train']}",
                f"data.eval_manifest={small_corpus['test']}",
                f"data.dev_manifest={small_corpus['dev']}",
                "train.num_steps=4",
                "train.checkpoint_every=4",
                "study.finetune_steps=2",
                "study.finetune.warmup_steps=1",
                "study.finetune.checkpoint_every=1",
                "study.finetune_seeds=2",
                "study.eval_export=True",
            )
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                rows = study.run_study(cfg, wd)
            made.write_text(json.dumps({"spec": spec, "overrides": overrides, "rows": rows, "out": out.getvalue()}))
    m = _json(made)
    cfg = config_lib.load_config(m["spec"])
    config_lib.apply_overrides(cfg, m["overrides"])
    return types.SimpleNamespace(cfg=cfg, wd=wd, rows=m["rows"], out=m["out"])


def _by(rows):
    return {(r["name"], r["method"]): r for r in rows}


def test_results_json_has_a_row_per_setting_and_method(demo_study):
    rows = demo_study.rows
    assert _json(demo_study.wd / "results.json") == rows
    assert [(r["name"], r["method"]) for r in rows] == [
        ("float", "float"), ("float", "qat"), ("int4+2:4", "ptq"), ("int4+2:4", "qat"),
    ]
    assert all(tuple(r) == study_report.ROW_KEYS for r in rows)
    assert {(k, r["weight_bits"], r["sparsity"]) for k, r in _by(rows).items()} == {
        (("float", "float"), None, None), (("float", "qat"), None, None),
        (("int4+2:4", "ptq"), 4, "2:4"), (("int4+2:4", "qat"), 4, "2:4"),
    }


def _run_dirs(wd, row) -> list[pathlib.Path]:
    """The run folders a row stands for: one, or a QAT run's fine-tuning seeds."""
    if row["method"] == "float":
        return [wd / "float"]
    seeds = range(len(row["wer_seeds"])) if row["method"] == "qat" else [0]
    return [wd / f"{row['method']}{f'_seed{k}' if k else ''}/{row['name']}" for k in seeds]


def test_each_row_is_its_runs_eval_and_export(demo_study):
    wd, by = demo_study.wd, _by(demo_study.rows)
    float_wer = by[("float", "float")]["wer"]
    for r in demo_study.rows:
        dirs = _run_dirs(wd, r)
        assert len(dirs) == (2 if r["method"] == "qat" else 1)
        wers = [_json(d / "eval.json")["wer"] for d in dirs]
        assert r["wer_seeds"] == wers and r["wer"] == pytest.approx(sum(wers) / len(wers))
        assert r["dev_wer_seeds"] == [_json(d / "eval_dev.json")["wer"] for d in dirs]
        size = _json(dirs[0] / "export/size.json")  # sizes: the first seed's
        assert (r["size_bytes"], r["size_ratio"]) == (size["model_bytes"], size["size_ratio"])
        expected = (r["wer"] - float_wer) / float_wer if float_wer > 0 else None
        assert r["rel_wer_regression"] == pytest.approx(expected)
    assert by[("float", "float")]["bits_per_weight"] == 32.0
    # 3 bits for the pruned layers; the dense front and depthwise convs keep 4.
    assert by[("int4+2:4", "qat")]["bits_per_weight"] == pytest.approx(3.0, abs=0.05)


def test_ptq_runs_no_steps_and_qat_the_fine_tuning_budget(demo_study):
    subs = ("float", "ptq/int4+2:4", "qat/int4+2:4")
    steps = {sub: _json(demo_study.wd / sub / "eval.json")["step"] for sub in subs}
    assert steps == {"float": 4, "ptq/int4+2:4": 0, "qat/int4+2:4": 2}


def test_compressed_exports_are_smaller(demo_study):
    by = _by(demo_study.rows)
    for m in ("ptq", "qat"):
        assert by[("int4+2:4", m)]["size_ratio"] < 0.5 * by[("float", "float")]["size_ratio"]


def test_study_writes_report_plot_and_progress(demo_study):
    report = (demo_study.wd / "report.md").read_text()
    assert "Status: complete" in report and "## The dev split" in report
    assert (demo_study.wd / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[qat int4+2:4 4/6] step 2/2" in demo_study.out  # training progress carries the label
    assert "| setting | bits/weight |" in demo_study.out  # the final table


def test_done_json_has_compile_time_and_the_run_dir_its_config(demo_study):
    run_dir = demo_study.wd / "qat/int4+2:4"
    done = _json(run_dir / "done.json")
    assert done["timing"]["compile"]["train_step_seconds"] > 0
    # What `usmqs evaluate/export --workdir RUN` read: the run's own config.
    assert study.run_identity(config_lib.load_saved(run_dir), demo_study.wd) == done["config"]


def test_a_second_fine_tuning_seed_trains_its_own_run(demo_study):
    wd = demo_study.wd
    losses = {
        sub: [json.loads(l)["loss"] for l in (wd / sub / "metrics.jsonl").read_text().splitlines()]
        for sub in ("qat/int4+2:4", "qat_seed1/int4+2:4")
    }
    assert losses["qat/int4+2:4"] != losses["qat_seed1/int4+2:4"]  # other batches, other noise
    assert _json(wd / "qat_seed1/int4+2:4/config.json")["seed"] == demo_study.cfg.seed + 1


def test_every_packed_export_decodes_to_its_checkpoints_wer(demo_study):
    for done in demo_study.wd.rglob(study.DONE_FILE):
        rec = _json(done)
        assert rec["export_wer"] == rec["eval"]["wer"], done
    assert "decoded from its packed export, every run gives the same WER" in (demo_study.wd / "report.md").read_text()


def test_a_rerun_redoes_nothing(demo_study, capsys):
    wd = demo_study.wd
    before = _mtimes(wd)
    assert len(before) == 6
    assert study.run_study(demo_study.cfg, wd) == _json(wd / "results.json")
    assert _mtimes(wd) == before
    assert capsys.readouterr().out.count("done earlier") == 6


def test_a_finished_run_with_another_config_is_an_error(demo_study):
    cfg = copy.deepcopy(demo_study.cfg)
    config_lib.apply_overrides(cfg, ["study.finetune.learning_rate=0.01"])
    with pytest.raises(study.StudyError, match=r"qat/float finished with another config \(train.learning_rate"):
        study.run_study(cfg, demo_study.wd)


def test_a_key_added_since_a_run_finished_counts_as_its_default(demo_study, tmp_path):
    # A record made before train.distill_hidden_weight existed: the run still counts as
    # done while the key holds its default, and is another experiment once it does not.
    run = study.StudyRun(study.Method.QAT, "int4+2:4")
    record = _json(demo_study.wd / run.subdir / "done.json")
    del record["config"]["train.distill_hidden_weight"]
    run_dir = tmp_path / run.subdir
    run_dir.mkdir(parents=True)
    (run_dir / "done.json").write_text(json.dumps(record))
    cfg = study.run_config(demo_study.cfg, run, demo_study.wd)
    assert study.load_done(run_dir, cfg, demo_study.wd) == record
    config_lib.apply_overrides(cfg, ["train.distill_hidden_weight=0.5"])
    with pytest.raises(study.StudyError, match=r"another config \(train.distill_hidden_weight: None -> 0.5\)"):
        study.load_done(run_dir, cfg, demo_study.wd)


def test_an_interrupted_moved_study_resumes_from_its_checkpoint(demo_study, tmp_path):
    # A copy elsewhere: paths inside the study folder are relative to it in the records.
    wd = tmp_path / "moved"
    shutil.copytree(demo_study.wd, wd, ignore=shutil.ignore_patterns(".*.tmp*"))  # not outputs being written
    run_dir = wd / "qat/int4+2:4"
    before = _mtimes(wd)
    (run_dir / "done.json").unlink()
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["1", "2"]
    shutil.rmtree(ckpts / "2")
    study.run_study(demo_study.cfg, wd)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # step 1 was not trained again; step 2's old line was superseded
    after = _mtimes(wd)
    assert after.pop("qat/int4+2:4/done.json") != before.pop("qat/int4+2:4/done.json")
    assert after == before
    resumed = _json(run_dir / "done.json")["timing"]["compile"]
    assert resumed["cache_hits"] > 0  # the persistent compilation cache served its programs


def test_a_budget_added_to_a_finished_study_trains_only_its_mixed_policy(demo_study, tmp_path, capsys):
    """study.budgets on a finished study (a copy): the probe of the baseline, the
    allocation within the budget, then mixed@B PTQ and QAT runs with its rules; rows and
    the report's section; every earlier run kept."""
    wd = tmp_path / "study"
    shutil.copytree(demo_study.wd, wd, ignore=shutil.ignore_patterns(".*.tmp*"))
    cfg = copy.deepcopy(demo_study.cfg)
    config_lib.apply_overrides(cfg, ["study.budgets=(6.0,)", "study.finetune_seeds=1"])
    before = _mtimes(wd)
    rows = study.run_study(cfg, wd)
    assert capsys.readouterr().out.count("done earlier") == 4  # float, ptq and qat int4+2:4, qat float
    after = _mtimes(wd)
    assert {k: after[k] for k in before} == before and set(after) - set(before) == {
        "ptq/mixed@6/done.json", "qat/mixed@6/done.json"}
    alloc = _json(wd / "float/mixed/mixed@6.json")
    assert alloc["bits_per_weight"] <= 6.0 and alloc["budget_bits_per_weight"] == 6.0
    by = {(r["name"], r["method"]): r for r in rows}
    for method in ("ptq", "qat"):
        row, done = by[("mixed@6", method)], _json(wd / method / "mixed@6" / "done.json")
        assert row["status"] == "done" and row["weight_bits"] is None and row["sparsity"] is None
        assert row["bits_per_weight"] == done["size"]["compressed_layers_bits_per_weight_no_scales"]
        assert done["size"]["compressed_layers_bits_per_weight"] == pytest.approx(alloc["export_bits_per_weight"])
        assert _json(wd / method / "mixed@6" / "config.json")["policy"]["rules"] == alloc["rules"]
    assert [r["name"] for r in rows][-2:] == ["mixed@6", "mixed@6"]  # after the named settings
    report = (wd / "report.md").read_text()
    assert "### mixed@6" in report and all(f"| {g} | {v['candidate']} |" in report for g, v in alloc["groups"].items())


def test_mixed_rules_get_the_studys_n_m_recipe():
    """The full recipe's N:M options (mask_every, SR-STE) reach a mixed policy's N:M rules
    as they reach the named settings; its other rules stay as allocated."""
    cfg = config_lib.load_config(f"{DEMO}:full")
    config_lib.apply_overrides(cfg, ["study.budgets=(3.0,)"])
    alloc = types.SimpleNamespace(rules=[{"module_path": "a", "weight_bits": 4, "nm": [2, 4]},
                                         {"module_path": "b", "weight_bits": 8}])
    got = study.mixed_rules(cfg, alloc)
    assert got[1] == alloc.rules[1]
    assert got[0] == {**alloc.rules[0], "mask_schedule": {"kind": "every", "every": cfg.policy.mask_every},
                      "prune_grad": cfg.policy.prune_grad}
    run = study.StudyRun(QAT, "mixed@3")
    mixed = study.run_config(cfg, run, "/tmp/w", rules=got)
    config_lib.validate(mixed)  # custom rules: runtime off, the named N:M options at their defaults
    assert not mixed.policy.runtime and mixed.policy.mask_every == 0 and mixed.policy.name == "mixed@3"
    planned = [(r.method, r.name) for r in study.plan(cfg)]  # after the named settings
    assert planned.index((PTQ, "mixed@3")) == len(PAPER_SETTINGS) + 1 and planned[-1] == (QAT, "mixed@3")



def test_learned_scale_runs_every_compressed_setting_as_rules_with_trained_ranges(tmp_path):
    """study.learned_scale: a named setting becomes its own rules (same layers, N:M
    recipe) with learned ranges, compiled as constants; mixed rules get them on their
    quantized rules only; the baseline and the float control stay as they were."""
    from usmqs.compress.policy import Policy, policy_from_config

    cfg = config_lib.load_config(f"{DEMO}:full")
    config_lib.apply_overrides(cfg, ["study.learned_scale=True"])
    qat = study.run_config(cfg, R(QAT, "int4+2:4"), tmp_path)
    config_lib.validate(qat)
    assert qat.policy.name == "int4+2:4" and not qat.policy.runtime
    got = policy_from_config(qat.policy)
    named = Policy.named("int4+2:4", mask_schedule=Every(every=cfg.policy.mask_every), prune_grad=PruneGrad.SRSTE)
    assert [r.module_path for r in got.rules] == [r.module_path for r in named.rules]
    for mine, theirs in zip(got.rules, named.rules):
        assert mine.spec == dataclasses.replace(theirs.spec, learned_scale=True)
    for run in (R(QAT, "float"), study.BASELINE):
        plain = study.run_config(cfg, run, tmp_path)
        assert not plain.policy.rules and plain.policy.name == "float"
    alloc = types.SimpleNamespace(rules=[{"module_path": "a", "weight_bits": 2, "nm": [1, 4]},
                                         {"module_path": "b", "nm": [2, 4]}, {"module_path": "c"}])
    mixed = study.mixed_rules(cfg, alloc)
    assert [r.get("learned_scale", False) for r in mixed] == [True, False, False]


def test_the_study_allocates_with_its_sensitivity_method(monkeypatch, tmp_path):
    cfg = config_lib.load_config(f"{DEMO}:full")
    config_lib.apply_overrides(cfg, ["study.budgets=(3.0, 2.0)", "study.sensitivity=fisher"])
    calls = []
    monkeypatch.setattr(study.sensitivity, "allocate_run", lambda c, wd, **kw: calls.append((c.policy.name, wd, kw)))
    study.allocation(cfg, tmp_path, "mixed@2")
    assert calls == [("float", tmp_path / "float", {"bits_per_weight": 2.0, "method": "fisher"})]


# ------------------------------------------------------------------ further training


def _fake_librispeech(root: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and ran to see her big red dog".split()
    for split, speakers in (("train-clean-100", (19, 26)), ("dev-clean", (84,))):
        for speaker in speakers:
            folder = root / split / str(speaker) / "100"
            folder.mkdir(parents=True)
            lines = []
            for utt in range(4):
                utt_id = f"{speaker}-100-{utt:04d}"
                seconds = rng.uniform(1.0, 2.0)
                sf.write(folder / f"{utt_id}.flac", rng.uniform(-0.3, 0.3, int(16000 * seconds)).astype(np.float32), 16000)
                lines.append(f"{utt_id} {' '.join(rng.choice(words, 3)).upper()}")
            (folder / f"{speaker}-100.trans.txt").write_text("\n".join(lines) + "\n")


def test_librispeech_config():
    spec = f"{ROOT / 'configs/study_librispeech.py'}:train=/ls/train.jsonl,eval=/ls/dev.jsonl,settings=int8"
    full = config_lib.load_config(spec)
    assert full.model.num_layers == 16 and full.model.model_dim == 256  # conformer_m
    assert full.data.num_mel_bins == 80 and full.study.finetune_steps < full.train.num_steps
    assert full.study.settings == ("int8",)
    assert (full.data.train_manifest, full.data.eval_manifest, full.data.dev_manifest) == (
        "/ls/train.jsonl", "/ls/dev.jsonl", ""
    )
    assert config_lib.load_config(f"{spec},dev=/ls/d.jsonl").data.dev_manifest == "/ls/d.jsonl"


def test_librispeech_study_reads_imported_librispeech(tmp_path):
    """The LibriSpeech study config on manifests from `import_librispeech`: it validates,
    plans its runs, and its first run's data (flac audio, 80 mel bins) prepares. (Its runs
    train like the demo study's above, which checks training, exports and the report.)"""
    from usmqs import run
    from usmqs.data import pipeline
    from usmqs.data.librispeech import import_librispeech

    _fake_librispeech(tmp_path / "LibriSpeech")
    manifests = import_librispeech(tmp_path / "LibriSpeech", tmp_path / "manifests")
    spec = (
        f"{ROOT / 'configs/study_librispeech.py'}:train={manifests['train-clean-100']},"
        f"eval={manifests['dev-clean']},settings=int8"
    )
    cfg = config_lib.load_config(spec)
    config_lib.apply_overrides(cfg, ["data.vocab_size=24", "data.num_workers=0"])
    config_lib.validate(cfg)
    assert [r.tag for r in study.plan(cfg)] == ["float float", "ptq int8", "qat float", "qat int8"]
    base = study.run_config(cfg, study.BASELINE, tmp_path / "study")
    tok = run.load_or_train_tokenizer(base, tmp_path / "study/float", base.data.train_manifest)
    split = pipeline.prepare_split(base.data.train_manifest, tok, base.data, tmp_path / "cache", train=True)
    assert split.num_examples == 8 and not split.skipped
    first = next(pipeline.make_train_iterator(split, base.data, seed=0))
    assert first["features"].shape[-1] == 80


# ----------------------------------------------------- failed runs, full disks (no training)


@pytest.fixture
def fake_runs(monkeypatch):
    """Study runs that train and export nothing: `train_and_evaluate` and `export_workdir`
    return made-up numbers at once (WER 20 % for float runs, 25 % for the others);
    ``faults[tag] = exc`` makes that run's training raise `exc`. ``calls``: the tags of
    the runs started, in order."""
    fake = types.SimpleNamespace(calls=[], faults={})

    def train(cfg, run_dir):
        tag = cfg.label.rsplit(" ", 1)[0]
        fake.calls.append(tag)
        if tag in fake.faults:
            raise fake.faults[tag]
        wer = 0.2 if cfg.policy.name == "float" else 0.25
        return {"wer": wer, "cer": 0.1, "num_utterances": 2, "num_words": 10, "step": cfg.train.num_steps}

    def export(cfg, run_dir):
        return {
            "total_bytes": 1000, "model_bytes": 900, "fp32_bytes": 4000, "num_params": 1000, "size_ratio": 0.225,
            "compressed_layers_bits_per_weight": None, "compressed_layers_bits_per_weight_no_scales": None,
        }

    monkeypatch.setattr(study.train_lib, "train_and_evaluate", train)
    monkeypatch.setattr(study.export_lib, "export_workdir", export)
    return fake


def _fake_study_config(jax_cache):
    """The demo study of int8: baseline, PTQ, float control, QAT (4 runs)."""
    return _study_config(f"{DEMO}:settings=int8", jax_cache, "study.compile_cache=False")[0]


def _failing_study(fake_runs, wd, jax_cache, tag: str, exc: Exception, match: str):
    """The `_fake_study_config` study in `wd` with run `tag` raising `exc`: it ends in a
    StudyError matching `match`; its config."""
    cfg = _fake_study_config(jax_cache)
    fake_runs.faults[tag] = exc
    with pytest.raises(study.StudyError, match=match):
        study.run_study(cfg, wd)
    return cfg


def test_a_failed_run_is_recorded_and_the_study_goes_on(fake_runs, tmp_path, jax_cache, capsys):
    wd = tmp_path / "study"
    cfg = _failing_study(
        fake_runs, wd, jax_cache, "qat float", FloatingPointError("loss is nan at step 3"),
        r"^1 of 4 runs failed: qat float: FloatingPointError: loss is nan at step 3\. "
        f"Details in {re.escape(str(wd))}/report.md and each run's failed.json",
    )
    assert fake_runs.calls == ["float float", "ptq int8", "qat float", "qat int8"]  # it went on
    error = "FloatingPointError: loss is nan at step 3"
    assert f"[qat float 3/4] FAILED: {error} (traceback in {wd}/qat/float/failed.json)" in capsys.readouterr().out
    failed = _json(wd / "qat/float/failed.json")
    assert failed["error"] == error and failed["error_type"] == "FloatingPointError"
    assert failed["traceback"][-1] == failed["error"] and 1 < len(failed["traceback"]) <= study.TRACEBACK_LINES
    assert failed["config"] == study.run_identity(study.run_config(cfg, R(QAT, "float"), wd), wd)
    assert sorted(str(p.relative_to(wd)) for p in wd.rglob("*.json") if p.parent != wd) == [
        "float/done.json", "ptq/int8/done.json", "qat/float/failed.json", "qat/int8/done.json",
    ]
    # results.json and report.md are complete, the failure shown in them.
    rows = _by(_json(wd / "results.json"))
    assert {k: (r["status"], r["error"], r["wer"]) for k, r in rows.items()} == {
        ("float", "float"): ("done", None, 0.2), ("float", "qat"): ("failed", failed["error"], None),
        ("int8", "ptq"): ("done", None, 0.25), ("int8", "qat"): ("done", None, 0.25),
    }
    report = (wd / "report.md").read_text()
    assert "Status: partial: 3/4 runs finished, 1 failed." in report
    assert f"| float | 32 | 22.50 | 20.00 | — | FAILED: {error} | — | — |" in report
    assert "## Failed runs" in report and f"| qat float | {error} |" in report
    assert "| qat float | FAILED | | | | | |" in report  # run costs

    # Rerun with the fault gone: only the failed run runs again, and the study completes.
    fake_runs.faults.clear()
    fake_runs.calls.clear()
    rows = study.run_study(cfg, wd)
    assert fake_runs.calls == ["qat float"]
    assert not (wd / "qat/float/failed.json").exists() and (wd / "qat/float/done.json").is_file()
    assert [r["status"] for r in rows] == ["done"] * 4 and _json(wd / "results.json") == rows
    assert "Status: complete." in (wd / "report.md").read_text()


def test_runs_that_start_from_a_failed_baseline_are_not_run(fake_runs, tmp_path, jax_cache, capsys):
    wd = tmp_path / "study"
    _failing_study(
        fake_runs, wd, jax_cache, "float float", RuntimeError("no training data"),
        r"^1 of 4 runs failed \(3 more not run: they start from a failed run\): float float: "
        r"RuntimeError: no training data\. Details",
    )
    assert fake_runs.calls == ["float float"]
    assert "[ptq int8 2/4] FAILED: not run: it starts from float float, which failed" in capsys.readouterr().out
    assert listing(wd) == ["float", "pareto.png", "report.md", "results.json"]
    rows = _json(wd / "results.json")
    assert [(r["name"], r["method"], r["status"], r["wer"]) for r in rows] == [
        ("float", "float", "failed", None), ("float", "qat", "failed", None),
        ("int8", "ptq", "failed", None), ("int8", "qat", "failed", None),
    ]
    assert rows[0]["error"] == "RuntimeError: no training data"
    assert rows[2]["error"] == "not run: it starts from float float, which failed"
    report = (wd / "report.md").read_text()
    assert "Status: partial: 0/4 runs finished, 4 failed. No table: the float baseline" in report
    assert "| ptq int8 | not run: it starts from float float, which failed |" in report


class Preempted(Exception):
    """Stands for the training loop's preemption (a run stopped to be resumed)."""


@pytest.mark.parametrize("fault", ["done.json full", "WriteError", "ENOSPC", "KeyboardInterrupt", "Preempted"])
def test_what_stops_the_whole_study(fake_runs, tmp_path, jax_cache, monkeypatch, fault):
    """A full disk (wherever it shows up), Ctrl-C, or what the study is told aborts on
    (`study.ABORTS_STUDY`) stop the study at once: not recorded as a failed run."""
    cfg, wd = _fake_study_config(jax_cache), tmp_path / "study"
    monkeypatch.setattr(study, "ABORTS_STUDY", (*study.ABORTS_STUDY, Preempted))
    here = re.escape(str(wd))
    if fault == "done.json full":
        disk_full_for(monkeypatch, "done.json")
        expected, match, calls = storage.WriteError, f"cannot write the run's record to {here}/float/done.json", 1
    else:
        fake_runs.faults["ptq int8"], expected, match = {
            "WriteError": (storage.WriteError("cannot write x", path=wd, free_bytes=0), storage.WriteError, "x"),
            "ENOSPC": (OSError(errno.ENOSPC, "No space left on device"), storage.WriteError,
                       f"cannot write the ptq int8 run to {here}/ptq/int8: no space left on device"),
            "KeyboardInterrupt": (KeyboardInterrupt(), KeyboardInterrupt, None),
            "Preempted": (Preempted(), Preempted, None),
        }[fault]
        calls = 2
    with pytest.raises(expected, match=match):
        study.run_study(cfg, wd)
    assert fake_runs.calls == ["float float", "ptq int8"][:calls]
    assert not list(wd.rglob("failed.json")) and not list(wd.rglob(".*tmp*"))
    assert (wd / "float/done.json").is_file() == (calls == 2)


def _outputs(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("name", [study_report.RESULTS_FILE, study_report.REPORT_FILE, study_report.PARETO_FILE])
def test_study_outputs_on_a_full_disk_keep_the_previous_files(tmp_path, monkeypatch, name):
    cfg = config_lib.load_config(f"{DEMO}:settings=int2/int4+2:4")
    records = _records()
    study_report.write_outputs(tmp_path, records, cfg, study.plan(cfg))
    before = _outputs(tmp_path)
    records[R(QAT, "int2")] = _record(0.5, 300, 2.0)
    disk_full_for(monkeypatch, name)
    with pytest.raises(storage.WriteError, match=f"cannot write the .* to {re.escape(str(tmp_path / name))}: no space"):
        study_report.write_outputs(tmp_path, records, cfg, study.plan(cfg))
    after = _outputs(tmp_path)
    assert sorted(after) == ["pareto.png", "report.md", "results.json"]  # no temporary left
    assert after[name] == before[name]


@pytest.mark.parametrize("what", ["README", "plot"])
def test_a_readme_update_on_a_full_disk_keeps_the_readme(tmp_path, monkeypatch, what):
    wd, readme = tmp_path / "study", tmp_path / "README.md"
    wd.mkdir()
    readme.write_text(f"# x\n{study_report.README_BEGIN}\nold table\n{study_report.README_END}\n")
    cfg = config_lib.load_config(f"{DEMO}:settings=int4+2:4")
    cfg.study.float_control = False
    records = {r: rec for r, rec in _records().items() if r.name != "int2"}
    study_report.write_outputs(wd, records, cfg, study.plan(cfg))
    name = "README.md" if what == "README" else "study_pareto.png"
    disk_full_for(monkeypatch, name)
    with pytest.raises(storage.WriteError, match=f"to .*/{name}: no space left on device"):
        study_report.update_readme(readme, wd)
    assert "old table" in readme.read_text()
    assert listing(tmp_path) == ["README.md", "docs", "study"]
    # The plot is copied before the README is written: the new one stays when the README fails.
    assert listing(tmp_path / "docs") == ([] if what == "plot" else ["study_pareto.png"])


def test_failed_runs_in_rows_table_and_plot(tmp_path):
    """A failed setting: no values, FAILED and its error (one line, escaped) in the
    table, no point in the plot; a failed seed: the others' mean, marked."""
    failures = {R(QAT, "int2"): {"error": "ValueError: a | b\nsecond line"}}
    rows = study_report.result_rows(_records(), failures)
    int2 = _by(rows)[("int2", "qat")]
    assert (int2["status"], int2["error"], int2["wer"], int2["size_ratio"], int2["wer_seeds"]) == (
        "failed", "ValueError: a | b\nsecond line", None, None, []
    )
    table = study_report.format_table(rows)
    assert "| int2 | 2 | 7.50 | 20.00 | 300.00 | FAILED: ValueError: a \\| b second line | +1400.0 | — |" in table
    study_report.plot_pareto(tmp_path / "p.png", rows)
    seeds = study_report.result_rows(_seed_records(), {R(QAT, "int4+2:4", 3): {"error": "RuntimeError: x"}})
    qat = _by(seeds)[("int4+2:4", "qat")]
    assert qat["error"] == "qat int4+2:4 seed3: RuntimeError: x" and qat["wer"] == pytest.approx(0.25)
    assert "| 25.00 ± 1.00 (a seed FAILED) |" in study_report.format_table(seeds)


# ------------------------------------------------------------------- plan and configs


def test_plan_of_the_paper_settings(tmp_path):
    cfg = config_lib.load_config(f"{DEMO}")
    assert cfg.study.settings == PAPER_SETTINGS
    runs = study.plan(cfg)
    # baseline, ten PTQ (a first picture early), the float control, ten QAT
    assert len(runs) == 22 and runs[0] == study.BASELINE and runs[11] == R(QAT, "float")
    assert [r.subdir for r in runs[1:3]] == ["ptq/int8", "ptq/int4"]


def test_plan_with_fine_tuning_seeds(tmp_path):
    cfg = config_lib.load_config(f"{DEMO}:settings=int4+2:4")
    cfg.seed = 10
    cfg.study.finetune_seeds = 3
    runs = study.plan(cfg)
    # A complete single-seed table first, then the other seeds.
    assert [r.tag for r in runs] == [
        "float float", "ptq int4+2:4", "qat float", "qat int4+2:4",
        "qat float seed1", "qat int4+2:4 seed1", "qat float seed2", "qat int4+2:4 seed2",
    ]
    assert [r.subdir for r in runs[3:6]] == ["qat/int4+2:4", "qat_seed1/float", "qat_seed1/int4+2:4"]
    wd = tmp_path.absolute()
    assert "seed=11" in study.run_overrides(cfg, R(QAT, "int4+2:4", 1), wd)
    assert not any(o.startswith("seed=") for o in study.run_overrides(cfg, R(QAT, "int4+2:4"), wd))
    assert study.run_config(cfg, R(QAT, "float", 2), wd).seed == 12


def test_run_config_of_ptq_and_qat(tmp_path):
    cfg = config_lib.load_config(f"{DEMO}")
    qat = study.run_config(cfg, R(QAT, "int4+2:4"), tmp_path)
    assert qat.policy.name == "int4+2:4" and qat.init_from == str(tmp_path / "float")
    assert qat.train.num_steps == cfg.study.finetune_steps
    assert qat.train.learning_rate == cfg.study.finetune.learning_rate < cfg.train.learning_rate
    assert qat.data.cache_dir == str(tmp_path / "data_cache")
    ptq = study.run_config(cfg, R(PTQ, "int8"), tmp_path)
    assert ptq.train.num_steps == 0 and ptq.train.learning_rate == cfg.train.learning_rate


def test_run_identity(tmp_path):
    cfg = config_lib.load_config(f"{DEMO}")
    qat = study.run_config(cfg, R(QAT, "int4+2:4"), tmp_path)
    ptq = study.run_config(cfg, R(PTQ, "int8"), tmp_path)
    assert study.run_identity(ptq) != study.run_identity(qat)
    assert "label" not in study.run_identity(ptq)
    assert not any(k.startswith("study.") for k in study.run_identity(ptq))
    # Paths inside the study folder are relative, so a moved study still resumes.
    assert study.run_identity(qat, tmp_path)["init_from"] == "WORKDIR/float"


@pytest.mark.parametrize(
    "bad, match",
    [
        (["study.settings=('int3',)"], "unknown policy names"),
        (["study.settings=('float', 'int8')"], "always runs"),
        (["study.settings=('int8', 'int8')"], "duplicates"),
        (["study.finetune_steps=0"], "study.finetune_steps must be a positive int"),
        (["study.finetune_seeds=0"], "study.finetune_seeds must be a positive int"),
        (["study.budgets=(3.0, 3)"], "study.budgets has duplicates"),
        (["study.budgets=(0.0,)"], r"study.budgets: bits per weight in \(0, 32\)"),
        (["study.sensitivity=hessian"], r"study.sensitivity must be one of \('ptq', 'fisher'\)"),
        (["policy.rules=({'weight_bits': 4},)"], "leave policy.rules empty"),
    ],
)
def test_invalid_study_configs(bad, match):
    c = config_lib.load_config(f"{DEMO}")
    config_lib.apply_overrides(c, bad)
    with pytest.raises(ValueError, match=match):
        config_lib.validate(c)


@pytest.mark.parametrize("key", ["learning_rte", "num_steps"])
def test_a_fine_tuning_key_that_is_no_train_key_is_an_error(key):
    c = config_lib.load_config(f"{DEMO}")
    with c.study.finetune.unlocked():
        c.study.finetune[key] = 1
    with pytest.raises(ValueError, match=f"study.finetune: \\['{key}'\\] are not config.train keys"):
        config_lib.validate(c)


def test_the_command_line_validates_before_any_work(tmp_path, capsys):
    from usmqs import cli

    with pytest.raises(SystemExit) as e:  # a bad config: exit 2 and one line naming it
        cli.main(["study", "--config", f"{DEMO}:settings=int3", "--workdir", str(tmp_path / "cli")])
    assert e.value.code == 2 and "unknown policy names" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def test_compilation_cache_is_scoped(tmp_path):
    import jax

    before = jax.config.jax_compilation_cache_dir
    with study.compilation_cache(tmp_path / "cache"):
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    assert jax.config.jax_compilation_cache_dir == before


def test_full_recipe_fine_tunes_a_quarter_of_tiny_with_distillation(tmp_path):
    from usmqs import train
    from usmqs.compress.policy import policy_from_config

    tiny = config_lib.load_config(f"{ROOT / 'configs/tiny.py'}")
    cfg = config_lib.load_config(f"{DEMO}:full,settings=int4+2:4")
    config_lib.validate(cfg)
    assert cfg.train.num_steps == tiny.train.num_steps == 4 * cfg.study.finetune_steps
    assert cfg.study.settings == ("int4+2:4",)
    for name in ("int4+2:4", "float"):  # the float control gets the same recipe
        qat = study.run_config(cfg, R(QAT, name), tmp_path)
        assert qat.train.num_steps == tiny.train.num_steps // 4
        assert qat.train.learning_rate == tiny.train.learning_rate / 2
        assert qat.train.distill_weight == 0.5 and train.distills(qat)
        assert qat.init_from == str(tmp_path / "float")  # the teacher is the baseline
        spec = policy_from_config(qat.policy).resolve("blocks/ffn1/w_in")
        assert spec.runtime and spec.prune_grad.value == "srste" and spec.mask_schedule.every == 50
    assert study_report.named_pruning(cfg) == {"mask_every": 50, "prune_grad": "srste"}  # in report.md
    assert study_report.named_pruning(config_lib.load_config(f"{DEMO}")) == {}
    baseline = study.run_config(cfg, study.BASELINE, tmp_path)
    assert not train.distills(baseline) and baseline.train.learning_rate == tiny.train.learning_rate


# ------------------------------------------------------ the report, from hand-made records


def _record(wer: float, model_bytes: int, bpw: float | None, *, dev=None, export_wer=None) -> dict:
    """A done.json record as the report reads it (4000 fp32 bytes, 100 eval words)."""
    return {
        "eval": {"wer": wer, "num_words": 100},
        "dev": None if dev is None else {"wer": dev},
        "export_wer": export_wer,
        "size": {
            "model_bytes": model_bytes, "size_ratio": model_bytes / 4000, "num_params": 1000,
            "fp32_bytes": 4000, "compressed_layers_bits_per_weight_no_scales": bpw,
        },
        "timing": {"steps": 1, "train_eval_seconds": 1.0, "export_seconds": 0.1,
                   "compile": {"total_seconds": 1.0, "train_step_seconds": 0.5, "cache_hits": 0, "cache_misses": 1}},
    }


def _records() -> dict:
    """A partial study of int2 and int4+2:4: baseline, both PTQ, one QAT (no control)."""
    return {
        R(QAT, "int4+2:4"): _record(0.25, 400, 3.0),
        study.BASELINE: _record(0.20, 4100, None),
        R(PTQ, "int4+2:4"): _record(0.80, 400, 3.0),
        R(PTQ, "int2"): _record(3.0, 300, 2.0),
    }


def _seed_records() -> dict:
    """Baseline, PTQ and three QAT seeds of int4+2:4, with dev WERs."""
    records = {study.BASELINE: _record(0.20, 400, 3.0, dev=0.10), R(PTQ, "int4+2:4"): _record(0.8, 400, 3.0, dev=0.7)}
    for seed, (wer, dev) in enumerate([(0.24, 0.11), (0.26, 0.12), (0.25, 0.13)]):
        records[R(QAT, "int4+2:4", seed)] = _record(wer, 400, 3.0, dev=dev)
    return records


def _report(tmp_path, records, spec=f"{DEMO}:settings=int2/int4+2:4", **study_keys) -> str:
    cfg = config_lib.load_config(spec)
    for k, v in study_keys.items():
        cfg.study[k] = v
    rows = study_report.result_rows(records)
    study_report.write_report(tmp_path / "report.md", rows, records, cfg, study.plan(cfg))
    return (tmp_path / "report.md").read_text()


def test_result_rows_from_records():
    rows = study_report.result_rows(_records())
    assert [(r["name"], r["method"]) for r in rows] == [
        ("float", "float"), ("int2", "ptq"), ("int4+2:4", "ptq"), ("int4+2:4", "qat")
    ]
    by = _by(rows)
    assert by[("int4+2:4", "qat")]["rel_wer_regression"] == pytest.approx(0.25)
    assert by[("int2", "ptq")] == {
        "name": "int2", "method": "ptq", "weight_bits": 2, "sparsity": None, "bits_per_weight": 2.0,
        "size_bytes": 300, "size_ratio": 0.075, "wer": 3.0, "rel_wer_regression": pytest.approx(14.0),
        "dev_wer": None,  # the records have no dev split
        "wer_seeds": [3.0], "dev_wer_seeds": [],
        "status": "done", "error": None,
    }
    assert by[("float", "float")]["bits_per_weight"] == 32.0


def test_a_float_wer_of_zero_leaves_the_regression_undefined():
    assert study_report.rel_regression(0.1, 0.0) is None


def test_table_has_a_line_per_setting():
    table = study_report.format_table(study_report.result_rows(_records()))
    assert "| int4+2:4 | 3 | 10.00 | 20.00 | 80.00 | 25.00 | +300.0 | +25.0 |" in table
    assert "| int2 | 2 | 7.50 | 20.00 | 300.00 | — | +1400.0 | — |" in table


def test_fine_tuning_seeds_are_averaged():
    rows = study_report.result_rows(_seed_records())
    assert [(r["name"], r["method"]) for r in rows] == [("float", "float"), ("int4+2:4", "ptq"), ("int4+2:4", "qat")]
    qat = rows[-1]
    assert qat["wer_seeds"] == [0.24, 0.26, 0.25] and qat["dev_wer_seeds"] == [0.11, 0.12, 0.13]
    assert qat["wer"] == pytest.approx(0.25) and qat["dev_wer"] == pytest.approx(0.12)
    assert qat["rel_wer_regression"] == pytest.approx(0.25)  # of the mean
    table = study_report.format_table(rows)
    assert "| int4+2:4 | 3 | 10.00 | 20.00 | 80.00 | 25.00 ± 1.00 | +300.0 | +25.0 |" in table
    assert study_report.rel_regression_sd(qat, 0.20) == pytest.approx(5.0)  # 1 point sd of a 20 % WER


def test_report_of_a_partial_study(tmp_path):
    report = _report(tmp_path, _records())
    assert "Status: partial: 4/6 runs finished." in report
    assert "| qat float | pending |" in report and "| qat int4+2:4 | 1 | 1.0 | 0.1 | 1.0 | 0.5 | 0/1 |" in report
    assert "## The dev split" not in report  # the records have no dev split
    assert study_report.format_table(study_report.result_rows(_records())) in report
    # Against the paper: its point and this study's
    assert "**9.4 % of the fp32 size at 7.3 % relative WER regression**" in report
    assert "int4+2:4 after fine-tuning is 10.0 % of fp32 at +25.0 % relative regression (+300.0 % without" in report
    assert "the eval set has 100 words, so one word is 1.00 % absolute WER" in report


def test_report_names_the_seeds_and_shows_the_dev_split(tmp_path):
    cfg_spec = f"{DEMO}:settings=int4+2:4"
    report = _report(tmp_path, _seed_records(), cfg_spec, finetune_seeds=3)
    assert "3 fine-tuning seeds each (seed 0 ... 2): QAT WER is their mean ± sample sd" in report
    dev = report.split("## The dev split")[1].split("## Run costs")[0]
    assert "| int4+2:4 | 3 | 10.00 | 10.00 | 70.00 | 12.00 ± 1.00 | +600.0 | +20.0 |" in dev


def test_report_describes_the_float_control_only_when_it_ran(tmp_path):
    assert "float control" not in _report(tmp_path, _records())
    records = {**_records(), R(QAT, "float"): _record(0.19, 4100, None)}
    report = _report(tmp_path, records)
    assert "QAT of `float` is the float control" in report and "Compare each QAT row with the float control" in report


def test_report_states_the_export_check_only_when_it_ran(tmp_path):
    report = _report(tmp_path, _records())
    assert "(greedy decoding)." in report and "export" not in report.split("\n\n")[1]
    checked = {run: {**rec, "export_wer": rec["eval"]["wer"]} for run, rec in _records().items()}
    assert "(greedy decoding; decoded from its packed export, every run gives the same WER)." in _report(tmp_path, checked)
    checked[study.BASELINE] = {**checked[study.BASELINE], "export_wer": None}
    assert "(greedy decoding; decoded from their packed exports, the runs checked (3 of 4) give the same WER)." in _report(
        tmp_path, checked
    )
    checked[R(PTQ, "int2")] = {**checked[R(PTQ, "int2")], "export_wer": 2.9}
    assert (
        "(greedy decoding; decoded from their packed exports (3 of 4 runs checked), the WER differs "
        "for ptq int2 (290.00 % from the export))."
    ) in _report(tmp_path, checked)


def test_pareto_plot(tmp_path):
    for name, records in (("symlog", _records()), ("seeds", _seed_records())):
        # symlog y: int2 PTQ is +1400 %; seeds: error bars
        study_report.plot_pareto(tmp_path / f"{name}.png", study_report.result_rows(records))
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_update_readme_replaces_only_a_complete_studys_block(tmp_path):
    readme = tmp_path / "README.md"
    original = f"# x\n\nbefore\n{study_report.README_BEGIN}\nold table\n{study_report.README_END}\nafter\n"
    readme.write_text(original)
    cfg = config_lib.load_config(f"{DEMO}:settings=int2/int4+2:4")
    cfg.study.float_control = False
    records = _records()
    study_report.write_outputs(tmp_path, records, cfg, study.plan(cfg))
    with pytest.raises(ValueError, match="not a complete study"):
        study_report.update_readme(readme, tmp_path)
    assert readme.read_text() == original

    records[R(QAT, "int2")] = _record(0.5, 300, 2.0)
    study_report.write_outputs(tmp_path, records, cfg, study.plan(cfg))
    image = study_report.update_readme(readme, tmp_path)
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{study_report.README_END}\nafter\n")
    assert "old table" not in text and "| int4+2:4 | 3 | 10.00 |" in text
    assert "\n#### Run costs\n" in text and "# Compression study" not in text
    assert f"![pareto](docs/{tmp_path.name}_pareto.png)" in text
    assert image.read_bytes() == (tmp_path / "pareto.png").read_bytes()
    assert _json(tmp_path / "results.json") == study_report.result_rows(records)
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="needs exactly one"):
        study_report.update_readme(readme, tmp_path)


def test_the_mixed_section_names_its_estimate_and_asymmetric_settings_when_allocated():
    rows = [{"name": "mixed@2", "bits_per_weight": 1.9, "size_ratio": 0.08}]

    def allocation(candidate):
        return {"mixed@2": {
            "budget_bits_per_weight": 2.0, "bits_per_weight": 1.99, "bits_per_weight_no_scales": 1.9,
            "predicted_sensitivity": 0.5,
            "groups": {"blocks/ffn1": {"candidate": candidate, "num_weights": 10, "bytes": 3, "sensitivity": 0.5}},
        }}

    asym = "\n".join(study_report._mixed_section(rows, allocation("int2a+2:4")))
    assert "| blocks/ffn1 | int2a+2:4 | 10 | 3 | 0.5 |" in asym and "(int2a) marks asymmetric" in asym
    assert "probed loss increase (PTQ of that group alone" in asym  # the default method
    sym = allocation("int2+2:4")
    sym["mixed@2"]["sensitivity_method"] = "fisher"
    text = "\n".join(study_report._mixed_section(rows, sym))
    assert "asymmetric" not in text and "Fisher estimate of the loss increase" in text
