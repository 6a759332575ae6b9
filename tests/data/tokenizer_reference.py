#!/usr/bin/env python3
# Reference side of tests/data/test_tokenizer.cpp: runs the Hugging Face
# `tokenizers` library on the requests the C++ test writes and writes back
# what it gives, so that the test compares unswag::data::Tokenizer with it.
#
# Usage: tokenizer_reference.py REQUEST.json RESPONSE.json
# REQUEST:  {"tokenizers": {name: path of a tokenizer.json},
#            "encode": [[name, text], ...], "decode": [[name, [ids]], ...],
#            "info": [name, ...]}
# RESPONSE: {"encode": [[ids with special tokens], [ids without]], ...],
#            "decode": [[text keeping special tokens, text skipping them], ...],
#            "info": {name: {"vocab_size": n, "vocab": {token: id},
#                            "tokens": [id_to_token(id) or null for ids 0..max+1]}}}
import json
import os
import sys

from tokenizers import Tokenizer


def main():
    request_path, response_path = sys.argv[1], sys.argv[2]
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    tokenizers = {name: Tokenizer.from_file(path) for name, path in request.get("tokenizers", {}).items()}
    response = {"encode": [], "decode": [], "info": {}}
    for name, text in request.get("encode", []):
        tok = tokenizers[name]
        response["encode"].append([
            tok.encode(text, add_special_tokens=True).ids,
            tok.encode(text, add_special_tokens=False).ids,
        ])
    for name, ids in request.get("decode", []):
        tok = tokenizers[name]
        # (The Python binding's default is skip_special_tokens=True: pass both explicitly.)
        response["decode"].append([tok.decode(ids, skip_special_tokens=False), tok.decode(ids, skip_special_tokens=True)])
    for name in request.get("info", []):
        tok = tokenizers[name]
        vocab = tok.get_vocab(with_added_tokens=True)
        response["info"][name] = {"vocab_size": tok.get_vocab_size(with_added_tokens=True), "vocab": vocab,
                                  "tokens": [tok.id_to_token(i) for i in range(max(vocab.values()) + 2)]}
    tmp = f"{response_path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(response, f)
    os.replace(tmp, response_path)


if __name__ == "__main__":
    main()
