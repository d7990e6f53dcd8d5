/* Shared-prefix tree attention (DESIGN.md, "Tree attention"): the twin of cn_cpu_attention for a
 * ragged batch of sequences in one launch.
 *
 * Block (row tile, split, sequence x KV head): 4 warps x 16 query rows = 64 of the n x G rows
 * that share a KV head (G = n_heads / n_kv_heads; row r is token r / G, head g G + r % G). The
 * block streams its split of the keys in tiles of 64 through shared memory (cp.async, two stages)
 * and every warp multiplies its 16 rows against each tile with mma.sync m16n8k16 (bf16 operands,
 * fp32 accumulators): S = Q K^T, an online softmax in fp32 (base-2, scale folded in), O += P V with
 * P rounded to bf16. So each key tile crosses the memory bus once per row tile instead of once per
 * query row, and the row tiles of one split run side by side, mostly sharing it through L2.
 *
 * The key range [0, ctx_len + q_offset + n) of a sequence is cut into n_splits chunks of whole
 * tiles (flash-decoding), so that even one decode token keeps every SM busy; each block leaves
 * its unnormalised (max, sum, accumulator) per row in the workspace, and merge_kernel combines
 * them exactly. With one split the block normalises and writes the output itself.
 *
 * Masks are applied only on tiles that reach the new slots (tree or causal), the end of the
 * range, or with a sliding window; prefix tiles are all visible. Keys past the range are zero
 * filled, so masked products stay finite. */
#include <type_traits>

#include "kernels/cuda/tree_attention.cuh"

#define TA_PAD 8    /* bf16 of padding per shared row: 16 bytes, so ldmatrix rows hit distinct banks */
#define TA_STAGES 3 /* key tiles in shared memory: two in flight while one is used */
#ifndef CN_TA_WIDE_KT
#define CN_TA_WIDE_KT 32 /* keys per tile of the two-row-block variant at head_dim 128 (a tuning knob) */
#endif

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

/* c += a b: a 16x16 (row), b 16x8 (col), bf16 in, fp32 accumulators. */
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* The variant: two row blocks per warp (128 rows a block, 32-key tiles) once a (sequence, KV head)
 * has 128 query rows or more, else one (64 rows, 64-key tiles). */
static inline bool wide_rows(int max_n, int group) { return max_n * group >= 128; }

/* Keys per shared-memory tile of a variant. */
template <int D, int RW> constexpr int kt_of() { return RW == 1 ? 64 : D == 128 ? CN_TA_WIDE_KT : 32; }

/* Rows of the workspace per (sequence, KV head): the grid's row tiles of `tile` rows. */
static inline int rows_cap(int max_n, int group, int tile) { return (max_n * group + tile - 1) / tile * tile; }
static inline int rows_cap(int max_n, int group) { return rows_cap(max_n, group, wide_rows(max_n, group) ? 128 : 64); }

/* ---- the main kernel ------------------------------------------------------------------------- */

/* RW row blocks of 16 per warp (a block holds 64 RW query rows) and KT keys per tile. RW = 2
 * halves the shared-memory traffic per MMA (each K or V fragment loaded by ldmatrix feeds two
 * row blocks): with one row block, ldmatrix alone takes as many shared-memory cycles as the MMAs
 * take tensor cycles, which bounds trees of 64+ nodes. KT = 32 there keeps the score registers
 * within budget. */
