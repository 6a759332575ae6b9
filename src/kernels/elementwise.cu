// CUDA kernels for compressed activations and the fused-MLP elementwise cores;
// same results and code layout as the CPU reference (elementwise_cpu.cpp).
//
// Work split: a warp handles a tile of 256 consecutive elements, each lane 8 of
// them (one 16-byte access for 16-bit types, two for fp32). Four lanes cover one
// 32-element code group: each builds an 8-bit fragment per bit plane and two
// xor-shuffles assemble the 32-bit words, which lanes 0..k-1 of the quad store.
// Eight lanes cover one 64-element int8 group: three xor-shuffles give its absmax.
// Loops run over whole tiles so every lane of a warp reaches every shuffle.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "elementwise.h"
#include "cuda_common.cuh"

namespace unswag::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kPerLane = 8;
constexpr int64_t kTile = 32 * kPerLane;


// Math type: float, or double for double storage.

// Loads 8 elements starting at i (vectorised when aligned and fully in range).
template <typename T, bool kAligned>
__device__ __forceinline__ void load8(const T* __restrict__ p, int64_t i, int64_t n, acc_t<T> (&v)[8]) {
  if (kAligned && i + 8 <= n && sizeof(T) <= 4) {
    if constexpr (sizeof(T) == 2) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p + i);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = to_f(e[j]);
    } else if constexpr (sizeof(T) == 4) {
      const float4 a = *reinterpret_cast<const float4*>(p + i);
      const float4 b = *reinterpret_cast<const float4*>(p + i + 4);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
      v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = i + j < n ? to_f(p[i + j]) : acc_t<T>(0);
  }
}

template <typename T, bool kAligned>
__device__ __forceinline__ void store8(T* __restrict__ p, int64_t i, int64_t n, const acc_t<T> (&v)[8]) {
  if (kAligned && i + 8 <= n && sizeof(T) <= 4) {
    if constexpr (sizeof(T) == 2) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int j = 0; j < 8; ++j) e[j] = from_f<T>(v[j]);
      *reinterpret_cast<uint4*>(p + i) = raw;
    } else if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float4*>(p + i) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(p + i + 4) = make_float4(v[4], v[5], v[6], v[7]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (i + j < n) p[i + j] = from_f<T>(v[j]);
  }
}

// Eight elements as loaded, still in the storage type: a tile kept packed
// costs 4 registers for 16-bit types instead of 8 floats, so more tiles can be
// in flight (loads issued before any math) at the same occupancy.
template <typename T>
struct alignas(16) Pack8 {
  T e[8];
};
template <typename T, bool kAligned>
__device__ __forceinline__ Pack8<T> load_pack8(const T* __restrict__ p, int64_t i, int64_t n) {
  Pack8<T> r;
  if (kAligned && i + 8 <= n && sizeof(T) <= 4) {
    if constexpr (sizeof(T) == 2) {
      *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p + i);
    } else if constexpr (sizeof(T) == 4) {
      reinterpret_cast<float4*>(&r)[0] = *reinterpret_cast<const float4*>(p + i);
      reinterpret_cast<float4*>(&r)[1] = *reinterpret_cast<const float4*>(p + i + 4);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) r.e[j] = i + j < n ? p[i + j] : from_f<T>(acc_t<T>(0));
  }
  return r;
}
template <typename T>
__device__ __forceinline__ void unpack8(const Pack8<T>& r, acc_t<T> (&v)[8]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = to_f(r.e[j]);
}

template <typename A>
__device__ __forceinline__ uint32_t encode(const FewbitTable& t, A x) {
  const int nb = (1 << t.bits) - 1;
  uint32_t c = 0;
  for (int b = 0; b < nb; ++b) c += !(x <= t.boundaries[b]) ? 1u : 0u;
  return c;
}

// Quantises 8 values held by each of 8 lanes (one int8 group); returns the scale.
template <typename A>
__device__ __forceinline__ float quantize8(const A (&v)[8], int8_t (&q)[8]) {
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(float(v[j])));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
  const float s = amax / 127.f;
  const float inv = s > 0.f ? 1.f / s : 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) q[j] = int8_t(fmaxf(-127.f, fminf(127.f, rintf(float(v[j]) * inv))));
  return s;
}

