/* Few-row GEMM, one warp per output feature (two weight rows for SwiGLU, its gate and up rows, and
 * for RoPE, a rotary pair): the weight rows are streamed once with 16-byte loads that bypass L1
 * (they are read exactly once), the n input rows come through L1 or shared memory (every warp
 * reads them), and the n dot products are reduced across the warp at the end. A decode step is the weight bytes over the bandwidth; this
 * keeps enough loads in flight per SM to reach it.
 *
 * Staged inputs (fp32 x, or x to be RMSNormed) are made bf16 by each block into shared memory
 * before the warps start: every block recomputes them, which costs L2 reads of n x in fp32 values
 * per block, small against the 8 weight rows of in bf16 values each block streams from memory. */
#include <stdint.h>

#include "kernels/cuda/gemv.cuh"
#include "kernels/cuda/rms_scale.cuh"
#include "kernels/cuda/rope.cuh"

#define WARPS 8 /* per block: 8 output features */
#define THREADS (WARPS * 32)
static_assert(THREADS == CN_RMS_THREADS, "the staged RMSNorm reduces over rmsnorm.cu's block size");

struct gemv_params {
  void *y;
  const void *x;
  const cn_bf16_t *norm_w;
  float eps;
  const cn_bf16_t *w, *bias;
  int in, out; /* out: output features, warps' units (CN_GEMV_ROPE: rotary pairs, half the weight rows) */
  bool vec;    /* in % 8 == 0 and 16-byte aligned rows: the uint4 path */
  cn_gemv_rope rope;
};

/* Weight rows a unit: two for SwiGLU (gate and up) and RoPE (a rotary pair), else one. */
template <int HOW> constexpr int rows_per_unit() { return HOW == CN_GEMV_SWIGLU || HOW == CN_GEMV_ROPE ? 2 : 1; }

/* Weight row i (of R) of unit o: its gate and up rows for SwiGLU, a rotary pair (k, k + d / 2 of
 * one head) for RoPE. */
template <int HOW> __device__ __forceinline__ int weight_row(const gemv_params &p, int o, int i) {
  if constexpr (HOW == CN_GEMV_SWIGLU) return o + i * p.out;
  if constexpr (HOW == CN_GEMV_ROPE) {
    const int half = p.rope.head_dim / 2;
    return o / half * p.rope.head_dim + o % half + i * half;
  }
  return o;
}

/* Row r's pair (a, b) of unit o into q (rotated), or into the cache: k rotated, v as it is; the
 * same arithmetic and rounding as qkv_rope.cu. */
template <typename Y> __device__ __forceinline__ void rope_out(const gemv_params &p, int r, int o, float a, float b) {
  const cn_gemv_rope &q = p.rope;
  const int d = q.head_dim, half = d / 2, h = o / half, k = o % half;
  const size_t kv_dim = (size_t)q.n_kv_heads * d;
  if (h >= q.n_heads + q.n_kv_heads) {
    const size_t j = (size_t)(h - q.n_heads - q.n_kv_heads) * d + k;
    cn_kv_put(q.kv, true, q.slots[r], j, kv_dim, a);
    cn_kv_put(q.kv, true, q.slots[r], j + half, kv_dim, b);
    return;
  }
  float x0, x1;
  cn_rope_pair(a, b, q.pos[r], q.inv_freq[k], &x0, &x1);
  if (h < q.n_heads) {
    Y *y = (Y *)p.y + (size_t)r * q.n_heads * d + (size_t)h * d + k;
    cn_st(y, x0);
    cn_st(y + half, x1);
  } else {
    const size_t j = (size_t)(h - q.n_heads) * d + k;
    cn_kv_put(q.kv, false, q.slots[r], j, kv_dim, x0);
    cn_kv_put(q.kv, false, q.slots[r], j + half, kv_dim, x1);
  }
}

/* Output unit o of input row r from its (bias-added) dot products: a, and b the second row's for
 * SwiGLU and RoPE (a again otherwise). Both forms of the kernel end here. */
template <int HOW, typename Y>
__device__ __forceinline__ void put_out(const gemv_params &p, int r, int o, float a, float b) {
  Y *y = (Y *)p.y + (size_t)r * p.out + o;
  if constexpr (HOW == CN_GEMV_ROPE)
    rope_out<Y>(p, r, o, a, b);
  else if constexpr (HOW == CN_GEMV_SWIGLU)
    cn_st(y, a / (1.0f + expf(-a)) * b);
  else if constexpr (HOW == CN_GEMV_ADD)
    cn_st(y, cn_ld(y) + a);
  else
    cn_st(y, a);
}

