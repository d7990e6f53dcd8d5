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
#include <math.h>

#include "kernels/cuda/cuda_common.cuh"

#define TA_KEYS 64  /* keys per split unit (splits hold whole multiples) */
#define TA_THREADS 128
#define TA_PAD 8    /* bf16 of padding per shared row: 16 bytes, so ldmatrix rows hit distinct banks */
#define TA_STAGES 3 /* key tiles in shared memory: two in flight while one is used */
#ifndef CN_TA_WIDE_KT
#define CN_TA_WIDE_KT 32 /* keys per tile of the two-row-block variant at head_dim 128 (a tuning knob) */
#endif
#define TA_LOG2E 1.4426950408889634f

/* ---- PTX wrappers --------------------------------------------------------------------------- */

__device__ __forceinline__ uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

/* 16 bytes global -> shared; bytes = 0 writes zeros without reading. */
__device__ __forceinline__ void cp_async16(void *dst, const void *src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

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
__device__ __forceinline__ void store_pair(float *p, float x, float y) { *reinterpret_cast<float2 *>(p) = make_float2(x, y); }
__device__ __forceinline__ void store_pair(cn_bf16_t *p, float x, float y) {
  *reinterpret_cast<__nv_bfloat162 *>(p) = __floats2bfloat162_rn(x, y);
}

/* ---- the split of a sequence's keys ---------------------------------------------------------- */

struct key_split {
  int total, chunk, n_used; /* keys; keys per split (whole tiles); splits that hold any */
};

__device__ __forceinline__ key_split split_of(const cn_cuda_tree_seq &s, int n_splits) {
  key_split k;
  k.total = s.ctx_len + s.q_offset + s.n;
  int per = (k.total + n_splits - 1) / n_splits;
  k.chunk = (per + TA_KEYS - 1) / TA_KEYS * TA_KEYS;
  k.n_used = k.chunk ? (k.total + k.chunk - 1) / k.chunk : 0;
  return k;
}

/* The variant: two row blocks per warp (128 rows a block, 32-key tiles) once a (sequence, KV head)
 * has 128 query rows or more, else one (64 rows, 64-key tiles). */
static inline bool wide_rows(int max_n, int group) { return max_n * group >= 128; }

/* Keys per shared-memory tile of a variant. */
template <int D, int RW> constexpr int kt_of() { return RW == 1 ? 64 : D == 128 ? CN_TA_WIDE_KT : 32; }

/* Rows of the workspace per (sequence, KV head): the grid's row tiles. */
static inline int rows_cap(int max_n, int group) {
  int t = wide_rows(max_n, group) ? 128 : 64;
  return (max_n * group + t - 1) / t * t;
}

/* ---- the main kernel ------------------------------------------------------------------------- */

/* RW row blocks of 16 per warp (a block holds 64 RW query rows) and KT keys per tile. RW = 2
 * halves the shared-memory traffic per MMA (each K or V fragment loaded by ldmatrix feeds two
 * row blocks): with one row block, ldmatrix alone takes as many shared-memory cycles as the MMAs
 * take tensor cycles, which bounds trees of 64+ nodes. KT = 32 there keeps the score registers
 * within budget. */
template <typename T, int D, int RW, int KT>
__global__ void __launch_bounds__(TA_THREADS, 2) tree_attn_kernel(cn_cuda_tree_attn_args a) {
  constexpr int LD = D + TA_PAD, KSTEPS = D / 16, DN = D / 8, NT = KT / 8, ROWS = 64 * RW;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  cn_bf16_t *ks = reinterpret_cast<cn_bf16_t *>(smem_raw); /* [TA_STAGES][KT][LD] */
  cn_bf16_t *vs = ks + TA_STAGES * KT * LD;                /* [TA_STAGES][KT][LD] */

  const int tile = blockIdx.x, split = blockIdx.y;
  const int g = blockIdx.z % a.n_kv_heads;
  const cn_cuda_tree_seq sq = a.seqs[blockIdx.z / a.n_kv_heads];
  const int G = a.n_heads / a.n_kv_heads, rows = sq.n * G;
  if (tile * ROWS >= rows) return;
  const key_split ksp = split_of(sq, a.n_splits);
  if (split >= ksp.n_used) return;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, quad = lane / 4, qlane = lane % 4;
  const bool causal = sq.mask0 < 0;
  const int32_t *pos = a.pos + sq.pos0;

  /* The rows this thread holds in the MMA fragments: quad and quad + 8 of each of its warp's
   * row blocks. Recomputed where needed rather than held: registers are the scarce resource. */
  auto row_of = [&](int rb, int j) { return tile * ROWS + (warp * RW + rb) * 16 + quad + 8 * j; };
  auto tok_of = [&](int rb, int j) { return min(row_of(rb, j), rows - 1) / G; }; /* padding rows: a real row, unwritten */
  auto head_of = [&](int rb, int j) { return g * G + min(row_of(rb, j), rows - 1) % G; };
  const bool warp_active = tile * ROWS + warp * RW * 16 < rows;

  /* This block's keys: its split, cut at the last key any of its rows may see. */
  const int tok_lo = tile * ROWS / G, tok_hi = (min(rows, (tile + 1) * ROWS) - 1) / G;
  int k_begin = split * ksp.chunk;
  int k_end = min(ksp.total, k_begin + ksp.chunk);
  if (causal) k_end = min(k_end, sq.ctx_len + sq.q_offset + tok_hi + 1);
  if (a.sliding_window > 0) {
    /* Prefix slot s has position s: slots below every row's window are skipped. */
    int mn = INT_MAX;
    for (int t = tok_lo; t <= tok_hi; t++)
      mn = min(mn, pos[sq.q_offset + t]);
    k_begin = max(k_begin, min(sq.ctx_len, max(0, mn - a.sliding_window + 1)));
  }
  const int n_tiles = k_end > k_begin ? (k_end - k_begin + KT - 1) / KT : 0;

  /* Q fragments (A operand, row-major 16 x 16 per k-step), rounded to bf16. */
  uint32_t qa[RW][KSTEPS][4];
#pragma unroll
  for (int rb = 0; rb < RW; rb++) {
    const T *q0 = (const T *)a.q + ((size_t)(sq.row0 + tok_of(rb, 0)) * a.n_heads + head_of(rb, 0)) * D;
    const T *q1 = (const T *)a.q + ((size_t)(sq.row0 + tok_of(rb, 1)) * a.n_heads + head_of(rb, 1)) * D;
    const bool valid0 = row_of(rb, 0) < rows, valid1 = row_of(rb, 1) < rows;
#pragma unroll
    for (int kk = 0; kk < KSTEPS; kk++) {
      int c = kk * 16 + qlane * 2;
      qa[rb][kk][0] = valid0 ? load_pair(q0 + c) : 0u;
      qa[rb][kk][1] = valid1 ? load_pair(q1 + c) : 0u;
      qa[rb][kk][2] = valid0 ? load_pair(q0 + c + 8) : 0u;
      qa[rb][kk][3] = valid1 ? load_pair(q1 + c + 8) : 0u;
    }
  }

  const int kv_dim = a.n_kv_heads * D;
  const int32_t *table = a.block_tables + sq.table0;
  /* Block sizes are powers of two in practice: a shift and a mask instead of a division per
   * 16-byte piece (the address arithmetic competes with the MMAs for issue slots). */
  const int bs = a.block_size, bs_shift = __ffs(bs) - 1;
  const bool bs_pow2 = (bs & (bs - 1)) == 0;
  auto load_tile = [&](int kt, int st) {
    constexpr int CH = D / 8; /* 16-byte pieces per key row */
    cn_bf16_t *kd = ks + st * KT * LD, *vd = vs + st * KT * LD;
#pragma unroll
    for (int it = 0; it < KT * CH / TA_THREADS; it++) {
      int c = threadIdx.x + it * TA_THREADS, key = c / CH, col = (c % CH) * 8, slot = kt + key;
      const cn_bf16_t *ksrc = (const cn_bf16_t *)a.k, *vsrc = (const cn_bf16_t *)a.v;
      int bytes = 0;
      if (slot < k_end) {
        int blk = bs_pow2 ? slot >> bs_shift : slot / bs, in = bs_pow2 ? slot & (bs - 1) : slot % bs;
        size_t off = (size_t)table[blk] * a.block_stride + (size_t)(in * kv_dim + g * D + col);
        ksrc += off;
        vsrc += off;
        bytes = 16;
      }
      cp_async16(kd + key * LD + col, ksrc, bytes);
      cp_async16(vd + key * LD + col, vsrc, bytes);
    }
  };

  /* Whether row (rb, j) of this thread sees key `key` (k_begin <= key); the prefix part is the
   * same test as key_visible() in kernels/cpu/attention.c. */
  auto visible = [&](int rb, int j, int key) -> bool {
    if (key >= k_end) return false;
    int key_pos = key, t = tok_of(rb, j);
    if (key >= sq.ctx_len) {
      int s = key - sq.ctx_len;
      if (causal) {
        if (s > sq.q_offset + t) return false;
      } else if (!((a.tree_mask[sq.mask0 + (size_t)t * sq.mask_words + s / 64] >> (s % 64)) & 1)) {
        return false;
      }
      key_pos = pos[s];
    }
    return a.sliding_window <= 0 || key_pos > pos[sq.q_offset + t] - a.sliding_window;
  };

  const float sl2 = a.scale * TA_LOG2E;
  float o[RW][DN][4];
#pragma unroll
  for (int rb = 0; rb < RW; rb++)
#pragma unroll
    for (int dn = 0; dn < DN; dn++)
      o[rb][dn][0] = o[rb][dn][1] = o[rb][dn][2] = o[rb][dn][3] = 0.0f;
  float m[RW][2], l[RW][2];
#pragma unroll
  for (int rb = 0; rb < RW; rb++)
    m[rb][0] = m[rb][1] = -INFINITY, l[rb][0] = l[rb][1] = 0.0f;

  /* Every iteration commits one group (empty past the last tile), so waiting for all but the
   * newest TA_STAGES - 1 groups always means this iteration's tile has landed. */
#pragma unroll
  for (int st = 0; st < TA_STAGES - 1; st++) {
    if (st < n_tiles) load_tile(k_begin + st * KT, st);
    cp_async_commit();
  }
  for (int it = 0; it < n_tiles; it++) {
    const int kt = k_begin + it * KT, ahead = it + TA_STAGES - 1;
    if (ahead < n_tiles) load_tile(k_begin + ahead * KT, ahead % TA_STAGES);
    cp_async_commit();
    cp_async_wait<TA_STAGES - 1>();
    __syncthreads();
    if (warp_active) {
      const int st = it % TA_STAGES;
      const cn_bf16_t *kst = ks + st * KT * LD, *vst = vs + st * KT * LD;
      float s[RW][NT][4];
#pragma unroll
      for (int nn = 0; nn < NT; nn++) {
#pragma unroll
        for (int rb = 0; rb < RW; rb++)
          s[rb][nn][0] = s[rb][nn][1] = s[rb][nn][2] = s[rb][nn][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; kk += 2) {
          uint32_t b[4];
          ldmatrix_x4(b, kst + (nn * 8 + (lane & 7)) * LD + kk * 16 + (lane >> 3) * 8);
#pragma unroll
          for (int rb = 0; rb < RW; rb++) {
            mma_bf16(s[rb][nn], qa[rb][kk], b[0], b[1]);
            mma_bf16(s[rb][nn], qa[rb][kk + 1], b[2], b[3]);
          }
        }
      }
      if (kt + KT > sq.ctx_len || kt + KT > k_end || a.sliding_window > 0) {
#pragma unroll
        for (int rb = 0; rb < RW; rb++)
#pragma unroll
          for (int nn = 0; nn < NT; nn++)
#pragma unroll
            for (int e = 0; e < 4; e++)
              if (!visible(rb, e / 2, kt + nn * 8 + qlane * 2 + (e & 1))) s[rb][nn][e] = -INFINITY;
      }
      /* Online softmax per row; the four lanes of a quad hold one row's KT scores. */
#pragma unroll
      for (int rb = 0; rb < RW; rb++)
#pragma unroll
        for (int j = 0; j < 2; j++) {
          float mx = -INFINITY;
#pragma unroll
          for (int nn = 0; nn < NT; nn++)
            mx = fmaxf(mx, fmaxf(s[rb][nn][2 * j], s[rb][nn][2 * j + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          float m_new = fmaxf(m[rb][j], mx * sl2);
          float mu = m_new == -INFINITY ? 0.0f : m_new; /* a row that saw nothing yet: exp2(-inf) = 0 */
          float corr = fast_exp2(m[rb][j] - mu);
          m[rb][j] = m_new;
          float rs = 0.0f;
#pragma unroll
          for (int nn = 0; nn < NT; nn++) {
            float p0 = fast_exp2(fmaf(s[rb][nn][2 * j], sl2, -mu)), p1 = fast_exp2(fmaf(s[rb][nn][2 * j + 1], sl2, -mu));
            s[rb][nn][2 * j] = p0;
            s[rb][nn][2 * j + 1] = p1;
            rs += p0 + p1;
          }
          l[rb][j] = l[rb][j] * corr + rs; /* this lane's part of the row sum; the quad is summed at the end */
#pragma unroll
          for (int dn = 0; dn < DN; dn++) {
            o[rb][dn][2 * j] *= corr;
            o[rb][dn][2 * j + 1] *= corr;
          }
        }
      /* O += P V: P's C fragments are the A fragments of the next MMA, 16 keys per k-step. */
#pragma unroll
      for (int kk = 0; kk < KT / 16; kk++) {
        uint32_t pa[RW][4];
#pragma unroll
        for (int rb = 0; rb < RW; rb++) {
          pa[rb][0] = pack_bf16(s[rb][2 * kk][0], s[rb][2 * kk][1]);
          pa[rb][1] = pack_bf16(s[rb][2 * kk][2], s[rb][2 * kk][3]);
          pa[rb][2] = pack_bf16(s[rb][2 * kk + 1][0], s[rb][2 * kk + 1][1]);
          pa[rb][3] = pack_bf16(s[rb][2 * kk + 1][2], s[rb][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dn = 0; dn < DN; dn += 2) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, vst + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dn * 8 + (lane >> 4) * 8);
#pragma unroll
          for (int rb = 0; rb < RW; rb++) {
            mma_bf16(o[rb][dn], pa[rb], b[0], b[1]);
            mma_bf16(o[rb][dn + 1], pa[rb], b[2], b[3]);
          }
        }
      }
    }
    __syncthreads(); /* a later iteration's loads overwrite this stage */
  }
  cp_async_wait<0>(); /* no copy may still be writing when the block exits */

  const int cap = gridDim.x * ROWS;
#pragma unroll
  for (int rb = 0; rb < RW; rb++)
#pragma unroll
    for (int j = 0; j < 2; j++) {
      float lj = l[rb][j];
      lj += __shfl_xor_sync(0xffffffffu, lj, 1);
      lj += __shfl_xor_sync(0xffffffffu, lj, 2);
      if (row_of(rb, j) >= rows) continue;
      if (a.n_splits == 1) {
        float inv = lj > 0.0f ? 1.0f / lj : 0.0f; /* a query that sees nothing gets zeros */
        T *out = (T *)a.out + ((size_t)(sq.row0 + tok_of(rb, j)) * a.n_heads + head_of(rb, j)) * D + qlane * 2;
#pragma unroll
        for (int dn = 0; dn < DN; dn++)
          store_pair(out + dn * 8, o[rb][dn][2 * j] * inv, o[rb][dn][2 * j + 1] * inv);
      } else {
        size_t prow = ((size_t)blockIdx.z * cap + row_of(rb, j)) * a.n_splits + split;
        float *ml = a.workspace + 2 * prow;
        float *acc = a.workspace + 2 * (size_t)gridDim.z * cap * a.n_splits + prow * D + qlane * 2;
        if (qlane == 0) ml[0] = m[rb][j], ml[1] = lj;
#pragma unroll
        for (int dn = 0; dn < DN; dn++)
          store_pair(acc + dn * 8, o[rb][dn][2 * j], o[rb][dn][2 * j + 1]);
      }
    }
}

/* ---- the exact merge of the splits' partial states ------------------------------------------- */

/* Block (row, sequence x KV head), D / 2 threads of two columns each. */
template <typename T, int D> __global__ void merge_kernel(cn_cuda_tree_attn_args a, int cap) {
  const int r = blockIdx.x, g = blockIdx.y % a.n_kv_heads;
  const cn_cuda_tree_seq sq = a.seqs[blockIdx.y / a.n_kv_heads];
  const int G = a.n_heads / a.n_kv_heads;
  if (r >= sq.n * G) return;
  const int used = split_of(sq, a.n_splits).n_used;
  const size_t base = ((size_t)blockIdx.y * cap + r) * a.n_splits;
  const float *ml = a.workspace + 2 * base;
  const float *acc = a.workspace + 2 * (size_t)gridDim.y * cap * a.n_splits + base * D + threadIdx.x * 2;
  float mx = -INFINITY;
  for (int s = 0; s < used; s++)
    mx = fmaxf(mx, ml[2 * s]);
  float den = 0.0f, x = 0.0f, y = 0.0f;
  for (int s = 0; s < used; s++) {
    if (ml[2 * s] == -INFINITY) continue; /* saw nothing: its accumulator is zeros, its weight 0 */
    float w = exp2f(ml[2 * s] - mx);
    den += w * ml[2 * s + 1];
    float2 v = *reinterpret_cast<const float2 *>(acc + (size_t)s * D);
    x += w * v.x;
    y += w * v.y;
  }
  float inv = den > 0.0f ? 1.0f / den : 0.0f;
  T *out = (T *)a.out + ((size_t)(sq.row0 + r / G) * a.n_heads + g * G + r % G) * D + threadIdx.x * 2;
  store_pair(out, x * inv, y * inv);
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

int cn_cuda_tree_attn_splits(const cn_cuda_ctx *ctx, int n_seqs, int max_n, int max_keys, int n_heads, int n_kv_heads,
                             int head_dim) {
  if (!ctx || n_seqs <= 0 || max_n <= 0 || n_kv_heads <= 0 || n_heads < n_kv_heads) return 1;
  int per_sm = 0;
  int group = n_heads / n_kv_heads;
  bool wide = wide_rows(max_n, group);
  int st = head_dim == 64 ? (wide ? prepare<cn_bf16_t, 64, 2>(&per_sm) : prepare<cn_bf16_t, 64, 1>(&per_sm))
                          : (wide ? prepare<cn_bf16_t, 128, 2>(&per_sm) : prepare<cn_bf16_t, 128, 1>(&per_sm));
  if (st || per_sm < 1) per_sm = 1;
  long base = (long)n_seqs * n_kv_heads * (rows_cap(max_n, group) / (wide ? 128 : 64));
  /* As many splits as fill every resident block slot once: one wave, no tail (measured on the
   * H100: 50 splits of 8 blocks, 1.5 waves, ran a 32k decode at 53% of the copy bandwidth). Each
   * split keeps at least 128 keys, so that the partial states stay small beside them. */
  long want = (long)per_sm * ctx->n_sm / base, most = max_keys / 128;
  if (want > most) want = most;
  if (want > 256) want = 256;
  return want < 1 ? 1 : (int)want;
}

size_t cn_cuda_tree_attn_workspace(int n_seqs, int max_n, int n_splits, int n_heads, int n_kv_heads, int head_dim) {
  if (n_splits <= 1 || n_seqs <= 0 || max_n <= 0 || n_kv_heads <= 0) return 0;
  return sizeof(float) * (size_t)n_seqs * n_kv_heads * rows_cap(max_n, n_heads / n_kv_heads) * n_splits *
         (size_t)(head_dim + 2);
}

template <typename T, int D, int RW> static int launch(cn_cuda_ctx *ctx, const cn_cuda_tree_attn_args *a) {
  int group = a->n_heads / a->n_kv_heads, cap = rows_cap(a->max_n, group);
  size_t smem = smem_bytes<D, RW>();
  int st = prepare<T, D, RW>(NULL);
  if (st) return st;
  dim3 grid(cap / (64 * RW), a->n_splits, a->n_seqs * a->n_kv_heads);
  tree_attn_kernel<T, D, RW, kt_of<D, RW>()><<<grid, TA_THREADS, smem, ctx->stream>>>(*a);
  CN_CUDA_CHECK_LAUNCH();
  if (a->n_splits > 1) {
    merge_kernel<T, D><<<dim3(cap, a->n_seqs * a->n_kv_heads), D / 2, 0, ctx->stream>>>(*a, cap);
    CN_CUDA_CHECK_LAUNCH();
  }
  return CANOPY_OK;
}

int cn_cuda_tree_attention(cn_cuda_ctx *ctx, const cn_cuda_tree_attn_args *a) {
  CN_CUDA_ENTER(ctx);
  if (!a) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_tree_attention: NULL args");
  if (a->n_seqs < 0 || a->max_n < 0 || a->n_splits < 1 || a->n_heads <= 0 || a->n_kv_heads <= 0 ||
      a->n_heads % a->n_kv_heads || a->block_size <= 0 || a->n_seqs * a->n_kv_heads > 65535 || a->n_splits > 65535)
    return cn_error(CANOPY_ERR_INVALID_ARG,
                    "cn_cuda_tree_attention: n_seqs=%d max_n=%d n_splits=%d n_heads=%d n_kv_heads=%d block_size=%d",
                    a->n_seqs, a->max_n, a->n_splits, a->n_heads, a->n_kv_heads, a->block_size);
  if (!cn_cuda_tree_attn_supported(a->head_dim))
    return cn_error(CANOPY_ERR_UNSUPPORTED, "cn_cuda_tree_attention: head_dim %d (64 or 128)", a->head_dim);
  if (!cn_dtype_ok(a->dt)) return cn_error(CANOPY_ERR_DTYPE, "cn_cuda_tree_attention: unknown dtype %d", (int)a->dt);
  if (!a->n_seqs || !a->max_n) return CANOPY_OK;
  if (!a->seqs || !a->q || !a->out || !a->k || !a->v || !a->block_tables || !a->pos || (a->n_splits > 1 && !a->workspace))
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_tree_attention: a NULL device array (seqs, q, out, k, v, "
                                           "block_tables, pos, or the workspace of %d splits)",
                    a->n_splits);
  return cn_dispatch(a->dt, [&](auto t) {
    using T = decltype(t);
    bool wide = wide_rows(a->max_n, a->n_heads / a->n_kv_heads);
    if (a->head_dim == 64) return wide ? launch<T, 64, 2>(ctx, a) : launch<T, 64, 1>(ctx, a);
    return wide ? launch<T, 128, 2>(ctx, a) : launch<T, 128, 1>(ctx, a);
  });
}
