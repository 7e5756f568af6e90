# Horovod's source tree made buildable against this torch; sourced by launch/setup.sh and
# benchmarks/gpu_check.sh, which build Horovod 0.28.1 from its sdist (no wheel exists for it).
#
#   horovod_patch_cxx17 SRC   patch the unpacked sdist in SRC; returns non-zero if the layout changed

# 0.28.1 asks CMake for C++14, and torch >= 2.1's headers need C++17. Its CUDA kernels ask nvcc for
# C++11, which CUDA 13's own headers (CCCL) no longer accept; C++17 builds them the same.
horovod_patch_cxx17() {
  local src=$1
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
    "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  sed -i 's/set(CMAKE_CUDA_STANDARD 11)/set(CMAKE_CUDA_STANDARD 17)/' "$src/horovod/common/ops/cuda/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" \
    && grep -q 'CMAKE_CUDA_STANDARD 17' "$src/horovod/common/ops/cuda/CMakeLists.txt"
}
