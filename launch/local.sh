#!/usr/bin/env bash
# Runs N processes of `python -m mlm.train` on this machine, as one multi-process JAX run.
#
# Usage: launch/local.sh N [mlm.train ARGS...]
#   e.g. launch/local.sh 2 --config configs/quickstart.py --workdir /tmp/mlm_2proc
#
# Process i gets MLM_COORDINATOR_ADDRESS=127.0.0.1:PORT (a free port, or $MLM_PORT),
# MLM_NUM_PROCESSES=N and MLM_PROCESS_ID=i (read by mlm.distributed), and
# --xla_force_host_platform_device_count=${MLM_LOCAL_DEVICES:-1} appended to XLA_FLAGS, so
# N processes see N x MLM_LOCAL_DEVICES CPU devices. Every output line is prefixed with [i].
# The script waits for all processes; when one fails it stops the others and exits with the
# failed process's status. PYTHON (default: python) is the interpreter.
set -euo pipefail

usage() {
  echo "usage: launch/local.sh N [mlm.train ARGS...]  (N: number of processes, >= 1)" >&2
  exit 2
}

[[ $# -ge 1 && $1 =~ ^[1-9][0-9]*$ ]] || usage
num_processes=$1
shift
python=${PYTHON:-python}
devices=${MLM_LOCAL_DEVICES:-1}
if ! [[ $devices =~ ^[1-9][0-9]*$ ]]; then
  echo "error: MLM_LOCAL_DEVICES='$devices' is not a positive integer; set it to the CPU devices per process" >&2
  exit 2
fi
port=${MLM_PORT:-$(
  "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
)}
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"

# Copies stdin to stdout with "[$1] " at the start of every line and of every progress-bar
# redraw (after a carriage return). Only whole lines are written, each in one write, so the
# processes' lines never interleave. Ctrl-C is left to the train processes.
prefixer='import os, re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
tag, pending = sys.argv[1].encode(), b""
while chunk := os.read(0, 65536):
    pending += chunk
    *lines, pending = re.split(rb"(?<=\r)(?!\n)|(?<=\n)", pending)
    for line in lines:
        if line:
            os.write(1, tag + line)
if pending:
    os.write(1, tag + pending + b"\n")'

pids=() # The train processes.
stop_all() {
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do
    [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
  done
}
fifo_dir=$(mktemp -d)
trap 'rm -rf "$fifo_dir"' EXIT
trap 'stop_all; exit 130' INT TERM

prefixers=()
for ((i = 0; i < num_processes; i++)); do
  mkfifo "$fifo_dir/$i"
  "$python" -c "$prefixer" "[$i] " <"$fifo_dir/$i" &
  prefixers+=("$!")
  # Open the pipe here first (this waits for the prefixer), so the train process can die at any
  # moment and the prefixer still sees the end of its output.
  exec 3>"$fifo_dir/$i"
  MLM_COORDINATOR_ADDRESS="127.0.0.1:$port" MLM_NUM_PROCESSES="$num_processes" \
    MLM_PROCESS_ID="$i" XLA_FLAGS="$xla_flags" \
    "$python" -m mlm.train "$@" >&3 2>&1 &
  pids+=("$!")
  exec 3>&-
done

# Poll: the first process to fail stops the rest.
status=0
running=$num_processes
while ((running > 0)); do
  for index in "${!pids[@]}"; do
    pid=${pids[index]}
    [[ -z $pid ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    code=0
    wait "$pid" || code=$?
    pids[index]=""
    running=$((running - 1))
    if ((code != 0 && status == 0)); then
      status=$code
      echo "[local.sh] process $index exited with status $code; stopping the others" >&2
      stop_all
    fi
  done
  if ((running > 0)); then sleep 0.2; fi
done
wait "${prefixers[@]}"
exit "$status"
