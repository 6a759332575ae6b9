// CUDA kernels of the sliding-window attention with a per-key bias
// (window_attention.h has the math): FlashAttention-2's scheme on mma.sync
// m16n8k16 (fp16/bf16 in, fp32 accumulate), sm_80 and later.
//
// Blocks of 64 rows, 4 warps of 16 rows each; tiles of 64 keys (or, in the
// dk/dv pass, 64 queries) staged in shared memory by cp.async (in the
// forward and dk/dv passes the next tile in flight while the current one
// computes; the dq pass single-buffered, three blocks per SM hiding each
// other's loads), with rows padded by 8 elements
// so that the fragment loads below (ldmatrix: eight rows of 16 bytes at a
// time, 272 bytes apart) fall in 32 distinct banks.
// Fragment layouts of m16n8k16 (g = lane / 4, t = lane % 4):
//   A (16 x 16, row-major): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B (16 x 8, k x n):      b0 (k 2t..2t+1, n g), b1 (k 2t+8..2t+9, n g)
//   C (16 x 8):             c0 c1 (g, 2t..2t+1), c2 c3 (g+8, 2t..2t+1)
// so the C fragments of two neighbouring 8-column tiles are, packed to 16
// bits, the A fragment of their 16 columns: scores become P (or dS) operands
// without leaving registers. Shared operands come through ldmatrix: as
// stored where k runs along a row (Q K^T and its relatives), transposed
// where k runs along the rows' index (V in P V, K in dS K, dO and Q in the
// key pass).
#include <cfloat>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda_common.cuh"
#include "vec8.cuh"
#include "window_attention.h"

namespace unswag::kernels {
namespace {

constexpr int kRows = 64;  // rows (queries, or keys in the dk/dv pass) per block
constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

// One m16n8k16 tensor-core product with fp32 accumulators (c += a b) on bf16
// or fp16 operands, whose PTX differs only in the operand type, and the
// packing of two floats into one operand register.
#define UNSWAG_MMA_M16N8K16(TYPE)                                                                     \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0,%1,%2,%3}, "           \
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                                               \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                          \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <typename E>
struct Mma {
  static_assert(std::is_same_v<E, __nv_bfloat16> || std::is_same_v<E, __half>, "Mma takes bf16 or fp16");
  static constexpr bool kBf16 = std::is_same_v<E, __nv_bfloat16>;
  static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    if constexpr (kBf16) UNSWAG_MMA_M16N8K16("bf16");
    else UNSWAG_MMA_M16N8K16("f16");
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    if constexpr (kBf16) {
      const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
      return *reinterpret_cast<const uint32_t*>(&v);
    } else {
      const __half2 v = __floats2half2_rn(lo, hi);
      return *reinterpret_cast<const uint32_t*>(&v);
    }
  }
};
#undef UNSWAG_MMA_M16N8K16

// Four 8 x 8 matrices of 16-bit elements from a row-major shared tile: lane l
// addresses row l % 8 of matrix m = l / 8, placed at (row0 + 8 (m & 1),
// col0 + 8 (m >> 1)); lane (g, t) receives row g, elements 2t..2t+1 of each
// (kTrans: of its transpose). As stored, r0..r3 are the A fragment (a0..a3)
// of the 16 x 16 block at (row0, col0); read as B^T (tile rows are n,
// columns k), r0 r2 are (b0, b1) of n = row0..row0+7 and r1 r3 of
// row0+8..row0+15. Transposed, with a row-major [k][n] tile, r0 r1 are
// (b0, b1) of columns col0..col0+7 and r2 r3 of col0+8..col0+15, for k =
// row0..row0+15. One instruction where 32-bit loads took four.
template <bool kTrans, typename E>
__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const E* tile, int ld, int row0, int col0) {
  const int lane = threadIdx.x & 31, m = lane >> 3;
  const E* p = tile + (row0 + (m & 1) * 8 + (lane & 7)) * ld + col0 + (m >> 1) * 8;
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

// C[16 x 8 * NT] += A[rows row0.., D] B^T, B^T's columns being rows n0.. of a
// second row-major tile (S = Q K^T and its relatives: both operands are read
// along their stored rows). NT even.
template <typename E, int D, int NT>
__device__ __forceinline__ void mma_abt(float c[NT][4], const E* a_tile, int a_row0, const E* b_tile, int b_row0) {
  static_assert(NT % 2 == 0, "n-tiles come in pairs (one ldmatrix.x4 each)");
  constexpr int ld = D + 8;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldsm_x4<false>(a, a_tile, ld, a_row0, kk * 16);
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t b[4];
      ldsm_x4<false>(b, b_tile, ld, b_row0 + nt * 8, kk * 16);
      Mma<E>::run(c[nt], a, b[0], b[2]);
      Mma<E>::run(c[nt + 1], a, b[1], b[3]);
    }
  }
}

