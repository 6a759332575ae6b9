// Subcommands of the `unswag` CLI (each in its own file under src/cli/).
#pragma once

#include <CLI/CLI.hpp>

#include <string>
#include <vector>

#include "unswag/train/bench.h"

namespace unswag::cli {

struct DemoOptions {
  std::string device = "auto";  // auto | cpu | cuda
  std::string activation = "swiglu";
  int64_t layers = 4;
  int64_t hidden = 256;
  int64_t intermediate = 1024;
  int64_t tokens = 1024;
  int64_t steps = 100;
  double lr = 1e-3;
  uint64_t seed = 0;
};
void add_demo_options(CLI::App& cmd, DemoOptions& o);
int run_demo(const DemoOptions& o);

int run_tables();

struct TokenizeOptions {
  std::vector<std::string> inputs;
  std::string tokenizer, out_prefix, format = "auto", text_field = "text";
  bool paragraphs = false, overwrite = false;
  int64_t shard_tokens = 100'000'000;
};
void add_tokenize_options(CLI::App& cmd, TokenizeOptions& o);
int run_tokenize(const TokenizeOptions& o);

struct InspectOptions {
  std::string model;
  int64_t context = 16384;
};
void add_inspect_options(CLI::App& cmd, InspectOptions& o);
int run_inspect(const InspectOptions& o);

struct GenerateCliOptions {
  std::string model, tokenizer, prompt, device = "cpu";
  std::vector<int64_t> prompt_ids;
  int64_t max_new_tokens = 32;
  double temperature = 0.0, top_p = 1.0;
  uint64_t seed = 0;
};
void add_generate_options(CLI::App& cmd, GenerateCliOptions& o);
int run_generate(const GenerateCliOptions& o);

struct TrainCliOptions {
  std::string model, from_config, tokenizer, out, resume;
  bool from_scratch = false, quiet = false;
  std::vector<std::string> data, eval_data;
  double eval_fraction = 0.05;
  int64_t context = 0;  // 0: 256 from scratch, else min(2048, max_position_embeddings)
  int64_t batch = 1, grad_accum = 1, steps = 100, warmup = 0;
  double lr = -1;  // < 0: 2e-3 from scratch / from a config, 3e-5 fine-tuning
  double min_lr_ratio = 0.1, weight_decay = 0.1, clip = 1.0;
  std::string schedule = "cosine", optimizer = "adamw8bit", dtype = "auto", device = "auto", recompute = "none";
  int64_t eval_every = 0, eval_batches = 8, save_every = 0, keep = 2, log_every = 10, stop_after = 0;
  uint64_t seed = 0;
  int64_t hidden = 256, layers = 4;  // --from-scratch
};
void add_train_options(CLI::App& cmd, TrainCliOptions& o);
// `final_dir` (optional) receives OUT/final on success. Returns the exit code
// (130 after Ctrl-C, with a checkpoint saved).
int run_train(const TrainCliOptions& o, std::string* final_dir = nullptr);

// `unswag` with no subcommand: from-scratch training on the embedded corpus,
// then a sample.
struct MainOptions {
  std::string data, out = "unswag-out", device = "cpu", prompt = "LOVE, n. ";
  int64_t steps = 500;
};
void add_main_options(CLI::App& app, MainOptions& o);
int run_main(const MainOptions& o);

struct BenchCliOptions {
  std::string config, model, recompute = "none", dtype = "auto", device = "auto";
  bool json = false;
  train::StepBenchOptions bench;
};
void add_bench_options(CLI::App& cmd, BenchCliOptions& o);
int run_bench(const BenchCliOptions& o);

}  // namespace unswag::cli