__device__ __forceinline__ void bf16x8_to_f32(uint4 v, float *f) {
  const __nv_bfloat162 *h = (const __nv_bfloat162 *)&v;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    float2 p = __bfloat1622float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

/* Writes the block's bf16 copy of the n fp32 input rows into xs [N][in]. The RMSNorm is
 * rmsnorm.cu's, step for step (the same scales from rms_scale.cuh over the same 256 threads, the
 * same scaling expression), so each value is the bit the unfused op writes. */
template <int N, int XK> __device__ __forceinline__ void stage(cn_bf16_t *xs, const gemv_params &p) {
  const float *x = (const float *)p.x;
  const int in = p.in;
  if constexpr (XK == CN_GEMV_X_NORM) {
    /* One row: 8 loads a thread in flight (Llama-3-8B decode 8% faster than one at a time, its
     * q/k/v and gate/up products 17% and 8%). Two rows: one at a time, which measured 4-7% faster
     * there than 8 (bench/RESULTS.md). */
    constexpr int LOADS = N == 1 ? 8 : 1;
    __shared__ float scale[N];
    cn_rms_scales<N, LOADS>(x, in, p.eps, scale);
#pragma unroll 1
    for (int r = 0; r < N; r++)
      cn_rms_apply<LOADS>(xs + (size_t)r * in, x + (size_t)r * in, p.norm_w, in, scale[r]);
  } else {
    for (int e = threadIdx.x; e < N * in; e += THREADS)
      cn_st(xs + e, x[e]);
  }
  __syncthreads();
}

/* Loads per lane and weight row in one batch of the vector path: the warp keeps two batches
 * (2 x 4 x 16 bytes per lane and row) in flight. */
#define BATCH 4

template <int R>
__device__ __forceinline__ void load_batch(uint4 (&dst)[R][BATCH], const uint4 *const (&w8)[R], int base, int n8,
                                           bool valid) {
#pragma unroll
  for (int u = 0; u < BATCH; u++) {
    int k = base + 32 * u;
#pragma unroll
    for (int i = 0; i < R; i++)
      dst[i][u] = valid && k < n8 ? __ldcs(w8[i] + k) : make_uint4(0, 0, 0, 0);
  }
}

template <int N, int XK, int HOW, typename Y> __global__ void __launch_bounds__(THREADS) gemv_kernel(gemv_params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr bool staged = XK != CN_GEMV_X_BF16;
  constexpr int R = rows_per_unit<HOW>(); /* weight rows per warp */
  const int in = p.in, o = blockIdx.x * WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  const bool valid = o < p.out;
  const int n8 = p.vec ? in / 8 : 0;
  int row[R];
  const cn_bf16_t *wr[R];
  const uint4 *w8[R];
#pragma unroll
  for (int i = 0; i < R; i++) {
    row[i] = weight_row<HOW>(p, valid ? o : 0, i);
    wr[i] = p.w + (size_t)row[i] * in;
    w8[i] = (const uint4 *)wr[i];
  }
  /* The first batch of weights is requested before waiting for the kernel before this one: no
   * kernel of a forward writes weights, and the loads then overlap that kernel's tail and this
   * block's input staging instead of following them. */
  uint4 cur[R][BATCH];
  load_batch<R>(cur, w8, lane, n8, valid);
  cn_pdl_enter();
  const cn_bf16_t *x = (const cn_bf16_t *)p.x;
  if constexpr (staged) {
    stage<N, XK>((cn_bf16_t *)smem, p);
    x = (const cn_bf16_t *)smem;
  }
  if (!valid) return;
  float acc[R][N];
#pragma unroll
  for (int i = 0; i < R; i++)
#pragma unroll
    for (int r = 0; r < N; r++)
      acc[i][r] = 0.0f;
  /* k ascending per lane, the row order of fmaf chains of a plain k loop: a row's sum does not
   * depend on the batching. */
  for (int base = lane; base < n8; base += 32 * BATCH) {
    uint4 nxt[R][BATCH];
    load_batch<R>(nxt, w8, base + 32 * BATCH, n8, true);
#pragma unroll
    for (int u = 0; u < BATCH; u++) {
      int k = base + 32 * u;
      if (k >= n8) break;
      float wf[R][8], xf[8];
#pragma unroll
      for (int i = 0; i < R; i++)
        bf16x8_to_f32(cur[i][u], wf[i]);
#pragma unroll
      for (int r = 0; r < N; r++) {
        const uint4 *xr = (const uint4 *)(x + (size_t)r * in) + k;
        bf16x8_to_f32(staged ? *xr : __ldg(xr), xf);
#pragma unroll
        for (int i = 0; i < R; i++)
#pragma unroll
          for (int e = 0; e < 8; e++)
            acc[i][r] = fmaf(wf[i][e], xf[e], acc[i][r]);
      }
    }
#pragma unroll
    for (int i = 0; i < R; i++)
#pragma unroll
      for (int u = 0; u < BATCH; u++)
        cur[i][u] = nxt[i][u];
  }
  const int k0 = n8 * 8;
  for (int k = k0 + lane; k < in; k += 32) {
    float wk[R];
#pragma unroll
    for (int i = 0; i < R; i++)
      wk[i] = __bfloat162float(wr[i][k]);
#pragma unroll
    for (int r = 0; r < N; r++) {
      float xk = __bfloat162float(x[(size_t)r * in + k]);
#pragma unroll
      for (int i = 0; i < R; i++)
        acc[i][r] = fmaf(wk[i], xk, acc[i][r]);
    }
  }
#pragma unroll
  for (int r = 0; r < N; r++) {
    float v[R];
#pragma unroll
    for (int i = 0; i < R; i++) {
      v[i] = acc[i][r];
#pragma unroll
      for (int s = 16; s > 0; s >>= 1)
        v[i] += __shfl_xor_sync(0xffffffffu, v[i], s);
      if (p.bias) v[i] += cn_ld(p.bias + row[i]); /* the bias pass wrote it first: bias + v */
    }
    if (!lane) put_out<HOW, Y>(p, r, o, v[0], v[R - 1]);
  }
}

/* ---- the tensor-core form ------------------------------------------------------------------
 *
 * From 3 rows on the kernel above is bound by instructions (per 16 weight bytes, n input loads and
 * 8 n fused multiply-adds a lane): on Llama-3-8B a step of 3 rows cost 1.29x one row, 8 rows
 * 2.11x. Here the products are mma.sync m16n8k16: a block takes a 16-row tile of W (16 output
 * features, or 8 SwiGLU or RoPE units whose two rows are tile rows u and u + 8) against up to 8
 * input rows (the MMA's 8 columns, rows past n zero), and its 8 warps take the k range in turns,
 * each lane loading 16-byte pieces of two weight rows straight into A fragments. The dot product
 * does not care in which order k goes through the MMA's slots, so lane (g, t) supplies, for both
 * MMAs of a piece, the 8 consecutive k of that piece of weight rows g and g + 8 and of input row g:
 * A and B agree on the permutation, and every load is 16 bytes. The warps' partial tiles are added
 * in warp order through shared memory: a row's result is the same bits whatever n is (other rows
 * only fill other MMA columns). On the 8B this form costs 1.05x a decode step at 4 rows and 1.10x
 * at 8, but alone at 1 and 2 rows it measured 6% and 3% slower than the kernel above (whose warps
 * stream 512 contiguous bytes of one row per load, where here four lanes share a row; H200). It
 * runs from CN_GEMV_MMA_ROWS rows (cn_cuda_set_gemv_mma_rows), 2: in whole 2-row steps, where the
 * kernel above no longer takes in the ops around it, this one was faster (H100, Llama-3-8B 5.76
 * against 6.18 ms; bench/RESULTS.md, eighteenth session). */

#define MMA_TILE 16 /* weight rows a block: one m16 tile */
#define MMA_LOADS 4 /* 16-byte weight loads a lane has in one batch and row: two batches in flight */
/* Contiguous 16-byte pieces of a row a lane loads a turn: 4 (256 contiguous bytes a row for the four
 * lanes that share it) against 1 and 2 on Llama-3-8B, 4 rows: 5.02 ms a step against 5.97 and
 * 5.15; 8 rows: 5.29 against 6.05 and 5.29 (bench/RESULTS.md). */
#define MMA_PIECES 4

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* Slot `slot` (0 .. TILE - 1) of this block's TILE weight rows: its unit (output feature, or the
 * SwiGLU / RoPE unit whose two rows are slots u and u + TILE / 2), *ok false past the last unit,
 * and its weight row. */
