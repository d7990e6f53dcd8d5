/* Greedy token choice: per-row argmax, the first index on ties (torch.argmax), one block per row
 * reduced with CUB. */
#include <cub/block/block_reduce.cuh>
#include <limits.h>
#include <math.h>

#include "kernels/cuda/cuda_common.cuh"

#define ARGMAX_THREADS 256

struct argmax_pair {
  float v;
  int i;
};

/* Larger value wins; equal values go to the lower index, so the result does not depend on the
 * order in which CUB combines partial results. */
struct argmax_op {
  __device__ __forceinline__ argmax_pair operator()(const argmax_pair &a, const argmax_pair &b) const {
    return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a;
  }
};

template <typename T> __global__ void __launch_bounds__(ARGMAX_THREADS) argmax_kernel(int32_t *idx, const T *x, int n) {
  cn_pdl_enter();
  typedef cub::BlockReduce<argmax_pair, ARGMAX_THREADS> Reduce;
  __shared__ typename Reduce::TempStorage tmp;
  const T *row = x + (size_t)blockIdx.x * n;
  /* Start from the thread's first element (not -inf) so an all -inf row still yields index 0. */
  argmax_pair best = {-INFINITY, INT_MAX};
  if ((int)threadIdx.x < n) best = {cn_ld(row + threadIdx.x), (int)threadIdx.x};
  for (int j = threadIdx.x + ARGMAX_THREADS; j < n; j += ARGMAX_THREADS) {
    float v = cn_ld(row + j);
    if (v > best.v) best = {v, j}; /* j only grows: strict > keeps the first of equals */
  }
  best = Reduce(tmp).Reduce(best, argmax_op());
  if (threadIdx.x == 0) idx[blockIdx.x] = best.i;
}

int cn_cuda_argmax(cn_cuda_ctx *ctx, int32_t *idx, const void *x, cn_cuda_dtype dt, int rows, int n) {
  CN_CUDA_ENTER(ctx);
  if (rows < 0 || n <= 0) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_argmax: rows=%d n=%d", rows, n);
  if (!rows) return CANOPY_OK;
  return cn_dispatch(dt, [&](auto t) {
    using T = decltype(t);
    CN_CUDA_CHECK(cn_launch(ctx, argmax_kernel<T>, rows, ARGMAX_THREADS, 0, idx, (const T *)x, n));
    return (int)CANOPY_OK;
  });
}
