// The Llama-family causal LM behind unswag::Model (include/unswag/model.h):
// modules named as Hugging Face names them, the forward pass of transformers'
// LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM / GemmaForCausalLM
// (same casts, so float32 logits agree to rounding), the memory-lean
// training paths that for_training() switches on, Packet-Switched Attention
// layers (src/nn/psa.cpp) and cached generation (a KV cache per dense layer, a
// PSA cache per PSA layer).
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <set>

#include "models/file_io.h"
#include "unswag/model.h"
#include "unswag/nn/functional.h"
#include "unswag/nn/psa.h"
#include "unswag/ops.h"
#include "unswag/safetensors.h"

namespace unswag::models {
namespace {

using torch::Tensor;

// inv_freq of RoPE (float32, as transformers computes it), with the llama3
// and linear scalings applied.
Tensor rope_inv_freq(const RopeConfig& r, int64_t head_dim) {
  const Tensor exponents = torch::arange(0, head_dim, 2, torch::kLong).to(torch::kFloat) / double(head_dim);
  Tensor inv_freq = 1.0 / torch::pow(r.theta, exponents);
  if (r.type == "linear") inv_freq = inv_freq / r.factor;
  if (r.type == "llama3") {
    // Long wavelengths (beyond the original context / low_freq_factor) are
    // slowed by `factor`, short ones (below context / high_freq_factor) kept,
    // and the band between interpolated smoothly.
    const double old_ctx = double(r.original_max_position_embeddings);
    const double low_wavelen = old_ctx / r.low_freq_factor, high_wavelen = old_ctx / r.high_freq_factor;
    const Tensor wavelen = 2 * M_PI / inv_freq;
    Tensor scaled = torch::where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq);
    const Tensor smooth = (old_ctx / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
    const Tensor smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled;
    const Tensor medium = (wavelen >= high_wavelen).logical_and(wavelen <= low_wavelen);
    inv_freq = torch::where(medium, smoothed, scaled);
  }
  return inv_freq;
}

Tensor plain_rms_norm(const Tensor& x, const Tensor& w, double eps, bool add_one) {
  const Tensor xf = x.to(torch::kFloat);
  const Tensor xh = xf * torch::rsqrt(xf.pow(2).mean(-1, true) + eps);
  if (add_one) return (xh * (1.0 + w.to(torch::kFloat))).to(x.scalar_type());
  return w * xh.to(x.scalar_type());
}

Tensor activation(const std::string& name, const Tensor& x) {
  if (name == "silu") return torch::silu(x);
  if (name == "gelu_pytorch_tanh") return torch::gelu(x, "tanh");
  return torch::gelu(x);
}

// Fused-MLP activation name for a config's hidden_act.
std::string gated_activation(const std::string& hidden_act) {
  if (hidden_act == "silu") return "swiglu";
  if (hidden_act == "gelu_pytorch_tanh") return "geglu_tanh";
  return "geglu";
}

// Causal (and sliding-window) mask [T, T], true where attention is allowed.
Tensor allowed_mask(int64_t T, int64_t window, const torch::Device& device) {
  const Tensor i = torch::arange(T, torch::TensorOptions().device(device).dtype(torch::kLong)).unsqueeze(1);
  const Tensor j = i.transpose(0, 1);
  Tensor allowed = j <= i;
  if (window > 0) allowed = allowed.logical_and(j > i - window);
  return allowed;
}

// ----------------------------------------------------------------- modules --

struct RMSNormImpl : torch::nn::Module {
  RMSNormImpl(int64_t n, double eps_, bool add_one_) : eps(eps_), add_one(add_one_) {
    weight = register_parameter("weight", add_one ? torch::zeros({n}) : torch::ones({n}));
  }
  Tensor forward(const Tensor& x, bool lean) {
    return lean ? unswag::rms_norm(x, weight, eps, add_one) : plain_rms_norm(x, weight, eps, add_one);
  }
  Tensor weight;
  double eps;
  bool add_one;
};
TORCH_MODULE(RMSNorm);

struct Rope {
  Tensor cos, sin;    // [B, 1, T, D], the compute dtype
  Tensor positions;   // [B, T] int64 (PSA's random router hashes them)
};

struct AttentionImpl : torch::nn::Module {
  explicit AttentionImpl(const ModelConfig& c)
      : heads(c.num_attention_heads), kv_heads(c.num_key_value_heads), head_dim(c.head_dim),
        window(c.sliding_window.value_or(0)) {
    const int64_t h = c.hidden_size;
    q_proj = register_module("q_proj", torch::nn::Linear(torch::nn::LinearOptions(h, heads * head_dim).bias(c.qkv_bias())));
    k_proj = register_module("k_proj", torch::nn::Linear(torch::nn::LinearOptions(h, kv_heads * head_dim).bias(c.qkv_bias())));
    v_proj = register_module("v_proj", torch::nn::Linear(torch::nn::LinearOptions(h, kv_heads * head_dim).bias(c.qkv_bias())));
    o_proj = register_module("o_proj", torch::nn::Linear(torch::nn::LinearOptions(heads * head_dim, h).bias(c.o_bias())));
  }

