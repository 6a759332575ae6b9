// unswag::nn::FusedMLP: parameters, initialisation and forward of the fused
// MLP block module (the op itself lives in src/ops/fused_mlp.cpp).
#include "unswag/nn/fused_mlp.h"

#include <torch/nn/init.h>

#include <cmath>

#include "unswag/ops.h"

namespace unswag::nn {

FusedMLPImpl::FusedMLPImpl(const FusedMLPOptions& options_) : options(options_) { reset(); }

bool FusedMLPImpl::gated() const {
  const auto& a = options.activation();
  return a == "swiglu" || a == "geglu" || a == "geglu_tanh";
}

void FusedMLPImpl::reset() {
  TORCH_CHECK(options.hidden() > 0 && options.intermediate() > 0,
              "FusedMLP: hidden and intermediate must be positive, got ", options.hidden(), " and ",
              options.intermediate());
  up_proj = register_parameter("up_proj", torch::empty({options.intermediate(), options.hidden()}));
  if (gated()) gate_proj = register_parameter("gate_proj", torch::empty({options.intermediate(), options.hidden()}));
  down_proj = register_parameter("down_proj", torch::empty({options.hidden(), options.intermediate()}));
  reset_parameters();
}

void FusedMLPImpl::reset_parameters() {
  // nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  torch::NoGradGuard no_grad;
  const double up_bound = 1.0 / std::sqrt(double(options.hidden()));
  const double down_bound = 1.0 / std::sqrt(double(options.intermediate()));
  up_proj.uniform_(-up_bound, up_bound);
  if (gate_proj.defined()) gate_proj.uniform_(-up_bound, up_bound);
  down_proj.uniform_(-down_bound, down_bound);
}

torch::Tensor FusedMLPImpl::forward(const torch::Tensor& x) {
  std::optional<at::Tensor> gate;
  if (gate_proj.defined()) gate = gate_proj;
  return fused_mlp(x, up_proj, down_proj, gate, options.activation(), options.policy(), options.storage_bits(),
                   options.derivative_bits());
}

}  // namespace unswag::nn
