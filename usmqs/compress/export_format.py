"""The packed export on disk: writing, verifying and reading it, and its byte accounting.

Directory (``FORMAT_VERSION`` 1)::

    export/
      metadata.json    format + version, train step, model config, vocab size, policy
                       (rules as data), index encoding, one record per tensor (below, with
                       the sha256 of every stored array) and the size + sha256 of every
                       file under arrays/ and of the tokenizer; written after them.
                       Optional ``data``: the run's front end and batching settings
                       (`usmqs.data.pipeline.serving_settings`), which decoding audio needs;
                       exports written before it was added lack it (same version)
      arrays/          Orbax PyTree checkpoint of numpy arrays (zarr3 + OCDBT) written
                       with compression OFF, so the bytes on disk are the bytes accounted
      tokenizer.model  the run's sentencepiece model (serving needs nothing else)
      size.json        byte accounting (`size_report`)

Tensors are named by their nnx.Param path (``blocks/ffn1/w_in/kernel``, `tensor_name`); in
arrays/ each tensor is a dict of components nested along that path. A compressed kernel
stored as ``[*stack, *layer_shape]`` (scan over layers stacks ``num_layers`` on a leading
axis) is encoded layer by layer by `codec.encode`: S = prod(stack) rows of per-layer
components, each stored as ``[S, *component_shape]`` (component shapes, N:M layout and
kinds: `usmqs.compress.codec`). A tensor of kind ``float`` (norms, biases, kernels the
policy leaves float) stores ``value``, the checkpoint tensor itself, in its dtype.

A tensor record holds its kind, ``shape``, ``dtype``, ``stack_shape``, ``layer_shape``, the
layer's policy path (``layer``), ``contract_axes``, the spec's quantization fields,
``nm``, ``nm_axes``, ``index_encoding``, and per component its shape, dtype, nbytes,
sha256 (and ``bits`` for packed streams).

The export is written to a temporary sibling folder and renamed into place, so a reader
never sees a half-written one; a write that fails (a full disk: `storage.WriteError`, naming
the export folder and the free space) removes that folder and keeps the previous export.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
import pathlib
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from usmqs import storage
from usmqs.compress import codec
from usmqs.compress.codec import Kind, Layout, PackedKernel
from usmqs.compress.layers import Conv, Dense
from usmqs.compress.packing import IndexEncoding
from usmqs.compress.policy import Every, Granularity, Gradual, OneShot, Policy, WeightSpec

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


class ExportError(ValueError):
    """A missing, truncated, tampered or mismatched export; the message names the culprit."""


# ============================================================================ naming


def tensor_name(path) -> str:
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


def named_leaves(state) -> dict[str, Any]:
    """The leaves of an nnx.State (or any pytree) by `tensor_name`."""
    return {tensor_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(state)}


def nest(flat: Mapping[str, Any]) -> dict:
    """{'a/b': x} -> {'a': {'b': x}} (an Orbax tree)."""
    out: dict = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def get_nested(tree: Mapping, name: str):
    """The inverse of `nest` for one name: tree['a']['b'] for 'a/b'."""
    node = tree
    for p in name.split("/"):
        node = node[p]
    return node


# ======================================================================== metadata


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


def _jsonable(x):
    if isinstance(x, enum.Enum):
        return x.value
    if isinstance(x, tuple | list):
        return [_jsonable(v) for v in x]
    return x


def policy_to_data(policy: Policy | None, *, skip_defaults: bool = False) -> list[dict]:
    """The policy's rules as JSON data that `Policy.from_config` reads back; with
    `skip_defaults`, each rule without the fields that equal `WeightSpec`'s defaults."""
    kinds = {OneShot: "one_shot", Every: "every", Gradual: "gradual"}
    default = WeightSpec()
    rules = []
    for rule in (policy.rules if policy is not None else ()):
        d = {"module_path": rule.module_path}
        for f in dataclasses.fields(WeightSpec):
            v = getattr(rule.spec, f.name)
            if skip_defaults and v == getattr(default, f.name):
                continue
            if f.name == "mask_schedule":
                v = {"kind": kinds[type(v)], **dataclasses.asdict(v)}
            d[f.name] = _jsonable(v)
        rules.append(d)
    return rules


def _model_config_data(model_cfg) -> dict:
    items = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    return {k: _jsonable(v) for k, v in sorted(items.items())}


def _array_record(a: np.ndarray, **extra) -> dict:
    return {"shape": list(a.shape), "dtype": str(a.dtype), "nbytes": int(a.nbytes), "sha256": _sha256(a), **extra}


