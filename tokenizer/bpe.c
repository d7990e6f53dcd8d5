/* The BPE model: vocabulary and merges from tokenizer.json, and the merge loop.
 *
 * A pre-token starts as one symbol per character (byte-level pre-tokens: per byte, through the
 * GPT-2 map), falling back to <0xXX> byte tokens or <unk>. Adjacent pairs go into a min-heap by
 * (merge rank, position); the lowest is merged and its new neighbours pushed, stale entries are
 * skipped when popped. This is the order of tokenizers' Word::merge_all, so the ids agree with it
 * exactly. Results are cached per pre-token. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "common/error.h"
#include "tokenizer/tokenizer_internal.h"

struct cn_sym {
  int32_t id;         /* -1 once merged into its left neighbour */
  int32_t prev, next; /* neighbours, -1 at the ends */
};

struct cn_merge {
  uint32_t rank, pos;
  int32_t merged;
};

/* ---- loading ---------------------------------------------------------------------------------- */

static int lookup_merge_part(canopy_tokenizer *t, const char *s, size_t len, int i, int32_t *id) {
  *id = cn_strmap_get(&t->vocab, s, len);
  if (*id < 0)
    return cn_error(CANOPY_ERR_FORMAT, "%s: model.merges[%d]: token \"%.*s\" is not in model.vocab", t->path, i,
                    (int)(len > 60 ? 60 : len), s);
  return 0;
}

static int parse_merges(canopy_tokenizer *t, const cJSON *merges) {
  int n = cJSON_GetArraySize(merges), i = 0, rc;
  if ((rc = cn_pairmap_init(&t->bpe.merges, (size_t)n))) return rc;
  cn_buf joined = {0};
  for (const cJSON *m = merges->child; m; m = m->next, i++) {
    const char *a, *b;
    size_t la, lb;
    if (cJSON_IsString(m)) {
      /* The legacy "a b" form: exactly one space. */
      const char *sp = strchr(m->valuestring, ' ');
      if (!sp || strchr(sp + 1, ' ')) {
        free(joined.p);
        return cn_error(CANOPY_ERR_FORMAT, "%s: model.merges[%d]: expected \"left right\" with one space", t->path, i);
      }
      a = m->valuestring;
      la = (size_t)(sp - a);
      b = sp + 1;
      lb = strlen(b);
    } else if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2 && cJSON_IsString(m->child) &&
               cJSON_IsString(m->child->next)) {
      a = m->child->valuestring;
      la = strlen(a);
      b = m->child->next->valuestring;
      lb = strlen(b);
    } else {
      free(joined.p);
      return cn_error(CANOPY_ERR_FORMAT, "%s: model.merges[%d]: expected a string pair", t->path, i);
    }
    int32_t ia, ib, im;
    joined.n = 0;
    if ((rc = lookup_merge_part(t, a, la, i, &ia)) || (rc = lookup_merge_part(t, b, lb, i, &ib)) ||
        (rc = cn_buf_append(&joined, a, la)) || (rc = cn_buf_append(&joined, b, lb)) ||
        (rc = lookup_merge_part(t, joined.p, joined.n, i, &im))) {
      free(joined.p);
      return rc;
    }
    cn_pairmap_put(&t->bpe.merges, ia, ib, (uint32_t)i, im);
  }
  free(joined.p);
  return 0;
}

static int get_flag(canopy_tokenizer *t, const cJSON *model, const char *key, int *out) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(model, key);
  if (!v || cJSON_IsNull(v)) return 0;
  if (!cJSON_IsBool(v)) return cn_error(CANOPY_ERR_FORMAT, "%s: model.%s: expected true or false", t->path, key);
  *out = cJSON_IsTrue(v);
  return 0;
}

