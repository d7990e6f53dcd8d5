/* Acceptance: greedy walks follow the target's argmax; children drawn without replacement are
 * distinct draws from q; and full speculative generation with stochastic acceptance reproduces
 * the target's joint distribution exactly (chi-square against a known 3-token Markov target),
 * while deliberately wrong rules fail the same test. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cmocka.h>

#include "draft/tree.h"
#include "kernels/cpu/ops.h"
#include "spec/accept.h"
#include "spec/sampler.h"
#include "tests/testing.h"

static uint64_t seed;

/* ---- chi-square ---------------------------------------------------------------------------- */

/* The regularised upper incomplete gamma Q(a, x) = Gamma(a, x) / Gamma(a): the power series of
 * P(a, x) below x = a + 1, the continued fraction of Gamma(a, x) (evaluated by the modified
 * Lentz method) above it. The chi-square survival function is Q(df / 2, chi2 / 2). */
static double gamma_q(double a, double x) {
  if (x <= 0) return 1;
  double lead = exp(a * log(x) - x - lgamma(a));
  if (x < a + 1) {
    double term = 1 / a, sum = term;
    for (int n = 1; n < 10000 && fabs(term) > 1e-16 * fabs(sum); n++)
      sum += term *= x / (a + n);
    return fmax(0, 1 - lead * sum);
  }
  const double tiny = 1e-300;
  double b = x + 1 - a, c = 1 / tiny, d = 1 / b, h = d;
  for (int i = 1; i < 10000; i++) {
    double an = -i * (i - a);
    b += 2;
    d = an * d + b;
    d = fabs(d) < tiny ? tiny : d;
    c = b + an / c;
    c = fabs(c) < tiny ? tiny : c;
    d = 1 / d;
    h *= d * c;
    if (fabs(d * c - 1) < 1e-15) break;
  }
  return lead * h;
}

static double chi2_sf(double chi2, int df) { return df <= 0 ? 1 : gamma_q(df / 2.0, chi2 / 2.0); }

typedef struct fit {
  double chi2, p;
  int df;         /* merged cells - 1 */
  long forbidden; /* samples in cells of probability 0 */
} fit;

typedef struct cell {
  double e;
  long o;
} cell;

static int by_expected(const void *a, const void *b) {
  double x = ((const cell *)a)->e, y = ((const cell *)b)->e;
  return (x > y) - (x < y);
}

/* Pearson's chi-square of observed counts against probabilities. Cells with expected count < 5
 * are merged, smallest first, into groups of expected count >= 5 (a leftover joins the last
 * group). Any sample in a cell of probability 0 makes p = 0. */
static fit chi2_fit(const long *obs, const double *prob, int cells, long n) {
  fit f = {0, 1, -1, 0};
  cell *cs = malloc(sizeof *cs * cells);
  int m = 0;
  for (int i = 0; i < cells; i++) {
    if (prob[i] <= 0)
      f.forbidden += obs[i];
    else
      cs[m++] = (cell){(double)n * prob[i], obs[i]};
  }
  qsort(cs, m, sizeof *cs, by_expected);
  double ge = 0, last_e = 0;
  long go = 0, last_o = 0;
  for (int i = 0; i < m; i++) {
    ge += cs[i].e, go += cs[i].o;
    if (ge < 5 && i + 1 < m) continue;
    if (ge < 5 && f.df >= 0) { /* the leftover joins the last group */
      f.chi2 -= (last_o - last_e) * (last_o - last_e) / last_e;
      ge += last_e, go += last_o, f.df--;
    }
    f.chi2 += (go - ge) * (go - ge) / ge;
    f.df++;
    last_e = ge, last_o = go, ge = 0, go = 0;
  }
  free(cs);
  f.p = f.forbidden ? 0 : chi2_sf(f.chi2, f.df);
  return f;
}

static void test_chi2_survival_matches_known_quantiles(void **state) {
  /* Critical values from standard chi-square tables. */
  struct {
    double x;
    int df;
    double p;
  } known[] = {
      {3.841, 1, 0.05},     {10.828, 1, 0.001},   {24.322, 7, 0.001}, {18.307, 10, 0.05},
      {124.342, 100, 0.05}, {100.0, 100, 0.4811}, {0.5, 3, 0.9189},   {511.0, 511, 0.4912},
  };
  for (size_t i = 0; i < sizeof known / sizeof known[0]; i++) {
    double p = chi2_sf(known[i].x, known[i].df);
    printf("[ sf       ] chi2 %.3f df %d: %.5f (table %.4f)\n", known[i].x, known[i].df, p, known[i].p);
    assert_true(fabs(p - known[i].p) < 2e-4 + 2e-3 * known[i].p);
  }
}

/* ---- greedy -------------------------------------------------------------------------------- */

enum { GV = 6 };

static void set_row(float *logits, int row, int argmax) {
  for (int v = 0; v < GV; v++)
    logits[row * GV + v] = -(float)v * 0.1f;
  logits[row * GV + argmax] = 5;
}

