#!/usr/bin/env bash
# Builds UnSwag (scripts/setup.sh) and runs every test: the GoogleTest suite
# (CUDA cases skip where no GPU exists) and the Python torch.ops tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ctest --test-dir build --output-on-failure -j"$(nproc)"
