// Benchmark of Packet-Switched Attention against dense attention, one layer of
// 16 heads x 128 (hidden 2048) in bf16, batch 1, measured side by side in one
// process (bench/bench_psa.py runs it and writes docs/BENCHMARKS.md):
//
//   --mode speed   forward + backward of the whole layer (q/k/v/o
//                  projections, RoPE, router, every route) against the same
//                  layer with PyTorch's SDPA (causal; the backend it picked is
//                  reported), and SDPA alone, at each --contexts length.
//   --mode decode  generation: prefill a context of L tokens into the layer's
//                  cache, then time single-token decode steps; the bytes the
//                  cache actually allocated per token against a dense KV cache
//                  of the same layer.
//
// Timing: CUDA events on the current stream after warm-up, medians. Each
// result is one JSON line on stdout.
#include <torch/torch.h>

#ifdef UNSWAG_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

#include <torch/csrc/autograd/profiler_kineto.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <map>
#include <set>
#include <chrono>
#include <cstdio>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "unswag/nn/psa.h"

namespace {

using unswag::nn::PacketSwitchedAttention;
using unswag::nn::PSACache;
using unswag::nn::PSAConfig;

struct Shape {
  int64_t hidden = 2048, heads = 16, head_dim = 128;
};

bool on_cuda(const torch::Device& d) { return d.is_cuda(); }

void synchronize(const torch::Device& device) {
  if (on_cuda(device)) torch::cuda::synchronize();
}

// Untimed decode steps before the timed ones: a quarter of them, at least 2.
// (With 2, the first context's dense steps once measured 3x slower than the
// next context's, on an H100 fresh from idle.)
int decode_warmup(int steps) { return std::max(2, steps / 4); }

// Milliseconds of each of `repeats` calls of fn after `warmup` calls: CUDA
// events around each call on the current stream, wall clock on CPU.
std::vector<double> time_calls(const torch::Device& device, int warmup, int repeats, const std::function<void()>& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  synchronize(device);
  std::vector<double> ms;
  for (int i = 0; i < repeats; ++i) {
#ifdef UNSWAG_WITH_CUDA
    if (on_cuda(device)) {
      cudaEvent_t start, stop;
      cudaEventCreate(&start);
      cudaEventCreate(&stop);
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
      cudaEventRecord(start, stream);
      fn();
      cudaEventRecord(stop, stream);
      cudaEventSynchronize(stop);
      float t = 0;
      cudaEventElapsedTime(&t, start, stop);
      cudaEventDestroy(start);
      cudaEventDestroy(stop);
      ms.push_back(t);
      continue;
    }
#endif
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return ms;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0.0 : (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}

void reset_peak(const torch::Device& device) {
#ifdef UNSWAG_WITH_CUDA
  if (on_cuda(device)) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
#endif
}
double peak_gib(const torch::Device& device) {
#ifdef UNSWAG_WITH_CUDA
  if (on_cuda(device)) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    return double(stats.allocated_bytes[0].peak) / double(int64_t(1) << 30);
  }
#endif
  return 0.0;
}

// RoPE tables [1, 1, T, D] (the rotate-half convention of transformers' Llama).
std::pair<torch::Tensor, torch::Tensor> rope(const torch::Tensor& positions, int64_t head_dim, torch::ScalarType dtype) {
  auto opts = positions.options().dtype(torch::kFloat);
  auto inv_freq = 1.0 / torch::pow(500000.0, torch::arange(0, head_dim, 2, opts) / double(head_dim));
  auto freqs = positions.to(torch::kFloat).unsqueeze(-1) * inv_freq;  // [1, T, D/2]
  auto emb = torch::cat({freqs, freqs}, -1).unsqueeze(1);              // [1, 1, T, D]
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

torch::Tensor rotate(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  auto rotated = torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

// The dense baseline: Llama attention with PyTorch's SDPA.
struct DenseAttention : torch::nn::Module {
  Shape s;
  torch::nn::Linear q{nullptr}, k{nullptr}, v{nullptr}, o{nullptr};
  explicit DenseAttention(const Shape& shape) : s(shape) {
    const int64_t qd = s.heads * s.head_dim;
    auto opt = [](int64_t i, int64_t o) { return torch::nn::LinearOptions(i, o).bias(false); };
    q = register_module("q", torch::nn::Linear(opt(s.hidden, qd)));
    k = register_module("k", torch::nn::Linear(opt(s.hidden, qd)));
    v = register_module("v", torch::nn::Linear(opt(s.hidden, qd)));
    o = register_module("o", torch::nn::Linear(opt(qd, s.hidden)));
  }
  torch::Tensor heads(const torch::Tensor& t) const {  // [B, T, H*D] -> [B, H, T, D]
    return t.view({t.size(0), t.size(1), s.heads, s.head_dim}).transpose(1, 2);
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
    auto qh = rotate(heads(q(x)), cos, sin), kh = rotate(heads(k(x)), cos, sin), vh = heads(v(x));
    auto a = at::scaled_dot_product_attention(qh, kh, vh, {}, 0.0, /*is_causal=*/true);
    return o(a.transpose(1, 2).reshape({x.size(0), x.size(1), -1}));
  }
};

// The backend SDPA picks for causal bf16 [1, H, T, D] inputs.
std::string sdpa_backend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  const int64_t b = at::_fused_sdp_choice(q, k, v, {}, 0.0, true, std::nullopt, false);
  switch (b) {
    case 0: return "math";
    case 1: return "flash_attention";
    case 2: return "efficient_attention";
    case 3: return "cudnn_attention";
    default: return "backend " + std::to_string(b);
  }
}

std::string json_escape(const std::string& in) {
  std::string out;
  for (char c : in) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) out += c;
  }
  return out;
}

// One call of fn under the Kineto profiler: the wall time of the call, the
// summed GPU time, and the top GPU kernels, the same GPU time by the ATen op
// (and input shapes) that launched it, and CPU-side ATen ops by total
// time (CPU ops nest, so their times overlap; a large aten::item or
// aten::nonzero is time spent waiting for the GPU). One JSON line.
void profile_call(const torch::Device& device, const std::string& label, const std::function<void()>& fn) {
  namespace prof = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO,
                                                     /*report_input_shapes=*/true);
  std::set<ActivityType> activities{ActivityType::CPU};
  if (on_cuda(device)) activities.insert(ActivityType::CUDA);
  synchronize(device);
  prof::prepareProfiler(config, activities);
  prof::enableProfiler(config, activities);
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  synchronize(device);
  const double wall_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const auto result = prof::disableProfiler();
  std::map<std::string, std::pair<double, int>> gpu, cpu, gpu_by_op;
  // The ATen op that launched each kernel (the innermost one: the kernel's
  // linked correlation id is that op's), named with its input shapes.
  std::map<uint64_t, std::string> op_of;
  for (const auto& e : result->events()) {
    if (e.deviceType() == c10::DeviceType::CUDA) continue;
    std::ostringstream o;
    o << e.name();
    if (e.hasShapes())
      for (const auto& shape : e.shapes())
        if (!shape.empty()) o << " " << c10::IntArrayRef(shape);
    op_of[e.correlationId()] = o.str();
  }
  double gpu_ms = 0;
  int64_t kernels = 0;  // device-side events: the launches the host paid for (host-bound at short T)
  for (const auto& e : result->events()) {
    const double ms = double(e.durationNs()) / 1e6;
    if (e.deviceType() == c10::DeviceType::CUDA) {
      auto& g = gpu[e.name()];
      g.first += ms;
      g.second += 1;
      gpu_ms += ms;
      kernels += 1;
      const auto op = op_of.find(e.linkedCorrelationId());
      auto& by_op = gpu_by_op[op == op_of.end() ? "(no op) " + e.name() : op->second];
      by_op.first += ms;
      by_op.second += 1;
    } else if (e.name().rfind("aten::", 0) == 0 || e.name().rfind("unswag::", 0) == 0) {
      auto& c = cpu[e.name()];
      c.first += ms;
      c.second += 1;
    }
  }
  auto top = [](const std::map<std::string, std::pair<double, int>>& m, size_t k, size_t width) {
    std::vector<std::pair<std::string, std::pair<double, int>>> v(m.begin(), m.end());
    std::sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.second.first > b.second.first; });
    std::ostringstream o;
    o << "[";
    for (size_t i = 0; i < std::min(k, v.size()); ++i)
      o << (i ? ", " : "") << "[\"" << json_escape(v[i].first.substr(0, width)) << "\", " << v[i].second.first << ", "
        << v[i].second.second << "]";
    o << "]";
    return o.str();
  };
  // Host-bound short contexts are about how many ops the host dispatches:
  // the same CPU ops by count (nested ops counted too, as the dispatcher pays for each).
  std::map<std::string, std::pair<double, int>> cpu_count;
  int64_t cpu_ops = 0;
  for (const auto& [name, c] : cpu) {
    cpu_count[name] = {double(c.second), c.second};
    cpu_ops += c.second;
  }
  // Where the GPU idled: the span from the first device event's start to the
  // last one's end, and the longest gaps between consecutive events (named by
  // the op whose kernel came after the gap: what the device waited for).
  std::vector<const torch::autograd::profiler::KinetoEvent*> device_events;
  for (const auto& e : result->events())
    if (e.deviceType() == c10::DeviceType::CUDA) device_events.push_back(&e);
  std::sort(device_events.begin(), device_events.end(),
            [](const auto* a, const auto* b) { return a->startNs() < b->startNs(); });
  std::map<std::string, std::pair<double, int>> gaps;
  double span_ms = 0, idle_ms = 0;
  uint64_t reach = 0;  // the latest end so far
  for (size_t n = 0; n < device_events.size(); ++n) {
    const auto* e = device_events[n];
    if (n > 0 && e->startNs() > reach) {
      const double gap = double(e->startNs() - reach) / 1e6;
      idle_ms += gap;
      const auto op = op_of.find(e->linkedCorrelationId());
      auto& g = gaps[op == op_of.end() ? e->name() : op->second];
      g.first += gap;
      g.second += 1;
    }
    reach = std::max(reach, e->endNs());
  }
  if (!device_events.empty()) span_ms = double(reach - device_events.front()->startNs()) / 1e6;
  std::printf("{\"mode\": \"profile\", \"what\": \"%s\", \"wall_ms\": %.3f, \"gpu_ms\": %.3f, \"gpu_events\": %ld, "
              "\"gpu_span_ms\": %.3f, \"gpu_idle_ms\": %.3f, \"idle_before\": %s, "
              "\"cpu_ops\": %ld, \"gpu_top\": %s, \"gpu_by_op\": %s, \"cpu_top\": %s, \"cpu_by_count\": %s}\n",
              json_escape(label).c_str(), wall_ms, gpu_ms, long(kernels), span_ms, idle_ms, top(gaps, 15, 120).c_str(),
              long(cpu_ops), top(gpu, 15, 90).c_str(), top(gpu_by_op, 30, 160).c_str(), top(cpu, 15, 90).c_str(),
              top(cpu_count, 40, 90).c_str());
  std::fflush(stdout);
}

