#!/usr/bin/env bash
# Train mtl_jax on a Cloud TPU VM or pod slice: create it, install the project on every worker,
# start training on all workers with --distributed, follow the log, delete it.
# Run `launch/tpu_vm.sh --help` for the settings; launch/README.md has a walkthrough.
#
# Works with the bash 3.2 that macOS ships (no mapfile, no associative arrays), since this script
# usually runs from a laptop.
set -euo pipefail

PROG=tpu_vm.sh
JAX_VERSION=0.10.2

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh [--dry-run] COMMAND [-- MAIN_FLAGS...]

Commands:
  create    gcloud compute tpus tpu-vm create (a single host or a pod slice)
  install   put the repository on every worker (git clone of REPO_URL, or a copy of this
            checkout) and pip install -e . "jax[tpu]==0.10.2" into ~/mtl_jax_venv (Python 3.11,
            installed with uv: the TPU images ship Python 3.10, jax 0.10.2 needs >= 3.11)
  train     start `python -m mtl_jax.main --config=$CONFIG --workdir=$WORKDIR --distributed`
            on all workers, detached (nohup), logging to ~/mtl_jax_train.log on each worker
  logs      follow the training log of worker $LOG_WORKER until its training process exits;
            exits with the training's exit status
  delete    delete the TPU VM (its local logs go with it; the workdir on GCS stays)
  all       create, install, train, logs, then delete if training succeeded (KEEP_TPU=1 keeps it)

Options:
  -n, --dry-run   print every command (prefixed "+ ") instead of running it; also DRY_RUN=1
  -h, --help      this message
  -- FLAGS...     extra flags for mtl_jax.main, e.g. -- --config.batch_size=1024

Settings (environment variables):
  WORKDIR           required for train/all: gs://BUCKET/PATH. A single host (e.g. v4-8) may use
                    an absolute path on the VM instead; a multi-host slice may not, since all
                    workers write checkpoints to one place
  CONFIG            config file relative to the repo root [configs/mtl1000.py]; PATH:variant works
  EXTRA_FLAGS       extra flags for mtl_jax.main, split on whitespace []
  TPU_NAME          [mtl-jax]
  ZONE              [us-central2-b]
  ACCELERATOR_TYPE  e.g. v4-8 (1 host), v4-32 (4 hosts), v5litepod-16, v5p-32, v6e-16 [v4-32]
  RUNTIME_VERSION   TPU software version [by generation: v2/v3/v4 tpu-ubuntu2204-base,
                    v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e]
  PROJECT           GCP project [gcloud's configured project]
  TPU_CREATE_FLAGS  extra flags for `tpu-vm create`, e.g. "--spot" or "--network=NET" []
  REPO_URL          git URL to clone on the workers; empty: copy this checkout (tracked and
                    untracked-but-not-ignored files) with `gcloud ... tpu-vm scp` []
  REPO_REF          branch, tag or commit to check out after cloning REPO_URL []
  REPO_DIR          the local checkout to copy [the directory above launch/]
  PYTHON_VERSION    Python for the venv on the workers [3.11]
  LOG_WORKER        worker whose log `logs` follows [0]
  KEEP_TPU          1: `all` does not delete the TPU VM at the end [0]
  DRY_RUN           1: same as --dry-run [0]

Example:
  WORKDIR=gs://my-bucket/mtl1000 ACCELERATOR_TYPE=v4-32 launch/tpu_vm.sh all
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

# run_sh 'PIPELINE': the same for a shell pipeline (run with bash -o pipefail).
run_sh() {
  if dry; then
    printf '+ %s\n' "$1"
  else
    printf '+ %s\n' "$1" >&2
    bash -o pipefail -c "$1"
  fi
}

# join_quoted WORDS...: the words quoted and joined by spaces, for a remote command line.
join_quoted() {
  local out="" a
  for a in "$@"; do out="$out${out:+ }$(quote "$a")"; done
  printf '%s' "$out"
}

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
  die "missing COMMAND (create | install | train | logs | delete | all)"
fi
case $COMMAND in
  create|install|train|logs|delete|all) ;;
  *) usage >&2; die "unknown command '$COMMAND' (create | install | train | logs | delete | all)" ;;
esac

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=${REPO_DIR:-$(dirname "$SCRIPT_DIR")}
TPU_NAME=${TPU_NAME:-mtl-jax}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
PROJECT=${PROJECT:-}
TPU_CREATE_FLAGS=${TPU_CREATE_FLAGS:-}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-}
CONFIG=${CONFIG:-configs/mtl1000.py}
WORKDIR=${WORKDIR:-}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
LOG_WORKER=${LOG_WORKER:-0}
KEEP_TPU=${KEEP_TPU:-0}

