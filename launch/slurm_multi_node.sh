#!/usr/bin/env bash
#SBATCH --job-name=mtl_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#
# Train mtl_jax on several GPU nodes under SLURM:
#   WORKDIR=gs://BUCKET/run sbatch launch/slurm_multi_node.sh [-- MAIN_FLAGS...]
# (sbatch's command-line options override the headers above, e.g. sbatch --nodes=4 --partition=p.)
# Run `launch/slurm_multi_node.sh --help` for the settings; launch/README.md has a walkthrough.
#
# One task per node, not per GPU: each node runs one process that drives all of its GPUs, as on
# a TPU VM and in gpu_single_host.sh, so the program sees the same layout everywhere (local
# devices = the node's GPUs) and each node builds one input pipeline (tokenizer, catalogue,
# batches) instead of one per GPU, with less host memory and CPU spent on it. The catch: JAX's
# SLURM auto-detection assumes one process per GPU and restricts each process to GPU
# $SLURM_LOCALID, i.e. GPU 0 only; JAX_LOCAL_DEVICE_IDS=0,...,N-1 below gives it all of them.
#
# --exclusive and --mem=0 give the job the whole nodes (every CPU for the input pipeline, all of
# the memory); --output is relative to the directory sbatch was run from.
set -euo pipefail

PROG=slurm_multi_node.sh

