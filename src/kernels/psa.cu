// The PSA sequence primitives on the GPU (the math and layouts: psa.h).
//
// causal_conv: one thread per (b, time tile, c), consecutive threads on
// consecutive channels (coalesced rows of [B, T, C]). A thread walks its tile
// keeping the last K inputs in registers (K padded up to a power of two KP <=
// 16 with leading zero taps, so each tap count is one of five unrolled
// templates; larger K takes a plain loop). The backward is two such walks:
// dx_t = sum_j w_j dy_{t+K-1-j} (plus an optional addend) from a register
// window of the next KP values of dy, and dw_j, dbias accumulated in
// registers from x's window and dy. dw/dbias leave as per-(b, tile)
// partials, summed by the caller (deterministic).
//
// linear_scan: a three-pass chunked scan over chunks of kScanChunk steps,
// one thread per (b, chunk, c):
//   1. each chunk's affine map h_end = P h_before + E (and, in backward, the
//      reverse map g_start = Eg + Qg g_after, computable walking forward as
//      Eg = sum_t (a_{s+1} ... a_t) dh_t);
//   2. one thread per (b, c) chains the maps over the chunks (T / 256 steps,
//      8 chunks' loads issued before their dependent FMAs), leaving each
//      chunk's incoming state;
//   3. each chunk is replayed from its incoming state: forward writes h;
//      backward first keeps h at its 16 sub-chunk starts in registers, then,
//      last sub-chunk first, recomputes 16 steps of h into registers and runs
//      the reverse scan over them, writing dx = g and da = g h_{t-1} (the
//      gated EMA: dv, and dz summed over each warp's 32 channels by one
//      reduce-scatter per 16 steps). Given the forward's stored h (the
//      EMA form's h_saved), the backward skips the replay: one reverse walk
//      per chunk reads h_{t-1} back, and pass 1 forms only the reverse maps.
// All state is fp32 (fp64 for fp64) whatever the storage dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <type_traits>

#include "cuda_common.cuh"
#include "psa.h"

namespace unswag::kernels {
namespace {

constexpr int kThreads = 256;

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

unsigned blocks_for(int64_t threads) { return unsigned((threads + kThreads - 1) / kThreads); }

template <typename Fn>
void dispatch_cuda(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat16: fn(__half{}); break;
    case DType::kBFloat16: fn(__nv_bfloat16{}); break;
    case DType::kFloat64: fn(double{}); break;
    default: throw std::runtime_error("unswag: PSA CUDA kernel: unsupported dtype");
  }
}

// Thread -> (b, tile or chunk, c), c fastest.
struct Coord {
  int64_t b, tile, c, group;
};
__device__ __forceinline__ Coord coord(int64_t idx, int64_t channels, int64_t tiles) {
  const int64_t c = idx % channels, g = idx / channels;
  return {g / tiles, g % tiles, c, g};
}

// ---- causal depthwise conv1d ----------------------------------------------

// Thread idx's (b, time tile, c), its steps [t0, t1) and its channel's offset
// in [B, T, C]. A thread of the register-window kernels owns V neighbouring
// channels (q.c is the first): V = 2 for 16-bit storage, so each load moves
// 4 bytes rather than 2 (the walks are latency-bound: one thread per (b,
// tile, channel) at 128k x 2048 kept 8 KB in flight per SM, 58% of the copy
// rate, ncu on the H100).
struct ConvTile {
  Coord q;
  int64_t t0, t1, off;
};
template <int V = 1>
__device__ __forceinline__ ConvTile conv_tile(int64_t idx, int64_t time, int64_t channels, int64_t tile,
                                              int64_t tiles) {
  Coord q = coord(idx, channels / V, tiles);
  q.c *= V;
  const int64_t t0 = q.tile * tile;
  return {q, t0, min64(time, t0 + tile), q.b * time * channels + q.c};
}

// V consecutive elements of storage type T, loaded or stored in one access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};
template <typename A, typename T, int V>
__device__ __forceinline__ void load_pack(A (&out)[V], const T* p) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = A(to_f(pk.v[j]));
}
template <typename A, typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const A (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int j = 0; j < V; ++j) pk.v[j] = from_f<T>(in[j]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}
template <typename A, int V>
__device__ __forceinline__ void fill_pack(A (&out)[V], A x) {
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = x;
}

// KP >= K taps in registers, the first KP - K zero, for V channels from c.
template <typename A, int KP, int V>
__device__ __forceinline__ void load_taps(const A* __restrict__ w, int64_t c, int K, A (&wr)[KP][V]) {
#pragma unroll
  for (int j = 0; j < KP; ++j)
#pragma unroll
    for (int u = 0; u < V; ++u) wr[j][u] = j >= KP - K ? w[(c + u) * K + j - (KP - K)] : A(0);
}

template <typename T, int KP, int V>
__global__ void conv_forward_kernel(const T* __restrict__ x, const acc_t<T>* __restrict__ w,
                                    const acc_t<T>* __restrict__ bias, T* __restrict__ y, int64_t time,
                                    int64_t channels, int K, int64_t tile, int64_t tiles, int64_t threads) {
  using A = acc_t<T>;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= threads) return;
  const auto [q, t0, t1, off] = conv_tile<V>(idx, time, channels, tile, tiles);
  const T* xc = x + off;
  T* yc = y + off;
  A wr[KP][V];
  load_taps(w, q.c, K, wr);
  // win[j] = x[t - KP + 1 + j]; the halo before t0 (zeros before 0).
  A win[KP][V];
#pragma unroll
  for (int j = 0; j < KP - 1; ++j) {
    const int64_t t = t0 - (KP - 1) + j;
    if (t >= 0) load_pack(win[j], xc + t * channels);
    else fill_pack(win[j], A(0));
  }
  A b0[V];
#pragma unroll
  for (int u = 0; u < V; ++u) b0[u] = bias != nullptr ? bias[q.c + u] : A(0);
