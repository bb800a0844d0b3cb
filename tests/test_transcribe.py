"""A trained run's packed export and `usmqs transcribe`: the export holds the checkpoint's
fake-quant kernels and decodes alone like its evaluation; transcripts from a run and from
its export equal `usmqs evaluate`'s predictions, bad files are reported and counted without stopping the others, any sample
rate and channel count is read, and long files are decoded in windows whose stitched
posteriors are exactly the whole file's."""

from __future__ import annotations

import io
import json
import pathlib
import shutil

import numpy as np
import pytest
import soundfile as sf
import soxr
from flax import nnx

from conftest import assert_bitwise, fake_quant_kernels, tiny_config
from usmqs import cli, export, run, train, transcribe
from usmqs.compress import codec
from usmqs.data import pipeline
from usmqs.data.audio import load_audio
from usmqs.data.manifest import read_manifest
from usmqs.data.tokenizer import Tokenizer

ROW_KEYS = ["audio_filepath", "text", "duration", "seconds"]
ERROR_KEYS = ["audio_filepath", "error", "duration", "seconds"]


def _rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def _jsonl(path: pathlib.Path) -> list[dict]:
    return _rows(path.read_text())


@pytest.fixture(scope="module")
def trained(small_corpus, tmp_path_factory):
    """A 2-step int4+2:4 micro run with its evaluation, its export and the export's
    evaluation (predictions.jsonl, predictions_export.jsonl)."""
    cfg = tiny_config(small_corpus, policy="int4+2:4", steps=2)
    workdir = tmp_path_factory.mktemp("transcribe") / "run"
    train.train_and_evaluate(cfg, workdir)
    export.export_workdir(cfg, workdir)
    export.evaluate_export(cfg, workdir)
    return cfg, workdir


def _served_kernels(served) -> dict[str, np.ndarray]:
    """Policy path -> compressed kernel as served, every stacked layer decoded."""
    out = {}
    for name, rec in served.metadata["tensors"].items():
        if rec["kind"] == "float":
            continue
        if name in served.packed:
            out[rec["layer"]] = np.asarray(codec.decode_stacked(served.packed[name], len(rec["stack_shape"])))
        else:  # a grouped conv, decoded at load
            out[rec["layer"]] = np.asarray(served.floats[name])
    return out


@pytest.mark.slow
def test_a_trained_run_exports_its_kernels_and_decodes_like_its_checkpoint(trained, tmp_path):
    cfg, trained_dir = trained
    workdir = tmp_path / "run"
    shutil.copytree(trained_dir, workdir)  # this test deletes what serving must not need
    report = export.export_workdir(cfg, workdir)  # again, over the first export
    assert json.loads((workdir / "export/size.json").read_text()) == report
    # The export, read from the checkpoint layer by layer, serves its fake-quant kernels.
    setup = run.build(cfg, run.load_tokenizer(workdir).vocab_size)
    state = run.restore_latest(workdir, setup)
    served = export.load_export(workdir / "export", config=cfg)
    assert served.metadata["step"] == 2
    assert_bitwise(fake_quant_kernels(nnx.merge(setup.graphdef, state.params, state.rest)), _served_kernels(served))
    # Serving reads nothing but the export: no checkpoints, no workdir tokenizer.
    shutil.rmtree(workdir / "checkpoints")
    (workdir / "tokenizer.model").unlink()
    (workdir / "predictions_export.jsonl").unlink()
    got = export.evaluate_export(cfg, workdir)
    want = (workdir / "predictions.jsonl").read_text().splitlines()
    assert (workdir / "predictions_export.jsonl").read_text().splitlines() == want
    assert len({json.loads(r)["pred_text"] for r in want}) > 1  # not all-blank: a real check
    fq = json.loads((workdir / "eval.json").read_text())
    assert got["wer"] == fq["wer"] and got["cer"] == fq["cer"]
    assert json.loads((workdir / "eval_export.json").read_text())["num_utterances"] == 24


