/* canopy tree-opt's dynamic program (cli/tree_opt.h): known optima (a chain when only the first
 * choice is ever accepted), the trees it returns are well formed and evaluate to the value it
 * claims, and a brute force over every tree of up to 6 nodes never beats it. The written tree
 * parses back with cn_tree_spec_parse. One filled table answers every size and depth as a solve
 * of each would. The time model of --costs (cli/tree_cost.h): interpolation, a step's time
 * worked by hand, and the choices it must make when drafting, verifying or neither costs. */
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
#include "cli/tree_cost.h"
#include "cli/tree_opt.h"
#include "draft/tree_spec.h"
#include "tests/testing.h"

static uint64_t seed;

static void check_result(const double *p, int n_p, int n, int max_depth, const cli_tree_opt_result *r) {
  assert_int_equal(r->n_nodes, n);
  assert_true(r->depth <= max_depth);
  int n_children[CLI_TREE_OPT_MAX_NODES + 1] = {0};
  for (int i = 1; i <= n; i++) {
    assert_true(r->parent[i] >= 0 && r->parent[i] < i);
    assert_int_equal(r->node_depth[i], r->node_depth[r->parent[i]] + 1);
    assert_true(r->node_depth[i] <= max_depth);
    assert_int_equal(r->rank[i], n_children[r->parent[i]]++); /* ranks 0, 1, ... without gaps */
  }
  assert_true(fabs(cli_tree_opt_eval(p, n_p, n, r->parent, r->rank) - r->value) < 1e-9);
}

static void test_chain_when_first_choice_always_accepted(void **state) {
  double p[4] = {1, 0, 0, 0};
  for (int n = 1; n <= 40; n += 3)
    for (int d = 1; d <= 12; d++) {
      cli_tree_opt_result r;
      assert_int_equal(cli_tree_opt_solve(p, 4, n, d, &r), 0);
      check_result(p, 4, n, d, &r);
      int best = n < d ? n : d;
      assert_true(fabs(r.value - (best + 1)) < 1e-12);
      assert_int_equal(r.depth, best);
    }
}

static void test_half_first_choice_is_geometric(void **state) {
  double p[3] = {0.5, 0, 0};
  for (int n = 1; n <= 20; n++) {
    cli_tree_opt_result r;
    assert_int_equal(cli_tree_opt_solve(p, 3, n, CLI_TREE_OPT_MAX_DEPTH, &r), 0);
    check_result(p, 3, n, CLI_TREE_OPT_MAX_DEPTH, &r);
    double want = 1;
    for (int k = 1; k <= n; k++) want += pow(0.5, k);
    assert_true(fabs(r.value - want) < 1e-12);
    assert_int_equal(r.depth, n); /* the chain */
  }
}

/* Every tree with parent[i] < i (all labelings of all ordered trees of n nodes). */
static double brute(const double *p, int n_p, int n, int max_depth, int i, int32_t *parent, int32_t *rank,
                    int32_t *depth, int *n_children) {
  if (i > n) return cli_tree_opt_eval(p, n_p, n, parent, rank);
  double best = -1;
  for (int a = 0; a < i; a++) {
    if (depth[a] + 1 > max_depth) continue;
    parent[i] = a;
    rank[i] = n_children[a]++;
    depth[i] = depth[a] + 1;
    double v = brute(p, n_p, n, max_depth, i + 1, parent, rank, depth, n_children);
    if (v > best) best = v;
    n_children[a]--;
  }
  return best;
}

