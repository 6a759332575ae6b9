# Role: benchmark a transformer MLP block (Llama-3.2-1B sizes) under UnSwag's
# fused_mlp policies against plain PyTorch, torch.utils.checkpoint and
# Liger-Kernel (if importable), all in one run: bytes kept for backward, peak
# memory, forward+backward time and gradient agreement; writes JSON + markdown
# and the bench_mlp section of docs/BENCHMARKS.md.
#
#   python3 bench/bench_mlp.py --lib build-cuda/libunswag.so --out out/
#   python3 bench/bench_mlp.py --device cpu --quick --lib build/libunswag.so
from __future__ import annotations

import argparse
import math
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SECTION = "bench_mlp"
MAIN_ACTIVATION = "swiglu"


def _relu2(z: torch.Tensor) -> torch.Tensor:
    return torch.relu(z).square()


def _gelu_tanh(z: torch.Tensor) -> torch.Tensor:
    return F.gelu(z, approximate="tanh")


# activation name -> (elementwise function of the plain block, gated?)
ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], bool]] = {
    "swiglu": (F.silu, True),
    "geglu": (F.gelu, True),
    "geglu_tanh": (_gelu_tanh, True),
    "relu": (torch.relu, False),
    "relu2": (_relu2, False),
    "gelu": (F.gelu, False),
    "gelu_tanh": (_gelu_tanh, False),
    "silu": (F.silu, False),
}
# Non-gated activations whose compressed policy keeps a few-bit derivative code.
FEWBIT_DERIVATIVE = {"gelu", "gelu_tanh", "silu"}

