// unswag::data::Tokenizer: reads tokenizer.json (and tokenizer_config.json)
// into the pipeline of include/unswag/data/tokenizer.h and runs it. Each step
// follows what the `tokenizers` library (Rust) does, including its corner
// cases, so that the ids agree exactly; the comments name those cases.
#include "unswag/data/tokenizer.h"

#include <c10/util/Exception.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <tuple>
#include <unordered_set>

#include "data/tokenizer_internal.h"

namespace unswag::data {

using tok::NormalForm;
using json = nlohmann::json;

namespace {

// --- JSON helpers: every error names the file and the field ----------------

struct Where {
  const std::string& file;
  std::string field;
  Where at(const std::string& key) const { return Where{file, field.empty() ? key : field + "." + key}; }
  Where at(size_t index) const { return Where{file, field + "[" + std::to_string(index) + "]"}; }
};

[[noreturn]] void fail(const Where& w, const std::string& what) {
  TORCH_CHECK(false, "tokenizer: ", w.file, ": ", w.field, ": ", what);
}

const json* member(const json& object, const char* key) {
  const auto it = object.find(key);
  return it == object.end() || it->is_null() ? nullptr : &*it;
}

bool get_bool(const json& object, const char* key, bool fallback, const Where& w) {
  const json* v = member(object, key);
  if (v == nullptr) return fallback;
  if (!v->is_boolean()) fail(w.at(key), std::string("expected true or false, got ") + v->type_name());
  return v->get<bool>();
}

std::string get_string(const json& object, const char* key, const Where& w) {
  const json* v = member(object, key);
  if (v == nullptr) fail(w.at(key), "missing (expected a string)");
  if (!v->is_string()) fail(w.at(key), std::string("expected a string, got ") + v->type_name());
  return v->get<std::string>();
}

std::optional<std::string> get_optional_string(const json& object, const char* key, const Where& w) {
  if (member(object, key) == nullptr) return std::nullopt;
  return get_string(object, key, w);
}

const json& get_array(const json& object, const char* key, const Where& w) {
  const json* v = member(object, key);
  if (v == nullptr || !v->is_array())
    fail(w.at(key), std::string("expected an array, got ") + (v == nullptr ? "nothing" : v->type_name()));
  return *v;
}

std::string type_of(const json& component, const Where& w) {
  if (!component.is_object()) fail(w, std::string("expected an object, got ") + component.type_name());
  return get_string(component, "type", w);
}

[[noreturn]] void unsupported(const Where& w, const std::string& type, const char* supported) {
  fail(w, "type \"" + type + "\" is not supported by unswag::data::Tokenizer (supported: " + supported +
              "); refusing to load rather than tokenize differently from the `tokenizers` library");
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in.good(), "tokenizer: cannot open ", path, ": ", std::strerror(errno));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  TORCH_CHECK(!in.bad(), "tokenizer: error reading ", path);
  return buffer.str();
}

json parse_json(const std::string& path) {
  try {
    return json::parse(read_file(path));
  } catch (const json::exception& e) {
    TORCH_CHECK(false, "tokenizer: ", path, " is not valid JSON (", e.what(), ")");
  }
}

bool is_directory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// --- added tokens ------------------------------------------------------------

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool single_word = false, lstrip = false, rstrip = false, normalized = true, special = false;
};

// The added tokens to look for in one pass, in a byte trie: matches are
// non-overlapping and leftmost-longest, as tokenizers' Aho-Corasick automaton
// (MatchKind::LeftmostLongest) finds them.
class AddedTokenMatcher {
 public:
  AddedTokenMatcher() : terminal_(1, -1) {}
  void add(const std::string& content, int32_t token_index) {
    int32_t node = 0;
    for (char c : content) {
      const uint64_t key = (uint64_t(node) << 8) | static_cast<unsigned char>(c);
      auto it = edges_.find(key);
      if (it == edges_.end()) {
        it = edges_.emplace(key, int32_t(terminal_.size())).first;
        terminal_.push_back(-1);
      }
      node = it->second;
    }
    terminal_[size_t(node)] = token_index;
    first_byte_[static_cast<unsigned char>(content[0])] = true;
  }
  bool empty() const { return edges_.empty(); }

