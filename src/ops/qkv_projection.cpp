// unswag::qkv_projection: the q, k and v projections of one input (three
// nn.Linear maps of x) whose backward accumulates grad_x in place. Three
// separate Linear modules leave autograd three [N, hidden] gradients for x and
// two elementwise adds to sum them (about 1 ms at 128k tokens x 2048 on an
// H100); here the second and third products add into the first inside the
// GEMM (addmm_, beta = 1), so no add kernel runs and no extra buffer lives.
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/common.h"
#include "unswag/nn/functional.h"

namespace unswag {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A missing bias arrives as a 0-element placeholder (autograd::Function takes
// no undefined inputs); has_bias says which are real.
struct QkvFunction : public torch::autograd::Function<QkvFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk,
                               const at::Tensor& wv, const at::Tensor& bq, const at::Tensor& bk, const at::Tensor& bv,
                               std::vector<bool> has_bias) {
    ctx->save_for_backward({x, wq, wk, wv});
    ctx->saved_data["bias"] = has_bias;
    ctx->set_materialize_grads(false);  // an unused output costs no GEMM in backward
    auto lin = [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, bool real) {
      return real ? at::linear(x, w, b) : at::linear(x, w);
    };
    return {lin(x, wq, bq, has_bias[0]), lin(x, wk, bk, has_bias[1]), lin(x, wv, bv, has_bias[2])};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const int64_t n = x.size(-1);
    const at::Tensor x2 = x.reshape({-1, n});
    const auto has_bias = ctx->saved_data["bias"].toBoolList();
    at::Tensor gx;
    variable_list out(8);
    for (int i = 0; i < 3; ++i) {
      if (!grads[i].defined()) continue;  // that output was not used
      const at::Tensor& w = saved[1 + i];
      const at::Tensor g = grads[i].reshape({-1, w.size(0)});
      if (ctx->needs_input_grad(0)) {
        if (!gx.defined()) gx = at::mm(g, w);
        else gx.addmm_(g, w);
      }
      if (ctx->needs_input_grad(1 + i)) out[1 + i] = at::mm(g.t(), x2);
      if (has_bias[i] && ctx->needs_input_grad(4 + i)) out[4 + i] = g.sum(0);
    }
    if (gx.defined()) out[0] = gx.view(x.sizes());
    return out;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_projection(const at::Tensor& x, const at::Tensor& wq,
                                                              const at::Tensor& wk, const at::Tensor& wv,
                                                              const std::optional<at::Tensor>& bq,
                                                              const std::optional<at::Tensor>& bk,
                                                              const std::optional<at::Tensor>& bv) {
  const char* op = "qkv_projection";
  ops::check_float_tensor(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  const int64_t n = x.size(-1);
  const std::pair<const at::Tensor*, const char*> weights[] = {{&wq, "wq"}, {&wk, "wk"}, {&wv, "wv"}};
  for (const auto& [w, name] : weights) {
    ops::check_same(*w, x, op, name, "x", /*same_shape=*/false);
    TORCH_CHECK(w->dim() == 2 && w->size(1) == n, op, ": argument '", name, "' must be [out, ", n,
                "] for x of shape ", x.sizes(), ", got ", w->sizes());
  }
  const std::pair<const std::optional<at::Tensor>*, std::pair<const at::Tensor*, const char*>> biases[] = {
      {&bq, {&wq, "bq"}}, {&bk, {&wk, "bk"}}, {&bv, {&wv, "bv"}}};
  for (const auto& [b, wn] : biases) {
    if (!b->has_value() || !(*b)->defined()) continue;
    ops::check_same(**b, x, op, wn.second, "x", /*same_shape=*/false);
    TORCH_CHECK((*b)->dim() == 1 && (*b)->size(0) == wn.first->size(0), op, ": argument '", wn.second,
                "' must be [", wn.first->size(0), "], got ", (*b)->sizes());
  }
  auto real = [](const std::optional<at::Tensor>& b) { return b.has_value() && b->defined(); };
  const at::Tensor none = at::empty({0}, x.options());
  auto arg = [&](const std::optional<at::Tensor>& b) { return real(b) ? *b : none; };
  const auto r = QkvFunction::apply(x, wq, wk, wv, arg(bq), arg(bk), arg(bv),
                                    std::vector<bool>{real(bq), real(bk), real(bv)});
  return {r[0], r[1], r[2]};
}

}  // namespace unswag

TORCH_LIBRARY_FRAGMENT(unswag, m) {
  m.def("qkv_projection(Tensor x, Tensor wq, Tensor wk, Tensor wv, Tensor? bq=None, Tensor? bk=None, "
        "Tensor? bv=None) -> (Tensor q, Tensor k, Tensor v)");
}
TORCH_LIBRARY_IMPL(unswag, CompositeImplicitAutograd, m) { m.impl("qkv_projection", &unswag::qkv_projection); }
