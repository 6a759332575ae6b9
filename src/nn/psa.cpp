// Packet-Switched Attention (include/unswag/nn/psa.h, docs/psa.md): the
// router (Gumbel-softmax with the straight-through estimator in training,
// arg-max in eval, or the hashed random router), the writes each route makes
// and the reads every token makes, in ATen compositions so autograd reaches
// every parameter; the sequence primitives are unswag::causal_depthwise_conv1d
// and unswag::linear_scan, the signal attention a gather / attend / scatter.
#include "unswag/nn/psa.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "unswag/nn/functional.h"
#include "unswag/nn/psa_ops.h"

namespace unswag::nn {
namespace {

using torch::Tensor;

Tensor rotate_half(const Tensor& x) {
  const int64_t h = x.size(-1) / 2;
  return torch::cat({-x.narrow(-1, h, h), x.narrow(-1, 0, h)}, -1);
}

// x [B, heads, T, D]; cos/sin [B, 1, T, D]: HF's RoPE (the two halves rotated).
Tensor apply_rope(const Tensor& x, const Tensor& cos, const Tensor& sin) { return x * cos + rotate_half(x) * sin; }

uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

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
}

// ------------------------------------------------------------- KV buffers --

void KVBuffer::append(const Tensor& k_new, const Tensor& v_new) {
  TORCH_CHECK(k_new.dim() == 4 && k_new.size(0) == 1 && v_new.sizes() == k_new.sizes(),
              "KVBuffer::append: k and v must be [1, Hkv, n, D] of one shape, got ", k_new.sizes(), " and ",
              v_new.sizes());
  const int64_t n = k_new.size(2), need = length + n;
  if (n == 0) return;
  const int64_t capacity = k.defined() ? k.size(2) : 0;
  if (need > capacity) {
    // Growth by 1/8 keeps appends amortised O(1) (each slot is copied about 8
    // times) while the capacity stays within 12.5% of what is filled: the
    // cache's bytes are its point. The first fill is exact (a prompt's size).
    const int64_t grown = std::max(need, capacity + capacity / 8 + 1);
    Tensor k2 = torch::empty({1, k_new.size(1), grown, k_new.size(3)}, k_new.options());
    Tensor v2 = torch::empty({1, v_new.size(1), grown, v_new.size(3)}, v_new.options());
    if (length > 0) {
      k2.narrow(2, 0, length).copy_(k.narrow(2, 0, length));
      v2.narrow(2, 0, length).copy_(v.narrow(2, 0, length));
    }
    k = k2;
    v = v2;
  }
  k.narrow(2, length, n).copy_(k_new);
  v.narrow(2, length, n).copy_(v_new);
  length = need;
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
  for (const Tensor* t : {&conv_tail, &summary, &window_k, &window_v, &window_bias})
    if (t->defined()) b += t->numel() * int64_t(t->element_size());
  return b;
}

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
  summary_decay = register_parameter("summary_decay", torch::empty({kv_dim}));
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
  // Kept fraction sigmoid(theta) from 0.9 to 0.999 across channels, geometric
  // in 1 - keep: time constants from 10 to 1000 summary writes.
  const Tensor frac = kv_dim > 1 ? torch::arange(kv_dim, torch::kDouble) / double(kv_dim - 1)
                                 : torch::zeros({kv_dim}, torch::kDouble);
  const Tensor forget = 0.1 * torch::pow(0.01, frac);
  summary_decay.copy_(torch::log((1 - forget) / forget));
  lambda_local.fill_(1.0);
  lambda_summary.fill_(1.0);
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
  const Tensor target = torch::tensor(std::vector<double>(config_.target_shares.begin(), config_.target_shares.end()),
                                      route_bias.options());
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

PacketSwitchedAttentionImpl::Routing PacketSwitchedAttentionImpl::route(const Tensor& x, const Tensor& positions,
                                                                        const Tensor& gumbel_in) {
  const int64_t B = x.size(0), T = x.size(1);
  const auto acc = accumulate_type(x.scalar_type());
  const Tensor logits = router(x).to(acc);  // [B, T, 4]
  const Tensor biased = logits + route_bias.to(acc);
  const Tensor zero = torch::zeros({}, x.options().dtype(torch::kFloat));
  aux_loss_ = load_loss_ = z_loss_ = entropy_loss_ = zero;
  agreement_ = torch::ones({}, x.options().dtype(torch::kFloat));
  Routing r;
  if (config_.random_router) {
    r.index = random_routes(positions);
    r.gates = torch::one_hot(r.index, 4).to(acc);
  } else if (is_training()) {
    Tensor g;
    if (gumbel_in.defined()) {
      TORCH_CHECK(gumbel_in.sizes() == logits.sizes(), "PacketSwitchedAttention: gumbel must be [B, T, 4] = ",
                  logits.sizes(), ", got ", gumbel_in.sizes());
      g = gumbel_in;
    } else {
      // The uniforms are drawn on the CPU from the layer's own generator (B*T*4
      // values), so runs are reproducible on any device; the logs run on the
      // layer's device (on the CPU they cost 1-5 ms per call at 8k tokens,
      // measured by bench_psa --profile on the H200).
      const Tensor u = torch::rand({B, T, 4}, generator_, torch::kDouble).to(x.device()).clamp(1e-12, 1 - 1e-12);
      g = -torch::log(-torch::log(u));
    }
    g = g.to(x.device(), acc);
    gumbel_ = g.to(torch::kFloat);
    // The temperature scales the logits before the Gumbel-max draw: the hard
    // route is a sample from softmax(biased / tau), so annealing tau moves
    // training's routes toward eval's arg-max (they coincide as tau -> 0).
    // (The textbook softmax((l + g) / tau) only sharpens the relaxation: its
    // hard sample stays a draw from softmax(l) at every tau, and the
    // train/eval routing gap never closes.)
    const Tensor y = torch::softmax(biased / config_.temperature + g, -1);
    r.index = y.argmax(-1);
    // Straight-through: the forward value is exactly one-hot (z + 0), the
    // gradient that of the soft y.
    r.gates = torch::one_hot(r.index, 4).to(acc) + (y - y.detach());
    if (T > 0) {
      // The distribution routes are drawn from, and its log for the entropy term.
      const Tensor log_p = torch::log_softmax(biased / config_.temperature, -1);
      const Tensor p = log_p.exp();
      const Tensor target = torch::tensor(
          std::vector<double>(config_.target_shares.begin(), config_.target_shares.end()), p.options());
      load_loss_ = (p.mean(at::IntArrayRef{0, 1}) - target).pow(2).sum().to(torch::kFloat);
      z_loss_ = torch::logsumexp(logits, -1).pow(2).mean().to(torch::kFloat);
      entropy_loss_ = -(p * log_p).sum(-1).mean().to(torch::kFloat);
      aux_loss_ = config_.load_loss_weight * load_loss_ + config_.z_loss_weight * z_loss_ +
                  config_.entropy_loss_weight * entropy_loss_;
      const Tensor eval_index = biased.argmax(-1);
      agreement_ = (r.index == eval_index).to(torch::kFloat).mean();
      // The controller steers the noise-free arg-max shares (what eval and
      // generation route by) to the budgets, as DeepSeek-V3's bias does.
      train_fractions_ = torch::one_hot(eval_index, 4).to(torch::kFloat).mean(at::IntArrayRef{0, 1}).detach();
    }
  } else {
    r.index = biased.argmax(-1);
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
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == 1 && positions.size(1) == x.size(1),
              "PacketSwitchedAttention::forward_cached: positions must be [1, ", x.size(1), "], got ",
              positions.sizes());
  torch::NoGradGuard no_grad;
  return compute(x, cos, sin, route(x, positions, {}), &cache);
}

Tensor PacketSwitchedAttentionImpl::compute(const Tensor& x, const Tensor& cos, const Tensor& sin,
                                            const Routing& routing, PSACache* cache) {
  const int64_t B = x.size(0), T = x.size(1), H = heads, Hkv = kv_heads, D = head_dim, G = heads / kv_heads;
  const auto dt = x.scalar_type(), acc = accumulate_type(dt);
  const Tensor z = routing.gates.to(dt);                      // [B, T, 4], one-hot in value
  const Tensor z_prune = z.select(-1, kPrune).unsqueeze(-1);   // [B, T, 1]
  const Tensor z_summary = routing.gates.select(-1, kSummary).unsqueeze(-1);  // [B, T, 1] in acc
  const Tensor q = apply_rope(q_proj(x).view({B, T, H, D}).transpose(1, 2), cos, sin);     // [B, H, T, D]
  const Tensor k = apply_rope(k_proj(x).view({B, T, Hkv, D}).transpose(1, 2), cos, sin);   // [B, Hkv, T, D]
  const Tensor v = v_proj(x);                                                               // [B, T, kv_dim]

  // Local: every non-pruned token writes its value into the conv stream.
  const Tensor u = (1 - z_prune) * v;
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

  // Summary: s_t = a_t s_{t-1} + (1 - a_t) v_t, a_t = 1 - z_sum,t (1 - sigmoid(theta)), in fp32.
  const Tensor forget = 1 - torch::sigmoid(summary_decay.to(acc));  // [kv_dim]
  const Tensor a = 1 - z_summary * forget;                           // [B, T, kv_dim]
  const Tensor h0 = cache != nullptr ? cache->summary : Tensor();
  const Tensor s = unswag::linear_scan(a, (1 - a) * v.to(acc), h0);
  if (cache != nullptr && T > 0) cache->summary = s.select(1, T - 1).clone();
  if (cache != nullptr && !cache->summary.defined()) cache->summary = torch::zeros({1, kv_dim}, v.options().dtype(acc));
  const Tensor summary = s.to(dt);

  const Tensor v_heads = v.view({B, T, Hkv, D}).transpose(1, 2);
  Tensor attn = signal_attention(q, k, v_heads, routing, cache);
  if (window > 0) attn = attn + window_attention(q, k, v_heads, routing, cache);
  // kv_dim reads into the query space: kv head j serves query heads j*G..j*G+G-1 (as GQA's v).
  auto expand = [&](const Tensor& t) {
    return t.view({B, T, Hkv, 1, D}).expand({B, T, Hkv, G, D}).reshape({B, T, H * D});
  };
  if (cache != nullptr) cache->tokens += T;
  return o_proj(attn + lambda_local * expand(local) + lambda_summary * expand(summary));
}

Tensor PacketSwitchedAttentionImpl::signal_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const Routing& routing, PSACache* cache) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1);
  const double scale = 1.0 / std::sqrt(double(D));
  const Tensor signal = routing.index == kSignal;                              // [B, T] bool
  const Tensor z_sig = routing.gates.select(-1, kSignal).to(q.scalar_type()).view({B, 1, T, 1});
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
    const int64_t S_max = B * T > 0 ? signal.sum(1).max().item<int64_t>() : 0;
    if (S_max == 0) return torch::zeros({B, T, H * D}, q.options());
    // The packed length is rounded up to a multiple of 256 so that its shape
    // repeats from step to step: attention backends that plan per shape
    // (cuDNN's) would otherwise re-plan on every call (~100 ms measured).
    const int64_t S = std::min<int64_t>((S_max + 255) / 256 * 256, std::max<int64_t>(T, S_max));
    // Pack each row's signal tokens in order, right-padded to S: slot dest[t]
    // holds token t. Padding sits after every real slot, so causal attention
    // never lets a real query see it; padded outputs are never read back.
    const Tensor dest = signal.to(torch::kLong).cumsum(1) - 1;  // [B, T]
    const Tensor nz = signal.nonzero();
    const Tensor rows = nz.select(1, 0), cols = nz.select(1, 1);
    Tensor slots = torch::zeros({B, S}, dest.options());
    slots.index_put_({rows, dest.index({rows, cols})}, cols);
    auto pack = [&](const Tensor& t) {
      return t.gather(2, slots.view({B, 1, S, 1}).expand({B, t.size(1), S, D}));
    };
    // Keys and values carry z_sig (one in value) so the router feels what a signal write is worth.
    const Tensor qp = pack(q), kp = pack(k * z_sig), vp = pack(v * z_sig);
    Tensor op;
    if (q.is_cuda() && (q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kHalf) && D <= 256) {
      // FlashAttention on the packed sequence (no per-shape planning); GQA by
      // repeating the key/value heads.
      const Tensor ke = H != Hkv ? kp.repeat_interleave(H / Hkv, 1) : kp;
      const Tensor ve = H != Hkv ? vp.repeat_interleave(H / Hkv, 1) : vp;
      op = std::get<0>(at::_scaled_dot_product_flash_attention(qp, ke, ve, 0.0, /*is_causal=*/true,
                                                                /*return_debug_mask=*/false, scale));
    } else if (q.is_cuda() && q.scalar_type() != torch::kDouble) {
      op = at::scaled_dot_product_attention(qp, kp, vp, {}, 0.0, /*is_causal=*/true, scale,
                                            /*enable_gqa=*/H != Hkv);
    } else {
      op = unswag::chunked_attention(qp, kp, vp, scale);
    }
    out = op.gather(2, dest.clamp_min(0).view({B, 1, T, 1}).expand({B, H, T, D}));
    out = out * signal.view({B, 1, T, 1}).to(q.scalar_type());
  }
  return (out * z_sig).transpose(1, 2).reshape({B, T, H * D});
}