# Paths on the workers, relative to the remote $HOME (expanded there, not here).
R_SRC="\$HOME/mtl_jax"
R_VENV="\$HOME/mtl_jax_venv"
R_TARBALL="\$HOME/mtl_jax-src.tgz"
R_LOG="\$HOME/mtl_jax_train.log"
R_PID="\$HOME/mtl_jax_train.pid"
R_EXIT="\$HOME/mtl_jax_train.exit"

check_tpu_settings() {
  [[ -n $TPU_NAME ]] || die "TPU_NAME is empty: set TPU_NAME=name-of-the-tpu-vm"
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "TPU_NAME='$TPU_NAME' is not a valid name (lowercase letters, digits and '-', starting with a letter)"
  [[ -n $ZONE ]] || die "ZONE is empty: set ZONE, e.g. ZONE=us-central2-b"
  [[ -n $ACCELERATOR_TYPE ]] || die "ACCELERATOR_TYPE is empty: set ACCELERATOR_TYPE, e.g. v4-32"
  [[ $ACCELERATOR_TYPE =~ ^[a-z0-9]+-[0-9]+$ ]] ||
    die "ACCELERATOR_TYPE='$ACCELERATOR_TYPE' does not look like GENERATION-SIZE (e.g. v4-32, v5litepod-16)"
  if [[ -z $RUNTIME_VERSION ]]; then
    case $ACCELERATOR_TYPE in
      v2-*|v3-*|v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
      v5litepod-*|v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
      v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
      v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
      *) die "RUNTIME_VERSION is not set and there is no default for ACCELERATOR_TYPE=$ACCELERATOR_TYPE: set RUNTIME_VERSION" ;;
    esac
  fi
}