static void test_brute_force_small_trees(void **state) {
  uint64_t rng = seed;
  for (int trial = 0; trial < 60; trial++) {
    double p[6];
    int n_p = 1 + (int)(cn_test_rand(&rng) % 6);
    for (int k = 0; k < n_p; k++) p[k] = (cn_test_randf(&rng) + 1) / 2;
    if (trial % 3 == 0) p[0] = 1;      /* extremes too */
    if (trial % 5 == 1) p[n_p - 1] = 0;
    for (int n = 1; n <= 6; n++)
      for (int d = 1; d <= 4; d++) {
        int32_t parent[8] = {-1}, rank[8] = {0}, depth[8] = {0};
        int n_children[8] = {0};
        double want = brute(p, n_p, n, d, 1, parent, rank, depth, n_children);
        cli_tree_opt_result r;
        assert_int_equal(cli_tree_opt_solve(p, n_p, n, d, &r), 0);
        check_result(p, n_p, n, d, &r);
        if (fabs(r.value - want) > 1e-9)
          fail_msg("n %d depth %d n_p %d: dp %.12f, brute force %.12f", n, d, n_p, r.value, want);
      }
  }
}

static void test_large_tree_parses_back(void **state) {
  double p[4] = {0.7, 0.4, 0.3, 0.2};
  cli_tree_opt_result r;
  assert_int_equal(cli_tree_opt_solve(p, 4, CLI_TREE_OPT_MAX_NODES, 8, &r), 0);
  check_result(p, 4, CLI_TREE_OPT_MAX_NODES, 8, &r);
  /* Monotone in the budget. */
  cli_tree_opt_result smaller;
  assert_int_equal(cli_tree_opt_solve(p, 4, 64, 8, &smaller), 0);
  assert_true(smaller.value <= r.value + 1e-12);
  /* As JSON paths (in depth order), through the engine's parser. */
  size_t cap = 64 * 1024, len = 0;
  char *json = malloc(cap);
  assert_non_null(json);
  len += (size_t)snprintf(json + len, cap - len, "[");
  int first = 1;
  for (int d = 1; d <= r.depth; d++)
    for (int i = 1; i <= r.n_nodes; i++) {
      if (r.node_depth[i] != d) continue;
      int32_t path[CLI_TREE_OPT_MAX_DEPTH];
      int k = r.node_depth[i];
      for (int a = i; a > 0; a = r.parent[a]) path[--k] = r.rank[a];
      len += (size_t)snprintf(json + len, cap - len, "%s[", first ? "" : ",");
      first = 0;
      for (int j = 0; j < r.node_depth[i]; j++)
        len += (size_t)snprintf(json + len, cap - len, "%s%d", j ? "," : "", path[j]);
      len += (size_t)snprintf(json + len, cap - len, "]");
    }
  snprintf(json + len, cap - len, "]");
  cn_tree_spec s;
  int rc = cn_tree_spec_parse(json, &s);
  if (rc) fail_msg("parse: %s", canopy_last_error());
  assert_int_equal(s.n_nodes, CLI_TREE_OPT_MAX_NODES);
  assert_int_equal(s.depth, r.depth);
  assert_int_equal(s.rank_gaps, 0);
  free(json);
}

static void test_bad_arguments(void **state) {
  double p[2] = {0.5, 1.5};
  cli_tree_opt_result r;
  assert_int_equal(cli_tree_opt_solve(p, 1, 0, 4, &r), -1);
  assert_int_equal(cli_tree_opt_solve(p, 1, CLI_TREE_OPT_MAX_NODES + 1, 4, &r), -1);
  assert_int_equal(cli_tree_opt_solve(p, 1, 4, 0, &r), -1);
  assert_int_equal(cli_tree_opt_solve(p, 2, 4, 4, &r), -1);
  assert_int_equal(cli_tree_opt_solve(NULL, 0, 4, 4, &r), 0); /* nothing accepted: value 1 */
  assert_true(fabs(r.value - 1) < 1e-12);
}