  Tensor forward(const Tensor& x, const Rope& rope, const TrainingOptions& o) {
    const int64_t B = x.size(0), T = x.size(1);
    // One op for the three projections: its backward sums grad x inside the GEMMs.
    const auto [q_flat, k_flat, v_flat] = unswag::qkv_projection(x, q_proj->weight, k_proj->weight, v_proj->weight,
                                                                 q_proj->bias, k_proj->bias, v_proj->bias);
    const Tensor q = unswag::rotary_embedding(q_flat.view({B, T, heads, head_dim}), rope.cos, rope.sin).transpose(1, 2);
    const Tensor k = unswag::rotary_embedding(k_flat.view({B, T, kv_heads, head_dim}), rope.cos, rope.sin).transpose(1, 2);
    const Tensor v = v_flat.view({B, T, kv_heads, head_dim}).transpose(1, 2);
    const double scale = 1.0 / std::sqrt(double(head_dim));
    const bool windowed = window > 0 && window < T;
    std::string impl = o.attention;
    if (impl == "auto") impl = (windowed || x.scalar_type() == torch::kDouble) ? "chunked" : "sdpa";
    Tensor out;
    if (impl == "chunked") {
      out = unswag::chunked_attention(q, k, v, scale, windowed ? window : 0, o.attention_chunk);
    } else if (impl == "sdpa") {
      std::optional<Tensor> mask;
      if (windowed) mask = allowed_mask(T, window, x.device());
      out = at::scaled_dot_product_attention(q, k, v, mask, 0.0, /*is_causal=*/!windowed, scale,
                                             /*enable_gqa=*/heads != kv_heads);
    } else {  // eager, as transformers' eager_attention_forward
      const Tensor kr = k.repeat_interleave(heads / kv_heads, 1), vr = v.repeat_interleave(heads / kv_heads, 1);
      Tensor scores = torch::matmul(q, kr.transpose(2, 3)) * scale;
      scores = scores.masked_fill(allowed_mask(T, windowed ? window : 0, x.device()).logical_not(),
                                  -std::numeric_limits<float>::infinity());
      out = torch::matmul(torch::softmax(scores, -1, torch::kFloat).to(q.scalar_type()), vr);
    }
    return o_proj(out.transpose(1, 2).reshape({B, T, heads * head_dim}));
  }

  // Batch 1, no autograd: the chunk's keys and values join `cache`, its
  // queries (at cache positions L..L+T-1) attend to everything cached up to
  // themselves (and within the sliding window).
  Tensor forward_cached(const Tensor& x, const Rope& rope, nn::KVBuffer& cache) {
    const int64_t T = x.size(1), L = cache.length;
    const Tensor q = unswag::rotary_embedding(q_proj(x).view({1, T, heads, head_dim}), rope.cos, rope.sin).transpose(1, 2);
    const Tensor k = unswag::rotary_embedding(k_proj(x).view({1, T, kv_heads, head_dim}), rope.cos, rope.sin).transpose(1, 2);
    const Tensor v = v_proj(x).view({1, T, kv_heads, head_dim}).transpose(1, 2);
    cache.append(k, v);
    const int64_t G = heads / kv_heads;
    const Tensor keys = cache.keys().repeat_interleave(G, 1), values = cache.values().repeat_interleave(G, 1);
    std::optional<Tensor> mask;
    if (T > 1 || (window > 0 && L + 1 > window)) {
      const auto lopt = torch::TensorOptions().device(x.device()).dtype(torch::kLong);
      const Tensor i = (L + torch::arange(T, lopt)).unsqueeze(1), j = torch::arange(L + T, lopt).unsqueeze(0);
      Tensor allowed = j <= i;
      if (window > 0) allowed = allowed.logical_and(j > i - window);
      mask = allowed;
    }
    const Tensor out = at::scaled_dot_product_attention(q, keys, values, mask, 0.0, false,
                                                        1.0 / std::sqrt(double(head_dim)));
    return o_proj(out.transpose(1, 2).reshape({1, T, heads * head_dim}));
  }

