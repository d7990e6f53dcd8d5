/* Added tokens ("<|im_start|>", "<s>", ...) are cut out of the text before anything else, with
 * tokenizers' rules: leftmost-longest, non-overlapping matches; single_word, lstrip and rstrip;
 * tokens with normalized: false are matched on the raw text, the others on the normalized text.
 * Matching walks a byte trie from each position whose byte can start a token. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "tokenizer/tokenizer_internal.h"

static int flag(const cJSON *o, const char *key, int dflt) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
  return cJSON_IsBool(v) ? cJSON_IsTrue(v) : dflt;
}

int cn_added_parse(canopy_tokenizer *t, const cJSON *arr) {
  cn_added_set *a = &t->added;
  if (!arr || cJSON_IsNull(arr)) return 0;
  if (!cJSON_IsArray(arr)) return cn_error(CANOPY_ERR_FORMAT, "%s: added_tokens: expected an array", t->path);
  int n = cJSON_GetArraySize(arr), i = 0;
  a->tok = calloc((size_t)(n ? n : 1), sizeof *a->tok);
  if (!a->tok) return CANOPY_ERR_NO_MEMORY;
  for (const cJSON *e = arr->child; e; e = e->next, i++) {
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(e, "content");
    if (!cJSON_IsObject(e) || !cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble >= 2147483647.0 ||
        id->valuedouble != (double)(int32_t)id->valuedouble)
      return cn_error(CANOPY_ERR_FORMAT, "%s: added_tokens[%d].id: expected a non-negative integer", t->path, i);
    if (!cJSON_IsString(content) || !content->valuestring[0])
      return cn_error(CANOPY_ERR_FORMAT, "%s: added_tokens[%d].content: expected a non-empty string", t->path, i);
    cn_added *tk = &a->tok[a->n++];
    tk->id = (int32_t)id->valuedouble;
    tk->len = strlen(content->valuestring);
    if (!(tk->content = malloc(tk->len + 1))) return CANOPY_ERR_NO_MEMORY;
    memcpy(tk->content, content->valuestring, tk->len + 1);
    tk->special = (uint8_t)flag(e, "special", 0);
    tk->single_word = (uint8_t)flag(e, "single_word", 0);
    tk->lstrip = (uint8_t)flag(e, "lstrip", 0);
    tk->rstrip = (uint8_t)flag(e, "rstrip", 0);
    tk->normalized = (uint8_t)flag(e, "normalized", !tk->special);
  }
  return 0;
}

static int32_t trie_node(cn_trie *tr, uint8_t byte) {
  if (tr->n >= INT32_MAX || cn_grow((void **)&tr->nodes, &tr->cap, tr->n + 1, sizeof *tr->nodes)) return -1;
  tr->nodes[tr->n] = (cn_trie_node){-1, -1, -1, byte};
  return (int32_t)tr->n++;
}

static int trie_insert(cn_trie *tr, const char *s, size_t len, int32_t tok) {
  int32_t *link = &tr->first[(uint8_t)s[0]], node = -1;
  for (size_t i = 0; i < len; i++) {
    uint8_t b = (uint8_t)s[i];
    if (i > 0) {
      link = &tr->nodes[node].child;
      while (*link >= 0 && tr->nodes[*link].byte != b) link = &tr->nodes[*link].sibling;
    }
    if (*link < 0) {
      int32_t k = trie_node(tr, b);
      if (k < 0) return CANOPY_ERR_NO_MEMORY;
      /* `link` may point into the nodes array that trie_node just moved: find it again. */
      if (i == 0) {
        link = &tr->first[b];
      } else {
        link = &tr->nodes[node].child;
        while (*link >= 0) link = &tr->nodes[*link].sibling;
      }
      *link = k;
    }
    node = *link;
  }
  /* A later duplicate wins, like the HashMap behind tokenizers' added vocabulary. */
  tr->nodes[node].tok = tok;
  return 0;
}

