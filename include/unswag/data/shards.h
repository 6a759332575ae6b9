// Pre-tokenized training data on disk: UnSwag's own token-shard format (a
// fixed little-endian header, then the tokens), llm.c shards and nanoGPT
// `.bin` files, read through read-only shared memory maps so that no shard is
// ever loaded whole; an atomic shard writer; and the corpus writer that turns
// text and JSONL files into numbered shards through any encoder.
//
// The formats are documented in docs/data.md. Errors are c10::Error
// (TORCH_CHECK) whose message names the file and what is wrong with it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace unswag::data {

// Bytes per token on disk.
enum class TokenDtype : uint8_t { kUInt16 = 2, kUInt32 = 4 };

enum class ShardFormat {
  kAuto,     // by magic: UnSwag, then llm.c, else nanoGPT (see docs/data.md)
  kUnswag,   // "UNSWAGTK" header (below)
  kLlmc,     // 256 x int32 header: magic 20240520 v1 uint16 / 20240801 v7 uint32
  kNanoGPT,  // raw uint16 tokens, no header
};

const char* to_string(TokenDtype dtype);
const char* to_string(ShardFormat format);
// "auto", "unswag", "llmc" (or "llm.c"), "nanogpt"; anything else is an error.
ShardFormat parse_shard_format(const std::string& name);
// "uint16", "uint32"; anything else is an error.
TokenDtype parse_token_dtype(const std::string& name);

// UnSwag's shard header, version 1 (all fields little-endian):
//   offset  size  field
//        0     8  magic "UNSWAGTK"
//        8     4  u32 version (1)
//       12     4  u32 header_size: byte offset of the first token (256)
//       16     4  u32 token_bytes: 2 (uint16) or 4 (uint32)
//       20     4  u32 eos_id, or 0xFFFFFFFF when unknown
//       24     8  u64 token_count
//       32     8  u64 document_count: EOS tokens in this shard (documents
//                 that end here)
//       40   216  reserved, zero
// then token_count tokens of token_bytes each; file size = header_size +
// token_count * token_bytes exactly.
constexpr char kShardMagic[8] = {'U', 'N', 'S', 'W', 'A', 'G', 'T', 'K'};
constexpr uint32_t kShardVersion = 1;
constexpr uint32_t kShardHeaderBytes = 256;
constexpr uint32_t kNoEos = 0xFFFFFFFFu;
// llm.c (dev/data/data_common.py): 256 int32, [0] magic, [1] version, [2] count.
constexpr int32_t kLlmcMagicUInt16 = 20240520, kLlmcVersionUInt16 = 1;
constexpr int32_t kLlmcMagicUInt32 = 20240801, kLlmcVersionUInt32 = 7;
constexpr uint64_t kLlmcHeaderBytes = 256 * 4;

// One memory-mapped token shard (any of the formats above). Cheap to copy:
// copies share the mapping.
class TokenShard {
 public:
  // Maps `path` (read-only, MAP_SHARED) and validates it. With vocab_size > 0
  // every token is also checked to be < vocab_size (a full read of the file).
  static TokenShard open(const std::string& path, ShardFormat format = ShardFormat::kAuto,
                         int64_t vocab_size = 0);

  const std::string& path() const { return path_; }
  ShardFormat format() const { return format_; }
  TokenDtype dtype() const { return dtype_; }
  int64_t num_tokens() const { return num_tokens_; }
  // From the UnSwag header; -1 for formats that do not record it.
  int64_t num_documents() const { return num_documents_; }
  // From the UnSwag header; -1 when unknown (other formats, or not recorded).
  int64_t eos_id() const { return eos_id_; }

  // Token i (0 <= i < num_tokens()).
  uint32_t token(int64_t i) const;
  // Writes tokens [begin, begin + count) as int64 to out.
  void copy_tokens(int64_t begin, int64_t count, int64_t* out) const;

 private:
  struct Mapping;
  TokenShard() = default;
  std::string path_;
  std::shared_ptr<Mapping> mapping_;
  const uint8_t* tokens_ = nullptr;
  ShardFormat format_ = ShardFormat::kAuto;
  TokenDtype dtype_ = TokenDtype::kUInt16;
  int64_t num_tokens_ = 0, num_documents_ = -1, eos_id_ = -1;
};

