"""Independent reference for the token-shard tests (called by
tests/data/test_shards.cpp through UNSWAG_PYTHON): reads an UnSwag shard with
numpy following the table in docs/data.md, then writes the same tokens as
llm.c shards the way llm.c's dev/data/data_common.py does (an int32 header of
256 values, then the tokens as uint16 or uint32) and as a nanoGPT .bin
(np.uint16 tofile).

Usage: shard_reference.py UNSWAG_SHARD OUT_PREFIX
Prints: eos_id document_count eos_tokens_counted token_count
"""
import sys

import numpy as np


def read_unswag(path):
    raw = open(path, "rb").read()
    assert raw[:8] == b"UNSWAGTK", raw[:8]
    version, header_size, token_bytes, eos = (int(v) for v in np.frombuffer(raw, dtype="<u4", count=4, offset=8))
    count, documents = (int(v) for v in np.frombuffer(raw, dtype="<u8", count=2, offset=24))
    assert version == 1 and header_size == 256, (version, header_size)
    assert raw[40:header_size] == bytes(header_size - 40), "reserved bytes must be zero"
    tokens = np.frombuffer(raw, dtype={2: "<u2", 4: "<u4"}[token_bytes], offset=header_size)
    assert len(tokens) == count and len(raw) == header_size + count * token_bytes
    return tokens, eos, documents


def write_llmc(path, tokens, version):
    header = np.zeros(256, dtype=np.int32)
    header[0] = 20240520 if version == 1 else 20240801
    header[1] = version
    header[2] = len(tokens)
    body = np.array(tokens, dtype=np.uint16 if version == 1 else np.uint32)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(body.tobytes())


def main():
    tokens, eos, documents = read_unswag(sys.argv[1])
    out = sys.argv[2]
    write_llmc(out + "_llmc1.bin", tokens, 1)
    write_llmc(out + "_llmc7.bin", tokens, 7)
    tokens.astype(np.uint16).tofile(out + "_nanogpt.bin")
    print(eos, documents, int((tokens == eos).sum()), len(tokens))


if __name__ == "__main__":
    main()
