// The corpus writer: streams plain text and JSONL files through an encoder
// into numbered UnSwag token shards (each document's tokens, then EOS), with
// progress reports. Memory stays bounded: files are read in 1 MiB blocks,
// long text documents are encoded in pieces, and each shard is written as a
// stream (ShardWriter).
#include <c10/util/Exception.h>
#include <fcntl.h>
#include <nlohmann/json.hpp>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "models/file_io.h"
#include "unswag/data/shards.h"

namespace unswag::data {
namespace {

constexpr size_t kReadBlock = 1 << 20;

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v'; }

bool ends_with(const std::string& s, const char* suffix) {
  const size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

// Reads a file in blocks; hands out either blocks or lines. Counts the bytes
// consumed for progress.
class BlockReader {
 public:
  explicit BlockReader(const std::string& path) : path_(path), fd_(::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
    TORCH_CHECK(fd_.fd >= 0, "corpus: cannot open ", path, ": ", io::errno_text());
    buffer_.resize(kReadBlock);
  }

  // The next block (empty at end of file).
  std::string_view next_block() {
    const ssize_t n = read_some();
    return {buffer_.data(), size_t(n)};
  }

  // The next line without its '\n' (and without a '\r' before it); false at
  // end of file. A last line without '\n' is still a line.
  bool next_line(std::string& line) {
    line.clear();
    for (;;) {
      if (begin_ == end_) {
        const ssize_t n = read_some();
        if (n == 0) return !line.empty();
        begin_ = 0;
        end_ = size_t(n);
      }
      const char* start = buffer_.data() + begin_;
      const void* nl = std::memchr(start, '\n', end_ - begin_);
      if (nl == nullptr) {
        line.append(start, end_ - begin_);
        begin_ = end_;
        continue;
      }
      const size_t len = size_t(static_cast<const char*>(nl) - start);
      line.append(start, len);
      begin_ += len + 1;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      return true;
    }
  }

  int64_t bytes_read() const { return bytes_read_; }

 private:
  ssize_t read_some() {
    for (;;) {
      const ssize_t n = ::read(fd_.fd, buffer_.data(), buffer_.size());
      if (n < 0 && errno == EINTR) continue;
      TORCH_CHECK(n >= 0, "corpus: reading ", path_, " failed: ", io::errno_text());
      bytes_read_ += n;
      return n;
    }
  }
  std::string path_;
  io::Fd fd_;
  std::string buffer_;
  size_t begin_ = 0, end_ = 0;
  int64_t bytes_read_ = 0;
};

// Receives the token stream and cuts it into shards of at most
// max_shard_tokens tokens.
class ShardSink {
 public:
  ShardSink(std::string prefix, TokenDtype dtype, int64_t eos_id, int64_t max_tokens, int64_t vocab_size)
      : prefix_(std::move(prefix)), dtype_(dtype), eos_id_(eos_id), max_tokens_(max_tokens), vocab_size_(vocab_size) {}

  // `where` ("file.jsonl:12", "notes.txt") names the source in errors.
  void add(const std::vector<int32_t>& tokens, const std::string& where) {
    const int64_t max_id = dtype_ == TokenDtype::kUInt16 ? 0xFFFF : 0x7FFFFFFF;
    for (const int32_t t : tokens) {
      TORCH_CHECK(t >= 0 && t <= max_id && (vocab_size_ <= 0 || t < vocab_size_), "corpus: ", where,
                  ": the encoder returned token id ", t, ", outside [0, ",
                  vocab_size_ > 0 ? std::min(vocab_size_, max_id + 1) : max_id + 1, ") for ", to_string(dtype_),
                  " shards", vocab_size_ > 0 ? " and vocab_size " + std::to_string(vocab_size_) : std::string());
    }
    size_t done = 0;
    while (done < tokens.size()) {
      if (!writer_) writer_ = std::make_unique<ShardWriter>(shard_path(prefix_, int64_t(shards_.size())), dtype_, eos_id_);
      const size_t room = size_t(max_tokens_ - writer_->num_tokens());
      const size_t take = std::min(room, tokens.size() - done);
      writer_->append(tokens.data() + done, take);
      done += take;
      tokens_ += int64_t(take);
      if (writer_->num_tokens() == max_tokens_) close_shard();
    }
  }

  void finish() {
    if (writer_) close_shard();
  }

  const std::vector<std::string>& shards() const { return shards_; }
  int64_t tokens() const { return tokens_; }
  int64_t open_shards() const { return int64_t(shards_.size()) + (writer_ ? 1 : 0); }

 private:
  void close_shard() {
    writer_->close();
    shards_.push_back(writer_->path());
    writer_.reset();
  }
  std::string prefix_;
  TokenDtype dtype_;
  int64_t eos_id_, max_tokens_, vocab_size_;
  std::unique_ptr<ShardWriter> writer_;
  std::vector<std::string> shards_;
  int64_t tokens_ = 0;
};

// One document fed in pieces: text accumulates until max_chunk_bytes, then the
// part up to the last safe cut is encoded. A safe cut is after a '\n' that is
// followed by a non-whitespace byte: regex pre-tokenizers (GPT-2, Llama-3)
// always split there, so encoding the pieces gives the same tokens as encoding
// the whole. Without such a cut, the text is cut before a UTF-8 lead byte.
class DocumentEncoder {
 public:
  DocumentEncoder(const Encoder& encoder, ShardSink& sink, int64_t eos_id, size_t max_chunk)
      : encoder_(encoder), sink_(sink), eos_id_(eos_id), max_chunk_(std::max<size_t>(max_chunk, 1)) {}

  void append(std::string_view text, const std::string& where) {
    pending_.append(text);
    while (pending_.size() > max_chunk_) {
      const size_t cut = safe_cut();
      encode(std::string_view(pending_).substr(0, cut), where);
      pending_.erase(0, cut);
    }
  }

  // Ends the document: encodes what is left and appends EOS if the document
  // produced any token. Returns whether it did.
  bool finish(const std::string& where) {
    if (!pending_.empty()) encode(pending_, where);
    pending_.clear();
    const bool had_tokens = has_tokens_;
    if (had_tokens) sink_.add({int32_t(eos_id_)}, where);
    has_tokens_ = false;
    return had_tokens;
  }

 private:
  size_t safe_cut() const {
    // Search the first max_chunk_ bytes backwards for "\n<non-space>".
    for (size_t i = max_chunk_; i >= 1; --i)
      if (pending_[i - 1] == '\n' && i < pending_.size() && !is_space(pending_[i])) return i;
    // No line boundary: cut before a byte that starts a UTF-8 sequence.
    size_t i = max_chunk_;
    while (i > 1 && (static_cast<unsigned char>(pending_[i]) & 0xC0) == 0x80) --i;
    return i;
  }
  void encode(std::string_view text, const std::string& where) {
    std::vector<int32_t> tokens = encoder_(text);
    has_tokens_ = has_tokens_ || !tokens.empty();
    sink_.add(tokens, where);
  }
  const Encoder& encoder_;
  ShardSink& sink_;
  int64_t eos_id_;
  size_t max_chunk_;
  std::string pending_;
  bool has_tokens_ = false;
};

int64_t file_size(const std::string& path) {
  struct stat st {};
  TORCH_CHECK(::stat(path.c_str(), &st) == 0, "corpus: cannot stat ", path, ": ", io::errno_text());
  TORCH_CHECK(S_ISREG(st.st_mode), "corpus: ", path, " is not a regular file");
  return int64_t(st.st_size);
}

// Whether `file` is "<out_prefix>_NNNNNN.bin" (or its temporary file), the
// directories compared by realpath so that spellings like "./x" match.
bool is_output_shard(const std::string& file, const std::string& out_prefix) {
  const size_t slash = out_prefix.rfind('/');
  const std::string stem = (slash == std::string::npos ? out_prefix : out_prefix.substr(slash + 1)) + "_";
  const size_t file_slash = file.rfind('/');
  const std::string name = file_slash == std::string::npos ? file : file.substr(file_slash + 1);
  if (name.compare(0, stem.size(), stem) != 0 || name.find(".bin", stem.size()) == std::string::npos) return false;
  char a[PATH_MAX], b[PATH_MAX];
  return ::realpath(io::parent_dir(file).c_str(), a) != nullptr &&
         ::realpath(io::parent_dir(out_prefix).c_str(), b) != nullptr && std::strcmp(a, b) == 0;
}

bool is_blank(const std::string& line) {
  return std::all_of(line.begin(), line.end(), [](char c) { return is_space(c); });
}

}  // namespace

CorpusStats write_corpus_shards(const std::vector<std::string>& inputs, const Encoder& encoder, int64_t eos_id,
                                const std::string& out_prefix, const CorpusOptions& options) {
  // Everything that can be rejected is checked before any shard is written.
  TORCH_CHECK(encoder, "corpus: encoder is empty");
  TORCH_CHECK(!inputs.empty(), "corpus: inputs is empty; expected text or JSONL files, directories or patterns");
  TORCH_CHECK(!out_prefix.empty(), "corpus: out_prefix is empty; expected e.g. \"data/train\"");
  TORCH_CHECK(options.max_shard_tokens > 0, "corpus: max_shard_tokens must be > 0, got ", options.max_shard_tokens);
  TORCH_CHECK(options.max_chunk_bytes > 0, "corpus: max_chunk_bytes must be > 0, got ", options.max_chunk_bytes);
  TORCH_CHECK(!options.text_field.empty(), "corpus: text_field is empty");
  CorpusStats stats;
  stats.dtype = options.dtype_auto ? (options.vocab_size > 0 && options.vocab_size <= 65536 ? TokenDtype::kUInt16
                                                                                             : TokenDtype::kUInt32)
                                   : options.dtype;
  const int64_t max_id = stats.dtype == TokenDtype::kUInt16 ? 0xFFFF : 0x7FFFFFFF;
  TORCH_CHECK(eos_id >= 0 && eos_id <= max_id, "corpus: eos_id must be in [0, ", max_id, "] for ",
              to_string(stats.dtype), " shards, got ", eos_id);
  TORCH_CHECK(options.vocab_size <= 0 || eos_id < options.vocab_size, "corpus: eos_id ", eos_id,
              " is not below vocab_size ", options.vocab_size);
  TORCH_CHECK(options.vocab_size <= max_id + 1, "corpus: vocab_size ", options.vocab_size, " does not fit ",
              to_string(stats.dtype), " shards");
  {
    const std::string dir = io::parent_dir(out_prefix);
    struct stat st {};
    TORCH_CHECK(::stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode), "corpus: the directory of out_prefix \"",
                out_prefix, "\" (", dir, ") does not exist");
    const std::string first = shard_path(out_prefix, 0);
    TORCH_CHECK(options.overwrite || ::stat(first.c_str(), &st) != 0, "corpus: ", first,
                " already exists; choose another out_prefix or set overwrite");
  }
  const std::vector<std::string> files = expand_inputs(inputs, "corpus", "");
  CorpusProgress progress;
  for (const std::string& f : files) {
    progress.bytes_total += file_size(f);
    // Shards of an earlier run under the same prefix (a directory input that
    // holds the output) would be read back as text.
    TORCH_CHECK(!is_output_shard(f, out_prefix), "corpus: input ", f, " is an output shard of out_prefix \"",
                out_prefix, "\"; keep the shards out of the input directories");
  }

