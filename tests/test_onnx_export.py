"""The ONNX export (`usmqs.onnx_export`): ONNX Runtime and sherpa-onnx run the model the
packed export serves.

Untrained micro models (random weights: logits are all that is compared, and their
argmax is non-blank). Audio is a zero-mean synthetic signal: sherpa-onnx's raw-waveform
path standardizes the waveform, which for zero-mean audio is a gain that per-utterance
feature normalization cancels (what a DC offset does is in the module docstring / README).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jiwer
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
sherpa_onnx = pytest.importorskip("sherpa_onnx")

from conftest import EXPORT_VOCAB, MICRO_MODEL  # noqa: E402

from usmqs import export, onnx_export  # noqa: E402
from usmqs.compress import export_format  # noqa: E402
from usmqs.data import pipeline  # noqa: E402
from usmqs.onnx_export import OnnxExportError  # noqa: E402

POLICIES = ("float", "int8", "int4", "int4+2:4")
# <blank>, <unk>, the word boundary, then 34 letters and digits: EXPORT_VOCAB symbols.
SYMBOLS = ["<blank>", "<unk>", "\u2581", *"abcdefghijklmnopqrstuvwxyz01234567"]
TOKENS = "".join(f"{s} {i}\n" for i, s in enumerate(SYMBOLS))


def _audio(seconds: float, seed: int) -> np.ndarray:
    """Zero-mean 16 kHz test signal: noise bursts and tones (float32)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    x = 0.05 * rng.normal(size=t.size) * (np.sin(2 * np.pi * 3 * t) > 0)
    x += 0.1 * np.sin(2 * np.pi * (300 + 200 * rng.random()) * t)
    return (x - x.mean()).astype(np.float32)


def _micro_export(root: pathlib.Path, policy_name: str, *, standardize_audio: bool = False) -> pathlib.Path:
    from flax import nnx

    from usmqs.compress import masks
    from usmqs.compress.policy import Policy
    from usmqs.models import presets
    from usmqs.models.conformer import ConformerCTC

    cfg = presets.get_preset("tiny")
    cfg.update(MICRO_MODEL)
    data = pipeline.default_data_config()
    data.standardize_audio = standardize_audio
    policy = Policy.named(policy_name)
    model = ConformerCTC(cfg, EXPORT_VOCAB, policy=policy, rngs=nnx.Rngs(params=1))
    masks.update_masks(model, 0, force=True)
    (root / "tokenizer.model").write_bytes(b"tokens come from TOKENS")
    export_format.write_export(
        model, root / "export", model_config=cfg, vocab_size=EXPORT_VOCAB, policy=policy,
        tokenizer_file=root / "tokenizer.model", step=3,
        data=pipeline.serving_settings(data),
    )
    onnx_export.write_onnx(root / "export", root / "onnx", tokens=TOKENS)
    return root


@pytest.fixture(scope="module")
def onnx_runs(tmp_path_factory, mixed_export) -> dict[str, pathlib.Path]:
    """The four named policies' micro exports + ONNX, and the MIXED_RULES one."""
    runs = {name: _micro_export(tmp_path_factory.mktemp(name.replace(":", "_")), name) for name in POLICIES}
    mixed = tmp_path_factory.mktemp("mixed_onnx")
    onnx_export.write_onnx(mixed_export["dir"], mixed / "onnx", tokens=TOKENS)
    runs["mixed"] = mixed
    runs["mixed_export"] = mixed_export["dir"]
    return runs


def _served_log_probs(export_dir: pathlib.Path, wave: np.ndarray) -> np.ndarray:
    served = export.load_export(export_dir)
    data_cfg, fcfg = served.data_config()
    feats = pipeline.normalize_features(pipeline.stored_log_mel(wave, fcfg), data_cfg.feature_norm)
    lp, _ = served.log_probs(feats[None], np.ones((1, feats.shape[0]), bool))
    return np.asarray(lp[0])


def _ort(model: pathlib.Path, wave: np.ndarray, *, optimize: bool = True) -> np.ndarray:
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {onnx_export.INPUT: wave[None]})[0][0]


def _greedy_ids(log_probs: np.ndarray) -> list[int]:
    best = log_probs.argmax(-1)
    return [int(k) for i, k in enumerate(best) if k != 0 and (i == 0 or k != best[i - 1])]


def _sherpa_text(onnx_dir: pathlib.Path, wave: np.ndarray) -> str:
    return onnx_export.sherpa_text(onnx_export.sherpa_recognizer(onnx_dir), wave)


