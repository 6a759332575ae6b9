// Tests of the few-bit derivative tables (src/kernels/fewbit_tables.*): error
// levels against independently computed numbers, optimality (conditional
// means by Monte-Carlo, no improving perturbation), encoder/decoder agreement,
// ReLU exactness, argument checks, argmin, the thread-safe cache, and the
// cell-table encode of the 3/4-bit CUDA forward (fewbit_cells.h, same float math).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "kernels/fewbit_cells.h"
#include "kernels/fewbit_tables.h"

namespace unswag::kernels {
namespace {

const Act kFittedActs[] = {Act::kSiLU, Act::kGELU, Act::kGELUTanh, Act::kReLU2};

double deriv(Act act, double x) { return act_derivative<double>(act, x); }

// A fresh fit per (act, bits), computed once per test binary (fits take up to
// ~0.3 s at 4 bits, and several tests use them).
const FewbitFit& fit_of(Act act, int bits) {
  static std::map<std::pair<int, int>, FewbitFit> fits;
  const auto key = std::make_pair(static_cast<int>(act), bits);
  auto it = fits.find(key);
  if (it == fits.end()) it = fits.emplace(key, fit_fewbit_table(act, bits)).first;
  return it->second;
}

FewbitTable to_table(const FewbitFit& fit) {
  FewbitTable t;
  t.bits = fit.bits;
  for (size_t i = 0; i < fit.boundaries.size(); ++i) t.boundaries[i] = static_cast<float>(fit.boundaries[i]);
  for (size_t i = 0; i < fit.values.size(); ++i) t.values[i] = static_cast<float>(fit.values[i]);
  return t;
}

// The kernels' encoder: number of boundaries strictly below x.
int code_of(const FewbitTable& t, float x) {
  int c = 0;
  for (int i = 0; i < (1 << t.bits) - 1; ++i) c += t.boundaries[i] < x ? 1 : 0;
  return c;
}

bool tables_equal(const FewbitTable& a, const FewbitTable& b) {
  if (a.bits != b.bits) return false;
  for (int i = 0; i < kMaxFewbitLevels - 1; ++i)
    if (a.boundaries[i] != b.boundaries[i]) return false;
  for (int i = 0; i < kMaxFewbitLevels; ++i)
    if (a.values[i] != b.values[i]) return false;
  return true;
}

std::vector<std::pair<Act, int>> all_valid_combos() {
  std::vector<std::pair<Act, int>> out;
  for (Act act : kFittedActs)
    for (int bits = 1; bits <= kMaxFewbitBits; ++bits) out.emplace_back(act, bits);
  out.emplace_back(Act::kReLU, 1);
  return out;
}

// First in the file on purpose: gtest runs tests in definition order, so the
// cache is still cold here and the threads really race on call_once.
TEST(FewbitCache, ConcurrentCallsGiveOneIdenticalTablePerEntry) {
  const auto combos = all_valid_combos();
  const int kThreads = 8;
  std::vector<std::vector<const FewbitTable*>> ptrs(kThreads);
  std::vector<std::vector<FewbitTable>> copies(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Each thread walks the entries from a different starting point.
      ptrs[t].resize(combos.size());
      copies[t].resize(combos.size());
      for (size_t k = 0; k < combos.size(); ++k) {
        const size_t i = (k + t * 3) % combos.size();
        const FewbitTable& table = fewbit_table(combos[i].first, combos[i].second);
        ptrs[t][i] = &table;
        copies[t][i] = table;
      }
    });
  }
  for (auto& th : threads) th.join();
  for (size_t i = 0; i < combos.size(); ++i) {
    SCOPED_TRACE(std::string(act_name(combos[i].first)) + " bits=" + std::to_string(combos[i].second));
    for (int t = 1; t < kThreads; ++t) {
      EXPECT_EQ(ptrs[t][i], ptrs[0][i]);
      EXPECT_TRUE(tables_equal(copies[t][i], copies[0][i]));
    }
  }
}

