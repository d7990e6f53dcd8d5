/* Bad input is an error with one clear line, never a crash: malformed tokenizer.json files name
 * the field at fault, invalid UTF-8 gives its byte offset, short buffers report the size they
 * need. Also: lookups, and concurrent encoding giving the same ids as serial encoding. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <cmocka.h>

#include "canopy.h"
#include "tests/testing.h"

static char tmpdir[64];

static int group_setup(void **state) {
  snprintf(tmpdir, sizeof tmpdir, "/tmp/canopy_tokerr_XXXXXX");
  return mkdtemp(tmpdir) ? 0 : -1;
}

static int group_teardown(void **state) {
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
  return system(cmd) == 0 ? 0 : -1;
}

static canopy_tokenizer *smollm2(void) {
  char path[1024];
  canopy_tokenizer *tok = NULL;
  assert_int_equal(canopy_tokenizer_load(cn_test_path(path, sizeof path, "tests/fixtures/tokenizer/smollm2"), &tok),
                   CANOPY_OK);
  return tok;
}

/* Loads `json` as a tokenizer.json and expects `status` with `needle` in a one-line message. */
static void expect_load_error(const char *json, int status, const char *needle) {
  static int counter;
  char path[256];
  snprintf(path, sizeof path, "%s/t%d.json", tmpdir, counter++);
  FILE *f = fopen(path, "w");
  assert_non_null(f);
  fputs(json, f);
  fclose(f);
  canopy_tokenizer *tok = (canopy_tokenizer *)1;
  int rc = canopy_tokenizer_load(path, &tok);
  const char *msg = canopy_last_error();
  printf("[ error    ] %d: %s\n", rc, msg);
  assert_int_equal(rc, status);
  assert_null(tok);
  assert_non_null(strstr(msg, needle));
  assert_non_null(strstr(msg, path)); /* names the file */
  assert_null(strchr(msg, '\n'));
}

#define BPE(vocab, merges) "{\"model\": {\"type\": \"BPE\", \"vocab\": " vocab ", \"merges\": " merges "}"

static void test_malformed_tokenizer_json_names_the_field(void **state) {
  expect_load_error("{\"model\": {\"type\": \"BPE\",", CANOPY_ERR_FORMAT, "invalid JSON at byte offset");
  expect_load_error("[1, 2]", CANOPY_ERR_FORMAT, "expected a JSON object");
  expect_load_error("{}", CANOPY_ERR_FORMAT, "model: missing");
  expect_load_error("{\"model\": 3}", CANOPY_ERR_FORMAT, "model: expected an object");
  expect_load_error("{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}", CANOPY_ERR_UNSUPPORTED, "model.type");
  expect_load_error(BPE("[]", "[]") "}", CANOPY_ERR_FORMAT, "model.vocab: expected an object");
  expect_load_error(BPE("{\"a\": 0}", "5") "}", CANOPY_ERR_FORMAT, "model.merges: expected an array");
  expect_load_error(BPE("{\"a\": 0, \"b\": 1, \"ab\": 2}", "[[\"a\", \"b\"], [\"a\"]]") "}", CANOPY_ERR_FORMAT,
                    "model.merges[1]: expected a string pair");
  expect_load_error(BPE("{\"a\": 0, \"b\": 1, \"ab\": 2}", "[\"a b\", \"a b c\"]") "}", CANOPY_ERR_FORMAT,
                    "model.merges[1]: expected \"left right\"");
  expect_load_error(BPE("{\"a\": 0, \"b\": 1}", "[\"a b\"]") "}", CANOPY_ERR_FORMAT,
                    "model.merges[0]: token \"ab\" is not in model.vocab");
  expect_load_error(BPE("{\"a\": -1}", "[]") "}", CANOPY_ERR_FORMAT, "model.vocab[\"a\"]: expected a non-negative integer");
  expect_load_error(BPE("{\"a\": 0}", "[]") ", \"added_tokens\": [{\"id\": 1, \"content\": \"<s>\"}, {\"content\": \"x\"}]}",
                    CANOPY_ERR_FORMAT, "added_tokens[1].id");
  expect_load_error(BPE("{\"a\": 0}", "[]") ", \"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": "
                    "[{\"type\": \"Whitespace\"}]}}", CANOPY_ERR_UNSUPPORTED, "pre_tokenizer.pretokenizers[0]");
  expect_load_error(BPE("{\"a\": 0}", "[]") ", \"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"(a\"}, "
                    "\"behavior\": \"Isolated\"}}", CANOPY_ERR_FORMAT, "pre_tokenizer.pattern: cannot compile the regex");
  expect_load_error(BPE("{\"a\": 0}", "[]") ", \"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"a\"}, "
                    "\"behavior\": \"Sideways\"}}", CANOPY_ERR_FORMAT, "pre_tokenizer.behavior");
  expect_load_error(BPE("{\"a\": 0}", "[]") ", \"normalizer\": {\"type\": \"Precompiled\"}}", CANOPY_ERR_UNSUPPORTED,
                    "normalizer: normalizer type \"Precompiled\"");
  expect_load_error(BPE("{\"a\": 0}", "[]") ", \"decoder\": {\"type\": \"Sequence\", \"decoders\": [{\"type\": \"Fuse\"}, "
                    "{\"type\": \"Strip\"}]}}", CANOPY_ERR_FORMAT, "decoder.decoders[1]");
  expect_load_error(BPE("{\"a\": 0}", "[]") ", \"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": "
                    "[{\"SpecialToken\": {\"id\": \"<s>\"}}], \"special_tokens\": {}}}", CANOPY_ERR_FORMAT,
                    "post_processor.single[0]");
  expect_load_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [], \"unk_token\": \"<unk>\"}}",
                    CANOPY_ERR_FORMAT, "model.unk_token");

  canopy_tokenizer *tok = (canopy_tokenizer *)1;
  assert_int_equal(canopy_tokenizer_load("/nonexistent/canopy/tok", &tok), CANOPY_ERR_IO);
  assert_null(tok);
  printf("[ error    ] %s\n", canopy_last_error());
  assert_non_null(strstr(canopy_last_error(), "/nonexistent/canopy/tok"));
}

