// Parsing and writing Hugging Face config.json for the Llama family
// (include/unswag/models/config.h).
#include "unswag/models/config.h"

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

namespace unswag::models {
namespace {

using json = nlohmann::json;

const std::set<std::string>& supported_types() {
  static const std::set<std::string> t = {"llama", "mistral", "qwen2", "gemma"};
  return t;
}

// A required integer field, with a message naming it when absent or mistyped.
int64_t get_int(const json& j, const char* key, const std::string& src) {
  TORCH_CHECK(j.contains(key), src, ": missing required field \"", key, "\"");
  TORCH_CHECK(j[key].is_number_integer(), src, ": field \"", key, "\" must be an integer, got ", j[key].dump());
  return j[key].get<int64_t>();
}

double get_number(const json& j, const char* key, double fallback, const std::string& src) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  TORCH_CHECK(j[key].is_number(), src, ": field \"", key, "\" must be a number, got ", j[key].dump());
  return j[key].get<double>();
}

bool get_bool(const json& j, const char* key, bool fallback, const std::string& src) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  TORCH_CHECK(j[key].is_boolean(), src, ": field \"", key, "\" must be true or false, got ", j[key].dump());
  return j[key].get<bool>();
}

// BOS/EOS: an int, a list of ints, or null.
std::vector<int64_t> get_ids(const json& j, const char* key, const std::string& src) {
  if (!j.contains(key) || j[key].is_null()) return {};
  if (j[key].is_number_integer()) return {j[key].get<int64_t>()};
  TORCH_CHECK(j[key].is_array(), src, ": field \"", key, "\" must be an integer or a list of integers, got ",
              j[key].dump());
  std::vector<int64_t> ids;
  for (const auto& v : j[key]) {
    TORCH_CHECK(v.is_number_integer(), src, ": field \"", key, "\" must hold integers, got ", v.dump());
    ids.push_back(v.get<int64_t>());
  }
  return ids;
}

c10::ScalarType parse_dtype(const std::string& s, const std::string& src) {
  if (s == "float32" || s == "float") return c10::ScalarType::Float;
  if (s == "bfloat16") return c10::ScalarType::BFloat16;
  if (s == "float16" || s == "half") return c10::ScalarType::Half;
  TORCH_CHECK(false, src, ": unsupported dtype \"", s, "\" (expected float32, bfloat16 or float16)");
}

std::string dtype_string(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return "float32";
    case c10::ScalarType::BFloat16: return "bfloat16";
    case c10::ScalarType::Half: return "float16";
    default: TORCH_CHECK(false, "config: unsupported dtype ", t);
  }
}

// RoPE from either rope_parameters (transformers 5; possibly keyed by layer
// type, which this family does not use) or rope_theta + rope_scaling (4.x).
RopeConfig parse_rope(const json& j, const std::string& src) {
  RopeConfig r;
  json params = json::object();
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    params = j["rope_parameters"];
    if (params.contains("full_attention") && params["full_attention"].is_object()) params = params["full_attention"];
  } else if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) {
    params = j["rope_scaling"];
  }
  r.theta = get_number(params, "rope_theta", get_number(j, "rope_theta", 10000.0, src), src);
  std::string type = "default";
  if (params.contains("rope_type") && params["rope_type"].is_string()) type = params["rope_type"];
  else if (params.contains("type") && params["type"].is_string()) type = params["type"];
  TORCH_CHECK(type == "default" || type == "linear" || type == "llama3", src, ": unsupported RoPE type \"", type,
              "\" (supported: default, linear, llama3)");
  r.type = type;
  if (type != "default") {
    TORCH_CHECK(params.contains("factor"), src, ": RoPE type \"", type, "\" needs \"factor\"");
    r.factor = get_number(params, "factor", 1.0, src);
    TORCH_CHECK(r.factor > 0, src, ": RoPE factor must be positive, got ", r.factor);
  }
  if (type == "llama3") {
    r.low_freq_factor = get_number(params, "low_freq_factor", 1.0, src);
    r.high_freq_factor = get_number(params, "high_freq_factor", 4.0, src);
    TORCH_CHECK(params.contains("original_max_position_embeddings"), src,
                ": RoPE type llama3 needs \"original_max_position_embeddings\"");
    r.original_max_position_embeddings = get_int(params, "original_max_position_embeddings", src);
    TORCH_CHECK(r.high_freq_factor > r.low_freq_factor, src, ": llama3 RoPE needs high_freq_factor (",
                r.high_freq_factor, ") > low_freq_factor (", r.low_freq_factor, ")");
  }
  TORCH_CHECK(r.theta > 0, src, ": rope_theta must be positive, got ", r.theta);
  return r;
}

