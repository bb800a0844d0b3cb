"""`tfds:` manifests on a LibriSpeech-format TFDS dataset, without TensorFlow.

The dataset is built here by TFDS's own machinery (`tfds.core.GeneratorBasedBuilder`,
``download_and_prepare`` into ArrayRecord) from a small LibriSpeech-layout folder of flac
files and transcripts made from the embedded corpus. The builder is `LibriSpeechNoTF`
below, not TFDS's librispeech builder: that one's ``Audio`` feature cannot be made
without TensorFlow (tests/data/test_tfds_tensorflow.py builds with it where TF is
installed). Its ``speech`` is a ``Tensor(int16, [None])``, which TFDS serializes exactly as
librispeech's ``Audio(int16)`` (an int64 list of samples), and its sample rate is in
``metadata.json`` as librispeech writes it. The default install (``.[synth,dev]``) has
no TensorFlow, so there these tests show that building and reading need none.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import soundfile as sf

from conftest import tiny_config
from usmqs.data import pipeline, tfds_source
from usmqs.data.audio import load_audio
from usmqs.data.text import normalize_text
from usmqs.data.tokenizer import Tokenizer

tfds = pytest.importorskip("tensorflow_datasets")

TRAIN, DEV = "tfds:librispeech/default:train_clean100", "tfds:librispeech/default:dev_clean"
NUM_TRAIN, NUM_DEV = 36, 12
# The bad records of train_clean100 (after the good ones, in this order) and their reason.
BAD = ["audio_error", "empty_transcript", "unknown_chars", "labels_too_long", "malformed_line"]


class LibriSpeechNoTF(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """librispeech's features, configs and folder walk, with TF-free features."""

    name = "librispeech"
    VERSION = tfds.core.Version("2.1.1")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="default", version="2.1.1")]

    def __init__(self, *, source: pathlib.Path, **kwargs):
        self.source = source
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "speech": tfds.features.Tensor(shape=(None,), dtype=np.int16),
                "text": tfds.features.Text(),
                "speaker_id": np.int64,
                "chapter_id": np.int64,
                "id": np.str_,
            }),
            supervised_keys=("speech", "text"),
            metadata=tfds.core.MetadataDict(sample_rate=16000),
        )

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(self.source / s) for s in ("train_clean100", "dev_clean")}

    def _generate_examples(self, directory):
        for transcripts in sorted(directory.glob("LibriSpeech/*/*/*/*.txt")):
            for line in transcripts.read_text().splitlines():
                key, text = line.split(" ", 1)
                speaker, chapter = (int(x) for x in key.split("-")[:2])
                flac = transcripts.parent / f"{key}.flac"
                # A 0-byte file (libsndfile cannot open it) is a record without samples.
                audio = sf.read(flac, dtype="int16")[0] if flac.stat().st_size else np.zeros(0, np.int16)
                yield key, {"id": key, "speaker_id": speaker, "chapter_id": chapter, "speech": audio, "text": text}


def write_librispeech_folder(root: pathlib.Path, split: str, rows: list[tuple[np.ndarray, str]]) -> None:
    """``root/split/LibriSpeech/SPLIT/19/198/19-198-NNNN.flac`` + the chapter's transcript
    file (keys sort in row order, as TFDS's shuffle does not: records follow their keys'
    hashes, so tests look records up by ``id``)."""
    chapter = root / split / "LibriSpeech" / split.replace("_", "-") / "19" / "198"
    chapter.mkdir(parents=True)
    lines = []
    for i, (audio, text) in enumerate(rows):
        flac = chapter / f"19-198-{i:04d}.flac"
        if audio.size:
            sf.write(flac, audio, 16000, subtype="PCM_16")
        else:
            flac.write_bytes(b"")
        lines.append(f"19-198-{i:04d} {text.upper()}")
    (chapter / "19-198.trans.txt").write_text("\n".join(lines) + "\n")


def corpus_rows(manifest: pathlib.Path, n: int) -> list[tuple[np.ndarray, str]]:
    rows = [json.loads(line) for line in manifest.read_text().splitlines()[:n]]
    return [(load_audio(manifest.parent / r["audio_filepath"]), r["text"]) for r in rows]


