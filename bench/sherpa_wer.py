"""WER through sherpa-onnx beside `usmqs evaluate --export`, for trained runs.

    .venv/bin/python bench/sherpa_wer.py RUN_DIR [RUN_DIR ...] [--markdown]
    .venv/bin/python bench/sherpa_wer.py --study runs/std [--runs float,qat/int8,...]

For each run (a training workdir, e.g. a study's ``float`` or ``qat/int4+2:4``):

1. the packed export (`usmqs export`) and its evaluation on the test split
   (`usmqs evaluate --export`: ``predictions_export.jsonl``), made if missing;
2. the ONNX export of that packed export (`usmqs export --format onnx`: ``RUN/onnx/``),
   made if missing;
3. every test utterance of ``predictions_export.jsonl`` through
   `sherpa_onnx.OfflineRecognizer.from_omnilingual_asr_ctc` at its defaults (greedy),
   one stream at a time, the audio read as evaluation reads it (16 kHz mono);
4. both scored with `evaluate.score` against the same references.

Prints JSON: per run, WER / CER of each engine, the absolute WER difference, how many
transcripts are identical, the first differing pairs and model.onnx's bytes; with
``--markdown`` also the README table. sherpa-onnx standardizes each waveform before the
model, so runs trained without ``data.standardize_audio`` can differ on audio with a DC
offset (README "Deploying with sherpa-onnx").
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from usmqs import config as config_lib  # noqa: E402
from usmqs import evaluate, export, onnx_export  # noqa: E402
from usmqs.compress import export_format  # noqa: E402
from usmqs.data import audio as audio_lib  # noqa: E402

STUDY_RUNS = ("float", "qat/int8", "qat/int4", "qat/int4+2:4")
PREDICTIONS = "predictions_export.jsonl"


def _rows(run_dir: pathlib.Path) -> list[dict]:
    if not (run_dir / PREDICTIONS).is_file():
        cfg = config_lib.load_saved(run_dir)
        if not (run_dir / export.EXPORT_DIRNAME / export_format.METADATA_FILE).is_file():
            export.export_workdir(cfg, run_dir)
        export.evaluate_export(cfg, run_dir)
    return [json.loads(line) for line in (run_dir / PREDICTIONS).read_text().splitlines()]


def _onnx_dir(run_dir: pathlib.Path) -> pathlib.Path:
    out = run_dir / onnx_export.ONNX_DIRNAME
    if not (out / onnx_export.MODEL_FILE).is_file():
        onnx_export.write_onnx(run_dir / export.EXPORT_DIRNAME, out)
    onnx_export.load_onnx(out)  # checks the model + tokens pair
    return out


def measure(run_dir: pathlib.Path) -> dict:
    rows = _rows(run_dir)
    onnx_dir = _onnx_dir(run_dir)
    rec = onnx_export.sherpa_recognizer(onnx_dir)
    start = time.perf_counter()
    sherpa_texts = [
        onnx_export.sherpa_text(rec, audio_lib.load_audio(r["audio_filepath"]).astype(np.float32)) for r in rows
    ]
    seconds = time.perf_counter() - start
    refs = [r["text"] for r in rows]
    served = [r["pred_text"].strip() for r in rows]
    ours, theirs = evaluate.score(refs, served), evaluate.score(refs, sherpa_texts)
    differing = [(a, b) for a, b in zip(served, sherpa_texts) if a != b]
    return {
        "utterances": len(rows),
        "wer_export": ours["wer"], "cer_export": ours["cer"],
        "wer_sherpa": theirs["wer"], "cer_sherpa": theirs["cer"],
        "wer_abs_diff_points": round(100 * abs(theirs["wer"] - ours["wer"]), 4),
        "identical": len(rows) - len(differing),
        "identical_fraction": round((len(rows) - len(differing)) / len(rows), 4),
        "first_differing": differing[:3],
        "onnx_bytes": (onnx_dir / onnx_export.MODEL_FILE).stat().st_size,
        "sherpa_seconds": round(seconds, 1),
    }


def markdown(results: dict) -> str:
    lines = [
        "| run | WER `evaluate --export` | WER sherpa-onnx | difference (points) | identical transcripts | model.onnx bytes |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {100 * r['wer_export']:.2f} % | {100 * r['wer_sherpa']:.2f} % | "
            f"{r['wer_abs_diff_points']:.2f} | {r['identical']}/{r['utterances']} | {r['onnx_bytes']:,} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="training workdirs")
    p.add_argument("--study", help="a study workdir: measure its --runs")
    p.add_argument("--runs", dest="study_runs", default=",".join(STUDY_RUNS),
                   help="with --study: comma-separated run subdirs (default: %(default)s)")
    p.add_argument("--markdown", action="store_true", help="also print the README table")
    args = p.parse_args(argv)
    dirs = [pathlib.Path(d) for d in args.runs]
    if args.study:
        dirs += [pathlib.Path(args.study) / s for s in args.study_runs.split(",")]
    if not dirs:
        p.error("give run directories or --study")
    results = {}
    for d in dirs:
        name = str(d.relative_to(args.study)) if args.study and d.is_relative_to(args.study) else str(d)
        results[name] = measure(d)
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))
    if args.markdown:
        print(markdown(results))


if __name__ == "__main__":
    main()
