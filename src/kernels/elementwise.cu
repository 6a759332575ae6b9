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
#include <cstring>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda_common.cuh"
#include "elementwise.h"
#include "fewbit_cells.h"

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
// and the activation's branch is resolved at compile time. Two schedules:
//  - one pass (kPersistent = false): each warp owns kTiles consecutive tiles,
//    issues the loads of all of them (held packed, Pack8), then does the math
//    of each, and exits; the grid covers the input once;
//  - persistent (kPersistent = true): one wave of blocks; each warp walks
//    groups of kTiles tiles with a stride of the whole grid and issues the next
//    group's loads before this group's math, so its loads stay in flight while
//    it computes (what a compute-heavy forward, GELU or a 4-bit encode, needs).
// The defaults are the best one-pass cells of bench/fewbit_tiles.cu's sweep on
// the H200 (2026-12-04), one per dtype, bit width and activation: a measured
// choice, not a model (neighbouring fp32 variants differ by more than their
// math explains). The H100 sweep of 2026-12-06 (docs/BENCHMARKS.md,
// fewbit-tiles) found the persistent schedule slower than the best one-pass
// cell in all but two cells (fp16 3/4-bit GELU forward: 89% persistent, 85-87%
// here), and the 16-bit defaults within 3% of the best cell; several fp32
// defaults are 4-11% below the H100's best (e.g. the 1-bit backward: 87% at
// 4 tiles, 98% at 1, where the H200 had 77% and 60%). They stay until the
// H200 is measured again.
struct FewbitSchedule {
  int tiles;
  bool persistent;
};
template <typename T, int kBits, Act kAct>
constexpr FewbitSchedule fewbit_fwd_schedule() {
  if constexpr (sizeof(T) == 2) {
    if constexpr (kAct == Act::kGELU || kAct == Act::kGELUTanh) return {2, false};
    return {kBits <= 2 ? 1 : 2, false};
  } else if constexpr (sizeof(T) == 4) {
    if constexpr (kAct == Act::kGELU || kAct == Act::kGELUTanh) return {kBits <= 2 ? 4 : 2, false};
    return {kBits == 2 ? 2 : kBits == 3 ? 4 : 1, false};
  }
  return {1, false};
}
template <typename T, int kBits>
constexpr FewbitSchedule fewbit_bwd_schedule() {
  if constexpr (sizeof(T) == 4) return {kBits == 1 ? 4 : kBits == 4 ? 1 : 2, false};
  return {1, false};
}