#pragma unroll 8
  for (int64_t t = t0; t < t1; ++t) {
    load_pack(win[KP - 1], xc + t * channels);
    A acc[V];
#pragma unroll
    for (int u = 0; u < V; ++u) {
      acc[u] = b0[u];
#pragma unroll
      for (int j = 0; j < KP; ++j) acc[u] += wr[j][u] * win[j][u];
    }
    store_pack(yc + t * channels, acc);
#pragma unroll
    for (int j = 0; j < KP - 1; ++j)
#pragma unroll
      for (int u = 0; u < V; ++u) win[j][u] = win[j + 1][u];
  }
}

// The backward as two kernels walking time like the forward (unrolled by 8,
// so eight steps' loads are in flight): dx, the anti-causal conv of dy (plus
// dx_addend), and the per-tile partial sums of dw and dbias. One kernel
// doing both kept a ring of pending outputs and ran rolled, each step
// waiting out its own loads: 2.9 ms for a [128k, 2048] bf16 backward with
// dx_addend on an H100, about 4x its traffic (unrolled by 4: 3.8 ms).
//
// dx_t = sum_{j<K} w_j dy_{t+K-1-j} = sum_{j<KP} wr[j] ahead[KP-1-j] with
// ahead[i] = dy_{t+i} (zero past T) and wr the taps padded in front.
template <typename T, int KP, int V>
__global__ void conv_backward_dx_kernel(const acc_t<T>* __restrict__ w, const T* __restrict__ dy,
                                        T* __restrict__ dx,
                                        const T* __restrict__ dx_addend, int64_t time, int64_t channels, int K,
                                        int64_t tile, int64_t tiles, int64_t threads) {
  using A = acc_t<T>;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= threads) return;
  const auto [q, t0, t1, off] = conv_tile<V>(idx, time, channels, tile, tiles);
  const T* dyc = dy + off;
  A wr[KP][V], ahead[KP][V];
  load_taps(w, q.c, K, wr);
#pragma unroll
  for (int i = 0; i < KP - 1; ++i) {
    if (t0 + i < time) load_pack(ahead[i], dyc + (t0 + i) * channels);
    else fill_pack(ahead[i], A(0));
  }
#pragma unroll 8
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t la = t + KP - 1;
    if (la < time) load_pack(ahead[KP - 1], dyc + la * channels);
    else fill_pack(ahead[KP - 1], A(0));
    A acc[V];
    if (dx_addend != nullptr) load_pack(acc, dx_addend + off + t * channels);
    else fill_pack(acc, A(0));
#pragma unroll
    for (int u = 0; u < V; ++u)
#pragma unroll
      for (int j = 0; j < KP; ++j) acc[u] += wr[j][u] * ahead[KP - 1 - j][u];
    store_pack(dx + off + t * channels, acc);
#pragma unroll
    for (int i = 0; i < KP - 1; ++i)
#pragma unroll
      for (int u = 0; u < V; ++u) ahead[i][u] = ahead[i + 1][u];
  }
}

// dw_j = sum_t dy_t x_{t-K+1+j} and dbias = sum_t dy_t over the tile (the
// forward's window of the last KP inputs).
template <typename T, int KP, int V>
__global__ void conv_backward_dw_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                        acc_t<T>* __restrict__ dw_partial, acc_t<T>* __restrict__ db_partial,
                                        int64_t time, int64_t channels, int K, int64_t tile, int64_t tiles,
                                        int64_t threads) {
  using A = acc_t<T>;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= threads) return;
  const auto [q, t0, t1, off] = conv_tile<V>(idx, time, channels, tile, tiles);
  const T *xc = x + off, *dyc = dy + off;
  A win[KP][V], dw[KP][V], db[V];
#pragma unroll
  for (int j = 0; j < KP; ++j) {
    const int64_t t = t0 - (KP - 1) + j;
    if (j < KP - 1 && t >= 0) load_pack(win[j], xc + t * channels);
    else fill_pack(win[j], A(0));
    fill_pack(dw[j], A(0));
  }
  fill_pack(db, A(0));
#pragma unroll 8
  for (int64_t t = t0; t < t1; ++t) {
    A d[V];
    load_pack(d, dyc + t * channels);
    load_pack(win[KP - 1], xc + t * channels);
#pragma unroll
    for (int u = 0; u < V; ++u) {
      db[u] += d[u];
#pragma unroll
      for (int j = 0; j < KP; ++j) dw[j][u] += d[u] * win[j][u];
    }
#pragma unroll
    for (int j = 0; j < KP - 1; ++j)
#pragma unroll
      for (int u = 0; u < V; ++u) win[j][u] = win[j + 1][u];
  }
#pragma unroll
  for (int u = 0; u < V; ++u) {
    if (dw_partial != nullptr) {
#pragma unroll
      for (int j = 0; j < KP; ++j)
        if (j >= KP - K) dw_partial[(q.group * K + j - (KP - K)) * channels + q.c + u] = dw[j][u];
    }
    if (db_partial != nullptr) db_partial[q.group * channels + q.c + u] = db[u];
  }
}

// Any K (taps beyond 16): the same sums as plain loops over global memory.
template <typename T>
__global__ void conv_forward_any_kernel(const T* __restrict__ x, const acc_t<T>* __restrict__ w,
                                        const acc_t<T>* __restrict__ bias, T* __restrict__ y, int64_t time,
                                        int64_t channels, int K, int64_t tile, int64_t tiles, int64_t threads) {
  using A = acc_t<T>;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= threads) return;
  const auto [q, t0, t1, off] = conv_tile(idx, time, channels, tile, tiles);
  const A* wc = w + q.c * K;
  for (int64_t t = t0; t < t1; ++t) {
    A acc = bias != nullptr ? bias[q.c] : A(0);
    for (int64_t j = t - K + 1 >= 0 ? 0 : K - 1 - t; j < K; ++j) acc += wc[j] * A(to_f(x[off + (t - K + 1 + j) * channels]));
    y[off + t * channels] = from_f<T>(acc);
  }
}

