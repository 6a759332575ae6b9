// The PSA sequence primitives on the CPU: the plain-loop reference of the math
// in psa.h. Rows of C channels are contiguous, so every inner loop runs over c
// (vectorisable); accumulation in opmath (float; double for double).
#include <algorithm>
#include <cstring>
#include <vector>

#include "float_types.h"
#include "psa.h"

namespace unswag::kernels {
namespace {

// ---- causal depthwise conv1d ----------------------------------------------

// The weight transposed to [K, C] so the tap loop reads rows of c.
template <typename M>
std::vector<M> taps_by_channel(const CausalConvParams& p) {
  const M* w = static_cast<const M*>(p.weight);
  std::vector<M> wt(size_t(p.taps * p.channels));
  for (int64_t c = 0; c < p.channels; ++c)
    for (int64_t j = 0; j < p.taps; ++j) wt[size_t(j * p.channels + c)] = w[c * p.taps + j];
  return wt;
}

template <typename T>
void conv_forward_impl(const CausalConvParams& p, int64_t g0, int64_t g1) {
  using M = opmath_t<T>;
  const int64_t T_ = p.time, C = p.channels, K = p.taps;
  const int64_t tiles = (T_ + p.time_tile - 1) / p.time_tile;
  const T* x = static_cast<const T*>(p.x);
  const M* bias = static_cast<const M*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const std::vector<M> wt = taps_by_channel<M>(p);
  std::vector<M> acc(static_cast<size_t>(C));
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t b = g / tiles, t0 = (g % tiles) * p.time_tile, t1 = std::min(T_, t0 + p.time_tile);
    const T* xb = x + b * T_ * C;
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t c = 0; c < C; ++c) acc[size_t(c)] = bias ? bias[c] : M(0);
      // Tap j reads x at t - K + 1 + j: the K-1 earlier steps and t itself.
      for (int64_t j = std::max<int64_t>(0, K - 1 - t); j < K; ++j) {
        const T* xr = xb + (t - K + 1 + j) * C;
        const M* wj = wt.data() + j * C;
        for (int64_t c = 0; c < C; ++c) acc[size_t(c)] += wj[c] * M(to_float(xr[c]));
      }
      T* yr = y + (b * T_ + t) * C;
      for (int64_t c = 0; c < C; ++c) yr[c] = from_acc<T>(acc[size_t(c)]);
    }
  }
}

template <typename T>
void conv_backward_impl(const CausalConvParams& p, int64_t g0, int64_t g1) {
  using M = opmath_t<T>;
  const int64_t T_ = p.time, C = p.channels, K = p.taps;
  const int64_t tiles = (T_ + p.time_tile - 1) / p.time_tile;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  const T* dx_addend = static_cast<const T*>(p.dx_addend);
  M* dw_partial = static_cast<M*>(p.dweight_partial);
  M* db_partial = static_cast<M*>(p.dbias_partial);
  const std::vector<M> wt = taps_by_channel<M>(p);
  std::vector<M> acc(static_cast<size_t>(C)), dw(dw_partial ? size_t(K * C) : 0), db(db_partial ? size_t(C) : 0);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t b = g / tiles, t0 = (g % tiles) * p.time_tile, t1 = std::min(T_, t0 + p.time_tile);
    const T* xb = x + b * T_ * C;
    const T* dyb = dy + b * T_ * C;
    if (dx) {
      // dx_t = sum_j w_j dy_{t+K-1-j}: the transposed (anti-causal) conv.
      for (int64_t t = t0; t < t1; ++t) {
        if (dx_addend != nullptr) {
          const T* ar = dx_addend + (b * T_ + t) * C;
          for (int64_t c = 0; c < C; ++c) acc[size_t(c)] = M(to_float(ar[c]));
        } else {
          std::fill(acc.begin(), acc.end(), M(0));
        }
        for (int64_t j = std::max<int64_t>(0, t + K - T_); j < K; ++j) {
          const T* dr = dyb + (t + K - 1 - j) * C;
          const M* wj = wt.data() + j * C;
          for (int64_t c = 0; c < C; ++c) acc[size_t(c)] += wj[c] * M(to_float(dr[c]));
        }
        T* out = dx + (b * T_ + t) * C;
        for (int64_t c = 0; c < C; ++c) out[c] = from_acc<T>(acc[size_t(c)]);
      }
    }
    if (dw_partial || db_partial) {
      std::fill(dw.begin(), dw.end(), M(0));
      std::fill(db.begin(), db.end(), M(0));
      for (int64_t t = t0; t < t1; ++t) {
        const T* dr = dyb + t * C;
        if (db_partial)
          for (int64_t c = 0; c < C; ++c) db[size_t(c)] += M(to_float(dr[c]));
        if (dw_partial)
          for (int64_t j = std::max<int64_t>(0, K - 1 - t); j < K; ++j) {
            const T* xr = xb + (t - K + 1 + j) * C;
            M* dwj = dw.data() + j * C;
            for (int64_t c = 0; c < C; ++c) dwj[c] += M(to_float(dr[c])) * M(to_float(xr[c]));
          }
      }
      if (dw_partial) std::copy(dw.begin(), dw.end(), dw_partial + g * K * C);
      if (db_partial) std::copy(db.begin(), db.end(), db_partial + g * C);
    }
  }
}

