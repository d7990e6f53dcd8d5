/* The block pool: K/V storage (host fp32, or a backend's), refcounts, the free stack and the LRU of evictable cached blocks
 * (states in block_pool.h).
 *
 * Storage layout, block-major: data[block][layer][K, V][row][n_kv_heads * head_dim]. One block's
 * K/V for all layers is one contiguous span, so a copy-on-write or a future host<->device
 * transfer of a block is one range, and each layer's K (or V) rows of a block are contiguous
 * [block_size][kv_dim] as the attention kernels want them. */
#include "cache/block_pool.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"

/* ---- the LRU list and the free stack ---------------------------------------------------------- */

static void lru_push_tail(cn_kv_pool *p, int b) {
  p->lru_prev[b] = p->lru_tail;
  p->lru_next[b] = -1;
  if (p->lru_tail >= 0) p->lru_next[p->lru_tail] = b;
  else p->lru_head = b;
  p->lru_tail = b;
  p->n_evictable++;
}

static void lru_remove(cn_kv_pool *p, int b) {
  if (p->lru_prev[b] >= 0) p->lru_next[p->lru_prev[b]] = p->lru_next[b];
  else p->lru_head = p->lru_next[b];
  if (p->lru_next[b] >= 0) p->lru_prev[p->lru_next[b]] = p->lru_prev[b];
  else p->lru_tail = p->lru_prev[b];
  p->lru_prev[b] = p->lru_next[b] = -1;
  p->n_evictable--;
}

static void free_push(cn_kv_pool *p, int b) { p->free_stack[p->n_free++] = b; }

/* ---- the pool ------------------------------------------------------------------------------- */

static bool mul_ok(size_t *acc, int factor) {
  return !__builtin_mul_overflow(*acc, (size_t)factor, acc);
}

int cn_kv_pool_create(const cn_kv_layout *layout, cn_kv_pool **out) {
  return cn_kv_pool_create_on(layout, NULL, NULL, out);
}

int cn_kv_pool_create_on(const cn_kv_layout *layout, const cn_kv_storage *storage, void *storage_ctx,
                         cn_kv_pool **out) {
  if (!out) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_kv_pool_create: NULL output");
  *out = NULL;
  if (!layout || layout->n_layers <= 0 || layout->n_kv_heads <= 0 || layout->head_dim <= 0 ||
      layout->block_size <= 0 || layout->n_blocks <= 0)
    return cn_error(CANOPY_ERR_INVALID_ARG,
                    "KV cache: every layout field must be positive (layers %d, kv heads %d, head dim %d, "
                    "block size %d, blocks %d)",
                    layout ? layout->n_layers : 0, layout ? layout->n_kv_heads : 0, layout ? layout->head_dim : 0,
                    layout ? layout->block_size : 0, layout ? layout->n_blocks : 0);
  const cn_kv_layout *L = layout;
  size_t half = 1, block, bytes;
  bool ok = mul_ok(&half, L->block_size) && mul_ok(&half, L->n_kv_heads) && mul_ok(&half, L->head_dim);
  block = half;
  ok = ok && mul_ok(&block, L->n_layers) && mul_ok(&block, 2);
  bytes = block;
  int elem = storage ? (int)storage->elem_bytes : (int)sizeof(float);
  ok = ok && mul_ok(&bytes, L->n_blocks) && mul_ok(&bytes, elem);
  if (!ok)
    return cn_error(CANOPY_ERR_NO_MEMORY,
                    "KV cache: %d blocks x %d layers x 2 x %d tokens x %d kv heads x %d dims x %d bytes "
                    "overflows the address space",
                    L->n_blocks, L->n_layers, L->block_size, L->n_kv_heads, L->head_dim, elem);

  cn_kv_pool *p = calloc(1, sizeof *p);
  if (!p) return cn_error(CANOPY_ERR_NO_MEMORY, "KV cache: cannot allocate %zu bytes", sizeof *p);
  p->layout = *L;
  p->half_floats = half;
  p->block_floats = block;
  p->prefix_cache = true;
  p->lru_head = p->lru_tail = -1;
  p->storage = storage;
  p->storage_ctx = storage_ctx;
  size_t n = (size_t)L->n_blocks;
  p->data = storage ? storage->alloc(storage_ctx, bytes) : calloc(n, block * sizeof(float));
  if (!p->data) {
    free(p);
    return cn_error(CANOPY_ERR_NO_MEMORY,
                    "KV cache: cannot allocate %zu bytes of %s storage (%d blocks of %d tokens, %d layers)", bytes,
                    storage ? storage->name : "host fp32", L->n_blocks, L->block_size, L->n_layers);
  }
  p->refcount = calloc(n, sizeof *p->refcount);
  p->free_stack = malloc(n * sizeof *p->free_stack);
  p->lru_prev = malloc(n * sizeof *p->lru_prev);
  p->lru_next = malloc(n * sizeof *p->lru_next);
  int st = cn_prefix_index_init(&p->index, L->n_blocks, L->block_size);
  if (st || !p->refcount || !p->free_stack || !p->lru_prev || !p->lru_next) {
    cn_kv_pool_free(p);
    return st ? st : cn_error(CANOPY_ERR_NO_MEMORY, "KV cache: cannot allocate %zu bytes of block state",
                              n * 4 * sizeof(int));
  }
  /* Block 0 is handed out first: tables of a fresh pool read 0, 1, 2, ... */
  for (int b = L->n_blocks - 1; b >= 0; b--) free_push(p, b);
  for (size_t b = 0; b < n; b++) p->lru_prev[b] = p->lru_next[b] = -1;
  *out = p;
  return CANOPY_OK;
}

