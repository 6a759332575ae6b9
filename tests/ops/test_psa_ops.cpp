// Tests of the PSA sequence primitives (include/unswag/nn/psa_ops.h) on CPU
// and CUDA: causal_depthwise_conv1d and linear_scan, forward and every
// gradient against float64 ATen compositions (a left-padded grouped conv1d;
// an explicit loop over time), in fp32/fp16/bf16/fp64, odd sizes (K = 1, K > T,
// K beyond the GPU's register window, T across tiles and scan chunks), a long
// slowly decaying scan (no bf16 drift), non-contiguous inputs, empty tensors,
// bitwise causality, central finite differences in float64, and errors; and
// gated_ema_scan against its float64 composition and, bit for bit, its fp32 one;
// psa_combine against its float64 formula (fused CUDA kernels and composition);
// gather_rows against index_select, its backward against the float64 adjoint,
// add_rows_dot_ against a float64 loop;
// pad_head_dim against zeros + cat (the CUDA kernel and the composition),
// unpad_head_dim's padded gradient, gate_tokens against its float64 product.
#include <functional>

#include "test_util.h"
#include "unswag/nn/psa_ops.h"

namespace unswag {
namespace {

using test::DeviceTest;
using test::rel_l2;

class PsaConv : public DeviceTest {};
class PsaScan : public DeviceTest {};
class PsaCombine : public DeviceTest {};
class GatherRows : public DeviceTest {};
class PadHeadDim : public DeviceTest {};
class GateTokens : public DeviceTest {};
class ValueStreams : public DeviceTest {};
UNSWAG_INSTANTIATE_DEVICES(GateTokens);
UNSWAG_INSTANTIATE_DEVICES(ValueStreams);
UNSWAG_INSTANTIATE_DEVICES(GatherRows);
UNSWAG_INSTANTIATE_DEVICES(PadHeadDim);
UNSWAG_INSTANTIATE_DEVICES(PsaConv);
UNSWAG_INSTANTIATE_DEVICES(PsaScan);
UNSWAG_INSTANTIATE_DEVICES(PsaCombine);

const std::vector<torch::ScalarType> kAllDtypes = {torch::kFloat64, torch::kFloat32, torch::kFloat16,
                                                   torch::kBFloat16};

// Relative L2 error allowed against the float64 reference of the same (rounded)
// inputs: the kernels compute in fp32 (fp64) and round once to the storage
// dtype, which costs at most u (its unit roundoff) per element; fp32's own
// accumulation error over the <= a few thousand terms here stays below 1e-5.
double tolerance(torch::ScalarType t) {
  if (t == torch::kFloat64) return 1e-12;
  if (t == torch::kFloat32) return 1e-5;
  return 2 * test::unit_roundoff(t) + 1e-5;
}

// ---- float64 references -----------------------------------------------------

torch::Tensor conv_reference(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  const int64_t C = x.size(2), K = w.size(1);
  auto xt = torch::constant_pad_nd(x.transpose(1, 2), {K - 1, 0});
  return at::conv1d(xt, w.unsqueeze(1), b, at::IntArrayRef{1}, at::IntArrayRef{0}, at::IntArrayRef{1}, C)
      .transpose(1, 2);
}

// unbind, not select per step: select's backward writes a [B, T, C] tensor
// per step (O(T^2 C) work); unbind's stacks the T gradients once.
torch::Tensor scan_reference(const torch::Tensor& a, const torch::Tensor& x, const torch::Tensor& h0) {
  auto h = h0.defined() ? h0 : torch::zeros({x.size(0), x.size(2)}, x.options());
  const auto as = a.unbind(1), xs = x.unbind(1);
  std::vector<torch::Tensor> out;
  for (size_t t = 0; t < xs.size(); ++t) {
    h = as[t] * h + xs[t];
    out.push_back(h);
  }
  return out.empty() ? torch::zeros_like(x) : torch::stack(out, 1);
}

// A leaf copy in float64 on the CPU (undefined stays undefined).
torch::Tensor f64_leaf(const torch::Tensor& t) {
  if (!t.defined()) return t;
  return t.detach().to(torch::kCPU, torch::kDouble).requires_grad_(true);
}
torch::Tensor leaf(const torch::Tensor& t) { return t.defined() ? t.detach().requires_grad_(true) : t; }
torch::Tensor grad_of(const torch::Tensor& t) { return t.defined() ? t.grad() : t; }

// Runs f on leaves of `inputs` (ours) and on their float64 CPU copies (the
// reference), back-propagates the same dy, and checks output and gradients.
using Fn = std::function<torch::Tensor(const std::vector<torch::Tensor>&)>;
void check_against_reference(const Fn& ours, const Fn& reference, const std::vector<torch::Tensor>& inputs,
                             const std::vector<const char*>& names, double tol) {
  std::vector<torch::Tensor> mine, ref;
  for (const auto& t : inputs) {
    mine.push_back(leaf(t));
    ref.push_back(f64_leaf(t));
  }
  auto y = ours(mine);
  auto y_ref = reference(ref);
  ASSERT_EQ(y.sizes(), y_ref.sizes());
  ASSERT_EQ(y.scalar_type(), inputs[0].scalar_type());
  ASSERT_EQ(y.device(), inputs[0].device());
  EXPECT_LE(rel_l2(y, y_ref), tol) << "output";
  auto dy = torch::randn(y.sizes(), y.options());
  y.backward(dy);
  y_ref.backward(dy.to(torch::kCPU, torch::kDouble));
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].defined()) continue;
    SCOPED_TRACE(names[i]);
    ASSERT_TRUE(mine[i].grad().defined());
    EXPECT_EQ(mine[i].grad().scalar_type(), inputs[i].scalar_type());
    EXPECT_EQ(mine[i].grad().sizes(), inputs[i].sizes());
    EXPECT_LE(rel_l2(mine[i].grad(), ref[i].grad()), tol) << "gradient of " << names[i];
  }
}

// Central differences of sum(f(inputs) * dy) in float64 against autograd.
void check_finite_differences(const Fn& f, const std::vector<torch::Tensor>& inputs) {
  std::vector<torch::Tensor> leaves;
  for (const auto& t : inputs) leaves.push_back(leaf(t));
  auto y = f(leaves);
  auto dy = torch::randn_like(y);
  y.backward(dy);
  const double h = 1e-6;
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].defined()) continue;
    auto analytic = leaves[i].grad().contiguous().view(-1);
    for (int64_t e = 0; e < inputs[i].numel(); ++e) {
      std::vector<torch::Tensor> plus, minus;
      for (size_t j = 0; j < inputs.size(); ++j) {
        plus.push_back(inputs[j].defined() ? inputs[j].clone() : inputs[j]);
        minus.push_back(inputs[j].defined() ? inputs[j].clone() : inputs[j]);
      }
      plus[i].view(-1)[e] += h;
      minus[i].view(-1)[e] -= h;
      const double numeric = ((f(plus) - f(minus)) * dy).sum().item<double>() / (2 * h);
      const double got = analytic[e].item<double>();
      EXPECT_NEAR(got, numeric, 1e-6 * (1 + std::abs(numeric))) << "input " << i << " element " << e;
    }
  }
}

// ---- causal_depthwise_conv1d ----------------------------------------------

Fn conv_fn() {
  return [](const std::vector<torch::Tensor>& in) { return causal_depthwise_conv1d(in[0], in[1], in[2]); };
}
Fn conv_ref_fn() {
  return [](const std::vector<torch::Tensor>& in) { return conv_reference(in[0], in[1], in[2]); };
}

struct ConvShape {
  int64_t B, T, C, K;
};
// K = 1; K in the GPU's padded register windows (3 -> 4, 5 -> 8, 16); K > T;
// K = 20 (the GPU's plain-loop kernel); T across CPU tiles of 256; odd C
// (one channel per GPU thread) and even C (two per thread in 16 bits).
const std::vector<ConvShape> kConvShapes = {{2, 37, 5, 4},   {1, 1, 3, 1},   {3, 10, 7, 16}, {2, 9, 3, 13},
                                            {1, 300, 33, 5}, {2, 41, 6, 20}, {1, 530, 3, 3}, {2, 37, 8, 4},
                                            {1, 300, 34, 5}, {3, 70, 2, 16}, {1, 1, 4, 1}};

TEST_P(PsaConv, ForwardAndGradientsMatchFloat64) {
  for (auto dtype : kAllDtypes) {
    for (const auto& s : kConvShapes) {
      for (bool with_bias : {true, false}) {
        SCOPED_TRACE(::testing::Message() << dtype << " B " << s.B << " T " << s.T << " C " << s.C << " K " << s.K
                                          << " bias " << with_bias << " seed " << seed_);
        auto x = torch::randn({s.B, s.T, s.C}, opts(dtype));
        auto w = torch::randn({s.C, s.K}, opts(dtype)) / std::sqrt(double(s.K));
        auto b = with_bias ? torch::randn({s.C}, opts(dtype)) : torch::Tensor();
        check_against_reference(conv_fn(), conv_ref_fn(), {x, w, b}, {"x", "weight", "bias"}, tolerance(dtype));
      }
    }
  }
}

