"""Conformer encoder + CTC head (Gulati et al., 2020), in Flax NNX, layer-stacked with scan.

    features [B, T, F], feature_mask [B, T]
      -> ConvSubsampling (4x in time)                  x [B, T', D], mask [B, T']
      -> num_layers x ConformerBlock (one lax.scan)    x [B, T', D]
      -> LayerNorm -> CTC head (Dense D -> V)          logits [B, T', V] (float32, blank = 0)

Shape letters: B batch, T input frames, F mel bins, T' = subsampled_length(T), D model_dim,
N heads, H head dim (D / N), R = 2T' - 1 relative distances, K conv kernel, V vocabulary.

Every weight matrix / kernel lives in a `usmqs.compress.layers.Dense` or `Conv`, created
with a module path that the compression policy matches (`WEIGHT_PATHS`). Stacked layers
share one path per weight (e.g. ``blocks/ffn1/w_in`` covers all layers).

Padding. A frame t' of the output is valid iff t' < subsampled_length(sum(feature_mask))
= ceil(T / 4): the feature mask must be a prefix mask (valid frames first). Every input
frame reaches an output frame (a 0.15 s word, 13 frames, keeps 4: enough for CTC to emit
4 labels). Outputs on valid frames do not depend on what the padded frames contain nor on
how much padding there is, because
  * each stride-2 convolution of the subsampler pads its input with one zero frame on
    each side, and its input is zeroed past each row's own valid length first: the last
    valid outputs, which read one frame past that length, see the zero an unpadded
    sequence's convolution padding gives, whatever the batch padding holds;
  * attention masks padded keys (and zeroes their probabilities);
  * the depthwise convolution sees zeros on padded frames, exactly what it sees past the
    end of an unpadded sequence (SAME zero padding);
  * everything else (norms, FFNs, projections) acts per frame.
(With a dropout key the masks are drawn for the padded shape, so only the rng=None forward
is padding-invariant bit for bit; each draw is still a valid dropout sample.)

Randomness. The module holds no RNG state: `rng=None` is the deterministic (eval) forward;
with a key, dropout keys are derived by `fold_in` (layer index, then dropout site), so a
train step is a pure function of (params, batch, rng).

Sharding. Parameters carry logical axis names (`LOGICAL_AXIS_NAMES`) as `out_sharding`
metadata (never applied eagerly); stacked block parameters lead with 'layers'.
`nnx.get_partition_spec(state)` returns them as PartitionSpecs of logical names, which
`usmqs.sharding.tree_shardings` maps to the mesh. Activations are annotated with
`with_logical_constraint` (names in `ACTIVATION_AXIS_NAMES`), a no-op unless a mesh and
logical rules are active while the step is traced::

    with jax.set_mesh(mesh), nnx.logical_axis_rules(config.mesh.rules):
        state, metrics = train_step(state, batch)   # traced here: activations constrained
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd

from usmqs import sharding as sharding_lib
from usmqs.compress.layers import Conv, Dense, precompute_effective_kernels
from usmqs.compress.policy import Policy

# Every logical axis name a parameter of this model may carry (a name without a rule in
# `usmqs.sharding` is replicated).
LOGICAL_AXIS_NAMES = (
    "layers",       # the scanned layer axis of stacked block parameters
    "embed",        # model dimension D
    "mlp",          # FFN hidden dim and the conv module's inner channels
    "heads",        # attention heads N (also the head-major flattened N*H input of attn/out)
    "kv",           # per-head dim H
    "vocab",        # CTC output classes V
    "conv_window",  # time window of a convolution kernel
    "conv_freq",    # frequency window of a subsampling kernel
    "conv_in",      # input channels of subsampling conv2 / flattened features into proj
    "conv_out",     # output channels of the subsampling convolutions
)

# Logical names used for activations (batch and time axes are never parameter axes).
ACTIVATION_AXIS_NAMES = ("batch", "time", "embed", "mlp", "heads", "kv", "vocab")

# Module path of every compressible weight (the strings policy rules match).
WEIGHT_PATHS = (
    "subsample/conv1",
    "subsample/conv2",
    "subsample/proj",
    "blocks/ffn1/w_in",
    "blocks/ffn1/w_out",
    "blocks/attn/q",
    "blocks/attn/k",
    "blocks/attn/v",
    "blocks/attn/pos",
    "blocks/attn/out",
    "blocks/conv/pw1",
    "blocks/conv/dw",
    "blocks/conv/pw2",
    "blocks/ffn2/w_in",
    "blocks/ffn2/w_out",
    "ctc/head",
)

NORM_KINDS = ("layer_norm", "rms_norm")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConformerConfig:
    """Model hyper-parameters (the fields of a preset's ConfigDict)."""

    num_layers: int  # Conformer blocks
    model_dim: int  # D
    num_heads: int  # N; head dim H = D / N
    ffn_dim: int  # hidden width of each macaron FFN
    conv_kernel_size: int  # K of the depthwise convolution
    subsample_channels: int  # channels of both subsampling Conv2D layers
    num_mel_bins: int  # F, input feature width
    dropout: float = 0.1  # residual/FFN/conv/subsampling dropout
    attention_dropout: float = 0.1  # on attention probabilities
    max_rel_pos: int = 0  # clip relative distances to +-max_rel_pos; 0 = no clipping
    dtype: str = "float32"  # compute dtype ('float32' | 'bfloat16'); params stay float32
    remat: bool = False  # rematerialize each block in the backward pass
    conv_norm: str = "layer_norm"  # norm inside the conv module ('layer_norm' | 'rms_norm')

    def __post_init__(self):
        if self.model_dim % self.num_heads:
            raise ValueError(
                f"model_dim={self.model_dim} not divisible by num_heads={self.num_heads}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; expected one of {tuple(DTYPES)}")
        if self.conv_norm not in NORM_KINDS:
            # Batch norm is deliberately not offered: its statistics would mix utterances
            # and padding, breaking batch independence and padding invariance.
            raise ValueError(f"conv_norm={self.conv_norm!r}; expected one of {NORM_KINDS}")
        if self.num_layers < 1 or self.conv_kernel_size < 1 or self.max_rel_pos < 0:
            raise ValueError(f"invalid config {self}")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.attention_dropout < 1.0):
            raise ValueError("dropout rates must be in [0, 1)")

    @classmethod
    def from_config(cls, cfg: Any) -> ConformerConfig:
        """From a ConformerConfig, a ConfigDict or a mapping; unknown keys are an error."""
        if isinstance(cfg, ConformerConfig):
            return cfg
        items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}")
        return cls(**items)

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