__device__ __forceinline__ void store_q8(int8_t* __restrict__ q, float* __restrict__ scale, int64_t i, int64_t n,
                                         const int8_t (&v)[8], float s, int lane) {
  if (i + 8 <= n) {
    *reinterpret_cast<uint2*>(q + i) = *reinterpret_cast<const uint2*>(v);  // int8 buffers are 8-byte aligned
  } else {
    for (int j = 0; j < 8; ++j)
      if (i + j < n) q[i + j] = v[j];
  }
  if ((lane & 7) == 0 && i < n) scale[i / kInt8Group] = s;
}

template <typename A>
__device__ __forceinline__ void load_q8(const int8_t* __restrict__ q, const float* __restrict__ scale, int64_t i,
                                        int64_t n, A (&v)[8]) {
  const A s = i < n ? A(scale[i / kInt8Group]) : A(0);
  if (i + 8 <= n) {
    const uint2 raw = *reinterpret_cast<const uint2*>(q + i);
    const int8_t* e = reinterpret_cast<const int8_t*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = A(e[j]) * s;
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = i + j < n ? A(q[i + j]) * s : A(0);
  }
}

// Iterates warp-uniformly over 256-element tiles; body(i, lane) with i the
// lane's first element. Every lane of a warp runs the same iterations.
template <typename Body>
__device__ __forceinline__ void for_each_tile(int64_t n, Body&& body) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t tile = warp; tile * kTile < n; tile += warps) body(tile * kTile + int64_t(lane) * kPerLane, lane);
}

// Few-bit kernels are specialised on the bit width and the activation, so the
// encode compares against constants, only kBits planes are packed and shuffled,
// and the activation's branch is resolved at compile time. Each warp keeps
// kTiles tiles in flight: the loads of all of them, held packed (Pack8), are
// issued before the math of any, to hide memory latency. The defaults are what
// bench/fewbit_tiles.cu measured best on the H200 (docs/BENCHMARKS.md): the
// forward is bound by its math (encode, bit planes, the activation), so more
// tiles only cost registers (t=4: 80-108 per thread, within 1-5 points of
// t=2); the 16-bit backward loses 15-20 points at t=4 (occupancy) and the
// fp32 backward is within 3 points at t=2 and t=4.
template <typename T>
constexpr int fewbit_fwd_tiles() {
  return 2;
}
template <typename T>
constexpr int fewbit_bwd_tiles() {
  return sizeof(T) == 2 ? 2 : 4;
}

// f(x) for 16-bit outputs: fast fp32 intrinsics (about 2 ulp of fp32, far
// below the final rounding to 8 or 11 mantissa bits) and, for GELU, PyTorch's
// own 1 + erf form; fp32/fp64 outputs use the accurate act_forward.
template <Act kAct>
__device__ __forceinline__ float act_forward_16bit(float x) {
  if constexpr (kAct == Act::kSiLU) {
    return __fdividef(x, 1.f + __expf(-x));
  } else if constexpr (kAct == Act::kGELU) {
    return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
  } else if constexpr (kAct == Act::kGELUTanh) {
    const float w = 1.5957691216057308f * (x + 0.044715f * x * x * x);  // 2 sqrt(2/pi) (x + c x^3)
    return __fdividef(x, 1.f + __expf(-w));
  } else {
    return act_forward(kAct, x);
  }
}
// f'(x) for 16-bit data, with the same fast intrinsics.
template <Act kAct>
__device__ __forceinline__ float act_derivative_16bit(float x) {
  if constexpr (kAct == Act::kSiLU) {
    const float s = __fdividef(1.f, 1.f + __expf(-x));
    return s * (1.f + x * (1.f - s));
  } else if constexpr (kAct == Act::kGELU) {
    return 0.5f * (1.f + erff(x * 0.70710678118654752f)) + x * 0.3989422804014327f * __expf(-0.5f * x * x);
  } else if constexpr (kAct == Act::kGELUTanh) {
    const float k = 0.7978845608028654f, c = 0.044715f;
    const float s = __fdividef(1.f, 1.f + __expf(-2.f * k * (x + c * x * x * x)));
    return s + 2.f * x * s * (1.f - s) * k * (1.f + 3.f * c * x * x);
  } else {
    return act_derivative(kAct, x);
  }
}
template <typename T, Act kAct>
__device__ __forceinline__ acc_t<T> act_derivative_for(acc_t<T> x) {
  if constexpr (sizeof(T) == 2) return act_derivative_16bit<kAct>(x);
  else return act_derivative(kAct, x);
}
template <typename T, Act kAct>
__device__ __forceinline__ acc_t<T> act_forward_for(acc_t<T> x) {
  if constexpr (sizeof(T) == 2) return act_forward_16bit<kAct>(x);
  else return act_forward(kAct, x);
}

