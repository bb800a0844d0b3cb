"""A run's packed export: writing it from the workdir, and serving and evaluating from it.

`export_workdir(config, workdir)` turns a run's latest checkpoint into ``WORKDIR/export/``
(format: `usmqs.compress.export_format`; per-layer encoding: `usmqs.compress.codec`);
`load_export(dir)` verifies and loads it; `evaluate_export(config, workdir)` decodes the
eval manifest from the export alone, token-identical to the fake-quant evaluation.

Serving (`load_export`): a float-policy ConformerCTC graph from the metadata (shapes only)
whose compressed kernels stay packed in memory (`PackedKernel` values); inside the jitted
forward each layer unpacks and dequantizes its own kernels, ``(q - z) * scale`` through
`qwix.dequantize`, stacked blocks one layer at a time within the scan over layers, so the
served model never exists as a whole in float.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from usmqs import evaluate as evaluate_lib
from usmqs import run
from usmqs.compress import codec, export_format
from usmqs.compress.codec import PackedKernel
from usmqs.compress.export_format import EXPORT_DIRNAME, ExportError
from usmqs.compress.layers import Conv
from usmqs.compress.packing import IndexEncoding
from usmqs.data import pipeline
from usmqs.data.features import FeatureConfig
from usmqs.data.tokenizer import Tokenizer
from usmqs.models.conformer import EARLIER_FRONT_END, ConformerCTC

log = logging.getLogger("usmqs.export")

# ============================================================================ memory


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc). XLA compilation and unpacking free
    large temporaries that glibc would otherwise keep mapped: a server's footprint
    should be its live weights, not its compile-time high-water mark."""
    try:
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
    free space each. Orbax/tensorstore read on several threads, so every big tensor can
    leave tens of MiB resident behind it (bench/export_memory.py measures it). Fixed
    thresholds of 1 MiB turn that dynamic behaviour off; the cost is an mmap per block
    above 1 MiB, which is why only processes that export or serve and then exit call it
    (`usmqs export`, `usmqs evaluate --export`, bench/export_memory.py), never a training
    process.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_RETENTION_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_RETENTION_BYTES)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


# =========================================================================== serving


@dataclasses.dataclass
class Served:
    """A loaded export: float-policy ConformerCTC graph + verified, still packed weights.

    `packed[name]` holds a compressed kernel as stored (a `PackedKernel`: packed codes,
    N:M indices, float32 scales, optional int8 zero points, leading stack axes);
    `floats[name]` every other tensor, and the kernels of grouped (depthwise) convs,
    decoded at load (`load_export` says why). `forward(floats, packed, features,
    feature_mask)` is the jitted model; it decodes each kernel where its layer runs --
    inside the scan over layers for stacked blocks -- so memory holds the packed model
    plus one layer's float kernels, never the whole model in float.
    """

    export_dir: pathlib.Path
    metadata: dict
    graphdef: Any
    abstract_params: Any
    rest: Any
    floats: dict[str, jax.Array]
    packed: dict[str, PackedKernel]
    forward: Callable = dataclasses.field(repr=False)
    # Input shapes and dtypes the forward has been called with (each compiled once).
    _signatures: set = dataclasses.field(default_factory=set, repr=False)

    @property
    def vocab_size(self) -> int:
        return int(self.metadata["vocab_size"])

    @property
    def tokenizer_file(self) -> pathlib.Path:
        return self.export_dir / self.metadata["tokenizer"]

    def load_tokenizer(self) -> Tokenizer:
        """The export's tokenizer (verified by `load_export`); an ExportError when its
        size is not the metadata's vocabulary size."""
        tokenizer = Tokenizer.load(self.tokenizer_file)
        if tokenizer.vocab_size != self.vocab_size:
            raise ExportError(f"export tokenizer has {tokenizer.vocab_size} pieces, metadata says {self.vocab_size}")
        return tokenizer

    def data_config(self) -> tuple[ml_collections.ConfigDict, FeatureConfig]:
        """The data config (front end, normalization, buckets, batch size) and the
        `FeatureConfig` the exported run decoded audio with, from the metadata's ``data``.
        An export written before ``data`` existed gets the defaults with the model's mel
        bins, with a warning saying so."""
        settings = self.metadata.get("data")
        if settings is None:
            cfg = pipeline.default_data_config()
            cfg.num_mel_bins = int(self.metadata["model_config"]["num_mel_bins"])
            log.warning(
                "%s has no data settings (exported before they were stored): using the "
                "default front end, feature_norm=%r, buckets %s, max_frames=%d; re-export the "
                "run if it was trained otherwise", self.export_dir, cfg.feature_norm,
                tuple(cfg.bucket_boundaries), cfg.max_frames,
            )
            return cfg, pipeline.feature_config(cfg)
        try:
            return pipeline.data_config_from_serving(settings)
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"{self.export_dir}: metadata data settings are invalid: {e!r}") from e

    def log_probs(self, features, feature_mask) -> tuple[jax.Array, jax.Array]:
        """log_softmax(logits) [B, T', V] float32 and out_mask [B, T'], like the eval step."""
        signature = tuple((np.shape(x), str(jnp.result_type(x))) for x in (features, feature_mask))
        out = self.forward(self.floats, self.packed, features, feature_mask)
        if signature not in self._signatures:  # compiled just now
            self._signatures.add(signature)
            _release_freed_memory()
        return out


