"""Command line: argument parsing only; the work lives in the library modules."""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys


def _config(args, overrides):
    from usmqs import config as config_lib

    return config_lib.load(args.config, overrides)


def cmd_synth(args, overrides):
    from usmqs.data import synth

    kw = {"seed": args.seed}
    if args.num_train:
        kw["num_train"] = args.num_train
    if args.num_test:
        kw["num_test"] = args.num_test
    if args.num_dev:
        kw["num_dev"] = args.num_dev
    paths = synth.synthesize_corpus(args.out, **kw)
    for k, v in paths.items():
        print(f"{k}: {v}")


def cmd_import_librispeech(args, overrides):
    from usmqs.data import librispeech

    for split, path in librispeech.import_librispeech(args.src, args.out).items():
        print(f"{split}: {path}")


def cmd_train(args, overrides):
    from usmqs import train

    train.train_and_evaluate(_config(args, overrides), args.workdir)


def _workdir_config(args, overrides):
    """--config if given, else the config the run in WORKDIR was trained with."""
    from usmqs import config as config_lib

    if args.config:
        return _config(args, overrides)
    try:
        return config_lib.load_saved(args.workdir, overrides)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None


def cmd_evaluate(args, overrides):
    from usmqs import evaluate

    cfg = _workdir_config(args, overrides)
    if args.export:
        from usmqs import export

        export.limit_heap_retention()  # this process only serves the export, then exits
        export.evaluate_export(cfg, args.workdir, manifest=args.manifest, split=args.split)
    else:
        evaluate.evaluate_workdir(cfg, args.workdir, manifest=args.manifest, split=args.split)


def cmd_export(args, overrides):
    from usmqs import export

    cfg = _workdir_config(args, overrides)
    export.limit_heap_retention()  # this process only exports, then exits
    export.export_workdir(cfg, args.workdir, index_encoding=args.index_encoding)
    if args.format == "onnx":
        from usmqs import onnx_export

        workdir = pathlib.Path(args.workdir)
        out = workdir / onnx_export.ONNX_DIRNAME
        report = onnx_export.write_onnx(workdir / export.EXPORT_DIRNAME, out)
        print(f"onnx: {out / onnx_export.MODEL_FILE}  {report['file_bytes']:,} bytes = "
              f"{100 * report['size_ratio']:.2f}% of fp32 ({report['fp32_bytes']:,}); {out / onnx_export.TOKENS_FILE}", flush=True)


def cmd_transcribe(args, overrides):
    from usmqs import export, transcribe

    if args.export:
        export.limit_heap_retention()  # this process only serves the export, then exits
    try:
        transcribe.transcribe_files(
            args.audio, workdir=args.workdir, export_dir=args.export, manifests=args.manifest,
            out_path=args.out, overrides=overrides, decoder=args.decoder, beam_size=args.beam_size,
            batch_size=args.batch_size, max_duration=args.max_duration,
        )
    except transcribe.TranscribeError as e:
        raise SystemExit(f"usmqs transcribe: {e}") from None


def cmd_compile(args, overrides):
    import json

    if args.fake_devices:
        # XLA reads the host device count when JAX creates its CPU client: set it first,
        # or run again in a fresh process when something already created it.
        from usmqs import compile as compile_lib

        if not compile_lib.use_fake_devices(args.fake_devices):
            raise SystemExit(compile_lib.reexec_with_fake_devices(args.fake_devices, args.argv))
    from usmqs import compile as compile_lib

    cfg = _config(args, overrides)
    report = compile_lib.run(
        cfg, mesh=compile_lib.parse_mesh(args.mesh), vocab_size=args.vocab_size,
        frames=args.frames, with_init=not args.no_init,
    )
    print(json.dumps(report, indent=2), flush=True)


def cmd_study(args, overrides):
    from usmqs import study, study_report

    study.run_study(_config(args, overrides), args.workdir)
    if getattr(args, "update_readme", None):
        study_report.update_readme(args.update_readme, args.workdir)
        print(f"updated the study section of {args.update_readme}", flush=True)


