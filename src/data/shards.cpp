// Token shards: format detection and validation for UnSwag, llm.c and nanoGPT
// files behind a read-only shared memory map, the streaming atomic shard
// writer, and input expansion (files, directories, globs). POSIX calls only:
// std::filesystem is avoided because libtorch.so exports conflicting copies of
// some of its functions (see src/models/safetensors.cpp).
#include "unswag/data/shards.h"

#include <c10/util/Exception.h>
#include <dirent.h>
#include <fcntl.h>
#include <glob.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "models/file_io.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "token shards are little-endian; this reader does not byte-swap"
#endif

namespace unswag::data {

// ------------------------------------------------------------------ names ---

const char* to_string(TokenDtype dtype) { return dtype == TokenDtype::kUInt16 ? "uint16" : "uint32"; }

const char* to_string(ShardFormat format) {
  switch (format) {
    case ShardFormat::kAuto: return "auto";
    case ShardFormat::kUnswag: return "unswag";
    case ShardFormat::kLlmc: return "llmc";
    case ShardFormat::kNanoGPT: return "nanogpt";
  }
  return "?";
}

ShardFormat parse_shard_format(const std::string& name) {
  if (name == "auto") return ShardFormat::kAuto;
  if (name == "unswag") return ShardFormat::kUnswag;
  if (name == "llmc" || name == "llm.c") return ShardFormat::kLlmc;
  if (name == "nanogpt") return ShardFormat::kNanoGPT;
  TORCH_CHECK(false, "data: shard format must be one of auto, unswag, llmc, nanogpt; got \"", name, "\"");
}

TokenDtype parse_token_dtype(const std::string& name) {
  if (name == "uint16") return TokenDtype::kUInt16;
  if (name == "uint32") return TokenDtype::kUInt32;
  TORCH_CHECK(false, "data: token dtype must be uint16 or uint32; got \"", name, "\"");
}

// --------------------------------------------------------------- reading ---

struct TokenShard::Mapping {
  void* base = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (base != nullptr) ::munmap(base, size);
  }
};

namespace {

uint32_t read_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

uint64_t read_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

bool is_llmc_magic(int32_t magic) { return magic == kLlmcMagicUInt16 || magic == kLlmcMagicUInt32; }

// token_count * token_bytes + header, or an error when it overflows (a corrupt
// count must not wrap around to a size that matches).
uint64_t expected_file_size(uint64_t header, uint64_t count, uint64_t token_bytes, const std::string& path) {
  uint64_t data = 0, total = 0;
  TORCH_CHECK(!__builtin_mul_overflow(count, token_bytes, &data) && !__builtin_add_overflow(data, header, &total),
              "data: ", path, ": token count ", count, " overflows the file size (corrupt header?)");
  return total;
}

// The first index whose token is >= vocab_size, or -1. Block maxima first (a
// loop the compiler vectorises), the exact index only inside a failing block.
template <typename T>
int64_t first_out_of_vocab(const T* tokens, int64_t count, uint64_t vocab_size) {
  constexpr int64_t kBlock = 1 << 16;
  for (int64_t b = 0; b < count; b += kBlock) {
    const int64_t e = std::min(count, b + kBlock);
    T block_max = 0;
    for (int64_t i = b; i < e; ++i) block_max = std::max(block_max, tokens[i]);
    if (uint64_t(block_max) < vocab_size) continue;
    for (int64_t i = b; i < e; ++i)
      if (uint64_t(tokens[i]) >= vocab_size) return i;
  }
  return -1;
}

template <typename T>
void widen(const T* src, int64_t count, int64_t* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = int64_t(src[i]);
}

}  // namespace

