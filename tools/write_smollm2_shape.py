"""Writes a random-weight model of SmolLM2-135M-Instruct's shape (bf16, tied embeddings, std 0.0417
as its initializer_range) into the folder given as argv[1]: config.json and model.safetensors, for
the GPU host, which has no checkpoint. Needs torch and safetensors (there, not in the runtime)."""
import json, os, sys, torch
from safetensors.torch import save_file
d = sys.argv[1]; os.makedirs(d, exist_ok=True)
cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
       "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
       "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000,
       "rope_scaling": None, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
       "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16"}
json.dump(cfg, open(f"{d}/config.json", "w"))
g = torch.Generator().manual_seed(0)
def w(*s): return (torch.randn(*s, generator=g) * 0.0417).to(torch.bfloat16)
def n(k): return (1 + 0.1 * torch.randn(k, generator=g)).to(torch.bfloat16)
D, F, q, kv = 576, 1536, 9 * 64, 3 * 64
t = {"model.embed_tokens.weight": w(49152, D), "model.norm.weight": n(D)}
for l in range(30):
    p = f"model.layers.{l}."
    t.update({p + "input_layernorm.weight": n(D), p + "post_attention_layernorm.weight": n(D),
              p + "self_attn.q_proj.weight": w(q, D), p + "self_attn.k_proj.weight": w(kv, D),
              p + "self_attn.v_proj.weight": w(kv, D), p + "self_attn.o_proj.weight": w(D, q),
              p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D), p + "mlp.down_proj.weight": w(D, F)})
save_file(t, f"{d}/model.safetensors")
print("wrote", d)
