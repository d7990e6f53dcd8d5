/* Sessions over a tiny fixture model: prefix reuse is exact, limits are errors with messages,
 * sampling is reproducible, and truncation rewinds exactly. */
#include <cjson/cJSON.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "canopy.h"
#include "tests/testing.h"

static char model_dir[1024];
static uint64_t rng;

static canopy_model *load(int block, int blocks, int ctx, int prefix_cache) {
  canopy_model_params p = canopy_model_default_params();
  p.n_threads = 2;
  p.kv_block_size = block;
  p.kv_blocks = blocks;
  p.max_context = ctx;
  p.prefix_cache = prefix_cache;
  canopy_model *m = NULL;
  int st = canopy_model_load(model_dir, &p, &m);
  if (st) print_error("%s\n", canopy_last_error());
  assert_int_equal(st, CANOPY_OK);
  return m;
}

static void random_ids(int32_t *ids, int n, int vocab) {
  for (int i = 0; i < n; i++) ids[i] = (int32_t)(cn_test_rand(&rng) % (uint64_t)vocab);
}

static int vocab_of(canopy_model *m) {
  canopy_model_info info;
  canopy_model_get_info(m, &info);
  return info.vocab_size;
}

static float *logits_after(canopy_model *m, const int32_t *ids, int n, canopy_stats *stats) {
  canopy_session *s;
  assert_int_equal(canopy_session_create(m, NULL, &s), 0);
  assert_int_equal(canopy_session_append(s, ids, n), 0);
  const float *l;
  int V;
  assert_int_equal(canopy_session_logits(s, &l, &V), 0);
  float *copy = malloc(sizeof *copy * V);
  memcpy(copy, l, sizeof *copy * V);
  if (stats) canopy_session_get_stats(s, stats);
  canopy_session_free(s);
  return copy;
}

static void test_prefix_reuse_gives_the_logits_of_recomputing(void **state) {
  canopy_model *cached = load(4, 64, 64, 1), *plain = load(4, 64, 64, 0);
  int V = vocab_of(cached);
  int32_t ids[30];
  random_ids(ids, 30, V);
  canopy_stats st;
  float *first = logits_after(cached, ids, 30, &st);
  assert_int_equal(st.n_reused, 0);
  /* The first session is gone, but its full blocks stay cached (evictable) for the next. */
  float *again = logits_after(cached, ids, 30, &st);
  assert_int_equal(st.n_reused, 28);
  /* A prompt sharing only the first 10 tokens reuses the two full blocks inside them. */
  int32_t other[30];
  memcpy(other, ids, sizeof other);
  random_ids(other + 10, 20, V);
  float *branch = logits_after(cached, other, 30, &st);
  assert_int_equal(st.n_reused, 8);
  float *ref = logits_after(plain, ids, 30, NULL), *ref_branch = logits_after(plain, other, 30, NULL);
  printf("[ reuse    ] rel L2 %.2e (same prompt), %.2e (shared prefix)\n", cn_test_rel_l2(again, ref, V),
         cn_test_rel_l2(branch, ref_branch, V));
  assert_true(cn_test_rel_l2(first, ref, V) < 1e-5);
  assert_true(cn_test_rel_l2(again, ref, V) < 1e-5);
  assert_true(cn_test_rel_l2(branch, ref_branch, V) < 1e-5);
  free(first), free(again), free(branch), free(ref), free(ref_branch);
  canopy_model_free(cached);
  canopy_model_free(plain);
}

static void test_prompt_longer_than_context_is_an_error(void **state) {
  canopy_model *m = load(4, 64, 16, 1);
  int32_t ids[17];
  random_ids(ids, 17, vocab_of(m));
  canopy_session *s;
  assert_int_equal(canopy_session_create(m, NULL, &s), 0);
  assert_int_equal(canopy_session_append(s, ids, 17), CANOPY_ERR_CONTEXT);
  assert_non_null(strstr(canopy_last_error(), "context length 16"));
  /* The session is untouched and still usable within the limit. */
  assert_int_equal(canopy_session_len(s), 0);
  assert_int_equal(canopy_session_append(s, ids, 16), CANOPY_OK);
  int32_t t;
  assert_int_equal(canopy_session_next(s, &t), CANOPY_DONE); /* the context is full */
  canopy_session_free(s);
  canopy_model_free(m);
}

