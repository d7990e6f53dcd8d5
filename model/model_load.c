/* Loading a Hugging Face checkpoint: config, validated tensors, weights in the backend's
 * format (fused where one GEMM can serve several projections), KV pool and scratch. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "kernels/random_init.h"
#include "model/model.h"

#define DEFAULT_MAX_BATCH 512
#define LOGIT_ROWS 64
#define MAX_HEAD_DIM 256

canopy_model_params canopy_model_default_params(void) {
  return (canopy_model_params){.n_threads = 0, .max_context = 0, .kv_block_size = 16, .kv_blocks = 0, .prefix_cache = 1,
                               .device = CANOPY_DEVICE_CPU, .cuda_graphs = 64};
}

typedef struct loader {
  canopy_model *m;
  cn_st *st;        /* NULL: random weights */
  uint64_t seed;
  int n_random;     /* tensors initialised so far: each gets its own stream */
} loader;

/* Random values for one checkpoint tensor, shaped as the checkpoint would be: matrices and biases
 * with std 0.02 (initializer_range of the Llama family), norm weights around 1. */
static int random_part(loader *ld, void *dst, size_t at, size_t n, const char *name) {
  int is_norm = strstr(name, "norm.weight") != NULL;
  float scale = cn_random_scale(is_norm ? 0.1f : 0.02f), mean = is_norm ? 1.0f : 0.0f;
  uint64_t stream = cn_random_stream(ld->seed, (uint64_t)ld->n_random++);
  int st = ld->m->be->random(ld->m->be_ctx, dst, at, n, stream, scale, mean);
  return st ? cn_error_wrap(st, "initialising %s at random", name) : CANOPY_OK;
}

/* Allocates one weight and fills it from checkpoint tensors stacked by rows, after checking
 * each tensor's shape: [rows[i]][cols] for matrices, [rows[i]] for vectors (cols == 0). */
static int load_parts(loader *ld, void **dst, int cols, int n_parts, const char *const *names, const int *rows) {
  canopy_model *m = ld->m;
  size_t width = cols > 0 ? (size_t)cols : 1, total = 0;
  const cn_st_tensor *t[4] = {0};
  for (int i = 0; i < n_parts; i++) {
    int64_t shape[2] = {rows[i], cols};
    int st = ld->st ? cn_st_expect(ld->st, names[i], cols > 0 ? 2 : 1, shape, &t[i]) : CANOPY_OK;
    if (st) return st;
    total += (size_t)rows[i] * width;
  }
  size_t bytes = total * m->be->weight_elem_bytes;
  *dst = m->be->alloc(m->be_ctx, bytes);
  if (!*dst)
    return cn_error(CANOPY_ERR_NO_MEMORY, "%s: cannot allocate %zu bytes of %s memory for %s", m->dir, bytes,
                    m->be->name, names[0]);
  size_t at = 0;
  for (int i = 0; i < n_parts; i++) {
    size_t n = (size_t)rows[i] * width;
    int st = ld->st ? m->be->load(m->be_ctx, *dst, at, t[i]) : random_part(ld, *dst, at, n, names[i]);
    if (st) return st;
    at += n;
  }
  m->n_params += (int64_t)total;
  m->weight_bytes += (int64_t)bytes;
  return CANOPY_OK;
}

static int load_matrix(loader *ld, void **dst, const char *name, int rows, int cols) {
  return load_parts(ld, dst, cols, 1, &name, &rows);
}

static int load_vector(loader *ld, void **dst, const char *name, int n) { return load_parts(ld, dst, 0, 1, &name, &n); }

