// CUDA kernels of psa_combine (src/kernels/psa.h): the PSA layer's read side
// in one pass over [B, T, C] forward and one backward, instead of the dozen
// ATen passes (most of them broadcasts, which ATen runs on its strided,
// non-vectorised path) that gate, mask, transpose, add and scale it.
//
// One block walks up to kCombineRows rows (b, t); thread i owns the 8 columns
// [8i, 8i + 8) of C = H * D (all in one head, as D % 8 == 0), so every access
// is one 16-byte vector (two for fp32) and the per-column sums of the backward
// (d lambda) stay in registers across the block's rows. The per-row sum
// d gate[b, t] = sum_c dy sig is reduced by warp shuffles, and once per block
// across warps through shared memory. Also the router's Gumbel noise
// (kernels::gumbel_at, one thread per value) and gather_rows (a row copy by
// the widest vector that the row size, stride and pointers allow).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_common.cuh"
#include "psa.h"
#include "vec8.cuh"

namespace unswag::kernels {
namespace {

// Where thread `tid`'s columns live in each operand.
struct Columns {
  int64_t c0, h, d0, local, summary;  // local / summary: the column in [.., C / group]
};
__device__ __forceinline__ Columns columns(const PsaCombineParams& p, int tid) {
  Columns c;
  c.c0 = int64_t(tid) * 8;
  c.h = c.c0 / p.head_dim;
  c.d0 = c.c0 % p.head_dim;
  c.local = (c.h / p.local_group) * p.head_dim + c.d0;
  c.summary = (c.h / p.summary_group) * p.head_dim + c.d0;
  return c;
}

// Row r = (b, t) of sig: strided [B, H, T, D], or packed row sig_rows[r] of
// [N, C] (zeros where it is < 0).
template <typename T>
__device__ __forceinline__ void load_sig(const PsaCombineParams& p, const T* sig, int64_t r, int64_t b, int64_t t,
                                         const Columns& col, float (&s)[8]) {
  if (p.sig_rows != nullptr) {
    const int64_t n = p.sig_rows[r];
    if (n >= 0) {
      load8<true>(sig + n * p.heads * p.head_dim + col.c0, 0, 8, s);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) s[j] = 0.f;
    }
    return;
  }
  load8<true>(sig + b * p.sig_stride[0] + col.h * p.sig_stride[1] + t * p.sig_stride[2] + col.d0, 0, 8, s);
}

// A read's 8 lambdas from column c0, or ones where it has none (null: the
// caller scaled it already, e.g. into the conv's taps).
__device__ __forceinline__ void load_lambda(const float* lambda, int64_t c0, float (&out)[8]) {
  if (lambda != nullptr) {
    load8<true>(lambda + c0, 0, 8, out);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = 1.f;
  }
}

template <typename T>
__global__ void combine_forward_kernel(PsaCombineParams p) {
  const int64_t C = p.heads * p.head_dim, rows = p.batch * p.time;
  const Columns col = columns(p, threadIdx.x);
  const int64_t Cl = C / p.local_group, Cs = C / p.summary_group;
  float laml[8], lams[8];
  load_lambda(p.lambda_local, col.c0, laml);
  load_lambda(p.lambda_summary, col.c0, lams);
  const T* sig = static_cast<const T*>(p.sig);
  const T* win = static_cast<const T*>(p.win);
  const T* local = static_cast<const T*>(p.local);
  const T* summary = static_cast<const T*>(p.summary);
  T* y = static_cast<T*>(p.y);
  const int64_t rpb = psa_combine_rows_per_block(p);
  const int64_t r_end = min(rows, int64_t(blockIdx.x + 1) * rpb);
  for (int64_t r = int64_t(blockIdx.x) * rpb; r < r_end; ++r) {
    const int64_t b = r / p.time, t = r % p.time;
    float s[8], l[8], m[8], out[8];
    load_sig(p, sig, r, b, t, col, s);
    load8<true>(local + r * Cl + col.local, 0, 8, l);
    load8<true>(summary + r * Cs + col.summary, 0, 8, m);
    const float g = p.gate[r];
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = fmaf(lams[j], m[j], fmaf(laml[j], l[j], s[j] * g));
    if (win != nullptr) {
      float w[8];
      load8<true>(win + b * p.win_stride[0] + col.h * p.win_stride[1] + t * p.win_stride[2] + col.d0, 0, 8, w);
#pragma unroll
      for (int j = 0; j < 8; ++j) out[j] += w[j];
    }
    store8<true>(y + r * C + col.c0, 0, 8, out);
  }
}

template <typename T>
__global__ void combine_backward_kernel(PsaCombineParams p) {
  __shared__ float row_sums[kCombineRows][32];  // [row in block][warp]
  const int64_t C = p.heads * p.head_dim, rows = p.batch * p.time;
  const Columns col = columns(p, threadIdx.x);
  const int64_t Cl = C / p.local_group, Cs = C / p.summary_group;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float laml[8], lams[8], dlaml[8] = {}, dlams[8] = {};
  load_lambda(p.lambda_local, col.c0, laml);
  load_lambda(p.lambda_summary, col.c0, lams);
  const T* sig = static_cast<const T*>(p.sig);
  const T* local = static_cast<const T*>(p.local);
  const T* summary = static_cast<const T*>(p.summary);
  const T* dy = static_cast<const T*>(p.dy);
  T* dsig = static_cast<T*>(p.dsig);
  T* dlocal = static_cast<T*>(p.dlocal);
  T* dsummary = static_cast<T*>(p.dsummary);
  const int64_t rpb = psa_combine_rows_per_block(p);
  const int64_t r0 = int64_t(blockIdx.x) * rpb, r_end = min(rows, r0 + rpb);
  for (int64_t r = r0; r < r_end; ++r) {
    const int64_t b = r / p.time, t = r % p.time;
    float g[8], tmp[8];
    load8<true>(dy + r * C + col.c0, 0, 8, g);
    const float gate = p.gate[r];
    const int64_t packed_row = p.sig_rows != nullptr ? p.sig_rows[r] : 0;
    if (dsig != nullptr && packed_row >= 0) {
#pragma unroll
      for (int j = 0; j < 8; ++j) tmp[j] = g[j] * gate;
      const int64_t at = p.sig_rows != nullptr
                             ? packed_row * C + col.c0
                             : b * p.dsig_stride[0] + col.h * p.dsig_stride[1] + t * p.dsig_stride[2] + col.d0;
      store8<true>(dsig + at, 0, 8, tmp);
    }
    if (p.dgate != nullptr) {
      float s[8], acc = 0.f;
      load_sig(p, sig, r, b, t, col, s);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc = fmaf(g[j], s[j], acc);
#pragma unroll
      for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (lane == 0) row_sums[r - r0][warp] = acc;
    }
    // local and summary: their gradients (per query column; the caller sums a
    // group's heads when several share one) and their lambdas' partial sums;
    // a read without a lambda (already scaled) has dy itself as its gradient,
    // which the caller takes without this kernel writing it.
    if (p.lambda_local != nullptr) {
      load8<true>(local + r * Cl + col.local, 0, 8, tmp);
#pragma unroll
      for (int j = 0; j < 8; ++j) dlaml[j] = fmaf(g[j], tmp[j], dlaml[j]);
    }
    if (p.lambda_summary != nullptr) {
      load8<true>(summary + r * Cs + col.summary, 0, 8, tmp);
#pragma unroll
      for (int j = 0; j < 8; ++j) dlams[j] = fmaf(g[j], tmp[j], dlams[j]);
    }
    if (dlocal != nullptr && p.lambda_local != nullptr) {
#pragma unroll
      for (int j = 0; j < 8; ++j) tmp[j] = g[j] * laml[j];
      const int64_t at = p.local_group == 1 ? r * Cl + col.local : r * C + col.c0;
      store8<true>(dlocal + at, 0, 8, tmp);
    }
    if (dsummary != nullptr && p.lambda_summary != nullptr) {
#pragma unroll
      for (int j = 0; j < 8; ++j) tmp[j] = g[j] * lams[j];
      const int64_t at = p.summary_group == 1 ? r * Cs + col.summary : r * C + col.c0;
      store8<true>(dsummary + at, 0, 8, tmp);
    }
  }
  float* part = p.dlambda_partial + int64_t(blockIdx.x) * 2 * C;
  store8<true>(part + col.c0, 0, 8, dlaml);
  store8<true>(part + C + col.c0, 0, 8, dlams);
  if (p.dgate != nullptr) {
    __syncthreads();
    const int warps = blockDim.x / 32;
    for (int64_t i = threadIdx.x; i < r_end - r0; i += blockDim.x) {
      float acc = 0.f;
      for (int w = 0; w < warps; ++w) acc += row_sums[i][w];
      p.dgate[r0 + i] = acc;
    }
  }
}

template <typename Fn>
void dispatch_float(DType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat16: fn(__half{}); break;
    case DType::kBFloat16: fn(__nv_bfloat16{}); break;
    default: throw std::invalid_argument(std::string("unswag: ") + what + " CUDA kernels take fp32/fp16/bf16");
  }
}

