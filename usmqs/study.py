"""The compression study: one float baseline -> PTQ and QAT of every setting -> report.

    usmqs study --config configs/study_demo.py --workdir runs/demo

`run_study(config, workdir)` trains (or reuses) the float baseline, then, from that same
float checkpoint, for every setting NAME of ``config.study.settings`` (the `Policy.named`
shorthands):

* post-training compression (PTQ): ``init_from`` the baseline, 0 steps -- masks are
  computed from the loaded weights at step 0 -- evaluate;
* compression-aware fine-tuning (QAT): ``init_from`` the baseline,
  ``study.finetune_steps`` steps of the fine-tuning recipe (``config.train`` with the
  ``study.finetune`` keys replaced: lower peak LR, short warmup), evaluate;

plus a float control fine-tuned with the same recipe and budget, which separates what
the extra steps alone buy from what compression costs. Every run is exported
(`export.export_workdir`): sizes come from its ``export/size.json``. Layout::

    WORKDIR/
      float/              the baseline (``config.train`` recipe, float policy)
      ptq/<NAME>/         one run dir per setting: checkpoints, eval.json, export/, done.json
      qat/<NAME>/         ... and qat/float/, the fine-tuned float control
      qat_seed<k>/<NAME>/ the same fine-tunes with seed k (``study.finetune_seeds`` > 1)
      data_cache/         prepared features, shared by every run (unless data.cache_dir)
      results.json        rows (DESIGN.md): name, method, weight_bits, sparsity,
                          bits_per_weight, size_bytes, size_ratio, wer, rel_wer_regression;
                          and dev_wer, wer_seeds, dev_wer_seeds (`result_rows`)
      report.md           the table, how to read it against the paper, run costs
      pareto.png          relative WER regression vs size, PTQ and QAT, the paper's point

Resumable: ``<run dir>/done.json`` is written atomically after a run's evaluation and
export; a rerun skips runs that have it (and fails loudly if that run's config has
changed since) and resumes a half-finished one from its latest checkpoint (the training
loop resumes by itself). results.json, report.md and pareto.png are rewritten after
every finished run, so a partial study already has a partial report.

Compile time: every PTQ/QAT run and the float control build their policy with runtime
values (``study.runtime_settings``, `Policy.named(..., runtime=True)`): bits and N:M are
state of the layers, not constants of the program, so all of them lower to the same
train-step and eval-step programs. The JAX persistent compilation cache, on for the
whole study (``study.compile_cache_dir``), then compiles each program once and loads it
for every later run (and for a resumed or repeated study). Each run
records the seconds JAX spent tracing, lowering and compiling (per jitted function) and
its cache hits in done.json; report.md lists them.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import enum
import json
import os
import pathlib
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence

import ml_collections

from usmqs.compress.policy import NAMED_POLICIES
from usmqs.config import NAMED_PRUNING_DEFAULTS

# The ten settings of USM-Lite's study (Ding et al., ICASSP 2024), in the order of its table.
PAPER_SETTINGS = (
    "int8", "int4", "int2", "2:4", "1:4",
    "int8+2:4", "int4+2:4", "int2+2:4", "int8+1:4", "int4+1:4",
)
# The paper's headline: int4 + 2:4 on the 2B USM = 9.4 % of the fp32 size (3 bits per
# weight) at 7.3 % relative WER regression after quantization/sparsity-aware fine-tuning.
PAPER_POINT = {"setting": "int4+2:4", "size_percent": 9.4, "rel_wer_regression_percent": 7.3}

DONE_FILE = "done.json"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PARETO_FILE = "pareto.png"
RUN_CONFIG_FILE = "run_config.txt"  # what `usmqs evaluate/export --workdir` rebuild from
ROW_KEYS = (
    "name", "method", "weight_bits", "sparsity", "bits_per_weight",
    "size_bytes", "size_ratio", "wer", "rel_wer_regression", "dev_wer",
    "wer_seeds", "dev_wer_seeds",
)
EVAL_KEYS = ("wer", "cer", "num_utterances", "num_words", "step")


class Method(enum.StrEnum):
    FLOAT = "float"  # the float baseline, trained from scratch with config.train
    PTQ = "ptq"  # the baseline compressed after training, no further steps
    QAT = "qat"  # the baseline fine-tuned under compression (float: the control)


class StudyError(RuntimeError):
    """A study that cannot go on as configured (changed config of a finished run, ...)."""


def default_study_config() -> ml_collections.ConfigDict:
    """The ``config.study`` block every study config starts from."""
    return ml_collections.ConfigDict(
        dict(
            # Policy NAMEs (`Policy.named`) to compress the baseline with; 'float' is not
            # one of them: the baseline and the float control always run.
            settings=PAPER_SETTINGS,
            # Fine-tuning budget of every QAT run and of the float control.
            finetune_steps=250,
            # The fine-tuning recipe of the QAT runs: each key replaces config.train's;
            # None keeps the float recipe's value.
            finetune=ml_collections.ConfigDict(
                dict(
                    learning_rate=None,  # peak LR: a fraction of the float baseline's
                    warmup_steps=None,  # short: the weights are already trained
                    end_lr_ratio=None,
                    weight_decay=None,
                    grad_clip=None,
                    distill_weight=None,  # > 0: distil from the baseline (train.py)
                    distill_temperature=None,
                    log_every=None,
                    checkpoint_every=None,
                )
            ),
            # Fine-tune the float baseline with the same recipe and budget (qat/float).
            float_control=True,
            # Fine-tunes per setting (and control), with seeds config.seed + 0 ... k-1
            # (data order, SpecAugment, dropout): the table shows their mean ± sd. Seed
            # k > 0 runs in qat_seed<k>/<NAME>.
            finetune_seeds=1,
            # Also decode every run from its packed export and check it gives the same WER.
            eval_export=False,
            # PTQ/QAT runs (and the float control) compile bits and N:M as runtime values
            # (`policy.runtime`): one train-step and one eval-step program for all of them.
            runtime_settings=True,
            # JAX persistent compilation cache; '' = WORKDIR/.jax_cache.
            compile_cache=True,
            compile_cache_dir="~/.cache/usmqs/jax",
        )
    )


# ------------------------------------------------------------------------------ plan


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One training/evaluation run of the study."""

    method: Method
    name: str  # the policy NAME (DESIGN.md), also results.json's `name`
    seed: int = 0  # QAT only: which fine-tuning seed (config.seed + seed)

    @property
    def subdir(self) -> str:
        if self.method is Method.FLOAT:
            return "float"
        return f"{self.method}{f'_seed{self.seed}' if self.seed else ''}/{self.name}"

    @property
    def tag(self) -> str:
        return f"{self.method} {self.name}{f' seed{self.seed}' if self.seed else ''}"


