#include "draft/tree_grow.h"

#include <math.h>
#include <string.h>

#include "common/error.h"

/* ---- the greedy picker ---------------------------------------------------------------------- */

/* Pick order: more probable first, ties to the lower id. */
static int pick_before(const float *q, int32_t a, int32_t b) { return q[a] > q[b] || (q[a] == q[b] && a < b); }

/* A heap of token ids with the worst pick at the root, so the k best are kept in one pass. */
static void heap_down(const float *q, int32_t *h, int n, int i) {
  for (;;) {
    int l = 2 * i + 1, r = l + 1, w = i;
    if (l < n && pick_before(q, h[w], h[l])) w = l;
    if (r < n && pick_before(q, h[w], h[r])) w = r;
    if (w == i) return;
    int32_t t = h[i];
    h[i] = h[w], h[w] = t, i = w;
  }
}

int cn_pick_topk(void *ctx, const float *q, int vocab, int k, int32_t *tokens) {
  if (!q || !tokens || k <= 0 || vocab <= 0) return 0;
  int n = 0;
  for (int32_t t = 0; t < vocab; t++) {
    if (!(q[t] > 0)) continue;
    if (n < k) {
      int i = n++;
      tokens[i] = t;
      for (; i > 0 && pick_before(q, tokens[(i - 1) / 2], tokens[i]); i = (i - 1) / 2) {
        int32_t p = tokens[(i - 1) / 2];
        tokens[(i - 1) / 2] = tokens[i], tokens[i] = p;
      }
    } else if (pick_before(q, t, tokens[0])) {
      tokens[0] = t;
      heap_down(q, tokens, n, 0);
    }
  }
  for (int m = n; m > 1; m--) { /* heap sort: the worst goes last, leaving the best first */
    int32_t t = tokens[0];
    tokens[0] = tokens[m - 1], tokens[m - 1] = t;
    heap_down(q, tokens, m - 1, 0);
  }
  return n;
}

/* ---- shared by both growers ----------------------------------------------------------------- */

typedef struct grower {
  int vocab;
  cn_draft_oracle oracle;
  void *ctx;
  cn_child_picker picker;
  void *picker_ctx;
  int calls;
  const float *probs[CN_TREE_MAX_NODES]; /* the current level's oracle answers, one per frontier node */
  int32_t picks[CN_TREE_MAX_NODES];      /* one node's picks, in picker order */
  float logq[CN_TREE_MAX_NODES];         /* log q of each pick, clamped to <= 0 */
} grower;

static int ask_oracle(grower *g, const cn_tree *t, const int32_t *frontier, int n, int depth) {
  int rc = g->oracle(g->ctx, t, frontier, n, g->probs);
  g->calls++;
  if (rc) return cn_error_wrap(rc, "growing the draft tree at depth %d", depth);
  for (int i = 0; i < n; i++)
    if (!g->probs[i])
      return cn_error(CANOPY_ERR_INVALID_ARG,
                      "growing the draft tree at depth %d: the oracle gave no distribution for frontier node %d", depth,
                      (int)frontier[i]);
  return CANOPY_OK;
}

/* Asks the picker for up to k children of the j-th frontier node and checks what it chose:
 * distinct tokens inside the vocabulary with a finite q > 0. Returns how many, or a status. */
static int pick_children(grower *g, int j, int k, int depth) {
  const float *q = g->probs[j];
  int n = g->picker(g->picker_ctx, q, g->vocab, k, g->picks);
  if (n < 0) return cn_error_wrap(n, "growing the draft tree at depth %d: the child picker failed", depth);
  if (n > k)
    return cn_error(CANOPY_ERR_INVALID_ARG,
                    "growing the draft tree at depth %d: the child picker chose %d tokens of %d asked", depth, n, k);
  for (int i = 0; i < n; i++) {
    int32_t t = g->picks[i];
    if (t < 0 || t >= g->vocab)
      return cn_error(CANOPY_ERR_INVALID_ARG,
                      "growing the draft tree at depth %d: picked token %d is outside the vocabulary of %d", depth,
                      (int)t, g->vocab);
    if (!(q[t] > 0) || !isfinite(q[t]))
      return cn_error(CANOPY_ERR_INVALID_ARG,
                      "growing the draft tree at depth %d: picked token %d has draft probability %g", depth, (int)t,
                      (double)q[t]);
    for (int p = 0; p < i; p++)
      if (g->picks[p] == t)
        return cn_error(CANOPY_ERR_INVALID_ARG, "growing the draft tree at depth %d: token %d picked twice", depth,
                        (int)t);
    g->logq[i] = fminf(logf(q[t]), 0.0f); /* a probability a hair over 1 must not raise a path's logp */
  }
  return n;
}

/* ---- static shapes -------------------------------------------------------------------------- */

/* Level d feeds every node of depth d that the spec gives children; the tree the oracle sees is
 * the output itself, so a spec node keeps its index unless an earlier pick ran out. */
