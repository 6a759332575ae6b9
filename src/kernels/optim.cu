// CUDA kernels of UnSwag's AdamW optimizers: the fused 8-bit step, the fp32
// twin and block-wise quantize/dequantize. The per-element math is optim.h's
// (shared with the CPU reference, optim_cpu.cpp), so results are bit-identical.
//
// Work split of the block-wise kernels: 256 threads per CTA, 8 consecutive
// elements per thread (one 16-byte access of bf16, two of fp32, one 8-byte
// access of codes), so a quantization block of B elements is a group of B / 8
// threads: one warp for B = 256 (eight blocks per CTA, absmax by warp shuffles
// alone), the whole CTA for B = 2048 (shuffles, then the eight warp maxima
// through shared memory). Each element is read once and written once per step:
// dequantize, update, block absmax of the new moments, requantize, in
// registers. The two 256-code maps and their quantize tables (optim.h:
// quantize_lookup, 4 shared-memory reads per value) sit in shared memory; the
// grid is persistent (a few CTAs per SM striding over the tensor), so each CTA
// loads those 15 KB once rather than once per 2048 elements.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "optim.h"
#include "cuda_common.cuh"

namespace unswag::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;



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

template <bool kVector>
__device__ __forceinline__ void load_codes8(const uint8_t* __restrict__ q, int64_t i, int64_t n, uint8_t (&c)[8]) {
  if (kVector) {
    const uint2 raw = *reinterpret_cast<const uint2*>(q + i);
    const uint8_t* e = reinterpret_cast<const uint8_t*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) c[j] = e[j];
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) c[j] = i + j < n ? q[i + j] : 0;
  }
}

template <bool kVector>
__device__ __forceinline__ void store_codes8(uint8_t* __restrict__ q, int64_t i, int64_t n, const uint8_t (&c)[8]) {
  if (kVector) {
    uint2 raw;
    uint8_t* e = reinterpret_cast<uint8_t*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) e[j] = c[j];
    *reinterpret_cast<uint2*>(q + i) = raw;
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (i + j < n) q[i + j] = c[j];
  }
}

// Max of `x` over the kGroup threads (consecutive, aligned) holding one
// quantization block. Every thread of the CTA must call it (it may sync).
template <int kGroup>
__device__ __forceinline__ float group_max(float x, float* scratch /* [kThreads / 32] */) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  if constexpr (kGroup > 32) {
    static_assert(kGroup == kThreads, "a group is one warp or the whole CTA");
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) scratch[warp] = x;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) x = fmaxf(x, scratch[w]);
  }
  return x;
}

__device__ __forceinline__ void load_map(float* shared, const float* __restrict__ map) {
  for (int i = threadIdx.x; i < kMapSize; i += kThreads) shared[i] = map[i];
}

// The table in 16-byte pieces (kQuantTableSize is a multiple of 16; the
// tables are separate allocations, so 16-byte aligned).
__device__ __forceinline__ void load_table(uint8_t* shared, const uint8_t* __restrict__ starts) {
  static_assert(kQuantTableSize % 16 == 0, "table copied in 16-byte pieces");
  for (int i = threadIdx.x; i < kQuantTableSize / 16; i += kThreads)
    reinterpret_cast<uint4*>(shared)[i] = reinterpret_cast<const uint4*>(starts)[i];
}

