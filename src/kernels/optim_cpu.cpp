// CPU reference kernels of UnSwag's AdamW optimizers (interface and the shared
// per-element math: optim.h): the dynamic maps, the fused 8-bit step, the fp32
// twin, and block-wise quantize/dequantize. Written for clarity; the caller
// parallelises over ranges of blocks.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "float_types.h"
#include "optim.h"

namespace unswag::kernels {

void build_dynamic_map(bool is_signed, float* codes) {
  // Walk the decades from the largest (z = 0 leading zeros, the most fraction
  // bits) down; each holds 2^f codes at the midpoints of 2^f equal slices of
  // [0.1, 1] * 10^-z. The signed map mirrors every one of them below zero.
  const int magnitude_bits = is_signed ? 7 : 8;  // bits after the sign
  int count = 0;
  for (int zeros = 0; zeros <= 6; ++zeros) {
    const int fraction_bits = magnitude_bits - 1 - zeros;
    const int slices = 1 << fraction_bits;
    const double decade = std::pow(10.0, -zeros);
    for (int k = 0; k < slices; ++k) {
      const double value = decade * (0.1 + 0.9 * (k + 0.5) / slices);
      codes[count++] = float(value);
      if (is_signed) codes[count++] = float(-value);
    }
  }
  codes[count++] = 0.f;  // all-zero pattern
  codes[count++] = 1.f;  // the pattern left over (-0, or no fraction bits)
  std::sort(codes, codes + count);
}

AdamWScalars adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  const double bc1 = 1.0 - std::pow(beta1, double(step));
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, double(step)));
  AdamWScalars s;
  s.beta1 = float(beta1);
  s.beta2 = float(beta2);
  s.one_minus_beta1 = float(1.0 - beta1);
  s.one_minus_beta2 = float(1.0 - beta2);
  s.step_size = float(lr * bc2_sqrt / bc1);
  s.eps_hat = float(eps * bc2_sqrt);
  s.decay = float(1.0 - lr * weight_decay);
  return s;
}

namespace {

// Floats in ascending order as unsigned keys (negative floats reversed), so
// bisection over keys is bisection over the floats between two values.
uint32_t float_key(float x) {
  const uint32_t b = bits_of(x);
  return b >> 31 ? ~b : b | 0x80000000u;
}
float key_float(uint32_t k) {
  const uint32_t b = k >> 31 ? k & 0x7fffffffu : ~k;
  float x;
  __builtin_memcpy(&x, &b, sizeof x);
  return x;
}

// The smallest float x in (lo, hi] that quantize_nearest sends to hi rather
// than lo (lo < hi adjacent codes): the rule is monotone in x and holds at hi.
float rounding_threshold(float lo, float hi) {
  const auto rounds_up = [&](float x) { return sub_rn(hi, x) < sub_rn(x, lo); };
  uint32_t below = float_key(lo), at = float_key(hi);  // rounds_up false at lo, true at hi
  while (at - below > 1) {
    const uint32_t mid = below + (at - below) / 2;
    if (rounds_up(key_float(mid))) at = mid; else below = mid;
  }
  return key_float(at);
}

}  // namespace

int build_quantize_table(const float* codes, uint8_t* table) {
  float thresholds[kMapSize];
  for (int i = 0; i + 1 < kMapSize; ++i) thresholds[i] = rounding_threshold(codes[i], codes[i + 1]);
  thresholds[kMapSize - 1] = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(table, thresholds, sizeof thresholds);
  uint8_t* starts = table + kQuantThresholdBytes;
  // Bucket k of |x| is [low, high) (see optim.h); the last one also takes
  // everything larger. Every x >= 0 in it passes the thresholds <= low, every
  // x < 0 (in (-high, -low]) those <= -high; the rest it may pass lie in
  // (low, high) or (-high, -low].
  const auto count_at_or_below = [&](double bound) {
    int count = 0;
    for (int i = 0; i + 1 < kMapSize; ++i) count += int(double(thresholds[i]) <= bound);
    return count;
  };
  int advance = 0;
  for (int k = 0; k < kQuantBuckets; ++k) {
    const int row = k >> kQuantMantissaBits, m = k & ((1 << kQuantMantissaBits) - 1);
    double low = std::ldexp(1.0 + double(m) / (1 << kQuantMantissaBits), row - 25);
    double high = std::ldexp(1.0 + double(m + 1) / (1 << kQuantMantissaBits), row - 25);
    if (k == 0) low = 0;
    if (k == kQuantBuckets - 1) high = HUGE_VAL;
    starts[k] = uint8_t(count_at_or_below(low));
    starts[kQuantBuckets + k] = uint8_t(count_at_or_below(-high));
    int inside_pos = 0, inside_neg = 0;
    for (int i = 0; i + 1 < kMapSize; ++i) {
      const double t = thresholds[i];
      inside_pos += int(t > low && t < high);
      inside_neg += int(t > -high && t <= -low);
    }
    advance = std::max({advance, inside_pos, inside_neg});
  }
  return advance;
}