def _layout_record(lay: Layout) -> dict:
    spec = lay.spec
    return {
        "kind": lay.kind.value,
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
    }


def _layout_from_record(name: str, rec: dict) -> Layout:
    spec_fields = dict(
        weight_bits=rec["weight_bits"], symmetric=rec["symmetric"], block_size=rec["block_size"],
        clip_search=rec["clip_search"],
        nm=tuple(rec["nm"]) if rec["nm"] else None,
    )
    try:
        spec = WeightSpec(granularity=Granularity(rec["granularity"]), **spec_fields)
        return Layout(
            Kind(rec["kind"]), tuple(rec["layer_shape"]), tuple(rec["contract_axes"]), spec,
            tuple(rec["nm"]) if rec["nm"] else None,
            tuple(rec["nm_axes"]) if rec["nm"] else None,
            IndexEncoding(rec["index_encoding"] or IndexEncoding.POSITION),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"tensor {name}: invalid record: {e}") from e


# =========================================================================== writing


def _encode_tensor(name: str, layer: Dense | Conv, lay: Layout, kernel, mask, log_range=None) -> tuple[dict, dict]:
    """Encode every stacked layer of one compressed kernel (and its learned range, if
    any): (components, tensor record)."""
    stack = tuple(kernel.shape[: kernel.ndim - len(lay.layer_shape)])
    s = math.prod(stack)
    kernel = kernel.reshape((s, *lay.layer_shape))
    mask = None if mask is None else mask.reshape((s, *lay.layer_shape))
    log_range = None if log_range is None else log_range.reshape((s, *log_range.shape[len(stack):]))
    per_layer: dict[str, list[np.ndarray]] = {}
    for i in range(s):
        out, nm_ok = codec.encode(
            lay, kernel[i], None if mask is None else mask[i], None if log_range is None else log_range[i]
        )
        if nm_ok is not None and not bool(nm_ok):
            n, m = lay.nm
            raise ExportError(
                f"{name} (stacked layer {i}): the mask is not a {n}:{m} pattern along axes "
                f"{list(lay.nm_axes)}; the checkpoint predates the mask schedule's final "
                f"N:M mask (spec {lay.spec.mask_schedule})"
            )
        for k, v in out.items():
            per_layer.setdefault(k, []).append(np.asarray(v))
    comps = {k: np.stack(v) for k, v in per_layer.items()}
    bits = {"values": lay.value_bits, "indices": lay.index_bits}
    records = {
        k: _array_record(a, **({"bits": bits[k]} if bits.get(k) is not None else {}))
        for k, a in comps.items()
    }
    rec = {
        **_layout_record(lay),
        "layer": layer.path,
        "shape": [*stack, *lay.layer_shape],
        "dtype": str(kernel.dtype),
        "stack_shape": list(stack),
        "arrays": records,
    }
    return comps, rec


def _encode_model(
    model: nnx.Module, encoding: IndexEncoding, read_arrays: Callable[[list[str]], Mapping[str, Any]] | None
) -> tuple[dict[str, dict], dict[str, dict[str, np.ndarray]]]:
    """Every Param of `model`, compressed kernels one at a time: (tensor records, arrays)."""
    _, params, _ = nnx.split(model, nnx.Param, ...)
    tensors: dict[str, dict] = {}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    compressed = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Dense | Conv) and module.spec is not None:
            compressed["/".join(map(str, path)) + "/kernel"] = module
    # A learned range is stored as the scales (and zero points) it sets, not as a tensor.
    ranges = {k[: -len("kernel")] + "quant_range" for k, m in compressed.items() if m.quant_range is not None}
    names = [n for n in named_leaves(params) if n not in ranges]
    if read_arrays is None:
        def read_arrays(wanted, _model_state=named_leaves(nnx.state(model))):
            return {n: _model_state[n] for n in wanted}
    floats = read_arrays([n for n in names if n not in compressed])
    for name in names:
        if name in compressed:
            layer = compressed[name]
            prefix = name[: -len("kernel")]
            extra = [prefix + v for v in ("mask", "quant_range") if getattr(layer, v) is not None]
            got = read_arrays([name] + extra)
            arrays[name], tensors[name] = _encode_tensor(
                name, layer, Layout.of(layer, encoding), got[name], got.get(prefix + "mask"),
                got.get(prefix + "quant_range"),
            )
            del got
        else:
            a = np.asarray(floats.pop(name))
            arrays[name] = {"value": a}
            tensors[name] = {
                "kind": Kind.FLOAT.value, "shape": list(a.shape), "dtype": str(a.dtype),
                "arrays": {"value": _array_record(a)},
            }
    missing = sorted(set(compressed) - set(tensors))
    if missing:
        raise ExportError(f"compressed layers without a kernel Param: {missing}")
    return tensors, arrays


