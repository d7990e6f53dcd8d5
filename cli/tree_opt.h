/* Sequoia's tree dynamic program (Chen et al. 2024, "Sequoia: Scalable, Robust, and
 * Hardware-aware Speculative Decoding", section 3.1), header-only so that the tests can call it
 * without the CLI.
 *
 * The model (positional acceptance): p[k] (k = 0, 1, ...) is the probability that a node's
 * child of rank k (the draft's (k+1)-th choice) is accepted given that its parent was accepted
 * and its children of ranks 0..k-1 were rejected. So the child of rank k is the accepted one with
 * probability q_k = p[k] * prod_{j<k} (1 - p[j]), and a node is on the accepted path with the
 * product of q over the ranks of its path. The expected number of tokens a step produces is
 * 1 (the bonus token) + the sum of that over the drafted nodes.
 *
 * cli_tree_opt_solve finds a tree of exactly n_nodes drafted nodes (root excluded), depth at most
 * max_depth, whose children always take ranks 0, 1, ..., k-1 (no rank gaps, so the tree is also
 * exact for stochastic acceptance), maximizing that expectation. With
 *   T[d][n] = best sum for a subtree of n nodes (its root included) at most d levels deep,
 *   G_d(m, k) = best sum for m nodes spread over children of ranks k, k+1, ... (each with a
 *               subtree at most d - 1 deep) = max_s q_k (1 + T[d-1][s]) + G_d(m - s, k + 1),
 * T[d][n] = G_d(n - 1, 0). O(max_depth * n_nodes^3 / 6) time. */
#ifndef CANOPY_CLI_TREE_OPT_H
#define CANOPY_CLI_TREE_OPT_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CLI_TREE_OPT_MAX_NODES 255 /* drafted nodes: draft/tree.h's CN_TREE_MAX_NODES - 1 */
#define CLI_TREE_OPT_MAX_DEPTH 32  /* draft/tree.h's CN_TREE_MAX_DEPTH */

typedef struct cli_tree_opt_result {
  int n_nodes;   /* drafted nodes (root excluded) */
  int depth;     /* the deepest node */
  double value;  /* predicted mean accepted length: 1 + expected accepted drafted nodes */
  /* Nodes 1..n_nodes (0 is the root) in depth-first order: a parent comes before its children,
   * siblings in rank order. */
  int32_t parent[CLI_TREE_OPT_MAX_NODES + 1];
  int32_t rank[CLI_TREE_OPT_MAX_NODES + 1];
  int32_t node_depth[CLI_TREE_OPT_MAX_NODES + 1];
} cli_tree_opt_result;

/* q_k from the positional vector p (p[k] for k >= n_p is 0). */
static inline double cli_tree_opt_q(const double *p, int n_p, int k) {
  double rejected = 1.0;
  for (int j = 0; j < k && j < n_p; j++)
    rejected *= 1.0 - p[j];
  return k < n_p ? p[k] * rejected : 0.0;
}

/* The expected accepted length (bonus included) of any tree given as parents and ranks (node 0 =
 * root, parent[i] < i): the reference the DP is tested against. */
static inline double cli_tree_opt_eval(const double *p, int n_p, int n, const int32_t *parent,
                                       const int32_t *rank) {
  double reach[CLI_TREE_OPT_MAX_NODES + 1], sum = 1.0;
  reach[0] = 1.0;
  for (int i = 1; i <= n; i++) {
    reach[i] = reach[parent[i]] * cli_tree_opt_q(p, n_p, rank[i]);
    sum += reach[i];
  }
  return sum;
}

typedef struct cli_tree_opt_dp {
  int N, D;
  double *q;      /* [N] */
  double *T;      /* [(D + 1) * (N + 2)]: T[d][n], n = 1..N + 1; -1 = infeasible */
  int16_t *pick;  /* [(D + 1) * (N + 1) * (N + 1)]: the s chosen for G_d(m, k) (0: m = 0) */
} cli_tree_opt_dp;

#define CLI_TREE_OPT_T(dp, d, n) ((dp)->T[(size_t)(d) * ((dp)->N + 2) + (n)])
#define CLI_TREE_OPT_PICK(dp, d, m, k) \
  ((dp)->pick[((size_t)(d) * ((dp)->N + 1) + (m)) * ((dp)->N + 1) + (k)])

/* Emits the subtree of `n` nodes (root = node `self`, already emitted) at most `d` levels deep. */
static inline void cli_tree_opt_build(const cli_tree_opt_dp *dp, int d, int n, int self,
                                      cli_tree_opt_result *r) {
  int m = n - 1, k = 0;
  while (m > 0) {
    int s = CLI_TREE_OPT_PICK(dp, d, m, k);
    int child = ++r->n_nodes;
    r->parent[child] = self;
    r->rank[child] = k;
    r->node_depth[child] = r->node_depth[self] + 1;
    if (r->node_depth[child] > r->depth) r->depth = r->node_depth[child];
    cli_tree_opt_build(dp, d - 1, s, child, r);
    m -= s;
    k++;
  }
}