// acc[16 x D] += P[16 x 16 KS] X, P given as C fragments (NT = 2 KS tiles of
// 8 columns), X rows x_row0..x_row0 + 16 KS - 1 of a row-major [k][D] tile.
template <typename E, int D, int NT>
__device__ __forceinline__ void mma_px(float acc[D / 8][4], const float p[NT][4], const E* x_tile, int x_row0) {
  constexpr int ld = D + 8;
#pragma unroll
  for (int ks = 0; ks < NT / 2; ++ks) {
    const uint32_t a[4] = {Mma<E>::pack(p[2 * ks][0], p[2 * ks][1]), Mma<E>::pack(p[2 * ks][2], p[2 * ks][3]),
                           Mma<E>::pack(p[2 * ks + 1][0], p[2 * ks + 1][1]),
                           Mma<E>::pack(p[2 * ks + 1][2], p[2 * ks + 1][3])};
#pragma unroll
    for (int nd = 0; nd < D / 16; ++nd) {
      uint32_t b[4];
      ldsm_x4<true>(b, x_tile, ld, x_row0 + ks * 16, nd * 16);
      Mma<E>::run(acc[2 * nd], a, b[0], b[1]);
      Mma<E>::run(acc[2 * nd + 1], a, b[2], b[3]);
    }
  }
}

// cp.async: 16 bytes global -> shared without passing through registers;
// src_size 0 writes zeros (rows outside the sequence) and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's most recent groups are in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Starts copying rows row0..row0+63 of a [.., T, D] sequence (row stride
// `stride`) into a padded shared tile; rows outside [0, time) become zeros.
template <typename E, int D>
__device__ __forceinline__ void load_rows(E* tile, const E* src, int64_t stride, int64_t row0, int64_t time) {
  constexpr int kVec = D / 8;
#pragma unroll
  for (int i = threadIdx.x; i < kRows * kVec; i += kThreads) {
    const int r = i / kVec, c = i % kVec;
    const int64_t t = row0 + r;
    const bool in = t >= 0 && t < time;
    cp_async16(tile + r * (D + 8) + c * 8, in ? src + t * stride + c * 8 : src, in);
  }
}

// Starts copying values row0..row0+63 of a [T] fp32 vector (zeros outside).
__device__ __forceinline__ void load_vector(float* dst, const float* src, int64_t row0, int64_t time) {
  if (threadIdx.x < kRows) {
    const int64_t t = row0 + threadIdx.x;
    const bool in = t >= 0 && t < time;
    cp_async4(dst + threadIdx.x, in ? src + t : src, in);
  }
}

template <typename E, int D>
__device__ __forceinline__ void store_rows(E* dst, int64_t stride, const E* tile, int64_t row0, int64_t time) {
  constexpr int kVec = D / 8;
  for (int i = threadIdx.x; i < kRows * kVec; i += kThreads) {
    const int r = i / kVec, c = i % kVec;
    const int64_t t = row0 + r;
    if (t < time) *reinterpret_cast<uint4*>(dst + t * stride + c * 8) = *reinterpret_cast<const uint4*>(tile + r * (D + 8) + c * 8);
  }
}

// The packed signal row (sig_rows, < 0: none) of row row0 + threadIdx.x, for
// threads < 64; -1 for the others, rows past T, or no sig_rows. Read at the
// kernel's start, its latency hidden behind the first tiles' loads, and kept
// in shared memory for store_grad_rows.
__device__ __forceinline__ int64_t sig_row_of(const WindowAttentionParams& p, int64_t b, int64_t row0) {
  const int64_t t = row0 + threadIdx.x;
  return p.sig_rows != nullptr && threadIdx.x < kRows && t < p.time ? p.sig_rows[b * p.time + t] : -1;
}

template <typename E>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&v)[8]) {
  const E* e = reinterpret_cast<const E*>(&raw);
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = to_f(e[j]);
}