static void test_exhausted_kv_pool_is_an_error_not_a_crash(void **state) {
  canopy_model *m = load(4, 3, 64, 1);
  int32_t ids[20];
  random_ids(ids, 20, vocab_of(m));
  canopy_session *a, *b;
  assert_int_equal(canopy_session_create(m, NULL, &a), 0);
  assert_int_equal(canopy_session_append(a, ids, 20), CANOPY_ERR_KV_EXHAUSTED);
  assert_non_null(strstr(canopy_last_error(), "exhausted"));
  assert_int_equal(canopy_session_append(a, ids, 10), CANOPY_OK);
  assert_int_equal(canopy_session_create(m, NULL, &b), 0);
  random_ids(ids, 20, vocab_of(m));
  assert_int_equal(canopy_session_append(b, ids, 8), CANOPY_ERR_KV_EXHAUSTED);
  canopy_session_free(a);
  /* Freed blocks are available again. */
  assert_int_equal(canopy_session_append(b, ids, 8), CANOPY_OK);
  canopy_session_free(b);
  canopy_model_free(m);
}

static void generate(canopy_model *m, const canopy_session_params *p, const int32_t *prompt, int n, int32_t *out, int max) {
  canopy_session *s;
  assert_int_equal(canopy_session_create(m, p, &s), 0);
  assert_int_equal(canopy_session_append(s, prompt, n), 0);
  for (int i = 0; i < max; i++) assert_int_equal(canopy_session_next(s, &out[i]), CANOPY_OK);
  int32_t t;
  assert_int_equal(canopy_session_next(s, &t), CANOPY_DONE);
  /* One prefill, then one forward per token but the last, which ends the run unfed. */
  canopy_stats st;
  canopy_session_get_stats(s, &st);
  assert_int_equal(st.forward_passes, 1 + max - 1);
  canopy_session_free(s);
}

static void test_seeded_sampling_is_reproducible(void **state) {
  canopy_model *m = load(16, 64, 128, 1);
  int32_t prompt[5], a[24], b[24], c[24];
  random_ids(prompt, 5, vocab_of(m));
  canopy_session_params p = canopy_session_default_params();
  p.max_tokens = 24;
  p.stop_at_eos = 0;
  p.sampling.temperature = 1.0f;
  p.sampling.top_p = 0.95f;
  p.sampling.seed = 7;
  generate(m, &p, prompt, 5, a, 24);
  generate(m, &p, prompt, 5, b, 24);
  assert_memory_equal(a, b, sizeof a);
  p.sampling.seed = 8;
  generate(m, &p, prompt, 5, c, 24);
  assert_memory_not_equal(a, c, sizeof a);
  canopy_model_free(m);
}

static void test_truncate_rewinds_to_the_same_continuation(void **state) {
  canopy_model *m = load(4, 64, 128, 0);
  int32_t prompt[9], first[12], second[12];
  random_ids(prompt, 9, vocab_of(m));
  canopy_session_params p = canopy_session_default_params();
  p.stop_at_eos = 0;
  canopy_session *s;
  assert_int_equal(canopy_session_create(m, &p, &s), 0);
  assert_int_equal(canopy_session_append(s, prompt, 9), 0);
  for (int i = 0; i < 12; i++) assert_int_equal(canopy_session_next(s, &first[i]), 0);
  assert_int_equal(canopy_session_truncate(s, 9), 0);
  for (int i = 0; i < 12; i++) assert_int_equal(canopy_session_next(s, &second[i]), 0);
  assert_memory_equal(first, second, sizeof first);
  assert_int_equal(canopy_session_truncate(s, 0), CANOPY_ERR_INVALID_ARG);
  canopy_session_free(s);
  canopy_model_free(m);
}

