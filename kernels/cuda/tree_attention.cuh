/* What the two shared-prefix tree-attention kernels share (tree_attention.cu: mma.sync, any
 * sm_80+; tree_attention_wgmma.cu: Hopper warpgroup MMA): the key split, which keys a block
 * streams, paged addressing, the mask, the online softmax and the output or partial state. Both
 * kernels hold a row's scores and accumulators in the m16n8 accumulator layout (thread lane holds
 * rows lane / 4 and lane / 4 + 8 of a 16-row block, columns 2 (lane % 4) + {0, 1} of every 8), so
 * everything after the matrix products is written once here. C++ only. */
#ifndef CANOPY_KERNELS_CUDA_TREE_ATTENTION_CUH
#define CANOPY_KERNELS_CUDA_TREE_ATTENTION_CUH

#include <limits.h>
#include <math.h>

#include "kernels/cuda/cuda_common.cuh"

#define TA_KEYS 64 /* keys per split unit (splits hold whole multiples) */
#define TA_THREADS 128
/* Fewest keys a split holds when a KV head has fewer than 128 query rows (decode, small trees):
 * each split adds a partial state to write and merge (cuda_ops.h, cn_cuda_tree_attn_plan). 128
 * measured best on the H200 at 256 and 4096 keys against 256 and 512 (bench/RESULTS.md);
 * CANOPY_CUDA_TA_SPLIT_MIN_KEYS sets it per context. */
#define CN_TA_SPLIT_MIN_KEYS 128
#define TA_LOG2E 1.4426950408889634f
/* The most query rows a KV head has where mode 3 takes 128-key tiles: measured up to 512 (128
 * nodes at GQA 4). */
#define CN_TA_WS_LONG_MAX_ROWS 512

/* ---- PTX wrappers --------------------------------------------------------------------------- */

__device__ __forceinline__ uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

/* 16 bytes global -> shared; bytes = 0 writes zeros without reading. */
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

/* 2^x by the special-function unit (2^-inf = 0); its relative error (~2^-22) is far below the
 * bf16 rounding of P that follows. */
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

/* Two floats as bf16x2, the first in the low half (the lower k or column index). */
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}
__device__ __forceinline__ uint32_t load_pair(const float *p) {
  float2 v = *reinterpret_cast<const float2 *>(p);
  return pack_bf16(v.x, v.y);
}
__device__ __forceinline__ uint32_t load_pair(const cn_bf16_t *p) { return *reinterpret_cast<const uint32_t *>(p); }
__device__ __forceinline__ void store_pair(float *p, float x, float y) {
  *reinterpret_cast<float2 *>(p) = make_float2(x, y);
}
__device__ __forceinline__ void store_pair(cn_bf16_t *p, float x, float y) {
  *reinterpret_cast<__nv_bfloat162 *>(p) = __floats2bfloat162_rn(x, y);
}

/* ---- the split of a sequence's keys ---------------------------------------------------------- */

struct key_split {
  int total, chunk, n_used; /* keys; keys per split (whole units); splits that hold any */
};

__device__ __forceinline__ key_split split_of(const cn_cuda_tree_seq &s, const cn_cuda_tree_attn_args &a) {
  key_split k;
  k.total = s.ctx_len + s.q_offset + s.n;
  int per = (k.total + a.n_splits - 1) / a.n_splits;
  k.chunk = (per + TA_KEYS - 1) / TA_KEYS * TA_KEYS;
  /* Fixed boundaries (cuda_ops.h, split_keys) unless this sequence has more keys than they hold. */
  if (a.split_keys > k.chunk) k.chunk = a.split_keys;
  k.n_used = k.chunk ? (k.total + k.chunk - 1) / k.chunk : 0;
  return k;
}

/* ---- one block's share: grid (row tile, split, sequence x KV head) ---------------------------- */

struct ta_block {
  cn_cuda_tree_seq sq;
  const int32_t *pos; /* the sequence's new-slot positions */
  int g, G, rows;     /* KV head; query heads per KV head; query rows (n G) of this KV head */
  int row0;           /* the tile's first row */
  int k_begin, k_end; /* the keys this block streams */
  int bs_shift;       /* log2 of the cache's block size, or -1 when it is not a power of two */
  bool causal;
};

