// RMSNorm forward and backward on the GPU (the math: rms_norm.h). One block
// of 256 threads per row in forward; in backward one block per
// kRmsRowsPerBlock rows, which first reduces each row's mean(g xh) and then
// walks the columns, writing dx and accumulating this block's partial dw in
// registers (coalesced: consecutive threads take consecutive columns).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "rms_norm.h"
#include "cuda_common.cuh"

namespace unswag::kernels {
namespace {

constexpr int kThreads = 256;


// Sum over the block; every thread gets the result. `shared` holds 32 floats.
__device__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // `shared` may still be read from a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < int(blockDim.x >> 5) ? shared[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                               float* __restrict__ rstd_out, int64_t n, float eps, bool add_one) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * n;
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float v = to_f(xr[j]);
    ss += v * v;
  }
  const float rstd = rsqrtf(block_sum(ss, shared) / float(n) + eps);
  if (threadIdx.x == 0) rstd_out[row] = rstd;
  T* yr = y + row * n;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float xh = to_f(xr[j]) * rstd, wj = to_f(w[j]);
    yr[j] = add_one ? from_f<T>(xh * (1.f + wj)) : from_f<T>(wj * to_f(from_f<T>(xh)));
  }
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ dy,
                                const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ dw_partial,
                                int64_t rows, int64_t n, bool add_one) {
  __shared__ float shared[32];
  __shared__ float dots[kRmsRowsPerBlock];
  const int64_t r0 = int64_t(blockIdx.x) * kRmsRowsPerBlock;
  const int64_t r1 = min(rows, r0 + kRmsRowsPerBlock);
  for (int64_t r = r0; r < r1; ++r) {
    const T *xr = x + r * n, *dyr = dy + r * n;
    float dot = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float wj = to_f(w[j]);
      dot += to_f(dyr[j]) * (add_one ? 1.f + wj : wj) * to_f(xr[j]);
    }
    dot = block_sum(dot, shared);
    if (threadIdx.x == 0) dots[r - r0] = dot * rstd[r] / float(n);
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float wj = to_f(w[j]), scale = add_one ? 1.f + wj : wj;
    float acc = 0.f;
    for (int64_t r = r0; r < r1; ++r) {
      const float s = rstd[r], d = to_f(dy[r * n + j]);
      const float xh = to_f(x[r * n + j]) * s;
      if (dx != nullptr) dx[r * n + j] = from_f<T>(s * (d * scale - xh * dots[r - r0]));
      acc += d * (add_one ? xh : to_f(from_f<T>(xh)));
    }
    if (dw_partial != nullptr) dw_partial[int64_t(blockIdx.x) * n + j] = acc;
  }
}


template <typename Fn>
void dispatch_cuda(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat16: fn(__half{}); break;
    case DType::kBFloat16: fn(__nv_bfloat16{}); break;
    default: throw std::runtime_error("unswag: rms_norm CUDA kernel: unsupported dtype");
  }
}

}  // namespace

void rms_norm_forward_cuda(const RmsNormParams& p, void* stream) {
  if (p.rows == 0) return;
  dispatch_cuda(p.dtype, [&](auto t) {
    using T = decltype(t);
    forward_kernel<T><<<unsigned(p.rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(p.x), static_cast<const T*>(p.w), static_cast<T*>(p.y), p.rstd, p.n, float(p.eps),
        p.add_one);
  });
  check_launch("rms_norm forward");
}

void rms_norm_backward_cuda(const RmsNormParams& p, void* stream) {
  if (p.rows == 0) return;
  dispatch_cuda(p.dtype, [&](auto t) {
    using T = decltype(t);
    backward_kernel<T><<<unsigned(rms_row_blocks(p.rows)), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(p.x), static_cast<const T*>(p.w), static_cast<const T*>(p.dy), p.rstd,
        static_cast<T*>(p.dx), p.dw_partial, p.rows, p.n, p.add_one);
  });
  check_launch("rms_norm backward");
}

}  // namespace unswag::kernels
