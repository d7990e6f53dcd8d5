/* Devices, contexts and memory: the stream and cuBLAS handle every op runs on, allocation with
 * out-of-memory reported in bytes, and the host copies the tests and loaders use. */
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/gemm_tune.cuh"
#include "kernels/cuda/gemv.cuh"
#include "kernels/cuda/tree_attention.cuh"

size_t cn_cuda_dtype_size(cn_cuda_dtype dt) { return dt == CN_CUDA_F32 ? 4 : 2; }

int cn_cuda_device_count(void) {
  int n = 0;
  /* No driver, an old driver and no device are all "no GPU here", which callers (tests, the
   * backend choice) handle by skipping CUDA; the error is cleared so it does not linger. */
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

static int ctx_init(cn_cuda_ctx *c, int device) {
  int n = cn_cuda_device_count();
  if (device < 0 || device >= n) return cn_error(CANOPY_ERR_DEVICE, "cuda: device %d requested, %d visible", device, n);
  c->device = device;
  CN_CUDA_CHECK(cudaSetDevice(device));
  CN_CUDA_CHECK(cudaDeviceGetAttribute(&c->n_sm, cudaDevAttrMultiProcessorCount, device));
  int major = 0, minor = 0;
  CN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  CN_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  c->cc = 10 * major + minor;
  /* CANOPY_CUDA_NO_PDL=1: plain launches, to measure what programmatic dependent launch saves. */
  const char *no_pdl = getenv("CANOPY_CUDA_NO_PDL");
  c->pdl = c->cc >= 90 && !(no_pdl && !strcmp(no_pdl, "1"));
  /* CANOPY_CUDA_GEMV_FUSION_ROWS=k: the few-row GEMM fusions up to k rows (0: off). */
  const char *fusion = getenv("CANOPY_CUDA_GEMV_FUSION_ROWS");
  c->gemv_fusion = fusion && *fusion ? atoi(fusion) : CN_GEMV_FUSE_ROWS;
  /* CANOPY_CUDA_GEMV_MMA_ROWS=k: the few-row GEMM on tensor cores from k rows (1: always; 9: never). */
  const char *mma = getenv("CANOPY_CUDA_GEMV_MMA_ROWS");
  c->gemv_mma_rows = mma && *mma ? atoi(mma) : CN_GEMV_MMA_ROWS;
  c->gemv_max_rows = CN_GEMV_MAX_ROWS;
  /* CANOPY_CUDA_GEMV_SWIGLU_ROWS=k: ffn's SwiGLU epilogue after a separate RMSNorm up to k rows
   * (default: every row count the few-row kernel takes; measured faster, bench/RESULTS.md). */
  const char *swiglu = getenv("CANOPY_CUDA_GEMV_SWIGLU_ROWS");
  c->gemv_swiglu_rows = swiglu && *swiglu ? atoi(swiglu) : CN_GEMV_MAX_ROWS;
  /* CANOPY_CUDA_TA_SPLIT_MIN_KEYS=k (a multiple of 64): the tree-attention plan's fewest keys a
   * split, to measure where splitting a short context stops paying for its merge. */
  const char *split_min = getenv("CANOPY_CUDA_TA_SPLIT_MIN_KEYS");
  c->ta_split_min =
      split_min && atoi(split_min) >= TA_KEYS ? atoi(split_min) / TA_KEYS * TA_KEYS : CN_TA_SPLIT_MIN_KEYS;
  /* CANOPY_CUDA_TA_TWO_WG=0: the wgmma tree-attention kernel's 128-row tiles as one warpgroup
   * taking both 64-row blocks instead of two warpgroups of one block each (the default, measured
   * 1-13% faster on the H100, bench/RESULTS.md), to compare the two. */
  const char *two_wg = getenv("CANOPY_CUDA_TA_TWO_WG");
  c->ta_two_wg = !(two_wg && !strcmp(two_wg, "0"));
  /* CANOPY_CUDA_TA_KEY_SPLIT_ROWS=k: its 64-row tiles of KV heads with k or more query rows as two
   * warpgroups that take half of every key tile each and merge at the end (0: never). */
  const char *key_split = getenv("CANOPY_CUDA_TA_KEY_SPLIT_ROWS");
  c->ta_key_split = key_split && *key_split ? atoi(key_split) : CN_CUDA_TA_KEY_SPLIT_ROWS;
  if (c->ta_key_split < 0) c->ta_key_split = 0;
  /* CANOPY_CUDA_TA_WS=m: the form of its 128-row tiles (cn_cuda_set_ta_ws; 0: the two-warpgroup
   * kernel), to compare. */
  const char *ws = getenv("CANOPY_CUDA_TA_WS");
  c->ta_ws = ws && (!strcmp(ws, "0") || !strcmp(ws, "3") || !strcmp(ws, "4")) ? *ws - '0' : CN_CUDA_TA_WS_MODE;
  /* CANOPY_CUDA_TA_WS_MAX_ROWS=r: ... for KV heads of up to r query rows (cn_cuda_set_ta_ws). */
  const char *ws_rows = getenv("CANOPY_CUDA_TA_WS_MAX_ROWS");
  c->ta_ws_max_rows = ws_rows && atoi(ws_rows) > 0 ? atoi(ws_rows) : CN_CUDA_TA_WS_MAX_ROWS;
  /* CANOPY_CUDA_TA_WS_LONG_KEYS=k: mode 3's 128-key tiles from k keys (0: never). */
  const char *long_keys = getenv("CANOPY_CUDA_TA_WS_LONG_KEYS");
  c->ta_ws_long_keys = long_keys && *long_keys && atoi(long_keys) >= 0 ? atoi(long_keys) : CN_CUDA_TA_WS_LONG_KEYS;
  CN_CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
  CN_CUBLAS_CHECK(cublasCreate(&c->blas));
  CN_CUBLAS_CHECK(cublasSetStream(c->blas, c->stream));
  /* bf16 outputs: keep split-K partial sums in fp32 too, so "fp32 accumulation" holds. */
  CN_CUBLAS_CHECK(cublasSetMathMode(
      c->blas, (cublasMath_t)(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
  /* A fixed workspace (NVIDIA's recommended size for Hopper): GEMMs captured into CUDA graphs
   * then reference it instead of allocating one per capture. */
  CN_CUDA_CHECK(cudaMalloc(&c->blas_ws, CN_BLAS_WS_BYTES));
  CN_CUBLAS_CHECK(cublasSetWorkspace(c->blas, c->blas_ws, CN_BLAS_WS_BYTES));
  return cn_gemm_tune_init(c);
}

int cn_cuda_ctx_create(int device, cn_cuda_ctx **out) {
  if (!out) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_ctx_create: NULL out");
  *out = NULL;
  cn_cuda_ctx *c = (cn_cuda_ctx *)calloc(1, sizeof *c);
  if (!c) return cn_error(CANOPY_ERR_NO_MEMORY, "cuda: no host memory for a context");
  int st = ctx_init(c, device);
  if (st) {
    cn_cuda_ctx_free(c);
    return st;
  }
  *out = c;
  return CANOPY_OK;
}

void cn_cuda_ctx_free(cn_cuda_ctx *c) {
  if (!c) return;
  /* Teardown is best effort: a context is freed on error paths too, and there is nobody left to
   * report a failure to. */
  if (c->stream) {
    (void)cudaSetDevice(c->device);
    (void)cudaStreamSynchronize(c->stream);
  }
  if (c->scratch) (void)cudaFree(c->scratch);
  if (c->pad_y) (void)cudaFree(c->pad_y);
  cn_gemm_tune_free(c);
  if (c->blas) (void)cublasDestroy(c->blas);
  if (c->blas_ws) (void)cudaFree(c->blas_ws);
  if (c->stream) (void)cudaStreamDestroy(c->stream);
  (void)cudaGetLastError();
  free(c);
}

int cn_cuda_sync(cn_cuda_ctx *ctx) {
  CN_CUDA_ENTER(ctx);
  CN_CUDA_CHECK(cudaStreamSynchronize(ctx->stream));
  return CANOPY_OK;
}

int cn_cuda_malloc(cn_cuda_ctx *ctx, void **p, size_t bytes) {
  if (!p) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_malloc: NULL out");
  *p = NULL;
  CN_CUDA_ENTER(ctx);
  cudaError_t e = cudaMalloc(p, bytes ? bytes : 1);
  if (e == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    (void)cudaMemGetInfo(&free_b, &total_b);
    (void)cudaGetLastError();
    *p = NULL;
    return cn_error(CANOPY_ERR_NO_MEMORY,
                    "%s:%d: cuda out of memory: %zu bytes requested on device %d (%zu of %zu free)",
                    cn_cuda_short_file(__FILE__), __LINE__, bytes, ctx->device, free_b, total_b);
  }
  CN_CUDA_CHECK(e);
  return CANOPY_OK;
}

void cn_cuda_free(cn_cuda_ctx *ctx, void *p) {
  if (!p) return;
  if (ctx) (void)cudaSetDevice(ctx->device);
  (void)cudaFree(p);
  (void)cudaGetLastError();
}

int cn_cuda_set_batch_invariant(cn_cuda_ctx *ctx, int on) {
  if (!ctx) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_set_batch_invariant: NULL cuda context");
  ctx->batch_invariant = on != 0;
  return CANOPY_OK;
}

int cn_cuda_set_gemv_fusion(cn_cuda_ctx *ctx, int max_rows) {
  if (!ctx) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_set_gemv_fusion: NULL cuda context");
  ctx->gemv_fusion = max_rows < 0 ? CN_GEMV_FUSE_ROWS : max_rows;
  return CANOPY_OK;
}

int cn_cuda_gemv_fusion(const cn_cuda_ctx *ctx) { return ctx ? ctx->gemv_fusion : 0; }

int cn_cuda_set_gemv_mma_rows(cn_cuda_ctx *ctx, int min_rows) {
  if (!ctx) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_set_gemv_mma_rows: NULL cuda context");
  ctx->gemv_mma_rows = min_rows < 0 ? CN_GEMV_MMA_ROWS : min_rows;
  return CANOPY_OK;
}

int cn_cuda_gemv_mma_rows(const cn_cuda_ctx *ctx) { return ctx ? ctx->gemv_mma_rows : 0; }

int cn_cuda_set_gemv_swiglu_rows(cn_cuda_ctx *ctx, int max_rows) {
  if (!ctx) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_set_gemv_swiglu_rows: NULL cuda context");
  ctx->gemv_swiglu_rows = max_rows < 0 ? CN_GEMV_MAX_ROWS : max_rows;
  return CANOPY_OK;
}

int cn_cuda_gemv_swiglu_rows(const cn_cuda_ctx *ctx) { return ctx ? ctx->gemv_swiglu_rows : 0; }

int cn_cuda_set_ta_key_split(cn_cuda_ctx *ctx, int min_rows) {
  if (!ctx) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_set_ta_key_split: NULL cuda context");
  ctx->ta_key_split = min_rows > 0 ? min_rows : 0;
  return CANOPY_OK;
}

int cn_cuda_set_ta_two_wg(cn_cuda_ctx *ctx, int on) {
  if (!ctx) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_set_ta_two_wg: NULL cuda context");
  ctx->ta_two_wg = on != 0;
  return CANOPY_OK;
}

int cn_cuda_set_ta_ws(cn_cuda_ctx *ctx, int mode, int max_rows, int long_keys) {
  if (!ctx) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_set_ta_ws: NULL cuda context");
  if (mode != 0 && mode != 3 && mode != 4)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_set_ta_ws: mode %d (0, 3 or 4; 1 and 2 were removed)", mode);
  ctx->ta_ws = mode;
  ctx->ta_ws_max_rows = max_rows > 0 ? max_rows : CN_CUDA_TA_WS_MAX_ROWS;
  ctx->ta_ws_long_keys = long_keys >= 0 ? long_keys : CN_CUDA_TA_WS_LONG_KEYS;
  return CANOPY_OK;
}

int cn_cuda_set_gemv_max_rows(cn_cuda_ctx *ctx, int max_rows) {
  if (!ctx) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_set_gemv_max_rows: NULL cuda context");
  ctx->gemv_max_rows = max_rows < 0 || max_rows > CN_GEMV_MAX_ROWS ? CN_GEMV_MAX_ROWS : max_rows;
  return CANOPY_OK;
}

int cn_cuda_reserve_scratch(cn_cuda_ctx *ctx, size_t elems) {
  CN_CUDA_ENTER(ctx);
  size_t bytes = elems * sizeof(cn_bf16_t);
  if (bytes <= ctx->scratch_bytes) return CANOPY_OK;
  void *p = NULL;
  int st = cn_cuda_malloc(ctx, &p, bytes);
  if (st) return st;
  /* cudaFree waits for the device, so queued GEMMs that read the old buffer have finished. */
  if (ctx->scratch) CN_CUDA_CHECK(cudaFree(ctx->scratch));
  ctx->scratch = p;
  ctx->scratch_bytes = bytes;
  ctx->scratch_gen++;
  return CANOPY_OK;
}

int cn_cuda_memcpy_h2d(cn_cuda_ctx *ctx, void *dst, const void *src, size_t bytes) {
  CN_CUDA_ENTER(ctx);
  if (!bytes) return CANOPY_OK;
  CN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, ctx->stream));
  CN_CUDA_CHECK(cudaStreamSynchronize(ctx->stream));
  return CANOPY_OK;
}

int cn_cuda_memcpy_d2h(cn_cuda_ctx *ctx, void *dst, const void *src, size_t bytes) {
  CN_CUDA_ENTER(ctx);
  if (!bytes) return CANOPY_OK;
  CN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, ctx->stream));
  CN_CUDA_CHECK(cudaStreamSynchronize(ctx->stream));
  return CANOPY_OK;
}

