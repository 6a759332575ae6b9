// The memory-lean transformer ops (include/unswag/nn/functional.h) against
// float64 PyTorch compositions of the same math: rms_norm (Llama and Gemma
// forms), rotary_embedding (bit-identical to transformers' composition,
// gradient against float64), chunked_attention (causal, sliding window, GQA, chunks that do not
// divide T), linear_cross_entropy (ignored targets, several chunks),
// qkv_projection (against three linear maps, grad x summed in place); values
// and gradients, each dtype, odd sizes, empty inputs, bad arguments. CUDA
// cases run in scripts/gpu-check.sh.
#include <cmath>

#include "test_util.h"
#include "unswag/nn/functional.h"

namespace {

using unswag::test::expect_error;
using unswag::test::rel_l2;
using unswag::test::unit_roundoff;

// Relative tolerance of a result computed in `dtype` from inputs rounded to it.
double tol(torch::ScalarType dtype, double factor) { return factor * unit_roundoff(dtype) + 1e-6; }

class TransformerOps : public unswag::test::DeviceTest {
 protected:
  // A leaf in `dtype` plus its float64 twin (same values) for the reference.
  std::pair<torch::Tensor, torch::Tensor> leaf(torch::IntArrayRef shape, torch::ScalarType dtype, double scale = 1) {
    auto x = (torch::randn(shape, opts(torch::kFloat)) * scale).to(dtype);
    return {x.clone().requires_grad_(true), x.to(torch::kDouble).clone().requires_grad_(true)};
  }
};

// ------------------------------------------------------------- rms_norm ----

torch::Tensor rms_norm_ref(const torch::Tensor& x, const torch::Tensor& w, double eps, bool add_one) {
  const auto xh = x * torch::rsqrt(x.pow(2).mean(-1, true) + eps);
  return add_one ? xh * (1 + w) : xh * w;
}

TEST_P(TransformerOps, RMSNormMatchesFloat64) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (auto dtype : unswag::test::float_dtypes()) {
    for (bool add_one : {false, true}) {
      auto [x, x64] = leaf({3, 5, 77}, dtype, 3.0);
      auto [w, w64] = leaf({77}, dtype);
      const auto y = unswag::rms_norm(x, w, 1e-6, add_one);
      const auto y64 = rms_norm_ref(x64, w64, 1e-6, add_one);
      EXPECT_EQ(y.scalar_type(), dtype);
      EXPECT_LT(rel_l2(y, y64), tol(dtype, 4)) << dtype << " add_one " << add_one;
      const auto g = torch::randn_like(y64);
      y.backward(g.to(dtype));
      y64.backward(g);
      EXPECT_LT(rel_l2(x.grad(), x64.grad()), tol(dtype, 8)) << dtype;
      EXPECT_LT(rel_l2(w.grad(), w64.grad()), tol(dtype, 8)) << dtype;
    }
  }
}

TEST_P(TransformerOps, RMSNormNonContiguousAndEmpty) {
  auto x = torch::randn({6, 40}, opts(torch::kFloat)).t();  // [40, 6], strided
  auto w = torch::randn({6}, opts(torch::kFloat));
  EXPECT_LT(rel_l2(unswag::rms_norm(x, w, 1e-5), rms_norm_ref(x.to(torch::kDouble), w.to(torch::kDouble), 1e-5, false)),
            1e-6);
  auto e = torch::randn({0, 6}, opts(torch::kFloat));
  EXPECT_EQ(unswag::rms_norm(e, w, 1e-5).sizes(), e.sizes());
  expect_error([&] { unswag::rms_norm(x, torch::ones({5}, opts(torch::kFloat)), 1e-5); }, {"weight", "[5]"});
  expect_error([&] { unswag::rms_norm(x.to(torch::kInt), w, 1e-5); }, {"rms_norm", "x"});
  expect_error([&] { unswag::rms_norm(x, w, 0); }, {"eps"});
}

// ----------------------------------------------------- rotary_embedding ----

