/* Parity with the Hugging Face `tokenizers` package: for every style of tokenizer.json under
 * tests/fixtures/tokenizer (written by tools/make_tokenizer_fixtures.py), each of ~2200 varied
 * strings must encode to the very ids tokenizers gives, with and without special tokens, and the
 * ids must decode to the very text tokenizers decodes them to. */
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

/* Prints s with escapes, clipped, for failure reports. */
static void print_escaped(const char *label, const char *s, size_t len) {
  printf("      %s \"", label);
  for (size_t i = 0; i < len && i < 160; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '\n') printf("\\n");
    else if (c == '\t') printf("\\t");
    else if (c == '\r') printf("\\r");
    else if (c < 0x20 || c == 0x7f) printf("\\x%02x", c);
    else putchar(c);
  }
  printf("%s\"\n", len > 160 ? "..." : "");
}

static void print_ids(const char *label, const int32_t *ids, int n) {
  printf("      %s [", label);
  for (int i = 0; i < n && i < 40; i++) printf(i ? ", %d" : "%d", ids[i]);
  printf("%s]\n", n > 40 ? ", ..." : "");
}

static int ids_equal(const cJSON *want, const int32_t *got, int n) {
  if (cJSON_GetArraySize(want) != n) return 0;
  int i = 0;
  for (const cJSON *e = want->child; e; e = e->next, i++)
    if ((int32_t)e->valuedouble != got[i]) return 0;
  return 1;
}

static int32_t *to_ids(const cJSON *arr, int *n) {
  *n = cJSON_GetArraySize(arr);
  int32_t *ids = malloc(sizeof *ids * (size_t)(*n + 1));
  int i = 0;
  for (const cJSON *e = arr->child; e; e = e->next) ids[i++] = (int32_t)e->valuedouble;
  return ids;
}

typedef struct tally {
  int cases, ids_ok, special_cases, special_ok, decode_ok, skip_ok;
} tally;

static void check_case(const canopy_tokenizer *tok, const cJSON *row, tally *t, int *shown) {
  const cJSON *text = cJSON_GetObjectItem(row, "text"), *want = cJSON_GetObjectItem(row, "ids");
  const cJSON *want_sp = cJSON_GetObjectItem(row, "ids_special"), *dec = cJSON_GetObjectItem(row, "decoded");
  const cJSON *dec_skip = cJSON_GetObjectItem(row, "decoded_skip");
  assert_non_null(text);
  assert_non_null(want);
  const char *s = text->valuestring;
  size_t len = strlen(s);
  int cap = (int)len * 2 + 8, n = -1;
  int32_t *ids = malloc(sizeof *ids * (size_t)cap);
  t->cases++;
  int rc = canopy_tokenize(tok, s, len, 0, ids, cap, &n);
  if (rc) printf("      canopy_tokenize failed: %s\n", canopy_last_error());
  assert_int_equal(rc, CANOPY_OK);
  if (ids_equal(want, ids, n)) {
    t->ids_ok++;
  } else if ((*shown)++ < 8) {
    int wn;
    int32_t *w = to_ids(want, &wn);
    printf("    [ ids differ ]\n");
    print_escaped("text", s, len);
    print_ids("want", w, wn);
    print_ids("got ", ids, n);
    free(w);
  }
  if (want_sp) {
    t->special_cases++;
    assert_int_equal(canopy_tokenize(tok, s, len, 1, ids, cap, &n), CANOPY_OK);
    if (ids_equal(want_sp, ids, n)) t->special_ok++;
    else if ((*shown)++ < 8) print_escaped("[ add_special ids differ ] text", s, len);
  }
  /* Decode the reference ids (so that a decode bug shows even where encoding differs). */
  int wn;
  int32_t *w = to_ids(want, &wn);
  for (int skip = 0; skip < 2; skip++) {
    const char *expect = skip ? (dec_skip ? dec_skip->valuestring : dec ? dec->valuestring : s)
                              : (dec ? dec->valuestring : s);
    size_t got_len = 0, bufcap = strlen(expect) * 2 + 64;
    char *buf = malloc(bufcap);
    rc = canopy_detokenize(tok, w, wn, skip, buf, bufcap, &got_len);
    if (rc) printf("      canopy_detokenize failed: %s\n", canopy_last_error());
    assert_int_equal(rc, CANOPY_OK);
    int ok = got_len == strlen(expect) && !memcmp(buf, expect, got_len);
    if (ok) {
      if (skip) t->skip_ok++;
      else t->decode_ok++;
    } else if ((*shown)++ < 8) {
      printf("    [ decode differs, skip_special=%d ]\n", skip);
      print_escaped("want", expect, strlen(expect));
      print_escaped("got ", buf, got_len);
    }
    free(buf);
  }
  free(w);
  free(ids);
}

static void run_style(const char *style) {
  char path[1024], rel[256];
  snprintf(rel, sizeof rel, "tests/fixtures/tokenizer/%s", style);
  cn_test_path(path, sizeof path, rel);
  canopy_tokenizer *tok = NULL;
  int rc = canopy_tokenizer_load(path, &tok);
  if (rc) printf("      load failed: %s\n", canopy_last_error());
  assert_int_equal(rc, CANOPY_OK);
  snprintf(rel, sizeof rel, "tests/fixtures/tokenizer/%s/cases.jsonl", style);
  char *data = cn_test_read_file(cn_test_path(path, sizeof path, rel), NULL);
  assert_non_null(data);
  tally t = {0};
  int shown = 0;
  for (char *line = data, *nl; *line; line = nl + 1) {
    nl = strchr(line, '\n');
    if (!nl) nl = line + strlen(line) - 1;
    else *nl = '\0';
    if (!*line) continue;
    cJSON *row = cJSON_Parse(line);
    assert_non_null(row);
    check_case(tok, row, &t, &shown);
    cJSON_Delete(row);
  }
  printf("[ parity   ] %s: ids %d/%d identical, add_special %d/%d, decode %d/%d, decode skip_special %d/%d\n", style,
         t.ids_ok, t.cases, t.special_ok, t.special_cases, t.decode_ok, t.cases, t.skip_ok, t.cases);
  free(data);
  canopy_tokenizer_free(tok);
  assert_true(t.cases >= 2000);
  assert_int_equal(t.ids_ok, t.cases);
  assert_int_equal(t.special_ok, t.special_cases);
  assert_int_equal(t.decode_ok, t.cases);
  assert_int_equal(t.skip_ok, t.cases);
}

static void test_smollm2_ids_match_hf_tokenizers(void **state) { run_style("smollm2"); }
static void test_llama2_byte_fallback_ids_match_hf_tokenizers(void **state) { run_style("llama2"); }
static void test_metaspace_added_token_rules_match_hf_tokenizers(void **state) { run_style("metaspace"); }
static void test_llama3_split_ignore_merges_ids_match_hf_tokenizers(void **state) { run_style("llama3"); }

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_smollm2_ids_match_hf_tokenizers),
      cmocka_unit_test(test_llama2_byte_fallback_ids_match_hf_tokenizers),
      cmocka_unit_test(test_metaspace_added_token_rules_match_hf_tokenizers),
      cmocka_unit_test(test_llama3_split_ignore_merges_ids_match_hf_tokenizers),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
