// RMSNorm forward and backward on raw pointers (no torch): the CPU reference
// (rms_norm_cpu.cpp) and the CUDA kernels (rms_norm.cu) compute the same
// thing, in float (double for double), one row of n elements at a time.
//
// Forward, per row:  r = 1 / sqrt(mean(x^2) + eps),  xh = x r
//   Llama (add_one = false): y = w * round_T(xh)      (as transformers: the
//                            normalised row is cast before the weight multiplies)
//   Gemma (add_one = true):  y = round_T(xh (1 + w))
// Backward, per row, with g = dy * w (Llama) or dy * (1 + w) (Gemma):
//   dx = r (g - xh mean(g xh)),   dw_j = sum over rows of dy_j * xh_j
//   (xh rounded to T first for Llama). dw is written as float partial sums,
//   one row of n per block of kRmsRowsPerBlock rows; the caller sums them.
#pragma once

#include <cstdint>

#include "elementwise.h"  // DType

namespace unswag::kernels {

constexpr int64_t kRmsRowsPerBlock = 32;

struct RmsNormParams {
  DType dtype = DType::kFloat32;  // of x, w, y, dy, dx
  int64_t rows = 0, n = 0;
  double eps = 1e-6;
  bool add_one = false;
  const void* x = nullptr;
  const void* w = nullptr;
  void* y = nullptr;       // forward
  float* rstd = nullptr;   // [rows]: written by forward, read by backward
  const void* dy = nullptr;  // backward
  void* dx = nullptr;        // backward (may be null: no dx wanted)
  float* dw_partial = nullptr;  // backward: [ceil(rows / kRmsRowsPerBlock), n] (null: no dw wanted)
};

inline int64_t rms_row_blocks(int64_t rows) { return (rows + kRmsRowsPerBlock - 1) / kRmsRowsPerBlock; }

// CPU: rows [r0, r1) (forward) or row blocks [b0, b1) (backward).
void rms_norm_forward_cpu(const RmsNormParams& p, int64_t r0, int64_t r1);
void rms_norm_backward_cpu(const RmsNormParams& p, int64_t b0, int64_t b1);
// CUDA, on `stream` (a cudaStream_t).
void rms_norm_forward_cuda(const RmsNormParams& p, void* stream);
void rms_norm_backward_cuda(const RmsNormParams& p, void* stream);

}  // namespace unswag::kernels
