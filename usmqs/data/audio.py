"""Audio decoding and writing: any wav/flac in, 16 kHz mono float32 out.

Every audio file the pipeline touches goes through :func:`load_audio`, so that a bad file
fails in one place with one error type (:class:`AudioError`) whose message names the file.

Conventions: waveforms are ``float32`` arrays of shape ``[N]`` (samples, mono) with values
in ``[-1, 1]``; sample rates are in Hz.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

__all__ = [
    "SAMPLE_RATE", "AudioError", "audio_duration", "decode_audio", "flac_bytes", "load_audio", "pcm16",
    "pcm16_from_flac", "waveform", "write_audio",
]

SAMPLE_RATE = 16000
"""The model's sample rate in Hz; every waveform is resampled to it."""


class AudioError(ValueError):
    """An audio file is missing, empty, corrupt, truncated or otherwise unreadable.

    Attributes:
      path: the offending file, as given.
      reason: what is wrong with it, in words.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # Keeps the error picklable across multiprocessing workers (the default reduce
        # would call __init__ with the formatted message only).
        return (type(self), (self.path, self.reason))


def _wav_truncation(path: str) -> str | None:
    """Returns why a RIFF/WAVE file is truncated, or None when it looks complete.

    libsndfile silently clips a WAV whose data chunk is shorter than its header declares
    (it returns the frames that are there), which would hide a half-copied file. We walk
    the RIFF chunks ourselves and compare the declared data size with the bytes present.
    Streaming writers put 0 or 0xFFFFFFFF in the size field when they cannot seek back;
    those sizes mean "unknown" and are accepted.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
            return None  # not a plain RIFF/WAVE (e.g. RF64, W64, FLAC): libsndfile's call
        endian = "<" if head[:4] == b"RIFF" else ">"
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk_id, chunk_size = struct.unpack(endian + "4sI", f.read(8))
            if chunk_id == b"data":
                if chunk_size in (0, 0xFFFFFFFF):
                    return None
                available = size - (pos + 8)
                if chunk_size > available:
                    return (
                        f"truncated WAV data: header declares {chunk_size} bytes, "
                        f"file holds {available}"
                    )
                return None
            if pos + 8 + chunk_size > size:
                name = chunk_id.decode("latin-1")
                return f"truncated WAV: {name!r} chunk runs past the end of the file"
            pos += 8 + chunk_size + (chunk_size & 1)  # chunks are padded to even sizes
        return "truncated WAV: no data chunk"


def load_audio(path: str | os.PathLike, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decodes an audio file to a mono waveform at ``target_sr``.

    Args:
      path: a wav or flac file (anything libsndfile reads), any sample rate, any number
        of channels, integer or float samples.
      target_sr: output sample rate in Hz.

    Returns:
      ``float32 [N]`` in ``[-1, 1]`` (float files are passed through unclipped),
      ``N = round(frames * target_sr / file_sr)``. Channels are averaged (mixdown);
      resampling uses soxr's high-quality filter.

    Raises:
      AudioError: the file is missing, empty (0 bytes or 0 samples), corrupt, truncated,
        unreadable, or holds non-finite samples. The message names the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(path, "no such file")
    if os.path.isdir(path):
        raise AudioError(path, "is a directory, not an audio file")
    if os.path.getsize(path) == 0:
        raise AudioError(path, "empty file (0 bytes)")
    try:
        reason = _wav_truncation(path)
        if reason is not None:
            raise AudioError(path, reason)
        with sf.SoundFile(path) as f:
            declared, file_sr = f.frames, f.samplerate
            data = f.read(dtype="float32", always_2d=True)  # [frames, channels]
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, OSError, struct.error) as e:
        raise AudioError(path, f"unreadable audio ({e})") from e
    # FLAC cut exactly at a frame boundary decodes without error but short of the
    # STREAMINFO sample count (0 there means "unknown", hence the > 0).
    if 0 < data.shape[0] < declared:
        raise AudioError(path, f"truncated: decoded {data.shape[0]} of {declared} frames")
    return waveform(data, file_sr, path, target_sr)


