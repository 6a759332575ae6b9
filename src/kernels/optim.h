// Raw-pointer interface and shared math of UnSwag's AdamW kernels (no torch
// here): the 8-bit dynamic quantization maps, block-wise quantize/dequantize,
// and the per-element AdamW update. The math is written once, as inline
// __host__ __device__ functions, so the CPU kernels (optim_cpu.cpp) and the
// CUDA kernels (optim.cu) run the same operations in the same order, and the
// CPU tests cover exactly what the GPU computes.
//
// 8-bit state (Dettmers et al., "8-bit Optimizers via Block-wise
// Quantization"): a moment tensor of n fp32 values is cut into blocks of
// `block_size` consecutive elements; block b keeps absmax[b] = max |x| over the
// block (fp32) and one byte per element, the index of the code of a 256-entry
// map nearest to x / absmax[b]. Dequantized: x ~= map[byte] * absmax[b].
//
// Bit-identical CPU and CUDA results (all but the 8-bit CUDA kernel's parameter
// update, see optim.cu): nvcc would contract a*b+c into one fma
// (rounded once) where the host compiler rounds twice, so the device path
// spells products and sums with the _rn intrinsics, which are never contracted.
// Division and sqrt are IEEE-rounded on both sides (no fast-math).
#pragma once

#include <cmath>
#include <cstdint>

#include "activation_math.h"  // UNSWAG_HD: __host__ __device__ under nvcc, inline otherwise

namespace unswag::kernels {

constexpr int kMapSize = 256;          // codes of an 8-bit map
constexpr int64_t kMinBlockSize = 256;  // the block sizes this library supports
constexpr int64_t kMaxBlockSize = 2048;

// The dynamic map (ascending, 256 fp32 codes in [-1, 1]). An 8-bit code is a
// sign bit (signed map only), then the exponent as a run of z zero bits ended
// by an indicator 1 bit, then f fraction bits that place the value linearly in
// the decade [0.1, 1] * 10^-z: value = 10^-z * (0.1 + 0.9 * (k + 0.5) / 2^f),
// k in [0, 2^f). Signed: 7 bits after the sign, f = 6 - z, z = 0..6; the
// all-zero pattern is 0 and its negative twin is spent on the code 1.0.
// Unsigned (Adam's second moment, never negative): the sign bit is spent on
// precision, f = 7 - z, z = 0..6; the all-zero pattern is 0 and the pattern
// with z = 7 (no fraction bits left) is spent on 1.0.
// So both maps hold 0 and 1 exactly; the signed map's most negative code is
// -(0.1 + 0.9 * 63.5 / 64) = -0.99296875.
void build_dynamic_map(bool is_signed, float* codes);  // codes: [kMapSize], optim_cpu.cpp

// Products and sums that the device compiler may not fuse (see the top):
// mul_rn and add_rn in activation_math.h, and these.
UNSWAG_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
UNSWAG_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
UNSWAG_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// Index of the code nearest to x in an ascending map (ties go to the lower
// code). Binary search: after the loop, lo is the largest index with
// codes[lo] <= x, or 0 when x is below every code (or NaN); then one
// comparison picks the nearer of codes[lo] and codes[lo + 1].
UNSWAG_HD uint8_t quantize_nearest(const float* codes, float x) {
  int lo = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  // Branch-free (a mask, not an if): the comparisons are data-dependent and
  // mispredicted half the time on a CPU.
  for (int step = kMapSize / 2; step > 0; step >>= 1) lo += step & -int(codes[lo + step] <= x);
  const int has_next = int(lo < kMapSize - 1);
  lo += has_next & int(sub_rn(codes[lo + has_next], x) < sub_rn(x, codes[lo]));
  return uint8_t(lo);
}

// Quantization by table lookup: what the kernels run (quantize_nearest above
// is its reference, and a test checks they agree on every kind of input).
// The nearest-code rule is monotone in x (sub_rn(c[i+1], x) falls and
// sub_rn(x, c[i]) rises as x grows), so between codes i and i + 1 there is an
// exact fp32 threshold T[i] in (c[i], c[i+1]]: the smallest x that rounds up to
// code i + 1. The code of x is then the number of thresholds <= x. The table
// holds the 255 thresholds (computed on the host by bisection over the floats
// between the two codes, so they reproduce the search bit for bit) and a
// bucket index: for the sign, the exponent and the top kQuantMantissaBits
// mantissa bits of x, the number of thresholds <= every x of that bucket. At
// most `advance` further thresholds lie inside a bucket, so `advance`
// compare-and-step rounds finish the count. For the dynamic maps advance is 1
// (a bucket is 1/128 of an octave, narrower than the maps' code spacing): two
// shared-memory reads per value (a bucket byte, a threshold) instead of the
// search's nine, and the same number of rounds for every value.
// Buckets: the bits of |x| above the top kQuantMantissaBits mantissa bits,
// less those of 2^-25: bucket (r << kQuantMantissaBits | m), r = 0..25, holds
// |x| in 2^(r - 25) * [1 + m / 128, 1 + (m + 1) / 128); bucket 0 also takes
// every smaller |x| (and zeros), the last one every larger (beyond the maps'
// [-1, 1], infinities). A shift, a subtraction and a clamp.
// Layout of a table (kQuantTableBytes, 16-byte aligned where the kernels copy
// it): float thresholds[kMapSize] (T[255] is NaN, so no round steps past the
// top code), then uint8 starts[2][kQuantBuckets] (sign 1 = negative).
constexpr int kQuantMantissaBits = 7;
constexpr int kQuantRows = 26;
constexpr int kQuantBuckets = kQuantRows << kQuantMantissaBits;
constexpr int kQuantThresholdBytes = kMapSize * int(sizeof(float));
constexpr int kQuantTableBytes = kQuantThresholdBytes + 2 * kQuantBuckets;

UNSWAG_HD uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  __builtin_memcpy(&b, &x, sizeof b);
  return b;
#endif
}