def _make_forward(graphdef, abstract_params, rest):
    def forward(floats, packed, features, feature_mask):
        # Packed kernels go into the model as they are (`EncodedKernel` values): each
        # layer decodes its own, per layer inside the scan over stacked blocks.
        values = {**floats, **packed}
        params = jax.tree_util.tree_map_with_path(
            lambda p, _: values[export_format.tensor_name(p)], abstract_params
        )
        model = nnx.merge(graphdef, params, rest)
        logits, out_mask = model(features, feature_mask, rng=None)
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), out_mask

    return jax.jit(forward)


def _abstract_model(export_dir: pathlib.Path, meta: dict) -> ConformerCTC:
    """The float-policy model the metadata describes, shapes only (no initialization)."""
    try:
        return nnx.eval_shape(
            lambda: ConformerCTC(meta["model_config"], meta["vocab_size"], policy=None, rngs=nnx.Rngs(0))
        )
    except (TypeError, ValueError) as e:
        raise ExportError(f"{export_dir}: metadata model_config does not build a model: {e}") from e


def _grouped_conv_kernels(model: nnx.Module) -> set[str]:
    # Grouped (depthwise) convolutions run as XLA-fused multiply-adds whose float rounding
    # follows the fusion around them: a kernel decoded inside the scan body can round the
    # conv differently from the evaluation, which reads its kernel from a scanned array.
    # Those kernels are tiny (window x channels per layer): decode them once, at load.
    return {
        "/".join(map(str, path)) + "/kernel" for path, m in nnx.iter_modules(model)
        if isinstance(m, Conv) and m.feature_group_count > 1
    }


def load_export(export_dir: str | os.PathLike, config=None) -> Served:
    """Verify and load an export; nothing but `export_dir` is read.

    Checks (`export_format.read_export`), each failing with an `ExportError` that names
    the file or tensor: format and version, (with `config`) that ``config.model`` is the
    exported model, sizes and sha256 of all files and of every stored array; then that
    each tensor fits the float-policy model built from the metadata. The float graph comes
    from `nnx.eval_shape` (no random initialization). Compressed kernels stay packed
    (`PackedKernel`); the forward decodes them layer by layer. A serving process should
    call `limit_heap_retention` first.
    """
    export_dir = pathlib.Path(export_dir)
    meta, stored = export_format.read_export(export_dir, None if config is None else config.model)
    abstract = _abstract_model(export_dir, meta)
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    decode_at_load = _grouped_conv_kernels(abstract)
    want = export_format.named_leaves(abstract_params)
    extra, absent = sorted(set(stored) - set(want)), sorted(set(want) - set(stored))
    if extra or absent:
        raise ExportError(f"{export_dir}: tensors do not fit the model: unexpected {extra}, missing {absent}")

    floats, packed = {}, {}
    for name, rec in meta["tensors"].items():
        shape, dtype = tuple(want[name].shape), str(want[name].dtype)
        if tuple(rec["shape"]) != shape or rec.get("dtype", dtype) != dtype:
            hint = f" ({EARLIER_FRONT_END})" if name == "subsample/proj/kernel" else ""
            raise ExportError(f"tensor {name}: {rec.get('dtype')}{rec['shape']} in the export, model needs {dtype}{list(shape)}{hint}")
        value = export_format.restore_tensor(name, rec, stored.pop(name))
        if not isinstance(value, PackedKernel):
            floats[name] = value
        elif name in decode_at_load:
            floats[name] = codec.decode_stacked(value, len(rec["stack_shape"]))
        else:
            packed[name] = value
    del stored
    _release_freed_memory()
    return Served(
        export_dir, meta, graphdef, abstract_params, rest, floats, packed,
        _make_forward(graphdef, abstract_params, rest),
    )


