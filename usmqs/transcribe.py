"""Speech in, text out: transcribe audio files with a run's checkpoint or its packed export.

`from_workdir(dir)` (the run's newest restorable checkpoint, its ``config.json`` and
``tokenizer.model``) or `from_export(dir)` (a ``usmqs export`` folder alone: weights,
tokenizer and the data settings in its metadata) gives a `Recognizer`;
`transcribe(recognizer, inputs, out)` writes one JSON line per input, in input order::

    {"audio_filepath": ..., "text": ..., "duration": seconds of audio, "seconds": ...}
    {"audio_filepath": ..., "error": why it was skipped, "duration": ..., "seconds": ...}

Audio goes through the training front end: `usmqs.data.audio.load_audio` (wav/flac at
any rate and channel count, mixed down and resampled), `pipeline.stored_log_mel` and the
evaluation batches' normalization and length buckets (`pipeline.eval_plan`), so a file
of an evaluation manifest gets the features, batch shapes and decoder
(`evaluate.decode`) that ``usmqs evaluate`` gives it.

Long files are decoded in overlapping windows (`windows`): a file with more frames than
``data.max_frames`` (the longest utterance the run trained on) is cut into windows of
``max_frames`` (rounded down to a multiple of twice the subsampling factor) every half
window; each window is an utterance of its own (features from its samples, normalized
over it), and contributes the encoder frames of its middle half, so every kept frame
has at least a quarter window of context on each side. The kept frames of all windows
are concatenated into one sequence of CTC posteriors and decoded as a whole, so a word
that straddles a window edge is decoded from the window that holds it in the middle,
not cut in two. Costs twice the encoder time of one pass on such files. Files longer
than ``max_duration`` seconds are refused before decoding (the audio is held in memory
whole).

``seconds`` of a row: the time spent on that file (reading, features, decoding) plus its
share of every forward pass it was in, the pass's time split among its rows by their
number of frames (padding rows weigh nothing); the first pass of each batch shape
includes its compilation. Summed over rows this is the processing time, model loading
excluded.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

import ml_collections
import numpy as np

from usmqs import config as config_lib
from usmqs import evaluate, export, run, storage
from usmqs.compress.export_format import EXPORT_DIRNAME, METADATA_FILE, ExportError
from usmqs.data import pipeline
from usmqs.data.audio import AudioError, audio_duration, load_audio
from usmqs.data.features import FeatureConfig
from usmqs.data.manifest import read_manifest
from usmqs.data.text import normalize_text
from usmqs.data.tokenizer import Tokenizer

DECODERS = ("greedy", "beam")
AUDIO_SUFFIXES = (".wav", ".flac")  # what a folder is searched for (any case)
MAX_DURATION = 3600.0  # default longest file in seconds (decoded whole in memory)
_BLOCK_BATCHES = 16  # files are read, decoded and written in blocks of this many batches


@dataclasses.dataclass(frozen=True)
class Recognizer:
    """A model ready to transcribe.

    `log_probs(features [B, T, F], feature_mask [B, T])` -> (log-probabilities
    [B, T', V], out_mask [B, T']); `data`: the data config whose front end, normalization,
    buckets, ``max_frames`` and ``batch_size`` it was trained and evaluated with;
    `features`: its `FeatureConfig`; `decoder` / `beam_size`: the default decoding.
    """

    log_probs: Callable
    tokenizer: Tokenizer
    data: ml_collections.ConfigDict
    features: FeatureConfig
    source: str  # what it was loaded from, for messages
    decoder: str = "greedy"
    beam_size: int = 8


def from_workdir(workdir, overrides: Sequence[str] = ()) -> Recognizer:
    """The run in `workdir` at its newest restorable checkpoint, with the config it was
    trained with (``config.json``, plus `overrides`) and its tokenizer."""
    workdir = pathlib.Path(workdir)
    if not (workdir / config_lib.SAVED_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{workdir}: no {config_lib.SAVED_CONFIG_FILE}: not a training run's workdir")
    config = config_lib.load_saved(workdir, overrides)
    tokenizer = run.load_tokenizer(workdir)
    setup = run.build(config, tokenizer.vocab_size)
    state = run.restore_latest(workdir, setup)
    eval_step = evaluate.make_eval_step(setup, config, audio=False)  # host features
    return Recognizer(
        lambda f, m: eval_step(state.params, state.rest, f, m), tokenizer, config.data,
        pipeline.feature_config(config.data), f"{workdir} (step {int(state.step)})",
        config.eval.decoder, int(config.eval.beam_size),
    )


def from_export(export_dir) -> Recognizer:
    """The packed export in `export_dir` (or in ``export_dir/export``) alone."""
    export_dir = pathlib.Path(export_dir)
    if not (export_dir / METADATA_FILE).is_file() and (export_dir / EXPORT_DIRNAME / METADATA_FILE).is_file():
        export_dir = export_dir / EXPORT_DIRNAME
    served = export.load_export(export_dir)
    data, features = served.data_config()
    step = served.metadata.get("step")
    return Recognizer(served.log_probs, served.load_tokenizer(), data, features, f"{export_dir} (step {step})")


# ---------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Input:
    """One thing to transcribe: an audio file and, from a manifest, its reference text;
    or a manifest line that names none (`error`)."""

    audio_filepath: str | None
    reference: str | None = None
    error: str | None = None


def collect_inputs(paths: Sequence[str], manifests: Sequence[str] = (), log: TextIO | None = None) -> list[Input]:
    """`paths` in order (a folder: its *.wav and *.flac files, recursively, sorted; how
    many other files it holds is said on `log`), then the rows of each NeMo-style
    manifest (``text`` optional; a malformed line becomes an `Input` with its error).
    Raises FileNotFoundError for a missing manifest."""
    inputs = []
    for path in paths:
        if not os.path.isdir(path):
            inputs.append(Input(path))
            continue
        files = sorted(p for p in pathlib.Path(path).rglob("*") if p.is_file())
        audio = [p for p in files if p.suffix.lower() in AUDIO_SUFFIXES]
        if len(audio) < len(files) and log is not None:
            print(f"transcribe: {path}: {len(files) - len(audio)} file(s) not "
                  f"{'/'.join(AUDIO_SUFFIXES)} left out", file=log, flush=True)
        inputs += [Input(str(p)) for p in audio]
    for manifest in manifests:
        rows, bad = read_manifest(manifest, on_error="skip", require_text=False)
        lines = [(u.line, Input(u.audio_filepath, u.text or None)) for u in rows]
        lines += [(s.line, Input(None, error=f"{manifest}:{s.line}: malformed manifest line: {s.reason}")) for s in bad]
        inputs += [x for _, x in sorted(lines, key=lambda pair: pair[0])]
    return inputs


# --------------------------------------------------------------------------- windows


def windows(num_frames: int, max_frames: int, factor: int) -> list[tuple[int, int, int, int]]:
    """How a file of `num_frames` feature frames is decoded: ``[(start, end, lo, hi)]``,
    windows of input frames ``[start, end)`` of which output frames ``[lo, hi)`` (in the
    window's own encoder frames, `factor` x subsampled) are kept; the kept frames of all
    windows, in order, are the file's ``subsampled_length(num_frames)`` frames.

    One window when ``num_frames <= max_frames``. Otherwise windows of W =
    ``max_frames`` rounded down to a multiple of ``2 * factor`` start every H = W / 2
    frames (so encoder frame j of a window is frame start / factor + j of the file); the
    cut between two windows is the middle of their overlap.
    """
    total = pipeline.subsampled_length(num_frames, factor)
    width = max_frames // (2 * factor) * (2 * factor)
    if num_frames <= max_frames or width < 4 * factor:
        return [(0, num_frames, 0, total)]
    hop = width // 2
    starts = [0]
    while starts[-1] + width < num_frames:
        starts.append(starts[-1] + hop)
    cuts = [0, *((s + (width - hop) // 2) // factor for s in starts[1:]), total]
    return [
        (s, min(s + width, num_frames), cuts[k] - s // factor, cuts[k + 1] - s // factor)
        for k, s in enumerate(starts)
    ]


def _min_frames(factor: int) -> int:
    """Fewest feature frames that give one encoder frame."""
    t = 1
    while pipeline.subsampled_length(t, factor) < 1:
        t += 1
    return t


# ------------------------------------------------------------------------ per file


@dataclasses.dataclass
class _Item:
    """An input on its way through: its audio as windows of features, then its text."""

    input: Input
    header_seconds: float | None = None
    duration: float | None = None
    seconds: float = 0.0
    text: str | None = None
    reason: str | None = None  # skip reason (key of the summary's counts)
    error: str | None = None  # what is wrong, in words
    segments: list = dataclasses.field(default_factory=list)  # [t, F] stored log-mel per window
    keep: list = dataclasses.field(default_factory=list)  # (lo, hi) per window
    parts: dict = dataclasses.field(default_factory=dict)  # window -> kept log-probs [hi - lo, V]

    def fail(self, reason: str, error: str) -> None:
        self.reason, self.error, self.segments = reason, error, []

    def row(self) -> dict:
        out = {"audio_filepath": self.input.audio_filepath}
        out.update({"error": self.error} if self.error is not None else {"text": self.text})
        duration = self.duration if self.duration is not None else self.header_seconds
        out["duration"] = None if duration is None else round(duration, 3)
        out["seconds"] = round(self.seconds, 4)
        return out


def _header_seconds(item: _Item) -> None:
    if item.input.audio_filepath is None:
        item.fail("malformed_line", item.input.error)
        return
    try:
        item.header_seconds = audio_duration(item.input.audio_filepath)
    except AudioError:
        pass  # load_audio says what is wrong with it


def _load(item: _Item, rec: Recognizer, max_duration: float) -> None:
    """Decode the audio and cut it into windows of features (or mark the item failed)."""
    fcfg, factor = rec.features, int(rec.data.subsampling_factor)
    if item.header_seconds is not None and item.header_seconds > max_duration:
        item.fail("too_long", f"{item.header_seconds:.1f} s of audio: longer than the limit of "
                  f"{max_duration:g} s (--max-duration; the audio is decoded whole in memory)")
        return
    try:
        audio = load_audio(item.input.audio_filepath, fcfg.sample_rate)
    except AudioError as e:
        item.fail("audio_error", e.reason)
        return
    item.duration = audio.size / fcfg.sample_rate
    frames = fcfg.num_frames(audio.size)
    if pipeline.subsampled_length(frames, factor) < 1:
        need = fcfg.frame_ms + (_min_frames(factor) - 1) * fcfg.hop_ms
        item.fail("too_short", f"{1000 * item.duration:.0f} ms of audio: the model needs at least {need:g} ms")
        return
    spans = windows(frames, int(rec.data.max_frames), factor)
    if len(spans) == 1:
        item.segments = [pipeline.stored_log_mel(audio, fcfg)]
    else:  # each window's features from its own samples
        span = lambda s, e: audio[s * fcfg.hop_length : (e - 1) * fcfg.hop_length + fcfg.win_length]
        item.segments = [pipeline.stored_log_mel(span(s, e), fcfg) for s, e, _, _ in spans]
    item.keep = [(lo, hi) for _, _, lo, hi in spans]


def _finish(item: _Item, rec: Recognizer, decoder: str, beam_size: int) -> None:
    """All windows are through the model: decode their kept frames as one sequence."""
    log_probs = np.concatenate([item.parts[k] for k in range(len(item.keep))])
    tokens = evaluate.decode(log_probs, decoder=decoder, beam_size=beam_size)
    item.text = rec.tokenizer.decode(list(tokens))
    item.segments, item.parts = [], {}


# ------------------------------------------------------------------------- progress


class _Progress:
    """``transcribe: 40/101 files, 123.4 s of audio, RTF 0.052, ETA 0:00:12`` on stderr:
    rewritten in place on a terminal, otherwise a line every `every` seconds."""

    def __init__(self, items: list[_Item], stream: TextIO | None, start: float):
        self.total = len(items)
        self.total_audio = sum(i.header_seconds or 0.0 for i in items)
        self.stream, self.start = stream, start
        self.tty = bool(stream is not None and stream.isatty())
        self.every = 0.5 if self.tty else 10.0
        self.done, self.audio, self.shown = 0, 0.0, start

    def line(self) -> str:
        if not self.audio:
            return f"transcribe: {self.done}/{self.total} files, 0 s of audio"
        rtf = (time.perf_counter() - self.start) / self.audio
        left = max(self.total_audio - self.audio, 0.0) * rtf
        return (f"transcribe: {self.done}/{self.total} files, {self.audio:.1f} s of audio, "
                f"RTF {rtf:.3f}, ETA {datetime.timedelta(seconds=round(left))}")

    def update(self, files: int, audio: float, *, skipped_audio: float = 0.0, final: bool = False) -> None:
        """`files` more done with `audio` seconds transcribed (`skipped_audio`: seconds
        of the total that will not be, skipped files')."""
        self.done, self.audio = self.done + files, self.audio + audio
        self.total_audio -= skipped_audio
        now = time.perf_counter()
        if self.stream is None or not (final or now - self.shown >= self.every):
            return
        self.shown = now
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + self.line(), end=end, file=self.stream, flush=True)


# --------------------------------------------------------------------------- driver


@dataclasses.dataclass
class Summary:
    """What `transcribe` did: counts, seconds, and WER/CER over the inputs with a
    reference text (`evaluate.score`'s dict, None when there were none)."""

    transcribed: int
    skipped: dict[str, int]  # reason -> count
    audio_seconds: float
    processing_seconds: float
    metrics: dict | None

    @property
    def rtf(self) -> float:
        """Real-time factor: processing seconds per second of audio."""
        return self.processing_seconds / self.audio_seconds if self.audio_seconds else float("nan")

    def line(self) -> str:
        """``N transcribed, K skipped (reason N, ...); A s of audio in P s: RTF R``."""
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items()))
        skipped = sum(self.skipped.values())
        return (
            f"transcribe: {self.transcribed} transcribed, {skipped} skipped"
            + (f" ({reasons})" if reasons else "")
            + f"; {self.audio_seconds:.1f} s of audio in {self.processing_seconds:.1f} s"
            + (f": RTF {self.rtf:.3f}" if self.audio_seconds else "")
        )


