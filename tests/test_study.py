"""The compression study: results.json schema and numbers, report, plot, resume, configs."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
import soundfile as sf

from conftest import ROOT, TINY_OVERRIDES
from usmqs import config as config_lib
from usmqs import study, study_report

# conftest's test-sized model and data, as overrides of a study config.
TINY = [
    *TINY_OVERRIDES,
    "data.bucket_boundaries=(400,)",  # the study test's corpus copy fits one 400-frame bucket
    "data.max_frames=400",
    "train.log_every=1",
]


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def _study_config(spec: str, jax_cache, *overrides: str):
    """The study config of `spec` shrunk to the tiny test model, and its overrides."""
    overrides = TINY + [f"study.compile_cache_dir={jax_cache}", *overrides]
    cfg = config_lib.load_config(spec)
    config_lib.apply_overrides(cfg, overrides)
    return cfg, overrides


def _mtimes(workdir: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in workdir.rglob(study.DONE_FILE)}


def test_study_end_to_end_rerun_and_resume(small_corpus, tmp_path, jax_cache, capsys):
    spec = f"{ROOT / 'configs/study_demo.py'}:settings=int8/int4+2:4"
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
    )
    wd = tmp_path / "study"
    rows = study.run_study(cfg, wd, config_spec=spec, overrides=overrides)

    # results.json: the DESIGN.md rows, exactly.
    assert json.loads((wd / "results.json").read_text()) == rows
    assert [(r["name"], r["method"]) for r in rows] == [
        ("float", "float"), ("float", "qat"),
        ("int8", "ptq"), ("int8", "qat"),
        ("int4+2:4", "ptq"), ("int4+2:4", "qat"),
    ]
    for r in rows:
        assert tuple(r) == study_report.ROW_KEYS
    by = {(r["name"], r["method"]): r for r in rows}
    assert {(k, by[k]["weight_bits"], by[k]["sparsity"]) for k in by} == {
        (("float", "float"), None, None), (("float", "qat"), None, None),
        (("int8", "ptq"), 8, None), (("int8", "qat"), 8, None),
        (("int4+2:4", "ptq"), 4, "2:4"), (("int4+2:4", "qat"), 4, "2:4"),
    }
    float_wer = by[("float", "float")]["wer"]
    for r in rows:
        assert 0.0 <= r["wer"] and isinstance(r["size_bytes"], int)
        expected = (r["wer"] - float_wer) / float_wer if float_wer > 0 else None
        assert r["rel_wer_regression"] == pytest.approx(expected)
        # Each row is its run's eval.json and export/size.json.
        run_dir = wd / ("float" if r["method"] == "float" else f"{r['method']}/{r['name']}")
        assert r["wer"] == json.loads((run_dir / "eval.json").read_text())["wer"]
        assert r["dev_wer"] == json.loads((run_dir / "eval_dev.json").read_text())["wer"]
        size = json.loads((run_dir / "export/size.json").read_text())
        assert (r["size_bytes"], r["size_ratio"]) == (size["model_bytes"], size["size_ratio"])
    assert by[("float", "float")]["bits_per_weight"] == 32.0
    assert by[("int8", "qat")]["bits_per_weight"] == pytest.approx(8.0)
    assert by[("int4+2:4", "qat")]["bits_per_weight"] == pytest.approx(3.0, abs=0.05)
    def stored(name, m):  # model bytes less the Orbax/OCDBT container's bookkeeping
        size = json.loads((wd / f"{m}/{name}/export/size.json").read_text())
        return size["model_bytes"] - size["bytes"]["container"]

    for m in ("ptq", "qat"):
        assert by[("int8", m)]["size_ratio"] < by[("float", "float")]["size_ratio"]
        # The container's bytes vary with write timing (41-123 KB measured for this
        # 96K-parameter model, more than the int8 vs int4+2:4 payload gap): compare the rest.
        assert stored("int4+2:4", m) < stored("int8", m)
    # PTQ is the float model compressed without steps; QAT ran the fine-tuning budget.
    assert json.loads((wd / "ptq/int8/eval.json").read_text())["step"] == 0
    assert json.loads((wd / "qat/int8/eval.json").read_text())["step"] == 2
    assert json.loads((wd / "float/eval.json").read_text())["step"] == 4

    report = (wd / "report.md").read_text()
    assert "| setting | bits/weight | size % of fp32 | float WER % | PTQ WER % | QAT WER %" in report
    # 3 bits for the pruned layers; the dense front and depthwise convs keep 4.
    assert "| int4+2:4 | 3.0" in report and "9.4 %" in report and "Status: complete" in report
    assert (wd / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The dev split's table: the same layout, its own WERs and regressions.
    dev_table = report.split("## The dev split")[1].split("## Run costs")[0]
    base_dev = by[("float", "float")]["dev_wer"]
    assert f"| float | 32 | {100 * by[('float', 'float')]['size_ratio']:.2f} | {100 * base_dev:.2f} |" in dev_table
    assert f"| {100 * by[('int8', 'qat')]['dev_wer']:.2f} |" in dev_table
    out = capsys.readouterr().out
    assert "[qat int4+2:4 6/6] step 2/2" in out  # training progress carries the label
    assert "| setting | bits/weight |" in out  # the final table
    done = json.loads((wd / "qat/int4+2:4/done.json").read_text())
    assert done["timing"]["compile"]["train_step_seconds"] > 0
    # run_config.txt rebuilds the run's config (`usmqs evaluate/export --workdir RUN`).
    saved_spec, saved_overrides = json.loads((wd / "qat/int4+2:4/run_config.txt").read_text())
    rebuilt = config_lib.load_config(saved_spec)
    config_lib.apply_overrides(rebuilt, saved_overrides)
    assert study.run_identity(rebuilt, wd) == done["config"]

    # Rerun: nothing is redone.
    before = _mtimes(wd)
    assert len(before) == 6
    assert study.run_study(cfg, wd) == rows
    assert _mtimes(wd) == before
    assert capsys.readouterr().out.count("done earlier") == 6

    # Interrupted after its first fine-tuning checkpoint: resumes from it, alone.
    run_dir = wd / "qat/int4+2:4"
    (run_dir / "done.json").unlink()
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["1", "2"]
    shutil.rmtree(ckpts / "2")
    rows = study.run_study(cfg, wd)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2]  # step 1 was not trained again
    after = _mtimes(wd)
    assert after.pop("qat/int4+2:4/done.json") != before.pop("qat/int4+2:4/done.json")
    assert after == before
    resumed = json.loads((run_dir / "done.json").read_text())["timing"]["compile"]
    assert resumed["cache_hits"] > 0  # the persistent compilation cache served its programs

    # A finished run with another config is an error, not a silent mix of experiments.
    config_lib.apply_overrides(cfg, ["study.finetune.learning_rate=0.01"])
    with pytest.raises(study.StudyError, match="train.learning_rate"):
        study.run_study(cfg, wd)


def test_fine_tuning_seeds_plan_rows_table_and_plot(tmp_path):
    cfg = config_lib.load_config(f"{ROOT / 'configs/study_demo.py'}:settings=int4+2:4")
    cfg.seed = 10
    cfg.study.finetune_seeds = 3
    R, QAT = study.StudyRun, study.Method.QAT
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

    def rec(wer, dev):
        return {**_record(wer, 400, 3.0), "dev": {"wer": dev}}

    records = {study.BASELINE: rec(0.20, 0.10), R(study.Method.PTQ, "int4+2:4"): rec(0.8, 0.7)}
    for seed, (wer, dev) in enumerate([(0.24, 0.11), (0.26, 0.12), (0.25, 0.13)]):
        records[R(QAT, "int4+2:4", seed)] = rec(wer, dev)
    rows = study_report.result_rows(records)
    assert [(r["name"], r["method"]) for r in rows] == [("float", "float"), ("int4+2:4", "ptq"), ("int4+2:4", "qat")]
    qat = rows[-1]
    assert qat["wer_seeds"] == [0.24, 0.26, 0.25] and qat["dev_wer_seeds"] == [0.11, 0.12, 0.13]
    assert qat["wer"] == pytest.approx(0.25) and qat["dev_wer"] == pytest.approx(0.12)
    assert qat["rel_wer_regression"] == pytest.approx(0.25)  # of the mean
    table = study_report.format_table(rows)
    assert "| int4+2:4 | 3 | 10.00 | 20.00 | 80.00 | 25.00 ± 1.00 | +300.0 | +25.0 |" in table
    dev_table = study_report.format_table(study_report.dev_rows(rows))
    assert "| int4+2:4 | 3 | 10.00 | 10.00 | 70.00 | 12.00 ± 1.00 | +600.0 | +20.0 |" in dev_table
    assert study_report.rel_regression_sd(qat, 0.20) == pytest.approx(5.0)  # 1 point sd of a 20 % WER
    study_report.write_report(tmp_path / "report.md", rows, records, cfg, runs)
    assert "3 fine-tuning seeds each (seed 10 ... 12)" in (tmp_path / "report.md").read_text()
    study_report.plot_pareto(tmp_path / "pareto.png", rows)
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    cfg.study.finetune_seeds = 0
    with pytest.raises(ValueError, match="study.finetune_seeds"):
        study.validate_study_config(cfg)


def test_a_second_fine_tuning_seed_trains_its_own_run(small_corpus, tmp_path, jax_cache):
    spec = f"{ROOT / 'configs/study_demo.py'}:settings=int8"
    cfg, _ = _study_config(
        spec, jax_cache,
        f"data.train_manifest={small_corpus['train']}", f"data.eval_manifest={small_corpus['test']}",
        "train.num_steps=2", "train.checkpoint_every=2", "study.finetune_steps=2",
        "study.finetune.warmup_steps=1", "study.float_control=False", "study.finetune_seeds=2",
    )
    wd = tmp_path / "study"
    rows = study.run_study(cfg, wd)
    losses = {
        sub: [json.loads(l)["loss"] for l in (wd / sub / "metrics.jsonl").read_text().splitlines()]
        for sub in ("qat/int8", "qat_seed1/int8")
    }
    assert losses["qat/int8"] != losses["qat_seed1/int8"]  # other batches, other noise
    assert json.loads((wd / "qat_seed1/int8/config.json").read_text())["seed"] == cfg.seed + 1
    qat = next(r for r in rows if r["method"] == "qat")
    wers = [json.loads((wd / sub / "eval.json").read_text())["wer"] for sub in ("qat/int8", "qat_seed1/int8")]
    assert qat["wer_seeds"] == wers and qat["wer"] == pytest.approx(sum(wers) / 2)


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


def test_librispeech_config_dry_run(tmp_path, jax_cache):
    from usmqs.data.librispeech import import_librispeech

    _fake_librispeech(tmp_path / "LibriSpeech")
    manifests = import_librispeech(tmp_path / "LibriSpeech", tmp_path / "manifests")
    spec = (
        f"{ROOT / 'configs/study_librispeech.py'}:train={manifests['train-clean-100']},"
        f"eval={manifests['dev-clean']},settings=int8"
    )
    full = config_lib.load_config(spec)
    assert full.model.num_layers == 16 and full.model.model_dim == 256  # conformer_m
    assert full.data.num_mel_bins == 80 and full.study.finetune_steps < full.train.num_steps
    assert full.study.settings == ("int8",)
    assert config_lib.load_config(f"{spec},dev={manifests['dev-clean']}").data.dev_manifest == str(manifests["dev-clean"])

    cfg, _ = _study_config(
        spec, jax_cache, "train.num_steps=2", "train.checkpoint_every=2",
        "study.finetune_steps=1", "study.finetune.warmup_steps=1", "study.float_control=False",
        "data.num_workers=0", "study.eval_export=True",
    )
    rows = study.run_study(cfg, tmp_path / "study")
    # The packed export of every run decodes to the checkpoint's WER.
    for sub in ("float", "ptq/int8", "qat/int8"):
        done = json.loads((tmp_path / "study" / sub / "done.json").read_text())
        assert done["export_wer"] == done["eval"]["wer"]
    assert [(r["name"], r["method"]) for r in rows] == [
        ("float", "float"), ("int8", "ptq"), ("int8", "qat")
    ]
    assert (tmp_path / "study/pareto.png").is_file() and (tmp_path / "study/report.md").is_file()


# ----------------------------------------------------------------------- fast checks


def _record(wer: float, model_bytes: int, bpw: float | None) -> dict:
    return {
        "eval": {"wer": wer, "num_words": 100},
        "dev": None,
        "export_wer": None,
        "size": {
            "model_bytes": model_bytes, "size_ratio": model_bytes / 4000, "num_params": 1000,
            "fp32_bytes": 4000, "compressed_layers_bits_per_weight_no_scales": bpw,
        },
        "timing": {"steps": 1, "train_eval_seconds": 1.0, "export_seconds": 0.1,
                   "compile": {"total_seconds": 1.0, "train_step_seconds": 0.5, "cache_hits": 0, "cache_misses": 1}},
    }


def test_rows_report_and_plot_from_records(tmp_path):
    R = study.StudyRun
    records = {
        R(study.Method.QAT, "int4+2:4"): _record(0.25, 400, 3.0),
        study.BASELINE: _record(0.20, 4100, None),
        R(study.Method.PTQ, "int4+2:4"): _record(0.80, 400, 3.0),
        R(study.Method.PTQ, "int2"): _record(3.0, 300, 2.0),
    }
    rows = study_report.result_rows(records)
    assert [(r["name"], r["method"]) for r in rows] == [
        ("float", "float"), ("int2", "ptq"), ("int4+2:4", "ptq"), ("int4+2:4", "qat")
    ]
    by = {(r["name"], r["method"]): r for r in rows}
    assert by[("int4+2:4", "qat")]["rel_wer_regression"] == pytest.approx(0.25)
    assert by[("int2", "ptq")]["rel_wer_regression"] == pytest.approx(14.0)
    assert by[("int2", "ptq")] == {
        "name": "int2", "method": "ptq", "weight_bits": 2, "sparsity": None, "bits_per_weight": 2.0,
        "size_bytes": 300, "size_ratio": 0.075, "wer": 3.0, "rel_wer_regression": pytest.approx(14.0),
        "dev_wer": None,  # the records have no dev split
        "wer_seeds": [3.0], "dev_wer_seeds": [],
    }
    assert by[("float", "float")]["bits_per_weight"] == 32.0
    table = study_report.format_table(rows)
    assert "| int4+2:4 | 3 | 10.00 | 20.00 | 80.00 | 25.00 | +300.0 | +25.0 |" in table
    assert "| int2 | 2 | 7.50 | 20.00 | 300.00 | — | +1400.0 | — |" in table
    cfg = config_lib.load_config(f"{ROOT / 'configs/study_demo.py'}:settings=int2/int4+2:4")
    study_report.write_report(tmp_path / "report.md", rows, records, cfg, study.plan(cfg))
    report = (tmp_path / "report.md").read_text()
    assert "partial: 4/6 runs finished" in report and "| qat float | pending |" in report
    assert "## The dev split" not in report and study_report.dev_rows(rows) == []
    study_report.plot_pareto(tmp_path / "pareto.png", rows)  # symlog y: int2 PTQ is +1400 %
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    # A float WER of 0 leaves the relative regression undefined, not infinite.
    assert study_report.rel_regression(0.1, 0.0) is None

    # A partial study never reaches the README; a complete one replaces the marked block.
    readme = tmp_path / "README.md"
    original = f"# x\n\nbefore\n{study_report.README_BEGIN}\nold table\n{study_report.README_END}\nafter\n"
    readme.write_text(original)
    with pytest.raises(ValueError, match="not a complete study"):
        study_report.update_readme(readme, tmp_path)
    assert readme.read_text() == original
    cfg = config_lib.load_config(f"{ROOT / 'configs/study_demo.py'}:settings=int2/int4+2:4")
    cfg.study.float_control = False
    records.pop(R(study.Method.QAT, "int4+2:4"))
    records[R(study.Method.QAT, "int2")] = _record(0.5, 300, 2.0)
    records[R(study.Method.QAT, "int4+2:4")] = _record(0.25, 400, 3.0)
    study_report.write_outputs(tmp_path, records, cfg, study.plan(cfg))
    image = study_report.update_readme(readme, tmp_path)
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{study_report.README_END}\nafter\n")
    assert "old table" not in text and "| int4+2:4 | 3 | 10.00 |" in text
    assert f"![pareto](docs/{tmp_path.name}_pareto.png)" in text
    assert image.read_bytes() == (tmp_path / "pareto.png").read_bytes()
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="needs exactly one"):
        study_report.update_readme(readme, tmp_path)


def test_plan_overrides_and_validation(tmp_path):
    cfg = config_lib.load_config(f"{ROOT / 'configs/study_demo.py'}")
    assert cfg.study.settings == study.PAPER_SETTINGS
    runs = study.plan(cfg)
    assert len(runs) == 22 and runs[0] == study.BASELINE
    assert [r.subdir for r in runs[1:3]] == ["ptq/int8", "ptq/int4"]
    assert study.StudyRun(study.Method.QAT, "float") in runs
    qat = study.run_config(cfg, study.StudyRun(study.Method.QAT, "int4+2:4"), tmp_path)
    assert qat.policy.name == "int4+2:4" and qat.init_from == str(tmp_path / "float")
    assert qat.train.num_steps == cfg.study.finetune_steps
    assert qat.train.learning_rate == cfg.study.finetune.learning_rate < cfg.train.learning_rate
    assert qat.data.cache_dir == str(tmp_path / "data_cache")
    ptq = study.run_config(cfg, study.StudyRun(study.Method.PTQ, "int8"), tmp_path)
    assert ptq.train.num_steps == 0 and ptq.train.learning_rate == cfg.train.learning_rate
    assert study.run_identity(ptq) != study.run_identity(qat)
    assert "label" not in study.run_identity(ptq)
    # Paths inside the study folder are relative, so a moved study still resumes.
    assert study.run_identity(qat, tmp_path)["init_from"] == "WORKDIR/float"

    for bad, match in (
        (["study.settings=('int3',)"], "unknown policy names"),
        (["study.settings=('float', 'int8')"], "always runs"),
        (["study.finetune_steps=0"], "positive int"),
    ):
        c = config_lib.load_config(f"{ROOT / 'configs/study_demo.py'}")
        config_lib.apply_overrides(c, bad)
        with pytest.raises(ValueError, match=match):
            study.validate_study_config(c)
    c = config_lib.load_config(f"{ROOT / 'configs/study_demo.py'}")
    with c.study.finetune.unlocked():
        c.study.finetune.learning_rte = 1e-4
    with pytest.raises(ValueError, match="learning_rte"):
        study.validate_study_config(c)
    # The command line reaches the same checks before any work.
    from usmqs import cli

    with pytest.raises(ValueError, match="unknown policy names"):
        cli.main(["study", "--config", f"{ROOT / 'configs/study_demo.py'}:settings=int3",
                  "--workdir", str(tmp_path / "cli")])


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
    cfg = config_lib.load_config(f"{ROOT / 'configs/study_demo.py'}:full,settings=int4+2:4")
    study.validate_study_config(cfg)
    assert cfg.train.num_steps == tiny.train.num_steps == 4 * cfg.study.finetune_steps
    assert cfg.study.settings == ("int4+2:4",)
    for name in ("int4+2:4", "float"):  # the float control gets the same recipe
        qat = study.run_config(cfg, study.StudyRun(study.Method.QAT, name), tmp_path)
        assert qat.train.num_steps == tiny.train.num_steps // 4
        assert qat.train.learning_rate == tiny.train.learning_rate / 2
        assert qat.train.distill_weight == 0.5 and train.distills(qat)
        assert qat.init_from == str(tmp_path / "float")  # the teacher is the baseline
        spec = policy_from_config(qat.policy).resolve("blocks/ffn1/w_in")
        assert spec.runtime and spec.prune_grad.value == "srste" and spec.mask_schedule.every == 50
    assert study_report.named_pruning(cfg) == {"mask_every": 50, "prune_grad": "srste"}  # in report.md
    assert study_report.named_pruning(config_lib.load_config(f"{ROOT / 'configs/study_demo.py'}")) == {}
    baseline = study.run_config(cfg, study.BASELINE, tmp_path)
    assert not train.distills(baseline) and baseline.train.learning_rate == tiny.train.learning_rate


def test_report_says_only_what_the_study_checked(tmp_path):
    R, PTQ, QAT = study.StudyRun, study.Method.PTQ, study.Method.QAT
    cfg = config_lib.load_config(f"{ROOT / 'configs/study_demo.py'}:settings=int2")
    records = {study.BASELINE: _record(0.20, 4100, None), R(PTQ, "int2"): _record(3.0, 300, 2.0)}

    def header(records):
        rows = study_report.result_rows(records)
        study_report.write_report(tmp_path / "report.md", rows, records, cfg, study.plan(cfg))
        report = (tmp_path / "report.md").read_text()
        return report.split("\n\n")[1], "float control" in report

    # No packed-export check (study.eval_export off) and no float control yet: not a word.
    assert header(records)[0].endswith("(greedy decoding).") and header(records)[1] is False
    checked = {run: {**rec, "export_wer": rec["eval"]["wer"]} for run, rec in records.items()}
    checked[R(QAT, "float")] = {**_record(0.19, 4100, None), "export_wer": 0.18}
    text, control = header(checked)
    assert control and text.endswith(
        "(greedy decoding; decoded from their packed exports (3 of 3 runs checked), the WER "
        "differs for qat float (18.00 % from the export))."
    )
    del checked[R(QAT, "float")]
    assert header(checked)[0].endswith("(greedy decoding; decoded from its packed export, every run gives the same WER).")
    checked[study.BASELINE] = records[study.BASELINE]
    assert header(checked)[0].endswith("(greedy decoding; decoded from their packed exports, the runs checked (1 of 2) give the same WER).")
