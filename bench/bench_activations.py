# Role: benchmark UnSwag's compressed-activation kernels (relu_1bit and the
# few-bit silu/gelu forward/backward) as effective memory bandwidth, against a
# device-to-device copy and the matching PyTorch ops measured in the same run;
# checks correctness first, writes JSON + markdown and docs/BENCHMARKS.md.
#
#   python3 bench/bench_activations.py --lib build-cuda/libunswag.so --out out/
#   python3 bench/bench_activations.py --device cpu --quick --lib build/libunswag.so
from __future__ import annotations

import argparse
import math
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SECTION = "bench_activations"
TARGET_FRACTION_OF_COPY = 0.85

# Few-bit activations: name -> (torch forward, torch backward(grad, x)).
FEWBIT_REFERENCES = {
    "silu": (F.silu, lambda g, x: torch.ops.aten.silu_backward(g, x)),
    "gelu": (lambda x: F.gelu(x), lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="none")),
}
# Forward outputs must agree with PyTorch to this relative L2 error.
FORWARD_TOLERANCE = {torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.float32: 1e-5}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    common.add_common_arguments(parser)
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma-separated: bf16,fp16,fp32")
    parser.add_argument("--input-mib", type=float, default=None,
                        help="input size in MiB per dtype (default: 256 on cuda, 64 with --quick)")
    parser.add_argument("--extra-bits", default="1,3,4",
                        help="few-bit widths measured for bf16 besides 2")
    return parser.parse_args()


def fail_correctness(message: str) -> None:
    common.die(f"CORRECTNESS: {message}", code=3)


def check_relu_specials(ops, device: str, dtype: torch.dtype) -> None:
    """relu_1bit on ±0, ±inf, subnormals and a ragged length: must equal PyTorch bit for bit."""
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40, 1.0, -1.0],
                            dtype=torch.float32)
    x = torch.cat([specials, torch.randn(1000 + 37)]).to(device=device, dtype=dtype)
    grad = torch.randn(x.shape, device=device, dtype=dtype)
    y, mask = ops.relu_1bit_forward(x)
    if not torch.equal(y, torch.relu(x)):
        bad = (y != torch.relu(x)).nonzero().flatten()[:8].tolist()
        fail_correctness(f"relu_1bit_forward != torch.relu ({dtype}, special values; first bad indices {bad})")
    grad_x = ops.relu_1bit_backward(grad, mask)
    expected = torch.ops.aten.threshold_backward(grad, x, 0)
    if not torch.equal(grad_x, expected):
        bad = (grad_x != expected).nonzero().flatten()[:8].tolist()
        fail_correctness(f"relu_1bit_backward != threshold_backward ({dtype}, special values; "
                         f"first bad indices {bad})")
    y_autograd = ops.relu_1bit(x.detach().requires_grad_())
    if not torch.equal(y_autograd.detach(), torch.relu(x)):
        fail_correctness(f"relu_1bit (autograd op) != torch.relu ({dtype})")