// Flush-to-zero fast intrinsics: MUFU.EX2 / MUFU.RCP without the extra
// compare-and-scale instructions the non-ftz forms spend on subnormal inputs.
// A subnormal intermediate here only ever feeds 1 + e or x * e, where it is
// below the final rounding to a 16-bit type anyway.
__device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float rcp_ftz(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// GELU for 16-bit outputs: x Phi(x) = x erfc(-x / sqrt 2) / 2, with
//   erfc(z) / 2 = t 2^(Q(t) - z^2 log2 e),  t = 1 / (1 + z / 2),  z = |x| / sqrt 2 >= 0,
// and erfc(-z) = 2 - erfc(z): the form of Numerical Recipes' erfcc, whose
// 10-term polynomial is replaced by a degree-7 one fitted near-minimax on
// z in [0, 10] (scripts/fit_gelu_erfc.py: fit error 6.4e-7 relative), with
// log2 e and the 1/2 folded into it, so the exponential is one MUFU.EX2 and
// no multiply by 1/2 remains. With the fast ex2/rcp, the emulated kernel is
// within 1.3e-6 relative of x Phi(x) for |x| <= 3 and 8e-6 in the far tail,
// where the fp32 rounding of the exponent (about -z^2 log2 e) dominates as it
// did with the 10-term form: far below the final rounding to 8 or 11 mantissa
// bits (half an ulp: 2e-3, 4.9e-4). About 15 instructions where erff spends
// about 24; the two multiply-adds and the multiply fewer than erfcc count
// because a 16-bit few-bit forward at 85% of the H200's copy rate leaves
// about 43 issued instructions per element (132 SMs x 4 issues per clock at
// 1.98 GHz over 0.77e12 elements/s); the bf16 4-bit GELU forward issued 41.8
// with erfcc and issues 33.4 now (scripts/sass_per_element.py).
__device__ __forceinline__ float gelu_16bit(float x) {
  const float a = fabsf(x);
  const float t = rcp_ftz(fmaf(a, 0.35355339059327376f, 1.f));  // z / 2 = |x| / (2 sqrt 2)
  // Q(t), Horner from the highest coefficient.
  float p = -0.2649744153022766f;
  p = fmaf(p, t, 1.0589507818222046f);
  p = fmaf(p, t, -1.3996243476867676f);
  p = fmaf(p, t, 0.46300169825553894f);
  p = fmaf(p, t, -0.03489548712968826f);
  p = fmaf(p, t, 0.561579704284668f);
  p = fmaf(p, t, 1.4417256116867065f);
  p = fmaf(p, t, -2.8257644176483154f);
  // -z^2 log2(e) = -x^2 log2(e) / 2
  const float half_erfc = t * ex2_ftz(fmaf(x * -0.72134752044448170f, x, p));
  return x * (x < 0.f ? half_erfc : 1.f - half_erfc);
}

// f(x) for 16-bit outputs: fast fp32 forms (about 1e-6 relative at worst, far
// below the final rounding to 8 or 11 mantissa bits); fp32/fp64 outputs use the
// accurate act_forward.
template <Act kAct>
__device__ __forceinline__ float act_forward_16bit(float x) {
  if constexpr (kAct == Act::kSiLU) {
    return x * rcp_ftz(1.f + ex2_ftz(x * -1.4426950408889634f));
  } else if constexpr (kAct == Act::kGELU) {
    return gelu_16bit(x);
  } else if constexpr (kAct == Act::kGELUTanh) {
    const float w = 1.5957691216057308f * (x + 0.044715f * x * x * x);  // 2 sqrt(2/pi) (x + c x^3)
    return x * rcp_ftz(1.f + ex2_ftz(w * -1.4426950408889634f));
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

// The k-bit code of v as bit planes: bit b of the code goes to bit j of
// frag[b]. code = #{boundaries b_i with !(v <= b_i)} (NaN counts above every
// boundary). For 1 and 2 bits the planes come straight from the compares:
// with p_i = !(v <= b_i) monotone in i, code = p0 + p1 + p2 has bit 1 = p1 and
// bit 0 = p0 ^ p1 ^ p2. 3 and 4 bits here: a binary search over the boundaries
// in shared memory (kBits dependent loads); the cell table (fewbit_cells.h,
// one load) is the default, this search the fallback and the sweep's reference.
template <int kBits, typename A>
__device__ __forceinline__ void encode_planes(A v, int j, const FewbitTable& table, const float* bounds,
                                              uint32_t (&frag)[kBits]) {
  if constexpr (kBits == 1) {
    frag[0] |= uint32_t(!(v <= A(table.boundaries[0]))) << j;
  } else if constexpr (kBits == 2) {
    const bool p0 = !(v <= A(table.boundaries[0]));
    const bool p1 = !(v <= A(table.boundaries[1]));
    const bool p2 = !(v <= A(table.boundaries[2]));
    frag[0] |= uint32_t(p0 ^ p1 ^ p2) << j;
    frag[1] |= uint32_t(p1) << j;
  } else {
    constexpr int kLevels = 1 << kBits;
    uint32_t c = 0;
    // Invariant: code in [c, c + 2 step); boundary c + step - 1 splits it.
#pragma unroll
    for (int step = kLevels / 2; step >= 1; step /= 2) c += !(v <= A(bounds[c + step - 1])) ? step : 0u;
#pragma unroll
    for (int b = 0; b < kBits; ++b) frag[b] |= ((c >> b) & 1u) << j;
  }
}

// The forward kernel's cell-table argument: the table for 3 and 4 bits with
// kCells, else nothing (no 528 bytes of parameters for a 1- or 2-bit launch).
struct NoFewbitCells {};
template <int kBits, bool kCells>
using FewbitCellsArg = std::conditional_t<kBits >= 3 && kCells, FewbitCells, NoFewbitCells>;

// What a forward block keeps in shared memory: the boundaries (binary search)
// or the cell table.
template <int kBits, bool kCells>
struct FewbitForwardShared {
  float bounds[1 << kBits];
  FewbitCell cells[kBits >= 3 && kCells ? kMaxFewbitCells : 1];
};

// This warp's index in the grid, and the grid's number of warps.
__device__ __forceinline__ int64_t global_warp() {
  return (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
}
__device__ __forceinline__ int64_t grid_warps() { return (int64_t(gridDim.x) * blockDim.x) >> 5; }

// The persistent schedule's loop: warp w takes whole groups w, w + W, ... (W
// warps in the grid); the next group's inputs are loaded (load(g, buffer))
// before this group's work (work(g, buffer)). Two buffers used in turn: no
// register copies between steps.
template <typename Buffer, typename Load, typename Work>
__device__ __forceinline__ void persistent_groups(int64_t groups, Load&& load, Work&& work) {
  const int64_t warps = grid_warps();
  Buffer a, b;
  int64_t g = global_warp();
  if (g < groups) load(g, a);
  while (g < groups) {
    if (g + warps < groups) load(g + warps, b);
    work(g, a);
    g += warps;
    if (g >= groups) break;
    if (g + warps < groups) load(g + warps, a);
    work(g, b);
    g += warps;
  }
}

// Math, codes and stores of one tile whose 8 elements per lane are in `raw`.
// kCheck: the tile may reach past n (elements past n are neither stored nor
// coded: their code bits are 0, which the backward and the CPU reference rely on).
template <typename T, int kBits, Act kAct, bool kCells, bool kAligned, bool kCheck>
__device__ __forceinline__ void fewbit_forward_tile(const FewbitForwardParams& p,
                                                    const FewbitCellsArg<kBits, kCells>& cp,
                                                    const FewbitForwardShared<kBits, kCells>& s,
                                                    const Pack8<T>& raw, int64_t tile, int lane) {
  T* __restrict__ y = static_cast<T*>(p.y);
  const int quad = lane & 3;
  const int64_t i = tile * kTile + lane * kPerLane;
  acc_t<T> v[8];
  unpack8(raw, v);
  const int64_t group = i / kCodeGroup;
  if constexpr (kBits >= 3 && kCells) {
    // Codes as nibbles (element j at bits 4j..4j+3), then the group's bit
    // planes by an in-lane bit transpose and a 4-lane byte transpose
    // (fewbit_cells.h): lane `quad` ends up with plane `quad`.
    uint32_t nib = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      nib |= fewbit_cell_code(v[j], cp, s.cells) << (4 * j);
      v[j] = act_forward_for<T, kAct>(v[j]);
    }
    if constexpr (kCheck) {
      const int64_t left = p.n - i;
      nib &= left >= 8 ? 0xffffffffu : left <= 0 ? 0u : (1u << (4 * left)) - 1u;
    }
    if (y) store8<T, kAligned && !kCheck>(y, i, kCheck ? p.n : i + kPerLane, v);
    uint32_t w = nibbles_to_plane_bytes(nib);
    w = plane_exchange_1(w, __shfl_xor_sync(0xffffffffu, w, 1), quad);
    w = plane_exchange_2(w, __shfl_xor_sync(0xffffffffu, w, 2), quad);
    if (quad < kBits && (!kCheck || group * kCodeGroup < p.n)) p.codes[group * kBits + quad] = w;
  } else {
    uint32_t frag[kBits] = {};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      encode_planes<kBits>(v[j], j, p.table, s.bounds, frag);
      v[j] = act_forward_for<T, kAct>(v[j]);
    }
    if constexpr (kCheck) {
      const int64_t left = p.n - i;
      const uint32_t keep = left >= 8 ? 0xffu : left <= 0 ? 0u : (1u << left) - 1u;
#pragma unroll
      for (int b = 0; b < kBits; ++b) frag[b] &= keep;
    }
    if (y) store8<T, kAligned && !kCheck>(y, i, kCheck ? p.n : i + kPerLane, v);
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
    if (quad < kBits && (!kCheck || group * kCodeGroup < p.n)) p.codes[group * kBits + quad] = mine;
  }
}

// kTiles consecutive tiles from `first`: every load, then every tile's math.
// With kCheck the last tiles may be partial or past n (warp-uniform skips).
template <typename T, int kBits, Act kAct, int kTiles, bool kCells, bool kAligned, bool kCheck>
__device__ __forceinline__ void fewbit_forward_tiles(const FewbitForwardParams& p,
                                                     const FewbitCellsArg<kBits, kCells>& cp,
                                                     const FewbitForwardShared<kBits, kCells>& s, int64_t first,
                                                     int lane) {
  const T* __restrict__ x = static_cast<const T*>(p.x);
  Pack8<T> raw[kTiles];
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    const int64_t i = (first + t) * kTile + lane * kPerLane;
    raw[t] = load_pack8<T, kAligned && !kCheck>(x, i, kCheck ? p.n : i + kPerLane);
  }
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    if (kCheck && (first + t) * kTile >= p.n) break;
    fewbit_forward_tile<T, kBits, kAct, kCells, kAligned, kCheck>(p, cp, s, raw[t], first + t, lane);
  }
}