template <typename T>
__global__ void conv_backward_any_kernel(const T* __restrict__ x, const acc_t<T>* __restrict__ w,
                                         const T* __restrict__ dy, T* __restrict__ dx,
                                         const T* __restrict__ dx_addend, acc_t<T>* __restrict__ dw_partial,
                                         acc_t<T>* __restrict__ db_partial,
                                         int64_t time, int64_t channels, int K, int64_t tile, int64_t tiles,
                                         int64_t threads) {
  using A = acc_t<T>;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= threads) return;
  const auto [q, t0, t1, off] = conv_tile(idx, time, channels, tile, tiles);
  const A* wc = w + q.c * K;
  if (dx != nullptr)
    for (int64_t t = t0; t < t1; ++t) {
      A acc = dx_addend != nullptr ? A(to_f(dx_addend[off + t * channels])) : A(0);
      for (int64_t j = t + K - 1 < time ? 0 : t + K - time; j < K; ++j)
        acc += wc[j] * A(to_f(dy[off + (t + K - 1 - j) * channels]));
      dx[off + t * channels] = from_f<T>(acc);
    }
  if (dw_partial != nullptr)
    for (int64_t j = 0; j < K; ++j) {
      A acc = 0;
      for (int64_t t = t0 - K + 1 + j >= 0 ? t0 : K - 1 - j; t < t1; ++t)
        acc += A(to_f(dy[off + t * channels])) * A(to_f(x[off + (t - K + 1 + j) * channels]));
      dw_partial[(q.group * K + j) * channels + q.c] = acc;
    }
  if (db_partial != nullptr) {
    A acc = 0;
    for (int64_t t = t0; t < t1; ++t) acc += A(to_f(dy[off + t * channels]));
    db_partial[q.group * channels + q.c] = acc;
  }
}

// The register-window width for K taps (0: the plain-loop kernels).
int window_for(int64_t K) { return K <= 1 ? 1 : K <= 2 ? 2 : K <= 4 ? 4 : K <= 8 ? 8 : K <= 16 ? 16 : 0; }

template <typename Fn>
void dispatch_window(int kp, Fn&& fn) {
  switch (kp) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 8: fn(std::integral_constant<int, 8>{}); break;
    case 16: fn(std::integral_constant<int, 16>{}); break;
    default: fn(std::integral_constant<int, 0>{}); break;
  }
}

// ---- linear scan ------------------------------------------------------------

// Where a scan step's coefficient a_t and input x_t come from. The plain
// scan reads both from [B, T, C] tensors. The gated EMA (kEma) forms them
// from the gate z [B, T] (in A), the per-channel rate f [C] (in A) and the
// values v [B, T, C]: b = z f, a = 1 - b, x = b v, each rounded as ATen
// rounds `b = z * f; linear_scan(1 - b, b * v)`, so both give the same h.
template <typename T, bool kEma>
struct ScanIn {
  using A = acc_t<T>;
  const T* __restrict__ a;  // plain: [B, T, C]
  const T* __restrict__ x;  // plain: [B, T, C]; EMA: v
  const A* __restrict__ z;  // EMA: [B, T]
  const A* __restrict__ f;  // EMA: [C]
  struct Step {
    A a, x, b, v;  // b and v: EMA only
  };
  // f_c, read once per thread (1 for the plain scan: unused).
  __device__ __forceinline__ A rate(int64_t c) const { return kEma ? f[c] : A(1); }
  // Element i = (b*T + t)*C + c of [B, T, C]; zi = b*T + t.
  __device__ __forceinline__ Step load(int64_t i, int64_t zi, A fc) const {
    Step st;
    if constexpr (kEma) {
      st.v = to_f(x[i]);
      st.b = mul_rn(z[zi], fc);
      st.a = add_rn(A(1), -st.b);
      st.x = mul_rn(st.b, st.v);
    } else {
      st.a = to_f(a[i]);
      st.x = to_f(x[i]);
    }
    return st;
  }
  __device__ __forceinline__ A coef(int64_t i, int64_t zi, A fc) const {
    if constexpr (kEma) return add_rn(A(1), -mul_rn(z[zi], fc));
    else return to_f(a[i]);
  }
};

// Thread idx's (b, chunk, c), the chunk's steps [s, e), and where step t
// lies: element (b, t, c) of [B, T, C] at off + t C, (b, t) of [B, T] at zoff + t.
struct ScanChunk {
  Coord q;
  int64_t s, e, off, zoff;
};
__device__ __forceinline__ ScanChunk scan_chunk(int64_t idx, int64_t time, int64_t channels, int64_t chunks) {
  const Coord q = coord(idx, channels, chunks);
  const int64_t s = q.tile * kScanChunk;
  return {q, s, min64(time, s + kScanChunk), q.b * time * channels + q.c, q.b * time};
}

// Pass 1. Forward map of the chunk [s, e): h_{e-1} = P h_{s-1} + E. Backward
// also the reverse map g_s = Eg + Qg g_e with Eg = sum_t w_t dh_t,
// w_t = a_{s+1} ... a_t, Qg = w_{e-1} a_e (0 when e = T, where g_T = 0).
// kForwardMap false (backward from a saved h): the reverse map only, reading
// a (for the EMA: z alone) and dh.
template <typename T, bool kEma, bool kBackward, bool kForwardMap = true>
__global__ void scan_summary_kernel(ScanIn<T, kEma> in, const T* __restrict__ dh, acc_t<T>* __restrict__ E,
                                    acc_t<T>* __restrict__ P, acc_t<T>* __restrict__ Eg, acc_t<T>* __restrict__ Qg,
                                    int64_t time, int64_t channels, int64_t chunks, int64_t threads) {
  static_assert(kBackward || kForwardMap, "the forward needs the forward map");
  using A = acc_t<T>;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= threads) return;
  const auto [q, s, e, off, zoff] = scan_chunk(idx, time, channels, chunks);
  const A fc = in.rate(q.c);
  A h = 0, p = 1, eg = 0, wt = 1;