  int64_t heads, kv_heads, head_dim, window;
  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
};
TORCH_MODULE(Attention);

struct MLPImpl : torch::nn::Module {
  explicit MLPImpl(const ModelConfig& c) : act(c.hidden_act), bias(c.mlp_bias) {
    const int64_t h = c.hidden_size, I = c.intermediate_size;
    gate_proj = register_module("gate_proj", torch::nn::Linear(torch::nn::LinearOptions(h, I).bias(bias)));
    up_proj = register_module("up_proj", torch::nn::Linear(torch::nn::LinearOptions(h, I).bias(bias)));
    down_proj = register_module("down_proj", torch::nn::Linear(torch::nn::LinearOptions(I, h).bias(bias)));
  }
  Tensor forward(const Tensor& x, const TrainingOptions& o) {
    if (o.mlp_policy != "none" && !bias && x.scalar_type() != torch::kDouble)
      return unswag::fused_mlp(x, up_proj->weight, down_proj->weight, gate_proj->weight, gated_activation(act),
                               o.mlp_policy, o.mlp_storage_bits);
    return down_proj(activation(act, gate_proj(x)) * up_proj(x));
  }
  std::string act;
  bool bias;
  torch::nn::Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(MLP);

struct DecoderLayerImpl : torch::nn::Module {
  DecoderLayerImpl(const ModelConfig& c, int64_t index_) : index(index_) {
    if (c.is_psa_layer(index)) psa = register_module("self_attn", make_psa(c, c.psa));
    else self_attn = register_module("self_attn", Attention(c));
    mlp = register_module("mlp", MLP(c));
    input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_adds_one()));
    post_attention_layernorm =
        register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_adds_one()));
  }
  nn::PacketSwitchedAttention make_psa(const ModelConfig& c, const nn::PSAConfig& pc) const {
    return nn::PacketSwitchedAttention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                       c.qkv_bias(), c.o_bias(), pc, index);
  }
  // Replaces dense attention by PSA with the same q/k/v/o (RoPE is applied
  // by PSA itself at the original positions) and fresh PSA parameters.
  void use_psa(const ModelConfig& c, const nn::PSAConfig& pc) {
    if (psa) return;
    nn::PacketSwitchedAttention p = make_psa(c, pc);
    const Tensor& w = self_attn->q_proj->weight;
    p->to(w.device(), w.scalar_type());
    torch::NoGradGuard no_grad;
    const std::vector<std::pair<torch::nn::Linear, torch::nn::Linear>> pairs = {
        {p->q_proj, self_attn->q_proj}, {p->k_proj, self_attn->k_proj},
        {p->v_proj, self_attn->v_proj}, {p->o_proj, self_attn->o_proj}};
    for (const auto& [to, from] : pairs) {
      to->weight.copy_(from->weight);
      if (from->bias.defined()) to->bias.copy_(from->bias);
    }
    p->train(is_training());
    psa = replace_module("self_attn", p);
    self_attn = nullptr;
  }
  Tensor attend(const Tensor& h, const Rope& rope, const TrainingOptions& o) {
    return psa ? psa->forward(h, rope.positions, rope.cos, rope.sin) : self_attn->forward(h, rope, o);
  }
  Tensor attention_half(const Tensor& x, const Rope& rope, const TrainingOptions& o) {
    return x + attend(input_layernorm->forward(x, o.lean_norm), rope, o);
  }
  Tensor mlp_half(const Tensor& h, const TrainingOptions& o) {
    return h + mlp->forward(post_attention_layernorm->forward(h, o.lean_norm), o);
  }
  Tensor forward(const Tensor& x, const Rope& rope, const TrainingOptions& o) {
    return mlp_half(attention_half(x, rope, o), o);
  }
  Tensor forward_cached(const Tensor& x, const Rope& rope, const TrainingOptions& o, InferenceCache& cache) {
    const Tensor h = input_layernorm->forward(x, o.lean_norm);
    const Tensor a = psa ? psa->forward_cached(h, rope.positions, rope.cos, rope.sin, cache.psa[index])
                         : self_attn->forward_cached(h, rope, cache.kv[index]);
    return mlp_half(x + a, o);
  }
  int64_t index;
  Attention self_attn{nullptr};       // dense attention, or
  nn::PacketSwitchedAttention psa{nullptr};  // PSA, registered under the same name "self_attn"
  MLP mlp{nullptr};
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
};
TORCH_MODULE(DecoderLayer);

