// unswag::linear_cross_entropy: the LM head and the cross-entropy loss in
// chunks of tokens, so the [tokens, vocab] logits never exist whole
// (include/unswag/nn/functional.h).
//
// For a chunk of rows h_c: z = h_c W^T (h's dtype, then fp32, as transformers
// computes logits), l = logsumexp(z), loss_i = l_i - z_i,t_i. Forward keeps h,
// W (no copies) and l (4 bytes per token). Backward recomputes z per chunk:
//   dz = (softmax(z) - onehot(t)) * g / n_valid  (0 on ignored rows)
//   dh_c = dz W,   dW += dz^T h_c  (accumulated in fp32 across chunks)
// One extra chunk matmul (the recomputed z) buys freedom from the logits:
// at 16k tokens and a 128256 vocab they are 8.4 GB in fp32. (float64 inputs
// compute in float64 throughout.)
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/common.h"
#include "unswag/nn/functional.h"

namespace unswag {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct LinearCrossEntropyFunction : public torch::autograd::Function<LinearCrossEntropyFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& w, const at::Tensor& targets,
                            int64_t chunk, int64_t ignore_index) {
    const int64_t N = h.size(0);
    const at::Tensor valid = targets != ignore_index;
    const at::Tensor n_valid = valid.sum().to(ops::opmath_type(h));
    at::Tensor loss_sum = at::zeros({}, h.options().dtype(ops::opmath_type(h)));
    at::Tensor lse = at::empty({N}, h.options().dtype(ops::opmath_type(h)));
    for (int64_t s = 0; s < N; s += chunk) {
      const int64_t e = std::min(N, s + chunk);
      const at::Tensor z = at::matmul(h.narrow(0, s, e - s), w.t()).to(ops::opmath_type(h));
      const at::Tensor l = at::logsumexp(z, -1);
      const at::Tensor t = targets.narrow(0, s, e - s);
      const at::Tensor v = valid.narrow(0, s, e - s);
      const at::Tensor zt = z.gather(1, t.clamp_min(0).unsqueeze(1)).squeeze(1);
      loss_sum.add_(((l - zt) * v).sum());
      lse.narrow(0, s, e - s).copy_(l);
    }
    ctx->save_for_backward({h, w, targets, lse, n_valid});
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["ignore_index"] = ignore_index;
    return loss_sum / n_valid;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &w = saved[1], &targets = saved[2], &lse = saved[3], &n_valid = saved[4];
    const int64_t chunk = ctx->saved_data["chunk"].toInt(), ignore_index = ctx->saved_data["ignore_index"].toInt();
    const bool want_h = ctx->needs_input_grad(0), want_w = ctx->needs_input_grad(1);
    const int64_t N = h.size(0);
    const at::Tensor scale = grads[0].to(ops::opmath_type(h)) / n_valid;
    at::Tensor dh = want_h ? at::empty_like(h) : at::Tensor();
    at::Tensor dw = want_w ? at::zeros(w.sizes(), w.options().dtype(ops::opmath_type(h))) : at::Tensor();
    for (int64_t s = 0; s < N; s += chunk) {
      const int64_t e = std::min(N, s + chunk);
      const at::Tensor hc = h.narrow(0, s, e - s);
      const at::Tensor t = targets.narrow(0, s, e - s);
      const at::Tensor z = at::matmul(hc, w.t()).to(ops::opmath_type(h));
      at::Tensor dz = (z - lse.narrow(0, s, e - s).unsqueeze(1)).exp_();
      dz.scatter_add_(1, t.clamp_min(0).unsqueeze(1), at::full({e - s, 1}, -1.0f, dz.options()));
      dz.mul_(((t != ignore_index).to(ops::opmath_type(h)) * scale).unsqueeze(1));
      const at::Tensor dzc = dz.to(h.scalar_type());
      if (want_h) dh.narrow(0, s, e - s).copy_(at::matmul(dzc, w));
      if (want_w) dw.add_(at::matmul(dzc.t(), hc));
    }
    return {dh, want_w ? dw.to(w.scalar_type()) : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor linear_cross_entropy(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& targets,
                                int64_t chunk_tokens, int64_t ignore_index) {
  const char* op = "linear_cross_entropy";
  ops::check_float_tensor(h, op, "h");
  ops::check_same(weight, h, op, "weight", "h", false);
  TORCH_CHECK(h.dim() == 2 && weight.dim() == 2 && weight.size(1) == h.size(1), op,
              ": h must be [N, d] and weight [vocab, d], got h ", h.sizes(), " and weight ", weight.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == h.size(0), op,
              ": targets must be int64 [N] with N = ", h.size(0), ", got ", targets.scalar_type(), " ",
              targets.sizes());
  TORCH_CHECK(targets.device() == h.device(), op, ": targets are on ", targets.device(), " but h is on ", h.device());
  TORCH_CHECK(chunk_tokens >= 0, op, ": chunk_tokens must be >= 0 (0 = automatic), got ", chunk_tokens);
  if (chunk_tokens == 0) chunk_tokens = std::max<int64_t>(1, (int64_t(1) << 28) / std::max<int64_t>(1, weight.size(0)));
  if (h.size(0) > 0) {
    // An out-of-range target would be gathered silently; check them once.
    const at::Tensor bad = (targets != ignore_index).logical_and(targets.lt(0).logical_or(targets.ge(weight.size(0))));
    TORCH_CHECK(!bad.any().item<bool>(), op, ": targets must be in [0, ", weight.size(0), ") or ", ignore_index);
  }
  return LinearCrossEntropyFunction::apply(h.contiguous(), weight, targets.contiguous(), chunk_tokens, ignore_index);
}

}  // namespace unswag

TORCH_LIBRARY_FRAGMENT(unswag, m) {
  m.def("linear_cross_entropy(Tensor h, Tensor weight, Tensor targets, int chunk_tokens=0, int ignore_index=-100) -> Tensor");
}
TORCH_LIBRARY_IMPL(unswag, CompositeImplicitAutograd, m) {
  m.impl("linear_cross_entropy", &unswag::linear_cross_entropy);
}
