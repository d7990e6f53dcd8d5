/* The forward against Hugging Face transformers: tiny random models of every supported
 * architecture (made by tools/make_model_fixtures.py), float32 logits within rel L2 1e-4. The
 * same logits must come out however the tokens are split into forwards (one prefill, chunks,
 * token-by-token decode), since those are one code path with different batches. */
#include <cjson/cJSON.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "model/forward.h"
#include "tests/testing.h"

static const char *fixtures[] = {"llama", "llama3", "mistral", "qwen2", "smollm2",
                                 "llama_bf16", "llama_f16", "llama_sharded"};

typedef struct expected {
  int n, vocab;
  int32_t *ids, *pos;
  float *logits; /* [n][vocab] */
} expected;

static int load_expected(const char *dir, expected *e) {
  char path[1100];
  snprintf(path, sizeof path, "%s/expected.json", dir);
  size_t len;
  char *text = cn_test_read_file(path, &len);
  if (!text) return -1;
  cJSON *root = cJSON_ParseWithLength(text, len);
  free(text);
  if (!root) return -1;
  cJSON *ids = cJSON_GetObjectItem(root, "input_ids"), *pos = cJSON_GetObjectItem(root, "positions"),
        *logits = cJSON_GetObjectItem(root, "logits");
  e->n = cJSON_GetArraySize(ids);
  e->vocab = cJSON_GetArraySize(cJSON_GetArrayItem(logits, 0));
  e->ids = malloc(sizeof *e->ids * e->n);
  e->pos = malloc(sizeof *e->pos * e->n);
  e->logits = malloc(sizeof *e->logits * (size_t)e->n * e->vocab);
  for (int i = 0; i < e->n; i++) {
    e->ids[i] = cJSON_GetArrayItem(ids, i)->valueint;
    e->pos[i] = pos ? cJSON_GetArrayItem(pos, i)->valueint : i;
    cJSON *row = cJSON_GetArrayItem(logits, i);
    for (int j = 0; j < e->vocab; j++) e->logits[(size_t)i * e->vocab + j] = (float)cJSON_GetArrayItem(row, j)->valuedouble;
  }
  cJSON_Delete(root);
  return 0;
}

static void free_expected(expected *e) {
  free(e->ids);
  free(e->pos);
  free(e->logits);
}

/* Feeds the fixture's tokens in forwards of `chunk` tokens, collecting every row's logits. */
static void run_chunked(canopy_model *m, const expected *e, int chunk, float *out) {
  cn_kv_seq *kv;
  assert_int_equal(cn_kv_seq_create(m->kv, &kv), 0);
  int32_t rows[512];
  for (int i = 0; i < 512; i++) rows[i] = i;
  for (int at = 0; at < e->n; at += chunk) {
    int n = e->n - at < chunk ? e->n - at : chunk;
    cn_seq_batch sb = {.kv = kv, .first = 0, .n = n};
    cn_batch b = {.n_tokens = n, .tokens = e->ids + at, .pos = e->pos + at, .n_seqs = 1, .seqs = &sb,
                  .n_logits = n, .logit_rows = rows};
    int st = cn_forward(m, &b, out + (size_t)at * e->vocab);
    if (st) print_error("%s\n", canopy_last_error());
    assert_int_equal(st, 0);
    cn_kv_seq_commit(kv, e->ids + at, n);
  }
  cn_kv_seq_free(kv);
}

static void test_logits_match_transformers_float32(void **state) {
  int checked = 0;
  for (size_t f = 0; f < sizeof fixtures / sizeof fixtures[0]; f++) {
    char rel[256], dir[1024];
    snprintf(rel, sizeof rel, "tests/fixtures/models/%s", fixtures[f]);
    cn_test_path(dir, sizeof dir, rel);
    expected e = {0};
    if (load_expected(dir, &e)) {
      print_error("fixture %s is missing or unreadable\n", dir);
      fail();
    }
    canopy_model *m;
    canopy_model_params p = canopy_model_default_params();
    p.n_threads = 2;
    int st = canopy_model_load(dir, &p, &m);
    if (st) print_error("%s\n", canopy_last_error());
    assert_int_equal(st, 0);
    assert_int_equal(m->cfg.vocab_size, e.vocab);
    float *out = malloc(sizeof *out * (size_t)e.n * e.vocab);
    int chunks[] = {e.n, 7, 1};
    for (size_t c = 0; c < sizeof chunks / sizeof chunks[0]; c++) {
      for (size_t i = 0; i < (size_t)e.n * e.vocab; i++) out[i] = NAN;
      run_chunked(m, &e, chunks[c], out);
      double err = cn_test_rel_l2(out, e.logits, (size_t)e.n * e.vocab);
      printf("[ ref      ] %-14s chunk %2d: rel L2 %.2e\n", fixtures[f], chunks[c], err);
      assert_true(err <= 1e-4);
    }
    checked++;
    free(out);
    free_expected(&e);
    canopy_model_free(m);
  }
  assert_int_equal(checked, (int)(sizeof fixtures / sizeof fixtures[0]));
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_logits_match_transformers_float32)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