template <typename T, int D, int RW, int KT>
__global__ void __launch_bounds__(TA_THREADS, 2) tree_attn_kernel(cn_cuda_tree_attn_args a) {
  if (!a.prefix_ready) cn_pdl_wait(); /* launched early (cn_launch); else in ta_prologue */
  constexpr int LD = D + TA_PAD, KSTEPS = D / 16, DN = D / 8, NT = KT / 8, ROWS = 64 * RW;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  cn_bf16_t *ks = reinterpret_cast<cn_bf16_t *>(smem_raw); /* [TA_STAGES][KT][LD] */
  cn_bf16_t *vs = ks + TA_STAGES * KT * LD;                /* [TA_STAGES][KT][LD] */

  ta_block b;
  if (!ta_block_init<ROWS>(a, b)) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, qlane = lane % 4;
  /* Warp w holds row blocks w RW .. w RW + RW - 1 of 16 rows. */
  int base[RW];
#pragma unroll
  for (int rb = 0; rb < RW; rb++) base[rb] = b.row0 + (warp * RW + rb) * 16;
  const bool warp_active = base[0] < b.rows;
  const int n_tiles = b.k_end > b.k_begin ? (b.k_end - b.k_begin + KT - 1) / KT : 0;

  auto find = [&](int kt) { return ta_tile_find<D, KT>(a, b, kt); };
  auto copy = [&](const ta_tile_src<D, KT> &src, int st) {
    ta_tile_copy<D, KT>(a, b, src, smem_addr(ks + st * KT * LD), smem_addr(vs + st * KT * LD),
                        [](int key, int piece) { return (uint32_t)(sizeof(cn_bf16_t) * (key * LD + piece * 8)); });
  };

  const float sl2 = a.scale * TA_LOG2E;
  float o[RW][DN][4], m[RW][2], l[RW][2];
  ta_state_init(o, m, l);

  ta_prologue<TA_STAGES, KT>(a, b, n_tiles, find, copy);
  /* Q fragments (A operand, row-major 16 x 16 per k-step), rounded to bf16; after the prologue,
   * which waits for the kernel before (Q is its output). */
  uint32_t qa[RW][KSTEPS][4];
#pragma unroll
  for (int rb = 0; rb < RW; rb++) {
    const int r0 = base[rb] + lane / 4, r1 = r0 + 8;
    const T *q0 = (const T *)a.q + ((size_t)(b.sq.row0 + ta_tok(b, r0)) * a.n_heads + ta_head(b, r0)) * D;
    const T *q1 = (const T *)a.q + ((size_t)(b.sq.row0 + ta_tok(b, r1)) * a.n_heads + ta_head(b, r1)) * D;
    const bool valid0 = r0 < b.rows, valid1 = r1 < b.rows;
#pragma unroll
    for (int kk = 0; kk < KSTEPS; kk++) {
      int c = kk * 16 + qlane * 2;
      qa[rb][kk][0] = valid0 ? load_pair(q0 + c) : 0u;
      qa[rb][kk][1] = valid1 ? load_pair(q1 + c) : 0u;
      qa[rb][kk][2] = valid0 ? load_pair(q0 + c + 8) : 0u;
      qa[rb][kk][3] = valid1 ? load_pair(q1 + c + 8) : 0u;
    }
  }

  for (int it = 0; it < n_tiles; it++) {
    const int kt = b.k_begin + it * KT, ahead = it + TA_STAGES - 1;
    ta_tile_src<D, KT> next; /* its table lookups travel while this tile's copies land */
    if (ahead < n_tiles) next = find(b.k_begin + ahead * KT);
    cp_async_wait<TA_STAGES - 2>();
    __syncthreads(); /* also: every warp is past the iteration that last read stage `ahead` */
    if (ahead < n_tiles) copy(next, ahead % TA_STAGES);
    cp_async_commit();
    if (warp_active) {
      const int st = it % TA_STAGES;
      const cn_bf16_t *kst = ks + st * KT * LD, *vst = vs + st * KT * LD;
      float s[RW][NT][4];
#pragma unroll
      for (int nn = 0; nn < NT; nn++) {
#pragma unroll
        for (int rb = 0; rb < RW; rb++) s[rb][nn][0] = s[rb][nn][1] = s[rb][nn][2] = s[rb][nn][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; kk += 2) {
          uint32_t bf[4];
          ldmatrix_x4(bf, kst + (nn * 8 + (lane & 7)) * LD + kk * 16 + (lane >> 3) * 8);
#pragma unroll
          for (int rb = 0; rb < RW; rb++) {
            mma_bf16(s[rb][nn], qa[rb][kk], bf[0], bf[1]);
            mma_bf16(s[rb][nn], qa[rb][kk + 1], bf[2], bf[3]);
          }
        }
      }
      ta_mask<RW, NT>(a, b, base, kt, s);
      ta_softmax<RW, NT, DN>(s, m, l, o, sl2);
      /* O += P V: P's C fragments are the A fragments of the next MMA, 16 keys per k-step. */
      uint32_t pa[RW][KT / 16][4];
      ta_pack_p<RW, NT>(s, pa);
#pragma unroll
      for (int kk = 0; kk < KT / 16; kk++) {
#pragma unroll
        for (int dn = 0; dn < DN; dn += 2) {
          uint32_t bf[4];
          ldmatrix_x4_trans(bf, vst + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dn * 8 + (lane >> 4) * 8);
#pragma unroll
          for (int rb = 0; rb < RW; rb++) {
            mma_bf16(o[rb][dn], pa[rb][kk], bf[0], bf[1]);
            mma_bf16(o[rb][dn + 1], pa[rb][kk], bf[2], bf[3]);
          }
        }
      }
    }
    /* No barrier here: the next iteration's, before its copies, is the one that frees this stage. */
  }
  cp_async_wait<0>(); /* no copy may still be writing when the block exits */
  ta_finish<T, RW, DN>(a, b, base, gridDim.x * ROWS, o, m, l);
}

