/* Shared-prefix tree attention with Hopper warpgroup MMA (sm_90a): the same contract, grid, key
 * split, mask, softmax and merge as tree_attention.cu (which runs on any sm_80+ device and is
 * the fallback), with the two products issued as wgmma instead of mma.sync.
 *
 * Why: once a KV head has 64+ query rows (trees of 16+ nodes at GQA 4), the mma.sync kernel is
 * bound by its instruction stream, not by memory: every 16-row block re-reads each K and V
 * fragment from shared memory through ldmatrix into registers, and the tensor pipe of mma.sync
 * runs at a fraction of Hopper's. wgmma m64 reads B straight from shared memory once for 64 rows,
 * at the full tensor rate. Measured on the H100 (bench/RESULTS.md, 2026-11-23).
 *
 * Block = one warpgroup (4 warps), RW x 64 query rows; instruction rb covers rows rb 64 .. rb 64 +
 * 63 of the tile, warp w of it rows 16 w .. 16 w + 15 (so a thread holds rows of the same m16n8
 * layout as the mma.sync kernel and the shared softmax and epilogue apply unchanged).
 *  - S = Q K^T: m64nKTk16 over head_dim / 16 steps, Q and K both from shared memory, K-major;
 *  - O += P V: m64nDk16 over KT / 16 steps, P from registers (the S accumulators rounded to bf16
 *    are exactly wgmma's A fragments), V from shared memory MN-major (the tile as stored).
 * Shared tiles use the 128-byte swizzle: each tile is head_dim / 64 panels of [rows][64] bf16,
 * 128 bytes a row, the 16-byte piece c of row r stored at piece c ^ (r % 8). The cp.async writes
 * and Q's plain stores are made visible to the tensor cores' async proxy by fence.proxy.async
 * before the barrier that precedes the MMAs. */
#include "kernels/cuda/tree_attention.cuh"

#include <type_traits>

/* The 128-byte-swizzle layout and wgmma exist on sm_90a only; the portable PTX pass compiles the
 * kernel as a stub the host never launches there (it runs the mma.sync kernel off sm_90). */
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TA_HAVE_WGMMA 1
#else
#define TA_HAVE_WGMMA 0
#endif

#define WG_KT 64 /* keys per tile (wgmma_ss_n64) */

template <int RW> constexpr int wg_stages() {
  return RW == 1 ? 3 : 2;
} /* Q + stages within 2 blocks a multiprocessor */

/* Bytes of shared memory: Q (RW 64 rows), then per stage K and V (WG_KT rows), all D / 64 panels
 * of 128-byte rows; plus up to 1 KB to align the start to the swizzle's 1024-byte period. */
template <int D, int RW> constexpr int wg_smem() { return (RW * 64 + wg_stages<RW>() * 2 * WG_KT) * D * 2 + 1024; }

/* The warp-specialised form (below): Q of 128 rows, WS_STAGES stages, their full and empty mbarriers. */
#define WS_STAGES 6
#define WS_PRODUCER_REGS 56 /* 128-key tiles: registers a thread, setmaxnreg (128 x 56 + 256 x 224 <= 64K) */
#define WS_CONSUMER_REGS 224
template <int D> constexpr int ws_smem() { return (128 + WS_STAGES * 2 * WG_KT) * D * 2 + 1024 + 2 * WS_STAGES * 8; }

#if TA_HAVE_WGMMA
/* The generated operand lists of the four wgmma shapes the kernel uses (d holds the m16n8
 * accumulator fragments of this warp's 16 rows, n / 8 of them):
 *  - wgmma_ss_n64: d (+)= A B, m64n64k16 (64 keys a tile), A and B from shared memory
 *    (descriptors), d = A B when !acc; wgmma_ss_n32 the same for 32 keys (half a tile);
 *  - wgmma_rs_nN_tb: d += A B, m64nNk16, A (this warp's 16 rows) from registers, B from shared
 *    memory stored MN-major (transposed: the V tile is key-major with N = head_dim contiguous). */
/* The accumulator operands of 4 n8 blocks (16 registers) starting at block b, and of 8. */
#define WG_ACC4(d, b)                                                                                                  \
  "+f"(d[b][0]), "+f"(d[b][1]), "+f"(d[b][2]), "+f"(d[b][3]), "+f"(d[b + 1][0]), "+f"(d[b + 1][1]), "+f"(d[b + 1][2]), \
      "+f"(d[b + 1][3]), "+f"(d[b + 2][0]), "+f"(d[b + 2][1]), "+f"(d[b + 2][2]), "+f"(d[b + 2][3]),                   \
      "+f"(d[b + 3][0]), "+f"(d[b + 3][1]), "+f"(d[b + 3][2]), "+f"(d[b + 3][3])