// The gradient rows row0..row0+63 of head `head` (of `heads`) from a padded
// shared tile into dst, with what WindowAttentionParams' optional fields ask:
// the packed signal row (rows_s[r], shared, from sig_row_of) added (and, with
// k_tile, its dot with k into dz_part, per kv head), then RoPE's transposed
// rotation. A thread takes column chunk c and its rotation partner c + D / 2
// (8 elements each), so a row's D / 16 threads are neighbouring lanes and its
// dot is their shuffle sum. The global reads (signal rows, cos, sin) of two
// chunks go out together before any is used: one memory round trip per two
// chunks, where reading them chunk by chunk waited on each in turn (measured
// at 00926bc: the dk/dv pass 2.89 -> 3.74 ms with that epilogue).
template <typename E, int D>
__device__ __forceinline__ void store_grad_rows(E* dst, int64_t stride, const E* tile, int64_t row0,
                                                const int64_t* rows_s, const WindowAttentionParams& p, int64_t b,
                                                int64_t head, int64_t heads, const void* sig_grad, const E* k_tile) {
  constexpr int ld = D + 8, kHalfVec = D / 16, kHalfD = D / 2;
  constexpr int kPer = kRows * kHalfVec / kThreads, kBatch = 2;  // chunks per thread, per round
  static_assert(kRows * kHalfVec % kThreads == 0, "every thread takes part in each round (the shuffles)");
  static_assert(kPer % kBatch == 0, "rounds of kBatch chunks");
  const int64_t T = p.time;
  const E* cos = static_cast<const E*>(p.rope_cos);
  const E* sin = static_cast<const E*>(p.rope_sin);
  if (cos != nullptr && p.rope_per_batch) cos += b * T * D, sin += b * T * D;
  const E* sg = static_cast<const E*>(sig_grad);
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll 1
  for (int u0 = 0; u0 < kPer; u0 += kBatch) {
    uint4 g_raw[kBatch][2], c_raw[kBatch][2], s_raw[kBatch][2];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = threadIdx.x + (u0 + u) * kThreads, r = i / kHalfVec, c = i % kHalfVec;
      const int64_t t = row0 + r, n = sg != nullptr ? rows_s[r] : -1;
      const E* g = sg + (n * heads + head) * D;
      g_raw[u][0] = n >= 0 ? *reinterpret_cast<const uint4*>(g + c * 8) : zero;
      g_raw[u][1] = n >= 0 ? *reinterpret_cast<const uint4*>(g + kHalfD + c * 8) : zero;
      const bool rot = cos != nullptr && t < T;
      c_raw[u][0] = rot ? *reinterpret_cast<const uint4*>(cos + t * D + c * 8) : zero;
      c_raw[u][1] = rot ? *reinterpret_cast<const uint4*>(cos + t * D + kHalfD + c * 8) : zero;
      s_raw[u][0] = rot ? *reinterpret_cast<const uint4*>(sin + t * D + c * 8) : zero;
      s_raw[u][1] = rot ? *reinterpret_cast<const uint4*>(sin + t * D + kHalfD + c * 8) : zero;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = threadIdx.x + (u0 + u) * kThreads, r = i / kHalfVec, c = i % kHalfVec;
      const int64_t t = row0 + r;
      const bool in = t < T;
      float x1[8], x2[8], g1[8], g2[8];
      load8<true>(tile + r * ld, c * 8, D, x1);
      load8<true>(tile + r * ld, kHalfD + c * 8, D, x2);
      unpack8<E>(g_raw[u][0], g1);  // zeros where the row has no signal row
      unpack8<E>(g_raw[u][1], g2);
      if (k_tile != nullptr && p.dz_part != nullptr) {
        float k1[8], k2[8], dot = 0.f;
        load8<true>(k_tile + r * ld, c * 8, D, k1);
        load8<true>(k_tile + r * ld, kHalfD + c * 8, D, k2);
#pragma unroll
        for (int j = 0; j < 8; ++j) dot = fmaf(g1[j], k1[j], fmaf(g2[j], k2[j], dot));
#pragma unroll
        for (int off = kHalfVec / 2; off >= 1; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        if (in && c == 0) p.dz_part[(b * T + t) * heads + head] = dot;
      }
      if (!in) continue;
#pragma unroll
      for (int j = 0; j < 8; ++j) x1[j] += g1[j], x2[j] += g2[j];
      if (cos != nullptr) {
        float c1[8], c2[8], s1[8], s2[8];
        unpack8<E>(c_raw[u][0], c1);
        unpack8<E>(c_raw[u][1], c2);
        unpack8<E>(s_raw[u][0], s1);
        unpack8<E>(s_raw[u][1], s2);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float a1 = x1[j], a2 = x2[j];
          x1[j] = a1 * c1[j] + a2 * s2[j];
          x2[j] = a2 * c2[j] - a1 * s1[j];
        }
      }
      store8<true>(dst + t * stride, c * 8, D, x1);
      store8<true>(dst + t * stride, kHalfD + c * 8, D, x2);
    }
  }
}

