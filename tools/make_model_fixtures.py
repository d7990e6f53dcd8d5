#!/usr/bin/env python3
"""Writes tiny random Hugging Face models of every supported architecture, with the logits that
transformers computes for them, into tests/fixtures/models/<name>/.

Each folder holds config.json, the safetensors weights (single file, or shards with
model.safetensors.index.json) and expected.json:

    {"input_ids": [20 ids], "positions": [0..19], "logits": [[vocab floats] x 20], ...}

the full-sequence causal forward of transformers (float32, eager attention), rounded to 7
significant digits. The weights are random with large spreads (not HF's std 0.02 init) and the
RMSNorm weights are not all ones, so that any mistake in the forward shows in the logits.

config.json is written in the classic Hugging Face layout that checkpoints on the Hub use
(rope_theta / rope_scaling / torch_dtype, not transformers 5's rope_parameters), and the expected
logits come from the model as transformers re-loads it from that folder, so they are what
transformers makes of exactly these files.

    python tools/make_model_fixtures.py [--out tests/fixtures/models]

Needs torch and transformers (tools/requirements-fixtures.txt). Deterministic for a given
torch/transformers version.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
N_TOKENS = 20
SEED = 1234

# name -> classic config.json fields (architectures/model_type decide the class).
COMMON = {"hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
          "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
          "bos_token_id": 1, "eos_token_id": 2}

SPECS = {
    # Llama 2 style: untied lm_head, GQA 4:2.
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 384,
              "intermediate_size": 160, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
              "tie_word_embeddings": False, "pretraining_tp": 1},
    # Llama 3.1 style rope scaling. original_max_position_embeddings 64 puts rotary pair 1
    # (wavelength ~32) in the smoothed band and pairs 2.. (wavelength > 64) in the divided-by-8
    # band, so both branches of the llama3 formula matter within 20 positions.
    "llama3": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 320,
               "intermediate_size": 128, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
               "rope_theta": 500000.0,
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64, "rope_type": "llama3"},
               "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
               "pretraining_tp": 1, "eos_token_id": [2, 3]},
    # Mistral: sliding window 8 over 20 tokens (transformers: query i sees keys j with
    # i - j < sliding_window, i.e. itself and the 7 before it); head_dim 32 != hidden/heads (16),
    # as in Mistral-Nemo, so q_proj is 64 -> 128.
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 300,
                "intermediate_size": 160, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
                "rope_theta": 1000000.0, "sliding_window": 8, "head_dim": 32,
                "tie_word_embeddings": False},
    # Qwen2: q/k/v biases (o_proj has none). use_sliding_window is false as in the released Qwen2
    # checkpoints, so sliding_window (set small here) must be ignored: full causal attention.
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 352,
              "intermediate_size": 160, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
              "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": 6,
              "max_window_layers": 2, "tie_word_embeddings": False},
    # SmolLM2: Llama with tied embeddings (no lm_head.weight in the file) and GQA 6:2 (ratio 3,
    # like SmolLM2-135M's 9:3).
    "smollm2": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256,
                "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2,
                "intermediate_size": 160, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
                "rope_theta": 100000.0, "rope_scaling": None, "attention_bias": False,
                "mlp_bias": False, "tie_word_embeddings": True, "pretraining_tp": 1,
                "pad_token_id": 2},
}

# Variants of "llama": same weights, another dtype on disk, or sharded.
VARIANTS = {"llama_bf16": ("llama", torch.bfloat16, None),
            "llama_f16": ("llama", torch.float16, None),
            "llama_sharded": ("llama", torch.float32, "200KB")}

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def classic_config(name: str, dtype: torch.dtype) -> dict:
    cfg = dict(COMMON)
    cfg.update(SPECS[name])
    cfg["torch_dtype"] = DTYPE_NAMES[dtype]
    cfg["transformers_version"] = transformers.__version__
    return dict(sorted(cfg.items()))


def write_config(folder: Path, cfg: dict) -> None:
    with open(folder / "config.json", "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Large, reproducible random weights: embeddings N(0, 1) (tied: as a linear layer), linear weights
    N(0, (1.5 / sqrt(fan_in))^2), biases N(0, 0.5^2), norm weights U(0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    tied = bool(model.config.tie_word_embeddings)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "norm" in pname:
                v = 0.5 + torch.rand(p.shape, generator=g)
            elif pname.endswith(".bias"):
                v = 0.5 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in pname and not tied:
                v = torch.randn(p.shape, generator=g)
            elif "embed_tokens" in pname:  # also the lm_head: keep the logits moderate
                v = torch.randn(p.shape, generator=g) * (1.5 / p.shape[1] ** 0.5)
            else:
                v = torch.randn(p.shape, generator=g) * (1.5 / p.shape[1] ** 0.5)
            p.copy_(v.to(p.dtype))


def load(folder: Path) -> torch.nn.Module:
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return m.eval()


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        x = torch.tensor([ids])
        pos = torch.arange(len(ids)).unsqueeze(0)
        return model(input_ids=x, position_ids=pos, use_cache=False).logits[0].float()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def fmt(x: float) -> str:
    s = "%.7g" % x
    if s in ("nan", "inf", "-inf"):
        raise ValueError("non-finite logit")
    return s


def write_expected(folder: Path, name: str, ids: list[int], logits: torch.Tensor) -> None:
    rows = ",\n".join("[" + ",".join(fmt(v) for v in row.tolist()) + "]" for row in logits)
    text = ('{"model":%s,"transformers_version":%s,"input_ids":%s,"positions":%s,"logits":[\n%s\n]}\n'
            % (json.dumps(name), json.dumps(transformers.__version__), json.dumps(ids),
               json.dumps(list(range(len(ids)))), rows))
    json.loads(text)
    (folder / "expected.json").write_text(text)


def input_ids(vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (N_TOKENS,), generator=g).tolist()


def make(out: Path, name: str, base: str, dtype: torch.dtype, shard: str | None, seed: int) -> dict:
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cfg = classic_config(base, dtype)
    write_config(folder, cfg)
    config = AutoConfig.from_pretrained(folder)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    randomize(model, seed)
    with torch.no_grad():  # round the weights to the on-disk dtype, keep computing in float32
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    ids = input_ids(cfg["vocab_size"], seed + 1)
    same = logits_of(model, ids)
    # .to(dtype) would also cast the rotary inv_freq buffer; it is not saved, so a copy is fine.
    kwargs = {"max_shard_size": shard} if shard else {}
    copy.deepcopy(model).to(dtype).save_pretrained(folder, **kwargs)
    for extra in ("generation_config.json",):
        (folder / extra).unlink(missing_ok=True)
    write_config(folder, cfg)  # save_pretrained wrote transformers 5's layout; restore the classic one

    reloaded = load(folder)
    ref = logits_of(reloaded, ids)
    # The in-memory model and the re-loaded one must agree exactly: the classic config.json means
    # to transformers what the model was built from, and the weights survived the round trip.
    if not torch.equal(ref, same):
        sys.exit(f"{name}: logits of the re-loaded model differ ({rel_l2(same, ref):.2e})")
    if not torch.isfinite(ref).all():
        sys.exit(f"{name}: non-finite logits")
    write_expected(folder, name, ids, ref)
    probs = torch.softmax(ref, -1)
    entropy = float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean())
    return {"folder": folder, "model": reloaded, "ids": ids, "logits": ref, "entropy": entropy}


def sensitivity(name: str, r: dict) -> list[str]:
    """How much each architecture feature moves the logits (must be far above the 1e-4 tolerance
    of the C test, or the fixture would not test it)."""
    model, ids, ref = r["model"], r["ids"], r["logits"]
    lines = []

    def alt(desc: str, edit) -> None:
        cfg = AutoConfig.from_pretrained(r["folder"])
        edit(cfg)
        m = AutoModelForCausalLM.from_pretrained(r["folder"], config=cfg, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
        d = rel_l2(logits_of(m, ids), ref)
        lines.append(f"    {desc:<44} rel L2 {d:.3f}")
        if d < 1e-2:
            sys.exit(f"{name}: {desc} changes the logits by only {d:.2e}")

    with torch.no_grad():
        saved = {n: p.clone() for n, p in model.named_parameters() if "norm" in n}
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
        d = rel_l2(logits_of(model, ids), ref)
        lines.append(f"    {'RMSNorm weights set to 1':<44} rel L2 {d:.3f}")
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n])
    if name == "llama3":
        def no_scaling(c):
            c.rope_parameters = {"rope_type": "default", "rope_theta": c.rope_parameters["rope_theta"]}
        alt("llama3 rope scaling removed", no_scaling)
    if name == "mistral":
        def no_window(c):
            c.sliding_window = None
        alt("sliding window removed", no_window)

        def wider(c):
            c.sliding_window = 9
        alt("sliding window 9 instead of 8 (off by one)", wider)
    if name == "qwen2":
        with torch.no_grad():
            saved = {n: p.clone() for n, p in model.named_parameters() if n.endswith(".bias")}
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.zero_()
            d = rel_l2(logits_of(model, ids), ref)
            lines.append(f"    {'q/k/v biases zeroed':<44} rel L2 {d:.3f}")
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])

        def window(c):
            c.use_sliding_window = True
            c.sliding_window = 6
            c.max_window_layers = 0
            c.layer_types = ["sliding_attention"] * c.num_hidden_layers
        alt("sliding window 6 wrongly applied", window)
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "models")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    results = {}
    for i, name in enumerate(SPECS):
        results[name] = make(out, name, name, torch.float32, None, SEED + 100 * i)
    for name, (base, dtype, shard) in VARIANTS.items():
        seed = SEED + 100 * list(SPECS).index(base)
        results[name] = make(out, name, base, dtype, shard, seed)

    total = 0
    for name, r in results.items():
        size = sum(p.stat().st_size for p in r["folder"].iterdir())
        total += size
        files = ", ".join(sorted(p.name for p in r["folder"].iterdir() if p.name != "expected.json"))
        print(f"{name:<14} {size / 1024:7.0f} KiB  mean entropy {r['entropy']:.2f} nats  [{files}]")
        if name in SPECS:
            for line in sensitivity(name, r):
                print(line)
    base = results["llama"]["logits"]
    for name in VARIANTS:
        print(f"{name:<14} vs llama float32 logits: rel L2 {rel_l2(results[name]['logits'], base):.2e}")
    print(f"total {total / 1024 / 1024:.2f} MiB in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
