/* Decoding ids to text: the token strings go through tokenizers' decoder chain (ByteLevel,
 * ByteFallback, Fuse, Strip, Replace, Metaspace, or a Sequence of them) and are joined; with no
 * decoder they are joined with spaces, as tokenizers does. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "tokenizer/tokenizer_internal.h"

/* ---- parsing ---------------------------------------------------------------------------------- */

static int one_char(const cJSON *v, uint32_t *cp) {
  if (!cJSON_IsString(v) || !v->valuestring[0]) return -1;
  size_t len = strlen(v->valuestring);
  if (cn_utf8_valid_prefix(v->valuestring, len) != len) return -1;
  int k;
  *cp = cn_utf8_decode(v->valuestring, &k);
  return (size_t)k == len ? 0 : -1;
}

static int get_count(const cJSON *j, const char *key, int *out) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
  if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 1e6) return -1;
  *out = (int)v->valuedouble;
  return 0;
}

static int parse_one(canopy_tokenizer *t, const cJSON *j, const char *field) {
  const char *ty;
  int seq = cn_tok_component(t, j, field, "decoders", parse_one, &ty);
  if (seq) return seq < 0 ? seq : 0;
  cn_dec *grown = realloc(t->dec, (size_t)(t->n_dec + 1) * sizeof *grown);
  if (!grown) return CANOPY_ERR_NO_MEMORY;
  t->dec = grown;
  cn_dec *d = &t->dec[t->n_dec++]; /* counted at once, so that a failure below frees it */
  memset(d, 0, sizeof *d);
  if (!strcmp(ty, "ByteLevel")) {
    d->type = CN_DEC_BYTELEVEL;
  } else if (!strcmp(ty, "ByteFallback")) {
    d->type = CN_DEC_BYTEFALLBACK;
  } else if (!strcmp(ty, "Fuse")) {
    d->type = CN_DEC_FUSE;
  } else if (!strcmp(ty, "Strip")) {
    d->type = CN_DEC_STRIP;
    if (one_char(cJSON_GetObjectItemCaseSensitive(j, "content"), &d->ch) || get_count(j, "start", &d->start) ||
        get_count(j, "stop", &d->stop))
      return cn_error(CANOPY_ERR_FORMAT, "%s: %s: expected content (one character), start and stop", t->path, field);
  } else if (!strcmp(ty, "Replace")) {
    d->type = CN_DEC_REPLACE;
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(j, "pattern");
    const cJSON *lit = cJSON_GetObjectItemCaseSensitive(pat, "String");
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(j, "content");
    if (cJSON_GetObjectItemCaseSensitive(pat, "Regex"))
      return cn_error(CANOPY_ERR_UNSUPPORTED, "%s: %s.pattern: Regex patterns are not supported in decoders", t->path, field);
    if (!cJSON_IsString(lit) || !lit->valuestring[0] || !cJSON_IsString(content))
      return cn_error(CANOPY_ERR_FORMAT, "%s: %s: expected pattern {\"String\": ...} and content", t->path, field);
    d->pat = strdup(lit->valuestring);
    d->content = strdup(content->valuestring);
    if (!d->pat || !d->content) {
      free(d->pat);
      free(d->content);
      return CANOPY_ERR_NO_MEMORY;
    }
    d->pat_len = strlen(d->pat);
    d->content_len = strlen(d->content);
  } else if (!strcmp(ty, "Metaspace")) {
    d->type = CN_DEC_METASPACE;
    if (one_char(cJSON_GetObjectItemCaseSensitive(j, "replacement"), &d->ch))
      return cn_error(CANOPY_ERR_FORMAT, "%s: %s.replacement: expected one character", t->path, field);
    const cJSON *ps = cJSON_GetObjectItemCaseSensitive(j, "prepend_scheme");
    const cJSON *aps = cJSON_GetObjectItemCaseSensitive(j, "add_prefix_space");
    d->prepend_never = (cJSON_IsString(ps) && !strcmp(ps->valuestring, "never")) || cJSON_IsFalse(aps);
  } else {
    return cn_error(CANOPY_ERR_UNSUPPORTED, "%s: %s: decoder type \"%s\" is not supported", t->path, field, ty);
  }
  return 0;
}