namespace {

// Causal attention over the last `window` keys with an additive per-key bias:
// q [B, H, T, D], k/v [B, Hkv, T, D], bias [B, T] fp32 -> [B, H, T, D]. On CUDA
// in bf16/fp16, FlashAttention's sliding window; the bias rides in 8 extra
// head dimensions (q gains a 1, k gains bias / scale, v gains zeros), so the
// scores are scale * q.k + bias exactly and the kernel keeps its causal
// window tiling. Elsewhere unswag::chunked_attention, which takes the bias.
Tensor biased_window_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& bias, double scale,
                               int64_t window) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1);
  const bool flash = q.is_cuda() && (q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kHalf) &&
                     D % 8 == 0 && D + 8 <= 256;
  if (!flash) return unswag::chunked_attention(q, k, v, scale, window, 1024, bias);
  const auto opt = q.options();
  Tensor q_extra = torch::zeros({B, T, H, 8}, opt);
  q_extra.select(-1, 0).fill_(1);
  Tensor k_extra = torch::zeros({B, T, Hkv, 8}, opt);
  k_extra.select(-1, 0).copy_((bias / scale).to(q.scalar_type()).view({B, T, 1}).expand({B, T, Hkv}));
  const Tensor qe = torch::cat({q.transpose(1, 2), q_extra}, -1);  // [B, T, H, D + 8]
  const Tensor ke = torch::cat({k.transpose(1, 2), k_extra}, -1);
  const Tensor ve = torch::cat({v.transpose(1, 2), torch::zeros({B, T, Hkv, 8}, opt)}, -1);
  // Flash takes key/value heads dividing the query heads (GQA) as they are.
  const Tensor o = std::get<0>(at::_flash_attention_forward(qe, ke, ve, std::nullopt, std::nullopt, T, T, 0.0,
                                                            /*is_causal=*/true, /*return_debug_mask=*/false, scale,
                                                            /*window_size_left=*/window - 1,
                                                            /*window_size_right=*/0));
  return o.narrow(-1, 0, D).transpose(1, 2);
}

}  // namespace

