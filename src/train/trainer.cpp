// unswag::train::Trainer: the update (gradient accumulation, clipping, the
// schedule), evaluation, metrics, and checkpoints with exact resume.
#include "unswag/train/trainer.h"

#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <c10/util/Exception.h>
#include <fmt/core.h>
#include <sys/resource.h>
#include <torch/cuda.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "models/file_io.h"
#include "train/train_fs.h"
#include "unswag/data/loader.h"
#include "unswag/data/shards.h"
#include "unswag/optim/adamw.h"

#ifdef UNSWAG_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace unswag::train {

namespace {

using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr const char* kStateFile = "trainer_state.json";
constexpr const char* kOptimizerFile = "optimizer.safetensors";
constexpr const char* kCheckpointPrefix = "checkpoint-";
constexpr int kStateVersion = 1;

// ---------------------------------------------------------------- SIGINT --
// The handler only sets a flag; fit() checks it between updates. SA_RESETHAND
// restores the default action, so a second Ctrl-C ends the process at once.
std::atomic<int> g_interrupted{0};
extern "C" void on_sigint(int) { g_interrupted.store(1); }

struct SigintScope {
  bool active = false;
  struct sigaction previous {};
  explicit SigintScope(bool on) : active(on) {
    if (!active) return;
    g_interrupted.store(0);
    struct sigaction sa {};
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESETHAND;
    ::sigaction(SIGINT, &sa, &previous);
  }
  ~SigintScope() {
    if (active) ::sigaction(SIGINT, &previous, nullptr);
  }
};

// ------------------------------------------------------------------ misc --
int64_t count_tokens(const std::vector<std::string>& inputs) {
  int64_t n = 0;
  for (const auto& path : data::expand_inputs(inputs, "trainer")) n += data::TokenShard::open(path).num_tokens();
  return n;
}

std::string describe(const std::vector<std::string>& inputs) {
  std::string s;
  for (size_t i = 0; i < inputs.size() && i < 3; ++i) s += (i ? ", " : "") + inputs[i];
  if (inputs.size() > 3) s += fmt::format(", ... ({} in all)", inputs.size());
  return s;
}

// Peak memory: the CUDA caching allocator's peak on a GPU, else the process's
// peak resident set (ru_maxrss, KiB on Linux).
double peak_memory_gib(const torch::Device& device) {
#ifdef UNSWAG_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index());
    return double(stats.allocated_bytes[size_t(c10::CachingAllocator::StatType::AGGREGATE)].peak) / (1 << 30);
  }
#endif
  struct rusage ru {};
  ::getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_maxrss) / (1 << 20);
}

std::string hex_of(const torch::Tensor& bytes) {
  const auto t = bytes.contiguous().cpu();
  const auto* p = t.data_ptr<uint8_t>();
  static const char* digits = "0123456789abcdef";
  std::string s(size_t(t.numel()) * 2, '0');
  for (int64_t i = 0; i < t.numel(); ++i) {
    s[2 * i] = digits[p[i] >> 4];
    s[2 * i + 1] = digits[p[i] & 15];
  }
  return s;
}

torch::Tensor bytes_of(const std::string& hex, const std::string& what) {
  TORCH_CHECK(hex.size() % 2 == 0, what, ": RNG state hex string has odd length ", hex.size());
  auto t = torch::empty({int64_t(hex.size() / 2)}, torch::kUInt8);
  auto* p = t.data_ptr<uint8_t>();
  auto nibble = [&](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    TORCH_CHECK(false, what, ": RNG state has a non-hex character '", c, "'");
  };
  for (size_t i = 0; i < hex.size() / 2; ++i) p[i] = uint8_t(nibble(hex[2 * i]) << 4 | nibble(hex[2 * i + 1]));
  return t;
}

Json metrics_json(const StepMetrics& m) {
  Json j = {{"step", m.step},       {"loss", m.loss},
            {"lr", m.lr},           {"grad_norm", m.grad_norm},
            {"tokens", m.tokens},   {"tokens_per_s", m.tokens_per_s},
            {"peak_memory_gib", m.peak_memory_gib}, {"elapsed_s", m.elapsed_s}};
  if (m.eval_loss) j["eval_loss"] = *m.eval_loss;
  return j;
}

