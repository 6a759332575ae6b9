// Tests of unswag::psa_route, the PSA router's fused training step
// (include/unswag/nn/psa_ops.h, src/kernels/psa_route.h), on CPU and CUDA:
// every output and the logits' gradient (from the gates and from each loss)
// against the float64 ATen composition it replaces, in fp32 and fp64, over
// rows that end mid-tile and rows of several tiles; non-contiguous logits;
// bitwise repeatability; errors.
#include "test_util.h"
#include "unswag/nn/psa_ops.h"

namespace unswag {
namespace {

using test::DeviceTest;
using test::rel_l2;

class PsaRoute : public DeviceTest {};
UNSWAG_INSTANTIATE_DEVICES(PsaRoute);

struct RouteCase {
  torch::Tensor logits, bias, gumbel, target;
  double tau = 0.7, w_load = 0.3, w_z = 0.01, w_entropy = 0.05;
};

RouteCase random_case(int64_t B, int64_t T, const torch::TensorOptions& o) {
  RouteCase c;
  c.logits = torch::randn({B, T, 4}, o) * 2;
  c.bias = torch::randn({4}, o) * 0.5;
  c.gumbel = -torch::log(-torch::log(torch::rand({B, T, 4}, o).clamp(1e-12, 1 - 1e-12)));
  c.target = torch::softmax(torch::randn({4}, o), 0);
  return c;
}

// The composition psa_route replaces (PacketSwitchedAttention::route before
// it), in whatever dtype its inputs have.
struct Reference {
  torch::Tensor route, gates, losses, stats, signal_max, noisy;
};
Reference reference(const RouteCase& c, const torch::Tensor& logits) {
  Reference r;
  const auto biased = logits + c.bias;
  r.noisy = biased / c.tau + c.gumbel;
  const auto y = torch::softmax(r.noisy, -1);
  r.route = r.noisy.argmax(-1);
  r.gates = torch::one_hot(r.route, 4).to(logits.scalar_type()) + (y - y.detach());
  const auto log_p = torch::log_softmax(biased / c.tau, -1);
  const auto p = log_p.exp();
  const auto mean_p = p.mean(at::IntArrayRef{0, 1});
  const auto load = (mean_p - c.target).pow(2).sum();
  const auto z = torch::logsumexp(logits, -1).pow(2).mean();
  const auto entropy = -(p * log_p).sum(-1).mean();
  const auto aux = c.w_load * load + c.w_z * z + c.w_entropy * entropy;
  r.losses = torch::stack({aux, load, z, entropy});
  const auto eval = biased.argmax(-1);
  const auto frac = [](const torch::Tensor& idx) {
    return torch::one_hot(idx, 4).to(torch::kDouble).mean(at::IntArrayRef{0, 1});
  };
  r.stats = torch::cat({(r.route == eval).to(torch::kDouble).mean().view({1}), frac(eval), frac(r.route),
                        mean_p.detach().to(torch::kDouble)});
  r.signal_max = (r.route == 3).sum(1).max();
  return r;
}

// Tokens whose two best noisy scores are closer than `gap` (relative to
// scale): a float route may differ there from the float64 one.
torch::Tensor near_ties(const torch::Tensor& noisy, double gap) {
  const auto top = std::get<0>(noisy.topk(2, -1));
  return (top.select(-1, 0) - top.select(-1, 1)).abs() < gap * (1 + top.select(-1, 0).abs());
}

void check_case(const RouteCase& c, double tol) {
  const auto dt = c.logits.scalar_type();
  auto logits = c.logits.detach().requires_grad_(true);
  const auto got = psa_route(logits, c.bias, c.gumbel, c.target, c.tau, c.w_load, c.w_z, c.w_entropy);
  RouteCase c64;
  auto f64 = [](const torch::Tensor& t) { return t.detach().to(torch::kCPU, torch::kDouble); };
  c64.bias = f64(c.bias);
  c64.gumbel = f64(c.gumbel);
  c64.target = f64(c.target);
  c64.tau = c.tau, c64.w_load = c.w_load, c64.w_z = c.w_z, c64.w_entropy = c.w_entropy;
  auto logits64 = f64(c.logits).requires_grad_(true);
  const auto ref = reference(c64, logits64);

  const int64_t B = c.logits.size(0), T = c.logits.size(1);
  ASSERT_EQ(got.route.sizes(), (std::vector<int64_t>{B, T}));
  ASSERT_EQ(got.gates.sizes(), c.logits.sizes());
  EXPECT_EQ(got.gates.scalar_type(), dt);
  EXPECT_EQ(got.route.device(), c.logits.device());
  // Routes: equal to the float64 arg-max except where two noisy scores are
  // within float rounding of each other (none in float64).
  const auto ties = near_ties(ref.noisy.detach(), dt == torch::kDouble ? 0.0 : 1e-5);
  const auto differ = (got.route.cpu() != ref.route).logical_and(ties.logical_not());
  EXPECT_EQ(differ.sum().item<int64_t>(), 0) << "routes differ off near-ties";
  const bool exact_routes = torch::equal(got.route.cpu(), ref.route);
  // One-hot gates in value.
  EXPECT_TRUE(torch::equal(got.gates.detach().cpu(), torch::one_hot(got.route.cpu(), 4).to(dt)));
  // The losses and the mean of p do not depend on the sampled routes.
  EXPECT_LE(rel_l2(got.losses, ref.losses), tol) << "losses";
  EXPECT_LE(rel_l2(got.stats.narrow(0, 9, 4), ref.stats.narrow(0, 9, 4)), tol) << "mean p";
  if (exact_routes) {
    EXPECT_LE(rel_l2(got.stats, ref.stats), tol) << "stats";
    EXPECT_EQ(got.signal_max.item<int64_t>(), ref.signal_max.item<int64_t>());
  }
  // Gradient of the logits from the gates and every loss at once.
  const auto dg = torch::randn(c.logits.sizes(), c.logits.options());
  const auto dl = torch::randn({4}, c.logits.options());
  ((got.gates * dg).sum() + (got.losses * dl).sum()).backward();
  ((ref.gates * f64(dg)).sum() + (ref.losses * f64(dl)).sum()).backward();
  ASSERT_TRUE(logits.grad().defined());
  EXPECT_EQ(logits.grad().scalar_type(), dt);
  EXPECT_LE(rel_l2(logits.grad(), logits64.grad()), tol) << "d logits";
}

TEST_P(PsaRoute, MatchesFloat64Composition) {
  for (const auto dt : {torch::kFloat64, torch::kFloat32}) {
    // One token; a row that ends mid-tile; rows of several tiles.
    for (const auto& [B, T] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 37}, {2, 600}}) {
      SCOPED_TRACE(std::string(c10::toString(dt)) + " B=" + std::to_string(B) + " T=" + std::to_string(T));
      check_case(random_case(B, T, opts(dt)), dt == torch::kDouble ? 1e-12 : 2e-5);
    }
  }
}

