// Few-bit derivative codes: the optimal piecewise-constant approximation of an
// activation's derivative with 2^bits levels (Novikov et al. 2023, "Few-Bit
// Backward"), computed at run time from the activation's math, never typed in.
//
// For x ~ N(0, 1) we choose boundaries b_1 < ... < b_{L-1} (L = 2^bits) and
// values v_0..v_{L-1} minimising E[(f'(x) - v_{code(x)})^2], where
// code(x) = #{i : x > b_i}. Given the boundaries, each v_c is the conditional
// mean of f' on its interval; the boundaries are found by exact dynamic
// programming over a fine grid (optimal 1-D segmentation), then polished.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "activation_math.h"

namespace unswag::kernels {

constexpr int kMaxFewbitBits = 4;
constexpr int kMaxFewbitLevels = 1 << kMaxFewbitBits;

// The table the kernels read (passed by value into CUDA kernels).
// code(x) = number of boundaries strictly below x (NaN -> top code, see elementwise.h);
// the backward multiplies the incoming gradient by values[code].
struct FewbitTable {
  int32_t bits = 0;                             // 1..4
  float boundaries[kMaxFewbitLevels - 1] = {};  // ascending; 2^bits - 1 used
  float values[kMaxFewbitLevels] = {};          // 2^bits used
};

// What the optimiser found, in double, with its quality under N(0, 1).
struct FewbitFit {
  Act act = Act::kSiLU;
  int bits = 0;
  std::vector<double> boundaries;  // 2^bits - 1, ascending
  std::vector<double> values;      // 2^bits
  double mse = 0;                  // E[(f' - q)^2]
  double rel_l2_error = 0;         // sqrt(mse / E[f'^2])
};

// Fits the optimal table. bits in [1, 4]. ReLU's derivative is a step: its
// 1-bit table (boundary 0, values {0, 1}) is exact and is returned as such.
FewbitFit fit_fewbit_table(Act act, int bits);

// The cached table for (act, bits), computed once per process, thread-safe.
const FewbitTable& fewbit_table(Act act, int bits);

// E[(f'(x) - q(x))^2] and relative L2 error of any table under N(0, 1),
// by numerical integration (used to check tables and to report errors).
double fewbit_table_mse(Act act, const FewbitTable& table);
double fewbit_table_rel_l2_error(Act act, const FewbitTable& table);

// The point where f' = 0 between its two monotonic branches (GELU: -0.7518,
// SiLU: -1.2785, GELU-tanh close to GELU). Only for kGELU, kGELUTanh, kSiLU.
double activation_argmin(Act act);

// Markdown tables (silu, gelu, gelu_tanh, relu2 at bits 1..4, and relu at 1
// bit): boundaries, values and relative L2 error of f', from the cached fits.
// docs/fewbit.md holds its output; `unswag tables` prints it.
std::string fewbit_tables_markdown();

}  // namespace unswag::kernels
