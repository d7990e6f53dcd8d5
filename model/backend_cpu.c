/* The CPU backend: fp32 weights and activations, the kernels/cpu ops behind the table. */
#include "common/error.h"
#include "kernels/cpu/ops.h"
#include "model/backend.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct cpu_ctx {
  cn_threadpool *tp;
  float **k_ptrs, **v_ptrs; /* [max_blocks] one sequence's block pointers for one layer */
  int max_blocks;
  float *attn_scratch; /* [threads][cn_cpu_attention_scratch_floats] fp32, grown on first use */
  size_t attn_scratch_floats;
  int32_t *sample_idx; /* [sample_cap] cn_cpu_sample's scratch, grown on first use */
  float *sample_prob, *sample_dist, *draw_scratch;
  int sample_cap;
} cpu_ctx;

static int cpu_dyn_trees(int head_dim) { return 1; }

static void cpu_destroy(void *ctx) {
  cpu_ctx *c = ctx;
  cn_threadpool_free(c->tp);
  free(c->k_ptrs);
  free(c->v_ptrs);
  free(c->attn_scratch);
  free(c->sample_idx);
  free(c->sample_prob);
  free(c->sample_dist);
  free(c->draw_scratch);
  free(c);
}

static int cpu_reserve(void *ctx, int max_blocks) {
  cpu_ctx *c = ctx;
  if (max_blocks <= c->max_blocks) return CANOPY_OK;
  float **k = realloc(c->k_ptrs, sizeof *k * (size_t)max_blocks);
  if (k) c->k_ptrs = k;
  float **v = realloc(c->v_ptrs, sizeof *v * (size_t)max_blocks);
  if (v) c->v_ptrs = v;
  if (!k || !v) return cn_error(CANOPY_ERR_NO_MEMORY, "cpu backend: no memory for a %d-block table", max_blocks);
  c->max_blocks = max_blocks;
  return CANOPY_OK;
}

static void *cpu_alloc(void *ctx, size_t bytes) {
  void *p = NULL;
  /* 64-byte alignment keeps OpenBLAS and the vector loops on whole cache lines. */
  return posix_memalign(&p, 64, bytes ? bytes : 64) == 0 ? p : NULL;
}

static void cpu_release(void *ctx, void *p) { free(p); }

static int cpu_load(void *ctx, void *dst, size_t at, const cn_st_tensor *t) {
  cn_st_to_f32(t, (float *)dst + at);
  return CANOPY_OK;
}

static int cpu_random(void *ctx, void *dst, size_t at, size_t n, uint64_t stream, float scale, float mean) {
  cn_cpu_random_weights((float *)dst + at, n, stream, scale, mean);
  return CANOPY_OK;
}

static void cpu_embed(void *ctx, void *x, const void *table, const int32_t *tokens, int n, int dim) {
  cn_cpu_embed(x, table, tokens, n, dim);
}

static void cpu_rmsnorm(void *ctx, void *out, const void *x, const void *w, int n, int dim, float eps) {
  cn_cpu_rmsnorm(out, x, w, n, dim, eps);
}

static void cpu_matmul(void *ctx, void *y, const void *x, const void *w, const void *bias, int n, int in, int out) {
  cn_cpu_matmul(((cpu_ctx *)ctx)->tp, y, x, w, bias, n, in, out);
}

static void cpu_rope(void *ctx, void *x, const int32_t *pos, int n, int n_heads, int head_dim, const float *inv_freq) {
  cn_cpu_rope(x, pos, n, n_heads, head_dim, inv_freq);
}

static void cpu_swiglu(void *ctx, void *out, const void *gate_up, int n, int d) { cn_cpu_swiglu(out, gate_up, n, d); }

static void cpu_add(void *ctx, void *x, const void *y, size_t n) { cn_cpu_add(x, y, n); }

static void cpu_gather_rows(void *ctx, void *dst, const void *src, const int32_t *rows, int n, int dim) {
  for (int i = 0; i < n; i++)
    memmove((float *)dst + (size_t)i * dim, (const float *)src + (size_t)rows[i] * dim, sizeof(float) * (size_t)dim);
}

static void cpu_split_qkv(void *ctx, void *q, void *k, void *v, const void *qkv, int n, int q_dim, int kv_dim) {
  size_t row = (size_t)q_dim + 2 * (size_t)kv_dim;
  for (int i = 0; i < n; i++) {
    const float *src = (const float *)qkv + i * row;
    memcpy((float *)q + (size_t)i * q_dim, src, sizeof(float) * (size_t)q_dim);
    memcpy((float *)k + (size_t)i * kv_dim, src + q_dim, sizeof(float) * (size_t)kv_dim);
    memcpy((float *)v + (size_t)i * kv_dim, src + q_dim + kv_dim, sizeof(float) * (size_t)kv_dim);
  }
}

