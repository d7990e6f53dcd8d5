/* The paged KV cache: one pool of fixed-size blocks shared by all sequences, per-sequence block
 * tables, copy-on-write forks, and a prefix index that lets identical prompt prefixes share
 * blocks (vLLM's PagedAttention and automatic prefix caching).
 *
 * Files: block_pool.c (storage, refcounts, free stack, LRU of evictable cached blocks),
 * prefix_index.c (hash -> block map), kv_seq.c (block tables), kv_check.c (invariant check).
 *
 * Storage is block-major: [n_blocks][n_layers][K, V][block_size][n_kv_heads * head_dim], in host
 * fp32 by default (the CPU backend's) or wherever a backend's cn_kv_storage puts it (CUDA: device
 * bf16). The pool never reads K/V itself: it only asks its storage to copy rows (copy-on-write,
 * commit gathers), so those copies run on the side where the data lives.
 *
 * Not thread-safe: a pool and all its sequences form one unit that the engine uses from one
 * thread at a time (it serialises calls). Free every sequence before its pool. */
#ifndef CANOPY_CACHE_KV_CACHE_H
#define CANOPY_CACHE_KV_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct cn_kv_layout {
  int n_layers;
  int n_kv_heads;
  int head_dim;
  int block_size;  /* tokens per block */
  int n_blocks;    /* blocks in the pool */
} cn_kv_layout;

typedef struct cn_kv_pool cn_kv_pool;
typedef struct cn_kv_seq cn_kv_seq;

/* One contiguous copy inside a pool's storage, in elements from its base. */
typedef struct cn_kv_span {
  size_t dst, src, n;
} cn_kv_span;

/* Storage that is not host fp32 memory (a device's), supplied by the backend whose kernels read
 * it. `ctx` is passed back to every call. */
typedef struct cn_kv_storage {
  const char *name;   /* for messages, e.g. "cuda bf16" */
  size_t elem_bytes;  /* bytes of one K or V element */
  /* Zero-filled storage of `bytes`, or NULL (the pool then reports CANOPY_ERR_NO_MEMORY). */
  void *(*alloc)(void *ctx, size_t bytes);
  void (*release)(void *ctx, void *data);
  /* Copies n spans inside `data` as if every source were read before any destination is
   * written (sources and destinations of one call may overlap across spans). May be
   * asynchronous, ordered before the backend's next op. Returns a status. */
  int (*copy)(void *ctx, void *data, const cn_kv_span *spans, int n);
} cn_kv_storage;

/* Allocates the pool and its fp32 host storage (n_blocks * n_layers * 2 * block_size *
 * n_kv_heads * head_dim floats). CANOPY_ERR_NO_MEMORY if that fails. */
int cn_kv_pool_create(const cn_kv_layout *layout, cn_kv_pool **out);
/* The same with its K/V in `storage` (NULL: host fp32, as cn_kv_pool_create). */
int cn_kv_pool_create_on(const cn_kv_layout *layout, const cn_kv_storage *storage, void *storage_ctx,
                         cn_kv_pool **out);
void cn_kv_pool_free(cn_kv_pool *pool);
const cn_kv_layout *cn_kv_pool_layout(const cn_kv_pool *pool);

/* K or V rows of one block for one layer of a host fp32 pool: [block_size][n_kv_heads * head_dim]. */
float *cn_kv_block_k(cn_kv_pool *pool, int block, int layer);
float *cn_kv_block_v(cn_kv_pool *pool, int block, int layer);

/* The storage base of any pool (a device pointer for device storage). Element (block b, layer l,
 * K = 0 / V = 1, row r, column c) sits at ((b * n_layers + l) * 2 + kv) * block_size * kv_dim +
 * r * kv_dim + c, kv_dim = n_kv_heads * head_dim. */
void *cn_kv_pool_data(const cn_kv_pool *pool);