template <typename T, int kBits, Act kAct, int kTiles, bool kPersistent, bool kCells, bool kAligned>
__global__ void __launch_bounds__(kThreads) fewbit_forward_kernel(FewbitForwardParams p,
                                                                  FewbitCellsArg<kBits, kCells> cp) {
  __shared__ FewbitForwardShared<kBits, kCells> s;
  if constexpr (kBits >= 3) {
    if constexpr (kCells) {
      if (threadIdx.x < cp.count) s.cells[threadIdx.x] = cp.cell[threadIdx.x];
    } else {
      if (threadIdx.x < (1 << kBits) - 1) s.bounds[threadIdx.x] = p.table.boundaries[threadIdx.x];
    }
    __syncthreads();
  }
  const int lane = threadIdx.x & 31;
  constexpr int64_t kGroup = int64_t(kTiles) * kTile;
  if constexpr (!kPersistent) {
    const int64_t first = global_warp() * kTiles;
    if (first * kTile >= p.n) return;
    if ((first + kTiles) * kTile <= p.n)
      fewbit_forward_tiles<T, kBits, kAct, kTiles, kCells, kAligned, false>(p, cp, s, first, lane);
    else
      fewbit_forward_tiles<T, kBits, kAct, kTiles, kCells, kAligned, true>(p, cp, s, first, lane);
  } else {
    const T* __restrict__ x = static_cast<const T*>(p.x);
    const int64_t groups = p.n / kGroup;  // whole groups; the rest is the tail
    struct Tiles {
      Pack8<T> raw[kTiles];
    };
    persistent_groups<Tiles>(
        groups,
        [&](int64_t g, Tiles& in) {
#pragma unroll
          for (int t = 0; t < kTiles; ++t) {
            const int64_t i = (g * kTiles + t) * kTile + lane * kPerLane;
            in.raw[t] = load_pack8<T, kAligned>(x, i, i + kPerLane);
          }
        },
        [&](int64_t g, const Tiles& in) {
#pragma unroll
          for (int t = 0; t < kTiles; ++t)
            fewbit_forward_tile<T, kBits, kAct, kCells, kAligned, false>(p, cp, s, in.raw[t], g * kTiles + t, lane);
        });
    if (groups * kGroup < p.n && global_warp() == groups % grid_warps())
      fewbit_forward_tiles<T, kBits, kAct, kTiles, kCells, kAligned, true>(p, cp, s, groups * kTiles, lane);
  }
}