#pragma unroll 4
  for (int64_t t = s; t < e; ++t) {
    A a;
    if constexpr (kForwardMap) {
      const auto st = in.load(off + t * channels, zoff + t, fc);
      h = st.a * h + st.x;
      p *= st.a;
      a = st.a;
    } else {
      a = in.coef(off + t * channels, zoff + t, fc);
    }
    if (kBackward) {
      if (t > s) wt *= a;
      eg += wt * A(to_f(dh[off + t * channels]));
    }
  }
  if (kForwardMap) {
    E[idx] = h;  // idx = (b * chunks + chunk) * C + c: the [B, chunks, C] layout
    P[idx] = p;
  }
  if (kBackward) {
    Eg[idx] = eg;
    Qg[idx] = e < time ? wt * in.coef(off + e * channels, zoff + e, fc) : A(0);
  }
}

constexpr int kCarryPrefetch = 8;

// Pass 2, forward: E[b, k, c] becomes h before chunk k (h0 for k = 0).
template <typename A>
__global__ void scan_carry_forward_kernel(A* __restrict__ E, const A* __restrict__ P, const A* __restrict__ h0,
                                          int64_t channels, int64_t chunks, int64_t threads) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= threads) return;
  const int64_t b = idx / channels, c = idx % channels;
  A* Ec = E + b * chunks * channels + c;
  const A* Pc = P + b * chunks * channels + c;
  A h = h0 != nullptr ? h0[idx] : A(0);
  for (int64_t k0 = 0; k0 < chunks; k0 += kCarryPrefetch) {
    A e[kCarryPrefetch], p[kCarryPrefetch];
#pragma unroll
    for (int u = 0; u < kCarryPrefetch; ++u)
      if (k0 + u < chunks) e[u] = Ec[(k0 + u) * channels], p[u] = Pc[(k0 + u) * channels];
#pragma unroll
    for (int u = 0; u < kCarryPrefetch; ++u)
      if (k0 + u < chunks) {
        Ec[(k0 + u) * channels] = h;
        h = p[u] * h + e[u];
      }
  }
}

// Pass 2, backward: Eg[b, k, c] becomes g at the step after chunk k (0 for the last).
template <typename A>
__global__ void scan_carry_backward_kernel(A* __restrict__ Eg, const A* __restrict__ Qg, int64_t channels,
                                           int64_t chunks, int64_t threads) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= threads) return;
  const int64_t b = idx / channels, c = idx % channels;
  A* Ec = Eg + b * chunks * channels + c;
  const A* Qc = Qg + b * chunks * channels + c;
  A g = 0;
  for (int64_t k0 = chunks - 1; k0 >= 0; k0 -= kCarryPrefetch) {
    A e[kCarryPrefetch], qv[kCarryPrefetch];
#pragma unroll
    for (int u = 0; u < kCarryPrefetch; ++u)
      if (k0 - u >= 0) e[u] = Ec[(k0 - u) * channels], qv[u] = Qc[(k0 - u) * channels];
#pragma unroll
    for (int u = 0; u < kCarryPrefetch; ++u)
      if (k0 - u >= 0) {
        Ec[(k0 - u) * channels] = g;
        g = e[u] + qv[u] * g;
      }
  }
}

// Pass 3, forward: replay each chunk from its incoming state, writing h (and,
// where `last` is given, the state after the last step in A).
template <typename T, bool kEma>
__global__ void scan_forward_kernel(ScanIn<T, kEma> in, const acc_t<T>* __restrict__ carry, T* __restrict__ h_out,
                                    acc_t<T>* __restrict__ last, int64_t time, int64_t channels, int64_t chunks,
                                    int64_t threads) {
  using A = acc_t<T>;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= threads) return;
  const auto [q, s, e, off, zoff] = scan_chunk(idx, time, channels, chunks);
  const A fc = in.rate(q.c);
  A h = carry[idx];
#pragma unroll 4
  for (int64_t t = s; t < e; ++t) {
    const auto st = in.load(off + t * channels, zoff + t, fc);
    h = st.a * h + st.x;
    h_out[off + t * channels] = from_f<T>(h);
  }
  if (last != nullptr && e == time) last[q.b * channels + q.c] = h;
}

// One stage: lanes whose bit m is set keep the upper `width` values, the
// others the lower, and each adds its partner's (lane ^ m) copy of the half
// it keeps. Width and m are template arguments so that every index is a
// constant: with a runtime width (a loop the compiler did not unroll) the
// array went to local memory (ptxas: a 64-byte stack frame, 16 LDL per call).
template <int kWidth, int kMask, typename A>
__device__ __forceinline__ void reduce_scatter_stage(A (&r)[kScanSubLen], int lane) {
  const bool upper = lane & kMask;
#pragma unroll
  for (int j = 0; j < kWidth; ++j) {
    const A lo = r[j], hi = r[kWidth + j];
    const A keep = upper ? hi : lo;
    const A send = upper ? lo : hi;
    r[j] = keep + __shfl_xor_sync(0xffffffffu, send, kMask);
  }
}