template <int HOW, int TILE> __device__ __forceinline__ int mma_unit(const gemv_params &p, int slot, bool *ok) {
  constexpr bool pairs = rows_per_unit<HOW>() == 2;
  const int o = pairs ? blockIdx.x * (TILE / 2) + slot % (TILE / 2) : blockIdx.x * TILE + slot;
  *ok = o < p.out;
  return o;
}
template <int HOW, int TILE> __device__ __forceinline__ int mma_row(const gemv_params &p, int slot) {
  bool ok;
  const int o = mma_unit<HOW, TILE>(p, slot, &ok);
  return weight_row<HOW>(p, ok ? o : 0, slot / (TILE / 2) * (rows_per_unit<HOW>() - 1));
}

/* One m16 tile a warp; lane (g, t) loads weight rows g and g + 8, P consecutive 16-byte pieces of
 * each a turn (turn s covers pieces 4 P s .. 4 P s + 4 P - 1, lane t pieces 4 P s + P t ..), so its
 * four lanes read 64 P contiguous bytes of a row. Two tiles a warp (half the blocks, each staging its
 * input once for twice the rows) measured 10-15% slower on Llama-3-8B, as did 3 blocks a
 * multiprocessor instead of 2 (with one piece a turn; bench/RESULTS.md). */
