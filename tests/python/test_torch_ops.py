"""The Python face of UnSwag: torch.ops.unswag.* loaded from libunswag.so,
checked against PyTorch (autograd of the plain ops, finite differences)."""
import os
import pathlib

import pytest
import torch

LIB = os.environ.get("UNSWAG_LIBRARY", str(pathlib.Path(__file__).resolve().parents[2] / "build" / "libunswag.so"))
torch.ops.load_library(LIB)
ops = torch.ops.unswag

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
def test_psa_combine_packed_equals_the_unpacked_combine(device):
    """The signal read as packed rows through a token -> row index, against
    the combine's formula in float64 on rows unpacked by plain indexing,
    gradients included (C = 256: CUDA runs the kernels' packed mode)."""
    g = torch.Generator(device="cpu").manual_seed(int.from_bytes(os.urandom(4), "little"))
    b, t, h, d = 2, 9, 4, 64
    signal = torch.rand(b, t, generator=g) < 0.5
    s = int(signal.sum(1).max()) + 1
    rows, pack = torch.full((b * t,), -1), torch.full((b * s,), -1)
    for i in range(b):
        for n, j in enumerate(signal[i].nonzero().flatten().tolist()):
            rows[i * t + j], pack[i * s + n] = i * s + n, i * t + j
    inputs = (torch.randn(b * s, h, d, generator=g), torch.rand(b, t, generator=g),
              torch.randn(b, h, t, d, generator=g), torch.randn(b, t, 2 * d, generator=g),
              torch.randn(h * d, generator=g), torch.randn(b, t, h * d, generator=g), torch.randn(h * d, generator=g))
    a = [x.to(device).requires_grad_() for x in inputs]
    r = [x.detach().double().requires_grad_() for x in inputs]
    y = ops.psa_combine_packed(a[0], rows.to(device), pack.to(device), *a[1:])
    sig, gate, win, local, lam_l, summary, lam_s = r
    unpacked = torch.where((rows >= 0)[:, None], sig.reshape(b * s, h * d)[rows.clamp(min=0)], 0.0)
    heads = unpacked.view(b, t, h, d) * gate[:, :, None, None] + win.transpose(1, 2)
    local_q = local.view(b, t, 2, 1, d).expand(b, t, 2, 2, d).reshape(b, t, h * d)
    want = heads.reshape(b, t, h * d) + lam_l * local_q + lam_s * summary
    torch.testing.assert_close(y.double().cpu(), want, rtol=1e-5, atol=1e-5)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy.to(device))
    want.backward(dy.double())
    for x, xr in zip(a, r):
        torch.testing.assert_close(x.grad.double().cpu(), xr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_1bit_matches_torch_bit_for_bit(device, dtype):
    x = torch.randn(4099, device=device, dtype=dtype)
    x[:3] = torch.tensor([0.0, float("nan"), -0.0])
    dy = torch.randn_like(x)
    x1 = x.clone().requires_grad_()
    ops.relu_1bit(x1).backward(dy)
    x2 = x.clone().requires_grad_()
    torch.relu(x2).backward(dy)
    assert torch.equal(x1.grad.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       x2.grad.view(torch.int16 if dtype != torch.float32 else torch.int32))
    y, mask = ops.relu_1bit_forward(x)
    assert mask.dtype == torch.int32 and mask.numel() == (x.numel() + 31) // 32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,fn", [("silu", torch.nn.functional.silu), ("gelu", torch.nn.functional.gelu)])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_fewbit_gradient_is_the_table_value(device, name, fn, bits):
    x = (torch.randn(1000, device=device) * 2).requires_grad_()
    op = ops.silu_fewbit if name == "silu" else ops.gelu_fewbit
    y = op(x, bits)
    # Against float64: torch's own fp32 GELU is off by up to about 1.2e-6 near
    # |x| = 5 (ours about 4e-7), which made fp32-vs-fp32 fail now and then.
    torch.testing.assert_close(y, fn(x.detach().double()).to(y.dtype), rtol=1e-5, atol=1e-6)
    y.backward(torch.ones_like(y))
    boundaries, values = ops.fewbit_table(name, bits)
    code = (x.detach().double().cpu()[:, None] > boundaries[None, :]).sum(1)
    torch.testing.assert_close(x.grad.cpu(), values[code].float(), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "relu", "relu2"])
