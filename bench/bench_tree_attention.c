/* Benchmark 6a (issue 5): the shared-prefix tree-attention kernel against the naive per-row kernel
 * and the physical limit, Llama-3-8B heads (32 q, 8 kv, d 128), bf16 queries, outputs and paged
 * K/V (16-token blocks), n in {1, 16, 64, 128} tree nodes (random trees: each node's parent a
 * random earlier node), prefix L in {1k, 4k, 16k, 32k}, batch 1 and 8.
 *
 * The limit is the prefix K/V bytes over the copy bandwidth measured in the same run (a
 * device-to-device copy of 1 GiB, read plus written bytes over the median time). Every launch
 * reads a different set of K/V blocks (sets rotate until 256 MiB, five times the 50 MB L2, lie
 * between two uses of one set). Times are device-event medians over groups of back-to-back
 * launches. The compute floor is the shape's matrix FLOPs (QK^T and PV: 4 rows L head_dim per KV
 * head) over the dense bf16 rate of a cuBLAS GEMM measured in the same run. Both tree kernels
 * (mma.sync; wgmma on sm_90) run side by side, and each one's output is checked against the naive
 * kernel's on every shape; wg128 and wg64 are the wgmma kernel with 128-row and 64-row tiles (the
 * same below 128 rows a KV head), auto what AUTO runs. A split sweep at batch 1 (n = 64, 128) follows.
 *
 *   bench_tree_attention [--quick]     (--quick: batch 1, L 4k only, no sweep)
 *   bench_tree_attention --shape B,N,L[,SPLITS[,TILE]]
 *       one shape only: the automatic kernel (or the wgmma kernel with TILE-row tiles) at the
 *       engine's split count (or SPLITS), three untimed launches then the timing, for profilers */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_util.h"

#ifdef CANOPY_HAVE_CUDA
#include "canopy.h"
#include "bench/bench_cuda.h"
#include "kernels/cuda/cuda_ops.h"

