"""TFDS's own librispeech builder, where TensorFlow is installed (``pip install -e
'.[tfds-build]'``; skipped otherwise): its datasets, in both of TFDS's file formats, read
by `usmqs.data.tfds_source` as TFDS reads them with TF.

The builder is `tensorflow_datasets`' ``librispeech`` class itself (its ``_info``,
configs, ``_generate_examples`` over a LibriSpeech folder); only ``_split_generators``
is pointed at a local folder instead of openslr.org. The ``default`` config decodes each
flac with pydub + ffmpeg, which this machine lacks, so for it the examples from
``_generate_examples`` get their samples decoded with soundfile (the stored bytes are
what ``Audio(int16)`` makes of them either way); ``lazy_decode`` stores the flac files
as they are.
"""

from __future__ import annotations

import io

import pytest

pytest.importorskip("tensorflow")  # first: without TF the module costs nothing more

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from tensorflow_datasets.datasets.librispeech import librispeech_dataset_builder  # noqa: E402

from test_tfds_source import NUM_DEV, corpus_rows, write_librispeech_folder  # noqa: E402
from usmqs.data import pipeline, tfds_source  # noqa: E402
from usmqs.data.text import normalize_text  # noqa: E402
from usmqs.data.tokenizer import Tokenizer  # noqa: E402


class LocalLibriSpeech(librispeech_dataset_builder.Builder, skip_registration=True):
    name = "librispeech"

    def __init__(self, *, source, **kwargs):
        self.source = source
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        return {"dev_clean": self._examples(self.source / "dev_clean")}

    def _examples(self, directory):
        for key, example in self._generate_examples(directory):
            if not self.builder_config.lazy_decode:  # no pydub/ffmpeg here
                example["speech"] = sf.read(example["speech"], dtype="int16")[0]
            yield key, example


@pytest.fixture(scope="module")
def built(small_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds_tf")
    rows = corpus_rows(small_corpus["test"], NUM_DEV)
    write_librispeech_folder(root / "src", "dev_clean", rows)
    for config, fmt in (("default", "array_record"), ("lazy_decode", "tfrecord")):
        LocalLibriSpeech(source=root / "src", config=config, data_dir=str(root / fmt),
                         file_format=fmt).download_and_prepare()
    tok = Tokenizer.train([normalize_text(t) for _, t in rows], root / "tokenizer", 0, model_type="char")
    return {"root": root, "rows": rows, "tok": tok}


@pytest.mark.parametrize("config, fmt", [("default", "array_record"), ("lazy_decode", "tfrecord")])
def test_records_are_what_tfds_reads_with_tensorflow(built, config, fmt):
    data_dir = str(built["root"] / fmt)
    ours = tfds_source.open_split(f"tfds:librispeech/{config}:dev_clean", data_dir)
    assert ours.file_format == fmt and ours.speech.encoded == (config == "lazy_decode")
    builder = tfds.builder_from_directory(ours.folder)
    if fmt == "array_record":  # random access; TFDS decodes its Audio with TF
        theirs = list(builder.as_data_source(split="dev_clean"))
    else:
        # Its Audio(lazy_decode) decoder wants tensorflow_io even to hand over the bytes.
        skip = {"speech": tfds.decode.SkipDecoding()}
        theirs = list(tfds.as_numpy(builder.as_dataset(split="dev_clean", shuffle_files=False, decoders=skip)))
    assert len(theirs) == len(ours) == NUM_DEV
    for i, ex in enumerate(theirs):
        text, load = tfds_source.TfdsRecord(ours, i).read()
        assert text == ex["text"].decode()
        speech = ex["speech"]
        if config == "lazy_decode":  # TFDS hands over the flac bytes
            speech = sf.read(io.BytesIO(speech), dtype="int16")[0]
        np.testing.assert_array_equal(load(), speech.astype(np.float32) / 32768)


def test_both_formats_prepare_the_same_examples(built, tmp_path):
    cfg = pipeline.default_data_config()
    cfg.update(bucket_boundaries=(400,), max_frames=400)
    splits = []
    for config, fmt in (("default", "array_record"), ("lazy_decode", "tfrecord")):
        cfg.tfds_data_dir = str(built["root"] / fmt)
        splits.append(pipeline.prepare_split(f"tfds:librispeech/{config}:dev_clean", built["tok"], cfg,
                                             tmp_path / fmt, train=False))
    a, b = ([{k: m[k] for k in ("text", "num_frames", "num_labels")} for m in s.metadata] for s in splits)
    assert a == b and len(a) == NUM_DEV and not splits[0].skipped
