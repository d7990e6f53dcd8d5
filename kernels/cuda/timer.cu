/* Device-event timing on a context's stream, and a plain device-to-device copy: what the kernel
 * benchmarks measure with (METHOD.md: events around the region, the copy bandwidth as the
 * memory-bound ceiling). */
#include <stdlib.h>

#include "kernels/cuda/cuda_common.cuh"

struct cn_cuda_timer {
  cn_cuda_ctx *ctx;
  cudaEvent_t start, stop;
};

int cn_cuda_timer_create(cn_cuda_ctx *ctx, cn_cuda_timer **out) {
  CN_CUDA_ENTER(ctx);
  cn_cuda_timer *t = (cn_cuda_timer *)calloc(1, sizeof *t);
  if (!t) return cn_error(CANOPY_ERR_NO_MEMORY, "cn_cuda_timer_create: out of host memory");
  t->ctx = ctx;
  cudaError_t e = cudaEventCreate(&t->start);
  if (e == cudaSuccess) e = cudaEventCreate(&t->stop);
  if (e != cudaSuccess) {
    cn_cuda_timer_free(t);
    return cn_cuda_fail(e, __FILE__, __LINE__, "cudaEventCreate");
  }
  *out = t;
  return CANOPY_OK;
}

void cn_cuda_timer_free(cn_cuda_timer *t) {
  if (!t) return;
  if (t->start) (void)cudaEventDestroy(t->start);
  if (t->stop) (void)cudaEventDestroy(t->stop);
  free(t);
}

int cn_cuda_timer_start(cn_cuda_timer *t) {
  CN_CUDA_CHECK(cudaEventRecord(t->start, t->ctx->stream));
  return CANOPY_OK;
}

int cn_cuda_timer_stop(cn_cuda_timer *t, float *ms) {
  CN_CUDA_CHECK(cudaEventRecord(t->stop, t->ctx->stream));
  CN_CUDA_CHECK(cudaEventSynchronize(t->stop));
  CN_CUDA_CHECK(cudaEventElapsedTime(ms, t->start, t->stop));
  return CANOPY_OK;
}

int cn_cuda_memcpy_d2d(cn_cuda_ctx *ctx, void *dst, const void *src, size_t bytes) {
  CN_CUDA_ENTER(ctx);
  CN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, ctx->stream));
  return CANOPY_OK;
}