def _forward(rec: Recognizer, data, segments: list, frames: int) -> np.ndarray:
    """Log-probs [B, T', V] of one batch of (item, window) segments (None: empty row),
    the pass's time shared among the rows' items by frames."""
    rows = [None if seg is None else seg[0].segments[seg[1]] for seg in segments]
    batch = pipeline.feature_batch(rows, frames, data)
    start = time.perf_counter()
    log_probs, _ = rec.log_probs(batch["features"], batch["feature_mask"])
    log_probs = np.asarray(log_probs)
    elapsed = time.perf_counter() - start
    weights = [0 if r is None else r.shape[0] for r in rows]
    for seg, w in zip(segments, weights):
        if seg is not None:
            seg[0].seconds += elapsed * w / sum(weights)
    return log_probs


def _run_block(items: list[_Item], rec: Recognizer, data, decode: dict, progress: _Progress) -> None:
    """Read, window, batch, forward and decode the block's items (each in place)."""
    segments = [(item, k) for item in items if item.error is None for k in range(len(item.segments))]
    plan = pipeline.eval_plan([item.segments[k].shape[0] for item, k in segments], data)
    for frames, members in plan:
        batch_segments = [None if i < 0 else segments[i] for i in members]
        log_probs = _forward(rec, data, batch_segments, frames)
        done, audio = 0, 0.0
        for r, seg in enumerate(batch_segments):
            if seg is None:
                continue
            item, k = seg
            lo, hi = item.keep[k]
            item.parts[k] = log_probs[r, lo:hi].copy()
            if len(item.parts) == len(item.keep):
                start = time.perf_counter()
                _finish(item, rec, **decode)
                item.seconds += time.perf_counter() - start
                done, audio = done + 1, audio + item.duration
        progress.update(done, audio)


