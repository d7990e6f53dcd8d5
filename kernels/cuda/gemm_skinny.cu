/* 9-64 row GEMM (gemm_skinny.cuh), sm_90a: a block takes a 128-row tile of W against all input
 * rows (a 64- or, up to 32 rows, 32-row tile), k in 64-wide chunks through a 4-stage cp.async
 * pipeline into 128-byte-swizzled shared tiles, products by wgmma m64nNk16 straight from shared
 * memory (two warpgroups, 64 weight rows each). W is read once; the input rows (at most 64 x in
 * bf16) come from L2 once per tile, half a tile's weight bytes. The first stages' weights are
 * requested before the wait for the kernel ahead (programmatic dependent launch, as gemv.cu): no
 * kernel of a forward writes weights. (An mma.sync form with ldmatrix ran at 120-170 TFLOP/s and
 * lost to cuBLAS on every projection but the LM head: bench/RESULTS.md, 2026-12-06.)
 *
 * Outputs of fewer tiles than two a multiprocessor split k across blocks (up to 8, each split at
 * least 8 chunks), so that enough loads are in flight to reach the bandwidth. The splits of a tile
 * run as one thread-block cluster and add their fp32 tiles through distributed shared memory, in
 * split order, each block a slice of the cells: no partial sums go through global memory (they
 * did in a first form, which wrote and read as many bytes as half the weights at 64 rows and
 * left each tile's sum to one block: bench/RESULTS.md, 2026-12-06). */
#include <stdint.h>

#include <cooperative_groups.h>

#include "kernels/cuda/cp_async.cuh"
#include "kernels/cuda/gemm_skinny.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace cg = cooperative_groups;

#define SK_BM 128 /* weight rows a block */
#define SK_BN CN_SKINNY_MAX_ROWS
#define SK_BK 64 /* k a chunk: one 128-byte row of 8 16-byte pieces a tile row */
#ifndef SK_STAGES
#define SK_STAGES 4
#endif
#define SK_THREADS 256
#define SK_LD (SK_BM + 4) /* the fp32 output tile's row stride: conflict-free fragment stores */
#define SK_MIN_CHUNKS 8   /* fewest k chunks a split */
#define SK_MAX_SPLITS 8   /* a cluster's blocks (the portable limit) */
#define SK_BLOCKS_PER_SM (SK_STAGES <= 4 ? 2 : 1)
#define SK_STAGE_BYTES ((SK_BM + SK_BN) * SK_BK * 2)
#define SK_SMEM ((size_t)SK_STAGES * SK_STAGE_BYTES + 1024) /* + the alignment to the swizzle period */
static_assert((size_t)SK_BN * SK_LD * sizeof(float) <= SK_STAGES * SK_STAGE_BYTES,
              "the output tile reuses the pipeline's memory");

struct skinny_params {
  void *y;
  const cn_bf16_t *x, *w, *bias;
  int n, in, out; /* out: output units (SwiGLU: gate rows) */
  int chunks, splits;
};

/* Tile slot s (0..127) -> weight row; *ok false past the output. SwiGLU tiles hold 64 units: gate
 * rows in slots 0-63, their up rows (out further on) in 64-127. */
template <int HOW> __device__ __forceinline__ int slot_row(const skinny_params &p, int tile, int s, bool *ok) {
  if constexpr (HOW == CN_GEMV_SWIGLU) {
    const int u = tile * (SK_BM / 2) + (s & (SK_BM / 2 - 1));
    *ok = u < p.out;
    return s < SK_BM / 2 ? u : u + p.out;
  }
  const int o = tile * SK_BM + s;
  *ok = o < p.out;
  return o;
}

#if CN_HAVE_WGMMA
/* d (+)= A B for the N input rows of the tile: m64nNk16. */
template <int N> __device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], uint64_t da, uint64_t db) {
  if constexpr (N == 64)
    wgmma_ss_n64(d, da, db, 1);
  else
    wgmma_ss_n32(d, da, db, 1);
}

