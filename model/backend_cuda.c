/* The CUDA backend: bf16 weights and KV cache on the device, fp32 activations (the matmul
 * launcher rounds its fp32 input to bf16 for cuBLAS), the kernels/cuda launchers behind the table.
 *
 * Host arrays reach the device through a per-forward staging area: an op that gets a host array
 * (tokens, positions, a tree mask, a block table, inv_freq, logit rows) copies it into page-locked
 * memory and queues one asynchronous upload; later ops of the same forward that pass the same
 * array find it again by address. `begin` waits for the previous forward and empties the area.
 * This keeps the forward correct and simple, with a few small copies per step; the next step
 * (issue 5) is fixed device buffers filled once per step and the step captured in a CUDA graph per
 * (batch, node count) bucket, which needs every input at a fixed address. */
#include "model/backend.h"

#include "common/error.h"

#ifndef CANOPY_HAVE_CUDA

struct cn_cuda_ctx *cn_backend_cuda_ctx(const cn_backend *be, void *ctx) { return NULL; }

int cn_backend_cuda_create(int device, const cn_backend **be, void **ctx) {
  return cn_error(CANOPY_ERR_DEVICE,
                  "cuda device %d requested, but this build of canopy has no CUDA support "
                  "(configure it where nvcc is found)",
                  device);
}

#else

#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cuda_ops.h"

#ifndef ARENA_MIN
#define ARENA_MIN (256u << 10) /* bytes; grown on demand */
#endif
#define MAX_RETIRED 8
#define TOP_ROWS 64 /* rows per top_rows call (the forward's LM-head chunk) */
#define TOP_K 32     /* most picks per row */

/* One staged host array of the current forward. */
typedef struct staged {
  const void *host;
  size_t bytes;
  void *dev;
  unsigned gen; /* the forward it belongs to; older entries are empty */
} staged;

/* Page-locked host bytes and their device twin, filled front to back within a forward. */
typedef struct arena {
  char *host, *dev;
  size_t cap, used;
} arena;

typedef struct cuda_ctx {
  cn_cuda_ctx *cu;
  int status; /* first failure since begin (ops return nothing) */
  arena a;
  arena retired[MAX_RETIRED]; /* outgrown areas whose uploads this forward may still read */
  int n_retired;
  staged *map; /* [map_cap] open addressing by host address; map_cap a power of 2 */
  size_t map_cap, map_used;
  unsigned gen;
  void *copy_tmp; /* device staging of KV span copies, copy_tmp_bytes long */
  int32_t *top_dev; /* [TOP_ROWS][TOP_K] top_rows' device ids */
  float *top_logp_dev; /* [TOP_ROWS][TOP_K] and their log-softmax */
  void *sample_ws;  /* cn_cuda_sample's workspace for TOP_ROWS rows of sample_vocab, grown on first use */
  size_t sample_ws_bytes;
  int sample_vocab;
  int batch_invariant; /* $CANOPY_CUDA_BATCH_INVARIANT=1 at creation: see cn_backend_cuda_create */
  size_t copy_tmp_bytes;
  /* Tree attention: the device arrays of the last staged batch (descriptors, block tables,
   * positions, masks), reused by the later layers of the same forward, and the split workspace. */
  unsigned ta_gen;
  void *ta_dev, *ta_host; /* ta_host: a copy of the staged bytes, to recognise the same batch */
  size_t ta_bytes, ta_host_cap;
  float *ta_ws;
  size_t ta_ws_bytes;
  uint16_t *load_buf; /* host bf16 of one checkpoint tensor being uploaded */
  float *load_f32;
  size_t load_cap; /* elements of both */
} cuda_ctx;

/* Records the first failure of a forward; later ops then do nothing. */
static int keep(cuda_ctx *c, int st) {
  if (st && !c->status) c->status = st;
  return st;
}

/* ---- the staging area ------------------------------------------------------------------------ */

static void arena_release(cuda_ctx *c, arena *a) {
  cn_cuda_host_free(c->cu, a->host);
  cn_cuda_free(c->cu, a->dev);
  *a = (arena){0};
}

/* Makes room for `bytes` more: a full area is retired (kept alive, since device pointers into it
 * may still be used by this forward's ops) and a larger one takes its place. */
