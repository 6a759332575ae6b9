// Tests of unswag::optim::AdamW8bit and its fp32 twin AdamW: the dynamic maps
// against an independent Python construction, block-wise quantization error
// bounds, single steps against torch::optim::AdamW in float64 from the same
// state, many steps on a regression problem, bf16 parameters, the fp32-state
// threshold and patterns, zero / empty / odd-sized tensors, state save/load
// (bit-identical resume, block-size conversion), bad options and arguments,
// and CUDA against the CPU kernels bit for bit.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>

#include "kernels/optim.h"
#include "test_util.h"
#include "unswag/optim/adamw.h"

namespace unswag {
namespace {

using optim::AdamW;
using optim::AdamW8bit;
using optim::AdamWOptions;
using optim::NamedParameters;

// ---------------------------------------------------------------- helpers

// A fresh temporary path, removed by the destructor.
struct TempPath {
  std::string path;
  TempPath() {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/unswag_optim_XXXXXX";
    const int fd = ::mkstemp(pattern.data());
    if (fd >= 0) ::close(fd);
    path = pattern;
  }
  ~TempPath() { std::remove(path.c_str()); }
};

// Distance from x to the nearest code of `map` (float64), in map units.
double distance_to_nearest_code(const torch::Tensor& map, double x) {
  const auto m = map.to(torch::kDouble).cpu();
  return (m - x).abs().min().item<double>();
}

// Checks |dequantized - exact| <= absmax * (distance of exact/absmax to its
// nearest code) + slack per element: the quantizer picked the nearest code of
// the block-scaled value. `slack` covers the fp32 rounding of the value that
// was actually quantized. Returns the max error in units of the block absmax.
double check_quantization(const torch::Tensor& dequantized, const torch::Tensor& exact, const torch::Tensor& absmax,
                          const torch::Tensor& map, int64_t block_size, double slack_rel, const std::string& what) {
  const auto deq = dequantized.to(torch::kDouble).cpu().flatten();
  const auto ex = exact.to(torch::kDouble).cpu().flatten();
  const auto am = absmax.to(torch::kDouble).cpu();
  const auto codes = map.to(torch::kDouble).cpu();
  const auto* d = deq.data_ptr<double>();
  const auto* e = ex.data_ptr<double>();
  const auto* a = am.data_ptr<double>();
  const auto* c = codes.data_ptr<double>();
  double worst = 0;
  int failures = 0;
  for (int64_t i = 0; i < ex.numel(); ++i) {
    const double scale = a[i / block_size];
    const double x = scale > 0 ? e[i] / scale : 0.0;
    double nearest = 1e300;
    for (int k = 0; k < 256; ++k) nearest = std::min(nearest, std::abs(c[k] - x));
    const double err = std::abs(d[i] - e[i]);
    const double bound = scale * nearest + slack_rel * (std::abs(e[i]) + scale) + 1e-30;
    if (scale > 0) worst = std::max(worst, err / scale);
    if (err > bound && failures++ < 5)
      ADD_FAILURE() << what << "[" << i << "]: dequantized " << d[i] << " vs exact " << e[i] << ", error " << err
                    << " > bound " << bound << " (block absmax " << scale << ")";
  }
  return worst;
}

// torch::optim::AdamW in float64 on a copy of `param`, starting from the given
// moments and step count (t = the count before this step).
struct ReferenceAdamW {
  torch::Tensor p;
  std::unique_ptr<torch::optim::AdamW> opt;
  ReferenceAdamW(const torch::Tensor& param, const AdamWOptions& o) {
    p = param.detach().to(torch::kDouble).clone().requires_grad_(true);
    opt = std::make_unique<torch::optim::AdamW>(
        std::vector<torch::Tensor>{p}, torch::optim::AdamWOptions(o.lr())
                                           .betas({o.beta1(), o.beta2()})
                                           .eps(o.eps())
                                           .weight_decay(o.weight_decay()));
  }
  void set_state(const torch::Tensor& m, const torch::Tensor& v, int64_t t) {
    auto st = std::make_unique<torch::optim::AdamWParamState>();
    st->step(t);
    st->exp_avg(m.detach().to(torch::kDouble).view(p.sizes()).clone());
    st->exp_avg_sq(v.detach().to(torch::kDouble).view(p.sizes()).clone());
    opt->state()[p.unsafeGetTensorImpl()] = std::move(st);
  }
  void step(const torch::Tensor& grad) {
    p.mutable_grad() = grad.detach().to(torch::kDouble).clone();
    opt->step();
  }
  std::pair<torch::Tensor, torch::Tensor> moments() {
    auto& st = static_cast<torch::optim::AdamWParamState&>(*opt->state().at(p.unsafeGetTensorImpl()));
    return {st.exp_avg(), st.exp_avg_sq()};
  }
};

torch::Tensor make_param(const torch::TensorOptions& o, at::IntArrayRef shape) {
  return torch::randn(shape, o.requires_grad(false)).requires_grad_(true);
}

void set_grad(torch::Tensor& p, const torch::Tensor& g) { p.mutable_grad() = g.detach().clone(); }

// Gradients with a wide dynamic range (as real ones have): N(0,1) times 10^U(-4, 0).
torch::Tensor wide_grad(const torch::Tensor& like) {
  auto o = like.options().dtype(torch::kFloat);
  return (torch::randn(like.sizes(), o) * torch::pow(10.0, torch::rand(like.sizes(), o) * -4)).to(like.dtype());
}

// |ours - ref64| <= rel * |ref64| + abs_tol per element; reports the worst.
::testing::AssertionResult close_to(const torch::Tensor& ours, const torch::Tensor& ref, double rel, double abs_tol) {
  const auto a = ours.detach().to(torch::kDouble).cpu().flatten(), b = ref.detach().to(torch::kDouble).cpu().flatten();
  const auto excess = (a - b).abs() - (b.abs() * rel + abs_tol);
  if (a.numel() == 0 || excess.max().item<double>() <= 0) return ::testing::AssertionSuccess();
  const int64_t i = excess.argmax().item<int64_t>();
  return ::testing::AssertionFailure() << "element " << i << ": " << a[i].item<double>() << " vs reference "
                                       << b[i].item<double>() << " (rel " << rel << ", abs " << abs_tol << ")";
}

bool same_state(const optim::OptimizerState& a, const optim::OptimizerState& b, std::string* why) {
  if (a.tensors.size() != b.tensors.size()) {
    *why = "tensor count";
    return false;
  }
  for (const auto& [k, t] : a.tensors) {
    const auto it = b.tensors.find(k);
    const auto bytes = [](const torch::Tensor& x) { return x.cpu().contiguous().reshape({-1}).view(torch::kByte); };
    if (it == b.tensors.end() || t.scalar_type() != it->second.scalar_type() ||
        !torch::equal(bytes(t), bytes(it->second))) {
      *why = k;
      return false;
    }
  }
  return true;
}

std::string case_name(const char* kind, int64_t block_size, int64_t n) {
  return std::string(kind) + " block " + std::to_string(block_size) + " n " + std::to_string(n);
}

class AdamW8bitTest : public test::DeviceTest {};
UNSWAG_INSTANTIATE_DEVICES(AdamW8bitTest);

// ---------------------------------------------------------------- the maps

TEST(AdamW8bitMaps, MatchIndependentPythonConstruction) {
  UNSWAG_REQUIRE_PYTHON("numpy");
  const std::string python = unswag::test::python_executable();
  const std::string script = unswag::test::source_path("tests/optim/dynamic_map_reference.py");
  FILE* pipe = ::popen(("'" + python + "' '" + script + "'").c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::map<std::string, std::vector<double>> ref;
  char name[32];
  double value;
  while (std::fscanf(pipe, "%31s %lf", name, &value) == 2) ref[name].push_back(value);
  ASSERT_EQ(::pclose(pipe), 0) << script;
  for (const bool is_signed : {true, false}) {
    const auto& expected = ref[is_signed ? "signed" : "unsigned"];
    const auto map = optim::dynamic_map(is_signed);
    ASSERT_EQ(expected.size(), 256u);
    ASSERT_EQ(map.numel(), 256);
    for (int i = 0; i < 256; ++i)
      EXPECT_NEAR(map[i].item<double>(), expected[i], std::abs(expected[i]) * 1.2e-7)
          << (is_signed ? "signed" : "unsigned") << " code " << i;
  }
}

TEST(AdamW8bitMaps, Properties) {
  for (const bool is_signed : {true, false}) {
    SCOPED_TRACE(is_signed ? "signed" : "unsigned");
    const auto map = optim::dynamic_map(is_signed);
    ASSERT_EQ(map.scalar_type(), torch::kFloat);
    ASSERT_EQ(map.numel(), 256);
    // Strictly ascending, hence 256 distinct codes.
    EXPECT_TRUE((map.slice(0, 1) > map.slice(0, 0, 255)).all().item<bool>());
    EXPECT_EQ(std::get<0>(torch::_unique(map)).numel(), 256);
    EXPECT_EQ(map[255].item<float>(), 1.0f);
    EXPECT_EQ((map == 0).sum().item<int64_t>(), 1);
    if (is_signed) {
      // 127 negative codes, 0, 128 positive (1.0 included); the lowest is the
      // top decade's lowest midpoint, negated: -(0.1 + 0.9 * 63.5 / 64).
      EXPECT_EQ((map < 0).sum().item<int64_t>(), 127);
      EXPECT_FLOAT_EQ(map[0].item<float>(), float(-(0.1 + 0.9 * 63.5 / 64)));
      // Symmetric apart from 1.0.
      EXPECT_TRUE(torch::equal(map.slice(0, 0, 127).flip(0).neg(), map.slice(0, 128, 255)));
    } else {
      EXPECT_EQ(map[0].item<float>(), 0.0f);
    }
    // Decade z (values in [0.1, 1) * 10^-z, z = 0..6) holds 2^(f) codes per sign,
    // f = 6 - z signed, 7 - z unsigned; the smallest non-zero code is 10^-6 * 0.55 / 0.325.
    const auto mag = map.abs().to(torch::kDouble);
    for (int z = 0; z <= 6; ++z) {
      const double lo = 0.1 * std::pow(10.0, -z), hi = std::pow(10.0, -z);
      const int64_t count = ((mag >= lo * (1 - 1e-6)) & (mag < hi * (1 - 1e-6))).sum().item<int64_t>();
      EXPECT_EQ(count, (is_signed ? 2 : 1) * (int64_t(1) << ((is_signed ? 6 : 7) - z))) << "decade 10^-" << z;
    }
    EXPECT_NEAR(map.abs().masked_fill(map == 0, 2).min().item<double>(), is_signed ? 0.55e-6 : 0.325e-6, 1e-12);
  }
}

// The table-driven quantizer the kernels run equals the binary search it
// replaces, for the dynamic maps and for other ascending maps (a uniform one,
// and one with codes clustered tighter than a table bucket, which needs more
// than one advance round), on every kind of input: the codes themselves, the
// midpoints between neighbours and the floats next to them (the tie rule),
// signed zeros, NaN, infinities, subnormals, magnitudes above 1 and random
// values on linear and log scales.
TEST(AdamW8bitMaps, QuantizeLookupEqualsBinarySearch) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::vector<std::pair<std::string, std::vector<float>>> maps;
  for (const bool is_signed : {true, false}) {
    const auto m = optim::dynamic_map(is_signed);
    maps.emplace_back(is_signed ? "dynamic signed" : "dynamic unsigned",
                      std::vector<float>(m.data_ptr<float>(), m.data_ptr<float>() + 256));
  }
  std::vector<float> uniform(256), clustered(256);
  for (int i = 0; i < 256; ++i) uniform[i] = -1.f + 2.f * float(i) / 255.f;
  for (int i = 0; i < 256; ++i) clustered[i] = i < 128 ? -1.f + float(i) * 1e-4f : 0.5f + float(i - 128) * 1e-5f;
  maps.emplace_back("uniform", uniform);
  maps.emplace_back("clustered", clustered);
  std::uniform_real_distribution<float> unit(-1.f, 1.f), log_mag(-40.f, 0.5f);
  for (const auto& [name, codes] : maps) {
    SCOPED_TRACE(name);
    std::vector<uint8_t> table(kernels::kQuantTableBytes);
    const int advance = kernels::build_quantize_table(codes.data(), table.data());
    if (name.rfind("dynamic", 0) == 0) EXPECT_EQ(advance, 1);  // what the kernels' speed rests on
    if (name == "clustered") EXPECT_GT(advance, 1);
    std::vector<float> xs = {0.f, -0.f, 1.f, -1.f, 2.f, -2.f, 1e30f, -1e30f, std::numeric_limits<float>::infinity(),
                             -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(),
                             std::numeric_limits<float>::denorm_min(), -std::numeric_limits<float>::denorm_min(),
                             1e-39f, -1e-39f, 5.9604645e-8f, -5.9604645e-8f};
    for (int i = 0; i < 256; ++i) {
      xs.push_back(codes[i]);
      xs.push_back(std::nextafter(codes[i], 2.f));
      xs.push_back(std::nextafter(codes[i], -2.f));
      if (i + 1 < 256) {
        const float mid = codes[i] + (codes[i + 1] - codes[i]) * 0.5f;
        for (const float x : {mid, std::nextafter(mid, 2.f), std::nextafter(mid, -2.f)}) xs.push_back(x);
      }
    }
    for (int i = 0; i < 200000; ++i) {
      xs.push_back(unit(rng));
      const float mag = std::exp2(log_mag(rng));
      xs.push_back(rng() & 1 ? mag : -mag);
    }
    int64_t mismatches = 0;
    for (const float x : xs) {
      const int expected = kernels::quantize_nearest(codes.data(), x);
      const int got = kernels::quantize_lookup(table.data(), advance, x);
      if (got != expected && ++mismatches <= 5)
        ADD_FAILURE() << "x = " << x << ": lookup gives code " << got << ", the search " << expected;
    }
    EXPECT_EQ(mismatches, 0) << "of " << xs.size() << " values";
  }
}

// ---------------------------------------------------------------- quantization

TEST_P(AdamW8bitTest, QuantizeRoundTripErrorBound) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (const bool is_signed : {true, false}) {
    const auto map = optim::dynamic_map(is_signed).to(device());
    for (const int64_t block_size : {256, 2048}) {
      for (const int64_t n : {0, 1, 7, 255, 256, 257, 2049, 5000, 20011}) {
        SCOPED_TRACE(case_name(is_signed ? "signed" : "unsigned", block_size, n));
        auto x = torch::randn({n}, opts(torch::kFloat)) * torch::pow(10.0, torch::rand({n}, opts(torch::kFloat)) * -6);
        if (!is_signed) x = x.abs();
        if (n > 600) x.slice(0, 256, 512).zero_();  // an all-zero block (absmax 0)
        auto [codes, absmax] = optim::quantize_blockwise(x, map, block_size);
        ASSERT_EQ(codes.scalar_type(), torch::kByte);
        ASSERT_EQ(codes.numel(), n);
        ASSERT_EQ(absmax.numel(), (n + block_size - 1) / block_size);
        // absmax is the exact block max of |x|.
        if (n > 0) {
          const int64_t pad = absmax.numel() * block_size - n;
          const auto padded = torch::cat({x.abs(), torch::zeros({pad}, x.options())}).view({-1, block_size});
          EXPECT_TRUE(torch::equal(std::get<0>(padded.max(1)), absmax));
        }
        const auto back = optim::dequantize_blockwise(codes, absmax, map, block_size);
        const double worst = check_quantization(back, x, absmax, map, block_size, 1e-7, "round trip");
        // The largest half-gap of the maps: 0.9 / 64 / 2 (signed top decade; the
        // signed map's -1 end is 0.0070 from its lowest code) and 0.9 / 128 / 2.
        EXPECT_LE(worst, is_signed ? 0.00704 : 0.00352);
        // Each block's largest magnitude (+absmax) comes back exactly when positive.
        if (!is_signed && n > 0) {
          const auto where = x == absmax.repeat_interleave(block_size).slice(0, 0, n);
          EXPECT_TRUE(torch::equal(back.masked_select(where & (x > 0)), x.masked_select(where & (x > 0))));
        }
      }
    }
  }
}

// ---------------------------------------------------------------- one step

TEST_P(AdamW8bitTest, OneStepMatchesTorchAdamWFloat64FromSameState) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (const int64_t block_size : {256, 2048}) {
    for (const int64_t n : {4096, 4097, 6151, 2048 * 3 + 5}) {
      SCOPED_TRACE("block " + std::to_string(block_size) + " n " + std::to_string(n));
      const auto o = AdamWOptions(3e-3).beta1(0.9).beta2(0.99).eps(1e-6).weight_decay(0.1).block_size(block_size);
      auto p = make_param(opts(torch::kFloat), {n});
      AdamW8bit opt({{"w", p}}, o);
      // A few steps to get a non-trivial state.
      for (int s = 0; s < 3; ++s) {
        set_grad(p, wide_grad(p));
        opt.step();
      }
      ASSERT_TRUE(opt.has_8bit_state("w"));
      auto [m_old, v_old] = opt.moments("w");
      ReferenceAdamW ref(p, o);
      ref.set_state(m_old, v_old, opt.step_count("w"));
      const auto g = wide_grad(p);
      const auto p_before = p.detach().to(torch::kDouble);
      set_grad(p, g);
      opt.step();
      ref.step(g);
      // The parameter: the same math in fp32 from the same (dequantized) state:
      // fp32 rounding of p (2^-24 relative, a few times) plus ~1e-6 of the
      // update (the largest update sets the scale, as m may cancel).
      const double largest_update = (ref.p.detach() - p_before).abs().max().item<double>();
      EXPECT_TRUE(close_to(p, ref.p, 2.4e-7, 1e-5 * largest_update));
      // The new state: each moment is the nearest code of the block-scaled
      // float64 moment (its quantization error is the only difference).
      auto [m_new, v_new] = opt.moments("w");
      auto [m_ref, v_ref] = ref.moments();
      const auto sd = opt.state_dict();
      check_quantization(m_new, m_ref, sd.tensors.at("w:absmax1"), optim::dynamic_map(true), block_size, 2e-6,
                         "exp_avg");
      check_quantization(v_new, v_ref, sd.tensors.at("w:absmax2"), optim::dynamic_map(false), block_size, 2e-6,
                         "exp_avg_sq");
    }
  }
}

