#!/usr/bin/env bash
# Gathers, on this (Debian) machine, what the GPU machine lacks to build and
# run scripts/gpu-check.sh, into ignored folders that the device call carries:
#   .deps/  GoogleTest's source (libgtest-dev) and CLI11's headers (libcli11-dev)
#   .whl/   Python wheels for the benchmarks' peers (scripts/fetch-gpu-wheels.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .deps && mkdir -p .deps/include
cp -r /usr/src/googletest .deps/googletest
cp -r /usr/include/CLI .deps/include/CLI
grep -qx '/.deps/' .git/info/exclude 2>/dev/null || echo '/.deps/' >> .git/info/exclude
if [ -x scripts/fetch-gpu-wheels.sh ] && [ ! -d .whl ]; then bash scripts/fetch-gpu-wheels.sh; fi
du -sh .deps .whl 2>/dev/null || true
