// Torch glue of the PSA router's training step (include/unswag/nn/psa_ops.h,
// math in src/kernels/psa_route.h): argument checks, the autograd function
// over the CPU and CUDA kernels, and torch.ops.unswag.psa_route. Saved for
// backward: the logits, bias, noise and target it recomputes every token's
// softmaxes from, and the [13] stats (for the mean of p); nothing [B, T, 4]
// that autograd did not already hold.
#include <torch/autograd.h>
#include <torch/library.h>

#include "kernels/psa_route.h"
#include "ops/common.h"
#include "unswag/nn/psa_ops.h"

namespace unswag {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Weights {
  double tau, load, z, entropy;
};

template <typename A>
kernels::PsaRouteParams<A> route_params(const at::Tensor& logits, const at::Tensor& bias, const at::Tensor& gumbel,
                                        const at::Tensor& target, const Weights& w) {
  kernels::PsaRouteParams<A> p;
  p.batch = logits.size(0);
  p.time = logits.size(1);
  p.tau = A(w.tau);
  p.w_load = A(w.load);
  p.w_z = A(w.z);
  p.w_entropy = A(w.entropy);
  p.logits = logits.const_data_ptr<A>();
  p.bias = bias.const_data_ptr<A>();
  p.gumbel = gumbel.const_data_ptr<A>();
  p.target = target.const_data_ptr<A>();
  return p;
}

template <typename A>
void run_forward(const kernels::PsaRouteParams<A>& p, const at::Device& device) {
  if (device.is_cpu()) {
    at::parallel_for(0, p.blocks(), 1, [&](int64_t b0, int64_t b1) { kernels::psa_route_forward_cpu(p, b0, b1); });
    kernels::psa_route_finalize_cpu(p);
    return;
  }
#ifdef UNSWAG_WITH_CUDA
  kernels::psa_route_forward_cuda(p, ops::current_cuda_stream(device));
#endif
}

template <typename A>
void run_backward(const kernels::PsaRouteParams<A>& p, const at::Device& device) {
  if (device.is_cpu()) {
    at::parallel_for(0, p.batch * p.time, 1024,
                     [&](int64_t i0, int64_t i1) { kernels::psa_route_backward_cpu(p, i0, i1); });
    return;
  }
#ifdef UNSWAG_WITH_CUDA
  kernels::psa_route_backward_cuda(p, ops::current_cuda_stream(device));
#endif
}

struct PsaRouteFunction : public torch::autograd::Function<PsaRouteFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& bias,
                               const at::Tensor& gumbel, const at::Tensor& target, double tau, double w_load,
                               double w_z, double w_entropy) {
    const auto opt = logits.options();
    const int64_t B = logits.size(0), T = logits.size(1);
    const int64_t blocks = B * ((T + kernels::kRouteTile - 1) / kernels::kRouteTile);
    at::Tensor route = at::empty({B, T}, opt.dtype(at::kLong));
    at::Tensor gates = at::empty({B, T, 4}, opt);
    at::Tensor partials = at::empty({blocks, kernels::kRouteSlots}, opt);
    at::Tensor losses = at::empty({4}, opt);
    at::Tensor stats = at::empty({kernels::kRouteStats}, opt);
    at::Tensor signal_max = at::empty({}, opt.dtype(at::kLong));
    const Weights w{tau, w_load, w_z, w_entropy};
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "psa_route", [&] {
      auto p = route_params<scalar_t>(logits, bias, gumbel, target, w);
      p.route = route.data_ptr<int64_t>();
      p.gates = gates.data_ptr<scalar_t>();
      p.partials = partials.data_ptr<scalar_t>();
      p.losses = losses.data_ptr<scalar_t>();
      p.stats = stats.data_ptr<scalar_t>();
      p.signal_max = signal_max.data_ptr<int64_t>();
      run_forward(p, logits.device());
    });
    ctx->save_for_backward({logits, bias, gumbel, target, stats});
    ctx->saved_data["tau"] = tau;
    ctx->saved_data["w_load"] = w_load;
    ctx->saved_data["w_z"] = w_z;
    ctx->saved_data["w_entropy"] = w_entropy;
    ctx->mark_non_differentiable({route, stats, signal_max});
    return {route, gates, losses, stats, signal_max};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &bias = saved[1], &gumbel = saved[2], &target = saved[3],
                     &stats = saved[4];
    const at::Tensor &d_gates = grads[1], &d_losses = grads[2];
    at::Tensor d_logits;
    if (ctx->needs_input_grad(0) && (d_gates.defined() || d_losses.defined())) {
      d_logits = at::empty_like(logits);
      const at::Tensor dg = d_gates.defined() ? d_gates.contiguous() : at::Tensor();
      const at::Tensor dl = d_losses.defined() ? d_losses.contiguous() : at::Tensor();
      const Weights w{ctx->saved_data["tau"].toDouble(), ctx->saved_data["w_load"].toDouble(),
                      ctx->saved_data["w_z"].toDouble(), ctx->saved_data["w_entropy"].toDouble()};
      AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "psa_route_backward", [&] {
        auto p = route_params<scalar_t>(logits, bias, gumbel, target, w);
        p.grad_gates = dg.defined() ? dg.const_data_ptr<scalar_t>() : nullptr;
        p.grad_losses = dl.defined() ? dl.const_data_ptr<scalar_t>() : nullptr;
        p.mean_p = stats.const_data_ptr<scalar_t>() + 9;
        p.grad_logits = d_logits.data_ptr<scalar_t>();
        run_backward(p, logits.device());
      });
    }
    return {d_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// A [4] operand in logits' dtype and on its device (a no-op for the layer's).
at::Tensor route_vector(const at::Tensor& t, const at::Tensor& logits, const char* arg) {
  constexpr const char* op = "psa_route";
  TORCH_CHECK(t.defined() && at::isFloatingType(t.scalar_type()), op, ": argument '", arg,
              "' must be a floating point tensor, got ", t.defined() ? c10::toString(t.scalar_type()) : "undefined");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == 4, op, ": argument '", arg, "' must be [4], got ", t.sizes());
  TORCH_CHECK(t.device() == logits.device(), op, ": argument '", arg, "' must be on the device of 'logits' (",
              logits.device(), "), got ", t.device());
  return t.to(logits.scalar_type()).contiguous();
}

}  // namespace

