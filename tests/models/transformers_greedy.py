#!/usr/bin/env python3
"""Greedy continuation with transformers (float32, eager attention), the
reference for unswag::generate: argmax of the last position's logits, N times.

Usage: transformers_greedy.py CHECKPOINT_DIR N ID [ID ...]   -> prints the N new ids
"""
import sys

import torch
from transformers import AutoModelForCausalLM


def main():
    ckpt, n, prompt = sys.argv[1], int(sys.argv[2]), [int(t) for t in sys.argv[3:]]
    model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager", dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    print(" ".join(map(str, out)))


if __name__ == "__main__":
    main()
