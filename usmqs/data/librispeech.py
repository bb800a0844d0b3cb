"""LibriSpeech (openslr SLR12 layout) -> one manifest per split.

Layout read::

    SRC/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    SRC/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   ("<utt-id> TEXT" lines)

``SRC`` is either the folder holding the splits (``LibriSpeech/``) or one split folder
(``LibriSpeech/dev-clean``). Manifests hold ABSOLUTE audio paths: the output folder may
live anywhere relative to the (large, read-only) source tree, and absolute paths stay
valid wherever the manifest is copied on the same machine.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

from usmqs.data.audio import AudioError, audio_duration
from usmqs.data.manifest import write_manifest
from usmqs.data.text import normalize_text

__all__ = ["find_splits", "import_librispeech"]

log = logging.getLogger(__name__)

_TRANS_GLOB = "*/*/*.trans.txt"  # relative to a split folder: speaker/chapter/file


def _natural_key(path: Path) -> tuple:
    # Speakers and chapters are numbers: 19 sorts before 103, as in the openslr listings.
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


def find_splits(src: str | os.PathLike) -> dict[str, Path]:
    """Split name -> split folder, for a LibriSpeech root or a single split folder.

    Raises:
      FileNotFoundError: ``src`` does not exist.
      ValueError: no ``*.trans.txt`` found at ``src/*/*/`` nor ``src/<split>/*/*/``.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"LibriSpeech source {src} is not a directory")
    if next(src.glob(_TRANS_GLOB), None) is not None:
        return {src.resolve().name: src}
    splits = {
        child.name: child
        for child in sorted(src.iterdir())
        if child.is_dir() and next(child.glob(_TRANS_GLOB), None) is not None
    }
    if not splits:
        raise ValueError(
            f"{src}: no LibriSpeech transcripts (<speaker>/<chapter>/*.trans.txt) found "
            "in it or in its sub-folders"
        )
    return splits


def _import_split(name: str, folder: Path, out: Path) -> tuple[Path, Counter]:
    """Writes ``out/<name>.jsonl``; returns its path and counts of kept/skipped rows."""
    counts: Counter = Counter()
    rows = []
    chapters = {p.parent for p in folder.glob("*/*/*.flac")}
    chapters |= {p.parent for p in folder.glob(_TRANS_GLOB)}
    for chapter in sorted(chapters, key=_natural_key):
        transcribed = set()
        for trans in sorted(chapter.glob("*.trans.txt")):
            lines = trans.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                utt_id, _, text = line.strip().partition(" ")
                transcribed.add(utt_id)
                flac = chapter / f"{utt_id}.flac"
                if not text.strip():
                    counts["empty transcript"] += 1
                    log.warning("%s:%d: empty transcript for %s, skipped", trans, number, utt_id)
                    continue
                if not flac.is_file():
                    counts["missing audio"] += 1
                    log.warning("%s:%d: no audio file %s, skipped", trans, number, flac)
                    continue
                try:
                    duration = audio_duration(flac)
                except AudioError as e:
                    counts["unreadable audio"] += 1
                    log.warning("%s, skipped", e)
                    continue
                rows.append(
                    {
                        "audio_filepath": str(flac.resolve()),
                        "text": normalize_text(text),
                        "duration": duration,
                    }
                )
        for flac in sorted(chapter.glob("*.flac")):
            if flac.stem not in transcribed:
                counts["missing transcript"] += 1
                log.warning("%s: no transcript line for it, skipped", flac)
    counts["kept"] = len(rows)
    return write_manifest(out / f"{name}.jsonl", rows), counts


def import_librispeech(src: str | os.PathLike, out: str | os.PathLike) -> dict[str, Path]:
    """Writes ``OUT/<split>.jsonl`` for every LibriSpeech split found under ``src``.

    Each row: absolute flac path, transcript normalized with
    :func:`usmqs.data.text.normalize_text`, duration in seconds from the flac header.
    Utterances whose flac is missing or unreadable, and flacs without a transcript line,
    are skipped: each is logged with ``logging.warning`` and a per-split summary of the
    counts is logged at the end. Rows are ordered by speaker, chapter, utterance.

    Args:
      src: a LibriSpeech root (holding ``dev-clean/`` ...) or one split folder.
      out: output folder (created).

    Returns:
      Split name (e.g. ``"dev-clean"``) -> manifest path.

    Raises:
      FileNotFoundError / ValueError: see :func:`find_splits`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifests = {}
    for name, folder in find_splits(src).items():
        manifests[name], counts = _import_split(name, folder, out)
        skipped = {k: v for k, v in counts.items() if k != "kept"}
        log.info("%s: %d utterances -> %s; skipped: %s", name, counts["kept"],
                 manifests[name], skipped or "none")
        if skipped:
            log.warning("%s: skipped %s", name, dict(sorted(skipped.items())))
    return manifests