TEST_P(PsaRoute, EachLossAloneAndGatesAlone) {
  // Gradients from one source at a time (the others undefined in backward).
  auto c = random_case(2, 300, opts(torch::kFloat64));
  auto f64 = [](const torch::Tensor& t) { return t.detach().to(torch::kCPU, torch::kDouble); };
  for (int k = -1; k < 4; ++k) {
    SCOPED_TRACE(k < 0 ? std::string("gates") : "loss " + std::to_string(k));
    auto logits = c.logits.detach().requires_grad_(true);
    const auto got = psa_route(logits, c.bias, c.gumbel, c.target, c.tau, c.w_load, c.w_z, c.w_entropy);
    RouteCase c64 = c;
    c64.bias = f64(c.bias), c64.gumbel = f64(c.gumbel), c64.target = f64(c.target);
    auto logits64 = f64(c.logits).requires_grad_(true);
    const auto ref = reference(c64, logits64);
    if (k < 0) {
      got.gates.select(-1, 3).sum().backward();
      ref.gates.select(-1, 3).sum().backward();
    } else {
      got.losses[k].backward();
      ref.losses[k].backward();
    }
    EXPECT_LE(rel_l2(logits.grad(), logits64.grad()), 1e-12);
  }
}

TEST_P(PsaRoute, NonContiguousLogitsAndRepeatable) {
  auto base = torch::randn({300, 2, 6}, opts(torch::kFloat32));
  auto logits = base.transpose(0, 1).narrow(2, 1, 4);  // [2, 300, 4], strided
  ASSERT_FALSE(logits.is_contiguous());
  auto c = random_case(2, 300, opts(torch::kFloat32));
  c.logits = logits;
  check_case(c, 2e-5);
  const auto a = psa_route(logits, c.bias, c.gumbel, c.target, c.tau, c.w_load, c.w_z, c.w_entropy);
  const auto b = psa_route(logits.contiguous(), c.bias, c.gumbel, c.target, c.tau, c.w_load, c.w_z, c.w_entropy);
  EXPECT_TRUE(torch::equal(a.route, b.route));
  EXPECT_TRUE(test::bitwise_equal(a.losses, b.losses));
  EXPECT_TRUE(test::bitwise_equal(a.stats, b.stats));
}

TEST_P(PsaRoute, Errors) {
  using test::expect_error;
  auto c = random_case(2, 5, opts(torch::kFloat32));
  auto call = [&](const torch::Tensor& logits, const torch::Tensor& bias, const torch::Tensor& gumbel,
                  const torch::Tensor& target, double tau = 1.0, double w = 0.0) {
    psa_route(logits, bias, gumbel, target, tau, w, 0, 0);
  };
  expect_error([&] { call(c.logits.to(torch::kBFloat16), c.bias, c.gumbel, c.target); },
               {"argument 'logits' must be float32 or float64", "BFloat16"});
  expect_error([&] { call(c.logits.narrow(2, 0, 3), c.bias, c.gumbel, c.target); },
               {"argument 'logits' must be [B, T, 4]", "[2, 5, 3]"});
  expect_error([&] { call(c.logits.narrow(1, 0, 0), c.bias, c.gumbel.narrow(1, 0, 0), c.target); },
               {"argument 'logits' must hold at least one token", "[2, 0, 4]"});
  expect_error([&] { call(c.logits, c.bias, c.gumbel.to(torch::kDouble), c.target); },
               {"argument 'gumbel' must be [2, 5, 4] of dtype Float", "Double"});
  expect_error([&] { call(c.logits, c.bias.narrow(0, 0, 3), c.gumbel, c.target); }, {"argument 'bias' must be [4]"});
  expect_error([&] { call(c.logits, c.bias, c.gumbel, c.target.to(torch::kInt)); },
               {"argument 'target' must be a floating point tensor", "Int"});
  expect_error([&] { call(c.logits, c.bias, c.gumbel, c.target, 0.0); },
               {"argument 'temperature' must be positive", "0"});
  expect_error([&] { call(c.logits, c.bias, c.gumbel, c.target, 1.0, -1.0); },
               {"the aux loss weights must be >= 0", "load -1"});
  if (device().is_cuda())
    expect_error([&] { call(c.logits, c.bias.cpu(), c.gumbel, c.target); },
                 {"argument 'bias' must be on the device of 'logits'"});
}

}  // namespace
}  // namespace unswag
