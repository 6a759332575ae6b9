// Few-bit derivative tables: fits the optimal piecewise-constant approximation
// of f' under x ~ N(0, 1) (exact DP on a fine grid, then continuous polish),
// caches one float table per (act, bits), and measures any table's error by an
// independent quadrature. Plain C++17; the math is in fewbit_tables.h and
// docs/fewbit.md.
#include "fewbit_tables.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace unswag::kernels {
namespace {

constexpr double kInvSqrt2Pi = 0.39894228040143267794;

// Integration range. The N(0,1) mass beyond |x| = 12 is ~1.8e-33, and even
// f'^2 phi for relu2 (4 x^2 phi) stays below 1e-29 there: below double
// resolution of any moment we use, so [-12, 12] *is* the real line here and
// the outermost intervals' conditional means include their whole tails.
constexpr double kLimit = 12.0;
// Grid step: 1/256 is exact in binary, so 0 (ReLU-family kink) and +-6 are
// grid edges and no quadrature cell straddles the kink.
constexpr int kCellsPerUnit = 256;
constexpr double kStep = 1.0 / kCellsPerUnit;
constexpr int kCells = static_cast<int>(2 * kLimit) * kCellsPerUnit;
// Candidate boundaries for the DP: grid edges in [-6, 6]. An optimal boundary
// beyond 6 sigma would separate < 1e-9 of the mass; the continuous polish may
// still move a boundary outside if that ever lowered the cost.
constexpr double kCandidateLimit = 6.0;
constexpr int kGaussPoints = 5;

double normal_pdf(double x) { return kInvSqrt2Pi * std::exp(-0.5 * x * x); }

double deriv(Act act, double x) { return act_derivative<double>(act, x); }

// f(x) - f(-x) = x for GELU, GELU-tanh and SiLU (f(x) = x g(x) with
// g(x) + g(-x) = 1), hence f'(x) + f'(-x) = 1.
bool has_mirror_symmetry(Act act) { return act == Act::kGELU || act == Act::kGELUTanh || act == Act::kSiLU; }

bool is_valid_act(Act act) {
  const int a = static_cast<int>(act);
  return a >= static_cast<int>(Act::kReLU) && a <= static_cast<int>(Act::kSiLU);
}

void check_act(Act act, const char* fn) {
  if (!is_valid_act(act)) {
    throw std::invalid_argument(std::string(fn) + ": argument 'act' must be one of relu, relu2, gelu, gelu_tanh, silu (0..4), got " +
                                std::to_string(static_cast<int>(act)));
  }
}

void check_bits(Act act, int bits, const char* fn) {
  check_act(act, fn);
  if (bits < 1 || bits > kMaxFewbitBits) {
    throw std::invalid_argument(std::string(fn) + ": argument 'bits' must be in [1, " + std::to_string(kMaxFewbitBits) + "], got " +
                                std::to_string(bits));
  }
  // ReLU' is the step 1[x > 0]: the 1-bit table is already exact, more levels
  // cannot lower an error of 0, so we refuse them rather than pad the table.
  if (act == Act::kReLU && bits != 1) {
    throw std::invalid_argument(std::string(fn) + ": argument 'bits' must be 1 for act 'relu' (its derivative is a step; the 1-bit table is exact), got " +
                                std::to_string(bits));
  }
}

// Gauss-Legendre rule on [-1, 1], nodes found by Newton on P_n (so no
// quadrature constants are typed in). n = 5 is exact for degree 9; on a cell of
// width 1/256 its error for these analytic integrands is below rounding.
struct GaussRule {
  std::array<double, kGaussPoints> x{};
  std::array<double, kGaussPoints> w{};
};

GaussRule make_gauss_rule() {
  GaussRule rule;
  const int n = kGaussPoints;
  const double pi = std::acos(-1.0);
  for (int i = 0; i < n; ++i) {
    double z = std::cos(pi * (i + 0.75) / (n + 0.5));
    double dp = 0;
    for (int it = 0; it < 100; ++it) {
      // Three-term recurrence for P_n(z); derivative from P_n and P_{n-1}.
      double p0 = 1, p1 = z;
      for (int k = 2; k <= n; ++k) {
        const double p2 = ((2 * k - 1) * z * p1 - (k - 1) * p0) / k;
        p0 = p1;
        p1 = p2;
      }
      dp = n * (z * p1 - p0) / (z * z - 1);
      const double dz = p1 / dp;
      z -= dz;
      if (std::fabs(dz) < 1e-16) break;
    }
    rule.x[i] = z;
    rule.w[i] = 2 / ((1 - z * z) * dp * dp);
  }
  return rule;
}

const GaussRule& gauss_rule() {
  static const GaussRule rule = make_gauss_rule();  // thread-safe static init
  return rule;
}

// The three moments of an interval I: S0 = int_I phi, S1 = int_I f' phi,
// S2 = int_I f'^2 phi. For a constant v on I the error is
// int_I (f' - v)^2 phi = S2 - 2 v S1 + v^2 S0, minimised by v = S1 / S0
// (the conditional mean E[f' | x in I]) with minimum S2 - S1^2 / S0.
struct Moments {
  double m0 = 0, m1 = 0, m2 = 0;
  Moments operator-(const Moments& o) const { return {m0 - o.m0, m1 - o.m1, m2 - o.m2}; }
  Moments operator+(const Moments& o) const { return {m0 + o.m0, m1 + o.m1, m2 + o.m2}; }
  double mean() const { return m0 > 0 ? m1 / m0 : 0.0; }
  double cost() const { return m0 > 0 ? std::max(0.0, m2 - m1 * m1 / m0) : std::max(0.0, m2); }
};

// Moments on a fine grid over [-12, 12], as prefix sums over cells, plus exact
// (Gauss-Legendre) integrals over partial cells, so moments(a, b) is available
// for any real a < b: the DP uses grid edges, the polish uses arbitrary points.
class MomentGrid {
 public:
  explicit MomentGrid(Act act) : act_(act), prefix_(kCells + 1) {
    // long double accumulation: the right tail is total - prefix, a difference
    // of O(1) numbers, so keep the prefix rounding well below tail masses.
    long double s0 = 0, s1 = 0, s2 = 0;
    for (int k = 0; k < kCells; ++k) {
      const Moments c = cell(edge(k), edge(k + 1));
      s0 += c.m0;
      s1 += c.m1;
      s2 += c.m2;
      prefix_[k + 1] = {static_cast<double>(s0), static_cast<double>(s1), static_cast<double>(s2)};
    }
  }

