/* A loaded causal LM: config, weights in the backend's format, the KV pool, forward scratch. */
#ifndef CANOPY_MODEL_MODEL_H
#define CANOPY_MODEL_MODEL_H

#include "canopy.h"
#include "cache/kv_cache.h"
#include "model/backend.h"
#include "model/config.h"

/* Shapes use: D = hidden_size, Hq/Hkv = heads, d = head_dim, QKV = (Hq + 2 Hkv) d, F = intermediate. */
typedef struct cn_layer {
  void *attn_norm;   /* [D] */
  void *wqkv;        /* [QKV][D]: q_proj, k_proj, v_proj stacked so one GEMM makes all three */
  void *bqkv;        /* [QKV] or NULL (Qwen2, Llama attention_bias) */
  void *wo;          /* [D][Hq d] */
  void *bo;          /* [D] or NULL */
  void *ffn_norm;    /* [D] */
  void *w_gate_up;   /* [2F][D]: gate_proj then up_proj */
  void *b_gate_up;   /* [2F] or NULL (mlp_bias) */
  void *w_down;      /* [D][F] */
  void *b_down;      /* [D] or NULL */
} cn_layer;

/* Token ids kept where the backend computes (device memory on CUDA, host memory on the CPU), so
 * that forwards chain without the host: a speculative step's draft levels take their tokens from
 * the level before, the verification takes the tree's tokens from the draft, and only acceptance's
 * result crosses to the host. Made by one model's backend; a forward of another model on the same
 * backend may use it (the CUDA backend orders the two streams with an event). */
typedef struct cn_ids {
  void *buf;
  int n;
} cn_ids;

/* Rows of fp32 probabilities kept where the backend computes, as cn_ids keeps ids: a sampled
 * tree's draft distributions, from the level that drew a node's children to the verification
 * that accepts among them. Row i starts at cn_rows_at(r, i) (a backend address). */
typedef struct cn_rows {
  void *buf;
  int rows, vocab;
} cn_rows;

static inline float *cn_rows_at(const cn_rows *r, int i) { return (float *)r->buf + (size_t)i * r->vocab; }

/* Per-forward activations, sized for max_batch tokens. */
typedef struct cn_scratch {
  void *x;        /* [B][D] residual stream */
  void *xn;       /* [B][D] normed input of a sub-block */
  void *qkv;      /* [B][QKV] */
  void *q;        /* [B][Hq d] contiguous queries of one sequence */
  void *k, *v;    /* [B][Hkv d] */
  void *attn;     /* [B][Hq d] */
  void *proj;     /* [B][D] */
  void *gate_up;  /* [B][2F] */
  void *ffn;      /* [B][F] */
  void *logits;   /* [B][V] */
} cn_scratch;

struct canopy_model {
  cn_config cfg;
  char dir[1024];
  const cn_backend *be;
  void *be_ctx;
  void *embed;         /* [V][D] */
  void *lm_head;       /* [V][D]; == embed when tied */
  void *final_norm;    /* [D] */
  cn_layer *layers;    /* [n_layers] */
  float *inv_freq;     /* [d/2] host, llama3 scaling applied */
  cn_kv_pool *kv;
  cn_scratch s;
  int max_batch;       /* tokens per forward; longer prompts are fed in chunks of this size */
  /* Host scratch of a batched session step (spec/session.c), grown on demand and kept, so a
   * steady-state step allocates nothing. */
  float *step_logits;  /* [step_rows][V] */
  int step_rows;
  int32_t *step_idx;   /* [(5 + 32) * max_batch]: a forward's tokens, positions, logit rows, its
                        * top ids (up to 32 a row), and a chained step's token sources and parents */
  float *step_top_logp; /* [32 * max_batch]: their log-probabilities */
  struct cn_attn_desc *attn_desc; /* [max_batch] one layer's attention batch (model/forward.c) */
  int32_t *fwd_tokens; /* [max_batch] a forward's tokens with token_src resolved (host_ids backends) */
  /* Chained batched steps (spec/session.c): as a draft, the step's picks; as a target, acceptance's
   * results [step_accept_cap]. */
  cn_ids step_ids;
  int32_t *step_accept;
  int step_accept_cap;
  /* Chained sampled steps: a forward's uniforms [32 max_batch] and draft rows [max_batch] (host),
   * and as a target the verification's workspace rows (model/forward.h, accept_rows), which a
   * session's own step and a batched step both use. */
  double *step_u;
  float **step_q;
  cn_rows step_prows;
  struct cn_seq_batch *step_seqs; /* [step_cap] */
  struct cn_step_part *step_parts; /* [step_cap] */
  struct cn_dyn_step *step_dyn;    /* [step_cap] a forward's dynamic trees */
  int step_cap;
  unsigned step_rr;    /* where the next step starts looking, so no session waits forever */
  int max_context;
  int64_t n_params, weight_bytes;
  int64_t n_forwards;
};

typedef struct cn_model_load_params {
  int n_threads, max_context, kv_block_size, kv_blocks, max_batch;
  int prefix_cache;
} cn_model_load_params;

int cn_model_load(const char *dir, const canopy_model_params *p, canopy_model **out);

#endif