// Recomputation of a layer (part 0) or of its MLP half (part 1): forward runs
// without autograd and keeps only the input; backward reruns the part with
// autograd on and back-propagates through it, accumulating the parameters'
// gradients directly (as torch.utils.checkpoint's reentrant variant does).
// The layer is passed as an address: it outlives the graph (the model owns it).
struct LayerCheckpoint : public torch::autograd::Function<LayerCheckpoint> {
  static Tensor run(int64_t layer, int64_t part, const Tensor& x, const Rope& rope, const TrainingOptions& o) {
    auto* l = reinterpret_cast<DecoderLayerImpl*>(layer);
    return part == 0 ? l->forward(x, rope, o) : l->mlp_half(x, o);
  }
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& cos, const Tensor& sin,
                        int64_t layer, int64_t part, int64_t options) {
    ctx->save_for_backward({x, cos, sin});
    ctx->saved_data["layer"] = layer;
    ctx->saved_data["part"] = part;
    ctx->saved_data["options"] = options;
    torch::NoGradGuard no_grad;
    return run(layer, part, x, Rope{cos, sin, Tensor()}, *reinterpret_cast<const TrainingOptions*>(options));
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor x = saved[0].detach().requires_grad_(true);
    Tensor y;
    {
      torch::AutoGradMode grad_on(true);
      y = run(ctx->saved_data["layer"].toInt(), ctx->saved_data["part"].toInt(), x,
              Rope{saved[1], saved[2], Tensor()},
              *reinterpret_cast<const TrainingOptions*>(ctx->saved_data["options"].toInt()));
    }
    torch::autograd::backward({y}, {grads[0]});
    return {x.grad(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct BackboneImpl : torch::nn::Module {
  explicit BackboneImpl(const ModelConfig& c) {
    // transformers passes pad_token_id as padding_idx: that row gets no gradient.
    auto eo = torch::nn::EmbeddingOptions(c.vocab_size, c.hidden_size);
    if (c.pad_token_id && *c.pad_token_id >= 0 && *c.pad_token_id < c.vocab_size) eo.padding_idx(*c.pad_token_id);
    embed_tokens = register_module("embed_tokens", torch::nn::Embedding(eo));
    layers = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) layers->push_back(DecoderLayer(c, i));
    norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_adds_one()));
  }
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
};
TORCH_MODULE(Backbone);

}  // namespace

class CausalLMImpl : public torch::nn::Module {
 public:
  explicit CausalLMImpl(const ModelConfig& c) : config(c) {
    model = register_module("model", Backbone(c));
    if (!c.tie_word_embeddings)
      lm_head = register_module("lm_head", torch::nn::Linear(torch::nn::LinearOptions(c.hidden_size, c.vocab_size).bias(false)));
    inv_freq = rope_inv_freq(c.rope, c.head_dim);
    options = TrainingOptions::plain();
    options.attention = "auto";
  }

  const Tensor& lm_weight() const { return lm_head ? lm_head->weight : model->embed_tokens->weight; }

  // The final normalised hidden states [B, T, hidden].
  Tensor hidden_states(const Tensor& input_ids, const Tensor& position_ids_in) {
    TORCH_CHECK(input_ids.dim() == 2 && input_ids.scalar_type() == torch::kLong,
                "Model: input_ids must be int64 [batch, tokens], got ", input_ids.scalar_type(), " ",
                input_ids.sizes());
    const auto& w = model->embed_tokens->weight;
    TORCH_CHECK(input_ids.device() == w.device(), "Model: input_ids are on ", input_ids.device(),
                " but the model is on ", w.device());
    const int64_t B = input_ids.size(0), T = input_ids.size(1);
    Tensor position_ids = position_ids_in;
    if (!position_ids.defined()) position_ids = torch::arange(T, input_ids.options()).unsqueeze(0).expand({B, T});
    TORCH_CHECK(position_ids.sizes() == input_ids.sizes(), "Model: position_ids must have the shape of input_ids ",
                input_ids.sizes(), ", got ", position_ids.sizes());
    const Rope rope = rope_at(position_ids.to(w.device()));
    Tensor x = embed(input_ids);
    const bool grad = torch::GradMode::is_enabled();
    for (size_t i = 0; i < model->layers->size(); ++i) {
      auto layer = model->layers[i]->as<DecoderLayerImpl>();
      std::string policy = recompute_policy(int64_t(i));
      if (layer->psa && policy == "full") policy = "selective";  // see TrainingOptions::psa_layers
      if (!grad || policy == "none") {
        x = layer->forward(x, rope, options);
      } else if (policy == "full") {
        x = LayerCheckpoint::apply(x, rope.cos, rope.sin, reinterpret_cast<int64_t>(layer), 0,
                                   reinterpret_cast<int64_t>(&options));
      } else {  // selective: keep the attention half, recompute the MLP half
        const Tensor h = layer->attention_half(x, rope, options);
        x = LayerCheckpoint::apply(h, rope.cos, rope.sin, reinterpret_cast<int64_t>(layer), 1,
                                   reinterpret_cast<int64_t>(&options));
      }
    }
    return model->norm->forward(x, options.lean_norm);
  }

