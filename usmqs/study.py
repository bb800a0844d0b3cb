"""The compression study: one float baseline -> PTQ and QAT of every setting -> report.

This module plans the runs, executes them (train, evaluate, export; resumable) and keeps
their records; `usmqs.study_report` renders results.json, report.md and pareto.png
from those records.

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
the extra steps alone buy from what compression costs. Each budget B of
``config.study.budgets`` (bits per weight of the compressed layers, scales counted) adds
PTQ and QAT runs named ``mixed@B`` whose policy is the allocation within B that
minimizes the baseline's probed sensitivity (`allocation`, made once the baseline has
finished; `mixed_rules` gives its N:M rules the study's N:M recipe). Every run is exported
(`export.export_workdir`): sizes come from its ``export/size.json``. Layout::

    WORKDIR/
      float/              the baseline (``config.train`` recipe, float policy)
      float/mixed/        the baseline's sensitivity table and each mixed@B allocation
      ptq/<NAME>/         one run dir per setting: checkpoints, eval.json, export/, done.json
                          (failed.json instead while it has failed)
      qat/<NAME>/         ... and qat/float/, the fine-tuned float control
      qat_seed<k>/<NAME>/ the same fine-tunes with seed k (``study.finetune_seeds`` > 1)
      data_cache/         prepared features, shared by every run (unless data.cache_dir)
      results.json        rows (DESIGN.md): name, method, weight_bits, sparsity,
                          bits_per_weight, size_bytes, size_ratio, wer, rel_wer_regression;
                          and dev_wer, wer_seeds, dev_wer_seeds, status ("done" or
                          "failed"), error (`study_report.result_rows`)
      report.md           the table, how to read it against the paper, run costs
      pareto.png          relative WER regression vs size, PTQ and QAT, the paper's point

Resumable: ``<run dir>/done.json`` is written atomically after a run's evaluation and
export; a rerun skips runs that have it (and fails loudly if that run's config has
changed since) and resumes a half-finished one from its latest checkpoint (the training
loop resumes by itself). results.json, report.md and pareto.png are rewritten after
every finished or failed run, so a partial study already has a partial report.

A run that raises (a bug, a non-finite loss, a bad input that stops it) does not stop the
study: it is recorded in ``<run dir>/failed.json`` (error, the end of its traceback, its
config), shown as FAILED in results.json (``status``, ``error``) and report.md, and the
study goes on; the runs that start from it (every PTQ/QAT run starts from the baseline)
are not run and are reported as failed, naming it. When every run has been tried,
`run_study` raises a StudyError listing the failures, after writing the outputs. A rerun
retries the failed runs. What would make every further run fail too aborts the study at
once instead (`ABORTS_STUDY`: a full disk, ...), as do KeyboardInterrupt and SystemExit.

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
import functools
import json
import os
import pathlib
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence

import ml_collections

from usmqs import config as config_lib
from usmqs import distributed, preemption, sensitivity, storage, study_report
from usmqs import export as export_lib
from usmqs import train as train_lib
from usmqs.compress import allocate, export_format
from usmqs.compress.allocate import MIXED_PREFIX, mixed_name
from usmqs.compress.policy import NAMED_PRUNING_DEFAULTS, Policy, Rule, policy_from_config

DONE_FILE = "done.json"
FAILED_FILE = "failed.json"
TRACEBACK_LINES = 20  # the end of a failed run's traceback kept in failed.json
EVAL_KEYS = ("wer", "cer", "num_utterances", "num_words", "step")


class Method(enum.StrEnum):
    FLOAT = "float"  # the float baseline, trained from scratch with config.train
    PTQ = "ptq"  # the baseline compressed after training, no further steps
    QAT = "qat"  # the baseline fine-tuned under compression (float: the control)


class StudyError(RuntimeError):
    """A study that cannot go on as configured (changed config of a finished run, ...),
    or one whose runs did not all finish."""


# Errors of a run that stop the whole study instead of failing the run alone: the
# environment is broken (a full disk), so every further run would fail the same way.
ABORTS_STUDY: tuple[type[BaseException], ...] = (storage.WriteError, preemption.Preempted)


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


def plan(config: ml_collections.ConfigDict) -> list[StudyRun]:
    """The runs in execution order: baseline, every PTQ (cheap: a first picture early),
    the float control, every QAT; then the control and every QAT again per further
    fine-tuning seed (a complete single-seed table comes first)."""
    settings = tuple(config.study.settings) + tuple(mixed_name(b) for b in config.study.budgets)
    runs = [BASELINE]
    runs += [StudyRun(Method.PTQ, n) for n in settings]
    for seed in range(config.study.finetune_seeds):
        if config.study.float_control:
            runs.append(StudyRun(Method.QAT, "float", seed))
        runs += [StudyRun(Method.QAT, n, seed) for n in settings]
    return runs


def _fmt(value) -> str:
    return value if isinstance(value, str) else repr(value)


def run_overrides(config, run: StudyRun, workdir: pathlib.Path, rules: Sequence[dict] = ()) -> list[str]:
    """The ``--config.`` overrides that turn the study config into `run`'s config
    (`rules`: a mixed@B run's policy rules, `allocation`; with ``study.learned_scale`` a
    named setting's runs get theirs, `named_rules`)."""
    if not rules and config.study.learned_scale and run.method is not Method.FLOAT and run.name != "float":
        rules = named_rules(config, run.name)
    o = [f"policy.name={run.name}", "eval.at_end=True"]
    if not config.data.cache_dir:
        o.append(f"data.cache_dir={workdir / 'data_cache'}")
    if run.method is not Method.FLOAT:
        o.append(f"init_from={workdir / BASELINE.subdir}")
        o.append(f"policy.runtime={bool(config.study.runtime_settings and not rules)}")
    if rules:  # custom rules carry their N:M options themselves (`mixed_rules`)
        o.append(f"policy.rules={tuple(rules)!r}")
        o += [f"policy.{k}={_fmt(v)}" for k, v in NAMED_PRUNING_DEFAULTS.items()]
    if run.method is Method.PTQ:
        o.append("train.num_steps=0")
    elif run.method is Method.QAT:
        o.append(f"train.num_steps={config.study.finetune_steps}")
        if run.seed:
            o.append(f"seed={config.seed + run.seed}")
        o += [f"train.{k}={_fmt(v)}" for k, v in finetune_recipe(config).items()]
    return o


def finetune_recipe(config) -> dict:
    """The config.train values the QAT runs change (study.finetune keys that are set)."""
    return {k: v for k, v in config.study.finetune.items() if v is not None}


def run_config(config, run: StudyRun, workdir, *, label: str = "", rules: Sequence[dict] = ()) -> ml_collections.ConfigDict:
    """`run`'s config: a copy of the study config with `run_overrides` (and `label`) applied."""
    cfg = copy.deepcopy(config)
    config_lib.apply_overrides(cfg, run_overrides(config, run, pathlib.Path(workdir).absolute(), rules))
    cfg.label = label or run.tag
    return cfg


def mixed_rules(config, alloc: allocate.Allocation) -> list[dict]:
    """`alloc`'s policy rules with the study's N:M recipe (``policy.mask_every``,
    ``prune_grad``, ``srste_lambda``) on every N:M rule, as the named settings get it,
    and with ``study.learned_scale`` on every quantized rule. (Custom rules compile
    their settings as constants: mixed@B runs do not share the named settings'
    runtime-valued programs.)"""
    p, extra = config.policy, {}
    if p.mask_every:
        extra["mask_schedule"] = {"kind": "every", "every": int(p.mask_every)}
    for key in ("prune_grad", "srste_lambda"):
        if p[key] != NAMED_PRUNING_DEFAULTS[key]:
            extra[key] = p[key]
    learned = {"learned_scale": True} if config.study.learned_scale else {}
    return [
        {**r, **(extra if r.get("nm") else {}), **(learned if r.get("weight_bits") else {})} for r in alloc.rules
    ]


def named_rules(config, name: str) -> list[dict]:
    """The named setting `name` with the study's N:M recipe (``policy.mask_every``,
    ``prune_grad``, ``srste_lambda``) as custom rules, its quantized rules with learned
    ranges (``study.learned_scale``)."""
    named = policy_from_config({**config.policy.to_dict(), "name": name, "rules": (), "runtime": False})
    rules = tuple(
        Rule(r.module_path, dataclasses.replace(r.spec, learned_scale=r.spec.weight_bits is not None))
        for r in named.rules
    )
    return export_format.policy_to_data(Policy(rules), skip_defaults=True)


def allocation(config, workdir: pathlib.Path, name: str) -> allocate.Allocation:
    """The policy of the mixed@B runs: the allocation within B bits per weight that
    minimizes the finished baseline's sensitivity estimate (``study.sensitivity``;
    `sensitivity.allocate_run`: the table is cached in the baseline's folder, the
    allocation saved as ``WORKDIR/float/mixed/mixed@B[-fisher].json``)."""
    budget = next(b for b in config.study.budgets if mixed_name(b) == name)
    baseline = run_config(config, BASELINE, workdir)
    return sensitivity.allocate_run(baseline, workdir / BASELINE.subdir, bits_per_weight=budget,
                                    method=config.study.sensitivity)


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

    Every executable is cached (no minimum compile time or entry size), so that later
    runs load every program of the study, not only the slowest to compile. The previous
    settings are restored.
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


@functools.cache
def _new_key_defaults() -> dict:
    """`run_identity` of the default config, outside the preset-dependent model block."""
    return {k: v for k, v in run_identity(config_lib.base_config("tiny")).items() if not k.startswith("model.")}


def load_done(run_dir: pathlib.Path, cfg=None, workdir=None) -> dict | None:
    """The run's done.json record, None if it has not finished.

    With `cfg`, a record made with another config raises StudyError naming the keys that
    differ (`run_identity`): the finished run would silently stand for another experiment.
    A key the record lacks counts as the same when `cfg` holds its default (a key added
    to the config since that run finished, left at its old behaviour).
    """
    path = pathlib.Path(run_dir) / DONE_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if cfg is not None:
        now, then = run_identity(cfg, workdir), record["config"]
        defaults = _new_key_defaults()
        same = lambda k: now.get(k) == then.get(k) or (k not in then and k in defaults and now[k] == defaults[k])
        diff = sorted(k for k in now.keys() | then.keys() if not same(k))
        if diff:
            shown = ", ".join(f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in diff[:6])
            raise StudyError(
                f"{run_dir} finished with another config ({shown}{', ...' if len(diff) > 6 else ''}); "
                "use another --workdir, or delete that run folder to redo it"
            )
    return record


def _execute(cfg, run: StudyRun, run_dir: pathlib.Path, workdir) -> dict:
    """Train (resuming) + evaluate + export one run; write and return its done.json record."""
    run_dir.mkdir(parents=True, exist_ok=True)
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
    if distributed.is_primary():  # written whole or not at all: its presence marks the run finished
        storage.write_text_atomic(run_dir / DONE_FILE, json.dumps(record, indent=2) + "\n", "the run's record")
    return record


def depends_on(run: StudyRun) -> StudyRun | None:
    """The run whose checkpoint `run` starts from (``init_from``): the baseline, for every
    run but the baseline itself."""
    return None if run.method is Method.FLOAT else BASELINE


def _record_failure(cfg, run: StudyRun, run_dir: pathlib.Path, workdir, exc: Exception) -> dict:
    """`run`'s failure record, written to failed.json (by process 0): the error on one
    line, its type, the last `TRACEBACK_LINES` lines of its traceback and the run's
    identity (as in done.json)."""
    record = {
        "name": run.name,
        "method": str(run.method),
        "error": f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
        "error_type": type(exc).__name__,
        "traceback": "".join(traceback.format_exception(exc)).splitlines()[-TRACEBACK_LINES:],
        "config": run_identity(cfg, workdir),
    }
    if distributed.is_primary():
        what = "the run's failure record"
        with storage.writing(run_dir, what):
            run_dir.mkdir(parents=True, exist_ok=True)
        storage.write_text_atomic(run_dir / FAILED_FILE, json.dumps(record, indent=2) + "\n", what)
    return record


def _attempt(cfg, run: StudyRun, label: str, workdir: pathlib.Path) -> tuple[bool, dict]:
    """Execute `run`: (True, its done.json record), or, when it raises an ordinary
    exception, (False, its failure record; `_record_failure`). `ABORTS_STUDY` errors, a
    full disk (as a `storage.WriteError` naming the run dir), KeyboardInterrupt and
    SystemExit propagate."""
    run_dir = workdir / run.subdir
    what = {
        Method.FLOAT: f"train the float baseline, {cfg.train.num_steps} steps",
        Method.PTQ: "compress the baseline, no fine-tuning",
        Method.QAT: f"fine-tune the baseline, {cfg.train.num_steps} steps",
    }[run.method]
    print(f"[{label}] {what} -> {run_dir}", flush=True)
    (run_dir / FAILED_FILE).unlink(missing_ok=True)  # tried again: a new record will say how it went
    try:
        record = _execute(cfg, run, run_dir, workdir)
    except ABORTS_STUDY:
        raise
    except Exception as e:
        if storage.is_out_of_space(e):
            raise storage.describe(run_dir, f"the {run.tag} run", e) from e
        failure = _record_failure(cfg, run, run_dir, workdir, e)
        print(
            f"[{label}] FAILED: {study_report.short_error(failure['error'], 200)} "
            f"(traceback in {run_dir / FAILED_FILE}); the study goes on",
            flush=True,
        )
        return False, failure
    c = record["timing"]["compile"]
    print(
        f"[{label}] WER {100 * record['eval']['wer']:.2f}%  size "
        f"{100 * record['size']['size_ratio']:.2f}% of fp32  compile {c['total_seconds']:.1f}s "
        f"(train_step {c['train_step_seconds']:.1f}s, cache hits {c['cache_hits']})  "
        f"train+eval {record['timing']['train_eval_seconds']:.1f}s",
        flush=True,
    )
    return True, record


def _not_run(run: StudyRun, blocker: StudyRun) -> dict:
    """The failure record of `run`, not run because `blocker`, which it starts from, failed."""
    return {
        "name": run.name,
        "method": str(run.method),
        "error": f"not run: it starts from {blocker.tag}, which failed",
        "depends_on": blocker.tag,
    }


def _failure_summary(failures: Mapping[StudyRun, dict], runs, workdir: pathlib.Path) -> str:
    """"N of M runs failed: tag: error; ..." (runs not run for a failed one counted apart)."""
    failed = [r for r in runs if r in failures and "depends_on" not in failures[r]]
    not_run = sum(1 for r in runs if r in failures and "depends_on" in failures[r])
    return (
        f"{len(failed)} of {len(runs)} runs failed"
        + (f" ({not_run} more not run: they start from a failed run)" if not_run else "")
        + ": "
        + "; ".join(f"{r.tag}: {study_report.short_error(failures[r]['error'], 200)}" for r in failed)
        + f". Details in {workdir / study_report.REPORT_FILE} and each run's {FAILED_FILE}; "
        "rerun the study to retry them"
    )


def _write_outputs(
    workdir: pathlib.Path, records: Mapping[StudyRun, dict], config, runs, failures: Mapping[StudyRun, dict],
    allocations: Mapping[str, allocate.Allocation],
) -> list[dict]:
    """results.json, report.md and pareto.png (process 0 writes them); returns the rows."""
    if distributed.is_primary():
        data = {name: {**a.to_data(), "sensitivity_method": config.study.sensitivity}
                for name, a in allocations.items()}
        return study_report.write_outputs(workdir, records, config, runs, failures, data)
    return study_report.result_rows(records, failures)


def _run_one(config, workdir: pathlib.Path, run: StudyRun, label: str, records: dict, failures: dict,
             allocations: dict) -> bool:
    """Run `run` (or find it done earlier, or not run it because the run it starts from
    failed), recording it in `records` or `failures`; True when it was tried now. A
    mixed@B run's policy is its budget's allocation (`allocation`), made once per study
    session into `allocations`; an allocation that cannot be made (a budget below the
    smallest choice) fails that run."""
    if depends_on(run) in failures:
        failures[run] = _not_run(run, depends_on(run))
        print(f"[{label}] FAILED: {failures[run]['error']}", flush=True)
        return False
    if run.name.startswith(MIXED_PREFIX) and run.name not in allocations:
        try:
            allocations[run.name] = allocation(config, workdir, run.name)
        except ABORTS_STUDY:
            raise
        except Exception as e:
            failures[run] = _record_failure(run_config(config, run, workdir, label=label), run,
                                            workdir / run.subdir, workdir, e)
            print(f"[{label}] FAILED: {failures[run]['error']}", flush=True)
            return True
    rules = mixed_rules(config, allocations[run.name]) if run.name in allocations else ()
    cfg = run_config(config, run, workdir, label=label, rules=rules)
    record = load_done(workdir / run.subdir, cfg, workdir)
    if record is not None:
        print(f"[{label}] done earlier: WER {100 * record['eval']['wer']:.2f}% (skipped)", flush=True)
        records[run] = record
        return False
    finished, record = _attempt(cfg, run, label, workdir)
    (records if finished else failures)[run] = record
    return True


# ------------------------------------------------------------------------------ main


def run_study(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
) -> list[dict]:
    """Run (or resume) the whole study in `workdir`; returns the results.json rows.

    A run that fails is recorded and the study goes on; StudyError when every run has
    been tried and some failed (results.json, report.md, pareto.png written first).

    Args:
      config: a study config (``configs/study_*.py``): the baseline's config plus a
        ``study`` block (`usmqs.config.study_config`).
      workdir: the study folder (layout in the module docstring). Each run dir holds
        its resolved config (config.json, written by the training loop), so that
        ``usmqs evaluate/export --workdir RUN_DIR`` work without --config.
    """
    if "study" not in config:
        raise config_lib.ConfigError("config has no `study` block: start it from usmqs.config.study_config()")
    config_lib.validate(config)
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    runs = plan(config)
    s = config.study
    cache = None
    if s.compile_cache:
        cache = s.compile_cache_dir or workdir / ".jax_cache"
    print(
        f"study: {len(runs)} runs in {workdir} (float baseline {config.train.num_steps} steps; "
        f"{len(s.settings)} settings{f' + {len(s.budgets)} budgets' if s.budgets else ''} x PTQ + QAT "
        f"{s.finetune_steps} steps"
        f"{'; float control' if s.float_control else ''}); compilation cache: {cache or 'off'}",
        flush=True,
    )
    records: dict[StudyRun, dict] = {}
    failures: dict[StudyRun, dict] = {}
    allocations: dict[str, allocate.Allocation] = {}
    with compilation_cache(cache):
        for i, run in enumerate(runs, 1):
            if _run_one(config, workdir, run, f"{run.tag} {i}/{len(runs)}", records, failures, allocations):
                _write_outputs(workdir, records, config, runs, failures, allocations)
    rows = _write_outputs(workdir, records, config, runs, failures, allocations)
    print(
        f"\n{study_report.format_table(rows)}\n\nresults: {workdir / study_report.RESULTS_FILE}, "
        f"{workdir / study_report.REPORT_FILE}, {workdir / study_report.PARETO_FILE}",
        flush=True,
    )
    if failures:
        raise StudyError(_failure_summary(failures, runs, workdir))
    return rows