std::string json_shares(const std::array<double, 4>& f) {
  std::ostringstream o;
  o << "[" << f[0] << ", " << f[1] << ", " << f[2] << ", " << f[3] << "]";
  return o.str();
}

PSAConfig psa_config(double signal_share, int64_t kernel, int64_t window) {
  PSAConfig c;
  c.kernel_size = kernel;
  c.window = window;
  // Prune 12.5%, summary 31.25%, signal as asked, local the rest.
  c.target_shares = {0.125, 1.0 - 0.125 - 0.3125 - signal_share, 0.3125, signal_share};
  return c;
}

// Route shares at the configured budget, as training's route-bias controller
// holds them: an untrained router's logit spread moves the sampled shares off
// the log-target biases (signal 14.2% for a 12.5% budget at 128k). A few
// forward calls, each adding log(target / measured share) to route_bias.
void calibrate_route_shares(PacketSwitchedAttention& psa, const torch::Tensor& x, const torch::Tensor& positions,
                            const torch::Tensor& cos, const torch::Tensor& sin) {
  torch::NoGradGuard no_grad;
  const auto& target = psa->config().target_shares;
  for (int it = 0; it < 4; ++it) {
    psa->forward(x, positions, cos, sin);
    const auto f = psa->route_stats().fractions;
    for (int r = 0; r < 4; ++r)
      if (target[r] > 0 && f[r] > 0) psa->route_bias[r].add_(std::log(target[r] / f[r]));
  }
}

