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

#include "common/error.h"
#include "kernels/cpu/ops.h"

static inline float pos(float x) { return x > 0 ? x : 0.0f; } /* NaN and negatives count as 0 */

static double mass(const float *w, int vocab) {
  double s = 0;
  for (int v = 0; v < vocab; v++)
    s += pos(w[v]);
  return s;
}

/* A draw from w / mass (mass = mass(w)); -1 if w has no positive entry. */
static int draw(const float *w, int vocab, double m, cn_rng *rng) {
  double target = cn_rng_uniform(rng) * m, cum = 0;
  int last = -1;
  for (int v = 0; v < vocab; v++) {
    if (!(w[v] > 0)) continue;
    cum += w[v];
    last = v;
    if (target < cum) return v;
  }
  return last; /* rounding left target at the total */
}

int cn_draft_children_sample(const float *q, int vocab, int k, cn_rng *rng, int32_t *out_tokens, float *scratch) {
  if (!q || !rng || !out_tokens || !scratch || vocab <= 0)
    return cn_error(CANOPY_ERR_INVALID_ARG, "draft children: NULL argument or vocab %d <= 0", vocab);
  int support = 0;
  for (int v = 0; v < vocab; v++)
    support += (scratch[v] = pos(q[v])) > 0;
  int n = k < support ? k : support;
  for (int i = 0; i < n; i++) {
    /* The mass is summed afresh each draw: subtracting removed entries would let rounding
     * outweigh the smallest entries left. */
    int x = draw(scratch, vocab, mass(scratch, vocab), rng);
    out_tokens[i] = x;
    scratch[x] = 0;
  }
  return n < 0 ? 0 : n;
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

int cn_accept_greedy(const cn_tree *t, const float *target_logits, int vocab, int32_t *accepted, int *n_accepted,
                     int32_t *bonus) {
  if (!t || !target_logits || !accepted || !n_accepted || !bonus || vocab <= 0)
    return cn_error(CANOPY_ERR_INVALID_ARG, "accept greedy: NULL argument or vocab %d <= 0", vocab);
  int rc = check_tree(t, vocab, "accept greedy");
  if (rc) return rc;
  int u = 0, n = 0;
  for (;;) {
    int32_t want = cn_cpu_argmax(target_logits + (size_t)u * vocab, vocab), next = -1;
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

int cn_accept_stochastic(const cn_tree *t, const float *target_probs, const float *const *draft_probs, int vocab,
                         cn_rng *rng, float *scratch, int32_t *accepted, int *n_accepted, int32_t *bonus) {
  if (!t || !target_probs || !rng || !scratch || !accepted || !n_accepted || !bonus || vocab <= 0)
    return cn_error(CANOPY_ERR_INVALID_ARG, "accept stochastic: NULL argument or vocab %d <= 0", vocab);
  int rc = check_tree(t, vocab, "accept stochastic");
  if (rc) return rc;
  for (int u = 0; u < t->n; u++)
    if (t->n_children[u] > 0 && (!draft_probs || !draft_probs[u]))
      return cn_error(CANOPY_ERR_INVALID_ARG, "accept stochastic: node %d has children but no draft distribution", u);

  float *rs = scratch, *qs = scratch + vocab; /* the residual and the draft minus rejected tokens */
  int u = 0, n = 0;
  for (;;) {
    const float *r = target_probs + (size_t)u * vocab, *q = draft_probs ? draft_probs[u] : NULL;
    double R = mass(r, vocab), Q = 0;
    if (!(R > 0)) return cn_error(CANOPY_ERR_INVALID_ARG, "accept stochastic: target row %d has no mass", u);
    int k = t->n_children[u], next = -1;
    if (k > 0) Q = mass(q, vocab);
    for (int c = t->first_child[u]; k > 0 && c < t->first_child[u] + k; c++) {
      int32_t x = t->token[c];
      double qx = pos(q[x]), rx = pos(r[x]);
      if (!(qx > 0)) continue; /* not a possible draw: skipped (see above) */
      if (cn_rng_uniform(rng) * qx * R < rx * Q) {
        next = c;
        break;
      }
      double inv_r = 1.0 / R, inv_q = 1.0 / Q, beta = 0;
      for (int v = 0; v < vocab; v++) {
        double d = pos(r[v]) * inv_r - pos(q[v]) * inv_q;
        beta += d > 0 ? d : 0;
      }
      if (!(beta > 0)) { /* r = q: a rejection only rounding could give */
        if (rx > 0) {
          next = c;
          break;
        }
        continue;
      }
      /* r and q may already be rs and qs: each element is read before it is overwritten. */
      double inv_beta = 1.0 / beta, R2 = 0, Q2 = 0;
      for (int v = 0; v < vocab; v++) {
        double d = pos(r[v]) * inv_r - pos(q[v]) * inv_q;
        float qv = v == x ? 0.0f : pos(q[v]);
        rs[v] = d > 0 ? (float)(d * inv_beta) : 0.0f;
        qs[v] = qv;
        R2 += rs[v];
        Q2 += qv;
      }
      r = rs, q = qs, R = R2, Q = Q2;
    }
    if (next < 0) {
      *bonus = draw(r, vocab, R, rng);
      break;
    }
    accepted[n++] = next;
    u = next;
  }
  *n_accepted = n;
  return CANOPY_OK;
}