// Sums 16 per-step values over a warp's 32 lanes (channels) by a
// reduce-scatter: each xor stage sends the half of its values the partner
// keeps, so 8 + 4 + 2 + 1 + 1 shuffles serve 16 steps (an all-reduce per step
// takes 5 each); the pairings are the all-reduce's, so the sums are bit for bit
// the same. Lane l ends with the sum of step 8 l4 + 4 l3 + 2 l2 + l1 (l_k:
// bit k of l), returned; reduce_scatter16_step(lane) names it, and the even
// lanes hold the sums that are stored.
template <typename A>
__device__ __forceinline__ A reduce_scatter16(const A (&v)[kScanSubLen], int lane) {
  static_assert(kScanSubLen == 16, "the reduce-scatter assumes 16 steps per sub-chunk");
  A r[kScanSubLen];
#pragma unroll
  for (int i = 0; i < kScanSubLen; ++i) r[i] = v[i];
  reduce_scatter_stage<8, 16>(r, lane);
  reduce_scatter_stage<4, 8>(r, lane);
  reduce_scatter_stage<2, 4>(r, lane);
  reduce_scatter_stage<1, 2>(r, lane);
  return r[0] + __shfl_xor_sync(0xffffffffu, r[0], 1);
}
__device__ __forceinline__ int reduce_scatter16_step(int lane) {
  return ((lane >> 4) & 1) * 8 + ((lane >> 3) & 1) * 4 + ((lane >> 2) & 1) * 2 + ((lane >> 1) & 1);
}

// Pass 3, backward (see the file comment). dh0 = a_0 g_0 from chunk 0.
// Plain scan: dx_t = g_t, da_t = g_t h_{t-1}. Gated EMA (dx is dv):
//   dv_t = b_t g_t,  db_t = g_t (v_t - h_{t-1}),
//   dz_t = sum_c f_c db_t  (one partial per warp of 32 channels: dz_part [B, T, C / 32]),
//   df_c = sum_t z_t db_t  (one partial per chunk: df_part [B, chunks, C]),
// so the caller's sums are deterministic. The EMA form needs C % 32 == 0, so
// every warp lies in one (b, chunk) and its shuffles see the same steps.
// kGate (EMA only): v also feeds u_t = gate_t v_t, whose gradient du arrives:
//   dv_t += gate_t du_t,  dgate_t = sum_c du_t v_t  (partials as dz's),
// so dv leaves in one pass instead of three tensors summed by autograd.
template <typename T, bool kEma, bool kGate = false>
__global__ void scan_backward_kernel(ScanIn<T, kEma> in, const T* __restrict__ dh,
                                     const acc_t<T>* __restrict__ h_carry, const acc_t<T>* __restrict__ g_carry,
                                     T* __restrict__ da, T* __restrict__ dx, acc_t<T>* __restrict__ dh0,
                                     acc_t<T>* __restrict__ dz_part, acc_t<T>* __restrict__ df_part,
                                     const acc_t<T>* __restrict__ gate, const T* __restrict__ du,
                                     acc_t<T>* __restrict__ dgate_part, int64_t time, int64_t channels,
                                     int64_t chunks, int64_t threads) {
  static_assert(kEma || !kGate, "the gate term belongs to the gated EMA");
  using A = acc_t<T>;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= threads) return;
  const auto [q, s, e, off, zoff] = scan_chunk(idx, time, channels, chunks);
  const A fc = in.rate(q.c);
  const int lane = threadIdx.x & 31;
  // checkpoint[u] = h just before sub-chunk u. The sub-chunk loops are not
  // unrolled (checkpoint[] then lives in local memory, 16 values per thread):
  // fully unrolled, ptxas gave the fp32 kernel 242 registers, one block of
  // 256 threads per SM, and the kernel ran at about a fifth of the
  // bandwidth bound on an H100 (docs/psa.md, "Where the time goes at 128k").
  A checkpoint[kScanSub];
  A h = h_carry[idx];
#pragma unroll 1
  for (int u = 0; u < kScanSub; ++u) {
    checkpoint[u] = h;
#pragma unroll
    for (int i = 0; i < kScanSubLen; ++i) {
      const int64_t t = s + u * kScanSubLen + i;
      if (t < e) {
        const auto st = in.load(off + t * channels, zoff + t, fc);
        h = st.a * h + st.x;
      }
    }
  }
  A g = g_carry[idx];
  A a_next = e < time ? in.coef(off + e * channels, zoff + e, fc) : A(0);
  A df = 0;
#pragma unroll 1
  for (int u = kScanSub - 1; u >= 0; --u) {
    const int64_t su = s + u * kScanSubLen;
    if (su >= e) continue;
    // Per step of the sub-chunk: a_t (the EMA keeps b_t = z_t f_c instead, a_t
    // being 1 - b_t) and w_t = v_t - h_{t-1} (the EMA; the plain scan keeps
    // h_{t-1}), so two arrays live in registers, not four. kGate: du_t v_t
    // in the same walk, summed over the warp before the reverse walk (so its
    // array is dead there; du_t is read again below, from L1).
    A cs[kScanSubLen], ws[kScanSubLen];
    A gc[kGate ? kScanSubLen : 1];
    A hh = checkpoint[u];
#pragma unroll
    for (int i = 0; i < kScanSubLen; ++i) {
      const int64_t t = su + i;
      if constexpr (kGate) gc[i] = A(0);
      if (t < e) {
        const auto st = in.load(off + t * channels, zoff + t, fc);
        if constexpr (kEma) cs[i] = st.b, ws[i] = st.v - hh;
        else cs[i] = st.a, ws[i] = hh;
        if constexpr (kGate) gc[i] = A(to_f(du[off + t * channels])) * st.v;
        hh = st.a * hh + st.x;
      }
    }
    if constexpr (kGate) {
      const int step = reduce_scatter16_step(lane);
      const A dgate = reduce_scatter16(gc, lane);
      if ((lane & 1) == 0 && su + step < e) dgate_part[(zoff + su + step) * (channels / 32) + q.c / 32] = dgate;
    }
    A zc[kEma ? kScanSubLen : 1];
#pragma unroll
    for (int i = kScanSubLen - 1; i >= 0; --i) {
      const int64_t t = su + i;
      if constexpr (kEma) zc[i] = A(0);
      if (t < e) {
        g = A(to_f(dh[off + t * channels])) + a_next * g;
        if constexpr (kEma) {
          if (dx != nullptr) {
            A dv = cs[i] * g;
            if constexpr (kGate) dv += gate[zoff + t] * A(to_f(du[off + t * channels]));
            dx[off + t * channels] = from_f<T>(dv);
          }
          const A db = g * ws[i];
          df += in.z[zoff + t] * db;
          zc[i] = fc * db;
          a_next = add_rn(A(1), -cs[i]);
        } else {
          if (dx != nullptr) dx[off + t * channels] = from_f<T>(g);
          if (da != nullptr) da[off + t * channels] = from_f<T>(g * ws[i]);
          a_next = cs[i];
        }
      }
    }
    if constexpr (kEma) {
      // dz of the sub-chunk's 16 steps, summed over the warp's 32 channels;
      // the even lanes store one step each.
      const int step = reduce_scatter16_step(lane);
      const A dz = reduce_scatter16(zc, lane);
      if ((lane & 1) == 0 && su + step < e) dz_part[(zoff + su + step) * (channels / 32) + q.c / 32] = dz;
    }
  }
  if (q.tile == 0 && dh0 != nullptr) dh0[q.b * channels + q.c] = a_next * g;
  if (kEma) df_part[idx] = df;
}

