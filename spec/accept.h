/* Acceptance: walking a verified token tree with the target's distributions, so that the
 * tokens a speculative step emits are distributed exactly as target-only decoding would emit
 * them. Pure functions over distributions; no model is involved.
 *
 * Sources (read for the algorithm, no code taken):
 *  - Leviathan, Kalman, Matias, "Fast Inference from Transformers via Speculative Decoding",
 *    ICML 2023 (arXiv 2211.17192), and Chen et al., "Accelerating Large Language Model Decoding
 *    with Speculative Sampling" (arXiv 2302.01318): one draft token, accepted with probability
 *    min(1, p/q), else a draw from norm(max(p - q, 0)).
 *  - Miao et al., "SpecInfer" (arXiv 2305.09781), multi-step speculative sampling: several
 *    siblings tried in turn, the residual updated after each rejection (siblings drawn i.i.d.,
 *    so q stays as it is).
 *  - Chen et al., "Sequoia" (arXiv 2402.12374), sampling without replacement: the same walk
 *    for siblings drawn without replacement, where q also loses each rejected token.
 *
 * Drafting-side contract for cn_accept_stochastic (what makes its output exact):
 *  1. The children of a node u are drawn from one distribution q_u (the draft's, after whatever
 *     temperature/top-k/top-p the drafter applies; any q_u works, it need not resemble the
 *     target) WITHOUT replacement, by cn_draft_children_sample: draw from q_u, remove the drawn
 *     token, renormalise, repeat. They are stored in draw order (tree rank 0 = first draw).
 *  2. q_u is passed to cn_accept_stochastic unchanged, as draft_probs[u].
 *  3. How many children a node gets is the drafter's choice and may depend on anything on the
 *     draft side (the node's own token and probability, the tree budget, other branches), but
 *     the decision to keep the j-th draw must not depend on the value of that draw or of later
 *     ones: keep a prefix of the draw sequence, chosen before looking at what is cut. Drawing
 *     children and then pruning them by their probability (a top-n over the drawn tokens)
 *     breaks exactness; expanding or not expanding a kept child by its probability does not.
 *  4. The draws use randomness independent of the target (any seed, any RNG).
 *  A child whose token has zero mass left in q_u (a token q_u gives 0, or a repeat of a rejected
 *  sibling) is skipped: it could not have been the next draw, and skipping it keeps the walk
 *  exact even for children drawn with replacement (a repeat is skipped, and a draw that is not a
 *  repeat is distributed as a draw without replacement).
 *
 * Greedy trees (temperature 0) use the top-k of q_u as children; cn_accept_greedy needs nothing
 * else of the draft. */
#ifndef CANOPY_SPEC_ACCEPT_H
#define CANOPY_SPEC_ACCEPT_H

#include <stdint.h>

#include "draft/tree.h"
#include "spec/sampler.h"

/* Draws up to k distinct tokens from q [vocab] without replacement (Sequoia's drafting rule):
 * each draw is from q with the earlier draws removed and renormalised, draw j by the uniform u[j]
 * (cn_cpu_draw_distinct). Entries <= 0 (or NaN) are never drawn. Writes the tokens in draw order
 * to out_tokens [k] (past the draws, repeats of the first, which acceptance skips) and returns how
 * many were drawn: min(k, number of positive entries of q), or CANOPY_ERR_INVALID_ARG (negative)
 * for a NULL pointer, vocab <= 0 or k < 0. scratch: [vocab] floats. Cost: two passes over q plus,
 * per draw, a walk over at most 1024 block sums and one block. */
int cn_draft_children_draw(const float *q, int vocab, int k, const double *u, int32_t *out_tokens, float *scratch);
/* The same with k uniforms from rng (k <= CN_TREE_MAX_NODES). */
int cn_draft_children_sample(const float *q, int vocab, int k, cn_rng *rng, int32_t *out_tokens, float *scratch);

