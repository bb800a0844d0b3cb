"""Manifests: round trip, path resolution, malformed lines (raise and skip modes)."""

import json
import logging
import os

import pytest

from usmqs.data.manifest import (
    ManifestError,
    SkippedLine,
    Utterance,
    read_manifest,
    write_manifest,
)


def _write_lines(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else line.encode() + b"\n"
                              for line in lines))
    return path


def test_round_trip_with_relative_paths(tmp_path):
    rows = [
        {"audio_filepath": str(tmp_path / "audio" / "a.wav"), "text": "call mom", "duration": 1.5},
        {"audio_filepath": str(tmp_path / "b.flac"), "text": "caf\u00e9", "duration": None},
    ]
    path = write_manifest(tmp_path / "m" / "train.jsonl", rows, relative=True)
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["audio_filepath"] for r in raw] == ["../audio/a.wav", "../b.flac"]
    assert list(raw[0]) == ["audio_filepath", "text", "duration"]
    got = read_manifest(path)
    assert got == [
        Utterance(rows[0]["audio_filepath"], "call mom", 1.5, str(path), 1),
        Utterance(rows[1]["audio_filepath"], "caf\u00e9", None, str(path), 2),
    ]
    # Utterances write back unchanged.
    again = write_manifest(tmp_path / "again.jsonl", got)
    assert [u.audio_filepath for u in read_manifest(again)] == [r["audio_filepath"] for r in rows]


def test_relative_paths_resolve_against_manifest_folder_not_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    folder.mkdir()
    path = _write_lines(folder / "m.jsonl", [
        json.dumps({"audio_filepath": "audio/x.wav", "text": "a", "duration": 1}),
        json.dumps({"audio_filepath": "/abs/y.wav", "text": "b", "duration": 2.5}),
        json.dumps({"audio_filepath": "./sub/../z.wav", "text": "c"}),
    ])
    monkeypatch.chdir(tmp_path)
    rows = read_manifest(os.path.relpath(path))
    assert [r.audio_filepath for r in rows] == [
        str(folder / "audio" / "x.wav"), "/abs/y.wav", str(folder / "z.wav")
    ]
    assert rows[0].duration == 1.0 and isinstance(rows[0].duration, float)
    assert rows[2].duration is None
    assert all(r.manifest == str(path) for r in rows)


def test_utterance_is_frozen():
    u = Utterance("/a.wav", "t", 1.0, "/m.jsonl", 1)
    with pytest.raises(AttributeError):
        u.text = "other"


GOOD = json.dumps({"audio_filepath": "a.wav", "text": "ok", "duration": 1.0})
BAD_LINES = [
    ("{not json", "invalid JSON"),
    ('["a.wav", "text"]', "expected a JSON object"),
    ('{"text": "no audio", "duration": 1}', "missing key 'audio_filepath'"),
    ('{"audio_filepath": "a.wav", "duration": 1}', "missing key 'text'"),
    ('{"audio_filepath": 3, "text": "t"}', "'audio_filepath' must be a string"),
    ('{"audio_filepath": "a.wav", "text": null}', "'text' must be a string"),
    ('{"audio_filepath": "  ", "text": "t"}', "'audio_filepath' is empty"),
    ('{"audio_filepath": "a.wav", "text": "t", "duration": "1.0"}', "'duration' must be a number"),
    ('{"audio_filepath": "a.wav", "text": "t", "duration": true}', "'duration' must be a number"),
    ('{"audio_filepath": "a.wav", "text": "t", "duration": -1}', "finite and >= 0"),
    ('{"audio_filepath": "a.wav", "text": "t", "duration": NaN}', "finite and >= 0"),
    (b'{"audio_filepath": "a.wav", "text": "\xff\xfe"}\n', "not valid UTF-8"),
]


@pytest.mark.parametrize("bad, what", BAD_LINES)
def test_malformed_line_error_names_file_and_line(tmp_path, bad, what):
    path = _write_lines(tmp_path / "m.jsonl", [GOOD, "", bad, GOOD])  # blank line 2
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert what in str(info.value)
    assert (info.value.path, info.value.line) == (str(path), 3)


def test_skip_mode_returns_good_rows_and_counts_skips(tmp_path, caplog):
    lines = [GOOD, BAD_LINES[0][0], GOOD, "", BAD_LINES[2][0], BAD_LINES[9][0], GOOD]
    path = _write_lines(tmp_path / "m.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="usmqs.data.manifest"):
        rows, skipped = read_manifest(path, on_error="skip")
    assert [r.line for r in rows] == [1, 3, 7]
    assert [s.line for s in skipped] == [2, 5, 6]
    assert all(isinstance(s, SkippedLine) for s in skipped)
    assert "invalid JSON" in skipped[0].reason and "missing key" in skipped[1].reason
    per_line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(per_line) == 3 and f"{path}:5: missing key" in per_line[1]


def test_skip_mode_on_clean_manifest_and_bad_mode(tmp_path):
    path = _write_lines(tmp_path / "m.jsonl", [GOOD, GOOD])
    rows, skipped = read_manifest(path, on_error="skip")
    assert len(rows) == 2 and skipped == []
    with pytest.raises(ValueError):
        read_manifest(path, on_error="ignore")


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "none.jsonl")


def test_write_manifest_is_atomic_and_deterministic(tmp_path):
    rows = [{"audio_filepath": "/x/a.wav", "text": "t", "duration": 0.1 + 0.2, "extra": 1}]
    a = write_manifest(tmp_path / "a.jsonl", rows)
    b = write_manifest(tmp_path / "b.jsonl", rows)
    assert a.read_bytes() == b.read_bytes()
    assert json.loads(a.read_text()) == {"audio_filepath": "/x/a.wav", "text": "t",
                                         "duration": 0.30000000000000004}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]
