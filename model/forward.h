/* The one forward pass: prefill, decode and tree verification differ only in the batch. */
#ifndef CANOPY_MODEL_FORWARD_H
#define CANOPY_MODEL_FORWARD_H

#include <stdint.h>

#include "model/model.h"

/* One sequence's share of a batch. Its n tokens are written to cache slots
 * len + tree_prev .. len + tree_prev + n - 1 (len = cn_kv_seq_len before the call) and attend to the committed prefix plus each other
 * under the mask; the forward reserves the slots but does not commit them (the caller commits
 * all of them after prefill/decode, or the accepted ones after verification). */
typedef struct cn_seq_batch {
  cn_kv_seq *kv;
  int first;                 /* index of the sequence's first token in the batch arrays */
  int n;
  /* Uncommitted slots len .. len + tree_prev - 1 that an earlier forward of this step wrote (a
   * draft tree's upper levels): this forward's tokens go after them and may attend to them
   * through the mask. 0 for prefill, decode and verification. */
  int tree_prev;
  const int32_t *tree_pos;   /* [tree_prev + n] positions of all those slots; NULL if tree_prev == 0 */
  const uint64_t *tree_mask; /* NULL: causal. Else [n][(tree_prev + n + 63) / 64]: bit j of row i
                                set when token i may attend to new slot j (ancestors and itself). */
} cn_seq_batch;

/* n ids (uninitialised) on m's backend. CANOPY_ERR_UNSUPPORTED when the backend cannot chain
 * forwards; CANOPY_ERR_NO_MEMORY / CANOPY_ERR_DEVICE naming the bytes. */
int cn_ids_create(canopy_model *m, int n, cn_ids *out);
void cn_ids_free(canopy_model *m, cn_ids *ids);

/* rows x the model's vocab floats (uninitialised) on m's backend, for any model with the same
 * vocabulary on the same backend. Errors as cn_ids_create. */
int cn_rows_create(canopy_model *m, int rows, cn_rows *out);
void cn_rows_free(canopy_model *m, cn_rows *r);
/* r holds at least `rows` rows: made anew (its contents dropped) when it holds fewer. */
int cn_rows_reserve(canopy_model *m, cn_rows *r, int rows);

/* A dynamic (EAGLE-2) tree grown where the draft's picks are (kernels/tree_dyn.h): its state in
 * `ids`, its shape `layout`, sequence `seq` of the batch. A forward may grow it, be staged from it,
 * or both. */
typedef struct cn_dyn_step {
  const struct cn_dyn_layout *layout;
  cn_ids *ids;
  int seq;
  /* > 0: after the forward, level grow - 1 grows from the top ids and top_logp of logit rows
   * row.. (1 row at level 0: the sequence's last token; K after: its tokens), which the batch must
   * ask for (top_k >= K). A device backend grows where they are and leaves the host's top and
   * top_logp unwritten. */
  int grow, row;
  /* The sequence's tree part comes from the state: draft level `stage` >= 1 (K tokens after
   * (stage - 1) K tree slots) or, -1, the verification (T tokens, acceptance over the staged
   * parents); 0: none. Its tokens (the root's aside) come from there too. mask, pos, tree_pos,
   * parent are the caller's arrays that the batch also names (the sequence's tree_mask and
   * tree_pos, and the batch's pos and accept_parent from its first token): the forward fills them
   * where ids are host memory, a device backend its copies. pos0 is the root's position. */
  int stage, pos0;
  uint64_t *mask;
  int32_t *pos, *tree_pos, *parent;
  /* stage -1: host [4 T + 1] receives the tree it staged: t_token, t_parent, t_pick, t_fed, t_n. */
  int32_t *tree_out;
} cn_dyn_step;

