// unswag::optim::AdamW8bit and its fp32 twin AdamW (include/unswag/optim/adamw.h):
// argument checks, the functional ops on top of the kernels (src/kernels/optim.h),
// their torch.ops.unswag registration, the optimizer classes with their state
// kept by parameter name, and state save/load through unswag::safetensors.
#include "unswag/optim/adamw.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <fmt/core.h>
#include <fnmatch.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <list>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>

#include "kernels/optim.h"
#include "ops/common.h"
#include "unswag/safetensors.h"

namespace unswag::optim {
namespace {

constexpr const char* kFormatKey = "format";
constexpr const char* kFormatVersion = "1";
constexpr const char* kMapSignedKey = "map:signed";
constexpr const char* kMapUnsignedKey = "map:unsigned";

void check_hyperparameters(double lr, double beta1, double beta2, double eps, double weight_decay, const char* who) {
  TORCH_CHECK(std::isfinite(lr) && lr >= 0, who, ": 'lr' must be a finite number >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0 && beta1 < 1, who, ": 'beta1' must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0 && beta2 < 1, who, ": 'beta2' must be in [0, 1), got ", beta2);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, who, ": 'eps' must be a finite number >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, who,
              ": 'weight_decay' must be a finite number >= 0, got ", weight_decay);
}

void check_block_size(int64_t block_size, const char* who) {
  TORCH_CHECK(block_size == kernels::kMinBlockSize || block_size == kernels::kMaxBlockSize, who,
              ": 'block_size' must be 256 or 2048, got ", block_size);
}

kernels::ParamDType param_dtype(const at::Tensor& param, const char* who) {
  TORCH_CHECK(param.defined(), who, ": argument 'param' is undefined");
  TORCH_CHECK(param.scalar_type() == at::kFloat || param.scalar_type() == at::kBFloat16, who,
              ": argument 'param' must be float32 or bfloat16, got ", param.scalar_type());
  TORCH_CHECK(param.device().is_cpu() || param.device().is_cuda(), who,
              ": argument 'param' must be on CPU or CUDA, got ", param.device());
  TORCH_CHECK(param.is_contiguous(), who, ": argument 'param' must be contiguous (it is updated in place)");
  return param.scalar_type() == at::kBFloat16 ? kernels::ParamDType::kBFloat16 : kernels::ParamDType::kFloat32;
}

// The gradient, contiguous, after checks against the parameter.
at::Tensor checked_grad(const at::Tensor& grad, const at::Tensor& param, const char* who) {
  TORCH_CHECK(grad.defined(), who, ": argument 'grad' is undefined");
  TORCH_CHECK(grad.layout() == at::kStrided, who, ": argument 'grad' must be dense, got layout ", grad.layout());
  ops::check_same(grad, param, who, "grad", "param", false);
  TORCH_CHECK(grad.numel() == param.numel(), who, ": argument 'grad' must have ", param.numel(),
              " elements like 'param', got ", grad.numel());
  return grad.contiguous();
}

// A contiguous state tensor of `dtype` with `numel` elements on param's device.
void check_state(const at::Tensor& t, const at::Tensor& param, at::ScalarType dtype, int64_t numel, const char* who,
                 const char* arg) {
  TORCH_CHECK(t.defined(), who, ": argument '", arg, "' is undefined");
  TORCH_CHECK(t.scalar_type() == dtype, who, ": argument '", arg, "' must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == param.device(), who, ": argument '", arg, "' must be on ", param.device(), " like 'param', got ",
              t.device());
  TORCH_CHECK(t.numel() == numel, who, ": argument '", arg, "' must have ", numel, " elements, got ", t.numel());
  TORCH_CHECK(t.is_contiguous(), who, ": argument '", arg, "' must be contiguous");
}

void check_map(const at::Tensor& map, const at::Device& device, const char* who, const char* arg) {
  TORCH_CHECK(map.defined(), who, ": argument '", arg, "' is undefined");
  TORCH_CHECK(map.scalar_type() == at::kFloat && map.dim() == 1 && map.numel() == kernels::kMapSize, who,
              ": argument '", arg, "' must be a float32 tensor of ", kernels::kMapSize, " codes, got ",
              map.scalar_type(), " of shape ", map.sizes());
  TORCH_CHECK(map.device() == device, who, ": argument '", arg, "' must be on ", device, ", got ", map.device());
  TORCH_CHECK(map.is_contiguous(), who, ": argument '", arg, "' must be contiguous");
}

// Ascending, finite, within [-1, 1]: what quantize_nearest's search assumes.
// (Checked where maps enter: construction, loading, and the functional ops,
// which build a quantize table from their map on every call.)
void check_map_values(const at::Tensor& map, const std::string& what) {
  const at::Tensor m = map.to(at::kCPU, at::kFloat).contiguous();
  TORCH_CHECK(m.numel() == kernels::kMapSize, what, " must hold ", kernels::kMapSize, " codes, got ", m.numel());
  const float* c = m.data_ptr<float>();
  for (int i = 0; i < kernels::kMapSize; ++i) {
    TORCH_CHECK(std::isfinite(c[i]) && c[i] >= -1.f && c[i] <= 1.f, what, ": code ", i, " is ", c[i],
                ", expected a finite value in [-1, 1]");
    TORCH_CHECK(i == 0 || c[i] > c[i - 1], what, ": codes must be strictly ascending, but code ", i, " (", c[i],
                ") <= code ", i - 1, " (", c[i - 1], ")");
  }
}

std::string format_double(double x) { return fmt::format("{}", x); }  // shortest round-trip form

double parse_double(const std::map<std::string, std::string>& meta, const std::string& key, double fallback,
                    const char* who) {
  const auto it = meta.find(key);
  if (it == meta.end()) return fallback;
  try {
    size_t used = 0;
    const double v = std::stod(it->second, &used);
    if (used == it->second.size()) return v;
  } catch (const std::exception&) {
  }
  TORCH_CHECK(false, who, ": metadata '", key, "' must be a number, got '", it->second, "'");
}

bool matches_any(const std::string& name, const std::vector<std::string>& patterns) {
  for (const auto& pattern : patterns)
    if (::fnmatch(pattern.c_str(), name.c_str(), 0) == 0) return true;
  return false;
}

// A map's quantize table (kernels/optim.h: quantize_lookup) on the map's
// device. Built on the host from the map's values: the optimizer makes it once
// per device; the functional ops, which take any map, once per call.
struct QuantTable {
  at::Tensor table;  // uint8 [kQuantTableBytes]
  int advance = 0;
};
QuantTable quant_table(const at::Tensor& map) {
  const at::Tensor host = map.to(at::kCPU).contiguous();
  at::Tensor table = at::empty({kernels::kQuantTableBytes}, at::kByte);
  const int advance = kernels::build_quantize_table(host.data_ptr<float>(), table.data_ptr<uint8_t>());
  return {table.to(map.device()), advance};
}

// The functional ops take any map, and building its table needs the map's
// values on the host (a device sync). A small cache avoids that on every call:
// keyed by the map tensor itself (held, so its memory cannot be reused by
// another tensor while cached) and its version counter, which every in-place
// change bumps. Misses check the map's values, then build.
QuantTable cached_quant_table(const at::Tensor& map, const std::string& what) {
  struct Entry {
    at::Tensor map;
    int64_t version;
    QuantTable table;
  };
  static std::mutex mutex;
  static std::list<Entry> cache;  // most recent first
  constexpr size_t kEntries = 8;
  const bool cacheable = !map.is_inference();  // inference tensors have no version counter
  std::lock_guard<std::mutex> lock(mutex);
  if (cacheable) {
    for (auto it = cache.begin(); it != cache.end(); ++it) {
      if (it->map.is_same(map) && it->version == map._version()) {
        cache.splice(cache.begin(), cache, it);
        return it->table;
      }
    }
  }
  check_map_values(map, what);
  QuantTable table = quant_table(map);
  if (cacheable) {
    cache.push_front({map, map._version(), table});
    if (cache.size() > kEntries) cache.pop_back();
  }
  return table;
}

// The kernels' view of a block-wise quantized tensor (checked by the caller).
kernels::BlockwiseParams blockwise_params(const at::Tensor& x, const at::Tensor& q, const at::Tensor& absmax,
                                          const at::Tensor& map, int64_t block_size, const QuantTable* table = nullptr) {
  kernels::BlockwiseParams p;
  p.x = x.data_ptr<float>();
  p.q = q.data_ptr<uint8_t>();
  p.absmax = absmax.data_ptr<float>();
  p.map = map.data_ptr<float>();
  if (table != nullptr) {
    p.qtable = table->table.data_ptr<uint8_t>();
    p.advance = table->advance;
  }
  p.n = x.numel();
  p.block_size = block_size;
  return p;
}

}  // namespace