TEST(FewbitCache, CachedTableIsTheFloatRoundedFit) {
  for (const auto& [act, bits] : all_valid_combos()) {
    SCOPED_TRACE(std::string(act_name(act)) + " bits=" + std::to_string(bits));
    const FewbitTable& cached = fewbit_table(act, bits);
    EXPECT_EQ(&cached, &fewbit_table(act, bits));  // one entry, computed once
    EXPECT_EQ(cached.bits, bits);
    EXPECT_TRUE(tables_equal(cached, to_table(fit_of(act, bits))));
    // Unused slots stay zero (the kernels get the struct by value).
    for (int i = (1 << bits) - 1; i < kMaxFewbitLevels - 1; ++i) EXPECT_EQ(cached.boundaries[i], 0.0f);
    for (int i = 1 << bits; i < kMaxFewbitLevels; ++i) EXPECT_EQ(cached.values[i], 0.0f);
  }
}

// Relative L2 errors of f' under N(0,1), computed independently of this code.
// Tolerance 0.003 (the references carry 3 decimals).
TEST(FewbitFit, RelativeErrorsMatchIndependentNumbers) {
  const double silu[] = {0.291, 0.144, 0.072};
  const double gelu[] = {0.290, 0.133, 0.065};
  for (int bits = 1; bits <= 3; ++bits) {
    EXPECT_NEAR(fit_of(Act::kSiLU, bits).rel_l2_error, silu[bits - 1], 0.003) << "silu bits=" << bits;
    EXPECT_NEAR(fit_of(Act::kGELU, bits).rel_l2_error, gelu[bits - 1], 0.003) << "gelu bits=" << bits;
  }
  // GELU-tanh differs from GELU by < 1e-3 in f': its errors agree closely.
  for (int bits = 1; bits <= 4; ++bits)
    EXPECT_NEAR(fit_of(Act::kGELUTanh, bits).rel_l2_error, fit_of(Act::kGELU, bits).rel_l2_error, 1e-3) << "bits=" << bits;
}

TEST(FewbitFit, ErrorStrictlyDecreasesAndRoughlyHalvesPerBit) {
  for (Act act : kFittedActs) {
    for (int bits = 1; bits < kMaxFewbitBits; ++bits) {
      const double e0 = fit_of(act, bits).rel_l2_error;
      const double e1 = fit_of(act, bits + 1).rel_l2_error;
      EXPECT_LT(e1, e0) << act_name(act) << " bits=" << bits;
      // Each doubling of the level count roughly halves the error.
      EXPECT_GT(e1 / e0, 0.40) << act_name(act) << " bits=" << bits;
      EXPECT_LT(e1 / e0, 0.60) << act_name(act) << " bits=" << bits;
    }
  }
}

TEST(FewbitFit, ShapeAndReportedErrorsAgreeWithIndependentQuadrature) {
  for (Act act : kFittedActs) {
    for (int bits = 1; bits <= kMaxFewbitBits; ++bits) {
      SCOPED_TRACE(std::string(act_name(act)) + " bits=" + std::to_string(bits));
      const FewbitFit& fit = fit_of(act, bits);
      EXPECT_EQ(fit.act, act);
      EXPECT_EQ(fit.bits, bits);
      ASSERT_EQ(fit.boundaries.size(), static_cast<size_t>((1 << bits) - 1));
      ASSERT_EQ(fit.values.size(), static_cast<size_t>(1 << bits));
      for (double b : fit.boundaries) EXPECT_TRUE(std::isfinite(b));
      for (double v : fit.values) EXPECT_TRUE(std::isfinite(v));
      for (size_t i = 1; i < fit.boundaries.size(); ++i) EXPECT_LT(fit.boundaries[i - 1], fit.boundaries[i]);
      const FewbitTable table = to_table(fit);
      for (int i = 1; i < (1 << bits) - 1; ++i) EXPECT_LT(table.boundaries[i - 1], table.boundaries[i]);
      // The optimiser's prefix-sum moments vs the adaptive-Simpson integrator:
      // float rounding of an optimal table changes the mse only to 2nd order.
      EXPECT_GT(fit.mse, 0);
      EXPECT_NEAR(fewbit_table_mse(act, table), fit.mse, 1e-7 * fit.mse);
      EXPECT_NEAR(fewbit_table_rel_l2_error(act, table), fit.rel_l2_error, 1e-7 * fit.rel_l2_error);
    }
  }
}