namespace {

template <typename T>
void adamw8bit_blocks(const AdamW8bitParams& p, int64_t b0, int64_t b1) {
  T* param = static_cast<T*>(p.param);
  const T* grad = static_cast<const T*>(p.grad);
  float m[kMaxBlockSize], v[kMaxBlockSize];  // this block's new moments, unquantized
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * p.block_size, end = std::min(begin + p.block_size, p.n);
    const float old_absmax1 = p.absmax1[b], old_absmax2 = p.absmax2[b];
    float absmax1 = 0.f, absmax2 = 0.f;
    for (int64_t i = begin; i < end; ++i) {
      float pi = to_float(param[i]);
      float& mi = m[i - begin];
      float& vi = v[i - begin];
      mi = dequantize(p.map1, p.state1[i], old_absmax1);
      vi = dequantize(p.map2, p.state2[i], old_absmax2);
      // The parameter is updated from the unquantized new moments: only the
      // state carried to the next step is rounded to 8 bits.
      adamw_update(pi, to_float(grad[i]), mi, vi, p.s);
      param[i] = from_float<T>(pi);
      absmax1 = std::fmax(absmax1, std::fabs(mi));  // fmax ignores NaN, as fmaxf does on the GPU
      absmax2 = std::fmax(absmax2, std::fabs(vi));
    }
    p.absmax1[b] = absmax1;
    p.absmax2[b] = absmax2;
    const float inv1 = inverse_scale(absmax1), inv2 = inverse_scale(absmax2);
    for (int64_t i = begin; i < end; ++i) {
      p.state1[i] = quantize_lookup(p.qtable1, p.advance1, normalize(m[i - begin], inv1));
      p.state2[i] = quantize_lookup(p.qtable2, p.advance2, normalize(v[i - begin], inv2));
    }
  }
}

template <typename T>
void adamw32bit_chunks(const AdamW32bitParams& p, int64_t c0, int64_t c1) {
  T* param = static_cast<T*>(p.param);
  const T* grad = static_cast<const T*>(p.grad);
  const int64_t end = std::min(c1 * kAdamW32Chunk, p.n);
  for (int64_t i = c0 * kAdamW32Chunk; i < end; ++i) {
    float pi = to_float(param[i]);
    adamw_update(pi, to_float(grad[i]), p.exp_avg[i], p.exp_avg_sq[i], p.s);
    param[i] = from_float<T>(pi);
  }
}

}  // namespace

void adamw8bit_step_cpu(const AdamW8bitParams& p, int64_t b0, int64_t b1) {
  if (p.dtype == ParamDType::kBFloat16)
    adamw8bit_blocks<bf16>(p, b0, b1);
  else
    adamw8bit_blocks<float>(p, b0, b1);
}

void adamw32bit_step_cpu(const AdamW32bitParams& p, int64_t c0, int64_t c1) {
  if (p.dtype == ParamDType::kBFloat16)
    adamw32bit_chunks<bf16>(p, c0, c1);
  else
    adamw32bit_chunks<float>(p, c0, c1);
}

void quantize_blockwise_cpu(const BlockwiseParams& p, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * p.block_size, end = std::min(begin + p.block_size, p.n);
    float absmax = 0.f;
    for (int64_t i = begin; i < end; ++i) absmax = std::fmax(absmax, std::fabs(p.x[i]));
    p.absmax[b] = absmax;
    const float inv = inverse_scale(absmax);
    for (int64_t i = begin; i < end; ++i) p.q[i] = quantize_lookup(p.qtable, p.advance, normalize(p.x[i], inv));
  }
}

void dequantize_blockwise_cpu(const BlockwiseParams& p, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * p.block_size, end = std::min(begin + p.block_size, p.n);
    for (int64_t i = begin; i < end; ++i) p.x[i] = dequantize(p.map, p.q[i], p.absmax[b]);
  }
}

}  // namespace unswag::kernels
