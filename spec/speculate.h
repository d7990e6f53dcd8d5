/* One speculative step for one sequence (DESIGN.md, "One speculative step, as data"):
 * the draft catches up and grows a token tree level by level (one batched, tree-masked draft
 * forward per level), the target verifies the whole tree in one forward, acceptance walks it, and
 * the accepted path is committed into both models' paged caches. */
#ifndef CANOPY_SPEC_SPECULATE_H
#define CANOPY_SPEC_SPECULATE_H

#include <stdint.h>

#include "canopy.h"
#include "draft/tree.h"
#include "draft/tree_spec.h"
#include "model/forward.h"
#include "model/model.h"
#include "spec/sampler.h"

typedef struct cn_spec cn_spec;

/* Checks the draft against the target (same vocabulary: CANOPY_ERR_VOCAB_MISMATCH) and parses the
 * tree spec; sizes every buffer a step needs, so a step allocates nothing. */
int cn_spec_create(canopy_model *target, canopy_model *draft, const char *tree, const canopy_sampling_params *sp,
                   cn_spec **out);
void cn_spec_free(cn_spec *s);

/* The deepest node a tree of this spec can have (the engine keeps ctx + depth + 1 in context). */
int cn_spec_depth(const cn_spec *s);
/* The most nodes (root included) a tree of this spec can have: its verification rows. */
int cn_spec_max_nodes(const cn_spec *s);

/* One step. tokens[0, n_tokens) is the sequence; target_kv holds K/V for its first n_tokens - 1
 * tokens (the last one, the root, is fed now). On return out[0, *n_out) are the new tokens
 * (accepted drafts, then the bonus token); the target cache holds the root and the accepted
 * tokens; the bonus is not fed yet. The draft's cache follows the sequence by itself. */
int cn_spec_step(cn_spec *s, cn_kv_seq *target_kv, const int32_t *tokens, int n_tokens, cn_sampler *sampler,
                 int32_t *out, int *n_out, canopy_stats *stats);

/* The step in phases, so that one target forward can verify many sequences' trees:
 * cn_spec_draft grows this sequence's tree; cn_spec_batch writes its tokens, positions and logit
 * rows at index `first` of the batch arrays and fills its cn_seq_batch, returning its token count;
 * after the forward, cn_spec_accept takes the tree's logits ([tree nodes][vocab]) and commits. */
int cn_spec_draft(cn_spec *s, cn_kv_seq *target_kv, const int32_t *tokens, int n_tokens, canopy_stats *stats);
int cn_spec_batch(cn_spec *s, cn_kv_seq *target_kv, int first, int32_t *tokens, int32_t *pos, int32_t *rows,
                  struct cn_seq_batch *sb);
int cn_spec_accept(cn_spec *s, cn_kv_seq *target_kv, const float *logits, cn_sampler *sampler, int32_t *out,
                   int *n_out, canopy_stats *stats);
/* Whether acceptance is greedy (temperature 0): it then needs only each node's top token, and
 * cn_spec_accept_top takes those ([tree nodes]) in place of the logits. */
int cn_spec_greedy(const cn_spec *s);
int cn_spec_accept_top(cn_spec *s, cn_kv_seq *target_kv, const int32_t *top, int32_t *out, int *n_out,
                       canopy_stats *stats);

/* cn_spec_draft in pieces, so that one draft forward can serve many sequences (all with the same
 * draft model): a piece is a chunk of the draft's catch-up (tokens it has not fed) or one tree
 * level. tokens/n_tokens must stay valid until cn_spec_draft_end.
 *
 *   cn_spec_draft_begin(...);
 *   while (cn_spec_drafting(s)) {
 *     n = cn_spec_draft_piece(s, first, room, tokens, pos, rows, row_first, &sb);  // 0: no room
 *     ... one draft forward over the batch; this piece's logits are cn_spec_draft_rows(s) rows
 *         starting at row_first of the forward's output ...
 *     cn_spec_draft_take(s, its logits or top ids, see cn_draft_out);
 *   }
 *   cn_spec_draft_end(s);
 *
 * cn_spec_draft_piece writes at most `room` tokens at index `first` of tokens/pos, the logit row
 * indices at rows[row_first...], and fills sb; it returns the token count, or 0 when the piece
 * does not fit in `room` (a level is never split; a catch-up is chunked). */
int cn_spec_draft_begin(cn_spec *s, cn_kv_seq *target_kv, const int32_t *tokens, int n_tokens, canopy_stats *stats);
int cn_spec_drafting(const cn_spec *s);
int cn_spec_draft_piece(cn_spec *s, int first, int room, int32_t *tokens, int32_t *pos, int32_t *rows, int row_first,
                        struct cn_seq_batch *sb);
int cn_spec_draft_rows(const cn_spec *s);
/* What a draft forward hands back for a piece's rows: full logits [rows][V], or (greedy trees,
 * when cn_spec_draft_top_k > 0) each row's k >= cn_spec_draft_top_k best ids [rows][k] with
 * their log-softmax [rows][k], computed where the logits are. */
typedef struct cn_draft_out {
  const float *logits;
  const int32_t *ids;
  const float *logp;
  int k;
} cn_draft_out;
/* The most children any node of this spec's greedy trees takes (ranks 0 .. k-1), so a draft
 * level needs only each row's top k; 0 when the full distribution is needed (sampled trees, or
 * a static rank beyond 32). */
