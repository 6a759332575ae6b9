// Encode and decode speed of unswag::data::Tokenizer on real text (the license
// files of the system, or files given), single-threaded, in MB of UTF-8 input
// per second: the first pass (empty word cache) and the best of the following
// passes (warm cache). With --python it times the `tokenizers` library on the
// same text in the same way (Tokenizer.encode, one thread) and checks that its
// ids equal ours. Results are in docs/tokenizer.md.
//
//   bench_tokenizer [--tokenizer DIR_OR_JSON]... [--file PATH]... [--passes N] [--python PYTHON]
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "unswag/data/tokenizer.h"

namespace {

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// The repository root, from this file's path (<root>/bench/bench_tokenizer.cpp).
std::string source_dir() {
  const std::string here = __FILE__;
  return here.substr(0, here.rfind("/bench/"));
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The reference: same files, same passes, one thread; prints
// "first_mbs best_mbs decode_mbs ids_checksum".
const char* kPythonTimer = R"PY(
import os, sys, time
os.environ["RAYON_NUM_THREADS"] = "1"
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1]); passes = int(sys.argv[2]); files = sys.argv[3:]
texts = [open(f, encoding="utf-8").read() for f in files]
mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
def run():
    t0 = time.perf_counter(); ids = [tok.encode(t).ids for t in texts]; return time.perf_counter() - t0, ids
first, ids = run()
best = min(run()[0] for _ in range(max(passes - 1, 1)))
t0 = time.perf_counter()
for i in ids: tok.decode(i, skip_special_tokens=False)
dec = time.perf_counter() - t0
checksum = sum((k + 1) * v for seq in ids for k, v in enumerate(seq)) % (1 << 61)
print(mb / first, mb / best, mb / dec, checksum)
)PY";

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Tokenizer encode/decode speed (single thread)"};
  std::vector<std::string> tokenizers, files;
  int passes = 5;
  std::string python;
  app.add_option("--tokenizer", tokenizers, "tokenizer.json or its directory (repeatable)");
  app.add_option("--file", files, "UTF-8 text file (repeatable; default: /usr/share/common-licenses/*)");
  app.add_option("--passes", passes, "passes over the text (the first has an empty cache)")->check(CLI::Range(2, 1000));
  app.add_option("--python", python, "python with `tokenizers`, to time the reference too");
  CLI11_PARSE(app, argc, argv);
  if (tokenizers.empty())
    for (const char* style : {"gpt2", "llama3", "qwen2"})
      tokenizers.push_back(source_dir() + "/tests/fixtures/tokenizers/" + style);
  if (files.empty())
    for (const char* name : {"GPL-3", "GPL-2", "LGPL-2.1", "LGPL-3", "Apache-2.0", "Artistic", "BSD", "GFDL-1.2",
                             "GFDL-1.3", "MPL-1.1", "MPL-2.0", "CC0-1.0"})
      files.push_back(std::string("/usr/share/common-licenses/") + name);

  std::vector<std::string> texts;
  double megabytes = 0;
  for (const auto& f : files) {
    texts.push_back(read_text(f));
    megabytes += double(texts.back().size()) / 1e6;
  }
  fmt::print("{} files, {:.3f} MB of text, {} passes, 1 thread\n\n", files.size(), megabytes, passes);
  fmt::print("{:<28} {:>14} {:>14} {:>12} {:>9}\n", "tokenizer", "encode cold", "encode warm", "decode", "bytes/id");
  for (const auto& path : tokenizers) {
    std::vector<std::vector<int32_t>> ids(texts.size());
    auto run = [&](const unswag::data::Tokenizer& tok) {
      const auto start = std::chrono::steady_clock::now();
      for (size_t i = 0; i < texts.size(); ++i) ids[i] = tok.encode(texts[i]);
      return seconds_since(start);
    };
    const auto tok = unswag::data::Tokenizer::from_file(path);
    const double first = run(tok);
    double best = 1e30;
    for (int p = 1; p < passes; ++p) best = std::min(best, run(tok));
    const auto start = std::chrono::steady_clock::now();
    size_t count = 0, decoded = 0;
    for (const auto& seq : ids) decoded += tok.decode(seq).size(), count += seq.size();
    const double decode_s = seconds_since(start);
    const std::string name = tok.path().substr(0, tok.path().rfind('/'));
    const std::string label = name.substr(name.rfind('/') + 1);
    fmt::print("{:<28} {:>9.2f} MB/s {:>9.2f} MB/s {:>7.2f} MB/s {:>9.2f}\n", "unswag " + label, megabytes / first,
               megabytes / best, double(decoded) / 1e6 / decode_s, megabytes * 1e6 / double(count));
    if (python.empty()) continue;
    uint64_t checksum = 0;  // same formula as the Python side, modulo 2^61
    for (const auto& seq : ids)
      for (size_t k = 0; k < seq.size(); ++k)
        checksum = uint64_t((__uint128_t(checksum) + __uint128_t(k + 1) * uint64_t(seq[k])) % (uint64_t(1) << 61));
    const std::string script = "/tmp/unswag_bench_tokenizer_" + std::to_string(::getpid()) + ".py";
    std::ofstream(script) << kPythonTimer;
    std::string cmd = "'" + python + "' " + script + " '" + tok.path() + "' " + std::to_string(passes);
    for (const auto& f : files) cmd += " '" + f + "'";
    std::string out;
    if (FILE* p = ::popen(cmd.c_str(), "r")) {
      char buffer[512];
      while (std::fgets(buffer, sizeof(buffer), p) != nullptr) out += buffer;
      ::pclose(p);
    }
    std::remove(script.c_str());
    double py_first = 0, py_best = 0, py_decode = 0;
    unsigned long long py_checksum = 0;
    if (std::sscanf(out.c_str(), "%lf %lf %lf %llu", &py_first, &py_best, &py_decode, &py_checksum) != 4) {
      fmt::print("  python failed: {}\n", out);
      continue;
    }
    fmt::print("{:<28} {:>9.2f} MB/s {:>9.2f} MB/s {:>7.2f} MB/s   ids {}\n", "tokenizers (Python) " + label, py_first,
               py_best, py_decode, py_checksum == checksum ? "identical" : "DIFFER");
  }
  return 0;
}