@pytest.mark.slow
def test_transcripts_from_a_run_are_its_evaluation_predictions(trained, small_corpus, tmp_path, capsys):
    _, workdir = trained
    out = tmp_path / "t.jsonl"
    cli.main(["transcribe", "--workdir", str(workdir), "--manifest", str(small_corpus["test"]), "--out", str(out)])
    rows, want = _jsonl(out), _jsonl(workdir / "predictions.jsonl")
    assert [list(r) for r in rows] == [ROW_KEYS] * len(want)
    assert [r["audio_filepath"] for r in rows] == [w["audio_filepath"] for w in want]
    assert [r["text"] for r in rows] == [w["pred_text"] for w in want]
    assert len({r["text"] for r in rows}) > 1  # not all alike: a real comparison
    durations = [u.duration for u in read_manifest(small_corpus["test"])]
    np.testing.assert_allclose([r["duration"] for r in rows], durations, atol=1e-3)
    assert all(r["seconds"] > 0 for r in rows)
    err = capsys.readouterr().err
    wer = json.loads((workdir / "eval.json").read_text())["wer"]
    assert f"WER {wer * 100:.2f}%" in err  # the manifest's texts are scored
    assert f"transcribe: {len(rows)}/{len(rows)} files" in err and "RTF" in err
    assert f"transcribe: {len(rows)} transcribed, 0 skipped;" in err


@pytest.mark.slow
def test_transcripts_from_an_export_alone_are_its_evaluation_predictions(trained, small_corpus, tmp_path, capsys):
    cfg, workdir = trained
    alone = tmp_path / "export"
    shutil.copytree(workdir / "export", alone)  # no run, no config, no checkpoint beside it
    meta = json.loads((alone / "metadata.json").read_text())
    assert meta["data"] == pipeline.serving_settings(cfg.data)
    # (in-process, not through the CLI, which sets this process's malloc thresholds)
    transcribe.transcribe_files([], export_dir=alone, manifests=[str(small_corpus["test"])])
    rows = _rows(capsys.readouterr().out)  # stdout: the JSON lines only
    want = _jsonl(workdir / "predictions_export.jsonl")
    assert [r["text"] for r in rows] == [w["pred_text"] for w in want]
    assert [r["audio_filepath"] for r in rows] == [w["audio_filepath"] for w in want]


@pytest.mark.slow
def test_an_export_without_data_settings_still_loads(trained, tmp_path, caplog):
    _, workdir = trained
    old = tmp_path / "export"
    shutil.copytree(workdir / "export", old)
    meta = json.loads((old / "metadata.json").read_text())
    del meta["data"]  # as written before the data settings were stored
    (old / "metadata.json").write_text(json.dumps(meta))
    rec = transcribe.from_export(old)
    assert rec.data.num_mel_bins == meta["model_config"]["num_mel_bins"]
    assert rec.features == pipeline.feature_config(rec.data)
    assert "no data settings" in caplog.text


def _bad_folder(root: pathlib.Path, corpus: dict) -> list[pathlib.Path]:
    """Two good wavs, a good flac in a subfolder, a corrupt, an empty and a text file
    named .wav, and a .txt; returns the audio paths in the order a folder scan gives."""
    src = [pathlib.Path(u.audio_filepath) for u in read_manifest(corpus["test"])[:3]]
    (root / "sub").mkdir(parents=True)
    shutil.copy(src[0], root / "a.wav")
    shutil.copy(src[1], root / "c.wav")
    audio, sr = sf.read(src[2])
    sf.write(root / "sub" / "d.flac", audio, sr)
    (root / "b_corrupt.wav").write_bytes(b"RIFF" + bytes(range(200)))
    (root / "b_empty.wav").write_bytes(b"")
    (root / "b_notes.wav").write_text("not audio, a text file named .wav\n")
    (root / "readme.txt").write_text("left out: not .wav or .flac\n")
    return sorted(p for p in root.rglob("*") if p.suffix in (".wav", ".flac"))


