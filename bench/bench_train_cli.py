# Role: the GPU figure of the trainer issue: `unswag train` on the
# Llama-3.2-1B-shaped config (bench/configs/llama-3.2-1b) from scratch on real
# token shards, at 16k and at a long context, with AdamW8bit against the same
# run with fp32-state AdamW: tokens/s and peak GPU memory from the trainer's own
# metrics.jsonl; then transformers loads the saved final/ checkpoint and its
# loss on the held-out window the trainer evaluated must equal the trainer's
# logged eval_loss (the logits agree). Writes JSON + markdown and the
# train-cli section of docs/BENCHMARKS.md.
#
#   python3 bench/bench_train_cli.py --exe build-cuda/unswag --out out/ [--contexts 16384,131072]
from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SECTION = "train-cli"
# transformers (bf16, SDPA) against UnSwag's trainer (bf16, its own kernels) on the same
# weights and window: both round to bf16 at every layer, so the losses agree to bf16's
# accumulated rounding, not to fp32's. Stated bound on |loss_hf - loss_unswag| / loss_hf
# (measured on an H200 at 16k: 3e-5):
LOSS_TOLERANCE = 1e-3


def read_shard(path: Path) -> np.ndarray:
    """Tokens of an UnSwag shard (docs/data.md: "UNSWAGTK", version, header bytes, token bytes, ...)."""
    data = path.read_bytes()
    if data[:8] != b"UNSWAGTK":
        common.die(f"{path}: not an UnSwag token shard", 2)
    _, header, token_bytes, _ = struct.unpack_from("<IIII", data, 8)
    return np.frombuffer(data, dtype=np.uint16 if token_bytes == 2 else np.uint32, offset=header)


def run_train(args, context: int, optimizer: str, out_dir: Path) -> dict:
    cmd = [args.exe, "train", "--from-config", args.config, "--data", args.data, "--eval-data", args.eval_data,
           "--eval-batches", "1", "--context", str(context), "--steps", str(args.steps), "--warmup", "1",
           "--optimizer", optimizer, "--dtype", args.dtype, "--device", args.device, "--recompute", args.recompute,
           "--out", str(out_dir), "--save-every", "0", "--eval-every", "0", "--log-every", "1", "--quiet"]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    row = {"context": context, "optimizer": optimizer, "recompute": args.recompute, "wall_s": time.time() - t0,
           "command": " ".join(cmd)}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        row["error"] = "out of memory" if "out of memory" in (proc.stderr or "").lower() else " | ".join(tail)
        print(f"  failed (rc {proc.returncode}): {row['error']}", flush=True)
        return row
    lines = [json.loads(s) for s in (out_dir / "metrics.jsonl").read_text().splitlines() if s.strip()]
    steps = [r for r in lines if "tokens_per_s" in r]
    last = steps[-1]
    row.update(tokens_per_s=last["tokens_per_s"], peak_memory_gib=max(r["peak_memory_gib"] for r in steps),
               loss_first=steps[0]["loss"], loss_last=last["loss"],
               eval_loss=next((r["eval_loss"] for r in reversed(lines) if "eval_loss" in r), None))
    print(f"  {row['tokens_per_s'] / 1e3:.1f}k tok/s, peak {row['peak_memory_gib']:.2f} GiB, loss "
          f"{row['loss_first']:.3f} -> {row['loss_last']:.3f}, eval {row['eval_loss']}", flush=True)
    return row