int cn_bpe_parse(canopy_tokenizer *t, const cJSON *model) {
  cn_bpe *b = &t->bpe;
  b->unk_id = -1;
  const cJSON *type = cJSON_GetObjectItemCaseSensitive(model, "type");
  if (cJSON_IsString(type) && strcmp(type->valuestring, "BPE"))
    return cn_error(CANOPY_ERR_UNSUPPORTED, "%s: model.type: \"%s\" models are not supported (only BPE)", t->path,
                    type->valuestring);
  const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
  const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
  if (!cJSON_IsObject(vocab)) return cn_error(CANOPY_ERR_FORMAT, "%s: model.vocab: expected an object", t->path);
  if (!cJSON_IsArray(merges)) return cn_error(CANOPY_ERR_FORMAT, "%s: model.merges: expected an array", t->path);
  static const char *unsupported[] = {"continuing_subword_prefix", "end_of_word_suffix"};
  for (int i = 0; i < 2; i++) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(model, unsupported[i]);
    if (cJSON_IsString(v) && v->valuestring[0])
      return cn_error(CANOPY_ERR_UNSUPPORTED, "%s: model.%s is not supported", t->path, unsupported[i]);
  }
  const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(model, "dropout");
  if (cJSON_IsNumber(dropout) && dropout->valuedouble > 0)
    return cn_error(CANOPY_ERR_UNSUPPORTED, "%s: model.dropout: BPE dropout is not supported", t->path);
  int rc;
  if ((rc = get_flag(t, model, "byte_fallback", &b->byte_fallback)) || (rc = get_flag(t, model, "fuse_unk", &b->fuse_unk)) ||
      (rc = get_flag(t, model, "ignore_merges", &b->ignore_merges)))
    return rc;

  if ((rc = cn_strmap_init(&t->vocab, (size_t)cJSON_GetArraySize(vocab)))) return rc;
  for (const cJSON *e = vocab->child; e; e = e->next) {
    double v = cJSON_IsNumber(e) ? e->valuedouble : -1;
    if (v < 0 || v >= 2147483647.0 || v != (double)(int32_t)v)
      return cn_error(CANOPY_ERR_FORMAT, "%s: model.vocab[\"%.60s\"]: expected a non-negative integer id", t->path,
                      e->string);
    if ((rc = cn_strmap_put(&t->vocab, e->string, strlen(e->string), (int32_t)v))) return rc;
  }
  if ((rc = parse_merges(t, merges))) return rc;

  const cJSON *unk = cJSON_GetObjectItemCaseSensitive(model, "unk_token");
  if (cJSON_IsString(unk)) {
    b->unk_id = cn_strmap_get(&t->vocab, unk->valuestring, strlen(unk->valuestring));
    if (b->unk_id < 0)
      return cn_error(CANOPY_ERR_FORMAT, "%s: model.unk_token: \"%.60s\" is not in model.vocab", t->path, unk->valuestring);
  }
  for (int i = 0; i < 256; i++) {
    char name[8];
    snprintf(name, sizeof name, "<0x%02X>", i);
    b->byte_tok[i] = cn_strmap_get(&t->vocab, name, 6);
    b->bl_char_id[i] = cn_strmap_get(&t->vocab, t->bl.utf8[i], t->bl.len[i]);
  }
  return 0;
}

void cn_bpe_free(cn_bpe *b) { cn_pairmap_free(&b->merges); }

/* ---- the per-word cache ----------------------------------------------------------------------- */

enum { CACHE_SLOTS = 1 << 17, CACHE_MAX_ENTRIES = 1 << 16, CACHE_MAX_KEY = 256, CACHE_MAX_BYTES = 4 << 20 };

void cn_wcache_free(cn_wcache *c) {
  free(c->slots);
  free(c->ent);
  free(c->keys.p);
  free(c->ids.p);
  memset(c, 0, sizeof *c);
}

static int cache_get(const cn_wcache *c, const char *s, size_t len, uint64_t h, cn_ivec *out) {
  if (!c->slots) return 0;
  for (uint32_t i = (uint32_t)h & c->mask;; i = (i + 1) & c->mask) {
    uint32_t e = c->slots[i];
    if (!e) return 0;
    const cn_wcache_entry *en = &c->ent[e - 1];
    if (en->hash == h && en->key_len == len && !memcmp(c->keys.p + en->key_off, s, len)) {
      return cn_ivec_append(out, c->ids.p + en->ids_off, en->ids_len) ? -1 : 1;
    }
  }
}