# Time reduction of the encoder's front end (two stride-2 convolutions).
SUBSAMPLING_FACTOR = 4
# Zero frames (and mel bins) each subsampling convolution pads on either side: a 3-wide
# stride-2 window then maps n frames to ceil(n / 2), centred on the even input frames.
SUBSAMPLING_PADDING = (1, 1)
# Why weights can have a narrower subsample/proj kernel than this model: the subsampler's
# VALID convolutions before kept ((F - 1) // 2 - 1) // 2 mel groups, not ceil(F / 4).
EARLIER_FRONT_END = (
    "a run trained before the subsampler padded its convolutions (to keep ceil(T/4) frames) "
    "cannot be loaded: train it again"
)


def conv_output_length(length):
    """Frames after one 3-wide stride-2 subsampling convolution: ceil(n / 2).

    With SUBSAMPLING_PADDING: (n + 1 + 1 - 3) // 2 + 1 = (n + 1) // 2.
    """
    return (length + 1) // 2


def subsampled_length(length):
    """Frames after the 4x subsampler: ceil(T / 4) (two convs of `conv_output_length`).

    Also the mel bins after it (the frequency axis is padded alike). Works on Python ints,
    numpy arrays and jax arrays (tracers included, which the numpy twin
    `usmqs.data.pipeline.subsampled_length` does not take); the two agree on every length
    (tested).
    """
    out = conv_output_length(conv_output_length(length))
    return int(out) if isinstance(out, (int, np.integer)) else out