  static double edge(int k) { return -kLimit + k * kStep; }
  const Moments& prefix(int k) const { return prefix_[k]; }
  const Moments& total() const { return prefix_[kCells]; }

  // Moments over [a, b], with a, b clamped to the integration range.
  Moments between(double a, double b) const {
    a = std::clamp(a, -kLimit, kLimit);
    b = std::clamp(b, -kLimit, kLimit);
    if (!(a < b)) return {};
    const int ka = cell_index(a);
    const int kb = cell_index(b);
    if (ka == kb) return cell(a, b);
    // [a, edge(ka+1)] + whole cells + [edge(kb), b]
    return cell(a, edge(ka + 1)) + (prefix_[kb] - prefix_[ka + 1]) + cell(edge(kb), b);
  }

  Act act() const { return act_; }

 private:
  static int cell_index(double x) {
    const int k = static_cast<int>(std::floor((x + kLimit) * kCellsPerUnit));
    return std::clamp(k, 0, kCells - 1);
  }

  Moments cell(double a, double b) const {
    const GaussRule& rule = gauss_rule();
    const double mid = 0.5 * (a + b), half = 0.5 * (b - a);
    Moments m;
    for (int i = 0; i < kGaussPoints; ++i) {
      const double x = mid + half * rule.x[i];
      const double wp = rule.w[i] * half * normal_pdf(x);
      const double d = deriv(act_, x);
      m.m0 += wp;
      m.m1 += wp * d;
      m.m2 += wp * d * d;
    }
    return m;
  }

