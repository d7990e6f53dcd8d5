#include "spec/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "kernels/cpu/ops.h"

canopy_sampling_params canopy_sampling_default_params(void) {
  return (canopy_sampling_params){.temperature = 0.0f, .top_k = 0, .top_p = 1.0f, .seed = 42};
}

static uint64_t splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void cn_rng_seed(cn_rng *r, uint64_t seed) {
  for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t cn_rng_next(cn_rng *r) {
  uint64_t *s = r->s, out = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return out;
}

double cn_rng_uniform(cn_rng *r) { return (double)(cn_rng_next(r) >> 11) * 0x1.0p-53; }

int cn_sampler_init(cn_sampler *s, const canopy_sampling_params *p, int vocab) {
  memset(s, 0, sizeof *s);
  if (p->temperature < 0 || !isfinite(p->temperature))
    return cn_error(CANOPY_ERR_INVALID_ARG, "sampling: temperature %g must be >= 0", p->temperature);
  if (p->top_k < 0) return cn_error(CANOPY_ERR_INVALID_ARG, "sampling: top_k %d must be >= 0", p->top_k);
  if (!(p->top_p > 0 && p->top_p <= 1)) return cn_error(CANOPY_ERR_INVALID_ARG, "sampling: top_p %g must be in (0, 1]", p->top_p);
  s->p = *p;
  s->vocab = vocab;
  cn_rng_seed(&s->rng, p->seed);
  s->idx = malloc(sizeof *s->idx * (size_t)vocab);
  s->prob = malloc(sizeof *s->prob * (size_t)vocab);
  s->dist = malloc(sizeof *s->dist * (size_t)vocab);
  if (!s->idx || !s->prob || !s->dist) {
    cn_sampler_free(s);
    return cn_error(CANOPY_ERR_NO_MEMORY, "sampling: out of memory");
  }
  return CANOPY_OK;
}

void cn_sampler_free(cn_sampler *s) {
  free(s->idx);
  free(s->prob);
  free(s->dist);
  s->idx = NULL;
  s->prob = NULL;
  s->dist = NULL;
}

/* Descending by logit, ties by lower id (a total order, so the kept set is deterministic). */
static int by_logit_desc(const void *a, const void *b, void *keys) {
  int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
  float x = ((const float *)keys)[i], y = ((const float *)keys)[j];
  return x > y ? -1 : x < y ? 1 : (i > j) - (i < j);
}

/* Moves the k largest logits' ids to idx[0..k) (unordered), by quickselect: O(vocab). */
static void select_top(int32_t *idx, int n, int k, const float *logits) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    float pivot = logits[idx[(lo + hi) / 2]];
    int i = lo, j = hi;
    while (i <= j) {
      while (logits[idx[i]] > pivot) i++;
      while (logits[idx[j]] < pivot) j--;
      if (i <= j) {
        int32_t t = idx[i];
        idx[i++] = idx[j];
        idx[j--] = t;
      }
    }
    if (k - 1 <= j) hi = j;
    else if (k - 1 >= i) lo = i;
    else break;
  }
}

void cn_sampler_probs(cn_sampler *s, const float *logits, float *probs) {
  int V = s->vocab;
  memset(probs, 0, sizeof *probs * (size_t)V);
  if (s->p.temperature == 0) {
    probs[cn_cpu_argmax(logits, V)] = 1.0f;
    return;
  }
  int n = V;
  for (int i = 0; i < V; i++) s->idx[i] = i;
  if (s->p.top_k > 0 && s->p.top_k < V) {
    select_top(s->idx, V, s->p.top_k, logits);
    n = s->p.top_k;
  }
  /* Sorting is only needed to find the top-p prefix; top-k alone needs no order. */
  if (s->p.top_p < 1) qsort_r(s->idx, (size_t)n, sizeof *s->idx, by_logit_desc, (void *)logits);
  float inv_t = 1.0f / s->p.temperature, mx = -INFINITY;
  for (int i = 0; i < n; i++) mx = fmaxf(mx, logits[s->idx[i]] * inv_t);
  double sum = 0;
  for (int i = 0; i < n; i++) sum += s->prob[i] = expf(logits[s->idx[i]] * inv_t - mx);
  if (s->p.top_p < 1) {
    /* HF's TopPLogitsWarper keeps tokens whose cumulative mass *before* them is < top_p
     * (at least one), i.e. the smallest prefix reaching top_p. */
    double cum = 0;
    int keep = 0;
    while (keep < n && (keep == 0 || cum < s->p.top_p * sum)) cum += s->prob[keep++];
    n = keep;
    sum = cum;
  }
  for (int i = 0; i < n; i++) probs[s->idx[i]] = (float)(s->prob[i] / sum);
}

int32_t cn_sampler_sample(cn_sampler *s, const float *logits) {
  if (s->p.temperature == 0) return cn_cpu_argmax(logits, s->vocab);
  cn_sampler_probs(s, logits, s->dist);
  double u = cn_rng_uniform(&s->rng), cum = 0;
  int last = 0;
  for (int i = 0; i < s->vocab; i++) {
    if (s->dist[i] <= 0) continue;
    cum += s->dist[i];
    last = i;
    if (u < cum) return i;
  }
  return last; /* rounding left u above the total mass */
}
