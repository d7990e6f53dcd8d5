/* Where a greedy speculative run first leaves the target-only run, and how close the target's
 * choice was there (bench acceptance's losslessness report). */
#ifndef CANOPY_CLI_DIVERGENCE_H
#define CANOPY_CLI_DIVERGENCE_H

#include <stdint.h>

#include "canopy.h"

typedef struct cli_divergence {
  int position;        /* first index where the two outputs differ (or where one ends) */
  int32_t base_token;  /* the target-only token there, -1 if its output ended */
  int32_t other_token; /* the speculative run's token there, -1 if its output ended */
  /* The target's top-2 logit gap at that position (top minus runner-up, and that over |top|),
   * with the prefix fed one token per forward as the target-only run fed it (its own logits), and
   * the runner-up's id. The speculative run's own logits there are not observable: greedy
   * verification brings only each node's top id to the host. */
  double gap, rel_gap;
  int32_t runner_up;
} cli_divergence;

/* Fills d for outputs base [n_base] and other [n_other] after prompt [n_prompt]; returns 1 if they
 * are equal (d untouched), 0 if not, -1 (with canopy_last_error) if a replay forward failed. */
int cli_find_divergence(canopy_model *m, const int32_t *prompt, int n_prompt, const int32_t *base, int n_base,
                        const int32_t *other, int n_other, cli_divergence *d);

#endif
