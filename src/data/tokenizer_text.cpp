// Text building blocks of the tokenizer: UTF-8 validation and lossy decoding
// (Rust's rules), the GPT-2 byte-level alphabet, Unicode normalisation through
// utf8proc, and PCRE2 regexes that behave as tokenizers' Oniguruma ones.
#include <c10/util/Exception.h>
#include <utf8proc.h>

#include <cstdlib>

#include "data/tokenizer_internal.h"

#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>

namespace unswag::data::tok {

// --- UTF-8 -------------------------------------------------------------------

namespace {

// Length of the well-formed sequence that starts at `pos` (Unicode Table 3-7),
// or 0 when it is ill-formed; `bad` is then the offset of the first byte that
// breaks it (the lead byte itself, a wrong continuation byte, or the end).
size_t well_formed_length(std::string_view s, size_t pos, size_t& bad) {
  const auto b = static_cast<unsigned char>(s[pos]);
  if (b < 0x80) return 1;
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b >= 0xC2 && b <= 0xDF) {
    need = 1;
  } else if (b == 0xE0) {
    need = 2, lo = 0xA0;  // no overlong 3-byte forms
  } else if (b == 0xED) {
    need = 2, hi = 0x9F;  // no surrogates
  } else if (b >= 0xE1 && b <= 0xEF) {
    need = 2;
  } else if (b == 0xF0) {
    need = 3, lo = 0x90;  // no overlong 4-byte forms
  } else if (b == 0xF4) {
    need = 3, hi = 0x8F;  // nothing above U+10FFFF
  } else if (b >= 0xF1 && b <= 0xF3) {
    need = 3;
  } else {
    bad = pos;  // 0x80..0xC1 (continuation or overlong lead), 0xF5..0xFF
    return 0;
  }
  for (size_t k = 1; k <= need; ++k) {
    if (pos + k >= s.size()) {
      bad = pos + k;
      return 0;
    }
    const auto c = static_cast<unsigned char>(s[pos + k]);
    if (c < (k == 1 ? lo : 0x80) || c > (k == 1 ? hi : 0xBF)) {
      bad = pos + k;
      return 0;
    }
  }
  return need + 1;
}

}  // namespace

std::optional<size_t> invalid_utf8_offset(std::string_view s) {
  for (size_t pos = 0; pos < s.size();) {
    // ASCII runs are the common case: skip them eight bytes at a time.
    while (pos + 8 <= s.size()) {
      uint64_t chunk;
      __builtin_memcpy(&chunk, s.data() + pos, 8);
      if (chunk & 0x8080808080808080ull) break;
      pos += 8;
    }
    if (pos >= s.size()) break;
    size_t bad = 0;
    const size_t n = well_formed_length(s, pos, bad);
    if (n == 0) return pos;
    pos += n;
  }
  return std::nullopt;
}

char32_t next_code_point(std::string_view s, size_t& pos) {
  const auto b = static_cast<unsigned char>(s[pos]);
  if (b < 0x80) {
    ++pos;
    return b;
  }
  const int n = b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : 2;
  char32_t cp = b & (0x7F >> n);
  for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[pos + k]) & 0x3F);
  pos += size_t(n);
  return cp;
}

char32_t previous_code_point(std::string_view s, size_t end, size_t& start) {
  start = end - 1;
  while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
  size_t pos = start;
  return next_code_point(s, pos);
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t pos = 0; pos < bytes.size();) {
    size_t bad = 0;
    const size_t n = well_formed_length(bytes, pos, bad);
    if (n > 0) {
      out.append(bytes.data() + pos, n);
      pos += n;
    } else {
      // The maximal subpart [pos, bad) (at least the lead byte) is one U+FFFD;
      // scanning resumes at the byte that broke it.
      out += "\xEF\xBF\xBD";
      pos = bad > pos ? bad : pos + 1;
    }
  }
  return out;
}

bool is_white_space(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

bool is_word_char(char32_t cp) {
  if (cp < 0x80) return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') || cp == '_';
  if (cp == 0x200C || cp == 0x200D) return true;
  switch (utf8proc_category(utf8proc_int32_t(cp))) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_PC:
      return true;
    default:
      return false;
  }
}

