/* Speculative sampling through the whole engine (draft model, tree growth, one-forward
 * verification, stochastic acceptance, commit) is distributed exactly as target-only sampling:
 * the first three tokens' empirical joint over 100,000 seeded sessions against the exact joint
 * computed from the target's own distributions, by chi-square. Tiny models with an 8-token
 * vocabulary (tools/make_spec_fixtures.py) keep the joint at 512 cells. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "canopy.h"
#include "spec/sampler.h"
#include "tests/testing.h"

#define V 8
#define CELLS (V * V * V)

static canopy_model *target, *draft;
static const int32_t prompt[3] = {0, 3, 5};
static uint64_t seed;

/* The target's processed next-token distribution after `ids`. */
static void target_probs(const canopy_sampling_params *sp, const int32_t *ids, int n, float *probs) {
  canopy_session *s;
  assert_int_equal(canopy_session_create(target, NULL, &s), 0);
  assert_int_equal(canopy_session_append(s, ids, n), 0);
  const float *logits;
  int vocab;
  assert_int_equal(canopy_session_logits(s, &logits, &vocab), 0);
  cn_sampler smp;
  assert_int_equal(cn_sampler_init(&smp, sp, vocab), 0);
  cn_sampler_probs(&smp, logits, probs);
  cn_sampler_free(&smp);
  canopy_session_free(s);
}

static void exact_joint(const canopy_sampling_params *sp, double *joint) {
  int32_t ids[6];
  memcpy(ids, prompt, sizeof prompt);
  float p1[V], p2[V], p3[V];
  target_probs(sp, ids, 3, p1);
  for (int a = 0; a < V; a++) {
    ids[3] = a;
    target_probs(sp, ids, 4, p2);
    for (int b = 0; b < V; b++) {
      ids[4] = b;
      target_probs(sp, ids, 5, p3);
      for (int c = 0; c < V; c++) joint[(a * V + b) * V + c] = (double)p1[a] * p2[b] * p3[c];
    }
  }
}

/* Upper tail of chi-square with k degrees of freedom (Wilson-Hilferty: accurate to ~1e-3
 * relative for k > 30, which these tests have). */
static double chi2_p(double x, int k) {
  double z = (pow(x / k, 1.0 / 3.0) - (1.0 - 2.0 / (9.0 * k))) / sqrt(2.0 / (9.0 * k));
  return 0.5 * erfc(z / sqrt(2.0));
}

/* One session draws all n samples: after each three tokens it is truncated back to the prompt,
 * so the draft's state that carries over between steps (its cache, the dynamic tree's threshold)
 * is exercised too, and the samples stay independent (fresh draws each time). */
static double run_check(canopy_model *d, const char *tree, canopy_sampling_params sp, int n, uint64_t run_seed) {
  double joint[CELLS];
  exact_joint(&sp, joint);
  int *counts = calloc(CELLS, sizeof *counts);
  canopy_session_params p = canopy_session_default_params();
  p.sampling = sp;
  p.sampling.seed = run_seed;
  p.stop_at_eos = 0;
  p.draft = d;
  p.tree = tree;
  canopy_session *s;
  int st = canopy_session_create(target, &p, &s);
  if (st) print_error("%s\n", canopy_last_error());
  assert_int_equal(st, 0);
  assert_int_equal(canopy_session_append(s, prompt, 3), 0);
  for (int i = 0; i < n; i++) {
    int32_t t[3];
    for (int j = 0; j < 3; j++) assert_int_equal(canopy_session_next(s, &t[j]), CANOPY_OK);
    counts[(t[0] * V + t[1]) * V + t[2]]++;
    assert_int_equal(canopy_session_truncate(s, 3), CANOPY_OK);
  }
  canopy_stats stats;
  canopy_session_get_stats(s, &stats);
  long steps = stats.spec_steps, tokens = stats.spec_tokens;
  canopy_session_free(s);
  /* Cells expected below 5 are pooled into one, as the chi-square approximation needs. */
  double chi2 = 0, pooled_e = 0, pooled_o = 0;
  int dof = -1;
  for (int c = 0; c < CELLS; c++) {
    double e = joint[c] * n;
    if (e < 5) {
      pooled_e += e, pooled_o += counts[c];
      continue;
    }
    chi2 += (counts[c] - e) * (counts[c] - e) / e;
    dof++;
  }
  if (pooled_e > 0) chi2 += (pooled_o - pooled_e) * (pooled_o - pooled_e) / pooled_e, dof++;
  double pv = chi2_p(chi2, dof);
  printf("[ exact    ] %-14s T=%.1f top_k=%d top_p=%.2f: %d samples, %.2f tokens/step, chi2 %.1f, dof %d, p %.3f\n",
         d ? tree : "target only", sp.temperature, sp.top_k, sp.top_p, n, steps ? (double)tokens / steps : 1.0, chi2,
         dof, pv);
  free(counts);
  return pv;
}

