#!/usr/bin/env bash
# usmqs on a Cloud TPU VM or pod slice: create, install, run, teardown.
#
#   export PROJECT=my-project ZONE=us-west4-a TPU_NAME=usm ACCELERATOR_TYPE=v5litepod-64
#   export BUCKET=my-bucket        # runs and data live in gs://$BUCKET, mounted at /gcs/$BUCKET
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh install       # this checkout (git HEAD) + Python 3.12 + jax[tpu] on every host
#   launch/tpu_vm.sh run -- usmqs train --config configs/usm_2b.py:policy=int4+2:4 \
#       --workdir /gcs/$BUCKET/runs/usm_2b_int4_2of4
#   launch/tpu_vm.sh teardown
#
# Subcommands (all act on every host of the slice, --worker=all):
#   create     gcloud compute tpus tpu-vm create (SPOT=1 for a spot slice)
#   install    copy `git archive HEAD` to every host, make ~/usmqs/.venv with uv (Python 3.12),
#              pip install the package and jax[tpu], mount gs://$BUCKET at /gcs/$BUCKET (gcsfuse)
#   run -- CMD run CMD in ~/usmqs on every host at once, one process per host; the processes
#              join one JAX job through cluster auto-detection (USMQS_DISTRIBUTED_AUTO=1) and
#              check that all $NUM_WORKERS joined (JAX_NUM_PROCESSES). DETACH=1: run under
#              nohup, output in ~/usmqs/run.log on each host (see `logs`)
#   logs       tail ~/usmqs/run.log of worker 0 (WORKER=N for another)
#   ssh        interactive shell on worker 0 (WORKER=N)
#   status     gcloud compute tpus tpu-vm describe
#   teardown   gcloud compute tpus tpu-vm delete
#
# Options: --dry-run (or DRY_RUN=1) prints the gcloud commands instead of running them.
#
# Environment: PROJECT, ZONE, TPU_NAME, ACCELERATOR_TYPE (e.g. v5litepod-8, v5litepod-64,
# v4-32), RUNTIME_VERSION (default: by accelerator generation), BUCKET, NUM_WORKERS
# (hosts; default: asked from gcloud, or derived from ACCELERATOR_TYPE on --dry-run),
# SPOT, JAX_TPU_SPEC (pip requirement for JAX on TPU, default 'jax[tpu]').
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

DRY_RUN="${DRY_RUN:-0}"
args=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) args+=("$a") ;;
  esac
done
set -- "${args[@]+"${args[@]}"}"
[ $# -ge 1 ] || { usage; exit 2; }
SUBCOMMAND="$1"; shift

PROJECT="${PROJECT:-}"
ZONE="${ZONE:-}"
TPU_NAME="${TPU_NAME:-usmqs}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-8}"
BUCKET="${BUCKET:-}"
JAX_TPU_SPEC="${JAX_TPU_SPEC:-jax[tpu]}"
REMOTE_DIR='$HOME/usmqs'  # expanded on the hosts
PY_VERSION=3.12

default_runtime() {
  case "$ACCELERATOR_TYPE" in
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}
RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime)}"

need() {
  for v in "$@"; do
    if [ -z "${!v:-}" ]; then
      if [ "$DRY_RUN" = 1 ]; then
        printf -v "$v" '%s' "\$$v"  # dry run: show the variable instead of a value
      else
        echo "tpu_vm.sh: set $v (see launch/tpu_vm.sh --help)" >&2; exit 2
      fi
    fi
  done
}

# One shell word: as is when plain, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Print (dry run) or run a command; the printed form can be pasted into a shell.
run_cmd() {
  if [ "$DRY_RUN" = 1 ]; then
    local first=1
    for a in "$@"; do
      [ $first = 1 ] || printf ' '
      quote "$a"; first=0
    done
    echo
  else
    "$@"
  fi
}

