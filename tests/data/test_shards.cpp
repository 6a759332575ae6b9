// Tests of the token-shard reader and writer (UnSwag, llm.c v1/v7 and nanoGPT
// files built byte by byte from their specifications), of corrupt and
// truncated files, input expansion, and of the corpus writer (text per file
// and per paragraph, JSONL, shard splitting, progress, errors) against a naive
// reference that reads whole files and encodes whole documents.
#include <dirent.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <functional>
#include <map>
#include <set>

#include "data/data_test_util.h"
#include "test_util.h"
#include "unswag/data/shards.h"

namespace unswag {
namespace {

namespace data = unswag::data;
using test::all_tokens;
using test::expect_error;
using test::write_bytes;

std::vector<std::string> listing(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (const dirent* e = ::readdir(d))
      if (e->d_name[0] != '.') names.push_back(e->d_name);
    ::closedir(d);
  }
  std::sort(names.begin(), names.end());
  return names;
}

class DataShards : public test::DataTest {};

// Sizes that hit the edge cases: empty, one token, odd counts, a few pages.
std::vector<size_t> shard_sizes(std::mt19937_64& rng) {
  return {0, 1, 2, 3, 7, 257, 4099, size_t(std::uniform_int_distribution<int>(1, 100000)(rng))};
}

TEST_F(DataShards, UnswagRoundTripEachDtype) {
  SCOPED_TRACE(trace());
  for (const data::TokenDtype dtype : {data::TokenDtype::kUInt16, data::TokenDtype::kUInt32}) {
    const int width = int(dtype);
    const uint32_t vocab = width == 2 ? 65536 : 0x80000000u;  // uint32 tokens come from int32 encoders
    for (const size_t n : shard_sizes(rng_)) {
      SCOPED_TRACE(std::string(data::to_string(dtype)) + " n=" + std::to_string(n));
      std::vector<uint32_t> tokens = test::random_tokens(rng_, n, vocab);
      const uint32_t eos = n > 0 ? tokens[0] : 7;
      const uint64_t documents = uint64_t(std::count(tokens.begin(), tokens.end(), eos));
      const std::string path = in_dir("ours_" + std::to_string(width) + "_" + std::to_string(n) + ".bin");
      {
        data::ShardWriter writer(path, dtype, eos);
        const std::vector<int32_t> as_int(tokens.begin(), tokens.end());
        // Appended in uneven pieces, as the corpus writer does.
        size_t done = 0;
        while (done < n) {
          const size_t take = std::min(n - done, size_t(1 + rng_() % 5000));
          writer.append(as_int.data() + done, take);
          done += take;
        }
        writer.close();
        EXPECT_EQ(writer.num_documents(), int64_t(documents));
      }
      // The bytes on disk are exactly those of the specification.
      EXPECT_EQ(test::read_bytes(path), test::unswag_shard_bytes(tokens, width, eos, documents));
      for (const auto format : {data::ShardFormat::kAuto, data::ShardFormat::kUnswag}) {
        const data::TokenShard shard = data::TokenShard::open(path, format);
        EXPECT_EQ(shard.format(), data::ShardFormat::kUnswag);
        EXPECT_EQ(shard.dtype(), dtype);
        EXPECT_EQ(shard.num_tokens(), int64_t(n));
        EXPECT_EQ(shard.num_documents(), int64_t(documents));
        EXPECT_EQ(shard.eos_id(), int64_t(eos));
        EXPECT_EQ(all_tokens(shard), tokens);
      }
    }
  }
  // No temporary file is left behind.
  for (const std::string& name : listing(dir_)) EXPECT_EQ(name.find(".tmp."), std::string::npos) << name;
}

TEST_F(DataShards, SpecBuiltUnswagFileWithoutEos) {
  SCOPED_TRACE(trace());
  const std::vector<uint32_t> tokens = test::random_tokens(rng_, 1001, 65536);
  const std::string path = in_dir("spec.bin");
  write_bytes(path, test::unswag_shard_bytes(tokens, 2, data::kNoEos, 0));
  const data::TokenShard shard = data::TokenShard::open(path);
  EXPECT_EQ(shard.eos_id(), -1);
  EXPECT_EQ(shard.num_documents(), 0);
  EXPECT_EQ(all_tokens(shard), tokens);
}

TEST_F(DataShards, LlmcBothVersions) {
  SCOPED_TRACE(trace());
  for (const int version : {1, 7}) {
    for (const size_t n : shard_sizes(rng_)) {
      SCOPED_TRACE("llm.c version " + std::to_string(version) + " n=" + std::to_string(n));
      const std::vector<uint32_t> tokens = test::random_tokens(rng_, n, version == 1 ? 65536 : 0xFFFFFFFFu);
      const std::string path = in_dir("llmc.bin");
      write_bytes(path, test::llmc_shard_bytes(tokens, version));
      for (const auto format : {data::ShardFormat::kAuto, data::ShardFormat::kLlmc}) {
        const data::TokenShard shard = data::TokenShard::open(path, format);
        EXPECT_EQ(shard.format(), data::ShardFormat::kLlmc);
        EXPECT_EQ(shard.dtype(), version == 1 ? data::TokenDtype::kUInt16 : data::TokenDtype::kUInt32);
        EXPECT_EQ(shard.num_tokens(), int64_t(n));
        EXPECT_EQ(shard.num_documents(), -1);
        EXPECT_EQ(all_tokens(shard), tokens);
      }
    }
  }
}

TEST_F(DataShards, NanoGPTRawUInt16) {
  SCOPED_TRACE(trace());
  for (const size_t n : shard_sizes(rng_)) {
    SCOPED_TRACE("n=" + std::to_string(n));
    std::vector<uint32_t> tokens = test::random_tokens(rng_, n, 50257);
    const std::string path = in_dir("train.bin");
    write_bytes(path, test::nanogpt_bytes(tokens));
    for (const auto format : {data::ShardFormat::kAuto, data::ShardFormat::kNanoGPT}) {
      const data::TokenShard shard = data::TokenShard::open(path, format);
      EXPECT_EQ(shard.format(), data::ShardFormat::kNanoGPT);
      EXPECT_EQ(shard.dtype(), data::TokenDtype::kUInt16);
      EXPECT_EQ(all_tokens(shard), tokens);
    }
  }
  // Raw tokens that happen to spell llm.c's magic are read as llm.c in auto
  // mode (the documented ambiguity) and as tokens when nanogpt is explicit.
  std::vector<uint32_t> magic_first = {20240520 & 0xFFFF, 20240520 >> 16, 1, 0};
  const std::string path = in_dir("ambiguous.bin");
  write_bytes(path, test::nanogpt_bytes(magic_first));
  EXPECT_EQ(all_tokens(data::TokenShard::open(path, data::ShardFormat::kNanoGPT)), magic_first);
  expect_error([&] { data::TokenShard::open(path); }, {path.c_str(), "truncated llm.c shard"});
}

TEST_F(DataShards, TokenAccessRanges) {
  SCOPED_TRACE(trace());
  const std::vector<uint32_t> tokens = test::random_tokens(rng_, 5003, 0x7FFFFFFF);
  const std::string path = in_dir("v7.bin");
  write_bytes(path, test::llmc_shard_bytes(tokens, 7));
  const data::TokenShard shard = data::TokenShard::open(path);
  for (int trial = 0; trial < 50; ++trial) {
    const int64_t begin = int64_t(rng_() % 5004), count = int64_t(rng_() % (5004 - begin));
    std::vector<int64_t> out(size_t(count) + 1, -1);
    shard.copy_tokens(begin, count, out.data());
    for (int64_t i = 0; i < count; ++i) ASSERT_EQ(out[size_t(i)], int64_t(tokens[size_t(begin + i)]));
    EXPECT_EQ(out[size_t(count)], -1) << "wrote past the end";
    if (begin < 5003) EXPECT_EQ(shard.token(begin), tokens[size_t(begin)]);
  }
  std::vector<int64_t> out(10);
  expect_error([&] { shard.copy_tokens(5000, 4, out.data()); }, {path.c_str(), "out of range"});
  expect_error([&] { shard.copy_tokens(-1, 1, out.data()); }, {path.c_str(), "out of range"});
  expect_error([&] { shard.token(5003); }, {path.c_str(), "out of range"});
  EXPECT_EQ(all_tokens(shard), tokens);
}

// Both directions against an independent implementation: numpy reads our
// shard by the table in docs/data.md, and writes the tokens back as llm.c
// shards (the way llm.c's data_common.py does) and a nanoGPT .bin, which we
// read.
TEST_F(DataShards, ExchangeWithNumpyReference) {
  SCOPED_TRACE(trace());
  UNSWAG_REQUIRE_PYTHON("numpy");
  const std::string python = unswag::test::python_executable();
  const std::string script = unswag::test::source_path("tests/data/shard_reference.py");
  ASSERT_EQ(::access(script.c_str(), R_OK), 0) << "cannot read " << script;

  for (const data::TokenDtype dtype : {data::TokenDtype::kUInt16, data::TokenDtype::kUInt32}) {
    SCOPED_TRACE(data::to_string(dtype));
    const std::vector<uint32_t> tokens = test::random_tokens(rng_, 1 + rng_() % 50000, 1000);
    const int32_t eos = int32_t(rng_() % 1000);
    const std::string path = in_dir(std::string("ours_") + data::to_string(dtype) + ".bin");
    data::ShardWriter writer(path, dtype, eos);
    writer.append(std::vector<int32_t>(tokens.begin(), tokens.end()));
    writer.close();

    const std::string out = in_dir("from_numpy");
    const std::string cmd = "'" + python + "' '" + script + "' '" + path + "' '" + out + "'";
    FILE* pipe = ::popen(cmd.c_str(), "r");
    ASSERT_NE(pipe, nullptr);
    long long got_eos = -1, documents = -1, counted = -2, count = -1;
    const int fields = std::fscanf(pipe, "%lld %lld %lld %lld", &got_eos, &documents, &counted, &count);
    ASSERT_EQ(::pclose(pipe), 0) << cmd;
    ASSERT_EQ(fields, 4);
    EXPECT_EQ(got_eos, eos);
    EXPECT_EQ(count, (long long)tokens.size());
    EXPECT_EQ(documents, counted) << "document_count must be the number of EOS tokens";
    for (const char* suffix : {"_llmc1.bin", "_llmc7.bin", "_nanogpt.bin"}) {
      SCOPED_TRACE(suffix);
      EXPECT_EQ(all_tokens(data::TokenShard::open(out + suffix)), tokens);
    }
  }
}

// One file per validation rule; every message names the file and the fault.
TEST_F(DataShards, CorruptAndTruncatedFiles) {
  SCOPED_TRACE(trace());
  const std::vector<uint32_t> tokens = test::random_tokens(rng_, 10, 1000);
  const std::string good = test::unswag_shard_bytes(tokens, 2, 999, 0);
  auto patched = [&](size_t at, uint64_t value, int width) {
    std::string b = good;
    std::string v;
    test::put_le(v, value, width);
    b.replace(at, size_t(width), v);
    return b;
  };
  const std::string llmc1 = test::llmc_shard_bytes(tokens, 1);
  auto llmc_patched = [&](size_t at, uint32_t value) {
    std::string b = llmc1;
    std::string v;
    test::put_le(v, value, 4);
    b.replace(at, 4, v);
    return b;
  };
  struct Case {
    std::string name, bytes;
    data::ShardFormat format;
    std::vector<const char*> fragments;
  };
  const std::vector<Case> cases = {
      {"version", patched(8, 2, 4), data::ShardFormat::kAuto, {"unknown UnSwag shard version 2"}},
      {"dtype", patched(16, 3, 4), data::ShardFormat::kAuto, {"unknown token dtype", "token_bytes 3"}},
      {"truncated", good.substr(0, good.size() - 1), data::ShardFormat::kAuto, {"does not match", "truncated"}},
      {"trailing", good + "x", data::ShardFormat::kAuto, {"does not match", "trailing bytes"}},
      {"short_header", good.substr(0, 20), data::ShardFormat::kUnswag, {"truncated UnSwag shard", "20 bytes"}},
      {"header_size", patched(12, 12, 4), data::ShardFormat::kAuto, {"header_size 12"}},
      {"header_past_end", patched(12, 4096, 4), data::ShardFormat::kAuto, {"header_size 4096", "exceeds"}},
      {"documents", patched(32, 11, 8), data::ShardFormat::kAuto, {"document_count 11", "token_count 10"}},
      {"count_overflow", patched(24, uint64_t(1) << 63, 8), data::ShardFormat::kAuto, {"overflows"}},
      {"count_large", patched(24, 11, 8), data::ShardFormat::kAuto, {"token count 11", "truncated"}},
      {"eos_u16", patched(20, 70000, 4), data::ShardFormat::kAuto, {"eos_id 70000"}},
      {"not_ours", test::nanogpt_bytes(tokens), data::ShardFormat::kUnswag, {"bad magic", "UNSWAGTK"}},
      {"llmc_version", llmc_patched(4, 7), data::ShardFormat::kAuto, {"unknown llm.c version 7", "20240520"}},
      {"llmc_version7", llmc_patched(0, 20240801), data::ShardFormat::kAuto, {"unknown llm.c version 1"}},
      {"llmc_count", llmc_patched(8, 11), data::ShardFormat::kAuto, {"token count 11", "truncated"}},
      {"llmc_negative", llmc_patched(8, 0xFFFFFFFF), data::ShardFormat::kAuto, {"negative token count"}},
      {"llmc_trailing", llmc1 + "xy", data::ShardFormat::kAuto, {"trailing bytes"}},
      {"llmc_short", llmc1.substr(0, 500), data::ShardFormat::kAuto, {"truncated llm.c shard", "1024-byte"}},
      {"llmc_magic", good, data::ShardFormat::kLlmc, {"bad magic", "20240520"}},
      {"nanogpt_odd", test::nanogpt_bytes(tokens) + "x", data::ShardFormat::kAuto, {"odd"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string path = in_dir(c.name + ".bin");
    write_bytes(path, c.bytes);
    std::vector<const char*> fragments = c.fragments;
    fragments.push_back(path.c_str());
    try {
      data::TokenShard::open(path, c.format);
      ADD_FAILURE() << "no error for " << c.name;
    } catch (const c10::Error& e) {
      const std::string msg = e.what_without_backtrace();
      for (const char* f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << msg << "\nmissing: " << f;
    }
  }
  expect_error([&] { data::TokenShard::open(in_dir("missing.bin")); }, {"cannot open", "missing.bin"});
  expect_error([&] { data::TokenShard::open(dir_); }, {"not a regular file"});
}

TEST_F(DataShards, VocabularyCheck) {
  SCOPED_TRACE(trace());
  const int64_t vocab = 1000;
  for (const std::string format : {"unswag16", "unswag32", "llmc1", "llmc7", "nanogpt"}) {
    SCOPED_TRACE(format);
    std::vector<uint32_t> tokens = test::random_tokens(rng_, 70000 + rng_() % 1000, vocab);
    const std::string path = in_dir(format + ".bin");
    auto write = [&] {
      if (format == "unswag16") write_bytes(path, test::unswag_shard_bytes(tokens, 2, data::kNoEos, 0));
      if (format == "unswag32") write_bytes(path, test::unswag_shard_bytes(tokens, 4, data::kNoEos, 0));
      if (format == "llmc1") write_bytes(path, test::llmc_shard_bytes(tokens, 1));
      if (format == "llmc7") write_bytes(path, test::llmc_shard_bytes(tokens, 7));
      if (format == "nanogpt") write_bytes(path, test::nanogpt_bytes(tokens));
    };
    write();
    EXPECT_EQ(all_tokens(data::TokenShard::open(path, data::ShardFormat::kAuto, vocab)), tokens);
    const size_t bad = size_t(rng_() % tokens.size());
    tokens[bad] = uint32_t(vocab + rng_() % 100);
    write();
    const std::string where = "token " + std::to_string(bad) + " has id " + std::to_string(tokens[bad]);
    expect_error([&] { data::TokenShard::open(path, data::ShardFormat::kAuto, vocab); },
                 {path.c_str(), where.c_str(), "vocab_size 1000"});
    EXPECT_NO_THROW(data::TokenShard::open(path));  // unchecked without vocab_size
  }
}

TEST_F(DataShards, WriterErrorsLeaveNothing) {
  const std::string path = in_dir("w.bin");
  {
    data::ShardWriter writer(path, data::TokenDtype::kUInt16, 0);
    const std::vector<int32_t> too_big = {1, 2, 70000};
    expect_error([&] { writer.append(too_big); }, {path.c_str(), "token id 70000", "uint16"});
    const std::vector<int32_t> negative = {-3};
    expect_error([&] { writer.append(negative); }, {"token id -3"});
  }  // destroyed without close(): the temporary file goes away
  EXPECT_TRUE(listing(dir_).empty());
  expect_error([&] { data::ShardWriter(path, data::TokenDtype::kUInt16, 65536); }, {"eos_id 65536", "uint16"});
  expect_error([&] { data::ShardWriter(in_dir("no/such/dir.bin"), data::TokenDtype::kUInt16, 0); },
               {"cannot create", "no/such/dir.bin"});
  data::ShardWriter writer(path, data::TokenDtype::kUInt32, -1);
  writer.close();
  expect_error([&] { writer.close(); }, {"closed twice"});
  const data::TokenShard empty = data::TokenShard::open(path);
  EXPECT_EQ(empty.num_tokens(), 0);
  EXPECT_EQ(empty.eos_id(), -1);
}

TEST_F(DataShards, ExpandInputs) {
  for (const char* name : {"b_000001.bin", "a.bin", "b_000000.bin", "notes.txt", ".hidden.bin"})
    write_bytes(in_dir(name), "");
  ASSERT_EQ(::mkdir(in_dir("sub.bin").c_str(), 0755), 0);  // a directory named *.bin is not a file
  const std::vector<std::string> sorted_bins = {in_dir("a.bin"), in_dir("b_000000.bin"), in_dir("b_000001.bin")};
  EXPECT_EQ(data::expand_inputs({dir_}, "test"), sorted_bins);
  EXPECT_EQ(data::expand_inputs({dir_ + "/"}, "test").size(), 3u);
  EXPECT_EQ(data::expand_inputs({in_dir("b_*.bin"), in_dir("a.bin")}, "test"),
            (std::vector<std::string>{in_dir("b_000000.bin"), in_dir("b_000001.bin"), in_dir("a.bin")}));
  EXPECT_EQ(data::expand_inputs({dir_}, "test", "").size(), 4u);  // every visible regular file
  expect_error([&] { data::expand_inputs({in_dir("nope.bin")}, "test"); }, {"test: input", "nope.bin", "does not exist"});
  expect_error([&] { data::expand_inputs({in_dir("z*.bin")}, "test"); }, {"pattern", "matches no file"});
  expect_error([&] { data::expand_inputs({in_dir("sub.bin")}, "test"); }, {"holds no", "*.bin"});
}

TEST(DataShardNames, ParseAndPrint) {
  for (const auto f : {data::ShardFormat::kAuto, data::ShardFormat::kUnswag, data::ShardFormat::kLlmc,
                       data::ShardFormat::kNanoGPT})
    EXPECT_EQ(data::parse_shard_format(data::to_string(f)), f);
  EXPECT_EQ(data::parse_shard_format("llm.c"), data::ShardFormat::kLlmc);
  for (const auto d : {data::TokenDtype::kUInt16, data::TokenDtype::kUInt32})
    EXPECT_EQ(data::parse_token_dtype(data::to_string(d)), d);
  expect_error([] { data::parse_shard_format("megatron"); }, {"shard format", "megatron"});
  expect_error([] { data::parse_token_dtype("int8"); }, {"uint16 or uint32", "int8"});
  EXPECT_EQ(data::shard_path("out/train", 12), "out/train_000012.bin");
}

// ------------------------------------------------------------ corpus writer --

// A stand-in for a BPE tokenizer with a regex pre-tokenizer: each run of
// non-space bytes is one token (a hash of the run), each whitespace byte is
// its own token. Ids lie in [1, 65000); 0 is EOS.
std::vector<int32_t> toy_encode(std::string_view text) {
  std::vector<int32_t> ids;
  size_t i = 0;
  while (i < text.size()) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (c == ' ' || c == '\n' || c == '\t' || c == '\r') {
      ids.push_back(64000 + c);
      ++i;
      continue;
    }
    size_t j = i;
    while (j < text.size() && text[j] != ' ' && text[j] != '\n' && text[j] != '\t' && text[j] != '\r') ++j;
    ids.push_back(1 + int32_t(std::hash<std::string_view>()(text.substr(i, j - i)) % 60000));
    i = j;
  }
  return ids;
}

class DataCorpus : public test::DataTest {
 protected:
  std::string random_words(size_t count) {
    static const std::vector<std::string> words = {"the", "loader", "packs", "windows", "ünïcödé", "日本語", "x",
                                                   "tokens,", "EOS.", "(shards)", "\t", "  "};
    std::string s;
    for (size_t i = 0; i < count; ++i) s += (i ? " " : "") + words[rng_() % words.size()];
    return s;
  }
  // The tokens of every shard of `stats`, concatenated; checks each header.
  std::vector<int32_t> read_shards(const data::CorpusStats& stats, int64_t eos) {
    std::vector<int32_t> all;
    for (const std::string& path : stats.shards) {
      const data::TokenShard shard = data::TokenShard::open(path);
      EXPECT_EQ(shard.format(), data::ShardFormat::kUnswag);
      EXPECT_EQ(shard.dtype(), stats.dtype);
      EXPECT_EQ(shard.eos_id(), eos);
      const std::vector<uint32_t> t = all_tokens(shard);
      EXPECT_EQ(shard.num_documents(), int64_t(std::count(t.begin(), t.end(), uint32_t(eos))));
      all.insert(all.end(), t.begin(), t.end());
    }
    return all;
  }
  static void append_document(std::vector<int32_t>& ref, const std::string& text, int64_t& documents) {
    const std::vector<int32_t> ids = toy_encode(text);
    if (ids.empty()) return;
    ref.insert(ref.end(), ids.begin(), ids.end());
    ref.push_back(0);
    ++documents;
  }
};

TEST_F(DataCorpus, TextPerFileAndPerParagraph) {
  SCOPED_TRACE(trace());
  // Files: paragraphs separated by blank lines (empty, spaces, CRLF), an empty
  // file, a file of blank lines, a last line without '\n'.
  std::vector<std::vector<std::string>> paragraphs(5);
  std::vector<std::string> contents;
  for (size_t f = 0; f < paragraphs.size(); ++f) {
    std::string text;
    const size_t count = f == 1 ? 0 : f == 2 ? 0 : 1 + rng_() % 6;
    if (f == 2) text = "\n  \n\r\n\n";
    for (size_t p = 0; p < count; ++p) {
      std::vector<std::string> lines;
      for (size_t l = 0, n = 1 + rng_() % 4; l < n; ++l) lines.push_back("w" + random_words(1 + rng_() % 12));
      std::string para;
      for (size_t l = 0; l < lines.size(); ++l) para += (l ? "\n" : "") + lines[l];
      paragraphs[f].push_back(para);
      for (const std::string& line : lines) text += line + (rng_() % 3 == 0 ? "\r\n" : "\n");
      text += rng_() % 2 ? "\n" : "   \r\n\n";
    }
    if (f == 4 && !text.empty()) {
      text += "wlast line without newline";
      paragraphs[f].push_back("wlast line without newline");
    }
    contents.push_back(text);
    write_bytes(in_dir("doc" + std::to_string(f) + ".txt"), text);
  }
  const std::vector<std::string> inputs = {in_dir("doc*.txt")};

  // Per file: each file's bytes, whole, are one document.
  std::vector<int32_t> ref;
  int64_t documents = 0;
  for (const std::string& text : contents) append_document(ref, text, documents);
  data::CorpusOptions options;
  options.vocab_size = 65536;
  data::CorpusStats stats = data::write_corpus_shards(inputs, toy_encode, 0, in_dir("file"), options);
  EXPECT_EQ(stats.dtype, data::TokenDtype::kUInt16);
  EXPECT_EQ(read_shards(stats, 0), ref);
  EXPECT_EQ(stats.documents, documents);
  EXPECT_EQ(stats.empty_documents, 1);  // the empty file (the blank one encodes to whitespace tokens)
  EXPECT_EQ(stats.tokens, int64_t(ref.size()));

  // Per paragraph.
  ref.clear();
  documents = 0;
  for (const auto& file : paragraphs)
    for (const std::string& p : file) append_document(ref, p, documents);
  options.text_documents = data::TextDocuments::kPerParagraph;
  stats = data::write_corpus_shards(inputs, toy_encode, 0, in_dir("para"), options);
  EXPECT_EQ(read_shards(stats, 0), ref);
  EXPECT_EQ(stats.documents, documents);
  EXPECT_EQ(stats.empty_documents, 0);
}

TEST_F(DataCorpus, LongDocumentsAreEncodedInPiecesWithTheSameTokens) {
  SCOPED_TRACE(trace());
  std::string text;
  // Lines (under 64 bytes) that start with a non-space byte: a safe cut point
  // always lies within any 64 bytes.
  for (int l = 0; l < 300; ++l) text += "w" + random_words(1 + rng_() % 4) + (rng_() % 4 ? "\n" : "\n\n");
  // A long run without any newline, of multi-byte characters: cut before a
  // UTF-8 lead byte.
  std::string run;
  for (int i = 0; i < 400; ++i) run += "日本語ü";
  text += run;
  write_bytes(in_dir("long.txt"), text);

  std::vector<std::string> pieces;
  const data::Encoder recording = [&](std::string_view piece) {
    pieces.emplace_back(piece);
    return toy_encode(piece);
  };
  data::CorpusOptions options;
  options.max_chunk_bytes = 64 + int64_t(rng_() % 200);
  const data::CorpusStats stats = data::write_corpus_shards({in_dir("long.txt")}, recording, 0, in_dir("o"), options);
  ASSERT_GT(pieces.size(), 10u);
  std::string joined;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const std::string& p = pieces[i];
    EXPECT_LE(p.size(), size_t(options.max_chunk_bytes)) << "piece " << i;
    EXPECT_NE(static_cast<unsigned char>(p[0]) & 0xC0, 0x80) << "piece " << i << " starts inside a UTF-8 character";
    joined += p;
  }
  EXPECT_EQ(joined, text);
  // Tokens equal the whole document's except inside the newline-free run,
  // where a word may be split: compare the part before it.
  std::vector<int32_t> whole = toy_encode(text.substr(0, text.size() - run.size()));
  std::vector<int32_t> got = read_shards(stats, 0);
  ASSERT_GE(got.size(), whole.size());
  EXPECT_TRUE(std::equal(whole.begin(), whole.end(), got.begin()));
  EXPECT_EQ(got.back(), 0);
  EXPECT_EQ(stats.documents, 1);
}

// JSON string literal, escaped by hand (independently of the parser).
std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"') out += "\\\"";
    else if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else out += c;
  }
  return out + "\"";
}