int cn_spec_draft_top_k(const cn_spec *s);
int cn_spec_draft_take(cn_spec *s, const cn_draft_out *out);
int cn_spec_draft_end(cn_spec *s);

/* Whether cn_spec_step runs chained (greedy static trees, greedy dynamic trees on a backend with
 * dyn_trees, and sampled static trees on a backend that draws and accepts them, with both models
 * on one backend that chains forwards, model/forward.h): the draft's levels and the verification
 * queued back to back, acceptance where the logits are, one wait a step. A dynamic tree then grows
 * on its fixed shape where the picks are (kernels/tree_dyn.h); a sampled tree's rows draw their
 * children there and keep their distributions for acceptance (kernels/cpu/tree_sampled.c), with
 * the uniforms the host path would take, so both paths give the same tokens from the same logits
 * (but where a row's distribution has fewer tokens than children: the host path drops the missing
 * children, a chained row repeats its first draw, which acceptance skips). Unless
 * $CANOPY_SPEC_HOST_LEVELS=1 at creation, which keeps the host path (each level's picks brought to
 * the host) to compare. */
int cn_spec_chained(const cn_spec *s);
/* The rows of picks a chained step of this spec writes (a static tree's nodes; a dynamic tree's
 * K a level and the root's), and the ids a row holds at least (a greedy tree's best picks,
 * cn_spec_draft_top_k; a sampled tree's draws, its most children). */
int cn_spec_chain_rows(const cn_spec *s);
int cn_spec_chain_width(const cn_spec *s);

/* A chained step in pieces, so that sessions stepped together share its forwards (spec/session.c;
 * cn_spec_step's chained step is the same pieces for one sequence). The draft's picks go to rows
 * of K ids (K >= cn_spec_chain_width) in an ids buffer the caller owns and numbers the rows of:
 *
 *   cn_spec_chain_begin(s, target_kv, tokens, n_tokens, K, stats);
 *   while (cn_spec_chain_drafting(s)) {
 *     n = cn_spec_chain_piece(s, first, room, tokens, pos, src, rows, row_first, ids_row, u, q_out, &sb, &dyn);
 *     ... one draft forward (token_src = src, src_ids = top_ids = the buffer, top_k = K, this piece's
 *         cn_spec_draft_rows(s) logit rows from row_first landing in rows ids_row.. of the buffer;
 *         with top_logp and dyn among the batch's dynamic trees where dyn.layout is set; a sampled
 *         tree's with the draft's rule as sample, u and q_out) ...
 *     cn_spec_chain_take(s);
 *   }
 *   n = cn_spec_chain_batch(s, target_kv, first, tokens, pos, src, rows, parent, sampler, acc_u, acc_q, &sb, &dyn);
 *   ... one target forward with token_src = src, src_ids = the buffer, accept_parent = parent, and dyn
 *       where its layout is set; a sampled tree's with the sampler's rule as accept_sample, acc_u,
 *       acc_q and rows of the target's for accept_rows ...
 *   cn_spec_chain_accept(s, target_kv, this sequence's acceptance result, out, &n_out, stats);
 *
 * cn_spec_chain_piece writes at most `room` tokens at index `first` (a level is never split; a
 * catch-up is chunked) and returns their count, or 0 when the piece does not fit. A sampled tree's
 * piece also writes its rows' uniforms u [rows][K] and q_out [rows] from row_first (both unused,
 * may be NULL, for greedy trees); its verification writes acc_u [2 n] at 2 first and acc_q [n] at
 * first (from the sampler's rng, as cn_spec_accept draws them). The result is the sequence's part
 * of the forward's accept_out (model/forward.h). Only chained specs draft so; cn_spec_chain_batch
 * and cn_spec_chain_accept also verify a greedy tree that this step grew on the host
 * (cn_spec_draft_begin .. _end; its tokens from the host: src -1), so that one verification with
 * acceptance where the logits are serves a batch of both kinds. */
int cn_spec_chain_begin(cn_spec *s, cn_kv_seq *target_kv, const int32_t *tokens, int n_tokens, int K,
                        canopy_stats *stats);
int cn_spec_chain_drafting(cn_spec *s);
int cn_spec_chain_piece(cn_spec *s, int first, int room, int32_t *tokens, int32_t *pos, int32_t *src, int32_t *rows,
                        int row_first, int ids_row, double *u, float **q_out, struct cn_seq_batch *sb,
                        struct cn_dyn_step *dyn);
void cn_spec_chain_take(cn_spec *s);
int cn_spec_chain_batch(cn_spec *s, cn_kv_seq *target_kv, int first, int32_t *tokens, int32_t *pos, int32_t *src,
                        int32_t *rows, int32_t *parent, cn_sampler *sampler, double *acc_u, float **acc_q,
                        struct cn_seq_batch *sb, struct cn_dyn_step *dyn);
int cn_spec_chain_accept(cn_spec *s, cn_kv_seq *target_kv, const int32_t *result, int32_t *out, int *n_out,
                         canopy_stats *stats);

/* A sampled spec's rule for its draft's draws (its sampling params'; NULL for greedy): chained
 * sampled specs with equal rules share draft forwards and one verification. */
const cn_sample_rule *cn_spec_draw_rule(const cn_spec *s);

/* The draft model (sessions with the same one share draft forwards). */
canopy_model *cn_spec_draft_model(const cn_spec *s);

/* Rewinds the draft's cache to at most `len` tokens (after the session truncates). */
void cn_spec_truncate(cn_spec *s, int len);

#endif
