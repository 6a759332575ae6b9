// The PSA router's training step on raw pointers (no torch): from the
// router's logits, the Gumbel-max route of every token, its straight-through
// gates, the auxiliary losses and the routing statistics, forward and
// backward, with a CPU reference (psa_route_cpu.cpp) and CUDA kernels
// (psa_route.cu) that share the per-token math below. It replaces the ~45
// ATen ops (and their backward) that route() spent per training forward:
// at short contexts the layer is bound by the host launching ops.
//
// Per token i, with l the logits [4], c the controller's bias, tau the
// temperature and g the Gumbel noise (all in the accumulation type A):
//   b = l + c,  a = b / tau,  p = softmax(a),  y = softmax(a + g)
//   route    = argmax(a + g)   (the Gumbel-max sample of p; first maximum)
//   eval     = argmax(b)       (the noise-free route eval and decode take)
//   gates    = one_hot(route)  in value; the gradient is that of y (straight-through)
//   lse_i    = logsumexp(l),   H_i = -sum_r p_r log p_r
// Over the N = B T tokens:
//   load     = sum_r (mean_i p_ir - target_r)^2
//   z        = mean_i lse_i^2,  entropy = mean_i H_i
//   aux      = w_load load + w_z z + w_entropy entropy
//   stats    = [agreement (route == eval), eval fractions [4], route fractions [4], mean p [4]]
//   signal_max = the largest per-row count of route kSignal (the packed length)
// Backward, dg the gradient of the gates and (d_aux, d_load, d_z, d_ent) that of
// the losses, d_load' = d_load + w_load d_aux (and so on):
//   da = y (dg - <y, dg>)                                   straight-through
//      + p (e - <p, e>),  e_r = d_load' 2 (mean p_r - target_r) / N
//      - d_ent' / N  p (log p + H)                            (dH/da = -p (log p + H))
//   dl = da / tau + d_z' 2 lse softmax(l) / N
//
// Layout: logits, gumbel, gates, grad [B, T, 4] contiguous; one block is a
// tile of kRouteTile tokens of one row (grid tiles_per_row x B), and writes
// its kRouteSlots sums to `partials` (fixed order: deterministic, no atomics);
// one finalize pass reduces them in double.
#pragma once

#include <cmath>
#include <cstdint>

#include "activation_math.h"  // UNSWAG_HD, m_exp, m_log

namespace unswag::kernels {

constexpr int kRouteSignal = 3;   // route 11: the signal route
constexpr int kRouteTile = 256;   // tokens per block
// Partial sums per block: p [4], lse^2, H, agreement, eval counts [4], route counts [4], signal count.
constexpr int kRouteSlots = 16;
constexpr int kRouteStats = 13;   // agreement, eval fractions [4], route fractions [4], mean p [4]

template <typename A>
struct PsaRouteParams {
  int64_t batch = 0, time = 0;  // rows B, tokens per row T
  A tau = 1;
  A w_load = 0, w_z = 0, w_entropy = 0;
  const A* logits = nullptr;  // [B, T, 4]
  const A* bias = nullptr;    // [4]
  const A* gumbel = nullptr;  // [B, T, 4]
  const A* target = nullptr;  // [4]
  // forward
  int64_t* route = nullptr;   // [B, T]
  A* gates = nullptr;         // [B, T, 4]
  A* partials = nullptr;      // [B * tiles_per_row, kRouteSlots]
  A* losses = nullptr;        // [4]: aux, load, z, entropy
  A* stats = nullptr;         // [kRouteStats]
  int64_t* signal_max = nullptr;  // [1]
  // backward
  const A* grad_gates = nullptr;   // [B, T, 4] or null (zero)
  const A* grad_losses = nullptr;  // [4] or null (zero)
  const A* mean_p = nullptr;       // [4]: stats + 9 of the forward
  A* grad_logits = nullptr;        // [B, T, 4]

