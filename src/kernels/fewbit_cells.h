// The 3- and 4-bit few-bit encode by table lookup: code(x) = #{i : x > b_i}
// in one rounded multiply-add, one 8-byte shared-memory load and one compare,
// where a binary search over 7 or 15 boundaries spends 3 or 4 dependent loads.
// Shared by the CUDA forward kernel and its CPU test (tests/kernels).
//
// The points p_k = b_first + k w (k = 0..last, p_last = b_last) sample the
// boundaries' range with w <= min_gap / 1.5. Cell k stores B_k, the boundary
// nearest p_k, and below_k, its index (the number of boundaries under it).
// x goes to k = rint((x - b_first) / w) clamped to [0, last], so |x - p_k| <=
// w / 2 (plus float rounding, far under 0.01 w) unless clamped. The GPU
// computes k in two instructions: s = saturate((b_last - x) / (b_last -
// b_first)) by one FFMA.SAT (clamped to [0, 1], NaN to 0), then
// rint(last (1 - s)) by one FFMA that adds 1.5 * 2^23. Then
//   code(x) = below_k + [x > B_k]
// holds when no other boundary b' lies between x and B_k: such a b' would be
// no farther from p_k than x (B_k is the nearest), so |b' - B_k| <= 1.02 w,
// under the minimum gap. Clamped x lie beyond b_first or b_last, where B is
// that outer boundary and the formula is exact. NaN: s = 0 puts it in the last
// cell, and !(NaN <= b_last) adds one: the top code, as the other encodes give.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "activation_math.h"  // UNSWAG_HD
#include "fewbit_tables.h"