static void expect_utf8_error(const canopy_tokenizer *tok, const char *text, size_t len, const char *offset) {
  int32_t ids[64];
  int n = -1;
  assert_int_equal(canopy_tokenize(tok, text, len, 0, ids, 64, &n), CANOPY_ERR_UTF8);
  printf("[ error    ] %s\n", canopy_last_error());
  assert_non_null(strstr(canopy_last_error(), offset));
  assert_non_null(strstr(canopy_last_error(), "UTF-8"));
}

static void test_invalid_utf8_is_an_error_with_its_byte_offset(void **state) {
  canopy_tokenizer *tok = smollm2();
  expect_utf8_error(tok, "ok \xff", 4, "byte offset 3");
  expect_utf8_error(tok, "\xc0\xaf slash", 8, "byte offset 0");            /* overlong */
  expect_utf8_error(tok, "0123456789abcdefg\xed\xa0\x80", 20, "byte offset 17"); /* a surrogate */
  expect_utf8_error(tok, "abc\xe4\xb8", 5, "byte offset 3");               /* cut short */
  expect_utf8_error(tok, "\xf4\x90\x80\x80", 4, "byte offset 0");           /* past U+10FFFF */
  expect_utf8_error(tok, "\xe4\xb8\xadx\x80", 5, "byte offset 4");          /* a stray continuation */
  /* A NUL inside the text is text (len, not strlen, delimits it). */
  int32_t ids[8];
  int n;
  assert_int_equal(canopy_tokenize(tok, "a\0b", 3, 0, ids, 8, &n), CANOPY_OK);
  assert_int_equal(n, 3);
  canopy_tokenizer_free(tok);
}