def transcribe(
    rec: Recognizer,
    inputs: Sequence[Input],
    out: TextIO,
    *,
    decoder: str | None = None,
    beam_size: int | None = None,
    batch_size: int | None = None,
    max_duration: float | None = None,
    log: TextIO | None = None,
) -> Summary:
    """Transcribe `inputs`; one JSON line per input to `out`, in input order, written
    block by block. A file that cannot be transcribed (unreadable, corrupt, empty, too
    short, over `max_duration`) gets a row with ``error``, a line on `log` (with the
    progress line; None: silent) and a count in the summary. `decoder`, `beam_size`, `batch_size`: None = the recognizer's (its run's);
    `max_duration` (seconds): None = `MAX_DURATION`."""
    max_duration = MAX_DURATION if max_duration is None else max_duration
    decode = dict(decoder=decoder or rec.decoder, beam_size=beam_size or rec.beam_size)
    if decode["decoder"] not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decode['decoder']!r}")
    data = copy.deepcopy(rec.data)
    data.batch_size = int(batch_size or data.batch_size)
    start = time.perf_counter()
    items = [_Item(x) for x in inputs]
    for item in items:
        _header_seconds(item)
    progress = _Progress(items, log, start)
    block = data.batch_size * _BLOCK_BATCHES
    for b in range(0, len(items), block):
        chunk = items[b : b + block]
        for item in chunk:
            if item.error is None:
                load_start = time.perf_counter()
                _load(item, rec, max_duration)
                item.seconds += time.perf_counter() - load_start
            if item.error is not None:
                if log is not None:
                    what = "" if item.input.audio_filepath is None else f"{item.input.audio_filepath}: "
                    print(f"transcribe: skipped {what}{item.error}", file=log, flush=True)
                progress.update(1, 0.0, skipped_audio=item.header_seconds or 0.0)
        _run_block(chunk, rec, data, decode, progress)
        out.write("".join(json.dumps(item.row()) + "\n" for item in chunk))
        out.flush()
    progress.update(0, 0.0, final=True)
    return _summary(items, time.perf_counter() - start)