void cn_kv_pool_free(cn_kv_pool *pool) {
  if (!pool) return;
  if (pool->storage) pool->storage->release(pool->storage_ctx, pool->data);
  else free(pool->data);
  free(pool->spans);
  free(pool->refcount);
  free(pool->free_stack);
  free(pool->lru_prev);
  free(pool->lru_next);
  cn_prefix_index_destroy(&pool->index);
  free(pool);
}

const cn_kv_layout *cn_kv_pool_layout(const cn_kv_pool *pool) { return &pool->layout; }

void *cn_kv_pool_data(const cn_kv_pool *pool) { return pool->data; }

float *cn_kv_block_k(cn_kv_pool *pool, int block, int layer) {
  assert(block >= 0 && block < pool->layout.n_blocks && layer >= 0 && layer < pool->layout.n_layers);
  assert(!pool->storage);
  return (float *)pool->data + (size_t)block * pool->block_floats + (size_t)layer * 2 * pool->half_floats;
}

float *cn_kv_block_v(cn_kv_pool *pool, int block, int layer) {
  return cn_kv_block_k(pool, block, layer) + pool->half_floats;
}

int cn_kv_pool_available(const cn_kv_pool *pool) { return pool->n_free + pool->n_evictable; }

int cn_kv_pool_in_use(const cn_kv_pool *pool) { return pool->layout.n_blocks - cn_kv_pool_available(pool); }

int cn_kv_pool_refcount(const cn_kv_pool *pool, int block) {
  return block >= 0 && block < pool->layout.n_blocks ? pool->refcount[block] : -1;
}

bool cn_kv_pool_block_cached(const cn_kv_pool *pool, int block) {
  return block >= 0 && block < pool->layout.n_blocks && cn_prefix_index_has(&pool->index, block);
}

void cn_kv_pool_set_prefix_cache(cn_kv_pool *pool, bool enabled) {
  pool->prefix_cache = enabled;
  if (enabled) return;
  while (pool->lru_head >= 0) {
    int b = pool->lru_head;
    lru_remove(pool, b);
    free_push(pool, b);
  }
  /* In-use blocks lose their entries too: with nothing indexed, a truncated block that only its
   * sequence holds needs no copy before it is written again. */
  cn_prefix_index_clear(&pool->index);
}

