/* Normalizers: Prepend, Replace, NFC/NFD/NFKC/NFKD, Lowercase, Strip, and Sequence of them. Each
 * rewrites the whole text segment between added tokens, as tokenizers does. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "common/error.h"
#include "tokenizer/tokenizer_internal.h"

static char *dup_str(const char *s, size_t *len) {
  *len = strlen(s);
  char *p = malloc(*len + 1);
  if (p) memcpy(p, s, *len + 1);
  return p;
}

static int parse_one(canopy_tokenizer *t, const cJSON *j, const char *field) {
  const char *ty;
  int seq = cn_tok_component(t, j, field, "normalizers", parse_one, &ty);
  if (seq) return seq < 0 ? seq : 0;
  char where[300];
  cn_norm *grown = realloc(t->norm, (size_t)(t->n_norm + 1) * sizeof *grown);
  if (!grown) return CANOPY_ERR_NO_MEMORY;
  t->norm = grown;
  cn_norm *n = &t->norm[t->n_norm++]; /* counted at once, so that a failure below frees it */
  memset(n, 0, sizeof *n);
  if (!strcmp(ty, "Prepend")) {
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(j, "prepend");
    if (!cJSON_IsString(p)) return cn_error(CANOPY_ERR_FORMAT, "%s: %s.prepend: expected a string", t->path, field);
    n->type = CN_NORM_PREPEND;
    if (!(n->a = dup_str(p->valuestring, &n->a_len))) return CANOPY_ERR_NO_MEMORY;
  } else if (!strcmp(ty, "Replace")) {
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(j, "pattern");
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(j, "content");
    const cJSON *lit = cJSON_GetObjectItemCaseSensitive(pat, "String");
    const cJSON *rx = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
    if (!cJSON_IsString(lit) && !cJSON_IsString(rx))
      return cn_error(CANOPY_ERR_FORMAT, "%s: %s.pattern: expected {\"String\": ...} or {\"Regex\": ...}", t->path, field);
    if (!cJSON_IsString(content)) return cn_error(CANOPY_ERR_FORMAT, "%s: %s.content: expected a string", t->path, field);
    n->type = CN_NORM_REPLACE;
    if (!(n->b = dup_str(content->valuestring, &n->b_len))) return CANOPY_ERR_NO_MEMORY;
    const char *ps = cJSON_IsString(lit) ? lit->valuestring : rx->valuestring;
    snprintf(where, sizeof where, "%s: %s.pattern", t->path, field);
    int rc = cn_regex_compile(&n->re, ps, strlen(ps), cJSON_IsString(lit), where);
    if (rc) return rc;
    n->use_regex = 1;
  } else if (!strcmp(ty, "NFC")) {
    n->type = CN_NORM_NFC;
  } else if (!strcmp(ty, "NFD")) {
    n->type = CN_NORM_NFD;
  } else if (!strcmp(ty, "NFKC")) {
    n->type = CN_NORM_NFKC;
  } else if (!strcmp(ty, "NFKD")) {
    n->type = CN_NORM_NFKD;
  } else if (!strcmp(ty, "Lowercase")) {
    n->type = CN_NORM_LOWERCASE;
  } else if (!strcmp(ty, "Strip")) {
    n->type = CN_NORM_STRIP;
    n->left = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "strip_left"));
    n->right = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "strip_right"));
  } else {
    return cn_error(CANOPY_ERR_UNSUPPORTED, "%s: %s: normalizer type \"%s\" is not supported", t->path, field, ty);
  }
  return 0;
}

int cn_norm_parse(canopy_tokenizer *t, const cJSON *j, const char *field) {
  if (!j || cJSON_IsNull(j)) return 0;
  return parse_one(t, j, field);
}

