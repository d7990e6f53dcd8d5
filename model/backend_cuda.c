/* The CUDA backend: bf16 weights and KV cache on the device, fp32 activations (the matmul
 * launcher rounds its fp32 input to bf16 for cuBLAS), the kernels/cuda launchers behind the table.
 *
 * Inputs. `begin` gets all of a forward's host inputs (cn_fwd_io) and lays them out in one block
 * of a page-locked staging area: tokens, positions, logit rows, inv_freq, each token's physical KV
 * slot, and the attention batch (descriptors, block tables at a fixed stride of max_blocks per
 * sequence, tree positions, masks). One asynchronous copy uploads the block. The ops receive the
 * same host pointers and find the device copies by address (dev_of); an array begin did not stage
 * (the per-sequence attention fallback's block tables) is staged on the spot.
 *
 * Graphs. For a forward of a given shape (graph_key: token, sequence and logit counts, top ids or
 * logits, the attention key bucket, the longest sequence, positions and mask words, a sampled
 * forward's rule and probability rows) the block has the same layout and lands at the same device
 * address every time, and no kernel argument depends on anything else. So the first forward of a
 * shape runs its ops (and grows every buffer it needs), the second is captured into a CUDA graph,
 * and later ones upload their block and replay the graph: one launch instead of ~12 per layer.
 * Anything a graph references moving (the staging area, the split workspace, the argmax output,
 * the GEMM scratch) drops all graphs.
 *
 * Host synchronisation: `end` waits once per forward, for its outputs (argmax ids or logits, one
 * copy). Nothing else in a forward waits, except growing a buffer (first use of a larger shape).
 * KV span copies between forwards (commit, copy-on-write) upload from their own page-locked buffer
 * and do not wait either; that buffer is reused only after the next forward's wait. */
#include "model/backend.h"
#include "model/forward.h"

#include "common/error.h"

#ifndef CANOPY_HAVE_CUDA

struct cn_cuda_ctx *cn_backend_cuda_ctx(const cn_backend *be, void *ctx) { return NULL; }
void cn_backend_cuda_set_graphs(const cn_backend *be, void *ctx, int max_graphs) {}
void cn_backend_cuda_graph_stats(const cn_backend *be, void *ctx, long *replays, long *captures) {
  *replays = 0, *captures = 0;
}

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
#include "model/graph_cache.h"

#ifndef ARENA_MIN
#define ARENA_MIN (256u << 10) /* bytes; grown on demand */
#endif
#define MAX_RETIRED 8
#define TOP_ROWS CN_LOGIT_CHUNK /* rows per top_rows call (the forward's LM-head chunk) */
#define TOP_K 32                /* most picks per row */
#define MAX_GRAPHS 64
#define MIN_SPANS 256

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

enum { EAGER, CAPTURE, REPLAY };

/* A cn_ids buffer: the ids, and the event marking the last forward that wrote them (on its
 * context's stream), which a reader on another stream waits for. */
typedef struct cuda_ids {
  int32_t *dev;
  cn_cuda_event *written;
} cuda_ids;

typedef struct cuda_ctx {
  cn_cuda_ctx *cu;
  int status; /* first failure since begin (ops return nothing) */
  int mode;   /* this forward: ops run (EAGER), are recorded (CAPTURE), or were replayed by begin */
  cn_fwd_io io;
  cn_graph_cache graphs;
  cn_graph_slot *cur;     /* the graph being captured or replayed */
  const float *cap_logits; /* the device logits a captured forward's to_host reads */
  unsigned scratch_gen;   /* cn_cuda_scratch_gen when the cached graphs were captured */
  long replays, captures;
  /* The staged block of this forward (device side). */
  const int32_t *slots;   /* [n_tokens] physical KV slot of each token: block * block_size + row */
  char *tb;               /* the attention batch: descriptors at 0, then tables, positions, masks */
  const cn_cuda_tree_seq *tb_seqs; /* its descriptors as staged, host side (where each sequence's rows are) */
  size_t at_tables, at_pos, at_mask;
  int max_n, any_tree, keys_bucket, max_blocks;
  /* This forward's q and attention output where they are held in bf16: on the tree kernel's path,
   * which rounds Q to bf16 as it loads it and whose output the o projection rounds to bf16 as it
   * reads it. Stored rounded, they are the same bits at half the bytes, and the fp32 -> bf16 pass
   * before an unfused GEMM (2+ rows) is gone. NULL where they are fp32. */
  const void *q_bf16, *attn_bf16;
  cn_cuda_span *span_h, *span_d; /* [span_cap] kv_copy's spans, host and device */
  int span_cap, span_used;
  arena a;
  arena retired[MAX_RETIRED]; /* outgrown areas whose uploads this forward may still read */
  int n_retired;
  staged *map; /* [map_cap] open addressing by host address; map_cap a power of 2 */
  size_t map_cap, map_used;
  unsigned gen;
  void *copy_tmp; /* device staging of KV span copies, copy_tmp_bytes long */
  int32_t *top_dev;    /* [top_cap] top_rows' device ids, a forward's rows one after the other */
  int32_t *tok_dev;    /* this forward's tokens as staged (token_src gathers into them) */
  int32_t *pos_dev;    /* and its positions (a dynamic tree's staging writes them) */
  const int32_t *src_dev, *parent_dev; /* its token_src and accept_parent as staged */
  float *const *prow_dev; /* [n_logits] staged: the verification's probability rows (accept_rows + i vocab) */
  int32_t *acc_dev;    /* [acc_cap] accept_greedy's result */
  int acc_cap;
  /* A chained forward (top_ids, no host outputs) ends without waiting for the device; staged marks
   * its uploads, which the next forward waits for before refilling the staging area. */
  cn_cuda_event *staged;
  int unsynced;
  float *top_logp_dev; /* [top_cap] and their log-softmax */
  int top_cap, top_used; /* elements (rows x k) */
  void *sample_ws;  /* cn_cuda_sample's workspace for TOP_ROWS rows of sample_vocab, grown on first use */
  size_t sample_ws_bytes;
  int sample_vocab;
  int batch_invariant; /* $CANOPY_CUDA_BATCH_INVARIANT=1 at creation: see cn_backend_cuda_create */
  size_t copy_tmp_bytes;
  float *ta_ws; /* tree attention's split workspace */
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
  cn_graph_cache_clear(&c->graphs); /* their blocks were in the old area */
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

/* Records that host array [host, host + bytes) is at dev for this forward (staged by begin). */
static int map_put(cuda_ctx *c, const void *host, size_t bytes, void *dev) {
  if (!host || !bytes) return CANOPY_OK;
  int st = map_grow(c);
  if (st) return st;
  size_t k = slot_of(c, host);
  while (c->map[k].gen == c->gen && c->map[k].host && c->map[k].host != host)
    k = (k + 1) & (c->map_cap - 1);
  if (!(c->map[k].gen == c->gen && c->map[k].host)) c->map_used++;
  c->map[k] = (staged){.host = host, .bytes = bytes, .dev = dev, .gen = c->gen};
  return CANOPY_OK;
}


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
  cn_cuda_free(c->cu, c->acc_dev);
  cn_cuda_event_free(c->staged);
  cn_cuda_free(c->cu, c->sample_ws);
  cn_cuda_host_free(c->cu, c->span_h);
  cn_cuda_free(c->cu, c->span_d);
  cn_graph_cache_free(&c->graphs);
  cn_cuda_ctx_free(c->cu);
  free(c->map);
  free(c->load_buf);
  free(c->load_f32);
  free(c);
}

