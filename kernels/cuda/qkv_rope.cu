/* The fused QKV projection's output split into q, k, v with RoPE applied to q and k on the way:
 * one launch where the forward had three strided copies and two rotations. One thread per rotary
 * pair of a q or k head, or per v element. Twin: split, then cn_cpu_rope on q and on k. */
#include "kernels/cuda/cuda_common.cuh"

__global__ void qkv_rope_kernel(float *q, float *k, float *v, const float *qkv, const int32_t *pos, int n, int n_heads,
                                int n_kv_heads, int head_dim, const float *inv_freq) {
  cn_pdl_enter();
  int half = head_dim / 2, heads = n_heads + n_kv_heads;
  size_t q_dim = (size_t)n_heads * head_dim, kv_dim = (size_t)n_kv_heads * head_dim, row = q_dim + 2 * kv_dim;
  size_t pairs = (size_t)n * heads * half, total = pairs + (size_t)n * kv_dim;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
    if (e >= pairs) { /* v: a plain copy */
      size_t f = e - pairs, i = f / kv_dim, j = f % kv_dim;
      v[f] = qkv[i * row + q_dim + kv_dim + j];
      continue;
    }
    int kk = (int)(e % half);
    size_t hr = e / half;
    int h = (int)(hr % heads);
    size_t i = hr / heads;
    /* Heads [0, n_heads) are q's, the rest k's; both sit contiguously in the qkv row. */
    const float *src = qkv + i * row + (size_t)h * head_dim;
    float *dst = h < n_heads ? q + i * q_dim + (size_t)h * head_dim : k + i * kv_dim + (size_t)(h - n_heads) * head_dim;
    float ang = (float)pos[i] * inv_freq[kk]; /* fp32 angle and full-accuracy sincosf, as rope.cu */
    float s, c;
    sincosf(ang, &s, &c);
    float a = src[kk], b = src[kk + half];
    dst[kk] = a * c - b * s;
    dst[kk + half] = b * c + a * s;
  }
}

int cn_cuda_qkv_rope(cn_cuda_ctx *ctx, float *q, float *k, float *v, const float *qkv, const int32_t *pos, int n,
                     int n_heads, int n_kv_heads, int head_dim, const float *inv_freq) {
  CN_CUDA_ENTER(ctx);
  if (n < 0 || n_heads <= 0 || n_kv_heads <= 0 || head_dim <= 0 || head_dim % 2)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_qkv_rope: n=%d n_heads=%d n_kv_heads=%d head_dim=%d (even)", n,
                    n_heads, n_kv_heads, head_dim);
  if (!n) return CANOPY_OK;
  const int threads = 256;
  size_t total = (size_t)n * (n_heads + n_kv_heads) * (head_dim / 2) + (size_t)n * n_kv_heads * head_dim;
  CN_CUDA_CHECK(cn_launch(ctx, qkv_rope_kernel, cn_grid_for(ctx, total, threads), threads, 0, q, k, v, qkv, pos, n,
                          n_heads, n_kv_heads, head_dim, inv_freq));
  return CANOPY_OK;
}
