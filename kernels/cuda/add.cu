/* Residual add x += y, with x and y of independent dtypes (an fp32 residual stream takes bf16
 * branch outputs). */
#include "kernels/cuda/cuda_common.cuh"

template <typename TX, typename TY> __global__ void add_kernel(TX *x, const TY *y, size_t n) {
  cn_pdl_enter();
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    cn_st(x + i, cn_ld(x + i) + cn_ld(y + i));
}

int cn_cuda_add(cn_cuda_ctx *ctx, void *x, cn_cuda_dtype x_dt, const void *y, cn_cuda_dtype y_dt, size_t n) {
  CN_CUDA_ENTER(ctx);
  if (!n) return CANOPY_OK;
  return cn_dispatch2(x_dt, y_dt, [&](auto tx, auto ty) {
    using TX = decltype(tx);
    using TY = decltype(ty);
    const int threads = 256;
    CN_CUDA_CHECK(
        cn_launch(ctx, add_kernel<TX, TY>, cn_grid_for(ctx, n, threads), threads, 0, (TX *)x, (const TY *)y, n));
    return (int)CANOPY_OK;
  });
}
