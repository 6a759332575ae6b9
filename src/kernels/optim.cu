// CUDA kernels of UnSwag's AdamW optimizers: the fused 8-bit step, the fp32
// twin and block-wise quantize/dequantize. The per-element math is optim.h's
// (shared with the CPU reference, optim_cpu.cpp), so states are bit-identical
// to the CPU's; only the 8-bit step's parameter update departs from it, by
// taking m / (sqrt(v) + eps) with approximate hardware sqrt and division
// (adamw_update_approx below: the IEEE forms cost 40 instructions and a
// slow-path branch per value, and made this kernel instruction-bound).
//
// Work split of the block-wise kernels: 256 threads per CTA, 8 consecutive
// elements per thread (one 16-byte access of bf16, two of fp32, one 8-byte
// access of codes), so a quantization block of B elements is a group of B / 8
// threads: one warp for B = 256 (eight blocks per CTA, absmax by warp shuffles
// alone), the whole CTA for B = 2048 (shuffles, then the eight warp maxima
// through shared memory). Each element is read once and written once per step:
// dequantize, update, block absmax of the new moments, requantize, in
// registers. The two 256-code maps and their quantize tables (optim.h:
// quantize_lookup: a bucket byte and one threshold per value) sit in shared
// memory, so a value costs 3 shared reads (dequantize, bucket, threshold); the
// grid is persistent (as many CTAs as fit on the GPU at once, each striding
// over the tensor), so each CTA loads those 17 KB once rather than once per
// 2048 elements. The per-value division by the block absmax is a product with
// its reciprocal (one division per block).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "optim.h"
#include "cuda_common.cuh"
#include "vec8.cuh"

namespace unswag::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;

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

// The table in 16-byte pieces (kQuantTableBytes is a multiple of 16; the
// tables are separate allocations, so 16-byte aligned).
__device__ __forceinline__ void load_table(uint8_t* shared, const uint8_t* __restrict__ table) {
  static_assert(kQuantTableBytes % 16 == 0, "table copied in 16-byte pieces");
  for (int i = threadIdx.x; i < kQuantTableBytes / 16; i += kThreads)
    reinterpret_cast<uint4*>(shared)[i] = reinterpret_cast<const uint4*>(table)[i];
}

// One thread's inputs for one tile, as loaded (16-byte words of parameter and
// gradient, 8-byte words of codes): the kernel loads the next tile's while it
// computes on this one, so each warp keeps loads in flight through its long
// chain of math.
template <typename T>
struct TileInputs {
  static constexpr int kWords = int(sizeof(T)) / 2;  // uint4 words per 8 values
  uint4 param[kWords], grad[kWords];
  uint2 q1, q2;
  float absmax1, absmax2;
};

template <bool kVector, typename T>
__device__ __forceinline__ void load_words8(const T* __restrict__ p, int64_t i, int64_t n, uint4 (&w)[sizeof(T) / 2]) {
  if (kVector) {
#pragma unroll
    for (int k = 0; k < int(sizeof(T)) / 2; ++k) w[k] = reinterpret_cast<const uint4*>(p + i)[k];
  } else {
    T v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = i + j < n ? p[i + j] : from_f<T>(0.f);
    memcpy(w, v, sizeof v);
  }
}

template <bool kVector>
__device__ __forceinline__ uint2 load_code_word(const uint8_t* __restrict__ q, int64_t i, int64_t n) {
  uint8_t c[8];
  load_codes8<kVector>(q, i, n, c);
  uint2 w;
  memcpy(&w, c, sizeof w);
  return w;
}

template <bool kAligned, typename T>
__device__ __forceinline__ void load_tile(const AdamW8bitParams& p, int64_t i, int64_t block, TileInputs<T>& in) {
  if (i >= p.n) return;
  in.absmax1 = p.absmax1[block];
  in.absmax2 = p.absmax2[block];
  const T* param = static_cast<const T*>(p.param);
  const T* grad = static_cast<const T*>(p.grad);
  if (kAligned && i + kPerThread <= p.n) {
    load_words8<true>(param, i, p.n, in.param);
    load_words8<true>(grad, i, p.n, in.grad);
    in.q1 = load_code_word<true>(p.state1, i, p.n);
    in.q2 = load_code_word<true>(p.state2, i, p.n);
  } else {
    load_words8<false>(param, i, p.n, in.param);
    load_words8<false>(grad, i, p.n, in.grad);
    in.q1 = load_code_word<false>(p.state1, i, p.n);
    in.q2 = load_code_word<false>(p.state2, i, p.n);
  }
}

