// `unswag inspect` (a checkpoint's config, parameter count and the estimated
// training memory at a context length) and `unswag generate` (continue a
// prompt, greedy or top-p sampling).
#include <fmt/core.h>

#include <sstream>

#include "cli/commands.h"
#include "unswag/data/tokenizer.h"
#include "unswag/model.h"

namespace unswag::cli {

void add_inspect_options(CLI::App& cmd, InspectOptions& o) {
  cmd.add_option("model", o.model, "a Hugging Face checkpoint directory (config.json)")->required();
  cmd.add_option("--context", o.context, "tokens per training step for the memory estimate")->check(CLI::PositiveNumber);
}

int run_inspect(const InspectOptions& o) {
  const ModelConfig c = ModelConfig::from_file(o.model + "/config.json");
  fmt::print("{}: {} ({})\n", o.model, c.model_type, c.architecture.empty() ? "-" : c.architecture);
  fmt::print("  layers {}, hidden {}, intermediate {}, heads {} ({} KV heads, head_dim {}), vocab {}\n",
             c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
             c.head_dim, c.vocab_size);
  fmt::print("  activation {}, RoPE {} (theta {:g}{}), tied embeddings {}, dtype {}{}\n", c.hidden_act, c.rope.type,
             c.rope.theta, c.rope.type == "default" ? "" : fmt::format(", factor {:g}", c.rope.factor),
             c.tie_word_embeddings ? "yes" : "no", c10::toString(c.dtype),
             c.sliding_window ? fmt::format(", sliding window {}", *c.sliding_window) : "");
  const int64_t params = c.num_parameters();
  fmt::print("  parameters {} ({:.3f} B)\n", params, params / 1e9);
  fmt::print("\nestimated training memory at {} tokens per step, bf16 weights, AdamW8bit (GiB; "
             "docs/models.md; bench/bench_model.py measures):\n", o.context);
  fmt::print("  {:<34} {:>8} {:>8} {:>9} {:>11} {:>8}\n", "for_training()", "weights", "grads", "optimizer",
             "activations", "total");
  auto row = [&](const char* name, TrainingOptions t, bool eight_bit = true) {
    const auto m = estimate_training_memory(c, o.context, t, torch::kBFloat16, eight_bit);
    const double g = double(1 << 30);
    fmt::print("  {:<34} {:8.2f} {:8.2f} {:9.2f} {:11.2f} {:8.2f}\n", name, m.parameters / g, m.gradients / g,
               m.optimizer / g, m.activations / g, m.total() / g);
  };
  TrainingOptions plain = TrainingOptions::plain();
  row("plain, eager attention, fp32 AdamW", plain, false);
  row("lean, no recompute", TrainingOptions{});
  TrainingOptions selective;
  selective.recompute = "selective";
  row("lean, selective recompute", selective);
  TrainingOptions full;
  full.recompute = "full";
  row("lean, full recompute", full);
  return 0;
}

void add_generate_options(CLI::App& cmd, GenerateCliOptions& o) {
  cmd.add_option("--model", o.model, "a Hugging Face checkpoint directory")->required();
  cmd.add_option("--tokenizer", o.tokenizer, "tokenizer.json or its directory (default: the model directory)");
  auto* prompt = cmd.add_option("--prompt", o.prompt, "text to continue");
  auto* ids = cmd.add_option("--prompt-ids", o.prompt_ids, "token ids to continue (no tokenizer needed)");
  prompt->excludes(ids);
  cmd.add_option("--max-new-tokens", o.max_new_tokens, "tokens to generate at most")->check(CLI::NonNegativeNumber);
  cmd.add_option("--temperature", o.temperature, "0: greedy; else sampling temperature")->check(CLI::NonNegativeNumber);
  cmd.add_option("--top-p", o.top_p, "nucleus sampling mass in (0, 1]")->check(CLI::Range(1e-9, 1.0));
  cmd.add_option("--seed", o.seed, "sampling seed");
  cmd.add_option("--device", o.device, "cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}));
}

int run_generate(const GenerateCliOptions& o) {
  if (o.prompt.empty() && o.prompt_ids.empty()) {
    fmt::print(stderr, "unswag generate: give --prompt TEXT or --prompt-ids ID...\n");
    return 2;
  }
  const torch::Device device = o.device == "cuda" ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  Model model = Model::from_pretrained(o.model, {device, std::nullopt});
  std::optional<data::Tokenizer> tok;
  if (!o.prompt.empty()) tok = data::Tokenizer::from_file(o.tokenizer.empty() ? o.model : o.tokenizer);
  std::vector<int64_t> prompt = o.prompt_ids;
  if (tok) {
    for (int32_t id : tok->encode(o.prompt)) prompt.push_back(id);
  }
  GenerateOptions g;
  g.max_new_tokens = o.max_new_tokens;
  g.temperature = o.temperature;
  g.top_p = o.top_p;
  g.seed = o.seed;
  const std::vector<int64_t> out = generate(model, prompt, g);
  if (tok) {
    fmt::print("{}{}\n", o.prompt, tok->decode(std::vector<int32_t>(out.begin(), out.end()), true));
  } else {
    std::ostringstream s;
    for (size_t i = 0; i < out.size(); ++i) s << (i ? " " : "") << out[i];
    fmt::print("{}\n", s.str());
  }
  return 0;
}

}  // namespace unswag::cli