// A warp's 16 x D accumulator (times `mul` per row half) into rows row0.. of a padded tile.
template <typename E, int D>
__device__ __forceinline__ void stage_acc(E* tile, int row0, const float acc[D / 8][4], float mul0, float mul1) {
  constexpr int ld = D + 8;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    E* p = tile + (row0 + g) * ld + nt * 8 + 2 * t;
    *reinterpret_cast<uint32_t*>(p) = Mma<E>::pack(acc[nt][0] * mul0, acc[nt][1] * mul0);
    *reinterpret_cast<uint32_t*>(p + 8 * ld) = Mma<E>::pack(acc[nt][2] * mul1, acc[nt][3] * mul1);
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Query i sees key j iff 0 <= i - j < W (and i < T): one unsigned compare of
// the distance, which fits 32 bits as tiles lie within W + 127 of their rows
// (the host clamps W to T).
__device__ __forceinline__ bool visible(int distance, bool row_in, unsigned window) {
  return row_in && unsigned(distance) < window;
}
// Whether every (row, key) of a 64 x 64 tile pair is visible: rows
// r0..r0+63 all before T and every distance r - k within [0, W).
__device__ __forceinline__ bool tile_all_visible(int64_t r0, int64_t k0, int64_t window, int64_t time) {
  return r0 + kRows <= time && r0 - (k0 + kRows - 1) >= 0 && r0 + kRows - 1 - k0 < window;
}

template <typename E>
__device__ __forceinline__ const E* seq(const void* base, const int64_t stride[3], int64_t b, int64_t h) {
  return static_cast<const E*>(base) + b * stride[0] + h * stride[1];
}
template <typename E>
__device__ __forceinline__ E* seq_mut(void* base, const int64_t stride[3], int64_t b, int64_t h) {
  return static_cast<E*>(base) + b * stride[0] + h * stride[1];
}

// ---- forward: one block per (64 queries, head, sequence) ---------------------
//
// Shared: Q, K (two buffers: the next tile's keys land while this one's
// softmax and P V run), V, and the keys' biases (two buffers). cp.async
// groups, oldest first: {Q, K0, b0}, {V0}, then per tile {K next, b next}
// after S and {V next} after P V; each wait_group<1> below leaves exactly the
// newest group in flight.

template <typename E, int D>
__global__ void __launch_bounds__(kThreads) window_forward_kernel(WindowAttentionParams p) {
  constexpr int ld = D + 8, kNT = kRows / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  E* Qs = reinterpret_cast<E*>(smem);
  E* Ks = Qs + kRows * ld;  // two tiles
  E* Vs = Ks + 2 * kRows * ld;
  float* bias_s = reinterpret_cast<float*>(Vs + kRows * ld);  // two vectors of 64

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t T = p.time, W = p.window, b = blockIdx.z, h = blockIdx.y, q0 = int64_t(blockIdx.x) * kRows;
  const int64_t hk = h / (p.heads / p.kv_heads);
  const E* k = seq<E>(p.k, p.k_stride, b, hk);
  const E* v = seq<E>(p.v, p.v_stride, b, hk);
  const float* bias = p.bias + b * T;
  const int64_t j_lo = q0 - W + 1 > 0 ? q0 - W + 1 : 0, j_hi = q0 + kRows - 1 < T - 1 ? q0 + kRows - 1 : T - 1;
  const int64_t k_first = j_lo / kRows * kRows;
  load_rows<E, D>(Qs, seq<E>(p.q, p.q_stride, b, h), p.q_stride[2], q0, T);
  load_rows<E, D>(Ks, k, p.k_stride[2], k_first, T);
  load_vector(bias_s, bias, k_first, T);
  cp_async_commit();
  load_rows<E, D>(Vs, v, p.v_stride[2], k_first, T);
  cp_async_commit();

  const int64_t row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  const bool row_in[2] = {row[0] < T, row[1] < T};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  const float sl2 = p.scale * kLog2e;
  int buf = 0;
  for (int64_t k0 = k_first; k0 <= j_hi; k0 += kRows, buf ^= 1) {
    cp_async_wait<1>();  // Q, this K and its biases
    __syncthreads();
    const E* Kt = Ks + buf * kRows * ld;
    const float* bt = bias_s + buf * kRows;
    float s[kNT][4];
#pragma unroll
    for (int i = 0; i < kNT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    mma_abt<E, D, kNT>(s, Qs, warp * 16, Kt, 0);
    const bool more = k0 + kRows <= j_hi;
    if (more) {
      load_rows<E, D>(Ks + (buf ^ 1) * kRows * ld, k, p.k_stride[2], k0 + kRows, T);
      load_vector(bias_s + (buf ^ 1) * kRows, bias, k0 + kRows, T);
    }
    cp_async_commit();
    // Base-2 scores, masked; the tile's row maxima.
    const bool full = tile_all_visible(q0, k0, W, T);
    const int dist0 = int(row[0] - k0) - 2 * t;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * t + (e & 1), r = e >> 1;
        const bool ok = full || visible(dist0 + 8 * r - nt * 8 - (e & 1), row_in[r], unsigned(W));
        const float x = ok ? fmaf(s[nt][e], sl2, bt[col] * kLog2e) : -INFINITY;
        s[nt][e] = x;
        tile_max[r] = fmaxf(tile_max[r], x);
      }
    float alpha[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m[r], quad_max(tile_max[r]));
      m_use[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet stays at zero
      alpha[r] = exp2f(m[r] - m_use[r]);
      m[r] = m_new;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - m_use[e >> 1]);
        l[e >> 1] += s[nt][e];
      }
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      acc[i][0] *= alpha[0], acc[i][1] *= alpha[0];
      acc[i][2] *= alpha[1], acc[i][3] *= alpha[1];
    }
    cp_async_wait<1>();  // this V
    __syncthreads();
    mma_px<E, D, kNT>(acc, s, Vs, 0);
    __syncthreads();  // every warp is done with V
    if (more) load_rows<E, D>(Vs, v, p.v_stride[2], k0 + kRows, T);
    cp_async_commit();
  }
  cp_async_wait<0>();
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = quad_sum(l[r]);
    inv[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;
    if (t == 0 && row_in[r]) p.lse[(b * p.heads + h) * T + row[r]] = m[r] + log2f(l[r]);
  }
  __syncthreads();  // every warp is done with Qs
  stage_acc<E, D>(Qs, warp * 16, acc, inv[0], inv[1]);
  __syncthreads();
  store_rows<E, D>(seq_mut<E>(p.o, p.o_stride, b, h), p.o_stride[2], Qs, q0, T);
}