  Act act_;
  std::vector<Moments> prefix_;
};

// Exact optimal partition of the grid into `levels` contiguous segments
// (classic optimal 1-D segmentation): with cut positions p_0 = -12 <
// p_1 < ... < p_{L-1} < p_L = 12 restricted to grid edges,
//   D[l][q] = min_{p < q} D[l-1][p] + cost(p, q),   cost = S2 - S1^2 / S0,
// which is O(L N^2) for N candidate cuts; returns the interior cuts.
std::vector<double> dp_boundaries(const MomentGrid& grid, int levels) {
  // Cut positions: index 0 is the left end (-12), then every grid edge in
  // [-6, 6], then the right end (+12).
  const int first = static_cast<int>((kLimit - kCandidateLimit) * kCellsPerUnit);
  const int last = static_cast<int>((kLimit + kCandidateLimit) * kCellsPerUnit);
  std::vector<int> cut_edge;
  cut_edge.push_back(0);
  for (int k = first; k <= last; ++k) cut_edge.push_back(k);
  cut_edge.push_back(kCells);
  const int n = static_cast<int>(cut_edge.size());

  // Structure-of-arrays copies of the prefix moments at the cut positions,
  // for a tight inner loop.
  std::vector<double> p0(n), p1(n), p2(n);
  for (int i = 0; i < n; ++i) {
    const Moments& m = grid.prefix(cut_edge[i]);
    p0[i] = m.m0;
    p1[i] = m.m1;
    p2[i] = m.m2;
  }

  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> prev(n, inf), cur(n, inf), scratch(n);
  std::vector<std::vector<int>> from(levels + 1, std::vector<int>(n, -1));
  prev[0] = 0;
  for (int l = 1; l <= levels; ++l) {
    std::fill(cur.begin(), cur.end(), inf);
    // The l-th segment ends at q; l segments need q >= l, and the remaining
    // levels - l segments need n - 1 - q >= levels - l positions after it.
    const int q_lo = (l == levels) ? n - 1 : l;
    const int q_hi = (l == levels) ? n - 1 : n - 1 - (levels - l);
    // Positions p < l - 1 are unreachable with l - 1 segments (prev = inf).
    const double* P0 = p0.data();
    const double* P1 = p1.data();
    const double* P2 = p2.data();
    const double* D = prev.data();
    double* total = scratch.data();
    for (int q = q_lo; q <= q_hi; ++q) {
      // Two passes: the first (the divisions, nearly all the time) has no
      // loop-carried dependency and may vectorise; the argmin is cheap.
      const double q0 = P0[q], q1 = P1[q], q2 = P2[q];
      for (int p = l - 1; p < q; ++p) {
        const double s0 = q0 - P0[p];  // > 0: every segment has N(0,1) mass
        const double s1 = q1 - P1[p];
        total[p] = D[p] + (q2 - P2[p]) - s1 * s1 / s0;
      }
      double best = inf;
      int best_p = -1;
      for (int p = l - 1; p < q; ++p) {
        if (total[p] < best) {
          best = total[p];
          best_p = p;
        }
      }
      cur[q] = best;
      from[l][q] = best_p;
    }
    std::swap(prev, cur);
  }

  std::vector<double> boundaries(levels - 1);
  int q = n - 1;
  for (int l = levels; l >= 2; --l) {
    q = from[l][q];
    boundaries[l - 2] = MomentGrid::edge(cut_edge[q]);
  }
  return boundaries;
}

// Continuous polish. With values at their conditional means, the envelope
// theorem gives the exact gradient of the total error J w.r.t. boundary b_i
// between intervals with means v_lo (left) and v_hi (right):
//   dJ/db_i = phi(b_i) [(f'(b_i) - v_lo)^2 - (f'(b_i) - v_hi)^2]
//           = phi(b_i) (v_hi - v_lo) (2 f'(b_i) - v_lo - v_hi),
// zero where f'(b_i) = (v_lo + v_hi) / 2 (the Lloyd-Max condition). We do
// coordinate descent: for each boundary in turn, bisect the sign change of
// this gradient (means recomputed at every trial point) inside a bracket of a
// few grid cells around it, or move to the bracket end the gradient points to;
// sweep until no boundary moves by more than 1e-13.
void polish_boundaries(const MomentGrid& grid, std::vector<double>& b) {
  const int nb = static_cast<int>(b.size());
  const Act act = grid.act();
  auto gradient_sign_part = [&](int i, double x) {
    const double left = i > 0 ? b[i - 1] : -kLimit;
    const double right = i + 1 < nb ? b[i + 1] : kLimit;
    const double v_lo = grid.between(left, x).mean();
    const double v_hi = grid.between(x, right).mean();
    return (v_hi - v_lo) * (2 * deriv(act, x) - v_lo - v_hi);  // dJ/db / phi
  };
  // Keep boundaries strictly apart (never an empty interval).
  const double gap = 1e-9;
  for (int sweep = 0; sweep < 2000; ++sweep) {
    double max_move = 0;
    for (int i = 0; i < nb; ++i) {
      const double left = i > 0 ? b[i - 1] + gap : -kLimit + 1;
      const double right = i + 1 < nb ? b[i + 1] - gap : kLimit - 1;
      double lo = std::max(left, b[i] - 4 * kStep);
      double hi = std::min(right, b[i] + 4 * kStep);
      if (!(lo < hi)) continue;
      const double g_lo = gradient_sign_part(i, lo);
      const double g_hi = gradient_sign_part(i, hi);
      double x;
      if (g_lo <= 0 && g_hi >= 0) {
        // A minimum inside [lo, hi]: bisect to full double precision.
        for (int it = 0; it < 200; ++it) {
          const double mid = 0.5 * (lo + hi);
          if (!(mid > lo && mid < hi)) break;
          if (gradient_sign_part(i, mid) < 0) lo = mid; else hi = mid;
        }
        x = 0.5 * (lo + hi);
      } else if (g_lo > 0 && g_hi > 0) {
        x = lo;  // J increasing on the bracket: move left
      } else if (g_lo < 0 && g_hi < 0) {
        x = hi;  // J decreasing: move right
      } else {
        continue;  // a local maximum inside: keep the DP's point
      }
      max_move = std::max(max_move, std::fabs(x - b[i]));
      b[i] = x;
    }
    if (max_move < 1e-13) break;
  }
}

FewbitFit fit_from_boundaries(const MomentGrid& grid, Act act, int bits, std::vector<double> boundaries) {
  FewbitFit fit;
  fit.act = act;
  fit.bits = bits;
  fit.boundaries = std::move(boundaries);
  const int levels = 1 << bits;
  fit.values.resize(levels);
  double mse = 0;
  for (int c = 0; c < levels; ++c) {
    const double a = c > 0 ? fit.boundaries[c - 1] : -kLimit;
    const double z = c + 1 < levels ? fit.boundaries[c] : kLimit;
    const Moments m = grid.between(a, z);
    fit.values[c] = m.mean();
    mse += m.cost();
  }
  fit.mse = mse;
  const double energy = grid.total().m2;  // E[f'^2]
  fit.rel_l2_error = energy > 0 ? std::sqrt(mse / energy) : 0.0;
  return fit;
}

// Process-wide cache: one entry per (act, bits), filled once under call_once.
struct CacheEntry {
  std::once_flag once;
  FewbitFit fit;
  FewbitTable table;
};

constexpr int kNumActs = static_cast<int>(Act::kSiLU) + 1;

CacheEntry& cache_entry(Act act, int bits) {
  static std::array<std::array<CacheEntry, kMaxFewbitBits + 1>, kNumActs> cache;
  CacheEntry& e = cache[static_cast<int>(act)][bits];
  std::call_once(e.once, [&] {
    e.fit = fit_fewbit_table(act, bits);
    e.table.bits = bits;
    for (size_t i = 0; i < e.fit.boundaries.size(); ++i) e.table.boundaries[i] = static_cast<float>(e.fit.boundaries[i]);
    for (size_t i = 0; i < e.fit.values.size(); ++i) e.table.values[i] = static_cast<float>(e.fit.values[i]);
  });
  return e;
}

// Adaptive Simpson on [a, b] with absolute tolerance tol (Richardson-corrected).
// Independent of the optimiser's Gauss-Legendre prefix sums on purpose.
template <typename G>
double simpson_adaptive(const G& g, double a, double b, double fa, double fm, double fb, double whole, double tol, int depth) {
  const double m = 0.5 * (a + b);
  const double lm = 0.5 * (a + m), rm = 0.5 * (m + b);
  const double flm = g(lm), frm = g(rm);
  const double left = (m - a) / 6 * (fa + 4 * flm + fm);
  const double right = (b - m) / 6 * (fm + 4 * frm + fb);
  const double diff = left + right - whole;
  if (depth <= 0 || std::fabs(diff) <= 15 * tol) return left + right + diff / 15;
  return simpson_adaptive(g, a, m, fa, flm, fm, left, tol / 2, depth - 1) +
         simpson_adaptive(g, m, b, fm, frm, fb, right, tol / 2, depth - 1);
}

// int_a^b g(x) dx for g smooth on the open interval (a, b). Endpoint values
// are taken just inside (nextafter), i.e. as one-sided limits, so a jump of f'
// at an endpoint (ReLU at 0) does not leak in. Panels of at most 1/4 first, so
// the Gaussian's shape cannot fool the error estimate.
template <typename G>
double integrate(const G& g, double a, double b) {
  if (!(a < b)) return 0;
  const int panels = std::max(1, static_cast<int>(std::ceil((b - a) * 4)));
  const double width = (b - a) / panels;
  double sum = 0;
  for (int p = 0; p < panels; ++p) {
    const double x0 = a + p * width;
    const double x1 = p + 1 == panels ? b : a + (p + 1) * width;
    const double f0 = g(std::nextafter(x0, x1));
    const double f1 = g(std::nextafter(x1, x0));
    const double fm = g(0.5 * (x0 + x1));
    const double whole = (x1 - x0) / 6 * (f0 + 4 * fm + f1);
    sum += simpson_adaptive(g, x0, x1, f0, fm, f1, whole, 1e-17, 40);
  }
  return sum;
}

// E[f'^2] and E[(f' - q)^2] of a table, integrated piece by piece between the
// sorted breakpoints {-12, boundaries, 0, 12}: on each piece code(x) is
// constant (evaluated at the piece's midpoint, with the same "count of
// boundaries strictly below x" rule the kernels use) and f' is smooth.
struct TableIntegrals {
  double mse = 0;
  double energy = 0;
};

TableIntegrals integrate_table(Act act, const FewbitTable& table, const char* fn) {
  check_act(act, fn);
  if (table.bits < 1 || table.bits > kMaxFewbitBits) {
    throw std::invalid_argument(std::string(fn) + ": argument 'table.bits' must be in [1, " + std::to_string(kMaxFewbitBits) + "], got " +
                                std::to_string(table.bits));
  }
  const int nb = (1 << table.bits) - 1;
  std::vector<double> cuts = {-kLimit, 0.0, kLimit};
  for (int i = 0; i < nb; ++i) {
    const double b = table.boundaries[i];
    if (b > -kLimit && b < kLimit) cuts.push_back(b);  // NaN never below x: ignored
  }
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());

