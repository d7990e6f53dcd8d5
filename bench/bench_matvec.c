/* Decode's matrix-vector products, two variants side by side: OpenBLAS sgemv (what the engine
 * uses) and a hand-written AVX-512 row-dot on canopy's thread pool. Prints GB/s of weights
 * streamed for SmolLM2-135M's shapes, rotating over enough copies that the L3 cannot hold them.
 * usage: bench_matvec [--threads N] */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "bench/bench_util.h"
#include "cli/cpu_tune.h"
#include "kernels/cpu/ops.h"

typedef struct job {
  const float *w, *x;
  float *y;
  int in, out, parts;
} job;

static void rows_part(void *arg, int p) {
  job *j = arg;
  int r0 = (int)((long)j->out * p / j->parts), r1 = (int)((long)j->out * (p + 1) / j->parts);
  for (int r = r0; r < r1; r++) {
    const float *w = j->w + (size_t)r * j->in;
    float s = 0;
    int k = 0;
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; k + 32 <= j->in; k += 32) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(j->x + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(j->x + k + 16), a1);
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
    for (; k < j->in; k++) s += w[k] * j->x[k];
    j->y[r] = s;
  }
}

int main(int argc, char **argv) {
  cli_tune_openblas(argv);
  int threads = 2;
  if (argc == 3 && !strcmp(argv[1], "--threads")) threads = atoi(argv[2]);
  openblas_set_num_threads(threads);
  cn_threadpool *tp;
  if (cn_threadpool_create(threads, &tp)) return 1;
  /* LM head, fused QKV, fused gate/up, down projection, o projection of SmolLM2-135M. */
  int shapes[][2] = {{49152, 576}, {960, 576}, {3072, 576}, {576, 1536}, {576, 576}};
  printf("OpenBLAS kernels %s, %d threads\n%-12s %14s %14s\n", openblas_get_corename(), threads, "out x in",
         "sgemv GB/s", "avx512 GB/s");
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
    int M = shapes[s][0], K = shapes[s][1];
    size_t bytes = sizeof(float) * (size_t)M * K;
    int copies = 1 + (int)(((size_t)600 << 20) / bytes); /* > L3 (260 MiB) together */
    long reps = 1 + (long)(((size_t)2 << 30) / bytes);
    float **w = malloc(sizeof *w * (size_t)copies), *x = malloc(sizeof *x * (size_t)K), *y = malloc(sizeof *y * (size_t)M);
    for (int c = 0; c < copies; c++) {
      w[c] = malloc(bytes);
      for (size_t e = 0; e < (size_t)M * K; e++) w[c][e] = (float)(e % 7) * 0.1f;
    }
    for (int k = 0; k < K; k++) x[k] = 1.0f;
    double t0 = bench_now_s();
    for (long r = 0; r < reps; r++) cblas_sgemv(CblasRowMajor, CblasNoTrans, M, K, 1, w[r % copies], K, x, 1, 0, y, 1);
    double t_blas = (bench_now_s() - t0) / (double)reps;
    job j = {.x = x, .y = y, .in = K, .out = M, .parts = threads * 4};
    t0 = bench_now_s();
    for (long r = 0; r < reps; r++) {
      j.w = w[r % copies];
      cn_threadpool_run(tp, j.parts, rows_part, &j);
    }
    double t_own = (bench_now_s() - t0) / (double)reps;
    char name[32];
    snprintf(name, sizeof name, "%dx%d", M, K);
    printf("%-12s %14.1f %14.1f\n", name, (double)bytes / t_blas / 1e9, (double)bytes / t_own / 1e9);
    for (int c = 0; c < copies; c++) free(w[c]);
    free(w), free(x), free(y);
  }
  cn_threadpool_free(tp);
  return 0;
}
