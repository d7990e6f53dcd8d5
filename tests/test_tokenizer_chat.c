/* Chat templates: canopy_chat_apply must render exactly what transformers' apply_chat_template
 * renders (tests/fixtures/tokenizer/<style>/chat.jsonl and chat_templates.jsonl), fail where the
 * template raises, and refuse templates it does not recognise. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cjson/cJSON.h>
#include <cmocka.h>

#include "canopy.h"
#include "tests/testing.h"

static char tmpdir[64];

static int group_setup(void **state) {
  snprintf(tmpdir, sizeof tmpdir, "/tmp/canopy_chat_XXXXXX");
  return mkdtemp(tmpdir) ? 0 : -1;
}

static int group_teardown(void **state) {
  return cn_test_remove_tree(tmpdir);
}

/* A folder with SmolLM2's tokenizer.json and a tokenizer_config.json holding `config`. */
static canopy_tokenizer *load_with_config(const char *name, const char *config, int *status) {
  char dir[256], src[1024], dst[300];
  snprintf(dir, sizeof dir, "%s/%s", tmpdir, name);
  mkdir(dir, 0755);
  snprintf(dst, sizeof dst, "%s/tokenizer.json", dir);
  if (access(dst, F_OK) != 0)
    assert_int_equal(symlink(cn_test_path(src, sizeof src, "tests/fixtures/tokenizer/smollm2/tokenizer.json"), dst), 0);
  snprintf(dst, sizeof dst, "%s/tokenizer_config.json", dir);
  unlink(dst);
  if (config) {
    FILE *f = fopen(dst, "w");
    assert_non_null(f);
    fputs(config, f);
    fclose(f);
  }
  canopy_tokenizer *tok = NULL;
  *status = canopy_tokenizer_load(dir, &tok);
  return tok;
}

/* Renders one chat.jsonl row and compares it (and its token ids) with transformers'. */
static int check_row(const canopy_tokenizer *tok, const cJSON *row) {
  const cJSON *msgs = cJSON_GetObjectItem(row, "messages"), *text = cJSON_GetObjectItem(row, "text");
  const cJSON *ids = cJSON_GetObjectItem(row, "ids");
  int gen = cJSON_IsTrue(cJSON_GetObjectItem(row, "add_generation_prompt"));
  int n = cJSON_GetArraySize(msgs), i = 0;
  canopy_chat_message m[16];
  assert_true(n <= 16);
  for (const cJSON *e = msgs->child; e; e = e->next, i++)
    m[i] = (canopy_chat_message){cJSON_GetObjectItem(e, "role")->valuestring, cJSON_GetObjectItem(e, "content")->valuestring};
  char *out = NULL;
  int rc = canopy_chat_apply(tok, m, n, gen, &out);
  if (!text) { /* the template raised */
    if (rc != CANOPY_ERR_INVALID_ARG) printf("      expected an error (%s), got %d\n",
                                             cJSON_GetObjectItem(row, "error")->valuestring, rc);
    free(out);
    return rc == CANOPY_ERR_INVALID_ARG && strstr(canopy_last_error(), "chat template");
  }
  if (rc) {
    printf("      canopy_chat_apply failed: %s\n", canopy_last_error());
    return 0;
  }
  int ok = !strcmp(out, text->valuestring);
  if (!ok) printf("      want \"%s\"\n      got  \"%s\"\n", text->valuestring, out);
  if (ok && ids) {
    int cap = 4096, nid = 0;
    int32_t *got = malloc(sizeof *got * (size_t)cap);
    assert_int_equal(canopy_tokenize(tok, out, strlen(out), 0, got, cap, &nid), CANOPY_OK);
    ok = nid == cJSON_GetArraySize(ids);
    int k = 0;
    for (const cJSON *e = ids->child; ok && e; e = e->next, k++) ok = (int32_t)e->valuedouble == got[k];
    if (!ok) printf("      the rendered chat tokenizes differently from transformers'\n");
    free(got);
  }
  free(out);
  return ok;
}

static void run_style(const char *style) {
  canopy_tokenizer *tok = cn_test_tokenizer(style);
  assert_non_null(tok);
  char path[1024], rel[256];
  snprintf(rel, sizeof rel, "tests/fixtures/tokenizer/%s/chat.jsonl", style);
  char *data = cn_test_read_file(cn_test_path(path, sizeof path, rel), NULL);
  assert_non_null(data);
  int total = 0, ok = 0;
  for (char *line = strtok(data, "\n"); line; line = strtok(NULL, "\n")) {
    cJSON *row = cJSON_Parse(line);
    assert_non_null(row);
    total++;
    ok += check_row(tok, row);
    cJSON_Delete(row);
  }
  printf("[ chat     ] %s: %d/%d renders identical to apply_chat_template\n", style, ok, total);
  free(data);
  canopy_tokenizer_free(tok);
  assert_true(total >= 20);
  assert_int_equal(ok, total);
}

