// Packet-Switched Attention (include/unswag/nn/psa.h, docs/psa.md): the
// router (Gumbel-softmax with the straight-through estimator in training,
// arg-max in eval, or the hashed random router), the writes each route makes
// and the reads every token makes, in ATen compositions so autograd reaches
// every parameter; the sequence primitives are unswag::causal_depthwise_conv1d
// and unswag::linear_scan, the signal attention a gather / attend / scatter.
#include "unswag/nn/psa.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <memory>
#include <mutex>

#include "kernels/psa.h"
#include "kernels/psa_decode.h"
#include "ops/common.h"
#include "unswag/nn/functional.h"
#include "unswag/nn/psa_ops.h"

namespace unswag::nn {
namespace {

using torch::Tensor;

// An integer device scalar read back without draining the launch queue: the
// copy into pinned host memory and an event are queued now, and the returned
// function waits for that event only. Work queued after this point keeps the
// GPU busy while the host waits, where .item() would leave it idle until the
// host has launched the next kernels. On the CPU the value is read at once.
std::function<int64_t()> read_back_later(const Tensor& value) {
  if (!value.is_cuda()) {
    const int64_t v = value.item<int64_t>();
    return [v] { return v; };
  }
  Tensor host = torch::empty({}, value.options().device(torch::kCPU).dtype(torch::kLong).pinned_memory(true));
  host.copy_(value, /*non_blocking=*/true);
  auto ready = std::make_shared<c10::Event>(c10::DeviceType::CUDA);
  ready->record(c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).getStream(value.device()));
  return [host, ready] {
    ready->synchronize();
    return host.item<int64_t>();
  };
}

using kernels::splitmix64;

at::ScalarType accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

void PSAConfig::validate(const std::string& src) const {
  TORCH_CHECK(kernel_size >= 1, src, ": kernel_size must be >= 1, got ", kernel_size);
  TORCH_CHECK(window >= 0, src, ": window must be >= 0 (0: no window), got ", window);
  double sum = 0;
  for (double s : target_shares) {
    TORCH_CHECK(s >= 0 && s <= 1, src, ": target_shares must each lie in [0, 1], got ", s);
    sum += s;
  }
  TORCH_CHECK(std::abs(sum - 1.0) < 1e-6, src, ": target_shares (prune, local, summary, signal) must sum to 1, got ",
              sum);
  TORCH_CHECK(load_loss_weight >= 0, src, ": load_loss_weight must be >= 0, got ", load_loss_weight);
  TORCH_CHECK(z_loss_weight >= 0, src, ": z_loss_weight must be >= 0, got ", z_loss_weight);
  TORCH_CHECK(entropy_loss_weight >= 0, src, ": entropy_loss_weight must be >= 0, got ", entropy_loss_weight);
  TORCH_CHECK(controller_gamma >= 0, src, ": controller_gamma must be >= 0, got ", controller_gamma);
  TORCH_CHECK(temperature > 0, src, ": temperature must be positive, got ", temperature);
  TORCH_CHECK(summary == "ema" || summary == "linear_attention", src,
              ": summary must be \"ema\" or \"linear_attention\", got \"", summary, "\"");
  TORCH_CHECK(std::isfinite(lambda_init), src, ": lambda_init must be finite, got ", lambda_init);
  TORCH_CHECK(!joint_softmax || window > 0, src,
              ": joint_softmax joins the window's and the signal tokens' softmax and needs window > 0, got window ",
              window);
}

// ------------------------------------------------------------- KV buffers --

void KVBuffer::append(const Tensor& k_new, const Tensor& v_new) {
  TORCH_CHECK(k_new.dim() == 4 && k_new.size(0) == 1 && v_new.sizes() == k_new.sizes(),
              "KVBuffer::append: k and v must be [1, Hkv, n, D] of one shape, got ", k_new.sizes(), " and ",
              v_new.sizes());
  const int64_t n = k_new.size(2);
  if (n == 0) return;
  reserve(length + n, k_new.size(1), k_new.size(3), k_new.options());
  k.narrow(2, length, n).copy_(k_new);
  v.narrow(2, length, n).copy_(v_new);
  length += n;
}

void KVBuffer::reserve(int64_t need, int64_t kv_heads, int64_t head_dim, const torch::TensorOptions& options) {
  const int64_t capacity = k.defined() ? k.size(2) : 0;
  if (need <= capacity) return;
  // Growth by 1/8 keeps appends amortised O(1) (each slot is copied about 8
  // times) while the capacity stays within 12.5% of what is filled: the
  // cache's bytes are its point. The first fill is exact (a prompt's size).
  const int64_t grown = capacity == 0 ? need : std::max(need, capacity + capacity / 8 + 1);
  Tensor k2 = torch::empty({1, kv_heads, grown, head_dim}, options);
  Tensor v2 = torch::empty({1, kv_heads, grown, head_dim}, options);
  if (length > 0) {
    k2.narrow(2, 0, length).copy_(k.narrow(2, 0, length));
    v2.narrow(2, 0, length).copy_(v.narrow(2, 0, length));
  }
  k = k2;
  v = v2;
}

Tensor KVBuffer::keys() const { return k.narrow(2, 0, length); }
Tensor KVBuffer::values() const { return v.narrow(2, 0, length); }

int64_t KVBuffer::bytes_allocated() const {
  int64_t b = 0;
  for (const Tensor* t : {&k, &v})
    if (t->defined()) b += t->numel() * int64_t(t->element_size());
  return b;
}

int64_t PSACache::bytes_allocated() const {
  int64_t b = signal.bytes_allocated();
  for (const Tensor* t : {&conv_tail, &summary, &window_k, &window_v, &window_bias, &window_signal, &fused.ring_k,
                          &fused.ring_v, &fused.ring_keep, &fused.signal_count})
    if (t->defined()) b += t->numel() * int64_t(t->element_size());
  return b;
}

int64_t PSACache::signal_tokens() const {
  return fused.active ? int64_t(fused.signal_count.item<int32_t>()) : signal.length;
}

namespace {

// Moves the window into the fused decode's ring (token j at slot j % W) and
// the signal count onto the device; makes the conv tail and the register.
void enter_fused(PSACache& c, int64_t kv_heads, int64_t head_dim, int64_t kernel_size, int64_t window,
                 const torch::TensorOptions& opt) {
  if (c.fused.active) return;
  auto& f = c.fused;
  const auto dev = opt.device();
  const int64_t kv_dim = kv_heads * head_dim;
  if (window > 0) {
    f.ring_k = torch::zeros({kv_heads, window, head_dim}, opt);
    f.ring_v = torch::zeros({kv_heads, window, head_dim}, opt);
    f.ring_keep = torch::zeros({window}, opt.dtype(torch::kFloat));
    const int64_t n = c.window_k.defined() ? c.window_k.size(2) : 0;
    if (n > 0) {
      const Tensor slots = torch::arange(c.tokens - n, c.tokens, opt.dtype(torch::kLong)).remainder(window);
      f.ring_k.index_copy_(1, slots, c.window_k[0]);
      f.ring_v.index_copy_(1, slots, c.window_v[0]);
      f.ring_keep.index_copy_(0, slots, (c.window_bias[0] == 0).to(torch::kFloat));
    }
  }
  c.window_k = c.window_v = c.window_bias = Tensor();
  if (kernel_size > 1) {
    c.conv_tail = c.conv_tail.defined() ? c.conv_tail.contiguous()
                                        : torch::zeros({1, kernel_size - 1, kv_dim}, opt);
  }
  if (!c.summary.defined()) c.summary = torch::zeros({1, kv_dim}, opt.dtype(torch::kFloat));
  c.summary = c.summary.contiguous();
  f.signal_count = torch::full({1}, c.signal.length, torch::TensorOptions().device(dev).dtype(torch::kInt));
  f.signal_bound = c.signal.length;
  f.step = torch::zeros({2}, torch::TensorOptions().device(dev).dtype(torch::kInt));
  f.active = true;
}

// The inverse: the window back to window_k/v/bias (the last min(W - 1,
// tokens) tokens, oldest first), the signal length read back.
void leave_fused(PSACache& c, int64_t window) {
  if (!c.fused.active) return;
  auto& f = c.fused;
  c.signal.length = f.signal_count.item<int32_t>();
  const int64_t n = std::min(window - 1, c.tokens);
  if (window > 0 && n > 0) {
    const Tensor slots =
        torch::arange(c.tokens - n, c.tokens, f.ring_k.options().dtype(torch::kLong)).remainder(window);
    c.window_k = f.ring_k.index_select(1, slots).unsqueeze(0);
    c.window_v = f.ring_v.index_select(1, slots).unsqueeze(0);
    c.window_bias = ((1 - f.ring_keep.index_select(0, slots)) * kPrunedKeyBias).unsqueeze(0);
  }
  f = PSACache::Fused();
}

}  // namespace

namespace {

// The "linear_attention" summary register: per kv head h, with gamma_h =
// sigmoid(theta_h), w_t = z_sum,t (one in value) and phi = elu + 1 > 0,
//
//   S_t = gamma_h^{w_t} S_{t-1} + w_t phi(k_t) [v_t, 1]^T        [D, D + 1]
//   m_t = phi(q_t)^T S_t[:, :D] / (phi(q_t)^T S_t[:, D] + 1)
//
// (normalised linear attention over the summary tokens, decayed per write;
// the last column counts the weights, so the denominator is the same product).
// The + 1 is a null key of unit weight and zero value: before any summary
// write m is 0, and dm/d(numerator) stays <= 1. With a tiny eps instead,
// the straight-through gates' soft gradient into S (nonzero even where no
// token wrote) was scaled by 1/eps: the first CPU run's router gradient
// blew up and, clipped, stalled the whole model (loss 5.8 vs 3.4).
// Chunkwise, as gated linear attention is computed: with l_t = w_t log gamma_h
// and L the cumulative l inside a chunk of C tokens, position i of a chunk
// reads the chunk's writes j <= i with weight exp(L_i - L_j) (a masked C x C
// product) and the state before the chunk with weight exp(L_i); the states
// before the chunks follow from one linear_scan over the chunks, S_n =
// exp(L_C) S_{n-1} + sum_j exp(L_C - L_j) w_j phi(k_j) [v_j, 1]^T. Every
// exponent is <= 0, so nothing overflows. All ATen, autograd as is.
// q [B, H, T, D], k/v [B, Hkv, T, D], w [B, T], log_gamma [Hkv], all in one
// float dtype; state [B, Hkv, D, D + 1] or undefined (zeros). Returns m
// [B, H, T, D] and the state after the last token.
constexpr int64_t kSummaryChunk = 64;

std::pair<Tensor, Tensor> summary_linear_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                                   const Tensor& w, const Tensor& log_gamma, const Tensor& state) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), G = H / Hkv;
  const auto opt = q.options();
  const Tensor s0 = state.defined() ? state.to(opt) : torch::zeros({B, Hkv, D, D + 1}, opt);
  if (T == 0) return {torch::zeros_like(q), s0};
  const int64_t C = std::min(kSummaryChunk, T), N = (T + C - 1) / C, pad = N * C - T;
  namespace F = torch::nn::functional;
  auto pad_t = [&](const Tensor& t, int64_t dim_from_end) {  // zero-pads the time axis to N * C
    if (pad == 0) return t;
    std::vector<int64_t> p(2 * dim_from_end, 0);
    p.back() = pad;
    return F::pad(t, F::PadFuncOptions(p));
  };
  const Tensor fq = pad_t(torch::elu(q) + 1, 2).reshape({B, Hkv, G, N, C, D});
  const Tensor kw = pad_t((torch::elu(k) + 1) * w.reshape({B, 1, T, 1}), 2).reshape({B, Hkv, 1, N, C, D});
  const Tensor v1 =
      pad_t(torch::cat({v, torch::ones({B, Hkv, T, 1}, opt)}, -1), 2).reshape({B, Hkv, 1, N, C, D + 1});
  const Tensor ell = pad_t(w.reshape({B, 1, T}) * log_gamma.view({1, Hkv, 1}), 1).reshape({B, Hkv, N, C});
  const Tensor L = ell.cumsum(-1);                                   // [B, Hkv, N, C]
  const Tensor causal = torch::ones({C, C}, opt.dtype(torch::kBool)).tril();
  const Tensor decay =
      (L.unsqueeze(-1) - L.unsqueeze(-2)).masked_fill(causal.logical_not(), -std::numeric_limits<double>::infinity()).exp();  // [B, Hkv, N, C, C]
  const Tensor intra = torch::matmul(torch::matmul(fq, kw.transpose(-1, -2)) * decay.unsqueeze(2), v1);
  // Each chunk's writes, decayed to its end; then the states before each chunk.
  const Tensor L_end = L.select(-1, C - 1);                          // [B, Hkv, N]
  const Tensor to_end = (L_end.unsqueeze(-1) - L).exp().unsqueeze(-1);  // [B, Hkv, N, C, 1]
  const Tensor dS = torch::matmul((kw.squeeze(2) * to_end).transpose(-1, -2), v1.squeeze(2));  // [B, Hkv, N, D, D+1]
  const int64_t E = Hkv * D * (D + 1);
  const Tensor a = L_end.exp().permute({0, 2, 1}).unsqueeze(-1).expand({B, N, Hkv, D * (D + 1)}).reshape({B, N, E});
  const Tensor after = unswag::linear_scan(a, dS.permute({0, 2, 1, 3, 4}).reshape({B, N, E}), s0.reshape({B, E}));
  const Tensor before = torch::cat({s0.reshape({B, 1, E}), after.narrow(1, 0, N - 1)}, 1)
                            .reshape({B, N, Hkv, D, D + 1})
                            .permute({0, 2, 1, 3, 4})
                            .unsqueeze(2);                           // [B, Hkv, 1, N, D, D+1]
  const Tensor inter = torch::matmul(fq * L.exp().reshape({B, Hkv, 1, N, C, 1}), before);
  const Tensor r = (intra + inter).reshape({B, H, N * C, D + 1}).narrow(2, 0, T);
  const Tensor m = r.narrow(-1, 0, D) / (r.narrow(-1, D, 1) + 1);
  return {m, after.select(1, N - 1).reshape({B, Hkv, D, D + 1})};
}

}  // namespace