  // (start, end, token index) of each match.
  void find(std::string_view text, std::vector<std::tuple<size_t, size_t, int32_t>>& matches) const {
    for (size_t pos = 0; pos < text.size();) {
      if (!first_byte_[static_cast<unsigned char>(text[pos])]) {
        ++pos;
        continue;
      }
      int32_t node = 0, best = -1;
      size_t best_end = pos;
      for (size_t k = pos; k < text.size(); ++k) {
        const auto it = edges_.find((uint64_t(node) << 8) | static_cast<unsigned char>(text[k]));
        if (it == edges_.end()) break;
        node = it->second;
        if (terminal_[size_t(node)] >= 0) best = terminal_[size_t(node)], best_end = k + 1;
      }
      if (best >= 0) {
        matches.emplace_back(pos, best_end, best);
        pos = best_end;
      } else {
        ++pos;
      }
    }
  }

 private:
  std::vector<int32_t> terminal_;                // per node: the token ending there, or -1
  std::unordered_map<uint64_t, int32_t> edges_;  // (node << 8 | byte) -> child node
  bool first_byte_[256] = {};
};

// --- pre-tokenizer and post-processor steps ----------------------------------

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizerStep {
  enum class Kind { kSplit, kByteLevel } kind = Kind::kSplit;
  std::shared_ptr<const tok::Regex> regex;  // Split's pattern, or ByteLevel's GPT-2 regex when use_regex
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;
};

// GPT-2's pre-tokenizer regex, which ByteLevel uses when use_regex is true.
constexpr const char* kGpt2Regex = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

// One item of TemplateProcessing's "single" template: the sequence ($A), or
// the ids of a special token.
struct TemplateItem {
  bool is_sequence = false;
  std::vector<int32_t> ids;
};

}  // namespace

struct Tokenizer::Impl {
  std::string path;
  std::unique_ptr<tok::BpeModel> model;
  std::vector<AddedToken> added;  // file order, with the ids tokenizers gives them
  std::unordered_map<std::string, int32_t> added_id_of_content;
  std::unordered_map<int32_t, std::string> added_content_of_id;
  std::unordered_set<std::string> special_contents;
  AddedTokenMatcher raw_matcher, normalized_matcher;  // normalized=false / normalized=true tokens
  std::vector<NormalForm> normalizers;                // applied in order
  std::vector<PreTokenizerStep> pre_tokenizer;        // applied in order
  std::vector<std::vector<TemplateItem>> templates;   // each TemplateProcessing, in order
  bool byte_level_decoder = false;                    // else tokens are joined with spaces
  int64_t vocab_size = 0;
  std::optional<std::string> bos_token, eos_token;

  std::string normalize(std::string_view text) const {
    std::string out(text);
    for (NormalForm form : normalizers) out = tok::normalize(out, form);
    return out;
  }

  // Cuts `text` at the added tokens of `matcher`, calling emit(piece, token
  // index or -1) for each piece, with tokenizers' single_word/lstrip/rstrip
  // rules applied to each match.
  template <typename Emit>
  void split_added(std::string_view text, const AddedTokenMatcher& matcher, const Emit& emit) const;
  // Runs the pre-tokenizer steps from `step` on `piece`, calling emit(word).
  template <typename Emit>
  void pre_tokenize(size_t step, std::string_view piece, const Emit& emit) const;
  const std::string* token_of_id(int32_t id) const {
    const auto it = added_content_of_id.find(id);
    return it != added_content_of_id.end() ? &it->second : model->id_to_token(id);
  }
};

