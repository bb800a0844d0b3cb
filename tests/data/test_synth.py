"""The embedded synthetic corpus: sentences, voices, augmentation, and small real corpora."""

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from usmqs.data import synth
from usmqs.data.manifest import read_manifest
from usmqs.data.synth import (
    DEFAULT_NUM_DEV,
    DEFAULT_NUM_TEST,
    DEFAULT_NUM_TRAIN,
    ESPEAK_LANGUAGES,
    ESPEAK_VARIANTS,
    FLITE_SHARE,
    MAX_TRAIN_COPIES,
    MAX_WORDS,
    Augmentation,
    Engine,
    NoiseKind,
    Voice,
    apply_augmentation,
    available_flite_voices,
    draw_augmentation,
    draw_voice,
    generate_sentences,
    number_to_words,
    parse_flite_voices,
    synthesize_corpus,
    voice_pool,
)
from usmqs.data.text import normalize_text

SR = 16000


# --- sentences ---------------------------------------------------------------------------


@pytest.mark.parametrize("n, words", [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (20, "twenty"), (25, "twenty five"),
    (99, "ninety nine"), (100, "one hundred"), (115, "one hundred fifteen"),
    (2024, "two thousand twenty four"), (999_999, "nine hundred ninety nine thousand nine "
                                                  "hundred ninety nine"),
])  # fmt: skip
def test_number_to_words(n, words):
    assert number_to_words(n) == words


def test_number_to_words_range():
    with pytest.raises(ValueError):
        number_to_words(-1)
    with pytest.raises(ValueError):
        number_to_words(1_000_000)


@pytest.fixture(scope="module")
def default_sentences():
    return generate_sentences(DEFAULT_NUM_TRAIN, DEFAULT_NUM_TEST, seed=0, num_dev=DEFAULT_NUM_DEV)


def test_default_sentences_split_properly(default_sentences):
    train, test, dev = default_sentences
    assert (len(train), len(test), len(dev)) == (DEFAULT_NUM_TRAIN, DEFAULT_NUM_TEST, DEFAULT_NUM_DEV)
    assert not set(train) & set(test), "train and test sentences must be disjoint"
    assert not set(dev) & (set(train) | set(test)), "dev sentences must be new to train and test"
    assert len(set(test)) == len(test) and len(set(dev)) == len(dev)
    train_vocab = {w for s in train for w in s.split()}
    assert {w for s in test + dev for w in s.split()} <= train_vocab
    assert 300 <= len(train_vocab) <= 600
    # One word error is at most 0.1 % WER on the default test and dev splits.
    assert sum(len(s.split()) for s in test) >= 1000
    assert sum(len(s.split()) for s in dev) >= 1000
    assert max(Counter(train).values()) <= MAX_TRAIN_COPIES
    for s in train + test + dev:
        assert normalize_text(s) == s and 1 <= len(s.split()) <= MAX_WORDS
    assert not any(ch.isdigit() for s in train for ch in s), "numbers must be spelled out"


def test_sentences_are_seeded(default_sentences):
    assert generate_sentences(200, 20, seed=0)[0] == default_sentences[0][:200]
    assert generate_sentences(200, 20, seed=1)[0] != default_sentences[0][:200]
    assert generate_sentences(200, 20, seed=3) == generate_sentences(200, 20, seed=3)
    # The dev split has a stream of its own: asking for it leaves train and test as they were.
    assert generate_sentences(200, 20, seed=3)[2] == []
    assert generate_sentences(200, 20, seed=3, num_dev=15)[:2] == generate_sentences(200, 20, seed=3)[:2]


def test_too_few_training_sentences_for_the_test_split():
    with pytest.raises(ValueError, match="test sentences"):
        generate_sentences(1, 50, seed=0)
    with pytest.raises(ValueError, match="dev sentences"):
        generate_sentences(1, 0, seed=0, num_dev=50)


# --- voices ------------------------------------------------------------------------------


def test_parse_flite_voices():
    listing = "Voices available: kal awb_time kal16 awb rms slt\n"
    assert parse_flite_voices(listing) == ["kal", "kal16", "awb", "rms", "slt"]
    assert parse_flite_voices("") == []


def test_voice_pool():
    espeak_only = voice_pool()
    assert len(espeak_only) == len(ESPEAK_LANGUAGES) * len(ESPEAK_VARIANTS)
    assert all(v.engine is Engine.ESPEAK for v in espeak_only)
    names = {v.name for v in espeak_only}
    assert {"en", "en-us+m3", "en-gb-x-rp+f4", "en-gb-scotland+m7", "en-029+f1"} <= names
    with_flite = voice_pool(["kal", "slt"])
    assert with_flite[-2:] == (Voice(Engine.FLITE, "kal"), Voice(Engine.FLITE, "slt"))


