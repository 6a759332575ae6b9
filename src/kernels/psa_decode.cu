// The fused PSA decode step on the GPU (the steps and the state: psa_decode.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "cuda_common.cuh"
#include "psa_decode.h"

namespace unswag::kernels {
namespace {

constexpr int kRoutePrune = 0, kRouteSummary = 2, kRouteSignal = 3;
constexpr int kWarps = 8;          // gemv: rows per block
constexpr int kAttnWarps = 4;      // attend: warps per block
constexpr int kMaxHeadDim = 256;
constexpr int kLanesMax = kMaxHeadDim / 32;

// Rounds a float to T and back: the reference rounds every ATen op's output to T.
template <typename T>
__device__ __forceinline__ float round_t(float v) {
  return to_f(from_f<T>(v));
}

// ---- 1, 5: y_r = W_r . x + b_r, one warp per row --------------------------

struct GemvSegment {
  const void* w;
  const void* b;
  void* y;
  int64_t rows;
};
struct GemvSegments {
  GemvSegment s[4];
  int n;
};

template <typename T>
__device__ __forceinline__ float dot_row(const T* __restrict__ w, const T* __restrict__ x, int64_t n, bool vec,
                                         int lane) {
  float sum = 0.f;
  if (vec) {
    constexpr int V = 16 / sizeof(T);
    const uint4* w4 = reinterpret_cast<const uint4*>(w);
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    for (int64_t i = lane; i < n / V; i += 32) {
      const uint4 a = __ldg(w4 + i), b = x4[i];
      const T* av = reinterpret_cast<const T*>(&a);
      const T* bv = reinterpret_cast<const T*>(&b);
#pragma unroll
      for (int j = 0; j < V; ++j) sum += to_f(av[j]) * to_f(bv[j]);
    }
  } else {
    for (int64_t i = lane; i < n; i += 32) sum += to_f(w[i]) * to_f(x[i]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  return sum;
}

template <typename T>
__global__ void gemv_kernel(const T* __restrict__ x, int64_t n_in, GemvSegments segs, int64_t total_rows, bool vec) {
  const int lane = threadIdx.x & 31;
  int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= total_rows) return;
  int k = 0;
  while (row >= segs.s[k].rows) row -= segs.s[k++].rows;
  const GemvSegment& s = segs.s[k];
  float v = dot_row(static_cast<const T*>(s.w) + row * n_in, x, n_in, vec, lane);
  if (lane == 0) {
    // The bias is added in fp32 before the one rounding to T, as cuBLAS's fused bias epilogue does.
    if (s.b != nullptr) v += to_f(static_cast<const T*>(s.b)[row]);
    static_cast<T*>(s.y)[row] = from_f<T>(v);
  }
}

template <typename T>
void launch_gemv(const T* x, int64_t n_in, const GemvSegments& segs, cudaStream_t stream) {
  int64_t rows = 0;
  bool vec = (n_in * int64_t(sizeof(T))) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  for (int i = 0; i < segs.n; ++i) {
    rows += segs.s[i].rows;
    vec = vec && reinterpret_cast<uintptr_t>(segs.s[i].w) % 16 == 0;
  }
  if (rows == 0) return;
  gemv_kernel<T><<<unsigned((rows + kWarps - 1) / kWarps), kWarps * 32, 0, stream>>>(x, n_in, segs, rows, vec);
  check_launch("psa_decode gemv");
}

// ---- 2: route, RoPE, conv, summary, ring and signal writes ----------------

template <typename T>
__device__ __forceinline__ int decode_route(const T* __restrict__ logits, const T* __restrict__ bias) {
  int best = 0;
  float best_v = to_f(logits[0]) + to_f(bias[0]);
#pragma unroll
  for (int r = 1; r < 4; ++r) {
    const float v = to_f(logits[r]) + to_f(bias[r]);
    if (v > best_v) best = r, best_v = v;
  }
  return best;
}

// HF RoPE with the reference's roundings: x cos + rotate_half(x) sin, each product and the sum rounded to T.
template <typename T>
__device__ __forceinline__ float rope_at(const T* __restrict__ head, int d, int D, const T* __restrict__ cos,
                                         const T* __restrict__ sin) {
  const int half = D / 2;
  const float x = to_f(head[d]);
  const float rot = d < half ? -to_f(head[d + half]) : to_f(head[d - half]);
  return round_t<T>(round_t<T>(x * to_f(cos[d])) + round_t<T>(rot * to_f(sin[d])));
}

template <typename T>
__global__ void prepare_kernel(PSADecodeParams p) {
  const int64_t H = p.heads, D = p.head_dim, qd = H * D, kvd = p.kv_heads * D;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= qd + kvd) return;
  T* ws = static_cast<T*>(p.workspace);
  const T* proj = ws;                 // q [qd], k [kvd], v [kvd], logits [4]
  T* q_rot = ws + qd + 2 * kvd + 4;   // [qd]
  T* local_out = q_rot + qd;          // [kvd]
  T* summary_out = local_out + kvd;   // [kvd]
  const T* cos = static_cast<const T*>(p.cos);
  const T* sin = static_cast<const T*>(p.sin);
  const int route = decode_route(proj + qd + 2 * kvd, static_cast<const T*>(p.route_bias));
  if (i < qd) {
    const int64_t h = i / D, d = i % D;
    q_rot[i] = from_f<T>(rope_at(proj + h * D, int(d), int(D), cos, sin));
    return;
  }
  const int64_t c = i - qd, g = c / D, d = c % D;
  const float k = rope_at(proj + qd + g * D, int(d), int(D), cos, sin);
  const T v_t = proj[qd + kvd + c];
  const float v = to_f(v_t);
  const bool keep = route != kRoutePrune;
  const float u = keep ? v : 0.f;

  // Conv: local = sum_{j < Kc-1} w[c, j] tail[j] + w[c, Kc-1] u; the tail shifts by one.
  const T* w = static_cast<const T*>(p.conv_weight) + c * p.kernel_size;
  T* tail = static_cast<T*>(p.conv_tail);
  float local = 0.f;
  for (int64_t j = 0; j + 1 < p.kernel_size; ++j) {
    const T tj = tail[j * kvd + c];
    local += to_f(w[j]) * to_f(tj);
    if (j > 0) tail[(j - 1) * kvd + c] = tj;
  }
  local += to_f(w[p.kernel_size - 1]) * u;
  if (p.kernel_size > 1) tail[(p.kernel_size - 2) * kvd + c] = from_f<T>(u);
  local_out[c] = from_f<T>(local);

  // Summary register in fp32: a = 1 - [summary] (1 - sigmoid(theta)).
  const float theta = to_f(static_cast<const T*>(p.summary_decay)[c]);
  const float forget = 1.f - 1.f / (1.f + expf(-theta));
  const float a = 1.f - (route == kRouteSummary ? 1.f : 0.f) * forget;
  const float s = a * p.summary[c] + (1.f - a) * v;
  p.summary[c] = s;
  summary_out[c] = from_f<T>(s);

  const T k_t = from_f<T>(k);
  if (p.window > 0) {
    const int64_t slot = p.tokens % p.window;
    static_cast<T*>(p.ring_k)[(g * p.window + slot) * D + d] = k_t;
    static_cast<T*>(p.ring_v)[(g * p.window + slot) * D + d] = keep ? v_t : from_f<T>(0.f);
    if (c == 0) p.ring_keep[slot] = keep ? 1.f : 0.f;
  }
  const int32_t n = *p.signal_count;
  if (route == kRouteSignal) {
    static_cast<T*>(p.signal_k)[(g * p.signal_capacity + n) * D + d] = k_t;
    static_cast<T*>(p.signal_v)[(g * p.signal_capacity + n) * D + d] = v_t;
  }
  if (c == 0) {
    p.step[0] = route;
    p.step[1] = n + (route == kRouteSignal ? 1 : 0);
  }
}

// ---- 3: attention partials ---------------------------------------------------

template <typename T>
__global__ void attend_kernel(PSADecodeParams p, int64_t splits) {
  const int64_t H = p.heads, D = p.head_dim, G = p.heads / p.kv_heads;
  const int64_t h = blockIdx.x, split = blockIdx.y, g = h / G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int route = p.step[0];
  const T* kbase;
  const T* vbase;
  const float* keep = nullptr;
  int64_t begin, end;
  if (split == 0) {
    if (p.window == 0) return;
    begin = 0;
    end = p.tokens + 1 < p.window ? p.tokens + 1 : p.window;
    kbase = static_cast<const T*>(p.ring_k) + g * p.window * D;
    vbase = static_cast<const T*>(p.ring_v) + g * p.window * D;
    keep = p.ring_keep;
  } else {
    if (route != kRouteSignal) return;
    const int64_t n = p.step[1];
    begin = (split - 1) * kDecodeSplitKeys;
    if (begin >= n) return;
    end = begin + kDecodeSplitKeys < n ? begin + kDecodeSplitKeys : n;
    kbase = static_cast<const T*>(p.signal_k) + g * p.signal_capacity * D;
    vbase = static_cast<const T*>(p.signal_v) + g * p.signal_capacity * D;
  }
  const T* q_rot = static_cast<const T*>(p.workspace) + (H * D + 2 * p.kv_heads * D + 4) + h * D;
  float q[kLanesMax], acc[kLanesMax];
#pragma unroll
  for (int j = 0; j < kLanesMax; ++j) {
    const int64_t d = lane + 32 * j;
    q[j] = d < D ? to_f(q_rot[d]) * float(p.scale) : 0.f;
    acc[j] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int64_t key = begin + warp; key < end; key += kAttnWarps) {
    if (keep != nullptr && keep[key] == 0.f) continue;
    const T* kr = kbase + key * D;
    const T* vr = vbase + key * D;
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kLanesMax; ++j) {
      const int64_t d = lane + 32 * j;
      if (d < D) s += q[j] * to_f(kr[d]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const float m_new = fmaxf(m, s);
    const float corr = __expf(m - m_new), e = __expf(s - m_new);
    l = l * corr + e;
#pragma unroll
    for (int j = 0; j < kLanesMax; ++j) {
      const int64_t d = lane + 32 * j;
      acc[j] = acc[j] * corr + (d < D ? e * to_f(vr[d]) : 0.f);
    }
    m = m_new;
  }
  __shared__ float sm_m[kAttnWarps], sm_l[kAttnWarps], sm_acc[kAttnWarps][kMaxHeadDim];
  if (lane == 0) sm_m[warp] = m, sm_l[warp] = l;
#pragma unroll
  for (int j = 0; j < kLanesMax; ++j) {
    const int64_t d = lane + 32 * j;
    if (d < D) sm_acc[warp][d] = acc[j];
  }
  __syncthreads();
  float M = -INFINITY;
#pragma unroll
  for (int w = 0; w < kAttnWarps; ++w) M = fmaxf(M, sm_m[w]);
  float* ml = p.partials + (h * splits + split) * 2;
  float* out = p.partials + H * splits * 2 + (h * splits + split) * D;
  if (M == -INFINITY) {  // no key in this block (all pruned)
    if (threadIdx.x == 0) ml[0] = -INFINITY, ml[1] = 0.f;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) out[d] = 0.f;
    return;
  }
  float L = 0.f;
#pragma unroll
  for (int w = 0; w < kAttnWarps; ++w) L += sm_l[w] * __expf(sm_m[w] - M);
  if (threadIdx.x == 0) ml[0] = M, ml[1] = L;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) a += sm_acc[w][d] * __expf(sm_m[w] - M);
    out[d] = a;
  }
}

