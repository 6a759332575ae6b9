# Role: benchmark UnSwag's AdamW8bit (and its fp32-state twin) through
# torch.ops.unswag.* on a parameter set shaped like Llama-3.2-1B's (1.24e9
# parameters, tied embeddings), in bf16 and fp32, against
# torch.optim.AdamW(fused=True) and bitsandbytes.optim.AdamW8bit (when
# importable): median optimizer-step time (CUDA events, after warm-up),
# optimizer-state bytes measured with the caching allocator, effective
# bandwidth, and a first-step agreement check against torch.optim.AdamW. Writes
# JSON + markdown and the bench_optim section of docs/BENCHMARKS.md.
#
#   python3 bench/bench_optim.py --lib build-cuda/libunswag.so --out out/
#   python3 bench/bench_optim.py --device cpu --quick --lib build/libunswag.so
from __future__ import annotations

import argparse
import gc
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SECTION = "bench_optim"
LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.999), 1e-8, 0.01
MIN_8BIT_SIZE = 4096
# First step from zero state: every implementation computes
# p (1 - lr wd) - lr g / (|g| + eps) up to float rounding; we allow 1e-3 lr.
FIRST_STEP_TOLERANCE = 1e-3


def llama_shapes(quick: bool) -> list[tuple[str, tuple[int, ...]]]:
    """Llama-3.2-1B's trainable tensors: vocab 128256, hidden 2048, 16 layers,
    32 query / 8 KV heads of 64, MLP 8192, tied embeddings: 1,235,814,400."""
    vocab, hidden, layers, kv, inter = (4096, 256, 2, 64, 1024) if quick else (128256, 2048, 16, 512, 8192)
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        pre = f"model.layers.{i}."
        shapes += [(pre + "self_attn.q_proj.weight", (hidden, hidden)), (pre + "self_attn.k_proj.weight", (kv, hidden)),
                   (pre + "self_attn.v_proj.weight", (kv, hidden)), (pre + "self_attn.o_proj.weight", (hidden, hidden)),
                   (pre + "mlp.gate_proj.weight", (inter, hidden)), (pre + "mlp.up_proj.weight", (inter, hidden)),
                   (pre + "mlp.down_proj.weight", (hidden, inter)), (pre + "input_layernorm.weight", (hidden,)),
                   (pre + "post_attention_layernorm.weight", (hidden,))]
    shapes.append(("model.norm.weight", (hidden,)))
    return shapes


class UnswagAdamW:
    """AdamW through torch.ops.unswag: 8-bit block-wise state for tensors of at
    least min_8bit_size elements (eight_bit=True), fp32 state otherwise. The
    learning rate may be changed between steps (self.lr)."""

    def __init__(self, ops, params: list[torch.Tensor], eight_bit: bool, block_size: int = 256, *, lr: float = LR,
                 betas: tuple[float, float] = BETAS, eps: float = EPS, weight_decay: float = WEIGHT_DECAY,
                 min_8bit_size: int = MIN_8BIT_SIZE):
        self.ops, self.params, self.block_size, self.t = ops, list(params), block_size, 0
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        device = self.params[0].device
        self.map1 = ops.dynamic_map(True).to(device)
        self.map2 = ops.dynamic_map(False).to(device)
        self.state = []
        for p in self.params:
            n = p.numel()
            if eight_bit and n >= min_8bit_size:
                blocks = (n + block_size - 1) // block_size
                # Any code with absmax 0 dequantizes to 0: zero moments.
                self.state.append((torch.zeros(n, dtype=torch.uint8, device=device),
                                   torch.zeros(n, dtype=torch.uint8, device=device),
                                   torch.zeros(blocks, device=device), torch.zeros(blocks, device=device)))
            else:
                self.state.append((torch.zeros(n, device=device), torch.zeros(n, device=device)))

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        hyper = (self.lr, self.betas[0], self.betas[1], self.eps, self.weight_decay, self.t)
        for p, st in zip(self.params, self.state):
            if p.grad is None:
                continue
            if len(st) == 4:
                self.ops.adamw8bit_step_(p, p.grad, *st, self.map1, self.map2, *hyper, self.block_size)
            else:
                self.ops.adamw_step_(p, p.grad, *st, *hyper)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.state for t in st)


