#!/usr/bin/env bash
# Train mtl_jax on one machine with one or more NVIDIA GPUs: one Python process owns every GPU
# it can see (CUDA_VISIBLE_DEVICES limits them), so no jax.distributed set-up is needed.
# Run `launch/gpu_single_host.sh --help` for the settings; launch/README.md has a walkthrough.
set -euo pipefail

PROG=gpu_single_host.sh
JAX_VERSION=0.10.2

usage() {
  cat <<'EOF'
Usage: launch/gpu_single_host.sh [--dry-run] COMMAND [-- MAIN_FLAGS...]

Commands:
  install   pip install -e . "jax[$JAX_CUDA]==0.10.2" into the current Python environment
            (activate your venv first; Python >= 3.11)
  train     python -m mtl_jax.main --config=$CONFIG --workdir=$WORKDIR, with the XLA flags below
  all       install, then train

Options:
  -n, --dry-run   print every command (prefixed "+ ") instead of running it; also DRY_RUN=1
                  (read-only probes such as nvidia-smi still run)
  -h, --help      this message
  -- FLAGS...     extra flags for mtl_jax.main, e.g. -- --config.batch_size=512

Settings (environment variables):
  WORKDIR          required for train/all: where checkpoints, metrics and the report go
                   (a local path or gs://...)
  CONFIG           config file relative to the repo root [configs/mtl1000.py]; PATH:variant works
  EXTRA_FLAGS      extra flags for mtl_jax.main, split on whitespace []
  PYTHON           the Python to install into and run [python]
  JAX_CUDA         cuda13 (NVIDIA driver >= 580) or cuda12 (driver >= 525) [cuda13]
  MTL_XLA_DEFAULTS 0: do not add this script's XLA flags [1]
  XLA_FLAGS        your own XLA flags; they go after this script's, so they win
  JAX_COMPILATION_CACHE_DIR  persistent compilation cache [~/.cache/mtl_jax/jax_cache]
  REPO_DIR         the repository root [the directory above launch/]
  DRY_RUN          1: same as --dry-run [0]

Example:
  WORKDIR=runs/mtl1000 launch/gpu_single_host.sh all
EOF
}

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }

# Quote one word for a POSIX shell, only when needed, so that printed commands can be pasted.
quote() {
  local safe='^[A-Za-z0-9_@%+=:,./-]+$'
  if [[ $1 =~ $safe ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

print_cmd() {
  local out="+" a
  for a in "$@"; do out="$out $(quote "$a")"; done
  printf '%s\n' "$out"
}

dry() { [[ $DRY_RUN == 1 ]]; }

# run CMD ARGS...: print it in a dry run, otherwise echo it to stderr and run it.
run() {
  if dry; then
    print_cmd "$@"
  else
    print_cmd "$@" >&2
    "$@"
  fi
}

# ---------------------------------------------------------------------------------------------
# XLA flags for GPU training. Each one exists in the XLA of jax-cuda13-pjrt/jax-cuda12-pjrt
# 0.10.2 (an unknown flag in XLA_FLAGS aborts the program), and each is off by default there.
# They have not been benchmarked on this model: MTL_XLA_DEFAULTS=0 turns them off.
XLA_DEFAULT_FLAGS=(
  # Schedule collectives (the all-reduce of gradients across the GPUs) asynchronously and as
  # early as their inputs allow, so they overlap with the rest of the backward pass instead of
  # running after it.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # The encoder layers are an nn.scan, so each layer's gradient all-reduce sits inside a while
  # loop; pipelining moves it into the next iteration, where it overlaps with that layer's compute.
  --xla_gpu_enable_pipelined_all_reduce=true
)
# Not XLA flags, also set for the run:
#   JAX_COMPILATION_CACHE_DIR  reuse compiled (and autotuned) executables across restarts and
#                              resumes instead of compiling the train step again.
#   PYTHONUNBUFFERED=1         log lines appear as they are written when the output is piped.

# ---------------------------------------------------------------------------------------------
# Arguments and settings.

DRY_RUN=${DRY_RUN:-0}
COMMAND=""
cli_flags=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    -n|--dry-run) DRY_RUN=1 ;;
    --) shift; cli_flags=("$@"); break ;;
    -*) usage >&2; die "unknown option '$1' (flags for mtl_jax.main go after --)" ;;
    *)
      [[ -z $COMMAND ]] || die "one command at a time (got '$COMMAND' and '$1')"
      COMMAND=$1 ;;
  esac
  shift
done
case $DRY_RUN in
  1|true|yes) DRY_RUN=1 ;;
  0|false|no|"") DRY_RUN=0 ;;
  *) die "DRY_RUN must be 0 or 1, got '$DRY_RUN'" ;;