// Pass 3, backward of the gated EMA from the forward's stored h: the same
// outputs as scan_backward_kernel<T, true, kGate> but no replay. Each
// sub-chunk of 16 steps is two walks: the first, in time order, only loads
// (v, h_{t-1}, dh; du for dgate) and keeps w_t = v_t - h_{t-1} and dh_t in
// registers; the second runs g_t = dh_t + a_{t+1} g_{t+1} backward and
// stores dv. Where all 16 steps lie in [1, e) (every sub-chunk but the
// sequence's first and a ragged last one) neither walk has a per-step
// branch, so the first walk's 16 steps of loads issue as one batch (the
// SASS). The single-walk version before it issued each step's loads behind
// its own `t < e` branch and the previous step's store: 2.35 ms at 128k on
// an H100, against 1.23 for this one (bce4dc2, H100). v, z, f come as
// __restrict__ parameters, not through ScanIn, so the loads may pass the
// stores.
template <typename T, bool kGate>
__global__ void __launch_bounds__(kThreads, 2)
    scan_backward_saved_kernel(const T* __restrict__ v, const acc_t<T>* __restrict__ z,
                               const acc_t<T>* __restrict__ f, const T* __restrict__ h_saved,
                               const acc_t<T>* __restrict__ h0, const T* __restrict__ dh,
                               const acc_t<T>* __restrict__ g_carry, T* __restrict__ dx, acc_t<T>* __restrict__ dh0,
                               acc_t<T>* __restrict__ dz_part, acc_t<T>* __restrict__ df_part,
                               const acc_t<T>* __restrict__ gate, const T* __restrict__ du,
                               acc_t<T>* __restrict__ dgate_part, int64_t time, int64_t channels, int64_t chunks,
                               int64_t threads) {
  using A = acc_t<T>;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= threads) return;
  // (Named variables rather than a structured binding: the walks below are lambdas capturing them, C++20 for bindings.)
  const ScanChunk chunk = scan_chunk(idx, time, channels, chunks);
  const Coord q = chunk.q;
  const int64_t s = chunk.s, e = chunk.e, off = chunk.off, zoff = chunk.zoff;
  const A fc = f[q.c];
  const A h_init = h0 != nullptr ? h0[q.b * channels + q.c] : A(0);  // h_{-1}
  const int lane = threadIdx.x & 31;
  // b_t = z_t f_c and a_t = 1 - b_t, rounded as the forward rounds them (ScanIn::load).
  auto coef_b = [&](A zt) { return mul_rn(zt, fc); };
  A g = g_carry[idx];
  A a_next = e < time ? add_rn(A(1), -coef_b(z[zoff + e])) : A(0);
  A df = 0;
#pragma unroll 1
  for (int u = kScanSub - 1; u >= 0; --u) {
    const int64_t su = s + u * kScanSubLen;
    if (su >= e) continue;
    A ws[kScanSubLen], dhs[kScanSubLen], gc[kGate ? kScanSubLen : 1], zc[kScanSubLen];
    // Step su + i of [B, T, C] at base[i * C]: 32-bit offsets from one
    // 64-bit base per tensor (the int64 index of each of 16 steps cost about
    // 30 registers). z and the gate are [B, T] (one address per warp).
    const int C = int(channels);
    const int64_t base = off + su * channels;
    const T *vb = v + base, *dhb = dh + base, *hb = h_saved + base - channels, *dub = du + base;
    T* dxb = dx != nullptr ? dx + base : nullptr;
    const A* zb = z + zoff + su;
    // kFull: every step of the sub-chunk lies in [1, e) (all but the
    // sequence's first and a ragged last one), so the walks have no per-step
    // branch and the first walk's 16 steps of loads are issued before any of
    // them is used.
    auto load_walk = [&](auto full) {
      constexpr bool kFull = decltype(full)::value;
#pragma unroll
      for (int i = 0; i < kScanSubLen; ++i) {
        const int64_t t = su + i;
        if (kFull || t < e) {
          const A vt = to_f(vb[i * C]);
          ws[i] = vt - (kFull || t > 0 ? A(to_f(hb[i * C])) : h_init);  // v_t - h_{t-1}
          dhs[i] = to_f(dhb[i * C]);
          if constexpr (kGate) gc[i] = A(to_f(dub[i * C])) * vt;
        } else {
          ws[i] = dhs[i] = A(0);
          if constexpr (kGate) gc[i] = A(0);
        }
      }
    };
    auto reverse_walk = [&](auto full) {
      constexpr bool kFull = decltype(full)::value;
#pragma unroll
      for (int i = kScanSubLen - 1; i >= 0; --i) {
        zc[i] = A(0);
        if (kFull || su + i < e) {
          const A zt = zb[i];
          const A b = coef_b(zt);
          g = dhs[i] + a_next * g;
          A dv = b * g;
          if constexpr (kGate) dv += gate[zoff + su + i] * A(to_f(dub[i * C]));  // du again: from L1
          if (dxb != nullptr) dxb[i * C] = from_f<T>(dv);
          const A db = g * ws[i];
          df += zt * db;
          zc[i] = fc * db;
          a_next = add_rn(A(1), -b);
        }
      }
    };
    const bool full = su > 0 && su + kScanSubLen <= e;
    if (full) load_walk(std::true_type{});
    else load_walk(std::false_type{});
    const int step = reduce_scatter16_step(lane);
    const bool store = (lane & 1) == 0 && su + step < e;
    const int64_t part = (zoff + su + step) * (channels / 32) + q.c / 32;
    if constexpr (kGate) {
      const A dgate = reduce_scatter16(gc, lane);
      if (store) dgate_part[part] = dgate;
    }
    if (full) reverse_walk(std::true_type{});
    else reverse_walk(std::false_type{});
    const A dz = reduce_scatter16(zc, lane);
    if (store) dz_part[part] = dz;
  }
  if (q.tile == 0 && dh0 != nullptr) dh0[q.b * channels + q.c] = a_next * g;
  df_part[idx] = df;
}

}  // namespace