static void test_greedy_follows_the_argmax_path_and_stops_at_the_first_miss(void **state) {
  /* root(0) -> 1:tok2, 2:tok5 ; 2 -> 3:tok1, 4:tok3 ; 4 -> 5:tok0 */
  cn_tree t;
  cn_tree_reset(&t, 4);
  assert_int_equal(cn_tree_add(&t, 0, 2, 0), 1);
  assert_int_equal(cn_tree_add(&t, 0, 5, 0), 2);
  assert_int_equal(cn_tree_add(&t, 2, 1, 0), 3);
  assert_int_equal(cn_tree_add(&t, 2, 3, 0), 4);
  assert_int_equal(cn_tree_add(&t, 4, 0, 0), 5);
  float logits[6 * GV];
  set_row(logits, 0, 5); /* -> node 2 */
  set_row(logits, 1, 0);
  set_row(logits, 2, 3); /* -> node 4 */
  set_row(logits, 3, 0);
  set_row(logits, 4, 4); /* node 4's only child is 0: a miss, bonus 4 */
  set_row(logits, 5, 1);
  int32_t acc[8] = {-7, -7, -7, -7, -7, -7, -7, -7}, bonus = -7;
  int n = -7;
  assert_int_equal(cn_accept_greedy(&t, logits, GV, acc, &n, &bonus), CANOPY_OK);
  assert_int_equal(n, 2);
  assert_int_equal(acc[0], 2);
  assert_int_equal(acc[1], 4);
  assert_int_equal(acc[2], -7);
  assert_int_equal(bonus, 4);

  set_row(logits, 0, 3); /* the root's argmax matches no child */
  assert_int_equal(cn_accept_greedy(&t, logits, GV, acc, &n, &bonus), CANOPY_OK);
  assert_int_equal(n, 0);
  assert_int_equal(bonus, 3);
}

static void test_greedy_ties_take_the_first_index(void **state) {
  cn_tree t;
  cn_tree_reset(&t, 0);
  cn_tree_add(&t, 0, 4, 0);                 /* node 1 carries the later of the tied tokens */
  cn_tree_add(&t, 0, 2, 0);                 /* node 2 the first */
  float logits[3 * GV] = {0, 1, 3, 0, 3, 0, /* tie between 2 and 4 */
                          0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0};
  int32_t acc[2] = {-7, -7}, bonus = -7;
  int n = -7;
  assert_int_equal(cn_accept_greedy(&t, logits, GV, acc, &n, &bonus), CANOPY_OK);
  assert_int_equal(n, 1);
  assert_int_equal(acc[0], 2);
  assert_int_equal(bonus, 0); /* node 2's row ties ids 0 and 1: the first */
}

static void test_greedy_chain_all_accepted_takes_the_bonus_from_the_last_node(void **state) {
  cn_tree t;
  cn_tree_reset(&t, 1);
  int toks[4] = {3, 0, 5, 2};
  float logits[5 * GV];
  for (int i = 0; i < 4; i++) {
    assert_int_equal(cn_tree_add(&t, i, toks[i], 0), i + 1);
    set_row(logits, i, toks[i]);
  }
  set_row(logits, 4, 1);
  int32_t acc[4] = {-7, -7, -7, -7}, bonus = -7;
  int n = -7;
  assert_int_equal(cn_accept_greedy(&t, logits, GV, acc, &n, &bonus), CANOPY_OK);
  assert_int_equal(n, 4);
  for (int i = 0; i < 4; i++)
    assert_int_equal(acc[i], i + 1);
  assert_int_equal(bonus, 1);

  cn_tree_reset(&t, 1); /* the root alone: its argmax is the bonus */
  assert_int_equal(cn_accept_greedy(&t, logits + 3 * GV, GV, acc, &n, &bonus), CANOPY_OK);
  assert_int_equal(n, 0);
  assert_int_equal(bonus, 2);
}

/* kernels/cpu's walk over arrays (the CPU twin of the device's acceptance, which chained
 * speculative steps use) against the walk over a cn_tree, on batches of 1-6 random BFS trees laid
 * one after the other (local parents, a root each) over a vocabulary of 3, so that many children
 * match and siblings repeat tokens (the first one wins in both). */
enum { FOREST = 6 * CN_TREE_MAX_NODES };

