"""The compression study's outputs, rendered from its runs' records.

    records -> result_rows -> results.json
                           -> write_report -> report.md (table, reading notes, dev table, run costs)
                           -> plot_pareto -> pareto.png
    report.md + pareto.png -> update_readme -> the README's study block

Pure rendering: nothing here trains, decodes or reads a run folder. `usmqs.study` plans
and executes the runs, then calls `write_outputs` after each finished or failed one;
this module sits below it and does not import it.

``records`` maps each finished run to its done.json record (written by
`usmqs.study`); ``failures`` each run that failed (or was not run because a run it
starts from failed) to its failure record, of which the report reads ``error`` (one line:
``"RuntimeError: ..."``). A run is a `study.StudyRun`; what is read of it is `Run`.
The float baseline is the run whose method is "float"; every table needs its record
(without it, report.md lists the failures and the runs' costs only).
"""

from __future__ import annotations

import io
import json
import pathlib
import re
import statistics
from collections.abc import Mapping, Sequence
from typing import Protocol

from usmqs import storage
from usmqs.compress.allocate import MIXED_PREFIX
from usmqs.compress.policy import NAMED_POLICIES, NAMED_PRUNING_DEFAULTS

# The paper's headline: int4 + 2:4 on the 2B USM = 9.4 % of the fp32 size (3 bits per
# weight) at 7.3 % relative WER regression after quantization/sparsity-aware fine-tuning.
PAPER_POINT = {"setting": "int4+2:4", "size_percent": 9.4, "rel_wer_regression_percent": 7.3}

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PARETO_FILE = "pareto.png"
ROW_KEYS = (
    "name", "method", "weight_bits", "sparsity", "bits_per_weight",
    "size_bytes", "size_ratio", "wer", "rel_wer_regression", "dev_wer",
    "wer_seeds", "dev_wer_seeds", "status", "error",
)
METHODS = ("float", "ptq", "qat")  # `study.Method`'s values, in the rows' order
README_BEGIN = "<!-- study:begin (written by `usmqs study --update-readme`; do not edit) -->"
README_END = "<!-- study:end -->"


class Run(Protocol):
    """What the report reads of a run (`study.StudyRun`)."""

    name: str  # the policy NAME
    method: str  # one of METHODS
    seed: int  # which fine-tuning seed (0 for all but the further QAT seeds)

    @property
    def tag(self) -> str: ...  # e.g. "qat int4+2:4 seed1", the run costs' first column


def _baseline(records: Mapping[Run, dict]) -> dict | None:
    """The float baseline's record; None if it has not finished."""
    return next((record for run, record in records.items() if run.method == "float"), None)


# ------------------------------------------------------------------------------ rows


def setting_fields(name: str) -> dict:
    """weight_bits (None = float values) and sparsity ("N:M" or None) of a policy NAME;
    None and None for a mixed@B policy (its groups differ: report.md lists them)."""
    if is_mixed(name):
        return {"weight_bits": None, "sparsity": None}
    bits, nm = NAMED_POLICIES[name]
    return {"weight_bits": bits, "sparsity": None if nm is None else f"{nm[0]}:{nm[1]}"}


def is_mixed(name: str) -> bool:
    """A size-budgeted mixed policy's NAME (``mixed@B``, `allocate.mixed_name`)."""
    return name.startswith(MIXED_PREFIX)


def name_order(name: str) -> tuple:
    """Rows' order of setting NAMEs: the named settings as `NAMED_POLICIES` lists them,
    then the mixed@B policies from the largest budget down."""
    if is_mixed(name):
        return (1, -float(name[len(MIXED_PREFIX):]))
    return (0, list(NAMED_POLICIES).index(name))


def rel_regression(wer: float, float_wer: float) -> float | None:
    """(wer - float_wer) / float_wer; None when the float WER is 0 (undefined)."""
    return (wer - float_wer) / float_wer if float_wer > 0 else None