@pytest.mark.slow
def test_bad_files_are_reported_counted_and_the_others_transcribed(trained, small_corpus, tmp_path, capsys):
    _, workdir = trained
    files = _bad_folder(tmp_path / "in", small_corpus)
    out = tmp_path / "t.jsonl"
    cli.main(["transcribe", "--workdir", str(workdir), str(tmp_path / "in"), "--out", str(out)])
    rows = _jsonl(out)
    assert [r["audio_filepath"] for r in rows] == [str(p) for p in files]
    bad = {r["audio_filepath"]: r for r in rows if "error" in r}
    assert sorted(pathlib.Path(p).name for p in bad) == ["b_corrupt.wav", "b_empty.wav", "b_notes.wav"]
    assert all(list(r) == ERROR_KEYS for r in bad.values())
    assert "empty file" in bad[str(tmp_path / "in" / "b_empty.wav")]["error"]
    good = [r for r in rows if "error" not in r]
    assert len(good) == 3 and all(list(r) == ROW_KEYS and r["duration"] > 0 for r in good)
    err = capsys.readouterr().err
    for path, row in bad.items():
        assert f"transcribe: skipped {path}: {row['error']}" in err
    assert f"transcribe: {tmp_path / 'in'}: 1 file(s) not .wav/.flac left out" in err
    assert "transcribe: 3 transcribed, 3 skipped (audio_error 3);" in err
    assert "WER" not in err  # no references

    with pytest.raises(SystemExit) as e:  # nothing transcribable: a non-zero exit, said why
        cli.main(["transcribe", "--workdir", str(workdir), *[str(p) for p in files if "b_" in p.name]])
    assert e.value.code == "usmqs transcribe: no file transcribed: all 3 inputs were skipped (reasons above)"


@pytest.mark.slow
def test_a_long_file_is_decoded_in_windows_and_one_over_the_limit_refused(trained, small_corpus, tmp_path, capsys):
    cfg, workdir = trained
    parts = [sf.read(u.audio_filepath, dtype="float32")[0] for u in read_manifest(small_corpus["test"])]
    lengths = np.cumsum([p.size for p in parts])
    long = np.concatenate(parts[: np.searchsorted(lengths, 2.5 * cfg.data.max_frames * 160) + 1])
    assert len(transcribe.windows(long.size // 160, cfg.data.max_frames, 4)) >= 4
    sf.write(tmp_path / "long.wav", long, 16000, subtype="FLOAT")
    cli.main(["transcribe", "--workdir", str(workdir), str(tmp_path / "long.wav"), "--max-duration", "60"])
    (row,) = _rows(capsys.readouterr().out)
    assert row["text"] and row["duration"] == pytest.approx(long.size / 16000, abs=1e-3)

    with pytest.raises(SystemExit):
        cli.main(["transcribe", "--workdir", str(workdir), str(tmp_path / "long.wav"), "--max-duration", "5"])
    (row,) = _rows(capsys.readouterr().out)
    assert f"{long.size / 16000:.1f} s of audio: longer than the limit of 5 s" in row["error"]


# ------------------------------------------------------- without a trained model

# A model whose encoder frame j is input frame 4j + 3 (its first V mel bins as scores):
# every output frame depends on one input frame, so decoding a file in windows must give
# exactly the whole file's posteriors, frame for frame.


def _frame_model(vocab: int):
    def log_probs(features, feature_mask):
        frames = pipeline.subsampled_length(features.shape[1])
        valid = pipeline.subsampled_length(feature_mask.sum(axis=1))
        out_mask = np.arange(frames)[None, :] < valid[:, None]
        return features[:, 3 : 3 + 4 * frames : 4, :vocab], out_mask

    return log_probs


def _recognizer(tmp_path, max_frames: int, **data) -> transcribe.Recognizer:
    tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog"], tmp_path / "tok", 0, model_type="char")
    cfg = pipeline.default_data_config()
    cfg.update(dict(feature_norm="none", bucket_boundaries=(max_frames,), max_frames=max_frames, batch_size=2, **data))
    return transcribe.Recognizer(_frame_model(tok.vocab_size), tok, cfg, pipeline.feature_config(cfg), "frame model")


def _noise(path: pathlib.Path, seconds: float, sr: int = 16000, seed: int = 0) -> pathlib.Path:
    """White noise: the frame model's best token changes from one encoder frame to the
    next, so a window cut one frame off changes the text."""
    audio = 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * sr))
    sf.write(path, audio.astype(np.float32), sr, subtype="FLOAT")
    return path


