#!/usr/bin/env python3
"""Runs the few-bit kernels' tiles-in-flight sweep (build-cuda/bench_fewbit_tiles,
from bench/fewbit_tiles.cu, built with -DUNSWAG_BUILD_TUNING=ON) and writes its
tables into the fewbit-tiles section of docs/BENCHMARKS.md.

  python3 bench/fewbit_tiles.py --lib build-cuda/libunswag.so [--update-doc yes]

Exit status: the sweep's (1 when a variant's outputs differ from the others).
"""
import argparse
import subprocess
import sys
from pathlib import Path

import common

SECTION = "fewbit-tiles"

READING = (
    "Reading: `t=N`: one pass, each warp owns N consecutive tiles (their loads issued before any math) and the "
    "grid covers the input once; `PN`: persistent, one wave of blocks, each warp walks groups of N tiles with a "
    "stride of the grid and issues the next group's loads before this group's math; `search`: the 3- and 4-bit "
    "forward at the default schedule with the binary-search encode (kBits dependent shared-memory loads per "
    "element) instead of the cell table (src/kernels/fewbit_cells.h: one rounded multiply-add and one load). "
    "The \"default\" columns are the library's choice (`fewbit_fwd_schedule` / `fewbit_bwd_schedule` in "
    "src/kernels/elementwise.cu, which says from which run of this sweep they were set)."
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--exe", default=None, help="the sweep binary (default: bench_fewbit_tiles beside --lib)")
    args = parser.parse_args()
    if args.device != "cuda":
        common.die("fewbit_tiles: the sweep times CUDA kernels; --device must be cuda")
    lib = Path(args.lib) if args.lib else common.default_library_path("cuda")
    exe = Path(args.exe) if args.exe else lib.parent / "bench_fewbit_tiles"
    if not exe.exists():
        common.die(f"fewbit_tiles: {exe} not found (configure with -DUNSWAG_BUILD_TUNING=ON)")
    header = common.environment_header(args.device, common.command_line())
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    sys.stdout.write(run.stdout)
    sys.stderr.write(run.stderr)
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines or not lines[0].startswith("# few-bit kernels"):
        print(f"fewbit_tiles: the sweep failed (exit {run.returncode})", file=sys.stderr)
        return run.returncode or 1
    title = lines[0].lstrip("# ").strip()
    body = "\n".join([
        "## Few-bit kernels: schedules and encodes (tuning sweep)", "",
        common.header_markdown(header), "",
        f"{title}. Each cell is the effective bandwidth of one variant of `fewbit_forward_kernel` / "
        "`fewbit_backward_kernel` (tiles of 256 elements, 8 per lane) as a fraction of a device-to-device copy "
        "of the same input. Every variant's outputs (y, codes, grad_x) are compared byte for byte with t=1's, "
        "on this input and on an odd-length (1000003) input one element past an aligned address; the run "
        "fails if any differ.", "",
        "\n".join(lines[1:]).strip(), "",
        READING,
    ])
    out = Path(args.out)
    common.write_text(out / "fewbit_tiles.md", body + "\n")
    if common.should_update_doc(args.update_doc, args.device):
        common.update_benchmarks_doc(Path(args.doc), SECTION + args.section_suffix, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