template <int N, int XK, int HOW, typename Y>
__global__ void __launch_bounds__(THREADS, 2) gemv_mma_kernel(gemv_params p) {
  constexpr int TILE = MMA_TILE, P = MMA_PIECES, U = MMA_LOADS / P; /* turns a batch */
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float red[WARPS][TILE][8];
  constexpr bool staged = XK != CN_GEMV_X_BF16;
  const int in = p.in, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int n8 = in / 8; /* 16-byte pieces a row */
  bool ok[2];
  const uint4 *wr[2];
#pragma unroll
  for (int j = 0; j < 2; j++) {
    mma_unit<HOW, TILE>(p, g + 8 * j, &ok[j]);
    wr[j] = (const uint4 *)(p.w + (size_t)mma_row<HOW, TILE>(p, g + 8 * j) * in) + P * t;
  }
  const uint4 zero = make_uint4(0, 0, 0, 0);
  auto turn_at = [&](int batch, int u) { return 4 * P * (warp + WARPS * (batch * U + u)); };
  auto load = [&](uint4(&d)[2][MMA_LOADS], int batch) {
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int k = turn_at(batch, u);
#pragma unroll
      for (int q = 0; q < P; q++) {
        const bool v = k + P * t + q < n8;
#pragma unroll
        for (int j = 0; j < 2; j++)
          d[j][u * P + q] = v && ok[j] ? __ldcs(wr[j] + k + q) : zero;
      }
    }
  };
  /* As above: the first batch of weights before the wait. */
  uint4 cur[2][MMA_LOADS];
  load(cur, 0);
  cn_pdl_enter();
  const cn_bf16_t *x = (const cn_bf16_t *)p.x;
  if constexpr (staged) {
    stage<N, XK>((cn_bf16_t *)smem, p);
    x = (const cn_bf16_t *)smem;
  }
  const bool has_x = g < N;
  const uint4 *xr = (const uint4 *)(x + (size_t)(has_x ? g : 0) * in) + P * t;
  float acc[2][4] = {};
  const int batches = (n8 + 4 * P * WARPS * U - 1) / (4 * P * WARPS * U);
  for (int batch = 0; batch < batches; batch++) {
    uint4 nxt[2][MMA_LOADS];
    if (batch + 1 < batches) load(nxt, batch + 1);
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int k = turn_at(batch, u);
      if (k >= n8) break; /* the same for the whole warp: mma.sync needs every lane */
#pragma unroll
      for (int q = 0; q < P; q++) {
        uint4 xv = zero;
        if (has_x && k + P * t + q < n8) xv = staged ? xr[k + q] : __ldg(xr + k + q);
        const uint4 &lo = cur[0][u * P + q], &hi = cur[1][u * P + q];
        mma_bf16_16816(acc[0], lo.x, hi.x, lo.y, hi.y, xv.x, xv.y);
        mma_bf16_16816(acc[1], lo.z, hi.z, lo.w, hi.w, xv.z, xv.w);
      }
    }
    if (batch + 1 < batches)