#define WG_ACC8(d, b) WG_ACC4(d, b), WG_ACC4(d, b + 4)
#define WG_REGS16 "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15"
#define WG_REGS32 WG_REGS16 ",%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"
#define WG_REGS64                                                                                                      \
  WG_REGS32                                                                                                            \
      ",%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,"      \
      "%58,%59,%60,%61,%62,%63"

__device__ __forceinline__ void wgmma_ss_n64(float (&d)[8][4], uint64_t da, uint64_t db, int acc) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {" WG_REGS32 "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
               : WG_ACC8(d, 0)
               : "l"(da), "l"(db), "r"(acc));
}
__device__ __forceinline__ void wgmma_ss_n32(float (&d)[4][4], uint64_t da, uint64_t db, int acc) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {" WG_REGS16 "}, %16, %17, p, 1, 1, 0, 0;\n}\n"
               : WG_ACC4(d, 0)
               : "l"(da), "l"(db), "r"(acc));
}
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[16][4], uint64_t da, uint64_t db, int acc) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" WG_REGS64 "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
               : WG_ACC8(d, 0), WG_ACC8(d, 8)
               : "l"(da), "l"(db), "r"(acc));
}
__device__ __forceinline__ void wgmma_rs_n64_tb(float (&d)[8][4], const uint32_t (&a)[4], uint64_t db) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {" WG_REGS32
               "}, {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n"
               : WG_ACC8(d, 0)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
__device__ __forceinline__ void wgmma_rs_n128_tb(float (&d)[16][4], const uint32_t (&a)[4], uint64_t db) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" WG_REGS64
               "}, {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n"
               : WG_ACC8(d, 0), WG_ACC8(d, 8)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
/* Waits until at most N of this warpgroup's committed groups are still running. */
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
template <int R> struct ta_rows { static constexpr int value = R; }; /* a row block as a type */
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

/* Pins accumulator registers after a wait: uses of them cannot be scheduled before it. */
template <int N> __device__ __forceinline__ void pin(float (&d)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; i++)
#pragma unroll
    for (int e = 0; e < 4; e++)
      asm volatile("" : "+f"(d[i][e])::"memory");
}

/* A shared-memory matrix descriptor, 128-byte swizzle: start, leading and stride byte offsets. */
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | (uint64_t)((lbo & 0x3FFFF) >> 4) << 16 |
         (uint64_t)((sbo & 0x3FFFF) >> 4) << 32 | 1ull << 62;
}

/* A descriptor moved by `bytes` (a multiple of 16) in shared memory: the start address / 16 is
 * its low 14 bits and no shared address carries out of them, so a 32-bit add does it (one
 * instruction instead of rebuilding the descriptor for every wgmma). */
__device__ __forceinline__ uint64_t desc_add(uint64_t d, uint32_t bytes) {
  return (d & 0xFFFFFFFF00000000ull) | (uint32_t)((uint32_t)d + (bytes >> 4));
}

/* Byte offset of 16-byte piece c (8 columns) of row r in a swizzled tile of R rows. */
template <int R> __device__ __forceinline__ uint32_t sw128_at(int r, int c) {
  return (uint32_t)((c / 8) * R * 128 + r * 128 + (((c % 8) ^ (r % 8)) << 4));
}

template <int D> __device__ __forceinline__ void wgmma_o(float (&d)[D / 8][4], const uint32_t (&a)[4], uint64_t db) {
  if constexpr (D == 128)
    wgmma_rs_n128_tb(d, a, db);
  else
    wgmma_rs_n64_tb(d, a, db);
}

/* S = Q K^T of one 64-row block, issued (async) as a commit group of its own: the block's Q tile
 * lies q_off bytes past q_desc, kd is the stage's K tile (KT keys) at the warpgroup's first key;
 * NT 8-key blocks of it (all of them, or half a 64-key tile for the key split). */
template <int D, int NT, int KT = WG_KT>
__device__ __forceinline__ void wg_issue_s(float (&s)[NT][4], uint64_t q_desc, uint32_t q_off, uint64_t kd) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; kk++) {
    const uint32_t panel = (kk / 4) * 8192u + (kk % 4) * 32u; /* 64 rows x 128 bytes a Q panel */
    const uint64_t qdk = desc_add(q_desc, q_off + panel), kdk = desc_add(kd, (kk / 4) * KT * 128 + (kk % 4) * 32);
    if constexpr (NT == 16)
      wgmma_ss_n128(s, qdk, kdk, kk > 0);
    else if constexpr (NT == 8)
      wgmma_ss_n64(s, qdk, kdk, kk > 0);
    else
      wgmma_ss_n32(s, qdk, kdk, kk > 0);
  }
  wgmma_commit();
}

