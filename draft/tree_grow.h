/* Growing a token tree from a spec, level by level, independent of any model. The drafter
 * supplies the draft distributions through an oracle (one batched draft forward per level) and a
 * child picker (greedy top-k, or sampling without replacement for stochastic acceptance).
 *
 * Static specs: at depth d, every node that the spec gives children asks the picker for as many
 * picks as its highest child rank needs, and child rank r takes the r-th pick. A node whose
 * distribution has fewer picks than that (too few tokens with q > 0) loses the missing children
 * and their subtrees.
 *
 * Dynamic specs (EAGLE-2: Li et al., "EAGLE-2: Faster Inference of Language Models with Dynamic
 * Draft Trees", 2024, section 4): the expansion phase feeds, at each depth, the topk nodes of
 * that depth with the highest cumulative draft log-probability (the paper's "value", the product
 * of confidences along the path), each proposing its topk picks as children; after `depth`
 * levels the reranking phase keeps the N best drafted nodes overall, which is closed under
 * ancestors because a path's log-probability never increases. See tree_grow.c for the exact
 * order (ties, and how the budget prunes the expansion without changing the result). */
#ifndef CANOPY_DRAFT_TREE_GROW_H
#define CANOPY_DRAFT_TREE_GROW_H

#include <stdint.h>

#include "draft/tree.h"
#include "draft/tree_spec.h"

/* One batched draft forward: `t` is the tree so far; `frontier` lists the n_frontier nodes that
 * will get children at this level, all at the same depth, in increasing (BFS) index order, with
 * their ancestors in `t`. The oracle sets probs_out[i] to the draft distribution (vocab probs,
 * summing to 1) of frontier[i]'s next token, valid until the next oracle call or until
 * cn_tree_grow returns, whichever comes first. Returns CANOPY_OK or a status (with cn_error).
 *
 * Which tree `t` is: for static specs, the final tree being built (nodes keep their index). For
 * dynamic specs, the tree of expanded nodes only: the root and every node ever passed as frontier
 * (never-expanded candidates are not in it). It only grows between calls (indices are stable), so
 * a drafter can key its draft KV slots by `t`'s node index: a node is fed exactly once, in the
 * call that lists it as frontier. */
typedef int (*cn_draft_oracle)(void *ctx, const cn_tree *t, const int32_t *frontier, int n_frontier,
                               const float **probs_out);

/* Chooses up to k distinct tokens from q (vocab probs) to become a node's children, in the order
 * that defines their ranks, writing them to tokens[0..k). Returns how many it chose (fewer than k
 * when q has fewer tokens with q > 0), or a negative status. Every chosen token must have q > 0.
 * Greedy: cn_pick_topk. Stochastic: draws without replacement (spec/accept.h). */
typedef int (*cn_child_picker)(void *ctx, const float *q, int vocab, int k, int32_t *tokens);

/* The greedy picker: the k most probable tokens with q > 0, descending, ties to the lower id.
 * O(vocab log k). ctx is unused. */
int cn_pick_topk(void *ctx, const float *q, int vocab, int k, int32_t *tokens);

/* Grows `out` from root_token by `spec`. Each level is exactly one oracle call whose frontier
 * nodes all have the same depth (the level's index); there are at most
 * cn_tree_spec_get_bounds(spec).oracle_calls calls, fewer when no node of a level is worth
 * expanding. out->logp[i] = out->logp[parent] + log q_parent(token) (root 0); out satisfies
 * draft/tree.h's invariants (BFS, siblings consecutive in pick order). *n_oracle_calls (may be
 * NULL) receives the number of oracle calls made. Uses no heap memory. Dynamic specs grow by
 * EAGLE-2 (greedy acceptance); a sampling drafter uses the grower below with `sampled` set. */
int cn_tree_grow(const cn_tree_spec *spec, int32_t root_token, int vocab, cn_draft_oracle oracle, void *ctx,
                 cn_child_picker picker, void *picker_ctx, cn_tree *out, int *n_oracle_calls);

/* cn_tree_grow, also writing oracle_index[out->n]: for each node of `out`, its index in the tree
 * the oracle saw, or -1 if it was never in it (a dynamic leaf that was not expanded, so the draft
 * model never fed it). Every node with children has one. Static specs: the identity. */
int cn_tree_grow_ex(const cn_tree_spec *spec, int32_t root_token, int vocab, cn_draft_oracle oracle, void *ctx,
                    cn_child_picker picker, void *picker_ctx, cn_tree *out, int *n_oracle_calls, int32_t *oracle_index);

