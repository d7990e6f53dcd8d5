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

/* ---- shared by every grower ----------------------------------------------------------------- */

/* Asks the picker for up to k children of the j-th frontier node and checks what it chose:
 * distinct tokens inside the vocabulary with a finite q > 0. Returns how many, or a status. */
static int pick_children(cn_tree_grower *g, const float *q, int k) {
  int depth = g->level, vocab = g->p.vocab;
  int n = g->p.picker(g->p.picker_ctx, q, vocab, k, g->picks);
  if (n < 0) return cn_error_wrap(n, "growing the draft tree at depth %d: the child picker failed", depth);
  if (n > k)
    return cn_error(CANOPY_ERR_INVALID_ARG,
                    "growing the draft tree at depth %d: the child picker chose %d tokens of %d asked", depth, n, k);
  for (int i = 0; i < n; i++) {
    int32_t t = g->picks[i];
    if (t < 0 || t >= vocab)
      return cn_error(CANOPY_ERR_INVALID_ARG,
                      "growing the draft tree at depth %d: picked token %d is outside the vocabulary of %d", depth,
                      (int)t, vocab);
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

static int tree_overflow(void) { return cn_error(CANOPY_ERR_INVALID_ARG, "cn_tree_grow: the nodes overflow a tree"); }

/* ---- static shapes -------------------------------------------------------------------------- */

/* Level d feeds every node of depth d that the spec gives children; the tree the oracle sees is
 * the output itself, so a spec node keeps its index unless an earlier pick ran out. */
static void static_frontier(cn_tree_grower *g) {
  const cn_tree_spec *s = g->p.spec;
  g->nf = 0;
  if (g->level >= s->depth) return;
  for (int i = g->lo; i < g->hi; i++)
    if (s->n_children[i] && g->to_out[i] >= 0) g->frontier[g->nf] = g->to_out[i], g->frontier_spec[g->nf++] = i;
}

static int static_give(cn_tree_grower *g, const float *const *probs) {
  const cn_tree_spec *s = g->p.spec;
  int next = g->hi;
  for (int i = g->lo; i < g->hi; i++)
    next += s->n_children[i];
  for (int j = 0; j < g->nf; j++) {
    int sp = g->frontier_spec[j], c0 = s->first_child[sp], nc = s->n_children[sp];
    int n = pick_children(g, probs[j], s->rank[c0 + nc - 1] + 1); /* siblings are in rank order */
    if (n < 0) return n;
    for (int c = c0; c < c0 + nc && s->rank[c] < n; c++) {
      int r = s->rank[c], f = g->frontier[j];
      g->to_out[c] = cn_tree_add(&g->t, f, g->picks[r], g->t.logp[f] + g->logq[r]);
      if (g->to_out[c] < 0) return tree_overflow();
    }
  }
  g->lo = g->hi, g->hi = next;
  g->level++;
  static_frontier(g);
  return CANOPY_OK;
}

/* ---- dynamic trees (EAGLE-2) ---------------------------------------------------------------- */

/* A candidate (cn_grow_cand) is a drafted node, expanded or not. Its parent is always an expanded
 * node, so it is named by its index in the oracle's tree, which never renumbers. score is what
 * ranks it: logp, lowered to its previous sibling's score if that is lower; fed is its own index
 * in the oracle's tree, -1 until expanded.
 *
 * The one total order behind every choice: higher score first; on ties the shallower node, then
 * the lower (parent, pick), which at equal depth is the candidate tree's BFS order, so the result
 * does not depend on the order candidates were made in. A parent precedes its children (score
 * never increases along a path) and a pick precedes its later siblings (the score takes the
 * running minimum over picks), so every prefix of this order is a tree closed under ancestors
 * whose nodes' children are first picks; the running minimum is a no-op for the greedy picker,
 * whose picks come in descending q. */
static int cand_before(const cn_grow_cand *a, const cn_grow_cand *b) {
  if (a->score != b->score) return a->score > b->score;
  if (a->depth != b->depth) return a->depth < b->depth;
  if (a->parent != b->parent) return a->parent < b->parent;
  return a->pick < b->pick;
}

/* Inserts into the best-first list of at most cap nodes, dropping the worst when full. */
static void keep_best(cn_grow_cand *best, int *n, int cap, const cn_grow_cand *c) {
  if (*n == cap && !cand_before(c, &best[cap - 1])) return;
  int i = *n < cap ? (*n)++ : cap - 1;
  for (; i > 0 && cand_before(c, &best[i - 1]); i--)
    best[i] = best[i - 1];
  best[i] = *c;
}

static int bfs_before(const cn_grow_cand *a, const cn_grow_cand *b) {
  if (a->depth != b->depth) return a->depth < b->depth;
  return a->parent != b->parent ? a->parent < b->parent : a->pick < b->pick;
}

/* EAGLE-2 with one exact shortcut: the kept set is a prefix of a fixed order, so a node outside
 * the best N of the candidates made so far can never be kept, nor can anything below it. We keep
 * only those best N while growing and expand, at each depth, the topk best nodes of that depth
 * among them. The nodes this skips are exactly those of the paper's top-k whose subtrees could
 * not survive reranking: the final tree is the same, with fewer draft nodes fed, and it stops
 * early when a level has nothing worth expanding. */
static int dynamic_give(cn_tree_grower *g, const float *const *probs) {
  const int N = g->p.spec->n_nodes, K = g->p.spec->topk, d = g->level;
  for (int j = 0; j < g->nf; j++) {
    int f = g->frontier[j], n = pick_children(g, probs[j], K);
    if (n < 0) return n;
    float prev = INFINITY;
    for (int r = 0; r < n; r++) {
      cn_grow_cand c = {.logp = g->t.logp[f] + g->logq[r],
                        .score = fminf(g->fed_score[f] + g->logq[r], prev),
                        .token = g->picks[r],
                        .parent = f,
                        .pick = r,
                        .depth = d + 1,
                        .fed = -1};
      prev = c.score;
      keep_best(g->best, &g->n_best, N, &c);
    }
  }
  g->level++;
  g->nf = 0;
  if (g->level == g->p.spec->depth) return CANOPY_OK;
  /* The next frontier: the best K new nodes still in the running, fed in BFS order. */
  int32_t sel[CN_TREE_MAX_TOPK];
  int ns = 0;
  for (int i = 0; i < g->n_best && ns < K; i++)
    if (g->best[i].depth == d + 1) sel[ns++] = i;
  for (int i = 1; i < ns; i++)
    for (int k = i; k > 0 && bfs_before(&g->best[sel[k]], &g->best[sel[k - 1]]); k--) {
      int32_t t = sel[k];
      sel[k] = sel[k - 1], sel[k - 1] = t;
    }
  for (; g->nf < ns; g->nf++) {
    cn_grow_cand *c = &g->best[sel[g->nf]];
    c->fed = cn_tree_add(&g->t, c->parent, c->token, c->logp);
    if (c->fed < 0) return tree_overflow();
    g->fed_score[c->fed] = c->score;
    g->frontier[g->nf] = c->fed;
  }
  return CANOPY_OK;
}

/* Reranking is done (the best N); renumber into BFS order, siblings in pick order. At equal
 * depth the oracle's tree orders parents as the output will, so sorting by (depth, parent in the
 * oracle's tree, pick) is the output's BFS order. */
static int dynamic_finish(cn_tree_grower *g, cn_tree *out, int32_t *oracle_index) {
  cn_grow_cand *best = g->best;
  for (int i = 1; i < g->n_best; i++)
    for (int k = i; k > 0 && bfs_before(&best[k], &best[k - 1]); k--) {
      cn_grow_cand t = best[k];
      best[k] = best[k - 1], best[k - 1] = t;
    }
  int32_t fed_to_out[CN_TREE_MAX_NODES];
  for (int i = 0; i < g->t.n; i++)
    fed_to_out[i] = -1;
  fed_to_out[0] = 0;
  cn_tree_reset(out, g->p.root_token);
  if (oracle_index) oracle_index[0] = 0;
  for (int i = 0; i < g->n_best; i++) {
    const cn_grow_cand *c = &best[i];
    int p = fed_to_out[c->parent];
    int o = p < 0 ? -1 : cn_tree_add(out, p, c->token, c->logp);
    if (o < 0) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_tree_grow: a kept node lost its parent (internal error)");
    if (c->fed >= 0) fed_to_out[c->fed] = o;
    if (oracle_index) oracle_index[o] = c->fed;
  }
  return CANOPY_OK;
}

/* ---- sampled dynamic trees (counts fixed before drawing; see tree_grow.h) ------------------- */

/* Remembers a slot value among the best N offered this step (descending). */
static void offer(cn_tree_grower *g, float v) {
  int cap = g->p.spec->n_nodes, i = g->n_offered;
  if (i == cap && !(v > g->offered[cap - 1])) return;
  if (i == cap) i--;
  else g->n_offered++;
  for (; i > 0 && v > g->offered[i - 1]; i--)
    g->offered[i] = g->offered[i - 1];
  g->offered[i] = v;
}

typedef struct slot {
  float value; /* log P_v + log s_v[j] */
  int16_t node, j;
} slot;

static int slot_before(const slot *a, const slot *b) {
  if (a->value != b->value) return a->value > b->value;
  return a->node != b->node ? a->node < b->node : a->j < b->j;
}

static int sampled_give(cn_tree_grower *g, const float *const *probs) {
  const int N = g->p.spec->n_nodes, K = g->p.spec->topk;
  const float tau = g->p.log_tau;
  slot slots[CN_TREE_MAX_TOPK * CN_TREE_MAX_TOPK];
  int n_slots = 0;
  /* What each frontier node's j-th child is worth, from q alone (cn_pick_topk: no draw yet). */
  for (int f = 0; f < g->nf; f++) {
    int u = g->frontier[f], n = cn_pick_topk(NULL, probs[f], g->p.vocab, K, g->picks);
    for (int j = 0; j < n; j++) {
      slot s = {.value = g->t.logp[u] + fminf(logf(probs[f][g->picks[j]]), 0.0f), .node = (int16_t)f, .j = (int16_t)j};
      offer(g, s.value);
      int i = n_slots++;
      for (; i > 0 && slot_before(&s, &slots[i - 1]); i--)
        slots[i] = slots[i - 1];
      slots[i] = s;
    }
  }
  /* Keep the best slots worth at least tau while the budget lasts; per node they are a prefix of
   * j, since s_v is sorted. */
  int count[CN_TREE_MAX_TOPK] = {0};
  for (int i = 0; i < n_slots && g->kept < N && slots[i].value >= tau; i++, g->kept++)
    count[slots[i].node]++;
  int first_new = g->t.n;
  for (int f = 0; f < g->nf; f++) {
    if (!count[f]) continue;
    int u = g->frontier[f], n = pick_children(g, probs[f], count[f]);
    if (n < 0) return n;
    g->kept -= count[f] - n; /* fewer tokens with q > 0 than slots kept */
    for (int r = 0; r < n; r++)
      if (cn_tree_add(&g->t, u, g->picks[r], g->t.logp[u] + g->logq[r]) < 0) return tree_overflow();
  }
  g->level++;
  g->nf = 0;
  if (g->level == g->p.spec->depth || g->kept >= N) return CANOPY_OK;
  /* The next frontier: the K new nodes with the highest P that could still offer a slot worth
   * tau, in BFS order (ties to the earlier node). */
  for (int u = first_new; u < g->t.n; u++) {
    if (!(g->t.logp[u] >= tau)) continue;
    int i = g->nf < K ? g->nf++ : K;
    if (i == K && !(g->t.logp[u] > g->t.logp[g->frontier[K - 1]])) continue;
    if (i == K) i--;
    for (; i > 0 && g->t.logp[u] > g->t.logp[g->frontier[i - 1]]; i--)
      g->frontier[i] = g->frontier[i - 1];
    g->frontier[i] = u;
  }
  for (int i = 1; i < g->nf; i++) /* back to BFS order */
    for (int k = i; k > 0 && g->frontier[k] < g->frontier[k - 1]; k--) {
      int32_t t = g->frontier[k];
      g->frontier[k] = g->frontier[k - 1], g->frontier[k - 1] = t;
    }
  return CANOPY_OK;
}

float cn_tree_grower_next_log_tau(const cn_tree_grower *g) {
  if (!g->p.sampled || g->p.spec->kind != CN_TREE_DYNAMIC || !g->n_offered) return -INFINITY;
  /* Fewer than N offered: the threshold was too tight to see N slots; loosen it to the worst. */
  return g->offered[g->n_offered - 1];
}

/* ---- the state machine ---------------------------------------------------------------------- */

enum { GROW_STATIC, GROW_DYNAMIC, GROW_SAMPLED };

static int grow_kind(const cn_tree_grower *g) {
  if (g->p.spec->kind != CN_TREE_DYNAMIC) return GROW_STATIC;
  return g->p.sampled ? GROW_SAMPLED : GROW_DYNAMIC;
}

int cn_tree_grower_start(cn_tree_grower *g, const cn_grow_params *p) {
  if (!g || !p || !p->spec || !p->picker) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_tree_grow: NULL argument");
  const cn_tree_spec *spec = p->spec;
  g->done = 1;
  g->status = CANOPY_ERR_INVALID_ARG;
  if (p->vocab < 1 || p->root_token < 0 || p->root_token >= p->vocab)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_tree_grow: root token %d outside the vocabulary of %d",
                    (int)p->root_token, p->vocab);
  int dynamic = spec->kind == CN_TREE_DYNAMIC;
  if (spec->n_nodes < 1 || spec->n_nodes >= CN_TREE_MAX_NODES || spec->depth < 1 || spec->depth > CN_TREE_MAX_DEPTH ||
      (dynamic && (spec->topk < 1 || spec->topk > CN_TREE_MAX_TOPK)))
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_tree_grow: not a parsed tree spec (%d nodes, depth %d, topk %d)",
                    spec->n_nodes, spec->depth, spec->topk);
  g->p = *p;
  g->calls = g->level = g->n_best = g->kept = g->n_offered = 0;
  g->done = 0;
  g->status = CANOPY_OK;
  cn_tree_reset(&g->t, p->root_token);
  g->fed_score[0] = 0;
  g->frontier[0] = 0;
  g->nf = 1;
  if (!dynamic) {
    for (int i = 0; i <= spec->n_nodes; i++)
      g->to_out[i] = -1;
    g->to_out[0] = 0;
    g->lo = 0, g->hi = 1;
    static_frontier(g);
  }
  return CANOPY_OK;
}

