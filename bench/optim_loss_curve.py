# Role: does 8-bit optimizer state change training? Trains a small byte-level
# transformer language model (plain PyTorch, CPU) on real English text (the
# licence texts in /usr/share/common-licenses, concatenated) with
# torch.optim.AdamW (fp32 state) and with UnSwag's AdamW8bit (through
# torch.ops.unswag), same initialisation, data order and learning-rate schedule,
# for two seeds each; plots the loss curves into docs/optim_loss_curve.png
# (matplotlib: `.venv/bin/pip install matplotlib`) and writes the table of
# final losses into the optim_loss_curve section of docs/optim.md.
#
#   .venv/bin/python bench/optim_loss_curve.py --lib build/libunswag.so
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_optim import UnswagAdamW  # noqa: E402

TEXT_DIR = Path("/usr/share/common-licenses")


def load_text() -> torch.Tensor:
    """The licence files in name order (symlinked duplicates skipped), as bytes."""
    files = sorted(p for p in TEXT_DIR.iterdir() if p.is_file() and not p.is_symlink())
    if not files:
        common.die(f"no text found in {TEXT_DIR}")
    data = b"\n\n".join(p.read_bytes() for p in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.fc1 = nn.Linear(d, 4 * d, bias=False)
        self.fc2 = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, heads, t, d / heads]
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ByteLM(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, context: int):
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [b, t] -> logits [b, t, 256]
        x = self.embed(tokens) + self.pos.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T  # tied output layer


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(kind: str, seed: int, ops, data: torch.Tensor, args) -> dict:
    split = int(len(data) * 0.9)
    train_data, val_data = data[:split], data[split:]
    torch.manual_seed(seed)
    model = ByteLM(args.d_model, args.layers, args.heads, args.context)
    params = list(model.parameters())
    if kind == "torch":
        opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    else:
        opt = UnswagAdamW(ops, params, True, 256, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    batches = torch.Generator().manual_seed(1000 + seed)  # the same data order for both optimizers
    val_gen = torch.Generator().manual_seed(7)
    val_starts = torch.randint(0, len(val_data) - args.context - 1, (args.val_batches * args.batch,), generator=val_gen)

    def batch_at(source: torch.Tensor, starts: torch.Tensor):
        idx = starts[:, None] + torch.arange(args.context + 1)
        chunk = source[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                      for x, y in (batch_at(val_data, s) for s in val_starts.split(args.batch))]
        model.train()
        return sum(losses) / len(losses)

    train_losses, val_points = [], []
    t0 = time.perf_counter()
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        if kind == "torch":
            for group in opt.param_groups:
                group["lr"] = lr
        else:
            opt.lr = lr
        starts = torch.randint(0, len(train_data) - args.context - 1, (args.batch,), generator=batches)
        x, y = batch_at(train_data, starts)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        train_losses.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val_points.append((step + 1, val_loss()))
            print(f"  {kind:5} seed {seed} step {step + 1:4d} train {loss.item():.4f} val {val_points[-1][1]:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    state_bytes = (opt.state_bytes() if kind != "torch" else
                   sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                       if torch.is_tensor(t) and t.dim() > 0))
    return {"kind": kind, "seed": seed, "train": train_losses, "val": val_points, "state_bytes": state_bytes,
            "params": sum(p.numel() for p in params), "seconds": time.perf_counter() - t0}


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values: list[float], window: int = 20) -> list[float]:
        out, acc = [], 0.0
        for i, v in enumerate(values):
            acc += v - (values[i - window] if i >= window else 0.0)
            out.append(acc / min(i + 1, window))
        return out

    fig, (ax_loss, ax_diff) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"torch": ["tab:blue", "tab:cyan"], "unswag": ["tab:red", "tab:orange"]}
    labels = {"torch": "torch.optim.AdamW (fp32 state)", "unswag": "UnSwag AdamW8bit (8-bit state)"}
    seeds = sorted({r["seed"] for r in runs})
    for r in runs:
        color = colors[r["kind"]][seeds.index(r["seed"]) % 2]
        ax_loss.plot(smooth(r["train"]), color=color, lw=1.2, label=f"{labels[r['kind']]}, seed {r['seed']}")
        steps, vals = zip(*r["val"])
        ax_loss.plot(steps, vals, "o", color=color, ms=4)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats/byte)")
    ax_loss.text(0.02, 0.02, "lines: train, 20-step mean; dots: held-out", transform=ax_loss.transAxes, fontsize=8)
    ax_loss.set_title(title, fontsize=10)
    ax_loss.legend(fontsize=8)
    for seed in seeds:
        by_kind = {r["kind"]: r for r in runs if r["seed"] == seed}
        if len(by_kind) == 2:
            diff = [a - b for a, b in zip(smooth(by_kind["unswag"]["train"]), smooth(by_kind["torch"]["train"]))]
            ax_diff.plot(diff, lw=1.2, label=f"seed {seed}")
    if len(seeds) == 2:  # the run-to-run noise of the same optimizer, for scale
        torch_runs = [r for r in runs if r["kind"] == "torch"]
        noise = [a - b for a, b in zip(smooth(torch_runs[1]["train"]), smooth(torch_runs[0]["train"]))]
        ax_diff.plot(noise, lw=1, color="gray", ls="--", label="torch seed 1 - torch seed 0 (noise)")
    ax_diff.axhline(0, color="black", lw=0.5)
    ax_diff.set_xlabel("step")
    ax_diff.set_ylabel("train loss difference (20-step mean)")
    ax_diff.set_title("AdamW8bit - torch.optim.AdamW, same seed", fontsize=10)
    ax_diff.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lib", default=str(common.REPO_ROOT / "build" / "libunswag.so"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--png", default=str(common.REPO_ROOT / "docs" / "optim_loss_curve.png"))
    parser.add_argument("--doc", default=str(common.REPO_ROOT / "docs" / "optim.md"))
    parser.add_argument("--out", default=str(common.REPO_ROOT / "out"))
    args = parser.parse_args()
    ops = common.load_unswag(args.lib, "cpu")
    data = load_text()
    header = common.environment_header("cpu", common.command_line())
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    print(f"# {len(data):,} bytes of text; model d {args.d_model}, {args.layers} layers, context {args.context}, "
          f"batch {args.batch}, {args.steps} steps, seeds {seeds}", flush=True)
    runs = [train(kind, seed, ops, data, args) for seed in seeds for kind in ("torch", "unswag")]
    title = (f"byte-level LM, {runs[0]['params']:,} params, {args.layers} layers, d {args.d_model}; "
             f"{len(data) // 1000} kB of licence texts")
    plot(runs, Path(args.png), title)
    common.write_json(Path(args.out) / "optim_loss_curve.json", {"header": header, "args": vars(args), "runs": runs})

    rows = []
    for r in runs:
        last = r["train"][-20:]
        rows.append([{"torch": "torch.optim.AdamW", "unswag": "UnSwag AdamW8bit"}[r["kind"]], r["seed"],
                     f"{r['train'][0]:.3f}", f"{sum(last) / len(last):.4f}", f"{r['val'][-1][1]:.4f}",
                     common.format_bytes(r["state_bytes"]), f"{r['seconds']:.0f}"])
    body = "\n".join([
        f"Byte-level transformer LM ({runs[0]['params']:,} parameters: {args.layers} layers, d_model {args.d_model}, "
        f"{args.heads} heads, context {args.context}, tied embeddings) on {len(data):,} bytes of English licence texts "
        f"(90% train / 10% held out), batch {args.batch}, {args.steps} steps, AdamW lr {args.lr} (warm-up "
        f"{args.warmup}, cosine to 10%), betas (0.9, 0.95), weight decay 0.1, on CPU. The two optimizers of a seed "
        "start from the same weights and see the same batches.", "",
        common.header_markdown(header), "",
        common.markdown_table(["optimizer", "seed", "first loss", "final train loss (last 20 steps)",
                               "final held-out loss", "optimizer state", "seconds"], rows,
                              ["l", "r", "r", "r", "r", "r", "r"]),
        "", f"![loss curves]({Path(args.png).name})"])
    common.update_benchmarks_doc(Path(args.doc), "optim_loss_curve", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
