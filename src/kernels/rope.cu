// CUDA rotary position embedding (src/kernels/rope.h). One thread owns V
// consecutive elements of a row's first half and the V matching elements of
// its second half (16-byte loads where the row allows), so each element of x,
// cos and sin is read once and y written once: one pass over [rows, D].
#include <cstdint>

#include "cuda_common.cuh"
#include "rope.h"

namespace unswag::kernels {
namespace {

constexpr int kThreads = 256;

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) rope_kernel(RopeParams p) {
  using A = acc_t<T>;
  const int64_t D = p.dim, h = D / 2, per_row = h / V;
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.rows * per_row) return;
  const int64_t r = i / per_row, d0 = (i % per_row) * V;
  const int64_t token = r / p.heads;
  const int64_t crow = p.cos_per_batch ? token : token % p.time;
  using VT = Vec<T, V>;
  const int64_t hh = r % p.heads, tt = token % p.time, bb = token / p.time;
  const T* x = static_cast<const T*>(p.x) + bb * p.x_stride_b + tt * p.x_stride_t + hh * p.x_stride_h;
  const T* c = static_cast<const T*>(p.cos) + crow * D;
  const T* s = static_cast<const T*>(p.sin) + crow * D;
  T* y = static_cast<T*>(p.y) + r * D;
  const VT x1 = *reinterpret_cast<const VT*>(x + d0), x2 = *reinterpret_cast<const VT*>(x + d0 + h);
  const VT c1 = *reinterpret_cast<const VT*>(c + d0), c2 = *reinterpret_cast<const VT*>(c + d0 + h);
  const VT s1 = *reinterpret_cast<const VT*>(s + d0), s2 = *reinterpret_cast<const VT*>(s + d0 + h);
  VT y1, y2;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const A a1 = to_f(x1.v[j]), a2 = to_f(x2.v[j]);
    if (!p.inverse) {
      // y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2, each product rounded to T (rot(x) = [-x2, x1]).
      const A p1 = to_f(from_f<T>(mul_rn(a1, A(to_f(c1.v[j]))))), q1 = to_f(from_f<T>(mul_rn(-a2, A(to_f(s1.v[j])))));
      const A p2 = to_f(from_f<T>(mul_rn(a2, A(to_f(c2.v[j]))))), q2 = to_f(from_f<T>(mul_rn(a1, A(to_f(s2.v[j])))));
      y1.v[j] = from_f<T>(add_rn(p1, q1));
      y2.v[j] = from_f<T>(add_rn(p2, q2));
    } else {
      // dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1.
      y1.v[j] = from_f<T>(a1 * A(to_f(c1.v[j])) + a2 * A(to_f(s2.v[j])));
      y2.v[j] = from_f<T>(a2 * A(to_f(c2.v[j])) - a1 * A(to_f(s1.v[j])));
    }
  }
  *reinterpret_cast<VT*>(y + d0) = y1;
  *reinterpret_cast<VT*>(y + d0 + h) = y2;
}

template <typename T, int V>
void launch(const RopeParams& p, cudaStream_t stream) {
  const int64_t items = p.rows * (p.dim / 2 / V);
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) throw std::invalid_argument("unswag: rope: input too large for one launch");
  rope_kernel<T, V><<<unsigned(blocks), kThreads, 0, stream>>>(p);
}

bool aligned_to(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <typename T>
void dispatch_width(const RopeParams& p, cudaStream_t stream) {
  constexpr int kWide = 16 / sizeof(T);
  const int64_t h = p.dim / 2;
  // The wide path needs every vector start (row starts and the half offset h)
  // on a 16-byte boundary: h a multiple of the width and aligned bases.
  const bool wide = h % kWide == 0 && aligned_to(p.x, 16) && aligned_to(p.cos, 16) && aligned_to(p.sin, 16) &&
                    aligned_to(p.y, 16) && p.x_stride_b % kWide == 0 && p.x_stride_t % kWide == 0 &&
                    p.x_stride_h % kWide == 0;
  if (wide)
    launch<T, kWide>(p, stream);
  else
    launch<T, 1>(p, stream);
}

}  // namespace

void rope_cuda(const RopeParams& p, void* stream) {
  if (p.rows == 0 || p.dim == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32: dispatch_width<float>(p, s); break;
    case DType::kFloat16: dispatch_width<__half>(p, s); break;
    case DType::kBFloat16: dispatch_width<__nv_bfloat16>(p, s); break;
    case DType::kFloat64: dispatch_width<double>(p, s); break;
  }
  check_launch("rope");
}

}  // namespace unswag::kernels