// ------------------------------------------------------------------ layer --

PacketSwitchedAttentionImpl::PacketSwitchedAttentionImpl(int64_t hidden, int64_t heads_, int64_t kv_heads_,
                                                         int64_t head_dim_, bool qkv_bias, bool o_bias,
                                                         const PSAConfig& config, int64_t layer)
    : heads(heads_), kv_heads(kv_heads_), head_dim(head_dim_), kv_dim(kv_heads_ * head_dim_),
      kernel_size(config.kernel_size), window(config.window), layer_index(layer), config_(config) {
  config.validate("PacketSwitchedAttention");
  TORCH_CHECK(hidden > 0 && heads > 0 && kv_heads > 0 && head_dim > 0 && heads % kv_heads == 0,
              "PacketSwitchedAttention: needs positive sizes with heads a multiple of kv_heads, got hidden ", hidden,
              ", heads ", heads, ", kv_heads ", kv_heads, ", head_dim ", head_dim);
  TORCH_CHECK(head_dim % 2 == 0, "PacketSwitchedAttention: head_dim must be even for RoPE, got ", head_dim);
  using torch::nn::Linear;
  using torch::nn::LinearOptions;
  q_proj = register_module("q_proj", Linear(LinearOptions(hidden, heads * head_dim).bias(qkv_bias)));
  k_proj = register_module("k_proj", Linear(LinearOptions(hidden, kv_dim).bias(qkv_bias)));
  v_proj = register_module("v_proj", Linear(LinearOptions(hidden, kv_dim).bias(qkv_bias)));
  o_proj = register_module("o_proj", Linear(LinearOptions(heads * head_dim, hidden).bias(o_bias)));
  router = register_module("router", Linear(LinearOptions(hidden, 4).bias(true)));
  conv_weight = register_parameter("conv_weight", torch::empty({kv_dim, kernel_size}));
  summary_decay = register_parameter(
      "summary_decay", torch::empty({config.summary == "linear_attention" ? kv_heads : kv_dim}));
  lambda_local = register_parameter("lambda_local", torch::empty({heads * head_dim}));
  lambda_summary = register_parameter("lambda_summary", torch::empty({heads * head_dim}));
  route_bias = register_buffer("route_bias", torch::zeros({4}));
  generator_ = at::make_generator<at::CPUGeneratorImpl>(splitmix64(config.seed ^ splitmix64(uint64_t(layer))));
  reset_psa_parameters();
}

