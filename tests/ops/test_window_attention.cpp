// Tests of unswag::window_attention (include/unswag/nn/psa_ops.h) on CPU (the
// chunked_attention composition) and CUDA (its own kernels, asserted to run):
// output and the q, k, v gradients against a float64 masked-softmax
// composition (dq and dk against their cancellation-free scale), in
// fp16/bf16 (and fp32/fp64 on the composition), with GQA, odd lengths (T =
// 1, T not a multiple of the 64-row tiles, W > T, W = 1, W across tile
// boundaries), pruned keys (bias -2000: rows whose whole window is pruned
// average it uniformly), strided operands in the PSA layer's layouts, the
// kernels' error no more than twice the same-dtype composition's, empty
// sequences, and argument errors; the backward's extras (the packed signal
// rows added into dq and dk, d z_sig's dk part, RoPE's transposed rotation)
// against the plain backward plus a float64 composition (CUDA).
#include "test_util.h"
#include "unswag/nn/functional.h"
#include "unswag/nn/psa_ops.h"

namespace unswag {
namespace {

using test::DeviceTest;
using test::rel_l2;

class WindowAttention : public DeviceTest {};
UNSWAG_INSTANTIATE_DEVICES(WindowAttention);

// o_i = softmax_j(scale q_i.k_j + bias_j | i - W < j <= i) v_j in float64 on
// the CPU; also P, the attention weights [B, H, T, T].
std::pair<torch::Tensor, torch::Tensor> window_reference(const torch::Tensor& q, const torch::Tensor& k,
                                                         const torch::Tensor& v, const torch::Tensor& bias,
                                                         double scale, int64_t window) {
  const int64_t B = q.size(0), T = q.size(2), G = q.size(1) / k.size(1);
  const auto ke = k.repeat_interleave(G, 1), ve = v.repeat_interleave(G, 1);
  auto s = torch::matmul(q, ke.transpose(-1, -2)) * scale + bias.to(torch::kDouble).view({B, 1, 1, T});
  const auto pos = torch::arange(T, torch::TensorOptions().dtype(torch::kLong));
  const auto dist = pos.view({T, 1}) - pos.view({1, T});
  const auto visible = (dist >= 0).logical_and(dist < window);
  s = s.masked_fill(visible.logical_not(), -std::numeric_limits<double>::infinity());
  const auto p = torch::softmax(s, -1);
  return {torch::matmul(p, ve), p};
}

// The scale of dq and dk free of cancellation: dS_ij = P_ij (dP_ij - delta_i)
// is a difference of near-equal terms where P is peaked (a window of one or
// two visible keys makes dq and dk vanish), so their rounding error is
// measured against scale sum_j P_ij (|dP_ij| + |delta_i|) |k_j| (and the
// same for dk), not against their own size.
std::pair<torch::Tensor, torch::Tensor> gradient_scales(const torch::Tensor& q, const torch::Tensor& k,
                                                        const torch::Tensor& v, const torch::Tensor& o,
                                                        const torch::Tensor& p, const torch::Tensor& dy,
                                                        double scale) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), G = H / Hkv;
  const auto ke = k.repeat_interleave(G, 1), ve = v.repeat_interleave(G, 1);
  const auto dp = torch::matmul(dy, ve.transpose(-1, -2));
  const auto delta = (dy * o).sum(-1, true);
  const auto ds_mag = p * (dp.abs() + delta.abs());
  const auto dq_mag = torch::matmul(ds_mag, ke.abs()) * scale;
  const auto dk_mag = (torch::matmul(ds_mag.transpose(-1, -2), q.abs()) * scale).view({B, Hkv, G, T, D}).sum(2);
  return {dq_mag, dk_mag};
}

double error_over(const torch::Tensor& a, const torch::Tensor& ref, const torch::Tensor& mag) {
  const auto ad = a.detach().to(torch::kCPU, torch::kDouble);
  return (ad - ref).norm().item<double>() / std::max(mag.norm().item<double>(), 1e-300);
}

struct Case {
  int64_t B, H, Hkv, T, D, W;
};

// Keys pruned with probability 1/4 (the layer's bias), the rest a small random bias.
torch::Tensor make_bias(int64_t B, int64_t T, const torch::TensorOptions& o) {
  const auto pruned = torch::rand({B, T}, o.dtype(torch::kFloat)) < 0.25;
  return torch::where(pruned, torch::full({B, T}, -2000.0, o.dtype(torch::kFloat)),
                      torch::randn({B, T}, o.dtype(torch::kFloat)) * 0.5);
}