// Values are conditional means E[f'(x) | x in interval]: check against an
// independent Monte-Carlo estimate from fresh N(0,1) samples, within 5
// standard errors of the per-interval sample mean (64 comparisons in all, a
// false alarm has probability ~4e-5).
TEST(FewbitFit, ValuesAreConditionalMeansMonteCarlo) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed=" + std::to_string(seed));
  const int kSamples = 2000000;
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> xs(kSamples);
  for (double& x : xs) x = normal(rng);
  for (Act act : kFittedActs) {
    std::vector<double> d(kSamples);
    for (int i = 0; i < kSamples; ++i) d[i] = deriv(act, xs[i]);
    for (int bits = 1; bits <= kMaxFewbitBits; ++bits) {
      const FewbitFit& fit = fit_of(act, bits);
      const int levels = 1 << bits;
      std::vector<double> n(levels, 0), sum(levels, 0), sum_sq(levels, 0);
      for (int i = 0; i < kSamples; ++i) {
        const int c = static_cast<int>(std::upper_bound(fit.boundaries.begin(), fit.boundaries.end(), xs[i]) - fit.boundaries.begin());
        n[c] += 1;
        sum[c] += d[i];
        sum_sq[c] += d[i] * d[i];
      }
      for (int c = 0; c < levels; ++c) {
        ASSERT_GE(n[c], 100) << act_name(act) << " bits=" << bits << " code=" << c << ": interval too thin to test";
        const double mean = sum[c] / n[c];
        const double var = std::max(0.0, sum_sq[c] / n[c] - mean * mean) * n[c] / (n[c] - 1);
        const double se = std::sqrt(var / n[c]);
        EXPECT_NEAR(mean, fit.values[c], 5 * se + 1e-12) << act_name(act) << " bits=" << bits << " code=" << c << " n=" << n[c];
      }
    }
  }
}

// Optimality: moving any boundary or any value by +-0.01 (others fixed) must
// raise the integrated mse. Boundaries also by +-0.001: finer than the DP grid
// (1/256), so this fails if the continuous polish did not converge.
TEST(FewbitFit, NoImprovingPerturbation) {
  auto combos = all_valid_combos();
  for (const auto& [act, bits] : combos) {
    SCOPED_TRACE(std::string(act_name(act)) + " bits=" + std::to_string(bits));
    const FewbitTable base = fewbit_table(act, bits);
    const double base_mse = fewbit_table_mse(act, base);
    // The quadrature is good to ~1e-15; the smallest true increases are ~3e-8
    // (0.01 on GELU's outermost boundary) and ~3e-10 (0.001 on the same).
    for (int i = 0; i < (1 << bits) - 1; ++i) {
      for (float delta : {-0.01f, 0.01f}) {
        FewbitTable t = base;
        t.boundaries[i] += delta;
        EXPECT_GT(fewbit_table_mse(act, t), base_mse + 1e-10) << "boundary " << i << " delta " << delta;
      }
      for (float delta : {-0.001f, 0.001f}) {
        FewbitTable t = base;
        t.boundaries[i] += delta;
        EXPECT_GT(fewbit_table_mse(act, t), base_mse + 1e-13) << "boundary " << i << " delta " << delta;
      }
    }
    for (int c = 0; c < (1 << bits); ++c) {
      for (float delta : {-0.01f, 0.01f}) {
        FewbitTable t = base;
        t.values[c] += delta;
        EXPECT_GT(fewbit_table_mse(act, t), base_mse + 1e-10) << "value " << c << " delta " << delta;
      }
    }
  }
}