// ---- linear scan ------------------------------------------------------------

// Group g: batch row b = g / blocks, channels [c0, c1).
struct ChannelBlock {
  int64_t b, c0, c1;
};
ChannelBlock channel_block(const LinearScanParams& p, int64_t g) {
  const int64_t blocks = (p.channels + kScanCpuChannels - 1) / kScanCpuChannels;
  const int64_t c0 = (g % blocks) * kScanCpuChannels;
  return {g / blocks, c0, std::min(p.channels, c0 + kScanCpuChannels)};
}

template <typename T>
void scan_forward_impl(const LinearScanParams& p, int64_t g0, int64_t g1) {
  using M = opmath_t<T>;
  const int64_t T_ = p.time, C = p.channels;
  const T* a = static_cast<const T*>(p.a);
  const T* x = static_cast<const T*>(p.x);
  const M* h0 = static_cast<const M*>(p.h0);
  T* h_out = static_cast<T*>(p.h);
  M h[kScanCpuChannels];
  for (int64_t g = g0; g < g1; ++g) {
    const auto [b, c0, c1] = channel_block(p, g);
    const int64_t n = c1 - c0;
    for (int64_t i = 0; i < n; ++i) h[i] = h0 ? h0[b * C + c0 + i] : M(0);
    for (int64_t t = 0; t < T_; ++t) {
      const int64_t o = (b * T_ + t) * C + c0;
      for (int64_t i = 0; i < n; ++i) {
        h[i] = M(to_float(a[o + i])) * h[i] + M(to_float(x[o + i]));
        h_out[o + i] = from_acc<T>(h[i]);
      }
    }
  }
}