// Value j of 8 packed in 16-byte words.
template <typename T>
__device__ __forceinline__ float word_value(const uint4 (&w)[sizeof(T) / 2], int j) {
  T v[8];
  memcpy(v, w, sizeof v);
  return to_f(v[j]);
}

__device__ __forceinline__ uint32_t code_of(uint2 w, int j) { return ((j < 4 ? w.x : w.y) >> (8 * (j & 3))) & 0xffu; }

// The 8-bit kernel's AdamW update. The moments follow optim.h's adamw_update
// exactly (so the requantized state is bit-identical to the CPU reference);
// the parameter step m / (sqrt(v) + eps_hat) uses the GPU's approximate square
// root and division (relative error about 2^-22 each, no IEEE slow-path
// branches), which let the compiler interleave the 8 values of a thread.
__device__ __forceinline__ void adamw_update_approx(float& p, float g, float& m, float& v, const AdamWScalars& s) {
  m = add_rn(mul_rn(s.beta1, m), mul_rn(s.one_minus_beta1, g));
  v = add_rn(mul_rn(s.beta2, v), mul_rn(s.one_minus_beta2, mul_rn(g, g)));
  // .ftz: a denormal second moment counts as 0 (the step is then m / eps_hat).
  float root, ratio;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(root) : "f"(v));
  asm("div.approx.ftz.f32 %0, %1, %2;" : "=f"(ratio) : "f"(m), "f"(root + s.eps_hat));
  p = fmaf(-s.step_size, ratio, p * s.decay);
}

// kFast: aligned for vector access and both maps' tables need one round
// (advance 1, as for the dynamic maps), a compile-time count, so the lookup
// is straight-line code; otherwise element-wise access and `advance` rounds.
template <typename T, int kBlock, bool kFast>
__global__ void __launch_bounds__(kThreads) adamw8bit_kernel(AdamW8bitParams p) {
  constexpr int kGroup = kBlock / kPerThread;
  __shared__ float map1[kMapSize], map2[kMapSize];
  __shared__ __align__(16) uint8_t qtable1[kQuantTableBytes], qtable2[kQuantTableBytes];
  __shared__ float scratch1[kThreads / 32], scratch2[kThreads / 32];
  load_map(map1, p.map1);
  load_map(map2, p.map2);
  load_table(qtable1, p.qtable1);
  load_table(qtable2, p.qtable2);

  T* param = static_cast<T*>(p.param);
  constexpr int64_t kTile = int64_t(kThreads) * kPerThread;
  const auto first_of = [&](int64_t tile) { return tile * kTile + int64_t(threadIdx.x) * kPerThread; };
  TileInputs<T> next;
  load_tile<kFast>(p, first_of(blockIdx.x), first_of(blockIdx.x) / kBlock, next);
  __syncthreads();  // the tables
  // The loop bound depends on blockIdx only, so every thread of the CTA runs
  // the same iterations (group_max may __syncthreads).
  for (int64_t tile = blockIdx.x; tile * kTile < p.n; tile += gridDim.x) {
    const int64_t i = first_of(tile);
    const int64_t block = i / kBlock;
    const int valid = int(min(int64_t(kPerThread), max(p.n - i, int64_t(0))));  // values of this thread in range
    const bool vector = kFast && valid == kPerThread;
    const TileInputs<T> in = next;
    const int64_t after = first_of(tile + gridDim.x);
    load_tile<kFast>(p, after, after / kBlock, next);

    float pv[8], m[8], v[8];
    float absmax1 = 0.f, absmax2 = 0.f;
    if (valid > 0) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        pv[j] = word_value<T>(in.param, j);
        m[j] = dequantize(map1, uint8_t(code_of(in.q1, j)), in.absmax1);
        v[j] = dequantize(map2, uint8_t(code_of(in.q2, j)), in.absmax2);
        adamw_update_approx(pv[j], word_value<T>(in.grad, j), m[j], v[j], p.s);
        if (j < valid) {  // padding lanes past n must not raise the absmax
          absmax1 = fmaxf(absmax1, fabsf(m[j]));
          absmax2 = fmaxf(absmax2, fabsf(v[j]));
        }
      }
      // The parameter is done: store it now rather than hold it in registers
      // through the reductions.
      if (vector) store8<true>(param, i, p.n, pv); else store8<false>(param, i, p.n, pv);
    }
    absmax1 = group_max<kGroup>(absmax1, scratch1);
    absmax2 = group_max<kGroup>(absmax2, scratch2);
    if (kGroup > 32) __syncthreads();  // the scratch is reused by the next tile
    if (valid == 0) continue;
    if (i % kBlock == 0) {
      p.absmax1[block] = absmax1;
      p.absmax2[block] = absmax2;
    }
    uint8_t q1[8], q2[8];
    const float inv1 = inverse_scale(absmax1), inv2 = inverse_scale(absmax2);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      q1[j] = quantize_lookup(qtable1, kFast ? 1 : p.advance1, normalize(m[j], inv1));
      q2[j] = quantize_lookup(qtable2, kFast ? 1 : p.advance2, normalize(v[j], inv2));
    }
    if (vector) {
      store_codes8<true>(p.state1, i, p.n, q1);
      store_codes8<true>(p.state2, i, p.n, q2);
    } else {
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
  __shared__ __align__(16) uint8_t qtable[kQuantTableBytes];
  __shared__ float scratch[kThreads / 32];
  load_table(qtable, p.qtable);
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
  const float inv = inverse_scale(absmax);
#pragma unroll
  for (int j = 0; j < 8; ++j) q[j] = quantize_lookup(qtable, p.advance, normalize(x[j], inv));
  store_codes8<false>(p.q, i, p.n, q);
}