void check_shape(const PsaCombineParams& p) {
  const int64_t C = p.heads * p.head_dim;
  if (p.head_dim % 8 != 0 || C % 256 != 0 || C > 8192 || p.local_group < 1 || p.summary_group < 1)
    throw std::invalid_argument(
        "unswag: psa_combine CUDA kernels need head_dim % 8 == 0 and heads * head_dim a multiple of 256, <= 8192");
}

}  // namespace

void psa_combine_forward_cuda(const PsaCombineParams& p, void* stream) {
  if (p.batch * p.time * p.heads * p.head_dim == 0) return;
  check_shape(p);
  const unsigned threads = unsigned(p.heads * p.head_dim / 8);
  dispatch_float(p.dtype, "psa_combine", [&](auto tag) {
    using T = decltype(tag);
    combine_forward_kernel<T><<<unsigned(psa_combine_blocks(p)), threads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  });
  check_launch("psa_combine forward");
}

void psa_combine_backward_cuda(const PsaCombineParams& p, void* stream) {
  if (p.batch * p.time * p.heads * p.head_dim == 0) return;
  check_shape(p);
  const unsigned threads = unsigned(p.heads * p.head_dim / 8);
  dispatch_float(p.dtype, "psa_combine", [&](auto tag) {
    using T = decltype(tag);
    combine_backward_kernel<T><<<unsigned(psa_combine_blocks(p)), threads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  });
  check_launch("psa_combine backward");
}