def with_logical_constraint(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on `x` by logical axis names, e.g. ('batch', 'time', 'embed').

    A no-op unless both a mesh and logical rules are active, i.e. inside

        with jax.set_mesh(mesh), nnx.logical_axis_rules(config.mesh.rules):
            ...trace the model...

    (`nnx.logical_axis_rules` is `flax.core.spmd.logical_axis_rules`; under a trace the
    mesh is `jax.sharding.get_abstract_mesh()`, eagerly the concrete one of set_mesh).
    Names resolve exactly as parameters do in `usmqs.sharding.logical_to_pspec`: a name
    without a rule is replicated, a mesh axis is used at most once per array (first name
    wins), and a dimension its mesh axes do not divide stays replicated. Explicit-axis
    meshes get `reshard`, others a `with_sharding_constraint`.
    """
    if len(names) != x.ndim:
        raise ValueError(f"{len(names)} logical names {names} for an array of rank {x.ndim}")
    rules = core_spmd.get_logical_axis_rules()
    if not rules:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if not isinstance(x, jax.core.Tracer):
        # Eager call: a concrete array needs the concrete mesh of `jax.set_mesh`.
        mesh = jax.sharding.get_mesh()
    if mesh.empty:
        return x
    sharding = jax.sharding.NamedSharding(
        mesh, sharding_lib.logical_to_pspec(tuple(names), x.shape, mesh, rules)
    )
    if mesh.are_all_axes_explicit:
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def rel_shift(x: jax.Array) -> jax.Array:
    """Transformer-XL relative shift: [..., T, 2T-1] -> [..., T, T].

    Column r of the input holds relative distance T-1-r (from +(T-1) down to -(T-1));
    the output holds, at (i, j), the entry for distance i - j:

        out[..., i, j] = x[..., i, T - 1 - i + j]

    Done with pad + reshape (no gather), as in Transformer-XL and ESPnet: after prepending
    a zero column, reading the flat buffer with row stride 2T-1 instead of 2T shifts row i
    left by i.
    """
    *lead, t, r = x.shape
    if r != 2 * t - 1:
        raise ValueError(f"rel_shift expects [..., T, 2T-1], got {x.shape}")
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])  # [..., T, 2T]
    x = x.reshape(*lead, 2 * t, t)[..., 1:, :]  # drop T leading entries of the buffer
    return x.reshape(*lead, t, 2 * t - 1)[..., :t]


def relative_positions(t: int, max_rel_pos: int = 0) -> np.ndarray:
    """The 2t-1 relative distances T-1, ..., 0, ..., -(T-1) (rel_shift's column order)."""
    d = np.arange(t - 1, -t, -1)
    return np.clip(d, -max_rel_pos, max_rel_pos) if max_rel_pos > 0 else d


def sinusoidal_embedding(positions: np.ndarray, dim: int) -> np.ndarray:
    """[R] positions -> [R, dim] = [sin(p w_k), cos(p w_k)], w_k = 10000^(-2k/dim).

    Computed in numpy float64 at trace time (positions are static), so the embedding of a
    distance is bit-identical whatever T is: padding cannot change it.
    """
    if dim % 2:
        raise ValueError(f"model_dim must be even for sinusoidal embeddings, got {dim}")
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _fold(key: jax.Array | None, data: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, data)


# Kernels [D, a, b] (q/k/v/pos [D, N, H], pw1 [D, 2, D]) have fan-in D: the default
# lecun_normal would take the second-to-last axis as the input one.
_SPLIT_OUT_INIT = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))


def _fan_in_uniform(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def _param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


# ----------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------


class Norm(nnx.Module):
    """LayerNorm (default) or RMSNorm over the last axis, computed in float32.

    x [..., C] -> y [..., C] in x's dtype; scale (and bias for layer_norm) [C].
    """

    def __init__(self, dim: int, *, axis_name: str, kind: str = "layer_norm", eps: float = 1e-6):
        if kind not in NORM_KINDS:
            raise ValueError(f"unknown norm {kind!r}")
        self.kind, self.eps = kind, eps
        self.scale = _param(jnp.ones((dim,), jnp.float32), (axis_name,))
        self.bias = (
            _param(jnp.zeros((dim,), jnp.float32), (axis_name,)) if kind == "layer_norm" else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x.astype(jnp.float32)
        if self.kind == "layer_norm":
            y = y - jnp.mean(y, axis=-1, keepdims=True)
        y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.eps)
        y = y * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)


