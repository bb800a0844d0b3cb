"""The training loop: loss goes down, checkpoints resume exactly, bad input is skipped."""

from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import soundfile as sf

from conftest import ROOT, sigterm_at_batch, tiny_config
from usmqs import evaluate, preemption, run, train
from usmqs.compress.export_format import named_leaves
from usmqs.data import pipeline


def _first_batch(cfg, workdir):
    tok = run.load_or_train_tokenizer(cfg, workdir, cfg.data.train_manifest)
    split = pipeline.prepare_split(
        cfg.data.train_manifest, tok, cfg.data, run.cache_dir(cfg, workdir), train=True
    )
    it = pipeline.make_train_iterator(split, cfg.data, seed=0)
    return tok, next(it)


@pytest.fixture(scope="module")
def float_run(small_corpus, tmp_path_factory):
    """A 4-step float run with its evaluation outputs on the test and the dev split: the
    init_from / distillation teacher of the tests below (trained once for the module)."""
    cfg = tiny_config(small_corpus, steps=4)
    cfg.data.dev_manifest = str(small_corpus["dev"])
    workdir = tmp_path_factory.mktemp("float") / "run"
    metrics = train.train_and_evaluate(cfg, workdir)
    return cfg, workdir, metrics


def test_ctc_loss_matches_hand_computed_case():
    # T=2 frames, V=2 (blank=0, a=1), label "a": paths (a,a), (a,_), (_,a).
    p = np.array([[0.4, 0.6], [0.7, 0.3]])
    expected = -np.log(0.6 * 0.3 + 0.6 * 0.7 + 0.4 * 0.3)
    logits = np.log(p)[None].astype(np.float32)
    loss, n = train.ctc_loss(
        logits, np.ones((1, 2), bool), np.array([[1]], np.int32), np.ones((1, 1), bool)
    )
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert int(n) == 1
    # A padding row (no labels) contributes nothing.
    loss2, n2 = train.ctc_loss(
        np.concatenate([logits, logits]),
        np.ones((2, 2), bool),
        np.array([[1], [0]], np.int32),
        np.array([[True], [False]]),
    )
    assert float(loss2) == pytest.approx(expected, rel=1e-5) and int(n2) == 1


def test_a_few_steps_lower_the_loss(small_corpus, tmp_path, caplog):
    cfg = tiny_config(small_corpus, steps=30)
    cfg.model.dropout = 0.0
    cfg.model.attention_dropout = 0.0
    cfg.data.spec_augment.enabled = False
    cfg.train.learning_rate = 3e-3
    tok, batch = _first_batch(cfg, tmp_path)
    setup = run.build(cfg, tok.vocab_size)
    step_fn, batch_sh = train.make_train_step(setup, cfg)
    state = setup.init_fn(jax.random.PRNGKey(0))
    dev = run.device_batch(batch, batch_sh)
    losses = []
    with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
        for _ in range(12):
            state, m = step_fn(state, dev)
            losses.append(float(m["loss"]))
    assert int(state.step) == 12
    assert losses[-1] < 0.7 * losses[0], losses
    # One compiled program for the whole run (same bucket shape every step).
    compiles = [r for r in caplog.records if r.getMessage().startswith("Finished XLA compilation of jit(train_step)")]
    assert len(compiles) == 1, [r.getMessage() for r in caplog.records]


