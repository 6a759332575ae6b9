// Torch glue shared by UnSwag's ops: argument checks with messages that name
// the argument, conversions to the kernels' enums, and `launch`, which runs a
// raw-pointer kernel on the tensor's device (CPU: parallel over groups; CUDA:
// on the current stream).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <string>

#include "kernels/elementwise.h"

namespace unswag::ops {

// Floating point tensor of a supported dtype (fp32/fp16/bf16) on CPU or CUDA.
void check_float_tensor(const at::Tensor& t, const char* op, const char* arg);
// Same device, dtype and (optionally) shape as `ref`.
void check_same(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg, const char* ref_arg,
                bool same_shape);
// An int32 code tensor with exactly `words` elements on ref's device.
void check_codes(const at::Tensor& codes, const at::Tensor& ref, int64_t words, const char* op, const char* arg);

kernels::DType to_kernel_dtype(at::ScalarType t);
// The dtype ATen-composed ops compute in: float64 for float64 tensors, else float32.
inline at::ScalarType opmath_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}
// "relu", "relu2", "gelu", "gelu_tanh", "silu"; anything else is an error naming `op`.
kernels::Act parse_activation(const std::string& name, const char* op);
// The few-bit table for (act, bits), with user-facing checks of bits.
const kernels::FewbitTable& checked_table(kernels::Act act, int64_t bits, const char* op);

#ifdef UNSWAG_WITH_CUDA
void* current_cuda_stream(const at::Device& device);  // cuda_utils.cpp
#endif

template <typename T>
struct NonDeduced {
  using type = T;
};

// Runs `cpu(p, g0, g1)` over [0, groups) in parallel, or `cuda(p, stream)`.
// (`cuda` is nullptr in CPU-only builds, hence not used to deduce P.)
template <typename P>
void launch(const at::Device& device, const P& p, int64_t groups, void (*cpu)(const P&, int64_t, int64_t),
            void (*cuda)(const typename NonDeduced<P>::type&, void*)) {
  if (device.is_cpu()) {
    at::parallel_for(0, groups, 2048, [&](int64_t g0, int64_t g1) { cpu(p, g0, g1); });
    return;
  }
#ifdef UNSWAG_WITH_CUDA
  if (device.is_cuda()) {
    cuda(p, current_cuda_stream(device));
    return;
  }
#endif
  TORCH_CHECK(false, "unswag: tensors on ", device, " are not supported by this build (CPU",
#ifdef UNSWAG_WITH_CUDA
              " and CUDA"
#endif
              " only)");
}

#ifdef UNSWAG_WITH_CUDA
#define UNSWAG_CUDA_FN(fn) (&kernels::fn)
#else
#define UNSWAG_CUDA_FN(fn) (nullptr)
#endif

}  // namespace unswag::ops
