"""NeMo-style JSON-lines manifests: one ``{"audio_filepath", "text", "duration"}`` per line.

Relative ``audio_filepath`` values are resolved against the manifest's own folder, so a
corpus folder can be moved or copied as a whole. Keys other than the three are ignored.
``duration`` (seconds) may be missing or null; it is then ``None``.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, overload

__all__ = [
    "ManifestError",
    "OnError",
    "SkippedLine",
    "Utterance",
    "read_manifest",
    "write_manifest",
]

log = logging.getLogger(__name__)


class ManifestError(ValueError):
    """A malformed manifest line. The message is ``"{path}:{line}: {reason}"``.

    Attributes:
      path: the manifest file.
      line: 1-based line number.
      reason: what is wrong, in words.
    """

    def __init__(self, path: str | os.PathLike, line: int, reason: str):
        self.path = os.fspath(path)
        self.line = line
        self.reason = reason
        super().__init__(f"{self.path}:{line}: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.line, self.reason))


class OnError(enum.StrEnum):
    """What :func:`read_manifest` does with a malformed line."""

    RAISE = "raise"  # stop at the first one with a ManifestError
    SKIP = "skip"  # log a warning, leave the line out, report it in the skipped list


class SkippedLine(NamedTuple):
    """A line left out by ``read_manifest(..., on_error="skip")``."""

    line: int  # 1-based line number
    reason: str


@dataclass(frozen=True)
class Utterance:
    """One manifest row.

    Attributes:
      audio_filepath: absolute path of the audio file (normalized, not checked to exist).
      text: the transcript as written in the manifest (not normalized).
      duration: seconds, or None when the manifest does not say.
      manifest: absolute path of the manifest the row came from.
      line: 1-based line number in that manifest.
    """

    audio_filepath: str
    text: str
    duration: float | None
    manifest: str
    line: int


def _parse_line(raw: bytes, folder: str, require_text: bool = True) -> tuple[str, str, float | None]:
    """Validates one line; returns (absolute audio path, text, duration) or raises ValueError.
    Without `require_text` a missing (or null) text is ``""``."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if not require_text and row.get("text") is None:
        row["text"] = ""
    for key in ("audio_filepath", "text"):
        if key not in row:
            raise ValueError(f"missing key {key!r}")
        if not isinstance(row[key], str):
            raise ValueError(f"{key!r} must be a string, got {type(row[key]).__name__}")
    audio = row["audio_filepath"]
    if not audio.strip():
        raise ValueError("'audio_filepath' is empty")
    duration = row.get("duration")
    if duration is not None:
        # bool is an int subclass; `true` as a duration is a bug upstream, not 1 second.
        if isinstance(duration, bool) or not isinstance(duration, (int, float)):
            raise ValueError(f"'duration' must be a number, got {type(duration).__name__}")
        if not math.isfinite(duration) or duration < 0:
            raise ValueError(f"'duration' must be finite and >= 0, got {duration}")
        duration = float(duration)
    return os.path.normpath(os.path.join(folder, audio)), row["text"], duration


@overload
def read_manifest(
    path: str | os.PathLike, on_error: Literal["raise", OnError.RAISE] = ..., *, require_text: bool = ...
) -> list[Utterance]: ...
@overload
def read_manifest(
    path: str | os.PathLike, on_error: Literal["skip", OnError.SKIP], *, require_text: bool = ...
) -> tuple[list[Utterance], list[SkippedLine]]: ...
def read_manifest(path, on_error="raise", *, require_text=True):
    """Reads a JSON-lines manifest.

    Blank lines are ignored. Each other line must be a JSON object with a string
    ``audio_filepath`` (non-empty; relative paths are resolved against the manifest's
    folder), a string ``text`` and optionally a number ``duration`` >= 0 (or null).

    Args:
      path: the manifest file.
      on_error: ``"raise"`` (default) or ``"skip"`` (see :class:`OnError`).
      require_text: False: ``text`` may be missing or null (audio to transcribe); it is
        then ``""``.

    Returns:
      ``"raise"``: the rows, in file order.
      ``"skip"``: ``(rows, skipped)`` where ``skipped`` lists every malformed line as a
      :class:`SkippedLine`; each skip is also logged with ``logging.warning``.

    Raises:
      ManifestError: (``"raise"`` only) the first malformed line, as ``path:line: reason``.
      FileNotFoundError: the manifest does not exist.
    """
    mode = OnError(on_error)  # ValueError for anything but "raise"/"skip"
    manifest = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(manifest)
    rows: list[Utterance] = []
    skipped: list[SkippedLine] = []
    with open(manifest, "rb") as f:  # bytes: a bad encoding is reported per line
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                audio, text, duration = _parse_line(raw, folder, require_text)
            except ValueError as e:
                if mode is OnError.RAISE:
                    raise ManifestError(os.fspath(path), number, str(e)) from None
                log.warning("skipping %s:%d: %s", os.fspath(path), number, e)
                skipped.append(SkippedLine(number, str(e)))
                continue
            rows.append(Utterance(audio, text, duration, manifest, number))
    if mode is OnError.SKIP:
        if skipped:
            log.warning("%s: skipped %d malformed line(s)", os.fspath(path), len(skipped))
        return rows, skipped
    return rows


def write_manifest(
    path: str | os.PathLike,
    rows: Iterable[Utterance | Mapping],
    *,
    relative: bool = False,
) -> Path:
    """Writes rows as JSON lines ``{"audio_filepath", "text", "duration"}`` (in that order).

    Args:
      path: output file; parent folders are created. Written to a temporary file and
        renamed, so a reader never sees half a manifest.
      rows: :class:`Utterance` objects or mappings with those keys (``duration``
        optional; other keys are dropped).
      relative: write ``audio_filepath`` relative to the manifest's folder (what
        :func:`read_manifest` resolves back); otherwise paths are written as given.

    Returns:
      The path written.
    """
    path = Path(path)
    folder = os.path.abspath(path.parent)
    lines = []
    for row in rows:
        if isinstance(row, Utterance):
            audio, text, duration = row.audio_filepath, row.text, row.duration
        else:
            audio, text, duration = row["audio_filepath"], row["text"], row.get("duration")
        audio = os.fspath(audio)
        if relative:
            audio = os.path.relpath(os.path.abspath(audio), folder)
        record = {"audio_filepath": audio, "text": text, "duration": duration}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path
