/* What shape of token tree to draft: a fixed shape (a chain, per-depth branching, or a list of
 * rank paths as Medusa and Sequoia write them) or a budget for a dynamic, probability-ranked tree
 * (EAGLE-2). Parsing validates everything the grower and the engine rely on, so a spec that
 * parses always grows a tree within draft/tree.h's limits.
 *
 * Accepted text (cn_tree_spec_parse):
 *   chain:K                       one path of depth K (K >= 1)
 *   static:4,2,2,1                the root gets 4 children, each of those 2, and so on;
 *                                 depth = number of entries, every entry >= 1
 *   dynamic:N[,depth=D][,topk=K]  EAGLE-2: N drafted nodes kept out of a tree grown D levels deep,
 *                                 expanding the K best nodes per level by K children each
 *                                 (defaults D = 6, K = 8)
 *   [[0],[1],[0,0],...]           inline JSON: each path names a node by its child ranks from the
 *                                 root (rank r = the picker's r-th choice); every prefix of a path
 *                                 must be listed too. {"paths": [...], ...} is accepted as well
 *                                 (other keys are metadata and ignored)
 *   anything else                 a file holding either JSON form */
#ifndef CANOPY_DRAFT_TREE_SPEC_H
#define CANOPY_DRAFT_TREE_SPEC_H

#include <stdint.h>

#include "draft/tree.h"

#define CN_TREE_DEFAULT_DEPTH 6
#define CN_TREE_DEFAULT_TOPK 8
/* Dynamic trees propose topk children per expanded node; the bound keeps one level's candidates
 * (at most topk * topk) small enough to rank on the stack. */
#define CN_TREE_MAX_TOPK 32
/* A static node may ask for its parent's pick of this rank at most (so a node's picks fit in a
 * tree's worth of tokens). */
#define CN_TREE_MAX_RANK (CN_TREE_MAX_NODES - 2)

typedef enum cn_tree_kind {
  CN_TREE_STATIC = 0,  /* a fixed shape: chain, static or JSON paths */
  CN_TREE_DYNAMIC = 1, /* EAGLE-2: the shape follows the draft's probabilities */
} cn_tree_kind;

typedef struct cn_tree_spec {
  cn_tree_kind kind;
  int n_nodes; /* drafted nodes, the root excluded: the shape's size, or dynamic's budget N */
  int depth;   /* the deepest drafted node: the shape's depth, or dynamic's D */
  int topk;    /* dynamic: nodes expanded per level, and children proposed by each; static: 0 */
  /* Static: some node is listed without all of its lower-ranked siblings (e.g. [[0],[2]]). Fine
   * for greedy acceptance, not for stochastic (see cn_tree_spec_exact_for_sampling). */
  int rank_gaps;

  /* The static shape, canonical BFS order: node 0 is the root, nodes 1..n_nodes sorted by depth,
   * then by parent, then by rank (so siblings are consecutive and in rank order). Unused for
   * dynamic specs. */
  int32_t parent[CN_TREE_MAX_NODES];      /* -1 for the root */
  int32_t rank[CN_TREE_MAX_NODES];        /* which of the parent's picks: 0 = the picker's first */
  int32_t node_depth[CN_TREE_MAX_NODES];  /* 0 for the root */
  int32_t first_child[CN_TREE_MAX_NODES]; /* -1 if none */
  int32_t n_children[CN_TREE_MAX_NODES];
} cn_tree_spec;

/* Parses a spec (see the top of this file). Errors name the problem in one line:
 * CANOPY_ERR_INVALID_ARG for an empty spec, an unknown kind, a budget or branching of 0, a shape
 * over CN_TREE_MAX_NODES - 1 nodes or CN_TREE_MAX_DEPTH levels, bad JSON (with the byte offset),
 * a negative or fractional rank, a duplicated path, a path whose prefix is not listed;
 * CANOPY_ERR_IO naming the file when a spec file cannot be read. */
int cn_tree_spec_parse(const char *text, cn_tree_spec *out);

/* Writes a static spec as {"paths": [[0], [1], [0, 0], ...]} (canonical BFS order), which
 * cn_tree_spec_parse reads back to the same spec. A dynamic spec has no fixed shape to write:
 * CANOPY_ERR_INVALID_ARG. CANOPY_ERR_IO naming the file if it cannot be written. */
int cn_tree_spec_write_json(const cn_tree_spec *s, const char *path);

/* What a spec can cost, for the engine to size buffers and check the context up front. */
typedef struct cn_tree_spec_bounds {
  int n_nodes;      /* most drafted nodes in a grown tree, the root excluded */
  int depth;        /* the deepest drafted node: ctx_len + depth must fit in the context */
  int oracle_nodes; /* most nodes (root included) of the tree an oracle call sees */
  int max_frontier; /* most frontier nodes in one oracle call: the draft forward's batch */
  int oracle_calls; /* most oracle calls (draft forwards) per grown tree */
} cn_tree_spec_bounds;

cn_tree_spec_bounds cn_tree_spec_get_bounds(const cn_tree_spec *s);

/* Whether trees grown from this spec with a sampling picker meet spec/accept.h's drafting
 * contract for exact stochastic acceptance: each node keeps a prefix of its draws, chosen without
 * looking at their values. True for static specs without rank_gaps, and for dynamic specs grown
 * with cn_grow_params.sampled (draft/tree_grow.h fixes each node's child count before drawing).
 * Rank gaps skip draws: fine for greedy acceptance only. */
int cn_tree_spec_exact_for_sampling(const cn_tree_spec *s);

#endif
