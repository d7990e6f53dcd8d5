/* Scatters new tokens' K and V rows into their paged bf16 cache slots. */
#include "kernels/cuda/cuda_common.cuh"

template <typename T>
__global__ void kv_write_kernel(cn_cuda_paged_kv kv, int first_slot, const int32_t *slots, const T *k, const T *v,
                                int n, int kv_dim) {
  cn_pdl_enter();
  size_t total = (size_t)n * kv_dim;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
    int i = (int)(e / kv_dim), j = (int)(e % kv_dim);
    int slot = slots ? slots[i] : first_slot + i;
    int block = slots ? slot / kv.block_size : kv.block_table[slot / kv.block_size];
    size_t at = (size_t)block * kv.block_stride + (size_t)(slot % kv.block_size) * kv_dim + j;
    cn_st((cn_bf16_t *)kv.k + at, cn_ld(k + e));
    cn_st((cn_bf16_t *)kv.v + at, cn_ld(v + e));
  }
}

/* slots NULL: slots first_slot.. through the block table; else physical slots per token. */
static int kv_write(cn_cuda_ctx *ctx, const cn_cuda_paged_kv *kv, int first_slot, const int32_t *slots, const void *k,
                    const void *v, cn_cuda_dtype dt, int n, int kv_dim) {
  CN_CUDA_ENTER(ctx);
  if (!kv || kv->block_size <= 0 || first_slot < 0 || n < 0 || kv_dim <= 0)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_kv_write: first_slot=%d n=%d kv_dim=%d block_size=%d", first_slot,
                    n, kv_dim, kv ? kv->block_size : 0);
  if (!n) return CANOPY_OK;
  return cn_dispatch(dt, [&](auto t) {
    using T = decltype(t);
    const int threads = 256;
    CN_CUDA_CHECK(cn_launch(ctx, kv_write_kernel<T>, cn_grid_for(ctx, (size_t)n * kv_dim, threads), threads, 0, *kv,
                            first_slot, slots, (const T *)k, (const T *)v, n, kv_dim));
    return (int)CANOPY_OK;
  });
}

int cn_cuda_kv_write(cn_cuda_ctx *ctx, const cn_cuda_paged_kv *kv, int first_slot, const void *k, const void *v,
                     cn_cuda_dtype dt, int n, int kv_dim) {
  return kv_write(ctx, kv, first_slot, NULL, k, v, dt, n, kv_dim);
}

int cn_cuda_kv_write_slots(cn_cuda_ctx *ctx, const cn_cuda_paged_kv *kv, const int32_t *slots, const void *k,
                           const void *v, cn_cuda_dtype dt, int n, int kv_dim) {
  if (n > 0 && !slots) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_kv_write_slots: NULL slots");
  return kv_write(ctx, kv, 0, slots, k, v, dt, n, kv_dim);
}