class ConvSubsampling(nnx.Module):
    """4x time reduction: two Conv2D 3x3 stride 2 + ReLU, then Dense to D.

    x [B, T, F] -> [B, T, F, 1] -conv1-> [B, T1, F1, C] -conv2-> [B, T', F', C]
      -> reshape [B, T', F'*C] -proj-> [B, T', D] -> dropout,
    with T1 = ceil(T/2), T' = ceil(T1/2) = ceil(T/4) (likewise for F): each conv pads one
    zero frame and bin on either side (`SUBSAMPLING_PADDING`). C = subsample_channels.
    Each conv's input is zeroed past each row's valid length (ceil of the row's frames
    halved per conv), so that its padded windows read zeros, not what the batch padding
    holds (or what conv1's bias makes of it).
    """

    def __init__(self, cfg: ConformerConfig, *, policy: Policy | None, rngs: nnx.Rngs):
        c, dt = cfg.subsample_channels, cfg.compute_dtype
        f_out = subsampled_length(cfg.num_mel_bins)
        if f_out < 1:
            raise ValueError(f"num_mel_bins={cfg.num_mel_bins} too small for 4x subsampling")
        pad = (SUBSAMPLING_PADDING, SUBSAMPLING_PADDING)  # (time, frequency)
        # Non-zero biases (PyTorch's conv default, U(+-1/sqrt(fan_in))): with zero biases a
        # window of constant zeros (a SpecAugment mask) reaches the first LayerNorm as an
        # all-zero vector, whose gradient is ~1/sqrt(eps) and swamps the whole update.
        self.conv1 = Conv(
            1, c, (3, 3), strides=(2, 2), padding=pad, path="subsample/conv1", policy=policy,
            kernel_axes=("conv_window", "conv_freq", None, "conv_out"), dtype=dt,
            bias_init=_fan_in_uniform(9), rngs=rngs,
        )
        self.conv2 = Conv(
            c, c, (3, 3), strides=(2, 2), padding=pad, path="subsample/conv2", policy=policy,
            kernel_axes=("conv_window", "conv_freq", "conv_in", "conv_out"), dtype=dt,
            bias_init=_fan_in_uniform(9 * c), rngs=rngs,
        )
        self.proj = Dense(
            f_out * c, cfg.model_dim, path="subsample/proj", policy=policy,
            kernel_axes=("conv_in", "embed"), dtype=dt, rngs=rngs,
        )
        self.dropout = cfg.dropout

    def __call__(self, x: jax.Array, lengths: jax.Array, key: jax.Array | None) -> jax.Array:
        """x [B, T, F], lengths [B] valid frames per row -> [B, T', D]."""
        h = x[..., None]
        for conv in (self.conv1, self.conv2):
            valid = jnp.arange(h.shape[1], dtype=lengths.dtype)[None, :] < lengths[:, None]
            h = jnp.where(valid[:, :, None, None], h, jnp.zeros((), h.dtype))
            h = jax.nn.relu(conv(h))
            lengths = conv_output_length(lengths)
        b, t, f, c = h.shape
        h = self.proj(h.reshape(b, t, f * c))
        return _dropout(h, self.dropout, key)


class FeedForward(nnx.Module):
    """Macaron FFN: LN -> Dense(D->ffn) -> swish -> dropout -> Dense(ffn->D) -> dropout.

    x [B, T, D] -> [B, T, D] (the caller adds the 1/2-weighted residual).
    """

    def __init__(self, cfg: ConformerConfig, name: str, *, policy: Policy | None, rngs: nnx.Rngs):
        dt = cfg.compute_dtype
        self.norm = Norm(cfg.model_dim, axis_name="embed")
        self.w_in = Dense(
            cfg.model_dim, cfg.ffn_dim, path=f"blocks/{name}/w_in", policy=policy,
            kernel_axes=("embed", "mlp"), dtype=dt, rngs=rngs,
        )
        self.w_out = Dense(
            cfg.ffn_dim, cfg.model_dim, path=f"blocks/{name}/w_out", policy=policy,
            kernel_axes=("mlp", "embed"), dtype=dt, rngs=rngs,
        )
        self.dropout = cfg.dropout

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        h = jax.nn.silu(self.w_in(self.norm(x)))
        h = with_logical_constraint(h, ("batch", "time", "mlp"))
        h = _dropout(h, self.dropout, _fold(key, 0))
        return _dropout(self.w_out(h), self.dropout, _fold(key, 1))


