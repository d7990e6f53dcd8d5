#!/usr/bin/env python3
"""transformers' side of the end-to-end comparison (issue 5, benchmark 6c): greedy generation
tokens/s for the same prompts, chat template and new-token budget as `canopy bench acceptance`.

Configurations (each after a warm-up on the first prompt, timed per prompt with the GPU
synchronised, tokens/s = new tokens / wall time of generate(), prefill included):
  default         model.generate(), the default dynamic cache
  static_compile  a StaticCache of fixed length reused across prompts (so one graph serves all):
                  with a compileable cache on CUDA, generate() compiles the decoding forward with
                  torch.compile itself (generation_config.compile_config, default fullgraph=True,
                  mode="reduce-overhead"); two warm-up prompts pay the compilation
  assisted        model.generate(assistant_model=DRAFT): transformers' assisted generation
A configuration that fails is reported with its error and the others still run.

    python3 tools/bench_hf_generate.py --model DIR --draft DIR --prompts FILE.jsonl \
        [--max-new-tokens 128] [--max-prompts K] [--configs default,static_compile,assisted] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-prompts", type=int, default=0)
    ap.add_argument("--configs", default="default,static_compile,assisted")
    ap.add_argument("--json", default="")
    a = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = [json.loads(l)["prompt"] for l in open(a.prompts) if l.strip()]
    if a.max_prompts:
        prompts = prompts[: a.max_prompts]
    tok = AutoTokenizer.from_pretrained(a.model)
    dev = "cuda"
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).to(dev).eval()
    draft = AutoModelForCausalLM.from_pretrained(a.draft, dtype=torch.bfloat16).to(dev).eval()
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)["input_ids"].to(dev) for p in prompts]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}; "
          f"{len(ids)} prompts of {min(x.shape[1] for x in ids)}-{max(x.shape[1] for x in ids)} tokens, "
          f"{a.max_new_tokens} new tokens at most, greedy", flush=True)

    common = dict(max_new_tokens=a.max_new_tokens, do_sample=False, top_p=None, top_k=None, temperature=None)
    static = {}

    def run_default(x):
        return model.generate(x, attention_mask=torch.ones_like(x), **common)

    def run_static(x):
        if "cache" not in static:
            from transformers import StaticCache
            longest = max(y.shape[1] for y in ids) + a.max_new_tokens + 8
            static["cache"] = StaticCache(config=model.config, max_cache_len=longest)
        static["cache"].reset()
        return model.generate(x, attention_mask=torch.ones_like(x), past_key_values=static["cache"], **common)

    def run_assisted(x):
        return model.generate(x, attention_mask=torch.ones_like(x), assistant_model=draft, **common)

    runners = {"default": run_default, "static_compile": run_static, "assisted": run_assisted}
    results = {}
    for name in a.configs.split(","):
        try:
            t0 = time.perf_counter()
            warm = 2 if name == "static_compile" else 1
            for x in ids[:warm]:
                runners[name](x)
            torch.cuda.synchronize()
            warm_s = time.perf_counter() - t0
            n_new, secs, outs = 0, 0.0, []
            for x in ids:
                torch.cuda.synchronize()
                t = time.perf_counter()
                y = runners[name](x)
                torch.cuda.synchronize()
                secs += time.perf_counter() - t
                n_new += y.shape[1] - x.shape[1]
                outs.append(y[0, x.shape[1]:].tolist())
            results[name] = {"tokens_per_s": n_new / secs, "new_tokens": n_new, "seconds": secs, "warmup_s": warm_s,
                             "outputs": outs}
            print(f"{name:16s} {n_new / secs:9.2f} tok/s  ({n_new} tokens in {secs:.2f} s; warm-up {warm_s:.1f} s)",
                  flush=True)
        except Exception as e:  # one failing configuration must not hide the others
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name:16s} failed: {type(e).__name__}: {e}", flush=True)
    if "default" in results and "assisted" in results and "outputs" in results["assisted"]:
        same = sum(p == q for p, q in zip(results["default"]["outputs"], results["assisted"]["outputs"]))
        print(f"assisted output identical to default greedy in {same} of {len(ids)} prompts")
    if a.json:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                   "device": torch.cuda.get_device_name(), "n_prompts": len(ids),
                   "max_new_tokens": a.max_new_tokens, "results": results}, open(a.json, "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