TEST_P(AdamW8bitTest, Fp32TwinMatchesTorchAdamWToFloatRounding) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const auto o = AdamWOptions(1e-2).beta1(0.8).beta2(0.95).eps(1e-8).weight_decay(0.05);
  for (const int64_t n : {1, 1000, 4099, 70001}) {
    auto p = make_param(opts(torch::kFloat), {n});
    auto p_torch = p.detach().clone().requires_grad_(true);
    AdamW ours({{"w", p}}, o);
    torch::optim::AdamW theirs({p_torch}, torch::optim::AdamWOptions(o.lr())
                                              .betas({o.beta1(), o.beta2()})
                                              .eps(o.eps())
                                              .weight_decay(o.weight_decay()));
    ReferenceAdamW ref(p, o);
    double g_max = 0;  // the largest |g| of the run: the moments' running sums are as large as it in the meantime
    for (int s = 0; s < 20; ++s) {
      const auto g = wide_grad(p);
      g_max = std::max(g_max, g.abs().max().item<double>());
      set_grad(p, g);
      set_grad(p_torch, g);
      ours.step();
      theirs.step();
      ref.step(g);
    }
    // Our fp32 error against float64 is at most twice torch's fp32 error, plus
    // a few ulp of the largest value the quantity held during the run: |p| for
    // the parameter, max |g| for m and max g^2 for v (a running sum of
    // gradients with a wide range loses relative accuracy to cancellation, in
    // both implementations alike but not by the same rounding: with n = 1 torch
    // may be exact by luck while the final m is far below its past values).
    auto& their_state =
        static_cast<torch::optim::AdamWParamState&>(*theirs.state().at(p_torch.unsafeGetTensorImpl()));
    auto [m, v] = ours.moments("w");
    auto [m_ref, v_ref] = ref.moments();
    const std::vector<std::tuple<const char*, torch::Tensor, torch::Tensor, torch::Tensor>> checks = {
        {"param", p, p_torch, ref.p}, {"exp_avg", m, their_state.exp_avg(), m_ref},
        {"exp_avg_sq", v, their_state.exp_avg_sq(), v_ref}};
    for (const auto& [what, mine, torch32, ref64] : checks) {
      const auto r = ref64.detach();
      const double err_ours = (mine.detach().to(torch::kDouble) - r).abs().max().item<double>();
      const double err_torch = (torch32.detach().to(torch::kDouble) - r).abs().max().item<double>();
      const std::string name = what;
      const double held = std::max(r.abs().max().item<double>(),
                                   name == "exp_avg" ? g_max : name == "exp_avg_sq" ? g_max * g_max : 0.0);
      EXPECT_LE(err_ours, 2 * err_torch + 4 * 1.2e-7 * held) << what << ", n " << n;
    }
  }
}