static void test_array_walk_matches_the_tree_walk_on_random_trees(void **state) {
  uint64_t rs = seed ^ 0xacce97;
  static cn_tree trees[6];
  static int32_t tokens[FOREST], parent[FOREST], top[FOREST], out[2 * 6 + 2 * FOREST];
  int accepted = 0;
  for (int rep = 0; rep < 300; rep++) {
    int n_trees = 1 + (int)(cn_test_rand(&rs) % 6), n = 0;
    for (int k = 0; k < n_trees; k++) {
      cn_tree *t = &trees[k];
      cn_tree_reset(t, (int32_t)(cn_test_rand(&rs) % 3));
      int m = 1 + (int)(cn_test_rand(&rs) % CN_TREE_MAX_NODES);
      for (int i = 1; i < m; i++) {
        /* A parent no earlier than the last added node's keeps siblings consecutive. */
        int lo = t->parent[t->n - 1] > 0 ? t->parent[t->n - 1] : 0, span = t->n - lo;
        int p = lo + (int)(cn_test_rand(&rs) % (uint64_t)(span < 4 ? span : 4));
        assert_int_equal(cn_tree_add(t, p, (int32_t)(cn_test_rand(&rs) % 3), 0), i);
      }
      for (int i = 0; i < m; i++) {
        tokens[n + i] = t->token[i];
        parent[n + i] = t->parent[i];
        top[n + i] = (int32_t)(cn_test_rand(&rs) % 3);
      }
      n += m;
    }
    assert_int_equal(cn_cpu_accept_greedy(out, tokens, top, parent, n), n_trees);
    for (int k = 0, f = 0; k < n_trees; f += trees[k++].n) {
      const cn_tree *t = &trees[k];
      int32_t acc[CN_TREE_MAX_NODES], bonus, n_acc, m = t->n;
      const int32_t *o = out + 2 * k + 2 * f;
      assert_int_equal(cn_accept_greedy_top(t, top + f, 3, acc, &n_acc, &bonus), CANOPY_OK);
      assert_int_equal(o[0], n_acc);
      assert_int_equal(o[1], bonus);
      for (int i = 0; i < n_acc; i++) {
        assert_int_equal(o[2 + i], acc[i]);
        assert_int_equal(o[2 + m + i], t->token[acc[i]]);
      }
      accepted += n_acc;
    }
  }
  assert_true(accepted > 0);
  int32_t bad[3] = {-1, 0, 2}, tok[3] = {0}, tp[3] = {0}, o[12];
  assert_int_equal(cn_cpu_accept_greedy(o, tok, tp, bad, 3), -1); /* a parent not before its child */
  bad[2] = -1, bad[1] = 1;
  assert_int_equal(cn_cpu_accept_greedy(o, tok, tp, bad, 3), -1); /* its own parent */
  bad[0] = 0;
  assert_int_equal(cn_cpu_accept_greedy(o, tok, tp, bad, 1), -1); /* a first node with a parent */
}

static void test_malformed_input_is_an_error(void **state) {
  cn_tree t;
  cn_tree_reset(&t, 0);
  cn_tree_add(&t, 0, 1, 0);
  float logits[2 * GV] = {0}, probs[2 * GV] = {0}, scratch[2 * GV];
  int32_t acc[2], bonus;
  int n;
  cn_rng rng;
  cn_rng_seed(&rng, 1);
  t.token[1] = GV; /* out of the vocabulary */
  assert_int_equal(cn_accept_greedy(&t, logits, GV, acc, &n, &bonus), CANOPY_ERR_INVALID_ARG);
  assert_non_null(strstr(canopy_last_error(), "accept greedy"));
  t.token[1] = 1;
  const float *no_draft[2] = {NULL, NULL};
  probs[0] = 1;
  assert_int_equal(cn_accept_stochastic(&t, probs, no_draft, GV, &rng, scratch, acc, &n, &bonus),
                   CANOPY_ERR_INVALID_ARG);
  assert_non_null(strstr(canopy_last_error(), "no draft distribution"));
  const float *draft[2] = {probs, NULL};
  probs[0] = 0; /* a target row with no mass */
  assert_int_equal(cn_accept_stochastic(&t, probs, draft, GV, &rng, scratch, acc, &n, &bonus), CANOPY_ERR_INVALID_ARG);
  assert_int_equal(cn_draft_children_sample(NULL, GV, 2, &rng, acc, scratch), CANOPY_ERR_INVALID_ARG);
}

/* ---- drawing children ---------------------------------------------------------------------- */

static void test_children_sample_distinct_positive_min_of_k_and_support(void **state) {
  enum { V = 10 };
  cn_rng rng;
  cn_rng_seed(&rng, seed);
  float q[V], scratch[V];
  for (int trial = 0; trial < 2000; trial++) {
    for (int v = 0; v < V; v++)
      q[v] = cn_test_rand(&seed) % 3 == 0 ? 0 : (float)(cn_test_rand(&seed) % 1000 + 1) * 1e-3f;
    if (trial % 7 == 0) q[trial % V] = -1; /* negatives count as zero */
    if (trial % 11 == 0) q[trial % V] = NAN;
    int support = 0;
    for (int v = 0; v < V; v++)
      support += q[v] > 0;
    int k = (int)(cn_test_rand(&seed) % (V + 3)), seen[V] = {0};
    int32_t out[V + 3];
    for (int i = 0; i < V + 3; i++)
      out[i] = -7;
    int m = cn_draft_children_sample(q, V, k, &rng, out, scratch);
    assert_int_equal(m, k < support ? k : support);
    for (int i = 0; i < m; i++) {
      assert_true(out[i] >= 0 && out[i] < V);
      assert_true(q[out[i]] > 0);
      assert_int_equal(seen[out[i]]++, 0);
    }
    for (int i = m; i < k; i++) /* a row of k picks: repeats of the first, which acceptance skips */
      assert_int_equal(out[i], m > 0 ? out[0] : 0);
    for (int i = k; i < V + 3; i++)
      assert_int_equal(out[i], -7);
  }
}

