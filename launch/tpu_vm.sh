#!/usr/bin/env bash
# Pretrains on a Cloud TPU VM slice: create it, install this package on every worker, start
# `python3 -m mlm.train` on all workers at once (mlm.distributed finds the slice), detached from
# this session, follow worker 0's log until training ends, and delete the slice at the end, also
# when something fails or on Ctrl-C (unless --keep or --detach).
#
# Usage:
#   launch/tpu_vm.sh --name NAME --zone ZONE --accelerator-type TYPE --config CONFIG \
#       --workdir gs://BUCKET/DIR [--version RUNTIME] [--project PROJECT] \
#       [--spot | --preemptible] [--max-restarts N] [--keep] [--detach] [--dry-run] \
#       [--config.FIELD=VALUE ...] [-- mlm.train ARGS...]
#   e.g. launch/tpu_vm.sh --name bert-base --zone us-central2-b --accelerator-type v4-32 \
#       --config configs/bert_base.py --workdir gs://my-bucket/bert_base --config.train.num_steps=1000
#
# Each option can come from the environment instead: NAME, ZONE, ACCELERATOR_TYPE
# (v4-32, v5litepod-16, v6e-8, ...), RUNTIME_VERSION (default by TPU generation), CONFIG (a file
# inside this repository), WORKDIR, PROJECT, SPOT=1, PREEMPTIBLE=1, MAX_RESTARTS, KEEP=1.
# Config overrides (--config.FIELD=VALUE) may come before --; every other mlm.train flag goes
# after --, and an option the script does not know is an error.
#
#   --dry-run       print every gcloud command, shell-quoted, one per line, and run none.
#   --detach        return once training has started (implies --keep); it goes on on the slice.
#   --spot, --preemptible
#                   create a Spot (or preemptible) slice and supervise it: when it is preempted
#                   (state PREEMPTED, or gone), delete it, create it again, reinstall and rerun
#                   the same training command, which resumes from WORKDIR's last checkpoint; at
#                   most --max-restarts times (default 5), then stop with an error. Needs a
#                   gs:// WORKDIR. A training failure that is not a preemption is not retried.
#
# Training runs under nohup and setsid on every worker, its output in ~/mlm_train.log there and
# its exit status in ~/mlm_train.status once it ends. The script prints worker 0's new log lines
# every MLM_TPU_POLL_S seconds (default 60) and exits with worker 0's training status.
#
# A slice with more than one host (a size above 8) needs a gs:// WORKDIR: every worker writes
# checkpoints to the same place. mlm.train writes its workdir through the local filesystem, so a
# gs://BUCKET/DIR WORKDIR is mounted with Cloud Storage FUSE (gcsfuse, installed if missing) at
# ~/gcs/BUCKET on every worker and training gets --workdir ~/gcs/BUCKET/DIR; the VM's service
# account needs read and write access to the bucket. The package is installed with its tpu extra
# (jax[tpu] at the tested version); PIP_PACKAGES (default none) are installed with it. Needs
# gcloud, authenticated (except for --dry-run).
set -euo pipefail

# Prints its arguments as one line of shell words, single-quoted where needed.
print_command() {
  local word line="" quote="'\\''"
  for word in "$@"; do
    if [[ $word =~ ^[-A-Za-z0-9_./=:@,+%]+$ ]]; then
      line+=" $word"
    else
      line+=" '${word//\'/$quote}'"
    fi
  done
  echo "${line# }"
}

die() {
  echo "error: $*" >&2
  exit 2
}

usage_error() {
  echo "error: $*" >&2
  echo "usage: launch/tpu_vm.sh --name NAME --zone ZONE --accelerator-type TYPE --config CONFIG --workdir gs://BUCKET/DIR [OPTIONS] [--config.FIELD=VALUE ...] [-- mlm.train ARGS...]; see --help" >&2
  exit 2
}

name=${NAME:-}
zone=${ZONE:-}
accelerator_type=${ACCELERATOR_TYPE:-}
runtime_version=${RUNTIME_VERSION:-}
config=${CONFIG:-}
workdir=${WORKDIR:-}
project=${PROJECT:-}
spot=${SPOT:-}
preemptible=${PREEMPTIBLE:-}
max_restarts=${MAX_RESTARTS:-5}
keep=${KEEP:-}
detach=""
dry_run=""
pip_packages=${PIP_PACKAGES:-}
poll_s=${MLM_TPU_POLL_S:-60}
train_args=()

