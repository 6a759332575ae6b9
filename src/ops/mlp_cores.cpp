// CPU/CUDA implementations of the fused-MLP elementwise ops (gated_forward,
// gated_backward) and of group-wise int8 storage (quantize_int8,
// dequantize_int8). int8 groups: 64 consecutive values, one fp32 scale each.
#include <torch/library.h>

#include "ops/common.h"
#include "ops/mlp_cores.h"

namespace unswag::ops {

namespace {
int64_t int8_groups_of(int64_t n) { return kernels::int8_groups(n); }

void check_int8_pair(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& ref, const char* op,
                     const char* q_arg, const char* s_arg) {
  TORCH_CHECK(q.scalar_type() == at::kChar, op, ": argument '", q_arg, "' must be int8, got ", q.scalar_type());
  TORCH_CHECK(scale.scalar_type() == at::kFloat, op, ": argument '", s_arg, "' must be float32, got ",
              scale.scalar_type());
  TORCH_CHECK(q.device() == ref.device() && scale.device() == ref.device(), op, ": arguments '", q_arg, "' and '",
              s_arg, "' must be on ", ref.device());
  TORCH_CHECK(q.numel() == ref.numel(), op, ": argument '", q_arg, "' must have ", ref.numel(), " elements, got ",
              q.numel());
  TORCH_CHECK(scale.numel() == int8_groups_of(ref.numel()), op, ": argument '", s_arg, "' must have ",
              int8_groups_of(ref.numel()), " scales, got ", scale.numel());
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous(), op, ": int8 storage must be contiguous");
}
}  // namespace

GatedForwardResult gated_forward(const at::Tensor& gate_in, const at::Tensor& up_in, kernels::Act act,
                                 bool store_int8) {
  const char* op = "unswag::gated_forward";
  check_float_tensor(gate_in, op, "gate");
  check_same(up_in, gate_in, op, "up", "gate", /*same_shape=*/true);
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  const int64_t n = gate.numel();
  GatedForwardResult r;
  r.h = at::empty_like(gate, at::MemoryFormat::Contiguous);
  kernels::GatedForwardParams p;
  p.gate = gate.data_ptr();
  p.up = up.data_ptr();
  p.h = r.h.data_ptr();
  p.n = n;
  p.dtype = to_kernel_dtype(gate.scalar_type());
  p.act = act;
  if (store_int8) {
    r.gate_q = at::empty(gate.sizes(), gate.options().dtype(at::kChar));
    r.up_q = at::empty(gate.sizes(), gate.options().dtype(at::kChar));
    r.gate_scale = at::empty({int8_groups_of(n)}, gate.options().dtype(at::kFloat));
    r.up_scale = at::empty({int8_groups_of(n)}, gate.options().dtype(at::kFloat));
    p.gate_q = r.gate_q.data_ptr<int8_t>();
    p.up_q = r.up_q.data_ptr<int8_t>();
    p.gate_scale = r.gate_scale.data_ptr<float>();
    p.up_scale = r.up_scale.data_ptr<float>();
  }
  launch(gate.device(), p, int8_groups_of(n), &kernels::gated_forward_cpu, UNSWAG_CUDA_FN(gated_forward_cuda));
  return r;
}

GatedBackwardResult gated_backward(const at::Tensor& grad_h_in, const GatedSaved& saved, kernels::Act act,
                                   bool want_h) {
  const char* op = "unswag::gated_backward";
  check_float_tensor(grad_h_in, op, "grad_h");
  const at::Tensor dh = grad_h_in.contiguous();
  const int64_t n = dh.numel();
  kernels::GatedBackwardParams p;
  at::Tensor gate, up;
  if (saved.gate.defined()) {
    check_same(saved.gate, dh, op, "gate", "grad_h", true);
    check_same(saved.up, dh, op, "up", "grad_h", true);
    gate = saved.gate.contiguous();
    up = saved.up.contiguous();
    p.gate = gate.data_ptr();
    p.up = up.data_ptr();
  } else {
    TORCH_CHECK(saved.gate_q.defined() && saved.up_q.defined(), op,
                ": give either 'gate' and 'up' or their int8 forms 'gate_q', 'gate_scale', 'up_q', 'up_scale'");
    check_int8_pair(saved.gate_q, saved.gate_scale, dh, op, "gate_q", "gate_scale");
    check_int8_pair(saved.up_q, saved.up_scale, dh, op, "up_q", "up_scale");
    p.gate_q = saved.gate_q.data_ptr<int8_t>();
    p.gate_scale = saved.gate_scale.data_ptr<float>();
    p.up_q = saved.up_q.data_ptr<int8_t>();
    p.up_scale = saved.up_scale.data_ptr<float>();
  }
  GatedBackwardResult r;
  if (want_h) r.h = at::empty_like(dh, at::MemoryFormat::Contiguous);
  r.grad_gate = at::empty_like(dh, at::MemoryFormat::Contiguous);
  r.grad_up = at::empty_like(dh, at::MemoryFormat::Contiguous);
  p.grad_h = dh.data_ptr();
  p.h = want_h ? r.h.data_ptr() : nullptr;
  p.grad_gate = r.grad_gate.data_ptr();
  p.grad_up = r.grad_up.data_ptr();
  p.n = n;
  p.dtype = to_kernel_dtype(dh.scalar_type());
  p.act = act;
  launch(dh.device(), p, int8_groups_of(n), &kernels::gated_backward_cpu, UNSWAG_CUDA_FN(gated_backward_cuda));
  return r;
}

