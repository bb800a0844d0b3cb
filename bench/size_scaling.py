"""How compressibility grows with model size: the relative WER regression of fine-tuned
(QAT) runs against their own float baseline, for baselines of different sizes.

Each RUN is a finished fine-tuning run directory (a study's ``qat/<name>`` or
``qat_seed<k>/<name>``, or any ``usmqs train --config.init_from=BASELINE`` run); its
baseline is its config's ``init_from``, whose parameter count comes from the baseline's
export (``export/size.json``, which a study's float run writes). Runs of one setting on one
baseline (fine-tuning seeds) are averaged. Prints JSON (one row per baseline and setting,
by parameter count); --markdown also prints a table, --plot draws relative regression
against parameters, one line per setting (test solid, dev dashed).

    .venv/bin/python bench/size_scaling.py runs/w96/qat/mixed@2 runs/full/qat/mixed@2 \\
        runs/w192/qat/mixed@2 [--markdown] [--plot docs/size_scaling.png]
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import statistics
import sys

from usmqs import storage


def _json(path: pathlib.Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path}: missing ({what})") from None


def run_row(run: pathlib.Path) -> dict:
    """One fine-tuning run: its setting, seed, baseline and WERs (fractions)."""
    cfg = _json(run / "config.json", "not a run directory")
    if not cfg.get("init_from"):
        raise SystemExit(f"{run}/config.json: no init_from, so no float baseline to compare with")
    base = pathlib.Path(cfg["init_from"])
    size = _json(base / "export" / "size.json", "the baseline's export, written by a study's float run")
    model = cfg["model"]
    return {
        "name": cfg["policy"]["name"],
        "seed": cfg.get("seed"),
        "baseline": str(base),
        "num_params": size["num_params"],
        "model": {k: model[k] for k in ("num_layers", "model_dim", "ffn_dim", "num_heads")},
        "wer": _json(run / "eval.json", "the run's test evaluation")["wer"],
        "dev_wer": _json(run / "eval_dev.json", "the run's dev evaluation")["wer"],
        "float_wer": _json(base / "eval.json", "the baseline's test evaluation")["wer"],
        "float_dev_wer": _json(base / "eval_dev.json", "the baseline's dev evaluation")["wer"],
    }


def summarize(runs: list[dict]) -> list[dict]:
    """Runs grouped by (baseline, setting): mean WERs over seeds and relative regressions
    (the mean WER over the baseline's, minus 1), ordered by parameters then setting."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["baseline"], r["name"]), []).append(r)
    rows = []
    for (_, name), rs in groups.items():
        first = rs[0]
        wer = statistics.mean(r["wer"] for r in rs)
        dev = statistics.mean(r["dev_wer"] for r in rs)
        rows.append({
            **{k: first[k] for k in ("name", "baseline", "num_params", "model", "float_wer", "float_dev_wer")},
            "seeds": [r["seed"] for r in rs],
            "wer": wer,
            "dev_wer": dev,
            "rel_wer_regression": wer / first["float_wer"] - 1,
            "rel_dev_wer_regression": dev / first["float_dev_wer"] - 1,
        })
    return sorted(rows, key=lambda r: (r["num_params"], r["name"]))


def plot(path: pathlib.Path, rows: list[dict]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, name in enumerate(sorted({r["name"] for r in rows})):
        pts = [r for r in rows if r["name"] == name]
        xs = [r["num_params"] / 1e6 for r in pts]
        color = f"C{i}"
        ax.plot(xs, [100 * r["rel_wer_regression"] for r in pts], "o-", color=color, label=f"{name} QAT, test")
        ax.plot(xs, [100 * r["rel_dev_wer_regression"] for r in pts], "s--", color=color, alpha=0.6,
                label=f"{name} QAT, dev")
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xscale("log")
    sizes = sorted({r["num_params"] / 1e6 for r in rows})
    ax.set_xticks(sizes, [f"{x:.2f}" for x in sizes])
    ax.minorticks_off()
    ax.set_xlabel("parameters of the float baseline (millions, log)")
    ax.set_ylabel("relative WER regression vs. its baseline (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    storage.write_bytes_atomic(path, png.getvalue(), "the size-scaling plot")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=pathlib.Path, help="finished fine-tuning run directories")
    ap.add_argument("--markdown", action="store_true", help="also print a markdown table")
    ap.add_argument("--plot", type=pathlib.Path, help="write the plot (PNG) here")
    args = ap.parse_args(argv)
    rows = summarize([run_row(r) for r in args.runs])
    print(json.dumps(rows, indent=1))
    if args.markdown:
        print("\n| parameters | layers x d (FFN) | setting | seeds | float test / dev WER % "
              "| QAT test / dev WER % | rel. regression test / dev % |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            m = r["model"]
            print(f"| {r['num_params'] / 1e6:.2f} M | {m['num_layers']} x {m['model_dim']} ({m['ffn_dim']}) "
                  f"| {r['name']} | {len(r['seeds'])} | {100 * r['float_wer']:.2f} / {100 * r['float_dev_wer']:.2f} "
                  f"| {100 * r['wer']:.2f} / {100 * r['dev_wer']:.2f} "
                  f"| {100 * r['rel_wer_regression']:+.1f} / {100 * r['rel_dev_wer_regression']:+.1f} |")
    if args.plot:
        plot(args.plot, rows)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
