// `unswag demo`: trains the same small residual MLP stack (a student fitting a
// fixed random teacher) under each fused-MLP policy, from the same seed on the
// same batches, and prints what each keeps for backward (measured with the
// allocator), its speed, its loss, and how far its gradients are from plain
// PyTorch's.
#include <fmt/core.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/optim/adam.h>
#include <torch/torch.h>

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <vector>

#include "cli/commands.h"
#include "unswag/memory.h"
#include "unswag/nn/fused_mlp.h"

namespace unswag::cli {
namespace {

// x -> x + mlp_l(x) for each layer (scaled so the stack stays well conditioned).
struct StackImpl : torch::nn::Module {
  StackImpl(const DemoOptions& o, const std::string& policy, int64_t storage_bits) {
    for (int64_t l = 0; l < o.layers; ++l) {
      auto opts = nn::FusedMLPOptions(o.hidden, o.intermediate)
                      .activation(o.activation)
                      .policy(policy)
                      .storage_bits(storage_bits);
      blocks.push_back(register_module("block" + std::to_string(l), nn::FusedMLP(opts)));
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    for (auto& b : blocks) x = x + 0.5 * b->forward(x);
    return x;
  }
  std::vector<nn::FusedMLP> blocks;
};
TORCH_MODULE(Stack);

struct Variant {
  std::string label, policy;
  int64_t storage_bits;
};

struct Result {
  int64_t kept_bytes = 0, peak_bytes = 0;
  double step_ms = 0, first_loss = 0, final_loss = 0, grad_rel_err = 0;
};

double rel_err(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i].to(torch::kDouble) - b[i].to(torch::kDouble)).pow(2).sum().item<double>();
    den += b[i].to(torch::kDouble).pow(2).sum().item<double>();
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

std::vector<torch::Tensor> grads_of(torch::nn::Module& m) {
  std::vector<torch::Tensor> g;
  for (auto& p : m.parameters()) g.push_back(p.grad().clone());
  return g;
}

}  // namespace

void add_demo_options(CLI::App& cmd, DemoOptions& o) {
  cmd.add_option("--device", o.device, "auto, cpu or cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd.add_option("--activation", o.activation, "swiglu, geglu, relu, relu2, gelu, silu")
      ->check(CLI::IsMember({"swiglu", "geglu", "geglu_tanh", "relu", "relu2", "gelu", "gelu_tanh", "silu"}));
  cmd.add_option("--layers", o.layers, "MLP blocks in the stack")->check(CLI::PositiveNumber);
  cmd.add_option("--hidden", o.hidden, "hidden size")->check(CLI::PositiveNumber);
  cmd.add_option("--intermediate", o.intermediate, "intermediate (FFN) size")->check(CLI::PositiveNumber);
  cmd.add_option("--tokens", o.tokens, "tokens per batch")->check(CLI::PositiveNumber);
  cmd.add_option("--steps", o.steps, "training steps per policy")->check(CLI::PositiveNumber);
  cmd.add_option("--lr", o.lr, "Adam learning rate")->check(CLI::PositiveNumber);
  cmd.add_option("--seed", o.seed, "random seed");
}

int run_demo(const DemoOptions& o) {
  const bool cuda = o.device == "cuda" || (o.device == "auto" && torch::cuda::is_available());
  TORCH_CHECK(!cuda || torch::cuda::is_available(), "--device cuda: no CUDA device is available");
  const torch::Device device = cuda ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  const auto dtype = cuda ? torch::kBFloat16 : torch::kFloat32;
  track_cpu_memory();
  const bool tty = isatty(fileno(stderr));
  fmt::print("UnSwag demo: {} residual {} blocks, hidden {}, intermediate {}, {} tokens/batch, {} steps, {} {}\n",
             o.layers, o.activation, o.hidden, o.intermediate, o.tokens, o.steps, device.str(),
             cuda ? "bf16" : "fp32");

  // Teacher: fixed random stack; data: fresh Gaussian batches from a seeded generator.
  torch::manual_seed(o.seed + 1);
  Stack teacher(o, "none", 16);
  teacher->to(device, dtype);
  for (auto& p : teacher->parameters()) p.set_requires_grad(false);

  const std::vector<Variant> variants = {{"plain PyTorch (none)", "none", 16},
                                         {"recompute", "recompute", 16},
                                         {"compressed", "compressed", 16},
                                         {"compressed int8", "compressed", 8}};
  std::vector<Result> results;
  std::vector<torch::Tensor> reference_grads;
  for (const auto& v : variants) {
    torch::manual_seed(o.seed);
    Stack student(o, v.policy, v.storage_bits);
    student->to(device, dtype);
    torch::optim::Adam opt(student->parameters(), torch::optim::AdamOptions(o.lr));
    auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 7);
    Result r;
    double total_ms = 0;
    for (int64_t step = 0; step < o.steps; ++step) {
      torch::Tensor x = at::randn({o.tokens, o.hidden}, gen, torch::TensorOptions().dtype(torch::kFloat32))
                            .to(device, dtype);
      torch::Tensor target = teacher->forward(x);
      opt.zero_grad();
      if (cuda) torch::cuda::synchronize();
      const auto t0 = std::chrono::steady_clock::now();
      reset_peak_bytes(device);
      const int64_t before = allocated_bytes(device);
      torch::Tensor y = student->forward(x);
      const int64_t after = allocated_bytes(device);
      torch::Tensor loss = (y.to(torch::kFloat32) - target.to(torch::kFloat32)).pow(2).mean();
      loss.backward();
      opt.step();
      if (cuda) torch::cuda::synchronize();
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (step == 0) {
        // The output y is alive too but is not state kept for backward.
        r.kept_bytes = after - before - int64_t(y.numel() * y.element_size());
        r.peak_bytes = peak_allocated_bytes(device) - before;
        r.first_loss = loss.item<double>();
        // Gradients at identical weights and data: compare with plain PyTorch's.
        auto g = grads_of(*student);
        if (reference_grads.empty()) reference_grads = g;
        r.grad_rel_err = rel_err(g, reference_grads);
      } else {
        total_ms += ms;
      }
      // A live line on a terminal; plain lines (every 25 steps) into a file or pipe.
      if ((tty && step % 10 == 0) || (!tty && step % 25 == 0) || step + 1 == o.steps) {
        std::fprintf(stderr, "%s  %-22s step %4lld/%lld  loss %.5f  %.1f ms/step   %s", tty ? "\r" : "",
                     v.label.c_str(), (long long)step + 1, (long long)o.steps, loss.item<double>(),
                     step ? total_ms / step : ms, tty ? "" : "\n");
      }
      r.final_loss = loss.item<double>();
    }
    if (tty) std::fprintf(stderr, "\n");
    r.step_ms = o.steps > 1 ? total_ms / double(o.steps - 1) : 0;
    results.push_back(r);
  }

  fmt::print("\n{:<22} {:>18} {:>9} {:>14} {:>10} {:>11} {:>11} {:>14}\n", "policy", "kept for backward",
             "vs plain", "peak fwd+bwd", "ms/step", "first loss", "final loss", "grad rel err");
  for (size_t i = 0; i < variants.size(); ++i) {
    const auto& r = results[i];
    fmt::print("{:<22} {:>15.2f} MB {:>8.2f}x {:>11.2f} MB {:>10.1f} {:>11.5f} {:>11.5f} {:>14.2e}\n",
               variants[i].label, r.kept_bytes / 1e6, double(results[0].kept_bytes) / std::max<int64_t>(r.kept_bytes, 1),
               r.peak_bytes / 1e6, r.step_ms, r.first_loss, r.final_loss, r.grad_rel_err);
  }
  fmt::print(
      "\nkept for backward: bytes the forward left allocated (measured with the {} allocator), minus the output.\n"
      "grad rel err: relative L2 distance of all weight gradients at step 1 from plain PyTorch's.\n",
      cuda ? "CUDA caching" : "counting CPU");
  return 0;
}

}  // namespace unswag::cli
