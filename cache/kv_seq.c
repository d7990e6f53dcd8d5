/* Sequences over the block pool: block tables, reserve (with copy-on-write), commit (with prefix
 * publication), truncate, fork and prefix attach.
 *
 * Invariants of a sequence (bs = block_size):
 *  - the table holds at least ceil(len / bs) blocks; blocks past that were reserved by this
 *    sequence and are private to it (refcount 1, not indexed): fork shares only ceil(len / bs)
 *    blocks and attach only runs on an empty sequence;
 *  - rows below len are never written again, by anyone. A sequence writes only at positions
 *    >= its len, and only after reserve made them writable. The one block that holds both
 *    committed rows and rows past len, the partial last block, may be shared (a fork) or indexed
 *    (truncate cut into a published full block, which other sequences may attach at any time):
 *    reserve copies it to a private block first (copy-on-write) when its refcount is > 1 OR it
 *    is indexed. A full indexed block is never written: writes only go past len.
 *  - A block the sequence reserved before it was forked may still be written by it without a
 *    copy: it writes rows >= its len, and the fork sees rows < the same len only.
 */
#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "cache/block_pool.h"
#include "common/error.h"

struct cn_kv_seq {
  cn_kv_pool *pool;
  int len;           /* committed tokens */
  int writable;      /* positions from len on that reserve made safe to write (commit checks it) */
  int n_table, cap;  /* blocks in the table; capacity of the arrays below, in blocks */
  int *table;        /* [cap] pool block of positions [i * bs, (i + 1) * bs) */
  uint64_t *hash;    /* [cap] prefix hash through block i (valid for full blocks) */
  uint64_t *serial;  /* [cap] the index entry holding the same prefix through block i; 0 if none */
  int32_t *tokens;   /* [cap * bs] the committed token ids */
};

static int bs_of(const cn_kv_seq *s) { return s->pool->layout.block_size; }

static int blocks_for(int len, int bs) { return len / bs + (len % bs != 0); }

/* Grows the per-block arrays (and the token record) to hold `blocks` blocks. */
static int grow(cn_kv_seq *s, int blocks) {
  if (blocks <= s->cap) return CANOPY_OK;
  int cap = s->cap ? s->cap : 4;
  while (cap < blocks) cap = cap > INT32_MAX / 2 ? blocks : cap * 2;
  size_t n = (size_t)cap, bs = (size_t)bs_of(s);
  void *p;
  if (!(p = realloc(s->table, n * sizeof *s->table))) goto fail;
  s->table = p;
  if (!(p = realloc(s->hash, n * sizeof *s->hash))) goto fail;
  s->hash = p;
  if (!(p = realloc(s->serial, n * sizeof *s->serial))) goto fail;
  s->serial = p;
  if (!(p = realloc(s->tokens, n * bs * sizeof *s->tokens))) goto fail;
  s->tokens = p;
  s->cap = cap;
  return CANOPY_OK;
fail:
  return cn_error(CANOPY_ERR_NO_MEMORY, "KV cache: cannot allocate %zu bytes for a block table of %d blocks",
                  n * (sizeof(int) + 2 * sizeof(uint64_t) + bs * sizeof(int32_t)), cap);
}

/* Releases table entries [keep, n_table), the last first: a freed sequence's tail blocks then
 * sit nearer the LRU head and are evicted before its head blocks, which more prompts share. */
static void release_from(cn_kv_seq *s, int keep) {
  while (s->n_table > keep) cn_block_unref(s->pool, s->table[--s->n_table]);
}

int cn_kv_seq_create(cn_kv_pool *pool, cn_kv_seq **out) {
  if (!pool || !out) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_kv_seq_create: NULL argument");
  cn_kv_seq *s = calloc(1, sizeof *s);
  if (!s) return cn_error(CANOPY_ERR_NO_MEMORY, "KV cache: cannot allocate %zu bytes for a sequence", sizeof *s);
  s->pool = pool;
  *out = s;
  return CANOPY_OK;
}

void cn_kv_seq_free(cn_kv_seq *seq) {
  if (!seq) return;
  release_from(seq, 0);
  free(seq->table);
  free(seq->hash);
  free(seq->serial);
  free(seq->tokens);
  free(seq);
}

int cn_kv_seq_len(const cn_kv_seq *seq) { return seq->len; }