namespace {
__global__ void gumbel_noise_kernel(GumbelNoiseParams p) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < p.n) p.out[i] = gumbel_at(p.key, i);
}
}  // namespace

void gumbel_noise_cuda(const GumbelNoiseParams& p, void* stream) {
  if (p.n == 0) return;
  gumbel_noise_kernel<<<unsigned((p.n + 255) / 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(p);
  check_launch("gumbel noise");
}

namespace {
// A block of 256 threads copies 256 / tpr rows at a time, tpr threads a row
// (tpr the power of two >= the row's vectors, at most 256), so short rows
// (the packed gates: one float) do not leave most of the block idle.
template <typename V>
__global__ void gather_rows_kernel(GatherRowsParams p, int tpr) {
  const int64_t row_vecs = p.row_bytes / int64_t(sizeof(V));
  const int rows_per_block = 256 / tpr;
  const int lane = int(threadIdx.x) % tpr;
  const char* src = static_cast<const char*>(p.src);
  V* out = static_cast<V*>(p.out);
  for (int64_t m = int64_t(blockIdx.x) * rows_per_block + threadIdx.x / tpr; m < p.rows;
       m += int64_t(gridDim.x) * rows_per_block) {
    const int64_t r = p.index[m];
    const bool valid = r >= 0 && r < p.src_rows;
    const V* row = reinterpret_cast<const V*>(src + (valid ? r : 0) * p.src_row_stride);
    for (int64_t j = lane; j < row_vecs; j += tpr) out[m * row_vecs + j] = valid ? row[j] : V{};
  }
}

template <typename V>
void launch_gather_rows(const GatherRowsParams& p, cudaStream_t s) {
  const int64_t row_vecs = p.row_bytes / int64_t(sizeof(V));
  int tpr = 1;
  while (tpr < 256 && tpr < row_vecs) tpr *= 2;
  const int64_t blocks = min(int64_t(1) << 20, (p.rows + 256 / tpr - 1) / (256 / tpr));
  gather_rows_kernel<V><<<unsigned(blocks), 256, 0, s>>>(p, tpr);
}
}  // namespace

void gather_rows_cuda(const GatherRowsParams& p, void* stream) {
  if (p.rows == 0 || p.row_bytes == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  // The widest vector dividing the row size, the source stride and both base addresses.
  const uint64_t bits = uint64_t(p.row_bytes) | uint64_t(p.src_row_stride) |
                        uint64_t(reinterpret_cast<uintptr_t>(p.src)) | uint64_t(reinterpret_cast<uintptr_t>(p.out));
  if (bits % 16 == 0) launch_gather_rows<uint4>(p, s);
  else if (bits % 8 == 0) launch_gather_rows<uint2>(p, s);
  else if (bits % 4 == 0) launch_gather_rows<uint32_t>(p, s);
  else if (bits % 2 == 0) launch_gather_rows<uint16_t>(p, s);
  else launch_gather_rows<uint8_t>(p, s);
  check_launch("gather_rows");
}

namespace {
// One warp per src row (its dot is a warp reduction).
template <typename T>
__global__ void add_rows_dot_kernel(AddRowsParams p) {
  constexpr int kPer = 16 / int(sizeof(T));
  const int64_t vecs = p.cols / kPer;
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t m = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; m < p.rows; m += warps) {
    const int64_t n = p.index[m];
    if (n < 0 || n >= p.dst_rows) continue;  // the same for the whole warp
    const T* sp = static_cast<const T*>(p.src) + m * p.src_stride;
    const T* op = static_cast<const T*>(p.other) + n * p.other_stride;
    T* dp = static_cast<T*>(p.dst) + n * p.dst_stride;
    float dot = 0.f;
    for (int64_t j = lane; j < vecs; j += 32) {
      const uint4 a = *reinterpret_cast<const uint4*>(sp + j * kPer);
      const uint4 o = *reinterpret_cast<const uint4*>(op + j * kPer);
      uint4 d = *reinterpret_cast<const uint4*>(dp + j * kPer);
      const T* ae = reinterpret_cast<const T*>(&a);
      const T* oe = reinterpret_cast<const T*>(&o);
      T* de = reinterpret_cast<T*>(&d);
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        de[e] = from_f<T>(to_f(de[e]) + to_f(ae[e]));
        dot = fmaf(to_f(ae[e]), to_f(oe[e]), dot);
      }
      *reinterpret_cast<uint4*>(dp + j * kPer) = d;
    }
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (lane == 0) p.dot[n] += dot;
  }
}
}  // namespace

