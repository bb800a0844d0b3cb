"""import_librispeech on a fake openslr tree made of a few short flacs."""

import logging
import os

import numpy as np
import pytest
import soundfile as sf

from usmqs.data.librispeech import find_splits, import_librispeech
from usmqs.data.manifest import read_manifest

SR = 16000


def _flac(path, seconds):
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(len(str(path))).uniform(-0.3, 0.3, int(SR * seconds))
    sf.write(path, noise.astype(np.float32), SR)


def _chapter(split_dir, speaker, chapter, utterances, extra_lines=()):
    """utterances: {utt number: (TEXT, seconds or None for no flac)}."""
    folder = split_dir / str(speaker) / str(chapter)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for number, (text, seconds) in utterances.items():
        utt_id = f"{speaker}-{chapter}-{number:04d}"
        lines.append(f"{utt_id} {text}")
        if seconds is not None:
            _flac(folder / f"{utt_id}.flac", seconds)
    lines += list(extra_lines)
    (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def libri(tmp_path):
    root = tmp_path / "LibriSpeech"
    dev = root / "dev-clean"
    _chapter(dev, 103, 1240, {0: ("CHAPTER ONE MISSUS RACHEL LYNDE", 0.5),
                              1: ("THAT HAD ITS SOURCE AWAY BACK", 0.25)})
    _chapter(dev, 19, 198, {0: ("NORTHANGER ABBEY", 0.3),
                            1: ("THE MISSING ONE", None),          # no flac
                            2: ("IT WAS THE BOY'S DOG", 0.2)})
    # A flac with no transcript line, and a corrupt flac.
    _flac(dev / "19" / "198" / "19-198-0099.flac", 0.1)
    bad = _chapter(dev, 19, 227, {0: ("BROKEN AUDIO", 0.1)})
    (bad / "19-227-0000.flac").write_bytes(b"not a flac at all" * 10)
    test = root / "test-other"
    _chapter(test, 1688, 142285, {0: ("THERE'S IRON THEY SAY", 0.4)})
    (root / "README.TXT").write_text("not a split")
    (root / "empty-dir").mkdir()
    return root


def test_imports_every_split(libri, tmp_path, caplog):
    out = tmp_path / "manifests"
    with caplog.at_level(logging.WARNING, logger="usmqs.data.librispeech"):
        manifests = import_librispeech(libri, out)
    assert manifests == {"dev-clean": out / "dev-clean.jsonl",
                         "test-other": out / "test-other.jsonl"}
    dev = read_manifest(manifests["dev-clean"])
    # Speaker 19 before 103 (numeric order), utterances in transcript order.
    assert [os.path.basename(u.audio_filepath) for u in dev] == [
        "19-198-0000.flac", "19-198-0002.flac", "103-1240-0000.flac", "103-1240-0001.flac"
    ]
    assert [u.text for u in dev] == [
        "northanger abbey", "it was the boy's dog", "chapter one missus rachel lynde",
        "that had its source away back",
    ]
    assert [u.duration for u in dev] == pytest.approx([0.3, 0.2, 0.5, 0.25])
    assert all(os.path.isabs(u.audio_filepath) and os.path.isfile(u.audio_filepath)
               for u in dev)
    test = read_manifest(manifests["test-other"])
    assert [u.text for u in test] == ["there's iron they say"]

    messages = [r.getMessage() for r in caplog.records]
    assert sum("no audio file" in m for m in messages) == 1
    assert sum("no transcript line" in m for m in messages) == 1
    assert sum("unreadable" in m and "19-227-0000.flac" in m for m in messages) == 1
    summary = [m for m in messages if m.startswith("dev-clean: skipped")]
    assert summary == ["dev-clean: skipped {'missing audio': 1, 'missing transcript': 1, "
                       "'unreadable audio': 1}"]


def test_single_split_folder(libri, tmp_path):
    manifests = import_librispeech(libri / "test-other", tmp_path / "out")
    assert list(manifests) == ["test-other"]
    assert len(read_manifest(manifests["test-other"])) == 1


def test_find_splits_and_errors(libri, tmp_path):
    assert sorted(find_splits(libri)) == ["dev-clean", "test-other"]
    with pytest.raises(ValueError, match="no LibriSpeech transcripts"):
        import_librispeech(libri / "empty-dir", tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        import_librispeech(tmp_path / "nowhere", tmp_path / "out")