/* O += P V of one 64-row block, issued (async) as a commit group of its own: the stage's V tile at
 * the warpgroup's first key lies v_off bytes past v_desc. */
template <int D, int NT>
__device__ __forceinline__ void wg_issue_o(float (&o)[D / 8][4], const uint32_t (&pa)[NT / 2][4], uint64_t v_desc,
                                           uint32_t v_off) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < NT / 2; kk++)
    wgmma_o<D>(o, pa[kk], desc_add(v_desc, v_off + kk * 16 * 128));
  wgmma_commit();
}

/* Q rows of the tile as bf16 into the swizzled Q tile; padding rows are zeros. NTH threads take
 * part, this one as thread `t` of them. */
template <typename T, int D, int ROWS, int NTH>
__device__ __forceinline__ void load_q(const cn_cuda_tree_attn_args &a, const ta_block &b, uint32_t qs, int t) {
  constexpr int CH = D / 8;
  for (int c = t; c < ROWS * CH; c += NTH) {
    const int rl = c / CH, piece = c % CH, r = b.row0 + rl;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < b.rows) {
      const T *src = (const T *)a.q + ((size_t)(b.sq.row0 + ta_tok(b, r)) * a.n_heads + ta_head(b, r)) * D + piece * 8;
      if constexpr (sizeof(T) == 2)
        v = *reinterpret_cast<const uint4 *>(src);
      else
        v.x = load_pair(src), v.y = load_pair(src + 2), v.z = load_pair(src + 4), v.w = load_pair(src + 6);
    }
    /* Instruction rb's 64 rows form their own tile of D / 64 panels. */
    uint32_t at = qs + (rl / 64) * 64 * D * 2 + sw128_at<64>(rl % 64, piece);
    asm volatile("st.shared.v4.b32 [%0], {%1,%2,%3,%4};\n" ::"r"(at), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
  }
}

/* The key split's end (KS below): warpgroup 1 leaves its online-softmax state (a thread's
 * accumulators, row maxima and partial row sums) in the free stage memory `buf`, warpgroup 0
 * merges it into its own, as the merge kernel merges splits, and finishes the block; true for
 * warpgroup 0. The pipeline's reads of that memory are over at the first barrier (each warpgroup
 * waited for its products). A thread's value e goes to buf[e][thread]: conflict-free. */
template <int DN>
__device__ __forceinline__ bool ta_merge_halves(unsigned char *buf, float (&o)[DN][4], float (&m)[2], float (&l)[2]) {
  float *x = reinterpret_cast<float *>(buf);
  const int t = threadIdx.x % TA_THREADS;
  const bool first = threadIdx.x < TA_THREADS;
  __syncthreads();
  if (!first) {
#pragma unroll
    for (int dn = 0; dn < DN; dn++)
#pragma unroll
      for (int e = 0; e < 4; e++)
        x[(dn * 4 + e) * TA_THREADS + t] = o[dn][e];
#pragma unroll
    for (int j = 0; j < 2; j++)
      x[(DN * 4 + j) * TA_THREADS + t] = m[j], x[(DN * 4 + 2 + j) * TA_THREADS + t] = l[j];
  }
  __syncthreads();
  if (!first) {
    cn_pdl_trigger(); /* as ta_finish does for the threads that finish */
    return false;
  }
#pragma unroll
  for (int j = 0; j < 2; j++) {
    const float m1 = x[(DN * 4 + j) * TA_THREADS + t], l1 = x[(DN * 4 + 2 + j) * TA_THREADS + t];
    const float mx = fmaxf(m[j], m1), mu = mx == -INFINITY ? 0.0f : mx; /* both empty: factors 0 */
    const float f0 = fast_exp2(m[j] - mu), f1 = fast_exp2(m1 - mu);
    m[j] = mx, l[j] = l[j] * f0 + l1 * f1;
#pragma unroll
    for (int dn = 0; dn < DN; dn++)
#pragma unroll
      for (int e = 2 * j; e < 2 * j + 2; e++)
        o[dn][e] = o[dn][e] * f0 + x[(dn * 4 + e) * TA_THREADS + t] * f1;
  }
  return true;
}