static int grow_static(grower *g, const cn_tree_spec *s, cn_tree *out) {
  int32_t to_out[CN_TREE_MAX_NODES]; /* spec node -> out node, -1 when its pick ran out */
  int32_t frontier[CN_TREE_MAX_NODES], frontier_spec[CN_TREE_MAX_NODES];
  for (int i = 0; i <= s->n_nodes; i++)
    to_out[i] = -1;
  to_out[0] = 0;
  int lo = 0, hi = 1; /* spec nodes of the level's depth: [lo, hi) */
  for (int d = 0; d < s->depth && lo < hi; d++) {
    int nf = 0, next = hi;
    for (int i = lo; i < hi; i++) {
      next += s->n_children[i];
      if (s->n_children[i] && to_out[i] >= 0) frontier[nf] = to_out[i], frontier_spec[nf++] = i;
    }
    if (!nf) break;
    int rc = ask_oracle(g, out, frontier, nf, d);
    if (rc) return rc;
    for (int j = 0; j < nf; j++) {
      int sp = frontier_spec[j], c0 = s->first_child[sp], nc = s->n_children[sp];
      int n = pick_children(g, j, s->rank[c0 + nc - 1] + 1, d); /* siblings are in rank order */
      if (n < 0) return n;
      for (int c = c0; c < c0 + nc && s->rank[c] < n; c++) {
        int r = s->rank[c];
        to_out[c] = cn_tree_add(out, frontier[j], g->picks[r], out->logp[frontier[j]] + g->logq[r]);
        if (to_out[c] < 0) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_tree_grow: the spec overflows a tree");
      }
    }
    lo = hi, hi = next;
  }
  return CANOPY_OK;
}

/* ---- dynamic trees (EAGLE-2) ---------------------------------------------------------------- */

/* A drafted node, expanded or not. Its parent is always an expanded node, so it is named by its
 * index in the oracle's tree, which never renumbers. */
typedef struct cand {
  float logp;  /* cumulative draft log-probability */
  float score; /* what ranks it: logp, lowered to its previous sibling's score if that is lower */
  int32_t token;
  int32_t parent; /* in the oracle's tree */
  int32_t pick;   /* position in the parent's picks */
  int32_t depth;
  int32_t fed; /* its own index in the oracle's tree, -1 until expanded */
} cand;

/* The one total order behind every choice: higher score first; on ties the shallower node, then
 * the lower (parent, pick), which at equal depth is the candidate tree's BFS order, so the result
 * does not depend on the order candidates were made in. A parent precedes its children (score
 * never increases along a path) and a pick precedes its later siblings (the score takes the
 * running minimum over picks), so every prefix of this order is a tree closed under ancestors
 * whose nodes' children are first picks; the running minimum is a no-op for the greedy picker,
 * whose picks come in descending q. */
static int cand_before(const cand *a, const cand *b) {
  if (a->score != b->score) return a->score > b->score;
  if (a->depth != b->depth) return a->depth < b->depth;
  if (a->parent != b->parent) return a->parent < b->parent;
  return a->pick < b->pick;
}

/* Inserts into the best-first list of at most cap nodes, dropping the worst when full. */
static void keep_best(cand *best, int *n, int cap, const cand *c) {
  if (*n == cap && !cand_before(c, &best[cap - 1])) return;
  int i = *n < cap ? (*n)++ : cap - 1;
  for (; i > 0 && cand_before(c, &best[i - 1]); i--)
    best[i] = best[i - 1];
  best[i] = *c;
}

static int bfs_before(const cand *a, const cand *b) {
  if (a->depth != b->depth) return a->depth < b->depth;
  return a->parent != b->parent ? a->parent < b->parent : a->pick < b->pick;
}

/* EAGLE-2 with one exact shortcut: the kept set is a prefix of a fixed order, so a node outside
 * the best N of the candidates made so far can never be kept, nor can anything below it. We keep
 * only those best N while growing and expand, at each depth, the topk best nodes of that depth
 * among them. The nodes this skips are exactly those of the paper's top-k whose subtrees could
 * not survive reranking: the final tree is the same, with fewer draft nodes fed, and it stops
 * early when a level has nothing worth expanding. */