// ---- backward, query pass: delta = rowsum(dO o) and dq ---------------------
//
// Shared: Q, dO, one tile each of K and V, the keys' biases, the rows'
// delta and packed signal rows: 70 KB at D = 128, so three blocks share an
// SM (with at most 170 registers a thread, __launch_bounds__ below) and hide
// each other's tile loads. Double-buffered K and V (104 KB) kept two blocks
// per SM, whose warps, stalled on the dependent tensor-core and exp chains,
// issued once every 5.3 cycles (ncu, H100: 37% of issue slots). o, needed
// only for delta, is read straight from global memory. Keys in two halves of
// 32 per tile: fewer registers for S and dP.

template <typename E, int D>
__global__ void __launch_bounds__(kThreads, 3) window_backward_dq_kernel(WindowAttentionParams p) {
  constexpr int ld = D + 8, kHalf = kRows / 2, kNT = kHalf / 8, kVec = D / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  E* Qs = reinterpret_cast<E*>(smem);
  E* dOs = Qs + kRows * ld;
  E* Ks = dOs + kRows * ld;
  E* Vs = Ks + kRows * ld;
  float* bias_s = reinterpret_cast<float*>(Vs + kRows * ld);
  float* delta_s = bias_s + kRows;
  int64_t* rows_s = reinterpret_cast<int64_t*>(delta_s + kRows);  // the rows' packed signal rows

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t T = p.time, W = p.window, b = blockIdx.z, h = blockIdx.y, q0 = int64_t(blockIdx.x) * kRows;
  const int64_t hk = h / (p.heads / p.kv_heads);
  const E* k = seq<E>(p.k, p.k_stride, b, hk);
  const E* v = seq<E>(p.v, p.v_stride, b, hk);
  const float* bias = p.bias + b * T;
  const int64_t j_lo = q0 - W + 1 > 0 ? q0 - W + 1 : 0, j_hi = q0 + kRows - 1 < T - 1 ? q0 + kRows - 1 : T - 1;
  const int64_t k_first = j_lo / kRows * kRows;
  auto issue = [&](int64_t k0) {
    load_rows<E, D>(Ks, k, p.k_stride[2], k0, T);
    load_rows<E, D>(Vs, v, p.v_stride[2], k0, T);
    load_vector(bias_s, bias, k0, T);
  };
  load_rows<E, D>(Qs, seq<E>(p.q, p.q_stride, b, h), p.q_stride[2], q0, T);
  load_rows<E, D>(dOs, seq<E>(p.dout, p.dout_stride, b, h), p.dout_stride[2], q0, T);
  issue(k_first);
  cp_async_commit();
  // delta_i = sum_d dO[i, d] o[i, d]: kVec lanes per row (16 or 8, within a
  // warp), 8 elements each; o's loads go out while the tiles land.
  {
    const E* o = seq<E>(p.o, p.o_stride, b, h);
    constexpr int kPer = kRows * kVec / kThreads;
    uint4 ov[kPer];
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int i = threadIdx.x + u * kThreads, r = i / kVec, c = i % kVec;
      ov[u] = q0 + r < T ? *reinterpret_cast<const uint4*>(o + (q0 + r) * p.o_stride[2] + c * 8)
                         : make_uint4(0, 0, 0, 0);
    }
    const int64_t sig_row = sig_row_of(p, b, q0);
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int i = threadIdx.x + u * kThreads, r = i / kVec, c = i % kVec;
      const E* oe = reinterpret_cast<const E*>(&ov[u]);
      const E* de = dOs + r * ld + c * 8;
      float part = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) part += to_f(oe[e]) * to_f(de[e]);
