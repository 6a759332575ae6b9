#!/usr/bin/env bash
# Role: the one command for the GPU machine: installs the carried wheels and
# C++ build dependencies (.whl/, from scripts/fetch-gpu-wheels.sh), builds the
# CUDA build (build-cuda/), runs the C++ (ctest, no test may be skipped) and
# Python tests, runs the benchmarks, copies logs and results into $OUT and
# prints a short summary table last.
#
# Usage: bash scripts/gpu-check.sh [--quick] [--skip-build] [--only tests|bench]
#   (ctest runs CTEST_JOBS tests at once, default 8: one at a time, 250 process starts outlast the budget)
#   --quick        smaller benchmark sizes and fewer repeats
#   --skip-build   reuse build-cuda/ as it is (it must hold libunswag.so)
#   --only X       run only the tests or only the benchmarks (after the build)
# Environment: GPU_CHECK_BUDGET_S (default 570): seconds for the whole script;
#   GPU_CHECK_BENCHES: which benchmarks (unset: "bench_activations bench_mlp bench_optim bench_psa bench_train_cli bench_model";
#     set and empty: none, e.g. for a build-only call before ncu;
#     also "fewbit_tiles": bench/fewbit_tiles.py, the few-bit kernels' tiles-in-flight sweep);
#   GPU_CHECK_SECTION_SUFFIX: e.g. -h200: bench_activations, bench_mlp, bench_optim, bench_psa's speed and
#     fewbit_tiles write docs/BENCHMARKS.md sections named with this suffix (a second device beside the first);
#   GPU_CHECK_MODEL_SERIES: bench_model.py --series (comma-separated; default all);
#   GPU_CHECK_MODEL_CONTEXTS, GPU_CHECK_MODEL_SECTION: its --contexts and docs section;
#   GPU_CHECK_TRAIN_CONTEXTS: bench_train_cli.py --contexts (default 16384,131072);
#   GPU_CHECK_TRAIN_ARGS: more bench_train_cli.py arguments (e.g. "--steps 2 --no-transformers-check
#     --section train-cli-longest": the 256k run of docs/BENCHMARKS.md);
#   GPU_CHECK_CTEST_ARGS: extra ctest arguments (e.g. "-R cuda|Cuda --repeat until-fail:3": a partial run);
#   BENCH_PSA_MODES: bench_psa.py --modes (default speed,decode,quality);
#   GPU_CHECK_PYTEST=0: do not run tests/python (a partial run; the summary says so).
#   each step gets what is left, so the summary and $OUT always get written.
#   GPU_CHECK_ALLOW_PY_SKIPS=1: do not fail on skipped Python tests.
#   JOBS (default 16): build parallelism.
#   GPU_CHECK_BUILD_TARGETS: build only these targets (e.g. "unswag bench_psa_quality" for a
#     quality-only run on a short device budget; the tests then need a later full build).
#   GPU_CHECK_USE_DEBS=1: use the carried CLI11/GTest/nlohmann_json even if the system has them.
#   CTEST_PARALLEL_LEVEL: ctest's own knob (unset: one test at a time).
# Carry ".whl" (wheels + .debs) with the device call, and ".source-commit" written by
# `git describe --always --dirty > .source-commit` just before it (the device copy's .git
# can be stale; the benchmarks record this commit). Writes under out/gpu-check/.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

QUICK=0
SKIP_BUILD=0
ONLY=all
while (($#)); do
  case "$1" in
    --quick) QUICK=1 ;;
    --skip-build) SKIP_BUILD=1 ;;
    --only)
      shift
      ONLY="${1:-}"
      [[ "$ONLY" == tests || "$ONLY" == bench ]] || { echo "--only takes tests or bench" >&2; exit 2; }
      ;;
    --only=*)
      ONLY="${1#--only=}"
      [[ "$ONLY" == tests || "$ONLY" == bench ]] || { echo "--only takes tests or bench" >&2; exit 2; }
      ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

START_S=$SECONDS
BUDGET_S="${GPU_CHECK_BUDGET_S:-570}"
JOBS="${JOBS:-16}"
BUILD_DIR=build-cuda
LIB="$REPO_ROOT/$BUILD_DIR/libunswag.so"
WORK_DIR="$REPO_ROOT/out/gpu-check"
BENCH_DIR="$WORK_DIR/bench"
LOG="$WORK_DIR/gpu-check.log"
CTEST_LOG="$WORK_DIR/ctest.log"
PYTEST_LOG="$WORK_DIR/pytest.log"
rm -rf "$WORK_DIR"
mkdir -p "$WORK_DIR" "$BENCH_DIR"
: >"$LOG"