@pytest.mark.parametrize("decoder", ["greedy", "beam"])
def test_windows_stitch_to_exactly_the_whole_files_posteriors(tmp_path, decoder):
    audio = _noise(tmp_path / "long.wav", 12.3)
    assert len(transcribe.windows(1228, 450, 4)) == 5
    texts = []
    for max_frames in (450, 2000):  # five windows; one
        out = io.StringIO()
        rec = _recognizer(tmp_path, max_frames)
        transcribe.transcribe(rec, [transcribe.Input(str(audio))], out, decoder=decoder, beam_size=4, log=None)
        (row,) = _rows(out.getvalue())
        texts.append(row["text"])
    assert len(texts[0]) > 100 and texts[0] == texts[1]


def test_window_cuts_cover_every_encoder_frame_once():
    for factor in (2, 4):
        for max_frames in (64, 250, 450):
            for frames in range(1, 2500, 13):
                spans = transcribe.windows(frames, max_frames, factor)
                kept = [s // factor + j for s, e, lo, hi in spans for j in range(lo, hi)]
                assert kept == list(range(pipeline.subsampled_length(frames, factor)))
                for s, e, lo, hi in spans:
                    assert e - s <= max_frames and s % factor == 0
                    assert 0 <= lo <= hi <= pipeline.subsampled_length(e - s, factor)


def test_8khz_stereo_is_read_as_its_16khz_mono_resampling(small_corpus, tmp_path):
    utt = read_manifest(small_corpus["test"])[0]
    mono16, sr = sf.read(utt.audio_filepath, dtype="float32")
    assert sr == 16000
    low = soxr.resample(mono16, 16000, 8000)
    stereo = tmp_path / "stereo8k.wav"
    sf.write(stereo, np.stack([low, low], axis=1), 8000, subtype="FLOAT")
    resampled = tmp_path / "mono16k.wav"  # what load_audio makes of it, as a 16 kHz mono file
    sf.write(resampled, load_audio(stereo), 16000, subtype="FLOAT")
    out = io.StringIO()
    inputs = [transcribe.Input(str(p)) for p in (stereo, resampled, utt.audio_filepath)]
    transcribe.transcribe(_recognizer(tmp_path, 450), inputs, out, log=None)
    rows = _rows(out.getvalue())
    assert rows[0]["text"] == rows[1]["text"] and len(rows[0]["text"]) > 10  # the frame model's
    assert rows[0]["duration"] == pytest.approx(rows[2]["duration"], abs=1e-3)


def test_manifest_rows_short_files_and_the_duration_limit(tmp_path):
    _noise(tmp_path / "ok.wav", 1.0)
    _noise(tmp_path / "blip.wav", 0.02)  # shorter than one 25 ms feature frame
    _noise(tmp_path / "long.wav", 3.0, sr=8000)
    (tmp_path / "m.jsonl").write_text(
        '{"audio_filepath": "ok.wav", "text": "the fox"}\n'
        "not json\n"
        '{"audio_filepath": "long.wav"}\n'
        '{"audio_filepath": "blip.wav", "text": null}\n'
    )
    inputs = transcribe.collect_inputs([], [str(tmp_path / "m.jsonl")])
    assert [x.reference for x in inputs] == ["the fox", None, None, None]
    out, log = io.StringIO(), io.StringIO()
    summary = transcribe.transcribe(_recognizer(tmp_path, 450), inputs, out, max_duration=2, log=log)
    rows = _rows(out.getvalue())
    assert [r["audio_filepath"] for r in rows] == [str(tmp_path / "ok.wav"), None, str(tmp_path / "long.wav"),
                                                   str(tmp_path / "blip.wav")]
    assert list(rows[0]) == ROW_KEYS and all(list(r) == ERROR_KEYS for r in rows[1:])
    assert rows[1]["error"].startswith(f"{tmp_path / 'm.jsonl'}:2: malformed manifest line: invalid JSON")
    assert rows[2]["error"] == "3.0 s of audio: longer than the limit of 2 s (--max-duration; the audio is decoded whole in memory)"
    assert rows[2]["duration"] == 3.0
    assert rows[3]["error"] == "20 ms of audio: the model needs at least 25 ms"
    assert summary.transcribed == 1 and summary.skipped == {"malformed_line": 1, "too_long": 1, "too_short": 1}
    assert summary.metrics["num_utterances"] == 1  # the one row with a reference
    assert summary.line().startswith("transcribe: 1 transcribed, 3 skipped (malformed_line 1, too_long 1, too_short 1); ")
    assert f"transcribe: skipped {rows[1]['error']}\n" in log.getvalue()