usage() {
  cat <<'EOF'
Usage: sbatch [SBATCH_OPTIONS] launch/slurm_multi_node.sh [--dry-run] [-- MAIN_FLAGS...]
       launch/slurm_multi_node.sh --dry-run      (inside an allocation, e.g. under salloc)
       SLURM_JOB_ID=1 SLURM_JOB_NODELIST='gpu-[001-004]' SLURM_NTASKS=4 SLURM_GPUS_ON_NODE=8 \
         WORKDIR=... launch/slurm_multi_node.sh --dry-run      (anywhere: stand-in values)

Runs, with one task per node (see the comment at the top of this script for why):
  srun ... python -m mtl_jax.main --config=$CONFIG --workdir=$WORKDIR --distributed
with JAX_COORDINATOR_ADDRESS (first host of $SLURM_JOB_NODELIST, from scontrol show hostnames),
JAX_NUM_PROCESSES=$SLURM_NTASKS and, in each task, JAX_PROCESS_ID=$SLURM_PROCID; the same values
are passed as --coordinator_address, --num_processes and --process_id.

Options:
  -n, --dry-run   print every command (prefixed "+ ") instead of running it; also DRY_RUN=1
                  (scontrol show hostnames still runs where it exists: the printed commands
                  need the hosts; outside SLURM, with no scontrol, the dry run expands
                  SLURM_JOB_NODELIST itself, e.g. gpu-[001-004] or a,b, and says so)
  -h, --help      this message
  -- FLAGS...     extra flags for mtl_jax.main, e.g. -- --config.batch_size=2048

Settings (environment variables; sbatch passes your environment on to the job):
  WORKDIR           required: gs://... or a directory every node shares (checkpoints, metrics)
  CONFIG            config file relative to the repo root [configs/mtl1000.py]; PATH:variant works
  EXTRA_FLAGS       extra flags for mtl_jax.main, split on whitespace []
  PYTHON            the Python to run on every node (activate your venv before sbatch) [python]
  GPUS_PER_NODE     GPUs each process drives [$SLURM_GPUS_ON_NODE, else from $SLURM_GPUS_PER_NODE]
  COORDINATOR_PORT  port of process 0's coordinator [61440 + $SLURM_JOB_ID % 4096]
  REPO_DIR          the repository root [the directory above launch/, else $SLURM_SUBMIT_DIR]
  MTL_XLA_DEFAULTS  0: do not add the GPU XLA flags (same as gpu_single_host.sh) [1]
  XLA_FLAGS         your own XLA flags; they go after the defaults, so they win
  JAX_COMPILATION_CACHE_DIR  persistent compilation cache [~/.cache/mtl_jax/jax_cache]
  DRY_RUN           1: same as --dry-run [0]
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

# set_env NAME VALUE: export it for srun to pass on to the tasks, and show it.
set_env() {
  export "$1=$2"
  if dry; then
    printf '+ export %s=%s\n' "$1" "$(quote "$2")"
  else
    printf '+ export %s=%s\n' "$1" "$(quote "$2")" >&2
  fi
}

# expand_nodelist LIST: one host per line, the way `scontrol show hostnames LIST` prints them, for
# the common forms of a SLURM host list: "host", "a,b,c", "gpu-[001-004]", "n[1,3,8-10]",
# "rack[1-2]-n[01-02]" and commas between such items. Numbers keep the width of a range's first
# number ("[08-10]": 08 09 10). Fails (status 1) on anything else. Used only by a dry run
# outside SLURM, where there is no scontrol to ask.
expand_nodelist() {
  local list=$1 item="" depth=0 c i
  for ((i = 0; i < ${#list}; i++)); do
    c=${list:i:1}
    case $c in
      '[') depth=$((depth + 1)) ;;
      ']') depth=$((depth - 1)); [[ $depth -ge 0 ]] || return 1 ;;
      ',')
        if [[ $depth -eq 0 ]]; then
          expand_hostname "$item" || return 1
          item=""
          continue
        fi ;;
    esac
    item+=$c
  done
  [[ $depth -eq 0 ]] || return 1
  expand_hostname "$item"
}

# expand_hostname ITEM: the hosts of one comma-free item (its first [...] group expanded, the
# rest recursively).
expand_hostname() {
  local host=$1 prefix rest spec range lo hi n
  local -a ranges
  [[ -n $host ]] || return 1
  if [[ $host != *'['* ]]; then
    [[ $host =~ ^[A-Za-z0-9._-]+$ ]] || return 1
    printf '%s\n' "$host"
    return 0
  fi
  prefix=${host%%\[*}
  rest=${host#*\[}
  spec=${rest%%\]*}
  rest=${rest#*\]}
  [[ $spec =~ ^[0-9,-]+$ ]] || return 1
  IFS=, read -r -a ranges <<<"$spec"
  [[ ${#ranges[@]} -gt 0 ]] || return 1
  for range in "${ranges[@]}"; do
    if [[ $range =~ ^([0-9]+)-([0-9]+)$ ]]; then
      lo=${BASH_REMATCH[1]} hi=${BASH_REMATCH[2]}
    elif [[ $range =~ ^[0-9]+$ ]]; then
      lo=$range hi=$range
    else
      return 1
    fi
    [[ $((10#$lo)) -le $((10#$hi)) ]] || return 1
    for ((n = 10#$lo; n <= 10#$hi; n++)); do
      expand_hostname "$prefix$(printf '%0*d' "${#lo}" "$n")$rest" || return 1
    done
  done
}

# The GPU XLA flags of gpu_single_host.sh (documented there): overlap the gradient all-reduce
# with the backward pass, and pipeline it across the iterations of the scanned encoder layers.
XLA_DEFAULT_FLAGS=(
  --xla_gpu_enable_latency_hiding_scheduler=true
  --xla_gpu_enable_pipelined_all_reduce=true
)

# ---------------------------------------------------------------------------------------------
# Arguments and settings.

DRY_RUN=${DRY_RUN:-0}
cli_flags=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    -n|--dry-run) DRY_RUN=1 ;;
    --) shift; cli_flags=("$@"); break ;;
    *) usage >&2; die "unknown argument '$1' (flags for mtl_jax.main go after --)" ;;
  esac
  shift
done
case $DRY_RUN in
  1|true|yes) DRY_RUN=1 ;;
  0|false|no|"") DRY_RUN=0 ;;
  *) die "DRY_RUN must be 0 or 1, got '$DRY_RUN'" ;;
esac

CONFIG=${CONFIG:-configs/mtl1000.py}
WORKDIR=${WORKDIR:-}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
PYTHON=${PYTHON:-python}
MTL_XLA_DEFAULTS=${MTL_XLA_DEFAULTS:-1}
JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mtl_jax/jax_cache}

[[ -n ${SLURM_JOB_NODELIST:-} ]] ||
  die "SLURM_JOB_NODELIST is not set: this is not a SLURM job; submit it with: WORKDIR=... sbatch launch/slurm_multi_node.sh"
[[ -n $WORKDIR ]] ||
  die "WORKDIR is not set: set WORKDIR=gs://BUCKET/PATH or a directory all nodes share, e.g. WORKDIR=gs://b/run sbatch launch/slurm_multi_node.sh"
[[ -n $CONFIG ]] || die "CONFIG is empty: set CONFIG=configs/mtl1000.py"
case $MTL_XLA_DEFAULTS in
  0|1) ;;
  *) die "MTL_XLA_DEFAULTS must be 0 or 1, got '$MTL_XLA_DEFAULTS'" ;;
esac

# Under sbatch this script runs from a copy in slurmd's spool directory, so the repository is
# found through REPO_DIR or the directory sbatch was run from.
if [[ -z ${REPO_DIR:-} ]]; then
  script_parent=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [[ -d $script_parent/mtl_jax ]]; then
    REPO_DIR=$script_parent
  elif [[ -n ${SLURM_SUBMIT_DIR:-} && -d $SLURM_SUBMIT_DIR/mtl_jax ]]; then
    REPO_DIR=$SLURM_SUBMIT_DIR
  else
    die "cannot find the mtl_jax checkout: run sbatch from the repository root, or set REPO_DIR"
  fi
fi
[[ -d $REPO_DIR/mtl_jax ]] ||
  die "REPO_DIR=$REPO_DIR is not the mtl_jax checkout (no mtl_jax/ in it): set REPO_DIR"
cd "$REPO_DIR"
[[ -f ${CONFIG%%:*} ]] || die "CONFIG=$CONFIG: no file ${CONFIG%%:*} in $REPO_DIR"

# The coordinator is process 0's host: the first host of the allocation.
if command -v scontrol >/dev/null 2>&1; then
  hostnames=$(scontrol show hostnames "$SLURM_JOB_NODELIST") ||
    die "scontrol show hostnames '$SLURM_JOB_NODELIST' failed"
  first_host=${hostnames%%$'\n'*}
  [[ -n $first_host ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' returned no host"
elif dry; then
  # A dry run outside SLURM (a laptop, CI): the host list is expanded here instead.
  hostnames=$(expand_nodelist "$SLURM_JOB_NODELIST") ||
    die "scontrol is not on PATH and this dry run cannot expand SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST' itself (it knows forms like gpu-[001-004],gpu-010): give a list of that form, or run the dry run inside an allocation (salloc), where scontrol is on PATH"
  first_host=${hostnames%%$'\n'*}
else
  die "scontrol is not on PATH: run this inside a SLURM job (outside SLURM only --dry-run works)"
fi
num_nodes=$(printf '%s\n' "$hostnames" | grep -c .)
if ! command -v scontrol >/dev/null 2>&1; then
  log "dry run outside SLURM (no scontrol on PATH): stand-in hosts ${hostnames//$'\n'/,} expanded by this script from SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'; SLURM_JOB_ID, SLURM_NTASKS and the GPU count are the values you set, not a real allocation's"
fi

if [[ -n ${COORDINATOR_PORT:-} ]]; then
  port=$COORDINATOR_PORT
else
  [[ -n ${SLURM_JOB_ID:-} ]] || die "SLURM_JOB_ID is not set: set COORDINATOR_PORT"
  # Per-job port in 61440-65535 (what JAX itself picks under SLURM), so that jobs sharing a
  # first node do not collide.
  port=$((61440 + SLURM_JOB_ID % 4096))
fi
[[ $port =~ ^[0-9]+$ && $port -ge 1 && $port -le 65535 ]] || die "COORDINATOR_PORT=$port is not a port number"

ntasks=${SLURM_NTASKS:-$((num_nodes * ${SLURM_NTASKS_PER_NODE:-1}))}
[[ $ntasks =~ ^[0-9]+$ ]] || die "SLURM_NTASKS=$ntasks is not a number"
if [[ $ntasks -ne $num_nodes ]]; then
  die "this script runs one task per node, but the job has SLURM_NTASKS=$ntasks tasks on $num_nodes nodes: submit with --ntasks-per-node=1 (the default in its #SBATCH headers)"
fi

gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
if [[ -z $gpus && -n ${SLURM_GPUS_PER_NODE:-} ]]; then
  gpus=${SLURM_GPUS_PER_NODE##*:}  # "8" or "h100:8"
fi
[[ -n $gpus ]] ||
  die "GPUS_PER_NODE is not set and SLURM gives no GPU count (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE): submit with --gpus-per-node=N or set GPUS_PER_NODE"
[[ $gpus =~ ^[0-9]+$ && $gpus -ge 1 ]] || die "GPUS_PER_NODE=$gpus is not a positive number"
local_ids=0
for ((i = 1; i < gpus; i++)); do local_ids="$local_ids,$i"; done

if [[ $WORKDIR != gs://* ]]; then
  log "WORKDIR=$WORKDIR is not on GCS: it must be on a filesystem all $num_nodes nodes share"
fi
dry || command -v srun >/dev/null 2>&1 || die "srun is not on PATH: run this inside a SLURM job"

xla_flags=""
if [[ $MTL_XLA_DEFAULTS == 1 ]]; then xla_flags="${XLA_DEFAULT_FLAGS[*]}"; fi
if [[ -n ${XLA_FLAGS:-} ]]; then xla_flags="$xla_flags${xla_flags:+ }$XLA_FLAGS"; fi

log "job ${SLURM_JOB_ID:-?}: $num_nodes nodes x $gpus GPUs, coordinator $first_host:$port, in $REPO_DIR"
set_env JAX_COORDINATOR_ADDRESS "$first_host:$port"
set_env JAX_NUM_PROCESSES "$ntasks"
set_env JAX_LOCAL_DEVICE_IDS "$local_ids"
if [[ -n $xla_flags ]]; then set_env XLA_FLAGS "$xla_flags"; fi
set_env JAX_COMPILATION_CACHE_DIR "$JAX_COMPILATION_CACHE_DIR"
set_env PYTHONUNBUFFERED 1

env_flags=()
if [[ -n $EXTRA_FLAGS ]]; then read -r -a env_flags <<<"$EXTRA_FLAGS"; fi
srun_flags=(--kill-on-bad-exit=1 --nodes="$num_nodes" --ntasks="$ntasks" --ntasks-per-node=1)
# srun in Slurm 22.05-23.02 does not inherit --cpus-per-task from sbatch.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then srun_flags+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi

# JAX_PROCESS_ID differs per task, so it is set inside each task from its own SLURM_PROCID.
# mtl_jax.main hands its --coordinator_address/--num_processes/--process_id flags to
# jax.distributed.initialize(), so the same values go there too.
# shellcheck disable=SC2016  # $SLURM_PROCID is expanded by each task's shell, not here.
run srun "${srun_flags[@]}" \
  bash -c 'export JAX_PROCESS_ID="$SLURM_PROCID"; exec "$@" --process_id="$JAX_PROCESS_ID"' mtl_jax \
  "$PYTHON" -m mtl_jax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed \
  --coordinator_address="$first_host:$port" --num_processes="$ntasks" \
  ${env_flags[@]+"${env_flags[@]}"} ${cli_flags[@]+"${cli_flags[@]}"}