int cn_tree_grower_frontier(cn_tree_grower *g, const cn_tree **t, const int32_t **frontier) {
  if (g->done || g->status) return 0;
  if (t) *t = &g->t;
  if (frontier) *frontier = g->frontier;
  return g->nf;
}

int cn_tree_grower_give(cn_tree_grower *g, const float *const *probs) {
  if (g->done || g->status || !g->nf)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_tree_grow: no level is waiting for distributions");
  g->calls++;
  for (int i = 0; i < g->nf; i++)
    if (!probs || !probs[i]) {
      g->status = cn_error(CANOPY_ERR_INVALID_ARG,
                           "growing the draft tree at depth %d: the oracle gave no distribution for frontier node %d",
                           g->level, (int)g->frontier[i]);
      return g->status;
    }
  int k = grow_kind(g);
  g->status = k == GROW_STATIC ? static_give(g, probs) : k == GROW_DYNAMIC ? dynamic_give(g, probs) : sampled_give(g, probs);
  return g->status;
}

int cn_tree_grower_finish(cn_tree_grower *g, cn_tree *out, int32_t *oracle_index) {
  if (g->status) return g->status;
  g->done = 1;
  if (grow_kind(g) == GROW_DYNAMIC) return dynamic_finish(g, out, oracle_index);
  *out = g->t;
  if (oracle_index)
    for (int i = 0; i < out->n; i++)
      oracle_index[i] = i;
  return CANOPY_OK;
}