namespace {

bool ends_with_word(std::string_view s) {
  if (s.empty()) return false;
  size_t start;
  return tok::is_word_char(tok::previous_code_point(s, s.size(), start));
}

bool starts_with_word(std::string_view s) {
  if (s.empty()) return false;
  size_t pos = 0;
  return tok::is_word_char(tok::next_code_point(s, pos));
}

// Start of the whitespace run that ends `s` (s.size() when there is none).
size_t trailing_space_start(std::string_view s) {
  size_t end = s.size();
  while (end > 0) {
    size_t start;
    if (!tok::is_white_space(tok::previous_code_point(s, end, start))) break;
    end = start;
  }
  return end;
}

// Length of the whitespace run that starts `s`.
size_t leading_space_length(std::string_view s) {
  size_t pos = 0;
  while (pos < s.size()) {
    size_t next = pos;
    if (!tok::is_white_space(tok::next_code_point(s, next))) break;
    pos = next;
  }
  return pos;
}

struct SplitPart {
  size_t start, end;
  bool is_match;
};

// Walks `parts` and appends each to `kept`, or, where join(its is_match, the
// previous part's is_match) holds, widens the last kept part over it (its
// start when walking backwards): tokenizers' folds for the merging behaviours.
template <typename Iterator, typename Join>
void join_parts(Iterator first, Iterator last, const Join& join, bool backwards, std::vector<SplitPart>& kept) {
  bool previous_match = false;
  for (; first != last; ++first) {
    if (!kept.empty() && join(first->is_match, previous_match)) {
      if (backwards)
        kept.back().start = first->start;
      else
        kept.back().end = first->end;
    } else {
      kept.push_back({first->start, first->end, false});
    }
    previous_match = first->is_match;
  }
}

// The pieces Split keeps of `piece`: tokenizers first covers the piece with
// matches and the gaps between them, flips them when `invert`, then merges or
// drops them according to the behaviour; empty pieces are dropped.
void split_ranges(const PreTokenizerStep& step, std::string_view piece, std::vector<std::pair<size_t, size_t>>& out) {
  std::vector<std::pair<size_t, size_t>> found;
  step.regex->find_all(piece, found);
  std::vector<SplitPart> parts;
  parts.reserve(2 * found.size() + 1);
  size_t previous = 0;
  for (const auto& [start, end] : found) {
    if (previous != start) parts.push_back({previous, start, false});
    parts.push_back({start, end, true});
    previous = end;
  }
  if (previous != piece.size()) parts.push_back({previous, piece.size(), false});
  if (step.invert)
    for (SplitPart& p : parts) p.is_match = !p.is_match;

  std::vector<SplitPart> kept;  // is_match now means "remove"
  const auto match_after_gap = [](bool is_match, bool previous_match) { return is_match && !previous_match; };
  switch (step.behavior) {
    case SplitBehavior::kIsolated:
      for (const SplitPart& p : parts) kept.push_back({p.start, p.end, false});
      break;
    case SplitBehavior::kRemoved:
      kept = parts;
      break;
    case SplitBehavior::kContiguous:
      join_parts(parts.begin(), parts.end(), [](bool is_match, bool previous_match) { return is_match == previous_match; },
                 false, kept);
      break;
    case SplitBehavior::kMergedWithPrevious:
      join_parts(parts.begin(), parts.end(), match_after_gap, false, kept);
      break;
    case SplitBehavior::kMergedWithNext:
      // The same walk from the right, joining each match to the part after it.
      join_parts(parts.rbegin(), parts.rend(), match_after_gap, true, kept);
      std::reverse(kept.begin(), kept.end());
      break;
  }
  for (const SplitPart& p : kept)
    if (!p.is_match && p.end > p.start) out.emplace_back(p.start, p.end);
}

}  // namespace

template <typename Emit>
void Tokenizer::Impl::split_added(std::string_view text, const AddedTokenMatcher& matcher, const Emit& emit) const {
  if (text.empty()) return;
  if (matcher.empty()) {
    emit(text, -1);
    return;
  }
  std::vector<std::tuple<size_t, size_t, int32_t>> matches;
  matcher.find(text, matches);
  size_t done = 0;  // end of the text handed out so far
  for (auto [start, stop, index] : matches) {
    const AddedToken& token = added[size_t(index)];
    if (token.single_word) {
      // Only where the token is not glued to word characters on either side.
      const bool space_before = start == 0 || !ends_with_word(text.substr(0, start));
      const bool space_after = stop == text.size() || !starts_with_word(text.substr(stop));
      if (!space_before || !space_after) continue;
    }
    if (token.lstrip) start = std::max(trailing_space_start(text.substr(0, start)), done);
    if (token.rstrip) stop += leading_space_length(text.substr(stop));
    // (tokenizers lets an rstrip token swallow the start of a later match;
    // that later match then overlaps it, and so it does here.)
    if (done < start) emit(text.substr(done, start - done), -1);
    emit(text.substr(start, stop > start ? stop - start : 0), index);
    done = stop;
  }
  if (done < text.size()) emit(text.substr(done), -1);
}