/* Each check must give p > 0.001. Seven of them would fail about 0.7% of runs by chance, so one
 * below 0.001 runs once more with fresh draws and must pass then; a biased engine fails both. */
static void check(canopy_model *d, const char *tree, canopy_sampling_params sp, int n) {
  double pv = run_check(d, tree, sp, n, seed);
  if (pv <= 0.001) {
    printf("[ rerun    ] p %.4g <= 0.001: once more with fresh draws\n", pv);
    pv = run_check(d, tree, sp, n, seed ^ 0x9e3779b97f4a7c15ull);
  }
  assert_true(pv > 0.001);
}

static int n_samples(void) { return getenv("CANOPY_TEST_QUICK") ? 20000 : 100000; }

static void test_static_tree_sampling_at_t1_is_exact(void **state) {
  check(draft, "static:2,2", (canopy_sampling_params){1.0f, 0, 1.0f, 0}, n_samples());
}

static void test_chain_sampling_at_t07_is_exact(void **state) {
  check(draft, "chain:3", (canopy_sampling_params){0.7f, 0, 1.0f, 0}, n_samples());
}

static void test_sampling_with_top_k_and_top_p_is_exact(void **state) {
  check(draft, "[[0],[1],[2],[0,0],[1,0]]", (canopy_sampling_params){1.0f, 5, 0.9f, 0}, n_samples());
}

static void test_static_tree_at_t07_with_top_k_and_top_p_is_exact(void **state) {
  check(draft, "static:3,2", (canopy_sampling_params){0.7f, 6, 0.8f, 0}, n_samples());
}

/* Dynamic trees decide each node's child count before drawing (draft/tree_grow.h). */
/* Static trees step chained on the CPU (draws and acceptance where the logits are); the host
 * path, which grows the tree level by level through the host, must be exact too. */
static void test_static_tree_sampling_on_the_host_path_is_exact(void **state) {
  setenv("CANOPY_SPEC_HOST_LEVELS", "1", 1);
  check(draft, "static:2,2", (canopy_sampling_params){1.0f, 0, 1.0f, 0}, n_samples());
  check(draft, "static:3,2", (canopy_sampling_params){0.7f, 6, 0.8f, 0}, n_samples());
  unsetenv("CANOPY_SPEC_HOST_LEVELS");
}

static void test_dynamic_tree_sampling_at_t1_is_exact(void **state) {
  check(draft, "dynamic:6,depth=3,topk=3", (canopy_sampling_params){1.0f, 0, 1.0f, 0}, n_samples());
}

static void test_dynamic_tree_sampling_at_t07_is_exact(void **state) {
  check(draft, "dynamic:8,depth=3,topk=4", (canopy_sampling_params){0.7f, 0, 1.0f, 0}, n_samples());
}

static void test_dynamic_tree_with_top_k_and_top_p_is_exact(void **state) {
  check(draft, "dynamic:5,depth=2,topk=2", (canopy_sampling_params){1.0f, 4, 0.85f, 0}, n_samples());
  check(draft, "dynamic:8,depth=3,topk=3", (canopy_sampling_params){0.7f, 5, 0.9f, 0}, n_samples());
}

static int setup(void **state) {
  char dir[1024];
  /* One thread: these models are tiny, and waking workers would cost more than the math. */
  canopy_model_params mp = canopy_model_default_params();
  mp.n_threads = 1;
  if (canopy_model_load(cn_test_path(dir, sizeof dir, "tests/fixtures/models/spec_v8_target"), &mp, &target)) return -1;
  return canopy_model_load(cn_test_path(dir, sizeof dir, "tests/fixtures/models/spec_v8_draft"), &mp, &draft);
}

static int teardown(void **state) {
  canopy_model_free(target);
  canopy_model_free(draft);
  return 0;
}

int main(void) {
  seed = cn_test_seed("test_spec_exact");
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_static_tree_sampling_at_t1_is_exact),
      cmocka_unit_test(test_chain_sampling_at_t07_is_exact),
      cmocka_unit_test(test_sampling_with_top_k_and_top_p_is_exact),
      cmocka_unit_test(test_static_tree_at_t07_with_top_k_and_top_p_is_exact),
      cmocka_unit_test(test_static_tree_sampling_on_the_host_path_is_exact),
      cmocka_unit_test(test_dynamic_tree_sampling_at_t1_is_exact),
      cmocka_unit_test(test_dynamic_tree_sampling_at_t07_is_exact),
      cmocka_unit_test(test_dynamic_tree_with_top_k_and_top_p_is_exact),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