  // RoPE angles in fp32 (transformers disables autocast there), cos/sin cast to the compute dtype.
  Rope rope_at(const Tensor& position_ids) const {
    const auto& w = model->embed_tokens->weight;
    const Tensor freqs = position_ids.to(torch::kFloat).unsqueeze(-1) * inv_freq.to(w.device()).view({1, 1, -1});
    const Tensor emb = torch::cat({freqs, freqs}, -1).unsqueeze(1);
    return Rope{emb.cos().to(w.scalar_type()), emb.sin().to(w.scalar_type()), position_ids};
  }

  Tensor embed(const Tensor& input_ids) {
    Tensor x = model->embed_tokens(input_ids);
    if (config.scales_embeddings())
      x = x * torch::tensor(std::sqrt(double(config.hidden_size)), x.options()).to(x.scalar_type());
    return x;
  }

  // Eval-mode hidden states of input_ids [1, T] continuing `cache`.
  Tensor hidden_states_cached(const Tensor& input_ids, InferenceCache& cache) {
    TORCH_CHECK(input_ids.dim() == 2 && input_ids.size(0) == 1 && input_ids.scalar_type() == torch::kLong,
                "Model::forward_cached: input_ids must be int64 [1, tokens] (the cache holds one sequence), got ",
                input_ids.scalar_type(), " ", input_ids.sizes());
    TORCH_CHECK(!is_training(), "Model::forward_cached: call eval() first (cached generation is inference)");
    const auto& w = model->embed_tokens->weight;
    TORCH_CHECK(input_ids.device() == w.device(), "Model::forward_cached: input_ids are on ", input_ids.device(),
                " but the model is on ", w.device());
    const size_t n = model->layers->size();
    if (cache.kv.empty() && cache.psa.empty() && cache.tokens == 0) {
      cache.kv.resize(n);
      cache.psa.resize(n);
    }
    TORCH_CHECK(cache.kv.size() == n && cache.psa.size() == n, "Model::forward_cached: the cache was made for ",
                cache.kv.size(), " layers, the model has ", n, " (use a fresh InferenceCache per model)");
    torch::NoGradGuard no_grad;
    const int64_t T = input_ids.size(1);
    const Tensor positions = torch::arange(cache.tokens, cache.tokens + T, input_ids.options()).unsqueeze(0);
    const Rope rope = rope_at(positions);
    Tensor x = embed(input_ids);
    for (size_t i = 0; i < n; ++i)
      x = model->layers[i]->as<DecoderLayerImpl>()->forward_cached(x, rope, options, cache);
    cache.tokens += T;
    return model->norm->forward(x, options.lean_norm);
  }

  std::vector<std::pair<int64_t, nn::PacketSwitchedAttentionImpl*>> psa_layers() {
    std::vector<std::pair<int64_t, nn::PacketSwitchedAttentionImpl*>> out;
    for (size_t i = 0; i < model->layers->size(); ++i) {
      auto layer = model->layers[i]->as<DecoderLayerImpl>();
      if (layer->psa) out.emplace_back(int64_t(i), layer->psa.get());
    }
    return out;
  }

  Tensor psa_aux_loss() {
    Tensor total = torch::zeros({}, model->embed_tokens->weight.options().dtype(torch::kFloat));
    for (const auto& [i, p] : psa_layers())
      if (p->aux_loss().defined()) total = total + p->aux_loss();
    return total;
  }

  std::string recompute_policy(int64_t layer) const {
    if (options.recompute == "none") return "none";
    if (options.recompute_layers.empty()) return options.recompute;
    const auto& l = options.recompute_layers;
    return std::find(l.begin(), l.end(), layer) != l.end() ? options.recompute : "none";
  }

  Tensor logits(const Tensor& input_ids, const Tensor& position_ids) {
    return torch::matmul(hidden_states(input_ids, position_ids), lm_weight().t());
  }

