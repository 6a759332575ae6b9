// Text continuation (cached: the prompt prefilled once into an
// InferenceCache, then one token per step; or the uncached reference that
// reruns the whole sequence) and the training-memory estimate of
// unswag::Model (include/unswag/model.h).
#include <c10/util/Exception.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>

#include "unswag/model.h"

namespace unswag {

std::vector<int64_t> generate(Model& model, const std::vector<int64_t>& prompt, const GenerateOptions& o,
                              InferenceCache* cache_out) {
  TORCH_CHECK(!prompt.empty(), "generate: the prompt must hold at least one token");
  TORCH_CHECK(o.max_new_tokens >= 0, "generate: max_new_tokens must be >= 0, got ", o.max_new_tokens);
  TORCH_CHECK(o.temperature >= 0, "generate: temperature must be >= 0 (0 = greedy), got ", o.temperature);
  TORCH_CHECK(o.top_p > 0 && o.top_p <= 1, "generate: top_p must be in (0, 1], got ", o.top_p);
  const int64_t vocab = model.config().vocab_size;
  for (int64_t id : prompt)
    TORCH_CHECK(id >= 0 && id < vocab, "generate: prompt token ", id, " is outside the vocabulary [0, ", vocab, ")");
  const std::vector<int64_t> stops = o.stop_ids.value_or(model.config().eos_token_ids);
  torch::NoGradGuard no_grad;
  const bool was_training = model.module().is_training();
  model.eval();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  InferenceCache local_cache;
  InferenceCache& cache = cache_out != nullptr ? *cache_out : local_cache;
  cache.clear();
  std::vector<int64_t> seq = prompt, out;
  for (int64_t step = 0; step < o.max_new_tokens; ++step) {
    torch::Tensor last;  // [1, T, vocab]: the logits of the tokens just run
    if (o.use_cache) {
      // Step 0 prefills the prompt; later steps run the one token appended last.
      const std::vector<int64_t> fresh(seq.begin() + cache.tokens, seq.end());
      last = model.forward_cached(torch::tensor(fresh, torch::kLong).unsqueeze(0).to(model.device()), cache);
    } else {
      last = model.forward(torch::tensor(seq, torch::kLong).unsqueeze(0).to(model.device()));
    }
    const auto logits = last.select(1, last.size(1) - 1).squeeze(0).to(torch::kCPU, torch::kFloat);
    int64_t next;
    if (o.temperature == 0) {
      next = logits.argmax().item<int64_t>();
    } else {
      auto probs = torch::softmax(logits / o.temperature, -1);
      if (o.top_p < 1) {
        // Keep the most probable tokens up to cumulative probability top_p (at least one).
        auto [sorted, order] = probs.sort(-1, /*descending=*/true);
        const auto before = sorted.cumsum(-1) - sorted;  // mass of the more probable tokens
        sorted.masked_fill_(before >= o.top_p, 0.0);
        probs = torch::zeros_like(probs).scatter_(0, order, sorted);
      }
      next = torch::multinomial(probs, 1, false, gen).item<int64_t>();
    }
    out.push_back(next);
    seq.push_back(next);
    if (std::find(stops.begin(), stops.end(), next) != stops.end()) break;
  }
  model.train(was_training);
  return out;
}

TrainingMemoryEstimate estimate_training_memory(const ModelConfig& c, int64_t tokens, const TrainingOptions& o,
                                                torch::ScalarType dtype, bool eight_bit_optimizer) {
  TORCH_CHECK(tokens > 0, "estimate_training_memory: tokens must be positive, got ", tokens);
  const double e = double(c10::elementSize(dtype)), P = double(c.num_parameters());
  const double h = double(c.hidden_size), I = double(c.intermediate_size);
  const double q = double(c.num_attention_heads * c.head_dim), kv = double(c.num_key_value_heads * c.head_dim);
  TrainingMemoryEstimate m;
  m.parameters = P * e;
  m.gradients = P * e;
  m.optimizer = eight_bit_optimizer ? P * (2.0 + 8.0 / 256.0) : P * 8.0;
  // Per token, per layer (docs/models.md): the attention half keeps the norm
  // input x, the q/k/v input, q, k, v, the attention output and o_proj's copy
  // of it, the log-sum-exp; the MLP half keeps its norm input and the MLP
  // input plus what the MLP policy keeps.
  const double lse = 4.0 * double(c.num_attention_heads);
  const double attention_half = e * (2 * h + q + 2 * kv + 2 * q) + lse + 4;
  double mlp_kept = o.mlp_policy == "recompute" ? 0.0 : o.mlp_policy == "none" ? 4 * e * I
                    : o.mlp_storage_bits == 8 ? 2 * I * (1 + 4.0 / 64) : 2 * e * I;
  const double mlp_half = e * 2 * h + 4 + mlp_kept;
  // Plain parts, when chosen: eager attention keeps the T x T probabilities
  // (fp32 softmax and its cast), autograd's RMSNorm fp32 copies (x, xh: 8h) on
  // top of the cast.
  const double eager = o.attention == "eager" ? (4.0 + e) * double(c.num_attention_heads) * double(tokens) : 0.0;
  const double norms = o.lean_norm ? 0.0 : 2 * 8 * h;
  double per_layer;
  if (o.recompute == "full") per_layer = e * h;
  else if (o.recompute == "selective") per_layer = attention_half + e * h;
  else per_layer = attention_half + mlp_half;
  if (o.recompute != "full") per_layer += eager + norms;
  const double layers = double(c.num_hidden_layers), T = double(tokens);
  // The layer being recomputed in backward, and the chunked loss's largest chunk (fp32 logits and their grad).
  const double working = (o.recompute == "none" ? 0.0 : attention_half + mlp_half) * T;
  const double loss_tokens = o.loss_chunk_tokens > 0 ? double(o.loss_chunk_tokens)
                                                     : std::max(1.0, double(int64_t(1) << 28) / double(c.vocab_size));
  const double loss = o.chunked_loss ? std::min(T, loss_tokens) * double(c.vocab_size) * (4.0 + 4.0 + e)
                                     : T * double(c.vocab_size) * (e + 4.0 + 4.0);
  m.activations = per_layer * layers * T + working + loss;
  return m;
}

}  // namespace unswag