class RelPosSelfAttention(nnx.Module):
    """LN -> multi-head self-attention with Transformer-XL relative positions -> dropout.

    Shapes: x [B, T, D] -> q, k, v [B, T, N, H]; p = pos(E) [R, N, H] where E [R, D] is the
    sinusoidal embedding of the distances T-1 ... -(T-1). With learned biases u, v [N, H]:

        ac[b, n, i, j] = (q_i + u) . k_j                       content terms (a) + (c)
        bd[b, n, i, :] = (q_i + v) . p        [.., T, R]        position terms (b) + (d)
        scores = (ac + rel_shift(bd)) / sqrt(H)                bd[i, j] -> distance i - j
        probs  = softmax over keys j with padded keys masked (then zeroed)
        y      = out(concat_n(probs @ v)) -> dropout             [B, T, D]

    (Dai et al. 2019, as the "rel_pos" attention of Conformer/ESPnet.) The output kernel is
    [N*H, D] over the head-major flattened heads, so its first logical axis is 'heads'.
    """

    def __init__(self, cfg: ConformerConfig, *, policy: Policy | None, rngs: nnx.Rngs):
        d, n, h, dt = cfg.model_dim, cfg.num_heads, cfg.head_dim, cfg.compute_dtype
        self.num_heads, self.head_dim = n, h
        self.norm = Norm(d, axis_name="embed")
        qkv_axes = ("embed", "heads", "kv")
        proj = dict(
            policy=policy, kernel_axes=qkv_axes, kernel_init=_SPLIT_OUT_INIT, dtype=dt, rngs=rngs
        )
        self.q = Dense(d, (n, h), path="blocks/attn/q", **proj)
        self.k = Dense(d, (n, h), path="blocks/attn/k", **proj)
        self.v = Dense(d, (n, h), path="blocks/attn/v", **proj)
        self.pos = Dense(d, (n, h), path="blocks/attn/pos", use_bias=False, **proj)
        self.out = Dense(
            n * h, d, path="blocks/attn/out", policy=policy, kernel_axes=("heads", "embed"),
            dtype=dt, rngs=rngs,
        )
        self.pos_bias_u = _param(jnp.zeros((n, h), jnp.float32), ("heads", "kv"))
        self.pos_bias_v = _param(jnp.zeros((n, h), jnp.float32), ("heads", "kv"))
        self.dropout, self.attention_dropout = cfg.dropout, cfg.attention_dropout

    def __call__(
        self, x: jax.Array, mask: jax.Array, pos_emb: jax.Array, key: jax.Array | None
    ) -> jax.Array:
        """x [B, T, D], mask [B, T] bool, pos_emb [2T-1, D] -> [B, T, D]."""
        y = self.norm(x)
        names = ("batch", "time", "heads", "kv")
        q = with_logical_constraint(self.q(y), names)
        k = with_logical_constraint(self.k(y), names)
        v = with_logical_constraint(self.v(y), names)
        p = self.pos(pos_emb.astype(y.dtype))  # [R, N, H]
        scale = 1.0 / math.sqrt(self.head_dim)
        q_u = (q + self.pos_bias_u[...].astype(q.dtype)) * jnp.asarray(scale, q.dtype)
        q_v = (q + self.pos_bias_v[...].astype(q.dtype)) * jnp.asarray(scale, q.dtype)
        # Scores in float32 whatever the compute dtype: softmax is the precision-critical part.
        ac = jnp.einsum("btnh,bsnh->bnts", q_u, k, preferred_element_type=jnp.float32)
        bd = jnp.einsum("btnh,rnh->bntr", q_v, p, preferred_element_type=jnp.float32)
        scores = ac + rel_shift(bd)  # [B, N, T, T]
        key_mask = mask[:, None, None, :]
        # A finite fill keeps all-padding rows NaN-free; their outputs are never used.
        scores = jnp.where(key_mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = jnp.where(key_mask, probs, 0.0)
        probs = _dropout(probs, self.attention_dropout, _fold(key, 0))
        ctx = jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)
        b, t, n, h = ctx.shape
        out = self.out(ctx.reshape(b, t, n * h))
        return _dropout(out, self.dropout, _fold(key, 1))


