// Argument checks and enum conversions shared by UnSwag's ops (see common.h).
#include "ops/common.h"

#include <stdexcept>

namespace unswag::ops {

void check_float_tensor(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.defined(), op, ": argument '", arg, "' is undefined");
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, op, ": argument '", arg,
              "' must be float32, float16, bfloat16 or float64, got ", s);
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), op, ": argument '", arg,
              "' must be on CPU or CUDA, got ", t.device());
}

void check_same(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg, const char* ref_arg,
                bool same_shape) {
  TORCH_CHECK(t.defined(), op, ": argument '", arg, "' is undefined");
  TORCH_CHECK(t.device() == ref.device(), op, ": argument '", arg, "' must be on the same device as '", ref_arg,
              "' (", ref.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": argument '", arg, "' must have the dtype of '", ref_arg,
              "' (", ref.scalar_type(), "), got ", t.scalar_type());
  if (same_shape)
    TORCH_CHECK(t.sizes() == ref.sizes(), op, ": argument '", arg, "' must have the shape of '", ref_arg, "' ",
                ref.sizes(), ", got ", t.sizes());
}

void check_codes(const at::Tensor& codes, const at::Tensor& ref, int64_t words, const char* op, const char* arg) {
  TORCH_CHECK(codes.defined(), op, ": argument '", arg, "' is undefined");
  TORCH_CHECK(codes.scalar_type() == at::kInt, op, ": argument '", arg, "' must be int32 (packed codes), got ",
              codes.scalar_type());
  TORCH_CHECK(codes.device() == ref.device(), op, ": argument '", arg, "' must be on ", ref.device(), ", got ",
              codes.device());
  TORCH_CHECK(codes.numel() == words, op, ": argument '", arg, "' must hold ", words,
              " words for a gradient of ", ref.numel(), " elements, got ", codes.numel(),
              " (was it produced for a tensor of another size or bit width?)");
}

kernels::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kernels::DType::kFloat32;
    case at::kHalf: return kernels::DType::kFloat16;
    case at::kBFloat16: return kernels::DType::kBFloat16;
    case at::kDouble: return kernels::DType::kFloat64;
    default: TORCH_CHECK(false, "unswag: unsupported dtype ", t, " (expected float32, float16, bfloat16 or float64)");
  }
}

kernels::Act parse_activation(const std::string& name, const char* op) {
  using kernels::Act;
  if (name == "relu") return Act::kReLU;
  if (name == "relu2") return Act::kReLU2;
  if (name == "gelu") return Act::kGELU;
  if (name == "gelu_tanh") return Act::kGELUTanh;
  if (name == "silu") return Act::kSiLU;
  TORCH_CHECK(false, op, ": argument 'activation' must be one of relu, relu2, gelu, gelu_tanh, silu; got '", name,
              "'");
}

const kernels::FewbitTable& checked_table(kernels::Act act, int64_t bits, const char* op) {
  TORCH_CHECK(bits >= 1 && bits <= kernels::kMaxFewbitBits, op, ": argument 'bits' must be in 1..",
              kernels::kMaxFewbitBits, ", got ", bits);
  TORCH_CHECK(act != kernels::Act::kReLU || bits == 1, op,
              ": ReLU's derivative is a step, exactly coded by 1 bit; argument 'bits' must be 1 for relu, got ",
              bits);
  return kernels::fewbit_table(act, int(bits));
}

}  // namespace unswag::ops
