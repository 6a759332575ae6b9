// Compressed activations as torch ops: the CPU/CUDA implementations of
// fewbit_forward / fewbit_backward (relu_1bit is the 1-bit ReLU case), the
// autograd functions that save only the packed codes, and the public C++ API.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/activations.h"
#include "ops/common.h"
#include "unswag/ops.h"

namespace unswag {
namespace ops {

using kernels::Act;
using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

std::tuple<at::Tensor, at::Tensor> fewbit_forward_impl(const at::Tensor& x_in, Act act, int64_t bits,
                                                       const char* op) {
  check_float_tensor(x_in, op, "x");
  return fewbit_forward_table(x_in, act, checked_table(act, bits, op));
}

std::tuple<at::Tensor, at::Tensor> side_forward_impl(const at::Tensor& x, Act act, const char* op) {
  check_float_tensor(x, op, "x");
  TORCH_CHECK(act == Act::kGELU || act == Act::kGELUTanh || act == Act::kSiLU, op,
              ": the exact (inverse) derivative scheme needs gelu, gelu_tanh or silu, got ", kernels::act_name(act));
  kernels::FewbitTable side;
  side.bits = 1;
  side.boundaries[0] = float(kernels::activation_argmin(act));
  return fewbit_forward_table(x, act, side);
}

at::Tensor inverse_backward_impl(const at::Tensor& grad_in, const at::Tensor& y_in, const at::Tensor& side, Act act,
                                 const char* op) {
  check_float_tensor(grad_in, op, "grad_y");
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n = grad.numel();
  check_codes(side, grad, kernels::code_words(n, 1), op, "side");
  check_same(y_in, grad, op, "y", "grad_y", false);
  TORCH_CHECK(y_in.numel() == n, op, ": argument 'y' must have ", n, " elements, got ", y_in.numel());
  const at::Tensor y = y_in.contiguous();
  kernels::InverseBackwardParams p;
  p.y = y.data_ptr();
  at::Tensor dx = at::empty_like(grad, at::MemoryFormat::Contiguous);
  p.grad_y = grad.data_ptr();
  p.side = reinterpret_cast<const uint32_t*>(side.data_ptr<int32_t>());
  p.grad_x = dx.data_ptr();
  p.n = n;
  p.dtype = to_kernel_dtype(grad.scalar_type());
  p.act = act;
  p.argmin = kernels::activation_argmin(act);
  p.fmin = kernels::act_forward(act, p.argmin);
  launch(grad.device(), p, (n + kernels::kCodeGroup - 1) / kernels::kCodeGroup, &kernels::inverse_backward_cpu,
         UNSWAG_CUDA_FN(inverse_backward_cuda));
  return dx;
}

std::tuple<at::Tensor, at::Tensor> fewbit_forward_table(const at::Tensor& x_in, Act act,
                                                        const kernels::FewbitTable& table) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  at::Tensor codes = at::empty({kernels::code_words(n, table.bits)}, x.options().dtype(at::kInt));
  kernels::FewbitForwardParams p;
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.codes = reinterpret_cast<uint32_t*>(codes.data_ptr<int32_t>());
  p.n = n;
  p.dtype = to_kernel_dtype(x.scalar_type());
  p.act = act;
  p.table = table;
  launch(x.device(), p, (n + kernels::kCodeGroup - 1) / kernels::kCodeGroup, &kernels::fewbit_forward_cpu,
         UNSWAG_CUDA_FN(fewbit_forward_cuda));
  return {y, codes};
}

at::Tensor fewbit_backward_impl(const at::Tensor& grad_in, const at::Tensor& codes, Act act, int64_t bits,
                                const char* op) {
  check_float_tensor(grad_in, op, "grad_y");
  const auto& table = checked_table(act, bits, op);
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n = grad.numel();
  check_codes(codes, grad, kernels::code_words(n, int(bits)), op, bits == 1 && act == Act::kReLU ? "mask" : "codes");
  const at::Tensor c = codes.contiguous();
  at::Tensor dx = at::empty_like(grad, at::MemoryFormat::Contiguous);
  kernels::FewbitBackwardParams p;
  p.grad_y = grad.data_ptr();
  p.codes = reinterpret_cast<const uint32_t*>(c.data_ptr<int32_t>());
  p.grad_x = dx.data_ptr();
  p.n = n;
  p.dtype = to_kernel_dtype(grad.scalar_type());
  p.table = table;
  launch(grad.device(), p, (n + kernels::kCodeGroup - 1) / kernels::kCodeGroup, &kernels::fewbit_backward_cpu,
         UNSWAG_CUDA_FN(fewbit_backward_cuda));
  return dx;
}

namespace {

// Registered CPU/CUDA kernels.
std::tuple<at::Tensor, at::Tensor> fewbit_forward_kernel(const at::Tensor& x, c10::string_view activation,
                                                         int64_t bits) {
  return fewbit_forward_impl(x, parse_activation(std::string(activation), "unswag::fewbit_forward"), bits,
                             "unswag::fewbit_forward");
}
at::Tensor fewbit_backward_kernel(const at::Tensor& grad_y, const at::Tensor& codes, c10::string_view activation,
                                  int64_t bits) {
  return fewbit_backward_impl(grad_y, codes, parse_activation(std::string(activation), "unswag::fewbit_backward"),
                              bits, "unswag::fewbit_backward");
}
std::tuple<at::Tensor, at::Tensor> relu_1bit_forward_kernel(const at::Tensor& x) {
  return fewbit_forward_impl(x, Act::kReLU, 1, "unswag::relu_1bit_forward");
}
at::Tensor relu_1bit_backward_kernel(const at::Tensor& grad_y, const at::Tensor& mask) {
  return fewbit_backward_impl(grad_y, mask, Act::kReLU, 1, "unswag::relu_1bit_backward");
}

std::tuple<at::Tensor, at::Tensor> fewbit_table_op(c10::string_view activation, int64_t bits) {
  const Act act = parse_activation(std::string(activation), "unswag::fewbit_table");
  const auto& t = checked_table(act, bits, "unswag::fewbit_table");
  const int levels = 1 << t.bits;
  at::Tensor b = at::empty({levels - 1}, at::kDouble), v = at::empty({levels}, at::kDouble);
  for (int i = 0; i < levels - 1; ++i) b[i] = double(t.boundaries[i]);
  for (int i = 0; i < levels; ++i) v[i] = double(t.values[i]);
  return {b, v};
}

// The differentiable op: y = f(x); saves only the k-bit code of x.
struct FewbitFunction : public torch::autograd::Function<FewbitFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t act, int64_t bits, const char* op) {
    auto [y, codes] = fewbit_forward_impl(x, Act(act), bits, op);
    ctx->save_for_backward({codes});
    ctx->saved_data["act"] = act;
    ctx->saved_data["bits"] = bits;
    return y.view(x.sizes());
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const at::Tensor codes = ctx->get_saved_variables()[0];
    const Act act = Act(ctx->saved_data["act"].toInt());
    const int64_t bits = ctx->saved_data["bits"].toInt();
    at::Tensor dx = fewbit_backward_impl(grads[0], codes, act, bits, "unswag::fewbit backward");
    return {dx.view(grads[0].sizes()), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor relu_1bit_autograd(const at::Tensor& x) {
  return FewbitFunction::apply(x, int64_t(Act::kReLU), int64_t(1), "unswag::relu_1bit");
}
at::Tensor silu_fewbit_autograd(const at::Tensor& x, int64_t bits) {
  return FewbitFunction::apply(x, int64_t(Act::kSiLU), bits, "unswag::silu_fewbit");
}
at::Tensor gelu_fewbit_autograd(const at::Tensor& x, int64_t bits) {
  return FewbitFunction::apply(x, int64_t(Act::kGELU), bits, "unswag::gelu_fewbit");
}
at::Tensor silu_2bit_autograd(const at::Tensor& x) { return silu_fewbit_autograd(x, 2); }
at::Tensor gelu_2bit_autograd(const at::Tensor& x) { return gelu_fewbit_autograd(x, 2); }

// Below autograd (inference, or a caller that already disabled autograd) the
// ops are their activation, computed by the same kernel (the code is dropped).
at::Tensor fewbit_inference(const at::Tensor& x, Act act, int64_t bits, const char* op) {
  return std::get<0>(fewbit_forward_impl(x, act, bits, op)).view(x.sizes());
}
at::Tensor relu_1bit_inference(const at::Tensor& x) { return fewbit_inference(x, Act::kReLU, 1, "unswag::relu_1bit"); }
at::Tensor silu_fewbit_inference(const at::Tensor& x, int64_t bits) {
  return fewbit_inference(x, Act::kSiLU, bits, "unswag::silu_fewbit");
}
at::Tensor gelu_fewbit_inference(const at::Tensor& x, int64_t bits) {
  return fewbit_inference(x, Act::kGELU, bits, "unswag::gelu_fewbit");
}
at::Tensor silu_2bit_inference(const at::Tensor& x) { return silu_fewbit_inference(x, 2); }
at::Tensor gelu_2bit_inference(const at::Tensor& x) { return gelu_fewbit_inference(x, 2); }

}  // namespace
}  // namespace ops

TORCH_LIBRARY_IMPL(unswag, CPU, m) {
  m.impl("fewbit_forward", &ops::fewbit_forward_kernel);
  m.impl("fewbit_backward", &ops::fewbit_backward_kernel);
  m.impl("relu_1bit_forward", &ops::relu_1bit_forward_kernel);
  m.impl("relu_1bit_backward", &ops::relu_1bit_backward_kernel);
}
TORCH_LIBRARY_IMPL(unswag, CUDA, m) {
  m.impl("fewbit_forward", &ops::fewbit_forward_kernel);
  m.impl("fewbit_backward", &ops::fewbit_backward_kernel);
  m.impl("relu_1bit_forward", &ops::relu_1bit_forward_kernel);
  m.impl("relu_1bit_backward", &ops::relu_1bit_backward_kernel);
}
TORCH_LIBRARY_IMPL(unswag, CompositeExplicitAutograd, m) {
  m.impl("fewbit_table", &ops::fewbit_table_op);
  m.impl("relu_1bit", &ops::relu_1bit_inference);
  m.impl("silu_fewbit", &ops::silu_fewbit_inference);
  m.impl("gelu_fewbit", &ops::gelu_fewbit_inference);
  m.impl("silu_2bit", &ops::silu_2bit_inference);
  m.impl("gelu_2bit", &ops::gelu_2bit_inference);
}
TORCH_LIBRARY_IMPL(unswag, Autograd, m) {
  m.impl("relu_1bit", &ops::relu_1bit_autograd);
  m.impl("silu_fewbit", &ops::silu_fewbit_autograd);
  m.impl("gelu_fewbit", &ops::gelu_fewbit_autograd);
  m.impl("silu_2bit", &ops::silu_2bit_autograd);
  m.impl("gelu_2bit", &ops::gelu_2bit_autograd);
}

// ---- public C++ API: calls through the dispatcher, as Python does ----------
namespace {
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
}  // namespace

at::Tensor relu_1bit(const at::Tensor& x) {
  static auto op = op_handle<at::Tensor(const at::Tensor&)>("unswag::relu_1bit");
  return op.call(x);
}
at::Tensor silu_fewbit(const at::Tensor& x, int64_t bits) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, int64_t)>("unswag::silu_fewbit");
  return op.call(x, bits);
}
at::Tensor gelu_fewbit(const at::Tensor& x, int64_t bits) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, int64_t)>("unswag::gelu_fewbit");
  return op.call(x, bits);
}
std::tuple<at::Tensor, at::Tensor> fewbit_forward(const at::Tensor& x, const std::string& activation, int64_t bits) {
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::string_view, int64_t)>(
      "unswag::fewbit_forward");
  return op.call(x, activation, bits);
}
at::Tensor fewbit_backward(const at::Tensor& grad_y, const at::Tensor& codes, const std::string& activation,
                           int64_t bits) {
  static auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, int64_t)>("unswag::fewbit_backward");
  return op.call(grad_y, codes, activation, bits);
}
std::tuple<at::Tensor, at::Tensor> fewbit_table(const std::string& activation, int64_t bits) {
  static auto op =
      op_handle<std::tuple<at::Tensor, at::Tensor>(c10::string_view, int64_t)>("unswag::fewbit_table");
  return op.call(activation, bits);
}

}  // namespace unswag
