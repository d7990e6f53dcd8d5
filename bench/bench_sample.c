/* Choosing sampled tokens where the logits are: cn_cuda_sample (rows of device logits -> ids on
 * the host) against the path it replaces (the rows copied to the host, then cn_cpu_sample each),
 * side by side in one run, for SmolLM2's vocab and a few rules. Times are host wall clock around
 * the whole choice (launches, copies, sync), median of --reps after a warm-up: what a decode step
 * pays for its token.
 *
 * usage: bench_sample [--vocab V] [--reps N]   (default 49152, 20; the copy+cpu side of 64 rows with
 * top-p sorts 64 rows of the vocab on one core, ~0.3 s a rep) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_util.h"
#include "canopy.h"
#include "kernels/cpu/ops.h"

#ifndef CANOPY_HAVE_CUDA
int main(void) {
  fprintf(stderr, "bench_sample: this build of canopy has no CUDA support\n");
  return 1;
}
#else
#include "kernels/cuda/cuda_ops.h"

static void check(int st, const char *what) {
  if (!st) return;
  fprintf(stderr, "bench_sample: %s: %s\n", what, canopy_last_error());
  exit(1);
}

int main(int argc, char **argv) {
  int V = 49152, reps = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--vocab"))
      V = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--reps"))
      reps = atoi(argv[i + 1]);
  }
  if (V <= 0 || reps <= 0) {
    fprintf(stderr, "usage: bench_sample [--vocab V] [--reps N]\n");
    return 2;
  }
  setvbuf(stdout, NULL, _IOLBF, 0); /* each row as it is measured, should a time limit cut the run */
  if (!cn_cuda_device_count()) {
    fprintf(stderr, "bench_sample: no CUDA device\n");
    return 1;
  }
  static const int row_counts[] = {1, 16, 64};
  static const cn_sample_rule rules[] = {{0.7f, 0, 1.0f}, {0.7f, 50, 1.0f}, {0.7f, 0, 0.9f}, {0.7f, 40, 0.9f}};
  const int max_rows = 64;
  cn_cuda_ctx *ctx;
  check(cn_cuda_ctx_create(0, &ctx), "context");
  size_t ws_bytes;
  check(cn_cuda_sample_workspace(ctx, max_rows, V, &ws_bytes), "workspace size");
  void *ws, *d_logits, *d_u, *d_ids;
  check(cn_cuda_malloc(ctx, &ws, ws_bytes), "workspace");
  check(cn_cuda_malloc(ctx, &d_logits, sizeof(float) * (size_t)max_rows * V), "logits");
  check(cn_cuda_malloc(ctx, &d_u, sizeof(double) * max_rows), "u");
  check(cn_cuda_malloc(ctx, &d_ids, sizeof(int32_t) * max_rows), "ids");
  float *logits = malloc(sizeof *logits * (size_t)max_rows * V), *prob = malloc(sizeof *prob * V),
        *dist = malloc(sizeof *dist * V);
  int32_t *idx = malloc(sizeof *idx * V), ids[64];
  double u[64], *t_dev = malloc(sizeof *t_dev * reps), *t_host = malloc(sizeof *t_host * reps);
  uint64_t s = 12345;
  for (size_t i = 0; i < (size_t)max_rows * V; i++) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    logits[i] = 8.0f * (float)((s >> 11) * 0x1.0p-53) - 4.0f; /* uniform logits in [-4, 4) */
  }
  for (int i = 0; i < max_rows; i++)
    u[i] = (i + 0.5) / max_rows;
  check(cn_cuda_memcpy_h2d(ctx, d_logits, logits, sizeof(float) * (size_t)max_rows * V), "upload");
  check(cn_cuda_memcpy_h2d(ctx, d_u, u, sizeof(double) * max_rows), "upload u");
  printf("vocab %d, %d reps, median ms per choice (all rows)\n", V, reps);
  printf("%5s %6s %6s %6s %12s %14s %8s\n", "rows", "T", "top_k", "top_p", "device (ms)", "copy+cpu (ms)", "ratio");
  for (size_t ri = 0; ri < sizeof row_counts / sizeof *row_counts; ri++)
    for (size_t k = 0; k < sizeof rules / sizeof *rules; k++) {
      int rows = row_counts[ri];
      const cn_sample_rule *r = &rules[k];
      for (int rep = -3; rep < reps; rep++) {
        double t0 = bench_now_s();
        check(cn_cuda_sample(ctx, d_ids, d_logits, rows, V, r->temperature, r->top_k, r->top_p, d_u, ws, ws_bytes),
              "sample");
        check(cn_cuda_memcpy_d2h(ctx, ids, d_ids, sizeof(int32_t) * rows), "ids");
        double t1 = bench_now_s();
        check(cn_cuda_memcpy_d2h(ctx, logits, d_logits, sizeof(float) * (size_t)rows * V), "logits");
        for (int i = 0; i < rows; i++)
          ids[i] = cn_cpu_sample(r, logits + (size_t)i * V, V, u[i], idx, prob, dist);
        double t2 = bench_now_s();
        if (rep >= 0) t_dev[rep] = t1 - t0, t_host[rep] = t2 - t1;
      }
      double d = bench_median(t_dev, reps) * 1e3, h = bench_median(t_host, reps) * 1e3;
      printf("%5d %6.2f %6d %6.2f %12.3f %14.3f %7.1fx\n", rows, r->temperature, r->top_k, r->top_p, d, h, h / d);
    }
  free(logits), free(prob), free(dist), free(idx), free(t_dev), free(t_host);
  cn_cuda_free(ctx, ws), cn_cuda_free(ctx, d_logits), cn_cuda_free(ctx, d_u), cn_cuda_free(ctx, d_ids);
  cn_cuda_ctx_free(ctx);
  return 0;
}
#endif