StepMetrics metrics_from_json(const Json& j) {
  StepMetrics m;
  m.step = j.at("step").get<int64_t>();
  m.loss = j.at("loss").get<double>();
  m.lr = j.at("lr").get<double>();
  m.grad_norm = j.at("grad_norm").get<double>();
  m.tokens = j.at("tokens").get<int64_t>();
  m.tokens_per_s = j.at("tokens_per_s").get<double>();
  m.peak_memory_gib = j.at("peak_memory_gib").get<double>();
  m.elapsed_s = j.at("elapsed_s").get<double>();
  if (j.contains("eval_loss") && j.at("eval_loss").is_number()) m.eval_loss = j.at("eval_loss").get<double>();
  return m;
}

std::string format_duration(double s) {
  const int64_t t = int64_t(std::max(0.0, s) + 0.5);
  if (t >= 3600) return fmt::format("{}:{:02d}:{:02d}", t / 3600, (t / 60) % 60, t % 60);
  return fmt::format("{}:{:02d}", t / 60, t % 60);
}

std::string format_rate(double tokens_per_s) {
  if (tokens_per_s >= 1e6) return fmt::format("{:.2f}M", tokens_per_s / 1e6);
  if (tokens_per_s >= 1e3) return fmt::format("{:.1f}k", tokens_per_s / 1e3);
  return fmt::format("{:.0f}", tokens_per_s);
}

// The tokenizer files to copy into checkpoints: tokenizer.json and, when
// present beside it, tokenizer_config.json.
std::vector<std::string> tokenizer_files(const std::string& tokenizer) {
  if (tokenizer.empty()) return {};
  const std::string json = fs::is_dir(tokenizer) ? io::join(tokenizer, "tokenizer.json") : tokenizer;
  TORCH_CHECK(io::exists(json), "trainer: tokenizer ", json, " does not exist");
  std::vector<std::string> files = {json};
  const std::string config = io::join(io::parent_dir(json), "tokenizer_config.json");
  if (io::exists(config)) files.push_back(config);
  return files;
}

int64_t checkpoint_step(const std::string& name) {
  const std::string prefix = kCheckpointPrefix;
  if (name.compare(0, prefix.size(), prefix) != 0 || name.size() == prefix.size()) return -1;
  int64_t step = 0;
  for (size_t i = prefix.size(); i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    step = step * 10 + (name[i] - '0');
  }
  return step;
}

// ---------------------------------------------------------- progress bar --
// On a terminal: one line redrawn after every update. Elsewhere (logs, CI):
// one line per log interval.
class Progress {
 public:
  Progress(bool on, int64_t total, int64_t first) : on_(on), tty_(::isatty(fileno(stderr)) != 0), total_(total) {
    start_step_ = first;
  }
  void update(const StepMetrics& m, const std::string& memory_kind, bool log_line) {
    if (!on_) return;
    const double since = std::chrono::duration<double>(Clock::now() - start_).count();
    const double per_step = since / double(std::max<int64_t>(1, m.step - start_step_));
    const double eta = per_step * double(total_ - m.step);
    std::string bar;
    const int width = 20;
    const int filled = int(width * double(m.step) / double(std::max<int64_t>(1, total_)));
    for (int i = 0; i < width; ++i) bar += i < filled ? '#' : '.';
    const std::string line =
        fmt::format("step {}/{} [{}] loss {:.4f} | lr {:.2e} | {} tok/s | {} {:.2f} GiB | {} < {}", m.step, total_,
                    bar, m.loss, m.lr, format_rate(m.tokens_per_s), memory_kind, m.peak_memory_gib,
                    format_duration(since), format_duration(eta));
    if (tty_) {
      fmt::print(stderr, "\r{}\033[K", line);
      if (m.step == total_) fmt::print(stderr, "\n");
    } else if (log_line) {
      fmt::print(stderr, "{}\n", line);
    }
    std::fflush(stderr);
  }
  void message(const std::string& text) {
    if (!on_) return;
    fmt::print(stderr, "{}{}\n", tty_ ? "\r\033[K" : "", text);
    std::fflush(stderr);
  }

