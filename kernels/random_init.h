/* Deterministic random weights from a counter-based hash, for models initialised without a
 * checkpoint (`--random-weights`). Both backends compute element i of a tensor with this one
 * function: a hash of (tensor stream, i) -> uniform on [-1, 1) with 24 bits (exact in fp32) ->
 * one fused multiply-add -> bf16, round to nearest even. Every step is exact or correctly
 * rounded, so the CPU (which widens the bf16 value back to fp32) and the device hold bit-equal
 * weights and a random model can be compared across backends like a checkpoint. Included by C
 * and CUDA sources. */
#ifndef CANOPY_KERNELS_RANDOM_INIT_H
#define CANOPY_KERNELS_RANDOM_INIT_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define CN_HD static inline __host__ __device__
#else
#define CN_HD static inline
#endif

/* splitmix64's finaliser: a bijection that spreads every input bit over the output. */
CN_HD uint64_t cn_mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* The stream of the index-th tensor a model initialises from `seed`. */
CN_HD uint64_t cn_random_stream(uint64_t seed, uint64_t index) { return cn_mix64(seed ^ cn_mix64(index + 1)); }

/* The uniform half-width that gives standard deviation `std`. */
CN_HD float cn_random_scale(float std) { return std * 1.7320508075688772f; }

/* Element i: bf16 bits of mean + scale * u, u uniform on [-1, 1). */
CN_HD uint16_t cn_random_weight_bf16(uint64_t stream, uint64_t i, float scale, float mean) {
  uint64_t h = cn_mix64(stream ^ cn_mix64(i));
  float u = (float)(h >> 40) * 0x1p-23f - 1.0f; /* k 2^-23 - 1 with k < 2^24: exact */
  union {
    float f;
    uint32_t u;
  } v = {fmaf(u, scale, mean)};
  uint32_t b = v.u;
  b += 0x7fffu + ((b >> 16) & 1u); /* finite by construction: no NaN case */
  return (uint16_t)(b >> 16);
}

#endif
