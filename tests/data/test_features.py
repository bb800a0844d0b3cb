"""Log-mel features against librosa (an independent implementation) and first principles."""

import numpy as np
import pytest

from usmqs.data.features import FeatureConfig, compute_log_mel, mel_filterbank, num_frames, window_function

librosa = pytest.importorskip("librosa")

SR = 16000


def _noise(seconds=1.3, seed=0):
    return (0.1 * np.random.default_rng(seed).standard_normal(int(SR * seconds))).astype(np.float32)


def _librosa_log_mel(y, cfg: FeatureConfig):
    # librosa frames n_fft samples and centres the window inside; padding the signal by
    # (n_fft - win) / 2 on both sides makes its frame t hold our samples [t*hop, t*hop+win).
    d = (cfg.n_fft - cfg.win_length) // 2
    window = "hann" if cfg.window == "hann" else window_function(cfg)
    s = librosa.feature.melspectrogram(
        y=np.pad(y, (d, d)), sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
        win_length=cfg.win_length, window=window, center=False, power=2.0,
        n_mels=cfg.num_mel_bins, fmin=cfg.fmin, fmax=cfg.fmax,
        htk=cfg.mel_scale == "htk", norm=None if cfg.mel_norm == "none" else "slaney",
    )
    return np.log(np.maximum(s, cfg.log_floor)).T


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"window": "povey"},
        {"mel_scale": "slaney", "mel_norm": "slaney"},
        {"num_mel_bins": 128, "fmin": 20.0, "fmax": 7600.0},
        {"frame_ms": 32.0, "hop_ms": 12.5, "n_fft": 1024, "num_mel_bins": 40},
    ],
)
@pytest.mark.filterwarnings("ignore:Empty filters detected")  # 128 bins, n_fft 512: expected
def test_matches_librosa(overrides):
    y = _noise()
    cfg = FeatureConfig(preemphasis=0.0, **overrides)
    ours = compute_log_mel(y, cfg)
    ref = _librosa_log_mel(y, cfg)
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape == (num_frames(y.size, cfg), cfg.num_mel_bins)
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0)


def test_standardize_audio_makes_the_features_blind_to_offset_and_gain():
    y = _noise(seed=2).astype(np.float64)
    on = FeatureConfig(standardize_audio=True)
    want = compute_log_mel((y - y.mean()) / y.std(), FeatureConfig())
    for gain, offset in ((1.0, 0.0), (1.0, 0.05), (0.1, -0.2), (3.0, 0.01)):
        np.testing.assert_allclose(compute_log_mel(gain * y + offset, on), want, atol=1e-5, rtol=0)
    # Off (the default), an offset does change them: pre-emphasis only damps it.
    off = compute_log_mel(y + 0.2, FeatureConfig()) - compute_log_mel(y, FeatureConfig())
    assert np.abs(off).max() > 0.1
    # Constant audio has no scale to remove: it becomes silence, not NaN.
    assert np.isfinite(compute_log_mel(np.full(800, 0.3), on)).all()


def test_preemphasis_is_applied_to_the_whole_signal():
    y = _noise(seed=1)
    pre = np.concatenate([y[:1], y[1:] - 0.97 * y[:-1]])
    np.testing.assert_allclose(
        compute_log_mel(y, FeatureConfig(preemphasis=0.97)), _librosa_log_mel(pre, FeatureConfig(preemphasis=0.0)), atol=2e-4, rtol=0
    )


@pytest.mark.parametrize("n, t", [(0, 0), (399, 0), (400, 1), (559, 1), (560, 2), (16000, 98)])
def test_frame_count_formula(n, t):
    # T = 1 + (N - 400) // 160 at 16 kHz, 25 ms / 10 ms; 0 when shorter than one window.
    assert compute_log_mel(np.zeros(n, np.float32), FeatureConfig()).shape == (t, 80)
    assert FeatureConfig().num_frames(n) == t


def test_silence_hits_the_log_floor():
    np.testing.assert_array_equal(compute_log_mel(np.zeros(800, np.float32), FeatureConfig()), np.float32(np.log(1e-10)))


def test_tone_lands_in_the_right_mel_bin():
    cfg = FeatureConfig(preemphasis=0.0)
    t = np.arange(SR) / SR
    feats = compute_log_mel(np.sin(2 * np.pi * 1000.0 * t).astype(np.float32), cfg)
    fb = mel_filterbank(cfg)  # [K, F]
    k_1khz = round(1000.0 * cfg.n_fft / SR)  # FFT bin 32 is exactly 1 kHz
    assert np.all(feats.argmax(axis=1) == fb[k_1khz].argmax())


def test_filterbank_triangles_peak_at_one_and_cover_the_band():
    fb = mel_filterbank(FeatureConfig())
    assert fb.shape == (257, 80)
    assert fb.max() <= 1.0 + 1e-12 and np.all(fb.max(axis=0) > 0.3)  # no empty filter at 80 bins
    assert np.all(np.diff(fb.argmax(axis=0)) >= 0)  # centres increase with the bin index


def test_config_validation():
    with pytest.raises(ValueError, match="n_fft"):
        FeatureConfig(n_fft=256)  # 25 ms = 400 samples
    with pytest.raises(ValueError):
        FeatureConfig(fmax=9000.0)
    with pytest.raises(ValueError):
        FeatureConfig(window="rect")
    with pytest.raises(ValueError, match="mono"):
        compute_log_mel(np.zeros((800, 2), np.float32), FeatureConfig())