int cn_dec_parse(canopy_tokenizer *t, const cJSON *j) {
  if (!j || cJSON_IsNull(j)) return 0;
  if (!cJSON_IsObject(j)) return cn_error(CANOPY_ERR_FORMAT, "%s: decoder: expected an object", t->path);
  t->has_decoder = 1;
  return parse_one(t, j, "decoder");
}

/* ---- the chain -------------------------------------------------------------------------------- */

/* A list of strings: token i is b.p[off[i] .. off[i+1]). */
typedef struct toklist {
  cn_buf b;
  size_t *off;
  size_t n, cap;
} toklist;

static int tl_end(toklist *l) { /* closes the token being written */
  if (cn_grow((void **)&l->off, &l->cap, l->n + 2, sizeof *l->off)) return CANOPY_ERR_NO_MEMORY;
  if (l->n == 0) l->off[0] = 0;
  l->off[++l->n] = l->b.n;
  return 0;
}

static int tl_push(toklist *l, const char *s, size_t len) {
  if (cn_buf_append(&l->b, s, len)) return CANOPY_ERR_NO_MEMORY;
  return tl_end(l);
}

static void tl_clear(toklist *l) {
  l->b.n = 0;
  l->n = 0;
}

static void tl_free(toklist *l) {
  free(l->b.p);
  free(l->off);
}

