"""The compressed export: packed integer weights, N:M indices and scales, and serving from it.

`export_workdir(config, workdir)` turns a run's latest checkpoint into ``WORKDIR/export/``;
`load_export(dir)` verifies and loads it; `evaluate_export(config, workdir)` decodes the
eval manifest from the export alone, token-identical to the fake-quant evaluation.

Directory (``FORMAT_VERSION`` 1)::

    export/
      metadata.json    format + version, train step, model config, vocab size, policy
                       (rules as data), index encoding, one record per tensor (below, with
                       the sha256 of every stored array) and the size + sha256 of every
                       file under arrays/ and of the tokenizer; written after them
      arrays/          Orbax PyTree checkpoint of numpy arrays (zarr3 + OCDBT) written
                       with compression OFF, so the bytes on disk are the bytes accounted
      tokenizer.model  the run's sentencepiece model (serving needs nothing else)
      size.json        byte accounting (`size_report`)

Tensors are named by their nnx.Param path (``blocks/ffn1/w_in/kernel``); in arrays/ each
tensor is a dict of components nested along that path. A compressed kernel stored as
``[*stack, *layer_shape]`` (scan over layers stacks ``num_layers`` on a leading axis) is
encoded layer by layer, S = prod(stack) rows of per-layer data:

* kind ``quantized`` (weight_bits 2, 4, 8): the integer codes q of
  ``ops.quantize_weight(kernel, mask, spec)`` -- mask first, then quantize per channel or
  sub-channel block -- so that ``qwix.dequantize(q, scale, zero_point)`` equals the
  fake-quant forward value ``ops.compressed_weight(kernel, mask, spec)`` bit for bit.

  - ``values``     uint8 ``[S, B]``: q packed by `packing.pack_bits` at ``weight_bits``
    (int8 one per byte, int4 two, int2 four; two's complement, little-endian stream).
    Dense layers store all ``prod(layer_shape)`` codes in row-major order; N:M layers
    only the N kept codes of every group of M (N:M layout below).
  - ``indices``    uint8 ``[S, B']`` (N:M only): `packing` position indices
    (``IndexEncoding.POSITION``, default: ceil(log2 M) bits per kept value, the hardware
    2:4 layout) or combinatorial ranks (ceil(log2 C(M, N)) bits per group).
  - ``scale``      float32 ``[S, *group_shape]``, qwix's layout: the layer's rank, 1 on
    reduced axes, the block count on a sub-channel axis. float32 because the evaluation
    multiplies by the float32 scale; rounding it to bfloat16 would change the weights.
  - ``zero_point`` int8 ``[S, *group_shape]`` (asymmetric specs only); pruned positions
    decode to q = zero_point, i.e. weight 0, as in the evaluation.

* kind ``sparse_float`` (N:M without weight bits, and int16 + N:M, which has no integer
  form in qwix): ``values`` float32 ``[S, *rest_shape, G, N]``, the kept entries of
  W_eff = ``compressed_weight(...)``, compacted as bit patterns (so signs of zero survive)
  plus ``indices`` as above.
* kind ``dense_float`` (int16 without N:M): ``values`` float32 ``[S, *layer_shape]`` = W_eff.
* kind ``float`` (norms, biases, kernels the policy leaves float): ``value``, the
  checkpoint tensor itself, in its dtype (float32).

N:M layout: the layer's group axes (``nm_axes``: the contraction axes unless the rule sets
``nm_axis``) are moved last, in order, and flattened, giving rows
``[*rest_shape, group_length]`` -- exactly how `ops.nm_mask` groups -- then compacted
along the last axis by `packing.compact_nm` (a partial last group follows packing's
padding rule; the padded slots hold zeros and are dropped on expansion). G = number of
groups per row, ceil(group_length / M).

Serving (`load_export`): a float-policy ConformerCTC graph from the metadata (shapes only)
whose compressed kernels stay packed in memory (`PackedKernel` values); inside the jitted
forward each layer unpacks and dequantizes its own kernels, ``(q - z) * scale`` through
`qwix.dequantize`, stacked blocks one layer at a time within the scan over layers, so the
served model never exists as a whole in float. The export is written to a temporary
sibling folder and renamed into place, so a reader never sees a half-written one.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import math
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from usmqs.compress import ops, packing
from usmqs.compress.layers import Conv, EncodedKernel, _Compressible
from usmqs.compress.packing import IndexEncoding
from usmqs.compress.policy import Every, Granularity, Gradual, OneShot, Policy, Rule, WeightSpec

FORMAT = "usmqs-export"
FORMAT_VERSION = 1
EXPORT_DIRNAME = "export"
METADATA_FILE = "metadata.json"
SIZE_FILE = "size.json"
ARRAYS_DIR = "arrays"
TOKENIZER_FILE = "tokenizer.model"

# Model config keys that do not change the evaluation forward pass: a serving config may
# differ from the exported one in these (e.g. a different dropout on the command line).
_TRAIN_ONLY_MODEL_KEYS = frozenset({"dropout", "attention_dropout", "remat"})


class Kind(enum.StrEnum):
    """How a tensor is stored (module docstring)."""

    QUANTIZED = "quantized"
    SPARSE_FLOAT = "sparse_float"
    DENSE_FLOAT = "dense_float"
    FLOAT = "float"


class ExportError(ValueError):
    """A missing, truncated, tampered or mismatched export; the message names the culprit."""


# =========================================================================== helpers


def _sha256(a: np.ndarray) -> str:
    """sha256 of an array's bytes in C order (shape and dtype are checked separately)."""
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return hashlib.sha256(flat).hexdigest()