def test_onnx_runtime_computes_the_served_log_probs(onnx_runs):
    """The graph's own arithmetic (ORT without graph rewrites) is the served model's, for
    every compression kind of MIXED_RULES, and stays so at ORT's defaults: MatMulNBits at
    accuracy level 0 multiplies in float32, and no DequantizeLinear -> MatMul is left for
    ORT to rewrite into int8-activation kernels."""
    wave = _audio(1.3, seed=0)
    ref = _served_log_probs(onnx_runs["mixed_export"], wave)
    model = onnx_runs["mixed"] / "onnx" / onnx_export.MODEL_FILE
    exact = _ort(model, wave, optimize=False)
    assert exact.shape == ref.shape == (32, EXPORT_VOCAB)  # 128 frames -> ceil(128 / 4)
    # Features computed in float32 here, float64 in the pipeline, can round to neighbouring
    # float16 values (the storage dtype): a few 1e-3 at most.
    np.testing.assert_allclose(exact, ref, atol=5e-3, rtol=0)
    np.testing.assert_allclose(_ort(model, wave), ref, atol=5e-3, rtol=0)
    for name in POLICIES:  # at ORT's defaults
        ref = _served_log_probs(onnx_runs[name] / "export", wave)
        np.testing.assert_allclose(_ort(onnx_runs[name] / "onnx" / onnx_export.MODEL_FILE, wave), ref, atol=5e-3, rtol=0)
    nodes = onnx.load(str(model)).graph.node
    dequantized = {d.output[0] for d in nodes if d.op_type == "DequantizeLinear"}
    assert not any(n.op_type == "MatMul" and n.input[1] in dequantized for n in nodes)


def _nbits_codes(model, node) -> np.ndarray:
    """A MatMulNBits node's codes, unpacked to one unsigned value per weight ([N, K'])."""
    inits = {t.name: t for t in model.graph.initializer}
    b = onnx.numpy_helper.to_array(inits[node.input[1]])
    if onnx.helper.get_node_attr_value(node, "bits") == 4:
        b = np.stack([b & 0xF, b >> 4], -1)
    return b.reshape(b.shape[0], -1)


