// The configuration of a Llama-family causal LM, read from (and written back
// to) a Hugging Face config.json: Llama 1/2/3 (rope_scaling "llama3" and
// "linear"), Mistral (sliding window), Qwen2 (q/k/v biases), Gemma ((1 + w)
// RMSNorm, sqrt(hidden)-scaled embeddings, GELU-tanh). Both the transformers 4
// keys (rope_theta, rope_scaling, torch_dtype) and the transformers 5 ones
// (rope_parameters, dtype) are read. An UnSwag-only key, "unswag_psa", says
// which layers are Packet-Switched Attention (docs/psa.md) and with what
// settings; transformers ignores it (and cannot load such a model).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "unswag/nn/psa.h"

namespace unswag::models {

struct RopeConfig {
  std::string type = "default";  // default | linear | llama3
  double theta = 10000.0;
  double factor = 1.0;             // linear, llama3
  double low_freq_factor = 1.0;    // llama3
  double high_freq_factor = 4.0;   // llama3
  int64_t original_max_position_embeddings = 8192;  // llama3
};

struct ModelConfig {
  std::string model_type = "llama";  // llama | mistral | qwen2 | gemma
  std::string architecture;          // e.g. "LlamaForCausalLM"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // absent in config.json: equal to num_attention_heads
  int64_t head_dim = 0;             // absent: hidden_size / num_attention_heads
  std::string hidden_act = "silu";  // silu | gelu_pytorch_tanh | gelu
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool attention_bias = false;  // q/k/v/o biases (Qwen2: q/k/v only)
  bool mlp_bias = false;
  bool tie_word_embeddings = false;
  std::optional<int64_t> sliding_window;  // Mistral: each token sees the last `sliding_window` tokens
  c10::ScalarType dtype = c10::ScalarType::Float;  // torch_dtype / dtype
  std::vector<int64_t> bos_token_ids, eos_token_ids;
  std::optional<int64_t> pad_token_id;
  // Layers whose attention is PSA (sorted, unique; empty: a dense model) and
  // their settings. config.json: "unswag_psa": {"layers": [...], "kernel_size":
  // 8, "window": 128 (absent: 0), "target_shares": [prune, local, summary, signal], "load_loss_weight",
  // "z_loss_weight", "entropy_loss_weight" (absent: 0), "controller_gamma", "random_router",
  // "detach_router_input" (absent: false), "all_tokens_read_signal" (absent: false), "joint_softmax"
  // (absent: false), "summary" ("ema" or "linear_attention"; absent: "ema"), "lambda_init" (absent: 1),
  // "seed", "temperature"}.
  std::vector<int64_t> psa_layers;
  nn::PSAConfig psa;
  bool is_psa_layer(int64_t layer) const;

  // Family traits derived from model_type.
  bool qkv_bias() const { return attention_bias || model_type == "qwen2"; }
  bool o_bias() const { return attention_bias; }
  bool norm_adds_one() const { return model_type == "gemma"; }      // RMSNorm output * (1 + w)
  bool scales_embeddings() const { return model_type == "gemma"; }  // embeddings * sqrt(hidden)

  // Parses config.json text; `source` names the file in errors. Unsupported
  // model types, activations, RoPE types or inconsistent sizes are errors
  // naming the field and the value.
  static ModelConfig from_json(const std::string& text, const std::string& source = "config.json");
  static ModelConfig from_file(const std::string& path);
  // A Llama-3.2-1B-shaped config (hidden 2048, 16 layers, 32 heads, 8 KV
  // heads, intermediate 8192, vocab 128256, tied embeddings, llama3 RoPE).
  static ModelConfig llama3_2_1b();

  // config.json text that transformers loads back to this configuration. Keys
  // of the original file that UnSwag does not interpret are kept as they were
  // (`original_json`), the ones it does are written from the fields above.
  std::string to_json() const;

  std::string original_json;  // the text this config was parsed from, if any

  // Parameters of the model this config describes (embeddings, attention,
  // MLP, norms, biases, the LM head unless tied), without building it.
  int64_t num_parameters() const;

  // Throws when sizes are inconsistent (non-positive, heads not dividing, ...).
  void validate(const std::string& source = "config") const;
};

}  // namespace unswag::models