def _file_sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _path_name(path) -> str:
    """jax key path of an nnx.State leaf -> 'blocks/ffn1/w_in/kernel' (drops '.value')."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey) and k.name != "value":
            parts.append(k.name)
    return "/".join(parts)


def _named_leaves(state) -> dict[str, Any]:
    return {_path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(state)}


def _nest(flat: Mapping[str, Any]) -> dict:
    """{'a/b': x} -> {'a': {'b': x}} (the Orbax tree)."""
    out: dict = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _get(tree: Mapping, name: str):
    node = tree
    for p in name.split("/"):
        node = node[p]
    return node


def disk_bytes(path: str | os.PathLike) -> int:
    """Apparent size of a directory tree like ``du -b``: files, links and directories."""
    path = pathlib.Path(path)
    total = path.lstat().st_size
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            total += (pathlib.Path(root) / n).lstat().st_size
    return total


def _jsonable(x):
    if isinstance(x, enum.Enum):
        return x.value
    if isinstance(x, tuple | list):
        return [_jsonable(v) for v in x]
    return x


def policy_to_data(policy: Policy | None) -> list[dict]:
    """The policy's rules as JSON data that `Policy.from_config` reads back."""
    kinds = {OneShot: "one_shot", Every: "every", Gradual: "gradual"}
    rules = []
    for rule in (policy.rules if policy is not None else ()):
        d = {"module_path": rule.module_path}
        for f in dataclasses.fields(WeightSpec):
            v = getattr(rule.spec, f.name)
            if f.name == "mask_schedule":
                v = {"kind": kinds[type(v)], **dataclasses.asdict(v)}
            d[f.name] = _jsonable(v)
        rules.append(d)
    return rules


def _model_config_data(model_cfg) -> dict:
    items = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    return {k: _jsonable(v) for k, v in sorted(items.items())}