namespace {
// CausalConvParams' pointers, typed, and the launch geometry: one thread per
// (b, time tile, c), or per V channels in the register-window kernels.
template <typename T>
struct ConvLaunch {
  using Elem = T;
  using A = acc_t<T>;
  const T* x;
  const A* w;
  const A* bias;
  T* y;
  const T* dy;
  T* dx;
  const T* dx_addend;
  A* dw;
  A* db;
  int64_t tiles, threads;
  unsigned blocks(int v = 1) const { return blocks_for(threads / v); }
};

bool aligned4(const void* p) { return reinterpret_cast<uintptr_t>(p) % 4 == 0; }

// fn(ConvLaunch<T>, KP, V) with the storage type, the register window (0:
// the plain-loop kernels) and the channels per thread (2 for 16-bit storage
// with an even channel count and 4-byte aligned tensors, else 1); nothing
// for an empty input.
template <typename Fn>
void launch_conv(const CausalConvParams& p, Fn&& fn) {
  const int64_t tiles = (p.time + p.time_tile - 1) / p.time_tile;
  const int64_t threads = p.batch * tiles * p.channels;
  if (threads == 0) return;
  const bool pairs = p.channels % 2 == 0 && aligned4(p.x) && aligned4(p.y) && aligned4(p.dy) && aligned4(p.dx) &&
                     aligned4(p.dx_addend);
  dispatch_cuda(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const ConvLaunch<T> c{static_cast<const T*>(p.x),         static_cast<const A*>(p.weight),
                          static_cast<const A*>(p.bias),      static_cast<T*>(p.y),
                          static_cast<const T*>(p.dy),        static_cast<T*>(p.dx),
                          static_cast<const T*>(p.dx_addend), static_cast<A*>(p.dweight_partial),
                          static_cast<A*>(p.dbias_partial),   tiles,
                          threads};
    dispatch_window(window_for(p.taps), [&](auto kp) {
      if constexpr (sizeof(T) == 2) {
        if (pairs) return fn(c, kp, std::integral_constant<int, 2>{});
      }
      fn(c, kp, std::integral_constant<int, 1>{});
    });
  });
}
}  // namespace

void causal_conv_forward_cuda(const CausalConvParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  launch_conv(p, [&](const auto& c, auto kp, auto v) {
    using T = typename std::decay_t<decltype(c)>::Elem;
    constexpr int KP = decltype(kp)::value, V = decltype(v)::value;
    if constexpr (KP == 0)
      conv_forward_any_kernel<T><<<c.blocks(), kThreads, 0, s>>>(c.x, c.w, c.bias, c.y, p.time, p.channels,
                                                                  int(p.taps), p.time_tile, c.tiles, c.threads);
    else
      conv_forward_kernel<T, KP, V><<<c.blocks(V), kThreads, 0, s>>>(
          c.x, c.w, c.bias, c.y, p.time, p.channels, int(p.taps), p.time_tile, c.tiles, c.threads / V);
  });
  check_launch("causal_conv forward");
}

void causal_conv_backward_cuda(const CausalConvParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  launch_conv(p, [&](const auto& c, auto kp, auto v) {
    using T = typename std::decay_t<decltype(c)>::Elem;
    constexpr int KP = decltype(kp)::value, V = decltype(v)::value;
    if constexpr (KP == 0) {
      conv_backward_any_kernel<T><<<c.blocks(), kThreads, 0, s>>>(c.x, c.w, c.dy, c.dx, c.dx_addend, c.dw, c.db,
                                                                   p.time, p.channels, int(p.taps), p.time_tile,
                                                                   c.tiles, c.threads);
    } else {
      if (c.dx != nullptr)
        conv_backward_dx_kernel<T, KP, V><<<c.blocks(V), kThreads, 0, s>>>(
            c.w, c.dy, c.dx, c.dx_addend, p.time, p.channels, int(p.taps), p.time_tile, c.tiles, c.threads / V);
      if (c.dw != nullptr || c.db != nullptr)
        conv_backward_dw_kernel<T, KP, V><<<c.blocks(V), kThreads, 0, s>>>(
            c.x, c.dy, c.dw, c.db, p.time, p.channels, int(p.taps), p.time_tile, c.tiles, c.threads / V);
    }
  });
  check_launch("causal_conv backward");
}

