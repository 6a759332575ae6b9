// unswag::chunked_attention: causal (sliding-window) attention with GQA in
// query chunks, keeping O(T) state for backward (include/unswag/nn/functional.h).
//
// For a chunk of query rows Q_c and the keys K_r they may see (causal, and
// within the window):
//   S = scale Q_c K_r^T (masked), l = logsumexp(S) per row, P = exp(S - l),
//   O_c = P V_r.
// Backward recomputes S and P from the kept l (as FlashAttention does):
//   dV_r += P^T dO_c,  dP = dO_c V_r^T,  delta = rowsum(dO_c * O_c),
//   dS = P (dP - delta),  dQ_c = scale dS K_r,  dK_r += scale dS^T Q_c.
// GQA: the H query heads are viewed as [Hkv, G] so a key head serves its G
// query heads without being repeated in memory; dK, dV sum over G.
// key_bias (optional, [B, T] fp32) is added to every query's score of key j:
// a large negative bias (PSA's pruned keys) removes a key without changing the
// kernel's shape; it is a constant (no gradient).
// Peak extra memory: one chunk's scores, [B, H, chunk, keys] in fp32.
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "ops/common.h"
#include "unswag/nn/functional.h"

namespace unswag {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The key range [k0, k1) rows [s, e) may see, and the [e - s, k1 - k0] mask
// (true = masked) of keys after the query or outside the window.
struct Span {
  int64_t k0, k1;
  at::Tensor masked;
};

Span span_of(int64_t s, int64_t e, int64_t window, const at::Device& device) {
  Span sp;
  sp.k1 = e;
  sp.k0 = window > 0 ? std::max<int64_t>(0, s - window + 1) : 0;
  auto opt = at::TensorOptions().device(device).dtype(at::kLong);
  const at::Tensor qi = at::arange(s, e, opt).unsqueeze(1);
  const at::Tensor kj = at::arange(sp.k0, sp.k1, opt).unsqueeze(0);
  sp.masked = kj > qi;
  if (window > 0) sp.masked = sp.masked.logical_or(kj <= qi - window);
  return sp;
}

// Scores of chunk rows [s, e) in ops::opmath_type (fp32; fp64 for fp64 inputs): q5 [B, Hkv, G, T, D], k [B, Hkv, T, D].
at::Tensor chunk_scores(const at::Tensor& q5, const at::Tensor& k, const at::Tensor& key_bias, int64_t s, int64_t e,
                        const Span& sp, double scale) {
  const at::Tensor qc = q5.narrow(3, s, e - s);
  const int64_t K = sp.k1 - sp.k0;
  const at::Tensor kr = k.narrow(2, sp.k0, K).unsqueeze(2);  // [B, Hkv, 1, K, D]
  at::Tensor scores = at::matmul(qc, kr.transpose(-1, -2)).to(ops::opmath_type(q5)).mul_(scale);
  if (key_bias.numel() > 0)
    scores.add_(key_bias.narrow(1, sp.k0, K).to(scores.scalar_type()).view({key_bias.size(0), 1, 1, 1, K}));
  return scores.masked_fill_(sp.masked, -std::numeric_limits<float>::infinity());
}

struct ChunkedAttentionFunction : public torch::autograd::Function<ChunkedAttentionFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& key_bias, double scale, int64_t window, int64_t chunk) {
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1);
    const at::Tensor q5 = q.view({B, Hkv, H / Hkv, T, D});
    at::Tensor out = at::empty({B, Hkv, H / Hkv, T, v.size(3)}, q.options());
    at::Tensor lse = at::empty({B, Hkv, H / Hkv, T}, q.options().dtype(ops::opmath_type(q)));
    for (int64_t s = 0; s < T; s += chunk) {
      const int64_t e = std::min(T, s + chunk);
      const Span sp = span_of(s, e, window, q.device());
      const at::Tensor scores = chunk_scores(q5, k, key_bias, s, e, sp, scale);
      const at::Tensor l = at::logsumexp(scores, -1, true);
      const at::Tensor p = (scores - l).exp_().to(q.scalar_type());
      out.narrow(3, s, e - s).copy_(at::matmul(p, v.narrow(2, sp.k0, sp.k1 - sp.k0).unsqueeze(2)));
      lse.narrow(3, s, e - s).copy_(l.squeeze(-1));
    }
    ctx->save_for_backward({q, k, v, out, lse, key_bias});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window"] = window;
    ctx->saved_data["chunk"] = chunk;
    return out.view({B, H, T, v.size(3)});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4],
                     &key_bias = saved[5];
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t window = ctx->saved_data["window"].toInt(), chunk = ctx->saved_data["chunk"].toInt();
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), G = H / Hkv;
    const at::Tensor q5 = q.view({B, Hkv, G, T, D});
    const at::Tensor dout = grads[0].contiguous().view({B, Hkv, G, T, v.size(3)});
    // delta_i = sum_d dO_id O_id (= sum_j P_ij dP_ij), fp32.
    const at::Tensor delta = (dout.to(ops::opmath_type(q)) * out.to(ops::opmath_type(q))).sum(-1, true);
    at::Tensor dq = at::empty_like(q5);
    at::Tensor dk = at::zeros(k.sizes(), k.options().dtype(ops::opmath_type(q)));
    at::Tensor dv = at::zeros(v.sizes(), v.options().dtype(ops::opmath_type(q)));
    for (int64_t s = 0; s < T; s += chunk) {
      const int64_t e = std::min(T, s + chunk);
      const Span sp = span_of(s, e, window, q.device());
      const int64_t K = sp.k1 - sp.k0;
      const at::Tensor scores = chunk_scores(q5, k, key_bias, s, e, sp, scale);
      const at::Tensor p = (scores - lse.narrow(3, s, e - s).unsqueeze(-1)).exp_();  // fp32
      const at::Tensor doc = dout.narrow(3, s, e - s);
      const at::Tensor kr = k.narrow(2, sp.k0, K).unsqueeze(2), vr = v.narrow(2, sp.k0, K).unsqueeze(2);
      // dV_r += sum over G of P^T dO.
      dv.narrow(2, sp.k0, K).add_(at::matmul(p.to(q.scalar_type()).transpose(-1, -2), doc).to(ops::opmath_type(q)).sum(2));
      const at::Tensor dp = at::matmul(doc, vr.transpose(-1, -2)).to(ops::opmath_type(q));
      const at::Tensor ds = (p * (dp - delta.narrow(3, s, e - s))).mul_(scale).to(q.scalar_type());
      dq.narrow(3, s, e - s).copy_(at::matmul(ds, kr));
      dk.narrow(2, sp.k0, K).add_(at::matmul(ds.transpose(-1, -2), q5.narrow(3, s, e - s)).to(ops::opmath_type(q)).sum(2));
    }
    return {dq.view({B, H, T, D}), dk.to(k.scalar_type()), dv.to(v.scalar_type()), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor chunked_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                             int64_t window, int64_t chunk, const std::optional<at::Tensor>& key_bias) {
  const char* op = "chunked_attention";
  ops::check_float_tensor(q, op, "q");
  ops::check_same(k, q, op, "k", "q", false);
  ops::check_same(v, q, op, "v", "q", false);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be [B, heads, T, head_dim], got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(2) == q.size(2) &&
                  v.size(2) == q.size(2) && k.size(3) == q.size(3) && v.size(1) == k.size(1),
              op, ": k and v must be [B, kv_heads, T, head_dim] matching q ", q.sizes(), ", got k ", k.sizes(),
              " and v ", v.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": q heads (", q.size(1),
              ") must be a multiple of k/v heads (", k.size(1), ")");
  TORCH_CHECK(window >= 0, op, ": window must be >= 0 (0 = none), got ", window);
  TORCH_CHECK(chunk > 0, op, ": chunk must be positive, got ", chunk);
  // No bias: an empty tensor (autograd::Function takes no undefined tensors).
  at::Tensor bias = at::empty({0}, q.options().dtype(at::kFloat));
  if (key_bias.has_value() && key_bias->defined()) {
    bias = *key_bias;
    TORCH_CHECK(bias.is_floating_point() && bias.dim() == 2 && bias.size(0) == q.size(0) && bias.size(1) == k.size(2),
                op, ": key_bias must be a floating [B, T] = [", q.size(0), ", ", k.size(2), "] tensor, got ",
                bias.scalar_type(), " ", bias.sizes());
    TORCH_CHECK(bias.device() == q.device(), op, ": key_bias must be on ", q.device(), ", got ", bias.device());
    bias = bias.detach().contiguous();
  }
  if (q.numel() == 0 || k.numel() == 0) return at::zeros({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  return ChunkedAttentionFunction::apply(q.contiguous(), k.contiguous(), v.contiguous(), bias, scale, window, chunk);
}

}  // namespace unswag

TORCH_LIBRARY_FRAGMENT(unswag, m) {
  m.def("chunked_attention(Tensor q, Tensor k, Tensor v, float scale, int window=0, int chunk=1024, "
        "Tensor? key_bias=None) -> Tensor");
}
TORCH_LIBRARY_IMPL(unswag, CompositeImplicitAutograd, m) { m.impl("chunked_attention", &unswag::chunked_attention); }