  Tensor loss(const Tensor& input_ids, const Tensor& targets, const Tensor& position_ids) {
    TORCH_CHECK(targets.sizes() == input_ids.sizes() && targets.scalar_type() == torch::kLong,
                "Model::loss: targets must be int64 with the shape of input_ids ", input_ids.sizes(), ", got ",
                targets.scalar_type(), " ", targets.sizes());
    const Tensor h = hidden_states(input_ids, position_ids);
    const Tensor flat_targets = targets.reshape({-1}).to(h.device());
    Tensor ce;
    if (options.chunked_loss) {
      ce = unswag::linear_cross_entropy(h.reshape({-1, h.size(-1)}), lm_weight(), flat_targets,
                                        options.loss_chunk_tokens);
    } else {
      const Tensor z = torch::matmul(h, lm_weight().t()).to(torch::kFloat);
      ce = torch::nn::functional::cross_entropy(z.reshape({-1, z.size(-1)}), flat_targets,
                                                torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100));
    }
    // PSA's router losses join the objective in training (docs/psa.md).
    if (is_training() && !psa_layers().empty()) ce = ce + psa_aux_loss().to(ce.scalar_type());
    return ce;
  }

  ModelConfig config;
  TrainingOptions options;
  Backbone model{nullptr};
  torch::nn::Linear lm_head{nullptr};
  Tensor inv_freq;  // fp32 [head_dim / 2], not a parameter (transformers does not save it)
};

namespace {

void check_training_options(const TrainingOptions& o, int64_t layers) {
  const std::set<std::string> mlp = {"none", "recompute", "compressed"}, attn = {"auto", "sdpa", "chunked", "eager"},
                              rec = {"none", "selective", "full"};
  TORCH_CHECK(mlp.count(o.mlp_policy), "for_training: mlp_policy must be none, recompute or compressed, got \"",
              o.mlp_policy, "\"");
  TORCH_CHECK(o.mlp_storage_bits == 16 || o.mlp_storage_bits == 8,
              "for_training: mlp_storage_bits must be 16 or 8, got ", o.mlp_storage_bits);
  TORCH_CHECK(attn.count(o.attention), "for_training: attention must be auto, sdpa, chunked or eager, got \"",
              o.attention, "\"");
  TORCH_CHECK(o.attention_chunk > 0, "for_training: attention_chunk must be positive, got ", o.attention_chunk);
  TORCH_CHECK(o.loss_chunk_tokens >= 0, "for_training: loss_chunk_tokens must be >= 0, got ", o.loss_chunk_tokens);
  TORCH_CHECK(rec.count(o.recompute), "for_training: recompute must be none, selective or full, got \"", o.recompute,
              "\"");
  for (int64_t l : o.recompute_layers)
    TORCH_CHECK(l >= 0 && l < layers, "for_training: recompute_layers holds ", l, "; the model has layers 0..",
                layers - 1);
  if (o.psa_layers != TrainingOptions::all_layers())
    for (int64_t l : o.psa_layers)
      TORCH_CHECK(l >= 0 && l < layers, "for_training: psa_layers holds ", l, "; the model has layers 0..",
                  layers - 1, " (or TrainingOptions::all_layers())");
  if (!o.psa_layers.empty()) o.psa.validate("for_training: psa");
}

// The parameters and buffers (PSA's controller bias) a checkpoint holds, by name.
std::vector<std::pair<std::string, at::Tensor>> checkpoint_tensors(const torch::nn::Module& m) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& kv : m.named_parameters()) out.emplace_back(kv.key(), kv.value());
  for (const auto& kv : m.named_buffers()) out.emplace_back(kv.key(), kv.value());
  return out;
}

// Parameter names a checkpoint may hold that the model does not use.
bool ignorable(const std::string& name, const ModelConfig& c) {
  if (name.size() >= 19 && name.compare(name.size() - 19, 19, "rotary_emb.inv_freq") == 0) return true;
  return c.tie_word_embeddings && name == "lm_head.weight";
}

void init_like_transformers(CausalLMImpl& m, uint64_t seed) {
  torch::manual_seed(seed);
  torch::NoGradGuard no_grad;
  for (auto& kv : m.named_parameters()) {
    const std::string& name = kv.key();
    at::Tensor& p = kv.value();
    const bool is_norm = name.size() >= 11 && name.compare(name.size() - 11, 11, "norm.weight") == 0;
    if (is_norm) p.fill_(m.config.norm_adds_one() ? 0.0 : 1.0);
    else if (name.size() >= 4 && name.compare(name.size() - 4, 4, "bias") == 0) p.zero_();
    else p.normal_(0.0, 0.02);
  }
  if (m.config.pad_token_id && *m.config.pad_token_id >= 0 && *m.config.pad_token_id < m.config.vocab_size)
    m.model->embed_tokens->weight[*m.config.pad_token_id].zero_();  // as transformers does for padding_idx
  // PSA's own initialisation (router bias log(targets), conv 1/Kc, ...), still from the seeded generator.
  for (const auto& [i, p] : m.psa_layers()) p->reset_psa_parameters();
}

}  // namespace
}  // namespace unswag::models