TokenShard TokenShard::open(const std::string& path, ShardFormat format, int64_t vocab_size) {
  io::Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  TORCH_CHECK(fd.fd >= 0, "data: cannot open token shard ", path, ": ", io::errno_text());
  struct stat st {};
  TORCH_CHECK(::fstat(fd.fd, &st) == 0, "data: cannot stat ", path, ": ", io::errno_text());
  TORCH_CHECK(S_ISREG(st.st_mode), "data: ", path, " is not a regular file");
  const uint64_t size = uint64_t(st.st_size);

  TokenShard shard;
  shard.path_ = path;
  shard.mapping_ = std::make_shared<Mapping>();
  if (size > 0) {  // mmap of length 0 is an error; an empty file has no tokens
    void* base = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd.fd, 0);
    TORCH_CHECK(base != MAP_FAILED, "data: cannot mmap ", path, ": ", io::errno_text());
    shard.mapping_->base = base;
    shard.mapping_->size = size;
  }
  const auto* bytes = static_cast<const uint8_t*>(shard.mapping_->base);

  if (format == ShardFormat::kAuto) {
    if (size >= 8 && std::memcmp(bytes, kShardMagic, 8) == 0)
      format = ShardFormat::kUnswag;
    else if (size >= 4 && is_llmc_magic(int32_t(read_u32(bytes))))
      format = ShardFormat::kLlmc;
    else
      format = ShardFormat::kNanoGPT;
  }
  shard.format_ = format;

  uint64_t header_bytes = 0, count = 0, token_bytes = 2;
  if (format == ShardFormat::kUnswag) {
    TORCH_CHECK(size >= 8 && std::memcmp(bytes, kShardMagic, 8) == 0, "data: ", path,
                ": bad magic: expected \"UNSWAGTK\" (UnSwag token shard); for llm.c or nanoGPT files pass "
                "format llmc / nanogpt or auto");
    TORCH_CHECK(size >= 40, "data: ", path, ": truncated UnSwag shard: ", size,
                " bytes, shorter than the 40 bytes of header fields");
    const uint32_t version = read_u32(bytes + 8);
    TORCH_CHECK(version == kShardVersion, "data: ", path, ": unknown UnSwag shard version ", version,
                " (this reader knows version ", kShardVersion, ")");
    header_bytes = read_u32(bytes + 12);
    TORCH_CHECK(header_bytes >= 40 && header_bytes % 8 == 0, "data: ", path, ": header_size ", header_bytes,
                " must be a multiple of 8 and at least 40");
    TORCH_CHECK(header_bytes <= size, "data: ", path, ": truncated: header_size ", header_bytes,
                " exceeds the file size ", size);
    token_bytes = read_u32(bytes + 16);
    TORCH_CHECK(token_bytes == 2 || token_bytes == 4, "data: ", path, ": unknown token dtype: token_bytes ",
                token_bytes, " (expected 2 for uint16 or 4 for uint32)");
    const uint32_t eos = read_u32(bytes + 20);
    count = read_u64(bytes + 24);
    const uint64_t documents = read_u64(bytes + 32);
    TORCH_CHECK(documents <= count, "data: ", path, ": document_count ", documents, " exceeds token_count ", count,
                " (each document ends with an EOS token)");
    TORCH_CHECK(token_bytes == 4 || eos == kNoEos || eos <= 0xFFFF, "data: ", path, ": eos_id ", eos,
                " does not fit uint16 tokens");
    shard.num_documents_ = int64_t(documents);
    shard.eos_id_ = eos == kNoEos ? -1 : int64_t(eos);
  } else if (format == ShardFormat::kLlmc) {
    const int32_t magic = size >= 4 ? int32_t(read_u32(bytes)) : 0;
    TORCH_CHECK(is_llmc_magic(magic), "data: ", path, ": bad magic ", magic, ": expected ", kLlmcMagicUInt16,
                " (llm.c uint16) or ", kLlmcMagicUInt32, " (llm.c uint32); is this the right file and format?");
    TORCH_CHECK(size >= kLlmcHeaderBytes, "data: ", path, ": truncated llm.c shard: ", size,
                " bytes, shorter than the 1024-byte header");
    const int32_t version = int32_t(read_u32(bytes + 4)), n = int32_t(read_u32(bytes + 8));
    const int32_t expected_version = magic == kLlmcMagicUInt16 ? kLlmcVersionUInt16 : kLlmcVersionUInt32;
    TORCH_CHECK(version == expected_version, "data: ", path, ": unknown llm.c version ", version, " for magic ",
                magic, " (expected ", expected_version, ")");
    TORCH_CHECK(n >= 0, "data: ", path, ": negative token count ", n, " in the llm.c header");
    header_bytes = kLlmcHeaderBytes;
    token_bytes = magic == kLlmcMagicUInt16 ? 2 : 4;
    count = uint64_t(n);
  } else {  // nanoGPT: the whole file is uint16 tokens
    TORCH_CHECK(size % 2 == 0, "data: ", path, ": nanoGPT .bin holds raw uint16 tokens, but its size ", size,
                " is odd (truncated, or another format?)");
    count = size / 2;
  }
  const uint64_t expected = expected_file_size(header_bytes, count, token_bytes, path);
  TORCH_CHECK(size == expected, "data: ", path, ": file size ", size, " does not match the header's token count ",
              count, " (expected ", header_bytes, " + ", count, " x ", token_bytes, " = ", expected, " bytes; ",
              size < expected ? "truncated" : "trailing bytes", ")");

  shard.dtype_ = token_bytes == 2 ? TokenDtype::kUInt16 : TokenDtype::kUInt32;
  shard.num_tokens_ = int64_t(count);
  shard.tokens_ = bytes == nullptr ? nullptr : bytes + header_bytes;

  if (vocab_size > 0 && count > 0) {
    const int64_t bad = shard.dtype_ == TokenDtype::kUInt16
                            ? first_out_of_vocab(reinterpret_cast<const uint16_t*>(shard.tokens_), int64_t(count),
                                                 uint64_t(vocab_size))
                            : first_out_of_vocab(reinterpret_cast<const uint32_t*>(shard.tokens_), int64_t(count),
                                                 uint64_t(vocab_size));
    TORCH_CHECK(bad < 0, "data: ", path, ": token ", bad, " has id ", bad < 0 ? 0 : shard.token(bad),
                ", not below vocab_size ", vocab_size, " (wrong tokenizer, dtype or format?)");
  }
  return shard;
}

