/* The prefix index: hash -> block, with the tokens kept beside each entry (see prefix_index.h). */
#include "cache/prefix_index.h"

#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "common/error.h"

int cn_prefix_index_init(cn_prefix_index *ix, int n_blocks, int block_size) {
  memset(ix, 0, sizeof *ix);
  ix->n_blocks = n_blocks;
  ix->block_size = block_size;
  ix->next_serial = 1;
  size_t cap = 16;
  while (cap < 2 * (size_t)n_blocks) cap *= 2;
  ix->mask = cap - 1;
  size_t n_tokens = (size_t)n_blocks * (size_t)block_size; /* < 2^62: no overflow */
  ix->slots = malloc(cap * sizeof *ix->slots);
  ix->key = calloc((size_t)n_blocks, sizeof *ix->key);
  ix->serial = calloc((size_t)n_blocks, sizeof *ix->serial);
  ix->parent_serial = calloc((size_t)n_blocks, sizeof *ix->parent_serial);
  ix->tokens = calloc(n_tokens, sizeof *ix->tokens);
  if (!ix->slots || !ix->key || !ix->serial || !ix->parent_serial || !ix->tokens) {
    cn_prefix_index_destroy(ix);
    return cn_error(CANOPY_ERR_NO_MEMORY, "KV prefix index: cannot allocate %zu bytes for %d blocks of %d tokens",
                    cap * sizeof(int) + (size_t)n_blocks * 3 * sizeof(uint64_t) + n_tokens * sizeof(int32_t),
                    n_blocks, block_size);
  }
  for (size_t i = 0; i < cap; i++) ix->slots[i] = -1;
  return CANOPY_OK;
}

void cn_prefix_index_destroy(cn_prefix_index *ix) {
  free(ix->slots);
  free(ix->key);
  free(ix->serial);
  free(ix->parent_serial);
  free(ix->tokens);
  memset(ix, 0, sizeof *ix);
}

uint64_t cn_prefix_hash(uint64_t parent_hash, const int32_t *tokens, int block_size) {
  return XXH64(tokens, sizeof *tokens * (size_t)block_size, parent_hash);
}

int cn_prefix_index_find(const cn_prefix_index *ix, uint64_t key) {
  for (size_t i = key & ix->mask;; i = (i + 1) & ix->mask) {
    int b = ix->slots[i];
    if (b < 0) return -1;
    if (ix->key[b] == key) return b;
  }
}

bool cn_prefix_index_matches(const cn_prefix_index *ix, int b, uint64_t parent_serial, const int32_t *tokens) {
  size_t bs = (size_t)ix->block_size;
  return ix->serial[b] != 0 && ix->parent_serial[b] == parent_serial &&
         memcmp(ix->tokens + (size_t)b * bs, tokens, bs * sizeof *tokens) == 0;
}

uint64_t cn_prefix_index_insert(cn_prefix_index *ix, int b, uint64_t key, uint64_t parent_serial,
                                const int32_t *tokens) {
  size_t i = key & ix->mask;
  while (ix->slots[i] >= 0) i = (i + 1) & ix->mask;
  ix->slots[i] = b;
  ix->key[b] = key;
  ix->serial[b] = ix->next_serial++;
  ix->parent_serial[b] = parent_serial;
  memcpy(ix->tokens + (size_t)b * (size_t)ix->block_size, tokens, sizeof *tokens * (size_t)ix->block_size);
  ix->n_entries++;
  return ix->serial[b];
}

/* Backward-shift deletion (Knuth 6.4, algorithm R): later entries of the probe run move into the
 * hole, so the table never needs tombstones and lookups stay short however long the pool lives. */
void cn_prefix_index_remove(cn_prefix_index *ix, int b) {
  if (!cn_prefix_index_has(ix, b)) return;
  size_t hole = ix->key[b] & ix->mask;
  while (ix->slots[hole] != b) hole = (hole + 1) & ix->mask;
  for (size_t j = (hole + 1) & ix->mask; ix->slots[j] >= 0; j = (j + 1) & ix->mask) {
    size_t home = ix->key[ix->slots[j]] & ix->mask;
    /* The entry at j may fill the hole unless its home lies cyclically in (hole, j]. */
    bool stays = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
    if (!stays) {
      ix->slots[hole] = ix->slots[j];
      hole = j;
    }
  }
  ix->slots[hole] = -1;
  ix->serial[b] = 0;
  ix->n_entries--;
}

void cn_prefix_index_clear(cn_prefix_index *ix) {
  for (size_t i = 0; i <= ix->mask; i++) ix->slots[i] = -1;
  memset(ix->serial, 0, sizeof *ix->serial * (size_t)ix->n_blocks);
  ix->n_entries = 0;
}