static int load_layer(loader *ld, int l) {
  const cn_config *c = &ld->m->cfg;
  cn_layer *w = &ld->m->layers[l];
  int D = c->hidden_size, d = c->head_dim, F = c->intermediate_size;
  char nq[128], nk[128], nv[128], no[128], n1[128], n2[128], ng[128], nu[128], nd[128];
  const char *p = "model.layers";
  snprintf(n1, sizeof n1, "%s.%d.input_layernorm.weight", p, l);
  snprintf(n2, sizeof n2, "%s.%d.post_attention_layernorm.weight", p, l);
  int st = load_vector(ld, &w->attn_norm, n1, D);
  if (!st) st = load_vector(ld, &w->ffn_norm, n2, D);
  if (st) return st;

  snprintf(nq, sizeof nq, "%s.%d.self_attn.q_proj.weight", p, l);
  snprintf(nk, sizeof nk, "%s.%d.self_attn.k_proj.weight", p, l);
  snprintf(nv, sizeof nv, "%s.%d.self_attn.v_proj.weight", p, l);
  snprintf(no, sizeof no, "%s.%d.self_attn.o_proj.weight", p, l);
  const char *qkv[3] = {nq, nk, nv};
  int qkv_rows[3] = {c->n_heads * d, c->n_kv_heads * d, c->n_kv_heads * d};
  st = load_parts(ld, &w->wqkv, D, 3, qkv, qkv_rows);
  if (!st) st = load_matrix(ld, &w->wo, no, D, c->n_heads * d);
  if (!st && c->attention_bias) {
    snprintf(nq, sizeof nq, "%s.%d.self_attn.q_proj.bias", p, l);
    snprintf(nk, sizeof nk, "%s.%d.self_attn.k_proj.bias", p, l);
    snprintf(nv, sizeof nv, "%s.%d.self_attn.v_proj.bias", p, l);
    st = load_parts(ld, &w->bqkv, 0, 3, qkv, qkv_rows);
  }
  if (!st && c->o_bias) {
    snprintf(no, sizeof no, "%s.%d.self_attn.o_proj.bias", p, l);
    st = load_vector(ld, &w->bo, no, D);
  }
  if (st) return st;

  snprintf(ng, sizeof ng, "%s.%d.mlp.gate_proj.weight", p, l);
  snprintf(nu, sizeof nu, "%s.%d.mlp.up_proj.weight", p, l);
  snprintf(nd, sizeof nd, "%s.%d.mlp.down_proj.weight", p, l);
  const char *gu[2] = {ng, nu};
  int gu_rows[2] = {F, F};
  st = load_parts(ld, &w->w_gate_up, D, 2, gu, gu_rows);
  if (!st) st = load_matrix(ld, &w->w_down, nd, D, F);
  if (!st && c->mlp_bias) {
    snprintf(ng, sizeof ng, "%s.%d.mlp.gate_proj.bias", p, l);
    snprintf(nu, sizeof nu, "%s.%d.mlp.up_proj.bias", p, l);
    snprintf(nd, sizeof nd, "%s.%d.mlp.down_proj.bias", p, l);
    st = load_parts(ld, &w->b_gate_up, 0, 2, gu, gu_rows);
    if (!st) st = load_vector(ld, &w->b_down, nd, D);
  }
  return st;
}

static int alloc_scratch(canopy_model *m) {
  const cn_config *c = &m->cfg;
  size_t B = (size_t)m->max_batch, D = (size_t)c->hidden_size, d = (size_t)c->head_dim;
  size_t q = (size_t)c->n_heads * d, kv = (size_t)c->n_kv_heads * d, F = (size_t)c->intermediate_size;
  struct { void **p; size_t n; } bufs[] = {
      {&m->s.x, B * D},        {&m->s.xn, B * D},         {&m->s.qkv, B * (q + 2 * kv)}, {&m->s.q, B * q},
      {&m->s.k, B * kv},       {&m->s.v, B * kv},         {&m->s.attn, B * q},           {&m->s.proj, B * D},
      {&m->s.gate_up, B * 2 * F}, {&m->s.ffn, B * F},     {&m->s.logits, (size_t)LOGIT_ROWS * (size_t)c->vocab_size},
  };
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
    *bufs[i].p = m->be->alloc(m->be_ctx, bufs[i].n * sizeof(float));
    if (!*bufs[i].p)
      return cn_error(CANOPY_ERR_NO_MEMORY, "%s: cannot allocate %zu bytes of %s memory for forward scratch", m->dir,
                      bufs[i].n * sizeof(float), m->be->name);
  }
  if (!(m->attn_desc = malloc(sizeof *m->attn_desc * B)) || !(m->fwd_tokens = malloc(sizeof *m->fwd_tokens * B)))
    return cn_error(CANOPY_ERR_NO_MEMORY, "%s: no host memory for %zu attention descriptors", m->dir, B);
  return CANOPY_OK;
}