int cn_cuda_host_alloc(cn_cuda_ctx *ctx, void **p, size_t bytes) {
  if (!p) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_host_alloc: NULL out");
  *p = NULL;
  CN_CUDA_ENTER(ctx);
  cudaError_t e = cudaMallocHost(p, bytes ? bytes : 1);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    *p = NULL;
    return cn_error(CANOPY_ERR_NO_MEMORY, "%s:%d: cannot allocate %zu bytes of page-locked host memory (%s)",
                    cn_cuda_short_file(__FILE__), __LINE__, bytes, cudaGetErrorString(e));
  }
  return CANOPY_OK;
}

void cn_cuda_host_free(cn_cuda_ctx *ctx, void *p) {
  if (!p) return;
  if (ctx) (void)cudaSetDevice(ctx->device);
  (void)cudaFreeHost(p);
  (void)cudaGetLastError();
}

int cn_cuda_memcpy_h2d_async(cn_cuda_ctx *ctx, void *dst, const void *src, size_t bytes) {
  CN_CUDA_ENTER(ctx);
  if (!bytes) return CANOPY_OK;
  CN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, ctx->stream));
  return CANOPY_OK;
}

int cn_cuda_memcpy_2d(cn_cuda_ctx *ctx, void *dst, size_t dpitch, const void *src, size_t spitch, size_t width,
                      size_t height) {
  CN_CUDA_ENTER(ctx);
  if (!width || !height) return CANOPY_OK;
  CN_CUDA_CHECK(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, cudaMemcpyDeviceToDevice, ctx->stream));
  return CANOPY_OK;
}

int cn_cuda_memset(cn_cuda_ctx *ctx, void *p, int byte, size_t bytes) {
  CN_CUDA_ENTER(ctx);
  if (!bytes) return CANOPY_OK;
  CN_CUDA_CHECK(cudaMemsetAsync(p, byte, bytes, ctx->stream));
  return CANOPY_OK;
}
