"""What narrower scales would buy a mixed policy: the allocation within each budget when
every scale costs 32 bits (the export's float32 scales, today) and when it costs 16
(float16 scales, not implemented), on a finished study baseline's cached sensitivity
table (`usmqs.sensitivity`; computed once and cached in WORKDIR/float/mixed/ when
missing).

Sizes only, no training: the predicted damage (the sum of the groups' estimates) of the
two allocations says whether the bits the scales would give back buy a better setting for
some group at that budget. The estimates were measured with float32 scales; rounding a
scale to float16 moves it by at most 2^-11 of itself, which this ignores.

    .venv/bin/python bench/scale_bits.py --study runs/full --budgets 3.0 2.0 1.5
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import pathlib
import sys

from usmqs import config as config_lib
from usmqs import run, sensitivity
from usmqs.compress import allocate

SCALE_BITS = (32, 16)


def with_scale_bits(sizes: allocate.SizeTable, bits: int) -> allocate.SizeTable:
    """`sizes` with every ``scales`` bucket re-costed at `bits` per scale (stored: 32)."""
    buckets = {
        g: {c: {b: (n * bits // 32 if b == "scales" else n) for b, n in bk.items()} for c, bk in cands.items()}
        for g, cands in sizes.buckets.items()
    }
    return dataclasses.replace(sizes, buckets=buckets)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", required=True, type=pathlib.Path, help="a finished study's workdir")
    ap.add_argument("--budgets", type=float, nargs="+", default=[3.0, 2.0, 1.5], help="bits per weight")
    ap.add_argument("--method", choices=sensitivity.METHODS, default="ptq", help="the sensitivity estimate")
    ap.add_argument("--num-batches", type=int, default=4, help="dev batches of the estimate")
    args = ap.parse_args(argv)
    baseline = args.study / "float"
    config = config_lib.load_saved(baseline)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON alone
        table = sensitivity.sensitivity_table(config, baseline, num_batches=args.num_batches, method=args.method)
    sizes = sensitivity.model_sizes(config, run.load_tokenizer(baseline).vocab_size,
                                    allocate.DEFAULT_GROUPS, allocate.DEFAULT_CANDIDATES)
    rows = []
    for budget in args.budgets:
        for bits in SCALE_BITS:
            a = allocate.allocate(with_scale_bits(sizes, bits), table["increase"], bits_per_weight=budget)
            rows.append({
                "budget": budget, "scale_bits": bits, "bits_per_weight": round(a.bits_per_weight, 4),
                "predicted_damage": round(a.predicted_sensitivity, 4),
                "groups": {g: c.name for g, c in a.assignment.items()},
            })
    result = {"study": str(args.study), "method": args.method, "table": table["path"], "allocations": rows}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
