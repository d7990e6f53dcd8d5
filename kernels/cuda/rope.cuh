/* RoPE's rotation of one pair and the store of a new token's k or v element into its cache slot:
 * shared by rope.cu, qkv_rope.cu and the few-row GEMM's RoPE epilogue (gemv.cu), so that the
 * fused and the separate forms give the same bits. C++ only. */
#ifndef CANOPY_KERNELS_CUDA_ROPE_CUH
#define CANOPY_KERNELS_CUDA_ROPE_CUH

#include "kernels/cuda/cuda_common.cuh"

/* (a, b) = (x[k], x[k + half]) of one head, HF Llama's rotate_half pairing, at position pos. The
 * angle in fp32 as HF computes it; sincosf (not the __sincosf intrinsic) keeps full accuracy for
 * the large angles of late positions. The products are explicit fused multiply-adds: left to the
 * compiler, a c - b s may be contracted either way, differently in two kernels. */
__device__ __forceinline__ void cn_rope_pair(float a, float b, int pos, float inv_freq, float *x0, float *x1) {
  float s, c;
  sincosf((float)pos * inv_freq, &s, &c);
  *x0 = fmaf(a, c, -(b * s));
  *x1 = fmaf(b, c, a * s);
}

/* Element j of a new token's k (or v) row, rounded to bf16 into physical cache slot `slot` (block
 * slot / block_size, row slot % block_size) of a layer's view. */
__device__ __forceinline__ void cn_kv_put(const cn_cuda_paged_kv &kv, bool is_v, int slot, size_t j, size_t kv_dim,
                                          float x) {
  const size_t at = (size_t)(slot / kv.block_size) * kv.block_stride + (size_t)(slot % kv.block_size) * kv_dim + j;
  cn_st((cn_bf16_t *)(is_v ? kv.v : kv.k) + at, x);
}

#endif