esac
if [[ -z $COMMAND ]]; then
  usage >&2
  die "missing COMMAND (install | train | all)"
fi
case $COMMAND in
  install|train|all) ;;
  *) usage >&2; die "unknown command '$COMMAND' (install | train | all)" ;;
esac

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=${REPO_DIR:-$(dirname "$SCRIPT_DIR")}
CONFIG=${CONFIG:-configs/mtl1000.py}
WORKDIR=${WORKDIR:-}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
PYTHON=${PYTHON:-python}
JAX_CUDA=${JAX_CUDA:-cuda13}
MTL_XLA_DEFAULTS=${MTL_XLA_DEFAULTS:-1}
JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mtl_jax/jax_cache}

[[ -d $REPO_DIR/mtl_jax ]] ||
  die "REPO_DIR=$REPO_DIR is not the mtl_jax checkout (no mtl_jax/ in it): set REPO_DIR"
cd "$REPO_DIR"

case $JAX_CUDA in
  cuda13) min_driver=580 ;;
  cuda12) min_driver=525 ;;
  *) die "JAX_CUDA must be cuda13 or cuda12, got '$JAX_CUDA'" ;;
esac
case $MTL_XLA_DEFAULTS in
  0|1) ;;
  *) die "MTL_XLA_DEFAULTS must be 0 or 1, got '$MTL_XLA_DEFAULTS'" ;;
esac

check_python() {
  dry && return 0
  command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON is not on PATH: activate your environment or set PYTHON"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "PYTHON=$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); jax $JAX_VERSION needs >= 3.11"
}

# Read-only probe, also in a dry run: the jax[$JAX_CUDA] wheels need a recent enough driver.
check_driver() {
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    log "nvidia-smi not found: cannot check the NVIDIA driver (jax[$JAX_CUDA] needs >= $min_driver)"
    return 0
  fi
  local driver gpus
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1) || driver=""
  gpus=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU') || gpus=0
  if [[ -z $driver ]]; then
    log "nvidia-smi found no GPU (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset})"
    return 0
  fi
  if ! [[ ${driver%%.*} =~ ^[0-9]+$ ]]; then
    log "cannot read the NVIDIA driver version from nvidia-smi ('$driver'); jax[$JAX_CUDA] needs >= $min_driver"
    return 0
  fi
  log "NVIDIA driver $driver, $gpus GPU(s) on this machine (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset})"
  if [[ ${driver%%.*} -lt $min_driver ]]; then
    if [[ $JAX_CUDA == cuda13 ]]; then
      die "NVIDIA driver $driver is older than 580, which jax[cuda13] needs: set JAX_CUDA=cuda12 (driver >= 525) or upgrade the driver"
    fi
    die "NVIDIA driver $driver is older than $min_driver, which jax[$JAX_CUDA] needs: upgrade the driver"
  fi
}

cmd_install() {
  check_python
  log "installing into $PYTHON in $REPO_DIR"
  run "$PYTHON" -m pip install -e . "jax[$JAX_CUDA]==$JAX_VERSION"
}

cmd_train() {
  local env_flags=() xla_flags=""
  if [[ -n $EXTRA_FLAGS ]]; then read -r -a env_flags <<<"$EXTRA_FLAGS"; fi
  if [[ $MTL_XLA_DEFAULTS == 1 ]]; then xla_flags="${XLA_DEFAULT_FLAGS[*]}"; fi
  if [[ -n ${XLA_FLAGS:-} ]]; then xla_flags="$xla_flags${xla_flags:+ }$XLA_FLAGS"; fi
  check_python
  log "training in $REPO_DIR; one process drives all visible GPUs"
  run env ${xla_flags:+XLA_FLAGS="$xla_flags"} \
    JAX_COMPILATION_CACHE_DIR="$JAX_COMPILATION_CACHE_DIR" PYTHONUNBUFFERED=1 \
    "$PYTHON" -m mtl_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    ${env_flags[@]+"${env_flags[@]}"} ${cli_flags[@]+"${cli_flags[@]}"}
}

if [[ $COMMAND == train || $COMMAND == all ]]; then
  [[ -n $WORKDIR ]] || die "WORKDIR is not set: set WORKDIR=runs/NAME or gs://BUCKET/PATH (where checkpoints and metrics go)"
  [[ -n $CONFIG ]] || die "CONFIG is empty: set CONFIG=configs/mtl1000.py"
  [[ -f ${CONFIG%%:*} ]] || die "CONFIG=$CONFIG: no file ${CONFIG%%:*} in $REPO_DIR"
fi
check_driver

case $COMMAND in
  install) cmd_install ;;
  train) cmd_train ;;
  all) cmd_install; cmd_train ;;
esac
