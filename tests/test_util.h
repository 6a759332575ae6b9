// Shared helpers for UnSwag's tests: the devices to run on (CUDA cases skip
// where no GPU exists and run in scripts/gpu-check.sh), fresh random inputs,
// error measures against float64 references, and bitwise comparisons.
#pragma once

#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <ftw.h>
#include <unistd.h>

#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>

namespace unswag::test {

// A fresh seed per call (logged on failure by the caller through SCOPED_TRACE);
// UNSWAG_TEST_SEED=<seed> replays a logged one (every call then returns it).
inline uint64_t fresh_seed() {
  if (const char* env = std::getenv("UNSWAG_TEST_SEED"); env != nullptr && *env != '\0') {
    char* end = nullptr;
    const unsigned long long seed = std::strtoull(env, &end, 10);
    if (*end != '\0')
      throw std::invalid_argument(std::string("UNSWAG_TEST_SEED must be a decimal seed, got '") + env + "'");
    return seed;
  }
  static std::random_device rd;
  return (uint64_t(rd()) << 32) ^ rd();
}

// The source tree: UNSWAG_SOURCE_DIR (ctest sets it), else from this header's path.
inline std::string source_dir() {
  const char* env = std::getenv("UNSWAG_SOURCE_DIR");
  if (env != nullptr && *env != '\0') return env;
  const std::string here = __FILE__;  // <source>/tests/test_util.h
  return here.substr(0, here.rfind("/tests/"));
}
inline std::string source_path(const std::string& relative) { return source_dir() + "/" + relative; }

// The python with the reference libraries (torch, transformers, tokenizers,
// safetensors, numpy): UNSWAG_PYTHON (ctest sets it to scripts/setup.sh's
// .venv), else <source>/.venv/bin/python, else python3.
inline std::string python_executable() {
  const char* env = std::getenv("UNSWAG_PYTHON");
  if (env != nullptr && *env != '\0') return env;
  const std::string venv = source_path(".venv/bin/python");
  return ::access(venv.c_str(), X_OK) == 0 ? venv : "python3";
}

// True when python_executable() imports `modules` ("numpy, torch"). A test
// that compares against them fails (never skips) when this is false: the
// comparison is the test.
inline bool python_has(const std::string& modules) {
  return std::system(("'" + python_executable() + "' -c 'import " + modules + "' >/dev/null 2>&1").c_str()) == 0;
}
#define UNSWAG_REQUIRE_PYTHON(modules)                                                                         \
  ASSERT_TRUE(unswag::test::python_has(modules))                                                               \
      << "python '" << unswag::test::python_executable() << "' cannot import " << (modules)                   \
      << ": this test compares against it (run scripts/setup.sh, or set UNSWAG_PYTHON)"

// A fresh directory under $TMPDIR (or /tmp), removed with everything in it
// when the object goes.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "unswag") {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/" + prefix + "_XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp " + pattern + " failed");
    path_ = pattern;
  }
  ~TempDir() {
    // Depth-first, so files go before their directories.
    ::nftw(path_.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
           FTW_DEPTH | FTW_PHYS);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Base fixture for tests parameterised by device name ("cpu" / "cuda").
class DeviceTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "cuda" && !torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device here";
    seed_ = fresh_seed();
    torch::manual_seed(seed_);
    if (GetParam() == "cuda") torch::cuda::manual_seed_all(seed_);
  }
  torch::Device device() const { return GetParam() == "cuda" ? torch::Device(torch::kCUDA, 0) : torch::kCPU; }
  torch::TensorOptions opts(torch::ScalarType dtype) const { return torch::TensorOptions().device(device()).dtype(dtype); }
  uint64_t seed_ = 0;
};

inline std::string device_name(const ::testing::TestParamInfo<std::string>& info) { return info.param; }

#define UNSWAG_INSTANTIATE_DEVICES(Suite) \
  INSTANTIATE_TEST_SUITE_P(Devices, Suite, ::testing::Values("cpu", "cuda"), unswag::test::device_name)

// ||a - b|| / ||b|| in float64 (0 when both are empty or zero).
inline double rel_l2(const torch::Tensor& a, const torch::Tensor& b) {
  const auto ad = a.detach().to(torch::kCPU, torch::kDouble), bd = b.detach().to(torch::kCPU, torch::kDouble);
  const double den = bd.norm().item<double>(), num = (ad - bd).norm().item<double>();
  if (den == 0) return num;
  return num / den;
}

// Bitwise equality of two tensors of the same dtype (NaN payloads and signed zeros included).
inline bool bitwise_equal(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  auto int_type = a.element_size() == 2 ? torch::kInt16 : a.element_size() == 4 ? torch::kInt32 : torch::kInt64;
  return torch::equal(a.contiguous().cpu().view(int_type), b.contiguous().cpu().view(int_type));
}

inline const std::vector<torch::ScalarType>& float_dtypes() {
  static const std::vector<torch::ScalarType> d = {torch::kFloat32, torch::kFloat16, torch::kBFloat16};
  return d;
}

// Unit roundoff of a dtype (half an ulp at 1).
inline double unit_roundoff(torch::ScalarType t) {
  switch (t) {
    case torch::kBFloat16: return 1.0 / 256;
    case torch::kFloat16: return 1.0 / 2048;
    case torch::kFloat32: return 1.0 / (1 << 24);
    default: return 1.1e-16;
  }
}

// Asserts that `fn` throws c10::Error whose message contains every fragment.
template <typename Fn>
void expect_error(Fn&& fn, std::initializer_list<const char*> fragments) {
  try {
    fn();
    ADD_FAILURE() << "expected an error mentioning '" << *fragments.begin() << "'";
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    for (const char* f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << "message: " << msg << "\nmissing: " << f;
  }
}

}  // namespace unswag::test
