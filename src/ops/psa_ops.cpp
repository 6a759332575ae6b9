// Torch glue of the PSA sequence primitives (include/unswag/nn/psa_ops.h):
// argument checks, autograd functions over the raw-pointer kernels of
// src/kernels/psa.h (CPU reference and CUDA), and the registrations of
// torch.ops.unswag.causal_depthwise_conv1d / linear_scan / gated_ema_scan /
// psa_combine / gather_rows / pad_head_dim / unpad_head_dim / gate_tokens.
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
    at::Tensor dh0 = want_h0 ? at::zeros({B, C}, z.options()) : at::Tensor();
    if (!grads[0].defined() || v.numel() == 0) {
      if (dv.defined()) dv.zero_();
      return {dv, at::zeros({B, T}, z.options()), at::zeros({C}, z.options()), dh0, at::Tensor()};
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

// ---- psa_combine --------------------------------------------------------------

// The CUDA kernels of kernels::psa_combine_*: one pass forward, one backward.
// Inputs as psa_combine's (gate and lambdas already fp32); win a placeholder
// unless has_win. Packed (psa_combine_packed): sig [N, H, D] rows read through
// sig_rows [B * T] (a placeholder otherwise), and dsig comes back packed.
struct PsaCombineFunction : public torch::autograd::Function<PsaCombineFunction> {
  static kernels::PsaCombineParams params(const at::Tensor& sig, const at::Tensor& sig_rows, bool packed,
                                          const at::Tensor& gate, const at::Tensor& local, const at::Tensor& lam_l,
                                          const at::Tensor& summary, const at::Tensor& lam_s) {
    kernels::PsaCombineParams p;
    p.dtype = ops::to_kernel_dtype(sig.scalar_type());
    p.batch = gate.size(0);
    p.time = gate.size(1);
    p.heads = sig.size(1);
    p.head_dim = packed ? sig.size(2) : sig.size(3);
    const int64_t C = p.heads * p.head_dim;
    p.local_group = C / local.size(2);
    p.summary_group = C / summary.size(2);
    p.sig = sig.const_data_ptr();
    if (packed) {
      p.sig_rows = sig_rows.const_data_ptr<int64_t>();
    } else {
      p.sig_stride[0] = sig.stride(0), p.sig_stride[1] = sig.stride(1), p.sig_stride[2] = sig.stride(2);
    }
    p.gate = gate.const_data_ptr<float>();
    p.local = local.const_data_ptr();
    p.lambda_local = lam_l.numel() > 0 ? lam_l.const_data_ptr<float>() : nullptr;  // empty: already scaled
    p.summary = summary.const_data_ptr();
    p.lambda_summary = lam_s.numel() > 0 ? lam_s.const_data_ptr<float>() : nullptr;
    return p;
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& sig, const at::Tensor& sig_rows,
                            const at::Tensor& gate, const at::Tensor& win, const at::Tensor& local,
                            const at::Tensor& lam_l, const at::Tensor& summary, const at::Tensor& lam_s, bool packed,
                            bool has_win) {
    auto p = params(sig, sig_rows, packed, gate, local, lam_l, summary, lam_s);
    at::Tensor y = at::empty({p.batch, p.time, p.heads * p.head_dim}, sig.options());
    if (has_win) {
      p.win = win.const_data_ptr();
      p.win_stride[0] = win.stride(0), p.win_stride[1] = win.stride(1), p.win_stride[2] = win.stride(2);
    }
    p.y = y.data_ptr();
#ifdef UNSWAG_WITH_CUDA
    kernels::psa_combine_forward_cuda(p, ops::current_cuda_stream(sig.device()));
#endif
    ctx->save_for_backward({sig, sig_rows, gate, local, lam_l, summary, lam_s});
    ctx->saved_data["has_win"] = has_win;
    ctx->saved_data["packed"] = packed;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &sig = saved[0], &sig_rows = saved[1], &gate = saved[2], &local = saved[3], &lam_l = saved[4],
                     &summary = saved[5], &lam_s = saved[6];
    const bool has_win = ctx->saved_data["has_win"].toBool(), packed = ctx->saved_data["packed"].toBool();
    if (!grads[0].defined()) return variable_list(10);
    const at::Tensor dy = grads[0].contiguous();
    auto p = params(sig, sig_rows, packed, gate, local, lam_l, summary, lam_s);
    const int64_t B = p.batch, T = p.time, H = p.heads, D = p.head_dim, C = H * D;
    // dsig in sig's layout (the signal attention's output arrives token-major,
    // and its gradient should leave so, not transposed). Packed: rows that no
    // token reads (padding) get zeros.
    at::Tensor dsig;
    if (ctx->needs_input_grad(0)) {
      if (packed) dsig = at::zeros_like(sig);
      else dsig = sig.is_non_overlapping_and_dense() ? at::empty_like(sig) : at::empty({B, H, T, D}, sig.options());
    }
    at::Tensor dgate = ctx->needs_input_grad(2) ? at::empty({B, T}, gate.options()) : at::Tensor();
    // Per query column where a local/summary head serves several query heads.
    auto grad_buffer = [&](const at::Tensor& t, int64_t group, bool wanted) {
      return wanted ? at::empty({B, T, group == 1 ? t.size(2) : C}, t.options()) : at::Tensor();
    };
    at::Tensor dlocal = grad_buffer(local, p.local_group, ctx->needs_input_grad(4) && p.lambda_local != nullptr);
    at::Tensor dsummary =
        grad_buffer(summary, p.summary_group, ctx->needs_input_grad(6) && p.lambda_summary != nullptr);
    const at::Tensor partial = at::empty({kernels::psa_combine_blocks(p), 2, C}, gate.options());
    p.dy = dy.const_data_ptr();
    p.dsig = dsig.defined() ? dsig.data_ptr() : nullptr;
    if (dsig.defined() && !packed)
      p.dsig_stride[0] = dsig.stride(0), p.dsig_stride[1] = dsig.stride(1), p.dsig_stride[2] = dsig.stride(2);
    p.dgate = dgate.defined() ? dgate.data_ptr<float>() : nullptr;
    p.dlocal = dlocal.defined() ? dlocal.data_ptr() : nullptr;
    p.dsummary = dsummary.defined() ? dsummary.data_ptr() : nullptr;
    p.dlambda_partial = partial.data_ptr<float>();
#ifdef UNSWAG_WITH_CUDA
    kernels::psa_combine_backward_cuda(p, ops::current_cuda_stream(sig.device()));
#endif
    auto fold = [&](at::Tensor g, const at::Tensor& t, int64_t group) {
      if (!g.defined() || group == 1) return g;
      return g.view({B, T, t.size(2) / D, group, D}).sum(3).view({B, T, t.size(2)});
    };
    // A read that came scaled (no lambda) has dy as its gradient: no pass
    // over [B, T, C] for it here (summed over a group's heads where it serves several).
    if (p.lambda_local == nullptr) dlocal = ctx->needs_input_grad(4) ? dy : at::Tensor();
    if (p.lambda_summary == nullptr) dsummary = ctx->needs_input_grad(6) ? dy : at::Tensor();
    const at::Tensor dlam = partial.sum(0);  // [2, C]
    const at::Tensor dwin = has_win ? dy.view({B, T, H, D}).transpose(1, 2) : at::Tensor();
    return {dsig,
            at::Tensor(),
            dgate,
            dwin,
            fold(dlocal, local, p.local_group),
            p.lambda_local != nullptr ? dlam[0] : at::Tensor(),
            fold(dsummary, summary, p.summary_group),
            p.lambda_summary != nullptr ? dlam[1] : at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

// ---- gather_rows ----------------------------------------------------------------

// out = src rows by index (zero rows where index is out of range); its adjoint
// is the gather by `inverse` (each src row goes back to the one out row that
// read it, or nowhere), so the backward is the same kernel with the two index
// arrays swapped: no zero-filled [N, C] gradient, no atomics.
at::Tensor gather_rows_raw(const at::Tensor& src, const at::Tensor& index) {
  const at::Tensor s = src.stride(1) == 1 || src.size(1) <= 1 ? src : src.contiguous();
  at::Tensor out = at::empty({index.size(0), s.size(1)}, s.options());
  kernels::GatherRowsParams p;
  p.rows = index.size(0);
  p.src_rows = s.size(0);
  p.row_bytes = s.size(1) * int64_t(s.element_size());
  p.src_row_stride = (s.size(0) > 1 ? s.stride(0) : s.size(1)) * int64_t(s.element_size());
  p.src = s.const_data_ptr();
  p.index = index.const_data_ptr<int64_t>();
  p.out = out.data_ptr();
  if (p.rows == 0 || p.row_bytes == 0) return out;
  if (src.device().is_cpu()) {
    at::parallel_for(0, p.rows, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, p.row_bytes)),
                     [&](int64_t m0, int64_t m1) { kernels::gather_rows_cpu(p, m0, m1); });
  } else {
#ifdef UNSWAG_WITH_CUDA
    kernels::gather_rows_cuda(p, ops::current_cuda_stream(src.device()));
#else
    TORCH_CHECK(false, "gather_rows: this build of UnSwag has no CUDA kernels (device ", src.device(), ")");
#endif
  }
  return out;
}

}  // namespace

void add_rows_dot_(at::Tensor& dst, const at::Tensor& index, const at::Tensor& src, const at::Tensor& other,
                   at::Tensor& dot) {
  constexpr const char* op = "add_rows_dot_";
  TORCH_CHECK(dst.dim() == 2 && src.dim() == 2 && src.size(1) == dst.size(1), op,
              ": arguments 'dst' and 'src' must be [N, C] and [M, C], got ", dst.sizes(), " and ", src.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 && index.size(0) == src.size(0), op,
              ": argument 'index' must be a 1-dim int64 tensor of ", src.size(0), " entries, got ", index.sizes());
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(), op, ": argument 'src' must have dst's dtype ",
              dst.scalar_type(), ", got ", src.scalar_type());
  TORCH_CHECK(other.sizes() == dst.sizes() && other.scalar_type() == dst.scalar_type() &&
                  other.device() == dst.device(),
              op, ": argument 'other' must match dst (", dst.sizes(), " ", dst.scalar_type(), "), got ",
              other.sizes(), " ", other.scalar_type());
  TORCH_CHECK(dot.scalar_type() == at::kFloat && dot.dim() == 1 && dot.size(0) == dst.size(0) &&
                  dot.is_contiguous() && dot.device() == dst.device(),
              op, ": argument 'dot' must be a contiguous float32 [", dst.size(0), "] tensor on dst's device, got ",
              dot.sizes(), " ", dot.scalar_type());
  const auto dt = dst.scalar_type();
  const int64_t es = int64_t(dst.element_size());
  auto fits = [&](const at::Tensor& t) {
    return t.stride(1) == 1 && (t.stride(0) * es) % 16 == 0 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  };
  const bool kernel = dst.is_cuda() && (dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16) &&
                      (dst.size(1) * es) % 16 == 0 && fits(dst) && fits(src) && index.is_contiguous() && fits(other);
#ifdef UNSWAG_WITH_CUDA
  if (kernel) {
    kernels::AddRowsParams p;
    p.dtype = ops::to_kernel_dtype(dt);
    p.rows = src.size(0), p.cols = src.size(1), p.dst_rows = dst.size(0);
    p.src = src.const_data_ptr(), p.src_stride = src.stride(0);
    p.index = index.const_data_ptr<int64_t>();
    p.dst = dst.data_ptr(), p.dst_stride = dst.stride(0);
    p.other = other.const_data_ptr(), p.other_stride = other.stride(0);
    p.dot = dot.data_ptr<float>();
    kernels::add_rows_cuda(p, ops::current_cuda_stream(dst.device()));
    return;
  }
#else
  (void)kernel;
#endif
  const at::Tensor valid = index.ge(0).logical_and(index.lt(dst.size(0)));
  const at::Tensor rows = index.masked_select(valid), s = src.index({valid});
  dot.index_add_(0, rows, (s.to(at::kFloat) * other.index_select(0, rows).to(at::kFloat)).sum(1));
  dst.index_add_(0, rows, s);
}