// --- the functional layer --------------------------------------------------

torch::Tensor dynamic_map(bool is_signed) {
  at::Tensor map = at::empty({kernels::kMapSize}, at::kFloat);
  kernels::build_dynamic_map(is_signed, map.data_ptr<float>());
  return map;
}

std::tuple<torch::Tensor, torch::Tensor> quantize_blockwise(const torch::Tensor& x_in, const torch::Tensor& map,
                                                            int64_t block_size) {
  const char* who = "unswag::quantize_blockwise";
  TORCH_CHECK(x_in.defined() && x_in.scalar_type() == at::kFloat, who, ": argument 'x' must be float32, got ",
              x_in.defined() ? c10::toString(x_in.scalar_type()) : "undefined");
  check_block_size(block_size, who);
  check_map(map, x_in.device(), who, "map");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel(), blocks = kernels::quant_blocks(n, block_size);
  at::Tensor q = at::empty({n}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, x.options());
  if (blocks == 0) return {q, absmax};
  const QuantTable table = cached_quant_table(map, who);
  const auto p = blockwise_params(x, q, absmax, map, block_size, &table);
  ops::launch(x.device(), p, blocks, &kernels::quantize_blockwise_cpu, UNSWAG_CUDA_FN(quantize_blockwise_cuda));
  return {q, absmax};
}

