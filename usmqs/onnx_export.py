"""ONNX export of a packed export, for ONNX Runtime and sherpa-onnx.

    usmqs export --workdir DIR --format onnx     # DIR/export/ (packed), then DIR/onnx/

``DIR/onnx/`` holds ``model.onnx``, ``tokens.txt`` (``symbol id`` per line, ``<blank>`` at
0, sentencepiece's word boundary ``▁`` kept: sherpa-onnx turns it into a space) and
``size.json`` (`size_report`). The graph is written node by node with `onnx.helper` from
the verified packed export (`usmqs.compress.export_format.read_export`), never from the
training checkpoint, so it carries the integers the packed export carries.

Graph (opset 21), one utterance per row, no padding::

    waveform [N, S] float32 -> pre-emphasis -> frames x window x DFT (one strided Conv)
      -> power -> mel MatMul -> log(max(., 1e-10)) -> float16 round trip (the prepared
      splits store features in float16) -> per-utterance, per-bin mean/variance
      normalization                                                [N, T, F]
      -> ConvSubsampling (two Conv 3x3 stride 2, pads 1) -> blocks, unrolled
      -> LayerNorm -> CTC head -> LogSoftmax           log_probs [N, ceil(T / 4), V]

The front end is the project's (`usmqs.data.features`) computed from the raw waveform:
sherpa-onnx's raw-waveform CTC path (`OfflineRecognizer.from_omnilingual_asr_ctc`) feeds
the model the utterance standardized to zero mean and unit variance, and per-utterance
feature normalization cancels that gain (log-mel bins move by a constant), so a run
trained with ``data.feature_norm='utterance'`` (the default) gets its training features.
A run with ``feature_norm='none'`` depends on the absolute level: it is refused. What
the standardization cannot give back is the waveform's DC offset; pre-emphasis removes
97 % of it (README "Deploying" has the measured effect). That path takes every output
frame (no ``T // subsampling_factor`` truncation as in its NeMo path), and sherpa-onnx
decodes it one stream at a time.

Weights: a quantized matmul kernel is ONNX Runtime's ``MatMulNBits`` (com.microsoft):
4-bit (int4 and int2 codes; there is no 2-bit CPU kernel) or 8-bit unsigned codes in
blocks along the input axis, a float32 scale per block (the layer's per-channel or
sub-channel scale, repeated) and the zero point of an asymmetric layer, at accuracy level
0: the kernel computes ``(q - z) * scale``, the evaluation's weight, in float32
(`ACCURACY_LEVEL` says why not int8 activations), where that layout costs at most
`NBITS_MAX_EXTRA_BYTES` more than codes + scales. Other quantized kernels are INT8 or
INT4 initializers followed by ``DequantizeLinear`` -- per output channel, or blocked along
the input axis for sub-channel scales, with the zero point -- giving the same weight: a
matmul kernel transposed and multiplied from the left (`_matmul_dequantized_left`), a
conv kernel into Conv. Pruned entries are codes equal to the zero point: exact zeros.
N:M layers are stored dense (ONNX Runtime has no N:M sparse kernel). Float layers (norms, biases, int16 and float N:M
kernels, decoded) are float32 initializers. Blocks are unrolled (one set of initializers
per layer) rather than a Loop over stacked weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib

import jax
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from usmqs import storage
from usmqs.compress import export_format
from usmqs.compress.codec import Kind, PackedKernel
from usmqs.compress.export_format import ExportError
from usmqs.data import features as features_lib
from usmqs.data import pipeline
from usmqs.data.tokenizer import Tokenizer
from usmqs.models.conformer import SUBSAMPLING_FACTOR, ConformerConfig, subsampled_length

ONNX_DIRNAME = "onnx"
MODEL_FILE = "model.onnx"
TOKENS_FILE = "tokens.txt"
SIZE_FILE = "size.json"
OPSET = 21  # INT4 and blocked DequantizeLinear
CONTRIB_DOMAIN = "com.microsoft"  # MatMulNBits
IR_VERSION = 10  # what ONNX Runtime 1.20+ (sherpa-onnx 2.0.1 carries 1.28) loads
INPUT, OUTPUT = "waveform", "log_probs"
MODEL_TYPE = "usmqs-conformer-ctc"
BLANK_SYMBOL = "<blank>"
NO_NM_KERNEL = (
    "ONNX Runtime has no N:M sparse kernel: N:M layers are stored dense (their pruned "
    "entries exact zeros), so 2:4 / 1:4 save nothing in model.onnx"
)


class OnnxExportError(ExportError):
    """A missing, tampered or mismatched ONNX export or tokens file; names the culprit."""


# ============================================================================ graph


class _Graph:
    """Nodes and initializers of one ONNX graph, with generated names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value, hint: str = "c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def tensor(self, proto: onnx.TensorProto) -> str:
        self.inits.append(proto)
        return proto.name

    def op(self, op_type: str, *inputs: str, hint: str | None = None, outputs: int = 1, **attrs):
        names = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def i64(self, *values: int) -> str:
        return self.const(np.asarray(values, np.int64), "i64")

    def f32(self, value: float) -> str:
        return self.const(np.asarray(value, np.float32), "f32")