std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& x_in) {
  check_float_tensor(x_in, "unswag::quantize_int8", "x");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({int8_groups_of(n)}, x.options().dtype(at::kFloat));
  kernels::QuantizeInt8Params p;
  p.x = x.data_ptr();
  p.q = q.data_ptr<int8_t>();
  p.scale = scale.data_ptr<float>();
  p.n = n;
  p.dtype = to_kernel_dtype(x.scalar_type());
  launch(x.device(), p, int8_groups_of(n), &kernels::quantize_int8_cpu, UNSWAG_CUDA_FN(quantize_int8_cuda));
  return {q, scale};
}

at::Tensor dequantize_int8(const at::Tensor& q, const at::Tensor& scale, at::ScalarType dtype) {
  const char* op = "unswag::dequantize_int8";
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble, op,
              ": argument 'dtype' must be float32, float16, bfloat16 or float64, got ", dtype);
  at::Tensor x = at::empty(q.sizes(), q.options().dtype(dtype));
  check_int8_pair(q, scale, x, op, "q", "scale");
  kernels::DequantizeInt8Params p;
  p.q = q.data_ptr<int8_t>();
  p.scale = scale.data_ptr<float>();
  p.x = x.data_ptr();
  p.n = x.numel();
  p.dtype = to_kernel_dtype(dtype);
  launch(x.device(), p, int8_groups_of(x.numel()), &kernels::dequantize_int8_cpu,
         UNSWAG_CUDA_FN(dequantize_int8_cuda));
  return x;
}

namespace {
// Schema-shaped wrappers for registration.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_forward_op(const at::Tensor& gate,
                                                                                        const at::Tensor& up,
                                                                                        c10::string_view activation,
                                                                                        bool store_int8) {
  auto r = gated_forward(gate, up, parse_activation(std::string(activation), "unswag::gated_forward"), store_int8);
  const auto none = at::empty({0}, gate.options());
  return {r.h, store_int8 ? r.gate_q : none, store_int8 ? r.gate_scale : none, store_int8 ? r.up_q : none,
          store_int8 ? r.up_scale : none};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_backward_op(
    const at::Tensor& grad_h, const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& up,
    const std::optional<at::Tensor>& gate_q, const std::optional<at::Tensor>& gate_scale,
    const std::optional<at::Tensor>& up_q, const std::optional<at::Tensor>& up_scale, c10::string_view activation,
    bool want_h) {
  GatedSaved s;
  s.gate = gate.value_or(at::Tensor());
  s.up = up.value_or(at::Tensor());
  s.gate_q = gate_q.value_or(at::Tensor());
  s.gate_scale = gate_scale.value_or(at::Tensor());
  s.up_q = up_q.value_or(at::Tensor());
  s.up_scale = up_scale.value_or(at::Tensor());
  TORCH_CHECK(s.gate.defined() == s.up.defined(), "unswag::gated_backward: give both 'gate' and 'up' or neither");
  auto r = gated_backward(grad_h, s, parse_activation(std::string(activation), "unswag::gated_backward"), want_h);
  return {want_h ? r.h : at::empty({0}, grad_h.options()), r.grad_gate, r.grad_up};
}
}  // namespace

}  // namespace unswag::ops

TORCH_LIBRARY_IMPL(unswag, CPU, m) {
  m.impl("gated_forward", &unswag::ops::gated_forward_op);
  m.impl("gated_backward", &unswag::ops::gated_backward_op);
  m.impl("quantize_int8", &unswag::ops::quantize_int8);
  m.impl("dequantize_int8", &unswag::ops::dequantize_int8);
}
TORCH_LIBRARY_IMPL(unswag, CUDA, m) {
  m.impl("gated_forward", &unswag::ops::gated_forward_op);
  m.impl("gated_backward", &unswag::ops::gated_backward_op);
  m.impl("quantize_int8", &unswag::ops::quantize_int8);
  m.impl("dequantize_int8", &unswag::ops::dequantize_int8);
}
