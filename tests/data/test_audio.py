"""load_audio / write_audio: resampling, mixdown, and every way a file can be bad."""

import io
import struct

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from usmqs.data.audio import (
    SAMPLE_RATE, AudioError, audio_duration, decode_audio, load_audio, waveform, write_audio,
)


def _sine(freq, sr, seconds, channels=1, amplitude=0.5):
    t = np.arange(int(sr * seconds)) / sr
    x = (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def _peak_hz(x, sr):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.shape[0])))
    return np.argmax(spectrum) * sr / x.shape[0]


@pytest.mark.parametrize(
    "file_sr, freq, ext", [(44100, 440.0, "wav"), (8000, 1000.0, "flac"), (48000, 3000.0, "wav")]
)
def test_resampled_stereo_keeps_frequency_and_length(tmp_path, file_sr, freq, ext):
    path = tmp_path / f"tone.{ext}"
    sf.write(path, _sine(freq, file_sr, 1.5, channels=2), file_sr)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    expected = round(int(file_sr * 1.5) * SAMPLE_RATE / file_sr)
    assert abs(audio.shape[0] - expected) <= 1
    assert abs(_peak_hz(audio, SAMPLE_RATE) - freq) < 2.0
    # Amplitude survives the resampler (away from the filter's edge transients).
    assert np.max(np.abs(audio[1000:-1000])) == pytest.approx(0.5, abs=0.01)


def test_channels_are_averaged(tmp_path):
    left = _sine(300, SAMPLE_RATE, 0.5)
    right = _sine(700, SAMPLE_RATE, 0.5, amplitude=0.25)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), (left + right) / 2, atol=1e-6)


def test_six_channels_mixed_to_mono(tmp_path):
    x = np.random.default_rng(0).uniform(-0.5, 0.5, size=(4000, 6)).astype(np.float32)
    path = tmp_path / "surround.wav"
    sf.write(path, x, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), x.mean(axis=1), atol=1e-6)


def test_target_rate_argument(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, _sine(500, SAMPLE_RATE, 1.0), SAMPLE_RATE)
    audio = load_audio(path, target_sr=8000)
    assert audio.shape == (8000,)
    assert abs(_peak_hz(audio, 8000) - 500) < 2.0


@settings(max_examples=15, deadline=None)
@given(
    sr=st.sampled_from([8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000]),
    frames=st.integers(min_value=1, max_value=5000),
)
def test_output_length_follows_rate_ratio(tmp_path_factory, sr, frames):
    path = tmp_path_factory.mktemp("len") / "x.wav"
    sf.write(path, np.zeros(frames, np.float32) + 0.1, sr)
    n = load_audio(path).shape[0]
    assert abs(n - frames * SAMPLE_RATE / sr) <= 1


def test_write_audio_roundtrip_clips_and_is_deterministic(tmp_path):
    x = np.concatenate([_sine(440, SAMPLE_RATE, 0.25), [1.7, -3.0]]).astype(np.float32)
    a, b = write_audio(tmp_path / "a.wav", x), write_audio(tmp_path / "sub" / "b.wav", x)
    assert a.read_bytes() == b.read_bytes()
    y = load_audio(a)
    assert y.shape == x.shape
    assert np.max(np.abs(y)) <= 1.0
    np.testing.assert_allclose(y[:-2], x[:-2], atol=1e-4)  # 16-bit PCM
    assert sf.info(a).subtype == "PCM_16" and sf.info(a).samplerate == SAMPLE_RATE
    flac = write_audio(tmp_path / "c.flac", x[:-2], 22050)
    assert sf.info(flac).format == "FLAC" and sf.info(flac).samplerate == 22050


def test_write_audio_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="non-finite"):
        write_audio(tmp_path / "a.wav", np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="shape"):
        write_audio(tmp_path / "a.wav", np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="format"):
        write_audio(tmp_path / "a.xyz", np.zeros(10))


def test_audio_duration(tmp_path):
    path = tmp_path / "a.flac"
    sf.write(path, np.zeros(22050 * 2, np.float32), 22050)
    assert audio_duration(path) == pytest.approx(2.0)
    with pytest.raises(AudioError, match="no such file"):
        audio_duration(tmp_path / "missing.flac")


# --- bad files ---------------------------------------------------------------------------


