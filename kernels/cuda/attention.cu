/* Paged attention for one sequence's new tokens over its cache, with a causal or tree mask, GQA
 * and an optional sliding window: the twin of cn_cpu_attention.
 *
 * The straightforward kernel: one block per (token, query head). Each warp takes every
 * ATTN_WARPS-th visible key and keeps its own online-softmax state (max, sum, accumulator) as
 * flash attention does, lanes splitting the head dimension; the warps' states are merged exactly
 * at the end. Every query head streams the prefix again; the shared-prefix tree kernel
 * (DESIGN.md, "Tree attention") is the replacement that reads it once. */
#include <math.h>

#include "kernels/cuda/cuda_common.cuh"

#define ATTN_WARPS 4
#define ATTN_PER_LANE (CN_CUDA_MAX_HEAD_DIM / 32) /* head-dim elements each lane holds */

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/* Whether query i sees slot s, as key_visible() in kernels/cpu/attention.c. */
__device__ __forceinline__ bool visible(const cn_cuda_attn_args &a, int i, int pos_i, int s) {
  int key_pos = s;
  if (s >= a.ctx_len) {
    int j = s - a.ctx_len;
    if (a.tree_mask ? !((a.tree_mask[(size_t)i * a.mask_words + j / 64] >> (j % 64)) & 1) : j > a.q_offset + i)
      return false;
    key_pos = a.pos[j];
  }
  return a.sliding_window <= 0 || key_pos > pos_i - a.sliding_window;
}

template <typename T> __global__ void __launch_bounds__(ATTN_WARPS * 32) attention_kernel(cn_cuda_attn_args a) {
  cn_pdl_enter();
  __shared__ float m_w[ATTN_WARPS], l_w[ATTN_WARPS];
  __shared__ float acc_w[ATTN_WARPS][CN_CUDA_MAX_HEAD_DIM];
  int i = blockIdx.x / a.n_heads, h = blockIdx.x % a.n_heads;
  int d = a.head_dim, kv_dim = a.n_kv_heads * d;
  int g = h / (a.n_heads / a.n_kv_heads);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  size_t qo = ((size_t)i * a.n_heads + h) * d;

  const T *q = (const T *)a.q + qo;
  float qr[ATTN_PER_LANE];
#pragma unroll
  for (int r = 0; r < ATTN_PER_LANE; r++) {
    int t = lane + 32 * r;
    qr[r] = t < d ? cn_ld(q + t) : 0.0f;
  }

  int pos_i = a.pos[a.q_offset + i];
  /* Causal tokens never look past their own slot; tree tokens may look at any earlier node. */
  int last = a.ctx_len + a.q_offset + (a.tree_mask ? a.n - 1 : i);
  /* Prefix slot s has position s, so a window lets the scan start late. */
  int first = 0;
  if (a.sliding_window > 0) first = max(0, min(a.ctx_len, pos_i - a.sliding_window + 1));

  float m = -INFINITY, l = 0.0f, acc[ATTN_PER_LANE];
#pragma unroll
  for (int r = 0; r < ATTN_PER_LANE; r++)
    acc[r] = 0.0f;
  int bs = a.kv.block_size;
  for (int s = first + warp; s <= last; s += ATTN_WARPS) {
    if (!visible(a, i, pos_i, s)) continue; /* uniform across the warp: s is per warp */
    size_t row = (size_t)a.kv.block_table[s / bs] * a.kv.block_stride + (size_t)(s % bs) * kv_dim + (size_t)g * d;
    const cn_bf16_t *k = (const cn_bf16_t *)a.kv.k + row, *v = (const cn_bf16_t *)a.kv.v + row;
    float dot = 0.0f;
#pragma unroll
    for (int r = 0; r < ATTN_PER_LANE; r++) {
      int t = lane + 32 * r;
      if (t < d) dot += qr[r] * cn_ld(k + t);
    }
    float score = warp_sum(dot) * a.scale;
    float m_new = fmaxf(m, score);
    float corr = expf(m - m_new); /* rescales what was summed under the old maximum; 0 at the start */
    float p = expf(score - m_new);
    l = l * corr + p;
#pragma unroll
    for (int r = 0; r < ATTN_PER_LANE; r++) {
      int t = lane + 32 * r;
      if (t < d) acc[r] = acc[r] * corr + p * cn_ld(v + t);
    }
    m = m_new;
  }

  if (lane == 0) m_w[warp] = m, l_w[warp] = l;
#pragma unroll
  for (int r = 0; r < ATTN_PER_LANE; r++) {
    int t = lane + 32 * r;
    if (t < d) acc_w[warp][t] = acc[r];
  }
  __syncthreads();

  float mx = -INFINITY;
  for (int w = 0; w < ATTN_WARPS; w++)
    mx = fmaxf(mx, m_w[w]);
  float den = 0.0f, wt[ATTN_WARPS];
#pragma unroll
  for (int w = 0; w < ATTN_WARPS; w++) {
    /* A warp that saw no key has m = -inf: weight 0, never exp(-inf - -inf). */
    wt[w] = m_w[w] == -INFINITY ? 0.0f : expf(m_w[w] - mx);
    den += wt[w] * l_w[w];
  }
  float inv = den > 0.0f ? 1.0f / den : 0.0f; /* a query that sees nothing gets zeros */
  T *o = (T *)a.out + qo;
  for (int t = threadIdx.x; t < d; t += blockDim.x) {
    float num = 0.0f;
#pragma unroll
    for (int w = 0; w < ATTN_WARPS; w++)
      num += wt[w] * acc_w[w][t];
    cn_st(o + t, num * inv);
  }
}

int cn_cuda_attention(cn_cuda_ctx *ctx, const cn_cuda_attn_args *a) {
  CN_CUDA_ENTER(ctx);
  if (!a) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_attention: NULL args");
  if (a->n < 0 || a->ctx_len < 0 || a->q_offset < 0 || a->n_heads <= 0 || a->n_kv_heads <= 0 || a->n_heads % a->n_kv_heads ||
      a->kv.block_size <= 0)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_attention: n=%d ctx_len=%d n_heads=%d n_kv_heads=%d block_size=%d",
                    a->n, a->ctx_len, a->n_heads, a->n_kv_heads, a->kv.block_size);
  if (a->head_dim <= 0 || a->head_dim > CN_CUDA_MAX_HEAD_DIM)
    return cn_error(CANOPY_ERR_UNSUPPORTED, "cn_cuda_attention: head_dim %d (at most %d)", a->head_dim,
                    CN_CUDA_MAX_HEAD_DIM);
  if (a->tree_mask && a->mask_words < (a->q_offset + a->n + 63) / 64)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_attention: %d mask words for %d new slots", a->mask_words,
                    a->q_offset + a->n);
  if (!a->n) return CANOPY_OK;
  return cn_dispatch(a->dt, [&](auto t) {
    using T = decltype(t);
    CN_CUDA_CHECK(cn_launch(ctx, attention_kernel<T>, (unsigned)a->n * (unsigned)a->n_heads, ATTN_WARPS * 32, 0, *a));
    return (int)CANOPY_OK;
  });
}
