// unswag::train::Trainer: the training loop around unswag::Model, AdamW8bit
// (or fp32 AdamW) and the streaming token loader, with gradient accumulation,
// warmup + cosine / linear / constant learning-rate schedules, gradient
// clipping, periodic evaluation on held-out windows, JSONL metrics, a progress
// bar, an SVG loss curve, and checkpoints that resume exactly:
//
//   unswag::train::TrainerOptions o;
//   o.train_inputs = {"out/data/train_000000.bin"};
//   o.context = 256; o.steps = 300; o.out_dir = "out";
//   unswag::train::Trainer trainer(unswag::Model::from_config(cfg), o);
//   trainer.resume("latest");              // optional: continue out/checkpoint-N
//   auto result = trainer.fit();           // out/final/ loads in transformers
//
// A checkpoint out/checkpoint-STEP/ holds the model (save_pretrained: config,
// safetensors), optimizer.safetensors, trainer_state.json (step, tokens seen,
// the loader's position, the RNG states, the schedule, the metric history) and
// the tokenizer files when known. It is written into a temporary directory and
// renamed into place, so a process killed while saving leaves the previous
// checkpoints as they were. docs/training.md describes the layout.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "unswag/model.h"

namespace unswag::data {
class StreamingContextDataLoader;
}
namespace unswag::optim {
class AdamW;
}

namespace unswag::train {

enum class Schedule { kCosine, kLinear, kConstant };
// "cosine", "linear", "constant"; anything else is an error naming the value.
Schedule parse_schedule(const std::string& name);
const char* to_string(Schedule schedule);

// The learning rate of update `step` (0-based) of `total`: linear warmup from
// peak / warmup to peak over the first `warmup` updates (update s gets
// peak (s + 1) / warmup), then from peak down to min = peak min_lr_ratio:
//   cosine:   min + (peak - min) (1 + cos(pi p)) / 2
//   linear:   peak - (peak - min) p
//   constant: peak
// with p = (s - warmup) / max(1, total - warmup) in [0, 1].
double learning_rate(Schedule schedule, double peak, int64_t step, int64_t warmup, int64_t total,
                     double min_lr_ratio);

struct TrainerOptions {
  // Data: token shards (files, directories, globs; see data::LoaderOptions).
  std::vector<std::string> train_inputs;
  // Held-out shards for evaluation; empty: no evaluation.
  std::vector<std::string> eval_inputs;
  int64_t context = 256;      // T: tokens per row
  int64_t micro_batch = 1;    // rows per forward/backward
  int64_t grad_accum = 1;     // micro-batches per optimizer update
  int64_t steps = 100;        // optimizer updates in all (a resumed run counts those already done)
  // Models with Packet-Switched Attention layers (docs/psa.md): the Gumbel
  // temperature anneals linearly from start to end over `steps`, and the
  // route-budget controller steps after every update.
  double psa_tau_start = 1.0, psa_tau_end = 0.3;
  // Learning rate: peak lr, warmup updates, then the schedule down to lr * min_lr_ratio.
  double lr = 3e-4;
  int64_t warmup = 0;
  Schedule schedule = Schedule::kCosine;
  double min_lr_ratio = 0.1;
  double weight_decay = 0.1, beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double clip_norm = 1.0;                // 0: no clipping (the norm is still logged)
  std::string optimizer = "adamw8bit";   // adamw8bit | adamw (fp32 moments)
  TrainingOptions training;              // what Model::for_training() switches on
  int64_t eval_every = 0;                // 0: only at the end (when eval_inputs are given)
  int64_t eval_batches = 8;              // micro-batches of held-out windows per evaluation (fewer if the data has fewer)
  int64_t save_every = 0;                // 0: only at the end (and on SIGINT)
  int64_t keep_last = 2;                 // checkpoint-N directories kept (0: all)
  int64_t log_every = 10;                // a metrics line (and a progress line off a TTY) every N updates
  uint64_t seed = 0;                     // the loader's shuffle and torch's generators
  std::string out_dir;                   // required: checkpoints, metrics.jsonl, loss.svg, final/
  // tokenizer.json (or its directory) copied into every checkpoint, so
  // `unswag generate --model out/final` and transformers find it. Optional.
  std::string tokenizer;
  bool progress = true;       // the progress bar on stderr
  bool handle_sigint = false; // fit(): Ctrl-C finishes the update, saves a checkpoint and returns
  bool save_final = true;     // fit(): out/final/ and a last checkpoint at the end
  // > 0: fit() returns after this many updates of this call, with a
  // checkpoint saved (for time-sliced jobs; the schedule still spans `steps`).
  int64_t stop_after = 0;
};

// Forward and backward over micro-batches (input_ids, targets) whose
// gradients add up to those of one batch: the loss is the sum of the
// cross-entropy over every non-ignored target (-100 is ignored) of all
// micro-batches divided by their total count, not the mean of per-micro-batch
// means. Returns that loss (detached, fp32 scalar); gradients accumulate into
// the parameters' .grad.
torch::Tensor accumulate_gradients(Model& model, const std::vector<std::pair<torch::Tensor, torch::Tensor>>& micro_batches);

// One logged update.
struct StepMetrics {
  int64_t step = 0;             // updates done after this one (1-based)
  double loss = 0;              // mean cross-entropy over the update's target tokens (nats)
  double lr = 0;
  double grad_norm = 0;         // before clipping
  int64_t tokens = 0;           // tokens seen so far, this update included
  double tokens_per_s = 0;      // of this update
  double peak_memory_gib = 0;   // CUDA allocator peak, or the process's peak RSS on CPU
  double elapsed_s = 0;         // training time so far (resumed runs continue the count)
  std::optional<double> eval_loss;
};

struct TrainResult {
  int64_t step = 0;
  bool interrupted = false;  // stopped by SIGINT (a checkpoint was saved)
  bool paused = false;       // stopped by stop_after (a checkpoint was saved)
  std::string last_checkpoint;
  std::vector<StepMetrics> history;
};

class Trainer {
 public:
  // `model` is trained in place (its device and dtype are kept); the options
  // are checked here (an error names the option).
  Trainer(Model model, TrainerOptions options);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // Continues from a checkpoint directory, or "latest": the newest
  // out_dir/checkpoint-N (an error when there is none). Model weights,
  // optimizer state, loader position, RNG states and history are restored;
  // the run then gives the same losses as one never interrupted (bit for bit
  // on CPU). The checkpoint must have been written for the same data and
  // context (an error names what differs).
  void resume(const std::string& checkpoint);

