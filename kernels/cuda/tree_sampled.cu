/* Sampled token trees where the logits are: each row's children drawn without replacement, and
 * stochastic acceptance of the verified trees. Twins of kernels/cpu/tree_sampled.c (read it for the
 * algorithm and why it is exact); test_cuda_ops compares them.
 *
 * A draw is the CPU's to the bit: the block sums (256 ids a block up to 262,144 ids, else 1024
 * blocks) are summed by one thread each in the CPU's 8-lane order, and one thread walks them and
 * then one block, as the CPU does. That walk is serial (about a thousand dependent adds a draw),
 * which is nothing next to a forward and keeps the twin exact. Acceptance sums the vocabulary's
 * masses with a block reduction instead (the CPU's one serial order would cost a pass of 6,000
 * dependent adds each), so its accept-or-reject tests may differ from the CPU's within rounding of
 * their threshold; its bonus draw is the exact one again. */
#include <cub/block/block_reduce.cuh>
#include <limits.h>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/tree_batch.cuh"

#define TS_THREADS 256
#define TS_MAX_BLOCKS 1024
#define TS_MIN_BLOCK 256
#define TS_MAX_DRAWS 32

/* max(x, 0) with NaN as 0, as the CPU's pos. */
__device__ __forceinline__ float pos_f(float x) { return x > 0 ? x : 0.0f; }
__device__ __forceinline__ double pos_d(double x) { return x > 0 ? x : 0.0; }

/* w[i] with the nd ids of `skip` (earlier draws) removed. */
__device__ __forceinline__ float kept_w(const float *w, int i, const int *skip, int nd) {
  for (int j = 0; j < nd; j++)
    if (skip[j] == i) return 0.0f;
  return pos_f(w[i]);
}

/* The CPU's sum_pos over w[lo, lo + n): 8 lanes, the tail in lane 0, the lanes paired as there. */
__device__ double lanes_sum(const float *w, int lo, int n, const int *skip, int nd) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int v = 0;
  for (; v + 8 <= n; v += 8)
    for (int j = 0; j < 8; j++)
      acc[j] += (double)kept_w(w, lo + v + j, skip, nd);
  for (; v < n; v++)
    acc[0] += (double)kept_w(w, lo + v, skip, nd);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

struct ts_blocks {
  int size, n;
};

__device__ __forceinline__ ts_blocks blocks_of(int V) {
  ts_blocks b;
  b.size = V <= TS_MIN_BLOCK * TS_MAX_BLOCKS ? TS_MIN_BLOCK : (V + TS_MAX_BLOCKS - 1) / TS_MAX_BLOCKS;
  b.n = (V + b.size - 1) / b.size;
  return b;
}

__device__ __forceinline__ double block_sum_one(ts_blocks b, const float *w, int V, int i, const int *skip, int nd) {
  int lo = i * b.size, hi = lo + b.size < V ? lo + b.size : V;
  return lanes_sum(w, lo, hi - lo, skip, nd);
}

/* Every block sum, a block of the vocabulary a thread. */
__device__ void blocks_build(double *sum, ts_blocks b, const float *w, int V) {
  for (int i = threadIdx.x; i < b.n; i += blockDim.x)
    sum[i] = block_sum_one(b, w, V, i, nullptr, 0);
}

/* The CPU's blocks_draw, by one thread: the draw with uniform u from w (less `skip`). */
__device__ int blocks_draw(const double *sum, ts_blocks b, const float *w, int V, double u, const int *skip, int nd) {
  double total = 0;
  for (int i = 0; i < b.n; i++)
    total += sum[i];
  double target = __dmul_rn(u, total), cum = 0;
  int last = -1;
  for (int i = 0; i < b.n; i++) {
    if (!(sum[i] > 0)) continue;
    last = i;
    if (!(target < cum + sum[i])) {
      cum += sum[i];
      continue;
    }
    int lo = i * b.size, hi = lo + b.size < V ? lo + b.size : V, x = -1;
    for (int v = lo; v < hi; v++) {
      float wv = kept_w(w, v, skip, nd);
      if (!(wv > 0)) continue;
      cum += wv;
      x = v;
      if (target < cum) break;
    }
    return x;
  }
  if (last < 0) return -1;
  for (int v = (last + 1) * b.size < V ? (last + 1) * b.size - 1 : V - 1; v >= 0; v--)
    if (kept_w(w, v, skip, nd) > 0) return v;
  return -1;
}