static void test_short_buffers_report_the_size_needed(void **state) {
  canopy_tokenizer *tok = smollm2();
  int32_t ids[16];
  int n = -1;
  assert_int_equal(canopy_tokenize(tok, "Hello world", 11, 0, ids, 1, &n), CANOPY_ERR_BUFFER);
  assert_int_equal(n, 2);
  printf("[ error    ] %s\n", canopy_last_error());
  n = -1;
  assert_int_equal(canopy_tokenize(tok, "Hello world", 11, 0, NULL, 0, &n), CANOPY_ERR_BUFFER);
  assert_int_equal(n, 2);
  assert_int_equal(canopy_tokenize(tok, "Hello world", 11, 0, ids, 2, &n), CANOPY_OK);
  assert_int_equal(canopy_tokenize(tok, "", 0, 0, NULL, 0, &n), CANOPY_OK);
  assert_int_equal(n, 0);
  assert_int_equal(canopy_tokenize(tok, NULL, 0, 0, ids, 16, &n), CANOPY_OK);
  assert_int_equal(n, 0);

  char buf[32];
  size_t len = 0;
  int32_t hw[] = {19556, 905};
  assert_int_equal(canopy_detokenize(tok, hw, 2, 0, buf, 11, &len), CANOPY_ERR_BUFFER);
  assert_int_equal(len, 11); /* "Hello world": 11 bytes, plus the NUL */
  printf("[ error    ] %s\n", canopy_last_error());
  assert_int_equal(canopy_detokenize(tok, hw, 2, 0, NULL, 0, &len), CANOPY_ERR_BUFFER);
  assert_int_equal(len, 11);
  assert_int_equal(canopy_detokenize(tok, hw, 2, 0, buf, 12, &len), CANOPY_OK);
  assert_string_equal(buf, "Hello world");

  int32_t bad[] = {19556, 49152};
  assert_int_equal(canopy_detokenize(tok, bad, 2, 0, buf, sizeof buf, &len), CANOPY_ERR_INVALID_ARG);
  printf("[ error    ] %s\n", canopy_last_error());
  assert_non_null(strstr(canopy_last_error(), "49152"));
  assert_int_equal(canopy_tokenize(NULL, "x", 1, 0, ids, 16, &n), CANOPY_ERR_INVALID_ARG);
  assert_int_equal(canopy_tokenize(tok, "x", 1, 0, ids, -1, &n), CANOPY_ERR_INVALID_ARG);
  canopy_tokenizer_free(tok);
}

static void test_lookups_find_special_tokens(void **state) {
  canopy_tokenizer *tok = smollm2();
  assert_int_equal(canopy_tokenizer_vocab_size(tok), 49152);
  assert_int_equal(canopy_token_id(tok, "<|im_start|>"), 1);
  assert_int_equal(canopy_token_id(tok, "<|im_end|>"), 2);
  assert_int_equal(canopy_token_id(tok, "<|endoftext|>"), 0);
  assert_int_equal(canopy_token_id(tok, "Hello"), 19556);
  assert_int_equal(canopy_token_id(tok, "no such token, surely"), -1);
  assert_int_equal(canopy_token_id(NULL, "x"), -1);
  assert_int_equal(canopy_tokenizer_vocab_size(NULL), 0);
  canopy_tokenizer_free(tok);
  canopy_tokenizer_free(NULL);
}

typedef struct job {
  const canopy_tokenizer *tok;
  const char *text;
  size_t len;
  int32_t *ids;
  int n, rc;
} job;

static void *encode_many(void *arg) {
  job *j = arg;
  for (int rep = 0; rep < 20 && !j->rc; rep++) j->rc = canopy_tokenize(j->tok, j->text, j->len, 0, j->ids, 1 << 18, &j->n);
  return NULL;
}

/* The word cache is shared; a thread that finds it busy works without it. Same ids either way. */
static void test_concurrent_encoding_matches_serial(void **state) {
  canopy_tokenizer *tok = smollm2();
  char path[1024];
  char *text = cn_test_read_file(cn_test_path(path, sizeof path, "tests/fixtures/tokenizer/smollm2/cases.jsonl"), NULL);
  assert_non_null(text);
  size_t len = strlen(text) > 200000 ? 200000 : strlen(text);
  while (len && ((unsigned char)text[len] & 0xC0) == 0x80) len--;
  int32_t *want = malloc(sizeof *want << 18);
  int nwant;
  assert_int_equal(canopy_tokenize(tok, text, len, 0, want, 1 << 18, &nwant), CANOPY_OK);
  job jobs[4];
  pthread_t th[4];
  for (int i = 0; i < 4; i++) {
    jobs[i] = (job){tok, text, len, malloc(sizeof(int32_t) << 18), 0, 0};
    assert_int_equal(pthread_create(&th[i], NULL, encode_many, &jobs[i]), 0);
  }
  for (int i = 0; i < 4; i++) {
    pthread_join(th[i], NULL);
    assert_int_equal(jobs[i].rc, CANOPY_OK);
    assert_int_equal(jobs[i].n, nwant);
    assert_memory_equal(jobs[i].ids, want, sizeof *want * (size_t)nwant);
    free(jobs[i].ids);
  }
  printf("[ threads  ] 4 threads x 20 encodes of %zu bytes (%d ids): identical to serial\n", len, nwant);
  free(want);
  free(text);
  canopy_tokenizer_free(tok);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_malformed_tokenizer_json_names_the_field),
      cmocka_unit_test(test_invalid_utf8_is_an_error_with_its_byte_offset),
      cmocka_unit_test(test_short_buffers_report_the_size_needed),
      cmocka_unit_test(test_lookups_find_special_tokens),
      cmocka_unit_test(test_concurrent_encoding_matches_serial),
  };
  return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