// fp32 weight and bias with 16-bit activations (mixed precision): the
// gradients come back in the parameters' dtype.
TEST_P(PsaConv, Fp32ParametersWith16BitActivations) {
  for (auto dtype : {torch::kBFloat16, torch::kFloat16}) {
    SCOPED_TRACE(::testing::Message() << dtype << " seed " << seed_);
    auto x = torch::randn({2, 50, 9}, opts(dtype));
    auto w = leaf(torch::randn({9, 4}, opts(torch::kFloat32)));
    auto b = leaf(torch::randn({9}, opts(torch::kFloat32)));
    auto y = causal_depthwise_conv1d(x, w, b);
    EXPECT_EQ(y.scalar_type(), dtype);
    auto wd = f64_leaf(w), bd = f64_leaf(b);
    auto y_ref = conv_reference(x.to(torch::kCPU, torch::kDouble), wd, bd);
    EXPECT_LE(rel_l2(y, y_ref), tolerance(dtype));
    auto dy = torch::randn_like(y);
    y.backward(dy);
    y_ref.backward(dy.to(torch::kCPU, torch::kDouble));
    EXPECT_EQ(w.grad().scalar_type(), torch::kFloat32);
    EXPECT_LE(rel_l2(w.grad(), wd.grad()), 1e-5);
    EXPECT_LE(rel_l2(b.grad(), bd.grad()), 1e-5);
  }
}

TEST_P(PsaConv, NonContiguousInputs) {
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    SCOPED_TRACE(::testing::Message() << dtype << " seed " << seed_);
    auto x = torch::randn({3, 11, 45}, opts(dtype)).transpose(1, 2);  // [3, 45, 11], strided
    auto w = torch::randn({6, 11}, opts(dtype)).t();                  // [11, 6], strided
    auto b = torch::randn({22}, opts(dtype)).slice(0, 0, 22, 2);      // [11], stride 2
    ASSERT_FALSE(x.is_contiguous());
    ASSERT_FALSE(w.is_contiguous());
    ASSERT_FALSE(b.is_contiguous());
    check_against_reference(conv_fn(), conv_ref_fn(), {x, w, b}, {"x", "weight", "bias"}, tolerance(dtype));
  }
}

TEST_P(PsaConv, EmptyTensors) {
  for (const auto& s : std::vector<ConvShape>{{0, 5, 3, 2}, {2, 0, 3, 2}, {2, 5, 0, 2}}) {
    SCOPED_TRACE(::testing::Message() << "B " << s.B << " T " << s.T << " C " << s.C);
    auto x = leaf(torch::randn({s.B, s.T, s.C}, opts(torch::kFloat32)));
    auto w = leaf(torch::randn({s.C, s.K}, opts(torch::kFloat32)));
    auto b = leaf(torch::randn({s.C}, opts(torch::kFloat32)));
    auto y = causal_depthwise_conv1d(x, w, b);
    EXPECT_EQ(y.sizes(), x.sizes());
    y.sum().backward();
    EXPECT_EQ(x.grad().sizes(), x.sizes());
    EXPECT_TRUE(torch::equal(w.grad(), torch::zeros_like(w)));  // nothing to sum: exactly zero
    EXPECT_TRUE(torch::equal(b.grad(), torch::zeros_like(b)));
  }
}

// Changing x at t >= t' leaves y at t < t' bit-identical.
TEST_P(PsaConv, IsCausal) {
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    for (int64_t K : {1, 4, 20}) {
      SCOPED_TRACE(::testing::Message() << dtype << " K " << K << " seed " << seed_);
      const int64_t T = 300, cut = 123;
      auto x = torch::randn({2, T, 5}, opts(dtype));
      auto w = torch::randn({5, K}, opts(dtype));
      auto b = torch::randn({5}, opts(dtype));
      auto x2 = x.clone();
      x2.slice(1, cut) = torch::randn({2, T - cut, 5}, opts(dtype));
      auto y = causal_depthwise_conv1d(x, w, b), y2 = causal_depthwise_conv1d(x2, w, b);
      EXPECT_TRUE(test::bitwise_equal(y.slice(1, 0, cut), y2.slice(1, 0, cut)));
      EXPECT_FALSE(torch::equal(y.slice(1, cut), y2.slice(1, cut)));
    }
  }
}

TEST_P(PsaConv, FiniteDifferencesInFloat64) {
  for (int64_t K : {1, 3, 7}) {
    SCOPED_TRACE(::testing::Message() << "K " << K << " seed " << seed_);
    auto x = torch::randn({2, 5, 3}, opts(torch::kFloat64));
    auto w = torch::randn({3, K}, opts(torch::kFloat64));
    auto b = torch::randn({3}, opts(torch::kFloat64));
    check_finite_differences(conv_fn(), {x, w, b});
  }
}

TEST_P(PsaConv, BadInputErrorsNameTheArgument) {
  auto x = torch::randn({2, 7, 3}, opts(torch::kFloat32));
  auto w = torch::randn({3, 4}, opts(torch::kFloat32));
  using test::expect_error;
  expect_error([&] { causal_depthwise_conv1d(x[0], w); }, {"argument 'x' must be [B, T, C]", "got 2 dims"});
  expect_error([&] { causal_depthwise_conv1d(x, torch::randn({4, 4}, opts(torch::kFloat32))); },
               {"argument 'weight' must be [C, K] with C = 3", "[4, 4]"});
  expect_error([&] { causal_depthwise_conv1d(x, torch::randn({3, 0}, opts(torch::kFloat32))); },
               {"argument 'weight' must have K >= 1"});
  expect_error([&] { causal_depthwise_conv1d(x, w, torch::randn({4}, opts(torch::kFloat32))); },
               {"argument 'bias' must be [C] with C = 3", "[4]"});
  expect_error([&] { causal_depthwise_conv1d(x.to(torch::kInt), w); }, {"argument 'x' must be float32", "Int"});
  if (device().is_cuda())
    expect_error([&] { causal_depthwise_conv1d(x, w.cpu()); }, {"argument 'weight' must be on the device of 'x'"});
}

// ---- linear_scan ------------------------------------------------------------

Fn scan_fn() {
  return [](const std::vector<torch::Tensor>& in) { return linear_scan(in[0], in[1], in[2]); };
}
Fn scan_ref_fn() {
  return [](const std::vector<torch::Tensor>& in) { return scan_reference(in[0], in[1], in[2]); };
}

// Decays in [lo, 1).
torch::Tensor decays(at::IntArrayRef shape, torch::TensorOptions o, double lo) {
  return lo + (1 - lo) * torch::rand(shape, o);
}

struct ScanShape {
  int64_t B, T, C;
};
// T of 1, odd, across the GPU's 256-step chunks (and not a multiple of them).
const std::vector<ScanShape> kScanShapes = {{2, 37, 5}, {1, 1, 1}, {3, 300, 33}, {1, 700, 7}, {2, 256, 3}};

TEST_P(PsaScan, ForwardAndGradientsMatchFloat64) {
  for (auto dtype : kAllDtypes) {
    for (const auto& s : kScanShapes) {
      for (bool with_h0 : {true, false}) {
        SCOPED_TRACE(::testing::Message() << dtype << " B " << s.B << " T " << s.T << " C " << s.C << " h0 "
                                          << with_h0 << " seed " << seed_);
        auto a = decays({s.B, s.T, s.C}, opts(dtype), 0.5);
        auto x = torch::randn({s.B, s.T, s.C}, opts(dtype));
        auto h0 = with_h0 ? torch::randn({s.B, s.C}, opts(dtype)) : torch::Tensor();
        check_against_reference(scan_fn(), scan_ref_fn(), {a, x, h0}, {"a", "x", "h0"}, tolerance(dtype));
      }
    }
  }
}

// T = 5000 (many chunks) with decays within 1e-3 of 1, so the state sums ~1000
// steps: an fp32 state keeps bf16/fp16 results within one rounding of the
// float64 reference (a bf16 state would drift by orders of magnitude more).
TEST_P(PsaScan, LongSequenceWithSlowDecay) {
  for (auto dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
    SCOPED_TRACE(::testing::Message() << dtype << " seed " << seed_);
    const int64_t B = 2, T = 5000, C = 3;
    auto a = decays({B, T, C}, opts(dtype), 0.999);
    auto x = torch::randn({B, T, C}, opts(dtype)) * 0.05;
    auto h0 = torch::randn({B, C}, opts(dtype));
    check_against_reference(scan_fn(), scan_ref_fn(), {a, x, h0}, {"a", "x", "h0"},
                            dtype == torch::kFloat32 ? 1e-5 : tolerance(dtype));
  }
}