@pytest.mark.parametrize("policy", ["recompute", "compressed"])
def test_fused_mlp_passes_gradcheck(device, activation, policy):
    gated = activation in ("swiglu", "geglu")
    g = torch.Generator(device="cpu").manual_seed(int.from_bytes(os.urandom(4), "little"))
    mk = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) / 3).to(device).requires_grad_()
    x, wu, wd = mk(5, 7), mk(11, 7), mk(7, 11)
    wg = mk(11, 7) if gated else None
    # relu kinks: keep pre-activations away from 0 so finite differences are valid.
    with torch.no_grad():
        z = x @ wu.T
        wu.add_(torch.where(z.abs().min(0).values[:, None] < 1e-3, 0.01, 0.0))
    f = lambda x, wu, wd, *wg: ops.fused_mlp(x, wu, wd, wg[0] if wg else None, activation, policy, 16, 2)
    inputs = (x, wu, wd) + ((wg,) if gated else ())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_errors_name_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="argument 'policy' must be one of none, recompute, compressed; got 'fast'"):
        ops.fused_mlp(x, torch.randn(12, 8), torch.randn(8, 12), torch.randn(12, 8), "swiglu", "fast", 16, 2)
    with pytest.raises(RuntimeError, match="'x' must be float32, float16, bfloat16 or float64, got Long"):
        ops.relu_1bit(torch.arange(4))


@pytest.mark.parametrize("device", DEVICES)
def test_transformer_ops_match_autograd_in_float64(device):
    """rms_norm, chunked_attention, linear_cross_entropy from Python: gradcheck-free
    comparison of values and gradients against float64 compositions."""
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    x = torch.randn(5, 33, device=device, requires_grad=True)
    w = torch.randn(33, device=device, requires_grad=True)
    y = ops.rms_norm(x, w, 1e-6, False)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y64)
    y.backward(g.float())
    y64.backward(g)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)

    q = torch.randn(1, 4, 19, 8, device=device, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 19, 8, device=device, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 19, 8, device=device, dtype=torch.float64, requires_grad=True)
    out = ops.chunked_attention(q, k, v, 0.35, 0, 5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True, scale=0.35)
    torch.testing.assert_close(out, ref)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.chunked_attention(a, b, c, 0.35, 4, 5), (q, k, v))

    h = torch.randn(23, 16, device=device, dtype=torch.float64, requires_grad=True)
    wv = torch.randn(40, 16, device=device, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 40, (23,), device=device)
    t[3] = -100
    loss = ops.linear_cross_entropy(h, wv, t, 6)
    torch.testing.assert_close(loss.double(), torch.nn.functional.cross_entropy(h @ wv.t(), t), rtol=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda a, b: ops.linear_cross_entropy(a, b, t, 6).double(), (h, wv))


@pytest.mark.parametrize("device", DEVICES)
def test_qkv_projection_passes_gradcheck(device):
    """torch.ops.unswag.qkv_projection: three linear maps of one input (biases
    optional), gradients by finite differences in float64."""
    x = torch.randn(2, 3, 7, device=device, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(n, 7, device=device, dtype=torch.float64, requires_grad=True) for n in (6, 4, 4)]
    b = torch.randn(4, device=device, dtype=torch.float64, requires_grad=True)
    q, k, v = ops.qkv_projection(x, *ws, None, b, None)
    torch.testing.assert_close(q, x @ ws[0].t())
    torch.testing.assert_close(k, x @ ws[1].t() + b)
    torch.testing.assert_close(v, x @ ws[2].t())
    assert torch.autograd.gradcheck(lambda *a: ops.qkv_projection(a[0], a[1], a[2], a[3], None, a[4], None),
                                    (x, *ws, b))


# ---- PSA sequence primitives (include/unswag/nn/psa_ops.h) ------------------

def _conv_reference(x, w, b):
    """Causal depthwise conv as a left-padded grouped conv1d."""
    xt = torch.nn.functional.pad(x.transpose(1, 2), (w.shape[1] - 1, 0))
    return torch.nn.functional.conv1d(xt, w.unsqueeze(1), b, groups=x.shape[2]).transpose(1, 2)


def _scan_reference(a, x, h0):
    """h_t = a_t h_{t-1} + x_t as an explicit loop over time."""
    h = h0 if h0 is not None else x.new_zeros(x.shape[0], x.shape[2])
    out = []
    for t in range(x.shape[1]):
        h = a[:, t] * h + x[:, t]
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("taps", [1, 4, 19])
def test_causal_depthwise_conv1d_passes_gradcheck(device, taps):
    g = torch.Generator(device="cpu").manual_seed(int.from_bytes(os.urandom(4), "little"))
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_()
    x, w, b = mk(2, 9, 3), mk(3, taps), mk(3)
    torch.testing.assert_close(ops.causal_depthwise_conv1d(x, w, b), _conv_reference(x, w, b))
    assert torch.autograd.gradcheck(ops.causal_depthwise_conv1d, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: ops.causal_depthwise_conv1d(x, w, None), (x, w))


