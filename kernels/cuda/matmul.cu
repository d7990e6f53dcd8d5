/* y = x W^T (+ bias) through cuBLAS: bf16 operands, fp32 accumulation, bf16 or fp32 output.
 *
 * Row-major y [n][out] = x [n][in] W^T with W [out][in] is, read column-major, the product
 * y^T (out x n) = W^T' x^T where W's storage is an (in x out) column-major matrix; so one
 * GEMM with op(A) = T on W and op(B) = N on x, and no transposed copy of any weight. */
#include "kernels/cuda/cuda_common.cuh"

/* Fills y's rows with the bias, so the GEMM adds onto it with beta = 1 (no second pass). */
template <typename T> __global__ void bias_rows_kernel(T *y, const cn_bf16_t *bias, int n, int out) {
  size_t total = (size_t)n * out;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x)
    cn_st(y + e, cn_ld(bias + e % out));
}

int cn_cuda_matmul(cn_cuda_ctx *ctx, void *y, cn_cuda_dtype y_dt, const void *x, cn_cuda_dtype x_dt, const cn_bf16 *w,
                   const cn_bf16 *bias, int n, int in, int out) {
  CN_CUDA_ENTER(ctx);
  if (n < 0 || in <= 0 || out <= 0)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_matmul: n=%d in=%d out=%d", n, in, out);
  if (!cn_dtype_ok(y_dt) || !cn_dtype_ok(x_dt))
    return cn_error(CANOPY_ERR_DTYPE, "cn_cuda_matmul: dtypes y=%d x=%d", (int)y_dt, (int)x_dt);
  if (y == x) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_matmul: y must not alias x");
  if (!n) return CANOPY_OK;

  const void *xb = x;
  if (x_dt == CN_CUDA_F32) {
    /* cuBLAS wants A and B of one type: round the (small) activation, never the weight. */
    size_t elems = (size_t)n * in;
    int st = cn_cuda_reserve_scratch(ctx, elems);
    if (st) return st;
    st = cn_cuda_f32_to_bf16(ctx, (cn_bf16 *)ctx->scratch, (const float *)x, elems);
    if (st) return st;
    xb = ctx->scratch;
  }

  float alpha = 1.0f, beta = 0.0f;
  if (bias) {
    int st = cn_dispatch(y_dt, [&](auto t) {
      using T = decltype(t);
      const int threads = 256;
      bias_rows_kernel<<<cn_grid_for(ctx, (size_t)n * out, threads), threads, 0, ctx->stream>>>(
          (T *)y, (const cn_bf16_t *)bias, n, out);
      CN_CUDA_CHECK_LAUNCH();
      return (int)CANOPY_OK;
    });
    if (st) return st;
    beta = 1.0f;
  }
  cudaDataType_t yt = y_dt == CN_CUDA_F32 ? CUDA_R_32F : CUDA_R_16BF;
  CN_CUBLAS_CHECK(cublasGemmEx(ctx->blas, CUBLAS_OP_T, CUBLAS_OP_N, out, n, in, &alpha, w, CUDA_R_16BF, in, xb,
                               CUDA_R_16BF, in, &beta, y, yt, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return CANOPY_OK;
}