#pragma unroll
      for (int i = 0; i < MMA_LOADS; i++)
        cur[0][i] = nxt[0][i], cur[1][i] = nxt[1][i];
  }
  /* C fragment: slots g and g + 8, columns (input rows) 2 t, 2 t + 1. */
  red[warp][g][2 * t] = acc[0][0] + acc[1][0];
  red[warp][g][2 * t + 1] = acc[0][1] + acc[1][1];
  red[warp][g + 8][2 * t] = acc[0][2] + acc[1][2];
  red[warp][g + 8][2 * t + 1] = acc[0][3] + acc[1][3];
  __syncthreads();
  constexpr int SLOTS = TILE / rows_per_unit<HOW>(); /* units a block */
  for (int e = threadIdx.x; e < SLOTS * 8; e += THREADS) {
    const int slot = e / 8, r = e % 8;
    bool valid;
    const int o = mma_unit<HOW, TILE>(p, slot, &valid);
    if (!valid || r >= N) continue;
    float v[2];
#pragma unroll
    for (int i = 0; i < rows_per_unit<HOW>(); i++) {
      const int sl = slot + i * (TILE / 2);
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < WARPS; w++)
        sum += red[w][sl][r];
      if (p.bias) sum += cn_ld(p.bias + mma_row<HOW, TILE>(p, sl));
      v[i] = sum;
    }
    put_out<HOW, Y>(p, r, o, v[0], v[rows_per_unit<HOW>() - 1]);
  }
}

template <int N, int XK, int HOW, typename Y>
static int go_mma(cn_cuda_ctx *ctx, const gemv_params &p, size_t smem) {
  constexpr int per_block = MMA_TILE / rows_per_unit<HOW>();
  unsigned grid = (unsigned)((p.out + per_block - 1) / per_block);
  auto kernel = gemv_mma_kernel<N, XK, HOW, Y>;
  /* The staged rows (up to CN_GEMV_STAGE_BYTES) and the reduction tile pass the 48 KB a block gets
   * without asking. */
  if (smem > CN_GEMV_STAGE_BYTES - sizeof(float) * WARPS * MMA_TILE * 8)
    CN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  CN_CUDA_CHECK(cn_launch(ctx, kernel, grid, THREADS, smem, p));
  return CANOPY_OK;
}

bool cn_gemv_fits(int n, int in, cn_gemv_x kind) {
  if (n < 1 || n > CN_GEMV_MAX_ROWS || in < 1) return false;
  return kind == CN_GEMV_X_BF16 || (size_t)n * in * sizeof(cn_bf16_t) <= CN_GEMV_STAGE_BYTES;
}

template <int N, int XK, int HOW, typename Y>
static int go(cn_cuda_ctx *ctx, const gemv_params &p, unsigned grid, size_t smem) {
  if (p.vec && N >= ctx->gemv_mma_rows) return go_mma<N, XK, HOW, Y>(ctx, p, smem);
  CN_CUDA_CHECK(cn_launch(ctx, gemv_kernel<N, XK, HOW, Y>, grid, THREADS, smem, p));
  return CANOPY_OK;
}

template <int XK, int HOW, typename Y>
static int by_rows(cn_cuda_ctx *ctx, const gemv_params &p, int n, unsigned grid, size_t smem) {
  switch (n) {
  case 1: return go<1, XK, HOW, Y>(ctx, p, grid, smem);
  case 2: return go<2, XK, HOW, Y>(ctx, p, grid, smem);
  case 3: return go<3, XK, HOW, Y>(ctx, p, grid, smem);
  case 4: return go<4, XK, HOW, Y>(ctx, p, grid, smem);
  case 5: return go<5, XK, HOW, Y>(ctx, p, grid, smem);
  case 6: return go<6, XK, HOW, Y>(ctx, p, grid, smem);
  case 7: return go<7, XK, HOW, Y>(ctx, p, grid, smem);
  case 8: return go<8, XK, HOW, Y>(ctx, p, grid, smem);
  }
  return cn_error(CANOPY_ERR_INVALID_ARG, "cn_gemv_run: %d rows (1..%d)", n, CN_GEMV_MAX_ROWS);
}