void add_rows_cuda(const AddRowsParams& p, void* stream) {
  const int64_t es = p.dtype == DType::kFloat32 ? 4 : 2;
  if (p.rows * (p.cols * es / 16) == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_float(p.dtype, "add_rows", [&](auto tag) {
    using T = decltype(tag);
    // 8 warps (rows) per block.
    add_rows_dot_kernel<T><<<unsigned(min(int64_t(1) << 20, (p.rows + 7) / 8)), 256, 0, s>>>(p);
  });
  check_launch("add_rows");
}

namespace {
// One thread per 16-byte vector of out: vectors [0, D / V) copy x's row, the
// rest are the padding (its first element first[b, t] on the first of them).
template <typename T>
__global__ void pad_head_dim_kernel(PadHeadDimParams p, int64_t row_vecs, int64_t x_vecs, int64_t total) {
  constexpr int kPerVec = 16 / int(sizeof(T));
  const char* x = static_cast<const char*>(p.x);
  uint4* out = static_cast<uint4*>(p.out);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / row_vecs, j = i - row * row_vecs;
    const int64_t bt = row / p.heads, h = row - bt * p.heads;
    const int64_t b = bt / p.time, t = bt - b * p.time;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (j < x_vecs) {
      v = reinterpret_cast<const uint4*>(
          x + (b * p.x_stride[0] + t * p.x_stride[1] + h * p.x_stride[2]) * int64_t(sizeof(T)))[j];
    } else if (j == x_vecs && p.first != nullptr) {
      T e[kPerVec];
#pragma unroll
      for (int k = 0; k < kPerVec; ++k) e[k] = from_f<T>(0.f);
      e[0] = from_f<T>(p.first[bt]);
      v = *reinterpret_cast<const uint4*>(e);
    }
    out[i] = v;
  }
}
}  // namespace

