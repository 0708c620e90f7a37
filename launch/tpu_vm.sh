#!/usr/bin/env bash
# Pretrains on a Cloud TPU VM slice: create it, install this package on every worker, run
# `python3 -m mlm.train` on all workers at once (mlm.distributed finds the slice), stream the
# output, and delete the slice at the end, also when something fails (unless --keep).
#
# Usage:
#   launch/tpu_vm.sh --name NAME --zone ZONE --accelerator-type TYPE --config CONFIG \
#       --workdir gs://BUCKET/DIR [--version RUNTIME] [--project PROJECT] [--spot] [--keep] \
#       [--] [mlm.train ARGS...]
#   e.g. launch/tpu_vm.sh --name bert-base --zone us-central2-b --accelerator-type v4-32 \
#       --config configs/bert_base.py --workdir gs://my-bucket/bert_base --config.train.num_steps=1000
#
# Each option can come from the environment instead: NAME, ZONE, ACCELERATOR_TYPE
# (v4-32, v5litepod-16, v6e-8, ...), RUNTIME_VERSION (default by TPU generation), CONFIG (a file
# inside this repository), WORKDIR, PROJECT, SPOT=1, KEEP=1. Arguments the script does not know
# (and all after --) go to mlm.train. A slice with more than one host (a size above 8) needs a
# gs:// WORKDIR: every worker writes checkpoints to the same place. mlm.train writes its workdir
# through the local filesystem, so a gs://BUCKET/DIR WORKDIR is mounted with Cloud Storage FUSE
# (gcsfuse, installed if missing) at ~/gcs/BUCKET on every worker and training gets
# --workdir ~/gcs/BUCKET/DIR; the VM's service account needs read and write access to the bucket.
# The package is installed with its tpu extra (jax[tpu] at the tested version); PIP_PACKAGES
# (default none) are installed with it. Needs gcloud, authenticated.
set -euo pipefail

die() {
  echo "error: $*" >&2
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
keep=${KEEP:-}
pip_packages=${PIP_PACKAGES:-}
train_args=()

while (($# > 0)); do
  case $1 in
    --name | --zone | --accelerator-type | --version | --config | --workdir | --project)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --name) name=$2 ;;
        --zone) zone=$2 ;;
        --accelerator-type) accelerator_type=$2 ;;
        --version) runtime_version=$2 ;;
        --config) config=$2 ;;
        --workdir) workdir=$2 ;;
        --project) project=$2 ;;
      esac
      shift 2
      ;;
    --spot) spot=1 && shift ;;
    --keep) keep=1 && shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' && exit 0 ;;
    --) shift && train_args+=("$@") && break ;;
    *) train_args+=("$1") && shift ;;
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
command -v gcloud >/dev/null || die "gcloud not found; install the Google Cloud SDK and run gcloud auth login"

tpu_flags=(--zone="$zone")
[[ -n $project ]] && tpu_flags+=(--project="$project")

# --- Delete the slice on exit (success, failure or Ctrl-C), once it exists. ---
created=""
archive_dir=""
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  [[ -n $archive_dir ]] && rm -rf "$archive_dir"
  if [[ -n $created && -z $keep ]]; then
    echo "deleting TPU VM $name" >&2
    gcloud compute tpus tpu-vm delete "$name" "${tpu_flags[@]}" --quiet ||
      echo "error: could not delete TPU VM $name; run: gcloud compute tpus tpu-vm delete $name --zone=$zone" >&2
  elif [[ -n $created ]]; then
    echo "kept TPU VM $name (--keep); delete it with: gcloud compute tpus tpu-vm delete $name --zone=$zone" >&2
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

create_flags=(--accelerator-type="$accelerator_type" --version="$runtime_version")
[[ -n $spot ]] && create_flags+=(--spot)
echo "creating TPU VM $name ($accelerator_type, $runtime_version) in $zone" >&2
gcloud compute tpus tpu-vm create "$name" "${tpu_flags[@]}" "${create_flags[@]}"
created=1

# --- Copy the package (pyproject, README, mlm/, configs/) to every worker and install it. ---
archive_dir=$(mktemp -d)
archive=$archive_dir/mlm.tar.gz
tar -czf "$archive" -C "$repo" --exclude=__pycache__ pyproject.toml README.md mlm configs
gcloud compute tpus tpu-vm scp "$archive" "$name:mlm.tar.gz" "${tpu_flags[@]}" --worker=all
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
gcloud compute tpus tpu-vm ssh "$name" "${tpu_flags[@]}" --worker=all --command="$install"

# --- Train on all workers at once; gcloud streams every worker's output here. ---
train="cd ~/mlm && python3 -m mlm.train --config $(printf '%q' "$remote_config")"
train+=" --workdir $remote_workdir"
for arg in ${train_args[@]+"${train_args[@]}"}; do
  train+=" $(printf '%q' "$arg")"
done
[[ -n $bucket ]] &&
  echo "workdir: $workdir is $remote_workdir on every worker (gs://$bucket mounted at $mount_point with gcsfuse)" >&2
echo "training: $train" >&2
gcloud compute tpus tpu-vm ssh "$name" "${tpu_flags[@]}" --worker=all --command="$train"