void PacketSwitchedAttentionImpl::reset_psa_parameters() {
  torch::NoGradGuard no_grad;
  router->weight.normal_(0.0, 0.02);
  // log(target) biases: a softmax over them alone gives the target shares.
  std::vector<double> log_targets;
  for (double s : config_.target_shares) log_targets.push_back(std::log(std::max(s, 1e-6)));
  router->bias.copy_(torch::tensor(log_targets, torch::kDouble));
  conv_weight.fill_(1.0 / double(kernel_size));  // c_t = mean of the last Kc written values
  // Kept fraction sigmoid(theta) from 0.9 to 0.999 across channels (or kv
  // heads), geometric in 1 - keep: time constants from 10 to 1000 summary writes.
  const int64_t n = summary_decay.numel();
  const Tensor frac = n > 1 ? torch::arange(n, torch::kDouble) / double(n - 1) : torch::zeros({n}, torch::kDouble);
  const Tensor forget = 0.1 * torch::pow(0.01, frac);
  summary_decay.copy_(torch::log((1 - forget) / forget));
  lambda_local.fill_(config_.lambda_init);
  lambda_summary.fill_(config_.lambda_init);
  route_bias.zero_();
}

void PacketSwitchedAttentionImpl::set_temperature(double tau) {
  TORCH_CHECK(tau > 0 && std::isfinite(tau), "PacketSwitchedAttention::set_temperature: tau must be positive, got ",
              tau);
  config_.temperature = tau;
}

void PacketSwitchedAttentionImpl::update_controller() {
  if (config_.random_router || !train_fractions_.defined()) return;
  torch::NoGradGuard no_grad;
  const Tensor target = target_shares_like(route_bias);
  route_bias.add_(config_.controller_gamma * (target - train_fractions_.to(route_bias.options())));
}

PSARouteStats PacketSwitchedAttentionImpl::route_stats() const {
  PSARouteStats s;
  if (!fractions_.defined()) return s;
  const Tensor f = fractions_.to(torch::kCPU, torch::kDouble);
  for (int r = 0; r < 4; ++r) s.fractions[r] = f[r].item<double>();
  s.agreement = agreement_.defined() ? agreement_.item<double>() : 1.0;
  s.tokens = routes_.numel();
  return s;
}

// Route r of token (row b, position p): the first r with u < share_0 + ... +
// share_r, u a 53-bit uniform hashed from (seed, layer, b, p). Depends on the
// token's own coordinates only, so it is causal and the same in prefill and
// decode, training and eval.
Tensor PacketSwitchedAttentionImpl::random_routes(const Tensor& positions) const {
  const Tensor pos = positions.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t B = pos.size(0), T = pos.size(1);
  Tensor out = torch::empty({B, T}, torch::kLong);
  const int64_t* p = pos.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  const uint64_t base = splitmix64(splitmix64(config_.seed) ^ uint64_t(layer_index));
  for (int64_t b = 0; b < B; ++b) {
    const uint64_t row = splitmix64(base ^ uint64_t(b));
    for (int64_t t = 0; t < T; ++t) {
      const double u = double(splitmix64(row ^ uint64_t(p[b * T + t])) >> 11) * 0x1.0p-53;
      int64_t r = 0;
      double cum = config_.target_shares[0];
      while (r < 3 && u >= cum) cum += config_.target_shares[++r];
      o[b * T + t] = r;
    }
  }
  return out.to(positions.device());
}

Tensor PacketSwitchedAttentionImpl::target_shares_like(const Tensor& like) {
  if (!target_shares_.defined() || target_shares_.device() != like.device())
    target_shares_ = torch::tensor(std::vector<double>(config_.target_shares.begin(), config_.target_shares.end()),
                                   torch::kDouble)
                         .to(like.device());
  return target_shares_.to(like.scalar_type());
}

PacketSwitchedAttentionImpl::Routing PacketSwitchedAttentionImpl::route(const Tensor& x, const Tensor& positions,
                                                                        const Tensor& gumbel_in) {
  const int64_t B = x.size(0), T = x.size(1);
  const auto acc = accumulate_type(x.scalar_type());
  const Tensor logits = router(config_.detach_router_input ? x.detach() : x).to(acc);  // [B, T, 4]
  // No aux losses and full agreement unless the training route sets them.
  auto no_aux = [&] {
    const Tensor zero = torch::zeros({}, x.options().dtype(torch::kFloat));
    aux_loss_ = load_loss_ = z_loss_ = entropy_loss_ = zero;
    agreement_ = torch::ones({}, x.options().dtype(torch::kFloat));
  };
  Routing r;
  if (config_.random_router) {
    no_aux();
    r.index = random_routes(positions);
    r.gates = torch::one_hot(r.index, 4).to(acc);
  } else if (is_training()) {
    Tensor g;
    if (gumbel_in.defined()) {
      TORCH_CHECK(gumbel_in.sizes() == logits.sizes(), "PacketSwitchedAttention: gumbel must be [B, T, 4] = ",
                  logits.sizes(), ", got ", gumbel_in.sizes());
      g = gumbel_in;
    } else {
      // Counter-based noise (kernels::gumbel_at) drawn on the layer's device,
      // keyed by one 64-bit draw of the layer's own generator per call: runs
      // are reproducible on any device, and nothing of size B*T is made on the
      // host (drawing the uniforms there took 5.6 ms of host time per call at
      // 128k tokens, bench_psa --profile, H100, during which the GPU idled).
      kernels::GumbelNoiseParams p;
      {
        auto* gen = generator_.get<at::CPUGeneratorImpl>();
        std::lock_guard<std::mutex> lock(gen->mutex_);
        p.key = gen->random64();
      }
      g = torch::empty({B, T, 4}, x.options().dtype(torch::kFloat));
      p.n = g.numel();
      p.out = g.data_ptr<float>();
      ops::launch(x.device(), p, p.n, &kernels::gumbel_noise_cpu, UNSWAG_CUDA_FN(gumbel_noise_cuda));
    }
    g = g.to(x.device(), acc);
    gumbel_ = g.to(torch::kFloat);
    // The temperature scales the logits before the Gumbel-max draw: the hard
    // route is a sample from softmax(biased / tau), so annealing tau moves
    // training's routes toward eval's arg-max (they coincide as tau -> 0).
    // (The textbook softmax((l + g) / tau) only sharpens the relaxation: its
    // hard sample stays a draw from softmax(l) at every tau, and the
    // train/eval routing gap never closes.)
    if (B * T > 0) {
      // One op each way (unswag::psa_route, src/kernels/psa_route.h): the
      // Gumbel-max route, its straight-through gates (one-hot in value, the
      // gradient of the soft softmax(logits' / tau + g)), the aux losses and
      // the routing statistics, where the ATen composition took ~45 ops.
      const auto fused = unswag::psa_route(logits, route_bias, g, target_shares_like(logits), config_.temperature,
                                           config_.load_loss_weight, config_.z_loss_weight, config_.entropy_loss_weight);
      r.index = fused.route;
      r.gates = fused.gates;
      r.signal_max = fused.signal_max;
      const Tensor losses = fused.losses.to(torch::kFloat), stats = fused.stats.to(torch::kFloat);
      aux_loss_ = losses.select(0, 0);
      load_loss_ = losses.select(0, 1);
      z_loss_ = losses.select(0, 2);
      entropy_loss_ = losses.select(0, 3);
      agreement_ = stats.select(0, 0);
      // The controller steers the noise-free arg-max shares (what eval and
      // generation route by) to the budgets, as DeepSeek-V3's bias does.
      train_fractions_ = stats.narrow(0, 1, 4);
      routes_ = r.index;
      fractions_ = stats.narrow(0, 5, 4);
      return r;
    }
    no_aux();
    r.index = torch::zeros({B, T}, x.options().dtype(torch::kLong));
    r.gates = torch::zeros({B, T, 4}, x.options().dtype(acc));
  } else {
    no_aux();
    r.index = (logits + route_bias.to(acc)).argmax(-1);
    r.gates = torch::one_hot(r.index, 4).to(acc);
  }
  routes_ = r.index;
  fractions_ = T > 0 && B > 0 ? torch::one_hot(r.index, 4).to(torch::kFloat).mean(at::IntArrayRef{0, 1})
                              : torch::zeros({4}, x.options().dtype(torch::kFloat));
  return r;
}

Tensor PacketSwitchedAttentionImpl::forward(const Tensor& x, const Tensor& positions, const Tensor& cos,
                                            const Tensor& sin, const Tensor& gumbel) {
  TORCH_CHECK(x.dim() == 3 && x.size(2) == q_proj->weight.size(1), "PacketSwitchedAttention: x must be [B, T, ",
              q_proj->weight.size(1), "], got ", x.sizes());
  const int64_t B = x.size(0), T = x.size(1);
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == B && positions.size(1) == T,
              "PacketSwitchedAttention: positions must be [B, T] = [", B, ", ", T, "], got ", positions.sizes());
  TORCH_CHECK(cos.dim() == 4 && cos.size(0) == B && cos.size(2) == T && cos.size(3) == head_dim &&
                  sin.sizes() == cos.sizes(),
              "PacketSwitchedAttention: cos and sin must be [B, 1, T, D] = [", B, ", 1, ", T, ", ", head_dim,
              "], got ", cos.sizes(), " and ", sin.sizes());
  return compute(x, cos, sin, route(x, positions, gumbel), nullptr);
}