 private:
  bool on_, tty_;
  int64_t total_, start_step_ = 0;
  Clock::time_point start_ = Clock::now();
};

}  // namespace

// ------------------------------------------------------------ schedules --
Schedule parse_schedule(const std::string& name) {
  if (name == "cosine") return Schedule::kCosine;
  if (name == "linear") return Schedule::kLinear;
  if (name == "constant") return Schedule::kConstant;
  TORCH_CHECK(false, "schedule must be one of cosine, linear, constant; got \"", name, "\"");
}

const char* to_string(Schedule schedule) {
  switch (schedule) {
    case Schedule::kCosine: return "cosine";
    case Schedule::kLinear: return "linear";
    case Schedule::kConstant: return "constant";
  }
  return "?";
}

double learning_rate(Schedule schedule, double peak, int64_t step, int64_t warmup, int64_t total,
                     double min_lr_ratio) {
  if (step < warmup) return peak * double(step + 1) / double(warmup);
  if (schedule == Schedule::kConstant) return peak;
  const double p = std::clamp(double(step - warmup) / double(std::max<int64_t>(1, total - warmup)), 0.0, 1.0);
  const double min_lr = peak * min_lr_ratio;
  if (schedule == Schedule::kLinear) return peak - (peak - min_lr) * p;
  return min_lr + (peak - min_lr) * 0.5 * (1.0 + std::cos(M_PI * p));
}

torch::Tensor accumulate_gradients(Model& model,
                                   const std::vector<std::pair<torch::Tensor, torch::Tensor>>& micro_batches) {
  TORCH_CHECK(!micro_batches.empty(), "accumulate_gradients: micro_batches is empty");
  std::vector<int64_t> counts;
  int64_t total = 0;
  for (const auto& [input, targets] : micro_batches) {
    counts.push_back((targets != -100).sum().item<int64_t>());
    total += counts.back();
  }
  // Each micro-batch's mean loss L_i over n_i targets enters as L_i n_i / N,
  // so the summed gradients are those of the mean over all N target tokens
  // (the mean of per-micro-batch means would over-weight short micro-batches).
  auto loss_sum = torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat).device(model.device()));
  for (size_t i = 0; i < micro_batches.size(); ++i) {
    if (counts[i] == 0) continue;
    auto loss = model.loss(micro_batches[i].first, micro_batches[i].second) * (double(counts[i]) / double(total));
    loss.backward();
    loss_sum += loss.detach();
  }
  return loss_sum;
}