torch::Tensor rotate_half_ref(const torch::Tensor& x) {
  const int64_t h = x.size(-1) / 2;
  return torch::cat({-x.narrow(-1, h, h), x.narrow(-1, 0, h)}, -1);
}
// transformers' apply_rotary_pos_emb on the [B, H, T, D] transpose, returned as [B, T, H, D].
torch::Tensor rope_ref(const torch::Tensor& x, const torch::Tensor& cos4, const torch::Tensor& sin4) {
  const auto xt = x.transpose(1, 2);
  return (xt * cos4 + rotate_half_ref(xt) * sin4).transpose(1, 2);
}
// Angles of positions [Bc, T] for head size D, as Model's rope_at: [Bc, 1, T, D].
std::pair<torch::Tensor, torch::Tensor> rope_tables(const torch::Tensor& positions, int64_t D,
                                                    torch::ScalarType dtype) {
  const auto inv = torch::pow(10000.0, -torch::arange(0, D, 2, positions.options().dtype(torch::kFloat)) / D);
  const auto f = positions.to(torch::kFloat).unsqueeze(-1) * inv.view({1, 1, -1});
  const auto emb = torch::cat({f, f}, -1).unsqueeze(1);
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

TEST_P(TransformerOps, RotaryEmbeddingMatchesComposition) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  auto dtypes = unswag::test::float_dtypes();
  dtypes.push_back(torch::kDouble);
  // D = 10: the scalar CUDA path (half 5); 64 and 128: the 16-byte path.
  // (B, cos batch): one table per sequence, and one shared by the batch.
  for (auto dtype : dtypes) {
    for (int64_t D : {10, 64, 128}) {
      for (int64_t Bc : {3, 1}) {
        SCOPED_TRACE(std::string(c10::toString(dtype)) + " D=" + std::to_string(D) + " Bc=" + std::to_string(Bc));
        const int64_t B = 3, T = 37, H = 5;
        const auto lopt = opts(torch::kLong);
        const auto positions = (torch::arange(T, lopt) + torch::randint(0, 5000, {Bc, 1}, lopt));
        auto [cos4, sin4] = rope_tables(positions, D, dtype);
        auto [x, xd] = leaf({B, T, H, D}, dtype, 2.0);
        const auto y = unswag::rotary_embedding(x, cos4, sin4);
        EXPECT_TRUE(y.is_contiguous());
        // Forward: bit-identical to the composition in the same dtype.
        EXPECT_TRUE(unswag::test::bitwise_equal(y, rope_ref(x.detach(), cos4, sin4)));
        // The [Bc, T, D] form of the tables gives the same result.
        EXPECT_TRUE(unswag::test::bitwise_equal(unswag::rotary_embedding(x.detach(), cos4.squeeze(1), sin4.squeeze(1)), y));
        // Backward against float64 autograd of the composition (tables from the same rounded values).
        const auto g = torch::randn({B, T, H, D}, opts(torch::kFloat)).to(dtype);
        y.backward(g);
        rope_ref(xd, cos4.to(torch::kDouble), sin4.to(torch::kDouble)).backward(g.to(torch::kDouble));
        // One rounding of a sum of two products: within 2 unit roundoffs of the exact value.
        EXPECT_LT(rel_l2(x.grad(), xd.grad()), tol(dtype, 2)) << "grad";
      }
    }
  }
}

