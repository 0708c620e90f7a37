#!/usr/bin/env bash
# Usage: launch/gpu_bench.sh [--no-install] [--steps N] [--out DIR] [--quick]
#
# Measures the train step on one NVIDIA GPU: BERT-base at seq 128 and BERT-large at seq 512 in
# bfloat16 with the standard kernels, each with attention dropout 0 and 0.1. Prints one line per
# run (tokens/s, MFU against the GPU's bf16 peak, whether cuDNN's fused attention ran) and a
# table at the end; the JSON records go to DIR/gpu_bench.jsonl.
#
#   --no-install  use the Python environment already active (mlm installed with '.[cuda]')
#                 instead of creating .venv-gpu and installing into it
#   --steps N     timed steps per run (default 20; 3 untimed warm-up steps come first, 1 with
#                 --quick)
#   --out DIR     where gpu_bench.jsonl goes (default: the current directory)
#   --quick       BERT-tiny with small batches and one warm-up step instead: checks the
#                 script itself in a minute, on any machine (a CPU too)
set -euo pipefail

install=1
quick=0
steps=20
out=$(pwd)
while [ $# -gt 0 ]; do
  case "$1" in
    --no-install) install=0; shift ;;
    --steps) steps="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1'; see --help" >&2; exit 2 ;;
  esac
done
case "$steps" in ''|*[!0-9]*|0) echo "error: --steps must be a positive integer" >&2; exit 2 ;; esac

repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
records="$out/gpu_bench.jsonl"
: > "$records"

if [ "$install" = 1 ]; then
  python3 -m venv "$repo/.venv-gpu"
  # shellcheck disable=SC1091
  . "$repo/.venv-gpu/bin/activate"
  pip install -q --upgrade pip
  pip install -q -e "$repo[cuda]"
fi
cd "$repo"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader || true
python -c "import jax; d = jax.devices()[0]; print('jax', jax.__version__, d.platform, d.device_kind)"

# name config batch seq max_predictions
runs=(
  "bert_base configs/bert_base.py 256 128 20"
  "bert_large configs/bert_large.py 32 512 80"
)
warmup=3
if [ "$quick" = 1 ]; then
  warmup=1
  runs=(
    "bert_tiny configs/bert_tiny.py 8 128 20"
    "bert_tiny configs/bert_tiny.py 4 512 80"
  )
fi
for run in "${runs[@]}"; do
  read -r name config batch seq preds <<<"$run"
  for attention_dropout in 0.0 0.1; do
    echo "== $name seq $seq batch $batch bfloat16, standard kernels, attention dropout $attention_dropout" >&2
    printed=$(python -m mlm.bench step --config "$config" --steps "$steps" --warmup "$warmup" \
      --config.model.dtype=bfloat16 --config.model.kernels=standard \
      --config.model.attention_dropout_rate="$attention_dropout" \
      --config.train.global_batch_size="$batch" --config.data.seq_length="$seq" \
      --config.data.max_predictions_per_seq="$preds" \
      --json_out="$records")
    echo "${printed%%$'\n'*}"  # The readable line; the JSON record is in $records.
  done
done

python - "$records" <<'EOF'
import json
import sys

print("| layers x hidden | seq | batch | attention dropout | cuDNN attention | ms / step | tokens/s | MFU |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for line in open(sys.argv[1]):
    r = json.loads(line)
    model = f"{r['num_layers']} x {r['hidden_size']}"
    print(
        f"| {model} | {r['seq_length']} | {r['batch_size']} | {r['attention_dropout_rate']} "
        f"| {'yes' if r['cudnn_attention'] else 'no'} | {r['step_time_s'] * 1e3:.1f} "
        f"| {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} |"
    )
print(f"device: {r['device_kind']}, MFU against {r['peak'] / 1e12:.0f} TFLOP/s ({r['peak_source']})")
EOF
