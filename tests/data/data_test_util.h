// Helpers for the token-shard and loader tests: a fixture with a fresh seed
// and a temporary directory, and shard files built byte by byte from the
// format specifications (UnSwag's in docs/data.md, llm.c's, nanoGPT's), so that
// a mistake in the library's reader or writer cannot cancel out.
#pragma once

#include <ftw.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <cstdint>
#include <fstream>
#include <random>
#include <memory>
#include <string>
#include <vector>

#include "test_util.h"
#include "unswag/data/shards.h"

namespace unswag::test {

// Little-endian bytes of `value`'s low `width` bytes, whatever the host order.
inline void put_le(std::string& out, uint64_t value, int width) {
  for (int i = 0; i < width; ++i) out += char((value >> (8 * i)) & 0xff);
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  ASSERT_TRUE(out.good()) << "writing " << path;
}

inline std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline std::string token_bytes(const std::vector<uint32_t>& tokens, int width) {
  std::string out;
  out.reserve(tokens.size() * size_t(width));
  for (uint32_t t : tokens) put_le(out, t, width);
  return out;
}

// UnSwag shard, version 1, per the table in docs/data.md.
inline std::string unswag_shard_bytes(const std::vector<uint32_t>& tokens, int width, uint32_t eos,
                                      uint64_t documents) {
  std::string out = "UNSWAGTK";
  put_le(out, 1, 4);        // version
  put_le(out, 256, 4);      // header_size
  put_le(out, width, 4);    // token_bytes
  put_le(out, eos, 4);      // eos_id
  put_le(out, tokens.size(), 8);
  put_le(out, documents, 8);
  out.append(256 - out.size(), '\0');
  return out + token_bytes(tokens, width);
}

// llm.c shard: 256 int32 (magic, version, token count, zeros), then tokens.
inline std::string llmc_shard_bytes(const std::vector<uint32_t>& tokens, int version) {
  const bool u16 = version == 1;
  std::string out;
  put_le(out, u16 ? 20240520 : 20240801, 4);
  put_le(out, uint32_t(version), 4);
  put_le(out, tokens.size(), 4);
  out.append(1024 - out.size(), '\0');
  return out + token_bytes(tokens, u16 ? 2 : 4);
}

// nanoGPT .bin: raw uint16.
inline std::string nanogpt_bytes(const std::vector<uint32_t>& tokens) { return token_bytes(tokens, 2); }

inline std::vector<uint32_t> random_tokens(std::mt19937_64& rng, size_t count, uint32_t vocab) {
  std::uniform_int_distribution<uint32_t> dist(0, vocab - 1);
  std::vector<uint32_t> t(count);
  for (auto& x : t) x = dist(rng);
  return t;
}

inline std::vector<uint32_t> all_tokens(const data::TokenShard& shard) {
  std::vector<int64_t> wide(size_t(shard.num_tokens()));
  shard.copy_tokens(0, shard.num_tokens(), wide.data());
  return std::vector<uint32_t>(wide.begin(), wide.end());
}

// A fresh seed (printed on failure) and a temporary directory removed after.
class DataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = fresh_seed();
    rng_.seed(seed_);
    tmp_ = std::make_unique<test::TempDir>("unswag_data");
    dir_ = tmp_->path();
  }
  std::string in_dir(const std::string& name) const { return dir_ + "/" + name; }
  std::string trace() const { return "seed " + std::to_string(seed_); }

  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
  std::unique_ptr<test::TempDir> tmp_;
  std::string dir_;
};

}  // namespace unswag::test
