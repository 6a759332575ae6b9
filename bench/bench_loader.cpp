// Throughput of StreamingContextDataLoader on one CPU core, no prefetch
// thread: tokens per second read from pre-tokenized shards (uint16 and
// uint32, a few hundred MB each, written by this program) and packed into
// shuffled [B, T] batches of int64 input ids, targets and position ids. Each
// configuration runs once with the page cache warm and once cold (the shards'
// cached pages dropped with posix_fadvise DONTNEED first), best of 3 epochs.
// Results are in docs/data.md.
//
//   bench_loader [--dir DIR] [--mtokens 150] [--context 8192] [--batch 8] [--repeats 3] [--pin] [--keep]
#include <CLI/CLI.hpp>
#include <fcntl.h>
#include <fmt/core.h>
#include <sched.h>
#include <stdlib.h>
#include <unistd.h>

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "unswag/data/loader.h"

namespace {

namespace data = unswag::data;

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// `total` pseudo-random tokens below 50257 (GPT-2's vocabulary, so both dtypes
// hold the same ids) in `files` shards, EOS (50256) about once per 1000.
std::vector<std::string> write_shards(const std::string& prefix, data::TokenDtype dtype, int64_t total, int files) {
  std::vector<std::string> paths;
  uint64_t state = 0x9E3779B97F4A7C15ull;
  std::vector<int32_t> block(1 << 20);
  for (int f = 0; f < files; ++f) {
    paths.push_back(data::shard_path(prefix, f));
    data::ShardWriter writer(paths.back(), dtype, 50256);
    for (int64_t left = total / files; left > 0;) {
      const int64_t n = std::min<int64_t>(left, int64_t(block.size()));
      for (int64_t i = 0; i < n; ++i) {
        state ^= state << 13, state ^= state >> 7, state ^= state << 17;  // xorshift64
        block[size_t(i)] = state % 1000 == 0 ? 50256 : int32_t(state % 50256);
      }
      writer.append(block.data(), size_t(n));
      left -= n;
    }
    writer.close();  // fsynced: the pages are clean, so DONTNEED can drop them
  }
  return paths;
}

void drop_page_cache(const std::vector<std::string>& paths) {
  for (const std::string& p : paths) {
    const int fd = ::open(p.c_str(), O_RDONLY);
    if (fd < 0) continue;
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
}

void warm_page_cache(const std::vector<std::string>& paths) {
  std::vector<char> buffer(1 << 20);
  for (const std::string& p : paths) {
    const int fd = ::open(p.c_str(), O_RDONLY);
    while (fd >= 0 && ::read(fd, buffer.data(), buffer.size()) > 0) {
    }
    if (fd >= 0) ::close(fd);
  }
}

struct Result {
  double tokens_per_s = 0, mb_per_s = 0, seconds = 0;
  int64_t tokens = 0;
};

// One epoch (every step) of a fresh loader, timed from construction.
Result run_epoch(const std::vector<std::string>& paths, int64_t T, int64_t B, data::DocumentMode mode,
                 int token_bytes, bool pin) {
  data::LoaderOptions o;
  o.inputs = paths;
  o.context_length = T;
  o.batch_size = B;
  o.seed = 1234;
  o.shuffle = true;
  o.prefetch = 0;  // everything on this thread
  o.document_mode = mode;
  o.eos_id = 50256;
  o.pin_memory = pin;  // pinned buffers come from CUDA's caching host allocator
  const auto start = std::chrono::steady_clock::now();
  data::StreamingContextDataLoader loader(o);
  int64_t checksum = 0;
  for (int64_t s = 0; s < loader.steps_per_epoch(); ++s) {
    const data::Batch b = loader.next();
    checksum += b.targets.data_ptr<int64_t>()[T - 1];  // keeps the work observable
  }
  Result r;
  r.seconds = seconds_since(start);
  r.tokens = loader.steps_per_epoch() * B * T;
  r.tokens_per_s = double(r.tokens) / r.seconds;
  r.mb_per_s = r.tokens_per_s * token_bytes / 1e6;
  if (checksum == 42) std::puts("");
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"StreamingContextDataLoader throughput on one core"};
  std::string dir;
  int64_t mtokens = 150, T = 8192, B = 8;
  int repeats = 3;
  bool keep = false, pin = false;
  app.add_option("--dir", dir, "where to write the shards (default: a new directory under $TMPDIR or /tmp)");
  app.add_option("--mtokens", mtokens, "million tokens per dtype")->check(CLI::PositiveNumber);
  app.add_option("--context", T, "context length T")->check(CLI::PositiveNumber);
  app.add_option("--batch", B, "batch size B")->check(CLI::PositiveNumber);
  app.add_option("--repeats", repeats, "epochs per configuration; the best is printed")->check(CLI::PositiveNumber);
  app.add_flag("--pin", pin, "pinned host batches (needs CUDA), as in GPU training");
  app.add_flag("--keep", keep, "keep the shards afterwards");
  CLI11_PARSE(app, argc, argv);

  // One core: the loader's own thread and ATen's intra-op pool both pinned.
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(sched_getcpu(), &one);
  sched_setaffinity(0, sizeof(one), &one);
  at::set_num_threads(1);

  bool made_dir = false;
  if (dir.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/unswag_bench_loader_XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) {
      std::perror("mkdtemp");
      return 1;
    }
    dir = pattern;
    made_dir = true;
  }