Tensor PacketSwitchedAttentionImpl::forward_cached(const Tensor& x, const Tensor& positions, const Tensor& cos,
                                                   const Tensor& sin, PSACache& cache) {
  TORCH_CHECK(!is_training(), "PacketSwitchedAttention::forward_cached: call eval() first (cached generation "
              "routes by arg-max)");
  TORCH_CHECK(x.dim() == 3 && x.size(0) == 1, "PacketSwitchedAttention::forward_cached: x must be [1, T, d] ",
              "(the cache holds one sequence), got ", x.sizes());
  TORCH_CHECK(x.size(2) == q_proj->weight.size(1), "PacketSwitchedAttention::forward_cached: x must be [1, T, ",
              q_proj->weight.size(1), "], got ", x.sizes());
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == 1 && positions.size(1) == x.size(1),
              "PacketSwitchedAttention::forward_cached: positions must be [1, ", x.size(1), "], got ",
              positions.sizes());
  TORCH_CHECK(cos.dim() == 4 && cos.size(2) == x.size(1) && cos.size(3) == head_dim && sin.sizes() == cos.sizes(),
              "PacketSwitchedAttention::forward_cached: cos and sin must be [1, 1, ", x.size(1), ", ", head_dim,
              "], got ", cos.sizes(), " and ", sin.sizes());
  torch::NoGradGuard no_grad;
  if (x.size(1) == 1 && fused_decode_) {
    Tensor y = decode_fused(x, cos, sin, cache);
    if (y.defined()) return y;
  }
  leave_fused(cache, window);
  return compute(x, cos, sin, route(x, positions, {}), &cache);
}

Tensor PacketSwitchedAttentionImpl::decode_fused(const Tensor& x, const Tensor& cos, const Tensor& sin,
                                                 PSACache& cache) {
#ifdef UNSWAG_WITH_CUDA
  const auto dt = x.scalar_type();
  if (!x.is_cuda() || config_.random_router || head_dim > 256 ||
      !(dt == torch::kFloat || dt == torch::kHalf || dt == torch::kBFloat16))
    return {};
  // Experimental options: the composition only.
  if (config_.all_tokens_read_signal || config_.joint_softmax || config_.summary != "ema") return {};
  if (fused_operands_.empty()) {
    for (const auto& list : {parameters(), buffers()})
      fused_operands_.insert(fused_operands_.end(), list.begin(), list.end());
  }
  for (const Tensor& t : fused_operands_)
    if (t.scalar_type() != dt || t.device() != x.device() || !t.is_contiguous()) return {};
  if (cos.scalar_type() != dt || sin.scalar_type() != dt || cos.device() != x.device()) return {};
  const auto opt = x.options();
  enter_fused(cache, kv_heads, head_dim, kernel_size, window, opt);
  auto& f = cache.fused;
  auto& sig = cache.signal;
  if (f.signal_bound + 1 > (sig.k.defined() ? sig.k.size(2) : 0)) {
    // The bound reached the capacity: read the counter back (the only sync,
    // about once per capacity / 8 steps) and grow if the count needs it.
    sig.length = f.signal_count.item<int32_t>();
    f.signal_bound = sig.length;
    sig.reserve(sig.length + 1, kv_heads, head_dim, opt);
  }
  kernels::PSADecodeParams p;
  p.dtype = ops::to_kernel_dtype(dt);
  p.hidden = x.size(2);
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.head_dim = head_dim;
  p.kernel_size = kernel_size;
  p.window = window;
  p.tokens = cache.tokens;
  p.scale = 1.0 / std::sqrt(double(head_dim));
  p.signal_capacity = sig.k.size(2);
  p.signal_bound = f.signal_bound;
  const int64_t ws = kernels::psa_decode_workspace_elems(p), part = kernels::psa_decode_partial_elems(p);
  if (!f.workspace.defined() || f.workspace.numel() < ws) f.workspace = torch::empty({ws}, opt);
  if (!f.partials.defined() || f.partials.numel() < part)
    f.partials = torch::empty({part}, opt.dtype(torch::kFloat));
  const Tensor xc = x.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  auto ptr = [](const Tensor& t) -> const void* { return t.defined() ? t.const_data_ptr() : nullptr; };
  p.x = xc.const_data_ptr();
  p.wq = ptr(q_proj->weight);
  p.bq = ptr(q_proj->bias);
  p.wk = ptr(k_proj->weight);
  p.bk = ptr(k_proj->bias);
  p.wv = ptr(v_proj->weight);
  p.bv = ptr(v_proj->bias);
  p.wr = ptr(router->weight);
  p.br = ptr(router->bias);
  p.wo = ptr(o_proj->weight);
  p.bo = ptr(o_proj->bias);
  p.cos = cc.const_data_ptr();
  p.sin = sc.const_data_ptr();
  p.route_bias = route_bias.const_data_ptr();
  p.conv_weight = conv_weight.const_data_ptr();
  p.summary_decay = summary_decay.const_data_ptr();
  p.lambda_local = lambda_local.const_data_ptr();
  p.lambda_summary = lambda_summary.const_data_ptr();
  p.conv_tail = kernel_size > 1 ? cache.conv_tail.data_ptr() : nullptr;
  p.summary = cache.summary.data_ptr<float>();
  p.ring_k = window > 0 ? f.ring_k.data_ptr() : nullptr;
  p.ring_v = window > 0 ? f.ring_v.data_ptr() : nullptr;
  p.ring_keep = window > 0 ? f.ring_keep.data_ptr<float>() : nullptr;
  p.signal_k = sig.k.data_ptr();
  p.signal_v = sig.v.data_ptr();
  p.signal_count = f.signal_count.data_ptr<int32_t>();
  p.workspace = f.workspace.data_ptr();
  p.partials = f.partials.data_ptr<float>();
  p.step = f.step.data_ptr<int32_t>();
  routes_ = torch::empty({1, 1}, opt.dtype(torch::kLong));
  fractions_ = torch::empty({4}, opt.dtype(torch::kFloat));
  Tensor y = torch::empty({1, 1, p.hidden}, opt);
  p.route_out = routes_.data_ptr<int64_t>();
  p.fractions_out = fractions_.data_ptr<float>();
  p.y = y.data_ptr();
  kernels::psa_decode_step_cuda(p, ops::current_cuda_stream(x.device()));
  // Eval routing's statistics, as route() leaves them (made once per device, not per step).
  if (!decode_zero_.defined() || decode_zero_.device() != x.device()) {
    decode_zero_ = torch::zeros({}, opt.dtype(torch::kFloat));
    decode_one_ = torch::ones({}, opt.dtype(torch::kFloat));
  }
  aux_loss_ = load_loss_ = z_loss_ = entropy_loss_ = decode_zero_;
  agreement_ = decode_one_;
  f.signal_bound += 1;
  cache.tokens += 1;
  return y;
#else
  (void)x, (void)cos, (void)sin, (void)cache;
  return {};
#endif
}

