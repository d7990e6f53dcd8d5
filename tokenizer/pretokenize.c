/* Pre-tokenizers: Split (a regex or a string, with tokenizers' five delimiter behaviours), Digits,
 * ByteLevel (GPT-2's regex and byte map), Metaspace, and Sequence of them. Each step splits every
 * pre-token of the previous step; empty pre-tokens are dropped, as tokenizers does. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "tokenizer/tokenizer_internal.h"

static const char GPT2_PATTERN[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int get_bool(const cJSON *j, const char *key, int dflt) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
  return cJSON_IsBool(v) ? cJSON_IsTrue(v) : dflt;
}

static int parse_behavior(const char *s) {
  static const char *names[] = {"Isolated", "Removed", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
  for (int i = 0; i < 5; i++)
    if (!strcmp(s, names[i])) return i;
  return -1;
}

static int parse_one(canopy_tokenizer *t, const cJSON *j, const char *field) {
  const char *ty;
  int seq = cn_tok_component(t, j, field, "pretokenizers", parse_one, &ty);
  if (seq) return seq < 0 ? seq : 0;
  char where[300];
  cn_pretok *grown = realloc(t->pretok, (size_t)(t->n_pretok + 1) * sizeof *grown);
  if (!grown) return CANOPY_ERR_NO_MEMORY;
  t->pretok = grown;
  cn_pretok *p = &t->pretok[t->n_pretok++]; /* counted at once, so that a failure below frees it */
  memset(p, 0, sizeof *p);
  int rc = 0;
  if (!strcmp(ty, "Split")) {
    p->type = CN_PT_SPLIT;
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(j, "pattern");
    const cJSON *lit = cJSON_GetObjectItemCaseSensitive(pat, "String");
    const cJSON *rx = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
    const cJSON *beh = cJSON_GetObjectItemCaseSensitive(j, "behavior");
    if (!cJSON_IsString(lit) && !cJSON_IsString(rx))
      return cn_error(CANOPY_ERR_FORMAT, "%s: %s.pattern: expected {\"String\": ...} or {\"Regex\": ...}", t->path, field);
    if (!cJSON_IsString(beh) || (p->behavior = parse_behavior(beh->valuestring)) < 0)
      return cn_error(CANOPY_ERR_FORMAT, "%s: %s.behavior: expected Isolated, Removed, MergedWithPrevious, MergedWithNext "
                      "or Contiguous", t->path, field);
    p->invert = get_bool(j, "invert", 0);
    const char *ps = cJSON_IsString(lit) ? lit->valuestring : rx->valuestring;
    snprintf(where, sizeof where, "%s: %s.pattern", t->path, field);
    rc = cn_regex_compile(&p->re, ps, strlen(ps), cJSON_IsString(lit), where);
  } else if (!strcmp(ty, "Digits")) {
    p->type = CN_PT_DIGITS;
    p->individual_digits = get_bool(j, "individual_digits", 0);
  } else if (!strcmp(ty, "ByteLevel")) {
    p->type = CN_PT_BYTELEVEL;
    p->add_prefix_space = get_bool(j, "add_prefix_space", 1);
    p->use_regex = get_bool(j, "use_regex", 1);
    snprintf(where, sizeof where, "%s: %s (GPT-2 regex)", t->path, field);
    if (p->use_regex) rc = cn_regex_compile(&p->re, GPT2_PATTERN, sizeof GPT2_PATTERN - 1, 0, where);
  } else if (!strcmp(ty, "Metaspace")) {
    p->type = CN_PT_METASPACE;
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(j, "replacement");
    if (!cJSON_IsString(r) || !r->valuestring[0] || cn_utf8_valid_prefix(r->valuestring, strlen(r->valuestring)) !=
                                                          strlen(r->valuestring))
      return cn_error(CANOPY_ERR_FORMAT, "%s: %s.replacement: expected one character", t->path, field);
    int k;
    p->repl = cn_utf8_decode(r->valuestring, &k);
    p->repl_len = cn_utf8_encode(p->repl, p->repl_s);
    const cJSON *ps = cJSON_GetObjectItemCaseSensitive(j, "prepend_scheme");
    p->prepend_scheme = CN_PREPEND_ALWAYS;
    if (cJSON_IsString(ps)) {
      if (!strcmp(ps->valuestring, "first")) p->prepend_scheme = CN_PREPEND_FIRST;
      else if (!strcmp(ps->valuestring, "never")) p->prepend_scheme = CN_PREPEND_NEVER;
      else if (strcmp(ps->valuestring, "always"))
        return cn_error(CANOPY_ERR_FORMAT, "%s: %s.prepend_scheme: expected always, first or never", t->path, field);
    }
    if (!get_bool(j, "add_prefix_space", 1)) p->prepend_scheme = CN_PREPEND_NEVER; /* the legacy field */
    p->split = get_bool(j, "split", 1);
  } else {
    return cn_error(CANOPY_ERR_UNSUPPORTED, "%s: %s: pre_tokenizer type \"%s\" is not supported", t->path, field, ty);
  }
  return rc;
}

