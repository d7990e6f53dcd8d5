/* Bad input through the canopy program: each case ends with exit status 1 and exactly one line
 * on stderr that names the culprit (model files, prompts and limits, tree-opt's costs files).
 * Uses the converted SmolLM2 folder (./test.sh makes it). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include "tests/testing.h"

static char model[1024], tmp[64];

/* Runs the CLI with args (a shell-quoted string), returns the exit status, captures stderr. */
static int run_cli(const char *args, char *err, size_t cap) {
  char cmd[4096], errfile[128];
  snprintf(errfile, sizeof errfile, "%s/stderr.txt", tmp);
  snprintf(cmd, sizeof cmd, "%s %s >/dev/null 2>%s", CANOPY_CLI, args, errfile);
  int st = system(cmd);
  char *text = cn_test_read_file(errfile, NULL);
  snprintf(err, cap, "%s", text ? text : "");
  free(text);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void expect_one_line(const char *args, const char *needle) {
  char err[4096];
  int rc = run_cli(args, err, sizeof err);
  printf("[ cli      ] %s\n             -> %d: %s", args, rc, err);
  assert_int_equal(rc, 1);
  assert_non_null(strstr(err, needle));
  char *nl = strchr(err, '\n');
  assert_non_null(nl);
  assert_string_equal(nl + 1, ""); /* exactly one line */
}

/* A model folder in tmp: links to the real files, except `name` which gets `len` bytes of the
 * real one (or `text` if given). */
static const char *broken_model(const char *name, long len, const char *text) {
  static char dir[256];
  static int counter;
  snprintf(dir, sizeof dir, "%s/m%d", tmp, counter++);
  mkdir(dir, 0755);
  const char *files[] = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"};
  for (int i = 0; i < 4; i++) {
    char src[1200], dst[512];
    snprintf(src, sizeof src, "%s/%s", model, files[i]);
    snprintf(dst, sizeof dst, "%s/%s", dir, files[i]);
    if (strcmp(files[i], name)) {
      assert_int_equal(symlink(src, dst), 0);
      continue;
    }
    FILE *out = fopen(dst, "wb");
    if (text) {
      fputs(text, out);
    } else {
      FILE *in = fopen(src, "rb");
      char buf[65536];
      size_t got;
      for (long left = len; left > 0 && (got = fread(buf, 1, left < (long)sizeof buf ? (size_t)left : sizeof buf, in)) > 0; left -= (long)got)
        fwrite(buf, 1, got, out);
      fclose(in);
    }
    fclose(out);
  }
  return dir;
}

static void test_corrupt_model_files_name_the_file(void **state) {
  char args[1024];
  snprintf(args, sizeof args, "generate -m %s -p hi -n 1", broken_model("model.safetensors", 5, NULL));
  expect_one_line(args, "model.safetensors");
  snprintf(args, sizeof args, "generate -m %s -p hi -n 1", broken_model("model.safetensors", 1000, NULL));
  expect_one_line(args, "model.safetensors");
  snprintf(args, sizeof args, "generate -m %s -p hi -n 1", broken_model("model.safetensors", 1 << 20, NULL));
  expect_one_line(args, "model.safetensors");
  snprintf(args, sizeof args, "generate -m %s -p hi -n 1", broken_model("config.json", 0, "{\"hidden_size\": 576,"));
  expect_one_line(args, "config.json");
  snprintf(args, sizeof args, "generate -m %s -p hi -n 1",
           broken_model("config.json", 0, "{\"architectures\": [\"BertModel\"], \"model_type\": \"bert\"}"));
  expect_one_line(args, "BertModel");
  snprintf(args, sizeof args, "generate -m %s -p hi -n 1", broken_model("tokenizer.json", 0, "{\"model\": 3}"));
  expect_one_line(args, "tokenizer.json");
  expect_one_line("generate -m /nonexistent/canopy -p hi", "/nonexistent/canopy");
  expect_one_line("bench costs -m /nonexistent/canopy -d /nonexistent/canopy", "/nonexistent/canopy");
}

static void test_bad_prompts_and_limits_are_errors(void **state) {
  char args[2048];
  snprintf(args, sizeof args, "generate -m %s -p \"$(printf 'ok \\377\\376')\" -n 1", model);
  expect_one_line(args, "UTF-8");
  snprintf(args, sizeof args, "generate -m %s --ctx 8 -p 'this prompt is certainly longer than eight tokens of context' -n 1", model);
  expect_one_line(args, "context");
  snprintf(args, sizeof args, "generate -m %s --kv-blocks 1 -p 'a prompt that needs more than one block of sixteen tokens in the cache, surely, because it goes on and on for a while' -n 1", model);
  expect_one_line(args, "exhausted");
}

/* Writes text to tmp/NAME, whose path goes to path[256]. */
static void write_tmp(const char *name, const char *text, char *path) {
  snprintf(path, 256, "%s/%s", tmp, name);
  FILE *f = fopen(path, "w");
  assert_non_null(f);
  fputs(text, f);
  fclose(f);
}

/* tree-opt --costs with a broken costs file names the field (and the entry) at fault. */
static void test_bad_costs_files_name_the_field(void **state) {
  char acc[256], costs[256];
  write_tmp("acc.json", "{\"overall\": {\"trees\": [], \"accept_rate_by_rank\": [0.5, 0.2]}}", acc);
  const char *draft_ok = "\"draft_forward\": {\"nodes\": [1, 2], \"ms\": [0.5, 0.6]}";
  const struct { const char *text, *needle; } cases[] = {
      {"[1, 2]", "is not a JSON object"},
      {"{\"target_forward\": {\"nodes\": [1, 2], \"ms\": [1.0]}}", "\"target_forward\" must be"},
      {"{\"target_forward\": {\"nodes\": [2, 1], \"ms\": [1.0, 1.0]}}", "\"target_forward.nodes\" entry 1"},
      {"{\"target_forward\": {\"nodes\": [1, 2.5], \"ms\": [1.0, 1.0]}}", "\"target_forward.nodes\" entry 1"},
      {"{\"target_forward\": {\"nodes\": [1], \"ms\": [1.0]}, \"draft_forward\": {\"nodes\": [1], \"ms\": [-2]}}",
       "\"draft_forward.ms\" entry 0"},
      {"{\"target_forward\": {\"nodes\": [1], \"ms\": [1.0]}}", "\"draft_forward\" must be"},
      {NULL, "\"target_forward\" gives no positive time at 1 node"},
  };
  char args[2048], text[512];
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    if (cases[i].text) snprintf(text, sizeof text, "%s", cases[i].text);
    else /* 1 ms at 2 nodes, 9 at 3: -7 at 1 node, held at 0 */
      snprintf(text, sizeof text, "{\"target_forward\": {\"nodes\": [2, 3], \"ms\": [1, 9]}, %s}", draft_ok);
    write_tmp("costs.json", text, costs);
    snprintf(args, sizeof args, "tree-opt --acceptance %s --costs %s --size 4", acc, costs);
    expect_one_line(args, cases[i].needle);
  }
  snprintf(args, sizeof args, "tree-opt --acceptance %s --costs %s/none.json --size 4", acc, tmp);
  expect_one_line(args, "none.json");
  /* Nothing measured to fit an overhead to: a static tree without a speedup, and a dynamic one. */
  snprintf(text, sizeof text, "{\"target_forward\": {\"nodes\": [1], \"ms\": [1.0]}, %s}", draft_ok);
  write_tmp("costs.json", text, costs);
  write_tmp("acc.json",
            "{\"overall\": {\"trees\": [{\"tree\": \"chain:2\", \"mean_accepted_len\": 1.5}, {\"tree\": "
            "\"dynamic:8\", \"mean_accepted_len\": 2, \"speedup\": 1.2}], \"accept_rate_by_rank\": [0.5]}}",
            acc);
  snprintf(args, sizeof args, "tree-opt --acceptance %s --costs %s --overhead-ms fit --size 4", acc, costs);
  expect_one_line(args, "no static tree with a measured speedup");
  /* An output that cannot be written names it. */
  snprintf(args, sizeof args, "tree-opt --acceptance %s --size 4 --out %s/no/such/dir/tree.json", acc, tmp);
  expect_one_line(args, "cannot write '");
}

