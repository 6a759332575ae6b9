// Torch glue of the PSA sequence primitives (include/unswag/nn/psa_ops.h):
// argument checks, autograd functions over the raw-pointer kernels of
// src/kernels/psa.h (CPU reference and CUDA), and the registrations of
// torch.ops.unswag.causal_depthwise_conv1d / linear_scan / gated_ema_scan.
//
// Saved for backward: the conv keeps x and its (tiny) weight; the scan keeps
// a, x and h0 only and recomputes h in fp32 inside its backward (no [B, T, C]
// fp32 tensor lives between forward and backward).
// The small parameters (weight, bias, h0) may have any float dtype: the
// kernels read them in the accumulation type (fp32; fp64 for fp64 x) and
// their gradients come back in their own dtype.
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

#include "kernels/psa.h"
#include "ops/common.h"
#include "unswag/nn/psa_ops.h"

namespace unswag {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// CPU: at::parallel_for over the kernel's groups (each already a whole time
// tile or channel block, hence grain 1); CUDA: the current stream.
template <typename P>
void run_psa(const at::Device& device, const P& p, int64_t groups, void (*cpu)(const P&, int64_t, int64_t),
             void (*cuda)(const typename ops::NonDeduced<P>::type&, void*)) {
  if (device.is_cpu()) {
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) { cpu(p, g0, g1); });
    return;
  }
  ops::launch(device, p, groups, cpu, cuda);  // CUDA, or the "not supported by this build" error
}

void check_sequence(const at::Tensor& t, const char* op, const char* arg) {
  ops::check_float_tensor(t, op, arg);
  TORCH_CHECK(t.dim() == 3, op, ": argument '", arg, "' must be [B, T, C] (3 dims), got ", t.dim(), " dims ",
              t.sizes());
}

void check_parameter(const at::Tensor& t, const at::Tensor& x, const char* op, const char* arg,
                     const char* x_arg = "x") {
  ops::check_float_tensor(t, op, arg);
  TORCH_CHECK(t.device() == x.device(), op, ": argument '", arg, "' must be on the device of '", x_arg, "' (",
              x.device(), "), got ", t.device());
}

// ---- causal depthwise conv1d ----------------------------------------------

struct CausalConvFunction : public torch::autograd::Function<CausalConvFunction> {
  static kernels::CausalConvParams params(const at::Tensor& x, const at::Tensor& w_acc) {
    kernels::CausalConvParams p;
    p.dtype = ops::to_kernel_dtype(x.scalar_type());
    p.batch = x.size(0);
    p.time = x.size(1);
    p.channels = x.size(2);
    p.taps = w_acc.size(1);
    p.time_tile = kernels::conv_time_tile(p.batch, p.time, p.channels, x.is_cuda());
    p.x = x.const_data_ptr();
    p.weight = w_acc.const_data_ptr();
    return p;
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& weight,
                            const at::Tensor& bias_in, bool has_bias) {
    const at::Tensor bias = has_bias ? bias_in : at::Tensor();
    const at::Tensor x = x_in.contiguous();
    const auto acc = ops::opmath_type(x);
    const at::Tensor w_acc = weight.to(acc).contiguous();
    at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
    if (x.numel() > 0) {
      auto p = params(x, w_acc);
      const at::Tensor b_acc = bias.defined() ? bias.to(acc).contiguous() : at::Tensor();
      p.bias = b_acc.defined() ? b_acc.const_data_ptr() : nullptr;
      p.y = y.data_ptr();
      run_psa(x.device(), p, kernels::conv_groups(p), &kernels::causal_conv_forward_cpu,
              UNSWAG_CUDA_FN(causal_conv_forward_cuda));
    }
    ctx->save_for_backward({x, weight});
    ctx->saved_data["has_bias"] = bias.defined();
    ctx->saved_data["bias_dtype"] = bias.defined() ? bias.scalar_type() : weight.scalar_type();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const auto acc = ops::opmath_type(x);
    const at::Tensor w_acc = weight.to(acc).contiguous();
    const int64_t C = x.size(2), K = weight.size(1);
    const at::Tensor dy = grads[0].contiguous();
    auto p = params(x, w_acc);
    p.dy = dy.const_data_ptr();
    const int64_t groups = kernels::conv_groups(p);
    at::Tensor dx, dw_partial, db_partial;
    if (ctx->needs_input_grad(0)) {
      dx = at::empty_like(x, at::MemoryFormat::Contiguous);
      p.dx = dx.data_ptr();
    }
    if (ctx->needs_input_grad(1)) {
      dw_partial = at::empty({groups, K, C}, x.options().dtype(acc));
      p.dweight_partial = dw_partial.data_ptr();
    }
    if (has_bias && ctx->needs_input_grad(2)) {
      db_partial = at::empty({groups, C}, x.options().dtype(acc));
      p.dbias_partial = db_partial.data_ptr();
    }
    if (x.numel() > 0 && (p.dx || p.dweight_partial || p.dbias_partial))
      run_psa(x.device(), p, groups, &kernels::causal_conv_backward_cpu, UNSWAG_CUDA_FN(causal_conv_backward_cuda));
    // The per-group partials reduced by one deterministic sum (zeros when there are no groups).
    at::Tensor dw, db;
    if (dw_partial.defined()) dw = dw_partial.sum(0).t().contiguous().to(weight.scalar_type());
    if (db_partial.defined()) db = db_partial.sum(0).to(ctx->saved_data["bias_dtype"].toScalarType());
    return {dx, dw, db, at::Tensor()};
  }
};

