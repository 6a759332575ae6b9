// Data preparation for the trainer: the byte-level tokenizer and the small
// Llama config of from-scratch training, and --data turned into training and
// held-out token shards (see unswag/train/data.h).
#include "unswag/train/data.h"

#include <c10/util/Exception.h>
#include <fmt/core.h>
#include <sys/stat.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "models/file_io.h"
#include "train/train_fs.h"
#include "unswag/data/shards.h"
#include "unswag/data/tokenizer.h"

namespace unswag::train {

namespace {

using Json = nlohmann::json;

// GPT-2's byte -> code point map: printable Latin-1 bytes map to themselves,
// the other 68 bytes to U+0100 onwards, so every byte is a visible character.
std::vector<uint32_t> byte_to_codepoint() {
  std::vector<uint32_t> map(256, 0);
  std::vector<bool> direct(256, false);
  for (int b = '!'; b <= '~'; ++b) direct[b] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
  uint32_t next = 256;
  for (int b = 0; b < 256; ++b) map[b] = direct[b] ? uint32_t(b) : next++;
  return map;
}

std::string utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += char(cp);
  } else if (cp < 0x800) {
    s += char(0xC0 | (cp >> 6));
    s += char(0x80 | (cp & 0x3F));
  } else {
    s += char(0xE0 | (cp >> 12));
    s += char(0x80 | ((cp >> 6) & 0x3F));
    s += char(0x80 | (cp & 0x3F));
  }
  return s;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// A directory of .bin files or a .bin file: token shards.
bool is_shard_input(const std::string& path) {
  if (fs::is_dir(path)) {
    for (const auto& n : fs::list_dir(path)) {
      if (ends_with(n, ".bin")) return true;
    }
    return false;
  }
  return ends_with(path, ".bin");
}

Json describe_file(const std::string& path) {
  struct stat st {};
  TORCH_CHECK(::stat(path.c_str(), &st) == 0, "data: ", path, " does not exist");
  return {{"path", fs::absolute(path)}, {"size", int64_t(st.st_size)}, {"mtime", int64_t(st.st_mtime)}};
}

}  // namespace

void write_byte_tokenizer(const std::string& dir) {
  io::make_dirs(dir);
  const auto map = byte_to_codepoint();
  Json vocab = Json::object();
  for (int b = 0; b < 256; ++b) vocab[utf8(map[b])] = b;
  const Json added = Json::array({{{"id", 256},
                                   {"content", "<|endoftext|>"},
                                   {"single_word", false},
                                   {"lstrip", false},
                                   {"rstrip", false},
                                   {"normalized", false},
                                   {"special", true}}});
  const Json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true},
                           {"use_regex", true}};
  const Json tokenizer = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer", byte_level},
      {"post_processor", nullptr},
      {"decoder", byte_level},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"ignore_merges", false},
        {"vocab", vocab},
        {"merges", Json::array()}}},
  };
  const Json config = {{"tokenizer_class", "PreTrainedTokenizerFast"},
                       {"bos_token", "<|endoftext|>"},
                       {"eos_token", "<|endoftext|>"},
                       {"model_max_length", 1 << 20},
                       {"clean_up_tokenization_spaces", false}};
  io::write_text_atomic(io::join(dir, "tokenizer.json"), tokenizer.dump(1) + "\n");
  io::write_text_atomic(io::join(dir, "tokenizer_config.json"), config.dump(1) + "\n");
}

models::ModelConfig small_llama_config(int64_t hidden, int64_t layers, int64_t context) {
  TORCH_CHECK(hidden >= 64 && hidden % 64 == 0, "small_llama_config: hidden must be a positive multiple of 64 "
              "(heads of 64), got ", hidden);
  TORCH_CHECK(layers >= 1, "small_llama_config: layers must be >= 1, got ", layers);
  TORCH_CHECK(context >= 1, "small_llama_config: context must be >= 1, got ", context);
  models::ModelConfig c;
  c.model_type = "llama";
  c.architecture = "LlamaForCausalLM";
  c.vocab_size = (kByteTokenizerVocab + 7) / 8 * 8;  // 264: a multiple of 8 for the matmuls
  c.hidden_size = hidden;
  // SwiGLU's usual 8/3 h, rounded up to a multiple of 32.
  c.intermediate_size = (8 * hidden / 3 + 31) / 32 * 32;
  c.num_hidden_layers = layers;
  c.num_attention_heads = hidden / 64;
  c.num_key_value_heads = hidden / 64;
  c.head_dim = 64;
  c.hidden_act = "silu";
  c.max_position_embeddings = context;
  c.rms_norm_eps = 1e-5;
  c.rope.type = "default";
  c.rope.theta = 10000.0;
  c.tie_word_embeddings = false;
  c.dtype = c10::ScalarType::Float;
  c.bos_token_ids = {kByteTokenizerVocab - 1};
  c.eos_token_ids = {kByteTokenizerVocab - 1};
  c.validate("small_llama_config");
  return c;
}