/* The draws of one run of the test below: the first draw's and the (first, second) pair's fits. */
static void draw_pairs(const float *q, int V, long N, cn_rng *rng, float *scratch, fit *f1, fit *f2) {
  long *first = calloc((size_t)V, sizeof *first), *pair = calloc((size_t)V * V, sizeof *pair);
  double *p1 = malloc(sizeof *p1 * V), *p2 = malloc(sizeof *p2 * V * V);
  for (long i = 0; i < N; i++) {
    int32_t out[2];
    assert_int_equal(cn_draft_children_sample(q, V, 2, rng, out, scratch), 2);
    first[out[0]]++;
    pair[out[0] * V + out[1]]++;
  }
  for (int a = 0; a < V; a++) {
    p1[a] = q[a];
    for (int b = 0; b < V; b++)
      p2[a * V + b] = a == b ? 0 : (double)q[a] * q[b] / (1 - q[a]);
  }
  *f1 = chi2_fit(first, p1, V, N), *f2 = chi2_fit(pair, p2, V * V, N);
  printf("[ chi2     ] first draw: %.2f, df %d, p %.4f; (first, second): %.2f, df %d, p %.4f\n", f1->chi2, f1->df,
         f1->p, f2->chi2, f2->df, f2->p);
  free(first), free(pair), free(p1), free(p2);
}

static void test_children_sample_first_and_second_draws_follow_q_without_replacement(void **state) {
  enum { V = 8, N = 200000 };
  cn_rng rng;
  cn_rng_seed(&rng, seed ^ 0x5eed);
  float q[V], scratch[V];
  double qs = 0;
  for (int v = 0; v < V; v++)
    qs += q[v] = v == 3 ? 0 : expf(2 * cn_test_randf(&seed));
  for (int v = 0; v < V; v++)
    q[v] = (float)(q[v] / qs);
  fit f1, f2;
  draw_pairs(q, V, N, &rng, scratch, &f1, &f2);
  if (f1.p <= 1e-3 || f2.p <= 1e-3) {
    printf("[ rerun    ] p <= 0.001: once more with fresh draws (see check_exact)\n");
    draw_pairs(q, V, N, &rng, scratch, &f1, &f2);
  }
  assert_true(f1.p > 1e-3);
  assert_true(f2.p > 1e-3);
}

/* V = 8 keeps every draw inside one block of the blocked inverse-CDF sampler; these vocabularies
 * cross many blocks (and, at 300k, blocks wider than the minimum), with empty blocks and mass at
 * the first and last ids. */
static void test_large_vocabularies_draw_exactly_across_blocks(void **state) {
  cn_rng rng;
  cn_rng_seed(&rng, cn_test_rand(&seed));
  {
    enum { BV = 300000, SUPPORT = 12, N = 2000 };
    float *q = calloc(BV, sizeof *q), *scratch = malloc(sizeof *scratch * BV);
    double *prob = calloc(BV, sizeof *prob), s = 0;
    long *first = calloc(BV, sizeof *first);
    for (int i = 0; i < SUPPORT; i++) {
      int at = i == 0 ? 0 : i == 1 ? BV - 1 : (int)(cn_test_rand(&seed) % BV);
      q[at] = expf(cn_test_randf(&seed));
    }
    for (int v = 0; v < BV; v++)
      s += q[v];
    for (int v = 0; v < BV; v++)
      prob[v] = q[v] / s;
    fit f;
    for (int run = 0; run < 2; run++) { /* a second run with fresh draws only after p <= 0.001 */
      memset(first, 0, sizeof *first * BV);
      for (int i = 0; i < N; i++) {
        int32_t out[3];
        assert_int_equal(cn_draft_children_sample(q, BV, 3, &rng, out, scratch), 3);
        assert_true(out[0] != out[1] && out[1] != out[2] && out[0] != out[2]);
        first[out[0]]++;
      }
      f = chi2_fit(first, prob, BV, N);
      printf("[ chi2     ] V %d, first draw: %.2f, df %d, p %.4f\n", BV, f.chi2, f.df, f.p);
      if (f.p > 1e-3) break;
    }
    assert_int_equal(f.forbidden, 0);
    assert_true(f.p > 1e-3);
    free(q), free(scratch), free(prob), free(first);
  }
  {
    /* One level: the root's emitted token (an accepted child or the bonus) must follow p. */
    enum { BV = 3000, N = 30000 };
    float *p = malloc(sizeof *p * BV), *q = malloc(sizeof *q * BV), *scratch = malloc(sizeof *scratch * 2 * BV);
    double *prob = malloc(sizeof *prob * BV), sp = 0, sq = 0;
    long *count = calloc(BV, sizeof *count);
    for (int v = 0; v < BV; v++) {
      int block = v / 256;
      p[v] = block == 3 ? 0 : expf(2 * cn_test_randf(&seed)); /* a block the target excludes */
      q[v] = block == 5 ? 0 : expf(2 * cn_test_randf(&seed)); /* and one the draft never proposes */
      sp += p[v], sq += q[v];
    }
    for (int v = 0; v < BV; v++)
      p[v] = (float)(p[v] / sp), q[v] = (float)(q[v] / sq), prob[v] = p[v];
    const float *dp[4] = {q, NULL, NULL, NULL};
    float *tp = malloc(sizeof *tp * 4 * BV);
    for (int i = 0; i < 4; i++)
      memcpy(tp + (size_t)i * BV, p, sizeof *p * BV);
    fit f;
    for (int run = 0; run < 2; run++) {
      memset(count, 0, sizeof *count * BV);
      for (int i = 0; i < N; i++) {
        cn_tree t;
        int32_t kids[3], acc[1], bonus;
        int n;
        cn_tree_reset(&t, 0);
        int m = cn_draft_children_sample(q, BV, 3, &rng, kids, scratch);
        for (int j = 0; j < m; j++)
          cn_tree_add(&t, 0, kids[j], 0);
        assert_int_equal(cn_accept_stochastic(&t, tp, dp, BV, &rng, scratch, acc, &n, &bonus), CANOPY_OK);
        count[n ? t.token[acc[0]] : bonus]++;
      }
      f = chi2_fit(count, prob, BV, N);
      printf("[ chi2     ] V %d, one level of 3 children: %.2f, df %d, p %.4f\n", BV, f.chi2, f.df, f.p);
      if (f.p > 1e-3) break;
    }
    assert_int_equal(f.forbidden, 0);
    assert_true(f.p > 1e-3);
    free(p), free(q), free(scratch), free(prob), free(count), free(tp);
  }
}