# ====================================================================== layer codecs


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Static description of one compressed layer (hashable: keys the jit caches)."""

    kind: Kind
    layer_shape: tuple[int, ...]
    contract_axes: tuple[int, ...]
    spec: WeightSpec
    nm: tuple[int, int] | None  # None also when N == M (a dense "pattern")
    nm_axes: tuple[int, ...] | None
    encoding: IndexEncoding

    @property
    def rest_axes(self) -> tuple[int, ...]:
        return tuple(a for a in range(len(self.layer_shape)) if a not in self.nm_axes)

    @property
    def rows_shape(self) -> tuple[int, ...]:
        """Per-layer N:M rows: [*rest_shape, group_length]."""
        rest = tuple(self.layer_shape[a] for a in self.rest_axes)
        return rest + (math.prod(self.layer_shape[a] for a in self.nm_axes),)

    def to_rows(self, x: jax.Array) -> jax.Array:
        return jnp.transpose(x, self.rest_axes + self.nm_axes).reshape(self.rows_shape)

    def from_rows(self, x: jax.Array) -> jax.Array:
        perm = self.rest_axes + self.nm_axes
        x = x.reshape(tuple(self.layer_shape[a] for a in perm))
        return jnp.transpose(x, tuple(perm.index(a) for a in range(len(perm))))


def _layout(layer: _Compressible, encoding: IndexEncoding) -> _Layout:
    spec = layer.spec
    shape = tuple(layer.kernel_shape)
    nm = spec.nm if spec.nm is not None and spec.nm[0] < spec.nm[1] else None
    nm_axes = ops.nm_group_axes(spec, layer.contract_axes, len(shape)) if nm else None
    if spec.weight_bits is not None and spec.weight_bits <= 8:
        kind = Kind.QUANTIZED
    else:  # float N:M, or int16 (qwix has no integer form above 8 bits)
        kind = Kind.SPARSE_FLOAT if nm else Kind.DENSE_FLOAT
    return _Layout(kind, shape, tuple(layer.contract_axes), spec, nm, nm_axes, encoding)


@functools.cache
def _encoder(lay: _Layout):
    """Jitted per-layer encoder: (kernel, mask) -> dict of stored components (+ 'nm_ok')."""
    spec = lay.spec

    def encode(kernel, mask):
        out = {}
        if lay.kind is Kind.QUANTIZED:
            qa = ops.quantize_weight(kernel, mask, spec, contract_axes=lay.contract_axes)
            q = qa.qvalue.astype(jnp.int8)  # int4 storage -> int8: same integers
            out["scale"] = qa.scale
            if qa.zero_point is not None:
                out["zero_point"] = qa.zero_point.astype(jnp.int8)
            if lay.nm is None:
                out["values"] = packing.pack_bits(q, spec.weight_bits)
                return out
            kept_src, bits = q, spec.weight_bits
        else:
            w = ops.compressed_weight(kernel, mask, spec, contract_axes=lay.contract_axes)
            if lay.nm is None:
                out["values"] = w
                return out
            # Compact the float bit patterns as integers: exact, whatever the values.
            kept_src, bits = jax.lax.bitcast_convert_type(w, jnp.int32), None
        n, m = lay.nm
        rows_mask = lay.to_rows(mask)
        kept, idx = packing.compact_nm(lay.to_rows(kept_src), rows_mask, n, m, -1, lay.encoding)
        out["values"] = (
            packing.pack_bits(kept, bits) if bits else jax.lax.bitcast_convert_type(kept, jnp.float32)
        )
        out["indices"] = packing.pack_bits(idx, packing.nm_index_bits(n, m, lay.encoding))
        out["nm_ok"] = packing.is_nm_mask(rows_mask, n, m, -1)
        return out

    return jax.jit(encode)


def _broadcast_groups(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A per-group array (qwix scale layout) repeated out to the full `shape`."""
    for a, (gs, s) in enumerate(zip(g.shape, shape)):
        if gs not in (1, s):
            g = jnp.repeat(g, s // gs, axis=a)
    return jnp.broadcast_to(g, shape)


def _decode_codes(lay: _Layout, values, indices, zero_point) -> jax.Array:
    """One layer's components -> its int8 codes ``[*layer_shape]`` (quantized) or its
    float kernel (the other kinds). Traceable: runs inside the serving scan."""
    if lay.nm is None:
        if lay.kind is Kind.QUANTIZED:
            count = math.prod(lay.layer_shape)
            return packing.unpack_bits(values, lay.spec.weight_bits, count).reshape(lay.layer_shape)
        return values
    n, m = lay.nm
    rows = lay.rows_shape
    groups = -(-rows[-1] // m)
    lead = rows[:-1]
    idx_shape = lead + ((groups, n) if lay.encoding is IndexEncoding.POSITION else (groups,))
    idx = packing.unpack_bits(
        indices, packing.nm_index_bits(n, m, lay.encoding), math.prod(idx_shape), signed=False
    ).reshape(idx_shape)
    if lay.kind is Kind.SPARSE_FLOAT:
        bits = jax.lax.bitcast_convert_type(values, jnp.int32)
        dense = packing.expand_nm(bits, idx, n, m, -1, rows, lay.encoding)
        return lay.from_rows(jax.lax.bitcast_convert_type(dense, jnp.float32))
    kept = packing.unpack_bits(values, lay.spec.weight_bits, math.prod(lead) * groups * n)
    q = lay.from_rows(packing.expand_nm(kept.reshape(lead + (groups, n)), idx, n, m, -1, rows, lay.encoding))
    if zero_point is not None:
        # Pruned weights were quantized as 0.0, i.e. code z: restore it there.
        ones = jnp.ones(lead + (groups, n), jnp.int8)
        keep = lay.from_rows(packing.expand_nm(ones, idx, n, m, -1, rows, lay.encoding)) != 0
        q = jnp.where(keep, q, _broadcast_groups(zero_point, lay.layer_shape))
    return q


def _dequantize(q: jax.Array, scale: jax.Array, zero_point: jax.Array | None) -> jax.Array:
    """(q - z) * scale through qwix itself: the evaluation's own dequantization."""
    return qwix.dequantize(qwix.QArray(q, scale, zero_point))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("values", "indices", "scale", "zero_point"),
    meta_fields=("layout",),
)
@dataclasses.dataclass(frozen=True)
class PackedKernel(EncodedKernel):
    """A compressed kernel as the export stores it, decoded where the layer uses it.

    Leaves are the stored components (module docstring) with the layer's stack axes
    leading -- ``values [*stack, B]``, ``indices [*stack, B']``, ``scale`` and
    ``zero_point [*stack, *group_shape]`` -- or none for an unstacked layer. The model's
    scan over layers slices them like any stacked kernel; `decode` then unpacks, expands
    the N:M positions and dequantizes one layer: ``(q - z) * scale`` through qwix, the
    fake-quant evaluation's own arithmetic.
    """

    layout: _Layout
    values: jax.Array
    indices: jax.Array | None = None
    scale: jax.Array | None = None
    zero_point: jax.Array | None = None

    def codes(self) -> jax.Array:
        """int8 codes (quantized) or the float kernel, ``[*layer_shape]`` (one layer)."""
        return _decode_codes(self.layout, self.values, self.indices, self.zero_point)

    def decode(self) -> jax.Array:
        """The float32 kernel ``[*layer_shape]`` of one layer."""
        out = self.codes()
        if self.layout.kind is Kind.QUANTIZED:
            out = _dequantize(out, self.scale, self.zero_point)
        # Materialize the decoded kernel once per layer (flat: a layout-free buffer), so
        # XLA does not fuse, and duplicate, the unpacking into each of its consumers.
        return jax.lax.optimization_barrier(out.reshape(-1)).reshape(out.shape)


def _over_stack(fn: Callable, stack_ndim: int) -> Callable:
    """`fn` of one layer's PackedKernel, mapped over `stack_ndim` leading stack axes."""
    for _ in range(stack_ndim):
        fn = jax.vmap(fn)
    return fn


@functools.partial(jax.jit, static_argnames=("stack_ndim",))
def _decode_stacked(packed: PackedKernel, stack_ndim: int) -> jax.Array:
    return _over_stack(PackedKernel.decode, stack_ndim)(packed)


@functools.partial(jax.jit, static_argnames=("stack_ndim",))
def _codes_stacked(packed: PackedKernel, stack_ndim: int) -> jax.Array:
    return _over_stack(PackedKernel.codes, stack_ndim)(packed)


# ============================================================================= export


def _record(a: np.ndarray, **extra) -> dict:
    return {"shape": list(a.shape), "dtype": str(a.dtype), "nbytes": int(a.nbytes), "sha256": _sha256(a), **extra}


def _encode_layer(name: str, layer: _Compressible, lay: _Layout, kernel, mask) -> tuple[dict, dict]:
    """Encode every stacked layer of one compressed kernel: (components, tensor record)."""
    stack = tuple(kernel.shape[: kernel.ndim - len(lay.layer_shape)])
    s = math.prod(stack)
    kernel = kernel.reshape((s, *lay.layer_shape))
    mask = None if mask is None else mask.reshape((s, *lay.layer_shape))
    enc = _encoder(lay)
    per_layer: dict[str, list[np.ndarray]] = {}
    for i in range(s):
        out = enc(kernel[i], None if mask is None else mask[i])
        ok = out.pop("nm_ok", None)
        if ok is not None and not bool(ok):
            n, m = lay.nm
            raise ExportError(
                f"{name} (stacked layer {i}): the mask is not a {n}:{m} pattern along axes "
                f"{list(lay.nm_axes)}; the checkpoint predates the mask schedule's final "
                f"N:M mask (spec {lay.spec.mask_schedule})"
            )
        for k, v in out.items():
            per_layer.setdefault(k, []).append(np.asarray(v))
    comps = {k: np.stack(v) for k, v in per_layer.items()}
    spec = lay.spec
    bits = spec.weight_bits if lay.kind is Kind.QUANTIZED else None
    records = {}
    for k, a in comps.items():
        extra = {}
        if k == "values" and bits is not None:
            extra["bits"] = bits
        if k == "indices":
            extra["bits"] = packing.nm_index_bits(*lay.nm, lay.encoding)
        records[k] = _record(a, **extra)
    rec = {
        "kind": lay.kind.value,
        "layer": layer.path,
        "shape": [*stack, *lay.layer_shape],
        "dtype": str(kernel.dtype),
        "stack_shape": list(stack),
        "layer_shape": list(lay.layer_shape),
        "contract_axes": list(lay.contract_axes),
        "weight_bits": spec.weight_bits,
        "symmetric": spec.symmetric,
        "granularity": spec.granularity.value,
        "block_size": spec.block_size,
        "clip_search": spec.clip_search,
        "nm": list(lay.nm) if lay.nm else None,
        "nm_axes": list(lay.nm_axes) if lay.nm else None,
        "index_encoding": lay.encoding.value if lay.nm else None,
        "arrays": records,
    }
    return comps, rec


def write_export(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    *,
    model_config,
    vocab_size: int,
    policy: Policy | None,
    tokenizer_file: str | os.PathLike,
    index_encoding: IndexEncoding | str = IndexEncoding.POSITION,
    step: int | None = None,
    read_arrays: Callable[[list[str]], Mapping[str, Any]] | None = None,
) -> dict:
    """Write the export of `model` (a policy ConformerCTC with its masks) to `out_dir`.

    Values come from the model itself, or, with `read_arrays`, from that function:
    ``read_arrays([state names]) -> {name: array}`` with names like
    ``blocks/ffn1/w_in/kernel`` and ``blocks/ffn1/w_in/mask``; then `model` may hold
    shapes only (`nnx.eval_shape`) and the weights are read one compressed layer at a
    time, so memory stays near one layer's worth (`export_workdir` reads a checkpoint
    this way).

    Atomic: everything goes to a temporary sibling folder that is renamed to `out_dir`
    only when complete (an existing export is replaced after that). Returns the size
    report, also written to ``out_dir/size.json``. Layout: module docstring.
    """
    out_dir = pathlib.Path(out_dir)
    encoding = IndexEncoding(index_encoding)
    tokenizer_file = pathlib.Path(tokenizer_file)
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"no tokenizer at {tokenizer_file}: the export must carry it")

    _, params, _ = nnx.split(model, nnx.Param, ...)
    tensors: dict[str, dict] = {}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    compressed = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, _Compressible) and module.spec is not None:
            compressed["/".join(map(str, path)) + "/kernel"] = module
    names = list(_named_leaves(params))
    if read_arrays is None:
        def read_arrays(wanted, _model_state=_named_leaves(nnx.state(model))):
            return {n: _model_state[n] for n in wanted}
    floats = read_arrays([n for n in names if n not in compressed])
    for name in names:
        if name in compressed:
            layer = compressed[name]
            mask_name = name[: -len("kernel")] + "mask"
            got = read_arrays([name] + ([mask_name] if layer.mask is not None else []))
            arrays[name], tensors[name] = _encode_layer(
                name, layer, _layout(layer, encoding), got[name], got.get(mask_name)
            )
            del got
        else:
            a = np.asarray(floats.pop(name))
            arrays[name] = {"value": a}
            tensors[name] = {
                "kind": Kind.FLOAT.value, "shape": list(a.shape), "dtype": str(a.dtype),
                "arrays": {"value": _record(a)},
            }
    missing = sorted(set(compressed) - set(tensors))
    if missing:
        raise ExportError(f"compressed layers without a kernel Param: {missing}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        _save_arrays(tmp / ARRAYS_DIR, _nest(arrays))
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        files = {
            str(f.relative_to(tmp)): {"nbytes": f.stat().st_size, "sha256": _file_sha256(f)}
            for f in sorted(tmp.rglob("*")) if f.is_file()
        }
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "model_config": _model_config_data(model_config),
            "vocab_size": int(vocab_size),
            "policy": policy_to_data(policy),
            "index_encoding": encoding.value,
            "scale_dtype": "float32",
            "tokenizer": TOKENIZER_FILE,
            "files": files,
            "tensors": tensors,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        report = size_report(tmp)
        (tmp / SIZE_FILE).write_text(json.dumps(report, indent=2) + "\n")
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return report


def _checkpointer():
    import orbax.checkpoint as ocp

    # zstd would shrink low-entropy packed codes (int2 is nearly ternary) below what the
    # size report accounts; uncompressed, disk bytes = accounted bytes + small headers.
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))


