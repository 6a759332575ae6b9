#!/usr/bin/env bash
# Builds UnSwag (scripts/setup.sh) and runs every test: the GoogleTest suite
# (CUDA cases skip where no GPU exists) and the Python torch.ops tests. Where
# the main build has CUDA, a CPU-only build (UNSWAG_CPU_ONLY=ON, what a user
# without the CUDA toolkit gets) is built and its CLI run (its whole test
# suite with UNSWAG_TEST_CPU_ONLY_SUITE=1).
set -euo pipefail
cd "$(dirname "$0")/.."
UNSWAG_BUILD_TARGETS="${UNSWAG_BUILD_TARGETS:-unswag unswag_cli unswag_tests}" bash scripts/setup.sh
if grep -q "UnSwag: CUDA ON" build-configure.log; then
  # The CPU-only configuration (what a user without the CUDA toolkit gets):
  # the library and the CLI are built and the CLI runs (its few-bit tables
  # come from the CPU kernels). The same C++ tests already ran their CPU cases
  # in the CUDA build; UNSWAG_TEST_CPU_ONLY_SUITE=1 also builds and runs the
  # whole suite here (7-8 more minutes on 2 cores: with it, a clean CI run on
  # 2 cores is about 30 minutes).
  echo "test: also building the CPU-only configuration in build-cpu/"
  cmake -S . -B build-cpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DUNSWAG_CPU_ONLY=ON \
    -DCMAKE_PREFIX_PATH="$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
    -DPython3_EXECUTABLE="$PWD/.venv/bin/python" >build-cpu-configure.log
  grep -q "UnSwag: CUDA OFF" build-cpu-configure.log || { echo "test: build-cpu is not CPU-only" >&2; exit 1; }
  if [ "${UNSWAG_TEST_CPU_ONLY_SUITE:-0}" = 1 ]; then
    cmake --build build-cpu -j"$(nproc)" --target unswag_cli unswag_tests
    build-cpu/unswag_tests --gtest_brief=1
  else
    cmake --build build-cpu -j"$(nproc)" --target unswag_cli
  fi
  [ "$(build-cpu/unswag tables | grep -c '^| 2 |')" -gt 0 ] || { echo "test: build-cpu/unswag tables printed no tables" >&2; exit 1; }
  echo "test: the CPU-only build links and runs"
fi
ctest --test-dir build --output-on-failure -j"$(nproc)"