Tensor PacketSwitchedAttentionImpl::compute(const Tensor& x, const Tensor& cos, const Tensor& sin,
                                            const Routing& routes, PSACache* cache) {
  const int64_t B = x.size(0), T = x.size(1), H = heads, Hkv = kv_heads, D = head_dim, G = heads / kv_heads;
  Routing routing = routes;
  if (cache == nullptr && B * T > 0 && !routing.max_signal && !config_.all_tokens_read_signal &&
      !(config_.joint_softmax && window > 0)) {
    // The packed signal length, started before the projections are queued so
    // that reading it back waits on the router's kernels only.
    routing.max_signal = read_back_later(routing.signal_max.defined() ? routing.signal_max
                                                                      : (routing.index == kSignal).sum(1).max());
  }
  const auto dt = x.scalar_type(), acc = accumulate_type(dt);
  // Token-major [B, T, heads, D] as the projections write it; RoPE runs on
  // that layout in one pass (unswag::rotary_embedding), and q and k are its
  // [B, heads, T, D] views, the layout FlashAttention reads without a copy.
  // One op for the three projections (its backward sums grad x inside the
  // GEMMs); v is [B, T, kv_dim].
  const auto [q_flat, k_flat, v] = unswag::qkv_projection(x, q_proj->weight, k_proj->weight, v_proj->weight,
                                                          q_proj->bias, k_proj->bias, v_proj->bias);
  const Tensor q_lin = q_flat.view({B, T, H, D});
  const Tensor k_lin = k_flat.view({B, T, Hkv, D});
  const Tensor v_heads = v.view({B, T, Hkv, D}).transpose(1, 2);

  // Training on CUDA: RoPE, the value streams, the window and the signal
  // packing in one autograd node (window_streams_and_signal), then the signal
  // attention and the combine.
  if (fused_window_pack_ && cache == nullptr && window > 0 && B * T > 0 && config_.summary == "ema" &&
      !config_.all_tokens_read_signal && !config_.joint_softmax && unswag::value_streams_fused(v) &&
      unswag::window_attention_fused(q_lin.transpose(1, 2), k_lin.transpose(1, 2), v_heads)) {
    const Tensor rate = torch::sigmoid(-summary_decay.to(acc));  // 1 - sigmoid(theta), [kv_dim]
    // Without GQA, lambda_local scales the conv's channels one to one: folded
    // into its taps (in fp32, the taps' compute type), the combine takes the
    // local read as it comes and its gradient is dy itself (no read of local
    // and no write of d local in the combine's backward: about 0.35 ms at
    // 128k x 2048 on an H100).
    const bool fold_local = H == Hkv;
    const Tensor taps =
        fold_local ? conv_weight.to(acc) * lambda_local.to(acc).unsqueeze(1) : conv_weight;
    const auto r = window_streams_and_signal(q_lin, k_lin, v, cos, sin, rate, taps, routing);
    return o_proj(unswag::psa_combine_packed(r.signal, r.signal_rows, r.pack_rows, routing.gates.select(-1, kSignal),
                                             r.window, r.local, fold_local ? Tensor() : lambda_local, r.summary,
                                             lambda_summary));
  }
  const Tensor q = unswag::rotary_embedding(q_lin, cos, sin).transpose(1, 2);  // [B, H, T, D]
  const Tensor k = unswag::rotary_embedding(k_lin, cos, sin).transpose(1, 2);  // [B, Hkv, T, D]

  // Local: every non-pruned token writes its value into the conv stream,
  // gated by 1 - z_prune (one in value; the router's straight-through
  // gradient), one pass each way on CUDA (unswag::gate_tokens).
  const Tensor u = unswag::gate_tokens(v, 1 - routing.gates.select(-1, kPrune));
  const Tensor u_heads = u.view({B, T, Hkv, D}).transpose(1, 2);  // the window's values too
  Tensor local;
  if (cache != nullptr) {
    const int64_t tail = kernel_size - 1;
    const Tensor prev = cache->conv_tail.defined() ? cache->conv_tail : torch::zeros({1, tail, kv_dim}, v.options());
    const Tensor u_ext = torch::cat({prev, u}, 1);
    local = unswag::causal_depthwise_conv1d(u_ext, conv_weight).narrow(1, tail, T);
    cache->conv_tail = u_ext.narrow(1, u_ext.size(1) - tail, tail).clone();
  } else {
    local = T > 0 ? unswag::causal_depthwise_conv1d(u, conv_weight) : torch::zeros_like(u);
  }

  // kv_dim reads into the query space: kv head j serves query heads j*G..j*G+G-1 (as GQA's v).
  auto expand = [&](const Tensor& t) {
    return t.view({B, T, Hkv, 1, D}).expand({B, T, Hkv, G, D}).reshape({B, T, H * D});
  };
  const Tensor z_summary = routing.gates.select(-1, kSummary);  // [B, T] in acc
  const Tensor h0 = cache != nullptr ? cache->summary : Tensor();
  Tensor summary;  // [B, T, kv_dim] (the EMA register) or [B, T, H * D] (linear attention's read)
  if (config_.summary == "linear_attention") {
    // Pre-RoPE q and k: the register is position-free, as a summary should be.
    auto [m, state] = summary_linear_attention(q_lin.transpose(1, 2).to(acc), k_lin.transpose(1, 2).to(acc),
                                               v_heads.to(acc),
                                               z_summary, torch::log_sigmoid(summary_decay.to(acc)), h0);
    if (cache != nullptr) cache->summary = state;
    summary = m.to(dt).transpose(1, 2).reshape({B, T, H * D});
  } else {
    // s_t = (1 - b_t) s_{t-1} + b_t v_t, b_t = z_sum,t (1 - sigmoid(theta)), the
    // state in fp32: unswag::gated_ema_scan forms 1 - b and b v inside the
    // scan (on CUDA no [B, T, kv_dim] fp32 tensor is written either way).
    const Tensor rate = torch::sigmoid(-summary_decay.to(acc));  // 1 - sigmoid(theta), [kv_dim]
    auto [s, last] = unswag::gated_ema_scan(v, z_summary, rate, h0);
    if (cache != nullptr) cache->summary = last;
    summary = s;
  }

  // What every token reads: the window and the signal attention (or the
  // joint read), plus the lambda-scaled local conv and summary register.
  // The window first: its kernels are queued before signal_attention waits
  // for the packed length (they touch disjoint parts of the cache).
  auto summary_read = [&] { return summary.size(2) == H * D ? summary : expand(summary); };
  Tensor read;
  if (config_.joint_softmax && window > 0) {
    const Tensor attn = joint_attention(q, k, v_heads, routing, cache);
    read = attn + lambda_local * expand(local) + lambda_summary * summary_read();
  } else if (config_.all_tokens_read_signal) {
    const Tensor win = window > 0 ? window_attention(q, k, u_heads, routing, cache) : Tensor();
    Tensor attn = signal_read_all(q, k, v_heads, routing, cache);
    if (win.defined()) attn = attn + win.transpose(1, 2).reshape({B, T, H * D});
    read = attn + lambda_local * expand(local) + lambda_summary * summary_read();
  } else {
    const Tensor win = window > 0 ? window_attention(q, k, u_heads, routing, cache) : Tensor();
    const Tensor sig = signal_attention(q, k, v_heads, routing, cache);
    // z_sig: one on the signal tokens and zero elsewhere in value (the gates
    // are one-hot), the straight-through gradient. No mask by route is needed:
    // sig's rows off the signal route are zero, so d gate = sum_c dy sig is
    // zero there anyway.
    const Tensor gate = routing.gates.select(-1, kSignal);
    // One pass each way on CUDA (unswag::psa_combine), the ATen composition elsewhere.
    read = unswag::psa_combine(sig, gate, win, local, lambda_local, summary, lambda_summary);
  }
  if (cache != nullptr) cache->tokens += T;
  return o_proj(read);
}

