// unswag::rms_norm: RMSNorm whose backward keeps only the input and the fp32
// reciprocal RMS per row (include/unswag/nn/functional.h).
//
// Forward (fp32 inside, as transformers): r = 1/sqrt(mean(x^2) + eps),
// xh = x r, y = w * cast(xh) (Llama) or cast(xh (1 + w)) (Gemma).
// Backward: with g = dL/dxh (= dy w, or dy (1 + w)),
//   dx = r (g - xh mean(g xh)),   dw = sum over rows of dy xh.
// Plain autograd keeps x in fp32, xh in fp32 and its cast (10 bytes per
// element for bf16 x); this keeps x (2) and 4 bytes per row.
// fp32/fp16/bf16 with w in x's dtype run the fused kernels of
// src/kernels/rms_norm.h (one pass per direction); other combinations
// (float64, mixed dtypes) compose ATen ops with the same math.
#include <torch/autograd.h>
#include <torch/library.h>

#include "kernels/rms_norm.h"
#include "ops/common.h"
#include "unswag/nn/functional.h"

namespace unswag {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
  static bool fused(const at::Tensor& x, const at::Tensor& w) {
    return x.scalar_type() != at::kDouble && w.scalar_type() == x.scalar_type();
  }

  static kernels::RmsNormParams params(const at::Tensor& x, const at::Tensor& w, double eps, bool add_one) {
    kernels::RmsNormParams p;
    p.dtype = ops::to_kernel_dtype(x.scalar_type());
    p.n = x.size(-1);
    p.rows = p.n == 0 ? 0 : x.numel() / p.n;
    p.eps = eps;
    p.add_one = add_one;
    p.x = x.const_data_ptr();
    p.w = w.const_data_ptr();
    return p;
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& w_in, double eps,
                            bool add_one) {
    ctx->saved_data["add_one"] = add_one;
    ctx->saved_data["eps"] = eps;
    if (fused(x_in, w_in)) {
      const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
      at::Tensor y = at::empty_like(x);
      at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
      auto p = params(x, w, eps, add_one);
      p.y = y.data_ptr();
      p.rstd = rstd.data_ptr<float>();
      ops::launch(x.device(), p, p.rows, &kernels::rms_norm_forward_cpu, UNSWAG_CUDA_FN(rms_norm_forward_cuda));
      ctx->save_for_backward({x, w, rstd});
      return y;
    }
    const at::Tensor& x = x_in;
    const at::Tensor& w = w_in;
    const auto acc = ops::opmath_type(x);
    const at::Tensor xf = x.to(acc);
    const at::Tensor rstd = at::rsqrt(xf.pow(2).mean(-1, true) + eps);
    const at::Tensor xh = xf * rstd;
    at::Tensor y = add_one ? (xh * (1.0 + w.to(acc))).to(x.scalar_type()) : w * xh.to(x.scalar_type());
    ctx->save_for_backward({x, w, rstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &rstd = saved[2];
    const bool add_one = ctx->saved_data["add_one"].toBool();
    if (fused(x, w)) {
      const at::Tensor dy = grads[0].contiguous();
      auto p = params(x, w, ctx->saved_data["eps"].toDouble(), add_one);
      p.rstd = const_cast<float*>(rstd.const_data_ptr<float>());
      p.dy = dy.const_data_ptr();
      at::Tensor dx, dw, partial;
      if (ctx->needs_input_grad(0)) {
        dx = at::empty_like(x);
        p.dx = dx.data_ptr();
      }
      if (ctx->needs_input_grad(1)) {
        partial = at::empty({kernels::rms_row_blocks(p.rows), p.n}, x.options().dtype(at::kFloat));
        p.dw_partial = partial.data_ptr<float>();
      }
      ops::launch(x.device(), p, kernels::rms_row_blocks(p.rows), &kernels::rms_norm_backward_cpu,
                  UNSWAG_CUDA_FN(rms_norm_backward_cuda));
      if (partial.defined()) dw = (p.rows == 0 ? at::zeros({p.n}, partial.options()) : partial.sum(0)).to(w.scalar_type());
      return {dx, dw, at::Tensor(), at::Tensor()};
    }
    const auto acc = ops::opmath_type(x);
    const at::Tensor dy = grads[0].to(acc);
    const at::Tensor xh = x.to(acc) * rstd;
    // The value dw multiplies: xh itself (Gemma) or its cast to x's dtype (Llama).
    const at::Tensor xh_used = add_one ? xh : xh.to(x.scalar_type()).to(acc);
    const at::Tensor g = add_one ? dy * (1.0 + w.to(acc)) : dy * w.to(acc);
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
