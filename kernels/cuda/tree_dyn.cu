/* A dynamic (EAGLE-2) tree grown where the draft's picks are (kernels/tree_dyn.h): one block grows
 * a level from the draft's top ids, and one block stages a forward's mask and positions from the
 * state. The host twin, kernels/cpu/tree_dyn.c, is the reference: same arithmetic, same order. The
 * orders are rank counts (each candidate counts those before it), which a tree's few hundred
 * candidates afford. */
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/tree_dyn.h"

#define DYN_THREADS 512

__device__ static inline float dyn_f(int32_t w) { return __int_as_float(w); }
__device__ static inline int32_t dyn_w(float f) { return __float_as_int(f); }

/* The twin's `before`: higher score, then the lower candidate index. */
__device__ static inline bool dyn_before(const int32_t *w, const cn_dyn_layout &l, int a, int b) {
  float sa = dyn_f(w[l.c_score + a]), sb = dyn_f(w[l.c_score + b]);
  return sa != sb ? sa > sb : a < b;
}

/* Fed node f's candidates from its row (the twin's `expand`), by one thread. */
__device__ static void dyn_expand(int32_t *w, const cn_dyn_layout &l, int f, const int32_t *ids, const float *logp) {
  const int K = l.K;
  int order[32], n = 0;
  float q[32];
  for (int i = 0; i < K; i++) {
    q[i] = expf(logp[i]);
    if (!(q[i] > 0)) continue;
    int at = n++;
    for (; at > 0; at--) {
      int o = order[at - 1];
      if (q[o] > q[i] || (q[o] == q[i] && ids[o] < ids[i])) break;
      order[at] = o;
    }
    order[at] = i;
  }
  int valid = w[l.f_valid + f];
  float score = dyn_f(w[l.f_score + f]), path = dyn_f(w[l.f_logp + f]), prev = INFINITY;
  for (int r = 0; r < K; r++) {
    int c = f * K + r;
    w[l.c_fed + c] = -1;
    w[l.c_valid + c] = valid && r < n;
    if (!(valid && r < n)) continue;
    float logq = fminf(logf(q[order[r]]), 0.0f), s = fminf(score + logq, prev);
    prev = s;
    w[l.c_token + c] = ids[order[r]];
    w[l.c_score + c] = dyn_w(s);
    w[l.c_logp + c] = dyn_w(path + logq);
  }
}

/* How many valid candidates of [lo, hi) come before c. */
__device__ static int dyn_rank(const int32_t *w, const cn_dyn_layout &l, int lo, int hi, int c) {
  int r = 0;
  for (int o = lo; o < hi; o++) r += w[l.c_valid + o] && dyn_before(w, l, o, c);
  return r;
}

__global__ void __launch_bounds__(DYN_THREADS)
    dyn_grow_kernel(int32_t *w, cn_dyn_layout l, int level, const int32_t *top, const float *logp, int k) {
  cn_pdl_enter();
  const int K = l.K, tid = threadIdx.x;
  if (level == 0) {
    if (tid == 0) {
      w[l.f_parent] = -1, w[l.f_token] = -1, w[l.f_depth] = 0, w[l.f_valid] = 1;
      w[l.f_score] = dyn_w(0.0f), w[l.f_logp] = dyn_w(0.0f);
    }
    for (int c = tid; c < l.C; c += blockDim.x) w[l.c_valid + c] = 0, w[l.c_fed + c] = -1;
  }
  __syncthreads();
  const int first = cn_dyn_level_first(&l, level), rows = level == 0 ? 1 : K;
  if (tid < rows) dyn_expand(w, l, first + tid, top + (size_t)tid * k, logp + (size_t)tid * k);
  __syncthreads();
  __shared__ int n_kept, bad;
  if (tid == 0) n_kept = 0, bad = 0;
  int32_t *out_of = w + l.scratch, *to_out = w + l.scratch + l.C; /* candidate -> tree node, fed -> tree node */
  if (level + 1 < l.D) {
    /* The K best candidates of the level's picks, fed in index (BFS) order. */
    const int lo = first * K, hi = lo + rows * K;
    for (int c = lo + tid; c < hi; c += blockDim.x)
      out_of[c] = w[l.c_valid + c] && dyn_rank(w, l, lo, hi, c) < K;
    __syncthreads();
    for (int c = lo + tid; c < hi; c += blockDim.x) {
      if (!out_of[c]) continue;
      int j = 0;
      for (int o = lo; o < c; o++) j += out_of[o];
      int f = cn_dyn_level_first(&l, level + 1) + j;
      w[l.f_parent + f] = c / K;
      w[l.f_token + f] = w[l.c_token + c];
      w[l.f_depth + f] = level + 1;
      w[l.f_valid + f] = 1;
      w[l.f_score + f] = w[l.c_score + c];
      w[l.f_logp + f] = w[l.c_logp + c];
      w[l.c_fed + c] = f;
      atomicAdd(&n_kept, 1);
    }
    __syncthreads();
    for (int j = n_kept + tid; j < K; j += blockDim.x) { /* nothing left for these slots */
      int f = cn_dyn_level_first(&l, level + 1) + j;
      w[l.f_parent + f] = -1, w[l.f_token + f] = 0, w[l.f_depth + f] = level + 1, w[l.f_valid + f] = 0;
      w[l.f_score + f] = dyn_w(-INFINITY), w[l.f_logp + f] = dyn_w(-INFINITY);
    }
    return;
  }
  /* The N best candidates, numbered in index (BFS) order behind the root, then padding. */
  for (int c = tid; c < l.C; c += blockDim.x) out_of[c] = w[l.c_valid + c] && dyn_rank(w, l, 0, l.C, c) < l.N;
  for (int f = tid; f < l.R; f += blockDim.x) to_out[f] = f == 0 ? 0 : -1;
  __syncthreads();
  for (int c = tid; c < l.C; c += blockDim.x) {
    if (!out_of[c]) continue;
    atomicAdd(&n_kept, 1);
  }
  __syncthreads();
  /* Numbering, then the fed nodes' numbers, then the parents: three passes over the kept. */
  for (int c = tid; c < l.C; c += blockDim.x)
    if (out_of[c]) {
      int o = 1;
      for (int x = 0; x < c; x++) o += out_of[x] != 0;
      if (w[l.c_fed + c] >= 0) to_out[w[l.c_fed + c]] = o;
      w[l.t_token + o] = w[l.c_token + c];
      w[l.t_pick + o] = c % K;
      w[l.t_fed + o] = w[l.c_fed + c];
    }
  __syncthreads();
  for (int c = tid; c < l.C; c += blockDim.x)
    if (out_of[c]) {
      int o = 1;
      for (int x = 0; x < c; x++) o += out_of[x] != 0;
      int p = to_out[c / K];
      if (p < 0) bad = 1;
      w[l.t_parent + o] = p;
    }
  for (int o = 1 + n_kept + tid; o < l.T; o += blockDim.x)
    w[l.t_token + o] = 0, w[l.t_parent + o] = -2, w[l.t_pick + o] = 0, w[l.t_fed + o] = -1;
  __syncthreads();
  if (tid == 0) {
    w[l.t_token] = -1, w[l.t_parent] = -1, w[l.t_pick] = 0, w[l.t_fed] = 0;
    w[l.t_n] = bad ? 0 : 1 + n_kept; /* 0: malformed, which the host reports */
  }
}

