/* Copies inside device buffers: the KV pool's span copies (copy-on-write of a block, the commit
 * gather of a verified tree's accepted rows) and the row gather in front of the LM head. */
#include "kernels/cuda/cuda_common.cuh"

/* One block per span; phase 0 moves sources to tmp, phase 1 tmp to destinations. Two launches on
 * one stream order every read before every write, which a single launch could not promise when
 * one span's destination is another's source. */
template <typename T> __global__ void copy_spans_kernel(T *base, const cn_cuda_span *spans, T *tmp, int phase) {
  cn_pdl_enter();
  cn_cuda_span s = spans[blockIdx.x];
  const T *from = phase == 0 ? base + s.src : tmp + s.tmp;
  T *to = phase == 0 ? tmp + s.tmp : base + s.dst;
  for (uint64_t e = threadIdx.x; e < s.n; e += blockDim.x)
    to[e] = from[e];
}

int cn_cuda_copy_spans(cn_cuda_ctx *ctx, void *base, size_t elem_bytes, const cn_cuda_span *spans, int n_spans,
                       void *tmp) {
  CN_CUDA_ENTER(ctx);
  if (n_spans < 0 || (elem_bytes != 2 && elem_bytes != 4))
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_copy_spans: %d spans of %zu-byte elements", n_spans, elem_bytes);
  if (!n_spans) return CANOPY_OK;
  for (int phase = 0; phase < 2; phase++) {
    if (elem_bytes == 2)
      CN_CUDA_CHECK(cn_launch(ctx, copy_spans_kernel<uint16_t>, n_spans, 128, 0, (uint16_t *)base, spans,
                              (uint16_t *)tmp, phase));
    else
      CN_CUDA_CHECK(cn_launch(ctx, copy_spans_kernel<uint32_t>, n_spans, 128, 0, (uint32_t *)base, spans,
                              (uint32_t *)tmp, phase));
  }
  return CANOPY_OK;
}

template <typename T> __global__ void gather_rows_kernel(T *dst, const T *src, const int32_t *rows, int n, int dim) {
  cn_pdl_enter();
  size_t total = (size_t)n * dim;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
    size_t i = e / dim, j = e % dim;
    dst[e] = src[(size_t)rows[i] * dim + j];
  }
}

int cn_cuda_gather_rows(cn_cuda_ctx *ctx, void *dst, const void *src, cn_cuda_dtype dt, const int32_t *rows, int n,
                        int dim) {
  CN_CUDA_ENTER(ctx);
  if (n < 0 || dim <= 0) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_gather_rows: n=%d dim=%d", n, dim);
  if (!n) return CANOPY_OK;
  return cn_dispatch(dt, [&](auto t) {
    using T = decltype(t);
    const int threads = 256;
    CN_CUDA_CHECK(cn_launch(ctx, gather_rows_kernel<T>, cn_grid_for(ctx, (size_t)n * dim, threads), threads, 0,
                            (T *)dst, (const T *)src, rows, n, dim));
    return (int)CANOPY_OK;
  });
}