template <typename T, int kBits, Act kAct, int kTiles = fewbit_fwd_tiles<T>()>
__global__ void __launch_bounds__(kThreads) fewbit_forward_kernel(FewbitForwardParams p, bool aligned) {
  const T* __restrict__ x = static_cast<const T*>(p.x);
  T* __restrict__ y = static_cast<T*>(p.y);
  constexpr int kLevels = 1 << kBits;
  // 3- and 4-bit codes: a binary search over the boundaries in shared memory
  // (kBits compares) beats 7 or 15 compares against constants.
  __shared__ float bounds[kLevels];
  if constexpr (kBits >= 3) {
    if (threadIdx.x < kLevels - 1) bounds[threadIdx.x] = p.table.boundaries[threadIdx.x];
    __syncthreads();
  }
  const int lane = threadIdx.x & 31;
  const int quad = lane & 3;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t tile = warp; tile * kTile < p.n; tile += kTiles * warps) {
    Pack8<T> raw[kTiles];
    int64_t base[kTiles];
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      base[t] = (tile + t * warps) * kTile + int64_t(lane) * kPerLane;
      raw[t] = aligned ? load_pack8<T, true>(x, base[t], p.n) : load_pack8<T, false>(x, base[t], p.n);
    }
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      const int64_t i = base[t];
      acc_t<T> v[8];
      unpack8(raw[t], v);
      uint32_t frag[kBits] = {};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        uint32_t c = 0;
        if constexpr (kBits >= 3) {
          // Invariant: code in [c, c + 2 step); boundary c + step - 1 splits it.
#pragma unroll
          for (int step = kLevels / 2; step >= 1; step /= 2)
            c += !(v[j] <= acc_t<T>(bounds[c + step - 1])) ? step : 0u;
        } else {
#pragma unroll
          for (int b = 0; b < kLevels - 1; ++b) c += !(v[j] <= p.table.boundaries[b]) ? 1u : 0u;
        }
        c = i + j < p.n ? c : 0u;
#pragma unroll
        for (int b = 0; b < kBits; ++b) frag[b] |= ((c >> b) & 1u) << j;
        v[j] = act_forward_for<T, kAct>(v[j]);
      }
      if (y) {
        if (aligned) store8<T, true>(y, i, p.n, v); else store8<T, false>(y, i, p.n, v);
      }
      // Assemble each plane's 32-bit word across the 4 lanes of this code group;
      // lane `quad` of the group stores plane `quad`.
      uint32_t mine = 0;
#pragma unroll
      for (int b = 0; b < kBits; ++b) {
        uint32_t w = frag[b] << (8 * quad);
        w |= __shfl_xor_sync(0xffffffffu, w, 1);
        w |= __shfl_xor_sync(0xffffffffu, w, 2);
        mine = quad == b ? w : mine;
      }
      const int64_t group = i / kCodeGroup;
      if (quad < kBits && group * kCodeGroup < p.n) p.codes[group * kBits + quad] = mine;
    }
  }
}

