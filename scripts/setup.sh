#!/usr/bin/env bash
# Set-up on a fresh Debian (12+) machine, idempotent: installs the Debian
# packages UnSwag builds with, PyTorch 2.11 from PyPI into .venv (its LibTorch
# is what we link), and configures + builds build/ (CUDA too when nvcc exists;
# UNSWAG_CPU_ONLY=1 forces a CPU-only build).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need_apt=()
for pkg in cmake ninja-build g++ libgtest-dev libcli11-dev nlohmann-json3-dev libpcre2-dev libutf8proc-dev python3-venv python3-pip; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
# A pyenv or other non-Debian python3 brings its own venv and pip.
if python3 -c 'import venv, ensurepip' 2>/dev/null; then
  need_apt=("${need_apt[@]/python3-venv}"); need_apt=("${need_apt[@]/python3-pip}")
fi
need_apt=($(printf '%s\n' "${need_apt[@]}" | grep -v '^$' || true))
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# PyTorch in a venv: Debian's python3 refuses system-wide pip installs.
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
if ! .venv/bin/python -c 'import torch, pytest; assert torch.__version__.startswith("2.11.")' 2>/dev/null; then
  echo "setup: installing torch==2.11.0 and pytest into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.11.0 pytest
fi
# Reference implementations the tests compare against (checkpoints, tokenizers).
if ! .venv/bin/python -c 'import safetensors, numpy, tokenizers, transformers' 2>/dev/null; then
  .venv/bin/python -m pip install -q safetensors numpy tokenizers transformers
fi
TORCH_CMAKE="$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')"

cpu_only=OFF
[ "${UNSWAG_CPU_ONLY:-0}" = 1 ] && cpu_only=ON
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_CMAKE" \
  -DUNSWAG_CPU_ONLY="$cpu_only" -DPython3_EXECUTABLE="$PWD/.venv/bin/python" >build-configure.log 2>&1 \
  || { cat build-configure.log; exit 1; }
grep -E "UnSwag:" build-configure.log || true
# UNSWAG_BUILD_TARGETS: which targets (default all; scripts/test.sh builds the
# library, the CLI and the tests only: the benchmarks add minutes on 2 cores).
# shellcheck disable=SC2086
cmake --build build -j"$(nproc)" --target ${UNSWAG_BUILD_TARGETS:-all}