template <typename T, int kBlock, bool kAligned>
__global__ void __launch_bounds__(kThreads) adamw8bit_kernel(AdamW8bitParams p) {
  constexpr int kGroup = kBlock / kPerThread;
  __shared__ float map1[kMapSize], map2[kMapSize];
  __shared__ __align__(16) uint8_t starts1[kQuantTableSize], starts2[kQuantTableSize];
  __shared__ float scratch1[kThreads / 32], scratch2[kThreads / 32];
  load_map(map1, p.map1);
  load_map(map2, p.map2);
  load_table(starts1, p.starts1);
  load_table(starts2, p.starts2);
  __syncthreads();

  T* param = static_cast<T*>(p.param);
  const T* grad = static_cast<const T*>(p.grad);
  constexpr int64_t kTile = int64_t(kThreads) * kPerThread;
  // The loop bound depends on blockIdx only, so every thread of the CTA runs
  // the same iterations (group_max may __syncthreads).
  for (int64_t tile = blockIdx.x; tile * kTile < p.n; tile += gridDim.x) {
    const int64_t i = tile * kTile + int64_t(threadIdx.x) * kPerThread;
    const int64_t block = i / kBlock;
    const bool active = i < p.n;  // inactive threads still join the reductions
    const bool vector = kAligned && i + kPerThread <= p.n;

    float pv[8], gv[8], m[8], v[8];
    uint8_t q1[8], q2[8];
    float absmax1 = 0.f, absmax2 = 0.f;
    if (active) {
      const float old_absmax1 = p.absmax1[block], old_absmax2 = p.absmax2[block];
      if (vector) {
        load8<true>(param, i, p.n, pv);
        load8<true>(grad, i, p.n, gv);
        load_codes8<true>(p.state1, i, p.n, q1);
        load_codes8<true>(p.state2, i, p.n, q2);
      } else {
        load8<false>(param, i, p.n, pv);
        load8<false>(grad, i, p.n, gv);
        load_codes8<false>(p.state1, i, p.n, q1);
        load_codes8<false>(p.state2, i, p.n, q2);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        m[j] = dequantize(map1, q1[j], old_absmax1);
        v[j] = dequantize(map2, q2[j], old_absmax2);
        adamw_update(pv[j], gv[j], m[j], v[j], p.s);
        if (i + j < p.n) {  // padding lanes past n must not raise the absmax
          absmax1 = fmaxf(absmax1, fabsf(m[j]));
          absmax2 = fmaxf(absmax2, fabsf(v[j]));
        }
      }
    }
    absmax1 = group_max<kGroup>(absmax1, scratch1);
    absmax2 = group_max<kGroup>(absmax2, scratch2);
    if (kGroup > 32) __syncthreads();  // the scratch is reused by the next tile
    if (!active) continue;
    if (i % kBlock == 0) {
      p.absmax1[block] = absmax1;
      p.absmax2[block] = absmax2;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      q1[j] = quantize_lookup(map1, starts1, p.advance1, normalize(m[j], absmax1));
      q2[j] = quantize_lookup(map2, starts2, p.advance2, normalize(v[j], absmax2));
    }
    if (vector) {
      store8<true>(param, i, p.n, pv);
      store_codes8<true>(p.state1, i, p.n, q1);
      store_codes8<true>(p.state2, i, p.n, q2);
    } else {
      store8<false>(param, i, p.n, pv);
      store_codes8<false>(p.state1, i, p.n, q1);
      store_codes8<false>(p.state2, i, p.n, q2);
    }
  }
}

template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads) adamw32bit_kernel(AdamW32bitParams p) {
  T* param = static_cast<T*>(p.param);
  const T* grad = static_cast<const T*>(p.grad);
  const int64_t stride = int64_t(gridDim.x) * kThreads * kPerThread;
  for (int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kPerThread; i < p.n; i += stride) {
    float pv[8], gv[8], m[8], v[8];
    const bool vector = kAligned && i + kPerThread <= p.n;
    if (vector) {
      load8<true>(param, i, p.n, pv);
      load8<true>(grad, i, p.n, gv);
      load8<true>(p.exp_avg, i, p.n, m);
      load8<true>(p.exp_avg_sq, i, p.n, v);
    } else {
      load8<false>(param, i, p.n, pv);
      load8<false>(grad, i, p.n, gv);
      load8<false>(p.exp_avg, i, p.n, m);
      load8<false>(p.exp_avg_sq, i, p.n, v);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) adamw_update(pv[j], gv[j], m[j], v[j], p.s);
    if (vector) {
      store8<true>(param, i, p.n, pv);
      store8<true>(p.exp_avg, i, p.n, m);
      store8<true>(p.exp_avg_sq, i, p.n, v);
    } else {
      store8<false>(param, i, p.n, pv);
      store8<false>(p.exp_avg, i, p.n, m);
      store8<false>(p.exp_avg_sq, i, p.n, v);
    }
  }
}