@pytest.fixture
def wav_bytes(tmp_path):
    path = tmp_path / "good.wav"
    sf.write(path, _sine(440, SAMPLE_RATE, 1.0), SAMPLE_RATE, subtype="PCM_16")
    return path.read_bytes()


@pytest.fixture
def flac_bytes(tmp_path):
    path = tmp_path / "good.flac"
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, SAMPLE_RATE * 2).astype(np.float32)
    sf.write(path, noise, SAMPLE_RATE)
    return path.read_bytes()


def _wav(samples, subtype):
    buf = io.BytesIO()
    sf.write(buf, np.asarray(samples, np.float32), SAMPLE_RATE, format="WAV", subtype=subtype)
    return buf.getvalue()


def _nan_wav():
    return _wav([0.0, np.nan, 0.1], "FLOAT")


def _zero_frame_wav():
    return _wav(np.zeros(0), "PCM_16")


BAD_FILES = {
    "empty.wav": (lambda w, f: b"", "empty"),
    "zero_frames.wav": (lambda w, f: _zero_frame_wav(), "no samples"),
    "header_only.wav": (lambda w, f: w[:44], "truncated"),
    "cut_header.wav": (lambda w, f: w[:20], "truncated"),
    "cut_riff.wav": (lambda w, f: w[:10], "unreadable"),
    "cut_data.wav": (lambda w, f: w[: len(w) // 2], "truncated"),
    "cut_data_odd.wav": (lambda w, f: w[:1001], "truncated"),
    "garbage.wav": (lambda w, f: b"this is not audio at all" * 20, "unreadable"),
    "random.flac": (lambda w, f: np.random.default_rng(1).bytes(3000), "unreadable"),
    "cut.flac": (lambda w, f: f[: len(f) // 2], "unreadable|truncated"),
    "cut_header.flac": (lambda w, f: f[:60], "unreadable|truncated"),
    "nan.wav": (lambda w, f: _nan_wav(), "non-finite"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_raises_audio_error_naming_it(tmp_path, wav_bytes, flac_bytes, name):
    make, reason = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(make(wav_bytes, flac_bytes))
    with pytest.raises(AudioError, match=reason) as info:
        load_audio(path)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)
    assert isinstance(info.value, ValueError)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(AudioError, match="no such file") as info:
        load_audio(tmp_path / "nope.wav")
    assert str(tmp_path / "nope.wav") in str(info.value)
    with pytest.raises(AudioError, match="directory"):
        load_audio(tmp_path)


def test_streaming_wav_with_unknown_data_size_is_accepted(tmp_path, wav_bytes):
    # Pipe writers (ffmpeg to stdout) leave 0xFFFFFFFF as the data size.
    data_at = wav_bytes.index(b"data")
    patched = (
        wav_bytes[: data_at + 4] + struct.pack("<I", 0xFFFFFFFF) + wav_bytes[data_at + 8 :]
    )
    path = tmp_path / "stream.wav"
    path.write_bytes(patched)
    assert load_audio(path).shape == (SAMPLE_RATE,)


def test_audio_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(AudioError("/x.wav", "broken")))
    assert (e.path, e.reason, str(e)) == ("/x.wav", "broken", "/x.wav: broken")


def test_audio_in_memory_decodes_as_its_file(tmp_path):
    """`decode_audio` (encoded bytes, e.g. a TFDS record's flac) and `waveform` (samples)
    give what `load_audio` gives for the same file; bad bytes name their source."""
    rng = np.random.default_rng(0)
    pcm = (rng.uniform(-0.5, 0.5, (12000, 2)) * 32767).astype(np.int16)
    path = tmp_path / "a.flac"
    sf.write(path, pcm, 8000, subtype="PCM_16")
    want = load_audio(path)
    np.testing.assert_array_equal(decode_audio(path.read_bytes(), "rec[3]"), want)
    np.testing.assert_array_equal(waveform(pcm, 8000, "rec[3]"), want)
    for data, reason in ((b"", "empty audio"), (path.read_bytes()[:-300], "(truncated|unreadable)"), (b"junk" * 50, "unreadable")):
        with pytest.raises(AudioError, match=rf"^rec\[3\]: {reason}"):
            decode_audio(data, "rec[3]")
    with pytest.raises(AudioError, match="no samples"):
        waveform(np.zeros(0, np.int16), 16000, "rec[3]")