def _summary(items: list[_Item], seconds: float) -> Summary:
    done = [i for i in items if i.error is None]
    skipped: dict[str, int] = {}
    for item in items:
        if item.error is not None:
            skipped[item.reason] = skipped.get(item.reason, 0) + 1
    scored = [(normalize_text(i.input.reference or ""), i.text) for i in done]
    scored = [(ref, hyp) for ref, hyp in scored if ref]
    metrics = evaluate.score(*map(list, zip(*scored))) if scored else None
    return Summary(len(done), skipped, sum(i.duration for i in done), seconds, metrics)


class TranscribeError(Exception):
    """Nothing to transcribe, nothing transcribed, or no model to transcribe with; the
    message says which."""


def transcribe_files(
    paths: Sequence[str],
    *,
    workdir=None,
    export_dir=None,
    manifests: Sequence[str] = (),
    out_path=None,
    overrides: Sequence[str] = (),
    log: TextIO | None = None,
    **options,
) -> Summary:
    """`usmqs transcribe`: `collect_inputs`, load the recognizer (`from_workdir` or
    `from_export`), `transcribe` (`options`: its keywords) into `out_path` (None: stdout),
    and print the summary (and WER/CER when the inputs have references) on `log` (None:
    stderr). Raises TranscribeError when there is nothing to transcribe, no model, or no
    input could be transcribed; a failed write of `out_path` is a `storage.WriteError`."""
    log = sys.stderr if log is None else log
    if (workdir is None) == (export_dir is None):
        raise TranscribeError("give a training run (--workdir) or an export (--export), one of them")
    if export_dir is not None and overrides:
        raise TranscribeError(f"config overrides apply to --workdir runs, not to an export: {list(overrides)}")
    for key in ("batch_size", "beam_size", "max_duration"):
        if options.get(key) is not None and options[key] <= 0:
            raise TranscribeError(f"{key} must be positive, got {options[key]}")
    try:
        inputs = collect_inputs(paths, manifests, log)
    except FileNotFoundError as e:
        raise TranscribeError(str(e)) from None
    if not inputs:
        raise TranscribeError("nothing to transcribe: no audio files in " + (", ".join([*paths, *manifests]) or "the arguments"))
    start = time.perf_counter()
    try:
        rec = from_export(export_dir) if export_dir is not None else from_workdir(workdir, overrides)
    except (FileNotFoundError, ExportError) as e:
        raise TranscribeError(str(e)) from None
    print(f"transcribe: {len(inputs)} inputs, model {rec.source} loaded in {time.perf_counter() - start:.1f} s",
          file=log, flush=True)
    with _output(out_path) as out:
        summary = transcribe(rec, inputs, out, log=log, **options)
    print(summary.line(), file=log, flush=True)
    if summary.metrics is not None:
        print(evaluate.summary_line(summary.metrics, "transcribed files with a reference"), file=log, flush=True)
    if not summary.transcribed:
        raise TranscribeError(f"no file transcribed: all {len(inputs)} inputs were skipped (reasons above)")
    return summary


class _Output:
    """A text stream whose write errors are `storage.WriteError`s naming `path`."""

    def __init__(self, stream: TextIO, path: str):
        self.stream, self.path = stream, path

    def write(self, text: str) -> None:
        with storage.writing(self.path, "the transcripts"):
            self.stream.write(text)
            self.stream.flush()

    def flush(self) -> None:
        pass  # every write is flushed


@contextlib.contextmanager
def _output(path):
    """The transcripts' stream: `path` (created or truncated), or stdout when None."""
    if path is None:
        yield _Output(sys.stdout, "<stdout>")
        return
    with storage.writing(path, "the transcripts"):
        stream = open(path, "w", encoding="utf-8")
    with stream:
        yield _Output(stream, os.fspath(path))
