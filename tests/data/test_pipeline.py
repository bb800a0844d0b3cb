"""The grain data path: preparation and skip accounting, caching, batches, checkpoints."""

import json
import os
import re

import numpy as np
import pytest
import soundfile as sf

from usmqs.data import pipeline
from usmqs.data.features import FeatureConfig, compute_log_mel
from usmqs.data.audio import load_audio
from usmqs.data.tokenizer import Tokenizer

SR = 16000
BOUNDS = (100, 200, 300)  # frames; L_b = 25, 50, 75
GOOD = [  # (seconds, text) -> frames = 1 + (N - 400) // 160
    (0.5, "the cat"),
    (0.6, "a dog"),
    (0.7, "the dog ran"),
    (0.8, "cats ran"),
    (0.9, "a cat sat"),
    (1.2, "the rat sat on the mat"),
    (1.5, "A dog, a cat!"),  # written as 8 kHz stereo: accepted through resampling
    (1.8, "dogs and cats"),
    (2.2, "the cat sat on a dog"),
    (2.6, "a rat and a cat ran"),
]
STEREO_8K = 6  # index into GOOD
TRAIN_SKIPS = {
    "audio_error": 4,  # missing, empty, corrupt, truncated
    "empty_transcript": 1,
    "unknown_chars": 1,
    "labels_too_long": 1,
    "malformed_line": 1,
    "too_long": 1,
}


