"""TFDS speech datasets as manifests, read without TensorFlow (or TFDS) installed.

A manifest value ``tfds:NAME[/CONFIG][/VERSION]:SPLIT`` (e.g.
``tfds:librispeech/default:train_clean100``) names a split of a dataset that
`tensorflow_datasets` has prepared under a data folder (``data.tfds_data_dir``; ''
= TFDS's own default, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). Without a
VERSION the highest one prepared there is used; without a CONFIG the dataset must have
been prepared without configs (``DATA_DIR/NAME/VERSION``).

What is read is TFDS's on-disk layout, not its Python API: ``dataset_info.json`` (file
format, splits, shard lengths, file name template), ``features.json`` (which feature is
the speech and how it is stored), and the shard files, each record a serialized
``tf.train.Example``, parsed here with the protobuf runtime (a dependency of grain and
orbax already). Both of TFDS's formats are read: ``array_record`` (random access) and
``tfrecord`` (the default of ``download_and_prepare``; an index of record offsets is
made by seeking over the length headers, the data checksums are not verified). TFDS's
own readers would need TensorFlow for any ``tfds.features.Audio`` feature.

The speech feature is ``speech`` or ``audio``; the transcript is ``text``. Stored as:

* ``Audio`` (any ``dtype``): samples, int PCM scaled to [-1, 1] (LibriSpeech ``default``);
* ``Audio(lazy_decode=True)``: the encoded file's bytes (flac, wav...), decoded with
  libsndfile (LibriSpeech ``lazy_decode``);
* ``Tensor`` of shape ``[None]`` (or ``[None, C]``): samples; its sample rate comes from
  the dataset's ``metadata.json`` (``sample_rate``), as LibriSpeech writes it.

Tensor/Audio ``encoding`` ``none``, ``bytes`` and ``zlib`` are all read. Records become
:class:`TfdsRecord` items that `usmqs.data.pipeline` prepares like manifest lines: the
record's 1-based number in the split stands where a manifest's line number would
(skip reports say ``tfds:NAME/CONFIG:SPLIT:LINE``), and its ``audio_filepath`` is
``SOURCE[INDEX]`` with INDEX 0-based, as ``tfds.data_source(...)[INDEX]`` counts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from usmqs.data.audio import SAMPLE_RATE, AudioError, decode_audio, waveform

__all__ = [
    "PREFIX", "RecordError", "TfdsError", "TfdsRecord", "TfdsSplit",
    "default_data_dir", "is_tfds", "open_split", "parse_example",
]

PREFIX = "tfds:"
SPEECH_KEYS = ("speech", "audio")
TEXT_KEY = "text"
FORMATS = ("array_record", "tfrecord")


class TfdsError(ValueError):
    """A ``tfds:`` value that names no readable dataset split (the message says why)."""


class RecordError(ValueError):
    """One record that cannot be read or parsed (counted as ``malformed_line``)."""


def is_tfds(manifest) -> bool:
    """True for a ``tfds:...`` manifest value."""
    return isinstance(manifest, str) and manifest.startswith(PREFIX)


# --------------------------------------------------------------- tf.train.Example proto

# tensorflow/core/example/{example,feature}.proto, in a private pool (the package name
# is ours: the wire format does not carry it, and it cannot clash with TF's or TFDS's).
_EXAMPLE_PROTO = """
name: "usmqs_tf_example.proto" package: "usmqs_tf" syntax: "proto3"
message_type { name: "BytesList"
  field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_BYTES } }
message_type { name: "FloatList"
  field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_FLOAT options { packed: true } } }
message_type { name: "Int64List"
  field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_INT64 options { packed: true } } }
message_type { name: "Feature"
  field { name: "bytes_list" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".usmqs_tf.BytesList" oneof_index: 0 }
  field { name: "float_list" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".usmqs_tf.FloatList" oneof_index: 0 }
  field { name: "int64_list" number: 3 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".usmqs_tf.Int64List" oneof_index: 0 }
  oneof_decl { name: "kind" } }
message_type { name: "Features"
  field { name: "feature" number: 1 label: LABEL_REPEATED type: TYPE_MESSAGE type_name: ".usmqs_tf.Features.FeatureEntry" }
  nested_type { name: "FeatureEntry" options { map_entry: true }
    field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".usmqs_tf.Feature" } } }
message_type { name: "Example"
  field { name: "features" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".usmqs_tf.Features" } }
