// Building blocks of unswag::data::Tokenizer (include/unswag/data/tokenizer.h):
// UTF-8 helpers, the GPT-2 byte-level alphabet, Unicode normalisation
// (utf8proc), regexes with Oniguruma's semantics on top of PCRE2, and the BPE
// model. Private to src/data/tokenizer*.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace unswag::data::tok {

// --- UTF-8 -------------------------------------------------------------------

// Offset of the first byte that does not start or continue a well-formed
// UTF-8 sequence (overlong forms, surrogates and values above U+10FFFF are
// ill-formed), or nullopt when `s` is valid.
std::optional<size_t> invalid_utf8_offset(std::string_view s);
// Decodes the code point at `pos` of valid UTF-8 and advances `pos`.
char32_t next_code_point(std::string_view s, size_t& pos);
// The code point that ends at `end` (exclusive) of valid UTF-8, and its start.
char32_t previous_code_point(std::string_view s, size_t end, size_t& start);
void append_utf8(std::string& out, char32_t cp);
// Rust's String::from_utf8_lossy: each maximal ill-formed subpart becomes
// U+FFFD (the Unicode "substitution of maximal subparts" practice).
std::string utf8_lossy(std::string_view bytes);
// Rust's char::is_whitespace: the Unicode White_Space property.
bool is_white_space(char32_t cp);
// Rust regex's \w: letters, marks, numbers, connector punctuation, ZWJ/ZWNJ.
bool is_word_char(char32_t cp);

// --- byte-level alphabet (GPT-2) ---------------------------------------------

// GPT-2 maps each byte to a printable code point: the 188 bytes that are
// printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') to themselves, and the 68
// others, in byte order, to U+0100, U+0101, ... so that BPE never sees control
// characters or spaces.
struct ByteLevelAlphabet {
  std::string utf8_of_byte[256];  // the UTF-8 of each byte's code point
  int16_t byte_of_cp[324];        // inverse, -1 where a code point is not used
};
const ByteLevelAlphabet& byte_level_alphabet();
// Appends the byte-level form of every byte of `bytes`.
void append_byte_level(std::string& out, std::string_view bytes);

// --- normalisation -----------------------------------------------------------

enum class NormalForm { kNFC, kNFD, kNFKC, kNFKD };
std::string normalize(std::string_view text, NormalForm form);

// --- regex -------------------------------------------------------------------

// A pattern of tokenizers' Split / ByteLevel pre-tokenizers (tokenizers uses
// Oniguruma), compiled with PCRE2 in UTF + UCP mode with JIT. The pattern is
// first rewritten where the two engines differ on the classes these files use:
// \s (Oniguruma: White_Space; PCRE2 also takes U+180E), \h (Oniguruma: a hex
// digit; PCRE2: horizontal space) and \w (Oniguruma takes marks too), and ^ $
// are line anchors as in Oniguruma's Ruby syntax. Thread-safe.
class Regex {
 public:
  // `literal`: the pattern is a plain string (tokenizers' {"String": ...}).
  Regex(const std::string& pattern, bool literal);
  // The (start, end) byte ranges of successive non-overlapping matches in
  // valid UTF-8 `text`, as Oniguruma's find_iter gives them: an empty match
  // right after the previous match is skipped by one character.
  void find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& matches) const;
  const std::string& pattern() const { return pattern_; }

 private:
  struct Code;
  std::string pattern_;
  std::shared_ptr<const Code> code_;
};

// PCRE2 spelling of an Oniguruma pattern (see Regex); exposed for tests.
std::string translate_oniguruma_pattern(const std::string& pattern);

// --- BPE model ---------------------------------------------------------------

struct BpeOptions {
  bool ignore_merges = false;          // a word that is a token is kept whole
  std::optional<std::string> unk_token;  // characters outside the vocabulary
  bool fuse_unk = false;               // consecutive unknowns become one
};

class BpeModel {
 public:
  // `merges` in rank order. Every merge's parts and result must be in `vocab`
  // (an error names the first that is not); a pair listed twice keeps the
  // later rank, as tokenizers does.
  BpeModel(std::unordered_map<std::string, int32_t> vocab,
           const std::vector<std::pair<std::string, std::string>>& merges, BpeOptions options);

  // Appends the ids of one pre-tokenized word (in the model's alphabet).
  void tokenize(std::string_view word, std::vector<int32_t>& ids) const;

  std::optional<int32_t> token_to_id(std::string_view token) const;
  // nullptr when no token has this id.
  const std::string* id_to_token(int32_t id) const;
  const std::unordered_map<std::string, int32_t>& vocab() const { return vocab_; }
  size_t merge_count() const { return merges_.size(); }

 private:
  struct Merge {
    int32_t rank, merged_id;
  };
  void merge_word(std::string_view word, std::vector<int32_t>& ids) const;
  static uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<int32_t, std::string> token_of_id_;
  std::unordered_map<uint64_t, Merge> merges_;
  int32_t id_of_byte_char_[324];  // ids of the single code points < 324 (byte-level alphabet), -1 if none
  BpeOptions options_;
  std::optional<int32_t> unk_id_;

  // Words seen before, with their ids; filled up to kCacheCapacity entries
  // (then left as is), as tokenizers' cache. Shared by all threads.
  static constexpr size_t kCacheCapacity = 1 << 16;
  static constexpr size_t kCacheMaxWordBytes = 256;
  mutable std::shared_mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

}  // namespace unswag::data::tok