def test_draw_voice_is_deterministic_and_gives_flite_its_share():
    pool = voice_pool(["kal", "slt"])
    draws = [draw_voice(np.random.default_rng([7, i]), pool) for i in range(3000)]
    again = [draw_voice(np.random.default_rng([7, i]), pool) for i in range(3000)]
    assert draws == again
    flite = [d for d in draws if d.voice.engine is Engine.FLITE]
    assert abs(len(flite) / len(draws) - FLITE_SHARE) < 0.03
    assert {d.voice.name for d in flite} == {"kal", "slt"}
    assert len({d.voice for d in draws}) == len(pool)  # every voice gets used
    assert all(140 <= d.rate <= 220 and 25 <= d.pitch <= 75 for d in draws)


def test_draw_voice_without_flite_or_with_flite_only():
    rng = np.random.default_rng(0)
    assert all(draw_voice(rng, voice_pool()).voice.engine is Engine.ESPEAK
               for _ in range(500))
    only = (Voice(Engine.FLITE, "slt"),)
    assert all(draw_voice(rng, only).voice == only[0] for _ in range(20))


def test_available_flite_voices_without_flite(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert available_flite_voices() == []


# --- augmentation ------------------------------------------------------------------------


def _tone(seconds=1.0, sr=SR, freq=440.0):
    t = np.arange(int(sr * seconds)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _aug(**kw):
    base = dict(speed=1.0, lead_s=0.0, trail_s=0.0, reverb_rt60_s=None, reverb_wet=0.3,
                noise=NoiseKind.NONE, snr_db=20.0, peak_db=-6.0)
    return Augmentation(**{**base, **kw})


def test_draw_augmentation_ranges():
    augs = [draw_augmentation(np.random.default_rng([1, i])) for i in range(500)]
    assert all(0.9 <= a.speed <= 1.1 and -20 <= a.peak_db <= -1 for a in augs)
    noisy = [a for a in augs if a.noise is not NoiseKind.NONE]
    assert 0.7 < len(noisy) / len(augs) < 0.9
    assert all(10 <= a.snr_db <= 30 for a in noisy)
    assert {a.noise for a in noisy} == {NoiseKind.WHITE, NoiseKind.PINK, NoiseKind.BABBLE}
    assert 0.2 < sum(a.reverb_rt60_s is not None for a in augs) / len(augs) < 0.4


@pytest.mark.parametrize("speed", [0.9, 1.0, 1.1])
def test_speed_perturbation_changes_length_and_pitch(speed):
    out = apply_augmentation(_tone(1.0, sr=22050), 22050, _aug(speed=speed),
                             np.random.default_rng(0))
    assert abs(out.shape[0] - SR / speed) <= 2
    peak_hz = np.argmax(np.abs(np.fft.rfft(out))) * SR / out.shape[0]
    assert abs(peak_hz - 440 * speed) < 3


@pytest.mark.parametrize("kind", [NoiseKind.WHITE, NoiseKind.PINK, NoiseKind.BABBLE])
def test_noise_is_added_at_the_requested_snr(kind):
    clean = _tone(2.0)
    babble = np.random.default_rng(5).standard_normal(SR // 2)  # tiled to length
    out = apply_augmentation(clean, SR, _aug(noise=kind, snr_db=15.0),
                             np.random.default_rng(0), babble=babble).astype(np.float64)
    gain = out @ clean / (clean @ clean)  # noise is nearly orthogonal to the tone
    noise = out - gain * clean
    snr = 10 * np.log10(np.mean((gain * clean) ** 2) / np.mean(noise**2))
    assert snr == pytest.approx(15.0, abs=0.6)


def test_babble_needs_a_waveform():
    with pytest.raises(ValueError, match="babble"):
        apply_augmentation(_tone(), SR, _aug(noise=NoiseKind.BABBLE), np.random.default_rng(0))


def test_peak_level_padding_and_reverb():
    aug = _aug(lead_s=0.25, trail_s=0.1, reverb_rt60_s=0.4, peak_db=-3.0,
               noise=NoiseKind.WHITE, snr_db=30.0)
    out = apply_augmentation(_tone(1.0), SR, aug, np.random.default_rng(0))
    assert np.max(np.abs(out)) == pytest.approx(10 ** (-3 / 20), rel=1e-5)
    n = SR + int(0.25 * SR) + int(0.1 * SR)
    assert n <= out.shape[0] <= n + SR // 10
    lead = out[: int(0.2 * SR)]
    assert np.sqrt(np.mean(lead**2)) < 0.05 * np.sqrt(np.mean(out**2))  # only noise there
    dry = apply_augmentation(_tone(1.0), SR, _aug(lead_s=0.25, trail_s=0.1, peak_db=-3.0),
                             np.random.default_rng(0))
    tail = slice(int(1.25 * SR) + 400, int(1.3 * SR))  # just after the tone stops
    assert np.abs(out[tail]).max() > 20 * np.abs(dry[tail]).max()  # the reverb tail


def test_augmentation_is_deterministic():
    aug = draw_augmentation(np.random.default_rng(3))
    a = apply_augmentation(_tone(), 22050, aug, np.random.default_rng(9),
                           babble=np.ones(100))
    b = apply_augmentation(_tone(), 22050, aug, np.random.default_rng(9),
                           babble=np.ones(100))
    assert a.tobytes() == b.tobytes()


# --- real corpora (espeak-ng in worker processes) ------------------------------------------


def _tree_bytes(root):
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root) for f in files
    }


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """The same small corpus made with 2 workers and with 1, several blocks per split."""
    espeak_before = {m for m in sys.modules if "espeak" in m}
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synth, "BLOCK_SIZE", 8)  # 3 train blocks + 1 test block + 1 dev block
        for workers in (2, 1):
            folder = tmp_path_factory.mktemp(f"corpus{workers}")
            out[workers] = (folder, synthesize_corpus(folder, num_train=24, num_test=6, num_dev=5,
                                                      seed=3, num_workers=workers, flite=False))
    # espeak ran in the workers only, never in the calling process.
    assert {m for m in sys.modules if "espeak" in m} == espeak_before
    return out