namespace {

struct GatherRowsFunction : public torch::autograd::Function<GatherRowsFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& src, const at::Tensor& index,
                            const at::Tensor& inverse) {
    ctx->save_for_backward({index, inverse});
    return gather_rows_raw(src, index);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    return {gather_rows_raw(grads[0], saved[1]), at::Tensor(), at::Tensor()};
  }
};

// ---- pad_head_dim -------------------------------------------------------------------

bool pad_head_dim_fusable(const at::Tensor& x, int64_t pad) {
#ifndef UNSWAG_WITH_CUDA
  return false;
#endif
  const auto dt = x.scalar_type();
  if (!x.is_cuda() || !(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16)) return false;
  const int64_t es = int64_t(x.element_size());
  auto aligned16 = [&](int64_t elems) { return (elems * es) % 16 == 0; };
  return x.stride(3) == 1 && aligned16(x.size(3)) && aligned16(pad) && aligned16(x.stride(0)) &&
         aligned16(x.stride(1)) && aligned16(x.stride(2)) &&
         reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0;
}

// The padded copy without autograd: the CUDA kernel where it fits, else zeros + cat.
at::Tensor pad_head_dim_values(const at::Tensor& x, int64_t pad, const at::Tensor& first) {
  const int64_t B = x.size(0), T = x.size(1), Hx = x.size(2), D = x.size(3);
  if (!pad_head_dim_fusable(x, pad)) {
    at::Tensor extra = at::zeros({B, T, Hx, pad}, x.options());
    if (first.defined()) extra.select(-1, 0).copy_(first.to(x.scalar_type()).view({B, T, 1}).expand({B, T, Hx}));
    return at::cat({x, extra}, -1);
  }
  at::Tensor out = at::empty({B, T, Hx, D + pad}, x.options());
  const at::Tensor f = first.defined() ? first.to(at::kFloat).contiguous() : at::Tensor();
  kernels::PadHeadDimParams p;
  p.dtype = ops::to_kernel_dtype(x.scalar_type());
  p.batch = B, p.time = T, p.heads = Hx, p.head_dim = D, p.pad = pad;
  p.x = x.const_data_ptr();
  p.x_stride[0] = x.stride(0), p.x_stride[1] = x.stride(1), p.x_stride[2] = x.stride(2);
  p.first = f.defined() ? f.const_data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
#ifdef UNSWAG_WITH_CUDA
  kernels::pad_head_dim_cuda(p, ops::current_cuda_stream(x.device()));
#endif
  return out;
}