// ---- linear scan ------------------------------------------------------------

struct LinearScanFunction : public torch::autograd::Function<LinearScanFunction> {
  static kernels::LinearScanParams params(const at::Tensor& a, const at::Tensor& x) {
    kernels::LinearScanParams p;
    p.dtype = ops::to_kernel_dtype(x.scalar_type());
    p.batch = x.size(0);
    p.time = x.size(1);
    p.channels = x.size(2);
    p.a = a.const_data_ptr();
    p.x = x.const_data_ptr();
    return p;
  }

  static at::Tensor workspace(const kernels::LinearScanParams& p, const at::Tensor& x, bool backward) {
    if (!x.is_cuda()) return {};
    return at::empty({kernels::scan_cuda_workspace_elems(p, backward)}, x.options().dtype(ops::opmath_type(x)));
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a_in, const at::Tensor& x_in,
                            const at::Tensor& h0_in, bool has_h0) {
    const at::Tensor h0 = has_h0 ? h0_in : at::Tensor();
    const at::Tensor a = a_in.contiguous(), x = x_in.contiguous();
    const at::Tensor h0_acc = h0.defined() ? h0.to(ops::opmath_type(x)).contiguous() : at::Tensor();
    at::Tensor h = at::empty_like(x, at::MemoryFormat::Contiguous);
    if (x.numel() > 0) {
      auto p = params(a, x);
      p.h0 = h0_acc.defined() ? h0_acc.const_data_ptr() : nullptr;
      p.h = h.data_ptr();
      const at::Tensor ws = workspace(p, x, false);
      p.workspace = ws.defined() ? ws.data_ptr() : nullptr;
      run_psa(x.device(), p, kernels::scan_cpu_groups(p), &kernels::linear_scan_forward_cpu,
              UNSWAG_CUDA_FN(linear_scan_forward_cuda));
    }
    ctx->save_for_backward({a, x, h0_in});
    ctx->saved_data["has_h0"] = has_h0;
    return h;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &a = saved[0], &x = saved[1];
    const at::Tensor h0 = ctx->saved_data["has_h0"].toBool() ? saved[2] : at::Tensor();
    const auto acc = ops::opmath_type(x);
    const at::Tensor dh = grads[0].contiguous();
    const bool want_a = ctx->needs_input_grad(0), want_x = ctx->needs_input_grad(1);
    const bool want_h0 = h0.defined() && ctx->needs_input_grad(2);
    at::Tensor da, dx, dh0;
    if (want_a) da = at::empty_like(x, at::MemoryFormat::Contiguous);
    if (want_x) dx = at::empty_like(x, at::MemoryFormat::Contiguous);
    // dh0 is zero when T = 0 (the kernels then do not run).
    if (want_h0) dh0 = at::zeros({x.size(0), x.size(2)}, x.options().dtype(acc));
    if (x.numel() > 0 && (want_a || want_x || want_h0)) {
      const at::Tensor h0_acc = h0.defined() ? h0.to(acc).contiguous() : at::Tensor();
      auto p = params(a, x);
      p.h0 = h0_acc.defined() ? h0_acc.const_data_ptr() : nullptr;
      p.dh = dh.const_data_ptr();
      p.da = want_a ? da.data_ptr() : nullptr;
      p.dx = want_x ? dx.data_ptr() : nullptr;
      p.dh0 = want_h0 ? dh0.data_ptr() : nullptr;
      const at::Tensor ws = workspace(p, x, true);
      p.workspace = ws.defined() ? ws.data_ptr() : nullptr;
      run_psa(x.device(), p, kernels::scan_cpu_groups(p), &kernels::linear_scan_backward_cpu,
              UNSWAG_CUDA_FN(linear_scan_backward_cuda));
    }
    if (dh0.defined()) dh0 = dh0.to(h0.scalar_type());
    return {da, dx, dh0, at::Tensor()};
  }
};

// ---- gated EMA scan -----------------------------------------------------------