// f'(x) + f'(-x) = 1 for GELU, GELU-tanh, SiLU: a table and its mirror have the
// same error, and the fit breaks that tie towards more levels on x > 0.
TEST(FewbitFit, MirrorSymmetryAndTieBreak) {
  for (Act act : {Act::kSiLU, Act::kGELU, Act::kGELUTanh}) {
    for (double x : {0.1, 0.7, 1.5, 3.0}) EXPECT_NEAR(deriv(act, x) + deriv(act, -x), 1.0, 1e-15);
    for (int bits = 1; bits <= kMaxFewbitBits; ++bits) {
      SCOPED_TRACE(std::string(act_name(act)) + " bits=" + std::to_string(bits));
      const FewbitTable t = fewbit_table(act, bits);
      const int nb = (1 << bits) - 1;
      FewbitTable m = t;
      double sum = 0;
      for (int i = 0; i < nb; ++i) {
        m.boundaries[i] = -t.boundaries[nb - 1 - i];
        sum += t.boundaries[i];
      }
      for (int c = 0; c <= nb; ++c) m.values[c] = 1.0f - t.values[nb - c];
      const double mse = fewbit_table_mse(act, t);
      EXPECT_NEAR(fewbit_table_mse(act, m), mse, 1e-6 * mse);
      EXPECT_GE(sum, -1e-5);
    }
  }
}

TEST(FewbitFit, SiLUTableReachesNegativeDerivatives) {
  // SiLU' < 0 for x < -1.2785 (down to about -0.1): a 4-bit table spends a
  // level there.
  const FewbitFit& fit = fit_of(Act::kSiLU, 4);
  EXPECT_LT(*std::min_element(fit.values.begin(), fit.values.end()), 0.0);
  EXPECT_LT(fit.values.front(), 0.0);
  EXPECT_LT(deriv(Act::kSiLU, -2.0), 0.0);
}

// Encoder/decoder agreement: encode sample points with the kernels' rule
// (count of boundaries below x), decode values[code], and require the decoded
// derivative to lie in the range of f' over the interval that code denotes
// (true for a conditional mean; fails if codes and values are misaligned).
TEST(FewbitFit, DecodedDerivativeLiesInItsIntervalRange) {
  for (Act act : kFittedActs) {
    for (int bits = 1; bits <= kMaxFewbitBits; ++bits) {
      SCOPED_TRACE(std::string(act_name(act)) + " bits=" + std::to_string(bits));
      const FewbitTable& t = fewbit_table(act, bits);
      const int levels = 1 << bits;
      // Range of f' over each interval, by dense sampling (plus endpoints);
      // tails are cut at |x| = 12 where f' is at its limit to 1e-30.
      std::vector<double> lo(levels), hi(levels);
      for (int c = 0; c < levels; ++c) {
        const double a = c > 0 ? t.boundaries[c - 1] : -12.0;
        const double z = c + 1 < levels ? t.boundaries[c] : 12.0;
        lo[c] = hi[c] = deriv(act, a);
        const int kPoints = 20000;
        for (int k = 1; k <= kPoints; ++k) {
          const double d = deriv(act, a + (z - a) * k / kPoints);
          lo[c] = std::min(lo[c], d);
          hi[c] = std::max(hi[c], d);
        }
      }
      std::vector<float> xs;
      for (int k = -6000; k <= 6000; ++k) xs.push_back(k * 0.001f);
      for (int i = 0; i + 1 < levels; ++i) {
        xs.push_back(std::nextafter(t.boundaries[i], -1e9f));
        xs.push_back(t.boundaries[i]);
        xs.push_back(std::nextafter(t.boundaries[i], 1e9f));
      }
      const double tol = 1e-5;
      int failures = 0;
      for (float x : xs) {
        const int c = code_of(t, x);
        ASSERT_GE(c, 0);
        ASSERT_LT(c, levels);
        const double v = t.values[c], d = deriv(act, x);
        const bool ok = v >= lo[c] - tol && v <= hi[c] + tol && d >= lo[c] - tol && d <= hi[c] + tol;
        if (!ok && failures++ < 5) ADD_FAILURE() << "x=" << x << " code=" << c << " value=" << v << " f'=" << d << " range=[" << lo[c] << ", " << hi[c] << "]";
      }
      EXPECT_EQ(failures, 0);
    }
  }
}

