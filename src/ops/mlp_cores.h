// C++ entry points of the fused-MLP elementwise cores and int8 storage, used by
// fused_mlp.cpp (also registered as unswag::gated_forward etc. in mlp_cores.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "kernels/activation_math.h"

namespace unswag::ops {

struct GatedForwardResult {
  at::Tensor h;                      // act(gate) * up
  at::Tensor gate_q, gate_scale;     // int8 storage, when asked for
  at::Tensor up_q, up_scale;
};
GatedForwardResult gated_forward(const at::Tensor& gate, const at::Tensor& up, kernels::Act act, bool store_int8);

// What the gated block kept: gate and up, or their int8 forms.
struct GatedSaved {
  at::Tensor gate, up;
  at::Tensor gate_q, gate_scale, up_q, up_scale;
};
struct GatedBackwardResult {
  at::Tensor h;  // rebuilt act(gate) * up, when asked for
  at::Tensor grad_gate, grad_up;
};
GatedBackwardResult gated_backward(const at::Tensor& grad_h, const GatedSaved& saved, kernels::Act act, bool want_h);

std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& x);
at::Tensor dequantize_int8(const at::Tensor& q, const at::Tensor& scale, at::ScalarType dtype);

}  // namespace unswag::ops