tpu() {  # gcloud compute tpus tpu-vm SUB NAME ... --zone --project
  local sub="$1"; shift
  run_cmd gcloud compute tpus tpu-vm "$sub" "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" "$@"
}

# Hosts in the slice: 4 chips per host on v5e/v6e (8 on v5litepod-8 is 1 host), 4 on v4/v5p.
workers_from_type() {
  local chips="${ACCELERATOR_TYPE##*-}"
  case "$ACCELERATOR_TYPE" in
    v5litepod-*|v5e-*|v6e-*) [ "$chips" -le 8 ] && echo 1 || echo $((chips / 4)) ;;
    v4-*|v5p-*) echo $(( (chips / 2 + 3) / 4 )) ;;  # type counts TensorCores, 2 per chip
    *) echo 1 ;;
  esac
}

num_workers() {
  if [ -n "${NUM_WORKERS:-}" ]; then echo "$NUM_WORKERS"; return; fi
  if [ "$DRY_RUN" = 1 ]; then workers_from_type; return; fi
  local ips
  ips="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --format='value(networkEndpoints[].ipAddress)')"
  echo "$ips" | tr ';,' '\n\n' | grep -c .
}

case "$SUBCOMMAND" in
  create)
    need PROJECT ZONE
    extra=()
    [ "${SPOT:-0}" = 1 ] && extra+=(--spot)
    tpu create --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
      "${extra[@]+"${extra[@]}"}"
    ;;

  install)
    need PROJECT ZONE BUCKET
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    archive="${TMPDIR:-/tmp}/usmqs-$$.tar.gz"
    run_cmd git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
    run_cmd gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:usmqs.tar.gz" --worker=all \
      --zone="$ZONE" --project="$PROJECT"
    remote=$(cat <<EOF
set -euo pipefail
mkdir -p $REMOTE_DIR && tar xzf ~/usmqs.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
export PATH="\$HOME/.local/bin:\$PATH"
uv venv --allow-existing --python $PY_VERSION .venv
uv pip install --python .venv/bin/python -e . '$JAX_TPU_SPEC'
if ! command -v gcsfuse >/dev/null; then
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi
sudo mkdir -p /gcs/$BUCKET && sudo chown \$USER /gcs/$BUCKET
mountpoint -q /gcs/$BUCKET || gcsfuse --implicit-dirs $BUCKET /gcs/$BUCKET
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_devices())'
EOF
)
    tpu ssh --worker=all --command="$remote"
    [ "$DRY_RUN" = 1 ] || rm -f "$archive"
    ;;

  run)
    need PROJECT ZONE
    [ "${1:-}" = "--" ] && shift
    [ $# -ge 1 ] || { echo "tpu_vm.sh run -- COMMAND ..." >&2; exit 2; }
    n="$(num_workers)"
    cmd="$(for a in "$@"; do quote "$a"; printf ' '; done)"
    cmd="${cmd% }"
    env="USMQS_DISTRIBUTED_AUTO=1 JAX_NUM_PROCESSES=$n PATH=$REMOTE_DIR/.venv/bin:\$PATH"
    if [ "${DETACH:-0}" = 1 ]; then
      remote="cd $REMOTE_DIR && $env nohup $cmd > run.log 2>&1 < /dev/null &"
    else
      remote="cd $REMOTE_DIR && $env $cmd"
    fi
    tpu ssh --worker=all --command="$remote"
    ;;

  logs)
    need PROJECT ZONE
    tpu ssh --worker="${WORKER:-0}" --command="tail -n 100 -f $REMOTE_DIR/run.log"
    ;;

  ssh)
    need PROJECT ZONE
    tpu ssh --worker="${WORKER:-0}"
    ;;

  status)
    need PROJECT ZONE
    tpu describe
    ;;

  teardown)
    need PROJECT ZONE
    tpu delete --quiet
    ;;

  *)
    echo "tpu_vm.sh: unknown subcommand '$SUBCOMMAND'" >&2
    usage >&2
    exit 2
    ;;
esac
