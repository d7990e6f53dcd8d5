/* Few-row GEMM, one warp per output feature: the weight row is streamed once with 16-byte loads
 * that bypass L1 (it is read exactly once), the n input rows come through L1 (every warp reads
 * them), and the n dot products are reduced across the warp at the end. A decode step is the
 * weight bytes over the bandwidth; this keeps enough loads in flight per SM to reach it. */
#include "kernels/cuda/gemv.cuh"

#include <stdint.h>

#define WARPS 8 /* per block: 8 output features */

__device__ __forceinline__ void bf16x8_to_f32(uint4 v, float *f) {
  const __nv_bfloat162 *h = (const __nv_bfloat162 *)&v;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    float2 p = __bfloat1622float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

template <int N, typename Y>
__global__ void __launch_bounds__(WARPS * 32)
    gemv_kernel(Y *y, const cn_bf16_t *__restrict__ x, const cn_bf16_t *__restrict__ w, int in, int out,
                bool accumulate, bool vec) {
  cn_pdl_enter();
  int o = blockIdx.x * WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (o >= out) return;
  const cn_bf16_t *wr = w + (size_t)o * in;
  float acc[N];
#pragma unroll
  for (int r = 0; r < N; r++) acc[r] = 0.0f;
  int k0 = 0;
  if (vec) {
    const uint4 *w8 = (const uint4 *)wr;
    int n8 = in / 8;
#pragma unroll 4
    for (int k = lane; k < n8; k += 32) {
      float wf[8], xf[8];
      bf16x8_to_f32(__ldcs(w8 + k), wf);
#pragma unroll
      for (int r = 0; r < N; r++) {
        bf16x8_to_f32(__ldg((const uint4 *)(x + (size_t)r * in) + k), xf);
#pragma unroll
        for (int i = 0; i < 8; i++) acc[r] = fmaf(wf[i], xf[i], acc[r]);
      }
    }
    k0 = n8 * 8;
  }
  for (int k = k0 + lane; k < in; k += 32) {
    float wk = __bfloat162float(wr[k]);
#pragma unroll
    for (int r = 0; r < N; r++) acc[r] = fmaf(wk, __bfloat162float(x[(size_t)r * in + k]), acc[r]);
  }
#pragma unroll
  for (int r = 0; r < N; r++) {
    float v = acc[r];
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(0xffffffffu, v, s);
    if (lane == 0) {
      Y *p = y + (size_t)r * out + o;
      cn_st(p, accumulate ? cn_ld(p) + v : v);
    }
  }
}

template <int N> static int launch(cn_cuda_ctx *ctx, void *y, cn_cuda_dtype y_dt, const cn_bf16_t *x,
                                   const cn_bf16_t *w, int in, int out, bool accumulate) {
  bool vec = in % 8 == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)w % 16 == 0;
  unsigned grid = (unsigned)((out + WARPS - 1) / WARPS);
  return cn_dispatch(y_dt, [&](auto t) {
    using Y = decltype(t);
    CN_CUDA_CHECK(cn_launch(ctx, gemv_kernel<N, Y>, grid, WARPS * 32, 0, (Y *)y, x, w, in, out, accumulate, vec));
    return (int)CANOPY_OK;
  });
}

int cn_gemv_bf16(cn_cuda_ctx *ctx, void *y, cn_cuda_dtype y_dt, const cn_bf16_t *x, const cn_bf16_t *w, int n, int in,
                 int out, bool accumulate) {
  switch (n) {
  case 1: return launch<1>(ctx, y, y_dt, x, w, in, out, accumulate);
  case 2: return launch<2>(ctx, y, y_dt, x, w, in, out, accumulate);
  case 3: return launch<3>(ctx, y, y_dt, x, w, in, out, accumulate);
  case 4: return launch<4>(ctx, y, y_dt, x, w, in, out, accumulate);
  case 5: return launch<5>(ctx, y, y_dt, x, w, in, out, accumulate);
  case 6: return launch<6>(ctx, y, y_dt, x, w, in, out, accumulate);
  case 7: return launch<7>(ctx, y, y_dt, x, w, in, out, accumulate);
  case 8: return launch<8>(ctx, y, y_dt, x, w, in, out, accumulate);
  }
  return cn_error(CANOPY_ERR_INVALID_ARG, "cn_gemv_bf16: %d rows (1..%d)", n, CN_GEMV_MAX_ROWS);
}