// bf16 parameters: the same fp32 math as for an fp32 copy of the parameter,
// rounded once to bf16 at the end (so bit-identical to it), states identical.
TEST_P(AdamW8bitTest, Bf16ParamsEqualFp32MathRoundedOnce) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (const bool eight_bit : {true, false}) {
    const auto o = AdamWOptions(1e-3).weight_decay(0.01);
    auto p16 = make_param(opts(torch::kBFloat16), {77, 131});
    auto p32 = p16.detach().to(torch::kFloat).requires_grad_(true);
    std::unique_ptr<AdamW> a = eight_bit ? std::make_unique<AdamW8bit>(NamedParameters{{"w", p16}}, o)
                                         : std::make_unique<AdamW>(NamedParameters{{"w", p16}}, o);
    std::unique_ptr<AdamW> b = eight_bit ? std::make_unique<AdamW8bit>(NamedParameters{{"w", p32}}, o)
                                         : std::make_unique<AdamW>(NamedParameters{{"w", p32}}, o);
    for (int s = 0; s < 5; ++s) {
      const auto g = wide_grad(p16);
      set_grad(p16, g);
      set_grad(p32, g.to(torch::kFloat));
      a->step();
      b->step();
      ASSERT_TRUE(test::bitwise_equal(p16.detach(), p32.detach().to(torch::kBFloat16))) << "step " << s;
      p32.detach().copy_(p16.detach().to(torch::kFloat));  // both continue from the bf16 value
      std::string why;
      auto sa = a->state_dict(), sb = b->state_dict();
      ASSERT_TRUE(same_state(sa, sb, &why)) << "state differs at " << why << ", step " << s;
    }
    // And against float64 torch: one bf16 rounding (2^-8 relative) away.
    ReferenceAdamW ref(p16, o);
    auto [m, v] = a->moments("w");
    ref.set_state(m, v, a->step_count("w"));
    const auto g = wide_grad(p16);
    set_grad(p16, g);
    a->step();
    ref.step(g);
    EXPECT_TRUE(close_to(p16, ref.p, 1.0 / 256 + 1e-6, 1e-30)) << (eight_bit ? "8-bit" : "fp32");
  }
}

