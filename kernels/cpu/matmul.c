/* y = x W^T with W [out][in] as stored in the checkpoint (no transposed copy at load).
 * n == 1 (decode): OpenBLAS sgemv, which streams W at the read bandwidth.
 * 2 <= n <= CN_SKINNY_MAX (tree verification, draft levels): sgemm packs all of W for a handful of
 * rows and ran 2.5-3.5x slower per call than sgemv here (3072x576, n = 2..16, 2026-11-22), so
 * each thread walks a slice of W's rows once and dots every row with the n inputs while it sits
 * in L1: W crosses the memory bus once, as for a decode step.
 * Larger n (prefill): OpenBLAS sgemm, compute-bound and near the machine's FLOP rate. */
#include "kernels/cpu/ops.h"

#include <cblas.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define LANES 16

typedef struct skinny {
  float *y;
  const float *x, *w;
  int n, in, out, parts;
} skinny;

/* Fixed lane counts instead of a reassociated reduction: gcc -O3 vectorises this without
 * -ffast-math. */
#ifndef __AVX512F__
static float dot(const float *restrict a, const float *restrict b, int d) {
  float acc[LANES] = {0};
  int k = 0;
  for (; k + LANES <= d; k += LANES)
    for (int l = 0; l < LANES; l++) acc[l] += a[k + l] * b[k + l];
  for (; k < d; k++) acc[0] += a[k] * b[k];
  for (int w = LANES / 2; w > 0; w /= 2)
    for (int l = 0; l < w; l++) acc[l] += acc[l + w];
  return acc[0];
}
#endif

#ifdef __AVX512F__
/* Two rows of W against up to four inputs at a time, eight accumulators in registers: each W
 * vector loaded once serves four inputs, each input vector two rows (6 loads per 8 FMAs). */
static void rows2(const skinny *s, int r, int rows) {
  const float *w0 = s->w + (size_t)r * s->in, *w1 = rows > 1 ? w0 + s->in : w0;
  int in = s->in, body = in & ~15;
  for (int i0 = 0; i0 < s->n; i0 += 4) {
    int nt = s->n - i0 < 4 ? s->n - i0 : 4;
    const float *x[4];
    for (int t = 0; t < 4; t++) x[t] = s->x + (size_t)(i0 + (t < nt ? t : 0)) * in;
    __m512 a0[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    __m512 a1[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int k = 0; k < body; k += 16) {
      __m512 v0 = _mm512_loadu_ps(w0 + k), v1 = _mm512_loadu_ps(w1 + k);
      for (int t = 0; t < 4; t++) {
        __m512 xv = _mm512_loadu_ps(x[t] + k);
        a0[t] = _mm512_fmadd_ps(v0, xv, a0[t]);
        a1[t] = _mm512_fmadd_ps(v1, xv, a1[t]);
      }
    }
    for (int t = 0; t < nt; t++) {
      float s0 = _mm512_reduce_add_ps(a0[t]), s1 = _mm512_reduce_add_ps(a1[t]);
      for (int k = body; k < in; k++) s0 += w0[k] * x[t][k], s1 += w1[k] * x[t][k];
      s->y[(size_t)(i0 + t) * s->out + r] = s0;
      if (rows > 1) s->y[(size_t)(i0 + t) * s->out + r + 1] = s1;
    }
  }
}
#endif

static void skinny_part(void *arg, int p) {
  const skinny *s = arg;
  int r0 = (int)((long)s->out * p / s->parts), r1 = (int)((long)s->out * (p + 1) / s->parts);
#ifdef __AVX512F__
  for (int r = r0; r < r1; r += 2) rows2(s, r, r1 - r < 2 ? 1 : 2);
#else
  for (int r = r0; r < r1; r++) {
    const float *w = s->w + (size_t)r * s->in;
    for (int i = 0; i < s->n; i++) s->y[(size_t)i * s->out + r] = dot(w, s->x + (size_t)i * s->in, s->in);
  }
#endif
}

void cn_cpu_matmul(cn_threadpool *tp, float *y, const float *x, const float *w, const float *bias, int n, int in,
                   int out) {
  if (n == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, out, in, 1.0f, w, in, x, 1, 0.0f, y, 1);
  } else if (n <= CN_SKINNY_MAX) {
    skinny s = {y, x, w, n, in, out, 4 * cn_threadpool_size(tp)};
    cn_threadpool_run(tp, s.parts, skinny_part, &s);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
  }
  if (bias)
    for (int i = 0; i < n; i++)
      for (int j = 0; j < out; j++) y[(size_t)i * out + j] += bias[j];
}
