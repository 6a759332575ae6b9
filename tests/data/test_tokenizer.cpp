// Tests of unswag::data::Tokenizer against the Hugging Face `tokenizers`
// library (run at test time through UNSWAG_PYTHON by tokenizer_reference.py):
// for the GPT-2, Llama 3 and Qwen2 style fixtures (make_tokenizer_fixtures.py)
// and for variants of them made here (other split behaviours and regexes,
// added-token flags, merge forms, normalisers, post-processors, decoders),
// the ids of whole license files and source files and of fresh random strings
// that mix scripts, and the text of decoded random ids, must be identical.
// Also: round trips, the vocabulary, BOS/EOS, threads, and every error.
#include "unswag/data/tokenizer.h"

#include <ftw.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <thread>

#include "data/tokenizer_internal.h"  // (append_utf8, for random text)
#include "test_util.h"

namespace unswag {
namespace {

using data::Tokenizer;
using json = nlohmann::json;

// --- environment --------------------------------------------------------------

using test::source_dir;

std::string python() { return unswag::test::python_executable(); }

#define REQUIRE_REFERENCE() UNSWAG_REQUIRE_PYTHON("tokenizers")

std::string fixture(const std::string& style) { return source_dir() + "/tests/fixtures/tokenizers/" + style; }

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

json read_json(const std::string& path) { return json::parse(read_text(path)); }

class TempDir {
 public:
  TempDir() {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/unswag_tokenizer_XXXXXX";
    if (::mkdtemp(pattern.data()) != nullptr) path_ = pattern;
  }
  ~TempDir() {
    if (path_.empty()) return;
    ::nftw(path_.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
           FTW_DEPTH | FTW_PHYS);
  }
  const std::string& path() const { return path_; }
  // Writes `tokenizer` (and `config` when given) into a fresh subdirectory.
  std::string write_tokenizer(const std::string& name, const json& tokenizer, const json& config = nullptr) const {
    const std::string dir = path_ + "/" + name;
    ::mkdir(dir.c_str(), 0755);
    write_text(dir + "/tokenizer.json", tokenizer.dump(1));
    if (!config.is_null()) write_text(dir + "/tokenizer_config.json", config.dump(1));
    return dir + "/tokenizer.json";
  }

 private:
  std::string path_;
};

// Text made printable for failure messages.
std::string escaped(const std::string& s, size_t limit = 300) {
  std::string out;
  for (unsigned char c : s.substr(0, limit)) {
    if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7f) out += "\\x" + std::string(1, "0123456789abcdef"[c >> 4]) + "0123456789abcdef"[c & 15];
    else out += char(c);
  }
  return s.size() > limit ? out + "... (" + std::to_string(s.size()) + " bytes)" : out;
}

std::string ids_text(const std::vector<int32_t>& ids, size_t from) {
  std::string out;
  for (size_t i = from; i < ids.size() && i < from + 12; ++i) out += std::to_string(ids[i]) + " ";
  return out;
}

// --- the reference ---------------------------------------------------------------

// One batch of questions for tokenizer_reference.py.
class Reference {
 public:
  explicit Reference(const TempDir& dir) : dir_(dir) {}
  void add_tokenizer(const std::string& name, const std::string& path) { request_["tokenizers"][name] = path; }
  size_t encode(const std::string& name, const std::string& text) {
    request_["encode"].push_back({name, text});
    return request_["encode"].size() - 1;
  }
  size_t decode(const std::string& name, const std::vector<int32_t>& ids) {
    request_["decode"].push_back({name, ids});
    return request_["decode"].size() - 1;
  }
  void info(const std::string& name) { request_["info"].push_back(name); }

  // Runs the script; then the accessors below answer.
  ::testing::AssertionResult run() {
    const std::string request = dir_.path() + "/request.json", response = dir_.path() + "/response.json";
    write_text(request, request_.dump());
    const std::string script = source_dir() + "/tests/data/tokenizer_reference.py";
    const std::string cmd = "'" + python() + "' '" + script + "' '" + request + "' '" + response + "'";
    if (std::system(cmd.c_str()) != 0) return ::testing::AssertionFailure() << "failed: " << cmd;
    response_ = read_json(response);
    return ::testing::AssertionSuccess();
  }
  std::vector<int32_t> ids(size_t i, bool add_special_tokens) const {
    return response_["encode"][i][add_special_tokens ? 0 : 1].get<std::vector<int32_t>>();
  }
  std::string text(size_t i, bool skip_special_tokens) const {
    return response_["decode"][i][skip_special_tokens ? 1 : 0].get<std::string>();
  }
  const json& info_of(const std::string& name) const { return response_["info"][name]; }