typedef struct cn_batch {
  int n_tokens;
  const int32_t *tokens;     /* [n_tokens] */
  const int32_t *pos;        /* [n_tokens] rope positions */
  int n_seqs;
  const cn_seq_batch *seqs;  /* [n_seqs], tokens of one sequence contiguous */
  int n_logits;
  const int32_t *logit_rows; /* [n_logits] token indices whose logits are wanted */
  /* Optional: top [n_logits][top_k] receives the top_k largest logits' indices of each requested
   * row in descending order (top_k 0 means 1: the argmax, the first on ties, as cn_cpu_argmax),
   * and top_logp, if not NULL, their log-softmax; computed where the logits are, so the logits
   * themselves are not copied out and cn_forward's `logits` may be NULL. Greedy verification
   * needs the argmax, a greedy draft level its top children (top_k <= 32). */
  int32_t *top;
  int top_k;
  float *top_logp;
  /* Optional, with top: top[i] is instead the token `sample`'s rule draws from row i with the
   * uniform u[i] (host [n_logits]), drawn where the logits are (the backend's sample_rows):
   * sampled decoding without speculation needs only the ids. */
  const cn_sample_rule *sample;
  const double *u;
  /* Optional, chaining forwards on the backend (cn_ids above):
   *  - token_src [n_tokens]: where token_src[i] >= 0, token i is element token_src[i] of src_ids
   *    (ids an earlier forward wrote) and tokens[i] is ignored;
   *  - top_ids: with top, the top ids [n_logits][top_k] also go to elements top_ids_at.. of
   *    top_ids; a backend that keeps them there (CUDA) leaves `top` unwritten and does not wait
   *    for the device at the end of the forward;
   *  - accept_parent [n_tokens], with top (top_k 0 or 1), n_logits == n_tokens and the identity as
   *    logit_rows: greedy acceptance of each sequence's tokens as a token tree (token i's parent
   *    as an index inside its sequence, -1 for the sequence's first token, its root) where the
   *    top ids are (cn_cpu_accept_greedy): accept_out [2 n_seqs + 2 n_tokens] (host) receives,
   *    for sequence s from batch index f at 2 s + 2 f, the accepted count, the bonus, the accepted
   *    nodes and their tokens; `top` is unwritten on CUDA. */
  const int32_t *token_src;
  const cn_ids *src_ids;
  cn_ids *top_ids;
  int top_ids_at;
  const int32_t *accept_parent;
  int32_t *accept_out;
  /* Optional, sampled trees chained (kernels/cpu/tree_sampled.c):
   *  - q_out [n_logits], with sample: each row's distribution under the rule goes to q_out[i] (a
   *    row of a cn_rows; NULL: not kept), and top [n_logits][top_k] receives top_k draws without
   *    replacement from it, draw j of row i by u[i top_k + j] (cn_cpu_draw_distinct), which may
   *    also go to top_ids; a node's children are a sampled draft level's draws;
   *  - accept_sample, with accept_parent, accept_out and no top: stochastic acceptance of each
   *    sequence's tree under this rule (cn_cpu_accept_sampled), node i's draft distribution at
   *    accept_q[i] (a row a draft level kept, NULL for a node without children) and its uniforms
   *    accept_u [2 n_tokens] (u[2 i] tests node i, u[2 i + 1] draws a bonus at it). accept_rows
   *    (at least n_tokens + 2 n_seqs rows) is the forward's workspace for the target's
   *    distributions. */
  float *const *q_out;
  const cn_sample_rule *accept_sample;
  float *const *accept_q;
  const double *accept_u;
  const cn_rows *accept_rows;
  /* Optional: the batch's dynamic trees (cn_dyn_step), one a sequence at most;
   * CANOPY_ERR_UNSUPPORTED where the backend lacks them. */
  int n_dyn;
  const cn_dyn_step *dyn;
} cn_batch;

/* Runs the model over the batch and writes logits [n_logits][vocab] (host fp32), or their top
 * tokens to b->top. n_tokens must not exceed the model's max_batch. Errors: CANOPY_ERR_KV_EXHAUSTED, CANOPY_ERR_CONTEXT,
 * CANOPY_ERR_INVALID_ARG (bad token ids or counts), each with a message. */
int cn_forward(canopy_model *m, const cn_batch *b, float *logits);

#endif