/* ---- full speculative generation against a known target ------------------------------------ */

/* The target and the draft are second-order Markov chains over V tokens: p(x1), p(x2 | x1),
 * p(x_t | x_{t-2}, x_{t-1}) for t >= 3, each row processed by cn_sampler_probs (temperature,
 * top-k, top-p) from random logits. Generation of the first 3 tokens is compared with the exact
 * joint p(x1) p(x2|x1) p(x3|x1,x2). */
enum { V = 8, CELLS = V * V * V, ROWS = 1 + V + V * V };

typedef struct chain {
  float row[ROWS][V];
} chain;

static int row_of(int len, int a, int b) { return len == 0 ? 0 : len == 1 ? 1 + b : 1 + V + a * V + b; }

static void chain_make(chain *c, float scale, canopy_sampling_params sp) {
  cn_sampler s;
  assert_int_equal(cn_sampler_init(&s, &sp, V), 0);
  for (int r = 0; r < ROWS; r++) {
    float logits[V];
    for (int v = 0; v < V; v++)
      logits[v] = scale * cn_test_randf(&seed);
    cn_sampler_probs(&s, logits, c->row[r]);
  }
  cn_sampler_free(&s);
}

static void chain_joint(const chain *c, double *joint) {
  for (int a = 0; a < V; a++)
    for (int b = 0; b < V; b++)
      for (int x = 0; x < V; x++)
        joint[(a * V + b) * V + x] = (double)c->row[0][a] * c->row[row_of(1, 0, a)][b] * c->row[row_of(2, a, b)][x];
}

typedef struct shape {
  const char *name;
  int branch[4]; /* children per node at each depth (static shapes) */
  int dynamic;   /* else: widths from the draft's confidence, depth by path probability, a budget */
} shape;

/* How to accept. RULE_EXACT and RULE_WITH_REPLACEMENT call cn_accept_stochastic; the others are
 * walks written here: a plain double-precision copy of the exact rule (so that the wrong rules
 * differ from a passing walk by exactly their mistake), and deliberately wrong rules that the
 * chi-square must catch. */
typedef enum rule {
  RULE_EXACT,            /* children without replacement, cn_accept_stochastic */
  RULE_WITH_REPLACEMENT, /* children i.i.d. from q (repeats possible), cn_accept_stochastic */
  RULE_REFERENCE,        /* children without replacement, the walk below with no mistake */
  RULE_NO_RESIDUAL,      /* each sibling against p_u and q_u, bonus from norm(max(p - q, 0)) */
  RULE_Q_KEPT,           /* residual updates, but q keeps rejected tokens (SpecInfer's i.i.d. rule) */
  RULE_BONUS_FROM_P,     /* residual and q updates, but the bonus after rejections drawn from p_u */
} rule;

static const char *rule_name[] = {"exact",
                                  "with replacement",
                                  "reference walk",
                                  "no residual update",
                                  "q keeps rejected tokens",
                                  "bonus from p, not r"};

typedef struct sim {
  const chain *target, *draft;
  const shape *sh;
  rule rule;
  cn_rng rng;
  long steps, tokens; /* speculative steps run, tokens they produced */
} sim;

static int draw_iid(const float *q, cn_rng *rng) {
  double u = cn_rng_uniform(rng), cum = 0;
  int last = 0;
  for (int v = 0; v < V; v++) {
    if (q[v] <= 0) continue;
    cum += q[v];
    last = v;
    if (u < cum) return v;
  }
  return last;
}

static int draw_double(const double *w, cn_rng *rng) {
  double s = 0, cum = 0;
  for (int v = 0; v < V; v++)
    s += w[v];
  double u = cn_rng_uniform(rng) * s;
  int last = 0;
  for (int v = 0; v < V; v++) {
    if (w[v] <= 0) continue;
    cum += w[v];
    last = v;
    if (u < cum) return v;
  }
  return last;
}