// -------------------------------------------------------------- Trainer --
Trainer::Trainer(Model model, TrainerOptions options) : model_(std::move(model)), options_(std::move(options)) {
  const auto& o = options_;
  TORCH_CHECK(!o.out_dir.empty(), "trainer: out_dir is required (where checkpoints and metrics go)");
  TORCH_CHECK(!o.train_inputs.empty(), "trainer: train_inputs is empty; expected token shards");
  TORCH_CHECK(o.context >= 1, "trainer: context must be >= 1, got ", o.context);
  TORCH_CHECK(o.micro_batch >= 1, "trainer: micro_batch must be >= 1, got ", o.micro_batch);
  TORCH_CHECK(o.grad_accum >= 1, "trainer: grad_accum must be >= 1, got ", o.grad_accum);
  TORCH_CHECK(o.steps >= 0, "trainer: steps must be >= 0, got ", o.steps);
  TORCH_CHECK(o.lr >= 0 && std::isfinite(o.lr), "trainer: lr must be finite and >= 0, got ", o.lr);
  TORCH_CHECK(o.warmup >= 0, "trainer: warmup must be >= 0, got ", o.warmup);
  TORCH_CHECK(o.min_lr_ratio >= 0 && o.min_lr_ratio <= 1, "trainer: min_lr_ratio must be in [0, 1], got ",
              o.min_lr_ratio);
  TORCH_CHECK(o.clip_norm >= 0, "trainer: clip_norm must be >= 0 (0: no clipping), got ", o.clip_norm);
  TORCH_CHECK(o.optimizer == "adamw8bit" || o.optimizer == "adamw",
              "trainer: optimizer must be adamw8bit or adamw, got \"", o.optimizer, "\"");
  TORCH_CHECK(o.eval_every >= 0 && o.save_every >= 0 && o.log_every >= 0 && o.keep_last >= 0 && o.eval_batches >= 1,
              "trainer: eval_every, save_every, log_every, keep_last must be >= 0 and eval_batches >= 1");

  // Context against the data, with a message naming both (the loader's own
  // check would name neither the option nor the remedy).
  const int64_t train_tokens = count_tokens(o.train_inputs);
  TORCH_CHECK(train_tokens >= o.context + 1, "context ", o.context, " is longer than the data allows: a window needs ",
              o.context + 1, " tokens, and the training data (", describe(o.train_inputs), ") has ", train_tokens,
              " tokens; use a context of at most ", std::max<int64_t>(0, train_tokens - 1), " or more data");
  const int64_t windows = (train_tokens - 1) / o.context;
  TORCH_CHECK(windows >= o.micro_batch, "micro-batch ", o.micro_batch, " needs ", o.micro_batch,
              " windows of context ", o.context, ", but the training data has ", train_tokens, " tokens (", windows,
              " windows); use a smaller batch or context");
  if (!o.eval_inputs.empty()) {
    const int64_t eval_tokens = count_tokens(o.eval_inputs);
    if (eval_tokens < o.context + 1) {
      fmt::print(stderr, "trainer: warning: the eval data has {} tokens, fewer than one window of context {} + 1; "
                         "evaluation is off\n", eval_tokens, o.context);
      options_.eval_inputs.clear();
    }
  }

  io::make_dirs(o.out_dir);
  // Temporary checkpoint directories of processes that died while saving.
  for (const auto& name : fs::list_dir(o.out_dir)) {
    if (name.rfind(".tmp-checkpoint-", 0) == 0) fs::remove_tree(io::join(o.out_dir, name));
  }
  torch::manual_seed(o.seed);
  if (torch::cuda::is_available()) torch::cuda::manual_seed_all(o.seed);

  data::LoaderOptions lo;
  lo.inputs = o.train_inputs;
  lo.context_length = o.context;
  lo.batch_size = o.micro_batch;
  lo.seed = o.seed;
  lo.shuffle = true;
  if (model_.device().is_cuda()) lo.device = model_.device();
  else lo.pin_memory = false;
  loader_ = std::make_unique<data::StreamingContextDataLoader>(lo);

  model_.for_training(o.training);
  model_.train();
  make_optimizer();
}

Trainer::~Trainer() = default;

int64_t Trainer::train_tokens() const { return loader_->num_tokens(); }

void Trainer::make_optimizer() {
  const auto opts = optim::AdamWOptions(options_.lr)
                        .beta1(options_.beta1)
                        .beta2(options_.beta2)
                        .eps(options_.eps)
                        .weight_decay(options_.weight_decay);
  if (options_.optimizer == "adamw8bit") optimizer_ = std::make_unique<optim::AdamW8bit>(model_.named_parameters(), opts);
  else optimizer_ = std::make_unique<optim::AdamW>(model_.named_parameters(), opts);
}