/* ---- the exact merge of the splits' partial states ------------------------------------------- */

/* A warp per row (MERGE_ROWS rows a block, grid y = sequence x KV head), D / 32 columns a lane.
 * The splits' maxima and weights are computed by all lanes at once and kept in shared memory, so
 * that the accumulator loads that follow are independent of each other and overlap: a serial
 * chain of dependent loads per split was the merge's cost at batch 1 with many splits. The
 * accumulators are loaded BATCH splits at a time, the first batch together with the maxima
 * (neither depends on the other): a decode's 22-33 splits cost one or two memory round trips
 * instead of one per four splits (batch 1, n = 1: 15.1 -> 12.7 us at 4k keys, bench/RESULTS.md
 * 2026-12-04, fourth session). BATCH is 4 for plans of up to 4 splits (many rows, few splits: the
 * registers a batch takes would cost blocks a multiprocessor), 16 up to 16, else 32. */
#define MERGE_ROWS 4
#define MERGE_MAX_SPLITS 256

__device__ __forceinline__ void merge_add(float (&x)[4], float w, float4 v) {
  x[0] += w * v.x, x[1] += w * v.y, x[2] += w * v.z, x[3] += w * v.w;
}
__device__ __forceinline__ void merge_add(float (&x)[2], float w, float2 v) { x[0] += w * v.x, x[1] += w * v.y; }

template <typename T, int D, int BATCH>
__global__ void __launch_bounds__(32 * MERGE_ROWS) merge_kernel(cn_cuda_tree_attn_args a, int cap) {
  constexpr int C = D / 32; /* columns per lane: 4 or 2 */
  using V = typename std::conditional<C == 4, float4, float2>::type;
  __shared__ float wsh[MERGE_ROWS][MERGE_MAX_SPLITS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = blockIdx.x * MERGE_ROWS + warp, g = blockIdx.y % a.n_kv_heads;
  const cn_cuda_tree_seq sq = a.seqs[blockIdx.y / a.n_kv_heads];
  const int G = a.n_heads / a.n_kv_heads;
  if (r >= sq.n * G) return;
  const int used = split_of(sq, a).n_used;
  const size_t base = ((size_t)blockIdx.y * cap + r) * a.n_splits;
  cn_pdl_enter(); /* launched early: the partial states are complete from here on */
  const V *acc =
      reinterpret_cast<const V *>(a.workspace + 2 * (size_t)gridDim.y * cap * a.n_splits + base * D + lane * C);
  V v[BATCH];
  auto load_batch = [&](int s0) { /* splits s0 .. s0 + BATCH - 1 that exist */
#pragma unroll
    for (int i = 0; i < BATCH; i++)
      if (s0 + i < used) v[i] = acc[(size_t)(s0 + i) * (D / C)];
  };
  load_batch(0);
  const float *ml = a.workspace + 2 * base;
  float mx = -INFINITY;
  for (int s = lane; s < used; s += 32) mx = fmaxf(mx, ml[2 * s]);
#pragma unroll
  for (int o = 16; o; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float den = 0.0f;
  for (int s = lane; s < used; s += 32) {
    float ms = ml[2 * s];
    float w = ms == -INFINITY ? 0.0f : exp2f(ms - mx); /* saw nothing: its accumulator is zeros */
    wsh[warp][s] = w;
    den += w * ml[2 * s + 1];
  }
#pragma unroll
  for (int o = 16; o; o /= 2) den += __shfl_xor_sync(0xffffffffu, den, o);
  __syncwarp();
  float x[C] = {};
  for (int s0 = 0;;) { /* the splits in order, so the sum's rounding does not depend on the batching */
#pragma unroll
    for (int i = 0; i < BATCH; i++)
      if (s0 + i < used) merge_add(x, wsh[warp][s0 + i], v[i]);
    s0 += BATCH;
    if (s0 >= used) break;
    load_batch(s0);
  }
  const float inv = den > 0.0f ? 1.0f / den : 0.0f;
  T *out = (T *)a.out + ((size_t)(sq.row0 + r / G) * a.n_heads + g * G + r % G) * D + lane * C;
#pragma unroll
  for (int c = 0; c < C; c += 2) store_pair(out + c, x[c] * inv, x[c + 1] * inv);
}

/* ---- launchers ------------------------------------------------------------------------------- */

int cn_cuda_tree_attn_supported(int head_dim) { return head_dim == 64 || head_dim == 128; }

template <int D, int RW> static size_t smem_bytes() {
  return sizeof(cn_bf16_t) * TA_STAGES * 2 * kt_of<D, RW>() * (D + TA_PAD);
}

/* Raises the kernel's shared-memory limit to what it uses; resident blocks per multiprocessor. */
template <typename T, int D, int RW> static int prepare(int *per_sm) {
  auto kernel = tree_attn_kernel<T, D, RW, kt_of<D, RW>()>;
  int smem = (int)smem_bytes<D, RW>();
  CN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  if (per_sm) CN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, kernel, TA_THREADS, smem));
  return CANOPY_OK;
}