// values[code] for 1 and 2 bits by selects on registers (no shared-memory
// lookup per element); 3 and 4 bits from shared memory.
template <int kBits, typename A>
__device__ __forceinline__ A decode_value(const uint32_t (&frag)[kBits], int j, const A (&vals)[1 << kBits],
                                          const A* shared_vals) {
  if constexpr (kBits == 1) {
    return (frag[0] >> j) & 1u ? vals[1] : vals[0];
  } else if constexpr (kBits == 2) {
    const bool b0 = (frag[0] >> j) & 1u, b1 = (frag[1] >> j) & 1u;
    return b1 ? (b0 ? vals[3] : vals[2]) : (b0 ? vals[1] : vals[0]);
  } else {
    uint32_t c = 0;
#pragma unroll
    for (int b = 0; b < kBits; ++b) c |= ((frag[b] >> j) & 1u) << b;
    return shared_vals[c];
  }
}

// One backward tile's inputs: grad_y packed, and this lane's byte of each code plane.
template <typename T, int kBits>
struct FewbitBackwardIn {
  Pack8<T> raw;
  uint32_t frag[kBits];
};
template <typename T, int kBits, bool kAligned, bool kCheck>
__device__ __forceinline__ void fewbit_backward_load(const FewbitBackwardParams& p, int64_t tile, int lane,
                                                     FewbitBackwardIn<T, kBits>& in) {
  const T* __restrict__ dy = static_cast<const T*>(p.grad_y);
  const int shift = 8 * (lane & 3);
  const int64_t i = tile * kTile + lane * kPerLane;
  const int64_t group = i / kCodeGroup;
  const bool inside = !kCheck || i < p.n;
#pragma unroll
  for (int b = 0; b < kBits; ++b) in.frag[b] = inside ? (__ldg(p.codes + group * kBits + b) >> shift) & 0xffu : 0u;
  in.raw = load_pack8<T, kAligned && !kCheck>(dy, i, kCheck ? p.n : i + kPerLane);
}
template <typename T, int kBits, bool kAligned, bool kCheck>
__device__ __forceinline__ void fewbit_backward_tile(const FewbitBackwardParams& p, const acc_t<T> (&vals)[1 << kBits],
                                                     const acc_t<T>* shared_vals,
                                                     const FewbitBackwardIn<T, kBits>& in, int64_t tile, int lane) {
  T* __restrict__ dx = static_cast<T*>(p.grad_x);
  const int64_t i = tile * kTile + lane * kPerLane;
  if (kCheck && i >= p.n) return;
  acc_t<T> v[8];
  unpack8(in.raw, v);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const acc_t<T> d = decode_value<kBits>(in.frag, j, vals, shared_vals);
    v[j] = d == 0 ? acc_t<T>(0) : v[j] * d;
  }
  store8<T, kAligned && !kCheck>(dx, i, kCheck ? p.n : i + kPerLane, v);
}
template <typename T, int kBits, int kTiles, bool kAligned, bool kCheck>
__device__ __forceinline__ void fewbit_backward_tiles(const FewbitBackwardParams& p, const acc_t<T> (&vals)[1 << kBits],
                                                      const acc_t<T>* shared_vals, int64_t first, int lane) {
  FewbitBackwardIn<T, kBits> in[kTiles];
#pragma unroll
  for (int t = 0; t < kTiles; ++t) fewbit_backward_load<T, kBits, kAligned, kCheck>(p, first + t, lane, in[t]);
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
    fewbit_backward_tile<T, kBits, kAligned, kCheck>(p, vals, shared_vals, in[t], first + t, lane);
}

