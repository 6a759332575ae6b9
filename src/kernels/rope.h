// Rotary position embedding (RoPE, the "rotate half" form of Llama and
// transformers) on raw pointers (no torch): the CPU reference (rope_cpu.cpp)
// and the CUDA kernel (rope.cu) compute the same thing.
//
// x [rows = B*T*H, D] (token-major: row r is token r / H, head r % H), cos and
// sin [cos_rows, D], h = D / 2. Forward (inverse = false), per row and d:
//   y[d] = x[d] cos[d] + rot(x)[d] sin[d],  rot(x)[d] = -x[d + h] (d < h), x[d - h] (d >= h)
// with each product and the sum rounded to T as ATen's `x * cos +
// rotate_half(x) * sin` rounds them (so the result is bit-identical to that
// composition). Backward is the transpose of the rotation (inverse = true):
//   dx[d] = dy[d] cos[d] + (d < h ? dy[d + h] sin[d + h] : -dy[d - h] sin[d - h])
// computed in the math type and rounded once.
// The cos/sin row of x's row r is ((r / H) / T * cos_batch_stride) + (r / H) % T,
// with cos_batch_stride = T (one table per sequence) or 0 (shared by the batch).
#pragma once

#include <cstdint>

#include "elementwise.h"  // DType

namespace unswag::kernels {

struct RopeParams {
  DType dtype = DType::kFloat32;  // of x, cos, sin, y
  int64_t rows = 0;               // B * T * H
  int64_t heads = 1, time = 1;    // H, T
  int64_t dim = 0;                // D (even)
  bool cos_per_batch = true;      // cos/sin [B, T, D] (true) or [1, T, D]
  bool inverse = false;           // backward: the transposed rotation
  const void* x = nullptr;        // [B, T, H, D] with d contiguous, strides below
  // x's strides of b, t and h in elements (contiguous: T H D, H D, D). A
  // gradient that autograd summed from two layouts arrives strided; reading
  // it in place saves the copy .contiguous() would make.
  int64_t x_stride_b = 0, x_stride_t = 0, x_stride_h = 0;
  const void* cos = nullptr;      // [B or 1, T, D] contiguous
  const void* sin = nullptr;
  void* y = nullptr;              // [rows, D]
};

// CPU: rows [r0, r1).
void rope_cpu(const RopeParams& p, int64_t r0, int64_t r1);
// CUDA, on `stream` (a cudaStream_t).
void rope_cuda(const RopeParams& p, void* stream);

}  // namespace unswag::kernels