static void test_walk(const cn_tree *t, const float *tp, const float *const *dp, rule rl, cn_rng *rng, int32_t *acc,
                      int *n_acc, int32_t *bonus) {
  int u = 0, n = 0;
  for (;;) {
    double r[V], q[V];
    for (int v = 0; v < V; v++)
      r[v] = tp[u * V + v], q[v] = dp[u] ? dp[u][v] : 0;
    int next = -1;
    for (int c = t->first_child[u]; c >= 0 && c < t->first_child[u] + t->n_children[u]; c++) {
      int x = t->token[c];
      if (cn_rng_uniform(rng) * q[x] < r[x]) {
        next = c;
        break;
      }
      if (rl == RULE_NO_RESIDUAL) continue;
      double s = 0, sq = 0;
      for (int v = 0; v < V; v++)
        s += fmax(r[v] - q[v], 0);
      for (int v = 0; v < V && s > 0; v++)
        r[v] = fmax(r[v] - q[v], 0) / s;
      if (rl == RULE_Q_KEPT) continue;
      q[x] = 0;
      for (int v = 0; v < V; v++)
        sq += q[v];
      for (int v = 0; v < V && sq > 0; v++)
        q[v] /= sq;
    }
    if (next < 0) {
      if (rl == RULE_BONUS_FROM_P) {
        for (int v = 0; v < V; v++)
          r[v] = tp[u * V + v];
        *bonus = draw_double(r, rng);
      } else if (rl == RULE_NO_RESIDUAL && t->n_children[u] > 0) {
        double d[V], s = 0;
        for (int v = 0; v < V; v++)
          s += d[v] = fmax(r[v] - q[v], 0);
        *bonus = draw_double(s > 0 ? d : r, rng);
      } else {
        *bonus = draw_double(r, rng);
      }
      break;
    }
    acc[n++] = next;
    u = next;
  }
  *n_acc = n;
}

static int children_for(const shape *sh, const cn_tree *t, int i, const float *q) {
  int d = t->depth[i];
  if (!sh->dynamic) return d < 4 ? sh->branch[d] : 0;
  /* Like a dynamic tree: expand a node only while its draft path probability is >= 0.03, wider
   * where the draft is unsure. Decided before drawing, from what is already in the tree. */
  if (d >= 3 || t->logp[i] < logf(0.03f)) return 0;
  float mx = 0;
  for (int v = 0; v < V; v++)
    mx = fmaxf(mx, q[v]);
  return 1 + (int)(3 * (1 - mx));
}

/* Drafts a tree from a committed prefix x[0..len): tp gets each node's target row, dp its draft
 * row (the distribution its children are drawn from). */
static void build_tree(sim *s, int len, const int *x, cn_tree *t, float *tp, const float **dp) {
  enum { BUDGET = 14 };
  int ln[CN_TREE_MAX_NODES], pa[CN_TREE_MAX_NODES], pb[CN_TREE_MAX_NODES];
  float scratch[V];
  cn_tree_reset(t, len ? x[len - 1] : 0);
  ln[0] = len, pa[0] = len >= 2 ? x[len - 2] : 0, pb[0] = len >= 1 ? x[len - 1] : 0;
  for (int i = 0; i < t->n; i++) {
    const float *q = s->draft->row[row_of(ln[i], pa[i], pb[i])];
    dp[i] = q;
    memcpy(tp + i * V, s->target->row[row_of(ln[i], pa[i], pb[i])], sizeof(float) * V);
    int k = children_for(s->sh, t, i, q);
    if (s->sh->dynamic && k > BUDGET - t->n) k = BUDGET - t->n; /* a budget cuts a prefix of the draws */
    int32_t kids[V];
    int m = 0;
    if (k <= 0) continue;
    if (s->rule == RULE_WITH_REPLACEMENT)
      for (m = 0; m < k; m++)
        kids[m] = draw_iid(q, &s->rng);
    else
      m = cn_draft_children_sample(q, V, k, &s->rng, kids, scratch);
    for (int j = 0; j < m; j++) {
      int c = cn_tree_add(t, i, kids[j], t->logp[i] + logf(q[kids[j]]));
      assert_true(c > 0);
      ln[c] = ln[i] + 1, pa[c] = pb[i], pb[c] = kids[j];
    }
  }
}

/* One speculative step from a committed prefix x[0..len): draft a tree, accept, and write the
 * accepted tokens and the bonus to out. Returns how many. */
static int spec_step(sim *s, int len, const int *x, int32_t *out) {
  cn_tree t;
  static float tp[CN_TREE_MAX_NODES * V];
  const float *dp[CN_TREE_MAX_NODES];
  float scratch[2 * V];
  build_tree(s, len, x, &t, tp, dp);
  int32_t acc[CN_TREE_MAX_NODES], bonus = -7;
  int n = -7;
  if (s->rule == RULE_EXACT || s->rule == RULE_WITH_REPLACEMENT)
    assert_int_equal(cn_accept_stochastic(&t, tp, dp, V, &s->rng, scratch, acc, &n, &bonus), CANOPY_OK);
  else
    test_walk(&t, tp, dp, s->rule, &s->rng, acc, &n, &bonus);
  /* Every output written: the accepted nodes form a path from the root, the bonus is a token. */
  assert_true(n >= 0 && n < t.n);
  for (int j = 0; j < n; j++) {
    assert_true(acc[j] > 0 && acc[j] < t.n);
    assert_int_equal(t.parent[acc[j]], j ? acc[j - 1] : 0);
    out[j] = t.token[acc[j]];
  }
  assert_true(bonus >= 0 && bonus < V);
  out[n] = bonus;
  s->steps++;
  s->tokens += n + 1;
  return n + 1;
}

static void simulate(sim *s, long n, long *counts) {
  memset(counts, 0, sizeof *counts * CELLS);
  for (long i = 0; i < n; i++) {
    int x[3], len = 0;
    while (len < 3) {
      int32_t out[CN_TREE_MAX_NODES + 1];
      int m = spec_step(s, len, x, out);
      for (int j = 0; j < m && len < 3; j++)
        x[len++] = out[j];
    }
    counts[(x[0] * V + x[1]) * V + x[2]]++;
  }
}