class ConvModule(nnx.Module):
    """LN -> pw1 (D -> 2 x D) -> GLU -> zero padding -> depthwise Conv1D (K) -> norm ->
    swish -> pw2 (D -> D) -> dropout.

    x [B, T, D] -> pw1 [B, T, 2, D] -> GLU [B, T, D] -> dw (SAME, groups=D) [B, T, D]
    -> [B, T, D]. pw1's output keeps the two GLU halves on their own axis so the channel
    axis can be sharded ('mlp') without splitting a sharded dimension in two.
    """

    def __init__(self, cfg: ConformerConfig, *, policy: Policy | None, rngs: nnx.Rngs):
        d, dt = cfg.model_dim, cfg.compute_dtype
        self.norm = Norm(d, axis_name="embed")
        self.pw1 = Dense(
            d, (2, d), path="blocks/conv/pw1", policy=policy, kernel_axes=("embed", None, "mlp"),
            kernel_init=_SPLIT_OUT_INIT, dtype=dt, rngs=rngs,
        )
        self.dw = Conv(
            d, d, (cfg.conv_kernel_size,), padding="SAME", feature_group_count=d,
            path="blocks/conv/dw", policy=policy, kernel_axes=("conv_window", None, "mlp"),
            dtype=dt, rngs=rngs,
        )
        self.conv_norm = Norm(d, axis_name="mlp", kind=cfg.conv_norm)
        self.pw2 = Dense(
            d, d, path="blocks/conv/pw2", policy=policy, kernel_axes=("mlp", "embed"), dtype=dt,
            rngs=rngs,
        )
        self.dropout = cfg.dropout

    def __call__(self, x: jax.Array, mask: jax.Array, key: jax.Array | None) -> jax.Array:
        """x [B, T, D], mask [B, T] -> [B, T, D]."""
        h = self.pw1(self.norm(x))
        h = h[..., 0, :] * jax.nn.sigmoid(h[..., 1, :])  # GLU
        h = with_logical_constraint(h, ("batch", "time", "mlp"))
        # Padded frames must look exactly like the zeros past the sequence end.
        h = jnp.where(mask[..., None], h, jnp.zeros((), h.dtype))
        h = jax.nn.silu(self.conv_norm(self.dw(h)))
        return _dropout(self.pw2(h), self.dropout, key)


class ConformerBlock(nnx.Module):
    """One Conformer block (Gulati et al. 2020, eq. 1), x [B, T, D] -> y [B, T, D]:

        x = x + 1/2 * FFN1(x)
        x = x + MHSA_relpos(x)
        x = x + Conv(x)
        x = x + 1/2 * FFN2(x)
        y = LayerNorm(x)
    """

    def __init__(self, cfg: ConformerConfig, *, policy: Policy | None, rngs: nnx.Rngs):
        self.ffn1 = FeedForward(cfg, "ffn1", policy=policy, rngs=rngs)
        self.attn = RelPosSelfAttention(cfg, policy=policy, rngs=rngs)
        self.conv = ConvModule(cfg, policy=policy, rngs=rngs)
        self.ffn2 = FeedForward(cfg, "ffn2", policy=policy, rngs=rngs)
        self.norm = Norm(cfg.model_dim, axis_name="embed")

    def __call__(
        self, x: jax.Array, mask: jax.Array, pos_emb: jax.Array, key: jax.Array | None
    ) -> jax.Array:
        x = x + 0.5 * self.ffn1(x, _fold(key, 0))
        x = x + self.attn(x, mask, pos_emb, _fold(key, 1))
        x = x + self.conv(x, mask, _fold(key, 2))
        x = x + 0.5 * self.ffn2(x, _fold(key, 3))
        return with_logical_constraint(self.norm(x), ("batch", "time", "embed"))


