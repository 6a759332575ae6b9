#!/usr/bin/env python3
"""Packet-Switched Attention against dense attention, side by side in one run.

Runs the C++ benchmarks next to libunswag.so and writes their tables into
docs/BENCHMARKS.md:
  speed   (bench_psa --mode speed)   forward+backward of one attention layer
          (16 heads x 128, bf16, batch 1): PSA vs the same layer on PyTorch's
          SDPA (causal; the backend SDPA picked is named), and SDPA alone.
  decode  (bench_psa --mode decode)  bytes the generation cache allocated per
          token and decode latency per token, PSA vs a dense KV cache.
  quality (bench_psa_quality)        validation loss of a small LM trained
          from scratch on real text: dense, PSA, and PSA with a random router
          of the same route shares, 2 seeds each (needs the corpus shards
          from scripts/make-psa-corpus.sh in .gpu-data/gcide/).

Usage:
  python3 bench/bench_psa.py --lib build/libunswag.so [--modes speed,decode,quality] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def run_lines(cmd: list[str], timeout: float) -> list[dict]:
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    sys.stderr.write(proc.stderr[-4000:])
    rows = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))
            print(line, flush=True)
    if proc.returncode != 0:
        common.die(f"{cmd[0]} exited with {proc.returncode}", 1)
    return rows


def fmt_ms(x: float | None) -> str:
    # Two decimals, or three significant digits below 1 ms (a fused decode step is ~0.05 ms).
    return "-" if x is None else f"{x:.2f}" if x >= 1 else f"{x:.3g}"


def shares(r: dict) -> str:
    f = r.get("route_fractions")
    return "-" if not f else "/".join(f"{100 * v:.1f}" for v in f)


def window_of(rows: list[dict]) -> str:
    return str(next((r["window"] for r in rows if "window" in r), "?"))


def speed_section(header: dict, rows: list[dict]) -> str:
    contexts = sorted({r["context"] for r in rows})
    sig = sorted({r["target_signal"] for r in rows if r["what"] == "psa_layer"})
    backend = next((r["backend"] for r in rows if r["what"] == "sdpa_kernel"), "?")
    headers = ["context", "SDPA kernel fwd+bwd (ms)", "dense layer (ms)"]
    for s in sig:
        headers += [f"PSA {100 * s:g}% signal (ms)", "speed-up vs dense layer", "routes p/l/s/sig %"]
    table = []
    for t in contexts:
        get = lambda what, s=None: next((r for r in rows if r["context"] == t and r["what"] == what
                                         and (s is None or r.get("target_signal") == s)), None)
        sd, dn = get("sdpa_kernel"), get("dense_layer")
        line = [f"{t:,}", fmt_ms(sd and sd["ms"]), fmt_ms(dn and dn["ms"])]
        for s in sig:
            p = get("psa_layer", s)
            ratio = dn["ms"] / p["ms"] if (p and dn) else None
            line += [fmt_ms(p and p["ms"]), common.format_ratio(ratio), shares(p) if p else "-"]
        table.append(line)
    return "\n".join([
        "## PSA layer speed (forward + backward, one layer)", "",
        common.header_markdown(header), "",
        "One attention layer of 16 heads x 128 (hidden 2048), bf16, batch 1, causal. The dense layer is "
        "q/k/v/o projections + RoPE + PyTorch's SDPA (backend picked: "
        f"`{backend}`); PSA is the whole layer (projections, router with Gumbel noise and straight-through "
        f"gates, local conv, summary scan, packed signal attention, attention window of {window_of(rows)} "
        "tokens). Speed-up = dense layer time / PSA time "
        "(> 1: PSA faster). Routes: measured hard shares prune/local/summary/signal of the last call; before "
        "timing, four no-grad calls set the route biases to log(target / measured share) steps, as training's "
        "bias controller holds the shares at their budget (an untrained router's logit spread alone gives "
        "14.2% signal for a 12.5% budget).", "",
        common.markdown_table(headers, table),
    ])


def decode_section(header: dict, rows: list[dict]) -> str:
    contexts = sorted({r["context"] for r in rows})
    sig = sorted({r["target_signal"] for r in rows if r["what"] == "psa"})
    headers = ["context", "dense cache B/token", "dense ms/token"]
    for s in sig:
        headers += [f"PSA {100 * s:g}% cache B/token", "smaller", "fused ms/token", "faster", "ATen ms/token"]
    table = []

    def psa_row(t, s, path):
        return next((r for r in rows if r["context"] == t and r["what"] == "psa" and r["target_signal"] == s
                     and r.get("path", "composition") == path), None)

    for t in contexts:
        dn = next((r for r in rows if r["context"] == t and r["what"] == "dense"), None)
        line = [f"{t:,}", f"{dn['cache_bytes_per_token']:,.0f}" if dn else "-", fmt_ms(dn and dn["ms_per_token"])]
        for s in sig:
            p, c = psa_row(t, s, "fused"), psa_row(t, s, "composition")
            if p and dn:
                line += [f"{p['cache_bytes_per_token']:,.0f}",
                         common.format_ratio(dn["cache_bytes_per_token"] / p["cache_bytes_per_token"]),
                         fmt_ms(p["ms_per_token"]), common.format_ratio(dn["ms_per_token"] / p["ms_per_token"]),
                         fmt_ms(c and c["ms_per_token"])]
            else:
                line += ["-"] * 5
        table.append(line)
    return "\n".join([
        "## PSA generation cache and decode latency (one layer)", "",
        common.header_markdown(header), "",
        "Prefill a context of L random tokens into the layer's cache, then decode single tokens (median of the "
        "timed steps, CUDA events). Cache bytes are what the cache allocated (capacity, not filled length), "
        "divided by the tokens seen: the dense cache holds K and V of every token; PSA holds the signal "
        f"tokens' K/V, the window's last {window_of(rows)} tokens' K/V (a ring in the fused decode), the conv "
        "tail and the summary register. Dense: q/k/v projections, RoPE, the cache write, FlashAttention over "
        "the filled cache and o_proj as ATen ops. PSA fused: the layer's decode step in five kernels with no "
        "host sync (docs/psa.md, \"Fused decode\"); ATen: the same step as the ATen composition it replaces, "
        "from its own prefill of the same layer (same weights). Faster = dense / fused. Same layer shape as above.", "",
        common.markdown_table(headers, table),
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--modes", default=os.environ.get("BENCH_PSA_MODES", "speed,decode,quality"),
                        help="comma-separated (default: $BENCH_PSA_MODES or speed,decode,quality)")
    parser.add_argument("--quality-args", default=os.environ.get("BENCH_PSA_QUALITY_ARGS", ""),
                        help="extra arguments for bench_psa_quality (default: $BENCH_PSA_QUALITY_ARGS)")
    parser.add_argument("--quality-section", default=os.environ.get("BENCH_PSA_QUALITY_SECTION", "psa-quality"),
                        help="docs/BENCHMARKS.md section for the quality table, its plot named after it "
                             "(default: $BENCH_PSA_QUALITY_SECTION or psa-quality; a variant run, e.g. "
                             "psa-quality-joint, keeps the main table)")
    args = parser.parse_args()
    lib = Path(args.lib) if args.lib else common.default_library_path(args.device)
    build = lib.parent
    out = Path(args.out)
    header = common.environment_header(args.device, common.command_line())
    modes = [m for m in args.modes.split(",") if m]
    update = common.should_update_doc(args.update_doc, args.device)
    results: dict[str, list[dict]] = {}
    dev = ["--device", args.device]
    if "speed" in modes:
        ctx = ["--contexts", "2048,8192"] if args.quick else []
        results["speed"] = run_lines([str(build / "bench_psa"), "--mode", "speed", *dev, *ctx], 1800)
        md = speed_section(header, results["speed"])
        common.write_text(out / "bench_psa_speed.md", md + "\n")
        if update:
            common.update_benchmarks_doc(Path(args.doc), "psa-speed" + args.section_suffix, md)
    if "decode" in modes:
        ctx = ["--contexts", "4096"] if args.quick else []
        results["decode"] = run_lines([str(build / "bench_psa"), "--mode", "decode", *dev, *ctx], 1800)
        md = decode_section(header, results["decode"])
        common.write_text(out / "bench_psa_decode.md", md + "\n")
        if update:
            common.update_benchmarks_doc(Path(args.doc), "psa-decode" + args.section_suffix, md)
    if "quality" in modes:
        exe = build / "bench_psa_quality"
        if not exe.exists():
            common.die(f"{exe} is not built", 1)
        data = common.REPO_ROOT / ".gpu-data" / "gcide"
        if not (data / "train_000000.bin").exists():
            common.die(f"quality: no corpus in {data}: run scripts/make-psa-corpus.sh where Debian's archive "
                       "is reachable and carry .gpu-data to the GPU machine", 1)
        extra = args.quality_args.split() + (["--quick"] if args.quick else [])
        proc = subprocess.run([str(exe), *dev, "--data", str(data), "--out", str(out / "psa_quality"), *extra],
                              text=True, stdout=subprocess.PIPE, timeout=3600)  # progress on stderr
        print(proc.stdout[-6000:])
        if proc.returncode != 0:
            common.die(f"bench_psa_quality exited with {proc.returncode}", 1)
        section = args.quality_section
        svg_name = section.replace("-", "_") + ".svg"
        md_path = out / "psa_quality" / "quality.md"
        # The plot: beside the results (gpu-check collects out/*.svg) and, with
        # the doc, in docs/ where the section's image link points.
        svg = (out / "psa_quality" / "quality.svg").read_text()
        common.write_text(out / f"bench_{svg_name}", svg)
        if update:
            common.write_text(Path(args.doc).parent / svg_name, svg)
        md = "\n".join(["## PSA quality: small LM from scratch (dense vs PSA vs random router)", "",
                        common.header_markdown(header),
                        f"- bench_psa_quality arguments: `{' '.join(extra) or '(defaults)'}`", "",
                        md_path.read_text().strip().replace("(psa_quality.svg)", f"({svg_name})")])
        results["quality"] = json.loads((out / "psa_quality" / "quality.json").read_text())
        common.write_text(out / "bench_psa_quality.md", md + "\n")
        if update:
            common.update_benchmarks_doc(Path(args.doc), section, md)
    common.write_json(out / "bench_psa.json", {"header": header, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
