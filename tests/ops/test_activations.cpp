// Tests of the compressed activations (relu_1bit, silu/gelu few-bit) on CPU
// and CUDA: forward equal to torch, ReLU gradient bit-identical to torch's,
// few-bit gradients equal to the decoded table and within its documented
// error of the exact derivative, the packed-code layout, the bytes kept for
// backward, odd sizes, non-contiguous inputs, empty tensors, each dtype, and
// error messages.
#include <cmath>
#include <limits>

#include "kernels/fewbit_tables.h"
#include "test_util.h"
#include "unswag/memory.h"
#include "unswag/ops.h"

namespace unswag {
namespace {

using test::DeviceTest;
using test::rel_l2;

class ReLU1Bit : public DeviceTest {};
class Fewbit : public DeviceTest {};
UNSWAG_INSTANTIATE_DEVICES(ReLU1Bit);
UNSWAG_INSTANTIATE_DEVICES(Fewbit);

const std::vector<int64_t> kSizes = {0, 1, 7, 31, 32, 33, 255, 257, 1000, 4099, 65537};

struct SmoothAct {
  const char* name;
  kernels::Act act;
};
const std::vector<SmoothAct> kSmooth = {
    {"silu", kernels::Act::kSiLU}, {"gelu", kernels::Act::kGELU}, {"gelu_tanh", kernels::Act::kGELUTanh}};

// Float64 reference of the activation and its exact derivative, with torch ops.
torch::Tensor act_ref(const std::string& name, const torch::Tensor& x) {
  auto xd = x.to(torch::kCPU, torch::kDouble);
  if (name == "silu") return torch::silu(xd);
  if (name == "gelu") return torch::gelu(xd, "none");
  return torch::gelu(xd, "tanh");
}
torch::Tensor act_grad_ref(const std::string& name, const torch::Tensor& x) {
  auto xd = x.to(torch::kCPU, torch::kDouble).detach().requires_grad_(true);
  act_ref(name, xd).sum().backward();
  return xd.grad();
}

// Values around zero and specials: relu's gradient must match torch's bit for
// bit on all of them (NaN inputs pass the gradient, -0 does not).
torch::Tensor with_specials(torch::Tensor x) {
  if (x.numel() < 8) return x;
  auto flat = x.view(-1);
  flat[0] = 0.0;
  flat[1] = -0.0;
  flat[2] = std::numeric_limits<double>::infinity();
  flat[3] = -std::numeric_limits<double>::infinity();
  flat[4] = std::numeric_limits<double>::quiet_NaN();
  flat[5] = 1e-30;
  flat[6] = -1e-30;
  return x;
}

TEST_P(ReLU1Bit, ForwardAndGradientBitIdenticalToTorch) {
  for (auto dtype : test::float_dtypes()) {
    for (int64_t n : kSizes) {
      SCOPED_TRACE(::testing::Message() << "dtype " << dtype << " n " << n << " seed " << seed_);
      auto x = with_specials(torch::randn({n}, opts(dtype)));
      auto dy = torch::randn({n}, opts(dtype));
      if (n > 9) dy.view(-1)[9] = std::numeric_limits<double>::infinity();  // masked: must give +0, not NaN

      auto x1 = x.clone().requires_grad_(true);
      auto y1 = relu_1bit(x1);
      y1.backward(dy);
      auto x2 = x.clone().requires_grad_(true);
      auto y2 = torch::relu(x2);
      y2.backward(dy);
      // Forward: equal values (torch's own relu may give -0 or +0 for -0 by device), NaN where torch has NaN.
      EXPECT_TRUE(torch::equal(torch::nan_to_num(y1, 7.0), torch::nan_to_num(y2, 7.0)));
      EXPECT_TRUE(torch::equal(y1.isnan(), y2.isnan()));
      EXPECT_TRUE(test::bitwise_equal(x1.grad(), x2.grad()));
    }
  }
}

TEST_P(ReLU1Bit, NonContiguousAndBatchedShapes) {
  for (auto dtype : test::float_dtypes()) {
    auto base = torch::randn({37, 45}, opts(dtype));
    auto x = base.t();  // non-contiguous [45, 37]
    ASSERT_FALSE(x.is_contiguous());
    auto xg = x.detach().requires_grad_(true);
    auto dy = torch::randn({45, 37}, opts(dtype));
    auto y = relu_1bit(xg);
    y.backward(dy);
    EXPECT_EQ(y.sizes(), x.sizes());
    EXPECT_TRUE(test::bitwise_equal(y, torch::relu(x)));
    EXPECT_TRUE(test::bitwise_equal(xg.grad(), torch::threshold_backward(dy, x, 0)));
  }
}

TEST_P(ReLU1Bit, MaskLayoutIsOneBitPerElement) {
  const int64_t n = 1000;  // 31.25 words: the last word is partly padding
  auto x = torch::randn({n}, opts(torch::kFloat32));
  auto [y, mask] = fewbit_forward(x, "relu", 1);
  ASSERT_EQ(mask.numel(), (n + 31) / 32);
  ASSERT_EQ(mask.scalar_type(), torch::kInt32);
  auto m = mask.cpu();
  auto pos = (x > 0).cpu();
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t word = uint32_t(m[i / 32].item<int32_t>());
    ASSERT_EQ(bool((word >> (i % 32)) & 1u), pos[i].item<bool>()) << "element " << i;
  }
  // The padding bits of the last word are zero.
  EXPECT_EQ(uint32_t(m[n / 32].item<int32_t>()) >> (n % 32), 0u);
}

// Allocator-measured: the autograd graph keeps ceil(n/32) words and nothing else.
TEST_P(ReLU1Bit, KeepsOnlyTheMaskForBackward) {
  track_cpu_memory();
  const int64_t n = 1 << 16;
  auto x = torch::randn({n}, opts(torch::kBFloat16)).requires_grad_(true);
  if (device().is_cuda()) torch::cuda::synchronize();
  const int64_t before = allocated_bytes(device());
  auto y = relu_1bit(x);
  const int64_t kept = allocated_bytes(device()) - before - int64_t(y.numel() * y.element_size());
  EXPECT_EQ(kept, n / 8);
  y.sum().backward();
}

TEST_P(Fewbit, ForwardMatchesTorchWithinRounding) {
  for (const auto& a : kSmooth) {
    for (int bits = 1; bits <= 4; ++bits) {
      for (auto dtype : test::float_dtypes()) {
        for (int64_t n : {int64_t(0), int64_t(33), int64_t(4099)}) {
          SCOPED_TRACE(::testing::Message() << a.name << " bits " << bits << " dtype " << dtype << " n " << n);
          auto x = torch::randn({n}, opts(dtype)) * 3;
          auto [y, codes] = fewbit_forward(x, a.name, bits);
          EXPECT_EQ(codes.numel(), (n + 31) / 32 * bits);
          // Math in fp32, one rounding to the dtype. Against float64, our error is at most
          // twice torch's own at this dtype, or 8 (1 + x^2) units of roundoff: for x << 0 the
          // rounding of the argument of erfc / exp is amplified by the slope of log f, which
          // grows like x (GELU) and x^2 (GELU-tanh's cubic); about 5 ulp of fp32 at x ~ -2.
          const double u = test::unit_roundoff(dtype);
          auto ref = act_ref(a.name, x);
          auto torch_same = std::string(a.name) == "silu" ? torch::silu(x)
                                                           : torch::gelu(x, a.act == kernels::Act::kGELU ? "none" : "tanh");
          auto torch_err = (torch_same.to(torch::kCPU, torch::kDouble) - ref).abs();
          auto err = (y.to(torch::kCPU, torch::kDouble) - ref).abs();
          auto x64 = x.to(torch::kCPU, torch::kDouble);
          auto bound = torch::maximum(2 * torch_err, ref.abs() * (1 + x64 * x64) * (8 * u)) + u * 1e-2;
          EXPECT_TRUE((err <= bound).all().item<bool>()) << "max err " << (err - bound).max().item<double>();
        }
      }
    }
  }
}

// The backward multiplies by the table value of x's interval: recompute that
// independently (code = number of boundaries below x) and require bit equality.
TEST_P(Fewbit, GradientIsTheDecodedTableValue) {
  for (const auto& a : kSmooth) {
    for (int bits = 1; bits <= 4; ++bits) {
      auto [b, v] = fewbit_table(a.name, bits);
      for (auto dtype : test::float_dtypes()) {
        SCOPED_TRACE(::testing::Message() << a.name << " bits " << bits << " dtype " << dtype << " seed " << seed_);
        const int64_t n = 4099;
        auto x = (torch::randn({n}, opts(dtype)) * 2).requires_grad_(true);
        auto dy = torch::randn({n}, opts(dtype));
        auto y = a.act == kernels::Act::kSiLU ? silu_fewbit(x, bits)
                                              : a.act == kernels::Act::kGELU ? gelu_fewbit(x, bits) : at::Tensor();
        if (!y.defined()) {
          auto [y2, codes] = fewbit_forward(x.detach(), a.name, bits);
          x.mutable_grad() = fewbit_backward(dy, codes, a.name, bits);
        } else {
          y.backward(dy);
        }
        auto xd = x.detach().to(torch::kCPU, torch::kDouble);
        auto code = (xd.unsqueeze(1) > b.unsqueeze(0)).sum(1);
        auto expected = (dy.cpu().to(torch::kFloat) * v.index({code}).to(torch::kFloat)).to(dtype);
        EXPECT_TRUE(test::bitwise_equal(x.grad().cpu(), expected));
      }
    }
  }
}

// Under x ~ N(0, 1) the gradient's relative L2 error from the exact derivative
// is the table's documented error (docs/fewbit.md), up to sampling noise.
TEST_P(Fewbit, GradientErrorIsTheDocumentedTableError) {
  for (const auto& a : kSmooth) {
    double previous = 1;
    for (int bits = 1; bits <= 4; ++bits) {
      const double documented = kernels::fewbit_table_rel_l2_error(a.act, kernels::fewbit_table(a.act, bits));
      auto x = torch::randn({1 << 18}, opts(torch::kFloat32));
      auto [y, codes] = fewbit_forward(x, a.name, bits);
      auto dx = fewbit_backward(torch::ones_like(x), codes, a.name, bits);
      const double measured = rel_l2(dx, act_grad_ref(a.name, x));
      SCOPED_TRACE(::testing::Message() << a.name << " bits " << bits << " documented " << documented);
      EXPECT_NEAR(measured, documented, 0.05 * documented + 0.002);
      EXPECT_LT(measured, previous);
      previous = measured;
    }
  }
}

// Pins the bit-plane layout: word g*k + j holds bit j of each element's code.
TEST_P(Fewbit, CodeLayoutIsBitPlanes) {
  const int bits = 2;
  auto [b, v] = fewbit_table("silu", bits);
  const int64_t n = 100;
  auto codes_wanted = torch::randint(0, 4, {n}, torch::kLong);
  // An x inside each wanted interval: the midpoint, or 1 beyond the outer boundaries.
  auto lo = torch::cat({b.index({torch::indexing::Slice(0, 1)}) - 2, b});
  auto hi = torch::cat({b, b.index({torch::indexing::Slice(-1, torch::indexing::None)}) + 2});
  auto x = ((lo.index({codes_wanted}) + hi.index({codes_wanted})) / 2).to(opts(torch::kFloat32));
  auto [y, codes] = fewbit_forward(x, "silu", bits);
  auto c = codes.cpu();
  for (int64_t i = 0; i < n; ++i)
    for (int j = 0; j < bits; ++j) {
      const uint32_t word = uint32_t(c[(i / 32) * bits + j].item<int32_t>());
      ASSERT_EQ((word >> (i % 32)) & 1u, uint32_t((codes_wanted[i].item<int64_t>() >> j) & 1)) << i << " " << j;
    }
}

TEST_P(Fewbit, NonContiguousInputAndAliases) {
  auto x = torch::randn({33, 70}, opts(torch::kBFloat16)).t();
  ASSERT_FALSE(x.is_contiguous());
  auto y = silu_2bit(x);
  EXPECT_EQ(y.sizes(), x.sizes());
  EXPECT_TRUE(test::bitwise_equal(y, silu_fewbit(x.contiguous(), 2)));
  EXPECT_TRUE(test::bitwise_equal(gelu_2bit(x), gelu_fewbit(x.contiguous(), 2)));
  auto xg = x.detach().requires_grad_(true);
  gelu_2bit(xg).sum().backward();
  EXPECT_EQ(xg.grad().sizes(), x.sizes());
}

TEST_P(Fewbit, BadInputGivesClearErrors) {
  auto x = torch::randn({64}, opts(torch::kFloat32));
  test::expect_error([&] { fewbit_forward(torch::ones({4}, opts(torch::kInt32)), "silu", 2); },
                     {"'x'", "float32, float16, bfloat16 or float64", "Int"});
  test::expect_error([&] { fewbit_forward(x, "silu", 5); }, {"'bits'", "1..4", "5"});
  test::expect_error([&] { fewbit_forward(x, "relu", 2); }, {"'bits' must be 1 for relu", "2"});
  test::expect_error([&] { fewbit_forward(x, "tanh", 2); }, {"'activation'", "silu", "'tanh'"});
  auto [y, codes] = fewbit_forward(x, "silu", 2);
  test::expect_error([&] { fewbit_backward(torch::ones({65}, opts(torch::kFloat32)), codes, "silu", 2); },
                     {"'codes'", "must hold 6 words", "65 elements", "got 4"});
  test::expect_error([&] { fewbit_backward(x, codes.to(torch::kInt64), "silu", 2); }, {"'codes'", "int32"});
  test::expect_error([&] { silu_fewbit(torch::randn({4}, torch::TensorOptions().device(torch::kMeta)), 2); },
                     {"'x'", "CPU or CUDA", "meta"});
  if (device().is_cuda())
    test::expect_error([&] { fewbit_backward(x, codes.cpu(), "silu", 2); }, {"'codes'", "must be on cuda"});
}

}  // namespace
}  // namespace unswag
