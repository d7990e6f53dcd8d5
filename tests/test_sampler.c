/* Sampling: greedy is the argmax, the kept sets of top-k and top-p match a sort-based reference
 * built from HF's definitions, draws follow the distribution, and seeds reproduce draws. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "spec/sampler.h"
#include "tests/testing.h"

static uint64_t rng;

static int desc(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x < y) - (x > y);
}

/* HF: softmax(logits / T); top-k keeps the k largest; top-p keeps tokens whose mass above them
 * (in descending order) is < p. */
static void reference(const float *logits, int V, float T, int k, float p, double *out) {
  double mx = -INFINITY, sum = 0;
  for (int i = 0; i < V; i++) mx = fmax(mx, logits[i] / T);
  double *sorted = malloc(sizeof *sorted * V);
  for (int i = 0; i < V; i++) sorted[i] = logits[i];
  qsort(sorted, V, sizeof *sorted, desc);
  double kth = k > 0 && k < V ? sorted[k - 1] : -INFINITY;
  for (int i = 0; i < V; i++) out[i] = logits[i] >= kth ? exp(logits[i] / T - mx) : 0, sum += out[i];
  for (int i = 0; i < V; i++) out[i] /= sum;
  if (p < 1) {
    double *ps = malloc(sizeof *ps * V);
    memcpy(ps, out, sizeof *ps * V);
    qsort(ps, V, sizeof *ps, desc);
    double cum = 0, cut = 0;
    for (int i = 0; i < V && cum < p; i++) cut = ps[i], cum += ps[i];
    sum = 0;
    for (int i = 0; i < V; i++) out[i] = out[i] >= cut ? out[i] : 0, sum += out[i];
    for (int i = 0; i < V; i++) out[i] /= sum;
    free(ps);
  }
  free(sorted);
}

static void test_probs_match_hf_definitions(void **state) {
  int V = 1000;
  float *logits = malloc(sizeof *logits * V), *probs = malloc(sizeof *probs * V);
  double *ref = malloc(sizeof *ref * V);
  struct { float T; int k; float p; } cases[] = {{1, 0, 1}, {0.7f, 0, 1}, {1, 50, 1}, {1, 0, 0.9f}, {0.5f, 20, 0.8f}, {2, 1, 1}};
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    for (int i = 0; i < V; i++) logits[i] = 4 * cn_test_randf(&rng);
    canopy_sampling_params sp = {cases[c].T, cases[c].k, cases[c].p, 1};
    cn_sampler s;
    assert_int_equal(cn_sampler_init(&s, &sp, V), 0);
    cn_sampler_probs(&s, logits, probs);
    reference(logits, V, cases[c].T, cases[c].k, cases[c].p, ref);
    int kept = 0;
    for (int i = 0; i < V; i++) {
      assert_true(fabs(probs[i] - ref[i]) < 1e-5);
      assert_int_equal(probs[i] > 0, ref[i] > 0);
      kept += probs[i] > 0;
    }
    if (cases[c].k) assert_true(kept <= cases[c].k);
    cn_sampler_free(&s);
  }
  free(logits), free(probs), free(ref);
}

static void test_greedy_is_the_first_argmax(void **state) {
  float logits[6] = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f, 0.0f};
  canopy_sampling_params sp = canopy_sampling_default_params();
  cn_sampler s;
  assert_int_equal(cn_sampler_init(&s, &sp, 6), 0);
  assert_int_equal(cn_sampler_sample(&s, logits), 1);
  cn_sampler_free(&s);
}