/* WG warpgroups a block, 1 or 2. With two (cn_cuda_set_ta_two_wg, cn_cuda_set_ta_key_split) the
 * multiprocessor has twice the warps to hide the softmax's latency with, on the same shared memory
 * (Q and the K/V stages are shared by both), and a thread holds one row block's state (at most 128
 * registers, for two blocks a multiprocessor):
 *  - RW = 2 (row split): warpgroup w alone takes row block w (ptxas: 128 registers with 32/20
 *    bytes of spill at d = 128, 120 and none at 64). A row's arithmetic is the one-warpgroup
 *    kernel's, so are its bits.
 *  - RW = 1 (key split, KS): both take the tile's 64 rows, warpgroup w keys 32 w .. 32 w + 31 of
 *    every tile (S is m64n32, O's product 2 k-steps), each with its own online-softmax state, and
 *    warpgroup 1 hands its state to warpgroup 0 through shared memory at the end, which merges
 *    the two as the merge kernel merges splits. A row's bits then differ from the one-warpgroup
 *    kernel's (another order of sums), but not with the rows beside it.
 * RT: the row blocks a thread takes (a template parameter: as a local constant in the kernel it
 * made CUDA 13.0's cicc crash). */
template <typename T, int D, int RW, int WG, int RT = (WG > RW ? 1 : RW / WG)>
__global__ void __launch_bounds__(TA_THREADS *WG, 2) tree_attn_wgmma_kernel(cn_cuda_tree_attn_args a) {
  static_assert(WG == 1 || (WG == 2 && RW <= 2), "two warpgroups split a tile's rows (RW 2) or keys (RW 1)");
  if (!a.prefix_ready) cn_pdl_wait(); /* launched early (cn_launch); else in ta_prologue */
  constexpr bool KS = WG > RW;
  constexpr int KT = WG_KT, KH = KS ? KT / WG : KT; /* keys a tile; of them, a warpgroup's */
  constexpr int DN = D / 8, NT = KH / 8, ROWS = 64 * RW, STAGES = wg_stages<RW>();
  constexpr int NTH = TA_THREADS * WG;
  constexpr int TILE = KT * D * 2; /* bytes of one K or V tile */
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw), qs = (raw + 1023) & ~1023u; /* Q, then [STAGES][K, V] */
  auto ks = [&](int st) { return qs + ROWS * D * 2 + st * 2 * TILE; };
  auto vs = [&](int st) { return ks(st) + TILE; };

  ta_block b;
  if (!ta_block_init<ROWS>(a, b)) return;
  /* This thread's warp in its warpgroup, its warpgroup, its first row block, and the first of its
   * keys in a tile (compile-time 0 with one warpgroup: that kernel compiles as it did before the
   * options). */
  const int warp = threadIdx.x / 32 % 4, wg = WG == 1 ? 0 : threadIdx.x / TA_THREADS;
  const int rb0 = KS ? 0 : wg * RT, kw = KS ? wg * KH : 0;
  int base[RT];