TEST(FewbitFit, ReLUTableIsExact) {
  const FewbitFit fit = fit_fewbit_table(Act::kReLU, 1);
  ASSERT_EQ(fit.boundaries.size(), 1u);
  ASSERT_EQ(fit.values.size(), 2u);
  EXPECT_EQ(fit.boundaries[0], 0.0);
  EXPECT_EQ(fit.values[0], 0.0);
  EXPECT_EQ(fit.values[1], 1.0);
  EXPECT_EQ(fit.mse, 0.0);
  EXPECT_EQ(fit.rel_l2_error, 0.0);
  const FewbitTable& t = fewbit_table(Act::kReLU, 1);
  EXPECT_EQ(t.bits, 1);
  EXPECT_EQ(t.boundaries[0], 0.0f);
  EXPECT_EQ(t.values[0], 0.0f);
  EXPECT_EQ(t.values[1], 1.0f);
  EXPECT_LT(fewbit_table_mse(Act::kReLU, t), 1e-15);
  EXPECT_LT(fewbit_table_rel_l2_error(Act::kReLU, t), 1e-7);
  // The encoder reproduces the mask x > 0 (0 itself is code 0, like relu').
  EXPECT_EQ(code_of(t, 0.0f), 0);
  EXPECT_EQ(code_of(t, -0.0f), 0);
  EXPECT_EQ(code_of(t, 1e-30f), 1);
  EXPECT_EQ(code_of(t, -1e-30f), 0);
  // Extra bits cannot improve an exact table and are refused.
  for (int bits = 2; bits <= kMaxFewbitBits; ++bits) {
    EXPECT_THROW(fit_fewbit_table(Act::kReLU, bits), std::invalid_argument);
    EXPECT_THROW(fewbit_table(Act::kReLU, bits), std::invalid_argument);
  }
}

TEST(FewbitFit, InvalidArgumentsThrowWithAClearMessage) {
  for (int bits : {0, -1, 5, 32}) {
    EXPECT_THROW(fit_fewbit_table(Act::kSiLU, bits), std::invalid_argument);
    try {
      fewbit_table(Act::kGELU, bits);
      ADD_FAILURE() << "no throw for bits=" << bits;
    } catch (const std::invalid_argument& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("bits"), std::string::npos) << msg;
      EXPECT_NE(msg.find("[1, 4]"), std::string::npos) << msg;
      EXPECT_NE(msg.find("got " + std::to_string(bits)), std::string::npos) << msg;
    }
  }
  EXPECT_THROW(fit_fewbit_table(static_cast<Act>(7), 2), std::invalid_argument);
  EXPECT_THROW(fewbit_table(static_cast<Act>(-1), 2), std::invalid_argument);
  FewbitTable bad;  // bits = 0
  EXPECT_THROW(fewbit_table_mse(Act::kSiLU, bad), std::invalid_argument);
  bad.bits = 5;
  EXPECT_THROW(fewbit_table_rel_l2_error(Act::kSiLU, bad), std::invalid_argument);
}

TEST(FewbitArgmin, RootsOfTheDerivative) {
  const double gelu = activation_argmin(Act::kGELU);
  const double silu = activation_argmin(Act::kSiLU);
  const double gelu_tanh = activation_argmin(Act::kGELUTanh);
  EXPECT_NEAR(gelu, -0.75179, 1e-5);
  EXPECT_NEAR(silu, -1.27846, 1e-5);
  EXPECT_NEAR(gelu_tanh, gelu, 2e-3);
  for (auto [act, x] : {std::make_pair(Act::kGELU, gelu), std::make_pair(Act::kSiLU, silu), std::make_pair(Act::kGELUTanh, gelu_tanh)}) {
    EXPECT_LT(std::fabs(deriv(act, x)), 1e-15) << act_name(act);
    EXPECT_LT(deriv(act, x - 1e-6), 0.0) << act_name(act);
    EXPECT_GT(deriv(act, x + 1e-6), 0.0) << act_name(act);
  }
  EXPECT_THROW(activation_argmin(Act::kReLU), std::invalid_argument);
  EXPECT_THROW(activation_argmin(Act::kReLU2), std::invalid_argument);
}

