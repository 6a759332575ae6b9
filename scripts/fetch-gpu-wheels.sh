#!/usr/bin/env bash
# Role: download, on a machine with PyPI and Debian access, what the offline GPU
# machine lacks: Python wheels (Liger-Kernel and bitsandbytes, the optional
# benchmark contenders) into .whl/, and the C++ build dependencies of CMakeLists.txt (CLI11, nlohmann_json,
# GoogleTest, as Debian .debs) into .whl/debs/; scripts/gpu-check.sh installs
# the wheels into /tmp/site and unpacks the .debs into a private prefix there.
#
# Usage: bash scripts/fetch-gpu-wheels.sh            (idempotent; re-fetches nothing present)
#        LIGER_VERSION=0.8.4 BNB_VERSION=0.50.2 bash scripts/fetch-gpu-wheels.sh
# Then carry ".whl" with the GPU call.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

# Latest Liger-Kernel at the time of writing; it needs torch>=2.1.2 and
# triton>=2.3.1 only, so it runs on the GPU machine's torch 2.11 / triton 3.6.
LIGER_VERSION="${LIGER_VERSION:-0.8.5}"
# bitsandbytes (bench/bench_optim.py's 8-bit AdamW contender) needs torch, numpy
# and packaging only. Its wheel (43 MB) carries one native library per CUDA /
# ROCm / XPU version; only the one for the GPU machine's torch (cu130) is kept.
BNB_VERSION="${BNB_VERSION:-0.50.2}"
BNB_CUDA="${BNB_CUDA:-130}"
WHEEL_DIR=".whl"
MAX_BYTES=$((10 * 1024 * 1024))

# Packages the GPU machine already has (see the device notes' package list):
# a requirement naming one of these is not fetched.
PRESENT_ON_GPU="torch triton transformers packaging numpy filelock jinja2 \
typing-extensions sympy networkx fsspec peft accelerate safetensors \
huggingface-hub tokenizers pyyaml regex requests tqdm setuptools"

# name==version pairs to download (extend if a new Requires-Dist appears).
WANTED=("liger-kernel==${LIGER_VERSION}" "bitsandbytes==${BNB_VERSION}")

# Debian packages holding what CMakeLists.txt finds (CLI11, GTest, nlohmann_json,
# PCRE2 and utf8proc with their shared libraries); unpacked with dpkg -x, so
# their own dependencies do not matter.
DEBS=(libcli11-dev libgtest-dev libgmock-dev nlohmann-json3-dev libpcre2-dev libpcre2-8-0 libutf8proc-dev libutf8proc2)

mkdir -p "$WHEEL_DIR"

download() {
  python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    -d "$WHEEL_DIR" "$1"
}

normalize() {  # PEP 503 name normalisation: lower case, runs of -_. become -
  echo "$1" | tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/-/g'
}

for spec in "${WANTED[@]}"; do
  name="${spec%%==*}"
  version="${spec##*==}"
  wheel_prefix="$(echo "$name" | tr '-' '_')-${version}-"
  # Keep exactly one version of each package: two stop the install on the GPU.
  for old in "$WHEEL_DIR"/"$(echo "$name" | tr '-' '_')"-*.whl; do
    [[ -e "$old" ]] || continue
    [[ "$(basename "$old")" == "$wheel_prefix"* ]] || { echo "removing stale $old"; rm -f "$old"; }
  done
  if ls "$WHEEL_DIR"/"$wheel_prefix"*.whl >/dev/null 2>&1; then
    echo "have $spec"
  else
    echo "downloading $spec"
    download "$spec"
  fi
done

# Slim the bitsandbytes wheel to the native library the GPU machine loads
# (libbitsandbytes_cuda$BNB_CUDA.so, and the CPU one), dropping the others from
# the archive and from its RECORD; rewritten to a temporary file, then renamed.
for wheel in "$WHEEL_DIR"/bitsandbytes-*.whl; do
  [[ -e "$wheel" ]] || continue
  python3 - "$wheel" "$BNB_CUDA" <<'PY'
