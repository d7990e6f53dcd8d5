/* SwiGLU activation: silu(gate) * up over a fused [gate | up] projection. */
#include "kernels/cuda/cuda_common.cuh"

template <typename TO, typename T> __global__ void swiglu_kernel(TO *out, const T *gate_up, int n, int d) {
  cn_pdl_enter();
  size_t total = (size_t)n * d;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
    size_t i = e / d, j = e % d;
    const T *g = gate_up + i * 2 * d;
    float gv = cn_ld(g + j);
    cn_st(out + e, gv / (1.0f + expf(-gv)) * cn_ld(g + d + j));
  }
}

int cn_cuda_swiglu(cn_cuda_ctx *ctx, void *out, const void *gate_up, cn_cuda_dtype dt, int n, int d) {
  CN_CUDA_ENTER(ctx);
  if (n < 0 || d <= 0) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_swiglu: n=%d d=%d", n, d);
  if (!n) return CANOPY_OK;
  return cn_dispatch(dt, [&](auto t) {
    using T = decltype(t);
    const int threads = 256;
    CN_CUDA_CHECK(cn_launch(ctx, swiglu_kernel<T, T>, cn_grid_for(ctx, (size_t)n * d, threads), threads, 0, (T *)out,
                            (const T *)gate_up, n, d));
    return (int)CANOPY_OK;
  });
}

int cn_cuda_swiglu_to_bf16(cn_cuda_ctx *ctx, cn_bf16 *out, const float *gate_up, int n, int d) {
  CN_CUDA_ENTER(ctx);
  if (n < 0 || d <= 0) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_swiglu_to_bf16: n=%d d=%d", n, d);
  if (!n) return CANOPY_OK;
  const int threads = 256;
  CN_CUDA_CHECK(cn_launch(ctx, swiglu_kernel<cn_bf16_t, float>, cn_grid_for(ctx, (size_t)n * d, threads), threads, 0,
                          (cn_bf16_t *)out, gate_up, n, d));
  return CANOPY_OK;
}
