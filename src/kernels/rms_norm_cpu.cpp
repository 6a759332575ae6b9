// RMSNorm on the CPU: the reference of the math in rms_norm.h.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "float_types.h"
#include "rms_norm.h"

namespace unswag::kernels {
namespace {

template <typename T>
void forward_impl(const RmsNormParams& p, int64_t r0, int64_t r1) {
  using M = typename OpMath<T>::type;
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  T* y = static_cast<T*>(p.y);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * p.n;
    M ss = 0;
    for (int64_t j = 0; j < p.n; ++j) ss += M(to_float(xr[j])) * M(to_float(xr[j]));
    const M rstd = M(1) / std::sqrt(ss / M(p.n) + M(p.eps));
    p.rstd[r] = float(rstd);
    for (int64_t j = 0; j < p.n; ++j) {
      const M xh = M(to_float(xr[j])) * M(float(rstd));
      const M wj = M(to_float(w[j]));
      y[r * p.n + j] = p.add_one ? from_float<T>(xh * (M(1) + wj)) : from_float<T>(wj * M(to_float(from_float<T>(xh))));
    }
  }
}

template <typename T>
void backward_impl(const RmsNormParams& p, int64_t b0, int64_t b1) {
  using M = typename OpMath<T>::type;
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  std::vector<M> acc(p.dw_partial ? p.n : 0);
  for (int64_t b = b0; b < b1; ++b) {
    std::fill(acc.begin(), acc.end(), M(0));
    const int64_t r_end = std::min(p.rows, (b + 1) * kRmsRowsPerBlock);
    for (int64_t r = b * kRmsRowsPerBlock; r < r_end; ++r) {
      const M rstd = M(p.rstd[r]);
      const T *xr = x + r * p.n, *dyr = dy + r * p.n;
      M dot = 0;
      for (int64_t j = 0; j < p.n; ++j) {
        const M wj = M(to_float(w[j]));
        const M g = M(to_float(dyr[j])) * (p.add_one ? M(1) + wj : wj);
        dot += g * M(to_float(xr[j])) * rstd;
      }
      dot /= M(p.n);
      for (int64_t j = 0; j < p.n; ++j) {
        const M xh = M(to_float(xr[j])) * rstd, wj = M(to_float(w[j])), d = M(to_float(dyr[j]));
        const M g = d * (p.add_one ? M(1) + wj : wj);
        if (dx) dx[r * p.n + j] = from_float<T>(rstd * (g - xh * dot));
        if (p.dw_partial) acc[j] += d * (p.add_one ? xh : M(to_float(from_float<T>(xh))));
      }
    }
    if (p.dw_partial)
      for (int64_t j = 0; j < p.n; ++j) p.dw_partial[b * p.n + j] = float(acc[j]);
  }
}

}  // namespace

void rms_norm_forward_cpu(const RmsNormParams& p, int64_t r0, int64_t r1) {
  // float64 takes the ATen path (src/ops/rms_norm.cpp): no double instance.
  dispatch_dtype(p.dtype, [&](auto t) {
    if constexpr (!std::is_same_v<decltype(t), double>) forward_impl<decltype(t)>(p, r0, r1);
  });
}
void rms_norm_backward_cpu(const RmsNormParams& p, int64_t b0, int64_t b1) {
  dispatch_dtype(p.dtype, [&](auto t) {
    if constexpr (!std::is_same_v<decltype(t), double>) backward_impl<decltype(t)>(p, b0, b1);
  });
}

}  // namespace unswag::kernels