double tolerance(torch::ScalarType t) {
  // P and dS are rounded to the storage type before their products (as
  // FlashAttention does), a few units of roundoff of the result.
  if (t == torch::kFloat64) return 1e-12;
  // fp32: a row whose visible keys are all pruned weighs them by scores that
  // carry the -2000 bias, rounded at fp32's spacing there (1.2e-4): that row
  // is off by up to about 1e-4 relative (measured 6e-5, 1.2e-5 on the whole
  // output; any additive mask has it). Elsewhere about 3e-7.
  if (t == torch::kFloat32) return 1e-4;
  return 6 * test::unit_roundoff(t);
}

TEST_P(WindowAttention, ForwardAndGradientsMatchFloat64) {
  const std::vector<Case> cases = {{2, 4, 2, 200, 64, 7},   {1, 2, 2, 129, 128, 128}, {1, 3, 1, 64, 128, 1},
                                   {2, 2, 2, 1, 64, 128},   {1, 2, 1, 333, 128, 1000}, {1, 2, 2, 300, 128, 100},
                                   {1, 1, 1, 520, 64, 200},  {1, 2, 1, 260, 64, 16}};
  std::vector<torch::ScalarType> dtypes = {torch::kBFloat16, torch::kFloat16};
  if (GetParam() == "cpu") dtypes.insert(dtypes.end(), {torch::kFloat32, torch::kFloat64});
  for (auto dtype : dtypes) {
    for (const auto& c : cases) {
      for (bool strided : {false, true}) {
        SCOPED_TRACE(::testing::Message() << dtype << " B " << c.B << " H " << c.H << " Hkv " << c.Hkv << " T " << c.T
                                          << " D " << c.D << " W " << c.W << " strided " << strided << " seed "
                                          << seed_);
        const double scale = 1.0 / std::sqrt(double(c.D));
        torch::Tensor q, k, v;
        if (strided) {
          // The layer's layouts: q and k [B, heads, T, D] views of token-major
          // storage; v a view of a wider token-major tensor (the fused qkv).
          q = torch::randn({c.B, c.T, c.H, c.D}, opts(dtype)).transpose(1, 2);
          k = torch::randn({c.B, c.T, c.Hkv, c.D}, opts(dtype)).transpose(1, 2);
          v = torch::randn({c.B, c.T, 3 * c.Hkv, c.D}, opts(dtype)).narrow(2, c.Hkv, c.Hkv).transpose(1, 2);
        } else {
          q = torch::randn({c.B, c.H, c.T, c.D}, opts(dtype));
          k = torch::randn({c.B, c.Hkv, c.T, c.D}, opts(dtype));
          v = torch::randn({c.B, c.Hkv, c.T, c.D}, opts(dtype));
        }
        const auto bias = make_bias(c.B, c.T, opts(dtype));
        if (GetParam() == "cuda" && dtype != torch::kFloat32 && dtype != torch::kFloat64)
          ASSERT_TRUE(window_attention_fused(q, k, v));  // the kernels, not the composition
        q.requires_grad_(true), k.requires_grad_(true), v.requires_grad_(true);
        auto o = window_attention(q, k, v, bias, scale, c.W);
        ASSERT_EQ(o.sizes(), q.sizes());
        ASSERT_EQ(o.scalar_type(), dtype);
        auto dy = torch::randn(o.sizes(), opts(dtype));
        o.backward(dy);

        auto qd = q.detach().to(torch::kCPU, torch::kDouble).requires_grad_(true);
        auto kd = k.detach().to(torch::kCPU, torch::kDouble).requires_grad_(true);
        auto vd = v.detach().to(torch::kCPU, torch::kDouble).requires_grad_(true);
        auto [o_ref, p_ref] = window_reference(qd, kd, vd, bias.cpu(), scale, c.W);
        const auto dyd = dy.to(torch::kCPU, torch::kDouble);
        o_ref.backward(dyd);
        torch::NoGradGuard no_grad;
        const auto [dq_mag, dk_mag] = gradient_scales(qd, kd, vd, o_ref, p_ref, dyd, scale);
        const double tol = tolerance(dtype);
        EXPECT_LE(rel_l2(o, o_ref), tol) << "output";
        EXPECT_LE(error_over(q.grad(), qd.grad(), dq_mag), tol) << "dq";
        EXPECT_LE(error_over(k.grad(), kd.grad(), dk_mag), tol) << "dk";
        EXPECT_LE(rel_l2(v.grad(), vd.grad()), tol) << "dv";
        EXPECT_EQ(q.grad().sizes(), q.sizes());
        EXPECT_EQ(k.grad().sizes(), k.sizes());

        if (GetParam() == "cuda") {
          // No worse than twice the same-dtype composition's own error (plus a
          // unit roundoff): the kernels lose nothing the math need not lose.
          torch::AutoGradMode grad_on(true);
          auto q2 = q.detach().clone().requires_grad_(true), k2 = k.detach().clone().requires_grad_(true),
               v2 = v.detach().clone().requires_grad_(true);
          auto o2 = chunked_attention(q2, k2, v2, scale, c.W, 1024, bias);
          o2.backward(dy);
          const double u = test::unit_roundoff(dtype);
          EXPECT_LE(rel_l2(o, o_ref), 2 * rel_l2(o2, o_ref) + u) << "output vs composition";
          EXPECT_LE(error_over(q.grad(), qd.grad(), dq_mag), 2 * error_over(q2.grad(), qd.grad(), dq_mag) + u)
              << "dq vs composition";
          EXPECT_LE(error_over(k.grad(), kd.grad(), dk_mag), 2 * error_over(k2.grad(), kd.grad(), dk_mag) + u)
              << "dk vs composition";
          EXPECT_LE(rel_l2(v.grad(), vd.grad()), 2 * rel_l2(v2.grad(), vd.grad()) + u) << "dv vs composition";
        }
      }
    }
  }
}

