/* Acceptance of a verified token tree: greedy, and multi-draft speculative sampling without
 * replacement (Sequoia, arXiv 2402.12374, built on SpecInfer's multi-step speculative sampling,
 * arXiv 2305.09781, and the one-draft rule of Leviathan et al. 2023 / Chen et al. 2023).
 *
 * Why the stochastic walk is exact. Fix a node and write r for the current residual and q for
 * the current draft distribution (both normalised), with m children left, each the next draw
 * without replacement from q. Claim: the token the node emits (an accepted child, or the bonus)
 * is distributed as r. By induction on m:
 *  - m = 0: the bonus is a draw from r.
 *  - m >= 1: the next child c is a draw from q. It is accepted as token x with probability
 *    q(x) min(1, r(x)/q(x)) = min(q(x), r(x)). Rejection has probability
 *    1 - sum_x min(q, r) = sum_x max(r - q, 0) =: beta. Given a rejection of c = a, the children
 *    left are draws without replacement from q minus a, renormalised, which is exactly the q the
 *    walk moves to, so by induction the node then emits r' = max(r - q, 0) / beta whatever a
 *    was. In total min(q(x), r(x)) + max(r(x) - q(x), 0) = r(x).
 * Starting with r = p_u, the first token is distributed as the target's p_u. If it came from
 * accepting child c, the walk goes on at c with p_c, the target's next-token distribution after
 * the path to c, and c's children are fresh draws from q_c that nothing at u looked at, so the
 * next token follows p_c given the path; if it was the bonus the step ends. So the chain
 * (accepted..., bonus) follows the target's joint distribution, and the next step continues it
 * from the committed prefix.
 *
 * Edge cases:
 *  - q(c) = 0 for a stored child (a token q gives 0, or a repeat of a rejected sibling) cannot
 *    happen for children drawn by the contract; such a child is skipped: it was not the next draw,
 *    and the induction above holds with it removed. With children drawn *with* replacement this
 *    turns the walk into rejection sampling of the without-replacement draws: still exact.
 *  - beta = 0 means r <= q everywhere, and as both sum to 1, r = q: every candidate is accepted
 *    (r(c)/q(c) = 1) and the residual is never needed. A rejection then comes only from rounding;
 *    we take the acceptance exact arithmetic gives (or, if r(c) = 0 too, skip c), so no empty
 *    residual is ever normalised.
 *  - A target that gives drafted tokens zero mass (top-k / top-p): r(c) = 0 rejects c surely, and
 *    max(r - q, 0) <= r keeps every residual inside the target's support, so an excluded token is
 *    never emitted.
 * Numerics: r and q are kept as unnormalised float vectors with double masses R and Q, and a
 * child is accepted iff u * q(c) * R < r(c) * Q, which is the min(1, .) test without dividing by
 * q(c). Each residual is stored divided by its mass, so small residuals do not underflow. */
#include "spec/accept.h"

#include <stddef.h>
#include <string.h>

#include "common/error.h"
#include "kernels/cpu/ops.h"

/* max(x, 0), with NaN counting as 0. Written as a mask, not a branch: residuals are zero at
 * about half the vocabulary in no predictable pattern, and a branch there mispredicts at every
 * other element (measured 0.9 ms against 0.025 ms a pass over 152k floats), while the mask
 * lets the compiler vectorise every pass. */
static inline float pos(float x) {
  uint32_t b;
  memcpy(&b, &x, sizeof b);
  b &= -(uint32_t)(x > 0);
  memcpy(&x, &b, sizeof b);
  return x;
}

static inline double pos_d(double x) {
  uint64_t b;
  memcpy(&b, &x, sizeof b);
  b &= -(uint64_t)(x > 0);
  memcpy(&x, &b, sizeof b);
  return x;
}

/* Every pass over the vocabulary sums in double, in 8 independent lanes so that it vectorises
 * without reassociation (one serial chain of double adds is latency-bound). */
enum { LANES = 8 };