static int arena_grow(cuda_ctx *c, size_t bytes) {
  if (c->a.used + bytes <= c->a.cap) return CANOPY_OK;
  if (c->a.cap && c->n_retired == MAX_RETIRED)
    return cn_error(CANOPY_ERR_NO_MEMORY, "cuda backend: staging area outgrown %d times in one forward (%zu bytes)",
                    MAX_RETIRED, c->a.cap);
  size_t cap = 2 * (c->a.cap + bytes);
  if (cap < ARENA_MIN) cap = ARENA_MIN;
  arena n = {.cap = cap};
  int st = cn_cuda_host_alloc(c->cu, (void **)&n.host, cap);
  if (!st) st = cn_cuda_malloc(c->cu, (void **)&n.dev, cap);
  if (st) {
    arena_release(c, &n);
    return st;
  }
  if (c->a.cap) c->retired[c->n_retired++] = c->a;
  c->a = n;
  return CANOPY_OK;
}

/* Takes `bytes` of the area (16-byte aligned): *host to fill, *dev where the upload lands. */
static int arena_take(cuda_ctx *c, size_t bytes, void **host, void **dev) {
  bytes = (bytes + 15) & ~(size_t)15;
  int st = arena_grow(c, bytes);
  if (st) return st;
  *host = c->a.host + c->a.used;
  *dev = c->a.dev + c->a.used;
  c->a.used += bytes;
  return CANOPY_OK;
}

static size_t slot_of(const cuda_ctx *c, const void *host) {
  uintptr_t h = (uintptr_t)host;
  h ^= h >> 17;
  h *= 0x9E3779B97F4A7C15ull;
  return (size_t)(h >> 20) & (c->map_cap - 1);
}

static int map_grow(cuda_ctx *c) {
  if (2 * (c->map_used + 1) <= c->map_cap) return CANOPY_OK;
  size_t old_cap = c->map_cap, cap = old_cap ? 2 * old_cap : 256;
  staged *old = c->map, *map = calloc(cap, sizeof *map);
  if (!map) return cn_error(CANOPY_ERR_NO_MEMORY, "cuda backend: no memory for a %zu-entry staging map", cap);
  c->map = map;
  c->map_cap = cap;
  c->map_used = 0;
  for (size_t i = 0; i < old_cap; i++) {
    if (old[i].gen != c->gen || !old[i].host) continue;
    size_t k = slot_of(c, old[i].host);
    while (map[k].gen == c->gen && map[k].host)
      k = (k + 1) & (cap - 1);
    map[k] = old[i];
    c->map_used++;
  }
  free(old);
  return CANOPY_OK;
}

/* The device copy of host array [host, host + bytes) for this forward: staged once, found again
 * by address. NULL (with the failure kept) when staging fails. */
static const void *dev_of(cuda_ctx *c, const void *host, size_t bytes) {
  if (c->status || !host) return NULL;
  if (keep(c, map_grow(c))) return NULL;
  size_t k = slot_of(c, host);
  while (c->map[k].gen == c->gen && c->map[k].host) {
    if (c->map[k].host == host && c->map[k].bytes >= bytes) return c->map[k].dev;
    if (c->map[k].host == host) break; /* staged shorter: stage again, in the same entry */
    k = (k + 1) & (c->map_cap - 1);
  }
  void *h, *d;
  if (keep(c, arena_take(c, bytes, &h, &d))) return NULL;
  memcpy(h, host, bytes);
  if (keep(c, cn_cuda_memcpy_h2d_async(c->cu, d, h, bytes))) return NULL;
  if (!(c->map[k].gen == c->gen && c->map[k].host)) c->map_used++;
  c->map[k] = (staged){.host = host, .bytes = bytes, .dev = d, .gen = c->gen};
  return d;
}

static int cuda_begin(void *ctx) {
  cuda_ctx *c = ctx;
  /* The previous forward's uploads and the KV copies queued since must be done before their
   * page-locked source bytes are reused; the stream is normally idle here (to_host waited). */
  int st = cn_cuda_sync(c->cu);
  for (int i = 0; i < c->n_retired; i++)
    arena_release(c, &c->retired[i]);
  c->n_retired = 0;
  c->a.used = 0;
  c->gen++;
  c->map_used = 0;
  c->status = CANOPY_OK;
  return st;
}

static int cuda_end(void *ctx) { return ((cuda_ctx *)ctx)->status; }

/* ---- memory and weights ---------------------------------------------------------------------- */

