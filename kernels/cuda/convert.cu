/* fp32 <-> bf16 buffers on the device: weight upload, and the tests' view of bf16 results. */
#include "kernels/cuda/cuda_common.cuh"

template <typename To, typename From> __global__ void convert_kernel(To *dst, const From *src, size_t n) {
  cn_pdl_enter();
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    cn_st(dst + i, cn_ld(src + i));
}

template <typename To, typename From> static int convert(cn_cuda_ctx *ctx, To *dst, const From *src, size_t n) {
  CN_CUDA_ENTER(ctx);
  if (!n) return CANOPY_OK;
  const int threads = 256;
  CN_CUDA_CHECK(cn_launch(ctx, convert_kernel<To, From>, cn_grid_for(ctx, n, threads), threads, 0, dst, src, n));
  return CANOPY_OK;
}

int cn_cuda_f32_to_bf16(cn_cuda_ctx *ctx, cn_bf16 *dst, const float *src, size_t n) {
  return convert(ctx, (cn_bf16_t *)dst, src, n);
}

int cn_cuda_bf16_to_f32(cn_cuda_ctx *ctx, float *dst, const cn_bf16 *src, size_t n) {
  return convert(ctx, dst, (const cn_bf16_t *)src, n);
}
