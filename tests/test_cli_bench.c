/* `canopy bench acceptance` through the program: by default every run prefills its whole prompt
 * (no prompt token served from an earlier run's KV blocks), so the target alone and each tree start
 * from the same state; --prefix-cache lets the speculative run reuse the blocks the target-alone
 * run of the same prompt left. Checked in results.json, together with greedy speculation matching
 * the target alone. Uses the converted SmolLM2 folder (./test.sh makes it), on the CPU, with the
 * target's first two layers as the draft. Also `canopy bench costs` and `canopy tree-opt --costs`
 * on the same models. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cJSON.h>
#include <cmocka.h>

#include "tests/testing.h"

static char model[1024], tmp[64];

/* Runs `canopy ARGS` (its output to tmp/LOG.log), expects success, returns tmp/JSON parsed. */
static cJSON *run_json(const char *args, const char *log, const char *json) {
  char cmd[4096 + 1024], path[256];
  snprintf(cmd, sizeof cmd, "%s %s > %s/%s.log 2>&1", CANOPY_CLI, args, tmp, log);
  assert_int_equal(system(cmd), 0);
  snprintf(path, sizeof path, "%s/%s", tmp, json);
  char *text = cn_test_read_file(path, NULL);
  assert_non_null(text);
  cJSON *root = cJSON_Parse(text);
  free(text);
  assert_non_null(root);
  return root;
}

/* Runs the bench into tmp/NAME with `extra` options; returns its parsed results.json. */
static cJSON *run_bench(const char *name, const char *extra) {
  char args[3072], json[128];
  snprintf(args, sizeof args,
           "bench acceptance -m %s -d %s --draft-layers 2 --prompts %s/prompts.jsonl --chat -n 6 --tree chain:2 "
           "--threads 2 %s --out %s/%s",
           model, model, tmp, extra, tmp, name);
  snprintf(json, sizeof json, "%s/results.json", name);
  return run_json(args, name, json);
}

static double num(const cJSON *o, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
  assert_true(cJSON_IsNumber(v));
  return v->valuedouble;
}

static void check(cJSON *root, int prefix_cache) {
  const cJSON *meta = cJSON_GetObjectItemCaseSensitive(root, "metadata");
  assert_true(cJSON_IsBool(cJSON_GetObjectItemCaseSensitive(meta, "prefix_cache")));
  assert_int_equal(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(meta, "prefix_cache")), prefix_cache);
  const cJSON *overall = cJSON_GetObjectItemCaseSensitive(root, "overall");
  const cJSON *alone = cJSON_GetObjectItemCaseSensitive(overall, "target_only");
  const cJSON *tree = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(overall, "trees"), 0);
  assert_non_null(alone);
  assert_non_null(tree);
  double reused_alone = num(alone, "prompt_tokens_reused"), reused_tree = num(tree, "prompt_tokens_reused");
  printf("[ bench    ] prefix cache %s: prompt tokens reused, target alone %.0f, chain:2 %.0f; greedy identical %.0f "
         "of %.0f\n",
         prefix_cache ? "on" : "off", reused_alone, reused_tree, num(tree, "runs_identical_to_target_only"),
         num(tree, "runs_compared_with_target_only"));
  if (prefix_cache) {
    /* The chain:2 run of each prompt finds the full blocks its target-alone run left. */
    assert_true(reused_tree > 0);
  } else {
    assert_true(reused_alone == 0);
    assert_true(reused_tree == 0);
  }
  assert_true(num(tree, "runs_compared_with_target_only") == 2);
  assert_true(num(tree, "runs_identical_to_target_only") == 2);
}

static const cJSON *item(const cJSON *o, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
  assert_non_null(v);
  return v;
}

/* `canopy bench costs` times the sizes asked for, and `canopy tree-opt --costs` turns those times
 * and a run's acceptance into a tree with a predicted speedup that the step model reproduces. */