TEST(FewbitMarkdown, ListsEveryFittedTable) {
  const std::string md = fewbit_tables_markdown();
  for (Act act : kFittedActs) {
    EXPECT_NE(md.find(std::string("### ") + act_name(act) + "\n"), std::string::npos) << act_name(act);
    for (int bits = 1; bits <= kMaxFewbitBits; ++bits) {
      char row[64];
      std::snprintf(row, sizeof(row), "| %d | %.4f | ", bits, fit_of(act, bits).rel_l2_error);
      const size_t section = md.find(std::string("### ") + act_name(act) + "\n");
      EXPECT_NE(md.find(row, section), std::string::npos) << act_name(act) << " " << row;
    }
  }
  EXPECT_NE(md.find("### relu\n"), std::string::npos);
}

// docs/fewbit.md must contain exactly what `unswag tables` prints. Found via
// this file's path; skipped where the source tree is not reachable.
TEST(FewbitMarkdown, DocsAreInSync) {
  std::string here = __FILE__;
  const size_t cut = here.rfind("tests/kernels/");
  if (cut == std::string::npos) GTEST_SKIP() << "source path unknown";
  std::ifstream in(here.substr(0, cut) + "docs/fewbit.md");
  if (!in) GTEST_SKIP() << "docs/fewbit.md not reachable from " << here;
  std::stringstream doc;
  doc << in.rdbuf();
  EXPECT_NE(doc.str().find(fewbit_tables_markdown()), std::string::npos) << "regenerate the tables in docs/fewbit.md with `build/unswag tables`";
}

// Float neighbours of v: v itself and `steps` ulps either side.
std::vector<float> around(float v, int steps) {
  std::vector<float> out{v};
  float up = v, down = v;
  for (int i = 0; i < steps; ++i) {
    up = std::nextafter(up, INFINITY);
    down = std::nextafter(down, -INFINITY);
    out.push_back(up);
    out.push_back(down);
  }
  return out;
}

// The CUDA forward's 3/4-bit encode (cell table, fewbit_cells.h) gives the
// code the definition gives: at every boundary and its float neighbours, at
// every cell point and its neighbours, at +-inf, NaN, huge values, and random
// x (10^6 per cached table, 2 10^4 per table with random boundaries).
TEST(FewbitCells, CellCodeIsTheBoundaryCount) {
  std::mt19937 rng(std::random_device{}());
  auto check_table = [&](const FewbitTable& t, const std::string& what, int draws) {
    SCOPED_TRACE(what);
    const FewbitCells c = make_fewbit_cells(t);
    ASSERT_GT(c.count, 1);
    ASSERT_LE(c.count, kMaxFewbitCells);
    const int top = (1 << t.bits) - 1;
    std::vector<float> xs = {INFINITY, -INFINITY, 3e38f, -3e38f, 1e20f, -1e20f, 0.f, -0.f, 1e-40f};
    for (int i = 0; i < top; ++i)
      for (float v : around(t.boundaries[i], 3)) xs.push_back(v);
    for (int k = 0; k < c.count; ++k) {
      const double p = fewbit_cell_point(c, k);
      ASSERT_EQ(int(fewbit_cell_index(float(p), c.scale, c.offset, c.last)), k) << "cell point " << p;
      for (float v : around(float(p), 2)) xs.push_back(v);
      for (float v : around(float(p + 0.5 * fewbit_cell_width(c)), 2)) xs.push_back(v);  // rounding edges
    }
    std::normal_distribution<float> normal(0.f, 1.5f);
    for (int i = 0; i < draws; ++i) xs.push_back(normal(rng));
    for (float x : xs) {
      ASSERT_EQ(int(fewbit_cell_code(x, c, c.cell)), code_of(t, x)) << "x = " << x;
      ASSERT_EQ(int(fewbit_cell_code(double(x), c, c.cell)), code_of(t, x)) << "x = " << x << " (double)";
    }
    // NaN takes the top code, as the binary search and the CPU reference give it.
    EXPECT_EQ(int(fewbit_cell_code(NAN, c, c.cell)), top);
    EXPECT_EQ(fewbit_cell_index(NAN, c.scale, c.offset, c.last), uint32_t(c.count - 1));
  };
  for (Act act : kFittedActs)
    for (int bits = 3; bits <= 4; ++bits) check_table(fewbit_table(act, bits), std::string(act_name(act)) + " " + std::to_string(bits), 1000000);
  // Random ascending boundaries whose smallest gap is a random share of the range.
  int checked = 0;
  for (int trial = 0; trial < 200; ++trial) {
    FewbitTable t;
    t.bits = 3 + trial % 2;
    const int nb = (1 << t.bits) - 1;
    std::uniform_real_distribution<float> gap(0.2f, 1.f), start(-5.f, 5.f);
    float b = start(rng);
    for (int i = 0; i < nb; ++i) {
      t.boundaries[i] = b;
      b += gap(rng);
    }
    if (make_fewbit_cells(t).count == 0) continue;  // too close for the cells: the kernels search
    check_table(t, "random trial " + std::to_string(trial), 20000);
    ++checked;
  }
  EXPECT_GE(checked, 50);
}