/* Row r of a KV head is token r / G, head g G + r % G; padding rows (r >= rows) read a real row
 * and are never written. */
__device__ __forceinline__ int ta_tok(const ta_block &b, int r) { return min(r, b.rows - 1) / b.G; }
__device__ __forceinline__ int ta_head(const ta_block &b, int r) { return b.g * b.G + min(r, b.rows - 1) % b.G; }

/* Fills b for this block; false when the block has nothing to do (a tile past the rows, or a
 * split past the keys of a short sequence). */
template <int ROWS> __device__ __forceinline__ bool ta_block_init(const cn_cuda_tree_attn_args &a, ta_block &b) {
  const int tile = blockIdx.x, split = blockIdx.y;
  b.g = blockIdx.z % a.n_kv_heads;
  b.sq = a.seqs[blockIdx.z / a.n_kv_heads];
  b.G = a.n_heads / a.n_kv_heads;
  b.rows = b.sq.n * b.G;
  b.row0 = tile * ROWS;
  if (b.row0 >= b.rows) return false;
  const key_split ksp = split_of(b.sq, a);
  if (split >= ksp.n_used) return false;
  b.causal = b.sq.mask0 < 0;
  b.bs_shift = (a.block_size & (a.block_size - 1)) ? -1 : __ffs(a.block_size) - 1;
  b.pos = a.pos + b.sq.pos0;
  /* This block's keys: its split, cut at the last key any of its rows may see. */
  const int tok_lo = b.row0 / b.G, tok_hi = (min(b.rows, b.row0 + ROWS) - 1) / b.G;
  b.k_begin = split * ksp.chunk;
  b.k_end = min(ksp.total, b.k_begin + ksp.chunk);
  if (b.causal) b.k_end = min(b.k_end, b.sq.ctx_len + b.sq.q_offset + tok_hi + 1);
  if (a.sliding_window > 0) {
    /* Prefix slot s has position s: slots below every row's window are skipped. */
    int mn = INT_MAX;
    for (int t = tok_lo; t <= tok_hi; t++)
      mn = min(mn, b.pos[b.sq.q_offset + t]);
    b.k_begin = max(b.k_begin, min(b.sq.ctx_len, max(0, mn - a.sliding_window + 1)));
  }
  return true;
}

/* The block-table lookups of one K/V tile, made before its copies (ta_tile_find, then
 * ta_tile_copy): of a block of NTH threads, thread t copies 16-byte piece t % (D / 8) of keys
 * t / (D / 8) + i NTH / (D / 8), i < P, and src holds where each of those keys lies in the paged
 * cache. All P table loads are issued before any is used, and a kernel may do other work between
 * the two halves, so a tile waits for at most one memory round trip instead of one per piece:
 * looking up each piece just before its copy was the kernels' largest stall (ncu on the H200,
 * bench/RESULTS.md 2026-12-04, third session). */
template <int D, int KT, int NTH = TA_THREADS> struct ta_tile_src {
  static constexpr int CH = D / 8, STEP = NTH / CH, P = KT / STEP;
  static_assert(NTH % CH == 0 && KT % STEP == 0, "a tile is whole rounds of the block's threads");
  int kt;        /* the tile's first key */
  int32_t blk[P]; /* the cache block of each of this thread's keys (keys past the range: the last key's) */
  int in[P];      /* the key's slot in its block */
};

template <int D, int KT, int NTH = TA_THREADS>
__device__ __forceinline__ ta_tile_src<D, KT, NTH> ta_tile_find(const cn_cuda_tree_attn_args &a, const ta_block &b,
                                                                int kt) {
  using S = ta_tile_src<D, KT, NTH>;
  S src;
  src.kt = kt;
  const int32_t *table = a.block_tables + b.sq.table0;
  const int key0 = kt + threadIdx.x / S::CH, last = b.k_end - 1;
  /* Block sizes are powers of two in practice: a shift and a mask instead of a division per key
   * (the address arithmetic competes with the MMAs for issue slots); one uniform branch a tile. */
  if (b.bs_shift >= 0) {
#pragma unroll
    for (int i = 0; i < S::P; i++) {
      const int slot = min(key0 + i * S::STEP, last);
      src.blk[i] = __ldg(table + (slot >> b.bs_shift));
      src.in[i] = slot & (a.block_size - 1);
    }
  } else {
#pragma unroll
    for (int i = 0; i < S::P; i++) {
      const int slot = min(key0 + i * S::STEP, last);
      src.blk[i] = __ldg(table + slot / a.block_size);
      src.in[i] = slot % a.block_size;
    }
  }
  return src;
}