static int load_all(canopy_model *m, const canopy_model_params *p) {
  char path[1200];
  if (p->random_weights) snprintf(path, sizeof path, "%s", p->random_weights);
  else snprintf(path, sizeof path, "%s/config.json", m->dir);
  int st = cn_config_load(path, &m->cfg);
  if (st) return st;
  if (p->n_layers < 0) return cn_error(CANOPY_ERR_INVALID_ARG, "%s: n_layers %d must be >= 0", m->dir, p->n_layers);
  if (p->n_layers > 0 && p->n_layers < m->cfg.n_layers) m->cfg.n_layers = p->n_layers;
  const cn_config *c = &m->cfg;
  if (c->head_dim > MAX_HEAD_DIM || c->head_dim % 2)
    return cn_error(CANOPY_ERR_UNSUPPORTED, "%s: head_dim %d is not supported (even, at most %d)", path, c->head_dim,
                    MAX_HEAD_DIM);

  if (p->device == CANOPY_DEVICE_CUDA) st = cn_backend_cuda_create(0, &m->be, &m->be_ctx);
  else if (p->device == CANOPY_DEVICE_CPU) st = cn_backend_cpu_create(p->n_threads, &m->be, &m->be_ctx);
  else st = cn_error(CANOPY_ERR_INVALID_ARG, "%s: unknown device %d (CANOPY_DEVICE_CPU or CANOPY_DEVICE_CUDA)", m->dir,
                     p->device);
  if (st) return st;
  if (p->device == CANOPY_DEVICE_CUDA) cn_backend_cuda_set_graphs(m->be, m->be_ctx, p->cuda_graphs);

  loader ld = {.m = m, .seed = p->random_seed};
  st = p->random_weights ? CANOPY_OK : cn_st_open(m->dir, &ld.st);
  if (st) return st;
  st = load_matrix(&ld, &m->embed, "model.embed_tokens.weight", c->vocab_size, c->hidden_size);
  if (!st) st = load_vector(&ld, &m->final_norm, "model.norm.weight", c->hidden_size);
  if (!st) {
    if (c->tie_word_embeddings)
      m->lm_head = m->embed;
    else
      st = load_matrix(&ld, &m->lm_head, "lm_head.weight", c->vocab_size, c->hidden_size);
  }
  m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
  if (!st && !m->layers) st = cn_error(CANOPY_ERR_NO_MEMORY, "%s: out of memory", m->dir);
  for (int l = 0; !st && l < c->n_layers; l++) st = load_layer(&ld, l);
  cn_st_close(ld.st);
  if (st) return st;

  m->inv_freq = malloc(sizeof(float) * (size_t)(c->head_dim / 2));
  if (!m->inv_freq) return cn_error(CANOPY_ERR_NO_MEMORY, "%s: out of memory", m->dir);
  cn_config_rope_inv_freq(c, m->inv_freq);

  m->max_context = p->max_context > 0 && p->max_context < c->max_position_embeddings ? p->max_context
                                                                                     : c->max_position_embeddings;
  m->max_batch = DEFAULT_MAX_BATCH;
  int bs = p->kv_block_size > 0 ? p->kv_block_size : 16;
  int blocks_per_seq = (m->max_context + bs - 1) / bs;
  cn_kv_layout layout = {.n_layers = c->n_layers, .n_kv_heads = c->n_kv_heads, .head_dim = c->head_dim,
                         .block_size = bs, .n_blocks = p->kv_blocks > 0 ? p->kv_blocks : 4 * blocks_per_seq};
  st = cn_kv_pool_create_on(&layout, m->be->kv_storage, m->be_ctx, &m->kv);
  if (st) return st;
  cn_kv_pool_set_prefix_cache(m->kv, p->prefix_cache != 0);
  st = m->be->reserve(m->be_ctx, blocks_per_seq + 1);
  if (!st) st = alloc_scratch(m);
  return st;
}