def _save_arrays(path: pathlib.Path, tree: dict) -> None:
    import orbax.checkpoint as ocp

    ck = _checkpointer()
    ck.save(path.absolute(), args=ocp.args.PyTreeSave(tree))
    ck.close()


# ====================================================================== size report


def size_report(export_dir: str | os.PathLike) -> dict:
    """Byte accounting of the export in `export_dir` (written as its size.json).

    ``bytes`` per component: ``values`` (packed codes; kept float32 values of float N:M
    layers), ``indices`` (N:M), ``scales`` (float32), ``zero_points`` (int8),
    ``float_layers`` (norms, biases, float kernels, dense-float int16 kernels),
    ``container`` (Orbax/tensorstore bookkeeping under arrays/: tree metadata, OCDBT
    manifests and index nodes, measured as the files' bytes minus the array payload),
    ``metadata`` (metadata.json) and ``tokenizer``. ``total_bytes`` sums them all: every
    file serving reads. ``model_bytes`` leaves the tokenizer out, ``fp32_bytes`` = 4 x the
    number of parameters, ``size_ratio = model_bytes / fp32_bytes``.

    Over the compressed layers only (``compressed_layers_*``, the paper's accounting):
    bits per weight of values + indices + scales (+ zero points) and without scales, and
    the ratio to their fp32 bytes. int4 + 2:4 with position indices is 3 bits = 9.375 %
    without scales where no group is padded. ``arrays_payload_bytes`` (the arrays' own
    bytes) vs ``arrays_disk_bytes`` (files under arrays/) shows that nothing is
    compressed or duplicated on disk; ``disk_bytes`` is ``du -b`` of the directory (files
    and folders, size.json excluded since it is written last).
    """
    export_dir = pathlib.Path(export_dir)
    meta = json.loads((export_dir / METADATA_FILE).read_text())
    comp = dict.fromkeys(("values", "indices", "scales", "zero_points", "float_layers"), 0)
    cbytes = dict.fromkeys(("values", "indices", "scales", "zero_points"), 0)
    num_params = cw = 0  # all parameters; weights of compressed layers
    for rec in meta["tensors"].values():
        n = math.prod(rec["shape"])
        num_params += n
        arrs = rec["arrays"]
        if rec["kind"] in (Kind.FLOAT.value, Kind.DENSE_FLOAT.value):
            comp["float_layers"] += sum(a["nbytes"] for a in arrs.values())
            continue
        cw += n
        for key, bucket in (("values", "values"), ("indices", "indices"), ("scale", "scales"), ("zero_point", "zero_points")):
            if key in arrs:
                comp[bucket] += arrs[key]["nbytes"]
                cbytes[bucket] += arrs[key]["nbytes"]
    payload = sum(comp.values())
    arrays_disk = sum(f["nbytes"] for rel, f in meta["files"].items() if rel.startswith(ARRAYS_DIR + "/"))
    comp["container"] = arrays_disk - payload
    comp["metadata"] = (export_dir / METADATA_FILE).stat().st_size
    comp["tokenizer"] = meta["files"][meta["tokenizer"]]["nbytes"]
    total = sum(comp.values())
    model_bytes = total - comp["tokenizer"]
    fp32 = 4 * num_params
    values_idx = cbytes["values"] + cbytes["indices"]
    with_scales = values_idx + cbytes["scales"] + cbytes["zero_points"]
    size_json = export_dir / SIZE_FILE
    du = disk_bytes(export_dir) - (size_json.stat().st_size if size_json.exists() else 0)
    return {
        "bytes": comp,
        "total_bytes": total,
        "model_bytes": model_bytes,
        "num_params": num_params,
        "fp32_bytes": fp32,
        "size_ratio": model_bytes / fp32,
        "compressed_layers_num_weights": cw,
        "compressed_layers_fp32_bytes": 4 * cw,
        "compressed_layers_bytes": with_scales,
        "compressed_layers_bits_per_weight": 8 * with_scales / cw if cw else None,
        "compressed_layers_bits_per_weight_no_scales": 8 * values_idx / cw if cw else None,
        "compressed_layers_ratio": with_scales / (4 * cw) if cw else None,
        "compressed_layers_ratio_no_scales": values_idx / (4 * cw) if cw else None,
        "arrays_payload_bytes": payload,
        "arrays_disk_bytes": arrays_disk,
        "disk_bytes": du,
        "index_encoding": meta["index_encoding"],
        "scale_dtype": meta["scale_dtype"],
    }