/* One block a row: its block sums in parallel, then thread 0 draws k times, re-summing the block
 * of each draw without it. */
__global__ void __launch_bounds__(TS_THREADS)
    draw_distinct_kernel(int32_t *ids, const float *const *q_rows, const double *u, int V, int k) {
  cn_pdl_enter();
  typedef cub::BlockReduce<int, TS_THREADS> Count;
  __shared__ typename Count::TempStorage tmp;
  __shared__ double sum[TS_MAX_BLOCKS];
  __shared__ int drawn[TS_MAX_DRAWS];
  const float *q = q_rows[blockIdx.x];
  ids += (size_t)blockIdx.x * k;
  u += (size_t)blockIdx.x * k;
  ts_blocks b = blocks_of(V);
  blocks_build(sum, b, q, V);
  int support = 0;
  for (int i = threadIdx.x; i < V; i += blockDim.x)
    support += q[i] > 0;
  support = Count(tmp).Sum(support);
  __syncthreads();
  if (threadIdx.x) return;
  int n = k < support ? k : support;
  for (int i = 0; i < n; i++) {
    int x = blocks_draw(sum, b, q, V, u[i], drawn, i);
    drawn[i] = x;
    ids[i] = x;
    sum[x / b.size] = block_sum_one(b, q, V, x / b.size, drawn, i + 1);
  }
  for (int i = n; i < k; i++)
    ids[i] = n > 0 ? ids[0] : 0;
}

int cn_cuda_draw_distinct(cn_cuda_ctx *ctx, int32_t *ids, const float *const *q, const double *u, int rows, int V,
                          int k) {
  CN_CUDA_ENTER(ctx);
  if (rows < 0 || V <= 0 || k < 1 || k > TS_MAX_DRAWS)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_draw_distinct: %d rows of %d, %d draws (1..%d)", rows, V, k,
                    TS_MAX_DRAWS);
  if (!rows) return CANOPY_OK;
  CN_CUDA_CHECK(cn_launch(ctx, draw_distinct_kernel, rows, TS_THREADS, 0, ids, q, u, V, k));
  return CANOPY_OK;
}

/* The block's sum of f(i) over the vocabulary, the same value in every thread. */
template <typename F> __device__ double block_sum(F f, int V, void *tmp_raw, double *bcast) {
  typedef cub::BlockReduce<double, TS_THREADS> Sum;
  typename Sum::TempStorage &tmp = *(typename Sum::TempStorage *)tmp_raw;
  double s = 0;
  for (int i = threadIdx.x; i < V; i += blockDim.x)
    s += f(i);
  s = Sum(tmp).Sum(s);
  if (threadIdx.x == 0) *bcast = s;
  __syncthreads();
  s = *bcast;
  __syncthreads(); /* all have read it before the next use overwrites it */
  return s;
}

/* Block s walks sequence s's tree (the s-th node whose parent is -1 starts it) as the CPU twin
 * does; the vocabulary-wide passes are the block's, the decisions read shared values, so every
 * thread takes the same path. */
