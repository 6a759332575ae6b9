// `unswag tokenize`: text files / JSONL (a "text" field) through a Hugging
// Face tokenizer.json into UnSwag token shards for the streaming loader
// (docs/data.md), with a progress line (MB/s, tokens/s) on a terminal.
#include <fmt/core.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>

#include "cli/commands.h"
#include "unswag/data/shards.h"
#include "unswag/data/tokenizer.h"

namespace unswag::cli {

void add_tokenize_options(CLI::App& cmd, TokenizeOptions& o) {
  cmd.add_option("inputs", o.inputs, "text or .jsonl files, directories or globs")->required();
  cmd.add_option("--tokenizer", o.tokenizer, "tokenizer.json, or a directory holding it")->required();
  cmd.add_option("--out", o.out_prefix, "output prefix: writes PREFIX_000000.bin, ...")->required();
  cmd.add_option("--format", o.format, "auto (.jsonl/.ndjson are JSONL) | text | jsonl")
      ->check(CLI::IsMember({"auto", "text", "jsonl"}));
  cmd.add_option("--text-field", o.text_field, "the JSONL field holding each document");
  cmd.add_flag("--paragraphs", o.paragraphs, "blank-line-separated paragraphs of text files are documents");
  cmd.add_option("--shard-tokens", o.shard_tokens, "tokens per shard at most")->check(CLI::PositiveNumber);
  cmd.add_flag("--overwrite", o.overwrite, "replace existing shards with this prefix");
}

int run_tokenize(const TokenizeOptions& o) {
  const auto tok = data::Tokenizer::from_file(o.tokenizer);
  const auto eos = tok.eos_id();
  if (!eos) {
    fmt::print(stderr, "unswag tokenize: {} defines no EOS token (tokenizer_config.json eos_token), needed to "
                       "separate documents\n", o.tokenizer);
    return 2;
  }
  data::CorpusOptions c;
  c.input_format = o.format == "text" ? data::InputFormat::kText
                   : o.format == "jsonl" ? data::InputFormat::kJsonl : data::InputFormat::kAuto;
  c.text_field = o.text_field;
  c.text_documents = o.paragraphs ? data::TextDocuments::kPerParagraph : data::TextDocuments::kPerFile;
  c.vocab_size = tok.vocab_size();
  c.max_shard_tokens = o.shard_tokens;
  c.overwrite = o.overwrite;
  const bool tty = isatty(fileno(stderr));
  const auto start = std::chrono::steady_clock::now();
  c.progress_every_bytes = 1 << 20;
  c.progress = [&](const data::CorpusProgress& p) {
    if (!tty && !p.done) return;
    const double s = std::max(1e-9, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    const double frac = p.bytes_total > 0 ? double(p.bytes_read) / double(p.bytes_total) : 1.0;
    fmt::print(stderr, "{}tokenize {:5.1f}% {:.2f}/{:.2f} MB  {} docs  {} tokens  {:.2f} MB/s  {:.0f} tok/s{}",
               tty ? "\r" : "", 100 * frac, p.bytes_read / 1e6, p.bytes_total / 1e6, p.documents, p.tokens,
               p.bytes_read / 1e6 / s, p.tokens / s, p.done ? "\n" : "");
  };
  const auto eos_id = *eos;
  const data::CorpusStats stats = data::write_corpus_shards(
      o.inputs, [&](std::string_view text) { return tok.encode(text, /*add_special_tokens=*/false); }, eos_id,
      o.out_prefix, c);
  fmt::print("wrote {} shard(s), {} tokens ({} documents, {} empty skipped), EOS id {}:\n", stats.shards.size(),
             stats.tokens, stats.documents, stats.empty_documents, eos_id);
  for (const auto& s : stats.shards) fmt::print("  {}\n", s);
  return 0;
}

}  // namespace unswag::cli
