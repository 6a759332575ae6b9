# Role: shared helpers for UnSwag's benchmark scripts: loading libunswag.so,
# CUDA-event (or wall-clock on CPU) timing with median and IQR, allocator-based
# measurement of the bytes an op keeps for backward and of its peak memory, an
# environment header, markdown tables, JSON output, and updating the marked
# sections of docs/BENCHMARKS.md.
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DOC = REPO_ROOT / "docs" / "BENCHMARKS.md"

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------- #
# Library and device
# --------------------------------------------------------------------------- #
def default_library_path(device: str) -> Path:
    """build-cuda/libunswag.so for the GPU build, build/libunswag.so otherwise."""
    name = "build-cuda" if device == "cuda" else "build"
    return REPO_ROOT / name / "libunswag.so"


def load_unswag(lib_path: str | os.PathLike | None, device: str):
    """Loads libunswag.so and returns the torch.ops.unswag namespace."""
    path = Path(lib_path) if lib_path else default_library_path(device)
    if not path.exists():
        die(f"library not found: {path} (build it first, or pass --lib)")
    torch.ops.load_library(str(path))
    ops = torch.ops.unswag
    for name in ("relu_1bit_forward", "relu_1bit_backward", "fewbit_forward",
                 "fewbit_backward", "fused_mlp"):
        try:
            getattr(ops, name)
        except (AttributeError, RuntimeError) as error:
            die(f"{path} does not register torch.ops.unswag.{name}: {error}")
    return ops


def resolve_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        die("--device cuda asked for, but torch.cuda.is_available() is False")
    return requested


def die(message: str, code: int = 2) -> None:
    bar = "!" * 78
    print(f"\n{bar}\nFATAL: {message}\n{bar}", file=sys.stderr, flush=True)
    sys.exit(code)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def environment_header(device: str, command: str) -> dict[str, Any]:
    """What a result was measured on: device, date, software versions, command."""
    header: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device_type": device,
        "command": command,
        "git_commit": _git_commit(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        header.update({
            "device_name": props.name,
            "device_memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "cuda_runtime": torch.version.cuda,
        })
    else:
        header["device_name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"
    return header


def _git_commit() -> str:
    """HEAD of the checkout; on the GPU machine, whose copy of .git may be stale,
    the commit written to .source-commit before the call (scripts/gpu-check.sh)."""
    marker = REPO_ROOT / ".source-commit"
    if marker.exists() and marker.read_text().strip():
        return marker.read_text().strip()
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line() -> str:
    """The exact command that produced the results (relative to the repo root)."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO_ROOT)
    except ValueError:
        pass
    return " ".join(["python3", shlex.quote(str(script))] + [shlex.quote(a) for a in sys.argv[1:]])


# --------------------------------------------------------------------------- #
# Timing
# --------------------------------------------------------------------------- #
def warm_up_device(device: str, seconds: float = 1.0) -> None:
    """Keeps the GPU busy with matrix products for a while so that clocks have
    ramped up before the first measurement (the first contender is not penalised)."""
    if device != "cuda":
        return
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
    del a


def time_function(fn: Callable[[], Any], device: str, *, warmup: int, repeats: int,
                  setup: Callable[[], Any] | None = None) -> dict[str, float]:
    """Times fn() `repeats` times after `warmup` untimed calls.

    setup(), if given, runs before every call, outside the timed region (for
    example to reset gradients). On CUDA each call is timed with its own pair
    of CUDA events; on CPU with time.perf_counter. Returns milliseconds:
    median, q1, q3, iqr, min, and the repeat count.
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    synchronize(device)
    times_ms: list[float] = []
    if device == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            if setup is not None:
                setup()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times_ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(repeats):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            times_ms.append((time.perf_counter() - t0) * 1e3)
    return summarize_times(times_ms)


def summarize_times(times_ms: Sequence[float]) -> dict[str, float]:
    ordered = sorted(times_ms)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1, q3 = ordered[0], ordered[-1]
    return {
        "median_ms": statistics.median(ordered),
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "min_ms": ordered[0],
        "repeats": len(ordered),
    }


def bandwidth_gbs(n_bytes: int, time_ms: float) -> float:
    """Effective bandwidth in GB/s (1e9 bytes per second)."""
    return n_bytes / (time_ms * 1e-3) / 1e9 if time_ms > 0 else float("nan")


# --------------------------------------------------------------------------- #
# Memory
# --------------------------------------------------------------------------- #
def measure_memory(forward: Callable[[], torch.Tensor],
                   backward: Callable[[torch.Tensor], Any], device: str) -> dict[str, Any]:
    """Bytes kept for backward and peak memory of forward + backward.

    With the CUDA caching allocator:
      kept = allocated after forward - allocated before - bytes of the output
    (what autograd holds on to between forward and backward), and
      peak = max allocated during forward + backward - allocated before
    (this includes the gradients that backward creates). Everything the call
    needs (inputs, weights, the incoming gradient) must exist before forward()
    runs, and warm-up must have happened (cuBLAS workspaces are allocated
    through the caching allocator on first use). On CPU returns Nones.
    """
    if device != "cuda":
        y = forward()
        backward(y)
        return {"kept_bytes": None, "peak_bytes": None, "output_bytes": None}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y = forward()
    torch.cuda.synchronize()
    after_forward = torch.cuda.memory_allocated()
    output_bytes = y.untyped_storage().nbytes()
    kept = after_forward - before - output_bytes
    backward(y)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del y
    return {"kept_bytes": kept, "peak_bytes": peak, "output_bytes": output_bytes}


def relative_l2_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference||, computed in float32 (inf if NaN)."""
    value32 = value.detach().float()
    reference32 = reference.detach().float()
    denominator = torch.linalg.vector_norm(reference32).item()
    numerator = torch.linalg.vector_norm(value32 - reference32).item()
    if math.isnan(numerator):
        return float("inf")
    return numerator / denominator if denominator > 0 else numerator


# --------------------------------------------------------------------------- #
# Formatting and output
# --------------------------------------------------------------------------- #
def format_bytes(n_bytes: float | None) -> str:
    if n_bytes is None:
        return "n/a"
    if abs(n_bytes) >= 2**30:
        return f"{n_bytes / 2**30:.2f} GiB"
    if abs(n_bytes) >= 2**20:
        return f"{n_bytes / 2**20:.1f} MiB"
    if abs(n_bytes) >= 2**10:
        return f"{n_bytes / 2**10:.1f} KiB"
    return f"{int(n_bytes)} B"


def format_float(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def format_ratio(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value) or value > 1e4:
        return ">1e4x"
    return f"{value:.{digits}f}x"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                   align: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; align: 'l' or 'r' per column (default: l then r)."""
    rows = [[str(cell) for cell in row] for row in rows]
    if align is None:
        align = ["l"] + ["r"] * (len(headers) - 1)
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align)]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if a == "r" else "-" * w
                             for w, a in zip(widths, align)) + " |"
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