# ========================================================================== weights


@dataclasses.dataclass
class _Weight:
    """One layer's kernel: integer codes + scale (+ zero point), or a float value."""

    value: np.ndarray  # int8 codes (quantized) or float32 kernel
    bits: int | None = None
    scale: np.ndarray | None = None  # qwix layout: the kernel's rank, 1 on reduced axes
    zero_point: np.ndarray | None = None

    def transformed(self, fn) -> _Weight:
        """The same weight in another layout (`fn` reshapes/transposes an array of the
        kernel's rank; scale and zero point follow, their 1-axes staying 1)."""
        return _Weight(
            fn(self.value), self.bits,
            None if self.scale is None else fn(self.scale),
            None if self.zero_point is None else fn(self.zero_point),
        )


def _int4_tensor(name: str, codes: np.ndarray) -> onnx.TensorProto:
    """An INT4 initializer: two's complement nibbles, element 0 in the low nibble."""
    packed = _nibbles(codes.reshape(-1).astype(np.int16) & 0xF)
    return helper.make_tensor(name, TensorProto.INT4, codes.shape, packed.tobytes(), raw=True)


def _int_tensor(name: str, codes: np.ndarray, bits: int) -> onnx.TensorProto:
    if bits <= 4 and codes.min(initial=0) >= -8 and codes.max(initial=0) <= 7:
        return _int4_tensor(name, codes)
    return numpy_helper.from_array(codes.astype(np.int8), name)


