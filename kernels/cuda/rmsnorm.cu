/* RMSNorm, one block per row: an fp32 sum of squares reduced across the block (rms_scale.cuh,
 * shared with the few-row GEMM that fuses it), then one pass that scales and writes. */
#include "kernels/cuda/rms_scale.cuh"

#define RMSNORM_THREADS CN_RMS_THREADS
/* Loads a thread has in flight: on Llama-3-8B, 3-4 and 64-token verification steps ran 3-5% faster
 * with 8 than one at a time (bench/RESULTS.md). */
#define RMSNORM_LOADS 8

template <typename TO, typename TI>
__global__ void __launch_bounds__(RMSNORM_THREADS)
    rmsnorm_kernel(TO *out, const TI *x, const cn_bf16_t *w, int dim, float eps) {
  cn_pdl_enter();
  __shared__ float r_shared;
  const TI *xr = x + (size_t)blockIdx.x * dim;
  TO *outr = out + (size_t)blockIdx.x * dim;
  cn_rms_scales<1, RMSNORM_LOADS>(xr, dim, eps, &r_shared);
  float r = r_shared;
  cn_rms_apply<RMSNORM_LOADS>(outr, xr, w, dim, r); /* out may alias x */
}

int cn_cuda_rmsnorm(cn_cuda_ctx *ctx, void *out, cn_cuda_dtype out_dt, const void *x, cn_cuda_dtype x_dt,
                    const cn_bf16 *w, int n, int dim, float eps) {
  CN_CUDA_ENTER(ctx);
  if (n < 0 || dim <= 0) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_rmsnorm: n=%d dim=%d", n, dim);
  if (out == x && out_dt != x_dt)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_rmsnorm: in place needs one dtype for x and out");
  if (!n) return CANOPY_OK;
  return cn_dispatch2(out_dt, x_dt, [&](auto to, auto ti) {
    using TO = decltype(to);
    using TI = decltype(ti);
    CN_CUDA_CHECK(cn_launch(ctx, rmsnorm_kernel<TO, TI>, n, RMSNORM_THREADS, 0, (TO *)out, (const TI *)x,
                            (const cn_bf16_t *)w, dim, eps));
    return (int)CANOPY_OK;
  });
}