UNSWAG_HD int quant_bucket(uint32_t abs_bits) {
  const int k = int(abs_bits >> (23 - kQuantMantissaBits)) - (102 << kQuantMantissaBits);
  return k < 0 ? 0 : k > kQuantBuckets - 1 ? kQuantBuckets - 1 : k;
}

UNSWAG_HD uint8_t quantize_lookup(const uint8_t* table, int advance, float x) {
  const float* thresholds = reinterpret_cast<const float*>(table);
  const uint8_t* starts = table + kQuantThresholdBytes;
  const uint32_t bits = bits_of(x);
  int code = starts[(bits >> 31) * kQuantBuckets + quant_bucket(bits & 0x7fffffffu)];
  for (int round = 0; round < advance; ++round) code += int(x >= thresholds[code]);
  return x == x ? uint8_t(code) : uint8_t(0);  // NaN: 0, as the search gives
}

// Fills table[kQuantTableBytes] for a strictly ascending map and returns `advance`.
int build_quantize_table(const float* codes, uint8_t* table);  // optim_cpu.cpp

// x / absmax on the map's scale, as x * (1 / absmax): one division per block
// instead of one per value. A block of zeros (absmax 0) maps to 0.
UNSWAG_HD float inverse_scale(float absmax) { return absmax > 0.f ? div_rn(1.f, absmax) : 0.f; }
UNSWAG_HD float normalize(float x, float inv_absmax) { return mul_rn(x, inv_absmax); }

UNSWAG_HD float dequantize(const float* codes, uint8_t q, float absmax) { return mul_rn(codes[q], absmax); }

// The scalars of one AdamW step, computed once on the host in double from the
// options and the step count t (>= 1), then rounded to fp32:
//   bias corrections bc1 = 1 - beta1^t, bc2 = 1 - beta2^t, folded into
//   step_size = lr * sqrt(bc2) / bc1 and eps_hat = eps * sqrt(bc2), since
//   lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) = step_size * m / (sqrt(v) + eps_hat);
//   decay = 1 - lr * weight_decay (decoupled weight decay).
struct AdamWScalars {
  float beta1 = 0.9f, beta2 = 0.999f;
  float one_minus_beta1 = 0.1f, one_minus_beta2 = 0.001f;
  float step_size = 0.f, eps_hat = 0.f, decay = 1.f;
};
AdamWScalars adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                           int64_t step);  // optim_cpu.cpp

