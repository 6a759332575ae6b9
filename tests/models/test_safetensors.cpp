// Tests of unswag::safetensors: files exchanged both ways with the Python
// `safetensors` library (the reference implementation), C++ round trips of
// every dtype, one hand-built corrupt file per validation rule, the atomic
// writer's behaviour on failure, and sharded checkpoints.
#include "unswag/safetensors.h"

#include <dirent.h>
#include <ftw.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <torch/cuda.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <set>
#include <sstream>
#include <tuple>

#include "test_util.h"

namespace unswag {
namespace {

namespace st = unswag::safetensors;

// Every dtype with its name in the format, written out here from the
// specification so that a wrong mapping in the library cannot cancel out.
const std::vector<std::pair<torch::ScalarType, std::string>>& all_dtypes() {
  static const std::vector<std::pair<torch::ScalarType, std::string>> d = {
      {torch::kBool, "BOOL"},         {torch::kByte, "U8"},           {torch::kChar, "I8"},
      {torch::kShort, "I16"},         {torch::kUInt16, "U16"},        {torch::kInt, "I32"},
      {torch::kUInt32, "U32"},        {torch::kLong, "I64"},          {torch::kUInt64, "U64"},
      {torch::kHalf, "F16"},          {torch::kBFloat16, "BF16"},     {torch::kFloat, "F32"},
      {torch::kDouble, "F64"},        {torch::kComplexFloat, "C64"},  {torch::kFloat8_e4m3fn, "F8_E4M3"},
      {torch::kFloat8_e5m2, "F8_E5M2"}};
  return d;
}

std::string spec_name(torch::ScalarType dtype) {
  for (const auto& [type, name] : all_dtypes())
    if (type == dtype) return name;
  return "(not in the test's table)";
}

// Random bit patterns of `dtype` (NaN payloads and -0 included, so comparisons
// must be bytewise); bools are 0/1.
torch::Tensor random_tensor(torch::ScalarType dtype, at::IntArrayRef shape) {
  if (dtype == torch::kBool) return torch::randint(0, 2, shape, torch::kByte).to(torch::kBool);
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  const int64_t size = int64_t(c10::elementSize(dtype));
  return torch::randint(0, 256, {n * size}, torch::kByte).view(dtype).reshape(shape);
}

std::string bytes_of(const torch::Tensor& t) {
  const torch::Tensor c = t.contiguous().cpu();
  return std::string(static_cast<const char*>(c.const_data_ptr()), size_t(c.nbytes()));
}

std::string hex(const std::string& s) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out;
}

std::string unhex(const std::string& h) {
  std::string out;
  for (size_t i = 0; i + 1 < h.size(); i += 2) out += char(std::stoi(h.substr(i, 2), nullptr, 16));
  return out;
}

// Same dtype, shape and bytes.
::testing::AssertionResult same_tensor(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type())
    return ::testing::AssertionFailure() << "dtype " << a.scalar_type() << " vs " << b.scalar_type();
  if (a.sizes() != b.sizes()) return ::testing::AssertionFailure() << "shape " << a.sizes() << " vs " << b.sizes();
  if (bytes_of(a) != bytes_of(b)) return ::testing::AssertionFailure() << "bytes differ";
  return ::testing::AssertionSuccess();
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

// A file made by hand: the length prefix (the header's own size unless
// `length` overrides it), the header text, then `data_size` data bytes.
std::string raw_file(const std::string& header, size_t data_size, int64_t length = -1) {
  const uint64_t n = length < 0 ? header.size() : uint64_t(length);
  std::string out;
  for (int i = 0; i < 8; ++i) out += char((n >> (8 * i)) & 0xff);
  return out + header + std::string(data_size, '\0');
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

class Safetensors : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = test::fresh_seed();
    torch::manual_seed(seed_);
    tmp_ = std::make_unique<test::TempDir>("unswag_safetensors");
    dir_ = tmp_->path();
  }
  std::string in_dir(const std::string& name) const { return dir_ + "/" + name; }

  // The names in the test directory.
  std::vector<std::string> listing() const {
    std::vector<std::string> names;
    if (DIR* d = ::opendir(dir_.c_str())) {
      while (const dirent* e = ::readdir(d))
        if (std::string(e->d_name) != "." && std::string(e->d_name) != "..") names.push_back(e->d_name);
      ::closedir(d);
    }
    return names;
  }