int cn_model_load(const char *dir, const canopy_model_params *p, canopy_model **out) {
  canopy_model_params defaults = canopy_model_default_params();
  if (!p) p = &defaults;
  if ((!dir && !p->random_weights) || !out) return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_model_load: NULL argument");
  canopy_model *m = calloc(1, sizeof *m);
  if (!m) return cn_error(CANOPY_ERR_NO_MEMORY, "out of memory");
  /* Messages name the folder, or the config a random model was built from. */
  snprintf(m->dir, sizeof m->dir, "%s", p->random_weights ? p->random_weights : dir);
  int st = load_all(m, p);
  if (st) {
    canopy_model_free(m);
    return st;
  }
  *out = m;
  return CANOPY_OK;
}

int canopy_model_load(const char *dir, const canopy_model_params *p, canopy_model **out) {
  return cn_model_load(dir, p, out);
}

void canopy_model_free(canopy_model *m) {
  if (!m) return;
  if (m->be) {
    void **bufs[] = {&m->s.x, &m->s.xn, &m->s.qkv, &m->s.q, &m->s.k, &m->s.v,
                     &m->s.attn, &m->s.proj, &m->s.gate_up, &m->s.ffn, &m->s.logits};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) m->be->release(m->be_ctx, *bufs[i]);
    for (int l = 0; m->layers && l < m->cfg.n_layers; l++) {
      cn_layer *w = &m->layers[l];
      void *ws[] = {w->attn_norm, w->wqkv, w->bqkv, w->wo, w->bo, w->ffn_norm, w->w_gate_up, w->b_gate_up, w->w_down, w->b_down};
      for (size_t i = 0; i < sizeof ws / sizeof ws[0]; i++) m->be->release(m->be_ctx, ws[i]);
    }
    if (m->lm_head != m->embed) m->be->release(m->be_ctx, m->lm_head);
    m->be->release(m->be_ctx, m->embed);
    m->be->release(m->be_ctx, m->final_norm);
  }
  if (m->step_ids.buf) m->be->ids_free(m->be_ctx, m->step_ids.buf);
  if (m->step_prows.buf) m->be->release(m->be_ctx, m->step_prows.buf);
  free(m->step_accept);
  free(m->step_u);
  free(m->step_q);
  cn_kv_pool_free(m->kv); /* before the backend: its storage may be the backend's */
  if (m->be) m->be->destroy(m->be_ctx);
  free(m->step_logits);
  free(m->step_idx);
  free(m->step_top_logp);
  free(m->attn_desc);
  free(m->fwd_tokens);
  free(m->step_seqs);
  free(m->step_parts);
  free(m->step_dyn);
  free(m->layers);
  free(m->inv_freq);
  free(m);
}

int canopy_model_get_info(const canopy_model *m, canopy_model_info *info) {
  if (!m || !info) return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_model_get_info: NULL argument");
  const cn_config *c = &m->cfg;
  *info = (canopy_model_info){.architecture = c->architecture, .vocab_size = c->vocab_size,
                              .hidden_size = c->hidden_size, .n_layers = c->n_layers, .n_heads = c->n_heads,
                              .n_kv_heads = c->n_kv_heads, .head_dim = c->head_dim,
                              .intermediate_size = c->intermediate_size, .max_context = m->max_context,
                              .n_params = m->n_params, .weight_bytes = m->weight_bytes,
                              .bos_token_id = c->bos_token_id, .n_eos = c->n_eos, .n_forwards = m->n_forwards};
  memcpy(info->eos_token_ids, c->eos_token_ids, sizeof info->eos_token_ids);
  return CANOPY_OK;
}