#pragma unroll
  for (int rt = 0; rt < RT; rt++)
    base[rt] = b.row0 + (rb0 + rt) * 64 + warp * 16;
  const int n_tiles = b.k_end > b.k_begin ? (b.k_end - b.k_begin + KT - 1) / KT : 0;

  auto find = [&](int kt) { return ta_tile_find<D, KT, NTH>(a, b, kt); };
  auto copy = [&](const ta_tile_src<D, KT, NTH> &src, int st) {
    ta_tile_copy<D, KT, NTH>(a, b, src, ks(st), vs(st), [](int key, int piece) { return sw128_at<KT>(key, piece); });
  };
  /* The tile this thread waited for, made visible to the tensor cores and to the other threads. */
  auto tile_ready = [&]() {
    fence_proxy_async(); /* this thread's cp.async (and Q) writes, seen by the tensor cores */
    __syncthreads();
  };
  /* The operands' descriptors at stage 0 (a stage is a fixed distance further). This warpgroup's
   * keys start kw rows into the K and V tiles: a multiple of 8 rows, the swizzle's period. */
  const uint64_t q_desc = sw128_desc(qs, 16, 1024), k_desc = sw128_desc(ks(0) + kw * 128, 16, 1024),
                 v_desc = sw128_desc(vs(0) + kw * 128, KT * 128, 1024);
  /* S = Q K^T of this thread's row block rt from stage st, issued (async) as a commit group of its
   * own. */
  auto issue_s = [&](int st, int rt, float(&s)[NT][4]) {
    wg_issue_s<D, NT>(s, q_desc, (rb0 + rt) * 64 * D * 2, desc_add(k_desc, st * 2 * TILE));
  };

  const float sl2 = a.scale * TA_LOG2E;
  float o[RT][DN][4], m[RT][2], l[RT][2];
  ta_state_init(o, m, l);
  /* O += P V of row block rt from stage st, issued (async) as a commit group of its own. */
  auto issue_o = [&](int st, int rt, const uint32_t(&pa)[NT / 2][4]) {
    pin(o[rt]);
    wg_issue_o<D, NT>(o[rt], pa, v_desc, st * 2 * TILE);
  };
  /* Row block RB of a tile whose S products are all issued, as are the O products of the blocks
   * before it: wait for its S (at most RT - 1 later groups may still run: the other blocks' S and
   * O), mask, softmax, and issue its O. With two row blocks, block 0's softmax runs while the
   * tensor cores compute block 1's S, and block 1's while they compute block 0's O: a block's
   * registers are untouched while another's products are in flight. On the H200 that measured
   * 0-1.6% faster at 64-128 nodes than all of a tile's rows at once, with fewer registers spilled
   * (bench/RESULTS.md, 2026-12-06): the two blocks a multiprocessor already overlapped most of it. */
  auto rows = [&](auto rbc, int st, int kt, float(&s)[RT][NT][4]) {
    constexpr int RB = decltype(rbc)::value;
    wgmma_wait<RT - 1>();
    pin(s[RB]);
    ta_mask<RT, NT, RB, RB + 1>(a, b, base, kt + kw, s);
    ta_softmax<RT, NT, DN, RB, RB + 1>(s, m, l, o, sl2);
    uint32_t pa[RT][NT / 2][4];
    ta_pack_p<RT, NT, RB, RB + 1>(s, pa);
    issue_o(st, RB, pa[RB]);
  };

  ta_prologue<STAGES, KT>(a, b, n_tiles, find, copy);
  load_q<T, D, ROWS, NTH>(a, b, qs, threadIdx.x); /* while the first tiles are on their way */
  for (int it = 0; it < n_tiles; it++) {
    const int kt = b.k_begin + it * KT, ahead = it + STAGES - 1, st = it % STAGES;
    ta_tile_src<D, KT, NTH> next; /* its table lookups travel while this tile's copies land */
    if (ahead < n_tiles) next = find(b.k_begin + ahead * KT);
    cp_async_wait<STAGES - 2>();
    tile_ready(); /* also: every thread is past the iteration that last read stage `ahead` */
    float s[RT][NT][4];
#pragma unroll
    for (int rt = 0; rt < RT; rt++)
      issue_s(st, rt, s[rt]);
    /* The copies of a later tile are issued while the tensor cores work on this one. */
    if (ahead < n_tiles) copy(next, ahead % STAGES);
    cp_async_commit();
    rows(ta_rows<0>{}, st, kt, s);
    if constexpr (RT == 2) rows(ta_rows<1>{}, st, kt, s);
    /* No barrier here: the next iteration's tile_ready() is the one that lets its copies into
     * this stage, after every warpgroup's wait below. */
    wgmma_wait<0>();
#pragma unroll
    for (int rt = 0; rt < RT; rt++)
      pin(o[rt]);
  }
  cp_async_wait<0>();
  if constexpr (KS) {
    if (!ta_merge_halves<DN>(smem_raw + (ks(0) - raw), o[0], m[0], l[0])) return;
  }
  ta_finish<T, RT, DN>(a, b, base, gridDim.x * ROWS, o, m, l);
}

/* ---- the warp-specialised form (cn_cuda_set_ta_ws) --------------------------------------------
 * 128-row tiles, one block a multiprocessor: warpgroup 0 copies K/V tiles into stages
 * and warpgroups 1 and 2 compute (row block 0 and 1), each on its own schedule. A stage is handed
 * over by two mbarriers instead of the block barrier the kernel above takes every tile:
 *  - full[s]: the producer's 128 threads arrive through cp.async.mbarrier.arrive.noinc, so the
 *    phase completes when every copy into the stage has landed;
 *  - empty[s]: each consumer warp's lane 0 arrives once its warpgroup's products reading the stage
 *    are complete (8 arrivals).
 * Why: with the barrier, every warp of a block waits each tile for the slowest, so the softmax of
 * one warpgroup seldom overlaps the products of the other; the H100 ran 256-row tiles of four
 * warpgroups in lockstep 4-8% slower than two blocks of two (bench/RESULTS.md, 2026-12-06). Here
 * the copies run up to all but one stage ahead and the consumers drift apart freely. */
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
/* Arrives on bar when all of this thread's earlier cp.async copies have landed. */
__device__ __forceinline__ void mbar_arrive_cp_async(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
/* Waits until the phase of the given parity has completed. */
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
  asm volatile("{\n.reg .pred p;\nWAIT_%=:\n"
               "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
               "@!p bra WAIT_%=;\n}\n" ::"r"(bar),
               "r"(parity)
               : "memory");
}

