/* The sampling rule (temperature, top-k, top-p) on the host: the reference the device sampler
 * (kernels/cuda/sample.cu) is tested against, and the rule spec/sampler.c draws with. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/ops.h"

/* Descending by logit, ties by lower id (a total order, so the kept set is deterministic). */
static int by_logit_desc(const void *a, const void *b, void *keys) {
  int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
  float x = ((const float *)keys)[i], y = ((const float *)keys)[j];
  return x > y ? -1 : x < y ? 1 : (i > j) - (i < j);
}

/* Whether id i comes before id j in the total order (logit descending, lower id first). */
static int before(const float *logits, int32_t i, int32_t j) {
  return logits[i] > logits[j] || (logits[i] == logits[j] && i < j);
}

/* Moves the first k ids of that order to idx[0..k) (unordered), by quickselect: O(vocab). With
 * the ids as the tie-break the kept set does not depend on the pivots, which lets the device
 * (a stable sort) keep exactly the same set when logits tie at the k-th place. */
static void select_top(int32_t *idx, int n, int k, const float *logits) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    int32_t pivot = idx[(lo + hi) / 2];
    int i = lo, j = hi;
    while (i <= j) {
      while (before(logits, idx[i], pivot))
        i++;
      while (before(logits, pivot, idx[j]))
        j--;
      if (i <= j) {
        int32_t t = idx[i];
        idx[i++] = idx[j];
        idx[j--] = t;
      }
    }
    if (k - 1 <= j)
      hi = j;
    else if (k - 1 >= i)
      lo = i;
    else
      break;
  }
}

void cn_cpu_sample_probs(const cn_sample_rule *r, const float *logits, int V, int32_t *idx, float *prob, float *probs) {
  memset(probs, 0, sizeof *probs * (size_t)V);
  if (r->temperature == 0) {
    probs[cn_cpu_argmax(logits, V)] = 1.0f;
    return;
  }
  int n = V;
  for (int i = 0; i < V; i++)
    idx[i] = i;
  if (r->top_k > 0 && r->top_k < V) {
    select_top(idx, V, r->top_k, logits);
    n = r->top_k;
  }
  /* Sorting is only needed to find the top-p prefix; top-k alone needs no order. */
  if (r->top_p < 1) qsort_r(idx, (size_t)n, sizeof *idx, by_logit_desc, (void *)logits);
  float inv_t = 1.0f / r->temperature, mx = -INFINITY;
  for (int i = 0; i < n; i++)
    mx = fmaxf(mx, logits[idx[i]] * inv_t);
  double sum = 0;
  for (int i = 0; i < n; i++)
    sum += prob[i] = expf(logits[idx[i]] * inv_t - mx);
  if (r->top_p < 1) {
    /* HF's TopPLogitsWarper keeps tokens whose cumulative mass *before* them is < top_p
     * (at least one), i.e. the smallest prefix reaching top_p. */
    double cum = 0;
    int keep = 0;
    while (keep < n && (keep == 0 || cum < r->top_p * sum))
      cum += prob[keep++];
    n = keep;
    sum = cum;
  }
  for (int i = 0; i < n; i++)
    probs[idx[i]] = (float)(prob[i] / sum);
}

int32_t cn_cpu_sample_draw(const float *dist, int V, double u) {
  double cum = 0;
  int last = 0;
  for (int i = 0; i < V; i++) {
    if (dist[i] <= 0) continue;
    cum += dist[i];
    last = i;
    if (u < cum) return i;
  }
  return last; /* rounding left u above the total mass */
}

int32_t cn_cpu_sample(const cn_sample_rule *r, const float *logits, int V, double u, int32_t *idx, float *prob,
                      float *dist) {
  if (r->temperature == 0) return cn_cpu_argmax(logits, V);
  cn_cpu_sample_probs(r, logits, V, idx, prob, dist);
  return cn_cpu_sample_draw(dist, V, u);
}
