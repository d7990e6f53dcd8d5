/* Internal to cache/: the block pool's state and the block-level operations that kv_seq.c builds
 * sequences from.
 *
 * Every block is in exactly one of three states:
 *   free       refcount 0, not indexed, on the free stack;
 *   evictable  refcount 0, indexed (its K/V are a cached prefix), on the LRU list;
 *   in use     refcount > 0 (one reference per block-table entry that holds it), maybe indexed.
 * The allocator takes a free block first, else evicts the least recently released evictable one
 * (dropping its index entry). Available = free + evictable; in use = n_blocks - available. */
#ifndef CANOPY_CACHE_BLOCK_POOL_H
#define CANOPY_CACHE_BLOCK_POOL_H

#include <stddef.h>
#include <stdint.h>

#include "cache/kv_cache.h"
#include "cache/prefix_index.h"

struct cn_kv_pool {
  cn_kv_layout layout;
  size_t half_floats;   /* elements of K (or V) of one block for one layer: block_size * n_kv_heads * head_dim */
  size_t block_floats;  /* elements of one block over all layers: n_layers * 2 * half_floats */
  void *data;           /* [n_blocks][n_layers][2: K, V][block_size][n_kv_heads * head_dim] fp32 on
                           the host, or storage's dtype where storage puts it */
  const cn_kv_storage *storage; /* NULL: host fp32, copied with memcpy */
  void *storage_ctx;
  cn_kv_span *spans;    /* [span_cap] copies gathered for one storage->copy call, kept between calls */
  int span_cap;
  int *refcount;        /* [n_blocks] block-table entries that hold the block */
  int *free_stack;      /* [n_blocks] free blocks, n_free of them, popped from the end */
  int n_free;
  int *lru_prev, *lru_next; /* [n_blocks] the evictable blocks, least recently released first; -1 ends */
  int lru_head, lru_tail, n_evictable;
  bool prefix_cache;
  cn_prefix_index index;
};

/* A block with refcount 1 (its contents are stale). The caller has checked that one is
 * available; returns -1 only if none is. */
int cn_block_alloc(cn_kv_pool *pool);
/* One more reference to an in-use or evictable block (an evictable one leaves the LRU). */
void cn_block_ref(cn_kv_pool *pool, int b);
/* One reference fewer; at 0 the block becomes evictable if indexed, else free. */
void cn_block_unref(cn_kv_pool *pool, int b);
/* Copies K and V rows [0, rows) of every layer from block src to block dst. */
int cn_block_copy_rows(cn_kv_pool *pool, int dst, int src, int rows);
/* Room for n spans in pool->spans (device storage only). */
int cn_block_spans_reserve(cn_kv_pool *pool, int n);

/* Publishes full block b (not indexed) under `key`. Returns the serial of the entry that now holds
 * this exact prefix: an equal existing entry is kept (b stays unindexed, no duplicate); an entry
 * under the same key with other contents (a collision, or a stale child of an evicted parent) is
 * replaced by b. */
uint64_t cn_block_publish(cn_kv_pool *pool, int b, uint64_t key, uint64_t parent_serial, const int32_t *tokens);
/* The indexed block holding `tokens` after the prefix of entry `parent_serial`, or -1. */
int cn_block_lookup(const cn_kv_pool *pool, uint64_t key, uint64_t parent_serial, const int32_t *tokens);

#endif
