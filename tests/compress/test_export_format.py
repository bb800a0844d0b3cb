"""The export on disk: bitwise round trips through Orbax, the recorded layout, integrity
checks that name the culprit, atomic replacement (also when the disk is full), and honest
byte accounting."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import EXPORT_VOCAB, ROOT, assert_bitwise, fake_quant_kernels, listing, mixed_model, small_tmpfs
from usmqs import config as config_lib
from usmqs import storage
from usmqs.compress import codec, export_format, masks
from usmqs.compress.codec import PackedKernel
from usmqs.compress.export_format import ExportError
from usmqs.compress.policy import Policy
from usmqs.models import presets
from usmqs.models.conformer import ConformerCTC


def _stored_kernels(export_dir) -> dict[str, np.ndarray]:
    """Policy path -> compressed kernel as read back and decoded, [*stack, *layer_shape]."""
    meta, stored = export_format.read_export(export_dir)
    out = {}
    for name, rec in meta["tensors"].items():
        value = export_format.restore_tensor(name, rec, stored[name])
        if rec["kind"] != "float":
            if isinstance(value, PackedKernel):
                value = codec.decode_stacked(value, len(rec["stack_shape"]))
            out[rec["layer"]] = np.asarray(value)
    return out


def _write(model, out_dir: pathlib.Path, cfg, policy, **kw) -> dict:
    tok = out_dir.parent / "tokenizer.model"
    if not tok.exists():
        tok.write_bytes(b"not parsed, only checksummed")
    return export_format.write_export(
        model, out_dir, model_config=cfg, vocab_size=EXPORT_VOCAB, policy=policy, tokenizer_file=tok, **kw
    )


# ------------------------------------------------------------------------ round trips


def test_every_kind_round_trips_bitwise(mixed_export):
    meta = json.loads((mixed_export["dir"] / "metadata.json").read_text())
    assert {rec["kind"] for rec in meta["tensors"].values()} == {"quantized", "sparse_float", "dense_float", "float"}
    assert_bitwise(fake_quant_kernels(mixed_export["model"]), _stored_kernels(mixed_export["dir"]))


def test_metadata_records_the_layout(mixed_export):
    meta = json.loads((mixed_export["dir"] / "metadata.json").read_text())
    assert meta["format_version"] == export_format.FORMAT_VERSION and meta["step"] == 7
    assert meta["vocab_size"] == EXPORT_VOCAB and meta["model_config"]["model_dim"] == 32
    assert Policy.from_config(meta["policy"]) == mixed_export["policy"]
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


def test_combinatorial_indices_round_trip_and_are_smaller(mixed_export, tmp_path):
    report = _write(
        mixed_export["model"], tmp_path / "export", mixed_export["cfg"], mixed_export["policy"],
        index_encoding="combinatorial",
    )
    assert_bitwise(fake_quant_kernels(mixed_export["model"]), _stored_kernels(tmp_path / "export"))
    rec = json.loads((tmp_path / "export/metadata.json").read_text())["tensors"]["blocks/attn/k/kernel"]
    assert rec["index_encoding"] == "combinatorial" and rec["arrays"]["indices"]["bits"] == 3
    # 2:4: 3 bits per group instead of 2 x 2; 1:4: 2 bits either way.
    assert report["bytes"]["indices"] < mixed_export["report"]["bytes"]["indices"]
    assert report["bytes"]["values"] == mixed_export["report"]["bytes"]["values"]


# ------------------------------------------------------------------------- integrity


@pytest.fixture
def copy(mixed_export, tmp_path):
    dst = tmp_path / "export"
    shutil.copytree(mixed_export["dir"], dst)
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
        export_format.read_export(copy)


def test_truncated_file_is_named(copy):
    f = _largest_data_file(copy)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    rel = str(f.relative_to(copy))
    with pytest.raises(ExportError, match=f"file {rel} has {len(data) // 2} bytes, expected {len(data)} .truncated"):
        export_format.read_export(copy)


def test_missing_file_and_truncated_metadata(copy):
    (copy / "tokenizer.model").unlink()
    with pytest.raises(ExportError, match="tokenizer.model is missing"):
        export_format.read_export(copy)
    meta = copy / "metadata.json"
    meta.write_text(meta.read_text()[:-200])
    with pytest.raises(ExportError, match="not valid JSON"):
        export_format.read_export(copy)


def test_wrong_format_version(copy):
    meta = json.loads((copy / "metadata.json").read_text())
    meta["format_version"] = export_format.FORMAT_VERSION + 1
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="format_version 2"):
        export_format.read_export(copy)


def test_wrong_model_config(mixed_export):
    cfg = config_lib.load_config(str(ROOT / "configs/tiny.py"))
    with pytest.raises(ExportError, match=r"another model preset.*model_dim: export 32 vs config 144"):
        export_format.read_export(mixed_export["dir"], model_config=cfg.model)
    cfg.model.update(mixed_export["cfg"].to_dict())
    cfg.model.dropout = 0.25  # train-only keys may differ
    export_format.read_export(mixed_export["dir"], model_config=cfg.model)


def test_failed_export_leaves_the_previous_one_intact(mixed_export, tmp_path):
    shutil.copytree(mixed_export["dir"], tmp_path / "export")
    cfg, policy, unpruned = mixed_model(prune=False)  # masks still all-ones
    with pytest.raises(ExportError, match=r"blocks/.*: the mask is not a \d:4 pattern"):
        _write(unpruned, tmp_path / "export", cfg, policy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "tokenizer.model"]  # no temporary left
    export_format.read_export(tmp_path / "export")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _arrays_then_tensorstore_full(save=ocp.Checkpointer.save):
    def fake(self, *args, **kwargs):  # the arrays written, then tensorstore's full-disk error
        save(self, *args, **kwargs)
        raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "d/1": [OS error 28: No space left on device]')

    return fake


def _rename_into_place_fails(rename=os.rename):
    def fake(src, dst):
        if ".tmp-" in os.fspath(src):  # the new export into place, after the old moved aside
            _no_space()
        rename(src, dst)

    return fake


@pytest.mark.parametrize("where", ["arrays", "tokenizer", "rename"])
def test_an_export_on_a_full_disk_keeps_the_previous_one(mixed_export, tmp_path, monkeypatch, where):
    out = tmp_path / "export"
    shutil.copytree(mixed_export["dir"], out)
    before = {str(f.relative_to(out)): f.read_bytes() for f in out.rglob("*") if f.is_file()}
    if where == "arrays":
        monkeypatch.setattr(ocp.Checkpointer, "save", _arrays_then_tensorstore_full())
    elif where == "tokenizer":
        monkeypatch.setattr(export_format.shutil, "copyfile", _no_space)
    else:
        monkeypatch.setattr(export_format.os, "rename", _rename_into_place_fails())
    with pytest.raises(storage.WriteError, match=f"cannot write the packed export to {re.escape(str(out))}: "
                       r"no space left on device \(.* MiB free of .* MiB on that filesystem\)") as e:
        _write(mixed_export["model"], out, mixed_export["cfg"], mixed_export["policy"])
    assert e.value.path == out and e.value.free_bytes > 0
    assert listing(tmp_path) == ["export", "tokenizer.model"]  # no temporary left
    assert {str(f.relative_to(out)): f.read_bytes() for f in out.rglob("*") if f.is_file()} == before


@pytest.fixture
def small_filesystem(tmp_path):
    with small_tmpfs(tmp_path / "small", "1m") as folder:
        yield folder


# Orbax's writer threads, left behind by the save that failed, report their own writes'
# errors into a closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_export_to_a_full_filesystem(mixed_export, small_filesystem):
    """On a real filesystem filled up to 8 KiB: tensorstore's own error becomes a
    WriteError naming the export and the free space; the earlier export stays readable,
    nothing temporary is left, and once space is freed the same write succeeds."""
    out = small_filesystem / "export"
    write = lambda: _write(mixed_export["model"], out, mixed_export["cfg"], mixed_export["policy"])
    write()
    before = json.loads((out / "metadata.json").read_text())
    filler = small_filesystem / "filler"
    filler.write_bytes(bytes(shutil.disk_usage(small_filesystem).free - 8192))
    with pytest.raises(storage.WriteError, match=f"cannot write the packed export to {re.escape(str(out))}: "
                       r"no space left on device \(0.0 MiB free of 1.0 MiB on that filesystem\)") as e:
        write()
    assert e.value.free_bytes <= 8192
    assert listing(small_filesystem) == ["export", "filler", "tokenizer.model"]
    assert export_format.read_export(out)[0] == before  # checksums verified
    filler.unlink()
    write()
    assert listing(small_filesystem) == ["export", "tokenizer.model"]
    export_format.read_export(out)


# ------------------------------------------------------------------------ accounting


def test_accounting_and_disk(tmp_path):
    """int4 + 2:4 over the tiny preset (conv kernel 8, and the 9-tap first subsampling
    conv left float, so no N:M group is padded): the compressed layers are exactly 3 bits
    = 9.375 % of fp32 without scales; disk matches the report. (Orbax's per-tensor
    bookkeeping is ~0.5 KB a tensor, so a much smaller model would miss the 5 %.)"""
    cfg = presets.get_preset("tiny")
    cfg.conv_kernel_size = 8
    policy = Policy.from_config([
        {"module_path": "subsample/conv1"},  # keep float
        {"module_path": ".*", "weight_bits": 4, "nm": "2:4"},
    ])
    model = ConformerCTC(cfg, EXPORT_VOCAB, policy=policy, rngs=nnx.Rngs(params=0))
    masks.update_masks(model, 0, force=True)
    report = _write(model, tmp_path / "export", cfg, policy)
    d = tmp_path / "export"
    assert json.loads((d / "size.json").read_text()) == report
    assert report["compressed_layers_ratio_no_scales"] == 0.09375
    assert report["compressed_layers_bits_per_weight_no_scales"] == 3.0
    b = report["bytes"]
    assert report["compressed_layers_ratio"] == (b["values"] + b["indices"] + b["scales"]) / report["compressed_layers_fp32_bytes"]
    assert 0.09375 < report["compressed_layers_ratio"] < 0.105
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert report["fp32_bytes"] == 4 * n_params
    assert report["total_bytes"] == sum(b.values())
    # Honest accounting: the arrays take their own bytes on disk (no compression, no
    # copies) and `du -b` of the directory is within 5 % of the total.
    assert abs(report["arrays_disk_bytes"] / report["arrays_payload_bytes"] - 1) < 0.05
    du = int(subprocess.run(["du", "-b", "-s", str(d)], capture_output=True, text=True, check=True).stdout.split()[0])
    assert abs(du / report["total_bytes"] - 1) < 0.05, (du, report["total_bytes"])
    assert export_format.disk_bytes(d) == du
