/* A token tree: what the draft proposes and the target verifies in one forward.
 * Node 0 is the root: the last token of the sequence, which neither model has fed yet. Every
 * other node is a drafted continuation of its parent. Nodes are in BFS order (parents before
 * children; a node's children are consecutive, in the order they were drafted). */
#ifndef CANOPY_DRAFT_TREE_H
#define CANOPY_DRAFT_TREE_H

#include <stdint.h>

#define CN_TREE_MAX_NODES 256
#define CN_TREE_MAX_DEPTH 32
#define CN_TREE_MASK_WORDS ((CN_TREE_MAX_NODES + 63) / 64)

typedef struct cn_tree {
  int n;                                 /* nodes, the root included */
  int32_t token[CN_TREE_MAX_NODES];
  int32_t parent[CN_TREE_MAX_NODES];     /* -1 for the root */
  int32_t depth[CN_TREE_MAX_NODES];      /* 0 for the root */
  int32_t rank[CN_TREE_MAX_NODES];       /* 0-based order among its siblings */
  int32_t first_child[CN_TREE_MAX_NODES]; /* -1 if none */
  int32_t n_children[CN_TREE_MAX_NODES];
  float logp[CN_TREE_MAX_NODES];         /* cumulative draft log-probability (root 0) */
} cn_tree;

/* Empties the tree down to its root. */
void cn_tree_reset(cn_tree *t, int32_t root_token);

/* Appends a child of `parent` (which must be the parent of the last added node or later in
 * BFS order, so siblings stay consecutive). Returns its index, or -1 if the tree is full. */
int cn_tree_add(cn_tree *t, int parent, int32_t token, float logp);

/* Writes the ancestor bitmask [n][mask_words] (bit j of row i: j is i or an ancestor of i). */
void cn_tree_mask(const cn_tree *t, uint64_t *mask, int mask_words);

int cn_tree_max_depth(const cn_tree *t);

#endif