static bool use_wgmma(const cn_cuda_ctx *ctx, cn_cuda_tree_attn_impl impl) {
  return impl == CN_CUDA_TA_WGMMA || (impl == CN_CUDA_TA_AUTO && ctx->cc == 90);
}

/* Whether a launch takes 128-row tiles (cuda_ops.h, cn_cuda_tree_attn_splits). With few blocks
 * (batch 1, short prefixes: the 512-key minimum split caps the splits) 64-row tiles make twice as
 * many: the H100 ran n = 64 at 4k in 30 us so (8 splits) against 37 us with 128-row tiles, while
 * at 16k, where 128-row tiles fill the device, they ran 72 us against 89 (bench/RESULTS.md). */
static bool wide_tiles(const cn_cuda_ctx *ctx, bool wgmma, int n_seqs, int max_n, int group, int n_kv, int n_splits,
                       int max_keys) {
  if (!wide_rows(max_n, group)) return false;
  if (!wgmma) return true;
  long blocks = (long)n_seqs * n_kv * (rows_cap(max_n, group, 128) / 128) * n_splits;
  return 4 * blocks >= 3L * (cn_ta_ws_form(ctx, max_n * group, n_splits, max_keys) ? 1 : 2) * ctx->n_sm;
}

/* Splits that fill every resident block slot once with tiles of `tile` rows (per_sm blocks a
 * multiprocessor). */
static long splits_for(const cn_cuda_ctx *ctx, int per_sm, int n_seqs, int max_n, int group, int n_kv, int tile,
                       int max_keys) {
  long base = (long)n_seqs * n_kv * (rows_cap(max_n, group, tile) / tile);
  /* As many splits as fill every resident block slot once: one wave, no tail (measured on the
   * H100: 50 splits of 8 blocks, 1.5 waves, ran a 32k decode at 53% of the copy bandwidth). Each
   * split keeps at least ctx->ta_split_min keys (CN_TA_SPLIT_MIN_KEYS, 128), and 512 once a KV
   * head has 128+ rows, so that the partial states (a kilobyte a row, written and read again)
   * stay small beside the split's K/V (the H100 sweep of bench_tree_attention: n = 64 at 4k ran
   * 45 us at 16 splits of 256 keys, 39 us at 8). */
  long want = (long)per_sm * ctx->n_sm / base;
  long most = max_keys / (wide_rows(max_n, group) ? 512 : ctx->ta_split_min);
  if (want > most) want = most;
  if (want > MERGE_MAX_SPLITS) want = MERGE_MAX_SPLITS;
  return want < 1 ? 1 : want;
}