/* ---- blocks --------------------------------------------------------------------------------- */

int cn_block_alloc(cn_kv_pool *p) {
  int b;
  if (p->n_free > 0) {
    b = p->free_stack[--p->n_free];
  } else if (p->lru_head >= 0) {
    b = p->lru_head;
    lru_remove(p, b);
    cn_prefix_index_remove(&p->index, b);
  } else {
    return -1;
  }
  p->refcount[b] = 1;
  return b;
}

void cn_block_ref(cn_kv_pool *p, int b) {
  if (p->refcount[b] == 0) {
    assert(cn_prefix_index_has(&p->index, b)); /* only cached blocks are found while unused */
    lru_remove(p, b);
  }
  p->refcount[b]++;
}

void cn_block_unref(cn_kv_pool *p, int b) {
  assert(p->refcount[b] > 0);
  if (--p->refcount[b] > 0) return;
  if (cn_prefix_index_has(&p->index, b)) lru_push_tail(p, b);
  else free_push(p, b);
}

int cn_block_spans_reserve(cn_kv_pool *p, int n) {
  if (n <= p->span_cap) return CANOPY_OK;
  int cap = p->span_cap ? p->span_cap : 64;
  while (cap < n) cap = cap > INT32_MAX / 2 ? n : cap * 2;
  cn_kv_span *s = realloc(p->spans, sizeof *s * (size_t)cap);
  if (!s) return cn_error(CANOPY_ERR_NO_MEMORY, "KV cache: cannot allocate %zu bytes of copy spans", sizeof *s * (size_t)cap);
  p->spans = s;
  p->span_cap = cap;
  return CANOPY_OK;
}

int cn_block_copy_rows(cn_kv_pool *p, int dst, int src, int rows) {
  size_t n = (size_t)rows * (p->half_floats / (size_t)p->layout.block_size);
  if (!p->storage) {
    for (int l = 0; l < p->layout.n_layers; l++) {
      memcpy(cn_kv_block_k(p, dst, l), cn_kv_block_k(p, src, l), n * sizeof(float));
      memcpy(cn_kv_block_v(p, dst, l), cn_kv_block_v(p, src, l), n * sizeof(float));
    }
    return CANOPY_OK;
  }
  int st = cn_block_spans_reserve(p, 2 * p->layout.n_layers);
  if (st) return st;
  /* Rows [0, rows) of K then V, layer after layer: 2 * n_layers spans, one storage call. */
  for (int h = 0; h < 2 * p->layout.n_layers; h++) {
    size_t at = (size_t)h * p->half_floats;
    p->spans[h] = (cn_kv_span){.dst = (size_t)dst * p->block_floats + at, .src = (size_t)src * p->block_floats + at,
                               .n = n};
  }
  return p->storage->copy(p->storage_ctx, p->data, p->spans, 2 * p->layout.n_layers);
}

uint64_t cn_block_publish(cn_kv_pool *p, int b, uint64_t key, uint64_t parent_serial, const int32_t *tokens) {
  assert(!cn_prefix_index_has(&p->index, b));
  int e = cn_prefix_index_find(&p->index, key);
  if (e >= 0) {
    if (cn_prefix_index_matches(&p->index, e, parent_serial, tokens)) return p->index.serial[e];
    /* Same key, other prefix: the newer block wins. An unused loser is no longer a cached
     * prefix, so it leaves the LRU for the free stack. */
    cn_prefix_index_remove(&p->index, e);
    if (p->refcount[e] == 0) {
      lru_remove(p, e);
      free_push(p, e);
    }
  }
  return cn_prefix_index_insert(&p->index, b, key, parent_serial, tokens);
}

int cn_block_lookup(const cn_kv_pool *p, uint64_t key, uint64_t parent_serial, const int32_t *tokens) {
  int b = cn_prefix_index_find(&p->index, key);
  return b >= 0 && cn_prefix_index_matches(&p->index, b, parent_serial, tokens) ? b : -1;
}