/* The copies of a found tile: K and V of key `key` (0 .. KT - 1), piece c, to k_dst + at(key, c)
 * and v_dst + at(key, c) (shared-memory byte addresses); keys at or past k_end become zeros. `at`
 * must be affine in the key over one thread's keys (key0 + i STEP, STEP a multiple of 8): true of
 * a padded row-major tile and of the 128-byte swizzle, whose pattern repeats every 8 rows. So a
 * piece costs its two copies and a few adds. */
template <int D, int KT, int NTH = TA_THREADS, typename At>
__device__ __forceinline__ void ta_tile_copy(const cn_cuda_tree_attn_args &a, const ta_block &b,
                                             const ta_tile_src<D, KT, NTH> &src, uint32_t k_dst, uint32_t v_dst,
                                             At at) {
  using S = ta_tile_src<D, KT, NTH>;
  static_assert(S::STEP % 8 == 0, "a thread's keys lie 8 rows apart or a multiple of that");
  const int piece = threadIdx.x % S::CH, key0 = threadIdx.x / S::CH;
  const uint32_t to0 = at(key0, piece), to_step = at(key0 + S::STEP, piece) - to0;
  const size_t head = (size_t)b.g * D + piece * 8, row = (size_t)a.n_kv_heads * D;
  const cn_bf16_t *kp = (const cn_bf16_t *)a.k + head, *vp = (const cn_bf16_t *)a.v + head;
  const int live = b.k_end - src.kt - key0; /* this thread's keys below it are in range */
#pragma unroll
  for (int i = 0; i < S::P; i++) {
    const size_t off = (size_t)src.blk[i] * a.block_stride + (size_t)src.in[i] * row;
    const int bytes = i * S::STEP < live ? 16 : 0;
    cp_async16(k_dst + to0 + i * to_step, kp + off, bytes);
    cp_async16(v_dst + to0 + i * to_step, vp + off, bytes);
  }
}

/* Whether token t of the block sees key `key` (k_begin <= key); the prefix part is the same test
 * as key_visible() in kernels/cpu/attention.c. */
__device__ __forceinline__ bool ta_visible(const cn_cuda_tree_attn_args &a, const ta_block &b, int t, int key) {
  if (key >= b.k_end) return false;
  int key_pos = key;
  if (key >= b.sq.ctx_len) {
    int s = key - b.sq.ctx_len;
    if (b.causal) {
      if (s > b.sq.q_offset + t) return false;
    } else if (!((a.tree_mask[b.sq.mask0 + (size_t)t * b.sq.mask_words + s / 64] >> (s % 64)) & 1)) {
      return false;
    }
    key_pos = b.pos[s];
  }
  return a.sliding_window <= 0 || key_pos > b.pos[b.sq.q_offset + t] - a.sliding_window;
}

/* An empty online-softmax state: no row has seen a key yet. */
template <int RW, int DN>
__device__ __forceinline__ void ta_state_init(float (&o)[RW][DN][4], float (&m)[RW][2], float (&l)[RW][2]) {
#pragma unroll
  for (int rb = 0; rb < RW; rb++) {
#pragma unroll
    for (int dn = 0; dn < DN; dn++)
      o[rb][dn][0] = o[rb][dn][1] = o[rb][dn][2] = o[rb][dn][3] = 0.0f;
    m[rb][0] = m[rb][1] = -INFINITY, l[rb][0] = l[rb][1] = 0.0f;
  }
}

