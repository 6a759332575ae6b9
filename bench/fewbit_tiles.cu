// Tuning sweep for the few-bit CUDA kernels: effective bandwidth of
// fewbit_forward / fewbit_backward for each schedule (tiles per warp, one pass
// or persistent with the next loads issued before the math; elementwise.cu
// explains both) and, at 3 and 4 bits, for the binary-search encode against
// the cell table, as a fraction of a device-to-device copy of the same input,
// for bf16 / fp16 / fp32, ReLU (1 bit: relu_1bit), SiLU / GELU and 1-4 bits.
// Every variant's outputs are compared byte for byte with tiles=1's (neither
// the schedule nor the encode may change results). The defaults in
// elementwise.cu (fewbit_fwd_schedule / fewbit_bwd_schedule) come from it.
//
// Built by -DUNSWAG_BUILD_TUNING=ON (CUDA builds only; scripts/gpu-check.sh sets
// it) as bench_fewbit_tiles; bench/fewbit_tiles.py runs it and writes its
// docs section (GPU_CHECK_BENCHES=fewbit_tiles).
#include "../src/kernels/elementwise.cu"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace uk = unswag::kernels;

namespace {

#define CHECK_CUDA(expr)                                                               \
  do {                                                                                 \
    cudaError_t e_ = (expr);                                                           \
    if (e_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

constexpr int kWarmup = 10;
constexpr int kReps = 50;

// Off for the correctness pass on an odd-sized, misaligned input: one launch, no timing.
bool g_timed = true;

// Median milliseconds of `launch` over kReps runs, each timed by CUDA events.
template <typename F>
double median_ms(F&& launch) {
  if (!g_timed) {
    launch();
    CHECK_CUDA(cudaDeviceSynchronize());
    return 0;
  }
  for (int i = 0; i < kWarmup; ++i) launch();
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  std::vector<float> ms(kReps);
  for (int i = 0; i < kReps; ++i) {
    CHECK_CUDA(cudaEventRecord(a));
    launch();
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    CHECK_CUDA(cudaEventElapsedTime(&ms[i], a, b));
  }
  CHECK_CUDA(cudaGetLastError());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::nth_element(ms.begin(), ms.begin() + kReps / 2, ms.end());
  return ms[kReps / 2];
}

std::vector<char> to_host(const void* p, size_t bytes) {
  std::vector<char> h(bytes);
  CHECK_CUDA(cudaMemcpy(h.data(), p, bytes, cudaMemcpyDeviceToHost));
  return h;
}

const char* dtype_name(uk::DType d) {
  switch (d) {
    case uk::DType::kBFloat16: return "bf16";
    case uk::DType::kFloat16: return "fp16";
    case uk::DType::kFloat32: return "fp32";
    default: return "fp64";
  }
}

struct Buffers {
  void* x = nullptr;
  void* y = nullptr;
  void* dx = nullptr;
  uint32_t* codes = nullptr;
  int64_t n = 0;
};

template <typename T, int kBits, uk::Act kAct, int kTiles, bool kPersistent, bool kCells = true>
double time_forward(const Buffers& b, const uk::FewbitTable& table, std::vector<char>* y_out,
                    std::vector<char>* c_out) {
  uk::FewbitForwardParams p;
  p.x = b.x;
  p.y = b.y;
  p.codes = b.codes;
  p.n = b.n;
  p.act = kAct;
  p.table = table;
  const double ms = median_ms([&] { uk::launch_fewbit_forward<T, kBits, kAct, kTiles, kPersistent, kCells>(p, nullptr); });
  *y_out = to_host(b.y, size_t(b.n) * sizeof(T));
  *c_out = to_host(b.codes, size_t(uk::code_words(b.n, kBits)) * 4);
  return ms;
}

template <typename T, int kBits, int kTiles, bool kPersistent>
double time_backward(const Buffers& b, const uk::FewbitTable& table, std::vector<char>* dx_out) {
  uk::FewbitBackwardParams p;
  p.grad_y = b.x;
  p.codes = b.codes;
  p.grad_x = b.dx;
  p.n = b.n;
  p.table = table;
  const double ms = median_ms([&] { uk::launch_fewbit_backward<T, kBits, kTiles, kPersistent>(p, nullptr); });
  *dx_out = to_host(b.dx, size_t(b.n) * sizeof(T));
  return ms;
}

int g_mismatches = 0;

template <typename T, int kBits, uk::Act kAct>
void sweep_pass(uk::DType dtype, const Buffers& b, double copy_ms, bool print) {
  const uk::FewbitTable& table = uk::fewbit_table(kAct, kBits);
  const double io = double(b.n) * sizeof(T) * 2 + double(uk::code_words(b.n, kBits)) * 4;
  const double copy_bw = double(b.n) * sizeof(T) * 2 / copy_ms;
  auto pct = [&](double ms) { return 100.0 * (io / ms) / copy_bw; };
  std::vector<char> y_ref, c_ref, y, c, dx_ref, dx;
  constexpr uk::FewbitSchedule def_f = uk::fewbit_fwd_schedule<T, kBits, kAct>();
  constexpr uk::FewbitSchedule def_b = uk::fewbit_bwd_schedule<T, kBits>();
  auto name = [](uk::FewbitSchedule d) { return (d.persistent ? "P" : "") + std::to_string(d.tiles); };
  auto check = [&](const char* what, const char* variant, const std::vector<char>& got, const std::vector<char>& want) {
    if (got != want) {
      ++g_mismatches;
      std::printf("MISMATCH %s %s %s %d-bit %s (n = %lld)\n", what, dtype_name(dtype), uk::act_name(kAct), kBits,
                  variant, (long long)b.n);
    }
  };
  // Run each variant, then compare its outputs with the tiles=1 run.
  auto fwd = [&](const char* variant, auto time) {
    const double ms = time();
    if (variant == nullptr) return ms;
    check("forward y", variant, y, y_ref);
    check("forward codes", variant, c, c_ref);
    return ms;
  };
  const double f1 = time_forward<T, kBits, kAct, 1, false>(b, table, &y_ref, &c_ref);
  const double f2 = fwd("t=2", [&] { return time_forward<T, kBits, kAct, 2, false>(b, table, &y, &c); });
  const double f4 = fwd("t=4", [&] { return time_forward<T, kBits, kAct, 4, false>(b, table, &y, &c); });
  const double p1 = fwd("P1", [&] { return time_forward<T, kBits, kAct, 1, true>(b, table, &y, &c); });
  const double p2 = fwd("P2", [&] { return time_forward<T, kBits, kAct, 2, true>(b, table, &y, &c); });
  // The binary-search encode at the default schedule (3 and 4 bits).
  double search = 0;
  if constexpr (kBits >= 3)
    search = fwd("search", [&] {
      return time_forward<T, kBits, kAct, def_f.tiles, def_f.persistent, false>(b, table, &y, &c);
    });
  // Backward reads the codes the last forward wrote (the same for every variant).
  auto bwd = [&](const char* variant, auto time) {
    const double ms = time();
    check("backward", variant, dx, dx_ref);
    return ms;
  };
  const double b1 = time_backward<T, kBits, 1, false>(b, table, &dx_ref);
  const double b2 = bwd("t=2", [&] { return time_backward<T, kBits, 2, false>(b, table, &dx); });
  const double b4 = bwd("t=4", [&] { return time_backward<T, kBits, 4, false>(b, table, &dx); });
  const double q1 = bwd("P1", [&] { return time_backward<T, kBits, 1, true>(b, table, &dx); });
  const double q2 = bwd("P2", [&] { return time_backward<T, kBits, 2, true>(b, table, &dx); });
  char search_cell[16] = "-";
  if (kBits >= 3) std::snprintf(search_cell, sizeof search_cell, "%.0f%%", pct(search));
  if (!print) return;
  std::printf("| %s | %s | %d | %.0f%% | %.0f%% | %.0f%% | %.0f%% | %.0f%% | %s | %s | %.0f%% | %.0f%% | %.0f%% | %.0f%% | %.0f%% | %s |\n",
              dtype_name(dtype), uk::act_name(kAct), kBits, pct(f1), pct(f2), pct(f4), pct(p1), pct(p2), search_cell,
              name(def_f).c_str(), pct(b1), pct(b2), pct(b4), pct(q1), pct(q2), name(def_b).c_str());
}

// Times every variant on `full` after running each once on `odd` (an odd
// length at a misaligned address: the tails and unaligned paths); both passes
// compare every variant's outputs byte for byte with tiles=1's.
template <typename T, int kBits, uk::Act kAct>
void sweep(uk::DType dtype, const Buffers& full, const Buffers& odd, double copy_ms) {
  g_timed = false;
  sweep_pass<T, kBits, kAct>(dtype, odd, copy_ms, false);
  g_timed = true;
  sweep_pass<T, kBits, kAct>(dtype, full, copy_ms, true);
}

template <typename T>
void run_dtype(uk::DType dtype, int64_t bytes) {
  Buffers b;
  b.n = bytes / int64_t(sizeof(T));
  CHECK_CUDA(cudaMalloc(&b.x, size_t(bytes)));
  CHECK_CUDA(cudaMalloc(&b.y, size_t(bytes)));
  CHECK_CUDA(cudaMalloc(&b.dx, size_t(bytes)));
  CHECK_CUDA(cudaMalloc(&b.codes, size_t(uk::code_words(b.n, 4)) * 4));
  // x ~ N(0, 1) by Box-Muller on the host (deterministic, spreads the codes).
  std::vector<T> h(size_t(b.n));
  uint64_t s = 0x9E3779B97F4A7C15ull;
  auto uni = [&] {
    s ^= s << 13; s ^= s >> 7; s ^= s << 17;
    return (double(s >> 11) + 0.5) / 9007199254740992.0;
  };
  for (auto& v : h) {
    const double g = std::sqrt(-2 * std::log(uni())) * std::cos(6.283185307179586 * uni());
    v = T(float(g));
  }
  CHECK_CUDA(cudaMemcpy(b.x, h.data(), size_t(bytes), cudaMemcpyHostToDevice));
  const double copy_ms = median_ms([&] { CHECK_CUDA(cudaMemcpyAsync(b.y, b.x, size_t(bytes), cudaMemcpyDeviceToDevice)); });
  // The correctness pass's input: odd length, one element past an aligned address.
  Buffers odd = b;
  odd.x = static_cast<T*>(b.x) + 1;
  odd.y = static_cast<T*>(b.y) + 1;
  odd.dx = static_cast<T*>(b.dx) + 1;
  odd.n = 1000003;
  std::printf("\n%s: %.1f MiB input, copy %.4f ms = %.0f GB/s (read + write)\n\n", dtype_name(dtype),
              bytes / 1048576.0, copy_ms, 2.0 * bytes / copy_ms / 1e6);
  std::printf("| dtype | act | bits | fwd t=1 | t=2 | t=4 | P1 | P2 | search | default | bwd t=1 | t=2 | t=4 | P1 | P2 | default |\n");
  std::printf("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  // relu_1bit is the 1-bit ReLU case of the same kernels: its row shows whether
  // the activation's math (none here) or the 1-bit layout sets the speed.
  sweep<T, 1, uk::Act::kReLU>(dtype, b, odd, copy_ms);
  sweep<T, 1, uk::Act::kSiLU>(dtype, b, odd, copy_ms);
  sweep<T, 2, uk::Act::kSiLU>(dtype, b, odd, copy_ms);
  sweep<T, 3, uk::Act::kSiLU>(dtype, b, odd, copy_ms);
  sweep<T, 4, uk::Act::kSiLU>(dtype, b, odd, copy_ms);
  sweep<T, 1, uk::Act::kGELU>(dtype, b, odd, copy_ms);
  sweep<T, 2, uk::Act::kGELU>(dtype, b, odd, copy_ms);
  sweep<T, 3, uk::Act::kGELU>(dtype, b, odd, copy_ms);
  sweep<T, 4, uk::Act::kGELU>(dtype, b, odd, copy_ms);
  cudaFree(b.x);
  cudaFree(b.y);
  cudaFree(b.dx);
  cudaFree(b.codes);
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t mib = argc > 1 ? std::atoll(argv[1]) : 256;
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("# few-bit kernels: %% of copy bandwidth by schedule and encode (%s, %d SMs)\n", prop.name,
              prop.multiProcessorCount);
  std::printf("bytes counted: forward x + y + codes, backward grad_y + grad_x + codes; median of %d after %d warm-ups\n",
              kReps, kWarmup);
  run_dtype<__nv_bfloat16>(uk::DType::kBFloat16, mib << 20);
  run_dtype<__half>(uk::DType::kFloat16, mib << 20);
  run_dtype<float>(uk::DType::kFloat32, mib << 20);
  if (g_mismatches) {
    std::printf("\n%d variant outputs differ from tiles=1\n", g_mismatches);
    return 1;
  }
  std::printf("\nall variants agree byte for byte\n");
  return 0;
}