// h_t = (1 - z_t f) h_{t-1} + z_t f v_t on CUDA in the fused kernels (the scan
// kernels' EMA form, src/kernels/psa.h): a and x are formed on the fly, so
// nothing of [B, T, C] in fp32 is written, and the backward returns dv, dz and
// df (deterministic partial sums) from one replay.
struct GatedEmaScanFunction : public torch::autograd::Function<GatedEmaScanFunction> {
  static kernels::LinearScanParams params(const at::Tensor& v, const at::Tensor& z, const at::Tensor& f,
                                          const at::Tensor& h0) {
    kernels::LinearScanParams p;
    p.dtype = ops::to_kernel_dtype(v.scalar_type());
    p.batch = v.size(0);
    p.time = v.size(1);
    p.channels = v.size(2);
    p.x = v.const_data_ptr();
    p.z = z.const_data_ptr();
    p.f = f.const_data_ptr();
    p.h0 = h0.defined() ? h0.const_data_ptr() : nullptr;
    return p;
  }

  // v [B, T, C] contiguous; z [B, T], f [C] and h0 (placeholder unless has_h0) in A.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& v_in, const at::Tensor& z_in,
                               const at::Tensor& f_in, const at::Tensor& h0_in, bool has_h0) {
    const at::Tensor v = v_in.contiguous(), z = z_in.contiguous(), f = f_in.contiguous();
    const at::Tensor h0 = has_h0 ? h0_in.contiguous() : at::Tensor();
    const int64_t B = v.size(0), T = v.size(1), C = v.size(2);
    at::Tensor h = at::empty_like(v, at::MemoryFormat::Contiguous);
    at::Tensor last = T == 0 ? (h0.defined() ? h0.clone() : at::zeros({B, C}, z.options()))
                             : at::empty({B, C}, z.options());
    if (v.numel() > 0) {
      auto p = params(v, z, f, h0);
      p.h = h.data_ptr();
      p.last = last.data_ptr();
      const at::Tensor ws = at::empty({kernels::scan_cuda_workspace_elems(p, false)}, z.options());
      p.workspace = ws.data_ptr();
      ops::launch(v.device(), p, 0, &kernels::linear_scan_forward_cpu, UNSWAG_CUDA_FN(linear_scan_forward_cuda));
    }
    ctx->save_for_backward({v, z, f, h0_in});
    ctx->saved_data["has_h0"] = has_h0;
    ctx->mark_non_differentiable({last});
    return {h, last};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &v = saved[0], &z = saved[1], &f = saved[2];
    const at::Tensor h0 = ctx->saved_data["has_h0"].toBool() ? saved[3].contiguous() : at::Tensor();
    const int64_t B = v.size(0), T = v.size(1), C = v.size(2);
    const bool want_h0 = h0.defined() && ctx->needs_input_grad(3);
    at::Tensor dv = ctx->needs_input_grad(0) ? at::empty_like(v, at::MemoryFormat::Contiguous) : at::Tensor();
    at::Tensor dz = at::zeros({B, T}, z.options()), df = at::zeros({C}, z.options());
    at::Tensor dh0 = want_h0 ? at::zeros({B, C}, z.options()) : at::Tensor();
    if (!grads[0].defined() || v.numel() == 0) {
      if (dv.defined()) dv.zero_();
      return {dv, dz, df, dh0, at::Tensor()};
    }
    const at::Tensor dh = grads[0].contiguous();
    auto p = params(v, z, f, h0);
    const int64_t chunks = kernels::scan_chunks(T);
    const at::Tensor dz_part = at::empty({B, T, C / 32}, z.options());
    const at::Tensor df_part = at::empty({B * chunks, C}, z.options());
    const at::Tensor ws = at::empty({kernels::scan_cuda_workspace_elems(p, true)}, z.options());
    p.dh = dh.const_data_ptr();
    p.dx = dv.defined() ? dv.data_ptr() : nullptr;
    p.dh0 = want_h0 ? dh0.data_ptr() : nullptr;
    p.dz_partial = dz_part.data_ptr();
    p.df_partial = df_part.data_ptr();
    p.workspace = ws.data_ptr();
    ops::launch(v.device(), p, 0, &kernels::linear_scan_backward_cpu, UNSWAG_CUDA_FN(linear_scan_backward_cuda));
    return {dv, dz_part.sum(-1), df_part.sum(0), dh0, at::Tensor()};
  }
};

}  // namespace

