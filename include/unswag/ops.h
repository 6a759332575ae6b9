// UnSwag's public C++ ops. Every op here is also registered in
// TORCH_LIBRARY(unswag, ...) (src/ops/registration.cpp) and so callable from
// Python as torch.ops.unswag.<name> after torch.ops.load_library(libunswag.so).
//
// Tensors: float32, float16, bfloat16 (and float64, for exact checks), CPU or CUDA.
// Compressed activations keep, for backward, a packed code instead of the
// activation's input:
//   relu_1bit            1 bit per element, exact gradient (bit-identical to torch.relu's)
//   silu_fewbit/gelu_fewbit(x, bits)   bits in 1..4: a code of which interval x lies
//                        in; backward multiplies by the optimal piecewise-constant
//                        derivative on that interval (approximate: see docs/fewbit.md)
// Codes are int32 tensors of ceil(numel/32)*bits words ("bit planes", see
// src/kernels/elementwise.h).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace unswag {

// Differentiable ops (autograd saves only the packed code).
at::Tensor relu_1bit(const at::Tensor& x);
at::Tensor silu_fewbit(const at::Tensor& x, int64_t bits = 2);
at::Tensor gelu_fewbit(const at::Tensor& x, int64_t bits = 2);
inline at::Tensor silu_2bit(const at::Tensor& x) { return silu_fewbit(x, 2); }
inline at::Tensor gelu_2bit(const at::Tensor& x) { return gelu_fewbit(x, 2); }

// The forward / backward halves, for callers that manage saved state themselves.
// activation: "relu" (bits must be 1), "silu", "gelu", "gelu_tanh", "relu2".
std::tuple<at::Tensor, at::Tensor> fewbit_forward(const at::Tensor& x, const std::string& activation,
                                                  int64_t bits);
at::Tensor fewbit_backward(const at::Tensor& grad_y, const at::Tensor& codes,
                           const std::string& activation, int64_t bits);

// The (boundaries, values) of a few-bit table as float64 CPU tensors.
std::tuple<at::Tensor, at::Tensor> fewbit_table(const std::string& activation, int64_t bits);

// The fused MLP block
//   non-gated: y = act(x W_up^T) W_down^T                 activation in relu, relu2, gelu, gelu_tanh, silu
//   gated:     y = (act(x W_gate^T) * (x W_up^T)) W_down^T  activation in swiglu, geglu, geglu_tanh
// x: [..., hidden]; w_up, w_gate: [intermediate, hidden]; w_down: [hidden, intermediate].
// policy: what the block keeps for backward
//   "none"       what plain PyTorch autograd keeps (the baseline)
//   "recompute"  only x; backward recomputes the up/gate projections; exact
//   "compressed" no matmul recomputed; hidden-size tensors kept in as few bits as
//                the math allows (see docs/memory.md)
// storage_bits: 16 keeps the compressed policy's values in the compute dtype
//   (exact), 8 keeps them as int8 with a scale per 64 values (lossy).
// derivative_bits: for gelu/silu non-gated blocks under "compressed": 1..4 keeps a
//   few-bit derivative code (approximate, docs/fewbit.md); 0 keeps 1 bit (which
//   side of f's minimum) and backward inverts the kept output f(z) to get z and
//   the exact f'(z) (exact up to the rounding of the kept f(z); docs/memory.md).
at::Tensor fused_mlp(const at::Tensor& x, const at::Tensor& w_up, const at::Tensor& w_down,
                     const std::optional<at::Tensor>& w_gate, const std::string& activation,
                     const std::string& policy = "compressed", int64_t storage_bits = 16,
                     int64_t derivative_bits = 2);

}  // namespace unswag
