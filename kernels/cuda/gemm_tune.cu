/* cuBLAS products with each shape's kernel chosen by timing (gemm_tune.cuh). */
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/gemm_tune.cuh"

#define CANDIDATES 8 /* cuBLASLt heuristic results timed beside cublasGemmEx */
#define REPS 5       /* timed runs a candidate, after one untimed */
#define MARGIN 0.97f /* a candidate must beat cublasGemmEx's median by 3% to replace it */
#define SLOTS 512    /* hash slots, twice CN_GEMM_TUNE_MAX_PLANS */

typedef struct gemm_key {
  int n, in, out, y_dt, accumulate, align;
} gemm_key;

typedef struct gemm_plan {
  gemm_key key;
  int used;
  int lt; /* 1: cublasLtMatmul with `algo`; 0: cublasGemmEx */
  cublasLtMatmulDesc_t op;
  cublasLtMatrixLayout_t a, b, c;
  cublasLtMatmulAlgo_t algo;
  int candidates;
  float us_default, us_kept;
} gemm_plan;

struct cn_gemm_plans {
  gemm_plan slot[SLOTS];
  int count;
};

/* The largest power of two up to 256 that divides every operand's address and row pitch: a
 * kernel chosen for one alignment may need it, so the alignment is part of the shape. */
static int operand_align(const cn_gemm_call *g) {
  uintptr_t pitches = (uintptr_t)g->in * sizeof(cn_bf16_t) | (uintptr_t)g->out * cn_cuda_dtype_size(g->y_dt);
  uintptr_t bits = (uintptr_t)g->w | (uintptr_t)g->x | (uintptr_t)g->y | pitches | 256;
  return (int)(bits & (~bits + 1));
}

static unsigned key_hash(const gemm_key *k) {
  unsigned h = 2166136261u;
  const int v[6] = {k->n, k->in, k->out, k->y_dt, k->accumulate, k->align};
  for (int i = 0; i < 6; i++) h = (h ^ (unsigned)v[i]) * 16777619u;
  return h;
}

/* The plan of `k`, or the empty slot where it goes (NULL when the table is full). */
static gemm_plan *find(cn_gemm_plans *t, const gemm_key *k) {
  for (unsigned i = 0, h = key_hash(k); i < SLOTS; i++) {
    gemm_plan *p = &t->slot[(h + i) % SLOTS];
    if (!p->used || !memcmp(&p->key, k, sizeof *k)) return p;
  }
  return NULL;
}

static void plan_release(gemm_plan *p) {
  if (p->op) (void)cublasLtMatmulDescDestroy(p->op);
  if (p->a) (void)cublasLtMatrixLayoutDestroy(p->a);
  if (p->b) (void)cublasLtMatrixLayoutDestroy(p->b);
  if (p->c) (void)cublasLtMatrixLayoutDestroy(p->c);
  p->op = NULL, p->a = p->b = p->c = NULL;
  p->lt = 0;
}

int cn_gemm_tune_init(cn_cuda_ctx *ctx) {
  CN_CUBLAS_CHECK(cublasLtCreate(&ctx->lt));
  /* CANOPY_CUDA_GEMM_TUNE=1: tuned products from the start (cn_cuda_set_gemm_tune). */
  const char *on = getenv("CANOPY_CUDA_GEMM_TUNE");
  ctx->gemm_tune = on && !strcmp(on, "1");
  return CANOPY_OK;
}

void cn_gemm_tune_free(cn_cuda_ctx *ctx) {
  if (ctx->gemm_plans)
    for (int i = 0; i < SLOTS; i++) plan_release(&ctx->gemm_plans->slot[i]);
  free(ctx->gemm_plans);
  ctx->gemm_plans = NULL;
  if (ctx->lt) (void)cublasLtDestroy(ctx->lt);
  ctx->lt = NULL;
}

static cudaDataType_t y_type(const cn_gemm_call *g) { return g->y_dt == CN_CUDA_F32 ? CUDA_R_32F : CUDA_R_16BF; }

static cublasStatus_t run_default(cn_cuda_ctx *ctx, const cn_gemm_call *g) {
  float alpha = 1.0f, beta = g->accumulate ? 1.0f : 0.0f;
  return cublasGemmEx(ctx->blas, CUBLAS_OP_T, CUBLAS_OP_N, g->out, g->n, g->in, &alpha, g->w, CUDA_R_16BF, g->in,
                      g->x, CUDA_R_16BF, g->in, &beta, g->y, y_type(g), g->out, CUBLAS_COMPUTE_32F,
                      CUBLAS_GEMM_DEFAULT);
}

static cublasStatus_t run_lt(cn_cuda_ctx *ctx, const gemm_plan *p, const cublasLtMatmulAlgo_t *algo,
                             const cn_gemm_call *g, void *y) {
  float alpha = 1.0f, beta = g->accumulate ? 1.0f : 0.0f;
  return cublasLtMatmul(ctx->lt, p->op, &alpha, g->w, p->a, g->x, p->b, &beta, y, p->c, y, p->c, algo, ctx->blas_ws,
                        CN_BLAS_WS_BYTES, ctx->stream);
}

