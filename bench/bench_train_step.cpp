// One training step (forward, backward, optimizer) of a UnSwag model at one
// context length: median step time with CUDA events after warm-up, peak GPU
// memory from the caching allocator, printed as one JSON line (or
// {"oom": true}). bench/bench_model.py runs it per context beside the
// transformers baseline. The timing itself is unswag::train::bench_train_steps
// (src/train/bench.cpp), which `unswag bench` shares.
//
//   bench_train_step --context 16384 [--config 1b|FIXTURE_DIR] [--recompute none|selective|full]
//                    [--mlp compressed|recompute|none] [--mlp-bits 16|8] [--optimizer adamw8bit|adamw]
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <torch/torch.h>

#include "unswag/model.h"
#include "unswag/train/bench.h"

int main(int argc, char** argv) {
  CLI::App app{"one UnSwag training step at a context length (JSON line out)"};
  unswag::train::StepBenchOptions bench;
  std::string config = "1b", recompute = "none", mlp = "compressed", attention = "auto";
  int64_t mlp_bits = 16;
  app.add_option("--context", bench.context, "tokens per sequence")->required();
  app.add_option("--batch", bench.batch, "sequences per step");
  app.add_option("--config", config, "1b (Llama-3.2-1B shape, random weights) or a checkpoint directory");
  app.add_option("--recompute", recompute, "none | selective | full");
  app.add_option("--mlp", mlp, "compressed | recompute | none");
  app.add_option("--mlp-bits", mlp_bits, "16 | 8");
  app.add_option("--attention", attention, "auto | sdpa | chunked | eager");
  app.add_option("--optimizer", bench.optimizer, "adamw8bit | adamw (fp32 state)");
  app.add_option("--warmup", bench.warmup);
  app.add_option("--steps", bench.steps);
  CLI11_PARSE(app, argc, argv);

  const bool cuda = torch::cuda::is_available();
  const torch::Device device = cuda ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  const auto dtype = cuda ? torch::kBFloat16 : torch::kFloat;
  try {
    unswag::Model model = config == "1b"
                              ? unswag::Model::from_config(unswag::ModelConfig::llama3_2_1b(), {device, dtype}, 0)
                              : unswag::Model::from_pretrained(config, {device, dtype});
    unswag::TrainingOptions o;
    o.recompute = recompute;
    o.mlp_policy = mlp;
    o.mlp_storage_bits = mlp_bits;
    o.attention = attention;
    model.for_training(o);
    fmt::print("{}\n", unswag::train::bench_train_steps(model, bench).to_json());
  } catch (const c10::OutOfMemoryError&) {
    fmt::print("{{\"oom\": true, \"context\": {}}}\n", bench.context);
    return 0;
  }
  return 0;
}