// h0 in fp32 (a summary state kept in fp32) with 16-bit a and x.
TEST_P(PsaScan, Fp32InitialStateWith16BitInputs) {
  auto a = decays({2, 40, 6}, opts(torch::kBFloat16), 0.8);
  auto x = torch::randn({2, 40, 6}, opts(torch::kBFloat16));
  auto h0 = leaf(torch::randn({2, 6}, opts(torch::kFloat32)) * 100);
  auto h = linear_scan(a, x, h0);
  EXPECT_EQ(h.scalar_type(), torch::kBFloat16);
  auto h0d = f64_leaf(h0);
  auto ref = scan_reference(a.to(torch::kCPU, torch::kDouble), x.to(torch::kCPU, torch::kDouble), h0d);
  EXPECT_LE(rel_l2(h, ref), tolerance(torch::kBFloat16));
  auto dh = torch::randn_like(h);
  h.backward(dh);
  ref.backward(dh.to(torch::kCPU, torch::kDouble));
  EXPECT_EQ(h0.grad().scalar_type(), torch::kFloat32);
  EXPECT_LE(rel_l2(h0.grad(), h0d.grad()), 1e-5);
}

TEST_P(PsaScan, NonContiguousInputs) {
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    SCOPED_TRACE(::testing::Message() << dtype << " seed " << seed_);
    auto a = decays({2, 9, 300}, opts(dtype), 0.5).transpose(1, 2);  // [2, 300, 9], strided
    auto x = torch::randn({9, 300, 2}, opts(dtype)).permute({2, 1, 0});
    auto h0 = torch::randn({9, 2}, opts(dtype)).t();
    ASSERT_FALSE(a.is_contiguous());
    ASSERT_FALSE(x.is_contiguous());
    ASSERT_FALSE(h0.is_contiguous());
    check_against_reference(scan_fn(), scan_ref_fn(), {a, x, h0}, {"a", "x", "h0"}, tolerance(dtype));
  }
}

TEST_P(PsaScan, EmptyTensors) {
  for (const auto& s : std::vector<ScanShape>{{0, 5, 3}, {2, 0, 3}, {2, 5, 0}}) {
    SCOPED_TRACE(::testing::Message() << "B " << s.B << " T " << s.T << " C " << s.C);
    auto a = leaf(torch::rand({s.B, s.T, s.C}, opts(torch::kFloat32)));
    auto x = leaf(torch::randn({s.B, s.T, s.C}, opts(torch::kFloat32)));
    auto h0 = leaf(torch::randn({s.B, s.C}, opts(torch::kFloat32)));
    auto h = linear_scan(a, x, h0);
    EXPECT_EQ(h.sizes(), x.sizes());
    h.sum().backward();
    EXPECT_EQ(a.grad().sizes(), a.sizes());
    EXPECT_EQ(x.grad().sizes(), x.sizes());
    EXPECT_TRUE(torch::equal(h0.grad(), torch::zeros_like(h0)));  // T = 0: h0 reaches no output
  }
}

TEST_P(PsaScan, IsCausal) {
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    SCOPED_TRACE(::testing::Message() << dtype << " seed " << seed_);
    const int64_t T = 700, cut = 300;  // the cut inside the GPU's second chunk
    auto a = decays({2, T, 5}, opts(dtype), 0.5);
    auto x = torch::randn({2, T, 5}, opts(dtype));
    auto a2 = a.clone(), x2 = x.clone();
    a2.slice(1, cut) = decays({2, T - cut, 5}, opts(dtype), 0.5);
    x2.slice(1, cut) = torch::randn({2, T - cut, 5}, opts(dtype));
    auto h = linear_scan(a, x), h2 = linear_scan(a2, x2);
    EXPECT_TRUE(test::bitwise_equal(h.slice(1, 0, cut), h2.slice(1, 0, cut)));
    EXPECT_FALSE(torch::equal(h.slice(1, cut), h2.slice(1, cut)));
  }
}

TEST_P(PsaScan, FiniteDifferencesInFloat64) {
  for (bool with_h0 : {true, false}) {
    SCOPED_TRACE(::testing::Message() << "h0 " << with_h0 << " seed " << seed_);
    auto a = torch::rand({2, 6, 3}, opts(torch::kFloat64)) * 2 - 1;  // any sign
    auto x = torch::randn({2, 6, 3}, opts(torch::kFloat64));
    auto h0 = with_h0 ? torch::randn({2, 3}, opts(torch::kFloat64)) : torch::Tensor();
    check_finite_differences(scan_fn(), {a, x, h0});
  }
}

TEST_P(PsaScan, BadInputErrorsNameTheArgument) {
  auto a = torch::rand({2, 7, 3}, opts(torch::kFloat32));
  auto x = torch::randn({2, 7, 3}, opts(torch::kFloat32));
  using test::expect_error;
  expect_error([&] { linear_scan(a[0], x[0]); }, {"argument 'x' must be [B, T, C]"});
  expect_error([&] { linear_scan(a.slice(1, 0, 5), x); }, {"argument 'a' must have the shape of 'x'", "[2, 5, 3]"});
  expect_error([&] { linear_scan(a.to(torch::kBFloat16), x); }, {"argument 'a' must have the dtype of 'x'"});
  expect_error([&] { linear_scan(a, x, torch::randn({2, 4}, opts(torch::kFloat32))); },
               {"argument 'h0' must be [B, C] = [2, 3]", "[2, 4]"});
  expect_error([&] { linear_scan(a, x.to(torch::kLong)); }, {"argument 'x' must be float32", "Long"});
  if (device().is_cuda()) expect_error([&] { linear_scan(a.cpu(), x); }, {"argument 'a' must be on the same device"});
}

// ---- gated_ema_scan ---------------------------------------------------------

// The float64 composition it fuses: b = z f; h = linear_scan(1 - b, b v, h0).
torch::Tensor gated_ema_reference(const std::vector<torch::Tensor>& in) {
  auto b = in[1].unsqueeze(-1) * in[2];
  return scan_reference(1 - b, b * in[0], in[3]);
}
Fn gated_ema_fn() {
  return [](const std::vector<torch::Tensor>& in) { return std::get<0>(gated_ema_scan(in[0], in[1], in[2], in[3])); };
}

// C a multiple of 32 runs the fused CUDA kernels (C = 32, 64, 96); C = 5 and 33
// the composition. T across the 256-step chunks; z and rate in [0, 1).
const std::vector<ScanShape> kGatedShapes = {{2, 37, 64}, {1, 1, 32}, {3, 300, 32}, {1, 700, 96}, {2, 37, 5},
                                             {1, 260, 33}};

TEST_P(PsaScan, GatedEmaForwardAndGradientsMatchFloat64) {
  for (auto dtype : kAllDtypes) {
    for (const auto& s : kGatedShapes) {
      for (bool with_h0 : {true, false}) {
        SCOPED_TRACE(::testing::Message() << dtype << " B " << s.B << " T " << s.T << " C " << s.C << " h0 "
                                          << with_h0 << " seed " << seed_);
        auto v = torch::randn({s.B, s.T, s.C}, opts(dtype));
        auto z = torch::rand({s.B, s.T}, opts(dtype));
        auto rate = torch::rand({s.C}, opts(dtype)) * 0.5;
        auto h0 = with_h0 ? torch::randn({s.B, s.C}, opts(dtype)) : torch::Tensor();
        check_against_reference(gated_ema_fn(), gated_ema_reference, {v, z, rate, h0}, {"v", "z", "rate", "h0"},
                                tolerance(dtype));
      }
    }
  }
}

// The summary register's use: 16-bit v with an fp32 gate, rate and state, over
// T = 3000 (12 chunks) with rates near 1e-3 (the state sums ~1000 steps).
TEST_P(PsaScan, GatedEmaLongSequenceFp32StateWith16BitValues) {
  for (auto dtype : {torch::kBFloat16, torch::kFloat16}) {
    SCOPED_TRACE(::testing::Message() << dtype << " seed " << seed_);
    const int64_t B = 2, T = 3000, C = 64;
    auto v = torch::randn({B, T, C}, opts(dtype));
    auto z = torch::rand({B, T}, opts(torch::kFloat32));
    auto rate = torch::rand({C}, opts(torch::kFloat32)) * 2e-3;
    auto h0 = torch::randn({B, C}, opts(torch::kFloat32));
    check_against_reference(gated_ema_fn(), gated_ema_reference, {v, z, rate, h0}, {"v", "z", "rate", "h0"},
                            tolerance(dtype));
  }
}