template <typename T, int kBits, int kTiles = fewbit_bwd_tiles<T>()>
__global__ void __launch_bounds__(kThreads) fewbit_backward_kernel(FewbitBackwardParams p, bool aligned) {
  const T* __restrict__ dy = static_cast<const T*>(p.grad_y);
  T* __restrict__ dx = static_cast<T*>(p.grad_x);
  constexpr int kLevels = 1 << kBits;
  // The table in shared memory: a per-lane (divergent) index into kernel
  // parameters would be serialised.
  __shared__ acc_t<T> values[kLevels];
  if (threadIdx.x < kLevels) values[threadIdx.x] = p.table.values[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int shift = 8 * (lane & 3);
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t tile = warp; tile * kTile < p.n; tile += kTiles * warps) {
    Pack8<T> raw[kTiles];
    uint32_t frag[kTiles][kBits];
    int64_t base[kTiles];
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      base[t] = (tile + t * warps) * kTile + int64_t(lane) * kPerLane;
      const int64_t group = base[t] / kCodeGroup;
#pragma unroll
      for (int b = 0; b < kBits; ++b)
        frag[t][b] = base[t] < p.n ? (__ldg(p.codes + group * kBits + b) >> shift) & 0xffu : 0u;
      raw[t] = aligned ? load_pack8<T, true>(dy, base[t], p.n) : load_pack8<T, false>(dy, base[t], p.n);
    }
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      acc_t<T> v[8];
      unpack8(raw[t], v);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        uint32_t c = 0;
#pragma unroll
        for (int b = 0; b < kBits; ++b) c |= ((frag[t][b] >> j) & 1u) << b;
        const acc_t<T> d = values[c];
        v[j] = d == 0 ? acc_t<T>(0) : v[j] * d;
      }
      if (aligned) store8<T, true>(dx, base[t], p.n, v); else store8<T, false>(dx, base[t], p.n, v);
    }
  }
}

// Exact derivative from the kept output: Newton inversion per element (compute
// bound, so one element per thread; activation_math.h has the solver).
template <typename T, Act kAct>
__global__ void __launch_bounds__(kThreads) inverse_backward_kernel(InverseBackwardParams p) {
  using A = acc_t<T>;
  const T* __restrict__ dy = static_cast<const T*>(p.grad_y);
  const T* __restrict__ y = static_cast<const T*>(p.y);
  T* __restrict__ dx = static_cast<T*>(p.grad_x);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
    const A yi = to_f(y[i]);
    const bool right = (__ldg(p.side + i / kCodeGroup) >> (i % kCodeGroup)) & 1u;
    const A x = act_inverse(kAct, yi, right, A(p.argmin), A(p.fmin));
    dx[i] = from_f<T>(to_f(dy[i]) * act_derivative(kAct, x));
  }
}

template <typename T, bool kAligned, Act kAct>
__global__ void __launch_bounds__(kThreads) gated_forward_kernel(GatedForwardParams p) {
  const T* __restrict__ gate = static_cast<const T*>(p.gate);
  const T* __restrict__ up = static_cast<const T*>(p.up);
  T* __restrict__ h = static_cast<T*>(p.h);
  for_each_tile(p.n, [&](int64_t i, int lane) {
    acc_t<T> g[8], u[8], o[8];
    load8<T, kAligned>(gate, i, p.n, g);
    load8<T, kAligned>(up, i, p.n, u);
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = act_forward_for<T, kAct>(g[j]) * u[j];
    store8<T, kAligned>(h, i, p.n, o);
    if (p.gate_q) {
      int8_t q[8];
      const float sg = quantize8(g, q);
      store_q8(p.gate_q, p.gate_scale, i, p.n, q, sg, lane);
      const float su = quantize8(u, q);
      store_q8(p.up_q, p.up_scale, i, p.n, q, su, lane);
    }
  });
}