// Boundaries too close for kMaxFewbitCells cells: no table (the kernels fall
// back to the binary search); and 1-2 bit tables never get one.
TEST(FewbitCells, NoTableWhenBoundariesCrowd) {
  FewbitTable t;
  t.bits = 4;
  for (int i = 0; i < 15; ++i) t.boundaries[i] = float(i - 7);
  t.boundaries[8] = 0.001f;  // 0.001 apart from boundaries[7] = 0, over a range of 14
  EXPECT_EQ(make_fewbit_cells(t).count, 0);
  EXPECT_EQ(make_fewbit_cells(fewbit_table(Act::kSiLU, 2)).count, 0);
}

// The forward's plane assembly (fewbit_cells.h): 32 random codes over the 4
// lanes of a group, nibbles -> plane bytes in each lane, then the two
// exchanges emulated across the lanes; word q must hold bit b = q of every
// element's code. Also the in-lane step alone against its definition.
TEST(FewbitCells, PlaneTransposeGivesEachPlaneWord) {
  std::mt19937 rng(std::random_device{}());
  for (int trial = 0; trial < 20000; ++trial) {
    uint32_t codes[32];
    for (uint32_t& c : codes) c = rng() & 15u;
    uint32_t w[4], w1[4], w2[4];
    for (int q = 0; q < 4; ++q) {
      uint32_t nib = 0;
      for (int j = 0; j < 8; ++j) nib |= codes[8 * q + j] << (4 * j);
      w[q] = nibbles_to_plane_bytes(nib);
      uint32_t want = 0;
      for (int j = 0; j < 8; ++j)
        for (int b = 0; b < 4; ++b) want |= ((codes[8 * q + j] >> b) & 1u) << (8 * b + j);
      ASSERT_EQ(w[q], want) << std::hex << "nibbles " << nib;
    }
    for (int q = 0; q < 4; ++q) w1[q] = plane_exchange_1(w[q], w[q ^ 1], q);
    for (int q = 0; q < 4; ++q) w2[q] = plane_exchange_2(w1[q], w1[q ^ 2], q);
    for (int b = 0; b < 4; ++b) {
      uint32_t want = 0;
      for (int e = 0; e < 32; ++e) want |= ((codes[e] >> b) & 1u) << e;
      ASSERT_EQ(w2[b], want) << "plane " << b << " trial " << trial;
    }
  }
  EXPECT_EQ(byte_perm(0x03020100u, 0x07060504u, 0x3715u), 0x03070105u);
}

}  // namespace
}  // namespace unswag::kernels