def corrupt_record(path: pathlib.Path, index: int) -> None:
    """Rewrite an ArrayRecord shard with record `index` replaced by bytes that are no
    tf.train.Example (a damaged shard)."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    reader = ArrayRecordReader(str(path))
    records = reader.read_all()
    reader.close()
    records[index] = b"\xff\x00 not a proto"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()


@pytest.fixture(scope="module")
def dataset(small_corpus, tmp_path_factory):
    """``DATA_DIR/librispeech/default/2.1.1`` (ArrayRecord): train_clean100 = 36 corpus
    utterances + the BAD records, dev_clean = 12; and a char tokenizer of the train texts."""
    root = tmp_path_factory.mktemp("tfds")
    train = corpus_rows(small_corpus["train"], NUM_TRAIN)
    tone = train[0][0]
    bad = [
        (np.zeros(0, np.float32), "call mom"),  # no samples
        (tone, "€ !!"),  # nothing left after normalize_text
        (tone, "call mom 7"),  # '7' is in no train text
        (tone[:4000], "call mom at seven in the evening please"),  # 0.25 s for 39 labels
        (tone, "call mom"),  # its record is overwritten with garbage below
    ]
    write_librispeech_folder(root / "src", "train_clean100", train + bad)
    write_librispeech_folder(root / "src", "dev_clean", corpus_rows(small_corpus["test"], NUM_DEV))
    data_dir = root / "data"
    builder = LibriSpeechNoTF(source=root / "src", data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    source = tfds_source.open_split(TRAIN, str(data_dir))
    ids = [source.read(i)["id"][0].decode() for i in range(len(source))]
    shard = pathlib.Path(source.files[0])
    corrupt_record(shard, ids.index(f"19-198-{NUM_TRAIN + BAD.index('malformed_line'):04d}"))
    texts = [normalize_text(t) for _, t in train]
    tok = Tokenizer.train(texts, root / "tokenizer", 0, model_type="char")
    return {"data_dir": str(data_dir), "ids": ids, "tok": tok, "train": train, "root": root}


def _cfg(data_dir, **overrides):
    cfg = pipeline.default_data_config()
    cfg.tfds_data_dir = data_dir
    cfg.bucket_boundaries = (400,)
    cfg.max_frames = 400
    cfg.batch_size = 4
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def test_records_prepare_as_manifest_lines_with_counted_skips(dataset, tmp_path):
    split = pipeline.prepare_split(TRAIN, dataset["tok"], _cfg(dataset["data_dir"]), tmp_path, train=True)
    assert split.manifest == "tfds:librispeech/default/2.1.1:train_clean100"
    # Every bad record under its reason (the corpus' own utterances all fit the micro
    # buckets and their labels).
    assert split.skipped == {reason: 1 for reason in BAD}
    assert split.num_examples == NUM_TRAIN
    by_reason = {e["reason"]: e for e in split.skip_log}
    for reason in BAD:
        key = f"19-198-{NUM_TRAIN + BAD.index(reason):04d}"
        assert by_reason[reason]["line"] == dataset["ids"].index(key) + 1, reason
    assert "not a tf.train.Example" in by_reason["malformed_line"]["detail"]
    report = pipeline.skip_report(split)
    assert f"{split.manifest}:{by_reason['audio_error']['line']}: " in report
    assert "kept 36 of 41 utterances" in report


def test_features_are_those_of_the_flac_files(dataset, tmp_path):
    """A record's features and labels are what the same audio and text give through a
    JSON manifest: one preparation, two sources."""
    import grain

    cfg = _cfg(dataset["data_dir"])
    split = pipeline.prepare_split(TRAIN, dataset["tok"], cfg, tmp_path, train=True)
    examples = grain.sources.ArrayRecordDataSource(list(split.paths))
    meta = split.metadata[3]
    index = int(meta["audio_filepath"].rsplit("[", 1)[1].rstrip("]"))
    key = int(dataset["ids"][index].rsplit("-", 1)[1])
    audio, text = dataset["train"][key]
    got = pipeline.decode_example(examples[3])
    np.testing.assert_array_equal(got["features"], pipeline.stored_log_mel(audio, pipeline.feature_config(cfg)))
    assert list(got["labels"]) == dataset["tok"].encode(normalize_text(text))
    assert meta["text"] == normalize_text(text)


def test_error_mode_names_the_record(dataset, tmp_path):
    cfg = _cfg(dataset["data_dir"], on_bad_input="error")
    with pytest.raises(ValueError, match=r"tfds:librispeech/default/2\.1\.1:train_clean100:\d+: "):
        pipeline.prepare_split(TRAIN, dataset["tok"], cfg, tmp_path, train=True)


def test_two_processes_prepare_the_same_split(dataset, tmp_path):
    cfg = _cfg(dataset["data_dir"], prepare_shard_lines=16)
    one = pipeline.prepare_split(DEV, dataset["tok"], cfg, tmp_path / "one", train=False)
    for p in (1, 0):  # process 1 first: process 0 then finds shard 1 done and assembles
        two = pipeline.prepare_split(DEV, dataset["tok"], cfg, tmp_path / "two", train=False,
                                     process_index=p, process_count=2)
    assert one.metadata == two.metadata and len(two.paths) == 1
    cfg.prepare_shard_lines = 5
    three = pipeline.prepare_split(DEV, dataset["tok"], cfg, tmp_path / "three", train=False)
    assert three.metadata == one.metadata and len(three.paths) == 3


def test_tfrecord_files_read_alike(dataset, tmp_path):
    """TFRecord framing (TFDS's default format) read without TF: the ArrayRecord dataset
    rewritten as TFRecord shards gives the same records; a truncated tail record is a
    malformed line, not a crash."""
    import shutil
    import struct

    src = pathlib.Path(dataset["data_dir"]) / "librispeech/default/2.1.1"
    dst = tmp_path / "librispeech/default/2.1.1"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.array_record-*"))
    info = json.loads((dst / "dataset_info.json").read_text())
    info["fileFormat"] = "tfrecord"
    (dst / "dataset_info.json").write_text(json.dumps(info))
    arrays = tfds_source.open_split(DEV, dataset["data_dir"])
    for path in arrays.files:
        from array_record.python.array_record_module import ArrayRecordReader

        reader = ArrayRecordReader(path)
        with open(dst / pathlib.Path(path).name.replace("array_record", "tfrecord"), "wb") as f:
            for r in reader.read_all():  # checksums are not checked: zeros
                f.write(struct.pack("<QI", len(r), 0) + r + b"\0\0\0\0")
        reader.close()
    records = tfds_source.open_split(DEV, str(tmp_path))
    assert records.file_format == "tfrecord" and len(records) == len(arrays) == NUM_DEV
    assert all(records.read(i) == arrays.read(i) for i in range(NUM_DEV))
    last = pathlib.Path(records.files[-1])
    last.write_bytes(last.read_bytes()[:-10])
    split = pipeline.prepare_split(DEV, dataset["tok"], _cfg(str(tmp_path)), tmp_path / "cache", train=False)
    assert split.skipped == {"malformed_line": 1} and split.num_examples == NUM_DEV - 1


@pytest.mark.parametrize("value, message", [
    ("tfds:librispeech", "expected tfds:NAME"),
    ("tfds:librispeech/default/extra:dev_clean", "is not CONFIG"),
    ("tfds:nosuch/default:dev_clean", "nosuch/default does not exist"),
    ("tfds:librispeech:dev_clean", r"configs there: \['default'\]"),
    ("tfds:librispeech/default/9.9.9:dev_clean", "holds no dataset_info.json"),
    ("tfds:librispeech/default:test_other", "no split 'test_other'"),
])
def test_bad_values_say_what_is_missing(dataset, value, message):
    with pytest.raises(tfds_source.TfdsError, match=message):
        tfds_source.open_split(value, dataset["data_dir"])


@pytest.mark.slow
def test_a_tiny_run_trains_and_evaluates_on_tfds_splits(dataset, tmp_path):
    from usmqs import train

    cfg = tiny_config({"train": TRAIN, "test": DEV}, steps=4)  # as test_train.float_run: its programs
    cfg.data.tfds_data_dir = dataset["data_dir"]
    workdir = tmp_path / "run"
    metrics = train.train_and_evaluate(cfg, workdir)
    assert 0.0 <= metrics["wer"]
    rows = [json.loads(line) for line in (workdir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == NUM_DEV
    assert all(r["audio_filepath"].startswith("tfds:librispeech/default/2.1.1:dev_clean[") for r in rows)
    # The tokenizer was trained on the split's transcripts (the corrupt record left out).
    assert (workdir / "tokenizer.model").exists()