  // Every dtype in the shapes that are edge cases: scalar, zero-size, 1-D, 3-D.
  std::map<std::string, torch::Tensor> every_dtype() const {
    std::map<std::string, torch::Tensor> t;
    for (const auto& [dtype, name] : all_dtypes()) {
      const std::string base = "layers." + name + ".";
      t[base + "scalar"] = random_tensor(dtype, {});
      t[base + "empty"] = random_tensor(dtype, {4, 0});
      t[base + "vector"] = random_tensor(dtype, {9});
      t[base + "cube"] = random_tensor(dtype, {2, 3, 5});
    }
    return t;
  }

  uint64_t seed_ = 0;
  std::unique_ptr<test::TempDir> tmp_;
  std::string dir_;
};

// --- (1) exchange with the Python reference implementation ------------------

TEST_F(Safetensors, ExchangeWithPythonLibrary) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  UNSWAG_REQUIRE_PYTHON("torch, safetensors.torch");
  const std::string python = unswag::test::python_executable();
  const std::string script = unswag::test::source_path("tests/models/make_safetensors_fixture.py");
  ASSERT_EQ(::access(script.c_str(), R_OK), 0) << "cannot read " << script;

  auto tensors = every_dtype();
  tensors["ünïcödé name"] = random_tensor(torch::kFloat, {3});
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"note", "quotes \" and \\ and ünïcödé\nnewline"}, {"seed", std::to_string(seed_)}};
  st::save(tensors, in_dir("cpp.safetensors"), metadata);

  const std::string cmd = "'" + python + "' '" + script + "' '" + dir_ + "'";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;

  // Reads a report of the script: tensors and metadata as the reference saw them.
  auto read_report = [](const std::string& path, std::map<std::string, std::string>& meta) {
    std::map<std::string, std::tuple<std::string, std::vector<int64_t>, std::string>> out;
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
      std::istringstream fields(line);
      std::string kind, a, b, c, d;
      fields >> kind >> a >> b;
      if (kind == "M") {
        meta[unhex(a)] = unhex(b);
        continue;
      }
      fields >> c >> d;
      std::vector<int64_t> shape;
      if (c != "-") {
        std::istringstream dims(c);
        for (std::string dim; std::getline(dims, dim, ',');) shape.push_back(std::stoll(dim));
      }
      out[unhex(a)] = {b, shape, d == "-" ? "" : unhex(d)};
    }
    return out;
  };

  // The C++ writer, checked by the reference reader.
  std::map<std::string, std::string> seen_meta;
  const auto seen = read_report(in_dir("cpp_seen.txt"), seen_meta);
  EXPECT_EQ(seen_meta, metadata);
  ASSERT_EQ(seen.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(seen.count(name));
    const auto& [dtype, shape, bytes] = seen.at(name);
    EXPECT_EQ(dtype, spec_name(t.scalar_type()));
    EXPECT_EQ(shape, t.sizes().vec());
    EXPECT_TRUE(bytes == bytes_of(t));
  }

  // The reference writer's copy of our file, checked by the C++ reader.
  const auto back = st::File::open(in_dir("cpp_back.safetensors"));
  EXPECT_EQ(back.metadata(), metadata);
  const auto back_tensors = st::load(in_dir("cpp_back.safetensors"));
  ASSERT_EQ(back_tensors.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(back_tensors.count(name));
    EXPECT_TRUE(same_tensor(back_tensors.at(name), t));
  }

  // Fresh tensors written by the reference implementation, checked by the C++ reader.
  std::map<std::string, std::string> py_meta;
  const auto expected = read_report(in_dir("python.txt"), py_meta);
  const auto py_file = st::File::open(in_dir("python.safetensors"));
  EXPECT_EQ(py_file.metadata(), py_meta);
  EXPECT_EQ(py_file.tensors().size(), expected.size());
  std::set<std::string> dtypes_seen;
  for (const auto& [name, record] : expected) {
    SCOPED_TRACE(name);
    const auto& [dtype, shape, bytes] = record;
    ASSERT_TRUE(py_file.contains(name));
    const torch::Tensor t = py_file.get(name);
    EXPECT_EQ(spec_name(t.scalar_type()), dtype);
    EXPECT_EQ(t.sizes().vec(), shape);
    EXPECT_TRUE(bytes_of(t) == bytes);
    dtypes_seen.insert(dtype);
  }
  EXPECT_EQ(dtypes_seen.size(), all_dtypes().size());
}

// --- (2) C++ round trips -------------------------------------------------------