static void test_smollm2_chatml_with_default_system_matches_transformers(void **state) { run_style("smollm2"); }
static void test_llama3_template_matches_transformers(void **state) { run_style("llama3"); }
static void test_llama2_sys_inst_template_matches_transformers(void **state) { run_style("llama2"); }
static void test_mistral_inst_template_matches_transformers(void **state) { run_style("metaspace"); }

/* Each template is written into a tokenizer_config.json, so the default system prompt is read
 * from the template text, never from canopy's code. */
static void test_chatml_variants_take_their_system_prompt_from_the_template(void **state) {
  char path[1024];
  char *data = cn_test_read_file(cn_test_path(path, sizeof path, "tests/fixtures/tokenizer/chat_templates.jsonl"), NULL);
  assert_non_null(data);
  int total = 0, ok = 0;
  for (char *line = strtok(data, "\n"); line; line = strtok(NULL, "\n")) {
    cJSON *row = cJSON_Parse(line);
    cJSON *cfg = cJSON_CreateObject();
    cJSON_AddStringToObject(cfg, "chat_template", cJSON_GetObjectItem(row, "template")->valuestring);
    cJSON_AddStringToObject(cfg, "bos_token", "<|im_start|>");
    cJSON_AddStringToObject(cfg, "eos_token", "<|im_end|>");
    char *cfg_text = cJSON_Print(cfg);
    int st;
    canopy_tokenizer *tok = load_with_config(cJSON_GetObjectItem(row, "name")->valuestring, cfg_text, &st);
    assert_int_equal(st, CANOPY_OK);
    total++;
    ok += check_row(tok, row);
    canopy_tokenizer_free(tok);
    free(cfg_text);
    cJSON_Delete(cfg);
    cJSON_Delete(row);
  }
  printf("[ chat     ] ChatML variants: %d/%d renders identical to apply_chat_template\n", ok, total);
  free(data);
  assert_true(total >= 60);
  assert_int_equal(ok, total);
}

static void test_unknown_or_missing_template_is_unsupported(void **state) {
  canopy_chat_message m[] = {{"user", "hi"}};
  char *out = NULL;
  int st;
  canopy_tokenizer *tok = load_with_config("unknown", "{\"chat_template\": \"{{ messages[0].content }}\"}", &st);
  assert_int_equal(st, CANOPY_OK);
  assert_int_equal(canopy_chat_apply(tok, m, 1, 1, &out), CANOPY_ERR_UNSUPPORTED);
  printf("[ error    ] %s\n", canopy_last_error());
  assert_non_null(strstr(canopy_last_error(), "chat template not recognised"));
  assert_null(out);
  canopy_tokenizer_free(tok);

  tok = load_with_config("llama31", "{\"chat_template\": \"<|start_header_id|>Cutting Knowledge Date: {{ x | trim }}\"}", &st);
  assert_int_equal(st, CANOPY_OK);
  assert_int_equal(canopy_chat_apply(tok, m, 1, 1, &out), CANOPY_ERR_UNSUPPORTED);
  printf("[ error    ] %s\n", canopy_last_error());
  canopy_tokenizer_free(tok);

  tok = load_with_config("none", NULL, &st);
  assert_int_equal(st, CANOPY_OK);
  assert_int_equal(canopy_chat_apply(tok, m, 1, 1, &out), CANOPY_ERR_UNSUPPORTED);
  printf("[ error    ] %s\n", canopy_last_error());
  assert_non_null(strstr(canopy_last_error(), "no chat template"));
  canopy_tokenizer_free(tok);

  /* A malformed tokenizer_config.json is an error, not a missing template. */
  tok = load_with_config("badcfg", "{\"chat_template\": ", &st);
  assert_int_equal(st, CANOPY_ERR_FORMAT);
  assert_null(tok);
  printf("[ error    ] %s\n", canopy_last_error());
  assert_non_null(strstr(canopy_last_error(), "tokenizer_config.json: invalid JSON at byte offset"));
}

static void test_null_messages_are_invalid(void **state) {
  canopy_tokenizer *tok = cn_test_tokenizer("smollm2");
  assert_non_null(tok);
  canopy_chat_message m[] = {{"user", NULL}};
  char *out = NULL;
  assert_int_equal(canopy_chat_apply(tok, m, 1, 0, &out), CANOPY_ERR_INVALID_ARG);
  assert_int_equal(canopy_chat_apply(tok, NULL, 1, 0, &out), CANOPY_ERR_INVALID_ARG);
  assert_int_equal(canopy_chat_apply(tok, NULL, 0, 1, &out), CANOPY_OK); /* no messages: just the prompt */
  assert_string_equal(out, "<|im_start|>assistant\n");
  free(out);
  canopy_tokenizer_free(tok);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_smollm2_chatml_with_default_system_matches_transformers),
      cmocka_unit_test(test_llama3_template_matches_transformers),
      cmocka_unit_test(test_llama2_sys_inst_template_matches_transformers),
      cmocka_unit_test(test_mistral_inst_template_matches_transformers),
      cmocka_unit_test(test_chatml_variants_take_their_system_prompt_from_the_template),
      cmocka_unit_test(test_unknown_or_missing_template_is_unsupported),
      cmocka_unit_test(test_null_messages_are_invalid),
  };
  return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