// ---------------------------------------------------------------- many steps

// Linear regression y = X W* + noise; W has 64 x 96 = 6144 elements (8-bit
// state), the bias 64 (fp32 state). 300 steps with AdamW8bit and with fp32
// torch::optim::AdamW from the same start must end at the same loss (within
// 10% of the excess over the noise floor) and close weights.
TEST_P(AdamW8bitTest, ManyStepsOnRegressionStayClose) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const auto f = opts(torch::kFloat);
  const auto X = torch::randn({512, 96}, f), W_true = torch::randn({96, 64}, f) / 10;
  const auto y = torch::mm(X, W_true) + 0.01 * torch::randn({512, 64}, f);
  auto W8 = torch::zeros({96, 64}, f).requires_grad_(true), b8 = torch::zeros({64}, f).requires_grad_(true);
  auto W32 = torch::zeros({96, 64}, f).requires_grad_(true), b32 = torch::zeros({64}, f).requires_grad_(true);
  const auto o = AdamWOptions(1e-2).weight_decay(0.0);
  AdamW8bit ours({{"W", W8}, {"b", b8}}, o);
  torch::optim::AdamW theirs({W32, b32}, torch::optim::AdamWOptions(1e-2).weight_decay(0.0));
  auto loss_of = [&](const torch::Tensor& W, const torch::Tensor& b) {
    return (torch::mm(X, W) + b - y).pow(2).mean();
  };
  double first = 0, l8 = 0, l32 = 0;
  for (int s = 0; s < 300; ++s) {
    ours.zero_grad();
    theirs.zero_grad();
    auto loss8 = loss_of(W8, b8), loss32 = loss_of(W32, b32);
    loss8.backward();
    loss32.backward();
    ours.step();
    theirs.step();
    if (s == 0) first = loss32.item<double>();
    l8 = loss8.item<double>();
    l32 = loss32.item<double>();
  }
  EXPECT_TRUE(ours.has_8bit_state("W"));
  EXPECT_FALSE(ours.has_8bit_state("b"));
  EXPECT_LT(l32, first / 50) << "the reference did not train";
  const double floor = 1e-4;  // noise variance
  EXPECT_LE(std::abs(l8 - l32), 0.1 * (l32 - floor) + 2e-5) << "8-bit loss " << l8 << " vs fp32 " << l32;
  EXPECT_LT(test::rel_l2(W8, W32), 0.02);
}