// --- byte-level alphabet -----------------------------------------------------

const ByteLevelAlphabet& byte_level_alphabet() {
  static const ByteLevelAlphabet alphabet = [] {
    ByteLevelAlphabet a;
    for (int16_t& b : a.byte_of_cp) b = -1;
    char32_t next_unprintable = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const char32_t cp = printable ? char32_t(b) : next_unprintable++;
      append_utf8(a.utf8_of_byte[b], cp);
      a.byte_of_cp[cp] = int16_t(b);
    }
    return a;
  }();
  return alphabet;
}

void append_byte_level(std::string& out, std::string_view bytes) {
  const ByteLevelAlphabet& a = byte_level_alphabet();
  for (char c : bytes) out += a.utf8_of_byte[static_cast<unsigned char>(c)];
}

// --- normalisation -----------------------------------------------------------

std::string normalize(std::string_view text, NormalForm form) {
  bool ascii = true;
  for (char c : text) ascii = ascii && static_cast<unsigned char>(c) < 0x80;
  if (ascii) return std::string(text);  // every normal form leaves ASCII as it is
  int options = UTF8PROC_STABLE;
  switch (form) {
    case NormalForm::kNFC: options |= UTF8PROC_COMPOSE; break;
    case NormalForm::kNFD: options |= UTF8PROC_DECOMPOSE; break;
    case NormalForm::kNFKC: options |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT; break;
    case NormalForm::kNFKD: options |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT; break;
  }
  utf8proc_uint8_t* result = nullptr;
  const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                                          utf8proc_ssize_t(text.size()), &result, utf8proc_option_t(options));
  TORCH_CHECK(n >= 0, "tokenizer: Unicode normalisation failed: ", utf8proc_errmsg(n));
  std::string out(reinterpret_cast<const char*>(result), size_t(n));
  std::free(result);
  return out;
}

// --- regex -------------------------------------------------------------------

namespace {

// Oniguruma's \s (White_Space), written out for PCRE2, whose \s also takes
// U+180E; its \w (letters, marks, numbers, connector punctuation); its \h.
constexpr const char* kSpaceClass =
    "\\t\\n\\x0B\\f\\r\\x20\\x85\\xA0\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}";
constexpr const char* kWordClass = "\\p{L}\\p{M}\\p{N}\\p{Pc}";
constexpr const char* kHexClass = "0-9a-fA-F";

}  // namespace

std::string translate_oniguruma_pattern(const std::string& pattern) {
  std::string out;
  bool in_class = false;
  size_t class_body = 0;  // offset in `pattern` where the current class's items begin
  const size_t n = pattern.size();
  for (size_t i = 0; i < n; ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < n) {
      const char e = pattern[++i];
      const char* set = e == 's' || e == 'S' ? kSpaceClass : e == 'w' || e == 'W' ? kWordClass
                        : e == 'h' || e == 'H'             ? kHexClass
                                                           : nullptr;
      const bool negated = e == 'S' || e == 'W' || e == 'H';
      if (set == nullptr) {
        out += '\\';
        out += e;
      } else if (!in_class) {
        out += negated ? "[^" : "[";
        out += set;
        out += ']';
      } else if (!negated) {
        out += set;
      } else if (e == 'S') {
        out += "\\S";  // PCRE2's \S inside a class: differs from Oniguruma's only on U+180E
      } else {
        TORCH_CHECK(false, "tokenizer: regex \"", pattern, "\": \\", e,
                    " inside a bracket expression is not supported (it has no PCRE2 equivalent)");
      }
      continue;
    }
    if (in_class) {
      if (c == '[') {
        TORCH_CHECK(i + 1 < n && pattern[i + 1] == ':', "tokenizer: regex \"", pattern,
                    "\": nested bracket expressions (an Oniguruma extension) are not supported");
        const size_t close = pattern.find(":]", i + 2);
        TORCH_CHECK(close != std::string::npos, "tokenizer: regex \"", pattern, "\": unterminated [: :] class");
        out.append(pattern, i, close + 2 - i);
        i = close + 1;
        continue;
      }
      TORCH_CHECK(!(c == '&' && i + 1 < n && pattern[i + 1] == '&'), "tokenizer: regex \"", pattern,
                  "\": class intersection && (an Oniguruma extension) is not supported");
      if (c == ']' && i > class_body) in_class = false;  // a ']' first in the class is literal
      out += c;
      continue;
    }
    if (c == '[') {
      in_class = true;
      out += c;
      if (i + 1 < n && pattern[i + 1] == '^') out += pattern[++i];
      class_body = i + 1;
      continue;
    }
    if (c == '(' && i + 2 < n && pattern[i + 1] == '?') {
      // Inline options: Ruby's (?m) is PCRE2's (?s) (dot matches newline).
      size_t j = i + 2;
      std::string flags;
      while (j < n && (pattern[j] == 'i' || pattern[j] == 'm' || pattern[j] == 'x' || pattern[j] == '-'))
        flags += pattern[j] == 'm' ? 's' : pattern[j], ++j;
      if (!flags.empty() && j < n && (pattern[j] == ':' || pattern[j] == ')')) {
        out += "(?" + flags;
        i = j - 1;
        continue;
      }
    }
    out += c;
  }
  return out;
}

