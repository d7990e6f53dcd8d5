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

/* scale[r] = 1 / sqrt(mean(x[r]^2) + eps) for rows x [N][dim] (T fp32 or bf16); scale is shared
 * memory, valid in every thread on return. */
template <int N, typename T>
__device__ __forceinline__ void cn_rms_scales(const T *x, int dim, float eps, float *scale) {
  __shared__ float part[CN_RMS_THREADS / 32][N];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float ss[N];
#pragma unroll
  for (int r = 0; r < N; r++) {
    ss[r] = 0.0f;
    for (int j = threadIdx.x; j < dim; j += CN_RMS_THREADS) {
      float v = cn_ld(x + (size_t)r * dim + j);
      ss[r] += v * v;
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
