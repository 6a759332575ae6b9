// One training step (forward, backward, optimizer) of a UnSwag model at one
// context length: median step time with CUDA events after warm-up, peak GPU
// memory from the caching allocator, printed as one JSON line (or
// {"oom": true}). bench/bench_model.py runs it per context beside the
// transformers baseline.
//
//   bench_train_step --context 16384 [--config 1b|FIXTURE_DIR] [--recompute none|selective|full]
//                    [--mlp compressed|recompute|none] [--mlp-bits 16|8] [--optimizer adamw8bit|adamw]
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <memory>

#include "unswag/model.h"
#include "unswag/optim/adamw.h"

#ifdef UNSWAG_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

struct Peak {
  double allocated_gib = 0, reserved_gib = 0;
};

void reset_peak() {
#ifdef UNSWAG_WITH_CUDA
  c10::cuda::CUDACachingAllocator::resetPeakStats(0);
#endif
}

Peak read_peak() {
  Peak p;
#ifdef UNSWAG_WITH_CUDA
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(0);
  const auto all = size_t(c10::CachingAllocator::StatType::AGGREGATE);
  p.allocated_gib = double(stats.allocated_bytes[all].peak) / (1 << 30);
  p.reserved_gib = double(stats.reserved_bytes[all].peak) / (1 << 30);
#endif
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"one UnSwag training step at a context length (JSON line out)"};
  int64_t context = 4096, warmup = 2, steps = 3, batch = 1;
  std::string config = "1b", recompute = "none", mlp = "compressed", optimizer = "adamw8bit", attention = "auto";
  int64_t mlp_bits = 16;
  app.add_option("--context", context, "tokens per sequence")->required();
  app.add_option("--batch", batch, "sequences per step");
  app.add_option("--config", config, "1b (Llama-3.2-1B shape, random weights) or a checkpoint directory");
  app.add_option("--recompute", recompute, "none | selective | full");
  app.add_option("--mlp", mlp, "compressed | recompute | none");
  app.add_option("--mlp-bits", mlp_bits, "16 | 8");
  app.add_option("--attention", attention, "auto | sdpa | chunked | eager");
  app.add_option("--optimizer", optimizer, "adamw8bit | adamw (fp32 state)");
  app.add_option("--warmup", warmup);
  app.add_option("--steps", steps);
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
    std::unique_ptr<unswag::optim::AdamW> opt;
    const auto opts = unswag::optim::AdamWOptions(1e-5).weight_decay(0.0);
    if (optimizer == "adamw8bit") opt = std::make_unique<unswag::optim::AdamW8bit>(model.named_parameters(), opts);
    else opt = std::make_unique<unswag::optim::AdamW>(model.named_parameters(), opts);

    const int64_t vocab = model.config().vocab_size;
    const auto ids = torch::randint(0, vocab, {batch, context + 1}, torch::TensorOptions().device(device).dtype(torch::kLong));
    const auto input = ids.narrow(1, 0, context), targets = ids.narrow(1, 1, context).contiguous();
    // Per step: total, and the forward / backward / optimizer parts (CUDA
    // events between the parts; they do not synchronise inside the step).
    std::vector<double> ms, fwd_ms, bwd_ms, opt_ms;
    double last_loss = 0;
    for (int64_t i = 0; i < warmup + steps; ++i) {
      if (i == warmup) reset_peak();
      double part[3] = {0, 0, 0}, step_ms = 0;
#ifdef UNSWAG_WITH_CUDA
      at::cuda::CUDAEvent ev[4] = {at::cuda::CUDAEvent(cudaEventDefault), at::cuda::CUDAEvent(cudaEventDefault),
                                   at::cuda::CUDAEvent(cudaEventDefault), at::cuda::CUDAEvent(cudaEventDefault)};
      if (cuda) ev[0].record();
#endif
      const auto t0 = std::chrono::steady_clock::now();
      auto loss = model.loss(input, targets);
#ifdef UNSWAG_WITH_CUDA
      if (cuda) ev[1].record();
#endif
      loss.backward();
#ifdef UNSWAG_WITH_CUDA
      if (cuda) ev[2].record();
#endif
      opt->step();
      opt->zero_grad();
#ifdef UNSWAG_WITH_CUDA
      if (cuda) {
        ev[3].record();
        ev[3].synchronize();
        for (int k = 0; k < 3; ++k) part[k] = ev[k].elapsed_time(ev[k + 1]);
        step_ms = ev[0].elapsed_time(ev[3]);
      }
#endif
      if (!cuda) step_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      last_loss = loss.item<double>();
      if (i >= warmup) {
        ms.push_back(step_ms);
        fwd_ms.push_back(part[0]);
        bwd_ms.push_back(part[1]);
        opt_ms.push_back(part[2]);
      }
    }
    auto median_of = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    std::sort(ms.begin(), ms.end());
    const double median = ms[ms.size() / 2];
    const Peak peak = read_peak();
    fmt::print(
        "{{\"oom\": false, \"context\": {}, \"batch\": {}, \"step_ms\": {:.2f}, \"tokens_per_s\": {:.1f}, "
        "\"peak_allocated_gib\": {:.3f}, \"peak_reserved_gib\": {:.3f}, \"loss\": {:.4f}, \"params\": {}, "
        "\"optimizer_state_gib\": {:.3f}, \"forward_ms\": {:.2f}, \"backward_ms\": {:.2f}, \"optimizer_ms\": {:.2f}, "
        "\"device\": \"{}\"}}\n",
        context, batch, median, double(batch * context) / (median / 1000.0), peak.allocated_gib, peak.reserved_gib,
        last_loss, model.num_parameters(), double(opt->state_bytes()) / (1 << 30), median_of(fwd_ms), median_of(bwd_ms),
        median_of(opt_ms), cuda ? "cuda" : "cpu");
  } catch (const c10::OutOfMemoryError&) {
    fmt::print("{{\"oom\": true, \"context\": {}}}\n", context);
    return 0;
  }
  return 0;
}
