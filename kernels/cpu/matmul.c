/* y = x W^T with W [out][in] as stored in the checkpoint (no transposed copy at load).
 * n <= CN_SKINNY_MAX (decode, tree verification, draft levels): each thread walks a slice of W's
 * rows once and dots every row with all n inputs while it sits in L1, so W crosses the memory
 * bus once, as for a decode step. OpenBLAS sgemm packs all of W for a handful of rows (2.5-3.5x
 * slower than one streaming pass at n = 2..16), and its sgemv runs on OpenBLAS's own threads,
 * which then spin beside canopy's pool and slowed the next op of a decode step 2-3x on 2 vCPUs;
 * this kernel streamed W faster than sgemv at n = 1 too (2026-11-23, bench/RESULTS.md).
 * Larger n (prefill): OpenBLAS sgemm, compute-bound and near the machine's FLOP rate. */
#include "kernels/cpu/ops.h"

#include <cblas.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef struct skinny {
  float *y;
  const float *x, *w;
  int n, in, out, parts;
} skinny;

#ifdef __AVX512F__
/* Rows of W per block: four rows against up to four inputs keep 16 accumulators in registers,
 * and each W vector loaded serves every input (8 loads per 16 FMAs). */
#define ROWS 4

/* (sum a, sum b, sum c, sum d): four horizontal sums sharing their shuffles. */
static inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                              _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* One 16-wide column step of a block: masked loads past the end of a row read nothing. */
static inline __attribute__((always_inline)) void step(const float *w, const float *x, int in, int k, __mmask16 m,
                                                       int R, int T, const float *next, __m512 acc[ROWS][4]) {
  __m512 wv[ROWS];
  for (int q = 0; q < R; q++) {
    _mm_prefetch((const char *)(next + (size_t)q * in + k), _MM_HINT_T1);
    wv[q] = _mm512_maskz_loadu_ps(m, w + (size_t)q * in + k);
  }
  for (int t = 0; t < T; t++) {
    __m512 xv = _mm512_maskz_loadu_ps(m, x + (size_t)t * in + k);
    for (int q = 0; q < R; q++) acc[q][t] = _mm512_fmadd_ps(wv[q], xv, acc[q][t]);
  }
}

/* y[i0 + t][r + q] for q < R (1 or ROWS), t < T (1..4): called with constant R and T so the
 * loops unroll into registers. `next` is where the following block's rows start: it is
 * prefetched into L2 one block ahead, since the hardware prefetcher alone left the threads
 * waiting on memory (a forward's matmuls 20-25% slower at n = 1..8). */
static inline __attribute__((always_inline)) void block(const skinny *s, int r, int i0, int R, int T,
                                                        const float *next) {
  int in = s->in, k = 0;
  const float *w = s->w + (size_t)r * in, *x = s->x + (size_t)i0 * in;
  __m512 acc[ROWS][4];
  for (int q = 0; q < ROWS; q++)
    for (int t = 0; t < T; t++) acc[q][t] = _mm512_setzero_ps();
  for (; k + 16 <= in; k += 16) step(w, x, in, k, 0xffff, R, T, next, acc);
  if (k < in) step(w, x, in, k, (__mmask16)((1u << (in - k)) - 1), R, T, next, acc);
  for (int t = 0; t < T; t++) {
    float *y = s->y + (size_t)(i0 + t) * s->out + r;
    if (R == ROWS) _mm_storeu_ps(y, sum4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
    else *y = _mm512_reduce_add_ps(acc[0][t]);
  }
}

/* All n inputs against rows r .. r + R - 1, four inputs at a time. */
static inline __attribute__((always_inline)) void rows(const skinny *s, int r, int R, const float *next) {
  int i0 = 0;
  for (; i0 + 4 <= s->n; i0 += 4) block(s, r, i0, R, 4, next);
  switch (s->n - i0) {
  case 3: block(s, r, i0, R, 3, next); break;
  case 2: block(s, r, i0, R, 2, next); break;
  case 1: block(s, r, i0, R, 1, next); break;
  }
}

static void skinny_part(void *arg, int p) {
  const skinny *s = arg;
  int blocks = s->out / ROWS;
  int b0 = (int)((long)blocks * p / s->parts), b1 = (int)((long)blocks * (p + 1) / s->parts);
  const float *last = s->w + (size_t)(blocks > 0 ? blocks - 1 : 0) * ROWS * s->in;
  for (int b = b0; b < b1; b++) {
    const float *w = s->w + (size_t)b * ROWS * s->in;
    rows(s, b * ROWS, ROWS, b + 1 < blocks ? w + ROWS * s->in : last);
  }
  if (p == s->parts - 1) /* the rows past the last whole block */
    for (int r = blocks * ROWS; r < s->out; r++) rows(s, r, 1, s->w + (size_t)r * s->in);
}
#else
/* Fixed lane counts instead of a reassociated reduction: gcc -O3 vectorises this without
 * -ffast-math. */
#define LANES 16
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

static void skinny_part(void *arg, int p) {
  const skinny *s = arg;
  int r0 = (int)((long)s->out * p / s->parts), r1 = (int)((long)s->out * (p + 1) / s->parts);
  for (int r = r0; r < r1; r++) {
    const float *w = s->w + (size_t)r * s->in;
    for (int i = 0; i < s->n; i++) s->y[(size_t)i * s->out + r] = dot(w, s->x + (size_t)i * s->in, s->in);
  }
}
#endif

void cn_cpu_matmul(cn_threadpool *tp, float *y, const float *x, const float *w, const float *bias, int n, int in,
                   int out) {
  if (n <= CN_SKINNY_MAX) {
    skinny s = {y, x, w, n, in, out, 4 * cn_threadpool_size(tp)};
    cn_threadpool_run(tp, s.parts, skinny_part, &s);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
  }
  if (bias)
    for (int i = 0; i < n; i++)
      for (int j = 0; j < out; j++) y[(size_t)i * out + j] += bias[j];
}