"""


@functools.cache
def _example_class():
    pool = descriptor_pool.DescriptorPool()
    pool.Add(text_format.Parse(_EXAMPLE_PROTO, descriptor_pb2.FileDescriptorProto()))
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("usmqs_tf.Example"))


def parse_example(data: bytes) -> dict:
    """A serialized ``tf.train.Example`` as ``{key: list of bytes | float | int}``.
    Raises RecordError when the bytes are not one."""
    try:
        example = _example_class().FromString(data)
    except Exception as e:  # protobuf's DecodeError, whichever backend raises it
        raise RecordError(f"not a tf.train.Example ({type(e).__name__}: {e})") from None
    out = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        out[key] = getattr(feature, kind).value if kind else []
    return out


# --------------------------------------------------------------------------- the split


@dataclasses.dataclass(frozen=True)
class _Speech:
    """How the speech feature is stored (from ``features.json``)."""

    key: str
    dtype: str  # numpy name of the samples ('int16', 'float32', ...)
    encoded: bool  # True: the file's bytes (Audio lazy_decode); else samples
    encoding: str  # Tensor/Audio serialization: 'none' | 'bytes' | 'zlib'
    channels: int  # 0: shape [None] (mono); else the C of [None, C]
    sample_rate: int


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
    """One split of a prepared TFDS dataset: its shard files and how to read them.

    Attributes:
      source: the ``tfds:`` value, normalized (``tfds:NAME[/CONFIG]/VERSION:SPLIT``).
      folder: ``DATA_DIR/NAME[/CONFIG]/VERSION``.
      file_format: ``array_record`` or ``tfrecord``.
      files: the split's shard files, in order.
      lengths: records per shard file.
      speech: how the speech feature is stored.
    """

    source: str
    folder: str
    file_format: str
    files: tuple[str, ...]
    lengths: tuple[int, ...]
    speech: _Speech

    def __len__(self) -> int:
        return sum(self.lengths)

    @property
    def stem(self) -> str:
        """A file-name-safe name for caches: ``NAME-CONFIG-VERSION-SPLIT``."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.source[len(PREFIX):])

    def records(self) -> list[TfdsRecord]:
        return [TfdsRecord(self, i) for i in range(len(self))]

    def digest(self) -> bytes:
        """sha256 of the dataset's JSON files (what the split is and how it is stored)."""
        h = hashlib.sha256()
        for name in ("dataset_info.json", "features.json"):
            h.update(hashlib.sha256(Path(self.folder, name).read_bytes()).digest())
        return h.digest()

    def read(self, index: int) -> dict:
        """Record ``index`` (0-based, over the whole split) as :func:`parse_example` gives it."""
        bounds = np.cumsum(self.lengths)
        shard = int(np.searchsorted(bounds, index, side="right"))
        if not 0 <= index < len(self) or shard >= len(self.files):
            raise IndexError(f"{self.source}: record {index} outside [0, {len(self)})")
        offset = index - (int(bounds[shard - 1]) if shard else 0)
        return parse_example(_read_record(self.file_format, self.files[shard], offset))

    def transcripts(self) -> Iterator[str]:
        """The ``text`` of every record that has one, in order (tokenizer training)."""
        for i in range(len(self)):
            try:
                yield _text(self.read(i), self.source)
            except RecordError:
                continue

    def audio(self, values, name: str) -> np.ndarray:
        """The speech feature's stored values as a 16 kHz float32 waveform (AudioError)."""
        sp = self.speech
        if sp.encoded:
            return decode_audio(values[0] if len(values) else b"", name, SAMPLE_RATE)
        if sp.encoding == "none":
            samples = np.asarray(values, dtype=np.dtype(sp.dtype))
        else:
            raw = values[0] if len(values) else b""
            try:
                raw = zlib.decompress(raw) if sp.encoding == "zlib" else raw
            except zlib.error as e:
                raise AudioError(name, f"corrupt zlib-encoded samples ({e})") from None
            samples = np.frombuffer(raw, dtype=np.dtype(sp.dtype).newbyteorder("<"))
        if sp.channels:
            if samples.size % sp.channels:
                raise AudioError(name, f"{samples.size} values are not frames of {sp.channels} channels")
            samples = samples.reshape(-1, sp.channels)
        return waveform(samples, sp.sample_rate, name, SAMPLE_RATE)