// ---------------------------------------------------------------- which state

TEST_P(AdamW8bitTest, SmallTensorsAndPatternsKeepFp32State) {
  const auto f = opts(torch::kFloat);
  auto a = make_param(f, {4095}), b = make_param(f, {64, 64}), c = make_param(f, {100, 64}), d = make_param(f, {3});
  AdamW8bit opt({{"small", a}, {"big", b}, {"model.embed_tokens.weight", c}, {"tiny", d}},
                AdamWOptions().fp32_state_patterns({"*embed_tokens*"}));
  for (auto* p : {&a, &b, &c, &d}) set_grad(*p, torch::randn_like(*p));
  EXPECT_EQ(opt.state_bytes(), 0);
  opt.step();
  EXPECT_FALSE(opt.has_8bit_state("small"));
  EXPECT_TRUE(opt.has_8bit_state("big"));
  EXPECT_FALSE(opt.has_8bit_state("model.embed_tokens.weight"));
  EXPECT_FALSE(opt.has_8bit_state("tiny"));
  // Bytes: 8 per fp32-state element; 2 per 8-bit element + 2 fp32 scales per block; the two maps and
  // their quantize tables.
  EXPECT_EQ(opt.state_bytes(),
            8 * (4095 + 6400 + 3) + (2 * 4096 + 2 * 4 * 16) + 2 * 256 * 4 + 2 * kernels::kQuantTableBytes);
  // The fp32 twin never quantizes.
  auto e = make_param(f, {8192});
  AdamW twin({{"e", e}});
  set_grad(e, torch::randn_like(e));
  twin.step();
  EXPECT_FALSE(twin.has_8bit_state("e"));
  EXPECT_EQ(twin.state_bytes(), 8 * 8192);
}

TEST_P(AdamW8bitTest, ZeroGradsEmptyTensorsAndParamsWithoutGrad) {
  const auto f = opts(torch::kFloat);
  auto z = make_param(f, {5000}), empty = make_param(f, {0}), empty2 = make_param(f, {3, 0}),
       skipped = make_param(f, {4096});
  const auto z0 = z.detach().clone(), skipped0 = skipped.detach().clone();
  const auto o = AdamWOptions(1e-2).weight_decay(0.5);
  AdamW8bit opt({{"z", z}, {"empty", empty}, {"empty2", empty2}, {"skipped", skipped}},
                AdamWOptions(o).min_8bit_size(0));
  set_grad(z, torch::zeros_like(z));
  set_grad(empty, torch::zeros_like(empty));
  set_grad(empty2, torch::zeros_like(empty2));
  opt.step();
  opt.step();
  // Zero gradients: the moments stay exactly zero; only the decay acts (twice).
  const float decay = float(1.0 - 1e-2 * 0.5);
  EXPECT_TRUE(torch::equal(z.detach(), z0 * decay * decay));
  auto [m, v] = opt.moments("z");
  EXPECT_EQ(m.abs().max().item<float>(), 0.f);
  EXPECT_EQ(v.abs().max().item<float>(), 0.f);
  EXPECT_EQ(opt.step_count("empty"), 2);
  EXPECT_EQ(opt.step_count("empty2"), 2);
  EXPECT_TRUE(opt.has_8bit_state("empty"));
  // No gradient: skipped, no state, step count not advanced, untouched.
  EXPECT_EQ(opt.step_count("skipped"), 0);
  EXPECT_TRUE(torch::equal(skipped.detach(), skipped0));
  EXPECT_FALSE(opt.moments("skipped").first.defined());
  // zero_grad: drops (default) or zeroes the gradients.
  opt.zero_grad(false);
  EXPECT_TRUE(z.grad().defined());
  EXPECT_EQ(z.grad().abs().sum().item<float>(), 0.f);
  opt.zero_grad();
  EXPECT_FALSE(z.grad().defined());
  // The empty tensors' state survives a save/load round trip.
  TempPath tmp;
  opt.save(tmp.path);
  AdamW8bit other({{"z", z}, {"empty", empty}, {"empty2", empty2}, {"skipped", skipped}},
                  AdamWOptions(o).min_8bit_size(0));
  other.load(tmp.path);
  EXPECT_EQ(other.step_count("empty2"), 2);
  EXPECT_EQ(other.step_count("skipped"), 0);
}