static void test_one_table_answers_every_size_and_depth(void **state) {
  uint64_t rng = seed ^ 0x5eed;
  for (int trial = 0; trial < 4; trial++) {
    double p[5];
    for (int k = 0; k < 5; k++) p[k] = (cn_test_randf(&rng) + 1) / 2;
    cli_tree_opt_dp dp;
    assert_int_equal(cli_tree_opt_dp_fill(p, 5, 24, 7, &dp), 0);
    for (int n = 1; n <= 24; n++)
      for (int d = 1; d <= 7; d++) {
        cli_tree_opt_result want, got;
        assert_int_equal(cli_tree_opt_solve(p, 5, n, d, &want), 0);
        cli_tree_opt_tree(&dp, n, d, &got);
        check_result(p, 5, n, d, &got);
        if (fabs(got.value - want.value) > 1e-12 || fabs(cli_tree_opt_value(&dp, n, d) - want.value) > 1e-12)
          fail_msg("n %d depth %d: table %.12f, solve %.12f", n, d, got.value, want.value);
      }
    cli_tree_opt_dp_free(&dp);
  }
  cli_tree_opt_dp dp;
  assert_int_equal(cli_tree_opt_dp_fill(NULL, 0, 4, 0, &dp), -1);
  cli_tree_opt_dp_free(&dp);
}

static cli_tree_cost_curve curve(int n, const int *nodes, const double *ms) {
  cli_tree_cost_curve c = {.n = n};
  for (int i = 0; i < n; i++) c.nodes[i] = nodes[i], c.ms[i] = ms[i];
  return c;
}

static void test_cost_curve_interpolates_and_extends(void **state) {
  const int x[] = {1, 4, 8};
  const double y[] = {10, 16, 20};
  cli_tree_cost_curve c = curve(3, x, y);
  const double at[][2] = {{1, 10}, {2, 12}, {4, 16}, {6, 18}, {8, 20}, {16, 28}, {0.5, 9}, {2.5, 13}};
  for (size_t i = 0; i < sizeof at / sizeof *at; i++)
    if (fabs(cli_tree_cost_at(&c, at[i][0]) - at[i][1]) > 1e-12)
      fail_msg("at %g: %g, want %g", at[i][0], cli_tree_cost_at(&c, at[i][0]), at[i][1]);
  cli_tree_cost_curve one = curve(1, x, y);
  assert_true(cli_tree_cost_at(&one, 50) == 10);
  const double steep[] = {1, 11};
  cli_tree_cost_curve s = curve(2, (const int[]){2, 3}, steep);
  assert_true(cli_tree_cost_at(&s, 1) == 0); /* -9 extrapolated, held at 0 */
}

/* static:2,1 by hand (two children of the root, one child each): the catch-up over E rows, one
 * level forward over the two nodes with a child, the verification of 5 nodes, the overhead. */
static void test_step_time_by_hand(void **state) {
  cli_tree_costs c = {.overhead_ms = 0.25};
  c.target = curve(3, (const int[]){1, 2, 8}, (const double[]){1.0, 1.2, 2.4});
  c.draft = curve(2, (const int[]){1, 4}, (const double[]){0.3, 0.6});
  cn_tree_spec ts;
  assert_int_equal(cn_tree_spec_parse("static:2,1", &ts), 0);
  cli_tree_opt_result r = {.n_nodes = ts.n_nodes, .depth = ts.depth};
  for (int i = 0; i <= ts.n_nodes; i++)
    r.parent[i] = ts.parent[i], r.rank[i] = ts.rank[i], r.node_depth[i] = ts.node_depth[i];
  int rows[CLI_TREE_OPT_MAX_DEPTH + 1];
  cli_tree_cost_level_rows(&r, rows);
  assert_int_equal(rows[1], 2);
  double E = 2.5, want = (0.3 + 0.1 * 1.5) + (0.3 + 0.1) + (1.2 + 0.2 * 3) + 0.25;
  assert_true(fabs(cli_tree_step_ms(&c, &r, E) - want) < 1e-12);
  r.value = E;
  assert_true(fabs(cli_tree_speedup(&c, &r) - E / want * 1.0) < 1e-12);
  /* A measured step 0.4 ms dearer than the forwards: that residual, whatever c's overhead, and
   * with it as the overhead the model gives the measured speedup back. */
  double measured = E / (want - 0.25 + 0.4);
  assert_true(fabs(cli_tree_step_residual(&c, &r, measured) - 0.4) < 1e-12);
  c.overhead_ms = 0.4;
  assert_true(fabs(cli_tree_speedup(&c, &r) - measured) < 1e-12);
  /* An overhead that would make the step free or negative gives no speedup rather than a wrong one. */
  c.overhead_ms = -want;
  assert_true(cli_tree_speedup(&c, &r) == 0);
}