static void test_out_of_vocabulary_token_is_an_error(void **state) {
  canopy_model *m = load(16, 16, 64, 1);
  int32_t ids[3] = {1, vocab_of(m), 2};
  canopy_session *s;
  assert_int_equal(canopy_session_create(m, NULL, &s), 0);
  assert_int_equal(canopy_session_append(s, ids, 3), CANOPY_ERR_INVALID_ARG);
  assert_non_null(strstr(canopy_last_error(), "index 1"));
  canopy_session_free(s);
  canopy_model_free(m);
}

/* A copy of the fixture model folder with config.json edited by `edit`. */
static int load_edited(const char *field, cJSON *value, char *tmpdir) {
  char path[1200], src[1200];
  strcpy(tmpdir, "/tmp/canopy-model-XXXXXX");
  assert_non_null(mkdtemp(tmpdir));
  snprintf(src, sizeof src, "%s/model.safetensors", model_dir);
  snprintf(path, sizeof path, "%s/model.safetensors", tmpdir);
  assert_int_equal(symlink(src, path), 0);
  snprintf(src, sizeof src, "%s/config.json", model_dir);
  char *text = cn_test_read_file(src, NULL);
  cJSON *cfg = cJSON_Parse(text);
  free(text);
  cJSON_ReplaceItemInObject(cfg, field, value);
  char *out = cJSON_Print(cfg);
  snprintf(path, sizeof path, "%s/config.json", tmpdir);
  FILE *f = fopen(path, "w");
  fputs(out, f);
  fclose(f);
  free(out);
  cJSON_Delete(cfg);
  canopy_model *m = NULL;
  int st = canopy_model_load(tmpdir, NULL, &m);
  canopy_model_free(m);
  return st;
}

static void remove_dir(const char *dir) {
  char path[1200];
  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  unlink(path);
  snprintf(path, sizeof path, "%s/config.json", dir);
  unlink(path);
  rmdir(dir);
}

static void test_checkpoint_that_disagrees_with_config_is_an_error(void **state) {
  char dir[64];
  canopy_model_info info;
  canopy_model *m = load(16, 16, 64, 1);
  canopy_model_get_info(m, &info);
  canopy_model_free(m);

  assert_int_equal(load_edited("num_hidden_layers", cJSON_CreateNumber(info.n_layers + 1), dir), CANOPY_ERR_FORMAT);
  assert_non_null(strstr(canopy_last_error(), "missing tensor"));
  assert_non_null(strstr(canopy_last_error(), "model.layers."));
  remove_dir(dir);

  assert_int_equal(load_edited("intermediate_size", cJSON_CreateNumber(info.intermediate_size + 8), dir),
                   CANOPY_ERR_SHAPE);
  assert_non_null(strstr(canopy_last_error(), "mlp."));
  remove_dir(dir);

  cJSON *arch = cJSON_CreateStringArray((const char *[]){"GPT2LMHeadModel"}, 1);
  assert_int_equal(load_edited("architectures", arch, dir), CANOPY_ERR_UNSUPPORTED);
  assert_non_null(strstr(canopy_last_error(), "GPT2LMHeadModel"));
  remove_dir(dir);

  assert_int_not_equal(canopy_model_load("/nonexistent/canopy-model", NULL, &m), CANOPY_OK);
  assert_non_null(strstr(canopy_last_error(), "/nonexistent/canopy-model"));
}

int main(void) {
  rng = cn_test_seed("test_session");
  cn_test_path(model_dir, sizeof model_dir, "tests/fixtures/models/llama");
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_prefix_reuse_gives_the_logits_of_recomputing),
      cmocka_unit_test(test_prompt_longer_than_context_is_an_error),
      cmocka_unit_test(test_exhausted_kv_pool_is_an_error_not_a_crash),
      cmocka_unit_test(test_seeded_sampling_is_reproducible),
      cmocka_unit_test(test_truncate_rewinds_to_the_same_continuation),
      cmocka_unit_test(test_out_of_vocabulary_token_is_an_error),
      cmocka_unit_test(test_checkpoint_that_disagrees_with_config_is_an_error),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