__global__ void dequantize_kernel(BlockwiseParams p) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride)
    p.x[i] = dequantize(p.map, p.q[i], p.absmax[i / p.block_size]);
}

bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

int64_t ctas_for(int64_t n) { return (n + kThreads * kPerThread - 1) / (kThreads * kPerThread); }

// A persistent grid: as many CTAs of `kernel` as are resident on the GPU at
// once (more would wait for a second wave and finish late, unevenly), never
// more than there are tiles.
template <typename Kernel>
int64_t persistent_ctas(Kernel kernel, int64_t n) {
  int device = 0, sms = 0, per_sm = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0) != cudaSuccess || per_sm < 1)
    per_sm = 1;
  return std::min<int64_t>(ctas_for(n), int64_t(sms) * per_sm);
}

template <typename Kernel, typename Params>
void launch_persistent(Kernel kernel, const Params& p, cudaStream_t stream) {
  kernel<<<dim3(unsigned(persistent_ctas(kernel, p.n))), kThreads, 0, stream>>>(p);
}

template <typename T>
void launch_adamw8bit(const AdamW8bitParams& p, cudaStream_t stream) {
  const bool fast = aligned(p.param, 16) && aligned(p.grad, 16) && aligned(p.state1, 8) && aligned(p.state2, 8) &&
                    p.advance1 == 1 && p.advance2 == 1;
  if (p.block_size == 2048)
    launch_persistent(fast ? adamw8bit_kernel<T, 2048, true> : adamw8bit_kernel<T, 2048, false>, p, stream);
  else
    launch_persistent(fast ? adamw8bit_kernel<T, 256, true> : adamw8bit_kernel<T, 256, false>, p, stream);
}

template <typename T>
void launch_adamw32bit(const AdamW32bitParams& p, cudaStream_t stream) {
  const bool vec = aligned(p.param, 16) && aligned(p.grad, 16) && aligned(p.exp_avg, 16) && aligned(p.exp_avg_sq, 16);
  launch_persistent(vec ? adamw32bit_kernel<T, true> : adamw32bit_kernel<T, false>, p, stream);
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
