// Data preparation for the trainer: a byte-level tokenizer and a small Llama
// config for training from scratch, and the step that turns the user's
// --data (text, JSONL or token shards) into training and held-out shards.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "unswag/models/config.h"

namespace unswag::train {

// Writes dir/tokenizer.json and dir/tokenizer_config.json: byte-level BPE
// with the 256 byte tokens (id = byte value, spelled with GPT-2's
// byte-to-unicode map) and no merges, so every byte is one token and every
// text round-trips; plus "<|endoftext|>" (id 256) as the special EOS / BOS
// token. Both unswag::data::Tokenizer and the `tokenizers` library read it.
void write_byte_tokenizer(const std::string& dir);
constexpr int64_t kByteTokenizerVocab = 257;

// A small Llama (SwiGLU, RoPE, untied head) for byte-level training from
// scratch: vocab 257 rounded up to 264 (a multiple of 8), hidden `hidden`,
// `layers` layers of `hidden / 64` heads of 64, intermediate 8/3 hidden
// rounded to 32, context `context`; EOS/BOS = 256.
models::ModelConfig small_llama_config(int64_t hidden = 256, int64_t layers = 4, int64_t context = 256);

struct PreparedData {
  std::vector<std::string> train, eval;  // shard paths
  int64_t train_tokens = 0, eval_tokens = 0;
  bool reused = false;  // an earlier preparation with the same inputs was found
};

// `inputs`: token shards (.bin files or directories of them) are used as they
// are (no eval split; pass eval shards separately). Text and JSONL files are
// tokenised with `tokenizer` (tokenizer.json or its directory, which must
// define an EOS) into out_dir/train_000000.bin..., with the last
// `eval_fraction` of the token stream written to out_dir/eval_000000.bin
// instead. A manifest (out_dir/manifest.json) records the inputs' sizes and
// times; a second call with the same inputs reuses the shards.
PreparedData prepare_data(const std::vector<std::string>& inputs, const std::string& tokenizer,
                          const std::string& out_dir, double eval_fraction = 0.05, bool quiet = false);

}  // namespace unswag::train
