"""The on-device front end (`usmqs.data.features_jax`, `usmqs.data.specaugment_jax`)
against the host's numpy one: same frames, same log-mel within float32 tolerance, same
normalization, SpecAugment masks with the same statistics."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from usmqs.data import features as features_lib
from usmqs.data import features_jax, specaugment_jax
from usmqs.data.audio import load_audio, pcm16
from usmqs.data.pipeline import normalize_features
from usmqs.data.specaugment import spec_augment

CONFIGS = {
    "hann-htk-80": features_lib.FeatureConfig(),
    "povey-slaney-128": features_lib.FeatureConfig(window="povey", mel_scale="slaney", mel_norm="slaney", num_mel_bins=128),
    # The mean over each row's own samples, not over its padding.
    "standardize-audio": features_lib.FeatureConfig(standardize_audio=True),
}
# 0, fewer than a window, exactly one, one + a partial frame, frame boundaries, 1 s + 77.
NOISE_LENGTHS = (0, 399, 400, 401, 559, 560, 561, 16077)


def _utterances(corpus, n=6) -> list[np.ndarray]:
    manifest = pathlib.Path(corpus["test"])
    rows = [json.loads(line) for line in manifest.read_text().splitlines()[:n]]
    speech = [pcm16(load_audio(manifest.parent / r["audio_filepath"])) for r in rows]
    rng = np.random.default_rng(0)
    noise = [pcm16(rng.uniform(-0.5, 0.5, n)) for n in NOISE_LENGTHS]
    return speech + noise


def _padded(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    audio = np.zeros((len(rows), max(len(r) for r in rows)), np.int16)
    for i, r in enumerate(rows):
        audio[i, : len(r)] = r
    return audio, np.asarray([len(r) for r in rows], np.int32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_log_mel_equals_the_host_features(small_corpus, name):
    cfg = CONFIGS[name]
    rows = _utterances(small_corpus)
    audio, lengths = _padded(rows)
    feats, mask = jax.jit(lambda a, n: features_jax.log_mel(a, n, cfg))(audio, lengths)
    feats, mask = np.asarray(feats), np.asarray(mask)
    assert feats.shape[:2] == (len(rows), cfg.num_frames(audio.shape[1]))
    diffs, levels = [], []
    for i, pcm in enumerate(rows):
        host = features_lib.compute_log_mel(pcm / 32768.0, cfg)  # float64 arithmetic
        t = host.shape[0]
        assert t == cfg.num_frames(len(pcm)) and mask[i].sum() == t and mask[i, :t].all()
        assert not feats[i, t:].any()  # invalid frames are 0
        diffs.append(np.abs(feats[i, :t] - host).ravel())
        levels.append(host.ravel())
    diffs, levels = np.concatenate(diffs), np.concatenate(levels)
    # float32 vs float64: the largest differences sit in the lowest mel bins of frames
    # where they are ~90 dB below the frame's peak (log-mel below -15: float32 FFT
    # rounding); the float16 cache itself is 8e-3 off the float64 features.
    print(f"{name}: max |jax - host| = {diffs.max():.2e} ({diffs[levels > -15].max():.2e} above -15), "
          f"99.9% within {np.quantile(diffs, 0.999):.2e}")
    assert diffs[levels > -15].max() < 1e-3
    assert np.quantile(diffs, 0.999) < 2e-4


def test_frame_counts_and_batch_widths_agree_with_the_host():
    cfg = features_lib.FeatureConfig()
    n = np.arange(0, 2000, 7)
    assert np.asarray(features_jax.num_frames(n, cfg)).tolist() == [cfg.num_frames(int(k)) for k in n]
    for frames in (1, 2, 250, 450):
        s = features_lib.samples_for_frames(frames, cfg)
        assert cfg.num_frames(s) == frames and cfg.num_frames(s - 1) == frames - 1


def test_normalization_equals_the_host_over_valid_frames():
    rng = np.random.default_rng(1)
    feats = rng.normal(3.0, 2.0, (3, 50, 8)).astype(np.float32)
    valid = np.asarray([50, 17, 0])
    mask = np.arange(50)[None] < valid[:, None]
    out = np.asarray(features_jax.normalize(jnp.asarray(feats), jnp.asarray(mask), "utterance"))
    for i, v in enumerate(valid[:2]):
        np.testing.assert_allclose(out[i, :v], normalize_features(feats[i, :v], "utterance"), atol=1e-5)
    assert not out[1, 17:].any() and not out[2].any()


SA = dict(freq_masks=2, freq_width=15, time_masks=2, time_width_ratio=0.05, time_masks_per_frame=0.0)


def _masked(x):
    """(masked channels, masked frames) of a ones-tensor after masking (value 0)."""
    zero = x == 0
    return zero.all(axis=-2), zero.all(axis=-1)


@pytest.mark.parametrize("adaptive", [0.0, 0.01])
def test_spec_augment_masks_have_the_host_statistics(adaptive):
    settings = {**SA, "time_masks_per_frame": adaptive, "time_masks": 4 if adaptive else 2}
    rows, frames, bins = 512, 300, 80
    valid = np.random.default_rng(2).integers(0, frames + 1, rows)
    ones = jnp.ones((rows, frames, bins))
    out = np.asarray(jax.jit(lambda x, v, k: specaugment_jax.spec_augment(x, v, k, **settings))(
        ones, jnp.asarray(valid), jax.random.PRNGKey(0)))
    host = np.stack([spec_augment(np.ones((frames, bins)), int(v), np.random.default_rng([0, r]), **settings)
                     for r, v in enumerate(valid)])
    for i, v in enumerate(valid):  # padding rows untouched, masks inside the valid frames
        assert (out[i, v:] == 1).all()
    stats = {}
    for name, x in (("jax", out), ("host", host)):
        fraction_f, fraction_t = [], []
        for i, v in enumerate(valid):
            if v:
                ch, fr = _masked(x[i, :v])
                fraction_f.append(ch.mean())
                fraction_t.append(fr.mean())
        stats[name] = np.asarray(fraction_f), np.asarray(fraction_t)
    for k in range(2):  # mean masked fraction of channels, of frames: within 4 standard errors
        a, b = stats["jax"][k], stats["host"][k]
        se = np.sqrt(a.var() / a.size + b.var() / b.size)
        assert abs(a.mean() - b.mean()) < 4 * se + 1e-3, (k, a.mean(), b.mean())
        assert a.max() <= max(b.max(), 2 * SA["freq_width"] / bins if k == 0 else 1.0)


def test_front_end_augments_with_its_key_only():
    cfg = features_lib.FeatureConfig()
    audio = jnp.asarray(pcm16(np.random.default_rng(3).uniform(-0.3, 0.3, (2, 16000))))
    n = jnp.asarray([16000, 9000])
    fe = jax.jit(lambda k: features_jax.front_end(audio, n, cfg, norm="utterance", augment=SA, rng=k))
    plain, mask = jax.jit(lambda: features_jax.front_end(audio, n, cfg, norm="utterance"))()
    a, b = np.asarray(fe(jax.random.PRNGKey(0))[0]), np.asarray(fe(jax.random.PRNGKey(1))[0])
    assert np.array_equal(a, np.asarray(fe(jax.random.PRNGKey(0))[0]))  # deterministic
    assert not np.array_equal(a, b)
    # Every cell is either the unaugmented value or the mask value 0.
    assert np.all(np.isclose(a, np.asarray(plain), atol=1e-6) | (a == 0))
    assert not a[1, int(np.asarray(mask[1]).sum()):].any()