// "unswag_psa": the PSA layers and their settings (absent fields keep PSAConfig's defaults).
void parse_psa(const json& j, ModelConfig& c, const std::string& src) {
  if (!j.contains("unswag_psa") || j["unswag_psa"].is_null()) return;
  const json& p = j["unswag_psa"];
  const std::string where = src + ": unswag_psa";
  TORCH_CHECK(p.is_object(), where, " must be an object, got ", p.dump());
  TORCH_CHECK(p.contains("layers") && p["layers"].is_array(), where, ".layers must be a list of layer indices, got ",
              p.contains("layers") ? p["layers"].dump() : std::string("nothing"));
  for (const auto& v : p["layers"]) {
    TORCH_CHECK(v.is_number_integer(), where, ".layers must hold integers, got ", v.dump());
    c.psa_layers.push_back(v.get<int64_t>());
  }
  std::sort(c.psa_layers.begin(), c.psa_layers.end());
  c.psa_layers.erase(std::unique(c.psa_layers.begin(), c.psa_layers.end()), c.psa_layers.end());
  nn::PSAConfig& q = c.psa;
  if (p.contains("kernel_size")) q.kernel_size = get_int(p, "kernel_size", where);
  // Checkpoints written before the window existed had none.
  q.window = p.contains("window") ? get_int(p, "window", where) : 0;
  if (p.contains("target_shares")) {
    const json& t = p["target_shares"];
    TORCH_CHECK(t.is_array() && t.size() == 4, where,
                ".target_shares must be 4 numbers (prune, local, summary, signal), got ", t.dump());
    for (size_t r = 0; r < 4; ++r) {
      TORCH_CHECK(t[r].is_number(), where, ".target_shares must hold numbers, got ", t[r].dump());
      q.target_shares[r] = t[r].get<double>();
    }
  }
  q.load_loss_weight = get_number(p, "load_loss_weight", q.load_loss_weight, where);
  q.z_loss_weight = get_number(p, "z_loss_weight", q.z_loss_weight, where);
  // Checkpoints written before the entropy term had none.
  q.entropy_loss_weight = get_number(p, "entropy_loss_weight", 0.0, where);
  q.controller_gamma = get_number(p, "controller_gamma", q.controller_gamma, where);
  q.random_router = get_bool(p, "random_router", q.random_router, where);
  // Checkpoints written before the option existed trained their routers with the gradient reaching x.
  q.detach_router_input = get_bool(p, "detach_router_input", false, where);
  q.all_tokens_read_signal = get_bool(p, "all_tokens_read_signal", false, where);
  q.joint_softmax = get_bool(p, "joint_softmax", false, where);
  // Configs written before the option initialised the read gates to 1.
  q.lambda_init = get_number(p, "lambda_init", 1.0, where);
  if (p.contains("summary") && !p["summary"].is_null()) {
    TORCH_CHECK(p["summary"].is_string(), where, ".summary must be \"ema\" or \"linear_attention\", got ",
                p["summary"].dump());
    q.summary = p["summary"].get<std::string>();
  }
  if (p.contains("seed")) {
    TORCH_CHECK(p["seed"].is_number_unsigned() || p["seed"].is_number_integer(), where,
                ".seed must be a non-negative integer, got ", p["seed"].dump());
    q.seed = p["seed"].get<uint64_t>();
  }
  q.temperature = get_number(p, "temperature", q.temperature, where);
}

}  // namespace

bool ModelConfig::is_psa_layer(int64_t layer) const {
  return std::binary_search(psa_layers.begin(), psa_layers.end(), layer);
}