/* Whether the block's keys below key_end all lie in the committed prefix, whose K/V the kernel
 * before this one does not write: with a.prefix_ready they may be copied before waiting for it. */
__device__ __forceinline__ bool ta_committed(const ta_block &b, int key_end) {
  return min(key_end, b.k_end) <= b.sq.ctx_len;
}

/* The pipeline's start: the first STAGES - 1 tiles of KT keys requested, one cp.async group each
 * (their table lookups all issued first). Every iteration after that commits one group too (empty
 * past the last tile), so at the top of iteration `it`, waiting for all but the newest STAGES - 2
 * groups means tile `it` has landed. find(kt) and copy(src, stage) are the two halves of a tile's
 * load (ta_tile_find, ta_tile_copy). The wait for the kernel before is here: with a.prefix_ready
 * the leading tiles that lie wholly in the committed prefix are requested before it, so their
 * table lookups and copies travel during that kernel's tail instead of after it (1-1.6 us of a
 * batch-1 decode, bench/RESULTS.md 2026-12-04, fourth session). Without it the kernel waited at
 * its entry, and the wait here returns at once. */
template <int STAGES, int KT, typename Find, typename Copy>
__device__ __forceinline__ void ta_prologue(const cn_cuda_tree_attn_args &a, const ta_block &b, int n_tiles,
                                            Find &&find, Copy &&copy) {
  int early = 0; /* tiles requested before the wait */
  if (a.prefix_ready)
    while (early < STAGES - 1 && early < n_tiles && ta_committed(b, b.k_begin + (early + 1) * KT))
      early++;
  decltype(find(0)) src[STAGES - 1];
#pragma unroll
  for (int st = 0; st < STAGES - 1; st++)
    if (st < early) src[st] = find(b.k_begin + st * KT);
#pragma unroll
  for (int st = 0; st < STAGES - 1; st++)
    if (st < early) {
      copy(src[st], st);
      cp_async_commit();
    }
  cn_pdl_wait();
#pragma unroll
  for (int st = 0; st < STAGES - 1; st++)
    if (st >= early && st < n_tiles) src[st] = find(b.k_begin + st * KT);
#pragma unroll
  for (int st = 0; st < STAGES - 1; st++)
    if (st >= early) {
      if (st < n_tiles) copy(src[st], st);
      cp_async_commit();
    }
}

/* The per-tile steps below work on row blocks R0 .. R1 - 1 (all by default): the wgmma kernel
 * takes its row blocks in turn, so that one's softmax runs while the tensor cores work on another.
 * Masks are applied only on tiles that reach the new slots (tree or causal), the end of the
 * range, or with a sliding window; prefix tiles are all visible. base[rb] is the first row of
 * this warp's 16-row block rb. */
template <int RW, int NT, int R0 = 0, int R1 = RW>
__device__ __forceinline__ void ta_mask(const cn_cuda_tree_attn_args &a, const ta_block &b, const int (&base)[RW],
                                        int kt, float (&s)[RW][NT][4]) {
  const int kt_end = kt + NT * 8;
  if (kt_end <= b.sq.ctx_len && kt_end <= b.k_end && a.sliding_window <= 0) return;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int rb = R0; rb < R1; rb++)
#pragma unroll
    for (int nn = 0; nn < NT; nn++)
#pragma unroll
      for (int e = 0; e < 4; e++)
        if (!ta_visible(a, b, ta_tok(b, base[rb] + lane / 4 + 8 * (e / 2)), kt + nn * 8 + (lane % 4) * 2 + (e & 1)))
          s[rb][nn][e] = -INFINITY;
}

/* Online softmax per row (base 2, the scale folded into sl2) over one tile's scores, which become
 * P = 2^(s sl2 - m) in place; l holds this lane's part of each row sum (the quad is summed at the
 * end). corr is the factor the row's accumulators must be scaled by; the return value says
 * whether any row of the warp needs it (saw a new maximum): past the first tiles that is rare, and
 * the multiplications cost as many issue slots as the MMAs of a narrow tile. */
