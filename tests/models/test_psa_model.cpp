// Packet-Switched Attention inside unswag::Model: the "unswag_psa" config
// section (round trip, errors), a from-scratch PSA model that trains and
// saves / loads to identical logits, for_training() turning a pretrained
// fixture's attention into PSA (with the routes forced to "signal" and the
// local/summary reads off it is the dense model again: q/k/v/o and RoPE are
// kept), and cached generation (KV cache for dense layers, PSA cache for PSA
// layers) against uncached greedy decoding.
#include <gtest/gtest.h>
#include <torch/optim/adamw.h>

#include <nlohmann/json.hpp>

#include "test_util.h"
#include "unswag/model.h"

namespace {

using torch::Tensor;
using unswag::Model;
using unswag::ModelConfig;
using unswag::test::expect_error;
using unswag::test::rel_l2;

std::string fixture(const std::string& family) {
  return unswag::test::source_dir() + "/tests/fixtures/models/" + family;
}

ModelConfig tiny_psa_config() {
  ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 61;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.rms_norm_eps = 1e-5;
  c.psa_layers = {1};
  c.psa.kernel_size = 4;
  c.psa.window = 5;
  c.psa.controller_gamma = 0.05;
  c.validate();
  return c;
}

// Named tensor of the model's module (parameters and buffers).
Tensor tensor_named(Model& m, const std::string& name) {
  for (const auto& kv : m.module().named_parameters())
    if (kv.key() == name) return kv.value();
  for (const auto& kv : m.module().named_buffers())
    if (kv.key() == name) return kv.value();
  throw std::runtime_error("no tensor " + name);
}

TEST(PSAModelConfig, JsonRoundTripAndErrors) {
  ModelConfig c = tiny_psa_config();
  c.psa.target_shares = {0.1, 0.4, 0.3, 0.2};
  c.psa.random_router = true;
  c.psa.seed = 77;
  c.psa.entropy_loss_weight = 0.125;
  c.psa.detach_router_input = !unswag::nn::PSAConfig().detach_router_input;
  c.psa.all_tokens_read_signal = true;
  c.psa.joint_softmax = true;
  c.psa.lambda_init = 0.25;
  const ModelConfig back = ModelConfig::from_json(c.to_json());
  EXPECT_EQ(back.psa_layers, c.psa_layers);
  EXPECT_EQ(back.psa.kernel_size, 4);
  EXPECT_EQ(back.psa.window, 5);
  EXPECT_EQ(back.psa.target_shares, c.psa.target_shares);
  EXPECT_TRUE(back.psa.random_router);
  EXPECT_EQ(back.psa.seed, 77u);
  EXPECT_DOUBLE_EQ(back.psa.controller_gamma, 0.05);
  EXPECT_DOUBLE_EQ(back.psa.entropy_loss_weight, 0.125);
  EXPECT_EQ(back.psa.detach_router_input, c.psa.detach_router_input);
  EXPECT_TRUE(back.psa.all_tokens_read_signal);
  EXPECT_TRUE(back.psa.joint_softmax);
  EXPECT_DOUBLE_EQ(back.psa.lambda_init, 0.25);
  EXPECT_EQ(back.psa.summary, "ema");
  EXPECT_EQ(back.num_parameters(), c.num_parameters());
  EXPECT_EQ(Model::from_config(c).num_parameters(), c.num_parameters());
  {
    ModelConfig la = c;
    la.psa.summary = "linear_attention";
    const ModelConfig la_back = ModelConfig::from_json(la.to_json());
    EXPECT_EQ(la_back.psa.summary, "linear_attention");
    EXPECT_EQ(Model::from_config(la_back).num_parameters(), la.num_parameters());
    EXPECT_LT(la.num_parameters(), c.num_parameters());  // one decay per kv head, not per channel
  }
  // A dense config writes no PSA section.
  ModelConfig dense = c;
  dense.psa_layers.clear();
  EXPECT_EQ(nlohmann::json::parse(dense.to_json()).count("unswag_psa"), 0u);
  auto with = [&](const std::string& psa) {
    auto j = nlohmann::json::parse(c.to_json());
    j["unswag_psa"] = nlohmann::json::parse(psa);
    return j.dump();
  };
  expect_error([&] { ModelConfig::from_json(with(R"({"layers": [5]})")); }, {"unswag_psa.layers holds 5"});
  expect_error([&] { ModelConfig::from_json(with(R"({"layers": 1})")); }, {"layers must be a list"});
  expect_error([&] { ModelConfig::from_json(with(R"({"layers": [0], "target_shares": [1, 1, 0, 0]})")); },
               {"sum to 1"});
  expect_error([&] { ModelConfig::from_json(with(R"({"layers": [0], "target_shares": [1]})")); },
               {"target_shares must be 4 numbers"});
  expect_error([&] { ModelConfig::from_json(with(R"({"layers": [0], "window": -1})")); }, {"window must be >= 0"});
  // A section without "window" (written before it existed) means no window.
  EXPECT_EQ(ModelConfig::from_json(with(R"({"layers": [0]})")).psa.window, 0);
  // Nor an entropy term.
  EXPECT_EQ(ModelConfig::from_json(with(R"({"layers": [0]})")).psa.entropy_loss_weight, 0.0);
  // Nor a detached router input (their routers were trained with the gradient reaching x).
  EXPECT_FALSE(ModelConfig::from_json(with(R"({"layers": [0]})")).psa.detach_router_input);
  EXPECT_FALSE(ModelConfig::from_json(with(R"({"layers": [0]})")).psa.all_tokens_read_signal);
  EXPECT_FALSE(ModelConfig::from_json(with(R"({"layers": [0]})")).psa.joint_softmax);
  // Sections written before lambda_init: read gates initialised to 1.
  EXPECT_EQ(ModelConfig::from_json(with(R"({"layers": [0]})")).psa.lambda_init, 1.0);
  expect_error([&] { ModelConfig::from_json(with(R"({"layers": [0], "lambda_init": "one"})")); },
               {"lambda_init"});
  expect_error([&] { ModelConfig::from_json(with(R"({"layers": [0], "joint_softmax": true})")); },
               {"joint_softmax", "needs window > 0, got window 0"});
  expect_error([&] { ModelConfig::from_json(with(R"({"layers": [0], "entropy_loss_weight": -1})")); },
               {"entropy_loss_weight must be >= 0"});
  // A section without "summary" (written before the option) has the EMA register.
  EXPECT_EQ(ModelConfig::from_json(with(R"({"layers": [0]})")).psa.summary, "ema");
  expect_error([&] { ModelConfig::from_json(with(R"({"layers": [0], "summary": "gru"})")); },
               {"summary must be \"ema\" or \"linear_attention\", got \"gru\""});
  expect_error([&] { ModelConfig::from_json(with(R"({"layers": [0], "summary": 3})")); },
               {"summary must be \"ema\" or \"linear_attention\", got 3"});
}

TEST(PSAModel, FromScratchTrainsAndSavesLoads) {
  const uint64_t seed = unswag::test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  torch::manual_seed(seed);
  Model m = Model::from_config(tiny_psa_config(), {}, seed);
  m.for_training();
  // A periodic sequence: learnable, so the loss must fall.
  const Tensor ids = (torch::arange(40).remainder(7) * 3 + torch::randint(0, 2, {2, 40})).remainder(61);
  Tensor targets = torch::full_like(ids, -100);
  targets.narrow(1, 0, 39).copy_(ids.narrow(1, 1, 39));
  torch::optim::AdamW opt(m.parameters(), torch::optim::AdamWOptions(1e-2));
  double first = 0, last = 0;
  for (int step = 0; step < 25; ++step) {
    m.set_psa_temperature(1.0 - 0.7 * step / 24.0);
    opt.zero_grad();
    const Tensor loss = m.loss(ids, targets);
    loss.backward();
    opt.step();
    m.update_psa_controller();
    if (step == 0) first = loss.item<double>();
    last = loss.item<double>();
    EXPECT_GT(m.psa_aux_loss().item<double>(), 0);
  }
  EXPECT_LT(last, 0.7 * first) << "loss " << first << " -> " << last;
  const auto stats = m.psa_route_stats();
  ASSERT_EQ(stats.size(), 1u);
  EXPECT_EQ(stats[0].first, 1);
  EXPECT_EQ(stats[0].second.tokens, 80);
  EXPECT_GT(tensor_named(m, "model.layers.1.self_attn.router.weight").grad().norm().item<double>(), 0);
  EXPECT_GT(tensor_named(m, "model.layers.1.self_attn.route_bias").abs().sum().item<double>(), 0);

  unswag::test::TempDir dir("psa_model");
  m.save_pretrained(dir.path());
  Model back = Model::from_pretrained(dir.path());
  EXPECT_EQ(back.config().psa_layers, std::vector<int64_t>{1});
  back.for_training();  // the same code paths, so the logits agree bitwise
  m.eval();
  back.eval();
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::equal(m.forward(ids), back.forward(ids)));
  EXPECT_EQ(back.psa_aux_loss().item<double>(), 0.0);  // eval: no aux loss
}

