"""Log-mel filterbank features, computed on the host in numpy (data pipeline side).

For a mono waveform ``x[n]`` at ``sample_rate`` Hz (float32, nominally in [-1, 1]):

0. With ``standardize_audio`` (off by default): ``x = (x - mean(x)) / std(x)`` over the
   utterance (``x - mean(x)`` when it is constant). sherpa-onnx's raw-waveform path
   standardizes the waveform this way before the model sees it, and standardizing twice
   is standardizing once, so a run trained with it decodes there as it does here: no DC
   offset, and no gain that the log floor would see (README "ONNX").
1. Pre-emphasis over the whole signal (not per frame as Kaldi does):
   ``y[0] = x[0]``, ``y[n] = x[n] - a * x[n-1]`` with ``a = preemphasis`` (0 disables it).
2. Framing without centering/padding: frame ``t`` holds ``y[t*hop : t*hop + win]`` where
   ``win = round(sample_rate * frame_ms / 1000)`` (400 at 16 kHz / 25 ms) and
   ``hop = round(sample_rate * hop_ms / 1000)`` (160 at 16 kHz / 10 ms). The number of
   frames is ``T = 1 + (N - win) // hop`` for ``N >= win`` and ``T = 0`` otherwise; trailing
   samples that do not fill a frame are dropped.
3. Window ``w[n]`` of length ``win`` (``hann``: periodic Hann, as scipy/librosa;
   ``povey``: Kaldi's ``(0.5 - 0.5 cos(2 pi n / (win - 1)))**0.85``), zero-padded at the end
   to ``n_fft`` and transformed: ``P[t, k] = |rfft(w * frame_t, n_fft)[k]|**2``,
   ``k = 0 .. n_fft // 2``.
4. Mel filterbank ``M [n_fft//2 + 1, F]``: ``F + 2`` points equally spaced on the mel scale
   between ``fmin`` and ``fmax``; filter ``m`` is the triangle, linear in Hz, rising from
   point ``m`` to 1 at point ``m+1`` and falling to 0 at point ``m+2`` (librosa's
   construction). Mel scale ``htk`` (default): ``mel = 2595 log10(1 + f / 700)``;
   ``slaney``: linear (``3 f / 200``) below 1 kHz, logarithmic above (Slaney's Auditory
   Toolbox / librosa default). ``mel_norm=None`` (default) leaves every triangle with peak
   1; ``"slaney"`` scales each to unit area (``2 / (f_{m+2} - f_m)``).
5. ``features[t, m] = log(max(sum_k P[t, k] M[k, m], log_floor))`` (natural log,
   ``log_floor = 1e-10``), returned as float32 ``[T, F]``.

With the defaults this equals ``log(max(librosa.feature.melspectrogram(y=pad(y, d, d),
sr=16000, n_fft=512, hop_length=160, win_length=400, window="hann", center=False,
power=2, n_mels=80, htk=True, norm=None), 1e-10)).T`` with ``d = (n_fft - win) // 2``: librosa
centres the window inside each ``n_fft`` frame, which is a circular shift that leaves the
power spectrum unchanged once the signal is padded by ``d`` on each side.

Note: with ``n_fft=512`` at 16 kHz the FFT bins are 31.25 Hz apart; 128 HTK mel bins from
0 Hz give low triangles narrower than that, some of which hold no bin and stay at the
floor. 80 bins do not have that problem.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

import numpy as np


class Window(enum.StrEnum):
    HANN = "hann"  # periodic Hann (scipy.signal.get_window("hann", win, fftbins=True))
    POVEY = "povey"  # Kaldi's default: symmetric Hann raised to 0.85


class MelScale(enum.StrEnum):
    HTK = "htk"  # mel = 2595 log10(1 + f/700)
    SLANEY = "slaney"  # linear below 1 kHz, log above


class MelNorm(enum.StrEnum):
    NONE = "none"  # triangles peak at 1
    SLANEY = "slaney"  # triangles have unit area


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureConfig:
    """Log-mel front end parameters; see the module docstring for the equations."""

    sample_rate: int = 16000  # Hz; audio must already be resampled to this rate
    num_mel_bins: int = 80  # F, feature dimension
    frame_ms: float = 25.0  # analysis window length
    hop_ms: float = 10.0  # frame shift
    n_fft: int = 512  # FFT size, >= window length in samples; window zero-padded at end
    preemphasis: float = 0.97  # a in y[n] = x[n] - a x[n-1]; 0 disables
    window: Window = Window.HANN
    mel_scale: MelScale = MelScale.HTK
    mel_norm: MelNorm = MelNorm.NONE
    fmin: float = 0.0  # Hz, lower edge of the lowest triangle
    fmax: float | None = None  # Hz, upper edge of the highest triangle; None = sample_rate/2
    log_floor: float = 1e-10  # log(max(mel_energy, log_floor))
    standardize_audio: bool = False  # zero mean, unit variance per utterance first (step 0)

    def __post_init__(self):
        # Coerce strings to enums so configs can say window="povey".
        object.__setattr__(self, "window", Window(self.window))
        object.__setattr__(self, "mel_scale", MelScale(self.mel_scale))
        object.__setattr__(self, "mel_norm", MelNorm("none" if self.mel_norm is None else self.mel_norm))
        if self.win_length < 1 or self.hop_length < 1:
            raise ValueError(f"frame_ms/hop_ms give empty windows: {self}")
        if self.n_fft < self.win_length:
            raise ValueError(f"n_fft={self.n_fft} < window length {self.win_length} samples")
        if not 0.0 <= self.fmin < self.upper_hz <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= fmin < fmax <= sample_rate/2, got {self}")
        if self.num_mel_bins < 1:
            raise ValueError("num_mel_bins must be positive")

    @property
    def win_length(self) -> int:
        """Window length in samples (400 for 25 ms at 16 kHz)."""
        return int(round(self.sample_rate * self.frame_ms / 1000.0))

    @property
    def hop_length(self) -> int:
        """Frame shift in samples (160 for 10 ms at 16 kHz)."""
        return int(round(self.sample_rate * self.hop_ms / 1000.0))

    @property
    def upper_hz(self) -> float:
        return float(self.sample_rate / 2 if self.fmax is None else self.fmax)

    def num_frames(self, num_samples: int) -> int:
        """``T = 1 + (N - win) // hop`` if ``N >= win`` else 0."""
        return num_frames(num_samples, self)

    def to_dict(self) -> dict:
        """JSON-serializable dict (enums as their string values); used in cache keys."""
        return {k: (str(v) if isinstance(v, enum.Enum) else v) for k, v in dataclasses.asdict(self).items()}


