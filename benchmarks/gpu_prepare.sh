#!/usr/bin/env bash
# Fill .gpu/ (ignored by git, carried to the GPU machine) with what benchmarks/gpu_check.sh needs there:
# Python 3.12 wheels of Dask and what it needs beyond the machine's image, at this project's venv's
# versions, cmake 3.x, and Horovod's sdist. Idempotent: files already there are kept, other versions of
# them removed; fails if the folder grows past what the device tool can carry.
#
#   benchmarks/gpu_prepare.sh [--dry-run] [--dir DIR]      (needs launch/setup.sh's venv)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${DTRAIN_VENV:-$repo/.venv}/bin/python
[ -x "$py" ] || { echo "gpu_prepare.sh: error: $py: no venv; run launch/setup.sh first" >&2; exit 2; }
exec "$py" "$repo/benchmarks/gpu_check.py" prepare "$@"