@dataclasses.dataclass(frozen=True)
class TfdsRecord:
    """One record of a split, to prepare like a manifest line (read when processed)."""

    split: TfdsSplit
    index: int  # 0-based in the split

    @property
    def line(self) -> int:
        return self.index + 1

    @property
    def audio_filepath(self) -> str:
        return f"{self.split.source}[{self.index}]"

    def read(self) -> tuple[str, Callable[[], np.ndarray]]:
        """``(transcript, load)``: ``load()`` decodes the waveform (raises AudioError).
        Raises RecordError for a record that cannot be read or lacks the features."""
        try:
            example = self.split.read(self.index)
        except OSError as e:
            raise RecordError(f"unreadable record ({e})") from None
        text = _text(example, self.split.source)
        key = self.split.speech.key
        if key not in example:
            raise RecordError(f"no {key!r} feature")
        return text, functools.partial(self.split.audio, example[key], self.audio_filepath)


def _text(example: dict, source: str) -> str:
    values = example.get(TEXT_KEY)
    if values is None or len(values) != 1:
        raise RecordError(f"expected one {TEXT_KEY!r} string, got {values!r}")
    try:
        return values[0].decode("utf-8")
    except (AttributeError, UnicodeDecodeError) as e:
        raise RecordError(f"{TEXT_KEY!r} is not UTF-8 text ({e})") from None


# ----------------------------------------------------------------------- shard files


# Open readers and record indexes, per process, keyed by (path, size, mtime): a file
# rewritten in place is opened afresh.
@functools.lru_cache(maxsize=64)
def _array_record_reader(path: str, size: int, mtime_ns: int):
    from array_record.python.array_record_module import ArrayRecordReader

    return ArrayRecordReader(path, "readahead_buffer_size:0")


@functools.lru_cache(maxsize=64)
def _tfrecord_offsets(path: str, size: int, mtime_ns: int) -> tuple[tuple[int, int], ...]:
    """``(data offset, length)`` of every record of a TFRecord file: each record is
    ``uint64 length, uint32 crc(length), data, uint32 crc(data)``; only the headers are read."""
    offsets, pos = [], 0
    with open(path, "rb") as f:
        while pos < size:
            f.seek(pos)
            head = f.read(12)
            if len(head) < 12:
                break  # a truncated tail: the records it held read as missing
            (length,) = struct.unpack("<Q", head[:8])
            if pos + 12 + length + 4 > size:
                break
            offsets.append((pos + 12, length))
            pos += 12 + length + 4
    return tuple(offsets)


def _read_record(file_format: str, path: str, offset: int) -> bytes:
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if file_format == "array_record":
        reader = _array_record_reader(*key)
        if offset >= reader.num_records():
            raise RecordError(f"{os.path.basename(path)} holds {reader.num_records()} records, not {offset + 1}")
        try:
            return reader.read([offset])[0]
        except RuntimeError as e:  # riegeli: a damaged chunk (hash mismatch, cut file)
            raise RecordError(f"unreadable record ({e})") from None
    offsets = _tfrecord_offsets(*key)
    if offset >= len(offsets):
        raise RecordError(f"{os.path.basename(path)} holds {len(offsets)} complete records, not {offset + 1}")
    start, length = offsets[offset]
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(length)


# ------------------------------------------------------------------------ resolution


def _parse_value(value: str) -> tuple[str, str | None, str | None, str]:
    """``tfds:NAME[/CONFIG][/VERSION]:SPLIT`` -> (name, config, version, split)."""
    body = value[len(PREFIX):]
    path, sep, split = body.rpartition(":")
    parts = path.split("/") if sep else []
    if not sep or not split or not 1 <= len(parts) <= 3 or not all(parts):
        raise TfdsError(f"{value!r}: expected tfds:NAME[/CONFIG][/VERSION]:SPLIT, e.g. tfds:librispeech/default:dev_clean")
    name, rest = parts[0], parts[1:]
    version = rest.pop() if rest and re.fullmatch(r"\d+\.\d+\.\d+", rest[-1]) else None
    if len(rest) > 1:
        raise TfdsError(f"{value!r}: {'/'.join(rest)!r} is not CONFIG[/VERSION] (a version is like 2.1.1)")
    return name, (rest[0] if rest else None), version, split


def _version_folder(base: Path, version: str | None, value: str) -> Path:
    if version is not None:
        folder = base / version
    else:
        found = [p for p in base.glob("*.*.*") if (p / "dataset_info.json").is_file()]
        if not found:
            configs = sorted(p.name for p in base.iterdir()
                             if p.is_dir() and not p.name[0].isdigit() and not p.name.startswith("."))
            hint = f" (configs there: {configs}: name one, tfds:NAME/CONFIG:SPLIT)" if configs else ""
            raise TfdsError(f"{value}: no prepared version under {base}{hint}")
        folder = max(found, key=lambda p: tuple(int(x) for x in p.name.split(".") if x.isdigit()))
    if not (folder / "dataset_info.json").is_file():
        raise TfdsError(f"{value}: {folder} holds no dataset_info.json (not prepared there?)")
    return folder