void bench_speed(const torch::Device& device, const Shape& s, const std::vector<int64_t>& contexts,
                 const std::vector<double>& signal_shares, int64_t kernel, int64_t window, int repeats,
                 bool profile) {
  const auto dtype = on_cuda(device) ? torch::kBFloat16 : torch::kFloat;
  auto opts = torch::TensorOptions().device(device).dtype(dtype);
  for (const int64_t T : contexts) {
    // Long contexts: fewer timed calls (the dense layer takes ~0.5 s at 128k),
    // but three warm-ups and at least three timed calls: the PSA layer's
    // packed length (rounded to 256) takes a few values from call to call, and
    // the first call at each pays cuDNN's planning (a median of two calls once
    // read 106.6 ms where the steady state is 54 ms, H100, 2026-12-06).
    const int reps = T >= 65536 ? std::max(3, repeats / 3) : repeats;
    const int warmup = T >= 65536 ? 3 : 2;
    auto positions = torch::arange(T, torch::TensorOptions().device(device).dtype(torch::kLong)).unsqueeze(0);
    auto [cos, sin] = rope(positions, s.head_dim, dtype);
    auto x = torch::randn({1, T, s.hidden}, opts).requires_grad_(true);
    auto gy = torch::randn({1, T, s.hidden}, opts);

    {  // SDPA alone, fwd + bwd.
      auto q = torch::randn({1, s.heads, T, s.head_dim}, opts).requires_grad_(true);
      auto k = torch::randn_like(q).requires_grad_(true), v = torch::randn_like(q).requires_grad_(true);
      auto g = torch::randn_like(q);
      const std::string backend = sdpa_backend(q, k, v);
      const auto ms = time_calls(device, warmup, reps, [&] {
        auto out = at::scaled_dot_product_attention(q, k, v, {}, 0.0, true);
        torch::autograd::backward({out}, {g});
      });
      std::printf("{\"mode\": \"speed\", \"what\": \"sdpa_kernel\", \"context\": %ld, \"ms\": %.4f, \"backend\": \"%s\"}\n",
                  long(T), median(ms), backend.c_str());
      std::fflush(stdout);
    }
    {  // The dense layer.
      auto layer = std::make_shared<DenseAttention>(s);
      layer->to(device, dtype);
      reset_peak(device);
      const auto ms = time_calls(device, warmup, reps, [&] {
        auto y = layer->forward(x, cos, sin);
        torch::autograd::backward({y}, {gy});
      });
      std::printf("{\"mode\": \"speed\", \"what\": \"dense_layer\", \"context\": %ld, \"ms\": %.4f, \"peak_gib\": %.3f}\n",
                  long(T), median(ms), peak_gib(device));
      std::fflush(stdout);
      if (profile)
        profile_call(device, "dense_layer T=" + std::to_string(T), [&] {
          auto y = layer->forward(x, cos, sin);
          torch::autograd::backward({y}, {gy});
        });
    }
    for (const double share : signal_shares) {
      PacketSwitchedAttention psa(s.hidden, s.heads, s.heads, s.head_dim, false, false, psa_config(share, kernel, window));
      psa->to(device, dtype);
      psa->train();
      calibrate_route_shares(psa, x, positions, cos, sin);
      reset_peak(device);
      const auto ms = time_calls(device, warmup, reps, [&] {
        auto y = psa->forward(x, positions, cos, sin);
        torch::autograd::backward({y}, {gy});
      });
      const auto stats = psa->route_stats();
      std::printf(
          "{\"mode\": \"speed\", \"what\": \"psa_layer\", \"context\": %ld, \"target_signal\": %.4f, \"ms\": %.4f, "
          "\"peak_gib\": %.3f, \"route_fractions\": %s, \"window\": %ld}\n",
          long(T), share, median(ms), peak_gib(device), json_shares(stats.fractions).c_str(), long(window));
      std::fflush(stdout);
      if (profile)
        profile_call(device, "psa_layer T=" + std::to_string(T) + " signal=" + std::to_string(share), [&] {
          auto y = psa->forward(x, positions, cos, sin);
          torch::autograd::backward({y}, {gy});
        });
    }
  }
}