  // Trains until options.steps updates are done (or SIGINT), logging,
  // evaluating and saving as configured.
  TrainResult fit();

  // One optimizer update (grad_accum micro-batches). Logs nothing.
  StepMetrics train_step();
  // Mean loss over the held-out windows (token-weighted); NaN without eval data.
  double evaluate();
  // Writes out_dir/checkpoint-<step> atomically and prunes old ones; returns its path.
  std::string save_checkpoint();

  int64_t step() const { return step_; }
  int64_t tokens_seen() const { return tokens_; }
  Model& model() { return model_; }
  const std::vector<StepMetrics>& history() const { return history_; }
  const TrainerOptions& options() const { return options_; }
  // Tokens in the training stream (for "context longer than the data" checks).
  int64_t train_tokens() const;

  // Test hook: called inside save_checkpoint() after the temporary directory
  // is complete and before it is renamed into place.
  std::function<void(const std::string& tmp_dir)> before_commit_hook;

 private:
  void make_optimizer();
  void write_metrics_file() const;
  void append_metrics(const StepMetrics& m) const;
  void write_plot() const;

  Model model_;
  TrainerOptions options_;
  std::unique_ptr<data::StreamingContextDataLoader> loader_;
  std::unique_ptr<optim::AdamW> optimizer_;
  int64_t step_ = 0, tokens_ = 0;
  double elapsed_s_ = 0;
  std::vector<StepMetrics> history_;
};

// The newest complete out_dir/checkpoint-N (largest N), or "" when none.
std::string latest_checkpoint(const std::string& out_dir);

// The loss curve: train loss (and eval loss points) against tokens seen, as a
// self-contained SVG document.
std::string loss_curve_svg(const std::vector<StepMetrics>& history, const std::string& title);

}  // namespace unswag::train
