#!/usr/bin/env bash
# dtrain's GPU check, end to end on a GPU machine whose image has CUDA torch but no Dask or Horovod and
# no package registry: installs the wheels in .gpu/, builds Horovod there with NCCL (Gloo only if that
# fails), then runs benchmarks/gpu_check.py's checks. Figures: $OUT/gpu_check.json and a table.
#
#   benchmarks/gpu_prepare.sh        # first, on a machine with pip's index: fills .gpu/
#   bash benchmarks/gpu_check.sh     # there; about 8 minutes
#
# Variables:
#   OUT                  where results go (default <repo>/gpu-results)
#   GPU_CHECK_SECONDS    the whole run's time, build included (default 470)
#   GPU_CHECK_ARGS       more arguments for gpu_check.py run (e.g. "--only amp,b1", "--device cpu --quick")
#   DTRAIN_GPU_DIR       the prepared folder (default <repo>/.gpu)
#   PYTHON               the interpreter that has torch (default python3)
# Files in $OUT: gpu_check.json, build.json, build.log (Horovod's build), runs.log (every run's output).
set -uo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") ;;
  *) echo "gpu_check.sh: error: $1: takes no arguments; set GPU_CHECK_ARGS (see --help)" >&2; exit 2 ;;
esac

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
carried=${DTRAIN_GPU_DIR:-$repo/.gpu}
out=${OUT:-$repo/gpu-results}
seconds=${GPU_CHECK_SECONDS:-470}
py=${PYTHON:-python3}
HOROVOD_VERSION=0.28.1
# shellcheck source=launch/horovod_source.sh
. "$repo/launch/horovod_source.sh"

log() { printf '[gpu_check] %s\n' "$*" >&2; }
die() { printf 'gpu_check.sh: error: %s\n' "$*" >&2; exit 2; }

sdist="$carried/horovod-$HOROVOD_VERSION.tar.gz"
[ -f "$sdist" ] && ls "$carried"/*.whl >/dev/null 2>&1 \
  || die "$carried: no prepared wheels or Horovod sdist; run benchmarks/gpu_prepare.sh where pip reaches an index, and carry .gpu"
mkdir -p "$out" || die "$out: cannot create it; set OUT to a writable folder"
[[ "$seconds" =~ ^[0-9]+$ ]] || die "GPU_CHECK_SECONDS=$seconds: not a whole number of seconds"

# 1. The carried wheels, beside the image's packages (its CUDA torch stays the one used).
site=$(mktemp -d /tmp/dtrain-site.XXXX)
work=$(mktemp -d /tmp/dtrain-build.XXXX)
trap 'rm -rf "$work"' EXIT
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
  --target "$site" "$carried"/*.whl || die "installing the wheels of $carried failed (see above)"
export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
log "wheels installed into $site; $(cmake --version | head -1)"

# 2. Horovod from its sdist, every core busy. NCCL comes from the nvidia-nccl wheel torch uses: headers
# and libnccl.so.2 only, so a libnccl.so beside it lets CMake's find_library(nccl) see it.
build() {  # build OPS (nccl|gloo): Horovod into $site, its output appended to $out/build.log
  local ops=$1 src="$work/$1/horovod-$HOROVOD_VERSION"
  mkdir -p "$work/$1" && tar -xzf "$sdist" -C "$work/$1" || return 1
  horovod_patch_cxx17 "$src" || { echo "the sdist layout changed: the C++17 patch did not apply"; return 1; }
  local env_=(HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
              HOROVOD_WITHOUT_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_CPU_OPERATIONS=GLOO MAKEFLAGS="-j$(nproc)")
  if [ "$ops" = nccl ]; then
    local nccl cc
    nccl=$("$py" -c 'import importlib.util as u; print(u.find_spec("nvidia.nccl").submodule_search_locations[0])') \
      || { echo "no nvidia.nccl package next to torch"; return 1; }
    mkdir -p "$work/nccl-lib" && ln -sf "$nccl/lib/libnccl.so.2" "$work/nccl-lib/libnccl.so"
    cc=$("$py" -c 'import torch; a, b = torch.cuda.get_device_capability(0); print(f"{a}{b}")') || return 1
    env_+=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED HOROVOD_NCCL_INCLUDE="$nccl/include"
           HOROVOD_NCCL_LIB="$work/nccl-lib" HOROVOD_BUILD_CUDA_CC_LIST="$cc"
           HOROVOD_CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")")
    export LD_LIBRARY_PATH="$nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"  # for the import below
  fi
  echo "== build $ops: ${env_[*]}"
  (cd "$src" && env "${env_[@]}" "$py" -m pip wheel -v --no-build-isolation --no-deps --no-cache-dir \
     --disable-pip-version-check -w "$work/$ops-wheel" .) || return 1
  "$py" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --upgrade \
    --target "$site" "$work/$ops-wheel"/horovod-*.whl || return 1
  "$py" -c 'import horovod.torch' || return 1
}

t0=$SECONDS
ops=none error=""
: > "$out/build.log"
export -f build horovod_patch_cxx17
export py work sdist site HOROVOD_VERSION
# The NCCL build gets at most half the run; the Gloo fallback what keeps 4 minutes for the checks.
# timeout signals the build's whole process group (make's compilers too).
if timeout $((seconds / 2)) bash -c 'build nccl' >> "$out/build.log" 2>&1; then
  ops=nccl
else
  error="NCCL build failed or timed out after $((SECONDS - t0)) s (see build.log)"
  log "$error; building Horovod with Gloo only"
  left=$((seconds - (SECONDS - t0) - 240))
  if [ "$left" -gt 30 ] && timeout "$left" bash -c 'build gloo' >> "$out/build.log" 2>&1; then
    ops=gloo
  else
    error="$error; the Gloo build failed too"
  fi
fi
build_seconds=$((SECONDS - t0))
"$py" - "$out/build.json" "$ops" "$build_seconds" "$error" <<'PY'
import json, sys
path, ops, seconds, error = sys.argv[1:]
json.dump({"horovod_ops": ops, "build_seconds": int(seconds), "error": error or None}, open(path, "w"), indent=2)
PY
log "horovod: $ops in ${build_seconds} s${error:+ ($error)}"
if [ "$ops" = nccl ]; then  # the ranks load libnccl.so.2 from the wheel torch uses
  nccl=$("$py" -c 'import importlib.util as u; print(u.find_spec("nvidia.nccl").submodule_search_locations[0])')
  export LD_LIBRARY_PATH="$nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# 3. The checks, in what time is left.
left=$((seconds - (SECONDS - t0)))
[ "$left" -gt 30 ] || left=30
# shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of arguments
"$py" -u "$repo/benchmarks/gpu_check.py" run --out "$out" --build "$out/build.json" --seconds "$left" \
  ${GPU_CHECK_ARGS:-} 2>&1 | tee "$out/check.log"