import os, re, sys, zipfile
path, keep_cuda = sys.argv[1], sys.argv[2]
native = re.compile(r"bitsandbytes/libbitsandbytes_(\w+)\.so$")
def wanted(name):
    m = native.search(name)
    return m is None or m.group(1) in ("cpu", "cuda" + keep_cuda)
with zipfile.ZipFile(path) as src:
    names = src.namelist()
    if all(wanted(n) for n in names):
        print(f"  {os.path.basename(path)}: already slim")
        sys.exit(0)
    if not any(native.search(n) and n.endswith(f"cuda{keep_cuda}.so") for n in names):
        sys.exit(f"{path} has no libbitsandbytes_cuda{keep_cuda}.so")
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if not wanted(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(l for l in lines if wanted(l.split(",", 1)[0])).encode()
            dst.writestr(info, data)
os.replace(tmp, path)
print(f"  {os.path.basename(path)}: kept libbitsandbytes_cpu.so and libbitsandbytes_cuda{keep_cuda}.so")
PY
done

# Check every wheel's unconditional requirements against the GPU machine's set.
missing=()
for wheel in "$WHEEL_DIR"/*.whl; do
  while IFS= read -r line; do
    [[ -z "$line" ]] && continue
    [[ "$line" == *"extra =="* ]] && continue
    req="${line#Requires-Dist: }"
    req_name="$(normalize "$(echo "$req" | sed -E 's/^([A-Za-z0-9_.-]+).*/\1/')")"
    found=0
    for present in $PRESENT_ON_GPU; do
      [[ "$req_name" == "$(normalize "$present")" ]] && found=1
    done
    for have in "$WHEEL_DIR"/*.whl; do
      have_name="$(normalize "$(basename "$have" | cut -d- -f1)")"
      [[ "$req_name" == "$have_name" ]] && found=1
    done
    if [[ $found -eq 1 ]]; then
      echo "  $(basename "$wheel"): requires $req (present)"
    else
      echo "  $(basename "$wheel"): requires $req (MISSING on the GPU machine)"
      missing+=("$req")
    fi
  done < <(unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist' || true)
done

# The C++ build dependencies, as .debs for x86-64 (the GPU machine's processor).
deb_dir="$WHEEL_DIR/debs"
mkdir -p "$deb_dir"
apt_opts=()
if [[ "$(dpkg --print-architecture)" != "amd64" ]]; then
  mkdir -p /tmp/amd64-lists/partial
  apt_opts=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64-lists)
  apt-get "${apt_opts[@]}" update -qq
fi
for deb in "${DEBS[@]}"; do
  if ls "$deb_dir/${deb}_"*.deb >/dev/null 2>&1; then
    echo "have $deb"
    continue
  fi
  echo "downloading $deb (.deb)"
  if ! (cd "$deb_dir" && apt-get "${apt_opts[@]}" download -q "$deb" 2>/dev/null); then
    apt-get "${apt_opts[@]}" update -qq
    (cd "$deb_dir" && apt-get "${apt_opts[@]}" download -q "$deb")
  fi
done

total_bytes=$(du -cb "$WHEEL_DIR"/*.whl "$deb_dir"/*.deb | tail -1 | cut -f1)
echo "in $WHEEL_DIR ($total_bytes bytes):"
(cd "$WHEEL_DIR" && ls -1 ./*.whl debs/*.deb)

if (( ${#missing[@]} > 0 )); then
  echo "ERROR: requirements not on the GPU machine and not fetched: ${missing[*]}" >&2
  echo "       add them to WANTED in $0" >&2
  exit 1
fi
if (( total_bytes > MAX_BYTES )); then
  echo "ERROR: $WHEEL_DIR is larger than $MAX_BYTES bytes" >&2
  exit 1
fi
echo "ok: carry \".whl\" with the GPU call"
