/* UTF-8 validation, Rust-compatible lossy decoding, and the Unicode classes the tokenizer
 * stages ask about. */
#include <utf8proc.h>

#include "tokenizer/tokenizer_internal.h"

/* The second byte's range after a lead byte (Unicode Table 3-7); later bytes are 80..BF. */
static int seq_need(unsigned char b0, unsigned char *lo, unsigned char *hi) {
  *lo = 0x80;
  *hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) return 2;
  if (b0 == 0xE0) { *lo = 0xA0; return 3; }
  if ((b0 >= 0xE1 && b0 <= 0xEC) || b0 == 0xEE || b0 == 0xEF) return 3;
  if (b0 == 0xED) { *hi = 0x9F; return 3; }
  if (b0 == 0xF0) { *lo = 0x90; return 4; }
  if (b0 >= 0xF1 && b0 <= 0xF3) return 4;
  if (b0 == 0xF4) { *hi = 0x8F; return 4; }
  return 0;
}

/* Length of the well-formed character at s[i], or -(bytes of the maximal ill-formed subpart);
 * *truncated says the subpart ran into the end of the input. */
static int next_char(const unsigned char *s, size_t len, size_t i, int *truncated) {
  *truncated = 0;
  if (s[i] < 0x80) return 1;
  unsigned char lo, hi;
  int need = seq_need(s[i], &lo, &hi);
  if (!need) return -1;
  for (int k = 1; k < need; k++) {
    if (i + k >= len) {
      *truncated = 1;
      return -k;
    }
    if (s[i + k] < lo || s[i + k] > hi) return -k;
    lo = 0x80;
    hi = 0xBF;
  }
  return need;
}

size_t cn_utf8_valid_prefix(const char *str, size_t len) {
  const unsigned char *s = (const unsigned char *)str;
  size_t i = 0;
  while (i < len) {
    /* ASCII runs, eight bytes at a time. */
    while (i + 8 <= len) {
      uint64_t w;
      __builtin_memcpy(&w, s + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= len) break;
    int t, k = next_char(s, len, i, &t);
    if (k < 0) return i;
    i += (size_t)k;
  }
  return len;
}

uint32_t cn_utf8_decode(const char *str, int *n) {
  const unsigned char *s = (const unsigned char *)str;
  if (s[0] < 0x80) { *n = 1; return s[0]; }
  if (s[0] < 0xE0) { *n = 2; return (uint32_t)(s[0] & 0x1F) << 6 | (s[1] & 0x3F); }
  if (s[0] < 0xF0) { *n = 3; return (uint32_t)(s[0] & 0x0F) << 12 | (uint32_t)(s[1] & 0x3F) << 6 | (s[2] & 0x3F); }
  *n = 4;
  return (uint32_t)(s[0] & 0x07) << 18 | (uint32_t)(s[1] & 0x3F) << 12 | (uint32_t)(s[2] & 0x3F) << 6 | (s[3] & 0x3F);
}

int cn_utf8_encode(uint32_t cp, char *out) {
  unsigned char *o = (unsigned char *)out;
  if (cp < 0x80) { o[0] = (unsigned char)cp; return 1; }
  if (cp < 0x800) { o[0] = (unsigned char)(0xC0 | cp >> 6); o[1] = (unsigned char)(0x80 | (cp & 0x3F)); return 2; }
  if (cp < 0x10000) {
    o[0] = (unsigned char)(0xE0 | cp >> 12);
    o[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    o[2] = (unsigned char)(0x80 | (cp & 0x3F));
    return 3;
  }
  o[0] = (unsigned char)(0xF0 | cp >> 18);
  o[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
  o[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
  o[3] = (unsigned char)(0x80 | (cp & 0x3F));
  return 4;
}

int cn_utf8_lossy_append(cn_buf *out, const char *str, size_t len, int partial, size_t *held) {
  const unsigned char *s = (const unsigned char *)str;
  size_t i = 0, run = 0; /* run: start of the pending well-formed stretch */
  *held = 0;
  if (cn_buf_reserve(out, len)) return CANOPY_ERR_NO_MEMORY;
  while (i < len) {
    int t, k = next_char(s, len, i, &t);
    if (k > 0) {
      i += (size_t)k;
      continue;
    }
    if (cn_buf_append(out, s + run, i - run)) return CANOPY_ERR_NO_MEMORY;
    if (t && partial) {
      *held = len - i;
      return 0;
    }
    if (cn_buf_append(out, "\xEF\xBF\xBD", 3)) return CANOPY_ERR_NO_MEMORY;
    i += (size_t)-k;
    run = i;
  }
  return cn_buf_append(out, s + run, len - run);
}

int cn_is_numeric(uint32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  utf8proc_category_t c = utf8proc_category((utf8proc_int32_t)cp);
  return c == UTF8PROC_CATEGORY_ND || c == UTF8PROC_CATEGORY_NL || c == UTF8PROC_CATEGORY_NO;
}

int cn_is_word_char(uint32_t cp) {
  if (cp < 0x80) return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') || cp == '_';
  if (cp == 0x200C || cp == 0x200D) return 1;
  switch (utf8proc_category((utf8proc_int32_t)cp)) {
  case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT: case UTF8PROC_CATEGORY_LM:
  case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME:
  case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_PC: return 1;
  default: return 0;
  }
}

int cn_is_white_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

int cn_py_isspace(uint32_t cp) { return cn_is_white_space(cp) || (cp >= 0x1C && cp <= 0x1F); }
