// Eight consecutive values of a 16-bit or fp32 tensor as fp32, loaded or
// stored as one 16-byte access (two for fp32) when kVector: the access the
// block-wise optimizer kernels (optim.cu) and psa_combine (psa_combine.cu)
// make per thread. kVector needs p + i 16-byte aligned and i + 8 <= n; without
// it, element by element (zeros past n on load, nothing past n on store).
#pragma once

#include "cuda_common.cuh"

namespace unswag::kernels {

// 8 values of p[i..i+8) as fp32; vector access when kVector (aligned and in
// range), element by element (zeros past n) otherwise.
template <bool kVector, typename T>
__device__ __forceinline__ void load8(const T* __restrict__ p, int64_t i, int64_t n, float (&v)[8]) {
  if (kVector) {
    if constexpr (sizeof(T) == 2) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p + i);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = to_f(e[j]);
    } else {
      const float4 a = *reinterpret_cast<const float4*>(p + i), b = *reinterpret_cast<const float4*>(p + i + 4);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
      v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = i + j < n ? to_f(p[i + j]) : 0.f;
  }
}

template <bool kVector, typename T>
__device__ __forceinline__ void store8(T* __restrict__ p, int64_t i, int64_t n, const float (&v)[8]) {
  if (kVector) {
    if constexpr (sizeof(T) == 2) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int j = 0; j < 8; ++j) e[j] = from_f<T>(v[j]);
      *reinterpret_cast<uint4*>(p + i) = raw;
    } else {
      *reinterpret_cast<float4*>(p + i) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(p + i + 4) = make_float4(v[4], v[5], v[6], v[7]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (i + j < n) p[i + j] = from_f<T>(v[j]);
  }
}

}  // namespace unswag::kernels
