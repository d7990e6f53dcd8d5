/* The forward's matrix products on CUDA at n rows against the physical limits: each of
 * Llama-3-8B's projections (q/k/v, output, gate/up, down, LM head) as the engine calls it (bf16
 * input; fp32 output, or added to the fp32 residual stream), for n rows from decode's 1 to a
 * 128-node tree. Prints the time, the weight bytes over it as a share of the copy bandwidth
 * measured in the same run (the bound of a few-row product), the FLOP rate against a large
 * cuBLAS GEMM's, and a step's sum (32 layers and the head). Every variant is timed in the same
 * process, shape by shape, so the columns compare side by side:
 *   engine   what the forward runs: the few-row kernel (gemv.cu) up to 8 rows, cuBLAS above
 *   cublas   cuBLAS at every row count (cn_cuda_set_gemv_max_rows 0)
 *   tuned    the engine with cuBLAS's products tuned per shape (cn_cuda_set_gemm_tune; the first,
 *            untimed call of a shape tunes it), then each tuned shape's choice is listed
 * Every call reads a different copy of the weights (copies rotate until 256 MiB lie between two
 * uses of one, five times the 50 MB L2). Times are device-event medians of groups of back-to-back
 * calls, so a kernel's launch is inside them as in a forward. Back to back, a kernel that takes a
 * programmatic dependent launch (the few-row kernel) also fetches its first weights while the
 * call before it runs, which a forward, whose products follow small kernels, gives it less room
 * for: against cuBLAS (which cannot) the engine's columns read better than a step does. A 9-64
 * row kernel that won here by up to 4.7% made whole steps slower (bench/RESULTS.md, 2026-12-06);
 * bench_step decides.
 *
 *   bench_gemm [--rows 1,2,4,8,16,32,64,128] [--shape NAME] */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_util.h"

#ifdef CANOPY_HAVE_CUDA
#include "canopy.h"
#include "bench/bench_cuda.h"
#include "kernels/cuda/cuda_ops.h"

#define PER_GROUP 12
#define ROTATE_BYTES (256ull << 20)
#define MAX_ROWS_LIST 16
#define LAYERS 32

typedef struct shape {
  const char *name;
  int in, out;
  int add;   /* y += x W^T into fp32 (o-proj, down), else y = x W^T in fp32 */
  int per_step; /* times a Llama-3-8B step runs it */
} shape;

static const shape SHAPES[] = {
    {"qkv", 4096, 6144, 0, LAYERS},   {"o", 4096, 4096, 1, LAYERS},       {"gate_up", 4096, 28672, 0, LAYERS},
    {"down", 14336, 4096, 1, LAYERS}, {"lm_head", 4096, 128256, 0, 1},
};
#define N_SHAPES (int)(sizeof SHAPES / sizeof SHAPES[0])

enum { ENGINE, CUBLAS, TUNED, N_VARIANTS };
static const char *VARIANT_NAMES[N_VARIANTS] = {"engine", "cublas", "tuned"};

static cn_cuda_ctx *ctx;
static cn_cuda_timer *timer;

static void set_variant(int v) {
  CK(cn_cuda_set_gemv_max_rows(ctx, v == CUBLAS ? 0 : -1));
  CK(cn_cuda_set_gemm_tune(ctx, v == TUNED));
}

/* What tuning chose for each shape it timed. */
static void print_plans(void) {
  int n = cn_cuda_gemm_plans(ctx, NULL, 0);
  cn_cuda_gemm_plan_info *info = calloc((size_t)(n ? n : 1), sizeof *info);
  n = cn_cuda_gemm_plans(ctx, info, n);
  printf("\ntuned shapes (rows x in x out): cublasGemmEx's median, the kept kernel's, of the kernels timed\n");
  for (int i = 0; i < n; i++)
    printf("  %4d x %5d x %6d%s: %8.1f us -> %8.1f us (%.2fx), %s of %d\n", info[i].n, info[i].in, info[i].out,
           info[i].accumulate ? " +=" : "   ", info[i].us_default, info[i].us_kept,
           info[i].us_kept > 0 ? info[i].us_default / info[i].us_kept : 0.0, info[i].lt ? "cuBLASLt" : "cublasGemmEx",
           info[i].candidates);
  free(info);
}

typedef struct job {
  const shape *s;
  cn_bf16 **w;
  int copies, n;
  cn_bf16 *x;
  float *y;
} job;

static void run(void *arg, int i) {
  const job *j = arg;
  const shape *s = j->s;
  const cn_bf16 *w = j->w[i % j->copies];
  if (s->add)
    CK(cn_cuda_matmul_add(ctx, j->y, j->x, CN_CUDA_BF16, w, NULL, j->n, s->in, s->out));
  else
    CK(cn_cuda_matmul(ctx, j->y, CN_CUDA_F32, j->x, CN_CUDA_BF16, w, NULL, j->n, s->in, s->out));
}

static int parse_rows(const char *s, int *rows) {
  int k = 0;
  while (*s && k < MAX_ROWS_LIST) {
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || v < 1 || v > 4096) {
      fprintf(stderr, "bench_gemm: --rows wants a comma list of 1..4096, at \"%s\"\n", s);
      exit(2);
    }
    rows[k++] = (int)v;
    s = *end == ',' ? end + 1 : end;
  }
  return k;
}

