// `unswag train` (fine-tune a checkpoint or train from a config / from
// scratch on text, JSONL or token shards), `unswag bench` (time training
// steps at a context length), and the main command (`unswag` alone): a small
// byte-level Llama trained from scratch on the embedded corpus on CPU, saved,
// and asked for a sample. docs/training.md describes all three.
#include <fmt/core.h>
#include <limits.h>
#include <torch/cuda.h>
#include <unistd.h>

#include <cstdlib>

#include "cli/commands.h"
#include "models/file_io.h"
#include "unswag/data/tokenizer.h"
#include "unswag/model.h"
#include "unswag/train/bench.h"
#include "unswag/train/data.h"
#include "unswag/train/trainer.h"

namespace unswag::cli {

namespace {

torch::Device pick_device(const std::string& name) {
  if (name == "cuda" || (name == "auto" && torch::cuda::is_available())) {
    TORCH_CHECK(torch::cuda::is_available(), "--device cuda: no CUDA device is available here (use --device cpu)");
    return torch::Device(torch::kCUDA, 0);
  }
  return torch::kCPU;
}

bool is_dir(const std::string& path) { return io::exists(path + "/."); }

// The embedded corpus: beside the source tree this binary was built from.
std::string find_default_corpus() {
  const std::string rel = "data/corpus/devils_dictionary.txt";
  std::vector<std::string> roots;
#ifdef UNSWAG_SOURCE_DIR
  roots.push_back(UNSWAG_SOURCE_DIR);
#endif
  if (const char* env = std::getenv("UNSWAG_SOURCE_DIR"); env != nullptr && *env != '\0') roots.push_back(env);
  char exe[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n > 0) {
    exe[n] = '\0';
    std::string dir = io::parent_dir(exe);
    for (int up = 0; up < 3; ++up) {  // build/unswag, build/sub/unswag, ...
      dir = io::parent_dir(dir);
      roots.push_back(dir);
    }
  }
  roots.push_back(".");
  for (const auto& r : roots) {
    if (io::exists(io::join(r, rel))) return io::join(r, rel);
  }
  return "";
}

}  // namespace

void add_train_options(CLI::App& cmd, TrainCliOptions& o) {
  auto* model = cmd.add_option("--model", o.model, "fine-tune this Hugging Face checkpoint directory");
  auto* config = cmd.add_option("--from-config", o.from_config, "train from scratch with this config.json");
  auto* scratch = cmd.add_flag("--from-scratch", o.from_scratch,
                               "train a small byte-level Llama from scratch (its tokenizer is written to OUT/tokenizer)");
  model->excludes(config)->excludes(scratch);
  config->excludes(scratch);
  cmd.add_option("--tokenizer", o.tokenizer, "tokenizer.json or its directory (default: the --model directory)");
  cmd.add_option("--data", o.data, "training data: text / .jsonl files, or token shards (.bin, directories)")
      ->required();
  cmd.add_option("--eval-data", o.eval_data, "held-out data (default: the last --eval-fraction of text --data)");
  cmd.add_option("--eval-fraction", o.eval_fraction, "share of text --data held out for eval")
      ->check(CLI::Range(0.0, 0.5));
  cmd.add_option("--context", o.context, "tokens per row (default: 256 from scratch, else min(2048, the model's))")
      ->check(CLI::PositiveNumber);
  cmd.add_option("--batch", o.batch, "rows per micro-batch")->check(CLI::PositiveNumber);
  cmd.add_option("--grad-accum", o.grad_accum, "micro-batches per update")->check(CLI::PositiveNumber);
  cmd.add_option("--steps", o.steps, "optimizer updates")->check(CLI::NonNegativeNumber);
  cmd.add_option("--lr", o.lr, "peak learning rate (default: 2e-3 from scratch, else 3e-5)")
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("--min-lr-ratio", o.min_lr_ratio, "final lr / peak lr for cosine and linear")->check(CLI::Range(0.0, 1.0));
  cmd.add_option("--warmup", o.warmup, "linear warmup updates")->check(CLI::NonNegativeNumber);
  cmd.add_option("--schedule", o.schedule, "cosine | linear | constant")
      ->check(CLI::IsMember({"cosine", "linear", "constant"}));
  cmd.add_option("--weight-decay", o.weight_decay, "decoupled weight decay")->check(CLI::NonNegativeNumber);
  cmd.add_option("--clip", o.clip, "gradient norm clipping (0: off)")->check(CLI::NonNegativeNumber);
  cmd.add_option("--optimizer", o.optimizer, "adamw8bit | adamw (fp32 moments)")
      ->check(CLI::IsMember({"adamw8bit", "adamw"}));
  cmd.add_option("--dtype", o.dtype, "parameters' dtype: bf16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
      ->check(CLI::IsMember({"auto", "bf16", "fp32"}));
  cmd.add_option("--device", o.device, "auto | cpu | cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd.add_option("--recompute", o.recompute, "per-layer recomputation: none | selective | full")
      ->check(CLI::IsMember({"none", "selective", "full"}));
  cmd.add_option("--eval-every", o.eval_every, "evaluate every N updates (0: at the end only)")
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("--eval-batches", o.eval_batches, "held-out micro-batches per evaluation")->check(CLI::PositiveNumber);
  cmd.add_option("--save-every", o.save_every, "checkpoint every N updates (0: at the end and on Ctrl-C)")
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("--keep", o.keep, "checkpoints kept (0: all)")->check(CLI::NonNegativeNumber);
  cmd.add_option("--log-every", o.log_every, "metrics line every N updates")->check(CLI::NonNegativeNumber);
  cmd.add_option("--resume", o.resume, "continue from a checkpoint directory, or \"latest\" in --out");
  cmd.add_option("--stop-after", o.stop_after, "leave after N updates of this run with a checkpoint (resume later)")
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("--seed", o.seed, "data order and initialisation seed");
  cmd.add_option("--hidden", o.hidden, "--from-scratch: hidden size (a multiple of 64)")->check(CLI::PositiveNumber);
  cmd.add_option("--layers", o.layers, "--from-scratch: layers")->check(CLI::PositiveNumber);
  cmd.add_option("--out", o.out, "output directory: checkpoints, metrics.jsonl, loss.svg, final/")->required();
  cmd.add_flag("--quiet", o.quiet, "no progress bar");
}

int run_train(const TrainCliOptions& o, std::string* final_dir) {
  const int sources = int(!o.model.empty()) + int(!o.from_config.empty()) + int(o.from_scratch);
  if (sources != 1) {
    fmt::print(stderr, "unswag train: give one of --model DIR, --from-config config.json or --from-scratch\n");
    return 2;
  }
  if (!o.model.empty()) {
    if (!is_dir(o.model)) {
      fmt::print(stderr, "unswag train: --model {}: no such directory\n", o.model);
      return 2;
    }
    if (!io::exists(io::join(o.model, "config.json"))) {
      fmt::print(stderr, "unswag train: --model {}: no config.json there (expected a Hugging Face checkpoint "
                         "directory)\n", o.model);
      return 2;
    }
  }
  if (!o.from_config.empty() && !io::exists(o.from_config)) {
    fmt::print(stderr, "unswag train: --from-config {}: no such file\n", o.from_config);
    return 2;
  }
  for (const auto& d : o.data) {
    if (!io::exists(d)) {
      fmt::print(stderr, "unswag train: --data {}: no such file or directory\n", d);
      return 2;
    }
  }
  const torch::Device device = pick_device(o.device);
  const bool bf16 = o.dtype == "bf16" || (o.dtype == "auto" && device.is_cuda());
  const torch::ScalarType dtype = bf16 ? torch::kBFloat16 : torch::kFloat;
  io::make_dirs(o.out);

  // The tokenizer: written for --from-scratch, else the model's or --tokenizer.
  std::string tokenizer = o.tokenizer;
  if (o.from_scratch) {
    tokenizer = io::join(o.out, "tokenizer");
    train::write_byte_tokenizer(tokenizer);
  } else if (tokenizer.empty() && !o.model.empty() && io::exists(io::join(o.model, "tokenizer.json"))) {
    tokenizer = o.model;
  }

  // The model.
  std::optional<Model> model;
  int64_t context = o.context;
  if (o.from_scratch) {
    if (context == 0) context = 256;
    model = Model::from_config(train::small_llama_config(o.hidden, o.layers, context), {device, dtype}, o.seed);
  } else if (!o.from_config.empty()) {
    const auto cfg = ModelConfig::from_file(o.from_config);
    if (context == 0) context = std::min<int64_t>(2048, cfg.max_position_embeddings);
    model = Model::from_config(cfg, {device, dtype}, o.seed);
  } else {
    model = Model::from_pretrained(o.model, {device, dtype});
    if (context == 0) context = std::min<int64_t>(2048, model->config().max_position_embeddings);
  }
  if (!tokenizer.empty()) {
    const int64_t vocab = data::Tokenizer::from_file(tokenizer).vocab_size();
    TORCH_CHECK(vocab <= model->config().vocab_size, "the tokenizer (", tokenizer, ") has ", vocab,
                " tokens, more than the model's vocab_size ", model->config().vocab_size);
  }

  // The data: text is tokenised into OUT/data (reused when unchanged).
  const auto prepared = train::prepare_data(o.data, tokenizer, io::join(o.out, "data"),
                                            o.eval_data.empty() ? o.eval_fraction : 0.0, o.quiet);
  std::vector<std::string> eval = prepared.eval;
  if (!o.eval_data.empty()) eval = train::prepare_data(o.eval_data, tokenizer, io::join(o.out, "eval-data"), 0.0, o.quiet).train;

  train::TrainerOptions t;
  t.train_inputs = prepared.train;
  t.eval_inputs = eval;
  t.context = context;
  t.micro_batch = o.batch;
  t.grad_accum = o.grad_accum;
  t.steps = o.steps;
  t.lr = o.lr >= 0 ? o.lr : (o.model.empty() ? 2e-3 : 3e-5);
  t.min_lr_ratio = o.min_lr_ratio;
  t.warmup = o.warmup;
  t.schedule = train::parse_schedule(o.schedule);
  t.weight_decay = o.weight_decay;
  t.clip_norm = o.clip;
  t.optimizer = o.optimizer;
  t.training.recompute = o.recompute;
  t.eval_every = o.eval_every;
  t.eval_batches = o.eval_batches;
  t.save_every = o.save_every;
  t.keep_last = o.keep;
  t.log_every = o.log_every;
  t.seed = o.seed;
  t.out_dir = o.out;
  t.tokenizer = tokenizer;
  t.progress = !o.quiet;
  t.handle_sigint = true;
  t.stop_after = o.stop_after;
  train::Trainer trainer(std::move(*model), t);
  if (!o.resume.empty()) trainer.resume(o.resume);
  if (!o.quiet) {
    const auto& c = trainer.model().config();
    fmt::print(stderr,
               "train: {} layers x hidden {} ({:.2f} M parameters, {}, {}), {} training tokens{}; {} updates of {} x {} "
               "x {} tokens, lr {:g} {} (warmup {}), {}{}\n",
               c.num_hidden_layers, c.hidden_size, trainer.model().num_parameters() / 1e6,
               c10::toString(trainer.model().dtype()), device.str(), trainer.train_tokens(),
               eval.empty() ? "" : fmt::format(", eval on {} shard(s)", eval.size()), t.steps, t.grad_accum,
               t.micro_batch, t.context, t.lr, o.schedule, t.warmup, t.optimizer,
               trainer.step() > 0 ? fmt::format(", resumed at step {}", trainer.step()) : "");
  }
  const auto result = trainer.fit();
  if (result.interrupted) {
    fmt::print(stderr, "unswag train: interrupted at step {}; saved {} (continue with --resume latest)\n", result.step,
               result.last_checkpoint);
    return 130;
  }
  if (result.paused) return 0;
  if (!o.quiet && !result.history.empty()) {
    const auto& last = result.history.back();
    fmt::print(stderr, "done: step {}, loss {:.4f}{}, {} tokens in {:.1f} s; wrote {}/final, {}/metrics.jsonl, "
                       "{}/loss.svg\n", last.step, last.loss,
               last.eval_loss ? fmt::format(" (eval {:.4f})", *last.eval_loss) : "", last.tokens, last.elapsed_s,
               o.out, o.out, o.out);
  }
  if (final_dir != nullptr) *final_dir = io::join(o.out, "final");
  return 0;
}

void add_main_options(CLI::App& app, MainOptions& o) {
  app.add_option("--data", o.data, "the main command's corpus (default: data/corpus/devils_dictionary.txt)");
  app.add_option("--out", o.out, "the main command's output directory");
  app.add_option("--steps", o.steps, "the main command's optimizer updates")->check(CLI::PositiveNumber);
  app.add_option("--device", o.device, "the main command's device: auto | cpu | cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--prompt", o.prompt, "the main command's prompt for the sample");
}

int run_main(const MainOptions& o) {
  TrainCliOptions t;
  t.from_scratch = true;
  t.data = {o.data.empty() ? find_default_corpus() : o.data};
  if (t.data[0].empty()) {
    fmt::print(stderr, "unswag: the embedded corpus data/corpus/devils_dictionary.txt was not found beside this "
                       "binary; set UNSWAG_SOURCE_DIR to the source tree or pass --data PATH\n");
    return 2;
  }
  t.out = o.out;
  t.device = o.device;
  // Sized for about a minute on 2 CPU cores (docs/training.md has the
  // measured curve): 0.8 M parameters, 2048 tokens per update, 500 updates
  // (65 s on an idle 2-core machine, measured 2026-12-03).
  t.hidden = 128;
  t.layers = 4;
  t.context = 128;
  t.batch = 16;
  t.grad_accum = 1;
  t.steps = o.steps;
  t.lr = 4e-3;
  t.warmup = 15;
  t.optimizer = "adamw8bit";
  t.eval_every = 100;
  t.eval_batches = 4;
  t.log_every = 10;
  fmt::print(stderr, "unswag: training a small byte-level Llama from scratch on {} ({} updates; `unswag --help` "
                     "lists the other commands)\n", t.data[0], t.steps);
  std::string final_dir;
  const int rc = run_train(t, &final_dir);
  if (rc != 0) return rc;

  Model model = Model::from_pretrained(final_dir, {pick_device(o.device), std::nullopt});
  const auto tok = data::Tokenizer::from_file(final_dir);
  std::vector<int64_t> prompt;
  for (int32_t id : tok.encode(o.prompt, false)) prompt.push_back(id);
  GenerateOptions g;
  g.max_new_tokens = 160;
  g.temperature = 0.8;
  g.top_p = 0.9;
  g.seed = 1;
  const auto out = generate(model, prompt, g);
  fmt::print("\nsample (top-p 0.9, temperature 0.8) from {}:\n\n{}{}\n", final_dir, o.prompt,
             tok.decode(std::vector<int32_t>(out.begin(), out.end()), true));
  return 0;
}

void add_bench_options(CLI::App& cmd, BenchCliOptions& o) {
  auto* config = cmd.add_option("--config", o.config, "a config.json (random weights), or \"1b\" (Llama-3.2-1B shape)");
  auto* model = cmd.add_option("--model", o.model, "a checkpoint directory");
  config->excludes(model);
  cmd.add_option("--context", o.bench.context, "tokens per row")->required()->check(CLI::PositiveNumber);
  cmd.add_option("--batch", o.bench.batch, "rows per step")->check(CLI::PositiveNumber);
  cmd.add_option("--optimizer", o.bench.optimizer, "adamw8bit | adamw")->check(CLI::IsMember({"adamw8bit", "adamw"}));
  cmd.add_option("--recompute", o.recompute, "none | selective | full")
      ->check(CLI::IsMember({"none", "selective", "full"}));
  cmd.add_option("--dtype", o.dtype, "bf16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
      ->check(CLI::IsMember({"auto", "bf16", "fp32"}));
  cmd.add_option("--device", o.device, "auto | cpu | cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd.add_option("--warmup", o.bench.warmup, "untimed steps first")->check(CLI::NonNegativeNumber);
  cmd.add_option("--steps", o.bench.steps, "timed steps (the median is reported)")->check(CLI::PositiveNumber);
  cmd.add_flag("--json", o.json, "print only the JSON line");
}

int run_bench(const BenchCliOptions& o) {
  if (o.config.empty() == o.model.empty()) {
    fmt::print(stderr, "unswag bench: give --config PATH|1b or --model DIR\n");
    return 2;
  }
  if (!o.model.empty() && !io::exists(io::join(o.model, "config.json"))) {
    fmt::print(stderr, "unswag bench: --model {}: no config.json there\n", o.model);
    return 2;
  }
  const torch::Device device = pick_device(o.device);
  const auto dtype = o.dtype == "bf16" || (o.dtype == "auto" && device.is_cuda()) ? torch::kBFloat16 : torch::kFloat;
  try {
    Model model = !o.model.empty()   ? Model::from_pretrained(o.model, {device, dtype})
                  : o.config == "1b" ? Model::from_config(ModelConfig::llama3_2_1b(), {device, dtype}, 0)
                                     : Model::from_config(ModelConfig::from_file(o.config), {device, dtype}, 0);
    TrainingOptions t;
    t.recompute = o.recompute;
    model.for_training(t);
    const auto r = train::bench_train_steps(model, o.bench);
    if (!o.json) {
      fmt::print("{} parameters ({:.3f} B), {} {}, context {} x batch {}, {}, recompute {}:\n", r.params,
                 r.params / 1e9, r.device, c10::toString(model.dtype()), r.context, r.batch, o.bench.optimizer,
                 o.recompute);
      fmt::print("  step {:.1f} ms (median of {}), {:.0f} tokens/s, peak GPU memory {:.2f} GiB (reserved {:.2f}), "
                 "optimizer state {:.3f} GiB\n", r.step_ms, o.bench.steps, r.tokens_per_s, r.peak_allocated_gib,
                 r.peak_reserved_gib, r.optimizer_state_gib);
    }
    fmt::print("{}\n", r.to_json());
  } catch (const c10::OutOfMemoryError&) {
    fmt::print("{{\"oom\": true, \"context\": {}}}\n", o.bench.context);
    return 3;
  }
  return 0;
}

}  // namespace unswag::cli