// One element of AdamW, all in fp32 (torch's order: decay, moments, update):
//   p <- p * decay;  m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
//   p <- p - step_size * m / (sqrt(v) + eps_hat)
UNSWAG_HD void adamw_update(float& p, float g, float& m, float& v, const AdamWScalars& s) {
  m = add_rn(mul_rn(s.beta1, m), mul_rn(s.one_minus_beta1, g));
  v = add_rn(mul_rn(s.beta2, v), mul_rn(s.one_minus_beta2, mul_rn(g, g)));
  const float denom = add_rn(sqrt_rn(v), s.eps_hat);
  p = sub_rn(mul_rn(p, s.decay), mul_rn(s.step_size, div_rn(m, denom)));
}

// Parameter dtypes of the optimizer kernels (gradients have the param dtype).
enum class ParamDType : int32_t { kFloat32 = 0, kBFloat16 = 1 };

// One AdamW step with 8-bit block-wise state, fused: per block, dequantize both
// moments, update them and the parameter in fp32, take the block's new absmax
// of each moment, requantize, write everything back (one pass over memory).
struct AdamW8bitParams {
  void* param = nullptr;       // [n], ParamDType, updated in place
  const void* grad = nullptr;  // [n], same dtype
  uint8_t* state1 = nullptr;   // [n] first moment, codes of map1 (signed)
  uint8_t* state2 = nullptr;   // [n] second moment, codes of map2 (unsigned)
  float* absmax1 = nullptr;    // [blocks(n)]
  float* absmax2 = nullptr;    // [blocks(n)]
  const float* map1 = nullptr;  // [kMapSize], ascending
  const float* map2 = nullptr;  // [kMapSize], ascending
  const uint8_t* qtable1 = nullptr;  // [kQuantTableBytes]: build_quantize_table(map1)
  const uint8_t* qtable2 = nullptr;  // [kQuantTableBytes]: build_quantize_table(map2)
  int32_t advance1 = 0, advance2 = 0;
  int64_t n = 0;
  int64_t block_size = 256;  // 256 or 2048
  ParamDType dtype = ParamDType::kFloat32;
  AdamWScalars s;
};

// The fp32-state twin: the same update with exp_avg / exp_avg_sq kept in fp32.
struct AdamW32bitParams {
  void* param = nullptr;
  const void* grad = nullptr;
  float* exp_avg = nullptr;     // [n]
  float* exp_avg_sq = nullptr;  // [n]
  int64_t n = 0;
  ParamDType dtype = ParamDType::kFloat32;
  AdamWScalars s;
};

// Block-wise quantization of an fp32 tensor and back (state conversion,
// tests): quantize reads x and writes q and absmax; dequantize the reverse.
struct BlockwiseParams {
  float* x = nullptr;         // [n]
  uint8_t* q = nullptr;       // [n]
  float* absmax = nullptr;    // [quant_blocks(n, block_size)]
  const float* map = nullptr;  // [kMapSize]
  const uint8_t* qtable = nullptr;  // [kQuantTableBytes]: build_quantize_table(map)
  int32_t advance = 0;
  int64_t n = 0;
  int64_t block_size = 256;
};

inline int64_t quant_blocks(int64_t n, int64_t block_size) { return (n + block_size - 1) / block_size; }
// Elements per work item of the fp32 twin's CPU kernel.
constexpr int64_t kAdamW32Chunk = 4096;

// CPU: work items [b0, b1) (quantization blocks, or kAdamW32Chunk chunks).
void adamw8bit_step_cpu(const AdamW8bitParams& p, int64_t b0, int64_t b1);
void adamw32bit_step_cpu(const AdamW32bitParams& p, int64_t c0, int64_t c1);
void quantize_blockwise_cpu(const BlockwiseParams& p, int64_t b0, int64_t b1);
void dequantize_blockwise_cpu(const BlockwiseParams& p, int64_t b0, int64_t b1);

// CUDA: the whole tensor, on `stream` (a cudaStream_t).
void adamw8bit_step_cuda(const AdamW8bitParams& p, void* stream);
void adamw32bit_step_cuda(const AdamW32bitParams& p, void* stream);
void quantize_blockwise_cuda(const BlockwiseParams& p, void* stream);
void dequantize_blockwise_cuda(const BlockwiseParams& p, void* stream);

}  // namespace unswag::kernels