Tensor PacketSwitchedAttentionImpl::window_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const Routing& routing, PSACache* cache) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const double scale = 1.0 / std::sqrt(double(D));
  // A pruned token's value is gated to zero (its straight-through gate gives
  // the router a gradient) and its key removed by the bias.
  const Tensor keep = (1 - routing.gates.select(-1, kPrune)).to(q.scalar_type()).view({B, 1, T, 1});
  const Tensor vg = v * keep;
  const Tensor bias = (routing.index == kPrune).to(torch::kFloat) * kPrunedKeyBias;  // [B, T]
  Tensor out;
  if (cache != nullptr) {
    // Continue the cached window: the last min(W - 1, seen) tokens come first;
    // zero queries in their rows keep q and k aligned (their outputs are dropped).
    const int64_t P = cache->window_k.defined() ? cache->window_k.size(2) : 0;
    const Tensor k_all = P > 0 ? torch::cat({cache->window_k, k}, 2) : k;
    const Tensor v_all = P > 0 ? torch::cat({cache->window_v, vg}, 2) : vg;
    const Tensor b_all = P > 0 ? torch::cat({cache->window_bias, bias}, 1) : bias;
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
    const int64_t L = k_all.size(2), n = std::min(window - 1, L);
    cache->window_k = k_all.narrow(2, L - n, n).clone();
    cache->window_v = v_all.narrow(2, L - n, n).clone();
    cache->window_bias = b_all.narrow(1, L - n, n).clone();
  } else {
    out = T > 0 ? biased_window_attention(q, k, vg, bias, scale, window) : torch::zeros_like(q);
  }
  return out.transpose(1, 2).reshape({B, T, H * D});
}

}  // namespace unswag::nn