/* The same operation as run_default, in cuBLASLt's terms: column-major, W stored (in x out) and
 * transposed, x (in x n), y (out x n). */
static cublasStatus_t make_descs(gemm_plan *p, const cn_gemm_call *g) {
  cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  cublasStatus_t s = cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
  if (!s) s = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
  if (!s) s = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
  if (!s) s = cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, g->in, g->out, g->in);
  if (!s) s = cublasLtMatrixLayoutCreate(&p->b, CUDA_R_16BF, g->in, g->n, g->in);
  if (!s) s = cublasLtMatrixLayoutCreate(&p->c, y_type(g), g->out, g->n, g->out);
  return s;
}

/* Up to CANDIDATES kernels cuBLASLt offers for the plan's shape that fit the workspace and keep
 * partial sums in fp32: split-K may reduce in the output type only when that is fp32. */
static int heuristics(cn_cuda_ctx *ctx, const gemm_plan *p, const cn_gemm_call *g,
                      cublasLtMatmulHeuristicResult_t *res) {
  cublasLtMatmulPreference_t pref = NULL;
  if (cublasLtMatmulPreferenceCreate(&pref)) return 0;
  uint64_t ws = CN_BLAS_WS_BYTES;
  uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  if (g->y_dt == CN_CUDA_F32) schemes |= CUBLASLT_REDUCTION_SCHEME_INPLACE | CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE;
  uint32_t align = (uint32_t)p->key.align;
  cublasStatus_t s =
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
  if (!s) s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes,
                                                   sizeof schemes);
  const cublasLtMatmulPreferenceAttributes_t aligns[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4 && !s; i++) s = cublasLtMatmulPreferenceSetAttribute(pref, aligns[i], &align, sizeof align);
  int found = 0;
  if (!s) s = cublasLtMatmulAlgoGetHeuristic(ctx->lt, p->op, p->a, p->b, p->c, p->c, pref, CANDIDATES, res, &found);
  (void)cublasLtMatmulPreferenceDestroy(pref);
  return s ? 0 : found;
}

/* What a tuning pass borrows: an output to write instead of y (accumulating calls would otherwise
 * add into y once a run), a buffer whose clearing flushes L2, and events. */
typedef struct bench {
  void *y;
  void *flush;
  size_t flush_bytes;
  cudaEvent_t ev[2 * REPS];
} bench;

static void bench_free(bench *b) {
  if (b->y) (void)cudaFree(b->y);
  if (b->flush) (void)cudaFree(b->flush);
  for (int i = 0; i < 2 * REPS; i++)
    if (b->ev[i]) (void)cudaEventDestroy(b->ev[i]);
  (void)cudaGetLastError(); /* tuning is best effort: a failure here leaves the default kernel */
}

static bool bench_init(cn_cuda_ctx *ctx, const cn_gemm_call *g, bench *b) {
  memset(b, 0, sizeof *b);
  int l2 = 0;
  if (cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, ctx->device)) return false;
  b->flush_bytes = 2 * (size_t)(l2 > (8 << 20) ? l2 : (8 << 20));
  size_t y_bytes = (size_t)g->n * g->out * cn_cuda_dtype_size(g->y_dt);
  if (cudaMalloc(&b->y, y_bytes) || cudaMalloc(&b->flush, b->flush_bytes)) return false;
  if (cudaMemsetAsync(b->y, 0, y_bytes, ctx->stream)) return false;
  for (int i = 0; i < 2 * REPS; i++)
    if (cudaEventCreate(&b->ev[i])) return false;
  return true;
}

static int cmp_float(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return (x > y) - (x < y);
}

/* Median microseconds of REPS runs of one candidate (algo NULL: cublasGemmEx) after an untimed
 * one, each started with L2 flushed; < 0 if the candidate fails. */
static float time_candidate(cn_cuda_ctx *ctx, const gemm_plan *p, const cublasLtMatmulAlgo_t *algo,
                            const cn_gemm_call *g, bench *b) {
  cn_gemm_call t = *g;
  t.y = b->y;
  for (int r = -1; r < REPS; r++) {
    if (cudaMemsetAsync(b->flush, r & 1, b->flush_bytes, ctx->stream)) return -1.0f;
    if (r >= 0 && cudaEventRecord(b->ev[2 * r], ctx->stream)) return -1.0f;
    cublasStatus_t s = algo ? run_lt(ctx, p, algo, &t, b->y) : run_default(ctx, &t);
    if (s != CUBLAS_STATUS_SUCCESS) return -1.0f;
    if (r >= 0 && cudaEventRecord(b->ev[2 * r + 1], ctx->stream)) return -1.0f;
  }
  if (cudaStreamSynchronize(ctx->stream)) return -1.0f;
  float ms[REPS];
  for (int r = 0; r < REPS; r++)
    if (cudaEventElapsedTime(&ms[r], b->ev[2 * r], b->ev[2 * r + 1])) return -1.0f;
  qsort(ms, REPS, sizeof ms[0], cmp_float);
  return 1000.0f * ms[REPS / 2];
}