/* ---- the grower as a state machine ----------------------------------------------------------
 * The same growth with the oracle turned inside out, so that a caller can answer many trees'
 * levels with one draft forward (one batched step over many sequences):
 *
 *   cn_tree_grower_start(&g, &params);
 *   while ((n = cn_tree_grower_frontier(&g, &t, &frontier)) > 0)
 *     ... one draft forward over frontier[0, n) of tree t ...,  cn_tree_grower_give(&g, probs);
 *   cn_tree_grower_finish(&g, out, oracle_index);
 *
 * `t` and `frontier` mean what they mean to an oracle (above); probs as an oracle's probs_out,
 * read during cn_tree_grower_give only.
 *
 * Sampled dynamic trees (params.sampled, dynamic spec). EAGLE-2 draws more children than it keeps
 * and keeps the likelier ones, which biases stochastic acceptance (spec/accept.h, rule 3). This
 * rule fixes every node's child count before drawing, from values known at that moment:
 *  - Each fed node v offers slots j = 1..topk worth P_v * s_v[j], where P_v is v's path
 *    probability and s_v the draft distribution q_v sorted in descending order: what v's j-th
 *    child is worth to EAGLE-2 if it is the j-th likeliest token.
 *  - A level keeps its offered slots best first while they are worth at least the threshold tau
 *    and the budget N lasts; node v then draws as many children as it kept slots, without
 *    replacement (a prefix of its draws, fixed before drawing: exact).
 *  - The next level feeds the topk drawn nodes of the new depth with the highest P (the drawn
 *    token's own probability enters P here; it decides how its own children are drafted, never
 *    whether it is kept), skipping any with P < tau, which could offer nothing.
 *  - tau comes from the previous step (params.log_tau): the value of the N-th best slot offered
 *    in it (cn_tree_grower_next_log_tau), the cut EAGLE-2's reranking would have made; -inf at
 *    first, which fills the budget breadth first once.
 * Every drawn node is kept, so the oracle's tree is the output tree (oracle_index: identity). */
typedef struct cn_grow_params {
  const cn_tree_spec *spec; /* kept by reference until finish */
  int32_t root_token;
  int vocab;
  cn_child_picker picker;
  void *picker_ctx;
  int sampled;   /* the picker samples: dynamic specs use the sampled rule above */
  float log_tau; /* sampled dynamic: the threshold, log domain; -INFINITY for none */
} cn_grow_params;

typedef struct cn_grow_cand { /* a drafted node of a dynamic tree, expanded or not (tree_grow.c) */
  float logp, score;
  int32_t token, parent, pick, depth, fed;
} cn_grow_cand;

typedef struct cn_tree_grower {
  cn_grow_params p;
  int calls, level, nf, done, status;
  cn_tree t; /* the oracle's tree: static and sampled dynamic trees are the output itself */
  int32_t frontier[CN_TREE_MAX_NODES];
  /* static */
  int32_t to_out[CN_TREE_MAX_NODES], frontier_spec[CN_TREE_MAX_NODES];
  int lo, hi;
  /* dynamic (EAGLE-2) */
  float fed_score[CN_TREE_MAX_NODES];
  cn_grow_cand best[CN_TREE_MAX_NODES];
  int n_best;
  /* sampled dynamic */
  int kept;                          /* drafted nodes so far */
  float offered[CN_TREE_MAX_NODES];  /* the best N slot values offered so far, descending */
  int n_offered;
  /* one level's scratch */
  int32_t picks[CN_TREE_MAX_NODES];
  float logq[CN_TREE_MAX_NODES];
} cn_tree_grower;

/* Checks the parameters and readies the first level. Returns CANOPY_OK or a status. */
int cn_tree_grower_start(cn_tree_grower *g, const cn_grow_params *p);
/* The next level's frontier (its count), or 0 when the tree is grown. */
int cn_tree_grower_frontier(cn_tree_grower *g, const cn_tree **t, const int32_t **frontier);
/* Hands over the level's distributions and picks its children. Returns CANOPY_OK or a status
 * (after which the grower is finished). */
int cn_tree_grower_give(cn_tree_grower *g, const float *const *probs);
/* Writes the grown tree and its oracle_index (may be NULL). */
int cn_tree_grower_finish(cn_tree_grower *g, cn_tree *out, int32_t *oracle_index);
/* Sampled dynamic: the threshold the next step should use (see above); -INFINITY otherwise. */
float cn_tree_grower_next_log_tau(const cn_tree_grower *g);

#endif
