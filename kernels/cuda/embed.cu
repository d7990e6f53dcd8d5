/* Token embedding lookup: rows of a bf16 table into the activation dtype. */
#include "kernels/cuda/cuda_common.cuh"

template <typename T>
__global__ void embed_kernel(T *x, const cn_bf16_t *table, const int32_t *tokens, int n, int dim) {
  cn_pdl_enter();
  size_t total = (size_t)n * dim;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
    size_t i = e / dim, j = e % dim;
    cn_st(x + e, cn_ld(table + (size_t)tokens[i] * dim + j));
  }
}

int cn_cuda_embed(cn_cuda_ctx *ctx, void *x, cn_cuda_dtype x_dt, const cn_bf16 *table, const int32_t *tokens, int n,
                  int dim) {
  CN_CUDA_ENTER(ctx);
  if (n < 0 || dim <= 0) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_embed: n=%d dim=%d", n, dim);
  if (!n) return CANOPY_OK;
  return cn_dispatch(x_dt, [&](auto t) {
    using T = decltype(t);
    const int threads = 256;
    CN_CUDA_CHECK(cn_launch(ctx, embed_kernel<T>, cn_grid_for(ctx, (size_t)n * dim, threads), threads, 0, (T *)x,
                            (const cn_bf16_t *)table, tokens, n, dim));
    return (int)CANOPY_OK;
  });
}