static void test_draws_follow_the_distribution(void **state) {
  enum { V = 8, N = 200000 };
  float logits[V];
  for (int i = 0; i < V; i++) logits[i] = cn_test_randf(&rng) * 2;
  canopy_sampling_params sp = {0.8f, 6, 0.95f, cn_test_rand(&rng)};
  cn_sampler s;
  assert_int_equal(cn_sampler_init(&s, &sp, V), 0);
  float probs[V];
  cn_sampler_probs(&s, logits, probs);
  double chi2 = 0;
  /* chi-square with <= 7 degrees of freedom: 24.3 is the p = 0.001 critical value at 7. Past it,
   * one more run with fresh draws must pass: chance alone fails both 1 run in a million. */
  for (int run = 0; run < 2 && (run == 0 || chi2 >= 24.3); run++) {
    int counts[V] = {0};
    for (int i = 0; i < N; i++) counts[cn_sampler_sample(&s, logits)]++;
    chi2 = 0;
    int dof = -1;
    for (int i = 0; i < V; i++) {
      if (probs[i] == 0) {
        assert_int_equal(counts[i], 0);
        continue;
      }
      double e = (double)N * probs[i];
      chi2 += (counts[i] - e) * (counts[i] - e) / e;
      dof++;
    }
    printf("[ chi2     ] %.2f with %d degrees of freedom\n", chi2, dof);
  }
  assert_true(chi2 < 24.3);
  cn_sampler_free(&s);
}

static void test_same_seed_same_draws(void **state) {
  int V = 500;
  float *logits = malloc(sizeof *logits * V);
  for (int i = 0; i < V; i++) logits[i] = cn_test_randf(&rng);
  canopy_sampling_params sp = {1.0f, 0, 1.0f, 99};
  cn_sampler a, b;
  assert_int_equal(cn_sampler_init(&a, &sp, V), 0);
  assert_int_equal(cn_sampler_init(&b, &sp, V), 0);
  for (int i = 0; i < 100; i++) assert_int_equal(cn_sampler_sample(&a, logits), cn_sampler_sample(&b, logits));
  cn_sampler_free(&a), cn_sampler_free(&b);
  free(logits);
}

static void test_bad_parameters_are_errors(void **state) {
  cn_sampler s;
  canopy_sampling_params bad[] = {{-1, 0, 1, 0}, {1, -3, 1, 0}, {1, 0, 0, 0}, {1, 0, 1.5f, 0}, {NAN, 0, 1, 0}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    assert_int_equal(cn_sampler_init(&s, &bad[i], 10), CANOPY_ERR_INVALID_ARG);
    assert_non_null(strstr(canopy_last_error(), "sampling"));
  }
}

/* Logits tied at the k-th place: top-k keeps the lower ids (the order the device's stable sort
 * gives), whatever the quickselect's pivots; with top-p the same total order decides. */
static void test_top_k_ties_keep_the_lower_ids(void **state) {
  enum { V = 300 };
  float logits[V], probs[V];
  for (int rep = 0; rep < 20; rep++) {
    int k = 1 + (int)(cn_test_rand(&rng) % 40);
    for (int i = 0; i < V; i++) logits[i] = (float)(cn_test_rand(&rng) % 3); /* 100-odd ties per value */
    canopy_sampling_params sp = {1.0f, k, rep % 2 ? 1.0f : 0.999f, 1};
    cn_sampler s;
    assert_int_equal(cn_sampler_init(&s, &sp, V), 0);
    cn_sampler_probs(&s, logits, probs);
    /* Expected: walk values from the top, ids ascending within a value, take k. */
    int taken = 0;
    for (int v = 2; v >= 0; v--)
      for (int i = 0; i < V; i++) {
        if (logits[i] != (float)v) continue;
        int want = taken < k;
        taken += want;
        if (want != (probs[i] > 0)) fail_msg("k=%d: id %d (logit %d) %s", k, i, v, want ? "dropped" : "kept");
      }
    cn_sampler_free(&s);
  }
}

int main(void) {
  rng = cn_test_seed("test_sampler");
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_probs_match_hf_definitions), cmocka_unit_test(test_greedy_is_the_first_argmax),
      cmocka_unit_test(test_draws_follow_the_distribution), cmocka_unit_test(test_same_seed_same_draws),
      cmocka_unit_test(test_bad_parameters_are_errors), cmocka_unit_test(test_top_k_ties_keep_the_lower_ids),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