/* Greedy acceptance. From the root, at node u the target's token is the argmax of
 * target_logits[u] (the first index on ties, as cn_cpu_argmax); if a child of u carries it the
 * walk moves there, else it stops and that argmax is the bonus token.
 * target_logits: [t->n][vocab], row u = the target's logits after feeding node u's path.
 * accepted: room for cn_tree_max_depth(t) node indices (t->n - 1 always suffices); receives the
 * accepted nodes, root excluded, in path order; *n_accepted their count.
 * Returns CANOPY_OK, or CANOPY_ERR_INVALID_ARG for a bad tree or argument. */
int cn_accept_greedy(const cn_tree *t, const float *target_logits, int vocab, int32_t *accepted, int *n_accepted,
                     int32_t *bonus);
/* The same walk from the target's top token of each node (target_top [t->n], e.g. computed on the
 * device, so only n ids cross to the host instead of n rows of logits). */
int cn_accept_greedy_top(const cn_tree *t, const int32_t *target_top, int vocab, int32_t *accepted, int *n_accepted,
                         int32_t *bonus);

/* Stochastic acceptance (multi-draft speculative sampling without replacement, Sequoia).
 * At node u with children c_1..c_k (draw order): r = p_u, q = q_u; for each c_i, accept with
 * probability min(1, r(c_i)/q(c_i)) and continue the walk from c_i; on rejection
 * r = norm(max(r - q, 0)) and q = norm(q without c_i). If every child is rejected the bonus is
 * drawn from r; at a leaf (or after accepting one) from p of that node.
 * target_probs: [t->n][vocab], row u = the processed target distribution (cn_sampler_probs) at u.
 * draft_probs: [t->n] pointers; draft_probs[u] = q_u [vocab], the distribution u's children were
 *   drawn from (see the contract above); may be NULL for nodes without children.
 * scratch: [2 * vocab] floats, apart from the rows. accepted, n_accepted, bonus: as
 * cn_accept_greedy. Cost: vectorised passes over the vocabulary, two per visited node, four per
 * rejection and two for the bonus (about 1 ms a step at vocab 152k on one core).
 * The chain (accepted tokens..., bonus) is distributed as target-only sampling of as many tokens.
 * Returns CANOPY_OK, or CANOPY_ERR_INVALID_ARG for a bad tree or argument, or for a target row on
 * the walk with no positive mass. */
int cn_accept_stochastic(const cn_tree *t, const float *target_probs, const float *const *draft_probs, int vocab,
                         cn_rng *rng, float *scratch, int32_t *accepted, int *n_accepted, int32_t *bonus);

/* Gives the processed target distribution at `node` in *row ([vocab], owned by the callee, read
 * only until the next call). Returns CANOPY_OK or a status (with canopy_last_error set), which
 * the walk returns as is. */
typedef int (*cn_target_row_fn)(void *ctx, int node, const float **row);

/* cn_accept_stochastic with the target rows asked for one at a time, for only the nodes the walk
 * visits (at most the path's depth + 1 of them): processing logits into a distribution (softmax,
 * top-k, top-p) costs O(vocab) a row, and most of a tree's rows are never looked at. Same
 * result, draw for draw, as cn_accept_stochastic given the same rows and RNG state. */
int cn_accept_stochastic_lazy(const cn_tree *t, cn_target_row_fn target_row, void *ctx, const float *const *draft_probs,
                              int vocab, cn_rng *rng, float *scratch, int32_t *accepted, int *n_accepted,
                              int32_t *bonus);

/* The uniforms a stochastic acceptance of an n-node tree takes: u [2 n] from rng, u[2 c] for the
 * test of child c and u[2 v + 1] for a bonus drawn at v (cn_cpu_accept_sampled_walk). Indexed by
 * the decision, not by the walk's order, so a walk run elsewhere (on the device) given the same
 * array decides the same. */
void cn_accept_uniforms(cn_rng *rng, int n, double *u);

/* The lazy walk with those uniforms given; the rng variants draw them with cn_accept_uniforms. */
int cn_accept_stochastic_u(const cn_tree *t, cn_target_row_fn target_row, void *ctx, const float *const *draft_probs,
                           int vocab, const double *u, float *scratch, int32_t *accepted, int *n_accepted,
                           int32_t *bonus);

#endif