TEST_F(DataCorpus, JsonlTextField) {
  SCOPED_TRACE(trace());
  std::vector<int32_t> ref;
  int64_t documents = 0;
  std::string a, b;
  for (int i = 0; i < 40; ++i) {
    const std::string text = i % 13 == 5 ? "" : random_words(rng_() % 15) + "\n\"quoted\" \\ back\tslash";
    append_document(ref, text, documents);
    a += "{\"id\": " + std::to_string(i) + ", \"text\": " + json_string(text) + ", \"meta\": {\"text\": 1}}" +
         (i % 5 == 0 ? "\r\n" : "\n");
    if (i % 7 == 0) a += "   \n";  // blank lines are skipped
  }
  // \u escapes are decoded by the parser.
  b = "{\"text\": \"caf\\u00e9 na\\u00efve\"}";
  append_document(ref, "café naïve", documents);
  write_bytes(in_dir("a.jsonl"), a);
  write_bytes(in_dir("b.ndjson"), b);
  const data::CorpusStats stats =
      data::write_corpus_shards({in_dir("a.jsonl"), in_dir("b.ndjson")}, toy_encode, 0, in_dir("j"));
  EXPECT_EQ(stats.dtype, data::TokenDtype::kUInt32);  // no vocab_size: the safe dtype
  EXPECT_EQ(read_shards(stats, 0), ref);
  EXPECT_EQ(stats.documents, documents);
  EXPECT_GT(stats.empty_documents, 0);

  // Another field, and JSONL forced on a .txt file.
  write_bytes(in_dir("c.txt"), "{\"content\": \"hello world\"}\n");
  data::CorpusOptions options;
  options.input_format = data::InputFormat::kJsonl;
  options.text_field = "content";
  const data::CorpusStats c = data::write_corpus_shards({in_dir("c.txt")}, toy_encode, 0, in_dir("c"), options);
  std::vector<int32_t> expected = toy_encode("hello world");
  expected.push_back(0);
  EXPECT_EQ(read_shards(c, 0), expected);
}

