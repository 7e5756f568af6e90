#!/usr/bin/env bash
# Run dtrain on this machine with N Horovod ranks over Gloo.
#
# Usage: launch/local.sh [-n N] [--dry-run] [-- DTRAIN_FLAGS...]
#   -n, --np N    number of ranks (default 2)
#   --dry-run     print the command instead of running it
#   -h, --help    show this help
#
# Runs:  horovodrun -np N -H localhost:N --gloo <repo>/.venv/bin/python -m dtrain DTRAIN_FLAGS...
# Without --scheduler each rank's data comes from an embedded Dask cluster; see launch/dask_cluster.sh.
# Example: launch/local.sh -n 2 -- --epochs 1 --run-dir runs/local
#
# Variables:
#   DTRAIN_VENV       venv made by launch/setup.sh (default <repo>/.venv)
#   HOROVODRUN_ARGS   extra horovodrun options, split on spaces (e.g. "--verbose --start-timeout 60")
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { printf 'local.sh: error: %s\n' "$*" >&2; exit 2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${DTRAIN_VENV:-$repo/.venv}
np=2
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -n|--np) [ $# -ge 2 ] || die "$1 needs a value"; np=$2; shift 2 ;;
    --np=*) np=${1#--np=}; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) die "unknown option $1 (dtrain flags go after --; see --help)" ;;
  esac
done
[[ "$np" =~ ^[1-9][0-9]*$ ]] || die "-n must be a positive integer, got '$np'"

read -r -a extra <<< "${HOROVODRUN_ARGS:-}"
cmd=("$venv/bin/horovodrun" -np "$np" -H "localhost:$np" --gloo ${extra[@]+"${extra[@]}"}
     "$venv/bin/python" -m dtrain "$@")

if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
[ -x "$venv/bin/horovodrun" ] || die "$venv/bin/horovodrun not found; run launch/setup.sh first"
# Bad flags: dtrain's one-line error and exit 2 now, rather than N failing ranks under horovodrun.
"$venv/bin/python" -m dtrain --dry-run "$@" > /dev/null || exit $?
exec "${cmd[@]}"