def test_a_run_writes_its_eval_outputs(float_run):
    cfg, workdir, metrics = float_run
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and metrics["step"] == 4
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == 4
    ev = json.loads((workdir / "eval.json").read_text())
    assert set(ev) >= {"wer", "cer", "num_utterances", "num_words"}
    assert ev["num_utterances"] == 24
    preds = [json.loads(l) for l in (workdir / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 24 and set(preds[0]) == {"audio_filepath", "text", "pred_text"}


def test_the_dev_split_is_decoded_beside_the_test_split(small_corpus, float_run):
    cfg, workdir, metrics = float_run
    ev, dev = (json.loads((workdir / f).read_text()) for f in ("eval.json", "eval_dev.json"))
    assert metrics["dev"] == dev and {k: metrics[k] for k in ev} == ev
    # Each file holds its own split's utterances: test and dev sentences are disjoint.
    assert _texts(workdir / "predictions.jsonl") == _texts(small_corpus["test"])
    assert _texts(workdir / "predictions_dev.jsonl") == _texts(small_corpus["dev"])
    assert not set(_texts(small_corpus["test"])) & set(_texts(small_corpus["dev"]))
    assert dev["num_words"] == sum(len(t.split()) for t in _texts(small_corpus["dev"]))
    # Re-decoding the dev split from the checkpoint gives the same numbers.
    assert evaluate.evaluate_workdir(cfg, workdir, split="dev") == dev
    with pytest.raises(ValueError, match="split must be one of"):
        evaluate.evaluate_workdir(cfg, workdir, split="test")
    # eval.dev=False: the test split only.
    assert evaluate.decodes_dev(cfg)
    no_dev = copy.deepcopy(cfg)
    no_dev.eval.dev = False
    assert not evaluate.decodes_dev(no_dev)
    # No data.dev_manifest: no dev split, and asking for it says so.
    no_dev.eval.dev, no_dev.data.dev_manifest = True, ""
    with pytest.raises(ValueError, match="no dev split: set data.dev_manifest"):
        evaluate.evaluate_workdir(no_dev, workdir, split="dev")


def test_a_preempted_run_resumes_exactly_where_the_straight_run_ends(small_corpus, float_run, tmp_path, monkeypatch):
    """SIGTERM while step 1 runs: the run finishes step 2 (the step every process agrees
    on, read one step late), saves there and raises Preempted; rerunning ends exactly
    where 4 straight steps end (weights, AdamW moments, RNG, data position and the
    distillation teacher, reloaded from init_from), for a compressed student."""
    c = tiny_config(small_corpus, policy="int4+2:4", steps=4)
    c.eval.at_end = False
    c.init_from = str(float_run[1])
    c.train.distill_weight = 0.5
    c.train.distill_temperature = 2.0
    c.train.checkpoint_every = 3
    train.train_and_evaluate(c, tmp_path / "straight")
    with monkeypatch.context() as m:
        m.setattr(pipeline, "make_train_iterator", sigterm_at_batch(pipeline.make_train_iterator, 1))
        with pytest.raises(preemption.Preempted, match="SIGTERM: stopped after step 2") as info:
            train.train_and_evaluate(c, tmp_path / "resumed")
    assert info.value.step == 2 and _steps(tmp_path / "resumed") == [2]
    # The handlers are restored after the run.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    train.train_and_evaluate(c, tmp_path / "resumed")
    losses = {}
    for name in ("straight", "resumed"):
        rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [2, 4]  # resumed at 2, not restarted
        assert {"ctc_loss", "distill_loss"} <= set(rows[-1])
        losses[name] = rows[-1]
    for key in ("loss", "ctc_loss", "distill_loss", "grad_norm"):
        assert losses["resumed"][key] == pytest.approx(losses["straight"][key], rel=1e-5), key


def _steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _texts(path):
    return [json.loads(l)["text"] for l in pathlib.Path(path).read_text().splitlines()]


def test_sigterm_then_kill_minus_9_then_rerun_logs_each_step_once(small_corpus, tmp_path):
    """`usmqs train` stopped by SIGTERM exits 75 with a checkpoint at the step it names;
    killed with -9 (perhaps mid-write) it loses at most the steps since its last
    checkpoint; the rerun finishes, and metrics.jsonl holds every logged step once."""
    workdir = tmp_path / "killed"
    overrides = [
        f"--config.data.train_manifest={small_corpus['train']}",
        f"--config.data.eval_manifest={small_corpus['test']}",
        "--config.train.num_steps=40", "--config.train.checkpoint_every=5",
        "--config.train.log_every=5", "--config.model.num_layers=1", "--config.eval.at_end=false",
    ]
    cmd = [sys.executable, "-m", "usmqs", "train", "--config", f"{ROOT / 'configs/tiny.py'}:micro",
           "--workdir", str(workdir), *overrides]

    def launch_until_checkpoint_after(step: int):
        err = open(tmp_path / "stderr.txt", "w")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if (workdir / "checkpoints").exists() and max(_steps(workdir), default=0) > step:
                break
            time.sleep(0.1)
        return proc, err

    proc, err = launch_until_checkpoint_after(0)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    err.close()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == preemption.EXIT_PREEMPTED, stderr[-3000:]
    stopped = int(re.search(r"SIGTERM: stopped after step (\d+)", stderr).group(1))
    assert max(_steps(workdir)) == stopped < 40

    proc, err = launch_until_checkpoint_after(stopped)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    err.close()
    assert stopped < max(_steps(workdir)) < 40

    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert max(_steps(workdir)) == 40
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 41, 5))


