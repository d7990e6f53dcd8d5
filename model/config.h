/* config.json: the hyper-parameters of a Hugging Face causal LM. */
#ifndef CANOPY_MODEL_CONFIG_H
#define CANOPY_MODEL_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

typedef enum cn_rope_scaling { CN_ROPE_NONE = 0, CN_ROPE_LLAMA3, CN_ROPE_LINEAR } cn_rope_scaling;

typedef struct cn_config {
  char architecture[64];     /* "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM" */
  int vocab_size;
  int hidden_size;
  int intermediate_size;
  int n_layers;              /* num_hidden_layers */
  int n_heads;               /* num_attention_heads */
  int n_kv_heads;            /* num_key_value_heads (defaults to n_heads) */
  int head_dim;              /* head_dim, or hidden_size / n_heads */
  int max_position_embeddings;
  float rms_norm_eps;
  float rope_theta;          /* default 10000 */
  bool tie_word_embeddings;  /* lm_head shares embed_tokens (default false; SmolLM2: true) */
  bool attention_bias;       /* q/k/v projections have biases (Qwen2: true; Llama: attention_bias) */
  bool o_bias;               /* o_proj has a bias (Llama's attention_bias sets both) */
  bool mlp_bias;             /* Llama's mlp_bias */
  int sliding_window;        /* Mistral / Qwen2 (use_sliding_window); 0 = none */
  cn_rope_scaling rope_scaling;
  float rope_factor;         /* llama3 and linear */
  float rope_low_freq_factor, rope_high_freq_factor; /* llama3 */
  int rope_original_max_position; /* llama3: original_max_position_embeddings */
  int bos_token_id;          /* -1 if absent */
  int n_eos;
  int eos_token_ids[8];      /* eos_token_id may be an int or a list */
} cn_config;

/* Parses config.json text. `name` (usually the path) appears in error messages, which name the
 * field at fault. Validates: positive sizes, n_heads % n_kv_heads == 0, known architecture. */
int cn_config_parse(const char *json, size_t len, const char *name, cn_config *out);

/* Reads and parses a config.json file. */
int cn_config_load(const char *path, cn_config *out);

/* The inverse frequency of each rotary pair (head_dim / 2 floats), llama3 scaling applied. */
void cn_config_rope_inv_freq(const cn_config *c, float *inv_freq);

#endif