TEST_P(TransformerOps, RotaryEmbeddingNonContiguousEmptyAndErrors) {
  const int64_t B = 2, T = 9, H = 4, D = 16;
  auto [cos4, sin4] = rope_tables(torch::arange(T, opts(torch::kLong)).unsqueeze(0), D, torch::kFloat);
  // x as the transpose of a [B, H, T, D] tensor: strided in the token-major view.
  const auto xh = torch::randn({B, H, T, D}, opts(torch::kFloat));
  const auto x = xh.transpose(1, 2);
  ASSERT_FALSE(x.is_contiguous());
  const auto y = unswag::rotary_embedding(x, cos4, sin4);
  EXPECT_TRUE(unswag::test::bitwise_equal(y, rope_ref(x, cos4, sin4)));
  // Rows padded to D + 8 (the 16-byte path reads them in place) and to D + 1
  // (the scalar path), in bf16 and fp32; the gradient arriving in a strided
  // layout gives the same bits as the contiguous one.
  for (const auto dtype : {torch::kBFloat16, torch::kFloat}) {
    auto [c, s] = rope_tables(torch::arange(T, opts(torch::kLong)).unsqueeze(0), D, dtype);
    for (const int64_t pad : {8, 1}) {
      SCOPED_TRACE(std::string(c10::toString(dtype)) + " pad " + std::to_string(pad));
      const auto xp = torch::randn({B, T, H, D + pad}, opts(dtype)).narrow(3, 0, D);
      ASSERT_FALSE(xp.is_contiguous());
      const auto leaf_s = xp.detach().requires_grad_(true), leaf_c = xp.contiguous().requires_grad_(true);
      const auto ys = unswag::rotary_embedding(leaf_s, c, s), yc = unswag::rotary_embedding(leaf_c, c, s);
      EXPECT_TRUE(unswag::test::bitwise_equal(ys, yc));
      const auto g = torch::randn({B, T, H, D + pad}, opts(dtype)).narrow(3, 0, D);
      ys.backward(g);
      yc.backward(g.contiguous());
      EXPECT_TRUE(unswag::test::bitwise_equal(leaf_s.grad(), leaf_c.grad()));
      const auto gh = torch::randn({B, H, T, D}, opts(dtype));
      leaf_s.grad().zero_(), leaf_c.grad().zero_();
      unswag::rotary_embedding(leaf_s, c, s).backward(gh.transpose(1, 2));
      unswag::rotary_embedding(leaf_c, c, s).backward(gh.transpose(1, 2).contiguous());
      EXPECT_TRUE(unswag::test::bitwise_equal(leaf_s.grad(), leaf_c.grad()));
    }
  }
  EXPECT_EQ(unswag::rotary_embedding(torch::randn({B, 0, H, D}, opts(torch::kFloat)), cos4.narrow(2, 0, 0),
                                     sin4.narrow(2, 0, 0))
                .sizes(),
            (std::vector<int64_t>{B, 0, H, D}));
  // Gradient through an empty input is empty, not an error.
  auto e = torch::randn({B, 0, H, D}, opts(torch::kFloat)).requires_grad_(true);
  unswag::rotary_embedding(e, cos4.narrow(2, 0, 0), sin4.narrow(2, 0, 0)).sum().backward();
  EXPECT_EQ(e.grad().sizes(), e.sizes());

  expect_error([&] { unswag::rotary_embedding(x.narrow(3, 0, 15), cos4, sin4); }, {"even", "15"});
  expect_error([&] { unswag::rotary_embedding(x.flatten(2), cos4, sin4); }, {"[B, T, H, D]"});
  expect_error([&] { unswag::rotary_embedding(x, cos4.narrow(2, 0, 8), sin4); }, {"'cos'", "[2 or 1, 9, 16]"});
  expect_error([&] { unswag::rotary_embedding(x, cos4, sin4.to(torch::kHalf)); }, {"'sin'", "dtype"});
  expect_error([&] { unswag::rotary_embedding(x.to(torch::kInt), cos4, sin4); }, {"rotary_embedding", "'x'"});
  expect_error([&] { unswag::rotary_embedding(x, cos4.clone().requires_grad_(true), sin4); },
               {"'cos'", "requires grad"});
  if (x.is_cuda())
    expect_error([&] { unswag::rotary_embedding(x, cos4.cpu(), sin4); }, {"'cos'", "same device"});
}

// ---------------------------------------------------- chunked_attention ----

torch::Tensor attention_ref(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale,
                            int64_t window, const torch::Tensor& key_bias = {}) {
  const int64_t G = q.size(1) / k.size(1), T = q.size(2);
  const auto kr = k.repeat_interleave(G, 1), vr = v.repeat_interleave(G, 1);
  auto s = torch::matmul(q, kr.transpose(-1, -2)) * scale;
  if (key_bias.defined()) s = s + key_bias.to(s.scalar_type()).view({q.size(0), 1, 1, T});
  const auto i = torch::arange(T, torch::TensorOptions().device(q.device())).unsqueeze(1);
  const auto j = i.t();
  auto allowed = j <= i;
  if (window > 0) allowed = allowed.logical_and(j > i - window);
  s = s.masked_fill(allowed.logical_not(), -INFINITY);
  return torch::matmul(torch::softmax(s, -1), vr);
}

