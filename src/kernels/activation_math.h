// Scalar math of the activations UnSwag compresses: value and exact derivative,
// shared by the CPU reference kernels, the CUDA kernels and the few-bit table
// optimiser (which evaluates them in double). No torch, no CUDA headers needed.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define UNSWAG_HD __host__ __device__ __forceinline__
#else
#define UNSWAG_HD inline
#endif

namespace unswag::kernels {

// The activation families. kReLU2 is relu(x)^2 (Primer); kGELUTanh is the
// tanh approximation used by Gemma ("gelu_pytorch_tanh").
enum class Act : int32_t { kReLU = 0, kReLU2 = 1, kGELU = 2, kGELUTanh = 3, kSiLU = 4 };

// Overloads that resolve to the float or double libm function on host and device.
UNSWAG_HD float m_exp(float x) { return expf(x); }
UNSWAG_HD double m_exp(double x) { return exp(x); }
UNSWAG_HD float m_log(float x) { return logf(x); }
UNSWAG_HD double m_log(double x) { return log(x); }
UNSWAG_HD float m_erf(float x) { return erff(x); }
UNSWAG_HD double m_erf(double x) { return erf(x); }
UNSWAG_HD float m_erfc(float x) { return erfcf(x); }
UNSWAG_HD double m_erfc(double x) { return erfc(x); }
UNSWAG_HD float m_tanh(float x) { return tanhf(x); }
UNSWAG_HD double m_tanh(double x) { return tanh(x); }

// A product or sum rounded exactly as written: nvcc would contract a*b+c into
// one fma (rounded once) where the host compiler and ATen's separate
// elementwise kernels round twice; the _rn intrinsics are never contracted.
UNSWAG_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
UNSWAG_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
UNSWAG_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
UNSWAG_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

template <typename F>
UNSWAG_HD F sigmoid(F x) {
  return F(1) / (F(1) + m_exp(-x));
}

// f(x). relu(x) = x < 0 ? 0 : x, as torch computes it: NaN propagates and
// relu(-0) = -0.
template <typename F>
UNSWAG_HD F act_forward(Act act, F x) {
  switch (act) {
    case Act::kReLU:
      return x < F(0) ? F(0) : x;
    case Act::kReLU2: {
      const F r = x < F(0) ? F(0) : x;
      return r * r;
    }
    case Act::kGELU:
      // x Phi(x) with Phi(x) = erfc(-x / sqrt 2) / 2: no cancellation in 1 + erf for x << 0.
      return F(0.5) * x * m_erfc(x * F(-0.70710678118654752440));
    case Act::kGELUTanh: {
      // 0.5 x (1 + tanh(w)) = x sigmoid(2w), w = k (x + c x^3): no cancellation for x << 0.
      const F k = F(0.79788456080286535588);  // sqrt(2/pi)
      return x * sigmoid(F(2) * k * (x + F(0.044715) * x * x * x));
    }
    case Act::kSiLU:
    default:
      return x * sigmoid(x);
  }
}

// f'(x), the exact derivative.
//   GELU:      Phi(x) + x phi(x)
//   GELU-tanh: s + 2 x s (1 - s) k (1 + 3 c x^2),  s = sigmoid(2 k (x + c x^3))
//              (= 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 c x^2) with t = tanh(k (x + c x^3)))
//   SiLU:      s (1 + x (1 - s)),  s = sigmoid(x)
template <typename F>
UNSWAG_HD F act_derivative(Act act, F x) {
  switch (act) {
    case Act::kReLU:
      return x > F(0) ? F(1) : F(0);
    case Act::kReLU2:
      return x > F(0) ? F(2) * x : F(0);
    case Act::kGELU: {
      const F cdf = F(0.5) * m_erfc(x * F(-0.70710678118654752440));
      const F pdf = F(0.39894228040143267794) * m_exp(F(-0.5) * x * x);
      return cdf + x * pdf;
    }
    case Act::kGELUTanh: {
      const F k = F(0.79788456080286535588);
      const F c = F(0.044715);
      const F sg = sigmoid(F(2) * k * (x + c * x * x * x));
      return sg + x * F(2) * sg * (F(1) - sg) * k * (F(1) + F(3) * c * x * x);
    }
    case Act::kSiLU:
    default: {
      const F s = sigmoid(x);
      return s * (F(1) + x * (F(1) - s));
    }
  }
}

// The exact scheme for GELU / SiLU ("Tempo", NeurIPS 2022): f is decreasing
// left of its minimum x* and increasing right of it, so y = f(x) and one bit
// (x > x*) determine x. act_inverse solves f(x) = y on that branch by Newton's
// method kept inside a shrinking bracket (bisection when a step leaves it).
// Where y is below f(x*) (by rounding) it returns x*; on the left branch, where
// y is not negative (x -> -inf), it returns the bracket's far end, where
// f' ~ 0. Accuracy: exact up to the rounding of y, except near x*, where f is
// flat and an error e in y moves x by ~ sqrt(2e / f''(x*)).
template <typename F>
UNSWAG_HD F act_inverse(Act act, F y, bool right, F argmin, F fmin) {
  if (y != y) return y;
  if (!(y > fmin)) return argmin;
  F lo, hi;
  if (right) {
    lo = argmin;
    hi = (y > F(0) ? y : F(0)) + F(1);  // f(x) >= x - 0.28 for x >= 0, so f(hi) > y
  } else {
    lo = F(-30);  // f(-30) is within 3e-12 of 0 (SiLU) or underflows (GELU)
    hi = argmin;
    if (!(y < act_forward(act, lo))) return lo;
  }
  F x = F(0.5) * (lo + hi);
  for (int it = 0; it < 60; ++it) {
    const F r = act_forward(act, x) - y;
    // Shrink the bracket: f rises on the right branch and falls on the left.
    if ((r > F(0)) == right) hi = x; else lo = x;
    const F d = act_derivative(act, x);
    F next = x - r / d;
    if (!(next > lo && next < hi)) next = F(0.5) * (lo + hi);
    const F step = next > x ? next - x : x - next;
    x = next;
    if (step <= F(sizeof(F) == 4 ? 1e-7 : 1e-15) * (F(1) + (x > F(0) ? x : -x))) break;
  }
  return x;
}

inline const char* act_name(Act act) {
  switch (act) {
    case Act::kReLU: return "relu";
    case Act::kReLU2: return "relu2";
    case Act::kGELU: return "gelu";
    case Act::kGELUTanh: return "gelu_tanh";
    case Act::kSiLU: return "silu";
  }
  return "unknown";
}

}  // namespace unswag::kernels