TEST_P(AdamW8bitTest, SetLrChangesTheStep) {
  const auto f = opts(torch::kFloat);
  auto p = make_param(f, {4096}), q = p.detach().clone().requires_grad_(true);
  AdamW8bit a({{"w", p}}, AdamWOptions(1e-3).weight_decay(0)), b({{"w", q}}, AdamWOptions(1e-3).weight_decay(0));
  const auto g = torch::randn_like(p);
  set_grad(p, g);
  set_grad(q, g);
  b.set_lr(0.0);
  EXPECT_EQ(b.options().lr(), 0.0);
  const auto q0 = q.detach().clone();
  a.step();
  b.step();
  EXPECT_TRUE(torch::equal(q.detach(), q0));  // lr 0: nothing moves
  // First AdamW step moves each element by lr * g / (|g| + eps) ~ lr.
  EXPECT_NEAR((p.detach() - q0).abs().max().item<double>(), 1e-3, 1e-6);
  test::expect_error([&] { b.set_lr(-1); }, {"'lr'", ">= 0", "-1"});
}

// ---------------------------------------------------------------- save / load

TEST_P(AdamW8bitTest, SaveLoadGivesBitIdenticalNextSteps) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (const bool eight_bit : {true, false}) {
    const auto o = AdamWOptions(2e-3).weight_decay(0.1).block_size(2048);
    auto make = [&](NamedParameters ps) -> std::unique_ptr<AdamW> {
      if (eight_bit) return std::make_unique<AdamW8bit>(std::move(ps), o);
      return std::make_unique<AdamW>(std::move(ps), o);
    };
    auto w = make_param(opts(torch::kBFloat16), {300, 70}), b = make_param(opts(torch::kFloat), {70});
    auto a = make({{"layer.w", w}, {"layer.b", b}});
    for (int s = 0; s < 3; ++s) {
      set_grad(w, wide_grad(w));
      set_grad(b, wide_grad(b));
      a->step();
    }
    TempPath tmp;
    a->save(tmp.path);
    auto w2 = w.detach().clone().requires_grad_(true), b2 = b.detach().clone().requires_grad_(true);
    auto c = make({{"layer.w", w2}, {"layer.b", b2}});
    c->set_lr(1.0);  // restored from the file
    c->load(tmp.path);
    EXPECT_EQ(c->options().lr(), 2e-3);
    EXPECT_EQ(c->step_count("layer.w"), 3);
    for (int s = 0; s < 2; ++s) {
      const auto gw = wide_grad(w), gb = wide_grad(b);
      set_grad(w, gw);
      set_grad(w2, gw);
      set_grad(b, gb);
      set_grad(b2, gb);
      a->step();
      c->step();
      EXPECT_TRUE(test::bitwise_equal(w.detach(), w2.detach()));
      EXPECT_TRUE(test::bitwise_equal(b.detach(), b2.detach()));
      std::string why;
      EXPECT_TRUE(same_state(a->state_dict(), c->state_dict(), &why)) << "differs at " << why;
    }
  }
}

// The bitsandbytes 2048 -> 256 resume breakage: here the state carries its
// block size and maps, and loading into another block size requantizes.
TEST_P(AdamW8bitTest, LoadConvertsOtherBlockSizeAndFp32State) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  auto w = make_param(opts(torch::kFloat), {5000});
  AdamW8bit big({{"w", w}}, AdamWOptions().block_size(2048));
  AdamW fp32({{"w", w}});
  for (int s = 0; s < 4; ++s) {
    set_grad(w, wide_grad(w));
    big.step();
    fp32.step();
  }
  for (const bool from_fp32 : {false, true}) {
    SCOPED_TRACE(from_fp32 ? "from fp32 state" : "from block size 2048");
    const auto saved = from_fp32 ? fp32.state_dict() : big.state_dict();
    auto [m_src, v_src] = from_fp32 ? fp32.moments("w") : big.moments("w");
    AdamW8bit small({{"w", w}}, AdamWOptions().block_size(256));
    small.load_state_dict(saved);
    EXPECT_EQ(small.step_count("w"), 4);
    auto [m, v] = small.moments("w");
    const auto sd = small.state_dict();
    EXPECT_EQ(sd.tensors.at("w:absmax1").numel(), (5000 + 255) / 256);
    EXPECT_EQ(sd.metadata.at("block_size"), "256");
    check_quantization(m, m_src, sd.tensors.at("w:absmax1"), optim::dynamic_map(true), 256, 1e-7, "exp_avg");
    check_quantization(v, v_src, sd.tensors.at("w:absmax2"), optim::dynamic_map(false), 256, 1e-7, "exp_avg_sq");
  }
  // 8-bit state into the fp32 twin: exactly the dequantized moments.
  AdamW twin({{"w", w}});
  twin.load_state_dict(big.state_dict());
  EXPECT_TRUE(torch::equal(twin.moments("w").first, big.moments("w").first));
  EXPECT_TRUE(torch::equal(twin.moments("w").second, big.moments("w").second));
}

