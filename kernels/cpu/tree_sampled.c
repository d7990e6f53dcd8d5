/* Sampled token trees over arrays: drawing a node's children without replacement, and the
 * stochastic acceptance walk (multi-draft speculative sampling without replacement, Sequoia,
 * arXiv 2402.12374, built on SpecInfer's multi-step speculative sampling, arXiv 2305.09781, and
 * the one-draft rule of Leviathan et al. 2023 / Chen et al. 2023). The host path (spec/accept.c)
 * and the CPU backend's chained step both run these; kernels/cuda/tree_sampled.cu is their twin.
 *
 * Every random decision takes its uniform from an array the caller fills, indexed by what it
 * decides (draw j of a row; the test of child c; the bonus at node v), not by the order the walk
 * happens to reach it: so a step queued on a device draws what the same step on the host draws.
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
 * (accepted..., bonus) follows the target's joint distribution. Each decision's uniform is its
 * own (indexed, above), so every test and draw is independent of the others, as the induction
 * needs.
 *
 * Edge cases:
 *  - q(c) = 0 for a stored child (a token q gives 0, or a repeat of a rejected sibling: the draw
 *    pads a row with repeats when q has fewer tokens than draws) is skipped: it was not the next
 *    draw, and the induction above holds with it removed.
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
    for (int j = 0; j < LANES; j++)
      acc[j] += pos_d(r[v + j] * ir - q[v + j] * iq);
  for (; v < n; v++)
    acc[0] += pos_d(r[v] * ir - q[v] * iq);
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

/* A draw with uniform u from w's positive part, normalised; -1 if it has none. */
static int blocks_draw(const blocks *b, const float *w, int vocab, double u) {
  double total = 0;
  for (int i = 0; i < b->n; i++)
    total += b->sum[i];
  double target = u * total, cum = 0;
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

int cn_cpu_draw_distinct(const float *q, int vocab, int k, const double *u, int32_t *out, float *scratch) {
  copy_pos(scratch, q, vocab);
  int support = 0;
  for (int v = 0; v < vocab; v++)
    support += scratch[v] > 0;
  int n = k < support ? k : support;
  blocks b;
  if (n > 0) blocks_build(&b, scratch, vocab);
  for (int i = 0; i < n; i++) {
    int x = blocks_draw(&b, scratch, vocab, u[i]);
    out[i] = x;
    scratch[x] = 0;
    /* Re-summed rather than decremented, so rounding never outweighs the small entries left. */
    blocks_sum_one(&b, scratch, vocab, x / b.size);
  }
  for (int i = n; i < k; i++)
    out[i] = n > 0 ? out[0] : 0;
  return n;
}

int cn_cpu_accept_sampled_walk(const int32_t *token, const int32_t *parent, int n, int vocab, cn_cpu_row_fn p_row,
                               void *ctx, const float *const *q_of, const double *u, float *scratch,
                                int32_t *accepted, int *n_accepted, int32_t *bonus) {
  float *rs = scratch, *qs = scratch + vocab; /* the residual and the draft minus rejected tokens */
  int v = 0, n_acc = 0, rc;
  for (;;) {
    const float *r = NULL, *q = q_of[v];
    if ((rc = p_row(ctx, v, &r))) return rc;
    if (!r) return cn_error(CANOPY_ERR_INVALID_ARG, "accept sampled: no target row for node %d", v);
    int first = -1, next = -1;
    for (int c = v + 1; c < n && first < 0; c++) /* children come after their parent */
      if (parent[c] == v) first = c;
    if (first >= 0 && !q)
      return cn_error(CANOPY_ERR_INVALID_ARG, "accept sampled: node %d has children but no draft distribution", v);
    double R = sum_pos(r, vocab), Q = first >= 0 ? sum_pos(q, vocab) : 0;
    if (!(R > 0)) return cn_error(CANOPY_ERR_INVALID_ARG, "accept sampled: target row %d has no mass", v);
    for (int c = first; c >= 0 && c < n; c++) {
      if (parent[c] != v) continue;
      int32_t x = token[c];
      if (x < 0 || x >= vocab)
        return cn_error(CANOPY_ERR_INVALID_ARG, "accept sampled: node %d has token %d outside the vocabulary", c, x);
      double qx = pos(q[x]), rx = pos(r[x]);
      if (!(qx > 0)) continue; /* not a possible draw: skipped (see above) */
      if (u[2 * c] * qx * R < rx * Q) {
        next = c;
        break;
      }
      if (r != rs) { /* the first rejection at v: from here on r and q live in scratch */
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
      *bonus = blocks_draw(&b, r, vocab, u[2 * v + 1]);
      break;
    }
    accepted[n_acc++] = next;
    v = next;
  }
  *n_accepted = n_acc;
  return CANOPY_OK;
}

/* A sequence's rows as the batch's: node i of the sequence is node first + i of the batch. */
typedef struct seq_rows {
  cn_cpu_row_fn p_row;
  void *ctx;
  int first;
} seq_rows;

static int seq_row(void *ctx, int node, const float **row) {
  const seq_rows *r = ctx;
  return r->p_row(r->ctx, r->first + node, row);
}

int cn_cpu_accept_sampled(int32_t *out, const int32_t *tokens, const int32_t *parent, int n, cn_cpu_row_fn p_row,
                          void *ctx, const float *const *q, const double *u, int vocab, float *scratch) {
  int bad = cn_cpu_tree_batch_bad(parent, n);
  if (bad == 0) return cn_error(CANOPY_ERR_INVALID_ARG, "accept sampled: no root at node 0");
  if (bad > 0) return cn_error(CANOPY_ERR_INVALID_ARG, "accept sampled: node %d has parent %d", bad, parent[bad]);
  int seqs = 0;
  for (int f = 0; f < n; seqs++) {
    int e = cn_cpu_tree_end(parent, n, f);
    int m = e - f, n_acc = 0;
    int32_t *o = out + 2 * seqs + 2 * f;
    seq_rows r = {p_row, ctx, f};
    int st = cn_cpu_accept_sampled_walk(tokens + f, parent + f, m, vocab, seq_row, &r, q + f, u + 2 * f, scratch, o + 2,
                                        &n_acc, &o[1]);
    if (st) return st;
    o[0] = n_acc;
    for (int a = 0; a < o[0]; a++) o[2 + m + a] = tokens[f + o[2 + a]];
    f = e;
  }
  return seqs;
}