// ---- 4: combine --------------------------------------------------------------

template <typename T>
__global__ void combine_kernel(PSADecodeParams p, int64_t splits) {
  const int64_t H = p.heads, D = p.head_dim, qd = H * D, kvd = p.kv_heads * D, G = p.heads / p.kv_heads;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= qd) return;
  const int64_t h = i / D, d = i % D, c = (h / G) * D + d;
  const int route = p.step[0];
  const int64_t n = p.step[1];
  const float* ml = p.partials + h * splits * 2;
  const float* acc = p.partials + H * splits * 2 + h * splits * D + d;
  float out = 0.f;
  if (p.window > 0 && ml[1] > 0.f) out += acc[0] / ml[1];
  if (route == kRouteSignal) {
    const int64_t used = 1 + (n + kDecodeSplitKeys - 1) / kDecodeSplitKeys;
    float M = -INFINITY;
    for (int64_t s = 1; s < used; ++s) M = fmaxf(M, ml[2 * s]);
    float L = 0.f, A = 0.f;
    for (int64_t s = 1; s < used; ++s) {
      const float w = __expf(ml[2 * s] - M);
      L += ml[2 * s + 1] * w;
      A += acc[s * D] * w;
    }
    out += A / L;  // L > 0: the token's own key is among them
  }
  const T* ws = static_cast<const T*>(p.workspace);
  const T* local = ws + (qd + 2 * kvd + 4) + qd;
  const T* summary = local + kvd;
  out += to_f(static_cast<const T*>(p.lambda_local)[i]) * to_f(local[c]) +
         to_f(static_cast<const T*>(p.lambda_summary)[i]) * to_f(summary[c]);
  static_cast<T*>(p.workspace)[(qd + 2 * kvd + 4) + qd + 2 * kvd + i] = from_f<T>(out);
  if (i == 0) {
    *p.signal_count = int32_t(n);
    *p.route_out = route;
#pragma unroll
    for (int r = 0; r < 4; ++r) p.fractions_out[r] = r == route ? 1.f : 0.f;
  }
}