// The fused kernels (CUDA, C % 32 == 0) round as the composition does: h and
// the fp32 `last` bit for bit equal to linear_scan(1 - z f, z f v, h0), whose
// last step `last` is; gradients within fp32 summation order of it.
// (On the CPU the op is that composition, so there the case checks `last`,
// the dtypes and the plumbing only.)
TEST_P(PsaScan, GatedEmaEqualsItsCompositionBitwise) {
  for (auto dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
    for (int64_t T : {1, 255, 700}) {
      SCOPED_TRACE(::testing::Message() << dtype << " T " << T << " seed " << seed_);
      const int64_t B = 2, C = 64;
      auto v = leaf(torch::randn({B, T, C}, opts(dtype)));
      auto z = leaf(torch::rand({B, T}, opts(torch::kFloat32)));
      auto rate = leaf(torch::rand({C}, opts(torch::kFloat32)));
      auto h0 = leaf(torch::randn({B, C}, opts(torch::kFloat32)));
      auto [h, last] = gated_ema_scan(v, z, rate, h0);
      EXPECT_EQ(h.scalar_type(), dtype);
      EXPECT_EQ(last.scalar_type(), torch::kFloat32);
      EXPECT_FALSE(last.requires_grad());
      auto v2 = leaf(v), z2 = leaf(z), rate2 = leaf(rate), h02 = leaf(h0);
      auto b = z2.unsqueeze(-1) * rate2;
      auto h_fp32 = linear_scan(1 - b, b * v2, h02);
      auto h_ref = h_fp32.to(dtype);
      EXPECT_TRUE(test::bitwise_equal(h, h_ref));
      EXPECT_TRUE(test::bitwise_equal(last, h_fp32.select(1, T - 1).detach()));
      auto dh = torch::randn_like(h);
      h.backward(dh);
      h_ref.backward(dh);
      const double tol = dtype == torch::kFloat32 ? 1e-6 : test::unit_roundoff(dtype);
      EXPECT_LE(rel_l2(v.grad(), v2.grad()), tol) << "dv";
      EXPECT_LE(rel_l2(z.grad(), z2.grad()), 1e-5) << "dz";
      EXPECT_LE(rel_l2(rate.grad(), rate2.grad()), 1e-5) << "drate";
      EXPECT_LE(rel_l2(h0.grad(), h02.grad()), 1e-6) << "dh0";
    }
  }
}

TEST_P(PsaScan, GatedEmaEmptyTensors) {
  for (const auto& s : std::vector<ScanShape>{{0, 5, 32}, {2, 0, 32}, {2, 0, 5}, {2, 5, 0}}) {
    SCOPED_TRACE(::testing::Message() << "B " << s.B << " T " << s.T << " C " << s.C);
    auto v = leaf(torch::randn({s.B, s.T, s.C}, opts(torch::kFloat32)));
    auto z = leaf(torch::rand({s.B, s.T}, opts(torch::kFloat32)));
    auto rate = leaf(torch::rand({s.C}, opts(torch::kFloat32)));
    auto h0 = leaf(torch::randn({s.B, s.C}, opts(torch::kFloat32)));
    auto [h, last] = gated_ema_scan(v, z, rate, h0);
    EXPECT_EQ(h.sizes(), v.sizes());
    EXPECT_EQ(last.sizes(), h0.sizes());
    if (s.T == 0) EXPECT_TRUE(torch::equal(last, h0.detach()));  // no step: the state stays h0
    h.sum().backward();
    EXPECT_EQ(v.grad().sizes(), v.sizes());
    EXPECT_EQ(z.grad().sizes(), z.sizes());
    EXPECT_TRUE(torch::equal(rate.grad(), torch::zeros_like(rate)));
    EXPECT_TRUE(torch::equal(h0.grad(), torch::zeros_like(h0)));
  }
}

TEST_P(PsaScan, GatedEmaBadInputErrorsNameTheArgument) {
  auto v = torch::randn({2, 7, 32}, opts(torch::kFloat32));
  auto z = torch::rand({2, 7}, opts(torch::kFloat32));
  auto rate = torch::rand({32}, opts(torch::kFloat32));
  using test::expect_error;
  expect_error([&] { gated_ema_scan(v[0], z, rate); }, {"argument 'v' must be [B, T, C]"});
  expect_error([&] { gated_ema_scan(v, z.slice(1, 0, 5), rate); }, {"argument 'z' must be [B, T] = [2, 7]", "[2, 5]"});
  expect_error([&] { gated_ema_scan(v, z, rate.slice(0, 0, 8)); }, {"argument 'rate' must be [C] = [32]", "[8]"});
  expect_error([&] { gated_ema_scan(v, z, rate, torch::randn({2, 4}, opts(torch::kFloat32))); },
               {"argument 'h0' must be [B, C] = [2, 32]", "[2, 4]"});
  expect_error([&] { gated_ema_scan(v.to(torch::kInt), z, rate); }, {"argument 'v' must be float", "Int"});
  if (device().is_cuda())
    expect_error([&] { gated_ema_scan(v, z.cpu(), rate); }, {"argument 'z' must be on the device of 'v'"});
}

// ---- psa_combine --------------------------------------------------------------

// The float64 formula: in = {sig, gate, win, local, lambda_local, summary, lambda_summary}.
torch::Tensor combine_reference(const std::vector<torch::Tensor>& in) {
  const auto& sig = in[0];
  const int64_t B = sig.size(0), H = sig.size(1), T = sig.size(2), D = sig.size(3);
  auto expand = [&](const torch::Tensor& t) {
    const int64_t Hx = t.size(2) / D;
    return t.view({B, T, Hx, 1, D}).expand({B, T, Hx, H / Hx, D}).reshape({B, T, H * D});
  };
  auto heads = sig * in[1].view({B, 1, T, 1});
  if (in[2].defined()) heads = heads + in[2];
  return heads.transpose(1, 2).reshape({B, T, H * D}) + in[4] * expand(in[3]) + in[6] * expand(in[5]);
}
Fn combine_fn() {
  return [](const std::vector<torch::Tensor>& in) { return psa_combine(in[0], in[1], in[2], in[3], in[4], in[5], in[6]); };
}

struct CombineShape {
  int64_t B, H, T, D, local_heads, summary_heads;
};
// H * D = 256 and D % 8 == 0 run the CUDA kernels (one local head per query
// head; local heads serving 4 query heads each; rows across blocks of 64);
// D = 12 and H * D = 96 run the composition.
const std::vector<CombineShape> kCombineShapes = {
    {2, 4, 37, 64, 4, 4}, {1, 8, 130, 32, 2, 8}, {1, 16, 3, 16, 16, 1}, {2, 3, 5, 12, 3, 1}, {1, 6, 9, 16, 2, 3}};

// sig and win in the layouts the layer hands over: transposed views of a
// token-major [B, T, H, D] tensor and of a narrowed [B, T, H, D + 8] one.
std::vector<torch::Tensor> combine_inputs(const CombineShape& s, torch::ScalarType dtype, torch::TensorOptions o,
                                          bool with_win) {
  const int64_t C = s.H * s.D;
  auto sig = torch::randn({s.B, s.T, s.H, s.D}, o.dtype(dtype)).transpose(1, 2);
  auto win = with_win ? torch::randn({s.B, s.T, s.H, s.D + 8}, o.dtype(dtype)).narrow(-1, 0, s.D).transpose(1, 2)
                      : torch::Tensor();
  // The gate and lambda_local in fp32 (as the layer keeps its gates; fp64
  // with fp64 data), lambda_summary in the data's dtype.
  const auto gate_dtype = dtype == torch::kFloat64 ? dtype : torch::kFloat32;
  auto gate = torch::rand({s.B, s.T}, o.dtype(gate_dtype));
  auto local = torch::randn({s.B, s.T, s.local_heads * s.D}, o.dtype(dtype));
  auto summary = torch::randn({s.B, s.T, s.summary_heads * s.D}, o.dtype(dtype));
  auto lam_l = torch::randn({C}, o.dtype(gate_dtype)), lam_s = torch::randn({C}, o.dtype(dtype));
  return {sig, gate, win, local, lam_l, summary, lam_s};
}

TEST_P(PsaCombine, ForwardAndGradientsMatchFloat64) {
  for (auto dtype : kAllDtypes) {
    for (const auto& s : kCombineShapes) {
      for (bool with_win : {true, false}) {
        SCOPED_TRACE(::testing::Message() << dtype << " B " << s.B << " H " << s.H << " T " << s.T << " D " << s.D
                                          << " local heads " << s.local_heads << " summary heads "
                                          << s.summary_heads << " win " << with_win << " seed " << seed_);
        auto in = combine_inputs(s, dtype, opts(dtype), with_win);
        ASSERT_FALSE(in[0].is_contiguous());
        // Fused: one rounding of an fp32 sum; the composition (and a group's
        // local gradient, summed after rounding) about three.
        const double tol = dtype == torch::kFloat64   ? 1e-12
                           : dtype == torch::kFloat32 ? 1e-5
                                                      : 4 * test::unit_roundoff(dtype) + 1e-5;
        check_against_reference(combine_fn(), combine_reference, in,
                                {"sig", "gate", "win", "local", "lambda_local", "summary", "lambda_summary"}, tol);
      }
    }
  }
}

