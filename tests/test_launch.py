"""launch/: the shell scripts parse, tpu_vm.sh --dry-run prints its gcloud commands, and
the Colab notebook's cells run top to bottom on CPU with a tiny config."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, SUITE_JAX_CACHE, micro_overrides

LAUNCH = ROOT / "launch"
NOTEBOOK = LAUNCH / "colab_demo.ipynb"
TPU_VM = LAUNCH / "tpu_vm.sh"

# configs/tiny.py:micro's model and data sizes as --config overrides (one compiled shape).
TINY = [*micro_overrides(), "data.bucket_boundaries=(400,)", "data.max_frames=400", "train.log_every=1"]


@pytest.mark.parametrize("script", sorted(p.name for p in LAUNCH.glob("*.sh")))
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


def _dry_run(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("PROJECT", "ZONE", "BUCKET", "NUM_WORKERS")}
    full.update(PROJECT="proj", ZONE="us-west4-a", TPU_NAME="usm", BUCKET="bkt", **env)
    return subprocess.run(["bash", str(TPU_VM), "--dry-run", *args], env=full,
                          capture_output=True, text=True, timeout=30)


def test_tpu_vm_dry_run_prints_the_gcloud_commands():
    where = "--zone=us-west4-a --project=proj"
    out = _dry_run("create", ACCELERATOR_TYPE="v5litepod-64").stdout.splitlines()
    assert out == [
        f"gcloud compute tpus tpu-vm create usm {where} --accelerator-type=v5litepod-64 "
        "--version=v2-alpha-tpuv5-lite"
    ]
    install = _dry_run("install").stdout
    assert "git -C" in install and "archive" in install
    assert "gcloud compute tpus tpu-vm scp" in install and "--worker=all" in install
    assert f"gcloud compute tpus tpu-vm ssh usm {where} --worker=all" in install
    assert "gcsfuse --implicit-dirs bkt /gcs/bkt" in install and "jax[tpu]" in install

    run = _dry_run("run", "--", "usmqs", "train", "--config", "configs/usm_2b.py:policy=int4+2:4",
                   "--workdir", "/gcs/bkt/runs/a b", ACCELERATOR_TYPE="v5litepod-64")
    (line,) = run.stdout.splitlines()
    words = shlex.split(line)  # what the shell would pass to gcloud
    assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in words
    remote = shlex.split(next(w for w in words if w.startswith("--command="))[len("--command="):])
    # 16 hosts of 4 chips, one process each, joining through cluster auto-detection.
    assert "USMQS_DISTRIBUTED_AUTO=1" in remote and "JAX_NUM_PROCESSES=16" in remote
    assert remote[-5:] == ["train", "--config", "configs/usm_2b.py:policy=int4+2:4",
                           "--workdir", "/gcs/bkt/runs/a b"]

    assert _dry_run("teardown").stdout.strip() == f"gcloud compute tpus tpu-vm delete usm {where} --quiet"
    # Without --dry-run, a missing setting fails before any gcloud call.
    env = {k: v for k, v in os.environ.items() if k not in ("PROJECT", "ZONE")}
    bad = subprocess.run(["bash", str(TPU_VM), "create"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "set PROJECT" in bad.stderr


def _code_cells(path: pathlib.Path) -> list[str]:
    nb = json.loads(path.read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    for src in cells:  # plain Python only: the cells must run outside a notebook too
        assert not any(line.lstrip().startswith(("!", "%")) for line in src.splitlines()), src
    return cells


def test_colab_notebook_runs_on_cpu(small_corpus, tmp_path):
    """Every code cell, in order, in one fresh Python process (as a kernel would run them),
    with the USMQS_DEMO_* variables pointing the run at a tiny model and a few steps."""
    data = [f"data.train_manifest={small_corpus['train']}",
            f"data.eval_manifest={small_corpus['test']}", "train.num_steps=3",
            "study.finetune_steps=2", "study.finetune.warmup_steps=1",
            "study.float_control=False",
            f"study.compile_cache_dir={os.environ.get(SUITE_JAX_CACHE) or tmp_path / 'jax_cache'}"]
    command, config = "study", f"{ROOT / 'configs/study_demo.py'}:settings=int4+2:4"
    workdir = tmp_path / "demo"
    env = dict(os.environ, USMQS_DEMO_COMMAND=command, USMQS_DEMO_CONFIG=config,
               USMQS_DEMO_WORKDIR=str(workdir),
               USMQS_DEMO_ARGS=" ".join(shlex.quote(f"--config.{o}") for o in TINY + data))
    script = "\n\n".join(f"# --- cell {i}\n{src}" for i, src in enumerate(_code_cells(NOTEBOOK)))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((workdir / "results.json").read_text())
    assert {(r["name"], r["method"]) for r in rows} >= {("int4+2:4", "ptq"), ("int4+2:4", "qat")}
    assert "int4+2:4   qat" in proc.stdout  # the results table of cell 4
