"""`unswag train` through the command line: bad arguments exit non-zero with a
message naming the problem; a tiny from-scratch run writes a final checkpoint
that transformers loads and that gives the losses and greedy tokens unswag
gives; the byte tokenizer loads in `tokenizers`; a run paused and resumed
repeats the uninterrupted run's metrics exactly; Ctrl-C saves a resumable
checkpoint (exit 130); SIGKILL during checkpointing leaves the latest
checkpoint loadable."""
import json
import os
import pathlib
import signal
import struct
import subprocess
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
LIB = pathlib.Path(os.environ.get("UNSWAG_LIBRARY", str(ROOT / "build" / "libunswag.so")))
CLI = LIB.parent / "unswag"
CORPUS = ROOT / "data" / "corpus" / "devils_dictionary.txt"
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TINY_NO_CONTEXT = ["--from-scratch", "--hidden", "64", "--layers", "2", "--batch", "4", "--lr", "1e-2", "--warmup", "2",
                   "--quiet", "--device", "cpu"]
TINY = TINY_NO_CONTEXT + ["--context", "32"]


def run(args, **kw):
    return subprocess.run([str(CLI)] + [str(a) for a in args], capture_output=True, text=True, env=ENV, **kw)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_bytes(CORPUS.read_bytes()[:30000])
    return path


def read_shard(path):
    data = path.read_bytes()
    assert data[:8] == b"UNSWAGTK"
    _, header, token_bytes, _ = struct.unpack_from("<IIII", data, 8)
    return np.frombuffer(data, dtype=np.uint16 if token_bytes == 2 else np.uint32, offset=header).astype(np.int64)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_bad_arguments(tmp_path, text):
    cases = [
        (["train", "--model", "/nonexistent/model", "--data", text, "--out", tmp_path / "a"], "/nonexistent/model"),
        (["train"] + TINY + ["--data", "/nonexistent.txt", "--out", tmp_path / "b"], "/nonexistent.txt"),
        (["train"] + TINY_NO_CONTEXT + ["--context", "100000", "--data", text, "--out", tmp_path / "c"],
         "context 100000 is longer than the data"),
        (["train"] + TINY + ["--data", text, "--out", tmp_path / "d", "--bogus", "1"], "--bogus"),
        (["train", "--data", text, "--out", tmp_path / "e"], "--from-scratch"),
        (["train"] + TINY + ["--data", text, "--out", tmp_path / "f", "--optimizer", "sgd"], "--optimizer"),
        (["bench", "--model", "/nonexistent", "--context", "8"], "/nonexistent"),
    ]
    for args, fragment in cases:
        out = run(args)
        assert out.returncode != 0, (args, out.stdout)
        assert fragment in out.stderr + out.stdout, (args, out.stderr)


def test_tiny_run_loads_in_transformers(tmp_path, text):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    out_dir = tmp_path / "out"
    res = run(["train"] + TINY + ["--steps", "12", "--data", text, "--out", out_dir, "--eval-every", "6",
                                  "--eval-batches", "2", "--log-every", "1", "--optimizer", "adamw"])
    assert res.returncode == 0, res.stderr
    m = metrics(out_dir)
    assert [r["step"] for r in m] == list(range(1, 13))
    assert m[-1]["loss"] < m[0]["loss"] - 1.0
    assert "eval_loss" in m[5] and "eval_loss" in m[11]
    assert (out_dir / "loss.svg").read_text().startswith("<svg")
    final = out_dir / "final"

    # The byte tokenizer: tokenizers gives one id per byte and round-trips.
    tok = tokenizers.Tokenizer.from_file(str(final / "tokenizer.json"))
    sample = "ABSURDITY, n. caf\u00e9 \u20ac\n\tx"
    assert tok.encode(sample).ids == list(sample.encode())
    assert tok.decode(tok.encode(sample).ids) == sample
    assert transformers.AutoTokenizer.from_pretrained(str(final)).eos_token == "<|endoftext|>"

    # transformers' loss on the held-out windows unswag evaluated (the first
    # 2 x 4 windows of 32 + 1 tokens of the eval shard, in order) equals the
    # eval_loss unswag logged for the final model.
    model = transformers.AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32).eval()
    stream = torch.from_numpy(read_shard(out_dir / "data" / "eval_000000.bin"))
    windows = torch.stack([stream[w * 32: w * 32 + 33] for w in range(8)])
    with torch.no_grad():
        logits = model(windows[:, :32]).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                                                windows[:, 1:].reshape(-1)).item()
    assert abs(hf_loss - m[-1]["eval_loss"]) < 1e-4 * hf_loss, (hf_loss, m[-1]["eval_loss"])

    # Greedy continuation: unswag generate and transformers agree token for token.
    prompt = list(b"LOVE, n. ")
    res = run(["generate", "--model", final, "--prompt-ids"] + prompt + ["--max-new-tokens", "12"])
    assert res.returncode == 0, res.stderr
    ours = [int(t) for t in res.stdout.split()]
    with torch.no_grad():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=256,
                             pad_token_id=256)[0, len(prompt):].tolist()
    if 256 in ids:
        ids = ids[:ids.index(256) + 1]
    assert ours == ids


def test_pause_and_resume_repeat_the_uninterrupted_run(tmp_path, text):
    common = ["train"] + TINY + ["--steps", "8", "--data", text, "--log-every", "1", "--grad-accum", "2"]
    res = run(common + ["--out", tmp_path / "a"])
    assert res.returncode == 0, res.stderr
    res = run(common + ["--out", tmp_path / "b", "--stop-after", "3"])
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "b" / "checkpoint-3" / "trainer_state.json").exists()
    assert not (tmp_path / "b" / "final").exists()
    res = run(common + ["--out", tmp_path / "b", "--resume", "latest"])
    assert res.returncode == 0, res.stderr
    strip = lambda rows: [{k: v for k, v in r.items() if k in ("step", "loss", "lr", "grad_norm", "tokens")}
                          for r in rows]
    assert strip(metrics(tmp_path / "b")) == strip(metrics(tmp_path / "a"))


def test_ctrl_c_saves_and_sigkill_leaves_a_loadable_checkpoint(tmp_path, text):
    transformers = pytest.importorskip("transformers")
    out_dir = tmp_path / "out"
    args = ["train"] + TINY + ["--steps", "100000", "--data", text, "--out", out_dir, "--log-every", "1",
                               "--save-every", "1", "--keep", "2"]
    # SIGINT after a few updates: the update finishes, a checkpoint is saved, exit 130.
    proc = subprocess.Popen([str(CLI)] + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out_dir / "checkpoint-3").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "checkpoint-" in err
    # SIGKILL while it saves every update: whatever moment it dies at, the
    # newest checkpoint-N is complete and loads in transformers.
    proc = subprocess.Popen([str(CLI)] + [str(a) for a in args + ["--resume", "latest"]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    time.sleep(1.5)
    proc.kill()
    proc.wait()
    steps = sorted(int(p.name.split("-")[1]) for p in out_dir.glob("checkpoint-*"))
    assert steps, list(out_dir.iterdir())
    latest = out_dir / f"checkpoint-{steps[-1]}"
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == steps[-1]
    transformers.AutoModelForCausalLM.from_pretrained(str(latest))
    res = run(["train"] + TINY + ["--steps", str(steps[-1] + 1), "--data", text, "--out", out_dir,
                                  "--resume", "latest"])
    assert res.returncode == 0, res.stderr
    assert (out_dir / "final" / "model.safetensors").exists()