static double sum_pos(const float *w, int n) {
  double acc[LANES] = {0};
  int v = 0;
  for (; v + LANES <= n; v += LANES)
    for (int j = 0; j < LANES; j++)
      acc[j] += pos(w[v + j]);
  for (; v < n; v++)
    acc[0] += pos(w[v]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

static void copy_pos(float *dst, const float *src, int n) {
  for (int v = 0; v < n; v++)
    dst[v] = pos(src[v]);
}

/* sum_v max(r_v / R - q_v / Q, 0), with ir = 1/R, iq = 1/Q (r, q nonnegative). */
static double residual_mass(const float *r, const float *q, int n, double ir, double iq) {
  double acc[LANES] = {0};
  int v = 0;
  for (; v + LANES <= n; v += LANES)
    for (int j = 0; j < LANES; j++) {
      acc[j] += pos_d(r[v + j] * ir - q[v + j] * iq);
    }
  for (; v < n; v++) {
    acc[0] += pos_d(r[v] * ir - q[v] * iq);
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* r <- max(r / R - q / Q, 0) / beta in place; ib = 1 / beta. Stored normalised, so that a
 * residual of tiny mass does not underflow in float. */
static void residual_update(float *r, const float *q, int n, double ir, double iq, double ib) {
  for (int v = 0; v < n; v++)
    r[v] = pos((float)((r[v] * ir - q[v] * iq) * ib));
}

/* Drawing by inverse CDF over block sums: one vectorised pass builds them, then a draw walks
 * at most MAX_BLOCKS sums and one block, and removing a token re-sums only its block. */
enum { MAX_BLOCKS = 1024, MIN_BLOCK = 256 };

typedef struct blocks {
  int size, n;
  double sum[MAX_BLOCKS]; /* sum_pos of w[i*size .. (i+1)*size) */
} blocks;

static void blocks_sum_one(blocks *b, const float *w, int vocab, int i) {
  int lo = i * b->size, hi = lo + b->size < vocab ? lo + b->size : vocab;
  b->sum[i] = sum_pos(w + lo, hi - lo);
}

static void blocks_build(blocks *b, const float *w, int vocab) {
  b->size = vocab <= MIN_BLOCK * MAX_BLOCKS ? MIN_BLOCK : (vocab + MAX_BLOCKS - 1) / MAX_BLOCKS;
  b->n = (vocab + b->size - 1) / b->size;
  for (int i = 0; i < b->n; i++)
    blocks_sum_one(b, w, vocab, i);
}

/* A draw from w's positive part, normalised; -1 if it has none. */
static int blocks_draw(const blocks *b, const float *w, int vocab, cn_rng *rng) {
  double total = 0;
  for (int i = 0; i < b->n; i++)
    total += b->sum[i];
  double target = cn_rng_uniform(rng) * total, cum = 0;
  int last = -1;
  for (int i = 0; i < b->n; i++) {
    if (!(b->sum[i] > 0)) continue;
    last = i;
    if (!(target < cum + b->sum[i])) {
      cum += b->sum[i];
      continue;
    }
    int lo = i * b->size, hi = lo + b->size < vocab ? lo + b->size : vocab, x = -1;
    for (int v = lo; v < hi; v++) {
      if (!(w[v] > 0)) continue;
      cum += w[v];
      x = v;
      if (target < cum) break;
    }
    return x; /* the block's last positive entry if rounding left target above its running sum */
  }
  if (last < 0) return -1;
  /* Rounding left target at the total: the last positive entry. */
  for (int v = (last + 1) * b->size < vocab ? (last + 1) * b->size - 1 : vocab - 1; v >= 0; v--)
    if (w[v] > 0) return v;
  return -1;
}

int cn_draft_children_sample(const float *q, int vocab, int k, cn_rng *rng, int32_t *out_tokens, float *scratch) {
  if (!q || !rng || !out_tokens || !scratch || vocab <= 0)
    return cn_error(CANOPY_ERR_INVALID_ARG, "draft children: NULL argument or vocab %d <= 0", vocab);
  copy_pos(scratch, q, vocab);
  int support = 0;
  for (int v = 0; v < vocab; v++)
    support += scratch[v] > 0;
  int n = k < support ? k : support;
  if (n <= 0) return 0;
  blocks b;
  blocks_build(&b, scratch, vocab);
  for (int i = 0; i < n; i++) {
    int x = blocks_draw(&b, scratch, vocab, rng);
    out_tokens[i] = x;
    scratch[x] = 0;
    /* Re-summed rather than decremented, so rounding never outweighs the small entries left. */
    blocks_sum_one(&b, scratch, vocab, x / b.size);
  }
  return n;
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

int cn_accept_stochastic_lazy(const cn_tree *t, cn_target_row_fn target_row, void *ctx, const float *const *draft_probs,
                              int vocab, cn_rng *rng, float *scratch, int32_t *accepted, int *n_accepted,
                              int32_t *bonus) {
  if (!t || !target_row || !rng || !scratch || !accepted || !n_accepted || !bonus || vocab <= 0)
    return cn_error(CANOPY_ERR_INVALID_ARG, "accept stochastic: NULL argument or vocab %d <= 0", vocab);
  int rc = check_tree(t, vocab, "accept stochastic");
  if (rc) return rc;
  for (int u = 0; u < t->n; u++)
    if (t->n_children[u] > 0 && (!draft_probs || !draft_probs[u]))
      return cn_error(CANOPY_ERR_INVALID_ARG, "accept stochastic: node %d has children but no draft distribution", u);

  float *rs = scratch, *qs = scratch + vocab; /* the residual and the draft minus rejected tokens */
  int u = 0, n = 0;
  for (;;) {
    const float *r = NULL, *q = draft_probs ? draft_probs[u] : NULL;
    if ((rc = target_row(ctx, u, &r))) return rc;
    if (!r) return cn_error(CANOPY_ERR_INVALID_ARG, "accept stochastic: no target row for node %d", u);
    int k = t->n_children[u], next = -1;
    double R = sum_pos(r, vocab), Q = k > 0 ? sum_pos(q, vocab) : 0;
    if (!(R > 0)) return cn_error(CANOPY_ERR_INVALID_ARG, "accept stochastic: target row %d has no mass", u);
    for (int c = t->first_child[u]; k > 0 && c < t->first_child[u] + k; c++) {
      int32_t x = t->token[c];
      double qx = pos(q[x]), rx = pos(r[x]);
      if (!(qx > 0)) continue; /* not a possible draw: skipped (see above) */
      if (cn_rng_uniform(rng) * qx * R < rx * Q) {
        next = c;
        break;
      }
      if (r != rs) { /* the first rejection at u: from here on r and q live in scratch */
        copy_pos(rs, r, vocab);
        copy_pos(qs, q, vocab);
        r = rs, q = qs;
      }
      double ir = 1.0 / R, iq = 1.0 / Q, beta = residual_mass(rs, qs, vocab, ir, iq);
      if (beta > 0) {
        residual_update(rs, qs, vocab, ir, iq, 1.0 / beta);
        R = sum_pos(rs, vocab);
      } else if (rx > 0) { /* r = q: a rejection only rounding could give (see above) */
        next = c;
        break;
      }
      qs[x] = 0;
      Q = sum_pos(qs, vocab);
    }
    if (next < 0) {
      blocks b;
      blocks_build(&b, r, vocab);
      *bonus = blocks_draw(&b, r, vocab, rng);
      break;
    }
    accepted[n++] = next;
    u = next;
  }
  *n_accepted = n;
  return CANOPY_OK;
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
