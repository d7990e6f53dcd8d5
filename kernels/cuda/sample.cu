/* Sampled token choice per row (temperature, top-k, top-p, one uniform u per row), with the rule
 * of cn_cpu_sample (kernels/cpu/sample.c): only the ids leave the device.
 *
 * The kept set is the top-k / top-p prefix of the row sorted by (logit descending, id ascending).
 * The order comes from cub::DeviceSegmentedRadixSort over the whole row (a stable sort of the
 * logits with the ids as values, so equal logits keep the lower id first, as the CPU comparator
 * does). A block-wide top-k select would read less for small k, but top-p needs the sorted prefix
 * of an unknown length anyway, and one sort of rows x vocab floats is a few microseconds next to a
 * forward; the sort is skipped when neither cut applies. A kept set that is a prefix of a total
 * order is described by its last member (key, id), so the draw pass tests membership with two
 * comparisons and walks the row in id order, which is the order in which the CPU accumulates its
 * CDF: with the same u both pick the same token unless u lies within rounding of a CDF step (or
 * the top-p mass lies within rounding of a prefix sum). */
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>
#include <math.h>

#include "kernels/cuda/cuda_common.cuh"

#define SAMPLE_THREADS 256

/* The last kept member of a row's sorted order; id < 0: every token is kept (no cut applied). */
struct sample_cut {
  float key;
  int id;
};

/* logit / T as the CPU computes it: the product rounded before the max is subtracted (nvcc would
 * otherwise fuse l * inv_t - mx into one FMA, which the C compiler does not). */
__device__ __forceinline__ float scaled(float l, float inv_t) { return __fmul_rn(l, inv_t); }

struct max_op {
  template <typename T> __device__ __forceinline__ T operator()(const T &a, const T &b) const { return b > a ? b : a; }
};

static size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

/* Keys with -0 made +0 (the radix order separates them, the CPU comparator does not) and ids. */
__global__ void sample_prep_kernel(float *keys, int *vals, int *offsets, const float *logits, int rows, int V) {
  cn_pdl_enter();
  size_t total = (size_t)rows * V;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
    keys[e] = logits[e] + 0.0f;
    vals[e] = (int)(e % V);
  }
  for (size_t r = blockIdx.x * (size_t)blockDim.x + threadIdx.x; r <= (size_t)rows; r += (size_t)gridDim.x * blockDim.x)
    offsets[r] = (int)(r * V);
}

/* One block per row over the sorted keys: the last member of the top-k set, or of its top-p
 * prefix (the smallest prefix whose mass reaches top_p; the mass before a kept token is < top_p
 * times the total, accumulated in double as the CPU does). */
__global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_cut_kernel(sample_cut *cut, const float *keys, const int *vals, int V, int n, float inv_t, float top_p) {
  cn_pdl_enter();
  typedef cub::BlockReduce<double, SAMPLE_THREADS> Sum;
  typedef cub::BlockScan<double, SAMPLE_THREADS> Scan;
  typedef cub::BlockReduce<int, SAMPLE_THREADS> Max;
  __shared__ union {
    typename Sum::TempStorage sum;
    typename Scan::TempStorage scan;
    typename Max::TempStorage max;
  } tmp;
  __shared__ double total;
  const float *k = keys + (size_t)blockIdx.x * V;
  const int *v = vals + (size_t)blockIdx.x * V;
  int last = n - 1;
  if (top_p < 1) {
    float mx = scaled(k[0], inv_t);
    double s = 0;
    for (int i = threadIdx.x; i < n; i += SAMPLE_THREADS)
      s += expf(scaled(k[i], inv_t) - mx);
    s = Sum(tmp.sum).Sum(s);
    if (threadIdx.x == 0) total = s;
    __syncthreads();
    double limit = (double)top_p * total, carry = 0;
    int keep_last = 0; /* the first token is always kept */
    for (int base = 0; base < n; base += SAMPLE_THREADS) {
      int i = base + threadIdx.x;
      double p = i < n ? (double)expf(scaled(k[i], inv_t) - mx) : 0.0, excl, chunk;
      Scan(tmp.scan).ExclusiveSum(p, excl, chunk);
      __syncthreads();
      if (i < n && carry + excl < limit) keep_last = i; /* the before-mass only grows with i */
      carry += chunk;
      if (carry >= limit) break; /* every later token has before-mass >= limit: all threads agree */
    }
    last = Max(tmp.max).Reduce(keep_last, max_op());
  }
  if (threadIdx.x == 0) cut[blockIdx.x] = (sample_cut){k[last], v[last]};
}

__device__ __forceinline__ bool kept(float l, int i, sample_cut c) {
  return c.id < 0 || l > c.key || (l == c.key && i <= c.id);
}

/* The kept set's max of logit / T and its mass sum exp(logit / T - max) in double, the same in
 * every thread of the block (the draw and the probabilities both start from them). */
struct kept_stats {
  float mx;
  double sum;
};