def cmd_demo(args, overrides):
    import pathlib

    args.config = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "study_demo.py")
    if not pathlib.Path(args.config).is_file():
        raise SystemExit(f"{args.config} not found: `usmqs demo` runs from a source checkout")
    cmd_study(args, overrides)


TRANSCRIBE_DESCRIPTION = """\
Transcribe audio files (wav/flac, any sample rate and channel count) with a training run's
newest checkpoint (--workdir) or a packed export alone (--export). Writes one JSON line per
input, in input order:
  {"audio_filepath", "text", "duration", "seconds"}      transcribed
  {"audio_filepath", "error", "duration", "seconds"}     skipped: unreadable, corrupt,
                                                         empty, too short or too long
duration: seconds of audio. seconds: processing time attributed to the file: its reading,
features and decoding, plus its share of each batched forward pass it was in (the pass's
time split among its rows by their frames; the first pass of each batch shape includes
compilation). Progress (files, audio seconds, real-time factor = processing seconds /
audio seconds, ETA), skipped files and a summary go to stderr. Exit code 0 when at least
one file was transcribed.

Long files: a file longer than the run's data.max_frames (its longest training utterance)
is decoded in windows of that length every half window; each window contributes the
encoder frames of its middle half and the kept frames are decoded as one sequence, so no
word is lost at a window edge (twice the encoder time on such files). Files longer than
--max-duration are refused.
"""