TEST(PSAModel, ForTrainingKeepsWeightsAndRope) {
  Model dense = Model::from_pretrained(fixture("llama"));
  Model psa = Model::from_pretrained(fixture("llama"));
  unswag::TrainingOptions o = unswag::TrainingOptions::plain();
  o.psa_layers = unswag::TrainingOptions::all_layers();
  o.psa.window = 0;  // the window read off too (below: every token signal, local and summary reads off)
  psa.for_training(o);
  EXPECT_EQ(psa.config().psa_layers, (std::vector<int64_t>{0, 1}));
  dense.eval();
  psa.eval();
  const Tensor ids = torch::randint(0, 256, {2, 13});
  torch::NoGradGuard no_grad;
  const Tensor want = dense.forward(ids);
  // Every token routed to "signal" and the window read off: dense attention
  // again, since the local and summary read gates start at lambda_init = 0.
  ASSERT_EQ(o.psa.lambda_init, 0.0);
  for (int64_t l : {0, 1}) {
    const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
    tensor_named(psa, p + "route_bias").copy_(torch::tensor({-1e4, -1e4, -1e4, 1e4}));
    EXPECT_EQ(tensor_named(psa, p + "lambda_local").abs().max().item<double>(), 0.0);
    EXPECT_EQ(tensor_named(psa, p + "lambda_summary").abs().max().item<double>(), 0.0);
    EXPECT_TRUE(torch::equal(tensor_named(psa, p + "q_proj.weight"), tensor_named(dense, p + "q_proj.weight")));
  }
  EXPECT_LT(rel_l2(psa.forward(ids), want), 1e-5);
  // Positions still matter (RoPE is relative: spread them, a shift would not do).
  const Tensor spread = torch::arange(13).mul(3).unsqueeze(0).expand({2, 13});
  EXPECT_GT(rel_l2(psa.forward(ids, spread), want), 1e-3);
  EXPECT_LT(rel_l2(psa.forward(ids, spread), dense.forward(ids, spread)), 1e-5);
  for (const auto& [layer, st] : psa.psa_route_stats()) EXPECT_DOUBLE_EQ(st.fractions[3], 1.0) << layer;
  // Bad options.
  unswag::TrainingOptions bad = o;
  bad.psa_layers = {7};
  expect_error([&] { dense.for_training(bad); }, {"psa_layers holds 7"});
}

