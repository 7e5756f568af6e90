#!/usr/bin/env bash
# Run dtrain on several machines with horovodrun over ssh (Gloo).
#
# Usage: launch/multihost.sh (-H HOSTS | --hostfile FILE) [options] [-- DTRAIN_FLAGS...]
#   -H, --hosts HOSTS      host1:slots,host2:slots (as horovodrun -H; slots default 1)
#   --hostfile FILE        one host per line: host, host:slots or "host slots=N"; # comments allowed
#   -n, --np N             number of ranks (default: the sum of the slots; elastic: ranks needed
#                          before training starts, default --min-np)
#   --min-np N             elastic: at least N ranks; hosts are re-read from --hostfile while running
#   --max-np N             elastic: at most N ranks (default: unbounded)
#   -p, --ssh-port PORT    ssh port of the hosts (default: ssh's own)
#   --network-interface NIC  interface for Gloo traffic (default: horovodrun finds a common one)
#   --dry-run              print the command instead of running it
#   -h, --help             show this help
#
# Every host needs passwordless ssh from this one and the repository with its venv at the SAME path
# (run launch/setup.sh on each host, or share the checkout). Without --scheduler, rank 0 starts a Dask
# cluster on its host that the other hosts reach over TLS (a certificate made for the run):
#   launch/multihost.sh -H h1:2,h2:2 -- --run-dir /shared/runs/a
# Or start a Dask cluster first (launch/dask_cluster.sh on one host, `dask worker` on the others) and
# pass its address to every rank:
#   launch/multihost.sh --hostfile hosts.txt -- --scheduler tcp://HOST:8786 --run-dir /shared/runs/a
# Elastic (edit hosts.txt to grow or shrink the job while it runs):
#   launch/multihost.sh --hostfile hosts.txt --min-np 2 --max-np 8 -- --scheduler tcp://HOST:8786
#
# Variables:
#   DTRAIN_VENV       venv made by launch/setup.sh (default <repo>/.venv), same path on every host
#   HOROVODRUN_ARGS   extra horovodrun options, split on spaces
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { printf 'multihost.sh: error: %s\n' "$*" >&2; exit 2; }
need() { [ "$2" -ge 2 ] || die "$1 needs a value"; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${DTRAIN_VENV:-$repo/.venv}
hosts="" hostfile="" np="" min_np="" max_np="" ssh_port="" nic="" dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -H|--hosts) need "$1" $#; hosts=$2; shift 2 ;;
    --hostfile|-hostfile) need "$1" $#; hostfile=$2; shift 2 ;;
    -n|-np|--np) need "$1" $#; np=$2; shift 2 ;;
    --min-np) need "$1" $#; min_np=$2; shift 2 ;;
    --max-np) need "$1" $#; max_np=$2; shift 2 ;;
    -p|--ssh-port) need "$1" $#; ssh_port=$2; shift 2 ;;
    --network-interface) need "$1" $#; nic=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) die "unknown option $1 (dtrain flags go after --; see --help)" ;;
  esac
done
[ -n "$hosts" ] || [ -n "$hostfile" ] || die "give the hosts: -H host1:2,host2:2 or --hostfile FILE"
[ -z "$hosts" ] || [ -z "$hostfile" ] || die "give -H or --hostfile, not both"
for v in "$np" "$min_np" "$max_np" "$ssh_port"; do
  [ -z "$v" ] || [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "expected a positive integer, got '$v'"
done
elastic=0
if [ -n "$min_np" ] || [ -n "$max_np" ]; then
  elastic=1
  [ -n "$hostfile" ] || die "elastic runs (--min-np/--max-np) read the hosts from --hostfile"
  [ -n "$min_np" ] || die "elastic runs need --min-np"
  [ -z "$max_np" ] || [ "$min_np" -le "$max_np" ] || die "--min-np $min_np is above --max-np $max_np"
fi

if [ -x "$venv/bin/python" ]; then py=$venv/bin/python; else py=python3; fi
discover=$repo/launch/discover_hosts.py
if [ -n "$hostfile" ]; then
  [ -r "$hostfile" ] || die "cannot read hosts file $hostfile"
  hostfile=$(cd "$(dirname "$hostfile")" && pwd)/$(basename "$hostfile")
  "$py" "$discover" "$hostfile" >/dev/null || die "bad hosts file $hostfile"
  [ "$elastic" = 1 ] || hosts=$("$py" "$discover" "$hostfile" | paste -sd, -)
else
  # Normalise -H through the same parser: bare names get one slot, duplicates are refused.
  given=$hosts
  hosts=$(tr ',' '\n' <<< "$given" | "$py" "$discover" - | paste -sd, -) || die "bad -H '$given'"
fi

cmd=("$venv/bin/horovodrun")
if [ "$elastic" = 1 ]; then
  export DTRAIN_HOSTS_FILE=$hostfile  # read by discover_hosts.py, which horovodrun calls without arguments
  cmd+=(-np "${np:-$min_np}" --min-np "$min_np")  # -np: ranks needed before training starts
  [ -z "$max_np" ] || cmd+=(--max-np "$max_np")
  cmd+=(--host-discovery-script "$discover")
else
  [ -n "$hosts" ] || die "no hosts given"
  if [ -z "$np" ]; then
    np=0
    IFS=, read -r -a entries <<< "$hosts"
    for e in "${entries[@]}"; do np=$((np + ${e##*:})); done
  fi
  cmd+=(-np "$np" -H "$hosts")
fi
[ -z "$ssh_port" ] || cmd+=(-p "$ssh_port")
[ -z "$nic" ] || cmd+=(--network-interface "$nic")
read -r -a extra <<< "${HOROVODRUN_ARGS:-}"
cmd+=(--gloo ${extra[@]+"${extra[@]}"} "$venv/bin/python" -m dtrain "$@")

if [ "$dry_run" = 1 ]; then
  if [ "$elastic" = 1 ]; then printf 'DTRAIN_HOSTS_FILE=%q ' "$DTRAIN_HOSTS_FILE"; fi
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
[ -x "$venv/bin/horovodrun" ] || die "$venv/bin/horovodrun not found; run launch/setup.sh first"
exec "${cmd[@]}"