PreparedData prepare_data(const std::vector<std::string>& inputs, const std::string& tokenizer,
                          const std::string& out_dir, double eval_fraction, bool quiet) {
  TORCH_CHECK(!inputs.empty(), "data: no input given (--data PATH: text, .jsonl, or token shards)");
  TORCH_CHECK(eval_fraction >= 0 && eval_fraction < 1, "data: eval_fraction must be in [0, 1), got ", eval_fraction);
  size_t shard_inputs = 0;
  for (const auto& p : inputs) {
    TORCH_CHECK(io::exists(p), "data: ", p, " does not exist");
    shard_inputs += is_shard_input(p) ? 1 : 0;
  }
  PreparedData out;
  if (shard_inputs > 0) {
    TORCH_CHECK(shard_inputs == inputs.size(), "data: give either token shards (.bin, or directories of them) or "
                "text / JSONL files, not both");
    out.train = data::expand_inputs(inputs, "data");
    for (const auto& p : out.train) out.train_tokens += data::TokenShard::open(p).num_tokens();
    return out;
  }

  TORCH_CHECK(!tokenizer.empty(), "data: ", inputs[0], " is text, so a tokenizer is needed (--model DIR with a "
              "tokenizer.json, or --tokenizer PATH)");
  const auto tok = data::Tokenizer::from_file(tokenizer);
  const auto eos = tok.eos_id();
  TORCH_CHECK(eos.has_value(), "data: tokenizer ", tok.path(), " defines no EOS token (tokenizer_config.json "
              "eos_token), needed to separate documents");

  Json manifest = {{"format", "unswag.prepared_data"}, {"version", 1}, {"eval_fraction", eval_fraction},
                   {"tokenizer", describe_file(tok.path())}, {"inputs", Json::array()}};
  for (const auto& f : data::expand_inputs(inputs, "data", "")) manifest["inputs"].push_back(describe_file(f));
  const std::string manifest_path = io::join(out_dir, "manifest.json");
  if (io::exists(manifest_path)) {
    try {
      const Json old = Json::parse(fs::read_file(manifest_path));
      if (old.at("format") == manifest.at("format") && old.at("inputs") == manifest.at("inputs") &&
          old.at("tokenizer") == manifest.at("tokenizer") && old.at("eval_fraction") == manifest.at("eval_fraction")) {
        out.train = old.at("train").get<std::vector<std::string>>();
        out.eval = old.at("eval").get<std::vector<std::string>>();
        out.train_tokens = old.at("train_tokens").get<int64_t>();
        out.eval_tokens = old.at("eval_tokens").get<int64_t>();
        bool present = true;
        for (const auto& p : out.train) present = present && io::exists(p);
        for (const auto& p : out.eval) present = present && io::exists(p);
        if (present) {
          out.reused = true;
          return out;
        }
      }
    } catch (const Json::exception&) {
      // An unreadable manifest: prepare again.
    }
  }

  io::make_dirs(out_dir);
  ::unlink(manifest_path.c_str());
  for (const auto& n : fs::list_dir(out_dir)) {
    if (ends_with(n, ".bin")) ::unlink(io::join(out_dir, n).c_str());
  }
  data::CorpusOptions c;
  c.vocab_size = tok.vocab_size();
  c.overwrite = true;
  const std::string all_prefix = io::join(out_dir, "all");
  const auto stats = data::write_corpus_shards(
      inputs, [&](std::string_view text) { return tok.encode(text, /*add_special_tokens=*/false); }, *eos, all_prefix,
      c);
  out.eval_tokens = int64_t(double(stats.tokens) * eval_fraction);
  out.train_tokens = stats.tokens - out.eval_tokens;

  // The stream's first train_tokens tokens become the training shards, the
  // rest the held-out ones (cut mid-document where it falls).
  const int64_t max_shard = c.max_shard_tokens;
  std::vector<data::TokenShard> all;
  for (const auto& p : stats.shards) all.push_back(data::TokenShard::open(p));
  size_t shard = 0;
  int64_t offset = 0;
  std::vector<int64_t> buf;
  std::vector<int32_t> buf32;
  auto copy_out = [&](int64_t count, const std::string& prefix, std::vector<std::string>& paths) {
    int64_t index = 0;
    while (count > 0) {
      const std::string path = data::shard_path(prefix, index++);
      data::ShardWriter w(path, stats.dtype, *eos);
      int64_t in_shard = 0;
      while (count > 0 && in_shard < max_shard) {
        while (offset == all[shard].num_tokens()) ++shard, offset = 0;
        const int64_t n = std::min({count, all[shard].num_tokens() - offset, max_shard - in_shard, int64_t(1) << 20});
        buf.resize(size_t(n));
        all[shard].copy_tokens(offset, n, buf.data());
        buf32.assign(buf.begin(), buf.end());
        w.append(buf32);
        offset += n, count -= n, in_shard += n;
      }
      w.close();
      paths.push_back(path);
    }
  };
  copy_out(out.train_tokens, io::join(out_dir, "train"), out.train);
  copy_out(out.eval_tokens, io::join(out_dir, "eval"), out.eval);
  all.clear();
  for (const auto& p : stats.shards) ::unlink(p.c_str());

  manifest["train"] = out.train;
  manifest["eval"] = out.eval;
  manifest["train_tokens"] = out.train_tokens;
  manifest["eval_tokens"] = out.eval_tokens;
  io::write_text_atomic(manifest_path, manifest.dump(1) + "\n");
  if (!quiet) {
    fmt::print(stderr, "data: {} tokens from {} input(s): {} for training, {} held out for eval ({})\n", stats.tokens,
               inputs.size(), out.train_tokens, out.eval_tokens, out_dir);
  }
  return out;
}

}  // namespace unswag::train