// A read without its lambda comes scaled: the same output and gradients as
// with a lambda of ones, bit for bit (the kernels add it as it is and hand dy
// on as its gradient without writing one; the composition multiplies by
// nothing), and no gradient for the absent lambda.
TEST_P(PsaCombine, ReadsWithoutLambdaAreTakenAsScaled) {
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    for (const auto& s : kCombineShapes) {
      SCOPED_TRACE(::testing::Message() << dtype << " H " << s.H << " D " << s.D << " local heads " << s.local_heads
                                        << " summary heads " << s.summary_heads << " seed " << seed_);
      auto in = combine_inputs(s, dtype, opts(dtype), /*with_win=*/true);
      const auto ones_l = torch::ones_like(in[4]), ones_s = torch::ones_like(in[6]);
      std::vector<torch::Tensor> a, b;
      for (const auto& t : in) {
        a.push_back(t.detach().clone().requires_grad_(true));
        b.push_back(t.detach().clone().requires_grad_(true));
      }
      const auto ya = psa_combine(a[0], a[1], a[2], a[3], ones_l, a[5], torch::Tensor());
      const auto yb = psa_combine(b[0], b[1], b[2], b[3], torch::Tensor(), b[5], ones_s);
      const auto yr = psa_combine(in[0], in[1], in[2], in[3], ones_l, in[5], ones_s);
      EXPECT_TRUE(torch::equal(ya, yr));
      EXPECT_TRUE(torch::equal(yb, yr));
      const auto w = torch::randn_like(yr);
      (ya * w).sum().backward();
      (yb * w).sum().backward();
      std::vector<torch::Tensor> r;
      for (const auto& t : in) r.push_back(t.detach().clone().requires_grad_(true));
      (psa_combine(r[0], r[1], r[2], r[3], ones_l, r[5], ones_s) * w).sum().backward();
      for (int i : {0, 1, 2, 3, 5}) {
        ASSERT_TRUE(a[i].grad().defined() && b[i].grad().defined()) << i;
        EXPECT_TRUE(torch::equal(a[i].grad(), r[i].grad())) << "input " << i;
        EXPECT_TRUE(torch::equal(b[i].grad(), r[i].grad())) << "input " << i;
      }
    }
  }
}

// psa_combine_packed reads the signal rows through the token -> packed row
// index (the layer's packed attention output, right-padded per batch row):
// against combine_reference in float64 on rows unpacked by plain indexing,
// gradients included (tolerances as ForwardAndGradientsMatchFloat64's); the
// packed sig's gradient is zero on padding rows that no token reads. CUDA
// runs the kernels' packed mode, the CPU the gather_rows + psa_combine
// composition.
TEST_P(PsaCombine, PackedSignalRowsEqualTheUnpackedRead) {
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    for (bool with_win : {true, false}) {
      SCOPED_TRACE(::testing::Message() << dtype << " win " << with_win << " seed " << seed_);
      const CombineShape s{2, 4, 37, 64, 2, 4};
      const int64_t B = s.B, T = s.T, H = s.H, D = s.D, C = H * D;
      const auto in = combine_inputs(s, dtype, opts(dtype), with_win);
      const auto signal = torch::rand({B, T}) < 0.4;
      const int64_t S = signal.sum(1).max().item<int64_t>() + 1;  // at least one padding row per batch row
      std::vector<int64_t> rows(size_t(B * T), -1), pack(size_t(B * S), -1);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0, n = 0; t < T; ++t)
          if (signal[b][t].item<bool>()) {
            rows[size_t(b * T + t)] = b * S + n;
            pack[size_t(b * S + n)] = b * T + t;
            ++n;
          }
      const auto sig_rows = torch::tensor(rows, opts(torch::kLong)), pack_rows = torch::tensor(pack, opts(torch::kLong));
      const auto sig = torch::randn({B * S, H, D}, opts(dtype));
      std::vector<torch::Tensor> a, r;
      for (const auto& t : std::vector<torch::Tensor>{sig, in[1], in[2], in[3], in[4], in[5], in[6]}) {
        a.push_back(leaf(t));
        r.push_back(f64_leaf(t));
      }
      const auto y = psa_combine_packed(a[0], sig_rows, pack_rows, a[1], a[2], a[3], a[4], a[5], a[6]);
      const auto rows_cpu = sig_rows.cpu();
      const auto unpacked = torch::where((rows_cpu >= 0).unsqueeze(1),
                                         r[0].view({B * S, C}).index_select(0, rows_cpu.clamp_min(0)), 0.0)
                                .view({B, T, H, D})
                                .transpose(1, 2);
      const auto y_ref = combine_reference({unpacked, r[1], r[2], r[3], r[4], r[5], r[6]});
      const double tol = dtype == torch::kFloat32 ? 1e-5 : 4 * test::unit_roundoff(dtype) + 1e-5;
      EXPECT_LE(rel_l2(y, y_ref), tol) << "output";
      const auto dy = torch::randn_like(y);
      y.backward(dy);
      y_ref.backward(dy.to(torch::kCPU, torch::kDouble));
      const char* names[] = {"sig", "gate", "win", "local", "lambda_local", "summary", "lambda_summary"};
      for (size_t i = 0; i < a.size(); ++i) {
        if (!a[i].defined()) continue;
        ASSERT_TRUE(a[i].grad().defined()) << names[i];
        EXPECT_LE(rel_l2(a[i].grad(), r[i].grad()), tol) << "gradient of " << names[i];
      }
      const auto padding = (pack_rows < 0).nonzero().squeeze(1);
      EXPECT_TRUE(torch::equal(a[0].grad().index_select(0, padding), torch::zeros({padding.size(0), H, D}, opts(dtype))));
    }
  }
  const auto g = torch::rand({1, 4}, opts(torch::kFloat32));
  const auto x = torch::randn({1, 4, 256}, opts(torch::kFloat32));
  const auto lam = torch::zeros({256}, opts(torch::kFloat32));
  test::expect_error([&] { psa_combine_packed(torch::randn({2, 4, 64}, opts(torch::kFloat32)), torch::zeros({3}, opts(torch::kLong)),
                                              torch::zeros({2}, opts(torch::kLong)), g, {}, x, lam, x, lam); },
                     {"argument 'sig_rows' must be a 1-dim int64 tensor of B * T = 4 entries"});
}

// The signal attention hands sig over token-major; its gradient must come back
// in that layout (not transposed), so nothing downstream copies it.
TEST_P(PsaCombine, SigGradientKeepsSigLayout) {
  const CombineShape s{2, 4, 37, 64, 4, 4};
  auto in = combine_inputs(s, torch::kBFloat16, opts(torch::kBFloat16), true);
  std::vector<torch::Tensor> leaves;
  for (const auto& t : in) leaves.push_back(leaf(t));
  combine_fn()(leaves).backward(torch::randn({s.B, s.T, s.H * s.D}, opts(torch::kBFloat16)));
  EXPECT_EQ(leaves[0].grad().strides(), in[0].strides());
}

// The layer hands the gate over as gates[..., signal] (a stride-4 view); the
// kernels index it and the lambdas densely, so strided ones must give what
// their contiguous copies give, bit for bit, gradients included.
TEST_P(PsaCombine, StridedGateAndLambdas) {
  const CombineShape s{2, 4, 37, 64, 4, 4};
  const int64_t C = s.H * s.D;
  auto in = combine_inputs(s, torch::kBFloat16, opts(torch::kBFloat16), true);
  auto strided = in;
  strided[1] = torch::rand({s.B, s.T, 4}, opts(torch::kFloat32)).select(-1, 3);
  strided[4] = torch::randn({2 * C}, opts(torch::kFloat32)).slice(0, 0, 2 * C, 2);
  ASSERT_FALSE(strided[1].is_contiguous());
  ASSERT_FALSE(strided[4].is_contiguous());
  auto dense = strided;
  dense[1] = strided[1].contiguous();
  dense[4] = strided[4].contiguous();
  const auto dy = torch::randn({s.B, s.T, C}, opts(torch::kBFloat16));
  std::vector<torch::Tensor> grads[2];
  torch::Tensor out[2];
  for (int k = 0; k < 2; ++k) {
    std::vector<torch::Tensor> leaves;
    for (const auto& t : k == 0 ? strided : dense) leaves.push_back(leaf(t));
    out[k] = combine_fn()(leaves);
    out[k].backward(dy);
    for (const auto& l : leaves) grads[k].push_back(grad_of(l));
  }
  EXPECT_TRUE(test::bitwise_equal(out[0], out[1]));
  for (size_t i = 0; i < grads[0].size(); ++i)
    if (grads[0][i].defined()) EXPECT_TRUE(torch::equal(grads[0][i], grads[1][i])) << "gradient " << i;
}