TEST_P(TransformerOps, ChunkedAttentionMatchesFloat64) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  struct Case {
    int64_t B, H, Hkv, T, D, window, chunk;
  };
  for (const Case c : {Case{2, 4, 2, 37, 16, 0, 8}, Case{1, 6, 1, 53, 24, 9, 16}, Case{1, 2, 2, 5, 8, 0, 64},
                       Case{2, 4, 4, 33, 32, 33, 11}}) {
    for (auto dtype : unswag::test::float_dtypes()) {
      auto [q, q64] = leaf({c.B, c.H, c.T, c.D}, dtype);
      auto [k, k64] = leaf({c.B, c.Hkv, c.T, c.D}, dtype);
      auto [v, v64] = leaf({c.B, c.Hkv, c.T, c.D}, dtype);
      const double scale = 1.0 / std::sqrt(double(c.D));
      const auto o = unswag::chunked_attention(q, k, v, scale, c.window, c.chunk);
      const auto o64 = attention_ref(q64, k64, v64, scale, c.window);
      EXPECT_LT(rel_l2(o, o64), tol(dtype, 8)) << dtype << " T " << c.T << " window " << c.window;
      const auto g = torch::randn_like(o64);
      o.backward(g.to(dtype));
      o64.backward(g);
      EXPECT_LT(rel_l2(q.grad(), q64.grad()), tol(dtype, 16)) << dtype << " T " << c.T;
      EXPECT_LT(rel_l2(k.grad(), k64.grad()), tol(dtype, 16)) << dtype << " T " << c.T;
      EXPECT_LT(rel_l2(v.grad(), v64.grad()), tol(dtype, 16)) << dtype << " T " << c.T;
    }
  }
}

TEST_P(TransformerOps, ChunkedAttentionKeyBias) {
  // An additive per-key bias: random values, and -2000 removing keys (PSA's
  // pruned tokens), including a row whose every visible key is removed.
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const int64_t B = 2, H = 4, Hkv = 2, T = 31, D = 8, window = 5;
  for (auto dtype : unswag::test::float_dtypes()) {
    auto [q, q64] = leaf({B, H, T, D}, dtype);
    auto [k, k64] = leaf({B, Hkv, T, D}, dtype);
    auto [v, v64] = leaf({B, Hkv, T, D}, dtype);
    auto bias = torch::randn({B, T}, opts(torch::kDouble));
    // In float32 the scores of a fully removed row sit near -2000, where an
    // ulp is 1e-4, so only fp64 checks that row's uniform average tightly:
    // below fp64 no key at a multiple of 3 is removed, so every window of 5
    // keeps one (random removal alone empties a row now and then).
    auto removable = torch::rand({B, T}, opts(torch::kDouble)) < 0.3;
    if (dtype != torch::kDouble)
      removable = removable.logical_and(torch::arange(T, opts(torch::kLong)).remainder(3).ne(0).unsqueeze(0));
    bias.masked_fill_(removable, -2000.0);
    if (dtype == torch::kDouble) bias[0].narrow(0, 10, window).fill_(-2000.0);
    const double scale = 1.0 / std::sqrt(double(D));
    const auto o = unswag::chunked_attention(q, k, v, scale, window, 7, bias.to(torch::kFloat));
    const auto o64 = attention_ref(q64, k64, v64, scale, window, bias);
    EXPECT_LT(rel_l2(o, o64), tol(dtype, 8)) << dtype;
    const auto g = torch::randn_like(o64);
    o.backward(g.to(dtype));
    o64.backward(g);
    EXPECT_LT(rel_l2(q.grad(), q64.grad()), tol(dtype, 16)) << dtype;
    EXPECT_LT(rel_l2(k.grad(), k64.grad()), tol(dtype, 16)) << dtype;
    EXPECT_LT(rel_l2(v.grad(), v64.grad()), tol(dtype, 16)) << dtype;
  }
  auto q = torch::randn({1, 2, 8, 4}, opts(torch::kFloat));
  expect_error([&] { unswag::chunked_attention(q, q, q, 0.5, 0, 4, torch::zeros({1, 7}, opts(torch::kFloat))); },
               {"key_bias must be a floating [B, T] = [1, 8]"});
}

TEST_P(TransformerOps, ChunkedAttentionIsCausal) {
  // Changing only later tokens must not move earlier outputs.
  auto q = torch::randn({1, 2, 20, 8}, opts(torch::kFloat)), k = torch::randn({1, 1, 20, 8}, opts(torch::kFloat));
  auto v = torch::randn({1, 1, 20, 8}, opts(torch::kFloat));
  const auto a = unswag::chunked_attention(q, k, v, 0.3, 0, 6);
  auto k2 = k.clone(), v2 = v.clone();
  k2.narrow(2, 12, 8).normal_();
  v2.narrow(2, 12, 8).normal_();
  const auto b = unswag::chunked_attention(q, k2, v2, 0.3, 0, 6);
  EXPECT_TRUE(torch::equal(a.narrow(2, 0, 12), b.narrow(2, 0, 12)));
  EXPECT_FALSE(torch::equal(a.narrow(2, 12, 8), b.narrow(2, 12, 8)));
}

