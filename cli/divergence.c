#include "cli/divergence.h"

#include <math.h>

/* Top-2 gap of logits [V]: absolute, relative to |top|, and the runner-up's id. */
static void top2(const float *l, int V, double *gap, double *rel, int32_t *second) {
  int a = 0, b = -1;
  for (int i = 1; i < V; i++) {
    if (l[i] > l[a])
      b = a, a = i;
    else if (b < 0 || l[i] > l[b])
      b = i;
  }
  if (b < 0) b = a; /* a vocabulary of one */
  *gap = (double)l[a] - l[b];
  *rel = l[a] != 0 ? *gap / fabs(l[a]) : INFINITY;
  *second = b;
}

/* The logits after prompt + tokens [n], one token per forward after the prompt (as a target-only
 * session decodes), into the session *s (the caller frees it). */
static int decode_logits(canopy_model *m, const int32_t *prompt, int n_prompt, const int32_t *tokens, int n,
                         const float **logits, canopy_session **s) {
  int st = canopy_session_create(m, NULL, s);
  if (!st) st = canopy_session_append(*s, prompt, n_prompt);
  for (int i = 0; !st && i < n; i++)
    st = canopy_session_append(*s, &tokens[i], 1);
  if (!st) st = canopy_session_logits(*s, logits, NULL);
  return st ? -1 : 0;
}

int cli_find_divergence(canopy_model *m, const int32_t *prompt, int n_prompt, const int32_t *base, int n_base,
                        const int32_t *other, int n_other, cli_divergence *d) {
  int j = 0;
  while (j < n_base && j < n_other && base[j] == other[j])
    j++;
  if (j == n_base && j == n_other) return 1;
  canopy_model_info info;
  canopy_model_get_info(m, &info);
  *d = (cli_divergence){
      .position = j, .base_token = j < n_base ? base[j] : -1, .other_token = j < n_other ? other[j] : -1};
  const float *l;
  canopy_session *s = NULL;
  int rc = decode_logits(m, prompt, n_prompt, base, j, &l, &s);
  if (!rc) top2(l, info.vocab_size, &d->gap, &d->rel_gap, &d->runner_up);
  canopy_session_free(s);
  if (rc) return -1;
  return 0;
}