int cn_kv_seq_reserve(cn_kv_seq *s, int n) {
  if (!s || n < 0 || n > INT32_MAX - s->len)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_kv_seq_reserve: cannot reserve %d tokens after %d", n, s ? s->len : 0);
  cn_kv_pool *p = s->pool;
  int bs = bs_of(s), want = blocks_for(s->len + n, bs);
  int fresh = want > s->n_table ? want - s->n_table : 0;
  int partial = s->len % bs ? s->len / bs : -1; /* the table block holding rows on both sides of len */
  bool cow = n > 0 && partial >= 0 &&
             (p->refcount[s->table[partial]] > 1 || cn_prefix_index_has(&p->index, s->table[partial]));
  int need = fresh + cow, avail = cn_kv_pool_available(p);
  if (need > avail)
    return cn_error(CANOPY_ERR_KV_EXHAUSTED,
                    "KV cache pool exhausted: need %d more blocks, %d available (pool of %d blocks of %d tokens)",
                    need, avail, p->layout.n_blocks, bs);
  int st = grow(s, want);
  if (!st && cow && p->storage) st = cn_block_spans_reserve(p, 2 * p->layout.n_layers);
  if (st) return st;
  /* Nothing below fails on the host: the blocks were counted above. A device copy may report a
   * fault; the bookkeeping is complete either way. */
  if (cow) {
    int old = s->table[partial], copy = cn_block_alloc(p);
    st = cn_block_copy_rows(p, copy, old, s->len % bs);
    cn_block_unref(p, old);
    s->table[partial] = copy;
  }
  while (s->n_table < want) s->table[s->n_table++] = cn_block_alloc(p);
  s->writable = s->n_table * bs - s->len;
  return st;
}

void cn_kv_seq_slot(const cn_kv_seq *seq, int pos, int *block, int *row) {
  int bs = bs_of(seq);
  assert(pos >= 0 && pos < seq->n_table * bs);
  *block = seq->table[pos / bs];
  *row = pos % bs;
}

const int *cn_kv_seq_blocks(const cn_kv_seq *seq, int *n_blocks) {
  static const int none[1] = {-1}; /* never NULL, so memcpy(dst, table, 0) stays defined */
  if (n_blocks) *n_blocks = seq->n_table;
  return seq->table ? seq->table : none;
}

/* Records the prefix hash of full block i and publishes it, chained to block i-1's entry. A
 * block whose parent has no entry (cache off at the time, or lost to a collision) is not
 * published: no lookup could reach it. */
static void publish(cn_kv_seq *s, int i) {
  cn_kv_pool *p = s->pool;
  int bs = bs_of(s);
  const int32_t *toks = s->tokens + (size_t)i * bs;
  s->hash[i] = cn_prefix_hash(i ? s->hash[i - 1] : CN_PREFIX_ROOT_HASH, toks, bs);
  s->serial[i] = 0;
  uint64_t parent = i ? s->serial[i - 1] : 0;
  if (p->prefix_cache && (i == 0 || parent != 0))
    s->serial[i] = cn_block_publish(p, s->table[i], s->hash[i], parent, toks);
}

void cn_kv_seq_commit(cn_kv_seq *s, const int32_t *tokens, int n) {
  assert(n >= 0 && n <= s->writable);
  if (n <= 0 || n > s->writable) return;
  int bs = bs_of(s), old = s->len;
  memcpy(s->tokens + old, tokens, sizeof *tokens * (size_t)n);
  s->len += n;
  s->writable -= n;
  for (int i = old / bs; i < s->len / bs; i++) publish(s, i);
}

/* commit_slots for storage the pool cannot memcpy (a device's): the same row moves as spans, one
 * storage call for all of them (its copy reads every source before writing, which the in-order
 * host loop gets from ascending sources). Slots were validated by the caller. */
static int commit_slots_on_storage(cn_kv_seq *s, const int *slots, const int32_t *tokens, int n) {
  cn_kv_pool *p = s->pool;
  const cn_kv_layout *L = &p->layout;
  int bs = L->block_size, moved = 0;
  size_t row = (size_t)L->n_kv_heads * L->head_dim;
  for (int i = 0; i < n; i++) moved += slots[i] != i;
  int st = cn_block_spans_reserve(p, moved * 2 * L->n_layers);
  if (st) return st;
  int k = 0;
  for (int i = 0; i < n; i++) {
    int src = s->len + slots[i], dst = s->len + i;
    if (src == dst) continue;
    size_t so = (size_t)s->table[src / bs] * p->block_floats + (size_t)(src % bs) * row;
    size_t d_o = (size_t)s->table[dst / bs] * p->block_floats + (size_t)(dst % bs) * row;
    for (int h = 0; h < 2 * L->n_layers; h++) /* K and V of each layer: half_floats apart */
      p->spans[k++] = (cn_kv_span){.dst = d_o + (size_t)h * p->half_floats, .src = so + (size_t)h * p->half_floats,
                                   .n = row};
  }
  if (k) st = p->storage->copy(p->storage_ctx, p->data, p->spans, k);
  cn_kv_seq_commit(s, tokens, n);
  return st;
}

