// CPU reference kernels for compressed activations and the fused-MLP
// elementwise cores (interface and code layout: elementwise.h). Written for
// clarity first; the caller parallelises over group ranges.
#include <algorithm>
#include <cmath>

#include "elementwise.h"
#include "float_types.h"

namespace unswag::kernels {
namespace {

// code(x) = number of boundaries b with !(x <= b): x > b, and NaN gets the top
// code, so the ReLU mask passes NaN's gradient as torch's threshold_backward does.
template <typename F>
inline uint32_t encode(const FewbitTable& t, F x) {
  const int nb = (1 << t.bits) - 1;
  uint32_t c = 0;
  for (int i = 0; i < nb; ++i) c += !(x <= t.boundaries[i]) ? 1u : 0u;
  return c;
}

template <typename T>
void fewbit_forward_impl(const FewbitForwardParams& p, int64_t g0, int64_t g1) {
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int k = p.table.bits;
  for (int64_t g = g0; g < g1; ++g) {
    uint32_t planes[kMaxFewbitBits] = {};
    const int64_t begin = g * kCodeGroup;
    const int64_t end = std::min(begin + kCodeGroup, p.n);
    for (int64_t i = begin; i < end; ++i) {
      const opmath_t<T> xi = to_float(x[i]);
      if (y) y[i] = from_acc<T>(act_forward(p.act, xi));
      const uint32_t c = encode(p.table, xi);
      for (int j = 0; j < k; ++j) planes[j] |= ((c >> j) & 1u) << (i - begin);
    }
    for (int j = 0; j < k; ++j) p.codes[g * k + j] = planes[j];
  }
}

template <typename T>
void fewbit_backward_impl(const FewbitBackwardParams& p, int64_t g0, int64_t g1) {
  const T* dy = static_cast<const T*>(p.grad_y);
  T* dx = static_cast<T*>(p.grad_x);
  const int k = p.table.bits;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t begin = g * kCodeGroup;
    const int64_t end = std::min(begin + kCodeGroup, p.n);
    for (int64_t i = begin; i < end; ++i) {
      uint32_t c = 0;
      for (int j = 0; j < k; ++j) c |= ((p.codes[g * k + j] >> (i - begin)) & 1u) << j;
      const opmath_t<T> v = p.table.values[c];
      // Select, not multiply, for a zero derivative: +0 even when dy is inf/nan/-x.
      dx[i] = from_acc<T>(v == 0 ? opmath_t<T>(0) : to_float(dy[i]) * v);
    }
  }
}

template <typename T>
void inverse_backward_impl(const InverseBackwardParams& p, int64_t g0, int64_t g1) {
  using acc = opmath_t<T>;
  const T* dy = static_cast<const T*>(p.grad_y);
  const T* y = static_cast<const T*>(p.y);
  T* dx = static_cast<T*>(p.grad_x);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t begin = g * kCodeGroup;
    const int64_t end = std::min(begin + kCodeGroup, p.n);
    for (int64_t i = begin; i < end; ++i) {
      const acc yi = to_float(y[i]);
      const bool right = (p.side[g] >> (i - begin)) & 1u;
      const acc x = act_inverse(p.act, yi, right, acc(p.argmin), acc(p.fmin));
      dx[i] = from_acc<T>(to_float(dy[i]) * act_derivative(p.act, x));
    }
  }
}

// Quantises x[begin, end) (one int8 group) with scale absmax / 127.
template <typename T>
void quantize_group(const T* x, int64_t begin, int64_t end, int8_t* q, float* scale) {
  float amax = 0.f;
  for (int64_t i = begin; i < end; ++i) amax = std::max(amax, float(std::fabs(to_float(x[i]))));
  const float s = amax / 127.f;
  const float inv = s > 0.f ? 1.f / s : 0.f;
  *scale = s;
  for (int64_t i = begin; i < end; ++i) {
    const float r = std::nearbyint(float(to_float(x[i])) * inv);
    q[i] = int8_t(std::max(-127.f, std::min(127.f, r)));
  }
}

