"""Serving speed and size: the same audio through every way a trained model can be run.

    .venv/bin/python bench/serve.py [--presets tiny,conformer_m] [--utterances 8]
        [--seconds 4.0] [--rounds 5] [--vocab 256]

For each preset, a model with random weights (speed does not depend on them) is exported
as a float, an int8 and an int4 packed export (`export_format.write_export`, as
`usmqs export` writes them) and each of those as ONNX (`onnx_export.write_onnx`, as
`usmqs export --format onnx`). Then `--utterances` utterances of `--seconds` seconds of
16 kHz audio (zero-mean tones and noise) go, one utterance at a time, through:

* ``jax_checkpoint_fp32``: the float model as evaluation runs it (host log-mel +
  normalization, then the jitted float forward);
* ``jax_export_{float,int8,int4}``: `export.load_export` (host features, then the served
  forward that decodes the packed kernels layer by layer);
* ``ort_{fp32,int8,int4}``: ONNX Runtime on model.onnx at its default optimization level
  (waveform in: the graph computes the front end; quantized matmuls as MatMulNBits or
  dequantized float32 matmuls, `onnx_export._linear`);
* ``sherpa_onnx_{fp32,int8}``: `sherpa_onnx.OfflineRecognizer.from_omnilingual_asr_ctc`
  at its defaults except `num_threads` (= this machine's cores), greedy decoding included.

Every engine gets one warm-up pass (compilation, session start-up), then `--rounds`
rounds in which each engine, in an order rotated per round, processes all utterances; the
real-time factor is the median round's seconds / seconds of audio. Interleaving keeps the
engines' numbers comparable on a shared machine; absolute numbers are this machine's.

Sizes on disk: the float parameters as an Orbax checkpoint (parameters only; a training
checkpoint also holds AdamW's two moments, about 3x), each packed export and each
model.onnx. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE_RATE = 16000
POLICIES = ("float", "int8", "int4")


def _audio(n: int, seconds: float) -> list:
    import numpy as np

    out = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
        x = 0.05 * rng.normal(size=t.size) * (np.sin(2 * np.pi * 3 * t) > 0)
        x += 0.1 * np.sin(2 * np.pi * (300 + 200 * rng.random()) * t)
        out.append((x - x.mean()).astype(np.float32))
    return out


def _folder_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _tokens(vocab: int) -> str:
    return "<blank> 0\n" + "".join(f"t{i} {i}\n" for i in range(1, vocab))


def _write_models(preset: str, vocab: int, root: pathlib.Path) -> tuple[object, dict]:
    """The float model, and per policy its packed export and ONNX folders (random weights,
    the same master weights for every policy)."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from usmqs import onnx_export
    from usmqs.compress import export_format
    from usmqs.compress.policy import Policy
    from usmqs.data import pipeline
    from usmqs.models import presets
    from usmqs.models.conformer import ConformerCTC

    cfg = presets.get_preset(preset)
    cfg.update(dropout=0.0, attention_dropout=0.0)
    data_cfg = pipeline.default_data_config()
    data_cfg.num_mel_bins = int(cfg.num_mel_bins)
    (root / "tokenizer.model").write_bytes(b"bench: tokens.txt is written from --vocab")
    dirs, float_model = {}, None
    for name in POLICIES:
        policy = None if name == "float" else Policy.named(name)
        model = ConformerCTC(cfg, vocab, policy=policy, rngs=nnx.Rngs(params=0))
        if name == "float":
            float_model = model
            ckpt = root / "checkpoint_params"
            with ocp.StandardCheckpointer() as c:
                c.save(ckpt, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        export_format.write_export(
            model, root / name / "export", model_config=cfg, vocab_size=vocab, policy=policy,
            tokenizer_file=root / "tokenizer.model", step=0, data=pipeline.serving_settings(data_cfg),
        )
        onnx_export.write_onnx(root / name / "export", root / name / "onnx", tokens=_tokens(vocab))
        dirs[name] = root / name
    return float_model, dirs


def _engines(float_model, dirs: dict) -> dict:
    """name -> function(wave) that computes the utterance's output."""
    import jax
    import numpy as np
    import onnxruntime as ort
    from flax import nnx

    from usmqs import export, onnx_export
    from usmqs.data import pipeline

    engines = {}
    served = {name: export.load_export(d / "export") for name, d in dirs.items()}
    data_cfg, fcfg = served["float"].data_config()

    def features(wave):
        f = pipeline.normalize_features(pipeline.stored_log_mel(wave, fcfg), data_cfg.feature_norm)
        return f[None], np.ones((1, f.shape[0]), bool)

    graphdef, state = nnx.split(float_model)

    @jax.jit
    def float_forward(state, x, mask):  # as the eval step: the model's state is an argument
        logits, out_mask = nnx.merge(graphdef, state)(x, mask)
        return jax.nn.log_softmax(logits), out_mask

    engines["jax_checkpoint_fp32"] = lambda w: jax.block_until_ready(float_forward(state, *features(w)))
    for name, s in served.items():
        engines[f"jax_export_{name}"] = lambda w, s=s: jax.block_until_ready(s.log_probs(*features(w)))
    for name, label in (("float", "fp32"), ("int8", "int8"), ("int4", "int4")):
        sess = ort.InferenceSession(str(dirs[name] / "onnx" / onnx_export.MODEL_FILE), providers=["CPUExecutionProvider"])
        engines[f"ort_{label}"] = lambda w, sess=sess: sess.run(None, {onnx_export.INPUT: w[None]})
    for name, label in (("float", "fp32"), ("int8", "int8")):
        rec = onnx_export.sherpa_recognizer(dirs[name] / "onnx", num_threads=os.cpu_count() or 1)
        engines[f"sherpa_onnx_{label}"] = lambda w, rec=rec: onnx_export.sherpa_text(rec, w, SAMPLE_RATE)
    return engines


def bench_preset(preset: str, args) -> dict:
    import jax
    from flax import nnx

    from usmqs import onnx_export

    root = pathlib.Path(tempfile.mkdtemp(prefix=f"usmqs-serve-bench-{preset}-"))
    try:
        float_model, dirs = _write_models(preset, args.vocab, root)
        sizes = {"jax_checkpoint_fp32_params": _folder_bytes(root / "checkpoint_params")}
        for name, d in dirs.items():
            sizes[f"export_{name}"] = _folder_bytes(d / "export")
            sizes[f"onnx_{name}"] = (d / "onnx" / onnx_export.MODEL_FILE).stat().st_size
        engines = _engines(float_model, dirs)
        waves = _audio(args.utterances, args.seconds)
        audio_s = len(waves) * args.seconds
        for fn in engines.values():  # warm-up: compiles, session start-up
            fn(waves[0])
        seconds = {name: [] for name in engines}
        names = list(engines)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                t = time.perf_counter()
                for w in waves:
                    engines[name](w)
                seconds[name].append(time.perf_counter() - t)
            print(f"{preset}: round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        rtf = {name: statistics.median(s) / audio_s for name, s in seconds.items()}
        base = rtf["jax_checkpoint_fp32"]
        return {
            "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(float_model, nnx.Param)))),
            "rtf": {k: round(v, 5) for k, v in rtf.items()},
            "speed_vs_jax_checkpoint_fp32": {k: round(base / v, 3) for k, v in rtf.items()},
            "bytes_on_disk": sizes,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,conformer_m")
    p.add_argument("--utterances", type=int, default=8)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--vocab", type=int, default=256)
    args = p.parse_args(argv)
    report = {
        "audio": {"utterances": args.utterances, "seconds_each": args.seconds, "batch": 1},
        "cpu_cores": os.cpu_count(),
        "presets": {},
    }
    for preset in [s for s in args.presets.split(",") if s]:
        report["presets"][preset] = bench_preset(preset, args)
        print(json.dumps({preset: report["presets"][preset]}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
