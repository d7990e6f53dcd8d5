/* SmolLM2-135M-Instruct end to end against transformers float32 (tests/fixtures/smollm2_greedy.json,
 * made by tools/make_greedy_reference.py): the chat template renders the same text, the tokenizer
 * gives the same prompt ids, and greedy decoding gives the same 64 tokens. A sequence may differ
 * only at a near-tie: the first differing step must have a reference top-1/top-2 logit gap below
 * NEAR_TIE, and the sequences are not compared past it (they legitimately diverge). */
#include <cjson/cJSON.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "canopy.h"
#include "tests/testing.h"

/* fp32 sums in a different order (OpenBLAS vs PyTorch) move logits by ~1e-4; a gap below this
 * is a tie that either side may break differently. */
#define NEAR_TIE 0.01
/* The CUDA forward rounds every GEMM input to bf16 (8 significant bits): its logits sit ~3e-3
 * (relative L2) from fp32's, a few hundredths absolute at SmolLM2's logit scale, so a gap below
 * this is a tie the bf16 forward may break the other way. */
#define NEAR_TIE_BF16 0.15

static char model_dir[1024];
static cJSON *fixture;

static int ids_of(cJSON *arr, int32_t *out, int cap) {
  int n = cJSON_GetArraySize(arr);
  for (int i = 0; i < n && i < cap; i++) out[i] = cJSON_GetArrayItem(arr, i)->valueint;
  return n;
}

static int n_prompts(void) {
  int n = cJSON_GetArraySize(cJSON_GetObjectItem(fixture, "prompts"));
  return getenv("CANOPY_TEST_QUICK") && n > 2 ? 2 : n;
}

static void test_chat_template_and_prompt_ids_match_transformers(void **state) {
  canopy_tokenizer *tok;
  int st = canopy_tokenizer_load(model_dir, &tok);
  if (st) print_error("%s\n", canopy_last_error());
  assert_int_equal(st, 0);
  cJSON *prompts = cJSON_GetObjectItem(fixture, "prompts");
  int same_text = 0, same_ids = 0, n = cJSON_GetArraySize(prompts);
  for (int p = 0; p < n; p++) {
    cJSON *item = cJSON_GetArrayItem(prompts, p);
    canopy_chat_message msg = {"user", cJSON_GetObjectItem(item, "prompt")->valuestring};
    char *text;
    assert_int_equal(canopy_chat_apply(tok, &msg, 1, 1, &text), 0);
    same_text += !strcmp(text, cJSON_GetObjectItem(item, "chat_text")->valuestring);
    int32_t want[4096], got[4096];
    int n_want = ids_of(cJSON_GetObjectItem(item, "prompt_ids"), want, 4096), n_got;
    assert_int_equal(canopy_tokenize(tok, text, strlen(text), 0, got, 4096, &n_got), 0);
    same_ids += n_got == n_want && !memcmp(got, want, sizeof *got * (size_t)n_got);
    free(text);
  }
  printf("[ parity   ] chat text %d/%d identical, prompt ids %d/%d identical\n", same_text, n, same_ids, n);
  assert_int_equal(same_text, n);
  assert_int_equal(same_ids, n);
  canopy_tokenizer_free(tok);
}

/* Greedy decoding of every fixture prompt on `device` against the reference tokens; false when
 * the device is not there (a build without CUDA, or no GPU). */
static int greedy_matches_reference(int device, double near_tie) {
  canopy_model_params mp = canopy_model_default_params();
  mp.max_context = 2048;
  mp.device = device;
  canopy_model *m;
  int st = canopy_model_load(model_dir, &mp, &m);
  if (st == CANOPY_ERR_DEVICE && device != CANOPY_DEVICE_CPU) {
    printf("[ greedy   ] no CUDA device: %s\n", canopy_last_error());
    return 0;
  }
  if (st) print_error("%s\n", canopy_last_error());
  assert_int_equal(st, 0);
  const char *dev = device == CANOPY_DEVICE_CPU ? "cpu" : "cuda";
  cJSON *prompts = cJSON_GetObjectItem(fixture, "prompts");
  int n = n_prompts(), identical = 0, near_ties = 0;
  for (int p = 0; p < n; p++) {
    cJSON *item = cJSON_GetArrayItem(prompts, p);
    int32_t prompt[4096], want[256], got[256];
    double gaps[256];
    int n_prompt = ids_of(cJSON_GetObjectItem(item, "prompt_ids"), prompt, 4096);
    int n_new = ids_of(cJSON_GetObjectItem(item, "generated_ids"), want, 256);
    cJSON *g = cJSON_GetObjectItem(item, "top2_gaps");
    for (int i = 0; i < n_new; i++) gaps[i] = cJSON_GetArrayItem(g, i)->valuedouble;

    canopy_session_params sp = canopy_session_default_params();
    sp.max_tokens = n_new;
    sp.stop_at_eos = 0; /* the reference runs past <|im_end|> too */
    canopy_session *s;
    assert_int_equal(canopy_session_create(m, &sp, &s), 0);
    assert_int_equal(canopy_session_append(s, prompt, n_prompt), 0);
    for (int i = 0; i < n_new; i++) assert_int_equal(canopy_session_next(s, &got[i]), CANOPY_OK);
    canopy_session_free(s);

    int first = 0;
    while (first < n_new && got[first] == want[first]) first++;
    const char *id = cJSON_GetObjectItem(item, "id")->valuestring;
    if (first == n_new) {
      identical++;
      printf("[ greedy   ] %s %s: %d/%d tokens identical\n", dev, id, n_new, n_new);
    } else {
      printf("[ greedy   ] %s %s: first difference at step %d (ours %d, reference %d), reference top-2 gap %.5f\n",
             dev, id, first, got[first], want[first], gaps[first]);
      assert_true(gaps[first] < near_tie);
      near_ties++;
    }
  }
  printf("[ greedy   ] %s, %d prompts: %d identical, %d diverge at a near-tie (gap < %g)\n", dev, n, identical,
         near_ties, near_tie);
  canopy_model_free(m);
  return 1;
}

static void test_greedy_generation_matches_transformers_up_to_near_ties(void **state) {
  greedy_matches_reference(CANOPY_DEVICE_CPU, NEAR_TIE);
}

/* The same prompts with the bf16 CUDA forward (issue 5: CUDA greedy equals the fp32 greedy except
 * at documented near-ties). */
static void test_cuda_greedy_generation_matches_transformers_up_to_near_ties(void **state) {
  if (!greedy_matches_reference(CANOPY_DEVICE_CUDA, NEAR_TIE_BF16)) skip();
}

int main(void) {
  if (cn_test_smollm2_dir(model_dir, sizeof model_dir)) return CN_TEST_SKIP;
  char path[1200];
  cn_test_path(path, sizeof path, "tests/fixtures/smollm2_greedy.json");
  char *text = cn_test_read_file(path, NULL);
  fixture = text ? cJSON_Parse(text) : NULL;
  free(text);
  if (!fixture) {
    fprintf(stderr, "cannot read %s\n", path);
    return 1;
  }
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_chat_template_and_prompt_ids_match_transformers),
      cmocka_unit_test(test_greedy_generation_matches_transformers_up_to_near_ties),
      cmocka_unit_test(test_cuda_greedy_generation_matches_transformers_up_to_near_ties),
  };
  int rc = cmocka_run_group_tests(tests, NULL, NULL);
  cJSON_Delete(fixture);
  return rc;
}
