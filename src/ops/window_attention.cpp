// Torch glue of unswag::window_attention (include/unswag/nn/psa_ops.h): the
// argument checks, the autograd function over the CUDA kernels of
// src/kernels/window_attention.h, the ATen composition elsewhere
// (unswag::chunked_attention with the key bias), and the registration of
// torch.ops.unswag.window_attention.
//
// Saved for backward: q, k, v, the output and the fp32 log-sum-exp [B, H, T];
// the output and every gradient are allocated token-major ([B, T, heads, D]
// storage, returned as [B, heads, T, D] views), the layout the projections
// and RoPE read and write.
#include <torch/autograd.h>
#include <torch/library.h>

#include "kernels/window_attention.h"
#include "ops/common.h"
#include "unswag/nn/functional.h"
#include "unswag/nn/psa_ops.h"

namespace unswag {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The kernels' layout: unit stride along D, (b, head, t) strides multiples of 8
// elements, a 16-byte aligned base.
bool rows_fit(const at::Tensor& t) {
  return t.stride(3) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0 &&
         reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

bool kernels_take(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
#ifndef UNSWAG_WITH_CUDA
  (void)q, (void)k, (void)v;
  return false;
#else
  const auto dt = q.scalar_type();
  // (Grids are (T / 64, heads, B): y and z stop at 65535.)
  return q.is_cuda() && (dt == at::kHalf || dt == at::kBFloat16) &&
         kernels::window_attention_cuda_head_dim(q.size(3)) && q.size(0) <= 65535 && q.size(1) <= 65535 &&
         rows_fit(q) && rows_fit(k) && rows_fit(v);
#endif
}

// [B, heads, T, D] as a view of fresh token-major [B, T, heads, D] storage.
at::Tensor token_major(const at::Tensor& like, int64_t heads) {
  return at::empty({like.size(0), like.size(2), heads, like.size(3)}, like.options()).transpose(1, 2);
}

void set_rows(const at::Tensor& t, int64_t stride[3]) {
  for (int i = 0; i < 3; ++i) stride[i] = t.stride(i);
}

kernels::WindowAttentionParams params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& bias, double scale, int64_t window) {
  kernels::WindowAttentionParams p;
  p.dtype = ops::to_kernel_dtype(q.scalar_type());
  p.batch = q.size(0), p.heads = q.size(1), p.kv_heads = k.size(1), p.time = q.size(2), p.head_dim = q.size(3);
  p.window = std::min(window, std::max<int64_t>(q.size(2), 1));  // a window past T is the whole sequence
  p.scale = float(scale);
  p.q = q.const_data_ptr(), p.k = k.const_data_ptr(), p.v = v.const_data_ptr();
  set_rows(q, p.q_stride), set_rows(k, p.k_stride), set_rows(v, p.v_stride);
  p.bias = bias.const_data_ptr<float>();
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_attention_cuda_forward(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, const at::Tensor& bias,
                                                                 double scale, int64_t window) {
  TORCH_CHECK(window_attention_fused(q, k, v) && bias.scalar_type() == at::kFloat && bias.is_contiguous(),
              "window_attention_cuda_forward: operands the CUDA kernels do not take (see window_attention_fused)");
  at::Tensor o = token_major(q, q.size(1));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  auto p = params(q, k, v, bias, scale, window);
  p.o = o.data_ptr(), set_rows(o, p.o_stride);
  p.lse = lse.data_ptr<float>();
#ifdef UNSWAG_WITH_CUDA
  kernels::window_attention_forward_cuda(p, ops::current_cuda_stream(q.device()));
#endif
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_cuda_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
    const at::Tensor& out, const at::Tensor& lse, double scale, int64_t window, const WindowGradExtras& extras) {
  constexpr const char* op = "window_attention_cuda_backward";
  at::Tensor dout = grad_out;
  if (!rows_fit(dout) || dout.scalar_type() != q.scalar_type())
    dout = dout.to(q.scalar_type()).transpose(1, 2).contiguous().transpose(1, 2);
  auto p = params(q, k, v, bias, scale, window);
  p.o = const_cast<void*>(out.const_data_ptr()), set_rows(out, p.o_stride);
  p.lse = const_cast<float*>(lse.const_data_ptr<float>());
  at::Tensor dq = token_major(q, q.size(1)), dk = token_major(k, k.size(1)), dv = token_major(v, v.size(1));
  at::Tensor delta = at::empty_like(lse);
  p.dout = dout.const_data_ptr(), set_rows(dout, p.dout_stride);
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  set_rows(dq, p.dq_stride), set_rows(dk, p.dk_stride), set_rows(dv, p.dv_stride);
  p.delta = delta.data_ptr<float>();
  const int64_t B = q.size(0), T = q.size(2), D = q.size(3), H = q.size(1), Hkv = k.size(1);
  // The packed rows and tables are read by 16-byte vectors at row offsets that are multiples of D.
  auto rows_of = [&](const at::Tensor& g, int64_t heads, const char* arg) {
    if (!g.defined()) return at::Tensor();
    TORCH_CHECK(g.dim() == 2 && g.size(1) == heads * D && g.scalar_type() == q.scalar_type() &&
                    g.device() == q.device(),
                op, ": argument '", arg, "' must be [N, ", heads * D, "] ", q.scalar_type(), " on ", q.device(),
                ", got ", g.scalar_type(), " ", g.sizes(), " on ", g.device());
    return g.contiguous();
  };
  const at::Tensor dq_sig = rows_of(extras.dq_sig, H, "dq_sig"), dk_sig = rows_of(extras.dk_sig, Hkv, "dk_sig");
  at::Tensor rows, dz_part;
  if (dq_sig.defined() || dk_sig.defined()) {
    TORCH_CHECK(extras.sig_rows.defined() && extras.sig_rows.scalar_type() == at::kLong &&
                    extras.sig_rows.numel() == B * T && extras.sig_rows.device() == q.device(),
                op, ": argument 'sig_rows' must be int64 with B * T = ", B * T, " values on ", q.device(), ", got ",
                extras.sig_rows.defined() ? c10::str(extras.sig_rows.scalar_type(), " ", extras.sig_rows.sizes())
                                          : std::string("an undefined tensor"));
    rows = extras.sig_rows.contiguous();
    p.sig_rows = rows.const_data_ptr<int64_t>();
    if (dq_sig.defined()) p.dq_sig = dq_sig.const_data_ptr();
    if (dk_sig.defined()) {
      p.dk_sig = dk_sig.const_data_ptr();
      dz_part = at::empty({B * T, Hkv}, q.options().dtype(at::kFloat));
      p.dz_part = dz_part.data_ptr<float>();
    }
  }
  at::Tensor cos, sin;
  if (extras.rope_cos.defined() || extras.rope_sin.defined()) {
    auto table = [&](const at::Tensor& t, const char* arg) {
      const at::Tensor t3 = t.defined() && t.dim() == 4 && t.size(1) == 1 ? t.squeeze(1) : t;
      TORCH_CHECK(t3.defined() && t3.dim() == 3 && (t3.size(0) == B || t3.size(0) == 1) && t3.size(1) == T &&
                      t3.size(2) == D && t3.scalar_type() == q.scalar_type() && t3.device() == q.device(),
                  op, ": argument '", arg, "' must be [", B, " or 1, ", T, ", ", D, "] ", q.scalar_type(), " on ",
                  q.device(), ", got ", t.defined() ? c10::str(t.scalar_type(), " ", t.sizes()) : "an undefined tensor");
      return t3.contiguous();
    };
    cos = table(extras.rope_cos, "rope_cos"), sin = table(extras.rope_sin, "rope_sin");
    TORCH_CHECK(cos.size(0) == sin.size(0), op, ": arguments 'rope_cos' and 'rope_sin' must have the same batch, got ",
                cos.sizes(), " and ", sin.sizes());
    p.rope_cos = cos.const_data_ptr(), p.rope_sin = sin.const_data_ptr();
    p.rope_per_batch = cos.size(0) == B && B > 1;
  }
#ifdef UNSWAG_WITH_CUDA
  kernels::window_attention_backward_cuda(p, ops::current_cuda_stream(q.device()));
#endif
  return {dq, dk, dv, dz_part};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_cuda_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
    const at::Tensor& out, const at::Tensor& lse, double scale, int64_t window) {
  auto [dq, dk, dv, dz] = window_attention_cuda_backward(grad_out, q, k, v, bias, out, lse, scale, window, {});
  return {dq, dk, dv};
}

namespace {

struct WindowAttentionFunction : public torch::autograd::Function<WindowAttentionFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& bias, double scale, int64_t window) {
    const at::Tensor b32 = bias.detach().to(at::kFloat).contiguous();
    auto [o, lse] = window_attention_cuda_forward(q, k, v, b32, scale, window);
    ctx->save_for_backward({q, k, v, b32, o, lse});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window"] = window;
    return o;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    auto [dq, dk, dv] = window_attention_cuda_backward(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                                       saved[5], ctx->saved_data["scale"].toDouble(),
                                                       ctx->saved_data["window"].toInt());
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

bool window_attention_fused(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return q.defined() && k.defined() && v.defined() && q.dim() == 4 && k.dim() == 4 && v.dim() == 4 &&
         k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() && kernels_take(q, k, v);
}

at::Tensor window_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                            double scale, int64_t window) {
  constexpr const char* op = "window_attention";
  ops::check_float_tensor(q, op, "q");
  ops::check_same(k, q, op, "k", "q", false);
  ops::check_same(v, q, op, "v", "q", false);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": arguments 'q', 'k', 'v' must be [B, heads, T, head_dim] (4 dims), got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(2) == q.size(2) && v.size(2) == q.size(2) &&
                  k.size(3) == q.size(3) && v.size(3) == q.size(3) && v.size(1) == k.size(1),
              op, ": arguments 'k' and 'v' must be [B, kv_heads, T, head_dim] matching q ", q.sizes(), ", got k ",
              k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": q heads (", q.size(1),
              ") must be a multiple of k/v heads (", k.size(1), ")");
  TORCH_CHECK(bias.defined() && bias.is_floating_point() && bias.dim() == 2 && bias.size(0) == q.size(0) &&
                  bias.size(1) == q.size(2),
              op, ": argument 'bias' must be a floating [B, T] = [", q.size(0), ", ", q.size(2), "] tensor, got ",
              bias.defined() ? c10::str(bias.scalar_type(), " ", bias.sizes()) : std::string("an undefined tensor"));
  TORCH_CHECK(bias.device() == q.device(), op, ": argument 'bias' must be on ", q.device(), ", got ", bias.device());
  TORCH_CHECK(window >= 1, op, ": argument 'window' must be >= 1, got ", window);
  if (window_attention_fused(q, k, v)) return WindowAttentionFunction::apply(q, k, v, bias, scale, window);
  // (An empty sequence: chunked_attention returns fresh zeros, which no gradient reaches.)
  if (q.numel() == 0 || k.numel() == 0) return q * 0;
  return chunked_attention(q, k, v, scale, window, 1024, bias);
}

}  // namespace unswag

TORCH_LIBRARY_FRAGMENT(unswag, m) {
  m.def("window_attention(Tensor q, Tensor k, Tensor v, Tensor bias, float scale, int window) -> Tensor");
}
TORCH_LIBRARY_IMPL(unswag, CompositeImplicitAutograd, m) { m.impl("window_attention", &unswag::window_attention); }
