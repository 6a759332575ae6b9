// Tests of unswag::window_attention (include/unswag/nn/psa_ops.h) on CPU (the
// chunked_attention composition) and CUDA (its own kernels, asserted to run):
// output and the q, k, v gradients against a float64 masked-softmax
// composition (dq and dk against their cancellation-free scale), in fp16/bf16 (and fp32/fp64 on the composition), with GQA,
// odd lengths (T = 1, T not a multiple of the 64-row tiles, W > T, W = 1, W
// across tile boundaries), pruned keys (bias -2000: rows whose whole window
// is pruned average it uniformly), strided operands in the PSA layer's
// layouts, the kernels' error no more than twice the same-dtype composition's,
// empty sequences, and argument errors.
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
                                   {1, 1, 1, 520, 64, 200}};
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
