/* The one forward pass: prefill, decode and tree verification differ only in the batch. */
#ifndef CANOPY_MODEL_FORWARD_H
#define CANOPY_MODEL_FORWARD_H

#include <stdint.h>

#include "model/model.h"

/* One sequence's share of a batch. Its n tokens are written to cache slots len .. len + n - 1
 * (len = cn_kv_seq_len before the call) and attend to the committed prefix plus each other
 * under the mask; the forward reserves the slots but does not commit them (the caller commits
 * all of them after prefill/decode, or the accepted ones after verification). */
typedef struct cn_seq_batch {
  cn_kv_seq *kv;
  int first;                 /* index of the sequence's first token in the batch arrays */
  int n;
  const uint64_t *tree_mask; /* NULL: causal. Else [n][(n + 63) / 64]: bit j of row i set when
                                node i may attend to node j (its ancestors and itself). */
} cn_seq_batch;

typedef struct cn_batch {
  int n_tokens;
  const int32_t *tokens;     /* [n_tokens] */
  const int32_t *pos;        /* [n_tokens] rope positions */
  int n_seqs;
  const cn_seq_batch *seqs;  /* [n_seqs], tokens of one sequence contiguous */
  int n_logits;
  const int32_t *logit_rows; /* [n_logits] token indices whose logits are wanted */
} cn_batch;

/* Runs the model over the batch and writes logits [n_logits][vocab] (host fp32). n_tokens must
 * not exceed the model's max_batch. Errors: CANOPY_ERR_KV_EXHAUSTED, CANOPY_ERR_CONTEXT,
 * CANOPY_ERR_INVALID_ARG (bad token ids or counts), each with a message. */
int cn_forward(canopy_model *m, const cn_batch *b, float *logits);

#endif