def bench_dtype(ops, device: str, dtype_name: str, input_mib: float, extra_bits: list[int],
                timed, errors: list[str]) -> tuple[list[dict], dict]:
    """Checks and times every op for one dtype; returns (rows, copy reference)."""
    dtype = common.DTYPES[dtype_name]
    check_relu_specials(ops, device, dtype)

    element_size = torch.empty((), dtype=dtype).element_size()
    numel = int(input_mib * 2**20) // element_size
    numel -= numel % 1024
    x = torch.randn(numel, device=device, dtype=dtype)
    grad = torch.randn(numel, device=device, dtype=dtype)
    tensor_bytes = numel * element_size

    # Reference bandwidth: a device-to-device copy (read + write), timed
    # before and after this dtype's ops to show drift; the faster one counts.
    copy_target = torch.empty_like(x)
    copy_first = timed(lambda: copy_target.copy_(x))

    # --- relu_1bit: exactness on the timed tensors, then timing -----------
    y, mask = ops.relu_1bit_forward(x)
    if not torch.equal(y, torch.relu(x)):
        fail_correctness(f"relu_1bit_forward != torch.relu on randn ({dtype_name}, {numel} elements)")
    grad_x = ops.relu_1bit_backward(grad, mask)
    if not torch.equal(grad_x, torch.ops.aten.threshold_backward(grad, x, 0)):
        fail_correctness(f"relu_1bit_backward != threshold_backward on randn ({dtype_name})")
    mask_bytes = mask.untyped_storage().nbytes()
    expected_mask_bytes = math.ceil(numel / 32) * 4
    if mask_bytes != expected_mask_bytes:
        print(f"WARNING: relu mask is {mask_bytes} bytes, expected {expected_mask_bytes}", flush=True)
    del y, grad_x

    cases = [
        dict(op="relu_1bit_forward", activation="relu", bits=1, direction="forward",
             run=lambda: ops.relu_1bit_forward(x),
             bytes=2 * tensor_bytes + mask_bytes, code_bytes=mask_bytes,
             torch_op="torch.relu", torch_run=lambda: torch.relu(x), torch_bytes=2 * tensor_bytes,
             grad_error=0.0),
        dict(op="relu_1bit_backward", activation="relu", bits=1, direction="backward",
             run=lambda m=mask: ops.relu_1bit_backward(grad, m),
             bytes=2 * tensor_bytes + mask_bytes, code_bytes=mask_bytes,
             torch_op="aten.threshold_backward",
             torch_run=lambda: torch.ops.aten.threshold_backward(grad, x, 0),
             torch_bytes=3 * tensor_bytes, grad_error=0.0),
    ]

    bit_widths = [2] + (extra_bits if dtype == torch.bfloat16 else [])
    for activation, (torch_forward, torch_backward) in FEWBIT_REFERENCES.items():
        reference_y = torch_forward(x)
        reference_grad = torch_backward(grad, x)
        for bits in bit_widths:
            label = f"fewbit_forward({activation}, {bits})"
            try:
                y, codes = ops.fewbit_forward(x, activation, bits)
                forward_error = common.relative_l2_error(y, reference_y)
                if not forward_error <= FORWARD_TOLERANCE[dtype]:
                    fail_correctness(f"{label} differs from PyTorch's {activation}: relative L2 "
                                     f"error {forward_error:.3e} > {FORWARD_TOLERANCE[dtype]:.0e} ({dtype_name})")
                grad_x = ops.fewbit_backward(grad, codes, activation, bits)
                grad_error = common.relative_l2_error(grad_x, reference_grad)
                if not grad_error < 1.0:
                    fail_correctness(f"fewbit_backward({activation}, {bits}) relative L2 error "
                                     f"{grad_error} vs the exact derivative ({dtype_name})")
                code_bytes = codes.untyped_storage().nbytes()
                expected_code_bytes = math.ceil(numel / 32) * bits * 4
                if code_bytes != expected_code_bytes:
                    print(f"WARNING: {label} codes are {code_bytes} bytes, expected "
                          f"{expected_code_bytes}", flush=True)
                del y, grad_x
            except RuntimeError as error:
                message = f"{label} [{dtype_name}] raised: {str(error).splitlines()[0]}"
                print(f"ERROR: {message}", flush=True)
                errors.append(message)
                continue
            cases.append(dict(
                op="fewbit_forward", activation=activation, bits=bits, direction="forward",
                run=lambda a=activation, b=bits: ops.fewbit_forward(x, a, b),
                bytes=2 * tensor_bytes + code_bytes, code_bytes=code_bytes,
                torch_op=f"F.{activation}", torch_run=lambda f=torch_forward: f(x),
                torch_bytes=2 * tensor_bytes, grad_error=None, forward_error=forward_error))
            cases.append(dict(
                op="fewbit_backward", activation=activation, bits=bits, direction="backward",
                run=lambda a=activation, b=bits, c=codes: ops.fewbit_backward(grad, c, a, b),
                bytes=2 * tensor_bytes + code_bytes, code_bytes=code_bytes,
                torch_op=f"aten.{activation}_backward", torch_run=lambda f=torch_backward: f(grad, x),
                torch_bytes=3 * tensor_bytes, grad_error=grad_error))
        del reference_y, reference_grad

    dtype_rows = []
    for case in cases:
        try:
            ours = timed(case["run"])
        except RuntimeError as error:
            message = f"{case['op']}({case['activation']}, {case['bits']}) [{dtype_name}] raised while timing: " \
                      f"{str(error).splitlines()[0]}"
            print(f"ERROR: {message}", flush=True)
            errors.append(message)
            continue
        reference = timed(case["torch_run"])
        dtype_rows.append({
            "dtype": dtype_name,
            "op": case["op"],
            "activation": case["activation"],
            "bits": case["bits"],
            "direction": case["direction"],
            "numel": numel,
            "bytes_moved": case["bytes"],
            "kept_bits_per_element": 8 * case["code_bytes"] / numel,
            "time": ours,
            "bandwidth_gbs": common.bandwidth_gbs(case["bytes"], ours["median_ms"]),
            "torch_op": case["torch_op"],
            "torch_bytes_moved": case["torch_bytes"],
            "torch_time": reference,
            "torch_bandwidth_gbs": common.bandwidth_gbs(case["torch_bytes"], reference["median_ms"]),
            "grad_rel_l2_error": case.get("grad_error"),
            "forward_rel_l2_error": case.get("forward_error"),
        })
        last = dtype_rows[-1]
        print(f"  {dtype_name} {case['op']:<19} {case['activation']:<4} bits={case['bits']} "
              f"{ours['median_ms']:.4f} ms {last['bandwidth_gbs']:.1f} GB/s | "
              f"{case['torch_op']} {reference['median_ms']:.4f} ms", flush=True)

    copy_last = timed(lambda: copy_target.copy_(x))
    copy_bytes = 2 * tensor_bytes
    copy_bw = [common.bandwidth_gbs(copy_bytes, c["median_ms"]) for c in (copy_first, copy_last)]
    copy = {"bytes_moved": copy_bytes, "first": copy_first, "last": copy_last,
            "bandwidth_gbs": max(copy_bw), "bandwidth_gbs_first_last": copy_bw}
    for row in dtype_rows:
        row["fraction_of_copy"] = row["bandwidth_gbs"] / copy["bandwidth_gbs"]
        row["torch_fraction_of_copy"] = row["torch_bandwidth_gbs"] / copy["bandwidth_gbs"]
        # CPU timings say nothing about the GPU target: not judged there.
        row["target_met"] = (row["fraction_of_copy"] >= TARGET_FRACTION_OF_COPY) if device == "cuda" else None
    print(f"  {dtype_name} copy: {copy_bw[0]:.1f} / {copy_bw[1]:.1f} GB/s (first / last)", flush=True)
    return dtype_rows, copy


