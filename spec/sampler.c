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

cn_sample_rule cn_sampler_rule(const cn_sampler *s) {
  return (cn_sample_rule){.temperature = s->p.temperature, .top_k = s->p.top_k, .top_p = s->p.top_p};
}

void cn_sampler_probs(cn_sampler *s, const float *logits, float *probs) {
  cn_sample_rule r = cn_sampler_rule(s);
  cn_cpu_sample_probs(&r, logits, s->vocab, s->idx, s->prob, probs);
}

int32_t cn_sampler_sample(cn_sampler *s, const float *logits) {
  if (s->p.temperature == 0) return cn_cpu_argmax(logits, s->vocab);
  cn_sample_rule r = cn_sampler_rule(s);
  return cn_cpu_sample(&r, logits, s->vocab, cn_rng_uniform(&s->rng), s->idx, s->prob, s->dist);
}