def test_integer_weights_stay_integers_and_sizes_are_reported(onnx_runs):
    for name, bits, conv in (("int8", 8, onnx.TensorProto.INT8), ("int4", 4, onnx.TensorProto.INT4),
                             ("int4+2:4", 4, onnx.TensorProto.INT4)):
        model = onnx.load(str(onnx_runs[name] / "onnx" / onnx_export.MODEL_FILE))
        inits = {t.name: t for t in model.graph.initializer}
        matmuls = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert matmuls and {onnx.helper.get_node_attr_value(n, "bits") for n in matmuls} == {bits}, name
        assert all(onnx.helper.get_node_attr_value(n, "accuracy_level") == 0 for n in matmuls)
        codes = [inits[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear"]  # convs
        assert codes and {t.data_type for t in codes} == {conv}, name
        if name == "int4+2:4":  # pruned entries: codes at the zero point (8), 2 of every 4
            assert (_nbits_codes(model, matmuls[-1]) == 8).mean() >= 0.5
    sizes = {n: json.loads((onnx_runs[n] / "onnx" / onnx_export.SIZE_FILE).read_text()) for n in POLICIES}
    assert sizes["int4"]["bytes"]["int4_codes"] > 0 and sizes["int8"]["bytes"]["int8_codes"] > 0
    assert sizes["int4"]["file_bytes"] < sizes["int8"]["file_bytes"] < sizes["float"]["file_bytes"]
    assert "no N:M sparse kernel" in sizes["int4+2:4"]["n_m_sparsity"]
    assert sizes["int4+2:4"]["file_bytes"] == pytest.approx(sizes["int4"]["file_bytes"], rel=0.02)


@pytest.mark.parametrize("name", POLICIES)
def test_sherpa_onnx_decodes_the_export(onnx_runs, name):
    """sherpa-onnx at its defaults decodes model.onnx + tokens.txt to the served model's
    greedy transcript. It standardizes the waveform in its own float32 arithmetic, which
    moves the features' float16 rounding: log-probs within the few 1e-3 above, and an
    untrained model has frames whose top two log-probs are closer than that, so compressed
    models may differ in a character or two here (the float model happens not to). On a
    trained model the transcripts are the served ones (README: bench/sherpa_wer.py)."""
    onnx_dir = onnx_runs[name] / "onnx"
    loaded = onnx_export.load_onnx(onnx_dir)
    texts = []
    for seed in range(2):
        wave = _audio(1.0 + 0.4 * seed, seed)
        got = _sherpa_text(onnx_dir, wave)
        want = loaded.text(_greedy_ids(_served_log_probs(onnx_runs[name] / "export", wave)))
        assert got == want if name == "float" else jiwer.cer(want, got) <= 0.15, (want, got)
        texts.append(got)
    assert all(texts), texts  # random weights: non-blank argmax, non-empty text


def test_with_standardize_audio_sherpa_onnx_decodes_audio_with_an_offset_as_the_served_model(tmp_path):
    """sherpa-onnx standardizes the waveform before the model sees it; a run trained with
    ``data.standardize_audio`` does too (host, device and ONNX front ends), so audio with a
    DC offset and digital silence, as recorded corpora have, decodes to the served
    transcript (without it the log floor sees sherpa's gain in the silence)."""
    root = _micro_export(tmp_path, "float", standardize_audio=True)
    onnx_dir = root / "onnx"
    loaded = onnx_export.load_onnx(onnx_dir)
    for seed, offset in ((0, 0.02), (1, -0.05)):
        silence = np.zeros(3200, np.float32)
        wave = np.concatenate([silence, _audio(1.0 + 0.4 * seed, seed), silence]) + np.float32(offset)
        got = _sherpa_text(onnx_dir, wave)
        assert got and got == loaded.text(_greedy_ids(_served_log_probs(root / "export", wave)))
        assert got == loaded.text(_greedy_ids(_ort(onnx_dir / onnx_export.MODEL_FILE, wave)))


def test_tampered_or_mismatched_files_are_clear_errors(onnx_runs, tmp_path):
    src = onnx_runs["int4"] / "onnx"

    def copy() -> pathlib.Path:
        d = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        shutil.copytree(src, d)
        return d

    onnx_export.load_onnx(src)
    for tokens, match in (
        (TOKENS.replace("a 3", "x 3"), "tokens.txt: not the tokens file"),
        ("".join(TOKENS.splitlines(keepends=True)[:-1]), "36 tokens, the model has 37"),
        (TOKENS.replace("<blank> 0", "<pad> 0"), "id 0 is '<pad>'"),
    ):
        d = copy()
        (d / onnx_export.TOKENS_FILE).write_text(tokens)
        with pytest.raises(OnnxExportError, match=match):
            onnx_export.load_onnx(d)
    d = copy()
    data = bytearray((d / onnx_export.MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / onnx_export.MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(OnnxExportError, match="model.onnx"):
        onnx_export.load_onnx(d)
    d = copy()
    (d / onnx_export.MODEL_FILE).write_bytes((d / onnx_export.MODEL_FILE).read_bytes()[:1000])
    with pytest.raises(OnnxExportError, match="model.onnx"):
        onnx_export.load_onnx(d)
    d = copy()
    shutil.copy(onnx_runs["int8"] / "onnx" / onnx_export.MODEL_FILE, d / onnx_export.MODEL_FILE)
    with pytest.raises(OnnxExportError, match="sha256 differs"):
        onnx_export.load_onnx(d)


@pytest.mark.parametrize("k", [256, 144])
@pytest.mark.parametrize("kind", ["int8", "int4", "int4_asym_blocked", "int2_asym"])
def test_each_quantized_matmul_form_computes_the_dequantized_product(k, kind):
    """A quantized Dense kernel runs as MatMulNBits (K = 256: its blocks cost a few bytes
    more) or as a float32 matmul of DequantizeLinear(kernel^T) (K = 144: MatMulNBits would
    cost ~40 % more); either way ONNX Runtime at its defaults computes x @ ((q - z) * s)."""
    rng = np.random.default_rng(k)
    n, groups = 24, (4 if kind == "int4_asym_blocked" else 1)
    bits = {"int8": 8, "int4": 4, "int4_asym_blocked": 4, "int2_asym": 2}[kind]
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = rng.integers(lo, hi + 1, size=(k, n)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, size=(groups, n)).astype(np.float32)
    zp = rng.integers(lo, hi + 1, size=(groups, n)).astype(np.int8) if "asym" in kind else None
    w = onnx_export._Weight(q, bits, scale, zp)
    g = onnx_export._Graph()
    nbits = onnx_export._matmul_nbits(g, "x", w, "k")
    y = nbits or onnx_export._matmul_dequantized_left(g, "x", w, "k", rank=3)
    assert (nbits is not None) == (k == 256)
    g.nodes.append(onnx.helper.make_node("Identity", [y], ["y"]))
    graph = onnx.helper.make_graph(
        g.nodes, "t", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, "T", k])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, "T", n])], g.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", onnx_export.OPSET),
                                                         onnx.helper.make_opsetid(onnx_export.CONTRIB_DOMAIN, 1)])
    model.ir_version = onnx_export.IR_VERSION
    x = rng.normal(size=(1, 7, k)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    weight = (q.astype(np.float64) - (0 if zp is None else np.repeat(zp, k // groups, 0))) * np.repeat(scale, k // groups, 0)
    np.testing.assert_allclose(got, x.astype(np.float64) @ weight, rtol=0, atol=1e-5 * np.abs(x @ weight).max())