template <typename T, bool kAligned, Act kAct>
__global__ void __launch_bounds__(kThreads) gated_backward_kernel(GatedBackwardParams p) {
  const T* __restrict__ gate = static_cast<const T*>(p.gate);
  const T* __restrict__ up = static_cast<const T*>(p.up);
  const T* __restrict__ dh = static_cast<const T*>(p.grad_h);
  T* __restrict__ h = static_cast<T*>(p.h);
  T* __restrict__ dg = static_cast<T*>(p.grad_gate);
  T* __restrict__ du = static_cast<T*>(p.grad_up);
  for_each_tile(p.n, [&](int64_t i, int lane) {
    if (i < p.n) {
      acc_t<T> g[8], u[8], d[8], ho[8], dgo[8], duo[8];
      if (gate) load8<T, kAligned>(gate, i, p.n, g); else load_q8(p.gate_q, p.gate_scale, i, p.n, g);
      if (up) load8<T, kAligned>(up, i, p.n, u); else load_q8(p.up_q, p.up_scale, i, p.n, u);
      load8<T, kAligned>(dh, i, p.n, d);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const acc_t<T> a = act_forward_for<T, kAct>(g[j]);
        ho[j] = a * u[j];
        duo[j] = d[j] * a;
        dgo[j] = d[j] * u[j] * act_derivative_for<T, kAct>(g[j]);
      }
      if (h) store8<T, kAligned>(h, i, p.n, ho);
      store8<T, kAligned>(du, i, p.n, duo);
      store8<T, kAligned>(dg, i, p.n, dgo);
    }
  });
}

template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads) quantize_int8_kernel(QuantizeInt8Params p) {
  const T* __restrict__ x = static_cast<const T*>(p.x);
  for_each_tile(p.n, [&](int64_t i, int lane) {
    acc_t<T> v[8];
    int8_t q[8];
    load8<T, kAligned>(x, i, p.n, v);
    const float s = quantize8(v, q);
    store_q8(p.q, p.scale, i, p.n, q, s, lane);
  });
}

template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads) dequantize_int8_kernel(DequantizeInt8Params p) {
  T* __restrict__ x = static_cast<T*>(p.x);
  for_each_tile(p.n, [&](int64_t i, int lane) {
    if (i < p.n) {
      acc_t<T> v[8];
      load_q8(p.q, p.scale, i, p.n, v);
      store8<T, kAligned>(x, i, p.n, v);
    }
  });
}

bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* q : ptrs)
    if (q && (reinterpret_cast<uintptr_t>(q) & 15u) != 0) return false;
  return true;
}

// A grid-stride grid of exactly one wave: as many blocks as can be resident at
// once (SMs x the kernel's occupancy), or fewer for small n. More blocks than
// that would run in a partial second wave that leaves SMs idle.
template <auto kKernel>
int grid_for(int64_t n) {
  static const int blocks_per_wave = [] {
    int dev = 0, sms = 0, per_sm = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kKernel, kThreads, 0);
    return std::max(1, sms) * std::max(1, per_sm);
  }();
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int64_t blocks = (tiles + (kThreads / 32) - 1) / (kThreads / 32);
  return int(std::max<int64_t>(1, std::min<int64_t>(blocks, blocks_per_wave)));
}

// Runtime (dtype, bits, activation) -> compile-time kernel instance.
template <typename F>
void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat64: f(double{}); break;
  }
}

// Instantiates kernel<T, aligned> for the runtime dtype and alignment.
template <template <typename, bool> class K, typename P>
void launch(const P& p, bool aligned, void* stream, const char* name) {
  if (p.n == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (aligned) K<T, true>::run(s, p); else K<T, false>::run(s, p);
  });
  check_launch(name);
}

#define UNSWAG_KERNEL_LAUNCHER(Name, kernel, Params)                                   \
  template <typename T, bool A>                                                         \
  struct Name {                                                                         \
    static void run(cudaStream_t s, const Params& p) {                                  \
      kernel<T, A><<<grid_for<kernel<T, A>>(p.n), kThreads, 0, s>>>(p);                 \
    }                                                                                   \
  };
UNSWAG_KERNEL_LAUNCHER(QuantizeInt8, quantize_int8_kernel, QuantizeInt8Params)
UNSWAG_KERNEL_LAUNCHER(DequantizeInt8, dequantize_int8_kernel, DequantizeInt8Params)

}  // namespace

template <typename F>
void with_bits(int bits, F&& f) {
  switch (bits) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: throw std::invalid_argument("unswag: few-bit kernels take 1..4 bits, got " + std::to_string(bits));
  }
}
template <typename F>
void with_act(Act act, F&& f) {
  switch (act) {
    case Act::kReLU: f(std::integral_constant<Act, Act::kReLU>{}); break;
    case Act::kReLU2: f(std::integral_constant<Act, Act::kReLU2>{}); break;
    case Act::kGELU: f(std::integral_constant<Act, Act::kGELU>{}); break;
    case Act::kGELUTanh: f(std::integral_constant<Act, Act::kGELUTanh>{}); break;
    case Act::kSiLU: f(std::integral_constant<Act, Act::kSiLU>{}); break;
  }
}