__global__ void __launch_bounds__(TS_THREADS)
    accept_sampled_kernel(int32_t *out, const int32_t *tokens, const int32_t *parent, int n, const float *p,
                          const float *const *q_of, const double *u, int V, float *scratch) {
  cn_pdl_enter();
  typedef cub::BlockReduce<double, TS_THREADS> Sum;
  __shared__ typename Sum::TempStorage tmp;
  __shared__ double bcast, bsum[TS_MAX_BLOCKS];
  __shared__ int first, end, first_child, bonus;
  if (threadIdx.x == 0) cn_tree_of_batch(parent, n, (int)blockIdx.x, &first, &end);
  __syncthreads();
  const int f = first, m = end - first;
  tokens += f, parent += f, q_of += f, u += 2 * f, p += (size_t)f * V, out += 2 * blockIdx.x + 2 * f;
  float *rs = scratch + (size_t)2 * blockIdx.x * V, *qs = rs + V;
  int v = 0, a = 0, failed = 0;
  for (;;) {
    const float *r = p + (size_t)v * V, *q = q_of[v];
    if (threadIdx.x == 0) {
      int c = v + 1;
      while (c < m && parent[c] != v) c++;
      first_child = c < m ? c : -1;
    }
    __syncthreads();
    int fc = first_child;
    double R = block_sum([&](int i) { return (double)pos_f(r[i]); }, V, &tmp, &bcast);
    double Q = fc >= 0 && q ? block_sum([&](int i) { return (double)pos_f(q[i]); }, V, &tmp, &bcast) : 0.0;
    if ((fc >= 0 && !q) || !(R > 0)) {
      failed = 1;
      break;
    }
    int next = -1;
    for (int c = fc; c >= 0 && c < m; c++) {
      if (parent[c] != v) continue;
      int32_t x = tokens[c];
      double qx = pos_f(q[x]), rx = pos_f(r[x]);
      if (!(qx > 0)) continue;
      if (__dmul_rn(__dmul_rn(u[2 * c], qx), R) < __dmul_rn(rx, Q)) {
        next = c;
        break;
      }
      if (r != rs) { /* the first rejection at v: r and q move to the scratch rows */
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
          rs[i] = pos_f(r[i]);
          qs[i] = pos_f(q[i]);
        }
        __syncthreads();
        r = rs, q = qs;
      }
      double ir = 1.0 / R, iq = 1.0 / Q;
      double beta = block_sum([&](int i) { return pos_d(__dsub_rn(__dmul_rn(rs[i], ir), __dmul_rn(qs[i], iq))); }, V,
                              &tmp, &bcast);
      if (beta > 0) {
        double ib = 1.0 / beta;
        for (int i = threadIdx.x; i < V; i += blockDim.x)
          rs[i] = pos_f((float)__dmul_rn(__dsub_rn(__dmul_rn(rs[i], ir), __dmul_rn(qs[i], iq)), ib));
        __syncthreads();
        R = block_sum([&](int i) { return (double)rs[i]; }, V, &tmp, &bcast);
      } else if (rx > 0) { /* r = q: a rejection only rounding could give */
        next = c;
        break;
      }
      if (threadIdx.x == 0) qs[x] = 0;
      __syncthreads();
      Q = block_sum([&](int i) { return (double)qs[i]; }, V, &tmp, &bcast);
    }
    if (next < 0) {
      ts_blocks b = blocks_of(V);
      blocks_build(bsum, b, r, V);
      __syncthreads();
      if (threadIdx.x == 0) bonus = blocks_draw(bsum, b, r, V, u[2 * v + 1], nullptr, 0);
      __syncthreads();
      break;
    }
    if (threadIdx.x == 0) {
      out[2 + a] = next;
      out[2 + m + a] = tokens[next];
    }
    a++;
    v = next;
  }
  if (threadIdx.x == 0) {
    out[0] = failed ? -1 : a;
    out[1] = failed ? -1 : bonus;
  }
}

int cn_cuda_accept_sampled(cn_cuda_ctx *ctx, int32_t *out, const int32_t *tokens, const int32_t *parent, int n,
                           int n_seqs, const float *p, const float *const *q, const double *u, int V, float *scratch) {
  CN_CUDA_ENTER(ctx);
  if (n < 1 || n_seqs < 1 || n_seqs > n || V <= 0)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_accept_sampled: %d trees of %d nodes in all over %d tokens",
                    n_seqs, n, V);
  CN_CUDA_CHECK(cn_launch(ctx, accept_sampled_kernel, n_seqs, TS_THREADS, 0, out, tokens, parent, n, p, q, u, V,
                          scratch));
  return CANOPY_OK;
}