int cn_added_build(canopy_tokenizer *t, cn_scratch *sc) {
  cn_added_set *a = &t->added;
  for (int b = 0; b < 256; b++) a->raw.first[b] = a->norm.first[b] = -1;
  int rc = cn_strmap_init(&a->by_content, (size_t)a->n + 1);
  for (int i = 0; i < a->n && !rc; i++) {
    cn_added *tk = &a->tok[i];
    rc = cn_strmap_put(&a->by_content, tk->content, tk->len, tk->id);
    if (rc) break;
    if (!tk->normalized) {
      rc = trie_insert(&a->raw, tk->content, tk->len, i);
      continue;
    }
    const char *s;
    size_t len;
    if ((rc = cn_normalize(t, sc, tk->content, tk->len, &s, &len))) break;
    if (len) rc = trie_insert(&a->norm, s, len, i);
  }
  cn_arena_reset(&sc->arena);
  return rc;
}

void cn_added_free(cn_added_set *a) {
  for (int i = 0; i < a->n; i++) free(a->tok[i].content);
  free(a->tok);
  free(a->raw.nodes);
  free(a->norm.nodes);
  cn_strmap_free(&a->by_content);
  memset(a, 0, sizeof *a);
}

static int push_seg(cn_segments *v, size_t start, size_t end, int32_t id) {
  if (cn_grow((void **)&v->p, &v->cap, v->n + 1, sizeof *v->p)) return CANOPY_ERR_NO_MEMORY;
  v->p[v->n++] = (cn_segment){(uint32_t)start, (uint32_t)end, id};
  return 0;
}

/* The character that ends at s[end) (end > 0). */
static uint32_t char_before(const char *s, size_t end) {
  int k;
  return cn_utf8_decode(s + cn_utf8_prev(s, end), &k);
}

int cn_added_split(const cn_added_set *a, const cn_trie *tr, const char *s, size_t len, cn_segments *out) {
  out->n = 0;
  size_t pos = 0, start_offset = 0;
  if (tr->n) {
    while (pos < len) {
      /* The leftmost position where some token starts, and the longest token there. */
      size_t ms = pos, me = 0;
      int32_t best = -1;
      for (; ms < len; ms++) {
        int32_t node = tr->first[(uint8_t)s[ms]];
        for (size_t k = ms; node >= 0;) {
          if (tr->nodes[node].tok >= 0) {
            best = tr->nodes[node].tok;
            me = k + 1;
          }
          if (++k >= len) break;
          uint8_t b = (uint8_t)s[k];
          for (node = tr->nodes[node].child; node >= 0 && tr->nodes[node].byte != b;) node = tr->nodes[node].sibling;
        }
        if (best >= 0) break;
      }
      if (best < 0) break;
      pos = me;
      const cn_added *tk = &a->tok[best];
      size_t start = ms, stop = me;
      if (tk->single_word) {
        int k;
        int start_space = start == 0 || !cn_is_word_char(char_before(s, start));
        int stop_space = stop == len || !cn_is_word_char(cn_utf8_decode(s + stop, &k));
        if (!start_space || !stop_space) continue;
      }
      if (tk->lstrip) {
        size_t ns = start;
        while (ns > 0 && cn_is_white_space(char_before(s, ns))) ns = cn_utf8_prev(s, ns);
        start = ns > start_offset ? ns : start_offset;
      }
      if (tk->rstrip) {
        int k;
        while (stop < len && cn_is_white_space(cn_utf8_decode(s + stop, &k))) stop += (size_t)k;
      }
      if (start_offset < start && push_seg(out, start_offset, start, -1)) return CANOPY_ERR_NO_MEMORY;
      if (push_seg(out, start, stop, tk->id)) return CANOPY_ERR_NO_MEMORY;
      start_offset = stop;
    }
  }
  if (start_offset < len && push_seg(out, start_offset, len, -1)) return CANOPY_ERR_NO_MEMORY;
  return 0;
}
