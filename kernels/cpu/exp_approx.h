/* e^z in plain C that gcc -O3 vectorises without -ffast-math (a libm expf call in a loop keeps
 * it scalar): the attention softmax and SwiGLU call it per element. */
#ifndef CANOPY_KERNELS_CPU_EXP_APPROX_H
#define CANOPY_KERNELS_CPU_EXP_APPROX_H

#include <stdint.h>

/* e^z for z in [-87, 88], clamped to that range outside it (so 2^k stays a normal float):
 * 2^k e^r with k = round(z / ln2), |r| <= ln2/2, and a degree-7 Taylor polynomial for e^r;
 * relative error below 1e-7. */
static inline float cn_exp_clamped(float z) {
  float zc = z < -87.0f ? -87.0f : z > 88.0f ? 88.0f : z;
  float kf = (zc * 1.44269504f + 12582912.0f) - 12582912.0f; /* round(zc / ln2) */
  float r = zc - kf * 0.693145751953125f - kf * 1.42860682e-6f;
  float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
  union {
    int32_t i;
    float f;
  } two_k = {.i = ((int32_t)kf + 127) << 23};
  return p * two_k.f;
}

#endif