export PYTHONUNBUFFERED=1
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
export CMAKE_POLICY_VERSION_MINIMUM=3.5   # CMake 4 with older package config files
export UNSWAG_LIBRARY="$LIB"               # what tests/python reads (see CMakeLists.txt)

STEP_NAMES=()
STEP_STATUS=()
STEP_DETAIL=()
STEP_SECONDS=()
OVERALL_OK=1

record() {  # name status detail seconds
  STEP_NAMES+=("$1"); STEP_STATUS+=("$2"); STEP_DETAIL+=("$3"); STEP_SECONDS+=("$4")
  [[ "$2" == ok || "$2" == skipped ]] || OVERALL_OK=0
}

say() { echo "$*" | tee -a "$LOG"; }

remaining_s() { echo $((BUDGET_S - (SECONDS - START_S))); }

# Copies what should come back into $OUT: docs/BENCHMARKS.md, gpu-check.log and one tarball of
# out/gpu-check (the device tool returns at most 8 files, so logs and results travel packed).
# Called after each step, so a run cut off by the caller's time limit still returns what it has.
collect() {
  [[ -n "${OUT:-}" ]] || return 0
  mkdir -p "$OUT"
  cp -f "$LOG" "$OUT"/ 2>/dev/null || true
  if [[ -f docs/BENCHMARKS.md && -f "$BENCH_DIR/.doc-updated" ]]; then
    cp -f docs/BENCHMARKS.md "$WORK_DIR"/BENCHMARKS.md; cp -f docs/BENCHMARKS.md "$OUT"/
  fi
  tar -czf "$OUT/gpu-check.tar.gz.part" -C "$(dirname "$WORK_DIR")" "$(basename "$WORK_DIR")" 2>/dev/null \
    && mv -f "$OUT/gpu-check.tar.gz.part" "$OUT/gpu-check.tar.gz"
  return 0
}

# run_step NAME EXTRA_LOG FILTER CMD...: runs CMD under the remaining budget, its
# output appended to $LOG (and EXTRA_LOG if not ""); stdout shows it all, or only
# the lines matching FILTER (an extended regex) if FILTER is not "". Sets STEP_RC.
STEP_RC=0
run_step() {
  local name="$1" extra_log="$2" filter="$3"
  shift 3
  local limit=$(($(remaining_s) - 25))
  if ((limit < 20)); then
    say "=== [$name] not run: the time budget (${BUDGET_S}s) is spent ==="
    STEP_RC=125
    return 0
  fi
  say "=== [$name] $* (limit ${limit}s) ==="
  local tee_targets=("$LOG")
  [[ -n "$extra_log" ]] && tee_targets+=("$extra_log")
  set +e
  if [[ -n "$filter" ]]; then
    timeout -k 15 "$limit" "$@" 2>&1 | tee -a "${tee_targets[@]}" | grep --line-buffered -E "$filter"
  else
    timeout -k 15 "$limit" "$@" 2>&1 | tee -a "${tee_targets[@]}"
  fi
  STEP_RC=${PIPESTATUS[0]}
  set -e
  if ((STEP_RC == 124 || STEP_RC == 137)); then
    say "=== [$name] TIMED OUT after ${limit}s ==="
  fi
  return 0
}

status_of_rc() {  # rc -> ok | FAILED | TIMEOUT | NOT RUN
  case "$1" in
    0) echo ok ;;
    124 | 137) echo TIMEOUT ;;
    125) echo "NOT RUN" ;;
    *) echo FAILED ;;
  esac
}

# --------------------------------------------------------------------------- #
# 0. Environment
# --------------------------------------------------------------------------- #
t0=$SECONDS
{
  echo "gpu-check: $(date -u '+%Y-%m-%d %H:%M:%S UTC') quick=$QUICK skip_build=$SKIP_BUILD only=$ONLY budget=${BUDGET_S}s"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>&1 || true
  else
    echo "nvidia-smi: not found"
  fi
  python3 -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| cuda", torch.version.cuda, "| gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0))' 2>&1 || true
} | tee -a "$LOG"
if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
if ! command -v ninja >/dev/null; then
  ninja_dir="$(python3 -c 'import ninja, os; print(ninja.BIN_DIR)' 2>/dev/null || true)"
  [[ -n "$ninja_dir" ]] && export PATH="$ninja_dir:$PATH"