template <int HOW, typename Y, int N> __global__ void __launch_bounds__(SK_THREADS) skinny_kernel(skinny_params p) {
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw), base = (raw + 1023) & ~1023u;
  unsigned char *smem = smem_raw + (base - raw);
  const int tid = threadIdx.x, tile = blockIdx.x, split = blockIdx.y;
  const int kc0 = (int)((long long)split * p.chunks / p.splits);
  const int nk = (int)((long long)(split + 1) * p.chunks / p.splits) - kc0;
  /* Each thread copies piece `pc` of tile rows pr + 32 i: 4 of W, N / 32 of x a chunk. */
  const int pc = tid & 7, pr = tid >> 3;
  const cn_bf16_t *wsrc[4], *xsrc[N / 32];
  bool wok[4], xok[N / 32];
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int row = slot_row<HOW>(p, tile, pr + 32 * i, &wok[i]);
    wsrc[i] = p.w + (size_t)(wok[i] ? row : 0) * p.in + 8 * pc;
  }
#pragma unroll
  for (int i = 0; i < N / 32; i++) {
    xok[i] = pr + 32 * i < p.n;
    xsrc[i] = p.x + (size_t)(xok[i] ? pr + 32 * i : 0) * p.in + 8 * pc;
  }
  auto stage = [&](int s) { return base + (uint32_t)s * SK_STAGE_BYTES; };
  auto load_w = [&](int s, int kc) {
    const int k = kc * SK_BK;
    const bool kin = k + 8 * pc < p.in; /* in % 8 == 0: a piece is wholly inside or past the row */
#pragma unroll
    for (int i = 0; i < 4; i++)
      cp_async16(stage(s) + sw128_at<SK_BM>(pr + 32 * i, pc), wsrc[i] + (kin ? k : 0), wok[i] && kin ? 16 : 0);
  };
  auto load_x = [&](int s, int kc) {
    const int k = kc * SK_BK;
    const bool kin = k + 8 * pc < p.in;
#pragma unroll
    for (int i = 0; i < N / 32; i++)
      cp_async16(stage(s) + SK_BM * 128 + sw128_at<N>(pr + 32 * i, pc), xsrc[i] + (kin ? k : 0),
                 xok[i] && kin ? 16 : 0);
  };
  /* Weights of the first stages, then the wait, then their input rows: a commit group each, so
   * that waiting for all but the newest STAGES - 2 groups always completes the stage about to be
   * read (here and in the loop below). */
#pragma unroll
  for (int s = 0; s < SK_STAGES - 1; s++) {
    if (s < nk) load_w(s, kc0 + s);
    cp_async_commit();
  }
  cn_pdl_enter();
#pragma unroll
  for (int s = 0; s < SK_STAGES - 1; s++) {
    if (s < nk) load_x(s, kc0 + s);
    cp_async_commit();
  }
  const int wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const uint64_t a_desc = sw128_desc(stage(0) + wg * 64 * 128, 16, 1024);
  const uint64_t b_desc = sw128_desc(stage(0) + SK_BM * 128, 16, 1024);
  float d[N / 8][4] = {};
  for (int it = 0; it < nk; it++) {
    cp_async_wait<SK_STAGES - 2>();
    fence_proxy_async(); /* this thread's copies, seen by the tensor cores */
    __syncthreads();     /* every thread's; and the stage refilled below is no longer read */
    const int next = it + SK_STAGES - 1;
    if (next < nk) {
      load_w(next % SK_STAGES, kc0 + next);
      load_x(next % SK_STAGES, kc0 + next);
    }
    cp_async_commit();
    const uint32_t at = (uint32_t)(it % SK_STAGES) * SK_STAGE_BYTES;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < SK_BK / 16; kk++)
      wgmma_ss<N>(d, desc_add(a_desc, at + kk * 32), desc_add(b_desc, at + kk * 32));
    wgmma_commit();
    wgmma_wait<0>(); /* before the next iteration refills a stage */
  }
  pin(d);
  cp_async_wait<0>();
  __syncthreads();
  /* The tile as [input row][slot] fp32 over the pipeline's memory: warp w of warpgroup wg holds
   * slots wg 64 + 16 w + g (+ 8), input rows 8 j + 2 t (+ 1), as m16n8 fragments. */
  float *tc = (float *)smem;
  const int g = lane >> 2, t = lane & 3, m = wg * 64 + warp * 16 + g;