def result_rows(records: Mapping[Run, dict], failures: Mapping[Run, dict] | None = None) -> list[dict]:
    """results.json rows (DESIGN.md) for the finished and the failed runs: baseline
    first, then the float control, then per setting PTQ and QAT.

    ``bits_per_weight`` is over the compressed layers, values + N:M indices without the
    scales (the paper's accounting: int4 + 2:4 = 3); 32 for a float model.
    ``size_bytes`` is the whole exported model (every compressed and float tensor, their
    scales, container and metadata; the tokenizer left out) and
    ``size_ratio = size_bytes / (4 * parameters)``. ``dev_wer``: the same run on the
    dev split (None without one), for choosing recipes without looking at ``wer``.
    With several fine-tuning seeds (``study.finetune_seeds``) a QAT row stands for all
    of its finished seeds: ``wer`` and ``dev_wer`` are their means (the regression is
    the mean's), ``wer_seeds`` / ``dev_wer_seeds`` the per-seed values in seed order,
    sizes those of its first seed. Other rows have one value in ``wer_seeds``.
    ``status`` is "failed" when a run of the row failed, with ``error`` saying what
    (prefixed by the run's tag when the row has several), else "done" (``error`` None);
    a row none of whose runs finished has None for every measured value. The relative
    regression is None while the baseline has no record.
    """
    failures = failures or {}
    base = _baseline(records)
    float_wer = None if base is None else base["eval"]["wer"]
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in sorted({*records, *failures}, key=lambda r: (name_order(r.name), METHODS.index(r.method), r.seed)):
        groups.setdefault((run.name, str(run.method)), []).append(run)
    rows = []
    for (name, method), runs in groups.items():
        failed = [run for run in runs if run in failures]
        row = {
            "name": name,
            "method": method,
            **setting_fields(name),
            **_measured([records[run] for run in runs if run in records], float_wer),
            "status": "failed" if failed else "done",
            "error": "; ".join(
                failures[run]["error"] if len(runs) == 1 else f"{run.tag}: {failures[run]['error']}" for run in failed
            ) or None,
        }
        rows.append({k: row[k] for k in ROW_KEYS})
    return rows


def _measured(recs: Sequence[dict], float_wer: float | None) -> dict:
    """A row's sizes and WERs from its finished runs' records (`result_rows`); every
    value None when there are none."""
    if not recs:
        keys = ("bits_per_weight", "size_bytes", "size_ratio", "wer", "rel_wer_regression", "dev_wer")
        return {**dict.fromkeys(keys), "wer_seeds": [], "dev_wer_seeds": []}
    first = recs[0]
    bpw = first["size"]["compressed_layers_bits_per_weight_no_scales"]
    wers = [rec["eval"]["wer"] for rec in recs]
    devs = [rec["dev"]["wer"] for rec in recs if rec["dev"]]
    wer = statistics.fmean(wers)
    return {
        "bits_per_weight": 32.0 if bpw is None else bpw,
        "size_bytes": first["size"]["model_bytes"],
        "size_ratio": first["size"]["size_ratio"],
        "wer": wer,
        "rel_wer_regression": None if float_wer is None else rel_regression(wer, float_wer),
        "dev_wer": statistics.fmean(devs) if devs else None,
        "wer_seeds": wers,
        "dev_wer_seeds": devs,
    }


def dev_rows(rows: Sequence[dict]) -> list[dict]:
    """``rows`` with the dev split's WER in ``wer`` and its regression against the
    baseline's dev WER (for :func:`format_table`); [] when the baseline has no dev WER."""
    base = next(r for r in rows if (r["name"], r["method"]) == ("float", "float"))
    if base["dev_wer"] is None:
        return []
    return [
        {
            **r,
            "wer": r["dev_wer"],
            "wer_seeds": r["dev_wer_seeds"],
            "rel_wer_regression": None if r["dev_wer"] is None else rel_regression(r["dev_wer"], base["dev_wer"]),
        }
        for r in rows
    ]


def rel_regression_sd(row: dict, float_wer: float) -> float:
    """Sample sd of a row's relative WER regression, in %, over its fine-tuning seeds
    (0 with one seed or a float WER of 0): the plot's error bars."""
    if len(row["wer_seeds"]) < 2 or float_wer <= 0:
        return 0.0
    return 100 * statistics.stdev(row["wer_seeds"]) / float_wer


