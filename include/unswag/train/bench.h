// Timing of whole training steps (forward, backward, optimizer) of a model at
// one context length: median step time after warm-up (CUDA events on a GPU,
// wall clock on CPU), the forward / backward / optimizer parts, and peak GPU
// memory from the caching allocator. Shared by `unswag bench` and
// bench/bench_train_step.
#pragma once

#include <cstdint>
#include <string>

#include "unswag/model.h"

namespace unswag::train {

struct StepBenchOptions {
  int64_t context = 4096;
  int64_t batch = 1;
  int64_t warmup = 2, steps = 3;
  std::string optimizer = "adamw8bit";  // adamw8bit | adamw
  uint64_t seed = 0;                    // of the random token ids
};

struct StepBenchResult {
  int64_t context = 0, batch = 0, params = 0;
  double step_ms = 0, forward_ms = 0, backward_ms = 0, optimizer_ms = 0;  // medians
  double tokens_per_s = 0;
  double peak_allocated_gib = 0, peak_reserved_gib = 0;  // CUDA only (0 on CPU)
  double optimizer_state_gib = 0;
  double loss = 0;  // of the last step
  std::string device;
  // One JSON object (bench/bench_model.py reads these keys).
  std::string to_json() const;
};

// Trains `model` (already for_training()) for warmup + steps steps on random
// token ids and measures the last `steps`. The forward/backward/optimizer
// parts are only measured on CUDA (events); on CPU they are 0.
StepBenchResult bench_train_steps(Model& model, const StepBenchOptions& options);

}  // namespace unswag::train
