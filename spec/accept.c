/* Acceptance of a verified token tree: greedy, and multi-draft speculative sampling without
 * replacement over a cn_tree. The sampled walk and its numerics (and why it is exact) are in
 * kernels/cpu/tree_sampled.c, which the chained step runs where the logits are; here the tree is
 * checked and the random stream becomes the uniforms each decision takes. */
#include "spec/accept.h"

#include <stddef.h>
#include <string.h>

#include "common/error.h"
#include "kernels/cpu/ops.h"

int cn_draft_children_draw(const float *q, int vocab, int k, const double *u, int32_t *out_tokens, float *scratch) {
  if (!q || !u || !out_tokens || !scratch || vocab <= 0 || k < 0)
    return cn_error(CANOPY_ERR_INVALID_ARG, "draft children: NULL argument, vocab %d or k %d", vocab, k);
  return cn_cpu_draw_distinct(q, vocab, k, u, out_tokens, scratch);
}

int cn_draft_children_sample(const float *q, int vocab, int k, cn_rng *rng, int32_t *out_tokens, float *scratch) {
  if (!rng || k < 0 || k > CN_TREE_MAX_NODES)
    return cn_error(CANOPY_ERR_INVALID_ARG, "draft children: NULL rng or k %d outside 0..%d", k, CN_TREE_MAX_NODES);
  double u[CN_TREE_MAX_NODES];
  for (int j = 0; j < k; j++) u[j] = cn_rng_uniform(rng);
  return cn_draft_children_draw(q, vocab, k, u, out_tokens, scratch);
}

/* The tree invariants the walks rely on: children consecutive, after their parent, in range. */
static int check_tree(const cn_tree *t, int vocab, const char *who) {
  if (t->n < 1 || t->n > CN_TREE_MAX_NODES) return cn_error(CANOPY_ERR_INVALID_ARG, "%s: tree of %d nodes", who, t->n);
  for (int u = 0; u < t->n; u++) {
    int f = t->first_child[u], k = t->n_children[u];
    if (k == 0) continue;
    if (k < 0 || f <= u || f + k > t->n)
      return cn_error(CANOPY_ERR_INVALID_ARG, "%s: node %d has children [%d, %d) outside the tree", who, u, f, f + k);
    for (int c = f; c < f + k; c++)
      if (t->parent[c] != u || t->token[c] < 0 || t->token[c] >= vocab)
        return cn_error(CANOPY_ERR_INVALID_ARG, "%s: node %d (token %d, parent %d) is not a valid child of %d", who, c,
                        t->token[c], t->parent[c], u);
  }
  return CANOPY_OK;
}

/* Node u's target top token: from its logits row, or given. */
typedef struct greedy_src {
  const float *logits;
  const int32_t *top;
  int vocab;
} greedy_src;

static int32_t top_of(const greedy_src *g, int u) {
  return g->top ? g->top[u] : cn_cpu_argmax(g->logits + (size_t)u * g->vocab, g->vocab);
}

static int greedy_walk(const cn_tree *t, const greedy_src *g, int32_t *accepted, int *n_accepted, int32_t *bonus) {
  if (!t || !(g->logits || g->top) || !accepted || !n_accepted || !bonus || g->vocab <= 0)
    return cn_error(CANOPY_ERR_INVALID_ARG, "accept greedy: NULL argument or vocab %d <= 0", g->vocab);
  int rc = check_tree(t, g->vocab, "accept greedy");
  if (rc) return rc;
  int u = 0, n = 0;
  for (;;) {
    int32_t want = top_of(g, u), next = -1;
    for (int c = t->first_child[u]; c >= 0 && c < t->first_child[u] + t->n_children[u]; c++)
      if (t->token[c] == want) {
        next = c;
        break;
      }
    if (next < 0) {
      *bonus = want;
      break;
    }
    accepted[n++] = next;
    u = next;
  }
  *n_accepted = n;
  return CANOPY_OK;
}

int cn_accept_greedy(const cn_tree *t, const float *target_logits, int vocab, int32_t *accepted, int *n_accepted,
                     int32_t *bonus) {
  greedy_src g = {.logits = target_logits, .vocab = vocab};
  return greedy_walk(t, &g, accepted, n_accepted, bonus);
}

int cn_accept_greedy_top(const cn_tree *t, const int32_t *target_top, int vocab, int32_t *accepted, int *n_accepted,
                         int32_t *bonus) {
  greedy_src g = {.top = target_top, .vocab = vocab};
  return greedy_walk(t, &g, accepted, n_accepted, bonus);
}

int cn_accept_stochastic_u(const cn_tree *t, cn_target_row_fn target_row, void *ctx, const float *const *draft_probs,
                           int vocab, const double *u, float *scratch, int32_t *accepted, int *n_accepted,
                           int32_t *bonus) {
  if (!t || !target_row || !u || !scratch || !accepted || !n_accepted || !bonus || vocab <= 0)
    return cn_error(CANOPY_ERR_INVALID_ARG, "accept stochastic: NULL argument or vocab %d <= 0", vocab);
  int rc = check_tree(t, vocab, "accept stochastic");
  if (rc) return rc;
  const float *q_of[CN_TREE_MAX_NODES];
  for (int v = 0; v < t->n; v++) {
    q_of[v] = draft_probs ? draft_probs[v] : NULL;
    if (t->n_children[v] > 0 && !q_of[v])
      return cn_error(CANOPY_ERR_INVALID_ARG, "accept stochastic: node %d has children but no draft distribution", v);
  }
  return cn_cpu_accept_sampled_walk(t->token, t->parent, t->n, vocab, target_row, ctx, q_of, u, scratch, accepted,
                                    n_accepted, bonus);
}

int cn_accept_stochastic_lazy(const cn_tree *t, cn_target_row_fn target_row, void *ctx, const float *const *draft_probs,
                              int vocab, cn_rng *rng, float *scratch, int32_t *accepted, int *n_accepted,
                              int32_t *bonus) {
  if (!t || !rng || t->n < 1 || t->n > CN_TREE_MAX_NODES)
    return cn_error(CANOPY_ERR_INVALID_ARG, "accept stochastic: NULL argument or a tree of %d nodes", t ? t->n : 0);
  double u[2 * CN_TREE_MAX_NODES];
  cn_accept_uniforms(rng, t->n, u);
  return cn_accept_stochastic_u(t, target_row, ctx, draft_probs, vocab, u, scratch, accepted, n_accepted, bonus);
}

void cn_accept_uniforms(cn_rng *rng, int n, double *u) {
  for (int i = 0; i < 2 * n; i++) u[i] = cn_rng_uniform(rng);
}

typedef struct rows {
  const float *p; /* [n][vocab] */
  int vocab;
} rows;

static int row_of_array(void *ctx, int node, const float **row) {
  const rows *r = ctx;
  *row = r->p + (size_t)node * r->vocab;
  return CANOPY_OK;
}

int cn_accept_stochastic(const cn_tree *t, const float *target_probs, const float *const *draft_probs, int vocab,
                         cn_rng *rng, float *scratch, int32_t *accepted, int *n_accepted, int32_t *bonus) {
  if (!target_probs) return cn_error(CANOPY_ERR_INVALID_ARG, "accept stochastic: NULL target_probs");
  rows r = {target_probs, vocab};
  return cn_accept_stochastic_lazy(t, row_of_array, &r, draft_probs, vocab, rng, scratch, accepted, n_accepted, bonus);
}