namespace {

// Each row's signal tokens in order, right-padded to S, as rows of the
// token-major [B * T, heads * D] storage that the projections wrote (q, k, v
// are [B, heads, T, D] views of it): packed row b * S + s holds token
// pack_rows[b * S + s] (-1 on padding: a zero row), and token row b * T + t
// reads packed row unpack_rows[b * T + t] (-1 off the signal route). Each
// index is the other's inverse, so gather_rows' backward is a gather too, and
// every gradient leaves token-major, the layout RoPE's and the projections'
// backward read. Padding sits after every real slot: causal attention never
// lets a real query see it. (Non-signal tokens are scattered into a spare last
// column that is then dropped: no host sync.)
struct SignalPacking {
  Tensor pack_rows, unpack_rows;  // [B * S], [B * T] int64
};
SignalPacking signal_packing(const Tensor& signal, int64_t S) {
  const int64_t B = signal.size(0), T = signal.size(1);
  const auto lopt = signal.options().dtype(torch::kLong);
  const Tensor dest = signal.to(torch::kLong).cumsum(1) - 1;  // [B, T]
  Tensor slots = torch::full({B, S + 1}, -1, lopt);
  slots.scatter_(1, torch::where(signal, dest, S), torch::arange(B * T, lopt).view({B, T}));
  return {slots.narrow(1, 0, S).reshape({B * S}),
          torch::where(signal, dest + torch::arange(B, lopt).view({B, 1}) * S, -1).view({B * T})};
}

// The packed length: the largest row count rounded up to a multiple of 256 so
// that its shape repeats from step to step (attention backends that plan per
// shape, cuDNN's, would otherwise re-plan on every call: ~100 ms measured).
int64_t packed_length(int64_t S_max, int64_t T) {
  return std::min<int64_t>((S_max + 255) / 256 * 256, std::max<int64_t>(T, S_max));
}

// [B, heads, T, D] view of token-major storage -> its [B * T, heads * D] rows (a view).
Tensor token_rows(const Tensor& t) {
  return t.transpose(1, 2).reshape({t.size(0) * t.size(2), t.size(1) * t.size(3)});
}

// RoPE, the value streams, the window read and the signal tokens' packing as
// one autograd node (CUDA, the window kernels' operands). Forward: q, k =
// RoPE of q_lin, k_lin (unswag::rotary_embedding's pass); u = (1 - z_prune) v,
// local = conv(u), summary = EMA scan of v (unswag's ops), the window over
// (q, k, u), and the packed q, k z_sig, v z_sig rows [B * S, heads * D].
// Backward: the window's kernels, whose dq and dk leave with the packed
// rows' dq, dk added (and d z_sig's dk part formed) and RoPE's transposed
// rotation applied (window_attention_cuda_backward's extras): the gradients
// of q_lin and k_lin, with no pass of their own; the conv's backward adding
// the window's du; the scan's backward (from the saved summary, no replay)
// adding (1 - z_prune) du' into dv and summing d z_prune; the packed rows' dv
// added in place. Separate nodes would each write a [B, T, heads, D]
// gradient of q, k, u and v (the signal side's mostly zero rows), autograd
// would sum them, and RoPE's backward would pass over dq and dk again: about
// a dozen more passes over [T, kv_dim] tensors (docs/psa.md).
// The gates are one-hot in value (psa_route's straight-through gates, and
// one_hot in eval and for the random router), so a packed token's z_sig is
// exactly 1: k z_sig and v z_sig are its own rows, packed as they are, and
// only the gradient d z_sig = sum_c (dk_packed k + dv_packed v) is formed, as
// dk and dv take the packed rows.
struct WindowStreamsAndPack : public torch::autograd::Function<WindowStreamsAndPack> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& q_lin,
                                                const Tensor& k_lin, const Tensor& v, const Tensor& gates,
                                                const Tensor& rate, const Tensor& conv_weight, const Tensor& bias,
                                                const Tensor& pack_rows, const Tensor& unpack_rows, const Tensor& cos,
                                                const Tensor& sin, double scale, int64_t window) {
    const int64_t B = q_lin.size(0), T = q_lin.size(1), D = q_lin.size(3), Hkv = k_lin.size(2), BT = B * T;
    // Token-major [B, T, heads, D] storage, [B, heads, T, D] views.
    const Tensor q = unswag::rotary_embedding(q_lin, cos, sin).transpose(1, 2);
    const Tensor k = unswag::rotary_embedding(k_lin, cos, sin).transpose(1, 2);
    const Tensor keep = (1 - gates.select(-1, kPrune)).contiguous();  // [B, T] fp32
    const Tensor z_sum = gates.select(-1, kSummary).contiguous();
    const Tensor u = unswag::gate_tokens(v, keep);
    const Tensor local = unswag::causal_depthwise_conv1d(u, conv_weight);
    const Tensor summary = std::get<0>(unswag::gated_ema_scan(v, z_sum, rate));
    const Tensor u_heads = u.view({B, T, Hkv, D}).transpose(1, 2);
    auto [o, lse] = unswag::window_attention_cuda_forward(q, k, u_heads, bias, scale, window);
    const Tensor qp = unswag::gather_rows(token_rows(q), pack_rows, unpack_rows);
    const Tensor kp = unswag::gather_rows(token_rows(k), pack_rows, unpack_rows);
    const Tensor vp = unswag::gather_rows(v.view({BT, Hkv * D}), pack_rows, unpack_rows);
    // summary is an output, kept for the scan's backward (the combine keeps it too).
    ctx->save_for_backward(
        {q, k, v, u, keep, z_sum, rate, conv_weight, bias, o, lse, pack_rows, summary, unpack_rows, cos, sin});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window"] = window;
    return {o, qp, kp, vp, local, summary};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto sv = ctx->get_saved_variables();
    const Tensor &q = sv[0], &k = sv[1], &v = sv[2], &u = sv[3], &keep = sv[4], &z_sum = sv[5], &rate = sv[6],
                 &conv_weight = sv[7], &bias = sv[8], &o = sv[9], &lse = sv[10], &pack_rows = sv[11],
                 &summary = sv[12], &unpack_rows = sv[13], &cos = sv[14], &sin = sv[15];
    const Tensor &d_qp = grads[1], &d_kp = grads[2], &d_vp = grads[3], &d_local = grads[4], &d_summary = grads[5];
    const int64_t B = q.size(0), T = q.size(2), D = q.size(3), Hkv = k.size(1), C = Hkv * D;
    const Tensor u_heads = u.view({B, T, Hkv, D}).transpose(1, 2);
    // (Without a window gradient, a zero one: the kernels still add the packed rows and rotate.)
    const Tensor d_o = grads[0].defined() ? grads[0] : torch::zeros_like(o);
    WindowGradExtras extras;
    extras.sig_rows = unpack_rows;
    if (d_qp.defined()) extras.dq_sig = d_qp;
    if (d_kp.defined()) extras.dk_sig = d_kp;
    extras.rope_cos = cos, extras.rope_sin = sin;
    auto [dq, dk, du, dz_part] = unswag::window_attention_cuda_backward(
        d_o, q, k, u_heads, bias, o, lse, ctx->saved_data["scale"].toDouble(), ctx->saved_data["window"].toInt(),
        extras);
    du = du.transpose(1, 2).reshape({B, T, C});  // token-major storage: a view
    // d z_sig of a signal token: sum_c (dkp k + dvp v) over its row (z_sig = 1, see above).
    Tensor dz_sig = dz_part.defined() ? dz_part.sum(1) : torch::zeros({B * T}, q.options().dtype(torch::kFloat));
    auto streams = unswag::value_streams_cuda_backward(v, u, keep, z_sum, rate, conv_weight, du, d_local, d_summary,
                                                       summary);
    if (d_vp.defined()) {
      Tensor rows = streams.dv.view({B * T, C});
      unswag::add_rows_dot_(rows, pack_rows, d_vp.contiguous(), v.view({B * T, C}), dz_sig);
    }
    // Route columns: prune (u = (1 - z_prune) v), local (no write here), summary, signal.
    const Tensor d_gates = torch::stack(
        {-streams.dgate, torch::zeros_like(streams.dgate), streams.dz, dz_sig.view({B, T}).to(streams.dz.scalar_type())},
        -1);
    // dq, dk: [B, heads, T, D] views of token-major storage, as q_lin and k_lin are laid out.
    return {dq.transpose(1, 2), dk.transpose(1, 2), streams.dv, d_gates, streams.drate, streams.dweight, Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

// Training on CUDA (see WindowStreamsAndPack): the window read, the local and
// summary streams and the signal attention over the packed signal tokens.
PacketSwitchedAttentionImpl::FusedReads PacketSwitchedAttentionImpl::window_streams_and_signal(
    const Tensor& q_lin, const Tensor& k_lin, const Tensor& v, const Tensor& cos, const Tensor& sin,
    const Tensor& rate, const Tensor& taps, const Routing& routing) {
  const int64_t B = q_lin.size(0), T = q_lin.size(1), H = q_lin.size(2), D = q_lin.size(3), Hkv = k_lin.size(2);
  const double scale = 1.0 / std::sqrt(double(D));
  const Tensor signal = routing.index == kSignal;  // [B, T] bool
  const int64_t S_max = routing.max_signal ? routing.max_signal() : signal.sum(1).max().item<int64_t>();
  const int64_t S = S_max == 0 ? 0 : packed_length(S_max, T);
  const auto [pack_rows, unpack_rows] = signal_packing(signal, S);
  const Tensor bias = (routing.index == kPrune).to(torch::kFloat) * kPrunedKeyBias;  // [B, T]
  const auto outs = WindowStreamsAndPack::apply(q_lin, k_lin, v, routing.gates, rate, taps, bias, pack_rows,
                                                unpack_rows, cos, sin, scale, window);
  FusedReads r{outs[0], Tensor(), unpack_rows, pack_rows, outs[4], outs[5]};
  if (S == 0) {
    r.signal = torch::zeros({0, H, D}, q_lin.options());
    return r;
  }
  auto packed = [&](const Tensor& rows, int64_t Hx) { return rows.view({B, S, Hx, D}).transpose(1, 2); };
  // SDPA's own choice of backend on the packed sequence, as in signal_attention;
  // its output stays packed (psa_combine_packed reads it through unpack_rows).
  const Tensor op = at::scaled_dot_product_attention(packed(outs[1], H), packed(outs[2], Hkv), packed(outs[3], Hkv),
                                                     {}, 0.0, /*is_causal=*/true, scale, /*enable_gqa=*/H != Hkv);
  r.signal = token_rows(op).view({B * S, H, D});
  return r;
}

Tensor PacketSwitchedAttentionImpl::signal_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const Routing& routing, PSACache* cache) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1);
  const double scale = 1.0 / std::sqrt(double(D));
  const Tensor signal = routing.index == kSignal;  // [B, T] bool
  Tensor out;
  if (cache != nullptr) {
    // Batch 1: this chunk's signal tokens attend to the cached ones and, causally, to each other.
    const Tensor idx = signal[0].nonzero().squeeze(1);
    const int64_t n = idx.size(0), L = cache->signal.length;
    out = torch::zeros_like(q);
    if (n > 0) {
      cache->signal.append(k.index_select(2, idx), v.index_select(2, idx));
      const Tensor keys = cache->signal.keys(), values = cache->signal.values();
      Tensor o;
      if (n == 1 && H == Hkv && q.is_cuda() &&
          (q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kHalf) && D <= 256) {
        // Decode: one query that sees every cached entry; FlashAttention reads
        // the cache in place (no mask, no copy, no per-length planning).
        o = std::get<0>(at::_scaled_dot_product_flash_attention(q.index_select(2, idx), keys, values, 0.0, false,
                                                                 false, scale));
      } else {
        const auto lopt = torch::TensorOptions().device(q.device()).dtype(torch::kLong);
        const Tensor allowed =
            torch::arange(L + n, lopt).unsqueeze(0) <= (L + torch::arange(n, lopt)).unsqueeze(1);
        const Tensor ke = H != Hkv ? keys.repeat_interleave(H / Hkv, 1) : keys;
        const Tensor ve = H != Hkv ? values.repeat_interleave(H / Hkv, 1) : values;
        o = at::scaled_dot_product_attention(q.index_select(2, idx), ke, ve, allowed, 0.0, false, scale);
      }
      out.index_copy_(2, idx, o);
    }
  } else {
    const int64_t S_max = B * T == 0 ? 0
                          : routing.max_signal ? routing.max_signal()
                                               : signal.sum(1).max().item<int64_t>();
    if (S_max == 0) return torch::zeros_like(q);
    const int64_t S = packed_length(S_max, T);
    const auto [pack_rows, unpack_rows] = signal_packing(signal, S);  // see signal_packing
    auto pack = [&](const Tensor& t) {  // [B, Hx, T, D] -> [B, Hx, S, D], token-major storage
      const int64_t Hx = t.size(1);
      return unswag::gather_rows(t.transpose(1, 2).reshape({B * T, Hx * D}), pack_rows, unpack_rows)
          .view({B, S, Hx, D})
          .transpose(1, 2);
    };
    // Keys and values carry z_sig (one in value) so the router feels what a
    // signal write is worth; applied after packing, to S rather than T rows.
    // (Padding slots get a zero gate, and no real query sees them.)
    const Tensor z_packed =
        unswag::gather_rows(routing.gates.select(-1, kSignal).to(q.scalar_type()).reshape({B * T, 1}), pack_rows,
                            unpack_rows)
            .view({B, 1, S, 1});
    const Tensor qp = pack(q), kp = pack(k) * z_packed, vp = pack(v) * z_packed;
    Tensor op;
    if (q.is_cuda() && q.scalar_type() != torch::kDouble) {
      // SDPA's own choice of backend on the packed sequence, the one the dense
      // layer gets (cuDNN's on the H100: it plans once per shape, hence S
      // rounded to 256 above).
      op = at::scaled_dot_product_attention(qp, kp, vp, {}, 0.0, /*is_causal=*/true, scale,
                                            /*enable_gqa=*/H != Hkv);
    } else {
      op = unswag::chunked_attention(qp, kp, vp, scale);
    }
    // Back to token order: rows off the signal route read zeros (the caller's
    // gate zeroes them anyway).
    out = unswag::gather_rows(op.transpose(1, 2).reshape({B * S, H * D}), unpack_rows, pack_rows)
              .view({B, T, H, D})
              .transpose(1, 2);
  }
  return out;
}