def transformers_check(final: Path, eval_data: Path, context: int, eval_loss: float, device: str) -> dict:
    """transformers' loss (bf16 weights as saved, SDPA) on the trainer's eval window: the first
    context + 1 tokens of the eval shard (the loader's first window, in order)."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(final), dtype="auto").to(device).eval()
    stream = torch.from_numpy(read_shard(eval_data)[:context + 1].astype(np.int64)).to(device)
    with torch.no_grad():
        logits = model(stream[None, :context]).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0], stream[1:]).item()
    rel = abs(loss - eval_loss) / abs(loss)
    del model, logits
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"checkpoint": str(final), "transformers_loss": loss, "unswag_eval_loss": eval_loss, "relative_difference": rel,
            "tolerance": LOSS_TOLERANCE, "ok": rel <= LOSS_TOLERANCE,
            "safetensors_files": len(list(final.glob("*.safetensors")))}


def markdown(header: dict, args, rows: list[dict], check: dict | None) -> str:
    by = {(r["context"], r["optimizer"]): r for r in rows}
    contexts = sorted({r["context"] for r in rows})
    table = []
    for c in contexts:
        cells = [f"{c:,}"]
        for opt in ("adamw8bit", "adamw"):
            r = by.get((c, opt))
            if r is None:
                cells += ["-", "-"]
            elif "error" in r:
                cells += [r["error"], "-"]
            else:
                cells += [f"{r['tokens_per_s'] / 1e3:.1f}k", f"{r['peak_memory_gib']:.2f} GiB"]
        a, b = by.get((c, "adamw8bit")), by.get((c, "adamw"))
        if a and b and "error" not in a and "error" not in b:
            cells += [f"{a['tokens_per_s'] / b['tokens_per_s']:.3f}x", f"{a['peak_memory_gib'] - b['peak_memory_gib']:+.2f} GiB"]
        else:
            cells += ["-", "-"]
        table.append(cells)
    lines = [f"### `unswag train`: the 1B-shaped config, AdamW8bit vs fp32-state AdamW", "",
             common.header_markdown(header), "",
             f"`unswag train --from-config {args.config}` from scratch on the GCIDE token shards "
             f"(scripts/make-psa-corpus.sh), batch 1, {args.dtype} weights, `--recompute {args.recompute}`, {args.steps} updates "
             "(1 warmup); tokens/s of the last update and the peak of the CUDA allocator over the run, both from the "
             "trainer's metrics.jsonl. One command per cell (the `command` field of the JSON).", "",
             common.markdown_table(["context", "AdamW8bit tok/s", "AdamW8bit peak", "AdamW tok/s", "AdamW peak",
                                    "speed 8bit / fp32", "memory 8bit - fp32"], table), ""]
    if check:
        verdict = "equal within" if check["ok"] else "NOT equal within"
        lines.append(f"transformers loaded `{Path(check['checkpoint']).parent.name}/final` "
                     f"({check['safetensors_files']} safetensors file(s)) and its loss on the trainer's held-out window, "
                     f"{check['transformers_loss']:.5f}, and the trainer's eval_loss, {check['unswag_eval_loss']:.5f}, "
                     f"are {verdict} {check['tolerance']:g} relative (difference {check['relative_difference']:.1e}; "
                     f"both {args.dtype}).")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exe", default=str(common.REPO_ROOT / "build-cuda" / "unswag"))
    p.add_argument("--config", default="bench/configs/llama-3.2-1b/config.json")
    p.add_argument("--data", default=".gpu-data/gcide/train_000000.bin")
    p.add_argument("--eval-data", default=".gpu-data/gcide/val_000000.bin")
    p.add_argument("--contexts", default="16384,131072")
    p.add_argument("--optimizers", default="adamw8bit,adamw")
    p.add_argument("--recompute", default="selective")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--transformers-check", action=argparse.BooleanOptionalAction, default=True,
                   help="load the first finished run's final/ in transformers (its logits at a long context "
                        "take context x vocab x 4 bytes: off for 256k)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke test of this script")
    p.add_argument("--budget-s", type=float, default=400, help="start no new run after this many seconds")
    p.add_argument("--out", default=str(common.REPO_ROOT / "out"))
    p.add_argument("--work", default="/tmp/unswag-train-cli", help="run directories (checkpoints: GBs)")
    p.add_argument("--doc", default=str(common.DEFAULT_DOC))
    p.add_argument("--update-doc", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--section", default=SECTION,
                   help=f"docs/BENCHMARKS.md section to write (default {SECTION}; e.g. train-cli-longest)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        common.die("bench_train_cli needs a CUDA device", 2)
    args.dtype = "bf16" if args.device == "cuda" else "fp32"
    for what in (args.exe, args.config, args.data, args.eval_data):
        if not Path(what).exists():
            common.die(f"bench_train_cli: {what} does not exist", 2)
    header = common.environment_header(args.device, common.command_line())
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    t_start = time.time()
    rows, check = [], None
    for context in [int(c) for c in args.contexts.split(",")]:
        for optimizer in args.optimizers.split(","):
            if time.time() - t_start > args.budget_s:
                print(f"budget spent: {context} {optimizer} not run", flush=True)
                continue
            run_dir = work / f"{optimizer}_{context}"
            row = run_train(args, context, optimizer, run_dir)
            rows.append(row)
            if args.transformers_check and check is None and "error" not in row and row.get("eval_loss") is not None:
                check = transformers_check(run_dir / "final", Path(args.eval_data), context, row["eval_loss"], args.device)
                print(f"  transformers check: {check}", flush=True)
            shutil.rmtree(run_dir / "final", ignore_errors=True)  # 2.5 GB each
    out = Path(args.out)
    md = markdown(header, args, rows, check)
    common.write_json(out / "bench_train_cli.json", {"header": header, "rows": rows, "transformers_check": check})
    common.write_text(out / "bench_train_cli.md", md)
    print(md)
    if common.should_update_doc(args.update_doc, args.device):
        common.update_benchmarks_doc(Path(args.doc), args.section, md)
    if check is not None and not check["ok"]:
        return 3
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