// Backward of one channel block in chunks of kScanChunk steps, as the GPU
// does: a forward pass keeps h at each chunk start (T / kScanChunk values per
// channel), then the chunks are visited last to first, each recomputing its h
// from the checkpoint into a buffer and running the reverse scan over it.
template <typename T>
void scan_backward_impl(const LinearScanParams& p, int64_t g0, int64_t g1) {
  using M = opmath_t<T>;
  const int64_t T_ = p.time, C = p.channels, L = kScanChunk;
  const int64_t chunks = scan_chunks(T_);
  const T* a = static_cast<const T*>(p.a);
  const T* x = static_cast<const T*>(p.x);
  const T* dh = static_cast<const T*>(p.dh);
  const M* h0 = static_cast<const M*>(p.h0);
  T* da = static_cast<T*>(p.da);
  T* dx = static_cast<T*>(p.dx);
  M* dh0 = static_cast<M*>(p.dh0);
  const int64_t W = kScanCpuChannels;
  // checkpoint[k][i] = h_{kL-1} (h0 for k = 0); prev[s][i] = h_{t-1} for t = kL + s.
  std::vector<M> checkpoint(size_t(chunks * W)), prev(size_t(L * W));
  M h[kScanCpuChannels], gr[kScanCpuChannels], a_next[kScanCpuChannels];
  for (int64_t g = g0; g < g1; ++g) {
    const auto [b, c0, c1] = channel_block(p, g);
    const int64_t n = c1 - c0;
    const int64_t row = b * T_ * C + c0;
    for (int64_t i = 0; i < n; ++i) h[i] = h0 ? h0[b * C + c0 + i] : M(0);
    for (int64_t k = 0; k < chunks; ++k) {
      std::copy(h, h + n, checkpoint.begin() + k * W);
      for (int64_t t = k * L; t < std::min(T_, (k + 1) * L); ++t)
        for (int64_t i = 0; i < n; ++i)
          h[i] = M(to_float(a[row + t * C + i])) * h[i] + M(to_float(x[row + t * C + i]));
    }
    for (int64_t i = 0; i < n; ++i) gr[i] = a_next[i] = M(0);  // g_T = 0
    for (int64_t k = chunks - 1; k >= 0; --k) {
      const int64_t s = k * L, e = std::min(T_, s + L);
      std::copy(checkpoint.begin() + k * W, checkpoint.begin() + k * W + n, h);
      for (int64_t t = s; t < e; ++t)
        for (int64_t i = 0; i < n; ++i) {
          prev[size_t((t - s) * W + i)] = h[i];
          h[i] = M(to_float(a[row + t * C + i])) * h[i] + M(to_float(x[row + t * C + i]));
        }
      for (int64_t t = e - 1; t >= s; --t)
        for (int64_t i = 0; i < n; ++i) {
          const int64_t o = row + t * C + i;
          gr[i] = M(to_float(dh[o])) + a_next[i] * gr[i];
          if (dx) dx[o] = from_acc<T>(gr[i]);
          if (da) da[o] = from_acc<T>(gr[i] * prev[size_t((t - s) * W + i)]);
          a_next[i] = M(to_float(a[o]));
        }
    }
    // Here gr = g_0 and a_next = a_0 (both 0 when T = 0: no gradient reaches h0).
    if (dh0)
      for (int64_t i = 0; i < n; ++i) dh0[b * C + c0 + i] = a_next[i] * gr[i];
  }
}

}  // namespace

void causal_conv_forward_cpu(const CausalConvParams& p, int64_t g0, int64_t g1) {
  dispatch_dtype(p.dtype, [&](auto t) { conv_forward_impl<decltype(t)>(p, g0, g1); });
}
void causal_conv_backward_cpu(const CausalConvParams& p, int64_t g0, int64_t g1) {
  dispatch_dtype(p.dtype, [&](auto t) { conv_backward_impl<decltype(t)>(p, g0, g1); });
}
void linear_scan_forward_cpu(const LinearScanParams& p, int64_t g0, int64_t g1) {
  dispatch_dtype(p.dtype, [&](auto t) { scan_forward_impl<decltype(t)>(p, g0, g1); });
}
void linear_scan_backward_cpu(const LinearScanParams& p, int64_t g0, int64_t g1) {
  dispatch_dtype(p.dtype, [&](auto t) { scan_backward_impl<decltype(t)>(p, g0, g1); });
}

void gumbel_noise_cpu(const GumbelNoiseParams& p, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) p.out[i] = gumbel_at(p.key, i);
}

void gather_rows_cpu(const GatherRowsParams& p, int64_t m0, int64_t m1) {
  const char* src = static_cast<const char*>(p.src);
  char* out = static_cast<char*>(p.out);
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t r = p.index[m];
    char* dst = out + m * p.row_bytes;
    if (r >= 0 && r < p.src_rows)
      std::memcpy(dst, src + r * p.src_row_stride, size_t(p.row_bytes));
    else
      std::memset(dst, 0, size_t(p.row_bytes));
  }
}

}  // namespace unswag::kernels