TEST_F(Safetensors, RoundTripEveryDtype) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  auto tensors = every_dtype();
  // Non-contiguous inputs: a transpose, a strided slice, an expanded tensor,
  // a conjugated complex view and a negated view (lazy conj and neg bits).
  const auto base = torch::randn({6, 8});
  tensors["noncontig.transpose"] = base.t();
  tensors["noncontig.slice"] = base.index({torch::indexing::Slice(1, torch::indexing::None, 2),
                                           torch::indexing::Slice(torch::indexing::None, torch::indexing::None, 3)});
  tensors["noncontig.expand"] = torch::randn({1, 5}).expand({4, 5});
  const auto complex = torch::randn({3}, torch::kComplexFloat);
  tensors["noncontig.conj"] = complex.conj();
  tensors["noncontig.neg"] = torch::imag(complex.conj());
  const auto path = in_dir("round.safetensors");
  const std::map<std::string, std::string> metadata = {{"k", "v"}, {"empty", ""}};
  st::save(tensors, path, metadata);

  const auto loaded = st::load(path);
  ASSERT_EQ(loaded.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(loaded.count(name));
    EXPECT_TRUE(same_tensor(loaded.at(name), t.resolve_conj().resolve_neg().contiguous()));
    EXPECT_TRUE(loaded.at(name).is_contiguous());
  }
  // Lazy conjugate/negative views are saved as their values, not as the storage underneath.
  EXPECT_TRUE(torch::equal(loaded.at("noncontig.conj"), torch::conj_physical(complex)));
  EXPECT_TRUE(torch::equal(loaded.at("noncontig.neg"), -torch::imag(complex).clone()));

  const auto file = st::File::open(path);
  EXPECT_EQ(file.metadata(), metadata);
  // Every tensor is aligned to its element size in the file, so get() views
  // the mapping rather than copying.
  for (const auto& info : file.tensors()) {
    SCOPED_TRACE(info.name);
    EXPECT_EQ(info.dtype, spec_name(tensors.at(info.name).scalar_type()));
    EXPECT_EQ(info.shape, tensors.at(info.name).sizes().vec());
    EXPECT_EQ((8 + info.begin) % c10::elementSize(st::scalar_type(info.dtype)), 0u);
  }
  // The header is space-padded to a multiple of 8.
  std::ifstream in(path, std::ios::binary);
  unsigned char len[8];
  in.read(reinterpret_cast<char*>(len), 8);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len[i];
  EXPECT_EQ(n % 8, 0u);
}

TEST_F(Safetensors, DtypeNames) {
  for (const auto& [type, name] : all_dtypes()) {
    EXPECT_EQ(st::dtype_name(type), name);
    EXPECT_EQ(st::scalar_type(name), type);
  }
  EXPECT_NE(error_of([] { st::dtype_name(torch::kComplexDouble); }).find("not supported"), std::string::npos);
  EXPECT_NE(error_of([] { st::scalar_type("F7"); }).find("\"F7\""), std::string::npos);
}

TEST_F(Safetensors, ViewsOutliveFileAndNeverWriteIt) {
  const auto path = in_dir("view.safetensors");
  const auto x = torch::randn({16, 4});
  st::save({{"x", x}}, path);
  torch::Tensor view;
  {
    const auto file = st::File::open(path);
    view = file.get("x");
    EXPECT_EQ(file.info("x").dtype, "F32");
    EXPECT_FALSE(file.contains("y"));
    EXPECT_NE(error_of([&] { file.get("y"); }).find("no tensor named \"y\""), std::string::npos);
  }
  EXPECT_TRUE(same_tensor(view, x));  // the mapping lives on in the tensor
  view.fill_(1.0f);                   // copy-on-write: private to this process
  EXPECT_TRUE(same_tensor(st::load(path).at("x"), x));
}

TEST_F(Safetensors, EmptyFileAndCudaInput) {
  const auto path = in_dir("empty.safetensors");
  st::save({}, path);
  EXPECT_TRUE(st::load(path).empty());
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device here (the empty-file case ran)";
  const auto x = torch::randn({5, 7}, torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16));
  st::save({{"x", x.t()}}, path);
  EXPECT_TRUE(same_tensor(st::load(path).at("x"), x.t().cpu().contiguous()));
}

// --- (3) corrupt files -----------------------------------------------------------

struct Corruption {
  std::string what;
  std::string file;      // the bytes
  std::string expected;  // a fragment the error message must contain
};