torch::Tensor dequantize_blockwise(const torch::Tensor& codes, const torch::Tensor& absmax, const torch::Tensor& map,
                                   int64_t block_size) {
  const char* who = "unswag::dequantize_blockwise";
  TORCH_CHECK(codes.defined() && codes.scalar_type() == at::kByte, who, ": argument 'codes' must be uint8, got ",
              codes.defined() ? c10::toString(codes.scalar_type()) : "undefined");
  check_block_size(block_size, who);
  const int64_t n = codes.numel(), blocks = kernels::quant_blocks(n, block_size);
  check_state(absmax, codes, at::kFloat, blocks, who, "absmax");
  check_map(map, codes.device(), who, "map");
  const at::Tensor q = codes.contiguous();
  at::Tensor x = at::empty({n}, codes.options().dtype(at::kFloat));
  const auto p = blockwise_params(x, q, absmax, map, block_size);
  if (blocks > 0)
    ops::launch(codes.device(), p, blocks, &kernels::dequantize_blockwise_cpu,
                UNSWAG_CUDA_FN(dequantize_blockwise_cuda));
  return x;
}

namespace {

// adamw8bit_step_ with the maps' quantize tables given (the optimizer keeps them).
void adamw8bit_step_with_tables(torch::Tensor& param, const torch::Tensor& grad_in, torch::Tensor& state1,
                                torch::Tensor& state2, torch::Tensor& absmax1, torch::Tensor& absmax2,
                                const torch::Tensor& map1, const torch::Tensor& map2, const QuantTable* table1,
                                const QuantTable* table2, double lr, double beta1, double beta2, double eps,
                                double weight_decay, int64_t step, int64_t block_size) {
  const char* who = "unswag::adamw8bit_step_";
  const kernels::ParamDType dtype = param_dtype(param, who);
  const at::Tensor grad = checked_grad(grad_in, param, who);
  check_hyperparameters(lr, beta1, beta2, eps, weight_decay, who);
  check_block_size(block_size, who);
  TORCH_CHECK(step >= 1, who, ": argument 'step' must be >= 1 (the count including this step), got ", step);
  const int64_t n = param.numel(), blocks = kernels::quant_blocks(n, block_size);
  check_state(state1, param, at::kByte, n, who, "state1");
  check_state(state2, param, at::kByte, n, who, "state2");
  check_state(absmax1, param, at::kFloat, blocks, who, "absmax1");
  check_state(absmax2, param, at::kFloat, blocks, who, "absmax2");
  check_map(map1, param.device(), who, "map1");
  check_map(map2, param.device(), who, "map2");
  if (n == 0) return;
  QuantTable made1, made2;
  if (table1 == nullptr) {
    made1 = cached_quant_table(map1, std::string(who) + " map1");
    made2 = cached_quant_table(map2, std::string(who) + " map2");
    table1 = &made1;
    table2 = &made2;
  }
  kernels::AdamW8bitParams p;
  p.param = param.data_ptr();
  p.grad = grad.data_ptr();
  p.state1 = state1.data_ptr<uint8_t>();
  p.state2 = state2.data_ptr<uint8_t>();
  p.absmax1 = absmax1.data_ptr<float>();
  p.absmax2 = absmax2.data_ptr<float>();
  p.map1 = map1.data_ptr<float>();
  p.map2 = map2.data_ptr<float>();
  p.qtable1 = table1->table.data_ptr<uint8_t>();
  p.qtable2 = table2->table.data_ptr<uint8_t>();
  p.advance1 = table1->advance;
  p.advance2 = table2->advance;
  p.n = n;
  p.block_size = block_size;
  p.dtype = dtype;
  p.s = kernels::adamw_scalars(lr, beta1, beta2, eps, weight_decay, step);
  ops::launch(param.device(), p, blocks, &kernels::adamw8bit_step_cpu, UNSWAG_CUDA_FN(adamw8bit_step_cuda));
}

}  // namespace