TEST(AdamW8bitState, BadStatesGiveClearErrors) {
  auto w = torch::randn({5000}).requires_grad_(true);
  AdamW8bit opt({{"w", w}});
  set_grad(w, torch::randn_like(w));
  opt.step();
  const auto good = opt.state_dict();
  AdamW8bit other({{"w", w}});
  auto with = [&](const std::function<void(optim::OptimizerState&)>& edit) {
    auto st = good;
    edit(st);
    return st;
  };
  test::expect_error([&] { other.load_state_dict(with([](auto& s) { s.tensors["v:step"] = s.tensors["w:step"]; })); },
                     {"parameter 'v'", "does not have"});
  test::expect_error([&] { other.load_state_dict(with([](auto& s) { s.metadata.erase("block_size"); })); },
                     {"'block_size'"});
  test::expect_error([&] { other.load_state_dict(with([](auto& s) { s.tensors.erase("map:signed"); })); },
                     {"map:signed"});
  test::expect_error([&] { other.load_state_dict(with([](auto& s) { s.metadata["format"] = "other"; })); },
                     {"not an UnSwag AdamW state"});
  test::expect_error(
      [&] { other.load_state_dict(with([](auto& s) { s.tensors["w:state1"] = s.tensors["w:state1"].slice(0, 1); })); },
      {"'w:state1'", "5000 elements"});
  test::expect_error(
      [&] { other.load_state_dict(with([](auto& s) { s.tensors["map:unsigned"] = s.tensors["map:unsigned"].flip(0); })); },
      {"ascending"});
  test::expect_error([&] { other.load_state_dict(with([](auto& s) { s.metadata["lr"] = "fast"; })); },
                     {"'lr'", "fast"});
  // A failed load leaves the optimizer as it was (no state).
  EXPECT_EQ(other.step_count("w"), 0);
}

// ---------------------------------------------------------------- bad input

TEST(AdamW8bitOptions, BadOptionsGiveClearErrors) {
  auto w = torch::randn({10}).requires_grad_(true);
  auto make = [&](const AdamWOptions& o) { AdamW8bit opt({{"w", w}}, o); };
  test::expect_error([&] { make(AdamWOptions(-1e-3)); }, {"'lr'", ">= 0", "-0.001"});
  test::expect_error([&] { make(AdamWOptions().beta1(1.0)); }, {"'beta1'", "[0, 1)", "1"});
  test::expect_error([&] { make(AdamWOptions().beta2(-0.5)); }, {"'beta2'", "[0, 1)", "-0.5"});
  test::expect_error([&] { make(AdamWOptions().eps(-1)); }, {"'eps'"});
  test::expect_error([&] { make(AdamWOptions().weight_decay(-0.1)); }, {"'weight_decay'"});
  test::expect_error([&] { make(AdamWOptions().block_size(512)); }, {"'block_size'", "256 or 2048", "512"});
  test::expect_error([&] { make(AdamWOptions().min_8bit_size(-1)); }, {"'min_8bit_size'"});
  test::expect_error([&] { AdamW8bit opt({{"w", w}, {"w", w}}); }, {"'w'", "twice"});
  test::expect_error([&] { AdamW8bit opt({{"d", torch::randn({4}, torch::kDouble)}}); },
                     {"'d'", "float32 or bfloat16", "Double"});
  test::expect_error([&] { AdamW opt({{"t", torch::randn({4, 4}).t()}}); }, {"'t'", "contiguous"});
  test::expect_error([&] { AdamW opt({{"u", torch::Tensor()}}); }, {"'u'", "undefined"});
}

TEST(AdamW8bitOps, BadArgumentsGiveClearErrors) {
  auto p = torch::randn({300});
  auto g = torch::randn({300});
  auto s1 = torch::zeros({300}, torch::kByte), s2 = torch::zeros({300}, torch::kByte);
  auto a1 = torch::zeros({2}), a2 = torch::zeros({2});
  const auto m1 = optim::dynamic_map(true), m2 = optim::dynamic_map(false);
  auto call = [&](torch::Tensor grad, torch::Tensor st1, torch::Tensor ab1, int64_t step, int64_t bs) {
    optim::adamw8bit_step_(p, grad, st1, s2, ab1, a2, m1, m2, 1e-3, 0.9, 0.999, 1e-8, 0, step, bs);
  };
  test::expect_error([&] { call(g.to(torch::kBFloat16), s1, a1, 1, 256); }, {"'grad'", "dtype of 'param'"});
  test::expect_error([&] { call(g.slice(0, 1), s1, a1, 1, 256); }, {"'grad'", "300 elements", "299"});
  test::expect_error([&] { call(g, s1.to(torch::kInt), a1, 1, 256); }, {"'state1'", "Byte", "Int"});
  test::expect_error([&] { call(g, s1, torch::zeros({1}), 1, 256); }, {"'absmax1'", "2 elements", "got 1"});
  test::expect_error([&] { call(g, s1, a1, 0, 256); }, {"'step'", ">= 1"});
  test::expect_error([&] { call(g, s1, a1, 1, 1024); }, {"'block_size'", "1024"});
  test::expect_error([&] { optim::quantize_blockwise(torch::randn({5}), torch::zeros({255}), 256); },
                     {"'map'", "256 codes"});
  test::expect_error([&] { optim::quantize_blockwise(torch::randn({5}).to(torch::kDouble), m1, 256); },
                     {"'x'", "float32"});
  // At step time: a gradient of the wrong dtype.
  auto w = torch::randn({8}).requires_grad_(true);
  AdamW8bit opt({{"w", w}});
  w.mutable_grad() = torch::randn({8}, torch::kDouble);
  test::expect_error([&] { opt.step(); }, {"'grad'", "dtype of 'param'"});
}

// ---------------------------------------------------------------- CUDA vs CPU