def contenders(ops, device: str, bnb) -> list[tuple[str, Callable[[list[torch.Tensor]], object]]]:
    out = [
        ("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS,
                                                           weight_decay=WEIGHT_DECAY, fused=True)),
        ("unswag AdamW8bit b256", lambda ps: UnswagAdamW(ops, ps, True, 256)),
        ("unswag AdamW8bit b2048", lambda ps: UnswagAdamW(ops, ps, True, 2048)),
        ("unswag AdamW fp32 state", lambda ps: UnswagAdamW(ops, ps, False)),
    ]
    if bnb is not None:
        out.append(("bitsandbytes AdamW8bit", lambda ps: bnb.optim.AdamW8bit(
            ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, min_8bit_size=MIN_8BIT_SIZE)))
    return out


def load_bitsandbytes(device: str):
    if device != "cuda":
        return None, "skipped: its 8-bit optimizers need CUDA"
    try:
        import bitsandbytes as bnb
        import bitsandbytes.optim  # noqa: F401
        return bnb, f"bitsandbytes {bnb.__version__}"
    except Exception as error:  # noqa: BLE001 - any import failure means "not available"
        return None, f"NOT AVAILABLE ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"


def first_step_check(make, device: str, dtype: torch.dtype) -> float:
    """Max |our first-step change - torch.optim.AdamW's| / lr on a 2048 x 1024 tensor."""
    g = torch.Generator(device="cpu").manual_seed(1)
    p0 = (torch.randn(2048, 1024, generator=g) * 0.02).to(device, dtype)
    grad = (torch.randn(2048, 1024, generator=g) * 1e-3).to(device, dtype)
    ours = p0.clone().requires_grad_(True)
    ref = p0.float().clone().requires_grad_(True)
    ours.grad, ref.grad = grad.clone(), grad.float()
    make([ours]).step()
    torch.optim.AdamW([ref], lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, foreach=False).step()
    # Compare the changes (bf16 parameters: their rounding, up to half an ulp, is allowed on top).
    change = ours.detach().float() - p0.float()
    ref_change = ref.detach() - p0.float()
    slack = ref.detach().abs() * (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -23)
    return float(((change - ref_change).abs() - slack).clamp_min(0).max() / LR)


def measure(name: str, make, shapes, dtype, device: str, warmup: int, repeats: int) -> dict:
    common.synchronize(device)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for _, shape in shapes:
        p = (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)
        p.grad = (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 1e-3).to(dtype)
        params.append(p.requires_grad_(True))
    n = sum(p.numel() for p in params)
    common.synchronize(device)
    before = torch.cuda.memory_allocated() if device == "cuda" else None
    optimizer = make(params)
    optimizer.step()  # state is allocated here (lazily by torch and bitsandbytes)
    common.synchronize(device)
    state_bytes = torch.cuda.memory_allocated() - before if device == "cuda" else None
    timing = common.time_function(optimizer.step, device, warmup=warmup, repeats=repeats)
    finite = all(bool(torch.isfinite(p).all()) for p in params[:3])
    del optimizer, params
    param_bytes = n * torch.finfo(dtype).bits // 8
    # Bytes a step moves at least: param read + write, grad read, state read + write.
    moved = 3 * param_bytes + (2 * state_bytes if state_bytes is not None else 0)
    return {"contender": name, "dtype": str(dtype).replace("torch.", ""), "params": n, "state_bytes": state_bytes,
            "state_bytes_per_param": state_bytes / n if state_bytes is not None else None,
            "time": timing, "gbs": common.bandwidth_gbs(moved, timing["median_ms"]) if state_bytes else None,
            "finite": finite}


