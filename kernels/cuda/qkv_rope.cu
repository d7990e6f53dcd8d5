/* The fused QKV projection's output split into q, k, v with RoPE applied to q and k on the way:
 * one launch where the forward had three strided copies and two rotations. One thread per rotary
 * pair of a q or k head, or per v element. Twin: split, then cn_cpu_rope on q and on k. With a
 * cache view and slots, k and v go straight into their paged cache rows (bf16), rounded as
 * kv_write.cu rounds them: the kv_write launch after it is gone. */
#include "kernels/cuda/rope.cuh"

/* Where element j of token i's k (or v) row goes: the buffer row, or its cache slot. */
struct kv_dst {
  float *k, *v;               /* [n][kv_dim], when slots is NULL */
  cn_cuda_paged_kv kv;        /* the layer's cache view, when slots is not NULL */
  const int32_t *slots;       /* [n] physical slots (block * block_size + row) */
  __device__ __forceinline__ void put(bool is_v, size_t i, size_t j, size_t kv_dim, float x) const {
    if (!slots) {
      (is_v ? v : k)[i * kv_dim + j] = x;
      return;
    }
    cn_kv_put(kv, is_v, slots[i], j, kv_dim, x);
  }
};

template <typename TQ>
__global__ void qkv_rope_kernel(TQ *q, kv_dst out, const float *qkv, const int32_t *pos, int n, int n_heads,
                                int n_kv_heads, int head_dim, const float *inv_freq) {
  cn_pdl_enter();
  int half = head_dim / 2, heads = n_heads + n_kv_heads;
  size_t q_dim = (size_t)n_heads * head_dim, kv_dim = (size_t)n_kv_heads * head_dim, row = q_dim + 2 * kv_dim;
  size_t pairs = (size_t)n * heads * half, total = pairs + (size_t)n * kv_dim;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
    if (e >= pairs) { /* v: a plain copy */
      size_t f = e - pairs, i = f / kv_dim, j = f % kv_dim;
      out.put(true, i, j, kv_dim, qkv[i * row + q_dim + kv_dim + j]);
      continue;
    }
    int kk = (int)(e % half);
    size_t hr = e / half;
    int h = (int)(hr % heads);
    size_t i = hr / heads;
    /* Heads [0, n_heads) are q's, the rest k's; both sit contiguously in the qkv row. */
    const float *src = qkv + i * row + (size_t)h * head_dim;
    float x0, x1;
    cn_rope_pair(src[kk], src[kk + half], pos[i], inv_freq[kk], &x0, &x1);
    if (h < n_heads) {
      TQ *dst = q + i * q_dim + (size_t)h * head_dim;
      cn_st(dst + kk, x0);
      cn_st(dst + kk + half, x1);
    } else {
      size_t j = (size_t)(h - n_heads) * head_dim + kk;
      out.put(false, i, j, kv_dim, x0);
      out.put(false, i, j + half, kv_dim, x1);
    }
  }
}

static int launch(cn_cuda_ctx *ctx, void *q, cn_cuda_dtype q_dt, const kv_dst &out, const float *qkv,
                  const int32_t *pos, int n, int n_heads, int n_kv_heads, int head_dim, const float *inv_freq) {
  CN_CUDA_ENTER(ctx);
  if (n < 0 || n_heads <= 0 || n_kv_heads <= 0 || head_dim <= 0 || head_dim % 2)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_qkv_rope: n=%d n_heads=%d n_kv_heads=%d head_dim=%d (even)", n,
                    n_heads, n_kv_heads, head_dim);
  if (!cn_dtype_ok(q_dt)) return cn_error(CANOPY_ERR_DTYPE, "cn_cuda_qkv_rope: q dtype %d", (int)q_dt);
  if (!n) return CANOPY_OK;
  const int threads = 256;
  size_t total = (size_t)n * (n_heads + n_kv_heads) * (head_dim / 2) + (size_t)n * n_kv_heads * head_dim;
  return cn_dispatch(q_dt, [&](auto t) {
    using TQ = decltype(t);
    CN_CUDA_CHECK(cn_launch(ctx, qkv_rope_kernel<TQ>, cn_grid_for(ctx, total, threads), threads, 0, (TQ *)q, out, qkv,
                            pos, n, n_heads, n_kv_heads, head_dim, inv_freq));
    return (int)CANOPY_OK;
  });
}

int cn_cuda_qkv_rope(cn_cuda_ctx *ctx, float *q, float *k, float *v, const float *qkv, const int32_t *pos, int n,
                     int n_heads, int n_kv_heads, int head_dim, const float *inv_freq) {
  kv_dst out = {};
  out.k = k, out.v = v;
  return launch(ctx, q, CN_CUDA_F32, out, qkv, pos, n, n_heads, n_kv_heads, head_dim, inv_freq);
}

int cn_cuda_qkv_rope_kv(cn_cuda_ctx *ctx, void *q, cn_cuda_dtype q_dt, const float *qkv, const int32_t *pos, int n,
                        int n_heads, int n_kv_heads, int head_dim, const float *inv_freq, const cn_cuda_paged_kv *kv,
                        const int32_t *slots) {
  if (n > 0 && (!kv || !slots || kv->block_size <= 0))
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_qkv_rope_kv: a cache view and slots are needed");
  kv_dst out = {};
  if (kv) out.kv = *kv;
  out.slots = slots;
  return launch(ctx, q, q_dt, out, qkv, pos, n, n_heads, n_kv_heads, head_dim, inv_freq);
}
