// 16-bit float storage types for the CPU reference kernels, with IEEE
// round-to-nearest-even conversions from float (what torch does), so the CPU
// kernels need no torch header. Math is always done in float ("opmath").
#pragma once

#include <cstdint>
#include <cstring>

#include "elementwise.h"  // DType

namespace unswag::kernels {

struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_float(float x) { return x; }
inline double to_float(double x) { return x; }
inline float to_float(bf16 x) { return bits_float(uint32_t(x.bits) << 16); }
inline float to_float(fp16 h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_float(sign);
  // Subnormal half: value = mant * 2^-24, exact in float.
  const float v = float(mant) * 5.9604644775390625e-8f;
  return sign ? -v : v;
}

template <typename T>
T from_float(float f);

template <>
inline float from_float<float>(float f) {
  return f;
}


// Math type: double for double storage, float for the rest.
template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

template <>
inline bf16 from_float<bf16>(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);                           // ties to even
  return bf16{uint16_t((u + rounding) >> 16)};
}

template <>
inline fp16 from_float<fp16>(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return fp16{uint16_t(sign | 0x7e00u)};  // NaN
  if (a >= 0x477ff000u) return fp16{uint16_t(sign | 0x7c00u)};  // rounds to inf (>= 65520)
  if (a < 0x38800000u) {
    // Result is subnormal or zero: value / 2^-24 rounded to nearest even integer.
    // Adding 0.5f (2^-1) aligns the binary point: float addition rounds RNE.
    const float v = bits_float(a) + 0.5f;
    return fp16{uint16_t(sign | uint16_t(float_bits(v) - float_bits(0.5f)))};
  }
  // Normal: rebias exponent (127 -> 15) and round the 13 dropped mantissa bits.
  const uint32_t mant_odd = (a >> 13) & 1u;
  const uint32_t r = a + 0xc8000fffu + mant_odd;  // -(112 << 23) + 0xfff + odd
  return fp16{uint16_t(sign | uint16_t(r >> 13))};
}

// Stores a value computed in T's math type.
template <typename T>
inline T from_acc(opmath_t<T> v) {
  return from_float<T>(v);
}
template <>
inline double from_acc<double>(double v) {
  return v;
}

// Calls fn(T{}) with the host storage type of `dtype` (the CPU kernels'
// one runtime-to-compile-time dtype switch).
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat16: fn(fp16{}); break;
    case DType::kBFloat16: fn(bf16{}); break;
    case DType::kFloat64: fn(double{}); break;
  }
}

}  // namespace unswag::kernels