namespace {

template <typename T, bool kEma>
ScanIn<T, kEma> scan_in(const LinearScanParams& p) {
  using A = acc_t<T>;
  return {static_cast<const T*>(p.a), static_cast<const T*>(p.x), static_cast<const A*>(p.z),
          static_cast<const A*>(p.f)};
}

template <typename T, bool kEma>
void scan_forward(const LinearScanParams& p, cudaStream_t s) {
  using A = acc_t<T>;
  const int64_t chunks = scan_chunks(p.time);
  const int64_t threads = p.batch * chunks * p.channels, rows = p.batch * p.channels;
  const auto in = scan_in<T, kEma>(p);
  A* E = static_cast<A*>(p.workspace);
  A* P = E + threads;
  scan_summary_kernel<T, kEma, false><<<blocks_for(threads), kThreads, 0, s>>>(in, nullptr, E, P, nullptr, nullptr,
                                                                               p.time, p.channels, chunks, threads);
  scan_carry_forward_kernel<A><<<blocks_for(rows), kThreads, 0, s>>>(E, P, static_cast<const A*>(p.h0), p.channels,
                                                                      chunks, rows);
  scan_forward_kernel<T, kEma><<<blocks_for(threads), kThreads, 0, s>>>(
      in, E, static_cast<T*>(p.h), static_cast<A*>(p.last), p.time, p.channels, chunks, threads);
}

template <typename T, bool kEma>
void scan_backward(const LinearScanParams& p, cudaStream_t s) {
  using A = acc_t<T>;
  const int64_t chunks = scan_chunks(p.time);
  const int64_t threads = p.batch * chunks * p.channels, rows = p.batch * p.channels;
  const auto in = scan_in<T, kEma>(p);
  const auto* dh = static_cast<const T*>(p.dh);
  A* E = static_cast<A*>(p.workspace);
  A *P = E + threads, *Eg = P + threads, *Qg = Eg + threads;
  if constexpr (kEma) {
    if (p.h_saved != nullptr) {
      scan_summary_kernel<T, true, true, false><<<blocks_for(threads), kThreads, 0, s>>>(
          in, dh, nullptr, nullptr, Eg, Qg, p.time, p.channels, chunks, threads);
      scan_carry_backward_kernel<A><<<blocks_for(rows), kThreads, 0, s>>>(Eg, Qg, p.channels, chunks, rows);
      auto launch = [&](auto kernel) {
        kernel<<<blocks_for(threads), kThreads, 0, s>>>(
            in.x, in.z, in.f, static_cast<const T*>(p.h_saved), static_cast<const A*>(p.h0), dh, Eg,
            static_cast<T*>(p.dx),
            static_cast<A*>(p.dh0), static_cast<A*>(p.dz_partial), static_cast<A*>(p.df_partial),
            static_cast<const A*>(p.gate), static_cast<const T*>(p.gate_grad), static_cast<A*>(p.dgate_partial),
            p.time, p.channels, chunks, threads);
      };
      if (p.gate != nullptr) launch(scan_backward_saved_kernel<T, true>);
      else launch(scan_backward_saved_kernel<T, false>);
      return;
    }
  }
  scan_summary_kernel<T, kEma, true><<<blocks_for(threads), kThreads, 0, s>>>(in, dh, E, P, Eg, Qg, p.time,
                                                                              p.channels, chunks, threads);
  scan_carry_forward_kernel<A><<<blocks_for(rows), kThreads, 0, s>>>(E, P, static_cast<const A*>(p.h0), p.channels,
                                                                      chunks, rows);
  scan_carry_backward_kernel<A><<<blocks_for(rows), kThreads, 0, s>>>(Eg, Qg, p.channels, chunks, rows);
  auto launch = [&](auto kernel) {
    kernel<<<blocks_for(threads), kThreads, 0, s>>>(
        in, dh, E, Eg, static_cast<T*>(p.da), static_cast<T*>(p.dx), static_cast<A*>(p.dh0),
        static_cast<A*>(p.dz_partial), static_cast<A*>(p.df_partial), static_cast<const A*>(p.gate),
        static_cast<const T*>(p.gate_grad), static_cast<A*>(p.dgate_partial), p.time, p.channels, chunks, threads);
  };
  if constexpr (kEma) {
    if (p.gate != nullptr) {
      launch(scan_backward_kernel<T, true, true>);
      return;
    }
  }
  launch(scan_backward_kernel<T, kEma, false>);
}

}  // namespace

void linear_scan_forward_cuda(const LinearScanParams& p, void* stream) {
  if (p.batch * p.time * p.channels == 0) return;
  if (p.z != nullptr && p.channels % 32 != 0)
    throw std::invalid_argument("unswag: gated EMA scan on CUDA needs channels % 32 == 0");
  dispatch_cuda(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.z != nullptr) scan_forward<T, true>(p, static_cast<cudaStream_t>(stream));
    else scan_forward<T, false>(p, static_cast<cudaStream_t>(stream));
  });
  check_launch("linear_scan forward");
}

void linear_scan_backward_cuda(const LinearScanParams& p, void* stream) {
  if (p.batch * p.time * p.channels == 0) return;
  if (p.z != nullptr && p.channels % 32 != 0)
    throw std::invalid_argument("unswag: gated EMA scan on CUDA needs channels % 32 == 0");
  if (p.gate != nullptr && (p.z == nullptr || p.gate_grad == nullptr || p.dgate_partial == nullptr || p.dx == nullptr))
    throw std::invalid_argument("unswag: the scan's gate term needs the EMA form, gate_grad, dgate_partial and dx");
  if (p.h_saved != nullptr && p.z == nullptr)
    throw std::invalid_argument("unswag: the scan's backward from a saved h needs the EMA form");
  dispatch_cuda(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.z != nullptr) scan_backward<T, true>(p, static_cast<cudaStream_t>(stream));
    else scan_backward<T, false>(p, static_cast<cudaStream_t>(stream));
  });
  check_launch("linear_scan backward");
}

}  // namespace unswag::kernels
