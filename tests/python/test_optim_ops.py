"""torch.ops.unswag's AdamW ops from Python (what bench/bench_optim.py drives):
the dynamic maps against the independent construction of
tests/optim/dynamic_map_reference.py, block-wise quantization picking the
nearest code, and the 8-bit and fp32-state steps against torch.optim.AdamW in
float64 from the same state."""
import importlib.util
import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
LIB = os.environ.get("UNSWAG_LIBRARY", str(ROOT / "build" / "libunswag.so"))
torch.ops.load_library(LIB)
ops = torch.ops.unswag

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_spec = importlib.util.spec_from_file_location("dynamic_map_reference", ROOT / "tests/optim/dynamic_map_reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)


def generator() -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_matches_bit_pattern_decoding(signed):
    ours = ops.dynamic_map(signed).double()
    theirs = torch.from_numpy(reference.dynamic_map(signed)).double()
    torch.testing.assert_close(ours, theirs, rtol=1.2e-7, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [256, 2048])
def test_quantize_picks_nearest_code(device, block_size):
    g = generator()
    x = (torch.randn(5003, generator=g) * 10 ** (-4 * torch.rand(5003, generator=g))).to(device)
    code = ops.dynamic_map(True).to(device)
    q, absmax = ops.quantize_blockwise(x, code, block_size)
    scale = absmax.double().repeat_interleave(block_size)[: x.numel()]
    normalized = x.double() / scale
    nearest = (normalized[:, None] - code.double()[None, :]).abs().min(1).values
    err = (ops.dequantize_blockwise(q, absmax, code, block_size).double() - x.double()).abs()
    assert bool((err <= scale * nearest + 1e-7 * (x.double().abs() + scale)).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_match_torch_adamw_float64(device, dtype):
    g = generator()
    n, block_size, lr, betas, eps, wd = 9000, 256, 1e-2, (0.9, 0.99), 1e-8, 0.1
    p = (torch.randn(n, generator=g) * 0.1).to(device, dtype)
    maps = ops.dynamic_map(True).to(device), ops.dynamic_map(False).to(device)
    s1, s2 = torch.zeros(n, dtype=torch.uint8, device=device), torch.zeros(n, dtype=torch.uint8, device=device)
    a1, a2 = torch.zeros(36, device=device), torch.zeros(36, device=device)
    m32, v32 = torch.zeros(n, device=device), torch.zeros(n, device=device)
    p32 = p.clone()
    for t in range(1, 4):
        grad = (torch.randn(n, generator=g) * 1e-2).to(device, dtype)
        ops.adamw8bit_step_(p, grad, s1, s2, a1, a2, *maps, lr, *betas, eps, wd, t, block_size)
        ops.adamw_step_(p32, grad, m32, v32, lr, *betas, eps, wd, t)
    grad = (torch.randn(n, generator=g) * 1e-2).to(device, dtype)
    for name, param, (m, v) in (("8-bit", p, (ops.dequantize_blockwise(s1, a1, maps[0], block_size),
                                              ops.dequantize_blockwise(s2, a2, maps[1], block_size))),
                                ("fp32 state", p32, (m32.clone(), v32.clone()))):
        ref = param.double().clone().requires_grad_(True)
        opt = torch.optim.AdamW([ref], lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
        opt.state[ref] = {"step": torch.tensor(3.0, dtype=torch.float64), "exp_avg": m.double().clone(),
                          "exp_avg_sq": v.double().clone()}
        ref.grad = grad.double()
        opt.step()
        if name == "8-bit":
            ops.adamw8bit_step_(param, grad, s1, s2, a1, a2, *maps, lr, *betas, eps, wd, 4, block_size)
        else:
            ops.adamw_step_(param, grad, m32, v32, lr, *betas, eps, wd, 4)
        # fp32 math from the same state: fp32 (or one bf16) rounding of p, ~1e-5 of the update.
        rounding = 2.0 ** -8 if dtype == torch.bfloat16 else 2.4e-7
        err = (param.double() - ref.detach()).abs()
        bound = ref.detach().abs() * rounding + 1e-5 * lr
        assert bool((err <= bound).all()), f"{name}: max excess {(err - bound).max().item()}"