void bench_decode(const torch::Device& device, const Shape& s, const std::vector<int64_t>& contexts,
                  const std::vector<double>& signal_shares, int64_t kernel, int64_t window, int steps) {
  torch::NoGradGuard no_grad;
  const auto dtype = on_cuda(device) ? torch::kBFloat16 : torch::kFloat;
  auto opts = torch::TensorOptions().device(device).dtype(dtype);
  auto lopts = torch::TensorOptions().device(device).dtype(torch::kLong);
  for (const int64_t L : contexts) {
    auto positions = torch::arange(L + steps, lopts).unsqueeze(0);
    auto [cos, sin] = rope(positions, s.head_dim, dtype);
    auto x = torch::randn({1, L + steps, s.hidden}, opts);
    const auto token = [&](int64_t i) { return x.narrow(1, i, 1); };
    const auto cos_at = [&](int64_t i) { return cos.narrow(2, i, 1); };
    const auto sin_at = [&](int64_t i) { return sin.narrow(2, i, 1); };

    {  // Dense: a preallocated KV cache of L + steps tokens, SDPA over the filled part.
      auto layer = std::make_shared<DenseAttention>(s);
      layer->to(device, dtype);
      auto K = torch::empty({1, s.heads, L + steps, s.head_dim}, opts), V = torch::empty_like(K);
      for (int64_t c0 = 0; c0 < L; c0 += 8192) {  // prefill in chunks
        const int64_t n = std::min<int64_t>(8192, L - c0);
        auto xc = x.narrow(1, c0, n);
        K.narrow(2, c0, n).copy_(rotate(layer->heads(layer->k(xc)), cos.narrow(2, c0, n), sin.narrow(2, c0, n)));
        V.narrow(2, c0, n).copy_(layer->heads(layer->v(xc)));
      }
      int64_t len = L;
      const auto ms = time_calls(device, decode_warmup(steps), steps - decode_warmup(steps), [&] {
        auto xt = token(len);
        auto q = rotate(layer->heads(layer->q(xt)), cos_at(len), sin_at(len));
        K.narrow(2, len, 1).copy_(rotate(layer->heads(layer->k(xt)), cos_at(len), sin_at(len)));
        V.narrow(2, len, 1).copy_(layer->heads(layer->v(xt)));
        ++len;
        // FlashAttention directly: SDPA's default choice here (cuDNN) plans per
        // shape, and the cache length changes every step (~50 ms per token
        // measured), which would not be a fair baseline.
        auto a = on_cuda(device) ? std::get<0>(at::_scaled_dot_product_flash_attention(
                                       q, K.narrow(2, 0, len), V.narrow(2, 0, len), 0.0, false, false))
                                 : at::scaled_dot_product_attention(q, K.narrow(2, 0, len), V.narrow(2, 0, len), {},
                                                                    0.0, false);
        layer->o(a.transpose(1, 2).reshape({1, 1, -1}));
      });
      const double bytes = double(K.nbytes() + V.nbytes());
      std::printf(
          "{\"mode\": \"decode\", \"what\": \"dense\", \"context\": %ld, \"ms_per_token\": %.4f, "
          "\"cache_bytes\": %.0f, \"cache_bytes_per_token\": %.1f}\n",
          long(L), median(ms), bytes, bytes / double(L + steps));
      std::fflush(stdout);
    }
    for (const double share : signal_shares) {
      // The fused decode step (one token, five kernels, no host sync) and the
      // ATen composition it replaces, each from its own prefill of the same
      // layer (same seed, so the same weights and routes).
      for (const bool fused : {true, false}) {
        torch::manual_seed(1234);
        PacketSwitchedAttention psa(s.hidden, s.heads, s.heads, s.head_dim, false, false,
                                    psa_config(share, kernel, window));
        psa->to(device, dtype);
        psa->eval();
        psa->set_fused_decode(fused);
        PSACache cache;
        psa->forward_cached(x.narrow(1, 0, L), positions.narrow(1, 0, L), cos.narrow(2, 0, L),
                            sin.narrow(2, 0, L), cache);
        const auto prefill_routes = psa->route_stats();
        int64_t len = L;
        const auto ms = time_calls(device, decode_warmup(steps), steps - decode_warmup(steps), [&] {
          psa->forward_cached(token(len), positions.narrow(1, len, 1), cos_at(len), sin_at(len), cache);
          ++len;
        });
        const double bytes = double(cache.bytes_allocated());
        std::printf(
            "{\"mode\": \"decode\", \"what\": \"psa\", \"path\": \"%s\", \"context\": %ld, "
            "\"target_signal\": %.4f, \"ms_per_token\": %.4f, \"cache_bytes\": %.0f, "
            "\"cache_bytes_per_token\": %.1f, \"signal_tokens\": %ld, \"route_fractions\": %s, \"window\": %ld}\n",
            fused ? "fused" : "composition", long(L), share, median(ms), bytes, bytes / double(len),
            long(cache.signal_tokens()), json_shares(prefill_routes.fractions).c_str(), long(window));
        std::fflush(stdout);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"UnSwag: Packet-Switched Attention against dense attention (one layer)"};
  std::string mode = "speed";
  std::vector<int64_t> contexts;
  std::vector<double> shares = {0.125, 0.25};
  int64_t kernel = 8, window = PSAConfig().window;
  int repeats = 10, steps = 34;
  std::string device_name = "auto";
  bool profile = false;
  app.add_flag("--profile", profile, "speed: also profile one PSA call per config (top kernels and ops, JSON lines)");
  app.add_option("--mode", mode, "speed | decode")->check(CLI::IsMember({"speed", "decode"}));
  app.add_option("--contexts", contexts, "sequence lengths (default: speed 2k,8k,32k,128k; decode 4k,16k,64k)")
      ->delimiter(',');
  app.add_option("--signal-shares", shares, "target shares of signal tokens")->delimiter(',');
  app.add_option("--kernel", kernel, "local conv kernel size");
  app.add_option("--window", window, "PSA's attention window (0: none)");
  app.add_option("--repeats", repeats, "timed repeats (speed)");
  app.add_option("--steps", steps, "decode steps (the first quarter, at least 2, are warm-up)")->check(CLI::Range(3, 100000));
  app.add_option("--device", device_name, "auto | cuda | cpu");
  CLI11_PARSE(app, argc, argv);
  if (contexts.empty())
    contexts = mode == "speed" ? std::vector<int64_t>{2048, 8192, 32768, 131072}
                               : std::vector<int64_t>{4096, 16384, 65536};
  const bool cuda = device_name == "cuda" || (device_name == "auto" && torch::cuda::is_available());
  const torch::Device device = cuda ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  torch::manual_seed(0);
  const Shape shape;
  if (mode == "speed")
    bench_speed(device, shape, contexts, shares, kernel, window, repeats, profile);
  else
    bench_decode(device, shape, contexts, shares, kernel, window, steps);
  return 0;
}