class ConformerCTC(nnx.Module):
    """Conformer encoder with a CTC head.

    `model(features, feature_mask, rng=None) -> (logits, out_mask)`:
      features [B, T, F] float, feature_mask [B, T] bool (prefix mask of valid frames)
      logits [B, T', V] float32 (class 0 is the CTC blank), out_mask [B, T'] bool,
      T' = subsampled_length(T) = ceil(T / 4). Padded output frames hold finite,
      meaningless values. With ``return_hidden=True`` also every block's output,
      hidden [num_layers, B, T', D] (the scan's per-layer outputs; hidden distillation).

    The `num_layers` blocks are created once with `nnx.vmap` (every variable stacked on a
    leading 'layers' axis) and applied with one `jax.lax.scan` over their split state, so
    compile time does not grow with depth; with `cfg.remat` each block is a
    `jax.checkpoint` and its activations are recomputed in the backward pass.
    """

    def __init__(self, cfg: Any, vocab_size: int, *, policy: Policy | None = None, rngs: nnx.Rngs):
        cfg = ConformerConfig.from_config(cfg)
        self.cfg = cfg  # frozen dataclass: static, hashable graph data
        self.vocab_size = vocab_size
        self.subsample = ConvSubsampling(cfg, policy=policy, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> ConformerBlock:
            return ConformerBlock(cfg, policy=policy, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = Norm(cfg.model_dim, axis_name="embed")
        self.ctc_head = Dense(
            cfg.model_dim, vocab_size, path="ctc/head", policy=policy,
            kernel_axes=("embed", "vocab"), dtype=cfg.compute_dtype, rngs=rngs,
        )

    def __call__(
        self, features: jax.Array, feature_mask: jax.Array, *, rng: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
        feature_mask = feature_mask.astype(jnp.bool_)
        x = features.astype(cfg.compute_dtype)
        # Zero padded input so nothing non-finite from the pipeline can reach the output.
        x = jnp.where(feature_mask[..., None], x, jnp.zeros((), x.dtype))
        x = with_logical_constraint(x, ("batch", "time", None))

        # Independent streams for the front end and the block stack.
        front_key, blocks_key = _fold(rng, 0), _fold(rng, 1)
        lengths = jnp.sum(feature_mask, axis=-1, dtype=jnp.int32)
        x = self.subsample(x, lengths, front_key)
        t_out = x.shape[1]
        lengths = subsampled_length(lengths)  # ceil(T / 4): T' of every row
        mask = jnp.arange(t_out, dtype=jnp.int32)[None, :] < lengths[:, None]  # [B, T']
        x = jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))
        x = with_logical_constraint(x, ("batch", "time", "embed"))

        pos_emb = jnp.asarray(
            sinusoidal_embedding(relative_positions(t_out, cfg.max_rel_pos), cfg.model_dim)
        )

        # Functional scan over the stacked block state (split -> lax.scan -> merge) rather
        # than nnx.scan: a train step merges params (grad tracers) with masks (jit tracers),
        # and nnx.scan refuses graph nodes whose Variables live at different trace levels.
        # Every block's effective kernels in one pass over the stack, before the scan
        # (on a copy: the live model keeps its master kernels).
        blocks = nnx.clone(self.blocks)
        precompute_effective_kernels(blocks, layer_axes=1)
        graphdef, stacked = nnx.split(blocks)

        def body(x, xs):
            layer_state, index = xs
            # The slice is one layer: drop 'layers' from its sharding metadata too.
            layer_state = nnx.spmd.remove_axis(layer_state, 0, {nnx.PARTITION_NAME: "layers"})
            block = nnx.merge(graphdef, layer_state)
            key = None if blocks_key is None else jax.random.fold_in(blocks_key, index)
            y = block(x, mask, pos_emb, key)
            return y, (y if return_hidden else None)

        if cfg.remat:
            # Keep only the carry between layers; recompute each block in the backward pass.
            body = jax.checkpoint(body, prevent_cse=False)
        x, hidden = jax.lax.scan(body, x, (stacked, jnp.arange(cfg.num_layers, dtype=jnp.int32)))

        x = self.final_norm(x)
        logits = self.ctc_head(x).astype(jnp.float32)
        logits = with_logical_constraint(logits, ("batch", "time", "vocab"))
        if return_hidden:
            return logits, mask, with_logical_constraint(hidden, (None, "batch", "time", "embed"))
        return logits, mask
