/* The k best tokens of each row with their log-softmax: what a greedy draft level needs to grow
 * its tree, so k ids and k floats cross to the host instead of a vocabulary of logits. One block
 * per row: the log-sum-exp from two CUB block reductions, then k rounds of a block argmax over the
 * elements that come after the previous pick in (value desc, index asc) order. k is a tree's
 * branching (<= 32) and the row sits in L1/L2 after the first pass, so k rescans are cheap. */
#include <cub/block/block_reduce.cuh>
#include <limits.h>
#include <math.h>

#include "kernels/cuda/cuda_common.cuh"

#define TOPK_THREADS 256

struct top_pair {
  float v;
  int i;
};

/* Larger value first, then lower index: a total order on (v, i) for non-NaN v. */
__device__ __forceinline__ bool top_before(float va, int a, float vb, int b) { return va > vb || (va == vb && a < b); }

struct max_op {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

struct top_op {
  __device__ __forceinline__ top_pair operator()(const top_pair &a, const top_pair &b) const {
    return top_before(b.v, b.i, a.v, a.i) ? b : a;
  }
};

template <typename T>
__global__ void __launch_bounds__(TOPK_THREADS)
    top_k_kernel(int32_t *ids, float *logp, const T *x, int n, int k) {
  cn_pdl_enter();
  typedef cub::BlockReduce<float, TOPK_THREADS> FloatReduce;
  typedef cub::BlockReduce<top_pair, TOPK_THREADS> PairReduce;
  __shared__ union {
    typename FloatReduce::TempStorage f;
    typename PairReduce::TempStorage p;
  } tmp;
  __shared__ top_pair last;
  __shared__ float lse;
  const T *row = x + (size_t)blockIdx.x * n;
  if (logp) {
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < n; j += TOPK_THREADS) mx = fmaxf(mx, cn_ld(row + j));
    mx = FloatReduce(tmp.f).Reduce(mx, max_op());
    if (threadIdx.x == 0) lse = mx;
    __syncthreads();
    mx = lse;
    float sum = 0.0f;
    for (int j = threadIdx.x; j < n; j += TOPK_THREADS) sum += __expf(cn_ld(row + j) - mx);
    __syncthreads(); /* tmp is reused */
    sum = FloatReduce(tmp.f).Sum(sum);
    if (threadIdx.x == 0) lse = mx + logf(sum);
    __syncthreads();
  }
  for (int r = 0; r < k; r++) {
    top_pair best = {-INFINITY, INT_MAX};
    float lv = r ? last.v : INFINITY;
    int li = r ? last.i : -1;
    for (int j = threadIdx.x; j < n; j += TOPK_THREADS) {
      float v = cn_ld(row + j);
      /* Only what comes after the previous pick; the first such element seeds `best` so that
       * a row of -inf still yields indices. */
      if (top_before(lv, li, v, j) && (best.i == INT_MAX || top_before(v, j, best.v, best.i))) best = {v, j};
    }
    __syncthreads(); /* tmp and last are reused */
    best = PairReduce(tmp.p).Reduce(best, top_op());
    if (threadIdx.x == 0) {
      last = best;
      ids[(size_t)blockIdx.x * k + r] = best.i;
      if (logp) logp[(size_t)blockIdx.x * k + r] = best.v - lse;
    }
    __syncthreads();
  }
}

int cn_cuda_top_k(cn_cuda_ctx *ctx, int32_t *ids, float *logp, const void *x, cn_cuda_dtype dt, int rows, int n,
                  int k) {
  CN_CUDA_ENTER(ctx);
  if (rows < 0 || n <= 0 || k < 1 || k > n)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_top_k: rows=%d n=%d k=%d", rows, n, k);
  if (!rows) return CANOPY_OK;
  return cn_dispatch(dt, [&](auto t) {
    using T = decltype(t);
    CN_CUDA_CHECK(cn_launch(ctx, top_k_kernel<T>, rows, TOPK_THREADS, 0, ids, logp, (const T *)x, n, k));
    return (int)CANOPY_OK;
  });
}