TEST_P(TransformerOps, ChunkedAttentionErrors) {
  auto q = torch::randn({1, 3, 8, 4}, opts(torch::kFloat)), k = torch::randn({1, 2, 8, 4}, opts(torch::kFloat));
  expect_error([&] { unswag::chunked_attention(q, k, k, 0.5); }, {"multiple of k/v heads"});
  expect_error([&] { unswag::chunked_attention(q, q.narrow(2, 0, 4), q, 0.5); }, {"k and v must be"});
  expect_error([&] { unswag::chunked_attention(q, q, q, 0.5, -1); }, {"window"});
  expect_error([&] { unswag::chunked_attention(q, q, q, 0.5, 0, 0); }, {"chunk"});
  expect_error([&] { unswag::chunked_attention(q.flatten(0, 1), q, q, 0.5); }, {"[B, heads, T, head_dim]"});
  auto e = torch::randn({1, 2, 0, 4}, opts(torch::kFloat));
  EXPECT_EQ(unswag::chunked_attention(e, e, e, 0.5).sizes(), e.sizes());
}

// -------------------------------------------------- linear_cross_entropy ----

TEST_P(TransformerOps, LinearCrossEntropyMatchesFloat64) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (auto dtype : unswag::test::float_dtypes()) {
    const int64_t N = 45, d = 24, V = 131;
    auto [h, h64] = leaf({N, d}, dtype);
    auto [w, w64] = leaf({V, d}, dtype, 0.5);
    auto targets = torch::randint(0, V, {N}, opts(torch::kLong));
    targets.index_put_({torch::randint(0, N, {7}, opts(torch::kLong))}, -100);
    // The reference: logits rounded to dtype as transformers computes them, then float64.
    const auto z64 = torch::matmul(h64, w64.t());
    const auto ref = torch::nn::functional::cross_entropy(
        z64, targets, torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100));
    for (int64_t chunk : {int64_t(0), int64_t(8), int64_t(45), int64_t(1)}) {
      h.mutable_grad() = torch::Tensor();
      w.mutable_grad() = torch::Tensor();
      const auto loss = unswag::linear_cross_entropy(h, w, targets, chunk);
      EXPECT_EQ(loss.scalar_type(), torch::kFloat);
      EXPECT_NEAR(loss.item<double>(), ref.item<double>(), tol(dtype, 16) * ref.item<double>()) << dtype;
      (loss * 1.7).backward();
      if (chunk == 0) (ref * 1.7).backward();
      EXPECT_LT(rel_l2(h.grad(), h64.grad()), tol(dtype, 16)) << dtype << " chunk " << chunk;
      EXPECT_LT(rel_l2(w.grad(), w64.grad()), tol(dtype, 16)) << dtype << " chunk " << chunk;
    }
  }
}

TEST_P(TransformerOps, LinearCrossEntropyEdgeCasesAndErrors) {
  auto h = torch::randn({4, 8}, opts(torch::kFloat)), w = torch::randn({10, 8}, opts(torch::kFloat));
  // All targets ignored: NaN, as torch's cross_entropy.
  EXPECT_TRUE(std::isnan(unswag::linear_cross_entropy(h, w, torch::full({4}, -100, opts(torch::kLong))).item<double>()));
  expect_error([&] { unswag::linear_cross_entropy(h, w, torch::tensor({0, 1, 2, 10}, opts(torch::kLong))); },
               {"targets must be in [0, 10)"});
  expect_error([&] { unswag::linear_cross_entropy(h, w, torch::zeros({3}, opts(torch::kLong))); }, {"targets", "[3]"});
  expect_error([&] { unswag::linear_cross_entropy(h, w.t(), torch::zeros({4}, opts(torch::kLong))); },
               {"weight [vocab, d]"});
  expect_error([&] { unswag::linear_cross_entropy(h, w, torch::zeros({4}, opts(torch::kInt))); }, {"int64"});
}

// ------------------------------------------------------- qkv_projection ----

