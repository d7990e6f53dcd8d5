#include "draft/tree.h"

#include <string.h>

void cn_tree_reset(cn_tree *t, int32_t root_token) {
  t->n = 1;
  t->token[0] = root_token;
  t->parent[0] = -1;
  t->depth[0] = 0;
  t->rank[0] = 0;
  t->first_child[0] = -1;
  t->n_children[0] = 0;
  t->logp[0] = 0;
}

int cn_tree_add(cn_tree *t, int parent, int32_t token, float logp) {
  if (t->n >= CN_TREE_MAX_NODES || parent < 0 || parent >= t->n) return -1;
  int i = t->n++;
  t->token[i] = token;
  t->parent[i] = parent;
  t->depth[i] = t->depth[parent] + 1;
  t->rank[i] = t->n_children[parent];
  t->first_child[i] = -1;
  t->n_children[i] = 0;
  t->logp[i] = logp;
  if (t->n_children[parent]++ == 0) t->first_child[parent] = i;
  return i;
}

void cn_tree_mask(const cn_tree *t, uint64_t *mask, int words) {
  memset(mask, 0, sizeof *mask * (size_t)t->n * (size_t)words);
  for (int i = 0; i < t->n; i++)
    for (int a = i; a >= 0; a = t->parent[a]) mask[(size_t)i * words + a / 64] |= 1ull << (a % 64);
}

int cn_tree_max_depth(const cn_tree *t) {
  int d = 0;
  for (int i = 0; i < t->n; i++) d = t->depth[i] > d ? t->depth[i] : d;
  return d;
}