# ============================================================================ serving


@dataclasses.dataclass
class Served:
    """A loaded export: float-policy ConformerCTC graph + verified, still packed weights.

    `packed[name]` holds a compressed kernel as stored (a `PackedKernel`: packed codes,
    N:M indices, float32 scales, optional int8 zero points, leading stack axes);
    `floats[name]` every other tensor, and the kernels of grouped (depthwise) convs,
    decoded at load (`load_export` says why). `log_probs` decodes each kernel where its layer
    runs -- inside the scan over layers for stacked blocks -- so memory holds the packed
    model plus one layer's float kernels, never the whole model in float.
    """

    export_dir: pathlib.Path
    metadata: dict
    graphdef: Any
    abstract_params: Any
    rest: Any
    floats: dict[str, jax.Array]
    packed: dict[str, PackedKernel]
    _forward: Any = dataclasses.field(repr=False, default=None)

    @property
    def vocab_size(self) -> int:
        return int(self.metadata["vocab_size"])

    @property
    def tokenizer_file(self) -> pathlib.Path:
        return self.export_dir / self.metadata["tokenizer"]

    def _stack_ndim(self, name: str) -> int:
        return len(self.metadata["tensors"][name]["stack_shape"])

    def kernels(self) -> dict[str, jax.Array]:
        """Every compressed kernel decoded, ``[*stack, *layer_shape]`` float32 (jitted;
        materializes them all: for inspection and tests, serving never calls it)."""
        return {k: _decode_stacked(p, self._stack_ndim(k)) for k, p in self.packed.items()}

    @property
    def codes(self) -> dict[str, dict[str, jax.Array | None]]:
        """Quantized kernels as int8 codes ``[*stack, *layer_shape]`` (one byte per
        weight) with their `scale` and `zero_point` (qwix layout, leading stack axes);
        unpacked on each access, for inspection."""
        return {
            k: {"q": _codes_stacked(p, self._stack_ndim(k)), "scale": p.scale, "zero_point": p.zero_point}
            for k, p in self.packed.items() if p.layout.kind is Kind.QUANTIZED
        }

    def log_probs(self, features, feature_mask) -> tuple[jax.Array, jax.Array]:
        """log_softmax(logits) [B, T', V] float32 and out_mask [B, T'], like the eval step."""
        compiled = self._forward._cache_size()
        out = self._forward(self.floats, self.packed, features, feature_mask)
        if self._forward._cache_size() != compiled:
            _release_freed_memory()
        return out


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc). XLA compilation and unpacking free
    large temporaries that glibc would otherwise keep mapped: a server's footprint
    should be its live weights, not its compile-time high-water mark."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_HEAP_RETENTION_BYTES = 1 << 20