StepMetrics Trainer::train_step() {
  const auto t0 = Clock::now();
  model_.train();
  // All micro-batches first: their target counts set each one's weight.
  std::vector<data::Batch> batches;
  batches.reserve(size_t(options_.grad_accum));
  for (int64_t i = 0; i < options_.grad_accum; ++i) batches.push_back(loader_->next());
  std::vector<std::pair<torch::Tensor, torch::Tensor>> micro;
  for (const auto& b : batches) micro.emplace_back(b.input_ids, b.targets);
  // PSA layers (if any): the Gumbel temperature anneals linearly over the run
  // (a function of the step, so a resumed run continues it exactly).
  model_.set_psa_temperature(options_.psa_tau_start + (options_.psa_tau_end - options_.psa_tau_start) *
                                                          double(step_) / double(std::max<int64_t>(1, options_.steps)));
  const torch::Tensor loss_sum = accumulate_gradients(model_, micro);
  // Global gradient norm in fp32, then clipping by one scale factor (no sync
  // until the norm is read for the log).
  std::vector<torch::Tensor> grads, norms;
  for (const auto& [name, p] : model_.named_parameters()) {
    if (p.grad().defined()) {
      grads.push_back(p.grad());
      norms.push_back(p.grad().to(torch::kFloat).norm());
    }
  }
  torch::Tensor grad_norm = norms.empty() ? torch::zeros({}) : torch::stack(norms).norm();
  if (options_.clip_norm > 0 && !grads.empty()) {
    const auto scale = (options_.clip_norm / (grad_norm + 1e-6)).clamp_max(1.0);
    for (auto& g : grads) g.mul_(scale.to(g.scalar_type()));
  }
  const double lr = learning_rate(options_.schedule, options_.lr, step_, options_.warmup, options_.steps,
                                  options_.min_lr_ratio);
  optimizer_->set_lr(lr);
  optimizer_->step();
  optimizer_->zero_grad();
  model_.update_psa_controller();  // PSA route budgets (no-op without PSA layers)

  StepMetrics m;
  m.loss = loss_sum.item<double>();  // synchronises: the timing below covers the whole update
  m.grad_norm = grad_norm.item<double>();
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  const int64_t tokens = options_.grad_accum * options_.micro_batch * options_.context;
  step_ += 1;
  tokens_ += tokens;
  elapsed_s_ += seconds;
  m.step = step_;
  m.lr = lr;
  m.tokens = tokens_;
  m.tokens_per_s = double(tokens) / std::max(seconds, 1e-9);
  m.peak_memory_gib = peak_memory_gib(model_.device());
  m.elapsed_s = elapsed_s_;
  return m;
}

double Trainer::evaluate() {
  if (options_.eval_inputs.empty()) return std::nan("");
  data::LoaderOptions lo;
  lo.inputs = options_.eval_inputs;
  lo.context_length = options_.context;
  lo.shuffle = false;  // the same held-out windows at every evaluation
  lo.prefetch = 0;
  lo.pin_memory = false;
  if (model_.device().is_cuda()) lo.device = model_.device();
  // The loader wants a batch it can fill; the held-out windows may be fewer
  // than one micro-batch.
  const int64_t windows = (count_tokens(options_.eval_inputs) - 1) / options_.context;
  lo.batch_size = std::min(options_.micro_batch, windows);
  data::StreamingContextDataLoader eval_loader(lo);
  const int64_t batches = std::min(options_.eval_batches, eval_loader.steps_per_epoch());
  torch::NoGradGuard no_grad;
  model_.eval();
  double sum = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < batches; ++i) {
    const auto b = eval_loader.next();
    const int64_t n = (b.targets != -100).sum().item<int64_t>();
    if (n == 0) continue;
    sum += model_.loss(b.input_ids, b.targets).item<double>() * double(n);
    count += n;
  }
  model_.train();
  return count > 0 ? sum / double(count) : std::nan("");
}