static void cache_put(cn_wcache *c, const char *s, size_t len, uint64_t h, const int32_t *ids, size_t n) {
  if (!c->slots) {
    c->slots = calloc(CACHE_SLOTS, sizeof *c->slots);
    c->ent = malloc(CACHE_MAX_ENTRIES * sizeof *c->ent);
    if (!c->slots || !c->ent) {
      cn_wcache_free(c);
      return;
    }
    c->mask = CACHE_SLOTS - 1;
    c->max = CACHE_MAX_ENTRIES;
  }
  if (c->n >= c->max || c->keys.n > CACHE_MAX_BYTES) { /* full: start over */
    memset(c->slots, 0, CACHE_SLOTS * sizeof *c->slots);
    c->n = 0;
    c->keys.n = c->ids.n = 0;
  }
  size_t koff = c->keys.n, ioff = c->ids.n;
  if (cn_buf_append(&c->keys, s, len) || cn_ivec_append(&c->ids, ids, n)) return; /* a cache may forget */
  uint32_t i = (uint32_t)h & c->mask;
  while (c->slots[i]) i = (i + 1) & c->mask;
  c->ent[c->n] = (cn_wcache_entry){h, (uint32_t)koff, (uint32_t)len, (uint32_t)ioff, (uint32_t)n};
  c->slots[i] = ++c->n;
}

/* ---- the merge loop --------------------------------------------------------------------------- */

static int heap_less(const struct cn_merge *a, const struct cn_merge *b) {
  return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static int heap_push(cn_scratch *sc, size_t *n, struct cn_merge m) {
  if (cn_grow((void **)&sc->heap, &sc->heap_cap, *n + 1, sizeof *sc->heap)) return CANOPY_ERR_NO_MEMORY;
  struct cn_merge *h = sc->heap;
  size_t i = (*n)++;
  while (i > 0 && heap_less(&m, &h[(i - 1) / 2])) {
    h[i] = h[(i - 1) / 2];
    i = (i - 1) / 2;
  }
  h[i] = m;
  return 0;
}

static struct cn_merge heap_pop(struct cn_merge *h, size_t *n) {
  struct cn_merge top = h[0], last = h[--*n];
  size_t i = 0;
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= *n) break;
    if (c + 1 < *n && heap_less(&h[c + 1], &h[c])) c++;
    if (!heap_less(&h[c], &last)) break;
    h[i] = h[c];
    i = c;
  }
  h[i] = last;
  return top;
}

static int push_sym(cn_scratch *sc, size_t *n, int32_t id) {
  if (cn_grow((void **)&sc->sym, &sc->sym_cap, *n + 1, sizeof *sc->sym)) return CANOPY_ERR_NO_MEMORY;
  sc->sym[*n] = (struct cn_sym){id, (int32_t)*n - 1, -1};
  if (*n) sc->sym[*n - 1].next = (int32_t)*n;
  (*n)++;
  return 0;
}

/* tokenizers' BPE::merge_word: characters to initial symbols. */
static int initial_symbols(const canopy_tokenizer *t, cn_scratch *sc, const cn_piece *pc, size_t *n) {
  const cn_bpe *b = &t->bpe;
  int bytelevel = (pc->flags & CN_PIECE_BYTELEVEL) != 0;
  int32_t unk = -1; /* a pending <unk>, added when a known character follows (or at the end) */
  *n = 0;
  for (uint32_t i = 0; i < pc->len;) {
    const char *ch;
    int k, id;
    if (bytelevel) {
      uint8_t byte = (uint8_t)pc->s[i];
      ch = t->bl.utf8[byte];
      k = t->bl.len[byte];
      id = b->bl_char_id[byte];
      i++;
    } else {
      ch = pc->s + i;
      k = cn_utf8_len((unsigned char)*ch);
      id = cn_strmap_get(&t->vocab, ch, (size_t)k);
      i += (uint32_t)k;
    }
    if (id >= 0) {
      if (unk >= 0 && push_sym(sc, n, unk)) return CANOPY_ERR_NO_MEMORY;
      unk = -1;
      if (push_sym(sc, n, id)) return CANOPY_ERR_NO_MEMORY;
      continue;
    }
    if (b->byte_fallback) {
      int all = 1;
      for (int j = 0; j < k; j++) all &= b->byte_tok[(uint8_t)ch[j]] >= 0;
      if (all) {
        for (int j = 0; j < k; j++)
          if (push_sym(sc, n, b->byte_tok[(uint8_t)ch[j]])) return CANOPY_ERR_NO_MEMORY;
        continue;
      }
    }
    if (b->unk_id >= 0) {
      if (unk >= 0 && !b->fuse_unk && push_sym(sc, n, unk)) return CANOPY_ERR_NO_MEMORY;
      unk = b->unk_id;
    }
    /* with neither, tokenizers drops the character */
  }
  if (unk >= 0 && push_sym(sc, n, unk)) return CANOPY_ERR_NO_MEMORY;
  return 0;
}