def limit_heap_retention() -> None:
    """Make glibc give large freed blocks back to the OS (process-wide, idempotent).

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB)
    and its trim threshold to twice that, so after the first stacked tensor is read,
    blocks of that size come from per-thread heaps that are not trimmed below 64 MiB of
    free space each. Orbax/tensorstore read on several threads, so every big tensor left
    tens of MiB resident behind it: measured, this was most of the export's footprint
    above the bare process (bench/export_memory.py). Fixed thresholds of 1 MiB turn
    that dynamic behaviour off; the cost is an mmap per block above 1 MiB, which is why
    only processes that export or serve and then exit call it (`usmqs export`,
    `usmqs evaluate --export`, bench/export_memory.py), never a training process.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_RETENTION_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_RETENTION_BYTES)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def _make_forward(graphdef, abstract_params, rest):
    def forward(floats, packed, features, feature_mask):
        # Packed kernels go into the model as they are (`EncodedKernel` values): each
        # layer decodes its own, per layer inside the scan over stacked blocks.
        values = {**floats, **packed}
        params = jax.tree_util.tree_map_with_path(lambda p, _: values[_path_name(p)], abstract_params)
        model = nnx.merge(graphdef, params, rest)
        logits, out_mask = model(features, feature_mask, rng=None)
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), out_mask

    return jax.jit(forward)


def _read_metadata(export_dir: pathlib.Path) -> dict:
    path = export_dir / METADATA_FILE
    if not path.is_file():
        raise ExportError(f"{export_dir}: no {METADATA_FILE} (not an export, or an unfinished one)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON (truncated or corrupted): {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportError(f"{path}: not a {FORMAT} metadata file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{path}: format_version {meta.get('format_version')!r}, this usmqs reads "
            f"version {FORMAT_VERSION}; re-export the run with `usmqs export`"
        )
    for key in ("model_config", "vocab_size", "tensors", "files", "tokenizer"):
        if key not in meta:
            raise ExportError(f"{path}: missing field {key!r}")
    return meta


def _check_files(export_dir: pathlib.Path, meta: dict, *, hashes: bool) -> None:
    """Every file the metadata lists exists with its size (and sha256 when `hashes`)."""
    for rel, want in meta["files"].items():
        f = export_dir / rel
        if not f.is_file():
            raise ExportError(f"{export_dir}: file {rel} is missing")
        size = f.stat().st_size
        if size != want["nbytes"]:
            raise ExportError(
                f"{export_dir}: file {rel} has {size} bytes, expected {want['nbytes']} "
                f"({'truncated' if size < want['nbytes'] else 'extended'})"
            )
        if hashes and _file_sha256(f) != want["sha256"]:
            raise ExportError(f"{export_dir}: file {rel} fails its sha256 checksum (modified)")


def check_config(meta: dict, config) -> None:
    """Raise ExportError when `config.model` does not describe the exported model."""
    want = _model_config_data(config.model)
    have = meta["model_config"]
    keys = sorted((set(want) | set(have)) - _TRAIN_ONLY_MODEL_KEYS)
    diff = [f"{k}: export {have.get(k)!r} vs config {want.get(k)!r}" for k in keys if want.get(k) != have.get(k)]
    if diff:
        raise ExportError("the export was made for another model preset/config: " + "; ".join(diff))


def _restore_arrays(export_dir: pathlib.Path, meta: dict) -> dict[str, dict[str, np.ndarray]]:
    import orbax.checkpoint as ocp

    restore_args = _nest({
        f"{name}/{comp}": ocp.RestoreArgs(restore_type=np.ndarray)
        for name, rec in meta["tensors"].items() for comp in rec["arrays"]
    })
    ck = _checkpointer()
    try:
        tree = ck.restore((export_dir / ARRAYS_DIR).absolute(), args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as e:
        # Name the damaged file if there is one; otherwise pass orbax's own message on.
        _check_files(export_dir, meta, hashes=True)
        raise ExportError(f"{export_dir}: cannot read {ARRAYS_DIR}/: {type(e).__name__}: {e}") from e
    finally:
        ck.close()
    out = {}
    for name, rec in meta["tensors"].items():
        comps = {}
        for comp, want in rec["arrays"].items():
            try:
                a = np.asarray(_get(tree, f"{name}/{comp}"))
            except (KeyError, TypeError):
                raise ExportError(f"{export_dir}: tensor {name}: component {comp!r} is missing") from None
            if list(a.shape) != want["shape"] or str(a.dtype) != want["dtype"]:
                raise ExportError(
                    f"{export_dir}: tensor {name}/{comp} is {a.dtype}{list(a.shape)}, "
                    f"metadata says {want['dtype']}{want['shape']}"
                )
            if _sha256(a) != want["sha256"]:
                raise ExportError(f"{export_dir}: tensor {name}/{comp} fails its sha256 checksum (corrupted or modified)")
            comps[comp] = a
        out[name] = comps
    return out


def _layout_from_record(name: str, rec: dict) -> _Layout:
    spec_fields = dict(
        weight_bits=rec["weight_bits"], symmetric=rec["symmetric"], block_size=rec["block_size"],
        clip_search=rec["clip_search"],
        nm=tuple(rec["nm"]) if rec["nm"] else None,
    )
    try:
        spec = WeightSpec(granularity=Granularity(rec["granularity"]), **spec_fields)
        return _Layout(
            Kind(rec["kind"]), tuple(rec["layer_shape"]), tuple(rec["contract_axes"]), spec,
            tuple(rec["nm"]) if rec["nm"] else None,
            tuple(rec["nm_axes"]) if rec["nm"] else None,
            IndexEncoding(rec["index_encoding"] or IndexEncoding.POSITION),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"tensor {name}: invalid record: {e}") from e


def load_export(export_dir: str | os.PathLike, config=None) -> Served:
    """Verify and load an export; nothing but `export_dir` is read.

    Checks, each failing with an `ExportError` that names the file or tensor: format and
    version, (with `config`) that ``config.model`` is the exported model, sizes of all
    files (truncation), shape, dtype and sha256 of every stored array, sha256 of every
    file, and that each tensor fits the float-policy model built from the metadata.
    The float graph comes from `nnx.eval_shape` (no random initialization). Compressed
    kernels stay packed (`PackedKernel`); the forward decodes them layer by layer. A serving
    process should call `limit_heap_retention` first.
    """
    from usmqs.models.conformer import ConformerCTC

    export_dir = pathlib.Path(export_dir)
    meta = _read_metadata(export_dir)
    if config is not None:
        check_config(meta, config)
    _check_files(export_dir, meta, hashes=False)  # sizes first: truncation, by file name
    stored = _restore_arrays(export_dir, meta)  # every array's checksum, by tensor name
    # Then every byte of every file (tokenizer, Orbax bookkeeping): a modification that
    # misses the array payloads is still an error, never a silently accepted export.
    _check_files(export_dir, meta, hashes=True)

    try:
        abstract = nnx.eval_shape(
            lambda: ConformerCTC(meta["model_config"], meta["vocab_size"], policy=None, rngs=nnx.Rngs(0))
        )
    except (TypeError, ValueError) as e:
        raise ExportError(f"{export_dir}: metadata model_config does not build a model: {e}") from e
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    # Grouped (depthwise) convolutions run as XLA-fused multiply-adds whose float rounding
    # follows the fusion around them: a kernel decoded inside the scan body can round the
    # conv differently from the evaluation, which reads its kernel from a scanned array.
    # Those kernels are tiny (window x channels per layer): decode them once, here.
    decode_at_load = {
        "/".join(map(str, path)) + "/kernel" for path, m in nnx.iter_modules(abstract)
        if isinstance(m, Conv) and m.feature_group_count > 1
    }
    want = _named_leaves(abstract_params)
    extra, absent = sorted(set(stored) - set(want)), sorted(set(want) - set(stored))
    if extra or absent:
        raise ExportError(f"{export_dir}: tensors do not fit the model: unexpected {extra}, missing {absent}")

    floats, packed = {}, {}
    for name, rec in meta["tensors"].items():
        shape, dtype = tuple(want[name].shape), str(want[name].dtype)
        if tuple(rec["shape"]) != shape or rec.get("dtype", dtype) != dtype:
            raise ExportError(f"tensor {name}: {rec.get('dtype')}{rec['shape']} in the export, model needs {dtype}{list(shape)}")
        comps = stored.pop(name)
        if rec["kind"] == Kind.FLOAT.value:
            floats[name] = jnp.asarray(comps["value"])
            continue
        lay = _layout_from_record(name, rec)
        stack = tuple(rec["stack_shape"])
        try:
            # Stored [S, ...] -> [*stack, ...]: the leading axes the model's scan slices.
            pk = PackedKernel(lay, **{c: jnp.asarray(a.reshape(stack + a.shape[1:])) for c, a in comps.items()})
            # Abstractly: nothing is unpacked here, serving decodes layer by layer.
            out = jax.eval_shape(functools.partial(_decode_stacked, stack_ndim=len(stack)), pk)
        except (TypeError, ValueError) as e:
            raise ExportError(f"tensor {name}: components do not decode to {shape}: {e}") from e
        if out.shape != shape or out.dtype != jnp.float32:
            raise ExportError(f"tensor {name}: components decode to {out.dtype}{list(out.shape)}, model needs float32{list(shape)}")
        if name in decode_at_load:
            floats[name] = _decode_stacked(pk, len(stack))
        else:
            packed[name] = pk
    del stored
    _release_freed_memory()
    return Served(
        export_dir, meta, graphdef, abstract_params, rest, floats, packed,
        _make_forward(graphdef, abstract_params, rest),
    )


# ============================================================================ drivers


class _CheckpointReader:
    """Reads named params/masks of one checkpoint step as host numpy arrays, on demand.

    Each call restores only the requested leaves (Orbax partial restore), so the export
    never holds more than one layer's float master weights and mask at a time, and the
    optimizer state is never read.
    """

    def __init__(self, config, workdir: pathlib.Path, setup):
        from usmqs import run

        self.mngr = run.checkpoint_manager(workdir, config)
        self.step = self.mngr.latest_step()
        if self.step is None:
            raise FileNotFoundError(f"{workdir}: no checkpoint to export")
        self.shapes = {
            **{f"params/{k}": v for k, v in _named_leaves(setup.abstract_state.params).items()},
            **{f"rest/{k}": v for k, v in _named_leaves(setup.abstract_state.rest).items()},
        }

    def _key(self, name: str) -> str:
        return f"rest/{name}" if name.endswith("/mask") else f"params/{name}"

    def __call__(self, names: list[str]) -> dict[str, np.ndarray]:
        import orbax.checkpoint as ocp

        if not names:
            return {}
        keys = {n: self._key(n) for n in names}
        item = _nest({f"{k}/value": self.shapes[k] for k in keys.values()})
        restore_args = _nest({f"{k}/value": ocp.RestoreArgs(restore_type=np.ndarray) for k in keys.values()})
        restored = self.mngr.restore(
            self.step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
            ),
        )
        return {n: _get(restored.state, f"{k}/value") for n, k in keys.items()}

    def close(self):
        self.mngr.close()


def export_workdir(config, workdir, *, index_encoding: IndexEncoding | str = IndexEncoding.POSITION) -> dict:
    """Export the run in `workdir` (latest checkpoint) to ``workdir/export``; the size report.

    Reads the params and masks one compressed layer at a time (never the optimizer
    state) and encodes them one stacked layer at a time; an export-only process should
    call `limit_heap_retention` first. The export's codes are exactly the fake-quant
    evaluation's weights (module docstring).
    """
    from usmqs import run
    from usmqs.data.tokenizer import Tokenizer

    workdir = pathlib.Path(workdir)
    tok_file = workdir / run.TOKENIZER_FILE
    if not tok_file.is_file():
        raise FileNotFoundError(f"{workdir}: no {run.TOKENIZER_FILE}; is this a training workdir?")
    vocab_size = Tokenizer.load(tok_file).vocab_size
    setup = run.build(config, vocab_size)
    reader = _CheckpointReader(config, workdir, setup)
    try:
        # A model of shapes only: it supplies layer specs; the reader supplies values.
        model = nnx.merge(setup.graphdef, setup.abstract_state.params, setup.abstract_state.rest)
        report = write_export(
            model, workdir / EXPORT_DIRNAME,
            model_config=config.model, vocab_size=vocab_size, policy=setup.policy,
            tokenizer_file=tok_file, index_encoding=index_encoding, step=int(reader.step),
            read_arrays=reader,
        )
    finally:
        reader.close()
    print(
        f"export: {workdir / EXPORT_DIRNAME}  {report['model_bytes']:,} bytes = "
        f"{100 * report['size_ratio']:.2f}% of fp32 ({report['fp32_bytes']:,});  compressed layers "
        f"{report['compressed_layers_bits_per_weight_no_scales'] or 32:.3f} bits/weight "
        f"({report['compressed_layers_bits_per_weight'] or 32:.3f} with scales)",
        flush=True,
    )
    return report


def evaluate_export(config, workdir, manifest: str | None = None, split: str = "eval") -> dict:
    """Decode a split (the eval manifest, or "dev") from ``workdir/export`` alone; write
    ``eval_export.json`` and ``predictions_export.jsonl`` (``eval_export_dev.json``, ...).
    Model and tokenizer come from the export; `config` supplies data/eval settings and
    must describe the same model."""
    from usmqs import evaluate as evaluate_lib
    from usmqs import run
    from usmqs.data import pipeline
    from usmqs.data.tokenizer import Tokenizer

    workdir = pathlib.Path(workdir)
    served = load_export(workdir / EXPORT_DIRNAME, config=config)
    tokenizer = Tokenizer.load(served.tokenizer_file)
    if tokenizer.vocab_size != served.vocab_size:
        raise ExportError(f"export tokenizer has {tokenizer.vocab_size} pieces, metadata says {served.vocab_size}")
    manifest, suffix = evaluate_lib.split_manifest(config, split, manifest)
    prepared = pipeline.prepare_split(
        manifest, tokenizer, config.data, run.cache_dir(config, workdir), train=False
    )
    metrics, rows = evaluate_lib.run_decoding(served.log_probs, prepared, config.data, tokenizer, config.eval)
    metrics["step"] = served.metadata.get("step")
    metrics["export"] = True
    evaluate_lib.write_results(workdir, metrics, rows, suffix="_export" + suffix)
    print(evaluate_lib.summary_line(metrics, "export" if split == "eval" else f"export, {split}"), flush=True)
    return metrics