def num_frames(num_samples: int, config: FeatureConfig) -> int:
    """Frames produced for ``num_samples`` samples: ``1 + (N - win) // hop``, or 0 if N < win."""
    win, hop = config.win_length, config.hop_length
    return 0 if num_samples < win else 1 + (num_samples - win) // hop


def samples_for_frames(frames: int, config: FeatureConfig) -> int:
    """The fewest samples that give `frames` frames: ``(frames - 1) * hop + win`` (0 for 0).
    Audio padded to this length gives exactly `frames` frames."""
    return 0 if frames <= 0 else (int(frames) - 1) * config.hop_length + config.win_length


def _hz_to_mel(f: np.ndarray, scale: MelScale) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    if scale is MelScale.HTK:
        return 2595.0 * np.log10(1.0 + f / 700.0)
    # Slaney: linear part 3 mels per 200 Hz up to 1 kHz (= 15 mel), then log steps of
    # ln(6.4)/27 per mel.
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    lin = f / f_sp
    log = min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log, lin)


def _mel_to_hz(m: np.ndarray, scale: MelScale) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if scale is MelScale.HTK:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@functools.lru_cache(maxsize=16)
def _mel_matrix(config: FeatureConfig) -> np.ndarray:
    lo, hi = _hz_to_mel(np.array([config.fmin, config.upper_hz]), config.mel_scale)
    edges_hz = _mel_to_hz(np.linspace(lo, hi, config.num_mel_bins + 2), config.mel_scale)
    fft_hz = np.linspace(0.0, config.sample_rate / 2, config.n_fft // 2 + 1)
    widths = np.diff(edges_hz)  # [F + 1]
    ramps = edges_hz[:, None] - fft_hz[None, :]  # [F + 2, K]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))  # [F, K]
    if config.mel_norm is MelNorm.SLANEY:
        weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    weights.setflags(write=False)
    return weights.T  # [K, F]


def mel_filterbank(config: FeatureConfig) -> np.ndarray:
    """Mel weights ``[n_fft // 2 + 1, num_mel_bins]`` float64 (read-only), see module doc."""
    return _mel_matrix(config)


@functools.lru_cache(maxsize=16)
def _window(kind: Window, length: int) -> np.ndarray:
    n = np.arange(length, dtype=np.float64)
    if kind is Window.HANN:
        w = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)
    else:
        w = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / (length - 1))) ** 0.85
    w.setflags(write=False)
    return w


def window_function(config: FeatureConfig) -> np.ndarray:
    """Analysis window ``[win_length]`` float64 (read-only)."""
    return _window(config.window, config.win_length)


def compute_log_mel(audio: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """Log-mel features ``[T, F]`` float32 of mono ``audio [N]`` at ``config.sample_rate``.

    ``T = 1 + (N - win) // hop`` (0 when ``N < win``). See the module docstring.
    """
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono [N], got shape {audio.shape}")
    x = audio.astype(np.float64)
    if config.standardize_audio and x.size:
        x = x - x.mean()
        std = np.sqrt(np.mean(np.square(x)))
        if std > 0:
            x = x / std
    if config.preemphasis:
        x = np.concatenate([x[:1], x[1:] - config.preemphasis * x[:-1]])
    t = num_frames(x.shape[0], config)
    f = config.num_mel_bins
    if t == 0:
        return np.zeros((0, f), np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(x, config.win_length)[:: config.hop_length][:t]
    spectrum = np.fft.rfft(frames * window_function(config), n=config.n_fft, axis=-1)
    power = spectrum.real**2 + spectrum.imag**2  # [T, K]
    mel = power @ mel_filterbank(config)  # [T, F]
    return np.log(np.maximum(mel, config.log_floor)).astype(np.float32)