def test_bad_input_is_skipped_and_reported(small_corpus, tmp_path):
    rows = [json.loads(l) for l in pathlib.Path(small_corpus["train"]).read_text().splitlines()]
    base = pathlib.Path(small_corpus["train"]).parent
    for r in rows:
        r["audio_filepath"] = str(base / r["audio_filepath"])
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF....WAVEfmt garbage" * 10)
    bad = [
        {"audio_filepath": str(tmp_path / "missing.wav"), "text": "call mom", "duration": 1.0},
        {"audio_filepath": str(tmp_path / "empty.wav"), "text": "call mom", "duration": 1.0},
        {"audio_filepath": str(tmp_path / "corrupt.wav"), "text": "call mom", "duration": 1.0},
        {"audio_filepath": rows[0]["audio_filepath"], "text": "", "duration": 1.0},
    ]
    manifest = tmp_path / "train_bad.jsonl"
    with open(manifest, "w") as f:
        for r in rows + bad:
            f.write(json.dumps(r) + "\n")
        f.write("{not json\n")
    cfg = tiny_config({"train": manifest, "test": small_corpus["test"]}, steps=2)
    cfg.eval.at_end = False
    train.train_and_evaluate(cfg, tmp_path / "run")
    tok = run.load_or_train_tokenizer(cfg, tmp_path / "run", str(manifest))
    split = pipeline.prepare_split(str(manifest), tok, cfg.data, run.cache_dir(cfg, tmp_path / "run"), train=True)
    # The five bad lines, each under its reason; with character units a fast utterance
    # may also be too short for its labels under CTC (counted, not a crash).
    too_long = split.skipped.get("labels_too_long", 0)
    assert {k: v for k, v in split.skipped.items() if k != "labels_too_long"} == {
        "audio_error": 3, "empty_transcript": 1, "malformed_line": 1,
    }
    assert split.num_examples == len(rows) - too_long
    cfg.data.on_bad_input = "error"
    with pytest.raises(ValueError, match=str(manifest)):
        pipeline.prepare_split(str(manifest), tok, cfg.data, tmp_path / "fresh_cache", train=True)


# Tightly trimmed single words, recorded at 8 kHz: (seconds, text). Character units are
# the letters plus the word-boundary piece "▁" each utterance starts with: "yes" is 4
# labels, "stop" 5. At 10 ms frames (25 ms windows) 0.15 s is 13 frames, 0.2 s 18: the 4x
# subsampler keeps ceil(T / 4) = 4-5 of them (the VALID convolutions before kept 2-3).
SHORT_WORDS = [(0.15, "yes"), (0.15, "two"), (0.17, "six"), (0.19, "stop"), (0.2, "left"), (0.2, "down")]
TOO_SHORT = (0.15, "stop")  # 5 labels, 4 frames: no 4x front end can align it


def _word_manifest(root: pathlib.Path, words) -> pathlib.Path:
    rows = []
    for i, (seconds, text) in enumerate(words):
        n = round(seconds * 8000)
        audio = 0.3 * np.sin(2 * np.pi * (300 + 50 * i) * np.arange(n) / 8000)
        audio += 0.01 * np.random.default_rng(i).standard_normal(n)
        sf.write(root / f"w{i}.wav", audio.astype(np.float32), 8000, subtype="PCM_16")
        rows.append(json.dumps({"audio_filepath": f"w{i}.wav", "text": text, "duration": seconds}))
    (root / "words.jsonl").write_text("\n".join(rows) + "\n")
    return root / "words.jsonl"