void adamw8bit_step_(torch::Tensor& param, const torch::Tensor& grad, torch::Tensor& state1, torch::Tensor& state2,
                     torch::Tensor& absmax1, torch::Tensor& absmax2, const torch::Tensor& map1,
                     const torch::Tensor& map2, double lr, double beta1, double beta2, double eps,
                     double weight_decay, int64_t step, int64_t block_size) {
  adamw8bit_step_with_tables(param, grad, state1, state2, absmax1, absmax2, map1, map2, nullptr, nullptr, lr, beta1,
                             beta2, eps, weight_decay, step, block_size);
}

void adamw_step_(torch::Tensor& param, const torch::Tensor& grad_in, torch::Tensor& exp_avg, torch::Tensor& exp_avg_sq,
                 double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  const char* who = "unswag::adamw_step_";
  const kernels::ParamDType dtype = param_dtype(param, who);
  const at::Tensor grad = checked_grad(grad_in, param, who);
  check_hyperparameters(lr, beta1, beta2, eps, weight_decay, who);
  TORCH_CHECK(step >= 1, who, ": argument 'step' must be >= 1 (the count including this step), got ", step);
  const int64_t n = param.numel();
  check_state(exp_avg, param, at::kFloat, n, who, "exp_avg");
  check_state(exp_avg_sq, param, at::kFloat, n, who, "exp_avg_sq");
  if (n == 0) return;
  kernels::AdamW32bitParams p;
  p.param = param.data_ptr();
  p.grad = grad.data_ptr();
  p.exp_avg = exp_avg.data_ptr<float>();
  p.exp_avg_sq = exp_avg_sq.data_ptr<float>();
  p.n = n;
  p.dtype = dtype;
  p.s = kernels::adamw_scalars(lr, beta1, beta2, eps, weight_decay, step);
  ops::launch(param.device(), p, (n + kernels::kAdamW32Chunk - 1) / kernels::kAdamW32Chunk,
              &kernels::adamw32bit_step_cpu, UNSWAG_CUDA_FN(adamw32bit_step_cuda));
}

// --- the optimizers --------------------------------------------------------

AdamW::AdamW(NamedParameters params, AdamWOptions options) : AdamW(std::move(params), std::move(options), false) {}

AdamW8bit::AdamW8bit(NamedParameters params, AdamWOptions options)
    : AdamW(std::move(params), std::move(options), true) {}

AdamW::AdamW(NamedParameters params, AdamWOptions options, bool eight_bit)
    : eight_bit_(eight_bit), options_(std::move(options)) {
  const char* who = class_name();
  check_hyperparameters(options_.lr(), options_.beta1(), options_.beta2(), options_.eps(), options_.weight_decay(),
                        who);
  check_block_size(options_.block_size(), who);
  TORCH_CHECK(options_.min_8bit_size() >= 0, who, ": 'min_8bit_size' must be >= 0, got ", options_.min_8bit_size());
  for (auto& [name, param] : params) {
    TORCH_CHECK(index_.count(name) == 0, who, ": parameter name '", name, "' appears twice; names must be unique");
    TORCH_CHECK(param.defined(), who, ": parameter '", name, "' is undefined");
    TORCH_CHECK(param.scalar_type() == at::kFloat || param.scalar_type() == at::kBFloat16, who, ": parameter '", name,
                "' must be float32 or bfloat16, got ", param.scalar_type());
    TORCH_CHECK(param.device().is_cpu() || param.device().is_cuda(), who, ": parameter '", name,
                "' must be on CPU or CUDA, got ", param.device());
    TORCH_CHECK(param.is_contiguous(), who, ": parameter '", name, "' must be contiguous (it is updated in place)");
    Slot s;
    s.name = name;
    s.param = param;
    s.wants_8bit = eight_bit_ && param.numel() >= options_.min_8bit_size() &&
                   !matches_any(name, options_.fp32_state_patterns());
    index_[name] = slots_.size();
    slots_.push_back(std::move(s));
  }
}

