// Timing of whole training steps (see unswag/train/bench.h).
#include "unswag/train/bench.h"

#include <c10/util/Exception.h>
#include <fmt/core.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <memory>

#include "unswag/optim/adamw.h"

#ifdef UNSWAG_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace unswag::train {

namespace {

double median_of(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

std::string StepBenchResult::to_json() const {
  return fmt::format(
      "{{\"oom\": false, \"context\": {}, \"batch\": {}, \"step_ms\": {:.2f}, \"tokens_per_s\": {:.1f}, "
      "\"peak_allocated_gib\": {:.3f}, \"peak_reserved_gib\": {:.3f}, \"loss\": {:.4f}, \"params\": {}, "
      "\"optimizer_state_gib\": {:.3f}, \"forward_ms\": {:.2f}, \"backward_ms\": {:.2f}, \"optimizer_ms\": {:.2f}, "
      "\"device\": \"{}\"}}",
      context, batch, step_ms, tokens_per_s, peak_allocated_gib, peak_reserved_gib, loss, params, optimizer_state_gib,
      forward_ms, backward_ms, optimizer_ms, device);
}

StepBenchResult bench_train_steps(Model& model, const StepBenchOptions& o) {
  TORCH_CHECK(o.context >= 1 && o.batch >= 1, "bench: context and batch must be >= 1, got ", o.context, " and ",
              o.batch);
  TORCH_CHECK(o.steps >= 1 && o.warmup >= 0, "bench: steps must be >= 1 and warmup >= 0, got ", o.steps, " and ",
              o.warmup);
  TORCH_CHECK(o.optimizer == "adamw8bit" || o.optimizer == "adamw", "bench: optimizer must be adamw8bit or adamw, "
              "got \"", o.optimizer, "\"");
  const torch::Device device = model.device();
  const bool cuda = device.is_cuda();
  std::unique_ptr<optim::AdamW> opt;
  const auto opts = optim::AdamWOptions(1e-5).weight_decay(0.0);
  if (o.optimizer == "adamw8bit") opt = std::make_unique<optim::AdamW8bit>(model.named_parameters(), opts);
  else opt = std::make_unique<optim::AdamW>(model.named_parameters(), opts);

  auto gen = torch::make_generator<torch::CPUGeneratorImpl>(o.seed);
  const auto ids = torch::randint(0, model.config().vocab_size, {o.batch, o.context + 1}, gen,
                                  torch::TensorOptions().dtype(torch::kLong)).to(device);
  const auto input = ids.narrow(1, 0, o.context), targets = ids.narrow(1, 1, o.context).contiguous();
  std::vector<double> ms, fwd_ms, bwd_ms, opt_ms;
  StepBenchResult r;
  for (int64_t i = 0; i < o.warmup + o.steps; ++i) {
#ifdef UNSWAG_WITH_CUDA
    if (cuda && i == o.warmup) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index() < 0 ? 0 : device.index());
#endif
    double part[3] = {0, 0, 0}, step_ms = 0;
#ifdef UNSWAG_WITH_CUDA
    // Events between the parts: they do not synchronise inside the step.
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
    r.loss = loss.item<double>();
    if (i >= o.warmup) {
      ms.push_back(step_ms);
      fwd_ms.push_back(part[0]);
      bwd_ms.push_back(part[1]);
      opt_ms.push_back(part[2]);
    }
  }
  r.context = o.context;
  r.batch = o.batch;
  r.params = model.num_parameters();
  r.step_ms = median_of(ms);
  r.forward_ms = median_of(fwd_ms);
  r.backward_ms = median_of(bwd_ms);
  r.optimizer_ms = median_of(opt_ms);
  r.tokens_per_s = double(o.batch * o.context) / (r.step_ms / 1000.0);
  r.optimizer_state_gib = double(opt->state_bytes()) / (1 << 30);
  r.device = cuda ? "cuda" : "cpu";
#ifdef UNSWAG_WITH_CUDA
  if (cuda) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index());
    const auto all = size_t(c10::CachingAllocator::StatType::AGGREGATE);
    r.peak_allocated_gib = double(stats.allocated_bytes[all].peak) / (1 << 30);
    r.peak_reserved_gib = double(stats.reserved_bytes[all].peak) / (1 << 30);
  }
#endif
  return r;
}

}  // namespace unswag::train