static double search(const double *p, int n_p, int N, int D, const cli_tree_costs *c, cli_tree_opt_result *best) {
  cli_tree_opt_dp dp;
  assert_int_equal(cli_tree_opt_dp_fill(p, n_p, N, D, &dp), 0);
  cli_tree_cost_row *rows = calloc((size_t)N + 1, sizeof *rows);
  assert_non_null(rows);
  double s = cli_tree_cost_search(&dp, c, best, rows);
  for (int n = 1; n <= N; n++) {
    assert_true(rows[n].speedup <= s + 1e-12);
    assert_true(rows[n].depth >= 1 && rows[n].depth <= D && rows[n].depth <= n);
  }
  free(rows);
  cli_tree_opt_dp_free(&dp);
  check_result(p, n_p, best->n_nodes, D, best);
  return s;
}

static void test_cost_search_follows_the_prices(void **state) {
  const double p[4] = {0.7, 0.4, 0.3, 0.2};
  const int one[] = {1}, two[] = {1, 64};
  cli_tree_opt_result best, want;
  /* Nothing costs more for more: the biggest tree wins, as the acceptance-only optimum. */
  cli_tree_costs flat = {.target = curve(1, one, (const double[]){1.0}),
                         .draft = curve(1, one, (const double[]){1e-9})};
  double s = search(p, 4, 30, 6, &flat, &best);
  assert_int_equal(cli_tree_opt_solve(p, 4, 30, 6, &want), 0);
  assert_int_equal(best.n_nodes, 30);
  assert_true(fabs(best.value - want.value) < 1e-12);
  assert_true(fabs(s - want.value) < 1e-6);
  /* Draft forwards dearer than a verification: one level only (the catch-up is paid anyway). */
  cli_tree_costs dear = {.target = curve(1, one, (const double[]){1.0}), .draft = curve(1, one, (const double[]){5.0})};
  search(p, 4, 30, 6, &dear, &best);
  assert_int_equal(best.depth, 1);
  /* Verification linear in the nodes (compute-bound): E <= n + 1 tokens for n + 1 units plus
   * drafting, never faster than the target alone; the least tree loses least. */
  cli_tree_costs linear = {.target = curve(2, two, (const double[]){1.0, 64.0}),
                           .draft = curve(1, one, (const double[]){0.01})};
  s = search(p, 4, 30, 6, &linear, &best);
  assert_int_equal(best.n_nodes, 1);
  assert_true(s < 1);
  /* A launch-bound device: verification flat to 8 nodes, then linear; cheap draft levels. The
   * pick stays within the flat part and beats the target alone. */
  cli_tree_costs gpu = {.target = curve(3, (const int[]){1, 9, 64}, (const double[]){1.0, 1.1, 6.0}),
                        .draft = curve(1, one, (const double[]){0.1})};
  s = search(p, 4, 30, 6, &gpu, &best);
  assert_true(best.n_nodes <= 9 && best.n_nodes >= 2);
  assert_true(s > 1);
}

int main(void) {
  seed = cn_test_seed("test_tree_opt");
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_chain_when_first_choice_always_accepted),
      cmocka_unit_test(test_half_first_choice_is_geometric),
      cmocka_unit_test(test_brute_force_small_trees),
      cmocka_unit_test(test_large_tree_parses_back),
      cmocka_unit_test(test_bad_arguments),
      cmocka_unit_test(test_one_table_answers_every_size_and_depth),
      cmocka_unit_test(test_cost_curve_interpolates_and_extends),
      cmocka_unit_test(test_step_time_by_hand),
      cmocka_unit_test(test_cost_search_follows_the_prices),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