  TableIntegrals out;
  for (size_t k = 0; k + 1 < cuts.size(); ++k) {
    const double a = cuts[k], z = cuts[k + 1];
    const float mid = static_cast<float>(0.5 * (a + z));
    int code = 0;
    for (int i = 0; i < nb; ++i) code += (table.boundaries[i] < mid) ? 1 : 0;
    const double v = table.values[code];
    out.mse += integrate([&](double x) { const double e = deriv(act, x) - v; return e * e * normal_pdf(x); }, a, z);
    out.energy += integrate([&](double x) { const double d = deriv(act, x); return d * d * normal_pdf(x); }, a, z);
  }
  return out;
}

}  // namespace

FewbitFit fit_fewbit_table(Act act, int bits) {
  check_bits(act, bits, "fit_fewbit_table");
  if (act == Act::kReLU) {
    // f' = 1[x > 0]: boundary 0, values {0, 1} reproduce it exactly.
    FewbitFit fit;
    fit.act = act;
    fit.bits = 1;
    fit.boundaries = {0.0};
    fit.values = {0.0, 1.0};
    fit.mse = 0;
    fit.rel_l2_error = 0;
    return fit;
  }
  const MomentGrid grid(act);
  std::vector<double> boundaries = dp_boundaries(grid, 1 << bits);
  polish_boundaries(grid, boundaries);
  FewbitFit fit = fit_from_boundaries(grid, act, bits, boundaries);
  if (has_mirror_symmetry(act)) {
    // f'(x) + f'(-x) = 1 and phi is even, so (b, v) and its mirror
    // (-b reversed, 1 - v reversed) cost exactly the same. When the optimum is
    // not itself symmetric (GELU at 4 bits spends its spare level on one tail)
    // the DP's pick between the two would hinge on rounding; fix it instead:
    // keep the cheaper one, and on a tie the one with more resolution on
    // x > 0, where f' ~ 1 passes most of the gradient energy.
    const size_t nb = boundaries.size();
    std::vector<double> mirrored(nb);
    for (size_t i = 0; i < nb; ++i) mirrored[i] = -boundaries[nb - 1 - i];
    polish_boundaries(grid, mirrored);
    FewbitFit alt = fit_from_boundaries(grid, act, bits, std::move(mirrored));
    double sum_fit = 0, sum_alt = 0;
    for (size_t i = 0; i < nb; ++i) {
      sum_fit += fit.boundaries[i];
      sum_alt += alt.boundaries[i];
    }
    const double tie = 1e-12 * fit.mse;
    if (alt.mse < fit.mse - tie || (alt.mse <= fit.mse + tie && sum_alt > sum_fit + 1e-6)) fit = std::move(alt);
  }
  return fit;
}