template <typename T, int kBits, int kTiles, bool kPersistent, bool kAligned>
__global__ void __launch_bounds__(kThreads) fewbit_backward_kernel(FewbitBackwardParams p) {
  constexpr int kLevels = 1 << kBits;
  __shared__ acc_t<T> shared_vals[kLevels];
  if constexpr (kBits >= 3) {
    if (threadIdx.x < kLevels) shared_vals[threadIdx.x] = p.table.values[threadIdx.x];
    __syncthreads();
  }
  acc_t<T> vals[kLevels];
#pragma unroll
  for (int c = 0; c < kLevels; ++c) vals[c] = kBits <= 2 ? acc_t<T>(p.table.values[c]) : acc_t<T>(0);
  const int lane = threadIdx.x & 31;
  constexpr int64_t kGroup = int64_t(kTiles) * kTile;
  if constexpr (!kPersistent) {
    const int64_t first = global_warp() * kTiles;
    if (first * kTile >= p.n) return;
    if ((first + kTiles) * kTile <= p.n)
      fewbit_backward_tiles<T, kBits, kTiles, kAligned, false>(p, vals, shared_vals, first, lane);
    else
      fewbit_backward_tiles<T, kBits, kTiles, kAligned, true>(p, vals, shared_vals, first, lane);
  } else {
    const int64_t groups = p.n / kGroup;
    struct Tiles {
      FewbitBackwardIn<T, kBits> in[kTiles];
    };
    persistent_groups<Tiles>(
        groups,
        [&](int64_t g, Tiles& in) {
#pragma unroll
          for (int t = 0; t < kTiles; ++t)
            fewbit_backward_load<T, kBits, kAligned, false>(p, g * kTiles + t, lane, in.in[t]);
        },
        [&](int64_t g, const Tiles& in) {
#pragma unroll
          for (int t = 0; t < kTiles; ++t)
            fewbit_backward_tile<T, kBits, kAligned, false>(p, vals, shared_vals, in.in[t], g * kTiles + t, lane);
        });
    if (groups * kGroup < p.n && global_warp() == groups % grid_warps())
      fewbit_backward_tiles<T, kBits, kTiles, kAligned, true>(p, vals, shared_vals, groups * kTiles, lane);
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

// Blocks of kKernel that fit on the device at once: SMs x its occupancy.
template <auto kKernel>
int blocks_per_wave() {
  static const int blocks = [] {
    int dev = 0, sms = 0, per_sm = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kKernel, kThreads, 0);
    return std::max(1, sms) * std::max(1, per_sm);
  }();
  return blocks;
}

// A grid-stride grid of exactly one wave, or fewer blocks for small n. More
// blocks than that would run in a partial second wave that leaves SMs idle.
template <auto kKernel>
int grid_for(int64_t n) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int64_t blocks = (tiles + (kThreads / 32) - 1) / (kThreads / 32);
  return int(std::max<int64_t>(1, std::min<int64_t>(blocks, blocks_per_wave<kKernel>())));
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

// The cell table of p.table (fewbit_cells.h), rebuilt only when the table
// changes (a few microseconds of host time for 64 cells x 15 boundaries).
const FewbitCells& fewbit_cells_for(const FewbitTable& t) {
  thread_local FewbitTable key;
  thread_local FewbitCells cells;
  thread_local bool valid = false;
  if (!valid || key.bits != t.bits || std::memcmp(key.boundaries, t.boundaries, sizeof t.boundaries) != 0) {
    key = t;
    cells = make_fewbit_cells(t);
    valid = true;
  }
  return cells;
}

// Blocks of a few-bit launch: one pass covers every tile once; a persistent
// launch is at most one wave.
template <auto kKernel>
unsigned fewbit_blocks(int64_t n, int tiles, bool persistent) {
  const int64_t tile_count = (n + kTile - 1) / kTile;
  const int64_t per_block = int64_t(kThreads / 32) * tiles;
  int64_t blocks = (tile_count + per_block - 1) / per_block;
  if (persistent) blocks = std::min<int64_t>(blocks, blocks_per_wave<kKernel>());
  // gridDim.x holds up to 2^31 - 1 blocks: 2^42 elements at one tile per warp.
  if (blocks > 0x7fffffff)
    throw std::invalid_argument("unswag: few-bit kernels take at most 2^42 elements, got " + std::to_string(n));
  return unsigned(std::max<int64_t>(blocks, 1));
}

// Launches one few-bit kernel instance (also what bench/fewbit_tiles.cu times).
// kCells selects the cell-table encode for 3 and 4 bits (the binary search
// when false, or when the table's boundaries are too close for its cells).
template <typename T, int kBits, Act kAct, int kTiles, bool kPersistent, bool kCells = true>
void launch_fewbit_forward(const FewbitForwardParams& p, cudaStream_t stream) {
  if (p.n == 0) return;
  constexpr bool kUseCells = kBits >= 3 && kCells;
  FewbitCellsArg<kBits, kCells> cells{};
  if constexpr (kUseCells) {
    cells = fewbit_cells_for(p.table);
    if (cells.count == 0) return launch_fewbit_forward<T, kBits, kAct, kTiles, kPersistent, false>(p, stream);
  }
  if (aligned16({p.x, p.y}))
    fewbit_forward_kernel<T, kBits, kAct, kTiles, kPersistent, kCells, true>
        <<<fewbit_blocks<fewbit_forward_kernel<T, kBits, kAct, kTiles, kPersistent, kCells, true>>(p.n, kTiles, kPersistent),
           kThreads, 0, stream>>>(p, cells);
  else
    fewbit_forward_kernel<T, kBits, kAct, kTiles, kPersistent, kCells, false>
        <<<fewbit_blocks<fewbit_forward_kernel<T, kBits, kAct, kTiles, kPersistent, kCells, false>>(p.n, kTiles, kPersistent),
           kThreads, 0, stream>>>(p, cells);
}
template <typename T, int kBits, int kTiles, bool kPersistent>
void launch_fewbit_backward(const FewbitBackwardParams& p, cudaStream_t stream) {
  if (p.n == 0) return;
  if (aligned16({p.grad_y, p.grad_x}))
    fewbit_backward_kernel<T, kBits, kTiles, kPersistent, true>
        <<<fewbit_blocks<fewbit_backward_kernel<T, kBits, kTiles, kPersistent, true>>(p.n, kTiles, kPersistent),
           kThreads, 0, stream>>>(p);
  else
    fewbit_backward_kernel<T, kBits, kTiles, kPersistent, false>
        <<<fewbit_blocks<fewbit_backward_kernel<T, kBits, kTiles, kPersistent, false>>(p.n, kTiles, kPersistent),
           kThreads, 0, stream>>>(p);
}

void fewbit_forward_cuda(const FewbitForwardParams& p, void* stream) {
  if (p.n == 0) return;
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_bits(p.table.bits, [&](auto bits) {
      with_act(p.act, [&](auto act) {
        constexpr int kBits = decltype(bits)::value;
        constexpr Act kAct = decltype(act)::value;
        constexpr FewbitSchedule kS = fewbit_fwd_schedule<T, kBits, kAct>();
        launch_fewbit_forward<T, kBits, kAct, kS.tiles, kS.persistent>(p, static_cast<cudaStream_t>(stream));
      });
    });
  });
  check_launch("fewbit_forward");
}
void fewbit_backward_cuda(const FewbitBackwardParams& p, void* stream) {
  if (p.n == 0) return;
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_bits(p.table.bits, [&](auto bits) {
      constexpr int kBits = decltype(bits)::value;
      constexpr FewbitSchedule kS = fewbit_bwd_schedule<T, kBits>();
      launch_fewbit_backward<T, kBits, kS.tiles, kS.persistent>(p, static_cast<cudaStream_t>(stream));
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