/* Resolves a sequence's block table into this layer's block pointers for the kernels. The
 * table never exceeds max_blocks: the model reserves for its context length at load. */
static cn_cpu_paged_kv view_of(cpu_ctx *c, cn_kv_pool *pool, const cn_kv_seq *seq, int layer) {
  int nb;
  const int *table = cn_kv_seq_blocks(seq, &nb);
  for (int b = 0; b < nb && b < c->max_blocks; b++) {
    c->k_ptrs[b] = cn_kv_block_k(pool, table[b], layer);
    c->v_ptrs[b] = cn_kv_block_v(pool, table[b], layer);
  }
  return (cn_cpu_paged_kv){c->k_ptrs, c->v_ptrs, cn_kv_pool_layout(pool)->block_size};
}

static void cpu_kv_write(void *ctx, cn_kv_pool *pool, const cn_kv_seq *seq, int layer, int first_slot,
                         const void *k, const void *v, int n, int kv_dim) {
  cn_cpu_paged_kv kv = view_of(ctx, pool, seq, layer);
  cn_cpu_kv_write(&kv, first_slot, k, v, n, kv_dim);
}

static void cpu_attention(void *ctx, void *out, const void *q, const cn_attn_desc *d) {
  cpu_ctx *c = ctx;
  cn_cpu_paged_kv kv = view_of(c, d->pool, d->seq, d->layer);
  cn_cpu_attn_args a = {.out = out, .q = q, .kv = &kv, .n = d->n, .ctx_len = d->ctx_len, .q_offset = d->q_offset,
                        .pos = d->pos, .tree_mask = d->tree_mask, .mask_words = (d->q_offset + d->n + 63) / 64,
                        .n_heads = d->n_heads, .n_kv_heads = d->n_kv_heads, .head_dim = d->head_dim,
                        .sliding_window = d->sliding_window, .scale = d->scale};
  size_t need =
      cn_cpu_attention_scratch_floats(d->n_heads, d->n_kv_heads, d->head_dim) * (size_t)cn_threadpool_size(c->tp);
  if (need > c->attn_scratch_floats) {
    free(c->attn_scratch);
    c->attn_scratch = cpu_alloc(c, sizeof(float) * need);
    c->attn_scratch_floats = c->attn_scratch ? need : 0;
  }
  a.scratch = c->attn_scratch; /* NULL (no memory): the op allocates per call, or runs without */
  cn_cpu_attention(c->tp, &a);
}

static void cpu_attention_batch(void *ctx, void *out, const void *q, const cn_attn_desc *d, int n_seqs) {
  size_t row = 0;
  for (int s = 0; s < n_seqs; s++) {
    size_t at = row * (size_t)d[s].n_heads * d[s].head_dim;
    cpu_attention(ctx, (float *)out + at, (const float *)q + at, &d[s]);
    row += (size_t)d[s].n;
  }
}

static void cpu_to_host(void *ctx, float *dst, const void *src, size_t n) {
  if (dst != src) memcpy(dst, src, sizeof(float) * n);
}

static void cpu_top_rows(void *ctx, int32_t *ids, float *logp, const void *logits, int rows, int vocab, int k) {
  for (int r = 0; r < rows; r++)
    cn_cpu_top_k((const float *)logits + (size_t)r * vocab, vocab, k, ids + (size_t)r * k,
                 logp ? logp + (size_t)r * k : NULL);
}

/* cn_cpu_sample's scratch (and a row of draws' scratch), grown to the largest vocab seen. */
static int sample_scratch(cpu_ctx *c, int vocab) {
  if (vocab <= c->sample_cap) return CANOPY_OK;
  free(c->sample_idx);
  free(c->sample_prob);
  free(c->sample_dist);
  free(c->draw_scratch);
  c->sample_idx = malloc(sizeof *c->sample_idx * (size_t)vocab);
  c->sample_prob = malloc(sizeof *c->sample_prob * (size_t)vocab);
  c->sample_dist = malloc(sizeof *c->sample_dist * (size_t)vocab);
  c->draw_scratch = malloc(sizeof *c->draw_scratch * (size_t)vocab);
  c->sample_cap = c->sample_idx && c->sample_prob && c->sample_dist && c->draw_scratch ? vocab : 0;
  if (!c->sample_cap) return cn_error(CANOPY_ERR_NO_MEMORY, "cpu backend: no memory to sample a vocab of %d", vocab);
  return CANOPY_OK;
}

static int cpu_sample_rows(void *ctx, int32_t *ids, const void *logits, int rows, int vocab, const cn_sample_rule *r,
                           const double *u) {
  cpu_ctx *c = ctx;
  int st = sample_scratch(c, vocab);
  for (int i = 0; !st && i < rows; i++)
    ids[i] = cn_cpu_sample(r, (const float *)logits + (size_t)i * vocab, vocab, u[i], c->sample_idx, c->sample_prob,
                           c->sample_dist);
  return st;
}