static int unicode_form(const char *s, size_t len, int type, cn_scratch *sc, const char **out, size_t *out_len) {
  utf8proc_option_t opt = UTF8PROC_STABLE;
  opt |= (type == CN_NORM_NFC || type == CN_NORM_NFKC) ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE;
  if (type == CN_NORM_NFKC || type == CN_NORM_NFKD) opt |= UTF8PROC_COMPAT;
  if (len == 0) {
    *out = s;
    *out_len = 0;
    return 0;
  }
  utf8proc_uint8_t *dst = NULL;
  utf8proc_ssize_t n = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)len, &dst, opt);
  if (n < 0) return cn_error(CANOPY_ERR_NO_MEMORY, "Unicode normalization failed: %s", utf8proc_errmsg(n));
  char *p = cn_arena_alloc(&sc->arena, (size_t)n + 1);
  if (p) memcpy(p, dst, (size_t)n + 1);
  free(dst);
  if (!p) return CANOPY_ERR_NO_MEMORY;
  *out = p;
  *out_len = (size_t)n;
  return 0;
}

static int lowercase(const char *s, size_t len, cn_scratch *sc, const char **out, size_t *out_len) {
  char *p = cn_arena_alloc(&sc->arena, len * 3 + 1); /* İ -> i + U+0307 is the only growth past 3x */
  if (!p) return CANOPY_ERR_NO_MEMORY;
  size_t o = 0;
  for (size_t i = 0; i < len;) {
    int k;
    uint32_t cp = cn_utf8_decode(s + i, &k);
    i += (size_t)k;
    if (cp == 0x130) {
      o += (size_t)cn_utf8_encode('i', p + o);
      o += (size_t)cn_utf8_encode(0x307, p + o);
    } else {
      o += (size_t)cn_utf8_encode((uint32_t)utf8proc_tolower((utf8proc_int32_t)cp), p + o);
    }
  }
  *out = p;
  *out_len = o;
  return 0;
}

static int replace(const cn_norm *n, const char *s, size_t len, cn_scratch *sc, const char **out, size_t *out_len) {
  int rc = cn_regex_spans(&n->re, &sc->rx, s, len, &sc->spans);
  if (rc) return rc;
  size_t total = 0, matches = 0;
  for (size_t i = 0; i < sc->spans.n; i++) {
    const cn_span *sp = &sc->spans.p[i];
    total += sp->is_match ? n->b_len : sp->end - sp->start;
    matches += (size_t)sp->is_match;
  }
  if (!matches) {
    *out = s;
    *out_len = len;
    return 0;
  }
  char *p = cn_arena_alloc(&sc->arena, total + 1);
  if (!p) return CANOPY_ERR_NO_MEMORY;
  size_t o = 0;
  for (size_t i = 0; i < sc->spans.n; i++) {
    const cn_span *sp = &sc->spans.p[i];
    if (sp->is_match) {
      memcpy(p + o, n->b, n->b_len);
      o += n->b_len;
    } else {
      memcpy(p + o, s + sp->start, sp->end - sp->start);
      o += sp->end - sp->start;
    }
  }
  *out = p;
  *out_len = o;
  return 0;
}

int cn_normalize(const canopy_tokenizer *t, cn_scratch *sc, const char *s, size_t len, const char **out,
                 size_t *out_len) {
  for (int i = 0; i < t->n_norm; i++) {
    const cn_norm *n = &t->norm[i];
    int rc = 0;
    switch (n->type) {
    case CN_NORM_PREPEND:
      if (len) {
        char *p = cn_arena_alloc(&sc->arena, n->a_len + len + 1);
        if (!p) return CANOPY_ERR_NO_MEMORY;
        memcpy(p, n->a, n->a_len);
        memcpy(p + n->a_len, s, len);
        s = p;
        len += n->a_len;
      }
      break;
    case CN_NORM_REPLACE: rc = replace(n, s, len, sc, &s, &len); break;
    case CN_NORM_LOWERCASE: rc = lowercase(s, len, sc, &s, &len); break;
    case CN_NORM_STRIP: {
      int k;
      while (n->left && len && cn_is_white_space(cn_utf8_decode(s, &k))) s += k, len -= (size_t)k;
      while (n->right && len && cn_is_white_space(cn_utf8_decode(s + cn_utf8_prev(s, len), &k))) len = cn_utf8_prev(s, len);
      break;
    }
    default: rc = unicode_form(s, len, n->type, sc, &s, &len); break;
    }
    if (rc) return rc;
  }
  *out = s;
  *out_len = len;
  return 0;
}