# Targets for the main activation (SwiGLU): contender -> (min x fewer kept bytes
# than plain, time limit as (reference contender, max ratio)).
TARGETS = {
    "unswag recompute": (10.0, ("checkpoint", 1.0)),
    "unswag compressed16": (1.8, ("pytorch", 1.05)),
    "unswag compressed8": (3.0, ("pytorch", 1.05)),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    common.add_common_arguments(parser)
    parser.add_argument("--hidden", type=int, default=None, help="default 2048 (cuda), 64 (cpu)")
    parser.add_argument("--intermediate", type=int, default=None, help="default 8192 (cuda), 256 (cpu)")
    parser.add_argument("--tokens", default=None,
                        help="comma-separated token counts (batch 1); default 8192,32768 "
                             "(--quick 2048,8192; cpu 64,128)")
    parser.add_argument("--activations", default="swiglu,geglu,geglu_tanh,gelu,relu,relu2,silu",
                        help=f"comma-separated, from {','.join(ACTIVATIONS)}")
    parser.add_argument("--others-at-all-tokens", action="store_true",
                        help="measure the non-main activations at every token count, not only the smallest")
    parser.add_argument("--dtype", choices=list(common.DTYPES), default="bf16")
    parser.add_argument("--no-liger", action="store_true", help="skip the Liger-Kernel contender")
    return parser.parse_args()


@dataclass
class Contender:
    name: str
    run: Callable[[torch.Tensor], torch.Tensor]
    note: str = ""


@dataclass
class Problem:
    activation: str
    tokens: int
    x: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    w_gate: torch.Tensor | None
    grad_out: torch.Tensor
    leaves: list[torch.Tensor] = field(default_factory=list)

    def reset_grads(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None


def make_problem(activation: str, tokens: int, hidden: int, intermediate: int,
                 dtype: torch.dtype, device: str) -> Problem:
    gated = ACTIVATIONS[activation][1]

    def weight(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, device=device, dtype=torch.float32) / math.sqrt(cols)) \
            .to(dtype).requires_grad_()

    x = torch.randn(tokens, hidden, device=device, dtype=dtype).requires_grad_()
    w_up = weight(intermediate, hidden)
    w_down = weight(hidden, intermediate)
    w_gate = weight(intermediate, hidden) if gated else None
    grad_out = torch.randn(tokens, hidden, device=device, dtype=dtype)
    leaves = [x, w_up, w_down] + ([w_gate] if gated else [])
    return Problem(activation, tokens, x, w_up, w_down, w_gate, grad_out, leaves)


def plain_block(problem: Problem) -> Callable[[torch.Tensor], torch.Tensor]:
    act, gated = ACTIVATIONS[problem.activation]
    w_up, w_down, w_gate = problem.w_up, problem.w_down, problem.w_gate
    if gated:
        return lambda x: F.linear(act(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
    return lambda x: F.linear(act(F.linear(x, w_up)), w_down)


def load_liger():
    """The Liger-Kernel autograd functions, or (None, None, reason)."""
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception as error:  # noqa: BLE001 - any import failure means "not available"
        return None, None, f"{type(error).__name__}: {error}"
    try:
        from liger_kernel.ops.geglu import LigerGELUMulFunction
    except Exception:  # noqa: BLE001
        LigerGELUMulFunction = None
    return LigerSiLUMulFunction, LigerGELUMulFunction, ""


def contenders_for(problem: Problem, ops, liger) -> list[Contender]:
    activation = problem.activation
    plain = plain_block(problem)
    result = [
        Contender("pytorch", plain, "eager F.linear + activation"),
        Contender("checkpoint", lambda x: torch.utils.checkpoint.checkpoint(plain, x, use_reentrant=False),
                  "torch.utils.checkpoint, use_reentrant=False"),
    ]
    silu_mul, gelu_mul = liger
    w_up, w_down, w_gate = problem.w_up, problem.w_down, problem.w_gate
    if activation == "swiglu" and silu_mul is not None:
        result.append(Contender(
            "liger", lambda x: F.linear(silu_mul.apply(F.linear(x, w_gate), F.linear(x, w_up)), w_down),
            "LigerSiLUMulFunction + F.linear"))
    if activation in ("geglu", "geglu_tanh") and gelu_mul is not None:
        note = "LigerGELUMulFunction + F.linear" + (" (tanh-approximate GELU)" if activation == "geglu" else "")
        result.append(Contender(
            "liger", lambda x: F.linear(gelu_mul.apply(F.linear(x, w_gate), F.linear(x, w_up)), w_down), note))

    def fused(policy: str, storage_bits: int = 16, derivative_bits: int = 2):
        return lambda x: ops.fused_mlp(x, w_up, w_down, w_gate, activation, policy, storage_bits, derivative_bits)

    result += [
        Contender("unswag none", fused("none"), "fused_mlp policy=none"),
        Contender("unswag recompute", fused("recompute"), "fused_mlp policy=recompute"),
    ]
    if activation in FEWBIT_DERIVATIVE:
        result += [
            Contender("unswag compressed16 d2", fused("compressed", 16, 2),
                      "policy=compressed storage_bits=16 derivative_bits=2"),
            Contender("unswag compressed16 d4", fused("compressed", 16, 4),
                      "policy=compressed storage_bits=16 derivative_bits=4"),
            Contender("unswag compressed16 exact", fused("compressed", 16, 0),
                      "policy=compressed storage_bits=16 derivative_bits=0 (1 side bit, exact by inversion)"),
            Contender("unswag compressed8", fused("compressed", 8, 2),
                      "policy=compressed storage_bits=8 derivative_bits=2"),
        ]
    else:
        result += [
            Contender("unswag compressed16", fused("compressed", 16), "policy=compressed storage_bits=16"),
            Contender("unswag compressed8", fused("compressed", 8), "policy=compressed storage_bits=8"),
        ]
    return result


def measure(problem: Problem, contender: Contender, device: str, warmup: int, repeats: int) -> dict:
    """Timing (warm-up included), then one measured forward+backward for memory and grads."""
    x, grad_out = problem.x, problem.grad_out

    def step() -> None:
        contender.run(x).backward(grad_out)

    timing = common.time_function(step, device, warmup=warmup, repeats=repeats, setup=problem.reset_grads)
    problem.reset_grads()
    output: dict = {}

    def forward() -> torch.Tensor:
        y = contender.run(x)
        output["y"] = y.detach()
        return y

    memory = common.measure_memory(forward, lambda y: y.backward(grad_out), device)
    grads = [leaf.grad.detach().clone() if leaf.grad is not None else None for leaf in problem.leaves]
    problem.reset_grads()
    return {"time": timing, "memory": memory, "y": output["y"], "grads": grads}


def agreement(result: dict, reference: dict, names: list[str]) -> dict:
    errors = {"y": common.relative_l2_error(result["y"], reference["y"])}
    for name, grad, ref in zip(names, result["grads"], reference["grads"]):
        errors[name] = float("inf") if grad is None else common.relative_l2_error(grad, ref)
    return errors


def main() -> int:
    args = parse_args()
    device = common.resolve_device(args.device)
    ops = common.load_unswag(args.lib, device)
    torch.manual_seed(args.seed)
    header = common.environment_header(device, common.command_line())
    common.warm_up_device(device)
    out_dir = Path(args.out)
    dtype = common.DTYPES[args.dtype]

    if device == "cuda":
        hidden = args.hidden or 2048
        intermediate = args.intermediate or 8192
        default_tokens = "2048,8192" if args.quick else "8192,32768"
        warmup = args.warmup or (3 if args.quick else 5)
        repeats = args.repeats or (10 if args.quick else 30)
    else:
        hidden = args.hidden or 64
        intermediate = args.intermediate or 256
        default_tokens = "64,128"
        warmup = args.warmup or 1
        repeats = args.repeats or (3 if args.quick else 10)
    token_counts = [int(t) for t in (args.tokens or default_tokens).split(",") if t.strip()]
    activations = [a.strip() for a in args.activations.split(",") if a.strip()]
    unknown = [a for a in activations if a not in ACTIVATIONS]
    if unknown:
        common.die(f"unknown activation(s) {unknown}; choose from {list(ACTIVATIONS)}")

    liger_note = "disabled (--no-liger)"
    silu_mul = gelu_mul = None
    if args.no_liger:
        pass
    elif device != "cuda":
        liger_note = "skipped: Liger-Kernel's Triton kernels need CUDA"
    else:
        silu_mul, gelu_mul, reason = load_liger()
        if silu_mul is None:
            liger_note = f"NOT AVAILABLE ({reason})"
            print(f"WARNING: Liger-Kernel not importable: {reason}", flush=True)
        else:
            liger_note = f"liger-kernel {_version('liger-kernel')}"

    print(f"# bench_mlp on {header['device_name']} | torch {header['torch']} | hidden {hidden}, "
          f"intermediate {intermediate}, {args.dtype} | tokens {token_counts} | warmup {warmup}, "
          f"repeats {repeats} | Liger: {liger_note}", flush=True)

    rows: list[dict] = []
    errors: list[str] = []
    for tokens in token_counts:
        for activation in activations:
            if (activation != MAIN_ACTIVATION and tokens != min(token_counts)
                    and not args.others_at_all_tokens):
                continue
            problem = make_problem(activation, tokens, hidden, intermediate, dtype, device)
            grad_names = ["dx", "dW_up", "dW_down"] + (["dW_gate"] if problem.w_gate is not None else [])
            reference = None
            for contender in contenders_for(problem, ops, (silu_mul, gelu_mul)):
                try:
                    result = measure(problem, contender, device, warmup, repeats)
                except Exception as error:  # noqa: BLE001 - record and continue with the others
                    message = f"{contender.name} [{activation}, {tokens} tokens] raised: " \
                              f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                    print(f"ERROR: {message}", flush=True)
                    errors.append(message)
                    problem.reset_grads()
                    continue
                if contender.name == "pytorch":
                    reference = result
                if reference is None:
                    common.die("the plain PyTorch block failed; nothing to compare against")
                result["errors"] = agreement(result, reference, grad_names)
                rows.append(make_row(activation, tokens, contender, result, grad_names))
                print_progress(rows[-1])
            # A second timing of plain PyTorch, to show run-to-run spread.
            if reference is not None:
                again = common.time_function(lambda: plain_block(problem)(problem.x).backward(problem.grad_out),
                                             device, warmup=1, repeats=repeats, setup=problem.reset_grads)
                problem.reset_grads()
                for row in rows:
                    if row["activation"] == activation and row["tokens"] == tokens and row["contender"] == "pytorch":
                        row["time_again"] = again
            add_ratios_and_targets(rows, activation, tokens)
            problem = reference = result = None
            if device == "cuda":
                torch.cuda.empty_cache()
            payload = {"header": header,
                       "config": {"hidden": hidden, "intermediate": intermediate, "dtype": args.dtype,
                                  "tokens": token_counts, "activations": activations, "warmup": warmup,
                                  "repeats": repeats, "liger": liger_note},
                       "targets": {k: {"min_fewer_bytes": v[0], "time_vs": v[1][0], "max_time_ratio": v[1][1]}
                                   for k, v in TARGETS.items()},
                       "rows": rows, "errors": errors}
            common.write_json(out_dir / "bench_mlp.json", payload)

    markdown = render_markdown(header, rows, errors, hidden, intermediate, args.dtype, warmup, repeats,
                               liger_note, device)
    common.write_text(out_dir / "bench_mlp.md", markdown + "\n")
    if common.should_update_doc(args.update_doc, device):
        common.update_benchmarks_doc(Path(args.doc), SECTION + args.section_suffix, markdown)
        print(f"updated {args.doc} section {SECTION + args.section_suffix}")
    print()
    print(markdown)
    missed = [r for r in rows if r.get("target_met") is False]
    if errors:
        print(f"\n{len(errors)} contender(s) FAILED:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    if missed:
        print(f"\n{len(missed)} target(s) missed (see the table)", flush=True)
    return 0


def _version(distribution: str) -> str:
    try:
        from importlib.metadata import version
        return version(distribution)
    except Exception:  # noqa: BLE001
        return "?"


def make_row(activation: str, tokens: int, contender: Contender, result: dict, grad_names: list[str]) -> dict:
    errors = result["errors"]
    return {
        "activation": activation,
        "tokens": tokens,
        "contender": contender.name,
        "note": contender.note,
        "time": result["time"],
        "kept_bytes": result["memory"]["kept_bytes"],
        "peak_bytes": result["memory"]["peak_bytes"],
        "output_bytes": result["memory"]["output_bytes"],
        "rel_l2_error": errors,
        "max_grad_error": max(errors[name] for name in grad_names),
    }


def add_ratios_and_targets(rows: list[dict], activation: str, tokens: int) -> None:
    group = {r["contender"]: r for r in rows if r["activation"] == activation and r["tokens"] == tokens}
    plain = group.get("pytorch")
    if plain is None:
        return
    for row in group.values():
        row["time_vs_pytorch"] = row["time"]["median_ms"] / plain["time"]["median_ms"]
        row["fewer_bytes_than_pytorch"] = _ratio(plain["kept_bytes"], row["kept_bytes"])
        row["peak_vs_pytorch"] = _ratio(row["peak_bytes"], plain["peak_bytes"])
        if activation != MAIN_ACTIVATION or row["contender"] not in TARGETS:
            continue
        min_fewer, (time_reference, max_ratio) = TARGETS[row["contender"]]
        reference = group.get(time_reference)
        time_ok = reference is not None and row["time"]["median_ms"] <= max_ratio * reference["time"]["median_ms"]
        bytes_ok = row["fewer_bytes_than_pytorch"] is not None and row["fewer_bytes_than_pytorch"] >= min_fewer
        if row["kept_bytes"] is None:  # no allocator on CPU: the bytes half cannot be judged
            row["target_met"] = None
        else:
            row["target_met"] = bool(time_ok and bytes_ok)
        speed = "faster than checkpoint" if time_reference == "checkpoint" else \
            f"<= {(max_ratio - 1) * 100:.0f}% slower than plain"
        row["target"] = f">= {min_fewer:g}x fewer bytes, {speed}"


def _ratio(numerator, denominator):
    if numerator is None or denominator is None:
        return None
    if denominator <= 0:
        return float("inf") if numerator > 0 else None
    return numerator / denominator


def print_progress(row: dict) -> None:
    print(f"  {row['activation']:<10} {row['tokens']:>6} {row['contender']:<22} "
          f"{row['time']['median_ms']:8.3f} ms  kept {common.format_bytes(row['kept_bytes']):>10}  "
          f"peak {common.format_bytes(row['peak_bytes']):>10}  max grad err {row['max_grad_error']:.2e}",
          flush=True)


def render_markdown(header, rows, errors, hidden, intermediate, dtype_name, warmup, repeats,
                    liger_note, device) -> str:
    memory_note = "" if device == "cuda" else " (CPU run: no caching allocator, memory columns n/a)"
    lines = [
        "## MLP block: memory kept for backward, peak, time",
        "",
        common.header_markdown(header),
        f"- Block: hidden {hidden}, intermediate {intermediate}, {dtype_name}, batch 1, no bias; "
        f"x, weights require grad; median of {repeats} forward+backward timings after {warmup} "
        f"warm-ups, grads set to None between iterations. Liger-Kernel: {liger_note}.",
        "- kept: CUDA allocator bytes held between forward and backward, less the output "
        "(x and weights exist before, so they are not counted); peak: max allocated during "
        f"forward+backward above the start (includes the gradients){memory_note}.",
        "- err: relative L2 error against plain PyTorch of the output y and of the largest of "
        "dx, dW_up, dW_down, dW_gate. The plain row's `ms` shows a second timing in brackets.",
        f"- **Targets ({MAIN_ACTIVATION}):** recompute >= 10x fewer kept bytes than plain and faster "
        "than checkpoint; compressed16 >= 1.8x fewer bytes and <= 5% slower than plain; "
        "compressed8 >= 3x fewer bytes and <= 5% slower than plain.",
        "",
    ]
    table = []
    for row in rows:
        time_text = f"{row['time']['median_ms']:.3f} ± {row['time']['iqr_ms']:.3f}"
        if "time_again" in row:
            time_text += f" [{row['time_again']['median_ms']:.3f}]"
        target = row.get("target_met")
        target_text = "" if "target" not in row else ("met" if target else "MISSED" if target is False else "n/a")
        table.append([
            row["activation"], row["tokens"], row["contender"],
            common.format_bytes(row["kept_bytes"]), common.format_ratio(row.get("fewer_bytes_than_pytorch")),
            common.format_bytes(row["peak_bytes"]), common.format_ratio(row.get("peak_vs_pytorch")),
            time_text, common.format_ratio(row.get("time_vs_pytorch"), 3),
            f"{row['rel_l2_error']['y']:.1e}", f"{row['max_grad_error']:.1e}", target_text,
        ])
    headers = ["activation", "tokens", "contender", "kept", "fewer bytes", "peak", "peak vs plain",
               "fwd+bwd ms (median ± IQR)", "time vs plain", "y err", "max grad err", "target"]
    align = ["l", "r", "l", "r", "r", "r", "r", "r", "r", "r", "r", "l"]
    lines.append(common.markdown_table(headers, table, align))
    if errors:
        lines += ["", "**Errors:**", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        common.die("bench_mlp crashed (traceback above)", code=1)