void pad_head_dim_cuda(const PadHeadDimParams& p, void* stream) {
  const int64_t rows = p.batch * p.time * p.heads;
  if (rows == 0) return;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    constexpr int64_t kPerVec = 16 / int64_t(sizeof(T));
    if (p.head_dim % kPerVec != 0 || p.pad % kPerVec != 0)
      throw std::invalid_argument("unswag: pad_head_dim CUDA kernel needs head_dim and pad multiples of 16 bytes");
    const int64_t row_vecs = (p.head_dim + p.pad) / kPerVec, total = rows * row_vecs;
    const int64_t blocks = min(int64_t(1) << 20, (total + 255) / 256);
    pad_head_dim_kernel<T><<<unsigned(blocks), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        p, row_vecs, p.head_dim / kPerVec, total);
  };
  dispatch_float(p.dtype, "pad_head_dim", run);
  check_launch("pad_head_dim");
}

namespace {
// Forward: one thread per 8 values. Backward: one warp per row (dg by shuffles).
template <typename T>
__global__ void gate_tokens_forward_kernel(GateTokensParams p) {
  const int64_t vecs = p.rows * p.cols / 8;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < vecs; v += int64_t(gridDim.x) * blockDim.x) {
    const float g = p.g[v * 8 / p.cols];
    float a[8];
    load8<true>(x, v * 8, 0, a);
#pragma unroll
    for (int j = 0; j < 8; ++j) a[j] *= g;
    store8<true>(y, v * 8, 0, a);
  }
}

template <typename T>
__global__ void gate_tokens_backward_kernel(GateTokensParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < p.rows; r += warps) {
    const float g = p.g[r];
    float acc = 0.f;
    for (int64_t c = int64_t(lane) * 8; c < p.cols; c += 32 * 8) {
      float d[8];
      load8<true>(dy + r * p.cols, c, 0, d);
      if (p.dg != nullptr) {
        float a[8];
        load8<true>(x + r * p.cols, c, 0, a);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc = fmaf(d[j], a[j], acc);
      }
      if (dx != nullptr) {
#pragma unroll
        for (int j = 0; j < 8; ++j) d[j] *= g;
        store8<true>(dx + r * p.cols, c, 0, d);
      }
    }
    if (p.dg != nullptr) {
#pragma unroll
      for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (lane == 0) p.dg[r] = acc;
    }
  }
}

void check_gate_shape(const GateTokensParams& p) {
  if (p.cols % 8 != 0) throw std::invalid_argument("unswag: gate_tokens CUDA kernels need cols % 8 == 0");
}
}  // namespace

void gate_tokens_forward_cuda(const GateTokensParams& p, void* stream) {
  if (p.rows * p.cols == 0) return;
  check_gate_shape(p);
  const int64_t blocks = min(int64_t(1) << 20, (p.rows * p.cols / 8 + 255) / 256);
  dispatch_float(p.dtype, "gate_tokens", [&](auto tag) {
    gate_tokens_forward_kernel<decltype(tag)><<<unsigned(blocks), 256, 0, static_cast<cudaStream_t>(stream)>>>(p);
  });
  check_launch("gate_tokens forward");
}

void gate_tokens_backward_cuda(const GateTokensParams& p, void* stream) {
  if (p.rows == 0) return;
  check_gate_shape(p);
  const int64_t blocks = min(int64_t(1) << 20, (p.rows + 7) / 8);
  dispatch_float(p.dtype, "gate_tokens", [&](auto tag) {
    gate_tokens_backward_kernel<decltype(tag)><<<unsigned(blocks), 256, 0, static_cast<cudaStream_t>(stream)>>>(p);
  });
  check_launch("gate_tokens backward");
}

}  // namespace unswag::kernels