/* KT keys a tile, 64 or 128 (cn_cuda_set_ta_ws's mode 3 or 4): 128-key tiles come in half as many
 * stages (the same shared memory), for half the waits, barrier arrivals, row maxima and rescales a
 * key, and 64 more registers of scores a consumer thread (setmaxnreg below moves them from the
 * producer). */
template <typename T, int D, int KT>
__global__ void __launch_bounds__(3 * TA_THREADS, 1) tree_attn_ws_kernel(cn_cuda_tree_attn_args a) {
  static_assert(KT == WG_KT || KT == 2 * WG_KT, "tiles of 64 or 128 keys");
  constexpr int STAGES = WS_STAGES * WG_KT / KT, HALVES = KT / WG_KT;
  if (!a.prefix_ready) cn_pdl_wait(); /* else the producer's copies of the new keys and Q wait below */
  constexpr int DN = D / 8, NT = KT / 8, ROWS = 128, TILE = KT * D * 2;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw), qs = (raw + 1023) & ~1023u; /* Q, [STAGES][K, V], barriers */
  auto ks = [&](int st) { return qs + ROWS * D * 2 + st * 2 * TILE; };
  auto vs = [&](int st) { return ks(st) + TILE; };
  const uint32_t full = ks(STAGES), empty = full + STAGES * 8;

  ta_block b;
  if (!ta_block_init<ROWS>(a, b)) return;
  const int wg = threadIdx.x / TA_THREADS, warp = threadIdx.x / 32 % 4;
  const int n_tiles = b.k_end > b.k_begin ? (b.k_end - b.k_begin + KT - 1) / KT : 0;
  if (threadIdx.x == 0)
    for (int st = 0; st < STAGES; st++)
      mbar_init(full + st * 8, TA_THREADS), mbar_init(empty + st * 8, 8);
  __syncthreads(); /* the initialised barriers, seen by every thread */

  if (wg == 0) { /* the producer: tile i into stage i % STAGES once its last reader is done */
    /* The registers the consumers of 128-key tiles need (FlashAttention-3's split of the file). */
    if constexpr (KT > WG_KT) asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(WS_PRODUCER_REGS));
    /* With a.prefix_ready, tiles wholly in the committed prefix are copied before the wait for the
     * kernel before this one, as ta_prologue does for the kernel above (its table lookups may be
     * made before it in any case). A tile is copied in parts of 64 keys: each part's lookups take
     * a register a key and thread, and the producer keeps the lookups of two parts in flight. */
    bool waited = !a.prefix_ready;
    const int n_parts = n_tiles * HALVES;
    ta_tile_src<D, WG_KT> src;
    if (n_parts > 0) src = ta_tile_find<D, WG_KT>(a, b, b.k_begin);
    for (int j = 0; j < n_parts; j++) {
      const int it = j / HALVES, h = j % HALVES, st = it % STAGES;
      ta_tile_src<D, WG_KT> next; /* the next part's lookups travel while this one's wait and copies run */
      if (j + 1 < n_parts) next = ta_tile_find<D, WG_KT>(a, b, b.k_begin + (j + 1) * WG_KT);
      if (!waited && !ta_committed(b, b.k_begin + (j + 1) * WG_KT)) cn_pdl_wait(), waited = true;
      if (h == 0 && it >= STAGES) mbar_wait(empty + st * 8, (it / STAGES - 1) & 1);
      ta_tile_copy<D, WG_KT>(a, b, src, ks(st), vs(st),
                             [h](int key, int piece) { return sw128_at<KT>(key + h * WG_KT, piece); });
      if (h == HALVES - 1) mbar_arrive_cp_async(full + st * 8);
      src = next;
    }
    cp_async_wait<0>(); /* no copy outlives the block */
    cn_pdl_trigger();
    return;
  }

  if constexpr (KT > WG_KT) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(WS_CONSUMER_REGS));
  if (a.prefix_ready) cn_pdl_wait(); /* Q is the kernel before's */
  load_q<T, D, ROWS, 2 * TA_THREADS>(a, b, qs, threadIdx.x - TA_THREADS);
  fence_proxy_async();
  asm volatile("bar.sync 3, 256;\n" ::: "memory"); /* Q, seen by both consumers */
  const int rb = wg - 1; /* this consumer's row block */
  int base[1] = {b.row0 + rb * 64 + warp * 16};
  const uint64_t q_desc = sw128_desc(qs + rb * 64 * D * 2, 16, 1024), k_desc = sw128_desc(ks(0), 16, 1024),
                 v_desc = sw128_desc(vs(0), KT * 128, 1024);
  const float sl2 = a.scale * TA_LOG2E;
  float o[1][DN][4], m[1][2], l[1][2];
  ta_state_init(o, m, l);
  /* S = Q K^T of the tile in stage st; O += P V likewise. (No pin of o in issue_o: with the overlap
   * the S products are in flight, and ptxas serialises every wgmma once another instruction
   * touches an accumulator inside a pipeline stage.) */
  auto issue_s = [&](int st, float(&s)[NT][4]) {
    wg_issue_s<D, NT, KT>(s, q_desc, 0, desc_add(k_desc, st * 2 * TILE));
  };
  auto issue_o = [&](int st, const uint32_t(&pa)[NT / 2][4]) { wg_issue_o<D, NT>(o[0], pa, v_desc, st * 2 * TILE); };
  auto full_wait = [&](int it) {
    mbar_wait(full + it % STAGES * 8, (it / STAGES) & 1);
    fence_proxy_async(); /* the producer's generic-proxy copies, ordered before this thread's wgmma reads */
  };
  auto release = [&](int it) { /* this warp's reads of the tile's stage are done */
    __syncwarp();
    if (threadIdx.x % 32 == 0) mbar_arrive(empty + it % STAGES * 8);
  };
  float s[1][NT][4];
  uint32_t pa[1][NT / 2][4];
  /* Tile it's S is computed while tile it - 1's P V is (FlashAttention-3's overlap within a
   * warpgroup): the softmax of it waits only for its own S; O is rescaled after P V is done. And
   * ping-pong (FlashAttention-3's scheduling of two warpgroups): a consumer issues a round of
   * products (S of a tile and P V of the one before) only after the other has issued its round, so
   * one's softmax runs under the other's products instead of both at once. Named barrier 1 + c is
   * consumer c's turn: it waits there with the 128 arrivals of the other. The second consumer lets
   * the first go first, and skips its last arrival (nobody waits for it). The two together ran
   * 2-3% faster on the H100 than neither at 64 nodes, the overlap alone 0-1.3% slower
   * (bench/RESULTS.md, 2026-12-06, sixteenth session); those two forms were removed. */
  const int cw = wg - 1, rounds = n_tiles + 1;
  int round = 0;
  auto turn_begin = [&]() { asm volatile("bar.sync %0, 256;\n" ::"r"(1 + cw) : "memory"); };
  auto turn_end = [&]() {
    if (cw == 0 || round + 1 < rounds) asm volatile("bar.arrive %0, 256;\n" ::"r"(2 - cw) : "memory");
    round++;
  };
  if (cw == 1 && n_tiles > 0) asm volatile("bar.arrive 1, 256;\n" ::: "memory");
  if (n_tiles > 0) { /* the first tile has no P V before it */
    full_wait(0);
    turn_begin();
    issue_s(0, s[0]);
    turn_end();
    wgmma_wait<0>();
    pin(s[0]);
    ta_mask<1, NT>(a, b, base, b.k_begin, s);
    ta_softmax<1, NT, DN>(s, m, l, o, sl2);
    ta_pack_p<1, NT>(s, pa);
  }
  for (int it = 1; it < n_tiles; it++) {
    full_wait(it);
    turn_begin();
    issue_s(it % STAGES, s[0]);
    issue_o((it - 1) % STAGES, pa[0]);
    turn_end();
    wgmma_wait<1>(); /* S done; P V may still run */
    pin(s[0]);
    ta_mask<1, NT>(a, b, base, b.k_begin + it * KT, s);
    float corr[1][2];
    const bool grew = ta_softmax_p<1, NT>(s, m, l, corr, sl2);
    wgmma_wait<0>();
    pin(o[0]);
    release(it - 1);
    if (grew) ta_rescale<1, DN>(o, corr);
    ta_pack_p<1, NT>(s, pa);
  }
  if (n_tiles > 0) {
    turn_begin();
    issue_o((n_tiles - 1) % STAGES, pa[0]);
    turn_end();
    wgmma_wait<0>();
    pin(o[0]);
    release(n_tiles - 1);
  }
  ta_finish<T, 1, DN>(a, b, base, gridDim.x * ROWS, o, m, l);
}
#else