/* Block tables are staged per forward at a stride of max_blocks, so that the layout of a forward's
 * block depends on its shape only. */
static int cuda_reserve(void *ctx, int max_blocks) {
  cuda_ctx *c = ctx;
  if (max_blocks > c->max_blocks) {
    c->max_blocks = max_blocks;
    cn_graph_cache_clear(&c->graphs);
  }
  return CANOPY_OK;
}

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
  if (c->span_used + n > c->span_cap) {
    /* Copies queued since the last forward's wait may still read the spans. */
    int st = cn_cuda_sync(c->cu);
    if (st) return st;
    c->span_used = 0;
    if (n > c->span_cap) {
      int cap = 2 * n > MIN_SPANS ? 2 * n : MIN_SPANS;
      cn_cuda_host_free(c->cu, c->span_h);
      cn_cuda_free(c->cu, c->span_d);
      c->span_h = NULL, c->span_d = NULL, c->span_cap = 0;
      if ((st = cn_cuda_host_alloc(c->cu, (void **)&c->span_h, sizeof *c->span_h * (size_t)cap))) return st;
      if ((st = cn_cuda_malloc(c->cu, (void **)&c->span_d, sizeof *c->span_d * (size_t)cap))) return st;
      c->span_cap = cap;
    }
  }
  cn_cuda_span *h = c->span_h + c->span_used, *d = c->span_d + c->span_used;
  c->span_used += n;
  int st;
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

/* The dtype of an activation a GEMM reads: fp32 but for the attention output held in bf16. */
static cn_cuda_dtype act_dt(const cuda_ctx *c, const void *x) {
  return x == c->attn_bf16 ? CN_CUDA_BF16 : CN_CUDA_F32;
}