def test_short_words_are_kept_and_trained_on(tmp_path):
    manifest = _word_manifest(tmp_path, [*SHORT_WORDS, TOO_SHORT])
    cfg = tiny_config({"train": manifest, "test": manifest}, steps=1)
    cfg.data.batch_size = len(SHORT_WORDS)
    tok = run.load_or_train_tokenizer(cfg, tmp_path, str(manifest))
    split = pipeline.prepare_split(str(manifest), tok, cfg.data, tmp_path / "cache", train=True)
    assert split.skipped == {"labels_too_long": 1} and split.num_examples == len(SHORT_WORDS)
    assert split.skip_log[0]["detail"] == "5 labels need 5 encoder frames, 13 frames give 4"
    assert [m["num_frames"] for m in split.metadata] == [13, 13, 15, 17, 18, 18]
    assert [m["num_labels"] for m in split.metadata] == [4, 4, 4, 5, 5, 5]

    batch = next(pipeline.make_train_iterator(split, cfg.data, seed=0))
    assert sorted(batch["example_index"].tolist()) == list(range(len(SHORT_WORDS)))
    setup = run.build(cfg, tok.vocab_size)
    step_fn, batch_sh = train.make_train_step(setup, cfg)
    state = setup.init_fn(jax.random.PRNGKey(0))
    new_state, m = step_fn(state, run.device_batch(batch, batch_sh))
    # An alignment CTC cannot make costs optax's log-epsilon (1e5 per utterance): a loss of
    # a few nats per label means every word was aligned to its frames.
    assert int(m["skipped"]) == 0 and 0.0 < float(m["loss"]) < 20.0, m
    assert float(m["grad_norm"]) > 0 and int(new_state.step) == 1