// Greedy tokens with and without the cache, and the cache it filled.
std::pair<std::vector<int64_t>, unswag::InferenceCache> greedy_both(Model& m, int64_t n, bool* equal) {
  unswag::GenerateOptions o;
  o.max_new_tokens = n;
  o.stop_ids = std::vector<int64_t>{};
  unswag::InferenceCache cache;
  const std::vector<int64_t> prompt = {5, 17, 33, 2, 40, 9};
  const auto cached = unswag::generate(m, prompt, o, &cache);
  o.use_cache = false;
  const auto plain = unswag::generate(m, prompt, o);
  *equal = cached == plain;
  return {cached, cache};
}

TEST(PSAModel, CachedGreedyEqualsUncached) {
  for (const char* family : {"llama", "mistral", "qwen2", "gemma"}) {
    Model m = Model::from_pretrained(fixture(family));
    bool equal = false;
    auto [tokens, cache] = greedy_both(m, 12, &equal);
    EXPECT_TRUE(equal) << family;
    // Dense KV: keys and values of every token (18 positions; the last token is never run).
    const auto& c = m.config();
    EXPECT_EQ(cache.tokens, 17);
    EXPECT_EQ(cache.psa_bytes(), 0);
    EXPECT_GE(cache.kv_bytes(), c.num_hidden_layers * 2 * 17 * c.num_key_value_heads * c.head_dim * 4) << family;
  }
  // A PSA model whose router spreads tokens over all routes.
  const uint64_t seed = unswag::test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  ModelConfig c = tiny_psa_config();
  c.psa_layers = {0, 1};
  Model m = Model::from_config(c, {}, seed);
  for (const auto& [name, p] : m.named_parameters())
    if (name.find("router.weight") != std::string::npos) p.detach().normal_(0.0, 1.0);
  bool equal = false;
  auto [tokens, cache] = greedy_both(m, 20, &equal);
  EXPECT_TRUE(equal);
  EXPECT_EQ(cache.kv_bytes(), 0);
  int64_t signal = 0;
  for (const auto& p : cache.psa) signal += p.signal.length;
  EXPECT_LT(signal, 2 * 25) << "fewer signal entries than tokens";
  EXPECT_GT(cache.psa_bytes(), 0);
  // Errors: batch > 1, training mode.
  unswag::InferenceCache fresh;
  m.eval();
  expect_error([&] { m.forward_cached(torch::zeros({2, 3}, torch::kLong), fresh); }, {"[1, tokens]"});
  m.train();
  expect_error([&] { m.forward_cached(torch::zeros({1, 3}, torch::kLong), fresh); }, {"eval()"});
}

// The same on the GPU, where every generated token after the prompt takes the
// fused decode step in both PSA layers.
TEST(PSAModel, CudaFusedDecodeGreedyEqualsUncached) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device here";
  const uint64_t seed = unswag::test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  ModelConfig c = tiny_psa_config();
  c.psa_layers = {0, 1};
  Model m = Model::from_config(c, {torch::Device(torch::kCUDA, 0), torch::kFloat}, seed);
  for (const auto& [name, p] : m.named_parameters())
    if (name.find("router.weight") != std::string::npos) p.detach().normal_(0.0, 1.0);
  bool equal = false;
  auto [tokens, cache] = greedy_both(m, 20, &equal);
  EXPECT_TRUE(equal);
  int64_t signal = 0;
  for (const auto& p : cache.psa) {
    EXPECT_TRUE(p.fused.active) << "the decode steps took the fused path";
    signal += p.signal_tokens();
  }
  EXPECT_GT(signal, 0);
  EXPECT_LT(signal, 2 * 25) << "fewer signal entries than tokens";
}

}  // namespace