def decode_audio(data: bytes, name: str, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """:func:`load_audio` for an encoded file held in memory (wav, flac, ...: what
    libsndfile reads); `name` names it in errors (e.g. a dataset record)."""
    if not data:
        raise AudioError(name, "empty audio (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            declared, file_sr = f.frames, f.samplerate
            decoded = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, struct.error) as e:
        raise AudioError(name, f"unreadable audio ({e})") from e
    if 0 < decoded.shape[0] < declared:
        raise AudioError(name, f"truncated: decoded {decoded.shape[0]} of {declared} frames")
    return waveform(decoded, file_sr, name, target_sr)


def pcm16(audio: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> 16-bit PCM ``round(32768 x)``, clipped to int16 (lossless
    for audio decoded from a 16-bit file: `load_audio` gives exactly ``pcm / 32768``)."""
    return np.clip(np.round(np.asarray(audio, np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def flac_bytes(pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Mono int16 ``pcm [N]`` as an in-memory FLAC file (lossless)."""
    buf = io.BytesIO()
    sf.write(buf, np.asarray(pcm, np.int16), sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def pcm16_from_flac(data: bytes) -> np.ndarray:
    """Inverse of :func:`flac_bytes`: the int16 samples ``[N]``."""
    samples, _ = sf.read(io.BytesIO(data), dtype="int16")
    return samples


def waveform(samples: np.ndarray, sample_rate: int, name: str, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decoded samples as :func:`load_audio` returns them: mono float32 at `target_sr`.

    Args:
      samples: ``[N]`` or ``[N, C]``; integer PCM (scaled by its type's full range, so
        int16 32767 -> ~1.0) or float (passed through unclipped).
      sample_rate: their rate in Hz.
      name: what they came from, for errors.
      target_sr: output sample rate in Hz.

    Raises:
      AudioError: no samples, or non-finite ones.
    """
    data = np.asarray(samples)
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2:
        raise AudioError(name, f"expected samples [N] or [N, channels], got shape {data.shape}")
    if np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float32) / np.float32(2 ** (8 * data.dtype.itemsize - 1))
    if data.shape[0] == 0:
        raise AudioError(name, "no samples (0 frames)")
    if not np.isfinite(data).all():
        raise AudioError(name, "non-finite samples (NaN or inf)")
    audio = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if sample_rate != target_sr:
        audio = soxr.resample(audio, sample_rate, target_sr, quality="HQ")
    return np.ascontiguousarray(audio, dtype=np.float32)


def audio_duration(path: str | os.PathLike) -> float:
    """Duration of an audio file in seconds, from its header (no decoding).

    Raises:
      AudioError: missing or unreadable file, or a header that declares 0 frames.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(path, "no such file")
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(path, f"unreadable audio ({e})") from e
    if info.frames <= 0:
        raise AudioError(path, "no samples (0 frames)")
    return info.frames / info.samplerate


def write_audio(
    path: str | os.PathLike, audio: np.ndarray, sr: int = SAMPLE_RATE, subtype: str | None = None
) -> Path:
    """Writes a waveform; the format follows the extension (``.wav``, ``.flac``, ...).

    Args:
      path: output file; parent folders are created.
      audio: ``[N]`` mono or ``[N, C]`` multi-channel samples in ``[-1, 1]``; values
        outside are clipped (integer PCM would otherwise wrap around).
      sr: sample rate in Hz.
      subtype: libsndfile subtype; default 16-bit PCM (``PCM_16``), which wav and flac
        both hold. The output bytes depend only on the inputs (deterministic).

    Returns:
      The path written.
    """
    path = Path(path)
    audio = np.asarray(audio)
    if audio.ndim not in (1, 2):
        raise ValueError(f"audio must be [N] or [N, C], got shape {audio.shape}")
    if not np.isfinite(audio).all():
        raise ValueError(f"refusing to write non-finite samples to {path}")
    file_format = path.suffix.lstrip(".").upper()
    if file_format not in sf.available_formats():
        raise ValueError(f"{path}: unknown audio format {path.suffix!r} (try .wav or .flac)")
    clipped = np.clip(audio.astype(np.float32, copy=False), -1.0, 1.0)
    # Encoded in memory, then written: libsndfile fsyncs a file it closes, which costs
    # milliseconds per file when a corpus of thousands is written.
    buffer = io.BytesIO()
    sf.write(buffer, clipped, sr, subtype=subtype or "PCM_16", format=file_format)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path
