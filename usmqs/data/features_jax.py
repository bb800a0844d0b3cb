"""The log-mel front end in jax.numpy, for computing features inside the jitted step
(``data.features_on_device``): the twin of `usmqs.data.features`, batched and padded.

Input: 16-bit PCM rows ``audio [B, S]`` (int16, zero beyond each row's samples) and
``num_samples [B]`` (``N_b``, the valid samples of row b). Per row, as the host does
(module docstring of `usmqs.data.features`):

1. ``x = audio / 32768`` (float32); pre-emphasis ``y[0] = x[0]``,
   ``y[n] = x[n] - a x[n-1]``.
2. Frames without centering: frame ``t`` is ``y[t*hop : t*hop + win]``, for
   ``t < T_max = 1 + (S - win) // hop``, cut by a strided reshape (no gather): ``y`` is
   padded to a multiple of ``hop``, viewed as ``[S / hop, hop]`` chunks, and
   ``ceil(win / hop)`` shifted copies are concatenated and cut to ``win``.
3. ``P = |rfft(w * frame, n_fft)|**2`` with the host's window ``w``.
4. ``log(max(P @ M, log_floor))`` with the host's mel matrix ``M`` (the matmul at
   ``Precision.HIGHEST``: TPUs otherwise multiply float32 in bfloat16).

Row b has ``T_b = 1 + (N_b - win) // hop`` valid frames (0 when ``N_b < win``), exactly the
host's count; frame ``t < T_b`` ends at ``t*hop + win <= N_b``, so padding never reaches a
valid frame. ``feature_mask[b, t] = t < T_b``; invalid frames are 0.

Differences from the host features: float32 instead of float64 arithmetic, and the audio
is the int16 PCM that the cache stores (the host featurizes the decoded float samples,
which are the same numbers for 16-bit sources at 16 kHz) while the host cache stores the
features as float16 (about 4e-3 absolute at |log-mel| ~ 10). README "Data" has the
measured differences.

`normalize` is `usmqs.data.pipeline.normalize_features` over each row's valid frames
('utterance': per bin ``(x - mean) / (std + 1e-5)``, population std; 'none'), and
`front_end` the whole host chain of a training batch: log-mel -> normalization ->
SpecAugment (`usmqs.data.specaugment_jax`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from usmqs.data import features as features_lib
from usmqs.data import specaugment_jax

PCM_SCALE = 32768.0  # int16 full scale: x = pcm / 32768 in [-1, 1)


def num_frames(num_samples: jax.Array, config: features_lib.FeatureConfig) -> jax.Array:
    """`features_lib.num_frames` of integer arrays: ``1 + (N - win) // hop``, 0 if N < win."""
    n = jnp.asarray(num_samples, jnp.int32)
    win, hop = config.win_length, config.hop_length
    return jnp.where(n >= win, 1 + (n - win) // hop, 0)


def _frames(y: jax.Array, count: int, config: features_lib.FeatureConfig) -> jax.Array:
    """``[B, S] -> [B, count, win]``: frame t = ``y[:, t*hop : t*hop + win]``."""
    win, hop = config.win_length, config.hop_length
    shifts = -(-win // hop)  # chunks of `hop` samples a frame spans
    total = (count + shifts - 1) * hop
    y = jnp.pad(y, ((0, 0), (0, max(total - y.shape[1], 0))))[:, :total]
    chunks = y.reshape(y.shape[0], count + shifts - 1, hop)
    return jnp.concatenate([chunks[:, k : k + count] for k in range(shifts)], axis=-1)[..., :win]


def log_mel(
    audio: jax.Array, num_samples: jax.Array, config: features_lib.FeatureConfig
) -> tuple[jax.Array, jax.Array]:
    """``audio [B, S]`` int16 PCM (or float in [-1, 1]), ``num_samples [B]`` ->
    (log-mel ``[B, T_max, F]`` float32, zero on invalid frames; mask ``[B, T_max]`` bool)."""
    x = audio.astype(jnp.float32)
    if jnp.issubdtype(audio.dtype, jnp.integer):
        x = x / PCM_SCALE
    if config.standardize_audio:  # each row over its valid samples; the padding stays 0
        valid = jnp.arange(x.shape[1])[None, :] < num_samples[:, None]
        count = jnp.maximum(num_samples[:, None], 1).astype(jnp.float32)
        x = jnp.where(valid, x - jnp.sum(jnp.where(valid, x, 0.0), axis=1, keepdims=True) / count, 0.0)
        std = jnp.sqrt(jnp.sum(jnp.square(x), axis=1, keepdims=True) / count)
        x = x / jnp.where(std > 0, std, 1.0)  # a constant row stays x - mean
    if config.preemphasis:
        x = jnp.concatenate([x[:, :1], x[:, 1:] - jnp.float32(config.preemphasis) * x[:, :-1]], axis=1)
    count = features_lib.num_frames(x.shape[1], config)
    mask = jnp.arange(count)[None, :] < num_frames(num_samples, config)[:, None]
    if count == 0:
        return jnp.zeros((x.shape[0], 0, config.num_mel_bins), jnp.float32), mask
    window = jnp.asarray(features_lib.window_function(config), jnp.float32)
    spectrum = jnp.fft.rfft(_frames(x, count, config) * window, n=config.n_fft, axis=-1)
    power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)  # [B, T, K]
    mel_matrix = jnp.asarray(features_lib.mel_filterbank(config), jnp.float32)
    mel = jnp.matmul(power, mel_matrix, precision=jax.lax.Precision.HIGHEST)
    feats = jnp.log(jnp.maximum(mel, jnp.float32(config.log_floor)))
    return jnp.where(mask[..., None], feats, 0.0), mask


def normalize(features: jax.Array, mask: jax.Array, kind: str) -> jax.Array:
    """Per-row, per-bin mean/variance normalization over the valid frames ('utterance'),
    or none ('none'); invalid frames stay 0."""
    if kind == "none":
        return features
    if kind != "utterance":
        raise ValueError(f"data.feature_norm must be 'utterance' or 'none', got {kind!r}")
    m = mask[..., None].astype(features.dtype)
    count = jnp.maximum(m.sum(axis=1, keepdims=True), 1.0)
    mean = (features * m).sum(axis=1, keepdims=True) / count
    var = (jnp.square(features - mean) * m).sum(axis=1, keepdims=True) / count
    return jnp.where(mask[..., None], (features - mean) / (jnp.sqrt(var) + 1e-5), 0.0)


def front_end(
    audio: jax.Array,
    num_samples: jax.Array,
    config: features_lib.FeatureConfig,
    *,
    norm: str,
    augment: dict | None = None,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """What the host pipeline does to a batch, on the device: (features ``[B, T, F]``,
    feature_mask ``[B, T]``) of PCM ``audio [B, S]``: `log_mel`, `normalize` with `norm`
    and, given `augment` (`specaugment_jax.spec_augment` keywords) and a key `rng`,
    SpecAugment after normalization (so masks hold the utterance mean, as on the host)."""
    feats, mask = log_mel(audio, num_samples, config)
    feats = normalize(feats, mask, norm)
    if augment is not None and rng is not None:
        feats = specaugment_jax.spec_augment(feats, mask.sum(axis=1), rng, **augment)
    return feats, mask
