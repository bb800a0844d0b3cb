"""The data path from a manifest to padded batches, on grain (no TensorFlow).

Two stages:

1. :func:`prepare_split` (once per manifest, cached): read the manifest (or the records of
   a TFDS split, `usmqs.data.tfds_source`), decode + resample
   audio (:func:`usmqs.data.audio.load_audio`), compute log-mel
   (:mod:`usmqs.data.features`), normalize the transcript
   (:func:`usmqs.data.text.normalize_text`), tokenize, validate, and write one record per
   kept utterance to an ArrayRecord file plus a JSON side file (metadata + skip report).
2. :func:`make_train_iterator` / :func:`eval_batches`: read the records with grain, apply
   SpecAugment (train only), bucket by length and pad to fixed shapes.

(Or, with ``data.features_on_device``, stage 1 stores the audio and stage 2 pads it; the
step computes the rest, see below.)

Batches are dicts of numpy arrays, ``B`` = this process's rows
(``batch_size // process_count``)::

    features      [B, T_b, F] float32   log-mel, zero beyond each row's frames
    feature_mask  [B, T_b]    bool      True on real frames
    labels        [B, L_b]    int32     token ids, 0 (= CTC blank id) beyond each row's labels
    label_mask    [B, L_b]    bool      True on real labels
    example_index [B]         int32     index into ``split.metadata``; -1 for padding rows

With ``data.features_on_device`` (a split prepared with ``store_audio``: records of 16-bit
audio, FLAC-compressed, instead of log-mel) ``features`` and ``feature_mask`` are replaced by

    audio         [B, S_b]    int16     16 kHz PCM, zero beyond each row's samples
    num_samples   [B]         int32     valid samples per row (0 for padding rows)

with ``S_b = (T_b - 1) * hop + win`` (`batch_samples`): the samples that give ``T_b``
frames, so the step's log-mel (`usmqs.data.features_jax`) has the features' shape; the
examples, buckets and labels of every batch are the same as with features, and neither
normalization nor SpecAugment is applied on the host.

``T_b`` is a bucket boundary (``cfg.bucket_boundaries``) and
``L_b = subsampled_length(T_b, cfg.subsampling_factor)``: the most labels CTC can emit from
``T_b`` frames. So the label width is a function of the bucket alone, one compiled shape
per bucket; and every kept training example fits its bucket's label width (it passed the
CTC check ``num_labels + num_repeats <= subsampled_length(num_frames)``).

Bad inputs (reason keys of ``PreparedSplit.skipped``), each logged as ``manifest:line``:

============================  ================================================================
``malformed_line``            not a JSON object with string audio_filepath/text, bad duration;
                              a TFDS record that is no tf.train.Example or has no text
``empty_transcript``          nothing left after :func:`normalize_text`
``unknown_chars``             characters the tokenizer cannot represent (they would be <unk>)
``audio_error``               missing / empty / corrupt / truncated audio (``AudioError``)
``too_long``                  more than ``cfg.max_frames`` feature frames
``labels_too_long``           ``num_labels + num_repeats > subsampled_length(num_frames)``:
                              CTC cannot align the labels to the frames
============================  ================================================================

Reasons are checked in that order (cheap text checks before decoding audio); a line is
counted once, under the first reason that applies. With ``cfg.on_bad_input == "error"``
the first bad line (in file order) raises ``ValueError("manifest:line: reason: detail")``.

Evaluation splits (``train=False``) skip only what cannot be scored (the first four
reasons). ``unknown_chars``, ``too_long`` and ``labels_too_long`` utterances are kept, so
that WER is measured on the whole test set, and counted in ``PreparedSplit.warnings``;
an eval utterance longer than the last boundary is padded to a multiple of it, and its
labels (used only for an eval loss) are cut to the bucket's label width.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import dataclasses
import enum
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grain
import ml_collections
import numpy as np
import threadpoolctl
from array_record.python.array_record_module import ArrayRecordWriter

from usmqs.data import features as features_lib
from usmqs.data import tfds_source
from usmqs.data.audio import SAMPLE_RATE, AudioError, flac_bytes, load_audio, pcm16, pcm16_from_flac
from usmqs.data.manifest import SkippedLine, Utterance, read_manifest
from usmqs.data.specaugment import spec_augment
from usmqs.data.text import normalize_text
from usmqs.data.tokenizer import MODEL_TYPES, Tokenizer

__all__ = [
    "PreparedSplit",
    "SkipReason",
    "batch_samples",
    "batch_shapes",
    "ctc_min_frames",
    "data_config_from_serving",
    "decode_example",
    "default_data_config",
    "encode_audio_example",
    "encode_example",
    "eval_batches",
    "eval_plan",
    "feature_batch",
    "feature_config",
    "make_train_iterator",
    "manifest_transcripts",
    "prepare_split",
    "serving_settings",
    "skip_report",
    "spec_augment_settings",
    "stored_log_mel",
    "subsampled_length",
    "validate_data_config",
]

log = logging.getLogger(__name__)

# Bump when the record layout or the preparation logic changes: old caches become misses.
CACHE_VERSION = 2
# Features are stored as float16 on disk (log-mel lies in about [-23, 20], where float16
# keeps ~3 significant digits) and widened to float32 in batches: half the disk and I/O.
STORAGE_DTYPE = np.float16


class SkipReason(enum.StrEnum):
    MALFORMED_LINE = "malformed_line"
    EMPTY_TRANSCRIPT = "empty_transcript"
    UNKNOWN_CHARS = "unknown_chars"
    AUDIO_ERROR = "audio_error"
    TOO_LONG = "too_long"
    LABELS_TOO_LONG = "labels_too_long"


# ------------------------------------------------------------------------------ config


def default_data_config() -> ml_collections.ConfigDict:
    """The ``config.data`` block: every key the pipeline reads, with its default."""
    return ml_collections.ConfigDict(
        dict(
            # NeMo-style JSON lines, or a TFDS split 'tfds:NAME[/CONFIG][/VERSION]:SPLIT';
            # '' = the embedded synthetic corpus
            train_manifest="",
            eval_manifest="",  # the test split: eval.json
            # The split for choosing recipes (eval_dev.json); '' = the embedded corpus'
            # dev split when the embedded corpus is used, else none.
            dev_manifest="",
            num_mel_bins=80,  # F; other front-end parameters are FeatureConfig defaults
            # Standardize each utterance's waveform (zero mean, unit variance) before the
            # log-mel, as sherpa-onnx's raw-waveform path does: runs trained with it decode
            # there exactly, also audio with a DC offset (README "ONNX").
            standardize_audio=False,
            vocab_size=128,  # sentencepiece size request incl. <blank>=0 and <unk>=1 (soft)
            tokenizer_type="unigram",  # 'unigram' | 'bpe' | 'char'
            batch_size=16,  # global batch (all processes); each process gets batch_size/P
            # Padded frame counts (10 ms frames); an utterance goes to the smallest one
            # that holds it. Each boundary is one compiled train-step shape.
            bucket_boundaries=(200, 300, 400, 600, 800, 1200, 1600),
            max_frames=1600,  # longer training utterances are skipped; <= last boundary
            on_bad_input="skip",  # 'skip' (count + log) | 'error' (raise at the first)
            spec_augment=ml_collections.ConfigDict(
                dict(
                    enabled=True,
                    freq_masks=2,
                    freq_width=27,  # max channels per frequency mask
                    time_masks=2,  # count, or the cap when time_masks_per_frame > 0
                    time_width_ratio=0.05,  # max time-mask width / valid frames
                    time_masks_per_frame=0.0,  # > 0: adaptive count floor(ratio * frames)
                )
            ),
            shuffle_seed=0,  # used when make_train_iterator gets no explicit seed
            num_workers=0,  # processes for feature extraction and batch assembly; 0 = inline
            # Manifest lines per prepared shard: with P processes, process p prepares
            # shards p, p+P, ...; an interrupted preparation redoes unfinished shards only.
            prepare_shard_lines=2000,
            subsampling_factor=4,  # the encoder's time reduction, 2**k (k stride-2 convs)
            feature_norm="utterance",  # 'utterance': per-utterance, per-bin mean/variance; 'none'
            # True: prepared splits keep the audio (16-bit PCM, FLAC-compressed) instead of
            # log-mel, and the train/eval steps compute log-mel, normalization and
            # SpecAugment on the accelerator (`usmqs.data.features_jax`); batches then
            # carry audio [B, S] + num_samples [B] in place of features + feature_mask.
            features_on_device=False,
            # The embedded corpus (`usmqs.data.synth`), used when no manifest is set:
            # where it is cached, its split sizes (0 = the synthesizer's default) and seed.
            synth_dir="~/.cache/usmqs/corpus",
            synth_num_train=0,
            synth_num_test=0,
            synth_num_dev=0,
            synth_seed=0,
            cache_dir="",  # prepared features; '' = WORKDIR/data_cache
            # Where `tfds:` manifests are prepared; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
            tfds_data_dir="",
        )
    )


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError on inconsistent data settings (`usmqs.config.validate` calls it
    where a config is loaded; the functions below trust it)."""
    bounds = tuple(int(b) for b in cfg.bucket_boundaries)
    if not bounds or any(b <= 0 for b in bounds) or list(bounds) != sorted(set(bounds)):
        raise ValueError(f"data.bucket_boundaries must be increasing positive ints, got {bounds}")
    if not 0 < cfg.max_frames <= bounds[-1]:
        raise ValueError(
            f"data.max_frames={cfg.max_frames} must be in (0, {bounds[-1]}] (the last bucket "
            "boundary): add a larger boundary to train on longer utterances"
        )
    if cfg.on_bad_input not in ("skip", "error"):
        raise ValueError(f"data.on_bad_input must be 'skip' or 'error', got {cfg.on_bad_input!r}")
    if cfg.tokenizer_type not in MODEL_TYPES:
        raise ValueError(f"data.tokenizer_type must be one of {MODEL_TYPES}, got {cfg.tokenizer_type!r}")
    for key in ("features_on_device", "standardize_audio"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"data.{key} must be True or False, got {cfg[key]!r}")
    if cfg.feature_norm not in ("utterance", "none"):
        raise ValueError(f"data.feature_norm must be 'utterance' or 'none', got {cfg.feature_norm!r}")
    factor = int(cfg.subsampling_factor)
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"data.subsampling_factor must be a power of 2, got {factor}")
    if cfg.batch_size < 1:
        raise ValueError(f"data.batch_size must be positive, got {cfg.batch_size}")
    if cfg.prepare_shard_lines < 1:
        raise ValueError(f"data.prepare_shard_lines must be positive, got {cfg.prepare_shard_lines}")
    if subsampled_length(bounds[0], factor) < 1:
        raise ValueError(f"bucket boundary {bounds[0]} leaves no frames after {factor}x subsampling")


