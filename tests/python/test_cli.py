"""The `unswag` command line: `unswag tokenize` writes shards whose tokens are
exactly what the `tokenizers` library gives for each document, each followed
by EOS (shard layout: docs/data.md); bad arguments exit non-zero with a message."""
import os
import pathlib
import struct
import subprocess

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
LIB = pathlib.Path(os.environ.get("UNSWAG_LIBRARY", str(ROOT / "build" / "libunswag.so")))
CLI = LIB.parent / "unswag"
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizers" / "llama3"


def read_shard(path):
    data = path.read_bytes()
    assert data[:8] == b"UNSWAGTK"
    version, header, token_bytes, eos = struct.unpack_from("<IIII", data, 8)
    count, docs = struct.unpack_from("<QQ", data, 24)
    assert version == 1 and len(data) == header + count * token_bytes
    return np.frombuffer(data, dtype=np.uint16 if token_bytes == 2 else np.uint32, offset=header), eos, docs


def test_tokenize_matches_tokenizers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    inputs = [pathlib.Path("/usr/share/common-licenses/GPL-3"), ROOT / "README.md"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "Hello world, ünïcödé \\n\\t and digits 12345."}\n{"text": "Second doc\'s text"}\n')
    inputs.append(jsonl)
    out = subprocess.run([str(CLI), "tokenize", "--tokenizer", str(TOKENIZER), "--out", str(tmp_path / "s")]
                         + [str(p) for p in inputs], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    tokens, eos, docs = read_shard(tmp_path / "s_000000.bin")
    tok = tokenizers.Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    texts = [inputs[0].read_text(), inputs[1].read_text(), "Hello world, ünïcödé \n\t and digits 12345.",
             "Second doc's text"]
    want = []
    for t in texts:
        want += tok.encode(t, add_special_tokens=False).ids + [eos]
    assert docs == 4
    assert tokens.tolist() == want


def test_tokenize_bad_arguments(tmp_path):
    for args, fragment in [(["--tokenizer", "/nonexistent", "--out", str(tmp_path / "x"), str(ROOT / "README.md")],
                            "does not exist"),
                           (["--tokenizer", str(TOKENIZER), "--out", str(tmp_path / "x"), "/nonexistent.txt"],
                            "nonexistent.txt"),
                           (["--tokenizer", str(TOKENIZER), "--out", str(tmp_path / "x"), "--bogus", "a"], "bogus")]:
        out = subprocess.run([str(CLI), "tokenize"] + args, capture_output=True, text=True)
        assert out.returncode != 0
        assert fragment in out.stderr + out.stdout, out.stderr


def test_inspect_and_generate():
    fixture = ROOT / "tests" / "fixtures" / "models" / "llama"
    out = subprocess.run([str(CLI), "inspect", str(fixture), "--context", "4096"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "parameters 119104" in out.stdout and "lean, full recompute" in out.stdout
    out = subprocess.run([str(CLI), "generate", "--model", str(fixture), "--prompt-ids", "5", "77", "191",
                          "--max-new-tokens", "4"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ids = [int(t) for t in out.stdout.split()]
    assert 1 <= len(ids) <= 4 and all(0 <= t < 256 for t in ids)
    out = subprocess.run([str(CLI), "inspect", "/nonexistent"], capture_output=True, text=True)
    assert out.returncode != 0 and "/nonexistent" in out.stderr
    out = subprocess.run([str(CLI), "generate", "--model", str(fixture)], capture_output=True, text=True)
    assert out.returncode != 0 and "--prompt" in out.stderr