std::string Trainer::save_checkpoint() {
  const std::string name = kCheckpointPrefix + std::to_string(step_);
  const std::string final_dir = io::join(options_.out_dir, name);
  const std::string tmp = io::join(options_.out_dir, ".tmp-" + name + "." + std::to_string(::getpid()));
  fs::remove_tree(tmp);
  io::make_dirs(tmp);
  model_.save_pretrained(tmp);
  optimizer_->save(io::join(tmp, kOptimizerFile));
  for (const auto& f : tokenizer_files(options_.tokenizer)) {
    fs::copy_file(f, io::join(tmp, f.substr(f.rfind('/') + 1)));
  }
  Json rng = Json::object();
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    rng["cpu"] = hex_of(gen.get_state());
  }
  if (torch::cuda::is_available()) {
    for (int64_t d = 0; d < int64_t(torch::cuda::device_count()); ++d) {
      auto gen = at::globalContext().defaultGenerator(c10::Device(c10::kCUDA, c10::DeviceIndex(d)));
      std::lock_guard<std::mutex> lock(gen.mutex());
      rng["cuda"][std::to_string(d)] = hex_of(gen.get_state());
    }
  }
  Json history = Json::array();
  for (const auto& m : history_) history.push_back(metrics_json(m));
  const Json state = {
      {"format", "unswag.trainer_state"},
      {"version", kStateVersion},
      {"step", step_},
      {"tokens_seen", tokens_},
      {"elapsed_s", elapsed_s_},
      {"loader", Json::parse(loader_->state().to_json())},
      {"rng", rng},
      {"schedule",
       {{"type", to_string(options_.schedule)},
        {"lr", options_.lr},
        {"warmup", options_.warmup},
        {"steps", options_.steps},
        {"min_lr_ratio", options_.min_lr_ratio}}},
      {"options",
       {{"context", options_.context},
        {"micro_batch", options_.micro_batch},
        {"grad_accum", options_.grad_accum},
        {"optimizer", options_.optimizer},
        {"clip_norm", options_.clip_norm},
        {"seed", options_.seed},
        {"dtype", c10::toString(model_.dtype())}}},
      {"log_history", history},
  };
  io::write_text_atomic(io::join(tmp, kStateFile), state.dump(1) + "\n");
  if (before_commit_hook) before_commit_hook(tmp);
  fs::commit_dir(tmp, final_dir);

  // Keep the newest keep_last checkpoints.
  if (options_.keep_last > 0) {
    std::vector<std::pair<int64_t, std::string>> found;
    for (const auto& n : fs::list_dir(options_.out_dir)) {
      const int64_t s = checkpoint_step(n);
      if (s >= 0 && fs::is_dir(io::join(options_.out_dir, n))) found.emplace_back(s, n);
    }
    std::sort(found.begin(), found.end());
    for (size_t i = 0; i + size_t(options_.keep_last) < found.size(); ++i) {
      fs::remove_tree(io::join(options_.out_dir, found[i].second));
    }
  }
  return final_dir;
}

void Trainer::resume(const std::string& checkpoint) {
  std::string dir = checkpoint;
  if (checkpoint == "latest") {
    dir = latest_checkpoint(options_.out_dir);
    TORCH_CHECK(!dir.empty(), "resume latest: no checkpoint-N directory with a ", kStateFile, " in ",
                options_.out_dir);
  }
  const std::string state_path = io::join(dir, kStateFile);
  TORCH_CHECK(io::exists(state_path), "resume: ", dir, " is not a trainer checkpoint (no ", kStateFile, ")");
  Json state;
  try {
    state = Json::parse(fs::read_file(state_path));
  } catch (const Json::exception& e) {
    TORCH_CHECK(false, "resume: ", state_path, " is not valid JSON (", e.what(), ")");
  }
  TORCH_CHECK(state.value("format", "") == "unswag.trainer_state" && state.value("version", 0) == kStateVersion,
              "resume: ", state_path, " is not an unswag.trainer_state version ", kStateVersion);
  const Json& saved = state.at("options");
  TORCH_CHECK(saved.at("context").get<int64_t>() == options_.context, "resume: ", dir, " was saved with context ",
              saved.at("context").get<int64_t>(), ", this run has context ", options_.context);
  TORCH_CHECK(saved.at("micro_batch").get<int64_t>() == options_.micro_batch, "resume: ", dir,
              " was saved with micro-batch ", saved.at("micro_batch").get<int64_t>(), ", this run has ",
              options_.micro_batch);

  // The model and the optimizer over its new parameters.
  model_ = Model::from_pretrained(dir, {model_.device(), model_.dtype()});
  model_.for_training(options_.training);
  model_.train();
  make_optimizer();
  optimizer_->load(io::join(dir, kOptimizerFile));
  loader_->load_state(data::LoaderState::from_json(state.at("loader").dump()));

  const Json& rng = state.at("rng");
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(bytes_of(rng.at("cpu").get<std::string>(), state_path));
  }
  if (rng.contains("cuda") && torch::cuda::is_available()) {
    for (const auto& [index, hex] : rng.at("cuda").items()) {
      const int64_t d = std::stoll(index);
      if (d >= int64_t(torch::cuda::device_count())) continue;
      auto gen = at::globalContext().defaultGenerator(c10::Device(c10::kCUDA, c10::DeviceIndex(d)));
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(bytes_of(hex.get<std::string>(), state_path));
    }
  }
  step_ = state.at("step").get<int64_t>();
  tokens_ = state.at("tokens_seen").get<int64_t>();
  elapsed_s_ = state.at("elapsed_s").get<double>();
  history_.clear();
  for (const auto& j : state.at("log_history")) history_.push_back(metrics_from_json(j));
  // metrics.jsonl continues from the checkpoint: lines the interrupted run
  // wrote after it are dropped (they will be computed again).
  write_metrics_file();
}