// Values and every gradient against three linear maps in float64 (GQA shapes:
// k and v narrower than q), with and without biases, for an x that is a
// non-contiguous view, and with one output unused (its grad undefined).
TEST_P(TransformerOps, QkvProjectionMatchesThreeLinearMaps) {
  const int64_t n = 37;
  for (auto dtype : unswag::test::float_dtypes()) {
    for (bool bias : {false, true}) {
      for (bool use_v : {true, false}) {
        SCOPED_TRACE(::testing::Message() << dtype << " bias " << bias << " use_v " << use_v);
        auto [x0, x64] = leaf({3, n, 5}, dtype);  // used as its [3, 5, n] transpose
        auto [wq, wq64] = leaf({24, n}, dtype, 0.2);
        auto [wk, wk64] = leaf({8, n}, dtype, 0.2);
        auto [wv, wv64] = leaf({8, n}, dtype, 0.2);
        auto [bq, bq64] = leaf({24}, dtype);
        auto [bk, bk64] = leaf({8}, dtype);
        auto [bv, bv64] = leaf({8}, dtype);
        const auto x = x0.transpose(1, 2), xr = x64.transpose(1, 2);
        ASSERT_FALSE(x.is_contiguous());
        auto opt = [&](const torch::Tensor& b) { return bias ? std::optional<torch::Tensor>(b) : std::nullopt; };
        auto [q, k, v] = unswag::qkv_projection(x, wq, wk, wv, opt(bq), opt(bk), opt(bv));
        auto lin = [&](const torch::Tensor& w, const torch::Tensor& b) {
          return bias ? torch::nn::functional::linear(xr, w, b) : torch::nn::functional::linear(xr, w);
        };
        const auto qr = lin(wq64, bq64), kr = lin(wk64, bk64), vr = lin(wv64, bv64);
        EXPECT_LT(rel_l2(q, qr), tol(dtype, 8));
        EXPECT_LT(rel_l2(k, kr), tol(dtype, 8));
        EXPECT_LT(rel_l2(v, vr), tol(dtype, 8));
        const auto gq = torch::randn_like(qr), gk = torch::randn_like(kr), gv = torch::randn_like(vr);
        auto loss = (q * gq.to(dtype)).sum() + (k * gk.to(dtype)).sum();
        auto loss64 = (qr * gq).sum() + (kr * gk).sum();
        if (use_v) {
          loss = loss + (v * gv.to(dtype)).sum();
          loss64 = loss64 + (vr * gv).sum();
        }
        loss.backward();
        loss64.backward();
        EXPECT_LT(rel_l2(x0.grad(), x64.grad()), tol(dtype, 16));
        EXPECT_LT(rel_l2(wq.grad(), wq64.grad()), tol(dtype, 16));
        EXPECT_LT(rel_l2(wk.grad(), wk64.grad()), tol(dtype, 16));
        if (use_v) EXPECT_LT(rel_l2(wv.grad(), wv64.grad()), tol(dtype, 16));
        else EXPECT_FALSE(wv.grad().defined());
        if (bias) {
          EXPECT_LT(rel_l2(bq.grad(), bq64.grad()), tol(dtype, 16));
          EXPECT_LT(rel_l2(bk.grad(), bk64.grad()), tol(dtype, 16));
        } else {
          EXPECT_FALSE(bq.grad().defined());
        }
      }
    }
  }
}

TEST_P(TransformerOps, QkvProjectionEmptyAndErrors) {
  auto x = torch::randn({2, 0, 6}, opts(torch::kFloat)).requires_grad_(true);
  auto w = torch::randn({4, 6}, opts(torch::kFloat)).requires_grad_(true);
  auto [q, k, v] = unswag::qkv_projection(x, w, w, w);
  EXPECT_EQ(q.sizes(), (std::vector<int64_t>{2, 0, 4}));
  (q.sum() + k.sum() + v.sum()).backward();
  EXPECT_EQ(x.grad().sizes(), x.sizes());
  EXPECT_EQ(w.grad().abs().sum().item<double>(), 0.0);
  const auto x2 = torch::randn({3, 6}, opts(torch::kFloat));
  expect_error([&] { unswag::qkv_projection(x2, w, w.narrow(1, 0, 5), w); }, {"'wk'", "[out, 6]", "[4, 5]"});
  expect_error([&] { unswag::qkv_projection(x2, w, w, w.to(torch::kDouble)); }, {"'wv'", "dtype"});
  expect_error([&] { unswag::qkv_projection(x2.to(torch::kInt), w, w, w); }, {"qkv_projection", "'x'"});
  expect_error([&] { unswag::qkv_projection(x2, w, w, w, torch::zeros({5}, opts(torch::kFloat))); },
               {"'bq'", "[4]", "[5]"});
  if (x2.is_cuda()) expect_error([&] { unswag::qkv_projection(x2, w.cpu(), w, w); }, {"'wq'", "same device"});
}

UNSWAG_INSTANTIATE_DEVICES(TransformerOps);

}  // namespace