static long n_samples(void) {
  /* 100,000 samples per configuration at least; more where the build is fast. */
  return getenv("CANOPY_TEST_QUICK") ? 100000 : 200000;
}

static const shape shapes[] = {{"3,2,1", {3, 2, 1, 0}, 0}, {"4,2", {4, 2, 0, 0}, 0}, {"dynamic", {0}, 1}};

typedef struct variant {
  const char *name;
  canopy_sampling_params target, draft;
} variant;

static const variant variants[] = {
    {"T=1", {1, 0, 1, 0}, {1, 0, 1, 0}},
    {"T=0.7", {0.7f, 0, 1, 0}, {1, 0, 1, 0}},
    {"top-k 5, top-p 0.9", {1, 5, 0.9f, 0}, {1, 3, 1, 0}}, /* draft support 3 < 4 children asked */
};

static fit run_config(const chain *target, const chain *draft, const shape *sh, rule rl, long n, const char *label) {
  static long counts[CELLS];
  static double joint[CELLS];
  sim s = {target, draft, sh, rl, {{0}}, 0, 0};
  cn_rng_seed(&s.rng, cn_test_rand(&seed));
  clock_t t0 = clock();
  simulate(&s, n, counts);
  chain_joint(target, joint);
  fit f = chi2_fit(counts, joint, CELLS, n);
  printf("[ chi2     ] %-22s shape %-7s %-24s chi2 %8.1f df %3d p %.4g  (%.2f tokens/step, %.1f s)\n", label, sh->name,
         rule_name[rl], f.chi2, f.df, f.p, (double)s.tokens / s.steps, (double)(clock() - t0) / CLOCKS_PER_SEC);
  return f;
}

/* The key property. Each configuration must give p > 0.001. With a dozen configurations an
 * exact rule would fail one about 1% of the time by chance, so a configuration below 0.001 is
 * rerun once with fresh draws and must pass then; a biased rule fails both runs. */
static void check_exact(const chain *target, const chain *draft, const shape *sh, rule rl, const char *label) {
  fit f = run_config(target, draft, sh, rl, n_samples(), label);
  assert_int_equal(f.forbidden, 0);
  if (f.p <= 1e-3) {
    printf("[ rerun    ] p %.4g <= 0.001: once more with fresh draws\n", f.p);
    f = run_config(target, draft, sh, rl, n_samples(), label);
  }
  assert_int_equal(f.forbidden, 0);
  assert_true(f.p > 1e-3);
}

static void test_speculative_generation_matches_the_target_joint(void **state) {
  static chain target, draft;
  for (size_t vi = 0; vi < sizeof variants / sizeof variants[0]; vi++) {
    chain_make(&target, 2.5f, variants[vi].target);
    chain_make(&draft, 2.5f, variants[vi].draft);
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
      check_exact(&target, &draft, &shapes[si], RULE_EXACT, variants[vi].name);
  }
}

static void test_draft_equal_to_target_accepts_every_first_child(void **state) {
  /* r = q at every node: acceptance is certain (beta = 0), so every step accepts the first
   * child all the way down, and the output is still the target's joint. */
  static chain target;
  chain_make(&target, 2.5f, (canopy_sampling_params){0.8f, 6, 1, 0});
  sim s = {&target, &target, &shapes[0], RULE_EXACT, {{0}}, 0, 0};
  cn_rng_seed(&s.rng, cn_test_rand(&seed));
  for (int i = 0; i < 20000; i++) {
    int x[3] = {0}, len = (int)(cn_test_rand(&seed) % 3);
    for (int j = 0; j < len; j++)
      x[j] = draw_iid(target.row[row_of(j, j >= 2 ? x[j - 2] : 0, j ? x[j - 1] : 0)], &s.rng);
    int32_t out[CN_TREE_MAX_NODES + 1];
    assert_int_equal(spec_step(&s, len, x, out), 4); /* depth 3 accepted + the bonus */
  }
  check_exact(&target, &target, &shapes[1], RULE_EXACT, "draft = target");
}

static void test_a_one_hot_target_is_followed_exactly(void **state) {
  /* Temperature-0-like target (top-k 1): stochastic acceptance must emit its argmax chain. */
  static chain target, draft;
  chain_make(&target, 2.5f, (canopy_sampling_params){1, 1, 1, 0});
  chain_make(&draft, 2.5f, (canopy_sampling_params){1, 0, 1, 0});
  fit f = run_config(&target, &draft, &shapes[0], RULE_EXACT, 20000, "one-hot target");
  assert_int_equal(f.forbidden, 0);
  assert_int_equal(f.df, 0);
}

static void test_children_drawn_with_replacement_stay_exact_because_repeats_are_skipped(void **state) {
  /* A repeat of a rejected sibling has no mass left in q and is skipped; a draw that is not a
   * repeat is distributed as a draw without replacement. So i.i.d. children are exact too. */
  static chain target, draft;
  chain_make(&target, 2.5f, (canopy_sampling_params){1, 0, 1, 0});
  chain_make(&draft, 2.5f, (canopy_sampling_params){1, 0, 1, 0});
  check_exact(&target, &draft, &shapes[1], RULE_WITH_REPLACEMENT, "T=1");
}