// Writes one UnSwag shard, streaming: tokens go to "<path>.tmp.<pid>" as they
// come, and close() fills in the header, fsyncs and renames the file over
// `path`. Destroying a writer that was not closed removes the temporary file.
class ShardWriter {
 public:
  // eos_id < 0: no EOS recorded (document_count is then 0).
  ShardWriter(std::string path, TokenDtype dtype, int64_t eos_id);
  ~ShardWriter();
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  // Every token must fit the dtype (and be >= 0); an error names the token.
  void append(const int32_t* tokens, size_t count);
  void append(const std::vector<int32_t>& tokens) { append(tokens.data(), tokens.size()); }
  void close();

  const std::string& path() const { return path_; }
  int64_t num_tokens() const { return num_tokens_; }
  int64_t num_documents() const { return num_documents_; }

 private:
  void flush();
  std::string path_, tmp_;
  TokenDtype dtype_;
  int64_t eos_id_;
  int fd_ = -1;
  int64_t num_tokens_ = 0, num_documents_ = 0;
  std::vector<uint8_t> buffer_;
};

// Expands the loader's and the corpus writer's inputs, in order: a regular
// file is taken as is; a directory gives its regular files whose names end in
// `directory_suffix` (all when empty; hidden files never), sorted by name; a
// pattern with * ? or [ is expanded by glob(3), sorted. A missing path, an
// empty directory and a pattern matching nothing are errors. `what` names the
// caller in messages ("loader", "corpus").
std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs, const char* what,
                                       const std::string& directory_suffix = ".bin");

// ------------------------------------------------------------ corpus writer --

// Turns text into token ids; the ids must be in [0, vocab) and fit the dtype.
using Encoder = std::function<std::vector<int32_t>(std::string_view)>;

enum class InputFormat {
  kAuto,   // ".jsonl" / ".ndjson" files are JSONL, everything else plain text
  kText,
  kJsonl,  // one JSON object per line; the document is its `text_field`
};

enum class TextDocuments {
  kPerFile,       // a whole text file is one document
  kPerParagraph,  // blank-line-separated paragraphs are documents
};

struct CorpusProgress {
  int64_t bytes_read = 0, bytes_total = 0;  // input bytes consumed / sum of input sizes
  int64_t tokens = 0, documents = 0, shards = 0;
  std::string current_file;
  bool done = false;  // the last call, after every shard is closed
};

struct CorpusOptions {
  InputFormat input_format = InputFormat::kAuto;
  TextDocuments text_documents = TextDocuments::kPerFile;
  std::string text_field = "text";
  // kUInt16 when vocab_size is in (0, 65536], else kUInt32, unless set.
  bool dtype_auto = true;
  TokenDtype dtype = TokenDtype::kUInt32;
  int64_t vocab_size = 0;  // > 0: every id must be below it
  // A shard holds at most this many tokens; the stream is cut exactly there
  // (a document may continue in the next shard).
  int64_t max_shard_tokens = 100'000'000;
  // Text documents longer than this are encoded in pieces cut after a '\n'
  // that precedes a non-whitespace character (a pre-token boundary for
  // regex pre-tokenizers such as GPT-2's and Llama-3's), so no input is ever
  // held whole. JSONL records are always encoded whole.
  int64_t max_chunk_bytes = 16 << 20;
  bool overwrite = false;  // else an existing "<prefix>_000000.bin" is an error
  std::function<void(const CorpusProgress&)> progress;
  int64_t progress_every_bytes = 16 << 20;
};

struct CorpusStats {
  std::vector<std::string> shards;
  int64_t tokens = 0, documents = 0, empty_documents = 0, bytes_read = 0;
  TokenDtype dtype = TokenDtype::kUInt32;
};

// Encodes every document of `inputs` (files, directories, globs; read as a
// stream) and writes "<out_prefix>_000000.bin", "<out_prefix>_000001.bin", ...
// in UnSwag's format: each document's tokens followed by eos_id. Documents that
// encode to no tokens are skipped (counted in empty_documents). Errors in a
// JSONL record name the file and line.
CorpusStats write_corpus_shards(const std::vector<std::string>& inputs, const Encoder& encoder, int64_t eos_id,
                                const std::string& out_prefix, const CorpusOptions& options = {});

// "<out_prefix>_<index, 6 digits>.bin"
std::string shard_path(const std::string& out_prefix, int64_t index);

}  // namespace unswag::data