TEST_F(Safetensors, CorruptFilesGiveClearErrors) {
  // An 8-byte F32 pair for building on.
  const std::string ok = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const std::vector<Corruption> cases = {
      {"short file", std::string("\x05\x00\x00", 3), "shorter than the 8-byte"},
      {"header past end", raw_file("{" + ok + "}", 8, 4096), "exceeds the file size"},
      {"header over cap", raw_file("{" + ok + "}", 8, int64_t(200'000'000)), "exceeds the limit"},
      {"invalid json", raw_file("{" + ok, 8), "not valid JSON"},
      {"invalid utf8", raw_file("{\"\xff\":{}}", 0), "not valid JSON"},
      {"not an object", raw_file("[1,2]", 0), "must be a JSON object"},
      {"entry not object", raw_file(R"({"a":3})", 0), "entry must be a JSON object"},
      {"missing dtype", raw_file(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", 8), "missing \"dtype\""},
      {"missing shape", raw_file(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", 8), "missing \"shape\""},
      {"missing offsets", raw_file(R"({"a":{"dtype":"F32","shape":[2]}})", 8), "missing \"data_offsets\""},
      {"unknown dtype", raw_file(R"({"weird":{"dtype":"F7","shape":[2],"data_offsets":[0,8]}})", 8),
       "tensor \"weird\": unsupported dtype \"F7\""},
      {"negative dim", raw_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
       "non-negative integers"},
      {"float dim", raw_file(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8),
       "non-negative integers"},
      {"one offset", raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8), "[begin, end]"},
      {"out of range", raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 8), "out of range"},
      {"end before begin", raw_file(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8),
       "end before begin"},
      {"size mismatch", raw_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
       "does not match shape"},
      {"shape overflow",
       raw_file(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8),
       "overflows"},
      {"overlap",
       raw_file("{" + ok + R"(,"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12), "overlaps"},
      {"gap", raw_file("{" + ok + R"(,"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}})", 16), "gap"},
      {"trailing bytes", raw_file("{" + ok + "}", 12), "4 trailing bytes"},
      {"duplicate name", raw_file("{" + ok + "," + ok + "}", 8), "duplicate key \"a\""},
      {"metadata not object", raw_file("{" + ok + R"(,"__metadata__":[1]})", 8), "__metadata__"},
      {"metadata value", raw_file("{" + ok + R"(,"__metadata__":{"n":1}})", 8), "value of \"n\" must be a string"},
      {"bool byte", raw_file(R"({"b":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})", 0) + "\x01\x07",
       "BOOL byte 1 has value 7"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    const std::string path = in_dir("corrupt.safetensors");
    write_file(path, c.file);
    // load() also touches the data (get), which the BOOL check needs.
    const std::string message = error_of([&] { st::load(path); });
    EXPECT_NE(message.find(c.expected), std::string::npos) << message;
    EXPECT_NE(message.find(path), std::string::npos) << message;
  }
  // Sanity: the base entry alone is a valid file, so each case fails for its own reason.
  write_file(in_dir("good.safetensors"), raw_file("{" + ok + "}", 8));
  EXPECT_EQ(st::load(in_dir("good.safetensors")).at("a").numel(), 2);
  // A valid header that is space-padded (the Python library pads to 8).
  write_file(in_dir("padded.safetensors"), raw_file("{" + ok + "}   ", 8));
  EXPECT_EQ(st::File::open(in_dir("padded.safetensors")).tensors().size(), 1u);
  // A missing file names the path.
  const auto missing = in_dir("nope.safetensors");
  EXPECT_NE(error_of([&] { st::File::open(missing); }).find(missing), std::string::npos);
}

TEST_F(Safetensors, MisalignedDataIsCopied) {
  // A writer that does not pad: header of odd length puts the F32 data at an
  // odd address; get() must still return the right values.
  const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  ASSERT_NE((8 + header.size()) % 4, 0u);
  const auto x = torch::randn({2});
  const auto path = in_dir("odd.safetensors");
  write_file(path, raw_file(header, 0) + bytes_of(x));
  EXPECT_TRUE(same_tensor(st::File::open(path).get("a"), x));
}

// --- (4) the writer leaves nothing half-written ----------------------------------