TEST_F(DataCorpus, JsonlErrorsNameFileAndLine) {
  const std::string good = "{\"text\": \"fine\"}\n";
  struct Case {
    std::string line;
    std::vector<const char*> fragments;
  };
  const std::vector<Case> cases = {
      {"{\"text\": \"unterminated}", {"bad.jsonl:3", "not valid JSON"}},
      {"{\"body\": \"no text\"}", {"bad.jsonl:3", "no \"text\" field"}},
      {"{\"text\": 17}", {"bad.jsonl:3", "\"text\" must be a string", "number"}},
      {"[\"text\"]", {"bad.jsonl:3", "expected a JSON object", "array"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.line);
    write_bytes(in_dir("bad.jsonl"), good + "\n" + c.line + "\n" + good);
    try {
      data::CorpusOptions options;
      options.overwrite = true;
      data::write_corpus_shards({in_dir("bad.jsonl")}, toy_encode, 0, in_dir("bad"), options);
      ADD_FAILURE() << "no error";
    } catch (const c10::Error& e) {
      const std::string msg = e.what_without_backtrace();
      for (const char* f : c.fragments) EXPECT_NE(msg.find(f), std::string::npos) << msg << "\nmissing: " << f;
    }
  }
}

TEST_F(DataCorpus, SplitsIntoNumberedShardsAndReportsProgress) {
  SCOPED_TRACE(trace());
  std::vector<int32_t> ref;
  int64_t documents = 0, total_bytes = 0;
  for (int f = 0; f < 3; ++f) {
    std::string text;
    for (int d = 0; d < 30; ++d) {
      const std::string doc = random_words(1 + rng_() % 30);
      append_document(ref, doc, documents);
      text += "{\"text\": " + json_string(doc) + "}\n";
    }
    total_bytes += int64_t(text.size());
    write_bytes(in_dir("p" + std::to_string(f) + ".jsonl"), text);
  }
  std::vector<data::CorpusProgress> reports;
  data::CorpusOptions options;
  options.max_shard_tokens = 300 + int64_t(rng_() % 400);  // about a dozen shards
  options.progress_every_bytes = 100;
  options.progress = [&](const data::CorpusProgress& p) { reports.push_back(p); };
  options.dtype_auto = false;
  options.dtype = data::TokenDtype::kUInt32;
  ASSERT_EQ(::mkdir(in_dir("split").c_str(), 0755), 0);
  // A directory input: every visible regular file in it, sorted.
  const data::CorpusStats stats = data::write_corpus_shards({dir_}, toy_encode, 0, in_dir("split/train"), options);

  const size_t expected_shards = (ref.size() + size_t(options.max_shard_tokens) - 1) / size_t(options.max_shard_tokens);
  ASSERT_EQ(stats.shards.size(), expected_shards);
  std::vector<std::string> names;
  for (size_t i = 0; i < expected_shards; ++i) {
    EXPECT_EQ(stats.shards[i], data::shard_path(in_dir("split/train"), int64_t(i)));
    const int64_t n = data::TokenShard::open(stats.shards[i]).num_tokens();
    EXPECT_EQ(n, i + 1 < expected_shards ? options.max_shard_tokens
                                         : int64_t(ref.size()) - int64_t(i) * options.max_shard_tokens);
    names.push_back(stats.shards[i].substr(stats.shards[i].rfind('/') + 1));
  }
  EXPECT_EQ(listing(in_dir("split")), names);  // nothing else, no temporary file
  EXPECT_EQ(read_shards(stats, 0), ref);
  EXPECT_EQ(stats.documents, documents);
  EXPECT_EQ(stats.bytes_read, total_bytes);

  ASSERT_GE(reports.size(), 3u);
  for (size_t i = 1; i < reports.size(); ++i) {
    EXPECT_GE(reports[i].bytes_read, reports[i - 1].bytes_read);
    EXPECT_GE(reports[i].tokens, reports[i - 1].tokens);
    EXPECT_EQ(reports[i].bytes_total, total_bytes);
    EXPECT_EQ(reports[i].done, i + 1 == reports.size());
  }
  EXPECT_EQ(reports.back().bytes_read, total_bytes);
  EXPECT_EQ(reports.back().tokens, int64_t(ref.size()));
  EXPECT_EQ(reports.back().documents, documents);
  EXPECT_EQ(reports.back().shards, int64_t(expected_shards));

  // The same prefix again: refused unless overwrite is set.
  options.progress = nullptr;
  expect_error([&] { data::write_corpus_shards({dir_}, toy_encode, 0, in_dir("split/train"), options); },
               {"train_000000.bin", "already exists", "overwrite"});
  options.overwrite = true;
  EXPECT_EQ(data::write_corpus_shards({dir_}, toy_encode, 0, in_dir("split/train"), options).tokens, int64_t(ref.size()));
  // Shards of the same prefix among the inputs would be read back as text.
  expect_error([&] { data::write_corpus_shards({in_dir("split/.")}, toy_encode, 0, in_dir("split/train"), options); },
               {"train_000000.bin", "is an output shard"});
  EXPECT_EQ(data::write_corpus_shards({in_dir("split")}, toy_encode, 0, in_dir("split/other"), options).documents,
            int64_t(expected_shards));  // another prefix: each shard file is read as one (binary) text document
}

TEST_F(DataCorpus, EmptyInputsAndBadArguments) {
  write_bytes(in_dir("empty.txt"), "");
  write_bytes(in_dir("empty.jsonl"), "\n\n");
  data::CorpusStats stats =
      data::write_corpus_shards({in_dir("empty.txt"), in_dir("empty.jsonl")}, toy_encode, 0, in_dir("e"));
  EXPECT_TRUE(stats.shards.empty());
  EXPECT_EQ(stats.tokens, 0);
  EXPECT_EQ(stats.documents, 0);
  EXPECT_EQ(stats.empty_documents, 1);

  write_bytes(in_dir("t.txt"), "some text");
  const std::vector<std::string> in = {in_dir("t.txt")};
  data::CorpusOptions vocab;
  vocab.vocab_size = 1000;  // toy ids go up to 65000
  expect_error([&] { data::write_corpus_shards(in, toy_encode, 0, in_dir("v"), vocab); },
               {"t.txt", "token id", "vocab_size 1000"});
  const data::Encoder negative = [](std::string_view) { return std::vector<int32_t>{5, -1}; };
  expect_error([&] { data::write_corpus_shards(in, negative, 0, in_dir("n"), {}); }, {"t.txt", "token id -1"});
  data::CorpusOptions u16;
  u16.dtype_auto = false;
  u16.dtype = data::TokenDtype::kUInt16;
  const data::Encoder big = [](std::string_view) { return std::vector<int32_t>{70000}; };
  expect_error([&] { data::write_corpus_shards(in, big, 0, in_dir("b"), u16); }, {"token id 70000", "uint16"});
  expect_error([&] { data::write_corpus_shards(in, toy_encode, 70000, in_dir("b"), u16); }, {"eos_id", "70000"});
  expect_error([&] { data::write_corpus_shards(in, toy_encode, 2000, in_dir("b"), vocab); },
               {"eos_id 2000", "vocab_size 1000"});
  expect_error([&] { data::write_corpus_shards(in, toy_encode, 0, in_dir("nodir/x"), {}); },
               {"out_prefix", "does not exist"});
  expect_error([&] { data::write_corpus_shards({in_dir("missing.txt")}, toy_encode, 0, in_dir("m"), {}); },
               {"missing.txt", "does not exist"});
  expect_error([&] { data::write_corpus_shards({}, toy_encode, 0, in_dir("m"), {}); }, {"inputs is empty"});
  expect_error([&] { data::write_corpus_shards(in, nullptr, 0, in_dir("m"), {}); }, {"encoder is empty"});
  data::CorpusOptions zero;
  zero.max_shard_tokens = 0;
  expect_error([&] { data::write_corpus_shards(in, toy_encode, 0, in_dir("m"), zero); }, {"max_shard_tokens"});
  // A failed run leaves no temporary file.
  for (const std::string& name : listing(dir_)) EXPECT_EQ(name.find(".tmp."), std::string::npos) << name;
}

}  // namespace
}  // namespace unswag