static void cuda_matmul(void *ctx, void *y, const void *x, const void *w, const void *bias, int n, int in, int out) {
  cuda_ctx *c = ctx;
  if (!c->status) keep(c, cn_cuda_matmul(c->cu, y, CN_CUDA_F32, x, act_dt(c, x), w, bias, n, in, out));
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
  c->q_bf16 = NULL;
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

/* What the launches of a forward depend on (the file comment's "shape"); 0 where it cannot be
 * captured (head sizes the tree kernel does not cover, a block table longer than max_blocks, more
 * logit rows than one LM-head chunk when the logits themselves go to the host). */
static int graph_key(const cuda_ctx *c, const cn_fwd_io *io, int n_pos, int n_mask, cn_graph_key *key) {
  const cn_attn_desc *d = io->desc;
  if (!io->n_seqs || !cn_cuda_tree_attn_supported(d[0].head_dim) || !c->max_blocks) return 0;
  if ((!io->top && io->n_logits > CN_LOGIT_CHUNK) || (io->sample && !io->rule)) return 0;
  for (int s = 0; s < io->n_seqs; s++) {
    int nb;
    cn_kv_seq_blocks(d[s].seq, &nb);
    if (nb > c->max_blocks) return 0;
  }
  /* A sampled forward: its rule's numbers are kernel arguments, and a tree's verification writes
   * the probability rows at accept_rows (the uniforms and row pointers are staged data). */
  const cn_sample_rule *r = io->rule ? io->rule : io->accept_sample;
  int32_t t = 0, p = 0;
  if (r) memcpy(&t, &r->temperature, sizeof t), memcpy(&p, &r->top_p, sizeof p);
  uint64_t rows = (uint64_t)(uintptr_t)io->accept_rows;
  int flags = (io->top_logp ? 1000 : 0) + (io->accept_parent ? 2000 : 0) + (io->rule ? 4000 : 0) +
              (io->accept_sample ? 8000 : 0) + (io->q_out ? 16000 : 0);
  *key = (cn_graph_key){{io->n_tokens, io->n_seqs, io->n_logits, io->top != NULL, c->keys_bucket, c->any_tree,
                         c->max_n, n_pos, n_mask, io->top_k + flags, t, r ? r->top_k : 0, p, (int32_t)(uint32_t)rows,
                         (int32_t)(uint32_t)(rows >> 32)}};
  return 1;
}

/* Lays out and uploads the forward's inputs (the file comment's "Inputs") as one block, and
 * registers its arrays for dev_of. *key_ok: the block's layout is a function of *key. */
static int stage_inputs(cuda_ctx *c, const cn_fwd_io *io, cn_graph_key *key, int *key_ok) {
  const cn_attn_desc *d = io->desc;
  int n = io->n_tokens, ns = io->n_seqs, hd = ns ? d[0].head_dim : 0, tree = ns && cn_cuda_tree_attn_supported(hd);
  int n_pos = 0, n_mask = 0, max_keys = 0, stride = c->max_blocks;
  c->max_n = 0, c->any_tree = 0;
  for (int s = 0; s < ns; s++) {
    int nb, m = d[s].q_offset + d[s].n, keys = d[s].ctx_len + m;
    cn_kv_seq_blocks(d[s].seq, &nb);
    stride = nb > stride ? nb : stride;
    n_pos += m;
    if (d[s].tree_mask) n_mask += d[s].n * ((m + 63) / 64);
    c->max_n = d[s].n > c->max_n ? d[s].n : c->max_n;
    max_keys = keys > max_keys ? keys : max_keys;
    c->any_tree |= d[s].tree_mask != NULL;
  }
  /* Powers of two, so that the launch shape (and a captured graph's) changes only at doublings. */
  c->keys_bucket = 64;
  while (c->keys_bucket < max_keys) c->keys_bucket *= 2;
  *key_ok = graph_key(c, io, n_pos, n_mask, key);

  size_t at_pos = align16(sizeof(int32_t) * (size_t)n), at_rows = at_pos + at_pos,
         at_freq = at_rows + align16(sizeof(int32_t) * (size_t)io->n_logits),
         at_slots = at_freq + align16(sizeof(float) * (size_t)(hd / 2)), at_src = at_slots + at_pos,
         at_parent = at_src + at_pos; /* token_src and accept_parent: always room, so the layout stays a
                                         function of the key */
  /* A sampled forward's uniforms and device row pointers: its draws' (u, and a tree level's q_out)
   * or a tree verification's (the probability rows, accept_q, accept_u). */
  size_t n_u = io->rule ? (size_t)io->n_logits * io->top_k : 0, n_q = io->q_out ? (size_t)io->n_logits : 0,
         n_prow = io->accept_sample ? (size_t)io->n_logits : 0, n_acc = io->accept_sample ? (size_t)n : 0;
  size_t at_u = at_parent + at_pos, at_q = at_u + align16(sizeof(double) * n_u),
         at_prow = at_q + align16(sizeof(float *) * n_q), at_aq = at_prow + align16(sizeof(float *) * n_prow),
         at_au = at_aq + align16(sizeof(float *) * n_acc), at_tb = at_au + align16(sizeof(double) * 2 * n_acc);
  c->at_tables = align16(sizeof(cn_cuda_tree_seq) * (size_t)ns);
  c->at_pos = c->at_tables + align16(sizeof(int32_t) * (size_t)ns * stride);
  c->at_mask = c->at_pos + align16(sizeof(int32_t) * (size_t)n_pos);
  size_t bytes = at_tb + (tree ? c->at_mask + sizeof(uint64_t) * (size_t)n_mask : 0);
  char *h, *dev;
  int st = arena_grow(c, bytes + ARENA_MIN / 4); /* room for what dev_of stages on the spot */
  if (!st) st = arena_take(c, bytes, (void **)&h, (void **)&dev);
  if (st) return st;
  memset(h, 0, bytes);
  memcpy(h, io->tokens, sizeof(int32_t) * (size_t)n);
  memcpy(h + at_pos, io->pos, sizeof(int32_t) * (size_t)n);
  if (io->n_logits) memcpy(h + at_rows, io->logit_rows, sizeof(int32_t) * (size_t)io->n_logits);
  if (hd) memcpy(h + at_freq, io->inv_freq, sizeof(float) * (size_t)(hd / 2));
  if (io->token_src) memcpy(h + at_src, io->token_src, sizeof(int32_t) * (size_t)n);
  if (io->accept_parent) memcpy(h + at_parent, io->accept_parent, sizeof(int32_t) * (size_t)n);
  if (n_u) memcpy(h + at_u, io->u, sizeof(double) * n_u);
  if (n_q) memcpy(h + at_q, io->q_out, sizeof(float *) * n_q);
  for (size_t i = 0; i < n_prow; i++) ((float **)(h + at_prow))[i] = io->accept_rows + i * (size_t)io->vocab;
  if (n_acc) {
    memcpy(h + at_aq, io->accept_q, sizeof(float *) * n_acc);
    memcpy(h + at_au, io->accept_u, sizeof(double) * 2 * n_acc);
  }
  int32_t *slots = (int32_t *)(h + at_slots);
  char *tb = h + at_tb;
  cn_cuda_tree_seq *desc = (cn_cuda_tree_seq *)tb;
  int32_t *tables = (int32_t *)(tb + c->at_tables), *pos = (int32_t *)(tb + c->at_pos);
  uint64_t *mask = (uint64_t *)(tb + c->at_mask);
  int row = 0, p0 = 0, m0 = 0;
  for (int s = 0; s < ns; s++) {
    int nb, words = (d[s].q_offset + d[s].n + 63) / 64, m = d[s].q_offset + d[s].n;
    const int *table = cn_kv_seq_blocks(d[s].seq, &nb);
    int bs = cn_kv_pool_layout(d[s].pool)->block_size;
    for (int i = 0; i < d[s].n; i++) {
      int slot = d[s].ctx_len + d[s].q_offset + i;
      slots[row + i] = table[slot / bs] * bs + slot % bs;
    }
    if (tree) {
      memcpy(tables + (size_t)s * stride, table, sizeof(int32_t) * (size_t)nb);
      memcpy(pos + p0, d[s].pos, sizeof(int32_t) * (size_t)m);
      if (d[s].tree_mask) memcpy(mask + m0, d[s].tree_mask, sizeof(uint64_t) * (size_t)d[s].n * words);
      desc[s] = (cn_cuda_tree_seq){.ctx_len = d[s].ctx_len, .q_offset = d[s].q_offset, .n = d[s].n, .row0 = row,
                                   .pos0 = p0, .mask0 = d[s].tree_mask ? m0 : -1, .mask_words = words,
                                   .table0 = s * stride};
    }
    row += d[s].n;
    p0 += m;
    m0 += d[s].tree_mask ? d[s].n * words : 0;
  }
  if ((st = cn_cuda_memcpy_h2d_async(c->cu, dev, h, bytes))) return st;
  c->slots = (const int32_t *)(dev + at_slots);
  c->tok_dev = (int32_t *)dev;
  c->pos_dev = (int32_t *)(dev + at_pos);
  c->src_dev = (const int32_t *)(dev + at_src);
  c->parent_dev = (const int32_t *)(dev + at_parent);
  c->prow_dev = (float *const *)(dev + at_prow);
  c->tb = tree ? dev + at_tb : NULL;
  c->tb_seqs = tree ? desc : NULL;
  st = map_put(c, io->tokens, sizeof(int32_t) * (size_t)n, dev);
  if (!st) st = map_put(c, io->pos, sizeof(int32_t) * (size_t)n, dev + at_pos);
  if (!st && hd) st = map_put(c, io->inv_freq, sizeof(float) * (size_t)(hd / 2), dev + at_freq);
  for (int r = 0; !st && r < io->n_logits; r += CN_LOGIT_CHUNK) {
    int rows = io->n_logits - r < CN_LOGIT_CHUNK ? io->n_logits - r : CN_LOGIT_CHUNK;
    st = map_put(c, io->logit_rows + r, sizeof(int32_t) * (size_t)rows, dev + at_rows + sizeof(int32_t) * r);
    /* The draws' arrays, as the forward hands them to sample_rows or draw_rows a chunk at a time. */
    size_t k = (size_t)io->top_k;
    if (!st && n_u) st = map_put(c, io->u + r * k, sizeof(double) * rows * k, dev + at_u + sizeof(double) * r * k);
    if (!st && n_q) st = map_put(c, io->q_out + r, sizeof(float *) * rows, dev + at_q + sizeof(float *) * r);
  }
  if (!st && n_acc) st = map_put(c, io->accept_q, sizeof(float *) * n_acc, dev + at_aq);
  if (!st && n_acc) st = map_put(c, io->accept_u, sizeof(double) * 2 * n_acc, dev + at_au);
  return st;
}

static void free_graph(void *g) { cn_cuda_graph_free(g); }

static int grows(const cn_fwd_io *io) {
  for (int i = 0; i < io->n_dyn; i++)
    if (io->dyn[i].grow) return 1;
  return 0;
}

/* Whether the forward leaves its outputs on the device and ends without waiting: chained top ids,
 * or dynamic trees growing from them. */
static int ends_unsynced(const cn_fwd_io *io) {
  return !io->accept_out && ((io->top_ids && !io->top_logp) || grows(io));
}

/* Each dynamic tree's sequence's tokens, mask, positions and parents in the staged block, where
 * stage_inputs put that sequence's (its descriptor), written from the tree's state, which an
 * earlier forward (another model's stream, maybe) wrote. */
static int stage_dyn(cuda_ctx *c, const cn_fwd_io *io) {
  int st = CANOPY_OK;
  for (int i = 0; !st && i < io->n_dyn; i++) {
    const cn_dyn_step *d = &io->dyn[i];
    if (!d->stage) continue;
    if (!c->tb)
      return cn_error(CANOPY_ERR_UNSUPPORTED, "cuda backend: a dynamic tree needs the tree attention kernel (head dim "
                      "%d)", io->desc[0].head_dim);
    const cn_cuda_tree_seq *q = &c->tb_seqs[d->seq];
    int row = q->row0, p0 = q->pos0, m0 = q->mask0;
    const cuda_ids *ids = d->ids->buf;
    st = cn_cuda_event_wait(c->cu, ids->written);
    if (!st)
      st = cn_cuda_dyn_stage(c->cu, ids->dev, d->layout, d->stage, d->pos0, (uint64_t *)(c->tb + c->at_mask) + m0,
                             c->pos_dev + row, (int32_t *)(c->tb + c->at_pos) + p0, (int32_t *)c->parent_dev + row,
                             c->tok_dev + row);
  }
  return st;
}

/* Stages the inputs, then runs, captures or replays the forward (the file comment's "Graphs"). */
static int cuda_begin(void *ctx, const cn_fwd_io *io, int *replayed) {
  cuda_ctx *c = ctx;
  *replayed = 0;
  if (c->unsynced) { /* the chained forward before may still be uploading from the area */
    int st = cn_cuda_event_sync(c->staged);
    if (st) return st;
    c->unsynced = 0;
  }
  /* The previous forward's `end` waited for the stream, and KV span copies have their own
   * buffer: the area's page-locked bytes are free to refill. */
  for (int i = 0; i < c->n_retired; i++)
    arena_release(c, &c->retired[i]);
  c->n_retired = 0;
  c->a.used = 0;
  c->gen++;
  c->map_used = 0;
  c->status = CANOPY_OK;
  c->mode = EAGER;
  c->cur = NULL;
  c->q_bf16 = c->attn_bf16 = NULL;
  c->cap_logits = NULL;
  c->io = *io;
  c->top_used = 0;
  int top_n = io->n_logits * io->top_k;
  if (io->top && top_n > c->top_cap) {
    cn_cuda_free(c->cu, c->top_dev);
    cn_cuda_free(c->cu, c->top_logp_dev);
    c->top_dev = NULL, c->top_logp_dev = NULL, c->top_cap = 0;
    int st = cn_cuda_malloc(c->cu, (void **)&c->top_dev, sizeof *c->top_dev * (size_t)top_n);
    if (!st) st = cn_cuda_malloc(c->cu, (void **)&c->top_logp_dev, sizeof *c->top_logp_dev * (size_t)top_n);
    if (st) return st;
    c->top_cap = top_n;
    cn_graph_cache_clear(&c->graphs);
  }
  if (io->accept_parent && 2 * io->n_seqs + 2 * io->n_tokens > c->acc_cap) {
    cn_cuda_free(c->cu, c->acc_dev);
    c->acc_dev = NULL, c->acc_cap = 0;
    int cap = 2 * io->n_seqs + 2 * io->n_tokens, st = cn_cuda_malloc(c->cu, (void **)&c->acc_dev, sizeof *c->acc_dev * (size_t)cap);
    if (st) return st;
    c->acc_cap = cap;
    cn_graph_cache_clear(&c->graphs);
  }
  cn_graph_key key;
  int key_ok, st = stage_inputs(c, io, &key, &key_ok);
  /* Tokens from an earlier forward's ids: after that forward (another model's stream, maybe),
   * into the staged tokens, ahead of the ops or the graph that read them. */
  if (!st && io->token_src) {
    const cuda_ids *src = io->src_ids;
    st = cn_cuda_event_wait(c->cu, src->written);
    if (!st) st = cn_cuda_gather_ids(c->cu, c->tok_dev, c->src_dev, src->dev, io->n_tokens);
  }
  /* Ids another model's forwards are writing too (a step with two draft models): this forward's
   * write, and the event it records, come after theirs, so a reader's one wait covers them all. */
  if (!st && io->top_ids && (!io->token_src || io->src_ids != io->top_ids))
    st = cn_cuda_event_wait(c->cu, ((const cuda_ids *)io->top_ids)->written);
  /* A dynamic tree's part of the forward, from its state (an earlier forward's, maybe on another
   * stream), over the staged stand-ins: mask, positions, acceptance's parents. */
  if (!st && io->n_dyn) st = stage_dyn(c, io);
  /* A forward that will end without waiting marks its uploads (a forward that waits needs not). */
  if (!st && ends_unsynced(io)) st = cn_cuda_event_record(c->cu, c->staged);
  if (st || !key_ok) return st;
  if (cn_cuda_scratch_gen(c->cu) != c->scratch_gen) {
    cn_graph_cache_clear(&c->graphs);
    c->scratch_gen = cn_cuda_scratch_gen(c->cu);
  }
  int fresh;
  cn_graph_slot *g = cn_graph_cache_get(&c->graphs, &key, &fresh);
  /* A shape seen for the first time runs its ops, so that every buffer it needs has grown before
   * a capture (where nothing may allocate). */
  if (!g || fresh) return CANOPY_OK;
  c->cur = g;
  if (g->graph) {
    if ((st = cn_cuda_graph_launch(c->cu, g->graph))) return st;
    c->mode = REPLAY;
    c->replays++;
    *replayed = 1;
    return CANOPY_OK;
  }
  if ((st = cn_cuda_capture_begin(c->cu))) return st;
  c->mode = CAPTURE;
  return CANOPY_OK;
}

/* Finishes a capture and launches it, then brings the outputs to the host: the forward's one
 * wait (none for a chained forward whose outputs stay on the device). */
static int cuda_end(void *ctx) {
  cuda_ctx *c = ctx;
  int st = c->status;
  if (c->mode == CAPTURE) {
    cn_cuda_graph *g = NULL;
    int cst = cn_cuda_capture_end(c->cu, &g);
    if (!st) st = cst;
    if (!st) {
      c->cur->graph = g;
      c->cur->aux = c->cap_logits;
      c->captures++;
      st = cn_cuda_graph_launch(c->cu, g);
    } else {
      cn_cuda_graph_free(g);
    }
  }
  const cn_fwd_io *io = &c->io;
  size_t top_n = (size_t)io->n_logits * io->top_k;
  /* Dynamic trees grow from the top ids where they are, and chained top ids stay on the device: the
   * next forward waits for `written`. */
  for (int i = 0; !st && i < io->n_dyn; i++) {
    const cn_dyn_step *d = &io->dyn[i];
    if (!d->grow) continue;
    cuda_ids *ids = d->ids->buf;
    size_t at = (size_t)d->row * io->top_k;
    st = cn_cuda_dyn_grow(c->cu, ids->dev, d->layout, d->grow - 1, c->top_dev + at, c->top_logp_dev + at, io->top_k);
    if (!st) st = cn_cuda_event_record(c->cu, ids->written);
  }
  if (!st && io->top_ids) {
    cuda_ids *dst = io->top_ids;
    st = cn_cuda_memcpy_d2d(c->cu, dst->dev + io->top_ids_at, c->top_dev, sizeof(int32_t) * top_n);
    if (!st) st = cn_cuda_event_record(c->cu, dst->written);
  }
  if (!st && ends_unsynced(io)) {
    if (c->mode != REPLAY) st = cn_cuda_event_record(c->cu, c->staged); /* ops may have staged more */
    c->unsynced = !st;
    c->mode = EAGER;
    return st;
  }
  if (!st && io->accept_out) {
    st = cn_cuda_memcpy_d2h(c->cu, io->accept_out, c->acc_dev,
                            sizeof(int32_t) * (size_t)(2 * io->n_seqs + 2 * io->n_tokens));
    for (int i = 0; !st && i < io->n_dyn; i++) {
      const cn_dyn_step *d = &io->dyn[i];
      if (d->tree_out)
        st = cn_cuda_memcpy_d2h(c->cu, d->tree_out, ((cuda_ids *)d->ids->buf)->dev + d->layout->t_token,
                                sizeof(int32_t) * (size_t)(4 * d->layout->T + 1));
    }
  } else if (!st && io->n_logits && io->top) {
    if (!io->top_ids) st = cn_cuda_memcpy_d2h(c->cu, io->top, c->top_dev, sizeof(int32_t) * top_n);
    if (!st && io->top_logp) st = cn_cuda_memcpy_d2h(c->cu, io->top_logp, c->top_logp_dev, sizeof(float) * top_n);
  } else if (!st && io->n_logits && c->mode != EAGER) {
    const float *src = c->mode == REPLAY ? c->cur->aux : c->cap_logits;
    st = cn_cuda_memcpy_d2h(c->cu, io->logits, src, sizeof(float) * (size_t)io->n_logits * io->vocab);
  }
  int sst = cn_cuda_sync(c->cu); /* also after a failure: the staging area gets refilled next */
  if (!st) st = sst;
  if (!sst) c->span_used = 0;
  c->mode = EAGER;
  return st;
}

/* The shared-prefix tree kernel for the whole batch in one launch, over the batch begin staged;
 * head sizes it does not cover take the per-sequence kernel. */
static void cuda_attention_batch(void *ctx, void *out, const void *q, const cn_attn_desc *d, int n_seqs) {
  cuda_ctx *c = ctx;
  if (c->status || n_seqs <= 0) return;
  int hd = d[0].head_dim, n_heads = d[0].n_heads, n_kv = d[0].n_kv_heads;
  c->attn_bf16 = c->tb && q == c->q_bf16 ? out : NULL; /* the output in q's dtype */
  if (!c->tb) {
    size_t row = 0;
    for (int s = 0; s < n_seqs; s++) {
      size_t at = row * (size_t)n_heads * hd;
      cuda_attention(ctx, (float *)out + at, (const float *)q + at, &d[s]);
      row += (size_t)d[s].n;
    }
    return;
  }
  /* Split boundaries at fixed key positions (a plan from the key bucket, or fixed in batch-invariant
   * mode): a token's keys are cut alike in its decode step and in a verified chain. */
  int splits, split_keys;
  cn_cuda_tree_attn_plan(c->cu, n_seqs, c->max_n, c->keys_bucket, n_heads, n_kv, hd, c->batch_invariant, &splits,
                         &split_keys);
  size_t ws = cn_cuda_tree_attn_workspace(n_seqs, c->max_n, splits, n_heads, n_kv, hd);
  if (ws > c->ta_ws_bytes) {
    /* Launches queued earlier, and captured graphs, may still use the old workspace. Never
     * during a capture: the same shape ran its ops (and grew this) first. */
    if (keep(c, cn_cuda_sync(c->cu))) return;
    cn_graph_cache_clear(&c->graphs);
    cn_cuda_free(c->cu, c->ta_ws);
    c->ta_ws = NULL;
    c->ta_ws_bytes = 0;
    if (keep(c, cn_cuda_malloc(c->cu, (void **)&c->ta_ws, 2 * ws))) return;
    c->ta_ws_bytes = 2 * ws;
  }
  cn_cuda_paged_kv kv = layer_view(d[0].pool, d[0].layer);
  cn_cuda_tree_attn_args a = {.out = out,
                              .q = q,
                              .dt = c->attn_bf16 ? CN_CUDA_BF16 : CN_CUDA_F32,
                              .k = kv.k,
                              .v = kv.v,
                              .block_stride = kv.block_stride,
                              .block_size = kv.block_size,
                              .block_tables = (const int32_t *)(c->tb + c->at_tables),
                              .pos = (const int32_t *)(c->tb + c->at_pos),
                              .tree_mask = c->any_tree ? (const uint64_t *)(c->tb + c->at_mask) : NULL,
                              .seqs = (const cn_cuda_tree_seq *)c->tb,
                              .n_seqs = n_seqs,
                              .max_n = c->max_n,
                              .max_keys = c->keys_bucket, /* the plan's, which the graph key holds */
                              .n_splits = splits,
                              .split_keys = split_keys,
                              .n_heads = n_heads,
                              .n_kv_heads = n_kv,
                              .head_dim = hd,
                              .sliding_window = d[0].sliding_window,
                              .scale = d[0].scale,
                              .workspace = c->ta_ws,
                              /* A forward writes only slots at or past ctx_len; the prefix, the
                               * tables and the descriptors came from earlier forwards, span copies
                               * and this forward's upload, all before its first kernel. */
                              .prefix_ready = 1};
  keep(c, cn_cuda_tree_attention(c->cu, &a));
}

/* Every sequence's new K/V of one layer in one launch, to the slots begin looked up. */
static void cuda_kv_write_batch(void *ctx, const cn_attn_desc *d, int n_seqs, const void *k, const void *v,
                                int kv_dim) {
  cuda_ctx *c = ctx;
  if (c->status || n_seqs <= 0) return;
  cn_cuda_paged_kv kv = layer_view(d[0].pool, d[0].layer);
  keep(c, cn_cuda_kv_write_slots(c->cu, &kv, c->slots, k, v, CN_CUDA_F32, c->io.n_tokens, kv_dim));
}

/* Into the forward's run of device ids (and log-probabilities); `end` brings all of them over in
 * one copy each. */
static void cuda_top_rows(void *ctx, int32_t *ids, float *logp, const void *logits, int rows, int vocab, int k) {
  cuda_ctx *c = ctx;
  size_t n = (size_t)rows * k, at = (size_t)c->top_used;
  if (!c->status && (rows > TOP_ROWS || k < 1 || k > TOP_K || k != c->io.top_k || ids != c->io.top + at ||
                     (logp && logp != c->io.top_logp + at) || at + n > (size_t)c->top_cap))
    keep(c, cn_error(CANOPY_ERR_INVALID_ARG,
                     "cuda top_rows: %d rows, k = %d at element %zu (at most %d rows and k = %d a call, in order, "
                     "k and %d elements as begin announced)",
                     rows, k, at, TOP_ROWS, TOP_K, c->top_cap));
  if (c->status) return;
  if (k == 1 && !logp) keep(c, cn_cuda_argmax(c->cu, c->top_dev + at, logits, CN_CUDA_F32, rows, vocab));
  else
    keep(c, cn_cuda_top_k(c->cu, c->top_dev + at, logp ? c->top_logp_dev + at : NULL, logits, CN_CUDA_F32, rows,
                          vocab, k));
  c->top_used += (int)n;
}

/* The sampler's sort buffers are sized for the largest vocab seen, once (not in the decode loop). */
static int sample_ws_for(cuda_ctx *c, int vocab) {
  if (vocab <= c->sample_vocab) return CANOPY_OK;
  size_t bytes;
  int st = cn_cuda_sample_workspace(c->cu, TOP_ROWS, vocab, &bytes);
  if (!st) st = cn_cuda_sync(c->cu); /* launches queued earlier may still use the old buffer */
  if (st) return st;
  cn_graph_cache_clear(&c->graphs); /* and graphs of sampled forwards name it */
  cn_cuda_free(c->cu, c->sample_ws);
  c->sample_ws = NULL;
  c->sample_vocab = 0;
  if ((st = cn_cuda_malloc(c->cu, &c->sample_ws, bytes))) return st;
  c->sample_ws_bytes = bytes;
  c->sample_vocab = vocab;
  return CANOPY_OK;
}

/* Sampled rows' ids into the forward's run of device ids, as top_rows fills it; `end` brings them
 * over. The uniforms are staged (begin), so a captured forward replays with this step's. */
static int cuda_sample_rows(void *ctx, int32_t *ids, const void *logits, int rows, int vocab, const cn_sample_rule *r,
                            const double *u) {
  cuda_ctx *c = ctx;
  size_t at = (size_t)c->top_used;
  if (!c->status && (rows > TOP_ROWS || c->io.top_k != 1 || ids != c->io.top + at || at + rows > (size_t)c->top_cap ||
                     r != c->io.rule))
    keep(c, cn_error(CANOPY_ERR_INVALID_ARG, "cuda sample_rows: %d rows at element %zu (at most %d a call, in order, "
                     "one id a row, under the forward's rule)", rows, at, TOP_ROWS));
  const double *u_dev = c->status ? NULL : dev_of(c, u, sizeof *u * (size_t)rows);
  if (u_dev && !keep(c, sample_ws_for(c, vocab)))
    keep(c, cn_cuda_sample(c->cu, c->top_dev + at, logits, rows, vocab, r->temperature, r->top_k, r->top_p, u_dev,
                           c->sample_ws, c->sample_ws_bytes));
  c->top_used += rows;
  return c->status;
}

/* A sampled tree level's rows: their distributions into the rows q_out names (device rows of a
 * cn_rows), then the draws from them into the forward's run of device ids, as top_rows fills it. */
static int cuda_draw_rows(void *ctx, int32_t *ids, float *const *q_out, const void *logits, int rows, int vocab,
                          const cn_sample_rule *r, const double *u, int k) {
  cuda_ctx *c = ctx;
  size_t n = (size_t)rows * k, at = (size_t)c->top_used;
  int bad = rows > TOP_ROWS || k < 1 || k > TOP_K || k != c->io.top_k || ids != c->io.top + at ||
            at + n > (size_t)c->top_cap || r != c->io.rule || !(r->temperature > 0);
  for (int i = 0; !bad && i < rows; i++) bad = !q_out[i];
  if (!c->status && bad)
    keep(c, cn_error(CANOPY_ERR_INVALID_ARG, "cuda draw_rows: %d rows, k = %d at element %zu (at most %d rows and k = "
                     "%d a call, in order, under the forward's rule with temperature > 0, a q_out row for each)",
                     rows, k, at, TOP_ROWS, TOP_K));
  /* begin staged both, at addresses a captured graph keeps */
  float *const *q_dev = c->status ? NULL : dev_of(c, q_out, sizeof *q_out * (size_t)rows);
  const double *u_dev = q_dev ? dev_of(c, u, sizeof *u * n) : NULL;
  if (u_dev && !keep(c, sample_ws_for(c, vocab)) &&
      !keep(c, cn_cuda_sample_probs(c->cu, q_dev, logits, rows, vocab, r->temperature, r->top_k, r->top_p,
                                    c->sample_ws, c->sample_ws_bytes)))
    keep(c, cn_cuda_draw_distinct(c->cu, c->top_dev + at, (const float *const *)q_dev, u_dev, rows, vocab, k));
  c->top_used += (int)n;
  return c->status;
}

/* The verification's target distributions, rows one after the other from dst (device). */
static int cuda_probs_rows(void *ctx, float *dst, const void *logits, int rows, int vocab, const cn_sample_rule *r) {
  cuda_ctx *c = ctx;
  ptrdiff_t at = c->io.accept_rows ? dst - c->io.accept_rows : -1, row = at / (vocab > 0 ? vocab : 1);
  if (!c->status && (rows > TOP_ROWS || at < 0 || at % vocab || row + rows > c->io.n_logits || r != c->io.accept_sample))
    keep(c, cn_error(CANOPY_ERR_INVALID_ARG, "cuda probs_rows: %d rows at element %td of the forward's accept_rows (at "
                     "most %d a call, within its %d logit rows, under its rule)", rows, at, TOP_ROWS,
                     c->io.n_logits));
  float *const *dst_dev = c->status ? NULL : c->prow_dev + row; /* begin staged every row's pointer */
  if (dst_dev && !keep(c, sample_ws_for(c, vocab)))
    keep(c, cn_cuda_sample_probs(c->cu, dst_dev, logits, rows, vocab, r->temperature, r->top_k, r->top_p, c->sample_ws,
                                 c->sample_ws_bytes));
  return c->status;
}

/* Stochastic acceptance over the forward's staged tokens and parents, into acc_dev as the greedy
 * one writes it; `end` brings it over. */
static int cuda_accept_sampled(void *ctx, int32_t *out, const int32_t *tokens, const int32_t *parent, int n,
                               const float *p, float *const *q, const double *u, int vocab, float *scratch,
                               const cn_sample_rule *rule) {
  (void)rule; /* probs_rows applied it */
  cuda_ctx *c = ctx;
  if (!c->status && (out != c->io.accept_out || tokens != c->io.tokens || parent != c->io.accept_parent ||
                     n != c->io.n_tokens || 2 * c->io.n_seqs + 2 * n > c->acc_cap || p != c->io.accept_rows ||
                     q != c->io.accept_q || u != c->io.accept_u))
    keep(c, cn_error(CANOPY_ERR_INVALID_ARG, "cuda accept_sampled: not the forward's own arrays (%d nodes)", n));
  /* begin staged both, at addresses a captured graph keeps */
  const float *const *q_dev = c->status ? NULL : dev_of(c, q, sizeof *q * (size_t)n);
  const double *u_dev = q_dev ? dev_of(c, u, sizeof *u * 2 * (size_t)n) : NULL;
  if (u_dev)
    keep(c, cn_cuda_accept_sampled(c->cu, c->acc_dev, c->tok_dev, c->parent_dev, n, c->io.n_seqs, p, q_dev, u_dev,
                                   vocab, scratch));
  return c->status;
}

static void cuda_norm_matmul(void *ctx, void *y, const void *x, const void *norm_w, float eps, const void *w,
                             const void *bias, int n, int in, int out) {
  cuda_ctx *c = ctx;
  if (!c->status) keep(c, cn_cuda_norm_matmul(c->cu, y, CN_CUDA_F32, x, norm_w, eps, w, bias, n, in, out));
}

static void cuda_matmul_add(void *ctx, void *x, const void *a, const void *w, const void *bias, int n, int in,
                            int out) {
  cuda_ctx *c = ctx;
  if (!c->status) keep(c, cn_cuda_matmul_add(c->cu, x, a, act_dt(c, a), w, bias, n, in, out));
}

static void cuda_ffn(void *ctx, void *x, void *gate_up, const void *norm_w, float eps, const void *w_gu,
                     const void *b_gu, const void *w_down, const void *b_down, int n, int dim, int d) {
  cuda_ctx *c = ctx;
  if (!c->status) keep(c, cn_cuda_ffn(c->cu, x, gate_up, norm_w, eps, w_gu, b_gu, w_down, b_down, n, dim, d));
}

/* The device copies of the n positions and the head_dim / 2 frequencies RoPE reads; false (the
 * failure kept in c->status) when either cannot be had. */
static bool rope_inputs(cuda_ctx *c, const int32_t *pos, int n, const float *inv_freq, int head_dim,
                        const int32_t **p, const float **f) {
  *p = dev_of(c, pos, sizeof *pos * (size_t)n);
  *f = dev_of(c, inv_freq, sizeof *inv_freq * (size_t)(head_dim / 2));
  return *p && *f;
}

/* The dtype the fused q producers write q in, noted for attention_batch: bf16 where the tree kernel
 * runs (c->tb), else fp32. */
static cn_cuda_dtype q_dt_for(cuda_ctx *c, const void *q) {
  c->q_bf16 = c->tb ? q : NULL;
  return c->tb ? CN_CUDA_BF16 : CN_CUDA_F32;
}

static void cuda_qkv_rope(void *ctx, void *q, void *k, void *v, const void *qkv, const int32_t *pos, int n,
                          int n_heads, int n_kv_heads, int head_dim, const float *inv_freq) {
  cuda_ctx *c = ctx;
  const int32_t *p;
  const float *f;
  c->q_bf16 = NULL;
  if (rope_inputs(c, pos, n, inv_freq, head_dim, &p, &f))
    keep(c, cn_cuda_qkv_rope(c->cu, q, k, v, qkv, p, n, n_heads, n_kv_heads, head_dim, f));
}

/* k and v straight to the slots `begin` looked up, as cuda_kv_write_batch writes them. */
static void cuda_qkv_rope_kv(void *ctx, void *q, const void *qkv, const int32_t *pos, const cn_attn_desc *d,
                             int n_seqs, int n, int n_heads, int n_kv_heads, int head_dim, const float *inv_freq) {
  cuda_ctx *c = ctx;
  const int32_t *p;
  const float *f;
  if (c->status || n_seqs <= 0 || !rope_inputs(c, pos, n, inv_freq, head_dim, &p, &f)) return;
  cn_cuda_paged_kv kv = layer_view(d[0].pool, d[0].layer);
  keep(c, cn_cuda_qkv_rope_kv(c->cu, q, q_dt_for(c, q), qkv, p, n, n_heads, n_kv_heads, head_dim, f, &kv,
                              c->slots));
}

/* The same, with the RMSNorm and the q/k/v projection before it (one kernel within the fusion limit). */
static void cuda_norm_qkv_rope_kv(void *ctx, void *q, void *qkv, const void *x, const void *norm_w, float eps,
                                  const void *w, const void *bias, int in, const int32_t *pos, const cn_attn_desc *d,
                                  int n_seqs, int n, int n_heads, int n_kv_heads, int head_dim, const float *inv_freq) {
  cuda_ctx *c = ctx;
  const int32_t *p;
  const float *f;
  if (c->status || n_seqs <= 0 || !rope_inputs(c, pos, n, inv_freq, head_dim, &p, &f)) return;
  cn_cuda_paged_kv kv = layer_view(d[0].pool, d[0].layer);
  keep(c, cn_cuda_norm_qkv_rope_kv(c->cu, q, q_dt_for(c, q), qkv, x, norm_w, eps, w, bias, n, in, p, n_heads,
                                   n_kv_heads, head_dim, f, &kv, c->slots));
}

/* While capturing, the copy is left to `end` (after the graph's launch): a graph captures one
 * LM-head chunk at most, so src still holds it then. */
static void cuda_to_host(void *ctx, float *dst, const void *src, size_t n) {
  cuda_ctx *c = ctx;
  if (c->mode == CAPTURE) c->cap_logits = src;
  else if (!c->status) keep(c, cn_cuda_memcpy_d2h(c->cu, dst, src, sizeof(float) * n));
}

/* ---- chained forwards ------------------------------------------------------------------------- */

static void *cuda_ids_create(void *ctx, int n) {
  cuda_ctx *c = ctx;
  cuda_ids *ids = calloc(1, sizeof *ids);
  if (!ids) {
    cn_error(CANOPY_ERR_NO_MEMORY, "cuda backend: no host memory for an ids buffer");
    return NULL;
  }
  int st = cn_cuda_malloc(c->cu, (void **)&ids->dev, sizeof *ids->dev * (size_t)n);
  if (!st) st = cn_cuda_memset(c->cu, ids->dev, 0, sizeof *ids->dev * (size_t)n);
  if (!st) st = cn_cuda_event_create(c->cu, &ids->written);
  if (!st) st = cn_cuda_event_record(c->cu, ids->written); /* the memset */
  if (st) {
    cn_cuda_free(c->cu, ids->dev);
    free(ids);
    return NULL;
  }
  return ids;
}

static void cuda_ids_free(void *ctx, void *p) {
  cuda_ctx *c = ctx;
  cuda_ids *ids = p;
  if (!ids) return;
  cn_cuda_free(c->cu, ids->dev); /* cudaFree waits for the work that may still use it */
  cn_cuda_event_free(ids->written);
  free(ids);
}

/* On the device, over the forward's staged tokens (token_src already gathered into them) and its
 * top ids; `end` brings the result over in place of the ids. */
static void cuda_accept_greedy(void *ctx, int32_t *out, const int32_t *tokens, const int32_t *top,
                               const int32_t *parent, int n) {
  cuda_ctx *c = ctx;
  if (!c->status && (out != c->io.accept_out || tokens != c->io.tokens || top != c->io.top ||
                     parent != c->io.accept_parent || n != c->io.n_tokens || 2 * c->io.n_seqs + 2 * n > c->acc_cap))
    keep(c, cn_error(CANOPY_ERR_INVALID_ARG, "cuda accept_greedy: not the forward's own arrays (%d nodes)", n));
  if (c->status) return;
  keep(c, cn_cuda_accept_greedy(c->cu, c->acc_dev, c->tok_dev, c->top_dev, c->parent_dev, n, c->io.n_seqs));
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
    .kv_write_batch = cuda_kv_write_batch,
    .attention_batch = cuda_attention_batch,
    .to_host = cuda_to_host,
    .top_rows = cuda_top_rows,
    .sample_rows = cuda_sample_rows,
    .draw_rows = cuda_draw_rows,
    .probs_rows = cuda_probs_rows,
    .accept_sampled = cuda_accept_sampled,
    .ids_create = cuda_ids_create,
    .ids_free = cuda_ids_free,
    .accept_greedy = cuda_accept_greedy,
    .dyn_trees = cn_cuda_tree_attn_supported, /* staging writes the tree kernel's batch */
    .norm_matmul = cuda_norm_matmul,
    .matmul_add = cuda_matmul_add,
    .ffn = cuda_ffn,
    .qkv_rope = cuda_qkv_rope,
    .qkv_rope_kv = cuda_qkv_rope_kv,
    .norm_qkv_rope_kv = cuda_norm_qkv_rope_kv,
};

/* Tables copied from the CUDA one (bench_step's unfused variant) share its destroy. */
static int is_cuda(const cn_backend *be) { return be && be->destroy == cuda_destroy; }

struct cn_cuda_ctx *cn_backend_cuda_ctx(const cn_backend *be, void *ctx) {
  return is_cuda(be) ? ((cuda_ctx *)ctx)->cu : NULL;
}

void cn_backend_cuda_set_graphs(const cn_backend *be, void *ctx, int max_graphs) {
  if (!is_cuda(be)) return;
  cuda_ctx *c = ctx;
  cn_graph_cache_free(&c->graphs);
  /* Without memory for the slots the cache holds nothing: forwards then just run their ops. */
  (void)cn_graph_cache_init(&c->graphs, max_graphs, free_graph);
}

void cn_backend_cuda_graph_stats(const cn_backend *be, void *ctx, long *replays, long *captures) {
  *replays = is_cuda(be) ? ((cuda_ctx *)ctx)->replays : 0;
  *captures = is_cuda(be) ? ((cuda_ctx *)ctx)->captures : 0;
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
  if (!st) c->top_cap = TOP_ROWS * TOP_K;
  if (!st) st = cn_graph_cache_init(&c->graphs, MAX_GRAPHS, free_graph);
  if (!st) st = cn_cuda_event_create(c->cu, &c->staged);
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
