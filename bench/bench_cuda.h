/* The two device ceilings the CUDA benchmarks compare with, measured in the run itself: the copy
 * bandwidth (a 1 GiB device-to-device copy, read plus written bytes over the median time) and the
 * dense bf16 GEMM rate (a cuBLAS 8192^3 product on random data). Each returns a negative value
 * when a CUDA call failed (canopy_last_error() says which). */
#ifndef CANOPY_BENCH_BENCH_CUDA_H
#define CANOPY_BENCH_BENCH_CUDA_H

#include <stdio.h>
#include <stdlib.h>

#include "bench/bench_util.h"
#include "canopy.h"
#include "kernels/cuda/cuda_ops.h"

#define BENCH_CUDA_REPS_MAX 64

/* A canopy call that must succeed: on failure the benchmark exits, naming the call and the error. */
#define CK(call)                                                                                                       \
  do {                                                                                                                 \
    int st_ = (call);                                                                                                  \
    if (st_) {                                                                                                         \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, canopy_last_error());                             \
      exit(1);                                                                                                         \
    }                                                                                                                  \
  } while (0)

#define BENCH_CUDA_GROUPS 7

/* Median of BENCH_CUDA_GROUPS device-event timings of `per` back-to-back calls f(arg, i), in
 * microseconds, after `warmups` calls and a wait for them; i counts every call from 0, so f can
 * rotate through its buffers. */
static inline double bench_cuda_time_us(cn_cuda_ctx *ctx, cn_cuda_timer *tm, void (*f)(void *, int), void *arg,
                                        int warmups, int per) {
  double t[BENCH_CUDA_GROUPS];
  int i = 0;
  while (i < warmups) f(arg, i++);
  CK(cn_cuda_sync(ctx));
  for (int g = 0; g < BENCH_CUDA_GROUPS; g++) {
    float ms;
    CK(cn_cuda_timer_start(tm));
    for (int k = 0; k < per; k++) f(arg, i++);
    CK(cn_cuda_timer_stop(tm, &ms));
    t[g] = 1e3 * ms / per;
  }
  return bench_median(t, BENCH_CUDA_GROUPS);
}

/* Bytes/s, median of reps (<= BENCH_CUDA_REPS_MAX) copies after two warm-ups. */
static inline double bench_cuda_copy_bandwidth(cn_cuda_ctx *ctx, cn_cuda_timer *tm, int reps) {
  const size_t bytes = (size_t)1 << 30;
  double t[BENCH_CUDA_REPS_MAX];
  void *a = NULL, *b = NULL;
  int st = cn_cuda_malloc(ctx, &a, bytes);
  if (!st) st = cn_cuda_malloc(ctx, &b, bytes);
  if (!st) st = cn_cuda_memset(ctx, a, 0x5A, bytes);
  if (reps > BENCH_CUDA_REPS_MAX) reps = BENCH_CUDA_REPS_MAX;
  for (int r = -2; r < reps && !st; r++) {
    float ms = 0.0f;
    st = cn_cuda_timer_start(tm);
    if (!st) st = cn_cuda_memcpy_d2d(ctx, b, a, bytes);
    if (!st) st = cn_cuda_timer_stop(tm, &ms);
    if (r >= 0) t[r] = ms * 1e-3;
  }
  cn_cuda_free(ctx, a);
  cn_cuda_free(ctx, b);
  return st ? -1.0 : 2.0 * (double)bytes / bench_median(t, reps);
}

/* FLOP/s of y = x W^T at 8192^3 in bf16 (cuBLAS), median of 5 after a warm-up. */
static inline double bench_cuda_gemm_flops(cn_cuda_ctx *ctx, cn_cuda_timer *tm) {
  const int n = 8192;
  const size_t elems = (size_t)n * n;
  double t[5];
  void *x = NULL, *w = NULL, *y = NULL;
  int st = cn_cuda_malloc(ctx, &x, elems * sizeof(cn_bf16));
  if (!st) st = cn_cuda_malloc(ctx, &w, elems * sizeof(cn_bf16));
  if (!st) st = cn_cuda_malloc(ctx, &y, elems * sizeof(cn_bf16));
  if (!st) st = cn_cuda_random_bf16(ctx, x, elems, 1, 1.0f, 0.0f);
  if (!st) st = cn_cuda_random_bf16(ctx, w, elems, 2, 1.0f, 0.0f);
  for (int r = -1; r < 5 && !st; r++) {
    float ms = 0.0f;
    st = cn_cuda_timer_start(tm);
    if (!st) st = cn_cuda_matmul(ctx, y, CN_CUDA_BF16, x, CN_CUDA_BF16, w, NULL, n, n, n);
    if (!st) st = cn_cuda_timer_stop(tm, &ms);
    if (r >= 0) t[r] = ms * 1e-3;
  }
  cn_cuda_free(ctx, x), cn_cuda_free(ctx, w), cn_cuda_free(ctx, y);
  return st ? -1.0 : 2.0 * n * (double)n * n / bench_median(t, 5);
}

/* Both ceilings, printed; *gbs in GB/s, *tflops in TFLOP/s. Returns 0, or 1 after saying on
 * stderr (as `who`) which call failed. */
static inline int bench_cuda_ceilings(cn_cuda_ctx *ctx, cn_cuda_timer *tm, const char *who, double *gbs,
                                      double *tflops) {
  *gbs = bench_cuda_copy_bandwidth(ctx, tm, 5) * 1e-9;
  *tflops = bench_cuda_gemm_flops(ctx, tm) * 1e-12;
  if (*gbs <= 0 || *tflops <= 0) {
    fprintf(stderr, "%s: measuring the ceilings: %s\n", who, canopy_last_error());
    return 1;
  }
  printf("copy bandwidth (1 GiB device-to-device, read + write): %.0f GB/s\n", *gbs);
  printf("dense bf16 matrix rate (cuBLAS 8192^3 GEMM, random data): %.0f TFLOP/s\n", *tflops);
  return 0;
}

#endif