# =========================================================================== workdir


class _CheckpointReader:
    """Reads named params/masks of one checkpoint step as host numpy arrays, on demand.

    Each call restores only the requested leaves (Orbax partial restore), so the export
    never holds more than one layer's float master weights and mask at a time, and the
    optimizer state is never read.
    """

    def __init__(self, config, workdir: pathlib.Path, setup):
        self.mngr = run.checkpoint_manager(workdir)
        self.step = self.mngr.latest_step()
        if self.step is None:
            raise FileNotFoundError(f"{workdir}: no checkpoint to export")
        run.check_params_fit(self.mngr, self.step, setup.abstract_state.params)
        self.shapes = {
            **{f"params/{k}": v for k, v in export_format.named_leaves(setup.abstract_state.params).items()},
            **{f"rest/{k}": v for k, v in export_format.named_leaves(setup.abstract_state.rest).items()},
        }

    def _key(self, name: str) -> str:
        return f"rest/{name}" if name.endswith("/mask") else f"params/{name}"

    def __call__(self, names: list[str]) -> dict[str, np.ndarray]:
        if not names:
            return {}
        keys = {n: self._key(n) for n in names}
        item = export_format.nest({f"{k}/value": self.shapes[k] for k in keys.values()})
        restore_args = export_format.nest(
            {f"{k}/value": ocp.RestoreArgs(restore_type=np.ndarray) for k in keys.values()}
        )
        restored = self.mngr.restore(
            self.step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
            ),
        )
        return {n: export_format.get_nested(restored.state, f"{k}/value") for n, k in keys.items()}

    def close(self):
        self.mngr.close()


def export_workdir(config, workdir, *, index_encoding: IndexEncoding | str = IndexEncoding.POSITION) -> dict:
    """Export the run in `workdir` (latest checkpoint) to ``workdir/export``; the size report.

    Reads the params and masks one compressed layer at a time (never the optimizer
    state) and encodes them one stacked layer at a time; an export-only process should
    call `limit_heap_retention` first. The export's codes are exactly the fake-quant
    evaluation's weights (`usmqs.compress.codec`).
    """
    workdir = pathlib.Path(workdir)
    tok_file = workdir / run.TOKENIZER_FILE
    vocab_size = run.load_tokenizer(workdir).vocab_size
    setup = run.build(config, vocab_size)
    reader = _CheckpointReader(config, workdir, setup)
    try:
        # A model of shapes only: it supplies layer specs; the reader supplies values.
        model = nnx.merge(setup.graphdef, setup.abstract_state.params, setup.abstract_state.rest)
        report = export_format.write_export(
            model, workdir / EXPORT_DIRNAME,
            model_config=config.model, vocab_size=vocab_size, policy=setup.policy,
            tokenizer_file=tok_file, index_encoding=index_encoding, step=int(reader.step),
            read_arrays=reader, data=pipeline.serving_settings(config.data),
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
    workdir = pathlib.Path(workdir)
    served = load_export(workdir / EXPORT_DIRNAME, config=config)
    tokenizer = served.load_tokenizer()
    manifest, suffix = evaluate_lib.split_manifest(config, split, manifest)
    # The served model reads host features (as `usmqs transcribe` gives it), also when
    # the run trained with data.features_on_device.
    prepared = run.prepare_split(config, workdir, manifest, tokenizer, train=False, store_audio=False)
    metrics, rows = evaluate_lib.run_decoding(served.log_probs, prepared, config.data, tokenizer, config.eval)
    metrics["step"] = served.metadata.get("step")
    metrics["export"] = True
    evaluate_lib.write_results(workdir, metrics, rows, suffix="_export" + suffix)
    print(evaluate_lib.summary_line(metrics, "export" if split == "eval" else f"export, {split}"), flush=True)
    return metrics
