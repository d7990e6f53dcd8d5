/* 2^x on the FMA pipe: a cubic for 2^f on [-1/2, 1/2] and the integer part added to the exponent
 * bits, instead of the special-function unit's ex2. A multiprocessor issues 16 ex2 a clock
 * against 128 fp32 FMAs, so in attention with many query rows a share of the softmax's
 * exponentials computed this way can run beside the rest (FlashAttention-4's device; tree
 * attention, CANOPY_CUDA_TA_POLY_EXP). Relative error 7.48e-5 at worst (tests/test_cpu_ops.c), far
 * under bf16's 2^-9, to which the probabilities are rounded before the P V product.
 *
 * For the softmax's range: x <= 0 (or a rounding above), -inf and anything below -125 give
 * exactly 0, as ex2 does for -inf. Plain C for the host (the test) and CUDA C for the kernels. */
#ifndef CANOPY_KERNELS_CUDA_EXP2_POLY_H
#define CANOPY_KERNELS_CUDA_EXP2_POLY_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define CN_EXP2_FN static __host__ __device__ __forceinline__
#else
#define CN_EXP2_FN static inline
#endif

/* The cubic's coefficients: a least-squares fit of the relative error, reweighted to minimax
 * (Lawson), rounded to fp32. */
#define CN_EXP2_C0 9.999280572e-01f
#define CN_EXP2_C1 6.932609677e-01f
#define CN_EXP2_C2 2.426111400e-01f
#define CN_EXP2_C3 5.517166853e-02f

CN_EXP2_FN uint32_t cn_exp2_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

CN_EXP2_FN float cn_exp2_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

CN_EXP2_FN float cn_exp2_poly(float x) {
  /* Adding 1.5 * 2^23 rounds xc to an integer j held in the sum's low mantissa bits; the sum's
   * bits shifted left by 23 are then j * 2^23 modulo 2^32 (1.5 * 2^23's own bits vanish), which
   * added to 2^f's bits scales it by 2^j. From -125 on, 2^f's exponent stays normal. */
  const float shifter = 12582912.0f;
  const float xc = fmaxf(x, -125.0f);
#ifdef __CUDA_ARCH__
  const float t = __fadd_rn(xc, shifter), j = __fadd_rn(t, -shifter), f = __fadd_rn(xc, -j);
#else
  const float t = xc + shifter, j = t - shifter, f = xc - j;
#endif
  const float p = fmaf(fmaf(fmaf(CN_EXP2_C3, f, CN_EXP2_C2), f, CN_EXP2_C1), f, CN_EXP2_C0);
  const float y = cn_exp2_float(cn_exp2_bits(p) + (cn_exp2_bits(t) << 23));
  return x < -125.0f ? 0.0f : y;
}

#endif