void fewbit_forward_cuda(const FewbitForwardParams& p, void* stream) {
  if (p.n == 0) return;
  const bool aligned = aligned16({p.x, p.y});
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_bits(p.table.bits, [&](auto bits) {
      with_act(p.act, [&](auto act) {
        constexpr auto kernel = fewbit_forward_kernel<T, decltype(bits)::value, decltype(act)::value>;
        kernel<<<grid_for<kernel>(p.n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p, aligned);
      });
    });
  });
  check_launch("fewbit_forward");
}
void fewbit_backward_cuda(const FewbitBackwardParams& p, void* stream) {
  if (p.n == 0) return;
  const bool aligned = aligned16({p.grad_y, p.grad_x});
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_bits(p.table.bits, [&](auto bits) {
      constexpr auto kernel = fewbit_backward_kernel<T, decltype(bits)::value>;
      kernel<<<grid_for<kernel>(p.n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p, aligned);
    });
  });
  check_launch("fewbit_backward");
}
// Gated kernels: (dtype, alignment, activation) -> instance.
template <template <typename, bool, Act> class K, typename P>
void launch_gated(const P& p, bool aligned, void* stream, const char* name) {
  if (p.n == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_act(p.act, [&](auto act) {
      constexpr Act kAct = decltype(act)::value;
      if (aligned) K<T, true, kAct>::run(s, p); else K<T, false, kAct>::run(s, p);
    });
  });
  check_launch(name);
}
template <typename T, bool A, Act kAct>
struct GatedForward {
  static void run(cudaStream_t s, const GatedForwardParams& p) {
    gated_forward_kernel<T, A, kAct><<<grid_for<gated_forward_kernel<T, A, kAct>>(p.n), kThreads, 0, s>>>(p);
  }
};
template <typename T, bool A, Act kAct>
struct GatedBackward {
  static void run(cudaStream_t s, const GatedBackwardParams& p) {
    gated_backward_kernel<T, A, kAct><<<grid_for<gated_backward_kernel<T, A, kAct>>(p.n), kThreads, 0, s>>>(p);
  }
};

void gated_forward_cuda(const GatedForwardParams& p, void* stream) {
  launch_gated<GatedForward>(p, aligned16({p.gate, p.up, p.h}), stream, "gated_forward");
}
void gated_backward_cuda(const GatedBackwardParams& p, void* stream) {
  launch_gated<GatedBackward>(p, aligned16({p.gate, p.up, p.grad_h, p.h, p.grad_gate, p.grad_up}), stream,
                              "gated_backward");
}
void inverse_backward_cuda(const InverseBackwardParams& p, void* stream) {
  if (p.n == 0) return;
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto go = [&](auto act) {
      constexpr auto kernel = inverse_backward_kernel<T, decltype(act)::value>;
      kernel<<<grid_for<kernel>(p.n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
    };
    switch (p.act) {
      case Act::kGELU: go(std::integral_constant<Act, Act::kGELU>{}); break;
      case Act::kGELUTanh: go(std::integral_constant<Act, Act::kGELUTanh>{}); break;
      case Act::kSiLU: go(std::integral_constant<Act, Act::kSiLU>{}); break;
      default: throw std::invalid_argument("unswag: the inverse scheme needs gelu, gelu_tanh or silu");
    }
  });
  check_launch("inverse_backward");
}
void quantize_int8_cuda(const QuantizeInt8Params& p, void* stream) {
  launch<QuantizeInt8>(p, aligned16({p.x}), stream, "quantize_int8");
}
void dequantize_int8_cuda(const DequantizeInt8Params& p, void* stream) {
  launch<DequantizeInt8>(p, aligned16({p.x}), stream, "dequantize_int8");
}

}  // namespace unswag::kernels