const FewbitTable& fewbit_table(Act act, int bits) {
  check_bits(act, bits, "fewbit_table");  // validate before call_once: never throw inside it
  return cache_entry(act, bits).table;
}

double fewbit_table_mse(Act act, const FewbitTable& table) {
  return integrate_table(act, table, "fewbit_table_mse").mse;
}

double fewbit_table_rel_l2_error(Act act, const FewbitTable& table) {
  const TableIntegrals t = integrate_table(act, table, "fewbit_table_rel_l2_error");
  return t.energy > 0 ? std::sqrt(t.mse / t.energy) : 0.0;
}

double activation_argmin(Act act) {
  if (act != Act::kGELU && act != Act::kGELUTanh && act != Act::kSiLU) {
    throw std::invalid_argument(std::string("activation_argmin: argument 'act' must be gelu, gelu_tanh or silu (f' has a zero on x < 0), got ") +
                                (is_valid_act(act) ? std::string(act_name(act)) : std::to_string(static_cast<int>(act))));
  }
  // f'(0) = 1/2 > 0, and f' < 0 on (-inf, x*) for these three (f decreases
  // from 0^- at -inf to its minimum at x*), so [-4, 0] brackets the one zero.
  // Bisection until the bracket cannot shrink: the root to the last ulp.
  double lo = -4.0, hi = 0.0;
  if (!(deriv(act, lo) < 0 && deriv(act, hi) > 0)) throw std::logic_error("activation_argmin: f' does not change sign on [-4, 0]");
  for (int it = 0; it < 2000; ++it) {
    const double mid = 0.5 * (lo + hi);
    if (!(mid > lo && mid < hi)) break;
    if (deriv(act, mid) < 0) lo = mid; else hi = mid;
  }
  return std::fabs(deriv(act, lo)) <= std::fabs(deriv(act, hi)) ? lo : hi;
}