// The gradient of x is a narrowed view of the output's (no copy); first's
// (rarely wanted: the layer's key bias carries none) sums its column over heads.
struct PadHeadDimFunction : public torch::autograd::Function<PadHeadDimFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& first, int64_t pad,
                            bool has_first) {
    ctx->saved_data["D"] = x.size(3);
    return pad_head_dim_values(x, pad, has_first ? first : at::Tensor());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t D = ctx->saved_data["D"].toInt();
    const at::Tensor& g = grads[0];
    if (!g.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    return {g.narrow(-1, 0, D), ctx->needs_input_grad(1) ? g.select(-1, D).sum(2) : at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// Its inverse: the first D - pad head dims (a view); the gradient comes back
// padded with zeros in one pass (autograd's narrow backward fills a zero
// tensor, then copies the gradient into it).
struct UnpadHeadDimFunction : public torch::autograd::Function<UnpadHeadDimFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t pad) {
    ctx->saved_data["pad"] = pad;
    return x.narrow(-1, 0, x.size(3) - pad);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    return {pad_head_dim_values(grads[0], ctx->saved_data["pad"].toInt(), at::Tensor()), at::Tensor()};
  }
};

// ---- gate_tokens --------------------------------------------------------------------

struct GateTokensFunction : public torch::autograd::Function<GateTokensFunction> {
  static kernels::GateTokensParams params(const at::Tensor& x, const at::Tensor& g) {
    kernels::GateTokensParams p;
    p.dtype = ops::to_kernel_dtype(x.scalar_type());
    p.rows = g.numel();
    p.cols = p.rows == 0 ? 0 : x.numel() / p.rows;
    p.x = x.const_data_ptr();
    p.g = g.const_data_ptr<float>();
    return p;
  }
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& g) {
    at::Tensor y = at::empty_like(x);
    auto p = params(x, g);
    p.y = y.data_ptr();
#ifdef UNSWAG_WITH_CUDA
    kernels::gate_tokens_forward_cuda(p, ops::current_cuda_stream(x.device()));
#endif
    ctx->save_for_backward({x, g});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &g = saved[1];
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    const at::Tensor dy = grads[0].contiguous();
    at::Tensor dx = ctx->needs_input_grad(0) ? at::empty_like(x) : at::Tensor();
    at::Tensor dg = ctx->needs_input_grad(1) ? at::empty_like(g) : at::Tensor();
    auto p = params(x, g);
    p.dy = dy.const_data_ptr();
    p.dx = dx.defined() ? dx.data_ptr() : nullptr;
    p.dg = dg.defined() ? dg.data_ptr<float>() : nullptr;
#ifdef UNSWAG_WITH_CUDA
    if (p.dx != nullptr || p.dg != nullptr) kernels::gate_tokens_backward_cuda(p, ops::current_cuda_stream(x.device()));
#endif
    return {dx, dg};
  }
};