/* The output handling of each input kind: only the pairs the forward uses are instantiated. */
template <int XK>
static int by_out(cn_cuda_ctx *ctx, const cn_gemv *g, const gemv_params &p, unsigned grid, size_t smem) {
  bool f32 = g->y_dt == CN_CUDA_F32;
  switch (g->how) {
  case CN_GEMV_STORE:
    return f32 ? by_rows<XK, CN_GEMV_STORE, float>(ctx, p, g->n, grid, smem)
               : by_rows<XK, CN_GEMV_STORE, cn_bf16_t>(ctx, p, g->n, grid, smem);
  case CN_GEMV_ADD:
    if constexpr (XK != CN_GEMV_X_NORM)
      if (f32) return by_rows<XK, CN_GEMV_ADD, float>(ctx, p, g->n, grid, smem);
    break;
  case CN_GEMV_SWIGLU:
    if constexpr (XK != CN_GEMV_X_F32)
      if (!f32) return by_rows<XK, CN_GEMV_SWIGLU, cn_bf16_t>(ctx, p, g->n, grid, smem);
    break;
  case CN_GEMV_ROPE: /* up to CN_GEMV_ROPE_ROWS rows (cn_gemv_run checks); q in fp32 or bf16 */
    if constexpr (XK == CN_GEMV_X_NORM) {
      if (f32)
        return g->n == 1 ? go<1, XK, CN_GEMV_ROPE, float>(ctx, p, grid, smem)
                         : go<2, XK, CN_GEMV_ROPE, float>(ctx, p, grid, smem);
      return g->n == 1 ? go<1, XK, CN_GEMV_ROPE, cn_bf16_t>(ctx, p, grid, smem)
                       : go<2, XK, CN_GEMV_ROPE, cn_bf16_t>(ctx, p, grid, smem);
    }
    break;
  }
  return cn_error(CANOPY_ERR_INVALID_ARG, "cn_gemv_run: output %d to %s after input kind %d not provided", (int)g->how,
                  f32 ? "fp32" : "bf16", XK);
}

int cn_gemv_run(cn_cuda_ctx *ctx, const cn_gemv *g) {
  if (!cn_gemv_fits(g->n, g->in, g->x_kind) || g->out < 1 || !cn_dtype_ok(g->y_dt))
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_gemv_run: n=%d in=%d out=%d input kind %d", g->n, g->in, g->out,
                    (int)g->x_kind);
  if (g->x_kind == CN_GEMV_X_NORM && !g->norm_w)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_gemv_run: RMSNorm input without its weight");
  const cn_gemv_rope *r = &g->rope;
  if (g->how == CN_GEMV_ROPE && (g->n > CN_GEMV_ROPE_ROWS || r->head_dim <= 0 || r->head_dim % 2 || r->n_heads <= 0 ||
                                 r->n_kv_heads <= 0 || g->out != (r->n_heads + 2 * r->n_kv_heads) * r->head_dim ||
                                 !r->slots || !r->pos || !r->inv_freq || r->kv.block_size <= 0))
    return cn_error(CANOPY_ERR_INVALID_ARG,
                    "cn_gemv_run: RoPE epilogue with n=%d (at most %d) out=%d heads=%d/%d head_dim=%d (even, out = "
                    "(H + 2 H_kv) d), block_size=%d, and slots, positions and frequencies",
                    g->n, CN_GEMV_ROPE_ROWS, g->out, r->n_heads, r->n_kv_heads, r->head_dim, r->kv.block_size);
  const int units = g->how == CN_GEMV_ROPE ? g->out / 2 : g->out;
  gemv_params p = {g->y, g->x, g->norm_w, g->eps, g->w, g->bias, g->in, units, false, g->rope};
  /* Staged rows start at multiples of in in shared memory: 16-byte aligned when in % 8 == 0. */
  p.vec = g->in % 8 == 0 && (uintptr_t)g->w % 16 == 0 && (g->x_kind != CN_GEMV_X_BF16 || (uintptr_t)g->x % 16 == 0);
  unsigned grid = (unsigned)((units + WARPS - 1) / WARPS);
  size_t smem = g->x_kind == CN_GEMV_X_BF16 ? 0 : (size_t)g->n * g->in * sizeof(cn_bf16_t);
  switch (g->x_kind) {
  case CN_GEMV_X_BF16: return by_out<CN_GEMV_X_BF16>(ctx, g, p, grid, smem);
  case CN_GEMV_X_F32: return by_out<CN_GEMV_X_F32>(ctx, g, p, grid, smem);
  case CN_GEMV_X_NORM: return by_out<CN_GEMV_X_NORM>(ctx, g, p, grid, smem);
  }
  return cn_error(CANOPY_ERR_INVALID_ARG, "cn_gemv_run: input kind %d", (int)g->x_kind);
}