static void test_costs_and_the_fastest_tree(void **state) {
  char args[3072];
  snprintf(args, sizeof args,
           "bench costs -m %s -d %s --draft-layers 2 --ctx 20 --nodes 1,2,5 --draft-nodes 1,3 --top-k 4 --reps 3 "
           "--threads 2 --out %s/costs.json",
           model, model, tmp);
  cJSON *costs = run_json(args, "costs", "costs.json");
  assert_string_equal(item(costs, "device")->valuestring, "cpu");
  assert_int_equal((int)num(costs, "draft_layers"), 2);
  assert_int_equal((int)num(costs, "ctx"), 20);
  const int want_t[] = {1, 2, 5}, want_d[] = {1, 3};
  const char *names[] = {"target_forward", "draft_forward"};
  for (int c = 0; c < 2; c++) {
    const cJSON *nodes = item(item(costs, names[c]), "nodes"), *ms = item(item(costs, names[c]), "ms");
    int n = c ? 2 : 3;
    assert_int_equal(cJSON_GetArraySize(nodes), n);
    assert_int_equal(cJSON_GetArraySize(ms), n);
    for (int i = 0; i < n; i++) {
      assert_int_equal((int)cJSON_GetArrayItem(nodes, i)->valuedouble, c ? want_d[i] : want_t[i]);
      assert_true(cJSON_GetArrayItem(ms, i)->valuedouble > 0);
    }
  }
  cJSON_Delete(run_bench("acc", ""));
  snprintf(args, sizeof args,
           "tree-opt --acceptance %s/acc/results.json --costs %s/costs.json --overhead-ms 0.5 --size 6 "
           "--out %s/fast.json",
           tmp, tmp, tmp);
  cJSON *tree = run_json(args, "fast", "fast.json");
  int size = (int)num(tree, "size");
  double speedup = num(tree, "predicted_speedup"), step = num(tree, "predicted_step_ms");
  double len = num(tree, "predicted_mean_accepted_len");
  printf("[ costs    ] fastest tree of at most 6 nodes: %d nodes, mean length %.3f, step %.3f ms, %.3fx\n", size,
         len, step, speedup);
  assert_true(size >= 1 && size <= 6);
  assert_int_equal(cJSON_GetArraySize(item(tree, "paths")), size);
  assert_true(step > 0.5 && len >= 1);
  /* speedup = length / step x the target's one-node time */
  const cJSON *t_ms = item(item(costs, "target_forward"), "ms");
  assert_true(fabs(speedup - len / step * cJSON_GetArrayItem(t_ms, 0)->valuedouble) < 1e-4 * speedup);
  cJSON_Delete(tree);

  /* --overhead-ms fit on the run's one static tree (chain:2): the fitted overhead makes the model
   * give that tree's measured speedup at its measured length. */
  snprintf(args, sizeof args,
           "tree-opt --acceptance %s/acc/results.json --costs %s/costs.json --overhead-ms fit --size 6 "
           "--out %s/fit.json",
           tmp, tmp, tmp);
  tree = run_json(args, "fit", "fit.json");
  assert_int_equal((int)num(tree, "overhead_fitted_to"), 1);
  char path[256], *log;
  snprintf(path, sizeof path, "%s/fit.log", tmp);
  assert_non_null(log = cn_test_read_file(path, NULL));
  double with_measured = 0, measured = 0;
  const char *line = strstr(log, "chain:2 ");
  assert_non_null(line);
  const char *at = strstr(line, "x with the measured length), measured ");
  assert_non_null(at);
  while (at > line && at[-1] != '(') at--;
  assert_int_equal(sscanf(at, "%lfx with the measured length), measured %lfx", &with_measured, &measured), 2);
  printf("[ costs    ] overhead fitted: %.4f ms a step; chain:2 modelled %.3fx, measured %.3fx\n",
         num(tree, "overhead_ms"), with_measured, measured);
  assert_true(fabs(with_measured - measured) < 1.5e-3);
  free(log);
  cJSON_Delete(tree);
  cJSON_Delete(costs);
}

static void test_runs_prefill_alike_unless_asked(void **state) {
  cJSON *off = run_bench("off", ""), *on = run_bench("on", "--prefix-cache");
  check(off, 0);
  check(on, 1);
  cJSON_Delete(off);
  cJSON_Delete(on);
}

int main(void) {
  if (cn_test_smollm2_dir(model, sizeof model)) return CN_TEST_SKIP;
  strcpy(tmp, "/tmp/canopy-bench-XXXXXX");
  if (!mkdtemp(tmp)) return 1;
  /* Two prompts whose chat renderings fill more than one 16-token block. */
  char path[128];
  snprintf(path, sizeof path, "%s/prompts.jsonl", tmp);
  FILE *f = fopen(path, "w");
  if (!f) return 1;
  fputs("{\"id\": \"a\", \"prompt\": \"Explain in two sentences why the sky is blue during the day.\"}\n"
        "{\"id\": \"b\", \"prompt\": \"Write a short list of three fruits that are red.\"}\n",
        f);
  fclose(f);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_runs_prefill_alike_unless_asked),
      cmocka_unit_test(test_costs_and_the_fastest_tree),
  };
  int rc = cmocka_run_group_tests(tests, NULL, NULL);
  cn_test_remove_tree(tmp);
  return rc;
}