def test_corpus_is_byte_identical_whatever_the_workers(corpora):
    (a, _), (b, _) = corpora[2], corpora[1]
    tree_a, tree_b = _tree_bytes(a), _tree_bytes(b)
    assert sorted(tree_a) == sorted(tree_b)
    assert len([p for p in tree_a if p.endswith(".wav")]) == 35
    differing = [p for p in tree_a if tree_a[p] != tree_b[p]]
    assert differing == []


def test_corpus_content(corpora):
    folder, manifests = corpora[2]
    assert manifests == {s: folder / f"{s}.jsonl" for s in ("train", "test", "dev")}
    train, test, dev = (read_manifest(manifests[s]) for s in ("train", "test", "dev"))
    assert (len(train), len(test), len(dev)) == (24, 6, 5)
    assert not {u.text for u in train} & {u.text for u in test}
    assert {w for u in test for w in u.text.split()} <= {w for u in train for w in u.text.split()}
    texts = tuple([u.text for u in split] for split in (train, test, dev))
    assert texts == generate_sentences(24, 6, seed=3, num_dev=5)
    for split in ("train", "dev"):
        for line in manifests[split].read_text().splitlines():
            assert json.loads(line)["audio_filepath"].startswith(f"audio/{split}/")  # relative
    for u in train + test + dev:
        info = sf.info(u.audio_filepath)
        assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "PCM_16")
        assert u.duration == info.frames / SR
        assert 0.5 < u.duration < 5.0
        audio, _ = sf.read(u.audio_filepath, dtype="float32")
        assert np.sqrt(np.mean(audio**2)) > 1e-3, f"{u.audio_filepath} is silent"
        assert np.max(np.abs(audio)) < 0.95
    meta = json.loads((folder / "corpus.json").read_text())
    assert meta["config"]["seed"] == 3 and meta["config"]["num_train"] == 24
    assert meta["stats"]["train"]["utterances"] == 24
    assert meta["stats"]["test"]["words"] == sum(len(u.text.split()) for u in test)
    assert list(meta["stats"]) == ["train", "test", "dev"]