template <int kBlock>
__global__ void __launch_bounds__(kThreads) quantize_kernel(BlockwiseParams p) {
  constexpr int kGroup = kBlock / kPerThread;
  __shared__ float map[kMapSize];
  __shared__ __align__(16) uint8_t starts[kQuantTableSize];
  __shared__ float scratch[kThreads / 32];
  load_map(map, p.map);
  load_table(starts, p.starts);
  __syncthreads();
  const int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kPerThread;
  float x[8];
  load8<false>(p.x, i, p.n, x);  // zeros past n
  float absmax = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) absmax = fmaxf(absmax, fabsf(x[j]));
  absmax = group_max<kGroup>(absmax, scratch);
  if (i >= p.n) return;
  if (i % kBlock == 0) p.absmax[i / kBlock] = absmax;
  uint8_t q[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) q[j] = quantize_lookup(map, starts, p.advance, normalize(x[j], absmax));
  store_codes8<false>(p.q, i, p.n, q);
}

__global__ void dequantize_kernel(BlockwiseParams p) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride)
    p.x[i] = dequantize(p.map, p.q[i], p.absmax[i / p.block_size]);
}

bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

int64_t ctas_for(int64_t n) { return (n + kThreads * kPerThread - 1) / (kThreads * kPerThread); }

// A persistent grid: enough CTAs to fill the GPU (8 of 256 threads per SM),
// never more than there are tiles.
int64_t persistent_ctas(int64_t n) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return std::min<int64_t>(ctas_for(n), int64_t(sms) * 8);
}

template <typename T>
void launch_adamw8bit(const AdamW8bitParams& p, cudaStream_t stream) {
  const bool vec = aligned(p.param, 16) && aligned(p.grad, 16) && aligned(p.state1, 8) && aligned(p.state2, 8);
  const dim3 grid(unsigned(persistent_ctas(p.n)));
  if (p.block_size == 2048) {
    if (vec)
      adamw8bit_kernel<T, 2048, true><<<grid, kThreads, 0, stream>>>(p);
    else
      adamw8bit_kernel<T, 2048, false><<<grid, kThreads, 0, stream>>>(p);
  } else {
    if (vec)
      adamw8bit_kernel<T, 256, true><<<grid, kThreads, 0, stream>>>(p);
    else
      adamw8bit_kernel<T, 256, false><<<grid, kThreads, 0, stream>>>(p);
  }
}

template <typename T>
void launch_adamw32bit(const AdamW32bitParams& p, cudaStream_t stream) {
  const bool vec = aligned(p.param, 16) && aligned(p.grad, 16) && aligned(p.exp_avg, 16) && aligned(p.exp_avg_sq, 16);
  // A grid-stride loop over at most 8 CTAs per SM: enough to saturate memory.
  const dim3 grid(unsigned(persistent_ctas(p.n)));
  if (vec)
    adamw32bit_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
  else
    adamw32bit_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
}

}  // namespace

void adamw8bit_step_cuda(const AdamW8bitParams& p, void* stream) {
  if (p.n == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.dtype == ParamDType::kBFloat16)
    launch_adamw8bit<__nv_bfloat16>(p, s);
  else
    launch_adamw8bit<float>(p, s);
  check_launch("adamw8bit_step");
}

void adamw32bit_step_cuda(const AdamW32bitParams& p, void* stream) {
  if (p.n == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.dtype == ParamDType::kBFloat16)
    launch_adamw32bit<__nv_bfloat16>(p, s);
  else
    launch_adamw32bit<float>(p, s);
  check_launch("adamw_step");
}

void quantize_blockwise_cuda(const BlockwiseParams& p, void* stream) {
  if (p.n == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  const dim3 grid(unsigned(ctas_for(p.n)));
  if (p.block_size == 2048)
    quantize_kernel<2048><<<grid, kThreads, 0, s>>>(p);
  else
    quantize_kernel<256><<<grid, kThreads, 0, s>>>(p);
  check_launch("quantize_blockwise");
}

void dequantize_blockwise_cuda(const BlockwiseParams& p, void* stream) {
  if (p.n == 0) return;
  const dim3 grid(unsigned(std::min<int64_t>((p.n + kThreads - 1) / kThreads, 65535)));
  dequantize_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  check_launch("dequantize_blockwise");
}

}  // namespace unswag::kernels