#pragma unroll
  for (int j = 0; j < N / 8; j++) {
    const int r = 8 * j + 2 * t;
    tc[r * SK_LD + m] = d[j][0];
    tc[(r + 1) * SK_LD + m] = d[j][1];
    tc[r * SK_LD + m + 8] = d[j][2];
    tc[(r + 1) * SK_LD + m + 8] = d[j][3];
  }
  __syncthreads();
  /* Unit u of input row r from its sums (a, and for SwiGLU b, the up row's). */
  constexpr int UNITS = HOW == CN_GEMV_SWIGLU ? SK_BM / 2 : SK_BM;
  auto put = [&](int r, int u, float a, float b) {
    const int o = tile * UNITS + u;
    if (o >= p.out) return;
    if (p.bias) a += cn_ld(p.bias + o);
    Y *y = (Y *)p.y + (size_t)r * p.out + o;
    if constexpr (HOW == CN_GEMV_SWIGLU) {
      if (p.bias) b += cn_ld(p.bias + o + p.out);
      cn_st(y, a / (1.0f + expf(-a)) * b); /* swiglu.cu's expression and rounding */
    } else if constexpr (HOW == CN_GEMV_ADD)
      cn_st(y, cn_ld(y) + a);
    else
      cn_st(y, a);
  };
  const int cells = p.n * UNITS;
  if (p.splits == 1) {
    for (int e = tid; e < cells; e += SK_THREADS)
      put(e / UNITS, e % UNITS, tc[e / UNITS * SK_LD + e % UNITS],
          HOW == CN_GEMV_SWIGLU ? tc[e / UNITS * SK_LD + e % UNITS + UNITS] : 0.0f);
    return;
  }
  /* The splits of a tile are one cluster: each block adds a slice of the cells over every
   * block's tile in its shared memory, in split order, and writes it. */
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync(); /* every split's tile is in place */
  const float *tiles[SK_MAX_SPLITS];
#pragma unroll
  for (int s = 0; s < SK_MAX_SPLITS; s++)
    tiles[s] = s < p.splits ? cluster.map_shared_rank(tc, s) : tc;
  const int e1 = (int)((long long)(split + 1) * cells / p.splits);
  for (int e = (int)((long long)split * cells / p.splits) + tid; e < e1; e += SK_THREADS) {
    const int at = e / UNITS * SK_LD + e % UNITS;
    float a = 0.0f, b = 0.0f;
#pragma unroll
    for (int s = 0; s < SK_MAX_SPLITS; s++)
      if (s < p.splits) {
        a += tiles[s][at];
        if constexpr (HOW == CN_GEMV_SWIGLU) b += tiles[s][at + UNITS];
      }
    put(e / UNITS, e % UNITS, a, b);
  }
  cluster.sync(); /* no block leaves while another reads its tile */
}
#else
template <int HOW, typename Y, int N> __global__ void skinny_kernel(skinny_params p) {}
#endif

/* 128-row tiles (64 units for SwiGLU) over the output, 64-wide chunks over k. */
static int tiles_of(const cn_gemv *g) {
  const int units = g->how == CN_GEMV_SWIGLU ? SK_BM / 2 : SK_BM;
  return (g->out + units - 1) / units;
}
static int chunks_of(const cn_gemv *g) { return (g->in + SK_BK - 1) / SK_BK; }

/* The most splits k may take: up to a cluster, at least SK_MIN_CHUNKS chunks each. */
static int max_splits(const cn_gemv *g) {
  const int s = chunks_of(g) / SK_MIN_CHUNKS;
  return s < 1 ? 1 : s > SK_MAX_SPLITS ? SK_MAX_SPLITS : s;
}

