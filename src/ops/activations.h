// C++ entry points of the compressed-activation kernels for other ops files
// (fused_mlp.cpp); the registered ops wrap these in activations.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "kernels/activation_math.h"

namespace unswag::ops {

// y = f(x) and the bits-bit code of x; `op` names the caller in errors.
std::tuple<at::Tensor, at::Tensor> fewbit_forward_impl(const at::Tensor& x, kernels::Act act, int64_t bits,
                                                       const char* op);
// grad_x = grad_y * values[code].
at::Tensor fewbit_backward_impl(const at::Tensor& grad_y, const at::Tensor& codes, kernels::Act act, int64_t bits,
                                const char* op);

}  // namespace unswag::ops