template <typename T>
void gated_forward_impl(const GatedForwardParams& p, int64_t g0, int64_t g1) {
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* h = static_cast<T*>(p.h);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t begin = g * kInt8Group;
    const int64_t end = std::min(begin + kInt8Group, p.n);
    for (int64_t i = begin; i < end; ++i)
      h[i] = from_acc<T>(act_forward(p.act, to_float(gate[i])) * to_float(up[i]));
    if (p.gate_q) quantize_group(gate, begin, end, p.gate_q, p.gate_scale + g);
    if (p.up_q) quantize_group(up, begin, end, p.up_q, p.up_scale + g);
  }
}

template <typename T>
void gated_backward_impl(const GatedBackwardParams& p, int64_t g0, int64_t g1) {
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  const T* dh = static_cast<const T*>(p.grad_h);
  T* h = static_cast<T*>(p.h);
  T* dg = static_cast<T*>(p.grad_gate);
  T* du = static_cast<T*>(p.grad_up);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t begin = g * kInt8Group;
    const int64_t end = std::min(begin + kInt8Group, p.n);
    for (int64_t i = begin; i < end; ++i) {
      using acc = opmath_t<T>;
      const acc gi = gate ? to_float(gate[i]) : acc(p.gate_q[i]) * acc(p.gate_scale[g]);
      const acc ui = up ? to_float(up[i]) : acc(p.up_q[i]) * acc(p.up_scale[g]);
      const acc a = act_forward(p.act, gi);
      const acc d = to_float(dh[i]);
      if (h) h[i] = from_acc<T>(a * ui);
      du[i] = from_acc<T>(d * a);
      dg[i] = from_acc<T>(d * ui * act_derivative(p.act, gi));
    }
  }
}

template <typename T>
void quantize_int8_impl(const QuantizeInt8Params& p, int64_t g0, int64_t g1) {
  const T* x = static_cast<const T*>(p.x);
  for (int64_t g = g0; g < g1; ++g)
    quantize_group(x, g * kInt8Group, std::min((g + 1) * kInt8Group, p.n), p.q, p.scale + g);
}

template <typename T>
void dequantize_int8_impl(const DequantizeInt8Params& p, int64_t g0, int64_t g1) {
  T* x = static_cast<T*>(p.x);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t end = std::min((g + 1) * kInt8Group, p.n);
    for (int64_t i = g * kInt8Group; i < end; ++i) x[i] = from_acc<T>(opmath_t<T>(p.q[i]) * p.scale[g]);
  }
}

}  // namespace

void fewbit_forward_cpu(const FewbitForwardParams& p, int64_t g0, int64_t g1) {
  dispatch_dtype(p.dtype, [&](auto t) { fewbit_forward_impl<decltype(t)>(p, g0, g1); });
}
void fewbit_backward_cpu(const FewbitBackwardParams& p, int64_t g0, int64_t g1) {
  dispatch_dtype(p.dtype, [&](auto t) { fewbit_backward_impl<decltype(t)>(p, g0, g1); });
}
void gated_forward_cpu(const GatedForwardParams& p, int64_t g0, int64_t g1) {
  dispatch_dtype(p.dtype, [&](auto t) { gated_forward_impl<decltype(t)>(p, g0, g1); });
}
void gated_backward_cpu(const GatedBackwardParams& p, int64_t g0, int64_t g1) {
  dispatch_dtype(p.dtype, [&](auto t) { gated_backward_impl<decltype(t)>(p, g0, g1); });
}
void inverse_backward_cpu(const InverseBackwardParams& p, int64_t g0, int64_t g1) {
  dispatch_dtype(p.dtype, [&](auto t) { inverse_backward_impl<decltype(t)>(p, g0, g1); });
}
void quantize_int8_cpu(const QuantizeInt8Params& p, int64_t g0, int64_t g1) {
  dispatch_dtype(p.dtype, [&](auto t) { quantize_int8_impl<decltype(t)>(p, g0, g1); });
}
void dequantize_int8_cpu(const DequantizeInt8Params& p, int64_t g0, int64_t g1) {
  dispatch_dtype(p.dtype, [&](auto t) { dequantize_int8_impl<decltype(t)>(p, g0, g1); });
}

}  // namespace unswag::kernels