# Slices larger than 8 (TensorCores on v2-v4/v5p, chips on v5e/v6e) span several hosts.
is_multi_host() {
  local size=${ACCELERATOR_TYPE##*-}
  [[ $size -gt 8 ]]
}

check_source_settings() {
  if [[ -n $REPO_URL ]]; then
    return
  fi
  [[ -n $REPO_REF ]] && die "REPO_REF is set but REPO_URL is not: set REPO_URL to clone, or unset REPO_REF to copy $REPO_DIR"
  [[ -d $REPO_DIR/mtl_jax ]] ||
    die "REPO_DIR=$REPO_DIR is not the mtl_jax checkout (no mtl_jax/ in it): set REPO_DIR, or REPO_URL to clone instead"
  git -C "$REPO_DIR" rev-parse --git-dir >/dev/null 2>&1 ||
    die "REPO_DIR=$REPO_DIR is not a git checkout, needed to list the files to copy: set REPO_URL to clone instead"
  local deleted
  deleted=$(git -C "$REPO_DIR" ls-files --deleted)
  [[ -z $deleted ]] ||
    die "tracked files are deleted in $REPO_DIR, the copy would fail on them: restore them or commit the deletion: $(printf '%s ' "$deleted")"
}

check_train_settings() {
  [[ -n $WORKDIR ]] || die "WORKDIR is not set: set WORKDIR=gs://BUCKET/PATH (where checkpoints and metrics go)"
  [[ -n $CONFIG ]] || die "CONFIG is empty: set CONFIG=configs/mtl1000.py"
  if is_multi_host && [[ $WORKDIR != gs://* ]]; then
    die "WORKDIR must be a gs:// path on the multi-host slice ACCELERATOR_TYPE=$ACCELERATOR_TYPE (every worker writes checkpoints to the workdir, so it has to be shared storage), got WORKDIR=$WORKDIR"
  fi
  if [[ $WORKDIR != gs://* && $WORKDIR != /* ]]; then
    die "WORKDIR=$WORKDIR: use gs://... or an absolute path on the VM (a relative one would land in ~/mtl_jax, which install replaces)"
  fi
  # With REPO_URL the config lives in the cloned repository; only a local copy can be checked.
  if [[ -z $REPO_URL && ! -f $REPO_DIR/${CONFIG%%:*} ]]; then
    die "CONFIG=$CONFIG: no file ${CONFIG%%:*} in $REPO_DIR"
  fi
}

check_gcloud() {
  dry || command -v gcloud >/dev/null 2>&1 ||
    die "gcloud is not on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk) and run gcloud auth login"
}

gcloud_common=()
set_gcloud_common() {
  gcloud_common=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then gcloud_common+=(--project="$PROJECT"); fi
}

# ---------------------------------------------------------------------------------------------
# Commands.

cmd_create() {
  local create_flags=()
  if [[ -n $TPU_CREATE_FLAGS ]]; then read -r -a create_flags <<<"$TPU_CREATE_FLAGS"; fi
  log "creating $ACCELERATOR_TYPE TPU VM $TPU_NAME in $ZONE (runtime $RUNTIME_VERSION)"
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${gcloud_common[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    ${create_flags[@]+"${create_flags[@]}"}
}

ssh_workers() {  # ssh_workers WORKER REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_common[@]}" --worker="$1" --command="$2"
}

# A remote snippet that fails while a training started by `train` still runs on the worker.
running_guard() {
  printf '%s' "if [ -f $R_PID ] && kill -0 \"\$(cat $R_PID)\" 2>/dev/null; then echo \"training already running on \$(hostname) (pid \$(cat $R_PID))\" >&2; exit 1; fi"
}

cmd_install() {
  local fetch
  if [[ -n $REPO_URL ]]; then
    fetch="rm -rf $R_SRC && git clone --quiet $(quote "$REPO_URL") $R_SRC"
    if [[ -n $REPO_REF ]]; then
      fetch="$fetch && git -C $R_SRC checkout --quiet $(quote "$REPO_REF")"
    fi
  else
    local tarball="${TMPDIR:-/tmp}/mtl_jax-src-$TPU_NAME.tgz"
    log "copying $REPO_DIR (tracked and untracked-but-not-ignored files) to every worker"
    # COPYFILE_DISABLE keeps macOS tar from adding ._* resource-fork files.
    run_sh "cd $(quote "$REPO_DIR") && git ls-files -z --cached --others --exclude-standard | COPYFILE_DISABLE=1 tar --null -T - -czf $(quote "$tarball")"
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:mtl_jax-src.tgz" "${gcloud_common[@]}" --worker=all
    fetch="rm -rf $R_SRC && mkdir -p $R_SRC && tar -xzf $R_TARBALL -C $R_SRC"
  fi
  log "installing on every worker: Python $PYTHON_VERSION venv in ~/mtl_jax_venv, pip install -e . jax[tpu]==$JAX_VERSION"
  # Replacing the code under a running training (an editable install) would break it.
  ssh_workers all "set -euo pipefail; $(running_guard); $fetch && cd $R_SRC && python3 -m pip install --user --quiet --upgrade uv && \$HOME/.local/bin/uv venv --seed --allow-existing --python $(quote "$PYTHON_VERSION") $R_VENV && $R_VENV/bin/python -m pip install -e . \"jax[tpu]==$JAX_VERSION\""
}

cmd_train() {
  local env_flags=() main_cmd
  if [[ -n $EXTRA_FLAGS ]]; then read -r -a env_flags <<<"$EXTRA_FLAGS"; fi
  main_cmd="$R_VENV/bin/python -m mtl_jax.main $(join_quoted --config="$CONFIG" --workdir="$WORKDIR" --distributed \
    ${env_flags[@]+"${env_flags[@]}"} ${cli_flags[@]+"${cli_flags[@]}"})"
  log "starting training on all workers of $TPU_NAME; follow it with: launch/tpu_vm.sh logs"
  # On a TPU VM jax.distributed.initialize() finds the coordinator, the process count and this
  # worker's id from the TPU metadata, so --distributed needs no other flag. The training runs in
  # a background subshell that ignores SIGHUP (it outlives the ssh session) and records its exit
  # status for `logs`; refuse to start a second one while one is running (it would hold the TPU).
  ssh_workers all "cd $R_SRC && $(running_guard); rm -f $R_EXIT; ( trap \"\" HUP; PYTHONUNBUFFERED=1 $main_cmd; echo \$? > $R_EXIT ) > $R_LOG 2>&1 < /dev/null & echo \$! > $R_PID"
}

cmd_logs() {
  [[ $LOG_WORKER =~ ^[0-9]+$ ]] || die "LOG_WORKER must be a worker number, got '$LOG_WORKER'"
  # tail --pid stops when the training process exits; then exit with the training's status.
  ssh_workers "$LOG_WORKER" "test -f $R_PID || { echo \"no training started on this worker (no $R_PID): run launch/tpu_vm.sh train\" >&2; exit 1; }; tail -n 100 -F --pid=\"\$(cat $R_PID)\" $R_LOG; test -f $R_EXIT || { echo \"training process ended without an exit status\" >&2; exit 1; }; exit \"\$(cat $R_EXIT)\""
}

cmd_delete() {
  log "deleting TPU VM $TPU_NAME in $ZONE"
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${gcloud_common[@]}" --quiet
}

check_tpu_settings
set_gcloud_common
case $COMMAND in
  install|all) check_source_settings ;;
esac
case $COMMAND in
  train|all) check_train_settings ;;
esac
check_gcloud

case $COMMAND in
  create) cmd_create ;;
  install) cmd_install ;;
  train) cmd_train ;;
  logs) cmd_logs ;;
  delete) cmd_delete ;;
  all)
    cmd_create
    cmd_install
    cmd_train
    if ! cmd_logs; then
      die "training on worker $LOG_WORKER failed or its log could not be followed; $TPU_NAME is kept for debugging: launch/tpu_vm.sh delete"
    fi
    if [[ $KEEP_TPU == 1 ]]; then
      log "KEEP_TPU=1: keeping $TPU_NAME; delete it with: launch/tpu_vm.sh delete"
    else
      cmd_delete
    fi
    ;;
esac
