#!/usr/bin/env bash
# Start a Dask scheduler and N workers on this machine with the venv's `dask` CLI.
#
# Usage: launch/dask_cluster.sh [-n WORKERS] [options]
#   -n, --workers N        worker processes (default 2)
#   --host HOST            address the scheduler binds to and advertises (default: this host's IP;
#                          use 127.0.0.1 for a single-machine run)
#   --port PORT            scheduler port (default 8786)
#   --dashboard-port PORT  dashboard port (default 8787)
#   --nthreads T           threads per worker (default: cores / workers)
#   --memory-limit M       memory per worker, e.g. 4GiB (default: auto, total / workers)
#   --dir DIR              scheduler file and logs (default: a new temporary directory)
#   -h, --help             show this help
#
# Prints the scheduler address (tcp://HOST:PORT) alone on stdout once every worker has joined, then
# stays in the foreground; Ctrl-C or SIGTERM stops the scheduler and the workers it started.
# Pass the address to dtrain:  launch/local.sh -n 2 -- --scheduler tcp://HOST:PORT
# Add workers on other machines:  <repo>/.venv/bin/dask worker tcp://HOST:PORT
#
# Variables:
#   DTRAIN_VENV   venv made by launch/setup.sh (default <repo>/.venv)
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
log() { printf '[dask_cluster] %s\n' "$*" >&2; }
die() { printf 'dask_cluster.sh: error: %s\n' "$*" >&2; exit 2; }
need() { [ "$2" -ge 2 ] || die "$1 needs a value"; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${DTRAIN_VENV:-$repo/.venv}
workers=2 host="" port=8786 dport=8787 nthreads="" memory=auto dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -n|--workers) need "$1" $#; workers=$2; shift 2 ;;
    --host) need "$1" $#; host=$2; shift 2 ;;
    --port) need "$1" $#; port=$2; shift 2 ;;
    --dashboard-port) need "$1" $#; dport=$2; shift 2 ;;
    --nthreads) need "$1" $#; nthreads=$2; shift 2 ;;
    --memory-limit) need "$1" $#; memory=$2; shift 2 ;;
    --dir) need "$1" $#; dir=$2; shift 2 ;;
    *) die "unknown option $1; see --help" ;;
  esac
done
for v in "$workers" "$port" "$dport" ${nthreads:+"$nthreads"}; do
  [[ "$v" =~ ^[0-9]+$ ]] || die "expected a non-negative integer, got '$v'"
done
dask=$venv/bin/dask
[ -x "$dask" ] || die "$dask not found; run launch/setup.sh first"
if [ -z "$nthreads" ] && [ "$workers" -gt 0 ]; then
  cores=$(nproc)
  nthreads=$(( cores / workers > 0 ? cores / workers : 1 ))
fi
if [ -z "$dir" ]; then dir=$(mktemp -d "${TMPDIR:-/tmp}/dtrain-dask.XXXXXX"); fi
mkdir -p "$dir"
scheduler_file=$dir/scheduler.json
rm -f "$scheduler_file"

pids=()
stop() {
  trap - EXIT INT TERM
  if [ ${#pids[@]} -gt 0 ]; then
    log "stopping ${#pids[@]} processes"
    # Workers first, while the scheduler can still acknowledge them; then the scheduler.
    if [ ${#pids[@]} -gt 1 ]; then
      kill "${pids[@]:1}" 2>/dev/null || true
      wait "${pids[@]:1}" 2>/dev/null || true
    fi
    kill "${pids[0]}" 2>/dev/null || true
    wait "${pids[0]}" 2>/dev/null || true
  fi
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

sched_args=(scheduler --port "$port" --dashboard-address ":$dport" --scheduler-file "$scheduler_file")
[ -z "$host" ] || sched_args+=(--host "$host")
"$dask" "${sched_args[@]}" >"$dir/scheduler.log" 2>&1 &
pids+=($!)
log "scheduler starting (log: $dir/scheduler.log)"
for _ in $(seq 600); do
  [ -s "$scheduler_file" ] && break
  kill -0 "${pids[0]}" 2>/dev/null || { tail -n 20 "$dir/scheduler.log" >&2; die "the scheduler exited"; }
  sleep 0.1
done
[ -s "$scheduler_file" ] || die "the scheduler did not start within 60 s; see $dir/scheduler.log"
address=$("$venv/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["address"])' "$scheduler_file")

# glibc's malloc settings of dtrain's workers (see WORKER_MALLOC in dtrain/cluster.py); the caller's own win.
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-33554432} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-67108864}
for i in $(seq 1 "$workers"); do
  "$dask" worker "$address" --nthreads "$nthreads" --memory-limit "$memory" --name "local-$i" \
    >"$dir/worker-$i.log" 2>&1 &
  pids+=($!)
done
if [ "$workers" -gt 0 ]; then
  log "waiting for $workers workers (logs: $dir/worker-*.log)"
  "$venv/bin/python" - "$address" "$workers" <<'EOF' || die "the workers did not join; see $dir/worker-*.log"
import sys
from distributed import Client
with Client(sys.argv[1], timeout=60) as client:
    client.wait_for_workers(int(sys.argv[2]), timeout=120)
EOF
fi
log "ready: $workers workers, dashboard on port $dport; Ctrl-C stops the cluster"
echo "$address"
wait "${pids[0]}"