uint32_t TokenShard::token(int64_t i) const {
  TORCH_CHECK(i >= 0 && i < num_tokens_, "data: ", path_, ": token index ", i, " out of range [0, ", num_tokens_,
              ")");
  if (dtype_ == TokenDtype::kUInt16) return reinterpret_cast<const uint16_t*>(tokens_)[i];
  return reinterpret_cast<const uint32_t*>(tokens_)[i];
}

void TokenShard::copy_tokens(int64_t begin, int64_t count, int64_t* out) const {
  TORCH_CHECK(begin >= 0 && count >= 0 && begin + count <= num_tokens_, "data: ", path_, ": tokens [", begin, ", ",
              begin + count, ") out of range [0, ", num_tokens_, ")");
  // The token data starts at an 8-byte multiple of a page-aligned mapping
  // (UnSwag, llm.c) or at the mapping itself (nanoGPT), so it is aligned.
  if (dtype_ == TokenDtype::kUInt16)
    widen(reinterpret_cast<const uint16_t*>(tokens_) + begin, count, out);
  else
    widen(reinterpret_cast<const uint32_t*>(tokens_) + begin, count, out);
}

// --------------------------------------------------------------- writing ---

ShardWriter::ShardWriter(std::string path, TokenDtype dtype, int64_t eos_id)
    : path_(std::move(path)), dtype_(dtype), eos_id_(eos_id) {
  const int64_t max_id = dtype == TokenDtype::kUInt16 ? 0xFFFF : 0x7FFFFFFF;
  TORCH_CHECK(eos_id <= max_id, "data: writing ", path_, ": eos_id ", eos_id, " does not fit ", to_string(dtype),
              " tokens");
  tmp_ = path_ + ".tmp." + std::to_string(::getpid());
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  TORCH_CHECK(fd_ >= 0, "data: cannot create ", tmp_, ": ", io::errno_text());
  buffer_.assign(kShardHeaderBytes, 0);  // the header is filled in by close()
  buffer_.reserve(1 << 20);
}

ShardWriter::~ShardWriter() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(tmp_.c_str());
  }
}

void ShardWriter::flush() {
  io::write_all(fd_, buffer_.data(), buffer_.size(), tmp_);
  buffer_.clear();
}