/* Draft level `level` >= 1: mask [K][words of level K], rope positions pos [K], attention
 * positions attn_pos [level K] of every tree slot, tokens [K]. Verification (-1): mask [T][words of
 * T], pos and attn_pos [T], parent [T], tokens [T] but the root's. */
__global__ void __launch_bounds__(DYN_THREADS)
    dyn_stage_kernel(const int32_t *w, cn_dyn_layout l, int level, int pos0, uint64_t *mask, int32_t *pos,
                     int32_t *attn_pos, int32_t *parent, int32_t *tokens) {
  cn_pdl_enter();
  const int tid = threadIdx.x;
  if (level > 0) {
    const int first = cn_dyn_level_first(&l, level), words = (level * l.K + 63) / 64;
    for (int g = 1 + tid; g < first + l.K; g += blockDim.x) attn_pos[g - 1] = pos0 + w[l.f_depth + g];
    for (int i = tid; i < l.K; i += blockDim.x) {
      uint64_t *row = mask + (size_t)i * words;
      for (int x = 0; x < words; x++) row[x] = 0;
      for (int g = first + i; g > 0; g = w[l.f_parent + g]) row[(g - 1) / 64] |= 1ull << ((g - 1) % 64);
      pos[i] = pos0 + w[l.f_depth + first + i];
      tokens[i] = w[l.f_token + first + i];
    }
    return;
  }
  const int words = (l.T + 63) / 64;
  for (int o = tid; o < l.T; o += blockDim.x) {
    uint64_t *row = mask + (size_t)o * words;
    for (int x = 0; x < words; x++) row[x] = 0;
    int depth = 0;
    for (int u = o;; depth++) {
      row[u / 64] |= 1ull << (u % 64);
      if (w[l.t_parent + u] < 0) break;
      u = w[l.t_parent + u];
    }
    pos[o] = attn_pos[o] = pos0 + depth;
    parent[o] = w[l.t_parent + o];
    if (o > 0) tokens[o] = w[l.t_token + o];
  }
}

int cn_cuda_dyn_grow(cn_cuda_ctx *ctx, int32_t *w, const cn_dyn_layout *l, int level, const int32_t *top,
                     const float *logp, int k) {
  CN_CUDA_ENTER(ctx);
  if (level < 0 || level >= l->D || k < l->K || l->K > 32)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_dyn_grow: level %d of %d, rows of %d ids (K %d)", level, l->D, k,
                    l->K);
  CN_CUDA_CHECK(cn_launch(ctx, dyn_grow_kernel, 1, DYN_THREADS, 0, w, *l, level, top, logp, k));
  return CANOPY_OK;
}

int cn_cuda_dyn_stage(cn_cuda_ctx *ctx, const int32_t *w, const cn_dyn_layout *l, int level, int pos0, uint64_t *mask,
                      int32_t *pos, int32_t *attn_pos, int32_t *parent, int32_t *tokens) {
  CN_CUDA_ENTER(ctx);
  if (level == 0 || level >= l->D || level < -1)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_dyn_stage: level %d of %d", level, l->D);
  CN_CUDA_CHECK(
      cn_launch(ctx, dyn_stage_kernel, 1, DYN_THREADS, 0, w, *l, level, pos0, mask, pos, attn_pos, parent, tokens));
  return CANOPY_OK;
}