def _checkpointer() -> ocp.Checkpointer:
    # zstd would shrink low-entropy packed codes (int2 is nearly ternary) below what the
    # size report accounts; uncompressed, disk bytes = accounted bytes + small headers.
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))


def _save_arrays(path: pathlib.Path, tree: dict) -> None:
    ck = _checkpointer()
    try:
        ck.save(path.absolute(), args=ocp.args.PyTreeSave(tree))
    finally:
        ck.close()


def _fill(folder: pathlib.Path, arrays: dict, tokenizer_file: pathlib.Path, meta: dict) -> dict:
    """arrays/, the tokenizer, metadata.json (`meta` + the files' sizes and hashes) and
    size.json into `folder`; the size report."""
    _save_arrays(folder / ARRAYS_DIR, nest(arrays))
    shutil.copyfile(tokenizer_file, folder / TOKENIZER_FILE)
    files = {
        str(f.relative_to(folder)): {"nbytes": f.stat().st_size, "sha256": _file_sha256(f)}
        for f in sorted(folder.rglob("*")) if f.is_file()
    }
    meta = {**meta, "tokenizer": TOKENIZER_FILE, "files": files}
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    report = size_report(folder)
    (folder / SIZE_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _move_into_place(folder: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Rename `folder` to `out_dir`. An existing `out_dir` is moved aside first and
    removed after, or moved back if the rename fails."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(out_dir, old)
    try:
        os.rename(folder, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_atomically(out_dir: pathlib.Path, arrays: dict, tokenizer_file: pathlib.Path, meta: dict) -> dict:
    """`_fill` a temporary sibling of `out_dir`, then rename it to `out_dir`; the size
    report. A failed write removes the temporary folder and leaves an existing export as
    it was; a full disk or another OS error is a `storage.WriteError` naming `out_dir`
    and the free space."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    with storage.writing(out_dir, "the packed export"):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.mkdir()
            report = _fill(tmp, arrays, tokenizer_file, meta)
            _move_into_place(tmp, out_dir)
        except BaseException:
            _remove_tree(tmp)
            raise
    return report


def _remove_tree(folder: pathlib.Path, attempts: int = 50, settle: int = 5) -> None:
    """Remove `folder` and see it stay removed for `settle` checks 0.1 s apart (at most
    `attempts` checks): when a save fails, Orbax raises the first write error while
    tensorstore's other writes into the folder are still landing, and such a write
    recreates the folder (and its parents) even after it was removed."""
    absent = 0
    for _ in range(attempts):
        shutil.rmtree(folder, ignore_errors=True)
        absent = 0 if folder.exists() else absent + 1
        if absent >= settle:
            return
        time.sleep(0.1)


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
    data: Mapping[str, Any] | None = None,
) -> dict:
    """Write the export of `model` (a policy ConformerCTC with its masks) to `out_dir`.

    Values come from the model itself, or, with `read_arrays`, from that function:
    ``read_arrays([state names]) -> {name: array}`` with names like
    ``blocks/ffn1/w_in/kernel`` and ``blocks/ffn1/w_in/mask``; then `model` may hold
    shapes only (`nnx.eval_shape`) and the weights are read one compressed layer at a
    time, so memory stays near one layer's worth (`usmqs.export.export_workdir` reads a
    checkpoint this way).

    `data` (JSON-ready): the front end and batching settings serving needs, stored as
    the metadata's ``data``.

    Atomic: everything goes to a temporary sibling folder that is renamed to `out_dir`
    only when complete (an existing export is replaced after that). Returns the size
    report, also written to ``out_dir/size.json``. Layout: module docstring.
    """
    out_dir = pathlib.Path(out_dir)
    encoding = IndexEncoding(index_encoding)
    tokenizer_file = pathlib.Path(tokenizer_file)
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"no tokenizer at {tokenizer_file}: the export must carry it")
    tensors, arrays = _encode_model(model, encoding, read_arrays)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "model_config": _model_config_data(model_config),
        "vocab_size": int(vocab_size),
        "policy": policy_to_data(policy),
        "index_encoding": encoding.value,
        "scale_dtype": "float32",
        "tensors": tensors,
    }
    if data is not None:
        meta["data"] = dict(data)
    return _write_atomically(out_dir, arrays, tokenizer_file, meta)


# ====================================================================== size report


def disk_bytes(path: str | os.PathLike) -> int:
    """Apparent size of a directory tree like ``du -b``: files, links and directories."""
    path = pathlib.Path(path)
    total = path.lstat().st_size
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            total += (pathlib.Path(root) / n).lstat().st_size
    return total


# Stored component -> size-report bucket, for the compressed kinds.
_COMPONENT_BUCKETS = {"values": "values", "indices": "indices", "scale": "scales", "zero_point": "zero_points"}


def tensor_bytes(kind: str, component_nbytes: Mapping[str, int]) -> dict[str, int]:
    """One tensor's bytes by `size_report` bucket: all in ``float_layers`` for the float
    kinds (float, dense_float), else ``values`` / ``indices`` / ``scales`` /
    ``zero_points`` (the compressed layers' accounting) for the components it has."""
    if kind in (Kind.FLOAT.value, Kind.DENSE_FLOAT.value):
        return {"float_layers": sum(component_nbytes.values())}
    return {_COMPONENT_BUCKETS[k]: n for k, n in component_nbytes.items()}


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
        buckets = tensor_bytes(rec["kind"], {k: a["nbytes"] for k, a in rec["arrays"].items()})
        for bucket, nbytes in buckets.items():
            comp[bucket] += nbytes
        if "float_layers" in buckets:
            continue
        cw += n
        for bucket, nbytes in buckets.items():
            cbytes[bucket] += nbytes
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


# =========================================================================== reading


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


def _check_model_config(meta: dict, model_config) -> None:
    """Raise ExportError when `model_config` does not describe the exported model."""
    want = _model_config_data(model_config)
    have = meta["model_config"]
    keys = sorted((set(want) | set(have)) - _TRAIN_ONLY_MODEL_KEYS)
    diff = [f"{k}: export {have.get(k)!r} vs config {want.get(k)!r}" for k in keys if want.get(k) != have.get(k)]
    if diff:
        raise ExportError("the export was made for another model preset/config: " + "; ".join(diff))


def _restore_arrays(export_dir: pathlib.Path, meta: dict) -> dict[str, dict[str, np.ndarray]]:
    restore_args = nest({
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
                a = np.asarray(get_nested(tree, f"{name}/{comp}"))
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


def read_export(export_dir: str | os.PathLike, model_config=None) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Verify an export and read its arrays: (metadata, {tensor name: {component: array}}).

    Checks, each failing with an `ExportError` that names the file or tensor: format and
    version, (with `model_config`) that it describes the exported model, sizes of all
    files (truncation), shape, dtype and sha256 of every stored array, sha256 of every
    file. Arrays are as stored (``[S, ...]`` for stacked kernels; `restore_tensor`).
    """
    export_dir = pathlib.Path(export_dir)
    meta = _read_metadata(export_dir)
    if model_config is not None:
        _check_model_config(meta, model_config)
    _check_files(export_dir, meta, hashes=False)  # sizes first: truncation, by file name
    stored = _restore_arrays(export_dir, meta)  # every array's checksum, by tensor name
    # Then every byte of every file (tokenizer, Orbax bookkeeping): a modification that
    # misses the array payloads is still an error, never a silently accepted export.
    _check_files(export_dir, meta, hashes=True)
    return meta, stored


def restore_tensor(name: str, rec: dict, comps: Mapping[str, np.ndarray]) -> jax.Array | PackedKernel:
    """One tensor from its record and stored components: the array itself (kind float), or
    a `PackedKernel` with its stack axes leading that decodes to the recorded float32
    shape (checked abstractly: nothing is unpacked here)."""
    if rec["kind"] == Kind.FLOAT.value:
        return jnp.asarray(comps["value"])
    lay = _layout_from_record(name, rec)
    shape, stack = tuple(rec["shape"]), tuple(rec["stack_shape"])
    try:
        # Stored [S, ...] -> [*stack, ...]: the leading axes the model's scan slices.
        pk = PackedKernel(lay, **{c: jnp.asarray(a.reshape(stack + a.shape[1:])) for c, a in comps.items()})
        out = jax.eval_shape(lambda p: codec.decode_stacked(p, len(stack)), pk)
    except (TypeError, ValueError) as e:
        raise ExportError(f"tensor {name}: components do not decode to {shape}: {e}") from e
    if out.shape != shape or out.dtype != jnp.float32:
        raise ExportError(f"tensor {name}: components decode to {out.dtype}{list(out.shape)}, model needs float32{list(shape)}")
    return pk