static void cuda_destroy(void *ctx) {
  cuda_ctx *c = ctx;
  arena_release(c, &c->a);
  for (int i = 0; i < c->n_retired; i++)
    arena_release(c, &c->retired[i]);
  cn_cuda_free(c->cu, c->copy_tmp);
  cn_cuda_free(c->cu, c->ta_ws);
  cn_cuda_free(c->cu, c->top_dev);
  cn_cuda_free(c->cu, c->top_logp_dev);
  cn_cuda_free(c->cu, c->sample_ws);
  cn_cuda_ctx_free(c->cu);
  free(c->ta_host);
  free(c->map);
  free(c->load_buf);
  free(c->load_f32);
  free(c);
}

/* Block tables are staged per forward: nothing to size ahead. */
static int cuda_reserve(void *ctx, int max_blocks) { return CANOPY_OK; }

static void *cuda_alloc(void *ctx, size_t bytes) {
  void *p = NULL;
  return cn_cuda_malloc(((cuda_ctx *)ctx)->cu, &p, bytes) ? NULL : p;
}

static void cuda_release(void *ctx, void *p) { cn_cuda_free(((cuda_ctx *)ctx)->cu, p); }

/* fp32 -> bf16 bits, rounding to nearest even; NaN stays a (quiet) NaN. */
static uint16_t bf16_of(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static int cuda_load(void *ctx, void *dst, size_t at, const cn_st_tensor *t) {
  cuda_ctx *c = ctx;
  size_t n = 1;
  for (int i = 0; i < t->ndim; i++)
    n *= (size_t)t->shape[i];
  if (n > c->load_cap) {
    free(c->load_buf);
    free(c->load_f32);
    c->load_buf = malloc(n * sizeof *c->load_buf);
    c->load_f32 = malloc(n * sizeof *c->load_f32);
    c->load_cap = c->load_buf && c->load_f32 ? n : 0;
    if (!c->load_cap)
      return cn_error(CANOPY_ERR_NO_MEMORY, "cuda backend: no host memory to convert %s (%zu elements)", t->name, n);
  }
  /* Every checkpoint dtype goes through fp32 (exact for F16 and BF16), then rounds once. */
  cn_st_to_f32(t, c->load_f32);
  for (size_t i = 0; i < n; i++)
    c->load_buf[i] = bf16_of(c->load_f32[i]);
  int st = cn_cuda_memcpy_h2d(c->cu, (cn_bf16 *)dst + at, c->load_buf, n * sizeof(cn_bf16));
  return st ? cn_error_wrap(st, "uploading %s from %s", t->name, t->file) : CANOPY_OK;
}

static int cuda_random(void *ctx, void *dst, size_t at, size_t n, uint64_t stream, float scale, float mean) {
  return cn_cuda_random_bf16(((cuda_ctx *)ctx)->cu, (cn_bf16 *)dst + at, n, stream, scale, mean);
}

/* ---- the KV pool's storage: device bf16 -------------------------------------------------------- */

static void *kv_alloc(void *ctx, size_t bytes) {
  cuda_ctx *c = ctx;
  void *p = NULL;
  if (cn_cuda_malloc(c->cu, &p, bytes)) return NULL;
  if (cn_cuda_memset(c->cu, p, 0, bytes) || cn_cuda_sync(c->cu)) {
    cn_cuda_free(c->cu, p);
    return NULL;
  }
  return p;
}

static void kv_release(void *ctx, void *data) { cn_cuda_free(((cuda_ctx *)ctx)->cu, data); }

static int kv_copy(void *ctx, void *data, const cn_kv_span *spans, int n) {
  cuda_ctx *c = ctx;
  size_t total = 0;
  for (int i = 0; i < n; i++)
    total += spans[i].n;
  size_t tmp_bytes = total * sizeof(cn_bf16);
  if (tmp_bytes > c->copy_tmp_bytes) {
    /* Copies queued earlier may still read the old buffer. */
    int st = cn_cuda_sync(c->cu);
    if (st) return st;
    cn_cuda_free(c->cu, c->copy_tmp);
    c->copy_tmp = NULL;
    c->copy_tmp_bytes = 0;
    if ((st = cn_cuda_malloc(c->cu, &c->copy_tmp, tmp_bytes))) return st;
    c->copy_tmp_bytes = tmp_bytes;
  }
  cn_cuda_span *h, *d;
  int st = arena_take(c, sizeof *h * (size_t)n, (void **)&h, (void **)&d);
  if (st) return st;
  uint64_t at = 0;
  for (int i = 0; i < n; i++) {
    h[i] = (cn_cuda_span){.dst = spans[i].dst, .src = spans[i].src, .n = spans[i].n, .tmp = at};
    at += spans[i].n;
  }
  st = cn_cuda_memcpy_h2d_async(c->cu, d, h, sizeof *h * (size_t)n);
  if (!st) st = cn_cuda_copy_spans(c->cu, data, sizeof(cn_bf16), d, n, c->copy_tmp);
  return st;
}

static const cn_kv_storage cuda_kv_storage = {
    .name = "cuda bf16",
    .elem_bytes = sizeof(cn_bf16),
    .alloc = kv_alloc,
    .release = kv_release,
    .copy = kv_copy,
};

/* One layer of the pool as the kernels see it, without a block table. */
static cn_cuda_paged_kv layer_view(cn_kv_pool *pool, int layer) {
  const cn_kv_layout *L = cn_kv_pool_layout(pool);
  size_t half = (size_t)L->block_size * L->n_kv_heads * L->head_dim;
  cn_bf16 *k = (cn_bf16 *)cn_kv_pool_data(pool) + (size_t)layer * 2 * half;
  return (cn_cuda_paged_kv){
      .k = k, .v = k + half, .block_stride = (size_t)L->n_layers * 2 * half, .block_size = L->block_size};
}

/* One layer of a sequence's paged KV as the kernels see it; block_table NULL if staging failed. */
static cn_cuda_paged_kv view_of(cuda_ctx *c, cn_kv_pool *pool, const cn_kv_seq *seq, int layer) {
  int nb;
  const int *table = cn_kv_seq_blocks(seq, &nb);
  cn_cuda_paged_kv kv = layer_view(pool, layer);
  kv.block_table = dev_of(c, table, sizeof(int32_t) * (size_t)nb);
  return kv;
}

/* ---- ops ------------------------------------------------------------------------------------- */

static void cuda_embed(void *ctx, void *x, const void *table, const int32_t *tokens, int n, int dim) {
  cuda_ctx *c = ctx;
  const int32_t *t = dev_of(c, tokens, sizeof *tokens * (size_t)n);
  if (t) keep(c, cn_cuda_embed(c->cu, x, CN_CUDA_F32, table, t, n, dim));
}

static void cuda_rmsnorm(void *ctx, void *out, const void *x, const void *w, int n, int dim, float eps) {
  cuda_ctx *c = ctx;
  if (!c->status) keep(c, cn_cuda_rmsnorm(c->cu, out, CN_CUDA_F32, x, CN_CUDA_F32, w, n, dim, eps));
}

static void cuda_matmul(void *ctx, void *y, const void *x, const void *w, const void *bias, int n, int in, int out) {
  cuda_ctx *c = ctx;
  if (!c->status) keep(c, cn_cuda_matmul(c->cu, y, CN_CUDA_F32, x, CN_CUDA_F32, w, bias, n, in, out));
}

static void cuda_rope(void *ctx, void *x, const int32_t *pos, int n, int n_heads, int head_dim, const float *inv_freq) {
  cuda_ctx *c = ctx;
  const int32_t *p = dev_of(c, pos, sizeof *pos * (size_t)n);
  const float *f = dev_of(c, inv_freq, sizeof *inv_freq * (size_t)(head_dim / 2));
  if (p && f) keep(c, cn_cuda_rope(c->cu, x, CN_CUDA_F32, p, n, n_heads, head_dim, f));
}

static void cuda_swiglu(void *ctx, void *out, const void *gate_up, int n, int d) {
  cuda_ctx *c = ctx;
  if (!c->status) keep(c, cn_cuda_swiglu(c->cu, out, gate_up, CN_CUDA_F32, n, d));
}

static void cuda_add(void *ctx, void *x, const void *y, size_t n) {
  cuda_ctx *c = ctx;
  if (!c->status) keep(c, cn_cuda_add(c->cu, x, CN_CUDA_F32, y, CN_CUDA_F32, n));
}

static void cuda_split_qkv(void *ctx, void *q, void *k, void *v, const void *qkv, int n, int q_dim, int kv_dim) {
  cuda_ctx *c = ctx;
  size_t row = sizeof(float) * ((size_t)q_dim + 2 * (size_t)kv_dim), qb = sizeof(float) * (size_t)q_dim,
         kb = sizeof(float) * (size_t)kv_dim;
  const char *src = qkv;
  if (!c->status) keep(c, cn_cuda_memcpy_2d(c->cu, q, qb, src, row, qb, (size_t)n));
  if (!c->status) keep(c, cn_cuda_memcpy_2d(c->cu, k, kb, src + qb, row, kb, (size_t)n));
  if (!c->status) keep(c, cn_cuda_memcpy_2d(c->cu, v, kb, src + qb + kb, row, kb, (size_t)n));
}

static void cuda_gather_rows(void *ctx, void *dst, const void *src, const int32_t *rows, int n, int dim) {
  cuda_ctx *c = ctx;
  const int32_t *r = dev_of(c, rows, sizeof *rows * (size_t)n);
  if (r) keep(c, cn_cuda_gather_rows(c->cu, dst, src, CN_CUDA_F32, r, n, dim));
}

static void cuda_kv_write(void *ctx, cn_kv_pool *pool, const cn_kv_seq *seq, int layer, int first_slot, const void *k,
                          const void *v, int n, int kv_dim) {
  cuda_ctx *c = ctx;
  cn_cuda_paged_kv kv = view_of(c, pool, seq, layer);
  if (kv.block_table) keep(c, cn_cuda_kv_write(c->cu, &kv, first_slot, k, v, CN_CUDA_F32, n, kv_dim));
}

static void cuda_attention(void *ctx, void *out, const void *q, const cn_attn_desc *d) {
  cuda_ctx *c = ctx;
  int words = (d->q_offset + d->n + 63) / 64;
  cn_cuda_attn_args a = {.out = out,
                         .q = q,
                         .dt = CN_CUDA_F32,
                         .kv = view_of(c, d->pool, d->seq, d->layer),
                         .n = d->n,
                         .ctx_len = d->ctx_len,
                         .q_offset = d->q_offset,
                         .pos = dev_of(c, d->pos, sizeof(int32_t) * (size_t)(d->q_offset + d->n)),
                         .tree_mask =
                             d->tree_mask ? dev_of(c, d->tree_mask, sizeof(uint64_t) * (size_t)d->n * words) : NULL,
                         .mask_words = words,
                         .n_heads = d->n_heads,
                         .n_kv_heads = d->n_kv_heads,
                         .head_dim = d->head_dim,
                         .sliding_window = d->sliding_window,
                         .scale = d->scale};
  if (!c->status) keep(c, cn_cuda_attention(c->cu, &a));
}

static size_t align16(size_t n) { return (n + 15) & ~(size_t)15; }

/* Stages a batch's descriptors, block tables, positions and masks as one upload (laid out in that
 * order, 16-byte aligned) and returns its device copy; the layers after the first find the same
 * bytes and reuse it. NULL (with the failure kept) when staging fails. */
static char *stage_tree_batch(cuda_ctx *c, const cn_attn_desc *d, int n_seqs, size_t *at_tables, size_t *at_pos,
                              size_t *at_mask) {
  size_t n_tables = 0, n_pos = 0, n_mask = 0;
  for (int s = 0; s < n_seqs; s++) {
    int nb;
    cn_kv_seq_blocks(d[s].seq, &nb);
    n_tables += (size_t)nb;
    n_pos += (size_t)(d[s].q_offset + d[s].n);
    if (d[s].tree_mask) n_mask += (size_t)d[s].n * ((d[s].q_offset + d[s].n + 63) / 64);
  }
  *at_tables = align16(sizeof(cn_cuda_tree_seq) * (size_t)n_seqs);
  *at_pos = *at_tables + align16(sizeof(int32_t) * n_tables);
  *at_mask = *at_pos + align16(sizeof(int32_t) * n_pos);
  size_t bytes = *at_mask + sizeof(uint64_t) * n_mask;
  if (bytes > c->ta_host_cap) {
    void *p = realloc(c->ta_host, bytes);
    if (!p) {
      keep(c, cn_error(CANOPY_ERR_NO_MEMORY, "cuda backend: no host memory to stage %zu bytes of attention batch", bytes));
      return NULL;
    }
    c->ta_host = p;
    c->ta_host_cap = bytes;
  }
  char *h = c->ta_host;
  memset(h, 0, bytes);
  cn_cuda_tree_seq *desc = (cn_cuda_tree_seq *)h;
  int32_t *tables = (int32_t *)(h + *at_tables), *pos = (int32_t *)(h + *at_pos);
  uint64_t *mask = (uint64_t *)(h + *at_mask);
  int row = 0, t0 = 0, p0 = 0, m0 = 0;
  for (int s = 0; s < n_seqs; s++) {
    int nb, words = (d[s].q_offset + d[s].n + 63) / 64, m = d[s].q_offset + d[s].n;
    const int *table = cn_kv_seq_blocks(d[s].seq, &nb);
    memcpy(tables + t0, table, sizeof(int32_t) * (size_t)nb);
    memcpy(pos + p0, d[s].pos, sizeof(int32_t) * (size_t)m);
    if (d[s].tree_mask) memcpy(mask + m0, d[s].tree_mask, sizeof(uint64_t) * (size_t)d[s].n * words);
    desc[s] = (cn_cuda_tree_seq){.ctx_len = d[s].ctx_len, .q_offset = d[s].q_offset, .n = d[s].n, .row0 = row,
                                 .pos0 = p0, .mask0 = d[s].tree_mask ? m0 : -1, .mask_words = words, .table0 = t0};
    row += d[s].n;
    t0 += nb;
    p0 += m;
    m0 += d[s].tree_mask ? d[s].n * words : 0;
  }
  if (c->ta_gen == c->gen && c->ta_bytes == bytes && c->ta_dev) {
    /* Compare with what the arena holds for the last staged batch (its host side). */
    const char *last = (const char *)c->ta_dev - c->a.dev + c->a.host;
    if ((char *)c->ta_dev >= c->a.dev && (char *)c->ta_dev + bytes <= c->a.dev + c->a.used && !memcmp(last, h, bytes))
      return c->ta_dev;
  }
  void *hd, *dd;
  if (keep(c, arena_take(c, bytes, &hd, &dd))) return NULL;
  memcpy(hd, h, bytes);
  if (keep(c, cn_cuda_memcpy_h2d_async(c->cu, dd, hd, bytes))) return NULL;
  c->ta_gen = c->gen;
  c->ta_dev = dd;
  c->ta_bytes = bytes;
  return dd;
}

/* The shared-prefix tree kernel for the whole batch in one launch; head sizes it does not cover
 * take the per-sequence kernel. */
static void cuda_attention_batch(void *ctx, void *out, const void *q, const cn_attn_desc *d, int n_seqs) {
  cuda_ctx *c = ctx;
  if (c->status || n_seqs <= 0) return;
  int hd = d[0].head_dim, n_heads = d[0].n_heads, n_kv = d[0].n_kv_heads;
  if (!cn_cuda_tree_attn_supported(hd)) {
    size_t row = 0;
    for (int s = 0; s < n_seqs; s++) {
      size_t at = row * (size_t)n_heads * hd;
      cuda_attention(ctx, (float *)out + at, (const float *)q + at, &d[s]);
      row += (size_t)d[s].n;
    }
    return;
  }
  size_t at_tables, at_pos, at_mask;
  char *dev = stage_tree_batch(c, d, n_seqs, &at_tables, &at_pos, &at_mask);
  if (!dev) return;
  int max_n = 0, max_keys = 0, any_tree = 0;
  for (int s = 0; s < n_seqs; s++) {
    int keys = d[s].ctx_len + d[s].q_offset + d[s].n;
    max_n = d[s].n > max_n ? d[s].n : max_n;
    max_keys = keys > max_keys ? keys : max_keys;
    any_tree |= d[s].tree_mask != NULL;
  }
  /* Powers of two, so that the launch shape (and a captured graph's) changes only at doublings. */
  int keys_bucket = 64;
  while (keys_bucket < max_keys) keys_bucket *= 2;
  /* Batch-invariant mode keeps one split: the split boundaries follow from the key count and the
   * split count, both of which change with the node count, and so would a row's rounding. */
  int splits = c->batch_invariant ? 1 : cn_cuda_tree_attn_splits(c->cu, n_seqs, max_n, keys_bucket, n_heads, n_kv, hd);
  size_t ws = cn_cuda_tree_attn_workspace(n_seqs, max_n, splits, n_heads, n_kv, hd);
  if (ws > c->ta_ws_bytes) {
    /* Launches queued earlier may still use the old workspace. */
    if (keep(c, cn_cuda_sync(c->cu))) return;
    cn_cuda_free(c->cu, c->ta_ws);
    c->ta_ws = NULL;
    c->ta_ws_bytes = 0;
    if (keep(c, cn_cuda_malloc(c->cu, (void **)&c->ta_ws, 2 * ws))) return;
    c->ta_ws_bytes = 2 * ws;
  }
  cn_cuda_paged_kv kv = layer_view(d[0].pool, d[0].layer);
  cn_cuda_tree_attn_args a = {.out = out,
                              .q = q,
                              .dt = CN_CUDA_F32,
                              .k = kv.k,
                              .v = kv.v,
                              .block_stride = kv.block_stride,
                              .block_size = kv.block_size,
                              .block_tables = (const int32_t *)(dev + at_tables),
                              .pos = (const int32_t *)(dev + at_pos),
                              .tree_mask = any_tree ? (const uint64_t *)(dev + at_mask) : NULL,
                              .seqs = (const cn_cuda_tree_seq *)dev,
                              .n_seqs = n_seqs,
                              .max_n = max_n,
                              .n_splits = splits,
                              .n_heads = n_heads,
                              .n_kv_heads = n_kv,
                              .head_dim = hd,
                              .sliding_window = d[0].sliding_window,
                              .scale = d[0].scale,
                              .workspace = c->ta_ws};
  keep(c, cn_cuda_tree_attention(c->cu, &a));
}

static void cuda_top_rows(void *ctx, int32_t *ids, float *logp, const void *logits, int rows, int vocab, int k) {
  cuda_ctx *c = ctx;
  if (!c->status && (rows > TOP_ROWS || k < 1 || k > TOP_K))
    keep(c, cn_error(CANOPY_ERR_INVALID_ARG, "cuda top_rows: %d rows, k = %d (at most %d rows and k = %d a call)",
                     rows, k, TOP_ROWS, TOP_K));
  if (c->status) return;
  size_t n = (size_t)rows * k;
  if (k == 1 && !logp) keep(c, cn_cuda_argmax(c->cu, c->top_dev, logits, CN_CUDA_F32, rows, vocab));
  else keep(c, cn_cuda_top_k(c->cu, c->top_dev, logp ? c->top_logp_dev : NULL, logits, CN_CUDA_F32, rows, vocab, k));
  if (!c->status) keep(c, cn_cuda_memcpy_d2h(c->cu, ids, c->top_dev, sizeof *ids * n));
  if (!c->status && logp) keep(c, cn_cuda_memcpy_d2h(c->cu, logp, c->top_logp_dev, sizeof *logp * n));
}

/* The sampler's sort buffers are sized for the largest vocab seen, once (not in the decode loop). */
static int sample_ws_for(cuda_ctx *c, int vocab) {
  if (vocab <= c->sample_vocab) return CANOPY_OK;
  size_t bytes;
  int st = cn_cuda_sample_workspace(c->cu, TOP_ROWS, vocab, &bytes);
  if (!st) st = cn_cuda_sync(c->cu); /* launches queued earlier may still use the old buffer */
  if (st) return st;
  cn_cuda_free(c->cu, c->sample_ws);
  c->sample_ws = NULL;
  c->sample_vocab = 0;
  if ((st = cn_cuda_malloc(c->cu, &c->sample_ws, bytes))) return st;
  c->sample_ws_bytes = bytes;
  c->sample_vocab = vocab;
  return CANOPY_OK;
}

static int cuda_sample_rows(void *ctx, int32_t *ids, const void *logits, int rows, int vocab, const cn_sample_rule *r,
                            const double *u) {
  cuda_ctx *c = ctx;
  if (!c->status && rows > TOP_ROWS)
    keep(c, cn_error(CANOPY_ERR_INVALID_ARG, "cuda sample_rows: %d rows (at most %d a call)", rows, TOP_ROWS));
  const double *u_dev = c->status ? NULL : dev_of(c, u, sizeof *u * (size_t)rows);
  if (u_dev && !keep(c, sample_ws_for(c, vocab)))
    keep(c, cn_cuda_sample(c->cu, c->top_dev, logits, rows, vocab, r->temperature, r->top_k, r->top_p, u_dev,
                           c->sample_ws, c->sample_ws_bytes));
  if (!c->status) keep(c, cn_cuda_memcpy_d2h(c->cu, ids, c->top_dev, sizeof *ids * (size_t)rows));
  return c->status;
}

static void cuda_norm_matmul(void *ctx, void *y, const void *x, const void *norm_w, float eps, const void *w,
                             const void *bias, int n, int in, int out) {
  cuda_ctx *c = ctx;
  if (!c->status) keep(c, cn_cuda_norm_matmul(c->cu, y, CN_CUDA_F32, x, norm_w, eps, w, bias, n, in, out));
}

static void cuda_swiglu_matmul_add(void *ctx, void *x, const void *gate_up, const void *w, const void *bias, int n,
                                   int d, int out) {
  cuda_ctx *c = ctx;
  if (!c->status) keep(c, cn_cuda_swiglu_matmul_add(c->cu, x, gate_up, w, bias, n, d, out));
}

static void cuda_qkv_rope(void *ctx, void *q, void *k, void *v, const void *qkv, const int32_t *pos, int n,
                          int n_heads, int n_kv_heads, int head_dim, const float *inv_freq) {
  cuda_ctx *c = ctx;
  const int32_t *p = dev_of(c, pos, sizeof *pos * (size_t)n);
  const float *f = dev_of(c, inv_freq, sizeof *inv_freq * (size_t)(head_dim / 2));
  if (p && f) keep(c, cn_cuda_qkv_rope(c->cu, q, k, v, qkv, p, n, n_heads, n_kv_heads, head_dim, f));
}

static void cuda_to_host(void *ctx, float *dst, const void *src, size_t n) {
  cuda_ctx *c = ctx;
  if (!c->status) keep(c, cn_cuda_memcpy_d2h(c->cu, dst, src, sizeof(float) * n));
}

static const cn_backend cuda_backend = {
    .name = "cuda",
    .weight_elem_bytes = sizeof(cn_bf16),
    .kv_storage = &cuda_kv_storage,
    .destroy = cuda_destroy,
    .begin = cuda_begin,
    .end = cuda_end,
    .reserve = cuda_reserve,
    .alloc = cuda_alloc,
    .release = cuda_release,
    .load = cuda_load,
    .random = cuda_random,
    .embed = cuda_embed,
    .rmsnorm = cuda_rmsnorm,
    .matmul = cuda_matmul,
    .rope = cuda_rope,
    .swiglu = cuda_swiglu,
    .add = cuda_add,
    .split_qkv = cuda_split_qkv,
    .gather_rows = cuda_gather_rows,
    .kv_write = cuda_kv_write,
    .attention_batch = cuda_attention_batch,
    .to_host = cuda_to_host,
    .top_rows = cuda_top_rows,
    .sample_rows = cuda_sample_rows,
    .norm_matmul = cuda_norm_matmul,
    .swiglu_matmul_add = cuda_swiglu_matmul_add,
    .qkv_rope = cuda_qkv_rope,
};

struct cn_cuda_ctx *cn_backend_cuda_ctx(const cn_backend *be, void *ctx) {
  return be == &cuda_backend ? ((cuda_ctx *)ctx)->cu : NULL;
}

int cn_backend_cuda_create(int device, const cn_backend **be, void **ctx) {
  int n = cn_cuda_device_count();
  if (device < 0 || device >= n)
    return cn_error(CANOPY_ERR_DEVICE, "cuda device %d requested, but %s", device,
                    n ? "it is not visible" : "no CUDA device is visible (no GPU or no driver)");
  cuda_ctx *c = calloc(1, sizeof *c);
  if (!c) return cn_error(CANOPY_ERR_NO_MEMORY, "cuda backend: out of host memory");
  int st = cn_cuda_ctx_create(device, &c->cu);
  if (!st) st = map_grow(c);
  if (!st) st = arena_grow(c, ARENA_MIN / 2);
  if (!st) st = cn_cuda_malloc(c->cu, (void **)&c->top_dev, sizeof *c->top_dev * TOP_ROWS * TOP_K);
  if (!st) st = cn_cuda_malloc(c->cu, (void **)&c->top_logp_dev, sizeof *c->top_logp_dev * TOP_ROWS * TOP_K);
  const char *inv = getenv("CANOPY_CUDA_BATCH_INVARIANT");
  c->batch_invariant = inv && !strcmp(inv, "1");
  if (!st) st = cn_cuda_set_batch_invariant(c->cu, c->batch_invariant);
  if (st) {
    cuda_destroy(c);
    return st;
  }
  c->gen = 1;
  *be = &cuda_backend;
  *ctx = c;
  return CANOPY_OK;
}

#endif