namespace unswag::kernels {

constexpr int kMaxFewbitCells = 64;

struct alignas(8) FewbitCell {
  float bound;     // B_k
  uint32_t below;  // its index: codes under B_k
};

// Passed by value to the forward kernel (528 bytes of parameters).
struct FewbitCells {
  float scale = 0.f, offset = 0.f;  // x scale + offset = (b_last - x) / (b_last - b_first)
  float last = 0.f;                 // the last cell's index
  int32_t count = 0;                // cells used; 0: not built (too many cells needed)
  FewbitCell cell[kMaxFewbitCells] = {};
};

// Builds the cells of a 3- or 4-bit table; count = 0 when the boundaries are
// too close together for kMaxFewbitCells cells (the kernels then search).
inline FewbitCells make_fewbit_cells(const FewbitTable& t) {
  FewbitCells c;
  const int nb = (1 << t.bits) - 1;
  if (t.bits < 3 || t.bits > kMaxFewbitBits) return c;
  const double lo = t.boundaries[0], hi = t.boundaries[nb - 1];
  double min_gap = INFINITY;
  for (int i = 0; i + 1 < nb; ++i) min_gap = std::fmin(min_gap, double(t.boundaries[i + 1]) - t.boundaries[i]);
  if (!(min_gap > 0) || !std::isfinite(hi - lo)) return c;
  const double cells = std::ceil((hi - lo) / (min_gap / 1.5)) + 1;
  if (cells > kMaxFewbitCells) return c;
  const int count = int(cells);
  const double w = (hi - lo) / (count - 1);
  c.scale = float(-1 / (hi - lo));
  c.offset = float(hi / (hi - lo));
  c.last = float(count - 1);
  c.count = count;
  for (int k = 0; k < count; ++k) {
    const double p = lo + k * w;
    int best = 0;
    for (int i = 1; i < nb; ++i)
      if (std::fabs(t.boundaries[i] - p) < std::fabs(t.boundaries[best] - p)) best = i;
    c.cell[k] = FewbitCell{t.boundaries[best], uint32_t(best)};
  }
  return c;
}

// saturate(u): u clamped to [0, 1], NaN to 0 (the FFMA.SAT modifier on the GPU).
UNSWAG_HD float fewbit_saturate(float u) {
#if defined(__CUDA_ARCH__)
  return __saturatef(u);
#else
  return u > 0.f ? (u < 1.f ? u : 1.f) : 0.f;
#endif
}

// The cell of v, in [0, last] (NaN -> last). Float math, identical on host and
// device: s = saturate(fmaf(v, scale, offset)), then last (1 - s) rounded to
// nearest by one fmaf that adds 1.5 * 2^23 (exact for the integers up to
// 2^22), whose low mantissa bits are then the integer.
UNSWAG_HD uint32_t fewbit_cell_index(float v, float scale, float offset, float last) {
  const float sat = fewbit_saturate(fmaf(v, scale, offset));
  const float r = fmaf(sat, -last, last + 12582912.f);
#if defined(__CUDA_ARCH__)
  return __float_as_uint(r) - 0x4B400000u;
#else
  uint32_t bits;
  std::memcpy(&bits, &r, 4);
  return bits - 0x4B400000u;
#endif
}

// Cell k's point p_k and the cell width w, as the float parameters give them
// (for tests).
inline double fewbit_cell_width(const FewbitCells& c) { return -1.0 / (double(c.scale) * c.last); }
inline double fewbit_cell_point(const FewbitCells& c, int k) {
  return ((1.0 - double(k) / c.last) - c.offset) / c.scale;
}

// code(v) from the cell table (cells may live in shared memory).
template <typename A>
UNSWAG_HD uint32_t fewbit_cell_code(A v, const FewbitCells& c, const FewbitCell* cells) {
  const FewbitCell e = cells[fewbit_cell_index(float(v), c.scale, c.offset, c.last)];
  return e.below + (!(v <= A(e.bound)) ? 1u : 0u);
}

// ---- bit planes of a code group (32 elements over 4 lanes) ----------------
//
// The forward writes each 32-element group's codes as kBits 32-bit words
// (word b: bit e = bit b of element e's code). A lane holds 8 codes as
// nibbles; lane q = lane & 3 of the group holds elements 8q..8q+7 and stores
// word q. Two steps (fewer instructions than gathering each plane's bits and
// or-ing them across the lanes one plane at a time):
//  1. in the lane, nibbles_to_plane_bytes: bit 4j + b -> bit 8b + j, the
//     bit-index rotation [b0 b1 j0 j1 j2] -> [j0 j1 j2 b0 b1], as four swaps
//     of index bits (delta swaps: (0,1), (0,2), (1,3), (2,4));
//  2. across the 4 lanes, a 4x4 transpose of bytes (byte b of lane q is
//     plane b of its 8 elements; lane q wants byte q of every lane): two
//     exchanges with lanes q^1 and q^2, one byte permute each.

// Swaps the bits at positions p in m with those at p + d.
UNSWAG_HD uint32_t delta_swap(uint32_t x, int d, uint32_t m) {
  const uint32_t t = ((x >> d) ^ x) & m;
  return x ^ t ^ (t << d);
}

// Nibbles (element j's code at bits 4j..4j+3) to plane bytes (plane b's bit
// j at bit 8b + j).
UNSWAG_HD uint32_t nibbles_to_plane_bytes(uint32_t nib) {
  nib = delta_swap(nib, 1, 0x22222222u);
  nib = delta_swap(nib, 3, 0x0a0a0a0au);
  nib = delta_swap(nib, 6, 0x00cc00ccu);
  return delta_swap(nib, 12, 0x0000f0f0u);
}

// PRMT: byte k of the result is byte (sel >> 4k) & 7 of the 8 bytes (a, b).
UNSWAG_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, sel);
#else
  const uint64_t v = uint64_t(a) | (uint64_t(b) << 32);
  uint32_t r = 0;
  for (int k = 0; k < 4; ++k) r |= uint32_t((v >> (8 * ((sel >> (4 * k)) & 7u))) & 0xffu) << (8 * k);
  return r;
#endif
}

// The transpose's two exchanges: `partner` is the word of lane q ^ 1 (first)
// or q ^ 2 (second). After the first, lane q holds, at byte 2k + s, plane
// 2k + (q & 1) of lane (q & 2) | s; after the second, byte r is plane q of
// lane r: word q of the group.
UNSWAG_HD uint32_t plane_exchange_1(uint32_t mine, uint32_t partner, int quad) {
  return byte_perm(mine, partner, (quad & 1) ? 0x3715u : 0x6240u);
}
UNSWAG_HD uint32_t plane_exchange_2(uint32_t mine, uint32_t partner, int quad) {
  return byte_perm(mine, partner, (quad & 2) ? 0x3276u : 0x5410u);
}

}  // namespace unswag::kernels