#pragma unroll
      for (int off = kVec / 2; off >= 1; off /= 2) part += __shfl_xor_sync(0xffffffffu, part, off);
      if (c == 0) {
        delta_s[r] = part;
        if (q0 + r < T) p.delta[(b * p.heads + h) * T + q0 + r] = part;
      }
    }
    if (threadIdx.x < kRows) rows_s[threadIdx.x] = sig_row;
    __syncthreads();
  }
  const int64_t row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  const bool row_in[2] = {row[0] < T, row[1] < T};
  float lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) lse[r] = row_in[r] ? p.lse[(b * p.heads + h) * T + row[r]] : 0.f;
  const float delta[2] = {delta_s[warp * 16 + g], delta_s[warp * 16 + g + 8]};
  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  const float sl2 = p.scale * kLog2e;
  for (int64_t k0 = k_first; k0 <= j_hi; k0 += kRows) {
    if (k0 != k_first) {
      cp_async_wait<0>();
      __syncthreads();  // this tile landed
    }
    const bool full = tile_all_visible(q0, k0, W, T);
    const int dist0 = int(row[0] - k0) - 2 * t;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      // The warp's 16 rows and this half's 32 keys: nothing to add when no
      // pair is visible (at W = 128, 4 of the 24 warp-halves of a block's
      // three tiles). Warp-uniform.
      const int64_t r_lo = q0 + warp * 16, c_lo = k0 + half * kHalf;
      if (!(r_lo < T && r_lo + 15 - c_lo >= 0 && r_lo - (c_lo + kHalf - 1) < W)) continue;
      float s[kNT][4], dp[kNT][4];
#pragma unroll
      for (int i = 0; i < kNT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
      mma_abt<E, D, kNT>(s, Qs, warp * 16, Ks, half * kHalf);
      mma_abt<E, D, kNT>(dp, dOs, warp * 16, Vs, half * kHalf);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = half * kHalf + nt * 8 + 2 * t + (e & 1), r = e >> 1;
          const bool ok =
              full || visible(dist0 + 8 * r - half * kHalf - nt * 8 - (e & 1), row_in[r], unsigned(W));
          const float pr = ok ? exp2f(fmaf(s[nt][e], sl2, bias_s[col] * kLog2e) - lse[r]) : 0.f;
          s[nt][e] = pr * (dp[nt][e] - delta[r]);  // dS
        }
      mma_px<E, D, kNT>(acc, s, Ks, half * kHalf);
    }
    __syncthreads();  // every warp is done with this K, V and bias
    if (k0 + kRows <= j_hi) {
      issue(k0 + kRows);
      cp_async_commit();
    }
  }
  stage_acc<E, D>(Qs, warp * 16, acc, p.scale, p.scale);
  __syncthreads();
  if (p.sig_rows != nullptr || p.rope_cos != nullptr)
    store_grad_rows<E, D>(seq_mut<E>(p.dq, p.dq_stride, b, h), p.dq_stride[2], Qs, q0, rows_s, p, b, h, p.heads,
                          p.dq_sig, nullptr);
  else
    store_rows<E, D>(seq_mut<E>(p.dq, p.dq_stride, b, h), p.dq_stride[2], Qs, q0, T);
}

