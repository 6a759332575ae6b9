// unswag::Model: a Llama-family causal LM (Llama, Mistral, Qwen2, Gemma) that
// loads and saves Hugging Face checkpoints (config.json + safetensors) and,
// after for_training(), trains with far less activation memory:
//
//   auto model = unswag::Model::from_pretrained("path/to/checkpoint", {torch::kCUDA, torch::kBFloat16});
//   model.for_training({});                      // lean MLP, flash attention, chunked loss
//   auto loss = model.loss(input_ids, targets);  // targets[b][t]: the token after input_ids[b][t]
//   loss.backward();
//   model.save_pretrained("out/");               // transformers loads it back
//
// Parameter names are Hugging Face's ("model.layers.0.self_attn.q_proj.weight").
// Layers may use Packet-Switched Attention (docs/psa.md) instead of dense
// attention: from a config with "unswag_psa", or through for_training().
#pragma once

#include <torch/nn/module.h>
#include <torch/types.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "unswag/models/config.h"

namespace unswag {

using models::ModelConfig;

struct LoadOptions {
  torch::Device device = torch::kCPU;
  // The parameters' dtype; nullopt: the checkpoint's torch_dtype.
  std::optional<torch::ScalarType> dtype;
};

// What for_training() switches on; each part is selectable. The defaults are
// the memory-lean path; `TrainingOptions::plain()` is plain autograd (the
// baseline the lean path is tested against).
struct TrainingOptions {
  // MLP blocks through unswag::fused_mlp: "none" (what autograd keeps),
  // "recompute" (keeps only the block input), "compressed" (no matmul
  // recomputed; see docs/memory.md). mlp_storage_bits 8 keeps the compressed
  // values as int8 (lossy).
  std::string mlp_policy = "compressed";
  int64_t mlp_storage_bits = 16;
  // "auto": PyTorch's SDPA (flash / memory-efficient kernels, no T x T
  //         matrix) unless a sliding window or float64 would make it
  //         materialise a mask or fall back to the math kernel: then "chunked".
  // "sdpa", "chunked" (UnSwag's query-chunked attention with recomputation in
  //         backward, O(chunk x T) memory), "eager" (the materialised scores
  //         as transformers' eager attention: the reference).
  std::string attention = "auto";
  int64_t attention_chunk = 1024;  // query rows per chunk for "chunked"
  // The final linear + cross-entropy in chunks of tokens (never the whole
  // [tokens, vocab] logits); 0 chooses ~2^28 / vocab tokens per chunk.
  bool chunked_loss = true;
  int64_t loss_chunk_tokens = 0;
  // Per-layer recomputation: "none"; "selective" recomputes the MLP half of a
  // layer (RMSNorm + MLP, linear in T) and keeps the attention half (whose
  // recomputation is quadratic in T); "full" recomputes the whole layer from
  // its input. recompute_layers: the layers it applies to (empty: all).
  std::string recompute = "none";
  std::vector<int64_t> recompute_layers;
  // RMSNorm that keeps its input and the fp32 1/rms for backward, not the
  // fp32 copies autograd keeps.
  bool lean_norm = true;
  // Packet-Switched Attention (docs/psa.md): the layers whose attention
  // for_training() replaces by PSA, keeping q/k/v/o and RoPE and initialising
  // the router, conv, decays and lambdas: empty = none (layers already PSA
  // stay PSA), a list of indices, or all_layers(). The settings of new PSA
  // layers: `psa`. PSA layers under recompute "full" run as "selective" (the
  // attention half is kept: a recomputation would draw new routing noise and
  // lose the aux loss's graph).
  std::vector<int64_t> psa_layers;
  nn::PSAConfig psa;
  static std::vector<int64_t> all_layers() { return {-1}; }

  static TrainingOptions plain() {
    TrainingOptions o;
    o.mlp_policy = "none";
    o.attention = "eager";
    o.chunked_loss = false;
    o.lean_norm = false;
    return o;
  }
};

namespace models {
class CausalLMImpl;
}

// The state of cached generation for one sequence (batch 1): per layer, a
// dense KV cache (keys and values of every token) or a PSA cache (the signal
// tokens' keys and values only, the conv tail, the summary register).
struct InferenceCache {
  std::vector<nn::KVBuffer> kv;   // per layer; empty for PSA layers
  std::vector<nn::PSACache> psa;  // per layer; empty for dense layers
  int64_t tokens = 0;             // tokens consumed so far (the next token's position)
  // Bytes the caches hold (allocated capacity, not filled length).
  int64_t kv_bytes() const;
  int64_t psa_bytes() const;
  int64_t bytes_allocated() const { return kv_bytes() + psa_bytes(); }
  void clear() { *this = InferenceCache(); }
};

class Model {
 public:
  // Reads dir/config.json and the weights (model.safetensors or the shards of
  // model.safetensors.index.json). Every parameter must be present with its
  // shape; missing, unexpected or mis-shaped tensors are errors naming them.
  static Model from_pretrained(const std::string& dir, const LoadOptions& options = {});
  // A randomly initialised model (as transformers initialises it: normal with
  // std 0.02, zero biases, unit norms) from a config, with a seed.
  static Model from_config(const ModelConfig& config, const LoadOptions& options = {}, uint64_t seed = 0);

