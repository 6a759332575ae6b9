// UnSwag's AdamW optimizers: AdamW8bit, whose moments are kept in 8 bits with
// block-wise absmax scaling (first moment on the signed dynamic map, second
// moment on the unsigned one: about 2.03 bytes of state per parameter at block
// size 256), and AdamW, its twin with fp32 moments (8 bytes per parameter).
// Both step with one fused CPU or CUDA kernel per parameter tensor, keep their
// state by parameter name, and save/load it as safetensors.
//
// The update (decoupled weight decay, as torch.optim.AdamW), per element, fp32:
//   p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
//   p <- p - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)
// AdamW8bit dequantizes m and v before and requantizes them after, in the same
// kernel; the parameter is updated from the unquantized values.
#pragma once

#include <torch/arg.h>
#include <torch/types.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace unswag::optim {

using NamedParameters = std::vector<std::pair<std::string, torch::Tensor>>;

struct AdamWOptions {
  AdamWOptions() = default;
  explicit AdamWOptions(double lr) : lr_(lr) {}
  TORCH_ARG(double, lr) = 1e-3;  // >= 0
  TORCH_ARG(double, beta1) = 0.9;  // in [0, 1)
  TORCH_ARG(double, beta2) = 0.999;  // in [0, 1)
  TORCH_ARG(double, eps) = 1e-8;  // >= 0
  TORCH_ARG(double, weight_decay) = 1e-2;  // >= 0, decoupled
  // AdamW8bit only (AdamW ignores them):
  TORCH_ARG(int64_t, block_size) = 256;  // elements per absmax scale: 256 or 2048
  // Tensors with fewer elements keep fp32 state (their 8-bit saving is nil).
  TORCH_ARG(int64_t, min_8bit_size) = 4096;
  // Parameters whose name matches one of these shell-style globs (fnmatch,
  // e.g. "*embed_tokens*") keep fp32 state: the "stable embedding" practice.
  TORCH_ARG(std::vector<std::string>, fp32_state_patterns) = {};
};

// Everything needed to resume: tensors by name and string metadata (what a
// safetensors file holds). Tensor keys are "<parameter name>:<field>", fields
// step (int64 scalar), exp_avg / exp_avg_sq (fp32 state, parameter's shape) or
// state1 / state2 (uint8 codes, flat) and absmax1 / absmax2 (fp32 per block);
// "map:signed" / "map:unsigned" hold the 256 codes of each map. Metadata: the
// format, block_size and the options (lr, betas, eps, weight_decay, ...).
struct OptimizerState {
  std::map<std::string, torch::Tensor> tensors;
  std::map<std::string, std::string> metadata;
};

class AdamW {
 public:
  // `params`: e.g. module->named_parameters().pairs(). Names must be unique;
  // parameters must be float32 or bfloat16 (their gradients too), contiguous,
  // on CPU or CUDA. State is allocated at a parameter's first step.
  explicit AdamW(NamedParameters params, AdamWOptions options = {});
  virtual ~AdamW() = default;

  // One step for every parameter that has a gradient (the others are skipped
  // and their step count does not advance).
  void step();
  // Drops the gradients (set_to_none) or zeroes them.
  void zero_grad(bool set_to_none = true);
  void set_lr(double lr);
  const AdamWOptions& options() const { return options_; }

  OptimizerState state_dict() const;
  // Restores the state of every parameter named in `state` (an unknown name
  // is an error; parameters without saved state start fresh) and the saved
  // lr / betas / eps / weight_decay. State saved with another block size, with
  // other maps, or as fp32 by the other class is converted (dequantized, then
  // requantized: lossy, with a warning); an exact match is copied bit for bit.
  void load_state_dict(const OptimizerState& state);
  // Through unswag::safetensors (written to a temporary file, then renamed).
  void save(const std::string& path) const;
  void load(const std::string& path);

  // Introspection (tests, benchmarks).
  bool has_8bit_state(const std::string& name) const;  // false before its first step
  int64_t step_count(const std::string& name) const;
  int64_t state_bytes() const;  // bytes of all state tensors (maps included)
  // A parameter's moments in fp32, the parameter's shape (dequantized for 8-bit
  // state); undefined tensors before its first step.
  std::pair<torch::Tensor, torch::Tensor> moments(const std::string& name) const;

 protected:
  AdamW(NamedParameters params, AdamWOptions options, bool eight_bit);

 private:
  struct Slot {
    std::string name;
    torch::Tensor param;
    bool wants_8bit = false;  // decided at construction from numel, patterns
    int64_t step = 0;
    torch::Tensor exp_avg, exp_avg_sq;               // fp32 state
    torch::Tensor state1, state2, absmax1, absmax2;  // 8-bit state
    bool has_state() const { return step > 0; }
  };
  void init_state(Slot& slot);
  const Slot& slot(const std::string& name) const;
  Slot& slot(const std::string& name);
  // The maps (map1 signed, map2 unsigned) and their quantize tables
  // (kernels/optim.h: quantize_lookup) on `device`, made once per device.
  struct DeviceMaps {
    torch::Tensor map1, map2, qtable1, qtable2;
    int advance1 = 0, advance2 = 0;
  };
  const DeviceMaps& maps_on(const torch::Device& device) const;

  const char* class_name() const { return eight_bit_ ? "AdamW8bit" : "AdamW"; }

  bool eight_bit_;
  AdamWOptions options_;
  std::vector<Slot> slots_;
  std::map<std::string, size_t> index_;
  mutable std::map<std::string, DeviceMaps> maps_;
};

class AdamW8bit : public AdamW {
 public:
  explicit AdamW8bit(NamedParameters params, AdamWOptions options = {});
};

// --- the functional layer (also torch.ops.unswag.*) -------------------------

// The 256 ascending fp32 codes of the signed (first moment) or unsigned
// (second moment) dynamic map, on CPU.
torch::Tensor dynamic_map(bool is_signed);
// Block-wise absmax quantization of x (fp32, any shape) on `map`: codes
// (uint8, [numel]) and absmax (fp32, [ceil(numel / block_size)]).
std::tuple<torch::Tensor, torch::Tensor> quantize_blockwise(const torch::Tensor& x, const torch::Tensor& map,
                                                            int64_t block_size);
// Its inverse: fp32 [numel].
torch::Tensor dequantize_blockwise(const torch::Tensor& codes, const torch::Tensor& absmax, const torch::Tensor& map,
                                   int64_t block_size);
// One in-place AdamW step of `param` with 8-bit state (step = t >= 1, counted
// with this step).
void adamw8bit_step_(torch::Tensor& param, const torch::Tensor& grad, torch::Tensor& state1, torch::Tensor& state2,
                     torch::Tensor& absmax1, torch::Tensor& absmax2, const torch::Tensor& map1,
                     const torch::Tensor& map2, double lr, double beta1, double beta2, double eps,
                     double weight_decay, int64_t step, int64_t block_size);
// The same with fp32 moments.
void adamw_step_(torch::Tensor& param, const torch::Tensor& grad, torch::Tensor& exp_avg, torch::Tensor& exp_avg_sq,
                 double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step);

}  // namespace unswag::optim