const AdamW::DeviceMaps& AdamW::maps_on(const torch::Device& device) const {
  auto it = maps_.find(device.str());
  if (it == maps_.end()) {
    DeviceMaps d;
    d.map1 = dynamic_map(true).to(device);
    d.map2 = dynamic_map(false).to(device);
    QuantTable t1 = quant_table(d.map1), t2 = quant_table(d.map2);
    d.qtable1 = t1.table;
    d.qtable2 = t2.table;
    d.advance1 = t1.advance;
    d.advance2 = t2.advance;
    it = maps_.emplace(device.str(), std::move(d)).first;
  }
  return it->second;
}

void AdamW::init_state(Slot& s) {
  const auto opts = s.param.options().dtype(at::kFloat);
  const int64_t n = s.param.numel();
  if (s.wants_8bit) {
    // Zero moments: code of 0.0 under absmax 0 (dequantizes to 0 whatever the code).
    const DeviceMaps& maps = maps_on(s.param.device());
    const at::Tensor& map1 = maps.map1;
    const at::Tensor& map2 = maps.map2;
    const int64_t blocks = kernels::quant_blocks(n, options_.block_size());
    s.absmax1 = at::zeros({blocks}, opts);
    s.absmax2 = at::zeros({blocks}, opts);
    const int64_t zero1 = (map1.cpu() == 0).nonzero().item<int64_t>();
    const int64_t zero2 = (map2.cpu() == 0).nonzero().item<int64_t>();
    s.state1 = at::full({n}, zero1, opts.dtype(at::kByte));
    s.state2 = at::full({n}, zero2, opts.dtype(at::kByte));
  } else {
    s.exp_avg = at::zeros(s.param.sizes(), opts);
    s.exp_avg_sq = at::zeros(s.param.sizes(), opts);
  }
}

void AdamW::step() {
  torch::NoGradGuard no_grad;
  const auto& o = options_;
  for (auto& s : slots_) {
    const at::Tensor& grad = s.param.grad();
    if (!grad.defined()) continue;
    if (!s.has_state()) init_state(s);
    ++s.step;
    if (s.state1.defined()) {
      const DeviceMaps& d = maps_on(s.param.device());
      const QuantTable t1{d.qtable1, d.advance1}, t2{d.qtable2, d.advance2};
      adamw8bit_step_with_tables(s.param, grad, s.state1, s.state2, s.absmax1, s.absmax2, d.map1, d.map2, &t1, &t2,
                                 o.lr(), o.beta1(), o.beta2(), o.eps(), o.weight_decay(), s.step, o.block_size());
    } else {
      adamw_step_(s.param, grad, s.exp_avg, s.exp_avg_sq, o.lr(), o.beta1(), o.beta2(), o.eps(), o.weight_decay(),
                  s.step);
    }
  }
}

void AdamW::zero_grad(bool set_to_none) {
  for (auto& s : slots_) {
    at::Tensor& grad = s.param.mutable_grad();
    if (!grad.defined()) continue;
    if (set_to_none)
      grad.reset();
    else
      grad.detach_().zero_();
  }
}

void AdamW::set_lr(double lr) {
  check_hyperparameters(lr, options_.beta1(), options_.beta2(), options_.eps(), options_.weight_decay(),
                        class_name());
  options_.lr(lr);
}

const AdamW::Slot& AdamW::slot(const std::string& name) const {
  const auto it = index_.find(name);
  TORCH_CHECK(it != index_.end(), class_name(), ": no parameter named '", name, "'");
  return slots_[it->second];
}
AdamW::Slot& AdamW::slot(const std::string& name) {
  return const_cast<Slot&>(static_cast<const AdamW*>(this)->slot(name));
}

bool AdamW::has_8bit_state(const std::string& name) const { return slot(name).state1.defined(); }
int64_t AdamW::step_count(const std::string& name) const { return slot(name).step; }

int64_t AdamW::state_bytes() const {
  int64_t bytes = 0;
  for (const auto& s : slots_)
    for (const auto* t : {&s.exp_avg, &s.exp_avg_sq, &s.state1, &s.state2, &s.absmax1, &s.absmax2})
      if (t->defined()) bytes += t->nbytes();
  for (const auto& [device, d] : maps_)
    bytes += d.map1.nbytes() + d.map2.nbytes() + d.qtable1.nbytes() + d.qtable2.nbytes();
  return bytes;
}