def _dequantize_form(shape: tuple[int, ...], scale_shape: tuple[int, ...], name: str) -> dict:
    """DequantizeLinear attributes for a scale of `scale_shape` over a kernel of `shape`:
    per tensor, per axis, or blocked along one axis (the others broadcast to full)."""
    varying = [a for a, s in enumerate(scale_shape) if s != 1]
    if not varying:
        return {"kind": "tensor"}
    if len(varying) == 1 and scale_shape[varying[0]] == shape[varying[0]]:
        return {"kind": "axis", "axis": varying[0]}
    blocked = [a for a in varying if scale_shape[a] != shape[a]]
    if len(blocked) != 1 or shape[blocked[0]] % scale_shape[blocked[0]]:
        raise OnnxExportError(f"{name}: scale {list(scale_shape)} over kernel {list(shape)} has no DequantizeLinear form")
    a = blocked[0]
    return {"kind": "block", "axis": a, "block_size": shape[a] // scale_shape[a]}


def _emit_weight(g: _Graph, w: _Weight, name: str) -> str:
    """The float32 kernel as a graph value: a float initializer, or integer codes ->
    DequantizeLinear."""
    if w.bits is None:
        return g.const(w.value.astype(np.float32), name)
    shape = tuple(w.value.shape)
    form = _dequantize_form(shape, tuple(w.scale.shape), name)
    q = g.tensor(_int_tensor(g.name(name + "_q"), w.value, w.bits))
    q_type = g.inits[-1].data_type
    scale, zp, attrs = w.scale.astype(np.float32), w.zero_point, {}
    if form["kind"] == "tensor":
        scale, zp = scale.reshape(()), None if zp is None else zp.reshape(())
    elif form["kind"] == "axis":
        scale, zp = scale.reshape(-1), None if zp is None else zp.reshape(-1)
        attrs["axis"] = form["axis"]
    else:
        full = tuple(s if a == form["axis"] else shape[a] for a, s in enumerate(scale.shape))
        scale = np.ascontiguousarray(np.broadcast_to(scale, full))
        zp = None if zp is None else np.ascontiguousarray(np.broadcast_to(zp, full))
        attrs.update(axis=form["axis"], block_size=form["block_size"])
    inputs = [q, g.const(scale, name + "_scale")]
    if zp is not None:
        zp_name = g.name(name + "_zp")
        zp_proto = (_int4_tensor(zp_name, zp) if q_type == TensorProto.INT4
                    else numpy_helper.from_array(zp.astype(np.int8), zp_name))
        inputs.append(g.tensor(zp_proto))
    return g.op("DequantizeLinear", *inputs, hint=name, **attrs)


# MatMulNBits (ONNX Runtime's com.microsoft contrib op): the block lengths its CPU kernels
# take, the accuracy level written into every node, and how many more bytes than the
# DequantizeLinear form its layout may cost. Level 0 dequantizes each block of integer
# codes to float32 inside the kernel and multiplies in float32, so the result is the
# served model's up to summation order. Left to itself, ONNX Runtime rewrites
# DequantizeLinear -> MatMul into MatMulNBits at level 4 (int8 activations), which
# changed some transcripts of trained models (README "Deploying with sherpa-onnx"). The
# layout pads the input axis to whole blocks and repeats a float32 scale per block: a few
# percent more bytes on dimensions like 256 or 1024, ~40 % on `tiny`'s 144.
NBITS_BLOCKS = (16, 32, 64, 128, 256)
ACCURACY_LEVEL = 0
NBITS_MAX_EXTRA_BYTES = 1 / 16


def _nbits_layout(w: _Weight) -> tuple[int, int] | None:
    """(bits, block) of the MatMulNBits form of a quantized [K, N] kernel: 4-bit codes
    where codes and zero points fit [-8, 7] (int4, int2), else 8-bit; the block length of
    fewest bytes per output channel (codes padded to whole blocks + a float32 scale per
    block) among those that tile the kernel's scale groups along K. None where no block
    tiles them or the bytes exceed the DequantizeLinear form's by `NBITS_MAX_EXTRA_BYTES`."""
    k, n = w.value.shape
    groups = w.scale.size // n
    fits4 = all(a is None or (a.min(initial=0) >= -8 and a.max(initial=0) <= 7) for a in (w.value, w.zero_point))
    bits = 4 if w.bits <= 4 and fits4 else 8
    blocks = [b for b in NBITS_BLOCKS if groups == 1 or (k // groups) % b == 0]
    if not blocks:
        return None
    cost = {b: -(-k // b) * (b * bits // 8 + 4) for b in blocks}
    block = min(blocks, key=cost.get)
    dq_bytes = k * bits / 8 + 4 * groups  # DequantizeLinear: the codes, a scale per group
    return (bits, block) if cost[block] <= (1 + NBITS_MAX_EXTRA_BYTES) * dq_bytes else None


def _nibbles(a: np.ndarray) -> np.ndarray:
    """Pairs along the last axis in one byte each, element 0 in the low nibble."""
    if a.shape[-1] % 2:
        a = np.concatenate([a, np.zeros(a.shape[:-1] + (1,), a.dtype)], -1)
    return (a[..., 0::2] | (a[..., 1::2] << 4)).astype(np.uint8)


def _matmul_nbits(g: _Graph, x: str, w: _Weight, name: str) -> str | None:
    """``x @ kernel`` as MatMulNBits at `ACCURACY_LEVEL`, or None where `_nbits_layout`
    finds no layout. Codes become unsigned (q + 2^(bits-1)) with that
    offset as the default zero point, or the layer's zero point + the offset; padding to
    whole blocks repeats the zero point (weight 0). Scales repeat per block of a group."""
    layout = _nbits_layout(w)
    if layout is None:
        return None
    bits, block = layout
    (k, n), offset = w.value.shape, 1 << (bits - 1)
    nblocks, group = -(-k // block), k // (w.scale.size // n)  # K of one scale group
    group_of_block = np.arange(nblocks) * block // group
    scales = np.asarray(w.scale, np.float32).reshape(-1, n)[group_of_block].T  # [N, blocks]
    zp = None
    if w.zero_point is not None:
        zp = (np.asarray(w.zero_point).reshape(-1, n)[group_of_block].T.astype(np.int16) + offset)  # [N, blocks]
    codes = np.empty((n, nblocks * block), np.int16)
    codes[:, :k] = w.value.T.astype(np.int16) + offset
    codes[:, k:] = offset if zp is None else zp[:, -1:]
    codes = codes.astype(np.uint8).reshape(n, nblocks, block)
    inputs = [x, g.const(_nibbles(codes) if bits == 4 else codes, name + "_codes"),
              g.const(scales.reshape(-1), name + "_scales")]
    if zp is not None:
        zp = zp.astype(np.uint8)
        inputs.append(g.const((_nibbles(zp) if bits == 4 else zp).reshape(-1), name + "_zero_points"))
    return g.op("MatMulNBits", *inputs, hint=name, domain=CONTRIB_DOMAIN, K=k, N=n, bits=bits,
                block_size=block, accuracy_level=ACCURACY_LEVEL)


class _Weights:
    """The export's tensors by name, one stacked layer at a time (`layer` index)."""

    def __init__(self, meta: dict, stored: dict):
        self.meta, self.records = meta, meta["tensors"]
        self.values = {
            name: export_format.restore_tensor(name, rec, stored[name]) for name, rec in self.records.items()
        }

    def __call__(self, name: str, layer: int | None = None) -> _Weight:
        v = self.values[name]
        if not isinstance(v, PackedKernel):
            a = np.asarray(v, np.float32)
            return _Weight(a if layer is None else a[layer])
        if layer is not None:
            v = jax.tree.map(lambda leaf: leaf[layer], v)
        if v.layout.kind is not Kind.QUANTIZED:
            return _Weight(np.asarray(v.decode(), np.float32))
        zp = None if v.zero_point is None else np.asarray(v.zero_point)
        return _Weight(np.asarray(v.codes()), v.layout.value_bits, np.asarray(v.scale), zp)

    def dense(self, prefix: str, layer: int | None = None) -> tuple[_Weight, np.ndarray | None]:
        """(kernel [in, out], bias [out] or None) of a Dense layer; split-out kernels
        [D, a, b] are flattened to [D, a*b] (head-major, as the model reshapes)."""
        w = self(f"{prefix}/kernel", layer)
        if w.value.ndim > 2:
            w = w.transformed(lambda a: a.reshape(a.shape[0], -1))
        bias = None
        if f"{prefix}/bias" in self.records:
            bias = self(f"{prefix}/bias", layer).value.reshape(-1)
        return w, bias

    def conv(self, g: _Graph, prefix: str, perm: tuple[int, ...], layer: int | None = None) -> tuple[str, str]:
        """(kernel in ONNX's [out, in, *window] layout, bias) of a Conv layer."""
        w = self(f"{prefix}/kernel", layer).transformed(lambda a: np.ascontiguousarray(np.transpose(a, perm)))
        kernel = _emit_weight(g, w, prefix.replace("/", "_"))
        return kernel, g.const(self(f"{prefix}/bias", layer).value, prefix.replace("/", "_") + "_b")

    def vector(self, g: _Graph, name: str, layer: int | None = None) -> str:
        return g.const(self(name, layer).value, name.replace("/", "_"))


# ======================================================================= front end


def _dft_basis(g: _Graph, fcfg: features_lib.FeatureConfig) -> str:
    """Conv kernel [2K, 1, win]: window x cos and window x -sin of the n_fft-point DFT
    (K = n_fft // 2 + 1; the window is zero-padded at the end, so only win taps).
    Computed from constants in the graph (ONNX Runtime folds it once at load), not stored:
    as an initializer it would outweigh an int4 tiny model. k*n is reduced mod n_fft in
    integers, so every angle is exact before its float32 cos/sin."""
    k = g.op("Range", g.const(np.int64(0)), g.const(np.int64(fcfg.n_fft // 2 + 1)), g.const(np.int64(1)))
    n = g.op("Range", g.const(np.int64(0)), g.const(np.int64(fcfg.win_length)), g.const(np.int64(1)))
    kn = g.op("Mod", g.op("Mul", g.op("Unsqueeze", k, g.i64(1)), g.op("Unsqueeze", n, g.i64(0))), g.const(np.int64(fcfg.n_fft)))
    angle = g.op("Mul", g.op("Cast", kn, to=TensorProto.FLOAT), g.f32(2.0 * np.pi / fcfg.n_fft))
    basis = g.op("Concat", g.op("Cos", angle), g.op("Neg", g.op("Sin", angle)), axis=0)
    window = g.const(features_lib.window_function(fcfg).astype(np.float32)[None, :], "window")
    return g.op("Unsqueeze", g.op("Mul", basis, window), g.i64(1))


def _front_end(g: _Graph, wave: str, fcfg: features_lib.FeatureConfig, norm: str) -> str:
    """waveform [N, S] -> features [N, T, F] as the prepared splits hold them, normalized
    per utterance (`usmqs.data.features.compute_log_mel`, `pipeline.normalize_features`)."""
    if fcfg.standardize_audio:  # (x - mean) / std; a constant row stays x - mean
        centred = g.op("Sub", wave, g.op("ReduceMean", wave, g.i64(1), keepdims=1))
        std = g.op("Sqrt", g.op("ReduceMean", g.op("Mul", centred, centred), g.i64(1), keepdims=1))
        zero = g.op("Equal", std, g.f32(0.0))
        wave = g.op("Div", centred, g.op("Where", zero, g.f32(1.0), std))
    if fcfg.preemphasis:
        head = g.op("Slice", wave, g.i64(0), g.i64(1), g.i64(1))
        cur = g.op("Slice", wave, g.i64(1), g.i64(2**62), g.i64(1))
        prev = g.op("Slice", wave, g.i64(0), g.i64(-1), g.i64(1))
        diff = g.op("Sub", cur, g.op("Mul", prev, g.f32(fcfg.preemphasis)))
        wave = g.op("Concat", head, diff, axis=1)
    k = fcfg.n_fft // 2 + 1
    spec = g.op("Conv", g.op("Unsqueeze", wave, g.i64(1)), _dft_basis(g, fcfg),
                strides=[fcfg.hop_length])  # [N, 2K, T]
    re, im = g.op("Split", spec, g.i64(k, k), axis=1, outputs=2)
    power = g.op("Add", g.op("Mul", re, re), g.op("Mul", im, im))  # [N, K, T]
    mel_w = features_lib.mel_filterbank(fcfg).astype(np.float32)  # [K, F]
    mel = g.op("MatMul", g.op("Transpose", power, perm=[0, 2, 1]), g.const(mel_w, "mel"))
    x = g.op("Log", g.op("Max", mel, g.f32(fcfg.log_floor)))
    dtype = np.dtype(pipeline.STORAGE_DTYPE)
    if dtype != np.float32:  # the prepared splits' storage rounding
        x = g.op("Cast", g.op("Cast", x, to=helper.np_dtype_to_tensor_dtype(dtype)), to=TensorProto.FLOAT)
    if norm == "none":
        return x
    centred = g.op("Sub", x, g.op("ReduceMean", x, g.i64(1), keepdims=1))
    std = g.op("Sqrt", g.op("ReduceMean", g.op("Mul", centred, centred), g.i64(1), keepdims=1))
    return g.op("Div", centred, g.op("Add", std, g.f32(1e-5)))


# ========================================================================= encoder


def _layer_norm(g: _Graph, x: str, w: _Weights, prefix: str, layer: int | None, kind: str = "layer_norm") -> str:
    scale = w.vector(g, f"{prefix}/scale", layer)
    if kind == "layer_norm":
        return g.op("LayerNormalization", x, scale, w.vector(g, f"{prefix}/bias", layer), axis=-1, epsilon=1e-6)
    ms = g.op("ReduceMean", g.op("Mul", x, x), g.i64(-1), keepdims=1)
    return g.op("Mul", g.op("Div", x, g.op("Sqrt", g.op("Add", ms, g.f32(1e-6)))), scale)


def _matmul_dequantized_left(g: _Graph, x: str, w: _Weight, name: str, rank: int) -> str:
    """``x @ kernel`` as ``(DequantizeLinear(kernel^T) @ x^T)^T``: exact float32 weights
    and a float32 matmul. (ONNX Runtime rewrites DequantizeLinear into MatMulNBits with
    int8 activations only where it feeds a MatMul's second input.)"""
    wt = _emit_weight(g, w.transformed(lambda a: np.ascontiguousarray(a.T)), name)
    perm = [1, 0] if rank == 2 else [0, 2, 1]
    return g.op("Transpose", g.op("MatMul", wt, g.op("Transpose", x, perm=perm)), perm=perm)


def _linear(g: _Graph, x: str, w: _Weights, prefix: str, layer: int | None = None, rank: int = 3) -> str:
    """A Dense layer on `x` of `rank` (the features last): float kernels as MatMul, quantized
    ones as MatMulNBits where its layout costs at most `NBITS_MAX_EXTRA_BYTES` more bytes,
    else as a float32 matmul of the dequantized kernel."""
    kernel, bias = w.dense(prefix, layer)
    name = prefix.replace("/", "_")
    if kernel.bits is None:
        y = g.op("MatMul", x, g.const(kernel.value.astype(np.float32), name))
    else:
        y = _matmul_nbits(g, x, kernel, name) or _matmul_dequantized_left(g, x, kernel, name, rank)
    return y if bias is None else g.op("Add", y, g.const(bias, name + "_b"))


def _swish(g: _Graph, x: str) -> str:
    return g.op("Mul", x, g.op("Sigmoid", x))


def _subsample(g: _Graph, x: str, w: _Weights, cfg: ConformerConfig) -> str:
    """features [N, T, F] -> [N, T', D]: NCHW convs with the HWIO kernels transposed."""
    h = g.op("Unsqueeze", x, g.i64(1))  # [N, 1, T, F]
    for conv in ("conv1", "conv2"):
        kernel, bias = w.conv(g, f"subsample/{conv}", (3, 2, 0, 1))
        h = g.op("Relu", g.op("Conv", h, kernel, bias, strides=[2, 2], pads=[1, 1, 1, 1]))
    h = g.op("Transpose", h, perm=[0, 2, 3, 1])  # [N, T', F', C]
    f_out = subsampled_length(cfg.num_mel_bins)
    h = g.op("Reshape", h, g.i64(0, 0, f_out * cfg.subsample_channels))
    return _linear(g, h, w, "subsample/proj")


def _rel_positions(g: _Graph, x: str, cfg: ConformerConfig) -> str:
    """Sinusoidal embeddings [2T'-1, D] of the distances T'-1 ... -(T'-1) of `x` [N, T', D]
    (`conformer.sinusoidal_embedding`, computed in float32 here)."""
    t = g.op("Gather", g.op("Shape", x), g.i64(1), axis=0)  # scalar T'
    d = g.op("Cast", g.op("Range", g.op("Sub", t, g.const(np.int64(1))), g.op("Neg", t), g.const(np.int64(-1))),
             to=TensorProto.FLOAT)
    if cfg.max_rel_pos > 0:
        d = g.op("Clip", d, g.f32(-cfg.max_rel_pos), g.f32(cfg.max_rel_pos))
    dim = cfg.model_dim
    inv_freq = (1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim))).astype(np.float32)
    angles = g.op("Mul", g.op("Unsqueeze", d, g.i64(1)), g.const(inv_freq[None, :], "inv_freq"))
    return g.op("Concat", g.op("Sin", angles), g.op("Cos", angles), axis=-1)


def _heads(g: _Graph, x: str, n: int, h: int) -> str:
    """[N, T, n*h] -> [N, n, T, h]."""
    return g.op("Transpose", g.op("Reshape", x, g.i64(0, 0, n, h)), perm=[0, 2, 1, 3])


def _rel_shift(g: _Graph, bd: str, t: str) -> str:
    """[N, n, T, 2T-1] -> [N, n, T, T] (`conformer.rel_shift`: pad, reshape, slice)."""
    x = g.op("Pad", bd, g.i64(0, 0, 0, 1, 0, 0, 0, 0))  # [N, n, T, 2T]
    x = g.op("Reshape", x, g.op("Concat", g.i64(0, 0, -1), t, axis=0))  # [N, n, 2T, T]
    x = g.op("Slice", x, g.i64(1), g.i64(2**62), g.i64(2))  # [N, n, 2T-1, T]
    x = g.op("Reshape", x, g.op("Concat", g.i64(0, 0), t, g.i64(-1), axis=0))  # [N, n, T, 2T-1]
    return g.op("Slice", x, g.i64(0), t, g.i64(3))


def _attention(g: _Graph, x: str, pos: str, w: _Weights, cfg: ConformerConfig, i: int) -> str:
    n, h = cfg.num_heads, cfg.head_dim
    y = _layer_norm(g, x, w, "blocks/attn/norm", i)
    q = _heads(g, _linear(g, y, w, "blocks/attn/q", i), n, h)
    k = _heads(g, _linear(g, y, w, "blocks/attn/k", i), n, h)
    v = _heads(g, _linear(g, y, w, "blocks/attn/v", i), n, h)
    p = g.op("Transpose", g.op("Reshape", _linear(g, pos, w, "blocks/attn/pos", i, rank=2), g.i64(0, n, h)), perm=[1, 2, 0])
    scale = g.f32(1.0 / math.sqrt(h))
    bias_u = g.const(w("blocks/attn/pos_bias_u", i).value[:, None, :], "pos_bias_u")  # [n, 1, h]
    bias_v = g.const(w("blocks/attn/pos_bias_v", i).value[:, None, :], "pos_bias_v")
    q_u = g.op("Mul", g.op("Add", q, bias_u), scale)
    q_v = g.op("Mul", g.op("Add", q, bias_v), scale)
    ac = g.op("MatMul", q_u, g.op("Transpose", k, perm=[0, 1, 3, 2]))  # [N, n, T, T]
    bd = g.op("MatMul", q_v, p)  # [N, n, T, 2T-1]
    t = g.op("Slice", g.op("Shape", x), g.i64(1), g.i64(2), g.i64(0))  # [T] (1-D)
    probs = g.op("Softmax", g.op("Add", ac, _rel_shift(g, bd, t)), axis=-1)
    ctx = g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3])  # [N, T, n, h]
    return _linear(g, g.op("Reshape", ctx, g.i64(0, 0, n * h)), w, "blocks/attn/out", i)


def _conv_module(g: _Graph, x: str, w: _Weights, cfg: ConformerConfig, i: int) -> str:
    d, k = cfg.model_dim, cfg.conv_kernel_size
    h = _linear(g, _layer_norm(g, x, w, "blocks/conv/norm", i), w, "blocks/conv/pw1", i)
    a, b = g.op("Split", h, g.i64(d, d), axis=-1, outputs=2)
    h = g.op("Mul", a, g.op("Sigmoid", b))  # GLU
    kernel, bias = w.conv(g, "blocks/conv/dw", (2, 1, 0), i)  # [K, 1, D] -> [D, 1, K]
    lo = (k - 1) // 2  # SAME, as lax pads it
    h = g.op("Conv", g.op("Transpose", h, perm=[0, 2, 1]), kernel, bias, group=d, pads=[lo, k - 1 - lo])
    h = _layer_norm(g, g.op("Transpose", h, perm=[0, 2, 1]), w, "blocks/conv/conv_norm", i, cfg.conv_norm)
    return _linear(g, _swish(g, h), w, "blocks/conv/pw2", i)


def _ffn(g: _Graph, x: str, w: _Weights, name: str, i: int) -> str:
    h = _linear(g, _layer_norm(g, x, w, f"blocks/{name}/norm", i), w, f"blocks/{name}/w_in", i)
    return _linear(g, _swish(g, h), w, f"blocks/{name}/w_out", i)


def _block(g: _Graph, x: str, pos: str, w: _Weights, cfg: ConformerConfig, i: int) -> str:
    """`conformer.ConformerBlock` of stacked layer `i` (equations in its docstring)."""
    half = g.f32(0.5)
    x = g.op("Add", x, g.op("Mul", _ffn(g, x, w, "ffn1", i), half))
    x = g.op("Add", x, _attention(g, x, pos, w, cfg, i))
    x = g.op("Add", x, _conv_module(g, x, w, cfg, i))
    x = g.op("Add", x, g.op("Mul", _ffn(g, x, w, "ffn2", i), half))
    return _layer_norm(g, x, w, "blocks/norm", i)


# =========================================================================== model


def _check_servable(data_cfg, fcfg: features_lib.FeatureConfig, source: pathlib.Path) -> None:
    if data_cfg.feature_norm != "utterance":
        raise OnnxExportError(
            f"{source}: data.feature_norm={data_cfg.feature_norm!r}: the ONNX model gets its waveform "
            "standardized by sherpa-onnx (zero mean, unit variance), which only per-utterance "
            "feature normalization ('utterance') cancels; train with it to deploy there"
        )
    if int(data_cfg.subsampling_factor) != SUBSAMPLING_FACTOR:
        raise OnnxExportError(f"{source}: data.subsampling_factor={data_cfg.subsampling_factor}, the model's is {SUBSAMPLING_FACTOR}")


def build_model(meta: dict, stored: dict, *, source: pathlib.Path, tokens_sha256: str = "") -> onnx.ModelProto:
    """The ONNX model of a verified packed export (`export_format.read_export` output).

    Input ``waveform`` float32 [N, S] (16 kHz mono, one utterance per row); output
    ``log_probs`` float32 [N, ceil(T / 4), V], T = 1 + (S - 400) // 160 frames.
    """
    cfg = ConformerConfig.from_config(meta["model_config"])
    settings = meta.get("data")
    if settings is None:
        data_cfg = pipeline.default_data_config()
        data_cfg.num_mel_bins = cfg.num_mel_bins
        fcfg = pipeline.feature_config(data_cfg)
    else:
        data_cfg, fcfg = pipeline.data_config_from_serving(settings)
    _check_servable(data_cfg, fcfg, source)
    w = _Weights(meta, stored)
    g = _Graph()
    x = _front_end(g, INPUT, fcfg, data_cfg.feature_norm)
    x = _subsample(g, x, w, cfg)
    pos = _rel_positions(g, x, cfg)
    for i in range(cfg.num_layers):
        x = _block(g, x, pos, w, cfg, i)
    x = _linear(g, _layer_norm(g, x, w, "final_norm", None), w, "ctc_head")
    g.nodes.append(helper.make_node("LogSoftmax", [x], [OUTPUT], axis=-1))
    vocab = int(meta["vocab_size"])
    graph = helper.make_graph(
        g.nodes, "usmqs_conformer_ctc",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", "num_samples"])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", "num_frames", vocab])],
        g.inits,
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(CONTRIB_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="usmqs")
    model.ir_version = IR_VERSION
    props = {
        "model_type": MODEL_TYPE, "vocab_size": str(vocab), "subsampling_factor": str(SUBSAMPLING_FACTOR),
        "sample_rate": str(fcfg.sample_rate), "step": str(meta.get("step")), "tokens_sha256": tokens_sha256,
        "feature_norm": data_cfg.feature_norm, "comment": NO_NM_KERNEL,
    }
    helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    return model


def tokens_text(tokenizer: Tokenizer) -> str:
    """tokens.txt for sherpa-onnx: ``piece id`` per line; id 0 is ``<blank>``."""
    lines = []
    for i in range(tokenizer.vocab_size):
        piece = BLANK_SYMBOL if i == tokenizer.blank_id else tokenizer.id_to_piece(i)
        if not piece or any(c.isspace() for c in piece):
            raise OnnxExportError(f"token {i} ({piece!r}) cannot be written to {TOKENS_FILE}")
        lines.append(f"{piece} {i}\n")
    return "".join(lines)


# ========================================================================= writing


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def size_report(model: onnx.ModelProto, model_bytes: int, packed_report: dict) -> dict:
    """Byte accounting of model.onnx (its size.json): initializer payload by kind --
    ``int8_codes``, ``int4_codes`` (two per byte), ``scales``, ``zero_points`` (the inputs
    of DequantizeLinear and MatMulNBits), ``float`` (every other initializer) -- and ``graph`` (the
    protobuf around them: nodes, names, shapes). ``fp32_bytes`` = 4 x the model's
    parameters (the packed export's count); ``size_ratio = file_bytes / fp32_bytes``."""
    inits = {t.name: t for t in model.graph.initializer}
    role = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            names, four = node.input, inits[node.input[0]].data_type == TensorProto.INT4
        elif node.op_type == "MatMulNBits":
            names, four = node.input[1:], helper.get_node_attr_value(node, "bits") == 4
        else:
            continue
        for name, kind in zip(names, ("int4_codes" if four else "int8_codes", "scales", "zero_points")):
            role[name] = kind
    parts = dict.fromkeys(("int8_codes", "int4_codes", "scales", "zero_points", "float"), 0)
    for name, t in inits.items():
        n = len(t.raw_data) if t.HasField("raw_data") else numpy_helper.to_array(t).nbytes
        parts[role.get(name, "float")] += n
    parts["graph"] = model_bytes - sum(parts.values())
    fp32 = int(packed_report["fp32_bytes"])
    return {
        "file": MODEL_FILE, "file_bytes": model_bytes, "bytes": parts, "fp32_bytes": fp32,
        "size_ratio": model_bytes / fp32, "packed_export_model_bytes": int(packed_report["model_bytes"]),
        "opset": OPSET, "n_m_sparsity": NO_NM_KERNEL,
        "note": "int2 codes are stored as INT4 (ONNX Runtime has no 2-bit type)",
    }


def write_onnx(export_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tokens: str | None = None) -> dict:
    """model.onnx, tokens.txt and size.json of the packed export in `export_dir`, into
    `out_dir`; returns the size report. `tokens` (tokens.txt text) defaults to the
    export's tokenizer. The model records the sha256 of tokens.txt (`load_onnx` checks it)."""
    export_dir, out_dir = pathlib.Path(export_dir), pathlib.Path(out_dir)
    meta, stored = export_format.read_export(export_dir)
    if tokens is None:
        tokens = tokens_text(Tokenizer.load(export_dir / meta["tokenizer"]))
    tokens_bytes = tokens.encode()
    _check_tokens(tokens, int(meta["vocab_size"]), out_dir / TOKENS_FILE)
    model = build_model(meta, stored, source=export_dir, tokens_sha256=_sha256(tokens_bytes))
    data = model.SerializeToString()
    packed_report = export_format.size_report(export_dir)
    report = size_report(model, len(data), packed_report)
    report.update(model_sha256=_sha256(data), tokens_sha256=_sha256(tokens_bytes))
    with storage.writing(out_dir, "the ONNX export"):
        out_dir.mkdir(parents=True, exist_ok=True)
        storage.write_bytes_atomic(out_dir / MODEL_FILE, data, "the ONNX model")
        storage.write_bytes_atomic(out_dir / TOKENS_FILE, tokens_bytes, "the ONNX tokens file")
        storage.write_text_atomic(out_dir / SIZE_FILE, json.dumps(report, indent=2) + "\n", "the ONNX size report")
    return report


# ========================================================================= reading


def _check_tokens(text: str, vocab: int, path: pathlib.Path) -> list[str]:
    """The symbols of a tokens.txt text; OnnxExportError unless it is ``symbol id`` lines
    with ids 0..vocab-1 in order and ``<blank>`` at 0."""
    symbols = []
    for n, line in enumerate(text.splitlines()):
        parts = line.split()
        if len(parts) != 2 or parts[1] != str(n):
            raise OnnxExportError(f"{path}: line {n + 1} is {line!r}, expected '<symbol> {n}'")
        symbols.append(parts[0])
    if len(symbols) != vocab:
        raise OnnxExportError(f"{path}: {len(symbols)} tokens, the model has {vocab} classes")
    if symbols and symbols[0] != BLANK_SYMBOL:
        raise OnnxExportError(f"{path}: id 0 is {symbols[0]!r}, sherpa-onnx needs {BLANK_SYMBOL!r} (the CTC blank)")
    return symbols


@dataclasses.dataclass
class OnnxExport:
    """A verified ONNX export: the model's path, its metadata and the tokens."""

    model_path: pathlib.Path
    tokens_path: pathlib.Path
    props: dict[str, str]
    symbols: list[str]

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def text(self, ids) -> str:
        """Token ids -> text as sherpa-onnx writes it (word boundaries as spaces)."""
        return "".join(self.symbols[i] for i in ids).replace("\u2581", " ").strip()


def load_onnx(onnx_dir: str | os.PathLike) -> OnnxExport:
    """Verify ``onnx_dir`` (model.onnx + tokens.txt): the model parses, passes the ONNX
    checker and is a usmqs model; tokens.txt is well formed, has the model's vocabulary
    size and is the file the model was written with (sha256). Each failure is an
    OnnxExportError naming the file."""
    onnx_dir = pathlib.Path(onnx_dir)
    model_path, tokens_path = onnx_dir / MODEL_FILE, onnx_dir / TOKENS_FILE
    for f in (model_path, tokens_path):
        if not f.is_file():
            raise OnnxExportError(f"{onnx_dir}: no {f.name} (run `usmqs export --format onnx`)")
    try:
        model = onnx.load(str(model_path))
        onnx.checker.check_model(model)
    except Exception as e:  # protobuf DecodeError, checker ValidationError, ...
        raise OnnxExportError(f"{model_path}: not a valid ONNX model (truncated or modified?): {type(e).__name__}: {e}") from e
    size_file = onnx_dir / SIZE_FILE
    recorded = json.loads(size_file.read_text()).get("model_sha256") if size_file.is_file() else None
    if recorded and _sha256(model_path.read_bytes()) != recorded:
        raise OnnxExportError(f"{model_path}: sha256 differs from the one {SIZE_FILE} records (modified after export)")
    props = {p.key: p.value for p in model.metadata_props}
    if props.get("model_type") != MODEL_TYPE:
        raise OnnxExportError(f"{model_path}: model_type {props.get('model_type')!r}, not a {MODEL_TYPE} model")
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    vocab = int(props["vocab_size"])
    if out_dims[-1].dim_value != vocab:
        raise OnnxExportError(f"{model_path}: output has {out_dims[-1].dim_value} classes, metadata says {vocab}")
    data = tokens_path.read_bytes()
    try:
        symbols = _check_tokens(data.decode(), vocab, tokens_path)
    except UnicodeDecodeError as e:
        raise OnnxExportError(f"{tokens_path}: not UTF-8 text: {e}") from e
    if props.get("tokens_sha256") and _sha256(data) != props["tokens_sha256"]:
        raise OnnxExportError(f"{tokens_path}: not the tokens file {MODEL_FILE} was exported with (sha256 differs)")
    return OnnxExport(model_path, tokens_path, props, symbols)


def sherpa_recognizer(onnx_dir: str | os.PathLike, **options):
    """sherpa-onnx's recognizer for `onnx_dir` (model.onnx + tokens.txt) through its public
    raw-waveform CTC constructor, at its defaults except `options` (e.g. ``num_threads``).
    Needs the ``deploy`` extra."""
    import sherpa_onnx  # optional dependency

    onnx_dir = pathlib.Path(onnx_dir)
    return sherpa_onnx.OfflineRecognizer.from_omnilingual_asr_ctc(
        model=str(onnx_dir / MODEL_FILE), tokens=str(onnx_dir / TOKENS_FILE), **options
    )


def sherpa_text(recognizer, wave: np.ndarray, sample_rate: int = 16000) -> str:
    """The transcript of one utterance (float32 samples) decoded by `recognizer` as one stream."""
    stream = recognizer.create_stream()
    stream.accept_waveform(sample_rate, wave)
    recognizer.decode_stream(stream)
    return stream.result.text.strip()
