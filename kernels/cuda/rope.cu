/* Rotary position embedding in place, HF Llama's rotate_half pairing: one thread per
 * (token, head, pair). */
#include "kernels/cuda/rope.cuh"

template <typename T>
__global__ void rope_kernel(T *x, const int32_t *pos, int n, int n_heads, int head_dim, const float *inv_freq) {
  cn_pdl_enter();
  int half = head_dim / 2;
  size_t total = (size_t)n * n_heads * half;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
    int k = (int)(e % half);
    size_t row = e / half; /* token * n_heads + head */
    int i = (int)(row / n_heads);
    T *v = x + row * head_dim;
    float x0, x1;
    cn_rope_pair(cn_ld(v + k), cn_ld(v + k + half), pos[i], inv_freq[k], &x0, &x1);
    cn_st(v + k, x0);
    cn_st(v + k + half, x1);
  }
}

int cn_cuda_rope(cn_cuda_ctx *ctx, void *x, cn_cuda_dtype dt, const int32_t *pos, int n, int n_heads, int head_dim,
                 const float *inv_freq) {
  CN_CUDA_ENTER(ctx);
  if (n < 0 || n_heads <= 0 || head_dim <= 0 || head_dim % 2)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_rope: n=%d n_heads=%d head_dim=%d (must be even)", n, n_heads,
                    head_dim);
  if (!n) return CANOPY_OK;
  return cn_dispatch(dt, [&](auto t) {
    using T = decltype(t);
    const int threads = 256;
    size_t total = (size_t)n * n_heads * (head_dim / 2);
    CN_CUDA_CHECK(cn_launch(ctx, rope_kernel<T>, cn_grid_for(ctx, total, threads), threads, 0, (T *)x, pos, n, n_heads,
                            head_dim, inv_freq));
    return (int)CANOPY_OK;
  });
}