template <typename T>
void step(const PSADecodeParams& p, cudaStream_t stream) {
  if (p.head_dim > kMaxHeadDim || p.head_dim % 2 != 0)
    throw std::runtime_error("unswag: psa_decode_step_cuda: head_dim must be even and <= 256");
  if (p.signal_bound + 1 > p.signal_capacity)
    throw std::runtime_error("unswag: psa_decode_step_cuda: the signal cache has no free slot");
  const int64_t qd = p.heads * p.head_dim, kvd = p.kv_heads * p.head_dim;
  T* ws = static_cast<T*>(p.workspace);
  GemvSegments in{};
  in.s[0] = {p.wq, p.bq, ws, qd};
  in.s[1] = {p.wk, p.bk, ws + qd, kvd};
  in.s[2] = {p.wv, p.bv, ws + qd + kvd, kvd};
  in.s[3] = {p.wr, p.br, ws + qd + 2 * kvd, 4};
  in.n = 4;
  launch_gemv<T>(static_cast<const T*>(p.x), p.hidden, in, stream);

  constexpr int kThreads = 256;
  prepare_kernel<T><<<unsigned((qd + kvd + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p);
  check_launch("psa_decode prepare");
  const int64_t splits = psa_decode_splits(p.signal_bound + 1);
  attend_kernel<T><<<dim3(unsigned(p.heads), unsigned(splits)), kAttnWarps * 32, 0, stream>>>(p, splits);
  check_launch("psa_decode attend");
  combine_kernel<T><<<unsigned((qd + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p, splits);
  check_launch("psa_decode combine");

  GemvSegments out{};
  out.s[0] = {p.wo, p.bo, p.y, p.hidden};
  out.n = 1;
  launch_gemv<T>(ws + (qd + 2 * kvd + 4) + qd + 2 * kvd, qd, out, stream);
}

}  // namespace

void psa_decode_step_cuda(const PSADecodeParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32: step<float>(p, s); break;
    case DType::kFloat16: step<__half>(p, s); break;
    case DType::kBFloat16: step<__nv_bfloat16>(p, s); break;
    default: throw std::runtime_error("unswag: psa_decode_step_cuda: dtype must be fp32, fp16 or bf16");
  }
}

}  // namespace unswag::kernels
