// C++ entry points of the compressed-activation kernels for other ops files
// (fused_mlp.cpp); the registered ops wrap these in activations.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "kernels/activation_math.h"
#include "kernels/fewbit_tables.h"

namespace unswag::ops {

// y = f(x) and the bits-bit code of x; `op` names the caller in errors.
std::tuple<at::Tensor, at::Tensor> fewbit_forward_impl(const at::Tensor& x, kernels::Act act, int64_t bits,
                                                       const char* op);
// y = f(x) and codes under an explicit table (no bit-width checks).
std::tuple<at::Tensor, at::Tensor> fewbit_forward_table(const at::Tensor& x, kernels::Act act,
                                                        const kernels::FewbitTable& table);
// y = f(x) and the 1-bit side code (x > argmin) of the exact inverse scheme (gelu, gelu_tanh, silu).
std::tuple<at::Tensor, at::Tensor> side_forward_impl(const at::Tensor& x, kernels::Act act, const char* op);
// grad_x = grad_y * f'(f^-1(y)) on the side coded by `side`.
at::Tensor inverse_backward_impl(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& side,
                                 kernels::Act act, const char* op);
// grad_x = grad_y * values[code].
at::Tensor fewbit_backward_impl(const at::Tensor& grad_y, const at::Tensor& codes, kernels::Act act, int64_t bits,
                                const char* op);

}  // namespace unswag::ops