// Whether psa_combine's CUDA kernels take these tensors (else the composition).
// Packed: sig is [N, H, D] rows (psa_combine_packed).
bool combine_fusable(const at::Tensor& sig, const at::Tensor& win, const at::Tensor& local,
                     const at::Tensor& summary, bool packed = false) {
#ifndef UNSWAG_WITH_CUDA
  return false;
#endif
  const auto dt = sig.scalar_type();
  if (!sig.is_cuda() || !(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16)) return false;
  const int64_t D = sig.size(packed ? 2 : 3), C = sig.size(1) * D;
  if (D % 8 != 0 || C % 256 != 0 || C > 8192) return false;
  auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; };
  auto heads_layout_ok = [&](const at::Tensor& t) {
    return t.stride(3) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0 && aligned(t);
  };
  if (packed ? !(sig.is_contiguous() && aligned(sig)) : !heads_layout_ok(sig)) return false;
  if (win.defined() && !heads_layout_ok(win)) return false;
  return local.is_contiguous() && summary.is_contiguous() && aligned(local) && aligned(summary);
}

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

bool value_streams_fused(const at::Tensor& v) {
#ifndef UNSWAG_WITH_CUDA
  return false;
#endif
  const auto dt = v.scalar_type();
  return v.is_cuda() && (dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16) && v.dim() == 3 &&
         v.is_contiguous() && v.size(2) % 32 == 0;
}