// A key's bias of -2000 removes it next to any visible key; a row whose window
// holds only removed keys averages them (as any additive mask does): with W = 1
// and the key pruned, o_i = v_i exactly.
TEST_P(WindowAttention, PrunedKeysAreInvisible) {
  for (auto dtype : {torch::kBFloat16, torch::kFloat16}) {
    SCOPED_TRACE(::testing::Message() << dtype << " seed " << seed_);
    const int64_t B = 1, H = 2, T = 150, D = 128;
    auto q = torch::randn({B, H, T, D}, opts(dtype)), k = torch::randn({B, H, T, D}, opts(dtype));
    auto v = torch::randn({B, H, T, D}, opts(dtype));
    auto pruned = torch::rand({B, T}, opts(torch::kFloat)) < 0.5;
    pruned.index_put_({0, 0}, false);  // row 0 sees key 0 only
    const auto bias = pruned.to(torch::kFloat) * -2000.0;
    auto o = window_attention(q, k, v, bias, 0.0883883, 64);
    // Changing the pruned keys' k and v changes nothing.
    auto k2 = torch::where(pruned.view({B, 1, T, 1}), torch::randn_like(k) * 4, k);
    auto v2 = torch::where(pruned.view({B, 1, T, 1}), torch::randn_like(v) * 4, v);
    auto o2 = window_attention(q, k2, v2, bias, 0.0883883, 64);
    EXPECT_TRUE(torch::equal(o, o2));
    auto o1 = window_attention(q, k, v, torch::ones({B, T}, opts(torch::kFloat)) * -2000.0, 0.1, 1);
    EXPECT_LE(rel_l2(o1, v), test::unit_roundoff(dtype));
  }
}

// The backward's extras (the PSA layer's fused node): dq and dk leave with
// the packed signal rows added and RoPE's transposed rotation applied, and
// dz_part holds each added dk row's dot with k per kv head; against the
// plain backward's dq, dk plus the rows, rotated in float64 (the kernel
// rounds once, after an fp32 sum and rotation: within a unit of roundoff or
// so). dv is the plain backward's, bit for bit. CUDA only (the kernels'), so
// a suite of its own instantiated for "cuda" alone.
class WindowAttentionExtras : public DeviceTest {};
INSTANTIATE_TEST_SUITE_P(Devices, WindowAttentionExtras, ::testing::Values("cuda"), test::device_name);