typedef struct lazy_rows {
  const float *tp;
  int asked[CN_TREE_MAX_NODES], n_asked, fail_at;
} lazy_rows;

static int lazy_row(void *ctx, int node, const float **row) {
  lazy_rows *l = ctx;
  l->asked[l->n_asked++] = node;
  if (node == l->fail_at) return CANOPY_ERR_CANCELLED;
  *row = l->tp + node * V;
  return CANOPY_OK;
}

static void test_lazy_rows_give_the_same_draws_and_ask_only_for_the_path(void **state) {
  static chain target, draft;
  chain_make(&target, 2.5f, (canopy_sampling_params){1, 0, 1, 0});
  chain_make(&draft, 2.5f, (canopy_sampling_params){1, 0, 1, 0});
  sim s = {&target, &draft, &shapes[2], RULE_EXACT, {{0}}, 0, 0};
  cn_rng_seed(&s.rng, cn_test_rand(&seed));
  static float tp[CN_TREE_MAX_NODES * V];
  for (int trial = 0; trial < 5000; trial++) {
    int x[3] = {0}, len = (int)(cn_test_rand(&seed) % 3);
    for (int j = 0; j < len; j++)
      x[j] = (int)(cn_test_rand(&seed) % V);
    cn_tree t;
    const float *dp[CN_TREE_MAX_NODES];
    float scratch[2 * V];
    build_tree(&s, len, x, &t, tp, dp);
    cn_rng start = s.rng, a = start, b = start;
    int32_t acc_a[CN_TREE_MAX_NODES], acc_b[CN_TREE_MAX_NODES], bonus_a, bonus_b;
    int n_a, n_b;
    lazy_rows l = {tp, {0}, 0, -1};
    assert_int_equal(cn_accept_stochastic(&t, tp, dp, V, &a, scratch, acc_a, &n_a, &bonus_a), CANOPY_OK);
    assert_int_equal(cn_accept_stochastic_lazy(&t, lazy_row, &l, dp, V, &b, scratch, acc_b, &n_b, &bonus_b), CANOPY_OK);
    assert_int_equal(n_a, n_b);
    assert_int_equal(bonus_a, bonus_b);
    assert_memory_equal(&a, &b, sizeof a);
    assert_int_equal(l.n_asked, n_a + 1);
    assert_int_equal(l.asked[0], 0);
    for (int j = 0; j < n_a; j++) {
      assert_int_equal(acc_a[j], acc_b[j]);
      assert_int_equal(l.asked[j + 1], acc_a[j]);
    }
    s.rng = a;
    if (n_a > 0) { /* the same walk with a callback failing on its last row: the status comes back as is */
      lazy_rows f = {tp, {0}, 0, acc_a[n_a - 1]};
      b = start;
      assert_int_equal(cn_accept_stochastic_lazy(&t, lazy_row, &f, dp, V, &b, scratch, acc_b, &n_b, &bonus_b),
                       CANOPY_ERR_CANCELLED);
      assert_int_equal(f.n_asked, n_a + 1);
    }
  }
}

static void test_wrong_rules_fail_the_same_chi_square(void **state) {
  static chain target, draft;
  chain_make(&target, 2.5f, (canopy_sampling_params){1, 0, 1, 0});
  chain_make(&draft, 2.5f, (canopy_sampling_params){1, 0, 1, 0});
  check_exact(&target, &draft, &shapes[1], RULE_REFERENCE, "T=1");
  rule wrong[] = {RULE_NO_RESIDUAL, RULE_Q_KEPT, RULE_BONUS_FROM_P};
  for (size_t i = 0; i < sizeof wrong / sizeof wrong[0]; i++) {
    fit f = run_config(&target, &draft, &shapes[1], wrong[i], n_samples(), "T=1 (must fail)");
    assert_true(f.p < 1e-3);
  }
}

int main(void) {
  seed = cn_test_seed("test_accept");
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_chi2_survival_matches_known_quantiles),
      cmocka_unit_test(test_greedy_follows_the_argmax_path_and_stops_at_the_first_miss),
      cmocka_unit_test(test_greedy_ties_take_the_first_index),
      cmocka_unit_test(test_greedy_chain_all_accepted_takes_the_bonus_from_the_last_node),
      cmocka_unit_test(test_array_walk_matches_the_tree_walk_on_random_trees),
      cmocka_unit_test(test_malformed_input_is_an_error),
      cmocka_unit_test(test_children_sample_distinct_positive_min_of_k_and_support),
      cmocka_unit_test(test_children_sample_first_and_second_draws_follow_q_without_replacement),
      cmocka_unit_test(test_large_vocabularies_draw_exactly_across_blocks),
      cmocka_unit_test(test_speculative_generation_matches_the_target_joint),
      cmocka_unit_test(test_draft_equal_to_target_accepts_every_first_child),
      cmocka_unit_test(test_a_one_hot_target_is_followed_exactly),
      cmocka_unit_test(test_children_drawn_with_replacement_stay_exact_because_repeats_are_skipped),
      cmocka_unit_test(test_lazy_rows_give_the_same_draws_and_ask_only_for_the_path),
      cmocka_unit_test(test_wrong_rules_fail_the_same_chi_square),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