int cn_cuda_tree_attn_splits(const cn_cuda_ctx *ctx, int n_seqs, int max_n, int max_keys, int n_heads, int n_kv_heads,
                             int head_dim) {
  if (!ctx || n_seqs <= 0 || max_n <= 0 || n_kv_heads <= 0 || n_heads < n_kv_heads) return 1;
  int group = n_heads / n_kv_heads;
  bool wg = use_wgmma(ctx, CN_CUDA_TA_AUTO), wide = wide_rows(max_n, group);
  int per_sm = 0;
  /* The occupancy of the form a launch takes without long sequences. Where one split of long
   * sequences takes 128-key tiles instead (cn_ta_ws_form), they hold one block a multiprocessor,
   * as many as the form at up to 256 rows and fewer than the two-warpgroup kernel's two beyond;
   * fewer blocks a multiprocessor never ask for more than that one split, and wide_tiles below
   * counts the form's own blocks. */
  int st = wg ? cn_ta_wgmma_per_sm(ctx, head_dim, wide ? 2 : 1, max_n * group, 1, 0, &per_sm)
           : head_dim == 64 ? (wide ? prepare<cn_bf16_t, 64, 2>(&per_sm) : prepare<cn_bf16_t, 64, 1>(&per_sm))
                            : (wide ? prepare<cn_bf16_t, 128, 2>(&per_sm) : prepare<cn_bf16_t, 128, 1>(&per_sm));
  if (st || per_sm < 1) per_sm = 1;
  long want = splits_for(ctx, per_sm, n_seqs, max_n, group, n_kv_heads, wide ? 128 : 64, max_keys);
  if (wide && !wide_tiles(ctx, wg, n_seqs, max_n, group, n_kv_heads, (int)want, max_keys)) {
    /* 64-row tiles then (fewer splits never make 128-row tiles fill the device, so the launch
     * picks 64 too). */
    if (cn_ta_wgmma_per_sm(ctx, head_dim, 1, max_n * group, 1, 0, &per_sm) || per_sm < 1) per_sm = 1;
    want = splits_for(ctx, per_sm, n_seqs, max_n, group, n_kv_heads, 64, max_keys);
  }
  return (int)want;
}

void cn_cuda_tree_attn_plan(const cn_cuda_ctx *ctx, int n_seqs, int max_n, int max_keys, int n_heads, int n_kv_heads,
                            int head_dim, int invariant, int *n_splits, int *split_keys) {
  int splits = 1, keys = 0;
  if (max_keys > 0 && n_kv_heads > 0 && n_heads >= n_kv_heads) {
    const int group = n_heads / n_kv_heads;
    if (invariant) {
      keys = 256;
    } else {
      /* Fewer than 128 rows: planned as one 64-row tile, so that a decode step (n = 1) and a small
       * tree get the same cut (two tiles then may run in two waves). */
      int plan_n = wide_rows(max_n, group) ? max_n : (64 / group > 0 ? 64 / group : 1);
      int want = cn_cuda_tree_attn_splits(ctx, n_seqs, plan_n, max_keys, n_heads, n_kv_heads, head_dim);
      keys = ((max_keys + want - 1) / want + TA_KEYS - 1) / TA_KEYS * TA_KEYS;
    }
    splits = (max_keys + keys - 1) / keys;
    if (splits > MERGE_MAX_SPLITS) splits = MERGE_MAX_SPLITS;
    if (splits == 1) keys = 0;
  }
  *n_splits = splits;
  *split_keys = keys;
}

size_t cn_cuda_tree_attn_workspace(int n_seqs, int max_n, int n_splits, int n_heads, int n_kv_heads, int head_dim) {
  if (n_splits <= 1 || n_seqs <= 0 || max_n <= 0 || n_kv_heads <= 0) return 0;
  return sizeof(float) * (size_t)n_seqs * n_kv_heads * rows_cap(max_n, n_heads / n_kv_heads) * n_splits *
         (size_t)(head_dim + 2);
}