/* ---- the oracle-driven entry points --------------------------------------------------------- */

int cn_tree_grow_ex(const cn_tree_spec *spec, int32_t root_token, int vocab, cn_draft_oracle oracle, void *ctx,
                    cn_child_picker picker, void *picker_ctx, cn_tree *out, int *n_oracle_calls,
                    int32_t *oracle_index) {
  if (n_oracle_calls) *n_oracle_calls = 0;
  if (!spec || !oracle || !picker || !out) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_tree_grow: NULL argument");
  cn_tree_grower g;
  cn_grow_params p = {.spec = spec, .root_token = root_token, .vocab = vocab, .picker = picker,
                      .picker_ctx = picker_ctx, .log_tau = -INFINITY};
  int rc = cn_tree_grower_start(&g, &p);
  if (rc) return rc;
  cn_tree_reset(out, root_token);
  const cn_tree *t;
  const int32_t *frontier;
  const float *probs[CN_TREE_MAX_NODES];
  int calls = 0;
  for (int n; !rc && (n = cn_tree_grower_frontier(&g, &t, &frontier)) > 0;) {
    for (int i = 0; i < n; i++)
      probs[i] = NULL;
    rc = oracle(ctx, t, frontier, n, probs);
    calls++;
    if (rc) rc = cn_error_wrap(rc, "growing the draft tree at depth %d", t->depth[frontier[0]]);
    else rc = cn_tree_grower_give(&g, probs);
  }
  if (n_oracle_calls) *n_oracle_calls = calls;
  return rc ? rc : cn_tree_grower_finish(&g, out, oracle_index);
}

int cn_tree_grow(const cn_tree_spec *spec, int32_t root_token, int vocab, cn_draft_oracle oracle, void *ctx,
                 cn_child_picker picker, void *picker_ctx, cn_tree *out, int *n_oracle_calls) {
  return cn_tree_grow_ex(spec, root_token, vocab, oracle, ctx, picker, picker_ctx, out, n_oracle_calls, NULL);
}