static int merge_all(const cn_bpe *b, cn_scratch *sc, size_t n) {
  size_t hn = 0;
  uint32_t rank;
  int32_t merged;
  for (size_t i = 0; i + 1 < n; i++)
    if (cn_pairmap_get(&b->merges, sc->sym[i].id, sc->sym[i + 1].id, &rank, &merged) &&
        heap_push(sc, &hn, (struct cn_merge){rank, (uint32_t)i, merged}))
      return CANOPY_ERR_NO_MEMORY;
  while (hn) {
    struct cn_merge top = heap_pop(sc->heap, &hn);
    struct cn_sym *s = sc->sym, *cur = &s[top.pos];
    if (cur->id < 0 || cur->next < 0) continue;
    int32_t right = cur->next;
    if (!cn_pairmap_get(&b->merges, cur->id, s[right].id, &rank, &merged) || merged != top.merged) continue;
    cur->id = top.merged;
    cur->next = s[right].next;
    s[right].id = -1;
    if (cur->next >= 0) s[cur->next].prev = (int32_t)top.pos;
    if (cur->prev >= 0 && cn_pairmap_get(&b->merges, s[cur->prev].id, cur->id, &rank, &merged) &&
        heap_push(sc, &hn, (struct cn_merge){rank, (uint32_t)cur->prev, merged}))
      return CANOPY_ERR_NO_MEMORY;
    if (cur->next >= 0 && cn_pairmap_get(&b->merges, cur->id, s[cur->next].id, &rank, &merged) &&
        heap_push(sc, &hn, (struct cn_merge){rank, top.pos, merged}))
      return CANOPY_ERR_NO_MEMORY;
  }
  return 0;
}

int cn_bpe_encode(const canopy_tokenizer *t, cn_scratch *sc, const cn_piece *pc, cn_ivec *out) {
  if (pc->len == 0) return 0;
  if (t->bpe.ignore_merges) {
    const char *s = pc->s;
    size_t len = pc->len;
    if (pc->flags & CN_PIECE_BYTELEVEL) {
      sc->tmp.n = 0;
      for (uint32_t i = 0; i < pc->len; i++) {
        uint8_t byte = (uint8_t)pc->s[i];
        if (cn_buf_append(&sc->tmp, t->bl.utf8[byte], t->bl.len[byte])) return CANOPY_ERR_NO_MEMORY;
      }
      s = sc->tmp.p;
      len = sc->tmp.n;
    }
    int32_t id = cn_strmap_get(&t->vocab, s, len);
    if (id >= 0) return cn_ivec_push(out, id);
  }
  uint64_t h = 0;
  if (pc->len <= CACHE_MAX_KEY) {
    h = XXH3_64bits(pc->s, pc->len);
    int hit = cache_get(&sc->cache, pc->s, pc->len, h, out);
    if (hit) return hit < 0 ? CANOPY_ERR_NO_MEMORY : 0;
  }
  size_t n;
  int rc = initial_symbols(t, sc, pc, &n);
  if (!rc && n > 1) rc = merge_all(&t->bpe, sc, n);
  if (rc) return rc;
  size_t first = out->n;
  for (int32_t i = n ? 0 : -1; i >= 0; i = sc->sym[i].next)
    if (cn_ivec_push(out, sc->sym[i].id)) return CANOPY_ERR_NO_MEMORY;
  if (pc->len <= CACHE_MAX_KEY) cache_put(&sc->cache, pc->s, pc->len, h, out->p + first, out->n - first);
  return 0;
}