def feature_config(cfg: ml_collections.ConfigDict) -> features_lib.FeatureConfig:
    """The front end for a data config: ``FeatureConfig`` defaults with its mel bins and
    ``standardize_audio``."""
    return features_lib.FeatureConfig(
        sample_rate=SAMPLE_RATE, num_mel_bins=int(cfg.num_mel_bins), standardize_audio=cfg.standardize_audio,
    )


def stored_log_mel(audio: np.ndarray, fcfg: features_lib.FeatureConfig) -> np.ndarray:
    """Log-mel ``[T, F]`` of mono ``audio`` as prepared splits store it (``STORAGE_DTYPE``):
    whatever decodes audio outside a prepared split goes through this to see the same
    features as training and evaluation."""
    return features_lib.compute_log_mel(audio, fcfg).astype(STORAGE_DTYPE)


# Data settings that decoding audio depends on (besides the front end itself).
SERVING_KEYS = ("num_mel_bins", "feature_norm", "subsampling_factor", "bucket_boundaries", "max_frames", "batch_size")


def serving_settings(cfg: ml_collections.ConfigDict) -> dict:
    """What decoding audio needs from a data config, JSON-ready: ``features`` (every
    `FeatureConfig` field, the sample rate included) and `SERVING_KEYS` (normalization,
    length buckets, the longest trained length, batch size). An export stores it."""
    settings = {k: cfg[k] for k in SERVING_KEYS}
    settings["bucket_boundaries"] = [int(b) for b in cfg.bucket_boundaries]
    return {"features": feature_config(cfg).to_dict(), **settings}


def data_config_from_serving(
    settings: dict,
) -> tuple[ml_collections.ConfigDict, features_lib.FeatureConfig]:
    """The inverse of `serving_settings`: a validated data config (defaults for the keys
    serving does not read) and the front end. Raises ValueError (or TypeError) on
    settings that do not make one."""
    values = {k: settings[k] for k in SERVING_KEYS}
    values["bucket_boundaries"] = tuple(int(b) for b in values["bucket_boundaries"])
    cfg = default_data_config()
    cfg.update(values)
    validate_data_config(cfg)
    fcfg = features_lib.FeatureConfig(**settings["features"])
    cfg.standardize_audio = fcfg.standardize_audio  # a front-end field: stored with the features
    if fcfg.num_mel_bins != cfg.num_mel_bins:
        raise ValueError(f"features have {fcfg.num_mel_bins} mel bins, num_mel_bins is {cfg.num_mel_bins}")
    return cfg, fcfg