/* Fills dp with T[d][n] for every d <= max_depth and n <= n_nodes + 1 (and the picks that build
 * each optimum), so that the best tree of any size and depth bound up to those can be read off
 * one run: cli_tree_opt_value and cli_tree_opt_tree. Returns 0, or -1 for bad arguments (n_nodes
 * outside 1..CLI_TREE_OPT_MAX_NODES, max_depth outside 1..CLI_TREE_OPT_MAX_DEPTH, a p outside
 * [0, 1]) or no memory; free with cli_tree_opt_dp_free either way. */
static inline int cli_tree_opt_dp_fill(const double *p, int n_p, int n_nodes, int max_depth, cli_tree_opt_dp *dp) {
  memset(dp, 0, sizeof *dp);
  if (n_nodes < 1 || n_nodes > CLI_TREE_OPT_MAX_NODES || max_depth < 1 ||
      max_depth > CLI_TREE_OPT_MAX_DEPTH || n_p < 0 || (n_p > 0 && !p))
    return -1;
  for (int k = 0; k < n_p; k++)
    if (!(p[k] >= 0.0 && p[k] <= 1.0)) return -1;
  int N = n_nodes, D = max_depth;
  dp->N = N, dp->D = D;
  dp->q = malloc(sizeof *dp->q * (size_t)N);
  dp->T = malloc(sizeof *dp->T * (size_t)(D + 1) * (size_t)(N + 2));
  dp->pick = calloc((size_t)(D + 1) * (size_t)(N + 1) * (size_t)(N + 1), sizeof *dp->pick);
  double *G = malloc(sizeof *G * (size_t)(N + 2) * (size_t)(N + 1)); /* G[k][m] for one d */
  if (!dp->q || !dp->T || !dp->pick || !G) {
    free(G);
    return -1;
  }
  for (int k = 0; k < N; k++)
    dp->q[k] = cli_tree_opt_q(p, n_p, k);
  for (int n = 1; n <= N + 1; n++)
    CLI_TREE_OPT_T(dp, 0, n) = n == 1 ? 0.0 : -1.0;
  for (int d = 1; d <= D; d++) {
    /* G[k][m] for k = N down to 0 (m + k <= N: at most N children in all). */
    for (int k = N; k >= 0; k--) {
      double *g = G + (size_t)k * (N + 1);
      g[0] = 0.0;
      for (int m = 1; m + k <= N; m++) {
        double best = -1.0;
        int best_s = 0;
        for (int s = 1; s <= m; s++) {
          double sub = CLI_TREE_OPT_T(dp, d - 1, s);
          double rest = G[(size_t)(k + 1) * (N + 1) + (m - s)];
          if (sub < 0 || rest < 0) continue;
          double v = dp->q[k] * (1.0 + sub) + rest;
          if (v > best + 1e-15) {
            best = v;
            best_s = s;
          }
        }
        g[m] = best;
        CLI_TREE_OPT_PICK(dp, d, m, k) = (int16_t)best_s;
      }
      for (int m = N - k + 1; m <= N; m++) g[m] = -1.0;
    }
    for (int n = 1; n <= N + 1; n++)
      CLI_TREE_OPT_T(dp, d, n) = G[n - 1];
  }
  free(G);
  return 0;
}

static inline void cli_tree_opt_dp_free(cli_tree_opt_dp *dp) {
  free(dp->q);
  free(dp->T);
  free(dp->pick);
  memset(dp, 0, sizeof *dp);
}

/* The best predicted mean accepted length of n drafted nodes at most d deep (n <= dp->N,
 * d <= dp->D). */
static inline double cli_tree_opt_value(const cli_tree_opt_dp *dp, int n, int d) {
  return 1.0 + CLI_TREE_OPT_T(dp, d, n + 1);
}

/* That tree. */
static inline void cli_tree_opt_tree(const cli_tree_opt_dp *dp, int n, int d, cli_tree_opt_result *out) {
  memset(out, 0, sizeof *out);
  out->parent[0] = -1;
  cli_tree_opt_build(dp, d, n + 1, 0, out);
  out->value = cli_tree_opt_value(dp, n, d);
}

/* The best tree of exactly n_nodes drafted nodes at most max_depth deep. Returns 0, or -1 as
 * cli_tree_opt_dp_fill. */
static inline int cli_tree_opt_solve(const double *p, int n_p, int n_nodes, int max_depth,
                                     cli_tree_opt_result *out) {
  cli_tree_opt_dp dp;
  if (max_depth < 1 || max_depth > CLI_TREE_OPT_MAX_DEPTH) return -1;
  /* Deeper than n_nodes adds nothing. */
  int rc = cli_tree_opt_dp_fill(p, n_p, n_nodes, max_depth < n_nodes ? max_depth : n_nodes, &dp);
  if (!rc) cli_tree_opt_tree(&dp, n_nodes, dp.D, out);
  cli_tree_opt_dp_free(&dp);
  return rc;
}

#endif