// ---- backward, key pass: dk and dv of 64 keys, over every query head of their kv head ----
//
// Shared: K, V, and two buffers each of Q, dO, lse and delta: the next
// (head, query tile)'s land while this one computes. Groups: {K, V, first
// Q/dO/lse/delta}, then one per step for the next.

template <typename E, int D>
__global__ void __launch_bounds__(kThreads) window_backward_dkdv_kernel(WindowAttentionParams p) {
  constexpr int ld = D + 8, kHalf = kRows / 2, kNT = kHalf / 8;  // queries in two halves of 32: fewer registers
  extern __shared__ __align__(16) unsigned char smem[];
  E* Ks = reinterpret_cast<E*>(smem);
  E* Vs = Ks + kRows * ld;
  E* Qs = Vs + kRows * ld;      // two tiles
  E* dOs = Qs + 2 * kRows * ld;  // two tiles
  float* lse_s = reinterpret_cast<float*>(dOs + 2 * kRows * ld);  // two vectors
  float* delta_s = lse_s + 2 * kRows;                               // two vectors
  int64_t* rows_s = reinterpret_cast<int64_t*>(delta_s + 2 * kRows);  // the keys' packed signal rows

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t T = p.time, W = p.window, b = blockIdx.z, hk = blockIdx.y, k0 = int64_t(blockIdx.x) * kRows;
  const int64_t G = p.heads / p.kv_heads;
  const int64_t i_hi = k0 + kRows - 1 + W - 1 < T - 1 ? k0 + kRows - 1 + W - 1 : T - 1;
  // Step n: head hk * G + n / tiles, query tile k0 + 64 (n % tiles); 32-bit
  // step arithmetic (W + 63 rows, a head group's worth) keeps registers free.
  const int tiles = int((i_hi - k0) / kRows) + 1;  // query tiles per head
  auto issue = [&](int n, int bufn) {
    const int64_t h = hk * G + n / tiles, q0 = k0 + (n % tiles) * kRows;
    load_rows<E, D>(Qs + bufn * kRows * ld, seq<E>(p.q, p.q_stride, b, h), p.q_stride[2], q0, T);
    load_rows<E, D>(dOs + bufn * kRows * ld, seq<E>(p.dout, p.dout_stride, b, h), p.dout_stride[2], q0, T);
    load_vector(lse_s + bufn * kRows, p.lse + (b * p.heads + h) * T, q0, T);
    load_vector(delta_s + bufn * kRows, p.delta + (b * p.heads + h) * T, q0, T);
  };
  load_rows<E, D>(Ks, seq<E>(p.k, p.k_stride, b, hk), p.k_stride[2], k0, T);
  load_rows<E, D>(Vs, seq<E>(p.v, p.v_stride, b, hk), p.v_stride[2], k0, T);
  issue(0, 0);
  cp_async_commit();
  if (threadIdx.x < kRows) rows_s[threadIdx.x] = sig_row_of(p, b, k0);  // seen after the loop's first barrier
  const int64_t key[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
  float bias2[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) bias2[r] = key[r] < T ? p.bias[b * T + key[r]] * kLog2e : 0.f;
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
  const float sl2 = p.scale * kLog2e;
  const int steps = int(G) * tiles;
  for (int n = 0; n < steps; ++n) {
    const int buf = int(n & 1);
    cp_async_wait<0>();
    __syncthreads();  // this step's tiles landed; every warp is done with the other buffers
    if (n + 1 < steps) issue(n + 1, buf ^ 1);
    cp_async_commit();
    const int qoff = (n % tiles) * kRows;  // q0 - k0
    const int64_t q0 = k0 + qoff;
    const E* Qt = Qs + buf * kRows * ld;
    const E* dOt = dOs + buf * kRows * ld;
    const float* lt = lse_s + buf * kRows;
    const float* dt = delta_s + buf * kRows;
    const bool full = tile_all_visible(q0, k0, W, T);
    // distance i - j for query column 2t of the half, key row g.
    const int dist0 = int(q0 - key[0]) + 2 * t;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float s[kNT][4], dp[kNT][4];
#pragma unroll
      for (int i = 0; i < kNT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
      mma_abt<E, D, kNT>(s, Ks, warp * 16, Qt, half * kHalf);    // S^T = K Q^T
      mma_abt<E, D, kNT>(dp, Vs, warp * 16, dOt, half * kHalf);  // dP^T = V dO^T
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = half * kHalf + nt * 8 + 2 * t + (e & 1), r = e >> 1;
          const bool ok = full || visible(dist0 + half * kHalf + nt * 8 + (e & 1) - 8 * r, q0 + col < T, unsigned(W));
          const float pr = ok ? exp2f(fmaf(s[nt][e], sl2, bias2[r]) - lt[col]) : 0.f;
          s[nt][e] = pr;                           // P^T
          dp[nt][e] = pr * (dp[nt][e] - dt[col]);  // dS^T
        }
      mma_px<E, D, kNT>(dv, s, dOt, half * kHalf);  // dV += P^T dO
      mma_px<E, D, kNT>(dk, dp, Qt, half * kHalf);  // dK += dS^T Q
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  stage_acc<E, D>(Qs, warp * 16, dk, p.scale, p.scale);
  stage_acc<E, D>(dOs, warp * 16, dv, 1.f, 1.f);
  __syncthreads();
  if (p.sig_rows != nullptr || p.rope_cos != nullptr)
    store_grad_rows<E, D>(seq_mut<E>(p.dk, p.dk_stride, b, hk), p.dk_stride[2], Qs, k0, rows_s, p, b, hk,
                          p.kv_heads, p.dk_sig, p.dk_sig != nullptr ? Ks : nullptr);
  else
    store_rows<E, D>(seq_mut<E>(p.dk, p.dk_stride, b, hk), p.dk_stride[2], Qs, k0, T);
  store_rows<E, D>(seq_mut<E>(p.dv, p.dv_stride, b, hk), p.dv_stride[2], dOs, k0, T);
}

template <typename Fn>
void dispatch(const WindowAttentionParams& p, Fn&& fn) {
  if (!window_attention_cuda_head_dim(p.head_dim))
    throw std::invalid_argument("unswag: window_attention CUDA kernels take head_dim 64 or 128, got " +
                                std::to_string(p.head_dim));
  auto by_dim = [&](auto tag) {
    using E = decltype(tag);
    if (p.head_dim == 64) fn(E{}, std::integral_constant<int, 64>{});
    else fn(E{}, std::integral_constant<int, 128>{});
  };
  if (p.dtype == DType::kBFloat16) by_dim(__nv_bfloat16{});
  else if (p.dtype == DType::kFloat16) by_dim(__half{});
  else throw std::invalid_argument("unswag: window_attention CUDA kernels take fp16 or bf16");
}

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, size_t smem, const WindowAttentionParams& p, void* stream, const char* what) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  kernel<<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(p);
  check_launch(what);
}