int cn_pretok_parse(canopy_tokenizer *t, const cJSON *j, const char *field) {
  if (!j || cJSON_IsNull(j)) return 0;
  int rc = parse_one(t, j, field);
  if (rc) return rc;
  t->bytelevel_lazy = t->n_pretok > 0 && t->pretok[t->n_pretok - 1].type == CN_PT_BYTELEVEL;
  return 0;
}

/* ---- applying them ---------------------------------------------------------------------------- */

static int push_piece(cn_pieces *v, const char *s, uint32_t len, uint32_t flags) {
  if (len == 0) return 0;
  if (cn_grow((void **)&v->p, &v->cap, v->n + 1, sizeof *v->p)) return CANOPY_ERR_NO_MEMORY;
  v->p[v->n++] = (cn_piece){s, len, flags};
  return 0;
}

/* tokenizers' NormalizedString::split: turns (span, is_match) into pre-tokens by behaviour. */
static int apply_behavior(const cn_piece *pc, const cn_spans *sp, int behavior, int invert, cn_pieces *out) {
  uint32_t keep = pc->flags & ~(uint32_t)CN_PIECE_AT_ORIGIN;
  /* (start, end) of the pre-token being built, pushed when the next one starts */
  uint32_t cs = 0, ce = 0;
  int have = 0, prev_match = 0;
#define EMIT()                                                                                                  \
  do {                                                                                                          \
    if (have && push_piece(out, pc->s + cs, ce - cs, keep | (cs == 0 ? (pc->flags & CN_PIECE_AT_ORIGIN) : 0))) \
      return CANOPY_ERR_NO_MEMORY;                                                                            \
  } while (0)
  for (size_t i = 0; i < sp->n; i++) {
    uint32_t s = sp->p[i].start, e = sp->p[i].end;
    int m = sp->p[i].is_match ^ invert;
    int merge = 0;
    switch (behavior) {
    case CN_SPLIT_ISOLATED: break;
    case CN_SPLIT_REMOVED:
      if (m) {
        EMIT();
        have = 0;
        prev_match = m;
        continue;
      }
      break;
    case CN_SPLIT_CONTIGUOUS: merge = have && m == prev_match; break;
    case CN_SPLIT_MERGED_PREV: merge = have && m && !prev_match; break;
    case CN_SPLIT_MERGED_NEXT:
      /* A match joins the span after it when that span is not a match (tokenizers folds from the
       * end: a match extends the start of the pre-token that follows it). */
      merge = have && !m && prev_match;
      break;
    }
    if (merge) {
      ce = e;
    } else {
      EMIT();
      cs = s;
      ce = e;
      have = 1;
    }
    prev_match = m;
  }
  EMIT();
#undef EMIT
  return 0;
}

/* Spans cut by a per-character predicate: every matching character is its own match. */
static int char_spans(const char *s, size_t len, int (*pred)(uint32_t, uint32_t), uint32_t arg, cn_spans *out) {
  out->n = 0;
  size_t last = 0;
  for (size_t i = 0; i < len;) {
    int k;
    uint32_t cp = (unsigned char)s[i] < 0x80 ? (k = 1, (unsigned char)s[i]) : cn_utf8_decode(s + i, &k);
    if (pred(cp, arg)) {
      if ((last < i && cn_spans_push(out, last, i, 0)) || cn_spans_push(out, i, i + (size_t)k, 1))
        return CANOPY_ERR_NO_MEMORY;
      last = i + (size_t)k;
    }
    i += (size_t)k;
  }
  if (last < len || len == 0) return cn_spans_push(out, last, len, 0);
  return 0;
}

static int is_numeric_pred(uint32_t cp, uint32_t arg) { return cn_is_numeric(cp); }
static int is_char_pred(uint32_t cp, uint32_t arg) { return cp == arg; }

static int step_digits(const cn_pretok *p, cn_scratch *sc, const cn_piece *pc, cn_pieces *out) {
  int any = 0;
  for (uint32_t i = 0; i < pc->len && !any; i++) {
    unsigned char c = (unsigned char)pc->s[i];
    any = (c >= '0' && c <= '9') || c >= 0x80;
  }
  if (!any) return push_piece(out, pc->s, pc->len, pc->flags);
  int rc = char_spans(pc->s, pc->len, is_numeric_pred, 0, &sc->spans);
  if (rc) return rc;
  return apply_behavior(pc, &sc->spans, p->individual_digits ? CN_SPLIT_ISOLATED : CN_SPLIT_CONTIGUOUS, 0, out);
}

static int map_bytes(const canopy_tokenizer *t, cn_scratch *sc, cn_pieces *v, size_t from) {
  for (size_t i = from; i < v->n; i++) {
    cn_piece *pc = &v->p[i];
    char *q = cn_arena_alloc(&sc->arena, (size_t)pc->len * 2 + 1);
    if (!q) return CANOPY_ERR_NO_MEMORY;
    uint32_t o = 0;
    for (uint32_t k = 0; k < pc->len; k++) {
      unsigned char b = (unsigned char)pc->s[k];
      memcpy(q + o, t->bl.utf8[b], t->bl.len[b]);
      o += t->bl.len[b];
    }
    pc->s = q;
    pc->len = o;
  }
  return 0;
}