int cn_kv_seq_commit_slots(cn_kv_seq *s, const int *slots, const int32_t *tokens, int n) {
  if (n < 0 || n > s->writable)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_kv_seq_commit_slots: %d slots, %d writable", n, s->writable);
  const cn_kv_layout *L = &s->pool->layout;
  int bs = L->block_size;
  size_t row = (size_t)L->n_kv_heads * L->head_dim;
  for (int i = 0; i < n; i++) {
    if (slots[i] < i || slots[i] >= s->writable || (i && slots[i] <= slots[i - 1]))
      return cn_error(CANOPY_ERR_INVALID_ARG, "cn_kv_seq_commit_slots: slot %d at index %d is out of order", slots[i], i);
  }
  cn_kv_pool *p = s->pool;
  if (p->storage) return commit_slots_on_storage(s, slots, tokens, n);
  /* Ascending sources at or after their destinations: copying in order never overwrites a row
   * that is still to be read. */
  for (int i = 0; i < n; i++) {
    int src = s->len + slots[i], dst = s->len + i;
    if (src == dst) continue;
    for (int l = 0; l < L->n_layers; l++) {
      float *ks = cn_kv_block_k(p, s->table[src / bs], l) + (size_t)(src % bs) * row;
      float *kd = cn_kv_block_k(p, s->table[dst / bs], l) + (size_t)(dst % bs) * row;
      float *vs = cn_kv_block_v(p, s->table[src / bs], l) + (size_t)(src % bs) * row;
      float *vd = cn_kv_block_v(p, s->table[dst / bs], l) + (size_t)(dst % bs) * row;
      memcpy(kd, ks, sizeof(float) * row);
      memcpy(vd, vs, sizeof(float) * row);
    }
  }
  cn_kv_seq_commit(s, tokens, n);
  return CANOPY_OK;
}

int cn_kv_seq_truncate(cn_kv_seq *s, int len) {
  if (!s || len < 0 || len > s->len)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_kv_seq_truncate: length %d outside [0, %d]", len, s ? s->len : 0);
  release_from(s, blocks_for(len, bs_of(s)));
  s->len = len;
  s->writable = 0; /* the next write reserves again, and copies a shared or indexed partial block */
  return CANOPY_OK;
}

int cn_kv_seq_fork(const cn_kv_seq *src, cn_kv_seq **out) {
  if (!src || !out) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_kv_seq_fork: NULL argument");
  cn_kv_seq *s = NULL;
  int st = cn_kv_seq_create(src->pool, &s);
  if (st) return st;
  int nb = blocks_for(src->len, bs_of(src));
  if ((st = grow(s, nb))) {
    cn_kv_seq_free(s);
    return st;
  }
  if (nb > 0) { /* memcpy must not see the NULL arrays of an empty sequence */
    memcpy(s->table, src->table, sizeof *s->table * (size_t)nb);
    memcpy(s->hash, src->hash, sizeof *s->hash * (size_t)nb);
    memcpy(s->serial, src->serial, sizeof *s->serial * (size_t)nb);
    memcpy(s->tokens, src->tokens, sizeof *s->tokens * (size_t)src->len);
  }
  for (int i = 0; i < nb; i++) cn_block_ref(s->pool, s->table[i]);
  s->n_table = nb;
  s->len = src->len;
  *out = s;
  return CANOPY_OK;
}

int cn_kv_seq_attach_prefix(cn_kv_seq *s, const int32_t *tokens, int n) {
  if (!s || !tokens || s->len != 0 || !s->pool->prefix_cache) return 0;
  cn_kv_pool *p = s->pool;
  int bs = bs_of(s), full = n / bs;
  release_from(s, 0); /* blocks reserved while empty */
  s->writable = 0;
  if (full <= 0 || grow(s, full)) return 0;
  uint64_t hash = CN_PREFIX_ROOT_HASH, serial = 0;
  for (int i = 0; i < full; i++) {
    const int32_t *toks = tokens + (size_t)i * bs;
    hash = cn_prefix_hash(hash, toks, bs);
    int b = cn_block_lookup(p, hash, serial, toks);
    if (b < 0) break;
    cn_block_ref(p, b);
    serial = p->index.serial[b];
    s->table[i] = b;
    s->hash[i] = hash;
    s->serial[i] = serial;
    s->n_table = i + 1;
  }
  s->len = s->n_table * bs;
  memcpy(s->tokens, tokens, sizeof *tokens * (size_t)s->len);
  return s->len;
}
