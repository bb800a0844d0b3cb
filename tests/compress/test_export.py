"""The compressed export: bitwise round trips, byte accounting, integrity checks, serving.

The reference for every compressed kernel is the fake-quant forward value, computed per
stacked layer exactly as the scanned model computes it: jit(compressed_weight)(kernel[i],
mask[i]). The export goes through a different path (ops.quantize_weight -> pack -> Orbax ->
unpack -> qwix.dequantize), so bitwise equality is a real check.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from flax import nnx

from conftest import tiny_config
from usmqs import config as config_lib
from usmqs import run, train
from usmqs.compress import export, masks, ops
from usmqs.compress.export import ExportError
from usmqs.compress.policy import Policy
from usmqs.models import presets
from usmqs.models.conformer import ConformerCTC, weight_paths

VOCAB = 37
MICRO = dict(num_layers=2, model_dim=32, num_heads=2, ffn_dim=64, conv_kernel_size=4, subsample_channels=8)

# One setting per layer: the seven DESIGN.md policies (int8, int4, int2, 2:4, 1:4,
# int4+2:4, int2+2:4) on stacked and unstacked layers, plus asymmetric scales (with and
# without N:M), sub-channel blocks with clip search, int16 (no integer form: stored as
# float), N:M over several flattened axes with a padded last group (conv1: 3*3*1 = 9).
MIXED_RULES = [
    dict(module_path="blocks/ffn1/w_in", weight_bits=8),
    dict(module_path="blocks/ffn1/w_out", weight_bits=4),
    dict(module_path="blocks/ffn2/w_in", weight_bits=2),
    dict(module_path="blocks/ffn2/w_out", nm="2:4"),
    dict(module_path="blocks/attn/q", nm="1:4"),
    dict(module_path="blocks/attn/k", weight_bits=4, nm="2:4"),
    dict(module_path="blocks/attn/v", weight_bits=2, nm="2:4"),
    dict(module_path="blocks/attn/out", weight_bits=4, symmetric=False, nm="2:4"),
    dict(module_path="blocks/conv/pw1", weight_bits=2, symmetric=False),
    dict(module_path="blocks/conv/dw", weight_bits=8, nm="1:4"),
    dict(module_path="subsample/conv1", weight_bits=4, nm="2:4"),
    dict(module_path="subsample/conv2", weight_bits=4, granularity="sub_channel", block_size=4, clip_search=True),
    dict(module_path="subsample/proj", weight_bits=16, nm="2:4"),
    dict(module_path="ctc/head", weight_bits=16),
    # blocks/attn/pos and blocks/conv/pw2 stay float.
]


def _model_cfg(**overrides):
    cfg = presets.get_preset("tiny")
    cfg.update({**MICRO, **overrides})
    return cfg


def _model(policy, cfg=None, *, seed=0, prune=True):
    model = ConformerCTC(cfg or _model_cfg(), VOCAB, policy=policy, rngs=nnx.Rngs(params=seed))
    if prune:
        masks.update_masks(model, 0, force=True)
    return model


def _reference(model) -> dict[str, np.ndarray]:
    """Policy path -> fake-quant kernel [*stack, *layer_shape], one jitted layer at a time."""
    out = {}
    for path, layer in weight_paths(model).items():
        if layer.spec is None:
            continue
        fn = jax.jit(lambda k, m, l=layer: ops.compressed_weight(k, m, l.spec, contract_axes=l.contract_axes))
        k = layer.kernel[...]
        m = None if layer.mask is None else layer.mask[...]
        if k.ndim == len(layer.kernel_shape):
            out[path] = np.asarray(fn(k, m))
        else:
            out[path] = np.stack([np.asarray(fn(k[i], None if m is None else m[i])) for i in range(k.shape[0])])
    return out


def _served_kernels(served) -> dict[str, np.ndarray]:
    """Policy path -> kernel as served (dequantized codes, or the stored float kernel)."""
    deq = served.kernels()
    out = {}
    for name, rec in served.metadata["tensors"].items():
        if rec["kind"] != "float":
            out[rec["layer"]] = np.asarray(deq[name] if name in deq else served.floats[name])
    return out


def _assert_bitwise(ref: dict, got: dict):
    assert set(ref) == set(got)
    for path in ref:
        assert ref[path].dtype == got[path].dtype == np.float32, path
        assert ref[path].shape == got[path].shape, path
        np.testing.assert_array_equal(ref[path].view(np.uint32), got[path].view(np.uint32), err_msg=path)


def _tokenizer_file(directory: pathlib.Path) -> pathlib.Path:
    f = directory / "tokenizer.model"
    f.write_bytes(b"not parsed by load_export, only checksummed")
    return f


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    policy = Policy.from_config(MIXED_RULES)
    cfg = _model_cfg()
    model = _model(policy, cfg)
    report = export.write_export(
        model, root / "export", model_config=cfg, vocab_size=VOCAB, policy=policy,
        tokenizer_file=_tokenizer_file(root), step=7,
    )
    return dict(root=root, dir=root / "export", cfg=cfg, policy=policy, model=model, report=report)


# ------------------------------------------------------------------------ round trips


def test_every_policy_round_trips_bitwise(mixed):
    served = export.load_export(mixed["dir"])
    kinds = {rec["kind"] for rec in served.metadata["tensors"].values()}
    assert kinds == {"quantized", "sparse_float", "dense_float", "float"}
    _assert_bitwise(_reference(mixed["model"]), _served_kernels(served))
    # Integer codes are held one byte each, in their range, with N of every M kept.
    codes = served.codes["blocks/attn/v/kernel"]["q"]
    assert codes.dtype == jnp.int8 and set(np.unique(np.asarray(codes))) <= {-2, -1, 0, 1}
    assert codes.shape == (2, 32, 2, 16)  # [layers, in, heads, head_dim]; 2:4 along `in`
    assert (np.asarray(codes != 0).reshape(2, 8, 4, 32).sum(axis=2) <= 2).all()


def test_metadata_records_the_layout(mixed):
    meta = json.loads((mixed["dir"] / "metadata.json").read_text())
    assert meta["format_version"] == export.FORMAT_VERSION and meta["step"] == 7
    assert meta["vocab_size"] == VOCAB and meta["model_config"]["model_dim"] == 32
    assert Policy.from_config(meta["policy"]) == mixed["policy"]
    k = meta["tensors"]["blocks/attn/k/kernel"]
    assert k["kind"] == "quantized" and k["weight_bits"] == 4 and k["nm"] == [2, 4]
    assert k["stack_shape"] == [2] and k["layer_shape"] == [32, 2, 16] and k["nm_axes"] == [0]
    assert k["index_encoding"] == "position"
    vals, idx, scale = (k["arrays"][c] for c in ("values", "indices", "scale"))
    # 2 of every 4 of 32*32 weights per layer at 4 bits, a 2-bit position each.
    assert vals["dtype"] == idx["dtype"] == "uint8" and vals["shape"] == [2, 32 * 32 // 2 * 4 // 8]
    assert idx["shape"] == [2, 32 * 32 // 2 * 2 // 8] and vals["bits"] == 4 and idx["bits"] == 2
    assert scale["dtype"] == "float32" and scale["shape"] == [2, 1, 2, 16]
    assert "zero_point" in meta["tensors"]["blocks/attn/out/kernel"]["arrays"]
    conv1 = meta["tensors"]["subsample/conv1/kernel"]
    assert conv1["nm_axes"] == [0, 1, 2]  # 3*3*1 = 9 -> 3 groups of 4, the last one padded
    assert meta["tensors"]["blocks/conv/pw2/kernel"]["kind"] == "float"
    for rec in meta["tensors"].values():
        assert all(len(a["sha256"]) == 64 for a in rec["arrays"].values())


def test_served_forward_is_bitwise_the_fake_quant_forward(mixed):
    served = export.load_export(mixed["dir"])
    rs = np.random.default_rng(0)
    features = jnp.asarray(rs.standard_normal((3, 72, 80)), jnp.float32)
    mask = jnp.asarray(np.arange(72)[None, :] < np.array([[72], [50], [31]]))
    graphdef, params, rest = nnx.split(mixed["model"], nnx.Param, ...)

    @jax.jit
    def fake_quant(params, rest, f, m):
        logits, out_mask = nnx.merge(graphdef, params, rest)(f, m, rng=None)
        return jax.nn.log_softmax(logits, axis=-1), out_mask

    want, want_mask = fake_quant(params, rest, features, mask)
    got, got_mask = served.log_probs(features, mask)
    valid = np.asarray(want_mask)
    np.testing.assert_array_equal(np.asarray(got_mask), valid)
    assert 0 < valid.sum() < valid.size  # padded frames exist (they hold meaningless values)
    np.testing.assert_array_equal(np.asarray(got)[valid], np.asarray(want)[valid])


def _top_level_avals(closed_jaxpr):
    """Avals of every value the jaxpr computes outside scan bodies (jit calls inlined)."""
    out = []
    for eqn in closed_jaxpr.jaxpr.eqns:
        out += [v.aval for v in eqn.outvars]
        if eqn.primitive.name in ("pjit", "jit", "closed_call"):
            out += _top_level_avals(eqn.params["jaxpr"])
    return out


def test_served_kernels_stay_packed_and_decode_per_layer(mixed):
    """The forward holds stacked kernels packed and decodes one layer per scan step: no
    float array of a whole stacked kernel exists outside the scan body, and the logits
    equal those of a forward given every kernel fully decoded up front."""
    served = export.load_export(mixed["dir"])
    stacked = {n: p for n, p in served.packed.items() if served.metadata["tensors"][n]["stack_shape"]}
    assert "blocks/attn/k/kernel" in stacked and stacked["blocks/attn/k/kernel"].values.dtype == jnp.uint8
    features = jnp.asarray(np.random.default_rng(1).standard_normal((2, 40, 80)), jnp.float32)
    mask = jnp.ones((2, 40), bool)
    jaxpr = jax.make_jaxpr(served._forward)(served.floats, served.packed, features, mask)
    full = {tuple(served.metadata["tensors"][n]["shape"]) for n in stacked}
    float_shapes = {tuple(a.shape) for a in _top_level_avals(jaxpr) if getattr(a, "dtype", None) == jnp.float32}
    assert not full & float_shapes, full & float_shapes
    got, _ = served.log_probs(features, mask)
    everything_decoded = {**served.floats, **served.kernels()}
    want, _ = served._forward(everything_decoded, {}, features, mask)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_combinatorial_indices_round_trip_and_are_smaller(mixed, tmp_path):
    report = export.write_export(
        mixed["model"], tmp_path / "export", model_config=mixed["cfg"], vocab_size=VOCAB,
        policy=mixed["policy"], tokenizer_file=_tokenizer_file(tmp_path), index_encoding="combinatorial",
    )
    served = export.load_export(tmp_path / "export")
    _assert_bitwise(_reference(mixed["model"]), _served_kernels(served))
    rec = served.metadata["tensors"]["blocks/attn/k/kernel"]
    assert rec["index_encoding"] == "combinatorial" and rec["arrays"]["indices"]["bits"] == 3
    # 2:4: 3 bits per group instead of 2 x 2; 1:4: 2 bits either way.
    assert report["bytes"]["indices"] < mixed["report"]["bytes"]["indices"]
    assert report["bytes"]["values"] == mixed["report"]["bytes"]["values"]


# ------------------------------------------------------------------------- integrity


@pytest.fixture
def copy(mixed, tmp_path):
    dst = tmp_path / "export"
    shutil.copytree(mixed["dir"], dst)
    return dst


def _largest_data_file(d: pathlib.Path) -> pathlib.Path:
    return max((f for f in (d / "arrays").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


@pytest.mark.parametrize("where", ["payload", "bookkeeping"])
def test_flipped_byte_fails_a_checksum(copy, where):
    files = sorted((f for f in (copy / "arrays").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    f = files[-1] if where == "payload" else files[0]  # array data / an Orbax side file
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x5A
    f.write_bytes(bytes(data))
    named = r"tensor \S+" if where == "payload" else f"file {f.relative_to(copy)}"
    with pytest.raises(ExportError, match=f"{named} fails its sha256 checksum"):
        export.load_export(copy)


def test_truncated_file_is_named(copy):
    f = _largest_data_file(copy)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    rel = str(f.relative_to(copy))
    with pytest.raises(ExportError, match=f"file {rel} has {len(data) // 2} bytes, expected {len(data)} .truncated"):
        export.load_export(copy)


def test_missing_file_and_truncated_metadata(copy):
    (copy / "tokenizer.model").unlink()
    with pytest.raises(ExportError, match="tokenizer.model is missing"):
        export.load_export(copy)
    meta = copy / "metadata.json"
    meta.write_text(meta.read_text()[:-200])
    with pytest.raises(ExportError, match="not valid JSON"):
        export.load_export(copy)


def test_wrong_format_version(copy):
    meta = json.loads((copy / "metadata.json").read_text())
    meta["format_version"] = export.FORMAT_VERSION + 1
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="format_version 2"):
        export.load_export(copy)


def test_wrong_preset_or_model_config(copy, mixed):
    cfg = config_lib.load_config(str(pathlib.Path(__file__).parents[2] / "configs/tiny.py"))
    with pytest.raises(ExportError, match=r"another model preset.*model_dim: export 32 vs config 144"):
        export.load_export(copy, config=cfg)
    # Metadata that no longer describes the stored arrays: the tensor is named.
    meta = json.loads((copy / "metadata.json").read_text())
    meta["model_config"]["ffn_dim"] = 96
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="tensor blocks/ffn1/w_in/.*model needs float32"):
        export.load_export(copy)


def test_failed_export_leaves_the_previous_one_intact(mixed, tmp_path):
    shutil.copytree(mixed["dir"], tmp_path / "export")
    unpruned = _model(mixed["policy"], mixed["cfg"], prune=False)  # masks still all-ones
    with pytest.raises(ExportError, match=r"blocks/.*: the mask is not a \d:4 pattern"):
        export.write_export(
            unpruned, tmp_path / "export", model_config=mixed["cfg"], vocab_size=VOCAB,
            policy=mixed["policy"], tokenizer_file=tmp_path / "export/tokenizer.model",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary left
    export.load_export(tmp_path / "export")


# ----------------------------------------------------------- checkpoint + accounting


def _write_run(workdir: pathlib.Path, cfg):
    """A run without training: init, one-shot masks, checkpoint + tokenizer."""
    from usmqs.data.tokenizer import Tokenizer

    tok = Tokenizer.train(["the cat sat on a mat", "red and blue"], workdir / "tokenizer", 0, "char")
    setup = run.build(cfg, tok.vocab_size)
    state = setup.init_fn(jax.random.PRNGKey(0))

    state = run.init_masks(setup, state)  # one-shot masks from the initial weights
    mngr = run.checkpoint_manager(workdir, cfg)
    run.save_state(mngr, state.replace(step=jnp.asarray(3, jnp.int32)), {})
    mngr.close()
    return setup


def test_export_workdir_accounting_and_disk(tmp_path):
    """int4 + 2:4 over the tiny preset (conv kernel 8, and the 9-tap first subsampling
    conv left float, so no N:M group is padded): the compressed layers are exactly 3 bits
    = 9.375 % of fp32 without scales; disk matches the report. (Orbax's per-tensor
    bookkeeping is ~0.5 KB a tensor, so a much smaller model would miss the 5 %.)"""
    cfg = config_lib.load_config(str(pathlib.Path(__file__).parents[2] / "configs/tiny.py"))
    config_lib.apply_overrides(cfg, ["model.conv_kernel_size=8", "mesh.data=1"])
    cfg.policy.rules = (
        {"module_path": "subsample/conv1"},  # keep float
        {"module_path": ".*", "weight_bits": 4, "nm": "2:4"},
    )
    setup = _write_run(tmp_path, cfg)
    report = export.export_workdir(cfg, tmp_path)
    d = tmp_path / "export"
    assert json.loads((d / "size.json").read_text()) == report
    assert report["compressed_layers_ratio_no_scales"] == 0.09375
    assert report["compressed_layers_bits_per_weight_no_scales"] == 3.0
    b = report["bytes"]
    assert report["compressed_layers_ratio"] == (b["values"] + b["indices"] + b["scales"]) / report["compressed_layers_fp32_bytes"]
    assert 0.09375 < report["compressed_layers_ratio"] < 0.105
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state.params))
    assert report["fp32_bytes"] == 4 * n_params
    assert report["total_bytes"] == sum(b.values())
    # Honest accounting: the arrays take their own bytes on disk (no compression, no
    # copies) and `du -b` of the directory is within 5 % of the total.
    assert abs(report["arrays_disk_bytes"] / report["arrays_payload_bytes"] - 1) < 0.05
    du = int(subprocess.run(["du", "-b", "-s", str(d)], capture_output=True, text=True, check=True).stdout.split()[0])
    assert abs(du / report["total_bytes"] - 1) < 0.05, (du, report["total_bytes"])
    # The served kernels are the checkpoint's fake-quant kernels.
    mngr = run.checkpoint_manager(tmp_path, cfg)
    state, _ = run.restore_state(mngr, 3, setup)
    served = export.load_export(d, config=cfg)
    _assert_bitwise(_reference(nnx.merge(setup.graphdef, state.params, state.rest)), _served_kernels(served))


# ---------------------------------------------------------------------- end to end


def _tone_corpus(root: pathlib.Path) -> dict:
    texts = ["the cat sat", "a dog ran", "the sun is hot", "we go home", "red and blue", "one two three"]
    rows = []
    for i, text in enumerate(texts):
        t = np.arange(int((1.0 + 0.15 * i) * 16000)) / 16000
        audio = 0.3 * np.sin(2 * np.pi * (200 + 60 * i) * t) + 0.01 * np.random.default_rng(i).standard_normal(t.size)
        sf.write(root / f"u{i}.wav", audio.astype(np.float32), 16000, subtype="PCM_16")
        rows.append(json.dumps({"audio_filepath": f"u{i}.wav", "text": text, "duration": t.size / 16000}))
    (root / "m.jsonl").write_text("\n".join(rows) + "\n")
    return {"train": root / "m.jsonl", "test": root / "m.jsonl"}


@pytest.mark.slow
def test_evaluate_export_predicts_exactly_like_the_fake_quant_eval(tmp_path):
    cfg = tiny_config(_tone_corpus(tmp_path), policy="int4+2:4", steps=2, conv_kernel_size=5)
    cfg.data.tokenizer_type = "char"
    cfg.data.bucket_boundaries = (200,)
    cfg.data.max_frames = 200
    workdir = tmp_path / "run"
    fq = train.train_and_evaluate(cfg, workdir)  # writes eval.json + predictions.jsonl
    export.export_workdir(cfg, workdir)
    # Serving reads nothing but the export: no checkpoints, no workdir tokenizer.
    shutil.rmtree(workdir / "checkpoints")
    (workdir / "tokenizer.model").unlink()
    got = export.evaluate_export(cfg, workdir)
    want = (workdir / "predictions.jsonl").read_text().splitlines()
    assert (workdir / "predictions_export.jsonl").read_text().splitlines() == want
    assert len({json.loads(r)["pred_text"] for r in want}) > 1  # not all-blank: a real check
    assert got["wer"] == fq["wer"] and got["cer"] == fq["cer"]
    assert json.loads((workdir / "eval_export.json").read_text())["num_utterances"] == 6
