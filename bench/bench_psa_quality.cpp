// The quality side of Packet-Switched Attention: a small Llama-shaped LM
// trained from scratch on real text, for the same tokens, three ways (dense
// attention; PSA in every layer; PSA whose router is replaced by a random one
// with the same route shares, the ablation showing the router learns), each
// with several seeds. Reports the validation loss at equal tokens with hard
// routing (eval mode), its curve, the measured route shares per layer and the
// train/eval routing agreement. bench/bench_psa.py runs it on the GPU.
//
// Data: token shards of scripts/make-psa-corpus.sh (<data>/train*, <data>/val*).
// Writes <out>/quality.json, <out>/quality.md and <out>/quality.svg.
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "unswag/data/loader.h"
#include "unswag/model.h"
#include "unswag/optim/adamw.h"

namespace {

using nlohmann::json;

struct Args {
  std::string data = ".gpu-data/gcide", out = "out/psa_quality", device = "auto";
  int64_t layers = 6, hidden = 512, heads = 8, ff = 1408, context = 1024, batch = 16;
  int64_t tokens = 8'000'000, eval_tokens = 1'000'000, evals = 8;
  int64_t window = unswag::nn::PSAConfig().window;
  double entropy_loss_weight = unswag::nn::PSAConfig().entropy_loss_weight;
  double lr = 1.5e-3, tau_start = 1.0, tau_end = 0.3;
  std::vector<std::string> variants = {"dense", "psa", "random"};
  std::vector<uint64_t> seeds = {0, 1};
  std::vector<double> shares;       // prune, local, summary, signal (empty: PSAConfig's)
  std::vector<int64_t> psa_layers;  // empty: every layer
  bool detach_router_input = unswag::nn::PSAConfig().detach_router_input;
  bool all_tokens_read_signal = false;
  bool joint_softmax = false;
  double lambda_init = unswag::nn::PSAConfig().lambda_init;
  std::string summary = unswag::nn::PSAConfig().summary;
  double load_loss_weight = unswag::nn::PSAConfig().load_loss_weight;
  bool quick = false;
};

struct Run {
  std::string variant;
  uint64_t seed = 0;
  std::vector<std::pair<int64_t, double>> val_curve;    // (tokens, loss)
  std::vector<std::pair<int64_t, double>> train_curve;  // (tokens, loss without aux)
  json routes = json::array();                          // per PSA layer: eval fractions, train agreement
  double seconds = 0;
  double final_val() const { return val_curve.empty() ? NAN : val_curve.back().second; }
};

unswag::ModelConfig model_config(const Args& a, const std::string& variant, uint64_t seed) {
  unswag::ModelConfig c;
  c.model_type = "llama";
  c.architecture = "LlamaForCausalLM";
  c.vocab_size = 2048;  // the 2000-token BPE of tests/fixtures/tokenizers/gpt2, rounded up
  c.hidden_size = a.hidden;
  c.intermediate_size = a.ff;
  c.num_hidden_layers = a.layers;
  c.num_attention_heads = a.heads;
  c.num_key_value_heads = a.heads;
  c.head_dim = a.hidden / a.heads;
  c.max_position_embeddings = a.context;
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = true;
  c.dtype = torch::kFloat;
  c.eos_token_ids = {0};
  if (variant != "dense") {
    if (a.psa_layers.empty()) {
      for (int64_t l = 0; l < a.layers; ++l) c.psa_layers.push_back(l);
    } else {
      c.psa_layers = a.psa_layers;
    }
    if (!a.shares.empty()) std::copy(a.shares.begin(), a.shares.end(), c.psa.target_shares.begin());
    c.psa.random_router = variant == "random";
    c.psa.seed = seed;
    c.psa.temperature = a.tau_start;
    c.psa.window = a.window;
    c.psa.entropy_loss_weight = a.entropy_loss_weight;
    c.psa.load_loss_weight = a.load_loss_weight;
    c.psa.detach_router_input = a.detach_router_input;
    c.psa.all_tokens_read_signal = a.all_tokens_read_signal;
    c.psa.joint_softmax = a.joint_softmax;
    c.psa.lambda_init = a.lambda_init;
    c.psa.summary = a.summary;
  }
  c.validate("bench_psa_quality");
  return c;
}

unswag::data::LoaderOptions loader_options(const Args& a, const std::string& split, uint64_t seed,
                                           const torch::Device& device) {
  unswag::data::LoaderOptions o;
  o.inputs = {a.data + "/" + split + "_*.bin"};
  o.context_length = a.context;
  o.batch_size = a.batch;
  o.seed = seed;
  o.shuffle = split == "train";
  o.device = device;
  return o;
}

// Mean loss over the first eval_tokens of the validation split, eval mode
// (hard routing; no aux losses), weighted by tokens.
double evaluate(unswag::Model& model, const Args& a, const torch::Device& device) {
  torch::NoGradGuard no_grad;
  model.eval();
  unswag::data::StreamingContextDataLoader val(loader_options(a, "val", 0, device));
  const int64_t per_batch = a.batch * a.context;
  const int64_t batches = std::max<int64_t>(1, std::min(a.eval_tokens / per_batch, val.steps_per_epoch()));
  double sum = 0;
  for (int64_t i = 0; i < batches; ++i) {
    auto b = val.next();
    sum += model.loss(b.input_ids, b.targets).item<double>();
  }
  model.train();
  return sum / double(batches);
}

Run train_one(const Args& a, const std::string& variant, uint64_t seed, const torch::Device& device) {
  Run run;
  run.variant = variant;
  run.seed = seed;
  torch::manual_seed(seed);
  auto model = unswag::Model::from_config(model_config(a, variant, seed), {device, torch::kFloat}, seed);
  model.for_training({});
  model.train();
  unswag::optim::AdamW opt(model.named_parameters(), unswag::optim::AdamWOptions(a.lr).weight_decay(0.1).beta2(0.95));
  unswag::data::StreamingContextDataLoader loader(loader_options(a, "train", seed, device));
  const int64_t per_step = a.batch * a.context;
  const int64_t steps = std::max<int64_t>(1, a.tokens / per_step);
  const int64_t warmup = std::max<int64_t>(1, steps / 20);
  const int64_t eval_every = std::max<int64_t>(1, steps / a.evals);
  const auto t0 = std::chrono::steady_clock::now();
  double train_acc = 0;
  int64_t train_n = 0;
  for (int64_t step = 0; step < steps; ++step) {
    // Warmup then cosine to 10%; the Gumbel temperature anneals linearly.
    const double progress = double(step) / double(steps);
    const double lr = step < warmup ? a.lr * double(step + 1) / double(warmup)
                                    : a.lr * (0.1 + 0.45 * (1 + std::cos(M_PI * double(step - warmup) /
                                                                           double(std::max<int64_t>(1, steps - warmup)))));
    opt.set_lr(lr);
    model.set_psa_temperature(a.tau_start + (a.tau_end - a.tau_start) * progress);
    auto b = loader.next();
    auto loss = model.loss(b.input_ids, b.targets);  // includes the PSA aux losses in training mode
    loss.backward();
    torch::nn::utils::clip_grad_norm_(model.parameters(), 1.0);
    opt.step();
    opt.zero_grad();
    model.update_psa_controller();
    train_acc += (loss - model.psa_aux_loss().to(loss.device())).item<double>();
    ++train_n;
    if ((step + 1) % eval_every == 0 || step + 1 == steps) {
      const int64_t seen = (step + 1) * per_step;
      run.train_curve.emplace_back(seen, train_acc / double(train_n));
      train_acc = 0;
      train_n = 0;
      if (step + 1 == steps) {
        // Train-mode routing of the last step (agreement with eval's arg-max).
        for (const auto& [layer, st] : model.psa_route_stats())
          run.routes.push_back({{"layer", layer}, {"train_fractions", st.fractions}, {"agreement", st.agreement}});
      }
      run.val_curve.emplace_back(seen, evaluate(model, a, device));
      std::fprintf(stderr, "[%s seed %lu] step %ld/%ld tokens %ld train %.4f val %.4f (%.0f s)\n", variant.c_str(),
                   (unsigned long)seed, long(step + 1), long(steps), long(seen), run.train_curve.back().second,
                   run.val_curve.back().second,
                   std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  // Eval-mode route shares per layer (hard routing on validation text).
  {
    torch::NoGradGuard no_grad;
    model.eval();
    unswag::data::StreamingContextDataLoader val(loader_options(a, "val", 0, device));
    auto b = val.next();
    model.forward(b.input_ids);
    size_t i = 0;
    for (const auto& [layer, st] : model.psa_route_stats()) {
      if (i < run.routes.size()) run.routes[i]["eval_fractions"] = st.fractions;
      ++i;
    }
  }
  if (device.is_cuda()) torch::cuda::synchronize();
  run.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return run;
}

// A line chart of the validation curves (one colour per variant, one dash per seed).
std::string svg_chart(const std::vector<Run>& runs) {
  double x_max = 1, y_min = 1e9, y_max = -1e9;
  for (const auto& r : runs)
    for (const auto& [x, y] : r.val_curve) {
      x_max = std::max(x_max, double(x));
      y_min = std::min(y_min, y);
      y_max = std::max(y_max, y);
    }
  if (y_max <= y_min) y_max = y_min + 1;
  const double W = 720, H = 440, L = 70, R = 170, T = 30, B = 50;
  auto px = [&](double x) { return L + (W - L - R) * x / x_max; };
  auto py = [&](double y) { return T + (H - T - B) * (y_max - y) / (y_max - y_min); };
  const std::map<std::string, std::string> colour = {{"dense", "#1f77b4"}, {"psa", "#d62728"}, {"random", "#7f7f7f"}};
  std::ostringstream s;
  s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  s << "<text x=\"" << L << "\" y=\"18\">validation loss (nats/token, hard routing) vs training tokens</text>\n";
  for (int i = 0; i <= 5; ++i) {
    const double y = y_min + (y_max - y_min) * i / 5.0, x = x_max * i / 5.0;
    s << "<line x1=\"" << L << "\" x2=\"" << W - R << "\" y1=\"" << py(y) << "\" y2=\"" << py(y)
      << "\" stroke=\"#ddd\"/><text x=\"" << L - 8 << "\" y=\"" << py(y) + 4 << "\" text-anchor=\"end\">"
      << std::round(y * 1000) / 1000 << "</text>\n";
    s << "<text x=\"" << px(x) << "\" y=\"" << H - B + 18 << "\" text-anchor=\"middle\">" << std::round(x / 1e5) / 10
      << "M</text>\n";
  }
  int k = 0;
  for (const auto& r : runs) {
    const std::string c = colour.count(r.variant) ? colour.at(r.variant) : "#000";
    s << "<polyline fill=\"none\" stroke=\"" << c << "\" stroke-width=\"2\""
      << (r.seed % 2 ? " stroke-dasharray=\"6 3\"" : "") << " points=\"";
    for (const auto& [x, y] : r.val_curve) s << px(double(x)) << "," << py(y) << " ";
    s << "\"/>\n<text x=\"" << W - R + 10 << "\" y=\"" << T + 16 * (k + 1) << "\" fill=\"" << c << "\">"
      << r.variant << " seed " << r.seed << ": " << std::round(r.final_val() * 1000) / 1000 << "</text>\n";
    ++k;
  }
  s << "</svg>\n";
  return s.str();
}

std::string fmt(double x, int digits = 4) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", digits, x);
  return buf;
}

// Everything after the argument parsing: the runs, their JSON, table and plot.
int run(Args a) {
  if (a.quick) {
    a.tokens = std::min<int64_t>(a.tokens, 2 * a.batch * a.context * 8);
    a.eval_tokens = a.batch * a.context;
    a.evals = 2;
  }
  const bool cuda = a.device == "cuda" || (a.device == "auto" && torch::cuda::is_available());
  const torch::Device device = cuda ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  if (cuda) at::globalContext().setAllowTF32CuBLAS(true);  // fp32 parameters, TF32 matmuls
  std::vector<Run> runs;
  for (const auto& v : a.variants)
    for (const uint64_t seed : a.seeds) runs.push_back(train_one(a, v, seed, device));

  json out = json::object();
  out["config"] = {{"layers", a.layers}, {"hidden", a.hidden}, {"heads", a.heads}, {"ff", a.ff},
                   {"context", a.context}, {"batch", a.batch}, {"tokens", a.tokens}, {"lr", a.lr},
                   {"eval_tokens", a.eval_tokens}, {"data", a.data},
                   {"window", a.window}, {"entropy_loss_weight", a.entropy_loss_weight},
                   {"load_loss_weight", a.load_loss_weight}, {"detach_router_input", a.detach_router_input},
                   {"all_tokens_read_signal", a.all_tokens_read_signal}, {"joint_softmax", a.joint_softmax}, {"lambda_init", a.lambda_init}, {"summary", a.summary},
                   {"shares", model_config(a, "psa", 0).psa.target_shares}, {"psa_layers", a.psa_layers}};
  out["runs"] = json::array();
  for (const auto& r : runs)
    out["runs"].push_back({{"variant", r.variant}, {"seed", r.seed}, {"val_curve", r.val_curve},
                           {"train_curve", r.train_curve}, {"final_val_loss", r.final_val()},
                           {"routes", r.routes}, {"seconds", r.seconds}});

  // The table: per variant, the final validation loss of each seed, the mean
  // and the gap to dense's mean; the seed spread is max - min within a variant.
  std::map<std::string, std::vector<double>> finals;
  for (const auto& r : runs) finals[r.variant].push_back(r.final_val());
  auto mean = [](const std::vector<double>& v) {
    double s = 0;
    for (double x : v) s += x;
    return v.empty() ? NAN : s / double(v.size());
  };
  const double dense_mean = finals.count("dense") ? mean(finals["dense"]) : NAN;
  std::string psa_layers_text = "every layer", shares_text;
  if (!a.psa_layers.empty()) {
    psa_layers_text = "layers";
    for (size_t i = 0; i < a.psa_layers.size(); ++i)
      psa_layers_text += (i ? ", " : " ") + std::to_string(a.psa_layers[i]);
    psa_layers_text += " (the others dense)";
  }
  {
    const auto cfg_shares = model_config(a, "psa", 0).psa.target_shares;
    for (size_t i = 0; i < cfg_shares.size(); ++i) shares_text += (i ? "/" : "") + fmt(100 * cfg_shares[i], 2);
  }
  std::ostringstream md;
  md << "A Llama-shaped LM (" << a.layers << " layers, hidden " << a.hidden << ", " << a.heads << " heads, MLP "
     << a.ff << ", tied embeddings, the 2000-token byte-level BPE of tests/fixtures/tokenizers/gpt2) trained from scratch on the GCIDE dictionary text "
     << "(scripts/make-psa-corpus.sh), " << a.tokens / 1000000.0 << "M tokens per run (batch " << a.batch
     << " x " << a.context << "), AdamW (fp32 state, lr " << a.lr << " warmup + cosine), fp32 weights with TF32. "
     << "PSA: " << psa_layers_text << ", targets prune/local/summary/signal " << shares_text
     << "%, attention window " << a.window
     << ", Gumbel temperature " << a.tau_start << " -> " << a.tau_end << ", router entropy weight "
     << a.entropy_loss_weight << ", load loss weight " << a.load_loss_weight
     << (a.detach_router_input ? ", router input detached" : "")
     << (a.all_tokens_read_signal ? ", every token reads the signal tokens" : "")
     << (a.joint_softmax ? ", one softmax over the window and the signal tokens" : "")
     << ", read gates (lambdas) initialised to " << a.lambda_init << ", summary register "
     << a.summary << ". "
     << "Random: the same layer with each token's route drawn from those shares by a hash (no router). "
     << "Validation: " << a.eval_tokens / 1000000.0 << "M held-out tokens, eval mode (hard routing).\n\n";
  md << "| variant | " ;
  for (const uint64_t seed : a.seeds) md << "seed " << seed << " | ";
  md << "mean | seed spread | vs dense |\n|---|";
  for (size_t i = 0; i < a.seeds.size(); ++i) md << "---:|";
  md << "---:|---:|---:|\n";
  for (const auto& v : a.variants) {
    const auto& f = finals[v];
    md << "| " << v << " | ";
    for (double x : f) md << fmt(x) << " | ";
    const double spread = f.empty() ? NAN : *std::max_element(f.begin(), f.end()) - *std::min_element(f.begin(), f.end());
    md << fmt(mean(f)) << " | " << fmt(spread) << " | " << (v == "dense" ? "-" : fmt(mean(f) - dense_mean)) << " |\n";
  }
  md << "\nRoute shares per layer (prune/local/summary/signal %, eval mode on validation text) and train/eval "
        "routing agreement (share of tokens whose noisy training choice equals the eval arg-max), seed "
     << a.seeds.front() << ":\n\n| variant | layer | eval shares | train shares | agreement |\n|---|---:|---|---|---:|\n";
  auto pct = [](const json& f) {
    if (!f.is_array()) return std::string("-");
    std::string s;
    for (size_t i = 0; i < f.size(); ++i) s += (i ? "/" : "") + fmt(100 * f[i].get<double>(), 1);
    return s;
  };
  for (const auto& r : runs) {
    if (r.seed != a.seeds.front()) continue;
    for (const auto& l : r.routes)
      md << "| " << r.variant << " | " << l["layer"].get<int64_t>() << " | "
         << pct(l.value("eval_fractions", json())) << " | " << pct(l["train_fractions"]) << " | "
         << fmt(l["agreement"].get<double>(), 3) << " |\n";
  }
  md << "\n![validation loss](psa_quality.svg)\n\nRun times: ";
  for (const auto& r : runs) md << r.variant << "/" << r.seed << " " << fmt(r.seconds, 0) << " s; ";
  md << "\n";
  std::filesystem::create_directories(a.out);
  std::ofstream(a.out + "/quality.json") << out.dump(2) << "\n";
  std::ofstream(a.out + "/quality.md") << md.str();
  std::ofstream(a.out + "/quality.svg") << svg_chart(runs);
  std::printf("%s", md.str().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  CLI::App app{"UnSwag: PSA quality (dense vs PSA vs random router, small LM from scratch)"};
  app.add_option("--data", a.data, "directory of train_*.bin / val_*.bin shards");
  app.add_option("--out", a.out, "output directory");
  app.add_option("--device", a.device, "auto | cuda | cpu");
  app.add_option("--layers", a.layers);
  app.add_option("--hidden", a.hidden);
  app.add_option("--heads", a.heads);
  app.add_option("--ff", a.ff);
  app.add_option("--context", a.context);
  app.add_option("--batch", a.batch);
  app.add_option("--tokens", a.tokens, "training tokens per run");
  app.add_option("--eval-tokens", a.eval_tokens, "validation tokens per evaluation");
  app.add_option("--evals", a.evals, "evaluations per run");
  app.add_option("--lr", a.lr);
  app.add_option("--window", a.window, "PSA's attention window (0: none)");
  app.add_option("--entropy-loss-weight", a.entropy_loss_weight, "the router's per-token entropy penalty");
  app.add_option("--variants", a.variants)->delimiter(',');
  app.add_option("--shares", a.shares, "PSA's target route shares prune,local,summary,signal")
      ->delimiter(',')
      ->expected(4);
  app.add_option("--load-loss-weight", a.load_loss_weight, "the router's load-balancing loss weight");
  app.add_flag("--detach-router-input,!--no-detach-router-input", a.detach_router_input,
               "the router reads sg(x): its gradients do not reach the hidden state");
  app.add_flag("--all-tokens-read-signal", a.all_tokens_read_signal,
               "every token reads the earlier signal tokens (experimental, O(T^2) in training)");
  app.add_option("--lambda-init", a.lambda_init, "PSA's initial conv and register read gates (lambdas)");
  app.add_flag("--joint-softmax", a.joint_softmax,
               "one softmax over the window and the signal tokens (experimental, O(T^2) in training)");
  app.add_option("--summary", a.summary, "PSA's summary register: ema | linear_attention")
      ->check(CLI::IsMember({"ema", "linear_attention"}));
  app.add_option("--psa-layers", a.psa_layers, "the layers that use PSA (default: all)")->delimiter(',');
  app.add_option("--seeds", a.seeds)->delimiter(',');
  app.add_flag("--quick", a.quick, "a short run (a smoke test, not a result)");
  CLI11_PARSE(app, argc, argv);
  try {
    return run(a);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "bench_psa_quality: %s\n", e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_psa_quality: %s\n", e.what());
  }
  return 1;
}