ValueStreamsGrads value_streams_cuda_backward(const at::Tensor& v, const at::Tensor& u, const at::Tensor& gate,
                                              const at::Tensor& z, const at::Tensor& rate, const at::Tensor& weight,
                                              const at::Tensor& du, const at::Tensor& dlocal,
                                              const at::Tensor& dsummary, const at::Tensor& summary) {
  constexpr const char* op = "value_streams_cuda_backward";
  TORCH_CHECK(value_streams_fused(v), op, ": argument 'v' must be a contiguous CUDA [B, T, C] fp32/fp16/bf16 ",
              "tensor with C % 32 == 0 (value_streams_fused), got ", v.sizes(), " ", v.scalar_type(), " on ",
              v.device());
  const int64_t B = v.size(0), T = v.size(1), C = v.size(2);
  auto check_like_v = [&](const at::Tensor& t, const char* arg) {
    if (!t.defined()) return;
    TORCH_CHECK(t.sizes() == v.sizes() && t.scalar_type() == v.scalar_type() && t.device() == v.device(), op,
                ": argument '", arg, "' must match v (", v.sizes(), " ", v.scalar_type(), "), got ", t.sizes(), " ",
                t.scalar_type());
  };
  check_like_v(u, "u");
  check_like_v(du, "du");
  check_like_v(dlocal, "dlocal");
  check_like_v(dsummary, "dsummary");
  check_like_v(summary, "summary");
  TORCH_CHECK(u.defined(), op, ": argument 'u' is required");
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == B && gate.size(1) == T && z.sizes() == gate.sizes(), op,
              ": arguments 'gate' and 'z' must be [B, T] = [", B, ", ", T, "], got ", gate.sizes(), " and ",
              z.sizes());
  TORCH_CHECK(rate.dim() == 1 && rate.size(0) == C, op, ": argument 'rate' must be [", C, "], got ", rate.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == C && weight.size(1) >= 1, op,
              ": argument 'weight' must be [C, K] with C = ", C, ", got ", weight.sizes());
  const auto acc = ops::opmath_type(v);
  const at::Tensor w_acc = weight.to(acc).contiguous();
  const at::Tensor g = gate.to(acc).contiguous(), za = z.to(acc).contiguous(), fa = rate.to(acc).contiguous();
  ValueStreamsGrads out;
#ifdef UNSWAG_WITH_CUDA
  void* stream = ops::current_cuda_stream(v.device());
  // du' = du + conv^T(dlocal): the conv's backward adds du as it writes dx.
  at::Tensor du_total;
  if (dlocal.defined() && v.numel() > 0) {
    const at::Tensor dl = dlocal.contiguous(), du_in = du.defined() ? du.contiguous() : at::Tensor();
    const at::Tensor uc = u.contiguous();  // outlives the params that point into it
    auto p = CausalConvFunction::params(uc, w_acc);
    const at::Tensor dw_partial = at::empty({kernels::conv_groups(p), weight.size(1), C}, v.options().dtype(acc));
    du_total = at::empty_like(v);
    p.dy = dl.const_data_ptr();
    p.dx = du_total.data_ptr();
    p.dx_addend = du_in.defined() ? du_in.const_data_ptr() : nullptr;
    p.dweight_partial = dw_partial.data_ptr();
    kernels::causal_conv_backward_cuda(p, stream);
    out.dweight = dw_partial.sum(0).t().contiguous().to(weight.scalar_type());
  } else {
    du_total = du.defined() ? du.contiguous() : at::zeros_like(v);
    out.dweight = at::zeros_like(weight);
  }
  // dv = b g_scan + gate du' and the partial sums of dz, drate, dgate in one replay.
  out.dv = at::empty_like(v);
  if (v.numel() == 0) {
    out.dgate = at::zeros({B, T}, g.options());
    out.dz = at::zeros({B, T}, g.options());
    out.drate = at::zeros({C}, g.options());
    return out;
  }
  const at::Tensor dh = dsummary.defined() ? dsummary.contiguous() : at::zeros_like(v);
  auto p = GatedEmaScanFunction::params(v, za, fa, at::Tensor());
  const at::Tensor dz_part = at::empty({B, T, C / 32}, g.options());
  const at::Tensor dgate_part = at::empty({B, T, C / 32}, g.options());
  const at::Tensor df_part = at::empty({B * kernels::scan_chunks(T), C}, g.options());
  const at::Tensor ws = at::empty({kernels::scan_cuda_workspace_elems(p, true)}, g.options());
  p.dh = dh.const_data_ptr();
  p.dx = out.dv.data_ptr();
  p.dz_partial = dz_part.data_ptr();
  p.df_partial = df_part.data_ptr();
  p.workspace = ws.data_ptr();
  p.gate = g.const_data_ptr();
  p.gate_grad = du_total.const_data_ptr();
  p.dgate_partial = dgate_part.data_ptr();
  const at::Tensor h_saved = summary.defined() ? summary.contiguous() : at::Tensor();
  p.h_saved = h_saved.defined() ? h_saved.const_data_ptr() : nullptr;
  kernels::linear_scan_backward_cuda(p, stream);
  out.dgate = dgate_part.sum(-1);
  out.dz = dz_part.sum(-1);
  out.drate = df_part.sum(0);
