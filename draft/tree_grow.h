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
 * NULL) receives the number of oracle calls made. Uses no heap memory.
 *
 * Stochastic note: a dynamic tree never keeps a later pick of a node without the earlier ones,
 * but how many it keeps depends on the picked tokens' probabilities, which spec/accept.h's
 * contract for exact stochastic acceptance forbids; cn_tree_spec_exact_for_sampling says which
 * specs are safe with a sampling picker. */
int cn_tree_grow(const cn_tree_spec *spec, int32_t root_token, int vocab, cn_draft_oracle oracle, void *ctx,
                 cn_child_picker picker, void *picker_ctx, cn_tree *out, int *n_oracle_calls);

/* cn_tree_grow, also writing oracle_index[out->n]: for each node of `out`, its index in the tree
 * the oracle saw, or -1 if it was never in it (a dynamic leaf that was not expanded, so the draft
 * model never fed it). Every node with children has one. Static specs: the identity. */
int cn_tree_grow_ex(const cn_tree_spec *spec, int32_t root_token, int vocab, cn_draft_oracle oracle, void *ctx,
                    cn_child_picker picker, void *picker_ctx, cn_tree *out, int *n_oracle_calls, int32_t *oracle_index);

#endif