TEST_P(PsaCombine, EmptyAndErrors) {
  {
    auto in = combine_inputs({2, 4, 0, 64, 4, 4}, torch::kFloat32, opts(torch::kFloat32), true);
    std::vector<torch::Tensor> leaves;
    for (const auto& t : in) leaves.push_back(leaf(t));
    auto y = combine_fn()(leaves);
    EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 0, 256}));
    y.sum().backward();
    EXPECT_TRUE(torch::equal(leaves[4].grad(), torch::zeros_like(in[4])));
    EXPECT_EQ(leaves[0].grad().sizes(), in[0].sizes());
  }
  auto in = combine_inputs({2, 4, 7, 64, 4, 4}, torch::kFloat32, opts(torch::kFloat32), true);
  auto call = [&](int i, const torch::Tensor& t) {
    auto args = in;
    args[i] = t;
    return combine_fn()(args);
  };
  using test::expect_error;
  expect_error([&] { call(0, in[0][0]); }, {"argument 'sig' must be [B, H, T, D]"});
  expect_error([&] { call(1, in[1].slice(1, 0, 3)); }, {"argument 'gate' must be [B, T] = [2, 7]", "[2, 3]"});
  expect_error([&] { call(2, in[2].slice(2, 0, 3)); }, {"argument 'win' must be [B, H, T, D] = ["});
  expect_error([&] { call(3, in[3].slice(2, 0, 96)); }, {"argument 'local' must be [B, T, Hx * D]", "dividing H = 4"});
  expect_error([&] { call(5, in[5].to(torch::kBFloat16)); }, {"argument 'summary' must have the device and dtype"});
  expect_error([&] { call(4, in[4].slice(0, 0, 8)); }, {"argument 'lambda_local' must be [H * D] = [256]", "[8]"});
  expect_error([&] { call(6, in[6].to(torch::kInt)); }, {"argument 'lambda_summary' must be float"});
  if (device().is_cuda()) expect_error([&] { call(1, in[1].cpu()); }, {"argument 'gate' must be on the device of 'sig'"});
}

// ---- gather_rows ------------------------------------------------------------------

// A random injective map of M output rows onto N source rows (about a third of
// the outputs out of range: -1 or N + 3) and its inverse (-1 for unread rows).
std::pair<torch::Tensor, torch::Tensor> random_rows(int64_t M, int64_t N) {
  auto index = torch::full({M}, -1, torch::kLong), inverse = torch::full({N}, -1, torch::kLong);
  const auto perm = torch::randperm(N, torch::kLong);
  for (int64_t m = 0, used = 0; m < M; ++m) {
    if (used < N && torch::rand({1}).item<double>() < 0.67) {
      const int64_t n = perm[used++].item<int64_t>();
      index[m] = n;
      inverse[n] = m;
    } else if (m % 2) {
      index[m] = N + 3;
    }
  }
  return {index, inverse};
}

// What gather_rows computes, in ATen: index_select of the in-range rows, zeros elsewhere.
torch::Tensor gather_rows_reference(const torch::Tensor& src, const torch::Tensor& index) {
  const auto valid = (index >= 0).logical_and(index < src.size(0));
  const auto rows = src.index_select(0, torch::where(valid, index, 0).to(src.device()));
  return torch::where(valid.to(src.device()).unsqueeze(1), rows, torch::zeros_like(rows));
}

TEST_P(GatherRows, ForwardEqualsIndexSelectInEveryDtypeAndLayout) {
  for (auto dtype : {torch::kFloat64, torch::kFloat32, torch::kFloat16, torch::kBFloat16, torch::kInt64}) {
    // Row sizes of 1, 3 and 5 elements take the narrow copies (4, 6, 10 bytes),
    // 256 a 16-byte vector; 1000 rows exceed one CUDA block's 256 at C = 1.
    for (auto [M, N, C] : std::vector<std::array<int64_t, 3>>{{7, 5, 3}, {1000, 900, 1}, {33, 40, 256}, {9, 9, 5}}) {
      SCOPED_TRACE(::testing::Message() << dtype << " M " << M << " N " << N << " C " << C << " seed " << seed_);
      const auto [index, inverse] = random_rows(M, N);
      auto base = torch::randn({N, C + 2}, opts(torch::kFloat64)).mul(100).to(dtype);
      // Contiguous rows; rows of a wider tensor (a row stride of C + 2); a
      // non-unit column stride (copied first).
      for (const auto& src : {base.narrow(1, 0, C).contiguous(), base.narrow(1, 1, C),
                              base.t().contiguous().t().narrow(1, 0, C)}) {
        auto out = gather_rows(src, index.to(device()), inverse.to(device()));
        ASSERT_EQ(out.sizes(), (std::vector<int64_t>{M, C}));
        ASSERT_EQ(out.scalar_type(), dtype);
        EXPECT_TRUE(torch::equal(out.cpu(), gather_rows_reference(src.cpu(), index)));
      }
    }
  }
}

TEST_P(GatherRows, BackwardIsTheAdjointInFloat64) {
  for (auto dtype : kAllDtypes) {
    const int64_t M = 45, N = 38, C = 24;
    SCOPED_TRACE(::testing::Message() << dtype << " seed " << seed_);
    const auto [index, inverse] = random_rows(M, N);
    const auto idx = index.to(device()), inv = inverse.to(device());
    check_against_reference(
        [&](const std::vector<torch::Tensor>& in) { return gather_rows(in[0], idx, inv); },
        [&](const std::vector<torch::Tensor>& in) { return gather_rows_reference(in[0], index); },
        {torch::randn({N, C}, opts(dtype))}, {"src"}, dtype == torch::kFloat64 ? 1e-15 : test::unit_roundoff(dtype));
  }
  // The round trip: pack then unpack returns the read rows and zeros elsewhere.
  const auto [index, inverse] = random_rows(20, 30);
  auto src = torch::randn({30, 8}, opts(torch::kFloat32));
  auto back = gather_rows(gather_rows(src, index.to(device()), inverse.to(device())), inverse.to(device()),
                          index.to(device()));
  EXPECT_TRUE(torch::equal(back.cpu(), src.cpu() * (inverse >= 0).unsqueeze(1).to(torch::kFloat32)));
}

TEST_P(GatherRows, FiniteDifferencesInFloat64) {
  const auto [index, inverse] = random_rows(6, 5);
  const auto idx = index.to(device()), inv = inverse.to(device());
  check_finite_differences([&](const std::vector<torch::Tensor>& in) { return gather_rows(in[0], idx, inv); },
                           {torch::randn({5, 3}, opts(torch::kFloat64))});
}

TEST_P(GatherRows, EmptyTensors) {
  auto none = torch::empty({0}, opts(torch::kLong));
  auto src = torch::randn({4, 6}, opts(torch::kFloat32)).requires_grad_(true);
  auto out = gather_rows(src, none, torch::full({4}, -1, opts(torch::kLong)));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{0, 6}));
  out.sum().backward();
  EXPECT_TRUE(torch::equal(src.grad().cpu(), torch::zeros({4, 6})));
  auto from_empty = gather_rows(torch::empty({0, 6}, opts(torch::kFloat32)), torch::full({3}, -1, opts(torch::kLong)), none);
  EXPECT_TRUE(torch::equal(from_empty.cpu(), torch::zeros({3, 6})));
  EXPECT_EQ(gather_rows(torch::empty({4, 0}, opts(torch::kFloat32)), torch::zeros({2}, opts(torch::kLong)),
                        torch::full({4}, -1, opts(torch::kLong)))
                .sizes(),
            (std::vector<int64_t>{2, 0}));
}

TEST_P(GatherRows, BadInputErrorsNameTheArgument) {
  using test::expect_error;
  auto src = torch::randn({4, 6}, opts(torch::kFloat32));
  auto index = torch::zeros({3}, opts(torch::kLong)), inverse = torch::full({4}, -1, opts(torch::kLong));
  expect_error([&] { gather_rows(src[0], index, inverse); }, {"argument 'src' must be [N, C] (2 dims)", "[6]"});
  expect_error([&] { gather_rows(src, index.to(torch::kInt), inverse); }, {"argument 'index' must be a 1-dim int64"});
  expect_error([&] { gather_rows(src, index.view({3, 1}), inverse); }, {"argument 'index' must be a 1-dim int64", "got a 2-dim Long"});
  expect_error([&] { gather_rows(src, index, inverse.narrow(0, 0, 3)); },
               {"argument 'inverse' must have one entry per row of 'src' (4), got 3"});
  if (device().is_cuda())
    expect_error([&] { gather_rows(src, index.cpu(), inverse); }, {"argument 'index' must be on the device of 'src'"});
}

// ---- pad_head_dim --------------------------------------------------------------

torch::Tensor pad_reference(const torch::Tensor& x, int64_t pad, const torch::Tensor& first) {
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2);
  auto extra = torch::zeros({B, T, H, pad}, x.options());
  std::vector<torch::Tensor> cols{x};
  if (first.defined()) {
    cols.push_back(first.to(x.scalar_type()).view({B, T, 1, 1}).expand({B, T, H, 1}));
    extra = extra.narrow(-1, 0, pad - 1);
  }
  cols.push_back(extra);
  return torch::cat(cols, -1);
}