  // Writes dir/config.json, dir/generation_config.json and the weights
  // (model.safetensors, or shards of at most max_shard_bytes with an index),
  // each file atomically; transformers' from_pretrained loads the result.
  void save_pretrained(const std::string& dir, int64_t max_shard_bytes = int64_t(5) << 30) const;

  // Switches on the memory-lean training paths; see TrainingOptions.
  Model& for_training(const TrainingOptions& options = {});
  const TrainingOptions& training_options() const;

  // input_ids [B, T] int64 -> logits [B, T, vocab] (the parameters' dtype).
  // position_ids [B, T] (optional): 0..T-1 per row when absent.
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& position_ids = {});
  // Mean cross-entropy (float32) of predicting targets [B, T] (the next token
  // of each position; -100 = ignored) from input_ids. Transformers'
  // labels=input_ids corresponds to targets = [input_ids[:, 1:], -100].
  // With chunked_loss the logits are never materialised whole.
  // In training mode a model with PSA layers adds their aux losses (load
  // balance and router z-loss, weighted; psa_aux_loss()) to the returned loss.
  torch::Tensor loss(const torch::Tensor& input_ids, const torch::Tensor& targets,
                     const torch::Tensor& position_ids = {});

  // Eval-mode logits [1, T, vocab] of input_ids [1, T] continuing the sequence
  // held by `cache` (positions cache.tokens ..), which it extends: prefill with
  // the prompt, then one token per call. No autograd.
  torch::Tensor forward_cached(const torch::Tensor& input_ids, InferenceCache& cache);

  // PSA: the summed weighted aux losses of the last forward (0-dim fp32; zero
  // in eval mode or without PSA layers); the Gumbel temperature of every PSA
  // layer (annealed ~1 -> 0.3 by whoever trains); the route-bias controller
  // step, to call after each optimizer step; the last forward's route
  // fractions and train/eval agreement per PSA layer (layer index, stats).
  torch::Tensor psa_aux_loss() const;
  void set_psa_temperature(double tau);
  void update_psa_controller();
  std::vector<std::pair<int64_t, nn::PSARouteStats>> psa_route_stats() const;

  const ModelConfig& config() const;
  std::vector<std::pair<std::string, torch::Tensor>> named_parameters() const;
  std::vector<torch::Tensor> parameters() const;
  int64_t num_parameters() const;
  torch::Device device() const;
  torch::ScalarType dtype() const;
  void train(bool on = true);
  void eval() { train(false); }
  void zero_grad();
  torch::nn::Module& module();

 private:
  explicit Model(std::shared_ptr<models::CausalLMImpl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<models::CausalLMImpl> impl_;
};

// Continues `prompt` (token ids) by up to max_new_tokens tokens: greedy when
// temperature is 0, else sampling from softmax(logits / temperature) cut to
// the smallest set of tokens whose probability reaches top_p. Stops after a
// token in stop_ids (default: the config's EOS ids). With use_cache the
// prompt is run once into an InferenceCache and each step runs one token;
// without, each step reruns the whole sequence (the reference). Returns the
// new tokens only. `cache` (optional): the cache to use (cleared first), left
// filled so its bytes can be read.
struct GenerateOptions {
  int64_t max_new_tokens = 32;
  double temperature = 0.0;
  double top_p = 1.0;
  uint64_t seed = 0;
  std::optional<std::vector<int64_t>> stop_ids;
  bool use_cache = true;
};
std::vector<int64_t> generate(Model& model, const std::vector<int64_t>& prompt, const GenerateOptions& options = {},
                              InferenceCache* cache = nullptr);

// What one training step at `tokens` tokens per step should hold, in bytes,
// by the accounting of docs/models.md: parameters and gradients in `dtype`,
// optimizer state (AdamW8bit: 2 bytes per parameter plus one fp32 scale per
// 256; else fp32 AdamW: 8 bytes per parameter), and the activations the
// TrainingOptions keep for backward plus one layer's working set. An
// estimate, not a measurement: bench/bench_model.py measures.
struct TrainingMemoryEstimate {
  double parameters = 0, gradients = 0, optimizer = 0, activations = 0;
  double total() const { return parameters + gradients + optimizer + activations; }
};
TrainingMemoryEstimate estimate_training_memory(const ModelConfig& config, int64_t tokens,
                                                const TrainingOptions& options = {},
                                                torch::ScalarType dtype = torch::kBFloat16, bool eight_bit_optimizer = true);

}  // namespace unswag
