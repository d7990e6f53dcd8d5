/* The RMSNorm scales of n rows at once by one block (C++ only; rmsnorm.cu and the few-row GEMM's
 * staging in gemv.cu). Thread t sums the squares of elements t, t + CN_RMS_THREADS, ... of each
 * row, the warps reduce by shuffles, and the warps' sums are added in warp order: a row's scale
 * is the same bits whatever else the block normalises, so a fused GEMM's normed input is exactly
 * what the RMSNorm kernel writes. All the rows cost one pass and two barriers, where a reduction
 * per row cost two barriers a row. */
#ifndef CANOPY_KERNELS_CUDA_RMS_SCALE_CUH
#define CANOPY_KERNELS_CUDA_RMS_SCALE_CUH

#include "kernels/cuda/cuda_common.cuh"

#define CN_RMS_THREADS 256 /* the block size of every caller */

/* y[j] = x[j] * s * w[j] for this thread's elements j of a row (j = threadIdx.x + k CN_RMS_THREADS),
 * LOADS of them loaded before any is stored; each thread writes only what it read, so y may alias
 * x. Every RMSNorm of the engine scales with this expression. */
template <int LOADS, typename TO, typename TI>
__device__ __forceinline__ void cn_rms_apply(TO *y, const TI *x, const cn_bf16_t *w, int dim, float s) {
  for (int j0 = threadIdx.x; j0 < dim; j0 += LOADS * CN_RMS_THREADS) {
    float v[LOADS], g[LOADS];
#pragma unroll
    for (int u = 0; u < LOADS; u++) {
      const int j = j0 + u * CN_RMS_THREADS;
      v[u] = j < dim ? cn_ld(x + j) : 0.0f;
      g[u] = j < dim ? cn_ld(w + j) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < LOADS; u++) {
      const int j = j0 + u * CN_RMS_THREADS;
      if (j < dim) cn_st(y + j, v[u] * s * g[u]);
    }
  }
}

/* scale[r] = 1 / sqrt(mean(x[r]^2) + eps) for rows x [N][dim] (T fp32 or bf16); scale is shared
 * memory, valid in every thread on return. Each thread has LOADS loads in flight before it adds
 * their squares, in the same order as one at a time (the same bits for every LOADS): a row of 4096
 * is 16 loads a thread, which one after the other cost 16 memory latencies. */
template <int N, int LOADS, typename T>
__device__ __forceinline__ void cn_rms_scales(const T *x, int dim, float eps, float *scale) {
  __shared__ float part[CN_RMS_THREADS / 32][N];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float ss[N];
#pragma unroll
  for (int r = 0; r < N; r++) {
    ss[r] = 0.0f;
    for (int j0 = threadIdx.x; j0 < dim; j0 += LOADS * CN_RMS_THREADS) {
      float v[LOADS];
#pragma unroll
      for (int u = 0; u < LOADS; u++) {
        const int j = j0 + u * CN_RMS_THREADS;
        v[u] = j < dim ? cn_ld(x + (size_t)r * dim + j) : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < LOADS; u++)
        if (j0 + u * CN_RMS_THREADS < dim) ss[r] += v[u] * v[u];
    }
  }
#pragma unroll
  for (int r = 0; r < N; r++) {
#pragma unroll
    for (int s = 16; s; s >>= 1)
      ss[r] += __shfl_xor_sync(0xffffffffu, ss[r], s);
    if (lane == 0) part[warp][r] = ss[r];
  }
  __syncthreads();
  if (threadIdx.x < N) {
    float t = 0.0f;
#pragma unroll
    for (int w = 0; w < CN_RMS_THREADS / 32; w++)
      t += part[w][threadIdx.x];
    scale[threadIdx.x] = rsqrtf(t / dim + eps);
  }
  __syncthreads();
}

#endif