dim3 grid_of(int64_t time, int64_t heads, int64_t batch) {
  return dim3(unsigned((time + kRows - 1) / kRows), unsigned(heads), unsigned(batch));
}

}  // namespace

void window_attention_forward_cuda(const WindowAttentionParams& p, void* stream) {
  dispatch(p, [&](auto e, auto d) {
    using E = decltype(e);
    constexpr int D = decltype(d)::value;
    const size_t smem = 4 * kRows * (D + 8) * sizeof(E) + 2 * kRows * sizeof(float);
    launch(window_forward_kernel<E, D>, grid_of(p.time, p.heads, p.batch), smem, p, stream,
           "window_attention forward");
  });
}

void window_attention_backward_cuda(const WindowAttentionParams& p, void* stream) {
  dispatch(p, [&](auto e, auto d) {
    using E = decltype(e);
    constexpr int D = decltype(d)::value;
    const size_t tile = kRows * (D + 8) * sizeof(E);
    launch(window_backward_dq_kernel<E, D>, grid_of(p.time, p.heads, p.batch),
           4 * tile + 2 * kRows * sizeof(float) + kRows * sizeof(int64_t), p, stream, "window_attention backward (dq)");
    launch(window_backward_dkdv_kernel<E, D>, grid_of(p.time, p.kv_heads, p.batch),
           6 * tile + 4 * kRows * sizeof(float) + kRows * sizeof(int64_t), p, stream,
           "window_attention backward (dk, dv)");
  });
}

}  // namespace unswag::kernels