bool cn_skinny_fits(const cn_cuda_ctx *ctx, const cn_gemv *g) {
  /* A product with fewer blocks than multiprocessors streams its weights through too few of them:
   * SmolLM2-135M's (576-wide) ran 1.3x slower here than on cuBLAS (bench/RESULTS.md, 2026-12-06). */
  return (long long)tiles_of(g) * max_splits(g) >= ctx->n_sm && g->n > ctx->gemv_max_rows && g->n <= ctx->skinny_rows && g->n <= CN_SKINNY_MAX_ROWS && ctx->cc == 90 &&
         !ctx->batch_invariant && g->x_kind == CN_GEMV_X_BF16 && g->in % 8 == 0 && g->out > 0 &&
         (uintptr_t)g->w % 16 == 0 && (uintptr_t)g->x % 16 == 0 &&
         (g->how == CN_GEMV_STORE || (g->how == CN_GEMV_ADD && g->y_dt == CN_CUDA_F32) ||
          (g->how == CN_GEMV_SWIGLU && g->y_dt == CN_CUDA_BF16));
}

template <int HOW, typename Y> static int launch(cn_cuda_ctx *ctx, const skinny_params &p, dim3 grid) {
  auto kernel = p.n > 32 ? skinny_kernel<HOW, Y, 64> : skinny_kernel<HOW, Y, 32>;
  CN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)SK_SMEM));
  /* cn_launch's programmatic dependent launch, and a tile's splits as one cluster. */
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(SK_THREADS);
  cfg.dynamicSmemBytes = SK_SMEM;
  cfg.stream = ctx->stream;
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = ctx->pdl;
  attr[1].id = cudaLaunchAttributeClusterDimension;
  attr[1].val.clusterDim.x = 1;
  attr[1].val.clusterDim.y = grid.y;
  attr[1].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = grid.y > 1 ? 2 : 1;
  CN_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
  return CANOPY_OK;
}

/* Clusters of `size` blocks that can run at once (cached in ctx): a cluster's blocks must fit in
 * one GPC together, so fewer clusters of 8 fit than a multiprocessor's slots over 8 (30 against 33
 * on the H100: the two left over ran as a second wave). */
static int max_clusters(cn_cuda_ctx *ctx, int size) {
  int &n = ctx->skinny_clusters[size];
  if (n) return n;
  auto kernel = skinny_kernel<CN_GEMV_STORE, float, 64>; /* every form: the same block and shared memory */
  CN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)SK_SMEM));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(1, size);
  cfg.blockDim = dim3(SK_THREADS);
  cfg.dynamicSmemBytes = SK_SMEM;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = 1;
  attr.val.clusterDim.y = size;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  CN_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&n, kernel, &cfg));
  if (n < 1) n = 1;
  return n;
}

int cn_skinny_run(cn_cuda_ctx *ctx, const cn_gemv *g) {
  if (!cn_skinny_fits(ctx, g))
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_skinny_run: n=%d in=%d out=%d input kind %d output %d", g->n, g->in,
                    g->out, (int)g->x_kind, (int)g->how);
  const int tiles = tiles_of(g), chunks = chunks_of(g), slots = SK_BLOCKS_PER_SM * ctx->n_sm;
  /* As many splits as fit in one wave: a block more than the slots runs in a second wave, which
   * doubled the time (splits rounded up measured 1.4-2x slower on Llama-3-8B's q/k/v and down);
   * and clusters count as a whole. */
  int splits = tiles < slots ? slots / tiles : 1;
  if (splits > max_splits(g)) splits = max_splits(g);
  while (splits > 1 && tiles > max_clusters(ctx, splits)) splits--;
  skinny_params p = {g->y, (const cn_bf16_t *)g->x, g->w, g->bias, g->n, g->in, g->out, chunks, splits};
  const dim3 grid((unsigned)tiles, (unsigned)splits);
  const bool f32 = g->y_dt == CN_CUDA_F32;
  switch (g->how) {
  case CN_GEMV_STORE: return f32 ? launch<CN_GEMV_STORE, float>(ctx, p, grid) : launch<CN_GEMV_STORE, cn_bf16_t>(ctx, p, grid);
  case CN_GEMV_ADD: return launch<CN_GEMV_ADD, float>(ctx, p, grid);
  case CN_GEMV_SWIGLU: return launch<CN_GEMV_SWIGLU, cn_bf16_t>(ctx, p, grid);
  default: break;
  }
  return cn_error(CANOPY_ERR_INVALID_ARG, "cn_skinny_run: output %d", (int)g->how);
}