class AdamW8bitCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device here";
    seed_ = test::fresh_seed();
    torch::manual_seed(seed_);
  }
  uint64_t seed_ = 0;
};

// The kernels share optim.h's math with the CPU reference and avoid fma
// contraction, so every byte of the state must agree: codes, scales, fp32
// moments, and the fp32-state twin's parameters. The 8-bit kernel takes the
// parameter step m / (sqrt(v) + eps_hat) with the GPU's approximate square
// root and division (optim.cu), so its parameters agree to a few fp32 ulp of
// the step per step, plus one ulp of the parameter's own rounding.
// Sizes cover partial blocks and tails; offset 1 makes every pointer
// misaligned (the element-by-element path).
TEST_F(AdamW8bitCudaTest, StatesAreBitIdenticalToCpu) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    for (const int64_t block_size : {256, 2048}) {
      for (const int64_t n : {1, 255, 4096, 4097, 100003}) {
        for (const int64_t offset : {0, 1}) {
          SCOPED_TRACE(case_name(dtype == torch::kFloat ? "fp32" : "bf16", block_size, n) + " offset " + std::to_string(offset));
          const auto base = torch::randn({n + offset}).to(dtype);
          auto p_cpu = base.slice(0, offset).clone(), p_gpu = base.cuda().slice(0, offset);
          const int64_t blocks = (n + block_size - 1) / block_size;
          auto s_cpu = std::vector<torch::Tensor>{torch::zeros({n}, torch::kByte), torch::zeros({n}, torch::kByte),
                                                  torch::zeros({blocks}), torch::zeros({blocks})};
          auto s_gpu = std::vector<torch::Tensor>{
              torch::zeros({n + offset}, torch::kByte).cuda().slice(0, offset),
              torch::zeros({n + offset}, torch::kByte).cuda().slice(0, offset), torch::zeros({blocks}).cuda(),
              torch::zeros({blocks}).cuda()};
          auto f_cpu = std::vector<torch::Tensor>{torch::zeros({n}), torch::zeros({n})};
          auto f_gpu = std::vector<torch::Tensor>{torch::zeros({n + offset}).cuda().slice(0, offset),
                                                  torch::zeros({n + offset}).cuda().slice(0, offset)};
          auto q_cpu = p_cpu.clone(), q_gpu = p_gpu.clone();
          const auto m1 = optim::dynamic_map(true), m2 = optim::dynamic_map(false);
          const auto m1g = m1.cuda(), m2g = m2.cuda();
          auto moved = torch::zeros({n}, torch::kDouble);  // sum over steps of |step| on the CPU
          for (int64_t step = 1; step <= 3; ++step) {
            const auto before = p_cpu.to(torch::kDouble);
            const auto g = wide_grad(p_cpu);
            const auto gg = torch::cat({torch::zeros({offset}, g.options()), g}).cuda().slice(0, offset);
            optim::adamw8bit_step_(p_cpu, g, s_cpu[0], s_cpu[1], s_cpu[2], s_cpu[3], m1, m2, 1e-2, 0.9, 0.999, 1e-8,
                                   0.1, step, block_size);
            optim::adamw8bit_step_(p_gpu, gg, s_gpu[0], s_gpu[1], s_gpu[2], s_gpu[3], m1g, m2g, 1e-2, 0.9, 0.999,
                                   1e-8, 0.1, step, block_size);
            optim::adamw_step_(q_cpu, g, f_cpu[0], f_cpu[1], 1e-2, 0.9, 0.999, 1e-8, 0.1, step);
            optim::adamw_step_(q_gpu, gg, f_gpu[0], f_gpu[1], 1e-2, 0.9, 0.999, 1e-8, 0.1, step);
            moved += (p_cpu.to(torch::kDouble) - before).abs();
          }
          {
            // Each step's size is off by at most 2^-20 of itself (the approximate sqrt and division;
            // a dequantized v near 0 can make a step large, so the bound uses the CPU's own steps),
            // and each step's rounding of the stored parameter can differ by one ulp: 3 ulp of
            // max(|a|, |b|) at the relative spacing 2^-7 (bf16) or 2^-23 (fp32).
            const auto a = p_cpu.to(torch::kDouble), b = p_gpu.cpu().to(torch::kDouble);
            const double ulp = dtype == torch::kFloat ? std::ldexp(1.0, -23) : std::ldexp(1.0, -7);
            const auto bound = 3 * ulp * torch::maximum(a.abs(), b.abs()) + std::ldexp(1.0, -20) * moved;
            EXPECT_TRUE(((a - b).abs() <= bound).all().item<bool>())
                << "8-bit param: max |cpu - gpu| " << (a - b).abs().max().item<double>();
          }
          for (int k = 0; k < 4; ++k)
            EXPECT_TRUE(torch::equal(s_cpu[k], s_gpu[k].cpu())) << "8-bit state tensor " << k;
          EXPECT_TRUE(test::bitwise_equal(q_cpu, q_gpu.cpu())) << "fp32-state param";
          for (int k = 0; k < 2; ++k) EXPECT_TRUE(test::bitwise_equal(f_cpu[k], f_gpu[k].cpu())) << "moment " << k;
          // Quantize / dequantize too.
          const auto x = wide_grad(torch::zeros({n})).to(torch::kFloat);
          auto [qc, ac] = optim::quantize_blockwise(x, m1, block_size);
          auto [qg, ag] = optim::quantize_blockwise(x.cuda(), m1g, block_size);
          EXPECT_TRUE(torch::equal(qc, qg.cpu()));
          EXPECT_TRUE(torch::equal(ac, ag.cpu()));
          EXPECT_TRUE(torch::equal(optim::dequantize_blockwise(qc, ac, m1, block_size),
                                   optim::dequantize_blockwise(qg, ag, m1g, block_size).cpu()));
        }
      }
    }
  }
}

}  // namespace
}  // namespace unswag