std::pair<torch::Tensor, torch::Tensor> AdamW::moments(const std::string& name) const {
  const Slot& s = slot(name);
  if (!s.has_state()) return {};
  if (!s.state1.defined()) return {s.exp_avg, s.exp_avg_sq};
  const DeviceMaps& d = maps_on(s.param.device());
  return {dequantize_blockwise(s.state1, s.absmax1, d.map1, options_.block_size()).view(s.param.sizes()),
          dequantize_blockwise(s.state2, s.absmax2, d.map2, options_.block_size()).view(s.param.sizes())};
}

// --- state save / load -----------------------------------------------------

OptimizerState AdamW::state_dict() const {
  OptimizerState out;
  auto& meta = out.metadata;
  meta[kFormatKey] = std::string("unswag.optim.") + class_name();
  meta["format_version"] = kFormatVersion;
  meta["lr"] = format_double(options_.lr());
  meta["beta1"] = format_double(options_.beta1());
  meta["beta2"] = format_double(options_.beta2());
  meta["eps"] = format_double(options_.eps());
  meta["weight_decay"] = format_double(options_.weight_decay());
  meta["block_size"] = std::to_string(options_.block_size());
  meta["min_8bit_size"] = std::to_string(options_.min_8bit_size());
  meta["fp32_state_patterns"] = nlohmann::json(options_.fp32_state_patterns()).dump();
  if (eight_bit_) {
    // The maps themselves: a later version may change them, and a state is
    // only meaningful with the codes it was quantized on.
    out.tensors[kMapSignedKey] = dynamic_map(true);
    out.tensors[kMapUnsignedKey] = dynamic_map(false);
  }
  for (const auto& s : slots_) {
    if (!s.has_state()) continue;
    const std::string& p = s.name;
    out.tensors[p + ":step"] = at::scalar_tensor(s.step, at::kLong);
    if (s.state1.defined()) {
      out.tensors[p + ":state1"] = s.state1;
      out.tensors[p + ":state2"] = s.state2;
      out.tensors[p + ":absmax1"] = s.absmax1;
      out.tensors[p + ":absmax2"] = s.absmax2;
    } else {
      out.tensors[p + ":exp_avg"] = s.exp_avg;
      out.tensors[p + ":exp_avg_sq"] = s.exp_avg_sq;
    }
  }
  return out;
}