#else
  (void)g, (void)za, (void)fa, (void)w_acc, (void)du, (void)dlocal, (void)dsummary, (void)summary;
  TORCH_CHECK(false, op, ": this build has no CUDA");
#endif
  return out;
}

namespace {
// psa_combine's arguments besides sig: gate [B, T]; win (optional) [B, H, T,
// D]; local / summary [B, T, Hx * D] with Hx dividing H (Hx heads serving H /
// Hx query heads each); lambdas [H * D]. The reads in sig's dtype and device.
void check_combine_args(const char* op, const at::Tensor& sig, int64_t B, int64_t H, int64_t T, int64_t D,
                        const at::Tensor& gate, const at::Tensor& win, const at::Tensor& local,
                        const at::Tensor& lambda_local, const at::Tensor& summary, const at::Tensor& lambda_summary) {
  const int64_t C = H * D;
  check_parameter(gate, sig, op, "gate", "sig");
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == B && gate.size(1) == T, op, ": argument 'gate' must be [B, T] = [",
              B, ", ", T, "], got ", gate.sizes());
  if (win.defined()) {
    ops::check_float_tensor(win, op, "win");
    ops::check_same(win, sig, op, "win", "sig", false);
    TORCH_CHECK(win.dim() == 4 && win.size(0) == B && win.size(1) == H && win.size(2) == T && win.size(3) == D, op,
                ": argument 'win' must be [B, H, T, D] = [", B, ", ", H, ", ", T, ", ", D, "], got ", win.sizes());
  }
  auto check_read = [&](const at::Tensor& t, const at::Tensor& lam, const char* arg, const char* lam_arg) {
    ops::check_float_tensor(t, op, arg);
    TORCH_CHECK(t.device() == sig.device() && t.scalar_type() == sig.scalar_type(), op, ": argument '", arg,
                "' must have the device and dtype of 'sig' (", sig.device(), ", ", sig.scalar_type(), "), got ",
                t.device(), ", ", t.scalar_type());
    TORCH_CHECK(t.dim() == 3 && t.size(0) == B && t.size(1) == T && t.size(2) > 0 && t.size(2) % D == 0 &&
                    H % (t.size(2) / D) == 0,
                op, ": argument '", arg, "' must be [B, T, Hx * D] = [", B, ", ", T, ", Hx * ", D,
                "] with Hx dividing H = ", H, ", got ", t.sizes());
    if (!lam.defined()) return;  // the read comes scaled
    check_parameter(lam, sig, op, lam_arg, "sig");
    TORCH_CHECK(lam.dim() == 1 && lam.size(0) == C, op, ": argument '", lam_arg, "' must be [H * D] = [", C,
                "], got ", lam.sizes());
  };
  check_read(local, lambda_local, "local", "lambda_local");
  check_read(summary, lambda_summary, "summary", "lambda_summary");
}
// The kernels' fp32 lambda, or an empty placeholder for none (autograd
// functions take defined tensors only).
at::Tensor lambda_or_empty(const at::Tensor& lambda, const at::Tensor& like) {
  return lambda.defined() ? lambda.to(at::kFloat).contiguous() : at::empty({0}, like.options().dtype(at::kFloat));
}
}  // namespace

at::Tensor psa_combine(const at::Tensor& sig, const at::Tensor& gate, const at::Tensor& win, const at::Tensor& local,
                       const at::Tensor& lambda_local, const at::Tensor& summary, const at::Tensor& lambda_summary) {
  constexpr const char* op = "psa_combine";
  ops::check_float_tensor(sig, op, "sig");
  TORCH_CHECK(sig.dim() == 4, op, ": argument 'sig' must be [B, H, T, D], got ", sig.sizes());
  const int64_t B = sig.size(0), H = sig.size(1), T = sig.size(2), D = sig.size(3), C = H * D;
  check_combine_args(op, sig, B, H, T, D, gate, win, local, lambda_local, summary, lambda_summary);
  const at::Tensor lc = local.contiguous(), sc = summary.contiguous();
  if (combine_fusable(sig, win, lc, sc)) {
    // The kernels index gate and the lambdas densely: a strided view (the
    // layer's gate is gates[..., signal], stride 4) is copied first.
    return PsaCombineFunction::apply(sig, at::empty({0}, gate.options().dtype(at::kLong)),
                                     gate.to(at::kFloat).contiguous(),
                                     win.defined() ? win : at::empty({0}, sig.options()), lc,
                                     lambda_or_empty(lambda_local, gate), sc, lambda_or_empty(lambda_summary, gate),
                                     false, win.defined());
  }
  // Elsewhere the composition it fuses, in sig's dtype.
  const auto dt = sig.scalar_type();
  auto expand = [&](const at::Tensor& t) {
    const int64_t Hx = t.size(2) / D;
    return t.view({B, T, Hx, 1, D}).expand({B, T, Hx, H / Hx, D}).reshape({B, T, C});
  };
  at::Tensor heads = sig * gate.to(dt).view({B, 1, T, 1});
  if (win.defined()) heads = heads + win;
  auto scaled = [&](const at::Tensor& lam, const at::Tensor& t) {
    return lam.defined() ? lam.to(dt) * expand(t) : expand(t);
  };
  return heads.transpose(1, 2).reshape({B, T, C}) + scaled(lambda_local, local) + scaled(lambda_summary, summary);
}

