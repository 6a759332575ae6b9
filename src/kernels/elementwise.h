// Raw-pointer interface of UnSwag's elementwise kernels (no torch here):
// compressed activations (1-bit masks, k-bit derivative codes) and the
// elementwise cores of the fused MLP blocks. Each op has a CPU reference
// (elementwise_cpu.cpp, works on a range so the caller can parallelise) and a
// CUDA version (elementwise.cu, launched on the given stream).
//
// Code layout ("bit planes"): element i belongs to group g = i / 32 and bit
// i % 32 of that group's words. A k-bit code uses k consecutive uint32 words
// per group: word g*k + j holds bit j of the code of each of the 32 elements.
// So a tensor of n elements keeps ceil(n/32) * k words: exactly k bits per
// element, padded to 32 elements. The 1-bit ReLU mask is the k = 1 case.
//
// int8 storage: groups of kInt8Group consecutive elements share one fp32
// scale s = absmax / 127; q = round(x / s) (ActNN-style, lossy).
#pragma once

#include <cstdint>

#include "activation_math.h"
#include "fewbit_tables.h"

namespace unswag::kernels {

// kFloat64 exists so the fused blocks can be checked exactly against float64
// references; its math is done in double.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

constexpr int64_t kCodeGroup = 32;  // elements per code word
constexpr int64_t kInt8Group = 64;  // elements per int8 scale

inline int64_t code_words(int64_t n, int bits) { return (n + kCodeGroup - 1) / kCodeGroup * bits; }
inline int64_t int8_groups(int64_t n) { return (n + kInt8Group - 1) / kInt8Group; }

// y = f(x); codes[...] = code(x) under `table`: the number of boundaries b with
// !(x <= b) (for ReLU: bits 1, boundary 0, the mask of torch's threshold_backward,
// which passes the gradient where x > 0 or x is NaN).
struct FewbitForwardParams {
  const void* x = nullptr;  // [n]
  void* y = nullptr;        // [n], same dtype as x; may be null (codes only)
  uint32_t* codes = nullptr;  // [code_words(n, table.bits)]
  int64_t n = 0;
  DType dtype = DType::kFloat32;
  Act act = Act::kReLU;
  FewbitTable table;
};

// grad_x = grad_y * values[code]; where values[code] == 0 the result is +0
// exactly (so the ReLU gradient is bit-identical to torch's threshold_backward,
// which selects rather than multiplies).
struct FewbitBackwardParams {
  const void* grad_y = nullptr;  // [n]
  const uint32_t* codes = nullptr;
  void* grad_x = nullptr;  // [n]
  int64_t n = 0;
  DType dtype = DType::kFloat32;
  FewbitTable table;
};

// The exact derivative from the kept output (GELU / SiLU):
//   grad_x = grad_y * f'(x),  x = act_inverse(y, side) (activation_math.h),
// where side is the 1-bit code of x > argmin written by the forward (a
// FewbitTable with bits = 1 and boundaries[0] = argmin).
struct InverseBackwardParams {
  const void* grad_y = nullptr;  // [n]
  const void* y = nullptr;       // [n]
  const uint32_t* side = nullptr;  // [code_words(n, 1)]
  void* grad_x = nullptr;          // [n]
  int64_t n = 0;
  DType dtype = DType::kFloat32;
  Act act = Act::kSiLU;
  double argmin = 0, fmin = 0;  // x* and f(x*)
};

// Gated MLP core: h = act(gate) * up, math in fp32. Optionally also stores
// gate and up as int8 with per-group scales (for the 8-bit `compressed` policy).
struct GatedForwardParams {
  const void* gate = nullptr;  // [n]
  const void* up = nullptr;    // [n]
  void* h = nullptr;           // [n]
  int8_t* gate_q = nullptr;    // optional [n]
  float* gate_scale = nullptr; // optional [int8_groups(n)]
  int8_t* up_q = nullptr;
  float* up_scale = nullptr;
  int64_t n = 0;
  DType dtype = DType::kFloat32;
  Act act = Act::kSiLU;
};

// Gated MLP backward core, from gate/up (full precision, or int8 + scales when
// gate == nullptr) and grad_h:
//   h      = act(gate) * up          (optional output, for the down-projection's weight gradient)
//   grad_up   = grad_h * act(gate)
//   grad_gate = grad_h * up * act'(gate)
struct GatedBackwardParams {
  const void* gate = nullptr;
  const void* up = nullptr;
  const int8_t* gate_q = nullptr;
  const float* gate_scale = nullptr;
  const int8_t* up_q = nullptr;
  const float* up_scale = nullptr;
  const void* grad_h = nullptr;
  void* h = nullptr;  // optional
  void* grad_gate = nullptr;
  void* grad_up = nullptr;
  int64_t n = 0;
  DType dtype = DType::kFloat32;
  Act act = Act::kSiLU;
};

// Group-wise int8 (de)quantisation of a tensor (used for the non-gated 8-bit
// policy, which stores act(z) this way).
struct QuantizeInt8Params {
  const void* x = nullptr;
  int8_t* q = nullptr;
  float* scale = nullptr;
  int64_t n = 0;
  DType dtype = DType::kFloat32;
};
struct DequantizeInt8Params {
  const int8_t* q = nullptr;
  const float* scale = nullptr;
  void* x = nullptr;
  int64_t n = 0;
  DType dtype = DType::kFloat32;
};

// CPU reference kernels. Each processes the elements of groups
// [group_begin, group_end), where a group is kCodeGroup elements for the
// few-bit kernels and kInt8Group elements for the others; ranges from
// different threads never share an output word.
void fewbit_forward_cpu(const FewbitForwardParams& p, int64_t group_begin, int64_t group_end);
void fewbit_backward_cpu(const FewbitBackwardParams& p, int64_t group_begin, int64_t group_end);
void gated_forward_cpu(const GatedForwardParams& p, int64_t group_begin, int64_t group_end);
void gated_backward_cpu(const GatedBackwardParams& p, int64_t group_begin, int64_t group_end);
void inverse_backward_cpu(const InverseBackwardParams& p, int64_t group_begin, int64_t group_end);  // 32-element groups
void quantize_int8_cpu(const QuantizeInt8Params& p, int64_t group_begin, int64_t group_end);
void dequantize_int8_cpu(const DequantizeInt8Params& p, int64_t group_begin, int64_t group_end);

#ifdef UNSWAG_WITH_CUDA
// CUDA kernels, launched on `stream` (a cudaStream_t); they check the launch.
void fewbit_forward_cuda(const FewbitForwardParams& p, void* stream);
void fewbit_backward_cuda(const FewbitBackwardParams& p, void* stream);
void gated_forward_cuda(const GatedForwardParams& p, void* stream);
void gated_backward_cuda(const GatedBackwardParams& p, void* stream);
void inverse_backward_cuda(const InverseBackwardParams& p, void* stream);
void quantize_int8_cuda(const QuantizeInt8Params& p, void* stream);
void dequantize_int8_cuda(const DequantizeInt8Params& p, void* stream);
#endif

}  // namespace unswag::kernels
