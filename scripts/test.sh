#!/usr/bin/env bash
# Builds UnSwag (scripts/setup.sh) and runs every test: the GoogleTest suite
# (CUDA cases skip where no GPU exists) and the Python torch.ops tests. Where
# the main build has CUDA, a CPU-only build (UNSWAG_CPU_ONLY=ON, what a user
# without the CUDA toolkit gets) is built and its C++ tests run too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if grep -q "UnSwag: CUDA ON" build-configure.log; then
  echo "test: also building the CPU-only configuration in build-cpu/"
  cmake -S . -B build-cpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DUNSWAG_CPU_ONLY=ON \
    -DCMAKE_PREFIX_PATH="$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
    -DPython3_EXECUTABLE="$PWD/.venv/bin/python" >/dev/null
  cmake --build build-cpu -j"$(nproc)" --target unswag_tests
  build-cpu/unswag_tests --gtest_brief=1
fi
ctest --test-dir build --output-on-failure -j"$(nproc)"
