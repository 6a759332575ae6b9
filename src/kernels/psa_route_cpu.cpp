// CPU reference of the PSA router's training step (src/kernels/psa_route.h):
// the same per-token math and the same block partials as the CUDA kernels,
// so both finalize the same sums in the same order.
#include <algorithm>

#include "psa_route.h"

namespace unswag::kernels {

template <typename A>
void psa_route_forward_cpu(const PsaRouteParams<A>& p, int64_t b0, int64_t b1) {
  const int64_t tiles = p.tiles_per_row();
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t row = blk / tiles, t0 = (blk % tiles) * kRouteTile;
    const int64_t t1 = std::min<int64_t>(p.time, t0 + kRouteTile);
    A sums[kRouteSlots] = {};
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = row * p.time + t;
      const RouteToken<A> tok = route_token(p, i);
      p.route[i] = tok.route;
      for (int r = 0; r < 4; ++r) p.gates[i * 4 + r] = tok.route == r ? A(1) : A(0);
      A s[kRouteSlots];
      route_token_sums(tok, s);
      for (int k = 0; k < kRouteSlots; ++k) sums[k] += s[k];
    }
    for (int k = 0; k < kRouteSlots; ++k) p.partials[blk * kRouteSlots + k] = sums[k];
  }
}

template <typename A>
void psa_route_finalize_cpu(const PsaRouteParams<A>& p) {
  const int64_t tiles = p.tiles_per_row();
  double total[kRouteSlots] = {};
  int64_t signal_max = 0;
  for (int64_t row = 0; row < p.batch; ++row) {
    double row_signal = 0;
    for (int64_t j = 0; j < tiles; ++j) {
      const A* s = p.partials + (row * tiles + j) * kRouteSlots;
      for (int k = 0; k < kRouteSlots; ++k) total[k] += double(s[k]);
      row_signal += double(s[15]);
    }
    signal_max = std::max(signal_max, int64_t(row_signal));
  }
  route_finalize_totals(p, total);
  *p.signal_max = signal_max;
}

template <typename A>
void psa_route_backward_cpu(const PsaRouteParams<A>& p, int64_t i0, int64_t i1) {
  A dl[4] = {0, 0, 0, 0};
  if (p.grad_losses != nullptr)
    for (int k = 0; k < 4; ++k) dl[k] = p.grad_losses[k];
  const A d_load = dl[1] + p.w_load * dl[0], d_z = dl[2] + p.w_z * dl[0], d_ent = dl[3] + p.w_entropy * dl[0];
  const A inv_n = A(1) / A(p.batch * p.time);
  for (int64_t i = i0; i < i1; ++i) route_token_backward(p, i, d_load, d_z, d_ent, inv_n);
}

template void psa_route_forward_cpu<float>(const PsaRouteParams<float>&, int64_t, int64_t);
template void psa_route_forward_cpu<double>(const PsaRouteParams<double>&, int64_t, int64_t);
template void psa_route_finalize_cpu<float>(const PsaRouteParams<float>&);
template void psa_route_finalize_cpu<double>(const PsaRouteParams<double>&);
template void psa_route_backward_cpu<float>(const PsaRouteParams<float>&, int64_t, int64_t);
template void psa_route_backward_cpu<double>(const PsaRouteParams<double>&, int64_t, int64_t);

}  // namespace unswag::kernels