def spec_augment_settings(cfg: ml_collections.ConfigDict) -> dict | None:
    """The ``spec_augment`` keywords of a data config (host `spec_augment` and device
    `specaugment_jax.spec_augment` take the same), or None when it is disabled."""
    sa = cfg.spec_augment
    if not sa.enabled:
        return None
    return dict(
        freq_masks=int(sa.freq_masks),
        freq_width=int(sa.freq_width),
        time_masks=int(sa.time_masks),
        time_width_ratio=float(sa.time_width_ratio),
        time_masks_per_frame=float(sa.get("time_masks_per_frame", 0.0)),
    )


def batch_samples(frames: int, cfg: ml_collections.ConfigDict) -> int:
    """Audio width ``S_b`` of an audio batch padded to ``frames`` frames: the fewest samples
    that give that many frames, ``(frames - 1) * hop + win``."""
    return features_lib.samples_for_frames(frames, feature_config(cfg))


# ------------------------------------------------------------------------ CTC lengths


def subsampled_length(num_frames, subsampling_factor: int = 4):
    """Encoder output length for ``num_frames`` input frames (int or integer array):
    ``ceil(T / subsampling_factor)``.

    The encoder front end is ``log2(subsampling_factor)`` 3x3 convolutions with stride 2,
    each padded with one zero frame on either side, so each maps ``t -> ceil(t / 2)`` (=
    ``(t + 2 - 3) // 2 + 1``), and k of them ``T -> ceil(T / 2**k)``: every input frame
    reaches an output frame. The model uses the same arithmetic for its output mask.
    """
    t = np.asarray(num_frames, dtype=np.int64)
    factor = int(subsampling_factor)
    t = -(-t // factor)
    return int(t) if t.ndim == 0 else t


def ctc_min_frames(labels: Sequence[int]) -> int:
    """Fewest output frames CTC needs to emit ``labels``: ``len + #(y[i] == y[i-1])``
    (a blank must separate equal neighbours)."""
    y = np.asarray(labels)
    return int(y.size + np.count_nonzero(y[1:] == y[:-1])) if y.size else 0


def _bucket_frames(num_frames: int, bounds: Sequence[int]) -> int:
    """Padded length: the smallest boundary >= num_frames, or (eval only) a multiple of
    the last boundary."""
    i = bisect.bisect_left(bounds, num_frames)
    if i < len(bounds):
        return bounds[i]
    return -(-num_frames // bounds[-1]) * bounds[-1]


def batch_shapes(cfg: ml_collections.ConfigDict) -> list[tuple[int, int]]:
    """``(T_b, L_b)`` of every training bucket: the train step compiles once per entry."""
    return [(int(b), subsampled_length(int(b), cfg.subsampling_factor)) for b in cfg.bucket_boundaries]


# ---------------------------------------------------------------------- serialization

# Record = header + features bytes (T*F, STORAGE_DTYPE, row-major) + labels (L, int32).
# Header: magic, version, dtype code, pad, example index, T, F, L (little endian).
# Audio records (data.features_on_device) have dtype code _FLAC: T = samples, F = bytes of
# the FLAC file (16-bit mono PCM) that follows the header.
_HEADER = struct.Struct("<4sBBHIIII")
_MAGIC = b"USMX"
_DTYPES = {1: np.dtype(np.float16), 2: np.dtype(np.float32)}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}
_FLAC = 3


def encode_example(index: int, feats: np.ndarray, labels: Sequence[int]) -> bytes:
    """Serializes one example: ``feats [T, F]`` (stored as float16), ``labels [L]`` int32."""
    feats = np.ascontiguousarray(feats, dtype=np.dtype(STORAGE_DTYPE).newbyteorder("<"))
    labels = np.ascontiguousarray(labels, dtype="<i4")
    t, f = feats.shape
    code = _DTYPE_CODES[np.dtype(STORAGE_DTYPE)]
    header = _HEADER.pack(_MAGIC, CACHE_VERSION, code, 0, index, t, f, labels.size)
    return header + feats.tobytes() + labels.tobytes()


def encode_audio_example(index: int, pcm: np.ndarray, labels: Sequence[int]) -> bytes:
    """Serializes one audio example: int16 ``pcm [N]`` (stored as FLAC, lossless) and
    ``labels [L]`` int32."""
    flac = flac_bytes(pcm, SAMPLE_RATE)
    labels = np.ascontiguousarray(labels, dtype="<i4")
    header = _HEADER.pack(_MAGIC, CACHE_VERSION, _FLAC, 0, index, np.size(pcm), len(flac), labels.size)
    return header + flac + labels.tobytes()


def decode_example(record: bytes) -> dict:
    """Inverse of :func:`encode_example`: ``{"index": int, "features": [T, F] float16,
    "labels": [L] int32}`` (arrays are read-only views of ``record``); of
    :func:`encode_audio_example`: ``{"index", "audio": [N] int16, "labels"}``."""
    magic, version, code, _, index, t, f, n = _HEADER.unpack_from(record)
    if magic != _MAGIC or version != CACHE_VERSION:
        raise ValueError(f"not a usmqs example record (magic={magic!r}, version={version})")
    if code == _FLAC:
        start = _HEADER.size
        audio = pcm16_from_flac(record[start : start + f])
        if audio.shape != (t,):
            raise ValueError(f"audio record {index}: decoded {audio.shape} samples, header says {t}")
        labels = np.frombuffer(record, dtype="<i4", count=n, offset=start + f)
        return {"index": index, "audio": audio, "labels": labels}
    dtype = _DTYPES[code].newbyteorder("<")
    start = _HEADER.size
    end = start + t * f * dtype.itemsize
    feats = np.frombuffer(record, dtype=dtype, count=t * f, offset=start).reshape(t, f)
    labels = np.frombuffer(record, dtype="<i4", count=n, offset=end)
    return {"index": index, "features": feats, "labels": labels}


# ------------------------------------------------------------------------ preparation


@dataclasses.dataclass(frozen=True)
class PreparedSplit:
    """A manifest turned into cached examples.

    Attributes:
      paths: the shards' ArrayRecord files, in manifest order: one record per kept
        example; record ``i`` of their concatenation = example ``i``.
      metadata_path: the JSON side file (metadata, skip counts, skip log, shards).
      manifest: absolute manifest path.
      train: prepared for training (all bad inputs skipped) or evaluation.
      num_examples: kept examples.
      skipped: ``{reason: count}`` of lines left out (reasons in :class:`SkipReason`).
      warnings: ``{reason: count}`` of eval lines kept despite a problem.
      metadata: per example ``{"audio_filepath", "text" (normalized), "line",
        "num_frames", "num_labels"}``, in manifest order.
      skip_log: ``[{"line", "reason", "detail", "kept"}]`` for every skipped (``kept`` False)
        or warned (``kept`` True) line, in file order.
      from_cache: True when nothing was recomputed.
      key: the cache key (sha256 hex).
      stores_audio: the records hold audio (``data.features_on_device``), not features;
        metadata then also has ``"num_samples"``.
    """

    paths: tuple[str, ...]
    metadata_path: str
    manifest: str
    train: bool
    num_examples: int
    skipped: dict
    warnings: dict
    metadata: list
    skip_log: list
    from_cache: bool
    key: str
    stores_audio: bool = False

    @property
    def num_frames(self) -> np.ndarray:
        """``[num_examples]`` int64 frame counts."""
        return np.asarray([m["num_frames"] for m in self.metadata], dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class _Limits:
    """What decides which utterances are kept, and what is stored of them."""

    max_frames: int
    subsampling_factor: int
    train: bool
    store_audio: bool = False  # FLAC audio records instead of log-mel (features_on_device)


class _Problem(Exception):
    def __init__(self, reason: SkipReason, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _check_text(raw: str, tokenizer: Tokenizer) -> tuple[str, list[int]]:
    text = normalize_text(raw)
    if not text:
        raise _Problem(SkipReason.EMPTY_TRANSCRIPT, f"empty transcript after normalization ({raw!r})")
    return text, tokenizer.encode(text)


def _transcript_and_audio(item) -> tuple[str, Callable[[], np.ndarray]]:
    """A manifest row's or a TFDS record's transcript, and a function that decodes its
    audio (raising AudioError). A record that does not parse is a malformed line."""
    if isinstance(item, tfds_source.TfdsRecord):
        try:
            return item.read()
        except tfds_source.RecordError as e:
            raise _Problem(SkipReason.MALFORMED_LINE, str(e)) from None
    return item.text, lambda: load_audio(item.audio_filepath, SAMPLE_RATE)


def _process(utt, tokenizer: Tokenizer, fcfg: features_lib.FeatureConfig, limits: _Limits):
    """One utterance (manifest row or TFDS record) -> ("ok", payload, frames, labels,
    text, warning|None) or ("bad", reason, detail); payload: stored log-mel [T, F], or
    int16 PCM [N] with ``limits.store_audio``."""
    warning = None
    try:
        raw_text, load = _transcript_and_audio(utt)
        text, labels = _check_text(raw_text, tokenizer)
        unknown = tokenizer.unknown_chars(text)
        if unknown:
            warning = _Problem(
                SkipReason.UNKNOWN_CHARS, f"characters the tokenizer cannot represent: {unknown}"
            )
            if limits.train:
                raise warning
        try:
            audio = load()
        except AudioError as e:
            raise _Problem(SkipReason.AUDIO_ERROR, str(e)) from None
        if limits.store_audio:  # frame counts as the features would have them
            payload = pcm16(audio)
            frames = features_lib.num_frames(payload.shape[0], fcfg)
        else:
            payload = stored_log_mel(audio, fcfg)
            frames = payload.shape[0]
        if frames > limits.max_frames:
            warning = warning or _Problem(
                SkipReason.TOO_LONG, f"{frames} frames > max_frames={limits.max_frames}"
            )
            if limits.train:
                raise warning
        need, have = ctc_min_frames(labels), subsampled_length(frames, limits.subsampling_factor)
        if need > have:
            warning = warning or _Problem(
                SkipReason.LABELS_TOO_LONG,
                f"{len(labels)} labels need {need} encoder frames, {frames} frames give {have}",
            )
            if limits.train:
                raise warning
    except _Problem as p:
        return ("bad", str(p.reason), p.detail)
    w = None if warning is None else (str(warning.reason), warning.detail)
    return ("ok", payload, frames, labels, text, w)


# Worker-process globals for parallel preparation (set once by the pool initializer).
_WORKER: dict = {}


def _init_worker(model_bytes: bytes, fcfg: features_lib.FeatureConfig, limits: _Limits) -> None:
    _ONE_BLAS_THREAD()  # for the worker's life
    _WORKER.update(tokenizer=Tokenizer(model_bytes), fcfg=fcfg, limits=limits)


def _process_in_worker(utt):
    return _process(utt, _WORKER["tokenizer"], _WORKER["fcfg"], _WORKER["limits"])


def _cache_key(manifest: str, digest: bytes, files: Sequence[str], tokenizer, fcfg, limits) -> str:
    """sha256 hex of the settings, the source's `digest` (sha256 of the manifest's bytes, or
    of a TFDS split's JSON files), the tokenizer and the `files` the examples are read from
    (the audio files of a manifest, the shards of a TFDS split)."""
    h = hashlib.sha256()
    kept = {k: v for k, v in dataclasses.asdict(limits).items() if k != "store_audio"}
    storage = "flac_int16" if limits.store_audio else np.dtype(STORAGE_DTYPE).name
    h.update(json.dumps(
        {"version": CACHE_VERSION, "manifest": manifest, "features": fcfg.to_dict(),
         "limits": kept, "storage": storage},
        sort_keys=True,
    ).encode())
    h.update(digest)
    h.update(hashlib.sha256(tokenizer.model_bytes).digest())
    # Files rewritten in place (e.g. a re-synthesized corpus) must invalidate the cache
    # too; a stat per file is cheap next to decoding it.
    for path in files:
        try:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()


def _read_items(manifest_path, cfg) -> tuple[str, str, list, bytes, list[str]]:
    """``(manifest, file stem, items, digest, files)`` of a manifest file or a ``tfds:``
    split (`_cache_key` for the last two): items are manifest rows and malformed lines
    (`SkippedLine`) in file order, or a split's records (`tfds_source.TfdsRecord`),
    which are parsed when prepared."""
    if tfds_source.is_tfds(manifest_path):
        source = tfds_source.open_split(manifest_path, cfg.tfds_data_dir)
        return source.source, source.stem, source.records(), source.digest(), list(source.files)
    manifest = os.path.abspath(os.fspath(manifest_path))
    digest = hashlib.sha256(Path(manifest).read_bytes()).digest()
    rows, malformed = read_manifest(manifest, on_error="skip")
    items = sorted([*rows, *malformed], key=lambda x: x.line)
    return manifest, Path(manifest).stem, items, digest, [r.audio_filepath for r in rows]


def manifest_transcripts(manifest_path, cfg) -> list[str]:
    """The raw transcripts of a manifest or ``tfds:`` split (malformed lines left out):
    what a tokenizer is trained on."""
    if tfds_source.is_tfds(manifest_path):
        return list(tfds_source.open_split(manifest_path, cfg.tfds_data_dir).transcripts())
    rows, _ = read_manifest(manifest_path, on_error="skip")
    return [r.text for r in rows]


def _raise_bad(manifest: str, line: int, reason: str, detail: str):
    raise ValueError(f"{manifest}:{line}: {reason}: {detail} (data.on_bad_input='error')")


def _load_json(path: Path, key: str) -> dict | None:
    """The JSON file at `path` if it exists, parses and carries `key`; else None."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if meta.get("key") == key else None


def _load_cached(meta_path: Path, key: str) -> dict | None:
    meta = _load_json(meta_path, key)
    if meta is None or not all((meta_path.parent / r).exists() for r in meta["records"]):
        return None
    return meta


def _cached_split(meta: dict, meta_path: Path, *, strict: bool) -> PreparedSplit:
    """A split from its cache; `strict` (on_bad_input='error') raises on its first bad line."""
    bad = [e for e in meta["skip_log"] if not e["kept"]]
    if strict and bad:
        first = min(bad, key=lambda e: e["line"])
        _raise_bad(meta["manifest"], first["line"], first["reason"], first["detail"])
    return _split_from_meta(meta, meta_path, from_cache=True)


def _split_from_meta(meta: dict, meta_path: Path, from_cache: bool) -> PreparedSplit:
    return PreparedSplit(
        paths=tuple(str(meta_path.parent / r) for r in meta["records"]),
        metadata_path=str(meta_path),
        manifest=meta["manifest"],
        train=meta["train"],
        num_examples=len(meta["examples"]),
        skipped=dict(meta["skipped"]),
        warnings=dict(meta["warnings"]),
        metadata=meta["examples"],
        skip_log=meta["skip_log"],
        from_cache=from_cache,
        key=meta["key"],
        stores_audio=meta.get("payload") == "audio",
    )


class _SkipLog:
    """Counts and logs skipped lines (and kept ones with a warning), in file order."""

    def __init__(self, manifest: str):
        self.manifest = manifest
        self.skipped: dict[str, int] = {}
        self.warnings: dict[str, int] = {}
        self.entries: list[dict] = []

    def note(self, line: int, reason: str, detail: str, *, kept: bool) -> None:
        reason = str(reason)  # plain str keys (SkipReason is a StrEnum)
        counts = self.warnings if kept else self.skipped
        counts[reason] = counts.get(reason, 0) + 1
        self.entries.append({"line": line, "reason": reason, "detail": detail, "kept": kept})
        if reason == SkipReason.MALFORMED_LINE:
            return  # read_manifest has logged it already
        # Length limits are policy, not broken data: log them quietly.
        quiet = reason in (SkipReason.TOO_LONG, SkipReason.LABELS_TOO_LONG)
        log.log(
            logging.INFO if quiet else logging.WARNING,
            "%s %s:%d: %s: %s", "keeping" if kept else "skipping", self.manifest, line, reason, detail,
        )


# Preparation computes one utterance at a time: its matmul (frames x 257 @ 257 x 80) gains
# nothing from BLAS threads, and several preparing processes (the processes of a job on
# one host, `data.num_workers`) whose BLAS threads spin on the same cores run 3.5x slower
# (bench/prepare_shards.py: 2 processes on 2 cores 34.7 s with OpenBLAS' default threads,
# 9.8 s with one each; one process 18.8 s vs 16.7 s).
_ONE_BLAS_THREAD = functools.partial(threadpoolctl.threadpool_limits, 1, user_api="blas")


@contextlib.contextmanager
def _processed(utts: list[Utterance], tokenizer: Tokenizer, fcfg, limits: _Limits, cfg):
    """An iterator of `_process` results for `utts`, in order: inline, or from
    ``data.num_workers`` spawned processes."""
    if cfg.num_workers <= 0 or len(utts) <= 1:
        yield (_process(u, tokenizer, fcfg, limits) for u in utts)
        return
    # spawn, not fork: the parent may hold JAX's threads.
    pool = concurrent.futures.ProcessPoolExecutor(
        int(cfg.num_workers),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(tokenizer.model_bytes, fcfg, limits),
    )
    try:
        yield iter(pool.map(_process_in_worker, utts, chunksize=8))
    finally:
        pool.shutdown(cancel_futures=True)


def _write_examples(writer, items, results, report: _SkipLog, *, strict: bool) -> list[dict]:
    """Write every good item's example; note (or, `strict`, raise on) the bad ones.
    Returns the examples' metadata, in file order."""
    manifest = report.manifest
    examples: list[dict] = []
    for n, item in enumerate(items):
        if isinstance(item, SkippedLine):
            if strict:
                _raise_bad(manifest, item.line, SkipReason.MALFORMED_LINE, item.reason)
            report.note(item.line, SkipReason.MALFORMED_LINE, item.reason, kept=False)
            continue
        result = next(results)
        if result[0] == "bad":
            _, reason, detail = result
            if strict:
                _raise_bad(manifest, item.line, reason, detail)
            report.note(item.line, reason, detail, kept=False)
            continue
        _, payload, frames, labels, text, warning = result
        if warning is not None:
            report.note(item.line, warning[0], warning[1], kept=True)
        audio = payload.dtype == np.int16
        encode = encode_audio_example if audio else encode_example
        writer.write(encode(len(examples), payload, labels))
        examples.append({
            "audio_filepath": item.audio_filepath,
            "text": text,
            "line": item.line,
            "num_frames": int(frames),
            "num_labels": len(labels),
            **({"num_samples": int(payload.shape[0])} if audio else {}),
        })
        if (n + 1) % 1000 == 0:
            log.info("%s: %d/%d lines prepared", manifest, n + 1, len(items))
    return examples


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every shard of one preparation shares."""

    manifest: str
    key: str
    cache: Path
    base: str
    tokenizer: Tokenizer
    fcfg: features_lib.FeatureConfig
    limits: _Limits
    cfg: ml_collections.ConfigDict
    strict: bool


def _shard_names(job: _Job, shard: int, count: int) -> tuple[str, str]:
    stem = f"{job.base}.{shard:05d}-of-{count:05d}"
    return f"{stem}.array_record", f"{stem}.json"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prepare_shard(job: _Job, items: list, shard: int, count: int) -> dict:
    """Shard `shard` of `count` (`items`: its manifest lines) as its ArrayRecord file and
    JSON side file (written last: its presence marks the shard done); reused when done."""
    record_name, meta_name = _shard_names(job, shard, count)
    meta = _load_json(job.cache / meta_name, job.key)
    if meta is not None and (job.cache / record_name).exists():
        log.debug("%s: shard %d/%d prepared earlier", job.manifest, shard + 1, count)
        return meta
    report = _SkipLog(job.manifest)
    tmp_record = job.cache / f"{record_name}.tmp{os.getpid()}"
    writer = ArrayRecordWriter(str(tmp_record), "group_size:1")
    utts = [x for x in items if not isinstance(x, SkippedLine)]
    try:
        with _ONE_BLAS_THREAD(), _processed(utts, job.tokenizer, job.fcfg, job.limits, job.cfg) as results:
            examples = _write_examples(writer, items, results, report, strict=job.strict)
    except BaseException:
        writer.close()
        tmp_record.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp_record, job.cache / record_name)
    meta = {
        "key": job.key, "shard": shard, "count": count, "record": record_name,
        "skipped": report.skipped, "warnings": report.warnings,
        "skip_log": report.entries, "examples": examples,
    }
    _write_atomic(job.cache / meta_name, json.dumps(meta))
    return meta


def _merged(job: _Job, shards: list[dict], num_lines: int, train: bool) -> dict:
    """The split's metadata from its shards' (in order): examples and skip logs
    concatenated, counts summed."""
    counts = {"skipped": {}, "warnings": {}}
    for sh in shards:
        for kind, total in counts.items():
            for reason, n in sh[kind].items():
                total[reason] = total.get(reason, 0) + n
    return {
        "key": job.key,
        "manifest": job.manifest,
        "train": bool(train),
        "feature_config": job.fcfg.to_dict(),
        "payload": "audio" if job.limits.store_audio else "features",
        "num_lines": num_lines,
        **counts,
        "skip_log": [e for sh in shards for e in sh["skip_log"]],
        "examples": [e for sh in shards for e in sh["examples"]],
        "records": [sh["record"] for sh in shards],
    }


def prepare_split(
    manifest_path: str | os.PathLike,
    tokenizer: Tokenizer,
    cfg: ml_collections.ConfigDict,
    cache_dir: str | os.PathLike,
    *,
    train: bool,
    process_index: int = 0,
    process_count: int = 1,
    barrier: Callable[[], None] | None = None,
    store_audio: bool | None = None,
) -> PreparedSplit:
    """Reads, validates, featurizes and tokenizes a manifest into cached ArrayRecord shards.

    The manifest's lines are cut into shards of ``data.prepare_shard_lines``; process
    `process_index` of `process_count` prepares shards ``process_index``,
    ``process_index + process_count``, ... (each ``{cache_dir}/{manifest stem}.{train|eval}.
    {key[:16]}.{i}-of-{n}.array_record`` + ``.json``, written under temporary names and
    renamed, the JSON last); then, after `barrier` (every process has finished its
    shards; needed with several processes), the split is assembled from all shards in
    manifest order (examples, skip reports) and its ``{...}.{key[:16]}.json`` written.
    Shards depend on the manifest, not on the process count: one process or several give
    the same files and the same examples. A shard already prepared with the same ``key``
    is reused, so a preparation killed half way redoes only its unfinished shards; when
    the split's JSON exists nothing is recomputed (``from_cache=True``). ``key`` hashes
    the manifest (path and bytes), the audio files' sizes and mtimes (for a ``tfds:``
    split: its JSON files and its shard files' sizes and mtimes), the feature config,
    the tokenizer model bytes, ``max_frames``, ``subsampling_factor``, ``train``, `store_audio`.

    Args:
      manifest_path: NeMo-style JSON-lines manifest, or a TFDS split
        ``tfds:NAME[/CONFIG][/VERSION]:SPLIT`` under ``data.tfds_data_dir``
        (`usmqs.data.tfds_source`): its records are prepared as a manifest's lines are,
        the 1-based record number standing for the line number.
      tokenizer: the run's tokenizer.
      cfg: the data config (:func:`default_data_config` keys); uses ``num_mel_bins``,
        ``max_frames``, ``subsampling_factor``, ``on_bad_input``, ``num_workers``,
        ``prepare_shard_lines``.
      cache_dir: where prepared splits live (created).
      train: training split (skip every bad input) or eval split (see module docstring).
      process_index, process_count, barrier: this process's share of the shards, and a
        function that returns once every process has finished its share.
      store_audio: FLAC audio records, not log-mel (None: ``data.features_on_device``).

    Raises:
      ValueError: with ``on_bad_input='error'``, the first bad line as
        ``"manifest:line: reason: detail"`` (also on a cache hit whose report has skips).
      FileNotFoundError: the manifest does not exist.
      tfds_source.TfdsError: a ``tfds:`` value that names no prepared split.
    """
    manifest, stem, items, digest, files = _read_items(manifest_path, cfg)
    audio = bool(cfg.features_on_device if store_audio is None else store_audio)
    limits = _Limits(int(cfg.max_frames), int(cfg.subsampling_factor), bool(train), audio)
    key = _cache_key(manifest, digest, files, tokenizer, feature_config(cfg), limits)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    base = f"{stem}.{'train' if train else 'eval'}.{key[:16]}"
    meta_path = cache / f"{base}.json"
    job = _Job(manifest, key, cache, base, tokenizer, feature_config(cfg), limits, cfg, cfg.on_bad_input == "error")

    meta = _load_cached(meta_path, key)
    if meta is not None:
        log.info("%s: using cached %s", manifest, meta_path)
        return _cached_split(meta, meta_path, strict=job.strict)

    # Items (in file order) cut into shards.
    size = int(cfg.prepare_shard_lines)
    ranges = [(a, min(a + size, len(items))) for a in range(0, max(len(items), 1), size)]
    for shard in range(process_index, len(ranges), process_count):
        _prepare_shard(job, items[slice(*ranges[shard])], shard, len(ranges))
    if barrier is not None:
        barrier()
    shards = [_prepare_shard(job, items[slice(*r)], i, len(ranges)) for i, r in enumerate(ranges)]
    meta = _merged(job, shards, len(items), train)
    if process_index == 0:  # one writer; the others assembled the same in memory
        _write_atomic(meta_path, json.dumps(meta))
    split = _split_from_meta(meta, meta_path, from_cache=False)
    if split.skipped or split.warnings:
        log.warning("%s", skip_report(split))
    return split


def skip_report(split: PreparedSplit) -> str:
    """Human-readable summary: kept count, skip counts by reason with a first example each."""
    total_skipped = sum(split.skipped.values())
    lines = [
        f"{split.manifest} ({'train' if split.train else 'eval'}): kept {split.num_examples} of "
        f"{split.num_examples + total_skipped} utterances"
        + (" (cached)" if split.from_cache else "")
    ]

    def section(title: str, counts: dict) -> None:
        if not counts:
            return
        lines.append(f"  {title} {sum(counts.values())}:")
        for reason in sorted(counts, key=lambda r: (-counts[r], r)):
            first = next(e for e in split.skip_log if e["reason"] == reason)
            lines.append(
                f"    {reason:<17} {counts[reason]:>6}   "
                f"e.g. {split.manifest}:{first['line']}: {first['detail']}"
            )

    section("skipped", split.skipped)
    section("kept with warnings", split.warnings)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- batches


def _source(split: PreparedSplit) -> grain.MapDataset:
    """Example ``i`` of the split as a decoded dict (see :func:`decode_example`)."""
    return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(list(split.paths))).map(decode_example)


def _empty_batch(rows: int, frames: int, labels: int, bins: int, samples: int | None = None) -> dict:
    """Zero batch; with `samples`, an audio batch (audio [rows, samples] int16 +
    num_samples [rows] int32) in place of features + feature_mask."""
    inputs = {
        "features": np.zeros((rows, frames, bins), np.float32),
        "feature_mask": np.zeros((rows, frames), bool),
    } if samples is None else {
        "audio": np.zeros((rows, samples), np.int16),
        "num_samples": np.zeros((rows,), np.int32),
    }
    return {
        **inputs,
        "labels": np.zeros((rows, labels), np.int32),
        "label_mask": np.zeros((rows, labels), bool),
        "example_index": np.full((rows,), -1, np.int32),
    }


def normalize_features(feats: np.ndarray, kind: str) -> np.ndarray:
    """[T, F] -> float32 [T, F]; 'utterance': each bin to zero mean, unit variance over T.

    Applied before SpecAugment, so its masks (value 0) hold the utterance mean. Without
    it the masks hold a level far above the mean log-energy, and a fully masked window
    reaches the encoder as an all-zero vector, whose LayerNorm gradient is ~1/sqrt(eps).
    """
    feats = feats.astype(np.float32)
    if kind == "none":
        return feats
    if kind != "utterance":
        raise ValueError(f"data.feature_norm must be 'utterance' or 'none', got {kind!r}")
    mean = feats.mean(axis=0, keepdims=True)
    std = feats.std(axis=0, keepdims=True)
    return (feats - mean) / (std + 1e-5)


def _put_row(batch: dict, row: int, index: int, feats: np.ndarray, labels: np.ndarray) -> None:
    """Row `row` of a batch: `feats` [T, F] (features batch) or PCM [N] (audio batch)."""
    if "audio" in batch:
        # Samples past the batch width fill no frame of the bucket (a partial last
        # frame): cutting them leaves the frame count, 1 + (N - win) // hop, as it was.
        s = min(feats.shape[0], batch["audio"].shape[1])
        batch["audio"][row, :s] = feats[:s]
        batch["num_samples"][row] = s
    else:
        t = min(feats.shape[0], batch["features"].shape[1])
        batch["features"][row, :t] = feats[:t]
        batch["feature_mask"][row, :t] = True
    n = min(labels.shape[0], batch["labels"].shape[1])  # eval only may cut labels
    batch["labels"][row, :n] = labels[:n]
    batch["label_mask"][row, :n] = True
    batch["example_index"][row] = index


class _TrainPlan:
    """Which examples form which global batch, per epoch; identical on every process.

    Epoch ``e``: examples are permuted with ``default_rng([seed, 0, e])`` and grouped by
    bucket (smallest boundary >= num_frames), keeping that order. Each bucket yields
    ``n_b // batch_size`` full batches; the leftovers of all buckets, ordered by bucket,
    are cut into further batches, each padded to the bucket of its longest member. The
    last of those is completed with examples of this epoch (in permutation order) that are
    not in it and fit its bucket, repeating examples only if the split holds fewer than
    ``batch_size``. So every example appears at least once per epoch, at most
    ``batch_size - 1`` appear twice, every row is real (no empty rows in training), and
    there are ``ceil(num_examples / batch_size)`` batches per epoch.
    """

    def __init__(self, num_frames: np.ndarray, bounds: Sequence[int], batch_size: int, seed: int):
        self.bucket = np.searchsorted(np.asarray(bounds), num_frames, side="left")
        self.batch_size, self.seed = batch_size, seed
        self.num_batches = -(-self.bucket.size // batch_size)
        self._cache: dict[int, list] = {}

    def batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """``[(bucket index, example indices [batch_size])]`` of global batches of ``epoch``."""
        plan = self._cache.get(epoch)
        if plan is not None:
            return plan
        bs = self.batch_size
        order = np.random.default_rng([self.seed, 0, epoch]).permutation(self.bucket.size)
        by_bucket = order[np.argsort(self.bucket[order], kind="stable")]
        plan, leftovers = [], []
        for b in np.unique(self.bucket):
            members = by_bucket[self.bucket[by_bucket] == b]
            full = members.size // bs * bs
            plan.extend((int(b), chunk) for chunk in members[:full].reshape(-1, bs))
            leftovers.extend(members[full:].tolist())
        for start in range(0, len(leftovers), bs):
            chunk = leftovers[start : start + bs]
            top = int(self.bucket[chunk].max())
            if len(chunk) < bs:
                taken = set(chunk)
                fits = [int(i) for i in order if self.bucket[i] <= top and int(i) not in taken]
                fill = fits[: bs - len(chunk)]
                chunk = np.resize(np.asarray(chunk + fill), bs)  # repeats only if n < bs
            plan.append((top, np.asarray(chunk, dtype=np.int64)))
        if len(self._cache) > 4:
            self._cache.clear()
        self._cache[epoch] = plan
        return plan


class _TrainBatch:
    """``map_with_index`` fn: (global step, batch id in epoch) -> this process's batch."""

    def __init__(self, split: PreparedSplit, cfg, plan: _TrainPlan, seed: int, pi: int, pc: int):
        self.examples = _source(split)
        self.plan, self.seed = plan, seed
        self.bounds = tuple(int(b) for b in cfg.bucket_boundaries)
        self.factor = int(cfg.subsampling_factor)
        self.bins = int(cfg.num_mel_bins)
        self.pi, self.pc = pi, pc  # process index, process count
        self.norm = cfg.feature_norm
        self.augment = spec_augment_settings(cfg)
        self.cfg, self.audio = cfg, split.stores_audio

    def __call__(self, step: int, batch_id: int) -> dict:
        epoch = step // self.plan.num_batches
        bucket, members = self.plan.batches(epoch)[batch_id]
        frames = self.bounds[bucket]
        rows = members[self.pi :: self.pc]
        samples = batch_samples(frames, self.cfg) if self.audio else None
        batch = _empty_batch(rows.size, frames, subsampled_length(frames, self.factor), self.bins, samples)
        for r, i in enumerate(rows):
            ex = self.examples[int(i)]
            if self.audio:  # featurized, normalized and augmented in the step
                _put_row(batch, r, int(i), ex["audio"], ex["labels"])
                continue
            feats = normalize_features(ex["features"], self.norm)
            if self.augment is not None:
                # Keyed by (step, row of the global batch): independent of process count,
                # prefetching and restarts.
                rng = np.random.default_rng([self.seed, 1, step, self.pi + r * self.pc])
                feats = spec_augment(feats, feats.shape[0], rng, **self.augment)
            _put_row(batch, r, int(i), feats, ex["labels"])
        return batch


def make_train_iterator(
    split: PreparedSplit,
    cfg: ml_collections.ConfigDict,
    *,
    seed: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Infinite iterator of training batches (module docstring for the layout).

    Pipeline: ``MapDataset.range(batches_per_epoch).shuffle(seed).repeat()`` (grain
    reshuffles the batch order every epoch) ``.map_with_index(assemble)`` where
    ``assemble(step, batch_id)`` looks up the epoch's bucketed plan (see ``_TrainPlan``),
    reads the examples from ``MapDataset.source(ArrayRecordDataSource)``, applies SpecAugment
    with ``default_rng([seed, 1, step, global_row])``, and pads to the bucket's
    ``(T_b, L_b)``. Every process builds the same global plan and keeps rows
    ``[process_index::process_count]`` of each global batch: at every step all processes
    pad to the same bucket shape (``jax.make_array_from_process_local_data`` needs that),
    and the processes' examples are disjoint within a step and together cover the global
    batch. Slicing the example list per process instead would let processes disagree on
    the bucket at a step.

    ``it.get_state()`` is a small JSON-serializable dict (``{"next_index": step}``);
    ``it.set_state(state)`` on a fresh iterator from the same split, config and seed
    resumes with the identical batches, augmentation included.

    Args:
      split: a :class:`PreparedSplit` (``train=True``).
      cfg: data config; ``batch_size`` is global and must divide by ``process_count``.
      seed: shuffle/augment seed in ``[0, 2**32)``; None = ``cfg.shuffle_seed``.
      process_index, process_count: this process and the number of data-loading processes.
    """
    if split.num_examples == 0:
        raise ValueError(f"{split.manifest}: no usable training examples\n{skip_report(split)}")
    if cfg.batch_size % process_count:
        raise ValueError(
            f"data.batch_size={cfg.batch_size} does not divide by process_count={process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside [0, {process_count})")
    seed = int(cfg.shuffle_seed if seed is None else seed)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if max(m["num_frames"] for m in split.metadata) > cfg.bucket_boundaries[-1]:
        raise ValueError(
            f"{split.path} holds utterances beyond the last bucket: prepare it with train=True"
        )
    plan = _TrainPlan(split.num_frames, tuple(cfg.bucket_boundaries), int(cfg.batch_size), seed)
    assemble = _TrainBatch(split, cfg, plan, seed, process_index, process_count)
    ds = grain.MapDataset.range(plan.num_batches).shuffle(seed).repeat().map_with_index(assemble)
    # Small buffers: a 1600-frame batch of 16 is 8 MB; grain's default (500) would hold GBs.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if cfg.num_workers > 0:
        from absl import flags

        # grain 0.2.x reads an absl flag in mp_prefetch; outside an absl app nothing has
        # parsed flags and it raises UnparsedFlagAccessError. Defaults are what we want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(cfg.num_workers)))
    return iter(it_ds)


def eval_plan(num_frames: Sequence[int], cfg: ml_collections.ConfigDict) -> list[tuple[int, np.ndarray]]:
    """The global batches of an evaluation, ``[(T_b, example indices [batch_size])]``.

    Examples are grouped by padded length (the smallest bucket boundary that holds
    ``num_frames[i]``, or a multiple of the last one), buckets in increasing size, input
    order within a bucket, cut into batches of ``cfg.batch_size``; the last batch of each
    bucket is filled with index -1 (an empty row).
    """
    bounds = tuple(int(b) for b in cfg.bucket_boundaries)
    padded = [_bucket_frames(int(t), bounds) for t in num_frames]
    plan = []
    bs = int(cfg.batch_size)
    for frames in sorted(set(padded)):
        members = np.asarray([i for i, p in enumerate(padded) if p == frames], np.int64)
        members = np.concatenate([members, np.full(-members.size % bs, -1, np.int64)])
        plan.extend((frames, chunk) for chunk in members.reshape(-1, bs))
    return plan


def feature_batch(
    rows: Sequence[np.ndarray | None], frames: int, cfg: ml_collections.ConfigDict
) -> dict:
    """A batch of log-mel rows (as stored; None = an empty row) padded to ``frames``,
    normalized as evaluation batches are (module docstring layout; no labels, and
    ``example_index`` is the row number, -1 for empty rows)."""
    batch = _empty_batch(len(rows), frames, 0, int(cfg.num_mel_bins))
    no_labels = np.zeros((0,), np.int32)
    for r, feats in enumerate(rows):
        if feats is not None:
            _put_row(batch, r, r, normalize_features(feats, cfg.feature_norm), no_labels)
    return batch


class _EvalBatch:
    def __init__(self, split: PreparedSplit, cfg, plan: list, process_index: int, process_count: int):
        self.examples = _source(split)
        self.plan, self.pi, self.pc = plan, process_index, process_count
        self.factor, self.bins = int(cfg.subsampling_factor), int(cfg.num_mel_bins)
        self.norm = cfg.feature_norm
        self.cfg, self.audio = cfg, split.stores_audio

    def __call__(self, batch_id: int) -> dict:
        frames, members = self.plan[batch_id]
        rows = members[self.pi :: self.pc]
        samples = batch_samples(frames, self.cfg) if self.audio else None
        batch = _empty_batch(rows.size, frames, subsampled_length(frames, self.factor), self.bins, samples)
        for r, i in enumerate(rows):
            if i >= 0:
                ex = self.examples[int(i)]
                row = ex["audio"] if self.audio else normalize_features(ex["features"], self.norm)
                _put_row(batch, r, int(i), row, ex["labels"])
        return batch


def eval_batches(
    split: PreparedSplit,
    cfg: ml_collections.ConfigDict,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict]:
    """Every example exactly once, deterministic order, no augmentation.

    Global batches as `eval_plan` makes them: grouped by padded length (buckets in
    increasing size, manifest order within a bucket), ``cfg.batch_size`` rows, the last
    batch of each bucket filled with empty rows (all masks False, ``example_index ==
    -1``); utterances longer than the last boundary padded to a multiple of it. Each process
    gets rows ``[process_index::process_count]``; ``example_index`` maps rows to
    ``split.metadata``.
    """
    if cfg.batch_size % process_count:
        raise ValueError(
            f"data.batch_size={cfg.batch_size} does not divide by process_count={process_count}"
        )
    plan = eval_plan(split.num_frames, cfg)
    if not plan:
        return iter(())
    ds = grain.MapDataset.range(len(plan)).map(_EvalBatch(split, cfg, plan, process_index, process_count))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
