// The fused MLP block as one differentiable op, unswag::fused_mlp, with three
// policies for what it keeps for backward (see include/unswag/ops.h and
// docs/memory.md). Matrix products go to ATen (cuBLAS / MKL); the elementwise
// work goes to UnSwag's kernels.
//
// Shapes: x [N, H] (flattened), W_up / W_gate [I, H], W_down [H, I].
//   gated:      g = x W_gate^T, u = x W_up^T, h = act(g) * u, y = h W_down^T
//   non-gated:  z = x W_up^T,   a = act(z),               y = a W_down^T
// Backward (dy [N, H]):
//   dh = dy W_down;  dW_down = dy^T h  (or dy^T a)
//   gated:     dg = dh * u * act'(g),  du = dh * act(g)
//              dW_gate = dg^T x, dW_up = du^T x, dx = dg W_gate + du W_up
//   non-gated: dz = dh * act'(z),  dW_up = dz^T x, dx = dz W_up
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/activations.h"
#include "ops/common.h"
#include "ops/mlp_cores.h"
#include "unswag/ops.h"

namespace unswag::ops {
namespace {

using kernels::Act;
using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

constexpr const char* kOp = "unswag::fused_mlp";

enum class Policy : int64_t { kNone = 0, kRecompute = 1, kCompressed = 2 };

Policy parse_policy(const std::string& s) {
  if (s == "none") return Policy::kNone;
  if (s == "recompute") return Policy::kRecompute;
  if (s == "compressed") return Policy::kCompressed;
  TORCH_CHECK(false, kOp, ": argument 'policy' must be one of none, recompute, compressed; got '", s, "'");
}

struct BlockKind {
  Act act;
  bool gated;
};

BlockKind parse_block(const std::string& activation, bool has_gate) {
  BlockKind k{Act::kSiLU, true};
  if (activation == "swiglu") k.act = Act::kSiLU;
  else if (activation == "geglu") k.act = Act::kGELU;
  else if (activation == "geglu_tanh") k.act = Act::kGELUTanh;
  else {
    TORCH_CHECK(activation == "relu" || activation == "relu2" || activation == "gelu" ||
                    activation == "gelu_tanh" || activation == "silu",
                kOp, ": argument 'activation' must be one of relu, relu2, gelu, gelu_tanh, silu (non-gated) or ",
                "swiglu, geglu, geglu_tanh (gated); got '", activation, "'");
    k = {parse_activation(activation, kOp), false};
  }
  TORCH_CHECK(k.gated == has_gate, kOp, ": activation '", activation, "' ",
              k.gated ? "is gated and needs argument 'w_gate'" : "is not gated, so argument 'w_gate' must be None");
  return k;
}

// act(z) with torch's own ops (what plain PyTorch computes and saves).
at::Tensor act_torch(Act act, const at::Tensor& z) {
  switch (act) {
    case Act::kReLU: return at::relu(z);
    case Act::kReLU2: return at::relu(z).square();
    case Act::kGELU: return at::gelu(z, "none");
    case Act::kGELUTanh: return at::gelu(z, "tanh");
    case Act::kSiLU: return at::silu(z);
  }
  return z;
}

// dh * act'(z), exact, with torch's own backward kernels.
at::Tensor act_backward_torch(Act act, const at::Tensor& dh, const at::Tensor& z) {
  switch (act) {
    case Act::kReLU: return at::threshold_backward(dh, z, 0);
    case Act::kReLU2: return dh * at::relu(z) * 2;
    case Act::kGELU: return at::gelu_backward(dh, z, "none");
    case Act::kGELUTanh: return at::gelu_backward(dh, z, "tanh");
    case Act::kSiLU: return at::silu_backward(dh, z);
  }
  return dh;
}

// Plain PyTorch composition (policy "none", and inference).
at::Tensor plain_block(const at::Tensor& x, const at::Tensor& w_up, const at::Tensor& w_down,
                       const at::Tensor& w_gate, BlockKind k) {
  if (k.gated) return at::linear(act_torch(k.act, at::linear(x, w_gate)) * at::linear(x, w_up), w_down);
  return at::linear(act_torch(k.act, at::linear(x, w_up)), w_down);
}

// Saved-tensor layout: [x, w_up, w_down, (w_gate), policy-specific...].
struct FusedMLPFunction : public torch::autograd::Function<FusedMLPFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_up,
                            const at::Tensor& w_down, const at::Tensor& w_gate, int64_t act_i, bool gated,
                            int64_t policy_i, int64_t storage_bits, int64_t derivative_bits) {
    const Act act = Act(act_i);
    const Policy policy = Policy(policy_i);
    const bool int8 = policy == Policy::kCompressed && storage_bits == 8;
    std::vector<at::Tensor> saved = {x, w_up, w_down};
    if (gated) saved.push_back(w_gate);
    at::Tensor y;
    if (gated) {
      at::Tensor g = at::linear(x, w_gate);
      at::Tensor u = at::linear(x, w_up);
      GatedForwardResult r = gated_forward(g, u, act, int8);
      y = at::linear(r.h, w_down);
      if (policy == Policy::kCompressed) {
        if (int8) saved.insert(saved.end(), {r.gate_q, r.gate_scale, r.up_q, r.up_scale});
        else saved.insert(saved.end(), {g, u});
      }
    } else {
      at::Tensor z = at::linear(x, w_up);
      at::Tensor a, keep;  // keep: the value tensor saved (a, or relu(z) for relu2)
      std::vector<at::Tensor> extra;
      if (policy == Policy::kRecompute) {
        a = act_torch(act, z);
      } else if (act == Act::kReLU) {
        if (int8) {
          auto [y1, mask] = fewbit_forward_impl(z, Act::kReLU, 1, kOp);
          a = y1.view(z.sizes());
          extra.push_back(mask);
        } else {
          a = at::relu(z);
        }
        keep = a;
      } else if (act == Act::kReLU2) {
        keep = at::relu(z);  // a = r^2 and act'(z) = 2r are both rebuilt from r exactly
        a = keep * keep;
      } else {
        // derivative_bits 0: 1 side bit, exact derivative by inverting f; else a few-bit code.
        auto [y1, codes] = derivative_bits == 0 ? side_forward_impl(z, act, kOp)
                                                : fewbit_forward_impl(z, act, derivative_bits, kOp);
        a = y1.view(z.sizes());
        keep = a;
        extra.push_back(codes);
      }
      z.reset();
      y = at::linear(a, w_down);
      if (policy == Policy::kCompressed) {
        if (int8) {
          auto [q, s] = quantize_int8(keep);
          saved.insert(saved.end(), {q, s});
        } else {
          saved.push_back(keep);
        }
        saved.insert(saved.end(), extra.begin(), extra.end());
      }
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["act"] = act_i;
    ctx->saved_data["gated"] = gated;
    ctx->saved_data["policy"] = policy_i;
    ctx->saved_data["int8"] = int8;
    ctx->saved_data["derivative_bits"] = derivative_bits;
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const Act act = Act(ctx->saved_data["act"].toInt());
    const bool gated = ctx->saved_data["gated"].toBool();
    const Policy policy = Policy(ctx->saved_data["policy"].toInt());
    const bool int8 = ctx->saved_data["int8"].toBool();
    const int64_t derivative_bits = ctx->saved_data["derivative_bits"].toInt();
    tensor_list saved = ctx->get_saved_variables();
    const at::Tensor x = saved[0], w_up = saved[1], w_down = saved[2];
    const at::Tensor w_gate = gated ? saved[3] : at::Tensor();
    size_t next = gated ? 4 : 3;
    const at::ScalarType dtype = x.scalar_type();
    const at::Tensor dy = grads[0].contiguous();
    const bool need_x = ctx->needs_input_grad(0), need_up = ctx->needs_input_grad(1),
               need_down = ctx->needs_input_grad(2), need_gate = gated && ctx->needs_input_grad(3);

    at::Tensor dh = at::matmul(dy, w_down);  // [N, I]
    at::Tensor grad_x, grad_up, grad_down, grad_gate;
    if (gated) {
      GatedSaved s;
      if (policy == Policy::kRecompute) {
        s.gate = at::linear(x, w_gate);
        s.up = at::linear(x, w_up);
      } else if (int8) {
        s.gate_q = saved[next];
        s.gate_scale = saved[next + 1];
        s.up_q = saved[next + 2];
        s.up_scale = saved[next + 3];
      } else {
        s.gate = saved[next];
        s.up = saved[next + 1];
      }
      GatedBackwardResult r = gated_backward(dh, s, act, need_down);
      s = GatedSaved();
      saved.clear();
      dh.reset();
      if (need_down) grad_down = at::mm(dy.t(), r.h);
      r.h.reset();
      if (need_gate) grad_gate = at::mm(r.grad_gate.t(), x);
      if (need_up) grad_up = at::mm(r.grad_up.t(), x);
      if (need_x) grad_x = at::addmm(at::mm(r.grad_gate, w_gate), r.grad_up, w_up);
    } else {
      at::Tensor a, dz;
      if (policy == Policy::kRecompute) {
        const at::Tensor z = at::linear(x, w_up);
        a = act_torch(act, z);
        dz = act_backward_torch(act, dh, z);
      } else {
        at::Tensor keep = int8 ? dequantize_int8(saved[next], saved[next + 1], dtype) : saved[next];
        next += int8 ? 2 : 1;
        if (act == Act::kReLU) {
          a = keep;
          dz = int8 ? fewbit_backward_impl(dh, saved[next], Act::kReLU, 1, kOp).view(dh.sizes())
                    : at::threshold_backward(dh, a, 0);
        } else if (act == Act::kReLU2) {
          a = keep * keep;
          dz = dh * keep * 2;
        } else {
          a = keep;
          dz = (derivative_bits == 0 ? inverse_backward_impl(dh, a, saved[next], act, kOp)
                                     : fewbit_backward_impl(dh, saved[next], act, derivative_bits, kOp))
                   .view(dh.sizes());
        }
      }
      saved.clear();
      dh.reset();
      if (need_down) grad_down = at::mm(dy.t(), a);
      a.reset();
      if (need_up) grad_up = at::mm(dz.t(), x);
      if (need_x) grad_x = at::mm(dz, w_up);
    }
    return {grad_x, grad_up, grad_down, grad_gate, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

struct Checked {
  at::Tensor x2d;  // [N, H]
  BlockKind kind;
  Policy policy;
};

Checked check_args(const at::Tensor& x, const at::Tensor& w_up, const at::Tensor& w_down,
                   const std::optional<at::Tensor>& w_gate, const std::string& activation, const std::string& policy,
                   int64_t storage_bits, int64_t derivative_bits) {
  check_float_tensor(x, kOp, "x");
  TORCH_CHECK(x.dim() >= 1, kOp, ": argument 'x' must have at least 1 dimension [..., hidden], got a scalar");
  const int64_t hidden = x.size(-1);
  check_same(w_up, x, kOp, "w_up", "x", false);
  check_same(w_down, x, kOp, "w_down", "x", false);
  TORCH_CHECK(w_up.dim() == 2 && w_up.size(1) == hidden, kOp,
              ": argument 'w_up' must be [intermediate, hidden] with hidden = x.size(-1) = ", hidden, ", got ",
              w_up.sizes());
  const int64_t inter = w_up.size(0);
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(0) == hidden && w_down.size(1) == inter, kOp,
              ": argument 'w_down' must be [hidden, intermediate] = [", hidden, ", ", inter, "], got ",
              w_down.sizes());
  const bool has_gate = w_gate.has_value() && w_gate->defined();
  if (has_gate) {
    check_same(*w_gate, w_up, kOp, "w_gate", "w_up", true);
  }
  TORCH_CHECK(storage_bits == 16 || storage_bits == 8, kOp,
              ": argument 'storage_bits' must be 16 (keep values in the compute dtype) or 8 (int8 with a scale ",
              "per 64 values), got ", storage_bits);
  TORCH_CHECK(derivative_bits >= 0 && derivative_bits <= kernels::kMaxFewbitBits, kOp,
              ": argument 'derivative_bits' must be 0 (exact, by inverting the kept output) or 1..",
              kernels::kMaxFewbitBits, " (few-bit code), got ", derivative_bits);
  return {x.reshape({-1, hidden}), parse_block(activation, has_gate), parse_policy(policy)};
}

at::Tensor output_view(const at::Tensor& y2d, const at::Tensor& x) { return y2d.view(x.sizes()); }

at::Tensor fused_mlp_autograd(const at::Tensor& x, const at::Tensor& w_up, const at::Tensor& w_down,
                              const std::optional<at::Tensor>& w_gate, c10::string_view activation,
                              c10::string_view policy, int64_t storage_bits, int64_t derivative_bits) {
  const Checked c = check_args(x, w_up, w_down, w_gate, std::string(activation), std::string(policy), storage_bits,
                               derivative_bits);
  const at::Tensor wg = c.kind.gated ? *w_gate : at::Tensor();
  if (c.policy == Policy::kNone) return output_view(plain_block(c.x2d, w_up, w_down, wg, c.kind), x);
  // autograd::Function needs defined tensors: a non-gated block passes w_up in
  // the gate slot, which forward and backward then ignore.
  at::Tensor y = FusedMLPFunction::apply(c.x2d, w_up, w_down, c.kind.gated ? wg : w_up, int64_t(c.kind.act),
                                         c.kind.gated,
                                         int64_t(c.policy), storage_bits, derivative_bits);
  return output_view(y, x);
}

// Below autograd nothing is saved: every policy computes the same forward.
at::Tensor fused_mlp_inference(const at::Tensor& x, const at::Tensor& w_up, const at::Tensor& w_down,
                               const std::optional<at::Tensor>& w_gate, c10::string_view activation,
                               c10::string_view policy, int64_t storage_bits, int64_t derivative_bits) {
  const Checked c = check_args(x, w_up, w_down, w_gate, std::string(activation), std::string(policy), storage_bits,
                               derivative_bits);
  if (c.kind.gated) {
    auto r = gated_forward(at::linear(c.x2d, *w_gate), at::linear(c.x2d, w_up), c.kind.act, false);
    return output_view(at::linear(r.h, w_down), x);
  }
  return output_view(plain_block(c.x2d, w_up, w_down, at::Tensor(), c.kind), x);
}

}  // namespace
}  // namespace unswag::ops

TORCH_LIBRARY_IMPL(unswag, Autograd, m) { m.impl("fused_mlp", &unswag::ops::fused_mlp_autograd); }
TORCH_LIBRARY_IMPL(unswag, CompositeExplicitAutograd, m) {
  m.impl("fused_mlp", &unswag::ops::fused_mlp_inference);
}

namespace unswag {
at::Tensor fused_mlp(const at::Tensor& x, const at::Tensor& w_up, const at::Tensor& w_down,
                     const std::optional<at::Tensor>& w_gate, const std::string& activation, const std::string& policy,
                     int64_t storage_bits, int64_t derivative_bits) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("unswag::fused_mlp", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, c10::string_view, c10::string_view,
                                         int64_t, int64_t)>();
  return op.call(x, w_up, w_down, w_gate, activation, policy, storage_bits, derivative_bits);
}
}  // namespace unswag