TEST_P(PadHeadDim, EqualsZerosAndCatWithGradients) {
  for (auto dtype : kAllDtypes) {
    // D = 64 and pad 8 run the CUDA kernel in 16-bit (16-byte rows and pad);
    // fp32 pad 8 too (32 bytes); D = 12 and pad 3 run the composition.
    for (auto [B, T, H, D, pad] : std::vector<std::array<int64_t, 5>>{{2, 37, 4, 64, 8}, {1, 5, 3, 12, 3}, {1, 1, 2, 8, 8}}) {
      for (bool with_first : {true, false}) {
        SCOPED_TRACE(::testing::Message() << dtype << " B " << B << " T " << T << " H " << H << " D " << D << " pad "
                                          << pad << " first " << with_first << " seed " << seed_);
        // x a [B, T, H, D] view of a wider tensor (head stride D + 8).
        auto x = torch::randn({B, T, H, D + 8}, opts(dtype)).narrow(-1, 0, D);
        const auto first_dtype = dtype == torch::kFloat64 ? dtype : torch::kFloat32;
        auto first = with_first ? torch::randn({B, T}, opts(first_dtype)) * 300 : torch::Tensor();
        auto fn = [&](const std::vector<torch::Tensor>& in) { return pad_head_dim(in[0], pad, in[1]); };
        auto ref = [&](const std::vector<torch::Tensor>& in) { return pad_reference(in[0], pad, in[1]); };
        // Exact: a copy, and first rounded once to x's dtype; its gradient is a
        // sum over H heads (the reference sums in fp64).
        check_against_reference(fn, ref, {x, first}, {"x", "first"},
                                dtype == torch::kFloat64 ? 1e-15 : 2 * test::unit_roundoff(dtype));
        auto y = pad_head_dim(x, pad, first);
        EXPECT_TRUE(torch::equal(y.cpu(), pad_reference(x, pad, first).cpu()));
      }
    }
  }
}

TEST_P(PadHeadDim, EmptyAndErrors) {
  auto x = torch::randn({2, 0, 4, 64}, opts(torch::kBFloat16));
  EXPECT_EQ(pad_head_dim(x, 8, torch::zeros({2, 0}, opts(torch::kFloat32))).sizes(),
            (std::vector<int64_t>{2, 0, 4, 72}));
  using test::expect_error;
  auto y = torch::randn({2, 3, 4, 64}, opts(torch::kBFloat16));
  expect_error([&] { pad_head_dim(y[0], 8); }, {"argument 'x' must be [B, T, H, D] (4 dims)"});
  expect_error([&] { pad_head_dim(y, 0); }, {"argument 'pad' must be >= 1, got 0"});
  expect_error([&] { pad_head_dim(y, 8, torch::zeros({2, 4}, opts(torch::kFloat32))); },
               {"argument 'first' must be [B, T] = [2, 3]", "[2, 4]"});
  expect_error([&] { pad_head_dim(y.to(torch::kInt), 8); }, {"argument 'x' must be float"});
}

TEST_P(PadHeadDim, UnpadIsAViewWithAZeroPaddedGradient) {
  for (auto dtype : kAllDtypes) {
    for (auto [D, pad] : std::vector<std::array<int64_t, 2>>{{64, 8}, {12, 3}}) {
      SCOPED_TRACE(::testing::Message() << dtype << " D " << D << " pad " << pad);
      auto x = torch::randn({2, 9, 3, D + pad}, opts(dtype)).requires_grad_(true);
      auto y = unpad_head_dim(x, pad);
      EXPECT_TRUE(torch::equal(y, x.narrow(-1, 0, D)));
      EXPECT_EQ(y.data_ptr(), x.data_ptr());
      // The gradient as it arrives from psa_combine: a transposed view.
      auto dy = torch::randn({2, 3, 9, D}, opts(dtype)).transpose(1, 2);
      y.backward(dy);
      EXPECT_TRUE(torch::equal(x.grad().narrow(-1, 0, D), dy));
      EXPECT_TRUE(torch::equal(x.grad().narrow(-1, D, pad), torch::zeros({2, 9, 3, pad}, opts(dtype))));
    }
  }
  using test::expect_error;
  auto x = torch::randn({2, 3, 4, 72}, opts(torch::kBFloat16));
  expect_error([&] { unpad_head_dim(x, 72); }, {"argument 'pad' must be in [1, 72), got 72"});
  expect_error([&] { unpad_head_dim(x[0], 8); }, {"argument 'x' must be [B, T, H, D + pad] (4 dims)"});
}

// add_rows_dot_: dst[index[m]] += src[m] at distinct in-range indices,
// others skipped, each sum rounded once, and dot[n] += sum_c src[m, c]
// other[n, c] at the added rows only (the CUDA kernel for 16-byte rows,
// ATen's index_add_ for the odd width and elsewhere), against float64.
TEST_P(GatherRows, AddRowsAddsAtDistinctIndicesAndSkipsOutOfRange) {
  for (auto dtype : {torch::kFloat32, torch::kFloat16, torch::kBFloat16}) {
    for (int64_t C : {2048, 24, 5}) {
      SCOPED_TRACE(::testing::Message() << dtype << " C " << C << " seed " << seed_);
      const int64_t N = 300, M = 77;
      auto dst = torch::randn({N, C}, opts(dtype));
      // Distinct rows, with -1 and N (out of range) among them.
      auto index = torch::randperm(N, opts(torch::kLong)).narrow(0, 0, M).clone();
      index.index_put_({3}, -1);
      index.index_put_({40}, N);
      // src and other as views with wider row strides; dot starts nonzero (it accumulates).
      auto src = torch::randn({M, C + 8}, opts(dtype)).narrow(1, 0, C);
      auto other = torch::randn({N, C + 16}, opts(dtype)).narrow(1, 8, C);
      if (C % 8 != 0) src = src.contiguous(), other = other.contiguous();
      const auto dot0 = torch::randn({N}, opts(torch::kFloat32));
      auto want_d = dst.to(torch::kCPU, torch::kDouble).clone();
      auto want_dot = dot0.to(torch::kCPU, torch::kDouble).clone();
      const auto idx = index.cpu(), sd = src.to(torch::kCPU, torch::kDouble);
      const auto od = other.to(torch::kCPU, torch::kDouble);
      auto touched = torch::zeros({N}, torch::kBool);
      for (int64_t m = 0; m < M; ++m) {
        const int64_t n = idx[m].item<int64_t>();
        if (n < 0 || n >= N) continue;
        want_d[n] += sd[m];
        want_dot[n] += (sd[m] * od[n]).sum();
        touched[n] = true;
      }
      auto got = dst.clone();
      auto dot = dot0.clone();
      add_rows_dot_(got, index, src, other, dot);
      EXPECT_LE(rel_l2(got, want_d), test::unit_roundoff(dtype)) << "rounded once";
      // The products of 16-bit values are exact in fp32; the sums' order is the kernel's.
      EXPECT_LE(rel_l2(dot, want_dot), 1e-5) << "dot";
      // Rows no index names are untouched, in dst and in dot.
      const auto untouched = touched.logical_not().nonzero().squeeze(1);
      EXPECT_TRUE(torch::equal(got.cpu().index_select(0, untouched), dst.cpu().index_select(0, untouched)));
      EXPECT_TRUE(torch::equal(dot.cpu().index_select(0, untouched), dot0.cpu().index_select(0, untouched)));
    }
  }
  auto d = torch::zeros({4, 8}, opts(torch::kFloat32));
  auto dot = torch::zeros({4}, opts(torch::kFloat32));
  const auto rows3 = torch::zeros({3, 8}, opts(torch::kFloat32));
  test::expect_error([&] { add_rows_dot_(d, torch::zeros({2}, opts(torch::kLong)), rows3, d, dot); },
                     {"argument 'index' must be a 1-dim int64 tensor of 3 entries"});
  test::expect_error([&] { add_rows_dot_(d, torch::zeros({3}, opts(torch::kLong)), rows3, d.narrow(0, 0, 3), dot); },
                     {"argument 'other' must match dst ([4, 8]"});
  auto dot_half = torch::zeros({4}, opts(torch::kHalf));
  test::expect_error([&] { add_rows_dot_(d, torch::zeros({3}, opts(torch::kLong)), rows3, d, dot_half); },
                     {"argument 'dot' must be a contiguous float32 [4] tensor"});
}

// ---- gate_tokens -------------------------------------------------------------------

