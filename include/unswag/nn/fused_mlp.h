// unswag::nn::FusedMLP: a transformer MLP block (plain, or gated as in
// Llama's SwiGLU) as a torch::nn module whose backward keeps only what its
// policy says (see unswag::fused_mlp in include/unswag/ops.h).
#pragma once

#include <torch/nn/module.h>
#include <torch/types.h>

#include <string>

namespace unswag::nn {

struct FusedMLPOptions {
  FusedMLPOptions(int64_t hidden, int64_t intermediate) : hidden_(hidden), intermediate_(intermediate) {}
  TORCH_ARG(int64_t, hidden);
  TORCH_ARG(int64_t, intermediate);
  // relu, relu2, gelu, gelu_tanh, silu (non-gated); swiglu, geglu, geglu_tanh (gated)
  TORCH_ARG(std::string, activation) = "swiglu";
  // none | recompute | compressed
  TORCH_ARG(std::string, policy) = "compressed";
  // 16: keep values in the compute dtype (exact); 8: int8 + per-64 scales (lossy)
  TORCH_ARG(int64_t, storage_bits) = 16;
  // non-gated gelu/silu under "compressed": bits of the derivative code (1..4),
  // or 0 for the exact derivative from the kept output and 1 side bit
  TORCH_ARG(int64_t, derivative_bits) = 2;
};

class FusedMLPImpl : public torch::nn::Module {
 public:
  explicit FusedMLPImpl(const FusedMLPOptions& options);
  void reset();
  void reset_parameters();
  // x: [..., hidden] -> [..., hidden]
  torch::Tensor forward(const torch::Tensor& x);
  bool gated() const;

  FusedMLPOptions options;
  torch::Tensor up_proj;    // [intermediate, hidden] (Hugging Face's up_proj.weight)
  torch::Tensor gate_proj;  // [intermediate, hidden], gated blocks only
  torch::Tensor down_proj;  // [hidden, intermediate]
};

TORCH_MODULE(FusedMLP);

}  // namespace unswag::nn