/* Blocks that could be handed out now (free, plus cached-but-unused ones that may be evicted). */
int cn_kv_pool_available(const cn_kv_pool *pool);
/* Blocks referenced by at least one sequence. */
int cn_kv_pool_in_use(const cn_kv_pool *pool);
/* Turns the prefix index on or off (on by default). */
void cn_kv_pool_set_prefix_cache(cn_kv_pool *pool, bool enabled);

/* For tests and debugging. The number of block-table entries holding `block` (-1 if out of
 * range); whether `block` is in the prefix index; and a full check of the pool's bookkeeping
 * (each block free, evictable or in use exactly once; lists, counters and index consistent):
 * false with the first broken invariant written to why[cap]. */
int cn_kv_pool_refcount(const cn_kv_pool *pool, int block);
bool cn_kv_pool_block_cached(const cn_kv_pool *pool, int block);
bool cn_kv_pool_check(const cn_kv_pool *pool, char *why, size_t cap);

int cn_kv_seq_create(cn_kv_pool *pool, cn_kv_seq **out);
/* Releases every block reference the sequence holds. */
void cn_kv_seq_free(cn_kv_seq *seq);

/* Tokens whose K/V are stored. */
int cn_kv_seq_len(const cn_kv_seq *seq);

/* Makes room for `n` more tokens after the current length: allocates blocks as needed and
 * copies a shared (refcount > 1) partial last block before it is written (copy-on-write); so
 * too a partial last block that is in the prefix index (a truncate cut into a published full
 * block, which other sequences may still attach). Does not change the length.
 * CANOPY_ERR_KV_EXHAUSTED (nothing changed) if the pool is short. Only positions made writable
 * by the latest reserve may be written and committed; truncate and fork make none writable. */
int cn_kv_seq_reserve(cn_kv_seq *seq, int n);

/* Where position `pos` (< len + reserved) lives: block id and row inside the block. */
void cn_kv_seq_slot(const cn_kv_seq *seq, int pos, int *block, int *row);

/* The block table: block ids for positions [0, n_blocks * block_size). */
const int *cn_kv_seq_blocks(const cn_kv_seq *seq, int *n_blocks);

/* Declares that K/V for `n` more tokens (ids `tokens`) were written after the current length;
 * len += n. Every block this fills is published to the prefix index under
 * xxHash64(parent block hash, block tokens). */
void cn_kv_seq_commit(cn_kv_seq *seq, const int32_t *tokens, int n);

/* Keeps n of the slots written past the length since the last reserve (a verified tree's
 * accepted path): slot len + slots[i] moves to position len + i in every layer, then the n
 * tokens are committed as by cn_kv_seq_commit. slots must be strictly increasing with
 * slots[i] >= i and inside the reservation. The other reserved slots stay reserved, unwritten. */
int cn_kv_seq_commit_slots(cn_kv_seq *seq, const int *slots, const int32_t *tokens, int n);

/* Shrinks to `len` tokens (0 <= len <= current length, else CANOPY_ERR_INVALID_ARG), releasing
 * blocks past it, reserved ones included: truncating to the current length undoes a reserve. */
int cn_kv_seq_truncate(cn_kv_seq *seq, int len);

/* A new sequence sharing all of src's blocks that hold committed tokens (refcounts), and a
 * copy of its token record; a later write to the shared partial block copies it first. */
int cn_kv_seq_fork(const cn_kv_seq *src, cn_kv_seq **out);

/* For an empty sequence: attaches the longest run of cached full blocks whose tokens equal the
 * start of `tokens` (at most `n` tokens), commits them, and returns how many tokens were
 * reused (a multiple of block_size). Tokens are compared on every hit, so a hash collision
 * cannot attach wrong K/V. Returns 0 for a non-empty sequence or with the prefix cache off. */
int cn_kv_seq_attach_prefix(cn_kv_seq *seq, const int32_t *tokens, int n);

#endif