template <typename T, int D, int RW, int WG, int RT = (WG > RW ? 1 : RW / WG)>
__global__ void tree_attn_wgmma_kernel(cn_cuda_tree_attn_args a) {}

template <typename T, int D, int KT> __global__ void tree_attn_ws_kernel(cn_cuda_tree_attn_args a) {}

#endif

/* A kernel variant as a type: head size, row blocks a block, warpgroups a block (3: the
 * warp-specialised form, a producer and two consumers; KT: its keys a tile). */
template <int D_, int RW_, int WG_, int KT_ = WG_KT> struct ta_variant {
  static constexpr int D = D_, RW = RW_, WG = WG_, KT = KT_;
};

/* Its kernel and shared-memory bytes. */
template <typename T, typename V> static auto variant_kernel() {
  if constexpr (V::WG == 3)
    return tree_attn_ws_kernel<T, V::D, V::KT>;
  else
    return tree_attn_wgmma_kernel<T, V::D, V::RW, V::WG>;
}
template <typename V> constexpr int variant_smem() { return V::WG == 3 ? ws_smem<V::D>() : wg_smem<V::D, V::RW>(); }

/* f(ta_variant<...>{}) for the variant that runs head_dim, rw and KV heads of `rows` query rows on
 * this context: the one choice that both the launch and the split plan's occupancy query make.
 * The plan asks with its planned rows (64 a KV head for decode and small trees, so the key split's
 * variant where a decode step launches one warpgroup's); both 64-row variants hold two blocks a
 * multiprocessor (shared memory bounds both; the split's 2 x 256 threads x 128 registers fill the
 * register file), so the count is the same. */
