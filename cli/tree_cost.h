/* What a speculative step costs, for canopy tree-opt --costs: Sequoia's hardware-aware choice of
 * tree (Chen et al. 2024, section 3.2). The expected accepted length grows with a tree's size and
 * depth (cli/tree_opt.h); its price is the draft forwards that grow it and the verification that
 * checks it, and where those are launch-bound (a small model on a GPU) or compute-bound (the CPU)
 * decides which tree is fastest, so the price comes from measured forward times (canopy bench
 * costs) rather than from a node budget. Header-only so that the tests can call it.
 *
 * The model of one step of tree r (n drafted nodes, depth D, mean accepted length E):
 *   draft(E)                      the catch-up: the draft feeds the last step's accepted tokens
 *                                 and bonus (E of them on average), its last row giving level 1;
 *   + sum_{l=1}^{D-1} draft(w_l)  one forward a level, over the level's nodes that have children
 *                                 (spec/speculate.c: level_nodes);
 *   + target(n + 1)               the verification of the root and the n nodes;
 *   + overhead                    anything else a step pays (acceptance, commit): 0, given, or
 *                                 fitted to measured steps (cli_tree_step_residual).
 * The target alone pays target(1) a token. draft(x) and target(x) interpolate the measured points
 * linearly. */
#ifndef CANOPY_CLI_TREE_COST_H
#define CANOPY_CLI_TREE_COST_H

#include "cli/tree_opt.h"

#define CLI_TREE_COST_MAX_POINTS 64

/* Forward times at measured sizes, nodes strictly ascending. */
typedef struct cli_tree_cost_curve {
  int n;
  int nodes[CLI_TREE_COST_MAX_POINTS];
  double ms[CLI_TREE_COST_MAX_POINTS];
} cli_tree_cost_curve;

typedef struct cli_tree_costs {
  cli_tree_cost_curve target; /* the target over n tree nodes (1: a decode step) */
  cli_tree_cost_curve draft;  /* the draft over n rows */
  double overhead_ms;         /* added to every speculative step */
} cli_tree_costs;

/* The curve at x: linear between the points around it, past either end along the end segment
 * (flat for a single point), never below 0. */
static inline double cli_tree_cost_at(const cli_tree_cost_curve *c, double x) {
  if (c->n <= 0) return 0.0;
  if (c->n == 1) return c->ms[0];
  int i = 0;
  while (i < c->n - 2 && x > c->nodes[i + 1]) i++;
  double x0 = c->nodes[i], x1 = c->nodes[i + 1], y0 = c->ms[i], y1 = c->ms[i + 1];
  double y = y0 + (y1 - y0) * (x - x0) / (x1 - x0);
  return y < 0 ? 0 : y;
}

/* Each level's drafting rows of tree r: rows[l] (l = 1 .. r->depth - 1) counts the nodes at depth
 * l that have children. */
static inline void cli_tree_cost_level_rows(const cli_tree_opt_result *r, int *rows) {
  char has_child[CLI_TREE_OPT_MAX_NODES + 1] = {0};
  for (int i = 1; i <= r->n_nodes; i++) has_child[r->parent[i]] = 1;
  for (int l = 0; l <= CLI_TREE_OPT_MAX_DEPTH; l++) rows[l] = 0;
  for (int i = 1; i <= r->n_nodes; i++)
    if (has_child[i]) rows[r->node_depth[i]]++;
}

/* The step's time in ms under the model above; mean_len is E. */
static inline double cli_tree_step_ms(const cli_tree_costs *c, const cli_tree_opt_result *r, double mean_len) {
  int rows[CLI_TREE_OPT_MAX_DEPTH + 1];
  cli_tree_cost_level_rows(r, rows);
  double ms = cli_tree_cost_at(&c->draft, mean_len) + cli_tree_cost_at(&c->target, r->n_nodes + 1) + c->overhead_ms;
  for (int l = 1; l < r->depth; l++) ms += cli_tree_cost_at(&c->draft, rows[l]);
  return ms;
}

/* Tokens a step yields per unit of time, against the target alone's one per target(1). */
static inline double cli_tree_speedup(const cli_tree_costs *c, const cli_tree_opt_result *r) {
  double ms = cli_tree_step_ms(c, r, r->value);
  return ms > 0 ? r->value / ms * cli_tree_cost_at(&c->target, 1) : 0; /* a fitted overhead can be < 0 */
}

/* What a measured step of tree r (r->value its measured mean accepted length) paid beyond the
 * model's forwards: the step that the measured speedup implies, E / speedup x target(1), less the
 * model's step without c's overhead. */
static inline double cli_tree_step_residual(const cli_tree_costs *c, const cli_tree_opt_result *r, double speedup) {
  double forwards = cli_tree_step_ms(c, r, r->value) - c->overhead_ms;
  return r->value / speedup * cli_tree_cost_at(&c->target, 1) - forwards;
}

/* One size's fastest tree, as cli_tree_cost_search reports it. */
typedef struct cli_tree_cost_row {
  int depth;
  double mean_len, step_ms, speedup;
} cli_tree_cost_row;

/* The fastest tree of at most dp->N drafted nodes and dp->D levels under the costs, into best;
 * per_size (if not NULL, [dp->N + 1]) gets every size n's fastest tree at per_size[n]. Returns
 * best's predicted speedup over the target alone, or -1 without memory. */
static inline double cli_tree_cost_search(const cli_tree_opt_dp *dp, const cli_tree_costs *c,
                                          cli_tree_opt_result *best, cli_tree_cost_row *per_size) {
  double best_speedup = -1;
  cli_tree_opt_result *r = malloc(sizeof *r);
  if (!r) return -1;
  for (int n = 1; n <= dp->N; n++) {
    cli_tree_cost_row row = {.speedup = -1};
    for (int d = 1; d <= dp->D && d <= n; d++) {
      /* A deeper bound that adds nothing builds an equal tree: no cheaper, so skip it. */
      if (d > 1 && cli_tree_opt_value(dp, n, d) <= cli_tree_opt_value(dp, n, d - 1) + 1e-12) continue;
      cli_tree_opt_tree(dp, n, d, r);
      double ms = cli_tree_step_ms(c, r, r->value), s = cli_tree_speedup(c, r);
      if (s > row.speedup) row = (cli_tree_cost_row){r->depth, r->value, ms, s};
      if (s > best_speedup + 1e-12) {
        best_speedup = s;
        *best = *r;
      }
    }
    if (per_size) per_size[n] = row;
  }
  free(r);
  return best_speedup;
}

#endif