at::Tensor psa_combine_packed(const at::Tensor& sig, const at::Tensor& sig_rows, const at::Tensor& pack_rows,
                              const at::Tensor& gate, const at::Tensor& win, const at::Tensor& local,
                              const at::Tensor& lambda_local, const at::Tensor& summary,
                              const at::Tensor& lambda_summary) {
  constexpr const char* op = "psa_combine_packed";
  ops::check_float_tensor(sig, op, "sig");
  TORCH_CHECK(sig.dim() == 3, op, ": argument 'sig' must be [N, H, D] rows, got ", sig.sizes());
  TORCH_CHECK(gate.dim() == 2, op, ": argument 'gate' must be [B, T], got ", gate.sizes());
  const int64_t N = sig.size(0), H = sig.size(1), D = sig.size(2), B = gate.size(0), T = gate.size(1);
  check_combine_args(op, sig, B, H, T, D, gate, win, local, lambda_local, summary, lambda_summary);
  TORCH_CHECK(sig_rows.scalar_type() == at::kLong && sig_rows.dim() == 1 && sig_rows.size(0) == B * T &&
                  sig_rows.device() == sig.device(),
              op, ": argument 'sig_rows' must be a 1-dim int64 tensor of B * T = ", B * T, " entries on ",
              sig.device(), ", got ", sig_rows.scalar_type(), " ", sig_rows.sizes());
  TORCH_CHECK(pack_rows.scalar_type() == at::kLong && pack_rows.dim() == 1 && pack_rows.size(0) == N &&
                  pack_rows.device() == sig.device(),
              op, ": argument 'pack_rows' must be a 1-dim int64 tensor of N = ", N, " entries on ", sig.device(),
              ", got ", pack_rows.scalar_type(), " ", pack_rows.sizes());
  const at::Tensor lc = local.contiguous(), sc = summary.contiguous();
  if (!combine_fusable(sig, win, lc, sc, /*packed=*/true) || !sig_rows.is_contiguous()) {
    // The composition: the unpacked signal read, then psa_combine.
    const at::Tensor unpacked =
        gather_rows(sig.reshape({N, H * D}), sig_rows, pack_rows).view({B, T, H, D}).transpose(1, 2);
    return psa_combine(unpacked, gate, win, local, lambda_local, summary, lambda_summary);
  }
  return PsaCombineFunction::apply(sig, sig_rows, gate.to(at::kFloat).contiguous(),
                                   win.defined() ? win : at::empty({0}, sig.options()), lc,
                                   lambda_or_empty(lambda_local, gate), sc, lambda_or_empty(lambda_summary, gate), true,
                                   win.defined());
}

at::Tensor gather_rows(const at::Tensor& src, const at::Tensor& index, const at::Tensor& inverse) {
  constexpr const char* op = "gather_rows";
  TORCH_CHECK(src.defined() && src.dim() == 2, op, ": argument 'src' must be [N, C] (2 dims), got ",
              src.defined() ? src.sizes() : at::IntArrayRef{});
  for (const auto& [t, arg, n] : {std::tuple<const at::Tensor&, const char*, int64_t>{index, "index", -1},
                                  std::tuple<const at::Tensor&, const char*, int64_t>{inverse, "inverse", src.size(0)}}) {
    TORCH_CHECK(t.defined() && t.scalar_type() == at::kLong && t.dim() == 1, op, ": argument '", arg,
                "' must be a 1-dim int64 tensor, got ",
                t.defined() ? c10::str("a ", t.dim(), "-dim ", t.scalar_type(), " tensor") : "an undefined tensor");
    TORCH_CHECK(t.device() == src.device(), op, ": argument '", arg, "' must be on the device of 'src' (",
                src.device(), "), got ", t.device());
    TORCH_CHECK(n < 0 || t.size(0) == n, op, ": argument '", arg, "' must have one entry per row of 'src' (", n,
                "), got ", t.size(0));
  }
  TORCH_CHECK(src.device().is_cpu() || src.is_cuda(), op, ": argument 'src' must be on the CPU or CUDA, got ",
              src.device());
  return GatherRowsFunction::apply(src, index.contiguous(), inverse.contiguous());
}

