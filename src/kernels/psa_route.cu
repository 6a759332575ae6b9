// CUDA kernels of the PSA router's training step (src/kernels/psa_route.h):
// one thread per token. The forward block (a tile of kRouteTile tokens of one
// row) reduces its kRouteSlots sums by warp shuffles and then across warps in
// a fixed order, so the partials, and the finalize's double sums over them,
// are the same on every run; the finalize is one block.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_common.cuh"
#include "psa_route.h"

namespace unswag::kernels {
namespace {

constexpr int kWarps = kRouteTile / 32;

template <typename A>
__global__ void __launch_bounds__(kRouteTile) route_forward_kernel(PsaRouteParams<A> p) {
  __shared__ A warp_sums[kWarps][kRouteSlots];
  const int64_t row = blockIdx.y, t = int64_t(blockIdx.x) * kRouteTile + threadIdx.x;
  A s[kRouteSlots];
  if (t < p.time) {
    const int64_t i = row * p.time + t;
    const RouteToken<A> tok = route_token(p, i);
    p.route[i] = tok.route;
    for (int r = 0; r < 4; ++r) p.gates[i * 4 + r] = tok.route == r ? A(1) : A(0);
    route_token_sums(tok, s);
  } else {
    for (int k = 0; k < kRouteSlots; ++k) s[k] = A(0);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < kRouteSlots; ++k) {
    A v = s[k];
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) warp_sums[warp][k] = v;
  }
  __syncthreads();
  if (threadIdx.x < kRouteSlots) {
    A v = A(0);
    for (int w = 0; w < kWarps; ++w) v += warp_sums[w][threadIdx.x];
    p.partials[(row * gridDim.x + blockIdx.x) * kRouteSlots + threadIdx.x] = v;
  }
}

// One block: each thread sums a strided share of the blocks' partials per slot
// in double, and the signal counts of the rows it owns; thread 0 then adds the
// shares in thread order and takes the largest row count.
constexpr int kFinalizeThreads = 256;
template <typename A>
__global__ void __launch_bounds__(kFinalizeThreads) route_finalize_kernel(PsaRouteParams<A> p) {
  __shared__ double share[kFinalizeThreads][kRouteSlots + 1];
  const int64_t tiles = p.tiles_per_row(), blocks = p.blocks();
  double sum[kRouteSlots] = {};
  for (int64_t b = threadIdx.x; b < blocks; b += kFinalizeThreads)
    for (int k = 0; k < kRouteSlots; ++k) sum[k] += double(p.partials[b * kRouteSlots + k]);
  double row_max = 0;  // the largest signal count of the rows this thread owns
  for (int64_t row = threadIdx.x; row < p.batch; row += kFinalizeThreads) {
    double c = 0;
    for (int64_t j = 0; j < tiles; ++j) c += double(p.partials[(row * tiles + j) * kRouteSlots + 15]);
    row_max = c > row_max ? c : row_max;
  }
  for (int k = 0; k < kRouteSlots; ++k) share[threadIdx.x][k] = sum[k];
  share[threadIdx.x][kRouteSlots] = row_max;
  __syncthreads();
  if (threadIdx.x != 0) return;
  double total[kRouteSlots] = {}, signal_max = 0;
  for (int j = 0; j < kFinalizeThreads; ++j) {
    for (int k = 0; k < kRouteSlots; ++k) total[k] += share[j][k];
    signal_max = share[j][kRouteSlots] > signal_max ? share[j][kRouteSlots] : signal_max;
  }
  route_finalize_totals(p, total);
  *p.signal_max = int64_t(signal_max);
}

template <typename A>
__global__ void route_backward_kernel(PsaRouteParams<A> p) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * p.time) return;
  A dl[4] = {0, 0, 0, 0};
  if (p.grad_losses != nullptr)
    for (int k = 0; k < 4; ++k) dl[k] = p.grad_losses[k];
  route_token_backward(p, i, dl[1] + p.w_load * dl[0], dl[2] + p.w_z * dl[0], dl[3] + p.w_entropy * dl[0],
                       A(1) / A(p.batch * p.time));
}

}  // namespace

template <typename A>
void psa_route_forward_cuda(const PsaRouteParams<A>& p, void* stream) {
  if (p.batch * p.time == 0) return;
  if (p.batch > 65535 || p.tiles_per_row() > 0x7fffffff)
    throw std::invalid_argument("unswag: psa_route CUDA kernels take at most 65535 rows (got " +
                                std::to_string(p.batch) + ")");
  auto s = static_cast<cudaStream_t>(stream);
  route_forward_kernel<A><<<dim3(unsigned(p.tiles_per_row()), unsigned(p.batch)), kRouteTile, 0, s>>>(p);
  check_launch("psa_route forward");
  route_finalize_kernel<A><<<1, kFinalizeThreads, 0, s>>>(p);
  check_launch("psa_route finalize");
}

template <typename A>
void psa_route_backward_cuda(const PsaRouteParams<A>& p, void* stream) {
  const int64_t n = p.batch * p.time;
  if (n == 0) return;
  route_backward_kernel<A><<<unsigned((n + 255) / 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(p);
  check_launch("psa_route backward");
}

template void psa_route_forward_cuda<float>(const PsaRouteParams<float>&, void*);
template void psa_route_forward_cuda<double>(const PsaRouteParams<double>&, void*);
template void psa_route_backward_cuda<float>(const PsaRouteParams<float>&, void*);
template void psa_route_backward_cuda<double>(const PsaRouteParams<double>&, void*);

}  // namespace unswag::kernels