template <typename T, int D, int RW> static int launch(cn_cuda_ctx *ctx, const cn_cuda_tree_attn_args *a) {
  int group = a->n_heads / a->n_kv_heads, cap = rows_cap(a->max_n, group, 64 * RW);
  if (use_wgmma(ctx, a->impl)) {
    int st = cn_ta_launch_wgmma(ctx, a, RW, cap);
    if (st) return st;
  } else {
    size_t smem = smem_bytes<D, RW>();
    int st = prepare<T, D, RW>(NULL);
    if (st) return st;
    dim3 grid(cap / (64 * RW), a->n_splits, a->n_seqs * a->n_kv_heads);
    CN_CUDA_CHECK(cn_launch(ctx, tree_attn_kernel<T, D, RW, kt_of<D, RW>()>, grid, TA_THREADS, smem, *a));
  }
  if (a->n_splits > 1) {
    auto merge = a->n_splits <= 4    ? merge_kernel<T, D, 4>
                 : a->n_splits <= 16 ? merge_kernel<T, D, 16>
                                     : merge_kernel<T, D, 32>;
    CN_CUDA_CHECK(cn_launch(ctx, merge, dim3((cap + MERGE_ROWS - 1) / MERGE_ROWS, a->n_seqs * a->n_kv_heads),
                            32 * MERGE_ROWS, 0, *a, cap));
  }
  return CANOPY_OK;
}

int cn_cuda_tree_attention(cn_cuda_ctx *ctx, const cn_cuda_tree_attn_args *a) {
  CN_CUDA_ENTER(ctx);
  if (!a) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_tree_attention: NULL args");
  if (a->n_seqs < 0 || a->max_n < 0 || a->n_splits < 1 || a->n_heads <= 0 || a->n_kv_heads <= 0 ||
      a->n_heads % a->n_kv_heads || a->block_size <= 0 || a->n_seqs * a->n_kv_heads > 65535 ||
      a->n_splits > MERGE_MAX_SPLITS || a->split_keys < 0 || a->split_keys % TA_KEYS ||
      (unsigned)a->impl > CN_CUDA_TA_WGMMA || (a->row_tile != 0 && a->row_tile != 64 && a->row_tile != 128))
    return cn_error(CANOPY_ERR_INVALID_ARG,
                    "cn_cuda_tree_attention: n_seqs=%d max_n=%d n_splits=%d (1..%d) n_heads=%d n_kv_heads=%d "
                    "block_size=%d impl=%d row_tile=%d split_keys=%d (a multiple of %d)",
                    a->n_seqs, a->max_n, a->n_splits, MERGE_MAX_SPLITS, a->n_heads, a->n_kv_heads, a->block_size,
                    (int)a->impl, a->row_tile, a->split_keys, TA_KEYS);
  if (!cn_cuda_tree_attn_supported(a->head_dim))
    return cn_error(CANOPY_ERR_UNSUPPORTED, "cn_cuda_tree_attention: head_dim %d (64 or 128)", a->head_dim);
  if (!cn_dtype_ok(a->dt)) return cn_error(CANOPY_ERR_DTYPE, "cn_cuda_tree_attention: unknown dtype %d", (int)a->dt);
  if (a->impl == CN_CUDA_TA_WGMMA && ctx->cc != 90)
    return cn_error(CANOPY_ERR_UNSUPPORTED, "cn_cuda_tree_attention: the wgmma kernel needs sm_90 (device is sm_%d)", ctx->cc);
  if (!a->n_seqs || !a->max_n) return CANOPY_OK;
  if (!a->seqs || !a->q || !a->out || !a->k || !a->v || !a->block_tables || !a->pos || (a->n_splits > 1 && !a->workspace))
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_tree_attention: a NULL device array (seqs, q, out, k, v, "
                                           "block_tables, pos, or the workspace of %d splits)",
                    a->n_splits);
  return cn_dispatch(a->dt, [&](auto t) {
    using T = decltype(t);
    const int group = a->n_heads / a->n_kv_heads;
    bool wide = a->row_tile == 128  ? wide_rows(a->max_n, group)
                : a->row_tile == 64 ? false
                                    : wide_tiles(ctx, use_wgmma(ctx, a->impl), a->n_seqs, a->max_n, group,
                                                 a->n_kv_heads, a->n_splits, a->max_keys);
    if (a->head_dim == 64) return wide ? launch<T, 64, 2>(ctx, a) : launch<T, 64, 1>(ctx, a);
    return wide ? launch<T, 128, 2>(ctx, a) : launch<T, 128, 1>(ctx, a);
  });
}