TEST_P(GateTokens, ForwardAndGradientsMatchFloat64) {
  for (auto dtype : kAllDtypes) {
    // C % 8 == 0 runs the CUDA kernels (rows of 2048 and of 8); C = 12 and a
    // non-contiguous x the composition.
    for (auto [B, T, C] : std::vector<std::array<int64_t, 3>>{{2, 37, 64}, {1, 5, 2048}, {3, 4, 8}, {1, 7, 12}}) {
      for (bool strided : {false, true}) {
        SCOPED_TRACE(::testing::Message() << dtype << " B " << B << " T " << T << " C " << C << " strided "
                                          << strided << " seed " << seed_);
        auto x = strided ? torch::randn({B, T, 2 * C}, opts(dtype)).narrow(2, 0, C) : torch::randn({B, T, C}, opts(dtype));
        const auto gate_dtype = dtype == torch::kFloat64 ? dtype : torch::kFloat32;
        auto g = torch::rand({B, T}, opts(gate_dtype)) * 2 - 0.5;
        // The product in fp32, one rounding (the composition: g rounded to x's
        // dtype first); dg sums C products in fp32 (the reference in fp64).
        const double tol = dtype == torch::kFloat64 ? 1e-12 : dtype == torch::kFloat32 ? 1e-5
                                                                                       : 3 * test::unit_roundoff(dtype);
        check_against_reference([](const std::vector<torch::Tensor>& in) { return gate_tokens(in[0], in[1]); },
                                [](const std::vector<torch::Tensor>& in) { return in[0] * in[1].unsqueeze(-1); },
                                {x, g}, {"x", "g"}, tol);
      }
    }
  }
}

TEST_P(GateTokens, ZeroOneGatesAreExactAndEmptyAndErrors) {
  auto x = torch::randn({2, 33, 256}, opts(torch::kBFloat16));
  auto g = (torch::rand({2, 33}, opts(torch::kFloat32)) > 0.5).to(torch::kFloat32);
  EXPECT_TRUE(torch::equal(gate_tokens(x, g), x * g.to(torch::kBFloat16).unsqueeze(-1)));
  auto e = torch::randn({2, 0, 256}, opts(torch::kBFloat16)).requires_grad_(true);
  auto ge = torch::rand({2, 0}, opts(torch::kFloat32)).requires_grad_(true);
  auto y = gate_tokens(e, ge);
  EXPECT_EQ(y.sizes(), e.sizes());
  y.sum().backward();
  EXPECT_EQ(e.grad().sizes(), e.sizes());
  using test::expect_error;
  expect_error([&] { gate_tokens(x[0], g); }, {"argument 'x' must be [B, T, C] (3 dims)"});
  expect_error([&] { gate_tokens(x, g.narrow(1, 0, 3)); }, {"argument 'g' must be [B, T] = [2, 33]", "[2, 3]"});
  expect_error([&] { gate_tokens(x, g.to(torch::kInt)); }, {"argument 'g' must be float"});
  if (device().is_cuda()) expect_error([&] { gate_tokens(x, g.cpu()); }, {"argument 'g' must be on the device of 'x'"});
}

// ---- value_streams_cuda_backward -------------------------------------------------

// The PSA layer's fused value-stream backward against float64 autograd of
// the ops it replaces: u = gate v, local = conv(u, w), summary = the gated
// EMA of v, with du, dlocal and dsummary arriving (each also absent).
// Shapes: two scan chunks with a ragged last sub-chunk and K = 8 (the
// register-ring conv); T = 17 with K = 3; K = 20 (the plain-loop conv).
// Gates and z soft (anywhere in [0, 1]), so no term vanishes. Half the cases
// pass the forward's summary (the scan's backward without a replay). du' is stored
// once in the activations' dtype before dv and dgate read it: within 4 u
// (u = unit roundoff) in 16-bit types; fp32 within its summation order.
TEST_P(ValueStreams, BackwardMatchesFloat64AutogradOfTheComposition) {
  if (!device().is_cuda()) {
    auto v = torch::randn({1, 4, 32}, opts(torch::kFloat32));
    EXPECT_FALSE(value_streams_fused(v));
    test::expect_error([&] { value_streams_cuda_backward(v, v, {}, {}, {}, {}, {}, {}, {}); },
                       {"argument 'v' must be a contiguous CUDA [B, T, C]"});
    return;
  }
  struct Case {
    int64_t B, T, C, K;
  };
  for (auto dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
    for (const Case& c : {Case{2, 300, 64, 8}, Case{1, 17, 32, 3}, Case{1, 513, 96, 20}}) {
      for (int absent = 0; absent < 4; ++absent) {  // 1: no du, 2: no dlocal, 3: no dsummary
        SCOPED_TRACE(::testing::Message() << dtype << " B " << c.B << " T " << c.T << " C " << c.C << " K " << c.K
                                          << " absent " << absent << " seed " << seed_);
        const auto f32 = opts(torch::kFloat32);
        const auto v = torch::randn({c.B, c.T, c.C}, opts(dtype));
        const auto gate = torch::rand({c.B, c.T}, f32), z = torch::rand({c.B, c.T}, f32);
        const auto rate = torch::rand({c.C}, f32) * 0.5;
        const auto w = torch::randn({c.C, c.K}, f32) / c.K;
        const auto u = gate_tokens(v, gate);
        auto grad = [&](bool present) { return present ? torch::randn({c.B, c.T, c.C}, opts(dtype)) : torch::Tensor(); };
        const auto du = grad(absent != 1), dlocal = grad(absent != 2), dsummary = grad(absent != 3);
        // Odd cases read the forward's summary back (no replay); it is
        // rounded to v's dtype there, so dz and drate move by about u.
        const bool saved = (absent + c.T) % 2 == 1;
        const auto summary = saved ? std::get<0>(gated_ema_scan(v, z, rate)) : torch::Tensor();
        const auto got = value_streams_cuda_backward(v, u, gate, z, rate, w, du, dlocal, dsummary, summary);

        auto vd = f64_leaf(v), gd = f64_leaf(gate), zd = f64_leaf(z), rd = f64_leaf(rate), wd = f64_leaf(w);
        const auto ud = vd * gd.unsqueeze(-1);
        const auto b = zd.unsqueeze(-1) * rd;
        torch::Tensor loss = torch::zeros({}, vd.options());
        auto term = [&](const torch::Tensor& y, const torch::Tensor& dy) {
          if (dy.defined()) loss = loss + (y * dy.to(torch::kCPU, torch::kDouble)).sum();
        };
        term(ud, du);
        term(conv_reference(ud, wd, {}), dlocal);
        term(scan_reference(1 - b, b * vd, {}), dsummary);
        const auto rg = torch::autograd::grad({loss}, {vd, gd, zd, rd, wd}, {}, false, false, true);
        auto ref = [](const torch::Tensor& t, const torch::Tensor& like) {
          return t.defined() ? t : torch::zeros(like.sizes(), like.options().dtype(torch::kDouble).device(torch::kCPU));
        };
        const double tol = dtype == torch::kFloat32 ? 1e-5 : 4 * test::unit_roundoff(dtype);
        ASSERT_EQ(got.dv.scalar_type(), dtype);
        ASSERT_EQ(got.dweight.scalar_type(), w.scalar_type());
        EXPECT_LE(rel_l2(got.dv, ref(rg[0], v)), tol) << "dv";
        EXPECT_LE(rel_l2(got.dgate, ref(rg[1], gate)), tol) << "dgate";
        // dz and drate read v and dsummary (exact in every dtype) and, with
        // the replay, no rounded intermediate: fp32's summation order alone,
        // as in PsaScan. From the saved summary they read h_{t-1} rounded to
        // v's dtype: db_t = g_t (v_t - h_{t-1}) moves by at most u |h|.
        const double tol_h = saved && dtype != torch::kFloat32 ? 4 * test::unit_roundoff(dtype) : 1e-5;
        EXPECT_LE(rel_l2(got.dz, ref(rg[2], z)), tol_h) << "dz" << (saved ? " (saved summary)" : "");
        EXPECT_LE(rel_l2(got.drate, ref(rg[3], rate)), tol_h) << "drate" << (saved ? " (saved summary)" : "");
        if (absent == 2) {
          EXPECT_TRUE(torch::equal(got.dweight, torch::zeros_like(w))) << "dweight without dlocal";
        } else {
          EXPECT_LE(rel_l2(got.dweight, ref(rg[4], w)), tol) << "dweight (u rounded to the activations' dtype)";
        }
      }
    }
  }
  const auto v = torch::randn({1, 8, 32}, opts(torch::kBFloat16));
  const auto g = torch::rand({1, 8}, opts(torch::kFloat32));
  const auto w = torch::randn({32, 4}, opts(torch::kFloat32));
  test::expect_error([&] { value_streams_cuda_backward(v, v, g, g, g[0].narrow(0, 0, 3), w, {}, {}, {}); },
                     {"argument 'rate' must be [32]"});
  test::expect_error([&] { value_streams_cuda_backward(v, v.to(torch::kHalf), g, g, torch::rand({32}, opts(torch::kFloat32)), w, {}, {}, {}); },
                     {"argument 'u' must match v"});
  test::expect_error([&] { value_streams_cuda_backward(v, v, g, g, torch::rand({32}, opts(torch::kFloat32)), w, {}, {}, {}, v[0]); },
                     {"argument 'summary' must match v"});
  EXPECT_FALSE(value_streams_fused(torch::randn({1, 8, 48}, opts(torch::kBFloat16))));  // C % 32 != 0
}

}  // namespace
}  // namespace unswag