__device__ kept_stats kept_max_sum(const float *l, sample_cut c, int V, float inv_t) {
  typedef cub::BlockReduce<float, SAMPLE_THREADS> FMax;
  typedef cub::BlockReduce<double, SAMPLE_THREADS> Sum;
  __shared__ union {
    typename FMax::TempStorage fmax;
    typename Sum::TempStorage sum;
  } tmp;
  __shared__ float s_mx;
  __shared__ double s_sum;
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < V; i += SAMPLE_THREADS)
    if (kept(l[i], i, c)) mx = fmaxf(mx, scaled(l[i], inv_t));
  mx = FMax(tmp.fmax).Reduce(mx, max_op());
  if (threadIdx.x == 0) s_mx = mx;
  __syncthreads();
  mx = s_mx;
  double s = 0;
  for (int i = threadIdx.x; i < V; i += SAMPLE_THREADS)
    if (kept(l[i], i, c)) s += expf(scaled(l[i], inv_t) - mx);
  s = Sum(tmp.sum).Sum(s);
  if (threadIdx.x == 0) s_sum = s;
  __syncthreads();
  return kept_stats{mx, s_sum};
}

/* One block per row: the kept set's max and mass, then its CDF in id order (in double, chunk by
 * chunk) until it passes u. */
__global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_draw_kernel(int32_t *ids, const float *logits, const sample_cut *cuts, const double *u, int V, float inv_t) {
  cn_pdl_enter();
  typedef cub::BlockScan<double, SAMPLE_THREADS> Scan;
  typedef cub::BlockReduce<int, SAMPLE_THREADS> IMax;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename IMax::TempStorage imax;
  } tmp;
  __shared__ int s_hit;
  const float *l = logits + (size_t)blockIdx.x * V;
  sample_cut c = cuts ? cuts[blockIdx.x] : (sample_cut){0.0f, -1};
  kept_stats k = kept_max_sum(l, c, V, inv_t);
  float mx = k.mx;
  if (threadIdx.x == 0) s_hit = INT_MAX;
  __syncthreads();
  double sum = k.sum, uu = u[blockIdx.x], carry = 0;
  int last = 0;
  for (int base = 0; base < V; base += SAMPLE_THREADS) {
    int i = base + threadIdx.x;
    /* The CPU's dist[i] is the float of p / sum; the CDF adds those floats in double. */
    float d = i < V && kept(l[i], i, c) ? (float)(expf(scaled(l[i], inv_t) - mx) / sum) : 0.0f;
    double incl, chunk;
    Scan(tmp.scan).InclusiveSum((double)d, incl, chunk);
    if (d > 0) {
      last = i;
      if (uu < carry + incl) atomicMin(&s_hit, i);
    }
    carry += chunk;
    __syncthreads();
    if (s_hit != INT_MAX) break; /* read by all after the barrier: they leave together */
  }
  last = IMax(tmp.imax).Reduce(last, max_op());
  if (threadIdx.x == 0) ids[blockIdx.x] = s_hit != INT_MAX ? s_hit : last;
}

static bool needs_sort(int V, int top_k, float top_p) { return top_p < 1 || (top_k > 0 && top_k < V); }

/* The workspace's parts, in order: cuts, offsets, keys in/out, values in/out, CUB's temp. */
typedef struct sample_ws {
  sample_cut *cut;
  int *offsets;
  float *keys_in, *keys_out;
  int *vals_in, *vals_out;
  void *temp;
  size_t temp_bytes, total;
} sample_ws;

static int layout(sample_ws *w, char *base, int rows, int V) {
  size_t items = (size_t)rows * V, at = 0;
  size_t temp = 0;
  CN_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      nullptr, temp, (const float *)nullptr, (float *)nullptr, (const int *)nullptr, (int *)nullptr, (int)items, rows,
      (const int *)nullptr, (const int *)nullptr));
  w->cut = (sample_cut *)(base + at), at += align256(sizeof(sample_cut) * (size_t)rows);
  w->offsets = (int *)(base + at), at += align256(sizeof(int) * ((size_t)rows + 1));
  w->keys_in = (float *)(base + at), at += align256(sizeof(float) * items);
  w->keys_out = (float *)(base + at), at += align256(sizeof(float) * items);
  w->vals_in = (int *)(base + at), at += align256(sizeof(int) * items);
  w->vals_out = (int *)(base + at), at += align256(sizeof(int) * items);
  w->temp = base + at, w->temp_bytes = temp;
  w->total = at + temp;
  return CANOPY_OK;
}

int cn_cuda_sample_workspace(cn_cuda_ctx *ctx, int rows, int V, size_t *bytes) {
  CN_CUDA_ENTER(ctx);
  if (rows <= 0 || V <= 0 || (size_t)rows * V > INT_MAX)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_sample_workspace: rows=%d vocab=%d", rows, V);
  sample_ws w;
  int st = layout(&w, nullptr, rows, V);
  if (!st) *bytes = w.total;
  return st;
}