@pytest.mark.parametrize("device", DEVICES)
def test_linear_scan_passes_gradcheck(device):
    g = torch.Generator(device="cpu").manual_seed(int.from_bytes(os.urandom(4), "little"))
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)
    a = (torch.rand(2, 7, 3, generator=g, dtype=torch.float64).to(device) * 2 - 1).requires_grad_()
    x, h0 = mk(2, 7, 3).requires_grad_(), mk(2, 3).requires_grad_()
    torch.testing.assert_close(ops.linear_scan(a, x, h0), _scan_reference(a, x, h0))
    assert torch.autograd.gradcheck(ops.linear_scan, (a, x, h0))
    assert torch.autograd.gradcheck(lambda a, x: ops.linear_scan(a, x, None), (a, x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_scan_long_sequence_keeps_an_fp32_state(device, dtype):
    """T = 3000 (across the GPU's 256-step chunks) with decays near 1: within two
    roundings of the dtype from a float64 loop, values and gradients."""
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    a = (0.999 + 0.001 * torch.rand(2, 3000, 4, device=device)).to(dtype).requires_grad_()
    x = (0.05 * torch.randn(2, 3000, 4, device=device)).to(dtype).requires_grad_()
    h = ops.linear_scan(a, x, None)
    a64, x64 = a.detach().double().requires_grad_(), x.detach().double().requires_grad_()
    ref = _scan_reference(a64, x64, None)
    tol = {torch.float32: 1e-5, torch.float16: 2 / 2048, torch.bfloat16: 2 / 256}[dtype]
    rel = lambda got, want: ((got.double() - want).norm() / want.norm()).item()
    assert rel(h, ref) <= tol
    dh = torch.randn_like(h)
    h.backward(dh)
    ref.backward(dh.double())
    assert rel(a.grad, a64.grad) <= tol and rel(x.grad, x64.grad) <= tol


@pytest.mark.parametrize("device", DEVICES)
def test_gather_rows_packs_and_its_gradient_unpacks(device):
    """Rows picked by an injective index (out-of-range entries read zero rows);
    the gradient goes back through the inverse index: gradcheck in float64."""
    g = torch.Generator(device="cpu").manual_seed(int.from_bytes(os.urandom(4), "little"))
    src = torch.randn(7, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    index = torch.tensor([3, -1, 0, 6, 9, 2], device=device)
    inverse = torch.tensor([2, -1, 5, 0, -1, -1, 3], device=device)
    out = ops.gather_rows(src, index, inverse)
    want = torch.where((index >= 0) & (index < 7), 1.0, 0.0).to(src).unsqueeze(1) * src[index.clamp(0, 6)]
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda s: ops.gather_rows(s, index, inverse), (src,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pad_head_dim_equals_cat(device, dtype):
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    x = torch.randn(2, 5, 3, 64, device=device, dtype=dtype)
    first = torch.randn(2, 5, device=device)
    want = torch.cat([x, first.to(dtype)[:, :, None, None].expand(2, 5, 3, 1), x.new_zeros(2, 5, 3, 7)], -1)
    assert torch.equal(ops.pad_head_dim(x, 8, first), want)
    assert torch.equal(ops.pad_head_dim(x, 8), torch.cat([x, x.new_zeros(2, 5, 3, 8)], -1))
    x64 = torch.randn(1, 4, 2, 8, device=device, dtype=torch.float64, requires_grad=True)
    f64 = torch.randn(1, 4, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.pad_head_dim(a, 8, b), (x64, f64))


@pytest.mark.parametrize("device", DEVICES)
def test_gate_tokens_and_unpad_head_dim_pass_gradcheck(device):
    g = torch.Generator(device="cpu").manual_seed(int.from_bytes(os.urandom(4), "little"))
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64).to(device).requires_grad_()
    gate = torch.randn(2, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    torch.testing.assert_close(ops.gate_tokens(x, gate), x * gate[..., None])
    assert torch.autograd.gradcheck(ops.gate_tokens, (x, gate))
    y = torch.randn(2, 3, 4, 24, generator=g, dtype=torch.float64).to(device).requires_grad_()
    assert torch.equal(ops.unpad_head_dim(y, 8), y[..., :16])
    assert torch.autograd.gradcheck(lambda t: ops.unpad_head_dim(t, 8), (y,))


def window_reference(q, k, v, bias, scale, window):
    """softmax(scale q k^T + bias_j) over keys i - window < j <= i, with GQA."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    t = q.shape[2]
    s = (q @ k.transpose(-1, -2)) * scale + bias[:, None, None, :].to(q.dtype)
    dist = torch.arange(t, device=q.device)[:, None] - torch.arange(t, device=q.device)[None, :]
    s = s.masked_fill(~((dist >= 0) & (dist < window)), float("-inf"))
    # Softmax in s's own dtype (float64 here): in fp32 a row whose visible
    # keys are all pruned weighs them by scores rounded at 2000's fp32
    # spacing (1.2e-4), 4e-5 off float64 in one draw.
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("device", DEVICES)
def test_window_attention_matches_masked_softmax_and_passes_gradcheck(device):
    """The window read with a per-key bias (pruned keys at -2000); float64
    gradcheck on the composition path, and on CUDA the bf16 kernels against
    the float64 reference."""
    g = torch.Generator(device="cpu").manual_seed(int.from_bytes(os.urandom(4), "little"))
    q = torch.randn(1, 4, 11, 8, generator=g, dtype=torch.float64).to(device).requires_grad_()
    k = torch.randn(1, 2, 11, 8, generator=g, dtype=torch.float64).to(device).requires_grad_()
    v = torch.randn(1, 2, 11, 8, generator=g, dtype=torch.float64).to(device).requires_grad_()
    bias = torch.where(torch.rand(1, 11, generator=g) < 0.3, -2000.0, 0.0).to(device)
    torch.testing.assert_close(ops.window_attention(q, k, v, bias, 0.35, 4), window_reference(q, k, v, bias, 0.35, 4))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.window_attention(a, b, c, bias, 0.35, 4), (q, k, v))
    if device == "cuda":
        qb = torch.randn(2, 4, 300, 128, generator=g).to(device, torch.bfloat16)
        kb = torch.randn(2, 2, 300, 128, generator=g).to(device, torch.bfloat16)
        vb = torch.randn(2, 2, 300, 128, generator=g).to(device, torch.bfloat16)
        bb = torch.where(torch.rand(2, 300, generator=g) < 0.2, -2000.0, 0.0).to(device)
        got = ops.window_attention(qb, kb, vb, bb, 128 ** -0.5, 128)
        want = window_reference(qb.double(), kb.double(), vb.double(), bb, 128 ** -0.5, 128)
        assert ((got.double() - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.parametrize("device", DEVICES)
def test_psa_route_matches_its_composition_and_passes_gradcheck(device):
    b, t = 2, 37
    logits = torch.randn(b, t, 4, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, device=device)
    gumbel = -torch.log(-torch.log(torch.rand(b, t, 4, dtype=torch.float64, device=device)))
    target = torch.softmax(torch.randn(4, dtype=torch.float64, device=device), 0)
    tau, w = 0.7, (0.3, 0.01, 0.05)
    route, gates, losses, stats, signal_max = ops.psa_route(logits, bias, gumbel, target, tau, *w)
    noisy = (logits + bias) / tau + gumbel
    assert torch.equal(route, noisy.argmax(-1))
    assert torch.equal(gates.detach(), torch.nn.functional.one_hot(route, 4).double())
    log_p = torch.log_softmax((logits + bias) / tau, -1)
    p = log_p.exp()
    load = ((p.mean((0, 1)) - target) ** 2).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    entropy = -(p * log_p).sum(-1).mean()
    torch.testing.assert_close(losses, torch.stack([w[0] * load + w[1] * z + w[2] * entropy, load, z, entropy]))
    torch.testing.assert_close(stats[5:9], torch.nn.functional.one_hot(route, 4).double().mean((0, 1)))
    assert signal_max.item() == (route == 3).sum(1).max().item()

    # The gates' gradient is straight-through (the soft sample's), so no finite difference sees it.
    dg = torch.randn_like(gates)
    y = torch.softmax(noisy, -1)
    torch.testing.assert_close(torch.autograd.grad(gates, logits, dg)[0], torch.autograd.grad(y, logits, dg)[0])
    assert torch.autograd.gradcheck(lambda lg: ops.psa_route(lg, bias, gumbel, target, tau, *w)[2], (logits,))