  UNSWAG_HD int64_t tiles_per_row() const { return (time + kRouteTile - 1) / kRouteTile; }
  UNSWAG_HD int64_t blocks() const { return batch * tiles_per_row(); }
};

// softmax of v [4] into out, returning log-sum-exp.
template <typename A>
UNSWAG_HD A route_softmax(const A v[4], A out[4]) {
  A m = v[0];
  for (int r = 1; r < 4; ++r) m = v[r] > m ? v[r] : m;
  A s = 0;
  for (int r = 0; r < 4; ++r) {
    out[r] = m_exp(v[r] - m);
    s += out[r];
  }
  const A inv = A(1) / s;
  for (int r = 0; r < 4; ++r) out[r] *= inv;
  return m + m_log(s);
}

template <typename A>
UNSWAG_HD int route_argmax(const A v[4]) {
  int k = 0;
  for (int r = 1; r < 4; ++r)
    if (v[r] > v[k]) k = r;
  return k;
}

// One token's forward values.
template <typename A>
struct RouteToken {
  A l[4], a[4], p[4], logp[4], y[4], softmax_l[4];
  A lse_l, entropy;
  int route, eval;
};

template <typename A>
UNSWAG_HD RouteToken<A> route_token(const PsaRouteParams<A>& p, int64_t i) {
  RouteToken<A> t;
  A b[4], noisy[4];
  for (int r = 0; r < 4; ++r) {
    t.l[r] = p.logits[i * 4 + r];
    b[r] = t.l[r] + p.bias[r];
    t.a[r] = b[r] / p.tau;
    noisy[r] = t.a[r] + p.gumbel[i * 4 + r];
  }
  const A lse_a = route_softmax(t.a, t.p);
  route_softmax(noisy, t.y);
  t.lse_l = route_softmax(t.l, t.softmax_l);
  t.entropy = 0;
  for (int r = 0; r < 4; ++r) {
    t.logp[r] = t.a[r] - lse_a;
    t.entropy -= t.p[r] * t.logp[r];
  }
  t.route = route_argmax(noisy);
  t.eval = route_argmax(b);
  return t;
}

// Token i's contribution to its block's partial sums (slots as kRouteSlots says).
template <typename A>
UNSWAG_HD void route_token_sums(const RouteToken<A>& t, A s[kRouteSlots]) {
  for (int r = 0; r < 4; ++r) s[r] = t.p[r];
  s[4] = t.lse_l * t.lse_l;
  s[5] = t.entropy;
  s[6] = t.route == t.eval ? A(1) : A(0);
  for (int r = 0; r < 4; ++r) {
    s[7 + r] = t.eval == r ? A(1) : A(0);
    s[11 + r] = t.route == r ? A(1) : A(0);
  }
  s[15] = t.route == kRouteSignal ? A(1) : A(0);
}

// Token i's gradient of the logits (backward above); d = the losses' gradients
// with the aux weights folded in: (d_load', d_z', d_ent').
template <typename A>
UNSWAG_HD void route_token_backward(const PsaRouteParams<A>& p, int64_t i, A d_load, A d_z, A d_ent, A inv_n) {
  const RouteToken<A> t = route_token(p, i);
  A dg[4] = {0, 0, 0, 0};
  if (p.grad_gates != nullptr)
    for (int r = 0; r < 4; ++r) dg[r] = p.grad_gates[i * 4 + r];
  A ydg = 0, pe = 0, e[4];
  for (int r = 0; r < 4; ++r) {
    ydg += t.y[r] * dg[r];
    e[r] = d_load * 2 * (p.mean_p[r] - p.target[r]) * inv_n;
    pe += t.p[r] * e[r];
  }
  for (int r = 0; r < 4; ++r) {
    const A da = t.y[r] * (dg[r] - ydg) + t.p[r] * (e[r] - pe) - d_ent * inv_n * t.p[r] * (t.logp[r] + t.entropy);
    p.grad_logits[i * 4 + r] = da / p.tau + d_z * 2 * t.lse_l * t.softmax_l[r] * inv_n;
  }
}

// The finalize's outputs from the slot totals over all N tokens (summed in
// double): the losses [4], the stats [kRouteStats]. Shared by the CPU
// finalize and the CUDA finalize kernel's last step.
template <typename A>
UNSWAG_HD void route_finalize_totals(const PsaRouteParams<A>& p, const double total[kRouteSlots]) {
  const double inv_n = 1.0 / double(p.batch * p.time);
  double load = 0;
  for (int r = 0; r < 4; ++r) {
    const double d = total[r] * inv_n - double(p.target[r]);
    load += d * d;
  }
  const double z = total[4] * inv_n, entropy = total[5] * inv_n;
  p.losses[0] = A(double(p.w_load) * load + double(p.w_z) * z + double(p.w_entropy) * entropy);
  p.losses[1] = A(load);
  p.losses[2] = A(z);
  p.losses[3] = A(entropy);
  p.stats[0] = A(total[6] * inv_n);
  for (int r = 0; r < 4; ++r) {
    p.stats[1 + r] = A(total[7 + r] * inv_n);
    p.stats[5 + r] = A(total[11 + r] * inv_n);
    p.stats[9 + r] = A(total[r] * inv_n);
  }
}

// CPU: forward of blocks [b0, b1) (partials included); the finalize; backward
// of tokens [i0, i1).
template <typename A>
void psa_route_forward_cpu(const PsaRouteParams<A>& p, int64_t b0, int64_t b1);
template <typename A>
void psa_route_finalize_cpu(const PsaRouteParams<A>& p);
template <typename A>
void psa_route_backward_cpu(const PsaRouteParams<A>& p, int64_t i0, int64_t i1);

#ifdef UNSWAG_WITH_CUDA
// CUDA (A = float or double), on `stream` (a cudaStream_t): the forward and
// its finalize in two kernels, the backward in one; they check the launch.
template <typename A>
void psa_route_forward_cuda(const PsaRouteParams<A>& p, void* stream);
template <typename A>
void psa_route_backward_cuda(const PsaRouteParams<A>& p, void* stream);
#endif

}  // namespace unswag::kernels