struct Regex::Code {
  pcre2_code* code = nullptr;
  ~Code() { pcre2_code_free(code); }
};

namespace {

// Per-thread match state: PCRE2 match data and JIT stack must not be shared
// between threads, and creating them per call would cost more than a match.
struct MatchState {
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);  // only group 0 is read
  pcre2_jit_stack* jit_stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
  pcre2_match_context* context = pcre2_match_context_create(nullptr);
  MatchState() {
    TORCH_CHECK(data != nullptr && jit_stack != nullptr && context != nullptr, "tokenizer: out of memory (PCRE2)");
    pcre2_jit_stack_assign(context, nullptr, jit_stack);
  }
  ~MatchState() {
    pcre2_match_context_free(context);
    pcre2_jit_stack_free(jit_stack);
    pcre2_match_data_free(data);
  }
};

std::string pcre2_message(int code) {
  PCRE2_UCHAR buffer[256];
  pcre2_get_error_message(code, buffer, sizeof(buffer));
  return reinterpret_cast<const char*>(buffer);
}

}  // namespace

Regex::Regex(const std::string& pattern, bool literal) : pattern_(pattern) {
  const std::string compiled = literal ? pattern : translate_oniguruma_pattern(pattern);
  uint32_t options = PCRE2_UTF | PCRE2_NO_UTF_CHECK;
  options |= literal ? PCRE2_LITERAL : PCRE2_UCP | PCRE2_MULTILINE;  // Ruby syntax: ^ and $ are line anchors
  int error = 0;
  PCRE2_SIZE error_offset = 0;
  auto code = std::make_shared<Code>();
  code->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(compiled.data()), compiled.size(), options, &error,
                             &error_offset, nullptr);
  TORCH_CHECK(code->code != nullptr, "tokenizer: regex \"", pattern, "\" does not compile (PCRE2: ",
              pcre2_message(error), " at offset ", error_offset, " of \"", compiled, "\")");
  pcre2_jit_compile(code->code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter where JIT is unavailable
  code_ = std::move(code);
}

void Regex::find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& matches) const {
  thread_local MatchState state;
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t search_from = 0;
  bool have_last = false;
  size_t last_match_end = 0;
  while (search_from <= text.size()) {
    const int rc = pcre2_match(code_->code, subject, text.size(), search_from, PCRE2_NO_UTF_CHECK, state.data,
                               state.context);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    TORCH_CHECK(rc >= 0, "tokenizer: regex \"", pattern_, "\" failed on a piece of ", text.size(),
                " bytes: ", pcre2_message(rc));
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(state.data);
    const size_t start = ovector[0], end = ovector[1];
    if (start == end && have_last && last_match_end == end) {
      // An empty match where the previous one ended: step over one character.
      if (search_from >= text.size()) break;
      next_code_point(text, search_from);
      continue;
    }
    matches.emplace_back(start, end);
    search_from = end;
    have_last = true;
    last_match_end = end;
  }
}

}  // namespace unswag::data::tok
