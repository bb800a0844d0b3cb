"""bench/size_scaling.py: runs grouped by baseline and setting, seeds averaged, regressions
against each run's own baseline, clear errors for what is missing."""

import importlib.util
import json
import pathlib

import pytest

BENCH = pathlib.Path(__file__).parents[1] / "bench" / "size_scaling.py"


@pytest.fixture(scope="module")
def size_scaling():
    spec = importlib.util.spec_from_file_location("size_scaling", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _baseline(root, name, params, wer, dev):
    base = root / name
    _write(base / "export" / "size.json", {"num_params": params})
    _write(base / "eval.json", {"wer": wer})
    _write(base / "eval_dev.json", {"wer": dev})
    return base


def _run(root, name, base, setting, seed, dim, wer, dev):
    run = root / name
    model = {"num_layers": 4, "model_dim": dim, "ffn_dim": 4 * dim, "num_heads": 4, "dropout": 0.0}
    _write(run / "config.json", {"init_from": str(base), "seed": seed, "policy": {"name": setting}, "model": model})
    _write(run / "eval.json", {"wer": wer})
    _write(run / "eval_dev.json", {"wer": dev})
    return run


def test_runs_are_grouped_averaged_and_ordered_by_size(size_scaling, tmp_path, capsys):
    big = _baseline(tmp_path, "big", 4_000_000, 0.10, 0.08)
    small = _baseline(tmp_path, "small", 1_000_000, 0.20, 0.16)
    runs = [
        _run(tmp_path, "b0", big, "mixed@2", 0, 192, 0.11, 0.10),
        _run(tmp_path, "b1", big, "mixed@2", 1, 192, 0.13, 0.10),
        _run(tmp_path, "s0", small, "mixed@2", 0, 96, 0.30, 0.24),
        _run(tmp_path, "s1", small, "int2+2:4", 0, 96, 0.40, 0.32),
    ]
    plot = tmp_path / "plot.png"
    rows = size_scaling.main([str(r) for r in runs] + ["--markdown", "--plot", str(plot)])
    assert [(r["num_params"], r["name"], r["seeds"]) for r in rows] == [
        (1_000_000, "int2+2:4", [0]), (1_000_000, "mixed@2", [0]), (4_000_000, "mixed@2", [0, 1]),
    ]
    big_row = rows[2]
    assert big_row["wer"] == pytest.approx(0.12) and big_row["dev_wer"] == pytest.approx(0.10)
    assert big_row["rel_wer_regression"] == pytest.approx(0.2)
    assert big_row["rel_dev_wer_regression"] == pytest.approx(0.25)
    assert rows[0]["rel_wer_regression"] == pytest.approx(1.0)
    out = capsys.readouterr().out
    assert json.loads(out[: out.index("\n|")]) == rows
    assert "| 4.00 M | 4 x 192 (768) | mixed@2 | 2 | 10.00 / 8.00 | 12.00 / 10.00 | +20.0 / +25.0 |" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_pieces_are_named(size_scaling, tmp_path):
    base = _baseline(tmp_path, "base", 1000, 0.2, 0.1)
    run = _run(tmp_path, "run", base, "int4", 0, 96, 0.3, 0.2)
    (base / "export" / "size.json").unlink()
    with pytest.raises(SystemExit, match=r"base/export/size.json: missing \(the baseline's export"):
        size_scaling.main([str(run)])
    cfg = json.loads((run / "config.json").read_text())
    _write(run / "config.json", {**cfg, "init_from": None})
    with pytest.raises(SystemExit, match=r"run/config.json: no init_from"):
        size_scaling.main([str(run)])
    with pytest.raises(SystemExit, match=r"nowhere/config.json: missing \(not a run directory\)"):
        size_scaling.main([str(tmp_path / "nowhere")])
