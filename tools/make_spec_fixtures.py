#!/usr/bin/env python3
"""Tiny target and draft models with an 8-token vocabulary, for testing that speculative sampling
through the whole engine is distributed exactly as target-only sampling (tests/test_spec_exact.c).
A vocabulary this small keeps the joint distribution of three tokens at 512 cells, so a
chi-square test over 100,000 samples has power. The draft shares the vocabulary but not the
weights, so it disagrees with the target often (every branch of the acceptance rule is taken).

usage: python tools/make_spec_fixtures.py [--out tests/fixtures/models]
"""
import argparse
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def make(path, seed, layers):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=7)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            # Large weights make peaked, position-dependent distributions (not near-uniform ones).
            p.normal_(0.0, 0.6)
    model.save_pretrained(path)
    print("wrote", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "models"))
    a = ap.parse_args()
    make(os.path.join(a.out, "spec_v8_target"), 1234, 2)
    make(os.path.join(a.out, "spec_v8_draft"), 5678, 1)


if __name__ == "__main__":
    main()