def default_data_dir() -> str:
    """TFDS's default data folder: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _speech_feature(features: dict, folder: Path, value: str) -> _Speech:
    feats = features.get("featuresDict", {}).get("features", {})
    key = next((k for k in SPEECH_KEYS if k in feats), None)
    if key is None or TEXT_KEY not in feats:
        raise TfdsError(
            f"{value}: needs a {' or '.join(map(repr, SPEECH_KEYS))} feature and a {TEXT_KEY!r} "
            f"feature; {folder / 'features.json'} has {sorted(feats)}"
        )
    spec = feats[key]
    body = spec.get("audio") or spec.get("tensor")
    if body is None:
        raise TfdsError(f"{value}: feature {key!r} is a {spec.get('pythonClassName')}, not Audio or Tensor")
    dims = [int(d) for d in body.get("shape", {}).get("dimensions", [])]
    if len(dims) not in (1, 2) or dims[0] != -1:
        raise TfdsError(f"{value}: feature {key!r} has shape {dims}, expected [None] or [None, C]")
    rate = int(body.get("sampleRate", 0)) or _metadata_rate(folder)
    if not rate:
        raise TfdsError(f"{value}: feature {key!r} states no sample rate, nor does metadata.json")
    lazy = bool(body.get("lazyDecode", False))
    return _Speech(key=key, dtype=body.get("dtype", "int64"), encoded=lazy,
                   encoding=str(body.get("encoding", "none")).lower(),
                   channels=dims[1] if len(dims) == 2 else 0, sample_rate=rate)


def _metadata_rate(folder: Path) -> int:
    try:
        return int(json.loads((folder / "metadata.json").read_text()).get("sample_rate", 0))
    except (OSError, ValueError, TypeError):
        return 0


def _shard_files(info: dict, folder: Path, split: str, value: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    splits = {s["name"]: s for s in info.get("splits", [])}
    if split not in splits:
        raise TfdsError(f"{value}: no split {split!r}; {folder} has {sorted(splits)}")
    s = splits[split]
    lengths = tuple(int(n) for n in s.get("shardLengths", []))
    if not lengths:
        raise TfdsError(f"{value}: {folder / 'dataset_info.json'} states no shardLengths for {split!r}")
    template = s.get("filepathTemplate") or "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
    fmt = info.get("fileFormat") or "tfrecord"
    files = []
    for i in range(len(lengths)):
        name = (template.replace("{DATASET}", info["name"]).replace("{SPLIT}", split)
                .replace("{FILEFORMAT}", fmt).replace("{SHARD_X_OF_Y}", f"{i:05d}-of-{len(lengths):05d}")
                .replace("{SHARD_INDEX}", f"{i:05d}").replace("{NUM_SHARDS}", f"{len(lengths):05d}"))
        path = folder / name
        if not path.is_file():
            raise TfdsError(f"{value}: shard file {path} is missing")
        files.append(str(path))
    return tuple(files), lengths


def open_split(value: str, data_dir: str = "") -> TfdsSplit:
    """The split a ``tfds:`` value names, under `data_dir` ('' = :func:`default_data_dir`).

    Raises:
      TfdsError: a malformed value; no such dataset, config, version or split prepared
        there; a format other than array_record / tfrecord; no speech or text feature.
    """
    name, config, version, split = _parse_value(value)
    root = Path(os.path.expanduser(data_dir or default_data_dir()))
    base = root / name / config if config else root / name
    if not base.is_dir():
        raise TfdsError(f"{value}: {base} does not exist (data.tfds_data_dir={str(root)!r})")
    folder = _version_folder(base, version, value)
    info = json.loads((folder / "dataset_info.json").read_text())
    fmt = info.get("fileFormat") or "tfrecord"
    if fmt not in FORMATS:
        raise TfdsError(f"{value}: file format {fmt!r} is not one of {FORMATS}")
    features = json.loads((folder / "features.json").read_text())
    files, lengths = _shard_files(info, folder, split, value)
    normalized = f"{PREFIX}{name}{'/' + config if config else ''}/{folder.name}:{split}"
    return TfdsSplit(normalized, str(folder), fmt, files, lengths, _speech_feature(features, folder, value))