namespace {

// Causal attention over the last `window` keys with an additive per-key bias:
// q [B, H, T, D], k/v [B, Hkv, T, D], bias [B, T] fp32 -> [B, H, T, D]. On CUDA
// in bf16/fp16 at D = 64 or 128, unswag::window_attention's kernels (the bias
// as a vector). Other head dims there: FlashAttention's sliding window with
// the bias riding in 8 extra head dimensions (q gains a 1, k gains bias /
// scale, v gains zeros), so the scores are scale * q.k + bias exactly.
// Elsewhere unswag::chunked_attention, which takes the bias.
Tensor biased_window_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& bias, double scale,
                               int64_t window) {
  if (unswag::window_attention_fused(q, k, v)) return unswag::window_attention(q, k, v, bias, scale, window);
  const int64_t B = q.size(0), T = q.size(2), D = q.size(3);
  const bool flash = q.is_cuda() && (q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kHalf) &&
                     D % 8 == 0 && D + 8 <= 256;
  if (!flash) return unswag::chunked_attention(q, k, v, scale, window, 1024, bias);
  // One pass each (unswag::pad_head_dim; its backward is a narrowed view).
  const Tensor qe = unswag::pad_head_dim(q.transpose(1, 2), 8, torch::ones({B, T}, bias.options()));  // [B, T, H, D + 8]
  const Tensor ke = unswag::pad_head_dim(k.transpose(1, 2), 8, bias / scale);
  const Tensor ve = unswag::pad_head_dim(v.transpose(1, 2), 8);
  // Flash takes key/value heads dividing the query heads (GQA) as they are.
  const Tensor o = std::get<0>(at::_flash_attention_forward(qe, ke, ve, std::nullopt, std::nullopt, T, T, 0.0,
                                                            /*is_causal=*/true, /*return_debug_mask=*/false, scale,
                                                            /*window_size_left=*/window - 1,
                                                            /*window_size_right=*/0));
  return unswag::unpad_head_dim(o, 8).transpose(1, 2);
}

// Attention under an explicit visibility mask, with a null key: q [B, H, Tq,
// D], k/v [B, Hkv, Tk, D], visible [B or 1, Tq, Tk] bool -> [B, H, Tq, D].
// Key 0 is a zero key and value of bias kPrunedKeyBias that every row sees: a
// row that sees nothing else reads 0; next to any other visible key its
// weight (about e^-2000 of theirs) is 0 in every float type.
Tensor masked_attention_with_null_key(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& visible,
                                      double scale) {
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1);
  const int64_t Bm = visible.size(0), Tk = visible.size(2);
  const auto opt = q.options();
  const Tensor zero = torch::zeros({B, Hkv, 1, D}, opt);
  const Tensor blocked = torch::zeros({Bm, Tq, Tk}, opt).masked_fill(visible.logical_not(), -INFINITY);
  const Tensor mask = torch::cat({torch::full({Bm, Tq, 1}, kPrunedKeyBias, opt), blocked}, 2);
  return at::scaled_dot_product_attention(q, torch::cat({zero, k}, 2), torch::cat({zero, v}, 2),
                                          mask.view({Bm, 1, Tq, 1 + Tk}), 0.0, /*is_causal=*/false, scale,
                                          /*enable_gqa=*/H != Hkv);
}

// The window's cached keys [1, Hkv, P, D], values and biases [1, P] followed
// by a chunk's: [1, Hkv, P + T, D], [1, P + T]; P = the cached count.
struct WindowKeys {
  Tensor k, v, bias;
  int64_t cached;
};
WindowKeys extend_window(const PSACache& c, const Tensor& k, const Tensor& v, const Tensor& bias) {
  const int64_t P = c.window_k.defined() ? c.window_k.size(2) : 0;
  if (P == 0) return {k, v, bias, 0};
  return {torch::cat({c.window_k, k}, 2), torch::cat({c.window_v, v}, 2), torch::cat({c.window_bias, bias}, 1), P};
}

// Keeps the window's last min(W - 1, L) keys of a chunk's [cached + new] keys
// [1, Hkv, L, D], values, biases [1, L] and, if defined, signal flags [1, L].
void keep_window_tail(PSACache& c, int64_t window, const Tensor& k_all, const Tensor& v_all, const Tensor& b_all,
                      const Tensor& s_all) {
  const int64_t L = k_all.size(2), n = std::min(window - 1, L);
  c.window_k = k_all.narrow(2, L - n, n).clone();
  c.window_v = v_all.narrow(2, L - n, n).clone();
  c.window_bias = b_all.narrow(1, L - n, n).clone();
  if (s_all.defined()) c.window_signal = s_all.narrow(1, L - n, n).clone();
}

}  // namespace

