/* The streaming detokenizer: every piece it gives out is whole UTF-8 (never part of a
 * character), and the pieces plus the flush concatenate to exactly canopy_detokenize's text, for
 * the fixture id sequences of every tokenizer style and for random id sequences rich in byte
 * tokens (which split characters across ids). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cjson/cJSON.h>
#include <cmocka.h>

#include "canopy.h"
#include "tests/testing.h"

static const char *STYLES[] = {"smollm2", "llama2", "metaspace", "llama3"};

/* Strict UTF-8 (no overlongs, surrogates or code points past U+10FFFF). */
static int valid_utf8(const unsigned char *s, size_t n) {
  for (size_t i = 0; i < n;) {
    unsigned char c = s[i];
    size_t k;
    uint32_t cp;
    if (c < 0x80) { i++; continue; }
    if (c >= 0xC2 && c <= 0xDF) k = 2, cp = c & 0x1F;
    else if (c >= 0xE0 && c <= 0xEF) k = 3, cp = c & 0x0F;
    else if (c >= 0xF0 && c <= 0xF4) k = 4, cp = c & 0x07;
    else return 0;
    if (i + k > n) return 0;
    for (size_t j = 1; j < k; j++) {
      if ((s[i + j] & 0xC0) != 0x80) return 0;
      cp = cp << 6 | (s[i + j] & 0x3F);
    }
    if ((k == 3 && cp < 0x800) || (k == 4 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    i += k;
  }
  return 1;
}

/* Streams ids; returns 1 if every piece was whole UTF-8 and the whole equals detokenize. */
static int stream_matches(const canopy_tokenizer *tok, const int32_t *ids, int n, int skip) {
  canopy_detok_stream *s;
  assert_int_equal(canopy_detok_stream_create(tok, skip, &s), CANOPY_OK);
  size_t cap = 1024, len = 0, plen;
  char *all = malloc(cap), piece[4096];
  int ok = 1;
  for (int i = 0; i <= n; i++) {
    int rc = i < n ? canopy_detok_stream_push(s, ids[i], piece, sizeof piece, &plen)
                   : canopy_detok_stream_flush(s, piece, sizeof piece, &plen);
    assert_int_equal(rc, CANOPY_OK);
    assert_int_equal(piece[plen], '\0'); /* (the text itself may hold NULs: byte 0 is a token) */
    /* The flush may give U+FFFD for an unfinished character; pushes give only whole ones. */
    if (!valid_utf8((const unsigned char *)piece, plen)) ok = 0;
    if (len + plen + 1 > cap) all = realloc(all, cap = 2 * (len + plen + 1));
    memcpy(all + len, piece, plen);
    len += plen;
  }
  canopy_detok_stream_free(s);
  size_t want_len = 0;
  char *want = malloc(len * 2 + 4096);
  assert_int_equal(canopy_detokenize(tok, ids, n, skip, want, len * 2 + 4096, &want_len), CANOPY_OK);
  if (want_len != len || memcmp(want, all, len)) ok = 0;
  free(want);
  free(all);
  return ok;
}

static void test_stream_of_fixture_ids_concatenates_to_detokenize(void **state) {
  for (int st = 0; st < 4; st++) {
    canopy_tokenizer *tok = cn_test_tokenizer(STYLES[st]);
    assert_non_null(tok);
    char path[1024], rel[256];
    snprintf(rel, sizeof rel, "tests/fixtures/tokenizer/%s/cases.jsonl", STYLES[st]);
    char *data = cn_test_read_file(cn_test_path(path, sizeof path, rel), NULL);
    assert_non_null(data);
    int total = 0, ok = 0;
    for (char *line = strtok(data, "\n"); line; line = strtok(NULL, "\n")) {
      cJSON *row = cJSON_Parse(line), *arr = cJSON_GetObjectItem(row, "ids");
      int n = cJSON_GetArraySize(arr), i = 0;
      int32_t *ids = malloc(sizeof *ids * (size_t)(n + 1));
      for (const cJSON *e = arr->child; e; e = e->next) ids[i++] = (int32_t)e->valuedouble;
      for (int skip = 0; skip < 2; skip++, total++) ok += stream_matches(tok, ids, n, skip);
      free(ids);
      cJSON_Delete(row);
    }
    printf("[ stream   ] %s: %d/%d streams whole-UTF-8 and equal to detokenize\n", STYLES[st], ok, total);
    free(data);
    canopy_tokenizer_free(tok);
    assert_int_equal(ok, total);
  }
}

/* Ids that carry single bytes of multi-byte characters: "<0xXX>" tokens, or the byte-level
 * characters of bytes 0xA1..0xFF. */
static int byte_ids(const canopy_tokenizer *tok, int32_t *out) {
  int n = 0;
  for (int b = 0x80; b < 0x100; b++) {
    char name[8];
    snprintf(name, sizeof name, "<0x%02X>", b);
    int id = canopy_token_id(tok, name);
    if (id < 0 && b >= 0xA1 && b != 0xAD) {
      name[0] = (char)(0xC0 | b >> 6);
      name[1] = (char)(0x80 | (b & 0x3F));
      name[2] = '\0';
      id = canopy_token_id(tok, name);
    }
    if (id >= 0) out[n++] = id;
  }
  return n;
}

static void test_stream_of_random_ids_never_splits_a_character(void **state) {
  uint64_t rng = cn_test_seed("test_stream_of_random_ids_never_splits_a_character");
  for (int st = 0; st < 4; st++) {
    canopy_tokenizer *tok = cn_test_tokenizer(STYLES[st]);
    assert_non_null(tok);
    int32_t bytes[128], ids[48];
    int nb = byte_ids(tok, bytes), vocab = canopy_tokenizer_vocab_size(tok);
    assert_true(nb >= 64);
    int total = 0, ok = 0;
    for (int rep = 0; rep < 400; rep++) {
      int n = 1 + (int)(cn_test_rand(&rng) % 40);
      for (int i = 0; i < n; i++) {
        uint64_t r = cn_test_rand(&rng);
        ids[i] = r % 3 ? bytes[(r >> 8) % (uint64_t)nb] : (int32_t)((r >> 8) % (uint64_t)vocab);
      }
      for (int skip = 0; skip < 2; skip++, total++) ok += stream_matches(tok, ids, n, skip);
    }
    printf("[ stream   ] %s: %d/%d random streams whole-UTF-8 and equal to detokenize\n", STYLES[st], ok, total);
    canopy_tokenizer_free(tok);
    assert_int_equal(ok, total);
  }
}

static void test_stream_holds_a_character_until_its_last_byte(void **state) {
  canopy_tokenizer *tok = cn_test_tokenizer("llama2");
  assert_non_null(tok);
  /* "中" as byte-fallback tokens, then a word: nothing comes out before the run ends. */
  int32_t ids[] = {canopy_token_id(tok, "<0xE4>"), canopy_token_id(tok, "<0xB8>"), canopy_token_id(tok, "<0xAD>"),
                   canopy_token_id(tok, "\xE2\x96\x81" "a")};
  canopy_detok_stream *s;
  assert_int_equal(canopy_detok_stream_create(tok, 0, &s), CANOPY_OK);
  char piece[64];
  size_t plen;
  for (int i = 0; i < 3; i++) {
    assert_true(ids[i] >= 0);
    assert_int_equal(canopy_detok_stream_push(s, ids[i], piece, sizeof piece, &plen), CANOPY_OK);
    assert_int_equal(plen, 0);
  }
  assert_true(ids[3] >= 0);
  assert_int_equal(canopy_detok_stream_push(s, ids[3], piece, sizeof piece, &plen), CANOPY_OK);
  assert_string_equal(piece, "\xE4\xB8\xAD a");
  /* An unfinished character at the end becomes U+FFFD per byte token, as tokenizers decodes it. */
  assert_int_equal(canopy_detok_stream_push(s, ids[0], piece, sizeof piece, &plen), CANOPY_OK);
  assert_int_equal(plen, 0);
  assert_int_equal(canopy_detok_stream_flush(s, piece, sizeof piece, &plen), CANOPY_OK);
  assert_string_equal(piece, "\xEF\xBF\xBD");
  canopy_detok_stream_free(s);
  canopy_tokenizer_free(tok);
}

static void test_stream_buffer_too_small_keeps_the_id(void **state) {
  canopy_tokenizer *tok = cn_test_tokenizer("smollm2");
  assert_non_null(tok);
  int32_t ids[4];
  int n;
  assert_int_equal(canopy_tokenize(tok, "Hello world", 11, 0, ids, 4, &n), CANOPY_OK);
  assert_int_equal(n, 2);
  canopy_detok_stream *s;
  assert_int_equal(canopy_detok_stream_create(tok, 0, &s), CANOPY_OK);
  char small[3], big[64];
  size_t len = 0;
  assert_int_equal(canopy_detok_stream_push(s, ids[0], small, sizeof small, &len), CANOPY_ERR_BUFFER);
  assert_int_equal(len, 5);
  printf("[ error    ] %s\n", canopy_last_error());
  assert_int_equal(canopy_detok_stream_push(s, ids[0], big, sizeof big, &len), CANOPY_OK);
  assert_string_equal(big, "Hello");
  assert_int_equal(canopy_detok_stream_push(s, ids[1], big, sizeof big, &len), CANOPY_OK);
  assert_string_equal(big, " world");
  assert_int_equal(canopy_detok_stream_push(s, 1 << 30, big, sizeof big, &len), CANOPY_ERR_INVALID_ARG);
  assert_int_equal(canopy_detok_stream_flush(s, big, sizeof big, &len), CANOPY_OK);
  assert_int_equal(len, 0);
  canopy_detok_stream_free(s);
  canopy_tokenizer_free(tok);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_stream_of_fixture_ids_concatenates_to_detokenize),
      cmocka_unit_test(test_stream_of_random_ids_never_splits_a_character),
      cmocka_unit_test(test_stream_holds_a_character_until_its_last_byte),
      cmocka_unit_test(test_stream_buffer_too_small_keeps_the_id),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
