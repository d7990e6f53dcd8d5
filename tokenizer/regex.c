/* Hugging Face patterns run by PCRE2. tokenizers compiles them with Oniguruma, whose \s is the
 * Unicode White_Space property; PCRE2's \s under UCP also takes U+180E. So \s and \S are spelled
 * out as the White_Space class before compiling (and Oniguruma's \h, a hex digit, likewise). */
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "tokenizer/tokenizer_internal.h"

#define WS_RANGES "\\t-\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"

static int put(cn_buf *b, const char *s) { return cn_buf_append(b, s, strlen(s)); }

static int translate(const char *p, size_t len, cn_buf *out) {
  int in_class = 0, rc = 0;
  for (size_t i = 0; i < len && !rc; i++) {
    char c = p[i];
    if (c == '\\' && i + 1 < len) {
      char e = p[++i];
      if (e == 's') rc = put(out, in_class ? WS_RANGES : "[" WS_RANGES "]");
      else if (e == 'S' && !in_class) rc = put(out, "[^" WS_RANGES "]");
      else if (e == 'h') rc = put(out, in_class ? "0-9a-fA-F" : "[0-9a-fA-F]");
      else if (e == 'H' && !in_class) rc = put(out, "[^0-9a-fA-F]");
      else rc = cn_buf_append(out, p + i - 1, 2);
      continue;
    }
    if (c == '[' && !in_class) {
      in_class = 1;
      rc = cn_buf_append(out, "[", 1);
      if (!rc && i + 1 < len && p[i + 1] == '^') rc = cn_buf_append(out, p + ++i, 1);
      if (!rc && i + 1 < len && p[i + 1] == ']') rc = cn_buf_append(out, p + ++i, 1); /* a literal ] */
      continue;
    }
    if (c == ']' && in_class) in_class = 0;
    rc = cn_buf_append(out, &c, 1);
  }
  return rc;
}

int cn_regex_compile(cn_regex *re, const char *pattern, size_t len, int literal, const char *what) {
  memset(re, 0, sizeof *re);
  cn_buf pat = {0};
  uint32_t opts = PCRE2_UTF;
  if (literal) {
    opts |= PCRE2_LITERAL; /* (UCP may not go with it, nor does it matter for a literal) */
    if (cn_buf_append(&pat, pattern, len)) return CANOPY_ERR_NO_MEMORY;
  } else if (translate(pattern, len, &pat)) {
    free(pat.p);
    return CANOPY_ERR_NO_MEMORY;
  } else {
    opts |= PCRE2_UCP;
  }
  int err;
  PCRE2_SIZE off;
  re->code = pcre2_compile((PCRE2_SPTR)(pat.p ? pat.p : ""), pat.n, opts, &err, &off, NULL);
  free(pat.p);
  if (!re->code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    return cn_error(CANOPY_ERR_FORMAT, "%s: cannot compile the regex (%s)", what, (const char *)msg);
  }
  re->jit = pcre2_jit_compile(re->code, PCRE2_JIT_COMPLETE) == 0;
  return 0;
}

void cn_regex_free(cn_regex *re) {
  pcre2_code_free(re->code);
  re->code = NULL;
}

int cn_rx_state_init(cn_rx_state *st) {
  st->md = pcre2_match_data_create(1, NULL);
  st->mctx = pcre2_match_context_create(NULL);
  st->stack = pcre2_jit_stack_create(32 * 1024, 1024 * 1024, NULL);
  if (!st->md || !st->mctx || !st->stack) return CANOPY_ERR_NO_MEMORY;
  pcre2_jit_stack_assign(st->mctx, NULL, st->stack);
  return 0;
}

void cn_rx_state_free(cn_rx_state *st) {
  pcre2_match_data_free(st->md);
  pcre2_match_context_free(st->mctx);
  pcre2_jit_stack_free(st->stack);
  memset(st, 0, sizeof *st);
}

int cn_spans_push(cn_spans *v, size_t a, size_t b, int m) {
  if (cn_grow((void **)&v->p, &v->cap, v->n + 1, sizeof *v->p)) return CANOPY_ERR_NO_MEMORY;
  v->p[v->n++] = (cn_span){(uint32_t)a, (uint32_t)b, m};
  return 0;
}

/* The iteration of the onig crate's find_iter: an empty match right where the previous match
 * ended is skipped by stepping one character forward. */
int cn_regex_spans(const cn_regex *re, cn_rx_state *st, const char *s, size_t len, cn_spans *out) {
  out->n = 0;
  if (len == 0) return cn_spans_push(out, 0, 0, 0);
  size_t last_end = 0, prev = 0, last_match_end = SIZE_MAX;
  PCRE2_SIZE *ov = pcre2_get_ovector_pointer(st->md);
  while (last_end <= len) {
    int rc = re->jit ? pcre2_jit_match(re->code, (PCRE2_SPTR)s, len, last_end, 0, st->md, st->mctx)
                     : pcre2_match(re->code, (PCRE2_SPTR)s, len, last_end, PCRE2_NO_UTF_CHECK, st->md, st->mctx);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof msg);
      return cn_error(CANOPY_ERR_NO_MEMORY, "tokenizer regex failed at byte offset %zu: %s", last_end,
                      (const char *)msg);
    }
    size_t ms = ov[0], me = ov[1];
    if (ms == me && me == last_match_end) {
      if (last_end >= len) break;
      last_end += (size_t)cn_utf8_len((unsigned char)s[last_end]);
      continue;
    }
    if (prev != ms && cn_spans_push(out, prev, ms, 0)) return CANOPY_ERR_NO_MEMORY;
    if (cn_spans_push(out, ms, me, 1)) return CANOPY_ERR_NO_MEMORY;
    prev = last_end = last_match_end = me;
  }
  if (prev != len) return cn_spans_push(out, prev, len, 0);
  return 0;
}