static int grow_dynamic(grower *g, const cn_tree_spec *s, int32_t root_token, cn_tree *out, int32_t *oracle_index) {
  const int N = s->n_nodes, K = s->topk, D = s->depth;
  cn_tree fed;                        /* the oracle's tree: the root and every expanded node */
  float fed_score[CN_TREE_MAX_NODES]; /* score of each node of `fed` */
  cand best[CN_TREE_MAX_NODES];       /* the best N drafted nodes so far, best first */
  int32_t frontier[CN_TREE_MAX_NODES], sel[CN_TREE_MAX_TOPK];
  int n_best = 0, nf = 1;
  cn_tree_reset(&fed, root_token);
  fed_score[0] = 0;
  frontier[0] = 0;
  for (int d = 0; d < D && nf; d++) {
    int rc = ask_oracle(g, &fed, frontier, nf, d);
    if (rc) return rc;
    for (int j = 0; j < nf; j++) {
      int f = frontier[j], n = pick_children(g, j, K, d);
      if (n < 0) return n;
      float prev = INFINITY;
      for (int r = 0; r < n; r++) {
        cand c = {.logp = fed.logp[f] + g->logq[r],
                  .score = fminf(fed_score[f] + g->logq[r], prev),
                  .token = g->picks[r],
                  .parent = f,
                  .pick = r,
                  .depth = d + 1,
                  .fed = -1};
        prev = c.score;
        keep_best(best, &n_best, N, &c);
      }
    }
    if (d + 1 == D) break;
    /* The next frontier: the best K new nodes still in the running, fed in BFS order. */
    int ns = 0;
    for (int i = 0; i < n_best && ns < K; i++)
      if (best[i].depth == d + 1) sel[ns++] = i;
    for (int i = 1; i < ns; i++)
      for (int k = i; k > 0 && bfs_before(&best[sel[k]], &best[sel[k - 1]]); k--) {
        int32_t t = sel[k];
        sel[k] = sel[k - 1], sel[k - 1] = t;
      }
    for (nf = 0; nf < ns; nf++) {
      cand *c = &best[sel[nf]];
      c->fed = cn_tree_add(&fed, c->parent, c->token, c->logp);
      if (c->fed < 0) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_tree_grow: expanded nodes overflow a tree");
      fed_score[c->fed] = c->score;
      frontier[nf] = c->fed;
    }
  }

  /* Reranking is done (the best N); renumber into BFS order, siblings in pick order. At equal
   * depth the oracle's tree orders parents as the output will, so sorting by (depth, parent in
   * `fed`, pick) is the output's BFS order. */
  for (int i = 1; i < n_best; i++)
    for (int k = i; k > 0 && bfs_before(&best[k], &best[k - 1]); k--) {
      cand t = best[k];
      best[k] = best[k - 1], best[k - 1] = t;
    }
  int32_t fed_to_out[CN_TREE_MAX_NODES];
  for (int i = 0; i < fed.n; i++)
    fed_to_out[i] = -1;
  fed_to_out[0] = 0;
  cn_tree_reset(out, root_token);
  if (oracle_index) oracle_index[0] = 0;
  for (int i = 0; i < n_best; i++) {
    const cand *c = &best[i];
    int p = fed_to_out[c->parent];
    int o = p < 0 ? -1 : cn_tree_add(out, p, c->token, c->logp);
    if (o < 0) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_tree_grow: a kept node lost its parent (internal error)");
    if (c->fed >= 0) fed_to_out[c->fed] = o;
    if (oracle_index) oracle_index[o] = c->fed;
  }
  return CANOPY_OK;
}

/* ---- entry points --------------------------------------------------------------------------- */

int cn_tree_grow_ex(const cn_tree_spec *spec, int32_t root_token, int vocab, cn_draft_oracle oracle, void *ctx,
                    cn_child_picker picker, void *picker_ctx, cn_tree *out, int *n_oracle_calls,
                    int32_t *oracle_index) {
  if (n_oracle_calls) *n_oracle_calls = 0;
  if (!spec || !oracle || !picker || !out) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_tree_grow: NULL argument");
  if (vocab < 1 || root_token < 0 || root_token >= vocab)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_tree_grow: root token %d outside the vocabulary of %d", (int)root_token,
                    vocab);
  int dynamic = spec->kind == CN_TREE_DYNAMIC;
  if (spec->n_nodes < 1 || spec->n_nodes >= CN_TREE_MAX_NODES || spec->depth < 1 || spec->depth > CN_TREE_MAX_DEPTH ||
      (dynamic && (spec->topk < 1 || spec->topk > CN_TREE_MAX_TOPK)))
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_tree_grow: not a parsed tree spec (%d nodes, depth %d, topk %d)",
                    spec->n_nodes, spec->depth, spec->topk);
  grower g = {.vocab = vocab, .oracle = oracle, .ctx = ctx, .picker = picker, .picker_ctx = picker_ctx};
  cn_tree_reset(out, root_token);
  int rc = dynamic ? grow_dynamic(&g, spec, root_token, out, oracle_index) : grow_static(&g, spec, out);
  if (!rc && !dynamic && oracle_index)
    for (int i = 0; i < out->n; i++)
      oracle_index[i] = i;
  if (n_oracle_calls) *n_oracle_calls = g.calls;
  return rc;
}

int cn_tree_grow(const cn_tree_spec *spec, int32_t root_token, int vocab, cn_draft_oracle oracle, void *ctx,
                 cn_child_picker picker, void *picker_ctx, cn_tree *out, int *n_oracle_calls) {
  return cn_tree_grow_ex(spec, root_token, vocab, oracle, ctx, picker, picker_ctx, out, n_oracle_calls, NULL);
}