static void test_usage_errors_exit_with_2(void **state) {
  char err[4096];
  assert_int_equal(run_cli("generate", err, sizeof err), 2);
  assert_int_equal(run_cli("frobnicate", err, sizeof err), 2);
  assert_int_equal(run_cli("generate -p x --temp -1", err, sizeof err), 2);
  assert_int_equal(run_cli("tree-opt --acceptance x.json --size 4 --overhead-ms 1", err, sizeof err), 2);
  assert_non_null(strstr(err, "needs --costs"));
  assert_int_equal(run_cli("tree-opt --acceptance x.json --size 4 --overhead-ms fit", err, sizeof err), 2);
  assert_int_equal(run_cli("tree-opt --acceptance x.json --size 4 --costs c.json --overhead-ms -1", err, sizeof err),
                   2);
  assert_int_equal(run_cli("bench costs -d x --top-k 33", err, sizeof err), 2);
  assert_int_equal(run_cli("bench costs -d x --nodes 4,2", err, sizeof err), 2);
  assert_int_equal(run_cli("bench costs --ctx 8", err, sizeof err), 2);
  assert_int_equal(run_cli("--help", err, sizeof err), 0);
}

int main(void) {
  if (cn_test_smollm2_dir(model, sizeof model)) return CN_TEST_SKIP;
  strcpy(tmp, "/tmp/canopy-cli-XXXXXX");
  if (!mkdtemp(tmp)) return 1;
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_corrupt_model_files_name_the_file),
      cmocka_unit_test(test_bad_prompts_and_limits_are_errors),
      cmocka_unit_test(test_bad_costs_files_name_the_field),
      cmocka_unit_test(test_usage_errors_exit_with_2),
  };
  int rc = cmocka_run_group_tests(tests, NULL, NULL);
  cn_test_remove_tree(tmp);
  return rc;
}