def render_markdown(header: dict, rows: list[dict], notes: list[str]) -> str:
    lines = ["## AdamW8bit: optimizer step on Llama-3.2-1B-shaped parameters", "", common.header_markdown(header),
             f"- {rows[0]['params'] / 1e9:.3f}e9 parameters; lr {LR}, betas {BETAS}, eps {EPS}, "
             f"weight decay {WEIGHT_DECAY}; tensors under {MIN_8BIT_SIZE} elements keep fp32 state in the "
             "8-bit optimizers; state = allocator bytes after the first step minus before; GB/s counts param "
             "read+write, grad read, state read+write." if rows else "- no results", ""]
    lines += [f"- {note}" for note in notes] + [""]
    headers = ["params", "optimizer", "state", "bytes/param", "step ms (median)", "IQR ms", "GB/s", "vs torch fused",
               "first step err / lr"]
    table = []
    for r in rows:
        base = next((b for b in rows if b["dtype"] == r["dtype"] and b["contender"] == "torch AdamW fused"), None)
        ratio = r["time"]["median_ms"] / base["time"]["median_ms"] if base else None
        table.append([r["dtype"], r["contender"], common.format_bytes(r["state_bytes"]),
                      common.format_float(r["state_bytes_per_param"], 3), common.format_float(r["time"]["median_ms"], 2),
                      common.format_float(r["time"]["iqr_ms"], 2), common.format_float(r["gbs"], 0),
                      common.format_ratio(ratio), f"{r['first_step_error']:.1e}" if r.get("first_step_error") is not None
                      else "n/a"])
    lines.append(common.markdown_table(headers, table, ["l", "l"] + ["r"] * 7))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    common.add_common_arguments(parser)
    parser.add_argument("--dtypes", default="bf16,fp32")
    args = parser.parse_args()
    device = common.resolve_device(args.device)
    ops = common.load_unswag(args.lib, device)
    for name in ("adamw8bit_step_", "adamw_step_", "dynamic_map"):
        try:
            getattr(ops, name)
        except (AttributeError, RuntimeError) as error:
            common.die(f"the library does not register torch.ops.unswag.{name}: {error}")
    header = common.environment_header(device, common.command_line())
    common.warm_up_device(device)
    quick = args.quick or device != "cuda"
    shapes = llama_shapes(quick)
    warmup = args.warmup or (2 if quick else 3)
    repeats = args.repeats or (5 if quick else 15)
    bnb, bnb_note = load_bitsandbytes(device)
    print(f"# bench_optim on {header['device_name']} | {sum(torch.Size(s).numel() for _, s in shapes):,} params | "
          f"warmup {warmup}, repeats {repeats} | bitsandbytes: {bnb_note}", flush=True)

    rows, errors = [], []
    for dtype_name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        dtype = common.DTYPES[dtype_name]
        for name, make in contenders(ops, device, bnb):
            try:
                row = measure(name, make, shapes, dtype, device, warmup, repeats)
                row["first_step_error"] = first_step_check(make, device, dtype)
            except Exception as error:  # noqa: BLE001 - record and continue with the others
                traceback.print_exc()
                errors.append(f"{name} [{dtype_name}]: {type(error).__name__}: {error}".splitlines()[0])
                continue
            rows.append(row)
            print(f"{dtype_name:5} {name:26} state {common.format_bytes(row['state_bytes']):>10} "
                  f"({common.format_float(row['state_bytes_per_param'], 3)} B/param) "
                  f"step {row['time']['median_ms']:8.2f} ms  GB/s {common.format_float(row['gbs'], 0):>6}  "
                  f"first-step err/lr {row['first_step_error']:.1e}", flush=True)
            common.write_json(Path(args.out) / "bench_optim.json",
                              {"header": header, "rows": rows, "errors": errors, "bitsandbytes": bnb_note})
    notes = [f"bitsandbytes: {bnb_note}",
             "torch AdamW keeps its state in the parameter dtype (bf16 state for bf16 parameters); UnSwag's fp32 "
             "twin keeps fp32 state whatever the parameter dtype."]
    markdown = render_markdown(header, rows, notes + [f"ERROR {e}" for e in errors])
    common.write_text(Path(args.out) / "bench_optim.md", markdown + "\n")
    if common.should_update_doc(args.update_doc, device):
        common.update_benchmarks_doc(Path(args.doc), SECTION + args.section_suffix, markdown)
        print(f"updated {args.doc} section {SECTION + args.section_suffix}")
    print()
    print(markdown)
    bad = [r for r in rows if r["first_step_error"] > FIRST_STEP_TOLERANCE or not r["finite"]]
    if bad:
        print(f"\nCORRECTNESS: {[r['contender'] + ' ' + r['dtype'] for r in bad]} disagree with torch.optim.AdamW "
              f"on the first step by more than {FIRST_STEP_TOLERANCE} lr, or made non-finite parameters",
              file=sys.stderr)
        return 3
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