TEST_P(WindowAttentionExtras, BackwardExtrasAddSignalRowsAndRotate) {
  const std::vector<Case> cases = {{2, 4, 2, 150, 64, 40}, {1, 2, 2, 130, 128, 128}, {2, 2, 1, 64, 128, 7}};
  for (auto dtype : {torch::kBFloat16, torch::kHalf}) {
    for (const auto& c : cases) {
      for (bool per_batch : {false, true}) {
        SCOPED_TRACE(::testing::Message() << dtype << " B " << c.B << " H " << c.H << " Hkv " << c.Hkv << " T "
                                          << c.T << " D " << c.D << " W " << c.W << " per-batch tables "
                                          << per_batch << " seed " << seed_);
        const auto o16 = opts(dtype);
        const double scale = 1.0 / std::sqrt(double(c.D));
        // RoPE tables as transformers builds them (inv_freq, emb = cat(freqs, freqs)), per sequence or shared.
        const int64_t Bc = per_batch ? c.B : 1;
        const auto offset = per_batch ? torch::randint(0, 50, {Bc, 1, 1}, opts(torch::kFloat))
                                      : torch::zeros({1, 1, 1}, opts(torch::kFloat));
        const auto pos = torch::arange(c.T, opts(torch::kFloat)).view({1, c.T, 1}) + offset;
        const auto inv = torch::pow(10000.0, -torch::arange(0, c.D, 2, opts(torch::kFloat)) / double(c.D));
        const auto freqs = pos * inv.view({1, 1, -1});
        const auto emb = torch::cat({freqs, freqs}, -1);
        const auto cos = emb.cos().to(dtype), sin = emb.sin().to(dtype);
        const auto q_lin = torch::randn({c.B, c.T, c.H, c.D}, o16), k_lin = torch::randn({c.B, c.T, c.Hkv, c.D}, o16);
        const auto q = rotary_embedding(q_lin, cos, sin).transpose(1, 2);
        const auto k = rotary_embedding(k_lin, cos, sin).transpose(1, 2);
        const auto v = torch::randn({c.B, c.T, c.Hkv, c.D}, o16).transpose(1, 2);
        const auto bias = make_bias(c.B, c.T, o16);
        auto [o, lse] = window_attention_cuda_forward(q, k, v, bias, scale, c.W);
        const auto dy = torch::randn({c.B, c.T, c.H, c.D}, o16).transpose(1, 2);
        // About a third of the tokens carry a packed row (in a shuffled order, as any packing may).
        const auto lopt = opts(torch::kLong);
        const auto chosen = (torch::rand({c.B * c.T}, opts(torch::kFloat)) < 0.35).nonzero().squeeze(1);
        const int64_t N = chosen.size(0);
        const auto slots = torch::randperm(N, lopt);
        auto sig_rows = torch::full({c.B * c.T}, -1, lopt);
        sig_rows.index_put_({chosen}, slots);
        const auto dq_sig = torch::randn({N, c.H * c.D}, o16), dk_sig = torch::randn({N, c.Hkv * c.D}, o16);
        auto [dq0, dk0, dv0] = window_attention_cuda_backward(dy, q, k, v, bias, o, lse, scale, c.W);
        WindowGradExtras extras;
        extras.sig_rows = sig_rows, extras.dq_sig = dq_sig, extras.dk_sig = dk_sig;
        extras.rope_cos = cos, extras.rope_sin = sin;
        auto [dq1, dk1, dv1, dz] =
            window_attention_cuda_backward(dy, q, k, v, bias, o, lse, scale, c.W, extras);
        EXPECT_TRUE(torch::equal(dv1, dv0));
        // float64 reference: token-major rows + the packed rows at their tokens, then R^T.
        const auto cpu64 = [](const torch::Tensor& t) { return t.to(torch::kCPU, torch::kDouble); };
        const auto c64 = cpu64(cos).expand({c.B, c.T, c.D}).unsqueeze(2);
        const auto s64 = cpu64(sin).expand({c.B, c.T, c.D}).unsqueeze(2);
        const auto rows_cpu = sig_rows.cpu();
        auto reference = [&](const torch::Tensor& win, const torch::Tensor& sig, int64_t heads) {
          auto total = cpu64(win.transpose(1, 2)).reshape({c.B * c.T, heads * c.D}).clone();
          const auto has = rows_cpu >= 0;
          total.index_put_({has}, total.index({has}) + cpu64(sig).index({rows_cpu.index({has})}));
          const auto g = total.view({c.B, c.T, heads, c.D});
          const int64_t h = c.D / 2;
          const auto g1 = g.narrow(3, 0, h), g2 = g.narrow(3, h, h);
          const auto c1 = c64.narrow(3, 0, h), c2 = c64.narrow(3, h, h);
          const auto s1 = s64.narrow(3, 0, h), s2 = s64.narrow(3, h, h);
          return torch::cat({g1 * c1 + g2 * s2, g2 * c2 - g1 * s1}, 3);
        };
        const double u = test::unit_roundoff(dtype);
        EXPECT_LE(rel_l2(cpu64(dq1.transpose(1, 2)), reference(dq0, dq_sig, c.H)), 2 * u);
        EXPECT_LE(rel_l2(cpu64(dk1.transpose(1, 2)), reference(dk0, dk_sig, c.Hkv)), 2 * u);
        // dz_part[(b, t), hk] = sum_d dk_sig[row, hk D + d] k[b, hk, t, d] (zero where no row).
        const auto k_rows = cpu64(k.transpose(1, 2)).reshape({c.B * c.T, c.Hkv, c.D});
        auto dz_ref = torch::zeros({c.B * c.T, c.Hkv}, torch::TensorOptions().dtype(torch::kDouble));
        const auto has = rows_cpu >= 0;
        dz_ref.index_put_({has}, (cpu64(dk_sig).index({rows_cpu.index({has})}).view({-1, c.Hkv, c.D}) *
                                  k_rows.index({has})).sum(-1));
        ASSERT_TRUE(dz.defined());
        EXPECT_EQ(dz.sizes(), (std::vector<int64_t>{c.B * c.T, c.Hkv}));
        EXPECT_LE(rel_l2(cpu64(dz), dz_ref), 1e-5);
        EXPECT_TRUE(torch::equal(cpu64(dz).index({has.logical_not()}), dz_ref.index({has.logical_not()})));
      }
    }
  }
  // Argument errors name the argument.
  const auto x = torch::randn({1, 2, 70, 64}, opts(torch::kBFloat16));
  const auto b = torch::zeros({1, 70}, opts(torch::kFloat));
  auto [o, lse] = window_attention_cuda_forward(x, x, x, b, 0.125, 16);
  WindowGradExtras bad;
  bad.dq_sig = torch::randn({3, 100}, opts(torch::kBFloat16));
  bad.sig_rows = torch::full({70}, -1, opts(torch::kLong));
  test::expect_error([&] { window_attention_cuda_backward(x, x, x, x, b, o, lse, 0.125, 16, bad); },
                     {"argument 'dq_sig' must be [N, 128]", "[3, 100]"});
  bad.dq_sig = torch::randn({3, 128}, opts(torch::kBFloat16));
  bad.sig_rows = torch::full({69}, -1, opts(torch::kLong));
  test::expect_error([&] { window_attention_cuda_backward(x, x, x, x, b, o, lse, 0.125, 16, bad); },
                     {"argument 'sig_rows' must be int64 with B * T = 70 values"});
  WindowGradExtras bad_rope;
  bad_rope.rope_cos = torch::randn({1, 70, 32}, opts(torch::kBFloat16));
  bad_rope.rope_sin = bad_rope.rope_cos;
  test::expect_error([&] { window_attention_cuda_backward(x, x, x, x, b, o, lse, 0.125, 16, bad_rope); },
                     {"argument 'rope_cos' must be [1 or 1, 70, 64]", "[1, 70, 32]"});
}