  fmt::print("bench_loader: {}M tokens per dtype in 3 shards each, T={} B={}, shuffled, one core, no prefetch, "
             "best of {} epochs{}\n", mtokens, T, B, repeats, pin ? ", pinned" : "");
  fmt::print("\n{:<8} {:>9} {:<15} {:>6} {:>12} {:>10} {:>9}\n", "dtype", "shard MB", "mode", "cache",
             "Mtokens/s", "disk MB/s", "seconds");
  std::vector<std::string> all;
  for (const auto dtype : {data::TokenDtype::kUInt16, data::TokenDtype::kUInt32}) {
    const int width = int(dtype);
    const std::vector<std::string> paths =
        write_shards(dir + "/bench_" + data::to_string(dtype), dtype, mtokens * 1'000'000, 3);
    all.insert(all.end(), paths.begin(), paths.end());
    const double mb = double(mtokens) * width;
    for (const auto mode : {data::DocumentMode::kNone, data::DocumentMode::kDocumentMask}) {
      for (const bool cold : {false, true}) {
        // Best of `repeats` epochs (the machine is shared; the first epoch of
        // a process also pays for growing the heap).
        Result r;
        for (int rep = 0; rep < repeats; ++rep) {
          if (cold)
            drop_page_cache(paths);
          else
            warm_page_cache(paths);
          Result one;
          try {
            one = run_epoch(paths, T, B, mode, width, pin);
          } catch (const c10::Error& e) {
            fmt::print(stderr, "bench_loader: {}\n", e.what_without_backtrace());
            for (const std::string& p : all) ::unlink(p.c_str());
            if (made_dir) ::rmdir(dir.c_str());
            return 1;
          }
          if (one.tokens_per_s > r.tokens_per_s) r = one;
        }
        fmt::print("{:<8} {:>9.0f} {:<15} {:>6} {:>12.1f} {:>10.0f} {:>9.2f}\n", data::to_string(dtype), mb,
                   data::to_string(mode), cold ? "cold" : "warm", r.tokens_per_s / 1e6, r.mb_per_s, r.seconds);
        std::fflush(stdout);
      }
    }
  }
  if (!keep) {
    for (const std::string& p : all) ::unlink(p.c_str());
    if (made_dir) ::rmdir(dir.c_str());
  } else {
    fmt::print("\nshards kept in {}\n", dir);
  }
  return 0;
}
