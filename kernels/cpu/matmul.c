/* y = x W^T with W [out][in] as stored in the checkpoint (no transposed copy at load).
 * n == 1 (decode): OpenBLAS sgemv, which streams W at the read bandwidth.
 * 2 <= n <= CN_SKINNY_MAX (tree verification, draft levels): sgemm packs all of W for a handful of
 * rows and ran 2.5-3.5x slower per call than sgemv here (3072x576, n = 2..16, 2026-11-22), so
 * each thread walks a slice of W's rows once and dots every row with the n inputs while it sits
 * in L1: W crosses the memory bus once, as for a decode step.
 * Larger n (prefill): OpenBLAS sgemm, compute-bound and near the machine's FLOP rate. */
#include "kernels/cpu/ops.h"

#include <cblas.h>

#define LANES 16

typedef struct skinny {
  float *y;
  const float *x, *w;
  int n, in, out, parts;
} skinny;

/* Fixed lane counts instead of a reassociated reduction: gcc -O3 vectorises this without
 * -ffast-math. */
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
