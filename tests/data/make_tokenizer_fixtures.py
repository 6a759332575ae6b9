#!/usr/bin/env python3
# Trains the small byte-level BPE tokenizers in tests/fixtures/tokenizers/ with
# the Hugging Face `tokenizers` library, one per style of tokenizer.json that
# unswag::data::Tokenizer reads:
#   gpt2   ByteLevel pre-tokenizer (GPT-2 regex) + decoder, ByteLevel
#          post-processor, merges in the old "a b" string form, <|endoftext|>
#          inside the model vocabulary;
#   llama3 Split(Llama-3 regex, Isolated) + ByteLevel(use_regex=False),
#          ignore_merges, <|begin_of_text|>/<|end_of_text|> and other special
#          tokens after the vocabulary, Sequence[ByteLevel, TemplateProcessing]
#          post-processor adding BOS, merges as [a, b] pairs;
#   qwen2  NFC normaliser, Split(Qwen2 regex: single \p{N}) + ByteLevel,
#          <|endoftext|>, <|im_start|>, <|im_end|>.
# The layouts follow the published tokenizer.json files of GPT-2,
# Meta-Llama-3-8B and Qwen2; only the vocabulary is small (trained on the
# license texts every Debian machine has). Each style also gets a
# tokenizer_config.json naming its BOS/EOS strings as transformers writes them.
#
# Usage: make_tokenizer_fixtures.py [OUT_DIR]   (default: tests/fixtures/tokenizers)
import json
import os
import sys

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = [
    "/usr/share/common-licenses/GPL-3",
    "/usr/share/common-licenses/Apache-2.0",
    "/usr/share/common-licenses/GFDL-1.3",
    "/usr/share/common-licenses/MPL-2.0",
]
VOCAB_SIZE = 2000

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train(tokenizer, special_tokens):
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train(CORPUS, trainer)


def write_atomic(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def save(tokenizer, out_dir, edit_model, config):
    """Saves tokenizer.json after `edit_model` adjusts the model section the way
    the real files have it, then tokenizer_config.json."""
    os.makedirs(out_dir, exist_ok=True)
    data = json.loads(tokenizer.to_str())
    edit_model(data["model"])
    text = json.dumps(data, ensure_ascii=False, indent=2)
    # The edited file must still load, and encode as the edited settings say.
    Tokenizer.from_str(text)
    write_atomic(os.path.join(out_dir, "tokenizer.json"), text + "\n")
    write_atomic(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(config, indent=2) + "\n")


def byte_level(add_prefix_space, trim_offsets, use_regex):
    return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, trim_offsets=trim_offsets, use_regex=use_regex)


def make_gpt2(out_dir):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = byte_level(False, True, True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    train(tok, ["<|endoftext|>"])

    def edit(model):
        # GPT-2's file predates the pair form: merges are "a b" strings, and the
        # affixes are empty strings rather than null.
        model["merges"] = [f"{a} {b}" for a, b in model["merges"]]
        model["continuing_subword_prefix"] = ""
        model["end_of_word_suffix"] = ""

    save(tok, os.path.join(out_dir, "gpt2"), edit, {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_prefix_space": False,
    })


def make_llama3(out_dir):
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        byte_level(False, True, False),
    ])
    tok.decoder = decoders.ByteLevel()
    train(tok, [])
    # As in Llama 3, the special tokens sit after the vocabulary, outside it.
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens(specials)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
            special_tokens=[("<|begin_of_text|>", bos)],
        ),
    ])

    def edit(model):
        model["ignore_merges"] = True

    save(tok, os.path.join(out_dir, "llama3"), edit, {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "model_max_length": 131072,
    })


def make_qwen2(out_dir):
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        byte_level(False, False, False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    train(tok, [])
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])

    def edit(model):
        model["continuing_subword_prefix"] = ""
        model["end_of_word_suffix"] = ""

    # transformers' older files give tokens as AddedToken objects: keep one so
    # that form is read too.
    save(tok, os.path.join(out_dir, "qwen2"), edit, {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True},
        "pad_token": "<|endoftext|>",
    })


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "fixtures", "tokenizers")
    make_gpt2(out_dir)
    make_llama3(out_dir)
    make_qwen2(out_dir)
    for style in ("gpt2", "llama3", "qwen2"):
        path = os.path.join(out_dir, style, "tokenizer.json")
        tok = Tokenizer.from_file(path)
        print(f"{style}: {os.path.getsize(path)} bytes, vocab {tok.get_vocab_size(with_added_tokens=True)}")


if __name__ == "__main__":
    main()