BASELINE = StudyRun(Method.FLOAT, "float")


def validate_study_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError on a study config that cannot run (called by `run_study`)."""
    if "study" not in config:
        raise ValueError("config has no `study` block: start it from study.default_study_config()")
    s = config.study
    settings = tuple(s.settings)
    unknown = [n for n in settings if n not in NAMED_POLICIES]
    if unknown:
        raise ValueError(
            f"study.settings: unknown policy names {unknown}; known: {' '.join(NAMED_POLICIES)}"
        )
    if "float" in settings:
        raise ValueError("study.settings: 'float' always runs (baseline + control); leave it out")
    if len(set(settings)) != len(settings):
        raise ValueError(f"study.settings has duplicates: {settings}")
    if not isinstance(s.finetune_steps, int) or s.finetune_steps < 1:
        raise ValueError(f"study.finetune_steps must be a positive int, got {s.finetune_steps!r}")
    seeds = s.get("finetune_seeds", 1)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"study.finetune_seeds must be a positive int, got {seeds!r}")
    bad = [k for k in s.finetune if k not in config.train or k == "num_steps"]
    if bad:
        raise ValueError(
            f"study.finetune: {bad} are not config.train keys (num_steps is study.finetune_steps)"
        )
    if config.policy.rules:
        raise ValueError("the study compresses with named policies: leave policy.rules empty")


def plan(config: ml_collections.ConfigDict) -> list[StudyRun]:
    """The runs in execution order: baseline, every PTQ (cheap: a first picture early),
    the float control, every QAT; then the control and every QAT again per further
    fine-tuning seed (a complete single-seed table comes first)."""
    settings = tuple(config.study.settings)
    runs = [BASELINE]
    runs += [StudyRun(Method.PTQ, n) for n in settings]
    for seed in range(config.study.get("finetune_seeds", 1)):
        if config.study.float_control:
            runs.append(StudyRun(Method.QAT, "float", seed))
        runs += [StudyRun(Method.QAT, n, seed) for n in settings]
    return runs


def _fmt(value) -> str:
    return value if isinstance(value, str) else repr(value)


def run_overrides(config, run: StudyRun, workdir: pathlib.Path) -> list[str]:
    """The ``--config.`` overrides that turn the study config into `run`'s config."""
    o = [f"policy.name={run.name}", "eval.at_end=True"]
    if not config.data.cache_dir:
        o.append(f"data.cache_dir={workdir / 'data_cache'}")
    if run.method is not Method.FLOAT:
        o.append(f"init_from={workdir / BASELINE.subdir}")
        o.append(f"policy.runtime={bool(config.study.runtime_settings)}")
    if run.method is Method.PTQ:
        o.append("train.num_steps=0")
    elif run.method is Method.QAT:
        o.append(f"train.num_steps={config.study.finetune_steps}")
        if run.seed:
            o.append(f"seed={config.seed + run.seed}")
        o += [f"train.{k}={_fmt(v)}" for k, v in finetune_recipe(config).items()]
    return o