void Trainer::write_metrics_file() const {
  std::string text;
  for (const auto& m : history_) text += metrics_json(m).dump() + "\n";
  io::write_text_atomic(io::join(options_.out_dir, "metrics.jsonl"), text);
}

void Trainer::append_metrics(const StepMetrics& m) const {
  std::ofstream out(io::join(options_.out_dir, "metrics.jsonl"), std::ios::app);
  out << metrics_json(m).dump() << "\n";
}

void Trainer::write_plot() const {
  io::write_text_atomic(io::join(options_.out_dir, "loss.svg"),
                        loss_curve_svg(history_, fmt::format("{} ({} parameters)", options_.out_dir,
                                                             model_.num_parameters())));
}

TrainResult Trainer::fit() {
  SigintScope sigint(options_.handle_sigint);
  const std::string memory_kind = model_.device().is_cuda() ? "gpu" : "rss";
  Progress progress(options_.progress, options_.steps, step_);
  if (step_ == 0) write_metrics_file();  // a fresh run starts an empty metrics file
  TrainResult result;
  std::string last_saved;
  const int64_t first_step = step_;
  while (step_ < options_.steps) {
    StepMetrics m = train_step();
    const bool last = step_ == options_.steps;
    const bool eval_now = !options_.eval_inputs.empty() &&
                          ((options_.eval_every > 0 && step_ % options_.eval_every == 0) || last);
    if (eval_now) m.eval_loss = evaluate();
    const bool log_now = eval_now || last || (options_.log_every > 0 && step_ % options_.log_every == 0);
    if (log_now) {
      history_.push_back(m);
      append_metrics(m);
    }
    progress.update(m, memory_kind, log_now);
    if (m.eval_loss) progress.message(fmt::format("eval at step {}: loss {:.4f}", step_, *m.eval_loss));
    const bool interrupted = g_interrupted.load() != 0 && options_.handle_sigint;
    if ((options_.save_every > 0 && step_ % options_.save_every == 0) || interrupted) {
      last_saved = save_checkpoint();
      progress.message("saved " + last_saved);
    }
    if (interrupted) {
      progress.message(fmt::format("interrupted at step {}: resume with --resume {}", step_, last_saved));
      result.interrupted = true;
      break;
    }
    if (options_.stop_after > 0 && step_ - first_step >= options_.stop_after && step_ < options_.steps) {
      if (last_saved.empty() || checkpoint_step(last_saved.substr(last_saved.rfind('/') + 1)) != step_) {
        last_saved = save_checkpoint();
      }
      progress.message(fmt::format("paused at step {} (stop_after {}): resume with --resume {}", step_,
                                   options_.stop_after, last_saved));
      result.paused = true;
      break;
    }
  }
  if (!result.interrupted && !result.paused && options_.save_final) {
    if (last_saved.empty() || checkpoint_step(last_saved.substr(last_saved.rfind('/') + 1)) != step_) {
      last_saved = save_checkpoint();
    }
    const std::string final_dir = io::join(options_.out_dir, "final");
    const std::string tmp = io::join(options_.out_dir, ".tmp-final." + std::to_string(::getpid()));
    fs::remove_tree(tmp);
    model_.save_pretrained(tmp);
    for (const auto& f : tokenizer_files(options_.tokenizer)) fs::copy_file(f, io::join(tmp, f.substr(f.rfind('/') + 1)));
    fs::commit_dir(tmp, final_dir);
  }
  if (!history_.empty()) write_plot();
  result.step = step_;
  result.last_checkpoint = last_saved;
  result.history = history_;
  return result;
}

std::string latest_checkpoint(const std::string& out_dir) {
  int64_t best = -1;
  std::string found;
  for (const auto& name : fs::list_dir(out_dir)) {
    const int64_t s = checkpoint_step(name);
    const std::string dir = io::join(out_dir, name);
    if (s > best && io::exists(io::join(dir, kStateFile))) {
      best = s;
      found = dir;
    }
  }
  return found;
}

}  // namespace unswag::train