int main(int argc, char **argv) {
  int rows[MAX_ROWS_LIST] = {1, 2, 4, 8, 16, 32, 64, 128}, n_rows = 8;
  const char *only = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--rows") && i + 1 < argc) n_rows = parse_rows(argv[++i], rows);
    else if (!strcmp(argv[i], "--shape") && i + 1 < argc) only = argv[++i];
    else {
      fprintf(stderr, "usage: bench_gemm [--rows 1,2,4,8,16,32,64,128] [--shape qkv|o|gate_up|down|lm_head]\n");
      return 2;
    }
  }
  if (cn_cuda_device_count() == 0) {
    printf("bench_gemm: no CUDA device visible\n");
    return 0;
  }
  CK(cn_cuda_ctx_create(0, &ctx));
  CK(cn_cuda_timer_create(ctx, &timer));
  double bw, tflops;
  if (bench_cuda_ceilings(ctx, timer, "bench_gemm", &bw, &tflops)) return 1;
  printf("per call: us, weight bytes / time as %% of the copy bandwidth, TFLOP/s\n\n");

  double step_us[N_VARIANTS][MAX_ROWS_LIST] = {{0}}, step_floor_us = 0;
  int max_n = 0;
  for (int r = 0; r < n_rows; r++)
    if (rows[r] > max_n) max_n = rows[r];
  for (int si = 0; si < N_SHAPES; si++) {
    const shape *s = &SHAPES[si];
    if (only && strcmp(only, s->name)) continue;
    size_t w_elems = (size_t)s->in * s->out, w_bytes = w_elems * sizeof(cn_bf16);
    job j = {.s = s, .copies = (int)((ROTATE_BYTES + w_bytes - 1) / w_bytes)};
    j.w = calloc((size_t)j.copies, sizeof *j.w);
    for (int c = 0; c < j.copies; c++) {
      CK(cn_cuda_malloc(ctx, (void **)&j.w[c], w_bytes));
      CK(cn_cuda_random_bf16(ctx, j.w[c], w_elems, 100 + c, 0.02f, 0.0f));
    }
    CK(cn_cuda_malloc(ctx, (void **)&j.x, sizeof(cn_bf16) * (size_t)max_n * s->in));
    CK(cn_cuda_random_bf16(ctx, j.x, (size_t)max_n * s->in, 7, 1.0f, 0.0f));
    CK(cn_cuda_malloc(ctx, (void **)&j.y, sizeof(float) * (size_t)max_n * s->out));
    CK(cn_cuda_memset(ctx, j.y, 0, sizeof(float) * (size_t)max_n * s->out));
    double floor_us = (double)w_bytes / (bw * 1e9) * 1e6;
    step_floor_us += floor_us * s->per_step;
    printf("%s: in %d, out %d, %.1f MB of weights (%d copies), %s; bandwidth floor %.1f us\n", s->name, s->in,
           s->out, w_bytes / 1e6, j.copies, s->add ? "added to fp32" : "fp32 out", floor_us);
    printf("  %5s", "rows");
    for (int v = 0; v < N_VARIANTS; v++) printf(" | %-28s", VARIANT_NAMES[v]);
    printf("\n");
    for (int r = 0; r < n_rows; r++) {
      j.n = rows[r];
      printf("  %5d", j.n);
      for (int v = 0; v < N_VARIANTS; v++) {
        set_variant(v);
        double us = bench_cuda_time_us(ctx, timer, run, &j, j.copies, PER_GROUP); /* every copy warmed */
        step_us[v][r] += us * s->per_step;
        printf(" | %8.1f us %5.1f%% %6.1f TF", us, 100.0 * floor_us / us, 2.0 * j.n * (double)w_elems / us * 1e-6);
      }
      printf("\n");
      fflush(stdout);
    }
    for (int c = 0; c < j.copies; c++) cn_cuda_free(ctx, j.w[c]);
    free(j.w);
    cn_cuda_free(ctx, j.x), cn_cuda_free(ctx, j.y);
  }
  if (!only) {
    printf("\nLlama-3-8B step's products (32 layers + LM head), ms; floor %.3f ms\n", step_floor_us * 1e-3);
    printf("  %5s", "rows");
    for (int v = 0; v < N_VARIANTS; v++) printf(" | %-18s", VARIANT_NAMES[v]);
    printf("\n");
    for (int r = 0; r < n_rows; r++) {
      printf("  %5d", rows[r]);
      for (int v = 0; v < N_VARIANTS; v++)
        printf(" | %7.3f ms %5.1f%%", step_us[v][r] * 1e-3, 100.0 * step_floor_us / step_us[v][r]);
      printf("\n");
    }
  }
  print_plans();
  cn_cuda_timer_free(timer);
  cn_cuda_ctx_free(ctx);
  return 0;
}

#else

int main(void) {
  printf("bench_gemm: canopy was built without CUDA\n");
  return 0;
}

#endif