def _named_pruning(config) -> dict:
    """The N:M options of the named settings that differ from the defaults."""
    return {k: config.policy[k] for k, v in NAMED_PRUNING_DEFAULTS.items() if config.policy.get(k, v) != v}


def finetune_recipe(config) -> dict:
    """The config.train values the QAT runs change (study.finetune keys that are set)."""
    return {k: v for k, v in config.study.finetune.items() if v is not None}


def run_config(config, run: StudyRun, workdir, *, label: str = "") -> ml_collections.ConfigDict:
    """`run`'s config: a copy of the study config with `run_overrides` (and `label`) applied."""
    from usmqs import config as config_lib

    cfg = copy.deepcopy(config)
    config_lib.apply_overrides(cfg, run_overrides(config, run, pathlib.Path(workdir).absolute()))
    cfg.label = label or run.tag
    return cfg


def _flat(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def run_identity(cfg: ml_collections.ConfigDict, workdir=None) -> dict:
    """What makes two runs the same run: the flat config without the progress label and
    the study block, paths inside `workdir` written relative to it (``WORKDIR/float``),
    so that a moved study folder still resumes."""
    flat = _flat(json.loads(cfg.to_json_best_effort()))
    root = None if workdir is None else str(pathlib.Path(workdir).absolute())
    out = {}
    for k, v in flat.items():
        if k == "label" or k.startswith("study."):
            continue
        if root and isinstance(v, str) and (v == root or v.startswith(root + os.sep)):
            v = "WORKDIR" + v[len(root):]
        out[k] = v
    return out


# ------------------------------------------------------------------------ compile time


@contextlib.contextmanager
def compilation_cache(path: str | os.PathLike | None) -> Iterator[None]:
    """The JAX persistent compilation cache in `path` for the duration (None: unchanged).

    Every executable is cached (no minimum compile time or entry size): on 2 CPU cores
    even the eval step takes seconds to compile. The previous settings are restored.
    """
    if path is None:
        yield
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    path = pathlib.Path(path).expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True)
    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {k: getattr(jax.config, k) for k in keys}
    new = dict(zip(keys, (str(path), 0.0, -1)))
    for k, v in new.items():
        jax.config.update(k, v)
    cc.reset_cache()  # the cache binds its directory once; make it see ours
    try:
        yield
    finally:
        for k, v in before.items():
            jax.config.update(k, v)
        cc.reset_cache()


_COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",  # includes cache loads
}


class CompileTimer:
    """Seconds JAX spends turning Python into executables, by jitted function name.

    ``seconds[fun]`` sums tracing, lowering and XLA compilation (or, on a persistent
    cache hit, loading the executable); ``cache_hits``/``cache_misses`` count persistent
    cache lookups. Use as a context manager around the work to measure.
    """

    def __init__(self):
        self.seconds: collections.Counter = collections.Counter()
        self.by_phase: collections.Counter = collections.Counter()
        self.cache_hits = self.cache_misses = 0

    def _on_duration(self, event: str, duration: float, **kw) -> None:
        phase = _COMPILE_EVENTS.get(event)
        if phase is not None:
            # Tracing reports "train_step", lowering and compilation "jit(train_step)".
            name = str(kw.get("fun_name", "?"))
            if name.startswith("jit(") and name.endswith(")"):
                name = name[4:-1]
            self.seconds[name] += duration
            self.by_phase[phase] += duration

    def _on_event(self, event: str, **kw) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1
        elif event == "/jax/compilation_cache/cache_misses":
            self.cache_misses += 1

    def __enter__(self) -> CompileTimer:
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        import jax

        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)

    def summary(self) -> dict:
        return {
            "total_seconds": round(sum(self.seconds.values()), 3),
            "train_step_seconds": round(self.seconds.get("train_step", 0.0), 3),
            "by_phase": {k: round(v, 3) for k, v in self.by_phase.items()},
            "by_function": {k: round(v, 3) for k, v in self.seconds.most_common(8)},
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
        }


# ----------------------------------------------------------------------------- runs


def _primary() -> bool:
    """Whether this process writes the study's files (process 0 of a multi-process run)."""
    import jax

    return jax.process_index() == 0