def main() -> int:
    args = parse_args()
    device = common.resolve_device(args.device)
    ops = common.load_unswag(args.lib, device)
    torch.manual_seed(args.seed)
    header = common.environment_header(device, common.command_line())
    common.warm_up_device(device)
    out_dir = Path(args.out)

    if device == "cuda":
        input_mib = args.input_mib or (64.0 if args.quick else 256.0)
        warmup = args.warmup or (5 if args.quick else 10)
        repeats = args.repeats or (20 if args.quick else 50)
    else:
        input_mib = args.input_mib or (1.0 if args.quick else 16.0)
        warmup = args.warmup or 1
        repeats = args.repeats or (3 if args.quick else 10)
    dtype_names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    extra_bits = [int(b) for b in args.extra_bits.split(",") if b.strip()]

    print(f"# bench_activations on {header['device_name']} | torch {header['torch']} | "
          f"{input_mib:g} MiB input per dtype | warmup {warmup}, repeats {repeats}", flush=True)

    rows: list[dict] = []
    copies: dict[str, dict] = {}
    errors: list[str] = []

    def timed(fn):
        return common.time_function(fn, device, warmup=warmup, repeats=repeats)

    for dtype_name in dtype_names:
        dtype_rows, copies[dtype_name] = bench_dtype(ops, device, dtype_name, input_mib, extra_bits,
                                                     timed, errors)
        rows.extend(dtype_rows)
        if device == "cuda":
            torch.cuda.empty_cache()

        payload = {"header": header, "config": {"input_mib": input_mib, "warmup": warmup,
                                                "repeats": repeats, "dtypes": dtype_names},
                   "target_fraction_of_copy": TARGET_FRACTION_OF_COPY,
                   "copy": copies, "rows": rows, "errors": errors}
        common.write_json(out_dir / "bench_activations.json", payload)

    markdown = render_markdown(header, rows, copies, input_mib, warmup, repeats, errors)
    common.write_text(out_dir / "bench_activations.md", markdown + "\n")
    if common.should_update_doc(args.update_doc, device):
        common.update_benchmarks_doc(Path(args.doc), SECTION + args.section_suffix, markdown)
        print(f"updated {args.doc} section {SECTION + args.section_suffix}")
    print()
    print(markdown)
    if errors:
        print(f"\n{len(errors)} op(s) FAILED:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    return 0


def _gbs(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def render_markdown(header, rows, copies, input_mib, warmup, repeats, errors) -> str:
    lines = [
        "## Activation kernels: effective bandwidth",
        "",
        common.header_markdown(header),
        f"- Input: {input_mib:g} MiB of `torch.randn` per dtype (1-D); median of {repeats} timings "
        f"after {warmup} warm-ups (IQR shown).",
        "- Bytes counted: forward reads x, writes y and the packed code; backward reads grad_y "
        "and the code, writes grad_x; PyTorch's ops likewise (their backward reads x instead of "
        "a code). Copy: `dst.copy_(x)`, read + write.",
        f"- **Target: UnSwag kernels >= {TARGET_FRACTION_OF_COPY:.0%} of copy bandwidth.** "
        "`grad err` is the relative L2 error of grad_x against the exact derivative "
        "(few-bit backward is approximate by design; relu_1bit is checked bit-exact).",
        "",
    ]
    copy_rows = [[name, common.format_bytes(c["bytes_moved"]), common.format_float(c["first"]["median_ms"], 4),
                  f"{_gbs(c['bandwidth_gbs_first_last'][0])} / {_gbs(c['bandwidth_gbs_first_last'][1])}"]
                 for name, c in copies.items()]
    lines += [common.markdown_table(["dtype", "copy bytes", "copy ms", "copy GB/s (first / last)"], copy_rows), ""]
    table_rows = []
    for row in rows:
        speedup = row["torch_time"]["median_ms"] / row["time"]["median_ms"]
        table_rows.append([
            row["dtype"], row["op"], row["activation"], row["bits"],
            common.format_float(row["kept_bits_per_element"], 2),
            f"{row['time']['median_ms']:.4f} ± {row['time']['iqr_ms']:.4f}",
            _gbs(row["bandwidth_gbs"]), f"{row['fraction_of_copy']:.0%}",
            {True: "met", False: "MISSED", None: "n/a"}[row["target_met"]],
            row["torch_op"], f"{row['torch_time']['median_ms']:.4f}",
            f"{row['torch_fraction_of_copy']:.0%}", common.format_ratio(speedup),
            "exact" if row["grad_rel_l2_error"] == 0.0 else common.format_float(row["grad_rel_l2_error"], 4)
            if row["grad_rel_l2_error"] is not None else "",
        ])
    headers = ["dtype", "op", "act", "bits", "kept bits/elem", "ms (median ± IQR)", "GB/s", "% copy",
               "target", "PyTorch op", "PyTorch ms", "PyTorch % copy", "speed vs PyTorch", "grad err"]
    align = ["l", "l", "l", "r", "r", "r", "r", "r", "l", "l", "r", "r", "r", "r"]
    lines.append(common.markdown_table(headers, table_rows, align))
    if errors:
        lines += ["", "**Errors:**", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except Exception:  # noqa: BLE001 - print loudly, exit non-zero
        traceback.print_exc()
        common.die("bench_activations crashed (traceback above)", code=1)