template <typename F>
static int with_variant(const cn_cuda_ctx *ctx, int head_dim, int rw, int rows, int n_splits, int max_keys, F &&f) {
  /* 64-row tiles of 128+ rows (where 128-row tiles would not fill the device) ran 4-9% slower with
   * the key split (bench/RESULTS.md, 2026-12-06): up to 127 rows only. */
  const bool key_split =
      ctx->ta_key_split > 0 && rows >= ctx->ta_key_split && rows < 128 && !ctx->batch_invariant;
  auto of_d = [&](auto d) {
    constexpr int D = decltype(d)::value;
    if (rw == 1) return key_split ? f(ta_variant<D, 1, 2>{}) : f(ta_variant<D, 1, 1>{});
    if (const int mode = cn_ta_ws_form(ctx, rows, n_splits, max_keys)) {
      return mode == 4 ? f(ta_variant<D, 2, 3, 2 * WG_KT>{}) : f(ta_variant<D, 2, 3, WG_KT>{});
    }
    return ctx->ta_two_wg ? f(ta_variant<D, 2, 2>{}) : f(ta_variant<D, 2, 1>{});
  };
  return head_dim == 64 ? of_d(std::integral_constant<int, 64>{}) : of_d(std::integral_constant<int, 128>{});
}

/* Raises the variant's shared-memory limit to what it uses; its resident blocks per
 * multiprocessor into *per_sm when asked. */
template <typename T, typename V> static int prepare(int *per_sm) {
  auto kernel = variant_kernel<T, V>();
  constexpr int smem = variant_smem<V>();
  CN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  if (per_sm) CN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, kernel, TA_THREADS * V::WG, smem));
  return CANOPY_OK;
}

int cn_ta_launch_wgmma(cn_cuda_ctx *ctx, const cn_cuda_tree_attn_args *a, int rw, int cap) {
  return cn_dispatch(a->dt, [&](auto t) {
    using T = decltype(t);
    const int rows = a->max_n * (a->n_heads / a->n_kv_heads);
    return with_variant(ctx, a->head_dim, rw, rows, a->n_splits, a->max_keys, [&](auto v) {
      using V = decltype(v);
      int st = prepare<T, V>(NULL);
      if (st) return st;
      dim3 grid(cap / (64 * V::RW), a->n_splits, a->n_seqs * a->n_kv_heads);
      CN_CUDA_CHECK(cn_launch(ctx, variant_kernel<T, V>(), grid, TA_THREADS * V::WG, variant_smem<V>(), *a));
      return (int)CANOPY_OK;
    });
  });
}

int cn_ta_wgmma_per_sm(const cn_cuda_ctx *ctx, int head_dim, int rw, int rows, int n_splits, int max_keys,
                       int *per_sm) {
  return with_variant(ctx, head_dim, rw, rows, n_splits, max_keys,
                      [&](auto v) { return prepare<cn_bf16_t, decltype(v)>(per_sm); });
}