TEST_P(WindowAttention, EmptyAndErrors) {
  auto q = torch::randn({2, 4, 0, 128}, opts(torch::kBFloat16)).requires_grad_(true);
  auto k = torch::randn({2, 2, 0, 128}, opts(torch::kBFloat16));
  auto o = window_attention(q, k, k, torch::zeros({2, 0}, opts(torch::kFloat)), 0.1, 128);
  EXPECT_EQ(o.sizes(), q.sizes());
  o.sum().backward();
  EXPECT_EQ(q.grad().sizes(), q.sizes());
  using test::expect_error;
  auto x = torch::randn({1, 2, 5, 64}, opts(torch::kBFloat16));
  auto b = torch::zeros({1, 5}, opts(torch::kFloat));
  expect_error([&] { window_attention(x[0], x, x, b, 0.1, 4); }, {"must be [B, heads, T, head_dim] (4 dims)"});
  expect_error([&] { window_attention(x, x, x, torch::zeros({1, 4}, opts(torch::kFloat)), 0.1, 4); },
               {"argument 'bias' must be a floating [B, T] = [1, 5]", "[1, 4]"});
  expect_error([&] { window_attention(x, x, x, b, 0.1, 0); }, {"argument 'window' must be >= 1, got 0"});
  auto kv3 = torch::randn({1, 3, 5, 64}, opts(torch::kBFloat16));
  expect_error([&] { window_attention(x, kv3, kv3, b, 0.1, 4); }, {"q heads (2) must be a multiple of k/v heads (3)"});
  expect_error([&] { window_attention(x, x.narrow(2, 0, 4), x, b, 0.1, 4); }, {"arguments 'k' and 'v' must be"});
}

}  // namespace
}  // namespace unswag