void ShardWriter::append(const int32_t* tokens, size_t count) {
  TORCH_CHECK(fd_ >= 0, "data: ", path_, ": append after close");
  const int64_t max_id = dtype_ == TokenDtype::kUInt16 ? 0xFFFF : 0x7FFFFFFF;
  const size_t width = size_t(dtype_);
  for (size_t i = 0; i < count; ++i) {
    const int32_t t = tokens[i];
    TORCH_CHECK(t >= 0 && t <= max_id, "data: writing ", path_, ": token id ", t, " does not fit ",
                to_string(dtype_), " tokens (expected 0..", max_id, ")");
    num_documents_ += (t == eos_id_);
    if (buffer_.size() + width > buffer_.capacity()) flush();
    const uint32_t v = uint32_t(t);
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    buffer_.insert(buffer_.end(), p, p + width);  // little-endian: the low bytes first
  }
  num_tokens_ += int64_t(count);
}

void ShardWriter::close() {
  TORCH_CHECK(fd_ >= 0, "data: ", path_, ": closed twice");
  flush();
  uint8_t header[kShardHeaderBytes] = {};
  auto put32 = [&](size_t at, uint32_t v) { std::memcpy(header + at, &v, 4); };
  auto put64 = [&](size_t at, uint64_t v) { std::memcpy(header + at, &v, 8); };
  std::memcpy(header, kShardMagic, 8);
  put32(8, kShardVersion);
  put32(12, kShardHeaderBytes);
  put32(16, uint32_t(dtype_));
  put32(20, eos_id_ < 0 ? kNoEos : uint32_t(eos_id_));
  put64(24, uint64_t(num_tokens_));
  put64(32, uint64_t(num_documents_));
  TORCH_CHECK(::pwrite(fd_, header, sizeof(header), 0) == ssize_t(sizeof(header)), "data: writing the header of ",
              tmp_, " failed: ", io::errno_text());
  io::commit_temp_file(fd_, tmp_, path_);  // closes fd_ and renames, or throws
  fd_ = -1;
}

// ------------------------------------------------------------------ inputs ---

std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs, const char* what,
                                       const std::string& directory_suffix) {
  std::vector<std::string> files;
  for (const std::string& input : inputs) {
    struct stat st {};
    if (::stat(input.c_str(), &st) == 0) {
      if (!S_ISDIR(st.st_mode)) {
        files.push_back(input);
        continue;
      }
      std::vector<std::string> found;
      DIR* dir = ::opendir(input.c_str());
      TORCH_CHECK(dir != nullptr, what, ": cannot list directory ", input, ": ", io::errno_text());
      while (const dirent* entry = ::readdir(dir)) {
        const std::string name = entry->d_name;
        if (name.empty() || name[0] == '.') continue;
        if (name.size() < directory_suffix.size() ||
            name.compare(name.size() - directory_suffix.size(), directory_suffix.size(), directory_suffix) != 0)
          continue;
        const std::string full = input.back() == '/' ? input + name : input + "/" + name;
        struct stat fst {};
        if (::stat(full.c_str(), &fst) == 0 && S_ISREG(fst.st_mode)) found.push_back(full);
      }
      ::closedir(dir);
      TORCH_CHECK(!found.empty(), what, ": directory ", input, " holds no ",
                  directory_suffix.empty() ? "files" : "\"*" + directory_suffix + "\" files");
      std::sort(found.begin(), found.end());
      files.insert(files.end(), found.begin(), found.end());
      continue;
    }
    const bool pattern = input.find_first_of("*?[") != std::string::npos;
    TORCH_CHECK(pattern, what, ": input ", input, " does not exist (", io::errno_text(), ")");
    glob_t matches{};
    const int rc = ::glob(input.c_str(), GLOB_ERR, nullptr, &matches);
    std::vector<std::string> found;
    for (size_t i = 0; rc == 0 && i < matches.gl_pathc; ++i) found.emplace_back(matches.gl_pathv[i]);
    ::globfree(&matches);
    TORCH_CHECK(rc == 0 || rc == GLOB_NOMATCH, what, ": expanding pattern ", input, " failed (glob error ", rc, ")");
    TORCH_CHECK(!found.empty(), what, ": pattern ", input, " matches no file");
    files.insert(files.end(), found.begin(), found.end());  // glob(3) sorts
  }
  return files;
}

std::string shard_path(const std::string& out_prefix, int64_t index) {
  char digits[32];
  std::snprintf(digits, sizeof(digits), "_%06lld.bin", static_cast<long long>(index));
  return out_prefix + digits;
}

}  // namespace unswag::data
