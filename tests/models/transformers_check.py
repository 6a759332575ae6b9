#!/usr/bin/env python3
"""Loads a checkpoint directory with transformers (eager attention, float32)
and compares its logits for the reference input ids with the reference logits.

Usage: transformers_check.py CHECKPOINT_DIR REFERENCE.safetensors [REL_TOL]
Exit status 0 when max relative error (||a-b|| / ||b||) <= REL_TOL (default 1e-4);
prints the error either way. The test that calls it (tests/models/test_model.cpp)
fails on a non-zero status.
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main():
    ckpt, ref_path = sys.argv[1], sys.argv[2]
    tol = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-4
    ref = load_file(ref_path)
    model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits.double()
    want = ref["logits"].double()
    err = ((logits - want).norm() / want.norm()).item()
    print(f"transformers logits of {ckpt}: relative error {err:.3e} (tolerance {tol:.1e})")
    sys.exit(0 if err <= tol else 1)


if __name__ == "__main__":
    main()