static int step_byte_level(const canopy_tokenizer *t, const cn_pretok *p, int last, cn_scratch *sc,
                           const cn_piece *in, cn_pieces *out) {
  cn_piece pc = *in;
  if (p->add_prefix_space && pc.s[0] != ' ') {
    char *q = cn_arena_alloc(&sc->arena, (size_t)pc.len + 2);
    if (!q) return CANOPY_ERR_NO_MEMORY;
    q[0] = ' ';
    memcpy(q + 1, pc.s, pc.len);
    pc.s = q;
    pc.len++;
  }
  size_t from = out->n;
  int rc;
  if (p->use_regex) {
    if ((rc = cn_regex_spans(&p->re, &sc->rx, pc.s, pc.len, &sc->spans))) return rc;
    if ((rc = apply_behavior(&pc, &sc->spans, CN_SPLIT_ISOLATED, 0, out))) return rc;
  } else if ((rc = push_piece(out, pc.s, pc.len, pc.flags))) {
    return rc;
  }
  if (last) {
    for (size_t i = from; i < out->n; i++) out->p[i].flags |= CN_PIECE_BYTELEVEL;
    return 0;
  }
  return map_bytes(t, sc, out, from);
}

static int step_metaspace(const cn_pretok *p, cn_scratch *sc, const cn_piece *in, cn_pieces *out) {
  size_t spaces = 0;
  for (uint32_t i = 0; i < in->len; i++) spaces += in->s[i] == ' ';
  /* After the replacement the text starts with the replacement iff it started with a space or
   * with the replacement itself. */
  int starts = in->s[0] == ' ' || ((uint32_t)p->repl_len <= in->len && !memcmp(in->s, p->repl_s, (size_t)p->repl_len));
  int prepend = !starts && (p->prepend_scheme == CN_PREPEND_ALWAYS ||
                            (p->prepend_scheme == CN_PREPEND_FIRST && (in->flags & CN_PIECE_AT_ORIGIN)));
  cn_piece pc = *in;
  if (spaces || prepend) {
    size_t n = in->len + spaces * (size_t)(p->repl_len - 1) + (prepend ? (size_t)p->repl_len : 0);
    char *q = cn_arena_alloc(&sc->arena, n + 1);
    if (!q) return CANOPY_ERR_NO_MEMORY;
    size_t o = 0;
    if (prepend) {
      memcpy(q, p->repl_s, (size_t)p->repl_len);
      o = (size_t)p->repl_len;
    }
    for (uint32_t i = 0; i < in->len; i++) {
      if (in->s[i] == ' ') {
        memcpy(q + o, p->repl_s, (size_t)p->repl_len);
        o += (size_t)p->repl_len;
      } else {
        q[o++] = in->s[i];
      }
    }
    pc.s = q;
    pc.len = (uint32_t)o;
  }
  if (!p->split) return push_piece(out, pc.s, pc.len, pc.flags);
  int rc = char_spans(pc.s, pc.len, is_char_pred, p->repl, &sc->spans);
  if (rc) return rc;
  return apply_behavior(&pc, &sc->spans, CN_SPLIT_MERGED_NEXT, 0, out);
}

int cn_pretokenize(const canopy_tokenizer *t, cn_scratch *sc, cn_pieces *in, cn_pieces *out) {
  if (t->n_pretok == 0) {
    out->n = 0;
    for (size_t i = 0; i < in->n; i++)
      if (push_piece(out, in->p[i].s, in->p[i].len, in->p[i].flags)) return CANOPY_ERR_NO_MEMORY;
    return 0;
  }
  cn_pieces *a = in, *b = out;
  for (int k = 0; k < t->n_pretok; k++) {
    const cn_pretok *p = &t->pretok[k];
    b->n = 0;
    for (size_t i = 0; i < a->n; i++) {
      const cn_piece *pc = &a->p[i];
      int rc = 0;
      switch (p->type) {
      case CN_PT_SPLIT:
        rc = cn_regex_spans(&p->re, &sc->rx, pc->s, pc->len, &sc->spans);
        if (!rc) rc = apply_behavior(pc, &sc->spans, p->behavior, p->invert, b);
        break;
      case CN_PT_DIGITS: rc = step_digits(p, sc, pc, b); break;
      case CN_PT_BYTELEVEL: rc = step_byte_level(t, p, k == t->n_pretok - 1, sc, pc, b); break;
      case CN_PT_METASPACE: rc = step_metaspace(p, sc, pc, b); break;
      }
      if (rc) return rc;
    }
    cn_pieces *tmp = a;
    a = b;
    b = tmp;
  }
  /* The result is in `a`; make sure it ends up in `out`. */
  if (a != out) {
    cn_pieces tmp = *out;
    *out = *a;
    *a = tmp;
  }
  return 0;
}