def test_corpus_is_cached_and_redone_when_the_config_changes(tmp_path):
    kw = dict(num_train=16, num_test=2, num_dev=2, flite=False)
    first = synthesize_corpus(tmp_path, seed=0, **kw)
    marker = tmp_path / "corpus.json"
    stamps = {p: p.stat().st_mtime_ns for p in [marker, *first.values()]}
    wav = tmp_path / "audio" / "train" / "000000.wav"
    wav_stamp = wav.stat().st_mtime_ns
    assert synthesize_corpus(tmp_path, seed=0, **kw) == first
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert wav.stat().st_mtime_ns == wav_stamp
    before = first["train"].read_text()
    synthesize_corpus(tmp_path, seed=1, **kw)
    assert first["train"].read_text() != before
    assert json.loads(marker.read_text())["config"]["seed"] == 1


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def test_a_changed_split_is_redone_with_the_later_splits_only(tmp_path):
    kw = dict(num_train=16, seed=0, flite=False)
    manifests = synthesize_corpus(tmp_path, num_test=2, num_dev=2, **kw)
    audio = {s: tmp_path / "audio" / s for s in ("train", "test", "dev")}
    train_stamps, test_stamps = _mtimes(audio["train"]), _mtimes(audio["test"])
    texts = {s: manifests[s].read_text() for s in manifests}

    # A corpus made before the dev split existed: its marker has no num_dev, no dev files.
    marker = tmp_path / "corpus.json"
    old = json.loads(marker.read_text())
    del old["config"]["num_dev"], old["stats"]["dev"]
    marker.write_text(json.dumps(old))
    manifests["dev"].unlink()
    shutil.rmtree(audio["dev"])
    assert synthesize_corpus(tmp_path, num_test=2, num_dev=2, **kw) == manifests
    assert (_mtimes(audio["train"]), _mtimes(audio["test"])) == (train_stamps, test_stamps)
    assert {s: manifests[s].read_text() for s in manifests} == texts  # dev made as before
    assert json.loads(marker.read_text())["stats"]["dev"]["utterances"] == 2

    # More dev utterances: only dev is redone. Another test size: test and dev.
    synthesize_corpus(tmp_path, num_test=2, num_dev=3, **kw)
    assert (_mtimes(audio["train"]), _mtimes(audio["test"])) == (train_stamps, test_stamps)
    assert len(read_manifest(manifests["dev"])) == 3
    synthesize_corpus(tmp_path, num_test=3, num_dev=3, **kw)
    assert _mtimes(audio["train"]) == train_stamps and _mtimes(audio["test"]) != test_stamps
    assert manifests["train"].read_text() == texts["train"]
    assert len(read_manifest(manifests["test"])) == 3
    stats = json.loads(marker.read_text())["stats"]
    assert [stats[s]["utterances"] for s in ("train", "test", "dev")] == [16, 3, 3]


def test_concurrent_synthesis_into_one_folder_takes_turns(tmp_path):
    """Two runs starting on a fresh machine ask for the same corpus at once: one makes it,
    the other waits and finds it made (no half-deleted audio, one rendering)."""
    script = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        from usmqs.data.synth import synthesize_corpus
        synthesize_corpus(sys.argv[1], num_train=16, num_test=2, num_dev=2, seed=0, flite=False)
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "shared")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum("synthesized" in log for log in logs) == 1, logs
    synthesize_corpus(tmp_path / "alone", num_train=16, num_test=2, num_dev=2, seed=0, flite=False)
    assert _tree_bytes(tmp_path / "shared") == _tree_bytes(tmp_path / "alone")


def test_zero_sizes_mean_the_defaults_and_negative_sizes_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "DEFAULT_NUM_TRAIN", 12)
    monkeypatch.setattr(synth, "DEFAULT_NUM_TEST", 3)
    monkeypatch.setattr(synth, "DEFAULT_NUM_DEV", 2)
    manifests = synthesize_corpus(tmp_path, num_train=0, num_test=None, num_dev=0, flite=False)
    assert len(read_manifest(manifests["train"])) == 12
    assert len(read_manifest(manifests["test"])) == 3
    assert len(read_manifest(manifests["dev"])) == 2
    with pytest.raises(ValueError, match="sizes"):
        synthesize_corpus(tmp_path, num_train=-1, flite=False)


def test_flite_voices_join_when_flite_is_present(tmp_path):
    # A stand-in flite binary: lists voices, and "speaks" by copying an 8 kHz recording.
    recording = tmp_path / "speech.wav"
    t = np.arange(8000 * 1.2) / 8000
    sf.write(recording, (0.3 * np.sin(2 * np.pi * 200 * t) * np.sin(7 * t)).astype(np.float32),
             8000)
    log = tmp_path / "flite.log"
    fake = tmp_path / "bin" / "flite"
    fake.parent.mkdir()
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        echo "$@" >> {log}
        if [ "$1" = "-lv" ]; then echo "Voices available: kal awb_time slt"; exit 0; fi
        while [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done
        cp {recording} "$out"
    """))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    assert available_flite_voices(str(fake)) == ["kal", "slt"]

    out = tmp_path / "corpus"
    manifests = synthesize_corpus(out, num_train=16, num_test=4, num_dev=2, seed=0, flite=str(fake))
    voices = json.loads((out / "corpus.json").read_text())["config"]["voices"]
    assert voices[-2:] == ["flite:kal", "flite:slt"]
    calls = [line.split() for line in log.read_text().splitlines() if "-o" in line]
    assert 1 <= len(calls) <= 12  # a quarter of 20 utterances, give or take
    for call in calls:
        assert call[call.index("-voice") + 1] in {"kal", "slt"}
        assert any(arg.startswith("duration_stretch=") for arg in call)
    rows = read_manifest(manifests["train"]) + read_manifest(manifests["test"])
    assert all(sf.info(u.audio_filepath).samplerate == SR for u in rows)


def test_core_modules_do_not_load_espeak():
    code = (
        "import usmqs.data.audio, usmqs.data.manifest, usmqs.data.text, "
        "usmqs.data.librispeech, sys; "
        "assert not any('espeak' in m for m in sys.modules), "
        "[m for m in sys.modules if 'espeak' in m]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