template <typename Emit>
void Tokenizer::Impl::pre_tokenize(size_t step, std::string_view piece, const Emit& emit) const {
  if (piece.empty()) return;
  if (step == pre_tokenizer.size()) {
    emit(piece);
    return;
  }
  const PreTokenizerStep& s = pre_tokenizer[step];
  std::vector<std::pair<size_t, size_t>> ranges;
  if (s.kind == PreTokenizerStep::Kind::kSplit) {
    split_ranges(s, piece, ranges);
    for (const auto& [start, end] : ranges) pre_tokenize(step + 1, piece.substr(start, end - start), emit);
    return;
  }
  // ByteLevel: an optional leading space (on every piece that does not start
  // with one, after every added token too), the GPT-2 split when use_regex,
  // then each byte becomes its byte-level character.
  std::string prefixed;
  if (s.add_prefix_space && piece.front() != ' ') {
    prefixed.reserve(piece.size() + 1);
    prefixed += ' ';
    prefixed += piece;
    piece = prefixed;
  }
  std::string mapped;
  if (!s.regex) {
    tok::append_byte_level(mapped, piece);
    pre_tokenize(step + 1, mapped, emit);
    return;
  }
  split_ranges(s, piece, ranges);
  for (const auto& [start, end] : ranges) {
    mapped.clear();
    tok::append_byte_level(mapped, piece.substr(start, end - start));
    pre_tokenize(step + 1, mapped, emit);
  }
}