#define HQ 32
#define HKV 8
#define HD 128
#define BS 16
#define KV_DIM (HKV * HD)
#define BLOCK_ELEMS (2 * BS * KV_DIM) /* K and V of one block */
#define POOL_BYTES (2560ull << 20)
#define ROTATE_BYTES (256ull << 20)

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t next_rand(void) {
  uint64_t z = (rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static cn_cuda_ctx *ctx;
static cn_cuda_timer *timer;

static void *dmalloc(size_t bytes) {
  void *p;
  CK(cn_cuda_malloc(ctx, &p, bytes));
  return p;
}

static void *dupload(const void *h, size_t bytes) {
  void *d = dmalloc(bytes);
  CK(cn_cuda_memcpy_h2d(ctx, d, h, bytes));
  return d;
}

/* Random bf16 in [-1, 1) over a device buffer, uploaded in 64 MiB pieces. */
static void fill_random_bf16(uint16_t *d, size_t elems) {
  size_t piece = 32u << 20;
  uint16_t *h = malloc(sizeof(uint16_t) * piece);
  for (size_t i = 0; i < piece; i++) {
    float f = (float)((int64_t)(next_rand() >> 40) - (1 << 23)) / (float)(1 << 23);
    uint32_t u;
    memcpy(&u, &f, 4);
    h[i] = (uint16_t)(u >> 16);
  }
  for (size_t at = 0; at < elems; at += piece) {
    size_t n = elems - at < piece ? elems - at : piece;
    h[next_rand() % piece] ^= 0x1; /* pieces differ a little */
    CK(cn_cuda_memcpy_h2d(ctx, d + at, h, sizeof(uint16_t) * n));
  }
  free(h);
}

/* Median time of `per` back-to-back calls of f, in microseconds, after one warm-up call. */
static double time_us(void (*f)(void *, int), void *arg, int per) {
  return bench_cuda_time_us(ctx, timer, f, arg, 1, per);
}

/* One benchmarked shape: n_sets copies of the batch's block tables over disjoint K/V blocks. */
typedef struct shape_job {
  cn_cuda_tree_attn_args a;
  int32_t **tables;      /* [n_sets] device block tables */
  int n_sets;
  /* the naive kernel, one launch per sequence */
  int batch, n, L;
  int32_t *d_pos;        /* [batch][n] */
  uint64_t *d_mask;      /* [batch][n] one word each (n <= 64) or more */
  void *d_desc;          /* [batch] cn_cuda_tree_seq */
  int words;
  void *naive_out;
} shape_job;

static void run_tree(void *arg, int i) {
  shape_job *j = arg;
  j->a.block_tables = j->tables[i % j->n_sets];
  CK(cn_cuda_tree_attention(ctx, &j->a));
}

static void run_naive(void *arg, int i) {
  shape_job *j = arg;
  int blocks_per_seq = (j->L + j->n + BS - 1) / BS;
  for (int s = 0; s < j->batch; s++) {
    cn_cuda_attn_args a = {.out = (uint16_t *)j->naive_out + (size_t)s * j->n * HQ * HD,
                           .q = (const uint16_t *)j->a.q + (size_t)s * j->n * HQ * HD,
                           .dt = CN_CUDA_BF16,
                           .kv = {.k = (cn_bf16 *)j->a.k, .v = (cn_bf16 *)j->a.v,
                                  .block_table = j->tables[i % j->n_sets] + (size_t)s * blocks_per_seq,
                                  .block_stride = j->a.block_stride, .block_size = BS},
                           .n = j->n, .ctx_len = j->L, .pos = j->d_pos + (size_t)s * j->n,
                           .tree_mask = j->n > 1 ? j->d_mask + (size_t)s * j->n * j->words : NULL,
                           .mask_words = j->words, .n_heads = HQ, .n_kv_heads = HKV, .head_dim = HD,
                           .scale = j->a.scale};
    CK(cn_cuda_attention(ctx, &a));
  }
}

/* rel L2 of two bf16 device buffers of n elements. */
static double rel_diff(const void *x, const void *y, size_t n, float *scratch_dev) {
  float *hx = malloc(sizeof(float) * n), *hy = malloc(sizeof(float) * n);
  CK(cn_cuda_bf16_to_f32(ctx, scratch_dev, x, n));
  CK(cn_cuda_memcpy_d2h(ctx, hx, scratch_dev, sizeof(float) * n));
  CK(cn_cuda_bf16_to_f32(ctx, scratch_dev, y, n));
  CK(cn_cuda_memcpy_d2h(ctx, hy, scratch_dev, sizeof(float) * n));
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    num += ((double)hx[i] - hy[i]) * ((double)hx[i] - hy[i]);
    den += (double)hy[i] * hy[i];
  }
  free(hx), free(hy);
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Shared device buffers of the run. */
typedef struct bench_bufs {
  uint16_t *pool;
  size_t pool_blocks;
  float *ws, *scratch;
  size_t ws_bytes;
  void *q, *out, *out2, *naive_out;
} bench_bufs;

/* Builds one benchmarked shape: n_sets block-table sets over disjoint K/V blocks, random trees
 * (positions L + depth, ancestor masks), device descriptors, the automatic split count. */
static shape_job make_shape(const bench_bufs *bb, int batch, int n, int L) {
  int bps = (L + n + BS - 1) / BS, words = (n + 63) / 64;
  size_t set_blocks = (size_t)batch * bps, set_bytes = set_blocks * BLOCK_ELEMS * sizeof(uint16_t);
  int n_sets = (int)((ROTATE_BYTES + set_bytes - 1) / set_bytes);
  if (n_sets < 2) n_sets = 2;
  if ((size_t)n_sets * set_blocks > bb->pool_blocks) n_sets = (int)(bb->pool_blocks / set_blocks);

  shape_job j = {.n_sets = n_sets, .batch = batch, .n = n, .L = L, .words = words, .naive_out = bb->naive_out};
  j.tables = malloc(sizeof(int32_t *) * (size_t)n_sets);
  int32_t *ht = malloc(sizeof(int32_t) * set_blocks);
  for (int s = 0; s < n_sets; s++) {
    for (size_t b = 0; b < set_blocks; b++) ht[b] = (int32_t)((size_t)s * set_blocks + b);
    j.tables[s] = dupload(ht, sizeof(int32_t) * set_blocks);
  }
  int32_t *pos = malloc(sizeof(int32_t) * (size_t)batch * n);
  uint64_t *mask = calloc((size_t)batch * n * words, sizeof(uint64_t));
  cn_cuda_tree_seq *desc = malloc(sizeof *desc * (size_t)batch);
  for (int s = 0; s < batch; s++) {
    int32_t *p = pos + (size_t)s * n;
    uint64_t *m = mask + (size_t)s * n * words;
    for (int i = 0; i < n; i++) {
      int parent = i ? (int)(next_rand() % (uint64_t)i) : -1;
      p[i] = i ? p[parent] + 1 : L;
      if (i) memcpy(m + (size_t)i * words, m + (size_t)parent * words, sizeof(uint64_t) * words);
      m[(size_t)i * words + i / 64] |= 1ull << (i % 64);
    }
    desc[s] = (cn_cuda_tree_seq){.ctx_len = L, .q_offset = 0, .n = n, .row0 = s * n, .pos0 = s * n,
                                 .mask0 = n > 1 ? s * n * words : -1, .mask_words = words, .table0 = s * bps};
  }
  j.d_pos = dupload(pos, sizeof(int32_t) * (size_t)batch * n);
  j.d_mask = dupload(mask, sizeof(uint64_t) * (size_t)batch * n * words);
  j.d_desc = dupload(desc, sizeof *desc * (size_t)batch);
  int splits, split_keys; /* the engine's plan (model/backend_cuda.c) */
  cn_cuda_tree_attn_plan(ctx, batch, n, L + n, HQ, HKV, HD, 0, &splits, &split_keys);
  j.a = (cn_cuda_tree_attn_args){.out = bb->out, .q = bb->q, .dt = CN_CUDA_BF16, .k = bb->pool,
                                 .v = bb->pool + BS * KV_DIM, .block_stride = BLOCK_ELEMS, .block_size = BS,
                                 .pos = j.d_pos, .tree_mask = j.d_mask, .seqs = j.d_desc, .n_seqs = batch, .max_n = n,
                                 .max_keys = L + n, .n_splits = splits, .split_keys = split_keys, .n_heads = HQ, .n_kv_heads = HKV, .head_dim = HD,
                                 .scale = 1.0f / sqrtf((float)HD), .workspace = bb->ws,
                                 .prefix_ready = 1 /* the K/V pool is filled once, before any launch */};
  free(ht), free(pos), free(mask), free(desc);
  return j;
}

static void free_shape(shape_job *j) {
  for (int s = 0; s < j->n_sets; s++) cn_cuda_free(ctx, j->tables[s]);
  cn_cuda_free(ctx, j->d_pos), cn_cuda_free(ctx, j->d_mask), cn_cuda_free(ctx, j->d_desc);
  free(j->tables);
}

static int fits(const bench_bufs *bb, const shape_job *j) {
  return cn_cuda_tree_attn_workspace(j->batch, j->n, j->a.n_splits, HQ, HKV, HD) <= bb->ws_bytes;
}

/* Times one kernel on a shape (NAN where the kernel cannot run here); row_tile as in the args. */
static double time_impl(shape_job *j, cn_cuda_tree_attn_impl impl, int row_tile) {
  j->a.impl = impl;
  j->a.row_tile = row_tile;
  j->a.block_tables = j->tables[0];
  if (cn_cuda_tree_attention(ctx, &j->a) == CANOPY_ERR_UNSUPPORTED) return NAN;
  CK(cn_cuda_sync(ctx));
  double t = time_us(run_tree, j, 10);
  j->a.row_tile = 0;
  return t;
}

/* rel L2 of one kernel's output against the naive kernel's (already in naive_out), same set. */
static double check_impl(const bench_bufs *bb, shape_job *j, cn_cuda_tree_attn_impl impl, int row_tile) {
  j->a.impl = impl;
  j->a.row_tile = row_tile;
  CK(cn_cuda_memset(ctx, bb->out, 0xFF, sizeof(uint16_t) * (size_t)j->batch * j->n * HQ * HD)); /* NaN: unwritten fails */
  run_tree(j, 0);
  CK(cn_cuda_sync(ctx));
  j->a.row_tile = 0;
  return rel_diff(bb->out, bb->naive_out, (size_t)j->batch * j->n * HQ * HD, bb->scratch);
}

/* Bytes of the prefix K/V a batch of `batch` sequences of L keys reads (bf16 K and V). */
static double prefix_kv_bytes(int batch, int L) { return (double)batch * L * KV_DIM * 2 * sizeof(uint16_t); }

/* --shape: one shape, few launches, so that a profiler sees only this kernel. */
static int run_one_shape(const bench_bufs *bb, const char *spec) {
  int batch = 0, n = 0, L = 0, splits = 0, tile = 0;
  if (sscanf(spec, "%d,%d,%d,%d,%d", &batch, &n, &L, &splits, &tile) < 3 || batch < 1 || batch > 8 || n < 1 ||
      n > 128 || L < 1 || splits < 0 || (tile && tile != 64 && tile != 128)) {
    fprintf(stderr, "bench_tree_attention: --shape B,N,L[,SPLITS[,TILE]]: bad '%s' (B 1..8, N 1..128, TILE 64 or 128)\n",
            spec);
    return 1;
  }
  shape_job j = make_shape(bb, batch, n, L);
  if (splits) j.a.n_splits = splits, j.a.split_keys = 0;
  if (!fits(bb, &j)) {
    fprintf(stderr, "bench_tree_attention: workspace too small for %d splits\n", j.a.n_splits);
    return 1;
  }
  j.a.impl = tile ? CN_CUDA_TA_WGMMA : CN_CUDA_TA_AUTO, j.a.row_tile = tile;
  for (int i = 0; i < 3; i++) run_tree(&j, i);
  CK(cn_cuda_sync(ctx));
  double t = bench_cuda_time_us(ctx, timer, run_tree, &j, 1, 10);
  printf("batch %d n %d L %d splits %d tile %d: %.1f us (K/V %.1f MB)\n", batch, n, L, j.a.n_splits, tile, t,
         prefix_kv_bytes(batch, L) / 1e6);
  free_shape(&j);
  return 0;
}

int main(int argc, char **argv) {
  int quick = argc > 1 && !strcmp(argv[1], "--quick");
  const char *shape = argc > 2 && !strcmp(argv[1], "--shape") ? argv[2] : NULL;
  if (cn_cuda_device_count() == 0) {
    printf("bench_tree_attention: no CUDA device visible\n");
    return 0;
  }
  CK(cn_cuda_ctx_create(0, &ctx));
  CK(cn_cuda_timer_create(ctx, &timer));

  /* The ceilings: a large device-to-device copy (read + written bytes over time), and a GEMM. */
  double copy_gbs, tflops;
  if (bench_cuda_ceilings(ctx, timer, "bench_tree_attention", &copy_gbs, &tflops)) return 1;

  bench_bufs bb = {.pool_blocks = POOL_BYTES / (sizeof(uint16_t) * BLOCK_ELEMS), .ws_bytes = 256u << 20};
  bb.pool = dmalloc(bb.pool_blocks * BLOCK_ELEMS * sizeof(uint16_t));
  fill_random_bf16(bb.pool, bb.pool_blocks * BLOCK_ELEMS);
  bb.ws = dmalloc(bb.ws_bytes);
  size_t max_rows = 8 * 128, qe = max_rows * HQ * HD;
  bb.q = dmalloc(sizeof(uint16_t) * qe), bb.out = dmalloc(sizeof(uint16_t) * qe);
  bb.out2 = dmalloc(sizeof(uint16_t) * qe), bb.naive_out = dmalloc(sizeof(uint16_t) * qe);
  bb.scratch = dmalloc(sizeof(float) * qe);
  fill_random_bf16(bb.q, qe);
  if (shape) return run_one_shape(&bb, shape);

  printf("\nLlama-3-8B heads (32 q / 8 kv, d 128), bf16, paged K/V (block 16). bw floor = prefix K/V bytes / copy\n"
         "bandwidth; mma floor = 4 n (32/8) L 128 8 batch FLOPs / the GEMM rate; %% = floor / auto time\n");
  printf("%5s %4s %6s %6s | %9s %9s %9s %9s %7s | %8s %8s %7s %7s | %10s %8s | %8s %8s\n", "batch", "n", "L", "splits",
         "sync us", "wg128 us", "wg64 us", "auto us", "syn/auto", "bw fl us", "mma fl", "% bw", "% floor", "naive us", "x naive",
         "diff s", "diff wg");
  static const int batches[] = {1, 8}, ns[] = {1, 16, 64, 128}, Ls[] = {1024, 4096, 16384, 32768};
  for (int bi = 0; bi < 2; bi++)
    for (int ni = 0; ni < 4; ni++)
      for (int li = 0; li < 4; li++) {
        int batch = batches[bi], n = ns[ni], L = Ls[li];
        if (quick && (batch != 1 || L != 4096)) continue;
        shape_job j = make_shape(&bb, batch, n, L);
        if (!fits(&bb, &j)) {
          fprintf(stderr, "workspace too small\n");
          return 1;
        }
        /* wgmma with 128-row tiles (64 below 128 rows a KV head) and with 64-row tiles where that
         * differs (n >= 32 here), at the automatic split count. */
        double t_sync = time_impl(&j, CN_CUDA_TA_MMA_SYNC, 0), t_wg = time_impl(&j, CN_CUDA_TA_WGMMA, 128);
        int wide = n * HQ / HKV >= 128;
        double t_wg64 = wide ? time_impl(&j, CN_CUDA_TA_WGMMA, 64) : NAN;
        /* The naive kernel is slow at large n: fewer launches per group. */
        double t_naive = time_us(run_naive, &j, n * (double)L * batch > 4e6 ? 1 : 4);
        /* All on the same set, then compare. */
        run_naive(&j, 0);
        double diff_s = check_impl(&bb, &j, CN_CUDA_TA_MMA_SYNC, 0), diff_w = NAN;
        if (t_wg == t_wg) { /* the worst of the wgmma kernels */
          diff_w = check_impl(&bb, &j, CN_CUDA_TA_WGMMA, 128);
          double d64 = check_impl(&bb, &j, CN_CUDA_TA_WGMMA, 64);
          diff_w = d64 > diff_w ? d64 : diff_w;
        }
        /* What AUTO runs here (the AUTO count picked the tile too). */
        double t_auto = time_impl(&j, CN_CUDA_TA_AUTO, 0);
        double bw_us = prefix_kv_bytes(batch, L) / (copy_gbs * 1e9) * 1e6;
        double mma_us = 4.0 * n * (HQ / HKV) * (double)L * HD * HKV * batch / (tflops * 1e12) * 1e6;
        double floor_us = bw_us > mma_us ? bw_us : mma_us;
        printf("%5d %4d %6d %6d | %9.1f %9.1f %9.1f %9.1f %6.2fx | %8.1f %8.1f %6.1f%% %6.1f%% | %10.1f %7.1fx | %8.2e %8.2e\n",
               batch, n, L, j.a.n_splits, t_sync, t_wg, t_wg64, t_auto, t_sync / t_auto, bw_us, mma_us, 100.0 * bw_us / t_auto,
               100.0 * floor_us / t_auto, t_naive, t_naive / t_auto, diff_s, diff_w);
        fflush(stdout);
        free_shape(&j);
      }

  /* The split count at batch 1 for trees of 64 and 128 nodes, wgmma with 128-row and with 64-row
   * tiles; the automatic count marked *. */
  printf("\nbatch 1, wgmma, split sweep (us)\n%4s %6s %4s |", "n", "L", "tile");
  static const int sweep[] = {2, 4, 6, 8, 12, 16, 24, 33, 48};
  for (int k = 0; k < 9; k++) printf(" %7d", sweep[k]);
  printf("\n");
  for (int ni = 2; ni < 4 && !quick; ni++)
    for (int li = 1; li < 4; li++)
      for (int v = 0; v < 2; v++) { /* 128-row tiles, 64-row tiles */
        static const char *names[2] = {"128", "64"};
        shape_job j = make_shape(&bb, 1, ns[ni], Ls[li]);
        int auto_splits = j.a.n_splits;
        j.a.split_keys = 0; /* the swept counts divide the keys evenly */
        printf("%4d %6d %4s |", ns[ni], Ls[li], names[v]);
        for (int k = 0; k < 9; k++) {
          j.a.n_splits = sweep[k];
          if (!fits(&bb, &j)) {
            printf(" %7s", "-");
            continue;
          }
          printf(" %6.1f%s", time_impl(&j, CN_CUDA_TA_WGMMA, v ? 64 : 128), sweep[k] == auto_splits ? "*" : " ");
        }
        printf("  (auto %d)\n", auto_splits);
        fflush(stdout);
        free_shape(&j);
      }
  cn_cuda_timer_free(timer);
  cn_cuda_ctx_free(ctx);
  return 0;
}

#else

int main(void) {
  printf("bench_tree_attention: canopy was built without CUDA\n");
  return 0;
}

#endif