TEST_F(Safetensors, FailedSaveKeepsPreviousFile) {
  const auto path = in_dir("keep.safetensors");
  const auto x = torch::randn({3, 3});
  st::save({{"x", x}}, path);
  const std::string message = error_of([&] {
    st::save({{"x", torch::randn({2})}, {"z", torch::randn({2}, torch::kComplexDouble)}}, path);
  });
  EXPECT_NE(message.find("tensor \"z\" has unsupported dtype"), std::string::npos) << message;
  EXPECT_TRUE(same_tensor(st::load(path).at("x"), x));
  for (const std::string& name : listing()) EXPECT_EQ(name.find(".tmp."), std::string::npos) << name;

  // An unwritable destination fails at creation and names the temporary file.
  const auto nowhere = in_dir("no_such_dir/x.safetensors");
  EXPECT_NE(error_of([&] { st::save({{"x", x}}, nowhere); }).find("cannot create"), std::string::npos);
  EXPECT_NE(error_of([&] { st::save({{"__metadata__", x}}, path); }).find("reserved"), std::string::npos);
}

// --- (5) sharded checkpoints -----------------------------------------------------

TEST_F(Safetensors, ShardedCheckpoint) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const std::map<std::string, torch::Tensor> first = {{"embed.weight", torch::randn({5, 4})},
                                                      {"layers.0.w", random_tensor(torch::kBFloat16, {4, 4})}};
  const std::map<std::string, torch::Tensor> second = {{"layers.1.w", random_tensor(torch::kHalf, {4, 4})},
                                                       {"lm_head.bias", torch::randn({5})}};
  st::save(first, in_dir("model-00001-of-00002.safetensors"));
  st::save(second, in_dir("model-00002-of-00002.safetensors"));
  int64_t total_size = 0;
  for (const auto* part : {&first, &second})
    for (const auto& [name, t] : *part) total_size += t.nbytes();
  std::string map_text;
  for (const auto& [name, t] : first) map_text += "\"" + name + "\":\"model-00001-of-00002.safetensors\",";
  for (const auto& [name, t] : second) map_text += "\"" + name + "\":\"model-00002-of-00002.safetensors\",";
  map_text.pop_back();
  const auto index_path = in_dir("model.safetensors.index.json");
  write_file(index_path, "{\"metadata\":{\"total_size\":" + std::to_string(total_size) + "},\"weight_map\":{" + map_text + "}}");

  const auto loaded = st::load_sharded(dir_);
  ASSERT_EQ(loaded.size(), 4u);
  for (const auto* part : {&first, &second})
    for (const auto& [name, t] : *part) {
      SCOPED_TRACE(name);
      ASSERT_TRUE(loaded.count(name));
      EXPECT_TRUE(same_tensor(loaded.at(name), t));
    }

  // A shard that the index names but that is not there.
  ASSERT_EQ(::rename(in_dir("model-00002-of-00002.safetensors").c_str(), in_dir("moved.safetensors").c_str()), 0);
  std::string message = error_of([&] { st::load_sharded(dir_); });
  EXPECT_NE(message.find("model-00002-of-00002.safetensors"), std::string::npos) << message;
  EXPECT_NE(message.find("does not exist"), std::string::npos) << message;
  ASSERT_EQ(::rename(in_dir("moved.safetensors").c_str(), in_dir("model-00002-of-00002.safetensors").c_str()), 0);

  // A tensor that the index puts in a shard that lacks it.
  write_file(index_path, R"({"weight_map":{)" + map_text + R"(,"ghost":"model-00001-of-00002.safetensors"}})");
  message = error_of([&] { st::load_sharded(dir_); });
  EXPECT_NE(message.find("tensor \"ghost\" is not in its shard"), std::string::npos) << message;

  // An index that reaches outside the directory.
  write_file(index_path, R"({"weight_map":{"a":"../elsewhere.safetensors"}})");
  message = error_of([&] { st::load_sharded(dir_); });
  EXPECT_NE(message.find("not a file name inside"), std::string::npos) << message;

  // Without an index: model.safetensors, else an error naming both.
  ASSERT_EQ(::remove(index_path.c_str()), 0);
  message = error_of([&] { st::load_sharded(dir_); });
  EXPECT_NE(message.find("model.safetensors.index.json"), std::string::npos) << message;
  st::save(first, in_dir("model.safetensors"));
  const auto single = st::load_sharded(dir_);
  ASSERT_EQ(single.size(), first.size());
  EXPECT_TRUE(same_tensor(single.at("layers.0.w"), first.at("layers.0.w")));
}

}  // namespace
}  // namespace unswag