/* The rows' cuts (NULL: nothing cut), sorting into the workspace when top_k or top_p cut. */
static int cuts_for(cn_cuda_ctx *ctx, const sample_cut **cuts, const float *logits, int rows, int V, float inv_t,
                    int top_k, float top_p, void *workspace, size_t workspace_bytes, const char *who) {
  *cuts = nullptr;
  if (!needs_sort(V, top_k, top_p)) return CANOPY_OK;
  sample_ws w;
  int st = layout(&w, (char *)workspace, rows, V);
  if (st) return st;
  if (workspace_bytes < w.total)
    return cn_error(CANOPY_ERR_INVALID_ARG, "%s: workspace of %zu bytes, %d x %d rows need %zu", who, workspace_bytes,
                    rows, V, w.total);
  size_t items = (size_t)rows * V;
  CN_CUDA_CHECK(cn_launch(ctx, sample_prep_kernel, cn_grid_for(ctx, items, 256), 256, 0, w.keys_in, w.vals_in,
                          w.offsets, logits, rows, V));
  CN_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      w.temp, w.temp_bytes, w.keys_in, w.keys_out, w.vals_in, w.vals_out, (int)items, rows, w.offsets, w.offsets + 1,
      0, (int)(8 * sizeof(float)), ctx->stream));
  int n = top_k > 0 && top_k < V ? top_k : V;
  CN_CUDA_CHECK(
      cn_launch(ctx, sample_cut_kernel, rows, SAMPLE_THREADS, 0, w.cut, w.keys_out, w.vals_out, V, n, inv_t, top_p));
  *cuts = w.cut;
  return CANOPY_OK;
}

static int check_rule(int rows, int V, float temperature, int top_k, float top_p, const char *who) {
  if (rows < 0 || V <= 0 || (size_t)rows * V > INT_MAX)
    return cn_error(CANOPY_ERR_INVALID_ARG, "%s: rows=%d vocab=%d", who, rows, V);
  if (!(temperature >= 0) || !isfinite(temperature) || top_k < 0 || !(top_p > 0 && top_p <= 1))
    return cn_error(CANOPY_ERR_INVALID_ARG, "%s: temperature %g, top_k %d, top_p %g", who, temperature, top_k, top_p);
  return CANOPY_OK;
}

int cn_cuda_sample(cn_cuda_ctx *ctx, int32_t *ids, const float *logits, int rows, int V, float temperature, int top_k,
                   float top_p, const double *u, void *workspace, size_t workspace_bytes) {
  CN_CUDA_ENTER(ctx);
  int st = check_rule(rows, V, temperature, top_k, top_p, "cn_cuda_sample");
  if (st || !rows) return st;
  if (temperature == 0) return cn_cuda_argmax(ctx, ids, logits, CN_CUDA_F32, rows, V);
  float inv_t = 1.0f / temperature;
  const sample_cut *cuts;
  if ((st = cuts_for(ctx, &cuts, logits, rows, V, inv_t, top_k, top_p, workspace, workspace_bytes, "cn_cuda_sample")))
    return st;
  CN_CUDA_CHECK(cn_launch(ctx, sample_draw_kernel, rows, SAMPLE_THREADS, 0, ids, logits, cuts, u, V, inv_t));
  return CANOPY_OK;
}

/* One block per row: the kept set's max and mass, then the row of probabilities, the float of
 * p / sum as the CPU writes it. */
__global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_probs_kernel(float *const *dst, const float *logits, const sample_cut *cuts, int V, float inv_t) {
  cn_pdl_enter();
  const float *l = logits + (size_t)blockIdx.x * V;
  float *out = dst[blockIdx.x];
  sample_cut c = cuts ? cuts[blockIdx.x] : (sample_cut){0.0f, -1};
  kept_stats k = kept_max_sum(l, c, V, inv_t);
  for (int i = threadIdx.x; i < V; i += SAMPLE_THREADS)
    out[i] = kept(l[i], i, c) ? (float)(expf(scaled(l[i], inv_t) - k.mx) / k.sum) : 0.0f;
}

int cn_cuda_sample_probs(cn_cuda_ctx *ctx, float *const *dst, const float *logits, int rows, int V, float temperature,
                         int top_k, float top_p, void *workspace, size_t workspace_bytes) {
  CN_CUDA_ENTER(ctx);
  int st = check_rule(rows, V, temperature, top_k, top_p, "cn_cuda_sample_probs");
  if (!st && temperature == 0)
    st = cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_sample_probs: temperature 0 has no distribution to keep");
  if (st || !rows) return st;
  float inv_t = 1.0f / temperature;
  const sample_cut *cuts;
  if ((st = cuts_for(ctx, &cuts, logits, rows, V, inv_t, top_k, top_p, workspace, workspace_bytes,
                     "cn_cuda_sample_probs")))
    return st;
  CN_CUDA_CHECK(cn_launch(ctx, sample_probs_kernel, rows, SAMPLE_THREADS, 0, dst, logits, cuts, V, inv_t));
  return CANOPY_OK;
}
