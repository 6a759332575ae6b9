#!/usr/bin/env python3
# Role: the whole-model training benchmark of the models issue: one training
# step (forward, backward, optimizer) of a Llama-3.2-1B-shaped model (random
# weights, bf16, batch 1) at growing context lengths, UnSwag (bench_train_step,
# C++) side by side with Hugging Face transformers (SDPA attention, fused
# torch AdamW) without and with gradient checkpointing, each context in a
# fresh process, each series stopped at its first out-of-memory. Reports the
# median step time (CUDA events), tokens/s and the allocator's peak memory.
#
#   python3 bench/bench_model.py [--contexts 4096,16384,...] [--unswag-configs ...] [--budget-s 420]
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import common

SECTION = "model-training-step"

# name -> (kind, arguments)
SERIES = {
    "transformers": ("hf", ["--ckpt", "0"]),
    "transformers + checkpointing": ("hf", ["--ckpt", "1"]),
    "UnSwag lean (selective)": ("unswag", ["--recompute", "selective"]),
    "UnSwag lean (no recompute)": ("unswag", ["--recompute", "none"]),
    "UnSwag lean (full recompute)": ("unswag", ["--recompute", "full"]),
}


def hf_worker(context: int, ckpt: bool, warmup: int, steps: int) -> dict:
    """One transformers training step series at one context (run in a child process)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    try:
        cfg._attn_implementation = "sdpa"
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
        model = model.to(torch.bfloat16)
        model.config.use_cache = False
        if ckpt:
            model.gradient_checkpointing_enable()
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
        ids = torch.randint(0, cfg.vocab_size, (1, context), device="cuda")
        times = []
        loss = None
        for i in range(warmup + steps):
            if i == warmup:
                torch.cuda.reset_peak_memory_stats()
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            ev[0].record()
            loss = model(input_ids=ids, labels=ids).loss
            ev[1].record()
            loss.backward()
            ev[2].record()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ev[3].record()
            ev[3].synchronize()
            if i >= warmup:
                times.append([ev[0].elapsed_time(ev[3])] + [ev[k].elapsed_time(ev[k + 1]) for k in range(3)])
        med = [sorted(t[k] for t in times)[len(times) // 2] for k in range(4)]
        median = med[0]
        return {"oom": False, "context": context, "step_ms": median, "tokens_per_s": context / (median / 1000),
                "forward_ms": med[1], "backward_ms": med[2], "optimizer_ms": med[3],
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "loss": loss.item(),
                "params": sum(p.numel() for p in model.parameters())}
    except torch.OutOfMemoryError:
        return {"oom": True, "context": context}


def run_child(kind: str, extra: list[str], context: int, args, timeout: float) -> dict:
    if kind == "hf":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--context", str(context),
               "--warmup", str(args.warmup), "--steps", str(args.steps)] + extra
    else:
        cmd = [str(args.bench_exe), "--context", str(context), "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--optimizer", args.optimizer] + extra
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"oom": None, "context": context, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(out.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
    return {"oom": None, "context": context, "error": " | ".join(tail) or f"exit {out.returncode}"}


def render(header: dict, rows: list[dict], contexts: list[int], args) -> str:
    lines = [f"### Training step, Llama-3.2-1B shape (bf16, batch 1): UnSwag vs transformers", "",
             common.header_markdown(header), "",
             "One step = forward + backward + optimizer. transformers: `LlamaForCausalLM`, SDPA attention, "
             "`torch.optim.AdamW(fused=True)`. UnSwag: `Model::for_training` (compressed SwiGLU MLP, flash SDPA, "
             f"chunked linear+cross-entropy, lean RMSNorm), optimizer `{args.optimizer}`. Peak = "
             "`max_memory_allocated` (reserved in brackets). Median of "
             f"{args.steps} steps after {args.warmup} warm-up; each cell a fresh process.", ""]
    headers = ["context"] + [name for name in SERIES if any(r["series"] == name for r in rows)]
    table = []
    for ctx in contexts:
        row = [f"{ctx // 1024}k"]
        for name in headers[1:]:
            r = next((r for r in rows if r["series"] == name and r["context"] == ctx), None)
            if r is None:
                row.append("-")
            elif r.get("oom"):
                row.append("OOM")
            elif r.get("error"):
                row.append("error")
            else:
                row.append(f"{r['tokens_per_s'] / 1000:.1f}k tok/s, {r['peak_allocated_gib']:.1f} GiB "
                           f"({r['peak_reserved_gib']:.1f})")
        table.append(row)
    lines.append(common.markdown_table(headers, table))
    parts = [r for r in rows if r.get("oom") is False and "forward_ms" in r and r["context"] == 16384]
    if parts:
        lines += ["", "Where the time goes at 16k (ms, median step):", "",
                  common.markdown_table(["series", "forward", "backward", "optimizer", "step"],
                                        [[r["series"], f"{r['forward_ms']:.1f}", f"{r['backward_ms']:.1f}",
                                          f"{r['optimizer_ms']:.1f}", f"{r['step_ms']:.1f}"] for r in parts])]
    errors = [f"{r['series']} @ {r['context']}: {r['error']}" for r in rows if r.get("error")]
    if errors:
        lines += ["", "Errors: " + "; ".join(errors)]
    # The targets, checked on what was measured.
    lines += ["", "Targets (models issue): " + ", ".join(targets(rows))]
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The models issue's targets, judged only on what this run measured."""
    def get(series, ctx):
        return next((r for r in rows if r["series"] == series and r["context"] == ctx and r.get("oom") is False), None)
    out = []
    lean = [r for r in rows if r["series"].startswith("UnSwag")]
    tried_128k = any(r["context"] >= 131072 for r in lean)
    longest = max((r["context"] for r in lean if r.get("oom") is False), default=0)
    if tried_128k:
        out.append(f"train at 128k on one GPU: {'met' if longest >= 131072 else 'not met'} (longest {longest // 1024}k)")
    else:
        out.append(f"train at 128k: not measured in this run (longest tried {longest // 1024}k)")
    hf16 = get("transformers", 16384)
    candidates = []
    for name in SERIES:
        r = get(name, 16384)
        if name.startswith("UnSwag") and r and hf16:
            speed = hf16["step_ms"] / r["step_ms"]
            memory = r["peak_allocated_gib"] / hf16["peak_allocated_gib"]
            candidates.append((memory < 0.5, speed, name, memory))
    if candidates:
        half, speed, name, memory = max(candidates)  # under half the memory first, then the fastest
        met = half and speed >= 1.0
        out.append(f"16k at least as fast as transformers with under half its memory: {'met' if met else 'not met'} "
                   f"(best: {name}, {speed:.3f}x speed, {memory:.2f}x memory)")
    else:
        out.append("16k comparison: not measured")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", default="0", help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--contexts", default="4096,16384,32768,65536,131072")
    parser.add_argument("--series", default=",".join(SERIES), help="comma-separated names of SERIES to run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--optimizer", default="adamw8bit", choices=["adamw8bit", "adamw"])
    parser.add_argument("--bench-exe", default=str(common.REPO_ROOT / "build-cuda" / "bench_train_step"))
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting new cells after this")
    parser.add_argument("--out", default=str(common.REPO_ROOT / "out"))
    parser.add_argument("--doc", default=str(common.DEFAULT_DOC))
    parser.add_argument("--update-doc", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--section", default=SECTION,
                        help="the docs/BENCHMARKS.md section to replace (a partial run keeps the full table)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(hf_worker(args.context, args.ckpt == "1", args.warmup, args.steps)), flush=True)
        return 0

    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda":
        common.die("bench_model.py needs a CUDA GPU")
    header = common.environment_header(device, common.command_line())
    contexts = [int(c) for c in args.contexts.split(",")]
    chosen = [s.strip() for s in args.series.split(",") if s.strip()]
    start = time.time()
    rows = []
    for name in chosen:
        kind, extra = SERIES[name]
        for ctx in contexts:
            left = args.budget_s - (time.time() - start)
            if left < 20:
                rows.append({"series": name, "context": ctx, "oom": None, "error": "benchmark budget spent"})
                break
            r = run_child(kind, extra, ctx, args, timeout=left)
            r["series"] = name
            rows.append(r)
            state = "OOM" if r.get("oom") else r.get("error") or f"{r['tokens_per_s']:.0f} tok/s {r['peak_allocated_gib']:.1f} GiB"
            print(f"{name:32s} {ctx:7d}: {state}", flush=True)
            if r.get("oom") or r.get("error"):
                break
    out_dir = Path(args.out)
    common.write_json(out_dir / "bench_model.json", {"header": header, "rows": rows})
    markdown = render(header, rows, contexts, args)
    common.write_text(out_dir / "bench_model.md", markdown + "\n")
    if common.should_update_doc(args.update_doc, device):
        common.update_benchmarks_doc(Path(args.doc), args.section, markdown)
    print()
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