void AdamW::load_state_dict(const OptimizerState& state) {
  const std::string who = std::string(class_name()) + "::load_state_dict";
  const auto& meta = state.metadata;
  const auto& tensors = state.tensors;
  const auto format = meta.find(kFormatKey);
  TORCH_CHECK(format != meta.end() && format->second.rfind("unswag.optim.AdamW", 0) == 0, who,
              ": not an UnSwag AdamW state (metadata 'format' is '",
              format == meta.end() ? std::string("missing") : format->second, "')");
  const auto version = meta.find("format_version");
  TORCH_CHECK(version != meta.end() && version->second == kFormatVersion, who, ": state format version '",
              version == meta.end() ? std::string("missing") : version->second, "' is not supported (expected ",
              kFormatVersion, ")");

  // Group the tensors by parameter; every name must be one of ours.
  std::map<std::string, std::map<std::string, at::Tensor>> by_param;
  static const std::set<std::string> fields = {"step",    "exp_avg", "exp_avg_sq", "state1",
                                               "state2",  "absmax1", "absmax2"};
  for (const auto& [key, tensor] : tensors) {
    if (key == kMapSignedKey || key == kMapUnsignedKey) continue;
    const size_t colon = key.rfind(':');
    TORCH_CHECK(colon != std::string::npos && fields.count(key.substr(colon + 1)), who, ": unexpected tensor '", key,
                "' (expected '<parameter>:<field>' with field one of step, exp_avg, exp_avg_sq, state1, state2, "
                "absmax1, absmax2)");
    const std::string name = key.substr(0, colon);
    TORCH_CHECK(index_.count(name), who, ": the state has tensors for parameter '", name,
                "', which this optimizer does not have");
    by_param[name][key.substr(colon + 1)] = tensor;
  }

  // The saved 8-bit layout, needed only when some parameter has 8-bit state.
  int64_t saved_block_size = 0;
  at::Tensor saved_map1, saved_map2;
  const bool any_8bit = std::any_of(by_param.begin(), by_param.end(), [](const auto& kv) {
    return kv.second.count("state1") != 0;
  });
  if (any_8bit) {
    const auto bs = meta.find("block_size");
    TORCH_CHECK(bs != meta.end(), who,
                ": the state holds 8-bit moments but no 'block_size' metadata; it cannot be dequantized");
    saved_block_size = int64_t(parse_double(meta, "block_size", 0, who.c_str()));
    TORCH_CHECK(saved_block_size > 0 && std::to_string(saved_block_size) == bs->second, who,
                ": metadata 'block_size' must be a positive integer, got '", bs->second, "'");
    for (const char* key : {kMapSignedKey, kMapUnsignedKey})
      TORCH_CHECK(tensors.count(key), who, ": the state holds 8-bit moments but not the map '", key,
                  "' they were quantized on");
    saved_map1 = tensors.at(kMapSignedKey).to(at::kCPU).contiguous();
    saved_map2 = tensors.at(kMapUnsignedKey).to(at::kCPU).contiguous();
    check_map_values(saved_map1, who + ": saved map '" + kMapSignedKey + "'");
    check_map_values(saved_map2, who + ": saved map '" + kMapUnsignedKey + "'");
  }

  // Validate and stage every parameter's state before touching any slot, so a
  // bad file leaves the optimizer as it was.
  struct Staged {
    Slot* slot;
    int64_t step;
    at::Tensor m, v;                     // fp32 moments (when converted or fp32)
    at::Tensor state1, state2, a1, a2;   // exact 8-bit copy
  };
  std::vector<Staged> staged;
  std::vector<std::string> converted;  // "'name' (how it was saved)"
  for (auto& [name, f] : by_param) {
    Slot& s = slots_[index_.at(name)];
    const int64_t n = s.param.numel();
    const auto need = [&](const char* field, at::ScalarType dtype, int64_t numel) {
      const auto it = f.find(field);
      TORCH_CHECK(it != f.end(), who, ": parameter '", name, "' has no '", field, "' in the state");
      TORCH_CHECK(it->second.scalar_type() == dtype && it->second.numel() == numel, who, ": '", name, ":", field,
                  "' must be ", dtype, " with ", numel, " elements (parameter of shape ", s.param.sizes(), "), got ",
                  it->second.scalar_type(), " with ", it->second.numel());
      return it->second.contiguous().view({numel}).to(s.param.device());
    };
    Staged st{&s, 0, {}, {}, {}, {}, {}, {}};
    st.step = need("step", at::kLong, 1).cpu().item<int64_t>();
    TORCH_CHECK(st.step >= 1, who, ": '", name, ":step' must be >= 1, got ", st.step);
    const bool saved_8bit = f.count("state1") != 0;
    if (saved_8bit) {
      const int64_t blocks = kernels::quant_blocks(n, saved_block_size);
      st.state1 = need("state1", at::kByte, n);
      st.state2 = need("state2", at::kByte, n);
      st.a1 = need("absmax1", at::kFloat, blocks);
      st.a2 = need("absmax2", at::kFloat, blocks);
      const bool same_layout = s.wants_8bit && saved_block_size == options_.block_size() &&
                               at::equal(saved_map1, dynamic_map(true)) && at::equal(saved_map2, dynamic_map(false));
      if (!same_layout) {
        // Dequantize on the saved layout (requantized below if ours is 8-bit).
        const auto dev = s.param.device();
        st.m = dequantize_blockwise(st.state1, st.a1, saved_map1.to(dev), saved_block_size);
        st.v = dequantize_blockwise(st.state2, st.a2, saved_map2.to(dev), saved_block_size);
        st.state1 = st.state2 = st.a1 = st.a2 = at::Tensor();
        if (s.wants_8bit)
          converted.push_back(fmt::format("'{}' (8-bit, block size {}{})", name, saved_block_size,
                                          saved_block_size == options_.block_size() ? ", other maps" : ""));
      }
    } else {
      st.m = need("exp_avg", at::kFloat, n);
      st.v = need("exp_avg_sq", at::kFloat, n);
      if (s.wants_8bit) converted.push_back(fmt::format("'{}' (fp32 state)", name));
    }
    staged.push_back(std::move(st));
  }

  // Options as saved (the layout options stay this optimizer's own).
  AdamWOptions restored = options_;
  restored.lr(parse_double(meta, "lr", options_.lr(), who.c_str()));
  restored.beta1(parse_double(meta, "beta1", options_.beta1(), who.c_str()));
  restored.beta2(parse_double(meta, "beta2", options_.beta2(), who.c_str()));
  restored.eps(parse_double(meta, "eps", options_.eps(), who.c_str()));
  restored.weight_decay(parse_double(meta, "weight_decay", options_.weight_decay(), who.c_str()));
  check_hyperparameters(restored.lr(), restored.beta1(), restored.beta2(), restored.eps(), restored.weight_decay(),
                        who.c_str());

  // Commit.
  options_ = restored;
  for (auto& s : slots_) {
    s.step = 0;
    s.exp_avg = s.exp_avg_sq = s.state1 = s.state2 = s.absmax1 = s.absmax2 = at::Tensor();
  }
  for (auto& st : staged) {
    Slot& s = *st.slot;
    s.step = st.step;
    if (st.state1.defined()) {
      s.state1 = st.state1.clone();
      s.state2 = st.state2.clone();
      s.absmax1 = st.a1.clone();
      s.absmax2 = st.a2.clone();
    } else if (s.wants_8bit) {
      const DeviceMaps& d = maps_on(s.param.device());
      std::tie(s.state1, s.absmax1) = quantize_blockwise(st.m, d.map1, options_.block_size());
      std::tie(s.state2, s.absmax2) = quantize_blockwise(st.v, d.map2, options_.block_size());
    } else {
      s.exp_avg = st.m.view(s.param.sizes()).clone();
      s.exp_avg_sq = st.v.view(s.param.sizes()).clone();
    }
  }
  if (!converted.empty()) {
    TORCH_WARN(who, ": the state of ", converted.size(), " parameter(s) was saved in another layout (first: ",
               converted.front(), ") and was requantized to 8 bits with block size ", options_.block_size(),
               "; this is lossy (one extra rounding of each moment)");
  }
}

