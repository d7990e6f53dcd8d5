/* Turning logits into tokens: greedy, temperature, top-k, top-p, with a seeded RNG. */
#ifndef CANOPY_SPEC_SAMPLER_H
#define CANOPY_SPEC_SAMPLER_H

#include <stdint.h>

#include "canopy.h"
#include "kernels/cpu/ops.h"

typedef struct cn_rng {
  uint64_t s[4]; /* xoshiro256** state */
} cn_rng;

void cn_rng_seed(cn_rng *r, uint64_t seed);
uint64_t cn_rng_next(cn_rng *r);
/* Uniform in [0, 1) with 53 random bits. */
double cn_rng_uniform(cn_rng *r);

typedef struct cn_sampler {
  canopy_sampling_params p;
  cn_rng rng;
  int vocab;
  int32_t *idx;   /* [vocab] candidate ids, scratch */
  float *prob;    /* [vocab] scratch: unnormalised mass of idx[i] */
  float *dist;    /* [vocab] the distribution of the last draw */
} cn_sampler;

int cn_sampler_init(cn_sampler *s, const canopy_sampling_params *p, int vocab);
void cn_sampler_free(cn_sampler *s);

/* The distribution the sampler draws from, as HF's logits processors define it: logits / T,
 * keep the top_k largest, keep the smallest prefix (by descending probability) whose mass
 * reaches top_p, renormalise. Writes probs [vocab] (zeros outside the kept set). With
 * temperature 0 it is one-hot on the argmax. */
void cn_sampler_probs(cn_sampler *s, const float *logits, float *probs);

/* The sampler's rule, for the backends' sample_rows (the same rule on the device). */
cn_sample_rule cn_sampler_rule(const cn_sampler *s);

/* Chooses a token from logits: argmax when temperature == 0, else a draw from
 * cn_sampler_probs's distribution with u = cn_rng_uniform(&s->rng) (cn_cpu_sample), so a caller
 * that draws u itself and samples elsewhere (on the device) consumes the same random stream. */
int32_t cn_sampler_sample(cn_sampler *s, const float *logits);

#endif