namespace {

// --- reading the components --------------------------------------------------

// A "Sequence" component: `read` each element of its list `list_key`.
template <typename Read>
void read_each(const json& sequence, const char* list_key, const Where& w, const Read& read) {
  const json& list = get_array(sequence, list_key, w);
  for (size_t i = 0; i < list.size(); ++i) read(list[i], w.at(list_key).at(i));
}

void read_normalizer(const json& n, const Where& w, std::vector<NormalForm>& out) {
  if (n.is_null()) return;
  static const std::pair<const char*, NormalForm> forms[] = {
      {"NFC", NormalForm::kNFC}, {"NFD", NormalForm::kNFD}, {"NFKC", NormalForm::kNFKC}, {"NFKD", NormalForm::kNFKD}};
  const std::string type = type_of(n, w);
  if (type == "Sequence")
    return read_each(n, "normalizers", w, [&](const json& e, const Where& we) { read_normalizer(e, we, out); });
  for (const auto& [name, form] : forms)
    if (type == name) return out.push_back(form);
  unsupported(w, type, "null, NFC, NFD, NFKC, NFKD, Sequence");
}

SplitBehavior read_behavior(const std::string& name, const Where& w) {
  if (name == "Removed") return SplitBehavior::kRemoved;
  if (name == "Isolated") return SplitBehavior::kIsolated;
  if (name == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (name == "Contiguous") return SplitBehavior::kContiguous;
  fail(w, "\"" + name + "\" is not a split behavior (Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous)");
}

void read_pre_tokenizer(const json& p, const Where& w, std::vector<PreTokenizerStep>& out) {
  if (p.is_null()) return;
  const std::string type = type_of(p, w);
  if (type == "Sequence") {
    read_each(p, "pretokenizers", w, [&](const json& e, const Where& we) { read_pre_tokenizer(e, we, out); });
  } else if (type == "ByteLevel") {
    PreTokenizerStep step;
    step.kind = PreTokenizerStep::Kind::kByteLevel;
    step.add_prefix_space = get_bool(p, "add_prefix_space", true, w);
    if (get_bool(p, "use_regex", true, w)) step.regex = std::make_shared<tok::Regex>(kGpt2Regex, false);
    out.push_back(std::move(step));
  } else if (type == "Split") {
    PreTokenizerStep step;
    const json* pattern = member(p, "pattern");
    if (pattern == nullptr || !pattern->is_object() || pattern->size() != 1)
      fail(w.at("pattern"), "expected {\"Regex\": ...} or {\"String\": ...}");
    const bool literal = pattern->contains("String");
    if (!literal && !pattern->contains("Regex"))
      fail(w.at("pattern"), "expected {\"Regex\": ...} or {\"String\": ...}, got key \"" + pattern->begin().key() + "\"");
    const std::string text = get_string(*pattern, literal ? "String" : "Regex", w.at("pattern"));
    if (text.empty()) fail(w.at("pattern"), "empty pattern");
    step.regex = std::make_shared<tok::Regex>(text, literal);
    step.behavior = read_behavior(get_string(p, "behavior", w), w.at("behavior"));
    step.invert = get_bool(p, "invert", false, w);
    out.push_back(std::move(step));
  } else {
    unsupported(w, type, "null, ByteLevel, Split, Sequence");
  }
}

void read_post_processor(const json& p, const Where& w, std::vector<std::vector<TemplateItem>>& out) {
  if (p.is_null()) return;
  const std::string type = type_of(p, w);
  if (type == "Sequence") {
    read_each(p, "processors", w, [&](const json& e, const Where& we) { read_post_processor(e, we, out); });
  } else if (type == "ByteLevel") {
    // Only trims offsets: the ids are untouched.
  } else if (type == "TemplateProcessing") {
    const json* specials = member(p, "special_tokens");
    const json& single = get_array(p, "single", w);
    std::vector<TemplateItem> items;
    for (size_t i = 0; i < single.size(); ++i) {
      const Where wi = w.at("single").at(i);
      if (!single[i].is_object() || single[i].size() != 1) fail(wi, "expected {\"SpecialToken\": ...} or {\"Sequence\": ...}");
      const std::string kind = single[i].begin().key();
      const json& body = single[i].begin().value();
      if (kind == "Sequence") {
        const std::string id = get_string(body, "id", wi.at(kind));
        if (id != "A") fail(wi.at(kind), "the single-sequence template can only hold $A, got $" + id);
        items.push_back(TemplateItem{true, {}});
      } else if (kind == "SpecialToken") {
        const std::string id = get_string(body, "id", wi.at(kind));
        if (specials == nullptr || !specials->contains(id))
          fail(w.at("special_tokens"), "no entry for \"" + id + "\", which the template uses");
        const Where ws = w.at("special_tokens").at(id);
        TemplateItem item;
        for (const json& v : get_array(specials->at(id), "ids", ws)) {
          if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX)
            fail(ws.at("ids"), "expected non-negative 32-bit integers, got " + v.dump());
          item.ids.push_back(v.get<int32_t>());
        }
        items.push_back(std::move(item));
      } else {
        fail(wi, "expected SpecialToken or Sequence, got \"" + kind + "\"");
      }
    }
    out.push_back(std::move(items));
  } else {
    unsupported(w, type, "null, TemplateProcessing, ByteLevel, Sequence");
  }
}

bool read_decoder(const json& d, const Where& w) {
  if (d.is_null()) return false;
  const std::string type = type_of(d, w);
  if (type != "ByteLevel") unsupported(w, type, "null, ByteLevel");
  return true;
}

std::unique_ptr<tok::BpeModel> read_model(const json& m, const Where& w) {
  const std::string type = type_of(m, w);
  if (type != "BPE") unsupported(w.at("type"), type, "BPE");
  if (const json* dropout = member(m, "dropout"))
    if (!dropout->is_number() || dropout->get<double>() != 0.0)
      fail(w.at("dropout"), "BPE dropout " + dropout->dump() + " is not supported (it makes encoding random)");
  if (get_bool(m, "byte_fallback", false, w)) fail(w.at("byte_fallback"), "byte_fallback=true is not supported");
  for (const char* affix : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const auto value = get_optional_string(m, affix, w);
    if (value && !value->empty()) fail(w.at(affix), "\"" + *value + "\" is not supported (only null or \"\")");
  }

  const json* vocab_json = member(m, "vocab");
  if (vocab_json == nullptr || !vocab_json->is_object())
    fail(w.at("vocab"), std::string("expected an object {token: id}, got ") +
                            (vocab_json == nullptr ? "nothing" : vocab_json->type_name()));
  std::unordered_map<std::string, int32_t> vocab;
  std::unordered_map<int32_t, std::string> seen_ids;
  vocab.reserve(vocab_json->size());
  for (auto it = vocab_json->begin(); it != vocab_json->end(); ++it) {
    const json& v = it.value();
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX)
      fail(w.at("vocab").at(it.key()), "expected a non-negative 32-bit integer id, got " + v.dump());
    const int32_t id = v.get<int32_t>();
    const auto [previous, fresh] = seen_ids.emplace(id, it.key());
    if (!fresh) fail(w.at("vocab"), "id " + std::to_string(id) + " is given to both \"" + previous->second +
                                        "\" and \"" + it.key() + "\"");
    vocab.emplace(it.key(), id);
  }