def test_init_from_loads_float_weights_and_ptq_masks(small_corpus, float_run, tmp_path):
    from flax import nnx

    cfg, float_dir, _ = float_run
    qcfg = tiny_config(small_corpus, policy="int4+2:4", steps=0)
    qcfg.init_from = str(float_dir)
    metrics = train.train_and_evaluate(qcfg, tmp_path / "ptq")
    assert metrics["step"] == 0 and 0.0 <= metrics["wer"]
    assert (tmp_path / "ptq/tokenizer.model").read_bytes() == (float_dir / "tokenizer.model").read_bytes()

    tok = run.load_tokenizer(float_dir)
    fsetup = run.build(cfg, tok.vocab_size)
    qsetup = run.build(qcfg, tok.vocab_size)
    fstate = run.restore_latest(float_dir, fsetup)
    qstate, _ = run.restore_state(run.checkpoint_manager(tmp_path / "ptq"), 0, qsetup)
    for a, b in zip(jax.tree.leaves(fstate.params), jax.tree.leaves(qstate.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    masks = jax.tree.leaves(qstate.rest)
    assert masks, "int4+2:4 must have masks"
    model = nnx.merge(qsetup.graphdef, qstate.params, qstate.rest)
    w = model.blocks.ffn1.w_in.kernel[...]  # [L, in, out]: groups of 4 along `in`
    m = np.asarray(model.blocks.ffn1.w_in.mask[...])
    assert (m.reshape(m.shape[0], -1, 4, m.shape[-1]).sum(axis=2) == 2).all()
    # The kept ones are the two largest magnitudes of each group.
    wg = np.abs(np.asarray(w)).reshape(m.shape[0], -1, 4, m.shape[-1])
    kept_min = np.where(m.reshape(wg.shape), wg, np.inf).min(axis=2)
    dropped_max = np.where(~m.reshape(wg.shape), wg, -np.inf).max(axis=2)
    assert (kept_min >= dropped_max).all()


def test_a_checkpoint_of_other_shapes_is_refused_by_name(float_run, tmp_path):
    """A model whose subsampler output is one mel group wider (84 bins: ceil(84/4) = 21
    groups against the checkpoint's 20), as a run from before the padded subsampler is one
    narrower: resuming, init_from and export each stop with the tensor, both shapes and the
    step, and the checkpoints stay where they are (no damage to fall back from)."""
    import shutil

    from usmqs import checkpoints, export

    cfg, float_dir, _ = float_run
    workdir = tmp_path / "run"
    shutil.copytree(float_dir, workdir)
    wide = cfg.copy_and_resolve_references()
    wide.model.num_mel_bins = 84
    setup = run.build(wide, run.load_tokenizer(workdir).vocab_size)
    proj = rf"subsample/proj/kernel is \[320, 48\] there, \[336, 48\] here.*train it again"
    ckpts = checkpoints.Checkpoints(workdir, keep=3)
    with pytest.raises(checkpoints.IncompatibleCheckpoint, match=rf"checkpoints/4 does not fit.*{proj}"):
        ckpts.restore(lambda step: run.restore_state(ckpts.mngr, step, setup))  # as train.py resumes
    ckpts.close()
    assert not (workdir / checkpoints.QUARANTINE_DIR).exists()
    assert _steps(workdir) == _steps(float_dir)
    with pytest.raises(checkpoints.IncompatibleCheckpoint, match=proj):
        run.load_params(setup, str(workdir))  # init_from, the distillation teacher
    with pytest.raises(checkpoints.IncompatibleCheckpoint, match=proj):
        export.export_workdir(wide, workdir)


def test_distill_loss_is_the_masked_kl_of_the_posteriors():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 5, 7)).astype(np.float32), rng.normal(size=(2, 5, 7)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    for temp in (1.0, 2.0):
        ls = s / temp - np.log(np.exp(s / temp).sum(-1, keepdims=True))
        lt = t / temp - np.log(np.exp(t / temp).sum(-1, keepdims=True))
        kl = (np.exp(lt) * (lt - ls)).sum(-1)
        expected = temp**2 * kl[mask].mean()
        assert float(train.distill_loss(s, t, mask, temp)) == pytest.approx(expected, rel=1e-5)
    assert float(train.distill_loss(t, t, mask, 1.0)) == pytest.approx(0.0, abs=1e-6)
    # Padded frames do not count: changing them changes nothing.
    s2 = s.copy()
    s2[0, 3:] = 100.0
    assert float(train.distill_loss(s2, t, mask, 1.0)) == pytest.approx(float(train.distill_loss(s, t, mask, 1.0)))


def test_distillation_pulls_the_compressed_student_to_the_float_teacher(small_corpus, float_run):
    cfg, float_dir, _ = float_run
    tok, batch = _first_batch(cfg, float_dir)

    def first_losses(policy, steps, kl=1.0, hidden=0.0):
        c = tiny_config(small_corpus, policy=policy, steps=steps)
        c.init_from = str(float_dir)
        c.train.distill_weight = kl
        c.train.distill_hidden_weight = hidden
        c.train.learning_rate = 3e-3
        c.train.warmup_steps = 1
        setup = run.build(c, tok.vocab_size)
        step_fn, batch_sh = train.make_train_step(setup, c)
        state = run.load_float_weights(setup, setup.init_fn(jax.random.PRNGKey(0)), c.init_from)
        teacher = run.load_params(setup, c.init_from)
        dev = run.device_batch(batch, batch_sh)
        out = []
        for _ in range(steps):
            state, m = step_fn(state, dev, teacher)
            out.append({k: float(v) for k, v in m.items()})
        return out

    # Float student = teacher: nothing to distil (the KL of identical posteriors is 0).
    same = first_losses("float", 1)[0]
    assert same["distill_loss"] == pytest.approx(0.0, abs=1e-6) and same["ctc_loss"] > 0
    assert same["loss"] == pytest.approx(same["distill_loss"])  # weight 1: KL alone
    # int4+2:4 student: the KL is positive and the distillation steps shrink it.
    comp = first_losses("int4+2:4", 8)
    assert comp[0]["distill_loss"] > 1e-3
    assert comp[-1]["distill_loss"] < 0.7 * comp[0]["distill_loss"], [m["distill_loss"] for m in comp]
    # Hidden-state distillation alone (no KL): zero for the float student, whose loss is
    # then its CTC loss; positive for int2+2:4 and shrunk by its steps.
    same = first_losses("float", 1, kl=0.0, hidden=1.0)[0]
    assert same["hidden_loss"] == pytest.approx(0.0, abs=1e-6) and same["loss"] == pytest.approx(same["ctc_loss"])
    comp = first_losses("int2+2:4", 8, kl=0.0, hidden=1.0)
    assert comp[0]["loss"] == pytest.approx(comp[0]["ctc_loss"] + comp[0]["hidden_loss"], rel=1e-5)
    assert comp[0]["hidden_loss"] > 1e-2
    assert comp[-1]["hidden_loss"] < 0.7 * comp[0]["hidden_loss"], [m["hidden_loss"] for m in comp]


def test_hidden_distill_loss_is_the_relative_squared_distance_of_the_block_outputs():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 2, 5, 3)).astype(np.float32), rng.normal(size=(2, 2, 5, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    expected = ((s - t) ** 2)[:, mask].sum() / (t**2)[:, mask].sum()
    assert float(train.hidden_distill_loss(s, t, mask)) == pytest.approx(expected, rel=1e-5)
    assert float(train.hidden_distill_loss(t, t, mask)) == 0.0
    assert float(train.hidden_distill_loss(np.zeros_like(t), t, mask)) == pytest.approx(1.0)
    s2 = s.copy()
    s2[:, 0, 3:] = 100.0  # padded frames do not count
    assert float(train.hidden_distill_loss(s2, t, mask)) == pytest.approx(expected, rel=1e-5)


def test_learned_ranges_start_calibrated_learn_and_get_no_weight_decay(small_corpus, float_run):
    """init_from a float run under learned ranges (asymmetric int2, LSQ+): every range
    starts at the clip-searched range of the loaded weights, the teacher is the float
    weights alone, the steps move the ranges, and weight decay leaves them alone."""
    import jax.numpy as jnp
    from flax import nnx

    from usmqs.compress import ops
    from usmqs.compress.layers import QuantRange

    cfg, float_dir, _ = float_run
    tok, batch = _first_batch(cfg, float_dir)
    c = tiny_config(small_corpus, steps=3)
    c.init_from = str(float_dir)
    c.policy.name = "int2a-lsq"
    c.policy.rules = ({"module_path": ".*", "weight_bits": 2, "symmetric": False, "learned_scale": True},)
    c.train.distill_weight, c.train.warmup_steps = 0.5, 1
    setup = run.build(c, tok.vocab_size)
    state = run.load_float_weights(setup, setup.init_fn(jax.random.PRNGKey(0)), c.init_from)
    model = nnx.merge(setup.graphdef, state.params, state.rest)
    layers = {m.path: m for _, m in nnx.iter_modules(model) if getattr(m, "quant_range", None) is not None}
    assert {"blocks/ffn1/w_in", "ctc/head", "subsample/conv1"} <= set(layers)
    calibrated = {}
    for path, layer in layers.items():
        k = layer.kernel[...]
        fn = lambda w, l=layer: ops.initial_range(w, l.spec, contract_axes=l.contract_axes)
        for _ in range(k.ndim - len(layer.kernel_shape)):
            fn = jax.vmap(fn)
        calibrated[path] = np.asarray(layer.quant_range[...])
        np.testing.assert_array_equal(calibrated[path], fn(k), err_msg=path)
    float_weights = run.load_params(setup, c.init_from)
    assert not jax.tree.leaves(nnx.filter_state(float_weights, QuantRange))  # the teacher: weights only

    c_decay = copy.deepcopy(c)
    c_decay.train.weight_decay = 1.0
    tx, _ = run.make_optimizer(c_decay, setup.policy)
    opt, zero = tx.init(state.params), jax.tree.map(jnp.zeros_like, state.params)
    for _ in range(2):  # the first update has LR 0 (warmup from 0)
        upd, opt = tx.update(zero, opt, state.params)
    decayed = {k: np.any(np.asarray(v)) for k, v in named_leaves(upd).items()}
    assert decayed and all(v != k.endswith("quant_range") for k, v in decayed.items()), decayed

    step_fn, batch_sh = train.make_train_step(setup, c)
    dev = run.device_batch(batch, batch_sh)
    for _ in range(3):
        state, metrics = step_fn(state, dev, float_weights)
        assert np.isfinite(float(metrics["loss"]))
    trained = nnx.merge(setup.graphdef, state.params, state.rest)
    moved = {m.path: np.abs(np.asarray(m.quant_range[...]) - calibrated[m.path]).max()
             for _, m in nnx.iter_modules(trained) if getattr(m, "quant_range", None) is not None}
    assert all(v > 0 for v in moved.values()), moved