namespace unswag {

using models::CausalLMImpl;

Model Model::from_config(const ModelConfig& config, const LoadOptions& options, uint64_t seed) {
  config.validate();
  auto impl = std::make_shared<CausalLMImpl>(config);
  impl->to(options.device, options.dtype.value_or(config.dtype));
  impl->config.dtype = options.dtype.value_or(config.dtype);
  models::init_like_transformers(*impl, seed);
  return Model(impl);
}

Model Model::from_pretrained(const std::string& dir, const LoadOptions& options) {
  const std::string config_path = io::join(dir, "config.json");
  TORCH_CHECK(io::exists(dir), "from_pretrained: directory ", dir, " does not exist");
  TORCH_CHECK(io::exists(config_path), "from_pretrained: ", dir, " has no config.json (expected a Hugging Face ",
              "checkpoint directory)");
  ModelConfig config = ModelConfig::from_file(config_path);
  // Views of the mapped files: each tensor is read once, straight into its parameter.
  std::map<std::string, at::Tensor> tensors = safetensors::load_sharded(dir, /*copy=*/false);
  const auto dtype = options.dtype.value_or(config.dtype);
  config.dtype = dtype;
  auto impl = std::make_shared<CausalLMImpl>(config);
  impl->to(options.device, dtype);
  torch::NoGradGuard no_grad;
  std::set<std::string> used;
  for (auto& [name, p] : models::checkpoint_tensors(*impl)) {
    auto it = tensors.find(name);
    TORCH_CHECK(it != tensors.end(), "from_pretrained: ", dir, ": the checkpoint lacks tensor \"", name,
                "\" of shape ", p.sizes(), " (model_type ", config.model_type, ")");
    TORCH_CHECK(it->second.sizes() == p.sizes(), "from_pretrained: ", dir, ": tensor \"", name, "\" has shape ",
                it->second.sizes(), ", expected ", p.sizes(), " from config.json");
    TORCH_CHECK(at::isFloatingType(it->second.scalar_type()), "from_pretrained: ", dir, ": tensor \"", name,
                "\" has dtype ", it->second.scalar_type(), ", expected a floating-point type");
    p.copy_(it->second);
    used.insert(name);
  }
  for (const auto& [name, t] : tensors)
    TORCH_CHECK(used.count(name) || models::ignorable(name, config), "from_pretrained: ", dir,
                ": unexpected tensor \"", name, "\" ", t.sizes(), " (not a parameter of a ", config.model_type,
                " model with this config)");
  return Model(impl);
}

void Model::save_pretrained(const std::string& dir, int64_t max_shard_bytes) const {
  TORCH_CHECK(max_shard_bytes > 0, "save_pretrained: max_shard_bytes must be positive, got ", max_shard_bytes);
  io::make_dirs(dir);
  std::vector<std::pair<std::string, at::Tensor>> params;
  for (const auto& [name, t] : models::checkpoint_tensors(*impl_)) params.emplace_back(name, t.detach());
  // Greedy shards in parameter order, as transformers splits them.
  std::vector<std::map<std::string, at::Tensor>> shards(1);
  int64_t shard_bytes = 0, total = 0;
  for (const auto& [name, p] : params) {
    const int64_t bytes = p.numel() * int64_t(p.element_size());
    if (shard_bytes > 0 && shard_bytes + bytes > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back()[name] = p;
    shard_bytes += bytes;
    total += bytes;
  }
  const std::map<std::string, std::string> meta = {{"format", "pt"}};
  const std::string index = io::join(dir, "model.safetensors.index.json"), single = io::join(dir, "model.safetensors");
  if (shards.size() == 1) {
    safetensors::save(shards[0], single, meta);
    if (io::exists(index)) ::unlink(index.c_str());  // a stale index would shadow nothing but confuse readers
  } else {
    nlohmann::json weight_map = nlohmann::json::object();
    const size_t n = shards.size();
    for (size_t i = 0; i < n; ++i) {
      char name[64];
      std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, n);
      safetensors::save(shards[i], io::join(dir, name), meta);
      for (const auto& kv : shards[i]) weight_map[kv.first] = name;
    }
    nlohmann::json j = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    io::write_text_atomic(index, j.dump(2) + "\n");
    if (io::exists(single)) ::unlink(single.c_str());  // transformers would load it instead of the shards
  }
  ModelConfig c = impl_->config;
  c.dtype = dtype();
  io::write_text_atomic(io::join(dir, "config.json"), c.to_json());
  nlohmann::json gen = {{"_from_model_config", true}};
  auto ids = [](const std::vector<int64_t>& v) {
    return v.empty() ? nlohmann::json(nullptr) : v.size() == 1 ? nlohmann::json(v[0]) : nlohmann::json(v);
  };
  gen["bos_token_id"] = ids(c.bos_token_ids);
  gen["eos_token_id"] = ids(c.eos_token_ids);
  if (c.pad_token_id) gen["pad_token_id"] = *c.pad_token_id;
  io::write_text_atomic(io::join(dir, "generation_config.json"), gen.dump(2) + "\n");
}

Model& Model::for_training(const TrainingOptions& options) {
  auto& c = impl_->config;
  models::check_training_options(options, c.num_hidden_layers);
  if (!options.psa_layers.empty()) {
    TORCH_CHECK(c.psa_layers.empty() ||
                    (c.psa.kernel_size == options.psa.kernel_size && c.psa.window == options.psa.window),
                "for_training: the model's PSA layers have kernel_size ", c.psa.kernel_size, " and window ",
                c.psa.window, "; new PSA layers must use the same (one unswag_psa section describes them all), got ",
                options.psa.kernel_size, " and ", options.psa.window);
    std::vector<int64_t> layers = options.psa_layers;
    if (layers == TrainingOptions::all_layers()) {
      layers.clear();
      for (int64_t i = 0; i < c.num_hidden_layers; ++i) layers.push_back(i);
    }
    for (int64_t l : layers) {
      impl_->model->layers[l]->as<models::DecoderLayerImpl>()->use_psa(c, options.psa);
      c.psa_layers.push_back(l);
    }
    std::sort(c.psa_layers.begin(), c.psa_layers.end());
    c.psa_layers.erase(std::unique(c.psa_layers.begin(), c.psa_layers.end()), c.psa_layers.end());
    c.psa = options.psa;
  }
  impl_->options = options;
  impl_->train(true);
  return *this;
}

const TrainingOptions& Model::training_options() const { return impl_->options; }

torch::Tensor Model::forward(const torch::Tensor& input_ids, const torch::Tensor& position_ids) {
  return impl_->logits(input_ids, position_ids);
}

torch::Tensor Model::loss(const torch::Tensor& input_ids, const torch::Tensor& targets,
                          const torch::Tensor& position_ids) {
  return impl_->loss(input_ids, targets, position_ids);
}

torch::Tensor Model::forward_cached(const torch::Tensor& input_ids, InferenceCache& cache) {
  return torch::matmul(impl_->hidden_states_cached(input_ids, cache), impl_->lm_weight().t());
}

torch::Tensor Model::psa_aux_loss() const { return impl_->psa_aux_loss(); }

void Model::set_psa_temperature(double tau) {
  for (const auto& [i, p] : impl_->psa_layers()) p->set_temperature(tau);
  impl_->config.psa.temperature = tau;
}

void Model::update_psa_controller() {
  for (const auto& [i, p] : impl_->psa_layers()) p->update_controller();
}

std::vector<std::pair<int64_t, nn::PSARouteStats>> Model::psa_route_stats() const {
  std::vector<std::pair<int64_t, nn::PSARouteStats>> out;
  for (const auto& [i, p] : impl_->psa_layers()) out.emplace_back(i, p->route_stats());
  return out;
}

int64_t InferenceCache::kv_bytes() const {
  int64_t b = 0;
  for (const auto& k : kv) b += k.bytes_allocated();
  return b;
}

int64_t InferenceCache::psa_bytes() const {
  int64_t b = 0;
  for (const auto& p : psa) b += p.bytes_allocated();
  return b;
}

const ModelConfig& Model::config() const { return impl_->config; }

std::vector<std::pair<std::string, torch::Tensor>> Model::named_parameters() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& kv : impl_->named_parameters()) out.emplace_back(kv.key(), kv.value());
  return out;
}

std::vector<torch::Tensor> Model::parameters() const { return impl_->parameters(); }

int64_t Model::num_parameters() const {
  int64_t n = 0;
  for (const auto& p : impl_->parameters()) n += p.numel();
  return n;
}

torch::Device Model::device() const { return impl_->model->embed_tokens->weight.device(); }
torch::ScalarType Model::dtype() const { return impl_->model->embed_tokens->weight.scalar_type(); }
void Model::train(bool on) { impl_->train(on); }
void Model::zero_grad() { impl_->zero_grad(); }
torch::nn::Module& Model::module() { return *impl_; }

}  // namespace unswag
