// unswag::rotary_embedding: RoPE on the token-major [B, T, H, D] layout
// (include/unswag/nn/functional.h). ATen's `x * cos + rotate_half(x) * sin`
// on the [B, H, T, D] transpose runs about five strided passes each way (the
// negation, the cat, two products, the sum; autograd's backward as many
// again); this is one pass each way over contiguous rows (src/kernels/rope.h),
// and its output is already in the layout FlashAttention reads.
#include <torch/autograd.h>
#include <torch/library.h>

#include "kernels/rope.h"
#include "ops/common.h"
#include "unswag/nn/functional.h"

namespace unswag {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Runs the kernel: x [B, T, H, D] with d contiguous (any other strides: read
// in place), cos/sin [Bc, T, D] contiguous; y contiguous.
at::Tensor run_rope(const at::Tensor& x_any, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  const at::Tensor x = x_any.stride(3) == 1 || x_any.numel() == 0 ? x_any : x_any.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  kernels::RopeParams p;
  p.dtype = ops::to_kernel_dtype(x.scalar_type());
  p.time = x.size(1);
  p.heads = x.size(2);
  p.dim = x.size(3);
  p.rows = x.numel() == 0 ? 0 : x.numel() / p.dim;
  p.cos_per_batch = cos.size(0) == x.size(0) && x.size(0) > 1;
  p.inverse = inverse;
  p.x = x.const_data_ptr();
  p.x_stride_b = x.stride(0);
  p.x_stride_t = x.stride(1);
  p.x_stride_h = x.stride(2);
  p.cos = cos.const_data_ptr();
  p.sin = sin.const_data_ptr();
  p.y = y.data_ptr();
  ops::launch(x.device(), p, p.rows, &kernels::rope_cpu, UNSWAG_CUDA_FN(rope_cuda));
  return y;
}

struct RopeFunction : public torch::autograd::Function<RopeFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    ctx->save_for_backward({cos, sin});
    return run_rope(x, cos, sin, /*inverse=*/false);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {run_rope(grads[0], saved[0], saved[1], /*inverse=*/true), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor rotary_embedding(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  ops::check_float_tensor(x, "rotary_embedding", "x");
  TORCH_CHECK(x.dim() == 4, "rotary_embedding: x must be [B, T, H, D] (token-major), got ", x.sizes());
  const int64_t B = x.size(0), T = x.size(1), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, "rotary_embedding: the head size x.size(3) must be even, got ", D);
  auto table = [&](const at::Tensor& t, const char* arg) {
    ops::check_same(t, x, "rotary_embedding", arg, "x", /*same_shape=*/false);
    // [Bc, 1, T, D] (transformers' unsqueezed form) or [Bc, T, D].
    const at::Tensor t3 = t.dim() == 4 && t.size(1) == 1 ? t.squeeze(1) : t;
    TORCH_CHECK(t3.dim() == 3 && (t3.size(0) == B || t3.size(0) == 1) && t3.size(1) == T && t3.size(2) == D,
                "rotary_embedding: argument '", arg, "' must be [", B, " or 1, ", T, ", ", D, "] or [", B,
                " or 1, 1, ", T, ", ", D, "] for x of shape ", x.sizes(), ", got ", t.sizes());
    TORCH_CHECK(!t.requires_grad(), "rotary_embedding: argument '", arg,
                "' requires grad, but the op treats cos and sin as constants (compute them under no_grad or "
                "detach them)");
    return t3.contiguous();
  };
  const at::Tensor c = table(cos, "cos"), s = table(sin, "sin");
  return RopeFunction::apply(x, c, s);
}

}  // namespace unswag

TORCH_LIBRARY_FRAGMENT(unswag, m) { m.def("rotary_embedding(Tensor x, Tensor cos, Tensor sin) -> Tensor"); }
TORCH_LIBRARY_IMPL(unswag, CompositeImplicitAutograd, m) { m.impl("rotary_embedding", &unswag::rotary_embedding); }