void AdamW::save(const std::string& path) const {
  const OptimizerState st = state_dict();
  safetensors::save(st.tensors, path, st.metadata);
}

void AdamW::load(const std::string& path) {
  const auto file = safetensors::File::open(path);
  OptimizerState st;
  st.metadata = file.metadata();
  for (const auto& info : file.tensors()) st.tensors[info.name] = file.get(info.name).clone();
  load_state_dict(st);
}

// --- torch.ops.unswag registration -----------------------------------------

namespace {

void adamw8bit_step_op(at::Tensor param, const at::Tensor& grad, at::Tensor state1, at::Tensor state2,
                       at::Tensor absmax1, at::Tensor absmax2, const at::Tensor& map1, const at::Tensor& map2,
                       double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                       int64_t block_size) {
  adamw8bit_step_(param, grad, state1, state2, absmax1, absmax2, map1, map2, lr, beta1, beta2, eps, weight_decay,
                  step, block_size);
}

void adamw_step_op(at::Tensor param, const at::Tensor& grad, at::Tensor exp_avg, at::Tensor exp_avg_sq, double lr,
                   double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  adamw_step_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(unswag, m) {
  // 8-bit AdamW: state1/state2 uint8 [numel] codes of map1 (signed) / map2
  // (unsigned), absmax1/absmax2 fp32 [ceil(numel / block_size)]; step counts
  // this step (>= 1). Updates param and the state in place.
  m.def(
      "adamw8bit_step_(Tensor(a!) param, Tensor grad, Tensor(b!) state1, Tensor(c!) state2, Tensor(d!) absmax1, "
      "Tensor(e!) absmax2, Tensor map1, Tensor map2, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int step, int block_size) -> ()");
  // The fp32-state twin: exp_avg / exp_avg_sq fp32 with param's numel.
  m.def(
      "adamw_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, int step) -> ()");
  m.def("dynamic_map(bool signed) -> Tensor", [](bool is_signed) { return dynamic_map(is_signed); });
  m.def("quantize_blockwise(Tensor x, Tensor map, int block_size) -> (Tensor codes, Tensor absmax)");
  m.def("dequantize_blockwise(Tensor codes, Tensor absmax, Tensor map, int block_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(unswag, CPU, m) {
  m.impl("adamw8bit_step_", &adamw8bit_step_op);
  m.impl("adamw_step_", &adamw_step_op);
  m.impl("quantize_blockwise", &quantize_blockwise);
  m.impl("dequantize_blockwise", &dequantize_blockwise);
}

#ifdef UNSWAG_WITH_CUDA
TORCH_LIBRARY_IMPL(unswag, CUDA, m) {
  m.impl("adamw8bit_step_", &adamw8bit_step_op);
  m.impl("adamw_step_", &adamw_step_op);
  m.impl("quantize_blockwise", &quantize_blockwise);
  m.impl("dequantize_blockwise", &dequantize_blockwise);
}
#endif

}  // namespace unswag::optim