def header_markdown(header: dict[str, Any]) -> str:
    """The device/date/version lines that open each section."""
    device = header.get("device_name", "?")
    extra = ""
    if header.get("device_type") == "cuda":
        extra = f", {header.get('device_memory_gib')} GiB, CUDA {header.get('cuda_runtime')}"
    return "\n".join([
        f"- Device: {device}{extra}",
        f"- Date: {header.get('date_utc')}; torch {header.get('torch')}; "
        f"Python {header.get('python')}; commit {header.get('git_commit')}",
        f"- Command: `{header.get('command')}`",
    ])


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value)}")


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


DOC_INTRO = """# UnSwag benchmarks

Measured results, written by the scripts in `bench/` (do not edit the marked
sections by hand: each run of a script replaces its own section). Each section
names the device, date, torch version and the exact command that produced it.
`bash scripts/gpu-check.sh` on the GPU machine builds, tests and runs them all.
"""


def update_benchmarks_doc(doc_path: Path, section: str, body: str) -> None:
    """Replaces the text between <!-- BEGIN section --> and <!-- END section -->.

    Creates the file (with a short intro) if missing, and appends the section
    if its markers are not there yet.
    """
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = doc_path.read_text() if doc_path.exists() else DOC_INTRO
    start = text.find(begin)
    stop = text.find(end, start + len(begin)) if start >= 0 else -1
    if start >= 0 and stop >= 0:
        text = text[:start] + block + text[stop + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text(doc_path, text)


def should_update_doc(choice: str, device: str) -> bool:
    """--update-doc auto: only results measured on a GPU go into the docs."""
    return choice == "yes" or (choice == "auto" and device == "cuda")


def add_common_arguments(parser) -> None:
    parser.add_argument("--lib", default=None,
                        help="path to libunswag.so (default: build-cuda/ for cuda, build/ for cpu)")
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    parser.add_argument("--out", default=str(REPO_ROOT / "out"),
                        help="folder for the JSON and markdown results")
    parser.add_argument("--doc", default=str(DEFAULT_DOC), help="the markdown file of results")
    parser.add_argument("--update-doc", choices=["auto", "yes", "no"], default="auto",
                        help="replace this script's section of --doc (auto: on cuda only)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--section-suffix", default="",
                        help="append this to the --doc section's name (e.g. -h200: a second device's results "
                             "beside the first's instead of over them)")