  // Merges as "a b" strings (tokenizers < 0.20, GPT-2's file) or as [a, b]
  // pairs (newer files); a file holds one form or the other.
  std::vector<std::pair<std::string, std::string>> merges;
  const json& list = get_array(m, "merges", w);
  merges.reserve(list.size());
  const bool strings = !list.empty() && list[0].is_string();
  for (size_t i = 0; i < list.size(); ++i) {
    const json& e = list[i];
    if (strings) {
      if (!e.is_string()) fail(w.at("merges").at(i), "expected a \"a b\" string like the merges before it, got " + e.dump());
      const std::string s = e.get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos) fail(w.at("merges").at(i), "\"" + s + "\" is not two tokens separated by a space");
      merges.emplace_back(s.substr(0, space), s.substr(space + 1));
    } else {
      if (!e.is_array() || e.size() != 2 || !e[0].is_string() || !e[1].is_string())
        fail(w.at("merges").at(i), "expected a pair [\"a\", \"b\"] like the merges before it, got " + e.dump());
      merges.emplace_back(e[0].get<std::string>(), e[1].get<std::string>());
    }
  }
  tok::BpeOptions options;
  options.ignore_merges = get_bool(m, "ignore_merges", false, w);
  options.unk_token = get_optional_string(m, "unk_token", w);
  options.fuse_unk = get_bool(m, "fuse_unk", false, w);
  try {
    return std::make_unique<tok::BpeModel>(std::move(vocab), merges, std::move(options));
  } catch (const c10::Error& e) {
    fail(w, e.msg());
  }
}

// BOS/EOS from tokenizer_config.json: a string or an AddedToken object.
std::optional<std::string> config_token(const json& config, const char* key, const Where& w) {
  const json* v = member(config, key);
  if (v == nullptr) return std::nullopt;
  if (v->is_string()) return v->get<std::string>();
  if (v->is_object()) return get_string(*v, "content", w.at(key));
  fail(w.at(key), std::string("expected a string or {\"content\": ...}, got ") + v->type_name());
}

}  // namespace

// --- Tokenizer ---------------------------------------------------------------