# ----------------------------------------------------------------------------- table


def _pct(x: float | None, digits: int = 1, sign: bool = False) -> str:
    if x is None:
        return "—"
    return f"{100 * x:+.{digits}f}" if sign else f"{100 * x:.{digits}f}"


def short_error(error: str, limit: int = 60) -> str:
    """`error` on one line of at most `limit` characters, safe in a Markdown table cell."""
    text = " ".join(error.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _wer_cell(row: dict | None) -> str:
    """A row's WER %; "mean ± sd" over its seeds when it has several; FAILED and a short
    error when none of its runs finished (marked when some of its seeds failed)."""
    if row is None or (row["wer"] is None and row["status"] == "done"):
        return "—"
    if row["wer"] is None:
        return f"FAILED: {short_error(row['error'])}"
    seeds = row["wer_seeds"]
    cell = f"{100 * row['wer']:.2f} ± {100 * statistics.stdev(seeds):.2f}" if len(seeds) > 1 else _pct(row["wer"], 2)
    return cell + (" (a seed FAILED)" if row["status"] == "failed" else "")


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table, one line per setting: bits/weight, size, float/PTQ/QAT WER and the
    relative regressions (QAT of 'float' is the fine-tuned control; with several
    fine-tuning seeds, QAT WER is their mean ± sample sd; a failed run's cell says
    FAILED). Size and bits/weight are the QAT run's, the PTQ run's while the QAT run
    has not finished (or failed)."""
    by = {(r["name"], r["method"]): r for r in rows}
    base = by[("float", "float")]
    names = sorted({r["name"] for r in rows}, key=name_order)
    head = (
        "| setting | bits/weight | size % of fp32 | float WER % | PTQ WER % | QAT WER % "
        "| PTQ rel. regression % | QAT rel. regression % |"
    )
    lines = [head, "|" + "---|" * 8]
    for n in names:
        ptq, qat = by.get((n, "ptq")), by.get((n, "qat"))
        ref = base if n == "float" else next((r for r in (qat, ptq) if r and r["size_ratio"] is not None), None)
        bits = "—" if ref is None or ref["bits_per_weight"] is None else f"{ref['bits_per_weight']:.3g}"
        lines.append(
            f"| {n} | {bits} | {_pct(ref and ref['size_ratio'], 2)} "
            f"| {_pct(base['wer'], 2)} | {_wer_cell(ptq)} | {_wer_cell(qat)} "
            f"| {_pct(ptq and ptq['rel_wer_regression'], 1, True)} "
            f"| {_pct(qat and qat['rel_wer_regression'], 1, True)} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- report


def named_pruning(config) -> dict:
    """The N:M options of the named settings (``config.policy``) that differ from the
    defaults; report.md names them."""
    return {k: config.policy[k] for k, v in NAMED_PRUNING_DEFAULTS.items() if config.policy[k] != v}


def _has_control(rows: Sequence[dict]) -> bool:
    return any((r["name"], r["method"]) == ("float", "qat") for r in rows)


def _export_check(records: Mapping[Run, dict]) -> str:
    """What the study checked of the packed exports (``study.eval_export``): "" when
    nothing, else whether the runs checked decode from their export to the same WER."""
    checked = {run: rec for run, rec in records.items() if rec["export_wer"] is not None}
    if not checked:
        return ""
    n, m = len(checked), len(records)
    differ = [
        f"{run.tag} ({_pct(rec['export_wer'], 2)} % from the export)"
        for run, rec in checked.items()
        if rec["export_wer"] != rec["eval"]["wer"]
    ]
    if differ:
        return f"; decoded from their packed exports ({n} of {m} runs checked), the WER differs for {', '.join(differ)}"
    if n == m:
        return "; decoded from its packed export, every run gives the same WER"
    return f"; decoded from their packed exports, the runs checked ({n} of {m}) give the same WER"


def _status(records: Mapping[Run, dict], failures: Mapping[Run, dict], plan_: Sequence[Run]) -> str:
    """"complete", or "partial: D/N runs finished" (", F failed" when some failed)."""
    done = sum(1 for r in plan_ if r in records)
    if done == len(plan_):
        return "complete"
    failed = sum(1 for r in plan_ if r in failures)
    return f"partial: {done}/{len(plan_)} runs finished" + (f", {failed} failed" if failed else "")


def _header(records: Mapping[Run, dict], config, status: str) -> str:
    """report.md's first paragraph: status, model, what each method ran, how WER was measured."""
    s = config.study
    base = _baseline(records)
    # The study.finetune keys that are set: what the QAT runs change in config.train.
    recipe = [f"train.{k}={v}" for k, v in s.finetune.items() if v is not None]
    return (
        f"Status: {status}. Model: {base['size']['num_params']:,} parameters "
        f"({base['size']['fp32_bytes']:,} bytes as fp32). Float baseline: "
        f"{config.train.num_steps} steps; PTQ: 0 steps from the baseline; QAT: "
        f"{s.finetune_steps} steps from the baseline with "
        + (", ".join(recipe) or "the float recipe")
        + "".join(f", policy.{k}={v}" for k, v in named_pruning(config).items())
        + ("; every PTQ and QAT run with learned quantization ranges (study.learned_scale: LSQ, "
           "PTQ at the clip-searched ranges)" if s.get("learned_scale") else "")
        + (
            f"; {s.finetune_seeds} fine-tuning seeds each (seed {config.seed} ... "
            f"{config.seed + s.finetune_seeds - 1}): QAT WER is their mean ± sample sd"
            if s.finetune_seeds > 1 else ""
        )
        + ". WER from the fake-quant evaluation of each run's final checkpoint "
        f"({config.eval.decoder} decoding{_export_check(records)})."
    )


def _reading_notes(rows: Sequence[dict], records: Mapping[Run, dict]) -> str:
    by = {(r["name"], r["method"]): r for r in rows}
    base_rec = _baseline(records)
    num_words = base_rec["eval"]["num_words"]
    params = base_rec["size"]["num_params"]
    p = PAPER_POINT
    text = [
        f"**Against the paper.** USM-Lite (Ding et al., ICASSP 2024) compresses a 2B-parameter "
        f"USM encoder; its headline is {p['setting']}: two int4 values and two 2-bit indices per "
        f"group of 4 weights = 3 bits per weight = **{p['size_percent']} % of the fp32 size at "
        f"{p['rel_wer_regression_percent']} % relative WER regression** after quantization- and "
        "sparsity-aware fine-tuning (the ★ in pareto.png). int2 alone and 1:4 alone did not recover.",
    ]
    qat, ptq = by.get((p["setting"], "qat")), by.get((p["setting"], "ptq"))
    if qat is not None and qat["rel_wer_regression"] is not None:
        without = ""
        if ptq is not None and ptq["rel_wer_regression"] is not None:
            without = f" ({_pct(ptq['rel_wer_regression'], 1, True)} % without fine-tuning)"
        text.append(
            f"Here, {p['setting']} after fine-tuning is {_pct(qat['size_ratio'], 1)} % of fp32 at "
            f"{_pct(qat['rel_wer_regression'], 1, True)} % relative regression{without}."
        )
    control = (
        " Compare each QAT row with the float "
        "control (QAT of float: the same fine-tuning without compression) rather than with "
        "the baseline alone: the control shows what the extra steps by themselves do; a "
        "setting has recovered when its regression is near the control's."
    )
    text.append(
        f"Read it with three differences in mind. (1) Model size: {params:,} parameters, "
        "not 2B; a small model has little redundancy, so every setting costs more WER than "
        "on USM and the ranking of settings, not the absolute numbers, is what carries over. "
        "(2) Size here is the whole exported model: per-channel float32 scales, the float "
        "norms and biases and the container are counted, so size % sits above "
        "bits/weight ÷ 32 (the paper's accounting, the bits/weight column); the narrower the "
        "layers, the larger the scales' share. (3) Noise: the eval set has "
        f"{num_words} words, so one word is {100 / max(num_words, 1):.2f} % absolute WER; "
        "differences of a few words are not findings."
        + (control if _has_control(rows) else "")
    )
    return "\n\n".join(text)


def _dev_section(rows: Sequence[dict]) -> list[str]:
    dev = dev_rows(rows)
    if not dev:
        return []
    return [
        "## The dev split",
        "",
        "The same runs decoded on the dev split: choose fine-tuning recipes (learning rate, "
        "schedule, distillation, mask updates) here, and read the table above only for the "
        "chosen one, so that the reported WER is not tuned on the set it is measured on.",
        "",
        format_table(dev),
        "",
    ]


def _mixed_section(rows: Sequence[dict], allocations: Mapping[str, dict]) -> list[str]:
    """report.md's mixed-precision policies: per mixed@B, the budget, what the allocation
    spends (scales counted, as the budget) and what its export measured (the table's
    accounting, scales excluded), and each group's candidate."""
    names = sorted({r["name"] for r in rows if is_mixed(r["name"]) and r["name"] in allocations}, key=name_order)
    if not names:
        return []
    estimate = {
        "ptq": "probed loss increase (PTQ of that group alone, dev split)",
        "fisher": "Fisher estimate of the loss increase (½ Σ F (W − W_eff)², F the empirical Fisher "
                  "diagonal on the dev split)",
    }[allocations[names[0]].get("sensitivity_method", "ptq")]
    md = ["## Mixed precision under a size budget", "",
          f"Each mixed@B policy is the choice per layer group, among the candidates, that minimizes "
          f"the float baseline's {estimate} within B "
          "bits per weight of the compressed layers, values + N:M indices + scales "
          "(`usmqs.sensitivity`, `usmqs.compress.allocate`: an exact search)."
          + (" An 'a' after the bits (int2a) marks asymmetric values: levels from the minimum to "
             "the maximum with a zero point per scale, counted in the bytes."
             if any(re.match(r"int\d+a", v["candidate"]) for n in names for v in allocations[n]["groups"].values())
             else ""), ""]
    for name in names:
        a = allocations[name]
        measured = [r for r in rows if r["name"] == name and r["bits_per_weight"] is not None]
        export = (f"; its export: {measured[-1]['bits_per_weight']:.3f} bits/weight without scales, "
                  f"{100 * measured[-1]['size_ratio']:.2f} % of fp32") if measured else ""
        md += [f"### {name}", "",
               f"Budget {a['budget_bits_per_weight']:.3f} bits/weight; allocated {a['bits_per_weight']:.3f} "
               f"({a['bits_per_weight_no_scales']:.3f} without scales), predicted loss increase "
               f"{a['predicted_sensitivity']:.4g}{export}.", "",
               "| group | setting | weights | bytes | estimated loss increase |", "|---|---|---|---|---|"]
        md += [f"| {g} | {v['candidate']} | {v['num_weights']:,} | {v['bytes']:,} | {v['sensitivity']:.4g} |"
               for g, v in a["groups"].items()]
        md.append("")
    return md


def _failures_section(failures: Mapping[Run, dict], plan_: Sequence[Run]) -> list[str]:
    """The failed runs of `plan_` and what each failed with ([] when none failed)."""
    failed = [run for run in plan_ if run in failures]
    if not failed:
        return []
    return [
        "## Failed runs",
        "",
        "Each run's failed.json, in its run folder, holds the whole error and the end of its "
        "traceback. Rerunning the study retries these runs and keeps the finished ones.",
        "",
        "| run | error |",
        "|---|---|",
        *(f"| {run.tag} | {short_error(failures[run]['error'], 300)} |" for run in failed),
        "",
    ]


def _cost_table(records: Mapping[Run, dict], failures: Mapping[Run, dict], plan_: Sequence[Run]) -> str:
    lines = [
        "| run | steps | train+eval s | export s | compile s (all) | train_step compile s | cache hits/misses |",
        "|" + "---|" * 7,
    ]
    for run in plan_:
        rec = records.get(run)
        if rec is None:
            lines.append(f"| {run.tag} | {'FAILED' if run in failures else 'pending'} | | | | | |")
            continue
        t = rec["timing"]
        c = t["compile"]
        lines.append(
            f"| {run.tag} | {t['steps']} | {t['train_eval_seconds']:.1f} | {t['export_seconds']:.1f} "
            f"| {c['total_seconds']:.1f} | {c['train_step_seconds']:.1f} "
            f"| {c['cache_hits']}/{c['cache_misses']} |"
        )
    return "\n".join(lines)


def write_report(
    path, rows: Sequence[dict], records: Mapping[Run, dict], config, plan_: Sequence[Run],
    failures: Mapping[Run, dict] | None = None, allocations: Mapping[str, dict] | None = None,
) -> None:
    """report.md: the table, how to read it against the paper, the dev split's table
    (when the runs decoded one), the failed runs and their errors, what each run of
    `plan_` cost (or that it failed or is pending). Without the baseline's record, the
    status, the failures and the costs only."""
    failures = failures or {}
    status = _status(records, failures, plan_)
    if _baseline(records) is None:
        body = [f"Status: {status}. No table: the float baseline, which every other run starts from, failed.", ""]
    else:
        body = _results(rows, records, config, status) + _mixed_section(rows, allocations or {})
    md = [
        "# Compression study",
        "",
        *body,
        *_failures_section(failures, plan_),
        "## Run costs",
        "",
        "Compile seconds: JAX tracing + lowering + XLA compilation (or loading from the "
        "persistent compilation cache) while the run trained, evaluated and exported; "
        "for a resumed run, in the session that finished it.",
        "",
        _cost_table(records, failures, plan_),
        "",
    ]
    storage.write_text_atomic(path, "\n".join(md), "the study report")


def _results(rows: Sequence[dict], records: Mapping[Run, dict], config, status: str) -> list[str]:
    """report.md's results, from its header to the dev split's table."""
    return [
        _header(records, config, status),
        "",
        format_table(rows),
        "",
        "bits/weight: values + N:M indices over the compressed layers, scales excluded "
        "(32 = float). size % of fp32: the whole exported model (export/size.json of the "
        "QAT run; results.json has each run's own). "
        "Relative regression: (WER − float WER) / float WER."
        + (
            " QAT of `float` is the float "
            "control: the baseline fine-tuned with the QAT recipe and budget, uncompressed."
            if _has_control(rows) else ""
        ),
        "",
        "![pareto](pareto.png)",
        "",
        _reading_notes(rows, records),
        "",
        *_dev_section(rows),
    ]


# ------------------------------------------------------------------------------ plot


def plot_pareto(path, rows: Sequence[dict]) -> None:
    """pareto.png: x = size % of fp32 (log), y = relative WER regression % (symlog when
    a point is beyond ±100 %), the float baseline, PTQ and QAT series with a label per
    point (QAT error bars: ± sd over fine-tuning seeds), the paper's point marked. Rows
    without a finished run (failed) have no point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    p = PAPER_POINT
    ys_all = [p["rel_wer_regression_percent"], 0.0]
    rows = [r for r in rows if r["wer"] is not None]
    base = [r for r in rows if r["method"] == "float"]
    if base:
        ax.scatter([100 * base[0]["size_ratio"]], [0.0], marker="D", color="black",
                   label="float baseline", zorder=3)
    float_wer = base[0]["wer"] if base else 0.0
    series = (
        ("ptq", False, "o", "tab:orange", "PTQ (no fine-tuning)"),
        ("qat", False, "s", "tab:blue", "QAT (fine-tuned; float = control)"),
        ("ptq", True, "^", "tab:olive", "mixed@B PTQ (B: budget, bits/weight)"),
        ("qat", True, "^-", "tab:green", "mixed@B QAT: the budget frontier"),
    )
    for method, mixed, marker, color, label in series:
        pts = sorted(
            (100 * r["size_ratio"], 100 * r["rel_wer_regression"], r["name"], rel_regression_sd(r, float_wer))
            for r in rows
            if r["method"] == method and is_mixed(r["name"]) == mixed and r["rel_wer_regression"] is not None
        )
        if not pts:
            continue
        xs, ys, _, sds = zip(*pts)
        ys_all += ys
        if any(sds):
            label += "\n(bars: ± sd over fine-tuning seeds)"
        ax.errorbar(xs, ys, yerr=sds, fmt=marker, color=color, label=label, zorder=3, capsize=3)
        for x, y, n, _ in pts:
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, 3), fontsize=8, color=color)
    ax.scatter(
        [p["size_percent"]], [p["rel_wer_regression_percent"]], marker="*", s=220,
        color="tab:red", zorder=4,
        label=f"USM-Lite 2B, {p['setting']} QAT\n({p['size_percent']} % of fp32, +{p['rel_wer_regression_percent']} %)",
    )
    _pareto_axes(ax, [100 * r["size_ratio"] for r in rows] + [p["size_percent"]], ys_all)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    storage.write_bytes_atomic(path, png.getvalue(), "the pareto plot")


def _pareto_axes(ax, xs: Sequence[float], ys: Sequence[float]) -> None:
    """Scales, limits, labels and legend of the pareto plot for points at `xs`, `ys` (%)."""
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xscale("log")
    ticks = [5, 10, 25, 50, 100]
    ax.set_xticks(ticks, [f"{t}" for t in ticks])
    ax.set_xlim(min(4.0, 0.8 * min(xs)), max(150.0, 1.3 * max(xs)))
    lo, hi = min(ys), max(ys)
    if max(abs(lo), abs(hi)) > 100:
        # int2 PTQ can be +1000 %: symlog keeps the points near 0 readable.
        ax.set_yscale("symlog", linthresh=20)
        ax.set_ylim(min(lo * 1.5, -10), hi * 2)
    else:
        pad = 0.08 * (hi - lo) + 1
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("size, % of fp32 (whole exported model)")
    ax.set_ylabel("relative WER regression, %")
    ax.set_title("Compression study: WER regression vs model size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


# ----------------------------------------------------------------------------- files


def write_outputs(
    workdir, records: Mapping[Run, dict], config, plan_: Sequence[Run], failures: Mapping[Run, dict] | None = None,
    allocations: Mapping[str, dict] | None = None,
) -> list[dict]:
    """results.json, report.md and pareto.png in `workdir` from the finished and the
    failed runs' records (`plan_`: every run of the study, finished or not; `allocations`:
    the mixed@B policies' `Allocation.to_data()` by NAME), each replaced atomically (a
    full disk: `storage.WriteError` naming the file); returns the rows."""
    workdir = pathlib.Path(workdir)
    rows = result_rows(records, failures)
    storage.write_text_atomic(workdir / RESULTS_FILE, json.dumps(rows, indent=2) + "\n", "the study results")
    write_report(workdir / REPORT_FILE, rows, records, config, plan_, failures, allocations)
    plot_pareto(workdir / PARETO_FILE, rows)
    return rows


def update_readme(readme, workdir) -> pathlib.Path:
    """Put a complete study's table and plot into `readme` between the study markers.

    The plot is copied to ``docs/<workdir name>_pareto.png`` next to `readme`; the table
    and the reading notes are report.md's. Raises ValueError if the study is partial or
    the README has no markers (nothing is written then); each file is replaced atomically
    (a full disk: `storage.WriteError` naming the file).
    """
    readme, workdir = pathlib.Path(readme), pathlib.Path(workdir)
    report = (workdir / REPORT_FILE).read_text()
    if "Status: complete." not in report:
        raise ValueError(f"{workdir / REPORT_FILE} is not a complete study: README left as it is")
    text = readme.read_text()
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise ValueError(f"{readme}: needs exactly one {README_BEGIN!r} ... {README_END!r} block")
    image = readme.parent / "docs" / f"{workdir.name}_pareto.png"
    with storage.writing(image.parent, "the README's images"):
        image.parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes_atomic(image, (workdir / PARETO_FILE).read_bytes(), "the README's plot")
    body = report.split("\n", 1)[1].strip()  # without the "# Compression study" title
    body = body.replace("![pareto](pareto.png)", f"![pareto]({image.relative_to(readme.parent)})")
    body = body.replace("\n## ", "\n#### ")  # report sections, below the README's own
    head, rest = text.split(README_BEGIN)
    _, tail = rest.split(README_END)
    storage.write_text_atomic(readme, f"{head}{README_BEGIN}\n{body}\n{README_END}{tail}", "the README")
    return image