def _atomic_write(path: pathlib.Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def load_done(run_dir: pathlib.Path, cfg=None, workdir=None) -> dict | None:
    """The run's done.json record, None if it has not finished.

    With `cfg`, a record made with another config raises StudyError naming the keys that
    differ (`run_identity`): the finished run would silently stand for another experiment.
    """
    path = pathlib.Path(run_dir) / DONE_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if cfg is not None:
        now, then = run_identity(cfg, workdir), record["config"]
        diff = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
        if diff:
            shown = ", ".join(f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in diff[:6])
            raise StudyError(
                f"{run_dir} finished with another config ({shown}{', ...' if len(diff) > 6 else ''}); "
                "use another --workdir, or delete that run folder to redo it"
            )
    return record


def _execute(cfg, run: StudyRun, run_dir: pathlib.Path, workdir, *, record_spec=None) -> dict:
    """Train (resuming) + evaluate + export one run; write and return its done.json record."""
    from usmqs import train as train_lib
    from usmqs import export as export_lib

    run_dir.mkdir(parents=True, exist_ok=True)
    if record_spec is not None and _primary():
        (run_dir / RUN_CONFIG_FILE).write_text(json.dumps(record_spec))
    t0 = time.perf_counter()
    with CompileTimer() as timer:
        metrics = train_lib.train_and_evaluate(cfg, run_dir)
        t1 = time.perf_counter()
        size = export_lib.export_workdir(cfg, run_dir)
        t2 = time.perf_counter()
        export_wer = None
        if cfg.study.eval_export:
            export_wer = export_lib.evaluate_export(cfg, run_dir)["wer"]
            if export_wer != metrics["wer"]:
                print(
                    f"WARNING [{run.tag}] export decodes to WER {export_wer:.4f}, "
                    f"the checkpoint to {metrics['wer']:.4f}",
                    flush=True,
                )
    record = {
        "name": run.name,
        "method": str(run.method),
        "eval": {k: metrics[k] for k in EVAL_KEYS},
        "dev": {k: metrics["dev"][k] for k in EVAL_KEYS} if "dev" in metrics else None,
        "export_wer": export_wer,
        "size": {
            k: size[k]
            for k in (
                "total_bytes", "model_bytes", "fp32_bytes", "num_params", "size_ratio",
                "compressed_layers_bits_per_weight",
                "compressed_layers_bits_per_weight_no_scales",
            )
        },
        "timing": {
            "train_eval_seconds": round(t1 - t0, 3),
            "export_seconds": round(t2 - t1, 3),
            "compile": timer.summary(),
            "steps": int(cfg.train.num_steps),
        },
        "config": run_identity(cfg, workdir),
    }
    if _primary():
        _atomic_write(run_dir / DONE_FILE, json.dumps(record, indent=2) + "\n")
    return record


# --------------------------------------------------------------------------- results


def setting_fields(name: str) -> dict:
    """weight_bits (None = float values) and sparsity ("N:M" or None) of a policy NAME."""
    bits, nm = NAMED_POLICIES[name]
    return {"weight_bits": bits, "sparsity": None if nm is None else f"{nm[0]}:{nm[1]}"}


def rel_regression(wer: float, float_wer: float) -> float | None:
    """(wer - float_wer) / float_wer; None when the float WER is 0 (undefined)."""
    return (wer - float_wer) / float_wer if float_wer > 0 else None


def result_rows(records: Mapping[StudyRun, dict]) -> list[dict]:
    """results.json rows (DESIGN.md) for the finished runs: baseline first, then the
    float control, then per setting PTQ and QAT. Needs the baseline's record.

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
    """
    float_wer = records[BASELINE]["eval"]["wer"]
    rows = []
    position = {n: i for i, n in enumerate(NAMED_POLICIES)}
    methods = list(Method)
    groups: dict[tuple[str, Method], list[dict]] = {}
    for run in sorted(records, key=lambda r: (position[r.name], methods.index(r.method), r.seed)):
        groups.setdefault((run.name, run.method), []).append(records[run])
    for (name, method), recs in groups.items():
        first = recs[0]
        bpw = first["size"]["compressed_layers_bits_per_weight_no_scales"]
        wers = [rec["eval"]["wer"] for rec in recs]
        devs = [rec["dev"]["wer"] for rec in recs if rec["dev"]]
        wer = statistics.fmean(wers)
        row = {
            "name": name,
            "method": str(method),
            **setting_fields(name),
            "bits_per_weight": 32.0 if bpw is None else bpw,
            "size_bytes": first["size"]["model_bytes"],
            "size_ratio": first["size"]["size_ratio"],
            "wer": wer,
            "rel_wer_regression": rel_regression(wer, float_wer),
            "dev_wer": statistics.fmean(devs) if devs else None,
            "wer_seeds": wers,
            "dev_wer_seeds": devs,
        }
        rows.append({k: row[k] for k in ROW_KEYS})
    return rows


def _pct(x: float | None, digits: int = 1, sign: bool = False) -> str:
    if x is None:
        return "—"
    return f"{100 * x:+.{digits}f}" if sign else f"{100 * x:.{digits}f}"


def _wer_cell(row: dict | None) -> str:
    """A row's WER %; "mean ± sd" over its seeds when it has several."""
    if row is None:
        return "—"
    seeds = row["wer_seeds"]
    if len(seeds) > 1:
        return f"{100 * row['wer']:.2f} ± {100 * statistics.stdev(seeds):.2f}"
    return _pct(row["wer"], 2)


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table, one line per setting: bits/weight, size, float/PTQ/QAT WER and the
    relative regressions (QAT of 'float' is the fine-tuned control; with several
    fine-tuning seeds, QAT WER is their mean ± sample sd)."""
    by = {(r["name"], r["method"]): r for r in rows}
    base = by[("float", "float")]
    names = [n for n in NAMED_POLICIES if any(r["name"] == n for r in rows)]
    head = (
        "| setting | bits/weight | size % of fp32 | float WER % | PTQ WER % | QAT WER % "
        "| PTQ rel. regression % | QAT rel. regression % |"
    )
    lines = [head, "|" + "---|" * 8]
    for n in names:
        ptq, qat = by.get((n, "ptq")), by.get((n, "qat"))
        ref = qat or ptq or base
        if n == "float":
            ref = base
        lines.append(
            f"| {n} | {ref['bits_per_weight']:.3g} | {_pct(ref['size_ratio'], 2)} "
            f"| {_pct(base['wer'], 2)} | {_wer_cell(ptq)} | {_wer_cell(qat)} "
            f"| {_pct(ptq and ptq['rel_wer_regression'], 1, True)} "
            f"| {_pct(qat and qat['rel_wer_regression'], 1, True)} |"
        )
    return "\n".join(lines)


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


def _reading_notes(rows: Sequence[dict], records: Mapping[StudyRun, dict]) -> str:
    by = {(r["name"], r["method"]): r for r in rows}
    base_rec = records[BASELINE]
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
        without = "" if ptq is None else f" ({_pct(ptq['rel_wer_regression'], 1, True)} % without fine-tuning)"
        text.append(
            f"Here, {p['setting']} after fine-tuning is {_pct(qat['size_ratio'], 1)} % of fp32 at "
            f"{_pct(qat['rel_wer_regression'], 1, True)} % relative regression{without}."
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
        "differences of a few words are not findings. Compare each QAT row with the float "
        "control (QAT of float: the same fine-tuning without compression) rather than with "
        "the baseline alone: the control shows what the extra steps by themselves do; a "
        "setting has recovered when its regression is near the control's."
    )
    return "\n\n".join(text)


def _cost_table(records: Mapping[StudyRun, dict], plan_: Sequence[StudyRun]) -> str:
    lines = [
        "| run | steps | train+eval s | export s | compile s (all) | train_step compile s | cache hits/misses |",
        "|" + "---|" * 7,
    ]
    for run in plan_:
        rec = records.get(run)
        if rec is None:
            lines.append(f"| {run.tag} | pending | | | | | |")
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
    path, rows: Sequence[dict], records: Mapping[StudyRun, dict], config, plan_: Sequence[StudyRun]
) -> None:
    """report.md: the table, how to read it against the paper, what each run cost."""
    s = config.study
    done = sum(1 for r in plan_ if r in records)
    status = "complete" if done == len(plan_) else f"partial: {done}/{len(plan_)} runs finished"
    base = records[BASELINE]
    md = [
        "# Compression study",
        "",
        f"Status: {status}. Model: {base['size']['num_params']:,} parameters "
        f"({base['size']['fp32_bytes']:,} bytes as fp32). Float baseline: "
        f"{config.train.num_steps} steps; PTQ: 0 steps from the baseline; QAT: "
        f"{s.finetune_steps} steps from the baseline with "
        + (", ".join(f"train.{k}={v}" for k, v in finetune_recipe(config).items()) or "the float recipe")
        + "".join(f", policy.{k}={v}" for k, v in _named_pruning(config).items())
        + (
            f"; {s.finetune_seeds} fine-tuning seeds each (seed {config.seed} ... "
            f"{config.seed + s.finetune_seeds - 1}): QAT WER is their mean ± sample sd"
            if s.get("finetune_seeds", 1) > 1 else ""
        )
        + ". WER from the fake-quant evaluation of each run's final checkpoint "
        f"({config.eval.decoder} decoding; the packed export decodes to the same tokens).",
        "",
        format_table(rows),
        "",
        "bits/weight: values + N:M indices over the compressed layers, scales excluded "
        "(32 = float). size % of fp32: the whole exported model (export/size.json of the "
        "QAT run; results.json has each run's own). "
        "Relative regression: (WER − float WER) / float WER. QAT of `float` is the float "
        "control: the baseline fine-tuned with the QAT recipe and budget, uncompressed.",
        "",
        "![pareto](pareto.png)",
        "",
        _reading_notes(rows, records),
        "",
        *_dev_section(rows),
        "## Run costs",
        "",
        "Compile seconds: JAX tracing + lowering + XLA compilation (or loading from the "
        "persistent compilation cache) while the run trained, evaluated and exported; "
        "for a resumed run, in the session that finished it.",
        "",
        _cost_table(records, plan_),
        "",
    ]
    _atomic_write(pathlib.Path(path), "\n".join(md))


def _rel_sd(row: dict, base: Sequence[dict]) -> float:
    """Sample sd of a row's relative regression % over its seeds (0 with one seed)."""
    if len(row["wer_seeds"]) < 2 or not base or base[0]["wer"] <= 0:
        return 0.0
    return 100 * statistics.stdev(row["wer_seeds"]) / base[0]["wer"]


def plot_pareto(path, rows: Sequence[dict]) -> None:
    """pareto.png: x = size % of fp32 (log), y = relative WER regression %, PTQ and QAT
    series with a label per point, the paper's point marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    p = PAPER_POINT
    ys_all = [p["rel_wer_regression_percent"], 0.0]
    base = [r for r in rows if r["method"] == "float"]
    if base:
        ax.scatter([100 * base[0]["size_ratio"]], [0.0], marker="D", color="black",
                   label="float baseline", zorder=3)
    for method, marker, color in (("ptq", "o", "tab:orange"), ("qat", "s", "tab:blue")):
        pts = sorted(
            (100 * r["size_ratio"], 100 * r["rel_wer_regression"], r["name"], _rel_sd(r, base))
            for r in rows
            if r["method"] == method and r["rel_wer_regression"] is not None
        )
        if not pts:
            continue
        xs, ys, _, sds = zip(*pts)
        ys_all += ys
        label = {"ptq": "PTQ (no fine-tuning)", "qat": "QAT (fine-tuned; float = control)"}[method]
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
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xscale("log")
    ticks = [5, 10, 25, 50, 100]
    ax.set_xticks(ticks, [f"{t}" for t in ticks])
    xs_all = [100 * r["size_ratio"] for r in rows] + [p["size_percent"]]
    ax.set_xlim(min(4.0, 0.8 * min(xs_all)), max(150.0, 1.3 * max(xs_all)))
    lo, hi = min(ys_all), max(ys_all)
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
    fig.tight_layout()
    tmp = pathlib.Path(path).with_name(f".{pathlib.Path(path).name}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def write_outputs(workdir, records: Mapping[StudyRun, dict], config, plan_) -> list[dict]:
    """results.json, report.md and pareto.png from the finished runs; returns the rows."""
    workdir = pathlib.Path(workdir)
    rows = result_rows(records)
    if not _primary():
        return rows
    _atomic_write(workdir / RESULTS_FILE, json.dumps(rows, indent=2) + "\n")
    write_report(workdir / REPORT_FILE, rows, records, config, plan_)
    plot_pareto(workdir / PARETO_FILE, rows)
    return rows


README_BEGIN = "<!-- study:begin (written by `usmqs study --update-readme`; do not edit) -->"
README_END = "<!-- study:end -->"


def update_readme(readme, workdir) -> pathlib.Path:
    """Put a complete study's table and plot into `readme` between the study markers.

    The plot is copied to ``docs/<workdir name>_pareto.png`` next to `readme`; the table
    and the reading notes are report.md's. Raises StudyError if the study is partial or
    the README has no markers (nothing is written then).
    """
    import shutil

    readme, workdir = pathlib.Path(readme), pathlib.Path(workdir)
    report = (workdir / REPORT_FILE).read_text()
    if "Status: complete." not in report:
        raise StudyError(f"{workdir / REPORT_FILE} is not a complete study: README left as it is")
    text = readme.read_text()
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise StudyError(f"{readme}: needs exactly one {README_BEGIN!r} ... {README_END!r} block")
    image = readme.parent / "docs" / f"{workdir.name}_pareto.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(workdir / PARETO_FILE, image)
    body = report.split("\n", 1)[1].strip()  # without the "# Compression study" title
    body = body.replace("![pareto](pareto.png)", f"![pareto]({image.relative_to(readme.parent)})")
    body = body.replace("\n## ", "\n#### ")  # report sections, below the README's own
    head, rest = text.split(README_BEGIN)
    _, tail = rest.split(README_END)
    _atomic_write(readme, f"{head}{README_BEGIN}\n{body}\n{README_END}{tail}")
    return image


# ------------------------------------------------------------------------------ main


def run_study(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    config_spec: str | None = None,
    overrides: Sequence[str] = (),
) -> list[dict]:
    """Run (or resume) the whole study in `workdir`; returns the results.json rows.

    Args:
      config: a study config (``configs/study_*.py``): the baseline's config plus a
        ``study`` block (`default_study_config`).
      workdir: the study folder (layout in the module docstring).
      config_spec, overrides: how `config` was made (``file.py:arg`` and the
        ``--config.`` overrides); when given, each run dir gets a run_config.txt so
        that ``usmqs evaluate/export --workdir RUN_DIR`` work without --config.
    """
    validate_study_config(config)
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    runs = plan(config)
    s = config.study
    cache = None
    if s.compile_cache:
        cache = s.compile_cache_dir or workdir / ".jax_cache"
    print(
        f"study: {len(runs)} runs in {workdir} (float baseline {config.train.num_steps} steps; "
        f"{len(s.settings)} settings x PTQ + QAT {s.finetune_steps} steps"
        f"{'; float control' if s.float_control else ''}); compilation cache: {cache or 'off'}",
        flush=True,
    )
    records: dict[StudyRun, dict] = {}
    rows: list[dict] = []
    with compilation_cache(cache):
        for i, run in enumerate(runs, 1):
            label = f"{run.tag} {i}/{len(runs)}"
            run_dir = workdir / run.subdir
            cfg = run_config(config, run, workdir, label=label)
            record = load_done(run_dir, cfg, workdir)
            if record is not None:
                print(f"[{label}] done earlier: WER {100 * record['eval']['wer']:.2f}% (skipped)", flush=True)
                records[run] = record
                continue
            what = {
                Method.FLOAT: f"train the float baseline, {cfg.train.num_steps} steps",
                Method.PTQ: "compress the baseline, no fine-tuning",
                Method.QAT: f"fine-tune the baseline, {cfg.train.num_steps} steps",
            }[run.method]
            print(f"[{label}] {what} -> {run_dir}", flush=True)
            spec = None
            if config_spec is not None:
                spec = [config_spec, list(overrides) + run_overrides(config, run, workdir)]
            record = _execute(cfg, run, run_dir, workdir, record_spec=spec)
            records[run] = record
            c = record["timing"]["compile"]
            print(
                f"[{label}] WER {100 * record['eval']['wer']:.2f}%  size "
                f"{100 * record['size']['size_ratio']:.2f}% of fp32  compile {c['total_seconds']:.1f}s "
                f"(train_step {c['train_step_seconds']:.1f}s, cache hits {c['cache_hits']})  "
                f"train+eval {record['timing']['train_eval_seconds']:.1f}s",
                flush=True,
            )
            rows = write_outputs(workdir, records, config, runs)
    rows = write_outputs(workdir, records, config, runs)
    print(f"\n{format_table(rows)}\n\nresults: {workdir / RESULTS_FILE}, {workdir / REPORT_FILE}, "
          f"{workdir / PARETO_FILE}", flush=True)
    return rows