Tokenizer Tokenizer::from_file(const std::string& path) {
  TORCH_CHECK(exists(path), "tokenizer: ", path, " does not exist (expected a tokenizer.json or a directory holding one)");
  const std::string file = is_directory(path) ? path + "/tokenizer.json" : path;
  TORCH_CHECK(exists(file), "tokenizer: ", path, " is a directory without tokenizer.json");
  const json root = parse_json(file);
  const Where top{file, ""};
  if (!root.is_object()) fail(Where{file, "(top level)"}, std::string("expected an object, got ") + root.type_name());
  for (const char* key : {"truncation", "padding"})
    if (member(root, key) != nullptr)
      fail(top.at(key), "must be null: truncation and padding change the ids and are not supported");

  auto impl = std::make_shared<Impl>();
  impl->path = file;
  const json* model = member(root, "model");
  if (model == nullptr) fail(top.at("model"), "missing");
  impl->model = read_model(*model, top.at("model"));
  read_normalizer(root.value("normalizer", json()), top.at("normalizer"), impl->normalizers);
  read_pre_tokenizer(root.value("pre_tokenizer", json()), top.at("pre_tokenizer"), impl->pre_tokenizer);
  read_post_processor(root.value("post_processor", json()), top.at("post_processor"), impl->templates);
  impl->byte_level_decoder = read_decoder(root.value("decoder", json()), top.at("decoder"));

  // Added tokens. tokenizers does not take the ids in the file: it re-adds the
  // tokens in order, giving a token of the model vocabulary its model id and a
  // new one the next id after the model and the tokens before it. The file's
  // ids must agree, or this file means something else to tokenizers than it
  // says, and loading it would silently change ids.
  const auto& vocab = impl->model->vocab();
  const int64_t model_size = int64_t(vocab.size());
  std::optional<int64_t> max_added;
  if (const json* list = member(root, "added_tokens")) {
    if (!list->is_array()) fail(top.at("added_tokens"), std::string("expected an array, got ") + list->type_name());
    for (size_t i = 0; i < list->size(); ++i) {
      const Where wi = top.at("added_tokens").at(i);
      const json& e = (*list)[i];
      if (!e.is_object()) fail(wi, std::string("expected an object, got ") + e.type_name());
      AddedToken t;
      t.content = get_string(e, "content", wi);
      t.special = get_bool(e, "special", false, wi);
      t.single_word = get_bool(e, "single_word", false, wi);
      t.lstrip = get_bool(e, "lstrip", false, wi);
      t.rstrip = get_bool(e, "rstrip", false, wi);
      t.normalized = get_bool(e, "normalized", !t.special, wi);
      const json* file_id = member(e, "id");
      if (file_id == nullptr || !file_id->is_number_integer()) fail(wi.at("id"), "expected an integer id");
      if (t.content.empty()) continue;  // tokenizers ignores empty added tokens
      int64_t id;
      if (const auto it = impl->added_id_of_content.find(t.content); it != impl->added_id_of_content.end()) {
        id = it->second;
      } else if (const auto jt = vocab.find(t.content); jt != vocab.end()) {
        id = jt->second;
      } else {
        id = !max_added ? model_size : (*max_added >= model_size || model_size == 0 ? *max_added + 1 : model_size);
      }
      if (file_id->get<int64_t>() != id)
        fail(wi.at("id"), "\"" + t.content + "\" has id " + file_id->dump() + " in the file, but the tokenizers " +
                              "library would give it id " + std::to_string(id) + " (ids must follow the model " +
                              "vocabulary in order); refusing to guess which one is meant");
      TORCH_CHECK(id <= INT32_MAX, "tokenizer: ", file, ": added token id ", id, " does not fit in 32 bits");
      t.id = int32_t(id);
      max_added = std::max(max_added.value_or(id), id);
      impl->added_id_of_content[t.content] = t.id;
      // tokenizers keeps a normalized token's *normalised* content for id ->
      // token (so decode shows that), but its original content for token -> id
      // and for the special-token set.
      impl->added_content_of_id[t.id] = t.normalized ? impl->normalize(t.content) : t.content;
      if (t.special) impl->special_contents.insert(t.content);
      impl->added.push_back(std::move(t));
    }
  }
  for (size_t i = 0; i < impl->added.size(); ++i) {
    const AddedToken& t = impl->added[i];
    // A normalized token is looked for, normalised, in normalised text.
    if (t.normalized)
      impl->normalized_matcher.add(impl->normalize(t.content), int32_t(i));
    else
      impl->raw_matcher.add(t.content, int32_t(i));
  }
  impl->vocab_size = model_size;
  for (const auto& [content, id] : impl->added_id_of_content)
    if (vocab.count(content) == 0) ++impl->vocab_size;

  const std::string config_path = file.substr(0, file.rfind('/') + 1) + "tokenizer_config.json";
  if (exists(config_path)) {
    const json config = parse_json(config_path);
    const Where wc{config_path, ""};
    if (!config.is_object()) fail(Where{config_path, "(top level)"}, "expected an object");
    impl->bos_token = config_token(config, "bos_token", wc);
    impl->eos_token = config_token(config, "eos_token", wc);
  }
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  if (const auto bad = tok::invalid_utf8_offset(text)) {
    static const char* digits = "0123456789abcdef";
    const auto byte = static_cast<unsigned char>(text[*bad]);
    TORCH_CHECK(false, "tokenizer: encode: text is not valid UTF-8: the sequence at byte offset ", *bad, " (byte 0x",
                digits[byte >> 4], digits[byte & 15], ") of ", text.size(), " is ill-formed");
  }
  const Impl& im = *impl_;
  std::vector<int32_t> ids;
  auto emit_word = [&](std::string_view word) { im.model->tokenize(word, ids); };
  // Pass 2: in each normalised piece, the added tokens matched after normalisation.
  auto emit_normalized = [&](std::string_view piece, int32_t added) {
    if (added >= 0)
      ids.push_back(im.added[size_t(added)].id);
    else
      im.pre_tokenize(0, piece, emit_word);
  };
  // Pass 1: the added tokens matched on the raw text; the rest is normalised.
  im.split_added(text, im.raw_matcher, [&](std::string_view piece, int32_t added) {
    if (added >= 0) {
      ids.push_back(im.added[size_t(added)].id);
    } else if (im.normalizers.empty()) {
      im.split_added(piece, im.normalized_matcher, emit_normalized);
    } else {
      im.split_added(im.normalize(piece), im.normalized_matcher, emit_normalized);
    }
  });
  if (!add_special_tokens) return ids;
  for (const auto& items : im.templates) {
    std::vector<int32_t> with_specials;
    for (const TemplateItem& item : items) {
      const auto& part = item.is_sequence ? ids : item.ids;
      with_specials.insert(with_specials.end(), part.begin(), part.end());
    }
    ids = std::move(with_specials);
  }
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  const Impl& im = *impl_;
  std::string bytes;
  bool first = true;
  const auto& alphabet = tok::byte_level_alphabet();
  for (size_t i = 0; i < ids.size(); ++i) {
    const std::string* token = im.token_of_id(ids[i]);
    TORCH_CHECK(token != nullptr, "tokenizer: decode: ids[", i, "] = ", ids[i], " is not a token id of ", im.path,
                " (", im.vocab_size, " tokens)");
    if (skip_special_tokens && im.special_contents.count(*token) != 0) continue;
    if (!im.byte_level_decoder) {
      // tokenizers joins the tokens with spaces when there is no decoder.
      if (!first) bytes += ' ';
      bytes += *token;
      first = false;
      continue;
    }
    // ByteLevel decoder: a token whose characters are all byte-level ones
    // becomes those bytes; any other token (an added token such as
    // "<|endoftext|>" is usually all byte-level characters, one with a space
    // is not) is kept as its own UTF-8.
    const size_t mark = bytes.size();
    bool all_mapped = true;
    for (size_t pos = 0; pos < token->size();) {
      const char32_t cp = tok::next_code_point(*token, pos);
      if (cp >= 324 || alphabet.byte_of_cp[cp] < 0) {
        all_mapped = false;
        break;
      }
      bytes += char(alphabet.byte_of_cp[cp]);
    }
    if (!all_mapped) {
      bytes.resize(mark);
      bytes += *token;
    }
  }
  return im.byte_level_decoder ? tok::utf8_lossy(bytes) : bytes;
}

int64_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  const auto it = impl_->added_id_of_content.find(std::string(token));
  if (it != impl_->added_id_of_content.end()) return it->second;
  return impl_->model->token_to_id(token);
}

std::string Tokenizer::id_to_token(int32_t id) const {
  const std::string* token = impl_->token_of_id(id);
  TORCH_CHECK(token != nullptr, "tokenizer: id_to_token: ", id, " is not a token id of ", impl_->path);
  return *token;
}

std::optional<int32_t> Tokenizer::bos_id() const {
  return impl_->bos_token ? token_to_id(*impl_->bos_token) : std::nullopt;
}

std::optional<int32_t> Tokenizer::eos_id() const {
  return impl_->eos_token ? token_to_id(*impl_->eos_token) : std::nullopt;
}

const std::string& Tokenizer::path() const { return impl_->path; }

}  // namespace unswag::data