#define TOK(l, i) ((l)->b.p + (l)->off[i])
#define TOKLEN(l, i) ((l)->off[(i) + 1] - (l)->off[i])

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* "<0xXX>" -> the byte, else -1 (Rust's u8::from_str_radix also takes a leading '+'). */
static int byte_token(const char *s, size_t len) {
  if (len != 6 || memcmp(s, "<0x", 3) || s[5] != '>') return -1;
  if (s[3] == '+') return hexval(s[4]);
  int hi = hexval(s[3]), lo = hexval(s[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

static int flush_bytes(toklist *out, cn_buf *bytes) {
  int rc = 0;
  if (cn_utf8_valid_prefix(bytes->p, bytes->n) == bytes->n) {
    rc = tl_push(out, bytes->p, bytes->n);
  } else {
    for (size_t i = 0; i < bytes->n && !rc; i++) rc = tl_push(out, "\xEF\xBF\xBD", 3);
  }
  bytes->n = 0;
  return rc;
}

static int step(const canopy_tokenizer *t, const cn_dec *d, const toklist *in, toklist *out, int partial,
                int *held) {
  int rc = 0;
  tl_clear(out);
  switch (d->type) {
  case CN_DEC_BYTEFALLBACK: {
    cn_buf bytes = {0};
    for (size_t i = 0; i < in->n && !rc; i++) {
      int b = byte_token(TOK(in, i), TOKLEN(in, i));
      if (b >= 0) {
        char c = (char)b;
        rc = cn_buf_append(&bytes, &c, 1);
        continue;
      }
      if (bytes.n) rc = flush_bytes(out, &bytes);
      if (!rc) rc = tl_push(out, TOK(in, i), TOKLEN(in, i));
    }
    if (!rc && bytes.n) {
      if (partial) *held = 1; /* the run may go on: its bytes are valid or not as a whole */
      else rc = flush_bytes(out, &bytes);
    }
    free(bytes.p);
    return rc;
  }
  case CN_DEC_FUSE:
    if (cn_buf_append(&out->b, in->b.p, in->n ? in->off[in->n] : 0)) return CANOPY_ERR_NO_MEMORY;
    return tl_end(out);
  case CN_DEC_BYTELEVEL: {
    cn_buf bytes = {0};
    for (size_t i = 0; i < in->n && !rc; i++) {
      const char *s = TOK(in, i);
      size_t len = TOKLEN(in, i), start = bytes.n, k = 0;
      while (k < len && !rc) {
        int n;
        uint32_t cp = cn_utf8_decode(s + k, &n);
        if (cp >= 512 || t->bl.byte_of[cp] < 0) break;
        char c = (char)t->bl.byte_of[cp];
        rc = cn_buf_append(&bytes, &c, 1);
        k += (size_t)n;
      }
      if (!rc && k < len) { /* a character outside the map: the token's own bytes */
        bytes.n = start;
        rc = cn_buf_append(&bytes, s, len);
      }
    }
    size_t h = 0;
    if (!rc) rc = cn_utf8_lossy_append(&out->b, bytes.p ? bytes.p : "", bytes.n, partial, &h);
    if (h) *held = 1;
    free(bytes.p);
    return rc ? rc : tl_end(out);
  }
  default: break;
  }
  /* The per-token decoders. */
  for (size_t i = 0; i < in->n && !rc; i++) {
    const char *s = TOK(in, i);
    size_t len = TOKLEN(in, i);
    if (d->type == CN_DEC_REPLACE) {
      for (size_t k = 0; k < len && !rc;) {
        if (k + d->pat_len <= len && !memcmp(s + k, d->pat, d->pat_len)) {
          rc = cn_buf_append(&out->b, d->content, d->content_len);
          k += d->pat_len;
        } else {
          rc = cn_buf_append(&out->b, s + k, 1);
          k++;
        }
      }
    } else if (d->type == CN_DEC_METASPACE) {
      for (size_t k = 0; k < len && !rc;) {
        int n;
        uint32_t cp = cn_utf8_decode(s + k, &n);
        if (cp != d->ch) rc = cn_buf_append(&out->b, s + k, (size_t)n);
        else if (i != 0 || d->prepend_never) rc = cn_buf_append(&out->b, " ", 1);
        k += (size_t)n;
      }
    } else { /* Strip: up to `start` leading and `stop` trailing copies of one character */
      size_t a = 0, z = len;
      int n;
      for (int k = 0; k < d->start && a < len && cn_utf8_decode(s + a, &n) == d->ch; k++) a += (size_t)n;
      for (int k = 0; k < d->stop && z > a && cn_utf8_decode(s + cn_utf8_prev(s, z), &n) == d->ch; k++)
        z = cn_utf8_prev(s, z);
      rc = cn_buf_append(&out->b, s + a, z - a);
    }
    if (!rc) rc = tl_end(out);
  }
  return rc;
}

int cn_decode(const canopy_tokenizer *t, const int32_t *ids, int n, int skip_special, int partial, cn_buf *out,
              int *held) {
  toklist a = {0}, b = {0};
  int rc = 0, h = 0;
  for (int i = 0; i < n && !rc; i++) {
    if (ids[i] < 0 || ids[i] >= t->vocab_size) {
      rc = cn_error(CANOPY_ERR_INVALID_ARG, "token id %d (at index %d) is outside the vocabulary (size %d)", ids[i], i,
                    t->vocab_size);
      break;
    }
    const cn_token *tk = &t->tokens[ids[i]];
    if (!tk->s || (skip_special && tk->special)) continue; /* tokenizers drops both */
    rc = tl_push(&a, tk->s, tk->len);
  }
  if (!rc && !t->has_decoder) {
    for (size_t i = 0; i < a.n && !rc; i++) {
      if (i) rc = cn_buf_append(out, " ", 1);
      if (!rc) rc = cn_buf_append(out, TOK(&a, i), TOKLEN(&a, i));
    }
  } else if (!rc) {
    toklist *in = &a, *o = &b;
    for (int k = 0; k < t->n_dec && !rc; k++) {
      rc = step(t, &t->dec[k], in, o, partial, &h);
      toklist *tmp = in;
      in = o;
      o = tmp;
    }
    if (!rc && cn_buf_append(out, in->b.p ? in->b.p : "", in->n ? in->off[in->n] : 0)) rc = CANOPY_ERR_NO_MEMORY;
  }
  tl_free(&a);
  tl_free(&b);
  if (held) *held = h;
  return rc;
}