fi
if ! command -v cmake >/dev/null; then
  cmake_dir="$(python3 -c 'import cmake; print(cmake.CMAKE_BIN_DIR)' 2>/dev/null || true)"
  [[ -n "$cmake_dir" ]] && export PATH="$cmake_dir:$PATH"
fi
say "nvcc: $(command -v nvcc || echo MISSING) | cmake: $(cmake --version 2>/dev/null | head -1 || echo MISSING) | ninja: $(command -v ninja || echo MISSING)"
if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  record environment ok "$(python3 -c 'import torch; print(torch.cuda.get_device_name(0))')" $((SECONDS - t0))
else
  record environment FAILED "torch.cuda.is_available() is False" $((SECONDS - t0))
fi

# --------------------------------------------------------------------------- #
# 1. Carried wheels and C++ build dependencies
# --------------------------------------------------------------------------- #
t0=$SECONDS
deps_detail=""
shopt -s nullglob
wheels=(.whl/*.whl)
debs=(.whl/debs/*.deb)
shopt -u nullglob
if ((${#wheels[@]})); then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target /tmp/site "${wheels[@]}" 2>&1 | tee -a "$LOG"; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    deps_detail="wheels: $(basename -a "${wheels[@]}" | sed 's/-py3.*//' | paste -sd, -)"
  else
    deps_detail="wheel install FAILED"
  fi
else
  deps_detail="no .whl/ (Liger-Kernel will be missing)"
fi

# CLI11, GTest, nlohmann_json, PCRE2, utf8proc (those CMakeLists.txt finds): the system's if it has them all,
# else the carried Debian packages unpacked into a private prefix (never into /).
has_cmake_package() {  # NAME: a NAMEConfig.cmake or name-config.cmake in a system location
  local lower dir
  lower="$(echo "$1" | tr '[:upper:]' '[:lower:]')"
  for dir in /usr/lib/x86_64-linux-gnu/cmake /usr/lib/cmake /usr/lib64/cmake /usr/share/cmake \
             /usr/local/lib/cmake /usr/local/lib64/cmake /usr/local/share/cmake /usr/local/lib/x86_64-linux-gnu/cmake; do
    [[ -d "$dir" ]] || continue
    if find "$dir" -maxdepth 2 \( -name "$1Config.cmake" -o -name "${lower}-config.cmake" \) 2>/dev/null | grep -q .; then
      return 0
    fi
  done
  return 1
}
EXTRA_PREFIX=""
missing_pkgs=()
# Only the packages that CMakeLists.txt actually finds.
needed_pkgs="$(grep -hoE 'find_package\((CLI11|GTest|nlohmann_json)\b' CMakeLists.txt 2>/dev/null | sed 's/find_package(//' | sort -u || true)"
for pkg in $needed_pkgs; do
  if [[ "${GPU_CHECK_USE_DEBS:-0}" == 1 ]] || ! has_cmake_package "$pkg"; then missing_pkgs+=("$pkg"); fi
done
# The C libraries found by header (tokenizer): PCRE2 and utf8proc.
for header in pcre2.h utf8proc.h; do
  if [[ "${GPU_CHECK_USE_DEBS:-0}" == 1 || ! -f /usr/include/$header ]]; then missing_pkgs+=("$header"); fi
done
if ((${#missing_pkgs[@]})); then
  if ((${#debs[@]})); then
    deps_root=/tmp/unswag-deps
    rm -rf "$deps_root" && mkdir -p "$deps_root"
    for deb in "${debs[@]}"; do dpkg -x "$deb" "$deps_root"; done
    EXTRA_PREFIX="$deps_root/usr"
    export LD_LIBRARY_PATH="$deps_root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    deps_detail+="; C++ deps from .whl/debs (for ${missing_pkgs[*]}$([[ "${GPU_CHECK_USE_DEBS:-0}" == 1 ]] && echo ", forced" || echo ": not on the system"))"
  else
    deps_detail+="; system lacks ${missing_pkgs[*]} and no .whl/debs: configure may fail"
  fi
else
  deps_detail+="; C++ deps from the system"
fi
say "dependencies: $deps_detail"
if [[ "$deps_detail" == *FAILED* ]]; then
  record dependencies FAILED "$deps_detail" $((SECONDS - t0))
else
  record dependencies ok "$deps_detail" $((SECONDS - t0))
fi

# --------------------------------------------------------------------------- #
# 2. Build
# --------------------------------------------------------------------------- #
build_ok=1
if ((SKIP_BUILD)); then
  if [[ -f "$LIB" ]]; then
    record build skipped "--skip-build: using $BUILD_DIR as it is" 0
  else
    record build FAILED "--skip-build but $LIB does not exist" 0
    build_ok=0
  fi
else
  t0=$SECONDS
  torch_prefix="$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')"
  prefix_path="$torch_prefix${EXTRA_PREFIX:+;$EXTRA_PREFIX}"
  generator=(-G Ninja)
  command -v ninja >/dev/null || generator=(-G "Unix Makefiles")
  run_step configure "" "" cmake -S . -B "$BUILD_DIR" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$prefix_path" -DUNSWAG_CUDA_ARCHS=90 -DUNSWAG_BUILD_TUNING=ON -DPython3_EXECUTABLE="$(command -v python3)"
  if ((STEP_RC == 0)); then
    # shellcheck disable=SC2086  # a word list of targets
    run_step build "" "" cmake --build "$BUILD_DIR" -j"$JOBS" ${GPU_CHECK_BUILD_TARGETS:+--target $GPU_CHECK_BUILD_TARGETS}
  fi
  if ((STEP_RC != 0)); then
    record build "$(status_of_rc "$STEP_RC")" "configure/build rc=$STEP_RC (see gpu-check.log)" $((SECONDS - t0))
    build_ok=0
  elif [[ ! -f "$LIB" ]]; then
    record build FAILED "the build succeeded but made no $LIB" $((SECONDS - t0))
    build_ok=0
  elif grep -q 'UnSwag: CUDA ON' "$LOG"; then
    record build ok "$BUILD_DIR/libunswag.so (CUDA)" $((SECONDS - t0))
  else
    # Tests and benchmarks still run: they show what a CPU-only library does on the GPU.
    record build FAILED "configure did not print 'UnSwag: CUDA ON' (a CPU-only build?)" $((SECONDS - t0))
  fi
fi
collect

# --------------------------------------------------------------------------- #
# 3. Tests
# --------------------------------------------------------------------------- #
python_test_files=()
if [[ -d tests/python ]]; then
  while IFS= read -r f; do python_test_files+=("$f"); done \
    < <(find tests/python -name 'test_*.py' -o -name '*_test.py' | sort)
fi
have_pytest=0
python3 -c 'import pytest' 2>/dev/null && have_pytest=1

if [[ "$ONLY" != bench ]] && ((build_ok)); then
  # C++ (and whatever else ctest holds; python_ops is run below, directly, when pytest is there).
  t0=$SECONDS
  ctest_exclude=()
  if ((${#python_test_files[@]} && have_pytest)); then ctest_exclude=(-E '^python_ops$'); fi
  : >"$CTEST_LOG"
  # CPU threads per test process: nproc / CTEST_JOBS. With every process on
  # all cores, the tests' many small parallel ATen ops wait on descheduled
  # OpenMP threads (a float64 reference that takes 1 s alone ran > 300 s).
  ctest_threads=$(( $(nproc) / ${CTEST_JOBS:-8} )); ((ctest_threads >= 1)) || ctest_threads=1
  run_step ctest "$CTEST_LOG" 'tests passed|tests failed|Failed|\*\*\*|SKIPPED|Not Run|No tests were found|Errors while running' \
    env OMP_NUM_THREADS="$ctest_threads" \
    ctest --test-dir "$BUILD_DIR" --output-on-failure -V -j "${CTEST_JOBS:-8}" "${ctest_exclude[@]}" ${GPU_CHECK_CTEST_ARGS:-}
  ctest_rc=$STEP_RC
  # Count tests, failures and skips (GTEST_SKIP lines, and ctest's own "Skipped"/"Not Run").
  ctest_counts="$(python3 - "$CTEST_LOG" <<'PY'
import re, sys
text = open(sys.argv[1], errors="replace").read()
# "100% tests passed, 0 tests failed out of 51" (CMake 3), or with -V on CMake 4
# "100% tests passed out of 51" / "96% tests passed, 2 tests failed out of 51".
m = re.search(r"(\d+)% tests passed(?:, (\d+) tests? failed)? out of (\d+)", text)
failed, total = (int(m.group(2) or 0), int(m.group(3))) if m else (-1, 0)
gtest_skips = set(re.findall(r"\[  SKIPPED \] ([A-Za-z_][\w/]*\.[\w/]+)", text))
did_not_run = re.search(r"The following tests did not run:\n((?:[ \t]+\d+ - .*\n?)+)", text)
ctest_skips = set(re.findall(r"\d+ - (\S+) \(", did_not_run.group(1))) if did_not_run else set()
skips = sorted(gtest_skips | ctest_skips)
print(f"{total} {failed} {len(skips)} {','.join(skips[:20])}")
PY
)"
  read -r ctest_total ctest_failed ctest_skipped ctest_skip_names <<<"$ctest_counts"
  failed_names="$(sed -n '/The following tests FAILED:/,/^Errors while running/p' "$CTEST_LOG" \
    | grep -oE '[0-9]+ - [^ ]+' | sed 's/^[0-9]* - //' | paste -sd, - || true)"
  if ((ctest_failed < 0)); then
    detail="no ctest summary line (see ctest.log); $ctest_skipped skipped so far"
  else
    detail="$ctest_total tests, $ctest_failed failed, $ctest_skipped skipped"
  fi
  [[ -n "$failed_names" ]] && detail+=": failed $failed_names"
  if [[ -n "$failed_names" ]]; then
    # The failures again, one at a time and without -V, so their messages are readable (the -j log interleaves).
    run_step ctest-rerun "$WORK_DIR/ctest-failed.log" '' ctest --test-dir "$BUILD_DIR" --rerun-failed --output-on-failure
  fi
  if ((ctest_rc != 0)); then
    record ctest "$(status_of_rc "$ctest_rc")" "$detail (rc=$ctest_rc)" $((SECONDS - t0))
  elif ((ctest_total == 0)); then
    record ctest FAILED "no tests found" $((SECONDS - t0))
  elif ((ctest_skipped > 0)); then
    say "SKIPPED on the GPU (not allowed): ${ctest_skip_names:-}"
    record ctest FAILED "$detail: ${ctest_skip_names:-}" $((SECONDS - t0))
  else
    record ctest ok "$detail" $((SECONDS - t0))
  fi
  collect

  # Python tests.
  t0=$SECONDS
  if [[ "${GPU_CHECK_PYTEST:-1}" == 0 ]]; then
    record pytest skipped "GPU_CHECK_PYTEST=0: not run" 0
  elif ((${#python_test_files[@]} == 0)); then
    record pytest skipped "no test files in tests/python" 0
  elif ((have_pytest)); then
    : >"$PYTEST_LOG"
    run_step pytest "$PYTEST_LOG" "" python3 -m pytest -q -rs tests/python
    py_rc=$STEP_RC
    py_summary="$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)|no tests ran' "$PYTEST_LOG" | tail -1 | tr -d '=' | sed 's/^ *//;s/ *$//')"
    py_skipped="$(echo "$py_summary" | grep -oE '[0-9]+ skipped' | grep -oE '[0-9]+' || echo 0)"
    if ((py_rc == 5)); then
      record pytest FAILED "pytest collected no tests" $((SECONDS - t0))
    elif ((py_rc != 0)); then
      record pytest "$(status_of_rc "$py_rc")" "${py_summary:-rc=$py_rc}" $((SECONDS - t0))
    elif ((py_skipped > 0)) && [[ "${GPU_CHECK_ALLOW_PY_SKIPS:-0}" != 1 ]]; then
      say "Python tests SKIPPED on the GPU (not allowed; reasons in pytest.log, -rs)"
      record pytest FAILED "$py_summary" $((SECONDS - t0))
    else
      record pytest ok "$py_summary" $((SECONDS - t0))
    fi
  else
    say "!!!!!! pytest is not installed: running tests/python with a minimal runner (no fixtures) !!!!!!"
    : >"$PYTEST_LOG"
    run_step python-tests "$PYTEST_LOG" "" python3 - "${python_test_files[@]}" <<'PY'
# Minimal stand-in for pytest: calls every argument-free test_* function.
import importlib.util, inspect, sys, traceback
passed = failed = skipped = 0
for path in sys.argv[1:]:
    spec = importlib.util.spec_from_file_location(path.replace("/", "_")[:-3], path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception:
        traceback.print_exc(); failed += 1; continue
    for name, fn in sorted(vars(module).items()):
        if not (name.startswith("test") and inspect.isfunction(fn)):
            continue
        if inspect.signature(fn).parameters:
            print(f"SKIP {path}::{name} (needs fixtures)"); skipped += 1; continue
        try:
            fn(); passed += 1
        except Exception as error:
            if type(error).__name__ == "Skipped":
                print(f"SKIP {path}::{name}: {error}"); skipped += 1
            else:
                traceback.print_exc(); print(f"FAIL {path}::{name}"); failed += 1
print(f"{passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed else 0)
PY
    record python-tests "$(status_of_rc "$STEP_RC")" "$(tail -1 "$PYTEST_LOG") (minimal runner, pytest missing)" $((SECONDS - t0))
  fi
  collect
fi

# --------------------------------------------------------------------------- #
# 4. Benchmarks
# --------------------------------------------------------------------------- #
if [[ "$ONLY" != tests ]] && ((build_ok)); then
  quick_flag=()
  ((QUICK)) && quick_flag=(--quick)
  # bench_optim and bench_train_cli before bench_model, which spends whatever time is left.
  # (`-`, not `:-`: an empty GPU_CHECK_BENCHES means no benchmark, not the default set.)
  for bench in ${GPU_CHECK_BENCHES-bench_activations bench_mlp bench_optim bench_psa bench_train_cli bench_model}; do
    t0=$SECONDS
    case "$bench" in
      bench_model)  # whole-model training step vs transformers; spends at most what is left
        model_args=(--bench-exe "$BUILD_DIR/bench_train_step" --budget-s $(($(remaining_s) - 30)))
        ((QUICK)) && model_args+=(--contexts 4096,16384 --steps 2 --warmup 1)
        [[ -n "${GPU_CHECK_MODEL_SERIES:-}" ]] && model_args+=(--series "$GPU_CHECK_MODEL_SERIES")
        [[ -n "${GPU_CHECK_MODEL_CONTEXTS:-}" ]] && model_args+=(--contexts "$GPU_CHECK_MODEL_CONTEXTS")
        [[ -n "${GPU_CHECK_MODEL_SECTION:-}" ]] && model_args+=(--section "$GPU_CHECK_MODEL_SECTION")
        run_step "$bench" "" "" python3 bench/bench_model.py "${model_args[@]}" \
          --out "${BENCH_DIR#"$REPO_ROOT"/}" --update-doc yes ;;
      bench_train_cli)  # `unswag train` on the 1B-shaped config, AdamW8bit vs AdamW, and the transformers check
        train_args=(--exe "$BUILD_DIR/unswag" --budget-s $(($(remaining_s) - 90)))
        [[ -n "${GPU_CHECK_TRAIN_CONTEXTS:-}" ]] && train_args+=(--contexts "$GPU_CHECK_TRAIN_CONTEXTS")
        # shellcheck disable=SC2206
        [[ -n "${GPU_CHECK_TRAIN_ARGS:-}" ]] && train_args+=(${GPU_CHECK_TRAIN_ARGS})
        run_step "$bench" "" "" python3 bench/bench_train_cli.py "${train_args[@]}" \
          --out "${BENCH_DIR#"$REPO_ROOT"/}" --update-doc yes ;;
      *)
        suffix_args=()
        [[ -n "${GPU_CHECK_SECTION_SUFFIX:-}" ]] && suffix_args=("--section-suffix=$GPU_CHECK_SECTION_SUFFIX")  # = form: the value starts with a dash
        run_step "$bench" "" "" python3 "bench/$bench.py" --device cuda --lib "$BUILD_DIR/libunswag.so" \
          --out "${BENCH_DIR#"$REPO_ROOT"/}" --update-doc yes "${quick_flag[@]}" "${suffix_args[@]}" ;;
    esac
    if [[ -f "$BENCH_DIR/$bench.md" ]]; then touch "$BENCH_DIR/.doc-updated"; fi
    case "$STEP_RC" in
      0)  # name the files the bench wrote (fewbit_tiles writes no JSON)
        wrote=""
        for f in "$bench.json" "$bench.md"; do [[ -f "$BENCH_DIR/$f" ]] && wrote+="$f, "; done
        record "$bench" ok "${wrote}docs/BENCHMARKS.md" $((SECONDS - t0)) ;;
      3) record "$bench" FAILED "CORRECTNESS check failed (see log)" $((SECONDS - t0)) ;;
      *) record "$bench" "$(status_of_rc "$STEP_RC")" "rc=$STEP_RC (see log)" $((SECONDS - t0)) ;;
    esac
    collect
  done
fi

# --------------------------------------------------------------------------- #
# 5. Summary (last on stdout)
# --------------------------------------------------------------------------- #
{
  echo
  python3 - "$BENCH_DIR" <<'PY' || true
# Condensed benchmark results from the JSON files.
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
act = out / "bench_activations.json"
if act.exists():
    data = json.loads(act.read_text())
    print(f"activations (% of copy bandwidth, target >= {data['target_fraction_of_copy']:.0%}; PyTorch in brackets):")
    pairs = {}
    for r in data["rows"]:
        pairs.setdefault((r["dtype"], r["activation"], r["bits"]), {})[r["direction"]] = r
    for (dtype, activation, bits), d in pairs.items():
        cells = []
        for direction in ("forward", "backward"):
            r = d.get(direction)
            if r:
                flag = "" if r.get("target_met") is not False else " MISSED"
                cells.append(f"{direction[0]}wd {r['fraction_of_copy']:4.0%} [{r['torch_fraction_of_copy']:4.0%}]{flag}")
        print(f"  {dtype:<4} {activation:<4} {bits}b  " + "  ".join(cells))
    for e in data.get("errors", []):
        print(f"  ERROR {e}")
mlp = out / "bench_mlp.json"
if mlp.exists():
    data = json.loads(mlp.read_text())
    print("mlp swiglu (kept bytes, x fewer than plain, time vs plain, max grad err, target):")
    for r in data["rows"]:
        if r["activation"] != "swiglu":
            continue
        kept = r["kept_bytes"]
        kept_s = "n/a" if kept is None else f"{kept / 2**20:8.1f} MiB"
        fewer = r.get("fewer_bytes_than_pytorch")
        fewer_s = "n/a" if fewer is None else ("inf" if fewer == float("inf") or fewer > 1e4 else f"{fewer:.2f}x")
        tgt = {True: "met", False: "MISSED", None: ""}[r.get("target_met")]
        print(f"  {r['tokens']:>6} {r['contender']:<20} {kept_s:>12} {fewer_s:>7} "
              f"{r.get('time_vs_pytorch', float('nan')):6.3f}x {r['max_grad_error']:.1e} {tgt}")
    for e in data.get("errors", []):
        print(f"  ERROR {e}")
optim = out / "bench_optim.json"
if optim.exists():
    data = json.loads(optim.read_text())
    print("optimizer step, Llama-3.2-1B shapes (median ms, state bytes/param, first-step err / lr):")
    for r in data["rows"]:
        per = r.get("state_bytes_per_param")
        print(f"  {r['dtype']:<9} {r['contender']:<26} {r['time']['median_ms']:8.2f} ms "
              f"{'n/a' if per is None else f'{per:.3f}':>6} B/param  {r['first_step_error']:.1e}")
    for e in data.get("errors", []):
        print(f"  ERROR {e}")
PY
  for f in "$BENCH_DIR"/bench_model.md; do [[ -f "$f" ]] && sed -n '/^| context/,$p' "$f"; done
  echo
  echo "gpu-check summary ($(date -u '+%H:%M:%S UTC'), $((SECONDS - START_S))s; results in ${OUT:-$WORK_DIR}):"
  printf '| %-17s | %-8s | %5s | %s\n' step status secs detail
  for i in "${!STEP_NAMES[@]}"; do
    printf '| %-17s | %-8s | %5s | %s\n' "${STEP_NAMES[$i]}" "${STEP_STATUS[$i]}" "${STEP_SECONDS[$i]}" "${STEP_DETAIL[$i]}"
  done
  if [[ -f "$WORK_DIR/ctest-failed.log" ]]; then
    echo "failed tests (from ctest-failed.log):"
    grep -E 'Failure|FAILED|Expected|Which is|error|Error|what\(\)|max \|' "$WORK_DIR/ctest-failed.log" | head -40 || true
  fi
  if ((OVERALL_OK)); then echo "RESULT: OK"; else echo "RESULT: FAILED"; fi
} 2>&1 | tee -a "$LOG"
collect
((OVERALL_OK)) && exit 0 || exit 1