template <int RW, int NT, int R0 = 0, int R1 = RW>
__device__ __forceinline__ bool ta_softmax_p(float (&s)[RW][NT][4], float (&m)[RW][2], float (&l)[RW][2],
                                             float (&corr)[RW][2], float sl2) {
  bool grew = false;
#pragma unroll
  for (int rb = R0; rb < R1; rb++)
#pragma unroll
    for (int j = 0; j < 2; j++) {
      float mx = -INFINITY;
#pragma unroll
      for (int nn = 0; nn < NT; nn++)
        mx = fmaxf(mx, fmaxf(s[rb][nn][2 * j], s[rb][nn][2 * j + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_old = m[rb][j], m_new = fmaxf(m_old, mx * sl2);
      const float mu = m_new == -INFINITY ? 0.0f : m_new; /* a row that saw nothing yet: exp2(-inf) = 0 */
      m[rb][j] = m_new;
      float rs = 0.0f;
#pragma unroll
      for (int nn = 0; nn < NT; nn++) {
        float p0 = fast_exp2(fmaf(s[rb][nn][2 * j], sl2, -mu)), p1 = fast_exp2(fmaf(s[rb][nn][2 * j + 1], sl2, -mu));
        s[rb][nn][2 * j] = p0;
        s[rb][nn][2 * j + 1] = p1;
        rs += p0 + p1;
      }
      /* m_new == m_old: the factor is exactly 1 (or the row is still empty, its sums 0). */
      corr[rb][j] = m_new > m_old ? fast_exp2(m_old - mu) : 1.0f;
      l[rb][j] = l[rb][j] * corr[rb][j] + rs;
      grew |= m_new > m_old;
    }
  return __any_sync(0xffffffffu, grew);
}

template <int RW, int DN, int R0 = 0, int R1 = RW>
__device__ __forceinline__ void ta_rescale(float (&o)[RW][DN][4], const float (&corr)[RW][2]) {
#pragma unroll
  for (int rb = R0; rb < R1; rb++)
#pragma unroll
    for (int dn = 0; dn < DN; dn++) {
      o[rb][dn][0] *= corr[rb][0], o[rb][dn][1] *= corr[rb][0];
      o[rb][dn][2] *= corr[rb][1], o[rb][dn][3] *= corr[rb][1];
    }
}

template <int RW, int NT, int DN, int R0 = 0, int R1 = RW>
__device__ __forceinline__ void ta_softmax(float (&s)[RW][NT][4], float (&m)[RW][2], float (&l)[RW][2],
                                           float (&o)[RW][DN][4], float sl2) {
  float corr[RW][2];
  if (ta_softmax_p<RW, NT, R0, R1>(s, m, l, corr, sl2)) ta_rescale<RW, DN, R0, R1>(o, corr);
}

/* P (the scores after ta_softmax_p) as bf16 A fragments of the P V product, 16 keys per k-step:
 * the m16n8 accumulator layout of two adjacent 8-key blocks is the m16k16 operand layout. */
template <int RW, int NT, int R0 = 0, int R1 = RW>
__device__ __forceinline__ void ta_pack_p(const float (&s)[RW][NT][4], uint32_t (&pa)[RW][NT / 2][4]) {
#pragma unroll
  for (int rb = R0; rb < R1; rb++)
#pragma unroll
    for (int kk = 0; kk < NT / 2; kk++) {
      pa[rb][kk][0] = pack_bf16(s[rb][2 * kk][0], s[rb][2 * kk][1]);
      pa[rb][kk][1] = pack_bf16(s[rb][2 * kk][2], s[rb][2 * kk][3]);
      pa[rb][kk][2] = pack_bf16(s[rb][2 * kk + 1][0], s[rb][2 * kk + 1][1]);
      pa[rb][kk][3] = pack_bf16(s[rb][2 * kk + 1][2], s[rb][2 * kk + 1][3]);
    }
}

/* The end of a block: with one split the normalised output, else the unnormalised (max, sum,
 * accumulator) per row in the workspace for merge_kernel. cap = workspace rows per (sequence,
 * KV head). Then it lets the next kernel launch (cn_pdl_trigger, cuda_common.cuh): the merge waits
 * for the whole main grid and its writes, so its launch latency overlaps the main kernel's tail. */
template <typename T, int RW, int DN>
__device__ __forceinline__ void ta_finish(const cn_cuda_tree_attn_args &a, const ta_block &b, const int (&base)[RW],
                                          int cap, const float (&o)[RW][DN][4], const float (&m)[RW][2],
                                          const float (&l)[RW][2]) {
  const int lane = threadIdx.x % 32, quad = lane / 4, qlane = lane % 4, D = DN * 8;
#pragma unroll
  for (int rb = 0; rb < RW; rb++)
#pragma unroll
    for (int j = 0; j < 2; j++) {
      float lj = l[rb][j];
      lj += __shfl_xor_sync(0xffffffffu, lj, 1);
      lj += __shfl_xor_sync(0xffffffffu, lj, 2);
      const int r = base[rb] + quad + 8 * j;
      if (r >= b.rows) continue;
      if (a.n_splits == 1) {
        float inv = lj > 0.0f ? 1.0f / lj : 0.0f; /* a query that sees nothing gets zeros */
        T *out = (T *)a.out + ((size_t)(b.sq.row0 + ta_tok(b, r)) * a.n_heads + ta_head(b, r)) * D + qlane * 2;
#pragma unroll
        for (int dn = 0; dn < DN; dn++)
          store_pair(out + dn * 8, o[rb][dn][2 * j] * inv, o[rb][dn][2 * j + 1] * inv);
      } else {
        size_t prow = ((size_t)blockIdx.z * cap + r) * a.n_splits + blockIdx.y;
        float *ml = a.workspace + 2 * prow;
        float *acc = a.workspace + 2 * (size_t)gridDim.z * cap * a.n_splits + prow * D + qlane * 2;
        if (qlane == 0) ml[0] = m[rb][j], ml[1] = lj;
#pragma unroll
        for (int dn = 0; dn < DN; dn++)
          store_pair(acc + dn * 8, o[rb][dn][2 * j], o[rb][dn][2 * j + 1]);
      }
    }
  cn_pdl_trigger();
}

/* The form that 128-row tiles of KV heads of `rows` query rows take in a launch of n_splits
 * splits whose sequences hold at most max_keys keys (cn_cuda_set_ta_ws): 0, the two-warpgroup
 * kernel (two blocks a multiprocessor), or the warp-specialised one (one) with tiles of 64 keys
 * (3) or 128 (4). Mode 3 takes 128-key tiles where every block streams a whole sequence of
 * ta_ws_long_keys+ keys: the H100 ran them 5-8% faster there at batch 8, 64 and 128 nodes, 16k and
 * 32k keys, and slower wherever blocks stream a split of 512-4096 keys (bench/RESULTS.md,
 * 2026-12-06, seventeenth session). */
static inline int cn_ta_ws_form(const cn_cuda_ctx *ctx, int rows, int n_splits, int max_keys) {
  if (ctx->ta_ws == 3 && ctx->ta_ws_long_keys > 0 && n_splits == 1 && max_keys >= ctx->ta_ws_long_keys &&
      rows <= CN_TA_WS_LONG_MAX_ROWS && !ctx->batch_invariant)
    return 4;
  if (ctx->ta_ws == 0 || rows > ctx->ta_ws_max_rows) return 0;
  /* 128-key tiles change where a row's softmax rescales, so its bits: not with the batch-invariant
   * plan, whose verified tokens must match their decode steps'. */
  return ctx->ta_ws == 4 && ctx->batch_invariant ? 3 : ctx->ta_ws;
}

/* The wgmma kernel's launch (tree_attention_wgmma.cu); rw row blocks of 64 per block. */
int cn_ta_launch_wgmma(cn_cuda_ctx *ctx, const cn_cuda_tree_attn_args *a, int rw, int cap);
/* Its resident blocks per multiprocessor (after raising its shared-memory limit), for KV heads of
 * `rows` query rows in a launch of n_splits splits and at most max_keys keys a sequence. */
int cn_ta_wgmma_per_sm(const cn_cuda_ctx *ctx, int head_dim, int rw, int rows, int n_splits, int max_keys,
                       int *per_sm);

#endif