at::Tensor causal_depthwise_conv1d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  constexpr const char* op = "causal_depthwise_conv1d";
  check_sequence(x, op, "x");
  check_parameter(weight, x, op, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == x.size(2), op, ": argument 'weight' must be [C, K] with C = ",
              x.size(2), " (x's channels), got ", weight.sizes());
  TORCH_CHECK(weight.size(1) >= 1, op, ": argument 'weight' must have K >= 1 taps, got ", weight.sizes());
  if (bias.defined()) {
    check_parameter(bias, x, op, "bias");
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == x.size(2), op, ": argument 'bias' must be [C] with C = ",
                x.size(2), ", got ", bias.sizes());
  }
  // Autograd functions take defined tensors only: an absent bias travels as an empty placeholder.
  return CausalConvFunction::apply(x, weight, bias.defined() ? bias : at::empty({0}, x.options()),
                                   bias.defined());
}

at::Tensor linear_scan(const at::Tensor& a, const at::Tensor& x, const at::Tensor& h0) {
  constexpr const char* op = "linear_scan";
  check_sequence(x, op, "x");
  ops::check_float_tensor(a, op, "a");
  ops::check_same(a, x, op, "a", "x", true);
  if (h0.defined()) {
    check_parameter(h0, x, op, "h0");
    TORCH_CHECK(h0.dim() == 2 && h0.size(0) == x.size(0) && h0.size(1) == x.size(2), op,
                ": argument 'h0' must be [B, C] = [", x.size(0), ", ", x.size(2), "], got ", h0.sizes());
  }
  return LinearScanFunction::apply(a, x, h0.defined() ? h0 : at::empty({0}, x.options()), h0.defined());
}

std::tuple<at::Tensor, at::Tensor> gated_ema_scan(const at::Tensor& v, const at::Tensor& z, const at::Tensor& rate,
                                                   const at::Tensor& h0) {
  constexpr const char* op = "gated_ema_scan";
  check_sequence(v, op, "v");
  const int64_t B = v.size(0), T = v.size(1), C = v.size(2);
  check_parameter(z, v, op, "z", "v");
  TORCH_CHECK(z.dim() == 2 && z.size(0) == B && z.size(1) == T, op, ": argument 'z' must be [B, T] = [", B, ", ",
              T, "], got ", z.sizes());
  check_parameter(rate, v, op, "rate", "v");
  TORCH_CHECK(rate.dim() == 1 && rate.size(0) == C, op, ": argument 'rate' must be [C] = [", C, "], got ",
              rate.sizes());
  if (h0.defined()) {
    check_parameter(h0, v, op, "h0", "v");
    TORCH_CHECK(h0.dim() == 2 && h0.size(0) == B && h0.size(1) == C, op, ": argument 'h0' must be [B, C] = [", B,
                ", ", C, "], got ", h0.sizes());
  }
  const auto acc = ops::opmath_type(v);
  // The gate, rate and state in the accumulation type (their gradients flow
  // back through these casts into the callers' dtypes).
  const at::Tensor za = z.to(acc), fa = rate.to(acc), h0a = h0.defined() ? h0.to(acc) : at::Tensor();
  if (v.is_cuda() && C % 32 == 0) {
    auto out = GatedEmaScanFunction::apply(v, za, fa, h0a.defined() ? h0a : at::empty({0}, za.options()),
                                           h0a.defined());
    return {out[0], out[1]};
  }
  // Elsewhere the composition it fuses (linear_scan's CPU and CUDA kernels).
  const at::Tensor b = za.unsqueeze(-1) * fa;  // [B, T, C] in A
  const at::Tensor h = linear_scan(1 - b, b * v, h0a);
  const at::Tensor last = T > 0 ? h.select(1, T - 1).detach().clone()
                                : (h0a.defined() ? h0a.detach().clone() : at::zeros({B, C}, za.options()));
  return {h.to(v.scalar_type()), last};
}

namespace {
// The registered forms (schema `Tensor?` arrives as an optional).
at::Tensor causal_depthwise_conv1d_op(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias) {
  return causal_depthwise_conv1d(x, weight, bias.value_or(at::Tensor()));
}
at::Tensor linear_scan_op(const at::Tensor& a, const at::Tensor& x, const std::optional<at::Tensor>& h0) {
  return linear_scan(a, x, h0.value_or(at::Tensor()));
}
std::tuple<at::Tensor, at::Tensor> gated_ema_scan_op(const at::Tensor& v, const at::Tensor& z, const at::Tensor& rate,
                                                      const std::optional<at::Tensor>& h0) {
  return gated_ema_scan(v, z, rate, h0.value_or(at::Tensor()));
}
}  // namespace

}  // namespace unswag

TORCH_LIBRARY_IMPL(unswag, CompositeImplicitAutograd, m) {
  m.impl("gated_ema_scan", &unswag::gated_ema_scan_op);
  m.impl("causal_depthwise_conv1d", &unswag::causal_depthwise_conv1d_op);
  m.impl("linear_scan", &unswag::linear_scan_op);
}