  ShardSink sink(out_prefix, stats.dtype, eos_id, options.max_shard_tokens, options.vocab_size);
  DocumentEncoder document(encoder, sink, eos_id, size_t(options.max_chunk_bytes));
  int64_t bytes_before_file = 0, last_report = 0;
  auto end_document = [&](const std::string& where) {
    if (document.finish(where))
      ++stats.documents;
    else
      ++stats.empty_documents;
  };
  auto report = [&](const BlockReader& reader, const std::string& file, bool force) {
    progress.bytes_read = bytes_before_file + reader.bytes_read();
    if (!options.progress || (!force && progress.bytes_read - last_report < options.progress_every_bytes)) return;
    last_report = progress.bytes_read;
    progress.tokens = sink.tokens();
    progress.documents = stats.documents;
    progress.shards = sink.open_shards();
    progress.current_file = file;
    options.progress(progress);
  };

  for (const std::string& file : files) {
    const bool jsonl = options.input_format == InputFormat::kJsonl ||
                       (options.input_format == InputFormat::kAuto && (ends_with(file, ".jsonl") || ends_with(file, ".ndjson")));
    BlockReader reader(file);
    if (jsonl) {
      std::string line;
      for (int64_t line_no = 1; reader.next_line(line); ++line_no) {
        report(reader, file, false);
        if (is_blank(line)) continue;
        const std::string where = file + ":" + std::to_string(line_no);
        nlohmann::json record;
        try {
          record = nlohmann::json::parse(line);
        } catch (const nlohmann::json::exception& e) {
          TORCH_CHECK(false, "corpus: ", where, ": not valid JSON (", e.what(), ")");
        }
        TORCH_CHECK(record.is_object(), "corpus: ", where, ": expected a JSON object with a \"", options.text_field,
                    "\" field, got ", record.type_name());
        const auto field = record.find(options.text_field);
        TORCH_CHECK(field != record.end(), "corpus: ", where, ": no \"", options.text_field, "\" field");
        TORCH_CHECK(field->is_string(), "corpus: ", where, ": \"", options.text_field, "\" must be a string, got ",
                    field->type_name());
        // A record is a document of its own: pieces would change the encoding.
        const std::string& text = field->get_ref<const std::string&>();
        std::vector<int32_t> tokens = encoder(text);
        sink.add(tokens, where);
        if (tokens.empty()) {
          ++stats.empty_documents;
        } else {
          sink.add({int32_t(eos_id)}, where);
          ++stats.documents;
        }
      }
    } else if (options.text_documents == TextDocuments::kPerParagraph) {
      // Paragraph text: its lines joined with '\n' (line ends normalised).
      std::string line;
      bool in_paragraph = false;
      while (reader.next_line(line)) {
        report(reader, file, false);
        if (is_blank(line)) {
          if (in_paragraph) end_document(file);
          in_paragraph = false;
          continue;
        }
        if (in_paragraph) document.append("\n", file);
        document.append(line, file);
        in_paragraph = true;
      }
      if (in_paragraph) end_document(file);
    } else {
      for (std::string_view block = reader.next_block(); !block.empty(); block = reader.next_block()) {
        document.append(block, file);
        report(reader, file, false);
      }
      end_document(file);
    }
    report(reader, file, false);
    bytes_before_file += reader.bytes_read();
  }
  sink.finish();
  stats.shards = sink.shards();
  stats.tokens = sink.tokens();
  stats.bytes_read = bytes_before_file;
  if (options.progress) {
    progress.bytes_read = bytes_before_file;
    progress.tokens = stats.tokens;
    progress.documents = stats.documents;
    progress.shards = int64_t(stats.shards.size());
    progress.done = true;
    options.progress(progress);
  }
  return stats;
}

}  // namespace unswag::data