def main(argv: list[str] | None = None) -> None:
    from usmqs import config as config_lib

    argv = list(sys.argv[1:] if argv is None else argv)
    argv, overrides = config_lib.split_overrides(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # An import above may already have configured the root logger (at WARNING), which
    # makes basicConfig a no-op: our INFO lines (skip reports, init_from, ...) still show.
    logging.getLogger("usmqs").setLevel(logging.INFO)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    p = argparse.ArgumentParser(prog="usmqs", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="synthesize the embedded speech corpus")
    s.add_argument("--out", required=True)
    s.add_argument("--num-train", type=int, default=0)
    s.add_argument("--num-test", type=int, default=0)
    s.add_argument("--num-dev", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_synth)

    s = sub.add_parser("import-librispeech", help="openslr LibriSpeech tree -> manifests")
    s.add_argument("src")
    s.add_argument("out")
    s.set_defaults(fn=cmd_import_librispeech)

    s = sub.add_parser("train", help="train (resumes from WORKDIR)")
    s.add_argument("--config", required=True, help="configs/x.py[:arg]")
    s.add_argument("--workdir", required=True)
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("evaluate", help="decode + score the eval (test) or dev split")
    s.add_argument("--workdir", required=True)
    s.add_argument("--config", default="", help="default: the run's own config")
    s.add_argument(
        "--split", choices=("eval", "dev"), default="eval",
        help="eval: data.eval_manifest -> eval.json; dev: data.dev_manifest (the embedded "
        "corpus' dev split by default) -> eval_dev.json",
    )
    s.add_argument("--manifest", default=None, help="decode this manifest as the split")
    s.add_argument("--export", action="store_true", help="decode from the packed export")
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("export", help="packed compressed export of the latest checkpoint")
    s.add_argument("--workdir", required=True)
    s.add_argument("--config", default="", help="default: the run's own config")
    s.add_argument(
        "--index-encoding", choices=("position", "combinatorial"), default="position",
        help="N:M index layout: per-value positions (hardware 2:4) or per-group ranks",
    )
    s.add_argument(
        "--format", choices=("packed", "onnx"), default="packed",
        help="onnx: also DIR/onnx/model.onnx + tokens.txt for ONNX Runtime / sherpa-onnx, built from the packed export",
    )
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser(
        "transcribe", help="speech in, text out: audio files -> JSON lines, from a run or its export",
        description=TRANSCRIBE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = s.add_mutually_exclusive_group(required=True)
    model.add_argument("--workdir", help="a training run: its newest checkpoint, config.json, tokenizer")
    model.add_argument("--export", metavar="DIR", help="a packed export (`usmqs export` output) alone")
    s.add_argument("audio", nargs="*", metavar="AUDIO_OR_FOLDER", help="files; folders: *.wav, *.flac, recursively")
    s.add_argument("--manifest", action="append", default=[], help="NeMo-style JSON lines (text optional: WER/CER when given); repeatable")
    s.add_argument("--out", metavar="F.jsonl", help="write the JSON lines here (default: stdout)")
    s.add_argument("--decoder", choices=("greedy", "beam"), help="default: the run's eval.decoder (greedy for an export)")
    s.add_argument("--beam-size", type=int, help="default: the run's eval.beam_size (8 for an export)")
    s.add_argument("--batch-size", type=int, help="files per forward pass (default: the run's data.batch_size)")
    s.add_argument("--max-duration", type=float, metavar="SECONDS",
                   help="refuse longer files (they are decoded whole in memory; default 3600)")
    s.set_defaults(fn=cmd_transcribe)

    s = sub.add_parser(
        "compile", help="ahead-of-time compile of the train step for a mesh, no weights",
        description="Prints JSON: params, devices, mesh, per_device_bytes, "
        "peak_bytes_per_device (= arguments + temporaries + outputs - aliased), "
        "lower_seconds, compile_seconds.",
    )
    s.add_argument("--config", required=True, help="configs/x.py[:arg]")
    s.add_argument("--mesh", default="", help="AXIS=N,... over data, fsdp, tensor (-1 = rest)")
    s.add_argument("--fake-devices", type=int, default=0, help="compile for N CPU devices")
    s.add_argument("--frames", type=int, default=None, help="padded frames (default: last bucket)")
    s.add_argument("--vocab-size", type=int, default=None, help="default: data.vocab_size")
    s.add_argument("--no-init", action="store_true", help="skip compiling the sharded init")
    s.set_defaults(fn=cmd_compile)

    s = sub.add_parser(
        "study", help="the compression study: float, PTQ + QAT per setting, report",
        description="Trains (or resumes) every run of the study in WORKDIR and writes "
        "WORKDIR/results.json, report.md and pareto.png; rerun to resume.",
    )
    s.add_argument("--config", required=True, help="configs/study_*.py[:arg]")
    s.add_argument("--workdir", required=True)
    s.add_argument(
        "--update-readme", metavar="README",
        help="when the study is complete, replace README's marked study section with its "
        "table and plot (docs/<workdir name>_pareto.png)",
    )
    s.set_defaults(fn=cmd_study)

    s = sub.add_parser("demo", help="the quick study (configs/study_demo.py) into runs/demo")
    s.add_argument("--workdir", default="runs/demo")
    s.set_defaults(fn=cmd_demo)

    args = p.parse_args(argv)
    args.argv = [*argv, *(f"--config.{o}" for o in overrides)]  # to re-execute itself
    try:
        args.fn(args, overrides)
    except Exception as e:
        code = _exit_code(e)
        if code is None:
            raise
        print(f"usmqs {args.command}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None


def _exit_code(e: Exception) -> int | None:
    """The exit code of errors whose message says it all (no traceback); None: others.

    75 (EX_TEMPFAIL): preempted, a checkpoint was saved, rerun to resume. 1: a run that
    cannot go on as configured (non-finite storm, disk full, no restorable checkpoint, a
    checkpoint of another model, failed study runs). 2: a bad config (the key is named).
    """
    from usmqs import checkpoints, config, preemption, storage, study, train

    if isinstance(e, preemption.Preempted):
        return preemption.EXIT_PREEMPTED
    if isinstance(e, config.ConfigError):
        return 2
    if isinstance(e, train.NonFiniteStorm | storage.WriteError | study.StudyError):
        return 1
    if isinstance(e, checkpoints.CheckpointError | checkpoints.IncompatibleCheckpoint):
        return 1
    return None


if __name__ == "__main__":
    main()