ModelConfig ModelConfig::from_json(const std::string& text, const std::string& src) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    TORCH_CHECK(false, src, ": not valid JSON: ", e.what());
  }
  TORCH_CHECK(j.is_object(), src, ": expected a JSON object");
  ModelConfig c;
  c.original_json = text;
  TORCH_CHECK(j.contains("model_type") && j["model_type"].is_string(), src, ": missing \"model_type\"");
  c.model_type = j["model_type"];
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty())
    c.architecture = j["architectures"][0].get<std::string>();
  if (!supported_types().count(c.model_type)) {
    std::string names;
    for (const auto& t : supported_types()) names += (names.empty() ? "" : ", ") + t;
    TORCH_CHECK(false, src, ": unsupported architecture \"", c.model_type,
                c.architecture.empty() ? "" : "\" (" + c.architecture + ")", "\"; supported model types: ", names);
  }
  c.vocab_size = get_int(j, "vocab_size", src);
  c.hidden_size = get_int(j, "hidden_size", src);
  c.intermediate_size = get_int(j, "intermediate_size", src);
  c.num_hidden_layers = get_int(j, "num_hidden_layers", src);
  c.num_attention_heads = get_int(j, "num_attention_heads", src);
  c.num_key_value_heads = j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null()
                              ? get_int(j, "num_key_value_heads", src)
                              : c.num_attention_heads;
  TORCH_CHECK(c.num_attention_heads > 0, src, ": num_attention_heads must be positive, got ",
              c.num_attention_heads);
  c.head_dim = j.contains("head_dim") && !j["head_dim"].is_null() ? get_int(j, "head_dim", src)
                                                                  : c.hidden_size / c.num_attention_heads;
  // Gemma configs name the MLP activation hidden_activation (hidden_act is legacy).
  for (const char* key : {"hidden_act", "hidden_activation"}) {
    if (j.contains(key) && j[key].is_string()) c.hidden_act = j[key];
  }
  TORCH_CHECK(c.hidden_act == "silu" || c.hidden_act == "gelu_pytorch_tanh" || c.hidden_act == "gelu", src,
              ": unsupported hidden_act \"", c.hidden_act, "\" (supported: silu, gelu_pytorch_tanh, gelu)");
  if (j.contains("max_position_embeddings")) c.max_position_embeddings = get_int(j, "max_position_embeddings", src);
  c.rms_norm_eps = get_number(j, "rms_norm_eps", 1e-6, src);
  c.rope = parse_rope(j, src);
  c.attention_bias = get_bool(j, "attention_bias", false, src);
  c.mlp_bias = get_bool(j, "mlp_bias", false, src);
  // transformers' default for tie_word_embeddings is true for Gemma, false otherwise.
  c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", c.model_type == "gemma", src);
  if (c.model_type == "mistral" && j.contains("sliding_window") && !j["sliding_window"].is_null())
    c.sliding_window = get_int(j, "sliding_window", src);
  if (c.model_type == "qwen2" && get_bool(j, "use_sliding_window", false, src))
    TORCH_CHECK(false, src, ": Qwen2 with use_sliding_window=true is not supported");
  for (const char* key : {"torch_dtype", "dtype"}) {
    if (j.contains(key) && j[key].is_string()) c.dtype = parse_dtype(j[key], src);
  }
  c.bos_token_ids = get_ids(j, "bos_token_id", src);
  c.eos_token_ids = get_ids(j, "eos_token_id", src);
  if (j.contains("pad_token_id") && j["pad_token_id"].is_number_integer()) c.pad_token_id = j["pad_token_id"];
  parse_psa(j, c, src);
  c.validate(src);
  return c;
}

ModelConfig ModelConfig::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in.good(), path, ": cannot open the model config (expected a Hugging Face config.json)");
  std::ostringstream s;
  s << in.rdbuf();
  return from_json(s.str(), path);
}

void ModelConfig::validate(const std::string& src) const {
  auto positive = [&](const char* name, int64_t v) {
    TORCH_CHECK(v > 0, src, ": ", name, " must be positive, got ", v);
  };
  positive("vocab_size", vocab_size);
  positive("hidden_size", hidden_size);
  positive("intermediate_size", intermediate_size);
  positive("num_hidden_layers", num_hidden_layers);
  positive("num_attention_heads", num_attention_heads);
  positive("num_key_value_heads", num_key_value_heads);
  positive("head_dim", head_dim);
  TORCH_CHECK(num_attention_heads % num_key_value_heads == 0, src, ": num_attention_heads (", num_attention_heads,
              ") must be a multiple of num_key_value_heads (", num_key_value_heads, ")");
  TORCH_CHECK(head_dim % 2 == 0, src, ": head_dim must be even for RoPE, got ", head_dim);
  TORCH_CHECK(rms_norm_eps > 0, src, ": rms_norm_eps must be positive, got ", rms_norm_eps);
  if (sliding_window) positive("sliding_window", *sliding_window);
  for (int64_t l : psa_layers)
    TORCH_CHECK(l >= 0 && l < num_hidden_layers, src, ": unswag_psa.layers holds ", l, "; the model has layers 0..",
                num_hidden_layers - 1);
  if (!psa_layers.empty()) psa.validate(src + ": unswag_psa");
}

int64_t ModelConfig::num_parameters() const {
  const int64_t q = num_attention_heads * head_dim, kv = num_key_value_heads * head_dim;
  int64_t layer = hidden_size * q + 2 * hidden_size * kv + q * hidden_size  // q, k, v, o
                  + 3 * hidden_size * intermediate_size                     // gate, up, down
                  + 2 * hidden_size;                                        // the two norms
  if (qkv_bias()) layer += q + 2 * kv;
  if (o_bias()) layer += hidden_size;
  if (mlp_bias) layer += 2 * intermediate_size + hidden_size;
  const int64_t embed = vocab_size * hidden_size;
  // PSA layers add the router (4d + 4), the conv (kv * Kc), the decays (kv,
  // or one per kv head for the linear-attention register) and the two
  // lambdas (2 q); the controller bias is a buffer.
  const int64_t decays = psa.summary == "linear_attention" ? num_key_value_heads : kv;
  const int64_t psa_extra = 4 * hidden_size + 4 + kv * psa.kernel_size + decays + 2 * q;
  return embed + int64_t(psa_layers.size()) * psa_extra + num_hidden_layers * layer + hidden_size +
         (tie_word_embeddings ? 0 : embed);
}

