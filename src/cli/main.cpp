// The `unswag` command line. With no subcommand it trains a small byte-level
// Llama from scratch on the embedded corpus and prints a sample (the main
// command; docs/training.md). `unswag train` fine-tunes or pre-trains;
// `unswag bench` times training steps; `unswag demo` trains a small MLP with
// and without compressed activations and prints memory and gradient
// agreement; `unswag tables` prints the few-bit derivative tables; `unswag
// tokenize` turns text into token shards; `unswag inspect` and `unswag
// generate` look into and continue with a checkpoint.
#include <CLI/CLI.hpp>
#include <c10/util/Exception.h>
#include <fmt/core.h>

#include <exception>

#include "cli/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"UnSwag: memory-lean transformer training (C++/CUDA on LibTorch)"};
  app.require_subcommand(0, 1);
  unswag::cli::MainOptions main_options;
  unswag::cli::add_main_options(app, main_options);
  unswag::cli::TrainCliOptions train;
  auto* train_cmd = app.add_subcommand("train", "fine-tune a checkpoint or train from scratch (docs/training.md)");
  unswag::cli::add_train_options(*train_cmd, train);
  unswag::cli::BenchCliOptions bench;
  auto* bench_cmd = app.add_subcommand("bench", "time training steps at a context length (tokens/s, peak memory)");
  unswag::cli::add_bench_options(*bench_cmd, bench);
  unswag::cli::DemoOptions demo;
  auto* demo_cmd = app.add_subcommand("demo", "train a small MLP with plain and compressed activations");
  unswag::cli::add_demo_options(*demo_cmd, demo);
  app.add_subcommand("tables", "print the few-bit derivative tables and their errors (docs/fewbit.md)");
  unswag::cli::TokenizeOptions tokenize;
  auto* tokenize_cmd = app.add_subcommand("tokenize", "tokenize text / JSONL into token shards (docs/data.md)");
  unswag::cli::add_tokenize_options(*tokenize_cmd, tokenize);
  unswag::cli::InspectOptions inspect;
  auto* inspect_cmd = app.add_subcommand("inspect", "a checkpoint's config, parameters and estimated training memory");
  unswag::cli::add_inspect_options(*inspect_cmd, inspect);
  unswag::cli::GenerateCliOptions generate;
  auto* generate_cmd = app.add_subcommand("generate", "continue a prompt with a checkpoint (greedy or top-p)");
  unswag::cli::add_generate_options(*generate_cmd, generate);
  CLI11_PARSE(app, argc, argv);
  try {
    if (app.got_subcommand("tables")) return unswag::cli::run_tables();
    if (app.got_subcommand("tokenize")) return unswag::cli::run_tokenize(tokenize);
    if (app.got_subcommand("inspect")) return unswag::cli::run_inspect(inspect);
    if (app.got_subcommand("generate")) return unswag::cli::run_generate(generate);
    if (app.got_subcommand("train")) return unswag::cli::run_train(train);
    if (app.got_subcommand("bench")) return unswag::cli::run_bench(bench);
    if (app.got_subcommand("demo")) return unswag::cli::run_demo(demo);
    return unswag::cli::run_main(main_options);
  } catch (const c10::Error& e) {  // its what() carries a C++ backtrace; users need the message
    fmt::print(stderr, "unswag: error: {}\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "unswag: error: {}\n", e.what());
    return 1;
  }
}