// Every query reads the signal keys at or before it: in training (and in a
// cacheless eval) dense causal attention over all keys with non-signal keys
// removed by the additive bias kPrunedKeyBias and their values gated to zero
// by z_sig (the router's gradient), O(T^2); a row with no signal key averages
// zero values and reads 0. With a cache: the chunk's queries over the cached
// signal keys (after appending the chunk's), query t seeing the first
// L + (signal tokens of the chunk up to t) of them, plus a zero key of bias
// kPrunedKeyBias that every row sees, so a row with no signal key reads 0.
Tensor PacketSwitchedAttentionImpl::signal_read_all(const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const Routing& routing, PSACache* cache) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1);
  const double scale = 1.0 / std::sqrt(double(D));
  const Tensor signal = routing.index == kSignal;  // [B, T] bool
  Tensor out;
  if (cache == nullptr) {
    if (T == 0) return torch::zeros({B, T, H * D}, q.options());
    const Tensor z_sig = routing.gates.select(-1, kSignal).to(q.scalar_type()).view({B, 1, T, 1});
    const Tensor bias = signal.logical_not().to(torch::kFloat) * kPrunedKeyBias;  // [B, T]
    out = biased_window_attention(q, k * z_sig, v * z_sig, bias, scale, /*window=*/T);
  } else {
    const Tensor idx = signal[0].nonzero().squeeze(1);
    const int64_t n = idx.size(0), L = cache->signal.length;
    if (n > 0) cache->signal.append(k.index_select(2, idx), v.index_select(2, idx));
    const auto opt = q.options();
    const Tensor zero = torch::zeros({1, Hkv, 1, D}, opt);
    const Tensor keys = torch::cat({zero, L + n > 0 ? cache->signal.keys() : zero.narrow(2, 0, 0)}, 2);
    const Tensor values = torch::cat({zero, L + n > 0 ? cache->signal.values() : zero.narrow(2, 0, 0)}, 2);
    // Key 1 + j (cached signal index j) is visible to query t iff j < L + count_t.
    const auto lopt = torch::TensorOptions().device(q.device()).dtype(torch::kLong);
    const Tensor limit = L + signal[0].to(torch::kLong).cumsum(0);                 // [T]
    const Tensor visible = torch::arange(L + n, lopt).unsqueeze(0) < limit.unsqueeze(1);  // [T, L + n]
    Tensor mask = torch::zeros({T, 1 + L + n}, opt.dtype(torch::kFloat));
    mask.select(1, 0).fill_(kPrunedKeyBias);
    mask.narrow(1, 1, L + n).masked_fill_(visible.logical_not(), -std::numeric_limits<float>::infinity());
    out = at::scaled_dot_product_attention(q, keys, values, mask.to(q.scalar_type()).view({1, 1, T, 1 + L + n}),
                                           0.0, /*is_causal=*/false, scale, /*enable_gqa=*/H != Hkv);
  }
  return out.transpose(1, 2).reshape({B, T, H * D});
}

Tensor PacketSwitchedAttentionImpl::window_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const Routing& routing, PSACache* cache) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const double scale = 1.0 / std::sqrt(double(D));
  // v arrives gated by 1 - z_prune (a pruned token's value is zero, and its
  // straight-through gate gives the router a gradient); its key is removed by
  // the bias.
  const Tensor bias = (routing.index == kPrune).to(torch::kFloat) * kPrunedKeyBias;  // [B, T]
  Tensor out;
  if (cache != nullptr) {
    // Continue the cached window: the last min(W - 1, seen) tokens come first;
    // zero queries in their rows keep q and k aligned (their outputs are dropped).
    const auto [k_all, v_all, b_all, P] = extend_window(*cache, k, v, bias);
    if (T == 1) {
      // Decode: one query and at most W keys, all inside its window, so the
      // bias is the whole mask: one SDPA call.
      const int64_t L = k_all.size(2);
      out = at::scaled_dot_product_attention(q, k_all, v_all, b_all.to(q.scalar_type()).view({1, 1, 1, L}), 0.0,
                                             /*is_causal=*/false, scale, /*enable_gqa=*/H != k.size(1));
    } else {
      const Tensor q_all = P > 0 ? torch::cat({torch::zeros({B, H, P, D}, q.options()), q}, 2) : q;
      out = T > 0 ? biased_window_attention(q_all, k_all, v_all, b_all, scale, window).narrow(2, P, T)
                  : torch::zeros_like(q);
    }
    keep_window_tail(*cache, window, k_all, v_all, b_all, Tensor());
  } else {
    out = T > 0 ? biased_window_attention(q, k, v, bias, scale, window) : torch::zeros_like(q);
  }
  return out;
}

// One softmax per query over the union of two key sets: its window (tokens
// j in (t - W, t], not pruned) and, if t reads the signal tokens (a signal
// token, or every token with all_tokens_read_signal), the signal tokens j <= t.
// A key's value carries the gate of the route that lets it be read: z_sig for
// a signal key, 1 - z_prune for any other (both 1 in value), so the router
// feels both writes. Without a cache an explicit [B, T, T] mask, O(T^2).
Tensor PacketSwitchedAttentionImpl::joint_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const Routing& routing, PSACache* cache) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const double scale = 1.0 / std::sqrt(double(D));
  const Tensor signal = routing.index == kSignal, kept = routing.index != kPrune;  // [B, T] bool
  const Tensor reads = config_.all_tokens_read_signal ? torch::ones_like(signal) : signal;
  const auto lopt = torch::TensorOptions().device(q.device()).dtype(torch::kLong);
  Tensor out;
  if (cache == nullptr) {
    if (T == 0) return torch::zeros({B, T, H * D}, q.options());
    const Tensor gates = routing.gates.to(q.scalar_type());
    const Tensor gate = torch::where(signal, gates.select(-1, kSignal), 1 - gates.select(-1, kPrune));  // [B, T]
    const Tensor pos = torch::arange(T, lopt);
    const Tensor dist = pos.unsqueeze(1) - pos.unsqueeze(0);  // query - key, [T, T]
    const Tensor causal = (dist >= 0).unsqueeze(0), in_window = (dist >= 0).logical_and(dist < window).unsqueeze(0);
    const Tensor visible = in_window.logical_and(kept.unsqueeze(1))
                               .logical_or(causal.logical_and(signal.unsqueeze(1)).logical_and(reads.unsqueeze(2)));
    out = masked_attention_with_null_key(q, k, v * gate.view({B, 1, T, 1}), visible, scale);
  } else {
    // Batch 1. Keys: the cached signal keys (this chunk's appended), then the
    // window's cached keys and this chunk's. A query that reads the signal
    // tokens sees a signal key through the first part only, never twice.
    const Tensor sig0 = signal[0], reads0 = reads[0];
    const Tensor idx = sig0.nonzero().squeeze(1);
    const int64_t n = idx.size(0), L = cache->signal.length;
    if (n > 0) cache->signal.append(k.index_select(2, idx), v.index_select(2, idx));
    const Tensor vg = v * kept.to(q.scalar_type()).view({1, 1, T, 1});
    const Tensor bias = kept.logical_not().to(torch::kFloat) * kPrunedKeyBias;  // [1, T]
    const auto [k_all, v_all, b_all, P] = extend_window(*cache, k, vg, bias);
    TORCH_CHECK(P == 0 || cache->window_signal.defined(),
                "PSA joint_softmax: the cache's window has no signal flags (was it filled with joint_softmax off?)");
    const Tensor s_all = P > 0 ? torch::cat({cache->window_signal, signal}, 1) : signal;  // [1, P + T]
    // Signal key j is at or before chunk query i iff j < L + (signal tokens of the chunk up to i).
    const Tensor limit = L + sig0.to(torch::kLong).cumsum(0);  // [T]
    const Tensor sig_visible =
        (torch::arange(L + n, lopt).unsqueeze(0) < limit.unsqueeze(1)).logical_and(reads0.unsqueeze(1));
    // Window key m sits at chunk position m - P: query i sees it iff
    // 0 <= i - (m - P) < W, it was not pruned, and i does not already read it as a signal key.
    const Tensor dist = torch::arange(T, lopt).unsqueeze(1) + P - torch::arange(P + T, lopt).unsqueeze(0);
    const Tensor win_visible = (dist >= 0)
                                   .logical_and(dist < window)
                                   .logical_and((b_all[0] == 0).unsqueeze(0))
                                   .logical_and(s_all[0].unsqueeze(0).logical_and(reads0.unsqueeze(1)).logical_not());
    const bool any_signal = L + n > 0;
    const Tensor keys = any_signal ? torch::cat({cache->signal.keys(), k_all}, 2) : k_all;
    const Tensor values = any_signal ? torch::cat({cache->signal.values(), v_all}, 2) : v_all;
    out = T > 0 ? masked_attention_with_null_key(q, keys, values,
                                                 torch::cat({sig_visible, win_visible}, 1).unsqueeze(0), scale)
                : torch::zeros_like(q);
    keep_window_tail(*cache, window, k_all, v_all, b_all, s_all);
  }
  return out.transpose(1, 2).reshape({B, T, H * D});
}

}  // namespace unswag::nn