at::Tensor pad_head_dim(const at::Tensor& x, int64_t pad, const at::Tensor& first) {
  constexpr const char* op = "pad_head_dim";
  ops::check_float_tensor(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": argument 'x' must be [B, T, H, D] (4 dims), got ", x.sizes());
  TORCH_CHECK(pad >= 1, op, ": argument 'pad' must be >= 1, got ", pad);
  const int64_t B = x.size(0), T = x.size(1);
  if (first.defined()) {
    check_parameter(first, x, op, "first");
    TORCH_CHECK(first.dim() == 2 && first.size(0) == B && first.size(1) == T, op,
                ": argument 'first' must be [B, T] = [", B, ", ", T, "], got ", first.sizes());
  }
  if (pad_head_dim_fusable(x, pad))
    return PadHeadDimFunction::apply(x, first.defined() ? first : at::empty({0}, x.options()), pad, first.defined());
  return pad_head_dim_values(x, pad, first);  // the composition, differentiable by ATen's autograd
}

at::Tensor unpad_head_dim(const at::Tensor& x, int64_t pad) {
  constexpr const char* op = "unpad_head_dim";
  ops::check_float_tensor(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": argument 'x' must be [B, T, H, D + pad] (4 dims), got ", x.sizes());
  TORCH_CHECK(pad >= 1 && pad < x.size(3), op, ": argument 'pad' must be in [1, ", x.size(3), "), got ", pad);
  if (pad_head_dim_fusable(x.narrow(-1, 0, x.size(3) - pad), pad)) return UnpadHeadDimFunction::apply(x, pad);
  return x.narrow(-1, 0, x.size(3) - pad);
}

at::Tensor gate_tokens(const at::Tensor& x, const at::Tensor& g) {
  constexpr const char* op = "gate_tokens";
  check_sequence(x, op, "x");
  check_parameter(g, x, op, "g");
  TORCH_CHECK(g.dim() == 2 && g.size(0) == x.size(0) && g.size(1) == x.size(1), op,
              ": argument 'g' must be [B, T] = [", x.size(0), ", ", x.size(1), "], got ", g.sizes());
  const auto dt = x.scalar_type();
  const bool fusable = x.is_cuda() && (dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16) &&
                       x.is_contiguous() && x.size(2) % 8 == 0 &&
                       reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0;
#ifdef UNSWAG_WITH_CUDA
  if (fusable) return GateTokensFunction::apply(x, g.to(at::kFloat).contiguous());
#else
  (void)fusable;
#endif
  // Elsewhere the composition it fuses, in x's dtype.
  return x * g.to(dt).unsqueeze(-1);
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
at::Tensor pad_head_dim_op(const at::Tensor& x, int64_t pad, const std::optional<at::Tensor>& first) {
  return pad_head_dim(x, pad, first.value_or(at::Tensor()));
}
at::Tensor psa_combine_packed_op(const at::Tensor& sig, const at::Tensor& sig_rows, const at::Tensor& pack_rows,
                                 const at::Tensor& gate, const std::optional<at::Tensor>& win, const at::Tensor& local,
                                 const at::Tensor& lambda_local, const at::Tensor& summary,
                                 const at::Tensor& lambda_summary) {
  return psa_combine_packed(sig, sig_rows, pack_rows, gate, win.value_or(at::Tensor()), local, lambda_local, summary,
                            lambda_summary);
}
at::Tensor psa_combine_op(const at::Tensor& sig, const at::Tensor& gate, const std::optional<at::Tensor>& win,
                          const at::Tensor& local, const at::Tensor& lambda_local, const at::Tensor& summary,
                          const at::Tensor& lambda_summary) {
  return psa_combine(sig, gate, win.value_or(at::Tensor()), local, lambda_local, summary, lambda_summary);
}
}  // namespace

}  // namespace unswag

TORCH_LIBRARY_IMPL(unswag, CompositeImplicitAutograd, m) {
  m.impl("gated_ema_scan", &unswag::gated_ema_scan_op);
  m.impl("causal_depthwise_conv1d", &unswag::causal_depthwise_conv1d_op);
  m.impl("linear_scan", &unswag::linear_scan_op);
  m.impl("psa_combine", &unswag::psa_combine_op);
  m.impl("psa_combine_packed", &unswag::psa_combine_packed_op);
  m.impl("gather_rows", &unswag::gather_rows);
  m.impl("pad_head_dim", &unswag::pad_head_dim_op);
  m.impl("gate_tokens", &unswag::gate_tokens);
  m.impl("unpad_head_dim", &unswag::unpad_head_dim);
}