ModelConfig ModelConfig::llama3_2_1b() {
  ModelConfig c;
  c.model_type = "llama";
  c.architecture = "LlamaForCausalLM";
  c.vocab_size = 128256;
  c.hidden_size = 2048;
  c.intermediate_size = 8192;
  c.num_hidden_layers = 16;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 8;
  c.head_dim = 64;
  c.max_position_embeddings = 131072;
  c.rms_norm_eps = 1e-5;
  c.rope = RopeConfig{"llama3", 500000.0, 32.0, 1.0, 4.0, 8192};
  c.tie_word_embeddings = true;
  c.dtype = c10::ScalarType::BFloat16;
  c.bos_token_ids = {128000};
  c.eos_token_ids = {128001};
  return c;
}

std::string ModelConfig::to_json() const {
  json j = original_json.empty() ? json::object() : json::parse(original_json);
  const bool v5_rope = j.contains("rope_parameters");
  const bool v5_dtype = j.contains("dtype") && !j.contains("torch_dtype");
  j["model_type"] = model_type;
  if (!architecture.empty()) j["architectures"] = json::array({architecture});
  else if (!j.contains("architectures")) {
    static const std::map<std::string, std::string> arch = {{"llama", "LlamaForCausalLM"},
                                                            {"mistral", "MistralForCausalLM"},
                                                            {"qwen2", "Qwen2ForCausalLM"},
                                                            {"gemma", "GemmaForCausalLM"}};
    j["architectures"] = json::array({arch.at(model_type)});
  }
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["head_dim"] = head_dim;
  j[j.contains("hidden_activation") ? "hidden_activation" : "hidden_act"] = hidden_act;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rms_norm_eps"] = rms_norm_eps;
  json rp = json::object();
  rp["rope_type"] = rope.type;
  if (rope.type != "default") rp["factor"] = rope.factor;
  if (rope.type == "llama3") {
    rp["low_freq_factor"] = rope.low_freq_factor;
    rp["high_freq_factor"] = rope.high_freq_factor;
    rp["original_max_position_embeddings"] = rope.original_max_position_embeddings;
  }
  if (v5_rope) {
    rp["rope_theta"] = rope.theta;
    j["rope_parameters"] = rp;
  } else {
    j["rope_theta"] = rope.theta;
    j["rope_scaling"] = rope.type == "default" ? json(nullptr) : rp;
  }
  if (model_type != "qwen2") j["attention_bias"] = attention_bias;
  if (model_type == "llama") j["mlp_bias"] = mlp_bias;
  j["tie_word_embeddings"] = tie_word_embeddings;
  if (model_type == "mistral") j["sliding_window"] = sliding_window ? json(*sliding_window) : json(nullptr);
  j[v5_dtype ? "dtype" : "torch_dtype"] = dtype_string(dtype);
  auto ids = [](const std::vector<int64_t>& v) {
    if (v.empty()) return json(nullptr);
    if (v.size() == 1) return json(v[0]);
    return json(v);
  };
  j["bos_token_id"] = ids(bos_token_ids);
  j["eos_token_id"] = ids(eos_token_ids);
  j["pad_token_id"] = pad_token_id ? json(*pad_token_id) : json(nullptr);
  if (psa_layers.empty()) {
    j.erase("unswag_psa");
  } else {
    j["unswag_psa"] = {{"layers", psa_layers},
                       {"kernel_size", psa.kernel_size},
                       {"window", psa.window},
                       {"target_shares", psa.target_shares},
                       {"load_loss_weight", psa.load_loss_weight},
                       {"z_loss_weight", psa.z_loss_weight},
                       {"entropy_loss_weight", psa.entropy_loss_weight},
                       {"controller_gamma", psa.controller_gamma},
                       {"random_router", psa.random_router},
                       {"detach_router_input", psa.detach_router_input},
                       {"all_tokens_read_signal", psa.all_tokens_read_signal},
                       {"joint_softmax", psa.joint_softmax},
                       {"lambda_init", psa.lambda_init},
                       {"summary", psa.summary},
                       {"seed", psa.seed},
                       {"temperature", psa.temperature}};
  }
  return j.dump(2) + "\n";
}

}  // namespace unswag::models