std::string fewbit_tables_markdown() {
  const Act acts[] = {Act::kSiLU, Act::kGELU, Act::kGELUTanh, Act::kReLU2};
  std::string out;
  char buf[64];
  auto join = [&](const std::vector<double>& xs) {
    std::string s;
    for (size_t i = 0; i < xs.size(); ++i) {
      // A boundary at the symmetry point comes out as +-1e-17: print 0.0000.
      const double x = std::fabs(xs[i]) < 5e-5 ? 0.0 : xs[i];
      std::snprintf(buf, sizeof(buf), "%s%.4f", i ? ", " : "", x);
      s += buf;
    }
    return s;
  };
  for (const Act act : acts) {
    out += std::string("### ") + act_name(act) + "\n\n";
    out += "| bits | rel. L2 error of f' | boundaries | values |\n";
    out += "|---:|---:|---|---|\n";
    for (int bits = 1; bits <= kMaxFewbitBits; ++bits) {
      const FewbitFit& fit = cache_entry(act, bits).fit;
      std::snprintf(buf, sizeof(buf), "| %d | %.4f | ", bits, fit.rel_l2_error);
      out += buf;
      out += join(fit.boundaries) + " | " + join(fit.values) + " |\n";
    }
    out += "\n";
  }
  out += "### relu\n\n";
  out += "| bits | rel. L2 error of f' | boundaries | values |\n";
  out += "|---:|---:|---|---|\n";
  const FewbitFit& relu = cache_entry(Act::kReLU, 1).fit;
  std::snprintf(buf, sizeof(buf), "| 1 | %.4f | ", relu.rel_l2_error);
  out += buf;
  out += join(relu.boundaries) + " | " + join(relu.values) + " |\n";
  return out;
}

}  // namespace unswag::kernels