 private:
  const TempDir& dir_;
  json request_ = {{"tokenizers", json::object()}, {"encode", json::array()}, {"decode", json::array()},
                   {"info", json::array()}};
  json response_;
};

// Counts mismatches and reports the first few in full.
class Mismatches {
 public:
  explicit Mismatches(std::string what) : what_(std::move(what)) {}
  ~Mismatches() { EXPECT_EQ(count_, 0) << count_ << " of " << checked_ << " " << what_ << " differ from tokenizers"; }
  void ids(const std::string& label, const std::string& text, const std::vector<int32_t>& ours,
           const std::vector<int32_t>& theirs) {
    ++checked_;
    if (ours == theirs) return;
    size_t at = 0;
    while (at < ours.size() && at < theirs.size() && ours[at] == theirs[at]) ++at;
    if (count_++ < 5)
      ADD_FAILURE() << label << ": ids differ at " << at << " (ours " << ours.size() << " ids, tokenizers "
                    << theirs.size() << ")\n  ours:       " << ids_text(ours, at) << "\n  tokenizers: "
                    << ids_text(theirs, at) << "\n  text: \"" << escaped(text) << "\"";
  }
  void text(const std::string& label, const std::string& ours, const std::string& theirs) {
    ++checked_;
    if (ours == theirs) return;
    if (count_++ < 5)
      ADD_FAILURE() << label << ": decoded text differs\n  ours:       \"" << escaped(ours)
                    << "\"\n  tokenizers: \"" << escaped(theirs) << "\"";
  }

 private:
  std::string what_;
  int checked_ = 0, count_ = 0;
};

// --- random text -----------------------------------------------------------------

// Random strings that mix what tokenizers' regexes and BPE treat differently:
// scripts, composed and decomposed accents, emoji with ZWJ and modifiers,
// digit runs, contractions in both cases, whitespace runs with \r\n and
// tabs, punctuation, control characters, and the special-token strings
// (whole and cut short) of every style plus `extra` words.
class RandomText {
 public:
  RandomText(uint64_t seed, std::vector<std::string> extra) : rng_(seed), extra_(std::move(extra)) {}

