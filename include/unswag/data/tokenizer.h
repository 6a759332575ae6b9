// Byte-level BPE tokenizer read from a Hugging Face `tokenizer.json` (the
// GPT-2, Llama 3 and Qwen2 styles), whose encode and decode give the same ids
// and text as the `tokenizers` library. The pipeline, in tokenizers' order:
//   1. split the input on added tokens that are matched before normalisation
//      (normalized=false, e.g. every special token), longest match first;
//   2. normalise each remaining piece (null, NFC/NFD/NFKC/NFKD, Sequence) and
//      split it again on the added tokens matched after normalisation;
//   3. pre-tokenise (ByteLevel with the GPT-2 regex and add_prefix_space, Split
//      with a regex or a string and any split behaviour, Sequence);
//   4. BPE by merge ranks (with ignore_merges and a word cache);
//   5. post-process (TemplateProcessing, ByteLevel, Sequence, null).
// Decoding maps ids to tokens and runs the ByteLevel decoder.
//
// Components the file names but this reader does not implement are errors
// naming the component type, so that an unsupported file never silently
// gives different ids. Errors are c10::Error (TORCH_CHECK) whose message
// names the file or argument, what was expected and what came.
// docs/tokenizer.md describes the design and the measured speed.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace unswag::data {

class Tokenizer {
 public:
  // `path` is a tokenizer.json, or a directory holding one. A
  // tokenizer_config.json beside it, when present, gives the BOS and EOS token
  // strings (as strings or as {"content": ...} objects).
  static Tokenizer from_file(const std::string& path);

  // `text` must be UTF-8 (an error names the offset of the first bad byte).
  // `add_special_tokens` runs the post-processor (e.g. Llama 3's BOS).
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = true) const;

  // Every id must name a token (an error names the position and the id).
  // Byte sequences that are not UTF-8 become U+FFFD, as tokenizers does.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const;

  // Distinct token strings of the model and the added tokens together, as
  // tokenizers' get_vocab_size(with_added_tokens=True).
  int64_t vocab_size() const;
  // Added tokens first, then the model vocabulary (as tokenizers).
  std::optional<int32_t> token_to_id(std::string_view token) const;
  // Throws for an id that names no token.
  std::string id_to_token(int32_t id) const;
  // From tokenizer_config.json's bos_token / eos_token; nullopt when there is
  // no config, no such entry, or the token is not in the vocabulary.
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  // The tokenizer.json this was read from.
  const std::string& path() const;

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  // Shared by copies: the tokenizer is immutable apart from its thread-safe
  // word cache, so copies are cheap and may encode from many threads.
  std::shared_ptr<const Impl> impl_;
};

}  // namespace unswag::data