def _tone(seconds, sr=SR, freq=440.0, seed=0):
    t = np.arange(int(round(seconds * sr))) / sr
    noise = 0.01 * np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def _write_corpus(root):
    """Manifest of the GOOD utterances with every kind of bad line mixed in.

    Returns (manifest path, {line: description}); good lines are listed in order."""
    root.mkdir(parents=True, exist_ok=True)
    rows, good_lines = [], []

    def add(row):
        rows.append(row if isinstance(row, str) else json.dumps(row))
        return len(rows)

    def wav(name, seconds, sr=SR, channels=1, seed=0):
        audio = _tone(seconds, sr, 300.0 + 40 * seed, seed)
        if channels == 2:
            audio = np.stack([audio, 0.5 * audio], axis=1)
        sf.write(root / name, audio, sr, subtype="PCM_16")
        return name

    for i, (sec, text) in enumerate(GOOD[:3]):
        good_lines.append(add({"audio_filepath": wav(f"g{i}.wav", sec, seed=i), "text": text, "duration": sec}))
    bad = {}
    bad[add({"audio_filepath": "missing.wav", "text": "the cat", "duration": 1.0})] = "audio_error"
    (root / "empty.wav").write_bytes(b"")
    bad[add({"audio_filepath": "empty.wav", "text": "the cat", "duration": 1.0})] = "audio_error"
    (root / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    bad[add({"audio_filepath": "corrupt.wav", "text": "the cat", "duration": 1.0})] = "audio_error"
    wav("trunc.wav", 1.0)
    data = (root / "trunc.wav").read_bytes()
    (root / "trunc.wav").write_bytes(data[: len(data) // 2])
    bad[add({"audio_filepath": "trunc.wav", "text": "the cat", "duration": 1.0})] = "audio_error"
    for i, (sec, text) in enumerate(GOOD[3:6], start=3):
        good_lines.append(add({"audio_filepath": wav(f"g{i}.wav", sec, seed=i), "text": text, "duration": sec}))
    # Characters outside [a-z0-9'] are removed by normalize_text, so "€ 漢" is empty...
    bad[add({"audio_filepath": wav("e.wav", 1.0), "text": "€ 漢 !!", "duration": 1.0})] = "empty_transcript"
    # ...and an unknown character must be one that survives it: '7' is in no train text.
    bad[add({"audio_filepath": wav("u.wav", 1.0), "text": "the cat 7", "duration": 1.0})] = "unknown_chars"
    # 0.3 s = 28 frames -> 7 encoder frames < 8 char labels of "the cat".
    bad[add({"audio_filepath": wav("short.wav", 0.3), "text": "the cat", "duration": 0.3})] = "labels_too_long"
    bad[add('{"audio_filepath": "g0.wav", "text": ')] = "malformed_line"
    # 3.5 s = 348 frames > max_frames = 300.
    bad[add({"audio_filepath": wav("long.wav", 3.5), "text": "the cat", "duration": 3.5})] = "too_long"
    for i, (sec, text) in enumerate(GOOD[6:], start=6):
        name = wav(f"g{i}.wav", sec, sr=8000, channels=2, seed=i) if i == STEREO_8K else wav(f"g{i}.wav", sec, seed=i)
        good_lines.append(add({"audio_filepath": name, "text": text, "duration": sec}))
    manifest = root / "train.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    return str(manifest), good_lines, bad


def _cfg(**overrides):
    cfg = pipeline.default_data_config()
    cfg.bucket_boundaries = BOUNDS
    cfg.max_frames = 300
    cfg.batch_size = 4
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    manifest, good_lines, bad = _write_corpus(root)
    from usmqs.data.text import normalize_text

    tok = Tokenizer.train([normalize_text(t) for _, t in GOOD], root / "tokenizer", 0, model_type="char")
    split = pipeline.prepare_split(manifest, tok, _cfg(), root / "cache", train=True)
    return {"root": root, "manifest": manifest, "good": good_lines, "bad": bad, "tok": tok, "split": split}


def _take(it, n):
    return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------- preparation


def test_skip_counts_by_reason_and_good_ones_kept(corpus):
    split = corpus["split"]
    assert split.skipped == TRAIN_SKIPS
    assert split.num_examples == len(GOOD)
    assert [m["line"] for m in split.metadata] == corpus["good"]
    assert {e["line"]: e["reason"] for e in split.skip_log} == corpus["bad"]
    assert not split.from_cache and split.warnings == {}
    assert [m["text"] for m in split.metadata][STEREO_8K] == "a dog a cat"  # normalized
    expected_frames = [1 + (round(sec * SR) - 400) // 160 for sec, _ in GOOD]
    assert [m["num_frames"] for m in split.metadata] == expected_frames
    for m in split.metadata:
        assert os.path.isabs(m["audio_filepath"])
        assert m["num_labels"] == len(corpus["tok"].encode(m["text"]))


def test_records_hold_features_and_labels(corpus):
    split, tok = corpus["split"], corpus["tok"]
    import grain

    source = grain.sources.ArrayRecordDataSource(list(split.paths))
    assert len(source) == split.num_examples
    for i in (0, STEREO_8K):
        ex = pipeline.decode_example(source[i])
        m = split.metadata[i]
        ref = compute_log_mel(load_audio(m["audio_filepath"]), FeatureConfig(num_mel_bins=80))
        assert ex["index"] == i and ex["features"].dtype == np.float16
        np.testing.assert_allclose(ex["features"].astype(np.float32), ref, atol=2e-2, rtol=1e-3)
        assert tok.decode(ex["labels"]) == m["text"]


def test_skip_report_names_reasons_and_lines(corpus):
    report = pipeline.skip_report(corpus["split"])
    assert f"kept {len(GOOD)} of {len(GOOD) + sum(TRAIN_SKIPS.values())}" in report
    for reason, count in TRAIN_SKIPS.items():
        assert re.search(rf"{reason}\s+{count}\s", report), reason
    missing_line = min(line for line, r in corpus["bad"].items() if r == "audio_error")
    assert f"{corpus['manifest']}:{missing_line}:" in report


def test_error_mode_raises_at_the_first_bad_line(corpus, tmp_path):
    manifest = corpus["manifest"]
    first_bad = min(corpus["bad"])
    cfg = _cfg(on_bad_input="error")
    with pytest.raises(ValueError, match=rf"{re.escape(manifest)}:{first_bad}: audio_error: .*missing\.wav"):
        pipeline.prepare_split(manifest, corpus["tok"], cfg, tmp_path / "fresh", train=True)
    assert not any(p.suffix in (".json", ".array_record") for p in (tmp_path / "fresh").iterdir())
    # A cached split with skips also refuses to load in error mode.
    with pytest.raises(ValueError, match=rf"{re.escape(manifest)}:{first_bad}: audio_error"):
        pipeline.prepare_split(manifest, corpus["tok"], cfg, corpus["root"] / "cache", train=True)


def test_error_mode_malformed_line(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")  # never reached: line 1 is checked first
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('[1, 2]\n{"audio_filepath": "a.wav", "text": "x"}\n')
    tok = Tokenizer.train(["x"], tmp_path / "t", 0, model_type="char")
    with pytest.raises(ValueError, match=rf"{re.escape(str(manifest))}:1: malformed_line"):
        pipeline.prepare_split(manifest, tok, _cfg(on_bad_input="error"), tmp_path / "c", train=True)


def test_second_prepare_is_a_cache_hit(corpus, monkeypatch):
    split = corpus["split"]
    mtimes = [os.stat(p).st_mtime_ns for p in (*split.paths, split.metadata_path)]

    def no_decoding(*args, **kwargs):
        raise AssertionError("audio decoded on a cache hit")

    monkeypatch.setattr(pipeline, "load_audio", no_decoding)
    again = pipeline.prepare_split(corpus["manifest"], corpus["tok"], _cfg(), corpus["root"] / "cache", train=True)
    assert again.from_cache and again.paths == split.paths and again.key == split.key
    assert again.metadata == split.metadata and again.skipped == split.skipped
    assert [os.stat(p).st_mtime_ns for p in (*split.paths, split.metadata_path)] == mtimes


def test_cache_key_follows_features_tokenizer_and_audio(corpus, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(corpus["root"], root, ignore=shutil.ignore_patterns("cache"))
    manifest, tok, cache = str(root / "train.jsonl"), corpus["tok"], tmp_path / "cache"
    base = pipeline.prepare_split(manifest, tok, _cfg(), cache, train=True)
    assert not base.from_cache
    assert pipeline.prepare_split(manifest, tok, _cfg(), cache, train=True).from_cache
    assert not pipeline.prepare_split(manifest, tok, _cfg(num_mel_bins=40), cache, train=True).from_cache
    other_tok = Tokenizer.train(["the cat sat", "a dog ran"], tmp_path / "t2", 0, model_type="char")
    assert not pipeline.prepare_split(manifest, other_tok, _cfg(), cache, train=True).from_cache
    sf.write(root / "g0.wav", _tone(0.55), SR)  # audio rewritten in place
    assert not pipeline.prepare_split(manifest, tok, _cfg(), cache, train=True).from_cache


def test_parallel_preparation_matches_inline(corpus, tmp_path):
    par = pipeline.prepare_split(
        corpus["manifest"], corpus["tok"], _cfg(num_workers=2), tmp_path / "par", train=True
    )
    seq = corpus["split"]
    assert par.key == seq.key and par.metadata == seq.metadata and par.skipped == seq.skipped
    import grain

    a, b = grain.sources.ArrayRecordDataSource(list(par.paths)), grain.sources.ArrayRecordDataSource(list(seq.paths))
    assert all(a[i] == b[i] for i in range(len(a)))


class _Killed(Exception):
    pass


def test_shards_of_two_processes_make_the_same_split_and_an_interrupted_one_resumes(corpus, tmp_path, monkeypatch):
    """Process 1 of 2 prepares its shards and dies before the others finish; a rerun
    (one process) prepares only the shards that are missing. The split equals the one
    prepared in one go: metadata, skip report, records, and the training batches."""
    cfg, cache = _cfg(prepare_shard_lines=3), tmp_path / "sharded"
    lines = []
    process = pipeline._process
    monkeypatch.setattr(pipeline, "_process", lambda utt, *a: lines.append(utt.line) or process(utt, *a))

    def killed():
        raise _Killed

    with pytest.raises(_Killed):
        pipeline.prepare_split(corpus["manifest"], corpus["tok"], cfg, cache, train=True,
                               process_index=1, process_count=2, barrier=killed)
    first, lines[:] = list(lines), []
    split = pipeline.prepare_split(corpus["manifest"], corpus["tok"], cfg, cache, train=True)
    shard_of = lambda line: (line - 1) // 3  # noqa: E731 (lines count from 1, no blank lines)
    assert first and {shard_of(l) % 2 for l in first} == {1}  # process 1's shards only
    assert lines and {shard_of(l) % 2 for l in lines} == {0}  # the rerun: the rest only
    seq = corpus["split"]
    assert len(split.paths) > 2 and len(seq.paths) == 1
    assert split.metadata == seq.metadata and split.skipped == seq.skipped
    assert [e["line"] for e in split.skip_log] == [e["line"] for e in seq.skip_log]
    import grain

    a, b = (grain.sources.ArrayRecordDataSource(list(x.paths)) for x in (split, seq))
    assert len(a) == len(b) and all(pipeline.decode_example(a[i])["features"].tobytes()
                                     == pipeline.decode_example(b[i])["features"].tobytes() for i in range(len(a)))
    it_a, it_b = (pipeline.make_train_iterator(x, cfg, seed=3) for x in (split, seq))
    for _ in range(3):
        ba, bb = next(it_a), next(it_b)
        for k in bb:
            np.testing.assert_array_equal(ba[k], bb[k], err_msg=k)


def test_preparation_computes_with_one_blas_thread_and_restores_the_setting(corpus, tmp_path, monkeypatch):
    """Several preparing processes on one host must not each spin a BLAS thread per core
    (bench/prepare_shards.py: 3.5x slower); the limit holds only while preparing."""
    import threadpoolctl

    blas = lambda: {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}  # noqa: E731
    before, seen = blas(), []
    process = pipeline._process
    monkeypatch.setattr(pipeline, "_process", lambda *a: seen.append(blas()) or process(*a))
    pipeline.prepare_split(corpus["manifest"], corpus["tok"], _cfg(), tmp_path / "cache", train=True)
    assert seen and all(s == {1} for s in seen)
    assert blas() == before


def test_eval_split_keeps_scorable_utterances(corpus):
    split = pipeline.prepare_split(corpus["manifest"], corpus["tok"], _cfg(), corpus["root"] / "cache", train=False)
    unusable = {"audio_error": 4, "empty_transcript": 1, "malformed_line": 1}
    assert split.skipped == unusable
    assert split.warnings == {"unknown_chars": 1, "labels_too_long": 1, "too_long": 1}
    assert split.num_examples == len(GOOD) + 3
    seen = []
    for batch in pipeline.eval_batches(split, _cfg()):
        b, t, f = batch["features"].shape
        assert b == 4 and f == 80 and batch["labels"].shape == (4, pipeline.subsampled_length(t))
        assert t in BOUNDS or t % BOUNDS[-1] == 0  # 348 frames -> padded to 600
        for row, idx in enumerate(batch["example_index"]):
            if idx < 0:
                assert not batch["feature_mask"][row].any() and not batch["label_mask"][row].any()
                assert not batch["features"][row].any()
                continue
            seen.append(int(idx))
            frames = split.metadata[idx]["num_frames"]
            assert batch["feature_mask"][row].sum() == frames <= t
            assert not batch["features"][row, frames:].any()
    assert sorted(seen) == list(range(split.num_examples))  # every example exactly once
    again = [b["example_index"].tolist() for b in pipeline.eval_batches(split, _cfg())]
    assert again == [b["example_index"].tolist() for b in pipeline.eval_batches(split, _cfg())]


def test_feature_normalization_per_utterance_and_bin():
    rng = np.random.default_rng(0)
    feats = (rng.standard_normal((50, 8)) * 3 - 7).astype(np.float16)
    out = pipeline.normalize_features(feats, "utterance")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=0), 1.0, atol=1e-3)
    np.testing.assert_array_equal(pipeline.normalize_features(feats, "none"), feats.astype(np.float32))
    with pytest.raises(ValueError, match="feature_norm"):
        pipeline.normalize_features(feats, "global")


def test_eval_batches_are_the_stored_features(corpus):
    split = corpus["split"]
    batch = next(iter(pipeline.eval_batches(split, _cfg())))
    import grain

    source = grain.sources.ArrayRecordDataSource(list(split.paths))
    for row, idx in enumerate(batch["example_index"]):
        ex = pipeline.decode_example(source[int(idx)])
        t, n = ex["features"].shape[0], ex["labels"].size
        expected = pipeline.normalize_features(ex["features"], _cfg().feature_norm)
        np.testing.assert_array_equal(batch["features"][row, :t], expected)
        np.testing.assert_array_equal(batch["labels"][row, :n], ex["labels"])
        assert batch["label_mask"][row].sum() == n and not batch["labels"][row, n:].any()


def test_an_audio_split_keeps_the_same_examples_and_batches_the_same_rows(corpus):
    """data.features_on_device: FLAC audio records, the same skips, frame counts and
    batches as the feature split; its own cache entry."""
    feats, cfg = corpus["split"], _cfg(features_on_device=True)
    split = pipeline.prepare_split(corpus["manifest"], corpus["tok"], cfg, corpus["root"] / "cache", train=True)
    assert split.stores_audio and not feats.stores_audio and split.key != feats.key
    assert (split.skipped, split.warnings) == (feats.skipped, feats.warnings)
    assert [{k: v for k, v in m.items() if k != "num_samples"} for m in split.metadata] == feats.metadata
    import grain

    source = grain.sources.ArrayRecordDataSource(list(split.paths))
    for i in (0, STEREO_8K):  # lossless 16-bit PCM of the decoded (resampled) audio
        ex, m = pipeline.decode_example(source[i]), split.metadata[i]
        assert ex["audio"].dtype == np.int16 and ex["audio"].size == m["num_samples"]
        np.testing.assert_array_equal(ex["audio"], np.round(load_audio(m["audio_filepath"]) * 32768).astype(np.int16))
    for cfg_ in (cfg, _cfg()):
        cfg_.spec_augment.enabled = False
    a, b = pipeline.make_train_iterator(split, cfg, seed=3), pipeline.make_train_iterator(feats, _cfg(), seed=3)
    for audio_batch, feature_batch in zip(_take(a, 3), _take(b, 3)):
        assert set(audio_batch) == {"audio", "num_samples", "labels", "label_mask", "example_index"}
        for k in ("labels", "label_mask", "example_index"):
            np.testing.assert_array_equal(audio_batch[k], feature_batch[k])
        frames = feature_batch["features"].shape[1]
        assert audio_batch["audio"].shape[1] == pipeline.batch_samples(frames, cfg)
        fcfg = pipeline.feature_config(cfg)
        got = [fcfg.num_frames(int(n)) for n in audio_batch["num_samples"]]
        assert got == feature_batch["feature_mask"].sum(axis=1).tolist()
    eval_batch = next(iter(pipeline.eval_batches(split, cfg)))
    assert eval_batch["audio"].dtype == np.int16 and eval_batch["num_samples"].dtype == np.int32


# ----------------------------------------------------------------------- train batches


def test_train_batches_layout_and_masks(corpus):
    split, tok = corpus["split"], corpus["tok"]
    cfg = _cfg()
    cfg.spec_augment.enabled = False
    shapes = set(pipeline.batch_shapes(cfg))
    assert shapes == {(100, 25), (200, 50), (300, 75)}
    it = pipeline.make_train_iterator(split, cfg, seed=3)
    n_epoch = 3  # ceil(10 / 4): leftovers of the buckets (5, 3, 2 examples) are merged
    seen = set()
    for batch in _take(it, 2 * n_epoch):
        assert set(batch) == {"features", "feature_mask", "labels", "label_mask", "example_index"}
        assert batch["features"].dtype == np.float32 and batch["labels"].dtype == np.int32
        assert batch["feature_mask"].dtype == bool and batch["label_mask"].dtype == bool
        b, t, f = batch["features"].shape
        assert (b, f) == (4, 80) and (t, batch["labels"].shape[1]) in shapes
        for row, idx in enumerate(batch["example_index"]):
            m = split.metadata[idx]
            seen.add(int(idx))
            assert batch["feature_mask"][row].tolist() == [i < m["num_frames"] for i in range(t)]
            assert batch["label_mask"][row].sum() == m["num_labels"]
            assert not batch["features"][row, m["num_frames"]:].any()
            assert not batch["labels"][row, m["num_labels"]:].any()
            assert tok.decode(batch["labels"][row][batch["label_mask"][row]]) == m["text"]
        # The smallest bucket that holds the batch's longest utterance.
        longest = max(split.metadata[i]["num_frames"] for i in batch["example_index"])
        assert t == min(x for x in BOUNDS if x >= longest)
    assert seen == set(range(split.num_examples))


def test_every_example_once_per_epoch_at_least(corpus):
    split, cfg = corpus["split"], _cfg()
    n_epoch = -(-split.num_examples // cfg.batch_size)  # bucket leftovers are merged
    it = pipeline.make_train_iterator(split, cfg, seed=0)
    epochs = [[b["example_index"].tolist() for b in _take(it, n_epoch)] for _ in range(2)]
    for epoch in epochs:
        assert set(i for b in epoch for i in b) == set(range(split.num_examples))
    assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_restoring_the_iterator_state_gives_identical_batches(corpus):
    split, cfg = corpus["split"], _cfg()  # SpecAugment on: its randomness must resume too
    it = pipeline.make_train_iterator(split, cfg, seed=5)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a JSON checkpoint stores
    expected = _take(it, 6)
    fresh = pipeline.make_train_iterator(split, cfg, seed=5)
    fresh.set_state(state)
    for a, b in zip(expected, _take(fresh, 6)):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    augmented = expected[0]
    m = augmented["feature_mask"]
    assert (augmented["features"][m] == 0.0).any()  # masks were applied inside valid frames


def test_seed_changes_order(corpus):
    split, cfg = corpus["split"], _cfg()
    a = [b["example_index"].tolist() for b in _take(pipeline.make_train_iterator(split, cfg, seed=1), 4)]
    b = [b["example_index"].tolist() for b in _take(pipeline.make_train_iterator(split, cfg, seed=1), 4)]
    c = [b["example_index"].tolist() for b in _take(pipeline.make_train_iterator(split, cfg, seed=2), 4)]
    assert a == b and a != c


def test_per_process_shards_are_disjoint_and_cover_the_global_batch(corpus):
    split, cfg = corpus["split"], _cfg()
    n = 2 * -(-split.num_examples // cfg.batch_size)
    whole = _take(pipeline.make_train_iterator(split, cfg, seed=7), n)
    shards = [_take(pipeline.make_train_iterator(split, cfg, seed=7, process_index=p, process_count=2), n) for p in (0, 1)]
    covered = set()
    for step in range(n):
        p0, p1 = shards[0][step], shards[1][step]
        assert p0["features"].shape == p1["features"].shape == (2, *whole[step]["features"].shape[1:])
        assert p0["labels"].shape == p1["labels"].shape
        ids0, ids1 = p0["example_index"].tolist(), p1["example_index"].tolist()
        assert not set(ids0) & set(ids1)
        assert sorted(ids0 + ids1) == sorted(whole[step]["example_index"].tolist())
        # Rows [p::2] of the global batch, augmentation included.
        for p, shard in enumerate((p0, p1)):
            for k in shard:
                np.testing.assert_array_equal(shard[k], whole[step][k][p::2])
        covered |= set(ids0) | set(ids1)
    assert covered == set(range(split.num_examples))
    with pytest.raises(ValueError, match="process_count"):
        pipeline.make_train_iterator(split, _cfg(batch_size=3), seed=0, process_count=2)


# --------------------------------------------------------------------- small functions


def test_subsampled_length_matches_two_padded_stride2_convs():
    def conv(t):  # 3-wide kernel, stride 2, one zero frame padded each side: ceil(t / 2)
        return (t + 2 - 3) // 2 + 1

    for t in range(0, 400):
        assert pipeline.subsampled_length(t) == conv(conv(t)) == -(-t // 4)
    assert pipeline.subsampled_length(1600) == 400
    np.testing.assert_array_equal(pipeline.subsampled_length(np.array([7, 13, 18, 100, 1600])), [2, 4, 5, 25, 400])
    assert pipeline.subsampled_length(100, 8) == conv(conv(conv(100))) == 13


def test_ctc_min_frames_counts_repeats():
    assert pipeline.ctc_min_frames([]) == 0
    assert pipeline.ctc_min_frames([3, 4, 5]) == 3
    assert pipeline.ctc_min_frames([3, 3, 4, 4, 4]) == 5 + 3


def test_example_serialization_round_trip():
    feats = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    rec = pipeline.encode_example(42, feats, [5, 6, 7])
    ex = pipeline.decode_example(rec)
    assert ex["index"] == 42 and ex["labels"].tolist() == [5, 6, 7] and ex["labels"].dtype == np.int32
    np.testing.assert_array_equal(ex["features"], feats.astype(np.float16))
    with pytest.raises(ValueError):
        pipeline.decode_example(b"XXXX" + rec[4:])


def test_config_validation():
    with pytest.raises(ValueError, match="max_frames"):
        pipeline.validate_data_config(_cfg(max_frames=400))
    with pytest.raises(ValueError, match="bucket_boundaries"):
        pipeline.validate_data_config(_cfg(bucket_boundaries=(200, 100)))
    with pytest.raises(ValueError, match="on_bad_input"):
        pipeline.validate_data_config(_cfg(on_bad_input="ignore"))
    pipeline.validate_data_config(pipeline.default_data_config())
