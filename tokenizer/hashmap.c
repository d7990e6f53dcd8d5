/* The two hash tables of the tokenizer: token text -> id (xxHash3, open addressing) and the BPE
 * merge table (id pair -> rank, merged id). Both are filled once at load and read-only after. */
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "tokenizer/tokenizer_internal.h"

static uint32_t table_size(size_t expected) {
  uint32_t cap = 16;
  while (cap < expected * 2 + 1) cap *= 2;
  return cap;
}

int cn_strmap_init(cn_strmap *m, size_t expected) {
  memset(m, 0, sizeof *m);
  uint32_t cap = table_size(expected);
  m->slots = calloc(cap, sizeof *m->slots);
  m->ent_cap = (uint32_t)(expected > 8 ? expected : 8);
  m->ent = malloc(m->ent_cap * sizeof *m->ent);
  if (!m->slots || !m->ent) return CANOPY_ERR_NO_MEMORY;
  m->mask = cap - 1;
  return 0;
}

void cn_strmap_free(cn_strmap *m) {
  free(m->slots);
  free(m->ent);
  free(m->blob.p);
  memset(m, 0, sizeof *m);
}

static uint32_t *find_slot(const cn_strmap *m, const char *s, size_t len, uint64_t h) {
  uint32_t h32 = (uint32_t)h;
  for (uint32_t i = (uint32_t)(h >> 32) & m->mask;; i = (i + 1) & m->mask) {
    uint32_t e = m->slots[i];
    if (!e) return &m->slots[i];
    const cn_strmap_entry *en = &m->ent[e - 1];
    if (en->hash == h32 && en->len == len && !memcmp(m->blob.p + en->off, s, len)) return &m->slots[i];
  }
}

static int rehash(cn_strmap *m) {
  uint32_t cap = (m->mask + 1) * 2;
  uint32_t *slots = calloc(cap, sizeof *slots);
  if (!slots) return CANOPY_ERR_NO_MEMORY;
  free(m->slots);
  m->slots = slots;
  m->mask = cap - 1;
  for (uint32_t e = 0; e < m->n; e++) {
    const char *s = m->blob.p + m->ent[e].off;
    *find_slot(m, s, m->ent[e].len, XXH3_64bits(s, m->ent[e].len)) = e + 1;
  }
  return 0;
}

int cn_strmap_put(cn_strmap *m, const char *s, size_t len, int32_t val) {
  uint64_t h = XXH3_64bits(s, len);
  uint32_t *slot = find_slot(m, s, len, h);
  if (*slot) {
    m->ent[*slot - 1].val = val;
    return 0;
  }
  if (m->n == m->ent_cap) {
    cn_strmap_entry *e = realloc(m->ent, 2 * m->ent_cap * sizeof *e);
    if (!e) return CANOPY_ERR_NO_MEMORY;
    m->ent = e;
    m->ent_cap *= 2;
  }
  size_t off = m->blob.n;
  if (cn_buf_append(&m->blob, s, len) || cn_buf_append(&m->blob, "", 1)) return CANOPY_ERR_NO_MEMORY;
  m->ent[m->n] = (cn_strmap_entry){(uint32_t)off, (uint32_t)len, val, (uint32_t)h};
  *slot = ++m->n;
  if (m->n * 2 > m->mask) return rehash(m);
  return 0;
}

int32_t cn_strmap_get(const cn_strmap *m, const char *s, size_t len) {
  if (!m->slots) return -1;
  uint32_t e = *find_slot(m, s, len, XXH3_64bits(s, len));
  return e ? m->ent[e - 1].val : -1;
}

int cn_pairmap_init(cn_pairmap *m, size_t expected) {
  memset(m, 0, sizeof *m);
  uint32_t cap = table_size(expected);
  m->keys = malloc(cap * sizeof *m->keys);
  m->rank = malloc(cap * sizeof *m->rank);
  m->merged = malloc(cap * sizeof *m->merged);
  if (!m->keys || !m->rank || !m->merged) return CANOPY_ERR_NO_MEMORY;
  memset(m->keys, 0xFF, cap * sizeof *m->keys);
  m->mask = cap - 1;
  return 0;
}

void cn_pairmap_free(cn_pairmap *m) {
  free(m->keys);
  free(m->rank);
  free(m->merged);
  memset(m, 0, sizeof *m);
}

/* The table is sized for every merge up front (cn_pairmap_init), so it never fills. */
void cn_pairmap_put(cn_pairmap *m, int32_t a, int32_t b, uint32_t rank, int32_t merged) {
  uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
  uint32_t i = cn_pair_slot(key, m->mask);
  while (m->keys[i] != UINT64_MAX && m->keys[i] != key) i = (i + 1) & m->mask;
  if (m->keys[i] == UINT64_MAX) m->n++;
  m->keys[i] = key;
  m->rank[i] = rank;
  m->merged[i] = merged;
}
