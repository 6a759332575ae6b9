// Subcommands of the `unswag` CLI (each in its own file under src/cli/).
#pragma once

#include <CLI/CLI.hpp>

#include <string>
#include <vector>

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

}  // namespace unswag::cli
