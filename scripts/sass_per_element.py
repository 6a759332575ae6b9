"""Issued instructions per element of the few-bit forward kernels' main path,
from the sm_90 SASS (the figures docs/fewbit.md and the README cite).

Compiles src/kernels/elementwise.cu to a cubin with nvcc, disassembles it with
cuobjdump and nvdisasm (from the PyPI wheels when the CUDA toolkit has none:
`pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`), and for each kernel instance asked
for counts the instructions from its first 16-byte load to the next EXIT: the
branch for warps whose tiles lie inside n (no bounds checks), kTiles tiles of
8 elements per lane, so dividing by 8 * kTiles gives the instructions a lane
issues per element it handles.

Usage: python3 scripts/sass_per_element.py [--arch sm_90]
"""
import argparse
import glob
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
ACTS = {"relu": 0, "relu2": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
TYPES = {"bf16": "13__nv_bfloat16", "fp16": "6__half", "fp32": "f"}


def find_tool(name):
    exe = shutil.which(name)
    if exe:
        return exe
    for site in sys.path:
        hits = glob.glob(os.path.join(site, "nvidia", "*", "bin", name))
        if hits:
            return hits[0]
    sys.exit(f"{name} not found: pip install nvidia-cuda-{name} (or put the CUDA toolkit's on PATH)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--kernels", default="bf16:gelu:4:2,bf16:gelu:3:2,bf16:gelu:2:2,bf16:silu:4:2,fp16:gelu:4:2",
                    help="dtype:act:bits:tiles,... (one-pass schedule, cell table, 16-byte aligned)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "elementwise.cubin")
        subprocess.run(["nvcc", "-cubin", "-std=c++17", "-O3", f"-arch={args.arch}", "--expt-relaxed-constexpr",
                        f"-I{ROOT / 'src/kernels'}", f"-I{ROOT / 'src'}", f"-I{ROOT / 'include'}",
                        str(ROOT / "src/kernels/elementwise.cu"), "-o", cubin], check=True)
        env = dict(os.environ, NVDISASM_PATH=os.path.dirname(find_tool("nvdisasm")))
        sass = subprocess.run([find_tool("cuobjdump"), "-sass", cubin], check=True, capture_output=True, text=True,
                              env=env).stdout
    functions = re.split(r"\n\s*Function : ", sass)
    print(f"| kernel ({args.arch}) | instructions per element |")
    print("| --- | ---: |")
    for spec in args.kernels.split(","):
        dtype, act, bits, tiles = spec.split(":")
        # fewbit_forward_kernel<T, kBits, kAct, kTiles, kPersistent=false, kCells=true, kAligned=true>
        key = f"fewbit_forward_kernelI{TYPES[dtype]}Li{bits}ELNS0_3ActE{ACTS[act]}ELi{tiles}ELb0ELb1ELb1E"
        body = next((f for f in functions if key in f.split("\n", 1)[0]), None)
        if body is None:
            sys.exit(f"no kernel instance {spec} ({key}) in the cubin")
        lines = [t.strip() for t in re.findall(r"/\*[0-9a-f]{4}\*/\s+([^;]*);", body)]
        start = next(i for i, t in enumerate(lines) if "LDG.E.128" in t)
        end = next(i for i in range(start, len(lines)) if lines[i] == "EXIT")
        print(f"| {dtype} {act} {bits}-bit forward, {tiles} tiles | {(end - start) / (8 * int(tiles)):.1f} |")


if __name__ == "__main__":
    main()
