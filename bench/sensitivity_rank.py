"""Which sensitivity estimate predicts a study's fine-tuned (QAT) outcomes better: the PTQ
probe or the Fisher estimate (`usmqs.sensitivity`, methods "ptq" and "fisher").

For every compressed setting of a finished study (the uniform ones and the mixed@B
allocations), the predicted damage is the sum over layer groups of the estimate for that
group's setting, both tables taken on the study's float baseline (computed once, cached
in WORKDIR/float/mixed/). Prints JSON: per method, Spearman's rank correlation of the
predicted damage with the QAT dev and test WERs (mean over the fine-tuning seeds) and
with the PTQ dev WER; with --markdown also a table of the settings.

    .venv/bin/python bench/sensitivity_rank.py --study runs/full [--markdown]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from scipy import stats

from usmqs import config as config_lib
from usmqs import sensitivity, study_report
from usmqs.compress.allocate import DEFAULT_GROUPS

OUTCOMES = {"qat_dev": ("qat", "dev_wer"), "qat_test": ("qat", "wer"), "ptq_dev": ("ptq", "dev_wer")}


def group_settings(workdir: pathlib.Path, name: str) -> dict[str, str]:
    """Layer group -> the setting name it gets in the study row `name`."""
    if study_report.is_mixed(name):
        allocation = json.loads((workdir / "float" / sensitivity.MIXED_DIR / f"{name}.json").read_text())
        return {g: v["candidate"] for g, v in allocation["groups"].items()}
    return {g.name: name for g in DEFAULT_GROUPS}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", required=True, type=pathlib.Path, help="a finished study's workdir")
    ap.add_argument("--num-batches", type=int, default=4, help="dev batches of both estimates")
    ap.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = ap.parse_args(argv)
    baseline = args.study / "float"
    config = config_lib.load_saved(baseline)
    tables = {m: sensitivity.sensitivity_table(config, baseline, num_batches=args.num_batches, method=m)
              for m in sensitivity.METHODS}
    rows = json.loads((args.study / study_report.RESULTS_FILE).read_text())
    by = {(r["name"], r["method"]): r for r in rows if r["status"] == "done"}
    names = [n for n, m in by if m == "qat" and n != "float" and (n, "ptq") in by]
    settings = []
    for name in names:
        groups = group_settings(args.study, name)
        entry = {"name": name, "bits_per_weight": by[name, "qat"]["bits_per_weight"]}
        for method, table in tables.items():
            entry[f"predicted_{method}"] = sum(table["increase"][g][c] for g, c in groups.items())
        for key, (method, field) in OUTCOMES.items():
            entry[key] = by[name, method][field]
        settings.append(entry)
    result = {"study": str(args.study), "settings": settings, "n": len(settings), "spearman": {}}
    for method in tables:
        result["spearman"][method] = {
            key: float(stats.spearmanr([s[f"predicted_{method}"] for s in settings], [s[key] for s in settings])[0])
            for key in OUTCOMES
        }
    print(json.dumps(result, indent=1))
    if args.markdown:
        print("\n| setting | bits/weight | PTQ-probe damage | Fisher damage | PTQ dev WER % | QAT dev WER % | QAT test WER % |")
        print("|---|---|---|---|---|---|---|")
        for s in sorted(settings, key=lambda s: s["qat_dev"]):
            print(f"| {s['name']} | {s['bits_per_weight']:.2f} | {s['predicted_ptq']:.4g} | {s['predicted_fisher']:.4g} "
                  f"| {100 * s['ptq_dev']:.2f} | {100 * s['qat_dev']:.2f} | {100 * s['qat_test']:.2f} |")
        print("\n| Spearman ρ with | " + " | ".join(OUTCOMES) + " |\n|---|" + "---|" * len(OUTCOMES))
        for method, rho in result["spearman"].items():
            print(f"| {method} | " + " | ".join(f"{rho[k]:+.2f}" for k in OUTCOMES) + " |")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