  std::string next() {
    static const std::vector<std::vector<std::string>> pools = {
        {"the", "Program", "License", "GNU", "you", "software", "copyright", "a", "I", "Free", "WARRANTY", "x"},
        {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re", "'VE", "'D", "don't", "IT'S", "we'll",
         "y'all", "'", "''", "'x"},
        {"café", "naïve", "Ångström", "résumé", "Øre", "straße", "ǅemal", "ﬁne", "Ǆ", "œuvre", "Ελληνικά", "ΣΊΣΥΦΟΣ"},
        {"cafe\u0301", "A\u030Angstro\u0308m", "n\u0303", "e\u0301\u0301", "\u0301x", "o\u0308\u0304"},
        {"Привет", "мир", "ЁЖИК", "съешь", "Україна"},
        {"中文", "漢字", "日本語の文", "한국어", "ｶﾀｶﾅ", "，", "。", "「引用」", "ｱ"},
        {"مرحبا", "العربية", "١٢٣", "שלום", "हिन्दी", "ไทย"},
        {"😀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "❤️", "🇫🇷", "1️⃣", "🧑🏿\u200d🚀"},
        {"0", "7", "42", "123", "2024", "3.14159", "1,000,000", "½", "²", "Ⅻ", "٣", "𝟘𝟙", "0x1F"},
        {" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n", "   \n  ", "\t\t", "\r", "\u00a0", "\u3000", "\u2028",
         "\x0b", "\f", "\u0085", " \t \n"},
        {"!", "...", "—", "«»", "(", ")", "$", "#", "@", "%", "&&", "=>", "///", "\"", "`", "~~", "?!", "::", "{}"},
        {"\x01", "\x7f", "\u200b", "\u180e", "\ufeff", "\u00ad", "\x1f", "\u2060"},
        {"<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
         "<|end_header_id|>", "<|im_start|>", "<|im_end|>", "<|reserved_special_token_0|>", "<|endoftext",
         "<|end_of", "<|", "|>", "<|im_start|>user\n", "<|eot_id|><|eot_id|>"},
    };
    std::uniform_int_distribution<int> length(0, 40), coin(0, 3);
    const int parts = length(rng_);
    std::string out;
    for (int i = 0; i < parts; ++i) {
      if (std::uniform_int_distribution<int>(0, 9)(rng_) == 0) {
        out += any_code_point();
        continue;
      }
      const bool use_extra = !extra_.empty() && coin(rng_) == 0;
      const auto& pool = use_extra ? extra_ : pools[std::uniform_int_distribution<size_t>(0, pools.size() - 1)(rng_)];
      out += pool[std::uniform_int_distribution<size_t>(0, pool.size() - 1)(rng_)];
      if (coin(rng_) == 0) out += ' ';
    }
    return out;
  }

  // A random code point from blocks whose assignments have not changed since
  // Unicode 14 (letters, marks, digits, spaces, symbols, emoji, CJK, private
  // use, unassigned holes): PCRE2 10.42 has Unicode 14 tables while
  // tokenizers' Oniguruma has newer ones, so a character assigned later (CJK
  // Extension H, say) is a letter to one and unassigned to the other.
  std::string any_code_point() {
    static const std::pair<uint32_t, uint32_t> blocks[] = {
        {0x80, 0x6FF},      {0x900, 0x97F},     {0xE00, 0xE7F},     {0x1100, 0x11FF},   {0x1E00, 0x209F},
        {0x2100, 0x27BF},   {0x3000, 0x30FF},   {0x4E00, 0x9FFF},   {0xAC00, 0xD7A3},   {0xE000, 0xE0FF},
        {0xFB00, 0xFB4F},   {0xFE00, 0xFE0F},   {0xFF00, 0xFFEF},   {0x10000, 0x1007F}, {0x1D400, 0x1D7FF},
        {0x1F300, 0x1F5FF}, {0x20000, 0x2A6DF}, {0xF0000, 0xF00FF}};
    const auto& [first, last] = blocks[std::uniform_int_distribution<size_t>(0, std::size(blocks) - 1)(rng_)];
    const uint32_t cp = std::uniform_int_distribution<uint32_t>(first, last)(rng_);
    std::string out;
    data::tok::append_utf8(out, cp);
    return out;
  }

  // Uniformly random ids, special ones included, for decoding.
  std::vector<int32_t> ids(int64_t vocab_size) {
    std::vector<int32_t> ids(std::uniform_int_distribution<size_t>(0, 30)(rng_));
    for (int32_t& id : ids) id = std::uniform_int_distribution<int32_t>(0, int32_t(vocab_size) - 1)(rng_);
    return ids;
  }

 private:
  std::mt19937_64 rng_;
  std::vector<std::string> extra_;
};

// Fixed cases at the edges.
std::vector<std::string> edge_cases() {
  return {"",
          " ",
          "\n",
          "  \n\n \t",
          "<|endoftext|>",
          "<|endoftext|><|endoftext|>",
          "a<|begin_of_text|>b<|end_of_text|> c <|eot_id|>\n",
          "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>",
          std::string(5000, ' ') + "x",
          std::string(3000, '\n'),
          std::string(10000, 'a'),
          std::string(4000, '=') + "!",
          "1234567890123456789",
          "I'M HERE, you'LL see, it'S 'tis",
          "Ça a l'air très naïve, ﬁnally: Ω ≠ Ω"};
}

// Real text: every license file of the system and this repository's text.
std::vector<std::pair<std::string, std::string>> real_texts() {
  std::vector<std::pair<std::string, std::string>> texts;
  for (const char* name : {"GPL-3", "GPL-2", "LGPL-2.1", "LGPL-3", "Apache-2.0", "Artistic", "BSD", "GFDL-1.2",
                           "GFDL-1.3", "MPL-1.1", "MPL-2.0", "CC0-1.0", "GPL-1"}) {
    std::string text = read_text(std::string("/usr/share/common-licenses/") + name);
    if (!text.empty()) texts.emplace_back(name, std::move(text));
  }
  for (const char* path : {"README.md", "src/data/tokenizer.cpp", "src/data/tokenizer_text.cpp",
                           "src/data/tokenizer_bpe.cpp", "include/unswag/data/tokenizer.h",
                           "tests/data/test_tokenizer.cpp", "tests/data/make_tokenizer_fixtures.py", "CMakeLists.txt"}) {
    std::string text = read_text(source_dir() + "/" + path);
    if (!text.empty()) texts.emplace_back(path, std::move(text));
  }
  return texts;
}

// Encodes `texts` with both and compares ids (with and without special
// tokens), then decodes the reference ids with both (keeping and skipping
// special tokens) and compares the text; `lossless` also asks
// decode(encode(x)) == x.
void compare_with_reference(const std::string& name, const std::string& path,
                            const std::vector<std::pair<std::string, std::string>>& texts, bool lossless) {
  const Tokenizer tokenizer = Tokenizer::from_file(path);
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  Reference ref(dir);
  ref.add_tokenizer(name, path);
  std::vector<size_t> encode_index;
  for (const auto& [label, text] : texts) encode_index.push_back(ref.encode(name, text));
  ASSERT_TRUE(ref.run());

  Reference ref_decode(dir);
  ref_decode.add_tokenizer(name, path);
  Mismatches encode_mismatches(name + " encodings");
  std::vector<std::vector<int32_t>> reference_ids;
  for (size_t i = 0; i < texts.size(); ++i) {
    const auto& [label, text] = texts[i];
    for (bool special : {true, false}) {
      const auto theirs = ref.ids(encode_index[i], special);
      encode_mismatches.ids(name + " " + label + (special ? " (special tokens)" : ""), text,
                            tokenizer.encode(text, special), theirs);
      reference_ids.push_back(theirs);
      ref_decode.decode(name, theirs);
    }
  }
  ASSERT_TRUE(ref_decode.run());
  Mismatches decode_mismatches(name + " decodings");
  for (size_t i = 0; i < reference_ids.size(); ++i) {
    const auto& [label, text] = texts[i / 2];
    for (bool skip : {false, true})
      decode_mismatches.text(name + " decode " + label + (skip ? " skipping specials" : ""),
                             tokenizer.decode(reference_ids[i], skip), ref_decode.text(i, skip));
    if (lossless && i % 2 == 1) {
      EXPECT_EQ(tokenizer.decode(tokenizer.encode(text, false)), text) << name << " round trip of " << label;
    }
  }
}

std::vector<std::pair<std::string, std::string>> random_texts(uint64_t seed, int count,
                                                              const std::vector<std::string>& extra = {}) {
  RandomText random(seed, extra);
  std::vector<std::pair<std::string, std::string>> texts;
  int i = 0;
  for (const std::string& text : edge_cases()) texts.emplace_back("edge case " + std::to_string(i++), text);
  for (int k = 0; k < count; ++k) texts.emplace_back("random string " + std::to_string(k), random.next());
  return texts;
}

// --- the three fixtures -------------------------------------------------------------

class TokenizerStyle : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { seed_ = test::fresh_seed(); }
  std::string path() const { return fixture(GetParam()) + "/tokenizer.json"; }
  // Byte-level without a normaliser: decode(encode(x)) == x for any x.
  bool lossless() const { return GetParam() != "qwen2"; }
  uint64_t seed_ = 0;
};

TEST_P(TokenizerStyle, RealTextMatchesTokenizers) {
  REQUIRE_REFERENCE();
  const auto texts = real_texts();
  ASSERT_GE(texts.size(), 10u) << "license files or sources missing";
  compare_with_reference(GetParam(), path(), texts, true);  // (all these texts are NFC)
}

TEST_P(TokenizerStyle, RandomTextMatchesTokenizers) {
  REQUIRE_REFERENCE();
  SCOPED_TRACE("seed " + std::to_string(seed_));
  compare_with_reference(GetParam(), path(), random_texts(seed_, 400), lossless());
}

TEST_P(TokenizerStyle, RandomIdsDecodeLikeTokenizers) {
  REQUIRE_REFERENCE();
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const Tokenizer tokenizer = Tokenizer::from_file(path());
  RandomText random(seed_, {});
  TempDir dir;
  Reference ref(dir);
  ref.add_tokenizer("t", path());
  std::vector<std::vector<int32_t>> sequences;
  for (int k = 0; k < 300; ++k) {
    sequences.push_back(random.ids(tokenizer.vocab_size()));
    ref.decode("t", sequences.back());
  }
  ASSERT_TRUE(ref.run());
  Mismatches mismatches(GetParam() + " decodings of random ids");
  for (size_t k = 0; k < sequences.size(); ++k)
    for (bool skip : {false, true})
      mismatches.text("ids " + ids_text(sequences[k], 0) + (skip ? " skipping specials" : ""),
                      tokenizer.decode(sequences[k], skip), ref.text(k, skip));
}

// vocab_size, token_to_id over the whole vocabulary and id_to_token over every
// id (and one past the end) against the reference; returns its vocabulary.
json compare_vocabulary(const std::string& path) {
  const Tokenizer tokenizer = Tokenizer::from_file(path);
  TempDir dir;
  Reference ref(dir);
  ref.add_tokenizer("t", path);
  ref.info("t");
  EXPECT_TRUE(ref.run());
  const json info = ref.info_of("t");
  EXPECT_EQ(tokenizer.vocab_size(), info["vocab_size"].get<int64_t>()) << path;
  int wrong = 0;
  for (auto it = info["vocab"].begin(); it != info["vocab"].end(); ++it)
    wrong += tokenizer.token_to_id(it.key()) != std::optional<int32_t>(it.value().get<int32_t>());
  EXPECT_EQ(wrong, 0) << "token_to_id differs for " << wrong << " tokens of " << path;
  const json& tokens = info["tokens"];
  for (size_t id = 0; id < tokens.size(); ++id) {
    if (tokens[id].is_null())
      test::expect_error([&] { tokenizer.id_to_token(int32_t(id)); }, {"not a token id"});
    else
      EXPECT_EQ(tokenizer.id_to_token(int32_t(id)), tokens[id].get<std::string>()) << "id " << id << " of " << path;
  }
  EXPECT_EQ(tokenizer.token_to_id("no such token in any vocabulary"), std::nullopt);
  return info["vocab"];
}

TEST_P(TokenizerStyle, VocabularyMatchesTokenizers) {
  REQUIRE_REFERENCE();
  const Tokenizer tokenizer = Tokenizer::from_file(path());
  const json vocab = compare_vocabulary(path());
  // BOS/EOS: the strings tokenizer_config.json names, looked up in the
  // reference's vocabulary.
  const json config = read_json(fixture(GetParam()) + "/tokenizer_config.json");
  auto expected = [&](const char* key) -> std::optional<int32_t> {
    const json& v = config[key];
    if (v.is_null()) return std::nullopt;
    return vocab[v.is_string() ? v.get<std::string>() : v["content"].get<std::string>()].get<int32_t>();
  };
  EXPECT_EQ(tokenizer.bos_id(), expected("bos_token"));
  EXPECT_EQ(tokenizer.eos_id(), expected("eos_token"));
  // A directory loads the same tokenizer.
  const Tokenizer from_dir = Tokenizer::from_file(fixture(GetParam()));
  EXPECT_EQ(from_dir.path(), tokenizer.path());
  EXPECT_EQ(from_dir.encode("Hello, world<|endoftext|>!"), tokenizer.encode("Hello, world<|endoftext|>!"));
}

TEST_P(TokenizerStyle, ThreadsShareTheCache) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const Tokenizer tokenizer = Tokenizer::from_file(path());
  const auto texts = random_texts(seed_, 200);
  std::vector<std::vector<int32_t>> expected;
  {
    const Tokenizer fresh = Tokenizer::from_file(path());  // its own, empty cache
    for (const auto& [label, text] : texts) expected.push_back(fresh.encode(text));
  }
  std::vector<std::thread> threads;
  std::vector<int> wrong(4, 0);
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      const Tokenizer copy = tokenizer;  // copies share the cache
      for (size_t i = 0; i < texts.size(); ++i) wrong[size_t(t)] += copy.encode(texts[(i * 7 + size_t(t)) % texts.size()].second) != expected[(i * 7 + size_t(t)) % texts.size()];
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(wrong[size_t(t)], 0) << "thread " << t;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TokenizerStyle, ::testing::Values("gpt2", "llama3", "qwen2"),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

// --- variants of the fixtures ------------------------------------------------------

struct Variant {
  std::string name, base;
  std::function<void(json&)> edit;
  std::vector<std::string> extra_words;  // mixed into the random text
  bool lossless = false;
};

// Adds tokens after the fixture's, with the ids tokenizers gives them.
void add_tokens(json& t, const std::vector<json>& tokens) {
  int64_t next = int64_t(t["model"]["vocab"].size());
  for (const json& a : t["added_tokens"]) next = std::max(next, a["id"].get<int64_t>() + 1);
  for (json token : tokens) {
    const std::string content = token["content"];
    token["id"] = t["model"]["vocab"].contains(content) ? t["model"]["vocab"][content].get<int64_t>() : next++;
    t["added_tokens"].push_back(token);
  }
}

json added(const std::string& content, bool special, bool normalized, bool single_word, bool lstrip, bool rstrip) {
  return {{"content", content}, {"special", special}, {"normalized", normalized},
          {"single_word", single_word}, {"lstrip", lstrip}, {"rstrip", rstrip}};
}

json split(const json& pattern, const std::string& behavior, bool invert) {
  return {{"type", "Split"}, {"pattern", pattern}, {"behavior", behavior}, {"invert", invert}};
}

std::vector<Variant> variants() {
  std::vector<Variant> v;
  v.push_back({"gpt2_add_prefix_space", "gpt2", [](json& t) { t["pre_tokenizer"]["add_prefix_space"] = true; }, {}, false});
  v.push_back({"gpt2_no_regex", "gpt2", [](json& t) { t["pre_tokenizer"]["use_regex"] = false; }, {}, true});
  v.push_back({"gpt2_pair_merges", "gpt2", [](json& t) {
                 json pairs = json::array();
                 for (const json& m : t["model"]["merges"]) {
                   const std::string s = m;
                   pairs.push_back({s.substr(0, s.find(' ')), s.substr(s.find(' ') + 1)});
                 }
                 t["model"]["merges"] = pairs;
               }, {}, true});
  v.push_back({"gpt2_no_decoder", "gpt2", [](json& t) { t["decoder"] = nullptr; }, {}, false});
  v.push_back({"gpt2_added_token_flags", "gpt2", [](json& t) {
                 add_tokens(t, {added("License", false, true, true, false, false),
                                added("GNU", false, false, false, true, false),
                                added("Program", true, false, false, false, true),
                                added("you", false, true, true, true, true),
                                added("Ġthe", false, true, false, false, false),  // already in the vocabulary
                                added("<|end", true, false, false, false, false),  // a prefix of <|endoftext|>
                                added("héllo wörld", false, true, false, false, false)});
               },
               {"License", "GNU", "Program", "you", "Ġthe", "<|end", "héllo wörld", "  ", "\n", "Licenses", "_you"},
               false});  // (lstrip/rstrip tokens swallow spaces)
  v.push_back({"llama3_string_merges", "llama3", [](json& t) {
                 json strings = json::array();
                 for (const json& m : t["model"]["merges"]) strings.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
                 t["model"]["merges"] = strings;
               }, {}, true});
  v.push_back({"llama3_without_ignore_merges", "llama3", [](json& t) { t["model"]["ignore_merges"] = false; }, {}, true});
  v.push_back({"llama3_template_alone_bos_eos", "llama3", [](json& t) {
                 json tp = t["post_processor"]["processors"][1];
                 tp["single"].push_back({{"SpecialToken", {{"id", "<|end_of_text|>"}, {"type_id", 0}}}});
                 tp["special_tokens"]["<|end_of_text|>"] = {{"id", "<|end_of_text|>"}, {"ids", {2001}}, {"tokens", {"<|end_of_text|>"}}};
                 t["post_processor"] = tp;
               }, {}, true});
  v.push_back({"llama3_no_post_processor", "llama3", [](json& t) { t["post_processor"] = nullptr; }, {}, true});
  // Every split behaviour, both ways, around whitespace and around a string.
  for (const char* behavior : {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"})
    for (bool invert : {false, true}) {
      v.push_back({std::string("split_whitespace_") + behavior + (invert ? "_inverted" : ""), "llama3",
                   [=](json& t) { t["pre_tokenizer"]["pretokenizers"][0] = split({{"Regex", "\\s+"}}, behavior, invert); },
                   {}, false});
      v.push_back({std::string("split_string_") + behavior + (invert ? "_inverted" : ""), "llama3",
                   [=](json& t) { t["pre_tokenizer"]["pretokenizers"][0] = split({{"String", "e"}}, behavior, invert); },
                   {"e", "ee", "eee", "bee"}, false});
    }
  // Regex features whose spelling differs between Oniguruma and PCRE2.
  for (const char* regex : {"\\w+|[^\\w\\s]+|\\s+", "\\h+|\\H", "^\\s*\\S+|\\S+$|.", "(?i:the|and|ǆ)|[\\s\\p{P}]+",
                            "\\d+|\\D", "[^\\s]+", "[[:alpha:]]+|[^[:alpha:]]+"})
    v.push_back({std::string("regex ") + regex, "qwen2",
                 [=](json& t) { t["pre_tokenizer"]["pretokenizers"][0] = split({{"Regex", regex}}, "Isolated", false); },
                 {"DEADbeef", "0xFF", "THE", "And", "Ǆ", "ǅ"}, false});
  v.push_back({"qwen2_nested_sequences", "qwen2", [](json& t) {
                 t["pre_tokenizer"] = {{"type", "Sequence"},
                                       {"pretokenizers", {split({{"Regex", "\\s+"}}, "MergedWithNext", false), t["pre_tokenizer"]}}};
               }, {}, false});
  for (const char* form : {"NFD", "NFKC", "NFKD"})
    v.push_back({std::string("qwen2_") + form, "qwen2", [=](json& t) { t["normalizer"] = {{"type", form}}; }, {}, false});
  v.push_back({"qwen2_normalizer_sequence", "qwen2", [](json& t) {
                 t["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "NFKD"}}, {{"type", "NFC"}}}}};
               }, {}, false});
  v.push_back({"qwen2_normalized_added_tokens", "qwen2", [](json& t) {
                 add_tokens(t, {added("Cafe\u0301", false, true, false, false, false),  // matches "Café" after NFC
                                added("A\u030Angstro\u0308m", false, false, false, false, false),  // decomposed, never NFC'd
                                added("ﬁ", true, true, false, true, true)});
               },
               {"Café", "Cafe\u0301", "Ångström", "A\u030Angstro\u0308m", "ﬁ", " ﬁ "}, false});
  return v;
}

TEST(TokenizerVariants, MatchTokenizers) {
  REQUIRE_REFERENCE();
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  const std::string gpl = read_text("/usr/share/common-licenses/GPL-3");
  int index = 0;
  for (const Variant& variant : variants()) {
    SCOPED_TRACE("variant " + variant.name);
    json t = read_json(fixture(variant.base) + "/tokenizer.json");
    variant.edit(t);
    const std::string path = dir.write_tokenizer("variant" + std::to_string(index++), t);
    auto texts = random_texts(seed + uint64_t(index), 60, variant.extra_words);
    texts.emplace_back("GPL-3", gpl);
    compare_with_reference(variant.name, path, texts, variant.lossless);
    compare_vocabulary(path);
  }
}

TEST(TokenizerVariants, BothMergeFormsGiveTheSameIds) {
  // A reader that knew one form only would give zero merges for the other:
  // one id per byte. Both forms must give the fixture's ids, with merges used.
  TempDir dir;
  const std::string text = read_text("/usr/share/common-licenses/Apache-2.0");
  for (const std::string style : {"gpt2", "llama3"}) {
    json t = read_json(fixture(style) + "/tokenizer.json");
    json other = json::array();
    for (const json& m : t["model"]["merges"]) {
      if (m.is_string()) {
        const std::string s = m;
        other.push_back({s.substr(0, s.find(' ')), s.substr(s.find(' ') + 1)});
      } else {
        other.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
      }
    }
    t["model"]["merges"] = other;
    const auto ids = Tokenizer::from_file(fixture(style)).encode(text, false);
    EXPECT_EQ(Tokenizer::from_file(dir.write_tokenizer(style, t)).encode(text, false), ids) << style;
    EXPECT_LT(ids.size(), text.size() / 3) << style << ": merges were not applied";
  }
}

// --- errors ---------------------------------------------------------------------------

class TokenizerErrors : public ::testing::Test {
 protected:
  // The fixture `style` after `edit`, loaded; expects an error with `fragments`.
  void expect_load_error(const std::string& style, const std::function<void(json&)>& edit,
                         std::initializer_list<const char*> fragments) {
    json t = read_json(fixture(style) + "/tokenizer.json");
    edit(t);
    const std::string path = dir_.write_tokenizer("case" + std::to_string(case_++), t);
    test::expect_error([&] { Tokenizer::from_file(path); }, fragments);
  }
  TempDir dir_;
  int case_ = 0;
};

TEST_F(TokenizerErrors, MissingFiles) {
  test::expect_error([] { Tokenizer::from_file("/nonexistent/dir/tokenizer.json"); }, {"/nonexistent/dir", "does not exist"});
  test::expect_error([&] { Tokenizer::from_file(dir_.path()); }, {"without tokenizer.json"});
}

TEST_F(TokenizerErrors, MalformedJson) {
  const std::string path = dir_.path() + "/tokenizer.json";
  write_text(path, "{\"model\": {\"type\": \"BPE\", ");
  test::expect_error([&] { Tokenizer::from_file(path); }, {path.c_str(), "not valid JSON"});
  write_text(path, "[1, 2]");
  test::expect_error([&] { Tokenizer::from_file(path); }, {"expected an object", "array"});
  write_text(path, "{}");
  test::expect_error([&] { Tokenizer::from_file(path); }, {"model", "missing"});
  // A broken tokenizer_config.json beside a good tokenizer.json.
  json t = read_json(fixture("gpt2") + "/tokenizer.json");
  const std::string good = dir_.write_tokenizer("config", t);
  write_text(dir_.path() + "/config/tokenizer_config.json", "{\"bos_token\": [1]}");
  test::expect_error([&] { Tokenizer::from_file(good); }, {"tokenizer_config.json", "bos_token"});
}

TEST_F(TokenizerErrors, UnsupportedComponentsAreNamed) {
  expect_load_error("gpt2", [](json& t) { t["model"]["type"] = "WordPiece"; }, {"\"WordPiece\"", "not supported", "BPE"});
  expect_load_error("gpt2", [](json& t) { t["model"]["type"] = "Unigram"; }, {"\"Unigram\""});
  expect_load_error("gpt2", [](json& t) { t["model"].erase("type"); }, {"model.type", "missing"});
  expect_load_error("gpt2", [](json& t) { t["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "▁"}}; },
                    {"pre_tokenizer", "\"Metaspace\"", "not supported"});
  expect_load_error("llama3", [](json& t) { t["pre_tokenizer"]["pretokenizers"][1] = {{"type", "Digits"}}; },
                    {"pre_tokenizer.pretokenizers[1]", "\"Digits\""});
  expect_load_error("qwen2", [](json& t) { t["normalizer"] = {{"type", "Lowercase"}}; }, {"normalizer", "\"Lowercase\""});
  expect_load_error("qwen2", [](json& t) { t["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "Strip"}}}}}; },
                    {"normalizer.normalizers[0]", "\"Strip\""});
  expect_load_error("gpt2", [](json& t) { t["post_processor"] = {{"type", "RobertaProcessing"}}; }, {"post_processor", "\"RobertaProcessing\""});
  expect_load_error("gpt2", [](json& t) { t["decoder"] = {{"type", "WordPiece"}}; }, {"decoder", "\"WordPiece\""});
  expect_load_error("gpt2", [](json& t) { t["model"]["byte_fallback"] = true; }, {"byte_fallback"});
  expect_load_error("gpt2", [](json& t) { t["model"]["dropout"] = 0.1; }, {"dropout"});
  expect_load_error("gpt2", [](json& t) { t["model"]["continuing_subword_prefix"] = "##"; }, {"continuing_subword_prefix", "##"});
  expect_load_error("gpt2", [](json& t) { t["truncation"] = {{"max_length", 8}}; }, {"truncation"});
  expect_load_error("gpt2", [](json& t) { t["padding"] = {{"length", 8}}; }, {"padding"});
  expect_load_error("llama3", [](json& t) { t["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Sideways"; }, {"behavior", "Sideways"});
  expect_load_error("llama3", [](json& t) { t["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "(unclosed"}}; },
                    {"(unclosed", "does not compile"});
  expect_load_error("llama3", [](json& t) { t["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "[a[b]]"}}; },
                    {"nested bracket"});
  expect_load_error("llama3", [](json& t) { t["post_processor"]["processors"][1]["single"][1]["Sequence"]["id"] = "B"; }, {"$B"});
}

TEST_F(TokenizerErrors, BadVocabularyAndMerges) {
  expect_load_error("gpt2", [](json& t) { t["model"]["merges"].push_back("Ġ notatoken"); }, {"merge", "notatoken", "not in model.vocab"});
  expect_load_error("gpt2", [](json& t) { t["model"]["merges"].push_back("nospace"); }, {"merges[", "nospace", "separated by a space"});
  expect_load_error("gpt2", [](json& t) { t["model"]["merges"].push_back({"a", "b"}); }, {"merges[", "like the merges before it"});
  expect_load_error("llama3", [](json& t) { t["model"]["merges"].push_back("a b"); }, {"merges[", "pair"});
  expect_load_error("gpt2", [](json& t) { t["model"]["vocab"]["zzz"] = -3; }, {"vocab", "zzz", "-3"});
  expect_load_error("gpt2", [](json& t) { t["model"]["vocab"]["zzz"] = 5; }, {"id 5 is given to both"});
  expect_load_error("gpt2", [](json& t) { t["model"]["unk_token"] = "<unk>"; }, {"unk_token", "<unk>"});
  // tokenizers would renumber these added tokens; the file's ids disagree.
  expect_load_error("llama3", [](json& t) { t["added_tokens"][1]["id"] = 5000; }, {"<|end_of_text|>", "5000", "would give it id 2001"});
}

TEST(TokenizerInput, InvalidUtf8NamesTheOffset) {
  const Tokenizer tokenizer = Tokenizer::from_file(fixture("llama3"));
  const std::vector<std::pair<std::string, size_t>> cases = {
      {"\x80", 0},                          // lone continuation byte
      {"abc\xC3", 3},                       // truncated 2-byte sequence at the end
      {"ok \xC3(", 3},                      // 2-byte lead followed by ASCII
      {"a\xC0\x80", 1},                     // overlong NUL
      {"xy\xE0\x80\xAF", 2},                // overlong 3-byte form
      {"\xED\xA0\x80 surrogate", 0},        // UTF-16 surrogate
      {"é\xF4\x90\x80\x80", 2},             // above U+10FFFF
      {"valid ünïcödé then \xFF", 23},      // 0xFF never appears in UTF-8
      {"12345678901234567890\xE2\x82", 20},  // truncated 3-byte sequence after an ASCII run
  };
  for (const auto& [text, offset] : cases) {
    const std::string fragment = "byte offset " + std::to_string(offset) + " ";
    test::expect_error([&] { tokenizer.encode(text); }, {"not valid UTF-8", fragment.c_str()});
  }
}

TEST(TokenizerInput, BadIdsAreErrors) {
  const Tokenizer tokenizer = Tokenizer::from_file(fixture("qwen2"));
  const int32_t past_end = int32_t(tokenizer.vocab_size()) + 100;
  test::expect_error([&] { tokenizer.decode({1, -1, 2}); }, {"ids[1] = -1", "not a token id"});
  test::expect_error([&] { tokenizer.decode({past_end}, true); }, {("ids[0] = " + std::to_string(past_end)).c_str()});
  test::expect_error([&] { tokenizer.id_to_token(past_end); }, {"id_to_token", std::to_string(past_end).c_str()});
  EXPECT_EQ(tokenizer.decode({}), "");
}

}  // namespace
}  // namespace unswag
