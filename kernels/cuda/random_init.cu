/* Random bf16 weights straight into device memory (kernels/random_init.h): no checkpoint, no
 * host copy, so a model of any size that fits the device is ready in milliseconds. */
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/random_init.h"

__global__ void random_bf16_kernel(uint16_t *dst, size_t n, uint64_t stream, float scale, float mean) {
  cn_pdl_enter();
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    dst[i] = cn_random_weight_bf16(stream, i, scale, mean);
}

int cn_cuda_random_bf16(cn_cuda_ctx *ctx, cn_bf16 *dst, size_t n, uint64_t stream, float scale, float mean) {
  CN_CUDA_ENTER(ctx);
  if (!(scale >= 0.0f) || !isfinite(scale) || !isfinite(mean))
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_random_bf16: scale %g, mean %g", scale, mean);
  if (!n) return CANOPY_OK;
  const int threads = 256;
  CN_CUDA_CHECK(
      cn_launch(ctx, random_bf16_kernel, cn_grid_for(ctx, n, threads), threads, 0, dst, n, stream, scale, mean));
  return CANOPY_OK;
}
