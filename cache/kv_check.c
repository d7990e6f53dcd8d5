/* A full consistency check of the pool's bookkeeping, for tests and debugging: every block in
 * exactly one state (block_pool.h), the free stack and the LRU list well formed, the counters
 * right, and the index agreeing with itself. O(n_blocks); never called by the engine. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "cache/block_pool.h"

static bool fail(char *why, size_t cap, const char *fmt, ...) {
  if (why && cap) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, cap, fmt, ap);
    va_end(ap);
  }
  return false;
}

enum { UNSEEN = 0, ON_FREE = 1, ON_LRU = 2 };

static bool check(const cn_kv_pool *p, unsigned char *where, char *why, size_t cap) {
  int n = p->layout.n_blocks;
  const cn_prefix_index *ix = &p->index;
  if (p->n_free < 0 || p->n_free > n) return fail(why, cap, "free stack holds %d of %d blocks", p->n_free, n);
  for (int i = 0; i < p->n_free; i++) {
    int b = p->free_stack[i];
    if (b < 0 || b >= n) return fail(why, cap, "free stack slot %d holds block %d", i, b);
    if (where[b]) return fail(why, cap, "block %d is twice on the free stack", b);
    where[b] = ON_FREE;
    if (p->refcount[b] != 0) return fail(why, cap, "free block %d has refcount %d", b, p->refcount[b]);
    if (cn_prefix_index_has(ix, b)) return fail(why, cap, "free block %d is indexed", b);
  }
  int count = 0, prev = -1;
  for (int b = p->lru_head; b >= 0; prev = b, b = p->lru_next[b]) {
    if (b >= n) return fail(why, cap, "LRU list reaches block %d", b);
    if (where[b])
      return fail(why, cap, "block %d is on the LRU list and %s", b, where[b] == ON_FREE ? "free" : "in a cycle");
    where[b] = ON_LRU;
    if (p->lru_prev[b] != prev) return fail(why, cap, "LRU block %d links back to %d, not %d", b, p->lru_prev[b], prev);
    if (p->refcount[b] != 0) return fail(why, cap, "evictable block %d has refcount %d", b, p->refcount[b]);
    if (!cn_prefix_index_has(ix, b)) return fail(why, cap, "evictable block %d is not indexed", b);
    count++;
  }
  if (p->lru_tail != prev) return fail(why, cap, "LRU tail is %d, the list ends at %d", p->lru_tail, prev);
  if (count != p->n_evictable) return fail(why, cap, "LRU list has %d blocks, counter says %d", count, p->n_evictable);
  int indexed = 0;
  for (int b = 0; b < n; b++) {
    if (p->refcount[b] < 0) return fail(why, cap, "block %d has refcount %d", b, p->refcount[b]);
    if (p->refcount[b] == 0 && !where[b]) return fail(why, cap, "unused block %d is neither free nor evictable", b);
    if (p->refcount[b] > 0 && where[b]) return fail(why, cap, "block %d in use is also free or evictable", b);
    if (!cn_prefix_index_has(ix, b)) continue;
    indexed++;
    if (cn_prefix_index_find(ix, ix->key[b]) != b) return fail(why, cap, "indexed block %d is not found by its key", b);
  }
  int slots = 0;
  for (size_t i = 0; i <= ix->mask; i++) {
    int b = ix->slots[i];
    if (b < 0) continue;
    if (b >= n || !cn_prefix_index_has(ix, b)) return fail(why, cap, "index slot %zu holds unindexed block %d", i, b);
    slots++;
  }
  if (slots != indexed || ix->n_entries != indexed)
    return fail(why, cap, "index has %d slots used and %d entries counted for %d indexed blocks", slots,
                ix->n_entries, indexed);
  if (!p->prefix_cache && indexed) return fail(why, cap, "prefix cache is off but %d blocks are indexed", indexed);
  return true;
}

bool cn_kv_pool_check(const cn_kv_pool *pool, char *why, size_t cap) {
  unsigned char *where = calloc((size_t)pool->layout.n_blocks, 1);
  if (!where) return fail(why, cap, "no memory for the check");
  bool ok = check(pool, where, why, cap);
  free(where);
  return ok;
}