PsaRoute psa_route(const at::Tensor& logits, const at::Tensor& bias, const at::Tensor& gumbel,
                   const at::Tensor& target, double temperature, double load_weight, double z_weight,
                   double entropy_weight) {
  constexpr const char* op = "psa_route";
  TORCH_CHECK(logits.defined() && (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble), op,
              ": argument 'logits' must be float32 or float64 (the accumulation type), got ",
              logits.defined() ? c10::toString(logits.scalar_type()) : "undefined");
  TORCH_CHECK(logits.dim() == 3 && logits.size(2) == 4, op, ": argument 'logits' must be [B, T, 4], got ",
              logits.sizes());
  TORCH_CHECK(logits.size(0) * logits.size(1) > 0, op, ": argument 'logits' must hold at least one token, got ",
              logits.sizes());
  TORCH_CHECK(logits.is_cpu() || logits.is_cuda(), op, ": tensors on ", logits.device(),
              " are not supported (CPU and CUDA only)");
#ifndef UNSWAG_WITH_CUDA
  TORCH_CHECK(logits.is_cpu(), op, ": this build has no CUDA kernels, got 'logits' on ", logits.device());
#endif
  TORCH_CHECK(logits.is_cpu() || logits.size(0) <= 65535, op,
              ": on CUDA argument 'logits' may have at most 65535 rows (the grid's y), got ", logits.size(0));
  TORCH_CHECK(gumbel.defined() && gumbel.scalar_type() == logits.scalar_type() && gumbel.sizes() == logits.sizes(),
              op, ": argument 'gumbel' must be ", logits.sizes(), " of dtype ", logits.scalar_type(), ", got ",
              gumbel.defined() ? c10::toString(gumbel.scalar_type()) : "undefined", " ",
              gumbel.defined() ? gumbel.sizes() : at::IntArrayRef{});
  TORCH_CHECK(gumbel.device() == logits.device(), op, ": argument 'gumbel' must be on the device of 'logits' (",
              logits.device(), "), got ", gumbel.device());
  TORCH_CHECK(temperature > 0, op, ": argument 'temperature' must be positive, got ", temperature);
  TORCH_CHECK(load_weight >= 0 && z_weight >= 0 && entropy_weight >= 0, op,
              ": the aux loss weights must be >= 0, got load ", load_weight, ", z ", z_weight, ", entropy ",
              entropy_weight);
  const at::Tensor b = route_vector(bias, logits, "bias"), t = route_vector(target, logits, "target");
  auto out = PsaRouteFunction::apply(logits.contiguous(), b.detach(), gumbel.detach().contiguous(), t.detach(),
                                     temperature, load_weight, z_weight, entropy_weight);
  return {out[0], out[1], out[2], out[3], out[4]};
}

namespace {
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> psa_route_op(
    const at::Tensor& logits, const at::Tensor& bias, const at::Tensor& gumbel, const at::Tensor& target,
    double temperature, double load_weight, double z_weight, double entropy_weight) {
  auto r = psa_route(logits, bias, gumbel, target, temperature, load_weight, z_weight, entropy_weight);
  return {r.route, r.gates, r.losses, r.stats, r.signal_max};
}
}  // namespace

}  // namespace unswag

TORCH_LIBRARY_IMPL(unswag, CompositeImplicitAutograd, m) { m.impl("psa_route", &unswag::psa_route_op); }