static int cpu_draw_rows(void *ctx, int32_t *ids, float *const *q_out, const void *logits, int rows, int vocab,
                         const cn_sample_rule *r, const double *u, int k) {
  cpu_ctx *c = ctx;
  int st = sample_scratch(c, vocab);
  for (int i = 0; !st && i < rows; i++) {
    float *q = q_out[i] ? q_out[i] : c->sample_dist;
    cn_cpu_sample_probs(r, (const float *)logits + (size_t)i * vocab, vocab, c->sample_idx, c->sample_prob, q);
    cn_cpu_draw_distinct(q, vocab, k, u + (size_t)i * k, ids + (size_t)i * k, c->draw_scratch);
  }
  return st;
}

/* The logits are kept as they are: acceptance processes the rows its walk visits (at most the
 * path's depth + 1 a tree), as the host path does, not every node's. */
static int cpu_probs_rows(void *ctx, float *dst, const void *logits, int rows, int vocab, const cn_sample_rule *r) {
  (void)ctx, (void)r;
  memcpy(dst, logits, sizeof *dst * (size_t)rows * vocab);
  return CANOPY_OK;
}

typedef struct lazy_rows {
  cpu_ctx *c;
  const float *logits; /* [n][vocab] */
  int vocab;
  const cn_sample_rule *rule;
} lazy_rows;

static int lazy_row(void *ctx, int node, const float **row) {
  lazy_rows *l = ctx;
  cpu_ctx *c = l->c;
  cn_cpu_sample_probs(l->rule, l->logits + (size_t)node * l->vocab, l->vocab, c->sample_idx, c->sample_prob,
                      c->sample_dist);
  *row = c->sample_dist;
  return CANOPY_OK;
}

static int cpu_accept_sampled(void *ctx, int32_t *out, const int32_t *tokens, const int32_t *parent, int n,
                              const float *p, float *const *q, const double *u, int vocab, float *scratch,
                              const cn_sample_rule *rule) {
  cpu_ctx *c = ctx;
  int st = sample_scratch(c, vocab);
  if (st) return st;
  lazy_rows l = {c, p, vocab, rule};
  st = cn_cpu_accept_sampled(out, tokens, parent, n, lazy_row, &l, (const float *const *)q, u, vocab, scratch);
  return st < 0 ? st : CANOPY_OK;
}

/* Chained forwards: ids are host memory, which the forward reads and writes itself. */
static void *cpu_ids_create(void *ctx, int n) {
  (void)ctx;
  void *p = calloc((size_t)n, sizeof(int32_t));
  if (!p) cn_error(CANOPY_ERR_NO_MEMORY, "cpu backend: no memory for %d ids", n);
  return p;
}

static void cpu_ids_free(void *ctx, void *ids) {
  (void)ctx;
  free(ids);
}

static void cpu_accept_greedy(void *ctx, int32_t *out, const int32_t *tokens, const int32_t *top,
                              const int32_t *parent, int n) {
  (void)ctx;
  (void)cn_cpu_accept_greedy(out, tokens, top, parent, n); /* the forward checked the tree */
}

static const cn_backend cpu_backend = {
    .name = "cpu",
    .weight_elem_bytes = sizeof(float),
    .destroy = cpu_destroy,
    .reserve = cpu_reserve,
    .alloc = cpu_alloc,
    .release = cpu_release,
    .load = cpu_load,
    .random = cpu_random,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .matmul = cpu_matmul,
    .rope = cpu_rope,
    .swiglu = cpu_swiglu,
    .add = cpu_add,
    .split_qkv = cpu_split_qkv,
    .gather_rows = cpu_gather_rows,
    .kv_write = cpu_kv_write,
    .attention_batch = cpu_attention_batch,
    .to_host = cpu_to_host,
    .top_rows = cpu_top_rows,
    .sample_rows = cpu_sample_rows,
    .draw_rows = cpu_draw_rows,
    .probs_rows = cpu_probs_rows,
    .accept_sampled = cpu_accept_sampled,
    .ids_create = cpu_ids_create,
    .ids_free = cpu_ids_free,
    .accept_greedy = cpu_accept_greedy,
    .host_ids = 1,
    .dyn_trees = cpu_dyn_trees,
};

int cn_backend_cpu_create(int n_threads, const cn_backend **be, void **ctx) {
  if (n_threads <= 0) n_threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
  if (n_threads <= 0) n_threads = 1;
  cpu_ctx *c = calloc(1, sizeof *c);
  if (!c) return cn_error(CANOPY_ERR_NO_MEMORY, "cpu backend: out of memory");
  int st = cn_threadpool_create(n_threads, &c->tp);
  if (st) {
    free(c);
    return st;
  }
  /* OpenBLAS keeps its own pool; match its size so GEMMs and our ops use the same cores. */
  openblas_set_num_threads(n_threads);
  *be = &cpu_backend;
  *ctx = c;
  return CANOPY_OK;
}