while (($# > 0)); do
  case $1 in
    --name | --zone | --accelerator-type | --version | --config | --workdir | --project | --max-restarts)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --name) name=$2 ;;
        --zone) zone=$2 ;;
        --accelerator-type) accelerator_type=$2 ;;
        --version) runtime_version=$2 ;;
        --config) config=$2 ;;
        --workdir) workdir=$2 ;;
        --project) project=$2 ;;
        --max-restarts) max_restarts=$2 ;;
      esac
      shift 2
      ;;
    --spot) spot=1 && shift ;;
    --preemptible) preemptible=1 && shift ;;
    --keep) keep=1 && shift ;;
    --detach) detach=1 && shift ;;
    --dry-run) dry_run=1 && shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' && exit 0 ;;
    --) shift && train_args+=("$@") && break ;;
    # Config overrides go to mlm.train, as `--config.a.b=1` or `--config.a.b 1`.
    --config.*=*) train_args+=("$1") && shift ;;
    --config.*)
      if (($# >= 2)) && [[ $2 != --* ]]; then
        train_args+=("$1" "$2") && shift 2
      else
        train_args+=("$1") && shift
      fi
      ;;
    *) usage_error "unknown option '$1'; mlm.train flags other than --config.FIELD go after --" ;;
  esac
done

# --- Validate everything before the first gcloud call. ---
[[ -n $name ]] || die "no TPU name; pass --name NAME (or set NAME)"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "NAME '$name' is not a valid TPU name; use lowercase letters, digits and hyphens"
[[ -n $zone ]] || die "no zone; pass --zone ZONE, e.g. us-central2-b (or set ZONE)"
[[ -n $accelerator_type ]] ||
  die "no accelerator type; pass --accelerator-type, e.g. v4-32 (or set ACCELERATOR_TYPE)"
[[ $accelerator_type =~ ^(v[0-9][a-z0-9]*)-([0-9]+)$ ]] ||
  die "ACCELERATOR_TYPE '$accelerator_type' is not GENERATION-SIZE; use e.g. v4-32 or v5litepod-16"
generation=${BASH_REMATCH[1]}
size=${BASH_REMATCH[2]}
if [[ -z $runtime_version ]]; then
  case $generation in
    v2 | v3 | v4) runtime_version=tpu-ubuntu2204-base ;;
    v5litepod | v5e) runtime_version=v2-alpha-tpuv5-lite ;;
    v5p) runtime_version=v2-alpha-tpuv5 ;;
    v6e) runtime_version=v2-alpha-tpuv6e ;;
    *) die "no default runtime for '$generation'; pass --version RUNTIME (or set RUNTIME_VERSION)" ;;
  esac
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ -n $config ]] || die "no config; pass --config configs/NAME.py (or set CONFIG)"
config_file=${config%%:*} # ml_collections allows `file.py:argument`.
[[ -f $config_file ]] || die "CONFIG '$config_file' is not a file; pass e.g. --config configs/bert_base.py"
config_path=$(cd "$(dirname "$config_file")" && pwd)/$(basename "$config_file")
[[ $config_path == "$repo"/* ]] ||
  die "CONFIG '$config_file' is outside the repository $repo; put it under configs/ (it is copied to the workers)"
remote_config=${config_path#"$repo"/}${config:${#config_file}}
[[ -n $workdir ]] || die "no workdir; pass --workdir gs://BUCKET/DIR (or set WORKDIR)"
# Slices above 8 (chips for v5e/v6e, TensorCores otherwise) have several hosts.
if ((size > 8)) && [[ $workdir != gs://* ]]; then
  die "WORKDIR '$workdir' is not gs://: $accelerator_type has several hosts that must share the workdir; pass --workdir gs://BUCKET/DIR"
fi
[[ -n $spot && -n $preemptible ]] && die "--spot and --preemptible exclude each other; pass one"
if [[ -n $spot$preemptible && $workdir != gs://* ]]; then
  die "WORKDIR '$workdir' is not gs://: a preempted slice loses its disk; pass --workdir gs://BUCKET/DIR to resume there"
fi
[[ $max_restarts =~ ^[0-9]+$ ]] || die "--max-restarts '$max_restarts' is not a whole number"
[[ $poll_s =~ ^[0-9]+([.][0-9]+)?$ ]] || die "MLM_TPU_POLL_S '$poll_s' is not a number of seconds"
[[ -n $detach ]] && keep=1 # Training goes on after the script returns.
if [[ $workdir != gs://* && -z $keep ]]; then
  echo "warning: WORKDIR '$workdir' is on the TPU VM's disk and is deleted with it; use gs:// or --keep" >&2
fi
# mlm.train refuses URL workdirs, so gs://BUCKET/DIR becomes ~/gcs/BUCKET/DIR on the workers
# (mounted below). remote_workdir is shell text for the worker: its ~ must stay unquoted.
bucket=""
remote_workdir=$(printf '%q' "$workdir")
if [[ $workdir == gs://* ]]; then
  gcs_path=${workdir#gs://}
  bucket=${gcs_path%%/*}
  [[ $bucket =~ ^[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]$ ]] ||
    die "WORKDIR '$workdir' has no valid bucket name; pass --workdir gs://BUCKET/DIR"
  gcs_dir=${gcs_path#"$bucket"}
  gcs_dir=${gcs_dir#/}
  mount_point=\~/gcs/$bucket
  remote_workdir=$mount_point${gcs_dir:+/$(printf '%q' "$gcs_dir")}
fi
[[ -n $dry_run ]] || command -v gcloud >/dev/null ||
  die "gcloud not found; install the Google Cloud SDK and run gcloud auth login"

tpu_flags=(--zone="$zone")
[[ -n $project ]] && tpu_flags+=(--project="$project")
create_flags=(--accelerator-type="$accelerator_type" --version="$runtime_version")
[[ -n $spot ]] && create_flags+=(--spot)
[[ -n $preemptible ]] && create_flags+=(--preemptible)

# --- The commands run on the workers (shell text; ~ expands there). ---
install=""
if [[ -n $bucket ]]; then
  # gcsfuse from Google's apt repository (the documented Ubuntu install); the lock timeout waits
  # for the unattended upgrades a fresh VM may be running.
  keyring=/usr/share/keyrings/cloud.google.asc
  apt_get="sudo apt-get -o DPkg::Lock::Timeout=600"
  install+="{ command -v gcsfuse >/dev/null || {"
  install+=" echo \"deb [signed-by=$keyring] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\""
  install+=" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
  install+=" && sudo curl -fsSL -o $keyring https://packages.cloud.google.com/apt/doc/apt-key.gpg"
  install+=" && $apt_get update -qq && $apt_get install -y -q gcsfuse; }; }"
  # --implicit-dirs: see directories that exist only as prefixes of objects (written by other
  # tools). --rename-dir-limit: on a bucket without hierarchical namespace gcsfuse renames a
  # directory only if it has fewer descendants than this (default 0: never), and orbax finalizes
  # every checkpoint on a local path by renaming its temporary directory, which holds many files
  # (more with more hosts and arrays); the generous limit lets that rename (a copy and delete of
  # each object, so not atomic) go through instead of failing the save.
  install+=" && mkdir -p $mount_point && { mountpoint -q $mount_point ||"
  install+=" gcsfuse --implicit-dirs --rename-dir-limit=1000000 $(printf '%q' "$bucket") $mount_point; }"
  install+=" && "
fi
install+="rm -rf ~/mlm && mkdir -p ~/mlm && tar -xzf ~/mlm.tar.gz -C ~/mlm"
install+=" && python3 -m pip install -q --upgrade pip"
install+=" && python3 -m pip install -q -e ~/mlm'[tpu]'"
read -r -a packages <<<"$pip_packages"
for package in ${packages[@]+"${packages[@]}"}; do
  install+=" $(printf '%q' "$package")"
done

train="cd ~/mlm && python3 -m mlm.train --config $(printf '%q' "$remote_config")"
train+=" --workdir $remote_workdir"
for arg in ${train_args[@]+"${train_args[@]}"}; do
  train+=" $(printf '%q' "$arg")"
done
# Training runs detached (nohup, its own session) so that it outlives the ssh session; its exit
# status goes to $status_file once it ends, or `stopped` when SIGTERM (the shutdown of a
# preempted VM) reached it: mlm.train then saves a checkpoint and exits 0 without having finished.
# shellcheck disable=SC2088 # The ~ expands on the worker.
log_file="~/mlm_train.log"
# shellcheck disable=SC2088
status_file="~/mlm_train.status"
run="trap stopped=1 TERM; $train; s=\$?; [ -z \"\${stopped:-}\" ] || s=stopped"
run+="; echo \$s > $status_file.tmp && mv $status_file.tmp $status_file"
# Only the nohup command goes to the background, so that nothing holds the ssh session's output.
start="rm -f $status_file $status_file.tmp"
start+="; nohup setsid bash -c $(print_command "$run") > $log_file 2>&1 < /dev/null &"
follow_hint="gcloud compute tpus tpu-vm ssh $name --zone=$zone${project:+ --project=$project} --worker=0 --command='tail -f $log_file'"

# Runs gcloud compute tpus tpu-vm ARGS, or with --dry-run prints it, shell-quoted, instead.
tpu_vm() {
  if [[ -n $dry_run ]]; then
    print_command gcloud compute tpus tpu-vm "$@"
    return 0
  fi
  gcloud compute tpus tpu-vm "$@"
}

# Prints the slice's state (READY, PREEMPTED, ...), or GONE when describe fails.
slice_state() {
  tpu_vm describe "$name" "${tpu_flags[@]}" --format='value(state)' 2>/dev/null || echo GONE
}

# What worker 0 answers to a poll: its log lines after the first $1, then
# `mlm_train: LINES STATUS` (STATUS: running, stopped or the exit status).
poll_command() {
  local command="s=\$(cat $status_file 2>/dev/null || echo running)"
  command+="; n=\$(wc -l 2>/dev/null < $log_file || echo 0)"
  command+="; [ \"\$n\" -gt $1 ] && sed -n \"$(($1 + 1)),\${n}p\" $log_file"
  command+="; echo \"mlm_train: \$n \$s\""
  echo "$command"
}

# --- Delete the slice on exit (success, failure or Ctrl-C), once it exists. ---
created=""
archive_dir=""
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  [[ -n $archive_dir ]] && rm -rf "$archive_dir"
  if [[ -n $created && -z $keep ]]; then
    echo "deleting TPU VM $name" >&2
    tpu_vm delete "$name" "${tpu_flags[@]}" --quiet ||
      echo "error: could not delete TPU VM $name; run: gcloud compute tpus tpu-vm delete $name --zone=$zone" >&2
  elif [[ -n $created ]]; then
    local why=--keep
    [[ -n $detach ]] && why=--detach
    echo "kept TPU VM $name ($why); delete it with: gcloud compute tpus tpu-vm delete $name --zone=$zone" >&2
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

create_slice() {
  echo "creating TPU VM $name ($accelerator_type, $runtime_version${spot:+, spot}${preemptible:+, preemptible}) in $zone" >&2
  tpu_vm create "$name" "${tpu_flags[@]}" "${create_flags[@]}"
  created=1
}

# Copies the package (pyproject, README, mlm/, configs/) to every worker, installs it and starts
# training there. Returns non-zero when a step fails.
install_and_start() {
  local archive=mlm.tar.gz
  if [[ -n $dry_run ]]; then
    print_command tar -czf "$archive" -C "$repo" --exclude=__pycache__ pyproject.toml README.md LICENSE mlm configs
  else
    [[ -n $archive_dir ]] || archive_dir=$(mktemp -d)
    archive=$archive_dir/mlm.tar.gz
    tar -czf "$archive" -C "$repo" --exclude=__pycache__ pyproject.toml README.md LICENSE mlm configs || return
  fi
  tpu_vm scp "$archive" "$name:mlm.tar.gz" "${tpu_flags[@]}" --worker=all || return
  tpu_vm ssh "$name" "${tpu_flags[@]}" --worker=all --command="$install" || return
  [[ -n $bucket ]] &&
    echo "workdir: $workdir is $remote_workdir on every worker (gs://$bucket mounted at $mount_point with gcsfuse)" >&2
  echo "training: $train" >&2
  tpu_vm ssh "$name" "${tpu_flags[@]}" --worker=all --command="$start" || return
  echo "training runs detached on every worker of $name, its output in $log_file there; follow worker 0 with: $follow_hint" >&2
}

# Prints worker 0's new log lines every $poll_s seconds until training ends (sets train_status
# and returns 0) or the slice is lost (sets lost_state, returns 1).
follow() {
  local shown=0 failures=0 state output last
  while true; do
    sleep "$poll_s"
    state=$(slice_state)
    case $state in
      READY) ;;
      PREEMPTED | TERMINATED | STOPPED | STOPPING | DELETING | GONE)
        # A failed describe may be a passing network error: believe it the third time.
        if [[ $state != GONE ]] || ((++failures >= 3)); then
          lost_state=$state
          return 1
        fi
        continue
        ;;
      *) continue ;; # CREATING, STARTING, RESTARTING, REPAIRING, ...: wait.
    esac
    if ! output=$(tpu_vm ssh "$name" "${tpu_flags[@]}" --worker=0 --command="$(poll_command "$shown")"); then
      ((++failures < 10)) || die "could not reach worker 0 of $name 10 times in a row; see: $follow_hint"
      continue
    fi
    last=${output##*$'\n'}
    [[ $last =~ ^mlm_train:\ ([0-9]+)\ (running|stopped|[0-9]+)$ ]] || continue
    failures=0
    [[ $output == *$'\n'* ]] && printf '%s\n' "${output%$'\n'*}"
    shown=${BASH_REMATCH[1]}
    if [[ ${BASH_REMATCH[2]} == stopped ]]; then
      lost_state=SIGTERM
      return 1
    fi
    if [[ ${BASH_REMATCH[2]} != running ]]; then
      train_status=${BASH_REMATCH[2]}
      return 0
    fi
  done
}

if [[ -n $dry_run ]]; then
  create_slice
  install_and_start
  if [[ -z $detach ]]; then
    echo "# then every ${poll_s}s until worker 0 writes $status_file (or the slice is preempted):"
    slice_state
    tpu_vm ssh "$name" "${tpu_flags[@]}" --worker=0 --command="$(poll_command 0)"
  fi
  exit 0 # cleanup prints the delete.
fi

restarts=0
while true; do
  create_slice
  lost_state=""
  train_status=""
  if install_and_start; then
    [[ -n $detach ]] && exit 0
    if follow; then
      if ((train_status == 0)); then
        echo "training finished on $name" >&2
        exit 0
      fi
      echo "error: training failed on worker 0 of $name with exit status $train_status (its log: $log_file there)" >&2
      exit "$train_status"
    fi
  else
    failed=$?
    # A step that failed because the slice went away counts as a preemption.
    [[ -n $spot$preemptible ]] || exit "$failed"
    lost_state=$(slice_state)
    [[ $lost_state == READY ]] && exit "$failed"
  fi
  if [[ $lost_state == GONE ]]; then
    created=""
  fi
  case $lost_state in
    SIGTERM) lost="training on $name was stopped by SIGTERM (it saved a checkpoint)" ;;
    GONE) lost="TPU VM $name is gone" ;;
    *) lost="TPU VM $name is $lost_state" ;;
  esac
  if [[ -z $spot$preemptible ]]; then
    echo "error: $lost before training finished; rerun the same command to resume from $workdir" >&2
    exit 1
  fi
  if [[ -n $created ]]; then
    echo "$lost; deleting the slice" >&2
    tpu_vm delete "$name" "${tpu_flags[@]}" --quiet
    created=""
  fi
  if ((restarts >= max_restarts)); then
    echo "error: TPU VM $name was preempted $((restarts + 1)) times, more than --max-restarts $max_restarts; rerun the same command to resume from $workdir" >&2
    exit 1
  fi
  restarts=$((restarts + 1))
  echo "TPU VM $name was preempted; recreating it (restart $restarts of $max_restarts), training resumes from $workdir" >&2
done
