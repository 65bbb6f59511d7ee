#!/usr/bin/env bash
# N CPU processes of the trainer on 127.0.0.1, joined into one global mesh.
#
#   launch/local_multiprocess.sh N [main's flags...]
#   launch/local_multiprocess.sh 2 --config=configs/tiny.py:build/tiny --workdir=/tmp/run2
#
# Each process forces DEVICES_PER_PROCESS host CPU devices (default 1) and joins
# jax.distributed through a coordinator on 127.0.0.1:PORT (default: a free
# port); CPU collectives go through gloo. The global mesh spans
# N * DEVICES_PER_PROCESS devices, shaped by --config.mesh.shape as usual.
# HEARTBEAT_S (default 100) is how long a silent process may go before the
# others give up on it. PYTHON (default: python) is the interpreter. Output lines
# are prefixed with [pI].
#
# Waits for all processes. If one exits non-zero, the others get SIGTERM, then
# SIGKILL after GRACE_S seconds (default 5), and the script exits with that
# status; Ctrl-C stops them all the same way.
set -uo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
n=$1
shift
devices=${DEVICES_PER_PROCESS:-1}
port=${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
heartbeat=${HEARTBEAT_S:-100}
grace_s=${GRACE_S:-5}

pids=()
# SIGTERM first (a live trainer saves a checkpoint and stops; JAX's preemption
# service turns it into a step all processes agree on), SIGKILL after grace_s.
stop_all() {
  local pid waited
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null
  done
  for ((waited = 0; waited < grace_s; waited++)); do
    alive=0
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null && alive=1
    done
    [[ $alive -eq 0 ]] && return
    sleep 1
  done
  for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null
  done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu "${PYTHON:-python}" -m rcfd_jax.main "$@" \
    --config.distributed.coordinator_address="127.0.0.1:${port}" \
    --config.distributed.num_processes="${n}" \
    --config.distributed.process_id="${i}" \
    --config.distributed.num_cpu_devices="${devices}" \
    --config.distributed.heartbeat_timeout_s="${heartbeat}" \
    > >(sed -u "s/^/[p${i}] /") 2> >(sed -u "s/^/[p${i}] /" >&2) &
  pids+=($!)
  echo "local_multiprocess: process ${i} is pid $!" >&2
done

# Poll rather than `wait -n`: a child that exits between two waits is reaped by bash
# and `wait -n PID` then fails with "no such job". `wait PID` still returns its status.
status=0
left=${#pids[@]}
done_pids=()
while [[ $left -gt 0 ]]; do
  for pid in "${pids[@]}"; do
    [[ " ${done_pids[*]-} " == *" $pid "* ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    wait "$pid"
    rc=$?
    done_pids+=("$pid")
    left=$((left - 1))
    if [[ $rc -ne 0 && $status -eq 0 ]]; then
      status=$rc
      echo "local_multiprocess: process ${pid} exited with status ${rc}; stopping the others" >&2
      stop_all
    fi
  done
  [[ $left -gt 0 ]] && sleep 0.5
done
exit "$status"