/* Fills p's choice. Nothing here fails the call: a shape cuBLASLt cannot run, or a pass that runs
 * out of memory, keeps cublasGemmEx. A fault inside a kernel stays sticky and surfaces at the
 * next checked call, as any fault does. */
static void tune(cn_cuda_ctx *ctx, gemm_plan *p, const cn_gemm_call *g) {
  p->lt = 0;
  p->candidates = 1;
  cublasLtMatmulHeuristicResult_t res[CANDIDATES];
  int found = make_descs(p, g) == CUBLAS_STATUS_SUCCESS ? heuristics(ctx, p, g, res) : 0;
  bench b;
  if (!found || !bench_init(ctx, g, &b)) {
    if (found) bench_free(&b);
    plan_release(p);
    (void)cudaGetLastError();
    return;
  }
  p->us_default = p->us_kept = time_candidate(ctx, p, NULL, g, &b);
  int best = -1;
  float best_us = 0.0f;
  for (int i = 0; i < found; i++) {
    if (res[i].state != CUBLAS_STATUS_SUCCESS || res[i].workspaceSize > CN_BLAS_WS_BYTES) continue;
    float us = time_candidate(ctx, p, &res[i].algo, g, &b);
    p->candidates++;
    if (us > 0.0f && (best < 0 || us < best_us)) best = i, best_us = us;
  }
  (void)cudaStreamSynchronize(ctx->stream);
  bench_free(&b);
  if (best >= 0 && (p->us_default <= 0.0f || best_us < MARGIN * p->us_default)) {
    p->lt = 1;
    p->algo = res[best].algo;
    p->us_kept = best_us;
  } else {
    plan_release(p);
  }
}

/* The plan for g, tuning it first if it is new; NULL when g runs untuned. */
static gemm_plan *plan_for(cn_cuda_ctx *ctx, const cn_gemm_call *g) {
  /* Batch-invariant calls stay on cublasGemmEx: a timed choice could differ between contexts. */
  if (!ctx->gemm_tune || ctx->batch_invariant || g->n > CN_GEMM_TUNE_MAX_ROWS) return NULL;
  gemm_key k = {g->n, g->in, g->out, (int)g->y_dt, g->accumulate, operand_align(g)};
  if (!ctx->gemm_plans && !(ctx->gemm_plans = (cn_gemm_plans *)calloc(1, sizeof *ctx->gemm_plans))) return NULL;
  gemm_plan *p = find(ctx->gemm_plans, &k);
  if (!p) return NULL;
  if (p->used) return p;
  /* A new shape is tuned only on an eager call: timing synchronises the stream, which a capture
   * forbids. The forward runs every shape once before capturing it (backend_cuda.c). */
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(ctx->stream, &cs) || cs != cudaStreamCaptureStatusNone) return NULL;
  if (ctx->gemm_plans->count >= CN_GEMM_TUNE_MAX_PLANS) return NULL;
  memset(p, 0, sizeof *p);
  p->key = k;
  p->used = 1;
  ctx->gemm_plans->count++;
  tune(ctx, p, g);
  return p;
}

int cn_gemm_run(cn_cuda_ctx *ctx, const cn_gemm_call *g) {
  const gemm_plan *p = plan_for(ctx, g);
  /* A kept kernel refusing a call its tuning ran is not expected; cublasGemmEx then does it. */
  if (p && p->lt && run_lt(ctx, p, &p->algo, g, g->y) == CUBLAS_STATUS_SUCCESS) return CANOPY_OK;
  CN_CUBLAS_CHECK(run_default(ctx, g));
  return CANOPY_OK;
}

int cn_cuda_set_gemm_tune(cn_cuda_ctx *ctx, int on) {
  if (!ctx) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_set_gemm_tune: NULL cuda context");
  ctx->gemm_tune = on != 0;
  return CANOPY_OK;
}

int cn_cuda_gemm_plans(const cn_cuda_ctx *ctx, cn_cuda_gemm_plan_info *out, int max) {
  if (!ctx || !ctx->gemm_plans) return 0;
  int k = 0;
  for (int i = 0; i < SLOTS; i++) {
    const gemm_plan *p = &ctx->gemm_plans->slot[i];
    if (!p->used) continue;
    if (out && k < max)
      out[k] = (cn_cuda_gemm_plan_info){p->key.n,     p->key.in,  p->key.out,    p->key.y_dt == CN_CUDA_BF16,
                                        p->key.accumulate, p->key.align, p->candidates, p->lt,
                                        p->us_default, p->us_kept};
    k++;
  }
  return k;
}
