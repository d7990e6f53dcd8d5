/* Internal to cache/: the prefix index, a hash map from the hash of a full block's prefix to the
 * one pool block that holds that prefix's K/V (vLLM's automatic prefix caching).
 *
 * Key: XXH64(the block's block_size token ids as int32 bytes, seed = the key of the previous
 * block of the prefix, or CN_PREFIX_ROOT_HASH for the first block). XXH64 with the parent hash as
 * seed chains the whole prefix into one 64-bit value with a single call per block; XXH3's
 * streaming state would buy nothing for 64-byte inputs.
 *
 * A 64-bit hash can collide, and a collision must never hand out wrong K/V, so the key only finds
 * a candidate. Every entry also stores its tokens and the serial of the entry of the previous
 * block (serials are unique for the pool's lifetime and never reused); a hit must match both.
 * By induction a verified chain of hits holds exactly the tokens asked for, whatever the hashes
 * did. */
#ifndef CANOPY_CACHE_PREFIX_INDEX_H
#define CANOPY_CACHE_PREFIX_INDEX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CN_PREFIX_ROOT_HASH 0x63616e6f70794b56ull /* the seed of a prefix's first block */

typedef struct cn_prefix_index {
  int n_blocks, block_size;
  int *slots;               /* [cap] an indexed block, or -1; open addressing, linear probing */
  size_t mask;              /* cap - 1; cap is a power of two >= 2 * n_blocks */
  int n_entries;
  uint64_t *key;            /* [n_blocks] the hash a block is indexed under (valid if serial != 0) */
  uint64_t *serial;         /* [n_blocks] the block's entry number, 0 if the block is not indexed */
  uint64_t *parent_serial;  /* [n_blocks] the entry of the previous block; 0 for a first block */
  int32_t *tokens;          /* [n_blocks][block_size] the tokens of an indexed block */
  uint64_t next_serial;
} cn_prefix_index;

/* CANOPY_ERR_NO_MEMORY (with a message) if the tables cannot be allocated. */
int cn_prefix_index_init(cn_prefix_index *ix, int n_blocks, int block_size);
void cn_prefix_index_destroy(cn_prefix_index *ix);

uint64_t cn_prefix_hash(uint64_t parent_hash, const int32_t *tokens, int block_size);

/* The block indexed under `key`, or -1. Only a candidate: check it with cn_prefix_index_matches. */
int cn_prefix_index_find(const cn_prefix_index *ix, uint64_t key);
/* Whether indexed block `b` holds `tokens` after the prefix of entry `parent_serial`. */
bool cn_prefix_index_matches(const cn_prefix_index *ix, int b, uint64_t parent_serial, const int32_t *tokens);
/* Indexes block `b` (not indexed yet) under `key` (not in use); returns its new serial. */
uint64_t cn_prefix_index_insert(cn_prefix_index *ix, int b, uint64_t key, uint64_t parent_serial,
                                const int32_t *tokens);
/* Takes block `b` out of the index (no-op if it is not indexed). */
void cn_prefix_index_remove(cn_prefix_index *ix, int b);
void cn_prefix_index_clear(cn_prefix_index *ix);

static inline bool cn_prefix_index_has(const cn_prefix_index *ix, int b) { return ix->serial[b] != 0; }

#endif
