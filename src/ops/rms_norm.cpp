// unswag::rms_norm: RMSNorm whose backward keeps only the input and the fp32
// reciprocal RMS per row (include/unswag/nn/functional.h).
//
// Forward (fp32 inside, as transformers): r = 1/sqrt(mean(x^2) + eps),
// xh = x r, y = w * cast(xh) (Llama) or cast(xh (1 + w)) (Gemma).
// Backward: with g = dL/dxh (= dy w, or dy (1 + w)),
//   dx = r (g - xh mean(g xh)),   dw = sum over rows of dy xh.
// Plain autograd keeps x in fp32, xh in fp32 and its cast (10 bytes per
// element for bf16 x); this keeps x (2) and 4 bytes per row.
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/common.h"
#include "unswag/nn/functional.h"

namespace unswag {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, double eps,
                            bool add_one) {
    const at::Tensor xf = x.to(at::kFloat);
    const at::Tensor rstd = at::rsqrt(xf.pow(2).mean(-1, true) + eps);
    const at::Tensor xh = xf * rstd;
    at::Tensor y = add_one ? (xh * (1.0 + w.to(at::kFloat))).to(x.scalar_type()) : w * xh.to(x.scalar_type());
    ctx->save_for_backward({x, w, rstd});
    ctx->saved_data["add_one"] = add_one;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &rstd = saved[2];
    const bool add_one = ctx->saved_data["add_one"].toBool();
    const at::Tensor dy = grads[0].to(at::kFloat);
    const at::Tensor xh = x.to(at::kFloat) * rstd;
    // The value dw multiplies: xh itself (Gemma) or its cast to x's dtype (Llama).
    const at::Tensor xh_used = add_one ? xh : xh.to(x.scalar_type()).to(at::kFloat);
    const at::Tensor g = add_one ? dy * (1.0 + w.to(at::kFloat)) : dy * w.to(at::kFloat);
    at::Tensor dx, dw;
    if (ctx->needs_input_grad(0)) dx = (rstd * (g - xh * (g * xh).mean(-1, true))).to(x.scalar_type());
    if (ctx->needs_input_grad(1)) dw = (dy * xh_used).reshape({-1, w.numel()}).sum(0).to(w.scalar_type());
    return {dx, dw, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool add_one) {
  ops::check_float_tensor(x, "rms_norm", "x");
  TORCH_CHECK(weight.dim() == 1 && x.dim() >= 1 && weight.size(0) == x.size(-1),
              "rms_norm: weight must be [n] with n = x.size(-1) = ", x.dim() ? x.size(-1) : 0, ", got ",
              weight.sizes());
  TORCH_CHECK(weight.device() == x.device(), "rms_norm: weight is on ", weight.device(), " but x is on ",
              x.device());
  TORCH_CHECK(eps > 0, "rms_norm: eps must be positive, got ", eps);
  return RMSNormFunction::apply(x, weight, eps, add_one);
}

}  // namespace unswag

TORCH_LIBRARY_FRAGMENT(unswag, m) { m.def("rms_norm(Tensor x, Tensor weight, float eps, bool add_one=False) -> Tensor"); }
TORCH_LIBRARY_IMPL(unswag, CompositeImplicitAutograd, m) { m.impl("rms_norm", &unswag::rms_norm); }
